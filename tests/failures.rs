//! Failures end to end, against real processes on loopback: a stage's worker process killed
//! (SIGKILL) mid-run, and the NATS server restarted mid-run. Every wait polls an observed state
//! (the warehouse, JetStream's consumer state, the simulator) with a deadline; on expiry the test
//! fails with the stderr of every loopsync process involved (and the NATS server's log when the
//! test owns the server).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use loopsync_bus::Names;
use loopsync_core::stage::Stage;
use loopsync_testkit::nats::{self, NatsServer};
use loopsync_testkit::{Stack, StackOptions};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::time::Instant;

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(10);

/// A loopsync process started by a test; killed on drop.
struct Proc {
    name: String,
    child: tokio::process::Child,
    /// What it printed on stdout after its first line, collected by a task.
    stdout: Option<tokio::task::JoinHandle<String>>,
}

impl Proc {
    /// SIGKILL, and waits until the process is gone.
    async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL a loopsync process");
    }
}

/// The loopsync processes of one test and what they wrote on stderr (collected by a task per
/// process as they run), the NATS server the test owns if any: everything a failure prints.
struct Scene<'a> {
    stack: &'a Stack,
    /// The NATS server of the stack.
    nats_url: String,
    server: Option<NatsServer>,
    stderr: Vec<(String, Arc<Mutex<String>>)>,
}

