//! Sync semantics end to end: mirror, workflow events, userId identity, invalid records.
//! The `loopsync` binary against PostgreSQL, the simulator and (where said) NATS.

use loopsync_testkit::{Stack, StackOptions};
use reqwest::Method;
use serde_json::{Value, json};

fn run_of(output: &loopsync_testkit::RunOutput) -> &Value {
    output.run()
}

/// Mirror deletes the contacts of rows that left the model — only those the sync confirmed;
/// a 404 counts as done; the first run is a pure upsert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_deletes_what_left_and_nothing_else() {
    let options = StackOptions {
        rows: 10,
        behavior: "mirror",
        // 3 of 10 leave: more than the default removal guard lets through.
        extra_sync: "max_removal_share = 0.5",
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    // A contact someone else made: never the sync's to remove.
    stack
        .loops(
            Method::PUT,
            "/v1/contacts/update",
            json!({"email": "stranger@example.com"}),
        )
        .await;
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(run_of(&first)["added"], 10);
    assert_eq!(stack.contacts().await.len(), 11);

    stack.sql("DELETE FROM users WHERE id IN (1, 2, 3)").await;
    // One of them is already gone from Loops: its delete is answered 404.
    stack
        .loops(
            Method::POST,
            "/v1/contacts/delete",
            json!({"email": "user3@example.com"}),
        )
        .await;
    let second = stack.run_once(&[]).await;
    assert_eq!(second.status, 0, "{}", second.stderr);
    let run = run_of(&second);
    assert_eq!(
        (run["removed"].as_i64(), run["confirmed"].as_i64()),
        (Some(3), Some(3)),
        "{run}"
    );
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), 8);
    assert!(contacts.contains_key("stranger@example.com"));
    assert!(!contacts.contains_key("user1@example.com"));
    let stats = stack.sim.seen().await;
    // Two deletes by the sync, one by "someone else"; the sync's delete of that one met a 404.
    assert_eq!(
        stats.answered("POST /v1/contacts/delete", 200),
        3,
        "{stats:?}"
    );
    assert_eq!(
        stats.answered("POST /v1/contacts/delete", 404),
        1,
        "{stats:?}"
    );
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.state WHERE confirmed_fp IS NOT NULL")
            .await,
        7
    );

    let (third, seen) = stack.run_seen(&[]).await;
    assert_eq!(third.status, 0, "{}", third.stderr);
    assert_eq!(seen.writes(), 0, "nothing left to remove: {seen:?}");
    // A row that comes back is a new contact again.
    stack
        .sql("INSERT INTO users VALUES (1, 'user1@example.com', 'Back', 'free', 1, now(), false)")
        .await;
    let fourth = stack.run_once(&[]).await;
    assert_eq!(run_of(&fourth)["added"], 1);
    assert_eq!(
        stack.contacts().await["user1@example.com"]["firstName"],
        "Back"
    );
}

/// `on_remove = "unsubscribe"`: the contact stays, unsubscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_can_unsubscribe_instead() {
    let options = StackOptions {
        rows: 5,
        behavior: "mirror",
        extra_sync: "on_remove = \"unsubscribe\"",
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    assert_eq!(stack.run_once(&[]).await.status, 0);
    stack.sql("DELETE FROM users WHERE id = 2").await;
    let second = stack.run_once(&[]).await;
    assert_eq!(second.status, 0, "{}", second.stderr);
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), 5);
    assert_eq!(contacts["user2@example.com"]["subscribed"], false);
    assert_eq!(contacts["user1@example.com"]["subscribed"], true);
    let records = stack
        .count("SELECT count(*) FROM loopsync.records WHERE operation = 'unsubscribe' AND outcome = 'confirmed'")
        .await;
    assert_eq!(records, 1);
}

/// With trigger_workflows, each create and each update is one events/send; each change fires
/// its event exactly once although a third of the answers are lost after the effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_events_fire_once_per_change_despite_retries() {
    workflow_events_with_faults(false).await;
}

/// The same over NATS JetStream: retries are naks and redeliveries, not in-process requeues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_events_fire_once_per_change_despite_retries_over_nats() {
    workflow_events_with_faults(true).await;
}

