//! The same behaviour on both warehouses.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use loopsync_core::envelope::{ChangeKind, Outcome, OutcomeStatus, RequestCounts};
use loopsync_core::spec::{Behavior, IdentifyBy, MappedList, MappedProperty, OnRemove, SyncSpec};
use loopsync_core::value::PropertyKind;
use loopsync_core::{Classified, ErrorClass};

use super::*;

pub(crate) fn spec(name: &str, table: &str) -> SyncSpec {
    SyncSpec {
        name: name.into(),
        model: format!("select id, email, first_name, newsletter from {table};"),
        primary_key: "id".into(),
        identify_by: IdentifyBy::Email,
        behavior: Behavior::Upsert,
        on_remove: OnRemove::Delete,
        trigger_workflows: false,
        event_on_create: "c".into(),
        event_on_update: "u".into(),
        properties: vec![
            MappedProperty {
                property: "email".into(),
                column: "email".into(),
                kind: PropertyKind::String,
            },
            MappedProperty {
                property: "firstName".into(),
                column: "first_name".into(),
                kind: PropertyKind::String,
            },
        ],
        lists: vec![MappedList {
            list_id: "news".into(),
            column: "newsletter".into(),
        }],
        max_removal_share: loopsync_core::spec::DEFAULT_MAX_REMOVAL_SHARE,
        append: None,
        incremental: None,
    }
}

/// A warehouse plus a way to run SQL on it directly.
pub(crate) struct Fixture {
    sqlite: bool,
    /// The state's schema (PostgreSQL) or table prefix (SQLite).
    schema: String,
    /// The warehouse's URL.
    url: String,
    /// Dropped with the fixture.
    _database: Option<loopsync_testkit::TestDatabase>,
    pub(crate) warehouse: Arc<dyn Warehouse>,
    exec: Box<dyn Fn(String) -> futures::future::BoxFuture<'static, ()>>,
}

pub(crate) async fn postgres() -> Option<Fixture> {
    postgres_with(|_| String::new()).await
}

/// A PostgreSQL fixture; `before_connect` gives SQL to run on the fresh database (by name)
/// before the warehouse connects.
async fn postgres_with(before_connect: impl Fn(&str) -> String) -> Option<Fixture> {
    postgres_in(crate::DEFAULT_SCHEMA, before_connect).await
}

/// A PostgreSQL fixture whose state is in `schema`.
async fn postgres_in(schema: &str, before_connect: impl Fn(&str) -> String) -> Option<Fixture> {
    let database = loopsync_testkit::TestDatabase::create().await?;
    let url = database.url.clone();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let client = Arc::new(client);
    let setup = before_connect(database.name());
    if !setup.is_empty() {
        client.batch_execute(&setup).await.unwrap();
    }
    let warehouse = connect_schema(&url, schema).await.unwrap();
    Some(Fixture {
        sqlite: false,
        schema: schema.to_owned(),
        url: url.clone(),
        _database: Some(database),
        warehouse,
        exec: Box::new(move |sql| {
            let client = client.clone();
            Box::pin(async move { client.batch_execute(&sql).await.unwrap() })
        }),
    })
}

pub(crate) fn sqlite() -> Fixture {
    sqlite_in(crate::DEFAULT_SCHEMA)
}

/// An SQLite fixture whose state's tables are `{schema}_*`.
fn sqlite_in(schema: &str) -> Fixture {
    let path =
        std::env::temp_dir().join(format!("{}.db", loopsync_testkit::unique("loopsync-wh-")));
    let path_text = path.display().to_string();
    let warehouse: Arc<dyn Warehouse> =
        Arc::new(SqliteWarehouse::open_schema(&path_text, schema).unwrap());
    Fixture {
        sqlite: true,
        schema: schema.to_owned(),
        url: format!("sqlite://{path_text}"),
        _database: None,
        warehouse,
        exec: Box::new(move |sql| {
            let path = path.clone();
            Box::pin(async move {
                let c = rusqlite::Connection::open(path).unwrap();
                c.execute_batch(&sql).unwrap();
            })
        }),
    }
}

impl Fixture {
    fn dialect(&self) -> crate::schema::Dialect {
        if self.sqlite {
            crate::schema::Dialect::sqlite(&self.schema)
        } else {
            crate::schema::Dialect::postgres(&self.schema)
        }
    }
}

/// A model that fails on one of its rows (a value its SQL cannot take) fails the read as the
/// model's error, which no retry mends: the run fails at once instead of retrying until it
/// stalls. On PostgreSQL and SQLite.
async fn a_model_failing_on_a_row_is_the_models_error(f: Fixture, fails: &str) {
    f.warehouse.prepare().await.unwrap();
    (f.exec)(
        "CREATE TABLE rowfail (id integer, email text, first_name text, newsletter boolean);
         INSERT INTO rowfail VALUES (1, 'a@example.com', 'A', NULL), (2, 'b@example.com', 'B', NULL);"
            .to_owned(),
    )
    .await;
    let mut spec = spec("rowfail", "rowfail");
    spec.model = format!(
        "select id, email, CASE WHEN id = 2 THEN {fails} ELSE first_name END AS first_name, \
         newsletter from rowfail"
    );
    let error = match f.warehouse.diff(&spec).await {
        Ok(rows) => rows
            .try_collect::<Vec<_>>()
            .await
            .expect_err("the second row fails"),
        Err(e) => e,
    };
    // The model's error (SQLite) or the data's (PostgreSQL): either way, no retry.
    assert_eq!(error.class(), ErrorClass::Permanent, "{error:?}");
}

#[tokio::test]
async fn postgres_a_model_failing_on_a_row_is_the_models_error() {
    let Some(f) = postgres().await else { return };
    a_model_failing_on_a_row_is_the_models_error(f, "(first_name || ' not json')::json::text")
        .await;
}

#[tokio::test]
async fn sqlite_a_model_failing_on_a_row_is_the_models_error() {
    a_model_failing_on_a_row_is_the_models_error(sqlite(), "json(first_name || ' not json')").await;
}

async fn diff(w: &dyn Warehouse, spec: &SyncSpec) -> Vec<DiffRow> {
    w.diff(spec).await.unwrap().try_collect().await.unwrap()
}

pub(crate) fn confirmed(spec: &SyncSpec, run: i64, key: &str, fp: &str) -> Outcome {
    let mut o = Outcome::new(&spec.name, run, key, fp, OutcomeStatus::Confirmed, "upsert");
    o.requests = 1;
    o.contact_id = Some(format!("c-{key}"));
    o
}

