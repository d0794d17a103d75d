//! Test helpers. Tests run against real services, never mocks: NATS and PostgreSQL are found
//! through `LOOPSYNC_TEST_NATS_URL` and `LOOPSYNC_TEST_PG_URL` (`scripts/test.sh` starts
//! throwaway ones and sets them). Without them a test that needs one fails, unless the run
//! asks to skip (`LOOPSYNC_SKIP_SERVICES=1`; see [`services`]).
//!
//! Names made on shared servers are random and dropped at the end ([`TestDatabase`],
//! [`TestNamespace`]); every wait has a deadline ([`process`]); what Loops received is read
//! from the simulator in one place ([`sim`]).

pub mod browser;
pub mod nats;
pub mod process;
pub mod proxy;
pub mod services;
pub mod sim;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub use browser::ChromeDriver;
pub use process::{COMMAND_DEADLINE, output_within, until};
pub use services::{
    TestDatabase, TestMySql, TestNamespace, mysql_url, nats_url, pg_url, service, unique,
    with_database,
};
pub use sim::{Seen, SimProcess};

/// The `loopsync` binary: `LOOPSYNC_BIN`, else the one cargo built beside this test — built now
/// if it is missing or older than a source file, so a test never runs a stale binary.
pub fn loopsync_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("LOOPSYNC_BIN") {
            return PathBuf::from(bin);
        }
        // target/<profile>/deps/<test> → target/<profile>/loopsync
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("target/<profile>")
            .to_path_buf();
        let bin = profile_dir.join("loopsync");
        let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
        let sources = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        if built.is_none_or(|at| newest_source(&sources) > at) {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "loopsync", "--bin", "loopsync"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build -p loopsync failed");
        }
        bin
    })
    .clone()
}

/// The newest modification time of a `.rs` or `Cargo.toml` file below `dir`.
fn newest_source(dir: &std::path::Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != "node_modules" {
                newest = newest.max(newest_source(&path));
            }
        } else if (path.extension().is_some_and(|e| e == "rs") || name == "Cargo.toml")
            && let Ok(modified) = entry.metadata().and_then(|m| m.modified())
        {
            newest = newest.max(modified);
        }
    }
    newest
}

/// A reqwest client for plain-HTTP loopback calls.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// Serialises the tests that measure time against a real one-second window (rate budgets) or
/// a process's stop time: hold the guard for the whole test. Within one process (`cargo test`)
/// this lock does it; under cargo-nextest, which runs each test in a process of its own, the
/// `serial` test group of `.config/nextest.toml` does: a test that takes this guard is named
/// by that group's filter too.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The `data` of a `loopsync … --json` document (docs/json.md), after checking its envelope:
/// `{"version": 1, "command": "…", "data": …}`.
pub fn json_data(stdout: &[u8]) -> serde_json::Result<serde_json::Value> {
    let mut doc: serde_json::Value = serde_json::from_slice(stdout)?;
    if doc["version"] != 1 || !doc["command"].is_string() || doc.get("data").is_none() {
        return Err(<serde_json::Error as serde::de::Error>::custom(format!(
            "not a loopsync --json document (version 1, command, data): {doc}"
        )));
    }
    Ok(doc["data"].take())
}

/// What an end-to-end [`Stack`] is made of.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Rows of the `users` table at start.
    pub rows: usize,
    /// Use NATS (a namespace of its own) instead of the in-process bus.
    pub nats: bool,
    /// The warehouse is an SQLite file instead of a PostgreSQL database.
    pub sqlite: bool,
    /// The warehouse is a MySQL database (`LOOPSYNC_TEST_MYSQL_URL`), only read; the state is
    /// kept in an SQLite file of the stack's folder.
    pub mysql: bool,
    /// The warehouse is a DuckDB file (feature `duckdb`), only read; the state is kept in an
    /// SQLite file of the stack's folder.
    pub duckdb: bool,
    /// With `mysql`: the state is kept in a PostgreSQL database of its own
    /// (`LOOPSYNC_TEST_PG_URL`) instead of an SQLite file.
    pub state_on_postgres: bool,
    /// The simulated team's rate limit.
    pub sim_rate_limit: u32,
    /// `loops.requests_per_second` of the config.
    pub requests_per_second: u32,
    /// `nats.ack_wait_seconds`.
    pub ack_wait_seconds: f64,
    /// `behavior` of the sync.
    pub behavior: &'static str,
    /// `identify_by` of the sync; with `"userId"` the mapping has `userId = "id"`.
    pub identify_by: &'static str,
    /// More `key = value` lines for the `[[sync]]` table.
    pub extra_sync: &'static str,
    /// `loops.max_attempts`.
    pub max_attempts: u32,
    /// `loops.retry_backoff_ms`; `None` leaves the product's default (500 ms, doubled per
    /// attempt).
    pub retry_backoff_ms: Option<u64>,
    /// `Some`: use this NATS server (implies `nats`) instead of `LOOPSYNC_TEST_NATS_URL`.
    pub nats_url: Option<String>,
    /// `Some(n)`: a `user_events` table of `n` rows (event `g` is user `1 + g % rows`'s, at
    /// `now() - (n - g)` minutes) and an event sync `events` over it ([`EVENTS_SYNC`]).
    pub events: Option<usize>,
    /// More `key = value` lines for the `events` sync (`cursor = …`).
    pub events_sync: &'static str,
    /// `Some`: the users sync's model, instead of [`USERS_MODEL`] (a column added by the test).
    pub model: Option<&'static str>,
}

