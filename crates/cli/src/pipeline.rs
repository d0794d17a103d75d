//! Assembles the stages: the bus (JetStream with `[nats]`, else in process), the warehouse, and
//! the workers of each stage, with one shutdown signal for all (mini-redis style: a token to
//! stop, and a join set that drains).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use loopsync_bus::worker::{self, BatchOptions, WorkerOptions};
use loopsync_bus::{Bus, BusError, JetStreamBus, JetStreamOptions, LocalBus};
use loopsync_config::Config;
use loopsync_core::subjects::{Names, Stage};
use loopsync_extractor::{Checkpointer, ExtractorStage};
use loopsync_loader::{LoaderStage, RateBudget};
use loopsync_loops_client::{ApiKey, ClientConfig, LoopsClient, PropertyType};
use loopsync_transformer::TransformerStage;
use loopsync_warehouse::Warehouse;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A connected pipeline and its running workers.
pub struct Pipeline {
    pub config: Config,
    pub bus: Arc<dyn Bus>,
    pub warehouse: Arc<dyn Warehouse>,
    jetstream: Option<Arc<JetStreamBus>>,
    /// The Loops team's rate budget, shared through the bus by every process: the loader and
    /// the preflight take their slots from it.
    pub budget: RateBudget,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), BusError>>,
}

impl Pipeline {
    /// Connects to the bus and the warehouse and prepares the warehouse's tables.
    pub async fn connect(config: Config) -> anyhow::Result<Pipeline> {
        let warehouse = loopsync_warehouse::connect(&config.warehouse.url).await?;
        warehouse.prepare().await?;
        let (bus, jetstream): (Arc<dyn Bus>, _) = match &config.nats {
            Some(nats) => {
                let options = JetStreamOptions {
                    ack_wait: nats.ack_wait(),
                    // The worker gives up at max_attempts; the server is the safety net after.
                    max_deliver: i64::from(config.loops.max_attempts) + 2,
                    ..JetStreamOptions::default()
                };
                let js = Arc::new(
                    JetStreamBus::connect(&nats.url, Names::new(&nats.namespace), &options).await?,
                );
                (js.clone(), Some(js))
            }
            None => (Arc::new(LocalBus::default()), None),
        };
        let budget = RateBudget::shared(
            bus.clone(),
            &config.loops.api_key,
            config.loops.requests_per_second,
        );
        Ok(Pipeline {
            budget,
            config,
            bus,
            warehouse,
            jetstream,
            shutdown: CancellationToken::new(),
            tasks: JoinSet::new(),
        })
    }

    pub fn loops_client(&self) -> anyhow::Result<LoopsClient> {
        loops_client(&self.config)
    }

    fn specs(&self) -> Vec<loopsync_core::spec::SyncSpec> {
        self.config.syncs.iter().map(|s| s.spec.clone()).collect()
    }

    /// In-progress acks a third of the ack wait apart (JetStream only).
    fn progress_every(&self) -> Option<Duration> {
        self.config.nats.as_ref().map(|n| n.ack_wait() / 3)
    }

    /// Starts one stage's worker in this process.
    pub fn spawn(&mut self, stage: Stage) -> anyhow::Result<()> {
        let (bus, stop) = (self.bus.clone(), self.shutdown.clone());
        let progress_every = self.progress_every();
        match stage {
            Stage::Extractor => {
                let handler = Arc::new(ExtractorStage::new(
                    bus.clone(),
                    self.warehouse.clone(),
                    self.specs(),
                ));
                let options = WorkerOptions {
                    concurrency: 1,
                    max_attempts: 5,
                    progress_every,
                    ..WorkerOptions::default()
                };
                self.tasks
                    .spawn(worker::run(bus, stage, handler, options, stop));
            }
            Stage::Transformer => {
                let handler = Arc::new(TransformerStage::new(bus.clone(), self.specs()));
                let options = WorkerOptions {
                    concurrency: 8,
                    max_attempts: self.config.loops.max_attempts,
                    progress_every,
                    ..WorkerOptions::default()
                };
                self.tasks
                    .spawn(worker::run(bus, stage, handler, options, stop));
            }
            Stage::Loader => {
                let handler = Arc::new(LoaderStage::new(
                    bus.clone(),
                    self.loops_client()?,
                    self.budget.clone(),
                ));
                let options = WorkerOptions {
                    concurrency: self.config.loops.concurrency,
                    max_attempts: self.config.loops.max_attempts,
                    progress_every,
                    ..WorkerOptions::default()
                };
                self.tasks
                    .spawn(worker::run(bus, stage, handler, options, stop));
            }
            Stage::Checkpointer => {
                let handler = Arc::new(Checkpointer::new(self.warehouse.clone()));
                let options = BatchOptions {
                    max_batch: 500,
                    max_wait: Duration::from_millis(50),
                    worker: WorkerOptions {
                        max_attempts: 20,
                        ..WorkerOptions::default()
                    },
                };
                self.tasks
                    .spawn(worker::run_batched(bus, stage, handler, options, stop));
            }
        }
        Ok(())
    }

