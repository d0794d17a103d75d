//! Runs: asking for one and waiting for it (the extractor is a stage; asking for a run and
//! waiting for it is the engine's job), `run --once`'s driver (each sync's destination check,
//! its properties, its run), and the schedule follower of `run` without `--once`.

use std::sync::Arc;
use std::time::Duration;

use loopsync_bus::RateBudget;
use loopsync_bus::{Messaging, publish};
use loopsync_config::{Config, Schedule};
use loopsync_core::Classified;
use loopsync_core::envelope::{RequestCounts, RunRequest, VERSION};
use loopsync_core::time::utc_seconds;
use loopsync_core::tuning::RUN_IN_PROGRESS_WAIT;
use loopsync_loops_client::LoopsClient;
use loopsync_warehouse::{RunStatus, RunSummary, Warehouse, WarehouseError};
use tokio_util::sync::CancellationToken;

use crate::EngineError;
use crate::destination::{self, Refused};
use crate::pipeline::Pipeline;
use crate::properties::Preflight;

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
/// asks must then wait for the run ([`wait_for_run_with`]): the wait is the run's sign of life.
pub async fn request_run(
    bus: &dyn Messaging,
    warehouse: &dyn Warehouse,
    sync: &str,
    ask: RunAsk,
) -> Result<i64, EngineError> {
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

/// [`request_run`]; while another run of the sync is in progress, tries again every second for
/// up to [`RUN_IN_PROGRESS_WAIT`], saying so once: a run whose process died (killed, restarted
/// at once by a supervisor) is closed as interrupted once its lease lapses, and this one starts
/// then. A holder that is alive heartbeats: as soon as its sign of life moves, the request fails
/// as before (one run of a sync at a time), within about one heartbeat.
async fn request_outliving_a_dead_holder(
    bus: &dyn Messaging,
    warehouse: &dyn Warehouse,
    sync: &str,
    ask: RunAsk,
    observer: &mut dyn RunObserver,
) -> Result<i64, EngineError> {
    let deadline = tokio::time::Instant::now() + RUN_IN_PROGRESS_WAIT;
    let mut first_seen: Option<String> = None;
    let mut said = false;
    loop {
        match request_run(bus, warehouse, sync, ask.clone()).await {
            Err(EngineError::Warehouse(WarehouseError::RunInProgress {
                run_id,
                status,
                alive_at,
                ..
            })) if tokio::time::Instant::now() < deadline
                && first_seen.get_or_insert_with(|| alive_at.clone()) == &alive_at =>
            {
                if !said {
                    said = true;
                    observer.notice(format!(
                        "run {run_id} of sync {sync} is in progress ({status}): waiting up to \
                         {} s for it to end, or for its lease to lapse if its process died",
                        RUN_IN_PROGRESS_WAIT.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            other => return other,
        }
    }
}

/// Before anything else of `run --once` (the preflight's requests to Loops included): a sync of
/// `syncs` whose newest run is in progress is said at once; if that run's waiting process
/// shows a sign of life within a heartbeat, the run is alive and this one is refused
/// ([`WarehouseError::RunInProgress`], exit 1), having asked nothing of Loops. A holder with no
/// sign of life may have died: the request goes ahead and waits for its lease
/// ([`request_outliving_a_dead_holder`]), as before.
pub async fn refuse_a_run_in_progress(
    warehouse: &dyn Warehouse,
    syncs: &[String],
    observer: &mut dyn RunObserver,
) -> Result<(), EngineError> {
    use loopsync_warehouse::HEARTBEAT;
    for sync in syncs {
        let Some(run) = warehouse
            .runs(Some(sync), 1)
            .await?
            .into_iter()
            .next()
            .filter(|r| !r.is_finished())
        else {
            continue;
        };
        // Not yet "in progress": its process may have died (the refusal below says it is).
        observer.notice(format!(
            "run {} of sync {sync} is not finished ({}): looking for a sign of life from its \
             process (one run of a sync at a time)",
            run.id, run.status
        ));
        let deadline = tokio::time::Instant::now() + HEARTBEAT + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            match warehouse.run(run.id).await? {
                Some(now) if now.is_finished() => break,
                Some(now) if now.alive_at != run.alive_at => {
                    return Err(WarehouseError::RunInProgress {
                        sync: sync.clone(),
                        run_id: now.id,
                        status: now.status,
                        alive_at: now.alive_at.unwrap_or_default(),
                    }
                    .into());
                }
                Some(_) => {}
                None => break,
            }
        }
    }
    Ok(())
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
    /// The run given up.
    pub run_id: i64,
    /// Its sync (empty when the run was never read).
    pub sync: String,
    /// Its phase when given up.
    pub status: String,
    /// What it waited for in that phase.
    pub waiting: String,
    /// How long it made no progress.
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
            utc_seconds(*since)
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
            utc_seconds(*since)
        ));
    }
    line
}

/// The pause after the run's `reads`-th read: the first reads come sooner (10 ms, doubled each
/// time, up to `poll`), so that a small run's end is seen within milliseconds instead of a
/// whole `poll` later, and a long run is read every `poll`.
fn poll_pause(reads: u32, poll: Duration) -> Duration {
    Duration::from_millis(10)
        .saturating_mul(1u32 << reads.min(16))
        .min(poll)
}

/// The pause after a read of the run that took `took`: [`poll_pause`], but never less than
/// [`READ_SHARE`] times the read (up to [`SLOWEST_POLL`]), and never past `due`, when the next
/// read has something to do at a time (the next heartbeat, which a second `run` of the sync
/// looks for: `refuse_a_run_in_progress`; the stall timeout). A read counts the run's records,
/// so it grows with the run: at 50 000 records it took 26 ms of the warehouse's CPU, and read
/// every 100 ms it was the warehouse's largest cost in `scripts/bench-throughput.sh` (5.7 s of a
/// 33 s run, by `pg_stat_statements`), taken from the stages the run waits for.
fn pause_after(reads: u32, poll: Duration, took: Duration, due: Duration) -> Duration {
    poll_pause(reads, poll)
        .max(took.saturating_mul(READ_SHARE).min(SLOWEST_POLL.max(poll)))
        .min(due)
}

/// A run's reads take at most a tenth of the wait ([`pause_after`]).
const READ_SHARE: u32 = 9;

/// The longest pause between two reads of a run that is read slowly ([`pause_after`]).
const SLOWEST_POLL: Duration = Duration::from_secs(5);

/// Waits until every record of the run has an outcome (or the run failed), saying every
/// [`loopsync_warehouse::HEARTBEAT`] that the run's process is alive; retryable warehouse
/// errors are waited out. Progress lines go to `progress` as the options say; past the
/// no-progress deadline, the run is closed `failed` (if the warehouse answers) and
/// [`EngineError::Stalled`] is returned.
pub async fn wait_for_run_with(
    warehouse: &dyn Warehouse,
    run_id: i64,
    options: &WaitOptions,
    mut progress: impl FnMut(String),
) -> Result<RunSummary, EngineError> {
    wait_for_run_observed(warehouse, run_id, options, &mut progress, |_| {}).await
}

/// [`wait_for_run_with`], `observe` told of the run each time it is read (a progress bar).
pub async fn wait_for_run_observed(
    warehouse: &dyn Warehouse,
    run_id: i64,
    options: &WaitOptions,
    mut progress: impl FnMut(String),
    mut observe: impl FnMut(&RunSummary),
) -> Result<RunSummary, EngineError> {
    use tokio::time::Instant;
    let start = Instant::now();
    let mut last_heartbeat: Option<Instant> = None;
    let mut last_line = start;
    let mut last_change = start;
    let mut seen: Option<(RunStatus, i64, Option<String>)> = None;
    let mut last: Option<RunSummary> = None;
    // Since when the warehouse fails, and how.
    let mut failing: Option<(std::time::SystemTime, String)> = None;
    let mut last_warned: Option<Instant> = None;
    let mut reads = 0u32;
    loop {
        let read_at = Instant::now();
        let read = async {
            if last_heartbeat.is_none_or(|t| t.elapsed() >= loopsync_warehouse::HEARTBEAT) {
                warehouse.heartbeat(run_id).await?;
                last_heartbeat = Some(Instant::now());
            }
            warehouse.finish_if_complete(run_id).await?;
            warehouse.run(run_id).await
        }
        .await;
        let took = read_at.elapsed();
        match read {
            Ok(run) => {
                if failing.take().is_some() {
                    tracing::warn!(run_id, "the warehouse answers again");
                }
                if let Some(run) = run {
                    if run.is_finished() {
                        if let Some(ms) = run.duration_ms {
                            metrics::histogram!(
                                "loopsync_run_seconds",
                                "sync" => run.sync.clone(),
                                "status" => run.status.to_string()
                            )
                            .record(ms as f64 / 1000.0);
                        }
                        tracing::info!(
                            run_id, sync = %run.sync, status = %run.status,
                            records = run.records, requests = run.requests,
                            "run finished"
                        );
                        return Ok(run);
                    }
                    observe(&run);
                    // Progress: a new phase, a new outcome, or an extractor's sign of life (a
                    // slow diff returns no row for long).
                    let now = (run.status, run.records, run.extract_alive_at.clone());
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
            return Err(stalled.into());
        }
        let pause = if failing.is_some() {
            options.poll.max(Duration::from_secs(1))
        } else {
            let heartbeat = last_heartbeat.map_or(Duration::ZERO, |t| {
                loopsync_warehouse::HEARTBEAT.saturating_sub(t.elapsed())
            });
            let stall = options.stall_timeout.map_or(Duration::MAX, |limit| {
                limit.saturating_sub(last_change.elapsed())
            });
            pause_after(reads, options.poll, took, heartbeat.min(stall))
        };
        reads += 1;
        tokio::time::sleep(pause).await;
    }
}

/// Which syncs `loopsync run` runs: `only`, or every sync of the config. Following the
/// schedules (`scheduled`), at least one of them must have a schedule.
pub fn select(
    config: &Config,
    only: Option<&str>,
    scheduled: bool,
) -> Result<Vec<String>, EngineError> {
    let chosen = |name: &str| only.is_none_or(|n| n == name);
    if scheduled
        && !config
            .syncs
            .iter()
            .any(|s| s.schedule.is_some() && chosen(&s.spec.name))
    {
        return Err(EngineError::NoSchedule);
    }
    let syncs: Vec<String> = match only {
        Some(name) if config.sync(name).is_none() => {
            return Err(EngineError::UnknownSync(name.to_owned()));
        }
        Some(name) => vec![name.to_owned()],
        None => config.syncs.iter().map(|s| s.spec.name.clone()).collect(),
    };
    if syncs.is_empty() {
        return Err(EngineError::NoSync);
    }
    Ok(syncs)
}

/// What the caller is told while runs go: the binary prints these, the engine decides them.
pub trait RunObserver {
    /// A line for the user (stderr): a sync bound to a destination, properties created, a
    /// skipped schedule fire, the schedules followed.
    fn notice(&mut self, line: String);
    /// A progress line of the run waited for (stderr, with the time in front).
    fn progress(&mut self, line: String);
    /// A run was requested and is waited for from now on (the binary closes it as interrupted
    /// if the process is stopped before it ends).
    fn started(&mut self, run_id: i64);
    /// The run ended: its report.
    fn finished(&mut self, summary: &RunSummary);
    /// A sync was refused: its state belongs to another Loops; nothing was sent.
    fn refused(&mut self, refused: &Refused);
    /// The run waited for, each time it is read (about ten times a second): a progress bar.
    fn tick(&mut self, _run: &RunSummary) {}
}

/// How runs are requested and waited for.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Send removals beyond the sync's `max_removal_share` (`--allow-removals`).
    pub allow_removals: bool,
    /// How each run is waited for.
    pub wait: WaitOptions,
}

/// What became of one sync of `run --once`.
#[derive(Debug)]
pub enum SyncRun {
    /// Its run ended (done, degraded or failed: see the summary). Boxed: a summary is far
    /// larger than the other variants.
    Done(Box<RunSummary>),
    /// Refused: its state belongs to another Loops; the other syncs went on.
    Refused(Refused),
    /// Not run: what it maps is missing in Loops (a mailing list, a property's type); nothing
    /// of it was sent, the other syncs went on. Why, as said on stderr.
    Unsendable(String),
}

/// The runs of one invocation: the pipeline's warehouse, bus and budget, a client of Loops
/// and the [`Preflight`] whose requests go with the runs they serve.
pub struct Runs {
    config: Config,
    bus: Arc<dyn Messaging>,
    warehouse: Arc<dyn Warehouse>,
    budget: RateBudget,
    client: LoopsClient,
    preflight: Preflight,
    /// The API key's fingerprint in this state (`destination::key_fingerprint`).
    key_fingerprint: String,
    options: RunOptions,
}

impl Runs {
    /// Asks which team the API key belongs to (`GET /v1/api-key`): the destination each
    /// sync's state is compared with before its run, with the key's fingerprint.
    pub async fn start(pipeline: &Pipeline, options: RunOptions) -> Result<Runs, EngineError> {
        let client = pipeline.loops_client()?;
        let preflight = Preflight::start(
            &client,
            &pipeline.budget,
            pipeline.config.loops.max_attempts,
        )
        .await?;
        let key_fingerprint =
            destination::key_fingerprint(&*pipeline.warehouse, &pipeline.config.loops.api_key)
                .await?;
        Ok(Runs {
            config: pipeline.config.clone(),
            bus: pipeline.bus.clone(),
            warehouse: pipeline.warehouse.clone(),
            budget: pipeline.budget.clone(),
            client,
            preflight,
            key_fingerprint,
            options,
        })
    }

    /// [`destination::check`] of `sync` against the configured Loops and key; the requests a
    /// read-back makes go with the preflight of the run about to be requested.
    async fn check_destination(
        &mut self,
        sync: &str,
        observer: &mut dyn RunObserver,
    ) -> Result<Option<Refused>, EngineError> {
        let spec = &self
            .config
            .sync(sync)
            .ok_or_else(|| EngineError::UnknownSync(sync.to_owned()))?
            .spec;
        let (destination, counts) = self.preflight.destination_and_counts();
        let mut reader = destination::Reader {
            client: &self.client,
            budget: &self.budget,
            attempts: self.config.loops.max_attempts,
            counts,
        };
        destination::check(
            &*self.warehouse,
            spec,
            destination,
            &self.key_fingerprint,
            &mut reader,
            |line| observer.notice(line),
        )
        .await
    }

    /// The syncs among `syncs` that have a schedule, with it.
    pub fn scheduled<'a>(&'a self, syncs: &'a [String]) -> Vec<(&'a str, &'a Schedule)> {
        syncs
            .iter()
            .filter_map(|name| {
                let schedule = self.config.sync(name)?.schedule.as_ref()?;
                Some((name.as_str(), schedule))
            })
            .collect()
    }

    /// Before the schedules start: the first sync among `syncs` with a schedule whose state
    /// is bound to another destination is the refusal (the schedules do not start).
    pub async fn check_scheduled(
        &mut self,
        syncs: &[String],
        observer: &mut dyn RunObserver,
    ) -> Result<(), EngineError> {
        let scheduled: Vec<String> = self
            .scheduled(syncs)
            .into_iter()
            .map(|(sync, _)| sync.to_owned())
            .collect();
        for sync in scheduled {
            if let Some(refused) = self.check_destination(&sync, observer).await? {
                return Err(refused.into());
            }
        }
        Ok(())
    }

    /// Requests a run of `sync`, after checking that its state belongs to the configured
    /// destination (else the refusal, and nothing is sent) and creating the properties its
    /// mapping needs that Loops lacks; the run is recorded with the preflight requests made
    /// since the previous run (see [`Preflight`]).
    pub async fn request(
        &mut self,
        sync: &str,
        observer: &mut dyn RunObserver,
    ) -> Result<Result<i64, Refused>, EngineError> {
        self.request_keys(sync, Vec::new(), observer).await
    }

    /// [`Runs::request`] for a run about `only_keys` alone (`dlq replay`; empty: the whole
    /// sync). A replay creates no property: its records were sent before, by a run that did.
    pub async fn request_keys(
        &mut self,
        sync: &str,
        only_keys: Vec<String>,
        observer: &mut dyn RunObserver,
    ) -> Result<Result<i64, Refused>, EngineError> {
        if let Some(refused) = self.check_destination(sync, observer).await? {
            return Ok(Err(refused));
        }
        let spec = &self
            .config
            .sync(sync)
            .ok_or_else(|| EngineError::UnknownSync(sync.to_owned()))?
            .spec;
        let created = if only_keys.is_empty() {
            self.preflight
                .ensure(spec, &self.client, &self.budget)
                .await?
        } else {
            Vec::new()
        };
        if !created.is_empty() {
            observer.notice(format!(
                "created contact properties in Loops: {}",
                created.join(", ")
            ));
        }
        let ask = RunAsk {
            only_keys,
            preflight: self.preflight.take(),
            allow_removals: self.options.allow_removals,
        };
        let run_id =
            request_outliving_a_dead_holder(&*self.bus, &*self.warehouse, sync, ask, observer)
                .await?;
        tracing::info!(run_id, sync, "run requested");
        Ok(Ok(run_id))
    }

    /// Waits for `run_id` with the options' progress lines and no-progress deadline; once it
    /// has ended, the results older than `[warehouse] records_retention` go ([`prune`]).
    async fn wait(
        &self,
        run_id: i64,
        observer: &mut dyn RunObserver,
    ) -> Result<RunSummary, EngineError> {
        // Both closures tell the one observer: the line, then the run as read.
        let observer = std::cell::RefCell::new(observer);
        let summary = wait_for_run_observed(
            &*self.warehouse,
            run_id,
            &self.options.wait,
            |line| observer.borrow_mut().progress(line),
            |run| observer.borrow_mut().tick(run),
        )
        .await?;
        prune(&*self.warehouse, &self.config).await;
        Ok(summary)
    }

    /// `run --once`: one run of each of `syncs`, one after the other. A refused sync is
    /// reported and skipped (the others go on); any other failure ends it. `shutdown`
    /// cancelled: [`EngineError::Stopped`].
    pub async fn once(
        &mut self,
        syncs: &[String],
        observer: &mut dyn RunObserver,
        shutdown: &CancellationToken,
    ) -> Result<Vec<SyncRun>, EngineError> {
        let jobs = syncs.iter().map(|sync| (sync.clone(), Vec::new()));
        self.each(jobs, observer, shutdown).await
    }

    /// One run per `(sync, keys)`, one after the other, each about those keys only (empty: the
    /// whole sync): [`Runs::once`], and `dlq replay`.
    pub async fn each(
        &mut self,
        jobs: impl IntoIterator<Item = (String, Vec<String>)>,
        observer: &mut dyn RunObserver,
        shutdown: &CancellationToken,
    ) -> Result<Vec<SyncRun>, EngineError> {
        let mut runs = Vec::new();
        for (sync, keys) in jobs {
            let started = tokio::select! {
                started = self.request_keys(&sync, keys, observer) => started,
                () = shutdown.cancelled() => return Err(EngineError::Stopped),
            };
            let started = match started {
                // What it maps is missing in Loops: nothing of it is sent; the others go on.
                Err(EngineError::Unsendable { sync, problems }) => {
                    let error = EngineError::Unsendable { sync, problems };
                    observer.notice(format!("error: {error}"));
                    runs.push(SyncRun::Unsendable(error.to_string()));
                    continue;
                }
                other => other?,
            };
            let run_id = match started {
                Ok(run_id) => run_id,
                Err(refused) => {
                    observer.refused(&refused);
                    runs.push(SyncRun::Refused(refused));
                    continue;
                }
            };
            observer.started(run_id);
            let summary = tokio::select! {
                summary = self.wait(run_id, observer) => summary?,
                () = shutdown.cancelled() => return Err(EngineError::Stopped),
            };
            observer.finished(&summary);
            runs.push(SyncRun::Done(Box::new(summary)));
        }
        Ok(runs)
    }

    /// Without `--once`: each of `syncs` with a `schedule` is run when its cron expression
    /// says (UTC), one run at a time; a fire time that passes while a run is in progress is
    /// not made up for. A refusal or another run in progress skips that fire, a stalled run is
    /// given up, and the schedules go on. Returns when `shutdown` is cancelled.
    pub async fn follow_schedules(
        &mut self,
        syncs: &[String],
        observer: &mut dyn RunObserver,
        shutdown: &CancellationToken,
    ) -> Result<(), EngineError> {
        let schedules: Vec<(String, Schedule)> = self
            .scheduled(syncs)
            .into_iter()
            .map(|(name, schedule)| (name.to_owned(), schedule.clone()))
            .collect();
        observer.notice(format!(
            "following the schedules of {} (Ctrl-C or SIGTERM to stop)",
            schedules
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let mut fires = Fires::new(schedules, chrono::Utc::now());
        // The sync that fired last: its next fire is after its run ends.
        let mut fired: Option<String> = None;
        loop {
            if let Some(name) = fired.take() {
                fires.fired(&name, chrono::Utc::now());
            }
            let now = chrono::Utc::now();
            let (due, name) = fires.due().ok_or(EngineError::NoNextOccurrence)?;
            let name = name.to_owned();
            let name = name.as_str();
            fired = Some(name.to_owned());
            let wait = (due - now).to_std().unwrap_or_default();
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            let started = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                started = self.request(name, observer) => started,
            };
            let run_id = match started {
                Ok(Ok(run_id)) => run_id,
                Ok(Err(refused)) => {
                    // Bound elsewhere since the schedules started (an adopt from another
                    // config): this fire is skipped, the next one checks again.
                    observer.refused(&refused);
                    continue;
                }
                // Another process runs this sync now (a second scheduler, a replay), or what
                // it maps is missing in Loops (checked again at the next fire): skip.
                Err(error)
                    if error.is_run_in_progress()
                        || matches!(error, EngineError::Unsendable { .. }) =>
                {
                    observer.notice(format!(
                        "{}: schedule of {name}: {error}; skipped",
                        chrono::Utc::now()
                    ));
                    continue;
                }
                Err(error) => return Err(error),
            };
            observer.started(run_id);
            let summary = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                summary = self.wait(run_id, observer) => match summary {
                    Ok(summary) => summary,
                    // A stalled run is given up; the schedules go on.
                    Err(error @ EngineError::Stalled(_)) => {
                        observer.notice(format!("{}: error: {error}", chrono::Utc::now()));
                        continue;
                    }
                    Err(error) => return Err(error),
                },
            };
            observer.finished(&summary);
        }
    }
}

/// The end of a run: the per-record results and attempts of the runs requested longer than
/// `[warehouse] records_retention` ago are deleted, of every sync (one place, for both
/// stores: [`Warehouse::prune_records`]). A failure is said in the log and leaves them for the
/// next run: the run itself is done.
pub async fn prune(warehouse: &dyn Warehouse, config: &Config) {
    match warehouse
        .prune_records(config.warehouse.records_retention)
        .await
    {
        Ok(0) => {}
        Ok(pruned) => tracing::info!(pruned, "results past the records retention deleted"),
        Err(error) => tracing::warn!(%error, "cannot delete the results past the retention"),
    }
}

/// Each scheduled sync's next fire. Syncs due at the same time run one after the other (none
/// is lost); a sync's own fire that passes while its run is in progress is not made up for.
pub struct Fires {
    /// `(next fire, sync)`, `None` when its schedule fires no more.
    next: Vec<(Option<chrono::DateTime<chrono::Utc>>, String, Schedule)>,
}

impl Fires {
    /// Each schedule's first fire strictly after `now`.
    pub fn new(schedules: Vec<(String, Schedule)>, now: chrono::DateTime<chrono::Utc>) -> Fires {
        Fires {
            next: schedules
                .into_iter()
                .map(|(name, schedule)| (schedule.next_after(now), name, schedule))
                .collect(),
        }
    }

    /// The earliest due fire, and whose (the earliest name on a tie).
    pub fn due(&self) -> Option<(chrono::DateTime<chrono::Utc>, &str)> {
        self.next
            .iter()
            .filter_map(|(at, name, _)| at.map(|at| (at, name.as_str())))
            .min()
    }

    /// `sync` fired and its run is over at `now`: its next fire is the first after both.
    pub fn fired(&mut self, sync: &str, now: chrono::DateTime<chrono::Utc>) {
        for (at, name, schedule) in &mut self.next {
            if name == sync {
                let from = at.map_or(now, |due| due.max(now));
                *at = schedule.next_after(from);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    /// A run's syncs: the one asked for, or all; following schedules needs one that has one.
    #[test]
    fn select_names_the_syncs_of_a_run() {
        let sync = |name: &str, schedule: &str| {
            format!(
                "[[sync]]\nname = \"{name}\"\nmodel = \"select 1\"\nprimary_key = \"id\"\n\
                 identify_by = \"email\"\n{schedule}\n[sync.mapping]\nemail = \"email\"\n"
            )
        };
        let head = "[warehouse]\nurl = \"sqlite:///w.db\"\n[loops]\napi_key = \"k\"\n";
        let text = format!(
            "{head}{}{}",
            sync("users", "schedule = \"*/15 * * * *\""),
            sync("teams", "")
        );
        let config = Config::parse(&text, |_| None).unwrap();
        assert_eq!(select(&config, None, false).unwrap(), ["users", "teams"]);
        assert_eq!(select(&config, None, true).unwrap(), ["users", "teams"]);
        assert_eq!(select(&config, Some("teams"), false).unwrap(), ["teams"]);
        assert!(matches!(
            select(&config, Some("teams"), true),
            Err(EngineError::NoSchedule)
        ));
        assert!(matches!(
            select(&config, Some("nobody"), false),
            Err(EngineError::UnknownSync(name)) if name == "nobody"
        ));
        let empty = Config::parse(head, |_| None).unwrap();
        assert!(matches!(
            select(&empty, None, false),
            Err(EngineError::NoSync)
        ));
        assert!(EngineError::NoSchedule.is_usage() && EngineError::NoSync.is_usage());
    }

    /// The follower sleeps until the first fire among the schedules, strictly after now.
    #[test]
    fn the_next_fire_is_the_earliest_of_the_schedules() {
        let schedules = vec![
            ("hourly".to_owned(), Schedule::parse("0 * * * *").unwrap()),
            (
                "quarter".to_owned(),
                Schedule::parse("*/15 * * * *").unwrap(),
            ),
        ];
        let at = |h, m| chrono::Utc.with_ymd_and_hms(2026, 1, 2, h, m, 0).unwrap();
        let first = |now| {
            Fires::new(schedules.clone(), now)
                .due()
                .map(|(t, n)| (t, n.to_owned()))
        };
        assert_eq!(first(at(3, 4)), Some((at(3, 15), "quarter".to_owned())));
        assert_eq!(first(at(3, 50)), Some((at(4, 0), "hourly".to_owned())));
        assert_eq!(Fires::new(Vec::new(), at(3, 50)).due(), None);
    }

    /// Two syncs on one schedule both run at each fire, one after the other; a fire that
    /// passes during a sync's own run is not made up for.
    #[test]
    fn syncs_on_one_schedule_all_run() {
        let quarter = || Schedule::parse("*/15 * * * *").unwrap();
        let at = |h, m| chrono::Utc.with_ymd_and_hms(2026, 1, 2, h, m, 0).unwrap();
        let mut fires = Fires::new(
            vec![("a".to_owned(), quarter()), ("b".to_owned(), quarter())],
            at(3, 4),
        );
        assert_eq!(fires.due(), Some((at(3, 15), "a")));
        // a's run ends at 3:16: b, due at 3:15, is still due.
        fires.fired("a", at(3, 16));
        assert_eq!(fires.due(), Some((at(3, 15), "b")));
        // b's run lasts until 3:47: its 3:30 and 3:45 fires are not made up for.
        fires.fired("b", at(3, 47));
        assert_eq!(fires.due(), Some((at(3, 30), "a")));
        fires.fired("a", at(3, 31));
        assert_eq!(fires.due(), Some((at(3, 45), "a")));
        fires.fired("a", at(3, 46));
        assert_eq!(fires.due(), Some((at(4, 0), "a")));
        fires.fired("a", at(4, 1));
        assert_eq!(fires.due(), Some((at(4, 0), "b")));
    }

    /// A run's first reads come 10 ms apart, doubled each time up to the poll.
    #[test]
    fn a_run_is_read_sooner_at_first_then_every_poll() {
        let poll = Duration::from_millis(100);
        let pauses: Vec<u128> = (0..7).map(|n| poll_pause(n, poll).as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 100, 100, 100]);
        assert_eq!(poll_pause(u32::MAX, poll), poll);
        // A poll shorter than the first pause is kept.
        assert_eq!(
            poll_pause(0, Duration::from_millis(5)),
            Duration::from_millis(5)
        );
    }

    /// A slow read of the run spaces the reads: at most a tenth of the wait is reading, and
    /// the pause is never longer than five seconds (nor shorter than the poll's), nor past
    /// what is due (the next heartbeat, the stall timeout).
    #[test]
    fn a_slow_read_spaces_the_reads_but_not_the_heartbeats() {
        let poll = Duration::from_millis(100);
        let ms = Duration::from_millis;
        let later = Duration::MAX;
        assert_eq!(pause_after(0, poll, ms(1), later), ms(10));
        assert_eq!(pause_after(9, poll, ms(2), later), poll);
        assert_eq!(pause_after(9, poll, ms(30), later), ms(270));
        assert_eq!(pause_after(0, poll, ms(30), later), ms(270));
        assert_eq!(
            pause_after(9, poll, ms(2_000), later),
            Duration::from_secs(5)
        );
        // A heartbeat due in a second: the read comes then, whatever the last one took.
        assert_eq!(pause_after(9, poll, ms(450), ms(1_000)), ms(1_000));
        assert_eq!(pause_after(9, poll, ms(30), ms(100)), poll);
        assert_eq!(pause_after(9, poll, ms(30), Duration::ZERO), Duration::ZERO);
        // A poll longer than the slowest pause is kept, up to what is due.
        assert_eq!(
            pause_after(9, Duration::from_secs(8), ms(2_000), later),
            Duration::from_secs(8)
        );
        assert_eq!(
            pause_after(9, Duration::from_secs(8), ms(2_000), ms(4_000)),
            Duration::from_secs(4)
        );
    }

    /// A progress line says the run's phase and counts; with the warehouse failing, since when.
    #[test]
    fn progress_lines_say_the_phase_and_the_counts() {
        assert_eq!(progress_line(7, None, None), "run 7: waiting");
        let since = std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_900);
        let failing = (since, "connection refused".to_owned());
        assert_eq!(
            progress_line(7, None, Some(&failing)),
            "run 7: waiting; the warehouse fails since 2023-11-14T22:13:20Z (connection refused)"
        );
        assert_eq!(
            waiting_for(None, None),
            "the run to be read from the warehouse"
        );
    }

    /// Records what the driver tells.
    #[derive(Default)]
    struct Told {
        notices: Vec<String>,
        started: Vec<i64>,
        finished: Vec<i64>,
        refused: Vec<String>,
    }

    impl RunObserver for Told {
        fn notice(&mut self, line: String) {
            self.notices.push(line);
        }
        fn progress(&mut self, _line: String) {}
        fn started(&mut self, run_id: i64) {
            self.started.push(run_id);
        }
        fn finished(&mut self, summary: &RunSummary) {
            self.finished.push(summary.id);
        }
        fn refused(&mut self, refused: &Refused) {
            self.refused.push(refused.sync.clone());
        }
    }

    /// `--once` over a SQLite warehouse, the in-process bus and the simulator: the first sync
    /// is bound to the simulator's team, gets its missing property created and its run done;
    /// the second, bound to another Loops, is refused and nothing of it is sent.
    #[tokio::test]
    async fn once_runs_each_sync_and_refuses_one_bound_elsewhere() {
        let dir = std::env::temp_dir().join(format!("loopsync-engine-once-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("warehouse.db");
        let _ = std::fs::remove_file(&db);
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(
                "create table users (id integer primary key, email text, plan text);
                 insert into users values (1, 'a@x.co', 'pro'), (2, 'b@x.co', 'free');",
            )
            .unwrap();
        let sim = loopsync_simulator::spawn(loopsync_simulator::SimConfig::default())
            .await
            .unwrap();
        let sync = |name: &str| {
            format!(
                "[[sync]]\nname = \"{name}\"\nmodel = \"select id, email, plan from users\"\n\
                 primary_key = \"id\"\nidentify_by = \"email\"\n\n[sync.mapping]\n\
                 email = \"email\"\nplanName = \"plan\"\n"
            )
        };
        let text = format!(
            "[warehouse]\nurl = \"sqlite://{}\"\n\n[loops]\napi_key = \"test-key\"\n\
             base_url = \"{}\"\nrequests_per_second = 1000\n\n{}\n{}",
            db.display(),
            sim.base_url(),
            sync("users"),
            sync("others")
        );
        let config = Config::parse(&text, |_| None).unwrap();
        let shutdown = CancellationToken::new();
        let mut pipeline = Pipeline::connect(config, shutdown.clone()).await.unwrap();
        let elsewhere = loopsync_core::destination::Destination::new(
            Some("Another Team".into()),
            "http://127.0.0.1:9/api",
        );
        pipeline
            .warehouse
            .bind_destination("others", &elsewhere, "k1")
            .await
            .unwrap();
        pipeline.spawn_all().unwrap();
        let mut runs = Runs::start(&pipeline, RunOptions::default()).await.unwrap();
        let mut told = Told::default();
        let syncs = ["users".to_owned(), "others".to_owned()];
        let done = runs.once(&syncs, &mut told, &shutdown).await.unwrap();
        pipeline.stop().await;
        let [SyncRun::Done(users), SyncRun::Refused(others)] = &done[..] else {
            panic!("{done:?}");
        };
        assert_eq!(users.status, "succeeded", "{users:?}");
        assert_eq!(users.confirmed, 2);
        assert_eq!(others.sync, "others");
        assert_eq!(others.bound.destination, elsewhere);
        assert_eq!(
            (told.started.clone(), told.finished.clone()),
            (vec![users.id], vec![users.id])
        );
        assert_eq!(told.refused, ["others"]);
        assert!(
            told.notices[0]
                .starts_with("sync users: its state is bound to team \"Simulated Team\""),
            "{:?}",
            told.notices
        );
        assert_eq!(
            told.notices[1],
            "created contact properties in Loops: planName"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