async fn workflow_events_with_faults(nats: bool) {
    let options = StackOptions {
        rows: 20,
        nats,
        extra_sync: "trigger_workflows = true\nevent_on_create = \"userSynced\"\nevent_on_update = \"userChanged\"",
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack
        .sim_post(
            "faults",
            json!({"error_502": 0.2, "drop_connection": 0.1, "after_effect": 0.7, "seed": 3}),
        )
        .await;
    let (first, seen) = stack.run_seen(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    let run = run_of(&first);
    assert_eq!(run["confirmed"], 20);
    assert!(
        seen.to("POST /v1/events/send") > 20,
        "the faults cost retries: {seen:?}"
    );
    let events = stack.sim.inspect("events").await;
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 20, "one event per created contact");
    assert!(events.iter().all(|e| e["eventName"] == "userSynced"));
    let mut keys: Vec<&str> = events
        .iter()
        .map(|e| e["idempotencyKey"].as_str().unwrap())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 20);
    assert_eq!(stack.workflows("event_received").await, 20);
    assert_eq!(stack.workflows("contact_added").await, 20);
    let stats = stack.sim.seen().await;
    assert!(
        stats.answered("POST /v1/events/send", 409) > 0,
        "a retry met its own key: {stats:?}"
    );
    // A 409 does not prove the contact write landed (where Loops consumes the keys of failed
    // requests it applied nothing), so each is followed by the contact write alone.
    assert_eq!(
        stats.to("PUT /v1/contacts/update"),
        stats.answered("POST /v1/events/send", 409),
        "one write after each 409, no other: {stats:?}"
    );

    stack.sim_post("faults", json!({})).await;
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id IN (2, 4, 6, 8)")
        .await;
    let (second, seen) = stack.run_seen(&[]).await;
    assert_eq!(second.status, 0, "{}", second.stderr);
    assert_eq!(
        (seen.writes(), seen.to("POST /v1/events/send")),
        (4, 4),
        "one request per changed contact: {seen:?}"
    );
    assert_eq!(stack.workflows("event_received").await, 24);
    assert_eq!(stack.workflows("contact_updated").await, 4);
    let events = stack.sim.inspect("events").await;
    let changed = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["eventName"] == "userChanged")
        .count();
    assert_eq!(changed, 4);
}

/// Workflow events with the loader killed mid-run: still exactly one event per contact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_events_fire_once_when_the_loader_is_killed() {
    let options = StackOptions {
        rows: 60,
        nats: true,
        sim_rate_limit: 40,
        requests_per_second: 40,
        ack_wait_seconds: 2.0,
        extra_sync: "trigger_workflows = true",
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let (_, at_kill) = stack
        .run_killing_the_loader("POST /v1/events/send", 15)
        .await;
    assert!(at_kill < 60, "the run was already over: {at_kill}");
    assert_eq!(
        stack.workflows("event_received").await,
        60,
        "exactly once each"
    );
    assert_eq!(stack.workflows("contact_added").await, 60);
}

