//! The same end-to-end suite on every warehouse loopsync reads: PostgreSQL, SQLite, MySQL
//! (the state in SQLite) and, with the `duckdb` feature, a DuckDB file (the state in SQLite).
//! Each scenario is one function of a [`Backend`]; `on_every_source!` makes a test of it per
//! backend. The randomized histories run per backend in `history.rs`.

use loopsync_testkit::{Backend, Stack, StackOptions};
use serde_json::{Value, json};

/// One test per backend of an `async fn(Backend)`.
macro_rules! on_every_source {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use loopsync_testkit::Backend;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$scenario(Backend::Postgres).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario(Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                super::$scenario(Backend::MySql).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn duckdb() {
                super::$scenario(Backend::DuckDb).await
            }
        }
    )*};
}

on_every_source!(
    create_update_unchanged_and_plan,
    mirror_removes_what_left,
    invalid_records_are_refused_and_listed,
    an_email_change_is_a_rekey,
    adopt_takes_over_without_sending,
    plan_counts_are_the_next_runs,
    a_missing_column_is_named,
);

async fn stack(backend: Backend, rows: usize, behavior: &'static str) -> Option<Stack> {
    Stack::start(
        StackOptions {
            rows,
            behavior,
            extra_sync: "max_removal_share = 1.0",
            ..StackOptions::default()
        }
        .on(backend),
    )
    .await
}

async fn json_of(stack: &Stack, args: &[&str]) -> Value {
    let out = stack.output(args).await;
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    loopsync_testkit::json_data(&out.stdout).unwrap()
}

fn counts(run: &Value) -> [i64; 5] {
    ["added", "changed", "removed", "unchanged", "invalid"].map(|k| run[k].as_i64().unwrap_or(-1))
}

/// A first run creates every contact with its typed properties; a second sends nothing; a
/// changed row is one request; `plan` says so beforehand and sends nothing.
async fn create_update_unchanged_and_plan(backend: Backend) {
    let Some(stack) = stack(backend, 10, "upsert").await else {
        return;
    };
    let plan = json_of(&stack, &["plan", "--json"]).await;
    assert_eq!(plan[0]["counts"]["added"], 10, "{plan}");
    assert_eq!(
        plan[0]["records"][0]["action"]["properties"]["planName"],
        "pro"
    );
    assert_eq!(stack.sim.seen().await.total, 0, "a plan sends nothing");

    let (first, seen) = stack.run_seen(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(counts(first.run()), [10, 0, 0, 0, 0], "{}", first.run());
    assert_eq!(seen.writes(), 10, "{seen:?}");
    let contacts = stack.contacts().await;
    let user4 = &contacts["user4@example.com"];
    assert_eq!(
        (
            &user4["firstName"],
            &user4["planName"],
            &user4["seats"],
            &user4["signedUpAt"],
            &user4["mailingLists"]
        ),
        (
            &json!("First4"),
            &json!("pro"),
            &json!(4),
            &json!("2024-01-01T04:00:00.000Z"),
            &json!({"cm_news": true})
        ),
        "{user4}"
    );
    assert_eq!(contacts["user3@example.com"]["mailingLists"], json!({}));

    let (second, seen) = stack.run_seen(&[]).await;
    assert_eq!(second.status, 0, "{}", second.stderr);
    assert_eq!(counts(second.run()), [0, 0, 0, 10, 0]);
    assert_eq!(seen.writes(), 0, "nothing changed, nothing sent: {seen:?}");

    stack
        .sql("UPDATE users SET first_name = 'Changed', seats = 70 WHERE id = 1")
        .await;
    let plan = json_of(&stack, &["plan", "--json"]).await;
    assert_eq!(
        (
            plan[0]["counts"]["changed"].as_i64(),
            plan[0]["requests"].as_i64()
        ),
        (Some(1), Some(1)),
        "{plan}"
    );
    let (third, seen) = stack.run_seen(&[]).await;
    assert_eq!(third.status, 0, "{}", third.stderr);
    assert_eq!(counts(third.run()), [0, 1, 0, 9, 0]);
    assert_eq!(seen.writes(), 1, "{seen:?}");
    let contacts = stack.contacts().await;
    assert_eq!(
        (
            &contacts["user1@example.com"]["firstName"],
            &contacts["user1@example.com"]["seats"]
        ),
        (&json!("Changed"), &json!(70))
    );
}

/// Mirror removes the contacts of rows that left the model; a row that comes back is new again.
async fn mirror_removes_what_left(backend: Backend) {
    let Some(stack) = stack(backend, 6, "mirror").await else {
        return;
    };
    assert_eq!(stack.run_once(&[]).await.status, 0);
    stack.sql("DELETE FROM users WHERE id IN (1, 2)").await;
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(counts(out.run()), [0, 0, 2, 4, 0], "{}", out.run());
    assert_eq!(seen.to("POST /v1/contacts/delete"), 2, "{seen:?}");
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), 4);
    assert!(!contacts.contains_key("user1@example.com"));
    assert_eq!(
        stack
            .count("SELECT count(*) FROM loopsync.state WHERE confirmed_fp IS NOT NULL")
            .await,
        4
    );
    let back = format!(
        "INSERT INTO users VALUES (1, 'user1@example.com', 'Back', 'free', 1, {}, false)",
        stack.warehouse.time_literal(1)
    );
    stack.sql(&back).await;
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(counts(out.run()), [1, 0, 0, 4, 0], "{}", out.run());
    assert_eq!(seen.writes(), 1, "{seen:?}");
    assert_eq!(
        stack.contacts().await["user1@example.com"]["firstName"],
        "Back"
    );
}

