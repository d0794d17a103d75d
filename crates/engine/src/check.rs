//! `loopsync check`: the config, the warehouse and every sync's model, the API key, the Loops
//! the config points at against the one each sync's state is bound to, and the custom
//! properties and mailing lists that the mappings need and Loops lacks ([`PropertyDiff`]).

use loopsync_config::Config;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::RequestCounts;
use loopsync_core::tuning::CHECK_ATTEMPTS;
use loopsync_warehouse::{DestinationBinding, Warehouse, WarehouseError};
use serde::Serialize;

use crate::EngineError;
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
            && self.bindings.iter().all(|b| b.matches != Some(false))
    }
}

/// Checks `config` and the services it names; with `create_properties`, creates the custom
/// properties Loops lacks, with their declared types. A failure to reach the warehouse or
/// Loops is in the report; an error returned is one met after Loops accepted the key.
pub async fn check(config: &Config, create_properties: bool) -> Result<CheckReport, EngineError> {
    let mut report = CheckReport::default();
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
            if let Err(e) = read_bindings(&*warehouse, config, &mut report.bindings).await {
                report.warehouse = Some(e.to_string());
            }
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
    let budget = loopsync_bus::RateBudget::local(config.loops.requests_per_second);
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
            for b in &mut report.bindings {
                b.matches = b.bound_to.as_ref().map(|t| t.destination == configured);
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

/// Each sync's destination binding, read only (no state yet: none is bound).
async fn read_bindings(
    warehouse: &dyn Warehouse,
    config: &Config,
    bindings: &mut Vec<SyncBinding>,
) -> Result<(), WarehouseError> {
    warehouse.read_only().await?;
    for sync in &config.syncs {
        bindings.push(SyncBinding {
            sync: sync.spec.name.clone(),
            bound_to: warehouse.destination(&sync.spec.name).await?,
            matches: None,
        });
    }
    Ok(())
}
