//! The transformer: from a change of a warehouse row to a Loops operation.
//!
//! [`transform`] is a pure function of the sync's definition and the change — no NATS, no HTTP —
//! and says either the operation or why the record is invalid. [`TransformerStage`] is the thin
//! bus adapter around it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use loopsync_bus::worker::{DeliveryInfo, Fate, Handler};
use loopsync_bus::{BusError, Messaging, publish};
use loopsync_core::codec::{self, DecodeError};
use loopsync_core::envelope::{
    Action, AlsoRemove, ChangeKind, Operation, Outcome, OutcomeStatus, RowChange, VERSION,
};
use loopsync_core::spec::{AppendSpec, Behavior, EventName, IdentifyBy, OnRemove, SyncSpec};
use loopsync_core::value::{
    PropertyKind, coerce, is_valid_email, millis_to_rfc3339, normalize_email,
};
use loopsync_core::{Classified, ErrorClass, keys};
use serde_json::{Map, Value};

/// Why a record cannot become a Loops operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

/// Maps one change to one operation.
///
/// * Every mapped property is sent, coerced to its declared type; SQL NULL is sent as `null`,
///   which clears the property in Loops (never `""`). Emails are trimmed and lower-cased.
/// * A mailing-list column that is true subscribes, false unsubscribes, NULL leaves it alone.
/// * `subscribed` is sent only when mapped: sending `true` would re-subscribe people who left.
/// * Mirror: a record that left the model (only one this sync had confirmed) is deleted, or
///   unsubscribed with `on_remove = "unsubscribe"`, by the identifiers Loops confirmed for it.
/// * Identified by email, a record whose email changed is a re-key: the new email's contact is
///   written; under mirror the old email's contact is removed, under upsert it stays (and the
///   run report counts the re-keys).
/// * With `trigger_workflows`, the write goes as one `events/send` (`event_on_create` for a
///   record new to the sync, `event_on_update` for a changed one), its idempotency key derived
///   from the change (the record's confirmed generation and new fingerprint), so each change
///   fires its event once, and a later change — even back to an earlier value — fires again.
/// * Invalid: no usable email where one is needed, no userId under `identify_by = "userId"`, a
///   value over 500 characters ([`SyncSpec::too_long`], the extractor's rule too), a value that
///   cannot be read as its property's type.
/// * An event sync (`behavior = "append"`): the row is one `events/send` — the event name
///   (fixed, or the row's column: empty is invalid), the contact's identity and mapped
///   properties and lists, and the typed `eventProperties` (dates as ISO-8601 strings) — keyed
///   by (sync, event id) alone ([`keys::event_key`]), so it fires once for the life of the sync.
pub fn transform(spec: &SyncSpec, change: &RowChange) -> Result<Operation, Invalid> {
    let (action, idempotency_key) = match (&spec.append, change.kind) {
        (Some(append), _) => (
            event(spec, append, change)?,
            keys::event_key(&change.sync, &change.key),
        ),
        (None, kind) => {
            let action = match kind {
                ChangeKind::Added | ChangeKind::Changed => upsert(spec, change)?,
                ChangeKind::Removed => removal(spec, change)?,
            };
            // The event of a record's creation is one per generation, whatever its values: a
            // create whose answer was lost, sent again with other values, must not fire it twice
            // (Loops answers 409 and the contact is written without it, see the loader) — nor
            // the re-key of a record whose create's answer was lost and whose email changed.
            let creation = kind == ChangeKind::Added
                && match &action {
                    Action::Event { .. } => true,
                    Action::Rekey { write, .. } => matches!(**write, Action::Event { .. }),
                    _ => false,
                };
            let key = keys::idempotency_key(
                &change.installation,
                &change.sync,
                &change.key,
                change.generation,
                if creation { "" } else { &change.fingerprint },
                if creation { "created" } else { action.name() },
            );
            (action, key)
        }
    };
    // Under mirror, what a version whose answer was lost may have left in Loops goes too.
    let also_remove = (spec.behavior == Behavior::Mirror)
        .then(|| change.possibly_left(spec))
        .filter(|left| !left.is_empty())
        .map(|contacts| AlsoRemove {
            mode: spec.on_remove,
            contacts,
        });
    Ok(Operation {
        v: VERSION,
        sync: change.sync.clone(),
        run_id: change.run_id,
        key: change.key.clone(),
        fingerprint: change.fingerprint.clone(),
        change: change.kind,
        idempotency_key,
        action,
        installation: change.installation.clone(),
        also_remove,
    })
}

