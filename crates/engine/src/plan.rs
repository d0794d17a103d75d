//! `loopsync plan`: a dry run. The diff and, per record, the operation a run would send; counts,
//! and the time the requests need at the rate budget. Sends nothing, changes no state. The
//! records are decided by the extractor's [`Decider`] and mapped by the transformer, so the plan
//! is what a run would do; the binary only prints it.

use futures::StreamExt;
use loopsync_core::envelope::{ChangeKind, RowChange};
use loopsync_core::spec::SyncSpec;
use loopsync_core::{Classified, ErrorClass};
use loopsync_extractor::decide::ALREADY_SENT;
use loopsync_extractor::held::RELEASED;
use loopsync_extractor::{Decided, Decider, Decision, Held, Window};
use loopsync_transformer::{Invalid, transform};
use loopsync_warehouse::{ExtractCounts, RELEASE, Warehouse, WarehouseError};
use serde::Serialize;

/// What a planned record would be in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlannedChange {
    /// New to the sync: a run would write the contact.
    Added,
    /// Changed since Loops confirmed it: a run would write it again.
    Changed,
    /// Left the model (mirror): a run would delete or unsubscribe the contact.
    Removed,
    /// Invalid: the extractor or the transformer refuses it; nothing would be sent.
    Invalid,
    /// An event sync's row whose event was sent before and changed since: nothing would be
    /// sent (an event is sent once).
    Ignored,
}

impl PlannedChange {
    /// The change as the reports name it: `added`, `changed`, `removed` or `invalid`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PlannedChange::Added => ChangeKind::Added.as_str(),
            PlannedChange::Changed => ChangeKind::Changed.as_str(),
            PlannedChange::Removed => ChangeKind::Removed.as_str(),
            PlannedChange::Invalid => "invalid",
            PlannedChange::Ignored => "ignored",
        }
    }
}

impl From<ChangeKind> for PlannedChange {
    fn from(kind: ChangeKind) -> PlannedChange {
        match kind {
            ChangeKind::Added => PlannedChange::Added,
            ChangeKind::Changed => PlannedChange::Changed,
            ChangeKind::Removed => PlannedChange::Removed,
        }
    }
}

/// One record of a plan: a key a run would send something for, or would refuse.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedRecord {
    /// The record's primary key (`(null #n)` for a NULL one).
    pub key: String,
    /// What the record would be in a run.
    pub change: PlannedChange,
    /// The Loops operation, or `none` for an invalid record.
    pub operation: String,
    /// The operation as the loader would send it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<serde_json::Value>,
    /// Why an invalid record is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl PlannedRecord {
    /// The sign of the record's line in the text plan: `+` added, `~` changed, `-` removed,
    /// `!` invalid, `=` ignored.
    pub fn sign(&self) -> char {
        match self.change {
            PlannedChange::Added => '+',
            PlannedChange::Changed => '~',
            PlannedChange::Removed => '-',
            PlannedChange::Invalid => '!',
            PlannedChange::Ignored => '=',
        }
    }

    /// What a run would do for the record, in words, field by field: the values an added or
    /// changed record would send (the state keeps fingerprints, not values, so a change is
    /// shown as what Loops will hold), what a removal does to the contact, or why nothing is
    /// sent. For the user's own terminal (it carries the record's values): never for a log.
    pub fn describe(&self) -> String {
        if let Some(reason) = &self.reason {
            return reason.clone();
        }
        match &self.action {
            Some(action) => describe_action(action),
            None => self.operation.clone(),
        }
    }

    /// A removal a run would not send: the contact is another record's now
    /// ([`loopsync_extractor::held::RELEASED`]).
    fn released(key: String) -> PlannedRecord {
        PlannedRecord {
            key,
            change: PlannedChange::Removed,
            operation: RELEASE.into(),
            action: None,
            reason: Some(RELEASED.into()),
        }
    }

    fn invalid(key: String, reason: String) -> PlannedRecord {
        PlannedRecord {
            key,
            change: PlannedChange::Invalid,
            operation: "none".into(),
            action: None,
            reason: Some(reason),
        }
    }
}

