//! PostgreSQL, through tokio-postgres: a warehouse that holds the model and the state, or a
//! state store beside a source. The state's rules are [`crate::store`]'s; here is what
//! PostgreSQL does its own way: its connections (a shared one, pipelined; one for
//! transactions), each call under a deadline; advisory locks and `FOR UPDATE`; its migrations
//! runner; its hashed diff, which leaves out unchanged rows; a source's rows staged by binary
//! `COPY`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use loopsync_core::spec::SyncSpec;
use loopsync_core::value::EMAIL_TRIM;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{Client, GenericClient, NoTls};

use crate::schema::{Dialect, LATEST, MIGRATIONS, Rendered, newer_than_known};
use crate::store::{Exec, Keeper, Row, Store, Value, Work};
use crate::{
    DiffDialect, DiffRow, EARLIEST_CURSOR, ModelRows, STAGED, Unchanged, WarehouseError,
    cursor_condition, cursor_since, diff_sql, model_sql, probe_sql, quote_ident, staged_spec,
};

/// The diff's `work_mem`: its hash join holds the sync's state keys (about 55 MB a million).
/// Beyond it PostgreSQL spills to temporary files, slower but bounded.
const DIFF_WORK_MEM: &str = "128MB";

/// A contact sync's diff that leaves out what is unchanged ([`Warehouse::diff_changes`]): the
/// model's rows are hashed in the warehouse (the key and the mapped columns as a row's text,
/// seeded by the sync's shape, `$2`) and joined with the state on the key; a row whose hash is
/// the one noted when it was last found unchanged (`model_hash`, cleared whenever Loops'
/// confirmed fingerprint changes) is not read out, nor is its state. Read out, as
/// [`diff_sql`] gives them: new rows, changed rows, removed keys, NULL keys; and, for each
/// row read out with an email, how many model rows carry it: those read out, plus the rows noted
/// with it (`model_email`) less those of them read out (two unchanged rows cannot share an
/// email, or they would not have been noted). Its last row counts what was left out (column
/// `untold`). Only the rows read out are looked up, sorted or counted: no statement is planned
/// over the estimate of all rows, which PostgreSQL cannot know before the hash join.
fn changes_sql(spec: &SyncSpec) -> String {
    let columns = spec.columns();
    let pk = format!("model.{}", quote_ident(&spec.primary_key));
    let mut raw = vec![pk.clone()];
    raw.extend(columns.iter().map(|c| format!("model.{}", quote_ident(c))));
    let ek = match spec.property("email") {
        Some(p) => email_key(&format!("(model.{})::text", quote_ident(&p.column))),
        None => "CAST(NULL AS text)".to_owned(),
    };
    let model_columns: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!(", model.{} AS c{i}", quote_ident(c)))
        .collect();
    let out_columns: Vec<String> = (0..columns.len())
        .map(|i| format!(", (e.c{i})::text AS c{i}"))
        .collect();
    let tail_columns: Vec<String> = (0..columns.len())
        .map(|i| format!(", CAST(NULL AS text) AS c{i}"))
        .collect();
    format!(
        "WITH m AS (SELECT 1 AS present, ({pk})::text AS k,
                           hashtextextended(ROW({raw})::text, $2) AS h, {ek} AS ek{model_columns}
                      FROM ({model}) AS model),
              s AS (SELECT key, model_hash FROM loopsync.state WHERE sync = $1),
              c AS MATERIALIZED (
                  SELECT m.*, s.key AS skey, s.model_hash AS smh
                    FROM m FULL OUTER JOIN s ON s.key = m.k
                   WHERE m.k IS NULL OR s.key IS NULL OR s.model_hash IS DISTINCT FROM m.h),
              e AS MATERIALIZED (
                  SELECT c.*, x.confirmed_fp, x.confirmed_email, x.confirmed_user_id, x.parked_fp,
                         x.generation, x.model_email AS xme
                    FROM c LEFT JOIN LATERAL (
                             -- An index lookup per row read out (`OFFSET 0`: not a join
                             -- PostgreSQL would plan for its estimate of all rows).
                             SELECT * FROM loopsync.state x WHERE x.sync = $1 AND x.key = c.skey OFFSET 0
                         ) x ON true),
              g AS (SELECT xme, count(*) AS n FROM e
                     WHERE smh IS NOT NULL AND xme IS NOT NULL GROUP BY xme),
              d AS (
                  SELECT 0 AS tail, e.present, COALESCE(e.k, e.skey) AS key{out_columns},
                         e.confirmed_fp, e.confirmed_email, e.confirmed_user_id,
                         CASE WHEN e.ek IS NULL OR e.ek = '' THEN CAST(1 AS bigint)
                              ELSE count(*) OVER (PARTITION BY e.ek)
                                   + (SELECT count(*) FROM loopsync.state y
                                       WHERE y.sync = $1 AND y.model_email = e.ek
                                         AND y.model_hash IS NOT NULL)
                                   - COALESCE(g.n, 0)
                         END AS ecount,
                         e.parked_fp, e.generation, e.h AS model_hash, CAST(NULL AS bigint) AS untold
                    FROM e LEFT JOIN g ON g.xme = e.ek
                  UNION ALL
                  SELECT 1, NULL, NULL{tail_columns}, NULL, NULL, NULL, CAST(NULL AS bigint), NULL,
                         CAST(NULL AS bigint), CAST(NULL AS bigint),
                         (SELECT count(*) FROM loopsync.state WHERE sync = $1 AND model_hash IS NOT NULL)
                         - (SELECT count(DISTINCT skey) FROM c WHERE smh IS NOT NULL))
         SELECT present, key{outer}, confirmed_fp, confirmed_email, confirmed_user_id, ecount,
                parked_fp, generation, model_hash, untold
           FROM d ORDER BY tail, key COLLATE \"C\" NULLS LAST",
        raw = raw.join(", "),
        model_columns = model_columns.concat(),
        model = model_sql(&spec.model),
        out_columns = out_columns.concat(),
        tail_columns = tail_columns.concat(),
        outer = (0..columns.len()).map(|i| format!(", c{i}")).collect::<String>(),
    )
}

