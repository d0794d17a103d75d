//! `loopsync check`: the config, the warehouse and every sync's model, the API key, the Loops
//! the config points at against the one each sync's state is bound to, and the custom
//! properties and mailing lists that the mappings need and Loops lacks: parses the flags,
//! calls `loopsync_engine::check`, prints its report.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;
use loopsync_engine::check::CheckReport;

use crate::common::load_config;
use crate::escape::printable;

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: crate::ConfigArg,
    /// Create the missing custom properties, with their declared types.
    #[arg(long)]
    create_properties: bool,
    /// Print the report as one JSON document on stdout (docs/json.md).
    #[arg(long)]
    json: bool,
}

pub async fn run(config_path: &Path, args: CheckArgs) -> anyhow::Result<ExitCode> {
    // A config error names the key and exits 2, before any connection or request.
    let config = load_config(config_path)?;
    let report = loopsync_engine::check::check(&config, args.create_properties).await?;
    if args.json {
        crate::output::json("check", &json_view(&report))?;
    } else {
        print_text(&config_path.display().to_string(), &report);
    }
    Ok(ExitCode::from(if report.ok() {
        0
    } else {
        crate::common::EXIT_FAILED
    }))
}

/// `check --json`'s `data` (docs/json.md): each check an object with `ok` and, when it
/// failed, `error`.
fn json_view(r: &CheckReport) -> serde_json::Value {
    use serde_json::json;
    let verdict = |error: &Option<String>| json!({"ok": error.is_none(), "error": error});
    json!({
        "ok": r.ok(),
        "warehouse": verdict(&r.warehouse),
        // Not checked when the warehouse was not reached.
        "privileges": if r.warehouse.is_some() { serde_json::Value::Null } else { verdict(&r.privileges) },
        "models": r.models.iter().map(|(sync, error)| {
            json!({"sync": sync, "ok": error.is_none(), "error": error})
        }).collect::<Vec<_>>(),
        "nats": r.nats.as_ref().map(|n| match n {
            Ok(version) => json!({"ok": true, "error": null, "server_version": version}),
            Err(e) => json!({"ok": false, "error": e, "server_version": null}),
        }),
        "loops": json!({"ok": r.loops.is_none(), "error": r.loops, "team_name": r.team_name}),
        "destination": r.destination,
        "bindings": r.bindings,
        "missing_properties": r.missing_properties,
        "created_properties": r.created_properties,
        "type_mismatches": r.type_mismatches,
        "missing_lists": r.missing_lists,
        "identity_conflict": r.identity_conflict,
        "two_contacts": r.two_contacts,
    })
}

fn line(ok: bool, text: &str) {
    crate::say!("{} {text}", if ok { "ok  " } else { "FAIL" });
}

/// A finding that does not fail the check: a config that works until something happens.
fn warn(text: &str) {
    crate::say!("warn {text}");
}

/// A check that could not be made (what it needs failed above): neither ok nor failed itself.
fn unchecked(text: &str) {
    crate::say!("--   {text}");
}