/// An action (as `plan --json` shows it) in words: see [`PlannedRecord::describe`].
fn describe_action(action: &serde_json::Value) -> String {
    use serde_json::Value;
    let text = |v: &Value| match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    let identity = |a: &Value| {
        [("email", "email"), ("user_id", "userId")]
            .iter()
            .filter_map(|(field, name)| a.get(field).and_then(Value::as_str).map(|v| (name, v)))
            .map(|(name, v)| format!("{name} {v:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let kind = action.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "upsert" | "event" => {
            let mut fields = Vec::new();
            if let Some(event) = action.get("event_name").and_then(Value::as_str) {
                fields.push(format!("event {event:?}"));
            }
            let id = identity(action);
            if !id.is_empty() {
                fields.push(id);
            }
            if let Some(Value::Object(properties)) = action.get("properties") {
                for (name, value) in properties {
                    if name != "email" && name != "userId" {
                        fields.push(format!("{name} {}", text(value)));
                    }
                }
            }
            if let Some(Value::Object(lists)) = action.get("mailing_lists") {
                for (list, on) in lists {
                    let state = if on.as_bool() == Some(true) {
                        "subscribed"
                    } else {
                        "unsubscribed"
                    };
                    fields.push(format!("list {list} {state}"));
                }
            }
            if let Some(Value::Object(properties)) = action.get("event_properties") {
                for (name, value) in properties {
                    fields.push(format!("eventProperties.{name} {}", text(value)));
                }
            }
            let verb = if kind == "event" {
                "send the event, writing"
            } else {
                "write"
            };
            format!("{verb} {}", fields.join(", "))
        }
        "delete" => format!("delete the contact ({}) from Loops", identity(action)),
        "unsubscribe" => format!(
            "unsubscribe the contact ({}): it stays in Loops, unsubscribed",
            identity(action)
        ),
        "rekey" => {
            let write = action.get("write").map(describe_action).unwrap_or_default();
            let old = action
                .get("old_user_id")
                .and_then(Value::as_str)
                .map(|u| format!("userId {u:?}"))
                .or_else(|| {
                    action
                        .get("old_email")
                        .and_then(Value::as_str)
                        .map(|e| format!("email {e:?}"))
                })
                .unwrap_or_default();
            let then = match action.get("remove_old").and_then(Value::as_str) {
                Some("delete") => format!("then delete the old contact ({old})"),
                Some("unsubscribe") => {
                    format!("then unsubscribe the old contact ({old}): it stays in Loops")
                }
                _ => format!("the old contact ({old}) stays in Loops"),
            };
            format!("new identity: {write}; {then}")
        }
        other => other.to_owned(),
    }
}

/// The plan of one sync, but its records (those are handed out one by one: a plan of a million
/// records is never held).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncPlan {
    /// The sync's name.
    pub sync: String,
    /// The counts of the run that would follow, as its report will show them: the model's
    /// rows counted by the run's rules (the changes the transformer refuses among the invalid
    /// rows, [`ExtractCounts::refuse`]), and in `error` why it would fail (the removal guard).
    pub counts: ExtractCounts,
    /// Records refused, by the extractor or the transformer.
    pub invalid: i64,
    /// Requests a run would send (one per operation, before any retry).
    pub requests: i64,
    /// `requests` at `requests_per_second`.
    pub seconds_at_rate_budget: f64,
    /// A contact sync's incremental diff: the rows whose cursor is at or after this (Unix
    /// milliseconds), and those the state has not noted unchanged (`counts.diff` says which).
    /// `plan --json` writes it as `diff_since`.
    #[serde(skip)]
    pub since: Option<i64>,
    /// Why a contact sync with a cursor would diff in full (`why_full_diff`).
    #[serde(skip)]
    pub why_full: Option<&'static str>,
}

/// What can go wrong planning: the warehouse, or the caller's handling of a record (writing
/// it out).
#[derive(Debug, thiserror::Error)]
pub enum PlanError<E: std::error::Error + 'static> {
    /// Reading the diff failed.
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    /// `each` failed on a record: the plan stops there.
    #[error(transparent)]
    Each(E),
}

