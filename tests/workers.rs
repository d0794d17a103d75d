//! The sync features with the stages as worker processes: `loopsync worker extractor`,
//! `transformer` and `loader` over NATS JetStream, each run requested by `run --once --remote`
//! (the request, its `--allow-removals` and every record's outcome cross NATS). The removal
//! guard at and above its share, `on_remove = "unsubscribe"` under it, `identify_by = "userId"`,
//! `verify --repair` and `reset`. What happened is read from the simulator (its contacts and its
//! `/_sim/stats` counters), not only from loopsync's report.

use loopsync_testkit::{RunOutput, Seen, Stack, StackOptions, Worker};
use serde_json::{Value, json};

const DELETE: &str = "POST /v1/contacts/delete";
const UPDATE: &str = "PUT /v1/contacts/update";
const FIND: &str = "GET /v1/contacts/find";

/// A stack over NATS with its three workers started, synced by a first remote run that must
/// exit 0: the stack, the workers (alive while held), that run's report and what Loops received
/// during it. `None` when a service is missing and skipping was asked for.
async fn synced(options: StackOptions) -> Option<(Stack, [Worker; 3], Value, Seen)> {
    let stack = Stack::start(StackOptions {
        nats: true,
        ..options
    })
    .await?;
    let workers = [
        stack.worker("extractor").await,
        stack.worker("transformer").await,
        stack.worker("loader").await,
    ];
    let (first, seen) = remote_ok(&stack, 0, &[]).await;
    Some((stack, workers, first, seen))
}

/// `run --once --remote --json ARGS…`: what it said, and what Loops received meanwhile.
async fn remote(stack: &Stack, args: &[&str]) -> (RunOutput, Seen) {
    let mut all = vec!["--remote"];
    all.extend_from_slice(args);
    stack.run_seen(&all).await
}

/// A remote run that must exit `status`: its report, and what Loops received.
async fn remote_ok(stack: &Stack, status: i32, args: &[&str]) -> (Value, Seen) {
    let (out, seen) = remote(stack, args).await;
    assert_eq!(out.status, status, "{} {}", out.runs, out.stderr);
    (out.run().clone(), seen)
}

/// Emails the simulator holds, and whether each is subscribed.
async fn subscribed(stack: &Stack) -> Vec<(String, bool)> {
    stack
        .contacts()
        .await
        .into_iter()
        .map(|(email, c)| (email, c["subscribed"] == true))
        .collect()
}

/// `user{id}@example.com` for each id, subscribed or not.
fn users(ids: impl IntoIterator<Item = i64>, subscribed: bool) -> Vec<(String, bool)> {
    ids.into_iter()
        .map(|id| (format!("user{id}@example.com"), subscribed))
        .collect()
}

/// The removal guard's rule is "more than `max_removal_share`": a run that would remove exactly
/// the share of the sync's confirmed contacts goes ahead, one that would remove one more removes
/// nothing and fails (exit 1) with the counts, and `--allow-removals`, carried by the run's
/// request to the remote extractor, lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_removal_guard_allows_its_share_and_refuses_more() {
    let Some((stack, _workers, first, seen)) = synced(StackOptions {
        rows: 8,
        behavior: "mirror",
        extra_sync: "max_removal_share = 0.25",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    assert_eq!(first["confirmed"], 8, "{first}");
    assert_eq!(seen.answered(UPDATE, 200), 8, "{seen:?}");

    // 3 of the 8 confirmed contacts: 37.5 %, above the share.
    stack
        .sql(
            "CREATE TABLE gone AS SELECT * FROM users WHERE id IN (1, 2, 3);
             DELETE FROM users WHERE id IN (1, 2, 3);",
        )
        .await;
    let (refused, seen) = remote_ok(&stack, 1, &[]).await;
    assert_eq!(refused["status"], "failed", "{refused}");
    assert_eq!(refused["removed"], 3, "{refused}");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(
            "would remove 3 of the 8 contacts the sync confirmed (37.5 %), more than \
             max_removal_share (25.0 %); nothing was removed"
        ),
        "{refused}"
    );
    assert_eq!(seen.writes(), 0, "nothing removed: {seen:?}");
    assert_eq!(stack.contacts().await.len(), 8);

    // Row 3 back: 2 of 8, exactly the share, goes ahead.
    stack
        .sql("INSERT INTO users SELECT * FROM gone WHERE id = 3")
        .await;
    let (at_share, seen) = remote_ok(&stack, 0, &[]).await;
    assert_eq!(
        (at_share["removed"].as_i64(), at_share["confirmed"].as_i64()),
        (Some(2), Some(2)),
        "{at_share}"
    );
    assert_eq!(
        (seen.answered(DELETE, 200), seen.writes()),
        (2, 2),
        "{seen:?}"
    );
    assert_eq!(subscribed(&stack).await, users(3..=8, true));

    // 2 of the 6 left: above the share again; allowed, the remote extractor removes them.
    stack.sql("DELETE FROM users WHERE id IN (4, 5)").await;
    let (refused, seen) = remote_ok(&stack, 1, &[]).await;
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("would remove 2 of the 6 contacts the sync confirmed (33.3 %)"),
        "{refused}"
    );
    assert_eq!(seen.writes(), 0, "{seen:?}");
    let (allowed, seen) = remote_ok(&stack, 0, &["--allow-removals"]).await;
    assert_eq!(allowed["removed"], 2, "{allowed}");
    assert_eq!(
        (seen.answered(DELETE, 200), seen.writes()),
        (2, 2),
        "{seen:?}"
    );
    assert_eq!(
        subscribed(&stack).await,
        users([3, 6, 7, 8], true),
        "the contacts of the rows left"
    );
}

