//! The bulk lane end to end: `loopsync export` writes the files, the simulator's CSV upload
//! (`/_sim/import`, Loops' documented rules) takes them, `adopt --from-loops-export` reads the
//! audience export (`/_sim/export`) and adopts exactly what Loops holds as the sync would write
//! it, `run` sends only what the upload missed, and `verify --from-loops-export` compares every
//! confirmed record with the file without a request to Loops.

use loopsync_testkit::{Stack, StackOptions, http_client};
use serde_json::{Value, json};

/// `POST /_sim/import` of a file, with the lists ticked for it.
async fn upload(stack: &Stack, file: &std::path::Path, lists: &str) -> Value {
    let body = std::fs::read(file).expect("read an exported file");
    http_client()
        .post(format!(
            "{}/_sim/import?lists={lists}&trigger_loops=false",
            stack.sim.root
        ))
        .body(body)
        .send()
        .await
        .expect("an upload")
        .json()
        .await
        .expect("the upload's report")
}

/// `GET /_sim/export`, saved in the stack's folder.
async fn download(stack: &Stack, name: &str) -> std::path::PathBuf {
    let csv = http_client()
        .get(format!("{}/_sim/export", stack.sim.root))
        .send()
        .await
        .expect("an export")
        .bytes()
        .await
        .expect("the export's body");
    let path = stack.dir.join(name);
    std::fs::write(&path, csv).expect("write the export");
    path
}

