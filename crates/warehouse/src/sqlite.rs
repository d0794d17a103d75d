//! SQLite, through rusqlite (bundled): the demo's embedded warehouse, and a state store beside
//! a source. Tables are named `loopsync_state`, `loopsync_runs`, `loopsync_records` (SQLite has
//! no schemas). The state's rules are [`crate::store`]'s; here is what SQLite does its own way:
//! one connection under a mutex, run in a blocking thread; `BEGIN IMMEDIATE` for its one
//! writer; its migrations runner; its diff, on a connection of its own (a source's rows staged
//! by inserts).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use loopsync_core::spec::SyncSpec;
use loopsync_core::value::EMAIL_TRIM;
use rusqlite::{Connection, params};

use crate::schema::{Dialect, LATEST, MIGRATIONS, Rendered, newer_than_known};
use crate::store::{Exec, Keeper, Row, Store, Value, Work};
use crate::{
    DiffDialect, DiffRow, EARLIEST_CURSOR, ModelRows, STAGED, WarehouseError, cursor_condition,
    cursor_since, diff_sql, probe_sql, quote_ident, staged_spec,
};

/// The one email rule in SQL: trimmed of `EMAIL_TRIM`, ASCII letters lower-cased (SQLite's
/// `lower` folds ASCII only), as `loopsync_core::value::normalize_email` does.
fn email_key(expression: &str) -> String {
    let set: Vec<String> = EMAIL_TRIM.iter().map(|c| (*c as u32).to_string()).collect();
    format!("lower(trim({expression}, char({})))", set.join(", "))
}

/// Brings the state's tables to [`LATEST`] in one write transaction (so two processes
/// preparing at once do not both migrate), running the migrations it lacks (see
/// [`crate::schema`]).
fn migrate(c: &mut Connection) -> Result<(), WarehouseError> {
    let dialect = Dialect::sqlite(&current_schema());
    let migrations = dialect.table("migrations");
    let applied = |c: &Connection| -> Result<i64, WarehouseError> {
        c.query_row(
            &format!("SELECT COALESCE(max(version), 0) FROM {migrations}"),
            [],
            |r| r.get(0),
        )
        .map_err(error("read the state's schema version"))
    };
    c.execute_batch(&dialect.version_table())
        .map_err(error("create the state's version table"))?;
    let current = applied(c)?;
    newer_than_known(Some(current))?;
    if current == LATEST {
        return Ok(());
    }
    let tx = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(error("begin migrating the state's tables"))?;
    let current = applied(&tx)?;
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        let failed = |e: rusqlite::Error| WarehouseError::Query {
            what: format!("migration {} ({})", migration.version, migration.name),
            detail: e.to_string(),
        };
        for step in migration.steps {
            for rendered in dialect.render(step) {
                let sql = match rendered {
                    Rendered::Sql(sql) => sql,
                    Rendered::UnlessColumn { table, column, sql } => {
                        let present: bool = tx
                            .query_row(
                                "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                                params![table, column],
                                |r| r.get(0),
                            )
                            .map_err(failed)?;
                        if present {
                            continue;
                        }
                        sql
                    }
                };
                tx.execute_batch(&sql).map_err(failed)?;
            }
        }
        tx.execute(
            &format!("INSERT INTO {migrations} (version, name) VALUES (?1, ?2)"),
            params![migration.version, migration.name],
        )
        .map_err(error("record a migration"))?;
    }
    tx.commit().map_err(error("commit the state's migrations"))
}

thread_local! {
    /// The state's schema (table prefix) of the statements run on this thread: set by
    /// [`SqliteWarehouse::with`] and the diff's thread before they run any, read by [`q`].
    static SCHEMA: std::cell::RefCell<String> =
        std::cell::RefCell::new(crate::DEFAULT_SCHEMA.to_owned());
}

fn set_schema(schema: &str) {
    SCHEMA.with(|s| schema.clone_into(&mut s.borrow_mut()));
}

