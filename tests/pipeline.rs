//! The pipeline end to end: the `loopsync` binary against PostgreSQL, NATS JetStream and the
//! Loops simulator, all real processes on loopback.

use std::time::Duration;

use loopsync_testkit::{Stack, StackOptions};
use serde_json::Value;

fn run_of(output: &loopsync_testkit::RunOutput) -> &Value {
    output.run()
}

/// First run creates every contact; a second run with nothing changed sends nothing; after an
/// update, exactly one request per updated row.
async fn create_then_nothing_then_one_per_change(stack: Stack) {
    let (first, seen) = stack.run_seen(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    let run = run_of(&first);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["added"], 40);
    assert_eq!(run["confirmed"], 40);
    assert_eq!(seen.writes(), 40, "{seen:?}");
    assert_eq!(seen.to("PUT /v1/contacts/update"), 40);
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), 40);
    let c7 = &contacts["user7@example.com"];
    assert_eq!(c7["firstName"], "First7");
    assert_eq!(c7["planName"], "pro");
    assert_eq!(c7["seats"], 0);
    assert_eq!(c7["signedUpAt"], "2024-01-01T07:00:00.000Z");
    assert_eq!(c7["mailingLists"], serde_json::json!({}));
    assert_eq!(
        contacts["user8@example.com"]["mailingLists"]["cm_news"],
        true
    );
    // The state advanced only with Loops' confirmation, one row per record.
    let confirmed = stack
        .count(
            "SELECT count(*) FROM loopsync.state WHERE sync = 'users' AND confirmed_fp IS NOT NULL",
        )
        .await;
    assert_eq!(confirmed, 40);

    let (second, seen) = stack.run_seen(&[]).await;
    assert_eq!(second.status, 0, "{}", second.stderr);
    let run = run_of(&second);
    assert_eq!(run["unchanged"], 40);
    assert_eq!(seen.writes(), 0, "nothing changed, nothing sent: {seen:?}");

    stack
        .sql(
            "UPDATE users SET plan = 'enterprise' WHERE id IN (3, 5, 8, 13, 21);
              UPDATE users SET email = upper(email) WHERE id = 2;",
        )
        .await;
    let (third, seen) = stack.run_seen(&[]).await;
    let run = run_of(&third);
    assert_eq!(run["changed"], 5, "an email's case is no change: {run}");
    assert_eq!(run["unchanged"], 35);
    assert_eq!(
        (seen.writes(), seen.to("PUT /v1/contacts/update")),
        (5, 5),
        "exactly one request per updated row: {seen:?}"
    );
    assert_eq!(
        stack.contacts().await["user21@example.com"]["planName"],
        "enterprise"
    );
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.runs WHERE status = 'succeeded'")
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_in_process_bus() {
    let Some(stack) = Stack::start(StackOptions::default()).await else {
        return;
    };
    create_then_nothing_then_one_per_change(stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_over_nats() {
    let options = StackOptions {
        nats: true,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    create_then_nothing_then_one_per_change(stack).await;
}

/// `loopsync rejections --json`: `(key, accepted)` of each record listed.
async fn listed(stack: &Stack) -> Vec<(String, bool)> {
    let out = stack
        .output(&["rejections", "--sync", "users", "--json"])
        .await;
    let listed: Value = loopsync_testkit::json_data(&out.stdout).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_owned(),
                r["accepted"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Rows invalid for good keep every run degraded until the operator accepts them: then runs
/// succeed (exit 0) and still list and count them. A row invalid for another reason is
/// degraded again; a row fixed is sent. A filter that matches nothing is an error (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_invalid_records_no_longer_degrade_runs() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack
        .sql(
            "UPDATE users SET email = 'not-an-email-' || id WHERE id IN (1, 3);
             UPDATE users SET email = NULL WHERE id = 2;",
        )
        .await;
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 3, "degraded: {}", first.stderr);
    assert_eq!(
        (
            run_of(&first)["invalid"].as_i64(),
            run_of(&first)["accepted"].as_i64()
        ),
        (Some(3), Some(0))
    );

    let nothing = stack
        .output(&["rejections", "accept", "--sync", "users", "--key", "99"])
        .await;
    assert_eq!(nothing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&nothing.stderr)
            .contains("no invalid record matches (--sync users --key 99): nothing accepted"),
        "{}",
        String::from_utf8_lossy(&nothing.stderr)
    );
    let accepted = stack
        .output(&[
            "rejections",
            "accept",
            "--sync",
            "users",
            "--note",
            "legacy rows",
            "--json",
        ])
        .await;
    assert_eq!(accepted.status.code(), Some(0));
    let accepted: Value = loopsync_testkit::json_data(&accepted.stdout).unwrap();
    assert_eq!(accepted["accepted"], 3);
    assert_eq!(
        listed(&stack).await,
        [("1".into(), true), ("2".into(), true), ("3".into(), true)]
    );

    // Accepted: the run succeeds, sends nothing, and still counts and lists them.
    let (quiet, seen) = stack.run_seen(&[]).await;
    assert_eq!(quiet.status, 0, "{}", quiet.stderr);
    let run = run_of(&quiet);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        (run["invalid"].as_i64(), run["accepted"].as_i64()),
        (Some(3), Some(3))
    );
    assert_eq!(seen.writes(), 0, "{seen:?}");
    let text = stack.output(&["run", "--once"]).await;
    assert_eq!(text.status.code(), Some(0));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("invalid 3 (accepted 3)") && text.contains("see: loopsync rejections"),
        "{text}"
    );
    let table = stack.output(&["rejections"]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("ACCEPTED")
            && table.lines().filter(|l| l.contains(" accepted ")).count() == 3,
        "{table}"
    );

    // Row 1 becomes invalid for another reason: degraded again, for it alone.
    stack
        .sql("UPDATE users SET email = NULL WHERE id = 1")
        .await;
    let again = stack.run_once(&[]).await;
    assert_eq!(again.status, 3, "{}", again.stderr);
    assert_eq!(
        (
            run_of(&again)["invalid"].as_i64(),
            run_of(&again)["accepted"].as_i64()
        ),
        (Some(3), Some(2))
    );
    assert_eq!(
        listed(&stack).await,
        [("1".into(), false), ("2".into(), true), ("3".into(), true)]
    );
    // Row 3 fixed: it is sent.
    stack
        .sql("UPDATE users SET email = 'fixed3@example.com' WHERE id = 3")
        .await;
    let (fixed, seen) = stack.run_seen(&[]).await;
    assert_eq!(fixed.status, 3, "row 1 still degrades: {}", fixed.stderr);
    assert_eq!(run_of(&fixed)["added"], 1, "{}", run_of(&fixed));
    assert_eq!(seen.to("PUT /v1/contacts/update"), 1, "{seen:?}");
    assert!(stack.contacts().await.contains_key("fixed3@example.com"));
    assert_eq!(
        listed(&stack).await,
        [("1".into(), false), ("2".into(), true)]
    );

    // unaccept: row 2 degrades the next run again; nothing left to unaccept is an error.
    let undone = stack
        .output(&["rejections", "unaccept", "--key", "2", "--json"])
        .await;
    let undone: Value = loopsync_testkit::json_data(&undone.stdout).unwrap();
    assert_eq!(undone["unaccepted"], 1);
    let twice = stack
        .output(&["rejections", "unaccept", "--key", "2"])
        .await;
    assert_eq!(twice.status.code(), Some(1));
    assert_eq!(
        listed(&stack).await,
        [("1".into(), false), ("2".into(), false)]
    );
}