/// the "C" collation folds ASCII only), as `loopsync_core::value::normalize_email` does.
fn email_key(expression: &str) -> String {
    let set: String = EMAIL_TRIM
        .iter()
        .map(|c| format!("\\{:04X}", *c as u32))
        .collect();
    format!("lower(btrim({expression}, U&'{set}') COLLATE \"C\")")
}

fn query_error(what: &str) -> impl Fn(tokio_postgres::Error) -> WarehouseError + '_ {
    move |e| classify(what, &e)
}

/// A refusal of the data itself (SQLSTATE class 22) is permanent; any other answer of the
/// server is a query error (retried); no answer at all — the connection closed, reset or
/// unreadable — is the warehouse being unavailable (retried on a new connection).
fn classify(what: &str, e: &tokio_postgres::Error) -> WarehouseError {
    let (what, detail) = (what.to_owned(), describe(e));
    match e.as_db_error() {
        Some(db) if db.code().code().starts_with("22") => WarehouseError::Data { what, detail },
        Some(_) => WarehouseError::Query { what, detail },
        None if e.code().is_some() => WarehouseError::Query { what, detail },
        None => WarehouseError::Unavailable { what, detail },
    }
}

/// The state table as a read-only command reads it when there is none: no rows, its columns.
const EMPTY_STATE: &str = "(SELECT CAST(NULL AS text) AS sync, CAST(NULL AS text) AS key, \
     CAST(NULL AS text) AS confirmed_fp, CAST(NULL AS text) AS confirmed_email, \
     CAST(NULL AS text) AS confirmed_user_id, CAST(NULL AS text) AS parked_fp, \
     CAST(NULL AS bigint) AS generation WHERE false) AS empty_state";

/// A model error, said where it is (see [`crate::explain_model_error`]): the model as written
/// is prepared alone on `client` (parsed and planned, not run).
async fn model_error(
    client: &Client,
    spec: &SyncSpec,
    e: &tokio_postgres::Error,
) -> WarehouseError {
    let own = match client.prepare(&spec.model).await {
        Ok(statement) => Ok(statement
            .columns()
            .iter()
            .map(|c| c.name().to_owned())
            .collect()),
        Err(own) => Err(match own.as_db_error() {
            Some(db) => match db.position() {
                Some(tokio_postgres::error::ErrorPosition::Original(at)) => format!(
                    "{} at {}",
                    db.message(),
                    crate::point_at(&spec.model, *at as usize)
                ),
                _ => db.message().to_owned(),
            },
            None => own.to_string(),
        }),
    };
    WarehouseError::Model {
        sync: spec.name.clone(),
        detail: crate::explain_model_error(spec, own, describe(e)),
    }
}

/// A failed connection, with where it went and why: tokio-postgres' own text ("error
/// connecting to server") names neither.
fn describe_connect(config: &tokio_postgres::Config, e: &tokio_postgres::Error) -> String {
    use std::error::Error;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let mut text = format!(
        "PostgreSQL at {host}:{port} (user {}, database {}): {}",
        config.get_user().unwrap_or("?"),
        config.get_dbname().unwrap_or("?"),
        describe(e)
    );
    let mut source = e.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) if *db.code() == SqlState::LOCK_NOT_AVAILABLE => format!(
            "waited {LOCK_TIMEOUT} for a lock another session holds ({}); tried again later",
            db.message()
        ),
        Some(db) => db.message().to_owned(),
        None => e.to_string(),
    }
}

