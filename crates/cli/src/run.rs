//! `loopsync run`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use loopsync_extractor::{request_run, wait_for_run};

use crate::pipeline::{Pipeline, ensure_properties};
use crate::{UsageError, load_config, report};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// One run of each sync, then exit.
    #[arg(long)]
    once: bool,
    /// With [nats]: only request the runs and wait for them; `loopsync worker` processes do
    /// the stages.
    #[arg(long)]
    remote: bool,
    /// Print the reports as JSON on stdout.
    #[arg(long)]
    json: bool,
}

impl RunArgs {
    /// `--once`, every sync, text reports.
    pub fn once() -> RunArgs {
        RunArgs {
            sync: None,
            once: true,
            remote: false,
            json: false,
        }
    }
}

pub async fn run(config_path: &Path, args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(config_path)?;
    if !args.once {
        return Err(UsageError(
            "following schedules is not available yet: use `loopsync run --once` (from cron, for instance)".into(),
        )
        .into());
    }
    if args.remote && config.nats.is_none() {
        return Err(UsageError(
            "--remote needs a [nats] section: without it there are no workers to do the stages"
                .into(),
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
    let created = ensure_properties(&config, &client, &pipeline.budget).await?;
    if !created.is_empty() {
        eprintln!(
            "created contact properties in Loops: {}",
            created.join(", ")
        );
    }
    if !args.remote {
        pipeline.spawn_all()?;
    }
    let mut summaries = Vec::new();
    for sync in &syncs {
        let run_id = request_run(&*pipeline.bus, &*pipeline.warehouse, sync).await?;
        let summary = tokio::select! {
            s = wait_for_run(&*pipeline.warehouse, run_id, Duration::from_millis(100)) => s?,
            () = crate::shutdown_signal() => {
                pipeline.stop().await;
                anyhow::bail!("interrupted while run {run_id} of {sync} was in progress; its records are retried by the next run");
            }
        };
        if !args.json {
            print!("{}", report::text(&summary));
        }
        summaries.push(summary);
    }
    pipeline.stop().await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    }
    Ok(ExitCode::from(report::exit_status(&summaries)))
}
