//! `loopsync record` and `loopsync verify --key` against real processes: the binary,
//! PostgreSQL and the Loops simulator.
//!
//! `record` shows one record: created, then updated, then rejected once by Loops, with each
//! outcome's request kind, Loops' answer and reason; and what the next run would send, for a
//! record with a change pending in the model. `verify --key` reads back only the contacts asked
//! for, and finds drift made in Loops on that contact and not on the others.

use loopsync_testkit::{Seen, Stack, StackOptions};
use reqwest::Method;
use serde_json::{Value, json};

/// `loopsync ARGS…` without Loops' key: exit status, stdout, stderr.
async fn without_key(stack: &Stack, args: &[&str]) -> (i32, String, String) {
    let mut command = stack.command(args);
    command.env_remove("LOOPS_API_KEY");
    let output = loopsync_testkit::output_within(
        &mut command,
        loopsync_testkit::COMMAND_DEADLINE,
        &format!("loopsync {}", args.join(" ")),
    )
    .await;
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `loopsync record --sync users KEY --json`'s data.
async fn record(stack: &Stack, key: &str) -> Value {
    let (code, stdout, stderr) =
        without_key(stack, &["record", "--sync", "users", key, "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["command"], "record");
    loopsync_testkit::json_data(stdout.as_bytes()).unwrap()
}

/// (run, change, operation, outcome, status) of each outcome of a record.
fn outcomes(record: &Value) -> Vec<(i64, String, String, String, Option<u64>)> {
    record["outcomes"]
        .as_array()
        .expect("outcomes")
        .iter()
        .map(|o| {
            (
                o["run_id"].as_i64().unwrap(),
                o["change"].as_str().unwrap_or("-").to_owned(),
                o["operation"].as_str().unwrap().to_owned(),
                o["outcome"].as_str().unwrap().to_owned(),
                o["status"].as_u64(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_shows_its_history_and_the_next_change() {
    // Identified by userId: an email another contact holds makes Loops refuse the update.
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        identify_by: "userId",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let created = stack.run_once(&[]).await;
    assert_eq!(created.status, 0, "{}", created.stderr);
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id = 4;")
        .await;
    let updated = stack.run_once(&[]).await;
    assert_eq!(updated.status, 0, "{}", updated.stderr);
    stack
        .loops(
            Method::PUT,
            "/v1/contacts/update",
            json!({"email": "stranger@example.com"}),
        )
        .await;
    stack
        .sql("UPDATE users SET email = 'stranger@example.com' WHERE id = 4;")
        .await;
    let rejected = stack.run_once(&[]).await;
    assert_eq!(rejected.status, 3, "{}", rejected.stderr);
    assert_eq!(rejected.run()["rejected"], 1, "{}", rejected.stderr);
    let run = |r: &loopsync_testkit::RunOutput| r.run()["id"].as_i64().unwrap();

    let four = record(&stack, "4").await;
    assert_eq!(
        (&four["sync"], &four["key"]),
        (&json!("users"), &json!("4"))
    );
    assert_eq!(
        outcomes(&four),
        [
            (
                run(&created),
                "added".into(),
                "upsert".into(),
                "confirmed".into(),
                None
            ),
            (
                run(&updated),
                "changed".into(),
                "upsert".into(),
                "confirmed".into(),
                None
            ),
            (
                run(&rejected),
                "changed".into(),
                "upsert".into(),
                "rejected".into(),
                Some(400)
            ),
        ],
        "{four:#}"
    );
    // Loops' answer, and what it means (two contacts: see docs/operations.md).
    let reason = four["outcomes"][2]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("invalid request (400): Multiple contacts found for the given criteria"),
        "{reason}"
    );
    assert_eq!(four["outcomes"][0]["requests"], 1);
    let state = &four["state"];
    assert_eq!(state["confirmed"], true, "{four:#}");
    assert_eq!(state["confirmed_run"], run(&updated));
    assert_eq!(state["confirmed_email"], "user4@example.com");
    assert_eq!(state["confirmed_user_id"], "4");
    assert!(state["contact_id"].is_string(), "{four:#}");
    assert_eq!(state["sent_unconfirmed"], true, "the refused version");
    assert_eq!(four["dead_letter"], Value::Null);
    // Still what the next run sends: the refused change.
    assert_eq!(
        (&four["next"]["change"], &four["next"]["operation"]),
        (&json!("changed"), &json!("upsert")),
        "{four:#}"
    );
    assert_eq!(four["next"]["action"]["email"], "stranger@example.com");
    assert_eq!(four["confirmed_values"], Value::Null, "{four:#}");

    // Unchanged since Loops confirmed it: its confirmed values, nothing to send.
    let one = record(&stack, "1").await;
    assert_eq!(one["next"]["change"], "unchanged", "{one:#}");
    assert_eq!(one["next"]["operation"], "none");
    assert_eq!(one["confirmed_values"]["email"], "user1@example.com");
    assert_eq!(one["confirmed_values"]["properties"]["planName"], "pro");
    assert_eq!(outcomes(&one).len(), 1, "{one:#}");

    // A change pending in the model: the next run's update, as plan would send it.
    stack
        .sql("UPDATE users SET plan = 'team', first_name = 'Zoë' WHERE id = 2;")
        .await;
    let two = record(&stack, "2").await;
    assert_eq!(
        (&two["next"]["change"], &two["next"]["operation"]),
        (&json!("changed"), &json!("upsert")),
        "{two:#}"
    );
    let properties = &two["next"]["action"]["properties"];
    assert_eq!(
        (&properties["planName"], &properties["firstName"]),
        (&json!("team"), &json!("Zoë")),
        "{two:#}"
    );
    assert_eq!(two["state"]["confirmed"], true);

    // The text says the same.
    let (code, text, stderr) = without_key(&stack, &["record", "--sync", "users", "4"]).await;
    assert_eq!(code, 0, "{stderr}");
    for part in [
        "record 4 of sync users",
        &format!("state: confirmed by Loops in run {} at ", run(&updated)),
        "email user4@example.com · userId 4 · contact ",
        &format!("run {} · ", run(&created)),
        "· added · upsert · confirmed · 1 request",
        "· changed · upsert · rejected (400) · 1 request · invalid request (400): Multiple contacts found",
        "next run: changed · upsert · {",
    ] {
        assert!(text.contains(part), "{part:?} in:\n{text}");
    }

    // A key nobody knows: exit 1, said on stderr.
    let (code, stdout, stderr) = without_key(&stack, &["record", "--sync", "users", "99"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stderr.contains("sync users has no record 99"), "{stderr}");
    let (code, _, _) = without_key(&stack, &["record", "--sync", "nobody", "1"]).await;
    assert_eq!(code, 2);
}

/// A record dead-lettered, then parked, is named as such, with each failed attempt's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_shows_its_dead_letter_and_failed_attempts() {
    let Some((stack, run)) = Stack::with_dead_letters(StackOptions {
        rows: 2,
        max_attempts: 2,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let parked = stack.output(&["dlq", "park", "--key", "2"]).await;
    assert!(parked.status.success(), "{parked:?}");
    let two = record(&stack, "2").await;
    assert_eq!(two["dead_letter"]["run_id"], run.run()["id"], "{two:#}");
    assert_eq!(two["dead_letter"]["parked"], true);
    assert_eq!(two["outcomes"][0]["outcome"], "dead_lettered");
    assert_eq!(two["outcomes"][0]["status"], 503, "{two:#}");
    let attempts = two["attempts"].as_array().expect("attempts");
    assert!(
        !attempts.is_empty(),
        "the failed attempt before the last: {two:#}"
    );
    assert_eq!(attempts[0]["status"], 503, "{two:#}");
    assert_eq!(attempts[0]["writes"], 1, "{two:#}");
    assert_eq!(two["state"]["parked"], true);
    assert_eq!(two["next"]["change"], "parked", "{two:#}");
}

/// `verify --json ARGS…`: exit status, report, and what Loops received.
async fn verify(stack: &Stack, args: &[&str]) -> (i32, Value, Seen) {
    let before = stack.sim.seen().await;
    let mut all = vec!["verify", "--json"];
    all.extend_from_slice(args);
    let output = stack.output(&all).await;
    let seen = stack.sim.seen().await.since(&before);
    let report = loopsync_testkit::json_data(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), report, seen)
}

fn drifted_keys(report: &Value) -> Vec<String> {
    let mut keys: Vec<String> = report["syncs"][0]["drifts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"].as_str().unwrap().to_owned())
        .collect();
    keys.dedup();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_key_reads_back_only_the_contacts_asked_for() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 6,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    // Someone changes contacts 3 and 4 in Loops.
    for email in ["user3@example.com", "user4@example.com"] {
        stack
            .loops(
                Method::PUT,
                "/v1/contacts/update",
                json!({"email": email, "planName": "gold"}),
            )
            .await;
    }

    let (code, report, seen) = verify(&stack, &["--key", "3"]).await;
    assert_eq!(code, 1, "drift: {report:#}");
    let sync = &report["syncs"][0];
    assert_eq!(sync["checked_keys"], json!(["3"]), "{report:#}");
    assert_eq!((&sync["checked"], &sync["drifted"]), (&json!(1), &json!(1)));
    assert_eq!(drifted_keys(&report), ["3"]);
    assert_eq!(sync["confirmed"], 1, "only the key asked for is counted");
    assert_eq!(sync["not_confirmed"], json!([]));
    assert_eq!(seen.to("GET /v1/contacts/find"), 1, "{seen:?}");
    assert_eq!(seen.writes(), 0);

    // Contacts without drift: clean, each read once.
    let (code, report, seen) = verify(&stack, &["--key", "5", "--key", "1"]).await;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["syncs"][0]["checked_keys"], json!(["1", "5"]));
    assert_eq!(seen.to("GET /v1/contacts/find"), 2, "{seen:?}");

    // A key with no confirmed contact is said, and is not clean.
    let (code, report, seen) = verify(&stack, &["--key", "99", "--key", "4"]).await;
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["syncs"][0]["not_confirmed"], json!(["99"]));
    assert_eq!(drifted_keys(&report), ["4"]);
    assert_eq!(seen.to("GET /v1/contacts/find"), 1, "{seen:?}");
    let text = stack.output(&["verify", "--key", "99"]).await;
    assert!(
        String::from_utf8_lossy(&text.stdout)
            .contains("key 99: no contact Loops confirmed for this sync: not verified"),
        "{text:?}"
    );

    // --repair with --key forgets that one record only; the next run re-sends it alone.
    let (code, report, _) = verify(&stack, &["--key", "3", "--repair"]).await;
    assert_eq!(code, 1);
    assert_eq!(report["syncs"][0]["repaired"], 1, "{report:#}");
    let (again, seen) = stack.run_seen(&[]).await;
    assert_eq!(again.status, 0, "{}", again.stderr);
    assert_eq!(seen.writes(), 1, "only 3 is re-sent: {seen:?}");
    let (code, report, _) = verify(&stack, &["--key", "3", "--key", "4"]).await;
    assert_eq!(code, 1);
    assert_eq!(drifted_keys(&report), ["4"], "3 repaired, 4 still drifted");
}