impl<'a> Scene<'a> {
    fn new(stack: &'a Stack, nats_url: String, server: Option<NatsServer>) -> Scene<'a> {
        Scene {
            stack,
            nats_url,
            server,
            stderr: Vec::new(),
        }
    }

    fn collect_stderr(&mut self, name: &str, stderr: tokio::process::ChildStderr) {
        let text = Arc::new(Mutex::new(String::new()));
        self.stderr.push((name.to_owned(), text.clone()));
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut text = text.lock().expect("stderr buffer");
                text.push_str(&line);
                text.push('\n');
            }
        });
    }

    fn spawn(&mut self, name: String, args: &[&str]) -> Proc {
        let mut child = self
            .stack
            .command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.collect_stderr(&name, child.stderr.take().expect("piped stderr"));
        Proc {
            name,
            child,
            stdout: None,
        }
    }

    /// `loopsync worker STAGE`, once it said it is ready.
    async fn worker(&mut self, stage: &str) -> Proc {
        let n = self
            .stderr
            .iter()
            .filter(|(name, _)| name.starts_with(&format!("worker {stage} ")))
            .count()
            + 1;
        let mut proc = self.spawn(format!("worker {stage} #{n}"), &["worker", stage]);
        let mut lines = BufReader::new(proc.child.stdout.take().expect("piped stdout")).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        match first {
            Ok(Ok(Some(line))) if line.ends_with("ready") => {}
            other => self.fail(&format!("{} did not say it is ready: {other:?}", proc.name)),
        }
        proc.stdout = Some(tokio::spawn(async move {
            let mut rest = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                rest.push_str(&line);
                rest.push('\n');
            }
            rest
        }));
        proc
    }

    /// `loopsync run --once --json ARGS…`, running.
    fn runner(&mut self, args: &[&str]) -> Proc {
        let mut all = vec!["run", "--once", "--json"];
        all.extend_from_slice(args);
        let mut proc = self.spawn(format!("loopsync {}", all.join(" ")), &all);
        let mut stdout = proc.child.stdout.take().expect("piped stdout");
        proc.stdout = Some(tokio::spawn(async move {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text).await;
            text
        }));
        proc
    }

    /// Waits for the runner to exit; returns its exit status and its JSON report.
    async fn finish(&self, mut runner: Proc, within: Duration) -> (Option<i32>, Value) {
        let status = match tokio::time::timeout(within, runner.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => self.fail(&format!("waiting for {}: {e}", runner.name)),
            Err(_) => self.fail(&format!("{} did not finish within {within:?}", runner.name)),
        };
        let stdout = runner
            .stdout
            .take()
            .expect("the runner's stdout")
            .await
            .unwrap_or_default();
        let runs = loopsync_testkit::json_data(stdout.as_bytes()).unwrap_or_else(|_| {
            self.fail(&format!(
                "{} (exit {status}) printed no JSON report: {stdout:?}",
                runner.name
            ))
        });
        (status.code(), runs)
    }

    /// Fails the test with `what`, every process's stderr and the NATS server's log.
    fn fail(&self, what: &str) -> ! {
        let mut message = format!("{what}\n");
        for (name, text) in &self.stderr {
            let text = text.lock().map(|t| t.clone()).unwrap_or_default();
            message.push_str(&format!("\n---- stderr of {name}:\n{text}"));
        }
        if let Some(server) = &self.server {
            message.push_str(&format!("\n---- nats-server log:\n{}", server.log()));
        }
        panic!("{message}");
    }

    /// Fails the test, with the processes' stderr, unless `ok`.
    fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(&what());
        }
    }

    /// Polls `done` until it holds; fails the test after `within`.
    async fn until(&self, what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !done().await {
            if Instant::now() >= deadline {
                self.fail(&format!("waited {within:?} for {what}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The server's state of a stage's durable consumer.
    async fn consumer(&self, stage: Stage) -> Value {
        // The streams are the installation's (the state's id): see `Names::scoped`.
        let installation = self
            .stack
            .text("SELECT id FROM loopsync.installation")
            .await;
        let names = Names::scoped(
            &self.stack.nats.as_ref().expect("a NATS stack").namespace,
            &installation,
        );
        nats::consumer_info(&self.nats_url, &names.stream(stage), stage.name())
            .await
            .unwrap_or_else(|e| self.fail(&format!("consumer info of {}: {e}", stage.name())))
    }

    fn server(&mut self) -> &mut NatsServer {
        self.server
            .as_mut()
            .expect("a NATS server of the test's own")
    }
}

/// The latest run, as the warehouse has it.
#[derive(Debug, Clone, Default)]
struct Progress {
    status: String,
    /// Records noted as emitted by this run.
    emitted: i64,
    /// Records of this run whose confirmation the checkpointer applied.
    confirmed: i64,
}

async fn progress(stack: &Stack) -> Option<Progress> {
    // Before the first process prepared the warehouse, its tables do not exist: no run yet.
    let row = stack
        .pg()
        .query_opt(
            "SELECT r.status,
                    (SELECT count(*) FROM loopsync.state s
                      WHERE s.sync = r.sync AND s.emitted_run = r.id),
                    (SELECT count(*) FROM loopsync.records c
                      WHERE c.run_id = r.id AND c.outcome = 'confirmed')
               FROM loopsync.runs r ORDER BY r.id DESC LIMIT 1",
            &[],
        )
        .await
        .ok()??;
    Some(Progress {
        status: row.get(0),
        emitted: row.get(1),
        confirmed: row.get(2),
    })
}

/// A slow warehouse: noting a record as emitted takes 4 ms for the first batch of changes
/// (the extractor notes a batch, 500, before it publishes it), then 100 ms until
/// [`speed_up_emitting`]. So there is a window of up to 50 s in which the run is `extracting`,
/// the first batch is published and being sent, and the second is not yet published, however
/// loaded the machine (a fixed 4 ms made it 2 s, once too short on 2 cores running six tests).
/// (A model that sleeps per row would not make that window: the diff sorts the whole model
/// before its first row comes out, so every row would be read before the first change is
/// emitted.)
async fn slow_down_emitting(stack: &Stack) {
    // A command that writes makes the state's tables (`runs`, which only reads, makes
    // nothing): `dlq park` with no dead letter parks nothing.
    let prepared = stack
        .command(&["dlq", "park"])
        .output()
        .await
        .expect("loopsync runs");
    assert!(prepared.status.success(), "{prepared:?}");
    stack
        .sql(
            "CREATE TABLE slow_emit_delay (seconds float8 NOT NULL);
             INSERT INTO slow_emit_delay VALUES (0.1);
             CREATE TABLE slow_emit_first (one int PRIMARY KEY, tx bigint NOT NULL);
             CREATE FUNCTION slow_emit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 -- Only a record this run has not noted yet: not the checkpointer's writes,
                 -- not a re-extraction noting again what it had noted.
                 IF NEW.emitted_run IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM loopsync.state s
                      WHERE s.sync = NEW.sync AND s.key = NEW.key
                        AND s.emitted_run = NEW.emitted_run) THEN
                     -- The first transaction that notes (the first batch) goes at speed; the
                     -- extractor notes two batches at once, and the second waits here until
                     -- the first is committed, then goes slowly.
                     INSERT INTO slow_emit_first VALUES (1, txid_current())
                         ON CONFLICT (one) DO NOTHING;
                     IF (SELECT tx FROM slow_emit_first) = txid_current() THEN
                         PERFORM pg_sleep(0.004);
                     ELSE
                         PERFORM pg_sleep((SELECT seconds FROM slow_emit_delay));
                     END IF;
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER slow_emit BEFORE INSERT OR UPDATE ON loopsync.state
                FOR EACH ROW EXECUTE FUNCTION slow_emit();",
        )
        .await;
}

/// Ends [`slow_down_emitting`]'s window: the rest of the run is noted at full speed.
async fn speed_up_emitting(stack: &Stack) {
    stack.sql("UPDATE slow_emit_delay SET seconds = 0").await;
}

/// The simulator's requests to one endpoint, by HTTP status.
async fn answers(stack: &Stack, endpoint: &str) -> std::collections::BTreeMap<String, u64> {
    stack
        .sim
        .seen()
        .await
        .by_endpoint
        .get(endpoint)
        .cloned()
        .unwrap_or_default()
}

/// The simulator's contacts are the model's rows: one per row, each mapped property as the
/// row has it, and nothing else.
async fn assert_contacts_are_the_model(scene: &Scene<'_>) {
    let stack = scene.stack;
    let rows = stack
        .pg()
        .query(
            r#"SELECT lower(email), first_name, plan, seats::float8,
                      to_char(signed_up_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'),
                      newsletter
                 FROM users ORDER BY id"#,
            &[],
        )
        .await
        .expect("read the model");
    let contacts = stack.contacts().await;
    scene.check(contacts.len() == rows.len(), || {
        format!("{} contacts for {} rows", contacts.len(), rows.len())
    });
    for row in rows {
        let email: String = row.get(0);
        let Some(contact) = contacts.get(&email) else {
            scene.fail(&format!("no contact for {email}"));
        };
        let expected = (
            row.get::<_, String>(1),
            row.get::<_, String>(2),
            row.get::<_, f64>(3),
            row.get::<_, String>(4),
            row.get::<_, bool>(5),
        );
        let actual = (
            contact["firstName"].as_str().unwrap_or_default().to_owned(),
            contact["planName"].as_str().unwrap_or_default().to_owned(),
            contact["seats"].as_f64().unwrap_or(f64::NAN),
            contact["signedUpAt"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            contact["mailingLists"]["cm_news"] == true,
        );
        scene.check(actual == expected, || {
            format!("{email}: the contact {contact} is not the row {expected:?}")
        });
    }
}

const ROWS: usize = 1000;

/// Worker mode, one stage's process SIGKILLed mid-run (see the two tests below), then a
/// replacement started. Returns nothing; asserts:
///
/// * the run completes (exit 0) with every record confirmed, and the warehouse's state has every
///   record confirmed;
/// * the simulator's contacts are the model;
/// * exactly one request per record reached Loops. Every hop publishes with a `Nats-Msg-Id`
///   derived from (run, record, fingerprint): a change or operation published again by the
///   replacement (a re-extraction, a change transformed again) is dropped by JetStream's
///   duplicate window (2 minutes, longer than the test), and the loader's ledger answers a
///   redelivered operation Loops already confirmed without a request. A second request for a
///   record needs a *loader* to die between Loops' answer and its ledger write, and no loader
///   dies here. The simulator's limit is far above the budget, so no 429 is retried either.
async fn kill_a_stage_mid_run(victim: Stage) {
    let options = StackOptions {
        rows: ROWS,
        nats: true,
        sim_rate_limit: 1000,
        requests_per_second: 200,
        ack_wait_seconds: 2.0,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let nats_url = loopsync_testkit::nats_url().expect("the stack's NATS");
    let mut scene = Scene::new(&stack, nats_url, None);
    let mut extractor = scene.worker("extractor").await;
    let _transformer = if victim == Stage::Transformer {
        None
    } else {
        Some(scene.worker("transformer").await)
    };
    let _loader = scene.worker("loader").await;
    slow_down_emitting(&stack).await;
    let runner = scene.runner(&["--remote"]);

    let dead = match victim {
        Stage::Extractor => {
            // Killed while extracting: the first batch published and partly confirmed, the
            // second being noted.
            let mut seen = Progress::default();
            scene
                .until(
                    "the run to be extracting with changes emitted and 20 confirmed",
                    Duration::from_secs(60),
                    async || {
                        seen = progress(&stack).await.unwrap_or_default();
                        seen.status == "extracting" && seen.emitted > 0 && seen.confirmed >= 20
                    },
                )
                .await;
            extractor.kill().await;
            // Mid-extraction: no one else can end it. The run request is in the dead
            // extractor's hands: unacknowledged, it comes back to the replacement after the ack
            // wait.
            let now = progress(&stack).await.unwrap_or_default();
            let held = scene.consumer(Stage::Extractor).await;
            scene.check(
                now.status == "extracting" && held["num_ack_pending"] == 1,
                || format!("killed at {seen:?}, now {now:?}; the run request: {held}"),
            );
            seen
        }
        Stage::Transformer => {
            // A backlog of changes first, then a transformer that dies halfway through it.
            scene
                .until(
                    "a backlog of 250 changes while the run is extracting",
                    Duration::from_secs(60),
                    async || {
                        let p = progress(&stack).await.unwrap_or_default();
                        p.status == "extracting"
                            && scene.consumer(Stage::Transformer).await["num_pending"]
                                .as_u64()
                                .unwrap_or(0)
                                >= 250
                    },
                )
                .await;
            let mut victim = scene.worker("transformer").await;
            scene
                .until(
                    "the transformer to be halfway through its backlog",
                    Duration::from_secs(30),
                    async || {
                        let c = scene.consumer(Stage::Transformer).await;
                        c["ack_floor"]["consumer_seq"].as_u64().unwrap_or(0) >= 20
                            && c["num_pending"].as_u64().unwrap_or(0) >= 100
                    },
                )
                .await;
            victim.kill().await;
            // Changes in the dead transformer's hands (delivered, unacknowledged: they come
            // back after the ack wait) and changes it never got.
            let held = scene.consumer(Stage::Transformer).await;
            eprintln!(
                "the dead transformer had acknowledged {} changes, held {}, left {}",
                held["ack_floor"]["consumer_seq"], held["num_ack_pending"], held["num_pending"]
            );
            scene.check(
                held["num_ack_pending"].as_u64().unwrap_or(0) > 0
                    && held["num_pending"].as_u64().unwrap_or(0) > 0,
                || format!("the transformer died with nothing in its hands or ahead: {held}"),
            );
            progress(&stack).await.unwrap_or_default()
        }
        Stage::Loader | Stage::Checkpointer => unreachable!("see tests/pipeline.rs"),
    };
    speed_up_emitting(&stack).await;
    eprintln!("killed the {} at {dead:?}", victim.name());
    let killed = Instant::now();
    let _replacement = scene.worker(victim.name()).await;

    let (status, runs) = scene.finish(runner, Duration::from_secs(120)).await;
    eprintln!(
        "the run ended {:?} after the {} was killed",
        killed.elapsed(),
        victim.name()
    );
    scene.check(status == Some(0), || format!("exit {status:?}: {runs}"));
    let run = &runs[0];
    // (`added` and `unchanged` describe the last extraction: after a re-extraction, the
    // records confirmed before it count as unchanged.)
    scene.check(
        run["status"] == "succeeded"
            && run["confirmed"] == ROWS
            && run["expected"] == ROWS
            && run["added"].as_u64().unwrap_or(0) + run["unchanged"].as_u64().unwrap_or(0)
                == ROWS as u64,
        || format!("not every record confirmed: {run}"),
    );
    let confirmed = stack
        .count("SELECT count(*) FROM loopsync.state WHERE confirmed_fp = emitted_fp")
        .await;
    scene.check(confirmed == ROWS as i64, || {
        format!("{confirmed} records confirmed in the state")
    });
    assert_contacts_are_the_model(&scene).await;
    let requests = answers(&stack, "PUT /v1/contacts/update").await;
    scene.check(
        requests.len() == 1 && requests.get("200") == Some(&(ROWS as u64)),
        || format!("not one request per record: {requests:?}"),
    );
}

/// The extractor (and the checkpointer, which lives in its process) SIGKILLed while it
/// extracts: its first batch of changes published and partly confirmed, the second being noted.
/// The run request it held comes back after the ack wait to the extractor started in its
/// place, which re-claims the run still `extracting` and extracts again: what was confirmed
/// meanwhile is unchanged, what was emitted is emitted again under the same message ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_extractor_mid_run_loses_nothing() {
    kill_a_stage_mid_run(Stage::Extractor).await;
}

/// The transformer SIGKILLed halfway through a backlog of changes (started once the first batch
/// waits for it, killed once it acknowledged some and with changes in its hands and ahead): the
/// changes in its hands come back after the ack wait, and the rest of the backlog (with what the
/// extractor publishes after its death) goes to the transformer started in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_transformer_mid_run_loses_nothing() {
    kill_a_stage_mid_run(Stage::Transformer).await;
}

/// The deliveries a loader holds at most: `[loops] concurrency` (4) operations being handled,
/// and what its pull consumer fetched ahead, up to one and a half pull batches (a batch is the
/// concurrency; it asks for another when half of one is left).
const HELD_BY_A_LOADER: u64 = 4 + 6;

/// When a test stops NATS.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Moment {
    /// Every change published, 50 records confirmed.
    Sending,
    /// The run extracting (slowly), its first batch published and 20 records confirmed.
    Extracting,
}

/// NATS stopped (SIGTERM) mid-run, after some contacts were confirmed, kept down two seconds,
/// and started again on the same port and store. The sync triggers workflows, so each record is
/// one `events/send` with an idempotency key derived from the record. Asserts:
///
/// * the run completes (exit 0), every record confirmed, the contacts are the model;
/// * each contact was written once and its event fired once: N answers 200 for N records, one
///   `event_received` per contact, N events with N distinct idempotency keys;
/// * the only other answers are 409s (a request repeated with its key, which Loops refuses; the
///   loader then makes sure of the contact write with one `contacts/update`), at most one per
///   operation the loader held when the server
///   went away ([`HELD_BY_A_LOADER`]). A second request for a record needs a second handling
///   that reads the ledger before the first handling wrote it: the first was in hand at the
///   stop and its ledger write could not reach NATS, or a copy fetched before the stop is
///   handled after the restart while the server redelivers the same operation (its
///   acknowledgement and in-progress acks were lost). Anything published again after the
///   restart (a change whose duplicate-window entry went with its acknowledged message, when
///   the run is extracted again) finds its operation either still stored, and dropped as a
///   duplicate, or already acknowledged, hence in the ledger: no request.
async fn restart_nats_mid_run(workers: bool, moment: Moment) {
    let n: usize = match moment {
        Moment::Sending => 300,
        Moment::Extracting => ROWS,
    };
    let Some(server) = NatsServer::start().await else {
        return;
    };
    let options = StackOptions {
        rows: n,
        nats_url: Some(server.url()),
        sim_rate_limit: 1000,
        // Sending: 300 records over 3 s, so the stop lands mid-send even on a loaded machine
        // (at 200/s the 1.2 s left after 50 confirmations was once too short).
        requests_per_second: match moment {
            Moment::Sending => 100,
            Moment::Extracting => 200,
        },
        ack_wait_seconds: 2.0,
        extra_sync: "trigger_workflows = true",
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let mut scene = Scene::new(&stack, server.url(), Some(server));
    let mut processes = Vec::new();
    if workers {
        for stage in ["extractor", "transformer", "loader"] {
            processes.push(scene.worker(stage).await);
        }
    }
    if moment == Moment::Extracting {
        slow_down_emitting(&stack).await;
    }
    let runner = scene.runner(if workers { &["--remote"] } else { &[] });
    let mut at_stop = Progress::default();
    scene
        .until(
            &format!("the moment to stop NATS: {moment:?}"),
            Duration::from_secs(60),
            async || {
                at_stop = progress(&stack).await.unwrap_or_default();
                match moment {
                    Moment::Sending => at_stop.confirmed >= 50,
                    Moment::Extracting => {
                        at_stop.status == "extracting"
                            && at_stop.emitted > 0
                            && at_stop.confirmed >= 20
                    }
                }
            },
        )
        .await;
    if moment == Moment::Sending {
        // Loops holds every answer from now until NATS is down: the run cannot end before the
        // stop, however slowly this machine stops a server.
        stack
            .sim_post("faults", serde_json::json!({"latency_ms": 5_000}))
            .await;
    }
    scene.server().stop().await;
    if moment == Moment::Sending {
        stack.sim_post("faults", serde_json::json!({})).await;
    }
    let now = progress(&stack).await.unwrap_or_default();
    scene.check(
        now.confirmed < n as i64 && (moment == Moment::Sending || now.status == "extracting"),
        || format!("NATS stopped too late: at {at_stop:?}, now {now:?}"),
    );
    if moment == Moment::Extracting {
        speed_up_emitting(&stack).await;
    }
    eprintln!("NATS stopped at {at_stop:?}");
    // The outage: its length is the scenario, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(2)).await;
    scene.server().restart().await;
    let restarted = Instant::now();

    let (status, runs) = scene.finish(runner, Duration::from_secs(120)).await;
    eprintln!(
        "the run ended {:?} after NATS came back",
        restarted.elapsed()
    );
    scene.check(status == Some(0), || format!("exit {status:?}: {runs}"));
    let run = &runs[0];
    scene.check(
        run["status"] == "succeeded" && run["confirmed"] == n && run["expected"] == n,
        || format!("not every record confirmed: {run}"),
    );
    assert_contacts_are_the_model(&scene).await;
    let sends = answers(&stack, "POST /v1/events/send").await;
    let repeated = sends.get("409").copied().unwrap_or(0);
    scene.check(
        sends.get("200") == Some(&(n as u64))
            && sends.keys().all(|s| s == "200" || s == "409")
            && repeated <= HELD_BY_A_LOADER,
        || format!("not one write per contact: {sends:?}"),
    );
    // A 409 does not prove the contact write landed: each is followed by the write alone.
    let writes: u64 = answers(&stack, "PUT /v1/contacts/update")
        .await
        .values()
        .sum();
    scene.check(writes == repeated, || {
        format!("{writes} contacts/update for {repeated} answers 409")
    });
    let fired = stack.workflows("event_received").await;
    scene.check(fired == n, || {
        format!("{fired} event_received for {n} contacts")
    });
    let events = stack.sim.inspect("events").await;
    let events = events.as_array().expect("an event array");
    let keys: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["idempotencyKey"].as_str())
        .collect();
    let emails: std::collections::BTreeSet<&str> =
        events.iter().filter_map(|e| e["email"].as_str()).collect();
    scene.check(
        events.len() == n && keys.len() == n && emails.len() == n,
        || {
            format!(
                "{} events, {} idempotency keys, {} emails for {n} contacts",
                events.len(),
                keys.len(),
                emails.len()
            )
        },
    );
    eprintln!("events/send answers: {sends:?}");
}

/// `loopsync run --once` alone (every stage in its process) over a NATS server restarted
/// while it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_nats_while_sending_one_process() {
    restart_nats_mid_run(false, Moment::Sending).await;
}

/// Worker processes (extractor, transformer, loader) and `run --once --remote` over a NATS
/// server restarted while they send: every process reconnects and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_nats_while_sending_worker_processes() {
    restart_nats_mid_run(true, Moment::Sending).await;
}

/// `loopsync run --once` alone, NATS restarted while the run extracts: the changes not yet
/// published when NATS went away are published after it came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_nats_while_extracting_one_process() {
    restart_nats_mid_run(false, Moment::Extracting).await;
}

