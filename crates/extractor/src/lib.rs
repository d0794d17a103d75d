//! The extractor and the checkpointer: the two stages that own the sync's state.
//!
//! * [`ExtractorStage`] takes a run request (exactly one extractor replica gets each), streams
//!   the warehouse's diff of the model against the state, and publishes one change per added or
//!   changed record; NULL and duplicate primary keys become invalid records. Memory is bounded:
//!   one diff row and one batch of emitted keys at a time.
//! * [`Checkpointer`] applies outcomes to the warehouse in batches: per-record results, the
//!   confirmed fingerprint of each confirmed record, and the end of runs. The state advances
//!   only here, and only on Loops' confirmation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use loopsync_bus::worker::{BatchHandler, DeliveryInfo, Fate, Handler};
use loopsync_bus::{Bus, BusError, publish};
use loopsync_core::codec::{self, DecodeError};
use loopsync_core::envelope::{
    Outcome, OutcomeStatus, RequestCounts, RowChange, RunRequest, VERSION,
};
use loopsync_core::spec::SyncSpec;
use loopsync_core::{Classified, ErrorClass};
use loopsync_warehouse::{DiffRow, ExtractCounts, RunSummary, Warehouse, WarehouseError};

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
}

impl Classified for ExtractError {
    fn class(&self) -> ErrorClass {
        match self {
            ExtractError::Decode(e) => e.class(),
            ExtractError::Warehouse(e) => e.class(),
            ExtractError::Bus(e) => e.class(),
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
    pub async fn extract(
        &self,
        spec: &SyncSpec,
        run_id: i64,
        only_keys: &[String],
    ) -> Result<ExtractCounts, ExtractError> {
        let mut rows = self.warehouse.diff(spec).await?;
        let mut run = RunState {
            only: only_keys.iter().cloned().collect(),
            spec,
            run_id,
            counts: ExtractCounts::default(),
            changes: Vec::new(),
            invalid: Vec::new(),
            null_keys: 0,
        };
        let mut groups = KeyGroups::default();
        while let Some(row) = rows.next().await {
            for group in groups.push(row?) {
                self.take(&mut run, group).await?;
            }
        }
        if let Some(group) = groups.finish() {
            self.take(&mut run, group).await?;
        }
        self.flush(&mut run).await?;
        Ok(run.counts)
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
            Decision::Change(change) => run.changes.push(change),
            Decision::Invalid { key, reason, .. } => run.invalid.push(
                Outcome::new(
                    &run.spec.name,
                    run.run_id,
                    &key,
                    "",
                    OutcomeStatus::Invalid,
                    "none",
                )
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
    only: std::collections::HashSet<String>,
    spec: &'a SyncSpec,
    run_id: i64,
    counts: ExtractCounts,
    /// Changes waiting to be noted and published (at most a batch).
    changes: Vec<RowChange>,
    invalid: Vec<Outcome>,
    null_keys: usize,
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
        match self.extract(spec, request.run_id, &request.only_keys).await {
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

/// Applies outcomes to the warehouse, a batch per transaction.
pub struct Checkpointer {
    warehouse: Arc<dyn Warehouse>,
}

impl Checkpointer {
    pub fn new(warehouse: Arc<dyn Warehouse>) -> Checkpointer {
        Checkpointer { warehouse }
    }
}

#[async_trait]
impl BatchHandler for Checkpointer {
    type Error = ExtractError;

    async fn handle_batch(&self, batch: &[(DeliveryInfo, Bytes)]) -> Result<(), ExtractError> {
        let outcomes = batch
            .iter()
            .map(|(_, payload)| codec::decode::<Outcome>(payload))
            .collect::<Result<Vec<_>, _>>()?;
        self.warehouse.record_outcomes(&outcomes).await?;
        Ok(())
    }
}

/// Starts a run of `sync`: the run's row (with the requests the caller made to Loops to
/// prepare it, its `preflight`), then the request that one extractor takes.
pub async fn request_run(
    bus: &dyn Bus,
    warehouse: &dyn Warehouse,
    sync: &str,
    only_keys: Vec<String>,
    preflight: RequestCounts,
) -> Result<i64, ExtractError> {
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
        },
    )
    .await?;
    Ok(run_id)
}

/// Waits until every record of the run has an outcome (or the run failed).
pub async fn wait_for_run(
    warehouse: &dyn Warehouse,
    run_id: i64,
    poll: Duration,
) -> Result<RunSummary, ExtractError> {
    loop {
        warehouse.finish_if_complete(run_id).await?;
        if let Some(run) = warehouse.run(run_id).await?
            && run.is_finished()
        {
            return Ok(run);
        }
        tokio::time::sleep(poll).await;
    }
}
