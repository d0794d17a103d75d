//! The extractor: the stage that reads the sync's state against the model.
//!
//! [`ExtractorStage`] takes a run request (exactly one extractor replica gets each), streams
//! the warehouse's diff of the model against the state, and publishes one change per added or
//! changed record; NULL and duplicate primary keys become invalid records. Memory is bounded:
//! one diff row and one batch of emitted keys at a time. (The checkpointer, which advances the
//! state on Loops' confirmations, is its own crate.)

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use loopsync_bus::worker::{DeliveryInfo, Fate, Handler};
use loopsync_bus::{BusError, Messaging, publish};
use loopsync_core::codec::{self, DecodeError};
use loopsync_core::envelope::{
    ChangeKind, OldContact, Outcome, OutcomeStatus, RowChange, RunRequest,
};
use loopsync_core::spec::{Behavior, OnRemove, SyncSpec};
use loopsync_core::value::{is_valid_email, normalize_email};
use loopsync_core::{Classified, ErrorClass};
use loopsync_warehouse::{Adoption, Emitted, ExtractCounts, Unchanged, Warehouse, WarehouseError};

pub mod decide;
pub mod held;
pub mod window;

pub use decide::{Decided, Decider, Decision};
pub use held::{Held, Settled};
pub use window::{DiffChoice, Window, choose_diff};

/// Changes noted as emitted (then published) per warehouse round trip: the extractor's memory bound.
const EMIT_BATCH: usize = 500;

/// What can go wrong extracting (or waiting for a run).
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The run was closed while it was extracted (given up by the stall timeout, interrupted):
    /// the extraction stops, publishing nothing more for it.
    #[error("run {0} is no longer extracting: it was closed meanwhile")]
    Closed(i64),
}

impl Classified for ExtractError {
    fn class(&self) -> ErrorClass {
        match self {
            ExtractError::Decode(e) => e.class(),
            ExtractError::Warehouse(e) => e.class(),
            ExtractError::Bus(e) => e.class(),
            ExtractError::Closed(_) => ErrorClass::Permanent,
        }
    }
}

/// Batches of changes noted and published at once, each on a connection of its own to the
/// warehouse ([`ExtractorStage::flush`]).
const BATCHES_IN_FLIGHT: usize = 2;

/// The extractor on the bus.
pub struct ExtractorStage {
    bus: Arc<dyn Messaging>,
    warehouse: Arc<dyn Warehouse>,
    specs: HashMap<String, SyncSpec>,
}

impl ExtractorStage {
    pub fn new(
        bus: Arc<dyn Messaging>,
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
        let started = std::time::Instant::now();
        // A sign of life while the diff runs, however long before its first row: the waiting
        // `run` counts it as progress (its stall timeout is for runs that stopped, not slow ones).
        let _alive = Alive::start(self.warehouse.clone(), request.run_id);
        let window = Window::read(&*self.warehouse, spec, !request.only_keys.is_empty()).await?;
        if let Some(diff) = window.diff {
            tracing::info!(
                sync = %spec.name,
                run_id = request.run_id,
                diff = diff.as_str(),
                why_full = window.why_full.unwrap_or(""),
                "diff chosen"
            );
        }
        // A replay reads its keys in full; a run may have the unchanged rows left out.
        let mut rows = if request.only_keys.is_empty() {
            self.warehouse.diff_changes(spec, window.since).await?
        } else {
            self.warehouse.diff_since(spec, window.since).await?
        };
        let mut run = RunState {
            spec,
            run_id: request.run_id,
            installation: &request.installation,
            counts: ExtractCounts::default(),
            changes: Vec::new(),
            invalid: Vec::new(),
            already_sent: Vec::new(),
            unchanged: Vec::new(),
            held: Held::new(spec),
            guard: decide::RemovalGuard::default(),
            publishing: Default::default(),
        };
        let read = async {
            let mut decider =
                Decider::new(spec, request.run_id).only_keys(request.only_keys.iter().cloned());
            while let Some(row) = rows.next().await {
                let row = row?;
                for decided in decider.push(row) {
                    self.take(&mut run, decided).await?;
                }
            }
            if let Some(decided) = decider.finish() {
                self.take(&mut run, decided).await?;
            }
            run.guard = decider.guard();
            run.counts = decider.into_counts();
            window.close(&mut run.counts);
            self.flush(&mut run).await?;
            self.release_held(&mut run, request.allow_removals).await
        }
        .await;
        if let Err(error) = read {
            // The batches still in flight end before the error is told: its message is tried
            // again, and no batch of this attempt may land after the next attempt's.
            run.settle_in_flight().await;
            return Err(error);
        }
        metrics::histogram!("loopsync_diff_seconds", "sync" => spec.name.clone())
            .record(started.elapsed().as_secs_f64());
        let c = &run.counts;
        for (outcome, n) in [
            ("added", c.added),
            ("changed", c.changed),
            ("removed", c.removed),
            ("unchanged", c.unchanged),
            ("invalid", c.invalid_rows),
            ("ignored", c.ignored),
        ] {
            metrics::counter!("loopsync_records_total", "sync" => spec.name.clone(), "stage" => "extractor", "outcome" => outcome)
                .increment(n.max(0) as u64);
        }
        Ok(std::mem::take(&mut run.counts))
    }

