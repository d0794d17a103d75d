//! The messages that travel on the subjects. Each has a `v` (schema version); fields added later
//! carry `#[serde(default)]`, so an old reader ignores them and a new reader fills them in.
//! They are encoded with named fields (see [`crate::codec`]), never positionally.
//!
//! Versions: 1, the first; 2 adds to [`Outcome`] the requests by kind (`counts`), the record's
//! `change` and the `attempt`, and the status [`OutcomeStatus::Attempted`] (a reader of
//! version 1 cannot decode such an outcome and dead-letters it: only its counts are lost).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The schema version this build writes.
pub const VERSION: u16 = 2;

/// "Run this sync now": consumed by exactly one extractor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRequest {
    pub v: u16,
    pub sync: String,
    /// The run's id in the warehouse (`loopsync.runs`), allocated by whoever asked.
    pub run_id: i64,
    /// When not empty, the run is about these keys only (`loopsync dlq replay`).
    #[serde(default)]
    pub only_keys: Vec<String>,
    /// The state's random id (`loopsync.installation`): run ids are per state.
    #[serde(default)]
    pub installation: String,
    /// Send the removals even beyond the sync's `max_removal_share` (`--allow-removals`).
    #[serde(default)]
    pub allow_removals: bool,
}

/// How a record differs from what Loops has confirmed for the sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// New to the sync.
    Added,
    /// Confirmed before with another fingerprint.
    Changed,
    /// Confirmed before, no longer in the model.
    Removed,
}

impl ChangeKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Changed => "changed",
            ChangeKind::Removed => "removed",
        }
    }
}

/// extractor → transformer: one added, changed or removed record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowChange {
    pub v: u16,
    pub sync: String,
    pub run_id: i64,
    /// The model's primary key, as text.
    pub key: String,
    /// Fingerprint of the mapped values (see [`crate::spec::SyncSpec::fingerprint`]); for a
    /// removal, the last confirmed one.
    pub fingerprint: String,
    pub kind: ChangeKind,
    /// Mapped model columns as text (`None` is SQL NULL); empty for a removal.
    pub values: BTreeMap<String, Option<String>>,
    /// The email Loops last confirmed for this record (a removal needs it to find the contact).
    #[serde(default)]
    pub confirmed_email: Option<String>,
    /// The userId Loops last confirmed for this record.
    #[serde(default)]
    pub confirmed_user_id: Option<String>,
    /// The state's random id (from the run request).
    #[serde(default)]
    pub installation: String,
    /// How many changes of this record Loops had confirmed when it was extracted: with the
    /// fingerprint, it names this change (see [`crate::keys::idempotency_key`]).
    #[serde(default)]
    pub generation: i64,
    /// A re-key whose old email another record of the same run now uses: the old contact is
    /// that record's now, so it is not removed.
    #[serde(default)]
    pub keep_old_contact: bool,
    /// The record comes back after the sync unsubscribed its contact (mirror with
    /// `on_remove = "unsubscribe"`): the write re-subscribes it. Never set for a contact that
    /// unsubscribed on its own.
    #[serde(default)]
    pub resubscribe: bool,
    /// When Loops may hold versions it never confirmed (their answers lost): every identity
    /// those versions wrote or removed, each a contact that may be in Loops (see
    /// [`RowChange::possibly_left`]).
    #[serde(default)]
    pub possibly_applied: Vec<OldContact>,
}

/// The name of the `n`th model row with a NULL key a run met: a record of its own, invalid.
pub fn null_key(n: usize) -> String {
    format!("(null #{n})")
}

