//! `loopsync forget`: erases one person — a record's key, or an email — from everything
//! loopsync keeps for a sync, for an erasure request (GDPR article 17): the state, the results
//! and attempts, the texts that name them; over NATS the messages of the installation's streams
//! that carry them (work queues and dead letters) and the loader's ledger entry; and, asked, the
//! contact in Loops.
//!
//! The order makes an interrupted erasure safe to run again: Loops first (its identities are
//! read from the state), then the streams and the ledger, then the state, in one transaction
//! that is refused while the sync has a run in progress (its outcomes would write the records
//! again). A record forgotten whose row is still in the model is new to the next run, which
//! sends it again: the row must leave the warehouse too.

use std::collections::BTreeSet;

use loopsync_bus::{Coordination, Erased, Messaging, RateBudget};
use loopsync_core::codec;
use loopsync_core::envelope::{Operation, Outcome, RowChange, RunRequest};
use loopsync_core::keys;
use loopsync_core::spec::{IdentifyBy, SyncSpec};
use loopsync_core::stage::Stage;
use loopsync_core::value::normalize_email;
use loopsync_core::{Classified, ErrorClass};
use loopsync_loops_client::{ContactIdentity, LoopsClient, LoopsError};
use loopsync_warehouse::{Erasure, KeptRecord, Person, Warehouse, WarehouseError};
use serde::Serialize;

use crate::EngineError;
use crate::retry::with_retries;

/// Who to forget, as the user typed it: the email is compared as the sync normalises emails.
pub fn person(key: Option<&str>, email: Option<&str>) -> Option<Person> {
    match (key, email) {
        (Some(key), None) => Some(Person::Key(key.to_owned())),
        (None, Some(email)) => Some(Person::Email(normalize_email(email))),
        _ => None,
    }
}

/// Where the contact is deleted in Loops (`--in-loops`), and with what.
pub struct InLoops<'a> {
    pub client: &'a LoopsClient,
    /// The team's rate budget, as every request to Loops takes it.
    pub budget: &'a RateBudget,
    /// `loops.max_attempts`.
    pub attempts: u32,
    /// The deployment's other syncs: a contact one of them holds is kept (deleting it would
    /// leave that sync's state believing Loops has it, and its runs would never write it
    /// again).
    pub other_syncs: Vec<String>,
}

/// The bus whose streams and ledger may hold the person (over NATS).
pub struct OnBus<'a> {
    pub messaging: &'a dyn Messaging,
    pub coordination: &'a dyn Coordination,
    /// The state's id, which the ledger's keys carry.
    pub installation: &'a str,
}

/// What `forget` erased, per place; no personal data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Forgotten {
    pub sync: String,
    /// Records of the sync found to be the person.
    pub records: u64,
    /// Rows and texts of the state's tables.
    pub state: Erasure,
    /// Messages of the installation's streams (over NATS; `None` without it).
    pub messages: Option<Erased>,
    /// Entries of the loader's ledger (over NATS).
    pub ledger: u64,
    /// Contacts deleted in Loops (`--in-loops`; `None` without it).
    pub loops: Option<LoopsDeletes>,
}

/// The deletes `--in-loops` asked of Loops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LoopsDeletes {
    /// Contacts Loops deleted.
    pub deleted: u64,
    /// Identities Loops had no contact for (404).
    pub not_in_loops: u64,
    /// Contacts kept because another sync of the deployment holds them (forget the person
    /// there too, with `--in-loops`, to delete them).
    pub held_by_another_sync: u64,
}

impl Forgotten {
    /// Whether anything of the person was found anywhere.
    pub fn found(&self) -> bool {
        let messages = self
            .messages
            .is_some_and(|m| m.work_queues + m.dead_letters > 0);
        self.records > 0
            || self.state != Erasure::default()
            || messages
            || self.ledger > 0
            || self.loops.is_some_and(|l| l.deleted > 0)
    }
}

