//! `loopsync`: the one binary. Thin: parses the command line, reads the config, sets up logging,
//! and calls into the library crates. `anyhow` lives here and nowhere else.

#[macro_use]
mod output;
mod adopt;
mod check;
mod common;
mod demo;
mod dlq;
mod escape;
mod export;
mod forget;
mod history;
mod http;
mod logs;
mod plan;
mod printer;
mod prometheus;
mod record;
mod rejections;
mod report;
mod reset;
mod run;
mod selection;
mod sim;
mod status;
mod stop;
mod verify;
mod worker;

use common::{EXIT_FAILED, EXIT_USAGE, UsageError};
use logs::LogFormat;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keeps Loops contacts in step with a warehouse table or query.
#[derive(Debug, Parser)]
#[command(name = "loopsync", version, about)]
struct Cli {
    /// Log lines on stderr: `text` (colours on a terminal only) or `json` (one object per
    /// line). Which lines: LOOPSYNC_LOG, a tracing filter (default `warn`; `info` adds a line
    /// per run, retry and dead letter); other crates' lines stay at `warn` unless
    /// LOOPSYNC_LOG_PERSONAL_DATA=1 (they may carry personal data).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--config PATH`, on each command that reads a config.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// The config file (docs/configuration.md).
    #[arg(
        long = "config",
        global = true,
        value_name = "PATH",
        default_value = "loopsync.toml"
    )]
    pub path: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Zero set-up: an embedded warehouse, the in-process bus and a local Loops simulator; runs
    /// a sync, changes some rows, runs again, and prints both reports.
    Demo(demo::DemoArgs),
    /// Validate the config, reach the warehouse and Loops, and list the custom properties the
    /// mappings need and Loops lacks.
    Check(check::CheckArgs),
    /// Dry run: the diff and, per record, the operation it would send; sends nothing.
    Plan(plan::PlanArgs),
    /// The records a run would create or update, as CSV files for Loops' uploader (one per set
    /// of mailing lists), and the steps that follow; sends nothing.
    Export(export::ExportArgs),
    /// Run the pipeline: one run of each sync with --once.
    Run(run::RunArgs),
    /// Run one stage as a long-running NATS worker; start as many as wanted.
    Worker(worker::WorkerArgs),
    /// Record the model's current rows as already in Loops, without sending anything (a sync
    /// taking over from another tool); the next run sends only what changes after.
    Adopt(adopt::AdoptArgs),
    /// Run history: status, start, duration, counts, requests sent.
    Runs(history::RunsArgs),
    /// Invalid, rejected and dead-lettered records, each with its key and reason; accept
    /// invalid records as they are, so that they no longer make runs degraded.
    Rejections(rejections::RejectionsArgs),
    /// Per sync: the last run, the next scheduled run, the records pending, the dead letters,
    /// and why the sync is degraded. Reads the state only.
    Status(status::StatusArgs),
    /// One record: what Loops confirmed, every outcome with the request kind, Loops' answer
    /// and the reason, and what the next run would send. Exit 1 when the key is unknown.
    Record(record::RecordArgs),
    /// Dead letters: show them, send them again, or park them so no run retries them.
    Dlq(dlq::DlqArgs),
    /// Forget a sync's state (what Loops confirmed, and the Loops it is bound to): the next run
    /// sends every row. Its runs and records stay.
    Reset(reset::ResetArgs),
    /// Erase one person (a key, or an email) from the state, results, attempts and dead
    /// letters of a sync; --in-loops deletes the contact in Loops too. Exit 1 when not found.
    Forget(forget::ForgetArgs),
    /// Serve the local Loops API simulator.
    Sim(sim::SimArgs),
    /// Read confirmed contacts back from Loops and report drift from the confirmed state;
    /// --repair makes the next run re-send the drifted records. Exit 1 when drift is found.
    Verify(verify::VerifyArgs),
}

