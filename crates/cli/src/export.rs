//! `loopsync export`: the records a run would create or update, as CSV files for Loops'
//! uploader (one per set of mailing lists, split at `--max-rows`), and the steps that follow.
//! Sends nothing, writes nothing to the state: `loopsync_engine::bulk::export`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use loopsync_engine::bulk::export::{MAX_ROWS, by_lists, export, lists_in_words};

use crate::common::{UsageError, load_config_for_warehouse, open_warehouse_read_only};
use crate::escape::printable;

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// The sync to export.
    #[arg(long)]
    sync: String,
    /// The folder the files are written to (made if missing; files of the same names are
    /// replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Rows per file at most; a larger set of records is split into parts.
    #[arg(long, default_value_t = MAX_ROWS)]
    max_rows: usize,
}

pub async fn run(config_path: &Path, args: ExportArgs) -> anyhow::Result<ExitCode> {
    // Only the warehouse, as `plan`: nothing is sent.
    let config = load_config_for_warehouse(config_path, Some(&args.sync))?;
    let warehouse = open_warehouse_read_only(&config).await?;
    let spec = &config
        .sync(&args.sync)
        .ok_or_else(|| UsageError(format!("no sync named \"{}\" in the config", args.sync)))?
        .spec;
    let report = export(
        &*warehouse,
        spec,
        config.loops.requests_per_second,
        &args.out,
        args.max_rows,
    )
    .await
    .map_err(|e| -> anyhow::Error {
        if e.is_usage() {
            UsageError(e.to_string()).into()
        } else {
            e.into()
        }
    })?;
    crate::say!(
        "sync {} · {} records in {} file{} · {} invalid (in no file) · {} left for the API lane · nothing was sent",
        report.sync,
        report.rows,
        report.files.len(),
        if report.files.len() == 1 { "" } else { "s" },
        report.invalid.len(),
        report.for_api.len()
    );
    for left in &report.invalid {
        crate::say!(
            "  ! key {}: {}",
            printable(&left.key),
            printable(&left.reason)
        );
    }
    for left in &report.for_api {
        crate::say!(
            "  > key {}: left for the API lane: {}",
            printable(&left.key),
            printable(&left.reason)
        );
    }
    let at_rate = report.plan.seconds_at_rate_budget;
    crate::say!(
        "Through the API these {} requests would take {} at {}/s.",
        report.plan.requests,
        humantime::format_duration(std::time::Duration::from_secs(at_rate.ceil() as u64)),
        config.loops.requests_per_second
    );
    if report.files.is_empty() {
        crate::say!("No file to upload: `loopsync run` sends what is left.");
        return Ok(ExitCode::SUCCESS);
    }
    crate::say!("Next steps:");
    crate::say!(
        "  1. loopsync check --create-properties   (the files' custom columns must exist in Loops, with their types)"
    );
    let mut step = 2;
    for (lists, files) in by_lists(&report.files) {
        for file in files {
            crate::say!(
                "  {step}. In Loops: Audience → Import → Upload CSV: {} ({} rows). On the review page tick the mailing lists: {}; leave \"Trigger loops\" off.",
                printable(&args.out.join(&file.name).display().to_string()),
                file.rows,
                printable(&lists_in_words(&lists))
            );
            step += 1;
        }
    }
    crate::say!(
        "  {step}. When every upload has finished: Audience → Export, and save the CSV (say audience.csv)."
    );
    crate::say!(
        "  {}. loopsync adopt --sync {} --from-loops-export audience.csv --exported {}   (adopts exactly the records Loops holds as the sync would write them; {} in that folder lists what the upload may have created)",
        step + 1,
        report.sync,
        printable(&args.out.display().to_string()),
        printable(&report.records_file)
    );
    crate::say!(
        "  {}. loopsync run --once --sync {}   (sends, through the API, only what the upload missed)",
        step + 2,
        report.sync
    );
    Ok(ExitCode::SUCCESS)
}
