//! SQLite, through rusqlite (bundled): the demo's embedded warehouse. Tables are named
//! `loopsync_state`, `loopsync_runs`, `loopsync_records` (SQLite has no schemas).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::{Outcome, OutcomeStatus, RequestCounts};
use loopsync_core::spec::SyncSpec;
use loopsync_core::value::EMAIL_TRIM;
use rusqlite::{Connection, OptionalExtension, params};

use crate::postgres::newer_than_known;
use crate::schema::{Dialect, LATEST, MIGRATIONS, Rendered};
use crate::{
    Adoption, DestinationBinding, DiffDialect, DiffRow, EARLIEST_CURSOR, Emitted, ExtractCounts,
    LEASE, ModelRows, RecordResult, RunSummary, STAGED, StateReset, Warehouse, WarehouseError,
    cursor_condition, cursor_since, diff_sql, is_removal, probe_sql, quote_ident,
    record_requests_sql, requests_of, staged_spec, summary_request_sql, summary_rows_sql,
    watermark_sql,
};

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// The statuses of a run still in progress.
const OPEN: &str = "'requested', 'extracting', 'sending'";

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

const FINISH_RUN: &str = "
UPDATE loopsync_runs
   SET status = CASE WHEN error IS NOT NULL THEN 'failed'
                     WHEN EXISTS (SELECT 1 FROM loopsync_records x WHERE x.run_id = loopsync_runs.id
                                   AND x.outcome IN ('invalid', 'rejected', 'dead_lettered'))
                     THEN 'degraded' ELSE 'succeeded' END,
       finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
 WHERE id = ?1 AND status = 'sending'
   AND (SELECT count(*) FROM loopsync_records x WHERE x.run_id = loopsync_runs.id) >= expected";

