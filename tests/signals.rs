//! Signals: SIGTERM or SIGINT stops any command within 10 s, in any phase, with the state
//! consistent (what was confirmed stays confirmed, nothing is marked confirmed that Loops did not
//! get); a second signal exits at once. The `loopsync` binary against PostgreSQL and the
//! simulator; each test prints the measured time from signal to exit.
//!
//! The tests hold [`serial`]: the phases of a big model are CPU-heavy, and the times they print
//! are measured one test at a time.

use std::process::Stdio;
use std::time::Duration;

use loopsync_testkit::process::collect;
use loopsync_testkit::{Stack, StackOptions, nats_url, serial, until};
use serde_json::{Value, json};
use tokio::time::Instant;

/// PRODUCT.md: a signal stops any command within 10 s.
const PROMISE: Duration = Duration::from_secs(10);

/// Rows of a big model: its diff takes far longer than the promise.
const BIG: usize = 300_000;

/// A `loopsync` process of a test, its output collected as it runs; killed on drop.
struct Running {
    what: String,
    child: tokio::process::Child,
    stdout: tokio::task::JoinHandle<Vec<u8>>,
    stderr: tokio::task::JoinHandle<Vec<u8>>,
}

/// How a stopped process ended.
struct Ended {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

fn start(stack: &Stack, args: &[&str]) -> Running {
    let mut child = stack
        .command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start loopsync");
    Running {
        what: format!("loopsync {}", args.join(" ")),
        stdout: collect(child.stdout.take()),
        stderr: collect(child.stderr.take()),
        child,
    }
}

/// Sends `signal` (`"TERM"`, `"INT"`) to the process.
async fn send(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("the process is running");
    let status = tokio::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

impl Running {
    /// Fails the test (with what it wrote) if the process has already ended: the phase to
    /// interrupt must still be in progress.
    async fn assert_running(&mut self, phase: &str) {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            let stderr =
                String::from_utf8_lossy(&(&mut self.stderr).await.unwrap_or_default()).into_owned();
            panic!(
                "{} ended ({status}) before the signal {phase}:\n{stderr}",
                self.what
            );
        }
    }

    /// Sends `signal` (and, `second` later, another), and waits for the exit within the
    /// promise; prints the measured time.
    async fn stop(mut self, signal: &str, second: Option<Duration>, phase: &str) -> Ended {
        self.assert_running(phase).await;
        let started = Instant::now();
        send(&self.child, signal).await;
        if let Some(after) = second {
            tokio::time::sleep(after).await;
            if self.child.try_wait().expect("try_wait").is_none() {
                send(&self.child, signal).await;
            }
        }
        let status = match tokio::time::timeout(PROMISE, self.child.wait()).await {
            Ok(status) => status.expect("wait for loopsync"),
            Err(_) => {
                let _ = self.child.kill().await;
                let stderr =
                    String::from_utf8_lossy(&self.stderr.await.unwrap_or_default()).into_owned();
                panic!(
                    "{}: still running {PROMISE:?} after SIG{signal} {phase}; killed. stderr:\n{stderr}",
                    self.what
                );
            }
        };
        let elapsed = started.elapsed();
        eprintln!(
            "measured: {} — SIG{signal}{} {phase}: exited ({status}) {:.2} s after the signal",
            self.what,
            if second.is_some() { " twice" } else { "" },
            elapsed.as_secs_f64()
        );
        Ended {
            status: status.code(),
            stdout: String::from_utf8_lossy(&self.stdout.await.unwrap_or_default()).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr.await.unwrap_or_default()).into_owned(),
        }
    }
}