/// `loopsync ARGS…`: its exit status and stdout (stderr shown on failure).
async fn loopsync(stack: &Stack, args: &[&str]) -> (i32, String) {
    let output = stack.output(args).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let status = output.status.code().unwrap_or(-1);
    assert!(
        status == 0 || status == 1,
        "loopsync {args:?}: exit {status}: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    (status, stdout)
}

/// `loopsync ARGS…` that must be refused as bad usage: exit 2, and what it said on stderr.
async fn loopsync_refused(stack: &Stack, args: &[&str]) -> (i32, String) {
    let output = stack.output(args).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

/// `loopsync adopt --sync users --from-loops-export FILE`: its exit status and stdout.
async fn adopt_from(stack: &Stack, file: &std::path::Path) -> (i32, String) {
    let file = file.to_str().expect("a UTF-8 path");
    loopsync(
        stack,
        &["adopt", "--sync", "users", "--from-loops-export", file],
    )
    .await
}

/// The same, for a refusal: its exit status and stderr.
async fn adopt_from_refused(stack: &Stack, file: &std::path::Path) -> (i32, String) {
    let file = file.to_str().expect("a UTF-8 path");
    loopsync_refused(
        stack,
        &["adopt", "--sync", "users", "--from-loops-export", file],
    )
    .await
}

/// A run (exit 0), then Loops holds exactly the model's rows `keys`.
async fn run_and_compare(stack: &Stack, keys: &[i64]) {
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_loops_is_the_model(stack, &stack.contacts().await, keys).await;
}

async fn put(stack: &Stack, body: Value) {
    let answer = stack
        .loops(reqwest::Method::PUT, "/v1/contacts/update", body)
        .await;
    assert_eq!(answer["success"], true, "{answer}");
}

/// A first sync identified by userId, through a CSV upload: a file per set of lists, `null`
/// clearing a value, an unsubscribed contact that stays so, contacts matched by User ID and by
/// email, a row the import fails, a contact edited in Loops after the upload; then the API
/// lane sends exactly the two records the upload missed, and verify reads the file.
#[tokio::test]
async fn a_first_sync_through_the_csv_upload() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 10,
        identify_by: "userId",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    // Row 6 has no plan (the sync clears it); row 11 has no email (a new contact needs one).
    stack.sql("UPDATE users SET plan = NULL WHERE id = 6").await;
    stack
        .sql("INSERT INTO users VALUES (11, NULL, 'First11', 'pro', 1, now(), true)")
        .await;
    let (_, out) = loopsync(&stack, &["check", "--create-properties"]).await;
    assert!(!out.is_empty());
    // Loops before: user2 unsubscribed; user4 known by its userId; user6 on a plan the sync
    // clears; user7 known by email only; userId 5 on another email (its row must fail).
    put(
        &stack,
        json!({"email": "user2@example.com", "subscribed": false}),
    )
    .await;
    put(
        &stack,
        json!({"email": "user4@example.com", "userId": "4", "firstName": "Old"}),
    )
    .await;
    put(
        &stack,
        json!({"email": "user6@example.com", "planName": "gold"}),
    )
    .await;
    put(&stack, json!({"email": "user7@example.com"})).await;
    put(
        &stack,
        json!({"email": "elsewhere5@example.com", "userId": "5"}),
    )
    .await;

    let out_dir = stack.dir.join("upload");
    let (status, printed) = loopsync(
        &stack,
        &[
            "export",
            "--sync",
            "users",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(status, 0, "{printed}");
    assert!(
        printed.contains("10 records in 2 files · 1 invalid"),
        "{printed}"
    );
    assert!(
        printed.contains("! key 11: a new contact needs an email"),
        "{printed}"
    );
    assert!(
        printed.contains("tick the mailing lists: cm_news"),
        "{printed}"
    );
    let mut files: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "users.lists-cm_news.csv",
            "users.no-lists.csv",
            "users.records.jsonl"
        ]
    );
    let lists_file = std::fs::read_to_string(out_dir.join("users.lists-cm_news.csv")).unwrap();
    assert!(
        lists_file.starts_with("Email,User ID,First Name,planName,seats,signedUpAt\n"),
        "{lists_file}"
    );
    assert!(
        lists_file.contains("user6@example.com,6,First6,null,6,"),
        "null where the sync clears: {lists_file}"
    );
    assert_eq!(stack.sim.seen().await.to("POST /_sim/import"), 0);

    let before = stack.sim.seen().await;
    let listed = upload(&stack, &out_dir.join("users.lists-cm_news.csv"), "cm_news").await;
    assert_eq!(
        (&listed["new"], &listed["updated"], &listed["failed"]),
        (&json!(2), &json!(3), &json!(0)),
        "{listed}"
    );
    let unlisted = upload(&stack, &out_dir.join("users.no-lists.csv"), "").await;
    assert_eq!(
        (&unlisted["new"], &unlisted["updated"], &unlisted["failed"]),
        (&json!(3), &json!(1), &json!(1)),
        "{unlisted}"
    );
    assert!(
        unlisted["failures"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("another email"),
        "{unlisted}"
    );
    assert_eq!(unlisted["failures"][0]["line"], 4, "user5 is the third row");
    assert_eq!(
        stack.sim.seen().await.since(&before).total,
        0,
        "an upload is no request"
    );

    let contacts = stack.contacts().await;
    let c = |e: &str| contacts[&format!("{e}@example.com")].clone();
    assert_eq!(c("user2")["subscribed"], false, "never re-subscribed");
    assert_eq!(c("user2")["mailingLists"], json!({"cm_news": true}));
    assert_eq!(
        c("user1")["mailingLists"],
        json!({}),
        "the other file's lists only"
    );
    assert_eq!(
        (&c("user4")["userId"], &c("user4")["firstName"]),
        (&json!("4"), &json!("First4"))
    );
    assert_eq!(c("user6")["planName"], Value::Null, "null cleared gold");
    assert_eq!(
        c("user7")["userId"],
        "7",
        "matched by email, its userId set"
    );
    assert!(
        !contacts.contains_key("user5@example.com"),
        "the failed row"
    );
    assert_eq!(c("user1")["source"], "CSV Upload");

    // Someone edits user8 in Loops after the upload, before the export is taken.
    put(&stack, json!({"userId": "8", "planName": "edited"})).await;
    let audience = download(&stack, "audience.csv").await;
    let (status, adopted) = adopt_from(&stack, &audience).await;
    assert_eq!(status, 0, "{adopted}");
    assert!(adopted.contains("adopted 8 records"), "{adopted}");
    assert!(adopted.contains("2 a property differs"), "{adopted}");

    // The API lane sends exactly what the upload missed: user5 and user8.
    let before = stack.sim.seen().await;
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 3, "degraded: row 11 is invalid: {}", run.stderr);
    let seen = stack.sim.seen().await.since(&before);
    assert_eq!(seen.writes(), 2, "{seen:?}");
    assert_eq!(run.run()["confirmed"], 2, "{:#}", run.run());
    let contacts = stack.contacts().await;
    assert_eq!(contacts["user8@example.com"]["planName"], "team");
    assert_eq!(contacts["user5@example.com"]["userId"], "5");

    // Every confirmed record against the audience export: no drift, no request.
    let audience = download(&stack, "audience-after.csv").await;
    let before = stack.sim.seen().await;
    let (status, out) = loopsync(
        &stack,
        &[
            "verify",
            "--json",
            "--from-loops-export",
            audience.to_str().unwrap(),
        ],
    )
    .await;
    let report = loopsync_testkit::json_data(out.as_bytes()).unwrap();
    assert_eq!(status, 0, "{report:#}");
    assert_eq!(
        (&report["checked"], &report["drifted"]),
        (&json!(10), &json!(0))
    );
    // user3 edited in Loops: found in the next export, repaired, re-sent alone.
    put(&stack, json!({"userId": "3", "planName": "gold"})).await;
    let audience = download(&stack, "audience-edited.csv").await;
    let (status, out) = loopsync(
        &stack,
        &[
            "verify",
            "--json",
            "--repair",
            "--from-loops-export",
            audience.to_str().unwrap(),
        ],
    )
    .await;
    let report = loopsync_testkit::json_data(out.as_bytes()).unwrap();
    assert_eq!(status, 1, "{report:#}");
    assert_eq!(report["drifted"], 1, "{report:#}");
    assert_eq!(report["syncs"][0]["drifts"][0]["key"], "3");
    assert_eq!(report["syncs"][0]["drifts"][0]["field"], "planName");
    assert_eq!(report["syncs"][0]["requests"], 0);
    assert_eq!(
        stack.sim.seen().await.since(&before).writes(),
        1,
        "only the edit"
    );
    let before = stack.sim.seen().await;
    stack.run_once(&[]).await;
    assert_eq!(
        stack.sim.seen().await.since(&before).writes(),
        1,
        "only the repaired record"
    );
}

// ---------------------------------------------------------------------------------------------
// Holes found by attacking the bulk lane (each test failed on the code it was written against).
// ---------------------------------------------------------------------------------------------

/// `POST /_sim/import` of `file` to the simulator at `root`, with the lists ticked for it.
async fn upload_to(root: &str, file: &std::path::Path, lists: &str) -> Value {
    let body = std::fs::read(file).expect("read a file to upload");
    http_client()
        .post(format!(
            "{root}/_sim/import?lists={lists}&trigger_loops=false"
        ))
        .body(body)
        .send()
        .await
        .expect("an upload")
        .json()
        .await
        .expect("the upload's report")
}

/// `GET /_sim/export` of the simulator at `root`, saved in the stack's folder.
async fn download_from(stack: &Stack, root: &str, name: &str) -> std::path::PathBuf {
    let csv = http_client()
        .get(format!("{root}/_sim/export"))
        .send()
        .await
        .expect("an export")
        .bytes()
        .await
        .expect("the export's body");
    let path = stack.dir.join(name);
    std::fs::write(&path, csv).expect("write the export");
    path
}

/// A second simulated Loops: another team, with the stack's mailing list and the sync's custom
/// properties (an upload names them as columns).
async fn another_team() -> loopsync_testkit::SimProcess {
    let sim = loopsync_testkit::SimProcess::start(&[
        "--rate-limit",
        "100",
        "--list",
        "cm_news=Newsletter",
    ]);
    let mut settings = sim.inspect("settings").await;
    settings["team_name"] = json!("Other Team");
    sim.post("settings", settings).await;
    for (name, kind) in [
        ("planName", "string"),
        ("seats", "number"),
        ("signedUpAt", "date"),
    ] {
        let answer: Value = http_client()
            .post(format!("{}/v1/contacts/properties", sim.api()))
            .bearer_auth("test-key")
            .json(&json!({"name": name, "type": kind}))
            .send()
            .await
            .expect("create a property")
            .json()
            .await
            .expect("its answer");
        assert_eq!(answer["success"], true, "{answer}");
    }
    sim
}

/// Rewrites the config's `base_url` from one API root to another.
fn point_at(stack: &Stack, from: &str, to: &str) {
    let text = std::fs::read_to_string(&stack.config).expect("read the config");
    let (from, to) = (
        format!("base_url = \"{from}\""),
        format!("base_url = \"{to}\""),
    );
    assert!(text.contains(&from), "{from} in:\n{text}");
    std::fs::write(&stack.config, text.replace(&from, &to)).expect("write the config");
}

/// `loopsync export` of sync `users` into `name`, each file uploaded to `root` with its lists.
async fn export_and_upload(stack: &Stack, root: &str, name: &str) {
    let out_dir = stack.dir.join(name);
    let (status, printed) = loopsync(
        stack,
        &[
            "export",
            "--sync",
            "users",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(status, 0, "{printed}");
    for entry in std::fs::read_dir(&out_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "csv") {
            continue;
        }
        let lists = if path.to_string_lossy().contains("lists-cm_news") {
            "cm_news"
        } else {
            ""
        };
        let report = upload_to(root, &path, lists).await;
        assert_eq!(report["failed"], 0, "{report}");
    }
}

/// Every row of `users` as the sync writes it, compared with the contacts of `sim`: the
/// invariant after a clean run (email, first name, plan, list).
async fn assert_loops_is_the_model(
    stack: &Stack,
    contacts: &std::collections::BTreeMap<String, Value>,
    ids: &[i64],
) {
    for id in ids {
        let email = stack
            .text(&format!("SELECT email FROM users WHERE id = {id}"))
            .await;
        let plan = stack
            .text(&format!("SELECT plan FROM users WHERE id = {id}"))
            .await;
        let newsletter = stack
            .text(&format!(
                "SELECT CASE WHEN newsletter THEN 'true' ELSE 'false' END FROM users WHERE id = {id}"
            ))
            .await;
        let Some(contact) = contacts.get(&email) else {
            panic!("row {id}: Loops has no contact {email}: {contacts:#?}");
        };
        assert_eq!(contact["planName"], json!(plan), "row {id}: {contact}");
        let on_list = contact["mailingLists"]["cm_news"] == json!(true);
        assert_eq!(
            on_list.to_string(),
            newsletter,
            "row {id}: the list: {contact}"
        );
    }
}

/// A sync bound to team A is moved to team B, which holds only some of its contacts (an
/// upload that missed two). The refusal names `adopt` as the way forward; with B's audience
/// export, `adopt --from-loops-export` "adopts only records whose contact in the file is what
/// the sync would write" — but a row unchanged since A confirmed it was never compared with the
/// file: every record stayed confirmed, the state was rebound to B, and the next run sent
/// nothing. Now the records A confirmed that the file does not hold are forgotten, and the
/// next run sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_another_teams_export_checks_the_records_already_confirmed() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 5,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    assert_eq!(stack.run_once(&[]).await.status, 0);
    let b = another_team().await;
    // B holds users 1 to 3 by email and first name only (an upload of an older list).
    let partial = stack.dir.join("partial.csv");
    std::fs::write(
        &partial,
        "Email,First Name\nuser1@example.com,First1\nuser2@example.com,First2\n\
         user3@example.com,First3\n",
    )
    .unwrap();
    let report = upload_to(&b.root, &partial, "").await;
    assert_eq!(report["new"], 3, "{report}");
    point_at(&stack, &stack.sim.api(), &b.api());
    let refused = stack.run_once(&[]).await;
    assert_eq!(refused.status, 2, "another Loops: {}", refused.stderr);

    let audience = download_from(&stack, &b.root, "b-audience.csv").await;
    let (status, adopted) = adopt_from(&stack, &audience).await;
    assert_eq!(status, 0, "{adopted}");
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    let contacts = b.contacts().await;
    assert_loops_is_the_model(&stack, &contacts, &[1, 2, 3, 4, 5]).await;
}

/// The state is bound to team A. Two new rows go through the bulk lane, but the files are
/// uploaded to team B (the wrong team picked in Loops' app). B's audience export holds them
/// exactly as the sync would write them; `adopt --from-loops-export` adopted both as
/// confirmed in A (nothing tied the file to the Loops the state is bound to), and A never got
/// the two contacts. Read back from A, the records the file would adopt are missing there:
/// the file is refused (exit 2) and the next run sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_of_another_team_is_not_a_confirmation_of_this_one() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    assert_eq!(stack.run_once(&[]).await.status, 0, "bound to A");
    stack
        .sql(
            "INSERT INTO users VALUES
               (4, 'user4@example.com', 'First4', 'pro', 4, now(), true),
               (5, 'user5@example.com', 'First5', 'team', 5, now(), false)",
        )
        .await;
    let b = another_team().await;
    export_and_upload(&stack, &b.root, "to-b").await;
    assert_eq!(b.contacts().await.len(), 2);
    let audience = download_from(&stack, &b.root, "b-audience.csv").await;
    let (status, refused) = adopt_from_refused(&stack, &audience).await;
    assert_eq!(
        status, 2,
        "read back from A, the file is refused: {refused}"
    );
    assert!(
        refused.contains("does not match the Loops the sync is bound to"),
        "{refused}"
    );
    run_and_compare(&stack, &[1, 2, 3, 4, 5]).await;
}

