//! A contact sync with a cursor (PRODUCT.md: `cursor`, `full_diff_every`), end to end on
//! PostgreSQL: a run diffs only the rows whose cursor moved (and the rows the state has not
//! noted unchanged), and a full diff — the first run, every `full_diff_every`, and the run
//! after one that did not settle every record — finds the removals and the rows changed
//! without their cursor. The report and `plan` say which diff ran. What Loops holds is read
//! from the simulator.

use loopsync_testkit::{Stack, StackOptions};
use serde_json::{Value, json};

/// The users sync under mirror, its cursor `signed_up_at` (a mapped time column), no lookback.
async fn stack() -> Option<Stack> {
    Stack::start(StackOptions {
        rows: 10,
        behavior: "mirror",
        requests_per_second: 100,
        sim_rate_limit: 100,
        max_attempts: 2,
        retry_backoff_ms: Some(5),
        extra_sync: "cursor = \"signed_up_at\"\ncursor_lookback = \"0s\"\nfull_diff_every = \"1h\"",
        ..StackOptions::default()
    })
    .await
}

/// One run of the sync: its exit status and report.
async fn run(stack: &Stack) -> (i32, Value) {
    let out = stack.run_once(&[]).await;
    assert!(
        out.status == 0 || out.status == 3,
        "exit {}: {}",
        out.status,
        out.stderr
    );
    (out.status, out.run().clone())
}

/// A contact's firstName in the simulated Loops, if it holds the contact.
async fn first_name(stack: &Stack, n: i64) -> Option<String> {
    stack
        .contacts()
        .await
        .get(&format!("user{n}@example.com"))
        .map(|c| c["firstName"].as_str().unwrap_or_default().to_owned())
}

/// The counts that say what a run found.
fn counts(run: &Value) -> [i64; 4] {
    ["added", "changed", "removed", "unchanged"].map(|k| run[k].as_i64().unwrap_or(-1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_diffs_recent_rows_and_a_full_diff_finds_the_rest() {
    let Some(stack) = stack().await else { return };
    // The first run: no watermark, a full diff.
    let (status, first) = run(&stack).await;
    assert_eq!(status, 0, "{first}");
    assert_eq!(first["diff"], "full", "{first}");
    assert_eq!(counts(&first), [10, 0, 0, 0]);
    // Nothing changed: the rows sent are read (none is noted yet), found unchanged and noted.
    let (_, noted) = run(&stack).await;
    assert_eq!(noted["diff"], "incremental", "{noted}");
    assert_eq!(counts(&noted), [0, 0, 0, 10], "{noted}");

    // 3 changes with its cursor, 11 is new (its cursor now); 4 changes without its cursor,
    // 5 leaves the model.
    stack
        .sql(
            "UPDATE users SET first_name = 'Three', signed_up_at = now() - interval '1 minute'
               WHERE id = 3;
             UPDATE users SET first_name = 'Four' WHERE id = 4;
             DELETE FROM users WHERE id = 5;
             INSERT INTO users VALUES (11, 'user11@example.com', 'Eleven', 'pro', 1, now(), true);",
        )
        .await;
    let plan = stack.output(&["plan", "--json"]).await;
    let plan: Value = serde_json::from_slice(&plan.stdout).expect("plan --json");
    let planned = &plan["data"][0];
    assert_eq!(planned["diff"], "incremental", "{plan}");
    assert!(planned["diff_since"].is_string(), "{plan}");
    let (status, second) = run(&stack).await;
    assert_eq!(status, 0, "{second}");
    assert_eq!(second["diff"], "incremental", "{second}");
    // Read: 3 and 11 only; the nine other rows noted unchanged (5 among them: no removal is
    // found) are counted as such.
    assert_eq!(counts(&second), [1, 1, 0, 9], "{second}");
    assert_eq!(first_name(&stack, 3).await.as_deref(), Some("Three"));
    assert_eq!(first_name(&stack, 11).await.as_deref(), Some("Eleven"));
    assert_eq!(first_name(&stack, 4).await.as_deref(), Some("First4"));
    assert!(
        first_name(&stack, 5).await.is_some(),
        "no removal found yet"
    );

    // 12 comes with 3's email. 3 is behind the window now, but Loops confirmed it since it was
    // last found unchanged: it is read, and both rows are invalid (neither overwrites the
    // other's contact), as a full diff finds them.
    stack
        .sql("INSERT INTO users VALUES (12, 'user3@example.com', 'Twelve', 'pro', 1, now(), true);")
        .await;
    let (status, duplicate) = run(&stack).await;
    assert_eq!(status, 3, "invalid records: {duplicate}");
    assert_eq!(duplicate["diff"], "incremental", "{duplicate}");
    assert_eq!(duplicate["invalid_rows"], 2, "{duplicate}");
    assert_eq!(first_name(&stack, 3).await.as_deref(), Some("Three"));
    stack.sql("DELETE FROM users WHERE id = 12;").await;

    // An hour later (by the state store's clock) the full diff is due: it finds 4 and 5.
    stack
        .sql("UPDATE loopsync.runs SET requested_at = requested_at - interval '61 minutes';")
        .await;
    let plan = stack.output(&["plan", "--json"]).await;
    let plan: Value = serde_json::from_slice(&plan.stdout).expect("plan --json");
    assert_eq!(plan["data"][0]["diff"], "full", "{plan}");
    assert_eq!(
        plan["data"][0]["why_full_diff"],
        "the last full diff is older than full_diff_every"
    );
    let (status, third) = run(&stack).await;
    assert_eq!(status, 0, "{third}");
    assert_eq!(third["diff"], "full", "{third}");
    assert_eq!(counts(&third), [0, 1, 1, 9], "{third}");
    assert_eq!(first_name(&stack, 4).await.as_deref(), Some("Four"));
    assert_eq!(first_name(&stack, 5).await, None, "removed");

    // A run that leaves dead letters: the next diff is full, whatever its age.
    stack
        .sql("UPDATE users SET first_name = 'Six', signed_up_at = now() WHERE id = 6;")
        .await;
    stack
        .sim_post(
            "faults",
            json!({"error_503": 1.0, "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;
    let (status, fourth) = run(&stack).await;
    assert_eq!(status, 3, "dead letters: {fourth}");
    assert_eq!(fourth["diff"], "incremental", "{fourth}");
    stack.sim_post("faults", json!({})).await;
    stack
        .sql("UPDATE users SET first_name = 'Seven' WHERE id = 7;")
        .await;
    let (status, fifth) = run(&stack).await;
    assert_eq!(status, 0, "{fifth}");
    assert_eq!(fifth["diff"], "full", "{fifth}");
    assert_eq!(first_name(&stack, 6).await.as_deref(), Some("Six"));
    assert_eq!(first_name(&stack, 7).await.as_deref(), Some("Seven"));
    // Settled again: the next run is incremental.
    let (_, sixth) = run(&stack).await;
    assert_eq!(sixth["diff"], "incremental", "{sixth}");
    assert_eq!(counts(&sixth), [0, 0, 0, 10], "{sixth}");
}