/// identify_by = "userId": an email change is one update of the same contact; a new userId
/// without an email is invalid; an identity conflict is Loops' rejection, with its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_identity() {
    let options = StackOptions {
        rows: 6,
        identify_by: "userId",
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    let before = stack.sim.inspect("contacts").await;
    let id3 = before
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["userId"] == "3")
        .unwrap()["id"]
        .clone();

    stack
        .sql(
            "UPDATE users SET email = 'three@new.example.com' WHERE id = 3;
              INSERT INTO users VALUES (7, NULL, 'NoMail', 'free', 1, now(), false);
              UPDATE users SET email = 'stranger@example.com' WHERE id = 4;",
        )
        .await;
    // Someone else's contact holds the email that row 4 now has: Loops sees two contacts.
    stack
        .loops(
            Method::PUT,
            "/v1/contacts/update",
            json!({"email": "stranger@example.com"}),
        )
        .await;
    let (second, seen) = stack.run_seen(&[]).await;
    assert_eq!(second.status, 3, "degraded: {}", second.stderr);
    let run = run_of(&second);
    assert_eq!(
        (
            run["confirmed"].as_i64(),
            run["invalid"].as_i64(),
            run["rejected"].as_i64()
        ),
        (Some(1), Some(1), Some(1)),
        "{run}"
    );
    assert_eq!(
        (seen.writes(), seen.answered("PUT /v1/contacts/update", 400)),
        (2, 1),
        "the email change and the conflict: {seen:?}"
    );
    let after = stack.sim.inspect("contacts").await;
    let c3 = after
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["userId"] == "3")
        .unwrap();
    assert_eq!(c3["email"], "three@new.example.com");
    assert_eq!(c3["id"], id3, "the same contact");
    assert_eq!(after.as_array().unwrap().len(), 7);
    let reason = |key: &str| {
        let pg = stack.pg();
        let key = key.to_owned();
        async move {
            pg.query_one("SELECT outcome || ': ' || reason FROM loopsync.records WHERE key = $1 ORDER BY run_id DESC LIMIT 1", &[&key])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(reason("7").await, "invalid: a new contact needs an email");
    // A rejected record is tried again by the next run (Loops still refuses it).
    let (third, seen) = stack.run_seen(&[]).await;
    let run = run_of(&third);
    assert_eq!(run["rejected"], 1, "{run}");
    assert_eq!(seen.writes(), 1, "{seen:?}");
    let four = reason("4").await;
    assert!(
        four.starts_with(
            "rejected: invalid request (400): Multiple contacts found for the given criteria — \
             the email and the userId sent belong to two different contacts in Loops"
        ),
        "{four}"
    );
}

/// A second sync of the stack's team, `by_id`, identified by userId; the stack's `users` finds
/// contacts by email alone.
const BY_USER_ID: &str = r#"
[[sync]]
name = "by_id"
model = "select id, email, plan from users"
primary_key = "id"
identify_by = "userId"

[sync.mapping]
userId = "id"
email = "email"
planName = "plan"
"#;

/// Two syncs of one Loops team, one identified by email alone and one by userId, collide once
/// an email changes: the email sync writes the new address as a new contact (a re-key), and the
/// userId sync's write (that userId, the new email) then matches two contacts — Loops refuses
/// it ("Multiple contacts found"), on every run. The rejection says why and where the docs
/// are; `check` warns of the config before, and fails with the collisions in the state after.
/// The email sync mapping userId too (its writes carry both) is no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_identifying_contacts_differently_collide_after_a_rekey() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 4,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let mut config = std::fs::read_to_string(&stack.config).unwrap();
    config.push_str(BY_USER_ID);
    std::fs::write(&stack.config, &config).unwrap();

    // Before any collision: check warns (the config), and passes.
    let check = stack.output(&["check", "--create-properties"]).await;
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "warn syncs of this Loops team find contacts differently: by email alone users; by \
             userId by_id."
        ) && text.contains("\"Combining syncs on one Loops team\""),
        "{text}"
    );

    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(
        stack.sim.contacts().await.len(),
        4,
        "one contact per person"
    );

    stack
        .sql("UPDATE users SET email = 'moved2@example.com' WHERE id = 2")
        .await;
    for _ in 0..2 {
        let (again, seen) = stack.run_seen(&[]).await;
        assert_eq!(again.status, 3, "degraded, on every run: {}", again.stderr);
        let by_id = &again.runs[1];
        assert_eq!(by_id["sync"], "by_id", "{}", again.runs);
        assert_eq!(by_id["rejected"], 1, "{by_id}");
        assert_eq!(seen.answered("PUT /v1/contacts/update", 400), 1, "{seen:?}");
    }
    let contacts = stack.sim.contacts().await;
    assert_eq!(
        contacts.len(),
        5,
        "the re-key made a second contact: {contacts:?}"
    );
    assert_eq!(contacts["moved2@example.com"]["userId"], Value::Null);
    let rejections = stack
        .output(&["rejections", "--sync", "by_id", "--json"])
        .await;
    let rejections: Value = loopsync_testkit::json_data(&rejections.stdout).unwrap();
    let reason = rejections[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("Multiple contacts found")
            && reason.contains("\"Combining syncs on one Loops team\" in docs/operations.md"),
        "{reason}"
    );

    // check now fails on the collision found in the state, and says which sync has it.
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "FAIL sync by_id: 1 record refused by Loops because its email and its userId are two \
             contacts"
        ),
        "{text}"
    );
    let check = stack.output(&["check", "--json"]).await;
    let report: Value = loopsync_testkit::json_data(&check.stdout).unwrap();
    assert_eq!(
        report["identity_conflict"],
        json!({"by_email": ["users"], "by_user_id": ["by_id"]}),
        "{report}"
    );
    assert_eq!(
        report["two_contacts"],
        json!([{"sync": "by_id", "records": 1}]),
        "{report}"
    );

    // The email sync mapping userId too: no conflict in the config (the collision already in
    // Loops stays until the duplicate contact is dealt with).
    let both = config.replacen(
        "[sync.mapping]\nemail = \"email\"\n",
        "[sync.mapping]\nemail = \"email\"\nuserId = \"id\"\n",
        1,
    );
    assert_ne!(both, config);
    std::fs::write(&stack.config, &both).unwrap();
    let check = stack.output(&["check", "--json"]).await;
    let report: Value = loopsync_testkit::json_data(&check.stdout).unwrap();
    assert_eq!(report["identity_conflict"], Value::Null, "{report}");
    assert_eq!(report["two_contacts"][0]["records"], 1, "{report}");
}

