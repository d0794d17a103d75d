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
use loopsync_core::warehouse_tls::TlsMode;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::{Client, GenericClient};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::schema::{Dialect, LATEST, MIGRATIONS, Rendered, newer_than_known};
use crate::store::{Exec, Keeper, Row, Store, Value, Work};
pub(crate) mod diff;
mod source;
mod store;

use diff::at_or_after;
use source::model_error;
use store::PgExec;

use crate::{
    DiffDialect, DiffRow, EARLIEST_CURSOR, ModelRows, STAGED, Unchanged, WarehouseError,
    cursor_check, cursor_condition, cursor_since, diff_sql, model_sql, probe_sql, quote_ident,
    staged_spec,
};

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

/// How long the state's migrations may take: an index built on a large state (migration 17)
/// can take minutes, and must not be cut off at [`CALL_DEADLINE`], rolled back and begun again
/// at every start.
const MIGRATION_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// The state store (and warehouse) on PostgreSQL. Every call runs under [`CALL_DEADLINE`]; a
/// connection that closed, broke or timed out is replaced on the next call (a warehouse restart
/// or a network outage costs retries, never a wedged process).
pub type PgWarehouse = Store<Pg>;

/// Transactions at once in one process, each on a connection of its own: the extractor noting
/// a batch as emitted, the checkpointer recording outcomes, a run being created, a command's
/// own (a reset, a repair). One connection would make each wait for the others (a slow batch
/// of the extractor would hold back every confirmation), where each is one statement or one
/// short transaction that the row locks order (see the store's rules).
const WRITERS: usize = 4;

/// A connection and the generation it was opened in.
type Slot<C> = Option<(u64, C)>;

/// Where the server is and how to reach it: the connection settings, and TLS as the URL's
/// `sslmode` says.
pub(crate) struct Server {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

/// PostgreSQL's way of keeping state (see [`Keeper`]).
pub struct Pg {
    config: Server,
    /// The state's schema, and how statements name its tables.
    dialect: Dialect,
    /// Shared by concurrent calls (tokio-postgres pipelines them).
    shared: tokio::sync::Mutex<Slot<Arc<Client>>>,
    /// Transactions need `&mut`: connections for them, each held by one transaction at a
    /// time ([`WRITERS`]), opened when first needed.
    writers: Vec<tokio::sync::Mutex<Slot<Client>>>,
    /// Bumped when a call found the warehouse unavailable: connections of an earlier
    /// generation are replaced before their next use.
    generation: AtomicU64,
}

/// The server at `url`, reached as its `sslmode` says.
pub(crate) fn server(url: &str) -> Result<Server, WarehouseError> {
    let split = loopsync_core::warehouse_tls::split(url).map_err(WarehouseError::BadUrl)?;
    let mut config: tokio_postgres::Config =
        split.url.parse().map_err(|e: tokio_postgres::Error| {
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
        .tcp_user_timeout(CALL_DEADLINE)
        .ssl_mode(match split.tls.mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
    let tls = MakeRustlsConnect::new(crate::tls::client_config(&split.tls)?);
    Ok(Server { config, tls })
}

/// Opens a session: TCP keepalives and `tcp_user_timeout` so that a peer gone silent is noticed
/// by the kernel too; the whole opening under [`CONNECT_TIMEOUT`] (a proxy or a load balancer
/// may accept the TCP connection and then say nothing).
pub(crate) async fn open(server: &Server) -> Result<Client, WarehouseError> {
    let opening = async {
        let (client, connection) = server
            .config
            .connect(server.tls.clone())
            .await
            .map_err(|e| WarehouseError::Connect(describe_connect(&server.config, &e)))?;
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
        let config = server(url)?;
        let pg = Pg {
            config,
            dialect: Dialect::postgres(schema),
            shared: tokio::sync::Mutex::new(None),
            writers: (0..WRITERS)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
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
        self.within_for(CALL_DEADLINE, what, call).await
    }

    /// [`Pg::within`], under `deadline`.
    async fn within_for<T>(
        &self,
        deadline: Duration,
        what: &str,
        call: impl Future<Output = Result<T, WarehouseError>>,
    ) -> Result<T, WarehouseError> {
        let result = tokio::time::timeout(deadline, call)
            .await
            .unwrap_or_else(|_| {
                Err(WarehouseError::Unavailable {
                    what: what.to_owned(),
                    detail: format!(
                        "the warehouse did not answer within {}s; its connection is replaced",
                        deadline.as_secs()
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
        let free = self.writers.iter().find_map(|w| w.try_lock().ok());
        let mut slot = match free {
            Some(slot) => slot,
            None => {
                futures::future::select_all(self.writers.iter().map(|w| Box::pin(w.lock())))
                    .await
                    .0
            }
        };
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

impl Pg {}

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
        self.within_for(MIGRATION_DEADLINE, "prepare", self.migrate_tables())
            .await
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

    /// The diff that leaves out unchanged rows ([`diff::changes_sql`]) takes a window: a
    /// contact sync with a cursor whose rows' emails it can count from what it noted (a sync
    /// that maps a userId reads every row, see `diff_rows`).
    fn diffs_incrementally(&self, spec: &SyncSpec) -> bool {
        !spec.is_append() && spec.incremental.is_some() && spec.property("userId").is_none()
    }
}