impl Command {
    /// Its name on the command line.
    fn name(&self) -> &'static str {
        match self {
            Command::Demo(_) => "demo",
            Command::Check(_) => "check",
            Command::Plan(_) => "plan",
            Command::Export(_) => "export",
            Command::Run(_) => "run",
            Command::Worker(_) => "worker",
            Command::Adopt(_) => "adopt",
            Command::Runs(_) => "runs",
            Command::Rejections(_) => "rejections",
            Command::Status(_) => "status",
            Command::Record(_) => "record",
            Command::Dlq(_) => "dlq",
            Command::Reset(_) => "reset",
            Command::Forget(_) => "forget",
            Command::Sim(_) => "sim",
            Command::Verify(_) => "verify",
        }
    }

    /// Runs until stopped: a signal is its normal end (exit 0).
    fn is_service(&self) -> bool {
        matches!(self, Command::Worker(_) | Command::Sim(_))
            || matches!(self, Command::Run(args) if !args.once)
    }

    /// Observes the stop itself and winds down (a pipeline settles or naks what is in flight);
    /// the others are dropped at the first signal: they only read, or write in transactions
    /// that end with the connection.
    fn winds_down(&self) -> bool {
        matches!(
            self,
            Command::Run(_) | Command::Worker(_) | Command::Dlq(_) | Command::Sim(_)
        )
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
        }
    };
    logs::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            logs::error(&format!("cannot start the async runtime: {e}"));
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let (name, service, winds_down) = (
        cli.command.name(),
        cli.command.is_service(),
        cli.command.winds_down(),
    );
    let (result, closed) = runtime.block_on(async {
        stop::listen(EXIT_FAILED);
        let command = run_command(cli);
        tokio::pin!(command);
        let mut closed = Vec::new();
        let result = tokio::select! {
            result = &mut command => Some(result),
            () = stop::requested() => {
                // The command winds down (or is dropped) while its runs are closed.
                let wind_down = async {
                    if winds_down {
                        tokio::time::timeout(stop::GRACE, &mut command).await.ok()
                    } else {
                        None
                    }
                };
                let (result, now) = tokio::join!(wind_down, stop::close_open_runs());
                closed = now;
                result
            }
        };
        if stop::signal().is_some() {
            // A run requested while the command wound down.
            closed.extend(stop::close_open_runs().await);
        }
        (result, closed)
    });
    // Do not wait for stray blocking tasks (a diff reader) at exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if let Some(signal) = stop::signal() {
        let mut line = format!("loopsync {name}: stopped by {signal}");
        for run_id in &closed {
            line.push_str(&format!(
                "; run {run_id} marked interrupted (its records are retried by the next run)"
            ));
        }
        if result.is_none() && winds_down {
            line.push_str(&format!(
                "; what was still in progress after {} s was abandoned",
                stop::GRACE.as_secs()
            ));
        }
        logs::info(&line);
        return match result {
            Some(Ok(code)) => code,
            Some(Err(e)) if e.downcast_ref::<stop::Stopped>().is_none() => {
                logs::error(&render(&e));
                ExitCode::from(EXIT_FAILED)
            }
            _ if service => ExitCode::SUCCESS,
            _ => ExitCode::from(EXIT_FAILED),
        };
    }
    let Some(result) = result else {
        unreachable!("a command is only left unfinished after a signal")
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            logs::error(&render(&e));
            if e.downcast_ref::<UsageError>().is_some()
                || e.downcast_ref::<loopsync_engine::destination::Refused>()
                    .is_some()
                || e.downcast_ref::<loopsync_engine::EngineError>()
                    .is_some_and(loopsync_engine::EngineError::is_usage)
                || e.downcast_ref::<loopsync_engine::state::WarehouseError>()
                    .is_some_and(loopsync_engine::state::is_bad_url)
            {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
    }
}

/// An error and its causes on one line, each said once: a message that already shows its
/// cause (a library error whose text must stand alone, as a dead letter's reason does) is not
/// followed by the cause again. Control characters in it (a key, Loops' words) are escaped.
fn render(error: &anyhow::Error) -> String {
    escape::printable(&said_once(error)).into_owned()
}

fn said_once(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn run_command(cli: Cli) -> anyhow::Result<ExitCode> {
    {
        match cli.command {
            Command::Sim(args) => sim::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Run(args) => run::run(&args.config.path.clone(), args).await,
            Command::Worker(args) => worker::run(&args.config.path.clone(), args).await,
            Command::Check(args) => check::run(&args.config.path.clone(), args).await,
            Command::Plan(args) => plan::run(&args.config.path.clone(), args).await,
            Command::Export(args) => export::run(&args.config.path.clone(), args).await,
            Command::Adopt(args) => adopt::run(&args.config.path.clone(), args).await,
            Command::Runs(args) => history::runs(&args.config.path.clone(), args).await,
            Command::Rejections(args) => rejections::run(&args.config.path.clone(), args).await,
            Command::Status(args) => status::run(&args.config.path.clone(), args).await,
            Command::Record(args) => record::run(&args.config.path.clone(), args).await,
            Command::Dlq(args) => dlq::run(&args.config.path.clone(), args).await,
            Command::Verify(args) => verify::run(&args.config.path.clone(), args).await,
            Command::Reset(args) => reset::run(&args.config.path.clone(), args).await,
            Command::Forget(args) => forget::run(&args.config.path.clone(), args).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` describes every flag, argument and command; `sim` and `demo`, which read no
    /// config, take no `--config`; the others all do.
    #[test]
    fn every_flag_is_described() {
        use clap::CommandFactory;
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(format!("{path} (the command)"));
                }
                walk(sub, &path, missing);
            }
        }
        let mut command = Cli::command();
        command.build();
        let mut missing = Vec::new();
        walk(&command, "loopsync", &mut missing);
        assert!(missing.is_empty(), "without a description: {missing:?}");
        for sub in command.get_subcommands() {
            let takes_config = sub.get_arguments().any(|a| a.get_long() == Some("config"));
            let name = sub.get_name();
            assert_eq!(
                takes_config,
                !matches!(name, "sim" | "demo" | "help"),
                "{name} and --config"
            );
        }
    }

    /// A cause is said once: after a message that does not show it, not after one that does.
    #[test]
    fn causes_are_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("publish to t.ops.users failed: {source}")]
        struct Shows {
            #[source]
            source: std::io::Error,
        }
        let io = || std::io::Error::other("connection reset");
        let shows = anyhow::Error::new(Shows { source: io() }).context("sending");
        assert_eq!(
            render(&shows),
            "sending: publish to t.ops.users failed: connection reset"
        );
        let plain = anyhow::Error::new(io()).context("reading the model");
        assert_eq!(render(&plain), "reading the model: connection reset");
        let with = format!("{shows:#}");
        assert!(
            with.ends_with("connection reset: connection reset"),
            "{with}"
        );
    }
}
