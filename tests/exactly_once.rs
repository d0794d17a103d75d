//! Nothing stale, nothing twice: each case of a record's history that once left Loops wrong
//! while the run said `succeeded`, end to end (the binary, PostgreSQL, the simulator, NATS
//! where said).

use loopsync_testkit::{Stack, StackOptions};
use serde_json::{Value, json};

fn mirror_with_events(rows: usize) -> StackOptions {
    StackOptions {
        rows,
        behavior: "mirror",
        extra_sync: "trigger_workflows = true\nmax_removal_share = 1.0",
        ..StackOptions::default()
    }
}

async fn ok_run(stack: &Stack) -> Value {
    let out = stack.run_once(&[]).await;
    assert_eq!(out.status, 0, "{} {}", out.runs, out.stderr);
    out.run().clone()
}

/// A row leaves (its contact is deleted) and comes back unchanged: a new change, with a new
/// idempotency key, so the contact is created again and its event fires again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_comes_back_is_created_again() {
    let Some(stack) = Stack::start(mirror_with_events(3)).await else {
        return;
    };
    ok_run(&stack).await;
    stack.sql("DELETE FROM users WHERE id = 2").await;
    ok_run(&stack).await;
    assert!(!stack.contacts().await.contains_key("user2@example.com"));
    stack
        .sql(
            "INSERT INTO users VALUES (2, 'user2@example.com', 'First2', 'team', 2,
                                       timestamptz '2024-01-01 02:00:00+00', true)",
        )
        .await;
    let (back, seen) = stack.run_seen(&[]).await;
    assert_eq!(back.status, 0, "{}", back.stderr);
    assert_eq!(
        seen.answered("POST /v1/events/send", 200),
        1,
        "a new key, not a 409: {seen:?}"
    );
    let contacts = stack.contacts().await;
    assert_eq!(contacts["user2@example.com"]["firstName"], "First2");
    assert_eq!(
        stack.workflows("event_received").await,
        4,
        "3 creates, 1 return"
    );
}

/// free → gold → free within Loops' 24 hours of keys: the third change is not the first one's
/// key, so Loops applies it and Loops ends with `free`, one event per change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_goes_back_reaches_loops() {
    let Some(stack) = Stack::start(mirror_with_events(2)).await else {
        return;
    };
    ok_run(&stack).await;
    for plan in ["gold", "pro"] {
        stack
            .sql(&format!("UPDATE users SET plan = '{plan}' WHERE id = 1"))
            .await;
        ok_run(&stack).await;
        assert_eq!(
            stack.contacts().await["user1@example.com"]["planName"],
            plan
        );
    }
    let seen = stack.sim.seen().await;
    assert_eq!(seen.answered("POST /v1/events/send", 409), 0, "{seen:?}");
    assert_eq!(stack.workflows("event_received").await, 4);
}

