//! The warehouse: where the model lives, and where loopsync keeps each sync's state, its runs
//! and the result of every record (schema `loopsync`, so users can join them with their tables).
//!
//! Two seams. A [`StateStore`] keeps runs, leases, each record's state and outcome: PostgreSQL
//! (tokio-postgres) and SQLite (rusqlite, bundled: the demo's embedded warehouse), each a
//! [`Store`] over its own [`store::Keeper`], the state's rules written once
//! (`store/rules.rs`). A [`Source`] gives a model's rows: MySQL and MariaDB, DuckDB. A
//! deployment ([`Warehouse`], opened by [`open`]) is a store and where its model is read: the
//! store's own database, or a source beside it. The diff runs in the store: the model (or the
//! source's rows, staged there) joined with the sync's state on the primary key, ordered by
//! key, streamed with bounded memory.
//!
//! A new source is a folder with a `source.rs` (see `mysql/`) and a line in [`open_source`]
//! and in `loopsync_core::warehouse_url::SCHEMES`; a new store is a folder with its `Keeper`,
//! its executor, its migrations runner and its diff (see `sqlite/`), a `schema::Backend` and
//! the phrases of its dialect.

#[cfg(feature = "duckdb")]
mod duckdb;
mod inspect;
mod mysql;
mod postgres;
mod schema;
pub mod source;
mod sqlite;
mod store;
mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::{OldContact, Outcome, OutcomeStatus, RequestCounts, UnknownName};
use loopsync_core::spec::SyncSpec;
use loopsync_core::value::millis_to_rfc3339;
use loopsync_core::{Classified, ErrorClass};
use serde::Serialize;

#[cfg(feature = "duckdb")]
pub use duckdb::DuckDbSource;
pub use inspect::{Attempt, Inspect, ReasonCount, RecordHistory, RecordOutcome, RecordState};
pub use mysql::MySqlSource;
pub use postgres::{Pg, PgWarehouse};
pub use source::Source;
pub use sqlite::{Sqlite, SqliteWarehouse};
pub use store::Store;

/// What can go wrong in the warehouse.
#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    #[error("cannot connect to the warehouse: {0}")]
    Connect(String),
    /// A URL that names no warehouse loopsync can open (it does not parse, or names a file
    /// that does not exist): fix the config.
    #[error("{0}")]
    BadUrl(String),
    /// The model does not run, or lacks a column the mapping names: fix the config.
    /// `detail` says which (see [`WarehouseError::model`], [`explain_model_error`]).
    #[error("sync {sync}: {detail}")]
    Model { sync: String, detail: String },
    #[error("{what}: {detail}")]
    Query { what: String, detail: String },
    /// The warehouse did not answer, or the connection broke: retried, on a new connection.
    #[error("{what}: {detail}")]
    Unavailable { what: String, detail: String },
    /// The warehouse refused the data itself (SQLSTATE class 22, e.g. a NUL byte in a text):
    /// trying it again cannot help.
    #[error("{what}: {detail}")]
    Data { what: String, detail: String },
    #[error("{0}")]
    Unsupported(String),
    /// The warehouse user lacks a privilege the state needs: grant it.
    #[error("{0}")]
    Privileges(String),
    /// One run of a sync at a time: another is in progress.
    #[error(
        "run {run_id} of sync {sync} is in progress ({status}): one run of a sync at a time. \
         Wait for it (loopsync runs --sync {sync}); a run whose process died is closed as \
         interrupted once it has given no sign of life for {lease} s",
        lease = LEASE.as_secs()
    )]
    RunInProgress {
        sync: String,
        run_id: i64,
        status: RunStatus,
        /// The holder's last sign of life, as stored: a holder that is alive changes it every
        /// heartbeat.
        alive_at: String,
    },
}

/// How long a run in progress may go without a sign of life (see [`Warehouse::heartbeat`]), and
/// how often a process that waits for a run says it is alive: see [`loopsync_core::tuning`].
pub use loopsync_core::tuning::{HEARTBEAT, LEASE};

impl Classified for WarehouseError {
    fn class(&self) -> ErrorClass {
        match self {
            WarehouseError::Model { .. }
            | WarehouseError::Unsupported(_)
            | WarehouseError::Privileges(_)
            | WarehouseError::BadUrl(_)
            | WarehouseError::RunInProgress { .. }
            | WarehouseError::Data { .. } => ErrorClass::Permanent,
            WarehouseError::Connect(_)
            | WarehouseError::Query { .. }
            | WarehouseError::Unavailable { .. } => ErrorClass::RETRY,
        }
    }
}

impl WarehouseError {
    /// The model of `sync` does not run, for the warehouse's reason `detail`.
    pub(crate) fn model(sync: impl Into<String>, detail: impl std::fmt::Display) -> WarehouseError {
        WarehouseError::Model {
            sync: sync.into(),
            detail: format!("the model does not run: {detail}"),
        }
    }

    /// The warehouse could not be reached or did not answer (as opposed to refusing a statement).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            WarehouseError::Connect(_) | WarehouseError::Unavailable { .. }
        )
    }
}

/// One key of the diff: the model's row (if the key is in the model) beside the sync's state
/// (if the key was seen before).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiffRow {
    /// `None`: a model row whose primary key is NULL.
    pub key: Option<String>,
    /// The mapped columns as text; `None` when the key is no longer in the model.
    pub values: Option<BTreeMap<String, Option<String>>>,
    /// What Loops last confirmed for this key, if anything.
    pub confirmed_fp: Option<String>,
    /// The identifiers of the confirmed contact.
    pub confirmed_email: Option<String>,
    pub confirmed_user_id: Option<String>,
    /// How many model rows carry this row's email (trimmed, lower-cased); 1 when unique.
    pub email_rows: i64,
    /// The fingerprint at which the record was parked (`loopsync dlq park`): runs leave it alone
    /// while its data stays so.
    pub parked_fp: Option<String>,
    /// How many changes of the record Loops has confirmed (removals included); 0 when new.
    pub generation: i64,
    /// A version of the record was published after Loops' last confirmation and never
    /// confirmed: its answer may have been lost after Loops applied it (a 5xx or a dropped
    /// connection after the effect, retries spent, a process killed mid-request). Loops then may
    /// hold that version, not the confirmed one: a row back at the confirmed fingerprint is sent
    /// again, not found unchanged.
    pub unsure: bool,
    /// The record's tombstone says the sync unsubscribed its contact (mirror with
    /// `on_remove = "unsubscribe"`): a row that comes back re-subscribes it. A contact that
    /// unsubscribed on its own is never re-subscribed.
    pub resubscribe: bool,
    /// How many model rows carry this row's userId, when the sync maps one; 1 when unique.
    pub user_id_rows: i64,
    /// The identity of the version last published, when [`DiffRow::unsure`]: the contact that
    /// version may have created or renamed in Loops.
    pub emitted_email: Option<String>,
    pub emitted_user_id: Option<String>,
    /// When [`DiffRow::unsure`]: every identity the versions published since Loops' last
    /// confirmation write (or remove), whose answers may all have been lost — each a contact
    /// that may be in Loops, which a later version must take out under mirror.
    pub possibly_applied: Vec<OldContact>,
    /// A 64-bit hash of the model row's text (key and mapped columns, seeded by the sync's
    /// shape, see [`SyncSpec::shape_seed`]), where the warehouse computes one
    /// ([`Warehouse::diff_changes`]): what [`Warehouse::note_unchanged`] keeps.
    pub model_hash: Option<i64>,
    /// Not a key: the last row of [`Warehouse::diff_changes`], counting the model rows it left
    /// out because they are as they were when noted unchanged. 0 on every other row.
    pub unchanged_untold: i64,
    /// On the row that counts left-out rows, of a contact sync with a cursor: the highest
    /// cursor among the model rows the diff went through, left out or not, and not after the
    /// warehouse's now (Unix milliseconds): what the run's watermark becomes.
    pub cursor_high: Option<i64>,
}