async fn full_cycle(f: Fixture, bool_true: &str) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    w.prepare().await.unwrap();
    (f.exec)(format!(
        "CREATE TABLE users (id integer, email text, first_name text, newsletter boolean);
         INSERT INTO users VALUES (2, 'b@x.co', 'Bea', {bool_true}), (10, 'j@x.co', NULL, NULL),
                                  (1, 'a@x.co', 'Ann', {bool_true}), (3, 'c@x.co', 'Cy', {bool_true}),
                                  (3, 'c2@x.co', 'Cy2', {bool_true}), (NULL, 'n@x.co', 'Nil', {bool_true});"
    ))
    .await;
    let spec = spec("users", "users");
    let rows = diff(w, &spec).await;
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key.as_deref()).collect();
    // Byte order of the text key; duplicates adjacent; NULL last.
    assert_eq!(
        keys,
        [Some("1"), Some("10"), Some("2"), Some("3"), Some("3"), None]
    );
    assert!(
        rows.iter()
            .all(|r| r.values.is_some() && r.confirmed_fp.is_none())
    );
    let ann = rows[0].values.as_ref().unwrap();
    assert_eq!(ann["email"].as_deref(), Some("a@x.co"));
    assert_eq!(
        rows[1].values.as_ref().unwrap()["first_name"],
        None,
        "NULL stays NULL"
    );
    let news = ann["newsletter"].as_deref().unwrap();
    assert!(["t", "true", "1"].contains(&news), "{news}");

    let run = w.create_run("users").await.unwrap();
    assert_eq!(
        w.claim_run(run, false).await.unwrap().as_deref(),
        Some("users")
    );
    assert_eq!(w.claim_run(run, false).await.unwrap(), None, "claimed once");
    assert_eq!(
        w.claim_run(run, true).await.unwrap().as_deref(),
        Some("users"),
        "a redelivery re-claims"
    );
    w.mark_emitted(
        "users",
        run,
        &[("2".into(), "fp2".into()), ("1".into(), "fp1".into())],
    )
    .await
    .unwrap();
    w.finish_extract(
        run,
        &ExtractCounts {
            added: 2,
            expected: 2,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let sending = w.run(run).await.unwrap().unwrap();
    assert_eq!(
        (sending.status.as_str(), sending.expected),
        ("sending", Some(2))
    );
    w.record_outcomes(&[confirmed(&spec, run, "1", "fp1")])
        .await
        .unwrap();
    // A repeated outcome is ignored.
    w.record_outcomes(&[confirmed(&spec, run, "1", "fp1")])
        .await
        .unwrap();
    let summary = w.run(run).await.unwrap().unwrap();
    assert_eq!(
        (summary.status.as_str(), summary.confirmed, summary.requests),
        ("sending", 1, 1)
    );
    w.record_outcomes(&[confirmed(&spec, run, "2", "fp2")])
        .await
        .unwrap();
    let summary = w.run(run).await.unwrap().unwrap();
    assert_eq!(summary.status, "succeeded");
    assert_eq!(
        (summary.added, summary.confirmed, summary.requests),
        (2, 2, 2)
    );
    assert!(summary.duration_ms.unwrap() >= 0);
    assert!(summary.finished_at.unwrap().ends_with('Z'));

    let rows = diff(w, &spec).await;
    assert_eq!(rows[0].confirmed_fp.as_deref(), Some("fp1"));
    assert_eq!(rows[2].confirmed_fp.as_deref(), Some("fp2"));

    // A key that left the model still shows, without values.
    (f.exec)("DELETE FROM users WHERE id = 2".into()).await;
    let rows = diff(w, &spec).await;
    let gone = rows.iter().find(|r| r.key.as_deref() == Some("2")).unwrap();
    assert_eq!(gone.values, None);
    assert_eq!(gone.confirmed_fp.as_deref(), Some("fp2"));

    // A failure degrades the next run; a later confirmation of the same record replaces it.
    let run2 = w.create_run("users").await.unwrap();
    w.claim_run(run2, false).await.unwrap();
    w.mark_emitted("users", run2, &[("1".into(), "fp1b".into())])
        .await
        .unwrap();
    w.finish_extract(
        run2,
        &ExtractCounts {
            changed: 1,
            expected: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let rejected = Outcome::new(
        "users",
        run2,
        "1",
        "fp1b",
        OutcomeStatus::Rejected,
        "upsert",
    )
    .with_reason("400: nope");
    w.record_outcomes(&[rejected]).await.unwrap();
    let summary = w.run(run2).await.unwrap().unwrap();
    assert_eq!((summary.status.as_str(), summary.rejected), ("degraded", 1));
    let records = w.records(run2).await.unwrap();
    assert_eq!(records[0].reason.as_deref(), Some("400: nope"));
    let open = w.rejections(Some("users")).await.unwrap();
    assert_eq!(
        (open.len(), open[0].key.as_str(), open[0].outcome.as_str()),
        (1, "1", "rejected")
    );
    assert!(w.rejections(Some("other")).await.unwrap().is_empty());
    assert_eq!(
        diff(w, &spec).await[0].confirmed_fp.as_deref(),
        Some("fp1"),
        "a rejection does not advance the state"
    );
    w.record_outcomes(&[confirmed(&spec, run2, "1", "fp1b")])
        .await
        .unwrap();
    assert_eq!(w.records(run2).await.unwrap()[0].outcome, "confirmed");
    assert!(
        w.rejections(None).await.unwrap().is_empty(),
        "a later confirmation closes it"
    );
    assert_eq!(
        diff(w, &spec).await[0].confirmed_fp.as_deref(),
        Some("fp1b")
    );

    // An older run's late confirmation does not roll the state back.
    w.record_outcomes(&[confirmed(&spec, run, "1", "fp1")])
        .await
        .unwrap();
    assert_eq!(
        diff(w, &spec).await[0].confirmed_fp.as_deref(),
        Some("fp1b")
    );

    let runs = w.runs(Some("users"), 10).await.unwrap();
    assert_eq!(runs.iter().map(|r| r.id).collect::<Vec<_>>(), [run2, run]);
    assert!(w.runs(Some("other"), 10).await.unwrap().is_empty());

    // A re-extraction (its extractor died) counts every key of the run once: those it publishes
    // again and those that already have an outcome.
    let run5 = w.create_run("users").await.unwrap();
    w.claim_run(run5, false).await.unwrap();
    w.mark_emitted(
        "users",
        run5,
        &[("1".into(), "fpR".into()), ("3".into(), "fpR3".into())],
    )
    .await
    .unwrap();
    w.record_outcomes(&[confirmed(&spec, run5, "1", "fpR")])
        .await
        .unwrap();
    w.claim_run(run5, true).await.unwrap();
    w.mark_emitted("users", run5, &[("3".into(), "fpR3".into())])
        .await
        .unwrap();
    w.finish_extract(
        run5,
        &ExtractCounts {
            changed: 1,
            expected: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let again = w.run(run5).await.unwrap().unwrap();
    assert_eq!(
        (again.status.as_str(), again.expected),
        ("sending", Some(2))
    );

    // One run of a sync at a time: run 5 is still sending.
    let busy = w.create_run("users").await.unwrap_err();
    assert!(
        matches!(busy, WarehouseError::RunInProgress { run_id, .. } if run_id == run5),
        "{busy:?}"
    );
    assert!(busy.to_string().contains("one run of a sync at a time"));
    w.fail_run(run5, "closed by the test").await.unwrap();

    // The lost wake-up: every outcome recorded while the run was still extracting, and the
    // extraction's own check missed them. Whoever waits for the run finishes it.
    let run6 = w.create_run("users").await.unwrap();
    w.claim_run(run6, false).await.unwrap();
    w.mark_emitted("users", run6, &[("1".into(), "fp6".into())])
        .await
        .unwrap();
    w.record_outcomes(&[confirmed(&spec, run6, "1", "fp6")])
        .await
        .unwrap();
    assert_eq!(w.run(run6).await.unwrap().unwrap().status, "extracting");
    let table = f.dialect().table("runs");
    (f.exec)(format!(
        "UPDATE {table} SET status = 'sending', expected = 1 WHERE id = {run6}"
    ))
    .await;
    assert_eq!(w.run(run6).await.unwrap().unwrap().status, "sending");
    w.finish_if_complete(run6).await.unwrap();
    assert_eq!(w.run(run6).await.unwrap().unwrap().status, "succeeded");

    // An empty run finishes at once.
    let run3 = w.create_run("users").await.unwrap();
    w.claim_run(run3, false).await.unwrap();
    w.finish_extract(
        run3,
        &ExtractCounts {
            unchanged: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(w.run(run3).await.unwrap().unwrap().status, "succeeded");

    // A broken model is the user's to fix: permanent.
    let mut broken = spec.clone();
    broken.model = "select id, email from no_such_table".into();
    let error = match w.diff(&broken).await {
        Err(e) => e,
        Ok(mut s) => futures::StreamExt::next(&mut s).await.unwrap().unwrap_err(),
    };
    assert!(matches!(error, WarehouseError::Model { .. }), "{error:?}");
    assert_eq!(error.class(), ErrorClass::Permanent);
    let run4 = w.create_run("users").await.unwrap();
    w.fail_run(run4, "boom").await.unwrap();
    let failed = w.run(run4).await.unwrap().unwrap();
    assert_eq!(
        (failed.status.as_str(), failed.error.as_deref()),
        ("failed", Some("boom"))
    );
    assert!(failed.is_finished());
}

#[tokio::test]
async fn postgres_full_cycle() {
    let Some(f) = postgres().await else { return };
    full_cycle(f, "true").await;
}

#[tokio::test]
async fn sqlite_full_cycle() {
    full_cycle(sqlite(), "1").await;
}

#[tokio::test]
async fn postgres_full_cycle_in_another_schema() {
    let Some(f) = postgres_in("ls_other", |_| String::new()).await else {
        return;
    };
    full_cycle(f, "true").await;
}

#[tokio::test]
async fn sqlite_full_cycle_in_another_schema() {
    full_cycle(sqlite_in("ls_other"), "1").await;
}

/// Two deployments in one database, each in its own schema: neither sees the other's runs or
/// state, and one's run in progress does not hold the other's.
async fn schemas_keep_deployments_apart(f: Fixture, url: String) {
    let first = &f.warehouse;
    let second = connect_schema(&url, "second_ls").await.unwrap();
    first.prepare().await.unwrap();
    second.prepare().await.unwrap();
    assert_ne!(
        first.installation().await.unwrap(),
        second.installation().await.unwrap()
    );
    let run = first.create_run("users").await.unwrap();
    assert!(second.runs(None, 10).await.unwrap().is_empty());
    let other = second
        .create_run("users")
        .await
        .expect("not held by the first");
    assert_eq!((run, other), (1, 1));
    first
        .mark_emitted("users", run, &[("1".into(), "fp".into())])
        .await
        .unwrap();
    (f.exec)(
        "CREATE TABLE users (id integer, email text, first_name text, newsletter boolean);
              INSERT INTO users VALUES (1, 'a@x.co', 'Ann', NULL);"
            .into(),
    )
    .await;
    let spec = spec("users", "users");
    assert_eq!(diff(&*second, &spec).await.len(), 1);
    first
        .record_outcomes(&[confirmed(&spec, run, "1", "fp")])
        .await
        .unwrap();
    assert_eq!(
        diff(&**first, &spec).await[0].confirmed_fp.as_deref(),
        Some("fp")
    );
    assert_eq!(diff(&*second, &spec).await[0].confirmed_fp, None);
}

#[tokio::test]
async fn postgres_schemas_keep_deployments_apart() {
    let Some(f) = postgres().await else { return };
    let url = f.url.clone();
    schemas_keep_deployments_apart(f, url).await;
}

#[tokio::test]
async fn sqlite_schemas_keep_deployments_apart() {
    let f = sqlite();
    let url = f.url.clone();
    schemas_keep_deployments_apart(f, url).await;
}

/// The state as loopsync left it at version `v`: the migrations up to `v`, recorded.
fn state_at_version(dialect: &crate::schema::Dialect, v: i64) -> String {
    use crate::schema::{MIGRATIONS, Rendered};
    let mut sql = Vec::new();
    if dialect.backend == crate::schema::Backend::Postgres {
        sql.push(format!("CREATE SCHEMA {}", dialect.schema));
    }
    sql.push(dialect.version_table());
    for m in MIGRATIONS.iter().filter(|m| m.version <= v) {
        for step in m.steps {
            for rendered in dialect.render(step) {
                let (Rendered::Sql(s) | Rendered::UnlessColumn { sql: s, .. }) = rendered;
                sql.push(s);
            }
        }
        sql.push(format!(
            "INSERT INTO {} (version, name) VALUES ({}, '{}')",
            dialect.table("migrations"),
            m.version,
            m.name.replace('\'', "''")
        ));
    }
    sql.join(";\n")
}

/// From every earlier version to the latest: a state left at version `v` (with a run of that
/// time) is brought up to date by `prepare`, its history kept, and every call works on it.
async fn migrating_from_every_version(fixture: impl AsyncFn() -> Option<Fixture>) {
    for v in 1..=crate::schema::LATEST {
        let Some(f) = fixture().await else { return };
        let dialect = f.dialect();
        let (runs, records) = (dialect.table("runs"), dialect.table("records"));
        let legacy = format!(
            "INSERT INTO {runs} (sync, status, requested_at, extracted_at, finished_at, expected, added)
                 VALUES ('users', 'succeeded', '2024-01-01T00:00:00.000Z', '2024-01-01T00:00:01.000Z',
                         '2024-01-01T00:00:02.000Z', 1, 1);
             INSERT INTO {records} (run_id, sync, key, operation, outcome, requests, at)
                 VALUES (1, 'users', '1', 'upsert', 'confirmed', 2, '2024-01-01T00:00:02.000Z');
             CREATE TABLE people (id integer, email text, first_name text, newsletter boolean);
             INSERT INTO people VALUES (1, 'a@x.co', 'Ann', NULL), (2, 'b@x.co', 'Bo', NULL);"
        );
        let w = f.warehouse.clone();
        let exec = &f.exec;
        exec(state_at_version(&dialect, v)).await;
        // The diff reads every state column: it fails on any the migration forgot.
        let brought = async {
            an_old_schema_is_brought_up_to_date_with(&f, "", &legacy).await;
            let rows = diff(&*w, &spec("users", "people")).await;
            assert_eq!(rows.len(), 2, "version {v}");
            assert_eq!(w.reset_state("users").await.unwrap().state_records, 1);
        };
        brought.await;
        let newest = w.installation().await.unwrap();
        assert_eq!(newest.len(), 32, "version {v}: {newest}");
    }
}

#[tokio::test]
async fn postgres_migrates_from_every_earlier_version() {
    migrating_from_every_version(async || postgres().await).await;
}

#[tokio::test]
async fn sqlite_migrates_from_every_earlier_version() {
    migrating_from_every_version(async || Some(sqlite())).await;
}

#[tokio::test]
async fn postgres_migrates_another_schema_from_every_earlier_version() {
    migrating_from_every_version(async || postgres_in("ls_old", |_| String::new()).await).await;
}

/// A state migrated by a newer loopsync is refused, not written.
async fn a_newer_state_is_refused(f: Fixture) {
    let dialect = f.dialect();
    (f.exec)(state_at_version(&dialect, crate::schema::LATEST)).await;
    (f.exec)(format!(
        "INSERT INTO {} (version, name) VALUES (999, 'from the future')",
        dialect.table("migrations")
    ))
    .await;
    let e = f.warehouse.prepare().await.unwrap_err();
    assert!(e.to_string().contains("newer loopsync"), "{e}");
}

#[tokio::test]
async fn postgres_a_newer_state_is_refused() {
    let Some(f) = postgres().await else { return };
    a_newer_state_is_refused(f).await;
}

#[tokio::test]
async fn sqlite_a_newer_state_is_refused() {
    a_newer_state_is_refused(sqlite()).await;
}

#[tokio::test]
async fn postgres_timestamps_come_out_in_utc() {
    // The database's own time zone, so every session the warehouse opens starts in Paris time:
    // only the warehouse's `SET TIME ZONE 'UTC'` brings the dates back to UTC.
    let Some(f) =
        postgres_with(|db| format!("ALTER DATABASE {db} SET timezone = 'Europe/Paris'")).await
    else {
        return;
    };
    (f.exec)(
        "CREATE TABLE t (id int, email text, first_name text, newsletter boolean, at timestamptz);
         INSERT INTO t VALUES (1, 'a@x.co', 'A', true, '2024-01-08 12:31:06+01');"
            .into(),
    )
    .await;
    f.warehouse.prepare().await.unwrap();
    let mut s = spec("t", "t");
    s.model = "select * from t".into();
    s.properties.push(MappedProperty {
        property: "at".into(),
        column: "at".into(),
        kind: PropertyKind::Date,
    });
    let rows = diff(&*f.warehouse, &s).await;
    let values: &BTreeMap<String, Option<String>> = rows[0].values.as_ref().unwrap();
    assert_eq!(values["at"].as_deref(), Some("2024-01-08 11:31:06+00"));
}

#[test]
fn unsupported_urls_say_what_is_supported() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Err(e) = rt.block_on(connect("mysql://root@127.0.0.1/test")) else {
        panic!()
    };
    assert!(e.to_string().contains("set [warehouse] state"), "{e}");
    let Err(e) = rt.block_on(connect("oracle://x")) else {
        panic!()
    };
    assert!(e.to_string().contains("postgres://"));
}

/// An outcome of `key` in `run` with these requests.
fn counted(
    run: i64,
    key: &str,
    status: OutcomeStatus,
    change: Option<ChangeKind>,
    counts: RequestCounts,
) -> Outcome {
    let mut o = Outcome::new("users", run, key, "fp", status, "upsert").with_counts(counts);
    o.change = change;
    o
}

/// Requests add up over the records, their `attempted` outcomes (each attempt once) and the
/// preflight; a change the transformer found invalid counts as an invalid row, not as added;
/// rows and records add up.
async fn counts_add_up(f: Fixture) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.mark_emitted(
        "users",
        run,
        &[
            ("1".into(), "fp".into()),
            ("2".into(), "fp".into()),
            ("3".into(), "fp".into()),
        ],
    )
    .await
    .unwrap();
    // Model: 2 added and 1 changed rows, 4 unchanged, 3 invalid rows (key 4 on two rows and a
    // NULL key): 10 rows; 5 records expected (3 changes, 2 invalid records).
    w.finish_extract(
        run,
        &ExtractCounts {
            added: 2,
            changed: 1,
            unchanged: 4,
            invalid_rows: 3,
            expected: 5,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = |writes, events, retries, rate_limited| RequestCounts {
        writes,
        events,
        retries,
        rate_limited,
        ..RequestCounts::default()
    };
    let mut first = counted(run, "1", OutcomeStatus::Attempted, None, c(1, 0, 0, 1));
    first.attempt = Some("9.1".into());
    let mut second = counted(run, "1", OutcomeStatus::Attempted, None, c(1, 0, 1, 0));
    second.attempt = Some("9.2".into());
    let mut event = counted(
        run,
        "3",
        OutcomeStatus::Attempted,
        Some(ChangeKind::Changed),
        c(0, 1, 0, 0),
    );
    event.attempt = Some("11.1".into());
    w.record_outcomes(&[first.clone(), second, event])
        .await
        .unwrap();
    // A repeated attempt is counted once.
    w.record_outcomes(&[first]).await.unwrap();
    let sending = w.run(run).await.unwrap().unwrap();
    assert_eq!(
        (sending.status.as_str(), sending.records, sending.requests),
        ("sending", 0, 3),
        "attempts are no records"
    );
    w.record_outcomes(&[
        counted(
            run,
            "1",
            OutcomeStatus::Confirmed,
            Some(ChangeKind::Added),
            c(1, 0, 1, 0),
        ),
        counted(
            run,
            "2",
            OutcomeStatus::Invalid,
            Some(ChangeKind::Added),
            RequestCounts::default(),
        ),
        counted(
            run,
            "(null #1)",
            OutcomeStatus::Invalid,
            None,
            RequestCounts::default(),
        ),
        counted(
            run,
            "4",
            OutcomeStatus::Invalid,
            None,
            RequestCounts::default(),
        ),
    ])
    .await
    .unwrap();
    w.record_outcomes(&[counted(
        run,
        "3",
        OutcomeStatus::Rejected,
        Some(ChangeKind::Changed),
        RequestCounts::default(),
    )])
    .await
    .unwrap();
    let preflight = RequestCounts {
        preflight: 4,
        retries: 1,
        rate_limited: 1,
        ..RequestCounts::default()
    };
    w.record_preflight(run, &RequestCounts::default())
        .await
        .unwrap();
    w.record_preflight(run, &preflight).await.unwrap();

    let s = w.run(run).await.unwrap().unwrap();
    assert_eq!(s.status, "degraded");
    assert_eq!(
        s.requests_by_kind,
        RequestsByKind {
            writes: 3,
            events: 1,
            deletes: 0,
            preflight: 4
        }
    );
    assert_eq!((s.requests, s.retries, s.rate_limited), (8, 3, 2));
    assert_eq!(s.requests, s.requests_by_kind.total());
    assert_eq!(
        (s.added, s.changed, s.unchanged, s.invalid_rows, s.removed),
        (1, 1, 4, 4, 0),
        "the added row the transformer refused is an invalid row"
    );
    assert_eq!(s.added + s.changed + s.unchanged + s.invalid_rows, 10);
    assert_eq!(
        (s.confirmed, s.invalid, s.rejected, s.records),
        (1, 3, 1, 5)
    );
    assert_eq!(
        s.confirmed + s.skipped + s.invalid + s.rejected + s.dead_lettered,
        s.records
    );
    assert_eq!(w.runs(None, 5).await.unwrap()[0], s);
    // A record's requests are those of all its attempts.
    let records = w.records(run).await.unwrap();
    let requests = |key: &str| records.iter().find(|r| r.key == key).unwrap().requests;
    assert_eq!((requests("1"), requests("3"), requests("2")), (3, 1, 0));
    let open = w.rejections(None).await.unwrap();
    assert_eq!(open.iter().find(|r| r.key == "3").unwrap().requests, 1);

    // A confirmation that replaces a failure adds its requests.
    w.record_outcomes(&[counted(
        run,
        "3",
        OutcomeStatus::Confirmed,
        Some(ChangeKind::Changed),
        c(0, 1, 1, 0),
    )])
    .await
    .unwrap();
    let s = w.run(run).await.unwrap().unwrap();
    assert_eq!(
        (
            s.requests_by_kind.events,
            s.retries,
            s.rejected,
            s.confirmed
        ),
        (2, 4, 0, 2)
    );
}

#[tokio::test]
async fn postgres_counts_add_up() {
    let Some(f) = postgres().await else { return };
    counts_add_up(f).await;
}

#[tokio::test]
async fn sqlite_counts_add_up() {
    counts_add_up(sqlite()).await;
}

/// A state schema made by an earlier version keeps working: `prepare` adds what it lacks, and
/// the old runs report their requests (without a breakdown).
async fn an_old_schema_is_brought_up_to_date(f: Fixture, old: &str, legacy: &str) {
    an_old_schema_is_brought_up_to_date_with(&f, old, legacy).await;
}

async fn an_old_schema_is_brought_up_to_date_with(f: &Fixture, old: &str, legacy: &str) {
    if !old.is_empty() {
        (f.exec)(old.to_owned()).await;
    }
    (f.exec)(legacy.to_owned()).await;
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    w.prepare().await.unwrap();
    let s = w.run(1).await.unwrap().unwrap();
    assert_eq!(
        (s.status.as_str(), s.confirmed, s.requests, s.records),
        ("succeeded", 1, 2, 1)
    );
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.mark_emitted("users", run, &[("1".into(), "fp".into())])
        .await
        .unwrap();
    w.finish_extract(
        run,
        &ExtractCounts {
            changed: 1,
            expected: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    w.record_outcomes(&[counted(
        run,
        "1",
        OutcomeStatus::Confirmed,
        Some(ChangeKind::Changed),
        RequestCounts {
            writes: 1,
            ..RequestCounts::default()
        },
    )])
    .await
    .unwrap();
    let s = w.run(run).await.unwrap().unwrap();
    assert_eq!(
        (s.status.as_str(), s.requests, s.requests_by_kind.writes),
        ("succeeded", 1, 1)
    );
}

#[tokio::test]
async fn postgres_old_schema_is_brought_up_to_date() {
    let Some(f) = postgres().await else { return };
    an_old_schema_is_brought_up_to_date(
        f,
        "CREATE SCHEMA loopsync;
         CREATE TABLE loopsync.state (sync text NOT NULL, key text NOT NULL, emitted_fp text,
             emitted_run bigint, confirmed_fp text, confirmed_run bigint, confirmed_at timestamptz,
             contact_id text, PRIMARY KEY (sync, key));
         CREATE TABLE loopsync.runs (id bigserial PRIMARY KEY, sync text NOT NULL,
             status text NOT NULL, requested_at timestamptz NOT NULL DEFAULT now(),
             started_at timestamptz, extracted_at timestamptz, finished_at timestamptz,
             expected bigint, added bigint NOT NULL DEFAULT 0, changed bigint NOT NULL DEFAULT 0,
             removed bigint NOT NULL DEFAULT 0, unchanged bigint NOT NULL DEFAULT 0, error text);
         CREATE TABLE loopsync.records (run_id bigint NOT NULL, sync text NOT NULL,
             key text NOT NULL, fingerprint text, operation text NOT NULL, outcome text NOT NULL,
             reason text, contact_id text, requests integer NOT NULL DEFAULT 0,
             at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (run_id, key));",
        "INSERT INTO loopsync.runs (sync, status, extracted_at, finished_at, expected, added)
             VALUES ('users', 'succeeded', now(), now(), 1, 1);
         INSERT INTO loopsync.records (run_id, sync, key, operation, outcome, requests)
             VALUES (1, 'users', '1', 'upsert', 'confirmed', 2);",
    )
    .await;
}

#[tokio::test]
async fn sqlite_old_schema_is_brought_up_to_date() {
    an_old_schema_is_brought_up_to_date(
        sqlite(),
        "CREATE TABLE loopsync_state (sync TEXT NOT NULL, key TEXT NOT NULL,
             emitted_fp TEXT, emitted_run INTEGER, confirmed_fp TEXT, confirmed_run INTEGER,
             confirmed_at TEXT, contact_id TEXT, PRIMARY KEY (sync, key));
         CREATE TABLE loopsync_runs (id INTEGER PRIMARY KEY AUTOINCREMENT, sync TEXT NOT NULL,
             status TEXT NOT NULL, requested_at TEXT NOT NULL, started_at TEXT,
             extracted_at TEXT, finished_at TEXT, expected INTEGER,
             added INTEGER NOT NULL DEFAULT 0, changed INTEGER NOT NULL DEFAULT 0,
             removed INTEGER NOT NULL DEFAULT 0, unchanged INTEGER NOT NULL DEFAULT 0, error TEXT);
         CREATE TABLE loopsync_records (run_id INTEGER NOT NULL, sync TEXT NOT NULL,
             key TEXT NOT NULL, fingerprint TEXT, operation TEXT NOT NULL, outcome TEXT NOT NULL,
             reason TEXT, contact_id TEXT, requests INTEGER NOT NULL DEFAULT 0, at TEXT NOT NULL,
             PRIMARY KEY (run_id, key));",
        "INSERT INTO loopsync_runs (sync, status, requested_at, extracted_at, finished_at,
             expected, added) VALUES ('users', 'succeeded', '2024-01-01T00:00:00.000Z',
             '2024-01-01T00:00:01.000Z', '2024-01-01T00:00:02.000Z', 1, 1);
         INSERT INTO loopsync_records (run_id, sync, key, operation, outcome, requests, at)
             VALUES (1, 'users', '1', 'upsert', 'confirmed', 2, '2024-01-01T00:00:02.000Z');",
    )
    .await;
}

/// A run whose waiting process stopped giving signs of life is closed as `interrupted` by the
/// next run of its sync; one that heartbeats is not.
async fn lease(f: Fixture) {
    let w = &f.warehouse;
    w.prepare().await.unwrap();
    let table = if f.sqlite {
        "loopsync_runs"
    } else {
        "loopsync.runs"
    };
    let first = w.create_run("users").await.unwrap();
    w.heartbeat(first).await.unwrap();
    assert!(matches!(
        w.create_run("users").await,
        Err(WarehouseError::RunInProgress { .. })
    ));
    // Another sync is not held up.
    let other = w.create_run("others").await.unwrap();
    w.fail_run(other, "done").await.unwrap();
    // Its process died: no heartbeat for longer than the lease.
    let long_ago = if f.sqlite {
        "'2000-01-01T00:00:00.000Z'"
    } else {
        "timestamptz '2000-01-01 00:00:00+00'"
    };
    (f.exec)(format!(
        "UPDATE {table} SET heartbeat_at = {long_ago}, requested_at = {long_ago} WHERE id = {first}"
    ))
    .await;
    let second = w.create_run("users").await.unwrap();
    let closed = w.run(first).await.unwrap().unwrap();
    assert_eq!(closed.status, "interrupted");
    assert!(
        closed
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("its process stopped (no sign of life since 2000-01-01")),
        "{closed:?}"
    );
    assert!(closed.is_finished(), "an interrupted run is over");
    assert_eq!(w.run(second).await.unwrap().unwrap().status, "requested");
    assert_ne!(w.installation().await.unwrap(), "");
    assert_eq!(
        w.installation().await.unwrap(),
        w.installation().await.unwrap()
    );
}

#[tokio::test]
async fn postgres_lease() {
    let Some(f) = postgres().await else { return };
    lease(f).await;
}

#[tokio::test]
async fn sqlite_lease() {
    lease(sqlite()).await;
}

/// A run whose process is stopping (a signal) is closed as `interrupted` with why, at once:
/// the next run of its sync need not wait for the lease. A run already over is left alone.
async fn interrupting(f: Fixture) {
    let w = &f.warehouse;
    w.prepare().await.unwrap();
    let first = w.create_run("users").await.unwrap();
    assert!(w.claim_run(first, false).await.unwrap().is_some());
    assert!(w.interrupt_run(first, "stopped by SIGTERM").await.unwrap());
    let closed = w.run(first).await.unwrap().unwrap();
    assert_eq!(closed.status, "interrupted");
    assert_eq!(closed.error.as_deref(), Some("stopped by SIGTERM"));
    assert!(closed.finished_at.is_some(), "{closed:?}");
    // Over: not closed again, and the next run starts at once.
    assert!(!w.interrupt_run(first, "again").await.unwrap());
    let second = w.create_run("users").await.unwrap();
    w.fail_run(second, "the model does not run").await.unwrap();
    assert!(!w.interrupt_run(second, "stopped by SIGINT").await.unwrap());
    assert_eq!(w.run(second).await.unwrap().unwrap().status, "failed");
}

#[tokio::test]
async fn postgres_interrupting() {
    let Some(f) = postgres().await else { return };
    interrupting(f).await;
}

#[tokio::test]
async fn sqlite_interrupting() {
    interrupting(sqlite()).await;
}

/// `[warehouse] records_retention`: the results and attempts of a run requested before the
/// retention go; those of a recent run, and every run with its counts, stay.
async fn pruning(f: Fixture) {
    let w = &f.warehouse;
    w.prepare().await.unwrap();
    let spec = spec("users", "users");
    let mut runs = Vec::new();
    for key in ["old", "new"] {
        let run = w.create_run("users").await.unwrap();
        let mut attempted =
            Outcome::new("users", run, key, "f", OutcomeStatus::Attempted, "upsert").with_counts(
                RequestCounts {
                    writes: 1,
                    ..RequestCounts::default()
                },
            );
        attempted.attempt = Some("a1".into());
        w.record_outcomes(&[attempted, confirmed(&spec, run, key, "f")])
            .await
            .unwrap();
        w.fail_run(run, "done").await.unwrap();
        runs.push(run);
    }
    let runs_table = if f.sqlite {
        format!("{}_runs", f.schema)
    } else {
        format!("{}.runs", f.schema)
    };
    let long_ago = if f.sqlite {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-100 days')"
    } else {
        "now() - interval '100 days'"
    };
    (f.exec)(format!(
        "UPDATE {runs_table} SET requested_at = {long_ago} WHERE id = {}",
        runs[0]
    ))
    .await;
    let ninety_days = std::time::Duration::from_secs(90 * 24 * 3600);
    assert_eq!(w.prune_records(ninety_days).await.unwrap(), 1);
    assert!(
        w.records(runs[0]).await.unwrap().is_empty(),
        "the old results go"
    );
    assert_eq!(
        w.records(runs[1]).await.unwrap().len(),
        1,
        "the recent ones stay"
    );
    // The recent record's requests still count its attempt's: the attempts stayed too.
    assert_eq!(w.records(runs[1]).await.unwrap()[0].requests, 2);
    assert_eq!(
        w.runs(Some("users"), 10).await.unwrap().len(),
        2,
        "runs stay"
    );
    assert_eq!(w.prune_records(ninety_days).await.unwrap(), 0);
}

/// `loopsync forget` erases nothing while the sync has a run in progress (its outcomes would
/// write the person back); once it has ended, the record's rows go, and only its.
async fn erasing(f: Fixture) {
    let w = &f.warehouse;
    w.prepare().await.unwrap();
    let spec = spec("users", "users");
    let run = w.create_run("users").await.unwrap();
    w.record_outcomes(&[
        confirmed(&spec, run, "7", "f"),
        confirmed(&spec, run, "8", "f"),
    ])
    .await
    .unwrap();
    let keys = ["7".to_owned()];
    let refused = w.erase_person("users", &keys, &[]).await.unwrap_err();
    assert!(
        matches!(refused, WarehouseError::RunInProgress { run_id, .. } if run_id == run),
        "{refused}"
    );
    assert_eq!(w.records(run).await.unwrap().len(), 2, "nothing erased");
    w.fail_run(run, "done").await.unwrap();
    // An acceptance of the person's record, written as is (the record is no invalid one).
    (f.exec)(f.dialect().statement(
        "INSERT INTO loopsync.accepted (sync, key, reason, note, accepted_at)
         VALUES ('users', '7', 'no email', 'note', CURRENT_TIMESTAMP)",
    ))
    .await;
    let erased = w.erase_person("users", &keys, &[]).await.unwrap();
    assert_eq!((erased.state, erased.records), (1, 1));
    assert_eq!(
        w.unaccept_invalid("users", &keys).await.unwrap(),
        0,
        "its acceptance went too"
    );
    let left: Vec<String> = w
        .records(run)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(left, ["8"]);
    let found = w
        .find_person("users", &Person::Key("8".into()))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert!(
        w.find_person("users", &Person::Key("7".into()))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn postgres_erasing() {
    let Some(f) = postgres().await else { return };
    erasing(f).await;
}

#[tokio::test]
async fn sqlite_erasing() {
    erasing(sqlite()).await;
}

#[tokio::test]
async fn postgres_pruning() {
    let Some(f) = postgres().await else { return };
    pruning(f).await;
}

#[tokio::test]
async fn sqlite_pruning() {
    pruning(sqlite()).await;
}

/// A state file loopsync creates, and its write-ahead log, are its user's alone (they hold
/// emails).
#[cfg(unix)]
#[tokio::test]
async fn a_new_sqlite_state_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let f = sqlite();
    f.warehouse.prepare().await.unwrap();
    f.warehouse.create_run("users").await.unwrap();
    let path = f.url.strip_prefix("sqlite://").unwrap().to_owned();
    for file in [path.clone(), format!("{path}-wal")] {
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}: {mode:o}");
    }
}

/// `verify --repair` forgets a confirmation at the fingerprint verify compared against (and
/// only then), keeps the identifiers, and a later confirmation replaces it.
async fn forgetting_confirmations(f: Fixture, bool_true: &str) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(format!(
        "CREATE TABLE users (id integer, email text, first_name text, newsletter boolean);
         INSERT INTO users VALUES (1, 'a@x.co', 'Ann', {bool_true}), (2, 'b@x.co', 'Bea', NULL),
                                  (3, 'c@x.co', 'Cy', NULL);"
    ))
    .await;
    let spec = spec("users", "users");
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    let fps: BTreeMap<String, String> = diff(w, &spec)
        .await
        .into_iter()
        .map(|r| (r.key.unwrap(), spec.fingerprint(&r.values.unwrap())))
        .collect();
    let emitted: Vec<(String, String)> = fps.clone().into_iter().collect();
    w.mark_emitted("users", run, &emitted).await.unwrap();
    let outcomes: Vec<Outcome> = fps
        .iter()
        .map(|(key, fp)| {
            let mut o = confirmed(&spec, run, key, fp);
            o.email = Some(format!("{key}@x.co"));
            o
        })
        .collect();
    w.record_outcomes(&outcomes).await.unwrap();

    assert_eq!(w.forget_confirmed("users", &[]).await.unwrap(), 0);
    let forgotten = w
        .forget_confirmed(
            "users",
            &[
                ("1".into(), fps["1"].clone()),
                // A run confirmed another version since verify read it: left alone.
                ("2".into(), "an older fingerprint".into()),
                ("9".into(), "not in the state".into()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(forgotten, 1);
    let rows = diff(w, &spec).await;
    let row = |key: &str| rows.iter().find(|r| r.key.as_deref() == Some(key)).unwrap();
    assert_eq!(row("1").confirmed_fp.as_deref(), Some(FORGOTTEN_FP));
    assert_eq!(
        row("1").confirmed_email.as_deref(),
        Some("1@x.co"),
        "the identifiers stay, for a removal"
    );
    assert_eq!(row("2").confirmed_fp.as_deref(), Some(fps["2"].as_str()));
    assert_eq!(row("3").confirmed_fp.as_deref(), Some(fps["3"].as_str()));
    assert_ne!(
        spec.fingerprint(row("1").values.as_ref().unwrap()),
        FORGOTTEN_FP
    );
    // Forgetting again finds nothing at that fingerprint.
    assert_eq!(
        w.forget_confirmed("users", &[("1".into(), fps["1"].clone())])
            .await
            .unwrap(),
        0
    );

    // The next run confirms it again (one run of a sync at a time: the first is closed).
    w.fail_run(run, "closed by the test").await.unwrap();
    let next = w.create_run("users").await.unwrap();
    w.claim_run(next, false).await.unwrap();
    w.mark_emitted("users", next, &[("1".into(), fps["1"].clone())])
        .await
        .unwrap();
    w.record_outcomes(&[confirmed(&spec, next, "1", &fps["1"])])
        .await
        .unwrap();
    let rows = diff(w, &spec).await;
    assert_eq!(rows[0].confirmed_fp.as_deref(), Some(fps["1"].as_str()));
    assert_eq!(rows[0].confirmed_email.as_deref(), Some("1@x.co"));
}

#[tokio::test]
async fn postgres_forgetting_confirmations() {
    let Some(f) = postgres().await else { return };
    forgetting_confirmations(f, "true").await;
}

#[tokio::test]
async fn sqlite_forgetting_confirmations() {
    forgetting_confirmations(sqlite(), "1").await;
}

/// A sync's state is bound to one destination and API key: the first bind records them, later
/// binds are told them (whatever they asked); the key is recorded again only while the sync is
/// bound to the destination given; `set_destination` replaces both; `reset_state` forgets the
/// sync's state and binding, and nothing of another sync, nor the runs and records.
async fn destinations_bind_and_reset(f: Fixture) {
    use loopsync_core::destination::Destination;
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(
        "CREATE TABLE users (id integer, email text, first_name text, newsletter boolean)".into(),
    )
    .await;
    let a = Destination::new(Some("Team".into()), "http://127.0.0.1:4001/api/");
    let b = Destination::new(Some("Team".into()), "http://127.0.0.1:4002/api");
    assert_eq!(w.destination("users").await.unwrap(), None);
    assert_eq!(w.bind_destination("users", &a, "k1").await.unwrap(), None);
    let bound = w.destination("users").await.unwrap().unwrap();
    assert_eq!(bound.destination, a);
    assert_eq!(bound.destination.base_url, "http://127.0.0.1:4001/api");
    assert_eq!(bound.key_fingerprint.as_deref(), Some("k1"));
    assert!(bound.bound_at.ends_with('Z'), "{}", bound.bound_at);
    let earlier = w.bind_destination("users", &b, "k2").await.unwrap();
    assert_eq!(
        earlier.map(|e| (e.destination, e.key_fingerprint)),
        Some((a.clone(), Some("k1".into()))),
        "b does not replace a, nor k2 k1"
    );
    assert_eq!(
        w.destination("users").await.unwrap().unwrap().destination,
        a
    );
    assert_eq!(
        w.bind_destination("users", &a, "k1")
            .await
            .unwrap()
            .map(|e| e.destination),
        Some(a.clone())
    );
    // The key of a binding changes only while the sync is bound where the caller says.
    assert!(!w.set_key_fingerprint("users", &b, "k2").await.unwrap());
    assert!(w.set_key_fingerprint("users", &a, "k2").await.unwrap());
    let bound = w.destination("users").await.unwrap().unwrap();
    assert_eq!(
        (bound.destination, bound.key_fingerprint.as_deref()),
        (a.clone(), Some("k2"))
    );
    // Another sync has its own binding; a team Loops did not name is kept as such.
    let unnamed = Destination::new(None, "http://127.0.0.1:4002/api");
    assert_eq!(
        w.bind_destination("teams", &unnamed, "k1").await.unwrap(),
        None
    );
    assert_eq!(
        w.destination("teams").await.unwrap().unwrap().destination,
        unnamed
    );
    assert!(
        w.set_key_fingerprint("teams", &unnamed, "k3")
            .await
            .unwrap()
    );
    assert!(
        !w.set_key_fingerprint("teams", &b, "k3").await.unwrap(),
        "a named team is not the unnamed one"
    );
    // A binding from before fingerprints were kept has none.
    (f.exec)(
        f.dialect().statement(
            "UPDATE loopsync.destinations SET key_fingerprint = NULL WHERE sync = 'users'",
        ),
    )
    .await;
    assert_eq!(
        w.destination("users")
            .await
            .unwrap()
            .unwrap()
            .key_fingerprint,
        None
    );
    w.set_destination("users", &b, "k4").await.unwrap();
    let bound = w.destination("users").await.unwrap().unwrap();
    assert_eq!(
        (bound.destination, bound.key_fingerprint.as_deref()),
        (b.clone(), Some("k4"))
    );

    // State of both syncs, a run and its records.
    let s = spec("users", "users");
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.mark_emitted(
        "users",
        run,
        &[
            ("1".into(), "f1".into()),
            ("2".into(), "f2".into()),
            ("3".into(), "f3".into()),
        ],
    )
    .await
    .unwrap();
    w.finish_extract(
        run,
        &ExtractCounts {
            added: 3,
            expected: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // 1 confirmed, then 2; 3 only sent (dead-lettered: Loops never confirmed it). Apart: the
    // statements of one batch may be a millisecond apart on SQLite (its `now` is a statement's,
    // PostgreSQL's a transaction's), and would order 1 and 2 by that.
    w.record_outcomes(&[confirmed(&s, run, "1", "f1")])
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let mut second = confirmed(&s, run, "2", "f2");
    second.email = Some("two@example.com".into());
    w.record_outcomes(&[
        second,
        Outcome::new(
            "users",
            run,
            "3",
            "f3",
            OutcomeStatus::DeadLettered,
            "upsert",
        ),
    ])
    .await
    .unwrap();
    // The confirmed contacts, the most recently confirmed first.
    let contacts = w.confirmed_contacts("users", 5).await.unwrap();
    assert_eq!(
        contacts,
        [
            ConfirmedContact {
                key: "2".into(),
                email: Some("two@example.com".into()),
                contact_id: Some("c-2".into()),
                ..ConfirmedContact::default()
            },
            ConfirmedContact {
                key: "1".into(),
                contact_id: Some("c-1".into()),
                ..ConfirmedContact::default()
            },
        ]
    );
    assert_eq!(w.confirmed_contacts("users", 1).await.unwrap().len(), 1);
    w.adopt(
        "teams",
        run,
        &[Adoption {
            key: "9".into(),
            fingerprint: "f9".into(),
            ..Adoption::default()
        }],
    )
    .await
    .unwrap();

    let reset = w.reset_state("users").await.unwrap();
    assert_eq!(
        (reset.confirmed_records, reset.state_records),
        (2, 3),
        "two confirmed records forgotten, of three in the state"
    );
    assert_eq!(reset.destination.map(|d| d.destination), Some(b.clone()));
    assert_eq!(w.destination("users").await.unwrap(), None);
    // Nothing confirmed is left; each record keeps a generation, moved on, so the next sends
    // have new idempotency keys.
    let rows = diff(w, &s).await;
    assert!(
        rows.iter().all(|r| r.confirmed_fp.is_none()
            && r.confirmed_email.is_none()
            && r.generation == if r.key.as_deref() == Some("3") { 1 } else { 2 }),
        "nothing confirmed left: {rows:?}"
    );
    let teams = diff(w, &spec("teams", "users")).await;
    assert_eq!(teams.len(), 1, "another sync keeps its state: {teams:?}");
    assert_eq!(
        w.destination("teams").await.unwrap().unwrap().destination,
        unnamed,
        "another sync keeps its binding"
    );
    let summary = w.run(run).await.unwrap().unwrap();
    assert_eq!(
        (summary.status.as_str(), summary.confirmed),
        ("degraded", 2)
    );
    assert_eq!(
        w.records(run).await.unwrap().len(),
        3,
        "records are history"
    );
    // An outcome of the run before the reset (its operations still queued in NATS, sent to
    // the Loops the state was reset from) never becomes state; the next run's does.
    w.record_outcomes(&[confirmed(&s, run, "1", "f1")])
        .await
        .unwrap();
    assert!(
        diff(w, &s).await.iter().all(|r| r.confirmed_fp.is_none()),
        "the reset's fence holds"
    );
    let next = w.create_run("users").await.unwrap();
    w.record_outcomes(&[confirmed(&s, next, "1", "f1")])
        .await
        .unwrap();
    assert_eq!(
        diff(w, &s).await[0].confirmed_fp.as_deref(),
        Some("f1"),
        "the next run confirms"
    );
    w.reset_state("users").await.unwrap();
    // Nothing left to forget; the sync binds afresh.
    assert_eq!(w.reset_state("users").await.unwrap(), StateReset::default());
    assert!(w.confirmed_contacts("users", 5).await.unwrap().is_empty());
    assert_eq!(w.bind_destination("users", &b, "k4").await.unwrap(), None);
}

/// `(key, contact id)` of the sync's confirmed records, by key.
async fn contact_ids(w: &dyn Warehouse) -> Vec<(String, Option<String>)> {
    let mut ids: Vec<_> = w
        .confirmed_contacts("users", 100)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.key, c.contact_id))
        .collect();
    ids.sort();
    ids
}

/// The contact id the state keeps is Loops' id in the binding it was confirmed under: an
/// adopted record has none (adopt asks Loops for no contact), and a rebinding to anything but
/// the same destination and key forgets every one; the same binding keeps them.
async fn adoption_forgets_contact_ids(f: Fixture) {
    use loopsync_core::destination::Destination;
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    let s = spec("users", "users");
    let a = Destination::new(Some("Team".into()), "http://127.0.0.1:4001/api");
    w.set_destination("users", &a, "k1").await.unwrap();
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.record_outcomes(&[
        confirmed(&s, run, "1", "f1"),
        confirmed(&s, run, "2", "f2"),
        confirmed(&s, run, "3", "f3"),
    ])
    .await
    .unwrap();
    let id = |key: &str, id: Option<&str>| (key.to_owned(), id.map(str::to_owned));
    assert_eq!(
        contact_ids(w).await,
        [
            id("1", Some("c-1")),
            id("2", Some("c-2")),
            id("3", Some("c-3"))
        ]
    );
    w.adopt(
        "users",
        run,
        &[Adoption {
            key: "2".into(),
            fingerprint: "f2-new".into(),
            email: Some("two@example.com".into()),
            ..Adoption::default()
        }],
    )
    .await
    .unwrap();
    assert_eq!(
        contact_ids(w).await,
        [id("1", Some("c-1")), id("2", None), id("3", Some("c-3"))],
        "the adopted record has no contact id"
    );
    // A read-back sample takes the records with an id first, though key 2 was confirmed last.
    let mut sample: Vec<String> = w
        .confirmed_contacts("users", 2)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.key)
        .collect();
    sample.sort();
    assert_eq!(sample, ["1", "3"]);
    w.set_destination("users", &a, "k1").await.unwrap();
    assert_eq!(
        contact_ids(w).await,
        [id("1", Some("c-1")), id("2", None), id("3", Some("c-3"))],
        "the same binding keeps them"
    );
    w.set_destination("users", &a, "k2").await.unwrap();
    assert_eq!(
        contact_ids(w).await,
        [id("1", None), id("2", None), id("3", None)],
        "another key may be another team's: every id goes"
    );
}

#[tokio::test]
async fn postgres_adoption_forgets_contact_ids() {
    let Some(f) = postgres().await else { return };
    adoption_forgets_contact_ids(f).await;
}

#[tokio::test]
async fn sqlite_adoption_forgets_contact_ids() {
    adoption_forgets_contact_ids(sqlite()).await;
}

/// A confirmation without a contact id (`events/send` answers none) keeps the state's id only
/// while the record's identity stays: a re-key through `events/send` (another email) made a new
/// contact, so the old contact's id goes; the same email (in another case), or none given,
/// keeps it.
async fn a_rekey_without_a_contact_id_forgets_the_old_one(f: Fixture) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    let s = spec("users", "users");
    let with_email = |mut o: Outcome, email: Option<&str>| {
        o.email = email.map(str::to_owned);
        o
    };
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.record_outcomes(&[
        with_email(confirmed(&s, run, "1", "f1"), Some("one@example.com")),
        with_email(confirmed(&s, run, "2", "f2"), Some("two@example.com")),
        with_email(confirmed(&s, run, "3", "f3"), Some("three@example.com")),
    ])
    .await
    .unwrap();
    w.finish_extract(run, &ExtractCounts::default())
        .await
        .unwrap();
    let next = w.create_run("users").await.unwrap();
    w.claim_run(next, false).await.unwrap();
    let without_id = |key: &str, email: Option<&str>| {
        let mut o = with_email(confirmed(&s, next, key, &format!("f{key}-new")), email);
        o.contact_id = None;
        o
    };
    w.record_outcomes(&[
        without_id("1", Some("moved@example.com")),
        without_id("2", Some("TWO@example.com")),
        without_id("3", None),
    ])
    .await
    .unwrap();
    let id = |key: &str, id: Option<&str>| (key.to_owned(), id.map(str::to_owned));
    assert_eq!(
        contact_ids(w).await,
        [id("1", None), id("2", Some("c-2")), id("3", Some("c-3"))],
        "only the re-key forgets its old contact's id"
    );
}

#[tokio::test]
async fn postgres_a_rekey_without_a_contact_id_forgets_the_old_one() {
    let Some(f) = postgres().await else { return };
    a_rekey_without_a_contact_id_forgets_the_old_one(f).await;
}

#[tokio::test]
async fn sqlite_a_rekey_without_a_contact_id_forgets_the_old_one() {
    a_rekey_without_a_contact_id_forgets_the_old_one(sqlite()).await;
}

/// A run of sync `users` whose records have `outcomes` (reasons given), finished: its summary.
async fn run_of(w: &dyn Warehouse, outcomes: &[(&str, OutcomeStatus, &str)]) -> RunSummary {
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    let outcomes: Vec<Outcome> = outcomes
        .iter()
        .map(|(key, status, reason)| {
            Outcome::new("users", run, key, "fp", *status, "upsert").with_reason(*reason)
        })
        .collect();
    w.record_outcomes(&outcomes).await.unwrap();
    w.finish_extract(run, &ExtractCounts::default())
        .await
        .unwrap();
    w.run(run).await.unwrap().unwrap()
}

/// `(key, accepted)` of the sync's rejections.
async fn accepted_now(w: &dyn Warehouse) -> Vec<(String, bool)> {
    w.rejections(Some("users"))
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.accepted))
        .collect()
}

/// An invalid record accepted for its reason no longer makes a run degraded while it stays
/// invalid for that reason; the run counts it as accepted, and the rejections say so at once.
/// Another reason, or any other outcome, ends the acceptance: the record is a fresh invalid
/// when it comes back.
async fn accepting_invalid_records(f: Fixture) {
    use OutcomeStatus::{Confirmed, Invalid};
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    let (no_email, malformed) = (
        "no email: the contact is identified by email",
        "malformed email",
    );
    let first = run_of(w, &[("1", Invalid, no_email), ("2", Invalid, no_email)]).await;
    assert_eq!(
        (first.status.as_str(), first.invalid, first.accepted),
        ("degraded", 2, 0)
    );
    assert_eq!(
        accepted_now(w).await,
        [("1".into(), false), ("2".into(), false)]
    );
    let records = [
        ("1".to_owned(), no_email.to_owned()),
        ("2".to_owned(), no_email.to_owned()),
        ("3".to_owned(), no_email.to_owned()),
    ];
    assert_eq!(
        w.accept_invalid("users", &records[..2], Some("legacy rows"), false)
            .await
            .unwrap(),
        Acceptance {
            accepted: 2,
            ..Acceptance::default()
        }
    );
    assert_eq!(
        accepted_now(w).await,
        [("1".into(), true), ("2".into(), true)],
        "the rejections say so at once"
    );
    assert!(
        w.records(first.id)
            .await
            .unwrap()
            .iter()
            .all(|r| !r.accepted),
        "a run's records say what held when it ran"
    );

    // Key 1 stays invalid for its reason, key 2 is now invalid for another.
    let second = run_of(w, &[("1", Invalid, no_email), ("2", Invalid, malformed)]).await;
    assert_eq!(
        (second.status.as_str(), second.invalid, second.accepted),
        ("degraded", 2, 1)
    );
    let accepted: Vec<(String, bool)> = w
        .records(second.id)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.accepted))
        .collect();
    assert_eq!(accepted, [("1".into(), true), ("2".into(), false)]);
    // Key 2 back at the reason it was accepted for: a fresh invalid, its acceptance is over.
    let third = run_of(w, &[("1", Invalid, no_email), ("2", Invalid, no_email)]).await;
    assert_eq!((third.status.as_str(), third.accepted), ("degraded", 1));
    // Only accepted invalid records: the run succeeds, and still counts them.
    let fourth = run_of(w, &[("1", Invalid, no_email)]).await;
    assert_eq!(
        (fourth.status.as_str(), fourth.invalid, fourth.accepted),
        ("succeeded", 1, 1)
    );
    // Sent and confirmed: the acceptance is over.
    let fifth = run_of(w, &[("1", Confirmed, "")]).await;
    assert_eq!(fifth.status, RunStatus::Succeeded);
    let sixth = run_of(w, &[("1", Invalid, no_email)]).await;
    assert_eq!((sixth.status.as_str(), sixth.accepted), ("degraded", 0));
    // An acceptance read before a run that changed the record's outcome is not written: key 1
    // was confirmed since (another run), key 2 is invalid for another reason; key 3 has no
    // outcome at all.
    let changed = run_of(w, &[("1", Confirmed, ""), ("2", Invalid, malformed)]).await;
    assert_eq!(changed.status, RunStatus::Degraded);
    assert_eq!(
        w.accept_invalid("users", &records, None, true)
            .await
            .unwrap(),
        Acceptance {
            accepted: 0,
            outcome_changed: 3,
            in_loops: vec![],
        },
        "nothing is invalid for the reason accepted any more"
    );
    assert_eq!(accepted_now(w).await, [("2".into(), false)]);
    // Key 1 was sent and confirmed, then became invalid: Loops keeps the values it confirmed
    // while it stays so. Accepted only when that is said to be intended.
    let _ = run_of(w, &[("1", Invalid, no_email)]).await;
    assert_eq!(
        w.accept_invalid("users", &records[..1], None, false)
            .await
            .unwrap(),
        Acceptance {
            accepted: 0,
            outcome_changed: 0,
            in_loops: vec!["1".into()],
        }
    );
    assert_eq!(
        accepted_now(w).await,
        [("1".into(), false), ("2".into(), false)]
    );
    // unaccept: the next invalid outcome makes the run degraded again.
    assert_eq!(
        w.accept_invalid("users", &records[..1], None, true)
            .await
            .unwrap()
            .accepted,
        1
    );
    assert_eq!(
        w.unaccept_invalid("users", &["1".into(), "9".into()])
            .await
            .unwrap(),
        1
    );
    assert_eq!(w.unaccept_invalid("users", &["1".into()]).await.unwrap(), 0);
    let seventh = run_of(w, &[("1", Invalid, no_email)]).await;
    assert_eq!((seventh.status.as_str(), seventh.accepted), ("degraded", 0));
}

/// `adopt` confirms a record: Loops holds its contact now, so its acceptance ends (it writes no
/// outcome, so the outcome rule never sees it). The record invalid again is a fresh invalid.
async fn adoption_ends_an_acceptance(f: Fixture) {
    use OutcomeStatus::Invalid;
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    let no_email = "no email: the contact is identified by email";
    let _ = run_of(w, &[("1", Invalid, no_email), ("2", Invalid, no_email)]).await;
    let records = [
        ("1".to_owned(), no_email.to_owned()),
        ("2".to_owned(), no_email.to_owned()),
    ];
    assert_eq!(
        w.accept_invalid("users", &records, None, false)
            .await
            .unwrap()
            .accepted,
        2
    );
    let run = w.create_run("users").await.unwrap();
    w.adopt(
        "users",
        run,
        &[Adoption {
            key: "1".into(),
            fingerprint: "f1".into(),
            email: Some("one@example.com".into()),
            ..Adoption::default()
        }],
    )
    .await
    .unwrap();
    w.finish_adopt(run, &ExtractCounts::default())
        .await
        .unwrap();
    assert_eq!(
        accepted_now(w).await,
        [("1".into(), false), ("2".into(), true)],
        "only the adopted record's acceptance ends"
    );
    let again = run_of(w, &[("1", Invalid, no_email), ("2", Invalid, no_email)]).await;
    assert_eq!(
        (again.status.as_str(), again.invalid, again.accepted),
        ("degraded", 2, 1)
    );
}

#[tokio::test]
async fn postgres_adoption_ends_an_acceptance() {
    let Some(f) = postgres().await else { return };
    adoption_ends_an_acceptance(f).await;
}

#[tokio::test]
async fn sqlite_adoption_ends_an_acceptance() {
    adoption_ends_an_acceptance(sqlite()).await;
}

/// A record whose write was dead-lettered since its last confirmation may have its contact in
/// Loops (the answers lost, not the effect): accepting it invalid needs `in_loops_too`, as a
/// confirmed one does. A dead-letter before a confirmed removal no longer counts; a record
/// only ever invalid is not in Loops.
async fn a_lost_write_counts_as_in_loops(f: Fixture) {
    use OutcomeStatus::{DeadLettered, Invalid};
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    let s = spec("users", "users");
    let no_email = "no email: the contact is identified by email";
    // Key 3: confirmed, then a write lost, then its removal confirmed: a tombstone.
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.record_outcomes(&[confirmed(&s, run, "3", "f3")])
        .await
        .unwrap();
    w.finish_extract(run, &ExtractCounts::default())
        .await
        .unwrap();
    let _ = run_of(
        w,
        &[("1", DeadLettered, "lost"), ("3", DeadLettered, "lost")],
    )
    .await;
    let removed = w.create_run("users").await.unwrap();
    w.claim_run(removed, false).await.unwrap();
    let mut removal = confirmed(&s, removed, "3", "f3");
    removal.operation = "delete".into();
    w.record_outcomes(&[removal]).await.unwrap();
    w.finish_extract(removed, &ExtractCounts::default())
        .await
        .unwrap();
    let _ = run_of(
        w,
        &[
            ("1", Invalid, no_email),
            ("2", Invalid, no_email),
            ("3", Invalid, no_email),
        ],
    )
    .await;
    let records = ["1", "2", "3"].map(|k| (k.to_owned(), no_email.to_owned()));
    assert_eq!(
        w.accept_invalid("users", &records, None, false)
            .await
            .unwrap(),
        Acceptance {
            accepted: 2,
            outcome_changed: 0,
            in_loops: vec!["1".into()],
        }
    );
    assert_eq!(
        w.accept_invalid("users", &records[..1], None, true)
            .await
            .unwrap()
            .accepted,
        1,
        "accepted when the stale contact is intended"
    );
}

#[tokio::test]
async fn postgres_a_lost_write_counts_as_in_loops() {
    let Some(f) = postgres().await else { return };
    a_lost_write_counts_as_in_loops(f).await;
}

#[tokio::test]
async fn sqlite_a_lost_write_counts_as_in_loops() {
    a_lost_write_counts_as_in_loops(sqlite()).await;
}

#[tokio::test]
async fn postgres_accepting_invalid_records() {
    let Some(f) = postgres().await else { return };
    accepting_invalid_records(f).await;
}

#[tokio::test]
async fn sqlite_accepting_invalid_records() {
    accepting_invalid_records(sqlite()).await;
}

#[tokio::test]
async fn postgres_destinations_bind_and_reset() {
    let Some(f) = postgres().await else { return };
    destinations_bind_and_reset(f).await;
}

#[tokio::test]
async fn sqlite_destinations_bind_and_reset() {
    destinations_bind_and_reset(sqlite()).await;
}

/// The owners of contacts: the records confirmed with one of the identities asked, by their
/// email compared normalised or by their userId, asked 25 000 at a time. The identities are
/// asked in their sorted order, 10 000 a statement: the fillers `m00000@…`–`m24999@…` place the
/// three that match first (`a-one@…`), at 12 347 (`m12345z`) and at 22 225 (`m22222z`), one in
/// each statement.
async fn owners_are_found_by_email_or_user_id_among_many(f: Fixture) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    let s = spec("users", "users");
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    let mut outcomes = Vec::new();
    for (key, email, user_id) in [
        ("1", Some("A-One@Example.com"), None),
        ("2", None, Some("m12345z")),
        ("3", Some("three@example.com"), Some("m22222z")),
        ("4", Some("four@example.com"), None),
    ] {
        let mut o = confirmed(&s, run, key, "f");
        o.email = email.map(str::to_owned);
        o.user_id = user_id.map(str::to_owned);
        outcomes.push(o);
    }
    w.record_outcomes(&outcomes).await.unwrap();
    let mut asked: Vec<String> = (0..25_000)
        .map(|i| format!("m{i:05}@example.com"))
        .collect();
    asked.extend(["m22222z", "a-one@example.com", "m12345z", "m12345z"].map(String::from));
    let owners = w.owners("users", &asked).await.unwrap();
    assert_eq!(
        owners,
        [
            ("1".into(), Some("A-One@Example.com".into()), None),
            ("2".into(), None, Some("m12345z".into())),
            (
                "3".into(),
                Some("three@example.com".into()),
                Some("m22222z".into())
            ),
        ]
    );
    assert!(w.owners("others", &asked).await.unwrap().is_empty());
}

#[tokio::test]
async fn postgres_owners_are_found_by_email_or_user_id_among_many() {
    let Some(f) = postgres().await else { return };
    owners_are_found_by_email_or_user_id_among_many(f).await;
}

#[tokio::test]
async fn sqlite_owners_are_found_by_email_or_user_id_among_many() {
    owners_are_found_by_email_or_user_id_among_many(sqlite()).await;
}

/// A shared rate budget's row: none at first, created once (a second create loses), then
/// swapped only at the revision read, with the writer's clock beside the due time; one row per
/// budget.
async fn rate_slots_swap_at_their_revision(f: Fixture) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    let slot = |next_due, written_at, revision| {
        Some(RateSlot {
            next_due,
            written_at,
            revision,
        })
    };
    assert_eq!(w.read_rate_slot("team").await.unwrap(), None);
    assert_eq!(
        w.swap_rate_slot("team", 100, 90, None).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        w.swap_rate_slot("team", 200, 190, None).await.unwrap(),
        None
    );
    assert_eq!(
        w.swap_rate_slot("team", 200, 190, Some(2)).await.unwrap(),
        None
    );
    assert_eq!(w.read_rate_slot("team").await.unwrap(), slot(100, 90, 1));
    assert_eq!(
        w.swap_rate_slot("team", 200, 190, Some(1)).await.unwrap(),
        Some(2)
    );
    assert_eq!(w.read_rate_slot("team").await.unwrap(), slot(200, 190, 2));
    assert_eq!(w.read_rate_slot("other").await.unwrap(), None);
    let big = 1_800_000_000_000_000_000i64;
    assert_eq!(
        w.swap_rate_slot("team", big, big - 5, Some(2))
            .await
            .unwrap(),
        Some(3)
    );
    assert_eq!(
        w.read_rate_slot("team").await.unwrap(),
        slot(big, big - 5, 3)
    );
}

