//! `loopsync verify` against real processes: the `loopsync` binary, PostgreSQL and the Loops
//! simulator. Someone else changes Loops behind the sync's back (through the simulator's own
//! Loops API, as another tool of the team would); verify reads the contacts back, reports each
//! drift with its key and field, and `--repair` makes the next run re-send exactly those.

use loopsync_testkit::{Seen, Stack, StackOptions};
use serde_json::{Value, json};

const FIND: &str = "GET /v1/contacts/find";

/// `loopsync verify --json ARGS…`: its exit status, its report, and what Loops received.
async fn verify(stack: &Stack, args: &[&str]) -> (i32, Value, Seen) {
    let before = stack.sim.seen().await;
    let mut all = vec!["verify", "--json"];
    all.extend_from_slice(args);
    let output = stack.output(&all).await;
    let seen = stack.sim.seen().await.since(&before);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = loopsync_testkit::json_data(stdout.as_bytes()).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON report ({e}); exit {:?}, stdout {stdout}, stderr {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert_eq!(report["v"], 1, "{report:#}");
    (output.status.code().unwrap_or(-1), report, seen)
}

/// The drifts of a report as (key, field), `field` `"(missing)"` for a contact not in Loops.
fn drifts(report: &Value) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = report["syncs"][0]["drifts"]
        .as_array()
        .expect("a drift list")
        .iter()
        .map(|d| {
            (
                d["key"].as_str().unwrap().to_owned(),
                d["field"].as_str().unwrap_or("(missing)").to_owned(),
            )
        })
        .collect();
    all.sort();
    all
}

/// Only `contacts/find`, `n` times: verify writes nothing to Loops.
fn only_finds(seen: &Seen, n: u64) {
    assert_eq!(
        seen.by_endpoint.keys().collect::<Vec<_>>(),
        [FIND],
        "verify sends nothing but finds: {seen:?}"
    );
    assert_eq!(seen.to(FIND), n, "{seen:?}");
    assert_eq!(seen.writes(), 0);
}

#[tokio::test]
async fn verify_reports_drift_and_repair_resends_exactly_the_drifted() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    drift_and_repair(&stack).await;
}

/// The same on an SQLite warehouse, whose dates and booleans read as other text.
#[tokio::test]
async fn verify_and_repair_on_sqlite() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        sqlite: true,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    drift_and_repair(&stack).await;
}

