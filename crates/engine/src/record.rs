//! `loopsync record --sync NAME KEY`, and the record page of the status page: one record as the
//! state keeps it (what Loops confirmed, and when), every outcome and failed attempt with the
//! request kind, Loops' answer and the reason, its dead letter, and what the next run would send
//! for it. Never talks to Loops.
//!
//! What the next run would send is planned as `loopsync plan` plans it: the model's diff walked
//! by the extractor's decider, kept to this one key as a replay keeps its keys, and mapped by the
//! transformer ([`crate::plan::planned`]). The diff reads the whole model (a duplicate key or a
//! shared email needs the other rows), holding one row at a time.

use futures::StreamExt;
use loopsync_core::envelope::OutcomeStatus;
use loopsync_core::spec::SyncSpec;
use loopsync_extractor::{Decided, Decider, Decision, Window};
use loopsync_warehouse::{Attempt, RecordOutcome, RecordState, Warehouse, WarehouseError};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::plan::{SyncPlan, planned};

/// One record of one sync.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecordReport {
    pub sync: String,
    pub key: String,
    /// What the state keeps of it; `None` when nothing (never sent, or forgotten).
    pub state: Option<RecordState>,
    /// The values Loops confirmed, when the model's row is still at them (the state keeps a
    /// digest of them, not the values: a row changed since gives `None`).
    pub confirmed_values: Option<ConfirmedValues>,
    /// Every outcome the results keep, oldest first.
    pub outcomes: Vec<OutcomeReport>,
    /// Every failed attempt the results keep (the loader's, retried or given up), oldest first.
    pub attempts: Vec<AttemptReport>,
    /// Its latest outcome is dead-lettered: that outcome, and whether it is parked.
    pub dead_letter: Option<DeadLetter>,
    /// What the next run would do with it.
    pub next: Next,
}

/// The contact write Loops confirmed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfirmedValues {
    /// The contact's identifiers.
    pub email: Option<String>,
    pub user_id: Option<String>,
    /// The mapping's property names and the values sent (`null` clears one).
    pub properties: Map<String, Value>,
    /// Mailing list id → subscribed.
    pub mailing_lists: std::collections::BTreeMap<String, bool>,
}

/// One outcome, with the status of Loops' answer its reason names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutcomeReport {
    #[serde(flatten)]
    pub outcome: RecordOutcome,
    /// The HTTP status of Loops' answer the reason names (a refusal, an error); `None` when it
    /// names none (a confirmation, a record never sent, no answer).
    pub status: Option<u16>,
}

/// One failed attempt, with the status of Loops' answer its reason names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptReport {
    #[serde(flatten)]
    pub attempt: Attempt,
    pub status: Option<u16>,
}

/// A record whose latest outcome is dead-lettered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub run_id: i64,
    pub reason: Option<String>,
    /// Parked by `loopsync dlq park`: no run retries it until its data changes.
    pub parked: bool,
}

/// What the next run would do with the record, as `loopsync plan` would say it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Next {
    /// `added`, `changed`, `removed`, `invalid` or `ignored` (as `plan` says them); or, with
    /// nothing sent: `unchanged` (Loops has the row as it is), `parked`, `kept` (gone from the
    /// model of an upsert sync: the contact stays), `gone` (gone from the model, never
    /// confirmed: nothing to remove).
    pub change: String,
    /// The Loops operation, or `none`.
    pub operation: String,
    /// The operation as the loader would send it (see `plan --json`).
    pub action: Option<Value>,
    /// Why nothing would be sent, or why the record is invalid.
    pub reason: Option<String>,
}