/// `on_remove = "unsubscribe"` under the removal guard: exactly the share unsubscribes; more is
/// refused and Loops receives nothing — every contact still subscribed; with
/// `--allow-removals` those contacts are unsubscribed and kept (`subscribed: false`), never
/// deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_is_held_back_by_the_removal_guard() {
    let Some((stack, _workers, first, _)) = synced(StackOptions {
        rows: 5,
        behavior: "mirror",
        // The default share: 0.2.
        extra_sync: "on_remove = \"unsubscribe\"",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    assert_eq!(first["confirmed"], 5, "{first}");
    assert_eq!(subscribed(&stack).await, users(1..=5, true));

    // 1 of 5: exactly 20 %, unsubscribed.
    stack.sql("DELETE FROM users WHERE id = 5").await;
    let (at_share, seen) = remote_ok(&stack, 0, &[]).await;
    assert_eq!(at_share["removed"], 1, "{at_share}");
    assert_eq!(
        (seen.answered(UPDATE, 200), seen.to(DELETE)),
        (1, 0),
        "{seen:?}"
    );
    let mut expected = users(1..=4, true);
    expected.extend(users([5], false));
    assert_eq!(subscribed(&stack).await, expected);

    // 2 more: above the share, refused; Loops receives nothing.
    stack.sql("DELETE FROM users WHERE id IN (2, 4)").await;
    let (refused, seen) = remote_ok(&stack, 1, &[]).await;
    assert_eq!(refused["status"], "failed", "{refused}");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("would remove 2 of the")
            && error.contains("more than max_removal_share (20.0 %); nothing was removed"),
        "{refused}"
    );
    assert_eq!(seen.writes(), 0, "nothing unsubscribed: {seen:?}");
    assert_eq!(subscribed(&stack).await, expected);

    let (allowed, seen) = remote_ok(&stack, 0, &["--allow-removals"]).await;
    assert_eq!(allowed["removed"], 2, "{allowed}");
    assert_eq!(
        (seen.answered(UPDATE, 200), seen.to(DELETE)),
        (2, 0),
        "{seen:?}"
    );
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), 5, "every contact kept");
    assert_eq!(
        subscribed(&stack).await,
        vec![
            ("user1@example.com".to_owned(), true),
            ("user2@example.com".to_owned(), false),
            ("user3@example.com".to_owned(), true),
            ("user4@example.com".to_owned(), false),
            ("user5@example.com".to_owned(), false),
        ]
    );
    let (_, seen) = remote_ok(&stack, 0, &[]).await;
    assert_eq!(seen.writes(), 0, "nothing left to do: {seen:?}");
}

