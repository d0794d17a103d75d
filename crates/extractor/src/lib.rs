//! The extractor and the checkpointer: the two stages that own the sync's state.
//!
//! * [`ExtractorStage`] takes a run request (exactly one extractor replica gets each), streams
//!   the warehouse's diff of the model against the state, and publishes one change per added or
//!   changed record; NULL and duplicate primary keys become invalid records. Memory is bounded:
//!   one diff row and one batch of emitted keys at a time.
//! * [`Checkpointer`] applies outcomes to the warehouse in batches: per-record results, the
//!   confirmed fingerprint of each confirmed record, and the end of runs. The state advances
//!   only here, and only on Loops' confirmation.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use loopsync_bus::worker::{BatchHandler, DeliveryInfo, Fate, Handler};
use loopsync_bus::{Bus, BusError, publish};
use loopsync_core::codec::{self, DecodeError};
use loopsync_core::envelope::{
    ChangeKind, Outcome, OutcomeStatus, RequestCounts, RowChange, RunRequest, VERSION,
};
use loopsync_core::spec::{Behavior, IdentifyBy, OnRemove, SyncSpec};
use loopsync_core::value::normalize_email;
use loopsync_core::{Classified, ErrorClass};
use loopsync_warehouse::{
    DiffRow, ExtractCounts, RunStatus, RunSummary, Warehouse, WarehouseError,
};

pub mod decide;

pub use decide::{Decision, KeyGroups, decide_group, tally};

/// Changes noted as emitted (then published) per warehouse round trip: the extractor's memory bound.
const EMIT_BATCH: usize = 500;

/// What can go wrong extracting or checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// `run --once`'s no-progress deadline passed.
    #[error(transparent)]
    Stalled(Box<Stalled>),
}

impl Classified for ExtractError {
    fn class(&self) -> ErrorClass {
        match self {
            ExtractError::Decode(e) => e.class(),
            ExtractError::Warehouse(e) => e.class(),
            ExtractError::Bus(e) => e.class(),
            ExtractError::Stalled(_) => ErrorClass::Permanent,
        }
    }
}

/// The extractor on the bus.
pub struct ExtractorStage {
    bus: Arc<dyn Bus>,
    warehouse: Arc<dyn Warehouse>,
    specs: HashMap<String, SyncSpec>,
}

impl ExtractorStage {
    pub fn new(
        bus: Arc<dyn Bus>,
        warehouse: Arc<dyn Warehouse>,
        specs: impl IntoIterator<Item = SyncSpec>,
    ) -> ExtractorStage {
        ExtractorStage {
            bus,
            warehouse,
            specs: specs.into_iter().map(|s| (s.name.clone(), s)).collect(),
        }
    }

    /// Diffs and publishes; returns the counts. With `only_keys`, the run is about those keys
    /// alone (a replay of dead letters).
    ///
    /// Removals (and re-keys that would remove an old contact) are held until the model has
    /// been read, then: a removal whose email another record of this run now claims is not
    /// sent (that contact is the other record's now: deleting it after the other's write would
    /// lose it); and if the rest would remove more than the sync's `max_removal_share` of its
    /// confirmed contacts — or the model returned no rows — none is sent and the run ends
    /// `failed`, unless the request allows removals. Memory (mirror syncs only): the held removals
    /// and re-keys, and a 64-bit hash of the email of each of this run's writes.
    pub async fn extract(
        &self,
        spec: &SyncSpec,
        request: &RunRequest,
    ) -> Result<ExtractCounts, ExtractError> {
        let mut rows = self.warehouse.diff(spec).await?;
        let mut run = RunState {
            only: request.only_keys.iter().cloned().collect(),
            spec,
            run_id: request.run_id,
            installation: &request.installation,
            counts: ExtractCounts::default(),
            changes: Vec::new(),
            invalid: Vec::new(),
            null_keys: 0,
            held: Vec::new(),
            written_emails: HashSet::new(),
            hasher: RandomState::new(),
            confirmed: 0,
            model_rows: 0,
        };
        let mut groups = KeyGroups::default();
        while let Some(row) = rows.next().await {
            let row = row?;
            run.confirmed += u64::from(row.confirmed_fp.is_some());
            run.model_rows += u64::from(row.values.is_some());
            for group in groups.push(row) {
                self.take(&mut run, group).await?;
            }
        }
        if let Some(group) = groups.finish() {
            self.take(&mut run, group).await?;
        }
        self.flush(&mut run).await?;
        self.release_held(&mut run, request.allow_removals).await?;
        Ok(run.counts)
    }

