//! Run reports, for people and (`--json`) for programs.

use loopsync_core::spec::{Behavior, OnRemove, SyncSpec};
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

/// The rows line of a run's report and of a plan, one format for both: the model's rows add
/// up (`RunSummary` defines each count), then the keys that left.
pub fn rows_line(
    added: i64,
    changed: i64,
    unchanged: i64,
    invalid_rows: i64,
    ignored: i64,
    removed: i64,
) -> String {
    let model_rows = added + changed + unchanged + invalid_rows + ignored;
    // An event sync's rows sent before and changed since (never sent again).
    let ignored = if ignored > 0 {
        format!(" · ignored {ignored} (already sent)")
    } else {
        String::new()
    };
    format!(
        "added {added} · changed {changed} · unchanged {unchanged} · invalid {invalid_rows}{ignored} \
         (= {model_rows} model rows) · removed {removed}"
    )
}

/// What became of the old contact of a re-keyed record, by the sync's behaviour (`None`: the
/// sync is no longer in the config).
fn old_contact(spec: Option<&SyncSpec>) -> &'static str {
    match spec.map(|s| (s.behavior, s.on_remove)) {
        Some((Behavior::Mirror, OnRemove::Delete)) => "the old contact was deleted",
        Some((Behavior::Mirror, OnRemove::Unsubscribe)) => {
            "the old contact was unsubscribed (it stays in Loops)"
        }
        Some(_) => "the old contact stays in Loops (upsert removes nothing)",
        None => {
            "mirror removes the old contact (deleted or unsubscribed, as on_remove says), upsert leaves it"
        }
    }
}

/// A few lines per run. Rows add up to the model's rows, records to the run's records,
/// requests by kind to the requests (`RunSummary` defines each count). `spec`: the run's sync
/// as the config has it, when it does (it says what a re-key did to the old contact).
pub fn text(run: &RunSummary, spec: Option<&SyncSpec>) -> String {
    let duration = run
        .duration_ms
        .map(|ms| format!(" in {:.1} s", ms as f64 / 1000.0))
        .unwrap_or_default();
    let kinds = &run.requests_by_kind;
    // Invalid records accepted as they are (`rejections accept`): counted, not degrading.
    let accepted = if run.accepted > 0 {
        format!(" (accepted {})", run.accepted)
    } else {
        String::new()
    };
    let mut out = format!(
        "sync {} · run {} · {}{duration}\n  \
         rows:     {}\n  \
         records:  confirmed {} · skipped {} · invalid {}{accepted} · rejected {} · dead-lettered {} (= {} records)\n  \
         requests: {} to Loops: writes {} · events {} · deletes {} · preflight {}; of them retries {} · rate-limited (429) {}\n",
        run.sync,
        run.id,
        run.status,
        rows_line(
            run.added,
            run.changed,
            run.unchanged,
            run.invalid_rows,
            run.ignored,
            run.removed
        ),
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
    if let Some(diff) = run.diff {
        out.push_str(&format!("  diff:     {}\n", diff.as_str()));
    }
    if run.rekeyed > 0 {
        out.push_str(&format!(
            "  re-keyed: {} (the email changed, so the new address was written as its own contact; \
             {})\n",
            run.rekeyed,
            old_contact(spec)
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
        let text = text(&run, None);
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
        let text = text(&run, None);
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

    /// The re-key line says what became of the old contact, by the sync's behaviour: deleted,
    /// unsubscribed (kept), or left under upsert.
    #[test]
    fn the_rekey_line_says_what_on_remove_did() {
        let run = RunSummary {
            rekeyed: 2,
            ..RunSummary::default()
        };
        let mut spec = loopsync_core::spec::SyncSpec {
            behavior: Behavior::Mirror,
            on_remove: OnRemove::Unsubscribe,
            ..serde_json::from_value(serde_json::json!({
                "name": "users", "model": "m", "primary_key": "id", "identify_by": "email",
                "behavior": "mirror", "on_remove": "delete", "trigger_workflows": false,
                "event_on_create": "c", "event_on_update": "u", "properties": [], "lists": [],
                "max_removal_share": 0.2
            }))
            .unwrap()
        };
        let said = |spec: Option<&SyncSpec>| text(&run, spec);
        let unsubscribed = said(Some(&spec));
        assert!(
            unsubscribed.contains("re-keyed: 2")
                && unsubscribed.contains("the old contact was unsubscribed (it stays in Loops)")
                && !unsubscribed.contains("was removed"),
            "{unsubscribed}"
        );
        spec.on_remove = OnRemove::Delete;
        assert!(said(Some(&spec)).contains("the old contact was deleted"));
        spec.behavior = Behavior::Upsert;
        assert!(said(Some(&spec)).contains("the old contact stays in Loops"));
    }
}
