//! Adversarial histories, the process-level half (issue "Adversarial histories"): fewer, longer
//! steps, each a process boundary. Over NATS (a server of the test's own) with the stages as
//! `loopsync worker` processes, a mirror sync with `trigger_workflows`: each step changes the
//! model at random (plans, names, emails, rows that leave, return or arrive), then runs
//! `run --once --remote` under a fault drawn at random — a worker of a random stage SIGKILLed
//! mid-run and started again, the waiting run stopped by SIGTERM, NATS restarted, or none. Runs
//! may fail and leave their queues in NATS. At the clean points (every third step, and the
//! last), one clean run — whatever the earlier runs left queued still draining — must bring
//! Loops to the model, exactly, with no idempotency key taken twice.
//!
//! The commit's seed under `scripts/test.sh`, else a fresh one (`testkit::history_seed`), printed
//! with the command that replays it:
//! `LOOPSYNC_HISTORY_SEED=<seed> cargo test -p loopsync-e2e --test e2e process_faults::`;
//! `LOOPSYNC_PROCESS_STEPS=<n>` soaks. The in-process generator is `tests/adversarial.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use loopsync_testkit::nats::NatsServer;
use loopsync_testkit::{Stack, StackOptions, Worker, history_seed, output_within, sigterm, until};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A fault during one run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// SIGKILL of the worker of this stage mid-run; started again at once.
    Kill(&'static str),
    /// SIGTERM of the waiting `run --once --remote`.
    Terminate,
    /// NATS stopped mid-run, and started again a second later.
    NatsRestart,
}

impl Fault {
    fn draw(rng: &mut StdRng) -> Fault {
        match rng.random_range(0..8) {
            0 => Fault::Kill("extractor"),
            1 => Fault::Kill("transformer"),
            2 | 3 => Fault::Kill("loader"),
            4 | 5 => Fault::Terminate,
            6 => Fault::NatsRestart,
            _ => Fault::None,
        }
    }
}

const STAGES: [&str; 4] = ["extractor", "transformer", "loader", "loader"];

/// The workers, one per entry of [`STAGES`].
struct Workers(Vec<Worker>);

impl Workers {
    async fn start(stack: &Stack) -> Workers {
        let mut workers = Vec::new();
        for stage in STAGES {
            workers.push(stack.worker(stage).await);
        }
        Workers(workers)
    }

    /// SIGKILLs the (first) worker of `stage` and starts another.
    async fn kill(&mut self, stack: &Stack, stage: &str) {
        let i = STAGES.iter().position(|s| *s == stage).unwrap();
        self.0[i].kill().await;
        self.0[i] = stack.worker(stage).await;
    }
}

/// One random change of the model, as SQL; described.
fn change(rng: &mut StdRng, next_id: &mut i64, step: usize) -> (String, String) {
    let id = rng.random_range(1..*next_id);
    match rng.random_range(0..11) {
        // Many records at once, so that a fault lands while the run sends.
        10 => {
            let plan = ["free", "pro", "team", "gold"][rng.random_range(0..4)];
            (
                format!("UPDATE users SET plan = '{plan}', seats = seats + 1"),
                format!("every plan := {plan}"),
            )
        }
        0..=2 => {
            let plan = ["free", "pro", "team", "gold"][rng.random_range(0..4)];
            (
                format!("UPDATE users SET plan = '{plan}' WHERE id = {id}"),
                format!("plan of {id} := {plan}"),
            )
        }
        3 => (
            format!("UPDATE users SET first_name = 'Step{step}' WHERE id = {id}"),
            format!("first name of {id} := Step{step}"),
        ),
        4 | 5 => (
            format!("UPDATE users SET email = 'moved{id}-{step}@example.com' WHERE id = {id}"),
            format!("email of {id} := moved{id}-{step}@example.com"),
        ),
        6 => (
            format!(
                "INSERT INTO gone SELECT * FROM users WHERE id = {id}; \
                 DELETE FROM users WHERE id = {id}"
            ),
            format!("{id} leaves"),
        ),
        7 => (
            "INSERT INTO users SELECT * FROM gone WHERE id = (SELECT min(id) FROM gone); \
             DELETE FROM gone WHERE id = (SELECT min(id) FROM gone)"
                .to_owned(),
            "the first row that left comes back".to_owned(),
        ),
        _ => {
            let new = *next_id;
            *next_id += 1;
            (
                format!(
                    "INSERT INTO users VALUES ({new}, 'new{new}@example.com', 'New{new}', 'free', 1, \
                     timestamptz '2024-01-01 00:00:00+00', true)"
                ),
                format!("{new} arrives"),
            )
        }
    }
}

