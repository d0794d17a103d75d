//! `loopsync demo`: nothing to set up. An embedded SQLite warehouse with sample users and
//! their product events, the in-process bus, and the Loops simulator in this process; one run
//! of both syncs (the contacts, then the events), some rows changed, a second run, the reports.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use loopsync_config::Config;
use loopsync_simulator::{MailingList, Settings, SimConfig};

use loopsync_engine::demo::{change_rows, count_events, seed};

use crate::run;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Sample users in the warehouse (at least 3: the second run changes three of them).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(3..=1_000_000))]
    users: u32,
    /// Requests per second of the simulated Loops team.
    #[arg(long, default_value_t = 10)]
    rate_limit: u32,
    /// Keep the demo's files (warehouse, config) in this folder instead of a temporary one.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = TempDir::new()?;
            temp.0.clone()
        }
    };
    let db = dir.join("warehouse.db");
    // A warehouse kept from an earlier demo holds a state bound to that demo's simulator, which
    // is gone: start afresh.
    for file in ["warehouse.db", "warehouse.db-wal", "warehouse.db-shm"] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    seed(&db, args.users).context("seeding the demo warehouse")?;
    let sim = loopsync_simulator::spawn(SimConfig {
        settings: Settings {
            rate_limit: args.rate_limit,
            ..Settings::default()
        },
        lists: vec![MailingList {
            id: "cm_newsletter".into(),
            name: "Newsletter".into(),
            description: None,
            is_public: true,
        }],
        ..SimConfig::default()
    })
    .await?;
    let config_text = format!(
        r#"# Written by `loopsync demo`.
[warehouse]
url = "sqlite://{db}"

[loops]
api_key = "test-key"
base_url = "{base}"
requests_per_second = {rps}

[[sync]]
name = "users"
model = "select id, email, first_name, plan, signed_up_at, newsletter from users"
primary_key = "id"
identify_by = "email"
behavior = "upsert"

[sync.mapping]
email = "email"
userId = "id"
firstName = "first_name"
planName = "plan"
signedUpAt = {{ column = "signed_up_at", type = "date" }}

[sync.mailing_lists]
"cm_newsletter" = "newsletter"

[[sync]]
name = "product_events"
model = "select event_id, email, event_name, plan, amount, occurred_at from user_events"
primary_key = "event_id"
identify_by = "email"
behavior = "append"
event = {{ column = "event_name" }}
cursor = "occurred_at"
cursor_lookback = "1h"

[sync.mapping]
email = "email"

[sync.event_properties]
plan = "plan"
amount = {{ column = "amount", type = "number" }}
"#,
        db = db.display(),
        base = sim.base_url(),
        rps = args.rate_limit,
    );
    let config_path = dir.join("loopsync.toml");
    std::fs::write(&config_path, &config_text)?;
    Config::parse(&config_text, |_| None).context("the demo's own config")?;

    let seeded_events = count_events(&db)?;
    crate::say!(
        "loopsync demo: {} users and {seeded_events} of their events in an SQLite warehouse, a Loops \
         simulator at {} ({} requests/s)\n",
        args.users,
        sim.base_url(),
        args.rate_limit
    );
    crate::say!(
        "== first run: every user is new, every event is sent (contacts first, then events)"
    );
    let first = run::run(&config_path, run::RunArgs::once()).await?;
    let changed = change_rows(&db, args.users)?;
    let plans_changed = args.users.min(3);
    crate::say!(
        "\n== second run, after: {plans_changed} plans changed, 2 users added, 1 user with a \
         malformed email; {} events added, {} sent invoice corrected",
        changed.added,
        changed.edited
    );
    // Each run has a rate budget of its own (no NATS here): a second apart, the second run's
    // first requests never share a second of Loops' limit with the first run's last ones.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let second = run::run(&config_path, run::RunArgs::once()).await?;
    let stats = sim.stats();
    let contacts = sim.contacts();
    let events = sim.events();
    let keys: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e.idempotency_key.as_deref())
        .collect();
    crate::say!(
        "\nLoops (simulated) now has {} contacts and {} events ({} distinct idempotency keys); {} \
         requests reached it, {} were rate limited.",
        contacts.as_array().map_or(0, Vec::len),
        events.len(),
        keys.len(),
        stats.total_requests,
        stats.rate_limited
    );
    crate::say!(
        "The contact sync's second run wrote one contact per changed or added user and none for the {} unchanged \
         (its other requests are the preflight: the API key's team and the lists of contact \
         properties and mailing lists); the malformed email is kept as an invalid record, so that run ended \
         degraded.",
        args.users - plans_changed
    );
    let corrected = if changed.edited > 0 {
        ", and counted the corrected invoice as ignored (already sent)"
    } else {
        ""
    };
    let rows = seeded_events + changed.added;
    if events.len() == rows && keys.len() == rows {
        // Without a first event there is no watermark: the second run read every row.
        let read = if seeded_events > 0 {
            "read only the events from 1 h (cursor_lookback) before the newest one of the \
             first run (the cursor occurred_at) on"
        } else {
            "read every event (the first run had none, so no cursor value to start from)"
        };
        crate::say!(
            "The event sync sent each of the {rows} events once: its second run {read}, sent \
             the {} new ones{corrected}: an event is never sent twice.",
            changed.added
        );
    } else {
        crate::say!(
            "The warehouse has {rows} events, but Loops (simulated) received {} ({} distinct \
             idempotency keys): see the reports above.",
            events.len(),
            keys.len()
        );
    }
    if args.dir.is_some() {
        crate::say!("Files kept in {}", dir.display());
    }
    let _ = (first, second);
    Ok(ExitCode::SUCCESS)
}

/// A temporary folder removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!(
            "loopsync-demo-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
