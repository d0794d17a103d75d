//! `loopsync status`: per sync, the last run, the next scheduled run, the records pending, the
//! dead letters and why the sync is degraded (`loopsync_engine::status`), as text or JSON.
//! Reads the state only: the warehouse's settings, never Loops' secrets.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_engine::status::{Status, SyncStatus, status};

use crate::common::{load_config_for_warehouse, open_warehouse_read_only};
use crate::escape::printable;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// Print the status as one JSON document on stdout (docs/json.md).
    #[arg(long)]
    json: bool,
}

pub async fn run(config_path: &Path, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let config = load_config_for_warehouse(config_path, args.sync.as_deref())?;
    let warehouse = open_warehouse_read_only(&config).await?;
    let status = status(
        &*warehouse,
        &config.syncs,
        args.sync.as_deref(),
        chrono::Utc::now(),
    )
    .await?;
    if args.json {
        crate::output::json("status", &status)?;
    } else {
        crate::say_raw!("{}", text(&status));
    }
    Ok(ExitCode::SUCCESS)
}

/// The status as text: a few lines per sync.
pub fn text(status: &Status) -> String {
    let mut out = String::new();
    for s in &status.syncs {
        out.push_str(&sync_text(s));
    }
    if status.syncs.is_empty() {
        out.push_str("no sync\n");
    }
    out
}

fn sync_text(s: &SyncStatus) -> String {
    let schedule = match (&s.schedule, &s.next_run_at) {
        (Some(schedule), Some(next)) => format!("schedule {schedule} · next run {next}"),
        (Some(schedule), None) => format!("schedule {schedule} · fires no more"),
        (None, _) => "no schedule".to_owned(),
    };
    let mut out = format!("sync {} ({}) · {schedule}\n", s.sync, s.behavior);
    match &s.last_run {
        None => out.push_str("  last run: none yet\n"),
        Some(run) => {
            let duration = run
                .duration_ms
                .map(|ms| format!(" · {:.1} s", ms as f64 / 1000.0))
                .unwrap_or_default();
            out.push_str(&format!(
                "  last run {}: {} · requested {}{duration} · added {} · changed {} · removed {} · \
                 unchanged {} · invalid {} · rejected {} · dead-lettered {} · {} requests\n",
                run.id,
                run.status,
                run.requested_at,
                run.added,
                run.changed,
                run.removed,
                run.unchanged,
                run.invalid,
                run.rejected,
                run.dead_lettered,
                run.requests,
            ));
            if let Some(error) = &run.error {
                out.push_str(&format!("  error: {}\n", printable(error)));
            }
        }
    }
    let p = &s.pending;
    out.push_str(&format!(
        "  pending: {} records · to retry {} (invalid {} · rejected {} · dead-lettered {}) · in \
         flight {}\n",
        p.records, p.retried, p.invalid, p.rejected, p.dead_lettered, p.in_flight
    ));
    out.push_str(&format!(
        "  dead letters: {} · parked {}\n",
        s.dead_letters.records, s.dead_letters.parked
    ));
    if let Some(d) = &s.degraded {
        out.push_str(&format!(
            "  degraded (run {}): invalid {} · rejected {} · dead-lettered {}\n",
            d.run_id, d.invalid, d.rejected, d.dead_lettered
        ));
        for r in &d.reasons {
            out.push_str(&format!(
                "    {} {}: {}\n",
                r.records,
                r.outcome.replace('_', "-"),
                printable(&r.reason)
            ));
        }
        out.push_str(&format!(
            "    (loopsync rejections --sync {} lists the records)\n",
            s.sync
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use loopsync_engine::state::{RunStatus, RunSummary};
    use loopsync_engine::status::{DeadLetters, Degraded, Pending, Reason};

    use super::*;

    /// The text says each part of the status, and escapes what could drive a terminal.
    #[test]
    fn the_text_says_every_part() {
        let s = SyncStatus {
            sync: "users".into(),
            behavior: "mirror".into(),
            schedule: Some("*/15 * * * *".into()),
            next_run_at: Some("2026-01-02T10:15:00.000Z".into()),
            last_run: Some(RunSummary {
                id: 7,
                sync: "users".into(),
                status: RunStatus::Degraded,
                requested_at: "2026-01-02T10:00:00.000Z".into(),
                duration_ms: Some(2500),
                added: 3,
                invalid: 2,
                requests: 4,
                ..RunSummary::default()
            }),
            pending: Pending {
                records: 3,
                retried: 2,
                invalid: 2,
                in_flight: 1,
                ..Pending::default()
            },
            dead_letters: DeadLetters {
                records: 1,
                parked: 1,
            },
            degraded: Some(Degraded {
                run_id: 7,
                invalid: 2,
                rejected: 0,
                dead_lettered: 0,
                reasons: vec![Reason {
                    outcome: "invalid".into(),
                    reason: "bad\u{1b}[2J".into(),
                    records: 2,
                }],
            }),
        };
        let text = text(&Status {
            at: "now".into(),
            syncs: vec![s],
        });
        for part in [
            "sync users (mirror) · schedule */15 * * * * · next run 2026-01-02T10:15:00.000Z",
            "last run 7: degraded · requested 2026-01-02T10:00:00.000Z · 2.5 s · added 3",
            "invalid 2 · rejected 0",
            "pending: 3 records · to retry 2 (invalid 2 · rejected 0 · dead-lettered 0) · in flight 1",
            "dead letters: 1 · parked 1",
            "degraded (run 7): invalid 2",
            "2 invalid: bad\\u{1b}[2J",
        ] {
            assert!(text.contains(part), "{part:?} in:\n{text}");
        }
    }
}
