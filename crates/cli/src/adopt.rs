//! `loopsync adopt`: records the model's current rows as already in Loops, without sending
//! anything — for a sync that takes over from another tool. The next run sends only what changes
//! after. (A million contacts re-sent at 10 requests per second would cost 28 hours.) The sync's
//! state is then bound to the Loops the config points at (`GET /v1/api-key`'s team at the base
//! URL): also the way forward for a sync pointed at another Loops that holds its contacts.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_core::destination::Destination;
use loopsync_engine::adopt::{AdoptError, AdoptReport, adopt_all};
use loopsync_engine::bulk::audience::LoopsExport;

use crate::common::{UsageError, load_config_for, open_warehouse};
use crate::escape::printable;

#[derive(Debug, Args)]
pub struct AdoptArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// Loops' audience export (a CSV, after a `loopsync export` upload): adopt only the
    /// records whose contact in it is exactly what the sync would write; the next run sends
    /// the others.
    #[arg(long, value_name = "FILE")]
    from_loops_export: Option<std::path::PathBuf>,
    /// The folder `loopsync export` wrote the uploaded files to: the records they may have
    /// created that are not adopted (a row that left before the upload, or changed) are noted as
    /// possibly in Loops, so that the next run makes sure of them (under mirror, takes out what
    /// the upload made for a row that left).
    #[arg(long, value_name = "DIR", requires = "from_loops_export")]
    exported: Option<std::path::PathBuf>,
    /// Print the report as one JSON document on stdout (docs/json.md).
    #[arg(long)]
    json: bool,
}

pub async fn run(config_path: &Path, args: AdoptArgs) -> anyhow::Result<ExitCode> {
    let config = load_config_for(config_path, args.sync.as_deref())?;
    let warehouse = open_warehouse(&config).await?;
    let file = match &args.from_loops_export {
        Some(path) => Some(LoopsExport::open(path)?),
        None => None,
    };
    let reports = adopt_all(
        &config,
        &warehouse,
        args.sync.as_deref(),
        file.as_ref(),
        args.exported.as_deref(),
        // Stopped by a signal, `main` closes the run as interrupted.
        |run_id| crate::stop::watch_run(warehouse.clone(), run_id),
        |report, configured| {
            if !args.json {
                print_adopted(report, configured);
            }
        },
    )
    .await
    .map_err(|e| -> anyhow::Error {
        match e {
            // The engine's error itself, so that `main` finds a usage error or a refusal.
            AdoptError::Engine(e) => e.into(),
            AdoptError::Bulk(e) if e.is_usage() => UsageError(e.to_string()).into(),
            AdoptError::Bulk(e) => e.into(),
            AdoptError::Verify(e) => e.into(),
        }
    })?;
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
        (counts.added + counts.changed + counts.ignored)
            .saturating_sub(report.not_adopted.values().sum::<u64>() as i64),
        counts.added,
        counts.changed + counts.ignored,
        counts.unchanged,
        report.invalid
    );
    if !report.not_adopted.is_empty() {
        let reasons: Vec<String> = report
            .not_adopted
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        crate::say!(
            "sync {}: not adopted (Loops' export does not hold them as the sync would write them; the next run sends them): {}",
            report.sync,
            reasons.join(" · ")
        );
    }
    if report.uploaded_in_doubt > 0 {
        crate::say!(
            "sync {}: {} records of the upload's files not adopted (their row left or changed since the export, and Loops holds their upload): noted as possibly in Loops; the next run makes sure of them.",
            report.sync,
            report.uploaded_in_doubt
        );
    }
    if report.forgotten > 0 {
        crate::say!(
            "sync {}: {} records confirmed by the Loops it was bound to are not in the file as confirmed: forgotten, the next run sends them.",
            report.sync,
            report.forgotten
        );
    }
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