/// How long any statement of loopsync's waits for a lock before it gives up, retryably: a lock
/// wait never becomes a silent hang.
const LOCK_TIMEOUT: &str = "10s";

/// How long opening a connection (TCP, then the server's answer to the startup) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one call may go without an answer before it fails (retryably) and its connections
/// are replaced: well above `lock_timeout`, so a lock wait ends on the server's side first. A
/// diff's rows are not under it (a model may take long before its first row); opening the
/// diff is.
const CALL_DEADLINE: Duration = Duration::from_secs(60);

/// The state store (and warehouse) on PostgreSQL. Every call runs under [`CALL_DEADLINE`]; a
/// connection that closed, broke or timed out is replaced on the next call (a warehouse restart
/// or a network outage costs retries, never a wedged process).
pub type PgWarehouse = Store<Pg>;

/// A connection and the generation it was opened in.
type Slot<C> = Option<(u64, C)>;

/// PostgreSQL's way of keeping state (see [`Keeper`]).
pub struct Pg {
    config: tokio_postgres::Config,
    /// The state's schema, and how statements name its tables.
    dialect: Dialect,
    /// Shared by concurrent calls (tokio-postgres pipelines them).
    shared: tokio::sync::Mutex<Slot<Arc<Client>>>,
    /// Transactions need `&mut`: one connection for them.
    writer: tokio::sync::Mutex<Slot<Client>>,
    /// Bumped when a call found the warehouse unavailable: connections of an earlier
    /// generation are replaced before their next use.
    generation: AtomicU64,
}

/// Opens a session: TCP keepalives and `tcp_user_timeout` so that a peer gone silent is noticed
/// by the kernel too; the whole opening under [`CONNECT_TIMEOUT`] (a proxy or a load balancer
/// may accept the TCP connection and then say nothing).
async fn open(config: &tokio_postgres::Config) -> Result<Client, WarehouseError> {
    let opening = async {
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|e| WarehouseError::Connect(describe_connect(config, &e)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "warehouse connection ended");
            }
        });
        client
            .batch_execute(&format!(
                "SET lock_timeout = '{LOCK_TIMEOUT}'; SET TIME ZONE 'UTC'"
            ))
            .await
            .map_err(|e| WarehouseError::Connect(describe(&e)))?;
        Ok(client)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, opening)
        .await
        .unwrap_or_else(|_| {
            Err(WarehouseError::Connect(format!(
                "the warehouse did not answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            )))
        })
}

impl Store<Pg> {
    /// The warehouse at `url`, its state in schema `loopsync`.
    pub async fn connect(url: &str) -> Result<PgWarehouse, WarehouseError> {
        PgWarehouse::connect_schema(url, crate::DEFAULT_SCHEMA).await
    }

    /// The warehouse at `url`, its state in `schema` (a plain identifier).
    pub async fn connect_schema(url: &str, schema: &str) -> Result<PgWarehouse, WarehouseError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e: tokio_postgres::Error| {
                use std::error::Error;
                WarehouseError::BadUrl(format!(
                    "not a PostgreSQL URL (postgres://user:password@host:port/database): {}{}",
                    describe(&e),
                    e.source().map(|s| format!(": {s}")).unwrap_or_default()
                ))
            })?;
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3)
            .tcp_user_timeout(CALL_DEADLINE);
        let pg = Pg {
            config,
            dialect: Dialect::postgres(schema),
            shared: tokio::sync::Mutex::new(None),
            writer: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
        };
        // Both now: a wrong URL or a warehouse down is said at once.
        pg.client().await?;
        drop(pg.writer().await?);
        Ok(Store::new(pg))
    }
}