/// Whether `key` names a NULL key ([`null_key`]), not a key of the model.
pub fn is_null_key(key: &str) -> bool {
    key.strip_prefix("(null #")
        .and_then(|rest| rest.strip_suffix(')'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The fingerprint of the removal of a contact whose create's answer was lost (nothing was
/// confirmed for it): not a fingerprint of values (those are 40 hex digits). The contact may
/// never have been made.
pub const POSSIBLY_CREATED: &str = "possibly-created";

/// The contact a record's write can no longer find, so that the write makes another one: the
/// record's old identity (see [`RowChange::rekey`]); or an identity a version whose answer was
/// lost may have written ([`RowChange::possibly_applied`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldContact {
    pub email: Option<String>,
    /// Identified by userId: the old userId, which finds the old contact.
    pub user_id: Option<String>,
}

impl OldContact {
    /// The identifier that finds the old contact: its userId when the sync is identified by
    /// userId, else its email.
    pub fn identity(&self) -> Option<&str> {
        self.user_id.as_deref().or(self.email.as_deref())
    }
}

impl RowChange {
    /// The identity this change's write addresses (normalised email, trimmed userId), or for a
    /// removal none.
    fn written(&self, spec: &crate::spec::SyncSpec) -> (Option<String>, Option<String>) {
        if self.kind == ChangeKind::Removed {
            return (None, None);
        }
        let value = |property: &str| {
            spec.property(property)
                .and_then(|p| self.values.get(&p.column).cloned().flatten())
        };
        (
            value("email")
                .map(|e| crate::value::normalize_email(&e))
                .filter(|e| !e.is_empty()),
            value("userId")
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty()),
        )
    }

    /// The contacts a version whose answer was lost may have left in Loops that this change
    /// neither writes nor (as a re-key's or a removal's old contact) removes: each to be taken
    /// out under mirror, after this change's own requests. One identity finds a contact: the
    /// userId, identified by userId, else the email.
    pub fn possibly_left(&self, spec: &crate::spec::SyncSpec) -> Vec<OldContact> {
        use crate::spec::IdentifyBy;
        use crate::value::normalize_email;
        let identity = |email: Option<&str>, user_id: Option<&str>| {
            match spec.identify_by {
                IdentifyBy::Email => email.map(normalize_email),
                IdentifyBy::UserId => user_id.map(str::to_owned),
            }
            .filter(|i| !i.is_empty())
        };
        let (email, user_id) = self.written(spec);
        let mut taken: Vec<String> = identity(email.as_deref(), user_id.as_deref())
            .into_iter()
            .collect();
        // The contact the change already removes (or, Loops finding it, writes onto).
        if let Some(old) = identity(
            self.confirmed_email.as_deref(),
            self.confirmed_user_id.as_deref(),
        ) {
            taken.push(old);
        }
        let mut left = Vec::new();
        for contact in &self.possibly_applied {
            let Some(id) = identity(contact.email.as_deref(), contact.user_id.as_deref()) else {
                continue;
            };
            if taken.contains(&id) {
                continue;
            }
            // Identified by userId, a write with the contact's email finds it too.
            if spec.identify_by == IdentifyBy::UserId
                && email.is_some()
                && contact.email.as_deref().map(normalize_email) == email
            {
                continue;
            }
            taken.push(id);
            left.push(match spec.identify_by {
                IdentifyBy::Email => OldContact {
                    email: contact.email.clone(),
                    user_id: None,
                },
                IdentifyBy::UserId => OldContact {
                    email: None,
                    user_id: contact.user_id.clone(),
                },
            });
        }
        left
    }

    /// The one re-key rule (the extractor holds a re-key back, the transformer sends it): a
    /// write whose identifiers no longer find the contact Loops confirmed for the record.
    /// Identified by email: the email changed. Identified by userId: the userId changed and so
    /// did the email (with the email alone, or the userId alone, changed, Loops finds the old
    /// contact by the other identifier and writes the new one onto it). An added record has a
    /// confirmed identity only when its create's answer was lost: the contact it may have made.
    pub fn rekey(&self, spec: &crate::spec::SyncSpec) -> Option<OldContact> {
        use crate::spec::IdentifyBy;
        use crate::value::normalize_email;
        if !matches!(self.kind, ChangeKind::Changed | ChangeKind::Added) {
            return None;
        }
        let value = |property: &str| {
            spec.property(property)
                .and_then(|p| self.values.get(&p.column).cloned().flatten())
        };
        let email = value("email")
            .map(|e| normalize_email(&e))
            .filter(|e| !e.is_empty());
        let old_email = self
            .confirmed_email
            .as_deref()
            .map(normalize_email)
            .filter(|e| !e.is_empty());
        let email_moved = old_email.is_some() && email.is_some() && old_email != email;
        match spec.identify_by {
            IdentifyBy::Email => email_moved.then(|| OldContact {
                email: self.confirmed_email.clone(),
                user_id: None,
            }),
            IdentifyBy::UserId => {
                let user_id = value("userId")
                    .map(|u| u.trim().to_owned())
                    .filter(|u| !u.is_empty());
                let old_user_id = self.confirmed_user_id.clone().filter(|u| !u.is_empty());
                let user_id_moved =
                    old_user_id.is_some() && user_id.is_some() && old_user_id != user_id;
                (user_id_moved && (email_moved || old_email.is_none()) && email.is_some()).then(
                    || OldContact {
                        email: self.confirmed_email.clone(),
                        user_id: old_user_id,
                    },
                )
            }
        }
    }
}

/// What the loader is asked to do in Loops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    /// `PUT /v1/contacts/update` with these identifiers, properties and lists.
    Upsert {
        email: Option<String>,
        user_id: Option<String>,
        properties: Map<String, Value>,
        mailing_lists: BTreeMap<String, bool>,
    },
    /// `POST /v1/events/send`: the same contact write as an upsert (properties at top level),
    /// plus an event that runs "event received" workflows. Sent with the operation's
    /// idempotency key, so the event fires once however often the request is repeated.
    Event {
        event_name: String,
        email: Option<String>,
        user_id: Option<String>,
        properties: Map<String, Value>,
        mailing_lists: BTreeMap<String, bool>,
        /// `eventProperties` (an event sync's row; empty for a workflow trigger).
        #[serde(default)]
        event_properties: Map<String, Value>,
    },
    /// `POST /v1/contacts/delete` by one identifier (mirror, `on_remove = "delete"`).
    Delete {
        email: Option<String>,
        user_id: Option<String>,
    },
    /// `PUT /v1/contacts/update` with `subscribed: false` (mirror, `on_remove = "unsubscribe"`).
    Unsubscribe {
        email: Option<String>,
        user_id: Option<String>,
    },
    /// A record whose write no longer finds its old contact ([`RowChange::rekey`]): `write`
    /// (an upsert or an event) makes the new contact; under mirror `remove_old` deletes or
    /// unsubscribes the old one (by `old_user_id` when there is one, else by `old_email`), under
    /// upsert the old one stays.
    Rekey {
        write: Box<Action>,
        old_email: String,
        #[serde(default)]
        remove_old: Option<crate::spec::OnRemove>,
        /// Identified by userId: the old userId, by which the old contact is removed.
        #[serde(default)]
        old_user_id: Option<String>,
    },
}

