//! A real browser for the tests of the status page: Debian's headless Chromium, driven through
//! its WebDriver server, `chromedriver` (`scripts/services.sh` installs both when missing).
//!
//! `LOOPSYNC_TEST_CHROMIUM` and `LOOPSYNC_TEST_CHROMEDRIVER` name the binaries, else `chromium`
//! and `chromedriver` are looked for on `PATH`. As for a missing service, a missing browser is
//! a failure, or a logged skip under `LOOPSYNC_SKIP_SERVICES=1` (see [`crate::services`]).
//! [`ChromeDriver`] runs in a process group of its own, killed whole on drop, so a test that
//! fails half-way leaves no browser behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A `chromedriver` on a free loopback port, with the Chromium it starts.
pub struct ChromeDriver {
    child: tokio::process::Child,
    /// The WebDriver server's URL (`http://127.0.0.1:PORT`).
    pub url: String,
    chromium: PathBuf,
    dir: PathBuf,
}

/// The binary named by `var`, else `name` found on `PATH`.
fn binary(var: &str, name: &str) -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os(var).filter(|b| !b.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl ChromeDriver {
    /// Starts `chromedriver` and waits (at most 20 s) until it answers. `None` when Chromium or
    /// its driver is missing and skipping was asked for.
    pub async fn start() -> Option<ChromeDriver> {
        let chromium = binary("LOOPSYNC_TEST_CHROMIUM", "chromium");
        let driver = binary("LOOPSYNC_TEST_CHROMEDRIVER", "chromedriver");
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let what = "LOOPSYNC_TEST_CHROMIUM and LOOPSYNC_TEST_CHROMEDRIVER (or chromium and \
                        chromedriver on PATH)";
            assert!(
                crate::services::skipping_allowed(),
                "{what} are not set, so this test, which drives a real browser, cannot run. \
                 Run scripts/test.sh (it installs Debian's chromium and chromium-driver), or set \
                 {}=1 to skip it",
                crate::services::SKIP_VAR
            );
            crate::services::note_skip(what);
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(crate::unique("loopsync-browser-"));
        std::fs::create_dir_all(&dir).expect("the browser's folder");
        let child = tokio::process::Command::new(&driver)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", driver.display()));
        let driver = ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            chromium,
            dir,
        };
        let status = format!("{}/status", driver.url);
        let client = crate::http_client();
        crate::until(Duration::from_secs(20), "chromedriver answers", || {
            let (client, status) = (client.clone(), status.clone());
            async move {
                match client.get(&status).send().await {
                    Ok(answer) if answer.status().is_success() => Ok(()),
                    Ok(answer) => Err(format!("status {}", answer.status())),
                    Err(e) => Err(e.to_string()),
                }
            }
        })
        .await;
        Some(driver)
    }

    /// The WebDriver capabilities of a headless Chromium with a profile of its own (in this
    /// driver's folder). As root, Chromium runs only without its sandbox.
    pub fn capabilities(&self) -> serde_json::Map<String, serde_json::Value> {
        let profile = self.dir.join("profile");
        let serde_json::Value::Object(capabilities) = serde_json::json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": self.chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--window-size=1280,1600",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }) else {
            unreachable!("an object")
        };
        capabilities
    }
}

/// The process group of process `pid`, from `/proc/PID/stat`.
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp …`; comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(2)?.parse().ok()
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The driver, and every Chromium process it started: its process group, which is its
        // own (checked: a group of another is never signalled). `--` before the negative id:
        // procps-ng 4.0's kill reads `kill -KILL -1234` as group 1, that is every process.
        if let Some(pid) = self.child.id()
            && pid > 1
            && process_group(pid) == Some(pid)
        {
            let _ = std::process::Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process's group is read from `/proc`: this test's own, and a child made the leader of
    /// a group of its own.
    #[test]
    fn the_process_group_is_read_from_proc() {
        let mine = std::process::id();
        assert!(process_group(mine).is_some_and(|g| g > 1));
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        assert_eq!(process_group(pid), Some(pid));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(process_group(u32::MAX), None);
    }
}
