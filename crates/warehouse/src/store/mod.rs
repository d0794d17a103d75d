//! The state store: runs, leases, each record's state and outcome, written once for every
//! backend that keeps state (PostgreSQL, SQLite).
//!
//! Each rule of the state (confirm, remove, park, the generation, the lease, the run's
//! transitions, outcomes) is one function of [`rules`], written over a small executor seam,
//! [`Exec`]: statements in one dialect (PostgreSQL's `$1` placeholders and `loopsync.` names),
//! translated by [`Dialect::statement`] for SQLite, with the few phrases that differ (the time
//! now, a time as text, interval arithmetic) asked of the [`Dialect`]. A backend ([`Keeper`])
//! gives only what it really does differently: its connections and transactions, its
//! migrations runner, its diff (hashed, staged by `COPY` or by inserts), and its locks
//! (advisory locks and `FOR UPDATE`, against SQLite's one writer).
//!
//! Why not a query builder: the rules are a dozen statements with upserts, window functions and
//! correlated subqueries that both backends already speak alike; a builder would spell them in
//! Rust for little gain, and add a dependency. The dialect's part is below: a rewrite of names
//! and placeholders, and five phrases.

pub(crate) mod erasure;
pub(crate) mod inspect;
pub(crate) mod rules;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::{Outcome, RequestCounts};
use loopsync_core::spec::SyncSpec;

use crate::schema::{Backend, Dialect};
use crate::source::{Source, model_columns};
use crate::{
    Acceptance, Adoption, ConfirmedContact, DestinationBinding, DiffBasis, DiffRow, Emitted,
    Erasure, ExtractCounts, KeptRecord, ModelRows, Person, RateSlot, RecordResult, RunSummary,
    StateReset, StateStore, Unchanged, Warehouse, WarehouseError,
};

/// A statement's parameter, or a value read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(v.into())
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(v.into())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// Parameters: `params![a, b, …]`, each turned into a [`Value`].
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        vec![$($crate::store::Value::from($value)),*]
    };
}
pub(crate) use params;

/// A row read: its columns in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value, WarehouseError> {
        self.0.get(i).ok_or_else(|| WarehouseError::Query {
            what: "read a row".into(),
            detail: format!("no column {i}"),
        })
    }

    fn mismatch(&self, i: usize, expected: &str) -> WarehouseError {
        WarehouseError::Query {
            what: "read a row".into(),
            detail: format!("column {i} is {:?}, not {expected}", self.0.get(i)),
        }
    }

    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, WarehouseError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            Value::Bool(b) => Ok(Some(i64::from(*b))),
            _ => Err(self.mismatch(i, "an integer")),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, WarehouseError> {
        self.opt_int(i)?
            .ok_or_else(|| self.mismatch(i, "an integer"))
    }

    /// A count: NULL (a sum over no rows) is 0.
    pub fn count(&self, i: usize) -> Result<i64, WarehouseError> {
        Ok(self.opt_int(i)?.unwrap_or(0))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, WarehouseError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            _ => Err(self.mismatch(i, "a text")),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, WarehouseError> {
        self.opt_text(i)?.ok_or_else(|| self.mismatch(i, "a text"))
    }
}

/// The executor seam: statements run on one connection, in a transaction or each on its own
/// (see [`Keeper::tx`], [`Keeper::auto`]). SQL is written as for PostgreSQL, schema
/// `loopsync`; the executor translates it ([`Dialect::statement`]).
#[async_trait]
pub(crate) trait Exec: Send {
    fn dialect(&self) -> &Dialect;

