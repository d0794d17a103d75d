//! The protocol under histories built to break it (issue "Adversarial histories"): each test is
//! one case that once left Loops different from the model, or sent a contact to another
//! deployment's Loops, with every run exiting 0. Each fails with its fix undone.

use std::time::Duration;

use loopsync_testkit::{Stack, StackOptions, output_within, sigterm, until};

/// Case 4: two deployments (their own warehouse and state, their own Loops) on one NATS
/// namespace with the same sync name, workers of both running at once. Each Loops receives
/// its own contacts and nothing of the other's: the messages of a deployment are scoped by its
/// installation (streams, subjects and consumers of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deployments_on_one_namespace_keep_their_contacts() {
    let options = StackOptions {
        rows: 40,
        nats: true,
        ..StackOptions::default()
    };
    let Some(a) = Stack::start(options.clone()).await else {
        return;
    };
    let Some(b) = Stack::start(options).await else {
        return;
    };
    b.sql("UPDATE users SET email = 'b-' || email").await;
    // B on A's namespace: the one staging and production share when neither sets one.
    let namespace = &a.nats.as_ref().expect("a NATS stack").namespace;
    let own = &b.nats.as_ref().expect("a NATS stack").namespace;
    let config = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(
        &b.config,
        config.replace(
            &format!("namespace = \"{own}\""),
            &format!("namespace = \"{namespace}\""),
        ),
    )
    .unwrap();
    let mut workers = Vec::new();
    for stack in [&a, &b] {
        for stage in ["extractor", "transformer", "loader", "loader"] {
            workers.push(stack.worker(stage).await);
        }
    }
    let run = |stack: &Stack| {
        let mut command = stack.command(&["run", "--once", "--remote", "--json"]);
        async move {
            output_within(
                &mut command,
                Duration::from_secs(120),
                "loopsync run --once --remote",
            )
            .await
        }
    };
    let (ran_a, ran_b) = tokio::join!(run(&a), run(&b));
    for ran in [&ran_a, &ran_b] {
        assert_eq!(
            ran.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&ran.stderr)
        );
    }
    let (in_a, in_b) = (a.contacts().await, b.contacts().await);
    let foreign_in_a = in_a.keys().filter(|e| e.starts_with("b-")).count();
    let foreign_in_b = in_b.keys().filter(|e| !e.starts_with("b-")).count();
    assert_eq!(
        (foreign_in_a, foreign_in_b),
        (0, 0),
        "Loops A received {foreign_in_a} of B's contacts, Loops B {foreign_in_b} of A's"
    );
    assert_eq!((in_a.len(), in_b.len()), (40, 40));
}

/// A quiet `run --once` in one process, once Loops has taken `writes` of its writes.
async fn sending(stack: &Stack, writes: u64) -> tokio::process::Child {
    let run = stack
        .command(&["run", "--once", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a run");
    until(Duration::from_secs(60), "the run sends", || async {
        match stack.update_requests().await {
            n if n >= writes => Ok(()),
            n => Err(format!("{n} writes")),
        }
    })
    .await;
    run
}

/// Case 11: a run killed with SIGKILL mid-send, restarted at once (what systemd, Kubernetes or
/// cron do): the restart waits out the dead run's lease, saying so, and completes the sync
/// (exit 0), where it used to exit 1 with "run 1 … is in progress".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_restarted_after_a_kill_goes_on() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 300,
        requests_per_second: 20,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let mut victim = sending(&stack, 10).await;
    victim.kill().await.expect("SIGKILL the run");
    let restarted = stack.run_once(&[]).await;
    assert_eq!(restarted.status, 0, "{}", restarted.stderr);
    assert!(
        restarted.stderr.contains("is in progress") && restarted.stderr.contains("lease"),
        "the restart says what it waits for: {}",
        restarted.stderr
    );
    assert_eq!(stack.contacts().await.len(), 300);
    let interrupted = stack
        .count("SELECT count(*) FROM loopsync.runs WHERE status = 'interrupted'")
        .await;
    assert_eq!(interrupted, 1, "the killed run is closed as interrupted");
}

/// Case 3: over NATS with workers, 300 new contacts with `trigger_workflows`; the waiting
/// `run --once --remote` is stopped by SIGTERM once some are sent, and run again at once. The
/// queue NATS still holds is sent by the workers; the second run extracts those records again
/// before their confirmations reach the state, and its copies of the same changes (the same
/// idempotency keys) are answered from the loader's ledger: one request per contact, each
/// event fired once (it used to be 790 requests for 300 records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_then_the_next_send_each_change_once() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 300,
        nats: true,
        requests_per_second: 40,
        extra_sync: "trigger_workflows = true",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let _workers = [
        stack.worker("extractor").await,
        stack.worker("transformer").await,
        stack.worker("loader").await,
    ];
    let mut first = stack
        .command(&["run", "--once", "--remote", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a run");
    until(Duration::from_secs(60), "the first run sends", || async {
        match stack.sim.seen().await.total {
            n if n >= 50 => Ok(()),
            n => Err(format!("{n} requests")),
        }
    })
    .await;
    sigterm(&first).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), first.wait()).await;
    let second = stack.run_once(&["--remote"]).await;
    assert_eq!(second.status, 0, "{}", second.stderr);
    // The second run ended when its own records had outcomes; the first run's queue may still
    // be draining: wait until every contact is there.
    until(Duration::from_secs(60), "every contact written", || async {
        match stack.contacts().await.len() {
            300 => Ok(()),
            n => Err(format!("{n} contacts")),
        }
    })
    .await;
    let seen = stack.sim.seen().await;
    let events = stack.requests_to("POST /v1/events/send").await;
    assert!(
        seen.total <= 310,
        "{} requests for 300 records ({events} events): {:?}",
        seen.total,
        seen.by_endpoint
    );
    assert_eq!(
        stack.workflows("event_received").await,
        300,
        "each event fired once"
    );
}