    /// Sends what was held back (see [`ExtractorStage::extract`]).
    async fn release_held(
        &self,
        run: &mut RunState<'_>,
        allow_removals: bool,
    ) -> Result<(), ExtractError> {
        let held = std::mem::take(&mut run.held);
        let mut removals = Vec::new();
        for mut change in held {
            let claimed = change
                .confirmed_email
                .as_deref()
                .map(normalize_email)
                .is_some_and(|e| run.written_emails.contains(&run.email_hash(&e)));
            match change.kind {
                ChangeKind::Removed if claimed => {
                    // The contact now belongs to the record that claims its email: the record
                    // leaves the sync, and its contact stays.
                    let operation = match run.spec.on_remove {
                        OnRemove::Delete => "delete",
                        OnRemove::Unsubscribe => "unsubscribe",
                    };
                    let mut outcome = Outcome::new(
                        &run.spec.name,
                        run.run_id,
                        &change.key,
                        &change.fingerprint,
                        OutcomeStatus::Confirmed,
                        operation,
                    )
                    .with_installation(run.installation)
                    .with_reason(
                        "not removed from Loops: another record of this run now has its email",
                    );
                    outcome.change = Some(ChangeKind::Removed);
                    run.invalid.push(outcome);
                }
                ChangeKind::Removed => removals.push(change),
                _ => {
                    change.keep_old_contact = claimed;
                    run.changes.push(change);
                }
            }
        }
        let n = removals.len() as u64;
        let share = run.spec.max_removal_share;
        let too_many = n > 0
            && !allow_removals
            && (run.model_rows == 0 || n as f64 > share * run.confirmed as f64);
        if too_many {
            let why = if run.model_rows == 0 {
                format!(
                    "the model returned no rows, so this run would remove all {n} contacts it confirmed"
                )
            } else {
                format!(
                    "this run would remove {n} of the {} contacts the sync confirmed ({:.1} %), more than max_removal_share ({:.1} %)",
                    run.confirmed,
                    100.0 * n as f64 / run.confirmed.max(1) as f64,
                    100.0 * share
                )
            };
            run.counts.error = Some(format!(
                "{why}; nothing was removed. If the model is right, run again with --allow-removals \
                 (or raise max_removal_share for sync {})",
                run.spec.name
            ));
        } else {
            run.changes.extend(removals);
        }
        self.flush(run).await
    }

    async fn take(
        &self,
        run: &mut RunState<'_>,
        group: (DiffRow, usize),
    ) -> Result<(), ExtractError> {
        if !run.only.is_empty() && !group.0.key.as_ref().is_some_and(|k| run.only.contains(k)) {
            return Ok(());
        }
        let decision = decide_group(run.spec, run.run_id, group, &mut run.null_keys);
        tally(&mut run.counts, &decision);
        match decision {
            Decision::Change(mut change) => {
                run.installation.clone_into(&mut change.installation);
                if run.hold(&change) {
                    run.held.push(change);
                } else {
                    run.changes.push(change);
                }
            }
            Decision::Invalid { key, reason, .. } => run.invalid.push(
                Outcome::new(
                    &run.spec.name,
                    run.run_id,
                    &key,
                    "",
                    OutcomeStatus::Invalid,
                    "none",
                )
                .with_installation(run.installation)
                .with_reason(reason),
            ),
            Decision::Unchanged | Decision::RemovedKept | Decision::Nothing | Decision::Parked => {}
        }
        if run.changes.len() >= EMIT_BATCH || run.invalid.len() >= EMIT_BATCH {
            self.flush(run).await?;
        }
        Ok(())
    }

