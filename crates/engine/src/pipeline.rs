//! Assembles the stages: the bus (JetStream with `[nats]`, else in process), the warehouse, and
//! the workers of each stage, with one shutdown signal for all (mini-redis style: a token to
//! stop, and a join set that drains).

use std::sync::Arc;
use std::time::Duration;

use loopsync_bus::worker;
use loopsync_bus::{BusError, Connected, Coordination, Messaging, RateBudget};
use loopsync_checkpointer::Checkpointer;
use loopsync_config::Config;
use loopsync_core::spec::SyncSpec;
use loopsync_core::stage::Stage;
use loopsync_core::tuning::CHECKPOINTER_DRAIN;
use loopsync_extractor::ExtractorStage;
use loopsync_loader::LoaderStage;
use loopsync_loops_client::{ClientConfig, LoopsClient};
use loopsync_transformer::TransformerStage;
use loopsync_warehouse::Warehouse;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::EngineError;
use crate::settings;

/// A connected pipeline and its running workers.
pub struct Pipeline {
    /// The config it was connected with.
    pub config: Config,
    /// The bus every stage of this process works on.
    pub bus: Arc<dyn Messaging>,
    /// The same bus's ledger and rate budgets.
    pub coordination: Arc<dyn Coordination>,
    /// The warehouse: the models, and the syncs' state.
    pub warehouse: Arc<dyn Warehouse>,
    /// The Loops team's rate budget, shared by every process of the deployment (through NATS,
    /// or without it through the state): the loader and the preflight take their slots from it.
    pub budget: RateBudget,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), BusError>>,
    /// The checkpointer stops last, once the stages before it have (see [`Pipeline::stop`]).
    checkpointer_shutdown: CancellationToken,
    checkpointer: JoinSet<Result<(), BusError>>,
    /// The bus lives in this process's memory (no `[nats]`).
    in_memory: bool,
}

impl Pipeline {
    /// Connects to the bus and the warehouse and prepares the warehouse's tables. The workers
    /// stop taking messages as soon as `shutdown` is cancelled (the caller's signal), or when
    /// [`Pipeline::stop`] is called.
    pub async fn connect(
        config: Config,
        shutdown: CancellationToken,
    ) -> Result<Pipeline, EngineError> {
        let warehouse = loopsync_warehouse::open(&settings::warehouse_settings(&config)).await?;
        warehouse.prepare().await?;
        let installation = warehouse.installation().await?;
        let Connected {
            messaging: bus,
            coordination,
            tasks,
        } = loopsync_bus::connect(&settings::bus_settings(&config), &installation).await?;
        let budget = crate::budget::team_budget(&config, &coordination, &warehouse);
        Ok(Pipeline {
            budget,
            in_memory: config.nats.is_none(),
            config,
            bus,
            coordination,
            warehouse,
            shutdown: shutdown.child_token(),
            tasks,
            checkpointer_shutdown: CancellationToken::new(),
            checkpointer: JoinSet::new(),
        })
    }

    /// A client of the Loops the config points at.
    pub fn loops_client(&self) -> Result<LoopsClient, EngineError> {
        loops_client(&self.config)
    }

    fn specs(&self) -> Vec<SyncSpec> {
        self.config.syncs.iter().map(|s| s.spec.clone()).collect()
    }

    /// Starts one stage's worker in this process, with the settings of [`settings`].
    pub fn spawn(&mut self, stage: Stage) -> Result<(), EngineError> {
        let (bus, stop) = (self.bus.clone(), self.shutdown.clone());
        let options = settings::worker_options(&self.config, stage);
        match stage {
            Stage::Extractor => {
                let handler = Arc::new(ExtractorStage::new(
                    bus.clone(),
                    self.warehouse.clone(),
                    self.specs(),
                ));
                self.tasks
                    .spawn(worker::run(bus, stage, handler, options, stop));
            }
            Stage::Transformer => {
                let handler = Arc::new(TransformerStage::new(bus.clone(), self.specs()));
                self.tasks
                    .spawn(worker::run(bus, stage, handler, options, stop));
            }
            Stage::Loader => {
                let handler = Arc::new(LoaderStage::new(
                    bus.clone(),
                    self.coordination.clone(),
                    self.loops_client()?,
                    self.budget.clone(),
                ));
                self.tasks
                    .spawn(worker::run(bus, stage, handler, options, stop));
            }
            Stage::Checkpointer => {
                let handler = Arc::new(Checkpointer::new(self.warehouse.clone()));
                let options = settings::checkpointer_options();
                let stop = self.checkpointer_shutdown.clone();
                self.checkpointer
                    .spawn(worker::run_batched(bus, stage, handler, options, stop));
            }
        }
        Ok(())
    }