#[tokio::test]
async fn postgres_rate_slots_swap_at_their_revision() {
    let Some(f) = postgres().await else { return };
    rate_slots_swap_at_their_revision(f).await;
}

#[tokio::test]
async fn sqlite_rate_slots_swap_at_their_revision() {
    rate_slots_swap_at_their_revision(sqlite()).await;
}

/// A lock loopsync waits for too long is a retryable error that says so, never a silent hang.
#[tokio::test]
async fn postgres_lock_waits_time_out_retryably() {
    let Some(f) = postgres().await else { return };
    f.warehouse.prepare().await.unwrap();
    // Another session holds the runs table exclusively (say, someone's maintenance).
    (f.exec)("BEGIN; LOCK TABLE loopsync.runs IN ACCESS EXCLUSIVE MODE;".into()).await;
    let started = std::time::Instant::now();
    let error = f.warehouse.runs(None, 10).await.unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(error.class(), ErrorClass::RETRY, "{error}");
    assert!(
        error
            .to_string()
            .contains("waited 10s for a lock another session holds"),
        "{error}"
    );
    (f.exec)("COMMIT;".into()).await;
    assert!(f.warehouse.runs(None, 10).await.is_ok());
}

/// Two processes start on a state whose tables are not current (a fresh database, an upgrade):
/// the one that waited for the other's schema creation finds the tables current under the lock
/// and runs no DDL. Before, it ran its ALTER TABLEs anyway; they queued behind the first
/// process's run, which was already reading the state, and timed out (or wedged that run).
#[tokio::test]
async fn postgres_a_process_that_waited_for_the_schema_runs_no_ddl() {
    let Some(database) = loopsync_testkit::TestDatabase::create().await else {
        return;
    };
    let session = || async {
        let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    };
    let first = connect(&database.url).await.unwrap();
    first.prepare().await.unwrap();
    // An older version is recorded; a process (`creator`) holds the schema lock and is about
    // to record the current one, as a process migrating the tables would.
    let creator = session().await;
    let latest = crate::schema::LATEST;
    creator
        .batch_execute(&format!(
            "DELETE FROM loopsync.migrations WHERE version = {latest}"
        ))
        .await
        .unwrap();
    creator
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(735560801);
             INSERT INTO loopsync.migrations (version, name) VALUES ({latest}, 'again');"
        ))
        .await
        .unwrap();
    // The second process sees the older version and waits for the lock.
    let second = connect(&database.url).await.unwrap();
    let waiting = tokio::spawn(async move { second.prepare().await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    if waiting.is_finished() {
        panic!(
            "waits for the schema lock: {:?}",
            waiting.await.unwrap().err()
        );
    }
    // Meanwhile the creator's run reads the state (its diff), then the creator commits.
    let reader = session().await;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM loopsync.state;")
        .await
        .unwrap();
    creator.batch_execute("COMMIT;").await.unwrap();
    let started = std::time::Instant::now();
    let prepared = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
        .await
        .expect("prepare answered")
        .unwrap();
    prepared.expect("the tables are current: no DDL, no wait behind the read");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "no lock wait: {:?}",
        started.elapsed()
    );
    reader.batch_execute("COMMIT;").await.unwrap();
}

