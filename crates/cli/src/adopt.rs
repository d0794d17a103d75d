//! `loopsync adopt`: records the model's current rows as already in Loops, without sending
//! anything — for a sync that takes over from another tool. The next run sends only what changes
//! after. (A million contacts re-sent at 10 requests per second would cost 28 hours.) The sync's
//! state is then bound to the Loops the config points at (`GET /v1/api-key`'s team at the base
//! URL): also the way forward for a sync pointed at another Loops that holds its contacts.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use futures::StreamExt;
use loopsync_bus::RateBudget;
use loopsync_core::envelope::{ChangeKind, RequestCounts};
use loopsync_core::value::normalize_email;
use loopsync_extractor::{Decision, KeyGroups, decide_group, tally};
use loopsync_warehouse::ExtractCounts;

use crate::pipeline::loops_client;
use crate::{destination, load_config_for, open_warehouse};

/// Records adopted per warehouse round trip.
const BATCH: usize = 1000;

#[derive(Debug, Args)]
pub struct AdoptArgs {
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    #[arg(long)]
    json: bool,
}

type Adopted = (String, String, Option<String>, Option<String>);

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
        let run_id = warehouse.create_run(&spec.name).await?;
        // Stopped by a signal, `main` closes the run as interrupted.
        crate::stop::watch_run(warehouse.clone(), run_id);
        warehouse.claim_run(run_id, false).await?;
        let requests = std::mem::take(&mut preflight);
        if !requests.is_empty() {
            warehouse.record_preflight(run_id, &requests).await?;
        }
        let mut counts = ExtractCounts::default();
        let mut invalid = 0;
        let mut batch: Vec<Adopted> = Vec::new();
        let mut rows = warehouse.diff(spec).await?;
        let mut groups = KeyGroups::default();
        let mut nulls = 0;
        let mut pending = Vec::new();
        loop {
            let done = match rows.next().await {
                Some(row) => {
                    pending.extend(groups.push(row?));
                    false
                }
                None => {
                    pending.extend(groups.finish());
                    true
                }
            };
            for group in pending.drain(..) {
                let decision = decide_group(spec, run_id, group, &mut nulls);
                match &decision {
                    Decision::Change(change) if change.kind != ChangeKind::Removed => {
                        // What the transformer refuses is not in Loops either: not adopted.
                        if loopsync_transformer::transform(spec, change).is_err() {
                            invalid += 1;
                            counts.invalid_rows += 1;
                            continue;
                        }
                        let text = |property: &str| {
                            spec.property(property)
                                .and_then(|p| change.values.get(&p.column).cloned().flatten())
                        };
                        batch.push((
                            change.key.clone(),
                            change.fingerprint.clone(),
                            text("email").map(|e| normalize_email(&e)),
                            text("userId").map(|u| u.trim().to_owned()),
                        ));
                    }
                    Decision::Invalid { rows, .. } => {
                        invalid += 1;
                        counts.invalid_rows += *rows as i64;
                        continue;
                    }
                    _ => {}
                }
                tally(&mut counts, &decision);
            }
            if batch.len() >= BATCH || (done && !batch.is_empty()) {
                warehouse.adopt(&spec.name, run_id, &batch).await?;
                batch.clear();
            }
            if done {
                break;
            }
        }
        warehouse.finish_adopt(run_id, &counts).await?;
        // Bound last: a sync whose adoption did not finish is still refused by the new
        // destination, so adopt is run again rather than a run sending a partial difference.
        let earlier = warehouse.destination(&spec.name).await?;
        warehouse.set_destination(&spec.name, &configured).await?;
        if !args.json {
            println!(
                "sync {} · run {run_id} · adopted {} records as already in Loops (new to the sync {}, changed {}); unchanged {}; invalid {invalid} (not adopted). Nothing was sent.",
                spec.name,
                counts.added + counts.changed,
                counts.added,
                counts.changed,
                counts.unchanged
            );
            match earlier {
                Some(e) if e.destination != configured => println!(
                    "sync {}: its state is bound to {configured} (it was bound to {}).",
                    spec.name, e.destination
                ),
                Some(_) => {}
                None => println!("sync {}: its state is bound to {configured}.", spec.name),
            }
        }
        if let Some(summary) = warehouse.run(run_id).await? {
            summaries.push(summary);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    }
    Ok(ExitCode::SUCCESS)
}