impl DiffRow {
    /// The row that counts the rows a diff left out ([`DiffRow::unchanged_untold`]).
    pub fn untold(n: i64) -> DiffRow {
        DiffRow {
            unchanged_untold: n,
            ..DiffRow::default()
        }
    }

    /// Whether this row counts left-out rows (or carries the diff's highest cursor) instead
    /// of carrying a key.
    pub fn is_untold(&self) -> bool {
        self.unchanged_untold > 0 || self.cursor_high.is_some()
    }
}

/// A version of a record about to be published ([`Warehouse::mark_emitted_as`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Emitted {
    pub key: String,
    pub fingerprint: String,
    /// The identity the version writes (a removal: the one it removes).
    pub email: Option<String>,
    pub user_id: Option<String>,
    /// The version unsubscribes the contact (mirror, `on_remove = "unsubscribe"`): from now
    /// on, possibly applied, the row that comes back re-subscribes it ([`DiffRow::resubscribe`]).
    pub unsubscribes: bool,
    /// Every identity possibly applied once this version is published: those of the versions
    /// before it still unconfirmed, and its own ([`DiffRow::possibly_applied`]).
    pub possibly_applied: Vec<OldContact>,
}

/// [`DiffRow::possibly_applied`] as the state keeps it: a JSON array, `NULL` when empty.
pub(crate) fn identities_text(identities: &[OldContact]) -> Option<String> {
    (!identities.is_empty())
        .then(|| serde_json::to_string(identities).expect("identities serialize"))
}

/// [`identities_text`] read back (what cannot be read is none).
pub(crate) fn identities_of(text: Option<String>) -> Vec<OldContact> {
    text.and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// A record adopted as confirmed by Loops ([`Warehouse::adopt`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adoption {
    pub key: String,
    pub fingerprint: String,
    /// The identity the contact has in Loops.
    pub email: Option<String>,
    pub user_id: Option<String>,
    /// The row as noted unchanged at this fingerprint, when the diff gave its hash (see
    /// [`Unchanged`]): `(model_hash, email)`.
    pub unchanged: Option<(i64, Option<String>)>,
}

/// A model row found unchanged (its fingerprint is the one Loops confirmed), noted so that
/// later diffs can leave it out while its text stays the same ([`Warehouse::note_unchanged`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unchanged {
    pub key: String,
    /// The fingerprint Loops confirmed, and the row's.
    pub fingerprint: String,
    /// [`DiffRow::model_hash`].
    pub model_hash: i64,
    /// The row's email as the email rule keeps it (trimmed, lower-cased), if it has one: a
    /// later row that takes it is found a duplicate without this row being read.
    pub email: Option<String>,
}

/// What the extractor found, recorded when it has published every change of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExtractCounts {
    pub added: i64,
    pub changed: i64,
    pub removed: i64,
    pub unchanged: i64,
    /// Model rows the extractor found invalid (a NULL or duplicate key, an email on several
    /// rows): a duplicate key is one invalid record of several rows.
    pub invalid_rows: i64,
    /// Changes published plus invalid records found, as the extractor counted them. The run's
    /// `expected` is computed by the warehouse from what it holds (keys emitted in the run and
    /// keys with an outcome in it), so a re-extraction after a crash counts right.
    pub expected: i64,
    /// Why the run must end `failed` once its records have their outcomes (the removal guard
    /// held the removals back).
    pub error: Option<String>,
    /// Event syncs: rows already sent whose values changed since (not sent again).
    pub ignored: i64,
    /// Event syncs with a cursor: the highest cursor value read so far (Unix milliseconds),
    /// this run's rows and the watermark it started from. Once the run has finished with no
    /// dead letter, it is the sync's watermark (see [`Warehouse::cursor_watermark`]).
    pub cursor_high: Option<i64>,
    /// The cursor column `cursor_high` is of.
    pub cursor_column: Option<String>,
    /// A contact sync with a cursor: which diff the run ran (left out of the JSON otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<DiffKind>,
    /// With `diff`: the sync's shape seed (`SyncSpec::shape_seed`) the run diffed for.
    #[serde(skip)]
    pub shape_seed: Option<i64>,
}

/// Which diff a contact sync's run ran (see `loopsync_core::spec::Incremental`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    /// Every row of the model against the whole state: removals found.
    Full,
    /// The rows at or after the cursor's watermark minus the lookback, and every row the state
    /// has not noted unchanged: no removal found.
    Incremental,
}

impl DiffKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            DiffKind::Full => "full",
            DiffKind::Incremental => "incremental",
        }
    }

    /// The stored name back; `None` for anything else (a run before diff kinds were kept).
    pub fn parse(text: &str) -> Option<DiffKind> {
        match text {
            "full" => Some(DiffKind::Full),
            "incremental" => Some(DiffKind::Incremental),
            _ => None,
        }
    }
}

/// What decides a contact sync's next diff (see [`StateStore::diff_basis`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffBasis {
    /// The sync's watermark on the cursor column (as [`StateStore::cursor_watermark`]).
    pub watermark: Option<i64>,
    /// Whether the sync's latest finished run is the one that gives the watermark: no run
    /// failed, was interrupted, or left a dead letter since.
    pub latest_run_settled: bool,
    /// Milliseconds from the request of the latest full diff that settled every record (and
    /// noted its watermark) to now, both by the state store's clock; `None`: there is none.
    pub full_diff_age_ms: Option<i64>,
    /// The shape seed that full diff ran for (`SyncSpec::shape_seed`).
    pub full_diff_seed: Option<i64>,
}

impl ExtractCounts {
    /// `n` changes of `kind` that the transformer refused: the rows are invalid, no longer
    /// added or changed. A refused removal stays a removed key (it is no row of the model). The
    /// one rule by which a run's report ([`StateStore::run`]), `plan` and `adopt` count the
    /// model's rows, so that a plan's counts are the next run's.
    pub fn refuse(&mut self, kind: loopsync_core::envelope::ChangeKind, n: i64) {
        use loopsync_core::envelope::ChangeKind;
        match kind {
            ChangeKind::Added => self.added -= n,
            ChangeKind::Changed => self.changed -= n,
            ChangeKind::Removed => return,
        }
        self.invalid_rows += n;
    }
}

