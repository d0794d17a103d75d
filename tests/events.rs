//! Event syncs (`behavior = "append"`, PRODUCT.md "Event syncs"), end to end: each row of an
//! event model is one `events/send`, sent once for the life of the sync — through reruns, new
//! and changed rows, a killed loader, 5xx answers after the effect, a reset state and a cursor
//! that reads only recent rows. What Loops received is read from the simulator's `/_sim/events`,
//! by the idempotency key each event id derives.

use std::collections::{BTreeMap, BTreeSet};

use loopsync_core::keys::event_key;
use loopsync_testkit::{Backend, Stack, StackOptions, minutes_ago};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const SYNC: &str = "events";

fn options(users: usize, events: usize) -> StackOptions {
    StackOptions {
        rows: users,
        events: Some(events),
        requests_per_second: 100,
        sim_rate_limit: 100,
        ..StackOptions::default()
    }
}

/// The events Loops accepted, counted by idempotency key.
async fn sent(stack: &Stack) -> BTreeMap<String, usize> {
    let mut by_key = BTreeMap::new();
    for event in stack.sim.events().await {
        let key = event["idempotencyKey"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *by_key.entry(key).or_insert(0) += 1;
    }
    by_key
}

/// The keys of event ids `ids`.
fn keys(ids: impl IntoIterator<Item = i64>) -> BTreeSet<String> {
    ids.into_iter()
        .map(|id| event_key(SYNC, &id.to_string()))
        .collect()
}

/// Every event Loops accepted is one of `ids`, and each of `ids` exactly once.
async fn assert_each_once(stack: &Stack, ids: impl IntoIterator<Item = i64>) {
    let sent = sent(stack).await;
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events sent twice: {twice:?}");
    let sent: BTreeSet<String> = sent.into_keys().collect();
    assert_eq!(sent, keys(ids), "the events Loops holds");
}

async fn run(stack: &Stack) -> (i32, Value, loopsync_testkit::Seen) {
    let (out, seen) = stack.run_seen(&["--sync", SYNC]).await;
    assert!(
        out.status == 0 || out.status == 3,
        "exit {}: {}",
        out.status,
        out.stderr
    );
    (out.status, out.run().clone(), seen)
}

/// Rows of the model the run read: every row it decided.
fn rows_read(run: &Value) -> i64 {
    ["added", "changed", "unchanged", "invalid_rows", "ignored"]
        .iter()
        .map(|k| run[k].as_i64().unwrap_or(0))
        .sum()
}

async fn first_run_then_new_rows_only(nats: bool) {
    let Some(stack) = Stack::start(StackOptions {
        nats,
        ..options(5, 12)
    })
    .await
    else {
        return;
    };
    let (status, first, seen) = run(&stack).await;
    assert_eq!(status, 0, "{first}");
    assert_eq!(first["confirmed"], 12, "{first}");
    assert_eq!(seen.to("POST /v1/events/send"), 12, "{seen:?}");
    assert_eq!(
        seen.to("PUT /v1/contacts/update"),
        0,
        "an event carries its contact: {seen:?}"
    );
    assert_each_once(&stack, 1..=12).await;
    // The event as Loops got it: the name from its column, typed properties, the contact.
    let events = stack.sim.events().await;
    let third = events
        .iter()
        .find(|e| e["idempotencyKey"] == event_key(SYNC, "3"))
        .expect("event 3");
    assert_eq!(third["eventName"], "invoicePaid");
    assert_eq!(third["email"], "user4@example.com");
    assert_eq!(
        third["eventProperties"],
        json!({"plan": "free", "amount": 4.5})
    );
    assert_eq!(stack.workflows("event_received").await, 12);
    assert_eq!(
        stack.contacts().await.len(),
        5,
        "a contact per email, created by its first event"
    );

    let (status, rerun, seen) = run(&stack).await;
    assert_eq!(status, 0);
    assert_eq!((rerun["unchanged"].as_i64(), seen.writes()), (Some(12), 0));

    // New rows, an old row changed, rows that cannot be events.
    stack
        .sql(
            "INSERT INTO user_events VALUES
               (13, 'user1@example.com', 'trialStarted', 'pro', 9, now()),
               (14, 'user2@example.com', 'invoicePaid', 'team', 10.25, now()),
               (15, NULL, 'invoicePaid', 'team', 1, now()),
               (16, 'user3@example.com', '', 'team', 1, now()),
               (17, 'user3@example.com', 'paid', 'team', 'NaN', now());
             UPDATE user_events SET plan = 'enterprise', amount = 99 WHERE event_id = 2;",
        )
        .await;
    // The plan says what the run will do: the changed row is ignored, two events to send.
    let plan = stack.output(&["plan", "--sync", SYNC, "--json"]).await;
    let plan: Value = loopsync_testkit::json_data(&plan.stdout).expect("plan JSON");
    let records = plan[0]["records"].as_array().unwrap();
    let ignored: Vec<_> = records
        .iter()
        .filter(|r| r["change"] == "ignored")
        .collect();
    assert_eq!(ignored.len(), 1, "{records:?}");
    assert_eq!(ignored[0]["key"], "2");
    assert_eq!(ignored[0]["reason"], "ignored: already sent");
    assert_eq!(plan[0]["requests"], 2, "{plan}");
    let (status, next, seen) = run(&stack).await;
    assert_eq!(status, 3, "invalid rows make the run degraded: {next}");
    assert_eq!(seen.to("POST /v1/events/send"), 2, "{seen:?}");
    assert_eq!(seen.writes(), 2, "{seen:?}");
    assert_eq!(next["ignored"], 1, "{next}");
    assert_eq!(next["added"], 2, "{next}");
    assert_eq!(next["invalid"], 3, "{next}");
    assert_each_once(&stack, 1..=14).await;
    let rejections = stack
        .output(&["rejections", "--sync", SYNC, "--json"])
        .await;
    let rejections: Value =
        loopsync_testkit::json_data(&rejections.stdout).expect("rejections JSON");
    let reasons: BTreeMap<String, String> = rejections
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(reasons["15"].contains("no email"), "{reasons:?}");
    assert!(reasons["16"].contains("no event name"), "{reasons:?}");
    assert!(reasons["17"].contains("amount"), "{reasons:?}");

    // Reported once: the next run finds the changed row unchanged, and sends nothing.
    let (_, last, seen) = run(&stack).await;
    assert_eq!(
        (last["ignored"].as_i64(), seen.writes()),
        (Some(0), 0),
        "{last}"
    );
    assert_each_once(&stack, 1..=14).await;
}

/// A first run sends every event once; a rerun sends nothing; the next run sends only new rows;
/// a row changed after its event was sent is `ignored`, not sent again; rows without an
/// identity, an event name or a valid property are invalid, with their reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_once_in_process() {
    first_run_then_new_rows_only(false).await;
}

