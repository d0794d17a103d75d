//! The Loops simulator as a test sees it: a `loopsync sim` process, and the one place that
//! reads what Loops received (`/_sim/stats`, `/_sim/contacts`, `/_sim/events`,
//! `/_sim/workflows`). Assertions about requests, contacts and events read these, never the
//! product's own report.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{http_client, loopsync_bin};

/// A `loopsync sim` process on a free loopback port, killed on drop.
pub struct SimProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub root: String,
}

impl SimProcess {
    /// Starts `loopsync sim --port 0 ARGS…` and waits (at most 30 s) for its address line.
    pub fn start(args: &[&str]) -> SimProcess {
        SimProcess::start_on(0, args)
    }

    /// Stops this simulator and starts a new one, empty, on the same port with `args`: the
    /// same URL, another Loops (a simulator restarted, say with another `--api-key`).
    pub fn restart(&mut self, args: &[&str]) {
        let port: u16 = self
            .root
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {}", self.root));
        let _ = self.child.kill();
        let _ = self.child.wait();
        let new = SimProcess::start_on(port, args);
        assert_eq!(new.root, self.root, "restarted on the same address");
        // The old process is gone: swapping in the new one, the old handle drops harmlessly.
        *self = new;
    }

    fn start_on(port: u16, args: &[&str]) -> SimProcess {
        let mut child = Command::new(loopsync_bin())
            .args(["sim", "--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start loopsync sim");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining, so the simulator never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("loopsync sim printed no address within 30 s (its stderr is above)");
            }
        };
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

