//! Which Loops a sync's state belongs to (`loopsync_core::destination`). A sync's state is what
//! one Loops confirmed; sent to another, a run would find every row "unchanged" and send
//! nothing. So before a run of a sync is requested (`run`, `dlq replay`; once per run, over NATS
//! too: by the process that requests it), the destination the config points at — the API key's
//! team (`GET /v1/api-key`) at the base URL — and the fingerprint of the API key
//! (`ApiKey::fingerprint`) are compared with the ones the sync's state is bound to
//! (`loopsync.destinations`), by [`verdict`]:
//!
//! * none recorded: the sync is bound to this one (state from before bindings existed is bound
//!   to the first destination it meets);
//! * the same Loops and key: the run goes on; the same Loops, bound before fingerprints were
//!   kept: the key is recorded, without a word;
//! * the same Loops (team name and URL) with another key: a key rotated on the team — or
//!   another team of the same name, or a Loops restarted empty. A few confirmed contacts are
//!   read back with the new key ([`read_back`]; those whose contact id the state knows first):
//!   all there, the state is kept and the new key recorded (told once, with a warning when no
//!   contact id could be compared: contacts found by email or userId alone, which another team
//!   built from the same data would pass too); any missing, refused as another Loops;
//! * another Loops: the sync is refused (exit 2) until `loopsync adopt` (the new destination
//!   already holds these contacts) or `loopsync reset` (forget the state, send everything again).

use std::fmt;

use loopsync_bus::RateBudget;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::RequestCounts;
use loopsync_core::secret::ApiKey;
use loopsync_core::spec::SyncSpec;
use loopsync_loops_client::{Contact, ContactIdentity, LoopsClient};
use loopsync_transformer::verify::{Confirmed, Lookup};
use loopsync_warehouse::{ConfirmedContact, DestinationBinding, StateStore, Warehouse};
use serde::Serialize;

use crate::EngineError;
use crate::retry::with_retries_for;

/// How many confirmed contacts are read back from Loops when the API key changed.
pub const READ_BACK: u32 = 5;

/// The destination the config points at: the team of the API key (`GET /v1/api-key`, paced by
/// `budget`, each request counted in `counts` as preflight) at the client's base URL.
pub async fn configured(
    client: &LoopsClient,
    budget: &RateBudget,
    attempts: u32,
    counts: &mut RequestCounts,
) -> Result<Destination, EngineError> {
    let info = with_retries_for(
        "asking Loops which team the API key belongs to (GET /v1/api-key)",
        budget,
        attempts,
        counts,
        || client.test_api_key(),
    )
    .await?;
    Ok(Destination::new(info.team_name, client.base_url()))
}

/// The fingerprint of `key` as this state's bindings keep it (salted by the state's
/// installation id).
pub async fn key_fingerprint(
    warehouse: &dyn StateStore,
    key: &ApiKey,
) -> Result<String, EngineError> {
    Ok(key.fingerprint(&warehouse.installation().await?))
}

/// What a sync's binding says of the configured Loops and API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The state belongs to this Loops, confirmed with this key.
    Same,
    /// The state belongs to this Loops, bound before key fingerprints were kept: the key is
    /// recorded, without a word (as a state from before bindings is bound).
    RecordKey,
    /// This Loops by name and URL, another key: the confirmed contacts are read back first.
    KeyChanged,
    /// Another Loops: refused.
    Elsewhere,
}

/// The one rule comparing a binding with the configured destination and key fingerprint.
pub fn verdict(
    bound: &DestinationBinding,
    configured: &Destination,
    key_fingerprint: &str,
) -> Verdict {
    if bound.destination != *configured {
        return Verdict::Elsewhere;
    }
    match bound.key_fingerprint.as_deref() {
        None => Verdict::RecordKey,
        Some(fp) if fp == key_fingerprint => Verdict::Same,
        Some(_) => Verdict::KeyChanged,
    }
}

/// What reading back a sync's confirmed contacts with the new key found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReadBack {
    /// Contacts read back (at most [`READ_BACK`]; none for a sync with no confirmed contact,
    /// or an event sync: Loops has no way to read an event back).
    pub checked: usize,
    /// Of them, those Loops does not have (not found, or found as another contact).
    pub missing: usize,
    /// Of them, those found with the contact id the state keeps: the proof that the key
    /// reaches the same team. The others were found by their email or userId alone, which
    /// another team holding the same people would pass too.
    pub by_id: usize,
}

impl ReadBack {
    /// The new key reaches the contacts the state says Loops confirmed (or there is nothing to
    /// read back): the state is kept. Found by email or userId alone ([`ReadBack::weak`]) is
    /// trusted too, with a warning: a rotated key must keep working for a sync whose contact
    /// ids are unknown (adopted), and refusing it would leave only `reset` or `adopt`.
    pub fn trusted(&self) -> bool {
        self.missing == 0
    }