/// Mirror: the contact of a record that left the model, by the identifiers Loops confirmed.
fn removal(spec: &SyncSpec, change: &RowChange) -> Result<Action, Invalid> {
    if spec.behavior != Behavior::Mirror {
        return Err(Invalid(format!(
            "sync {} does not remove contacts (behavior = \"upsert\")",
            spec.name
        )));
    }
    // Delete takes one identifier: the one the sync identifies contacts by, when known.
    let (email, user_id) = match (
        spec.identify_by,
        change.confirmed_email.clone(),
        change.confirmed_user_id.clone(),
    ) {
        (IdentifyBy::UserId, _, Some(u)) => (None, Some(u)),
        (_, Some(e), _) => (Some(e), None),
        (_, None, Some(u)) => (None, Some(u)),
        (_, None, None) => {
            return Err(Invalid(
                "left the model, but the identifiers Loops confirmed for it are unknown".into(),
            ));
        }
    };
    Ok(match spec.on_remove {
        OnRemove::Delete => Action::Delete { email, user_id },
        OnRemove::Unsubscribe => Action::Unsubscribe { email, user_id },
    })
}

fn text<'a>(change: &'a RowChange, column: &str) -> Option<&'a str> {
    change.values.get(column).and_then(|v| v.as_deref())
}

/// An event sync's row: one event (keyed by (sync, event id) in [`transform`]).
fn event(spec: &SyncSpec, append: &AppendSpec, change: &RowChange) -> Result<Action, Invalid> {
    if change.kind == ChangeKind::Removed {
        return Err(Invalid(format!(
            "sync {} sends events: a row that leaves the model removes nothing",
            spec.name
        )));
    }
    let contact = contact(spec, change)?;
    let event_name = match &append.event {
        EventName::Fixed(name) => name.clone(),
        EventName::Column(column) => match text(change, column).map(str::trim) {
            Some(name) if name.contains(':') => {
                return Err(Invalid(format!(
                    "the event name (column {column}) has a `:`: Loops refuses such a name"
                )));
            }
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => {
                return Err(Invalid(format!("no event name: column {column} is empty")));
            }
        },
    };
    let mut event_properties = Map::new();
    for p in &append.event_properties {
        let value = match text(change, &p.column) {
            None => continue,
            Some(t) => {
                match coerce(p.kind, t) {
                    // Loops takes an event's dates as ISO-8601 strings.
                    Ok(Value::Number(n)) if p.kind == PropertyKind::Date => {
                        Value::String(millis_to_rfc3339(n.as_i64().unwrap_or_default()))
                    }
                    Ok(v) => v,
                    Err(why) => {
                        return Err(Invalid(format!(
                            "event property {} (column {}): {why}",
                            p.property, p.column
                        )));
                    }
                }
            }
        };
        event_properties.insert(p.property.clone(), value);
    }
    Ok(Action::Event {
        event_name,
        email: contact.email,
        user_id: contact.user_id,
        properties: contact.properties,
        mailing_lists: contact.mailing_lists,
        event_properties,
    })
}

/// A row's contact: identity, properties and lists, checked.
struct Contact {
    email: Option<String>,
    user_id: Option<String>,
    properties: Map<String, Value>,
    mailing_lists: BTreeMap<String, bool>,
}

/// Reads and checks the contact of a row: identity as the sync says, every mapped property
/// coerced, every list a boolean.
fn contact(spec: &SyncSpec, change: &RowChange) -> Result<Contact, Invalid> {
    // The extractor judged this already; a change published by an earlier version did not.
    if let Some(why) = spec.too_long(&change.values) {
        return Err(Invalid(why));
    }
    let mut email = None;
    let mut user_id = None;
    let mut properties = Map::new();
    for p in &spec.properties {
        let raw = text(change, &p.column);
        match p.property.as_str() {
            "email" => email = raw.map(normalize_email).filter(|e| !e.is_empty()),
            "userId" => user_id = raw.map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()),
            _ => {
                let value = match raw {
                    None => Value::Null,
                    Some(t) => coerce(p.kind, t).map_err(|why| {
                        Invalid(format!("{} (column {}): {why}", p.property, p.column))
                    })?,
                };
                properties.insert(p.property.clone(), value);
            }
        }
    }
    if let Some(e) = &email
        && !is_valid_email(e)
    {
        let column = spec
            .property("email")
            .map_or("email", |p| p.column.as_str());
        return Err(Invalid(format!("malformed email (column {column})")));
    }
    match spec.identify_by {
        IdentifyBy::Email => {
            if email.is_none() {
                return Err(Invalid(
                    "no email: the contact is identified by email".into(),
                ));
            }
        }
        IdentifyBy::UserId => {
            if user_id.is_none() {
                return Err(Invalid(
                    "no userId: the contact is identified by userId".into(),
                ));
            }
            // An event addresses a contact that may exist already: Loops says if it does not.
            if email.is_none() && change.kind == ChangeKind::Added && !spec.is_append() {
                return Err(Invalid("a new contact needs an email".into()));
            }
        }
    }
    let mut mailing_lists = BTreeMap::new();
    for l in &spec.lists {
        if let Some(t) = text(change, &l.column) {
            match coerce(PropertyKind::Boolean, t) {
                Ok(Value::Bool(on)) => {
                    mailing_lists.insert(l.list_id.clone(), on);
                }
                _ => {
                    return Err(Invalid(format!(
                        "mailing list {} (column {}): not a boolean",
                        l.list_id, l.column
                    )));
                }
            }
        }
    }
    Ok(Contact {
        email,
        user_id,
        properties,
        mailing_lists,
    })
}

