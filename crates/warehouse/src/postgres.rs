//! PostgreSQL, through tokio-postgres.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::{Outcome, OutcomeStatus, RequestCounts};
use loopsync_core::spec::SyncSpec;
use loopsync_core::value::EMAIL_TRIM;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use crate::schema::{Dialect, LATEST, MIGRATIONS, Rendered};
use crate::{
    Adoption, DestinationBinding, DiffDialect, DiffRow, EARLIEST_CURSOR, Emitted, ExtractCounts,
    LEASE, ModelRows, RecordResult, RunSummary, STAGED, StateReset, Unchanged, Warehouse,
    WarehouseError, cursor_condition, cursor_since, diff_sql, is_removal, model_sql, probe_sql,
    quote_ident, record_requests_sql, requests_of, staged_spec, stored, summary_request_sql,
    summary_rows_sql, watermark_sql,
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
              c0 AS MATERIALIZED (
                  SELECT m.*, s.key AS skey, s.model_hash AS smh
                    FROM m FULL OUTER JOIN s ON s.key = m.k
                   WHERE m.k IS NULL OR s.key IS NULL OR s.model_hash IS DISTINCT FROM m.h),
              -- A row in sync whose email a row read out now carries is read out too: every row
              -- of a duplicated email is invalid, as in the plain diff.
              c AS MATERIALIZED (
                  SELECT * FROM c0
                  UNION ALL
                  SELECT m.*, s.key, s.model_hash
                    FROM m JOIN s ON s.key = m.k
                   WHERE s.model_hash = m.h
                     AND m.ek IN (SELECT ek FROM c0 WHERE ek IS NOT NULL AND ek <> '')),
              e AS MATERIALIZED (
                  SELECT c.*, x.confirmed_fp, x.confirmed_email, x.confirmed_user_id, x.parked_fp,
                         x.generation, x.model_email AS xme, x.emitted_run, x.confirmed_run,
                         x.resubscribe, x.emitted_email, x.emitted_user_id
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
                         e.parked_fp, e.generation, e.h AS model_hash, CAST(NULL AS bigint) AS untold,
                         {unsure} AS unsure, e.resubscribe, CAST(1 AS bigint) AS ucount,
                         e.emitted_email, e.emitted_user_id
                    FROM e LEFT JOIN g ON g.xme = e.ek
                  UNION ALL
                  SELECT 1, NULL, NULL{tail_columns}, NULL, NULL, NULL, CAST(NULL AS bigint), NULL,
                         CAST(NULL AS bigint), CAST(NULL AS bigint),
                         (SELECT count(*) FROM loopsync.state WHERE sync = $1 AND model_hash IS NOT NULL)
                         - (SELECT count(DISTINCT skey) FROM c WHERE smh IS NOT NULL),
                         CAST(NULL AS bigint), CAST(NULL AS bigint), CAST(NULL AS bigint),
                         CAST(NULL AS text), CAST(NULL AS text))
         SELECT present, key{outer}, confirmed_fp, confirmed_email, confirmed_user_id, ecount,
                parked_fp, generation, model_hash, untold, unsure, resubscribe, ucount,
                emitted_email, emitted_user_id
           FROM d ORDER BY tail, key COLLATE \"C\" NULLS LAST",
        unsure = crate::UNSURE.replace("s.", "e."),
        raw = raw.join(", "),
        model_columns = model_columns.concat(),
        model = model_sql(&spec.model),
        out_columns = out_columns.concat(),
        tail_columns = tail_columns.concat(),
        outer = (0..columns.len()).map(|i| format!(", c{i}")).collect::<String>(),
    )
}

/// `record_outcomes`: a final outcome's row in `loopsync.records`.
const INSERT_RECORD: &str = "INSERT INTO loopsync.records
                    (run_id, sync, key, fingerprint, operation, outcome, reason, contact_id, requests, at,
                     change, writes, events, deletes, retries, rate_limited)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, to_timestamp($10::bigint / 1000.0),
                         $11, $12, $13, $14, $15, $16)
                 ON CONFLICT (run_id, key) DO UPDATE
                    SET fingerprint = EXCLUDED.fingerprint, operation = EXCLUDED.operation,
                        outcome = EXCLUDED.outcome, reason = EXCLUDED.reason,
                        contact_id = EXCLUDED.contact_id,
                        change = COALESCE(EXCLUDED.change, loopsync.records.change),
                        requests = loopsync.records.requests + EXCLUDED.requests,
                        writes = loopsync.records.writes + EXCLUDED.writes,
                        events = loopsync.records.events + EXCLUDED.events,
                        deletes = loopsync.records.deletes + EXCLUDED.deletes,
                        retries = loopsync.records.retries + EXCLUDED.retries,
                        rate_limited = loopsync.records.rate_limited + EXCLUDED.rate_limited,
                        at = EXCLUDED.at
                  WHERE loopsync.records.outcome <> 'confirmed' AND EXCLUDED.outcome = 'confirmed'";

/// `record_outcomes`: each attempt once; a repeated `attempted` outcome is ignored.
const INSERT_ATTEMPT: &str = "INSERT INTO loopsync.attempts
                    (run_id, sync, key, attempt, requests, writes, events, deletes, retries,
                     rate_limited, reason, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                         to_timestamp($12::bigint / 1000.0))
                 ON CONFLICT (run_id, key, attempt) DO NOTHING";