/// `loopsync check`: config errors name the key before any request; the model and its columns;
/// the API key; the custom properties Loops lacks, created with --create-properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_and_creates_what_is_missing() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let check = |args: &'static [&'static str], key: &'static str| {
        let mut command = stack.command(args);
        command.env("LOOPS_API_KEY", key);
        async move {
            loopsync_testkit::output_within(
                &mut command,
                loopsync_testkit::COMMAND_DEADLINE,
                "loopsync check",
            )
            .await
        }
    };
    let first = check(&["check", "--json"], "test-key").await;
    assert_eq!(first.status.code(), Some(1), "properties are missing");
    let report: Value = loopsync_testkit::json_data(&first.stdout).unwrap();
    assert_eq!(report["loops"]["team_name"], "Simulated Team");
    assert_eq!(report["loops"]["ok"], true);
    assert_eq!(
        report["missing_properties"],
        json!(["planName: string", "seats: number", "signedUpAt: date"])
    );
    assert_eq!(report["missing_lists"], json!([]));
    assert_eq!(
        report["models"],
        json!([{"sync": "users", "ok": true, "error": null}])
    );
    assert_eq!(report["ok"], false);
    assert_eq!(report["warehouse"], json!({"ok": true, "error": null}));
    assert_eq!(report["privileges"], json!({"ok": true, "error": null}));

    let created = check(&["check", "--create-properties"], "test-key").await;
    assert_eq!(
        created.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    assert!(
        String::from_utf8_lossy(&created.stdout).contains("created contact property seats: number")
    );
    let props = stack
        .loops(
            Method::GET,
            "/v1/contacts/properties?list=custom",
            json!(null),
        )
        .await;
    assert_eq!(props.as_array().unwrap().len(), 3);
    assert!(
        props
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["key"] == "signedUpAt" && p["type"] == "date")
    );
    assert_eq!(check(&["check"], "test-key").await.status.code(), Some(0));
    let stats = stack.sim.seen().await;
    assert!(
        stats.to("PUT /v1/contacts/update") == 0,
        "check writes no contact"
    );

    let denied = check(&["check"], "wrong-key").await;
    assert_eq!(denied.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&denied.stdout).contains("FAIL Loops API key: unauthorized (401)")
    );

    stack
        .sql("ALTER TABLE users RENAME COLUMN plan TO tier")
        .await;
    let broken = check(&["check"], "test-key").await;
    assert_eq!(broken.status.code(), Some(1));
    let text = String::from_utf8_lossy(&broken.stdout);
    assert!(
        text.contains("FAIL sync users: the model does not run: column \"plan\" does not exist"),
        "{text}"
    );

    let bad = stack.dir.join("bad.toml");
    let config = std::fs::read_to_string(&stack.config).unwrap();
    std::fs::write(
        &bad,
        config.replace("requests_per_second", "requests_per_sec"),
    )
    .unwrap();
    let before = stack.sim.seen().await.total;
    let out = loopsync_testkit::output_within(
        tokio::process::Command::new(loopsync_testkit::loopsync_bin())
            .args(["check", "--config"])
            .arg(&bad)
            .env("LOOPS_API_KEY", "test-key"),
        loopsync_testkit::COMMAND_DEADLINE,
        "loopsync check with a bad config",
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loops.requests_per_sec: unknown field"));
    assert_eq!(
        stack.sim.seen().await.total,
        before,
        "no request before the config is right"
    );
}