/// A run, with its counts. Rows of the model: `added + changed + unchanged + invalid_rows` is
/// the number of rows the model returned (for `dlq replay`, of the rows of the keys replayed);
/// `removed` counts keys that left it. Records: `confirmed + skipped + invalid + rejected +
/// dead_lettered = records`. Requests: `requests` is the sum of `requests_by_kind`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunSummary {
    pub id: i64,
    pub sync: String,
    /// Where the run is; see [`RunStatus`].
    pub status: RunStatus,
    pub requested_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
    /// Records the run waits for (the extractor's changes and invalid records).
    pub expected: Option<i64>,
    /// Model rows new to the sync, valid (each became an operation).
    pub added: i64,
    /// Model rows whose fingerprint differs from the one Loops confirmed, valid.
    pub changed: i64,
    /// Keys Loops had confirmed that are no longer in the model (mirror removes their
    /// contacts; upsert leaves them).
    pub removed: i64,
    /// Model rows at the fingerprint Loops confirmed (or parked at theirs): nothing sent.
    pub unchanged: i64,
    /// Model rows found invalid, by the extractor (NULL or duplicate key, an email on several
    /// rows: every row counts) or by the transformer (a malformed email, a value too long, …).
    pub invalid_rows: i64,
    /// Records of the run: each has exactly one outcome below.
    pub records: i64,
    /// Loops confirmed the record's operation.
    pub confirmed: i64,
    /// Nothing sent: Loops had already confirmed this version or a newer one.
    pub skipped: i64,
    /// Invalid records: one per NULL key, per duplicated key, per row of a shared email, per
    /// change the transformer refused (a removal among them too).
    pub invalid: i64,
    /// Of `invalid`, the records accepted as invalid (`loopsync rejections accept`) for the
    /// reason they had: listed, but they do not make the run degraded.
    pub accepted: i64,
    /// Loops refused the operation (4xx).
    pub rejected: i64,
    /// Retries spent, or the workers handling it kept dying.
    pub dead_lettered: i64,
    /// Every HTTP request loopsync sent toward Loops for this run, whatever the answer (or
    /// none): the sum of `requests_by_kind`.
    pub requests: i64,
    pub requests_by_kind: RequestsByKind,
    /// Of `requests`, those that repeated an earlier attempt of the same operation (a
    /// redelivery of a record's operation, a preflight call tried again).
    pub retries: i64,
    /// Of `requests`, those Loops answered 429.
    pub rate_limited: i64,
    pub error: Option<String>,
    /// Records identified by email whose email changed: the new address was written as its own
    /// contact (mirror removed the old one; upsert left it in Loops).
    pub rekeyed: i64,
    /// Event syncs: model rows whose event was sent before and whose values changed since.
    /// An event is sent once: they are counted here, not sent again.
    pub ignored: i64,
    /// The extractor's last sign of life: a slow diff is progress (see
    /// [`StateStore::extracting`]).
    #[serde(skip)]
    pub extract_alive_at: Option<String>,
    /// The last sign of life of the process that waits for the run (its heartbeat, else its
    /// request): a holder that is alive changes it every [`HEARTBEAT`].
    #[serde(skip)]
    pub alive_at: Option<String>,
    /// A contact sync's run: which diff it ran (`full`, `incremental`); none for an event
    /// sync, a replay, or a run before the kinds were kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<DiffKind>,
}

/// A run's requests by where they went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RequestsByKind {
    /// `PUT /v1/contacts/update`: upserts, unsubscribes, the write of a re-key.
    pub writes: i64,
    /// `POST /v1/events/send`.
    pub events: i64,
    /// `POST /v1/contacts/delete`.
    pub deletes: i64,
    /// Made by `loopsync run` before it sent this run's records: `GET /v1/contacts/properties`
    /// and the properties it created (`POST /v1/contacts/properties`).
    pub preflight: i64,
}

impl RequestsByKind {
    pub fn total(&self) -> i64 {
        self.writes + self.events + self.deletes + self.preflight
    }
}

impl RunSummary {
    /// Every record has an outcome (or the run failed).
    pub fn is_finished(&self) -> bool {
        self.status.is_finished()
    }
}

/// Where a run is, as `loopsync.runs.status` stores it and every JSON output shows it (the same
/// lowercase names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Asked for; the extractor has not started it.
    #[default]
    Requested,
    /// The extractor is reading the model and publishing changes.
    Extracting,
    /// Every change is published; the run waits for its records' outcomes.
    Sending,
    /// Every record confirmed or skipped.
    Succeeded,
    /// Every record has an outcome, some invalid (and not accepted), rejected or dead-lettered.
    Degraded,
    /// The run could not do its work (the model failed, the removal guard held removals back).
    Failed,
    /// An adoption run: the state was taken over from Loops, nothing sent.
    Adopted,
    /// Its process died or was stopped; closed by the next run of its sync.
    Interrupted,
}

impl RunStatus {
    /// The stored name: `requested`, `extracting`, `sending`, `succeeded`, `degraded`,
    /// `failed`, `adopted`, `interrupted`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Requested => "requested",
            RunStatus::Extracting => "extracting",
            RunStatus::Sending => "sending",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Degraded => "degraded",
            RunStatus::Failed => "failed",
            RunStatus::Adopted => "adopted",
            RunStatus::Interrupted => "interrupted",
        }
    }

    /// Every record has an outcome (or the run failed): nothing more will change.
    pub fn is_finished(&self) -> bool {
        !matches!(
            self,
            RunStatus::Requested | RunStatus::Extracting | RunStatus::Sending
        )
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Reads the stored names of [`RunStatus::as_str`].
impl std::str::FromStr for RunStatus {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "requested" => RunStatus::Requested,
            "extracting" => RunStatus::Extracting,
            "sending" => RunStatus::Sending,
            "succeeded" => RunStatus::Succeeded,
            "degraded" => RunStatus::Degraded,
            "failed" => RunStatus::Failed,
            "adopted" => RunStatus::Adopted,
            "interrupted" => RunStatus::Interrupted,
            other => return Err(UnknownName::new("run status", other)),
        })
    }
}

/// Compares with the stored name, so a check reads like the row it checks.
impl PartialEq<&str> for RunStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// Reads a name loopsync stored (a run status, a record outcome); an unknown one is a query
/// error naming what was read.
pub(crate) fn stored<T: std::str::FromStr<Err = UnknownName>>(
    what: &str,
    name: &str,
) -> Result<T, WarehouseError> {
    name.parse()
        .map_err(|e: UnknownName| WarehouseError::Query {
            what: what.to_owned(),
            detail: e.to_string(),
        })
}

/// One record's result in one run (`loopsync.records`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordResult {
    pub run_id: i64,
    pub sync: String,
    pub key: String,
    pub operation: String,
    pub outcome: OutcomeStatus,
    pub reason: Option<String>,
    pub contact_id: Option<String>,
    pub requests: i64,
    pub at: String,
    /// An invalid record accepted as invalid for its reason (`loopsync rejections accept`): in
    /// a run's records, accepted when the run recorded it; in [`StateStore::rejections`],
    /// accepted now (its latest reason is the one accepted).
    pub accepted: bool,
}

/// A deployment: a [`StateStore`] and where its model is read (the store's own database, or a
/// [`Source`] beside it). What a run reads is the model joined with the sync's state.
#[async_trait]
pub trait Warehouse: StateStore + Inspect {
    /// The model joined with the sync's state, ordered by key (NULL keys last).
    async fn diff(
        &self,
        spec: &SyncSpec,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        self.diff_since(spec, None).await
    }

    /// [`Warehouse::diff`]; for an event sync with a cursor and `since` (Unix milliseconds),
    /// only the model rows whose cursor is at or after `since`, or NULL. An event sync's diff
    /// never yields keys that left the model: it removes nothing.
    async fn diff_since(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError>;

    /// What a run reads: [`Warehouse::diff_since`], except that a warehouse that can may leave
    /// out the model rows whose text is as it was when [`StateStore::note_unchanged`] noted them
    /// (their fingerprint is still the one Loops confirmed), and count them in a last row
    /// ([`DiffRow::untold`]). Every key that is new, changed, removed, or whose email another row
    /// of the model now carries, is yielded as by `diff_since`, with its `model_hash`.
    async fn diff_changes(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        self.diff_since(spec, since).await
    }

    /// Checks that the model runs and has the primary key and every mapped column, without
    /// reading a row.
    async fn check_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError>;

    /// Whether [`Warehouse::diff_changes`] diffs a contact sync with a cursor incrementally
    /// when given `since`: only a warehouse that leaves out unchanged rows can (it knows which
    /// rows it has noted). Any other ignores `since` for a contact sync and diffs in full.
    fn diffs_incrementally(&self, _spec: &SyncSpec) -> bool {
        false
    }
}

/// The state store's seam: runs, leases, each record's state and outcome, and the diff of a
/// model's rows against the state ([`StateStore::diff_model`]). PostgreSQL and SQLite keep
/// state; both are one [`Store`] over their own [`store::Keeper`].
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Creates the `loopsync` tables if missing. Safe to call from many processes at once.
    async fn prepare(&self) -> Result<(), WarehouseError>;

    /// For a command that only reads (`plan`, `runs`, `rejections`, `dlq list`, `check`):
    /// instead of [`StateStore::prepare`], makes nothing. `false`: there is no state yet; the
    /// warehouse then reads as an empty state (every model row is new to a diff, no run, no
    /// record, no binding). A state older than this binary knows is an error that says how to
    /// bring it up to date; a newer one is refused as by `prepare`.
    async fn read_only(&self) -> Result<bool, WarehouseError>;

