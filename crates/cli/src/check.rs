//! `loopsync check`: the config, the warehouse and every sync's model, the API key, the Loops
//! the config points at against the one each sync's state is bound to, and the custom
//! properties and mailing lists that the mappings need and Loops lacks.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_config::Config;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::RequestCounts;
use loopsync_core::spec::default_property_kind;
use loopsync_core::value::PropertyKind;
use loopsync_warehouse::{DestinationBinding, Warehouse, WarehouseError};
use serde::Serialize;

use crate::load_config;
use crate::pipeline::{loops_client, with_retries};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Create the missing custom properties, with their declared types.
    #[arg(long)]
    create_properties: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    warehouse: Option<String>,
    /// Per sync: `null` when its model runs with every mapped column, else why not.
    models: Vec<(String, Option<String>)>,
    loops: Option<String>,
    team_name: Option<String>,
    /// `name: type` the mappings need and Loops lacks.
    missing_properties: Vec<String>,
    created_properties: Vec<String>,
    /// Properties Loops has with another type than the mapping declares.
    type_mismatches: Vec<String>,
    /// Mailing lists the mappings name and Loops lacks (lists cannot be created through the API).
    missing_lists: Vec<String>,
    /// The Loops the config points at: the API key's team at the base URL.
    destination: Option<Destination>,
    /// Per sync, the Loops its state is bound to.
    bindings: Vec<SyncBinding>,
}

#[derive(Debug, Serialize)]
struct SyncBinding {
    sync: String,
    /// `null`: none yet (its next run binds it to the configured destination).
    bound_to: Option<DestinationBinding>,
    /// Whether that is the configured destination (`null` when either is unknown): a run of a
    /// sync bound elsewhere is refused until `adopt` or `reset`.
    matches: Option<bool>,
}

impl Report {
    fn ok(&self) -> bool {
        self.warehouse.is_none()
            && self.models.iter().all(|(_, e)| e.is_none())
            && self.loops.is_none()
            && self.missing_properties.is_empty()
            && self.type_mismatches.is_empty()
            && self.missing_lists.is_empty()
            && self.bindings.iter().all(|b| b.matches != Some(false))
    }
}

pub async fn run(config_path: &Path, args: CheckArgs) -> anyhow::Result<ExitCode> {
    // A config error names the key and exits 2, before any connection or request.
    let config = load_config(config_path)?;
    let mut report = Report::default();
    match loopsync_warehouse::connect(&config.warehouse.url).await {
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
            if let Err(e) = read_bindings(&*warehouse, &config, &mut report.bindings).await {
                report.warehouse = Some(e.to_string());
            }
        }
    }
    let client = loops_client(&config)?;
    let budget = loopsync_loader::RateBudget::local(config.loops.requests_per_second);
    // `check` belongs to no run: its requests are counted nowhere.
    let mut uncounted = RequestCounts::default();
    let counts = &mut uncounted;
    match with_retries(&budget, config.loops.max_attempts, counts, || {
        client.test_api_key()
    })
    .await
    {
        Err(e) => report.loops = Some(e.to_string()),
        Ok(info) => {
            let configured = Destination::new(info.team_name.clone(), client.base_url());
            for b in &mut report.bindings {
                b.matches = b.bound_to.as_ref().map(|t| t.destination == configured);
            }
            report.destination = Some(configured);
            report.team_name = info.team_name;
            let existing = with_retries(&budget, config.loops.max_attempts, counts, || {
                client.list_properties(false)
            })
            .await?;
            let lists = with_retries(&budget, config.loops.max_attempts, counts, || {
                client.list_mailing_lists()
            })
            .await?;
            for sync in &config.syncs {
                for p in &sync.spec.properties {
                    if default_property_kind(&p.property).is_some() {
                        continue;
                    }
                    let wanted = format!("{}: {}", p.property, p.kind.as_str());
                    match existing.iter().find(|e| e.key == p.property) {
                        Some(e) if e.kind != p.kind => report.type_mismatches.push(format!(
                            "sync {}: mapping.{} is {}, but Loops has it as {}",
                            sync.spec.name,
                            p.property,
                            p.kind.as_str(),
                            e.kind.as_str()
                        )),
                        Some(_) => {}
                        None if !report.missing_properties.contains(&wanted) => {
                            report.missing_properties.push(wanted)
                        }
                        None => {}
                    }
                }
                for l in &sync.spec.lists {
                    if !lists.iter().any(|x| x.id == l.list_id)
                        && !report.missing_lists.contains(&l.list_id)
                    {
                        report.missing_lists.push(l.list_id.clone());
                    }
                }
            }
            if args.create_properties {
                for wanted in std::mem::take(&mut report.missing_properties) {
                    let (name, kind) = wanted.split_once(": ").expect("name: type");
                    let kind: PropertyKind = kind.parse().map_err(anyhow::Error::msg)?;
                    with_retries(&budget, config.loops.max_attempts, counts, || {
                        client.create_property(name, kind)
                    })
                    .await?;
                    report.created_properties.push(wanted);
                }
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&config_path.display().to_string(), &report);
    }
    Ok(ExitCode::from(if report.ok() {
        0
    } else {
        crate::EXIT_FAILED
    }))
}