/// A property creation whose answer is lost after Loops made it (a 503 after the effect) is
/// refused when tried again, the name being taken: the run lists the properties again, finds
/// it, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_property_made_by_an_attempt_whose_answer_was_lost_is_made() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack
        .sim_post(
            "faults",
            // Seeded: the first creation answers 503 after its effect, its retry meets the
            // name taken.
            json!({"error_503": 0.5, "after_effect": 1.0, "seed": 1,
                   "endpoints": ["POST /v1/contacts/properties"]}),
        )
        .await;
    let out = stack.run_once(&[]).await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.run()["confirmed"], 3, "{}", out.run());
    assert_eq!(
        stack.contacts().await.len(),
        3,
        "Loops has the three contacts"
    );
    let seen = stack.sim.seen().await;
    assert_eq!(seen.answered("PUT /v1/contacts/update", 200), 3, "{seen:?}");
    let refused = seen.answered("POST /v1/contacts/properties", 400);
    assert!(refused >= 1, "a retry met the name taken: {seen:?}");
    assert_eq!(
        seen.to("GET /v1/contacts/properties"),
        1 + refused,
        "listed once, then once per refusal: {seen:?}"
    );
}

/// identify_by = "email" and an email that changes for the same primary key: a re-key. The new
/// address is its own contact; mirror removes the old one, upsert keeps it and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_change_is_a_rekey() {
    for (behavior, contacts_after, requests) in [("upsert", 5, 1), ("mirror", 4, 2)] {
        let options = StackOptions {
            rows: 4,
            behavior,
            ..StackOptions::default()
        };
        let Some(stack) = Stack::start(options).await else {
            return;
        };
        assert_eq!(stack.run_once(&[]).await.status, 0);
        stack
            .sql("UPDATE users SET email = 'second@new.example.com' WHERE id = 2")
            .await;
        let (out, seen) = stack.run_seen(&[]).await;
        assert_eq!(out.status, 0, "{}", out.stderr);
        let run = run_of(&out);
        assert_eq!(run["rekeyed"], 1, "{behavior}: {run}");
        assert_eq!(seen.writes(), requests, "{behavior}: {seen:?}");
        let contacts = stack.contacts().await;
        assert_eq!(contacts.len(), contacts_after, "{behavior}");
        assert_eq!(contacts["second@new.example.com"]["firstName"], "First2");
        assert_eq!(
            contacts.contains_key("user2@example.com"),
            behavior == "upsert"
        );
        let text = stack.output(&["runs", "show", "2"]).await;
        assert!(
            String::from_utf8_lossy(&text.stdout).contains("re-keyed: 1"),
            "{behavior}"
        );
        // The state follows the new address: nothing more to do.
        let (again, seen) = stack.run_seen(&[]).await;
        assert_eq!(again.status, 0, "{}", again.stderr);
        assert_eq!(seen.writes(), 0, "{behavior}: {seen:?}");
    }
}