/// A first sync through the bulk lane; its audience export is kept. Then the API lane moves on:
/// row 1's plan changes and is sent (Loops: gold), row 2 leaves the model and its contact is
/// deleted (mirror). Row 1 goes back to its first plan and row 2 returns. Adopting again from
/// the old export (the file of the first sync, still at hand) adopts both — the old file holds
/// them as the sync would write them — although Loops confirmed something newer since: the
/// next run (exit 0) sends nothing, Loops keeps gold for row 1 and has no contact for row 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_export_does_not_overrule_what_loops_confirmed_since() {
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
    let (_, out) = loopsync(&stack, &["check", "--create-properties"]).await;
    assert!(!out.is_empty());
    export_and_upload(&stack, &stack.sim.root, "first").await;
    let first = download(&stack, "first-audience.csv").await;
    let adopt = |file: std::path::PathBuf| {
        let stack = &stack;
        async move {
            let (status, adopted) = loopsync(
                stack,
                &[
                    "adopt",
                    "--sync",
                    "users",
                    "--from-loops-export",
                    file.to_str().unwrap(),
                ],
            )
            .await;
            assert_eq!(status, 0, "{adopted}");
            adopted
        }
    };
    let adopted = adopt(first.clone()).await;
    assert!(adopted.contains("adopted 3 records"), "{adopted}");

    stack
        .sql(
            "UPDATE users SET plan = 'gold' WHERE id = 1;
             CREATE TABLE users_kept AS SELECT * FROM users WHERE id = 2;
             DELETE FROM users WHERE id = 2;",
        )
        .await;
    let (run, seen) = stack.run_seen(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(
        (
            seen.to("PUT /v1/contacts/update"),
            seen.to("POST /v1/contacts/delete")
        ),
        (1, 1),
        "{seen:?}"
    );
    assert_eq!(
        stack.contacts().await["user1@example.com"]["planName"],
        "gold"
    );

    stack
        .sql(
            "UPDATE users SET plan = 'pro' WHERE id = 1;
             INSERT INTO users SELECT * FROM users_kept;",
        )
        .await;
    adopt(first).await;
    run_and_compare(&stack, &[1, 2, 3]).await;
}

