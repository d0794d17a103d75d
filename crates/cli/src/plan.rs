//! `loopsync plan`: a dry run. The diff and, per record, the operation a run would send; counts,
//! and the time the requests need at the rate budget. Sends nothing, changes no state.

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use futures::StreamExt;
use loopsync_core::envelope::ChangeKind;
use loopsync_core::spec::SyncSpec;
use loopsync_extractor::{Decision, KeyGroups, decide_group, tally};
use loopsync_transformer::{Invalid, transform};
use loopsync_warehouse::{ExtractCounts, Warehouse};
use serde::Serialize;

use crate::{load_config_for_warehouse, open_warehouse};

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

/// The plan of one sync, but its records.
#[derive(Debug, Serialize)]
struct SyncPlan {
    sync: String,
    counts: ExtractCounts,
    invalid: i64,
    /// Requests a run would send (one per operation, before any retry).
    requests: i64,
    /// `requests` at `requests_per_second`.
    seconds_at_rate_budget: f64,
}

/// `plan --json`, written as it is computed: a JSON array of one object per sync, each with
/// `sync`, `records` (one line each), then `counts`, `invalid`, `requests` and
/// `seconds_at_rate_budget`. Nothing is kept per record.
struct JsonPlan<W: Write> {
    out: W,
    syncs: usize,
    records: usize,
}

impl<W: Write> JsonPlan<W> {
    fn new(mut out: W) -> io::Result<JsonPlan<W>> {
        out.write_all(b"[")?;
        Ok(JsonPlan {
            out,
            syncs: 0,
            records: 0,
        })
    }

    fn start_sync(&mut self, sync: &str) -> io::Result<()> {
        let comma = if self.syncs > 0 { "," } else { "" };
        self.syncs += 1;
        self.records = 0;
        write!(
            self.out,
            "{comma}\n  {{\n    \"sync\": {},\n    \"records\": [",
            serde_json::to_string(sync)?
        )
    }

    fn record(&mut self, record: &PlannedRecord) -> io::Result<()> {
        let comma = if self.records > 0 { "," } else { "" };
        self.records += 1;
        write!(
            self.out,
            "{comma}\n      {}",
            serde_json::to_string(record)?
        )
    }

    fn end_sync(&mut self, plan: &SyncPlan) -> io::Result<()> {
        let indent = if self.records > 0 { "\n    " } else { "" };
        write!(
            self.out,
            "{indent}],\n    \"counts\": {},\n    \"invalid\": {},\n    \"requests\": {},\n    \"seconds_at_rate_budget\": {}\n  }}",
            serde_json::to_string(&plan.counts)?,
            plan.invalid,
            plan.requests,
            serde_json::to_string(&plan.seconds_at_rate_budget)?
        )
    }

    fn finish(mut self) -> io::Result<W> {
        let newline = if self.syncs > 0 { "\n" } else { "" };
        writeln!(self.out, "{newline}]")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The record a decision plans, counted in `plan`.
fn planned(spec: &SyncSpec, decision: Decision, plan: &mut SyncPlan) -> Option<PlannedRecord> {
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
                    Some(PlannedRecord {
                        key: change.key,
                        change: kind.into(),
                        operation: op.action.name().into(),
                        action: serde_json::to_value(&op.action).ok(),
                        reason: None,
                    })
                }
                Err(Invalid(reason)) => {
                    plan.invalid += 1;
                    Some(PlannedRecord {
                        key: change.key,
                        change: "invalid".into(),
                        operation: "none".into(),
                        action: None,
                        reason: Some(reason),
                    })
                }
            }
        }
        Decision::Invalid { key, reason, .. } => {
            plan.invalid += 1;
            Some(PlannedRecord {
                key,
                change: "invalid".into(),
                operation: "none".into(),
                action: None,
                reason: Some(reason),
            })
        }
        Decision::Unchanged | Decision::RemovedKept | Decision::Nothing | Decision::Parked => None,
    }
}