impl<E: std::error::Error + 'static> Classified for PlanError<E> {
    fn class(&self) -> ErrorClass {
        match self {
            PlanError::Warehouse(e) => e.class(),
            // The caller's own failure (its output is gone): trying again would not help.
            PlanError::Each(_) => ErrorClass::Permanent,
        }
    }
}

/// Plans one sync: walks its diff as a run would, hands each record a run would send or refuse
/// to `each` as it is decided (under mirror, removals and re-keys once the model is read: a
/// run holds them until then, and a removal whose contact another record now has is released,
/// not weighed by the removal guard), and returns the counts and the requests. Sends nothing,
/// changes no state.
pub async fn plan<E: std::error::Error + 'static>(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    requests_per_second: u32,
    mut each: impl FnMut(PlannedRecord) -> Result<(), E>,
) -> Result<SyncPlan, PlanError<E>> {
    let mut plan = SyncPlan {
        sync: spec.name.clone(),
        counts: ExtractCounts::default(),
        invalid: 0,
        requests: 0,
        seconds_at_rate_budget: 0.0,
        since: None,
        why_full: None,
    };
    // What a run would read: for a sync with a cursor, the recent rows (see `Window`).
    let window = Window::read(warehouse, spec, false).await?;
    plan.since = window.since.filter(|_| !spec.is_append());
    plan.why_full = window.why_full;
    let mut rows = warehouse.diff_changes(spec, window.since).await?;
    // Run id 0: nothing is published, the id only names the run.
    let mut decider = Decider::new(spec, 0);
    // Removals and re-keys a run would hold until the model is read, and settle by the same
    // rule (`Held`): what is released, and what the removal guard weighs.
    let mut held = Held::new(spec);
    // Hands the record on; a change the transformer refuses is counted as the run's report
    // will count it (`Decider::count_as_invalid`, the one rule).
    let mut take = |plan: &mut SyncPlan, decider: &mut Decider, decision: Decision| {
        let (record, refused) = planned(spec, decision, plan);
        if let Some(change) = refused {
            decider.count_as_invalid(&change);
        }
        match record {
            Some(record) => each(record).map_err(PlanError::Each),
            None => Ok(()),
        }
    };
    let mut decided = |plan: &mut SyncPlan, decider: &mut Decider, d: Decided| match d.decision {
        Decision::Change(change) => match held.take(change) {
            Some(change) => take(plan, decider, Decision::Change(change)),
            None => Ok(()),
        },
        decision => take(plan, decider, decision),
    };
    while let Some(row) = rows.next().await {
        for d in decider.push(row?) {
            decided(&mut plan, &mut decider, d)?;
        }
    }
    if let Some(d) = decider.finish() {
        decided(&mut plan, &mut decider, d)?;
    }
    drop(rows);
    let settled = held.settle_with(warehouse).await?;
    // Would the removal guard stop the run? Its one rule, weighing the removals a run would
    // weigh; a plan assumes no --allow-removals.
    let refusal = decider
        .guard()
        .refuses(spec, settled.removals.len() as u64, false);
    for change in settled.changes.into_iter().chain(settled.removals) {
        take(&mut plan, &mut decider, Decision::Change(change))?;
    }
    for change in settled.released {
        each(PlannedRecord::released(change.key)).map_err(PlanError::Each)?;
    }
    plan.counts = decider.into_counts();
    plan.counts.error = refusal.map(|refusal| refusal.for_plan());
    window.close(&mut plan.counts);
    plan.seconds_at_rate_budget = plan.requests as f64 / f64::from(requests_per_second);
    Ok(plan)
}

