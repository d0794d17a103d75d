//! The run report counts what Loops saw, and its rows add up to the model: the `loopsync`
//! binary against PostgreSQL, the simulator and (where said) NATS, all real processes.
//!
//! After each run, the report's requests (in total, by kind, the 429s) are compared with what
//! the simulator's `/_sim/stats` counted during that run (the difference of its stats before and
//! after), with faults, dropped connections and a team limit below the configured pace.

use std::collections::BTreeMap;

use loopsync_testkit::{RunOutput, Seen, Stack, StackOptions};
use serde_json::{Value, json};

/// Requests by the report's kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Kinds {
    total: i64,
    writes: i64,
    events: i64,
    deletes: i64,
    preflight: i64,
    rate_limited: i64,
}

/// The endpoints of each kind, as `/_sim/stats` names them.
const KINDS: [(&str, &[&str]); 4] = [
    ("writes", &["PUT /v1/contacts/update"]),
    ("events", &["POST /v1/events/send"]),
    ("deletes", &["POST /v1/contacts/delete"]),
    (
        "preflight",
        &[
            "GET /v1/api-key",
            "GET /v1/contacts/properties",
            "POST /v1/contacts/properties",
            "GET /v1/lists",
        ],
    ),
];

/// What the simulator counted during a run, by the report's kinds.
fn kinds(seen: &Seen) -> Kinds {
    let by_kind: BTreeMap<&str, i64> = KINDS
        .iter()
        .map(|(kind, endpoints)| {
            let n: u64 = endpoints.iter().map(|e| seen.to(e)).sum();
            (*kind, n as i64)
        })
        .collect();
    let kinds = Kinds {
        total: seen.total as i64,
        writes: by_kind["writes"],
        events: by_kind["events"],
        deletes: by_kind["deletes"],
        preflight: by_kind["preflight"],
        rate_limited: seen.rate_limited as i64,
    };
    assert_eq!(
        kinds.total,
        kinds.writes + kinds.events + kinds.deletes + kinds.preflight,
        "every endpoint reached has a kind: {seen:?}"
    );
    kinds
}

/// The report's requests, as [`Kinds`].
fn reported(run: &Value) -> Kinds {
    let kind = |k: &str| run["requests_by_kind"][k].as_i64().unwrap();
    Kinds {
        total: run["requests"].as_i64().unwrap(),
        writes: kind("writes"),
        events: kind("events"),
        deletes: kind("deletes"),
        preflight: kind("preflight"),
        rate_limited: run["rate_limited"].as_i64().unwrap(),
    }
}

/// Runs once and checks that the report's requests are what the simulator saw meanwhile.
async fn run_and_compare(stack: &Stack, label: &str) -> (RunOutput, Kinds) {
    let (output, seen) = stack.run_seen(&[]).await;
    let run = output.run().clone();
    let kinds = kinds(&seen);
    assert_eq!(
        reported(&run),
        kinds,
        "{label}: the report ({run}) against the simulator ({seen:?})"
    );
    assert_rows_and_records_add_up(&run, None);
    (output, kinds)
}

/// `added + changed + unchanged + invalid_rows` is the model's rows (when given);
/// `confirmed + skipped + invalid + rejected + dead_lettered` the run's records.
fn assert_rows_and_records_add_up(run: &Value, model_rows: Option<i64>) {
    let n = |k: &str| run[k].as_i64().unwrap_or_else(|| panic!("{k} in {run}"));
    if let Some(rows) = model_rows {
        assert_eq!(
            n("added") + n("changed") + n("unchanged") + n("invalid_rows"),
            rows,
            "rows: {run}"
        );
    }
    assert_eq!(
        n("confirmed") + n("skipped") + n("invalid") + n("rejected") + n("dead_lettered"),
        n("records"),
        "records: {run}"
    );
    let kinds = &run["requests_by_kind"];
    let sum: i64 = ["writes", "events", "deletes", "preflight"]
        .iter()
        .map(|k| kinds[*k].as_i64().unwrap())
        .sum();
    assert_eq!(sum, n("requests"), "requests by kind: {run}");
}