fn error(what: &str) -> impl Fn(rusqlite::Error) -> WarehouseError + '_ {
    move |e| WarehouseError::Query {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

/// The warehouse on an SQLite file.
pub struct SqliteWarehouse {
    path: PathBuf,
    /// `[warehouse] state_schema`: the tables' prefix.
    schema: String,
    connection: Arc<Mutex<Connection>>,
    /// [`Warehouse::read_only`] found no state: it reads as empty, and nothing is made.
    absent: Arc<std::sync::atomic::AtomicBool>,
}

/// The state table as a read-only command reads it when there is none: no rows, its columns.
const EMPTY_STATE: &str = "(SELECT NULL AS sync, NULL AS key, NULL AS confirmed_fp, \
     NULL AS confirmed_email, NULL AS confirmed_user_id, NULL AS parked_fp, \
     NULL AS generation, NULL AS emitted_run, NULL AS confirmed_run, NULL AS resubscribe, \
     NULL AS emitted_email, NULL AS emitted_user_id \
     WHERE 0)";

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

impl SqliteWarehouse {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &str) -> Result<SqliteWarehouse, WarehouseError> {
        SqliteWarehouse::open_schema(path, crate::DEFAULT_SCHEMA)
    }

    /// Opens (or creates) the database file at `path`, the state's tables named
    /// `{schema}_state`, ….
    pub fn open_schema(path: &str, schema: &str) -> Result<SqliteWarehouse, WarehouseError> {
        let path = PathBuf::from(path);
        let connection = open_connection(&path)?;
        Ok(SqliteWarehouse {
            path,
            schema: schema.to_owned(),
            connection: Arc::new(Mutex::new(connection)),
            absent: Arc::default(),
        })
    }

    fn absent(&self) -> bool {
        self.absent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` on the connection in a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, WarehouseError> + Send + 'static,
    ) -> Result<T, WarehouseError> {
        let connection = self.connection.clone();
        let schema = self.schema.clone();
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

    /// The diff; with `staged`, the rows of a source are first loaded into [`STAGED`] in the
    /// diff's own connection (`spec` is then the [`staged_spec`]).
    async fn diff(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        staged: Option<ModelRows>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        let condition = cursor_condition(spec, |c| at_or_after(c, "?2"));
        let since = condition.as_ref().map(|_| cursor_since(since));
        let sql = diff_sql(
            spec,
            &DiffDialect {
                cast: &|e| format!("CAST({e} AS TEXT)"),
                state: if self.absent() {
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
        let schema = self.schema.clone();
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
                            unsure: row.get::<_, Option<i64>>("unsure")?.unwrap_or(0) != 0,
                            resubscribe: row.get::<_, Option<i64>>("resubscribe")?.unwrap_or(0)
                                != 0,
                            user_id_rows: row.get::<_, Option<i64>>("ucount")?.unwrap_or(1),
                            emitted_email: row.get("emitted_email")?,
                            emitted_user_id: row.get("emitted_user_id")?,
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

    fn summary_sql(filter: &str) -> String {
        let rows = summary_rows_sql(|condition| {
            format!("COALESCE(sum(x.outcome = 'invalid' AND {condition}), 0)")
        });
        let requests = summary_request_sql("loopsync_attempts");
        format!(
            "SELECT r.id, r.sync, r.status, r.requested_at, r.finished_at,
                    CAST((julianday(r.finished_at) - julianday(r.requested_at)) * 86400000 AS INTEGER),
                    r.expected, {rows}, r.removed, r.unchanged,
                    sum(x.outcome = 'confirmed'), sum(x.outcome = 'skipped'),
                    sum(x.outcome = 'invalid'), sum(x.outcome = 'rejected'),
                    sum(x.outcome = 'dead_lettered'), count(x.key), r.error,
                    sum(x.operation = 'rekey' AND x.outcome = 'confirmed'),
                    {requests},
                    r.preflight_requests, r.preflight_retries, r.preflight_rate_limited,
                    r.ignored
             FROM loopsync_runs r LEFT JOIN loopsync_records x ON x.run_id = r.id
             WHERE {filter} GROUP BY r.id ORDER BY r.id DESC LIMIT ?2"
        )
    }
}

/// A record's columns as [`record`] reads them (`x` is the record's alias).
fn record_columns() -> String {
    format!(
        "x.run_id, x.sync, x.key, x.operation, x.outcome, x.reason, x.contact_id, {}, x.at",
        record_requests_sql("loopsync_attempts")
    )
}

/// Column `i` holds a name loopsync stored (a run status, a record outcome).
fn column_name<T: std::str::FromStr<Err = loopsync_core::envelope::UnknownName>>(
    row: &rusqlite::Row<'_>,
    i: usize,
) -> rusqlite::Result<T> {
    let name: String = row.get(i)?;
    name.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<RecordResult> {
    Ok(RecordResult {
        run_id: r.get(0)?,
        sync: r.get(1)?,
        key: r.get(2)?,
        operation: r.get(3)?,
        outcome: column_name(r, 4)?,
        reason: r.get(5)?,
        contact_id: r.get(6)?,
        requests: r.get(7)?,
        at: r.get(8)?,
    })
}

fn summary(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunSummary> {
    let count =
        |i: usize| -> rusqlite::Result<i64> { Ok(row.get::<_, Option<i64>>(i)?.unwrap_or(0)) };
    let mut summary = RunSummary {
        id: row.get(0)?,
        sync: row.get(1)?,
        status: column_name(row, 2)?,
        requested_at: row.get(3)?,
        finished_at: row.get(4)?,
        duration_ms: row.get(5)?,
        expected: row.get(6)?,
        added: count(7)?,
        changed: count(8)?,
        invalid_rows: count(9)?,
        removed: row.get(10)?,
        unchanged: row.get(11)?,
        confirmed: count(12)?,
        skipped: count(13)?,
        invalid: count(14)?,
        rejected: count(15)?,
        dead_lettered: count(16)?,
        records: count(17)?,
        error: row.get(18)?,
        rekeyed: count(19)?,
        ignored: count(29)?,
        ..RunSummary::default()
    };
    let mut loader = [0; 6];
    for (i, n) in loader.iter_mut().enumerate() {
        *n = count(20 + i)?;
    }
    let mut preflight = [0; 3];
    for (i, n) in preflight.iter_mut().enumerate() {
        *n = count(26 + i)?;
    }
    requests_of(&mut summary, loader, preflight);
    Ok(summary)
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
impl Warehouse for SqliteWarehouse {
    async fn prepare(&self) -> Result<(), WarehouseError> {
        self.with(migrate).await
    }

    async fn read_only(&self) -> Result<bool, WarehouseError> {
        let version = self
            .with(|c| {
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
            .await?;
        let exists = crate::readable(version)?;
        self.absent
            .store(!exists, std::sync::atomic::Ordering::Relaxed);
        Ok(exists)
    }

    async fn check_privileges(&self) -> Result<(), WarehouseError> {
        let path = self.path.clone();
        let readonly = std::fs::metadata(&path)
            .map(|m| m.permissions().readonly())
            .unwrap_or(false);
        if readonly {
            return Err(WarehouseError::Privileges(format!(
                "{}: the file is read-only, and the state is written to it",
                path.display()
            )));
        }
        Ok(())
    }

    async fn diff_since(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        self.diff(spec, since, None).await
    }

    async fn diff_model(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        _leave_out_unchanged: bool,
        model: ModelRows,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        // SQLite reads every row (it has no `diff_changes` of its own).
        let staged = staged_spec(spec, &model.columns, |c| c.to_owned());
        self.diff(&staged, since, Some(model)).await
    }

    async fn cursor_watermark(
        &self,
        sync: &str,
        column: &str,
    ) -> Result<Option<i64>, WarehouseError> {
        if self.absent() {
            return Ok(None);
        }
        let (sync, column) = (sync.to_owned(), column.to_owned());
        self.with(move |c| {
            c.query_row(
                &q(&watermark_sql(
                    "loopsync_runs",
                    "loopsync_records",
                    "?1",
                    "?2",
                )),
                params![sync, column],
                |r| r.get(0),
            )
            .optional()
            .map_err(error("read a sync's cursor"))
        })
        .await
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

    async fn create_run(&self, sync: &str) -> Result<i64, WarehouseError> {
        let sync = sync.to_owned();
        self.with(move |c| {
            // One writer at a time in SQLite: the check and the insert are one step.
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(error("begin creating a run"))?;
            tx.execute(
                &q(&format!(
                    "UPDATE loopsync_runs
                        SET status = 'interrupted', finished_at = {NOW},
                            error = 'its process stopped (no sign of life since '
                                    || COALESCE(heartbeat_at, requested_at) || ')'
                      WHERE sync = ?1 AND status IN ({OPEN})
                        AND COALESCE(heartbeat_at, requested_at)
                            < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?2)"
                )),
                params![sync, format!("-{} seconds", LEASE.as_secs())],
            )
            .map_err(error("close abandoned runs"))?;
            let open: Option<(i64, crate::RunStatus)> = tx
                .query_row(
                    &q(&format!(
                        "SELECT id, status FROM loopsync_runs WHERE sync = ?1 AND status IN ({OPEN})
                          ORDER BY id LIMIT 1"
                    )),
                    params![sync],
                    |r| Ok((r.get(0)?, column_name(r, 1)?)),
                )
                .optional()
                .map_err(error("look for a run in progress"))?;
            if let Some((run_id, status)) = open {
                return Err(WarehouseError::RunInProgress {
                    sync,
                    run_id,
                    status,
                });
            }
            tx.execute(
                &q(&format!(
                    "INSERT INTO loopsync_runs (sync, status, requested_at, heartbeat_at)
                     VALUES (?1, 'requested', {NOW}, {NOW})"
                )),
                params![sync],
            )
            .map_err(error("create a run"))?;
            let id = tx.last_insert_rowid();
            tx.commit().map_err(error("create a run"))?;
            Ok(id)
        })
        .await
    }

    async fn heartbeat(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.with(move |c| {
            c.execute(
                &q(&format!(
                    "UPDATE loopsync_runs SET heartbeat_at = {NOW} WHERE id = ?1"
                )),
                params![run_id],
            )
            .map_err(error("note that a run is alive"))?;
            Ok(())
        })
        .await
    }

    async fn installation(&self) -> Result<String, WarehouseError> {
        self.with(|c| {
            c.query_row(&q("SELECT id FROM loopsync_installation"), [], |r| r.get(0))
                .map_err(error("read the installation id"))
        })
        .await
    }

    async fn claim_run(
        &self,
        run_id: i64,
        redelivered: bool,
    ) -> Result<Option<String>, WarehouseError> {
        self.with(move |c| {
            c.query_row(
                &q(&format!(
                    "UPDATE loopsync_runs SET status = 'extracting', started_at = {NOW}
                      WHERE id = ?1 AND (status = 'requested' OR (?2 AND status = 'extracting'))
                      RETURNING sync"
                )),
                params![run_id, redelivered],
                |r| r.get(0),
            )
            .optional()
            .map_err(error("claim a run"))
        })
        .await
    }

    async fn mark_emitted_as(
        &self,
        sync: &str,
        run_id: i64,
        emitted: &[Emitted],
    ) -> Result<(), WarehouseError> {
        let sync = sync.to_owned();
        let emitted = emitted.to_vec();
        self.with(move |c| {
            let tx = c.transaction().map_err(error("begin"))?;
            {
                let mut s = tx
                    .prepare_cached(&q("INSERT INTO loopsync_state (sync, key, emitted_fp, emitted_run, emitted_email, emitted_user_id)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (sync, key) DO UPDATE
                            SET emitted_fp = excluded.emitted_fp, emitted_run = excluded.emitted_run,
                                emitted_email = COALESCE(excluded.emitted_email, loopsync_state.emitted_email),
                                emitted_user_id = COALESCE(excluded.emitted_user_id, loopsync_state.emitted_user_id)"),
                    )
                    .map_err(error("note emitted records"))?;
                for e in &emitted {
                    s.execute(params![sync, e.key, e.fingerprint, run_id, e.email, e.user_id])
                        .map_err(error("note an emitted record"))?;
                }
            }
            tx.commit().map_err(error("commit"))
        })
        .await
    }

    async fn finish_extract(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        let counts = counts.clone();
        self.with(move |c| {
            c.execute(&q(&format!(
                    "UPDATE loopsync_runs SET status = 'sending', extracted_at = {NOW},
                            expected = (SELECT count(*) FROM (
                                SELECT key FROM loopsync_state WHERE sync = loopsync_runs.sync AND emitted_run = ?1
                                UNION SELECT key FROM loopsync_records WHERE run_id = ?1)),
                            added = ?2, changed = ?3, removed = ?4, unchanged = ?5, invalid_rows = ?6,
                            error = COALESCE(?7, error), ignored = ?8, cursor_high = ?9,
                            cursor_column = ?10
                      WHERE id = ?1 AND status = 'extracting'"
                )),
                params![
                    run_id,
                    counts.added,
                    counts.changed,
                    counts.removed,
                    counts.unchanged,
                    counts.invalid_rows,
                    counts.error,
                    counts.ignored,
                    counts.cursor_high,
                    counts.cursor_column
                ],
            )
            .map_err(error("finish an extraction"))?;
            c.execute(&q(FINISH_RUN), params![run_id])
                .map_err(error("finish a run"))?;
            Ok(())
        })
        .await
    }

    async fn adopt(
        &self,
        sync: &str,
        run_id: i64,
        records: &[Adoption],
    ) -> Result<(), WarehouseError> {
        let sync = sync.to_owned();
        let records = records.to_vec();
        self.with(move |c| {
            let tx = c.transaction().map_err(error("begin"))?;
            {
                let mut s = tx
                    .prepare_cached(&q(&format!(
                        "INSERT INTO loopsync_state (sync, key, confirmed_fp, confirmed_run, confirmed_at,
                                                     confirmed_email, confirmed_user_id)
                         VALUES (?1, ?2, ?3, ?4, {NOW}, ?5, ?6)
                         ON CONFLICT (sync, key) DO UPDATE
                            SET confirmed_fp = excluded.confirmed_fp, confirmed_run = excluded.confirmed_run,
                                confirmed_at = excluded.confirmed_at,
                                confirmed_email = excluded.confirmed_email,
                                confirmed_user_id = excluded.confirmed_user_id,
                                parked_fp = NULL, resubscribe = 0,
                                emitted_email = CASE WHEN loopsync_state.emitted_run > excluded.confirmed_run
                                                     THEN loopsync_state.emitted_email END,
                                emitted_user_id = CASE WHEN loopsync_state.emitted_run > excluded.confirmed_run
                                                       THEN loopsync_state.emitted_user_id END,
                                generation = loopsync_state.generation + 1"
                    )))
                    .map_err(error("adopt records"))?;
                for r in &records {
                    s.execute(params![sync, r.key, r.fingerprint, run_id, r.email, r.user_id])
                        .map_err(error("adopt a record"))?;
                }
            }
            tx.commit().map_err(error("commit"))
        })
        .await
    }

    async fn park(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        let sync = sync.to_owned();
        let keys = keys.to_vec();
        self.with(move |c| {
            let tx = c.transaction().map_err(error("begin"))?;
            let mut parked = 0;
            {
                let mut s = tx
                    .prepare_cached(&q("INSERT INTO loopsync_state (sync, key, parked_fp)
                         SELECT sync, key, fingerprint FROM loopsync_records
                          WHERE sync = ?1 AND key = ?2 ORDER BY run_id DESC LIMIT 1
                         ON CONFLICT (sync, key) DO UPDATE SET parked_fp = excluded.parked_fp"))
                    .map_err(error("park records"))?;
                for key in &keys {
                    parked += s
                        .execute(params![sync, key])
                        .map_err(error("park a record"))? as u64;
                }
            }
            tx.commit().map_err(error("commit"))?;
            Ok(parked)
        })
        .await
    }

    async fn unpark(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        let sync = sync.to_owned();
        let keys = keys.to_vec();
        self.with(move |c| {
            let tx = c.transaction().map_err(error("begin"))?;
            let mut unparked = 0;
            {
                let mut s = tx
                    .prepare_cached(&q("UPDATE loopsync_state SET parked_fp = NULL
                          WHERE sync = ?1 AND key = ?2 AND parked_fp IS NOT NULL"))
                    .map_err(error("unpark records"))?;
                for key in &keys {
                    unparked += s
                        .execute(params![sync, key])
                        .map_err(error("unpark a record"))? as u64;
                }
            }
            tx.commit().map_err(error("commit"))?;
            Ok(unparked)
        })
        .await
    }

    async fn owners(
        &self,
        sync: &str,
        identities: &[String],
    ) -> Result<Vec<(String, Option<String>, Option<String>)>, WarehouseError> {
        if self.absent() || identities.is_empty() {
            return Ok(Vec::new());
        }
        let sync = sync.to_owned();
        let identities = identities.to_vec();
        self.with(move |c| {
            let mut s = c
                .prepare_cached(&q(&format!(
                    "SELECT key, confirmed_email, confirmed_user_id FROM loopsync_state
                      WHERE sync = ?1 AND confirmed_fp IS NOT NULL
                        AND ({} = ?2 OR confirmed_user_id = ?2)",
                    email_key("confirmed_email")
                )))
                .map_err(error("read the owners of contacts"))?;
            let mut owners = std::collections::BTreeSet::new();
            for identity in &identities {
                let rows = s
                    .query_map(params![sync, identity], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                    })
                    .map_err(error("read the owners of contacts"))?;
                for row in rows {
                    owners.insert(row.map_err(error("read the owners of contacts"))?);
                }
            }
            Ok(owners.into_iter().collect())
        })
        .await
    }

    async fn parked(&self, sync: Option<&str>) -> Result<Vec<(String, String)>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        let sync = sync.map(str::to_owned);
        self.with(move |c| {
            let mut s = c
                .prepare(&q("SELECT sync, key FROM loopsync_state
                      WHERE parked_fp IS NOT NULL AND (?1 IS NULL OR sync = ?1)
                      ORDER BY sync, key"))
                .map_err(error("read parked records"))?;
            let rows = s
                .query_map(params![sync], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(error("read parked records"))?;
            rows.collect::<rusqlite::Result<Vec<(String, String)>>>()
                .map_err(error("read parked records"))
        })
        .await
    }

    async fn finish_adopt(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        let counts = counts.clone();
        self.with(move |c| {
            c.execute(&q(&format!(
                    "UPDATE loopsync_runs SET status = 'adopted', extracted_at = {NOW}, finished_at = {NOW},
                            expected = 0, added = ?2, changed = ?3, removed = ?4, unchanged = ?5,
                            invalid_rows = ?6, ignored = ?7, cursor_high = ?8, cursor_column = ?9
                      WHERE id = ?1"
                )),
                params![
                    run_id,
                    counts.added,
                    counts.changed,
                    counts.removed,
                    counts.unchanged,
                    counts.invalid_rows,
                    counts.ignored,
                    counts.cursor_high,
                    counts.cursor_column
                ],
            )
            .map_err(error("finish an adoption"))?;
            Ok(())
        })
        .await
    }

    async fn record_preflight(
        &self,
        run_id: i64,
        counts: &RequestCounts,
    ) -> Result<(), WarehouseError> {
        let counts = *counts;
        self.with(move |c| {
            c.execute(
                &q("UPDATE loopsync_runs
                    SET preflight_requests = ?2, preflight_retries = ?3, preflight_rate_limited = ?4
                  WHERE id = ?1"),
                params![run_id, counts.total(), counts.retries, counts.rate_limited],
            )
            .map_err(error("record a run's preflight"))?;
            Ok(())
        })
        .await
    }

    async fn fail_run(&self, run_id: i64, message: &str) -> Result<(), WarehouseError> {
        let message = message.to_owned();
        self.with(move |c| {
            c.execute(&q(&format!(
                    "UPDATE loopsync_runs SET status = 'failed', finished_at = {NOW}, error = ?2 WHERE id = ?1"
                )),
                params![run_id, message],
            )
            .map_err(error("fail a run"))?;
            Ok(())
        })
        .await
    }

    async fn interrupt_run(&self, run_id: i64, why: &str) -> Result<bool, WarehouseError> {
        let why = why.to_owned();
        self.with(move |c| {
            let closed = c
                .execute(&q(&format!(
                        "UPDATE loopsync_runs SET status = 'interrupted', finished_at = {NOW}, error = ?2
                          WHERE id = ?1 AND status IN ({OPEN})"
                    )),
                    params![run_id, why],
                )
                .map_err(error("close an interrupted run"))?;
            Ok(closed > 0)
        })
        .await
    }

    async fn record_outcomes(&self, outcomes: &[Outcome]) -> Result<(), WarehouseError> {
        let mut outcomes = outcomes.to_vec();
        outcomes.sort_by(|a, b| (&a.sync, &a.key).cmp(&(&b.sync, &b.key)));
        self.with(move |c| {
            let tx = c.transaction().map_err(error("begin"))?;
            let mut runs = Vec::new();
            {
                let mut insert = tx
                    .prepare_cached(&q("INSERT INTO loopsync_records
                            (run_id, sync, key, fingerprint, operation, outcome, reason, contact_id, requests, at,
                             change, writes, events, deletes, retries, rate_limited)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9,
                                 strftime('%Y-%m-%dT%H:%M:%fZ', ?10 / 1000.0, 'unixepoch'),
                                 ?11, ?12, ?13, ?14, ?15, ?16)
                         ON CONFLICT (run_id, key) DO UPDATE
                            SET fingerprint = excluded.fingerprint, operation = excluded.operation,
                                outcome = excluded.outcome, reason = excluded.reason,
                                contact_id = excluded.contact_id,
                                change = COALESCE(excluded.change, loopsync_records.change),
                                requests = loopsync_records.requests + excluded.requests,
                                writes = loopsync_records.writes + excluded.writes,
                                events = loopsync_records.events + excluded.events,
                                deletes = loopsync_records.deletes + excluded.deletes,
                                retries = loopsync_records.retries + excluded.retries,
                                rate_limited = loopsync_records.rate_limited + excluded.rate_limited,
                                at = excluded.at
                          WHERE loopsync_records.outcome <> 'confirmed' AND excluded.outcome = 'confirmed'"),
                    )
                    .map_err(error("record outcomes"))?;
                // Each attempt once: a repeated `attempted` outcome is ignored.
                let mut attempted = tx
                    .prepare_cached(&q("INSERT INTO loopsync_attempts
                            (run_id, sync, key, attempt, requests, writes, events, deletes, retries,
                             rate_limited, reason, at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11,
                                 strftime('%Y-%m-%dT%H:%M:%fZ', ?12 / 1000.0, 'unixepoch'))
                         ON CONFLICT (run_id, key, attempt) DO NOTHING"),
                    )
                    .map_err(error("record outcomes"))?;
                let mut confirm = tx
                    .prepare_cached(&q(&format!(
                        "INSERT INTO loopsync_state (sync, key, confirmed_fp, confirmed_run, confirmed_at, contact_id,
                                                     confirmed_email, confirmed_user_id)
                         VALUES (?1, ?2, ?3, ?4, {NOW}, ?5, ?6, ?7)
                         ON CONFLICT (sync, key) DO UPDATE
                            SET confirmed_fp = excluded.confirmed_fp, confirmed_run = excluded.confirmed_run,
                                confirmed_at = excluded.confirmed_at,
                                contact_id = COALESCE(excluded.contact_id, loopsync_state.contact_id),
                                confirmed_email = COALESCE(excluded.confirmed_email, loopsync_state.confirmed_email),
                                confirmed_user_id = COALESCE(excluded.confirmed_user_id, loopsync_state.confirmed_user_id),
                                parked_fp = NULL,
                                generation = loopsync_state.generation
                                    + CASE WHEN loopsync_state.confirmed_run IS excluded.confirmed_run
                                            AND loopsync_state.confirmed_fp IS excluded.confirmed_fp
                                           THEN 0 ELSE 1 END
                          WHERE loopsync_state.confirmed_run IS NULL
                             OR loopsync_state.confirmed_run <= excluded.confirmed_run"
                    )))
                    .map_err(error("record outcomes"))?;
                // A confirmed removal leaves a tombstone (see the PostgreSQL side).
                let mut remove = tx
                    .prepare_cached(&q(&format!(
                        "UPDATE loopsync_state
                            SET confirmed_fp = NULL, confirmed_email = NULL, confirmed_user_id = NULL,
                                contact_id = NULL, parked_fp = NULL, confirmed_run = ?3,
                                confirmed_at = {NOW}, generation = generation + 1,
                                resubscribe = CASE WHEN ?4 = 'unsubscribe' THEN 1 ELSE 0 END,
                                emitted_email = CASE WHEN emitted_run > ?3 THEN emitted_email END,
                                emitted_user_id = CASE WHEN emitted_run > ?3 THEN emitted_user_id END
                          WHERE sync = ?1 AND key = ?2
                            AND (confirmed_fp IS NOT NULL
                                 OR (emitted_run IS NOT NULL AND emitted_run > COALESCE(confirmed_run, 0)))
                            AND (confirmed_run IS NULL OR confirmed_run < ?3
                                 OR (confirmed_run = ?3 AND confirmed_fp IS NOT NULL))"
                    )))
                    .map_err(error("record outcomes"))?;
                for o in &outcomes {
                    let counts = o.request_counts();
                    if !o.status.is_final() {
                        attempted
                            .execute(params![
                                o.run_id,
                                o.sync,
                                o.key,
                                o.attempt.as_deref().unwrap_or(""),
                                counts.total(),
                                counts.writes,
                                counts.events,
                                counts.deletes,
                                counts.retries,
                                counts.rate_limited,
                                o.reason,
                                o.at
                            ])
                            .map_err(error("record an attempt"))?;
                        continue;
                    }
                    insert
                        .execute(params![
                            o.run_id,
                            o.sync,
                            o.key,
                            o.fingerprint,
                            o.operation,
                            o.status.as_str(),
                            o.reason,
                            o.contact_id,
                            counts.total(),
                            o.at,
                            o.change.map(|c| c.as_str()),
                            counts.writes,
                            counts.events,
                            counts.deletes,
                            counts.retries,
                            counts.rate_limited
                        ])
                        .map_err(error("record an outcome"))?;
                    if o.status == OutcomeStatus::Confirmed && is_removal(&o.operation) {
                        remove
                            .execute(params![o.sync, o.key, o.run_id, o.operation])
                            .map_err(error("remove from the state"))?;
                    } else if o.status == OutcomeStatus::Confirmed {
                        confirm
                            .execute(params![
                                o.sync,
                                o.key,
                                o.fingerprint,
                                o.run_id,
                                o.contact_id,
                                o.email,
                                o.user_id
                            ])
                            .map_err(error("advance the state"))?;
                    }
                    if !runs.contains(&o.run_id) {
                        runs.push(o.run_id);
                    }
                }
                for run in &runs {
                    tx.execute(&q(FINISH_RUN), params![run]).map_err(error("finish a run"))?;
                }
            }
            tx.commit().map_err(error("commit outcomes"))
        })
        .await
    }

    async fn finish_if_complete(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.with(move |c| {
            c.execute(&q(FINISH_RUN), params![run_id])
                .map_err(error("finish a run"))?;
            Ok(())
        })
        .await
    }

    async fn run(&self, run_id: i64) -> Result<Option<RunSummary>, WarehouseError> {
        if self.absent() {
            return Ok(None);
        }
        self.with(move |c| {
            c.query_row(
                &q(&Self::summary_sql("r.id = ?1")),
                params![run_id, 1],
                summary,
            )
            .optional()
            .map_err(error("read a run"))
        })
        .await
    }

    async fn runs(
        &self,
        sync: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunSummary>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        let sync = sync.map(str::to_owned);
        self.with(move |c| {
            let mut s = c
                .prepare(&q(&Self::summary_sql("(?1 IS NULL OR r.sync = ?1)")))
                .map_err(error("read runs"))?;
            let rows = s
                .query_map(params![sync, limit], summary)
                .map_err(error("read runs"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(error("read runs"))
        })
        .await
    }

    async fn records(&self, run_id: i64) -> Result<Vec<RecordResult>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        self.with(move |c| {
            let mut s = c
                .prepare(&q(&format!(
                    "SELECT {} FROM loopsync_records x WHERE run_id = ?1 ORDER BY key",
                    record_columns()
                )))
                .map_err(error("read records"))?;
            let rows = s
                .query_map(params![run_id], record)
                .map_err(error("read records"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(error("read records"))
        })
        .await
    }

    async fn rejections(&self, sync: Option<&str>) -> Result<Vec<RecordResult>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        let sync = sync.map(str::to_owned);
        self.with(move |c| {
            let mut s = c
                .prepare(&q(&format!(
                    "SELECT {columns} FROM (
                        SELECT *, row_number() OVER (PARTITION BY sync, key ORDER BY run_id DESC) AS n
                          FROM loopsync_records WHERE ?1 IS NULL OR sync = ?1) AS x
                      WHERE n = 1 AND outcome IN ('invalid', 'rejected', 'dead_lettered')
                      ORDER BY sync, key",
                    columns = record_columns()
                )))
                .map_err(error("read rejections"))?;
            let rows = s
                .query_map(params![sync], record)
                .map_err(error("read rejections"))?;
            rows.collect::<Result<Vec<_>, _>>()
                .map_err(error("read rejections"))
        })
        .await
    }

    async fn forget_confirmed(
        &self,
        sync: &str,
        records: &[(String, String)],
    ) -> Result<u64, WarehouseError> {
        let sync = sync.to_owned();
        let records = records.to_vec();
        self.with(move |c| {
            let tx = c.transaction().map_err(error("begin"))?;
            let mut forgotten = 0;
            {
                let mut s = tx
                    .prepare_cached(&q("UPDATE loopsync_state SET confirmed_fp = ?4
                          WHERE sync = ?1 AND key = ?2 AND confirmed_fp = ?3"))
                    .map_err(error("forget confirmations"))?;
                for (key, fp) in &records {
                    forgotten += s
                        .execute(params![sync, key, fp, crate::FORGOTTEN_FP])
                        .map_err(error("forget a confirmation"))?
                        as u64;
                }
            }
            tx.commit().map_err(error("commit"))?;
            Ok(forgotten)
        })
        .await
    }

    async fn destination(&self, sync: &str) -> Result<Option<DestinationBinding>, WarehouseError> {
        if self.absent() {
            return Ok(None);
        }
        let sync = sync.to_owned();
        self.with(move |c| read_destination(c, &sync)).await
    }

    async fn bind_destination(
        &self,
        sync: &str,
        destination: &Destination,
    ) -> Result<Option<DestinationBinding>, WarehouseError> {
        let (sync, destination) = (sync.to_owned(), destination.clone());
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(error("begin"))?;
            let earlier = read_destination(&tx, &sync)?;
            if earlier.is_none() {
                tx.execute(
                    &q(&format!(
                        "INSERT INTO loopsync_destinations (sync, team, base_url, bound_at)
                         VALUES (?1, ?2, ?3, {NOW})"
                    )),
                    params![sync, destination.team, destination.base_url],
                )
                .map_err(error("bind a sync to its destination"))?;
            }
            tx.commit().map_err(error("commit"))?;
            Ok(earlier)
        })
        .await
    }

    async fn set_destination(
        &self,
        sync: &str,
        destination: &Destination,
    ) -> Result<(), WarehouseError> {
        let (sync, destination) = (sync.to_owned(), destination.clone());
        self.with(move |c| {
            c.execute(
                &q(&format!(
                    "INSERT INTO loopsync_destinations (sync, team, base_url, bound_at)
                     VALUES (?1, ?2, ?3, {NOW})
                     ON CONFLICT (sync) DO UPDATE
                        SET team = excluded.team, base_url = excluded.base_url,
                            bound_at = excluded.bound_at"
                )),
                params![sync, destination.team, destination.base_url],
            )
            .map_err(error("bind a sync to its destination"))?;
            Ok(())
        })
        .await
    }

    async fn reset_state(&self, sync: &str) -> Result<StateReset, WarehouseError> {
        let sync = sync.to_owned();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(error("begin"))?;
            let state_records = tx
                .execute(
                    // Forgotten, not deleted: see the PostgreSQL side.
                    &q("UPDATE loopsync_state
                        SET confirmed_fp = NULL, confirmed_run = NULL, confirmed_at = NULL,
                            confirmed_email = NULL, confirmed_user_id = NULL, contact_id = NULL,
                            emitted_fp = NULL, emitted_run = NULL, parked_fp = NULL,
                            generation = generation + 1
                      WHERE sync = ?1
                    AND (confirmed_fp IS NOT NULL OR emitted_fp IS NOT NULL OR parked_fp IS NOT NULL)"),
                    params![sync],
                )
                .map_err(error("forget a sync's state"))? as u64;
            // An event sync's watermark goes with its state: the next run reads every row.
            tx.execute(&q("UPDATE loopsync_runs SET cursor_high = NULL WHERE sync = ?1 AND cursor_high IS NOT NULL"),
                params![sync],
            )
            .map_err(error("forget a sync's cursor"))?;
            let destination = read_destination(&tx, &sync)?;
            tx.execute(&q("DELETE FROM loopsync_destinations WHERE sync = ?1"),
                params![sync],
            )
            .map_err(error("forget a sync's destination"))?;
            tx.commit().map_err(error("commit"))?;
            Ok(StateReset {
                state_records,
                destination,
            })
        })
        .await
    }
}
/// The destination `sync` is bound to, if any.
fn read_destination(
    c: &Connection,
    sync: &str,
) -> Result<Option<DestinationBinding>, WarehouseError> {
    c.query_row(
        &q("SELECT team, base_url, bound_at FROM loopsync_destinations WHERE sync = ?1"),
        params![sync],
        |r| {
            Ok(DestinationBinding {
                destination: Destination::new(r.get(0)?, &r.get::<_, String>(1)?),
                bound_at: r.get(2)?,
            })
        },
    )
    .optional()
    .map_err(error("read a sync's destination"))
}
