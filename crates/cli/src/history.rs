//! `loopsync runs`, `loopsync runs show RUN`: what happened, from the warehouse
//! (`loopsync.runs`, `loopsync.records`). (`loopsync rejections` is `rejections.rs`.)

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};
use loopsync_engine::state::{RecordResult, Warehouse};

use crate::common::{UsageError, load_config_for_warehouse, open_warehouse_read_only};
use crate::escape::printable;
use crate::report;

#[derive(Debug, Args)]
pub struct RunsArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    #[command(subcommand)]
    action: Option<RunsAction>,
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// How many runs, newest first.
    #[arg(long, default_value_t = 20)]
    limit: i64,
    /// Print the report as one JSON document on stdout (docs/json.md).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum RunsAction {
    /// One run: its report and the records that did not go through.
    Show {
        /// The run's id (the first column of `loopsync runs`).
        run: i64,
        /// Print the report as one JSON document on stdout (docs/json.md).
        #[arg(long)]
        json: bool,
    },
}

/// The config (read for the warehouse only) and its warehouse, read only.
async fn opened(
    config_path: &Path,
    sync: Option<&str>,
) -> anyhow::Result<(loopsync_config::Config, Arc<dyn Warehouse>)> {
    let config = load_config_for_warehouse(config_path, sync)?;
    let warehouse = open_warehouse_read_only(&config).await?;
    Ok((config, warehouse))
}

fn cell(value: Option<i64>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

pub async fn runs(config_path: &Path, args: RunsArgs) -> anyhow::Result<ExitCode> {
    let (config, warehouse) = opened(config_path, args.sync.as_deref()).await?;
    if let Some(RunsAction::Show { run, json }) = args.action {
        let Some(summary) = warehouse.run(run).await? else {
            return Err(UsageError(format!("there is no run {run}")).into());
        };
        let records = warehouse.records(run).await?;
        if json {
            let value = serde_json::json!({"run": summary, "records": records});
            crate::output::json("runs show", &value)?;
        } else {
            let spec = config.sync(&summary.sync).map(|s| &s.spec);
            crate::say_raw!("{}", report::text(&summary, spec));
            crate::say!(
                "  requested {}, finished {}",
                summary.requested_at,
                summary.finished_at.as_deref().unwrap_or("-")
            );
            let failed: Vec<&RecordResult> =
                records.iter().filter(|r| r.outcome.is_failure()).collect();
            if !failed.is_empty() {
                crate::say!("  records that did not go through:");
                for r in failed {
                    crate::say!(
                        "    {}  {}{}  {}",
                        printable(&r.key),
                        r.outcome,
                        if r.accepted { " (accepted)" } else { "" },
                        printable(r.reason.as_deref().unwrap_or(""))
                    );
                }
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let runs = warehouse.runs(args.sync.as_deref(), args.limit).await?;
    if args.json {
        crate::output::json("runs", &runs)?;
        return Ok(ExitCode::SUCCESS);
    }
    crate::say!(
        "{:>5}  {:<12} {:<10} {:<24} {:>8}  {:>6} {:>7} {:>7} {:>9} {:>7} {:>8} {:>6} {:>8} {:>7} {:>5}",
        "RUN",
        "SYNC",
        "STATUS",
        "REQUESTED",
        "SECONDS",
        "ADDED",
        "CHANGED",
        "REMOVED",
        "UNCHANGED",
        "INVALID",
        "REJECTED",
        "DEAD",
        "REQUESTS",
        "RETRIES",
        "429"
    );
    for r in runs {
        crate::say!(
            "{:>5}  {:<12} {:<10} {:<24} {:>8}  {:>6} {:>7} {:>7} {:>9} {:>7} {:>8} {:>6} {:>8} {:>7} {:>5}",
            r.id,
            r.sync,
            r.status,
            r.requested_at,
            r.duration_ms
                .map_or_else(|| "-".into(), |ms| format!("{:.1}", ms as f64 / 1000.0)),
            r.added,
            r.changed,
            r.removed,
            r.unchanged,
            r.invalid,
            r.rejected,
            r.dead_lettered,
            cell(Some(r.requests)),
            r.retries,
            r.rate_limited,
        );
    }
    Ok(ExitCode::SUCCESS)
}
