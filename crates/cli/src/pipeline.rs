//! Assembles the stages: the bus (JetStream with `[nats]`, else in process), the warehouse, and
//! the workers of each stage, with one shutdown signal for all (mini-redis style: a token to
//! stop, and a join set that drains).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use loopsync_bus::worker::{self, BatchOptions, WorkerOptions};
use loopsync_bus::{Bus, BusError, JetStreamBus, JetStreamOptions, LocalBus};
use loopsync_config::Config;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::{RequestCounts, RequestKind};
use loopsync_core::spec::SyncSpec;
use loopsync_core::subjects::{Names, Stage};
use loopsync_extractor::{Checkpointer, ExtractorStage};
use loopsync_loader::{LoaderStage, RateBudget};
use loopsync_loops_client::{ClientConfig, LoopsClient};
use loopsync_transformer::TransformerStage;
use loopsync_warehouse::Warehouse;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Attempts of a run request: enough for the extractor to wait out a warehouse outage of some
/// ten minutes (backoff capped at 30 s), after which the run fails.
const EXTRACTOR_ATTEMPTS: u32 = 30;

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
                    // The worker gives up at max_attempts; the server is the safety net after
                    // (none for the checkpointer: see `jetstream::max_deliver`).
                    max_deliver: i64::from(config.loops.max_attempts.max(EXTRACTOR_ATTEMPTS)) + 2,
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
            config.loops.api_key.expose(),
            config.loops.requests_per_second,
        );
        Ok(Pipeline {
            budget,
            config,
            bus,
            warehouse,
            jetstream,
            // A signal stops the workers from taking messages at once (see `stop`).
            shutdown: crate::stop::token().child_token(),
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
                    max_attempts: EXTRACTOR_ATTEMPTS,
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
                let options = checkpointer_options();
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
                if self.shutdown.is_cancelled() {
                    // Stopped by the signal (the pipeline observes it too).
                    return Ok(());
                }
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

/// The checkpointer's worker. It never gives up on a retryable error: an outcome is a record
/// sent to Loops, and a warehouse outage is waited out however long it lasts (backoff capped at
/// 30 s). What cannot be recorded at all is a dead letter (`dlq list`).
pub fn checkpointer_options() -> BatchOptions {
    BatchOptions {
        max_batch: 500,
        max_wait: Duration::from_millis(50),
        worker: WorkerOptions {
            max_attempts: u32::MAX,
            ..WorkerOptions::default()
        },
    }
}

pub fn loops_client(config: &Config) -> anyhow::Result<LoopsClient> {
    let mut client_config =
        ClientConfig::new(config.loops.base_url.clone(), config.loops.api_key.clone());
    client_config.timeout = config.loops.timeout();
    Ok(LoopsClient::new(client_config)?)
}

/// What `loopsync run` asks and makes before it sends, with its requests counted for the runs
/// they serve: which Loops the config points at (`GET /v1/api-key`: the team, compared with
/// each sync's destination binding before its run is requested), and the property check
/// (`loops-api.md` §9: the client creates missing properties before the first send, as
/// Hightouch does).
///
/// The API key's team is asked once per invocation, at the start. The team's properties are
/// listed once per invocation, before the first run requested; each custom property a sync's
/// mapping needs and Loops lacks is created, with its declared type, just before the first run
/// of a sync that needs it. [`Preflight::take`] hands the requests made since the last call to
/// the run about to be requested: the team and the list go with the first run of the
/// invocation, a creation with the run of the first sync that needed it.
pub struct Preflight {
    destination: Destination,
    /// `loops.max_attempts`.
    attempts: u32,
    /// Listed before the first run that needs it.
    existing: Option<Vec<String>>,
    created: Vec<String>,
    pending: RequestCounts,
}

impl Preflight {
    /// Asks which team the API key belongs to (`GET /v1/api-key`): the destination.
    pub async fn start(
        client: &LoopsClient,
        budget: &RateBudget,
        attempts: u32,
    ) -> anyhow::Result<Preflight> {
        let mut pending = RequestCounts::default();
        let destination =
            crate::destination::configured(client, budget, attempts, &mut pending).await?;
        Ok(Preflight {
            attempts,
            destination,
            existing: None,
            created: Vec::new(),
            pending,
        })
    }

    /// The Loops the config points at: the API key's team at the base URL.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// Creates the custom properties `sync` maps that Loops lacks; returns their names. The
    /// first call lists the team's contact properties (`GET /v1/contacts/properties`).
    pub async fn ensure(
        &mut self,
        sync: &SyncSpec,
        client: &LoopsClient,
        budget: &RateBudget,
    ) -> anyhow::Result<Vec<String>> {
        if self.existing.is_none() {
            let listed = with_retries(budget, self.attempts, &mut self.pending, || {
                client.list_properties(false)
            })
            .await
            .context("listing the contact properties of the Loops team")?;
            self.existing = Some(listed.into_iter().map(|p| p.key).collect());
        }
        let existing = self.existing.as_deref().unwrap_or_default();
        let mut created = Vec::new();
        for p in &sync.properties {
            if loopsync_core::spec::default_property_kind(&p.property).is_some()
                || existing.contains(&p.property)
                || self.created.contains(&p.property)
            {
                continue;
            }
            let kind = p.kind;
            with_retries(budget, self.attempts, &mut self.pending, || {
                client.create_property(&p.property, kind)
            })
            .await
            .with_context(|| format!("creating the contact property {}", p.property))?;
            self.created.push(p.property.clone());
            created.push(p.property.clone());
        }
        Ok(created)
    }

    /// The requests made since the last call, for the run about to be requested.
    pub fn take(&mut self) -> RequestCounts {
        std::mem::take(&mut self.pending)
    }
}

/// A call to Loops outside the pipeline (the preflight, `check`, `verify`), paced, and retried
/// like the loader's: a retryable answer waits (the server's delay, or the worker's backoff)
/// and tries again, up to `attempts` (`loops.max_attempts`, as the loader). Every request sent
/// is counted in `counts` (kind preflight).
pub(crate) async fn with_retries<T, F, Fut>(
    budget: &RateBudget,
    attempts: u32,
    counts: &mut RequestCounts,
    mut call: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, loopsync_loops_client::LoopsError>>,
{
    use loopsync_core::{Classified, ErrorClass};
    let backoff = worker::Backoff::default();
    let mut attempt = 1;
    loop {
        budget.ready().await?;
        let result = call().await;
        match &result {
            Err(error) if !error.was_sent() => {}
            Err(error) => {
                counts.count(RequestKind::Preflight, attempt > 1, error.is_rate_limited())
            }
            Ok(_) => counts.count(RequestKind::Preflight, attempt > 1, false),
        }
        match result {
            Err(error) if attempt < attempts && error.class().is_retryable() => {
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

#[cfg(test)]
mod tests {
    use loopsync_core::spec::{Behavior, IdentifyBy, MappedProperty, OnRemove};
    use loopsync_core::value::PropertyKind;
    use loopsync_loops_client::ApiKey;
    use loopsync_simulator::{Faults, SimConfig};

    use super::*;

    /// However long the warehouse is away, the checkpointer's outcomes wait (nak, backoff
    /// capped at 30 s): never dead-lettered for a retryable error.
    #[test]
    fn the_checkpointer_never_gives_up_on_a_retryable_error() {
        let options = checkpointer_options().worker;
        for attempt in [1, 20, 21, 1_000, 1_000_000] {
            match worker::settle(
                Err((loopsync_core::ErrorClass::RETRY, "warehouse down".into())),
                attempt,
                &options,
            ) {
                worker::Settle::Nak(delay) => assert!(delay <= Duration::from_secs(30)),
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
    }

    fn spec(name: &str, properties: &[(&str, PropertyKind)]) -> SyncSpec {
        SyncSpec {
            name: name.into(),
            model: "select 1".into(),
            primary_key: "id".into(),
            identify_by: IdentifyBy::Email,
            behavior: Behavior::Upsert,
            on_remove: OnRemove::Delete,
            trigger_workflows: false,
            event_on_create: "c".into(),
            event_on_update: "u".into(),
            properties: properties
                .iter()
                .map(|(p, kind)| MappedProperty {
                    property: (*p).into(),
                    column: p.to_lowercase(),
                    kind: *kind,
                })
                .collect(),
            lists: vec![],
            max_removal_share: loopsync_core::spec::DEFAULT_MAX_REMOVAL_SHARE,
        }
    }

    /// The preflight's requests, counted and handed to the runs they serve: the API key's
    /// team, the list and the first sync's creations to its run, the second sync's new creation to its own; retries
    /// and 429s counted too, and the total is what the simulator saw.
    #[tokio::test]
    async fn preflight_requests_go_with_the_runs_they_serve() {
        let sim = loopsync_simulator::spawn(SimConfig::default())
            .await
            .unwrap();
        let client = LoopsClient::new(ClientConfig::new(
            sim.base_url(),
            ApiKey::new("test-key").unwrap(),
        ))
        .unwrap();
        let budget = RateBudget::local(1000);
        // The dice (seeded) answer the list 429 before letting it through.
        sim.set_faults(Faults {
            rate_limit_429: 0.6,
            seed: Some(4),
            endpoints: vec!["GET /v1/contacts/properties".into()],
            ..Faults::default()
        })
        .unwrap();
        let mut preflight = Preflight::start(&client, &budget, 5).await.unwrap();
        assert_eq!(
            preflight.destination(),
            &Destination::new(Some("Simulated Team".into()), &sim.base_url())
        );
        let users = spec(
            "users",
            &[
                ("email", PropertyKind::String),
                ("planName", PropertyKind::String),
                ("seats", PropertyKind::Number),
            ],
        );
        let teams = spec(
            "teams",
            &[
                ("seats", PropertyKind::Number),
                ("region", PropertyKind::String),
            ],
        );
        let created = preflight.ensure(&users, &client, &budget).await.unwrap();
        assert_eq!(created, ["planName", "seats"]);
        let first = preflight.take();
        assert!(first.rate_limited > 0, "{first:?}");
        assert_eq!(
            first.preflight,
            1 + first.rate_limited + 1 + 2,
            "the API key's team, the list (each 429 tried again), two creations"
        );
        assert_eq!(first.retries, first.rate_limited);
        let created = preflight.ensure(&teams, &client, &budget).await.unwrap();
        assert_eq!(created, ["region"], "seats exists now");
        let second = preflight.take();
        assert_eq!(
            second,
            RequestCounts {
                preflight: 1,
                ..RequestCounts::default()
            }
        );
        assert_eq!(preflight.take(), RequestCounts::default());
        let stats = sim.stats();
        assert_eq!(
            stats.total_requests,
            u64::from(first.total() + second.total())
        );
        assert_eq!(stats.rate_limited, u64::from(first.rate_limited));
    }
}
