//! `loopsync run`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use loopsync_config::Config;
use loopsync_extractor::{ExtractError, RunAsk, WaitOptions, request_run, wait_for_run_with};
use loopsync_loops_client::LoopsClient;
use loopsync_warehouse::WarehouseError;

use crate::destination::{self, Refused};
use crate::pipeline::{Pipeline, Preflight};
use crate::stop::{self, Stopped};
use crate::{UsageError, load_config, report};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// One run of each sync, then exit. Without it, each sync runs on its `schedule`.
    #[arg(long)]
    pub once: bool,
    /// With [nats]: only request the runs and wait for them; `loopsync worker` processes do
    /// the stages.
    #[arg(long)]
    remote: bool,
    /// Print the reports as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Send the removals even when a run would remove more than the sync's
    /// `max_removal_share` of its confirmed contacts, or the model returned no rows.
    #[arg(long)]
    allow_removals: bool,
    /// Give up a run (exit 1; the run is closed as failed) that has made no progress — no
    /// new outcome, no change of phase — for this many seconds. 0: wait forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    stall_timeout: u64,
}

impl RunArgs {
    /// `--once`, every sync, text reports.
    pub fn once() -> RunArgs {
        RunArgs {
            sync: None,
            once: true,
            remote: false,
            json: false,
            allow_removals: false,
            stall_timeout: 600,
        }
    }

    /// How a run is waited for: a progress line on stderr every 10 s, and the no-progress
    /// deadline.
    fn wait_options(&self) -> WaitOptions {
        WaitOptions {
            poll: Duration::from_millis(100),
            progress_every: Some(PROGRESS_EVERY),
            stall_timeout: (self.stall_timeout > 0)
                .then(|| Duration::from_secs(self.stall_timeout)),
        }
    }
}

/// How often a progress line is printed while a run is waited for.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// A progress line, on stderr.
fn say_progress(line: String) {
    eprintln!(
        "{} {line}",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
}

pub async fn run(config_path: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path)?;
    if args.remote && config.nats.is_none() {
        return Err(UsageError(
            "--remote needs a [nats] section: without it there are no workers to do the stages"
                .into(),
        )
        .into());
    }
    if !args.once
        && !config
            .syncs
            .iter()
            .any(|s| s.schedule.is_some() && args.sync.as_ref().is_none_or(|n| *n == s.spec.name))
    {
        return Err(UsageError(
            "no sync has a schedule: add `schedule = \"*/15 * * * *\"` to a [[sync]], or use --once".into(),
        )
        .into());
    }
    let syncs: Vec<String> = match &args.sync {
        Some(name) => {
            if config.sync(name).is_none() {
                return Err(UsageError(format!("no sync named \"{name}\" in the config")).into());
            }
            vec![name.clone()]
        }
        None => config.syncs.iter().map(|s| s.spec.name.clone()).collect(),
    };
    if syncs.is_empty() {
        return Err(UsageError("the config has no [[sync]]".into()).into());
    }
    let mut pipeline = Pipeline::connect(config.clone()).await?;
    let client = pipeline.loops_client()?;
    // A signal stops the preflight too (a Loops that answers slowly, or 429 with a long wait).
    let mut preflight = tokio::select! {
        p = Preflight::start(&client, &pipeline.budget, config.loops.max_attempts) => p?,
        () = crate::shutdown_signal() => return Err(Stopped.into()),
    };
    if !args.once {
        // A sync bound to another destination stops the schedules before they start.
        for sync in scheduled(&config, &syncs) {
            let found = destination::check(&*pipeline.warehouse, sync, preflight.destination());
            if let Some(refused) = found.await? {
                return Err(refused.into());
            }
        }
    }
    if !args.remote {
        pipeline.spawn_all()?;
    }
    if !args.once {
        let served = follow_schedules(
            &pipeline,
            &client,
            &mut preflight,
            &syncs,
            args.json,
            args.allow_removals,
            &args.wait_options(),
        )
        .await;
        pipeline.stop().await;
        served?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut summaries = Vec::new();
    let mut refused = false;
    for sync in &syncs {
        let started = tokio::select! {
            started = start_run(&pipeline, &client, &mut preflight, sync, args.allow_removals) => started,
            () = crate::shutdown_signal() => {
                pipeline.stop().await;
                return Err(Stopped.into());
            }
        };
        let run_id = match started {
            Ok(Ok(run_id)) => run_id,
            Ok(Err(refusal)) => {
                // The other syncs go on; the exit status says 2.
                eprintln!("error: {refusal}");
                refused = true;
                continue;
            }
            Err(error) => {
                pipeline.stop().await;
                return Err(error);
            }
        };
        // Stopped by a signal, `main` closes the run as interrupted.
        stop::watch_run(pipeline.warehouse.clone(), run_id);
        let wait_options = args.wait_options();
        let summary = tokio::select! {
            s = wait_for_run_with(&*pipeline.warehouse, run_id, &wait_options, say_progress) => match s {
                Ok(s) => s,
                Err(error) => {
                    pipeline.stop().await;
                    return Err(error.into());
                }
            },
            () = crate::shutdown_signal() => {
                pipeline.stop().await;
                return Err(Stopped.into());
            }
        };
        stop::run_over(run_id);
        if !args.json {
            print!("{}", report::text(&summary));
        }
        summaries.push(summary);
    }
    pipeline.stop().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    }
    if refused {
        return Ok(ExitCode::from(crate::EXIT_USAGE));
    }
    Ok(ExitCode::from(report::exit_status(&summaries)))
}

