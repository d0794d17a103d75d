//! `loopsync dlq list|replay|park`: the records whose latest outcome is dead-lettered (retries
//! spent, or an outcome the checkpointer could not record), from `loopsync.records` — the same
//! with or without NATS. `replay` sends them again now
//! (a run about those keys only; refused for a sync whose state is bound to another Loops than
//! the configured one); `park` sets them aside so that no run retries them until their data
//! changes.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use crate::selection::Filter;
use clap::{Args, Subcommand};
use loopsync_engine::dlq;
use loopsync_engine::pipeline::Pipeline;
use loopsync_engine::state::{RecordResult, Warehouse};

use crate::common::{UsageError, load_config_for, load_config_for_warehouse, open_warehouse};
use crate::escape::printable;
use crate::printer::{Printer, split, stopped_or};
use crate::report;

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
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
    /// Undo `park`: the next run tries them again.
    Unpark(Filter),
}

/// A dead letter as `dlq list` shows it: the record, and whether it is parked.
#[derive(Debug, serde::Serialize)]
struct Letter<'a> {
    #[serde(flatten)]
    record: &'a RecordResult,
    /// Parked: no run retries it until its data changes (`dlq unpark` undoes it).
    parked: bool,
}

/// The dead letters the filter selects, with the config and its warehouse. `warehouse_only`:
/// the command needs only the warehouse (`list`, `park`: PRODUCT.md, never Loops' secrets);
/// `replay` reads the whole config. `must_match`: a command that acts on them (`park`,
/// `unpark`, `replay`) fails when a `--key`, `--reason` or `--since` matched nothing, naming
/// it, rather than do nothing and exit 0.
async fn select(
    config_path: &Path,
    filter: &Filter,
    warehouse_only: bool,
    read_only: bool,
    must_match: bool,
) -> anyhow::Result<(
    loopsync_config::Config,
    Arc<dyn Warehouse>,
    Vec<RecordResult>,
)> {
    let config = if warehouse_only {
        load_config_for_warehouse(config_path, filter.sync.as_deref())?
    } else {
        load_config_for(config_path, filter.sync.as_deref())?
    };
    let selection = filter.selection()?;
    let warehouse = if read_only {
        crate::common::open_warehouse_read_only(&config).await?
    } else {
        open_warehouse(&config).await?
    };
    let mut letters = dlq::dead_letters(&*warehouse, &selection).await?;
    if must_match && let Some(unmatched) = selection.unmatched(&letters) {
        return Err(anyhow::anyhow!(unmatched));
    }
    letters.sort_by(|a, b| {
        a.sync
            .cmp(&b.sync)
            .then(crate::output::key_order(&a.key, &b.key))
    });
    Ok((config, warehouse, letters))
}

pub async fn run(config_path: &Path, args: DlqArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        DlqAction::List(filter) => {
            let (_, warehouse, letters) = select(config_path, &filter, true, true, false).await?;
            let parked = warehouse.parked(filter.sync.as_deref()).await?;
            let letters: Vec<Letter> = letters
                .iter()
                .map(|record| Letter {
                    record,
                    parked: parked
                        .iter()
                        .any(|(s, k)| *s == record.sync && *k == record.key),
                })
                .collect();
            if filter.json {
                crate::output::json("dlq list", &letters)?;
            } else if letters.is_empty() {
                crate::say!("no dead letters");
            } else {
                crate::say!(
                    "{}",
                    format!(
                        "{:<12} {:<20} {:>5}  {:<24} {:<7} REASON",
                        "SYNC", "KEY", "RUN", "AT", "PARKED"
                    )
                );
                for l in &letters {
                    let r = l.record;
                    crate::say!(
                        "{}",
                        format!(
                            "{:<12} {:<20} {:>5}  {:<24} {:<7} {}",
                            r.sync,
                            printable(&r.key),
                            r.run_id,
                            r.at,
                            if l.parked { "parked" } else { "-" },
                            printable(r.reason.as_deref().unwrap_or(""))
                        )
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Park(filter) => {
            let (_, warehouse, letters) = select(config_path, &filter, true, false, true).await?;
            let parked = dlq::park(&*warehouse, &letters).await?;
            if filter.json {
                crate::output::json("dlq park", &serde_json::json!({ "parked": parked }))?;
            } else {
                crate::say!(
                    "parked {parked} dead letters: no run retries them until their data changes"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Unpark(filter) => {
            let (_, warehouse, letters) = select(config_path, &filter, true, false, true).await?;
            let mut unparked = 0;
            for (sync, keys) in dlq::by_sync(&letters) {
                unparked += warehouse.unpark(&sync, &keys).await?;
            }
            if filter.json {
                crate::output::json("dlq unpark", &serde_json::json!({ "unparked": unparked }))?;
            } else {
                crate::say!(
                    "{}",
                    format!("unparked {unparked} dead letters: the next run tries them again")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Replay { filter, remote } => {
            let (config, warehouse, letters) =
                select(config_path, &filter, false, false, true).await?;
            drop(warehouse);
            if remote && config.nats.is_none() {
                return Err(UsageError("--remote needs a [nats] section".into()).into());
            }
            if letters.is_empty() {
                if filter.json {
                    crate::output::json("dlq replay", &Vec::<()>::new())?;
                } else {
                    crate::say!("no dead letters to replay");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let shutdown = crate::stop::token();
            let mut pipeline = Pipeline::connect(config, shutdown.clone()).await?;
            let rps = pipeline.config.loops.requests_per_second;
            let mut printer = Printer::new(pipeline.warehouse.clone(), false, filter.json, rps);
            printer.specs = pipeline
                .config
                .syncs
                .iter()
                .map(|s| s.spec.clone())
                .collect();
            let done = dlq::replay(&mut pipeline, &letters, !remote, &mut printer, &shutdown).await;
            pipeline.stop().await;
            let (summaries, refused) = split(done.map_err(stopped_or)?);
            if filter.json {
                crate::output::json("dlq replay", &summaries)?;
            }
            if refused {
                return Ok(ExitCode::from(crate::common::EXIT_USAGE));
            }
            Ok(ExitCode::from(report::exit_status(&summaries)))
        }
    }
}