/// The users sync's model, unless [`StackOptions::model`] says another.
pub const USERS_MODEL: &str =
    "select id, email, first_name, plan, seats, signed_up_at, newsletter from users";

/// The event sync of a stack with [`StackOptions::events`]: `{extra}` takes
/// [`StackOptions::events_sync`].
pub const EVENTS_SYNC: &str = r#"
[[sync]]
name = "events"
model = "select event_id, email, event_name, plan, amount, occurred_at from user_events"
primary_key = "event_id"
identify_by = "email"
behavior = "append"
event = { column = "event_name" }
{extra}

[sync.mapping]
email = "email"

[sync.event_properties]
plan = "plan"
amount = { column = "amount", type = "number" }
"#;

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            rows: 40,
            nats: false,
            sqlite: false,
            mysql: false,
            duckdb: false,
            state_on_postgres: false,
            sim_rate_limit: 100,
            requests_per_second: 50,
            ack_wait_seconds: 30.0,
            behavior: "upsert",
            identify_by: "email",
            extra_sync: "",
            max_attempts: 10,
            retry_backoff_ms: None,
            nats_url: None,
            events: None,
            events_sync: "",
            model: None,
        }
    }
}

/// The warehouse of a stack, and a way to run SQL on it directly.
pub enum TestWarehouse {
    Postgres {
        database: TestDatabase,
        client: Box<tokio_postgres::Client>,
    },
    Sqlite {
        path: PathBuf,
    },
    /// The model on MySQL, the state in an SQLite file, or in `state_database`.
    MySql {
        database: TestMySql,
        state: PathBuf,
        state_database: Option<TestDatabase>,
    },
    /// The model in a DuckDB file, the state in an SQLite file.
    DuckDb {
        path: PathBuf,
        state: PathBuf,
    },
}

/// Where a stack's model is: every warehouse loopsync reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
    /// The model on MySQL, the state in SQLite.
    MySql,
    /// The model in a DuckDB file, the state in SQLite (feature `duckdb`).
    DuckDb,
}

impl StackOptions {
    /// These options with the state of a MySQL model in PostgreSQL (`true`) or SQLite.
    pub fn state_on_postgres(self, yes: bool) -> StackOptions {
        StackOptions {
            state_on_postgres: yes,
            ..self
        }
    }

    /// These options with the model on `backend`.
    pub fn on(self, backend: Backend) -> StackOptions {
        StackOptions {
            sqlite: backend == Backend::Sqlite,
            mysql: backend == Backend::MySql,
            duckdb: backend == Backend::DuckDb,
            ..self
        }
    }
}

impl TestWarehouse {
    /// The `warehouse.url` of the config.
    pub fn url(&self) -> String {
        match self {
            TestWarehouse::Postgres { database, .. } => database.url.clone(),
            TestWarehouse::Sqlite { path } => format!("sqlite://{}", path.display()),
            TestWarehouse::MySql { database, .. } => database.url.clone(),
            TestWarehouse::DuckDb { path, .. } => format!("duckdb://{}", path.display()),
        }
    }

    /// The `warehouse.state` of the config, if the state is kept apart.
    pub fn state_url(&self) -> Option<String> {
        match self {
            TestWarehouse::MySql {
                state_database: Some(state),
                ..
            } => Some(state.url.clone()),
            TestWarehouse::MySql { state, .. } | TestWarehouse::DuckDb { state, .. } => {
                Some(format!("sqlite://{}", state.display()))
            }
            _ => None,
        }
    }