/// The syncs among `syncs` that have a schedule.
fn scheduled<'a>(config: &'a Config, syncs: &'a [String]) -> impl Iterator<Item = &'a str> {
    syncs
        .iter()
        .filter(|name| config.sync(name).is_some_and(|s| s.schedule.is_some()))
        .map(String::as_str)
}

/// Requests a run of `sync`, after checking that its state belongs to the configured
/// destination (else the refusal, and nothing is sent) and creating the properties its mapping
/// needs that Loops lacks; the run is recorded with the preflight requests made since the
/// previous run (see [`Preflight`]).
async fn start_run(
    pipeline: &Pipeline,
    client: &LoopsClient,
    preflight: &mut Preflight,
    sync: &str,
    allow_removals: bool,
) -> anyhow::Result<Result<i64, Refused>> {
    let spec = &pipeline
        .config
        .sync(sync)
        .ok_or_else(|| UsageError(format!("no sync named \"{sync}\" in the config")))?
        .spec;
    let found = destination::check(&*pipeline.warehouse, sync, preflight.destination());
    if let Some(refused) = found.await? {
        return Ok(Err(refused));
    }
    let created = preflight.ensure(spec, client, &pipeline.budget).await?;
    if !created.is_empty() {
        eprintln!(
            "created contact properties in Loops: {}",
            created.join(", ")
        );
    }
    Ok(Ok(request_run(
        &*pipeline.bus,
        &*pipeline.warehouse,
        sync,
        RunAsk {
            preflight: preflight.take(),
            allow_removals,
            ..RunAsk::default()
        },
    )
    .await?))
}

/// Without `--once`: each sync with a `schedule` is run when its cron expression says (UTC),
/// one run at a time; a fire time that passes while a run is in progress is not made up for.
/// Reports are printed as runs end (`--json`: one JSON object per line). Stops on SIGTERM.
async fn follow_schedules(
    pipeline: &Pipeline,
    client: &LoopsClient,
    preflight: &mut Preflight,
    syncs: &[String],
    json: bool,
    allow_removals: bool,
    wait_options: &WaitOptions,
) -> anyhow::Result<()> {
    use std::str::FromStr;
    let mut schedules = Vec::new();
    for name in syncs {
        let Some(schedule) = pipeline.config.sync(name).and_then(|s| s.schedule.clone()) else {
            continue;
        };
        let cron = croner::Cron::from_str(&schedule)
            .map_err(|e| UsageError(format!("sync {name}: schedule \"{schedule}\": {e}")))?;
        schedules.push((name.clone(), cron));
    }
    eprintln!(
        "following the schedules of {} (Ctrl-C or SIGTERM to stop)",
        schedules
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let shutdown = crate::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let now = chrono::Utc::now();
        let (due, name) = schedules
            .iter()
            .filter_map(|(name, cron)| {
                cron.find_next_occurrence(&now, false)
                    .ok()
                    .map(|t| (t, name))
            })
            .min()
            .ok_or_else(|| anyhow::anyhow!("no schedule has a next occurrence"))?;
        let wait = (due - now).to_std().unwrap_or_default();
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
        let started = tokio::select! {
            () = &mut shutdown => return Ok(()),
            started = start_run(pipeline, client, preflight, name, allow_removals) => started,
        };
        let run_id = match started {
            Ok(Ok(run_id)) => run_id,
            Ok(Err(refusal)) => {
                // Bound elsewhere since the schedules started (an adopt from another config):
                // this fire is skipped, the next one checks again.
                eprintln!("error: {refusal}");
                continue;
            }
            // Another process runs this sync now (a second scheduler, a replay): skip this tick.
            Err(error) if in_progress(&error) => {
                eprintln!(
                    "{}: schedule of {name}: {error}; skipped",
                    chrono::Utc::now()
                );
                continue;
            }
            Err(error) => return Err(error),
        };
        stop::watch_run(pipeline.warehouse.clone(), run_id);
        let summary = tokio::select! {
            () = &mut shutdown => return Ok(()),
            s = wait_for_run_with(&*pipeline.warehouse, run_id, wait_options, say_progress) => match s {
                Ok(s) => s,
                // A stalled run is given up; the schedules go on.
                Err(error @ ExtractError::Stalled(_)) => {
                    eprintln!("{}: error: {error}", chrono::Utc::now());
                    continue;
                }
                Err(error) => return Err(error.into()),
            },
        };
        stop::run_over(run_id);
        if json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            print!("{}", report::text(&summary));
        }
    }
}

/// Another run of the sync is in progress.
fn in_progress(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<ExtractError>(),
        Some(ExtractError::Warehouse(
            WarehouseError::RunInProgress { .. }
        ))
    )
}