fn upsert(spec: &SyncSpec, change: &RowChange) -> Result<Action, Invalid> {
    let Contact {
        email,
        user_id,
        mut properties,
        mailing_lists,
    } = contact(spec, change)?;
    // Back after the sync unsubscribed its contact: subscribed again, as it was before.
    if change.resubscribe {
        properties.insert("subscribed".into(), Value::Bool(true));
    }
    let write = write_action(
        spec,
        change,
        email.clone(),
        user_id,
        properties,
        mailing_lists,
    );
    // The write no longer finds the contact Loops confirmed for the record (the one re-key
    // rule, `RowChange::rekey`): Loops knows the record as another contact.
    if let Some(old) = change.rekey(spec) {
        return Ok(Action::Rekey {
            write: Box::new(write),
            old_email: old.email.unwrap_or_default(),
            old_user_id: old.user_id,
            remove_old: (spec.behavior == Behavior::Mirror && !change.keep_old_contact)
                .then_some(spec.on_remove),
        });
    }
    Ok(write)
}

/// The write of a record: an upsert, or with `trigger_workflows` an event.
fn write_action(
    spec: &SyncSpec,
    change: &RowChange,
    email: Option<String>,
    user_id: Option<String>,
    properties: Map<String, Value>,
    mailing_lists: BTreeMap<String, bool>,
) -> Action {
    if spec.trigger_workflows {
        let event_name = if change.kind == ChangeKind::Added {
            &spec.event_on_create
        } else {
            &spec.event_on_update
        };
        return Action::Event {
            event_name: event_name.clone(),
            email,
            user_id,
            properties,
            mailing_lists,
            event_properties: Map::new(),
        };
    }
    Action::Upsert {
        email,
        user_id,
        properties,
        mailing_lists,
    }
}

/// What can go wrong around [`transform`].
#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("sync {0} is not in this transformer's config")]
    UnknownSync(String),
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl Classified for TransformError {
    fn class(&self) -> ErrorClass {
        match self {
            TransformError::Decode(e) => e.class(),
            // Another deployment's config, or a sync removed since: retrying will not help.
            TransformError::UnknownSync(_) => ErrorClass::Permanent,
            TransformError::Bus(e) => e.class(),
        }
    }
}

/// The transformer on the bus: changes in, operations (or invalid outcomes) out.
pub struct TransformerStage {
    bus: Arc<dyn Messaging>,
    specs: HashMap<String, SyncSpec>,
}

impl TransformerStage {
    pub fn new(
        bus: Arc<dyn Messaging>,
        specs: impl IntoIterator<Item = SyncSpec>,
    ) -> TransformerStage {
        TransformerStage {
            bus,
            specs: specs.into_iter().map(|s| (s.name.clone(), s)).collect(),
        }
    }
}

#[async_trait]
impl Handler for TransformerStage {
    type Error = TransformError;

    async fn handle(&self, _info: &DeliveryInfo, payload: &Bytes) -> Result<(), TransformError> {
        let change: RowChange = codec::decode(payload)?;
        let spec = self
            .specs
            .get(&change.sync)
            .ok_or_else(|| TransformError::UnknownSync(change.sync.clone()))?;
        match transform(spec, &change) {
            Ok(op) => {
                publish::operation(&*self.bus, &op).await?;
                metrics::counter!(
                    "loopsync_records_total",
                    "sync" => change.sync.clone(),
                    "stage" => "transformer",
                    "outcome" => "operation"
                )
                .increment(1);
            }
            Err(Invalid(reason)) => {
                // With the change's kind: the run report counts it as an invalid row, not as
                // added or changed.
                let outcome = Outcome::for_change(&change, OutcomeStatus::Invalid, "none")
                    .with_reason(reason);
                publish::outcome(&*self.bus, &outcome).await?;
            }
        }
        Ok(())
    }

    async fn give_up(
        &self,
        _info: &DeliveryInfo,
        payload: &Bytes,
        fate: Fate,
        reason: &str,
    ) -> Result<(), TransformError> {
        let change: RowChange = codec::decode(payload)?;
        let outcome = Outcome::for_change(&change, fate.status(), "none").with_reason(reason);
        publish::outcome(&*self.bus, &outcome).await?;
        Ok(())
    }

    fn record(&self, payload: &Bytes) -> Option<String> {
        let change: RowChange = codec::decode(payload).ok()?;
        Some(loopsync_core::keys::log_key(&change.sync, &change.key))
    }
}

pub mod verify;

#[cfg(test)]
mod tests;
