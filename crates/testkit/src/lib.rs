//! Test helpers. Tests run against real services, never mocks: NATS and PostgreSQL are found
//! through `LOOPSYNC_TEST_NATS_URL` and `LOOPSYNC_TEST_PG_URL` (`scripts/test.sh` starts
//! throwaway ones and sets them). Without them a test that needs one says so and passes as
//! skipped — except under CI (`CI` set), where a missing service fails the test.

use std::sync::atomic::{AtomicU32, Ordering};

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// The `loopsync` binary: `LOOPSYNC_BIN`, else the one cargo built beside this test (built
/// now if missing).
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
        if !bin.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "loopsync", "--bin", "loopsync"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build -p loopsync failed");
        }
        bin
    })
    .clone()
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