/// The stored names, the JSON names and `as_str` are one set: rows written before the enum read
/// back, and `runs --json` prints what it printed.
#[test]
fn run_statuses_read_what_they_write() {
    use crate::RunStatus;
    for status in [
        RunStatus::Requested,
        RunStatus::Extracting,
        RunStatus::Sending,
        RunStatus::Succeeded,
        RunStatus::Degraded,
        RunStatus::Failed,
        RunStatus::Adopted,
        RunStatus::Interrupted,
    ] {
        assert_eq!(status.as_str().parse::<RunStatus>(), Ok(status));
        assert_eq!(
            serde_json::to_value(status).unwrap(),
            serde_json::json!(status.as_str())
        );
        assert_eq!(
            status.is_finished(),
            !matches!(status.as_str(), "requested" | "extracting" | "sending")
        );
    }
    assert_eq!(format!("{:<12}|", RunStatus::Failed), "failed      |");
    assert!("done".parse::<RunStatus>().is_err());
}

/// An event sync over a table `ev` of five events, one with a NULL time.
fn events_spec() -> SyncSpec {
    use loopsync_core::spec::{AppendSpec, Cursor, EventName};
    SyncSpec {
        name: "ev".into(),
        model: "select id, email, at from ev".into(),
        behavior: Behavior::Append,
        properties: vec![MappedProperty {
            property: "email".into(),
            column: "email".into(),
            kind: PropertyKind::String,
        }],
        lists: vec![],
        append: Some(AppendSpec {
            event: EventName::Fixed("paid".into()),
            event_properties: vec![],
            cursor: Some(Cursor {
                column: "at".into(),
                lookback_ms: 0,
            }),
        }),
        ..spec("ev", "ev")
    }
}