    /// Runs a statement; the rows it changed.
    async fn execute(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<u64, WarehouseError>;

    /// Runs a query; its rows.
    async fn query(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<Vec<Row>, WarehouseError>;

    /// Runs `items` in their order, each `(statement, parameters)` where `statement` indexes
    /// `statements` (each prepared once); the rows they changed, summed. PostgreSQL pipelines
    /// them (about one round trip for the batch); SQLite runs them from its cache.
    async fn batch(
        &mut self,
        what: &str,
        statements: &[String],
        items: Vec<(usize, Vec<Value>)>,
    ) -> Result<u64, WarehouseError>;

    /// One creator of a sync's runs at a time, until the transaction ends: PostgreSQL takes an
    /// advisory lock of the sync; SQLite's write transaction (`BEGIN IMMEDIATE`) already holds
    /// the whole database.
    async fn lock_sync_runs(&mut self, sync: &str) -> Result<(), WarehouseError>;

    /// Takes row locks in the order a `SELECT … FOR UPDATE` reads them (PostgreSQL: so that
    /// transactions that write the same rows take them in one order, and none deadlocks);
    /// SQLite has one writer, and does nothing.
    async fn lock_rows(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<(), WarehouseError>;
}

/// Work done on an [`Exec`].
pub(crate) type Work<T> =
    Box<dyn for<'a> FnOnce(&'a mut dyn Exec) -> BoxFuture<'a, Result<T, WarehouseError>> + Send>;

/// A [`Work`] of a closure (it names the higher-ranked type the compiler needs).
pub(crate) fn work<T, F>(f: F) -> Work<T>
where
    F: for<'a> FnOnce(&'a mut dyn Exec) -> BoxFuture<'a, Result<T, WarehouseError>>
        + Send
        + 'static,
{
    Box::new(f)
}

/// What a backend that keeps state does its own way; everything else is [`Store`]'s.
#[async_trait]
pub(crate) trait Keeper: Send + Sync + 'static {
    /// Runs `work` with each statement committed on its own (reads, and single writes).
    async fn auto<T: Send + 'static>(&self, what: &str, work: Work<T>)
    -> Result<T, WarehouseError>;

    /// Runs `work` in one write transaction: committed when it returns `Ok`, else rolled back.
    async fn tx<T: Send + 'static>(&self, what: &str, work: Work<T>) -> Result<T, WarehouseError>;

    /// Brings the state's tables to the latest version (the migrations runner).
    async fn migrate(&self) -> Result<(), WarehouseError>;

    /// The version of the state's tables, `None` when there are none.
    async fn version(&self) -> Result<Option<i64>, WarehouseError>;

    /// See [`StateStore::check_privileges`].
    async fn check_privileges(&self) -> Result<(), WarehouseError>;

    /// The diff of the model (or, `staged`, of a source's rows) against the state (`absent`:
    /// there is none, it reads as empty); `leave_out_unchanged` as [`Warehouse::diff_changes`],
    /// where the backend can.
    async fn diff(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        leave_out_unchanged: bool,
        staged: Option<ModelRows>,
        absent: bool,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError>;

    /// See [`Warehouse::check_model`].
    async fn check_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError>;

    /// See [`StateStore::note_unchanged`]: only a backend whose diff leaves rows out keeps them.
    async fn note_unchanged(&self, _sync: &str, _rows: &[Unchanged]) -> Result<(), WarehouseError> {
        Ok(())
    }

    /// See [`Warehouse::diffs_incrementally`], of the model in the keeper's own database.
    fn diffs_incrementally(&self, _spec: &SyncSpec) -> bool {
        false
    }
}

/// A state store: a [`Keeper`] and the rules of the state ([`rules`]); and, as a
/// [`Warehouse`], where its model is read: its own database, or a [`Source`] beside it, whose
/// rows are staged in the store's diff.
pub struct Store<K> {
    pub(crate) keeper: K,
    source: Option<Arc<dyn Source>>,
    /// [`StateStore::read_only`] found no state: it reads as empty, and nothing is made.
    absent: AtomicBool,
}

impl<K> Store<K> {
    pub(crate) fn new(keeper: K) -> Store<K> {
        Store {
            keeper,
            source: None,
            absent: AtomicBool::new(false),
        }
    }

    /// The model read from `source` (`None`: from the store's own database).
    pub fn with_source(mut self, source: Option<Arc<dyn Source>>) -> Store<K> {
        self.source = source;
        self
    }

    fn absent(&self) -> bool {
        self.absent.load(Ordering::Relaxed)
    }
}

impl Dialect {
    /// `sql`, written for PostgreSQL and schema `loopsync`, in this dialect: SQLite's tables
    /// are `loopsync_state`, …, and its placeholders `?1`, ….
    pub(crate) fn statement(&self, sql: &str) -> String {
        match self.backend {
            Backend::Postgres => self.sql(sql),
            Backend::Sqlite => {
                let flat = Dialect::sqlite(crate::DEFAULT_SCHEMA).flatten(sql);
                let mut out = String::with_capacity(flat.len());
                let mut chars = flat.chars().peekable();
                while let Some(c) = chars.next() {
                    if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
                        out.push('?');
                    } else {
                        out.push(c);
                    }
                }
                self.sql(&out)
            }
        }
    }