/// (a) A first run, a run with 503s and dropped connections, a run with nothing to do: each
/// report's requests, by kind, are what Loops saw — the preflight (team, properties) included,
/// every retry included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_what_loops_saw_despite_faults() {
    let options = StackOptions {
        rows: 30,
        behavior: "mirror",
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let (first, seen) = run_and_compare(&stack, "first run").await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(
        (seen.writes, seen.preflight),
        (30, 6),
        "one write per row; the API key's team, the property and mailing lists and three property creations"
    );

    stack
        .sql(
            "UPDATE users SET plan = 'gold' WHERE id <= 12;
             DELETE FROM users WHERE id IN (29, 30);",
        )
        .await;
    stack
        .sim_post(
            "faults",
            json!({"error_503": 0.3, "drop_connection": 0.1, "seed": 1}),
        )
        .await;
    let (faulty, seen) = run_and_compare(&stack, "run with faults").await;
    assert_eq!(faulty.status, 0, "{}", faulty.stderr);
    let run = faulty.run();
    assert_eq!(
        (run["changed"].as_i64(), run["removed"].as_i64()),
        (Some(12), Some(2))
    );
    assert_eq!(run["confirmed"], 14, "{run}");
    assert!(
        seen.writes > 12 && seen.deletes >= 2,
        "the faults cost retries: {seen:?}"
    );
    let retries = run["retries"].as_i64().unwrap();
    assert_eq!(
        retries,
        seen.total - 14 - 3,
        "every request but one per record, the team, the property list and the mailing lists \
         is a retry: {run}"
    );
    // A failed attempt's requests are kept per attempt, with the error.
    let attempts = stack
        .count("SELECT count(*) FROM loopsync.attempts WHERE reason IS NOT NULL")
        .await;
    assert!(attempts > 0);

    stack.sim_post("faults", json!({})).await;
    let (quiet, seen) = run_and_compare(&stack, "run with nothing to do").await;
    assert_eq!(quiet.status, 0, "{}", quiet.stderr);
    assert_eq!(
        seen.total, 3,
        "the API key's team, the property list and the mailing lists only"
    );
    assert_eq!(quiet.run()["retries"], 0);
}

/// (a) A team limit below the configured pace: 429s happen, the report counts each one as Loops
/// did, and its totals are still what Loops saw. Over NATS, so the failed attempts' counts
/// travel through JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_requests_are_counted_as_loops_counted_them() {
    let options = StackOptions {
        rows: 25,
        nats: true,
        sim_rate_limit: 8,
        requests_per_second: 16,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let (output, seen) = run_and_compare(&stack, "run above the team's limit").await;
    let run = output.run();
    assert!(
        output.status == 0 || output.status == 3,
        "{}",
        output.stderr
    );
    assert!(seen.rate_limited > 0, "the team limit was exceeded: {run}");
    assert_eq!(
        run["confirmed"].as_i64().unwrap() + run["dead_lettered"].as_i64().unwrap(),
        25,
        "{run}"
    );
    // Loops' own count agrees: one contact per confirmed record.
    assert_eq!(
        stack.contacts().await.len() as i64,
        run["confirmed"].as_i64().unwrap()
    );
    assert_eq!(
        run["retries"].as_i64().unwrap() + run["dead_lettered"].as_i64().unwrap(),
        seen.rate_limited,
        "each request answered 429 is tried again, unless its record was given up: {run}"
    );
    // `runs --json` and `runs show --json` say the same as `run --once --json`.
    let id = run["id"].as_i64().unwrap().to_string();
    let listed = stack.output(&["runs", "--json"]).await;
    let listed: Value = loopsync_testkit::json_data(&listed.stdout).unwrap();
    assert_eq!(&listed[0], run);
    let shown = stack.output(&["runs", "show", &id, "--json"]).await;
    let shown: Value = loopsync_testkit::json_data(&shown.stdout).unwrap();
    assert_eq!(&shown["run"], run);
}

