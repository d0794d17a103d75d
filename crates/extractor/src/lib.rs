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
use loopsync_core::envelope::{ChangeKind, Outcome, OutcomeStatus, RowChange, RunRequest, VERSION};
use loopsync_core::spec::{Behavior, SyncSpec};
use loopsync_core::{Classified, ErrorClass};
use loopsync_warehouse::{DiffRow, ExtractCounts, RunSummary, Warehouse, WarehouseError};

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

    /// Diffs and publishes; returns the counts.
    pub async fn extract(
        &self,
        spec: &SyncSpec,
        run_id: i64,
    ) -> Result<ExtractCounts, ExtractError> {
        let mut rows = self.warehouse.diff(spec).await?;
        let mut run = RunState {
            spec,
            run_id,
            counts: ExtractCounts::default(),
            changes: Vec::new(),
            invalid: Vec::new(),
            null_keys: 0,
        };
        // Rows come ordered by key: a key group is complete when the next key differs.
        let mut pending: Option<(DiffRow, usize)> = None;
        while let Some(row) = rows.next().await {
            let row = row?;
            if row.key.is_none() {
                run.null_key();
                continue;
            }
            match &mut pending {
                Some((held, n)) if held.key == row.key => *n += 1,
                _ => {
                    if let Some((held, n)) = pending.take() {
                        self.settle_key(&mut run, held, n).await?;
                    }
                    pending = Some((row, 1));
                }
            }
        }
        if let Some((held, n)) = pending.take() {
            self.settle_key(&mut run, held, n).await?;
        }
        self.flush(&mut run).await?;
        Ok(run.counts)
    }

    /// Decides one key: `n` model rows carried it (more than one: duplicate).
    async fn settle_key(
        &self,
        run: &mut RunState<'_>,
        row: DiffRow,
        n: usize,
    ) -> Result<(), ExtractError> {
        let key = row.key.clone().expect("null keys are handled before");
        let Some(values) = row.values else {
            // Confirmed before, gone from the model now. Mirror removes the contact (only those
            // this sync had confirmed: nothing else is in the state); upsert leaves it in Loops
            // and only counts it.
            if let Some(confirmed) = row.confirmed_fp {
                run.counts.removed += 1;
                if run.spec.behavior == Behavior::Mirror {
                    run.changes.push(RowChange {
                        v: VERSION,
                        sync: run.spec.name.clone(),
                        run_id: run.run_id,
                        key,
                        fingerprint: confirmed,
                        kind: ChangeKind::Removed,
                        values: Default::default(),
                        confirmed_email: row.confirmed_email,
                        confirmed_user_id: row.confirmed_user_id,
                    });
                    run.counts.expected += 1;
                    if run.changes.len() >= EMIT_BATCH {
                        self.flush(run).await?;
                    }
                }
            }
            return Ok(());
        };
        if n > 1 {
            run.invalid(
                &key,
                format!(
                    "duplicate primary key: {n} rows have {} = {key}",
                    run.spec.primary_key
                ),
            );
        } else if row.email_rows > 1 {
            let email = run
                .spec
                .property("email")
                .and_then(|p| values.get(&p.column).cloned().flatten())
                .unwrap_or_default();
            let reason = format!(
                "the email {} is on {} rows of this run: one contact cannot be two records",
                loopsync_core::value::normalize_email(&email),
                row.email_rows
            );
            run.invalid(&key, reason);
        } else {
            let fingerprint = run.spec.fingerprint(&values);
            if row.confirmed_fp.as_deref() == Some(fingerprint.as_str()) {
                run.counts.unchanged += 1;
            } else {
                let kind = if row.confirmed_fp.is_some() {
                    run.counts.changed += 1;
                    ChangeKind::Changed
                } else {
                    run.counts.added += 1;
                    ChangeKind::Added
                };
                run.changes.push(RowChange {
                    v: VERSION,
                    sync: run.spec.name.clone(),
                    run_id: run.run_id,
                    key,
                    fingerprint,
                    kind,
                    values,
                    confirmed_email: row.confirmed_email,
                    confirmed_user_id: row.confirmed_user_id,
                });
                run.counts.expected += 1;
            }
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
    spec: &'a SyncSpec,
    run_id: i64,
    counts: ExtractCounts,
    /// Changes waiting to be noted and published (at most a batch).
    changes: Vec<RowChange>,
    invalid: Vec<Outcome>,
    null_keys: usize,
}

impl RunState<'_> {
    fn invalid(&mut self, key: &str, reason: String) {
        self.invalid.push(
            Outcome::new(
                &self.spec.name,
                self.run_id,
                key,
                "",
                OutcomeStatus::Invalid,
                "none",
            )
            .with_reason(reason),
        );
        self.counts.expected += 1;
    }

    fn null_key(&mut self) {
        self.null_keys += 1;
        let key = format!("(null #{})", self.null_keys);
        let reason = format!("{} is NULL", self.spec.primary_key);
        self.invalid(&key, reason);
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
        match self.extract(spec, request.run_id).await {
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

/// Starts a run of `sync`: the run's row, then the request that one extractor takes.
pub async fn request_run(
    bus: &dyn Bus,
    warehouse: &dyn Warehouse,
    sync: &str,
) -> Result<i64, ExtractError> {
    let run_id = warehouse.create_run(sync).await?;
    publish::run_request(
        bus,
        &RunRequest {
            v: VERSION,
            sync: sync.to_owned(),
            run_id,
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
        if let Some(run) = warehouse.run(run_id).await?
            && run.is_finished()
        {
            return Ok(run);
        }
        tokio::time::sleep(poll).await;
    }
}