fn current_schema() -> String {
    SCHEMA.with(|s| s.borrow().clone())
}

/// A statement written for the tables `loopsync_*`, for this thread's state schema.
fn q(sql: &str) -> String {
    SCHEMA.with(|s| {
        let schema = s.borrow();
        if *schema == crate::DEFAULT_SCHEMA {
            sql.to_owned()
        } else {
            Dialect::sqlite(&schema).sql(sql)
        }
    })
}

fn error(what: &str) -> impl Fn(rusqlite::Error) -> WarehouseError + '_ {
    move |e| WarehouseError::Query {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

/// The state table as a read-only command reads it when there is none: no rows, its columns.
const EMPTY_STATE: &str = "(SELECT NULL AS sync, NULL AS key, NULL AS confirmed_fp, \
     NULL AS confirmed_email, NULL AS confirmed_user_id, NULL AS parked_fp, \
     NULL AS generation WHERE 0)";

/// A model error, said where it is (see [`crate::explain_model_error`]): the model as written
/// is prepared alone on `c` (not run).
fn explained(c: &Connection, spec: &SyncSpec, e: rusqlite::Error) -> WarehouseError {
    let own = match c.prepare(&spec.model) {
        Ok(statement) => Ok(statement.column_names().map(str::to_owned).collect()),
        Err(own) => Err(own.to_string()),
    };
    WarehouseError::Model {
        sync: spec.name.clone(),
        detail: crate::explain_model_error(spec, own, e.to_string()),
    }
}

fn open_connection(path: &PathBuf) -> Result<Connection, WarehouseError> {
    let connection = Connection::open(path)
        .map_err(|e| WarehouseError::Connect(format!("{}: {e}", path.display())))?;
    connection
        .busy_timeout(std::time::Duration::from_secs(10))
        .map_err(error("set a busy timeout"))?;
    connection
        .pragma_update(None, "journal_mode", "WAL")
        .map_err(error("enable WAL"))?;
    Ok(connection)
}

/// The state store on an SQLite file.
pub type SqliteWarehouse = Store<Sqlite>;

/// SQLite's way of keeping state (see [`Keeper`]).
pub struct Sqlite {
    path: PathBuf,
    /// `[warehouse] state_schema`: the tables' prefix, and how statements name them.
    dialect: Dialect,
    connection: Arc<Mutex<Connection>>,
}

impl Store<Sqlite> {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &str) -> Result<SqliteWarehouse, WarehouseError> {
        SqliteWarehouse::open_schema(path, crate::DEFAULT_SCHEMA)
    }

    /// Opens (or creates) the database file at `path`, the state's tables named
    /// `{schema}_state`, ….
    pub fn open_schema(path: &str, schema: &str) -> Result<SqliteWarehouse, WarehouseError> {
        let path = PathBuf::from(path);
        let connection = open_connection(&path)?;
        Ok(Store::new(Sqlite {
            path,
            dialect: Dialect::sqlite(schema),
            connection: Arc::new(Mutex::new(connection)),
        }))
    }
}