    /// `loopsync.` names as SQLite's `loopsync_` (whole names only).
    fn flatten(&self, sql: &str) -> String {
        let mut out = String::with_capacity(sql.len());
        let mut rest = sql;
        while let Some(at) = rest.find("loopsync.") {
            let whole = !rest[..at]
                .chars()
                .next_back()
                .or_else(|| out.chars().next_back())
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            out.push_str(&rest[..at]);
            out.push_str(if whole { "loopsync_" } else { "loopsync." });
            rest = &rest[at + "loopsync.".len()..];
        }
        out.push_str(rest);
        out
    }

    /// The one email rule (trimmed, lower-cased) applied to `expression`, in this dialect.
    pub(crate) fn email_key(&self, expression: &str) -> String {
        match self.backend {
            Backend::Postgres => crate::postgres::diff::email_key(expression),
            Backend::Sqlite => crate::sqlite::diff::email_key(expression),
        }
    }

    /// Whether text `needle` occurs in text `haystack` (expressions), in this dialect.
    pub(crate) fn contains(&self, haystack: &str, needle: &str) -> String {
        match self.backend {
            Backend::Postgres => format!("strpos({haystack}, {needle}) > 0"),
            Backend::Sqlite => format!("instr({haystack}, {needle}) > 0"),
        }
    }

    /// The time now, as the state stores times.
    pub(crate) fn now(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "now()",
            Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        }
    }

    /// The time of `millis` (an expression of Unix milliseconds), as the state stores times.
    pub(crate) fn time_of_millis(&self, millis: &str) -> String {
        match self.backend {
            Backend::Postgres => format!("to_timestamp(CAST({millis} AS bigint) / 1000.0)"),
            Backend::Sqlite => {
                format!("strftime('%Y-%m-%dT%H:%M:%fZ', {millis} / 1000.0, 'unixepoch')")
            }
        }
    }

    /// A stored time as RFC 3339 text in UTC, milliseconds: `2024-05-01T12:00:00.000Z`.
    pub(crate) fn time_text(&self, time: &str) -> String {
        match self.backend {
            Backend::Postgres => {
                format!(r#"to_char(({time}) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"#)
            }
            Backend::Sqlite => time.to_owned(),
        }
    }

    /// The milliseconds from stored time `from` to stored time `to`.
    pub(crate) fn millis_between(&self, from: &str, to: &str) -> String {
        match self.backend {
            Backend::Postgres => {
                format!("CAST(EXTRACT(EPOCH FROM ({to} - {from})) * 1000 AS bigint)")
            }
            Backend::Sqlite => {
                format!("CAST((julianday({to}) - julianday({from})) * 86400000 AS INTEGER)")
            }
        }
    }

    /// The time `seconds` (an expression, possibly fractional) before now.
    pub(crate) fn ago(&self, seconds: &str) -> String {
        match self.backend {
            Backend::Postgres => {
                format!("now() - make_interval(secs => CAST({seconds} AS double precision))")
            }
            Backend::Sqlite => format!(
                "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || CAST({seconds} AS TEXT) || ' seconds')"
            ),
        }
    }
}

#[async_trait]
impl<K: Keeper> Warehouse for Store<K> {
    async fn diff_since(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        read(self, spec, since, false).await
    }

    async fn diff_changes(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        read(self, spec, since, true).await
    }

    fn diffs_incrementally(&self, spec: &SyncSpec) -> bool {
        self.source.is_none() && !self.absent() && self.keeper.diffs_incrementally(spec)
    }

    async fn check_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError> {
        match &self.source {
            Some(source) => source.check_model(spec, &model_columns(spec)).await,
            None => self.keeper.check_model(spec).await,
        }
    }
}

/// The model's diff against the state: in the store's database, or of a source's rows.
async fn read<K: Keeper>(
    store: &Store<K>,
    spec: &SyncSpec,
    since: Option<i64>,
    leave_out_unchanged: bool,
) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
    {
        let model = match &store.source {
            Some(source) => {
                let columns = model_columns(spec);
                let rows = source.read(spec, &columns, since).await?;
                Some(ModelRows { columns, rows })
            }
            None => None,
        };
        store
            .keeper
            .diff(spec, since, leave_out_unchanged, model, store.absent())
            .await
    }
}

#[async_trait]
impl<K: Keeper> StateStore for Store<K> {
    async fn prepare(&self) -> Result<(), WarehouseError> {
        self.keeper.migrate().await
    }