/// The same over NATS JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_once_over_nats() {
    first_run_then_new_rows_only(true).await;
}

/// 5xx answers (some after the event was taken) and dropped connections: retries reuse the key,
/// Loops answers 409, and every event is in Loops exactly once. A reset state re-sends every
/// event with the same keys: Loops takes none of them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_after_the_effect_never_fire_twice() {
    faults_after_the_effect(false).await;
}

/// The same over NATS JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_after_the_effect_never_fire_twice_over_nats() {
    faults_after_the_effect(true).await;
}

async fn faults_after_the_effect(nats: bool) {
    let Some(stack) = Stack::start(StackOptions {
        nats,
        ..options(6, 40)
    })
    .await
    else {
        return;
    };
    stack
        .sim_post(
            "faults",
            json!({"error_502": 0.25, "drop_connection": 0.1, "after_effect": 0.7, "seed": 11}),
        )
        .await;
    let (status, first, seen) = run(&stack).await;
    assert_eq!(status, 0, "{first}");
    assert_eq!(first["confirmed"], 40);
    assert!(seen.to("POST /v1/events/send") > 40, "{seen:?}");
    assert!(
        seen.answered("POST /v1/events/send", 409) > 0,
        "a retry met its own key: {seen:?}"
    );
    assert_each_once(&stack, 1..=40).await;
    stack.sim_post("faults", json!({})).await;

    let reset = stack.output(&["reset", "--sync", SYNC, "--yes"]).await;
    assert!(reset.status.success(), "{reset:?}");
    let (status, again, seen) = run(&stack).await;
    assert_eq!(status, 0, "{again}");
    assert_eq!(
        seen.answered("POST /v1/events/send", 409),
        40,
        "the same keys: {seen:?}"
    );
    assert_each_once(&stack, 1..=40).await;
    assert_eq!(stack.workflows("event_received").await, 40);
}