impl Action {
    /// The operation's name in reports and records.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Upsert { .. } => "upsert",
            Action::Event { .. } => "event",
            Action::Delete { .. } => "delete",
            Action::Unsubscribe { .. } => "unsubscribe",
            Action::Rekey { .. } => "rekey",
        }
    }

    /// A removal: once confirmed, the record leaves the sync's state.
    pub fn is_removal(&self) -> bool {
        matches!(self, Action::Delete { .. } | Action::Unsubscribe { .. })
    }

    /// The identifiers this action addresses the contact by.
    pub fn identity(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Action::Upsert { email, user_id, .. }
            | Action::Event { email, user_id, .. }
            | Action::Delete { email, user_id }
            | Action::Unsubscribe { email, user_id } => (email.as_deref(), user_id.as_deref()),
            Action::Rekey { write, .. } => write.identity(),
        }
    }
}

/// transformer → loader: one Loops operation for one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    pub v: u16,
    pub sync: String,
    pub run_id: i64,
    pub key: String,
    pub fingerprint: String,
    pub change: ChangeKind,
    /// Derived from the change (see [`crate::keys::idempotency_key`]): the same on every retry
    /// and every replica, another for every later change of the record.
    pub idempotency_key: String,
    pub action: Action,
    /// The state's random id (from the run request): scopes the loader's ledger.
    #[serde(default)]
    pub installation: String,
    /// Under mirror: contacts a version whose answer was lost may have left in Loops
    /// ([`RowChange::possibly_left`]), deleted or unsubscribed after the action, each by its one
    /// identifier (a 404 is done).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub also_remove: Option<AlsoRemove>,
}

