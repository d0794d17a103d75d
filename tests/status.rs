//! `loopsync status` against real processes: the binary, PostgreSQL and the Loops simulator.
//! After a degraded run (invalid rows), then a run with dead letters (Loops failing every
//! update) one of which is parked, the status says the last run, the next scheduled run, the
//! records pending, the dead letters and why the sync is degraded, as text and as JSON, read
//! from the state alone: without Loops' key.

use loopsync_testkit::{Stack, StackOptions};
use serde_json::{Value, json};

/// `loopsync status ARGS…` without Loops' key: its exit status and stdout.
async fn status(stack: &Stack, args: &[&str]) -> (i32, String) {
    let mut all = vec!["status"];
    all.extend_from_slice(args);
    let mut command = stack.command(&all);
    command.env_remove("LOOPS_API_KEY");
    let output = loopsync_testkit::output_within(
        &mut command,
        loopsync_testkit::COMMAND_DEADLINE,
        "loopsync status",
    )
    .await;
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

async fn status_json(stack: &Stack) -> Value {
    let (code, stdout) = status(stack, &["--json"]).await;
    assert_eq!(code, 0, "{stdout}");
    let doc: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["command"], "status", "{doc:#}");
    let data = loopsync_testkit::json_data(stdout.as_bytes()).unwrap();
    assert_eq!(data["syncs"].as_array().map(Vec::len), Some(1), "{data:#}");
    data["syncs"][0].clone()
}

/// (outcome, reason, records) of the status's `degraded.reasons`.
fn reasons(sync: &Value) -> Vec<(String, String, i64)> {
    sync["degraded"]["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap().to_owned(),
                r["records"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_the_last_run_the_pending_records_and_why_degraded() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 6,
        max_attempts: 1,
        extra_sync: "schedule = \"0 3 * * *\"",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    // Before any run: nothing yet, and the next fire of the schedule.
    let before = status_json(&stack).await;
    assert_eq!(before["last_run"], Value::Null, "{before:#}");
    assert_eq!(before["schedule"], "0 3 * * *");
    assert!(
        before["next_run_at"]
            .as_str()
            .is_some_and(|t| t.ends_with("T03:00:00.000Z")),
        "{before:#}"
    );

    // Run 1: two invalid rows, the rest confirmed: degraded.
    stack
        .sql(
            "UPDATE users SET email = NULL WHERE id = 2;
             UPDATE users SET email = 'not-an-email' WHERE id = 3;",
        )
        .await;
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 3, "{}", first.stderr);
    let s = status_json(&stack).await;
    assert_eq!(s["sync"], "users");
    assert_eq!(s["behavior"], "upsert");
    assert_eq!(s["last_run"]["id"], first.run()["id"]);
    assert_eq!(s["last_run"]["status"], "degraded");
    assert_eq!(s["last_run"]["confirmed"], 4);
    assert_eq!(
        s["pending"],
        json!({"records": 2, "retried": 2, "invalid": 2, "rejected": 0, "dead_lettered": 0,
               "in_flight": 0}),
        "{s:#}"
    );
    assert_eq!(s["dead_letters"], json!({"records": 0, "parked": 0}));
    assert_eq!(s["degraded"]["run_id"], first.run()["id"]);
    assert_eq!(
        reasons(&s),
        [
            ("invalid".into(), "malformed email (column email)".into(), 1),
            (
                "invalid".into(),
                "no email: the contact is identified by email".into(),
                1
            ),
        ],
        "{s:#}"
    );

    // Run 2: Loops fails every update: the two changed rows are dead-lettered; one is parked.
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id IN (4, 5);")
        .await;
    stack
        .sim_post(
            "faults",
            json!({"error_503": 1.0, "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;
    let second = stack.run_once(&[]).await;
    assert_eq!(second.status, 3, "{}", second.stderr);
    assert_eq!(second.run()["dead_lettered"], 2, "{}", second.stderr);
    let parked = stack.output(&["dlq", "park", "--key", "5"]).await;
    assert!(parked.status.success(), "{parked:?}");
    let s = status_json(&stack).await;
    assert_eq!(s["last_run"]["id"], second.run()["id"]);
    assert_eq!(
        s["pending"],
        json!({"records": 3, "retried": 3, "invalid": 2, "rejected": 0, "dead_lettered": 1,
               "in_flight": 0}),
        "the parked dead letter is not retried: {s:#}"
    );
    assert_eq!(s["dead_letters"], json!({"records": 2, "parked": 1}));
    let why = reasons(&s);
    assert_eq!(why[0].0, "dead_lettered", "{why:?}");
    assert!(
        why[0]
            .1
            .starts_with("gave up after 1 attempts: server error 503"),
        "Loops' answer, not its body: {why:?}"
    );
    assert_eq!((why[0].2, why.len()), (2, 3), "{why:?}");
    assert!(
        !serde_json::to_string(&s).unwrap().contains("@example.com"),
        "no email in the status: {s:#}"
    );

    // The text says the same.
    let (code, text) = status(&stack, &[]).await;
    assert_eq!(code, 0, "{text}");
    for part in [
        "sync users (upsert) · schedule 0 3 * * * · next run ",
        &format!("last run {}: degraded", second.run()["id"]),
        "pending: 3 records · to retry 3 (invalid 2 · rejected 0 · dead-lettered 1) · in flight 0",
        "dead letters: 2 · parked 1",
        "2 dead-lettered: gave up after 1 attempts: server error 503",
        "1 invalid: malformed email (column email)",
        "(loopsync rejections --sync users lists the records)",
    ] {
        assert!(text.contains(part), "{part:?} in:\n{text}");
    }
    // An unknown sync is a usage error.
    let (code, _) = {
        let mut command = stack.command(&["status", "--sync", "nobody"]);
        command.env_remove("LOOPS_API_KEY");
        let output = loopsync_testkit::output_within(
            &mut command,
            loopsync_testkit::COMMAND_DEADLINE,
            "loopsync status --sync nobody",
        )
        .await;
        (output.status.code().unwrap_or(-1), ())
    };
    assert_eq!(code, 2);
}

/// The status page answers while a run is in progress (Loops answering slowly): the run is
/// shown sending, its records in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_answers_while_a_run_is_in_progress() {
    use tokio::io::AsyncBufReadExt;
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        // Every second: a run is always in progress or about to be.
        extra_sync: "schedule = \"* * * * * *\"",
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    stack.sim_post("faults", json!({"latency_ms": 3_000})).await;
    let mut child = stack
        .command(&["run", "--http-addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start loopsync run");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let base = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("status page at ") {
                return url.trim_end_matches('/').to_owned();
            }
        }
        panic!("loopsync run ended without saying where the status page is")
    })
    .await
    .expect("the status page's address within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = loopsync_testkit::http_client();
    loopsync_testkit::until(
        std::time::Duration::from_secs(60),
        "the page shows a run sending, its records in flight",
        || {
            let (client, url) = (client.clone(), format!("{base}/"));
            async move {
                let page = client
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .text()
                    .await
                    .map_err(|e| e.to_string())?;
                let in_flight = page
                    .split("in flight ")
                    .nth(1)
                    .and_then(|rest| rest.split('<').next())
                    .and_then(|n| n.trim().parse::<i64>().ok())
                    .unwrap_or(0);
                if page.contains("st-sending\">sending") && in_flight > 0 {
                    Ok(())
                } else {
                    Err(format!("in flight {in_flight}"))
                }
            }
        },
    )
    .await;
    let _ = child.kill().await;
}
