//! `loopsync`: the one binary. Thin: parses the command line, sets up logging, and calls into
//! the library crates. `anyhow` lives here and nowhere else.

mod sim;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keeps Loops contacts in step with a warehouse table or query.
#[derive(Debug, Parser)]
#[command(name = "loopsync", version, about)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, default_value = "loopsync.toml")]
    config: std::path::PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the local Loops API simulator.
    Sim(sim::SimArgs),
}

/// Exit statuses of PRODUCT.md: 0 done, 1 failed, 2 bad usage or config, 3 degraded.
pub const EXIT_FAILED: u8 = 1;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOOPSYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let _ = &cli.config;
    let result = runtime.block_on(async {
        match cli.command {
            Command::Sim(args) => sim::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}