/// Contacts to take out of Loops after an operation's action (see [`Operation::also_remove`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlsoRemove {
    pub mode: crate::spec::OnRemove,
    pub contacts: Vec<OldContact>,
}

/// Where a request to Loops went, as run reports count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// `PUT /v1/contacts/update`: upserts, unsubscribes, the write of a re-key.
    Write,
    /// `POST /v1/events/send`.
    Event,
    /// `POST /v1/contacts/delete`.
    Delete,
    /// What `loopsync run` asks before it sends: the API key, the contact properties (list and
    /// create), the mailing lists.
    Preflight,
}

/// Requests sent toward Loops, counted where they are made: by kind, and how many of them
/// were retries (a second or later attempt of the same operation) and were answered 429.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RequestCounts {
    pub writes: u32,
    pub events: u32,
    pub deletes: u32,
    pub preflight: u32,
    /// Of the requests above, those that repeated an earlier attempt of the same operation.
    pub retries: u32,
    /// Of the requests above, those Loops answered 429.
    pub rate_limited: u32,
}

impl RequestCounts {
    /// Every request counted, whatever its kind.
    pub fn total(&self) -> u32 {
        self.writes + self.events + self.deletes + self.preflight
    }

    pub fn is_empty(&self) -> bool {
        *self == RequestCounts::default()
    }

    /// Counts one request of `kind`.
    pub fn count(&mut self, kind: RequestKind, retry: bool, rate_limited: bool) {
        match kind {
            RequestKind::Write => self.writes += 1,
            RequestKind::Event => self.events += 1,
            RequestKind::Delete => self.deletes += 1,
            RequestKind::Preflight => self.preflight += 1,
        }
        self.retries += u32::from(retry);
        self.rate_limited += u32::from(rate_limited);
    }

    pub fn add(&mut self, other: &RequestCounts) {
        self.writes += other.writes;
        self.events += other.events;
        self.deletes += other.deletes;
        self.preflight += other.preflight;
        self.retries += other.retries;
        self.rate_limited += other.rate_limited;
    }
}

/// The fate of one record in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    /// Loops confirmed the operation.
    Confirmed,
    /// Nothing to send: an older version than Loops already confirmed, or already confirmed.
    Skipped,
    /// Found before sending: cannot be expressed as a valid Loops operation.
    Invalid,
    /// Loops refused it (4xx).
    Rejected,
    /// Given up after retries, or unreadable.
    DeadLettered,
    /// Not a fate: an attempt of the loader that sent requests and did not settle the record
    /// (it failed and is retried or given up). It carries that attempt's requests so they are
    /// counted although the attempt's message is naked; the record's outcome comes later.
    Attempted,
}

impl OutcomeStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            OutcomeStatus::Confirmed => "confirmed",
            OutcomeStatus::Skipped => "skipped",
            OutcomeStatus::Invalid => "invalid",
            OutcomeStatus::Rejected => "rejected",
            OutcomeStatus::DeadLettered => "dead_lettered",
            OutcomeStatus::Attempted => "attempted",
        }
    }

    /// A record's fate (every status but [`OutcomeStatus::Attempted`]).
    pub fn is_final(&self) -> bool {
        *self != OutcomeStatus::Attempted
    }

    /// Invalid, rejected and dead-lettered records make a run *degraded*.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            OutcomeStatus::Invalid | OutcomeStatus::Rejected | OutcomeStatus::DeadLettered
        )
    }
}