/// An event sync's diff: every row, or with `since` the rows at or after it and those whose
/// cursor is NULL; many rows may share an email; a key that left the model is not in it (an
/// event sync removes nothing). Its watermark is the highest cursor of its last finished run,
/// and a reset forgets it.
async fn event_windows(f: Fixture, timestamp: &str) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(format!(
        "CREATE TABLE ev (id integer, email text, at {timestamp});
         INSERT INTO ev VALUES (1, 'a@x.co', '2026-01-01 10:00:00'), (2, 'a@x.co', '2026-01-01 11:00:00'),
                               (3, 'b@x.co', '2026-01-01 12:00:00'), (4, 'a@x.co', '2026-01-02 09:30:00'),
                               (5, 'a@x.co', NULL), (6, 'b@x.co', '2026-01-03 10:00:00+00');"
    ))
    .await;
    let spec = events_spec();
    let all = diff(w, &spec).await;
    assert_eq!(all.len(), 6);
    assert!(all.iter().all(|r| r.email_rows == 1), "{all:?}");
    let since = loopsync_core::value::parse_date_millis("2026-01-01 11:00:00").unwrap();
    let keys =
        |rows: Vec<DiffRow>| -> Vec<String> { rows.into_iter().map(|r| r.key.unwrap()).collect() };
    let recent: Vec<DiffRow> = w
        .diff_since(&spec, Some(since))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    // 6's offset `+00` is no time to SQLite's julianday: read (for the extractor to judge), not
    // dropped.
    assert_eq!(keys(recent), ["2", "3", "4", "5", "6"]);
    // A run that confirms event 1, which then leaves the model.
    assert_eq!(w.cursor_watermark("ev", "at").await.unwrap(), None);
    let run = w.create_run("ev").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.mark_emitted("ev", run, &[("1".into(), "fp1".into())])
        .await
        .unwrap();
    let high = loopsync_core::value::parse_date_millis("2026-01-02 09:30:00").unwrap();
    let counts = ExtractCounts {
        added: 1,
        ignored: 2,
        cursor_high: Some(high),
        cursor_column: Some("at".into()),
        ..ExtractCounts::default()
    };
    w.finish_extract(run, &counts).await.unwrap();
    assert_eq!(
        w.cursor_watermark("ev", "at").await.unwrap(),
        None,
        "not before the run has finished"
    );
    w.record_outcomes(&[confirmed(&spec, run, "1", "fp1")])
        .await
        .unwrap();
    let summary = w.run(run).await.unwrap().unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(summary.ignored, 2);
    assert_eq!(w.cursor_watermark("ev", "at").await.unwrap(), Some(high));
    assert_eq!(
        w.cursor_watermark("ev", "created_at").await.unwrap(),
        None,
        "another column's watermark is not this one's"
    );
    // A run whose event was dead-lettered does not move the watermark: the next run reads from
    // where it stood, and retries the event.
    let failed = w.create_run("ev").await.unwrap();
    w.claim_run(failed, false).await.unwrap();
    w.mark_emitted("ev", failed, &[("2".into(), "fp2".into())])
        .await
        .unwrap();
    let later = ExtractCounts {
        added: 1,
        cursor_high: Some(high + 3_600_000),
        cursor_column: Some("at".into()),
        ..ExtractCounts::default()
    };
    w.finish_extract(failed, &later).await.unwrap();
    let mut dead = confirmed(&spec, failed, "2", "fp2");
    dead.status = OutcomeStatus::DeadLettered;
    w.record_outcomes(&[dead]).await.unwrap();
    let summary = w.run(failed).await.unwrap().unwrap();
    assert_eq!(summary.status, RunStatus::Degraded);
    assert_eq!(w.cursor_watermark("ev", "at").await.unwrap(), Some(high));
    (f.exec)("DELETE FROM ev WHERE id = 1".into()).await;
    let rows = diff(w, &spec).await;
    assert_eq!(keys(rows), ["2", "3", "4", "5", "6"], "no removal");
    w.reset_state("ev").await.unwrap();
    assert_eq!(w.cursor_watermark("ev", "at").await.unwrap(), None);
}