/// A row without an email, a malformed email, two rows of one email and a NULL key are
/// invalid records: nothing is sent for them, the run is degraded, `rejections` lists them.
async fn invalid_records_are_refused_and_listed(backend: Backend) {
    let Some(stack) = stack(backend, 8, "upsert").await else {
        return;
    };
    stack
        .sql(
            "UPDATE users SET email = NULL WHERE id = 1;
             UPDATE users SET email = 'not an email' WHERE id = 2;
             UPDATE users SET email = 'user4@example.com' WHERE id = 3;
             UPDATE users SET id = NULL WHERE id = 5;",
        )
        .await;
    let (out, seen) = stack.run_seen(&[]).await;
    let run = out.run();
    assert_eq!(run["status"], "degraded", "{run}");
    assert_eq!(
        (run["confirmed"].as_i64(), run["invalid"].as_i64()),
        (Some(3), Some(5)),
        "ids 6, 7, 8 confirmed; 1, 2, 3, 4 and the NULL key invalid: {run}"
    );
    assert_eq!(seen.writes(), 3, "{seen:?}");
    let rejections = json_of(&stack, &["rejections", "--json"]).await;
    assert_eq!(rejections.as_array().map(Vec::len), Some(5), "{rejections}");
    let mut keys: Vec<i64> = rejections
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["key"].as_str()?.parse().ok())
        .collect();
    keys.sort();
    assert_eq!(keys, [1, 2, 3, 4], "and the NULL key: {rejections}");
    // Fixed, they are sent by the next run.
    stack
        .sql(
            "UPDATE users SET email = 'user1@example.com' WHERE id = 1;
             UPDATE users SET email = 'user2@example.com' WHERE id = 2;
             UPDATE users SET email = 'user3@example.com' WHERE id = 3;
             UPDATE users SET id = 5 WHERE id IS NULL;",
        )
        .await;
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.run()["status"], "succeeded", "{}", out.run());
    assert_eq!(seen.writes(), 5, "{seen:?}");
    assert_eq!(stack.contacts().await.len(), 8);
}

/// An email that changes under the same key is a re-key: mirror writes the new contact and
/// removes the old one.
async fn an_email_change_is_a_rekey(backend: Backend) {
    let Some(stack) = stack(backend, 4, "mirror").await else {
        return;
    };
    assert_eq!(stack.run_once(&[]).await.status, 0);
    stack
        .sql("UPDATE users SET email = 'second@new.example.com' WHERE id = 2")
        .await;
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.run()["rekeyed"], 1, "{}", out.run());
    assert_eq!(
        seen.writes(),
        2,
        "the new contact, the old one removed: {seen:?}"
    );
    let contacts = stack.contacts().await;
    assert_eq!(contacts.len(), 4);
    assert_eq!(contacts["second@new.example.com"]["firstName"], "First2");
    assert!(!contacts.contains_key("user2@example.com"));
    let (_, seen) = stack.run_seen(&[]).await;
    assert_eq!(seen.writes(), 0, "{seen:?}");
}