impl Pg {
    /// Runs one call under [`CALL_DEADLINE`]; when the warehouse did not answer, its
    /// connections are replaced before the next call.
    async fn within<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, WarehouseError>>,
    ) -> Result<T, WarehouseError> {
        let result = tokio::time::timeout(CALL_DEADLINE, call)
            .await
            .unwrap_or_else(|_| {
                Err(WarehouseError::Unavailable {
                    what: what.to_owned(),
                    detail: format!(
                        "the warehouse did not answer within {}s; its connection is replaced",
                        CALL_DEADLINE.as_secs()
                    ),
                })
            });
        if let Err(error) = &result
            && error.is_unavailable()
        {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
    /// A statement written for schema `loopsync`, for this state's schema.
    fn sql(&self, sql: &str) -> String {
        self.dialect.sql(sql)
    }

    /// The shared connection, opened again if it closed or is of an earlier generation.
    async fn client(&self) -> Result<Arc<Client>, WarehouseError> {
        let mut slot = self.shared.lock().await;
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some((g, client)) = &*slot
            && *g == generation
            && !client.is_closed()
        {
            return Ok(client.clone());
        }
        *slot = None;
        let client = Arc::new(open(&self.config).await?);
        *slot = Some((generation, client.clone()));
        Ok(client)
    }

    /// The connection for transactions, opened again if it closed or is of an earlier
    /// generation; held until the guard drops.
    async fn writer(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Client>, WarehouseError> {
        let mut slot = self.writer.lock().await;
        let generation = self.generation.load(Ordering::SeqCst);
        let fresh = slot
            .as_ref()
            .is_some_and(|(g, c)| *g == generation && !c.is_closed());
        if !fresh {
            *slot = None;
            *slot = Some((generation, open(&self.config).await?));
        }
        Ok(tokio::sync::MutexGuard::map(slot, |s| {
            &mut s.as_mut().expect("just opened").1
        }))
    }
}

impl Pg {
    /// The version of the newest migration applied, `None` when there is no version table.
    async fn applied(&self, client: &Client) -> Result<Option<i64>, WarehouseError> {
        let sql = format!(
            "SELECT COALESCE(max(version), 0) FROM {}",
            self.dialect.table("migrations")
        );
        match client.query_one(&sql, &[]).await {
            Ok(row) => Ok(Some(row.get(0))),
            Err(e)
                if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                    || e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) =>
            {
                Ok(None)
            }
            Err(e) => Err(query_error("read the state's schema version")(e)),
        }
    }

    /// What the state needs of this user (see [`Warehouse::check_privileges`]): to create
    /// the schema when it is missing (CREATE on the database), else to use it, make tables in
    /// it (while migrations are due) and write its tables.
    async fn privileges(&self) -> Result<(), WarehouseError> {
        let client = self.client().await?;
        let schema = &self.dialect.schema;
        let row = client
            .query_one(
                "SELECT to_regnamespace($1) IS NOT NULL,
                        has_database_privilege(current_database(), 'CREATE'),
                        current_user::text, current_database()::text",
                &[schema],
            )
            .await
            .map_err(query_error("read the user's privileges"))?;
        let (exists, create_db, user, database): (bool, bool, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if !exists {
            return if create_db {
                Ok(())
            } else {
                Err(WarehouseError::Privileges(format!(
                    "user {user} may not create the state's schema {schema} in database \
                     {database}: GRANT CREATE ON DATABASE {database} TO {user}, or have it made \
                     (CREATE SCHEMA {schema} AUTHORIZATION {user})"
                )))
            };
        }
        let row = client
            .query_one(
                "SELECT has_schema_privilege($1, 'USAGE'), has_schema_privilege($1, 'CREATE')",
                &[schema],
            )
            .await
            .map_err(query_error("read the user's privileges"))?;
        let (usage, create): (bool, bool) = (row.get(0), row.get(1));
        let mut lacking = Vec::new();
        if !usage {
            lacking.push(format!("USAGE on schema {schema}"));
        }
        let current = self.applied(&client).await.ok().flatten();
        if !create && current != Some(LATEST) {
            lacking.push(format!(
                "CREATE on schema {schema} (its tables are not all made)"
            ));
        }
        if usage {
            let tables = client
                .query(
                    "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $1 AND c.relkind = 'r'
                        AND NOT (has_table_privilege(c.oid, 'SELECT')
                                 AND has_table_privilege(c.oid, 'INSERT')
                                 AND has_table_privilege(c.oid, 'UPDATE')
                                 AND has_table_privilege(c.oid, 'DELETE'))
                      ORDER BY 1",
                    &[schema],
                )
                .await
                .map_err(query_error("read the user's privileges"))?;
            let sequences = client
                .query(
                    "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $1 AND c.relkind = 'S'
                        AND CASE WHEN c.relkind = 'S' AND n.nspname = $1
                                 THEN NOT has_sequence_privilege(c.oid, 'USAGE') ELSE false END
                      ORDER BY 1",
                    &[schema],
                )
                .await
                .map_err(query_error("read the user's privileges"))?;
            if !sequences.is_empty() {
                let names: Vec<String> = sequences
                    .iter()
                    .map(|r| format!("{schema}.{}", r.get::<_, String>(0)))
                    .collect();
                lacking.push(format!("USAGE on sequence {}", names.join(", ")));
            }
            if !tables.is_empty() {
                let names: Vec<String> = tables.iter().map(|r| r.get(0)).collect();
                lacking.push(format!(
                    "SELECT, INSERT, UPDATE, DELETE on {}",
                    names
                        .iter()
                        .map(|t| format!("{schema}.{t}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if lacking.is_empty() {
            Ok(())
        } else {
            Err(WarehouseError::Privileges(format!(
                "user {user} lacks what the state needs: {} (docs/operations.md, Privileges)",
                lacking.join("; ")
            )))
        }
    }

    /// Brings the state's tables to [`LATEST`], running the migrations it lacks (see
    /// [`crate::schema`]).
    async fn migrate_tables(&self) -> Result<(), WarehouseError> {
        // A state whose tables are current needs no DDL, and takes no lock: a command started
        // beside a run that reads the state (its diff) must neither wait behind that read nor
        // make the run's own writes queue behind its ALTER TABLE.
        let current = self.applied(&*self.client().await?).await?;
        newer_than_known(current)?;
        if current == Some(LATEST) {
            return Ok(());
        }
        // Several processes may start at once: CREATE … IF NOT EXISTS races in PostgreSQL, so
        // one at a time under an advisory lock (one per schema); and the version is read again
        // under it: the process that waited for the lock finds the tables current (another
        // migrated them) and runs no DDL. Its ALTER TABLEs would otherwise queue behind the
        // first process's run (its diff reads the state) and make that run's own writes queue
        // behind them.
        let lock = schema_lock(&self.dialect.schema);
        let mut client = self.writer().await?;
        let tx = client
            .transaction()
            .await
            .map_err(query_error("begin migrating the state's tables"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
            .await
            .map_err(query_error(
                "wait for another process migrating the state's tables",
            ))?;
        let migrations = self.dialect.table("migrations");
        let known: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&migrations])
            .await
            .map_err(query_error("read the state's schema version"))?
            .get(0);
        let current = if known {
            tx.query_one(
                &format!("SELECT COALESCE(max(version), 0) FROM {migrations}"),
                &[],
            )
            .await
            .map_err(query_error("read the state's schema version"))?
            .get::<_, i64>(0)
        } else {
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}; {}",
                self.dialect.schema,
                self.dialect.version_table()
            ))
            .await
            .map_err(query_error("create the state's version table"))?;
            0
        };
        newer_than_known(Some(current))?;
        for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
            for step in migration.steps {
                for rendered in self.dialect.render(step) {
                    // PostgreSQL says IF NOT EXISTS of every step itself.
                    let (Rendered::Sql(sql) | Rendered::UnlessColumn { sql, .. }) = rendered;
                    tx.batch_execute(&sql)
                        .await
                        .map_err(|e| WarehouseError::Query {
                            what: format!("migration {} ({})", migration.version, migration.name),
                            detail: describe(&e),
                        })?;
                }
            }
            tx.execute(
                &format!("INSERT INTO {migrations} (version, name) VALUES ($1, $2)"),
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(query_error("record a migration"))?;
        }
        tx.commit()
            .await
            .map_err(query_error("commit the state's migrations"))
    }

    /// The diff, on a connection of its own; with `staged`, a source's rows are first loaded
    /// into [`STAGED`], a temporary table of that connection, which stands for the model.
    async fn diff_rows(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        leave_out_unchanged: bool,
        staged: Option<ModelRows>,
        absent: bool,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        // Its own connection: the stream holds it until drained.
        let client = open(&self.config).await?;
        client
            // No JIT: its compilation costs more than it saves on a diff (0.8 s measured on
            // 100 000 rows, whose plan PostgreSQL overestimates before its statistics are in).
            .batch_execute(&self.sql(&format!(
                "SET TIME ZONE 'UTC'; SET work_mem = '{DIFF_WORK_MEM}'; SET jit = off"
            )))
            .await
            .map_err(query_error("set the time zone"))?;
        if staged.is_none() {
            // The model only reads: a data-modifying statement in it (`WITH x AS (DELETE …)`)
            // is refused by PostgreSQL, not run. (A staged diff writes its temporary table.)
            client
                .batch_execute("SET default_transaction_read_only = on")
                .await
                .map_err(query_error("make the diff's session read-only"))?;
        }
        let staged_spec_;
        let spec = match staged {
            Some(model) => {
                staged_spec_ = staged_spec(spec, &model.columns, |c| {
                    format!("CAST({c} AS timestamptz)")
                });
                stage(&client, model).await?;
                &staged_spec_
            }
            None => spec,
        };
        // An event sync reads few rows (a cursor) or sends each row once: it reads all it reads.
        let hashed = leave_out_unchanged && !spec.is_append() && !absent;
        // Until rows are noted (a first run, after a reset or a change of the mapping), all are
        // read out: the plain diff, with the rows' hashes to note, costs less.
        let leave_out = hashed
            && client
                .query_one(
                    &*self.sql(
                        "SELECT EXISTS (SELECT 1 FROM loopsync.state
                                     WHERE sync = $1 AND model_hash IS NOT NULL)",
                    ),
                    &[&spec.name],
                )
                .await
                .map_err(query_error("look for noted records"))?
                .get::<_, bool>(0);
        let row_hash = |raw: &str| format!("hashtextextended(ROW({raw})::text, $2)");
        let sql = if leave_out {
            changes_sql(spec)
        } else {
            diff_sql(
                spec,
                &DiffDialect {
                    cast: &|e| format!("({e})::text"),
                    state: if absent {
                        EMPTY_STATE
                    } else {
                        "loopsync.state"
                    },
                    param: "$1",
                    collate: "COLLATE \"C\"",
                    email_key: &email_key,
                    inline_state: false,
                },
                cursor_condition(spec, |c| at_or_after(c, "CAST($2 AS text)")),
                hashed.then_some(&row_hash as &dyn Fn(&str) -> String),
            )
        };
        // A model that does not run (42: syntax, names, privileges; 0A: not supported, such as
        // a data-modifying WITH inside it; 2F, 38, 39, P0: a function it calls failed), or
        // that would write (25: refused in the read-only session): the config's to fix, not
        // retried.
        let is_model = |e: &tokio_postgres::Error| {
            e.code().is_some_and(|c| {
                ["42", "0A", "25", "2F", "38", "39", "P0"]
                    .iter()
                    .any(|class| c.code().starts_with(class))
            })
        };
        tracing::debug!(sync = %spec.name, seed = spec.shape_seed(), %sql, "diff");
        let statement = match client.prepare(&self.sql(&sql)).await {
            Ok(statement) => statement,
            Err(e) if is_model(&e) => return Err(model_error(&client, spec, &e).await),
            Err(e) => return Err(classify(&format!("diff of sync {}", spec.name), &e)),
        };
        let since = (!hashed && statement.params().len() > 1).then(|| cursor_since(since));
        let seed = spec.shape_seed();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&spec.name];
        if let Some(since) = &since {
            params.push(since);
        }
        if hashed {
            params.push(&seed);
        }
        let rows = match client
            .query_raw(&statement, params.iter().map(|p| *p as &dyn ToSql))
            .await
        {
            Ok(rows) => rows,
            Err(e) if is_model(&e) => return Err(model_error(&client, spec, &e).await),
            Err(e) => return Err(classify(&format!("diff of sync {}", spec.name), &e)),
        };
        let columns = spec.columns();
        let sync = spec.name.clone();
        let stream = rows.map(move |row| {
            // The client lives as long as the stream.
            let _connection = &client;
            // A stream cut by an outage is retried (the extractor's message comes back); a
            // model that would write is refused for good.
            let row = row.map_err(|e| {
                if e.code().is_some_and(|c| {
                    ["0A", "25", "2F", "38", "39", "P0"]
                        .iter()
                        .any(|class| c.code().starts_with(class))
                }) {
                    WarehouseError::Model {
                        sync: sync.clone(),
                        detail: format!("{} (the model only reads)", describe(&e)),
                    }
                } else {
                    classify(&format!("diff of sync {sync}"), &e)
                }
            })?;
            if leave_out {
                let untold: Option<i64> = row.get(9 + columns.len());
                if let Some(n) = untold {
                    return Ok(DiffRow::untold(n));
                }
            }
            let present: Option<i32> = row.get(0);
            let key: Option<String> = row.get(1);
            let values = present.map(|_| {
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.clone(), row.get::<_, Option<String>>(2 + i)))
                    .collect::<BTreeMap<_, _>>()
            });
            Ok(DiffRow {
                key,
                values,
                confirmed_fp: row.get(2 + columns.len()),
                confirmed_email: row.get(3 + columns.len()),
                confirmed_user_id: row.get(4 + columns.len()),
                email_rows: row.get::<_, Option<i64>>(5 + columns.len()).unwrap_or(1),
                parked_fp: row.get(6 + columns.len()),
                generation: row.get::<_, Option<i64>>(7 + columns.len()).unwrap_or(0),
                model_hash: if hashed {
                    row.get(8 + columns.len())
                } else {
                    None
                },
                unchanged_untold: 0,
            })
        });
        // The row counting what was left out says 0 when nothing was: no row then.
        Ok(stream
            .filter(|row| {
                std::future::ready(!matches!(row, Ok(r) if r.key.is_none() && r.values.is_none() && !r.is_untold()))
            })
            .boxed())
    }

    async fn probe_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError> {
        let client = self.client().await?;
        let probe = client
            .query(
                &*self.sql(&probe_sql(
                    spec,
                    cursor_condition(spec, |c| at_or_after(c, &format!("'{EARLIEST_CURSOR}'"))),
                )),
                &[],
            )
            .await;
        match probe {
            Ok(_) => Ok(()),
            Err(e) => Err(model_error(&client, spec, &e).await),
        }
    }

    async fn note_rows(&self, sync: &str, rows: &[Unchanged]) -> Result<(), WarehouseError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut rows: Vec<&Unchanged> = rows.iter().collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        let fps: Vec<&str> = rows.iter().map(|r| r.fingerprint.as_str()).collect();
        let hashes: Vec<i64> = rows.iter().map(|r| r.model_hash).collect();
        let emails: Vec<Option<&str>> = rows.iter().map(|r| r.email.as_deref()).collect();
        // Only while Loops' confirmed fingerprint is the one the row was found at: a
        // confirmation in between clears the hash (see `record_outcomes`), or this finds none.
        self.client()
            .await?
            .execute(
                &*self.sql(
                    "UPDATE loopsync.state s SET model_hash = t.h, model_email = t.e
                   FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[]) AS t(k, f, h, e)
                  WHERE s.sync = $1 AND s.key = t.k AND s.confirmed_fp = t.f",
                ),
                &[&sync, &keys, &fps, &hashes, &emails],
            )
            .await
            .map_err(query_error("note unchanged records"))?;
        Ok(())
    }
}