/// A loader SIGKILLed mid-run (over NATS, its messages redelivered to another loader): every
/// event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_loader_never_fires_an_event_twice() {
    let Some(stack) = Stack::start(StackOptions {
        nats: true,
        sim_rate_limit: 40,
        requests_per_second: 40,
        ack_wait_seconds: 2.0,
        ..options(10, 80)
    })
    .await
    else {
        return;
    };
    let (_, at_kill) = stack
        .run_killing_the_loader("POST /v1/events/send", 15)
        .await;
    assert!(at_kill < 80, "the run was already over: {at_kill}");
    assert_each_once(&stack, 1..=80).await;
    assert_eq!(stack.workflows("event_received").await, 80);
}

async fn cursor_reads_recent_rows(backend: Backend, nats: bool) {
    let Some(stack) = Stack::start(
        StackOptions {
            nats,
            events_sync: "cursor = \"occurred_at\"\ncursor_lookback = \"1h\"",
            ..options(5, 600)
        }
        .on(backend),
    )
    .await
    else {
        return;
    };
    // Start from now: every current row counts as sent.
    let adopt = stack.output(&["adopt", "--sync", SYNC]).await;
    assert!(adopt.status.success(), "{adopt:?}");
    let ago = |minutes| minutes_ago(backend, minutes);
    let now = ago(0);
    stack
        .sql(&format!(
            "INSERT INTO user_events VALUES
               (1001, 'user1@example.com', 'trialStarted', 'pro', 1, {now}),
               (1002, 'user2@example.com', 'trialStarted', 'pro', 2, {now}),
               (1003, 'user3@example.com', 'invoicePaid', 'pro', 3, {late}),
               (1004, 'user4@example.com', 'invoicePaid', 'pro', 4, {too_late}),
               (1005, 'user5@example.com', 'invoicePaid', 'pro', 5, {future});",
            late = ago(40),
            too_late = ago(300),
            future = match backend {
                Backend::Postgres => "timestamptz '2099-01-01 00:00:00+00'",
                Backend::Sqlite => "'2099-01-01T00:00:00Z'",
                Backend::MySql | Backend::DuckDb => "'2099-01-01 00:00:00'",
            },
        ))
        .await;
    // The model now reads a view in which row 1004 (five hours late: outside the window) fails
    // the query where the database computes it: a run that read it, even to drop it itself,
    // would fail. So "reads only recent rows" is the database's word, not the run's report.
    poison_row(&stack, backend, 1004).await;
    let (status, run1, seen) = run(&stack).await;
    assert_eq!(status, 0, "{run1}");
    // About the last hour of rows (a minute apart) and the new ones: not the 600.
    let read = rows_read(&run1);
    assert!((60..=70).contains(&read), "rows read: {read}, {run1}");
    assert_eq!(run1["added"], 4, "{run1}");
    assert_eq!(seen.to("POST /v1/events/send"), 4, "{seen:?}");
    // 1003 arrived 40 minutes late, inside the lookback: sent. 1004, five hours late: not read.
    // 1005 is dated 2099: sent, and the watermark stops at now, not in 2099.
    let sent = sent(&stack).await;
    for (id, expected) in [
        (1001, 1),
        (1002, 1),
        (1003, 1),
        (1004, 0),
        (1005, 1),
        (1, 0),
    ] {
        assert_eq!(
            sent.get(&event_key(SYNC, &id.to_string()))
                .copied()
                .unwrap_or(0),
            expected,
            "event {id}"
        );
    }
    // The plan reads what the next run would: the hour before this run's newest row.
    let plan = stack.output(&["plan", "--sync", SYNC, "--json"]).await;
    let plan: Value = loopsync_testkit::json_data(&plan.stdout).expect("plan JSON");
    let counts = &plan[0]["counts"];
    assert!((60..=70).contains(&rows_read(counts)), "{plan}");
    assert_eq!(plan[0]["requests"], 0);

    let (_, run2, seen) = run(&stack).await;
    assert_eq!(seen.writes(), 0, "{run2}");
    assert!(rows_read(&run2) <= 70, "{run2}");
    let now = ago(0);
    stack
        .sql(&format!(
            "INSERT INTO user_events VALUES (1006, 'user1@example.com', 'paid', 'pro', 6, {now});"
        ))
        .await;
    let (_, run3, seen) = run(&stack).await;
    assert_eq!(seen.to("POST /v1/events/send"), 1, "{run3}");
    assert_each_once(&stack, [1001, 1002, 1003, 1005, 1006]).await;

    // The model holds every row: the runs above read only the recent ones.
    assert_eq!(stack.count("SELECT count(*) FROM user_events").await, 606);
}