/// (b) Invalid rows of both kinds — found by the extractor (a NULL key, a duplicate key, an
/// email on two rows) and by the transformer (a malformed email, a value too long) — are
/// counted as invalid rows and not as added or changed: the rows add up to the model.
async fn invalid_rows_add_up_to_the_model(nats: bool) {
    let options = StackOptions {
        rows: 10,
        nats,
        ..StackOptions::default()
    };
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    stack
        .sql(
            "INSERT INTO users VALUES (NULL, 'nokey@example.com', 'Nil', 'free', 1, now(), true);
             INSERT INTO users VALUES (3, 'dup@example.com', 'Dup', 'free', 1, now(), true);
             INSERT INTO users VALUES (11, ' USER5@example.com', 'Twin', 'free', 1, now(), true);
             UPDATE users SET email = 'not-an-email' WHERE id = 1;
             INSERT INTO users VALUES (12, 'long@example.com', repeat('x', 501), 'free', 1, now(), true);",
        )
        .await;
    let model = "SELECT count(*) FROM users";
    let rows = stack.count(model).await;
    assert_eq!(rows, 14);
    let (first, _) = run_and_compare(&stack, "first run").await;
    assert_eq!(first.status, 3, "degraded: {}", first.stderr);
    let run = first.run();
    assert_rows_and_records_add_up(run, Some(rows));
    assert_eq!(
        (
            run["added"].as_i64(),
            run["changed"].as_i64(),
            run["unchanged"].as_i64(),
            run["invalid_rows"].as_i64()
        ),
        (Some(7), Some(0), Some(0), Some(7)),
        "invalid rows: NULL key 1, key 3 on 2 rows, the shared email 2, malformed 1, too long 1: {run}"
    );
    assert_eq!(
        (
            run["invalid"].as_i64(),
            run["confirmed"].as_i64(),
            run["records"].as_i64()
        ),
        (Some(6), Some(7), Some(13)),
        "invalid records: one per NULL key, per duplicated key, per shared-email row, per refusal"
    );
    assert_eq!(run["requests_by_kind"]["writes"], 7);

    // Next run: two valid rows change, one leaves (upsert keeps its contact: nothing removed,
    // nothing counted), a new valid row; the invalid rows are invalid again.
    stack
        .sql(
            "UPDATE users SET plan = 'gold' WHERE id IN (2, 4);
             DELETE FROM users WHERE id = 10;
             INSERT INTO users VALUES (13, 'new@example.com', 'New', 'free', 1, now(), false);",
        )
        .await;
    let rows = stack.count(model).await;
    let (second, _) = run_and_compare(&stack, "second run").await;
    assert_eq!(second.status, 3, "{}", second.stderr);
    let run = second.run();
    assert_rows_and_records_add_up(run, Some(rows));
    assert_eq!(
        (
            run["added"].as_i64(),
            run["changed"].as_i64(),
            run["unchanged"].as_i64(),
            run["invalid_rows"].as_i64(),
            run["removed"].as_i64()
        ),
        (Some(1), Some(2), Some(4), Some(7), Some(0)),
        "{run}"
    );
    // The text report says the same.
    let id = run["id"].as_i64().unwrap().to_string();
    let text = stack.output(&["runs", "show", &id]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!(
            "added 1 · changed 2 · unchanged 4 · invalid 7 (= {rows} model rows) · removed 0"
        )),
        "{text}"
    );
    assert!(
        text.contains("requests: 6 to Loops: writes 3 · events 0 · deletes 0 · preflight 3"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rows_add_up_to_the_model_in_process() {
    invalid_rows_add_up_to_the_model(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rows_add_up_to_the_model_over_nats() {
    invalid_rows_add_up_to_the_model(true).await;
}
