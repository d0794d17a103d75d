//! Test helpers. Tests run against real services, never mocks: NATS and PostgreSQL are found
//! through `LOOPSYNC_TEST_NATS_URL` and `LOOPSYNC_TEST_PG_URL` (`scripts/test.sh` starts
//! throwaway ones and sets them). Without them a test that needs one says so and passes as
//! skipped — except under CI (`CI` set), where a missing service fails the test.

pub mod nats;

use std::sync::atomic::{AtomicU32, Ordering};

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

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

/// A `loopsync sim` process on a free loopback port, killed on drop.
pub struct SimProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub root: String,
}

impl SimProcess {
    /// Starts `loopsync sim --port 0 ARGS…` and waits for its address line.
    pub fn start(args: &[&str]) -> SimProcess {
        let mut child = Command::new(loopsync_bin())
            .args(["sim", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start loopsync sim");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the address line");
        let root = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .and_then(|url| url.strip_suffix("/api"))
            .unwrap_or_else(|| panic!("unexpected first line from loopsync sim: {line:?}"))
            .to_owned();
        SimProcess { child, root }
    }

    /// The API root: `http://127.0.0.1:PORT/api`.
    pub fn api(&self) -> String {
        format!("{}/api", self.root)
    }

    /// GET `/_sim/<what>` as JSON.
    pub async fn inspect(&self, what: &str) -> serde_json::Value {
        http_client()
            .get(format!("{}/_sim/{what}", self.root))
            .send()
            .await
            .expect("inspection request")
            .json()
            .await
            .expect("inspection JSON")
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn service(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{var} is not set: under CI every service must be provided (scripts/test.sh does)"
            );
            eprintln!("skipped: {var} is not set (scripts/test.sh sets it)");
            None
        }
    }
}

/// The NATS server to test against, if any.
pub fn nats_url() -> Option<String> {
    service("LOOPSYNC_TEST_NATS_URL")
}

/// The PostgreSQL server to test against (a URL to a database the tests may create databases
/// from), if any.
pub fn pg_url() -> Option<String> {
    service("LOOPSYNC_TEST_PG_URL")
}

/// A name no other test of this run uses: `prefix` + process id + counter.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates an empty database on the test server and returns its URL.
pub async fn fresh_pg_database() -> Option<String> {
    let base = pg_url()?;
    let (client, connection) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(connection);
    let name = unique("loopsync_t");
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    Some(with_database(&base, &name))
}

/// `base` with its database replaced by `name`.
pub fn with_database(base: &str, name: &str) -> String {
    let (before_query, query) = match base.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (base, String::new()),
    };
    let scheme_end = before_query.find("://").map_or(0, |i| i + 3);
    let host_part = match before_query[scheme_end..].find('/') {
        Some(i) => &before_query[..scheme_end + i],
        None => before_query,
    };
    format!("{host_part}/{name}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_in_url_is_replaced() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/test", "x"),
            "postgres://u@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:1/test?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_ne!(unique("a"), unique("a"));
    }
}

/// What an end-to-end [`Stack`] is made of.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Rows of the `users` table at start.
    pub rows: usize,
    /// Use NATS (a namespace of its own) instead of the in-process bus.
    pub nats: bool,
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
    /// `Some`: use this NATS server (implies `nats`) instead of `LOOPSYNC_TEST_NATS_URL`.
    pub nats_url: Option<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            rows: 40,
            nats: false,
            sim_rate_limit: 100,
            requests_per_second: 50,
            ack_wait_seconds: 30.0,
            behavior: "upsert",
            identify_by: "email",
            extra_sync: "",
            max_attempts: 10,
            nats_url: None,
        }
    }
}