/// A record parked at a fingerprint, later confirmed at another one, whose data then returns to
/// the parked value: it is sent, not skipped forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_record_confirmed_later_is_not_parked_anymore() {
    let Some((stack, _)) = Stack::with_dead_letters(StackOptions {
        rows: 2,
        max_attempts: 1,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let parked = stack.output(&["dlq", "park", "--key", "1", "--json"]).await;
    assert!(parked.status.success());
    stack.sim_post("faults", json!({})).await;
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id = 1")
        .await;
    ok_run(&stack).await;
    assert_eq!(
        stack.contacts().await["user1@example.com"]["planName"],
        "gold"
    );
    // Back to the value it was parked at.
    stack
        .sql("UPDATE users SET plan = 'pro' WHERE id = 1")
        .await;
    let (run, seen) = stack.run_seen(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(seen.writes(), 1, "{seen:?}");
    assert_eq!(
        stack.contacts().await["user1@example.com"]["planName"],
        "pro"
    );
}

/// Mirror, one run: record 1 leaves (its contact is `a@…`) while record 101 arrives with the same
/// email. The contact is 101's now: it is not deleted, whatever the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_never_deletes_a_contact_another_record_claims() {
    for nats in [false, true] {
        let Some(stack) = Stack::start(StackOptions {
            rows: 4,
            nats,
            behavior: "mirror",
            extra_sync: "max_removal_share = 1.0",
            ..StackOptions::default()
        })
        .await
        else {
            return;
        };
        ok_run(&stack).await;
        stack
            .sql(
                "DELETE FROM users WHERE id = 1;
                 INSERT INTO users VALUES (101, 'user1@example.com', 'Newcomer', 'team', 1,
                                           now(), false);",
            )
            .await;
        let (run, seen) = stack.run_seen(&[]).await;
        assert_eq!(run.status, 0, "{}", run.stderr);
        assert_eq!(seen.to("POST /v1/contacts/delete"), 0, "{seen:?}");
        let contacts = stack.contacts().await;
        assert_eq!(contacts["user1@example.com"]["firstName"], "Newcomer");
        assert_eq!(contacts.len(), 4);
        // The record that left is out of the state; the one that came is in it.
        assert_eq!(
            stack
                .count("SELECT count(*) FROM loopsync.state WHERE confirmed_fp IS NOT NULL")
                .await,
            4
        );
        let again = stack.run_seen(&[]).await.1;
        assert_eq!(again.writes(), 0, "{again:?}");
    }
}

/// A model that returns no rows (a bad WHERE, an emptied table) removes nothing: the run fails
/// with the counts, before any removal. `--allow-removals` goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_removal_guard_holds_back_mass_removals() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        behavior: "mirror",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    ok_run(&stack).await;
    stack.sql("DELETE FROM users").await;
    // Even a share of 1 lets no empty model remove: the only way on is --allow-removals.
    let config = std::fs::read_to_string(&stack.config).unwrap();
    let all = config.replace(
        "behavior = \"mirror\"",
        "behavior = \"mirror\"\nmax_removal_share = 1.0",
    );
    std::fs::write(&stack.config, &all).unwrap();
    // The plan says beforehand that the guard would stop the run, by the run's own rule.
    let plan = stack.output(&["plan"]).await;
    let plan = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert!(
        plan.contains(
            "a run would fail: the model returned no rows, so this run would remove all 10 contacts"
        ) && plan.contains("the removal guard would stop it")
            && plan.contains("--allow-removals")
            && !plan.contains("raise max_removal_share"),
        "{plan}"
    );
    let planned = stack.output(&["plan", "--json"]).await;
    let planned = loopsync_testkit::json_data(&planned.stdout).unwrap();
    assert!(
        planned[0]["counts"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("the removal guard would stop it")),
        "{planned}"
    );
    let (run, seen) = stack.run_seen(&[]).await;
    assert_eq!(run.status, 1, "failed: {}", run.stderr);
    let report = run.run();
    assert_eq!(report["status"], "failed");
    assert_eq!(report["removed"], 10);
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("the model returned no rows, so this run would remove all 10 contacts")
            && error.contains("--allow-removals")
            && !error.contains("max_removal_share"),
        "raising max_removal_share would do nothing: {report}"
    );
    std::fs::write(&stack.config, &config).unwrap();
    assert_eq!(seen.to("POST /v1/contacts/delete"), 0, "{seen:?}");
    assert_eq!(stack.contacts().await.len(), 10);

    // 3 of 10 is more than the default 20 %.
    stack
        .sql(
            "INSERT INTO users SELECT g, 'user' || g || '@example.com', 'First' || g,
                    (ARRAY['free', 'pro', 'team'])[1 + g % 3], g % 7,
                    timestamptz '2024-01-01 00:00:00+00' + g * interval '1 hour', g % 2 = 0
               FROM generate_series(4, 10) AS g",
        )
        .await;
    let (run, seen) = stack.run_seen(&[]).await;
    assert_eq!(run.status, 1, "{}", run.stderr);
    assert!(
        run.run()["error"]
            .as_str()
            .unwrap()
            .contains("would remove 3 of the 10 contacts the sync confirmed (30.0 %), more than max_removal_share (20.0 %)"),
        "{}",
        run.runs
    );
    assert_eq!(seen.to("POST /v1/contacts/delete"), 0, "{seen:?}");
    let (run, seen) = stack.run_seen(&["--allow-removals"]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(seen.to("POST /v1/contacts/delete"), 3, "{seen:?}");
    assert_eq!(stack.contacts().await.len(), 7);
}