/// `loopsync runs --json`: the runs, newest first.
async fn runs(stack: &Stack) -> Value {
    let out = stack.output(&["runs", "--json"]).await;
    assert!(out.status.success(), "{out:?}");
    loopsync_testkit::json_data(&out.stdout).expect("runs --json")
}

/// `loopsync run --once` SIGKILLed while it sends (its process gone at once, nothing closed):
/// `runs` shows the run still in progress. Once its lease has lapsed — here its last sign of
/// life moved back past the lease, as if the kill were a minute old, rather than waiting half a
/// minute — the next run closes it `interrupted`, saying why, without waiting, and completes:
/// every contact in Loops, each created by one accepted request, each workflow event fired once.
async fn a_sigkilled_run_is_closed_interrupted(nats: bool) {
    const N: u64 = 60;
    let Some(stack) = Stack::start(StackOptions {
        rows: N as usize,
        nats,
        requests_per_second: 20,
        ack_wait_seconds: 2.0,
        extra_sync: "trigger_workflows = true",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    // With workflows, each contact is one `events/send` carrying its properties.
    const SEND: &str = "POST /v1/events/send";
    let mut victim = stack
        .command(&["run", "--once", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a run");
    loopsync_testkit::until(Duration::from_secs(60), "the run sends", || async {
        match stack.requests_to(SEND).await {
            n if n >= 10 => Ok(()),
            n => Err(format!("{n} events sent")),
        }
    })
    .await;
    // SIGKILL, by the child's own pid.
    victim.kill().await.expect("SIGKILL the run");
    let at_kill = stack.requests_to(SEND).await;
    assert!(at_kill < N, "the run was over before the kill: {at_kill}");

    let left = runs(&stack).await;
    assert_eq!(left.as_array().map(Vec::len), Some(1), "{left}");
    assert!(
        ["extracting", "sending"].contains(&left[0]["status"].as_str().unwrap_or_default())
            && left[0]["finished_at"].is_null(),
        "no one closed the killed run: {left}"
    );
    stack
        .sql(
            "UPDATE loopsync.runs SET heartbeat_at = heartbeat_at - interval '1 minute'
              WHERE finished_at IS NULL",
        )
        .await;

    let next = stack.run_once(&[]).await;
    assert_eq!(next.status, 0, "{}", next.stderr);
    assert!(
        !next.stderr.contains("is in progress"),
        "the lease had lapsed: nothing to wait for: {}",
        next.stderr
    );
    let runs = runs(&stack).await;
    let (newest, killed) = (&runs[0], &runs[1]);
    assert_eq!(killed["id"], left[0]["id"], "{runs}");
    assert_eq!(killed["status"], "interrupted", "{runs}");
    assert!(!killed["finished_at"].is_null(), "{runs}");
    assert!(
        killed["error"]
            .as_str()
            .unwrap_or_default()
            .starts_with("its process stopped (no sign of life since "),
        "{runs}"
    );
    assert_eq!(newest["status"], "succeeded", "{runs}");
    assert_eq!(newest["id"], next.run()["id"]);

    // Loops: every record once.
    assert_eq!(stack.contacts().await.len() as u64, N);
    let seen = stack.sim.seen().await;
    assert_eq!(
        seen.answered(SEND, 200),
        N,
        "one accepted request per contact (a repeat meets its key: 409): {seen:?}"
    );
    assert_eq!(stack.workflows("event_received").await as u64, N);
    assert_eq!(stack.workflows("contact_added").await as u64, N);
}

/// In one process (the in-process bus: what was in flight died with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_run_is_closed_interrupted_in_one_process() {
    a_sigkilled_run_is_closed_interrupted(false).await;
}

/// The stages in the run's process over NATS (its queues outlive it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_run_is_closed_interrupted_over_nats() {
    a_sigkilled_run_is_closed_interrupted(true).await;
}