impl std::fmt::Display for OutcomeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Reads the names of [`OutcomeStatus::as_str`], as the warehouse stores them.
impl std::str::FromStr for OutcomeStatus {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "confirmed" => OutcomeStatus::Confirmed,
            "skipped" => OutcomeStatus::Skipped,
            "invalid" => OutcomeStatus::Invalid,
            "rejected" => OutcomeStatus::Rejected,
            "dead_lettered" => OutcomeStatus::DeadLettered,
            "attempted" => OutcomeStatus::Attempted,
            other => return Err(UnknownName::new("record outcome", other)),
        })
    }
}

/// Compares with the stored name, so a check reads like the row it checks.
impl PartialEq<&str> for OutcomeStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A stored name that no variant has: a row written by another version, or not by loopsync.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} \"{name}\"")]
pub struct UnknownName {
    /// What the name should have named (`record outcome`, `run status`).
    pub what: &'static str,
    /// The name read.
    pub name: String,
}

impl UnknownName {
    /// An unknown `name` of a `what`.
    pub fn new(what: &'static str, name: impl Into<String>) -> UnknownName {
        UnknownName {
            what,
            name: name.into(),
        }
    }
}

/// loader (or transformer, for invalid records) → checkpointer: what became of one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub v: u16,
    pub sync: String,
    pub run_id: i64,
    pub key: String,
    pub fingerprint: String,
    pub status: OutcomeStatus,
    /// `upsert`, … or `none` for a record that never became an operation.
    pub operation: String,
    pub reason: Option<String>,
    /// The Loops contact id, when Loops said it.
    pub contact_id: Option<String>,
    /// Requests sent toward Loops for this record by the attempt this outcome reports (the
    /// attempt that settled it, or for `attempted` the failed one); `counts.total()` since
    /// version 2. Earlier attempts reported themselves as `attempted` outcomes.
    pub requests: u32,
    /// Unix milliseconds.
    pub at: i64,
    /// The email the contact has in Loops after a confirmed write.
    #[serde(default)]
    pub email: Option<String>,
    /// The userId the contact has in Loops after a confirmed write.
    #[serde(default)]
    pub user_id: Option<String>,
    /// `requests` by kind (version 2).
    #[serde(default)]
    pub counts: RequestCounts,
    /// How the record differs from the sync's state, when it became a change (version 2):
    /// the run report counts a change found invalid as invalid, not as added or changed.
    #[serde(default)]
    pub change: Option<ChangeKind>,
    /// For an `attempted` outcome, the delivery that sent the requests (version 2):
    /// `<stream sequence>.<delivery count>`, so the warehouse counts each attempt once.
    #[serde(default)]
    pub attempt: Option<String>,
    /// The state's random id (from the operation or change): scopes the message id.
    #[serde(default)]
    pub installation: String,
}

impl Outcome {
    /// An outcome for `key` of `run_id` with the current time.
    pub fn new(
        sync: &str,
        run_id: i64,
        key: &str,
        fingerprint: &str,
        status: OutcomeStatus,
        operation: &str,
    ) -> Outcome {
        Outcome {
            v: VERSION,
            sync: sync.to_owned(),
            run_id,
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            status,
            operation: operation.to_owned(),
            reason: None,
            contact_id: None,
            requests: 0,
            at: chrono::Utc::now().timestamp_millis(),
            email: None,
            user_id: None,
            counts: RequestCounts::default(),
            change: None,
            attempt: None,
            installation: String::new(),
        }
    }