    /// Whether this user may do what the state needs: make the state's tables when they are
    /// missing, and write them. `Ok(())` or what is lacking, in the words of the privileges
    /// to grant (`loopsync check`).
    async fn check_privileges(&self) -> Result<(), WarehouseError>;

    /// Notes model rows found unchanged (see [`Warehouse::diff_changes`]), each only while Loops'
    /// confirmed fingerprint for it is still the one given. A warehouse that leaves nothing
    /// out ignores it.
    async fn note_unchanged(&self, sync: &str, rows: &[Unchanged]) -> Result<(), WarehouseError>;

    /// The diff of a model read from a [`Source`]: `model`'s rows are loaded into a temporary
    /// table of the diff's own session, which stands for the model (see [`staged_spec`]); then
    /// as [`Warehouse::diff_since`], or with `leave_out_unchanged` as
    /// [`Warehouse::diff_changes`].
    async fn diff_model(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        leave_out_unchanged: bool,
        model: ModelRows,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError>;

    /// An event sync's watermark on cursor `column`: the highest cursor value (Unix
    /// milliseconds) of its latest run over that column that finished with no dead letter
    /// (`succeeded`, `adopted`, or `degraded` by invalid or rejected records), since its state
    /// was last reset.
    async fn cursor_watermark(
        &self,
        sync: &str,
        column: &str,
    ) -> Result<Option<i64>, WarehouseError>;

    /// What decides whether a contact sync's next run may diff incrementally on cursor
    /// `column` (see [`DiffBasis`]); an empty basis (a full diff) when there is no state.
    async fn diff_basis(&self, sync: &str, column: &str) -> Result<DiffBasis, WarehouseError>;

    /// A new run of `sync`, status `requested` — unless another run of the sync is in progress
    /// ([`WarehouseError::RunInProgress`]). A run in progress whose waiting process gave no sign
    /// of life for [`LEASE`] is closed first, as `interrupted`.
    async fn create_run(&self, sync: &str) -> Result<i64, WarehouseError>;

    /// The process that waits for `run_id` is alive (every [`HEARTBEAT`]).
    async fn heartbeat(&self, run_id: i64) -> Result<(), WarehouseError>;

    /// The extractor of `run_id` is alive (every [`HEARTBEAT`] of a diff, and before each
    /// batch it publishes); `false`: the run is no longer extracting (closed meanwhile), so the
    /// extractor stops.
    async fn extracting(&self, run_id: i64) -> Result<bool, WarehouseError>;

    /// The state's random id, made when the tables were: run ids, message ids, ledger entries
    /// and idempotency keys are scoped by it, so a re-created state or another warehouse on the
    /// same NATS namespace never meets this one's.
    async fn installation(&self) -> Result<String, WarehouseError>;

    /// Claims a requested run for extraction; with `redelivered`, also one whose extraction
    /// started before (its extractor died). `None`: someone else has it, or it is done.
    async fn claim_run(
        &self,
        run_id: i64,
        redelivered: bool,
    ) -> Result<Option<String>, WarehouseError>;

    /// Notes what is about to be published for each key, with the identity it writes. Called
    /// before publishing, so no outcome of these keys can race with it. Until Loops confirms it,
    /// the version is *possibly applied* ([`DiffRow::unsure`]), with that identity.
    async fn mark_emitted_as(
        &self,
        sync: &str,
        run_id: i64,
        emitted: &[Emitted],
    ) -> Result<(), WarehouseError>;

    /// [`Warehouse::mark_emitted_as`] without identities: `(key, fingerprint)`.
    async fn mark_emitted(
        &self,
        sync: &str,
        run_id: i64,
        emitted: &[(String, String)],
    ) -> Result<(), WarehouseError> {
        let emitted: Vec<Emitted> = emitted
            .iter()
            .map(|(key, fingerprint)| Emitted {
                key: key.clone(),
                fingerprint: fingerprint.clone(),
                ..Emitted::default()
            })
            .collect();
        self.mark_emitted_as(sync, run_id, &emitted).await
    }

    /// The extraction is complete: store its counts; the run is `sending` (or finished, when
    /// every record already has an outcome).
    async fn finish_extract(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError>;

    /// `loopsync adopt`: records these keys as confirmed by Loops in `run_id` without anything
    /// having been sent. No contact id is known for them: any kept before is forgotten.
    async fn adopt(
        &self,
        sync: &str,
        run_id: i64,
        records: &[Adoption],
    ) -> Result<(), WarehouseError>;

    /// Parks records at the fingerprint of their latest outcome: runs leave them alone until
    /// their data changes. Returns how many were parked.
    async fn park(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError>;

    /// Unparks records: the next run tries them again. Returns how many were unparked.
    async fn unpark(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError>;

    /// The records of `sync` that Loops confirmed with one of `identities` (a normalised
    /// email, or a userId), as `(key, confirmed email, confirmed userId)`: who owns a contact
    /// before a removal or a re-key takes it out of Loops.
    async fn owners(
        &self,
        sync: &str,
        identities: &[String],
    ) -> Result<Vec<(String, Option<String>, Option<String>)>, WarehouseError>;

    /// The parked records of `sync` (every sync: `None`), as `(sync, key)`.
    async fn parked(&self, sync: Option<&str>) -> Result<Vec<(String, String)>, WarehouseError>;

    /// Ends an adoption run: status `adopted`, with its counts.
    async fn finish_adopt(&self, run_id: i64, counts: &ExtractCounts)
    -> Result<(), WarehouseError>;

    /// The requests `loopsync run` made to Loops before it requested this run (its preflight);
    /// replaces what was recorded before for the run.
    async fn record_preflight(
        &self,
        run_id: i64,
        counts: &RequestCounts,
    ) -> Result<(), WarehouseError>;

    /// Ends a run as failed (the model does not run, …).
    async fn fail_run(&self, run_id: i64, error: &str) -> Result<(), WarehouseError>;

    /// Closes a run still in progress as `interrupted`, with `why` (its process is stopping: a
    /// signal), as the lease in [`StateStore::create_run`] closes an abandoned one. A run already
    /// over is left alone; returns whether the run was closed. What Loops confirmed stays.
    async fn interrupt_run(&self, run_id: i64, why: &str) -> Result<bool, WarehouseError>;

    /// Records outcomes in one transaction: the per-record results, the state of confirmed
    /// records (a confirmed removal takes the record out of the state), and the status of runs
    /// whose every record now has an outcome. Repeated outcomes are ignored, except that a
    /// confirmation replaces an earlier failure (and adds its requests). An `attempted`
    /// outcome only counts its attempt's requests (`loopsync.attempts`, once per attempt).
    async fn record_outcomes(&self, outcomes: &[Outcome]) -> Result<(), WarehouseError>;

    /// Ends the run if every record has an outcome (`record_outcomes` and `finish_extract` do
    /// this themselves; whoever waits for a run calls it too, so no interleaving can leave a
    /// complete run unfinished).
    async fn finish_if_complete(&self, run_id: i64) -> Result<(), WarehouseError>;

    async fn run(&self, run_id: i64) -> Result<Option<RunSummary>, WarehouseError>;

    /// Newest first.
    async fn runs(&self, sync: Option<&str>, limit: i64)
    -> Result<Vec<RunSummary>, WarehouseError>;

    /// Per-record results of a run.
    async fn records(&self, run_id: i64) -> Result<Vec<RecordResult>, WarehouseError>;

    /// Records whose latest outcome is invalid, rejected or dead-lettered: what the next run
    /// tries again.
    async fn rejections(&self, sync: Option<&str>) -> Result<Vec<RecordResult>, WarehouseError>;

    /// `loopsync verify --repair`: forgets what Loops confirmed for these records, given as
    /// `(key, the confirmed fingerprint verify compared against)`, so the next run sends them
    /// again. The confirmed fingerprint becomes [`FORGOTTEN_FP`], which no row's fingerprint
    /// equals: the next run finds the record *changed* (or, gone from the model under mirror,
    /// removed); its identifiers and contact id stay, so a removal still finds the contact. A
    /// record no longer confirmed at the given fingerprint (a run confirmed a newer version
    /// meanwhile) is left alone. Returns how many were forgotten.
    async fn forget_confirmed(
        &self,
        sync: &str,
        records: &[(String, String)],
    ) -> Result<u64, WarehouseError>;

    /// The Loops destination the sync's state is bound to (`loopsync.destinations`), if any.
    async fn destination(&self, sync: &str) -> Result<Option<DestinationBinding>, WarehouseError>;

    /// Binds the sync's state to `destination`, confirmed with the API key of
    /// `key_fingerprint`, unless it is bound already: returns the earlier binding, if the sync
    /// had one (then nothing changed), else `None` (bound now). Atomic: of two processes
    /// binding at once, one binds and the other is told that binding.
    async fn bind_destination(
        &self,
        sync: &str,
        destination: &Destination,
        key_fingerprint: &str,
    ) -> Result<Option<DestinationBinding>, WarehouseError>;

    /// Binds the sync's state to `destination` and the API key of `key_fingerprint`, replacing
    /// any earlier binding (`loopsync adopt`: the model is recorded as confirmed there). Unless
    /// the binding is the same (destination and key), the contact ids the state keeps are
    /// forgotten in the same transaction: they are the earlier Loops' ids.
    async fn set_destination(
        &self,
        sync: &str,
        destination: &Destination,
        key_fingerprint: &str,
    ) -> Result<(), WarehouseError>;

    /// Records `key_fingerprint` as the API key of the sync's binding, if the sync is still
    /// bound to `destination` (a binding from before fingerprints were kept, or a new key found
    /// to reach the state's contacts). Whether it was recorded.
    async fn set_key_fingerprint(
        &self,
        sync: &str,
        destination: &Destination,
        key_fingerprint: &str,
    ) -> Result<bool, WarehouseError>;

    /// Up to `limit` records of `sync` whose contact Loops confirmed, those with a contact id
    /// first, then the most recently confirmed (then by key): what is read back from Loops when
    /// the API key changed (an id proves the same team; an email alone does not).
    async fn confirmed_contacts(
        &self,
        sync: &str,
        limit: u32,
    ) -> Result<Vec<ConfirmedContact>, WarehouseError>;

    /// `loopsync rejections accept`: accepts these invalid records of `sync`, each as invalid
    /// for `reason` (its latest reason), with an optional `note`: while a record stays invalid
    /// for that very reason, its invalid outcome no longer makes a run degraded. Any other
    /// outcome of the record (another reason, sent, confirmed) ends the acceptance. Replaces an
    /// earlier acceptance of the record. A record is accepted only if its latest outcome is
    /// still invalid for `reason` when the acceptance is written (one statement: a run that
    /// recorded another outcome after the caller read it is not overruled). A record whose
    /// contact Loops still holds with the values it last confirmed (its row was sent, then
    /// became invalid: Loops keeps those values while it stays so) is accepted only with
    /// `in_loops_too`; otherwise its key is returned. What was accepted, and what was not.
    async fn accept_invalid(
        &self,
        sync: &str,
        records: &[(String, String)],
        note: Option<&str>,
        in_loops_too: bool,
    ) -> Result<Acceptance, WarehouseError>;

    /// Undoes [`StateStore::accept_invalid`] for these keys: their next invalid outcome makes
    /// the run degraded again. How many acceptances were removed.
    async fn unaccept_invalid(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError>;

    /// `loopsync reset`: forgets the sync's state, its records' confirmed fingerprints and its
    /// destination binding, in one transaction; its runs and per-record results stay.
    async fn reset_state(&self, sync: &str) -> Result<StateReset, WarehouseError>;

    /// The entry of the shared rate budget `budget` (its ledger key); `None` when none is kept
    /// yet. Without NATS, every process that shares the state paces its requests to Loops by
    /// it (the pacing rule is the bus's `take_slots`).
    async fn read_rate_slot(&self, budget: &str) -> Result<Option<RateSlot>, WarehouseError>;

    /// Stores `next` as `budget`'s due time, written at `written_at` by its writer's clock, if
    /// its revision is still `expected` (`None`: if none is kept yet), atomically: the new
    /// revision, or `None` when another process wrote first.
    async fn swap_rate_slot(
        &self,
        budget: &str,
        next: i64,
        written_at: i64,
        expected: Option<i64>,
    ) -> Result<Option<i64>, WarehouseError>;

    /// `loopsync forget`: the records of `sync` that are `person`, with every identity the
    /// state keeps of each (what Loops may hold). By key: that record; by email (as
    /// [`loopsync_core::value::normalize_email`] keeps it): every record whose confirmed,
    /// model or sent email is it, and a record whose key is it. Reads only.
    async fn find_person(
        &self,
        sync: &str,
        person: &Person,
    ) -> Result<Vec<KeptRecord>, WarehouseError>;

    /// `loopsync forget`: deletes the records `keys` of `sync` from the state, the results and
    /// the attempts, and replaces every stored text of the sync (reasons, run errors) that
    /// holds one of `emails` by a word that it was erased; in one transaction, refused
    /// ([`WarehouseError::RunInProgress`]) while the sync has a run in progress.
    async fn erase_person(
        &self,
        sync: &str,
        keys: &[String],
        emails: &[String],
    ) -> Result<Erasure, WarehouseError>;

    /// `[warehouse] records_retention`: deletes the per-record results and attempts of every
    /// finished run requested longer than `older_than` ago (the runs and their counts stay);
    /// how many results went.
    async fn prune_records(&self, older_than: std::time::Duration) -> Result<u64, WarehouseError>;
}

/// Who `loopsync forget` erases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Person {
    /// The record of this primary key.
    Key(String),
    /// The records of this email, as the email rule keeps it (trimmed, ASCII lower-cased).
    Email(String),
}

/// A shared rate budget's entry in the state ([`StateStore::read_rate_slot`]): the next
/// slot's due time and the writer's clock when it wrote it (nanoseconds of the writer's
/// clock: only their difference means anything to another host), under a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSlot {
    pub next_due: i64,
    pub written_at: i64,
    pub revision: i64,
}

/// A record of a sync as the state keeps it, found by [`StateStore::find_person`]: its key and
/// the identities the state holds of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeptRecord {
    pub key: String,
    /// The identity Loops confirmed.
    pub confirmed_email: Option<String>,
    pub confirmed_user_id: Option<String>,
    /// The identity of the version last sent.
    pub emitted_email: Option<String>,
    pub emitted_user_id: Option<String>,
    /// The model row's email, as noted unchanged.
    pub model_email: Option<String>,
    /// Every identity possibly applied since Loops' last confirmation.
    pub possibly_applied: Vec<OldContact>,
    /// The record has a row in the state (else only results or attempts).
    pub in_state: bool,
}

/// What [`StateStore::erase_person`] erased: rows per table, and texts replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Erasure {
    /// Rows of `loopsync.state`.
    pub state: u64,
    /// Rows of `loopsync.records`: the record's result in each run.
    pub records: u64,
    /// Rows of `loopsync.attempts`.
    pub attempts: u64,
    /// Reasons and run errors that named the person, replaced.
    pub texts: u64,
}

/// A sync's state bound to the Loops destination it was confirmed against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestinationBinding {
    #[serde(flatten)]
    pub destination: Destination,
    /// The fingerprint of the API key the state was confirmed with
    /// (`loopsync_core::secret::ApiKey::fingerprint`), never the key; `None` for a binding
    /// recorded before fingerprints were kept.
    pub key_fingerprint: Option<String>,
    /// When the binding was recorded (UTC, RFC 3339).
    pub bound_at: String,
}