/// `record_outcomes`: Loops confirmed a record's fingerprint (never moving back to an older run).
const CONFIRM: &str = "INSERT INTO loopsync.state (sync, key, confirmed_fp, confirmed_run, confirmed_at, contact_id,
                                             confirmed_email, confirmed_user_id)
                 VALUES ($1, $2, $3, $4, now(), $5, $6, $7)
                 ON CONFLICT (sync, key) DO UPDATE
                    SET confirmed_fp = EXCLUDED.confirmed_fp, confirmed_run = EXCLUDED.confirmed_run,
                        confirmed_at = EXCLUDED.confirmed_at,
                        contact_id = COALESCE(EXCLUDED.contact_id, loopsync.state.contact_id),
                        confirmed_email = COALESCE(EXCLUDED.confirmed_email, loopsync.state.confirmed_email),
                        confirmed_user_id = COALESCE(EXCLUDED.confirmed_user_id, loopsync.state.confirmed_user_id),
                        parked_fp = NULL, resubscribe = 0,
                        emitted_email = CASE WHEN loopsync.state.emitted_run > EXCLUDED.confirmed_run
                                             THEN loopsync.state.emitted_email END,
                        emitted_user_id = CASE WHEN loopsync.state.emitted_run > EXCLUDED.confirmed_run
                                               THEN loopsync.state.emitted_user_id END,
                        model_hash = CASE WHEN loopsync.state.confirmed_fp = EXCLUDED.confirmed_fp
                                          THEN loopsync.state.model_hash END,
                        generation = loopsync.state.generation
                            + CASE WHEN loopsync.state.confirmed_run IS NOT DISTINCT FROM EXCLUDED.confirmed_run
                                    AND loopsync.state.confirmed_fp IS NOT DISTINCT FROM EXCLUDED.confirmed_fp
                                   THEN 0 ELSE 1 END
                  WHERE loopsync.state.confirmed_run IS NULL
                     OR loopsync.state.confirmed_run <= EXCLUDED.confirmed_run";

/// `record_outcomes`: a confirmed removal leaves a tombstone: nothing confirmed, the generation
/// advanced, so a row that comes back is a new change with a new idempotency key.
const REMOVE: &str = "UPDATE loopsync.state
                    SET confirmed_fp = NULL, confirmed_email = NULL, confirmed_user_id = NULL,
                        contact_id = NULL, parked_fp = NULL, confirmed_run = $3, confirmed_at = now(),
                        model_hash = NULL,
                        resubscribe = CASE WHEN $4 = 'unsubscribe' THEN 1 ELSE 0 END,
                        emitted_email = CASE WHEN emitted_run > $3 THEN emitted_email END,
                        emitted_user_id = CASE WHEN emitted_run > $3 THEN emitted_user_id END,
                        generation = generation + 1
                  WHERE sync = $1 AND key = $2
                    AND (confirmed_fp IS NOT NULL
                         OR (emitted_run IS NOT NULL AND emitted_run > COALESCE(confirmed_run, 0)))
                    AND (confirmed_run IS NULL OR confirmed_run < $3
                         OR (confirmed_run = $3 AND confirmed_fp IS NOT NULL))";

/// Parameters of one statement, owned by the statement's future (see `record_outcomes`).
fn params(values: Vec<&(dyn ToSql + Sync)>) -> Vec<&(dyn ToSql + Sync)> {
    values
}

const TIME: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'"#;

/// The statuses of a run still in progress.
const OPEN: &str = "'requested', 'extracting', 'sending'";

/// The one email rule in SQL: trimmed of `EMAIL_TRIM`, ASCII letters lower-cased (`lower` under
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
     CAST(NULL AS bigint) AS generation, CAST(NULL AS bigint) AS emitted_run, \
     CAST(NULL AS bigint) AS confirmed_run, CAST(NULL AS bigint) AS resubscribe, \
     CAST(NULL AS text) AS emitted_email, CAST(NULL AS text) AS emitted_user_id \
     WHERE false) AS empty_state";

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

/// The warehouse on PostgreSQL. Every call runs under [`CALL_DEADLINE`]; a connection that
/// closed, broke or timed out is replaced on the next call (a warehouse restart or a network
/// outage costs retries, never a wedged process).
pub struct PgWarehouse {
    pg: Pg,
}

/// A connection and the generation it was opened in.
type Slot<C> = Option<(u64, C)>;

struct Pg {
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
    /// [`Warehouse::read_only`] found no state: it reads as empty, and nothing is made.
    absent: std::sync::atomic::AtomicBool,
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

impl PgWarehouse {
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
            absent: std::sync::atomic::AtomicBool::new(false),
        };
        // Both now: a wrong URL or a warehouse down is said at once.
        pg.client().await?;
        drop(pg.writer().await?);
        Ok(PgWarehouse { pg })
    }

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
            self.pg.generation.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

impl Pg {
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

    fn summary_sql(filter: &str) -> String {
        let rows = summary_rows_sql(|condition| {
            format!("count(x.key) FILTER (WHERE x.outcome = 'invalid' AND {condition})")
        });
        let requests = summary_request_sql("loopsync.attempts");
        format!(
            "SELECT r.id, r.sync, r.status, to_char(r.requested_at AT TIME ZONE 'UTC', {TIME}),
                    to_char(r.finished_at AT TIME ZONE 'UTC', {TIME}),
                    (EXTRACT(EPOCH FROM (r.finished_at - r.requested_at)) * 1000)::bigint,
                    r.expected, {rows}, r.removed, r.unchanged,
                    count(x.key) FILTER (WHERE x.outcome = 'confirmed'),
                    count(x.key) FILTER (WHERE x.outcome = 'skipped'),
                    count(x.key) FILTER (WHERE x.outcome = 'invalid'),
                    count(x.key) FILTER (WHERE x.outcome = 'rejected'),
                    count(x.key) FILTER (WHERE x.outcome = 'dead_lettered'),
                    count(x.key),
                    r.error,
                    count(x.key) FILTER (WHERE x.operation = 'rekey' AND x.outcome = 'confirmed'),
                    {requests},
                    r.preflight_requests, r.preflight_retries, r.preflight_rate_limited,
                    r.ignored
             FROM loopsync.runs r LEFT JOIN loopsync.records x ON x.run_id = r.id
             WHERE {filter}
             GROUP BY r.id ORDER BY r.id DESC LIMIT $2"
        )
    }
}

fn summary(row: &Row) -> Result<RunSummary, WarehouseError> {
    let mut summary = RunSummary {
        id: row.get(0),
        sync: row.get(1),
        status: stored("read a run", row.get(2))?,
        requested_at: row.get(3),
        finished_at: row.get(4),
        duration_ms: row.get(5),
        expected: row.get(6),
        added: row.get(7),
        changed: row.get(8),
        invalid_rows: row.get(9),
        removed: row.get(10),
        unchanged: row.get(11),
        confirmed: row.get(12),
        skipped: row.get(13),
        invalid: row.get(14),
        rejected: row.get(15),
        dead_lettered: row.get(16),
        records: row.get(17),
        error: row.get(18),
        rekeyed: row.get(19),
        ignored: row.get(29),
        ..RunSummary::default()
    };
    let loader = std::array::from_fn(|i| row.get::<_, i64>(20 + i));
    let preflight = std::array::from_fn(|i| row.get::<_, i64>(26 + i));
    requests_of(&mut summary, loader, preflight);
    Ok(summary)
}

