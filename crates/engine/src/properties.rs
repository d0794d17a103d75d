//! The contact properties the syncs' mappings need against those Loops has (`loops-api.md` §9:
//! the client creates missing properties before the first send, as Hightouch does). One pure
//! comparison, [`PropertyDiff`], serves `loopsync check` (its report) and the run's
//! [`Preflight`] (which creates the missing ones before the run that needs them).

use std::fmt;

use loopsync_bus::RateBudget;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::RequestCounts;
use loopsync_core::spec::{SyncSpec, default_property_kind};
use loopsync_core::value::PropertyKind;
use loopsync_loops_client::{ContactProperty, LoopsClient, MailingList};

use crate::EngineError;
use crate::retry::with_retries_for;

/// A custom property a mapping needs and Loops lacks, with the type the mapping declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingProperty {
    /// The property's key.
    pub name: String,
    /// The type the mapping declares: the one it is created with.
    pub kind: PropertyKind,
}

impl fmt::Display for MissingProperty {
    /// `name: type`, as `check` lists it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.kind.as_str())
    }
}

/// A property Loops has with another type than a sync's mapping declares: its values would be
/// refused or mistaken, so `check` fails on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMismatch {
    /// The sync whose mapping declares it.
    pub sync: String,
    /// The property's key.
    pub property: String,
    /// The type the mapping declares.
    pub declared: PropertyKind,
    /// The type Loops lists.
    pub listed: PropertyKind,
}

impl fmt::Display for TypeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sync {}: mapping.{} is {}, but Loops has it as {}",
            self.sync,
            self.property,
            self.declared.as_str(),
            self.listed.as_str()
        )
    }
}

/// What the syncs' mappings need of Loops' contact properties and Loops lacks. Loops' default
/// properties (`email`, `firstName`, …) are never missing: every team has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyDiff {
    /// In the order the syncs map them; each `name: type` once.
    pub missing: Vec<MissingProperty>,
    /// Properties Loops has with another type than a mapping declares.
    pub mismatched: Vec<TypeMismatch>,
}

impl PropertyDiff {
    /// Compares the custom properties `syncs` map with those Loops `listed`.
    pub fn between<'a>(
        syncs: impl IntoIterator<Item = &'a SyncSpec>,
        listed: &[ContactProperty],
    ) -> PropertyDiff {
        let mut diff = PropertyDiff::default();
        for sync in syncs {
            for p in &sync.properties {
                if default_property_kind(&p.property).is_some() {
                    continue;
                }
                match listed.iter().find(|e| e.key == p.property) {
                    Some(e) if e.kind != p.kind => diff.mismatched.push(TypeMismatch {
                        sync: sync.name.clone(),
                        property: p.property.clone(),
                        declared: p.kind,
                        listed: e.kind,
                    }),
                    Some(_) => {}
                    None => {
                        let missing = MissingProperty {
                            name: p.property.clone(),
                            kind: p.kind,
                        };
                        if !diff.missing.contains(&missing) {
                            diff.missing.push(missing);
                        }
                    }
                }
            }
        }
        diff
    }
}

/// Creates `missing` in Loops with its declared type (paced, retried, counted in `counts`).
///
/// A creation whose answer was lost (a 5xx or a dropped connection after Loops made the
/// property) is refused when tried again: the name is taken. So when the creation fails, the
/// team's properties are listed once more, and a property of that name and type counts as
/// created.
pub async fn create(
    client: &LoopsClient,
    budget: &RateBudget,
    attempts: u32,
    counts: &mut RequestCounts,
    missing: &MissingProperty,
) -> Result<(), EngineError> {
    let kind = missing.kind;
    let created = with_retries_for(
        &format!("creating the contact property {}", missing.name),
        budget,
        attempts,
        counts,
        || client.create_property(&missing.name, kind),
    )
    .await;
    let Err(error) = created else {
        return Ok(());
    };
    match list(client, budget, attempts, counts).await {
        Ok(listed)
            if listed
                .iter()
                .any(|p| p.key == missing.name && p.kind == kind) =>
        {
            tracing::info!(property = %missing.name, "the contact property exists: an earlier attempt made it");
            Ok(())
        }
        _ => Err(error),
    }
}

/// What `loopsync run` asks and makes before it sends, with its requests counted for the runs
/// they serve: which Loops the config points at (`GET /v1/api-key`: the team, compared with
/// each sync's destination binding before its run is requested), and the property check
/// (`loops-api.md` §9: the client creates missing properties before the first send, as
/// Hightouch does).
///
/// The API key's team is asked once per invocation, at the start. The team's properties are
/// listed once per invocation, before the first run requested; each custom property a sync's
/// mapping needs and Loops lacks is created, with its declared type, just before the first run
/// of a sync that needs it. [`Preflight::take`] hands the requests made since the last call to
/// the run about to be requested: the team and the list go with the first run of the
/// invocation, a creation with the run of the first sync that needed it.
pub struct Preflight {
    destination: Destination,
    /// `loops.max_attempts`.
    attempts: u32,
    /// Listed before the first run that needs it.
    existing: Option<Vec<ContactProperty>>,
    /// The team's mailing lists, listed before the first run of a sync that maps one.
    lists: Option<Vec<MailingList>>,
    created: Vec<String>,
    pending: RequestCounts,
}