/// The record `key` of `spec`'s sync; `None` when neither the model, the state nor the results
/// know it.
pub async fn record(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    key: &str,
) -> Result<Option<RecordReport>, WarehouseError> {
    let state = warehouse.record_state(&spec.name, key).await?;
    let history = warehouse.record_history(&spec.name, key).await?;
    let decided = decide(warehouse, spec, key).await?;
    if state.is_none()
        && history.outcomes.is_empty()
        && history.attempts.is_empty()
        && decided.is_none()
    {
        return Ok(None);
    }
    let dead_letter = history
        .outcomes
        .last()
        .filter(|o| o.result.outcome == OutcomeStatus::DeadLettered)
        .map(|o| DeadLetter {
            run_id: o.result.run_id,
            reason: o.result.reason.clone(),
            parked: state.as_ref().is_some_and(|s| s.parked),
        });
    let confirmed_values = decided.as_ref().and_then(|d| confirmed_values(spec, d));
    let next = match decided {
        Some(decided) => next(spec, decided),
        None => Next::nothing("gone", "not in the model, and nothing confirmed to remove"),
    };
    Ok(Some(RecordReport {
        sync: spec.name.clone(),
        key: key.to_owned(),
        state,
        confirmed_values,
        outcomes: history
            .outcomes
            .into_iter()
            .map(|outcome| OutcomeReport {
                status: outcome
                    .result
                    .reason
                    .as_deref()
                    .and_then(loopsync_loops_client::answer_status),
                outcome,
            })
            .collect(),
        attempts: history
            .attempts
            .into_iter()
            .map(|attempt| AttemptReport {
                status: attempt
                    .reason
                    .as_deref()
                    .and_then(loopsync_loops_client::answer_status),
                attempt,
            })
            .collect(),
        dead_letter,
        next,
    }))
}

/// The key decided as a run would decide it: the model's diff, kept to this key (`None`: the
/// diff has no such key, in the model or the state).
async fn decide(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    key: &str,
) -> Result<Option<Decided>, WarehouseError> {
    // A replay's window: an event sync's key is read wherever its cursor is.
    let window = Window::read(warehouse, spec, true).await?;
    let mut rows = warehouse.diff_since(spec, window.since).await?;
    let mut decider = Decider::new(spec, 0).only_keys([key.to_owned()]);
    let mut found = None;
    while let Some(row) = rows.next().await {
        if let Some(decided) = decider.push(row?).next() {
            found = Some(decided);
        }
    }
    Ok(found.or_else(|| decider.finish()))
}

/// What Loops confirmed, when the row is at the confirmed fingerprint: the write a run makes of
/// that row (see `loopsync_transformer::verify::confirmed`).
fn confirmed_values(spec: &SyncSpec, decided: &Decided) -> Option<ConfirmedValues> {
    if decided.decision != Decision::Unchanged || spec.is_append() {
        return None;
    }
    let row = &decided.row;
    let confirmed = loopsync_transformer::verify::confirmed(
        spec,
        row.key.as_deref()?,
        row.confirmed_fp.as_deref()?,
        row.values.clone()?,
        row.confirmed_email.clone(),
        row.confirmed_user_id.clone(),
    )
    .ok()?;
    Some(ConfirmedValues {
        email: confirmed.email,
        user_id: confirmed.user_id,
        properties: confirmed.properties,
        mailing_lists: confirmed.mailing_lists,
    })
}

impl Next {
    fn nothing(change: &str, reason: &str) -> Next {
        Next {
            change: change.to_owned(),
            operation: "none".into(),
            action: None,
            reason: Some(reason.to_owned()),
        }
    }
}

/// The plan of the decided key.
fn next(spec: &SyncSpec, decided: Decided) -> Next {
    let nothing = match &decided.decision {
        Decision::Unchanged => Some(Next::nothing(
            "unchanged",
            "Loops confirmed the row as it is: nothing to send",
        )),
        Decision::Parked => Some(Next::nothing(
            "parked",
            "parked by loopsync dlq park: left alone until its data changes",
        )),
        Decision::RemovedKept => Some(Next::nothing(
            "kept",
            "gone from the model; an upsert sync leaves its contact in Loops",
        )),
        Decision::Nothing => Some(Next::nothing(
            "gone",
            "gone from the model, and never confirmed: nothing to remove",
        )),
        _ => None,
    };
    if let Some(nothing) = nothing {
        return nothing;
    }
    let mut plan = SyncPlan {
        sync: spec.name.clone(),
        counts: Default::default(),
        invalid: 0,
        requests: 0,
        seconds_at_rate_budget: 0.0,
        since: None,
        why_full: None,
    };
    match planned(spec, decided.decision, &mut plan).0 {
        Some(record) => Next {
            change: record.change.as_str().to_owned(),
            operation: record.operation,
            action: record.action,
            reason: record.reason,
        },
        None => Next::nothing("unchanged", "nothing to send"),
    }
}

#[cfg(test)]
mod tests {
    use loopsync_core::envelope::{ChangeKind, Outcome};

