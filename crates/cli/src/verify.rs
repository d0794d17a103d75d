//! `loopsync verify`: reads confirmed contacts back from Loops (`GET /v1/contacts/find`, each
//! request through the team's rate budget) and reports where Loops drifted from what the state
//! says it confirmed; `--repair` makes the next run re-send the drifted records.
//!
//! What verify does is `loopsync_engine::verify`; this module parses the flags, calls it on a
//! connected pipeline, and prints the report.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_engine::bulk::audience::LoopsExport;
use loopsync_engine::bulk::verify_against;
use loopsync_engine::pipeline::Pipeline;
use loopsync_engine::verify::{Options, Report, verify_pipeline};

use crate::common::load_config_for;
use crate::escape::printable;
use crate::printer::PROGRESS_EVERY;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// Confirmed records to read back per sync: a number, or `all` (also `0`).
    #[arg(long, default_value = "100", value_parser = parse_sample)]
    sample: SampleSize,
    /// Picks another deterministic sample (records are ranked by a hash of seed, sync and key).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Forget the confirmed state of each drifted record, so the next run re-sends it.
    #[arg(long)]
    repair: bool,
    /// Only this record, by its primary key (repeat for more): read back whatever --sample
    /// says. Needs --sync when the config has several syncs. A key with no contact Loops
    /// confirmed is reported (exit 1).
    #[arg(long = "key", value_name = "KEY")]
    keys: Vec<String>,
    /// Compare with Loops' audience export (a CSV) instead of reading Loops: every confirmed
    /// record (--sample is ignored), no request to Loops.
    #[arg(long, value_name = "FILE")]
    from_loops_export: Option<std::path::PathBuf>,
    /// Print the report as one JSON document on stdout (docs/json.md).
    #[arg(long)]
    json: bool,
}

/// `--sample`: `None` is every record.
#[derive(Debug, Clone, Copy)]
struct SampleSize(Option<usize>);

fn parse_sample(text: &str) -> Result<SampleSize, String> {
    match text.trim() {
        "all" | "0" => Ok(SampleSize(None)),
        t => t
            .parse::<usize>()
            .map(|n| SampleSize(Some(n)))
            .map_err(|_| format!("`{t}` is neither a number of records nor `all`")),
    }
}

pub async fn run(config_path: &Path, args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let config = load_config_for(config_path, args.sync.as_deref())?;
    let sync = keyed_sync(&config, args.sync, &args.keys)?;
    if let Some(path) = &args.from_loops_export {
        let options = Options {
            sample: None,
            seed: args.seed,
            repair: args.repair,
            keys: args.keys,
        };
        let file = LoopsExport::open(path)?;
        let warehouse = crate::common::open_warehouse(&config).await?;
        let specs: Vec<_> = config.syncs.iter().map(|s| &s.spec).collect();
        let quiet = |_: &str, _: usize, _: usize| {};
        let report = verify_against(
            &*warehouse,
            &specs,
            sync.as_deref(),
            &options,
            &file,
            &quiet,
        )
        .await?;
        return finish(&report, args.json);
    }
    // The bus, the warehouse and the team's rate budget, as a run has them; no worker starts.
    let pipeline = Pipeline::connect(config, crate::stop::token()).await?;
    let client = pipeline.loops_client()?;
    let options = Options {
        sample: args.sample.0,
        seed: args.seed,
        repair: args.repair,
        keys: args.keys,
    };
    let rps = pipeline.config.loops.requests_per_second;
    let shown = Shown::new(rps);
    let progress = |sync: &str, done: usize, total: usize| shown.tell(sync, done, total);
    let result = verify_pipeline(&pipeline, &client, sync.as_deref(), &options, &progress).await;
    shown.finish();
    pipeline.stop().await;
    finish(&result?, args.json)
}

/// Prints the report; exit 1 when it is not clean.
fn finish(report: &Report, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        crate::output::json("verify", report)?;
    } else {
        print_text(report);
    }
    Ok(ExitCode::from(if report.is_clean() {
        0
    } else {
        crate::common::EXIT_FAILED
    }))
}

/// The sync to verify: `--sync`'s; with `--key` and no `--sync`, the config's only sync (keys
/// name records of one sync).
fn keyed_sync(
    config: &loopsync_config::Config,
    sync: Option<String>,
    keys: &[String],
) -> anyhow::Result<Option<String>> {
    if keys.is_empty() || sync.is_some() {
        return Ok(sync);
    }
    match config.syncs.as_slice() {
        [only] => Ok(Some(only.spec.name.clone())),
        syncs => Err(crate::common::UsageError(format!(
            "--key names records of one sync: add --sync NAME (the config has {} syncs)",
            syncs.len()
        ))
        .into()),
    }
}