/// `adopt` records the model as in Loops without sending; the next run sends only what changed.
async fn adopt_takes_over_without_sending(backend: Backend) {
    let Some(stack) = stack(backend, 6, "mirror").await else {
        return;
    };
    let adopted = json_of(&stack, &["adopt", "--json"]).await;
    assert_eq!(adopted[0]["status"], "adopted", "{adopted}");
    assert_eq!(adopted[0]["added"], 6, "{adopted}");
    assert_eq!(stack.update_requests().await, 0);
    stack
        .sql("UPDATE users SET plan = 'gold' WHERE id = 1; DELETE FROM users WHERE id = 2;")
        .await;
    let (out, seen) = stack.run_seen(&[]).await;
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(counts(out.run()), [0, 1, 1, 4, 0], "{}", out.run());
    assert_eq!(seen.to("PUT /v1/contacts/update"), 1, "{seen:?}");
    assert_eq!(seen.to("POST /v1/contacts/delete"), 1, "{seen:?}");
}

/// A plan's counts are those of the run that follows it, in text and JSON: rows without an
/// email, with a malformed one, with a value of the wrong type (each refused by the transformer,
/// among the added and the changed), two rows of one email (refused by the extractor),
/// unchanged, changed, added and removed rows, all at once.
async fn plan_counts_are_the_next_runs(backend: Backend) {
    let Some(stack) = stack(backend, 10, "mirror").await else {
        return;
    };
    // `seats` as text, so that one row can hold a value that is not a number.
    let text = match backend {
        Backend::MySql => "CHAR",
        _ => "TEXT",
    };
    let config = std::fs::read_to_string(&stack.config).unwrap();
    let model = format!(
        "CASE WHEN first_name = 'bad-seats' THEN 'many' ELSE CAST(seats AS {text}) END AS seats, \
         signed_up_at"
    );
    std::fs::write(&stack.config, config.replace("seats, signed_up_at", &model)).unwrap();
    let first = stack.run_once(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    stack
        .sql(&format!(
            "UPDATE users SET email = NULL WHERE id = 2;
             UPDATE users SET email = 'not an email' WHERE id = 3;
             UPDATE users SET first_name = 'bad-seats' WHERE id = 4;
             UPDATE users SET first_name = 'Renamed' WHERE id = 5;
             DELETE FROM users WHERE id = 6;
             UPDATE users SET email = 'user8@example.com' WHERE id = 7;
             INSERT INTO users VALUES (11, 'user11@example.com', 'First11', 'pro', 3, {t}, true);
             INSERT INTO users VALUES (12, NULL, 'First12', 'pro', 3, {t}, true);",
            t = stack.warehouse.time_literal(11)
        ))
        .await;
    let plan = json_of(&stack, &["plan", "--json"]).await;
    let plan_text = stack.output(&["plan"]).await;
    assert!(plan_text.status.success());
    let plan_text = String::from_utf8_lossy(&plan_text.stdout).into_owned();
    let run_text = stack.output(&["run", "--once"]).await;
    assert_eq!(
        run_text.status.code(),
        Some(3),
        "degraded: {}",
        String::from_utf8_lossy(&run_text.stderr)
    );
    let run_text = String::from_utf8_lossy(&run_text.stdout).into_owned();
    let run = json_of(&stack, &["runs", "--json", "--limit", "1"]).await[0].clone();
    let planned = &plan[0]["counts"];
    let fields = ["added", "changed", "removed", "unchanged", "invalid_rows"];
    let of = |v: &Value| fields.map(|f| v[f].as_i64().unwrap_or(-1));
    // ids 11 added; 5 changed; 6 removed; 1, 9, 10 unchanged; 2, 3, 4, 12 refused by the
    // transformer, 7 and 8 by the extractor.
    assert_eq!(of(&run), [1, 1, 1, 3, 6], "{run}");
    assert_eq!(of(planned), of(&run), "plan --json: {plan}\nrun: {run}");
    assert_eq!(
        (plan[0]["invalid"].as_i64(), plan[0]["requests"].as_i64()),
        (
            run["invalid"].as_i64(),
            Some(run["records"].as_i64().unwrap() - 6)
        ),
        "records refused, requests: {plan}\nrun: {run}"
    );
    let rows = |text: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with("rows:"))
            .map(|l| l.trim().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(
        rows(&plan_text),
        "rows:     added 1 · changed 1 · unchanged 3 · invalid 6 (= 11 model rows) · removed 1",
        "{plan_text}"
    );
    assert_eq!(
        rows(&plan_text),
        rows(&run_text),
        "plan:\n{plan_text}\nrun:\n{run_text}"
    );
    // Field by field: what the changed record writes, and what the removal does.
    assert!(
        plan_text
            .contains("~ 5            write email \"user5@example.com\", firstName \"Renamed\"")
            && plan_text.contains(
                "- 6            delete the contact (email \"user6@example.com\") from Loops"
            )
            && plan_text.contains("! 4            seats (column seats): not a number"),
        "{plan_text}"
    );
}

/// A model that runs but lacks a column the mapping names is said as such, naming the mapping
/// key and the column (not as a model that "does not run"); a model that does not run says so.
async fn a_missing_column_is_named(backend: Backend) {
    let Some(stack) = stack(backend, 3, "upsert").await else {
        return;
    };
    let config = std::fs::read_to_string(&stack.config).unwrap();
    std::fs::write(
        &stack.config,
        config.replace("firstName = \"first_name\"", "firstName = \"firstname\""),
    )
    .unwrap();
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "FAIL sync users: a column is missing from the model: mapping.firstName names the \
             column \"firstname\", which the model does not return; the model's columns are: id, \
             email, first_name"
        ) && !text.contains("does not run"),
        "{text}"
    );
    std::fs::write(
        &stack.config,
        config.replace("from users\"", "from no_such_table\""),
    )
    .unwrap();
    let check = stack.output(&["check"]).await;
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("FAIL sync users: the model does not run: "),
        "{text}"
    );
}

