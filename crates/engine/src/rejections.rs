//! `loopsync rejections`: the records whose latest outcome failed (invalid, rejected,
//! dead-lettered), and accepting invalid ones. A row invalid for good (no email, ever) would keep
//! every run `degraded`; accepted (`rejections accept`), it stays listed and counted, but no
//! longer makes a run degraded while it stays invalid for the reason accepted. Another reason,
//! or the row sent, ends the acceptance (the rule is the state's: `Warehouse::accept_invalid`).
//! Records are chosen by the [`Filter`] the dead-letter commands use.

use loopsync_core::envelope::OutcomeStatus;
use loopsync_warehouse::{RecordResult, Warehouse, WarehouseError};

pub use crate::selection::Filter;
use crate::selection::{by_sync, select};

/// Every record of `sync` (every sync: `None`) whose latest outcome failed, each `accepted` when
/// it is an invalid record accepted for its latest reason.
pub async fn list(
    warehouse: &dyn Warehouse,
    sync: Option<&str>,
) -> Result<Vec<RecordResult>, WarehouseError> {
    warehouse.rejections(sync).await
}

/// The invalid records `filter` selects (by their latest outcome), accepted or not.
pub async fn invalid(
    warehouse: &dyn Warehouse,
    filter: &Filter,
) -> Result<Vec<RecordResult>, WarehouseError> {
    select(warehouse, OutcomeStatus::Invalid, filter).await
}

/// What [`accept`] did with the records it was given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Records accepted.
    pub accepted: u64,
    /// Records not accepted: their latest outcome changed since they were read (a run
    /// finished meanwhile).
    pub outcome_changed: u64,
    /// `(sync, key)` of the records not accepted because Loops still holds their contact with
    /// the values it last confirmed (the row was sent, then became invalid), without
    /// `in_loops_too`.
    pub in_loops: Vec<(String, String)>,
}

/// Accepts `records` (invalid ones, from [`invalid`]) as invalid for their latest reason, with
/// an optional `note`: runs list them, but they no longer make a run degraded while they stay
/// invalid for that reason. A record whose contact Loops still holds with the values it last
/// confirmed is accepted only with `in_loops_too` (accepting it means Loops keeps those values
/// while the row stays invalid); the rule is the state's (`Warehouse::accept_invalid`).
pub async fn accept(
    warehouse: &dyn Warehouse,
    records: &[RecordResult],
    note: Option<&str>,
    in_loops_too: bool,
) -> Result<Accepted, WarehouseError> {
    let mut done = Accepted::default();
    for (sync, keys) in by_sync(records) {
        let of_sync: Vec<(String, String)> = records
            .iter()
            .filter(|r| r.sync == sync && keys.contains(&r.key))
            .map(|r| (r.key.clone(), r.reason.clone().unwrap_or_default()))
            .collect();
        let acceptance = warehouse
            .accept_invalid(&sync, &of_sync, note, in_loops_too)
            .await?;
        done.accepted += acceptance.accepted;
        done.outcome_changed += acceptance.outcome_changed;
        done.in_loops.extend(
            acceptance
                .in_loops
                .into_iter()
                .map(|key| (sync.clone(), key)),
        );
    }
    Ok(done)
}

/// Undoes [`accept`] for `records`: their next invalid outcome makes the run degraded again.
/// How many acceptances ended.
pub async fn unaccept(
    warehouse: &dyn Warehouse,
    records: &[RecordResult],
) -> Result<u64, WarehouseError> {
    let mut ended = 0;
    for (sync, keys) in by_sync(records) {
        ended += warehouse.unaccept_invalid(&sync, &keys).await?;
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use loopsync_core::envelope::Outcome;

    use super::*;

    /// Accepting takes each invalid record's latest reason; the list says so at once; another
    /// outcome is never accepted; unaccept undoes it.
    #[tokio::test]
    async fn invalid_records_are_accepted_for_their_reason() {
        let model = crate::testing::Model::new().await;
        let w = &*model.warehouse;
        let run = w.create_run("users").await.unwrap();
        let outcomes: Vec<Outcome> = [
            ("1", OutcomeStatus::Invalid, "no email"),
            (
                "2",
                OutcomeStatus::Invalid,
                "malformed email (column email)",
            ),
            ("3", OutcomeStatus::Rejected, "invalid request (400): no"),
        ]
        .into_iter()
        .map(|(key, status, reason)| {
            Outcome::new("users", run, key, "fp", status, "upsert").with_reason(reason)
        })
        .collect();
        w.record_outcomes(&outcomes).await.unwrap();
        let malformed = Filter {
            reason: Some("malformed".into()),
            ..Filter::default()
        };
        let chosen = invalid(w, &malformed).await.unwrap();
        assert_eq!(chosen.len(), 1);
        assert_eq!(
            accept(w, &chosen, Some("legacy"), false)
                .await
                .unwrap()
                .accepted,
            1
        );
        let accepted: Vec<(String, bool)> = list(w, Some("users"))
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.key, r.accepted))
            .collect();
        assert_eq!(
            accepted,
            [("1".into(), false), ("2".into(), true), ("3".into(), false)]
        );
        let everything = invalid(w, &Filter::default()).await.unwrap();
        assert_eq!(everything.len(), 2, "the rejected record is not invalid");
        assert_eq!(unaccept(w, &everything).await.unwrap(), 1);
        assert!(list(w, None).await.unwrap().iter().all(|r| !r.accepted));
    }

    /// A record sent and confirmed, then invalid: Loops keeps its last values, so it is named
    /// and left unaccepted unless that is said to be intended.
    #[tokio::test]
    async fn a_record_loops_still_holds_is_accepted_only_when_intended() {
        let model = crate::testing::Model::new().await;
        let w = &*model.warehouse;
        let sent = w.create_run("users").await.unwrap();
        w.record_outcomes(&[Outcome::new(
            "users",
            sent,
            "4",
            "fp",
            OutcomeStatus::Confirmed,
            "upsert",
        )])
        .await
        .unwrap();
        w.fail_run(sent, "done").await.unwrap();
        let run = w.create_run("users").await.unwrap();
        w.record_outcomes(&[
            Outcome::new("users", run, "4", "fp2", OutcomeStatus::Invalid, "upsert")
                .with_reason("no email"),
            Outcome::new("users", run, "5", "fp", OutcomeStatus::Invalid, "upsert")
                .with_reason("no email"),
        ])
        .await
        .unwrap();
        let chosen = invalid(w, &Filter::default()).await.unwrap();
        assert_eq!(
            accept(w, &chosen, None, false).await.unwrap(),
            Accepted {
                accepted: 1,
                outcome_changed: 0,
                in_loops: vec![("users".into(), "4".into())],
            }
        );
        assert_eq!(
            accept(w, &chosen, None, true).await.unwrap(),
            Accepted {
                accepted: 2,
                ..Accepted::default()
            }
        );
    }
}