#[tokio::test]
async fn postgres_event_windows() {
    if let Some(f) = postgres().await {
        event_windows(f, "timestamptz").await;
    }
}

#[tokio::test]
async fn postgres_event_windows_without_time_zone() {
    if let Some(f) = postgres().await {
        event_windows(f, "timestamp").await;
    }
}

#[tokio::test]
async fn sqlite_event_windows() {
    event_windows(sqlite(), "text").await;
}

/// A cursor PostgreSQL cannot compare as a time (a number) fails the model's check, before
/// any run; a time column passes.
#[tokio::test]
async fn postgres_a_numeric_cursor_fails_the_check() {
    let Some(f) = postgres().await else {
        return;
    };
    f.warehouse.prepare().await.unwrap();
    (f.exec)("CREATE TABLE ev (id integer, email text, at bigint, ts timestamptz);".into()).await;
    let mut spec = events_spec();
    let e = f.warehouse.check_model(&spec).await.unwrap_err();
    assert!(matches!(e, WarehouseError::Model { .. }), "{e}");
    spec.model = "select id, email, ts as at from ev".into();
    f.warehouse.check_model(&spec).await.unwrap();
}

async fn changes(w: &dyn Warehouse, spec: &SyncSpec) -> Vec<DiffRow> {
    changes_since(w, spec, None).await
}

