//! What `loopsync status`, `loopsync record` and the status page read of the state, beyond the
//! runs and the rejections: one record's state and history, the records a run in progress has
//! sent and not yet settled, and the reasons of a sync's failed records per run. Reads only;
//! the statements are in `store/inspect.rs`, once for both stores.

use async_trait::async_trait;
use serde::Serialize;

use crate::{RecordResult, WarehouseError};

/// What the state keeps of one record (`loopsync.state`): not its values (the state keeps a
/// digest of them), but what Loops confirmed of its contact and what was sent since.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecordState {
    /// Loops confirmed a version of the record: its contact is in Loops as the sync sent it.
    pub confirmed: bool,
    /// The run of the last confirmation (or removal) the state holds.
    pub confirmed_run: Option<i64>,
    /// When Loops confirmed it.
    pub confirmed_at: Option<String>,
    /// The identifiers of the contact Loops confirmed.
    pub confirmed_email: Option<String>,
    pub confirmed_user_id: Option<String>,
    /// The Loops contact id, when Loops gave it.
    pub contact_id: Option<String>,
    /// `loopsync verify --repair` forgot the confirmation: the next run sends the record again.
    pub repaired: bool,
    /// The sync removed the record's contact (mirror): the state keeps a tombstone.
    pub removed: bool,
    /// Parked by `loopsync dlq park`: no run retries it while its data stays as it is.
    pub parked: bool,
    /// How many changes of the record Loops confirmed (removals included).
    pub generation: i64,
    /// The run that last published a version of the record (for the loader to send).
    pub sent_run: Option<i64>,
    /// A version published after Loops' last confirmation has not been confirmed: the
    /// transformer found it invalid, Loops refused it, it was given up, or its answer has not
    /// come (yet, or it was lost).
    pub sent_unconfirmed: bool,
}

/// One record's result in one run, with the change it was ([`RecordResult`] and `change`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordOutcome {
    #[serde(flatten)]
    pub result: RecordResult,
    /// `added`, `changed` or `removed`; `null` for a record that never became a change (a
    /// duplicate key) and for results recorded before loopsync kept it.
    pub change: Option<String>,
}

/// An attempt of the loader that sent requests for a record and did not settle it (it failed,
/// and was retried or given up): `loopsync.attempts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    pub run_id: i64,
    /// Which delivery of the record's operation it was: `<stream sequence>.<delivery count>`.
    pub attempt: String,
    /// Requests it sent toward Loops, and of them, by kind.
    pub requests: i64,
    pub writes: i64,
    pub events: i64,
    pub deletes: i64,
    pub retries: i64,
    pub rate_limited: i64,
    /// Why it failed: Loops' answer, or why no answer came.
    pub reason: Option<String>,
    pub at: String,
}

/// Everything the results keep of one record: every outcome and every failed attempt, oldest
/// first (results older than `[warehouse] records_retention` are gone).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RecordHistory {
    pub outcomes: Vec<RecordOutcome>,
    pub attempts: Vec<Attempt>,
}

/// How many of a run's records ended with one outcome and one reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReasonCount {
    pub run_id: i64,
    /// `invalid`, `rejected` or `dead_lettered`.
    pub outcome: String,
    pub reason: Option<String>,
    pub records: i64,
}

/// What the status commands read of the state; every store has it.
#[async_trait]
pub trait Inspect: Send + Sync {
    /// What the state keeps of `key` of `sync`; `None` when it keeps nothing.
    async fn record_state(
        &self,
        sync: &str,
        key: &str,
    ) -> Result<Option<RecordState>, WarehouseError>;

    /// Every outcome and failed attempt of `key` of `sync`, oldest first.
    async fn record_history(&self, sync: &str, key: &str) -> Result<RecordHistory, WarehouseError>;

    /// Records of `sync` that a run in progress has sent (or is about to) and that have no
    /// outcome in it yet.
    async fn in_flight(&self, sync: &str) -> Result<i64, WarehouseError>;

    /// The invalid, rejected and dead-lettered records of the runs of `sync` from run
    /// `from_run` on, counted by run, outcome and reason.
    async fn reason_counts(
        &self,
        sync: &str,
        from_run: i64,
    ) -> Result<Vec<ReasonCount>, WarehouseError>;
}
