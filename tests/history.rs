//! Histories, not snapshots: seeded random sequences of changes to the model — values that go
//! back, rows that leave and come back unchanged, email changes (some in case only: emails are
//! spelled in mixed case), new rows — each followed by a run, under simulator faults (5xx before and after the effect, dropped connections) and, over
//! NATS, a loader killed mid-run. After every run the simulated Loops must hold exactly the model,
//! one contact per email whatever its case, and each change must have fired its workflow event
//! once.
//!
//! `LOOPSYNC_HISTORY_SEED` replays one seed; `LOOPSYNC_HISTORY_STEPS` sets the steps per history.
//! A failure prints the seed and the whole history up to the step that broke the invariant.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use loopsync_testkit::{Backend, Stack, StackOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

const PLANS: [&str; 4] = ["free", "pro", "team", "gold"];

/// One row of the `users` table, as the test keeps it.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    email: String,
    first_name: String,
    plan: String,
    seats: i64,
    newsletter: bool,
    /// Hours after 2024-01-01 00:00 UTC.
    signed_up_hour: i64,
}

/// An email as the product compares and sends it (loops-api.md §9: trimmed, lower-cased).
fn folded(email: &str) -> String {
    email.to_ascii_lowercase()
}

/// `email` spelled in a random mix of upper and lower case.
fn mixed_case(rng: &mut StdRng, email: &str) -> String {
    email
        .chars()
        .map(|c| {
            if rng.random_bool(0.5) {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// `email` spelled otherwise in case only: one letter's case turned, and others at random.
fn other_case(rng: &mut StdRng, email: &str) -> String {
    let mut chars: Vec<char> = mixed_case(rng, email).chars().collect();
    let letters: Vec<usize> = (0..chars.len())
        .filter(|&i| chars[i].is_ascii_alphabetic())
        .collect();
    if email.chars().collect::<Vec<_>>() == chars {
        let i = letters[rng.random_range(0..letters.len())];
        chars[i] = if chars[i].is_ascii_uppercase() {
            chars[i].to_ascii_lowercase()
        } else {
            chars[i].to_ascii_uppercase()
        };
    }
    chars.into_iter().collect()
}

impl Row {
    fn new(id: i64) -> Row {
        Row {
            email: format!("user{id}@example.com"),
            first_name: format!("First{id}"),
            plan: PLANS[(id as usize) % 3].to_owned(),
            seats: id % 7,
            newsletter: id % 2 == 0,
            signed_up_hour: id,
        }
    }

    fn insert_sql(&self, id: i64, backend: Backend) -> String {
        format!(
            "INSERT INTO users VALUES ({id}, '{}', '{}', '{}', {}, {}, {});",
            self.email,
            self.first_name,
            self.plan,
            self.seats,
            loopsync_testkit::time_literal(backend, self.signed_up_hour),
            self.newsletter
        )
    }

    /// The row as Loops sees it: the email folded (a change of its case alone is none).
    fn as_sent(&self) -> Row {
        Row {
            email: folded(&self.email),
            ..self.clone()
        }
    }

    /// What Loops must hold for this row (the mapped properties).
    fn contact(&self) -> Value {
        let at = chrono_like_iso(self.signed_up_hour);
        json!({
            "firstName": self.first_name,
            "planName": self.plan,
            "seats": self.seats,
            "signedUpAt": at,
            "mailingLists": if self.newsletter { json!({"cm_news": true}) } else { json!({}) },
        })
    }
}

/// `2024-01-01T00:00:00.000Z` plus `hours`, as the simulator writes dates.
fn chrono_like_iso(hours: i64) -> String {
    // Days in 2024's months (a leap year); the histories stay well within it.
    const DAYS: [i64; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let (mut day, hour) = (hours / 24, hours % 24);
    let mut month = 0;
    while day >= DAYS[month] {
        day -= DAYS[month];
        month += 1;
    }
    format!("2024-{:02}-{:02}T{hour:02}:00:00.000Z", month + 1, day + 1)
}

/// The model in memory, mirrored into the warehouse by SQL.
struct Model {
    rows: BTreeMap<i64, Row>,
    /// Rows that left, kept to bring them back unchanged.
    gone: BTreeMap<i64, Row>,
    next_id: i64,
    next_email: u32,
    /// Where the model is, for the SQL of its changes.
    backend: Backend,
}

impl Model {
    fn new(rows: i64, backend: Backend) -> Model {
        Model {
            rows: (1..=rows).map(|id| (id, Row::new(id))).collect(),
            gone: BTreeMap::new(),
            next_id: rows + 1,
            next_email: 0,
            backend,
        }
    }

    fn pick(rng: &mut StdRng, keys: &[i64]) -> Option<i64> {
        (!keys.is_empty()).then(|| keys[rng.random_range(0..keys.len())])
    }

    /// One random change: its SQL and a line for the history.
    fn change(&mut self, rng: &mut StdRng) -> (String, String) {
        let present: Vec<i64> = self.rows.keys().copied().collect();
        let gone: Vec<i64> = self.gone.keys().copied().collect();
        match rng.random_range(0..11) {
            // A plan changes, often back to what it was.
            0..=3 => {
                let Some(id) = Model::pick(rng, &present) else {
                    return self.add(rng);
                };
                let plan = PLANS[rng.random_range(0..PLANS.len())];
                self.rows.get_mut(&id).unwrap().plan = plan.to_owned();
                (
                    format!("UPDATE users SET plan = '{plan}' WHERE id = {id};"),
                    format!("plan of {id} := {plan}"),
                )
            }
            // A row leaves the model.
            4 | 5 => {
                let Some(id) = Model::pick(rng, &present) else {
                    return self.add(rng);
                };
                let row = self.rows.remove(&id).unwrap();
                self.gone.insert(id, row);
                (
                    format!("DELETE FROM users WHERE id = {id};"),
                    format!("{id} leaves"),
                )
            }
            // A row that left comes back unchanged.
            6 | 7 => {
                let Some(id) = Model::pick(rng, &gone) else {
                    return self.add(rng);
                };
                let row = self.gone.remove(&id).unwrap();
                // Its email may have been taken meanwhile (in any case): then it stays away.
                if self
                    .rows
                    .values()
                    .any(|r| folded(&r.email) == folded(&row.email))
                {
                    self.gone.insert(id, row);
                    return self.add(rng);
                }
                let sql = row.insert_sql(id, self.backend);
                self.rows.insert(id, row);
                (sql, format!("{id} comes back unchanged"))
            }
            // An email changes: to a new address (in mixed case), or back to the row's original
            // one.
            8 => {
                let Some(id) = Model::pick(rng, &present) else {
                    return self.add(rng);
                };
                let original = Row::new(id).email;
                let current = self.rows[&id].email.clone();
                let taken = |rows: &BTreeMap<i64, Row>| {
                    rows.values().any(|r| folded(&r.email) == folded(&original))
                };
                let email = if folded(&current) != original
                    && rng.random_bool(0.5)
                    && !taken(&self.rows)
                    && !taken(&self.gone)
                {
                    original
                } else {
                    self.next_email += 1;
                    mixed_case(rng, &format!("moved{}.{id}@example.com", self.next_email))
                };
                self.rows.get_mut(&id).unwrap().email = email.clone();
                (
                    format!("UPDATE users SET email = '{email}' WHERE id = {id};"),
                    format!("email of {id} := {email}"),
                )
            }
            // An email changes its case only: the same address to Loops, one contact.
            9 => {
                let Some(id) = Model::pick(rng, &present) else {
                    return self.add(rng);
                };
                let email = other_case(rng, &self.rows[&id].email);
                self.rows.get_mut(&id).unwrap().email = email.clone();
                (
                    format!("UPDATE users SET email = '{email}' WHERE id = {id};"),
                    format!("email of {id} := {email} (case only)"),
                )
            }
            _ => self.add(rng),
        }
    }

    /// A new row, its email in mixed case half of the time.
    fn add(&mut self, rng: &mut StdRng) -> (String, String) {
        let id = self.next_id;
        self.next_id += 1;
        let mut row = Row::new(id);
        if rng.random_bool(0.5) {
            row.email = mixed_case(rng, &row.email);
        }
        let sql = row.insert_sql(id, self.backend);
        self.rows.insert(id, row);
        (sql, format!("{id} is new"))
    }

    /// Loops' contacts as the model says, by folded email.
    fn contacts(&self) -> BTreeMap<String, Value> {
        self.rows
            .values()
            .map(|r| (folded(&r.email), r.contact()))
            .collect()
    }
}

/// The keys whose row differs between two snapshots as Loops sees them, or is new: each is one
/// change, one event (an email that changed its case only is no change).
fn changes(before: &BTreeMap<i64, Row>, after: &BTreeMap<i64, Row>) -> usize {
    after
        .iter()
        .filter(|(id, row)| before.get(id).map(Row::as_sent) != Some(row.as_sent()))
        .count()
}

/// The simulator's contacts, reduced to the mapped properties, by folded email. A second
/// contact whose email differs from another's in case only (a case-sensitive Loops holds both)
/// is kept as `EMAIL (again)`, which no model has.
async fn loops_contacts(stack: &Stack) -> BTreeMap<String, Value> {
    let mut contacts = BTreeMap::new();
    for (email, c) in stack.contacts().await {
        let reduced = json!({
            "firstName": c["firstName"],
            "planName": c["planName"],
            "seats": c["seats"],
            "signedUpAt": c["signedUpAt"],
            "mailingLists": c["mailingLists"],
        });
        let mut key = folded(&email);
        if contacts.contains_key(&key) {
            key = format!("{key} (again, as {email})");
        }
        contacts.insert(key, reduced);
    }
    contacts
}

struct Variant {
    name: &'static str,
    nats: bool,
    /// `POST /_sim/settings` before the history starts.
    settings: Value,
    /// Each change fires exactly one event. Where Loops consumes the key of a request that
    /// failed before its effect, the event of that change can never fire (its key is spent, and
    /// a new key could fire it twice): at most one.
    exactly_once: bool,
    /// Where the model is.
    backend: Backend,
    /// A contact cursor (`updated_at`, set by a trigger on every insert and update, as an
    /// application keeps it): most runs diff incrementally and find no removal, so after such
    /// a run Loops may still hold the contacts of rows that left; every so often, and at the
    /// end, a full diff is made due, after which Loops must hold exactly the model.
    cursor: bool,
}

/// The cursor variant's column and trigger (PostgreSQL).
const CURSOR_SQL: &str = "ALTER TABLE users ADD COLUMN updated_at timestamptz NOT NULL
                              DEFAULT clock_timestamp();
     CREATE FUNCTION touch_users() RETURNS trigger LANGUAGE plpgsql AS
       $$ BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$;
     CREATE TRIGGER users_touched BEFORE UPDATE ON users
       FOR EACH ROW EXECUTE FUNCTION touch_users();";

async fn history(variant: Variant, seed: u64, steps: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = 12;
    let Some(stack) = Stack::start(
        StackOptions {
            rows,
            nats: variant.nats,
            behavior: "mirror",
            // Histories remove many rows at once: the removal guard is tested on its own.
            extra_sync: if variant.cursor {
                "trigger_workflows = true\nmax_removal_share = 1.0\n\
                 cursor = \"updated_at\"\ncursor_lookback = \"0s\"\nfull_diff_every = \"1h\""
            } else {
                "trigger_workflows = true\nmax_removal_share = 1.0"
            },
            model: variant.cursor.then_some(
                "select id, email, first_name, plan, seats, signed_up_at, newsletter, updated_at \
                 from users",
            ),
            sim_rate_limit: 1000,
            requests_per_second: 500,
            ack_wait_seconds: 2.0,
            max_attempts: 12,
            // Faults fail a third of the requests: at the default backoff (0.5 s, doubled per
            // attempt, up to 30 s) an unlucky record's retries took a minute of a run.
            retry_backoff_ms: Some(5),
            ..StackOptions::default()
        }
        .on(variant.backend),
    )
    .await
    else {
        return;
    };
    // `POST /_sim/settings` replaces every setting: the stack's limit is restated, else the
    // simulator's default of 10 a second would meet the budget of 500 with 429s on every run
    // (their retries were most of a history's time). 429s come as a fault instead, below.
    if variant.cursor {
        stack.sql(CURSOR_SQL).await;
    }
    // Contacts of rows that left since the last full diff: an incremental one finds no removal.
    let mut lingering: std::collections::BTreeSet<String> = Default::default();
    let mut settings = variant.settings.clone();
    settings["rate_limit"] = json!(1000);
    stack.sim_post("settings", settings).await;
    let mut model = Model::new(rows as i64, variant.backend);
    let mut log = format!("{} · seed {seed}\n", variant.name);
    let mut synced: BTreeMap<i64, Row> = BTreeMap::new();
    let mut workers = if variant.nats {
        Some((
            stack.worker("extractor").await,
            stack.worker("transformer").await,
            stack.worker("loader").await,
        ))
    } else {
        None
    };
    for step in 1..=steps {
        let mut sql = String::new();
        if step > 1 {
            for _ in 0..rng.random_range(1..=3) {
                let (s, line) = model.change(&mut rng);
                sql.push_str(&s);
                let _ = writeln!(log, "  step {step}: {line}");
            }
        }
        if !sql.is_empty() {
            stack.sql(&sql).await;
        }
        // The cursor variant: a full diff made due (an hour passes, by the state's clock).
        if variant.cursor && (step == steps || rng.random_bool(0.25)) {
            stack
                .sql("UPDATE loopsync.runs SET requested_at = requested_at - interval '2 hours';")
                .await;
            let _ = writeln!(log, "  step {step}: a full diff is due");
        }
        // Faults on some runs: 5xx before or after the effect, dropped connections, 429s.
        let faulty = rng.random_bool(0.4);
        let faults = if faulty {
            json!({"error_503": 0.15, "error_502": 0.05, "drop_connection": 0.1,
                   "rate_limit_429": 0.05, "after_effect": 0.5, "seed": rng.random::<u32>()})
        } else {
            json!({})
        };
        stack.sim_post("faults", faults.clone()).await;
        let kill_loader = variant.nats && rng.random_bool(0.15);
        let _ = writeln!(
            log,
            "  step {step}: run{}{}",
            if faulty { " with faults" } else { "" },
            if kill_loader {
                ", the loader killed mid-run"
            } else {
                ""
            }
        );
        let events_before = stack.workflows("event_received").await;
        let output = if let Some((_, _, loader)) = workers.as_mut() {
            let runner = stack.run_once(&["--remote"]);
            if kill_loader {
                let delay = Duration::from_millis(rng.random_range(0..150));
                let killer = async {
                    tokio::time::sleep(delay).await;
                    loader.kill().await;
                    stack.worker("loader").await
                };
                let (output, replacement) = tokio::join!(runner, killer);
                *loader = replacement;
                output
            } else {
                runner.await
            }
        } else {
            stack.run_once(&[]).await
        };
        stack.sim_post("faults", json!({})).await;
        let diff = output.runs[0]["diff"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if variant.cursor {
            let _ = writeln!(log, "  step {step}: the diff was {diff}");
        }
        let fail = |what: String| -> ! {
            panic!(
                "{what}\nhistory that broke it (rerun with LOOPSYNC_HISTORY_SEED={seed}):\n{log}"
            )
        };
        if output.status != 0 {
            fail(format!(
                "step {step}: the run ended with exit {} ({}): {}",
                output.status, output.runs, output.stderr
            ));
        }
        let expected = model.contacts();
        let mut actual = loops_contacts(&stack).await;
        if variant.cursor {
            if diff == "full" {
                lingering.clear();
            } else {
                // Rows that left since the last full diff may keep their contacts, unless
                // another row took their email.
                lingering.extend(
                    synced
                        .iter()
                        .filter(|(id, _)| !model.rows.contains_key(id))
                        .map(|(_, row)| folded(&row.email)),
                );
                actual
                    .retain(|email, _| expected.contains_key(email) || !lingering.contains(email));
            }
        }
        if expected != actual {
            let missing: Vec<_> = expected
                .iter()
                .filter(|(e, c)| actual.get(*e) != Some(*c))
                .map(|(e, c)| format!("{e}: want {c}, Loops has {:?}", actual.get(e)))
                .collect();
            let extra: Vec<_> = actual
                .keys()
                .filter(|e| !expected.contains_key(*e))
                .collect();
            fail(format!(
                "step {step}: Loops differs from the model.\n  wrong or missing: {missing:#?}\n  not in the model: {extra:?}"
            ));
        }
        let fired = stack.workflows("event_received").await - events_before;
        let want = changes(&synced, &model.rows);
        if fired > want || (variant.exactly_once && fired != want) {
            fail(format!(
                "step {step}: {fired} event_received for {want} changes"
            ));
        }
        synced = model.rows.clone();
    }
    drop(workers);
}

/// The seed: `LOOPSYNC_HISTORY_SEED`, else `default`.
fn seed(default: u64) -> u64 {
    std::env::var("LOOPSYNC_HISTORY_SEED")
        .map(|s| s.parse().expect("LOOPSYNC_HISTORY_SEED is a number"))
        .unwrap_or(default)
}

fn steps(default: usize) -> usize {
    std::env::var("LOOPSYNC_HISTORY_STEPS")
        .map(|s| s.parse().expect("LOOPSYNC_HISTORY_STEPS is a number"))
        .unwrap_or(default)
}

// 60 + 60 + 40 + 50 + 50 + 30 = 290 random steps per run of the suite.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_history_in_process() {
    history(
        Variant {
            name: "in process, the simulator's defaults",
            nats: false,
            settings: json!({}),
            exactly_once: true,
            backend: Backend::Postgres,
            cursor: false,
        },
        seed(1),
        steps(60),
    )
    .await;
}

/// Loops consumes the keys of failed requests (loops-api.md §9.1): a 409 on a retry applied
/// nothing, and the contact must still end right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_history_keys_consumed_on_failure() {
    history(
        Variant {
            name: "in process, keys consumed by failed requests",
            nats: false,
            settings: json!({"keys_consumed_on_failure": true}),
            exactly_once: false,
            backend: Backend::Postgres,
            cursor: false,
        },
        seed(2),
        steps(60),
    )
    .await;
}

/// Case-sensitive email matching and millisecond-only numeric dates (§9.1). The model's emails
/// are in mixed case and change case: a contact written with the case of its row would be
/// another contact than the one written before a change of its case (a contact twice), and a
/// removal by another case would remove nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_history_case_sensitive_emails_millisecond_dates() {
    history(
        Variant {
            name: "in process, case-sensitive emails, millisecond dates",
            nats: false,
            settings: json!({"email_match": "case_sensitive", "numeric_dates": "millis"}),
            exactly_once: true,
            backend: Backend::Postgres,
            cursor: false,
        },
        seed(3),
        steps(40),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_history_over_nats_with_loader_kills() {
    history(
        Variant {
            name: "over NATS, loaders killed mid-run",
            nats: true,
            settings: json!({}),
            exactly_once: true,
            backend: Backend::Postgres,
            cursor: false,
        },
        seed(4),
        steps(50),
    )
    .await;
}

/// A contact cursor: most runs diff incrementally (they read the rows whose cursor moved and
/// the rows the state has not noted: a version whose answer was lost, then the row back at its
/// old value, is read again wherever its cursor is), a full diff now and then and at the end.
/// Each change fires its event at most once: a row that left and came back unchanged between
/// full diffs never left Loops, so it fires none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_history_with_a_cursor() {
    history(
        Variant {
            name: "in process, a contact cursor",
            nats: false,
            settings: json!({}),
            exactly_once: false,
            backend: Backend::Postgres,
            cursor: true,
        },
        seed(8),
        steps(50),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_history_with_a_cursor_over_nats_with_loader_kills() {
    history(
        Variant {
            name: "over NATS, a contact cursor, loaders killed mid-run",
            nats: true,
            settings: json!({}),
            exactly_once: false,
            backend: Backend::Postgres,
            cursor: true,
        },
        seed(9),
        steps(30),
    )
    .await;
}

/// The same histories on every other warehouse loopsync reads (the model there, the state in
/// SQLite where the warehouse is only read), in process, under faults.
async fn history_on(backend: Backend, name: &'static str, seed: u64) {
    history(
        Variant {
            name,
            nats: false,
            settings: json!({}),
            exactly_once: true,
            backend,
            cursor: false,
        },
        seed,
        steps(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_history_on_sqlite() {
    history_on(Backend::Sqlite, "in process, on SQLite", seed(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_history_on_mysql() {
    history_on(Backend::MySql, "in process, on MySQL", seed(6)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_history_on_duckdb() {
    history_on(Backend::DuckDb, "in process, on DuckDB", seed(7)).await;
}

/// One run of a differential history, as the state store reports it: the run's report without
/// its id and times, its per-record results without run ids, times and contact ids, and what
/// Loops holds after it.
#[derive(Debug, PartialEq)]
struct Observed {
    report: Value,
    records: Vec<Value>,
    loops: BTreeMap<String, Value>,
}

/// A seeded history (no faults: what is compared must not depend on timing) with the model and
/// the state on `backend`: what each run reported. `None` when the backend's service is absent.
async fn observe(
    backend: Backend,
    state_on_postgres: bool,
    seed: u64,
    steps: usize,
) -> Option<Vec<Observed>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = 12;
    let stack = Stack::start(
        StackOptions {
            rows,
            behavior: "mirror",
            extra_sync: "trigger_workflows = true\nmax_removal_share = 1.0",
            sim_rate_limit: 1000,
            requests_per_second: 500,
            ..StackOptions::default()
        }
        .on(backend)
        .state_on_postgres(state_on_postgres),
    )
    .await?;
    let mut model = Model::new(rows as i64, backend);
    let mut observed = Vec::new();
    for step in 1..=steps {
        if step > 1 {
            let mut sql = String::new();
            for _ in 0..rng.random_range(1..=3) {
                sql.push_str(&model.change(&mut rng).0);
            }
            stack.sql(&sql).await;
        }
        let output = stack.run_once(&[]).await;
        assert_eq!(output.status, 0, "step {step}: {}", output.stderr);
        let id = output.run()["id"]
            .as_i64()
            .expect("the run's id")
            .to_string();
        let shown = stack.output(&["runs", "show", &id, "--json"]).await;
        assert!(shown.status.success(), "runs show {id}");
        let data = loopsync_testkit::json_data(&shown.stdout).expect("runs show --json");
        let mut report = data["run"].clone();
        for field in ["id", "requested_at", "finished_at", "duration_ms"] {
            report.as_object_mut().expect("a report").remove(field);
        }
        let records = data["records"]
            .as_array()
            .expect("the run's records")
            .iter()
            .map(|r| {
                let mut r = r.clone();
                for field in ["run_id", "at", "contact_id"] {
                    r.as_object_mut().expect("a record").remove(field);
                }
                r
            })
            .collect();
        observed.push(Observed {
            report,
            records,
            loops: loops_contacts(&stack).await,
        });
    }
    Some(observed)
}

/// Runs the same history twice and asserts each run was observed the same.
fn assert_same(seed: u64, steps: usize, postgres: &[Observed], sqlite: &[Observed]) {
    for (step, (p, s)) in postgres.iter().zip(sqlite).enumerate() {
        assert_eq!(
            p,
            s,
            "step {} of seed {seed} differs between the PostgreSQL (left) and the SQLite (right) \
             state store (rerun with LOOPSYNC_HISTORY_SEED={seed})",
            step + 1
        );
    }
    assert_eq!((postgres.len(), sqlite.len()), (steps, steps));
}

/// The differential test of the state stores: the same seeded history against a PostgreSQL and
/// an SQLite state store (each holding its model too, so each runs its own diff: the hashed one
/// on PostgreSQL) gives identical run reports, identical per-record results, and the same
/// Loops, run after run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_history_on_a_postgres_and_an_sqlite_state_store() {
    let (seed, steps) = (seed(8), steps(20));
    let Some(postgres) = observe(Backend::Postgres, false, seed, steps).await else {
        return;
    };
    let Some(sqlite) = observe(Backend::Sqlite, false, seed, steps).await else {
        return;
    };
    assert_same(seed, steps, &postgres, &sqlite);
}

/// The same, with one model for both: on MySQL, read as a source beside a PostgreSQL and an
/// SQLite state store, whose diffs run over the rows staged in them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_history_from_one_source_beside_a_postgres_and_an_sqlite_state_store() {
    let (seed, steps) = (seed(9), steps(20));
    let Some(postgres) = observe(Backend::MySql, true, seed, steps).await else {
        return;
    };
    let Some(sqlite) = observe(Backend::MySql, false, seed, steps).await else {
        return;
    };
    assert_same(seed, steps, &postgres, &sqlite);
}