/// The status of the sync's newest run, once there is one.
async fn newest_status(stack: &Stack) -> Option<String> {
    stack
        .pg()
        .query_opt(
            "SELECT status FROM loopsync.runs ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

/// Waits until the newest run has `status`.
async fn until_status(stack: &Stack, status: &str) {
    until(
        Duration::from_secs(60),
        &format!("a run is {status}"),
        || async {
            match newest_status(stack).await {
                Some(s) if s == status => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// Waits until another session of the stack's database runs a query that mentions `text` (a
/// diff runs the model: `from users`).
async fn until_querying(stack: &Stack, text: &str) {
    until(
        Duration::from_secs(60),
        &format!("a query on {text} runs"),
        || async {
            let n: i64 = stack
                .pg()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND state = 'active' AND query LIKE '%' || $1 || '%'",
                    &[&text],
                )
                .await
                .expect("read pg_stat_activity")
                .get(0);
            if n > 0 {
                Ok(())
            } else {
                Err("no such query".into())
            }
        },
    )
    .await;
}

/// Waits until the simulator has a contact: a slow answer's effect comes before it.
async fn until_a_contact(stack: &Stack) {
    until(Duration::from_secs(60), "the loader sends", || async {
        match stack.contacts().await.len() {
            0 => Err("no contact yet".into()),
            _ => Ok(()),
        }
    })
    .await;
}

/// The newest run as `loopsync runs --json` shows it.
async fn newest_run(stack: &Stack) -> Value {
    let out = stack.output(&["runs", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let runs: Value = loopsync_testkit::json_data(&out.stdout).expect("runs --json");
    runs[0].clone()
}

/// The run was closed `interrupted`, saying by which signal.
async fn assert_interrupted(stack: &Stack, signal: &str) -> Value {
    let run = newest_run(stack).await;
    assert_eq!(run["status"], "interrupted", "{run:#}");
    assert_eq!(run["error"], format!("stopped by SIG{signal}"), "{run:#}");
    assert!(run["finished_at"].is_string(), "{run:#}");
    run
}

/// Nothing is marked confirmed that Loops did not get: every confirmed record's email is a
/// contact of the simulator. Returns how many are confirmed.
async fn assert_consistent(stack: &Stack) -> usize {
    let contacts = stack.contacts().await;
    let confirmed: Vec<String> = stack
        .pg()
        .query(
            "SELECT confirmed_email FROM loopsync.state
              WHERE sync = 'users' AND confirmed_fp IS NOT NULL",
            &[],
        )
        .await
        .expect("read the state")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for email in &confirmed {
        assert!(
            contacts.contains_key(email),
            "{email} is confirmed in the state but Loops does not have it"
        );
    }
    confirmed.len()
}

/// Sets a config value (`requests_per_second = 2` → `requests_per_second = 50`).
fn rewrite_config(stack: &Stack, from: &str, to: &str) {
    let text = std::fs::read_to_string(&stack.config).expect("read the config");
    assert!(text.contains(from), "{from} not in the config");
    std::fs::write(&stack.config, text.replace(from, to)).expect("write the config");
}

async fn faults(stack: &Stack, faults: Value) {
    stack.sim_post("faults", faults).await;
}

/// `run --once` stopped while it asks Loops which team its key belongs to (a Loops that does
/// not answer): SIGINT stops it, exit 1, nothing was requested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_stops_during_the_preflight() {
    let _serial = serial().await;
    let Some(stack) = Stack::start(StackOptions::default()).await else {
        return;
    };
    faults(
        &stack,
        json!({"latency_ms": 120_000, "endpoints": ["GET /v1/api-key"]}),
    )
    .await;
    let runner = start(&stack, &["run", "--once", "--json"]);
    // The command has asked, and waits for the answer.
    stack.until_held_up().await;
    let ended = runner.stop("INT", None, "during the preflight").await;
    assert_eq!(ended.status, Some(1), "{}", ended.stderr);
    assert!(
        ended.stderr.contains("loopsync run: stopped by SIGINT"),
        "{}",
        ended.stderr
    );
    assert_eq!(newest_status(&stack).await, None, "no run was requested");
}

/// `run --once` stopped while it extracts a big model (before: still alive minutes after
/// SIGTERM). The run is closed `interrupted` at once, and the state is consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_stops_while_extracting_a_big_model() {
    let _serial = serial().await;
    let Some(stack) = Stack::start(StackOptions {
        rows: BIG,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let runner = start(&stack, &["run", "--once", "--json"]);
    until_status(&stack, "extracting").await;
    until_querying(&stack, "from users").await;
    let ended = runner.stop("TERM", None, "while extracting").await;
    assert_eq!(ended.status, Some(1), "{}", ended.stderr);
    assert!(
        ended.stderr.contains("marked interrupted"),
        "{}",
        ended.stderr
    );
    assert_interrupted(&stack, "TERM").await;
    assert_consistent(&stack).await;
    // The next run is not refused as one in progress.
    let again = start(&stack, &["run", "--once", "--json"]);
    until_status(&stack, "extracting").await;
    again.stop("TERM", None, "while extracting again").await;
}

/// `run --once` stopped while sending (a low rate budget): exit 1, the run `interrupted`, the
/// confirmed records all in Loops; the next run completes and sends each record once: the
/// records confirmed before are not confirmed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_stops_while_sending_and_the_next_run_completes() {
    let _serial = serial().await;
    let Some(stack) = Stack::start(StackOptions {
        rows: 40,
        requests_per_second: 2,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let runner = start(&stack, &["run", "--once", "--json"]);
    until(Duration::from_secs(60), "a few records sent", || async {
        match stack.update_requests().await {
            n if n >= 3 => Ok(()),
            n => Err(format!("{n} updates")),
        }
    })
    .await;
    let ended = runner.stop("TERM", None, "while sending").await;
    assert_eq!(ended.status, Some(1), "{}", ended.stderr);
    let interrupted = assert_interrupted(&stack, "TERM").await;
    let confirmed_before = assert_consistent(&stack).await;
    assert!(confirmed_before < 40, "the run was stopped early");
    // Writes Loops applied before the stop: the confirmed ones, and any whose answer the stop
    // cut off (those are not confirmed, and are sent again).
    until(
        Duration::from_secs(30),
        "Loops answered what it had received",
        || async {
            match stack.sim.inspect("stats").await["in_flight"].as_u64() {
                Some(0) => Ok(()),
                other => Err(format!("in flight: {other:?}")),
            }
        },
    )
    .await;
    let applied_before = stack
        .sim
        .seen()
        .await
        .answered("PUT /v1/contacts/update", 200);

    rewrite_config(
        &stack,
        "requests_per_second = 2",
        "requests_per_second = 50",
    );
    let next = stack.run_once(&[]).await;
    assert_eq!(next.status, 0, "{}", next.stderr);
    assert_ne!(next.run()["id"], interrupted["id"]);
    assert_eq!(
        next.run()["confirmed"].as_i64(),
        Some(40 - confirmed_before as i64),
        "what was confirmed before is not sent again: {:#}",
        next.run()
    );
    assert_eq!(assert_consistent(&stack).await, 40);
    assert_eq!(stack.contacts().await.len(), 40);
    // By Loops' own count: the next run wrote each record not confirmed before, once.
    let applied = stack
        .sim
        .seen()
        .await
        .answered("PUT /v1/contacts/update", 200);
    assert_eq!(
        applied - applied_before,
        40 - confirmed_before as u64,
        "Loops received the records confirmed before again, or not every other one"
    );
}

/// `run` following a schedule, stopped before its first run (Loops does not answer the
/// preflight): a normal stop, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_run_stops_with_status_0() {
    let _serial = serial().await;
    let Some(stack) = Stack::start(StackOptions {
        extra_sync: "schedule = \"*/5 * * * *\"",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    faults(
        &stack,
        json!({"latency_ms": 120_000, "endpoints": ["GET /v1/api-key"]}),
    )
    .await;
    let runner = start(&stack, &["run"]);
    // The command has asked, and waits for the answer.
    stack.until_held_up().await;
    let ended = runner
        .stop("TERM", None, "while a scheduled run starts")
        .await;
    assert_eq!(ended.status, Some(0), "{}", ended.stderr);
}

/// `loopsync worker loader` stopped while its requests hang on a Loops that stopped answering:
/// it stops within the promise, exit 0; its messages are not acked but come back, and another loader
/// completes the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_stops_and_its_messages_come_back() {
    let _serial = serial().await;
    if nats_url().is_none() {
        return;
    }
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        nats: true,
        requests_per_second: 1,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let _extractor = stack.worker("extractor").await;
    let _transformer = stack.worker("transformer").await;
    let loader = stack.worker("loader").await;
    let runner = start(&stack, &["run", "--once", "--remote", "--json"]);
    until_a_contact(&stack).await;
    // Loops stops answering: the loader's next requests hang far longer than the promise.
    faults(&stack, json!({"latency_ms": 120_000})).await;
    stack.until_held_up().await;
    let loader = Running {
        what: "loopsync worker loader".into(),
        child: loader.child,
        stdout: tokio::spawn(async { Vec::new() }),
        stderr: tokio::spawn(async { Vec::new() }),
    };
    let ended = loader
        .stop("TERM", None, "while its requests hang on Loops")
        .await;
    assert_eq!(ended.status, Some(0));
    faults(&stack, json!({})).await;
    rewrite_config(
        &stack,
        "requests_per_second = 1",
        "requests_per_second = 50",
    );
    let _replacement = stack.worker("loader").await;
    let out = tokio::time::timeout(Duration::from_secs(120), async {
        let mut runner = runner;
        let status = runner.child.wait().await.expect("wait for the runner");
        let stdout = runner.stdout.await.unwrap_or_default();
        (status, stdout)
    })
    .await
    .expect("the run completes with the new loader");
    assert!(out.0.success(), "{}", String::from_utf8_lossy(&out.1));
    assert_eq!(assert_consistent(&stack).await, 10);
    assert_eq!(stack.contacts().await.len(), 10);
}

/// `plan` stopped during the diff of a big model: exit 1 within the promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_stops_during_a_big_diff() {
    let _serial = serial().await;
    let Some(stack) = Stack::start(StackOptions {
        rows: BIG,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let plan = start(&stack, &["plan", "--json"]);
    until_querying(&stack, "from users").await;
    let ended = plan.stop("TERM", None, "during the diff").await;
    assert_eq!(ended.status, Some(1), "{}", ended.stderr);
    assert!(ended.stdout.len() < 1_000_000, "stopped early");
}

/// `adopt` stopped while it reads a big model: exit 1, its run closed `interrupted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_stops_during_a_big_model() {
    let _serial = serial().await;
    let Some(stack) = Stack::start(StackOptions {
        rows: BIG,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let adopt = start(&stack, &["adopt"]);
    until_status(&stack, "extracting").await;
    until_querying(&stack, "from users").await;
    let ended = adopt.stop("TERM", None, "while adopting").await;
    assert_eq!(ended.status, Some(1), "{}", ended.stderr);
    assert_interrupted(&stack, "TERM").await;
}

/// `verify` stopped while Loops answers slowly: exit 1 within the promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_stops_while_loops_is_slow() {
    let _serial = serial().await;
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    faults(
        &stack,
        json!({"latency_ms": 120_000, "endpoints": ["GET /v1/contacts/find"]}),
    )
    .await;
    let verify = start(&stack, &["verify"]);
    // verify has asked, and waits for the answer.
    stack.until_held_up().await;
    let ended = verify.stop("TERM", None, "while Loops is slow").await;
    assert_eq!(ended.status, Some(1), "{}", ended.stderr);
}

/// Two signals 200 ms apart while the graceful stop would wait its grace (the loader's
/// handlers wait for a rate budget of one request a second): the process exits at once, before
/// the graceful stop could mark the run interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let _serial = serial().await;
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        requests_per_second: 1,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let runner = start(&stack, &["run", "--once", "--json"]);
    until_a_contact(&stack).await;
    let ended = runner
        .stop(
            "TERM",
            Some(Duration::from_millis(200)),
            "while handlers wait for the rate budget",
        )
        .await;
    assert_eq!(ended.status, Some(1), "{}", ended.stderr);
    assert!(
        ended.stderr.contains("SIGTERM again: exiting at once"),
        "{}",
        ended.stderr
    );
    // The graceful stop gives in-flight handlers 3 s, then closes the run and says so ("run N
    // marked interrupted"); the second signal ended the process before it could.
    assert!(
        !ended.stderr.contains("marked interrupted"),
        "the graceful stop ran to its end: {}",
        ended.stderr
    );
    assert_consistent(&stack).await;
}

/// The same on an SQLite warehouse (its diff is read on a blocking thread): `run --once`
/// stopped while extracting a big model exits 1 within the promise, its run `interrupted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_stops_while_extracting_on_sqlite() {
    let _serial = serial().await;
    let Some(stack) = Stack::start(StackOptions {
        rows: BIG,
        sqlite: true,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let runner = start(&stack, &["run", "--once", "--json"]);
    until(Duration::from_secs(60), "a run is extracting", || async {
        let path = stack.dir.join("warehouse.db");
        let extracting = path.exists()
            && rusqlite::Connection::open(&path)
                .and_then(|db| {
                    db.query_row(
                        "SELECT count(*) FROM loopsync_runs WHERE status = 'extracting'",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .is_ok_and(|n| n > 0);
        if extracting {
            Ok(())
        } else {
            Err("no run extracting".into())
        }
    })
    .await;
    let ended = runner.stop("TERM", None, "while extracting (SQLite)").await;
    assert_eq!(ended.status, Some(1), "{}", ended.stderr);
    let run = assert_interrupted(&stack, "TERM").await;
    // Stopped before the extraction ended: an extraction that ends sets what the run waits for.
    assert!(
        run["expected"].is_null(),
        "stopped after extracting: {run:#}"
    );
}
