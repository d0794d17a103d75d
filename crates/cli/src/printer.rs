//! Printing what the engine tells of runs as they go and end, shared by the commands that run
//! syncs (`run`, `dlq replay`, `demo`).

use std::sync::Arc;
use std::time::Duration;

use loopsync_engine::EngineError;
use loopsync_engine::destination::Refused;
use loopsync_engine::runs::{RunObserver, SyncRun};
use loopsync_engine::state::{RunSummary, Warehouse};

use crate::escape::printable;
use crate::report;
use crate::stop::{self, Stopped};

/// How often a progress line is printed while a run is waited for.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Prints what the engine tells of the runs, and watches the run waited for (closed as
/// interrupted if a signal stops the process first).
pub(crate) struct Printer {
    warehouse: Arc<dyn Warehouse>,
    /// Each report as one line of JSON as the run ends (`--json` without `--once`).
    json_lines: bool,
    /// No report as the run ends (`--once --json`: all of them at the end).
    quiet: bool,
    /// A timestamped line before each report (following the schedules).
    pub(crate) timestamped: bool,
    /// The run waited for, as a bar: on an interactive terminal, without `--json`.
    bar: Option<indicatif::ProgressBar>,
    /// `loops.requests_per_second`: the time left at the budget.
    requests_per_second: u32,
    /// The config's syncs: a report says what the sync's behaviour did (a re-key's old
    /// contact).
    pub(crate) specs: Vec<loopsync_core::spec::SyncSpec>,
}

/// The progress bar's message: what the run has done and what is left, and the time that
/// takes at the rate budget (one request per record).
pub(crate) fn progress_message(run: &RunSummary, requests_per_second: u32) -> String {
    match run.expected {
        None => format!("sync {}: {} (reading the model)", run.sync, run.status),
        Some(expected) => {
            let left = (expected - run.records).max(0);
            let seconds = left as f64 / f64::from(requests_per_second.max(1));
            format!(
                "sync {}: {} · extracted {expected} · confirmed {} · left {left} · {} left at {requests_per_second}/s",
                run.sync,
                run.status,
                run.confirmed,
                humantime::format_duration(std::time::Duration::from_secs(seconds.ceil() as u64))
            )
        }
    }
}

impl Printer {
    /// Prints for runs waited for in `warehouse`'s pipeline.
    pub(crate) fn new(
        warehouse: Arc<dyn Warehouse>,
        json_lines: bool,
        quiet: bool,
        requests_per_second: u32,
    ) -> Printer {
        use std::io::IsTerminal;
        let bar =
            (!json_lines && !quiet && std::io::stderr().is_terminal() && !crate::logs::is_json())
                .then(|| {
                    let bar = indicatif::ProgressBar::new(0);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    bar
                });
        Printer {
            warehouse,
            json_lines,
            quiet,
            timestamped: false,
            bar,
            requests_per_second,
            specs: Vec::new(),
        }
    }
}

impl RunObserver for Printer {
    fn notice(&mut self, line: String) {
        crate::logs::line(&printable(&line));
    }

    fn progress(&mut self, line: String) {
        if self.bar.is_some() {
            // The bar says it.
            return;
        }
        if crate::logs::is_json() {
            // The JSON line has its own time.
            crate::logs::info(&printable(&line));
            return;
        }
        eprintln!(
            "{} {}",
            loopsync_core::time::utc_seconds(std::time::SystemTime::now()),
            printable(&line)
        );
    }

    fn started(&mut self, run_id: i64) {
        // Stopped by a signal, `main` closes the run as interrupted.
        stop::watch_run(self.warehouse.clone(), run_id);
    }

    fn tick(&mut self, run: &RunSummary) {
        if let Some(bar) = &self.bar {
            bar.set_length(run.expected.unwrap_or(0).max(0) as u64);
            bar.set_position(run.records.max(0) as u64);
            bar.set_message(progress_message(run, self.requests_per_second));
        }
    }

    fn finished(&mut self, summary: &RunSummary) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            bar.reset();
        }
        stop::run_over(summary.id);
        if self.json_lines {
            // One line per run, with the same envelope as `--once --json` (a list of one).
            if let Err(error) = crate::output::json_line("run", &[summary]) {
                crate::logs::error(&error.to_string());
            }
        } else if !self.quiet {
            if self.timestamped {
                // Following the schedules: when each run ended, before its report.
                crate::say!(
                    "{} run {} of sync {} ended: {}",
                    loopsync_core::time::utc_seconds(std::time::SystemTime::now()),
                    summary.id,
                    summary.sync,
                    summary.status
                );
            }
            let spec = self.specs.iter().find(|s| s.name == summary.sync);
            crate::say_raw!("{}", report::text(summary, spec));
        }
    }

    fn refused(&mut self, refused: &Refused) {
        // The other syncs go on (`--once`: the exit status says 2).
        crate::logs::error(&printable(&refused.to_string()));
    }
}

/// An engine error for `main`: stopped by a signal, [`Stopped`].
pub(crate) fn stopped_or(error: EngineError) -> anyhow::Error {
    match error {
        EngineError::Stopped => Stopped.into(),
        error => error.into(),
    }
}

/// The reports of the runs that ran, and whether a sync was refused (exit status 2).
pub(crate) fn split(runs: Vec<SyncRun>) -> (Vec<RunSummary>, bool) {
    let mut summaries = Vec::new();
    let mut refused = false;
    for run in runs {
        match run {
            SyncRun::Done(summary) => summaries.push(*summary),
            SyncRun::Refused(_) | SyncRun::Unsendable(_) => refused = true,
        }
    }
    (summaries, refused)
}

#[cfg(test)]
mod tests {
    use loopsync_engine::state::RunStatus;

    use super::*;

    /// The bar says what is done and what is left, and the time left at the rate budget.
    #[test]
    fn the_progress_says_the_time_left_at_the_budget() {
        let mut run = RunSummary {
            id: 3,
            sync: "users".into(),
            status: RunStatus::Extracting,
            ..RunSummary::default()
        };
        assert_eq!(
            progress_message(&run, 10),
            "sync users: extracting (reading the model)"
        );
        run.status = RunStatus::Sending;
        run.expected = Some(1000);
        run.records = 400;
        run.confirmed = 390;
        assert_eq!(
            progress_message(&run, 10),
            "sync users: sending · extracted 1000 · confirmed 390 · left 600 · 1m left at 10/s"
        );
        run.records = 1200;
        assert!(progress_message(&run, 10).contains("left 0 · 0s left"));
    }
}