/// `COPY`, every column text), and analyzes it for the diff's plan.
async fn stage(client: &Client, model: ModelRows) -> Result<(), WarehouseError> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    let what = "stage the model's rows";
    let ModelRows { columns, mut rows } = model;
    let declared: Vec<String> = columns
        .iter()
        .map(|c| format!("{} text", quote_ident(c)))
        .collect();
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE {STAGED} ({})",
            declared.join(", ")
        ))
        .await
        .map_err(|e| classify(what, &e))?;
    let sink = client
        .copy_in(&format!("COPY {STAGED} FROM STDIN (FORMAT binary)"))
        .await
        .map_err(|e| classify(what, &e))?;
    let types = vec![Type::TEXT; columns.len()];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    while let Some(row) = rows.next().await {
        let row = row?;
        let values: Vec<&(dyn ToSql + Sync)> =
            row.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        writer
            .as_mut()
            .write(&values)
            .await
            .map_err(|e| classify(what, &e))?;
    }
    writer.finish().await.map_err(|e| classify(what, &e))?;
    client
        .batch_execute(&format!("ANALYZE {STAGED}"))
        .await
        .map_err(|e| classify(what, &e))
}

/// The advisory lock of migrating `schema`: the one of earlier versions for `loopsync`.
fn schema_lock(schema: &str) -> i64 {
    if schema == crate::DEFAULT_SCHEMA {
        735560801
    } else {
        loopsync_core::keys::seed(&format!("loopsync schema {schema}"))
    }
}