    /// Every stage in this process.
    pub fn spawn_all(&mut self) -> Result<(), EngineError> {
        for stage in Stage::ALL {
            self.spawn(stage)?;
        }
        Ok(())
    }

    /// Waits for a worker to end on its own (an error), or for `signal`.
    pub async fn serve_until(
        &mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), EngineError> {
        tokio::select! {
            () = signal => Ok(()),
            Some(result) = self.tasks.join_next() => {
                result.map_err(EngineError::WorkerPanicked)??;
                if self.shutdown.is_cancelled() {
                    // Stopped by the signal (the pipeline observes it too).
                    return Ok(());
                }
                Err(EngineError::WorkerStopped)
            }
            Some(result) = self.checkpointer.join_next() => {
                result.map_err(EngineError::WorkerPanicked)??;
                if self.shutdown.is_cancelled() {
                    // Stopped by the signal (the pipeline observes it too).
                    return Ok(());
                }
                Err(EngineError::WorkerStopped)
            }
        }
    }

    /// Stops every worker and waits for in-flight messages to be settled: the stages first,
    /// then the checkpointer, which on a bus in memory first takes the outcomes the loaders
    /// published while they wound down (for at most [`CHECKPOINTER_DRAIN`]).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        joined(&mut self.tasks).await;
        if self.in_memory && !self.checkpointer.is_empty() {
            let until = tokio::time::Instant::now() + CHECKPOINTER_DRAIN;
            while tokio::time::Instant::now() < until
                && self
                    .bus
                    .unsettled(Stage::Checkpointer)
                    .await
                    .is_ok_and(|n| n > 0)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.checkpointer_shutdown.cancel();
        joined(&mut self.checkpointer).await;
    }
}

/// Waits for every worker of `tasks` to end, saying how one ended badly.
async fn joined(tasks: &mut JoinSet<Result<(), BusError>>) {
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Err(error)) => tracing::warn!(%error, "worker ended with an error"),
            Err(error) => tracing::warn!(%error, "worker panicked"),
            Ok(Ok(())) => {}
        }
    }
}

/// A client of the Loops the config points at (`loops.base_url`, `loops.api_key`,
/// `loops.timeout_seconds`).
pub fn loops_client(config: &Config) -> Result<LoopsClient, EngineError> {
    let mut client_config =
        ClientConfig::new(config.loops.base_url.clone(), config.loops.api_key.clone());
    client_config.timeout = config.loops.timeout();
    Ok(LoopsClient::new(client_config)?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::StreamExt;
    use loopsync_bus::{LocalBus, Names};
    use loopsync_core::envelope::{RunRequest, VERSION};
    use loopsync_core::stage::Stage;
    use loopsync_extractor::ExtractorStage;

    use crate::testing::{Model, spec};

    /// The extractor notes and publishes its batches of changes (500 each) in tasks of their
    /// own while it reads on; when it returns, every change is published and noted, so the
    /// run's `expected` (counted once it returns) can never outrun the changes on the bus.
    #[tokio::test]
    async fn every_batch_is_published_when_the_extraction_returns() {
        let model = Model::new().await;
        let mut rows = String::from("INSERT INTO users (id, email) VALUES ");
        for i in 0..1_600 {
            if i > 0 {
                rows.push(',');
            }
            rows.push_str(&format!("('{i}', 'u{i}@x.co')"));
        }
        model.execute(&rows);
        let spec = spec();
        let bus = Arc::new(LocalBus::new(Names::new("t")));
        let stage = ExtractorStage::new(bus.clone(), model.warehouse.clone(), [spec.clone()]);
        let run_id = model.warehouse.create_run("s").await.unwrap();
        model.warehouse.claim_run(run_id, false).await.unwrap();
        let request = RunRequest {
            v: VERSION,
            sync: "s".into(),
            run_id,
            only_keys: vec![],
            installation: model.warehouse.installation().await.unwrap(),
            allow_removals: false,
        };
        let counts = stage.extract(&spec, &request).await.unwrap();
        assert_eq!(bus.pending(Stage::Transformer), 1_600, "{counts:?}");
        assert_eq!(counts.added, 1_600);
        // Every change noted as emitted, with the email it writes.
        let mut diff = model.warehouse.diff(&spec).await.unwrap();
        let mut noted = 0;
        while let Some(row) = diff.next().await {
            let row = row.unwrap();
            assert!(row.emitted_email.is_some(), "{:?} not noted", row.key);
            noted += 1;
        }
        assert_eq!(noted, 1_600);
    }
}
