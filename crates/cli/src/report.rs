//! Run reports, for people and (`--json`) for programs.

use loopsync_warehouse::RunSummary;

/// The exit status of a finished run: 0 succeeded, 3 degraded, 1 failed.
pub fn exit_status(runs: &[RunSummary]) -> u8 {
    if runs.iter().any(|r| r.status == "failed") {
        1
    } else if runs.iter().any(|r| r.status == "degraded") {
        3
    } else {
        0
    }
}

/// A few lines per run.
pub fn text(run: &RunSummary) -> String {
    let duration = run
        .duration_ms
        .map(|ms| format!(" in {:.1} s", ms as f64 / 1000.0))
        .unwrap_or_default();
    let mut out = format!(
        "sync {} · run {} · {}{duration}\n  rows:    added {} · changed {} · removed {} · unchanged {}\n  records: confirmed {} · skipped {} · invalid {} · rejected {} · dead-lettered {}\n  requests sent to Loops: {}\n",
        run.sync,
        run.id,
        run.status,
        run.added,
        run.changed,
        run.removed,
        run.unchanged,
        run.confirmed,
        run.skipped,
        run.invalid,
        run.rejected,
        run.dead_lettered,
        run.requests
    );
    if run.rekeyed > 0 {
        out.push_str(&format!(
            "  re-keyed: {} (the email changed, so the new address was written as its own contact; \
             under mirror the old contact was removed, under upsert it stays in Loops)\n",
            run.rekeyed
        ));
    }
    if let Some(error) = &run.error {
        out.push_str(&format!("  error: {error}\n"));
    }
    if run.invalid + run.rejected + run.dead_lettered > 0 {
        out.push_str("  see: loopsync rejections\n");
    }
    out
}