    /// Sends what was held back (see [`ExtractorStage::extract`]): what each held change
    /// becomes is [`Held::settle`]'s, the one rule `plan` shares.
    async fn release_held(
        &self,
        run: &mut RunState<'_>,
        allow_removals: bool,
    ) -> Result<(), ExtractError> {
        let held = std::mem::replace(&mut run.held, Held::new(run.spec));
        let settled = held.settle_with(&*self.warehouse).await?;
        for change in settled.released {
            // The contact now belongs to the record that claims its email or userId: the
            // record leaves the sync, and its contact stays (not unsubscribed: a row that
            // returns re-subscribes nothing).
            run.invalid.push(
                Outcome::for_change(
                    &change,
                    OutcomeStatus::Confirmed,
                    loopsync_warehouse::RELEASE,
                )
                .with_reason(held::RELEASED),
            );
        }
        run.changes.extend(settled.changes);
        match run
            .guard
            .refuses(run.spec, settled.removals.len() as u64, allow_removals)
        {
            Some(refusal) => run.counts.error = Some(refusal.for_run()),
            None => run.changes.extend(settled.removals),
        }
        self.flush(run).await?;
        run.published().await
    }

    /// Acts on one key's decision: holds, queues or notes it, publishing a batch when full.
    async fn take(
        &self,
        run: &mut RunState<'_>,
        Decided { row, decision }: Decided,
    ) -> Result<(), ExtractError> {
        match decision {
            Decision::Change(mut change) => {
                run.installation.clone_into(&mut change.installation);
                if let Some(change) = run.held.take(change) {
                    run.changes.push(change);
                }
            }
            Decision::Invalid { key, reason, .. } => run.invalid.push(Outcome::invalid(
                &run.spec.name,
                run.run_id,
                &key,
                run.installation,
                reason,
            )),
            // Noted, so that the next runs need not read it while it stays so.
            Decision::Unchanged => run.unchanged.extend(decide::unchanged_note(
                run.spec,
                &row,
                row.confirmed_fp.as_deref(),
            )),
            Decision::RemovedKept | Decision::Nothing | Decision::Parked => {}
            // Its event is in Loops: the new values are noted as the event's, so only this run
            // reports them (nothing is sent either way).
            Decision::AlreadySent { key, fingerprint } => run.already_sent.push(Adoption {
                key,
                fingerprint,
                email: row.confirmed_email,
                user_id: row.confirmed_user_id,
                unchanged: None,
            }),
        }
        if run.changes.len() >= EMIT_BATCH
            || run.invalid.len() >= EMIT_BATCH
            || run.already_sent.len() >= EMIT_BATCH
            || run.unchanged.len() >= EMIT_BATCH
        {
            self.flush(run).await?;
        }
        Ok(())
    }

    /// Notes the batch as emitted, then publishes it: the state row of a key is written before
    /// any outcome for it can arrive. The batch goes to a task of its own, noted and published
    /// while the next batches are read, [`BATCHES_IN_FLIGHT`] at most (in
    /// `scripts/bench-throughput.sh` the note of 500 changes took 38 ms of a batch's 50, on one
    /// connection). The batches' keys are distinct, and a change's place in the work queue does
    /// not order it against another record's: the loaders take them side by side.
    async fn flush(&self, run: &mut RunState<'_>) -> Result<(), ExtractError> {
        if !run.changes.is_empty() {
            let emitted: Vec<Emitted> = run.changes.iter().map(|c| emitted(run.spec, c)).collect();
            while run.publishing.len() >= BATCHES_IN_FLIGHT {
                run.published_one().await?;
            }
            let (bus, warehouse) = (self.bus.clone(), self.warehouse.clone());
            let (sync, run_id) = (run.spec.name.clone(), run.run_id);
            let changes = std::mem::take(&mut run.changes);
            run.publishing.push_back(tokio::spawn(async move {
                // A run closed meanwhile gets no more changes.
                if !warehouse.extracting(run_id).await? {
                    return Err(ExtractError::Closed(run_id));
                }
                warehouse.mark_emitted_as(&sync, run_id, &emitted).await?;
                publish::changes(&*bus, &changes).await?;
                Ok(())
            }));
        }
        if !run.already_sent.is_empty() {
            self.warehouse
                .adopt(&run.spec.name, run.run_id, &run.already_sent)
                .await?;
            run.already_sent.clear();
        }
        if !run.invalid.is_empty() {
            self.warehouse.record_outcomes(&run.invalid).await?;
            run.invalid.clear();
        }
        if !run.unchanged.is_empty() {
            self.warehouse
                .note_unchanged(&run.spec.name, &run.unchanged)
                .await?;
            run.unchanged.clear();
        }
        Ok(())
    }
}

