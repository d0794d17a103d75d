//! `loopsync record --sync NAME KEY`: one record (`loopsync_engine::record`): what Loops
//! confirmed and when, every outcome and failed attempt, its dead letter, and what the next run
//! would send. Reads the state and the model; never talks to Loops. A key that neither knows is
//! exit status 1.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_engine::record::{RecordReport, record};

use crate::common::{EXIT_FAILED, load_config_for_warehouse, open_warehouse_read_only};
use crate::escape::printable;

#[derive(Debug, Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// The record's sync.
    #[arg(long)]
    sync: String,
    /// The record's primary key, as text.
    key: String,
    /// Print the record as one JSON document on stdout (docs/json.md).
    #[arg(long)]
    json: bool,
}

pub async fn run(config_path: &Path, args: RecordArgs) -> anyhow::Result<ExitCode> {
    let config = load_config_for_warehouse(config_path, Some(&args.sync))?;
    let warehouse = open_warehouse_read_only(&config).await?;
    let spec = &config
        .sync(&args.sync)
        .expect("load_config_for_warehouse checked the sync")
        .spec;
    let Some(report) = record(&*warehouse, spec, &args.key).await? else {
        eprintln!(
            "error: sync {} has no record {}: not in its model, its state or its results",
            args.sync,
            printable(&args.key)
        );
        return Ok(ExitCode::from(EXIT_FAILED));
    };
    if args.json {
        crate::output::json("record", &report)?;
    } else {
        crate::say_raw!("{}", text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// `-` for nothing.
fn or_dash(value: Option<&str>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| printable(v).into_owned())
}

/// A JSON value on one line, escaped for the terminal.
fn json_text(value: &impl serde::Serialize) -> String {
    printable(&serde_json::to_string(value).unwrap_or_default()).into_owned()
}

/// The record as text.
pub fn text(r: &RecordReport) -> String {
    let mut out = format!("record {} of sync {}\n", printable(&r.key), r.sync);
    match &r.state {
        None => out.push_str("  state: nothing kept (never sent, or forgotten)\n"),
        Some(s) => {
            let mut line = if s.confirmed {
                format!(
                    "  state: confirmed by Loops in run {} at {} · email {} · userId {} · contact {}",
                    s.confirmed_run
                        .map_or_else(|| "-".into(), |r| r.to_string()),
                    or_dash(s.confirmed_at.as_deref()),
                    or_dash(s.confirmed_email.as_deref()),
                    or_dash(s.confirmed_user_id.as_deref()),
                    or_dash(s.contact_id.as_deref()),
                )
            } else if s.removed {
                format!(
                    "  state: its contact was removed from Loops in run {} at {}",
                    s.confirmed_run
                        .map_or_else(|| "-".into(), |r| r.to_string()),
                    or_dash(s.confirmed_at.as_deref()),
                )
            } else {
                "  state: never confirmed by Loops".to_owned()
            };
            if s.repaired {
                line.push_str(" · forgotten by verify --repair (the next run sends it again)");
            }
            if s.parked {
                line.push_str(" · parked");
            }
            if s.sent_unconfirmed {
                line.push_str(&format!(
                    " · the version of run {} has not been confirmed by Loops",
                    s.sent_run.map_or_else(|| "-".into(), |r| r.to_string())
                ));
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    match &r.confirmed_values {
        Some(v) => out.push_str(&format!(
            "  confirmed values: properties {} · mailing lists {}\n",
            json_text(&v.properties),
            json_text(&v.mailing_lists)
        )),
        None if r.state.as_ref().is_some_and(|s| s.confirmed) => out.push_str(
            "  confirmed values: not kept (the state keeps a digest; the model's row differs \
             from what Loops confirmed)\n",
        ),
        None => {}
    }
    if r.outcomes.is_empty() {
        out.push_str("  outcomes: none kept\n");
    } else {
        out.push_str("  outcomes:\n");
    }
    for o in &r.outcomes {
        let x = &o.outcome.result;
        out.push_str(&format!(
            "    run {} · {} · {} · {} · {}{} · {} request{}{}{}\n",
            x.run_id,
            x.at,
            o.outcome.change.as_deref().unwrap_or("-"),
            x.operation,
            x.outcome,
            o.status.map(|s| format!(" ({s})")).unwrap_or_default(),
            x.requests,
            if x.requests == 1 { "" } else { "s" },
            x.contact_id
                .as_deref()
                .map(|c| format!(" · contact {}", printable(c)))
                .unwrap_or_default(),
            x.reason
                .as_deref()
                .map(|reason| format!(" · {}", printable(reason)))
                .unwrap_or_default(),
        ));
    }
    if !r.attempts.is_empty() {
        out.push_str("  failed attempts:\n");
    }
    for a in &r.attempts {
        let a_ = &a.attempt;
        out.push_str(&format!(
            "    run {} · {} · attempt {} · {} request{} (writes {} · events {} · deletes {}){} · {}\n",
            a_.run_id,
            a_.at,
            printable(&a_.attempt),
            a_.requests,
            if a_.requests == 1 { "" } else { "s" },
            a_.writes,
            a_.events,
            a_.deletes,
            a.status.map(|s| format!(" · {s}")).unwrap_or_default(),
            or_dash(a_.reason.as_deref()),
        ));
    }
    if let Some(d) = &r.dead_letter {
        out.push_str(&format!(
            "  dead letter: run {}{} (loopsync dlq replay sends it again)\n",
            d.run_id,
            if d.parked { ", parked" } else { "" }
        ));
    }
    let n = &r.next;
    out.push_str(&format!("  next run: {} · {}", n.change, n.operation));
    if let Some(action) = &n.action {
        out.push_str(&format!(" · {}", json_text(action)));
    }
    if let Some(reason) = &n.reason {
        out.push_str(&format!(" · {}", printable(reason)));
    }
    out.push('\n');
    out
}
