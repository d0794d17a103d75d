//! A warehouse outage mid-run, through a TCP proxy between loopsync and PostgreSQL: every
//! connection closed, new ones blackholed for three minutes, then service back. The run
//! completes, every record confirmed once, and while the warehouse was away `run --once` said
//! so (progress lines) and the checkpointer said it waits (a warn line a minute). The same
//! outage hits two runs at once: over the in-process bus and over JetStream (where the old
//! `max_deliver` of the checkpointer's consumer would have dead-lettered the outcomes).
//!
//! And the no-progress deadline: a run that cannot progress ends `run --once` with a clear
//! error within the deadline (and some seconds).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use loopsync_testkit::proxy::{TcpProxy, through};
use loopsync_testkit::{Stack, StackOptions};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::time::Instant;

const ROWS: i64 = 300;
const OUTAGE: Duration = Duration::from_secs(180);

/// A `loopsync run --once --json` in progress, its stderr collected line by line.
struct Running {
    name: &'static str,
    child: tokio::process::Child,
    stderr: Arc<Mutex<String>>,
    stderr_done: tokio::task::JoinHandle<()>,
    stdout: tokio::task::JoinHandle<String>,
}

impl Running {
    fn start(name: &'static str, stack: &Stack, args: &[&str]) -> Running {
        let mut all = vec!["run", "--once", "--json"];
        all.extend_from_slice(args);
        let mut child = stack
            .command(&all)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start loopsync run");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let stderr_done = tokio::spawn({
            let stderr = stderr.clone();
            async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut text = stderr.lock().expect("stderr");
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        });
        let mut out = child.stdout.take().expect("piped stdout");
        let stdout = tokio::spawn(async move {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text).await;
            text
        });
        Running {
            name,
            child,
            stderr,
            stderr_done,
            stdout,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr").clone()
    }

    /// Its exit status and report, within `deadline`.
    async fn finish(mut self, deadline: Duration) -> (i32, serde_json::Value, String) {
        let status = match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => status.expect("wait for loopsync run"),
            Err(_) => panic!(
                "{}: loopsync run did not end within {deadline:?}; its stderr:\n{}",
                self.name,
                self.stderr()
            ),
        };
        let stdout = tokio::time::timeout(Duration::from_secs(10), self.stdout)
            .await
            .expect("stdout closed")
            .unwrap_or_default();
        // The stderr task ends at the pipe's end: every line is in.
        tokio::time::timeout(Duration::from_secs(10), self.stderr_done)
            .await
            .expect("stderr closed")
            .expect("the stderr task");
        let stderr = self.stderr.lock().expect("stderr").clone();
        (
            status.code().unwrap_or(-1),
            loopsync_testkit::json_data(stdout.as_bytes()).unwrap_or(serde_json::Value::Null),
            stderr,
        )
    }
}

/// A stack whose config reaches PostgreSQL through `proxy`.
async fn proxied_stack(options: StackOptions, proxy: &TcpProxy) -> Option<Stack> {
    let stack = Stack::start(options).await?;
    let url = stack.warehouse.url();
    let (proxied, _) = through(&url, proxy.addr());
    let config = std::fs::read_to_string(&stack.config).expect("read the config");
    std::fs::write(&stack.config, config.replace(&url, &proxied)).expect("write the config");
    Some(stack)
}