/// `identify_by = "userId"` over workers: an email change is one update of the same Loops
/// contact (its id kept, the old address gone); a new userId without an email is invalid,
/// with that reason, and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_identity_over_workers() {
    let Some((stack, _workers, _, _)) = synced(StackOptions {
        rows: 6,
        identify_by: "userId",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let loops_id = |contacts: &Value, user_id: &str| {
        contacts
            .as_array()
            .expect("contacts")
            .iter()
            .find(|c| c["userId"] == user_id)
            .unwrap_or_else(|| panic!("no contact with userId {user_id}: {contacts}"))
            .clone()
    };
    let before = stack.sim.inspect("contacts").await;
    assert_eq!(before.as_array().map(Vec::len), Some(6), "{before}");
    let three = loops_id(&before, "3");
    assert_eq!(three["email"], "user3@example.com");

    stack
        .sql(
            "UPDATE users SET email = 'three@new.example.com' WHERE id = 3;
             INSERT INTO users VALUES (7, NULL, 'NoMail', 'free', 1, now(), false);",
        )
        .await;
    let (run, seen) = remote_ok(&stack, 3, &[]).await;
    assert_eq!(
        (run["confirmed"].as_i64(), run["invalid"].as_i64()),
        (Some(1), Some(1)),
        "{run}"
    );
    assert_eq!(
        (seen.answered(UPDATE, 200), seen.writes()),
        (1, 1),
        "one update, nothing for the row without an email: {seen:?}"
    );
    let after = stack.sim.inspect("contacts").await;
    assert_eq!(after.as_array().map(Vec::len), Some(6), "{after}");
    let moved = loops_id(&after, "3");
    assert_eq!(moved["email"], "three@new.example.com");
    assert_eq!(moved["id"], three["id"], "the same contact");
    assert!(
        !stack.contacts().await.contains_key("user3@example.com"),
        "the old address is no contact's"
    );
    assert_eq!(
        stack
            .text(
                "SELECT outcome || ': ' || reason FROM loopsync.records
                  WHERE key = '7' ORDER BY run_id DESC LIMIT 1"
            )
            .await,
        "invalid: a new contact needs an email"
    );
}

/// `verify` after worker runs: it reads the contacts back, finds what someone changed in
/// Loops, and `--repair` makes the next remote run re-send exactly those; after it, Loops holds
/// the model again and verify finds no drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_repair_over_workers() {
    let Some((stack, _workers, _, _)) = synced(StackOptions {
        rows: 6,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let synced = stack.contacts().await;
    let verify = async |args: &[&str]| {
        let before = stack.sim.seen().await;
        let mut all = vec!["verify", "--json"];
        all.extend_from_slice(args);
        let out = stack.output(&all).await;
        let seen = stack.sim.seen().await.since(&before);
        let report = loopsync_testkit::json_data(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "verify printed no report ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(seen.writes(), 0, "verify writes nothing: {seen:?}");
        assert_eq!(seen.to(FIND), 6, "{seen:?}");
        (out.status.code(), report)
    };
    let (status, report) = verify(&[]).await;
    assert_eq!(
        (status, report["drifted"].as_i64()),
        (Some(0), Some(0)),
        "{report}"
    );

    // Someone else edits a property of user3 (on "free") and deletes user5.
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
    let (status, report) = verify(&["--repair"]).await;
    assert_eq!(status, Some(1), "drift found: {report}");
    let sync = &report["syncs"][0];
    let mut drifted: Vec<&str> = sync["drifts"]
        .as_array()
        .expect("drifts")
        .iter()
        .map(|d| d["key"].as_str().unwrap_or_default())
        .collect();
    drifted.sort();
    assert_eq!(drifted, ["3", "5"], "{report}");
    assert_eq!(sync["repaired"], 2, "{report}");

    let (run, seen) = remote_ok(&stack, 0, &[]).await;
    assert_eq!(run["confirmed"], 2, "{run}");
    assert_eq!(
        (seen.answered(UPDATE, 200), seen.writes()),
        (2, 2),
        "exactly the repaired: {seen:?}"
    );
    assert_eq!(
        stack.contacts().await,
        synced,
        "Loops holds the model again"
    );
    let (status, report) = verify(&[]).await;
    assert_eq!(
        (status, report["drifted"].as_i64()),
        (Some(0), Some(0)),
        "{report}"
    );
}

/// `reset` between worker runs: the state forgotten, the next remote run sends every row again
/// (new changes, so neither the loader's ledger nor Loops' idempotency keys take them for the
/// old ones) — here to a Loops whose audience was emptied meanwhile, which holds every contact
/// again; the run after sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_over_workers_sends_every_row_again() {
    let Some((stack, _workers, _, _)) = synced(StackOptions {
        rows: 5,
        extra_sync: "trigger_workflows = true",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let synced = stack.contacts().await;
    assert_eq!(synced.len(), 5);
    for email in synced.keys() {
        stack
            .loops(
                reqwest::Method::POST,
                "/v1/contacts/delete",
                json!({ "email": email }),
            )
            .await;
    }
    assert!(stack.contacts().await.is_empty());
    // Without a reset, the state says Loops has them: nothing to send.
    let (_, seen) = remote_ok(&stack, 0, &[]).await;
    assert_eq!(seen.writes(), 0, "{seen:?}");

    let reset = stack.output(&["reset", "--sync", "users", "--yes"]).await;
    assert!(
        reset.status.success(),
        "{}",
        String::from_utf8_lossy(&reset.stderr)
    );
    let (run, seen) = remote_ok(&stack, 0, &[]).await;
    assert_eq!(
        (run["added"].as_i64(), run["confirmed"].as_i64()),
        (Some(5), Some(5)),
        "{run}"
    );
    // With workflows, each contact goes as one `events/send` that carries its properties.
    assert_eq!(
        (seen.answered("POST /v1/events/send", 200), seen.writes()),
        (5, 5),
        "every row sent again, each event fired again: {seen:?}"
    );
    assert_eq!(
        stack.workflows("event_received").await,
        10,
        "5 first, 5 again"
    );
    let mut again = stack.contacts().await;
    let mut before = synced.clone();
    // Loops stamps a contact with when it was made.
    for contacts in [&mut again, &mut before] {
        for c in contacts.values_mut() {
            c.as_object_mut().map(|c| c.remove("createdAt"));
        }
    }
    assert_eq!(again, before, "Loops holds every contact again");
    let (quiet, seen) = remote_ok(&stack, 0, &[]).await;
    assert_eq!(seen.writes(), 0, "{seen:?}");
    assert_eq!(quiet["unchanged"], 5, "{quiet}");
}