    /// Contacts were read back and found, but none by a contact id: the same team is not
    /// proven, only likely.
    pub fn weak(&self) -> bool {
        self.checked > 0 && self.missing == 0 && self.by_id == 0
    }

    /// The line told once, when the state is kept for a new key.
    pub fn notice(&self, sync: &str) -> String {
        if self.checked == 0 {
            format!(
                "sync {sync}: the API key changed; the sync has no confirmed contact to read \
                 back from Loops, so its state is kept and bound to the new key"
            )
        } else if self.weak() {
            format!(
                "sync {sync}: the API key changed; {} confirmed contacts were found in Loops \
                 with it, so the state is kept and bound to the new key. warning: they were \
                 found by their email or userId alone (the state knows no Loops contact id for \
                 them: adopted, or confirmed before ids were kept), which another team holding \
                 the same people would pass too. If the new key belongs to another team, its \
                 contacts were not written by this sync: run `loopsync reset --sync {sync}` to \
                 send every row to it",
                self.checked
            )
        } else {
            format!(
                "sync {sync}: the API key changed; {} confirmed contacts were found in Loops \
                 with it ({} by their contact id), so the state is kept and bound to the new key",
                self.checked, self.by_id
            )
        }
    }
}

/// What a read-back found of one contact the state keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Not there, or there as another contact (another id).
    Missing,
    /// There, with the contact id the state keeps: the same team's contact.
    SameId,
    /// There, but no id to compare (the state knows none, or Loops gave none): found by its
    /// email or userId alone, which another team can hold too.
    IdentityOnly,
}

/// Whether `found` (Loops' answer to a find by the record's identity) is the contact Loops
/// confirmed for `kept`: there, and with the contact id the state keeps, when both know one
/// (another team of the same name can hold the same email, never the same contact).
pub fn same_contact(kept: &ConfirmedContact, found: Option<&Contact>) -> Found {
    match (found, &kept.contact_id) {
        (None, _) => Found::Missing,
        (Some(contact), Some(id)) if !contact.id.is_empty() => {
            if contact.id == *id {
                Found::SameId
            } else {
                Found::Missing
            }
        }
        (Some(_), _) => Found::IdentityOnly,
    }
}

/// Reads Loops with the configured key: the client, the team's rate budget (every request
/// paced like a run's), `loops.max_attempts`, and the counts its requests go to.
pub struct Reader<'a> {
    pub client: &'a LoopsClient,
    pub budget: &'a RateBudget,
    pub attempts: u32,
    pub counts: &'a mut RequestCounts,
}

/// Reads back up to [`READ_BACK`] of `spec`'s confirmed contacts (those whose contact id the
/// state knows first, then the most recently confirmed) with the configured key, each found by
/// the identity the sync finds contacts by.
pub async fn read_back(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    reader: &mut Reader<'_>,
) -> Result<ReadBack, EngineError> {
    let mut found = ReadBack::default();
    // An event sync's records are events: Loops has no way to read one back.
    if spec.is_append() {
        return Ok(found);
    }
    for kept in warehouse.confirmed_contacts(&spec.name, READ_BACK).await? {
        let confirmed = Confirmed {
            email: kept.email.clone(),
            user_id: kept.user_id.clone(),
            ..Confirmed::default()
        };
        let identity = match confirmed.lookup(spec.identify_by) {
            Some(Lookup::Email(e)) => ContactIdentity::Email(e),
            Some(Lookup::UserId(u)) => ContactIdentity::UserId(u),
            // No identity kept (a record adopted without one): nothing to read it by.
            None => continue,
        };
        let contact = with_retries_for(
            "reading back a confirmed contact with the new API key (GET /v1/contacts/find)",
            reader.budget,
            reader.attempts,
            reader.counts,
            || reader.client.find_contact(&identity),
        )
        .await?;
        found.checked += 1;
        match same_contact(&kept, contact.as_ref()) {
            Found::Missing => found.missing += 1,
            Found::SameId => found.by_id += 1,
            Found::IdentityOnly => {}
        }
    }
    Ok(found)
}

