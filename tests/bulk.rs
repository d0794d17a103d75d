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
    assert_eq!(files, ["users.lists-cm_news.csv", "users.no-lists.csv"]);
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
    let (status, adopted) = loopsync(
        &stack,
        &[
            "adopt",
            "--sync",
            "users",
            "--from-loops-export",
            audience.to_str().unwrap(),
        ],
    )
    .await;
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