/// Waits (at most `deadline`) until `sql` on the stack's database (directly, not through the
/// proxy) counts at least `n`.
async fn until_count(stack: &Stack, sql: &str, n: i64, deadline: Duration, running: &Running) {
    let end = Instant::now() + deadline;
    loop {
        // The schema may not exist yet.
        let counted = stack
            .pg()
            .query_one(sql, &[])
            .await
            .map(|r| r.get::<_, i64>(0));
        if counted.unwrap_or(0) >= n {
            return;
        }
        assert!(
            Instant::now() < end,
            "{}: `{sql}` did not reach {n} within {deadline:?}; stderr:\n{}",
            running.name,
            running.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The run completed after the outage, each record confirmed once: in the report, in the
/// state, in the simulated Loops (one accepted write per contact).
async fn assert_complete(
    name: &str,
    stack: &Stack,
    (status, report, stderr): (i32, serde_json::Value, String),
) {
    assert_eq!(status, 0, "{name}: exit status; stderr:\n{stderr}");
    let run = &report[0];
    assert_eq!(run["status"], "succeeded", "{name}: {run}\n{stderr}");
    assert_eq!(run["confirmed"], ROWS, "{name}: {run}");
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.records WHERE outcome = 'confirmed'")
            .await,
        ROWS,
        "{name}"
    );
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.state WHERE confirmed_fp IS NOT NULL")
            .await,
        ROWS,
        "{name}"
    );
    let seen = stack.sim.seen().await;
    assert_eq!(
        seen.answered("PUT /v1/contacts/update", 200),
        ROWS as u64,
        "{name}: one accepted write per record: {seen:?}"
    );
    assert_eq!(stack.contacts().await.len(), ROWS as usize, "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_minute_warehouse_outage_mid_run_is_waited_out() {
    // Not serial: it measures no one-second window nor a stop time (a line a minute, give or
    // take one, and at least five progress lines in three minutes), so it waits beside others.
    let Some(pg) = loopsync_testkit::pg_url() else {
        return;
    };
    let (_, upstream) = through(&pg, "127.0.0.1:1".parse().expect("an address"));
    let proxy = TcpProxy::start(&upstream).await;
    let options = StackOptions {
        rows: ROWS as usize,
        requests_per_second: 5,
        ..StackOptions::default()
    };
    let Some(local) = proxied_stack(options.clone(), &proxy).await else {
        return;
    };
    let Some(js) = proxied_stack(
        StackOptions {
            nats: true,
            ..options
        },
        &proxy,
    )
    .await
    else {
        return;
    };
    let runs = [
        Running::start("in-process bus", &local, &[]),
        Running::start("JetStream", &js, &[]),
    ];
    // Mid-send: some records confirmed, most not yet.
    for (stack, running) in [&local, &js].into_iter().zip(&runs) {
        until_count(
            stack,
            "SELECT count(*) FROM loopsync.records WHERE outcome = 'confirmed'",
            20,
            Duration::from_secs(120),
            running,
        )
        .await;
    }
    proxy.start_outage();
    let started = Instant::now();
    tokio::time::sleep(OUTAGE).await;
    // What they said while the warehouse was away.
    for running in &runs {
        let stderr = running.stderr();
        let progress = stderr
            .lines()
            .filter(|l| {
                l.contains("records with an outcome") && l.contains("the warehouse fails since")
            })
            .count();
        assert!(
            progress >= 5,
            "{}: progress lines during the outage: {progress}\n{stderr}",
            running.name
        );
        let waits = stderr
            .lines()
            .filter(|l| l.contains("the checkpointer cannot record outcomes"))
            .count();
        // Over JetStream the loader goes on sending (its rate budget is in NATS), so the
        // checkpointer holds outcomes it cannot record: a line a minute. In process the rate
        // budget is a row of the state, away too: the loader may wait for its next slot with
        // nothing sent, and then the checkpointer has nothing to say — never more than a line
        // a minute either way.
        let lines = if running.name == "JetStream" { 2 } else { 0 }..=4;
        assert!(
            lines.contains(&waits),
            "{}: one line a minute from the checkpointer, got {waits}\n{stderr}",
            running.name
        );
    }
    proxy.end_outage();
    eprintln!("outage of {:?} ended", started.elapsed());
    let [on_local, on_js] = runs;
    let ended = Instant::now();
    let local_end = on_local.finish(Duration::from_secs(240)).await;
    let js_end = on_js.finish(Duration::from_secs(240)).await;
    eprintln!("runs completed {:?} after the outage", ended.elapsed());
    assert_complete("in-process bus", &local, local_end).await;
    assert_complete("JetStream", &js, js_end).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_without_progress_fails_at_the_stall_timeout() {
    let _serial = loopsync_testkit::serial().await;
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    // Loops answers every write 503: no record gets an outcome for minutes (retries).
    stack
        .sim_post(
            "faults",
            json!({"error_503": 1.0, "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;
    let started = Instant::now();
    let running = Running::start("stalled", &stack, &["--stall-timeout", "5"]);
    let (status, report, stderr) = running.finish(Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert_eq!(status, 1, "{stderr}");
    assert_eq!(report, serde_json::Value::Null, "no report: {report}");
    assert!(
        stderr.contains("made no progress for 5 s (phase: sending; waiting for the outcomes of 5 of its 5 records"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(45), "took {took:?}");
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.runs WHERE status = 'failed' AND error LIKE 'no progress for 5 s%'")
            .await,
        1
    );
}

/// Waits (at most `deadline`) until the run's stderr has a line with `needle`; the line.
async fn said_within(running: &Running, needle: &str, deadline: Duration) -> String {
    let start = Instant::now();
    loop {
        if let Some(line) = running.stderr().lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            start.elapsed() < deadline,
            "{}: no line with {needle:?} within {deadline:?}; stderr:\n{}",
            running.name,
            running.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Loops that cannot be reached is said at once, with what is waited for: a port that
/// refuses connections (`cannot reach Loops at URL: retrying (attempt 2 of N, next in …)`),
/// and a server that never answers (`waiting for Loops at URL: no answer after 2 s`), each
/// within a few seconds, not after the retries. `check` fails quickly (exit 1), and prints no
/// `ok` for the sync's binding it could not compare with that Loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_loops_is_said_at_once_and_check_fails() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    // The sync's state is bound to the simulator.
    assert_eq!(stack.run_once(&[]).await.status, 0);
    let config = std::fs::read_to_string(&stack.config).unwrap();
    let api = stack.sim.api();

    // Nothing listens on this port: every connection is refused.
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("http://127.0.0.1:{refused}/api");
    std::fs::write(&stack.config, config.replace(&api, &down)).unwrap();
    let mut running = Running::start("refused", &stack, &[]);
    let line = said_within(&running, "retrying (attempt 2 of", Duration::from_secs(5)).await;
    let host = format!("http://127.0.0.1:{refused}");
    assert!(
        line.contains(&format!("cannot reach Loops at {host}")),
        "{line}"
    );
    running.child.kill().await.unwrap();

    let started = Instant::now();
    let check = stack.output(&["check"]).await;
    let stdout = String::from_utf8_lossy(&check.stdout).into_owned();
    assert_eq!(check.status.code(), Some(1), "{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "check says quickly that Loops cannot be reached: {:?}",
        started.elapsed()
    );
    assert!(
        stdout.contains(&format!(
            "FAIL Loops: transport error: cannot reach Loops at {host}"
        )),
        "{stdout}"
    );
    assert!(
        !stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("state bound to")),
        "no ok for a binding that could not be compared: {stdout}"
    );
    assert!(
        stdout.contains("--   sync users: state bound to")
            && stdout.contains("not compared with the configured Loops, which was not reached"),
        "{stdout}"
    );

    // A server that takes the connection and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let mute = format!("http://127.0.0.1:{silent_port}/api");
    std::fs::write(&stack.config, config.replace(&api, &mute)).unwrap();
    let mut running = Running::start("silent", &stack, &[]);
    let line = said_within(&running, "waiting for Loops at", Duration::from_secs(5)).await;
    assert!(
        line.contains(&format!("waiting for Loops at {mute}: no answer after 2 s")),
        "{line}"
    );
    running.child.kill().await.unwrap();
    held.abort();
    std::fs::write(&stack.config, &config).unwrap();
}