fn record(r: &Row) -> Result<RecordResult, WarehouseError> {
    Ok(RecordResult {
        run_id: r.get(0),
        sync: r.get(1),
        key: r.get(2),
        operation: r.get(3),
        outcome: stored("read records", r.get(4))?,
        reason: r.get(5),
        contact_id: r.get(6),
        requests: r.get(7),
        at: r.get(8),
    })
}

/// Finishes the runs among `ids` whose every record has an outcome.
const FINISH_RUNS: &str = "
UPDATE loopsync.runs r
   SET status = CASE WHEN r.error IS NOT NULL THEN 'failed'
                     WHEN EXISTS (SELECT 1 FROM loopsync.records x WHERE x.run_id = r.id
                                   AND x.outcome IN ('invalid', 'rejected', 'dead_lettered'))
                     THEN 'degraded' ELSE 'succeeded' END,
       finished_at = now()
 WHERE r.id = ANY($1) AND r.status = 'sending'
   AND (SELECT count(*) FROM loopsync.records x WHERE x.run_id = r.id) >= r.expected";

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

    fn absent(&self) -> bool {
        self.absent.load(Ordering::Relaxed)
    }

    /// What the state needs of this user (see [`Warehouse::check_privileges`]): to create
    /// the schema when it is missing (CREATE on the database), else to use it, make tables in
    /// it (while migrations are due) and write its tables.
    async fn check_privileges(&self) -> Result<(), WarehouseError> {
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
    async fn prepare(&self) -> Result<(), WarehouseError> {
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
    async fn diff(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        leave_out_unchanged: bool,
        staged: Option<ModelRows>,
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
        let absent = self.absent.load(Ordering::Relaxed);
        // An event sync reads few rows (a cursor) or sends each row once: it reads all it reads.
        let hashed = leave_out_unchanged && !spec.is_append() && !absent;
        // Until rows are noted (a first run, after a reset or a change of the mapping), all are
        // read out: the plain diff, with the rows' hashes to note, costs less.
        // A sync that maps a userId counts the model's userIds (a duplicate is invalid): every
        // row is read, as the noted rows keep only their emails.
        let leave_out = hashed
            && spec.property("userId").is_none()
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
                unsure: row.get::<_, Option<i64>>("unsure").unwrap_or(0) != 0,
                resubscribe: row.get::<_, Option<i64>>("resubscribe").unwrap_or(0) != 0,
                user_id_rows: row.get::<_, Option<i64>>("ucount").unwrap_or(1),
                emitted_email: row.get("emitted_email"),
                emitted_user_id: row.get("emitted_user_id"),
            })
        });
        // The row counting what was left out says 0 when nothing was: no row then.
        Ok(stream
            .filter(|row| {
                std::future::ready(!matches!(row, Ok(r) if r.key.is_none() && r.values.is_none() && !r.is_untold()))
            })
            .boxed())
    }

    async fn cursor_watermark(
        &self,
        sync: &str,
        column: &str,
    ) -> Result<Option<i64>, WarehouseError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &*self.sql(&watermark_sql(
                    "loopsync.runs",
                    "loopsync.records",
                    "$1",
                    "$2",
                )),
                &[&sync, &column],
            )
            .await
            .map_err(query_error("read a sync's cursor"))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn check_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError> {
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

    async fn create_run(&self, sync: &str) -> Result<i64, WarehouseError> {
        let mut client = self.writer().await?;
        let tx = client
            .transaction()
            .await
            .map_err(query_error("begin creating a run"))?;
        // One run per sync at a time: whoever creates a run of this sync waits here.
        tx.execute(
            &*self.sql("SELECT pg_advisory_xact_lock(735560802, hashtext($1))"),
            &[&sync],
        )
        .await
        .map_err(query_error("lock the sync's runs"))?;
        tx.execute(&*self.sql(&format!(
                "UPDATE loopsync.runs
                    SET status = 'interrupted', finished_at = now(),
                        error = 'its process stopped (no sign of life since '
                                || to_char(COALESCE(heartbeat_at, requested_at) AT TIME ZONE 'UTC', {TIME})
                                || ')'
                  WHERE sync = $1 AND status IN ({OPEN})
                    AND COALESCE(heartbeat_at, requested_at) < now() - make_interval(secs => $2)"
            )),
            &[&sync, &(LEASE.as_secs_f64())],
        )
        .await
        .map_err(query_error("close abandoned runs"))?;
        let open = tx
            .query_opt(
                &*self.sql(&format!(
                    "SELECT id, status FROM loopsync.runs WHERE sync = $1 AND status IN ({OPEN})
                      ORDER BY id LIMIT 1"
                )),
                &[&sync],
            )
            .await
            .map_err(query_error("look for a run in progress"))?;
        if let Some(open) = open {
            return Err(WarehouseError::RunInProgress {
                sync: sync.to_owned(),
                run_id: open.get(0),
                status: stored("look for a run in progress", open.get(1))?,
            });
        }
        let row = tx
            .query_one(&*self.sql("INSERT INTO loopsync.runs (sync, status, heartbeat_at) VALUES ($1, 'requested', now())
                 RETURNING id"),
                &[&sync],
            )
            .await
            .map_err(query_error("create a run"))?;
        tx.commit().await.map_err(query_error("create a run"))?;
        Ok(row.get(0))
    }

    async fn heartbeat(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.client()
            .await?
            .execute(
                &*self.sql("UPDATE loopsync.runs SET heartbeat_at = now() WHERE id = $1"),
                &[&run_id],
            )
            .await
            .map_err(query_error("note that a run is alive"))?;
        Ok(())
    }

    async fn installation(&self) -> Result<String, WarehouseError> {
        let row = self
            .client()
            .await?
            .query_one(&*self.sql("SELECT id FROM loopsync.installation"), &[])
            .await
            .map_err(query_error("read the installation id"))?;
        Ok(row.get(0))
    }

    async fn claim_run(
        &self,
        run_id: i64,
        redelivered: bool,
    ) -> Result<Option<String>, WarehouseError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &*self.sql(
                    "UPDATE loopsync.runs SET status = 'extracting', started_at = now()
                  WHERE id = $1 AND (status = 'requested' OR ($2 AND status = 'extracting'))
                  RETURNING sync",
                ),
                &[&run_id, &redelivered],
            )
            .await
            .map_err(query_error("claim a run"))?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn note_unchanged(&self, sync: &str, rows: &[Unchanged]) -> Result<(), WarehouseError> {
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

    async fn mark_emitted(
        &self,
        sync: &str,
        run_id: i64,
        emitted: &[Emitted],
    ) -> Result<(), WarehouseError> {
        if emitted.is_empty() {
            return Ok(());
        }
        let mut emitted: Vec<&Emitted> = emitted.iter().collect();
        emitted.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = emitted.iter().map(|e| e.key.as_str()).collect();
        let fps: Vec<&str> = emitted.iter().map(|e| e.fingerprint.as_str()).collect();
        let emails: Vec<Option<&str>> = emitted.iter().map(|e| e.email.as_deref()).collect();
        let user_ids: Vec<Option<&str>> = emitted.iter().map(|e| e.user_id.as_deref()).collect();
        self.client()
            .await?
            .execute(
                &*self.sql(
                    "INSERT INTO loopsync.state (sync, key, emitted_fp, emitted_run, emitted_email, emitted_user_id)
                 SELECT $1, k, f, $2, e, u FROM unnest($3::text[], $4::text[], $5::text[], $6::text[]) AS t(k, f, e, u)
                 ON CONFLICT (sync, key) DO UPDATE
                    SET emitted_fp = EXCLUDED.emitted_fp, emitted_run = EXCLUDED.emitted_run,
                        -- While a version is possibly applied, the identity it wrote is kept
                        -- (a later one that names none does not forget it).
                        emitted_email = COALESCE(EXCLUDED.emitted_email, loopsync.state.emitted_email),
                        emitted_user_id = COALESCE(EXCLUDED.emitted_user_id, loopsync.state.emitted_user_id),
                        model_hash = NULL",
                ),
                &[&sync, &run_id, &keys, &fps, &emails, &user_ids],
            )
            .await
            .map_err(query_error("note emitted records"))?;
        Ok(())
    }

    async fn finish_extract(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        self.client().await?
            .execute(&*self.sql("UPDATE loopsync.runs r SET status = 'sending', extracted_at = now(),
                        expected = (SELECT count(*) FROM (
                                        SELECT key FROM loopsync.state WHERE sync = r.sync AND emitted_run = $1
                                        UNION SELECT key FROM loopsync.records WHERE run_id = $1) AS k),
                        added = $2, changed = $3, removed = $4, unchanged = $5, invalid_rows = $6,
                        error = COALESCE($7, error), ignored = $8, cursor_high = $9,
                        cursor_column = $10
                  WHERE id = $1 AND status = 'extracting'"),
                &[
                    &run_id,
                    &counts.added,
                    &counts.changed,
                    &counts.removed,
                    &counts.unchanged,
                    &counts.invalid_rows,
                    &counts.error,
                    &counts.ignored,
                    &counts.cursor_high,
                    &counts.cursor_column,
                ],
            )
            .await
            .map_err(query_error("finish an extraction"))?;
        self.client()
            .await?
            .execute(&*self.sql(FINISH_RUNS), &[&vec![run_id]])
            .await
            .map_err(query_error("finish a run"))?;
        Ok(())
    }

    async fn adopt(
        &self,
        sync: &str,
        run_id: i64,
        records: &[Adoption],
    ) -> Result<(), WarehouseError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut records: Vec<_> = records.iter().collect();
        records.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
        let fps: Vec<&str> = records.iter().map(|r| r.fingerprint.as_str()).collect();
        let emails: Vec<Option<&str>> = records.iter().map(|r| r.email.as_deref()).collect();
        let user_ids: Vec<Option<&str>> = records.iter().map(|r| r.user_id.as_deref()).collect();
        let hashes: Vec<Option<i64>> = records
            .iter()
            .map(|r| r.unchanged.as_ref().map(|u| u.0))
            .collect();
        let model_emails: Vec<Option<&str>> = records
            .iter()
            .map(|r| r.unchanged.as_ref().and_then(|u| u.1.as_deref()))
            .collect();
        self.client().await?
            .execute(&*self.sql("INSERT INTO loopsync.state (sync, key, confirmed_fp, confirmed_run, confirmed_at,
                                             confirmed_email, confirmed_user_id, model_hash, model_email)
                 SELECT $1, k, f, $2, now(), e, u, h, me
                   FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[])
                        AS t(k, f, e, u, h, me)
                 ON CONFLICT (sync, key) DO UPDATE
                    SET confirmed_fp = EXCLUDED.confirmed_fp, confirmed_run = EXCLUDED.confirmed_run,
                        confirmed_at = EXCLUDED.confirmed_at,
                        confirmed_email = EXCLUDED.confirmed_email,
                        confirmed_user_id = EXCLUDED.confirmed_user_id,
                        parked_fp = NULL,
                        model_hash = EXCLUDED.model_hash,
                        model_email = EXCLUDED.model_email,
                        generation = loopsync.state.generation + 1"),
                &[&sync, &run_id, &keys, &fps, &emails, &user_ids, &hashes, &model_emails],
            )
            .await
            .map_err(query_error("adopt records"))?;
        Ok(())
    }

    async fn park(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        self.client()
            .await?
            .execute(
                &*self.sql(
                    "INSERT INTO loopsync.state (sync, key, parked_fp)
                 SELECT DISTINCT ON (r.key) r.sync, r.key, r.fingerprint
                   FROM loopsync.records r
                  WHERE r.sync = $1 AND r.key = ANY($2)
                  ORDER BY r.key, r.run_id DESC
                 ON CONFLICT (sync, key) DO UPDATE SET parked_fp = EXCLUDED.parked_fp",
                ),
                &[&sync, &keys],
            )
            .await
            .map_err(query_error("park records"))
    }

    async fn finish_adopt(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        self.client().await?
            .execute(&*self.sql("UPDATE loopsync.runs SET status = 'adopted', extracted_at = now(), finished_at = now(),
                        expected = 0, added = $2, changed = $3, removed = $4, unchanged = $5,
                        invalid_rows = $6, ignored = $7, cursor_high = $8, cursor_column = $9
                  WHERE id = $1"),
                &[
                    &run_id,
                    &counts.added,
                    &counts.changed,
                    &counts.removed,
                    &counts.unchanged,
                    &counts.invalid_rows,
                    &counts.ignored,
                    &counts.cursor_high,
                    &counts.cursor_column,
                ],
            )
            .await
            .map_err(query_error("finish an adoption"))?;
        Ok(())
    }

    async fn record_preflight(
        &self,
        run_id: i64,
        counts: &RequestCounts,
    ) -> Result<(), WarehouseError> {
        self.client()
            .await?
            .execute(
                &*self.sql(
                    "UPDATE loopsync.runs
                    SET preflight_requests = $2, preflight_retries = $3, preflight_rate_limited = $4
                  WHERE id = $1",
                ),
                &[
                    &run_id,
                    &i64::from(counts.total()),
                    &i64::from(counts.retries),
                    &i64::from(counts.rate_limited),
                ],
            )
            .await
            .map_err(query_error("record a run's preflight"))?;
        Ok(())
    }

    async fn fail_run(&self, run_id: i64, error: &str) -> Result<(), WarehouseError> {
        self.client()
            .await?
            .execute(
                &*self.sql(
                    "UPDATE loopsync.runs SET status = 'failed', finished_at = now(), error = $2
                  WHERE id = $1",
                ),
                &[&run_id, &error],
            )
            .await
            .map_err(query_error("fail a run"))?;
        Ok(())
    }

    async fn interrupt_run(&self, run_id: i64, why: &str) -> Result<bool, WarehouseError> {
        let closed = self
            .client()
            .await?
            .execute(&*self.sql(&format!(
                    "UPDATE loopsync.runs SET status = 'interrupted', finished_at = now(), error = $2
                      WHERE id = $1 AND status IN ({OPEN})"
                )),
                &[&run_id, &why],
            )
            .await
            .map_err(query_error("close an interrupted run"))?;
        Ok(closed > 0)
    }

    async fn record_outcomes(&self, outcomes: &[Outcome]) -> Result<(), WarehouseError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let mut client = self.writer().await?;
        let tx = client
            .transaction()
            .await
            .map_err(query_error("begin recording outcomes"))?;
        let (insert_sql, attempt_sql, confirm_sql, remove_sql) = (
            self.sql(INSERT_RECORD),
            self.sql(INSERT_ATTEMPT),
            self.sql(CONFIRM),
            self.sql(REMOVE),
        );
        let (insert, attempted, confirm, remove) = tokio::try_join!(
            tx.prepare(&insert_sql),
            tx.prepare(&attempt_sql),
            tx.prepare(&confirm_sql),
            tx.prepare(&remove_sql),
        )
        .map_err(query_error("record outcomes"))?;
        // The runs' rows first: finish_extract waits for this transaction, so one of the two
        // sees every record of a complete run.
        let mut runs: Vec<i64> = outcomes.iter().map(|o| o.run_id).collect();
        runs.sort_unstable();
        runs.dedup();
        tx.execute(
            &*self.sql("SELECT id FROM loopsync.runs WHERE id = ANY($1) ORDER BY id FOR UPDATE"),
            &[&runs],
        )
        .await
        .map_err(query_error("lock runs"))?;
        // Row locks in one order, (sync, key), as mark_emitted takes them: no deadlock.
        let mut ordered: Vec<&Outcome> = outcomes.iter().collect();
        ordered.sort_by(|a, b| (&a.sync, &a.key).cmp(&(&b.sync, &b.key)));
        let counts: Vec<[i32; 6]> = ordered
            .iter()
            .map(|o| {
                let c = o.request_counts();
                [
                    c.total(),
                    c.writes,
                    c.events,
                    c.deletes,
                    c.retries,
                    c.rate_limited,
                ]
                .map(|n| n as i32)
            })
            .collect();
        let attempts: Vec<&str> = ordered
            .iter()
            .map(|o| o.attempt.as_deref().unwrap_or(""))
            .collect();
        let changes: Vec<Option<&str>> = ordered
            .iter()
            .map(|o| o.change.map(|c| c.as_str()))
            .collect();
        let statuses: Vec<&str> = ordered.iter().map(|o| o.status.as_str()).collect();
        // Every statement of the batch, in order, pipelined on the connection: sent without
        // waiting for each answer (tokio-postgres sends a query when its future is first
        // polled, and `try_join_all` polls them in order), so a batch costs about one round
        // trip, not two per outcome. The first error fails the transaction and the batch.
        let mut statements = Vec::with_capacity(2 * ordered.len());
        for (i, o) in ordered.iter().enumerate() {
            let [requests, writes, events, deletes, retries, rate_limited] = &counts[i];
            if !o.status.is_final() {
                statements.push(tx.execute_raw(
                    &attempted,
                    params(vec![
                        &o.run_id,
                        &o.sync,
                        &o.key,
                        &attempts[i],
                        requests,
                        writes,
                        events,
                        deletes,
                        retries,
                        rate_limited,
                        &o.reason,
                        &o.at,
                    ]),
                ));
                continue;
            }
            statements.push(tx.execute_raw(
                &insert,
                params(vec![
                    &o.run_id,
                    &o.sync,
                    &o.key,
                    &o.fingerprint,
                    &o.operation,
                    &statuses[i],
                    &o.reason,
                    &o.contact_id,
                    requests,
                    &o.at,
                    &changes[i],
                    writes,
                    events,
                    deletes,
                    retries,
                    rate_limited,
                ]),
            ));
            if o.status == OutcomeStatus::Confirmed && is_removal(&o.operation) {
                statements.push(tx.execute_raw(
                    &remove,
                    params(vec![&o.sync, &o.key, &o.run_id, &o.operation]),
                ));
            } else if o.status == OutcomeStatus::Confirmed {
                statements.push(tx.execute_raw(
                    &confirm,
                    params(vec![
                        &o.sync,
                        &o.key,
                        &o.fingerprint,
                        &o.run_id,
                        &o.contact_id,
                        &o.email,
                        &o.user_id,
                    ]),
                ));
            }
        }
        futures::future::try_join_all(statements)
            .await
            .map_err(query_error("record outcomes"))?;
        tx.execute(&*self.sql(FINISH_RUNS), &[&runs])
            .await
            .map_err(query_error("finish runs"))?;
        tx.commit().await.map_err(query_error("commit outcomes"))
    }

    async fn finish_if_complete(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.client()
            .await?
            .execute(&*self.sql(FINISH_RUNS), &[&vec![run_id]])
            .await
            .map_err(query_error("finish a run"))?;
        Ok(())
    }

    async fn run(&self, run_id: i64) -> Result<Option<RunSummary>, WarehouseError> {
        let rows = self
            .client()
            .await?
            .query(
                &*self.sql(&Self::summary_sql("r.id = $1")),
                &[&run_id, &1i64],
            )
            .await
            .map_err(query_error("read a run"))?;
        rows.first().map(summary).transpose()
    }

    async fn runs(
        &self,
        sync: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunSummary>, WarehouseError> {
        let rows = self
            .client()
            .await?
            .query(
                &*self.sql(&Self::summary_sql("($1::text IS NULL OR r.sync = $1)")),
                &[&sync, &limit],
            )
            .await
            .map_err(query_error("read runs"))?;
        rows.iter().map(summary).collect()
    }

    async fn records(&self, run_id: i64) -> Result<Vec<RecordResult>, WarehouseError> {
        let rows = self
            .client()
            .await?
            .query(
                &*self.sql(&format!(
                    "SELECT run_id, sync, key, operation, outcome, reason, contact_id,
                            ({requests})::bigint, to_char(at AT TIME ZONE 'UTC', {TIME})
                       FROM loopsync.records x WHERE run_id = $1 ORDER BY key",
                    requests = record_requests_sql("loopsync.attempts")
                )),
                &[&run_id],
            )
            .await
            .map_err(query_error("read records"))?;
        rows.iter().map(record).collect()
    }

    async fn rejections(&self, sync: Option<&str>) -> Result<Vec<RecordResult>, WarehouseError> {
        let rows = self
            .client()
            .await?
            .query(
                &*self.sql(&format!(
                    "SELECT run_id, sync, key, operation, outcome, reason, contact_id,
                            ({requests})::bigint, to_char(at AT TIME ZONE 'UTC', {TIME})
                       FROM (SELECT DISTINCT ON (sync, key) * FROM loopsync.records
                              WHERE $1::text IS NULL OR sync = $1
                              ORDER BY sync, key, run_id DESC) AS x
                      WHERE outcome IN ('invalid', 'rejected', 'dead_lettered')
                      ORDER BY sync, key",
                    requests = record_requests_sql("loopsync.attempts")
                )),
                &[&sync],
            )
            .await
            .map_err(query_error("read rejections"))?;
        rows.iter().map(record).collect()
    }

    async fn forget_confirmed(
        &self,
        sync: &str,
        records: &[(String, String)],
    ) -> Result<u64, WarehouseError> {
        if records.is_empty() {
            return Ok(0);
        }
        let keys: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
        let fps: Vec<&str> = records.iter().map(|(_, f)| f.as_str()).collect();
        let mut client = self.writer().await?;
        let tx = client
            .transaction()
            .await
            .map_err(query_error("begin forgetting confirmations"))?;
        // Row locks in (sync, key) order, as everywhere: no deadlock with a checkpointer.
        tx.execute(
            &*self.sql(
                "SELECT key FROM loopsync.state WHERE sync = $1 AND key = ANY($2)
              ORDER BY key COLLATE \"C\" FOR UPDATE",
            ),
            &[&sync, &keys],
        )
        .await
        .map_err(query_error("lock records to forget"))?;
        let forgotten = tx
            .execute(
                &*self.sql(
                    "UPDATE loopsync.state s SET confirmed_fp = $4, model_hash = NULL
                   FROM unnest($2::text[], $3::text[]) AS t(k, f)
                  WHERE s.sync = $1 AND s.key = t.k AND s.confirmed_fp = t.f",
                ),
                &[&sync, &keys, &fps, &crate::FORGOTTEN_FP],
            )
            .await
            .map_err(query_error("forget confirmations"))?;
        tx.commit()
            .await
            .map_err(query_error("commit forgotten confirmations"))?;
        Ok(forgotten)
    }

    async fn destination(&self, sync: &str) -> Result<Option<DestinationBinding>, WarehouseError> {
        let row = self
            .client()
            .await?
            .query_opt(
                &*self.sql(&format!(
                    "SELECT team, base_url, to_char(bound_at AT TIME ZONE 'UTC', {TIME})
                       FROM loopsync.destinations WHERE sync = $1"
                )),
                &[&sync],
            )
            .await
            .map_err(query_error("read a sync's destination"))?;
        Ok(row.as_ref().map(binding))
    }

    async fn bind_destination(
        &self,
        sync: &str,
        destination: &Destination,
    ) -> Result<Option<DestinationBinding>, WarehouseError> {
        // A binding deleted (by a reset) between the insert and the read: insert again.
        for _ in 0..3 {
            let inserted = self
                .client()
                .await?
                .execute(&*self.sql("INSERT INTO loopsync.destinations (sync, team, base_url) VALUES ($1, $2, $3)
                     ON CONFLICT (sync) DO NOTHING"),
                    &[&sync, &destination.team, &destination.base_url],
                )
                .await
                .map_err(query_error("bind a sync to its destination"))?;
            if inserted == 1 {
                return Ok(None);
            }
            if let Some(earlier) = self.destination(sync).await? {
                return Ok(Some(earlier));
            }
        }
        Err(WarehouseError::Query {
            what: "bind a sync to its destination".into(),
            detail: "the binding kept changing under a concurrent reset".into(),
        })
    }

    async fn set_destination(
        &self,
        sync: &str,
        destination: &Destination,
    ) -> Result<(), WarehouseError> {
        self.client()
            .await?
            .execute(
                &*self.sql(
                    "INSERT INTO loopsync.destinations (sync, team, base_url) VALUES ($1, $2, $3)
                 ON CONFLICT (sync) DO UPDATE
                    SET team = EXCLUDED.team, base_url = EXCLUDED.base_url, bound_at = now()",
                ),
                &[&sync, &destination.team, &destination.base_url],
            )
            .await
            .map_err(query_error("bind a sync to its destination"))?;
        Ok(())
    }

    async fn reset_state(&self, sync: &str) -> Result<StateReset, WarehouseError> {
        let mut client = self.writer().await?;
        let tx = client
            .transaction()
            .await
            .map_err(query_error("begin a reset"))?;
        // Row locks in (sync, key) order, as the checkpointer takes them: no deadlock.
        tx.execute(
            &*self.sql("SELECT key FROM loopsync.state WHERE sync = $1 ORDER BY key FOR UPDATE"),
            &[&sync],
        )
        .await
        .map_err(query_error("lock a sync's state"))?;
        let state_records = tx
            .execute(
                // Forgotten, not deleted: each record keeps its generation, moved on, so what
                // the next run sends has new idempotency keys (a reset to the same Loops is not
                // mistaken for the sends it forgot).
                &*self.sql("UPDATE loopsync.state
                    SET confirmed_fp = NULL, confirmed_run = NULL, confirmed_at = NULL,
                        confirmed_email = NULL, confirmed_user_id = NULL, contact_id = NULL,
                        emitted_fp = NULL, emitted_run = NULL, parked_fp = NULL, model_hash = NULL,
                        generation = generation + 1
                  WHERE sync = $1
                    AND (confirmed_fp IS NOT NULL OR emitted_fp IS NOT NULL OR parked_fp IS NOT NULL)"),
                &[&sync],
            )
            .await
            .map_err(query_error("forget a sync's state"))?;
        // An event sync's watermark goes with its state: the next run reads every row.
        tx.execute(&*self.sql("UPDATE loopsync.runs SET cursor_high = NULL WHERE sync = $1 AND cursor_high IS NOT NULL"),
            &[&sync],
        )
        .await
        .map_err(query_error("forget a sync's cursor"))?;
        let destination = tx
            .query_opt(
                &*self.sql(&format!(
                    "DELETE FROM loopsync.destinations WHERE sync = $1
                     RETURNING team, base_url, to_char(bound_at AT TIME ZONE 'UTC', {TIME})"
                )),
                &[&sync],
            )
            .await
            .map_err(query_error("forget a sync's destination"))?;
        tx.commit().await.map_err(query_error("commit a reset"))?;
        Ok(StateReset {
            state_records,
            destination: destination.as_ref().map(binding),
        })
    }
}
/// Loads a source's rows into [`STAGED`], a temporary table of `client`'s session (binary
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

/// An error when the state was migrated by a newer loopsync than this one.
pub(crate) fn newer_than_known(current: Option<i64>) -> Result<(), WarehouseError> {
    match current {
        Some(v) if v > LATEST => Err(WarehouseError::Unsupported(format!(
            "the state's tables are at version {v}, made by a newer loopsync; this one knows \
             versions up to {LATEST}: upgrade it"
        ))),
        _ => Ok(()),
    }
}

/// An event sync's cursor `column` at or after the time `since` (an SQL text expression).
/// The session's time zone is UTC (see `diff`), so a `timestamp` without time zone reads as
/// UTC, as the extractor reads its text.
fn at_or_after(column: &str, since: &str) -> String {
    format!("{column} >= CAST({since} AS timestamptz)")
}

#[async_trait]
impl Warehouse for PgWarehouse {
    async fn prepare(&self) -> Result<(), WarehouseError> {
        self.within("prepare", self.pg.prepare()).await
    }

    async fn read_only(&self) -> Result<bool, WarehouseError> {
        let version = self
            .within("read the state's version", async {
                self.pg.applied(&*self.pg.client().await?).await
            })
            .await?;
        let exists = crate::readable(version)?;
        self.pg.absent.store(!exists, Ordering::Relaxed);
        Ok(exists)
    }

    async fn check_privileges(&self) -> Result<(), WarehouseError> {
        self.within("check privileges", self.pg.check_privileges())
            .await
    }

    async fn diff_since(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        self.within("diff", self.pg.diff(spec, since, false, None))
            .await
    }

    async fn diff_model(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        leave_out_unchanged: bool,
        model: ModelRows,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        // Not under the call deadline: loading the rows takes as long as the source reads.
        self.pg
            .diff(spec, since, leave_out_unchanged, Some(model))
            .await
    }

    async fn diff_changes(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        self.within("diff", self.pg.diff(spec, since, true, None))
            .await
    }

    async fn note_unchanged(&self, sync: &str, rows: &[Unchanged]) -> Result<(), WarehouseError> {
        self.within("note unchanged records", self.pg.note_unchanged(sync, rows))
            .await
    }

    async fn cursor_watermark(
        &self,
        sync: &str,
        column: &str,
    ) -> Result<Option<i64>, WarehouseError> {
        if self.pg.absent() {
            return Ok(None);
        }
        self.within("read a cursor", self.pg.cursor_watermark(sync, column))
            .await
    }

    async fn check_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError> {
        self.within("check model", self.pg.check_model(spec)).await
    }

    async fn create_run(&self, sync: &str) -> Result<i64, WarehouseError> {
        self.within("create run", self.pg.create_run(sync)).await
    }

    async fn heartbeat(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.within("heartbeat", self.pg.heartbeat(run_id)).await
    }

    async fn installation(&self) -> Result<String, WarehouseError> {
        self.within("installation", self.pg.installation()).await
    }

    async fn claim_run(
        &self,
        run_id: i64,
        redelivered: bool,
    ) -> Result<Option<String>, WarehouseError> {
        self.within("claim run", self.pg.claim_run(run_id, redelivered))
            .await
    }

    async fn mark_emitted_as(
        &self,
        sync: &str,
        run_id: i64,
        emitted: &[Emitted],
    ) -> Result<(), WarehouseError> {
        self.within("mark emitted", self.pg.mark_emitted(sync, run_id, emitted))
            .await
    }

    async fn finish_extract(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        self.within("finish extract", self.pg.finish_extract(run_id, counts))
            .await
    }

    async fn adopt(
        &self,
        sync: &str,
        run_id: i64,
        records: &[Adoption],
    ) -> Result<(), WarehouseError> {
        self.within("adopt", self.pg.adopt(sync, run_id, records))
            .await
    }

    async fn park(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        self.within("park", self.pg.park(sync, keys)).await
    }

    async fn unpark(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        self.within("unpark", async {
            self.pg
                .client()
                .await?
                .execute(
                    &*self.pg.sql(
                        "UPDATE loopsync.state SET parked_fp = NULL
                          WHERE sync = $1 AND key = ANY($2) AND parked_fp IS NOT NULL",
                    ),
                    &[&sync, &keys],
                )
                .await
                .map_err(query_error("unpark records"))
        })
        .await
    }

    async fn owners(
        &self,
        sync: &str,
        identities: &[String],
    ) -> Result<Vec<(String, Option<String>, Option<String>)>, WarehouseError> {
        if self.pg.absent() || identities.is_empty() {
            return Ok(Vec::new());
        }
        self.within("owners of contacts", async {
            let rows = self
                .pg
                .client()
                .await?
                .query(
                    &*self.pg.sql(&format!(
                        "SELECT key, confirmed_email, confirmed_user_id FROM loopsync.state
                          WHERE sync = $1 AND confirmed_fp IS NOT NULL
                            AND ({} = ANY($2) OR confirmed_user_id = ANY($2))
                          ORDER BY key COLLATE \"C\"",
                        email_key("confirmed_email")
                    )),
                    &[&sync, &identities],
                )
                .await
                .map_err(query_error("read the owners of contacts"))?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
        .await
    }

    async fn parked(&self, sync: Option<&str>) -> Result<Vec<(String, String)>, WarehouseError> {
        if self.pg.absent() {
            return Ok(Vec::new());
        }
        self.within("parked records", async {
            let rows = self
                .pg
                .client()
                .await?
                .query(
                    &*self.pg.sql(
                        "SELECT sync, key FROM loopsync.state
                          WHERE parked_fp IS NOT NULL AND ($1::text IS NULL OR sync = $1)
                          ORDER BY sync, key COLLATE \"C\"",
                    ),
                    &[&sync],
                )
                .await
                .map_err(query_error("read parked records"))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
        .await
    }

    async fn finish_adopt(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        self.within("finish adopt", self.pg.finish_adopt(run_id, counts))
            .await
    }

    async fn record_preflight(
        &self,
        run_id: i64,
        counts: &RequestCounts,
    ) -> Result<(), WarehouseError> {
        self.within("record preflight", self.pg.record_preflight(run_id, counts))
            .await
    }

    async fn fail_run(&self, run_id: i64, error: &str) -> Result<(), WarehouseError> {
        self.within("fail run", self.pg.fail_run(run_id, error))
            .await
    }

    async fn interrupt_run(&self, run_id: i64, why: &str) -> Result<bool, WarehouseError> {
        self.within(
            "close an interrupted run",
            self.pg.interrupt_run(run_id, why),
        )
        .await
    }

    async fn record_outcomes(&self, outcomes: &[Outcome]) -> Result<(), WarehouseError> {
        self.within("record outcomes", self.pg.record_outcomes(outcomes))
            .await
    }

    async fn finish_if_complete(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.within("finish if complete", self.pg.finish_if_complete(run_id))
            .await
    }

    async fn run(&self, run_id: i64) -> Result<Option<RunSummary>, WarehouseError> {
        if self.pg.absent() {
            return Ok(None);
        }
        self.within("run", self.pg.run(run_id)).await
    }

    async fn runs(
        &self,
        sync: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunSummary>, WarehouseError> {
        if self.pg.absent() {
            return Ok(Vec::new());
        }
        self.within("runs", self.pg.runs(sync, limit)).await
    }

    async fn records(&self, run_id: i64) -> Result<Vec<RecordResult>, WarehouseError> {
        if self.pg.absent() {
            return Ok(Vec::new());
        }
        self.within("records", self.pg.records(run_id)).await
    }

    async fn rejections(&self, sync: Option<&str>) -> Result<Vec<RecordResult>, WarehouseError> {
        if self.pg.absent() {
            return Ok(Vec::new());
        }
        self.within("rejections", self.pg.rejections(sync)).await
    }

    async fn forget_confirmed(
        &self,
        sync: &str,
        records: &[(String, String)],
    ) -> Result<u64, WarehouseError> {
        self.within("forget confirmed", self.pg.forget_confirmed(sync, records))
            .await
    }

    async fn destination(&self, sync: &str) -> Result<Option<DestinationBinding>, WarehouseError> {
        if self.pg.absent() {
            return Ok(None);
        }
        self.within("destination", self.pg.destination(sync)).await
    }

    async fn bind_destination(
        &self,
        sync: &str,
        destination: &Destination,
    ) -> Result<Option<DestinationBinding>, WarehouseError> {
        self.within(
            "bind destination",
            self.pg.bind_destination(sync, destination),
        )
        .await
    }

    async fn set_destination(
        &self,
        sync: &str,
        destination: &Destination,
    ) -> Result<(), WarehouseError> {
        self.within(
            "set destination",
            self.pg.set_destination(sync, destination),
        )
        .await
    }

    async fn reset_state(&self, sync: &str) -> Result<StateReset, WarehouseError> {
        self.within("reset state", self.pg.reset_state(sync)).await
    }
}

/// A row of (team, base_url, bound_at).
fn binding(row: &Row) -> DestinationBinding {
    DestinationBinding {
        destination: Destination::new(row.get(0), row.get(1)),
        bound_at: row.get(2),
    }
}