/// How verify's progress is shown: a bar on an interactive terminal; else (a pipe, a log file,
/// `--log-format json`) a line every [`PROGRESS_EVERY`], and one when a sync's reads begin.
struct Shown {
    bar: Option<indicatif::ProgressBar>,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    requests_per_second: u32,
}

impl Shown {
    fn new(requests_per_second: u32) -> Shown {
        use std::io::IsTerminal;
        let bar = (std::io::stderr().is_terminal() && !crate::logs::is_json()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Shown {
            bar,
            last: std::sync::Mutex::new(None),
            requests_per_second,
        }
    }

    fn tell(&self, sync: &str, done: usize, total: usize) {
        let line = verify_progress(sync, done, total, self.requests_per_second);
        if let Some(bar) = &self.bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            bar.set_message(line);
            return;
        }
        let mut last = self.last.lock().expect("progress mutex");
        let due = done == 0 || last.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
        if due && done < total {
            *last = Some(std::time::Instant::now());
            let line = if crate::logs::is_json() {
                line
            } else {
                format!(
                    "{} {line}",
                    loopsync_core::time::utc_seconds(std::time::SystemTime::now())
                )
            };
            crate::logs::info(&line);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A progress line of verify: the contacts read back, and the time left at the rate budget
/// (one request per contact).
fn verify_progress(sync: &str, done: usize, total: usize, requests_per_second: u32) -> String {
    let left = total.saturating_sub(done);
    let seconds = left as f64 / f64::from(requests_per_second.max(1));
    format!(
        "verify {sync}: {done}/{total} contacts read back from Loops · {} left at {requests_per_second}/s",
        humantime::format_duration(std::time::Duration::from_secs(seconds.ceil() as u64))
    )
}

fn print_text(report: &Report) {
    for s in &report.syncs {
        let sample = match s.sample {
            None => "all".to_owned(),
            Some(n) => n.to_string(),
        };
        crate::say!(
            "sync {} · checked {} · drifted {} · skipped {}\n  of {} confirmed records, {} at their confirmed version · sample {sample}, seed {} · {} requests to Loops",
            s.sync,
            s.checked,
            s.drifted,
            s.skipped,
            s.confirmed,
            s.eligible,
            s.seed,
            s.requests
        );
        for d in &s.drifts {
            let who = match (&d.email, &d.user_id) {
                (Some(e), _) => format!(" ({e})"),
                (None, Some(u)) => format!(" (userId {u})"),
                (None, None) => String::new(),
            };
            crate::say!(
                "  key {}{}: {}",
                printable(&d.key),
                printable(&who),
                printable(&d.text)
            );
        }
        for key in &s.not_confirmed {
            crate::say!(
                "  key {}: no contact Loops confirmed for this sync: not verified",
                printable(key)
            );
        }
        for u in &s.unreadable {
            crate::say!(
                "  key {}: not read: {}",
                printable(&u.key),
                printable(&u.error)
            );
        }
        let k = &s.skipped_by_reason;
        if s.skipped > 0 {
            let reasons: Vec<String> = [
                (k.changed, "changed in the model (the next run sends them)"),
                (k.repaired, "repaired (the next run re-sends them)"),
                (k.removed, "gone from the model"),
                (k.parked, "parked"),
                (k.invalid, "invalid"),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, why)| format!("{n} {why}"))
            .collect();
            crate::say!("  skipped: {}", reasons.join(" · "));
        }
        if let Some(n) = s.repaired {
            if n > 0 {
                crate::say!(
                    "  repaired: forgot what Loops confirmed for {n} drifted record{}: the next run re-sends {}",
                    if n == 1 { "" } else { "s" },
                    if n == 1 { "it" } else { "them" }
                );
            } else if s.drifted > 0 {
                crate::say!("  repaired: nothing to forget (a run confirmed them again meanwhile)");
            }
        } else if s.drifted > 0 {
            crate::say!(
                "  (loopsync verify --repair makes the next run re-send the drifted records)"
            );
        }
        if let Some(note) = &s.note {
            crate::say!("  note: {}", printable(note));
        }
    }
    if report.syncs.is_empty() {
        crate::say!("no sync to verify");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_sizes() {
        assert_eq!(parse_sample("all").unwrap().0, None);
        assert_eq!(parse_sample("0").unwrap().0, None);
        assert_eq!(parse_sample("25").unwrap().0, Some(25));
        assert!(parse_sample("-1").is_err());
        assert!(parse_sample("some").is_err());
    }
}