/// One run of a sync at a time: a second `run --once` while the first is sending says so and
/// changes nothing (it waits only until the first run's holder shows a sign of life: a
/// heartbeat, every 5 s, so the first run lasts longer); the first completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_a_sync_says_one_is_in_progress() {
    // Loops' limit is the budget: the second command must not spend it (it used to make its
    // preflight requests first, meet 429s for 40 s, and fail as "rate limited").
    let Some(stack) = Stack::start(StackOptions {
        rows: 100,
        sim_rate_limit: 10,
        requests_per_second: 10,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let mut first = stack.command(&["run", "--once", "--json"]);
    let first = tokio::spawn(async move {
        loopsync_testkit::output_within(
            &mut first,
            loopsync_testkit::COMMAND_DEADLINE,
            "the first run",
        )
        .await
    });
    loopsync_testkit::until(
        std::time::Duration::from_secs(30),
        "the first run sends",
        || async {
            let n = stack.update_requests().await;
            if n > 0 {
                Ok(())
            } else {
                Err(format!("{n} writes"))
            }
        },
    )
    .await;
    let before = stack.sim.seen().await;
    let started = std::time::Instant::now();
    let second = stack.output(&["run", "--once", "--json"]).await;
    let took = started.elapsed();
    let seen = stack.sim.seen().await.since(&before);
    assert_eq!(second.status.code(), Some(1));
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains("run 1 of sync users is in progress")
            && said.contains("one run of a sync at a time")
            && !said.contains("rate limited"),
        "{said}"
    );
    assert!(
        took < std::time::Duration::from_secs(10),
        "said within a heartbeat, not after retries: {took:?}\n{said}"
    );
    assert_eq!(
        seen.to("GET /v1/api-key"),
        0,
        "the second asked nothing of Loops: {seen:?}"
    );
    let first = first.await.unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    // Each contact written once (a 429 of the first run's own, under a loaded machine, is
    // retried: counted apart).
    assert_eq!(
        stack
            .sim
            .seen()
            .await
            .answered("PUT /v1/contacts/update", 200),
        100,
        "each contact once"
    );
    assert_eq!(stack.count("SELECT count(*) FROM loopsync.runs").await, 1);
}

/// The state dropped and made again (or another warehouse on the same NATS namespace): run ids
/// start at 1 again, and neither JetStream's duplicate window nor the old ledger mistakes the
/// new runs for the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_state_on_the_same_nats_is_not_the_old_one() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        nats: true,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    ok_run(&stack).await;
    stack.sql("DROP SCHEMA loopsync CASCADE").await;
    stack.sim_post("reset", json!({})).await;
    let (run, seen) = stack.run_seen(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(run.run()["id"], 1, "run ids start again");
    assert_eq!(run.run()["confirmed"], 5, "not skipped by the old ledger");
    assert_eq!(seen.to("PUT /v1/contacts/update"), 5, "{seen:?}");
    assert_eq!(stack.contacts().await.len(), 5);
}

/// The one email rule: the duplicate check trims what the product trims (tabs, newlines,
/// no-break spaces) and folds case as the product does; an empty email is nobody's duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_are_compared_by_one_rule() {
    for sqlite in [false, true] {
        let Some(stack) = Stack::start(StackOptions {
            rows: 2,
            sqlite,
            identify_by: "userId",
            ..StackOptions::default()
        })
        .await
        else {
            return;
        };
        let (tab, nbsp) = if sqlite {
            ("char(9)", "char(160)")
        } else {
            ("chr(9)", "chr(160)")
        };
        stack
            .sql(&format!(
                "INSERT INTO users (id, email, first_name, plan, seats, newsletter)
                 VALUES (3, {tab} || 'User1@Example.com' || {nbsp}, 'Twin', 'free', 1, false),
                        (4, '', 'NoMail', 'free', 1, false),
                        (5, '', 'NoMail', 'free', 1, false);"
            ))
            .await;
        let out = stack.run_once(&[]).await;
        assert_eq!(out.status, 3, "{}", out.stderr);
        let invalid = stack
            .count("SELECT count(*) FROM loopsync.records WHERE reason LIKE '%is on 2 rows%'")
            .await;
        assert_eq!(invalid, 2, "rows 1 and 3 (sqlite: {sqlite})");
        let no_email = stack
            .count(
                "SELECT count(*) FROM loopsync.records WHERE reason = 'a new contact needs an email'",
            )
            .await;
        assert_eq!(
            no_email, 2,
            "rows 4 and 5 are not duplicates (sqlite: {sqlite})"
        );
    }
}
