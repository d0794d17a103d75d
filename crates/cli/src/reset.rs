//! `loopsync reset --sync NAME`: forgets a sync's state — what Loops confirmed for each of its
//! records (`loopsync.state`) and the Loops destination it is bound to
//! (`loopsync.destinations`) — so that its next run sends every row of the model to the
//! destination the config points at. Its runs and per-record results stay, as history. The way
//! forward when a sync is pointed at another Loops that lacks its contacts (the other is
//! `loopsync adopt`). Needs only the warehouse: no Loops secret, no request to Loops.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_engine::reset;

use crate::common::{EXIT_FAILED, UsageError, load_config_for_warehouse, open_warehouse};
use crate::escape::printable;

#[derive(Debug, Args)]
pub struct ResetArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// The sync whose state to forget.
    #[arg(long)]
    sync: String,
    /// Do not ask for confirmation (needed when stdin is not a terminal).
    #[arg(long)]
    yes: bool,
    /// Print what was deleted as JSON.
    #[arg(long)]
    json: bool,
}

/// What a reset forgot, precisely: the records Loops had confirmed (what the state said Loops
/// holds), and apart from them those only sent or parked.
fn forgotten(reset: &loopsync_engine::state::StateReset) -> String {
    let others = reset.state_records.saturating_sub(reset.confirmed_records);
    let mut said = format!(
        "forgot what Loops confirmed for {} record{}",
        reset.confirmed_records,
        if reset.confirmed_records == 1 {
            ""
        } else {
            "s"
        }
    );
    if others > 0 {
        said.push_str(&format!(
            " (and the state of {others} other{} sent or parked, never confirmed)",
            if others == 1 { "" } else { "s" }
        ));
    }
    said
}

pub async fn run(config_path: &Path, args: ResetArgs) -> anyhow::Result<ExitCode> {
    let config = load_config_for_warehouse(config_path, Some(&args.sync))?;
    let warehouse = open_warehouse(&config).await?;
    let sync = args.sync.as_str();
    let bound = warehouse.destination(sync).await?;
    let next_run = config
        .sync(sync)
        .map(|s| reset::next_run(&s.spec))
        .unwrap_or_default();
    // One run of a sync at a time: a run still going would write state again as Loops
    // confirms its records.
    if let Some(run) = reset::unfinished_run(&*warehouse, sync).await? {
        crate::logs::warn(&format!(
            "run {} of sync {sync} is {}: if it is still in progress, the records it confirms \
             become state again; reset once it has ended",
            run.id, run.status
        ));
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(UsageError(format!(
                "reset forgets the state of sync {sync}: confirm with --yes (stdin is not a terminal)"
            ))
            .into());
        }
        let bound = bound
            .as_ref()
            .map(|b| {
                format!(
                    ", and its binding to {}",
                    printable(&b.destination.to_string())
                )
            })
            .unwrap_or_default();
        let question = format!(
            "Forget the state of sync {sync} (what Loops confirmed for each record{bound})? {} \
             [y/N] ",
            next_run
        );
        if crate::logs::is_json() {
            crate::logs::info(&question);
        } else {
            eprint!("{question}");
            std::io::stderr().flush()?;
        }
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !reset::is_yes(&answer) {
            crate::logs::info("nothing was forgotten");
            return Ok(ExitCode::from(EXIT_FAILED));
        }
    }
    let reset = warehouse.reset_state(sync).await?;
    if args.json {
        let mut value = serde_json::to_value(&reset)?;
        value["sync"] = sync.into();
        crate::output::json("reset", &value)?;
    } else {
        let binding = match &reset.destination {
            Some(b) => format!(
                "its binding to {} (since {})",
                printable(&b.destination.to_string()),
                b.bound_at
            ),
            None => "no destination binding".into(),
        };
        crate::say!(
            "sync {sync}: {}; and {binding}. Its runs and records are kept. {next_run}",
            forgotten(&reset)
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use loopsync_engine::state::StateReset;

    use super::*;

    /// A reset says how many confirmed records it forgot, apart from those only sent.
    #[test]
    fn a_reset_counts_what_loops_had_confirmed() {
        let reset = |confirmed_records, state_records| StateReset {
            confirmed_records,
            state_records,
            destination: None,
        };
        assert_eq!(
            forgotten(&reset(200, 5000)),
            "forgot what Loops confirmed for 200 records (and the state of 4800 others sent or \
             parked, never confirmed)"
        );
        assert_eq!(
            forgotten(&reset(1, 1)),
            "forgot what Loops confirmed for 1 record"
        );
    }
}