/// A record whose contact Loops confirmed, with the identity it confirmed
/// ([`StateStore::confirmed_contacts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfirmedContact {
    pub key: String,
    pub email: Option<String>,
    pub user_id: Option<String>,
    /// The contact's id in Loops, when Loops gave it.
    pub contact_id: Option<String>,
}

/// What [`StateStore::accept_invalid`] did with the records it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acceptance {
    /// Records accepted.
    pub accepted: u64,
    /// Records not accepted because their latest outcome is no longer invalid for the reason
    /// given (a run recorded another since they were read).
    pub outcome_changed: u64,
    /// Keys not accepted because Loops still holds their contact with the values it last
    /// confirmed (the row was sent, then became invalid), when such records were not to be
    /// accepted.
    pub in_loops: Vec<String>,
}

/// What `reset_state` deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StateReset {
    /// Of `state_records`, those whose contact Loops had confirmed: what the sync's state said
    /// Loops holds, and what the next run sends again.
    pub confirmed_records: u64,
    /// Rows of `loopsync.state` forgotten: the sync's records (confirmed, or only sent and
    /// never confirmed, or parked). Each keeps only its generation, so the next run's sends
    /// have new idempotency keys.
    pub state_records: u64,
    /// The destination binding it had, if any.
    pub destination: Option<DestinationBinding>,
}