/// Points the events sync's model at a view of `user_events` whose row `id` fails the query
/// wherever the database computes it (each backend's own way to fail on a value: a malformed
/// JSON, a scalar subquery of two rows, `error()`).
async fn poison_row(stack: &Stack, backend: Backend, id: i64) {
    let fails = match backend {
        Backend::Postgres => "length((email || ' not json')::json::text)::bigint".to_owned(),
        Backend::Sqlite => "json(email || ' not json')".to_owned(),
        Backend::MySql => "(SELECT 1 UNION ALL SELECT 2)".to_owned(),
        Backend::DuckDb => "CAST(error('row read') AS BIGINT)".to_owned(),
    };
    stack
        .sql(&format!(
            "CREATE VIEW user_events_checked AS
               SELECT event_id, email, event_name, plan,
                      CASE WHEN event_id = {id} THEN {fails} ELSE amount END AS amount,
                      occurred_at
                 FROM user_events;"
        ))
        .await;
    let text = std::fs::read_to_string(&stack.config).expect("read the config");
    let from = "occurred_at from user_events\"";
    assert!(
        text.contains(from),
        "the events model is not in the config:\n{text}"
    );
    std::fs::write(
        &stack.config,
        text.replace(from, "occurred_at from user_events_checked\""),
    )
    .expect("write the config");
}

/// With a cursor, a run reads only the rows at or after the last finished run's highest cursor
/// value minus the lookback: about an hour of rows, not the table. A row that arrives late
/// inside the lookback is still sent, once; `adopt` starts the sync from now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_reads_only_recent_rows() {
    cursor_reads_recent_rows(Backend::Postgres, false).await;
}

/// The same over NATS JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_reads_only_recent_rows_over_nats() {
    cursor_reads_recent_rows(Backend::Postgres, true).await;
}

/// The same on SQLite (dates as text, compared by `julianday`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_reads_only_recent_rows_on_sqlite() {
    cursor_reads_recent_rows(Backend::Sqlite, false).await;
}

/// The same on MySQL, a source only read (its `datetime` cursor staged in the SQLite state
/// store, where the diff keeps the window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_reads_only_recent_rows_on_mysql() {
    cursor_reads_recent_rows(Backend::MySql, false).await;
}

/// The same on DuckDB (feature `duckdb`; without it the test notes its skip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_reads_only_recent_rows_on_duckdb() {
    cursor_reads_recent_rows(Backend::DuckDb, false).await;
}

/// Tuples PostgreSQL has read from `user_events` (sequential and by index), by its statistics.
async fn tuples_read(stack: &Stack) -> i64 {
    stack
        .count(
            "SELECT (seq_tup_read + COALESCE(idx_tup_fetch, 0))::bigint
               FROM pg_stat_user_tables WHERE relname = 'user_events'",
        )
        .await
}

