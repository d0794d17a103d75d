//! Personal data kept out of the logs: a sync over NATS against PostgreSQL, logged at `trace`,
//! with invalid and dead-lettered records, writes no email, userId or property value of the
//! model on stderr or stdout; with `LOOPSYNC_LOG_PERSONAL_DATA=1` the drivers' lines come
//! through, emails among them (which shows that the test can see them). The `loopsync` binary,
//! PostgreSQL, NATS and the simulator, all real processes on loopback.

use loopsync_testkit::{Stack, StackOptions};
use serde_json::json;

/// Runs `loopsync run --once` at `trace`, with the personal-data switch or without; exit
/// status and everything it wrote.
async fn run_at_trace(stack: &Stack, personal_data: bool) -> (Option<i32>, String) {
    let mut command = stack.command(&["run", "--once"]);
    command.env("LOOPSYNC_LOG", "trace");
    if personal_data {
        command.env("LOOPSYNC_LOG_PERSONAL_DATA", "1");
    } else {
        command.env_remove("LOOPSYNC_LOG_PERSONAL_DATA");
    }
    let out = loopsync_testkit::output_within(
        &mut command,
        loopsync_testkit::COMMAND_DEADLINE,
        "loopsync run --once at trace",
    )
    .await;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_carry_no_personal_data_unless_asked() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 12,
        nats: true,
        identify_by: "userId",
        max_attempts: 2,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    // Values found nowhere else: user ids, emails, names and plans of hex digits.
    stack
        .sql(
            "ALTER TABLE users ALTER COLUMN id TYPE text USING 'u' || md5('id' || id);
             UPDATE users SET email = 'p' || md5('email' || id) || '@example.com',
                              first_name = 'n' || md5('name' || id),
                              plan = 'k' || md5('plan' || id);
             -- Invalid: an email Loops would refuse, a name too long.
             UPDATE users SET email = 'bad' || md5('bad')
              WHERE id = (SELECT min(id) FROM users);
             UPDATE users SET first_name = repeat(md5('long'), 20)
              WHERE id = (SELECT max(id) FROM users);",
        )
        .await;
    let values: Vec<String> = stack
        .pg()
        .query(
            "SELECT unnest(ARRAY[id, email, first_name, plan]) FROM users",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    assert_eq!(values.len(), 48);
    // Most writes fail, and are tried twice at most: some records are dead-lettered.
    stack
        .sim_post(
            "faults",
            json!({"error_503": 0.7, "seed": 7, "endpoints": ["PUT /v1/contacts/update"]}),
        )
        .await;

    let (status, text) = run_at_trace(&stack, false).await;
    assert_eq!(status, Some(3), "degraded: {text}");
    assert!(text.contains("TRACE") || text.contains("DEBUG"), "{text}");
    for value in &values {
        // A value is also looked for in part: a line may cut it or quote its start.
        let part = &value[..value.len().min(20)];
        assert!(!text.contains(part), "{value} in the output:\n{text}");
    }
    let invalid = stack
        .count("SELECT count(*) FROM loopsync.records WHERE outcome = 'invalid'")
        .await;
    let dead = stack
        .count("SELECT count(*) FROM loopsync.records WHERE outcome = 'dead_lettered'")
        .await;
    assert_eq!(invalid, 2);
    assert!(dead > 0, "some records dead-lettered");

    // With the switch, the drivers say what they carry: the state's writes bind emails.
    stack.sim_post("faults", json!({})).await;
    let (status, text) = run_at_trace(&stack, true).await;
    assert_eq!(status, Some(3), "the invalid records stay: {text}");
    assert!(
        values
            .iter()
            .any(|v| v.ends_with("@example.com") && text.contains(v.as_str())),
        "no email of the model in the output with LOOPSYNC_LOG_PERSONAL_DATA=1:\n{text}"
    );
}
