//! `loopsync rejections`: the invalid, rejected and dead-lettered records, each with its key,
//! reason and whether it is accepted; `rejections accept` accepts invalid records as they are
//! (runs still list them, but they no longer make a run degraded while they stay invalid for
//! the same reason), `rejections unaccept` undoes it. Only the warehouse: never Loops' secrets.

use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use loopsync_engine::rejections;
use loopsync_engine::state::RecordResult;

use crate::common::{load_config_for_warehouse, open_warehouse, open_warehouse_read_only};
use crate::escape::printable;
use crate::selection::Filter;

#[derive(Debug, Args)]
pub struct RejectionsArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    #[command(subcommand)]
    action: Option<RejectionsAction>,
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// Print the report as one JSON document on stdout (docs/json.md).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum RejectionsAction {
    /// Accept invalid records as they are: runs still list and count them, but they no longer
    /// make a run degraded while they stay invalid for the same reason. Exit 1 when the filter
    /// matches no invalid record.
    Accept {
        #[command(flatten)]
        filter: Filter,
        /// Why they are accepted: kept with the acceptance.
        #[arg(long)]
        note: Option<String>,
        /// Also accept records whose contact Loops still holds with the values it last
        /// confirmed (the row was sent, then became invalid): Loops keeps those values for as
        /// long as the row stays invalid. Without it such records are not accepted (exit 1).
        #[arg(long)]
        keep_stale: bool,
    },
    /// Undo `accept`: the next run that finds them invalid is degraded again. Exit 1 when the
    /// filter matches no accepted record.
    Unaccept(Filter),
}

/// Failed records, sorted by sync then key (numbers by value).
fn sorted(mut records: Vec<RecordResult>) -> Vec<RecordResult> {
    records.sort_by(|a, b| {
        a.sync
            .cmp(&b.sync)
            .then(crate::output::key_order(&a.key, &b.key))
    });
    records
}

pub async fn run(config_path: &Path, args: RejectionsArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        None => list(config_path, args.sync.as_deref(), args.json).await,
        Some(RejectionsAction::Accept {
            filter,
            note,
            keep_stale,
        }) => {
            let config = load_config_for_warehouse(config_path, filter.sync.as_deref())?;
            let selection = filter.selection()?;
            let warehouse = open_warehouse(&config).await?;
            let chosen = rejections::invalid(&*warehouse, &selection).await?;
            if chosen.is_empty() {
                anyhow::bail!(
                    "no invalid record matches ({}): nothing accepted (loopsync rejections lists \
                     them)",
                    filter.described()
                );
            }
            let done =
                rejections::accept(&*warehouse, &chosen, note.as_deref(), keep_stale).await?;
            if filter.json {
                let in_loops: Vec<_> = done
                    .in_loops
                    .iter()
                    .map(|(sync, key)| serde_json::json!({ "sync": sync, "key": key }))
                    .collect();
                crate::output::json(
                    "rejections accept",
                    &serde_json::json!({
                        "accepted": done.accepted,
                        "outcome_changed": done.outcome_changed,
                        "in_loops": in_loops,
                    }),
                )?;
            } else {
                crate::say!(
                    "accepted {} invalid records as they are: runs still list them, but \
                     they no longer make a run degraded while they stay invalid for the same \
                     reason (loopsync rejections unaccept undoes it)",
                    done.accepted
                );
                if done.outcome_changed > 0 {
                    crate::say!(
                        "{} not accepted: their latest outcome changed since they were read (a \
                         run finished meanwhile; loopsync rejections shows them as they are now)",
                        done.outcome_changed
                    );
                }
            }
            if !done.in_loops.is_empty() {
                anyhow::bail!("{}", not_accepted_in_loops(&done.in_loops));
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(RejectionsAction::Unaccept(filter)) => {
            let config = load_config_for_warehouse(config_path, filter.sync.as_deref())?;
            let selection = filter.selection()?;
            let warehouse = open_warehouse(&config).await?;
            let chosen: Vec<RecordResult> = rejections::invalid(&*warehouse, &selection)
                .await?
                .into_iter()
                .filter(|r| r.accepted)
                .collect();
            if chosen.is_empty() {
                anyhow::bail!(
                    "no accepted invalid record matches ({}): nothing changed",
                    filter.described()
                );
            }
            let unaccepted = rejections::unaccept(&*warehouse, &chosen).await?;
            if filter.json {
                crate::output::json(
                    "rejections unaccept",
                    &serde_json::json!({ "unaccepted": unaccepted }),
                )?;
            } else {
                crate::say!(
                    "unaccepted {unaccepted} invalid records: the next run that finds them \
                     invalid is degraded again"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Why records whose contact Loops still holds were not accepted, naming them by sync and key,
/// and the ways on.
fn not_accepted_in_loops(in_loops: &[(String, String)]) -> String {
    let mut by_sync: Vec<(&str, Vec<String>)> = Vec::new();
    for (sync, key) in in_loops {
        match by_sync.iter_mut().find(|(s, _)| s == sync) {
            Some((_, keys)) => keys.push(printable(key).into_owned()),
            None => by_sync.push((sync, vec![printable(key).into_owned()])),
        }
    }
    let named: Vec<String> = by_sync
        .iter()
        .map(|(sync, keys)| format!("sync {sync}: {}", keys.join(", ")))
        .collect();
    format!(
        "{} invalid records not accepted: Loops still holds their contacts with the values it \
         last confirmed (the rows were sent, then became invalid), and keeps those values for as \
         long as the rows stay invalid ({}). Fix the rows so that the next run sends them, or \
         accept them with --keep-stale if Loops keeping the last values sent is intended",
        in_loops.len(),
        named.join("; ")
    )
}

/// `loopsync rejections [--sync NAME] [--json]`.
async fn list(config_path: &Path, sync: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let config = load_config_for_warehouse(config_path, sync)?;
    let warehouse = open_warehouse_read_only(&config).await?;
    let records = sorted(rejections::list(&*warehouse, sync).await?);
    if json {
        crate::output::json("rejections", &records)?;
        return Ok(ExitCode::SUCCESS);
    }
    if records.is_empty() {
        crate::say!("no invalid, rejected or dead-lettered records");
        return Ok(ExitCode::SUCCESS);
    }
    crate::say!(
        "{:<12} {:<20} {:>5}  {:<14} {:<8} REASON",
        "SYNC",
        "KEY",
        "RUN",
        "OUTCOME",
        "ACCEPTED"
    );
    for r in records {
        crate::say!(
            "{:<12} {:<20} {:>5}  {:<14} {:<8} {}",
            r.sync,
            printable(&r.key),
            r.run_id,
            r.outcome,
            if r.accepted { "accepted" } else { "-" },
            printable(r.reason.as_deref().unwrap_or_default())
        );
    }
    Ok(ExitCode::SUCCESS)
}
