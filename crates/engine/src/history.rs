//! What `loopsync runs show` singles out of a run's records: those that did not go through.

use loopsync_core::envelope::OutcomeStatus;
use loopsync_warehouse::RecordResult;

/// The record did not reach Loops in this run: invalid (the transformer refused it), rejected
/// (Loops refused it) or dead-lettered (retries spent). Each is shown with its reason.
pub fn did_not_go_through(record: &RecordResult) -> bool {
    [
        OutcomeStatus::Invalid,
        OutcomeStatus::Rejected,
        OutcomeStatus::DeadLettered,
    ]
    .iter()
    .any(|o| o.as_str() == record.outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_rejected_and_dead_letters_did_not_go_through() {
        let record = |outcome: &str| RecordResult {
            run_id: 1,
            sync: "users".into(),
            key: "1".into(),
            operation: "upsert".into(),
            outcome: outcome.into(),
            reason: None,
            contact_id: None,
            requests: 1,
            at: "2026-11-28T10:00:00Z".into(),
        };
        for outcome in ["invalid", "rejected", "dead_lettered"] {
            assert!(did_not_go_through(&record(outcome)), "{outcome}");
        }
        for outcome in ["confirmed", "skipped"] {
            assert!(!did_not_go_through(&record(outcome)), "{outcome}");
        }
    }
}