/// Each sync's destination binding (the tables made if missing).
async fn read_bindings(
    warehouse: &dyn Warehouse,
    config: &Config,
    bindings: &mut Vec<SyncBinding>,
) -> Result<(), WarehouseError> {
    warehouse.prepare().await?;
    for sync in &config.syncs {
        bindings.push(SyncBinding {
            sync: sync.spec.name.clone(),
            bound_to: warehouse.destination(&sync.spec.name).await?,
            matches: None,
        });
    }
    Ok(())
}

fn line(ok: bool, text: &str) {
    println!("{} {text}", if ok { "ok  " } else { "FAIL" });
}

fn print_text(config: &str, r: &Report) {
    line(true, &format!("config {config}"));
    match &r.warehouse {
        None => line(true, "warehouse reachable"),
        Some(e) => line(false, &format!("warehouse: {e}")),
    }
    for (sync, error) in &r.models {
        match error {
            None => line(
                true,
                &format!("sync {sync}: the model runs and has every mapped column"),
            ),
            Some(e) => line(false, e),
        }
    }
    match &r.loops {
        None => line(
            true,
            &format!(
                "Loops API key valid (team {})",
                r.team_name.as_deref().unwrap_or("unnamed")
            ),
        ),
        Some(e) => line(false, &format!("Loops API key: {e}")),
    }
    if let Some(d) = &r.destination {
        line(true, &format!("destination: {d}"));
    }
    for b in &r.bindings {
        let sync = &b.sync;
        match (&b.bound_to, b.matches) {
            (None, _) => line(
                true,
                &format!("sync {sync}: state bound to no destination yet (its next run binds it)"),
            ),
            (Some(t), Some(true)) => line(
                true,
                &format!(
                    "sync {sync}: state bound to this destination (since {})",
                    t.bound_at
                ),
            ),
            (Some(t), None) => line(
                true,
                &format!(
                    "sync {sync}: state bound to {} (since {})",
                    t.destination, t.bound_at
                ),
            ),
            (Some(t), Some(false)) => line(
                false,
                &format!(
                    "sync {sync}: state bound to {} (since {}), not to this destination: runs \
                     refuse it until `loopsync adopt --sync {sync}` (it holds these contacts) or \
                     `loopsync reset --sync {sync}` (send every row again)",
                    t.destination, t.bound_at
                ),
            ),
        }
    }
    for p in &r.created_properties {
        line(true, &format!("created contact property {p}"));
    }
    for p in &r.missing_properties {
        line(
            false,
            &format!(
                "Loops lacks contact property {p} (loopsync check --create-properties creates it)"
            ),
        );
    }
    for m in &r.type_mismatches {
        line(false, m);
    }
    for l in &r.missing_lists {
        line(
            false,
            &format!("Loops has no mailing list {l} (create it in Loops' settings)"),
        );
    }
}