/// An event sync's cursor `column` at or after the time `since` (an SQL text expression).
/// The session's time zone is UTC (see `diff`), so a `timestamp` without time zone reads as
/// UTC, as the extractor reads its text.
fn at_or_after(column: &str, since: &str) -> String {
    format!("{column} >= CAST({since} AS timestamptz)")
}

#[async_trait]
impl Keeper for Pg {
    /// On the shared connection (tokio-postgres pipelines concurrent calls on it).
    async fn auto<T: Send + 'static>(
        &self,
        what: &str,
        work: Work<T>,
    ) -> Result<T, WarehouseError> {
        self.within(what, async {
            let client = self.client().await?;
            work(&mut PgExec {
                c: &*client,
                dialect: &self.dialect,
            })
            .await
        })
        .await
    }

    /// On the connection for transactions, held until the transaction ends.
    async fn tx<T: Send + 'static>(&self, what: &str, work: Work<T>) -> Result<T, WarehouseError> {
        self.within(what, async {
            let mut client = self.writer().await?;
            let tx = client
                .transaction()
                .await
                .map_err(query_error(&format!("begin: {what}")))?;
            let value = work(&mut PgExec {
                c: &tx,
                dialect: &self.dialect,
            })
            .await?;
            tx.commit()
                .await
                .map_err(query_error(&format!("commit: {what}")))?;
            Ok(value)
        })
        .await
    }

    async fn migrate(&self) -> Result<(), WarehouseError> {
        self.within("prepare", self.migrate_tables()).await
    }

    async fn version(&self) -> Result<Option<i64>, WarehouseError> {
        self.within("read the state's version", async {
            self.applied(&*self.client().await?).await
        })
        .await
    }

    async fn check_privileges(&self) -> Result<(), WarehouseError> {
        self.within("check privileges", self.privileges()).await
    }

    async fn diff(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        leave_out_unchanged: bool,
        staged: Option<ModelRows>,
        absent: bool,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        if staged.is_some() {
            // Not under the call deadline: loading the rows takes as long as the source reads.
            return self
                .diff_rows(spec, since, leave_out_unchanged, staged, absent)
                .await;
        }
        self.within(
            "diff",
            self.diff_rows(spec, since, leave_out_unchanged, None, absent),
        )
        .await
    }

    async fn check_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError> {
        self.within("check model", self.probe_model(spec)).await
    }

    async fn note_unchanged(&self, sync: &str, rows: &[Unchanged]) -> Result<(), WarehouseError> {
        self.within("note unchanged records", self.note_rows(sync, rows))
            .await
    }
}