/// What can stop an erasure.
#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    /// The sync has a run in progress: forgetting now, its outcomes would write the person
    /// again. Nothing was erased.
    #[error(
        "run {run_id} of sync {sync} is {status}: nothing was erased; forget once it has ended \
         (loopsync runs --sync {sync})"
    )]
    RunInProgress {
        sync: String,
        run_id: i64,
        status: String,
    },
    /// The work queues still hold messages of the person (or a run request of the sync): a
    /// worker may have one in hand — a run closed as interrupted leaves its messages to the
    /// workers — and would write the person back (in Loops, the ledger, the state) after the
    /// erasure. Nothing was erased.
    #[error(
        "{messages} message(s) of this person, or a run request of sync {sync}, are still in \
         NATS's work queues: a worker may hold one and would write the person back; nothing \
         was erased; forget once they are processed (a run of the sync, or its workers, take \
         them)"
    )]
    InFlight { sync: String, messages: u64 },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<WarehouseError> for ForgetError {
    fn from(e: WarehouseError) -> ForgetError {
        match e {
            WarehouseError::RunInProgress {
                sync,
                run_id,
                status,
                ..
            } => ForgetError::RunInProgress {
                sync,
                run_id,
                status: status.to_string(),
            },
            e => ForgetError::Engine(e.into()),
        }
    }
}

impl From<loopsync_bus::BusError> for ForgetError {
    fn from(e: loopsync_bus::BusError) -> ForgetError {
        ForgetError::Engine(e.into())
    }
}

impl Classified for ForgetError {
    fn class(&self) -> ErrorClass {
        match self {
            ForgetError::RunInProgress { .. } | ForgetError::InFlight { .. } => {
                ErrorClass::Permanent
            }
            ForgetError::Engine(e) => e.class(),
        }
    }
}