/// Loops' export may name a contact's lists by name rather than id (docs/loops-api.md §10.1,
/// open question 4, which says that would only be slower: "never wrong"). Row 1's newsletter
/// is false, but its contact was on the list before the upload (an upload only adds lists).
/// Read by name, the list cell holds no id the sync maps, so the contact read as off the list
/// and row 1 was adopted: the contact stayed on the list the model says it is not on. Now a
/// list token that is no list id the sync maps makes the lists unreadable: the record is left
/// to the API lane, and the next run takes the contact off the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_named_otherwise_in_the_export_are_not_taken_as_off() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let (_, out) = loopsync(&stack, &["check", "--create-properties"]).await;
    assert!(!out.is_empty());
    put(
        &stack,
        json!({"email": "user1@example.com", "mailingLists": {"cm_news": true}}),
    )
    .await;
    export_and_upload(&stack, &stack.sim.root, "upload").await;
    assert_eq!(
        stack.contacts().await["user1@example.com"]["mailingLists"],
        json!({"cm_news": true}),
        "an upload never takes a list away"
    );
    let audience = download(&stack, "audience.csv").await;
    let by_name = std::fs::read_to_string(&audience)
        .unwrap()
        .replace("cm_news", "Newsletter");
    std::fs::write(&audience, by_name).unwrap();
    let (status, adopted) = adopt_from(&stack, &audience).await;
    assert_eq!(status, 0, "{adopted}");
    run_and_compare(&stack, &[1, 2, 3]).await;
}