impl Preflight {
    /// Asks which team the API key belongs to (`GET /v1/api-key`): the destination.
    pub async fn start(
        client: &LoopsClient,
        budget: &RateBudget,
        attempts: u32,
    ) -> Result<Preflight, EngineError> {
        let mut pending = RequestCounts::default();
        let destination =
            crate::destination::configured(client, budget, attempts, &mut pending).await?;
        Ok(Preflight {
            attempts,
            destination,
            existing: None,
            lists: None,
            created: Vec::new(),
            pending,
        })
    }

    /// The Loops the config points at: the API key's team at the base URL.
    pub fn destination(&self) -> &Destination {
        &self.destination
    }

    /// [`Preflight::destination`], and the counts the next run's preflight requests go to
    /// (reading back contacts when the API key changed).
    pub fn destination_and_counts(&mut self) -> (&Destination, &mut RequestCounts) {
        (&self.destination, &mut self.pending)
    }

    /// Checks what `sync` needs of Loops and would otherwise fail record by record: each
    /// mailing list its mapping names must exist (`GET /v1/lists`: lists cannot be made
    /// through the API), and each property Loops has must have the type the mapping declares.
    /// Either problem is [`EngineError::Unsendable`], before anything is sent; the lists and
    /// properties are then listed again before the next run (a scheduler sees the fix).
    /// Then creates the custom properties `sync` maps that Loops lacks; returns their names.
    /// The first call lists the team's contact properties (`GET /v1/contacts/properties`).
    pub async fn ensure(
        &mut self,
        sync: &SyncSpec,
        client: &LoopsClient,
        budget: &RateBudget,
    ) -> Result<Vec<String>, EngineError> {
        if self.existing.is_none() {
            let listed = list(client, budget, self.attempts, &mut self.pending).await?;
            self.existing = Some(listed);
        }
        if !sync.lists.is_empty() && self.lists.is_none() {
            let listed = with_retries_for(
                "listing the mailing lists of the Loops team",
                budget,
                self.attempts,
                &mut self.pending,
                || client.list_mailing_lists(),
            )
            .await?;
            self.lists = Some(listed);
        }
        let existing = self.existing.as_deref().unwrap_or_default();
        let diff = PropertyDiff::between([sync], existing);
        let problems = unsendable(sync, &diff, self.lists.as_deref().unwrap_or_default());
        if !problems.is_empty() {
            self.existing = None;
            self.lists = None;
            return Err(EngineError::Unsendable {
                sync: sync.name.clone(),
                problems,
            });
        }
        let mut created = Vec::new();
        for missing in diff.missing {
            if self.created.contains(&missing.name) {
                continue;
            }
            create(client, budget, self.attempts, &mut self.pending, &missing).await?;
            self.created.push(missing.name.clone());
            created.push(missing.name);
        }
        Ok(created)
    }

    /// The requests made since the last call, for the run about to be requested.
    pub fn take(&mut self) -> RequestCounts {
        std::mem::take(&mut self.pending)
    }
}

/// What makes every record of `sync` fail at Loops, one line each: a property Loops types
/// otherwise (`diff.mismatched`) and a mailing list that Loops lacks among `lists`.
pub fn unsendable(sync: &SyncSpec, diff: &PropertyDiff, lists: &[MailingList]) -> Vec<String> {
    let mut problems: Vec<String> = diff
        .mismatched
        .iter()
        .map(|m| {
            format!(
                "mapping.{} is declared {}, but Loops has the property as {} (change the \
                 mapping's type, or the property in Loops)",
                m.property,
                m.declared.as_str(),
                m.listed.as_str()
            )
        })
        .collect();
    for l in &sync.lists {
        if !lists.iter().any(|x| x.id == l.list_id) {
            problems.push(format!(
                "mailing_lists.\"{}\": Loops has no mailing list with this id (lists are made \
                 in Loops' settings; `loopsync check` lists the ids it has)",
                l.list_id
            ));
        }
    }
    problems
}

/// The team's contact properties (paced, retried, counted in `counts`).
pub async fn list(
    client: &LoopsClient,
    budget: &RateBudget,
    attempts: u32,
    counts: &mut RequestCounts,
) -> Result<Vec<ContactProperty>, EngineError> {
    with_retries_for(
        "listing the contact properties of the Loops team",
        budget,
        attempts,
        counts,
        || client.list_properties(false),
    )
    .await
}
#[cfg(test)]
mod tests {
    use loopsync_core::spec::{Behavior, IdentifyBy, MappedProperty, OnRemove};
    use loopsync_core::value::PropertyKind;
    use loopsync_loops_client::{ApiKey, ClientConfig};
    use loopsync_simulator::{Faults, SimConfig};

    use super::*;