impl Sqlite {
    /// Runs `f` on the connection in a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, WarehouseError> + Send + 'static,
    ) -> Result<T, WarehouseError> {
        let connection = self.connection.clone();
        let schema = self.dialect.schema.clone();
        tokio::task::spawn_blocking(move || {
            set_schema(&schema);
            let mut guard = connection.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| WarehouseError::Query {
            what: "a warehouse task".into(),
            detail: e.to_string(),
        })?
    }

    /// Runs `work` on the connection in a blocking thread (its statements never wait on
    /// anything but SQLite); `immediate`: in one write transaction.
    async fn run<T: Send + 'static>(
        &self,
        what: &str,
        immediate: bool,
        work: Work<T>,
    ) -> Result<T, WarehouseError> {
        let dialect = self.dialect.clone();
        let what = what.to_owned();
        self.with(move |c| {
            if immediate {
                c.execute_batch("BEGIN IMMEDIATE")
                    .map_err(error(&format!("begin: {what}")))?;
            }
            let result = futures::executor::block_on(work(&mut SqliteExec { c, dialect }));
            if immediate {
                let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
                if let Err(e) = c.execute_batch(end) {
                    let _ = c.execute_batch("ROLLBACK");
                    return Err(error(&format!("commit: {what}"))(e));
                }
            }
            result
        })
        .await
    }
    /// The diff; with `staged`, the rows of a source are first loaded into [`STAGED`] in the
    /// diff's own connection (`spec` is then the [`staged_spec`]).
    async fn diff_rows(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        staged: Option<ModelRows>,
        absent: bool,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        let condition = cursor_condition(spec, |c| at_or_after(c, "?2"));
        let since = condition.as_ref().map(|_| cursor_since(since));
        let sql = diff_sql(
            spec,
            &DiffDialect {
                cast: &|e| format!("CAST({e} AS TEXT)"),
                state: if absent {
                    EMPTY_STATE
                } else {
                    "loopsync_state"
                },
                param: "?1",
                collate: "",
                email_key: &email_key,
                inline_state: true,
            },
            condition,
            None,
        );
        let columns = spec.columns();
        let sync = spec.name.clone();
        let path = self.path.clone();
        // A model of this file is explained in its own words; a staged one was checked by
        // its source.
        let own_spec = staged.is_none().then(|| spec.clone());
        let staged_rows = staged.map(|model| {
            // The source's rows, pumped to the blocking task that loads them.
            let (rows_tx, rows_rx) = tokio::sync::mpsc::channel(1024);
            let mut rows = model.rows;
            tokio::spawn(async move {
                while let Some(row) = rows.next().await {
                    let stop = row.is_err();
                    if rows_tx.send(row).await.is_err() || stop {
                        break;
                    }
                }
            });
            (model.columns, rows_rx)
        });
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<DiffRow, WarehouseError>>(256);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), WarehouseError>>();
        let schema = self.dialect.schema.clone();
        tokio::task::spawn_blocking(move || {
            set_schema(&schema);
            let model_error = |e: rusqlite::Error| WarehouseError::Model {
                sync: sync.clone(),
                detail: e.to_string(),
            };
            let connection = match open_connection(&path) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // The model only reads: a statement that would write is refused (a staged diff
            // writes its temporary table).
            if staged_rows.is_none()
                && let Err(e) = connection.pragma_update(None, "query_only", true)
            {
                let _ = ready_tx.send(Err(error("make the diff's connection read-only")(e)));
                return;
            }
            if let Some((columns, rows)) = staged_rows
                && let Err(e) = stage(&connection, &columns, rows)
            {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let mut statement = match connection.prepare(&q(&sql)) {
                Ok(s) => s,
                Err(e) => {
                    let error = match &own_spec {
                        Some(spec) => explained(&connection, spec, e),
                        None => model_error(e),
                    };
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let query = match &since {
                Some(since) => statement.query(params![sync, since]),
                None => statement.query(params![sync]),
            };
            let mut rows = match query {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(model_error(e)));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            loop {
                let item = match rows.next() {
                    Ok(None) => break,
                    Ok(Some(row)) => (|| -> rusqlite::Result<DiffRow> {
                        let present: Option<i64> = row.get(0)?;
                        let key: Option<String> = row.get(1)?;
                        let values = match present {
                            Some(_) => {
                                let mut values = BTreeMap::new();
                                for (i, c) in columns.iter().enumerate() {
                                    values.insert(c.clone(), row.get::<_, Option<String>>(2 + i)?);
                                }
                                Some(values)
                            }
                            None => None,
                        };
                        Ok(DiffRow {
                            key,
                            values,
                            confirmed_fp: row.get(2 + columns.len())?,
                            confirmed_email: row.get(3 + columns.len())?,
                            confirmed_user_id: row.get(4 + columns.len())?,
                            email_rows: row.get::<_, Option<i64>>(5 + columns.len())?.unwrap_or(1),
                            parked_fp: row.get(6 + columns.len())?,
                            generation: row.get::<_, Option<i64>>(7 + columns.len())?.unwrap_or(0),
                            model_hash: None,
                            unchanged_untold: 0,
                        })
                    })()
                    .map_err(|e| WarehouseError::Query {
                        what: format!("diff of sync {sync}"),
                        detail: e.to_string(),
                    }),
                    Err(e) => Err(WarehouseError::Query {
                        what: format!("diff of sync {sync}"),
                        detail: e.to_string(),
                    }),
                };
                let stop = item.is_err();
                if tx.blocking_send(item).is_err() || stop {
                    break;
                }
            }
        });
        ready_rx.await.map_err(|_| WarehouseError::Query {
            what: "diff".into(),
            detail: "the diff task ended early".into(),
        })??;
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .boxed())
    }
}