    /// Starts the dead-letter mover (JetStream only: the in-process bus has no advisories).
    pub fn spawn_dead_letter_mover(&mut self) {
        if let Some(js) = self.jetstream.clone() {
            let stop = self.shutdown.clone();
            self.tasks
                .spawn(async move { js.run_dead_letter_mover(stop).await });
        }
    }

    /// Every stage in this process.
    pub fn spawn_all(&mut self) -> anyhow::Result<()> {
        for stage in Stage::ALL {
            self.spawn(stage)?;
        }
        self.spawn_dead_letter_mover();
        Ok(())
    }

    /// Waits for a worker to end on its own (an error), or for `signal`.
    pub async fn serve_until(
        &mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            () = signal => Ok(()),
            Some(result) = self.tasks.join_next() => {
                result.context("a worker panicked")??;
                anyhow::bail!("a worker stopped")
            }
        }
    }

    /// Stops every worker and waits for in-flight messages to be settled.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while let Some(result) = self.tasks.join_next().await {
            match result {
                Ok(Err(error)) => tracing::warn!(%error, "worker ended with an error"),
                Err(error) => tracing::warn!(%error, "worker panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

pub fn loops_client(config: &Config) -> anyhow::Result<LoopsClient> {
    let mut client_config = ClientConfig::new(
        config.loops.base_url.clone(),
        ApiKey::new(config.loops.api_key.clone()).context("loops.api_key")?,
    );
    client_config.timeout = config.loops.timeout();
    Ok(LoopsClient::new(client_config)?)
}

/// Makes sure every custom property the mappings need exists in Loops, with its declared type
/// (`loops-api.md` §9: the client creates missing properties before the first send, as
/// Hightouch does). Returns the properties created.
pub async fn ensure_properties(
    config: &Config,
    client: &LoopsClient,
    budget: &RateBudget,
) -> anyhow::Result<Vec<String>> {
    let existing = with_retries(budget, || client.list_properties(false))
        .await
        .context("listing the contact properties of the Loops team")?;
    let mut created = Vec::new();
    for sync in &config.syncs {
        for p in &sync.spec.properties {
            if loopsync_core::spec::default_property_kind(&p.property).is_some()
                || existing.iter().any(|e| e.key == p.property)
                || created.contains(&p.property)
            {
                continue;
            }
            let kind: PropertyType = p.kind.as_str().parse().map_err(anyhow::Error::msg)?;
            with_retries(budget, || client.create_property(&p.property, kind))
                .await
                .with_context(|| format!("creating the contact property {}", p.property))?;
            created.push(p.property.clone());
        }
    }
    Ok(created)
}

/// A call to Loops outside the pipeline (the preflight), paced, and retried like the loader's:
/// a retryable answer waits (the server's delay, or the worker's backoff) and tries again, up
/// to five attempts.
pub(crate) async fn with_retries<T, F, Fut>(budget: &RateBudget, mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, loopsync_loops_client::LoopsError>>,
{
    use loopsync_core::{Classified, ErrorClass};
    const ATTEMPTS: u32 = 5;
    let backoff = worker::Backoff::default();
    let mut attempt = 1;
    loop {
        budget.ready().await?;
        match call().await {
            Err(error) if attempt < ATTEMPTS && error.class().is_retryable() => {
                let delay = match error.class() {
                    ErrorClass::Retryable { after: Some(after) } => after,
                    _ => backoff.delay(attempt),
                };
                tracing::info!(%error, ?delay, "retrying a Loops request");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            result => return Ok(result?),
        }
    }
}
