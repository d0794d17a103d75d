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
    #[command(flatten)]
    pub config: crate::ConfigArg,
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
    /// Serve Prometheus metrics at http://HOST:PORT/metrics while this runs
    /// (docs/operations.md, Metrics).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
}

impl RunArgs {
    /// `--once`, every sync, text reports.
    pub fn once() -> RunArgs {
        RunArgs {
            config: crate::ConfigArg {
                path: "loopsync.toml".into(),
            },
            metrics_addr: None,
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
    /// A timestamped line before each report (following the schedules).
    timestamped: bool,
    /// The run waited for, as a bar: on an interactive terminal, without `--json`.
    bar: Option<indicatif::ProgressBar>,
    /// `loops.requests_per_second`: the time left at the budget.
    requests_per_second: u32,
}

/// The progress bar's message: what the run has done and what is left, and the time that
/// takes at the rate budget (one request per record).
pub(crate) fn progress_message(run: &RunSummary, requests_per_second: u32) -> String {
    match run.expected {
        None => format!("sync {}: {} (reading the model)", run.sync, run.status),
        Some(expected) => {
            let left = (expected - run.records).max(0);
            let seconds = left as f64 / f64::from(requests_per_second.max(1));
            format!(
                "sync {}: {} · extracted {expected} · confirmed {} · left {left} · {} left at {requests_per_second}/s",
                run.sync,
                run.status,
                run.confirmed,
                humantime::format_duration(std::time::Duration::from_secs(seconds.ceil() as u64))
            )
        }
    }
}

impl Printer {
    /// Prints for runs waited for in `warehouse`'s pipeline.
    pub(crate) fn new(
        warehouse: Arc<dyn Warehouse>,
        json_lines: bool,
        quiet: bool,
        requests_per_second: u32,
    ) -> Printer {
        use std::io::IsTerminal;
        let bar = (!json_lines && !quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Printer {
            warehouse,
            json_lines,
            quiet,
            timestamped: false,
            bar,
            requests_per_second,
        }
    }
}

impl RunObserver for Printer {
    fn notice(&mut self, line: String) {
        eprintln!("{line}");
    }

    fn progress(&mut self, line: String) {
        if self.bar.is_some() {
            // The bar says it.
            return;
        }
        eprintln!(
            "{} {line}",
            loopsync_core::time::utc_seconds(std::time::SystemTime::now())
        );
    }

    fn started(&mut self, run_id: i64) {
        // Stopped by a signal, `main` closes the run as interrupted.
        stop::watch_run(self.warehouse.clone(), run_id);
    }

    fn tick(&mut self, run: &RunSummary) {
        if let Some(bar) = &self.bar {
            bar.set_length(run.expected.unwrap_or(0).max(0) as u64);
            bar.set_position(run.records.max(0) as u64);
            bar.set_message(progress_message(run, self.requests_per_second));
        }
    }

    fn finished(&mut self, summary: &RunSummary) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            bar.reset();
        }
        stop::run_over(summary.id);
        if self.json_lines {
            // One line per run, with the same envelope as `--once --json` (a list of one).
            if let Err(error) = crate::output::json_line("run", &[summary]) {
                eprintln!("error: {error}");
            }
        } else if !self.quiet {
            if self.timestamped {
                // Following the schedules: when each run ended, before its report.
                crate::say!(
                    "{} run {} of sync {} ended: {}",
                    loopsync_core::time::utc_seconds(std::time::SystemTime::now()),
                    summary.id,
                    summary.sync,
                    summary.status
                );
            }
            crate::say_raw!("{}", report::text(summary));
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
    if let Some(addr) = args.metrics_addr {
        crate::serve_metrics(addr)?;
    }
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
        pipeline.config.loops.requests_per_second,
    );
    printer.timestamped = !args.once;
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
        crate::output::json("run", &summaries)?;
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
            SyncRun::Refused(_) | SyncRun::Unsendable(_) => refused = true,
        }
    }
    (summaries, refused)
}

#[cfg(test)]
mod tests {
    use loopsync_warehouse::RunStatus;

    use super::*;

    /// The bar says what is done and what is left, and the time left at the rate budget.
    #[test]
    fn the_progress_says_the_time_left_at_the_budget() {
        let mut run = RunSummary {
            id: 3,
            sync: "users".into(),
            status: RunStatus::Extracting,
            ..RunSummary::default()
        };
        assert_eq!(
            progress_message(&run, 10),
            "sync users: extracting (reading the model)"
        );
        run.status = RunStatus::Sending;
        run.expected = Some(1000);
        run.records = 400;
        run.confirmed = 390;
        assert_eq!(
            progress_message(&run, 10),
            "sync users: sending · extracted 1000 · confirmed 390 · left 600 · 1m left at 10/s"
        );
        run.records = 1200;
        assert!(progress_message(&run, 10).contains("left 0 · 0s left"));
    }
}