/// An event sync's cursor `column` at or after the time `since` (an SQL expression), compared
/// by `julianday`. A value SQLite cannot read as a time (`julianday` is NULL: a number, an
/// offset such as `+00`) is read on every run, for the extractor to send or refuse: never
/// dropped silently.
fn at_or_after(column: &str, since: &str) -> String {
    format!("julianday({column}) IS NULL OR julianday({column}) >= julianday({since})")
}

/// Loads a source's rows into [`STAGED`], a temporary table of `connection`, in one
/// transaction.
fn stage(
    connection: &Connection,
    columns: &[String],
    mut rows: tokio::sync::mpsc::Receiver<Result<crate::source::TextRow, WarehouseError>>,
) -> Result<(), WarehouseError> {
    let declared: Vec<String> = columns
        .iter()
        .map(|c| format!("{} TEXT", quote_ident(c)))
        .collect();
    connection
        .execute_batch(&format!(
            "CREATE TEMP TABLE {STAGED} ({}); BEGIN",
            declared.join(", ")
        ))
        .map_err(error("stage the model's rows"))?;
    let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
    let mut insert = connection
        .prepare(&format!(
            "INSERT INTO {STAGED} VALUES ({})",
            placeholders.join(", ")
        ))
        .map_err(error("stage the model's rows"))?;
    while let Some(row) = rows.blocking_recv() {
        insert
            .execute(rusqlite::params_from_iter(row?.iter()))
            .map_err(error("stage the model's rows"))?;
    }
    connection
        .execute_batch("COMMIT")
        .map_err(error("stage the model's rows"))
}