    use super::*;
    use crate::testing::{Model, spec};

    /// Confirms `key` at the fingerprint its row has now, in a finished run.
    async fn confirm(model: &Model, spec: &SyncSpec, key: &str, email: &str) -> i64 {
        let w = &*model.warehouse;
        let run = w.create_run(&spec.name).await.unwrap();
        let values = [
            ("email".to_owned(), Some(email.to_owned())),
            ("user_id".to_owned(), None),
        ]
        .into();
        let mut o = Outcome::new(
            &spec.name,
            run,
            key,
            &spec.fingerprint(&values),
            OutcomeStatus::Confirmed,
            "upsert",
        );
        o.email = Some(email.to_owned());
        o.contact_id = Some("c9".into());
        o.change = Some(ChangeKind::Added);
        w.record_outcomes(&[o]).await.unwrap();
        w.fail_run(run, "done").await.unwrap();
        run
    }

    /// A record confirmed and unchanged shows its confirmed values and nothing to send; once its
    /// row changes, the next run's update, as `plan` builds it; a dead letter is named; a key
    /// nobody knows is `None`; a key only in the model is an addition.
    #[tokio::test]
    async fn a_record_is_its_state_its_history_and_its_next_change() {
        let model = Model::new().await;
        let spec = spec();
        let w = &*model.warehouse;
        model.insert(&[
            (Some("1"), Some("a@x.co"), None),
            (Some("2"), Some("b@x.co"), None),
        ]);
        let run = confirm(&model, &spec, "1", "a@x.co").await;

        let one = record(w, &spec, "1").await.unwrap().unwrap();
        let state = one.state.as_ref().unwrap();
        assert!(state.confirmed, "{state:?}");
        assert_eq!(
            (state.confirmed_run, state.contact_id.as_deref()),
            (Some(run), Some("c9"))
        );
        assert_eq!(one.next.change, "unchanged");
        assert_eq!(one.next.operation, "none");
        let values = one
            .confirmed_values
            .as_ref()
            .expect("unchanged: values known");
        assert_eq!(values.email.as_deref(), Some("a@x.co"));
        assert!(values.properties.is_empty(), "{values:?}");
        assert_eq!(one.outcomes.len(), 1);
        assert_eq!(one.outcomes[0].outcome.change.as_deref(), Some("added"));
        assert_eq!(one.dead_letter, None);

        // Changed in the model: the next run updates it, as plan would.
        model.execute("UPDATE users SET user_id = 'u1' WHERE id = '1'");
        let one = record(w, &spec, "1").await.unwrap().unwrap();
        assert_eq!(
            (one.next.change.as_str(), one.next.operation.as_str()),
            ("changed", "upsert")
        );
        let action = one.next.action.as_ref().unwrap();
        assert_eq!(
            (&action["email"], &action["user_id"]),
            (&Value::from("a@x.co"), &Value::from("u1")),
            "{action}"
        );
        assert_eq!(
            one.confirmed_values, None,
            "the state keeps no values of a changed row"
        );

        // Only in the model: the next run adds it.
        let two = record(w, &spec, "2").await.unwrap().unwrap();
        assert_eq!(
            (two.state.clone(), two.next.change.as_str()),
            (None, "added")
        );

        // Dead-lettered in a later run, with Loops' answer in the reason.
        let later = w.create_run(&spec.name).await.unwrap();
        let dead = Outcome::new(
            &spec.name,
            later,
            "2",
            "f",
            OutcomeStatus::DeadLettered,
            "upsert",
        )
        .with_reason("gave up after 2 attempts: server error 503: down");
        w.record_outcomes(&[dead]).await.unwrap();
        let two = record(w, &spec, "2").await.unwrap().unwrap();
        assert_eq!(
            two.dead_letter,
            Some(DeadLetter {
                run_id: later,
                reason: Some("gave up after 2 attempts: server error 503: down".into()),
                parked: false,
            })
        );
        assert_eq!(two.outcomes[0].status, Some(503));

        assert_eq!(record(w, &spec, "nobody").await.unwrap(), None);
        // Gone from the model of an upsert sync after a confirmation: kept in Loops.
        model.execute("DELETE FROM users WHERE id = '1'");
        let gone = record(w, &spec, "1").await.unwrap().unwrap();
        assert_eq!(gone.next.change, "kept");
    }
}