/// Plans one sync, handing each record to `each` as it is decided.
async fn plan_sync(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    requests_per_second: u32,
    mut each: impl FnMut(PlannedRecord) -> io::Result<()>,
) -> anyhow::Result<SyncPlan> {
    let mut plan = SyncPlan {
        sync: spec.name.clone(),
        counts: ExtractCounts::default(),
        invalid: 0,
        requests: 0,
        seconds_at_rate_budget: 0.0,
    };
    let mut rows = warehouse.diff(spec).await?;
    let mut groups = KeyGroups::default();
    let mut nulls = 0;
    let mut decide = |plan: &mut SyncPlan, group| -> io::Result<()> {
        // Run id 0: nothing is published, the id only names the run.
        let decision = decide_group(spec, 0, group, &mut nulls);
        tally(&mut plan.counts, &decision);
        match planned(spec, decision, plan) {
            Some(record) => each(record),
            None => Ok(()),
        }
    };
    while let Some(row) = rows.next().await {
        for group in groups.push(row?) {
            decide(&mut plan, group)?;
        }
    }
    if let Some(group) = groups.finish() {
        decide(&mut plan, group)?;
    }
    plan.seconds_at_rate_budget = plan.requests as f64 / f64::from(requests_per_second);
    Ok(plan)
}

pub async fn run(config_path: &Path, args: PlanArgs) -> anyhow::Result<ExitCode> {
    // Only the warehouse: a dry run never needs Loops' secrets (PRODUCT.md).
    let config = load_config_for_warehouse(config_path, args.sync.as_deref())?;
    let warehouse = open_warehouse(&config).await?;
    let rps = config.loops.requests_per_second;
    let specs = config
        .syncs
        .iter()
        .map(|s| &s.spec)
        .filter(|spec| args.sync.as_ref().is_none_or(|n| *n == spec.name));
    if args.json {
        let mut json = JsonPlan::new(io::BufWriter::new(io::stdout().lock()))?;
        for spec in specs {
            json.start_sync(&spec.name)?;
            let plan = plan_sync(&*warehouse, spec, rps, |r| json.record(&r)).await?;
            json.end_sync(&plan)?;
        }
        json.finish()?;
        return Ok(ExitCode::SUCCESS);
    }
    for spec in specs {
        // The first `show` records, and how many there are.
        let (mut shown, mut listed) = (Vec::new(), 0usize);
        let plan = plan_sync(&*warehouse, spec, rps, |r| {
            listed += 1;
            if shown.len() < args.show {
                shown.push(r);
            }
            Ok(())
        })
        .await?;
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
            rps
        );
        for r in &shown {
            match &r.reason {
                Some(reason) => println!("    {:<20} invalid   {reason}", r.key),
                None => println!("    {:<20} {:<9} {}", r.key, r.change, r.operation),
            }
        }
        if listed > shown.len() {
            println!("    … and {} more (--json lists all)", listed - shown.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn record(key: &str) -> PlannedRecord {
        PlannedRecord {
            key: key.into(),
            change: "added".into(),
            operation: "upsert".into(),
            action: Some(json!({"email": format!("{key}@x.co")})),
            reason: None,
        }
    }

    fn plan(sync: &str, requests: i64) -> SyncPlan {
        SyncPlan {
            sync: sync.into(),
            counts: ExtractCounts {
                added: requests,
                ..ExtractCounts::default()
            },
            invalid: 0,
            requests,
            seconds_at_rate_budget: requests as f64 / 50.0,
        }
    }

    /// Each record is written out as it comes (nothing waits for the end), and the whole is
    /// the JSON document `plan --json` always printed: an array of syncs, each with its
    /// counts and its records.
    #[test]
    fn json_plan_streams_the_document() {
        let mut json = JsonPlan::new(Vec::new()).unwrap();
        json.start_sync("users").unwrap();
        json.record(&record("1")).unwrap();
        let before = json.out.len();
        json.record(&record("2")).unwrap();
        assert!(
            String::from_utf8_lossy(&json.out[before..]).contains("\"2@x.co\""),
            "the record is written when it is planned"
        );
        json.end_sync(&plan("users", 2)).unwrap();
        json.start_sync("empty").unwrap();
        json.end_sync(&plan("empty", 0)).unwrap();
        let out = json.finish().unwrap();
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            doc,
            json!([
                {
                    "sync": "users",
                    "counts": serde_json::to_value(plan("users", 2).counts).unwrap(),
                    "invalid": 0,
                    "requests": 2,
                    "seconds_at_rate_budget": 0.04,
                    "records": [
                        {"key": "1", "change": "added", "operation": "upsert",
                         "action": {"email": "1@x.co"}},
                        {"key": "2", "change": "added", "operation": "upsert",
                         "action": {"email": "2@x.co"}},
                    ],
                },
                {
                    "sync": "empty",
                    "counts": serde_json::to_value(ExtractCounts::default()).unwrap(),
                    "invalid": 0,
                    "requests": 0,
                    "seconds_at_rate_budget": 0.0,
                    "records": [],
                },
            ])
        );
        let none = JsonPlan::new(Vec::new()).unwrap().finish().unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&none).unwrap(), json!([]));
    }
}