#[async_trait]
impl Keeper for Sqlite {
    async fn auto<T: Send + 'static>(
        &self,
        what: &str,
        work: Work<T>,
    ) -> Result<T, WarehouseError> {
        self.run(what, false, work).await
    }

    /// `BEGIN IMMEDIATE`: SQLite's one writer is taken at the start, so a transaction that
    /// reads then writes never fails to upgrade its lock (nor waits in the middle).
    async fn tx<T: Send + 'static>(&self, what: &str, work: Work<T>) -> Result<T, WarehouseError> {
        self.run(what, true, work).await
    }

    async fn migrate(&self) -> Result<(), WarehouseError> {
        self.with(migrate).await
    }

    async fn version(&self) -> Result<Option<i64>, WarehouseError> {
        self.with(|c| {
            let migrations = Dialect::sqlite(&current_schema()).table("migrations");
            let known: bool = c
                .query_row(
                    "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    params![migrations],
                    |r| r.get(0),
                )
                .map_err(error("read the state's schema version"))?;
            if !known {
                return Ok(None);
            }
            c.query_row(
                &format!("SELECT COALESCE(max(version), 0) FROM {migrations}"),
                [],
                |r| r.get(0),
            )
            .map(Some)
            .map_err(error("read the state's schema version"))
        })
        .await
    }

    async fn check_privileges(&self) -> Result<(), WarehouseError> {
        let readonly = std::fs::metadata(&self.path)
            .map(|m| m.permissions().readonly())
            .unwrap_or(false);
        if readonly {
            return Err(WarehouseError::Privileges(format!(
                "{}: the file is read-only, and the state is written to it",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// SQLite reads every row (it leaves nothing out: no `diff_changes` of its own).
    async fn diff(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        _leave_out_unchanged: bool,
        staged: Option<ModelRows>,
        absent: bool,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        match staged {
            Some(model) => {
                let staged = staged_spec(spec, &model.columns, |c| c.to_owned());
                self.diff_rows(&staged, since, Some(model), absent).await
            }
            None => self.diff_rows(spec, since, None, absent).await,
        }
    }

    async fn check_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError> {
        let sql = probe_sql(
            spec,
            cursor_condition(spec, |c| at_or_after(c, &format!("'{EARLIEST_CURSOR}'"))),
        );
        let spec = spec.clone();
        self.with(move |c| {
            c.prepare(&q(&sql))
                .map(|_| ())
                .map_err(|e| explained(c, &spec, e))
        })
        .await
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value as Owned, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Owned(Owned::Null),
            Value::Int(v) => ToSqlOutput::Owned(Owned::Integer(*v)),
            Value::Float(v) => ToSqlOutput::Owned(Owned::Real(*v)),
            Value::Bool(v) => ToSqlOutput::Owned(Owned::Integer(i64::from(*v))),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
        })
    }
}

/// The executor on SQLite's connection, in the blocking thread that holds it (its futures are
/// ready at once: [`Sqlite::run`] drives them there).
struct SqliteExec<'c> {
    c: &'c mut Connection,
    dialect: Dialect,
}

fn value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            Value::Text(String::from_utf8_lossy(t).into_owned())
        }
    }
}

#[async_trait]
impl Exec for SqliteExec<'_> {
    fn dialect(&self) -> &Dialect {
        &self.dialect
    }

    async fn execute(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<u64, WarehouseError> {
        let sql = self.dialect.statement(sql);
        let mut statement = self.c.prepare_cached(&sql).map_err(error(what))?;
        let n = statement
            .execute(rusqlite::params_from_iter(params.iter()))
            .map_err(error(what))?;
        Ok(n as u64)
    }

    async fn query(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<Vec<Row>, WarehouseError> {
        let sql = self.dialect.statement(sql);
        let mut statement = self.c.prepare_cached(&sql).map_err(error(what))?;
        let n = statement.column_count();
        let mut rows = statement
            .query(rusqlite::params_from_iter(params.iter()))
            .map_err(error(what))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(error(what))? {
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                values.push(value(row.get_ref(i).map_err(error(what))?));
            }
            out.push(Row(values));
        }
        Ok(out)
    }

    async fn batch(
        &mut self,
        what: &str,
        statements: &[String],
        items: Vec<(usize, Vec<Value>)>,
    ) -> Result<u64, WarehouseError> {
        let statements: Vec<String> = statements
            .iter()
            .map(|s| self.dialect.statement(s))
            .collect();
        let mut changed = 0;
        for (i, params) in items {
            let mut statement = self.c.prepare_cached(&statements[i]).map_err(error(what))?;
            changed += statement
                .execute(rusqlite::params_from_iter(params.iter()))
                .map_err(error(what))? as u64;
        }
        Ok(changed)
    }

    async fn lock_sync_runs(&mut self, _sync: &str) -> Result<(), WarehouseError> {
        Ok(())
    }

    async fn lock_rows(
        &mut self,
        _what: &str,
        _sql: &str,
        _params: Vec<Value>,
    ) -> Result<(), WarehouseError> {
        Ok(())
    }
}