    /// A time `hours` after 2024-01-01 00:00 UTC, as an SQL literal of this warehouse.
    pub fn time_literal(&self, hours: i64) -> String {
        time_literal(self.backend(), hours)
    }

    pub fn backend(&self) -> Backend {
        match self {
            TestWarehouse::Postgres { .. } => Backend::Postgres,
            TestWarehouse::Sqlite { .. } => Backend::Sqlite,
            TestWarehouse::MySql { .. } => Backend::MySql,
            TestWarehouse::DuckDb { .. } => Backend::DuckDb,
        }
    }
}

/// A time `hours` after 2024-01-01 00:00 UTC, as an SQL literal of `backend`.
pub fn time_literal(backend: Backend, hours: i64) -> String {
    match backend {
        Backend::Postgres => {
            format!("timestamptz '2024-01-01 00:00:00+00' + {hours} * interval '1 hour'")
        }
        Backend::Sqlite => {
            let t = hours_after_2024(hours).replace(' ', "T");
            format!("'{t}Z'")
        }
        Backend::MySql | Backend::DuckDb => format!("'{}'", hours_after_2024(hours)),
    }
}

/// `2024-01-01 00:00:00` plus `hours`, as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn hours_after_2024(hours: i64) -> String {
    // Days in 2024's months (a leap year), then 2025's.
    const DAYS: [i64; 24] = [
        31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30,
        31,
    ];
    let (mut day, hour) = (hours / 24, hours % 24);
    let mut month = 0;
    while day >= DAYS[month] {
        day -= DAYS[month];
        month += 1;
    }
    let (year, month) = (2024 + month / 12, month % 12);
    format!("{year}-{:02}-{:02} {hour:02}:00:00", month + 1, day + 1)
}

/// `minutes` before now, as an SQL expression of `backend` for a column of the stack's tables
/// (on MySQL and DuckDB a `datetime`, read as UTC: the UTC time, computed here, so that neither
/// server's time zone counts).
pub fn minutes_ago(backend: Backend, minutes: i64) -> String {
    match backend {
        Backend::Postgres => format!("now() - interval '{minutes} minutes'"),
        Backend::Sqlite => {
            format!("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-{minutes} minutes')")
        }
        Backend::MySql | Backend::DuckDb => format!(
            "'{}'",
            (chrono::Utc::now() - chrono::Duration::minutes(minutes)).format("%Y-%m-%d %H:%M:%S")
        ),
    }
}

/// The `users` table of `rows` rows in SQL that MySQL and DuckDB both run (PostgreSQL's
/// `USERS_PG` row for row).
fn users_portable(rows: usize) -> String {
    let mut sql = "CREATE TABLE users (id bigint, email varchar(255), first_name varchar(255), \
                   plan varchar(32), seats integer, signed_up_at datetime, newsletter boolean);"
        .to_owned();
    let values: Vec<String> = (1..=rows as i64)
        .map(|g| {
            format!(
                "({g}, 'user{g}@example.com', 'First{g}', '{}', {}, '{}', {})",
                ["free", "pro", "team"][(g % 3) as usize],
                g % 7,
                hours_after_2024(g),
                g % 2 == 0
            )
        })
        .collect();
    for chunk in values.chunks(1000) {
        sql.push_str(&format!("INSERT INTO users VALUES {};", chunk.join(", ")));
    }
    sql
}

/// The `user_events` table of `events` rows over `users` users in SQL that MySQL and DuckDB
/// both run (`EVENTS_PG` row for row; the times computed here, see [`minutes_ago`]).
fn events_portable(backend: Backend, users: usize, events: usize) -> String {
    let mut sql = "CREATE TABLE user_events (event_id bigint, email varchar(255), \
                   event_name varchar(64), plan varchar(32), amount double, occurred_at datetime);"
        .to_owned();
    let values: Vec<String> = (1..=events as i64)
        .map(|g| {
            format!(
                "({g}, 'user{}@example.com', '{}', '{}', {}, {})",
                1 + g % users as i64,
                ["trialStarted", "invoicePaid"][(g % 2) as usize],
                ["free", "pro", "team"][(g % 3) as usize],
                g as f64 * 1.5,
                minutes_ago(backend, events as i64 - g)
            )
        })
        .collect();
    for chunk in values.chunks(1000) {
        sql.push_str(&format!(
            "INSERT INTO user_events VALUES {};",
            chunk.join(", ")
        ));
    }
    sql
}