    async fn read_only(&self) -> Result<bool, WarehouseError> {
        let exists = crate::readable(self.keeper.version().await?)?;
        self.absent.store(!exists, Ordering::Relaxed);
        Ok(exists)
    }

    async fn check_privileges(&self) -> Result<(), WarehouseError> {
        self.keeper.check_privileges().await
    }

    async fn note_unchanged(&self, sync: &str, rows: &[Unchanged]) -> Result<(), WarehouseError> {
        self.keeper.note_unchanged(sync, rows).await
    }

    async fn diff_model(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        leave_out_unchanged: bool,
        model: ModelRows,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        self.keeper
            .diff(spec, since, leave_out_unchanged, Some(model), self.absent())
            .await
    }

    async fn diff_basis(&self, sync: &str, column: &str) -> Result<DiffBasis, WarehouseError> {
        if self.absent() {
            return Ok(DiffBasis::default());
        }
        let (sync, column) = (sync.to_owned(), column.to_owned());
        self.keeper
            .auto(
                "read what decides a sync's diff",
                work(move |x| Box::pin(rules::diff_basis(x, sync, column))),
            )
            .await
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
        self.keeper
            .auto(
                "read a sync's cursor",
                work(move |x| Box::pin(rules::cursor_watermark(x, sync, column))),
            )
            .await
    }

    async fn create_run(&self, sync: &str) -> Result<i64, WarehouseError> {
        let sync = sync.to_owned();
        self.keeper
            .tx(
                "create run",
                work(move |x| Box::pin(rules::create_run(x, sync))),
            )
            .await
    }

    async fn heartbeat(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.keeper
            .auto(
                "heartbeat",
                work(move |x| Box::pin(rules::heartbeat(x, run_id))),
            )
            .await
    }

    async fn extracting(&self, run_id: i64) -> Result<bool, WarehouseError> {
        self.keeper
            .auto(
                "extracting",
                work(move |x| Box::pin(rules::extracting(x, run_id))),
            )
            .await
    }

    async fn installation(&self) -> Result<String, WarehouseError> {
        self.keeper
            .auto(
                "installation",
                work(move |x| Box::pin(rules::installation(x))),
            )
            .await
    }

    async fn claim_run(
        &self,
        run_id: i64,
        redelivered: bool,
    ) -> Result<Option<String>, WarehouseError> {
        self.keeper
            .auto(
                "claim run",
                work(move |x| Box::pin(rules::claim_run(x, run_id, redelivered))),
            )
            .await
    }

    async fn mark_emitted_as(
        &self,
        sync: &str,
        run_id: i64,
        emitted: &[Emitted],
    ) -> Result<(), WarehouseError> {
        if emitted.is_empty() {
            return Ok(());
        }
        let (sync, emitted) = (sync.to_owned(), emitted.to_vec());
        self.keeper
            .tx(
                "mark emitted",
                work(move |x| Box::pin(rules::mark_emitted(x, sync, run_id, emitted))),
            )
            .await
    }

    async fn finish_extract(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        let counts = counts.clone();
        self.keeper
            .auto(
                "finish extract",
                work(move |x| Box::pin(rules::finish_extract(x, run_id, counts))),
            )
            .await
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
        let (sync, records) = (sync.to_owned(), records.to_vec());
        self.keeper
            .tx(
                "adopt",
                work(move |x| Box::pin(rules::adopt(x, sync, run_id, records))),
            )
            .await
    }

    async fn park(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        let (sync, keys) = (sync.to_owned(), keys.to_vec());
        self.keeper
            .tx("park", work(move |x| Box::pin(rules::park(x, sync, keys))))
            .await
    }

    async fn unpark(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        let (sync, keys) = (sync.to_owned(), keys.to_vec());
        self.keeper
            .tx(
                "unpark",
                work(move |x| Box::pin(rules::unpark(x, sync, keys))),
            )
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
        let (sync, identities) = (sync.to_owned(), identities.to_vec());
        self.keeper
            .auto(
                "owners of contacts",
                work(move |x| Box::pin(rules::owners(x, sync, identities))),
            )
            .await
    }