/// The confirmed fingerprint of a record whose confirmation `loopsync verify --repair`
/// forgot: not a fingerprint (those are 40 hex digits), so it never equals a row's.
pub const FORGOTTEN_FP: &str = "forgotten";

/// A model's rows read from a [`Source`], for [`Warehouse::diff_model`].
pub struct ModelRows {
    /// The columns of each row, the primary key first ([`source::model_columns`]).
    pub columns: Vec<String>,
    pub rows: source::TextRows,
}

/// The temporary table that holds a source's rows in the diff's session.
pub(crate) const STAGED: &str = "loopsync_model";

/// The sync as its diff runs in a state store: its model is [`STAGED`], every column text, the
/// cursor of an event sync turned into a time by `time`. The model's text stays in the new one
/// as a digest, so that the row hashes of [`Warehouse::diff_changes`] are seeded by it too.
pub(crate) fn staged_spec(
    spec: &SyncSpec,
    columns: &[String],
    time: impl Fn(&str) -> String,
) -> SyncSpec {
    let cursor = spec
        .append
        .as_ref()
        .and_then(|a| a.cursor.as_ref())
        .map(|c| c.column.as_str());
    let select: Vec<String> = columns
        .iter()
        .map(|c| {
            let q = quote_ident(c);
            if Some(c.as_str()) == cursor {
                format!("{} AS {q}", time(&q))
            } else {
                q
            }
        })
        .collect();
    let mut staged = spec.clone();
    staged.model = format!(
        "SELECT {} FROM {STAGED} /* model {} */",
        select.join(", "),
        loopsync_core::keys::fingerprint(&[&spec.model])
    );
    staged
}

/// Where a deployment's model and state are: `[warehouse]` of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where the model is read.
    pub url: String,
    /// Where the state is kept, when not in the warehouse itself.
    pub state: Option<String>,
    /// The state's schema (PostgreSQL) or table prefix (SQLite).
    pub state_schema: String,
}

/// The state's schema when the config names none.
pub const DEFAULT_SCHEMA: &str = "loopsync";

/// Opens the deployment of [`Settings`]: the warehouse itself, or, with a state store, a
/// [`Source`] beside the store.
pub async fn open(settings: &Settings) -> Result<Arc<dyn Warehouse>, WarehouseError> {
    let Some(state_url) = &settings.state else {
        // The file holds the model: one that does not exist is a mistake in the URL, not a
        // new empty warehouse.
        if let Some(path) = settings.url.strip_prefix("sqlite://")
            && !std::path::Path::new(path).exists()
        {
            return Err(WarehouseError::BadUrl(format!(
                "warehouse.url: {path}: no such file (it names the SQLite file that holds the \
                 model; loopsync does not create it)"
            )));
        }
        return connect_schema(&settings.url, &settings.state_schema)
            .await
            .map_err(naming("warehouse.url"));
    };
    let store = open_store(state_url, &settings.state_schema)
        .await
        .map_err(naming("warehouse.state"))?;
    let source = open_source(&settings.url)
        .await
        .map_err(naming("warehouse.url"))?;
    Ok(store.beside(Some(source)))
}

/// A URL that names no warehouse, said with the config key that holds it.
fn naming(key: &'static str) -> impl Fn(WarehouseError) -> WarehouseError {
    move |e| match e {
        WarehouseError::BadUrl(why) => WarehouseError::BadUrl(format!("{key}: {why}")),
        other => other,
    }
}

/// The [`Source`] of a URL: `mysql://…`, `duckdb://…` (with the `duckdb` feature).
pub async fn open_source(url: &str) -> Result<Arc<dyn Source>, WarehouseError> {
    if url.starts_with("mysql://") {
        return Ok(Arc::new(MySqlSource::connect(url).await?));
    }
    if url.starts_with("duckdb://") {
        #[cfg(feature = "duckdb")]
        return Ok(Arc::new(DuckDbSource::open(url)?));
        #[cfg(not(feature = "duckdb"))]
        return Err(WarehouseError::Unsupported(
            "this loopsync was built without DuckDB: build it with `cargo build --release \
             --features duckdb` (see the README)"
                .into(),
        ));
    }
    Err(WarehouseError::Unsupported(format!(
        "warehouse.url `{}://…` cannot be read beside a state store: use mysql:// or duckdb://",
        url.split("://").next().unwrap_or(url)
    )))
}

/// Opens the warehouse of a URL, state in schema `loopsync`: `postgres://…` /
/// `postgresql://…`, or `sqlite:///path/file.db`.
pub async fn connect(url: &str) -> Result<Arc<dyn Warehouse>, WarehouseError> {
    connect_schema(url, DEFAULT_SCHEMA).await
}

/// [`connect`], the state in `schema`.
pub async fn connect_schema(url: &str, schema: &str) -> Result<Arc<dyn Warehouse>, WarehouseError> {
    Ok(open_store(url, schema).await?.beside(None))
}

/// A state store, of either backend.
enum Opened {
    Postgres(Box<PgWarehouse>),
    Sqlite(SqliteWarehouse),
}

impl Opened {
    /// The deployment of this store and `source` (`None`: its own database holds the model).
    fn beside(self, source: Option<Arc<dyn Source>>) -> Arc<dyn Warehouse> {
        match self {
            Opened::Postgres(store) => Arc::new((*store).with_source(source)),
            Opened::Sqlite(store) => Arc::new(store.with_source(source)),
        }
    }
}

/// The state store of a URL: `postgres://…` / `postgresql://…`, or `sqlite:///path/file.db`.
async fn open_store(url: &str, schema: &str) -> Result<Opened, WarehouseError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Opened::Postgres(Box::new(
            PgWarehouse::connect_schema(url, schema).await?,
        )))
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Opened::Sqlite(SqliteWarehouse::open_schema(path, schema)?))
    } else if loopsync_core::warehouse_url::is_read_only(url) {
        Err(WarehouseError::Unsupported(format!(
            "a {}:// warehouse is only read: set [warehouse] state to where the syncs' state is \
             kept (sqlite:///path/state.db, or a postgres:// URL)",
            url.split("://").next().unwrap_or("this")
        )))
    } else {
        Err(WarehouseError::Unsupported(format!(
            "warehouse.url must start with postgres://, postgresql:// or sqlite://, not `{}`",
            url.split("://").next().unwrap_or(url)
        )))
    }
}

/// The request counters of a record, an attempt and a run's summary, in this order.
pub(crate) const COUNTERS: [&str; 5] = ["writes", "events", "deletes", "retries", "rate_limited"];