/// A fresh warehouse with a `users` table, a `loopsync sim` process and a config file for
/// them: everything `loopsync run` needs, on loopback. On drop the database and the NATS
/// namespace are dropped and the folder removed.
pub struct Stack {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub warehouse: TestWarehouse,
    pub sim: SimProcess,
    /// The NATS namespace, when the stack runs over NATS.
    pub nats: Option<TestNamespace>,
}

/// What `loopsync run --once --json` printed and returned.
#[derive(Debug)]
pub struct RunOutput {
    pub status: i32,
    pub runs: serde_json::Value,
    pub stderr: String,
}

impl RunOutput {
    /// The first run's report; fails the test, with what loopsync said, when there is none.
    pub fn run(&self) -> &serde_json::Value {
        assert!(
            self.runs.is_array(),
            "loopsync run printed no report (exit {}): {}",
            self.status,
            self.stderr
        );
        &self.runs[0]
    }
}

/// A `loopsync worker` process, killed on drop. Its stderr is collected, to be shown when a
/// test fails.
pub struct Worker {
    pub child: tokio::process::Child,
    stderr: tokio::task::JoinHandle<Vec<u8>>,
}

impl Worker {
    /// SIGKILL: the worker dies mid-work, as a crashed host would. Returns once it is gone.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Kills the worker and returns what it wrote on stderr.
    pub async fn stderr(mut self) -> String {
        self.kill().await;
        let stderr = std::mem::replace(&mut self.stderr, tokio::spawn(async { Vec::new() }));
        String::from_utf8_lossy(&stderr.await.unwrap_or_default()).into_owned()
    }
}

const USERS_PG: &str =
    "CREATE TABLE users (id bigint, email text, first_name text, plan text, seats integer,
                                 signed_up_at timestamptz, newsletter boolean);
             INSERT INTO users
             SELECT g, 'user' || g || '@example.com', 'First' || g,
                    (ARRAY['free', 'pro', 'team'])[1 + g % 3], g % 7,
                    timestamptz '2024-01-01 00:00:00+00' + g * interval '1 hour', g % 2 = 0
               FROM generate_series(1, {rows}) AS g;";

const EVENTS_PG: &str = "CREATE TABLE user_events (event_id bigint, email text, event_name text,
                                      plan text, amount numeric, occurred_at timestamptz);
             CREATE INDEX user_events_occurred_at ON user_events (occurred_at);
             INSERT INTO user_events
             SELECT g, 'user' || (1 + g % {rows}) || '@example.com',
                    (ARRAY['trialStarted', 'invoicePaid'])[1 + g % 2],
                    (ARRAY['free', 'pro', 'team'])[1 + g % 3], g * 1.5,
                    now() - ({events} - g) * interval '1 minute'
               FROM generate_series(1, {events}) AS g;";

const EVENTS_SQLITE: &str =
    "CREATE TABLE user_events (event_id INTEGER, email TEXT, event_name TEXT,
                                      plan TEXT, amount REAL, occurred_at TEXT);
             WITH RECURSIVE g(n) AS (SELECT 1 WHERE {events} > 0
                                     UNION ALL SELECT n + 1 FROM g WHERE n < {events})
             INSERT INTO user_events
             SELECT n, 'user' || (1 + n % {rows}) || '@example.com',
                    CASE n % 2 WHEN 0 THEN 'trialStarted' ELSE 'invoicePaid' END,
                    CASE n % 3 WHEN 0 THEN 'free' WHEN 1 THEN 'pro' ELSE 'team' END, n * 1.5,
                    strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || ({events} - n) || ' minutes')
               FROM g;";

const USERS_SQLITE: &str = "CREATE TABLE users (id INTEGER, email TEXT, first_name TEXT, plan TEXT,
                                 seats INTEGER, signed_up_at TEXT, newsletter BOOLEAN);
             WITH RECURSIVE g(n) AS (SELECT 1 WHERE {rows} > 0
                                     UNION ALL SELECT n + 1 FROM g WHERE n < {rows})
             INSERT INTO users
             SELECT n, 'user' || n || '@example.com', 'First' || n,
                    CASE n % 3 WHEN 0 THEN 'free' WHEN 1 THEN 'pro' ELSE 'team' END, n % 7,
                    strftime('%Y-%m-%dT%H:%M:%SZ', '2024-01-01 00:00:00', '+' || n || ' hours'),
                    n % 2 = 0
               FROM g;";

