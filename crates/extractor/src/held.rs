//! Removals and re-keys held until the model has been read, and what each becomes then: the
//! one rule the run (`ExtractorStage`) and `loopsync plan` share, so that a plan's removals,
//! requests and removal-guard verdict are the next run's.
//!
//! Under mirror a change that would take a contact out of Loops (a removal, a re-key that
//! removes its old contact, a contact a lost version may have left) waits until every row has
//! been read. Then a contact whose email (or, identified by userId, userId) another record now
//! has — written by this run, or confirmed in the state for another key — stays: a removal of it
//! is *released* (nothing sent, not weighed by the removal guard), a re-key keeps it, and it
//! leaves the contacts a lost version may have left. The remaining removals are what the
//! removal guard weighs ([`crate::decide::RemovalGuard`]).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;

use loopsync_core::envelope::{ChangeKind, OldContact, POSSIBLY_CREATED, RowChange};
use loopsync_core::spec::{Behavior, IdentifyBy, OnRemove, SyncSpec};
use loopsync_core::value::normalize_email;
use loopsync_transformer::transform;
use loopsync_warehouse::{Warehouse, WarehouseError};

/// Why a released removal sends nothing: the reason its outcome (a run) or its planned record
/// (`plan`) carries.
pub const RELEASED: &str = "not removed from Loops: another record now has its email or userId";

/// A record of the state that holds an identity: `(key, confirmed email, confirmed userId)`, as
/// `Warehouse::owners` gives them.
pub type Owner = (String, Option<String>, Option<String>);

/// The changes a run holds back, and the identities its writes take. Memory (mirror syncs
/// only): the held changes, and a 64-bit hash of the identity of each write (about 16 bytes per
/// write).
#[derive(Debug)]
pub struct Held<'a> {
    spec: &'a SyncSpec,
    changes: Vec<RowChange>,
    written: HashSet<u64>,
    hasher: RandomState,
}

/// What the held changes became, once the model was read.
#[derive(Debug, Default, PartialEq)]
pub struct Settled {
    /// Re-keys (and other held writes): they go whatever the removal guard says, each with
    /// `keep_old_contact` set when its old contact is another record's now.
    pub changes: Vec<RowChange>,
    /// Removals: what the removal guard weighs, sent unless it refuses them.
    pub removals: Vec<RowChange>,
    /// Removals not sent ([`RELEASED`]): their contact is another record's now. The record
    /// leaves the sync; its contact stays as it is (not unsubscribed either).
    pub released: Vec<RowChange>,
}