/// A row sent, then made invalid: Loops keeps the values it last confirmed while the row stays
/// invalid. `rejections accept` does not hide that silently: it names the record and accepts it
/// only with `--keep-stale`; a record never sent is accepted as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_a_record_loops_still_holds_needs_keep_stale() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack
        .sql("UPDATE users SET email = NULL WHERE id = 3")
        .await;
    assert_eq!(stack.run_once(&[]).await.status, 3, "row 3 invalid");
    stack
        .sql("UPDATE users SET email = 'not-an-email' WHERE id = 2")
        .await;
    assert_eq!(stack.run_once(&[]).await.status, 3, "rows 2 and 3 invalid");
    assert!(stack.contacts().await.contains_key("user2@example.com"));

    let refused = stack
        .output(&["rejections", "accept", "--sync", "users", "--json"])
        .await;
    assert_eq!(refused.status.code(), Some(1));
    let said: Value = loopsync_testkit::json_data(&refused.stdout).unwrap();
    assert_eq!(
        (&said["accepted"], &said["in_loops"]),
        (
            &serde_json::json!(1),
            &serde_json::json!([{"sync": "users", "key": "2"}])
        ),
        "{said}"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(
            "1 invalid records not accepted: Loops still holds their contacts with the values \
             it last confirmed"
        ) && stderr.contains("(sync users: 2)")
            && stderr.contains("--keep-stale"),
        "{stderr}"
    );
    assert_eq!(
        listed(&stack).await,
        [("2".into(), false), ("3".into(), true)]
    );

    let kept = stack
        .output(&["rejections", "accept", "--key", "2", "--keep-stale"])
        .await;
    assert_eq!(
        kept.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&kept.stderr)
    );
    assert_eq!(
        listed(&stack).await,
        [("2".into(), true), ("3".into(), true)]
    );
    let quiet = stack.run_once(&[]).await;
    assert_eq!(quiet.status, 0, "both accepted: {}", quiet.stderr);
}