    /// Notes the batch as emitted, then publishes it: the state row of a key is written before
    /// any outcome for it can arrive.
    async fn flush(&self, run: &mut RunState<'_>) -> Result<(), ExtractError> {
        if !run.changes.is_empty() {
            let emitted: Vec<(String, String)> = run
                .changes
                .iter()
                .map(|c| (c.key.clone(), c.fingerprint.clone()))
                .collect();
            self.warehouse
                .mark_emitted(&run.spec.name, run.run_id, &emitted)
                .await?;
            for change in run.changes.drain(..) {
                publish::change(&*self.bus, &change).await?;
            }
        }
        if !run.invalid.is_empty() {
            self.warehouse.record_outcomes(&run.invalid).await?;
            run.invalid.clear();
        }
        Ok(())
    }
}

struct RunState<'a> {
    /// When not empty, the only keys this run is about.
    only: HashSet<String>,
    spec: &'a SyncSpec,
    run_id: i64,
    installation: &'a str,
    counts: ExtractCounts,
    /// Changes waiting to be noted and published (at most a batch).
    changes: Vec<RowChange>,
    invalid: Vec<Outcome>,
    null_keys: usize,
    /// Removals, and re-keys that would remove an old contact: sent once the model is read.
    held: Vec<RowChange>,
    /// The emails this run writes (identified by email), as 64-bit hashes, noted only when
    /// removals and re-keys are held (`behavior = "mirror"`): a held removal of one of them is
    /// not sent. About 16 bytes per write.
    written_emails: HashSet<u64>,
    hasher: RandomState,
    /// Keys Loops has confirmed for the sync, and rows the model returned.
    confirmed: u64,
    model_rows: u64,
}

impl RunState<'_> {
    fn email_hash(&self, email: &str) -> u64 {
        self.hasher.hash_one(email)
    }

    /// Notes the email the change writes; says whether to hold the change back.
    fn hold(&mut self, change: &RowChange) -> bool {
        if change.kind == ChangeKind::Removed {
            return self.spec.behavior == Behavior::Mirror;
        }
        if self.spec.identify_by != IdentifyBy::Email {
            return false;
        }
        let email = self
            .spec
            .property("email")
            .and_then(|p| change.values.get(&p.column).cloned().flatten())
            .map(|e| normalize_email(&e))
            .filter(|e| !e.is_empty());
        let rekey = self.spec.behavior == Behavior::Mirror
            && change.kind == ChangeKind::Changed
            && change
                .confirmed_email
                .as_deref()
                .map(normalize_email)
                .is_some_and(|old| Some(&old) != email.as_ref());
        // Only a held change ever asks, and only mirror holds changes.
        if let Some(email) = email
            && self.spec.behavior == Behavior::Mirror
        {
            self.written_emails.insert(self.email_hash(&email));
        }
        rekey
    }
}

#[async_trait]
impl Handler for ExtractorStage {
    type Error = ExtractError;

