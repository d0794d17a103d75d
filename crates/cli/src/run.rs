//! `loopsync run`: parses the flags, asks the engine for the runs ([`Runs`]) and prints what
//! it tells (reports on stdout; notices, refusals and progress lines on stderr).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use loopsync_engine::EngineError;
use loopsync_engine::destination::Refused;
use loopsync_engine::pipeline::Pipeline;
use loopsync_engine::runs::{self, RunObserver, RunOptions, Runs, SyncRun, WaitOptions};
use loopsync_warehouse::{RunSummary, Warehouse};

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

    /// How runs are requested and waited for: a progress line on stderr every 10 s, and the
    /// no-progress deadline.
    fn run_options(&self) -> RunOptions {
        RunOptions {
            allow_removals: self.allow_removals,
            wait: WaitOptions {
                poll: Duration::from_millis(100),
                progress_every: Some(PROGRESS_EVERY),
                stall_timeout: (self.stall_timeout > 0)
                    .then(|| Duration::from_secs(self.stall_timeout)),
            },
        }
    }
}

/// How often a progress line is printed while a run is waited for.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Prints what the engine tells of the runs, and watches the run waited for (closed as
/// interrupted if a signal stops the process first).
pub(crate) struct Printer {
    warehouse: Arc<dyn Warehouse>,
    /// Each report as one line of JSON as the run ends (`--json` without `--once`).
    json_lines: bool,
    /// No report as the run ends (`--once --json`: all of them at the end).
    quiet: bool,
}

impl Printer {
    /// Prints for runs waited for in `warehouse`'s pipeline.
    pub(crate) fn new(warehouse: Arc<dyn Warehouse>, json_lines: bool, quiet: bool) -> Printer {
        Printer {
            warehouse,
            json_lines,
            quiet,
        }
    }
}

impl RunObserver for Printer {
    fn notice(&mut self, line: String) {
        eprintln!("{line}");
    }

    fn progress(&mut self, line: String) {
        eprintln!(
            "{} {line}",
            loopsync_core::time::utc_seconds(std::time::SystemTime::now())
        );
    }

    fn started(&mut self, run_id: i64) {
        // Stopped by a signal, `main` closes the run as interrupted.
        stop::watch_run(self.warehouse.clone(), run_id);
    }

    fn finished(&mut self, summary: &RunSummary) {
        stop::run_over(summary.id);
        if self.json_lines {
            match serde_json::to_string(summary) {
                Ok(line) => println!("{line}"),
                Err(error) => eprintln!("error: {error}"),
            }
        } else if !self.quiet {
            print!("{}", report::text(summary));
        }
    }

    fn refused(&mut self, refused: &Refused) {
        // The other syncs go on (`--once`: the exit status says 2).
        eprintln!("error: {refused}");
    }
}

/// An engine error for `main`: stopped by a signal, [`Stopped`].
pub(crate) fn stopped_or(error: EngineError) -> anyhow::Error {
    match error {
        EngineError::Stopped => Stopped.into(),
        error => error.into(),
    }
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
    let syncs = runs::select(&config, args.sync.as_deref(), !args.once)?;
    let shutdown = stop::token();
    let mut pipeline = Pipeline::connect(config, shutdown.clone()).await?;
    let mut printer = Printer::new(
        pipeline.warehouse.clone(),
        args.json && !args.once,
        args.json,
    );
    // A signal stops the preflight too (a Loops that answers slowly, or 429 with a long wait).
    let mut runs = tokio::select! {
        runs = Runs::start(&pipeline, args.run_options()) => runs?,
        () = crate::shutdown_signal() => return Err(Stopped.into()),
    };
    if !args.once {
        // A sync bound to another destination stops the schedules before they start.
        runs.check_scheduled(&syncs, &mut printer).await?;
    }
    if !args.remote {
        pipeline.spawn_all()?;
    }
    if !args.once {
        let served = runs.follow_schedules(&syncs, &mut printer, &shutdown).await;
        pipeline.stop().await;
        served?;
        return Ok(ExitCode::SUCCESS);
    }
    let done = runs.once(&syncs, &mut printer, &shutdown).await;
    pipeline.stop().await;
    let (summaries, refused) = split(done.map_err(stopped_or)?);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    }
    if refused {
        return Ok(ExitCode::from(crate::EXIT_USAGE));
    }
    Ok(ExitCode::from(report::exit_status(&summaries)))
}

/// The reports of the runs that ran, and whether a sync was refused (exit status 2).
pub(crate) fn split(runs: Vec<SyncRun>) -> (Vec<RunSummary>, bool) {
    let mut summaries = Vec::new();
    let mut refused = false;
    for run in runs {
        match run {
            SyncRun::Done(summary) => summaries.push(summary),
            SyncRun::Refused(_) => refused = true,
        }
    }
    (summaries, refused)
}