/// DuckDB reads files itself: a model over a CSV export, then over a Parquet export of the same
/// rows, in an in-memory DuckDB (`url = "duckdb://"`). A changed export is one request; the
/// same rows in another format, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_reads_csv_and_parquet_exports() {
    let Some(stack) = stack(Backend::DuckDb, 5, "upsert").await else {
        return;
    };
    let dir = stack.dir.display().to_string();
    let export = |format: &str| {
        format!(
            "COPY users TO '{dir}/users.csv' (HEADER); \
             COPY users TO '{dir}/users.parquet' (FORMAT parquet);{format}"
        )
    };
    stack.sql(&export("")).await;
    let config = std::fs::read_to_string(&stack.config).unwrap();
    let url = config
        .lines()
        .find(|l| l.starts_with("url = \"duckdb://"))
        .unwrap()
        .to_owned();
    let reading = |file: &str| {
        let from = if file.ends_with(".csv") {
            format!("read_csv('{dir}/{file}')")
        } else {
            format!("read_parquet('{dir}/{file}')")
        };
        config
            .replace(&url, "url = \"duckdb://\"")
            .replace(" from users\"", &format!(" from {from}\""))
    };
    std::fs::write(&stack.config, reading("users.csv")).unwrap();
    let (first, seen) = stack.run_seen(&[]).await;
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert_eq!(counts(first.run()), [5, 0, 0, 0, 0], "{}", first.run());
    assert_eq!(seen.writes(), 5);
    let contacts = stack.contacts().await;
    assert_eq!(
        (
            &contacts["user4@example.com"]["seats"],
            &contacts["user4@example.com"]["signedUpAt"],
            &contacts["user4@example.com"]["mailingLists"]
        ),
        (
            &json!(4),
            &json!("2024-01-01T04:00:00.000Z"),
            &json!({"cm_news": true})
        )
    );

    stack
        .sql(&format!(
            "UPDATE users SET plan = 'gold' WHERE id = 1; {}",
            export("")
        ))
        .await;
    let (second, seen) = stack.run_seen(&[]).await;
    assert_eq!(counts(second.run()), [0, 1, 0, 4, 0], "{}", second.run());
    assert_eq!(seen.writes(), 1);
    assert_eq!(
        stack.contacts().await["user1@example.com"]["planName"],
        "gold"
    );

    std::fs::write(&stack.config, reading("users.parquet")).unwrap();
    let (third, seen) = stack.run_seen(&[]).await;
    assert_eq!(third.status, 0, "{}", third.stderr);
    assert_eq!(counts(third.run()), [0, 0, 0, 5, 0], "{}", third.run());
    assert_eq!(seen.writes(), 0, "the same rows from Parquet: {seen:?}");
}
