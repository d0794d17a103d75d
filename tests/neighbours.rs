//! Neighbours: a command started beside a long operation. The `loopsync` binary against
//! PostgreSQL.

use std::time::Duration;

use loopsync_testkit::{Stack, StackOptions, output_within, until};

/// While a session reads `loopsync.state` — as a run's diff does for the whole extraction —
/// another command that connects answers within seconds: a connect that finds the state's
/// tables current runs no DDL and takes no lock. (Before, every connect ran `ALTER TABLE … ADD
/// COLUMN IF NOT EXISTS`, which queued behind the read, and the run's own writes then queued
/// behind it: the run and every later command waited forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_answer_beside_a_read_of_the_state() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 3,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    // The neighbour: a transaction that has read the state and stays open.
    let (reader, connection) =
        tokio_postgres::connect(&stack.warehouse.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM loopsync.state;")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    for command in [
        &["runs", "--json"][..],
        &["rejections", "--json"],
        &["plan", "--json"],
    ] {
        let out = output_within(
            &mut stack.command(command),
            Duration::from_secs(30),
            &format!("loopsync {} beside a read of the state", command[0]),
        )
        .await;
        assert!(
            out.status.success(),
            "{}: {}",
            command[0],
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The reader's transaction stays open until the end: a command that waited for it would
    // wait for ever, and fail its 30 s deadline above. The time is printed, not judged.
    eprintln!(
        "measured: three commands answered in {:.2} s beside a read of the state",
        started.elapsed().as_secs_f64()
    );
    // And a run beside it completes: its writes do not queue behind anyone's DDL.
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id = 1")
        .await;
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    reader.batch_execute("COMMIT").await.unwrap();
}

/// While `run --once` extracts a big model (its diff streams 300 000 rows), other commands
/// answer before it ends: `check`, `dlq list`, and a second `run` of the same sync, which says
/// that one is in progress (exit 1) once the first run's holder has shown a sign of life (a
/// heartbeat, within 5 s). Real processes against one PostgreSQL database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_answer_beside_a_run_extracting_a_big_model() {
    let Some(stack) = Stack::start(StackOptions {
        rows: 300_000,
        ..StackOptions::default()
    })
    .await
    else {
        return;
    };
    let mut first = stack
        .command(&["run", "--once", "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the first run");
    until(
        Duration::from_secs(60),
        "the first run extracts",
        || async {
            let status: Option<String> = stack
                .pg()
                .query_opt(
                    "SELECT status FROM loopsync.runs ORDER BY id DESC LIMIT 1",
                    &[],
                )
                .await
                .ok()
                .flatten()
                .map(|r| r.get(0));
            match status.as_deref() {
                Some("extracting") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let started = tokio::time::Instant::now();
    for command in [&["check"][..], &["dlq", "list", "--json"]] {
        let out = output_within(
            &mut stack.command(command),
            Duration::from_secs(30),
            &format!("loopsync {} beside a run extracting", command.join(" ")),
        )
        .await;
        assert!(
            out.status.success(),
            "{}: {}",
            command.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let second = output_within(
        &mut stack.command(&["run", "--once", "--json"]),
        Duration::from_secs(30),
        "a second run beside a run extracting",
    )
    .await;
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("in progress"), "{stderr}");
    let elapsed = started.elapsed();
    eprintln!(
        "measured: check, dlq list and a second run answered in {:.2} s beside a run extracting 300 000 rows",
        elapsed.as_secs_f64()
    );
    // They answered while the first run was still extracting: none waited for it to end.
    let status: Option<String> = stack
        .pg()
        .query_opt(
            "SELECT status FROM loopsync.runs ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .expect("read the runs")
        .map(|r| r.get(0));
    assert_eq!(
        status.as_deref(),
        Some("extracting"),
        "the commands answered only after the first run's extraction"
    );
    assert!(
        first.try_wait().expect("try_wait").is_none(),
        "the first run is still running"
    );
    let _ = first.kill().await;
}
