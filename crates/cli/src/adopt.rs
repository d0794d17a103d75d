//! `loopsync adopt`: records the model's current rows as already in Loops, without sending
//! anything — for a sync that takes over from another tool. The next run sends only what changes
//! after. (A million contacts re-sent at 10 requests per second would cost 28 hours.) The sync's
//! state is then bound to the Loops the config points at (`GET /v1/api-key`'s team at the base
//! URL): also the way forward for a sync pointed at another Loops that holds its contacts.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_core::envelope::RequestCounts;
use loopsync_engine::RateBudget;
use loopsync_engine::adopt::adopt;

use loopsync_engine::destination;
use loopsync_engine::pipeline::loops_client;

use crate::{load_config_for, open_warehouse};

#[derive(Debug, Args)]
pub struct AdoptArgs {
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    #[arg(long)]
    json: bool,
}

pub async fn run(config_path: &Path, args: AdoptArgs) -> anyhow::Result<ExitCode> {
    let config = load_config_for(config_path, args.sync.as_deref())?;
    let warehouse = open_warehouse(&config).await?;
    // The model is recorded as confirmed by the Loops the config points at: ask which team the
    // key belongs to (the one request adopt makes, counted with the first adoption).
    let client = loops_client(&config)?;
    let budget = RateBudget::local(config.loops.requests_per_second);
    let mut preflight = RequestCounts::default();
    let configured =
        destination::configured(&client, &budget, config.loops.max_attempts, &mut preflight)
            .await?;
    let mut summaries = Vec::new();
    for sync in &config.syncs {
        let spec = &sync.spec;
        if args.sync.as_ref().is_some_and(|n| *n != spec.name) {
            continue;
        }
        let report = adopt(
            &*warehouse,
            spec,
            &configured,
            std::mem::take(&mut preflight),
            // Stopped by a signal, `main` closes the run as interrupted.
            |run_id| crate::stop::watch_run(warehouse.clone(), run_id),
        )
        .await?;
        let counts = &report.counts;
        if !args.json {
            println!(
                "sync {} · run {} · adopted {} records as already in Loops (new to the sync {}, changed {}); unchanged {}; invalid {} (not adopted). Nothing was sent.",
                spec.name,
                report.run_id,
                counts.added + counts.changed,
                counts.added,
                counts.changed,
                counts.unchanged,
                report.invalid
            );
            match report.earlier {
                Some(e) if e.destination != configured => println!(
                    "sync {}: its state is bound to {configured} (it was bound to {}).",
                    spec.name, e.destination
                ),
                Some(_) => {}
                None => println!("sync {}: its state is bound to {configured}.", spec.name),
            }
        }
        summaries.extend(report.summary);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    }
    Ok(ExitCode::SUCCESS)
}