    /// An outcome for a change that has not become an operation (`operation` is `none` when it
    /// never will): the change's record, run, installation and kind, so the run report counts
    /// it under the change's kind.
    pub fn for_change(change: &RowChange, status: OutcomeStatus, operation: &str) -> Outcome {
        let mut outcome = Outcome::new(
            &change.sync,
            change.run_id,
            &change.key,
            &change.fingerprint,
            status,
            operation,
        )
        .with_installation(&change.installation);
        outcome.change = Some(change.kind);
        outcome
    }

    /// An outcome for an operation: its record, run, installation, change kind and action.
    pub fn for_operation(operation: &Operation, status: OutcomeStatus) -> Outcome {
        let mut outcome = Outcome::new(
            &operation.sync,
            operation.run_id,
            &operation.key,
            &operation.fingerprint,
            status,
            operation.action.name(),
        )
        .with_installation(&operation.installation);
        outcome.change = Some(operation.change);
        outcome
    }

    /// A record found invalid before it became a change (a NULL or duplicate key, an email on
    /// several rows): no fingerprint, no operation, and why.
    pub fn invalid(
        sync: &str,
        run_id: i64,
        key: &str,
        installation: &str,
        reason: impl Into<String>,
    ) -> Outcome {
        Outcome::new(sync, run_id, key, "", OutcomeStatus::Invalid, "none")
            .with_installation(installation)
            .with_reason(reason)
    }

    /// A record dead-lettered past its operation (its outcome could not be recorded, or not
    /// even read): no fingerprint, so the next run sends it again; and why.
    pub fn dead_letter(
        sync: &str,
        run_id: i64,
        key: &str,
        operation: &str,
        installation: &str,
        reason: impl Into<String>,
    ) -> Outcome {
        Outcome::new(
            sync,
            run_id,
            key,
            "",
            OutcomeStatus::DeadLettered,
            operation,
        )
        .with_installation(installation)
        .with_reason(reason)
    }

    /// Sets the requests of the attempt this outcome reports.
    pub fn with_counts(mut self, counts: RequestCounts) -> Outcome {
        self.requests = counts.total();
        self.counts = counts;
        self
    }

    /// The requests by kind. A version-1 writer sent only the total: it is attributed to the
    /// kind of the operation (a re-key's removal, if any, to writes too).
    pub fn request_counts(&self) -> RequestCounts {
        if self.requests == 0 || self.counts.total() == self.requests {
            return self.counts;
        }
        let mut counts = RequestCounts::default();
        match self.operation.as_str() {
            "event" => counts.events = self.requests,
            "delete" => counts.deletes = self.requests,
            _ => counts.writes = self.requests,
        }
        counts
    }

    /// Sets the state's random id, which scopes the outcome's message id.
    pub fn with_installation(mut self, installation: &str) -> Outcome {
        installation.clone_into(&mut self.installation);
        self
    }