    fn spec(name: &str, properties: &[(&str, PropertyKind)]) -> SyncSpec {
        SyncSpec {
            name: name.into(),
            model: "select 1".into(),
            primary_key: "id".into(),
            identify_by: IdentifyBy::Email,
            behavior: Behavior::Upsert,
            on_remove: OnRemove::Delete,
            trigger_workflows: false,
            event_on_create: "c".into(),
            event_on_update: "u".into(),
            properties: properties
                .iter()
                .map(|(p, kind)| MappedProperty {
                    property: (*p).into(),
                    column: p.to_lowercase(),
                    kind: *kind,
                })
                .collect(),
            lists: vec![],
            max_removal_share: loopsync_core::spec::DEFAULT_MAX_REMOVAL_SHARE,
            append: None,
            incremental: None,
        }
    }

    /// The preflight's requests, counted and handed to the runs they serve: the API key's
    /// team, the list and the first sync's creations to its run, the second sync's new creation to its own; retries
    /// and 429s counted too, and the total is what the simulator saw.
    #[tokio::test]
    async fn preflight_requests_go_with_the_runs_they_serve() {
        let sim = loopsync_simulator::spawn(SimConfig::default())
            .await
            .unwrap();
        let client = LoopsClient::new(ClientConfig::new(
            sim.base_url(),
            ApiKey::new("test-key").unwrap(),
        ))
        .unwrap();
        let budget = RateBudget::local(1000);
        // The dice (seeded) answer the list 429 before letting it through.
        sim.set_faults(Faults {
            rate_limit_429: 0.6,
            seed: Some(4),
            endpoints: vec!["GET /v1/contacts/properties".into()],
            ..Faults::default()
        })
        .unwrap();
        let mut preflight = Preflight::start(&client, &budget, 5).await.unwrap();
        assert_eq!(
            preflight.destination(),
            &Destination::new(Some("Simulated Team".into()), &sim.base_url())
        );
        let users = spec(
            "users",
            &[
                ("email", PropertyKind::String),
                ("planName", PropertyKind::String),
                ("seats", PropertyKind::Number),
            ],
        );
        let teams = spec(
            "teams",
            &[
                ("seats", PropertyKind::Number),
                ("region", PropertyKind::String),
            ],
        );
        let created = preflight.ensure(&users, &client, &budget).await.unwrap();
        assert_eq!(created, ["planName", "seats"]);
        let first = preflight.take();
        assert!(first.rate_limited > 0, "{first:?}");
        assert_eq!(
            first.preflight,
            1 + first.rate_limited + 1 + 2,
            "the API key's team, the list (each 429 tried again), two creations"
        );
        assert_eq!(first.retries, first.rate_limited);
        let created = preflight.ensure(&teams, &client, &budget).await.unwrap();
        assert_eq!(created, ["region"], "seats exists now");
        let second = preflight.take();
        assert_eq!(
            second,
            RequestCounts {
                preflight: 1,
                ..RequestCounts::default()
            }
        );
        assert_eq!(preflight.take(), RequestCounts::default());
        let stats = sim.stats();
        assert_eq!(
            stats.total_requests,
            u64::from(first.total() + second.total())
        );
        assert_eq!(stats.rate_limited, u64::from(first.rate_limited));
    }

    fn listed(properties: &[(&str, PropertyKind)]) -> Vec<ContactProperty> {
        properties
            .iter()
            .map(|(key, kind)| ContactProperty {
                key: (*key).into(),
                label: (*key).into(),
                kind: *kind,
            })
            .collect()
    }

    /// The diff names each custom property the mappings need and Loops lacks once, with its
    /// declared type, in mapping order; default properties are never missing; a property
    /// Loops has with another type is a mismatch, named with its sync.
    #[test]
    fn the_diff_lists_what_loops_lacks_and_what_it_types_otherwise() {
        let users = spec(
            "users",
            &[
                ("email", PropertyKind::String),
                ("firstName", PropertyKind::String),
                ("planName", PropertyKind::String),
                ("seats", PropertyKind::Number),
                ("trial", PropertyKind::Boolean),
            ],
        );
        let teams = spec(
            "teams",
            &[
                ("seats", PropertyKind::Number),
                ("region", PropertyKind::String),
            ],
        );
        let existing = listed(&[
            ("planName", PropertyKind::String),
            ("trial", PropertyKind::String),
        ]);
        let diff = PropertyDiff::between([&users, &teams], &existing);
        let missing: Vec<String> = diff.missing.iter().map(ToString::to_string).collect();
        assert_eq!(missing, ["seats: number", "region: string"]);
        assert_eq!(
            diff.mismatched
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["sync users: mapping.trial is boolean, but Loops has it as string"]
        );
        let everything = listed(&[
            ("planName", PropertyKind::String),
            ("seats", PropertyKind::Number),
            ("trial", PropertyKind::Boolean),
            ("region", PropertyKind::String),
        ]);
        assert_eq!(
            PropertyDiff::between([&users, &teams], &everything),
            PropertyDiff::default()
        );
    }
}