impl Stack {
    /// `None` when a service the stack needs is not configured and skipping was asked for.
    pub async fn start(options: StackOptions) -> Option<Stack> {
        if options.duckdb && !services::duckdb_built() {
            return None;
        }
        let nats = match &options.nats_url {
            Some(url) => Some(TestNamespace::on(url, "e2e")),
            None if options.nats => Some(TestNamespace::create("e2e")?),
            None => None,
        };
        let dir = std::env::temp_dir().join(unique("loopsync-e2e-"));
        std::fs::create_dir_all(&dir).expect("create the test folder");
        let warehouse = if options.duckdb {
            let path = dir.join("warehouse.duckdb");
            duckdb_exec(&path, &users_portable(options.rows));
            if let Some(events) = options.events {
                duckdb_exec(
                    &path,
                    &events_portable(Backend::DuckDb, options.rows.max(1), events),
                );
            }
            TestWarehouse::DuckDb {
                path,
                state: dir.join("state.db"),
            }
        } else if options.mysql {
            let database = TestMySql::create().await?;
            database.exec(&users_portable(options.rows)).await;
            if let Some(events) = options.events {
                database
                    .exec(&events_portable(
                        Backend::MySql,
                        options.rows.max(1),
                        events,
                    ))
                    .await;
            }
            let state_database = if options.state_on_postgres {
                Some(TestDatabase::create().await?)
            } else {
                None
            };
            TestWarehouse::MySql {
                database,
                state: dir.join("state.db"),
                state_database,
            }
        } else if options.sqlite {
            let path = dir.join("warehouse.db");
            sqlite_exec(
                &path,
                &USERS_SQLITE.replace("{rows}", &options.rows.to_string()),
            );
            if let Some(events) = options.events {
                sqlite_exec(
                    &path,
                    &EVENTS_SQLITE
                        .replace("{rows}", &options.rows.max(1).to_string())
                        .replace("{events}", &events.to_string()),
                );
            }
            TestWarehouse::Sqlite { path }
        } else {
            let database = TestDatabase::create().await?;
            let (client, connection) =
                tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
                    .await
                    .expect("connect to the test database");
            tokio::spawn(connection);
            client
                .batch_execute(&USERS_PG.replace("{rows}", &options.rows.to_string()))
                .await
                .expect("create the users table");
            if let Some(events) = options.events {
                client
                    .batch_execute(
                        &EVENTS_PG
                            .replace("{rows}", &options.rows.max(1).to_string())
                            .replace("{events}", &events.to_string()),
                    )
                    .await
                    .expect("create the user_events table");
            }
            TestWarehouse::Postgres {
                database,
                client: Box::new(client),
            }
        };
        let sim = SimProcess::start(&[
            "--rate-limit",
            &options.sim_rate_limit.to_string(),
            "--list",
            "cm_news=Newsletter",
        ]);
        let nats_section = nats
            .as_ref()
            .map(|ns| {
                // Queues of 64 MiB: JetStream reserves each stream's limit of its store, and
                // many tests share one server.
                format!(
                    "[nats]\nurl = \"{}\"\nnamespace = \"{}\"\nack_wait_seconds = {}\n\
                     max_queue_bytes = 67108864\n",
                    ns.url, ns.namespace, options.ack_wait_seconds
                )
            })
            .unwrap_or_default();
        let config_text = format!(
            r#"[warehouse]
url = "{url}"
{state}

[loops]
api_key = "${{LOOPS_API_KEY}}"
base_url = "{api}"
requests_per_second = {rps}
max_attempts = {max_attempts}
{retry_backoff}
{nats_section}
[[sync]]
name = "users"
model = "{model}"
primary_key = "id"
identify_by = "{identify_by}"
behavior = "{behavior}"
{extra_sync}

[sync.mapping]
email = "email"
{user_id}firstName = "first_name"
planName = "plan"
seats = {{ column = "seats", type = "number" }}
signedUpAt = {{ column = "signed_up_at", type = "date" }}

[sync.mailing_lists]
"cm_news" = "newsletter"
{events_sync}"#,
            url = warehouse.url(),
            state = warehouse
                .state_url()
                .map(|s| format!("state = \"{s}\""))
                .unwrap_or_default(),
            api = sim.api(),
            rps = options.requests_per_second,
            identify_by = options.identify_by,
            max_attempts = options.max_attempts,
            retry_backoff = options
                .retry_backoff_ms
                .map(|ms| format!("retry_backoff_ms = {ms}\n"))
                .unwrap_or_default(),
            behavior = options.behavior,
            extra_sync = options.extra_sync,
            model = options.model.unwrap_or(USERS_MODEL),
            events_sync = if options.events.is_some() {
                EVENTS_SYNC.replace("{extra}", options.events_sync)
            } else {
                String::new()
            },
            user_id = if options.identify_by == "userId" {
                "userId = \"id\"\n"
            } else {
                ""
            },
        );
        let config = dir.join("loopsync.toml");
        std::fs::write(&config, config_text).expect("write the config");
        Some(Stack {
            dir,
            config,
            warehouse,
            sim,
            nats,
        })
    }