    /// Sets why the record ended as it did (shown in reports and rejection lists).
    pub fn with_reason(mut self, reason: impl Into<String>) -> Outcome {
        self.reason = Some(reason.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use serde_json::json;

    /// The stored names, the JSON names and `as_str` are one set: rows written before the enum
    /// read back, and reports print what they printed.
    #[test]
    fn outcome_statuses_read_what_they_write() {
        for status in [
            OutcomeStatus::Confirmed,
            OutcomeStatus::Skipped,
            OutcomeStatus::Invalid,
            OutcomeStatus::Rejected,
            OutcomeStatus::DeadLettered,
            OutcomeStatus::Attempted,
        ] {
            assert_eq!(status.as_str().parse::<OutcomeStatus>(), Ok(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                json!(status.as_str())
            );
            assert_eq!(status.to_string(), status.as_str());
        }
        assert_eq!(OutcomeStatus::DeadLettered, "dead_lettered");
        // Tables pad it like the text they printed before.
        assert_eq!(format!("{:<10}|", OutcomeStatus::Skipped), "skipped   |");
        assert_eq!(
            "gone".parse::<OutcomeStatus>().unwrap_err().to_string(),
            "unknown record outcome \"gone\""
        );
    }

    fn change() -> RowChange {
        RowChange {
            v: VERSION,
            sync: "users".into(),
            run_id: 7,
            key: "42".into(),
            fingerprint: "fp".into(),
            kind: ChangeKind::Added,
            values: BTreeMap::new(),
            confirmed_email: None,
            confirmed_user_id: None,
            installation: "inst".into(),
            generation: 0,
            keep_old_contact: false,
            resubscribe: false,
            possibly_applied: Vec::new(),
        }
    }

    /// Each constructor fills what the hand-built outcomes filled: the record, the run, the
    /// installation (it scopes the message id) and the change kind (the report counts by it).
    #[test]
    fn outcome_constructors_carry_their_record() {
        let c = change();
        let o = Outcome::for_change(&c, OutcomeStatus::Invalid, "none");
        let by_hand = {
            let mut o = Outcome::new("users", 7, "42", "fp", OutcomeStatus::Invalid, "none")
                .with_installation("inst");
            o.change = Some(ChangeKind::Added);
            o
        };
        assert_eq!(
            o,
            Outcome {
                at: o.at,
                ..by_hand
            }
        );

        let op = Operation {
            v: VERSION,
            sync: "users".into(),
            run_id: 7,
            key: "42".into(),
            fingerprint: "fp".into(),
            change: ChangeKind::Changed,
            idempotency_key: "k".into(),
            action: Action::Event {
                event_name: "e".into(),
                email: Some("a@x.co".into()),
                user_id: None,
                properties: Map::new(),
                mailing_lists: BTreeMap::new(),
                event_properties: Map::new(),
            },
            installation: "inst".into(),
            also_remove: None,
        };
        let o = Outcome::for_operation(&op, OutcomeStatus::Confirmed);
        let by_hand = {
            let mut o = Outcome::new("users", 7, "42", "fp", OutcomeStatus::Confirmed, "event")
                .with_installation("inst");
            o.change = Some(ChangeKind::Changed);
            o
        };
        assert_eq!(
            o,
            Outcome {
                at: o.at,
                ..by_hand
            }
        );

        let o = Outcome::invalid("users", 7, "", "inst", "the key is NULL");
        assert_eq!(
            (o.status, o.operation.as_str(), o.fingerprint.as_str()),
            (OutcomeStatus::Invalid, "none", "")
        );
        assert_eq!(
            (o.installation.as_str(), o.reason.as_deref(), o.change),
            ("inst", Some("the key is NULL"), None)
        );

        let o = Outcome::dead_letter("users", 7, "42", "upsert", "inst", "could not be recorded");
        assert_eq!(
            (o.status, o.operation.as_str(), o.fingerprint.as_str()),
            (OutcomeStatus::DeadLettered, "upsert", "")
        );
        assert_eq!(
            (o.installation.as_str(), o.reason.as_deref()),
            ("inst", Some("could not be recorded"))
        );
    }

    #[test]
    fn operation_round_trips_with_named_fields() {
        let op = Operation {
            v: VERSION,
            sync: "users".into(),
            run_id: 7,
            key: "42".into(),
            fingerprint: "f".into(),
            change: ChangeKind::Changed,
            idempotency_key: "ls1-abc".into(),
            action: Action::Upsert {
                email: Some("a@x.co".into()),
                user_id: None,
                properties: json!({"planName": "pro", "seats": 3, "gone": null})
                    .as_object()
                    .unwrap()
                    .clone(),
                mailing_lists: [("news".to_owned(), true)].into(),
            },
            installation: "i".into(),
            also_remove: None,
        };
        let bytes = encode(&op);
        // Named: the field names are in the bytes.
        assert!(bytes.windows(14).any(|w| w == b"idempotency_ke"));
        assert_eq!(decode::<Operation>(&bytes).unwrap(), op);
    }

    /// A newer writer adds a field: this reader ignores it. An older writer lacks a field that
    /// has a default: this reader fills it in.
    #[test]
    fn schema_evolution_with_defaults() {
        #[derive(Serialize)]
        struct NewerRunRequest<'a> {
            v: u16,
            sync: &'a str,
            run_id: i64,
            priority: u8,
        }
        let bytes = encode(&NewerRunRequest {
            v: 2,
            sync: "users",
            run_id: 1,
            priority: 9,
        });
        let read: RunRequest = decode(&bytes).unwrap();
        assert_eq!(read.run_id, 1);

        #[derive(Debug, Deserialize)]
        struct FutureRunRequest {
            #[allow(dead_code)]
            sync: String,
            #[serde(default)]
            priority: u8,
        }
        let old = encode(&RunRequest {
            v: 1,
            sync: "users".into(),
            run_id: 1,
            only_keys: Vec::new(),
            installation: String::new(),
            allow_removals: false,
        });
        assert_eq!(decode::<FutureRunRequest>(&old).unwrap().priority, 0);
    }

    #[test]
    fn request_counts_add_up() {
        let mut c = RequestCounts::default();
        c.count(RequestKind::Write, false, false);
        c.count(RequestKind::Write, true, true);
        c.count(RequestKind::Delete, true, false);
        c.count(RequestKind::Preflight, false, false);
        c.count(RequestKind::Event, false, false);
        assert_eq!(c.total(), 5);
        assert_eq!((c.writes, c.deletes, c.events, c.preflight), (2, 1, 1, 1));
        assert_eq!((c.retries, c.rate_limited), (2, 1));
        let mut sum = RequestCounts::default();
        sum.add(&c);
        sum.add(&c);
        assert_eq!((sum.total(), sum.retries), (10, 4));
        let o = Outcome::new("s", 1, "k", "f", OutcomeStatus::Attempted, "upsert").with_counts(c);
        assert_eq!((o.requests, o.request_counts()), (5, c));
    }

    /// An outcome from a version-1 writer: no counts, no change; the total is attributed by
    /// the operation. A version-2 outcome round-trips with its new fields.
    #[test]
    fn outcome_versions() {
        #[derive(Serialize)]
        struct OutcomeV1<'a> {
            v: u16,
            sync: &'a str,
            run_id: i64,
            key: &'a str,
            fingerprint: &'a str,
            status: OutcomeStatus,
            operation: &'a str,
            reason: Option<String>,
            contact_id: Option<String>,
            requests: u32,
            at: i64,
        }
        let old = encode(&OutcomeV1 {
            v: 1,
            sync: "users",
            run_id: 3,
            key: "9",
            fingerprint: "f",
            status: OutcomeStatus::Confirmed,
            operation: "event",
            reason: None,
            contact_id: None,
            requests: 3,
            at: 0,
        });
        let read: Outcome = decode(&old).unwrap();
        assert_eq!((read.change, read.attempt.as_deref()), (None, None));
        assert_eq!(read.counts, RequestCounts::default());
        assert_eq!(
            read.request_counts(),
            RequestCounts {
                events: 3,
                ..RequestCounts::default()
            }
        );
        let mut new = Outcome::new("users", 3, "9", "f", OutcomeStatus::Attempted, "upsert")
            .with_counts(RequestCounts {
                writes: 1,
                rate_limited: 1,
                ..RequestCounts::default()
            });
        new.change = Some(ChangeKind::Added);
        new.attempt = Some("17.2".into());
        assert_eq!(decode::<Outcome>(&encode(&new)).unwrap(), new);
    }

    #[test]
    fn failure_statuses() {
        assert!(OutcomeStatus::Rejected.is_failure());
        assert!(OutcomeStatus::Invalid.is_failure());
        assert!(OutcomeStatus::DeadLettered.is_failure());
        assert!(!OutcomeStatus::Confirmed.is_failure());
        assert!(!OutcomeStatus::Skipped.is_failure());
        assert!(!OutcomeStatus::Attempted.is_failure());
        assert!(!OutcomeStatus::Attempted.is_final());
        assert!(OutcomeStatus::DeadLettered.is_final());
    }
}