    async fn handle(&self, info: &DeliveryInfo, payload: &Bytes) -> Result<(), ExtractError> {
        let request: RunRequest = codec::decode(payload)?;
        let Some(sync) = self
            .warehouse
            .claim_run(request.run_id, info.attempt > 1)
            .await?
        else {
            // Another replica has it, or it is over.
            return Ok(());
        };
        let Some(spec) = self.specs.get(&sync) else {
            self.warehouse
                .fail_run(
                    request.run_id,
                    &format!("sync {sync} is not in the extractor's config"),
                )
                .await?;
            return Ok(());
        };
        match self.extract(spec, &request).await {
            Ok(counts) => {
                self.warehouse
                    .finish_extract(request.run_id, &counts)
                    .await?;
                Ok(())
            }
            Err(error) if error.class() == ErrorClass::Permanent => {
                self.warehouse
                    .fail_run(request.run_id, &error.to_string())
                    .await?;
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    async fn give_up(
        &self,
        _info: &DeliveryInfo,
        payload: &Bytes,
        _fate: Fate,
        reason: &str,
    ) -> Result<(), ExtractError> {
        let request: RunRequest = codec::decode(payload)?;
        self.warehouse.fail_run(request.run_id, reason).await?;
        Ok(())
    }
}

/// Applies outcomes to the warehouse, a batch per transaction. Its worker never gives up on a
/// retryable error (a warehouse outage is waited out, however long); while the warehouse
/// fails, it says so once a minute ([`OUTAGE_LOG_EVERY`]).
pub struct Checkpointer {
    warehouse: Arc<dyn Warehouse>,
    failing: std::sync::Mutex<Failing>,
}

/// How often the checkpointer says that it cannot record outcomes.
pub const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Since when recording outcomes fails, and which messages wait.
#[derive(Default)]
struct Failing {
    since: Option<(std::time::SystemTime, tokio::time::Instant)>,
    last_said: Option<tokio::time::Instant>,
    /// The deliveries (by sequence) that failed since, and have not landed yet.
    waiting: HashSet<u64>,
}

impl Checkpointer {
    pub fn new(warehouse: Arc<dyn Warehouse>) -> Checkpointer {
        Checkpointer {
            warehouse,
            failing: std::sync::Mutex::new(Failing::default()),
        }
    }

    fn note(&self, batch: &[(DeliveryInfo, Bytes)], result: &Result<(), ExtractError>) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                for (info, _) in batch {
                    failing.waiting.remove(&info.sequence);
                }
                if failing.waiting.is_empty()
                    && let Some((since, started)) = failing.since.take()
                {
                    failing.last_said = None;
                    tracing::warn!(
                        since = %humantime_utc(since),
                        "the checkpointer records outcomes again after {}s of failures",
                        started.elapsed().as_secs()
                    );
                }
            }
            Err(error) if error.class().is_retryable() => {
                let now = tokio::time::Instant::now();
                failing
                    .since
                    .get_or_insert((std::time::SystemTime::now(), now));
                failing
                    .waiting
                    .extend(batch.iter().map(|(i, _)| i.sequence));
                if failing
                    .last_said
                    .is_none_or(|t| now.duration_since(t) >= OUTAGE_LOG_EVERY)
                {
                    failing.last_said = Some(now);
                    let (since, _) = failing.since.expect("set above");
                    tracing::warn!(
                        %error,
                        "the checkpointer cannot record outcomes (failing since {}, {} outcomes waiting); \
                         it keeps retrying, nothing is dropped",
                        humantime_utc(since),
                        failing.waiting.len()
                    );
                }
            }
            Err(_) => {}
        }
    }
}