fn print_text(config: &str, r: &CheckReport) {
    line(true, &format!("config {config}"));
    match &r.warehouse {
        None => line(true, "warehouse reachable"),
        Some(e) => line(false, &format!("warehouse: {}", printable(e))),
    }
    match (&r.warehouse, &r.privileges) {
        (Some(_), _) => {}
        (None, None) => line(true, "the warehouse user may make and write the state"),
        (None, Some(e)) => line(false, &format!("privileges: {}", printable(e))),
    }
    for (sync, error) in &r.models {
        match error {
            None => line(
                true,
                &format!("sync {sync}: the model runs and has every mapped column"),
            ),
            Some(e) => line(false, &printable(e)),
        }
    }
    match &r.nats {
        None => {}
        Some(Ok(version)) => line(
            true,
            &format!("NATS reachable, JetStream on (nats-server {version})"),
        ),
        Some(Err(e)) => line(false, &format!("NATS: {}", printable(e))),
    }
    match &r.loops {
        None => line(
            true,
            &format!(
                "Loops API key valid (team {})",
                printable(r.team_name.as_deref().unwrap_or("unnamed"))
            ),
        ),
        // Not the key's fault when Loops was not reached.
        Some(e) if e.contains("cannot reach Loops at") => {
            line(false, &format!("Loops: {}", printable(e)))
        }
        Some(e) => line(false, &format!("Loops API key: {}", printable(e))),
    }
    if let Some(d) = &r.destination {
        line(true, &format!("destination: {}", printable(&d.to_string())));
    }
    for b in &r.bindings {
        let sync = &b.sync;
        match (&b.bound_to, b.matches) {
            (None, _) => line(
                true,
                &format!("sync {sync}: state bound to no destination yet (its next run binds it)"),
            ),
            (Some(t), Some(true)) => match b.read_back {
                None => line(
                    true,
                    &format!(
                        "sync {sync}: state bound to this destination (since {})",
                        t.bound_at
                    ),
                ),
                Some(found) if found.weak() => warn(&format!(
                    "sync {sync}: state bound to this destination with another API key (since \
                     {}); {} of its confirmed contacts read back were found with this key, but by \
                     their email or userId alone (the state knows no contact id for them), which \
                     another team holding the same people would pass too: its next run keeps the \
                     state and records the new key. If the key is another team's, `loopsync \
                     reset --sync {sync}` sends every row to it",
                    t.bound_at, found.checked
                )),
                Some(found) if found.trusted() => line(
                    true,
                    &format!(
                        "sync {sync}: state bound to this destination with another API key (since \
                         {}); {} of its confirmed contacts read back were found with this key: its \
                         next run keeps the state and records the new key",
                        t.bound_at, found.checked
                    ),
                ),
                Some(found) => line(
                    false,
                    &format!(
                        "sync {sync}: state bound to this destination with another API key (since \
                         {}), and {} of the {} confirmed contacts read back are not in Loops with \
                         this key: another team of the same name, or a Loops that lost them. Runs \
                         refuse it until `loopsync adopt --sync {sync}` (it holds these contacts) \
                         or `loopsync reset --sync {sync}` (send every row again)",
                        t.bound_at, found.missing, found.checked
                    ),
                ),
            },
            // Loops was not reached (or refused the key): the binding could not be compared
            // with the configured Loops, so it is no "ok".
            (Some(t), None) if r.destination.is_none() => unchecked(&format!(
                "sync {sync}: state bound to {} (since {}); not compared with the configured \
                 Loops, which was not reached",
                printable(&t.destination.to_string()),
                t.bound_at
            )),
            (Some(t), None) => line(
                true,
                &format!(
                    "sync {sync}: state bound to {} (since {})",
                    printable(&t.destination.to_string()),
                    t.bound_at
                ),
            ),
            (Some(t), Some(false)) => line(
                false,
                &format!(
                    "sync {sync}: state bound to {} (since {}), not to this destination: runs \
                     refuse it until `loopsync adopt --sync {sync}` (it holds these contacts) or \
                     `loopsync reset --sync {sync}` (send every row again)",
                    printable(&t.destination.to_string()),
                    t.bound_at
                ),
            ),
        }
    }
    for p in &r.created_properties {
        line(true, &format!("created contact property {p}"));
    }
    for p in &r.missing_properties {
        line(
            false,
            &format!(
                "Loops lacks contact property {p} (loopsync check --create-properties creates it)"
            ),
        );
    }
    for m in &r.type_mismatches {
        line(false, &printable(m));
    }
    for l in &r.missing_lists {
        line(
            false,
            &format!("Loops has no mailing list {l} (create it in Loops' settings)"),
        );
    }
    if let Some(c) = &r.identity_conflict {
        warn(&format!(
            "syncs of this Loops team find contacts differently: by email alone {}; by userId \
             {}. When a person's email changes, a sync by email writes the new address as a new \
             contact, and the next write of a sync by userId (that userId, the new email) \
             matches two contacts: Loops refuses it (\"Multiple contacts found\") on every run. \
             Identify every sync by userId, or map userId in the syncs by email too; see \
             \"Combining syncs on one Loops team\" in docs/operations.md",
            c.by_email.join(", "),
            c.by_user_id.join(", ")
        ));
    }
    for t in &r.two_contacts {
        line(
            false,
            &format!(
                "sync {}: {} record{} refused by Loops because its email and its userId are two \
                 contacts (\"Multiple contacts found\"), on every run: fix how the syncs find \
                 contacts (above), then merge or delete the duplicate contact in Loops \
                 (loopsync rejections --sync {} lists them)",
                t.sync,
                t.records,
                if t.records == 1 { "" } else { "s" },
                t.sync
            ),
        );
    }
}