/// [`tuples_read`] once it is beyond `more_than` and settled: PostgreSQL's statistics arrive
/// shortly after the reading session ends (within 15 s, or the test fails).
async fn tuples_read_beyond(stack: &Stack, more_than: i64) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let n = tuples_read(stack).await;
        if n > more_than {
            // A session's last counts can follow its first by up to a second.
            tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            return tuples_read(stack).await;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "PostgreSQL's statistics say {n} tuples of user_events read, not yet more than {more_than}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The read cost by PostgreSQL's own statistics: of a 20 000-row event table, a run with a cursor
/// reads the hour of lookback and the new rows (through the index on `occurred_at`), not the
/// table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_reads_few_rows_of_a_large_table() {
    let Some(stack) = Stack::start(StackOptions {
        events_sync: "cursor = \"occurred_at\"\ncursor_lookback = \"1h\"",
        ..options(20, 20_000)
    })
    .await
    else {
        return;
    };
    stack.sql("ANALYZE user_events;").await;
    let adopt = stack.output(&["adopt", "--sync", SYNC]).await;
    assert!(adopt.status.success(), "{adopt:?}");
    stack
        .sql(
            "INSERT INTO user_events SELECT g, 'user1@example.com', 'paid', 'pro', g, now()
               FROM generate_series(20001, 20005) AS g;",
        )
        .await;
    // The statistics of the adoption's full read are in before the run starts.
    let before = tuples_read_beyond(&stack, 19_999).await;
    let (status, report, seen) = run(&stack).await;
    assert_eq!(status, 0, "{report}");
    assert_eq!(seen.to("POST /v1/events/send"), 5, "{seen:?}");
    let read = tuples_read_beyond(&stack, before).await - before;
    eprintln!("the run read {read} of 20 005 rows of user_events (PostgreSQL's statistics)");
    assert!(read < 1_000, "the run read {read} tuples of user_events");
}

/// A seeded random history of an event table — rows inserted (some late), changed, deleted,
/// runs with faults — checked after every run: every event id that a run could see (in the
/// table, inside the cursor's window) is in Loops exactly once, and nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_histories_send_each_event_once() {
    let seed: u64 = std::env::var("LOOPSYNC_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("seed {seed} (LOOPSYNC_TEST_SEED={seed} repeats this history)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let Some(stack) = Stack::start(StackOptions {
        events_sync: "cursor = \"occurred_at\"\ncursor_lookback = \"2h\"",
        ..options(4, 20)
    })
    .await
    else {
        return;
    };
    // Every event id ever seen by a run: those must be in Loops, once.
    let mut expected: BTreeSet<i64> = BTreeSet::new();
    // Rows written with a time behind the window (after the first run): no run reads them.
    let mut too_late: BTreeSet<i64> = BTreeSet::new();
    let mut next_id = 21;
    for step in 0..10 {
        let mut sql = String::new();
        for _ in 0..rng.random_range(0..6) {
            // Most rows are new; some are late inside the lookback, some far behind it.
            let minutes = match rng.random_range(0..10) {
                0..=2 => rng.random_range(1..100),
                3 if step > 0 => {
                    too_late.insert(next_id);
                    300
                }
                _ => 0,
            };
            sql.push_str(&format!(
                "INSERT INTO user_events VALUES ({next_id}, 'user{}@example.com', 'ev{}', 'pro', {}, now() - interval '{minutes} minutes');",
                1 + next_id % 4,
                next_id % 3,
                next_id,
            ));
            next_id += 1;
        }
        if rng.random_bool(0.5) {
            sql.push_str(&format!(
                "UPDATE user_events SET amount = amount + 1 WHERE event_id = {};",
                rng.random_range(1..next_id)
            ));
        }
        if rng.random_bool(0.3) {
            sql.push_str(&format!(
                "DELETE FROM user_events WHERE event_id = {};",
                rng.random_range(1..next_id)
            ));
        }
        if !sql.is_empty() {
            stack.sql(&sql).await;
        }
        // A reset state: the next run reads every row and sends again, with the same keys
        // (Loops takes none twice), also the rows that were behind the window.
        if step > 1 && rng.random_bool(0.15) {
            let reset = stack.output(&["reset", "--sync", SYNC, "--yes"]).await;
            assert!(reset.status.success(), "{reset:?}");
            too_late.clear();
        }
        let faults = rng.random_bool(0.4);
        if faults {
            stack
                .sim_post(
                    "faults",
                    json!({"error_503": 0.2, "after_effect": 0.6, "seed": rng.random::<u32>()}),
                )
                .await;
        }
        // What this run can see: the rows in the table, but those behind the window.
        let present: Vec<i64> = present_ids(&stack)
            .await
            .into_iter()
            .filter(|id| !too_late.contains(id))
            .collect();
        let (status, report, _) = run(&stack).await;
        assert_eq!(status, 0, "step {step}, seed {seed}: {report}");
        if faults {
            stack.sim_post("faults", json!({})).await;
        }
        expected.extend(present);
        assert_each_once(&stack, expected.iter().copied()).await;
    }
}