    async fn parked(&self, sync: Option<&str>) -> Result<Vec<(String, String)>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        let sync = sync.map(str::to_owned);
        self.keeper
            .auto(
                "parked records",
                work(move |x| Box::pin(rules::parked(x, sync))),
            )
            .await
    }

    async fn finish_adopt(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        let counts = counts.clone();
        self.keeper
            .auto(
                "finish adopt",
                work(move |x| Box::pin(rules::finish_adopt(x, run_id, counts))),
            )
            .await
    }

    async fn record_preflight(
        &self,
        run_id: i64,
        counts: &RequestCounts,
    ) -> Result<(), WarehouseError> {
        let counts = *counts;
        self.keeper
            .auto(
                "record preflight",
                work(move |x| Box::pin(rules::record_preflight(x, run_id, counts))),
            )
            .await
    }

    async fn fail_run(&self, run_id: i64, error: &str) -> Result<(), WarehouseError> {
        let error = error.to_owned();
        self.keeper
            .auto(
                "fail run",
                work(move |x| Box::pin(rules::fail_run(x, run_id, error))),
            )
            .await
    }

    async fn interrupt_run(&self, run_id: i64, why: &str) -> Result<bool, WarehouseError> {
        let why = why.to_owned();
        self.keeper
            .auto(
                "close an interrupted run",
                work(move |x| Box::pin(rules::interrupt_run(x, run_id, why))),
            )
            .await
    }

    async fn record_outcomes(&self, outcomes: &[Outcome]) -> Result<(), WarehouseError> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let outcomes = outcomes.to_vec();
        self.keeper
            .tx(
                "record outcomes",
                work(move |x| Box::pin(rules::record_outcomes(x, outcomes))),
            )
            .await
    }

    async fn finish_if_complete(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.keeper
            .auto(
                "finish if complete",
                work(move |x| Box::pin(rules::finish_runs(x, vec![run_id]))),
            )
            .await
    }

    async fn run(&self, run_id: i64) -> Result<Option<RunSummary>, WarehouseError> {
        if self.absent() {
            return Ok(None);
        }
        self.keeper
            .auto("run", work(move |x| Box::pin(rules::run(x, run_id))))
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
        self.keeper
            .auto("runs", work(move |x| Box::pin(rules::runs(x, sync, limit))))
            .await
    }

    async fn records(&self, run_id: i64) -> Result<Vec<RecordResult>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        self.keeper
            .auto(
                "records",
                work(move |x| Box::pin(rules::records(x, run_id))),
            )
            .await
    }

    async fn rejections(&self, sync: Option<&str>) -> Result<Vec<RecordResult>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        let sync = sync.map(str::to_owned);
        self.keeper
            .auto(
                "rejections",
                work(move |x| Box::pin(rules::rejections(x, sync))),
            )
            .await
    }

    async fn forget_confirmed(
        &self,
        sync: &str,
        records: &[(String, String)],
    ) -> Result<u64, WarehouseError> {
        if records.is_empty() {
            return Ok(0);
        }
        let (sync, records) = (sync.to_owned(), records.to_vec());
        self.keeper
            .tx(
                "forget confirmed",
                work(move |x| Box::pin(rules::forget_confirmed(x, sync, records))),
            )
            .await
    }

    async fn destination(&self, sync: &str) -> Result<Option<DestinationBinding>, WarehouseError> {
        if self.absent() {
            return Ok(None);
        }
        let sync = sync.to_owned();
        self.keeper
            .auto(
                "destination",
                work(move |x| Box::pin(rules::destination(x, sync))),
            )
            .await
    }

    async fn bind_destination(
        &self,
        sync: &str,
        destination: &Destination,
        key_fingerprint: &str,
    ) -> Result<Option<DestinationBinding>, WarehouseError> {
        let (sync, destination, fp) = (
            sync.to_owned(),
            destination.clone(),
            key_fingerprint.to_owned(),
        );
        self.keeper
            .tx(
                "bind destination",
                work(move |x| Box::pin(rules::bind_destination(x, sync, destination, fp))),
            )
            .await
    }

    async fn set_destination(
        &self,
        sync: &str,
        destination: &Destination,
        key_fingerprint: &str,
    ) -> Result<(), WarehouseError> {
        let (sync, destination, fp) = (
            sync.to_owned(),
            destination.clone(),
            key_fingerprint.to_owned(),
        );
        self.keeper
            .tx(
                "set destination",
                work(move |x| Box::pin(rules::set_destination(x, sync, destination, fp))),
            )
            .await
    }

    async fn set_key_fingerprint(
        &self,
        sync: &str,
        destination: &Destination,
        key_fingerprint: &str,
    ) -> Result<bool, WarehouseError> {
        let (sync, destination, fp) = (
            sync.to_owned(),
            destination.clone(),
            key_fingerprint.to_owned(),
        );
        self.keeper
            .auto(
                "record the API key's fingerprint",
                work(move |x| Box::pin(rules::set_key_fingerprint(x, sync, destination, fp))),
            )
            .await
    }

    async fn confirmed_contacts(
        &self,
        sync: &str,
        limit: u32,
    ) -> Result<Vec<ConfirmedContact>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        let sync = sync.to_owned();
        self.keeper
            .auto(
                "confirmed contacts",
                work(move |x| Box::pin(rules::confirmed_contacts(x, sync, limit.into()))),
            )
            .await
    }

    async fn accept_invalid(
        &self,
        sync: &str,
        records: &[(String, String)],
        note: Option<&str>,
        in_loops_too: bool,
    ) -> Result<Acceptance, WarehouseError> {
        if records.is_empty() {
            return Ok(Acceptance::default());
        }
        let (sync, records, note) = (sync.to_owned(), records.to_vec(), note.map(str::to_owned));
        self.keeper
            .tx(
                "accept invalid records",
                work(move |x| {
                    Box::pin(rules::accept_invalid(x, sync, records, note, in_loops_too))
                }),
            )
            .await
    }

    async fn unaccept_invalid(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let (sync, keys) = (sync.to_owned(), keys.to_vec());
        self.keeper
            .tx(
                "unaccept invalid records",
                work(move |x| Box::pin(rules::unaccept_invalid(x, sync, keys))),
            )
            .await
    }

    async fn find_person(
        &self,
        sync: &str,
        person: &Person,
    ) -> Result<Vec<KeptRecord>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        let (sync, person) = (sync.to_owned(), person.clone());
        self.keeper
            .auto(
                "find a person",
                work(move |x| Box::pin(erasure::find_person(x, sync, person))),
            )
            .await
    }

    async fn erase_person(
        &self,
        sync: &str,
        keys: &[String],
        emails: &[String],
    ) -> Result<Erasure, WarehouseError> {
        let (sync, keys, emails) = (sync.to_owned(), keys.to_vec(), emails.to_vec());
        self.keeper
            .tx(
                "erase a person",
                work(move |x| Box::pin(erasure::erase_person(x, sync, keys, emails))),
            )
            .await
    }

    async fn prune_records(&self, older_than: std::time::Duration) -> Result<u64, WarehouseError> {
        let seconds = older_than.as_secs_f64();
        self.keeper
            .auto(
                "prune old results",
                work(move |x| Box::pin(erasure::prune_records(x, seconds))),
            )
            .await
    }

    async fn reset_state(&self, sync: &str) -> Result<StateReset, WarehouseError> {
        let sync = sync.to_owned();
        self.keeper
            .tx(
                "reset state",
                work(move |x| Box::pin(rules::reset_state(x, sync))),
            )
            .await
    }

    async fn read_rate_slot(&self, budget: &str) -> Result<Option<RateSlot>, WarehouseError> {
        let budget = budget.to_owned();
        self.keeper
            .auto(
                "read a rate budget",
                work(move |x| Box::pin(rules::read_rate_slot(x, budget))),
            )
            .await
    }

    async fn swap_rate_slot(
        &self,
        budget: &str,
        next: i64,
        written_at: i64,
        expected: Option<i64>,
    ) -> Result<Option<i64>, WarehouseError> {
        let budget = budget.to_owned();
        self.keeper
            .auto(
                "take a rate budget's slots",
                work(move |x| {
                    Box::pin(rules::swap_rate_slot(x, budget, next, written_at, expected))
                }),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_written_once_and_said_in_each_dialect() {
        let sql = "UPDATE loopsync.state SET n = loopsync.state.n + $12 WHERE sync = $1";
        assert_eq!(Dialect::postgres("loopsync").statement(sql), sql);
        assert_eq!(
            Dialect::postgres("ls2").statement(sql),
            "UPDATE ls2.state SET n = ls2.state.n + $12 WHERE sync = $1"
        );
        assert_eq!(
            Dialect::sqlite("loopsync").statement(sql),
            "UPDATE loopsync_state SET n = loopsync_state.n + ?12 WHERE sync = ?1"
        );
        assert_eq!(
            Dialect::sqlite("ls2").statement(sql),
            "UPDATE ls2_state SET n = ls2_state.n + ?12 WHERE sync = ?1"
        );
    }
}