/// Mirror. Row 1's email changes and its re-key's answers are all lost (Loops applied the write
/// of the new address; the old contact's delete was never sent). Then the row goes back to the
/// email Loops confirmed. The API lane would write it and take out the contact the lost re-key
/// made (`also_remove`). Through the bulk lane the write is uploaded and, being in the export
/// as the sync writes it, adopted — and the contact the lost re-key left is forgotten with the
/// doubt: the next run (exit 0) sends nothing, and Loops keeps a contact no row has (the export
/// itself shows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopting_from_the_export_keeps_taking_out_what_a_lost_write_left() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        behavior: "mirror",
        max_attempts: 2,
        extra_sync: "max_removal_share = 1.0",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    assert_eq!(stack.run_once(&[]).await.status, 0);
    stack
        .sql("UPDATE users SET email = 'moved1@example.com' WHERE id = 1")
        .await;
    stack
        .sim_post(
            "faults",
            json!({"error_503": 1.0, "after_effect": 1.0,
                   "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;
    let lost = stack.run_once(&[]).await;
    assert_eq!(lost.status, 3, "the re-key's answers lost: {}", lost.stderr);
    assert!(stack.contacts().await.contains_key("moved1@example.com"));
    stack.sim_post("faults", json!({})).await;
    stack
        .sql("UPDATE users SET email = 'user1@example.com' WHERE id = 1")
        .await;

    export_and_upload(&stack, &stack.sim.root, "upload").await;
    let audience = download(&stack, "audience.csv").await;
    let (status, adopted) = adopt_from(&stack, &audience).await;
    assert_eq!(status, 0, "{adopted}");
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    let contacts = stack.contacts().await;
    assert_loops_is_the_model(&stack, &contacts, &[1, 2, 3]).await;
    assert!(
        !contacts.contains_key("moved1@example.com"),
        "mirror: no contact the sync wrote and no row has: {contacts:#?}"
    );
}

/// An export with one email on two rows (in two spellings: a file joined from two exports, or
/// a Loops that matched emails by case) names two contacts for one record. Which one the sync
/// writes is unknown, so neither is proof: `adopt --from-loops-export` took the last row, and
/// adopted row 1 although the contact holds other values. Now such a record is left to the
/// API lane, and the next run sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_on_two_rows_of_the_export_proves_nothing() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let (_, out) = loopsync(&stack, &["check", "--create-properties"]).await;
    assert!(!out.is_empty());
    export_and_upload(&stack, &stack.sim.root, "upload").await;
    // Someone edits row 1's contact in Loops after the upload.
    put(
        &stack,
        json!({"email": "user1@example.com", "planName": "edited"}),
    )
    .await;
    let audience = download(&stack, "audience.csv").await;
    let text = std::fs::read_to_string(&audience).unwrap();
    // The line of row 1 as uploaded (its plan as the sync writes it), in capitals, appended: the
    // file names row 1's email twice, once edited, once not.
    let line = text
        .lines()
        .find(|l| l.contains("user1@example.com"))
        .unwrap()
        .replace("edited", "pro")
        .replace("user1@example.com", "USER1@example.com");
    std::fs::write(&audience, format!("{text}{line}\n")).unwrap();
    let (status, adopted) = adopt_from(&stack, &audience).await;
    assert_eq!(status, 0, "{adopted}");
    run_and_compare(&stack, &[1, 2, 3]).await;
}

/// The operator passes `adopt --from-loops-export` the file `loopsync export` wrote (the one to
/// upload) instead of Loops' audience export, before any upload. It holds each record exactly
/// as the sync writes it, and has no lists column, so every record that joins no list was
/// adopted and Loops never got them. Without a lists column the file is refused (exit 2),
/// and the next run sends every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_to_upload_is_not_loops_export() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 4,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let out_dir = stack.dir.join("upload");
    let (status, printed) = loopsync(
        &stack,
        &[
            "export",
            "--sync",
            "users",
            "--out",
            out_dir.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(status, 0, "{printed}");
    let ours = out_dir.join("users.no-lists.csv");
    let (status, refused) = adopt_from_refused(&stack, &ours).await;
    assert_eq!(status, 2, "not Loops' export: refused: {refused}");
    assert!(refused.contains("no Mailing Lists column"), "{refused}");
    run_and_compare(&stack, &[1, 2, 3, 4]).await;
}

/// Mirror, 4 rows: `loopsync export` into `upload/`, then, before the upload, row 3 leaves the
/// model and row 2 moves to moved2@example.com. The stack and the folder.
async fn exported_then_changed() -> Option<(Stack, std::path::PathBuf)> {
    let stack = Stack::start(StackOptions {
        rows: 4,
        behavior: "mirror",
        extra_sync: "max_removal_share = 1.0",
        ..StackOptions::default()
    })
    .await?;
    let (_, out) = loopsync(&stack, &["check", "--create-properties"]).await;
    assert!(!out.is_empty());
    let out_dir = stack.dir.join("upload");
    let out = out_dir.to_str().unwrap();
    let (status, printed) = loopsync(&stack, &["export", "--sync", "users", "--out", out]).await;
    assert_eq!(status, 0, "{printed}");
    stack.sql("DELETE FROM users WHERE id = 3").await;
    stack
        .sql("UPDATE users SET email = 'moved2@example.com' WHERE id = 2")
        .await;
    Some((stack, out_dir))
}

/// `loopsync adopt --sync users --from-loops-export AUDIENCE --exported DIR`'s arguments.
fn adopt_exported<'a>(audience: &'a std::path::Path, dir: &'a std::path::Path) -> [&'a str; 7] {
    [
        "adopt",
        "--sync",
        "users",
        "--from-loops-export",
        audience.to_str().unwrap(),
        "--exported",
        dir.to_str().unwrap(),
    ]
}

/// Mirror. `loopsync export` writes the files; before they are uploaded (hours later, for a
/// large audience) row 3 leaves the model and row 2 moves to a new address. The upload still
/// creates row 3's contact and row 2's at its first address — writes of the sync's, which no
/// state knew of: export notes nothing. `adopt --from-loops-export --exported DIR` reads the
/// records file export wrote beside the files, adopts rows 1 and 4, and notes rows 2 and 3 as
/// possibly in Loops (a create whose answer was lost): the next run (exit 0) deletes row 3's
/// contact and row 2's first one, and writes row 2's new address. (Without `--exported` both
/// stayed in Loops for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_leaves_between_export_and_upload_is_removed() {
    let Some((stack, out_dir)) = exported_then_changed().await else {
        return;
    };
    let records = std::fs::read_to_string(out_dir.join("users.records.jsonl")).unwrap();
    assert!(records.contains("user3@example.com"), "{records}");
    for entry in std::fs::read_dir(&out_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "csv") {
            continue;
        }
        let lists = if path.to_string_lossy().contains("lists-cm_news") {
            "cm_news"
        } else {
            ""
        };
        let report = upload(&stack, &path, lists).await;
        assert_eq!(report["failed"], 0, "{report}");
    }
    let uploaded = stack.contacts().await;
    assert!(
        uploaded.contains_key("user3@example.com") && uploaded.contains_key("user2@example.com")
    );
    let audience = download(&stack, "audience.csv").await;
    let adopt = adopt_exported(&audience, &out_dir);
    let (status, adopted) = loopsync(&stack, &adopt).await;
    assert_eq!(status, 0, "{adopted}");
    assert!(
        adopted.contains("2 records of the upload's files not adopted"),
        "{adopted}"
    );
    // Again (a second audience export, say): what the first adopted or noted is the state's
    // now, and stays as it is — nothing is sent again for rows 1 and 4.
    let (status, again) = loopsync(&stack, &adopt).await;
    assert_eq!(status, 0, "{again}");
    assert!(
        !again.contains("of the upload's files not adopted"),
        "{again}"
    );
    let before = stack.sim.seen().await;
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert_eq!(
        stack.sim.seen().await.since(&before).writes(),
        3,
        "row 2 written at its new address, its first one and row 3's deleted"
    );
    let contacts = stack.contacts().await;
    assert_loops_is_the_model(&stack, &contacts, &[1, 2, 4]).await;
    assert!(
        !contacts.contains_key("user3@example.com"),
        "mirror: row 3 left, its uploaded contact must go: {contacts:#?}"
    );
    assert!(
        !contacts.contains_key("user2@example.com"),
        "mirror: row 2 moved, the contact uploaded at its first address must go: {contacts:#?}"
    );
    assert_eq!(contacts.len(), 3, "{contacts:#?}");
}

