//! A warehouse that is only read ([`Source`]) beside a state store of its own: every call about
//! state, runs and results goes to the store; the model is read from the source and its rows
//! are loaded into the store's diff session ([`Warehouse::diff_model`]), where the diff runs as
//! it does on a warehouse that holds both.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::{Outcome, RequestCounts};
use loopsync_core::spec::SyncSpec;

use crate::source::{Source, model_columns};
use crate::{
    Adoption, DestinationBinding, DiffRow, Emitted, ExtractCounts, ModelRows, RecordResult,
    RunSummary, StateReset, Unchanged, Warehouse, WarehouseError,
};

/// The model from `source`, the state in `state`.
pub struct SplitWarehouse {
    source: Arc<dyn Source>,
    state: Arc<dyn Warehouse>,
}

impl SplitWarehouse {
    pub fn new(source: Arc<dyn Source>, state: Arc<dyn Warehouse>) -> SplitWarehouse {
        SplitWarehouse { source, state }
    }

    async fn read(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        leave_out_unchanged: bool,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        let columns = model_columns(spec);
        let rows = self.source.read(spec, &columns).await?;
        self.state
            .diff_model(
                spec,
                since,
                leave_out_unchanged,
                ModelRows { columns, rows },
            )
            .await
    }
}

#[async_trait]
impl Warehouse for SplitWarehouse {
    async fn prepare(&self) -> Result<(), WarehouseError> {
        self.state.prepare().await
    }

    async fn read_only(&self) -> Result<bool, WarehouseError> {
        self.state.read_only().await
    }

    async fn check_privileges(&self) -> Result<(), WarehouseError> {
        self.state.check_privileges().await
    }

    async fn diff_since(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        self.read(spec, since, false).await
    }

    async fn diff_changes(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        self.read(spec, since, true).await
    }

    async fn note_unchanged(&self, sync: &str, rows: &[Unchanged]) -> Result<(), WarehouseError> {
        self.state.note_unchanged(sync, rows).await
    }

    async fn check_model(&self, spec: &SyncSpec) -> Result<(), WarehouseError> {
        self.source.check_model(spec, &model_columns(spec)).await
    }

    async fn cursor_watermark(
        &self,
        sync: &str,
        column: &str,
    ) -> Result<Option<i64>, WarehouseError> {
        self.state.cursor_watermark(sync, column).await
    }

    async fn create_run(&self, sync: &str) -> Result<i64, WarehouseError> {
        self.state.create_run(sync).await
    }

    async fn heartbeat(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.state.heartbeat(run_id).await
    }

    async fn installation(&self) -> Result<String, WarehouseError> {
        self.state.installation().await
    }

    async fn claim_run(
        &self,
        run_id: i64,
        redelivered: bool,
    ) -> Result<Option<String>, WarehouseError> {
        self.state.claim_run(run_id, redelivered).await
    }

    async fn mark_emitted_as(
        &self,
        sync: &str,
        run_id: i64,
        emitted: &[Emitted],
    ) -> Result<(), WarehouseError> {
        self.state.mark_emitted_as(sync, run_id, emitted).await
    }

    async fn finish_extract(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        self.state.finish_extract(run_id, counts).await
    }

    async fn adopt(
        &self,
        sync: &str,
        run_id: i64,
        records: &[Adoption],
    ) -> Result<(), WarehouseError> {
        self.state.adopt(sync, run_id, records).await
    }

    async fn park(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        self.state.park(sync, keys).await
    }

    async fn unpark(&self, sync: &str, keys: &[String]) -> Result<u64, WarehouseError> {
        self.state.unpark(sync, keys).await
    }

    async fn owners(
        &self,
        sync: &str,
        identities: &[String],
    ) -> Result<Vec<(String, Option<String>, Option<String>)>, WarehouseError> {
        self.state.owners(sync, identities).await
    }

    async fn parked(&self, sync: Option<&str>) -> Result<Vec<(String, String)>, WarehouseError> {
        self.state.parked(sync).await
    }

    async fn finish_adopt(
        &self,
        run_id: i64,
        counts: &ExtractCounts,
    ) -> Result<(), WarehouseError> {
        self.state.finish_adopt(run_id, counts).await
    }

    async fn record_preflight(
        &self,
        run_id: i64,
        counts: &RequestCounts,
    ) -> Result<(), WarehouseError> {
        self.state.record_preflight(run_id, counts).await
    }

    async fn fail_run(&self, run_id: i64, error: &str) -> Result<(), WarehouseError> {
        self.state.fail_run(run_id, error).await
    }

    async fn interrupt_run(&self, run_id: i64, why: &str) -> Result<bool, WarehouseError> {
        self.state.interrupt_run(run_id, why).await
    }

    async fn record_outcomes(&self, outcomes: &[Outcome]) -> Result<(), WarehouseError> {
        self.state.record_outcomes(outcomes).await
    }

    async fn finish_if_complete(&self, run_id: i64) -> Result<(), WarehouseError> {
        self.state.finish_if_complete(run_id).await
    }

    async fn run(&self, run_id: i64) -> Result<Option<RunSummary>, WarehouseError> {
        self.state.run(run_id).await
    }

    async fn runs(
        &self,
        sync: Option<&str>,
        limit: i64,
    ) -> Result<Vec<RunSummary>, WarehouseError> {
        self.state.runs(sync, limit).await
    }

    async fn records(&self, run_id: i64) -> Result<Vec<RecordResult>, WarehouseError> {
        self.state.records(run_id).await
    }

    async fn rejections(&self, sync: Option<&str>) -> Result<Vec<RecordResult>, WarehouseError> {
        self.state.rejections(sync).await
    }

    async fn forget_confirmed(
        &self,
        sync: &str,
        records: &[(String, String)],
    ) -> Result<u64, WarehouseError> {
        self.state.forget_confirmed(sync, records).await
    }

    async fn destination(&self, sync: &str) -> Result<Option<DestinationBinding>, WarehouseError> {
        self.state.destination(sync).await
    }

    async fn bind_destination(
        &self,
        sync: &str,
        destination: &Destination,
    ) -> Result<Option<DestinationBinding>, WarehouseError> {
        self.state.bind_destination(sync, destination).await
    }

    async fn set_destination(
        &self,
        sync: &str,
        destination: &Destination,
    ) -> Result<(), WarehouseError> {
        self.state.set_destination(sync, destination).await
    }

    async fn reset_state(&self, sync: &str) -> Result<StateReset, WarehouseError> {
        self.state.reset_state(sync).await
    }
}