/// What `diff_changes` yields from `since` (a contact sync with a cursor: incrementally).
async fn changes_since(w: &dyn Warehouse, spec: &SyncSpec, since: Option<i64>) -> Vec<DiffRow> {
    w.diff_changes(spec, since)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// What `diff_changes` reads out, by key: (key, email_rows, present); the count of what it left
/// out last.
fn read_out(rows: &[DiffRow]) -> (Vec<(String, i64, bool)>, i64) {
    let untold = rows
        .iter()
        .filter(|r| r.is_untold())
        .map(|r| r.unchanged_untold)
        .sum();
    let keys = rows
        .iter()
        .filter(|r| !r.is_untold())
        .map(|r| (r.key.clone().unwrap(), r.email_rows, r.values.is_some()))
        .collect();
    (keys, untold)
}

#[tokio::test]
async fn postgres_unchanged_rows_are_left_out_until_they_change() {
    let Some(f) = postgres().await else { return };
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(
        "CREATE TABLE users (id integer, email text, first_name text, newsletter boolean);
         INSERT INTO users VALUES (1, 'a@x.co', 'Ann', true), (2, 'b@x.co', 'Bea', true),
                                  (3, 'c@x.co', 'Cy', false), (4, 'd@x.co', 'Di', NULL);"
            .into(),
    )
    .await;
    let spec = spec("users", "users");
    let run = w.create_run("users").await.unwrap();
    // Nothing noted: every row is read out, with its hash, and nothing is left out.
    let rows = changes(w, &spec).await;
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r.model_hash.is_some() && !r.is_untold())
    );
    let full = diff(w, &spec).await;
    assert!(
        full.iter().all(|r| r.model_hash.is_none()),
        "diff computes no hash"
    );
    // Confirmed and noted at their fingerprints.
    let mut notes = Vec::new();
    for row in &rows {
        let fp = spec.fingerprint(row.values.as_ref().unwrap());
        let key = row.key.clone().unwrap();
        w.record_outcomes(&[confirmed(&spec, run, &key, &fp)])
            .await
            .unwrap();
        let email = row.values.as_ref().unwrap()["email"].clone();
        notes.push(Unchanged {
            key,
            fingerprint: fp,
            model_hash: row.model_hash.unwrap(),
            email,
        });
    }
    // A note at a fingerprint Loops did not confirm is not kept.
    let mut stale = notes[0].clone();
    stale.fingerprint = "another".into();
    w.note_unchanged("users", &[stale]).await.unwrap();
    assert_eq!(read_out(&changes(w, &spec).await).1, 0);
    w.note_unchanged("users", &notes).await.unwrap();
    assert_eq!(read_out(&changes(w, &spec).await), (vec![], 4));

    // 2 changes, 4 leaves, 5 comes with 1's email (another case, blanks around it), 3 is
    // confirmed at another fingerprint (its note no longer holds).
    (f.exec)(
        "UPDATE users SET first_name = 'Bee' WHERE id = 2;
         DELETE FROM users WHERE id = 4;
         INSERT INTO users VALUES (5, ' A@X.co', 'Al', true);"
            .into(),
    )
    .await;
    w.record_outcomes(&[confirmed(&spec, run, "3", "elsewhere")])
        .await
        .unwrap();
    let (keys, untold) = read_out(&changes(w, &spec).await);
    assert_eq!(
        keys,
        vec![
            // Row 1 is unchanged, but row 5 takes its email: both are read out, so that both
            // are found duplicates, as the plain diff finds them.
            ("1".to_owned(), 2, true),
            ("2".to_owned(), 1, true),
            ("3".to_owned(), 1, true),
            ("4".to_owned(), 1, false),
            ("5".to_owned(), 2, true),
        ]
    );
    assert_eq!(untold, 0, "nothing is left out");
    // Each row read out carries what the full diff says of it.
    let full = diff(w, &spec).await;
    for row in changes(w, &spec).await.iter().filter(|r| !r.is_untold()) {
        let same = full.iter().find(|r| r.key == row.key).unwrap();
        assert_eq!(
            (&row.values, &row.confirmed_fp, row.generation),
            (&same.values, &same.confirmed_fp, same.generation)
        );
    }

    // Key 2 duplicated, one copy exactly its noted row: both copies are read out, so that the
    // key is invalid as the plain diff finds it (the other copy alone would be a re-key).
    (f.exec)("UPDATE users SET first_name = 'Bea' WHERE id = 2;".into()).await;
    w.note_unchanged("users", &notes[1..2]).await.unwrap();
    assert!(
        read_out(&changes(w, &spec).await)
            .0
            .iter()
            .all(|(k, _, _)| k != "2"),
        "2 is noted again"
    );
    (f.exec)("INSERT INTO users VALUES (2, 'b2@x.co', 'Bea', true);".into()).await;
    let twice: Vec<DiffRow> = changes(w, &spec)
        .await
        .into_iter()
        .filter(|r| r.key.as_deref() == Some("2"))
        .collect();
    assert_eq!(twice.len(), 2, "both copies of key 2: {twice:?}");
    (f.exec)("DELETE FROM users WHERE id = 2 AND email = 'b2@x.co';".into()).await;

    // Another mapping: nothing noted holds.
    let mut other = spec.clone();
    other.event_on_create = "created".into();
    let (keys, untold) = read_out(&changes(w, &other).await);
    assert_eq!((keys.len(), untold), (5, 0));
    // A reset forgets the notes.
    w.reset_state("users").await.unwrap();
    assert_eq!(read_out(&changes(w, &spec).await).1, 0);
}

/// A model read from MySQL beside a state store: the diff as on one warehouse (byte order of
/// keys, NULL keys last, one email rule), the model checked on MySQL, an event sync's cursor
/// compared as a time in the store, and on PostgreSQL the rows noted unchanged left out.
async fn a_mysql_model_beside(state: Fixture) {
    let Some(db) = loopsync_testkit::TestMySql::create().await else {
        return;
    };
    db.exec(
        "CREATE TABLE users (id integer, email varchar(255), first_name varchar(255), newsletter boolean);
         INSERT INTO users VALUES (2, 'b@x.co', 'Bea', true), (10, 'j@x.co', NULL, NULL),
             (1, 'a@x.co', 'Ann', true), (3, 'c@x.co', 'Cy', false), (3, ' C@x.co', 'Cy2', true),
             (NULL, 'n@x.co', 'Nil', true);
         CREATE TABLE ev (id integer, email varchar(255), at datetime);
         INSERT INTO ev VALUES (1, 'a@x.co', '2026-01-01 10:00:00'),
             (2, 'a@x.co', '2026-01-01 11:00:00'), (3, 'b@x.co', NULL);",
    )
    .await;
    // The deployment of a source and a store, as `[warehouse] url` and `state` open it.
    let w = crate::open(&crate::Settings {
        url: db.url.clone(),
        state: Some(state.url.clone()),
        state_schema: state.schema.clone(),
    })
    .await
    .unwrap();
    w.prepare().await.unwrap();
    let spec = spec("users", "users");
    w.check_model(&spec).await.unwrap();
    let mut wrong = spec.clone();
    wrong.model = "select id, email from users".into();
    let e = w.check_model(&wrong).await.unwrap_err();
    assert!(
        matches!(&e, WarehouseError::Model { detail, .. } if detail.contains("first_name")),
        "{e}"
    );
    let rows = diff(&*w, &spec).await;
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key.as_deref()).collect();
    assert_eq!(
        keys,
        [Some("1"), Some("10"), Some("2"), Some("3"), Some("3"), None]
    );
    let values = rows[0].values.as_ref().unwrap();
    assert_eq!(
        (
            values["first_name"].as_deref(),
            values["newsletter"].as_deref()
        ),
        (Some("Ann"), Some("1"))
    );
    assert_eq!(rows[1].values.as_ref().unwrap()["first_name"], None);
    assert_eq!(
        rows.iter().map(|r| r.email_rows).collect::<Vec<_>>(),
        [1, 1, 1, 2, 2, 1],
        "c@x.co and ` C@x.co` are one email"
    );

    let since = loopsync_core::value::parse_date_millis("2026-01-01 11:00:00").unwrap();
    let recent: Vec<DiffRow> = w
        .diff_since(&events_spec(), Some(since))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let keys: Vec<&str> = recent.iter().map(|r| r.key.as_deref().unwrap()).collect();
    assert_eq!(keys, ["2", "3"], "at or after the cursor, or NULL");

    if state.sqlite {
        return;
    }
    // Confirmed at fp1 and noted unchanged: the next diff leaves it out and counts it.
    let run = w.create_run("users").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.mark_emitted("users", run, &[("1".into(), "fp1".into())])
        .await
        .unwrap();
    w.record_outcomes(&[confirmed(&spec, run, "1", "fp1")])
        .await
        .unwrap();
    let first = changes(&*w, &spec).await;
    let one = first
        .iter()
        .find(|r| r.key.as_deref() == Some("1"))
        .unwrap();
    w.note_unchanged(
        "users",
        &[Unchanged {
            key: "1".into(),
            fingerprint: "fp1".into(),
            model_hash: one.model_hash.expect("hashed in the store"),
            email: Some("a@x.co".into()),
        }],
    )
    .await
    .unwrap();
    let second = changes(&*w, &spec).await;
    assert_eq!(second.len(), 6, "5 keys read out and the count: {second:?}");
    assert!(second.iter().all(|r| r.key.as_deref() != Some("1")));
    assert_eq!(second.last().unwrap().unchanged_untold, 1);
}

#[tokio::test]
async fn a_mysql_model_beside_postgres_state() {
    let Some(f) = postgres().await else { return };
    a_mysql_model_beside(f).await;
}

#[tokio::test]
async fn a_mysql_model_beside_sqlite_state() {
    a_mysql_model_beside(sqlite()).await;
}

/// A sync's diff holds its own state only: another sync's confirmed keys are not removals.
async fn a_diff_reads_its_own_syncs_state(f: Fixture) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(
        "CREATE TABLE users (id integer, email text, first_name text, newsletter boolean);
         INSERT INTO users VALUES (1, 'a@x.co', 'Ann', NULL);"
            .into(),
    )
    .await;
    let other = spec("other", "users");
    let run = w.create_run("other").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.mark_emitted("other", run, &[("9".into(), "fp9".into())])
        .await
        .unwrap();
    w.record_outcomes(&[confirmed(&other, run, "9", "fp9")])
        .await
        .unwrap();
    let rows = diff(w, &spec("users", "users")).await;
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key.as_deref()).collect();
    assert_eq!(keys, [Some("1")]);
    let rows = diff(w, &other).await;
    let keys: Vec<Option<&str>> = rows.iter().map(|r| r.key.as_deref()).collect();
    assert_eq!(
        keys,
        [Some("1"), Some("9")],
        "9 is the other sync's, removed"
    );
}

#[tokio::test]
async fn postgres_a_diff_reads_its_own_syncs_state() {
    let Some(f) = postgres().await else { return };
    a_diff_reads_its_own_syncs_state(f).await;
}

#[tokio::test]
async fn sqlite_a_diff_reads_its_own_syncs_state() {
    a_diff_reads_its_own_syncs_state(sqlite()).await;
}

/// Two rows with one userId are counted as the transformer sends userIds: trimmed of white
/// space, and an empty one is none (so rows without a userId are not duplicates of each other).
async fn user_ids_are_counted_as_sent(f: Fixture) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(
        "CREATE TABLE uid (id integer, email text, user_id text, first_name text, newsletter text);
         INSERT INTO uid VALUES (1, 'a@x.co', 'u1', 'A', NULL), (2, 'b@x.co', ' u1 ', 'B', NULL),
                                (3, 'c@x.co', '', 'C', NULL), (4, 'd@x.co', '  ', 'D', NULL),
                                (5, 'e@x.co', NULL, 'E', NULL), (6, 'f@x.co', 'u6', 'F', NULL);"
            .to_owned(),
    )
    .await;
    let mut spec = spec("uid", "uid");
    spec.model = "select id, email, user_id, first_name, newsletter from uid".into();
    spec.properties.push(MappedProperty {
        property: "userId".into(),
        column: "user_id".into(),
        kind: PropertyKind::String,
    });
    let counts: Vec<(String, i64)> = diff(w, &spec)
        .await
        .into_iter()
        .map(|r| (r.key.unwrap(), r.user_id_rows))
        .collect();
    assert_eq!(
        counts,
        [
            ("1".to_owned(), 2),
            ("2".to_owned(), 2),
            ("3".to_owned(), 1),
            ("4".to_owned(), 1),
            ("5".to_owned(), 1),
            ("6".to_owned(), 1),
        ]
    );
}

#[tokio::test]
async fn postgres_user_ids_are_counted_as_sent() {
    if let Some(f) = postgres().await {
        user_ids_are_counted_as_sent(f).await;
    }
}

#[tokio::test]
async fn sqlite_user_ids_are_counted_as_sent() {
    user_ids_are_counted_as_sent(sqlite()).await;
}

/// A run extracted again (after a warehouse error) while its row changed emits a second
/// version in the same run: until Loops confirms that one, the record is unsure, as with a
/// version of a later run (else a row back at the confirmed values would be found unchanged
/// while Loops may hold the second version).
async fn a_second_version_of_one_run_is_unsure(f: Fixture) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(
        "CREATE TABLE again (id integer, email text, first_name text, newsletter text);
         INSERT INTO again VALUES (1, 'a@x.co', 'A', NULL);"
            .to_owned(),
    )
    .await;
    let spec = spec("again", "again");
    let unsure = async || diff(w, &spec).await[0].unsure;
    let run = w.create_run("again").await.unwrap();
    w.claim_run(run, false).await.unwrap();
    w.mark_emitted("again", run, &[("1".into(), "fp1".into())])
        .await
        .unwrap();
    assert!(unsure().await, "emitted, not confirmed");
    w.record_outcomes(&[confirmed(&spec, run, "1", "fp1")])
        .await
        .unwrap();
    assert!(!unsure().await, "confirmed");
    w.mark_emitted("again", run, &[("1".into(), "fp2".into())])
        .await
        .unwrap();
    assert!(unsure().await, "another version of the same run");
    w.record_outcomes(&[confirmed(&spec, run, "1", "fp2")])
        .await
        .unwrap();
    assert!(!unsure().await, "that one confirmed");
}

#[tokio::test]
async fn postgres_a_second_version_of_one_run_is_unsure() {
    if let Some(f) = postgres().await {
        a_second_version_of_one_run_is_unsure(f).await;
    }
}

#[tokio::test]
async fn sqlite_a_second_version_of_one_run_is_unsure() {
    a_second_version_of_one_run_is_unsure(sqlite()).await;
}

/// A confirmed unsubscribe leaves a tombstone that re-subscribes the row that returns; a
/// record released (it left, its contact another record's now: nothing sent) does not.
async fn only_an_unsubscribe_marks_a_resubscribe(f: Fixture) {
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(
        "CREATE TABLE gone (id integer, email text, first_name text, newsletter text);
         INSERT INTO gone VALUES (1, 'a@x.co', 'A', NULL), (2, 'b@x.co', 'B', NULL);"
            .to_owned(),
    )
    .await;
    let spec = spec("gone", "gone");
    let run = w.create_run("gone").await.unwrap();
    w.record_outcomes(&[
        confirmed(&spec, run, "1", "f1"),
        confirmed(&spec, run, "2", "f2"),
    ])
    .await
    .unwrap();
    let removed = |key: &str, operation: &str| {
        Outcome::new("gone", run, key, "f", OutcomeStatus::Confirmed, operation)
    };
    w.record_outcomes(&[removed("1", "unsubscribe"), removed("2", crate::RELEASE)])
        .await
        .unwrap();
    let rows = diff(w, &spec).await;
    let marks: Vec<(Option<String>, bool, bool)> = rows
        .iter()
        .map(|r| (r.key.clone(), r.confirmed_fp.is_some(), r.resubscribe))
        .collect();
    assert_eq!(
        marks,
        [
            (Some("1".to_owned()), false, true),
            (Some("2".to_owned()), false, false)
        ]
    );
}

#[tokio::test]
async fn postgres_only_an_unsubscribe_marks_a_resubscribe() {
    if let Some(f) = postgres().await {
        only_an_unsubscribe_marks_a_resubscribe(f).await;
    }
}

#[tokio::test]
async fn sqlite_only_an_unsubscribe_marks_a_resubscribe() {
    only_an_unsubscribe_marks_a_resubscribe(sqlite()).await;
}