/// A parameter as the statement's own type asks (an `integer` column takes an `i64` that fits).
impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::FLOAT8 => (*v as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => v.to_string().to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Value::Float(v) => match *ty {
                Type::FLOAT4 => (*v as f32).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Value::Text(v) => v.as_str().to_sql(ty, out),
            Value::Bool(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A row of PostgreSQL as [`Value`]s, by each column's type.
fn row(r: &tokio_postgres::Row) -> Result<Row, tokio_postgres::Error> {
    let mut values = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::FLOAT4 => r
                .try_get::<_, Option<f32>>(i)?
                .map(|v| Value::Float(v.into())),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Value::Float),
            Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(Value::Bool),
            _ => r.try_get::<_, Option<String>>(i)?.map(Value::Text),
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

/// The executor on a connection or a transaction of PostgreSQL.
struct PgExec<'a, C> {
    c: &'a C,
    dialect: &'a Dialect,
}

#[async_trait]
impl<C: GenericClient + Sync> Exec for PgExec<'_, C> {
    fn dialect(&self) -> &Dialect {
        self.dialect
    }

    async fn execute(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<u64, WarehouseError> {
        let sql = self.dialect.statement(sql);
        let statement = self.c.prepare(&sql).await.map_err(query_error(what))?;
        self.c
            .execute_raw(&statement, params.iter())
            .await
            .map_err(query_error(what))
    }

    async fn query(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<Vec<Row>, WarehouseError> {
        let sql = self.dialect.statement(sql);
        let statement = self.c.prepare(&sql).await.map_err(query_error(what))?;
        let params: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = self
            .c
            .query(&statement, &params)
            .await
            .map_err(query_error(what))?;
        rows.iter()
            .map(row)
            .collect::<Result<_, _>>()
            .map_err(query_error(what))
    }

    /// Every statement of the batch, in order, pipelined on the connection: sent without
    /// waiting for each answer (tokio-postgres sends a query when its future is first polled,
    /// and `try_join_all` polls them in order), so a batch costs about one round trip, not one
    /// per item. The first error fails the transaction and the batch.
    async fn batch(
        &mut self,
        what: &str,
        statements: &[String],
        items: Vec<(usize, Vec<Value>)>,
    ) -> Result<u64, WarehouseError> {
        if items.is_empty() {
            return Ok(0);
        }
        let sqls: Vec<String> = statements
            .iter()
            .map(|s| self.dialect.statement(s))
            .collect();
        let prepared = futures::future::try_join_all(sqls.iter().map(|s| self.c.prepare(s)))
            .await
            .map_err(query_error(what))?;
        let changed = futures::future::try_join_all(
            items
                .iter()
                .map(|(i, params)| self.c.execute_raw(&prepared[*i], params.iter())),
        )
        .await
        .map_err(query_error(what))?;
        Ok(changed.iter().sum())
    }

    async fn lock_sync_runs(&mut self, sync: &str) -> Result<(), WarehouseError> {
        self.c
            .execute(
                "SELECT pg_advisory_xact_lock(735560802, hashtext($1))",
                &[&sync],
            )
            .await
            .map_err(query_error("lock the sync's runs"))?;
        Ok(())
    }

    async fn lock_rows(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<(), WarehouseError> {
        self.query(what, sql, params).await?;
        Ok(())
    }
}
