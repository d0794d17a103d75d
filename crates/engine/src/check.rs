//! `loopsync check`: the config, the warehouse and every sync's model, the API key, the Loops
//! the config points at against the one each sync's state is bound to, the custom properties
//! and mailing lists that the mappings need and Loops lacks ([`PropertyDiff`]), and syncs that
//! find contacts differently on the one team ([`IdentityConflict`]).

use loopsync_config::Config;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::{OutcomeStatus, RequestCounts};
use loopsync_core::spec::{IdentifyBy, SyncSpec};
use loopsync_core::tuning::CHECK_ATTEMPTS;
use loopsync_loops_client::names_two_contacts;
use loopsync_warehouse::{DestinationBinding, Warehouse, WarehouseError};
use serde::Serialize;

use crate::EngineError;
use crate::destination::{self, ReadBack, Verdict};
use crate::pipeline::loops_client;
use crate::properties::{self, PropertyDiff};
use crate::retry::with_retries;

/// What `check` found; each failure is kept in the report (the command goes on to check the
/// rest), its JSON form is `check --json`'s.
#[derive(Debug, Default, Serialize)]
pub struct CheckReport {
    /// `null` when the warehouse was reached, else why not.
    pub warehouse: Option<String>,
    /// `null` when the warehouse user may make and write the state, else what it lacks.
    pub privileges: Option<String>,
    /// Per sync: `null` when its model runs with every mapped column, else why not.
    pub models: Vec<(String, Option<String>)>,
    /// `null` without `[nats]`; else the server's version, or why it was not reached.
    pub nats: Option<Result<String, String>>,
    /// `null` when the API key was accepted, else Loops' answer.
    pub loops: Option<String>,
    /// The API key's team, when Loops names it.
    pub team_name: Option<String>,
    /// `name: type` the mappings need and Loops lacks.
    pub missing_properties: Vec<String>,
    /// `name: type` created (`--create-properties`).
    pub created_properties: Vec<String>,
    /// Properties Loops has with another type than the mapping declares.
    pub type_mismatches: Vec<String>,
    /// Mailing lists the mappings name and Loops lacks (lists cannot be created through the API).
    pub missing_lists: Vec<String>,
    /// The Loops the config points at: the API key's team at the base URL.
    pub destination: Option<Destination>,
    /// Per sync, the Loops its state is bound to.
    pub bindings: Vec<SyncBinding>,
    /// Syncs of this team that find contacts differently: they collide once an email changes
    /// (a warning: the config may work while no email changes).
    pub identity_conflict: Option<IdentityConflict>,
    /// Per sync with any, its records Loops refuses because their email and userId are two
    /// contacts (the state's rejections): the collision, happening.
    pub two_contacts: Vec<TwoContacts>,
}

/// Syncs of one Loops team (every sync of a config) that find contacts differently: some by
/// email alone, some by userId. When a person's email changes, a sync by email alone writes
/// the new address as a new contact (a re-key), and the next write of a sync by userId (that
/// userId, with the new email) matches two contacts: Loops refuses it, on every run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityConflict {
    /// Syncs identified by email whose writes carry no userId (their mapping has none).
    pub by_email: Vec<String>,
    /// Syncs identified by userId.
    pub by_user_id: Vec<String>,
}

impl IdentityConflict {
    /// The conflict among `syncs` (one team's), if any: a sync identified by userId beside one
    /// identified by email that maps no userId. A sync by email that maps userId too writes
    /// both identifiers, so Loops finds the contact by its userId when the email changes.
    pub fn among<'a>(syncs: impl IntoIterator<Item = &'a SyncSpec>) -> Option<IdentityConflict> {
        let (mut by_email, mut by_user_id) = (Vec::new(), Vec::new());
        for spec in syncs {
            match spec.identify_by {
                IdentifyBy::UserId => by_user_id.push(spec.name.clone()),
                IdentifyBy::Email if spec.property("userId").is_none() => {
                    by_email.push(spec.name.clone())
                }
                IdentifyBy::Email => {}
            }
        }
        (!by_email.is_empty() && !by_user_id.is_empty()).then_some(IdentityConflict {
            by_email,
            by_user_id,
        })
    }
}

/// A sync's records whose latest outcome is Loops' two-contacts refusal
/// (`loopsync_loops_client::names_two_contacts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TwoContacts {
    pub sync: String,
    pub records: usize,
}

/// One sync's destination binding, as `check` reports it.
#[derive(Debug, Serialize)]
pub struct SyncBinding {
    /// The sync.
    pub sync: String,
    /// `null`: none yet (its next run binds it to the configured destination).
    pub bound_to: Option<DestinationBinding>,
    /// Whether that is the configured destination (`null` when either is unknown): a run of a
    /// sync bound elsewhere is refused until `adopt` or `reset`.
    pub matches: Option<bool>,
    /// Bound to the configured destination: whether with the configured API key (`null` when
    /// unknown, or when the binding has no key yet: its next run records it).
    pub key_matches: Option<bool>,
    /// With another API key: what reading back its confirmed contacts with the configured key
    /// found (nothing is changed). Nothing missing: the next run keeps the state and records
    /// the new key; anything missing: runs refuse the sync as bound to another Loops.
    pub read_back: Option<ReadBack>,
}