/// A time as RFC 3339, to the second, UTC.
fn humantime_utc(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Text the warehouse takes whatever it held: NUL bytes written out.
fn printable(text: &str) -> String {
    text.replace('\0', "\\0")
}

#[async_trait]
impl BatchHandler for Checkpointer {
    type Error = ExtractError;

    async fn handle_batch(&self, batch: &[(DeliveryInfo, Bytes)]) -> Result<(), ExtractError> {
        let result = async {
            let outcomes = batch
                .iter()
                .map(|(_, payload)| codec::decode::<Outcome>(payload))
                .collect::<Result<Vec<_>, _>>()?;
            self.warehouse.record_outcomes(&outcomes).await?;
            Ok(())
        }
        .await;
        self.note(batch, &result);
        result
    }

    /// An outcome that cannot be recorded is recorded as the record's dead letter (the key
    /// written out if the warehouse refused it), so that `dlq list` shows it; one that cannot
    /// be read, under a key naming its delivery.
    async fn give_up(
        &self,
        info: &DeliveryInfo,
        payload: &Bytes,
        reason: &str,
    ) -> Result<(), ExtractError> {
        let letter = match codec::decode::<Outcome>(payload) {
            Ok(o) => Outcome::new(
                &printable(&o.sync),
                o.run_id,
                &printable(&o.key),
                "",
                OutcomeStatus::DeadLettered,
                &printable(&o.operation),
            )
            .with_installation(&o.installation)
            .with_reason(printable(&format!(
                "its outcome ({:?}) could not be recorded: {reason}",
                o.status
            ))),
            Err(_) => Outcome::new(
                loopsync_bus::sync_of(&info.subject),
                0,
                &format!("unreadable outcome #{}", info.sequence),
                "",
                OutcomeStatus::DeadLettered,
                "none",
            )
            .with_reason(printable(&format!(
                "an outcome could not be read: {reason}"
            ))),
        };
        self.warehouse.record_outcomes(&[letter]).await?;
        tracing::error!(
            subject = info.subject,
            reason,
            "an outcome could not be recorded; it is a dead letter (loopsync dlq list)"
        );
        Ok(())
    }
}

/// What a run is asked to do beyond the whole sync.
#[derive(Debug, Clone, Default)]
pub struct RunAsk {
    /// When not empty, only these keys (`loopsync dlq replay`).
    pub only_keys: Vec<String>,
    /// The requests the caller made to Loops to prepare the run.
    pub preflight: RequestCounts,
    /// Send removals beyond the sync's `max_removal_share` (`--allow-removals`).
    pub allow_removals: bool,
}

/// Starts a run of `sync`: the run's row (with the requests the caller made to Loops to
/// prepare it, its `preflight`), then the request that one extractor takes. Fails with
/// [`WarehouseError::RunInProgress`] while another run of the sync is in progress. Whoever
/// asks must then wait for the run ([`wait_for_run`]): the wait is the run's sign of life.
pub async fn request_run(
    bus: &dyn Bus,
    warehouse: &dyn Warehouse,
    sync: &str,
    ask: RunAsk,
) -> Result<i64, ExtractError> {
    let RunAsk {
        only_keys,
        preflight,
        allow_removals,
    } = ask;
    let installation = warehouse.installation().await?;
    let run_id = warehouse.create_run(sync).await?;
    if !preflight.is_empty() {
        warehouse.record_preflight(run_id, &preflight).await?;
    }
    publish::run_request(
        bus,
        &RunRequest {
            v: VERSION,
            sync: sync.to_owned(),
            run_id,
            only_keys,
            installation,
            allow_removals,
        },
    )
    .await?;
    Ok(run_id)
}

/// Waits until every record of the run has an outcome (or the run failed), saying every
/// [`loopsync_warehouse::HEARTBEAT`] that the run's process is alive. Retryable warehouse
/// errors are waited out; no deadline, no progress lines (see [`wait_for_run_with`]).
pub async fn wait_for_run(
    warehouse: &dyn Warehouse,
    run_id: i64,
    poll: Duration,
) -> Result<RunSummary, ExtractError> {
    let options = WaitOptions {
        poll,
        ..WaitOptions::default()
    };
    wait_for_run_with(warehouse, run_id, &options, |_| {}).await
}

/// How [`wait_for_run_with`] waits.
#[derive(Debug, Clone)]
pub struct WaitOptions {
    /// How often the run is read.
    pub poll: Duration,
    /// How often a progress line is handed to the caller; `None`: never.
    pub progress_every: Option<Duration>,
    /// Give up when the run has made no progress (no new outcome, no change of phase) for this
    /// long; `None`: wait forever.
    pub stall_timeout: Option<Duration>,
}

impl Default for WaitOptions {
    fn default() -> Self {
        WaitOptions {
            poll: Duration::from_millis(100),
            progress_every: None,
            stall_timeout: None,
        }
    }
}

/// A run that made no progress for `WaitOptions::stall_timeout`.
#[derive(Debug, thiserror::Error)]
#[error(
    "run {run_id} of sync {sync} made no progress for {secs} s (phase: {status}; waiting for \
     {waiting}); it was given up{closed}. Its records are retried by the next run",
    secs = stalled_for.as_secs()
)]
pub struct Stalled {
    pub run_id: i64,
    pub sync: String,
    pub status: String,
    pub waiting: String,
    pub stalled_for: Duration,
    /// ", and closed as failed" when the warehouse answered.
    pub closed: String,
}

/// What the run waits for in its phase.
fn waiting_for(
    run: Option<&RunSummary>,
    failing: Option<&(std::time::SystemTime, String)>,
) -> String {
    let phase = match run {
        None => "the run to be read from the warehouse".to_owned(),
        Some(r) => match r.status {
            RunStatus::Requested => "an extractor to take the run request".to_owned(),
            RunStatus::Extracting => "the extractor to finish reading the model".to_owned(),
            _ => match r.expected {
                Some(expected) => format!(
                    "the outcomes of {} of its {expected} records (loader, checkpointer)",
                    (expected - r.records).max(0)
                ),
                None => "its outcomes".to_owned(),
            },
        },
    };
    match failing {
        Some((since, error)) => format!(
            "{phase}; the warehouse fails since {}: {error}",
            humantime_utc(*since)
        ),
        None => phase,
    }
}