/// An acceptance is for a record Loops does not hold (without `--keep-stale`). Row 2 has no
/// email: accepted. Its email is set, someone writes its contact to Loops, and `adopt` records
/// it as confirmed there — an adoption is a confirmation, but it writes no outcome, so the
/// acceptance stays. The email goes again: Loops holds the contact with the adopted values for
/// as long as the row stays invalid, the very case `rejections accept` refuses without
/// `--keep-stale` — yet the run succeeds (exit 0) on the old acceptance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acceptance_ends_when_adopt_confirms_the_record() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack
        .sql("UPDATE users SET email = NULL WHERE id = 2")
        .await;
    assert_eq!(stack.run_once(&[]).await.status, 3, "row 2 invalid");
    let accepted = stack.output(&["rejections", "accept", "--key", "2"]).await;
    assert_eq!(
        accepted.status.code(),
        Some(0),
        "never in Loops: {}",
        String::from_utf8_lossy(&accepted.stderr)
    );

    stack
        .sql("UPDATE users SET email = 'user2@example.com' WHERE id = 2")
        .await;
    let answer = stack
        .loops(
            reqwest::Method::PUT,
            "/v1/contacts/update",
            serde_json::json!({"email": "user2@example.com", "firstName": "First2",
                               "planName": "team", "seats": 2,
                               "signedUpAt": "2024-01-01T02:00:00.000Z",
                               "mailingLists": {"cm_news": true}}),
        )
        .await;
    assert_eq!(answer["success"], true, "{answer}");
    let adopted = stack.output(&["adopt"]).await;
    assert!(
        adopted.status.success(),
        "{}",
        String::from_utf8_lossy(&adopted.stderr)
    );
    assert_eq!(
        stack
            .count(
                "SELECT count(*) FROM loopsync.state
                  WHERE sync = 'users' AND key = '2' AND confirmed_fp IS NOT NULL"
            )
            .await,
        1,
        "adopted: Loops holds row 2's contact"
    );

    stack
        .sql("UPDATE users SET email = NULL WHERE id = 2")
        .await;
    let run = stack.run_once(&[]).await;
    assert!(stack.contacts().await.contains_key("user2@example.com"));
    assert_eq!(
        run.status, 3,
        "row 2 invalid while Loops holds its contact, never accepted as such: {}",
        run.stderr
    );
}