impl<'a> Held<'a> {
    /// Nothing held yet, for a run of `spec`.
    pub fn new(spec: &'a SyncSpec) -> Held<'a> {
        Held {
            spec,
            changes: Vec::new(),
            written: HashSet::new(),
            hasher: RandomState::new(),
        }
    }

    /// Takes a change as it is decided: notes the identity it writes when the transformer maps
    /// it to an operation (under mirror: only a held change ever asks) and gives it back when it goes at once; keeps a removal, or a change
    /// that would take a contact out of Loops (a re-key, `RowChange::possibly_left`), until
    /// [`Held::settle`].
    pub fn take(&mut self, change: RowChange) -> Option<RowChange> {
        if self.spec.behavior != Behavior::Mirror {
            return Some(change);
        }
        if change.kind == ChangeKind::Removed {
            self.changes.push(change);
            return None;
        }
        let value = |property: &str| {
            self.spec
                .property(property)
                .and_then(|p| change.values.get(&p.column).cloned().flatten())
        };
        let written = match self.spec.identify_by {
            IdentifyBy::Email => value("email").map(|e| normalize_email(&e)),
            IdentifyBy::UserId => value("userId").map(|u| u.trim().to_owned()),
        };
        // Only a write the transformer will send claims its identity: one it refuses (an
        // invalid row) never reaches Loops, so it must not release another record's removal.
        if let Some(id) = written.filter(|id| !id.is_empty())
            && transform(self.spec, &change).is_ok()
        {
            self.written.insert(self.hasher.hash_one(&id));
        }
        if change.rekey(self.spec).is_some() || !change.possibly_left(self.spec).is_empty() {
            self.changes.push(change);
            None
        } else {
            Some(change)
        }
    }

    /// The identities of the contacts the held changes would take out of Loops: those whose
    /// owners in the state [`Held::settle`] needs (`Warehouse::owners`).
    pub fn identities(&self) -> Vec<String> {
        self.changes
            .iter()
            .flat_map(|c| {
                removed_identity(self.spec, c)
                    .into_iter()
                    .chain(left_identities(self.spec, c))
            })
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// What each held change becomes, given `owners`: the records of the state that hold
    /// [`Held::identities`] (any others are ignored).
    pub fn settle(self, owners: &[Owner]) -> Settled {
        let Held {
            spec,
            changes,
            written,
            hasher,
        } = self;
        let mut settled = Settled::default();
        // The owners by identity (an email normalised, or a userId), each normalised once: a
        // search of every owner for every change was quadratic (5 000 removals of a million
        // rows: 1.4 s of normalising).
        let mut owned: HashMap<String, Vec<&str>> = HashMap::new();
        for (key, email, user_id) in owners {
            let email = email.as_deref().map(normalize_email);
            for id in email.into_iter().chain(user_id.iter().cloned()) {
                owned.entry(id).or_default().push(key);
            }
        }
        for mut change in changes {
            let claimed_by_another = |id: &String| {
                written.contains(&hasher.hash_one(id))
                    || owned
                        .get(id)
                        .is_some_and(|keys| keys.iter().any(|key| **key != change.key))
            };
            let claimed = removed_identity(spec, &change)
                .as_ref()
                .is_some_and(claimed_by_another);
            // A contact a lost version may have left, which another record has now, stays.
            let kept: Vec<OldContact> = change
                .possibly_applied
                .iter()
                .filter(|c| identity_of(spec, c).is_some_and(|id| !claimed_by_another(&id)))
                .cloned()
                .collect();
            change.possibly_applied = kept;
            match change.kind {
                // Under `on_remove = "unsubscribe"` a released record keeps what a lost version
                // may have left: an unsubscribe marks the record's tombstone to re-subscribe
                // when a row comes back, whatever its email — and that row may bring the taken
                // contact's, whose person may have unsubscribed on their own.
                ChangeKind::Removed
                    if claimed
                        && (change.possibly_applied.is_empty()
                            || spec.on_remove != OnRemove::Delete) =>
                {
                    settled.released.push(change)
                }
                // Its contact is another record's, but a contact a lost version may have left
                // still goes: the removal deletes that one (a 404 is done), and the others after
                // it.
                ChangeKind::Removed if claimed => {
                    let first = change.possibly_applied.remove(0);
                    change.confirmed_email = first.email;
                    change.confirmed_user_id = first.user_id;
                    change.fingerprint = POSSIBLY_CREATED.to_owned();
                    settled.removals.push(change);
                }
                ChangeKind::Removed => settled.removals.push(change),
                _ => {
                    change.keep_old_contact = claimed;
                    settled.changes.push(change);
                }
            }
        }
        settled
    }

    /// [`Held::settle`], asking `warehouse` for the owners (nothing asked when nothing is
    /// held).
    pub async fn settle_with(self, warehouse: &dyn Warehouse) -> Result<Settled, WarehouseError> {
        if self.changes.is_empty() {
            return Ok(Settled::default());
        }
        let owners = warehouse
            .owners(&self.spec.name, &self.identities())
            .await?;
        Ok(self.settle(&owners))
    }
}

/// The identity that finds a contact a version whose answer was lost may have left: its userId,
/// identified by userId, else its email.
fn identity_of(spec: &SyncSpec, contact: &OldContact) -> Option<String> {
    match spec.identify_by {
        IdentifyBy::Email => contact.email.as_deref().map(normalize_email),
        IdentifyBy::UserId => contact.user_id.clone(),
    }
    .filter(|i| !i.is_empty())
}

/// The identities of the contacts a held change would take out of Loops besides its own old
/// one ([`RowChange::possibly_left`]).
fn left_identities(spec: &SyncSpec, change: &RowChange) -> Vec<String> {
    change
        .possibly_left(spec)
        .iter()
        .filter_map(|c| identity_of(spec, c))
        .collect()
}

/// The identity of the contact a held change would take out of Loops: the one a removal
/// finds it by (the userId, identified by userId; else the email), or a re-key's old one.
fn removed_identity(spec: &SyncSpec, change: &RowChange) -> Option<String> {
    let email = change.confirmed_email.as_deref().map(normalize_email);
    match (change.kind, spec.identify_by) {
        (ChangeKind::Removed, IdentifyBy::UserId) => change.confirmed_user_id.clone().or(email),
        (ChangeKind::Removed, IdentifyBy::Email) => email,
        _ => change
            .rekey(spec)
            .and_then(|old| old.user_id.or(old.email.as_deref().map(normalize_email))),
    }
    .filter(|i| !i.is_empty())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use loopsync_core::envelope::VERSION;

    use super::*;
    use crate::decide::tests::spec;

    fn change(
        key: u32,
        kind: ChangeKind,
        email: Option<&str>,
        confirmed: Option<&str>,
    ) -> RowChange {
        RowChange {
            v: VERSION,
            sync: "s".into(),
            run_id: 1,
            key: key.to_string(),
            fingerprint: "f".into(),
            kind,
            values: BTreeMap::from([("email".to_owned(), email.map(str::to_owned))]),
            confirmed_email: confirmed.map(str::to_owned),
            confirmed_user_id: None,
            installation: String::new(),
            generation: 0,
            keep_old_contact: false,
            resubscribe: false,
            possibly_applied: Vec::new(),
        }
    }

    fn keys(changes: &[RowChange]) -> Vec<&str> {
        changes.iter().map(|c| c.key.as_str()).collect()
    }

    /// An upsert sync holds nothing, so it notes no email per write: a first sync's memory does
    /// not grow with its rows. A mirror sync notes a hash of each (normalized) email, and holds
    /// removals and re-keys.
    #[test]
    fn emails_are_noted_only_where_changes_are_held() {
        let upsert = spec(Behavior::Upsert);
        let mut held = Held::new(&upsert);
        for key in 0..1000 {
            let email = format!("U{key}@x.co");
            assert!(
                held.take(change(key, ChangeKind::Added, Some(&email), None))
                    .is_some()
            );
        }
        assert!(
            held.take(change(5, ChangeKind::Removed, None, Some("u5@x.co")))
                .is_some(),
            "upsert removes nothing: nothing held"
        );
        assert!(held.written.is_empty(), "{}", held.written.len());

        let mirror = spec(Behavior::Mirror);
        let mut held = Held::new(&mirror);
        for key in 0..1000 {
            let email = format!("U{key}@x.co");
            assert!(
                held.take(change(key, ChangeKind::Added, Some(&email), None))
                    .is_some()
            );
        }
        assert_eq!(held.written.len(), 1000);
        assert!(
            held.take(change(
                5,
                ChangeKind::Changed,
                Some("U5@x.co"),
                Some("old@x.co")
            ))
            .is_none(),
            "a re-key is held"
        );
        assert!(held.written.contains(&held.hasher.hash_one("u7@x.co")));
        assert!(!held.written.contains(&held.hasher.hash_one("old@x.co")));
    }

    /// Once the model is read: a removal whose email this run writes to another record, or
    /// that the state confirms for another key, is released (not weighed by the removal
    /// guard); the others are removals; a re-key whose old contact another record has keeps
    /// it. The record itself owning its email is no claim.
    #[test]
    fn a_removal_whose_contact_another_record_has_is_released() {
        let mirror = spec(Behavior::Mirror);
        let mut held = Held::new(&mirror);
        // Key 2 takes key 1's email in this run; key 3 leaves; key 4 leaves, its email confirmed
        // for key 9 in the state; key 5 re-keys away from an email key 9 confirmed too; key 6
        // leaves and the state's only owner of its email is itself.
        let taken = [
            change(2, ChangeKind::Changed, Some(" One@x.co"), Some("two@x.co")),
            change(1, ChangeKind::Removed, None, Some("one@x.co")),
            change(3, ChangeKind::Removed, None, Some("three@x.co")),
            change(4, ChangeKind::Removed, None, Some("FOUR@x.co")),
            change(
                5,
                ChangeKind::Changed,
                Some("five-new@x.co"),
                Some("nine@x.co"),
            ),
            change(6, ChangeKind::Removed, None, Some("six@x.co")),
            change(7, ChangeKind::Added, Some("seven@x.co"), None),
        ];
        let went: Vec<RowChange> = taken.into_iter().filter_map(|c| held.take(c)).collect();
        assert_eq!(keys(&went), ["7"], "only the plain write goes at once");
        assert_eq!(
            held.identities(),
            [
                "four@x.co",
                "nine@x.co",
                "one@x.co",
                "six@x.co",
                "three@x.co",
                "two@x.co"
            ]
        );
        let owners: Vec<Owner> = vec![
            ("9".into(), Some("four@x.co".into()), None),
            ("9".into(), Some("nine@x.co".into()), None),
            ("6".into(), Some("six@x.co".into()), None),
        ];
        let settled = held.settle(&owners);
        assert_eq!(keys(&settled.released), ["1", "4"]);
        assert_eq!(keys(&settled.removals), ["3", "6"]);
        let rekeys: Vec<(&str, bool)> = settled
            .changes
            .iter()
            .map(|c| (c.key.as_str(), c.keep_old_contact))
            .collect();
        assert_eq!(rekeys, [("2", false), ("5", true)]);
    }

    /// A write the transformer refuses (an invalid row: its seats are not a number) never
    /// reaches Loops, so the email it would take claims nothing: the removal of the record
    /// that had it is weighed, not released. A valid write taking an email still releases.
    #[test]
    fn a_write_the_transformer_refuses_claims_no_email() {
        let mut mirror = spec(Behavior::Mirror);
        mirror.properties.push(loopsync_core::spec::MappedProperty {
            property: "seats".into(),
            column: "seats".into(),
            kind: loopsync_core::value::PropertyKind::Number,
        });
        let mut held = Held::new(&mirror);
        let with_seats = |mut c: RowChange, seats: &str| {
            c.values.insert("seats".into(), Some(seats.into()));
            c
        };
        let invalid = with_seats(change(4, ChangeKind::Added, Some("one@x.co"), None), "many");
        assert!(transform(&mirror, &invalid).is_err());
        let valid = with_seats(change(5, ChangeKind::Added, Some("two@x.co"), None), "3");
        assert!(held.take(invalid).is_some());
        assert!(held.take(valid).is_some());
        assert!(
            held.take(change(1, ChangeKind::Removed, None, Some("one@x.co")))
                .is_none()
        );
        assert!(
            held.take(change(2, ChangeKind::Removed, None, Some("two@x.co")))
                .is_none()
        );
        let settled = held.settle(&[]);
        assert_eq!(keys(&settled.removals), ["1"]);
        assert_eq!(keys(&settled.released), ["2"]);
    }

    /// Identified by userId, a removal is released when another record has its userId.
    #[test]
    fn identified_by_user_id_the_user_id_is_the_claim() {
        let mut by_user_id = spec(Behavior::Mirror);
        by_user_id.identify_by = IdentifyBy::UserId;
        let mut held = Held::new(&by_user_id);
        let mut leaving = change(1, ChangeKind::Removed, None, Some("one@x.co"));
        leaving.confirmed_user_id = Some("u1".into());
        assert!(held.take(leaving).is_none());
        let settled = held.settle(&[("8".into(), Some("eight@x.co".into()), Some("u1".into()))]);
        assert_eq!(keys(&settled.released), ["1"]);
        assert!(settled.removals.is_empty());
    }

    /// A record leaves whose confirmed email another record has taken, after a re-key whose
    /// answer was lost (its new address may be in Loops): nothing removes the taken contact, but
    /// the one the lost re-key may have made is deleted, in doubt (a possibly created contact).
    /// A contact another record has among those stays. Under `on_remove = "unsubscribe"` the
    /// record is released as before.
    #[test]
    fn a_released_removal_still_takes_what_a_lost_version_left() {
        let mut unsubscribing = spec(Behavior::Mirror);
        unsubscribing.on_remove = OnRemove::Unsubscribe;
        let mirror = spec(Behavior::Mirror);
        let mut held = Held::new(&mirror);
        let mut leaving = change(1, ChangeKind::Removed, None, Some("taken@x.co"));
        leaving.possibly_applied = vec![
            OldContact {
                email: Some("Lost@x.co".into()),
                user_id: None,
            },
            OldContact {
                email: Some("other@x.co".into()),
                user_id: None,
            },
        ];
        assert!(held.take(leaving.clone()).is_none());
        let owners: Vec<Owner> = vec![
            ("2".into(), Some("taken@x.co".into()), None),
            ("3".into(), Some("other@x.co".into()), None),
        ];
        let settled = held.settle(&owners);
        assert!(settled.released.is_empty(), "{:?}", settled.released);
        assert_eq!(keys(&settled.removals), ["1"]);
        let removal = &settled.removals[0];
        assert_eq!(removal.confirmed_email.as_deref(), Some("Lost@x.co"));
        assert_eq!(removal.fingerprint, POSSIBLY_CREATED);
        assert!(removal.possibly_applied.is_empty(), "other@x.co is key 3's");

        let mut held = Held::new(&unsubscribing);
        assert!(held.take(leaving).is_none());
        let settled = held.settle(&owners);
        assert_eq!(keys(&settled.released), ["1"]);
        assert!(settled.removals.is_empty());
    }
}