impl SyncBinding {
    /// A run of the sync would be refused: bound to another Loops, or to this one with another
    /// key that does not reach the state's contacts.
    pub fn refused(&self) -> bool {
        self.matches == Some(false) || self.read_back.is_some_and(|r| !r.trusted())
    }
}

impl CheckReport {
    /// Everything checked passed: `check` exits 0.
    pub fn ok(&self) -> bool {
        self.warehouse.is_none()
            && self.privileges.is_none()
            && self.models.iter().all(|(_, e)| e.is_none())
            && self.loops.is_none()
            && !matches!(self.nats, Some(Err(_)))
            && self.missing_properties.is_empty()
            && self.type_mismatches.is_empty()
            && self.missing_lists.is_empty()
            && !self.bindings.iter().any(SyncBinding::refused)
            && self.two_contacts.is_empty()
    }
}

/// Checks `config` and the services it names; with `create_properties`, creates the custom
/// properties Loops lacks, with their declared types. A failure to reach the warehouse or
/// Loops is in the report; an error returned is one met after Loops accepted the key.
pub async fn check(config: &Config, create_properties: bool) -> Result<CheckReport, EngineError> {
    let mut report = CheckReport {
        identity_conflict: IdentityConflict::among(config.syncs.iter().map(|s| &s.spec)),
        ..CheckReport::default()
    };
    let (mut state, mut state_made) = (None, false);
    match loopsync_warehouse::open(&crate::settings::warehouse_settings(config)).await {
        // A URL that names no warehouse is the config's mistake: said as such (exit 2).
        Err(e @ WarehouseError::BadUrl(_)) => return Err(e.into()),
        Err(e) => report.warehouse = Some(e.to_string()),
        Ok(warehouse) => {
            for sync in &config.syncs {
                let error = warehouse
                    .check_model(&sync.spec)
                    .await
                    .err()
                    .map(|e| e.to_string());
                report.models.push((sync.spec.name.clone(), error));
            }
            if let Err(e) = warehouse.check_privileges().await {
                report.privileges = Some(e.to_string());
            }
            let read = match read_bindings(&*warehouse, config, &mut report.bindings).await {
                Ok(made) => {
                    state_made = made;
                    two_contacts(&*warehouse, config).await
                }
                Err(e) => Err(e),
            };
            match read {
                Ok(found) => report.two_contacts = found,
                Err(e) => report.warehouse = Some(e.to_string()),
            }
            state = Some(warehouse);
        }
    }
    if let (Some(nats), Some(options)) = (&config.nats, crate::settings::jetstream_options(config))
    {
        report.nats = Some(
            loopsync_bus::JetStreamBus::probe(&nats.url, &options)
                .await
                .map_err(|e| e.to_string()),
        );
    }
    let client = loops_client(config)?;
    // The team's budget, shared with a `run` or workers beside it: kept in the state (made,
    // and writable by this user) or in NATS (reached; its names need the state's id). Without
    // them no process can share it: a budget of this process alone.
    let shared = state_made && report.privileges.is_none() && !matches!(report.nats, Some(Err(_)));
    let budget = match &state {
        Some(warehouse) if shared => crate::budget::connect(config, warehouse).await.ok(),
        _ => None,
    }
    .unwrap_or_else(|| loopsync_bus::RateBudget::local(config.loops.requests_per_second));
    // `check` belongs to no run: its requests are counted nowhere.
    let mut uncounted = RequestCounts::default();
    let counts = &mut uncounted;
    // A diagnosis: a Loops that cannot be reached is said after a few seconds, not after as
    // many attempts as a run makes.
    let attempts = config.loops.max_attempts.min(CHECK_ATTEMPTS);
    match with_retries(&budget, attempts, counts, || client.test_api_key()).await {
        Err(e) => report.loops = Some(e.to_string()),
        Ok(info) => {
            let configured = Destination::new(info.team_name.clone(), client.base_url());
            let attempts = config.loops.max_attempts;
            for b in &mut report.bindings {
                b.matches = b.bound_to.as_ref().map(|t| t.destination == configured);
            }
            if let Some(warehouse) = &state
                && report.bindings.iter().any(|b| b.matches == Some(true))
            {
                let mut reader = destination::Reader {
                    client: &client,
                    budget: &budget,
                    attempts,
                    counts,
                };
                compare_keys(&**warehouse, config, &configured, &mut reader, &mut report).await?;
            }
            report.destination = Some(configured);
            report.team_name = info.team_name;
            let existing = properties::list(&client, &budget, attempts, counts).await?;
            let lists =
                with_retries(&budget, attempts, counts, || client.list_mailing_lists()).await?;
            let diff = PropertyDiff::between(config.syncs.iter().map(|s| &s.spec), &existing);
            report.type_mismatches = diff.mismatched.iter().map(ToString::to_string).collect();
            for sync in &config.syncs {
                for l in &sync.spec.lists {
                    if !lists.iter().any(|x| x.id == l.list_id)
                        && !report.missing_lists.contains(&l.list_id)
                    {
                        report.missing_lists.push(l.list_id.clone());
                    }
                }
            }
            if create_properties {
                for missing in &diff.missing {
                    properties::create(&client, &budget, attempts, counts, missing).await?;
                    report.created_properties.push(missing.to_string());
                }
            } else {
                report.missing_properties = diff.missing.iter().map(ToString::to_string).collect();
            }
        }
    }
    Ok(report)
}