/// Row 3's create reached Loops but its answers were lost (dead-lettered): the state confirms
/// nothing, yet Loops holds the contact. Its email then goes: `rejections accept` looks only
/// at what the state confirmed, accepts it without `--keep-stale`, and the next runs succeed
/// (exit 0) while Loops keeps a contact made from the row's earlier values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_a_record_whose_lost_write_loops_may_hold_needs_keep_stale() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        max_attempts: 2,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack
        .sim_post(
            "faults",
            serde_json::json!({"error_503": 1.0, "after_effect": 1.0,
                               "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;
    assert_eq!(stack.run_once(&[]).await.status, 3, "every answer lost");
    stack.sim_post("faults", serde_json::json!({})).await;
    assert!(stack.contacts().await.contains_key("user3@example.com"));
    stack
        .sql("UPDATE users SET email = NULL WHERE id = 3")
        .await;
    assert_eq!(stack.run_once(&[]).await.status, 3, "row 3 invalid");

    let out = stack
        .output(&["rejections", "accept", "--key", "3", "--json"])
        .await;
    let said: Value = loopsync_testkit::json_data(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        (out.status.code(), &said["in_loops"]),
        (Some(1), &serde_json::json!([{"sync": "users", "key": "3"}])),
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Invalid records are kept with their reason; the run is degraded (exit 3); the valid ones go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_degrade_the_run() {
    let options = StackOptions {
        rows: 5,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack
        .sql(
            "UPDATE users SET email = 'not-an-email' WHERE id = 1;
              UPDATE users SET email = NULL WHERE id = 2;
              INSERT INTO users VALUES (3, 'dup@example.com', 'Dup', 'free', 1, now(), true);
              INSERT INTO users VALUES (NULL, 'nokey@example.com', 'Nil', 'free', 1, now(), true);
              INSERT INTO users VALUES (6, ' USER5@example.com', 'Twin', 'free', 1, now(), true);
              INSERT INTO users VALUES (7, 'long@example.com', repeat('x', 501), 'free', 1, now(), true);
              ALTER TABLE users ALTER COLUMN seats TYPE text;
              INSERT INTO users VALUES (8, 'seats@example.com', 'Many', 'free', 'many', now(), true);",
        )
        .await;
    let output = stack.run_once(&[]).await;
    assert_eq!(output.status, 3, "degraded: {}", output.stderr);
    let run = run_of(&output);
    assert_eq!(run["status"], "degraded");
    assert_eq!(run["invalid"], 8, "{run}");
    assert_eq!(run["confirmed"], 1);
    let mut reasons: Vec<String> = stack
        .pg()
        .query("SELECT key || ': ' || reason FROM loopsync.records WHERE outcome = 'invalid' ORDER BY key", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "(null #1): id is NULL",
            "1: malformed email (column email)",
            "2: no email: the contact is identified by email",
            "3: duplicate primary key: 2 rows have this id",
            "5: this row's email (column email) is on 2 rows of this run: one contact cannot be two records",
            "6: this row's email (column email) is on 2 rows of this run: one contact cannot be two records",
            "7: firstName (column first_name) is 501 characters long; Loops accepts at most 500",
            "8: seats (column seats): not a number",
        ]
    );
    assert_eq!(stack.contacts().await.len(), 1);
    // The invalid records are tried again next run (still invalid), the valid ones are not.
    let again = stack.run_once(&[]).await;
    assert_eq!(again.status, 3);
    assert_eq!(run_of(&again)["invalid"], 8);
    assert_eq!(run_of(&again)["unchanged"], 1);

    // `loopsync rejections` lists each record once, with its latest reason.
    let listed = stack.output(&["rejections", "--json"]).await;
    assert!(listed.status.success());
    let listed: Value = loopsync_testkit::json_data(&listed.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 8);
    assert!(listed.iter().all(|r| r["run_id"] == 2));
    // Keys that are numbers first, by value; then the others (the NULL keys among them).
    let null = listed
        .iter()
        .find(|r| r["key"] == "(null #1)")
        .expect("the first NULL key");
    assert_eq!(null["reason"], "id is NULL");
    let keys: Vec<&str> = listed.iter().map(|r| r["key"].as_str().unwrap()).collect();
    let numbers: Vec<i64> = keys.iter().filter_map(|k| k.parse().ok()).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
    assert_eq!(
        keys[..numbers.len()]
            .iter()
            .filter(|k| k.parse::<i64>().is_ok())
            .count(),
        numbers.len(),
        "{keys:?}"
    );
    let text = stack.output(&["rejections"]).await;
    assert!(String::from_utf8_lossy(&text.stdout).contains("malformed email (column email)"));

    // `loopsync runs` and `runs show`.
    let runs = stack.output(&["runs", "--json"]).await;
    let runs: Value = loopsync_testkit::json_data(&runs.stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 2);
    assert_eq!(runs[0]["id"], 2, "newest first");
    assert_eq!(runs[0]["status"], "degraded");
    let show = stack.output(&["runs", "show", "1", "--json"]).await;
    let show: Value = loopsync_testkit::json_data(&show.stdout).unwrap();
    assert_eq!(show["run"]["invalid"], 8);
    assert_eq!(show["records"].as_array().unwrap().len(), 9);
    let confirmed = show["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["outcome"] == "confirmed")
        .unwrap();
    // Writeback: the Loops contact id, per record, in the warehouse.
    let contacts = stack.sim.inspect("contacts").await;
    assert_eq!(confirmed["contact_id"], contacts[0]["id"]);
    assert!(confirmed["at"].as_str().unwrap().ends_with('Z'));
    let table = stack.output(&["runs"]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().next().unwrap().starts_with("  RUN  SYNC"),
        "{table}"
    );
    let missing = stack.output(&["runs", "show", "99"]).await;
    assert_eq!(missing.status.code(), Some(2));
}

/// A row whose value would not fit in a NATS message (2 MiB, past the server's 1 MiB
/// `max_payload`) is an invalid record of the extractor, by its column and length, not its
/// value; the other rows sync, over NATS, in this run and the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_too_large_for_a_message_is_invalid_and_the_others_sync() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        nats: true,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack
        .sql("UPDATE users SET first_name = repeat('x', 2 * 1024 * 1024) WHERE id = 3")
        .await;
    for run in 1..=2 {
        let output = stack.run_once(&[]).await;
        assert_eq!(output.status, 3, "run {run} degraded: {}", output.stderr);
        let report = run_of(&output);
        assert_eq!(report["invalid"], 1, "run {run}: {report}");
        assert_eq!(report["dead_lettered"], 0, "run {run}: {report}");
    }
    let reason = stack
        .text("SELECT key || ': ' || reason FROM loopsync.records WHERE outcome = 'invalid' AND run_id = 1")
        .await;
    assert_eq!(
        reason,
        "3: firstName (column first_name) is 2097152 characters long; Loops accepts at most 500"
    );
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), 4, "{contacts:?}");
    assert!(!contacts.contains_key("user3@example.com"));
}

/// Worker mode: two extractors, a transformer and three loaders as separate processes, the run
/// requested with `--remote`, ends in the same simulator state as one process; the run is
/// started by exactly one of the extractors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_loader_replicas_match_one_process() {
    let Some(alone) = Stack::start(StackOptions {
        rows: 60,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let options = StackOptions {
        rows: 60,
        nats: true,
        ..StackOptions::default()
    };
    let Some(scaled) = Stack::start(options).await else {
        return;
    };
    let _extractors = [
        scaled.worker("extractor").await,
        scaled.worker("extractor").await,
    ];
    let _transformer = scaled.worker("transformer").await;
    let _loaders = [
        scaled.worker("loader").await,
        scaled.worker("loader").await,
        scaled.worker("loader").await,
    ];
    let one = alone.run_once(&[]).await;
    let many = scaled.run_once(&["--remote"]).await;
    assert_eq!(one.status, 0, "{}", one.stderr);
    assert_eq!(many.status, 0, "{}", many.stderr);
    assert_eq!(run_of(&many)["confirmed"], 60);
    assert_eq!(alone.contacts().await, scaled.contacts().await);
    assert_eq!(
        scaled.update_requests().await,
        60,
        "no record was applied twice"
    );
}

/// A loader killed mid-run (SIGKILL) loses nothing: its unacknowledged operations come back
/// after ack_wait to the loader started in its place, and the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_loader_mid_run_loses_nothing() {
    let options = StackOptions {
        rows: 80,
        nats: true,
        sim_rate_limit: 40,
        requests_per_second: 40,
        ack_wait_seconds: 2.0,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let (output, at_kill) = stack
        .run_killing_the_loader("PUT /v1/contacts/update", 20)
        .await;
    assert!(at_kill < 80, "the run was already over: {at_kill}");
    let runs: Value = loopsync_testkit::json_data(&output.stdout).unwrap();
    assert_eq!(runs[0]["confirmed"], 80, "{runs}");
    assert_eq!(stack.contacts().await.len(), 80);
    // At most the operations in flight at the kill (the loader's concurrency) went twice.
    let requests = stack.update_requests().await;
    assert!(
        (80..=84).contains(&requests),
        "{requests} requests for 80 records"
    );
}

/// `loopsync plan` shows what a run would send — and sends nothing, changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_is_a_dry_run_that_matches_the_run() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let plan = |args: &'static [&'static str]| {
        let stack = &stack;
        async move {
            let out = stack.output(args).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out
        }
    };
    let out = plan(&["plan", "--json"]).await;
    let first: Value = loopsync_testkit::json_data(&out.stdout).unwrap();
    assert_eq!(first[0]["counts"]["added"], 10);
    assert_eq!(first[0]["requests"], 10);
    assert_eq!(
        first[0]["seconds_at_rate_budget"], 0.2,
        "10 requests at 50/s"
    );
    let record = &first[0]["records"][0];
    assert_eq!(
        (record["key"].as_str(), record["operation"].as_str()),
        (Some("1"), Some("upsert"))
    );
    assert_eq!(record["action"]["email"], "user1@example.com");
    assert_eq!(record["action"]["properties"]["planName"], "pro");
    assert_eq!(stack.sim.seen().await.total, 0, "a plan sends nothing");
    assert_eq!(
        stack
            .count(
                "SELECT count(*) FROM information_schema.schemata WHERE schema_name = 'loopsync'"
            )
            .await,
        0,
        "a plan makes nothing, not even the state's tables"
    );

    assert_eq!(stack.run_once(&[]).await.status, 0);
    stack
        .sql(
            "UPDATE users SET plan = 'x' WHERE id IN (2, 3);
              DELETE FROM users WHERE id = 4;
              UPDATE users SET seats = NULL, email = 'bad' WHERE id = 5;",
        )
        .await;
    let out = plan(&["plan", "--json"]).await;
    let second: Value = loopsync_testkit::json_data(&out.stdout).unwrap();
    let counts = &second[0]["counts"];
    // Counted as the run will: 5's malformed email is an invalid row, not a changed one; the
    // row gone from this upsert sync removes nothing, and is not counted.
    assert_eq!(
        (
            counts["changed"].as_i64(),
            counts["removed"].as_i64(),
            counts["unchanged"].as_i64(),
            counts["invalid_rows"].as_i64()
        ),
        (Some(2), Some(0), Some(6), Some(1))
    );
    assert_eq!(second[0]["invalid"], 1);
    assert_eq!(second[0]["requests"], 2);
    let text = plan(&["plan"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("requests: 2"), "{text}");
    assert!(text.contains("malformed email (column email)"), "{text}");
    let (run, seen) = stack.run_seen(&[]).await;
    assert_eq!(
        run.status, 3,
        "degraded by the invalid record: {}",
        run.stderr
    );
    assert_eq!(
        (seen.writes(), seen.to("PUT /v1/contacts/update")),
        (2, 2),
        "the run sent what the plan said: {seen:?}"
    );
}

/// The README's first command, as a new user runs it: `loopsync demo` with nothing set up. It
/// prints what the simulated Loops received (the simulator's own counts), and leaves its
/// warehouse behind with `--dir`, where the runs and the invalid record are. Its event sync
/// sends each event once: the second run only the new ones, the edited one ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_end_to_end() {
    let dir = std::env::temp_dir().join(loopsync_testkit::unique("loopsync-demo-"));
    let out = loopsync_testkit::output_within(
        tokio::process::Command::new(loopsync_testkit::loopsync_bin())
            .args(["demo", "--dir"])
            .arg(&dir),
        loopsync_testkit::COMMAND_DEADLINE,
        "loopsync demo",
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("== first run"), "{text}");
    assert!(text.contains("added 25"), "{text}");
    assert!(
        text.contains("malformed email (column email)") || text.contains("invalid 1"),
        "{text}"
    );
    // 25 users, then 2 added (the malformed one is not sent): 27 contacts. A few requests may be
    // rate limited (and retried): the budget spaces the times requests are granted, 1 % apart
    // from the limit, and on a loaded machine a request can reach the simulator a slot late
    // (one or two a run, seen in CI; none on a quiet machine); a budget not kept meets dozens
    // (79 with it tripled). `tests/rate.rs` holds the budget to the limit.
    assert!(
        text.contains("Loops (simulated) now has 27 contacts and"),
        "{text}"
    );
    let limited: u64 = text
        .split(" were rate limited.")
        .next()
        .and_then(|before| before.rsplit(", ").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of rate-limited requests: {text}"));
    assert!(limited <= 5, "{limited} rate limited: {text}");
    // The event sync, after the contact sync: 34 events (17 paying users, two each), then the 2
    // new ones alone; the corrected invoice is read again (inside the lookback) and ignored.
    let reports: Vec<&str> = text.split("sync product_events").skip(1).collect();
    assert_eq!(reports.len(), 2, "{text}");
    assert!(reports[0].contains("added 34 ·"), "{text}");
    assert!(
        reports[1].contains("added 2 ·") && reports[1].contains("ignored 1 (already sent)"),
        "{text}"
    );
    assert!(reports[1].contains("events 2 ·"), "{text}");
    // What the simulator received: 36 events, one per idempotency key, none twice.
    assert!(
        text.contains("27 contacts and 36 events (36 distinct idempotency keys);"),
        "{text}"
    );
    assert!(text.contains("sent each of the 36 events once"), "{text}");
    let db = rusqlite::Connection::open(dir.join("warehouse.db")).expect("the demo's warehouse");
    let runs: Vec<(String, String)> = db
        .prepare("SELECT sync, status FROM loopsync_runs ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let runs: Vec<(&str, &str)> = runs.iter().map(|(s, t)| (&s[..], &t[..])).collect();
    assert_eq!(
        runs,
        [
            ("users", "succeeded"),
            ("product_events", "succeeded"),
            ("users", "degraded"),
            ("product_events", "succeeded"),
        ]
    );
    let confirmed = |sync: &str| -> i64 {
        db.query_row(
            "SELECT count(*) FROM loopsync_state WHERE sync = ?1 AND confirmed_fp IS NOT NULL",
            [sync],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(confirmed("users"), 27);
    assert_eq!(confirmed("product_events"), 36);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An SQLite warehouse end to end (the binary, the simulator, the in-process bus): create,
/// nothing changed costs nothing, one request per change, mirror removals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_warehouse_end_to_end() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 30,
        sqlite: true,
        behavior: "mirror",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let (first, seen) = stack.run_seen(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(first.run()["added"], 30);
    assert_eq!(seen.to("PUT /v1/contacts/update"), 30, "{seen:?}");
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), 30);
    let c4 = &contacts["user4@example.com"];
    assert_eq!(
        (c4["planName"].as_str(), c4["seats"].as_i64()),
        (Some("pro"), Some(4))
    );
    assert_eq!(c4["signedUpAt"], "2024-01-01T04:00:00.000Z");
    assert_eq!(c4["mailingLists"]["cm_news"], true);

    let (second, seen) = stack.run_seen(&[]).await;
    assert_eq!(second.status, 0, "{}", second.stderr);
    assert_eq!(seen.writes(), 0, "{seen:?}");

    stack
        .sql(
            "UPDATE users SET plan = 'gold' WHERE id IN (1, 2, 3);
             DELETE FROM users WHERE id IN (10, 11);",
        )
        .await;
    let (third, seen) = stack.run_seen(&[]).await;
    assert_eq!(third.status, 0, "{}", third.stderr);
    assert_eq!(
        (
            seen.to("PUT /v1/contacts/update"),
            seen.to("POST /v1/contacts/delete"),
            seen.writes()
        ),
        (3, 2, 5),
        "{seen:?}"
    );
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), 28);
    assert_eq!(contacts["user2@example.com"]["planName"], "gold");
    assert!(!contacts.contains_key("user10@example.com"));
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.state WHERE confirmed_fp IS NOT NULL")
            .await,
        28
    );
}

/// A first sync larger than what the in-process bus keeps in memory: the overflow waits in a
/// spill file (an open, already deleted temporary file: seen in the run's open files, never in
/// its temporary folder), and every record still reaches Loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_beyond_the_in_memory_queue_spills_and_completes() {
    let rows = 4000;
    let Some(stack) = Stack::start(StackOptions {
        rows,
        sim_rate_limit: 200,
        requests_per_second: 200,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let tmp = stack.dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut child = stack
        .command(&["run", "--once", "--json"])
        .env("TMPDIR", &tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(stack.dir.join("run.err")).unwrap())
        .spawn()
        .unwrap();
    let fds = std::path::PathBuf::from(format!("/proc/{}/fd", child.id().unwrap()));
    let spilling = || {
        std::fs::read_dir(&fds)
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| target.to_string_lossy().contains("loopsync-spill-"))
            })
    };
    // The whole run takes 20 s at 200 requests/s; the extraction is done long before.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut spilled = false;
    while !spilled && tokio::time::Instant::now() < deadline {
        spilled = spilling();
        if child.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_none(),
        "the spill file has no name"
    );
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the run ends within 120 s")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        std::fs::read_to_string(stack.dir.join("run.err")).unwrap_or_default()
    );
    assert!(spilled, "the loader's queue overflowed into a spill file");
    let report: Value = loopsync_testkit::json_data(&out.stdout).unwrap();
    assert_eq!(report[0]["confirmed"], rows);
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), rows);
    assert_eq!(contacts["user3999@example.com"]["firstName"], "First3999");
}