/// What Loops must hold: the model's rows, by email.
async fn model(stack: &Stack) -> BTreeMap<String, (String, String, bool)> {
    stack
        .pg()
        .query(
            "SELECT lower(email), first_name, plan, newsletter FROM users",
            &[],
        )
        .await
        .expect("read the model")
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

/// What Loops holds, as the model says it.
async fn loops(stack: &Stack) -> BTreeMap<String, (String, String, bool)> {
    stack
        .contacts()
        .await
        .into_iter()
        .map(|(email, c)| {
            (
                email,
                (
                    c["firstName"].as_str().unwrap_or_default().to_owned(),
                    c["planName"].as_str().unwrap_or_default().to_owned(),
                    c["mailingLists"]["cm_news"] == true,
                ),
            )
        })
        .collect()
}

async fn history(seed: u64, steps: usize) {
    let Some(mut server) = NatsServer::start().await else {
        return;
    };
    let Some(stack) = Stack::start(StackOptions {
        rows: 40,
        nats_url: Some(server.url()),
        behavior: "mirror",
        extra_sync: "trigger_workflows = true\nmax_removal_share = 1.0",
        sim_rate_limit: 1000,
        requests_per_second: 20,
        ack_wait_seconds: 2.0,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack
        .sql("CREATE TABLE gone AS SELECT * FROM users WHERE false")
        .await;
    let mut workers = Workers::start(&stack).await;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next_id = 41;
    let mut log = format!(
        "seed {seed} · replay: LOOPSYNC_HISTORY_SEED={seed} cargo test -p loopsync-e2e --test e2e process_faults::\n"
    );
    for step in 1..=steps {
        let clean = step == steps || step % 3 == 0;
        for _ in 0..rng.random_range(1..=4) {
            let (sql, line) = change(&mut rng, &mut next_id, step);
            stack.sql(&format!("BEGIN; {sql}; COMMIT")).await;
            let _ = writeln!(log, "  {step}: {line}");
        }
        let fault = if clean {
            Fault::None
        } else {
            Fault::draw(&mut rng)
        };
        let after = Duration::from_millis(rng.random_range(0..1500));
        let _ = writeln!(
            log,
            "  {step}: run{}",
            match fault {
                Fault::None if clean => " (clean point)".to_owned(),
                Fault::None => String::new(),
                other => format!(" under {other:?} after {} ms", after.as_millis()),
            }
        );
        let mut run = stack.command(&["run", "--once", "--remote", "--json"]);
        let run = run
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start a run");
        if fault != Fault::None {
            // When the fault lands within the run is the scenario, not a synchronisation.
            tokio::time::sleep(after).await;
            match fault {
                Fault::Kill(stage) => workers.kill(&stack, stage).await,
                Fault::Terminate => sigterm(&run).await,
                Fault::NatsRestart => {
                    server.stop().await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    server.restart().await;
                }
                Fault::None => {}
            }
        }
        let ended = tokio::time::timeout(Duration::from_secs(180), run.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("step {step}: the run did not end\n{log}"))
            .expect("wait for the run");
        let status = ended.status.code();
        let _ = writeln!(
            log,
            "  {step}: exit {status:?}; {} requests reached Loops so far",
            stack.sim.seen().await.total
        );
        if !clean {
            continue;
        }
        let stderr = String::from_utf8_lossy(&ended.stderr);
        assert_eq!(
            status,
            Some(0),
            "step {step}: the clean run failed: {stderr}\nthe history (replay with LOOPSYNC_HISTORY_SEED={seed}):\n{log}"
        );
        // What earlier runs left queued may still drain: Loops must come to the model and stay.
        let want = model(&stack).await;
        let mut have = BTreeMap::new();
        let settled = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                have = loops(&stack).await;
                if have == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
        .await;
        if settled.is_err() {
            let missing: Vec<_> = want.keys().filter(|e| !have.contains_key(*e)).collect();
            let extra: Vec<_> = have.keys().filter(|e| !want.contains_key(*e)).collect();
            let differ: Vec<_> = want
                .iter()
                .filter(|(e, v)| have.get(*e).is_some_and(|h| h != *v))
                .map(|(e, v)| format!("{e}: want {v:?}, Loops has {:?}", have[e]))
                .collect();
            panic!(
                "step {step}: Loops differs from the model after a clean run: missing {missing:?}, \
                 not in the model {extra:?}, differing {differ:?}\nthe history (replay with \
                 LOOPSYNC_HISTORY_SEED={seed}):\n{log}"
            );
        }
        // No idempotency key taken twice: no change fired its event twice.
        let events = stack.sim.inspect("events").await;
        let mut keys = BTreeMap::new();
        for e in events.as_array().expect("an event array") {
            if let Some(k) = e["idempotencyKey"].as_str() {
                *keys.entry(k.to_owned()).or_insert(0) += 1;
            }
        }
        if let Some((k, n)) = keys.iter().find(|(_, n)| **n > 1) {
            panic!(
                "step {step}: the event key {k} was taken {n} times\nthe history (replay with \
                 LOOPSYNC_HISTORY_SEED={seed}):\n{log}"
            );
        }
    }
    // A last run finds nothing to send.
    let mut last = stack.command(&["run", "--once", "--remote", "--json"]);
    let last = output_within(&mut last, Duration::from_secs(120), "the last run").await;
    assert_eq!(last.status.code(), Some(0));
    until(Duration::from_secs(30), "Loops still the model", || async {
        if loops(&stack).await == model(&stack).await {
            Ok(())
        } else {
            Err("Loops differs".to_owned())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_signals_and_nats_restarts() {
    let steps = std::env::var("LOOPSYNC_PROCESS_STEPS")
        .map(|s| s.parse().expect("LOOPSYNC_PROCESS_STEPS is a number"))
        .unwrap_or(9);
    history(history_seed("process_faults"), steps).await;
}