    /// `POST /_sim/<what>` with a JSON body (`faults`, `settings`, `reset`).
    pub async fn post(&self, what: &str, body: serde_json::Value) {
        let response = http_client()
            .post(format!("{}/_sim/{what}", self.root))
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

    /// Waits (at most 60 s) until a request has been held up by the simulator for 300 ms: one
    /// is in flight at two reads 300 ms apart with no answer between them (a request that is
    /// not held up is answered in milliseconds). For a test that must act while a request it
    /// delayed (`latency_ms`) is on its way, rather than sleep and hope it was sent.
    pub async fn until_held_up(&self) {
        let end = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let before = self.inspect("stats").await;
            if before["in_flight"].as_u64().unwrap_or(0) > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let after = self.inspect("stats").await;
                if after["in_flight"].as_u64().unwrap_or(0) > 0
                    && after["total_requests"] == before["total_requests"]
                {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < end,
                "no request held up by the simulator within 60 s: {before}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every request the simulated Loops received so far, by endpoint and answer.
    pub async fn seen(&self) -> Seen {
        Seen::from_stats(&self.inspect("stats").await)
    }

    /// Requests that reached one endpoint (`"PUT /v1/contacts/update"`), whatever their answer.
    pub async fn requests_to(&self, endpoint: &str) -> u64 {
        self.seen().await.to(endpoint)
    }

    /// The contacts, by email, without their Loops ids.
    pub async fn contacts(&self) -> BTreeMap<String, serde_json::Value> {
        let contacts = self.inspect("contacts").await;
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

    /// Every accepted event.
    pub async fn events(&self) -> Vec<serde_json::Value> {
        self.inspect("events")
            .await
            .as_array()
            .expect("an event array")
            .clone()
    }

    /// Workflow triggers of one kind (`contact_added`, `contact_updated`, `added_to_list`,
    /// `event_received`).
    pub async fn workflows(&self, kind: &str) -> usize {
        let log = self.inspect("workflows").await;
        log.as_array()
            .expect("a workflow array")
            .iter()
            .filter(|w| w["kind"] == kind)
            .count()
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The simulator's request counts (`/_sim/stats`): every request that reached the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    pub total: u64,
    pub rate_limited: u64,
    /// `"PUT /v1/contacts/update"` → answer (`"200"`, `"503"`, … or `"dropped"` for a
    /// connection dropped by a fault) → count.
    pub by_endpoint: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Seen {
    pub fn from_stats(stats: &serde_json::Value) -> Seen {
        let by_endpoint = stats["by_endpoint"]
            .as_object()
            .map(|endpoints| {
                endpoints
                    .iter()
                    .map(|(endpoint, statuses)| {
                        let statuses = statuses
                            .as_object()
                            .map(|s| {
                                s.iter()
                                    .filter_map(|(answer, n)| Some((answer.clone(), n.as_u64()?)))
                                    .collect()
                            })
                            .unwrap_or_default();
                        (endpoint.clone(), statuses)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Seen {
            total: stats["total_requests"].as_u64().unwrap_or(0),
            rate_limited: stats["rate_limited"].as_u64().unwrap_or(0),
            by_endpoint,
        }
    }

    /// Requests to `endpoint`, whatever their answer.
    pub fn to(&self, endpoint: &str) -> u64 {
        self.by_endpoint
            .get(endpoint)
            .map_or(0, |statuses| statuses.values().sum())
    }

    /// Requests to `endpoint` answered `status`.
    pub fn answered(&self, endpoint: &str, status: u16) -> u64 {
        self.answers(endpoint, &status.to_string())
    }

    /// Requests to `endpoint` whose connection a fault dropped.
    pub fn dropped(&self, endpoint: &str) -> u64 {
        self.answers(endpoint, "dropped")
    }

    fn answers(&self, endpoint: &str, answer: &str) -> u64 {
        self.by_endpoint
            .get(endpoint)
            .and_then(|answers| answers.get(answer))
            .copied()
            .unwrap_or(0)
    }

    /// Requests that change contacts or send events: every endpoint but the reads and the
    /// property set-up (`GET …`, `POST /v1/contacts/properties`): what a sync's records cost.
    pub fn writes(&self) -> u64 {
        self.by_endpoint
            .iter()
            .filter(|(endpoint, _)| {
                !endpoint.starts_with("GET ") && endpoint.as_str() != "POST /v1/contacts/properties"
            })
            .map(|(_, statuses)| statuses.values().sum::<u64>())
            .sum()
    }

    /// What was received after `earlier` (a snapshot of the same simulator).
    pub fn since(&self, earlier: &Seen) -> Seen {
        let mut by_endpoint = self.by_endpoint.clone();
        for (endpoint, statuses) in &mut by_endpoint {
            for (answer, n) in statuses.iter_mut() {
                *n -= earlier.answers(endpoint, answer);
            }
            statuses.retain(|_, n| *n > 0);
        }
        by_endpoint.retain(|_, statuses| !statuses.is_empty());
        Seen {
            total: self.total - earlier.total,
            rate_limited: self.rate_limited - earlier.rate_limited,
            by_endpoint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_reads_stats_and_subtracts() {
        let before = Seen::from_stats(&serde_json::json!({
            "total_requests": 3, "rate_limited": 1,
            "by_endpoint": {"PUT /v1/contacts/update": {"200": 2, "429": 1}}
        }));
        let after = Seen::from_stats(&serde_json::json!({
            "total_requests": 7, "rate_limited": 1,
            "by_endpoint": {"PUT /v1/contacts/update": {"200": 4, "429": 1, "dropped": 1},
                            "POST /v1/contacts/delete": {"404": 1}}
        }));
        let run = after.since(&before);
        assert_eq!(run.total, 4);
        assert_eq!(run.rate_limited, 0);
        assert_eq!(run.to("PUT /v1/contacts/update"), 3);
        assert_eq!(run.dropped("PUT /v1/contacts/update"), 1);
        assert_eq!(run.answered("POST /v1/contacts/delete", 404), 1);
        assert_eq!(run.answered("PUT /v1/contacts/update", 429), 0);
        assert_eq!(before.to("GET /v1/api-key"), 0);
        assert_eq!(run.writes(), 4);
        let preflight = Seen::from_stats(&serde_json::json!({
            "total_requests": 3, "rate_limited": 0,
            "by_endpoint": {"GET /v1/contacts/properties": {"200": 1},
                            "POST /v1/contacts/properties": {"200": 1},
                            "POST /v1/events/send": {"409": 1}}
        }));
        assert_eq!(preflight.writes(), 1);
    }
}