/// The extractor's sign of life for its run, every [`loopsync_warehouse::HEARTBEAT`] while it
/// lives (see [`Warehouse::extracting`]); ends when dropped.
struct Alive(tokio::task::JoinHandle<()>);

impl Alive {
    fn start(warehouse: Arc<dyn Warehouse>, run_id: i64) -> Alive {
        Alive(tokio::spawn(async move {
            let mut tick = tokio::time::interval(loopsync_warehouse::HEARTBEAT);
            loop {
                tick.tick().await;
                // A failed note is only a missed sign of life; the extraction says what fails.
                if let Ok(false) = warehouse.extracting(run_id).await {
                    return;
                }
            }
        }))
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct RunState<'a> {
    spec: &'a SyncSpec,
    run_id: i64,
    installation: &'a str,
    /// The decider's counts once the model is read (and why the run must fail, if it must).
    counts: ExtractCounts,
    /// Changes waiting to be noted and published (at most a batch).
    changes: Vec<RowChange>,
    invalid: Vec<Outcome>,
    /// An event sync's rows sent before and changed since: (key, fingerprint, email, userId),
    /// noted as the events' current values.
    already_sent: Vec<Adoption>,
    /// Rows found unchanged, to note (see `Warehouse::note_unchanged`).
    unchanged: Vec<Unchanged>,
    /// Removals, and re-keys that would remove an old contact, with the identities this run
    /// writes: settled once the model is read.
    held: Held<'a>,
    /// What the removal guard weighs: the contacts the sync confirmed, the model's rows.
    guard: decide::RemovalGuard,
    /// The batches of changes being noted and published, oldest first
    /// ([`ExtractorStage::flush`]).
    publishing: std::collections::VecDeque<tokio::task::JoinHandle<Result<(), ExtractError>>>,
}

impl RunState<'_> {
    /// Waits until the oldest batch being noted and published is stored by the bus.
    async fn published_one(&mut self) -> Result<(), ExtractError> {
        match self.publishing.pop_front() {
            Some(publishing) => publishing.await.map_err(|e| {
                ExtractError::Bus(BusError::Publish {
                    subject: "changes".into(),
                    source: e.into(),
                })
            })?,
            None => Ok(()),
        }
    }

    /// Waits until every batch being noted and published is stored by the bus.
    async fn published(&mut self) -> Result<(), ExtractError> {
        while !self.publishing.is_empty() {
            self.published_one().await?;
        }
        Ok(())
    }

    /// Waits until every batch still in flight has ended, however it ends.
    async fn settle_in_flight(&mut self) {
        while let Some(publishing) = self.publishing.pop_front() {
            let _ = publishing.await;
        }
    }
}

impl Drop for RunState<'_> {
    /// An extraction dropped mid-way (its worker shutting down) stops its batches in flight:
    /// its message is redelivered, and no batch of it may land after the next attempt's.
    fn drop(&mut self) {
        for publishing in &self.publishing {
            publishing.abort();
        }
    }
}

/// A change as the state notes it before it is published: with the identity it writes (a
/// removal: the one it removes), so that a version whose answer is lost can be found again.
fn emitted(spec: &SyncSpec, change: &RowChange) -> Emitted {
    let value = |property: &str| {
        spec.property(property)
            .and_then(|p| change.values.get(&p.column).cloned().flatten())
    };
    let (email, user_id) = match change.kind {
        ChangeKind::Removed => (
            change.confirmed_email.clone(),
            change.confirmed_user_id.clone(),
        ),
        _ => (
            // Only an email Loops could take: a malformed one is refused before it is sent.
            value("email")
                .map(|e| normalize_email(&e))
                .filter(|e| is_valid_email(e)),
            value("userId")
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty()),
        ),
    };
    // What may be in Loops once this version is published: what was before it, unconfirmed,
    // and what it writes (or removes).
    let mut possibly_applied = change.possibly_applied.clone();
    let this = OldContact {
        email: email.clone(),
        user_id: user_id.clone(),
    };
    if (this.email.is_some() || this.user_id.is_some()) && !possibly_applied.contains(&this) {
        possibly_applied.push(this);
    }
    Emitted {
        key: change.key.clone(),
        fingerprint: change.fingerprint.clone(),
        email,
        user_id,
        unsubscribes: change.kind == ChangeKind::Removed
            && spec.behavior == Behavior::Mirror
            && spec.on_remove == OnRemove::Unsubscribe,
        possibly_applied,
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
            Err(ExtractError::Closed(run_id)) => {
                tracing::warn!(run_id, "the run was closed while it was extracted: stopped");
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
