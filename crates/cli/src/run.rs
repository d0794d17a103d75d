//! `loopsync run`: parses the flags, asks the engine for the runs ([`Runs`]) and prints what
//! it tells (reports on stdout; notices, refusals and progress lines on stderr).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use loopsync_engine::pipeline::Pipeline;
use loopsync_engine::runs::{self, RunOptions, Runs, WaitOptions};

use crate::common::{UsageError, load_config};
use crate::printer::{PROGRESS_EVERY, Printer, split, stopped_or};
use crate::report;
use crate::stop::{self, Stopped};

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
    /// The status page (--http-addr, --http-token-file, --http-allow-remote).
    #[command(flatten)]
    http: crate::http::HttpArgs,
}

impl RunArgs {
    /// `--once`, every sync, text reports.
    pub fn once() -> RunArgs {
        RunArgs {
            config: crate::ConfigArg {
                path: "loopsync.toml".into(),
            },
            metrics_addr: None,
            http: crate::http::HttpArgs::default(),
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

pub async fn run(config_path: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path)?;
    if let Some(addr) = args.metrics_addr {
        crate::prometheus::serve_metrics(addr)?;
    }
    if args.remote && config.nats.is_none() {
        return Err(UsageError(
            "--remote needs a [nats] section: without it there are no workers to do the stages"
                .into(),
        )
        .into());
    }
    let syncs = runs::select(&config, args.sync.as_deref(), !args.once)?;
    // Bound before anything starts: a flag or address that cannot be is said at once.
    let status_page = args.http.bind()?;
    let shutdown = stop::token();
    let mut pipeline = Pipeline::connect(config, shutdown.clone()).await?;
    if let Some(page) = status_page {
        page.serve(pipeline.warehouse.clone(), pipeline.config.syncs.clone());
    }
    let mut printer = Printer::new(
        pipeline.warehouse.clone(),
        args.json && !args.once,
        args.json,
        pipeline.config.loops.requests_per_second,
    );
    printer.timestamped = !args.once;
    printer.specs = pipeline
        .config
        .syncs
        .iter()
        .map(|s| s.spec.clone())
        .collect();
    if args.once {
        // A run of a sync in progress is said at once, and an alive one refuses this run
        // before any request to Loops (whose budget that run is using).
        tokio::select! {
            refused = runs::refuse_a_run_in_progress(&*pipeline.warehouse, &syncs, &mut printer) => refused?,
            () = crate::common::shutdown_signal() => return Err(Stopped.into()),
        }
    }
    // A signal stops the preflight too (a Loops that answers slowly, or 429 with a long wait).
    let mut runs = tokio::select! {
        runs = Runs::start(&pipeline, args.run_options()) => runs?,
        () = crate::common::shutdown_signal() => return Err(Stopped.into()),
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
        return Ok(ExitCode::from(crate::common::EXIT_USAGE));
    }
    Ok(ExitCode::from(report::exit_status(&summaries)))
}