/// One progress line of a run.
fn progress_line(
    run_id: i64,
    run: Option<&RunSummary>,
    failing: Option<&(std::time::SystemTime, String)>,
) -> String {
    let mut line = match run {
        None => format!("run {run_id}: waiting"),
        Some(r) => format!(
            "run {run_id} of {}: {}, {}/{} records with an outcome, {} confirmed, {} rejected",
            r.sync,
            r.status,
            r.records,
            r.expected.map_or_else(|| "?".to_owned(), |e| e.to_string()),
            r.confirmed,
            r.rejected + r.dead_lettered,
        ),
    };
    if let Some((since, error)) = failing {
        line.push_str(&format!(
            "; the warehouse fails since {} ({error})",
            humantime_utc(*since)
        ));
    }
    line
}

/// [`wait_for_run`], with progress lines (handed to `progress`) and a no-progress deadline,
/// after which the run is closed `failed` (if the warehouse answers) and [`ExtractError::Stalled`]
/// is returned.
pub async fn wait_for_run_with(
    warehouse: &dyn Warehouse,
    run_id: i64,
    options: &WaitOptions,
    mut progress: impl FnMut(String),
) -> Result<RunSummary, ExtractError> {
    use tokio::time::Instant;
    let start = Instant::now();
    let mut last_heartbeat: Option<Instant> = None;
    let mut last_line = start;
    let mut last_change = start;
    let mut seen: Option<(RunStatus, i64)> = None;
    let mut last: Option<RunSummary> = None;
    // Since when the warehouse fails, and how.
    let mut failing: Option<(std::time::SystemTime, String)> = None;
    let mut last_warned: Option<Instant> = None;
    loop {
        let read = async {
            if last_heartbeat.is_none_or(|t| t.elapsed() >= loopsync_warehouse::HEARTBEAT) {
                warehouse.heartbeat(run_id).await?;
                last_heartbeat = Some(Instant::now());
            }
            warehouse.finish_if_complete(run_id).await?;
            warehouse.run(run_id).await
        }
        .await;
        match read {
            Ok(run) => {
                if failing.take().is_some() {
                    tracing::warn!(run_id, "the warehouse answers again");
                }
                if let Some(run) = run {
                    if run.is_finished() {
                        return Ok(run);
                    }
                    let now = (run.status, run.records);
                    if seen.as_ref() != Some(&now) {
                        seen = Some(now);
                        last_change = Instant::now();
                    }
                    last = Some(run);
                }
            }
            Err(error) if error.class().is_retryable() => {
                let since = failing
                    .take()
                    .map_or_else(std::time::SystemTime::now, |(since, _)| since);
                if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(run_id, %error, "waiting for a run: the warehouse fails; retrying");
                    last_warned = Some(Instant::now());
                }
                failing = Some((since, error.to_string()));
            }
            Err(error) => return Err(error.into()),
        }
        if let Some(every) = options.progress_every
            && last_line.elapsed() >= every
        {
            progress(progress_line(run_id, last.as_ref(), failing.as_ref()));
            last_line = Instant::now();
        }
        if let Some(limit) = options.stall_timeout
            && last_change.elapsed() >= limit
        {
            let waiting = waiting_for(last.as_ref(), failing.as_ref());
            let mut stalled = Stalled {
                run_id,
                sync: last.as_ref().map_or_else(String::new, |r| r.sync.clone()),
                status: last
                    .as_ref()
                    .map_or_else(|| "unknown".to_owned(), |r| r.status.to_string()),
                waiting,
                stalled_for: last_change.elapsed(),
                closed: String::new(),
            };
            let reason = format!(
                "no progress for {} s (phase: {}; waiting for {})",
                stalled.stalled_for.as_secs(),
                stalled.status,
                stalled.waiting
            );
            if tokio::time::timeout(Duration::from_secs(15), warehouse.fail_run(run_id, &reason))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                stalled.closed = ", and closed as failed".to_owned();
            }
            return Err(ExtractError::Stalled(Box::new(stalled)));
        }
        let pause = if failing.is_some() {
            options.poll.max(Duration::from_secs(1))
        } else {
            options.poll
        };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use loopsync_bus::worker::BatchHandler;

    use super::*;

    fn info(sequence: u64) -> DeliveryInfo {
        DeliveryInfo {
            subject: "t.checkpointer.users".into(),
            attempt: 1,
            sequence,
        }
    }

    /// An outcome PostgreSQL refuses (a NUL byte in its key) fails its batch for good (so the
    /// worker splits the batch), and, given up, is recorded as a dead letter that `dlq list`
    /// (which reads `rejections`) shows.
    #[tokio::test]
    async fn an_outcome_that_cannot_be_recorded_is_a_dead_letter_dlq_list_shows() {
        let Some(db) = loopsync_testkit::TestDatabase::create().await else {
            return;
        };
        let warehouse: Arc<dyn Warehouse> = Arc::new(
            loopsync_warehouse::PgWarehouse::connect(&db.url)
                .await
                .unwrap(),
        );
        warehouse.prepare().await.unwrap();
        let run_id = warehouse.create_run("users").await.unwrap();
        let checkpointer = Checkpointer::new(warehouse.clone());
        let outcome = |key: &str| {
            Bytes::from(codec::encode(&Outcome::new(
                "users",
                run_id,
                key,
                "fp",
                OutcomeStatus::Confirmed,
                "upsert",
            )))
        };
        let bad = outcome("bad\0key");
        let batch = [(info(1), outcome("good")), (info(2), bad.clone())];
        let error = checkpointer.handle_batch(&batch).await.unwrap_err();
        assert_eq!(error.class(), ErrorClass::Permanent, "{error}");
        // Alone, the good one lands.
        checkpointer.handle_batch(&batch[..1]).await.unwrap();
        checkpointer
            .give_up(&info(2), &bad, &error.to_string())
            .await
            .unwrap();
        let letters: Vec<_> = warehouse
            .rejections(Some("users"))
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.outcome == "dead_lettered")
            .collect();
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(letters[0].key, "bad\\0key");
        assert!(
            letters[0]
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("could not be recorded")),
            "{letters:?}"
        );
    }
}