/// A row deleted while another row takes its email: the contact is the other record's now, so
/// the run releases the removal (sends nothing for it) and the removal guard does not weigh it.
/// `plan` decides it by the same rule: its counts and its guard verdict are the next run's,
/// even with a `max_removal_share` that any removal would exceed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_run_agree_on_a_removal_whose_email_another_row_took() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        behavior: "mirror",
        extra_sync: "max_removal_share = 0.0",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    assert_eq!(stack.run_once(&[]).await.status, 0);
    stack
        .sql(
            "DELETE FROM users WHERE id = 1;
             UPDATE users SET email = 'user1@example.com' WHERE id = 2;",
        )
        .await;
    let out = stack.output(&["plan", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = loopsync_testkit::json_data(&out.stdout).unwrap();
    let records: Vec<(&str, &str, &str)> = plan[0]["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap_or(""),
                r["change"].as_str().unwrap_or(""),
                r["operation"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        records,
        [("2", "changed", "rekey"), ("1", "removed", "release")],
        "{plan}"
    );
    assert_eq!(
        plan[0]["records"][1]["reason"],
        "not removed from Loops: another record now has its email or userId"
    );

    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 0, "the guard does not stop it: {}", out.stderr);
    let run = run_of(&out);
    let fields = ["added", "changed", "removed", "unchanged", "invalid_rows"];
    let of = |v: &Value| fields.map(|f| v[f].as_i64().unwrap_or(-1));
    assert_eq!(of(run), [0, 1, 1, 8, 0], "{run}");
    assert_eq!(of(&plan[0]["counts"]), of(run), "plan: {plan}\nrun: {run}");
    assert_eq!(
        (&plan[0]["counts"]["error"], &run["error"]),
        (&Value::Null, &Value::Null),
        "the same guard verdict: plan: {plan}\nrun: {run}"
    );
    assert_eq!(
        plan[0]["requests"], 1,
        "one operation: the re-key (its write and the old contact's delete)"
    );
    assert_eq!(
        (
            seen.to("PUT /v1/contacts/update"),
            seen.to("POST /v1/contacts/delete")
        ),
        (1, 1),
        "the re-key's write and the delete of its old contact, nothing for key 1: {seen:?}"
    );
    let contacts = stack.contacts().await;
    assert_eq!(contacts["user1@example.com"]["firstName"], "First2");
    assert!(!contacts.contains_key("user2@example.com"));
}

/// Mirror. Row 1 leaves while a new row 4 takes its email — but row 4 is invalid (its seats
/// are not a number: the transformer refuses it, after the extractor noted its email as
/// written). Row 1's removal is released as if row 4 now had the contact: nothing is sent,
/// row 1 leaves the state, and no write of row 4 ever follows. Row 4 accepted as invalid, the
/// next run succeeds (exit 0), and Loops keeps row 1's contact, with row 1's values, that no
/// valid row has and that the sync wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_is_not_released_to_a_row_that_is_never_written() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        behavior: "mirror",
        extra_sync: "max_removal_share = 1.0",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    assert_eq!(stack.run_once(&[]).await.status, 0);
    stack
        .sql(
            "ALTER TABLE users ALTER COLUMN seats TYPE text;
             DELETE FROM users WHERE id = 1;
             INSERT INTO users VALUES (4, 'user1@example.com', 'First4', 'pro', 'many', now(), false);",
        )
        .await;
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 3, "row 4 invalid: {}", out.stderr);
    let reason = stack
        .text("SELECT reason FROM loopsync.records WHERE key = '4' ORDER BY run_id DESC LIMIT 1")
        .await;
    assert!(reason.contains("not a number"), "{reason}");
    let accepted = stack.output(&["rejections", "accept", "--key", "4"]).await;
    assert_eq!(
        accepted.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let (quiet, later) = stack.run_seen(&[]).await;
    assert_eq!(quiet.status, 0, "{}", quiet.stderr);
    let deletes = seen.to("POST /v1/contacts/delete") + later.to("POST /v1/contacts/delete");
    let contacts = stack.contacts().await;
    assert!(
        !contacts.contains_key("user1@example.com"),
        "no valid row has user1@example.com, which row 1 wrote and left ({deletes} deletes): \
         {:#}",
        contacts["user1@example.com"]
    );
}