/// Whether `spec`'s state belongs to `configured` and the API key of `key_fingerprint` (see
/// [`verdict`]); binds it there if it is bound to none, records the key where it is missing or
/// where a read-back ([`read_back`], through `reader`) found the contacts. Returns the refusal
/// when it belongs elsewhere (nothing changed then). A new binding, and a state kept for a new
/// key, are told to `notice` (a line for the user: each happens once).
pub async fn check(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    configured: &Destination,
    key_fingerprint: &str,
    reader: &mut Reader<'_>,
    mut notice: impl FnMut(String),
) -> Result<Option<Refused>, EngineError> {
    let sync = spec.name.as_str();
    let Some(bound) = warehouse
        .bind_destination(sync, configured, key_fingerprint)
        .await?
    else {
        notice(format!(
            "sync {sync}: its state is bound to {configured} from now on"
        ));
        return Ok(None);
    };
    let refused = |why| Refused {
        sync: sync.to_owned(),
        bound: bound.clone(),
        configured: configured.clone(),
        why,
    };
    match verdict(&bound, configured, key_fingerprint) {
        Verdict::Same => Ok(None),
        Verdict::RecordKey => {
            warehouse
                .set_key_fingerprint(sync, configured, key_fingerprint)
                .await?;
            Ok(None)
        }
        Verdict::Elsewhere => Ok(Some(refused(Why::OtherLoops))),
        Verdict::KeyChanged => {
            let found = read_back(warehouse, spec, reader).await?;
            if !found.trusted() {
                return Ok(Some(refused(Why::KeyChanged(found))));
            }
            warehouse
                .set_key_fingerprint(sync, configured, key_fingerprint)
                .await?;
            notice(found.notice(sync));
            Ok(None)
        }
    }
}

/// Why a sync's state is taken to belong to another Loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// It is bound to another team, or another URL.
    OtherLoops,
    /// The same team name and URL, another API key, and contacts the state says Loops confirmed
    /// are not there with it: another team of the same name, or a Loops that lost them.
    KeyChanged(ReadBack),
}

/// A sync whose state belongs to another destination than the configured one: exit status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The sync refused.
    pub sync: String,
    /// Where its state belongs, since when.
    pub bound: DestinationBinding,
    /// Where the config points.
    pub configured: Destination,
    /// How it was found to be another Loops.
    pub why: Why,
}