#[cfg(test)]
mod held_tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::decide::tests::spec;

    /// The time in the checkpointer's and the progress lines: RFC 3339 to the second, UTC.
    #[test]
    fn times_are_rfc3339_utc_to_the_second() {
        let t = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_900);
        assert_eq!(humantime_utc(t), "2023-11-14T22:13:20Z");
    }

    fn change(key: u32, kind: ChangeKind, confirmed_email: Option<&str>) -> RowChange {
        RowChange {
            v: VERSION,
            sync: "s".into(),
            run_id: 1,
            key: key.to_string(),
            fingerprint: "f".into(),
            kind,
            values: BTreeMap::from([("email".to_owned(), Some(format!("U{key}@x.co")))]),
            confirmed_email: confirmed_email.map(str::to_owned),
            confirmed_user_id: None,
            installation: String::new(),
            generation: 0,
            keep_old_contact: false,
        }
    }

    fn state(spec: &SyncSpec) -> RunState<'_> {
        RunState {
            only: HashSet::new(),
            spec,
            run_id: 1,
            installation: "",
            counts: ExtractCounts::default(),
            changes: Vec::new(),
            invalid: Vec::new(),
            null_keys: 0,
            held: Vec::new(),
            written_emails: HashSet::new(),
            hasher: RandomState::new(),
            confirmed: 0,
            model_rows: 0,
        }
    }

    /// An upsert sync holds nothing, so it notes no email per write: a first sync's memory does
    /// not grow with its rows. A mirror sync notes a hash of each (normalized) email.
    #[test]
    fn emails_are_noted_only_where_changes_are_held() {
        let upsert = spec(Behavior::Upsert);
        let mut run = state(&upsert);
        for key in 0..1000 {
            assert!(!run.hold(&change(key, ChangeKind::Added, None)));
        }
        assert!(
            run.written_emails.is_empty(),
            "{}",
            run.written_emails.len()
        );

        let mirror = spec(Behavior::Mirror);
        let mut run = state(&mirror);
        for key in 0..1000 {
            assert!(!run.hold(&change(key, ChangeKind::Added, None)));
        }
        assert_eq!(run.written_emails.len(), 1000);
        assert!(
            run.hold(&change(5, ChangeKind::Changed, Some("old@x.co"))),
            "a re-key is held"
        );
        assert!(run.written_emails.contains(&run.email_hash("u7@x.co")));
        assert!(!run.written_emails.contains(&run.email_hash("old@x.co")));
    }
}