/// The record a decision plans, counted in `plan`; and the change, when the transformer
/// refuses it.
pub(crate) fn planned(
    spec: &SyncSpec,
    decision: Decision,
    plan: &mut SyncPlan,
) -> (Option<PlannedRecord>, Option<RowChange>) {
    let record = match decision {
        Decision::Change(change) => match transform(spec, &change) {
            Ok(op) => {
                plan.requests += 1;
                Some(PlannedRecord {
                    key: change.key,
                    change: change.kind.into(),
                    operation: op.action.name().into(),
                    action: serde_json::to_value(&op.action).ok(),
                    reason: None,
                })
            }
            Err(Invalid(reason)) => {
                plan.invalid += 1;
                let record = PlannedRecord::invalid(change.key.clone(), reason);
                return (Some(record), Some(change));
            }
        },
        Decision::Invalid { key, reason, .. } => {
            plan.invalid += 1;
            Some(PlannedRecord::invalid(key, reason))
        }
        Decision::AlreadySent { key, .. } => Some(PlannedRecord {
            key,
            change: PlannedChange::Ignored,
            operation: "none".into(),
            action: None,
            reason: Some(ALREADY_SENT.into()),
        }),
        Decision::Unchanged | Decision::RemovedKept | Decision::Nothing | Decision::Parked => None,
    };
    (record, None)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::convert::Infallible;

    use loopsync_core::envelope::{ChangeKind, RowChange, VERSION};
    use serde_json::json;

    use super::*;
    use crate::testing::{Model, spec};

    /// Plans `spec`, keeping every record.
    pub(crate) async fn plan_all(
        warehouse: &dyn Warehouse,
        spec: &SyncSpec,
    ) -> (SyncPlan, Vec<PlannedRecord>) {
        let mut records = Vec::new();
        let plan = plan(warehouse, spec, 10, |r| {
            records.push(r);
            Ok::<_, Infallible>(())
        })
        .await
        .unwrap();
        (plan, records)
    }

    /// The operation the transformer builds for a new record of `spec`.
    fn operation(
        spec: &SyncSpec,
        key: &str,
        email: &str,
        user_id: Option<&str>,
    ) -> serde_json::Value {
        let change = RowChange {
            v: VERSION,
            sync: spec.name.clone(),
            run_id: 0,
            key: key.into(),
            fingerprint: String::new(),
            kind: ChangeKind::Added,
            values: [
                ("id".to_owned(), Some(key.to_owned())),
                ("email".to_owned(), Some(email.to_owned())),
                ("user_id".to_owned(), user_id.map(str::to_owned)),
            ]
            .into(),
            confirmed_email: None,
            confirmed_user_id: None,
            installation: String::new(),
            generation: 0,
            keep_old_contact: false,
            resubscribe: false,
            possibly_applied: Vec::new(),
        };
        serde_json::to_value(transform(spec, &change).unwrap().action).unwrap()
    }

    /// A fresh sync: every valid row is added, with the operation the transformer builds;
    /// a row without an email, a duplicate key and a NULL key are invalid, with their reasons.
    /// The requests and the time at the rate budget follow; planning changes nothing.
    #[tokio::test]
    async fn a_fresh_sync_plans_every_row_as_added_and_lists_the_invalid_ones() {
        let model = Model::new().await;
        model.insert(&[
            (Some("1"), Some("a@x.co"), Some("u1")),
            (Some("2"), Some("B@x.co "), None),
            (Some("3"), None, None),
            (Some("4"), Some("d1@x.co"), None),
            (Some("4"), Some("d2@x.co"), None),
            (None, Some("n@x.co"), None),
        ]);
        let spec = spec();
        let (plan, records) = plan_all(&*model.warehouse, &spec).await;
        let shown: Vec<_> = records
            .iter()
            .map(|r| (r.key.as_str(), r.change.as_str(), r.operation.as_str()))
            .collect();
        assert_eq!(
            shown,
            [
                ("1", "added", "upsert"),
                ("2", "added", "upsert"),
                ("3", "invalid", "none"),
                ("4", "invalid", "none"),
                ("(null #1)", "invalid", "none"),
            ]
        );
        assert_eq!(
            records[0].action,
            Some(operation(&spec, "1", "a@x.co", Some("u1")))
        );
        assert_eq!(
            records[1].action,
            Some(operation(&spec, "2", "B@x.co ", None))
        );
        assert_eq!(
            records[1].action.as_ref().unwrap()["email"],
            json!("b@x.co"),
            "the email as the transformer sends it"
        );
        let reasons: Vec<_> = records[2..]
            .iter()
            .map(|r| r.reason.clone().unwrap())
            .collect();
        assert_eq!(
            reasons,
            [
                "no email: the contact is identified by email",
                "duplicate primary key: 2 rows have this id",
                "id is NULL",
            ]
        );
        assert_eq!(
            (plan.sync.as_str(), plan.invalid, plan.requests),
            ("s", 3, 2)
        );
        assert_eq!(
            plan.seconds_at_rate_budget, 0.2,
            "2 requests at 10 per second"
        );
        // Counted as the run's report counts them: the row the transformer refuses is an
        // invalid row, not an added one.
        assert_eq!(
            (
                plan.counts.added,
                plan.counts.invalid_rows,
                plan.counts.unchanged
            ),
            (2, 4, 0)
        );
        assert_eq!(
            serde_json::to_value(&records[2]).unwrap(),
            json!({"key": "3", "change": "invalid", "operation": "none",
                   "reason": "no email: the contact is identified by email"})
        );

        let again = plan_all(&*model.warehouse, &spec).await;
        assert_eq!(again, (plan, records), "a plan changes no state");
    }

    /// Each record in words, field by field: what an added or changed record writes, what a
    /// removal does to the contact (deleted, or unsubscribed and kept), a re-key's two halves,
    /// and why an invalid record is refused.
    #[test]
    fn a_record_is_described_field_by_field() {
        let upsert = json!({"type": "upsert", "email": "ann@x.co", "user_id": null,
            "properties": {"email": "ann@x.co", "firstName": "Anne", "seats": 3, "planName": null},
            "mailing_lists": {"news": true, "promo": false}});
        let record = |change, action: serde_json::Value| PlannedRecord {
            key: "42".into(),
            change,
            operation: action["type"].as_str().unwrap().into(),
            action: Some(action),
            reason: None,
        };
        let changed = record(PlannedChange::Changed, upsert.clone());
        assert_eq!(changed.sign(), '~');
        assert_eq!(
            changed.describe(),
            r#"write email "ann@x.co", firstName "Anne", planName null, seats 3, list news subscribed, list promo unsubscribed"#
        );
        let delete = record(
            PlannedChange::Removed,
            json!({"type": "delete", "email": "ann@x.co", "user_id": null}),
        );
        assert_eq!(
            (delete.sign(), delete.describe().as_str()),
            ('-', r#"delete the contact (email "ann@x.co") from Loops"#)
        );
        let unsubscribe = record(
            PlannedChange::Removed,
            json!({"type": "unsubscribe", "email": "ann@x.co", "user_id": null}),
        );
        assert_eq!(
            unsubscribe.describe(),
            r#"unsubscribe the contact (email "ann@x.co"): it stays in Loops, unsubscribed"#
        );
        let rekey = record(
            PlannedChange::Changed,
            json!({"type": "rekey", "write": upsert, "old_email": "old@x.co",
                   "remove_old": "unsubscribe", "old_user_id": null}),
        );
        let said = rekey.describe();
        assert!(
            said.starts_with(r#"new identity: write email "ann@x.co""#)
                && said.ends_with(
                    r#"then unsubscribe the old contact (email "old@x.co"): it stays in Loops"#
                ),
            "{said}"
        );
        let invalid = PlannedRecord::invalid(
            "7".into(),
            "no email: the contact is identified by email".into(),
        );
        assert_eq!(
            (invalid.sign(), invalid.describe().as_str()),
            ('!', "no email: the contact is identified by email")
        );
    }

    /// The JSON of a plan's parts is the one `plan --json` has always printed.
    #[test]
    fn plan_json_is_unchanged() {
        let plan = SyncPlan {
            sync: "users".into(),
            counts: ExtractCounts::default(),
            invalid: 1,
            requests: 2,
            seconds_at_rate_budget: 0.04,
            since: None,
            why_full: None,
        };
        assert_eq!(
            serde_json::to_value(&plan).unwrap(),
            json!({"sync": "users", "counts": serde_json::to_value(ExtractCounts::default()).unwrap(),
                   "invalid": 1, "requests": 2, "seconds_at_rate_budget": 0.04})
        );
        let record = PlannedRecord {
            key: "1".into(),
            change: PlannedChange::Removed,
            operation: "delete".into(),
            action: Some(json!({"delete": {"email": "a@x.co"}})),
            reason: None,
        };
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            r#"{"key":"1","change":"removed","operation":"delete","action":{"delete":{"email":"a@x.co"}}}"#
        );
    }
}
