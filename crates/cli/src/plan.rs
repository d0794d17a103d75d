//! `loopsync plan`: a dry run. The diff and, per record, the operation a run would send; counts,
//! and the time the requests need at the rate budget. Sends nothing, changes no state. The plan
//! is the engine's (`loopsync_engine::plan`); here it is printed, as text or streamed JSON.

use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_engine::plan::{PlannedRecord, SyncPlan, plan};

use crate::common::{load_config_for_warehouse, open_warehouse_read_only};
use crate::escape::printable;

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// Print the report as one JSON document on stdout (docs/json.md).
    #[arg(long)]
    json: bool,
    /// Records listed per sync in the text report (all in --json).
    #[arg(long, default_value_t = 50)]
    show: usize,
}

/// `plan --json`, written as it is computed: the envelope of every `--json` document
/// (docs/json.md), its `data` a JSON array of one object per sync, each with
/// `sync`, `records` (one line each), then `counts`, `invalid`, `requests` and
/// `seconds_at_rate_budget`, and for a contact sync with a cursor `diff` (see [`diff_json`]).
/// Nothing is kept per record.
struct JsonPlan<W: Write> {
    out: W,
    syncs: usize,
    records: usize,
}

impl<W: Write> JsonPlan<W> {
    fn new(mut out: W) -> io::Result<JsonPlan<W>> {
        write!(
            out,
            "{{\"version\": {}, \"command\": \"plan\", \"data\": [",
            crate::output::VERSION
        )?;
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
            "{indent}],\n    \"counts\": {},\n    \"invalid\": {},\n    \"requests\": {},\n    \"seconds_at_rate_budget\": {}{}\n  }}",
            serde_json::to_string(&plan.counts)?,
            plan.invalid,
            plan.requests,
            serde_json::to_string(&plan.seconds_at_rate_budget)?,
            diff_json(plan)?
        )
    }

    fn finish(mut self) -> io::Result<W> {
        let newline = if self.syncs > 0 { "\n" } else { "" };
        writeln!(self.out, "{newline}]}}")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

pub async fn run(config_path: &Path, args: PlanArgs) -> anyhow::Result<ExitCode> {
    // Only the warehouse: a dry run never needs Loops' secrets (PRODUCT.md).
    let config = load_config_for_warehouse(config_path, args.sync.as_deref())?;
    // Reads the state, makes nothing (none yet: every row is new).
    let warehouse = open_warehouse_read_only(&config).await?;
    let rps = config.loops.requests_per_second;
    let specs = config
        .syncs
        .iter()
        .map(|s| &s.spec)
        .filter(|spec| args.sync.as_ref().is_none_or(|n| *n == spec.name));
    if args.json {
        let mut json = JsonPlan::new(io::BufWriter::new(crate::output::Stdout))?;
        for spec in specs {
            json.start_sync(&spec.name)?;
            let plan = plan(&*warehouse, spec, rps, |r| json.record(&r)).await?;
            json.end_sync(&plan)?;
        }
        json.finish()?;
        return Ok(ExitCode::SUCCESS);
    }
    for spec in specs {
        // The first `show` records, and how many there are.
        let (mut shown, mut listed) = (Vec::new(), 0usize);
        // On an interactive terminal: the records planned so far.
        let spinner = (std::io::IsTerminal::is_terminal(&io::stderr()) && !crate::logs::is_json())
            .then(|| {
                let spinner = indicatif::ProgressBar::new_spinner();
                spinner.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{spinner} {msg} {pos} records planned",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                spinner.set_message(format!("sync {}:", spec.name));
                spinner.enable_steady_tick(std::time::Duration::from_millis(200));
                spinner
            });
        let plan = plan(&*warehouse, spec, rps, |r| {
            listed += 1;
            if let Some(spinner) = &spinner {
                spinner.set_position(listed as u64);
            }
            if shown.len() < args.show {
                shown.push(r);
            }
            Ok::<_, std::convert::Infallible>(())
        })
        .await?;
        if let Some(spinner) = spinner {
            spinner.finish_and_clear();
        }
        for line in text_lines(&plan, &shown, listed, rps) {
            crate::say!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A contact sync's diff, as the JSON plan says it: `"diff"` (`full`, `incremental`), with
/// `"diff_since"` (RFC 3339) or `"why_full_diff"`.
fn diff_json(plan: &SyncPlan) -> io::Result<String> {
    let Some(kind) = plan.counts.diff else {
        return Ok(String::new());
    };
    let mut out = format!(",\n    \"diff\": {}", serde_json::to_string(&kind)?);
    if let Some(since) = plan.since {
        let since = loopsync_core::value::millis_to_rfc3339(since);
        out += &format!(",\n    \"diff_since\": {}", serde_json::to_string(&since)?);
    }
    if let Some(why) = plan.why_full {
        out += &format!(",\n    \"why_full_diff\": {}", serde_json::to_string(why)?);
    }
    Ok(out)
}

/// The diff a contact sync's run would run, in words.
fn diff_line(plan: &SyncPlan) -> Option<String> {
    let kind = plan.counts.diff?;
    Some(match (plan.since, plan.why_full) {
        (Some(since), _) => format!(
            "  diff:     {} (rows whose cursor is at or after {}, and rows not noted unchanged)",
            kind.as_str(),
            loopsync_core::value::millis_to_rfc3339(since)
        ),
        (None, Some(why)) => format!("  diff:     {} ({why})", kind.as_str()),
        (None, None) => format!("  diff:     {}", kind.as_str()),
    })
}

/// The text plan of one sync: the counts as the run's report will show them (one rows line
/// for both, `report::rows_line`), the requests, why the run would fail, then each record
/// shown, field by field (values on the user's terminal only: nothing of it is logged).
fn text_lines(plan: &SyncPlan, shown: &[PlannedRecord], listed: usize, rps: u32) -> Vec<String> {
    let c = &plan.counts;
    let mut lines = vec![
        format!("sync {} (dry run: nothing sent)", plan.sync),
        format!(
            "  rows:     {}",
            crate::report::rows_line(
                c.added,
                c.changed,
                c.unchanged,
                c.invalid_rows,
                c.ignored,
                c.removed
            )
        ),
        format!(
            "  requests: {} — {:.1} s at {} requests/s",
            plan.requests, plan.seconds_at_rate_budget, rps
        ),
    ];
    lines.extend(diff_line(plan));
    if let Some(error) = &c.error {
        lines.push(format!("  a run would fail: {}", printable(error)));
    }
    for r in shown {
        lines.push(format!(
            "    {} {:<12} {}",
            r.sign(),
            printable(&r.key),
            printable(&r.describe())
        ));
    }
    if listed > shown.len() {
        lines.push(format!(
            "    … and {} more (--show N lists more, --json lists all)",
            listed - shown.len()
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use loopsync_engine::plan::PlannedChange;
    use loopsync_engine::state::ExtractCounts;
    use serde_json::{Value, json};

    use super::*;

    fn record(key: &str) -> PlannedRecord {
        PlannedRecord {
            key: key.into(),
            change: PlannedChange::Added,
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
            since: None,
            why_full: None,
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
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["command"], "plan");
        assert_eq!(
            doc["data"],
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
        assert_eq!(
            serde_json::from_slice::<Value>(&none).unwrap()["data"],
            json!([])
        );
    }
}
