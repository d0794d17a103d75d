//! `loopsync adopt`: records the model's current rows as already in Loops, without sending
//! anything — for a sync that takes over from another tool. The next run sends only what changes
//! after. (A million contacts re-sent at 10 requests per second would cost 28 hours.) The sync's
//! state is then bound to the Loops the config points at (`GET /v1/api-key`'s team at the base
//! URL): also the way forward for a sync pointed at another Loops that holds its contacts.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_core::destination::Destination;
use loopsync_engine::adopt::{AdoptReport, adopt_all};

use crate::common::{load_config_for, open_warehouse};
use crate::escape::printable;

#[derive(Debug, Args)]
pub struct AdoptArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// Print the report as one JSON document on stdout (docs/json.md).
    #[arg(long)]
    json: bool,
}

pub async fn run(config_path: &Path, args: AdoptArgs) -> anyhow::Result<ExitCode> {
    let config = load_config_for(config_path, args.sync.as_deref())?;
    let warehouse = open_warehouse(&config).await?;
    let reports = adopt_all(
        &config,
        &warehouse,
        args.sync.as_deref(),
        // Stopped by a signal, `main` closes the run as interrupted.
        |run_id| crate::stop::watch_run(warehouse.clone(), run_id),
        |report, configured| {
            if !args.json {
                print_adopted(report, configured);
            }
        },
    )
    .await?;
    if args.json {
        let summaries: Vec<_> = reports.into_iter().filter_map(|r| r.summary).collect();
        crate::output::json("adopt", &summaries)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// What adopting one sync did, and the Loops its state is bound to now.
fn print_adopted(report: &AdoptReport, configured: &Destination) {
    let counts = &report.counts;
    crate::say!(
        "sync {} · run {} · adopted {} records as already in Loops (new to the sync {}, changed {}); unchanged {}; invalid {} (not adopted). Nothing was sent.",
        report.sync,
        report.run_id,
        counts.added + counts.changed + counts.ignored,
        counts.added,
        counts.changed + counts.ignored,
        counts.unchanged,
        report.invalid
    );
    match &report.earlier {
        Some(e) if e.destination != *configured => crate::say!(
            "sync {}: its state is bound to {} (it was bound to {}).",
            report.sync,
            printable(&configured.to_string()),
            printable(&e.destination.to_string())
        ),
        Some(_) => {}
        None => crate::say!(
            "sync {}: its state is bound to {}.",
            report.sync,
            printable(&configured.to_string())
        ),
    }
}