impl std::error::Error for Refused {}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Refused {
            sync,
            bound,
            configured,
            why,
        } = self;
        let with_key = match why {
            Why::OtherLoops => "",
            Why::KeyChanged(_) => ", with another API key",
        };
        write!(
            f,
            "sync {sync}: its state belongs to another Loops, so nothing was sent.\n  \
             state confirmed against: {}{with_key} (since {})\n  \
             the config points at:    {configured}\n",
            bound.destination, bound.bound_at
        )?;
        if let Why::KeyChanged(found) = why {
            writeln!(
                f,
                "The API key changed, and {} of the {} contacts the state says Loops confirmed \
                 (the most recent) are not there with it: a team of the same name, but not the \
                 one the state was confirmed with (or a Loops that lost its contacts).",
                found.missing, found.checked
            )?;
        }
        let back = match why {
            Why::OtherLoops => format!(
                "point loops.base_url and loops.api_key back at {}",
                bound.destination.base_url
            ),
            Why::KeyChanged(_) => {
                "point loops.api_key back at the key the state was confirmed with".to_owned()
            }
        };
        write!(
            f,
            "To sync to the new destination, either\n  \
             loopsync adopt --sync {sync}   it already holds these contacts: record the model as confirmed there, sending nothing\n  \
             loopsync reset --sync {sync}   forget the sync's state: the next run sends every row to it\n\
             or {back}."
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(team: &str, url: &str, key: Option<&str>) -> DestinationBinding {
        DestinationBinding {
            destination: Destination::new(Some(team.into()), url),
            key_fingerprint: key.map(str::to_owned),
            bound_at: "2026-01-02T03:04:05.000Z".into(),
        }
    }

    #[test]
    fn a_refusal_names_both_destinations_and_the_ways_forward() {
        let refused = Refused {
            sync: "users".into(),
            bound: binding("Simulated Team", "http://127.0.0.1:4001/api", Some("k1")),
            configured: Destination::new(Some("Acme".into()), "https://app.loops.so/api/"),
            why: Why::OtherLoops,
        };
        let text = refused.to_string();
        for part in [
            "sync users: its state belongs to another Loops, so nothing was sent",
            "state confirmed against: team \"Simulated Team\" at http://127.0.0.1:4001/api (since 2026-01-02T03:04:05.000Z)",
            "the config points at:    team \"Acme\" at https://app.loops.so/api\n",
            "loopsync adopt --sync users",
            "loopsync reset --sync users",
            "back at http://127.0.0.1:4001/api.",
        ] {
            assert!(text.contains(part), "{part:?} in:\n{text}");
        }
        assert!(!text.contains("API key changed"), "{text}");
    }

    /// The refusal of a changed key says so, with what the read-back found, in the same words
    /// otherwise.
    #[test]
    fn a_refusal_for_a_changed_key_says_what_was_missing() {
        let sim = "http://127.0.0.1:4001/api";
        let refused = Refused {
            sync: "users".into(),
            bound: binding("Simulated Team", sim, Some("k1")),
            configured: Destination::new(Some("Simulated Team".into()), sim),
            why: Why::KeyChanged(ReadBack {
                checked: 5,
                missing: 5,
                by_id: 0,
            }),
        };
        let text = refused.to_string();
        for part in [
            "sync users: its state belongs to another Loops, so nothing was sent",
            "state confirmed against: team \"Simulated Team\" at http://127.0.0.1:4001/api, with another API key (since ",
            "the config points at:    team \"Simulated Team\" at http://127.0.0.1:4001/api\n",
            "The API key changed, and 5 of the 5 contacts the state says Loops confirmed",
            "loopsync adopt --sync users",
            "loopsync reset --sync users",
            "point loops.api_key back at the key the state was confirmed with.",
        ] {
            assert!(text.contains(part), "{part:?} in:\n{text}");
        }
    }

    /// Another URL or team is another Loops whatever the key; the same Loops compares keys,
    /// and a binding without a key takes the one configured.
    #[test]
    fn the_verdict_compares_the_loops_then_the_key() {
        let sim = "http://127.0.0.1:4001/api";
        let here = Destination::new(Some("Simulated Team".into()), sim);
        let cases = [
            (
                binding("Simulated Team", sim, Some("k1")),
                "k1",
                Verdict::Same,
            ),
            (
                binding("Simulated Team", &format!("{sim}/"), Some("k1")),
                "k1",
                Verdict::Same,
            ),
            (
                binding("Simulated Team", sim, None),
                "k1",
                Verdict::RecordKey,
            ),
            (
                binding("Simulated Team", sim, Some("k1")),
                "k2",
                Verdict::KeyChanged,
            ),
            (binding("Acme", sim, Some("k1")), "k1", Verdict::Elsewhere),
            (
                binding("Simulated Team", "http://127.0.0.1:4002/api", Some("k1")),
                "k1",
                Verdict::Elsewhere,
            ),
            (
                binding("Simulated Team", "http://127.0.0.1:4002/api", None),
                "k2",
                Verdict::Elsewhere,
            ),
        ];
        for (bound, key, expected) in cases {
            assert_eq!(
                verdict(&bound, &here, key),
                expected,
                "{bound:?} with {key}"
            );
        }
    }

    fn contact(id: &str) -> Contact {
        serde_json::from_value(serde_json::json!({"id": id, "email": "ann@example.com"})).unwrap()
    }

    /// A contact read back is the one confirmed when Loops has it, with the same id when both
    /// know one.
    #[test]
    fn a_contact_read_back_is_the_one_confirmed() {
        let kept = ConfirmedContact {
            key: "1".into(),
            email: Some("ann@example.com".into()),
            contact_id: Some("c1".into()),
            ..ConfirmedContact::default()
        };
        assert_eq!(same_contact(&kept, Some(&contact("c1"))), Found::SameId);
        assert_eq!(
            same_contact(&kept, Some(&contact("c9"))),
            Found::Missing,
            "another team's contact"
        );
        assert_eq!(same_contact(&kept, None), Found::Missing, "not there");
        assert_eq!(
            same_contact(&kept, Some(&contact(""))),
            Found::IdentityOnly,
            "Loops gave no id"
        );
        let no_id = ConfirmedContact {
            contact_id: None,
            ..kept
        };
        assert_eq!(
            same_contact(&no_id, Some(&contact("c9"))),
            Found::IdentityOnly,
            "nothing to compare the id with"
        );
    }

    /// All found, or nothing to read: the state is kept (and the user told which); one missing
    /// is a refusal. Found by email or userId alone is kept with a warning naming the risk.
    #[test]
    fn a_read_back_keeps_the_state_only_when_nothing_is_missing() {
        let all = ReadBack {
            checked: 5,
            missing: 0,
            by_id: 5,
        };
        assert!(all.trusted() && !all.weak());
        assert_eq!(
            all.notice("users"),
            "sync users: the API key changed; 5 confirmed contacts were found in Loops with it \
             (5 by their contact id), so the state is kept and bound to the new key"
        );
        let some = ReadBack { by_id: 1, ..all };
        assert!(some.trusted() && !some.weak(), "one id compared is proof");
        let none = ReadBack::default();
        assert!(none.trusted() && !none.weak());
        assert!(
            none.notice("users")
                .contains("no confirmed contact to read back")
        );
        let by_email = ReadBack { by_id: 0, ..all };
        assert!(by_email.trusted() && by_email.weak());
        let notice = by_email.notice("users");
        for part in [
            "5 confirmed contacts were found in Loops with it, so the state is kept",
            "warning: they were found by their email or userId alone",
            "another team holding the same people would pass too",
            "loopsync reset --sync users",
        ] {
            assert!(notice.contains(part), "{part:?} in {notice}");
        }
        assert!(
            !ReadBack {
                checked: 5,
                missing: 1,
                by_id: 4
            }
            .trusted()
        );
    }
}
