//! `loopsync forget`: one person erased from everything loopsync keeps for a sync — every table
//! of the state (each read whole), the dead letters of the installation's NATS streams, and,
//! with `--in-loops`, the contact in Loops — and a person who is not there is said so (exit 1).

use loopsync_bus::{Coordination, JetStreamBus, JetStreamOptions, Messaging, Names};
use loopsync_core::envelope::Operation;
use loopsync_core::{codec, keys};
use loopsync_testkit::{Stack, StackOptions, TestWarehouse, json_data};
use serde_json::json;

/// Every row of every table of the state, as text, with its table's name; and, for the tables
/// with a `key` column, the keys.
async fn state_tables(stack: &Stack) -> (Vec<(String, String)>, Vec<(String, String)>) {
    let mut rows = Vec::new();
    let mut keys = Vec::new();
    match &stack.warehouse {
        TestWarehouse::Sqlite { path } => {
            let c = rusqlite::Connection::open(path).unwrap();
            let tables: Vec<String> = c
                .prepare(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'loopsync%'",
                )
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            for table in tables {
                let mut statement = c.prepare(&format!("SELECT * FROM {table}")).unwrap();
                let names: Vec<String> = statement.column_names().map(str::to_owned).collect();
                let mut read = statement.query([]).unwrap();
                while let Some(row) = read.next().unwrap() {
                    let mut cells = Vec::new();
                    for (i, name) in names.iter().enumerate() {
                        let cell = match row.get_ref(i).unwrap() {
                            rusqlite::types::ValueRef::Text(t) => {
                                String::from_utf8_lossy(t).into_owned()
                            }
                            other => format!("{other:?}"),
                        };
                        if name == "key" {
                            keys.push((table.clone(), cell.clone()));
                        }
                        cells.push(cell);
                    }
                    rows.push((table.clone(), cells.join("|")));
                }
            }
        }
        TestWarehouse::Postgres { client, .. } => {
            let tables = client
                .query(
                    "SELECT table_name::text FROM information_schema.tables
                      WHERE table_schema = 'loopsync'",
                    &[],
                )
                .await
                .unwrap();
            for table in tables.iter().map(|r| r.get::<_, String>(0)) {
                for row in client
                    .query(&format!("SELECT t::text FROM loopsync.{table} t"), &[])
                    .await
                    .unwrap()
                {
                    rows.push((table.clone(), row.get(0)));
                }
                let has_key = client
                    .query_opt(
                        "SELECT 1 FROM information_schema.columns
                          WHERE table_schema = 'loopsync' AND table_name = $1 AND column_name = 'key'",
                        &[&table],
                    )
                    .await
                    .unwrap()
                    .is_some();
                if has_key {
                    for row in client
                        .query(&format!("SELECT key FROM loopsync.{table}"), &[])
                        .await
                        .unwrap()
                    {
                        keys.push((table.clone(), row.get(0)));
                    }
                }
            }
        }
        _ => unreachable!("the state is in SQLite or PostgreSQL"),
    }
    (rows, keys)
}

/// Where in the state `key` or `email` still is: `table: row`.
async fn traces(stack: &Stack, key: &str, email: &str) -> Vec<String> {
    let (rows, keys) = state_tables(stack).await;
    let mut found: Vec<String> = rows
        .iter()
        .filter(|(_, row)| row.to_lowercase().contains(email))
        .map(|(table, row)| format!("{table}: {row}"))
        .collect();
    found.extend(
        keys.iter()
            .filter(|(_, k)| k == key)
            .map(|(table, k)| format!("{table}: key {k}")),
    );
    found
}