async fn present_ids(stack: &Stack) -> Vec<i64> {
    stack
        .pg()
        .query("SELECT event_id FROM user_events", &[])
        .await
        .expect("event ids")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Dead-lettered events (Loops failing for longer than the retries) with a cursor: the run that
/// dead-lettered them does not move the watermark, so the next run reads them again — however
/// far behind the lookback they are by then — and sends each once. `dlq list` shows them
/// meanwhile, and `dlq replay` sends them by key, wherever their cursor is, without moving the
/// watermark past those it did not replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_lookback_loses_no_event() {
    for replay in [false, true] {
        let Some(stack) = Stack::start(StackOptions {
            max_attempts: 2,
            events_sync: "cursor = \"occurred_at\"\ncursor_lookback = \"1h\"",
            ..options(3, 6)
        })
        .await
        else {
            return;
        };
        // Six hours ago, a first run confirmed six events and set the watermark.
        stack
            .sql("UPDATE user_events SET occurred_at = occurred_at - interval '6 hours';")
            .await;
        let (status, first, _) = run(&stack).await;
        assert_eq!(status, 0, "{first}");
        // Six more, and Loops fails every one of them.
        stack
            .sql(
                "INSERT INTO user_events SELECT event_id + 6, email, event_name, plan, amount,
                                                now() - interval '359 minutes'
                   FROM user_events;",
            )
            .await;
        stack
            .sim_post(
                "faults",
                json!({"error_503": 1.0, "endpoints": ["POST /v1/events/send"]}),
            )
            .await;
        let (status, failed, _) = run(&stack).await;
        assert_eq!(status, 3, "{failed}");
        assert_eq!(failed["dead_lettered"], 6, "{failed}");
        // Two hours on, Loops still fails: the new event too, and the six again.
        stack
            .sql(
                "INSERT INTO user_events VALUES
                   (13, 'user1@example.com', 'trialStarted', 'pro', 1, now() - interval '4 hours');",
            )
            .await;
        let (status, still, _) = run(&stack).await;
        assert_eq!(status, 3, "{still}");
        assert_eq!(still["dead_lettered"], 7, "{still}");
        let list = stack
            .output(&["dlq", "list", "--sync", SYNC, "--json"])
            .await;
        let list: Value = loopsync_testkit::json_data(&list.stdout).expect("dlq list JSON");
        assert_eq!(list.as_array().map(Vec::len), Some(7), "{list}");
        // Loops is back; two more hours on, another event.
        stack.sim_post("faults", json!({})).await;
        stack
            .sql(
                "INSERT INTO user_events VALUES
                   (14, 'user2@example.com', 'trialStarted', 'pro', 1, now() - interval '2 hours');",
            )
            .await;
        if replay {
            // One of them, the newest: the others stay behind the watermark, for the next run.
            let replayed = stack
                .output(&["dlq", "replay", "--sync", SYNC, "--key", "13", "--json"])
                .await;
            assert_eq!(
                replayed.status.code(),
                Some(0),
                "{}",
                String::from_utf8_lossy(&replayed.stderr)
            );
            assert_each_once(&stack, (1..=6).chain([13])).await;
        }
        let (status, next, _) = run(&stack).await;
        assert_eq!(status, 0, "{next}");
        assert_each_once(&stack, 1..=14).await;
        let (_, after, seen) = run(&stack).await;
        assert_eq!(seen.writes(), 0, "{after}");
        assert_eq!(rows_read(&after), 1, "the watermark moved on: {after}");
    }
}
