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
pub(crate) mod diff;
mod store;

use diff::at_or_after;
use store::{SqliteExec, migrate};

use crate::{
    DiffDialect, DiffRow, EARLIEST_CURSOR, ModelRows, STAGED, WarehouseError, cursor_check,
    cursor_condition, cursor_since, diff_sql, probe_sql, quote_ident, staged_spec,
};

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

/// Opens the file at `path`; a file that does not exist yet is made readable and writable by
/// its owner alone (0600 on Unix: it holds emails), and SQLite gives its `-wal` and `-shm`
/// files the database's own permissions.
fn open_connection(path: &PathBuf) -> Result<Connection, WarehouseError> {
    create_private(path)
        .map_err(|e| WarehouseError::Connect(format!("{}: {e}", path.display())))?;
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

/// Makes an empty file at `path`, 0600 on Unix, unless there is one (an empty file is an
/// empty database to SQLite). SQLite's own names for a database in memory are left to it.
fn create_private(path: &PathBuf) -> std::io::Result<()> {
    if path.as_os_str().is_empty() || path.as_os_str() == ":memory:" {
        return Ok(());
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
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
            cursor_check(spec, |c| at_or_after(c, &format!("'{EARLIEST_CURSOR}'"))),
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