/// A synced person forgotten by key leaves no trace in any table of the state; the others stay;
/// a key that is not there exits 1 and erases nothing; and the row still in the model is new to
/// the next run.
async fn forgotten_from_every_table(sqlite: bool) {
    let Some(stack) = Stack::start(StackOptions {
        rows: 6,
        sqlite,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(!traces(&stack, "3", "user3@example.com").await.is_empty());

    let unknown = stack
        .output(&["forget", "--sync", "users", "--key", "nobody"])
        .await;
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("nothing of key nobody was found in sync users"),
        "{stderr}"
    );

    let out = stack
        .output(&["forget", "--sync", "users", "--key", "3", "--json"])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report = json_data(&out.stdout).unwrap();
    assert_eq!(report["found"], true, "{report}");
    assert_eq!(report["records"], 1, "{report}");
    assert_eq!(report["state"]["state"], 1, "{report}");
    assert_eq!(report["state"]["records"], 1, "{report}");
    assert_eq!(report["messages"], serde_json::Value::Null, "no NATS");
    let left = traces(&stack, "3", "user3@example.com").await;
    assert!(
        left.is_empty(),
        "the person is still in the state: {left:?}"
    );
    assert!(
        !traces(&stack, "4", "user4@example.com").await.is_empty(),
        "another person is kept"
    );

    let again = stack.run_once(&[]).await;
    assert_eq!(again.status, 0, "{}", again.stderr);
    assert_eq!(again.run()["added"], 1, "the row still in the model is new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_is_forgotten_from_every_table_of_sqlite_state() {
    forgotten_from_every_table(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_is_forgotten_from_every_table_of_postgres_state() {
    forgotten_from_every_table(false).await;
}

/// The stack's bus, as its processes see it (the installation's streams), and the installation.
async fn bus(stack: &Stack) -> (JetStreamBus, String) {
    let installation = stack.text("SELECT id FROM loopsync.installation").await;
    let ns = stack.nats.as_ref().expect("a NATS stack");
    let bus = JetStreamBus::connect(
        &ns.url,
        Names::scoped(&ns.namespace, &installation),
        &JetStreamOptions::default(),
    )
    .await
    .unwrap();
    (bus, installation)
}

/// Whether the loader's ledger has an entry for record `key` of sync `users`.
async fn in_ledger(stack: &Stack, key: &str) -> bool {
    let (bus, installation) = bus(stack).await;
    bus.ledger_get(&keys::ledger_key(&installation, "users", key))
        .await
        .unwrap()
        .is_some()
}

/// The keys of the loader's dead letters in the installation's dead-letter stream.
async fn dead_letter_keys(stack: &Stack) -> Vec<String> {
    let (bus, _) = bus(stack).await;
    let mut keys: Vec<String> = bus
        .dead_letters()
        .await
        .unwrap()
        .iter()
        .filter_map(|l| codec::decode::<Operation>(&l.payload).ok())
        .map(|op| op.key)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Over NATS, a dead-lettered person forgotten by email is gone from the dead-letter stream,
/// the loader's ledger and the state; the other dead letters and entries stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_person_leaves_the_dead_letter_stream() {
    let Some((stack, run)) = Stack::with_dead_letters(StackOptions {
        rows: 3,
        nats: true,
        max_attempts: 2,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    assert_eq!(run.run()["dead_lettered"], 3);
    assert_eq!(dead_letter_keys(&stack).await, ["1", "2", "3"]);
    assert!(
        in_ledger(&stack, "2").await,
        "the loader's claim of the record"
    );

    let out = stack
        .output(&[
            "forget",
            "--sync",
            "users",
            "--email",
            " User2@Example.com",
            "--json",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_data(&out.stdout).unwrap();
    assert!(
        report["messages"]["dead_letters"].as_u64() >= Some(1),
        "{report}"
    );
    assert_eq!(dead_letter_keys(&stack).await, ["1", "3"]);
    assert_eq!(report["ledger"], 1, "{report}");
    assert!(!in_ledger(&stack, "2").await, "the ledger entry is purged");
    assert!(in_ledger(&stack, "1").await, "another's stays");
    let left = traces(&stack, "2", "user2@example.com").await;
    assert!(
        left.is_empty(),
        "the person is still in the state: {left:?}"
    );
}

/// `--in-loops` deletes the person's contact in Loops (found by email, in any case), and only
/// theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_loops_deletes_the_contact() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        sqlite: true,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(stack.contacts().await.contains_key("user2@example.com"));

    let out = stack
        .output(&[
            "forget",
            "--sync",
            "users",
            "--email",
            "USER2@example.com",
            "--in-loops",
            "--json",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_data(&out.stdout).unwrap();
    assert_eq!(report["loops"]["deleted"], 1, "{report}");
    let contacts = stack.contacts().await;
    assert!(!contacts.contains_key("user2@example.com"), "{contacts:?}");
    assert!(
        contacts.contains_key("user1@example.com") && contacts.contains_key("user3@example.com")
    );
}

/// A run over NATS whose runner is stopped is closed `interrupted` at once, but the workers
/// (other machines) still hold its operations: a loader waiting for Loops' answer. `forget`
/// sees no run in progress and erases the person, with exit 0; then the loader's answer
/// arrives: it writes the ledger entry again, and its outcome, published after `forget` walked
/// the streams, writes the person back into the state when the next run's checkpointer takes
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_is_not_undone_by_an_operation_a_worker_still_holds() {
    let _serial = loopsync_testkit::serial().await;
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        nats: true,
        requests_per_second: 1,
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
    let mut runner = stack
        .command(&["run", "--once", "--remote", "--json"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the runner");
    let runner_stderr = loopsync_testkit::process::collect(runner.stderr.take());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut wait_for_contacts = async |n: usize| loop {
        let contacts = stack.contacts().await;
        if contacts.len() >= n {
            return contacts;
        }
        if runner.try_wait().unwrap().is_some() || tokio::time::Instant::now() > deadline {
            let _ = runner.kill().await;
            panic!("the loader's writes do not reach Loops (the runner ended or hangs)");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let before = wait_for_contacts(1).await;
    // From now on, Loops applies each write at once and answers 7 s later.
    stack.sim_post("faults", json!({"latency_ms": 7_000})).await;
    let after = wait_for_contacts(before.len() + 1).await;
    let email = after
        .keys()
        .find(|e| !before.contains_key(*e))
        .expect("a new contact")
        .clone();
    let key = email
        .strip_prefix("user")
        .and_then(|e| e.strip_suffix("@example.com"))
        .expect("a contact of the model")
        .to_owned();
    // The operator stops the runner: its run is closed at once; the workers go on.
    loopsync_testkit::sigterm(&runner).await;
    runner.wait().await.expect("the runner ends");
    drop(runner_stderr);
    // The person leaves the model and is forgotten, while the loader waits for the answer.
    stack
        .sql(&format!("DELETE FROM users WHERE id = {key}"))
        .await;
    let out = stack
        .output(&["forget", "--sync", "users", "--key", &key, "--json"])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let refused = !out.status.success();
    if refused {
        assert!(
            stderr.contains("still in NATS's work queues") && stderr.contains("nothing was erased"),
            "{stderr}"
        );
        assert!(
            !traces(&stack, &key, &email).await.is_empty(),
            "a refused forget erases nothing"
        );
    }
    // The answer arrives; the next run's checkpointer records the outcomes.
    stack.sim_post("faults", json!({})).await;
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    let next = stack.run_once(&[]).await;
    assert_eq!(next.status, 0, "{}", next.stderr);
    if refused {
        // Once the queues are drained, forget erases, and nothing brings the person back.
        let out = stack
            .output(&["forget", "--sync", "users", "--key", &key])
            .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stack.run_once(&[]).await;
        assert_eq!(last.status, 0, "{}", last.stderr);
    }
    let left = traces(&stack, &key, &email).await;
    let ledger = in_ledger(&stack, &key).await;
    assert!(
        left.is_empty() && !ledger,
        "forget exited 0, but the person is back in the state ({left:?}) or the ledger \
         ({ledger})"
    );
}

/// The state keeps a row's email as the hashed diff noted it (`model_email`, PostgreSQL) only
/// while the row is noted unchanged: a confirmed re-key leaves the old email there, stale.
/// Record 1 hands its email to a new record 99 in one run; the new owner's erasure request
/// (`--email`) must forget record 99 and the email — not record 1, whose contact is now
/// another address: its state must stay, its contact in Loops must not be deleted, and no
/// table may keep the email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_by_email_leaves_the_record_that_handed_it_over() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    for _ in 0..2 {
        // The second run notes the rows it finds unchanged, with their emails.
        let run = stack.run_once(&[]).await;
        assert_eq!(run.status, 0, "{}", run.stderr);
    }
    stack
        .sql(
            "UPDATE users SET email = 'moved1@example.com' WHERE id = 1;
             INSERT INTO users VALUES (99, 'user1@example.com', 'New', 'free', 1,
                                       timestamptz '2024-02-01 00:00:00+00', true);",
        )
        .await;
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(run.run()["confirmed"], 2, "the re-key and the new record");

    let out = stack
        .output(&[
            "forget",
            "--sync",
            "users",
            "--email",
            "user1@example.com",
            "--in-loops",
            "--json",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_data(&out.stdout).unwrap();
    let contacts = stack.contacts().await;
    assert!(!contacts.contains_key("user1@example.com"), "{contacts:?}");
    assert!(
        contacts.contains_key("moved1@example.com"),
        "record 1's contact was deleted for another person's request: {report}"
    );
    assert_eq!(report["records"], 1, "{report}");
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.state WHERE sync = 'users' AND key = '1'")
            .await,
        1,
        "record 1's state is kept"
    );
    let left = traces(&stack, "99", "user1@example.com").await;
    assert!(left.is_empty(), "the email is still in the state: {left:?}");
}

/// `forget --in-loops` in the event sync deletes the person's contact, which the contact
/// sync `users` also holds: that sync's state still believes Loops has it, so its next run —
/// the person's row still in its model — finds the row unchanged and Loops stays without
/// it. A contact another sync of the deployment holds is kept, and the report says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_in_loops_keeps_a_contact_another_sync_holds() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        events: Some(6),
        sqlite: true,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(stack.contacts().await.contains_key("user2@example.com"));

    // The person's events leave the event model, and the event sync forgets them.
    stack
        .sql("DELETE FROM user_events WHERE email = 'user2@example.com'")
        .await;
    let out = stack
        .output(&[
            "forget",
            "--sync",
            "events",
            "--email",
            "user2@example.com",
            "--in-loops",
            "--json",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json_data(&out.stdout).unwrap();
    assert!(report["records"].as_u64() >= Some(1), "{report}");

    let again = stack.run_once(&[]).await;
    assert_eq!(again.status, 0, "{}", again.stderr);
    let contacts = stack.contacts().await;
    assert!(
        contacts.contains_key("user2@example.com"),
        "a clean run of users left Loops without a row of its model: {report}"
    );
    assert_eq!(report["loops"]["held_by_another_sync"], 1, "{report}");
}