/// The model of the stack's `users` sync, slowed: the diff returns no row for `secs` seconds.
fn slow_model(stack: &Stack, secs: u32) {
    let config = std::fs::read_to_string(&stack.config).unwrap();
    let slow = config.replace(
        "from users\"",
        &format!("from users, (select pg_sleep({secs})) slow\""),
    );
    assert_ne!(config, slow, "the model is slowed");
    std::fs::write(&stack.config, slow).unwrap();
}

/// Case 8: a slow extraction (the diff returns no row for 9 s) is not a stalled run: the
/// extractor's sign of life is progress, so a stall timeout shorter than the diff does not
/// fail it (it used to close the run `failed` while the extractor went on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_extraction_is_not_a_stall() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    slow_model(&stack, 9);
    let ran = stack.run_once(&["--stall-timeout", "7"]).await;
    assert_eq!(ran.status, 0, "{}", ran.stderr);
    assert_eq!(ran.run()["confirmed"], 5, "{}", ran.stderr);
    assert_eq!(stack.contacts().await.len(), 5);
}

/// Case 8, the other half: a run closed while its (remote) extractor is still reading the
/// model — its waiting `run` stopped by SIGTERM — gets nothing more: the extractor sees that
/// the run is no longer extracting before it publishes, and nothing reaches Loops for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_closed_during_its_extraction_sends_nothing() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        nats: true,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    slow_model(&stack, 6);
    let _workers = [
        stack.worker("extractor").await,
        stack.worker("transformer").await,
        stack.worker("loader").await,
    ];
    let mut run = stack
        .command(&["run", "--once", "--remote", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start a run");
    until(Duration::from_secs(60), "the run extracts", || async {
        match stack
            .count("SELECT count(*) FROM loopsync.runs WHERE status = 'extracting'")
            .await
        {
            1 => Ok(()),
            n => Err(format!("{n} runs extracting")),
        }
    })
    .await;
    sigterm(&run).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), run.wait()).await;
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.runs WHERE status = 'interrupted'")
            .await,
        1,
        "the run is closed"
    );
    // The next run, once the first one's diff has ended: it sends every row, and the first
    // run has no record (its extractor published nothing once its diff ended).
    let second = stack.run_once(&["--remote"]).await;
    assert_eq!(second.status, 0, "{}", second.stderr);
    assert_eq!(second.run()["confirmed"], 5, "{}", second.stderr);
    assert_eq!(
        stack
            .count(
                "SELECT count(*) FROM loopsync.records x JOIN loopsync.runs r ON r.id = x.run_id \
                  WHERE r.status = 'interrupted'"
            )
            .await,
        0,
        "nothing was emitted for the closed run"
    );
    assert_eq!(stack.update_requests().await, 5);
}

/// In one process (its bus in memory), a run stopped by SIGTERM mid-send: every write Loops
/// answered is confirmed in the state. The checkpointer stops last and first takes the outcomes
/// the loaders published while they wound down; they used to be lost with the process, so the
/// next run sent those records again (and past Loops' 24 hours of keys, their events fire again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_stopped_in_one_process_keeps_every_confirmation() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 300,
        requests_per_second: 20,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let mut run = sending(&stack, 30).await;
    sigterm(&run).await;
    tokio::time::timeout(Duration::from_secs(15), run.wait())
        .await
        .expect("the run stops within 15 s")
        .unwrap();
    let answered = stack
        .sim
        .seen()
        .await
        .answered("PUT /v1/contacts/update", 200);
    let confirmed = stack
        .count("SELECT count(*) FROM loopsync.state WHERE confirmed_fp IS NOT NULL")
        .await;
    assert!((30..300).contains(&answered), "{answered} writes answered");
    assert_eq!(
        confirmed as u64, answered,
        "every write Loops answered is confirmed in the state"
    );
}
