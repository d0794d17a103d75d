//! `loopsync dlq list|replay|park`: the records whose latest outcome is dead-lettered (retries
//! spent, or an outcome the checkpointer could not record), from `loopsync.records` — the same
//! with or without NATS. `replay` sends them again now
//! (a run about those keys only; refused for a sync whose state is bound to another Loops than
//! the configured one); `park` sets them aside so that no run retries them until their data
//! changes.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use loopsync_core::envelope::{OutcomeStatus, RequestCounts};
use loopsync_extractor::{RunAsk, request_run, wait_for_run};
use loopsync_warehouse::RecordResult;

use crate::pipeline::Pipeline;
use crate::{
    UsageError, destination, load_config_for, load_config_for_warehouse, open_warehouse, report,
};

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    action: DlqAction,
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// Show the dead letters.
    List(Filter),
    /// Send them again now: one run per sync, about those records only.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// With [nats]: leave the stages to `loopsync worker` processes.
        #[arg(long)]
        remote: bool,
    },
    /// Set them aside: no run retries them until their data changes.
    Park(Filter),
}

/// Which dead letters.
#[derive(Debug, Clone, Args)]
struct Filter {
    #[arg(long)]
    sync: Option<String>,
    /// Only those whose reason contains this text.
    #[arg(long)]
    reason: Option<String>,
    /// Only those dead-lettered at or after this time (RFC 3339, or a date: 2026-11-28).
    #[arg(long)]
    since: Option<String>,
    /// Only this record (repeatable).
    #[arg(long = "key")]
    keys: Vec<String>,
    #[arg(long)]
    json: bool,
}

fn parse_since(text: &str) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    loopsync_core::value::parse_date_millis(text)
        .and_then(chrono::DateTime::from_timestamp_millis)
        .ok_or_else(|| {
            UsageError(format!(
                "--since \"{text}\": not a time (2026-11-28 or 2026-11-28T10:00:00Z)"
            ))
            .into()
        })
}

/// The dead letters the filter selects. `warehouse_only`: the command needs only the
/// warehouse (`list`, `park`: PRODUCT.md, never Loops' secrets); `replay` reads the whole config.
async fn select(
    config_path: &Path,
    filter: &Filter,
    warehouse_only: bool,
) -> anyhow::Result<(loopsync_config::Config, Vec<RecordResult>)> {
    let config = if warehouse_only {
        load_config_for_warehouse(config_path, filter.sync.as_deref())?
    } else {
        load_config_for(config_path, filter.sync.as_deref())?
    };
    let since = filter.since.as_deref().map(parse_since).transpose()?;
    let warehouse = open_warehouse(&config).await?;
    let letters = warehouse
        .rejections(filter.sync.as_deref())
        .await?
        .into_iter()
        .filter(|r| r.outcome == OutcomeStatus::DeadLettered)
        .filter(|r| filter.keys.is_empty() || filter.keys.contains(&r.key))
        .filter(|r| {
            filter
                .reason
                .as_ref()
                .is_none_or(|t| r.reason.as_deref().unwrap_or("").contains(t.as_str()))
        })
        .filter(|r| {
            since
                .is_none_or(|s| chrono::DateTime::parse_from_rfc3339(&r.at).is_ok_and(|at| at >= s))
        })
        .collect();
    Ok((config, letters))
}

fn by_sync(letters: &[RecordResult]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for r in letters {
        match groups.iter_mut().find(|(s, _)| *s == r.sync) {
            Some((_, keys)) => keys.push(r.key.clone()),
            None => groups.push((r.sync.clone(), vec![r.key.clone()])),
        }
    }
    groups
}

pub async fn run(config_path: &Path, args: DlqArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        DlqAction::List(filter) => {
            let (_, letters) = select(config_path, &filter, true).await?;
            if filter.json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else if letters.is_empty() {
                println!("no dead letters");
            } else {
                println!(
                    "{:<12} {:<20} {:>5}  {:<24} REASON",
                    "SYNC", "KEY", "RUN", "AT"
                );
                for r in &letters {
                    println!(
                        "{:<12} {:<20} {:>5}  {:<24} {}",
                        r.sync,
                        r.key,
                        r.run_id,
                        r.at,
                        r.reason.as_deref().unwrap_or("")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Park(filter) => {
            let (config, letters) = select(config_path, &filter, true).await?;
            let warehouse = loopsync_warehouse::connect(&config.warehouse.url).await?;
            let mut parked = 0;
            for (sync, keys) in by_sync(&letters) {
                parked += warehouse.park(&sync, &keys).await?;
            }
            if filter.json {
                println!("{}", serde_json::json!({ "parked": parked }));
            } else {
                println!(
                    "parked {parked} dead letters: no run retries them until their data changes"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Replay { filter, remote } => {
            let (config, letters) = select(config_path, &filter, false).await?;
            if remote && config.nats.is_none() {
                return Err(UsageError("--remote needs a [nats] section".into()).into());
            }
            if letters.is_empty() {
                println!("no dead letters to replay");
                return Ok(ExitCode::SUCCESS);
            }
            let mut pipeline = Pipeline::connect(config).await?;
            // The dead letters go where their syncs' state belongs, or not at all: the API
            // key's team, counted as the first replay's preflight.
            let client = pipeline.loops_client()?;
            let mut preflight = RequestCounts::default();
            let configured = destination::configured(
                &client,
                &pipeline.budget,
                pipeline.config.loops.max_attempts,
                &mut preflight,
            )
            .await?;
            if !remote {
                pipeline.spawn_all()?;
            }
            let mut summaries = Vec::new();
            let mut refused = false;
            for (sync, keys) in by_sync(&letters) {
                let found = destination::check(&*pipeline.warehouse, &sync, &configured);
                if let Some(refusal) = found.await? {
                    eprintln!("error: {refusal}");
                    refused = true;
                    continue;
                }
                let run_id = request_run(
                    &*pipeline.bus,
                    &*pipeline.warehouse,
                    &sync,
                    RunAsk {
                        only_keys: keys,
                        preflight: std::mem::take(&mut preflight),
                        ..RunAsk::default()
                    },
                )
                .await?;
                // Stopped by a signal, `main` closes the run as interrupted.
                crate::stop::watch_run(pipeline.warehouse.clone(), run_id);
                let summary = tokio::select! {
                    s = wait_for_run(&*pipeline.warehouse, run_id, Duration::from_millis(100)) => s?,
                    () = crate::shutdown_signal() => {
                        pipeline.stop().await;
                        return Err(crate::stop::Stopped.into());
                    }
                };
                crate::stop::run_over(run_id);
                if !filter.json {
                    print!("{}", report::text(&summary));
                }
                summaries.push(summary);
            }
            pipeline.stop().await;
            if filter.json {
                println!("{}", serde_json::to_string_pretty(&summaries)?);
            }
            if refused {
                return Ok(ExitCode::from(crate::EXIT_USAGE));
            }
            Ok(ExitCode::from(report::exit_status(&summaries)))
        }
    }
}
