//! Neighbours: a command started beside a long operation. The `loopsync` binary against
//! PostgreSQL.

use std::time::Duration;

use loopsync_testkit::{Stack, StackOptions, output_within};

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
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "three commands took {:?}",
        started.elapsed()
    );
    // And a run beside it completes: its writes do not queue behind anyone's DDL.
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id = 1")
        .await;
    let run = stack.run_once(&[]).await;
    assert_eq!(run.status, 0, "{}", run.stderr);
    reader.batch_execute("COMMIT").await.unwrap();
}