/// Loops confirms each row read out in `run`, and each is noted unchanged: the notes.
async fn confirm_and_note(
    w: &dyn Warehouse,
    spec: &SyncSpec,
    run: i64,
    rows: &[DiffRow],
) -> Vec<Unchanged> {
    let mut notes = Vec::new();
    for row in rows.iter().filter(|r| !r.is_untold()) {
        let fp = spec.fingerprint(row.values.as_ref().unwrap());
        let key = row.key.clone().unwrap();
        w.record_outcomes(&[confirmed(spec, run, &key, &fp)])
            .await
            .unwrap();
        notes.push(Unchanged {
            key,
            fingerprint: fp,
            model_hash: row.model_hash.unwrap(),
            email: row.values.as_ref().unwrap()["email"].clone(),
        });
    }
    w.note_unchanged(&spec.name, &notes).await.unwrap();
    notes
}

/// A contact sync with a cursor (`updated_at`).
fn cursored_spec() -> SyncSpec {
    let mut spec = spec("users", "users");
    spec.model = "select id, email, first_name, newsletter, updated_at from users".into();
    spec.incremental = Some(loopsync_core::spec::Incremental {
        cursor: loopsync_core::spec::Cursor {
            column: "updated_at".into(),
            lookback_ms: 0,
        },
        full_diff_every_ms: 86_400_000,
    });
    spec
}

/// A contact sync's incremental diff (PostgreSQL): it reads the rows at or after `since` (a
/// NULL cursor too) and every row the state has not noted unchanged, wherever its cursor is;
/// it takes the other rows to be as noted (their emails still count), so it finds no removal
/// and no row changed without its cursor, which the full diff finds. The highest cursor it
/// went through, not after now, comes in its last row.
#[tokio::test]
async fn postgres_an_incremental_diff_reads_the_window_and_what_is_not_noted() {
    let Some(f) = postgres().await else { return };
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(
        "CREATE TABLE users (id integer, email text, first_name text, newsletter boolean,
                             updated_at timestamptz);
         INSERT INTO users SELECT i, 'u' || i || '@x.co', 'N' || i, true, '2026-01-01T00:00:00Z'
           FROM generate_series(1, 5) AS i;"
            .into(),
    )
    .await;
    let spec = cursored_spec();
    assert!(w.diffs_incrementally(&spec));
    let mut by_user_id = spec.clone();
    by_user_id.properties.push(MappedProperty {
        property: "userId".into(),
        column: "id".into(),
        kind: PropertyKind::String,
    });
    assert!(
        !w.diffs_incrementally(&by_user_id),
        "its userIds are counted in full"
    );
    let run = w.create_run("users").await.unwrap();
    // Nothing noted yet: every row read out, and the last row carries the highest cursor (a
    // sync that may diff incrementally always reads this way: its watermark is the
    // warehouse's).
    let rows = changes(w, &spec).await;
    let tail = rows.last().unwrap();
    assert_eq!(
        tail.cursor_high,
        loopsync_core::value::parse_date_millis("2026-01-01T00:00:00Z"),
        "{rows:?}"
    );
    let rows: Vec<DiffRow> = rows.into_iter().filter(|r| !r.is_untold()).collect();
    assert_eq!(rows.len(), 5);
    assert!(
        rows.iter()
            .all(|r| r.values.as_ref().unwrap()["updated_at"].is_some())
    );
    confirm_and_note(w, &spec, run, &rows).await;
    // 2 changes with its cursor, and a second copy of 2 comes as it was noted, its cursor
    // old; 3 changes without its cursor; 4 leaves; 5 is confirmed at another fingerprint (no
    // longer noted); 6 comes with 1's email; 7 has no cursor; 8 is dated 2099; 9, with an old
    // cursor, was found invalid; 10 comes with 9's email; 11 with 4's (4 left).
    (f.exec)(
        "UPDATE users SET first_name = 'Two', updated_at = '2026-02-01T00:00:00Z' WHERE id = 2;
         UPDATE users SET first_name = 'Three' WHERE id = 3;
         DELETE FROM users WHERE id = 4;
         INSERT INTO users VALUES (6, 'U1@x.co', 'Six', true, '2026-02-01T00:00:00Z'),
                                  (7, 'u7@x.co', 'Seven', true, NULL),
                                  (8, 'u8@x.co', 'Eight', true, '2099-01-01T00:00:00Z'),
                                  (2, 'u2@x.co', 'N2', true, '2026-01-01T00:00:00Z'),
                                  (9, 'u9@x.co', 'Nine', true, '2026-01-01T00:00:00Z'),
                                  (10, ' U9@x.co', 'Ten', true, '2026-02-01T00:00:00Z'),
                                  (11, 'u4@x.co', 'Eleven', true, '2026-02-01T00:00:00Z');"
            .into(),
    )
    .await;
    w.record_outcomes(&[confirmed(&spec, run, "5", "elsewhere")])
        .await
        .unwrap();
    // 9 was found invalid (a run read it: its cursor was in the window then).
    w.record_outcomes(&[Outcome::invalid("users", run, "9", "", "a reason")])
        .await
        .unwrap();
    let since = loopsync_core::value::parse_date_millis("2026-01-15T00:00:00Z");
    let incremental: Vec<DiffRow> = changes_since(w, &spec, since).await;
    let (keys, untold) = read_out(&incremental);
    // Read: the window, the keys not noted (5, and 9: so 10 is a duplicate), and outside
    // the window the rows sharing a key or a noted email with a row read out, as the full
    // diff reads them: the copy of 2 (a duplicate key), 1 (6's email: a duplicate). 4's
    // noted email does not count: its row left, so 11 is no duplicate.
    assert_eq!(
        keys,
        vec![
            ("1".to_owned(), 2, true),
            ("10".to_owned(), 2, true),
            ("11".to_owned(), 1, true),
            // Two rows, one email: as the plain diff counts it.
            ("2".to_owned(), 2, true),
            ("2".to_owned(), 2, true),
            ("5".to_owned(), 1, true),
            ("6".to_owned(), 2, true),
            ("7".to_owned(), 1, true),
            ("8".to_owned(), 1, true),
            ("9".to_owned(), 2, true),
        ]
    );
    // Noted: 1, 2, 3, 4; of them 1 and 2 were read out.
    assert_eq!(untold, 2);
    let tail = incremental.iter().find(|r| r.is_untold()).unwrap();
    assert_eq!(
        tail.cursor_high,
        loopsync_core::value::parse_date_millis("2026-02-01T00:00:00Z"),
        "2099 is after now"
    );
    // The full diff finds the rest: 1 (its email is 6's), 3 changed, 4 removed; its highest
    // cursor is of every row, 2099 left out.
    let full = changes(w, &spec).await;
    let tail = full.iter().find(|r| r.is_untold()).unwrap();
    assert_eq!(
        tail.cursor_high,
        loopsync_core::value::parse_date_millis("2026-02-01T00:00:00Z")
    );
    let (keys, _) = read_out(&full);
    let keys: Vec<(String, bool)> = keys.into_iter().map(|(k, _, p)| (k, p)).collect();
    for key in ["1", "2", "3", "5", "6", "7", "8"] {
        assert!(keys.contains(&(key.to_owned(), true)), "{key}: {keys:?}");
    }
    assert!(keys.contains(&("4".to_owned(), false)), "{keys:?}");
    // A confirmation at a new fingerprint forgets the note: the row is read wherever its
    // cursor is (as is one whose version was published, its answer perhaps lost).
    let fp2 = spec.fingerprint(
        incremental
            .iter()
            .filter_map(|r| r.values.as_ref().filter(|_| r.key.as_deref() == Some("2")))
            .find(|v| v["first_name"].as_deref() == Some("Two"))
            .unwrap(),
    );
    w.record_outcomes(&[confirmed(&spec, run, "2", &fp2)])
        .await
        .unwrap();
    // So does an invalid outcome: 3's row is read again wherever its cursor is.
    w.record_outcomes(&[Outcome::invalid("users", run, "3", "", "a reason")])
        .await
        .unwrap();
    let far = loopsync_core::value::parse_date_millis("2098-01-01T00:00:00Z");
    let (keys, _) = read_out(&changes_since(w, &spec, far).await);
    let keys: Vec<&str> = keys.iter().map(|(k, _, _)| k.as_str()).collect();
    assert!(
        keys.contains(&"2") && keys.contains(&"3") && keys.contains(&"5"),
        "{keys:?}"
    );
    assert!(!keys.contains(&"1") && !keys.contains(&"4"), "{keys:?}");
}

/// Where the diff cannot leave rows out (SQLite), a contact sync's cursor is read but the
/// diff is whole: given `since`, it still finds the removed key.
#[tokio::test]
async fn sqlite_a_contact_sync_with_a_cursor_diffs_in_full() {
    let f = sqlite();
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    (f.exec)(
        "CREATE TABLE users (id integer, email text, first_name text, newsletter boolean,
                             updated_at text);
         INSERT INTO users VALUES (1, 'a@x.co', 'A', 1, '2026-01-01T00:00:00Z');"
            .into(),
    )
    .await;
    let spec = cursored_spec();
    assert!(!w.diffs_incrementally(&spec));
    let run = w.create_run("users").await.unwrap();
    let rows = changes(w, &spec).await;
    let fp = spec.fingerprint(rows[0].values.as_ref().unwrap());
    w.record_outcomes(&[confirmed(&spec, run, "1", &fp)])
        .await
        .unwrap();
    (f.exec)("DELETE FROM users WHERE id = 1;".into()).await;
    let rows: Vec<DiffRow> = w
        .diff_changes(
            &spec,
            loopsync_core::value::parse_date_millis("2099-01-01T00:00:00Z"),
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(read_out(&rows).0, vec![("1".to_owned(), 1, false)]);
}

/// The window reads the keys the state has not noted by the model key's own type (so that an
/// index on it serves), for every type it knows and any other as text: a key confirmed again
/// is read wherever its cursor is, the others are not.
#[tokio::test]
async fn postgres_an_incremental_diff_finds_unnoted_keys_of_every_type() {
    let Some(f) = postgres().await else { return };
    let w = &*f.warehouse;
    w.prepare().await.unwrap();
    let types = [
        ("bigint", "9223372036854775807", "-1"),
        ("smallint", "32767", "-7"),
        ("text", "a key, with 'quotes'", "(null #1)"),
        (
            "uuid",
            "6f1c2a4e-0b7d-4c1e-9a3b-2d5e8f9a0b1c",
            "00000000-0000-0000-0000-000000000000",
        ),
        ("numeric", "12.50", "-3"),
    ];
    for (ty, one, two) in types {
        let table = format!("t_{ty}");
        (f.exec)(format!(
            "CREATE TABLE {table} (id {ty}, email text, first_name text, newsletter boolean,
                                   updated_at timestamptz);
             INSERT INTO {table} VALUES ('{one_sql}', 'a@x.co', 'A', true, '2026-01-01T00:00:00Z'),
                                        ('{two}', 'b@x.co', 'B', true, '2026-01-01T00:00:00Z');",
            one_sql = one.replace('\'', "''")
        ))
        .await;
        let mut spec = cursored_spec();
        spec.name = table.clone();
        spec.model = format!("select id, email, first_name, newsletter, updated_at from {table}");
        let run = w.create_run(&table).await.unwrap();
        let rows = changes(w, &spec).await;
        let notes = confirm_and_note(w, &spec, run, &rows).await;
        let keys: Vec<String> = notes.iter().map(|n| n.key.clone()).collect();
        let unnoted = keys.iter().find(|k| *k == two).unwrap();
        w.record_outcomes(&[confirmed(&spec, run, unnoted, "elsewhere")])
            .await
            .unwrap();
        let since = loopsync_core::value::parse_date_millis("2026-06-01T00:00:00Z");
        let rows: Vec<DiffRow> = changes_since(w, &spec, since).await;
        let (read, untold) = read_out(&rows);
        assert_eq!(read, vec![(unnoted.clone(), 1, true)], "{ty}");
        assert_eq!(untold, 1, "{ty}");
    }
}

/// The owners of a contact (asked for every removal and re-key) are found by the indexes of
/// their email, as the email rule keeps it, and of their userId: the statement's expression is
/// the index's, in each dialect (else a scan of the state normalising every email).
async fn the_owners_of_contacts_are_found_by_index(f: Fixture) -> String {
    f.warehouse.prepare().await.unwrap();
    // 5 000 contacts confirmed, each its own email and userId; the statistics read.
    let (state, analyze) = if f.sqlite {
        ("loopsync_state", "ANALYZE")
    } else {
        ("loopsync.state", "ANALYZE loopsync.state")
    };
    (f.exec)(format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
         INSERT INTO {state} (sync, key, confirmed_fp, confirmed_email, confirmed_user_id)
         SELECT 'users', CAST(i AS text), 'fp', 'user' || i || '@example.com', 'u' || i FROM n;
         {analyze};"
    ))
    .await;
    let d = f.dialect();
    let sql = d
        .statement(&crate::store::rules::owners_sql(&d, 2))
        .replace(['$', '?'], ":")
        .replace(":3", "'u1'")
        .replace(":2", "'a@example.com'")
        .replace(":1", "'users'");
    if f.sqlite {
        let path = f.url.trim_start_matches("sqlite://").to_owned();
        let c = rusqlite::Connection::open(path).unwrap();
        let mut q = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows: Vec<String> = q
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        rows.join("\n")
    } else {
        let (client, connection) = tokio_postgres::connect(&f.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let rows = client.query(&format!("EXPLAIN {sql}"), &[]).await.unwrap();
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[tokio::test]
async fn postgres_the_owners_of_contacts_are_found_by_index() {
    let Some(f) = postgres().await else { return };
    let plan = the_owners_of_contacts_are_found_by_index(f).await;
    assert!(plan.contains("state_confirmed_email"), "{plan}");
    assert!(plan.contains("state_confirmed_user_id"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}

#[tokio::test]
async fn sqlite_the_owners_of_contacts_are_found_by_index() {
    let plan = the_owners_of_contacts_are_found_by_index(sqlite()).await;
    assert!(plan.contains("state_confirmed_email"), "{plan}");
    assert!(plan.contains("state_confirmed_user_id"), "{plan}");
    assert!(!plan.contains("SCAN loopsync_state"), "{plan}");
}
