//! `loopsync demo`: nothing to set up. An embedded SQLite warehouse with sample users, the
//! in-process bus, and the Loops simulator in this process; one run, some rows changed, a
//! second run, both reports.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use loopsync_config::Config;
use loopsync_simulator::{MailingList, Settings, SimConfig};

use crate::run;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Sample users in the warehouse.
    #[arg(long, default_value_t = 25)]
    users: u32,
    /// Requests per second of the simulated Loops team.
    #[arg(long, default_value_t = 10)]
    rate_limit: u32,
    /// Keep the demo's files (warehouse, config) in this folder instead of a temporary one.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

const PLANS: [&str; 3] = ["free", "pro", "team"];

fn seed(path: &std::path::Path, users: u32) -> anyhow::Result<()> {
    let db = rusqlite::Connection::open(path)?;
    db.execute_batch(
        "DROP TABLE IF EXISTS users;
         CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, first_name TEXT, plan TEXT,
                             signed_up_at TEXT, newsletter INTEGER);",
    )?;
    let names = [
        "Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances",
    ];
    for i in 1..=users {
        db.execute(
            "INSERT INTO users VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![
                i,
                format!("user{i}@example.com"),
                names[(i as usize) % names.len()],
                PLANS[(i as usize) % PLANS.len()],
                format!("2024-{:02}-{:02} 09:30:00", 1 + i % 12, 1 + i % 28),
                i % 2,
            ],
        )?;
    }
    Ok(())
}

fn change_rows(path: &std::path::Path, users: u32) -> anyhow::Result<()> {
    let db = rusqlite::Connection::open(path)?;
    db.execute_batch(&format!(
        "UPDATE users SET plan = 'enterprise' WHERE id IN (1, 2, 3);
         INSERT INTO users VALUES ({a}, 'new.user{a}@example.com', 'Nova', 'free', '2024-12-01 10:00:00', 1);
         INSERT INTO users VALUES ({b}, 'new.user{b}@example.com', 'Orion', 'pro', '2024-12-02 11:00:00', 0);
         INSERT INTO users VALUES ({c}, 'not-an-email', 'Typo', 'free', '2024-12-03 12:00:00', 0);",
        a = users + 1,
        b = users + 2,
        c = users + 3,
    ))?;
    Ok(())
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
"#,
        db = db.display(),
        base = sim.base_url(),
        rps = args.rate_limit,
    );
    let config_path = dir.join("loopsync.toml");
    std::fs::write(&config_path, &config_text)?;
    Config::parse(&config_text, |_| None).context("the demo's own config")?;

    println!(
        "loopsync demo: {} users in an SQLite warehouse, a Loops simulator at {} ({} requests/s)\n",
        args.users,
        sim.base_url(),
        args.rate_limit
    );
    println!("== first run: every user is new");
    let first = run::run(&config_path, run::RunArgs::once()).await?;
    change_rows(&db, args.users)?;
    println!(
        "\n== second run, after: 3 plans changed, 2 users added, 1 user with a malformed email"
    );
    let second = run::run(&config_path, run::RunArgs::once()).await?;
    let stats = sim.stats();
    let contacts = sim.contacts();
    println!(
        "\nLoops (simulated) now has {} contacts; {} requests reached it, {} were rate limited.",
        contacts.as_array().map_or(0, Vec::len),
        stats.total_requests,
        stats.rate_limited
    );
    println!(
        "The second run wrote one contact per changed or added user and none for the {} unchanged \
         (its other requests are the preflight: the API key's team and the list of contact \
         properties); the malformed email is kept as an invalid record, so that run ended \
         degraded.",
        args.users - 3
    );
    if args.dir.is_some() {
        println!("Files kept in {}", dir.display());
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