    /// The PostgreSQL client of the stack's database (the test fails on an SQLite stack).
    pub fn pg(&self) -> &tokio_postgres::Client {
        match &self.warehouse {
            TestWarehouse::Postgres { client, .. } => client,
            _ => panic!("this stack's warehouse is not PostgreSQL"),
        }
    }

    /// A `loopsync` command with this stack's config and key.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(loopsync_bin());
        command
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("LOOPS_API_KEY", "test-key")
            .kill_on_drop(true);
        command
    }

    /// `loopsync ARGS…` to its end, within [`COMMAND_DEADLINE`].
    pub async fn output(&self, args: &[&str]) -> std::process::Output {
        output_within(
            &mut self.command(args),
            COMMAND_DEADLINE,
            &format!("loopsync {}", args.join(" ")),
        )
        .await
    }

    /// A stack whose first run dead-letters every record: the simulated Loops answers every
    /// contact write (`PUT /v1/contacts/update`) 503, and keeps doing so until its faults are
    /// cleared (`sim_post("faults", json!({}))`); each record is given up after
    /// `options.max_attempts`. Returns the stack and that run, checked to have exited 3
    /// (degraded). `None` when a service the stack needs is not configured and skipping was
    /// asked for.
    pub async fn with_dead_letters(options: StackOptions) -> Option<(Stack, RunOutput)> {
        let stack = Stack::start(options).await?;
        stack
            .sim_post(
                "faults",
                serde_json::json!({"error_503": 1.0, "endpoints": ["PUT /v1/contacts/update"]}),
            )
            .await;
        let run = stack.run_once(&[]).await;
        assert_eq!(
            run.status, 3,
            "dead letters, a degraded run: {}",
            run.stderr
        );
        Some((stack, run))
    }

    /// `loopsync run --once --json ARGS…`, to its end (within [`COMMAND_DEADLINE`]).
    pub async fn run_once(&self, args: &[&str]) -> RunOutput {
        let mut all = vec!["run", "--once", "--json"];
        all.extend_from_slice(args);
        let output = self.output(&all).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        RunOutput {
            status: output.status.code().unwrap_or(-1),
            runs: json_data(stdout.as_bytes()).unwrap_or(serde_json::Value::Null),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `loopsync run --once --json ARGS…`, and what the simulated Loops received meanwhile.
    pub async fn run_seen(&self, args: &[&str]) -> (RunOutput, Seen) {
        let before = self.sim.seen().await;
        let output = self.run_once(args).await;
        let seen = self.sim.seen().await.since(&before);
        (output, seen)
    }

    /// Starts `loopsync worker STAGE` and waits (at most 30 s) until it is ready.
    pub async fn worker(&self, stage: &str) -> Worker {
        use tokio::io::AsyncBufReadExt;
        let mut child = self
            .command(&["worker", stage])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let stderr = process::collect(child.stderr.take());
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            Ok(line) => line.expect("read the worker's first line"),
            Err(_) => None,
        };
        let worker = Worker { child, stderr };
        if !line.as_deref().is_some_and(|l| l.ends_with("ready")) {
            let stderr = worker.stderr().await;
            panic!(
                "worker {stage} did not say ready within 30 s (it said {line:?}); stderr:\n{stderr}"
            );
        }
        // Drain the rest of stdout, so the worker never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        worker
    }

    /// Runs SQL on the stack's warehouse.
    pub async fn sql(&self, sql: &str) {
        match &self.warehouse {
            TestWarehouse::Postgres { client, .. } => {
                client.batch_execute(sql).await.expect("test SQL")
            }
            TestWarehouse::Sqlite { path } => sqlite_exec(path, sql),
            TestWarehouse::MySql { database, .. } => database.exec(sql).await,
            TestWarehouse::DuckDb { path, .. } => duckdb_exec(path, sql),
        }
    }

    /// One text value from the warehouse (`loopsync.x` names a state table on both backends).
    pub async fn text(&self, sql: &str) -> String {
        match &self.warehouse {
            TestWarehouse::Postgres { client, .. } => {
                client.query_one(sql, &[]).await.expect("text query").get(0)
            }
            TestWarehouse::Sqlite { path } => sqlite_text(path, sql),
            TestWarehouse::MySql { state, .. } | TestWarehouse::DuckDb { state, .. } => {
                sqlite_text(state, sql)
            }
        }
    }

    /// A count from the warehouse (`loopsync.x` names a state table on both backends).
    pub async fn count(&self, sql: &str) -> i64 {
        match &self.warehouse {
            TestWarehouse::Postgres { client, .. } => client
                .query_one(sql, &[])
                .await
                .expect("count query")
                .get(0),
            TestWarehouse::Sqlite { path } => sqlite_count(path, sql),
            // The state's tables are in the state store; the rest on MySQL.
            TestWarehouse::MySql {
                state_database: Some(state),
                ..
            } if sql.contains("loopsync.") => {
                let (client, connection) =
                    tokio_postgres::connect(&state.url, tokio_postgres::NoTls)
                        .await
                        .expect("connect to the state's database");
                tokio::spawn(connection);
                client
                    .query_one(sql, &[])
                    .await
                    .expect("count query")
                    .get(0)
            }
            TestWarehouse::MySql { state, .. } | TestWarehouse::DuckDb { state, .. }
                if sql.contains("loopsync.") =>
            {
                sqlite_count(state, sql)
            }
            TestWarehouse::MySql { database, .. } => database.count(sql).await,
            TestWarehouse::DuckDb { path, .. } => duckdb_count(path, sql),
        }
    }

    /// Requests that reached `PUT /v1/contacts/update`, whatever their answer.
    pub async fn update_requests(&self) -> u64 {
        self.sim.requests_to("PUT /v1/contacts/update").await
    }

    /// Waits until the simulator holds a request up ([`SimProcess::until_held_up`]).
    pub async fn until_held_up(&self) {
        self.sim.until_held_up().await
    }

    /// Requests that reached one endpoint (`"POST /v1/events/send"`), whatever their answer.
    pub async fn requests_to(&self, endpoint: &str) -> u64 {
        self.sim.requests_to(endpoint).await
    }

    /// Worker mode with a loader killed mid-run: starts an extractor, a transformer and a
    /// loader, requests a run (`run --once --remote --json`), SIGKILLs the loader once
    /// `endpoint` has seen `after` requests, starts another loader, and waits for the run.
    /// Returns the runner's output and the requests counted at the kill.
    pub async fn run_killing_the_loader(
        &self,
        endpoint: &str,
        after: u64,
    ) -> (std::process::Output, u64) {
        let _extractor = self.worker("extractor").await;
        let _transformer = self.worker("transformer").await;
        let mut loader = self.worker("loader").await;
        let mut command = self.command(&["run", "--once", "--remote", "--json"]);
        let runner = tokio::spawn(async move {
            output_within(
                &mut command,
                COMMAND_DEADLINE,
                "loopsync run --once --remote",
            )
            .await
        });
        until(
            Duration::from_secs(30),
            "the loader sends its first requests",
            || async {
                let n = self.requests_to(endpoint).await;
                if n >= after {
                    Ok(())
                } else {
                    Err(format!("{n} requests to {endpoint}"))
                }
            },
        )
        .await;
        loader.kill().await;
        let at_kill = self.requests_to(endpoint).await;
        let _replacement = self.worker("loader").await;
        let output = runner.await.expect("the runner task");
        assert_eq!(
            output.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        (output, at_kill)
    }

    /// Calls the simulator's Loops API directly (as someone else using the same team would).
    pub async fn loops(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        http_client()
            .request(method, format!("{}{path}", self.sim.api()))
            .bearer_auth("test-key")
            .json(&body)
            .send()
            .await
            .expect("a simulator request")
            .json()
            .await
            .unwrap_or(serde_json::Value::Null)
    }

    /// `POST /_sim/<what>` with a JSON body.
    pub async fn sim_post(&self, what: &str, body: serde_json::Value) {
        self.sim.post(what, body).await
    }

    /// Workflow triggers of one kind in the simulator's log.
    pub async fn workflows(&self, kind: &str) -> usize {
        self.sim.workflows(kind).await
    }

    /// The simulator's contacts, by email, without their Loops ids.
    pub async fn contacts(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        self.sim.contacts().await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens a DuckDB file for writing, waiting out a loopsync process that has it open (DuckDB
/// lets one process at a time open a file for writing).
#[cfg(feature = "duckdb")]
fn duckdb_open(path: &std::path::Path) -> duckdb::Connection {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match duckdb::Connection::open(path) {
            Ok(c) => return c,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("waiting for the DuckDB file: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("open the DuckDB warehouse: {e}"),
        }
    }
}

#[cfg(feature = "duckdb")]
fn duckdb_exec(path: &std::path::Path, sql: &str) {
    duckdb_open(path)
        .execute_batch(sql)
        .unwrap_or_else(|e| panic!("test SQL on DuckDB: {e}\n{sql}"));
}

#[cfg(feature = "duckdb")]
fn duckdb_count(path: &std::path::Path, sql: &str) -> i64 {
    duckdb_open(path)
        .query_row(sql, [], |row| row.get(0))
        .expect("count query on DuckDB")
}

#[cfg(not(feature = "duckdb"))]
fn duckdb_exec(_: &std::path::Path, _: &str) {
    panic!("DuckDB stacks need the `duckdb` feature");
}

#[cfg(not(feature = "duckdb"))]
fn duckdb_count(_: &std::path::Path, _: &str) -> i64 {
    panic!("DuckDB stacks need the `duckdb` feature");
}

fn sqlite_exec(path: &std::path::Path, sql: &str) {
    let db = rusqlite::Connection::open(path).expect("open the SQLite warehouse");
    db.execute_batch(&sqlite_names(sql))
        .expect("test SQL on SQLite");
}

/// SQLite has no schemas: the state's tables are `loopsync_state`, … where PostgreSQL has
/// `loopsync.state`, …; tests write the PostgreSQL names.
fn sqlite_names(sql: &str) -> String {
    sql.replace("loopsync.", "loopsync_")
}

fn sqlite_text(path: &std::path::Path, sql: &str) -> String {
    let db = rusqlite::Connection::open(path).expect("open the SQLite warehouse");
    db.query_row(&sqlite_names(sql), [], |row| row.get(0))
        .expect("text query on SQLite")
}

fn sqlite_count(path: &std::path::Path, sql: &str) -> i64 {
    let db = rusqlite::Connection::open(path).expect("open the SQLite warehouse");
    db.query_row(&sqlite_names(sql), [], |row| row.get(0))
        .expect("count query on SQLite")
}

/// Sends SIGTERM to the process `child` (a run that waits, a worker): what systemd, Kubernetes
/// or a terminal's Ctrl-C send. Fails the test if the signal cannot be sent.
pub async fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("the process's pid").to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(sent.success(), "kill -TERM {pid}");
}

/// A generated history's seed: `LOOPSYNC_HISTORY_SEED` when set; else, with
/// `LOOPSYNC_HISTORY_COMMIT` (a commit id, which `scripts/test.sh` sets), the number its first
/// eight hex digits write — each commit draws new histories, and a run of one commit is the
/// same run again (a failure in CI replays at home); else a fresh one. Printed either way with
/// the command that replays `test` (a test target of `loopsync-e2e`).
pub fn history_seed(test: &str) -> u64 {
    let from_commit = || {
        let commit = std::env::var("LOOPSYNC_HISTORY_COMMIT").ok()?;
        u32::from_str_radix(commit.get(..8)?, 16)
            .ok()
            .map(u64::from)
    };
    let (seed, whence) = match std::env::var("LOOPSYNC_HISTORY_SEED") {
        Ok(s) => (
            s.parse().expect("LOOPSYNC_HISTORY_SEED is a number"),
            "LOOPSYNC_HISTORY_SEED",
        ),
        Err(_) => match from_commit() {
            Some(seed) => (seed, "the commit's"),
            None => (rand::random::<u32>() as u64, "fresh"),
        },
    };
    eprintln!(
        "history seed {seed} ({whence}): replay with LOOPSYNC_HISTORY_SEED={seed} cargo test -p loopsync-e2e --test e2e {test}::"
    );
    seed
}
