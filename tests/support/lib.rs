//! Helpers for the end-to-end tests: start the real `loopsync` binary (and, later, the services it
//! talks to) on loopback, and stop them when the test ends.

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