/// `adopt --exported`, held to what the upload wrote. Row 3 leaves and row 2 moves before the
/// upload, as above, but only the file without lists is uploaded (rows 1 and 3), and someone
/// makes a contact of their own at row 2's first address. The records file lists rows 1 to 4;
/// only row 3's contact in the audience export is what the upload wrote, so only row 3 is
/// noted in doubt, and the next run deletes it — the other contact at row 2's first address,
/// which the sync never wrote, stays. A records file is then refused once a run has been since
/// the export (exit 2): what it lists may be settled, or erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_exported_notes_only_what_the_upload_wrote_and_not_after_a_run() {
    let Some((stack, out_dir)) = exported_then_changed().await else {
        return;
    };
    put(
        &stack,
        json!({"email": "user2@example.com", "firstName": "Someone else"}),
    )
    .await;
    let report = upload(&stack, &out_dir.join("users.no-lists.csv"), "").await;
    assert_eq!(report["failed"], 0, "{report}");
    let audience = download(&stack, "audience.csv").await;
    let adopt = adopt_exported(&audience, &out_dir);
    let (status, adopted) = loopsync(&stack, &adopt).await;
    assert_eq!(status, 0, "{adopted}");
    assert!(
        adopted.contains("sync users: 1 records of the upload's files not adopted"),
        "{adopted}"
    );
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    let contacts = stack.contacts().await;
    assert_loops_is_the_model(&stack, &contacts, &[1, 2, 4]).await;
    assert!(
        !contacts.contains_key("user3@example.com"),
        "row 3 left, its uploaded contact must go: {contacts:#?}"
    );
    assert_eq!(
        contacts["user2@example.com"]["firstName"], "Someone else",
        "a contact the sync never wrote stays: {contacts:#?}"
    );
    let (status, refused) = loopsync_refused(&stack, &adopt).await;
    assert_eq!(status, 2, "{refused}");
    assert!(refused.contains("came after the export"), "{refused}");
}