/// A record's requests: those of the attempt that settled it, plus those of its attempts
/// recorded as `attempted` (`x` is the record's alias).
pub(crate) fn record_requests_sql(attempts: &str) -> String {
    format!(
        "x.requests + (SELECT COALESCE(sum(a.requests), 0) FROM {attempts} a \
          WHERE a.run_id = x.run_id AND a.key = x.key)"
    )
}

/// The summary's request columns: total, then [`COUNTERS`], each summed over the run's
/// records and its attempts (`r` is the run's alias, `x` its records, grouped by run).
pub(crate) fn summary_request_sql(attempts: &str) -> String {
    ["requests"]
        .iter()
        .chain(COUNTERS.iter())
        .map(|c| {
            format!(
                "COALESCE(sum(x.{c}), 0) + (SELECT COALESCE(sum(a.{c}), 0) FROM {attempts} a \
                  WHERE a.run_id = r.id)"
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The summary's row counts as stored (added, changed, invalid_rows: the extractor's), then
/// the changes the transformer refused among the added and the changed (0 until the
/// extraction's counts are in), for [`ExtractCounts::refuse`].
pub(crate) fn summary_rows_sql(invalid_of: impl Fn(&str) -> String) -> String {
    format!(
        "r.added, r.changed, r.invalid_rows, \
         CASE WHEN r.extracted_at IS NULL THEN 0 ELSE {added} END, \
         CASE WHEN r.extracted_at IS NULL THEN 0 ELSE {changed} END",
        added = invalid_of("x.change = 'added'"),
        changed = invalid_of("x.change = 'changed'"),
    )
}

/// Adds up a summary's request counters: (requests, writes, events, deletes, retries,
/// rate_limited) of the records and attempts, then the run's preflight (requests, retries,
/// rate_limited).
pub(crate) fn requests_of(summary: &mut RunSummary, loader: [i64; 6], preflight: [i64; 3]) {
    let [requests, writes, events, deletes, retries, rate_limited] = loader;
    summary.requests_by_kind = RequestsByKind {
        writes,
        events,
        deletes,
        preflight: preflight[0],
    };
    summary.requests = requests + preflight[0];
    summary.retries = retries + preflight[1];
    summary.rate_limited = rate_limited + preflight[2];
}

/// Operations that take a record out of Loops (and, once confirmed, out of the state).
pub(crate) fn is_removal(operation: &str) -> bool {
    matches!(operation, "delete" | "unsubscribe" | RELEASE)
}

/// The operation of a record that left the model while its contact is another record's now
/// (its email or userId taken): the record leaves the state, and its contact stays in Loops,
/// as it is — neither removed nor unsubscribed, so a row that returns re-subscribes nothing.
pub const RELEASE: &str = "release";

/// `"name"` with inner quotes doubled: a column name as an SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The model without trailing `;` and blanks, so it can be a subquery.
pub(crate) fn model_sql(model: &str) -> &str {
    model.trim().trim_end_matches(';').trim_end()
}

/// A model error said where it is, as a [`WarehouseError::Model`]'s detail. `own`: the model
/// as written, prepared alone (not run): its columns, or its own error (whose position is in
/// the model's text, not in loopsync's query around it). `detail`: the error of loopsync's
/// query, kept when neither says more. A model that runs but lacks a mapped column is said as
/// such, naming the column: it is no model that "does not run".
pub(crate) fn explain_model_error(
    spec: &SyncSpec,
    own: Result<Vec<String>, String>,
    detail: String,
) -> String {
    match own {
        Err(own) => format!("the model does not run: {own} (the model as written)"),
        Ok(columns) => {
            let missing: Vec<String> = spec
                .column_uses()
                .into_iter()
                .filter(|(_, c)| !columns.contains(c))
                .map(|(key, c)| {
                    format!("{key} names the column \"{c}\", which the model does not return")
                })
                .collect();
            match missing.len() {
                0 => format!("the model does not run: {detail}"),
                n => format!(
                    "{} missing from the model: {}; the model's columns are: {}",
                    if n == 1 { "a column is" } else { "columns are" },
                    missing.join("; "),
                    columns.join(", ")
                ),
            }
        }
    }
}

/// Where in `text` the 1-based character `position` is: `character N: "…around it…"`.
pub(crate) fn point_at(text: &str, position: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = position.saturating_sub(1).min(chars.len());
    let from = at.saturating_sub(20);
    let to = (at + 20).min(chars.len());
    let around: String = chars[from..to]
        .iter()
        .map(|c| if c.is_whitespace() { ' ' } else { *c })
        .collect();
    format!("character {position}: \"{around}\"")
}

/// A state at `version` (`None`: none) as a read-only command finds it: `Ok(false)` when
/// there is none, `Ok(true)` when it is current, else why it cannot be read.
pub(crate) fn readable(version: Option<i64>) -> Result<bool, WarehouseError> {
    schema::newer_than_known(version)?;
    match version {
        None => Ok(false),
        Some(v) if v >= schema::LATEST => Ok(true),
        Some(v) => Err(WarehouseError::Unsupported(format!(
            "the state's tables are at version {v}, this loopsync reads version {}: a command \
             that writes (`loopsync run`, `adopt`, a worker) brings them up to date first",
            schema::LATEST
        ))),
    }
}

/// The model's key and mapped columns, no rows: what `check_model` prepares. `cursor`: an event
/// sync's cursor condition (see [`cursor_condition`]), so a cursor the warehouse cannot compare
/// as a time is found here.
pub(crate) fn probe_sql(spec: &SyncSpec, cursor: Option<String>) -> String {
    let mut columns = vec![format!("model.{}", quote_ident(&spec.primary_key))];
    columns.extend(
        spec.columns()
            .iter()
            .map(|c| format!("model.{}", quote_ident(c))),
    );
    format!(
        "SELECT {} FROM ({}) AS model{} LIMIT 0",
        columns.join(", "),
        model_sql(&spec.model),
        cursor.map(|c| format!(" WHERE {c}")).unwrap_or_default()
    )
}

/// What the diff query says differently in each warehouse.
pub(crate) struct DiffDialect<'a> {
    /// Turns an expression into text.
    pub cast: &'a dyn Fn(&str) -> String,
    /// The state table's name.
    pub state: &'a str,
    /// The placeholder of the sync's name.
    pub param: &'a str,
    /// What orders keys by their bytes (`COLLATE "C"`), if anything is needed.
    pub collate: &'a str,
    /// The one email rule.
    pub email_key: &'a dyn Fn(&str) -> String,
    /// A userId as sent: trimmed of white space (an empty one is none).
    pub trimmed: &'a dyn Fn(&str) -> String,
    /// Join the state table itself on `(sync, key)` rather than a subquery of the sync's rows:
    /// SQLite joins a subquery by scanning it once per model row (quadratic: 2.7 s for 10 000
    /// rows, measured), the table by its primary key. PostgreSQL hash-joins either.
    pub inline_state: bool,
}

/// The diff query, in `dialect` (see [`DiffDialect`]). Columns:
/// presence flag, key, mapped columns…, confirmed_fp, confirmed_email, confirmed_user_id,
/// email count, parked_fp, generation; and, when `row_hash` is given, the row's hash:
/// `row_hash` turns the list of the model's key and mapped columns into the expression.
///
/// An event sync's rows are events: many share an email, and none is removed, so its diff
/// counts no emails and joins only the model's keys to the state (an index lookup per row when
/// `since` keeps the read small). `since`, when given, is the condition on the model's cursor
/// column, in the dialect (see [`cursor_condition`]).
pub(crate) fn diff_sql(
    spec: &SyncSpec,
    dialect: &DiffDialect<'_>,
    since: Option<String>,
    row_hash: Option<&dyn Fn(&str) -> String>,
) -> String {
    let DiffDialect {
        cast,
        state,
        param,
        collate,
        email_key,
        trimmed,
        inline_state,
    } = dialect;
    let columns = spec.columns();
    let email_count = match spec.property("email").filter(|_| !spec.is_append()) {
        Some(p) => format!(
            "CASE WHEN model.{c} IS NULL OR {k} = '' THEN 1 ELSE count(*) OVER (PARTITION BY {k}) END AS ecount",
            c = quote_ident(&p.column),
            k = email_key(&cast(&format!("model.{}", quote_ident(&p.column)))),
        ),
        // bigint, as `count(*)` is: PostgreSQL types a bare `1` as integer, which the reader
        // of the column (an i64) refuses.
        None => "CAST(1 AS bigint) AS ecount".to_owned(),
    };
    let mut select = vec![
        "1 AS present".to_owned(),
        format!(
            "{} AS k",
            cast(&format!("model.{}", quote_ident(&spec.primary_key)))
        ),
    ];
    for (i, column) in columns.iter().enumerate() {
        select.push(format!(
            "{} AS c{i}",
            cast(&format!("model.{}", quote_ident(column)))
        ));
    }
    select.push(email_count);
    // A userId as the transformer sends it: trimmed, and none when empty.
    select.push(match spec.property("userId").filter(|_| !spec.is_append()) {
        Some(p) => format!(
            "CASE WHEN model.{c} IS NULL OR {u} = '' THEN 1 ELSE count(*) OVER (PARTITION BY {u}) END AS ucount",
            c = quote_ident(&p.column),
            u = trimmed(&cast(&format!("model.{}", quote_ident(&p.column)))),
        ),
        None => "CAST(1 AS bigint) AS ucount".to_owned(),
    });
    let mut hashed = String::new();
    if let Some(row_hash) = row_hash {
        let mut raw = vec![format!("model.{}", quote_ident(&spec.primary_key))];
        raw.extend(columns.iter().map(|c| format!("model.{}", quote_ident(c))));
        select.push(format!("{} AS h", row_hash(&raw.join(", "))));
        hashed = ", m.h".to_owned();
    }
    let outer_columns: Vec<String> = (0..columns.len()).map(|i| format!("m.c{i}")).collect();
    let join = if spec.is_append() {
        "LEFT"
    } else {
        "FULL OUTER"
    };
    let (state_cte, joined) = if *inline_state {
        (
            String::new(),
            // A state row of another sync matches no model row: the full join yields it alone,
            // and the WHERE drops it.
            format!(
                "m {join} JOIN {state} s ON s.sync = {param} AND s.key = m.k{}",
                if spec.is_append() {
                    String::new()
                } else {
                    format!(" WHERE s.sync IS NULL OR s.sync = {param}")
                }
            ),
        )
    } else {
        (
            format!(
                ", s AS (SELECT key, confirmed_fp, confirmed_email, confirmed_user_id, parked_fp, generation, emitted_run, emitted_fp, confirmed_run, resubscribe, emitted_email, emitted_user_id, possibly_applied FROM {state} WHERE sync = {param})"
            ),
            format!("m {join} JOIN s ON s.key = m.k"),
        )
    };
    format!(
        "WITH m AS (SELECT {select} FROM ({model}) AS model{filter}){state_cte} \
         SELECT m.present, COALESCE(m.k, s.key) AS key{comma}{outer}, s.confirmed_fp, s.confirmed_email, s.confirmed_user_id, m.ecount, s.parked_fp, s.generation{hashed}, \
                {UNSURE} AS unsure, s.resubscribe AS resubscribe, m.ucount AS ucount, \
                s.emitted_email AS emitted_email, s.emitted_user_id AS emitted_user_id, \
                s.possibly_applied AS possibly_applied \
         FROM {joined} \
         ORDER BY COALESCE(m.k, s.key) {collate} NULLS LAST",
        select = select.join(", "),
        model = model_sql(&spec.model),
        filter = since.map(|c| format!(" WHERE {c}")).unwrap_or_default(),
        comma = if columns.is_empty() { "" } else { ", " },
        outer = outer_columns.join(", "),
        UNSURE = UNSURE,
    )
}

/// Whether a version was published after Loops' last confirmation of the record and never
/// confirmed ([`DiffRow::unsure`]), as a bigint 0 or 1, of the state's alias `s`.
/// A version emitted in the same run as the confirmed one with another fingerprint (the run
/// extracted again, after a warehouse error, while the row changed) is one too.
pub(crate) const UNSURE: &str = "CAST(CASE WHEN s.emitted_run IS NOT NULL \
     AND (s.confirmed_run IS NULL OR s.emitted_run > s.confirmed_run \
          OR (s.emitted_run = s.confirmed_run AND s.confirmed_fp <> s.emitted_fp)) \
     THEN 1 ELSE 0 END AS bigint)";

/// An event sync's watermark (see [`Warehouse::cursor_watermark`]): the highest cursor of its
/// latest run that finished with every event it read settled for good — `succeeded`, `adopted`,
/// or `degraded` by invalid or rejected records only. A run with dead letters (Loops failing
/// for longer than the retries) does not move it, so the next run reads those events again and
/// sends them, however long the outage; a dead letter that is parked no longer holds it.
pub(crate) fn watermark_sql(runs: &str, records: &str, sync: &str, column: &str) -> String {
    format!(
        "SELECT r.cursor_high, r.id FROM {runs} r
          WHERE r.sync = {sync} AND r.cursor_high IS NOT NULL AND r.cursor_column = {column}
            AND {settled}
          ORDER BY r.id DESC LIMIT 1",
        settled = settled_run_sql("r", records)
    )
}

/// Run `r` finished with every record it read settled for good: `succeeded`, `adopted`, or
/// `degraded` by invalid or rejected records only (no dead letter). The one rule of which runs
/// give a watermark, and of which full diffs count for a contact sync's `full_diff_every`.
pub(crate) fn settled_run_sql(r: &str, records: &str) -> String {
    format!(
        "({r}.status IN ('succeeded', 'adopted')
          OR ({r}.status = 'degraded'
              AND NOT EXISTS (SELECT 1 FROM {records} x
                               WHERE x.run_id = {r}.id AND x.outcome = 'dead_lettered')))"
    )
}

/// The cursor an event sync's read starts from when it has no watermark (its first run, a
/// replay): the year 1. Such a sync always reads through its cursor condition, so a cursor
/// column the warehouse cannot compare as a time fails its first run (and `check`), not only the
/// runs after.
pub(crate) const EARLIEST_CURSOR: &str = "0001-01-01T00:00:00.000Z";

/// `since` as the text a read's cursor parameter takes.
pub(crate) fn cursor_since(since: Option<i64>) -> String {
    since.map_or_else(|| EARLIEST_CURSOR.to_owned(), millis_to_rfc3339)
}

/// The condition that keeps an event sync's model rows at or after a cursor value: the cursor
/// column (quoted, of the model's alias) compared by `at_or_after(column)` in the dialect, or
/// NULL (such a row is read, and found invalid, on every run: nothing is dropped silently).
/// `None` when the sync has no cursor.
pub(crate) fn cursor_condition(
    spec: &SyncSpec,
    at_or_after: impl Fn(&str) -> String,
) -> Option<String> {
    spec.append.as_ref()?;
    cursor_check(spec, at_or_after)
}

/// [`cursor_condition`] of any sync's cursor, an event sync's or a contact sync's: what
/// `check_model` prepares, so that a cursor the warehouse cannot compare as a time is refused
/// by `check` and by the first run, not only by the first incremental one.
pub(crate) fn cursor_check(
    spec: &SyncSpec,
    at_or_after: impl Fn(&str) -> String,
) -> Option<String> {
    let cursor = spec.cursor()?;
    let column = format!("model.{}", quote_ident(&cursor.column));
    Some(format!("({column} IS NULL OR {})", at_or_after(&column)))
}

#[cfg(test)]
mod tests;
