//! `loopsync plan`: a dry run. The diff and, per record, the operation a run would send; counts,
//! and the time the requests need at the rate budget. Sends nothing, changes no state.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use futures::StreamExt;
use loopsync_core::envelope::ChangeKind;
use loopsync_extractor::{Decision, KeyGroups, decide_group, tally};
use loopsync_transformer::{Invalid, transform};
use loopsync_warehouse::ExtractCounts;
use serde::Serialize;

use crate::{load_config_for, open_warehouse};

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    #[arg(long)]
    json: bool,
    /// Records listed per sync in the text report (all in --json).
    #[arg(long, default_value_t = 50)]
    show: usize,
}

/// One record of a plan.
#[derive(Debug, Serialize)]
struct PlannedRecord {
    key: String,
    /// `added`, `changed`, `removed`, or `invalid`.
    change: String,
    /// The Loops operation, or `none` for an invalid record.
    operation: String,
    /// The operation as the loader would send it.
    #[serde(skip_serializing_if = "Option::is_none")]
    action: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// The plan of one sync.
#[derive(Debug, Serialize)]
struct SyncPlan {
    sync: String,
    counts: ExtractCounts,
    invalid: i64,
    /// Requests a run would send (one per operation, before any retry).
    requests: i64,
    /// `requests` at `requests_per_second`.
    seconds_at_rate_budget: f64,
    records: Vec<PlannedRecord>,
}

pub async fn run(config_path: &Path, args: PlanArgs) -> anyhow::Result<ExitCode> {
    let config = load_config_for(config_path, args.sync.as_deref())?;
    let warehouse = open_warehouse(&config).await?;
    let mut plans = Vec::new();
    for sync in &config.syncs {
        if args.sync.as_ref().is_some_and(|n| *n != sync.spec.name) {
            continue;
        }
        let spec = &sync.spec;
        let mut plan = SyncPlan {
            sync: spec.name.clone(),
            counts: ExtractCounts::default(),
            invalid: 0,
            requests: 0,
            seconds_at_rate_budget: 0.0,
            records: Vec::new(),
        };
        let mut rows = warehouse.diff(spec).await?;
        let mut groups = KeyGroups::default();
        let mut nulls = 0;
        let mut decide = |plan: &mut SyncPlan, group| {
            // Run id 0: nothing is published, the id only names the run.
            let decision = decide_group(spec, 0, group, &mut nulls);
            tally(&mut plan.counts, &decision);
            match decision {
                Decision::Change(change) => {
                    let kind = match change.kind {
                        ChangeKind::Added => "added",
                        ChangeKind::Changed => "changed",
                        ChangeKind::Removed => "removed",
                    };
                    match transform(spec, &change) {
                        Ok(op) => {
                            plan.requests += 1;
                            plan.records.push(PlannedRecord {
                                key: change.key,
                                change: kind.into(),
                                operation: op.action.name().into(),
                                action: serde_json::to_value(&op.action).ok(),
                                reason: None,
                            });
                        }
                        Err(Invalid(reason)) => {
                            plan.invalid += 1;
                            plan.records.push(PlannedRecord {
                                key: change.key,
                                change: "invalid".into(),
                                operation: "none".into(),
                                action: None,
                                reason: Some(reason),
                            });
                        }
                    }
                }
                Decision::Invalid { key, reason, .. } => {
                    plan.invalid += 1;
                    plan.records.push(PlannedRecord {
                        key,
                        change: "invalid".into(),
                        operation: "none".into(),
                        action: None,
                        reason: Some(reason),
                    });
                }
                Decision::Unchanged
                | Decision::RemovedKept
                | Decision::Nothing
                | Decision::Parked => {}
            }
        };
        while let Some(row) = rows.next().await {
            for group in groups.push(row?) {
                decide(&mut plan, group);
            }
        }
        if let Some(group) = groups.finish() {
            decide(&mut plan, group);
        }
        plan.seconds_at_rate_budget =
            plan.requests as f64 / f64::from(config.loops.requests_per_second);
        plans.push(plan);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plans)?);
        return Ok(ExitCode::SUCCESS);
    }
    for plan in &plans {
        let c = &plan.counts;
        println!(
            "sync {} (dry run: nothing sent)\n  rows:    added {} · changed {} · removed {} · unchanged {} · invalid {}\n  requests: {} — {:.1} s at {} requests/s",
            plan.sync,
            c.added,
            c.changed,
            c.removed,
            c.unchanged,
            plan.invalid,
            plan.requests,
            plan.seconds_at_rate_budget,
            config.loops.requests_per_second
        );
        for r in plan.records.iter().take(args.show) {
            match &r.reason {
                Some(reason) => println!("    {:<20} invalid   {reason}", r.key),
                None => println!("    {:<20} {:<9} {}", r.key, r.change, r.operation),
            }
        }
        if plan.records.len() > args.show {
            println!(
                "    … and {} more (--json lists all)",
                plan.records.len() - args.show
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