/// A fresh PostgreSQL database with a `users` table, a `loopsync sim` process and a config file
/// for them: everything `loopsync run` needs, on loopback.
pub struct Stack {
    pub dir: std::path::PathBuf,
    pub config: std::path::PathBuf,
    pub pg_url: String,
    pub pg: tokio_postgres::Client,
    pub sim: SimProcess,
    pub namespace: String,
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

/// A `loopsync worker` process, killed on drop.
pub struct Worker {
    pub child: tokio::process::Child,
}

impl Worker {
    /// SIGKILL: the worker dies mid-work, as a crashed host would.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

impl Stack {
    /// `None` when PostgreSQL (or NATS, if asked for) is not available outside CI.
    pub async fn start(options: StackOptions) -> Option<Stack> {
        let nats_url = match &options.nats_url {
            Some(url) => Some(url.clone()),
            None if options.nats => Some(nats_url()?),
            None => None,
        };
        let pg_url = fresh_pg_database().await?;
        let (pg, connection) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        pg.batch_execute(&format!(
            "CREATE TABLE users (id bigint, email text, first_name text, plan text, seats integer,
                                 signed_up_at timestamptz, newsletter boolean);
             INSERT INTO users
             SELECT g, 'user' || g || '@example.com', 'First' || g,
                    (ARRAY['free', 'pro', 'team'])[1 + g % 3], g % 7,
                    timestamptz '2024-01-01 00:00:00+00' + g * interval '1 hour', g % 2 = 0
               FROM generate_series(1, {}) AS g;",
            options.rows
        ))
        .await
        .expect("create the users table");
        let sim = SimProcess::start(&[
            "--rate-limit",
            &options.sim_rate_limit.to_string(),
            "--list",
            "cm_news=Newsletter",
        ]);
        let namespace = unique("e2e");
        let dir = std::env::temp_dir().join(unique("loopsync-e2e-"));
        std::fs::create_dir_all(&dir).expect("create the test folder");
        let nats = nats_url
            .map(|url| {
                format!(
                    "[nats]\nurl = \"{url}\"\nnamespace = \"{namespace}\"\nack_wait_seconds = {}\n",
                    options.ack_wait_seconds
                )
            })
            .unwrap_or_default();
        let config_text = format!(
            r#"[warehouse]
url = "{pg_url}"

[loops]
api_key = "${{LOOPS_API_KEY}}"
base_url = "{api}"
requests_per_second = {rps}
max_attempts = {max_attempts}

{nats}
[[sync]]
name = "users"
model = "select id, email, first_name, plan, seats, signed_up_at, newsletter from users"
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
"#,
            api = sim.api(),
            rps = options.requests_per_second,
            identify_by = options.identify_by,
            max_attempts = options.max_attempts,
            behavior = options.behavior,
            extra_sync = options.extra_sync,
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
            pg_url,
            pg,
            sim,
            namespace,
        })
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

    /// `loopsync run --once --json ARGS…`, to its end.
    pub async fn run_once(&self, args: &[&str]) -> RunOutput {
        let mut all = vec!["run", "--once", "--json"];
        all.extend_from_slice(args);
        let output = self.command(&all).output().await.expect("run loopsync");
        let stdout = String::from_utf8_lossy(&output.stdout);
        RunOutput {
            status: output.status.code().unwrap_or(-1),
            runs: serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Starts `loopsync worker STAGE` and waits until it is ready.
    pub async fn worker(&self, stage: &str) -> Worker {
        use tokio::io::AsyncBufReadExt;
        let mut child = self
            .command(&["worker", stage])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("the worker is ready in time")
            .expect("read the worker's first line")
            .unwrap_or_default();
        assert!(
            line.ends_with("ready"),
            "unexpected first line from the worker: {line:?}"
        );
        Worker { child }
    }

    pub async fn sql(&self, sql: &str) {
        self.pg.batch_execute(sql).await.expect("test SQL");
    }

    /// A count from the warehouse.
    pub async fn count(&self, sql: &str) -> i64 {
        self.pg
            .query_one(sql, &[])
            .await
            .expect("count query")
            .get(0)
    }

    /// Requests that reached `PUT /v1/contacts/update`, whatever their answer.
    pub async fn update_requests(&self) -> u64 {
        self.requests_to("PUT /v1/contacts/update").await
    }

    /// Requests that reached one endpoint (`"POST /v1/events/send"`), whatever their answer.
    pub async fn requests_to(&self, endpoint: &str) -> u64 {
        let stats = self.sim.inspect("stats").await;
        stats["by_endpoint"][endpoint]
            .as_object()
            .map_or(0, |by_status| {
                by_status.values().filter_map(|n| n.as_u64()).sum()
            })
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
        use std::time::Duration;
        let _extractor = self.worker("extractor").await;
        let _transformer = self.worker("transformer").await;
        let mut loader = self.worker("loader").await;
        let runner = tokio::spawn(
            self.command(&["run", "--once", "--remote", "--json"])
                .output(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.requests_to(endpoint).await < after {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the loader made no progress"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        loader.kill().await;
        let at_kill = self.requests_to(endpoint).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _replacement = self.worker("loader").await;
        let output = tokio::time::timeout(Duration::from_secs(60), runner)
            .await
            .expect("the run finished in time")
            .expect("the runner task")
            .expect("the runner process");
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
        let response = http_client()
            .post(format!("{}/_sim/{what}", self.sim.root))
            .json(&body)
            .send()
            .await
            .expect("a simulator request");
        assert!(
            response.status().is_success(),
            "/_sim/{what}: {}",
            response.status()
        );
    }

    /// Workflow triggers of one kind in the simulator's log.
    pub async fn workflows(&self, kind: &str) -> usize {
        let log = self.sim.inspect("workflows").await;
        log.as_array()
            .expect("a workflow array")
            .iter()
            .filter(|w| w["kind"] == kind)
            .count()
    }

    /// The simulator's contacts, by email, without their Loops ids.
    pub async fn contacts(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        let contacts = self.sim.inspect("contacts").await;
        contacts
            .as_array()
            .expect("a contact array")
            .iter()
            .map(|c| {
                let mut c = c.clone();
                c.as_object_mut().expect("a contact object").remove("id");
                (c["email"].as_str().expect("an email").to_owned(), c)
            })
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