/// For each sync bound to `configured`: whether with the configured API key, and with another,
/// what reading back its confirmed contacts finds ([`destination::verdict`], the rule a run
/// follows; nothing is recorded).
async fn compare_keys(
    warehouse: &dyn Warehouse,
    config: &Config,
    configured: &Destination,
    reader: &mut destination::Reader<'_>,
    report: &mut CheckReport,
) -> Result<(), EngineError> {
    let key_fingerprint = destination::key_fingerprint(warehouse, &config.loops.api_key).await?;
    for b in &mut report.bindings {
        let (Some(bound), Some(sync)) = (&b.bound_to, config.sync(&b.sync)) else {
            continue;
        };
        match destination::verdict(bound, configured, &key_fingerprint) {
            Verdict::Same => b.key_matches = Some(true),
            Verdict::RecordKey | Verdict::Elsewhere => {}
            Verdict::KeyChanged => {
                b.key_matches = Some(false);
                b.read_back = Some(destination::read_back(warehouse, &sync.spec, reader).await?);
            }
        }
    }
    Ok(())
}

/// Per sync, its records whose latest outcome is Loops' two-contacts refusal (read only).
async fn two_contacts(
    warehouse: &dyn Warehouse,
    config: &Config,
) -> Result<Vec<TwoContacts>, WarehouseError> {
    let mut found = Vec::new();
    for sync in &config.syncs {
        let records = warehouse
            .rejections(Some(&sync.spec.name))
            .await?
            .iter()
            .filter(|r| {
                r.outcome == OutcomeStatus::Rejected
                    && r.reason.as_deref().is_some_and(names_two_contacts)
            })
            .count();
        if records > 0 {
            found.push(TwoContacts {
                sync: sync.spec.name.clone(),
                records,
            });
        }
    }
    Ok(found)
}

/// Each sync's destination binding, read only (no state yet: none is bound).
async fn read_bindings(
    warehouse: &dyn Warehouse,
    config: &Config,
    bindings: &mut Vec<SyncBinding>,
) -> Result<bool, WarehouseError> {
    let made = warehouse.read_only().await?;
    for sync in &config.syncs {
        bindings.push(SyncBinding {
            sync: sync.spec.name.clone(),
            bound_to: warehouse.destination(&sync.spec.name).await?,
            matches: None,
            key_matches: None,
            read_back: None,
        });
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use loopsync_core::spec::IdentifyBy;

    use super::*;

    fn sync(name: &str, identify_by: IdentifyBy, maps_user_id: bool) -> SyncSpec {
        let mut spec = crate::testing::spec();
        spec.name = name.into();
        spec.identify_by = identify_by;
        if !maps_user_id {
            spec.properties.retain(|p| p.property != "userId");
        }
        spec
    }

    /// A sync by userId beside one by email alone is a conflict; syncs found the same way, or
    /// a sync by email whose writes carry the userId too, are not.
    #[test]
    fn syncs_that_find_contacts_differently_conflict() {
        let by_email = sync("users", IdentifyBy::Email, false);
        let by_email_with_id = sync("leads", IdentifyBy::Email, true);
        let by_id = sync("billing", IdentifyBy::UserId, true);
        let other_by_id = sync("plans", IdentifyBy::UserId, true);
        assert_eq!(
            IdentityConflict::among([&by_email, &by_id, &by_email_with_id, &other_by_id]),
            Some(IdentityConflict {
                by_email: vec!["users".into()],
                by_user_id: vec!["billing".into(), "plans".into()],
            })
        );
        assert_eq!(IdentityConflict::among([&by_id, &other_by_id]), None);
        assert_eq!(
            IdentityConflict::among([&by_email, &by_email_with_id]),
            None
        );
        assert_eq!(IdentityConflict::among([&by_email_with_id, &by_id]), None);
        assert_eq!(IdentityConflict::among([&by_email]), None);
    }
}