async fn drift_and_repair(stack: &Stack) {
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(first.run()["confirmed"], 10);

    // Right after a run, Loops holds what it confirmed: dates, numbers, lists and all.
    let (status, report, seen) = verify(stack, &[]).await;
    assert_eq!(status, 0, "{report:#}");
    assert_eq!(
        (report["checked"].as_i64(), report["drifted"].as_i64()),
        (Some(10), Some(0)),
        "{report:#}"
    );
    only_finds(&seen, 10);

    // Someone else changes Loops: a property edited (user3 is on "free"), a contact deleted,
    // a contact taken off the newsletter (even ids are on it).
    stack
        .loops(
            reqwest::Method::PUT,
            "/v1/contacts/update",
            json!({"email": "user3@example.com", "planName": "gold"}),
        )
        .await;
    stack
        .loops(
            reqwest::Method::POST,
            "/v1/contacts/delete",
            json!({"email": "user5@example.com"}),
        )
        .await;
    stack
        .loops(
            reqwest::Method::PUT,
            "/v1/contacts/update",
            json!({"email": "user4@example.com", "mailingLists": {"cm_news": false}}),
        )
        .await;

    let (status, report, seen) = verify(stack, &[]).await;
    assert_eq!(status, 1, "drift found: exit 1; {report:#}");
    let sync = &report["syncs"][0];
    assert_eq!(
        (
            sync["checked"].as_i64(),
            sync["drifted"].as_i64(),
            sync["skipped"].as_i64()
        ),
        (Some(10), Some(3), Some(0)),
        "{report:#}"
    );
    assert_eq!(
        drifts(&report),
        [
            ("3".to_owned(), "planName".to_owned()),
            ("4".to_owned(), "mailingLists.cm_news".to_owned()),
            ("5".to_owned(), "(missing)".to_owned()),
        ],
        "{report:#}"
    );
    let by_key = |key: &str| {
        sync["drifts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["key"] == key)
            .unwrap()
            .clone()
    };
    let plan = by_key("3");
    assert_eq!(
        (&plan["kind"], &plan["loops"], &plan["confirmed"]),
        (&json!("property"), &json!("gold"), &json!("free"))
    );
    assert_eq!(plan["email"], "user3@example.com");
    assert_eq!(
        plan["text"],
        "planName is \"gold\" in Loops, \"free\" confirmed"
    );
    assert_eq!(by_key("4")["kind"], "list");
    assert_eq!(by_key("5")["kind"], "missing");
    assert_eq!(by_key("5")["text"], "not in Loops");
    assert_eq!(
        sync["repaired"],
        Value::Null,
        "no --repair, nothing forgotten"
    );
    only_finds(&seen, 10);

    // The text report says the same, one line per drift.
    let output = stack.output(&["verify"]).await;
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("checked 10 · drifted 3 · skipped 0"),
        "{text}"
    );
    assert!(
        text.contains(
            "key 3 (user3@example.com): planName is \"gold\" in Loops, \"free\" confirmed"
        ),
        "{text}"
    );
    assert!(
        text.contains("key 5 (user5@example.com): not in Loops"),
        "{text}"
    );

    // --repair forgets the three confirmations; the run after sends exactly those.
    let (status, report, seen) = verify(stack, &["--repair"]).await;
    assert_eq!(status, 1, "{report:#}");
    assert_eq!(report["syncs"][0]["repaired"], 3, "{report:#}");
    only_finds(&seen, 10);
    let (status, report, _) = verify(stack, &[]).await;
    assert_eq!(
        status, 0,
        "repaired records wait for the next run: {report:#}"
    );
    let sync = &report["syncs"][0];
    assert_eq!(
        (
            sync["checked"].as_i64(),
            sync["skipped"].as_i64(),
            sync["skipped_by_reason"]["repaired"].as_i64()
        ),
        (Some(7), Some(3), Some(3)),
        "{report:#}"
    );

    let (run, seen) = stack.run_seen(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(seen.writes(), 3, "one write per drifted record: {seen:?}");
    assert_eq!(seen.to("PUT /v1/contacts/update"), 3, "{seen:?}");
    let r = run.run();
    assert_eq!(
        (
            r["changed"].as_i64(),
            r["unchanged"].as_i64(),
            r["confirmed"].as_i64()
        ),
        (Some(3), Some(7), Some(3)),
        "{r:#}"
    );
    let contacts = stack.contacts().await;
    assert_eq!(contacts["user3@example.com"]["planName"], "free");
    assert_eq!(
        contacts["user4@example.com"]["mailingLists"]["cm_news"],
        true
    );
    assert_eq!(contacts["user5@example.com"]["planName"], "team");

    let (status, report, seen) = verify(stack, &[]).await;
    assert_eq!(status, 0, "{report:#}");
    assert_eq!(
        (report["checked"].as_i64(), report["drifted"].as_i64()),
        (Some(10), Some(0)),
        "{report:#}"
    );
    only_finds(&seen, 10);
}

#[tokio::test]
async fn samples_are_deterministic_and_pending_changes_are_skipped() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 30,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    // A pending change (the next run sends it) and a row that left the model (upsert keeps
    // its contact): neither is verified.
    stack
        .sql("UPDATE users SET plan = 'enterprise' WHERE id = 7; DELETE FROM users WHERE id = 8;")
        .await;

    let keys = |report: &Value| -> Vec<String> {
        report["syncs"][0]["checked_keys"]
            .as_array()
            .map(|a| a.iter().map(|k| k.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let (status, a, seen) = verify(&stack, &["--sample", "5"]).await;
    assert_eq!(status, 0, "{a:#}");
    let sync = &a["syncs"][0];
    assert_eq!(
        (
            sync["confirmed"].as_i64(),
            sync["eligible"].as_i64(),
            sync["checked"].as_i64(),
            sync["skipped"].as_i64(),
            sync["skipped_by_reason"]["changed"].as_i64(),
            sync["skipped_by_reason"]["removed"].as_i64(),
        ),
        (Some(30), Some(28), Some(5), Some(2), Some(1), Some(1)),
        "{a:#}"
    );
    only_finds(&seen, 5);
    let checked = keys(&a);
    assert_eq!(checked.len(), 5, "{a:#}");
    assert!(!checked.contains(&"7".to_owned()) && !checked.contains(&"8".to_owned()));

    let (_, again, _) = verify(&stack, &["--sample", "5"]).await;
    assert_eq!(
        keys(&again),
        checked,
        "the same seed checks the same records"
    );
    let (_, other, _) = verify(&stack, &["--sample", "5", "--seed", "11"]).await;
    assert_eq!(keys(&other).len(), 5);
    assert_ne!(keys(&other), checked, "another seed, another sample");

    let (status, all, seen) = verify(&stack, &["--sample", "all"]).await;
    assert_eq!(status, 0, "{all:#}");
    assert_eq!(all["syncs"][0]["checked"], 28, "{all:#}");
    only_finds(&seen, 28);

    // Bad usage: exit 2, nothing asked of Loops.
    let before = stack.sim.seen().await;
    for args in [
        &["verify", "--sample", "many"][..],
        &["verify", "--sync", "nope"][..],
    ] {
        let output = stack.output(args).await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(stack.sim.seen().await.since(&before).total, 0);
}

/// Under mirror, a repaired record whose row then leaves the model is still removed from
/// Loops: the forgotten confirmation keeps the identifiers, and the run decides *removed*.
#[tokio::test]
async fn a_repaired_record_that_leaves_the_model_is_removed_under_mirror() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        behavior: "mirror",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    stack
        .loops(
            reqwest::Method::PUT,
            "/v1/contacts/update",
            json!({"email": "user2@example.com", "firstName": "Someone Else"}),
        )
        .await;
    let (status, report, _) = verify(&stack, &["--repair"]).await;
    assert_eq!(status, 1, "{report:#}");
    assert_eq!(
        drifts(&report),
        [("2".to_owned(), "firstName".to_owned())],
        "{report:#}"
    );
    assert_eq!(report["syncs"][0]["repaired"], 1);

    stack.sql("DELETE FROM users WHERE id = 2;").await;
    let (run, seen) = stack.run_seen(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(run.run()["removed"], 1, "{:#}", run.run());
    assert_eq!(seen.to("POST /v1/contacts/delete"), 1, "{seen:?}");
    assert_eq!(seen.writes(), 1, "{seen:?}");
    assert!(!stack.contacts().await.contains_key("user2@example.com"));

    let (status, report, _) = verify(&stack, &[]).await;
    assert_eq!(status, 0, "{report:#}");
    let sync = &report["syncs"][0];
    assert_eq!(
        (sync["confirmed"].as_i64(), sync["checked"].as_i64()),
        (Some(9), Some(9)),
        "{report:#}"
    );
}

/// A long verify says how far it is: a line when the reads begin, then one every 10 s on a
/// pipe (the contacts read back, and the time left at the rate budget).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_verify_says_how_far_it_is() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 24,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    assert_eq!(stack.run_once(&[]).await.status, 0);
    // Two reads a second: 24 contacts take 12 s.
    let config = std::fs::read_to_string(&stack.config).unwrap();
    std::fs::write(
        &stack.config,
        config.replace("requests_per_second = 50", "requests_per_second = 2"),
    )
    .unwrap();
    let out = stack.output(&["verify", "--sample", "all"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("contacts read back from Loops"))
        .collect();
    assert!(
        lines.len() >= 2
            && lines[0].contains("verify users: 0/24 contacts read back from Loops")
            && lines[0].contains("left at 2/s")
            && !lines[1].contains(" 0/24 "),
        "{stderr}"
    );
}
