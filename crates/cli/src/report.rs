//! Run reports, for people and (`--json`) for programs.

use loopsync_engine::state::{RunStatus, RunSummary};

/// The exit status of a finished run: 0 succeeded, 3 degraded, 1 failed.
pub fn exit_status(runs: &[RunSummary]) -> u8 {
    if runs
        .iter()
        .any(|r| matches!(r.status, RunStatus::Failed | RunStatus::Interrupted))
    {
        1
    } else if runs.iter().any(|r| r.status == RunStatus::Degraded) {
        3
    } else {
        0
    }
}

/// A few lines per run. Rows add up to the model's rows, records to the run's records,
/// requests by kind to the requests (`RunSummary` defines each count).
pub fn text(run: &RunSummary) -> String {
    let duration = run
        .duration_ms
        .map(|ms| format!(" in {:.1} s", ms as f64 / 1000.0))
        .unwrap_or_default();
    let model_rows = run.added + run.changed + run.unchanged + run.invalid_rows + run.ignored;
    // An event sync's rows sent before and changed since (never sent again).
    let ignored = if run.ignored > 0 {
        format!(" · ignored {} (already sent)", run.ignored)
    } else {
        String::new()
    };
    let kinds = &run.requests_by_kind;
    // Invalid records accepted as they are (`rejections accept`): counted, not degrading.
    let accepted = if run.accepted > 0 {
        format!(" (accepted {})", run.accepted)
    } else {
        String::new()
    };
    let mut out = format!(
        "sync {} · run {} · {}{duration}\n  \
         rows:     added {} · changed {} · unchanged {} · invalid {}{ignored} (= {model_rows} model rows) · removed {}\n  \
         records:  confirmed {} · skipped {} · invalid {}{accepted} · rejected {} · dead-lettered {} (= {} records)\n  \
         requests: {} to Loops: writes {} · events {} · deletes {} · preflight {}; of them retries {} · rate-limited (429) {}\n",
        run.sync,
        run.id,
        run.status,
        run.added,
        run.changed,
        run.unchanged,
        run.invalid_rows,
        run.removed,
        run.confirmed,
        run.skipped,
        run.invalid,
        run.rejected,
        run.dead_lettered,
        run.records,
        run.requests,
        kinds.writes,
        kinds.events,
        kinds.deletes,
        kinds.preflight,
        run.retries,
        run.rate_limited,
    );
    if run.rekeyed > 0 {
        out.push_str(&format!(
            "  re-keyed: {} (the email changed, so the new address was written as its own contact; \
             under mirror the old contact was removed, under upsert it stays in Loops)\n",
            run.rekeyed
        ));
    }
    if let Some(error) = &run.error {
        out.push_str(&format!("  error: {}\n", crate::escape::printable(error)));
    }
    if run.invalid + run.rejected + run.dead_lettered > 0 {
        out.push_str("  see: loopsync rejections\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use loopsync_engine::state::RequestsByKind;

    use super::*;

    /// The report's arithmetic: the rows add up to the model, the records to the run's, the
    /// kinds to the requests; and the lines say so.
    #[test]
    fn text_report_adds_up() {
        let run = RunSummary {
            id: 7,
            sync: "users".into(),
            status: RunStatus::Degraded,
            duration_ms: Some(1234),
            added: 3,
            changed: 2,
            unchanged: 29,
            invalid_rows: 5,
            removed: 1,
            records: 10,
            confirmed: 5,
            invalid: 5,
            requests: 38,
            requests_by_kind: RequestsByKind {
                writes: 33,
                events: 0,
                deletes: 0,
                preflight: 5,
            },
            retries: 3,
            rate_limited: 2,
            ..RunSummary::default()
        };
        assert_eq!(run.requests, run.requests_by_kind.total());
        let text = text(&run);
        assert!(
            text.starts_with("sync users · run 7 · degraded in 1.2 s\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "added 3 · changed 2 · unchanged 29 · invalid 5 (= 39 model rows) · removed 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "confirmed 5 · skipped 0 · invalid 5 · rejected 0 · dead-lettered 0 (= 10 records)"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "requests: 38 to Loops: writes 33 · events 0 · deletes 0 · preflight 5; of them retries 3 · rate-limited (429) 2"
            ),
            "{text}"
        );
        assert!(text.contains("see: loopsync rejections"));
        assert_eq!(exit_status(&[run]), 3);
    }

    /// Invalid records accepted as they are are counted, and said to be accepted.
    #[test]
    fn accepted_invalid_records_are_said() {
        let run = RunSummary {
            status: RunStatus::Succeeded,
            invalid_rows: 12,
            records: 12,
            invalid: 12,
            accepted: 12,
            ..RunSummary::default()
        };
        let text = text(&run);
        assert!(
            text.contains("invalid 12 (accepted 12) · rejected 0"),
            "{text}"
        );
        assert!(
            text.contains("see: loopsync rejections"),
            "still listed: {text}"
        );
        assert_eq!(exit_status(&[run]), 0);
    }
}