/// `loopsync adopt` takes over from another tool: the model's rows are recorded as already in
/// Loops, nothing is sent, and the next run sends only what changed after. Under mirror a row
/// that then leaves is removed by the identifiers adopted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_takes_over_without_sending() {
    let options = StackOptions {
        rows: 10,
        behavior: "mirror",
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack
        .sql("UPDATE users SET email = 'broken' WHERE id = 10")
        .await;
    let out = stack.output(&["adopt", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adopted: Value = loopsync_testkit::json_data(&out.stdout).unwrap();
    assert_eq!(adopted[0]["status"], "adopted");
    assert_eq!(adopted[0]["added"], 9, "the malformed email is not adopted");
    let seen = stack.sim.seen().await;
    assert_eq!(
        (seen.total, seen.to("GET /v1/api-key")),
        (1, 1),
        "nothing sent; Loops was only asked for the API key's team, the sync's destination: {seen:?}"
    );
    assert_eq!(adopted[0]["requests_by_kind"]["preflight"], 1);
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.state WHERE confirmed_email IS NOT NULL")
            .await,
        9
    );

    stack
        .sql(
            "UPDATE users SET plan = 'gold' WHERE id = 1;
              DELETE FROM users WHERE id = 2;
              UPDATE users SET email = 'user10@example.com' WHERE id = 10;",
        )
        .await;
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    let report = run_of(&run);
    assert_eq!(
        (
            report["changed"].as_i64(),
            report["removed"].as_i64(),
            report["added"].as_i64(),
            report["unchanged"].as_i64()
        ),
        (Some(1), Some(1), Some(1), Some(7)),
        "{report}"
    );
    assert_eq!(
        stack.update_requests().await,
        2,
        "the changed row and the repaired one"
    );
    let stats = stack.sim.seen().await;
    // Loops never had user2 from us; the delete by its adopted email is a 404, done.
    assert_eq!(
        stats.answered("POST /v1/contacts/delete", 404),
        1,
        "{stats:?}"
    );
    let runs = stack.output(&["runs"]).await;
    assert!(String::from_utf8_lossy(&runs.stdout).contains("adopted"));
}

/// `loopsync run` without --once follows each sync's schedule, and stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_follows_the_schedule() {
    use tokio::io::AsyncBufReadExt;
    let options = StackOptions {
        rows: 5,
        extra_sync: "schedule = \"*/2 * * * * *\"",
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let mut child = stack
        .command(&["run", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut reports = Vec::new();
    while reports.len() < 2 {
        let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("a scheduled run within 20 s")
            .unwrap()
            .expect("a report line");
        reports.push(loopsync_testkit::json_data(line.as_bytes()).unwrap()[0].clone());
    }
    assert_eq!(
        (reports[0]["added"].as_i64(), reports[0]["status"].as_str()),
        (Some(5), Some("succeeded"))
    );
    assert_eq!(reports[1]["unchanged"], 5);
    let seen = stack.sim.seen().await;
    assert_eq!(seen.writes(), 5, "the second run sent nothing: {seen:?}");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .expect("it stops on SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // Without any schedule it says so.
    let plain = Stack::start(StackOptions {
        rows: 1,
        ..StackOptions::default()
    })
    .await
    .unwrap();
    let out = plain.output(&["run"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no sync has a schedule"));
}

/// `loopsync dlq`: records whose retries ran out are listed (filtered by reason, time, key),
/// replayed (a run about those keys only), or parked (no run retries them until their data
/// changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_replay_and_park() {
    dead_letters(false).await;
}

/// The same over NATS JetStream: dead letters come from the worker's give-up, through the
/// outcomes stream, into the warehouse that `dlq` reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_replay_and_park_over_nats() {
    dead_letters(true).await;
}

async fn dead_letters(nats: bool) {
    let options = StackOptions {
        rows: 6,
        nats,
        max_attempts: 2,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    // Loops fails every contact write (and answers everything else).
    stack
        .sim_post(
            "faults",
            json!({"error_503": 1.0, "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;
    let (failed, seen) = stack.run_seen(&[]).await;
    assert_eq!(failed.status, 3, "{}", failed.stderr);
    assert_eq!(run_of(&failed)["dead_lettered"], 6);
    assert_eq!(
        seen.answered("PUT /v1/contacts/update", 503),
        12,
        "two attempts each: {seen:?}"
    );

    let dlq = |args: &'static [&'static str]| {
        let stack = &stack;
        async move {
            let out = stack.output(args).await;
            assert!(
                out.status.code().is_some_and(|c| c == 0 || c == 3),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            loopsync_testkit::json_data(&out.stdout).unwrap_or(Value::Null)
        }
    };
    let listed = dlq(&["dlq", "list", "--json"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 6);
    assert!(
        listed[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("gave up after 2 attempts: server error 503")
    );
    assert_eq!(
        dlq(&["dlq", "list", "--json", "--reason", "503"])
            .await
            .as_array()
            .unwrap()
            .len(),
        6
    );
    assert_eq!(
        dlq(&["dlq", "list", "--json", "--reason", "timeout"])
            .await
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        dlq(&["dlq", "list", "--json", "--since", "2999-01-01"])
            .await
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        dlq(&["dlq", "list", "--json", "--key", "3"])
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A key, or a filter, that matches no dead letter is a mistake said at once (exit 1),
    // naming it; nothing is parked or sent.
    let before = stack.sim.seen().await;
    for args in [
        &["dlq", "park", "--key", "1", "--key", "99999"][..],
        &["dlq", "unpark", "--key", "99999"],
        &["dlq", "replay", "--key", "99999"],
        &["dlq", "replay", "--reason", "no such reason"],
    ] {
        let out = stack.output(args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no dead letter of any sync matches")
                && (stderr.contains("99999") || stderr.contains("no such reason"))
                && !stderr.contains("the key 1,"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(stack.sim.seen().await.since(&before).writes(), 0);
    let parked = dlq(&["dlq", "park", "--key", "1", "--key", "2", "--json"]).await;
    assert_eq!(parked["parked"], 2, "the refused park parked nothing");
    stack.sim_post("faults", json!({})).await;
    let before = stack.sim.seen().await;
    let replayed = dlq(&["dlq", "replay", "--json"]).await;
    let seen = stack.sim.seen().await.since(&before);
    assert_eq!(seen.writes(), 4, "only the replayed records: {seen:?}");
    assert_eq!(replayed[0]["confirmed"], 4, "{replayed}");
    assert_eq!(
        replayed[0]["unchanged"], 2,
        "the parked ones are left alone"
    );
    assert_eq!(stack.contacts().await.len(), 4);
    assert_eq!(
        dlq(&["dlq", "list", "--json"])
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A run retries nothing parked; a parked record whose data changes is sent again.
    let (quiet, seen) = stack.run_seen(&[]).await;
    assert_eq!(quiet.status, 0, "{}", quiet.stderr);
    assert_eq!(seen.writes(), 0, "{seen:?}");
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id = 1")
        .await;
    let (after, seen) = stack.run_seen(&[]).await;
    assert_eq!(after.status, 0, "{}", after.stderr);
    assert_eq!(seen.writes(), 1, "{seen:?}");
    assert!(stack.contacts().await.contains_key("user1@example.com"));
}

/// The commands that only read the state (`runs`, `rejections`, `dlq list`, `plan`) and `dlq
/// park` need the warehouse's settings only, never Loops' secrets (PRODUCT.md): they answer with
/// `LOOPS_API_KEY` unset. The commands that talk to Loops still say which variable is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_commands_need_no_loops_secret() {
    let Some((stack, _)) = Stack::with_dead_letters(StackOptions {
        rows: 4,
        max_attempts: 2,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let without_key = |args: &'static [&'static str]| {
        let stack = &stack;
        async move {
            let out = loopsync_testkit::output_within(
                stack.command(args).env_remove("LOOPS_API_KEY"),
                loopsync_testkit::COMMAND_DEADLINE,
                &format!("loopsync {} without LOOPS_API_KEY", args.join(" ")),
            )
            .await;
            (
                out.status.code(),
                loopsync_testkit::json_data(&out.stdout).unwrap_or(Value::Null),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, runs, stderr) = without_key(&["runs", "--json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{runs}");
    let (code, rejections, stderr) = without_key(&["rejections", "--json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(rejections.as_array().map(Vec::len), Some(4), "{rejections}");
    let (code, letters, stderr) = without_key(&["dlq", "list", "--json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(letters.as_array().map(Vec::len), Some(4), "{letters}");
    let (code, plan, stderr) = without_key(&["plan", "--json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(plan.is_array(), "{plan}");
    let (code, parked, stderr) = without_key(&["dlq", "park", "--key", "1", "--json"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(parked["parked"], 1, "{parked}");
    for args in [&["run", "--once"][..], &["dlq", "replay"], &["check"]] {
        let (code, _, stderr) = without_key(args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("LOOPS_API_KEY"),
            "{args:?} names the variable: {stderr}"
        );
    }
}