/// Erases `person` from what loopsync keeps for `spec`'s sync (see the module's words).
pub async fn forget(
    warehouse: &dyn Warehouse,
    bus: Option<OnBus<'_>>,
    loops: Option<InLoops<'_>>,
    spec: &SyncSpec,
    person: &Person,
) -> Result<Forgotten, ForgetError> {
    let sync = spec.name.as_str();
    // Erasing nothing first: the state's refusal while a run is in progress (a run whose
    // process died closed by its lease, as `run` does), before Loops or NATS are touched.
    warehouse.erase_person(sync, &[], &[]).await?;
    let found = warehouse.find_person(sync, person).await?;
    let keys: BTreeSet<String> = found.iter().map(|r| r.key.clone()).collect();
    let emails = emails_of(person, &found);
    let mut forgotten = Forgotten {
        sync: sync.to_owned(),
        records: found.len() as u64,
        ..Forgotten::default()
    };
    let matcher = Matcher {
        keys: keys.clone(),
        key: match person {
            Person::Key(k) => Some(k.clone()),
            Person::Email(_) => None,
        },
        emails: emails.clone(),
        email_column: spec.property("email").map(|p| p.column.clone()),
    };
    if let Some(bus) = &bus {
        // Before anything is erased: a message of the person still in a work queue may be in
        // a worker's hands (deleting it from the stream would not stop the worker), and a run
        // request's extractor may still publish the person's change.
        let in_hand = matcher.clone();
        let held = bus
            .messaging
            .held(sync, &move |stage: Stage, payload: &[u8]| {
                stage == Stage::Extractor || in_hand.matches(stage, payload)
            })
            .await?;
        if held > 0 {
            return Err(ForgetError::InFlight {
                sync: sync.to_owned(),
                messages: held,
            });
        }
    }
    if let Some(loops) = loops {
        let mut deletes = LoopsDeletes::default();
        let (contacts, held_elsewhere) =
            contacts_to_delete(warehouse, spec, &found, &loops.other_syncs).await?;
        deletes.held_by_another_sync = held_elsewhere;
        for identity in contacts {
            let mut counts = Default::default();
            let deleted = with_retries(loops.budget, loops.attempts, &mut counts, || {
                loops.client.delete_contact(&identity)
            })
            .await;
            match deleted {
                Ok(()) => deletes.deleted += 1,
                Err(EngineError::LoopsClient(LoopsError::NotFound { .. })) => {
                    deletes.not_in_loops += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        forgotten.loops = Some(deletes);
    }
    if let Some(bus) = bus {
        let matches = move |stage: Stage, payload: &[u8]| matcher.matches(stage, payload);
        forgotten.messages = Some(bus.messaging.erase(sync, &matches).await?);
        for key in &keys {
            let entry = keys::ledger_key(bus.installation, sync, key);
            forgotten.ledger += u64::from(bus.coordination.ledger_forget(&entry).await?);
        }
    }
    let keys: Vec<String> = keys.into_iter().collect();
    let emails: Vec<String> = emails.into_iter().collect();
    forgotten.state = warehouse.erase_person(sync, &keys, &emails).await?;
    Ok(forgotten)
}

/// The emails that name the person (as the email rule keeps them): the one typed, every email
/// the state keeps of the records found, and a key that is an email.
fn emails_of(person: &Person, found: &[KeptRecord]) -> BTreeSet<String> {
    let mut emails = BTreeSet::new();
    if let Person::Email(email) = person {
        emails.insert(email.clone());
    }
    for r in found {
        let candidates = [
            &r.confirmed_email,
            &r.emitted_email,
            &r.model_email,
            &Some(r.key.clone()),
        ];
        for email in candidates.into_iter().flatten() {
            if email.contains('@') {
                emails.insert(normalize_email(email));
            }
        }
        for c in &r.possibly_applied {
            if let Some(email) = &c.email {
                emails.insert(normalize_email(email));
            }
        }
    }
    emails.retain(|e| !e.is_empty());
    emails
}

/// The contacts to delete in Loops: each identity of the records found by which the sync
/// identifies contacts (its userId under `identify_by = "userId"`, else its email; the email
/// when a record has no userId), confirmed, last sent or possibly applied — except those that
/// another record of the sync now holds (that contact is someone else's now), and those that
/// a record of another sync (`other_syncs`) holds, counted (the second value): that sync's
/// state says Loops has the contact.
async fn contacts_to_delete(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    found: &[KeptRecord],
    other_syncs: &[String],
) -> Result<(Vec<ContactIdentity>, u64), WarehouseError> {
    let candidates = identities(spec, found);
    let keys: BTreeSet<&str> = found.iter().map(|r| r.key.as_str()).collect();
    let mut contacts = Vec::new();
    let mut held_elsewhere = 0;
    'candidates: for identity in candidates {
        let value = match &identity {
            ContactIdentity::Email(e) => e.clone(),
            ContactIdentity::UserId(u) => u.clone(),
        };
        let value = std::slice::from_ref(&value);
        let owners = warehouse.owners(&spec.name, value).await?;
        if !owners.iter().all(|(key, _, _)| keys.contains(key.as_str())) {
            continue;
        }
        for other in other_syncs.iter().filter(|s| **s != spec.name) {
            if !warehouse.owners(other, value).await?.is_empty() {
                held_elsewhere += 1;
                continue 'candidates;
            }
        }
        contacts.push(identity);
    }
    Ok((contacts, held_elsewhere))
}

/// [`contacts_to_delete`]'s candidates, each once, in order.
fn identities(spec: &SyncSpec, found: &[KeptRecord]) -> Vec<ContactIdentity> {
    let mut out: Vec<ContactIdentity> = Vec::new();
    let mut push = |email: Option<&String>, user_id: Option<&String>| {
        let identity = match (spec.identify_by, user_id, email) {
            (IdentifyBy::UserId, Some(u), _) => ContactIdentity::UserId(u.clone()),
            (_, _, Some(e)) => ContactIdentity::Email(normalize_email(e)),
            (_, Some(u), None) => ContactIdentity::UserId(u.clone()),
            (_, None, None) => return,
        };
        if !out.contains(&identity) {
            out.push(identity);
        }
    };
    for r in found {
        // The record's userId names its contact whichever version wrote it.
        let user_id = r.confirmed_user_id.as_ref().or(r.emitted_user_id.as_ref());
        push(r.confirmed_email.as_ref(), user_id);
        push(
            r.emitted_email.as_ref(),
            r.emitted_user_id.as_ref().or(user_id),
        );
        for c in &r.possibly_applied {
            push(c.email.as_ref(), c.user_id.as_ref());
        }
    }
    out
}

/// Picks the messages that carry the person: their record's key is one of the person's, or
/// (an email typed) an email they carry is one of the person's.
#[derive(Clone)]
struct Matcher {
    keys: BTreeSet<String>,
    /// The key typed (`--key`): found even when the state kept nothing of it.
    key: Option<String>,
    emails: BTreeSet<String>,
    /// The column the sync maps to `email`: a change carries the row's values.
    email_column: Option<String>,
}

impl Matcher {
    fn is_key(&self, key: &str) -> bool {
        self.keys.contains(key) || self.key.as_deref() == Some(key)
    }

    fn is_email(&self, email: Option<&str>) -> bool {
        email.is_some_and(|e| self.emails.contains(&normalize_email(e)))
    }

    /// A message that cannot be read is left: nothing says whose it is.
    fn matches(&self, stage: Stage, payload: &[u8]) -> bool {
        match stage {
            Stage::Extractor => codec::decode::<RunRequest>(payload)
                .is_ok_and(|r| r.only_keys.iter().any(|k| self.is_key(k))),
            Stage::Transformer => codec::decode::<RowChange>(payload).is_ok_and(|c| {
                self.is_key(&c.key)
                    || self.is_email(c.confirmed_email.as_deref())
                    || self.is_email(
                        self.email_column
                            .as_ref()
                            .and_then(|column| c.values.get(column))
                            .and_then(|v| v.as_deref()),
                    )
                    || c.possibly_applied
                        .iter()
                        .any(|o| self.is_email(o.email.as_deref()))
            }),
            Stage::Loader => codec::decode::<Operation>(payload).is_ok_and(|op| {
                let old_email = match &op.action {
                    loopsync_core::envelope::Action::Rekey { old_email, .. } => {
                        Some(old_email.as_str())
                    }
                    _ => None,
                };
                self.is_key(&op.key)
                    || self.is_email(op.action.identity().0)
                    || self.is_email(old_email)
            }),
            Stage::Checkpointer => codec::decode::<Outcome>(payload)
                .is_ok_and(|o| self.is_key(&o.key) || self.is_email(o.email.as_deref())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use loopsync_core::envelope::{ChangeKind, OldContact};

    use super::*;

    fn change(key: &str, email: &str) -> RowChange {
        RowChange {
            v: 1,
            sync: "s".into(),
            run_id: 1,
            key: key.into(),
            fingerprint: "f".into(),
            kind: ChangeKind::Added,
            values: BTreeMap::from([("email".to_owned(), Some(email.to_owned()))]),
            confirmed_email: None,
            confirmed_user_id: None,
            installation: "i".into(),
            generation: 0,
            keep_old_contact: false,
            resubscribe: false,
            possibly_applied: Vec::new(),
        }
    }

    /// A message is the person's by its key, or by an email it carries (in any case and
    /// blanks, as the sync normalises them); another person's, or one that cannot be read, is
    /// left.
    #[test]
    fn messages_are_picked_by_key_or_email() {
        let matcher = Matcher {
            keys: BTreeSet::from(["7".to_owned()]),
            key: None,
            emails: BTreeSet::from(["ann@x.co".to_owned()]),
            email_column: Some("email".into()),
        };
        let encoded = |c: &RowChange| codec::encode(c);
        assert!(matcher.matches(Stage::Transformer, &encoded(&change("7", "zed@x.co"))));
        assert!(matcher.matches(Stage::Transformer, &encoded(&change("9", " Ann@X.co"))));
        assert!(!matcher.matches(Stage::Transformer, &encoded(&change("9", "bob@x.co"))));
        assert!(!matcher.matches(Stage::Transformer, b"\xc1not msgpack"));
        let request = |only_keys: &[&str]| RunRequest {
            v: 1,
            sync: "s".into(),
            run_id: 1,
            only_keys: only_keys.iter().map(|k| (*k).to_owned()).collect(),
            installation: "i".into(),
            allow_removals: false,
        };
        assert!(matcher.matches(Stage::Extractor, &codec::encode(&request(&["3", "7"]))));
        assert!(!matcher.matches(Stage::Extractor, &codec::encode(&request(&["3"]))));
    }

    /// Loops' contacts are deleted by the identifier the sync identifies them by, each once:
    /// the userId under userId identity (the email when a record has none), else the email.
    #[test]
    fn contacts_are_deleted_by_the_identifier_of_the_sync() {
        let mut spec = crate::testing::spec();
        let record = KeptRecord {
            key: "7".into(),
            confirmed_email: Some("Ann@x.co".into()),
            confirmed_user_id: Some("u7".into()),
            emitted_email: Some("ann@x.co".into()),
            possibly_applied: vec![OldContact {
                email: Some("old@x.co".into()),
                user_id: None,
            }],
            in_state: true,
            ..KeptRecord::default()
        };
        spec.identify_by = IdentifyBy::Email;
        assert_eq!(
            identities(&spec, std::slice::from_ref(&record)),
            vec![
                ContactIdentity::Email("ann@x.co".into()),
                ContactIdentity::Email("old@x.co".into())
            ]
        );
        spec.identify_by = IdentifyBy::UserId;
        assert_eq!(
            identities(&spec, &[record]),
            vec![
                ContactIdentity::UserId("u7".into()),
                ContactIdentity::Email("old@x.co".into())
            ]
        );
    }
}