/// A records file is taken only for the sync and the state it was written for: its header
/// edited to name another state, then another sync, `adopt --exported` refuses it (exit 2) and
/// adopts nothing; as written, it is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopt_exported_refuses_a_records_file_of_another_state_or_sync() {
    let Some((stack, out_dir)) = exported_then_changed().await else {
        return;
    };
    let report = upload(&stack, &out_dir.join("users.no-lists.csv"), "").await;
    assert_eq!(report["failed"], 0, "{report}");
    let audience = download(&stack, "audience.csv").await;
    let adopt = adopt_exported(&audience, &out_dir);
    let path = out_dir.join("users.records.jsonl");
    let written = std::fs::read_to_string(&path).unwrap();
    let (header, records) = written.split_once('\n').unwrap();
    let mut edited: Value = serde_json::from_str(header).unwrap();
    // No state yet when this export ran (a first sync): no installation is named.
    assert!(edited["installation"].is_null(), "{header}");
    for (field, value, said) in [
        (
            "installation",
            "another-state",
            "written from another state",
        ),
        ("sync", "orders", "is sync orders's"),
    ] {
        let original = edited[field].clone();
        edited[field] = json!(value);
        std::fs::write(&path, format!("{edited}\n{records}")).unwrap();
        let (status, refused) = loopsync_refused(&stack, &adopt).await;
        assert_eq!(status, 2, "{field}: {refused}");
        assert!(refused.contains(said), "{field}: {refused}");
        edited[field] = original;
    }
    assert!(
        stack
            .text("SELECT CAST(count(*) AS text) FROM loopsync.runs")
            .await
            == "0",
        "nothing adopted"
    );
    std::fs::write(&path, &written).unwrap();
    let (status, adopted) = loopsync(&stack, &adopt).await;
    assert_eq!(status, 0, "{adopted}");
}
