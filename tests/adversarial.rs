//! Adversarial histories, driven through the engine as a library with the simulator in process
//! (a step costs milliseconds, not processes): random changes of the model built to break the
//! protocol — every mapped property type, list membership, NULLs, rows made invalid and fixed,
//! email and userId changes, an email or userId handed from one key to another, duplicate
//! userIds, rows that leave and return, values reverted to what Loops confirmed, a row re-keyed
//! while its old owner is invalid — each followed by a run under a fault: 5xx or a dropped
//! connection before or after the effect with the retries spent (dead letters), 429 storms,
//! Loops forgetting its idempotency keys (the simulator's key lifetime passed). Runs may fail
//! and leave dead letters mid-history; at the clean points (the model valid, the faults
//! cleared) one clean run must bring Loops to the model, exactly: every mapped property, list
//! membership, `subscribed`; no contact created twice by one workflow event; no idempotency key
//! taken twice; and the state consistent with Loops.
//!
//! Each history runs on a PostgreSQL and on an SQLite state store from the same seed, and the
//! two must agree (the differential test): the same run reports, the same per-record results,
//! the same Loops.
//!
//! The commit's seed under `scripts/test.sh`, else a fresh one (`testkit::history_seed`), printed
//! with the command that replays it:
//! `LOOPSYNC_HISTORY_SEED=<seed> cargo test -p loopsync-e2e --test e2e adversarial::`;
//! `LOOPSYNC_HISTORY_STEPS=<n>` soaks (steps per variant). By default 1 000 steps in all: 350,
//! 350 and 300 (retries wait 5 ms, a finished run is seen within 10 ms: a step costs about a
//! tenth of a second).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use loopsync_config::Config;
use loopsync_core::envelope::OutcomeStatus;
use loopsync_engine::destination::Refused;
use loopsync_engine::pipeline::Pipeline;
use loopsync_engine::runs::{RunObserver, RunOptions, Runs, SyncRun, WaitOptions};
use loopsync_simulator::{Faults, MailingList, Settings, SimConfig, SimHandle};
use loopsync_testkit::{TestDatabase, hours_after_2024};
use loopsync_warehouse::RunSummary;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const PLANS: [&str; 4] = ["free", "pro", "team", "gold"];

/// One row of the model.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    email: Option<String>,
    user_id: Option<String>,
    first_name: String,
    plan: Option<String>,
    seats: Option<i64>,
    /// Hours after 2024-01-01 00:00 UTC.
    signed_up: Option<i64>,
    newsletter: bool,
    vip: Option<bool>,
}

/// How a row can be invalid, so that the model can be made valid again at a clean point.
fn too_long() -> String {
    "x".repeat(600)
}

impl Row {
    fn new(id: i64) -> Row {
        Row {
            email: Some(format!("user{id}@example.com")),
            user_id: Some(format!("u{id}")),
            first_name: format!("First{id}"),
            plan: Some(PLANS[(id as usize) % 3].to_owned()),
            seats: Some(id % 7),
            signed_up: Some(id),
            newsletter: id % 2 == 0,
            vip: Some(id % 3 == 0),
        }
    }

    fn values_sql(&self, id: i64) -> String {
        let text = |v: &Option<String>| {
            v.as_ref().map_or("NULL".to_owned(), |s| {
                format!("'{}'", s.replace('\'', "''"))
            })
        };
        format!(
            "({id}, {}, {}, '{}', {}, {}, {}, {}, {})",
            text(&self.email),
            text(&self.user_id),
            self.first_name,
            text(&self.plan),
            self.seats.map_or("NULL".into(), |s| s.to_string()),
            self.signed_up
                .map_or("NULL".into(), |h| format!("'{}'", iso(h))),
            if self.newsletter { "TRUE" } else { "FALSE" },
            match self.vip {
                None => "NULL",
                Some(true) => "TRUE",
                Some(false) => "FALSE",
            },
        )
    }

    /// The mapped properties Loops must hold for this row.
    fn contact(&self) -> Value {
        json!({
            "firstName": self.first_name,
            // Loops keeps an empty userGroup as "" (loops-api.md §9).
            "userGroup": self.plan.clone().unwrap_or_default(),
            "seats": self.seats,
            "signedUpAt": self.signed_up.map(iso),
            "vip": self.vip,
            "mailingLists": if self.newsletter { json!({"cm_news": true}) } else { json!({}) },
            "subscribed": true,
        })
    }
}

/// `2024-01-01T00:00:00.000Z` plus `hours`, as the simulator writes dates.
fn iso(hours: i64) -> String {
    format!("{}.000Z", hours_after_2024(hours).replace(' ', "T"))
}

/// What a variant syncs.
#[derive(Debug, Clone, Copy)]
struct Variant {
    name: &'static str,
    by_user_id: bool,
    mirror: bool,
    unsubscribe: bool,
    workflows: bool,
    keys_consumed_on_failure: bool,
}

/// The model in memory, written to the warehouse whole before each run.
#[derive(Debug, Clone)]
struct Model {
    rows: BTreeMap<i64, Row>,
    gone: BTreeMap<i64, Row>,
    next_id: i64,
    next_name: u32,
}

impl Model {
    fn new(rows: i64) -> Model {
        Model {
            rows: (1..=rows).map(|id| (id, Row::new(id))).collect(),
            gone: BTreeMap::new(),
            next_id: rows + 1,
            next_name: 0,
        }
    }

    fn pick(rng: &mut StdRng, keys: impl IntoIterator<Item = i64>) -> Option<i64> {
        let keys: Vec<i64> = keys.into_iter().collect();
        (!keys.is_empty()).then(|| keys[rng.random_range(0..keys.len())])
    }

    fn fresh(&mut self, what: &str) -> String {
        self.next_name += 1;
        match what {
            "email" => format!("moved{}@example.com", self.next_name),
            _ => format!("v{}", self.next_name),
        }
    }

    /// One random change, described.
    fn change(
        &mut self,
        rng: &mut StdRng,
        variant: Variant,
        confirmed: &BTreeMap<i64, Row>,
    ) -> String {
        let present: Vec<i64> = self.rows.keys().copied().collect();
        let Some(id) = Model::pick(rng, present.iter().copied()) else {
            return self.add();
        };
        let row = self.rows.get_mut(&id).unwrap();
        match rng.random_range(0..22) {
            0 | 1 => {
                let plan = PLANS[rng.random_range(0..PLANS.len())];
                row.plan = Some(plan.into());
                format!("plan of {id} := {plan}")
            }
            2 => {
                row.plan = None;
                format!("plan of {id} := NULL")
            }
            3 => {
                row.seats = rng.random_bool(0.8).then(|| rng.random_range(0..50));
                format!("seats of {id} := {:?}", row.seats)
            }
            4 => {
                row.signed_up = rng.random_bool(0.8).then(|| rng.random_range(0..8000));
                format!("signed_up of {id} := {:?}", row.signed_up)
            }
            5 => {
                row.vip = [None, Some(true), Some(false)][rng.random_range(0..3)];
                format!("vip of {id} := {:?}", row.vip)
            }
            6 => {
                row.newsletter = !row.newsletter;
                format!("newsletter of {id} := {}", row.newsletter)
            }
            7 => {
                row.first_name = too_long();
                format!("{id} made invalid (a 600-character name)")
            }
            8 => {
                row.first_name = format!("Fixed{id}");
                format!("first name of {id} := Fixed{id}")
            }
            // Back to what Loops last confirmed for the key (or was told).
            9 | 10 => match confirmed.get(&id) {
                Some(before) => {
                    *row = before.clone();
                    format!("{id} reverts to its last synced values")
                }
                None => self.add(),
            },
            11 => {
                let email = self.fresh("email");
                let row = self.rows.get_mut(&id).unwrap();
                row.email = Some(email.clone());
                format!("email of {id} := {email}")
            }
            // An email handed over: this key takes another's email, which moves to a new one.
            // (Identified by userId, a hand-over within one run meets Loops' "Multiple
            // contacts found" in one order of the writes and not the other: open.)
            12 if !variant.by_user_id || open_histories() => {
                let Some(other) = Model::pick(rng, present.iter().copied().filter(|k| *k != id))
                else {
                    return self.add();
                };
                let fresh = self.fresh("email");
                let taken = self.rows[&other].email.clone();
                self.rows.get_mut(&other).unwrap().email = Some(fresh.clone());
                self.rows.get_mut(&id).unwrap().email = taken.clone();
                format!("{id} takes the email {taken:?} of {other}, which moves to {fresh}")
            }
            // The same, while the old owner is invalid this run (open: two records then hold
            // one confirmed email, and when both re-key away in one run each takes the other
            // for the contact's owner, so it stays; see docs/architecture.md).
            13 if open_histories() => {
                let Some(other) = Model::pick(rng, present.iter().copied().filter(|k| *k != id))
                else {
                    return self.add();
                };
                let fresh = self.fresh("email");
                let taken = self.rows[&other].email.clone();
                let old_owner = self.rows.get_mut(&other).unwrap();
                old_owner.email = Some(fresh.clone());
                old_owner.first_name = too_long();
                self.rows.get_mut(&id).unwrap().email = taken.clone();
                format!(
                    "{id} takes the email {taken:?} of {other}, which moves to {fresh} and is invalid"
                )
            }
            // A userId changes. Identified by userId, with the email changed in the same run,
            // that is a re-key (`RowChange::rekey`).
            14 if variant.by_user_id => {
                let user_id = self.fresh("user");
                let row = self.rows.get_mut(&id).unwrap();
                row.user_id = Some(user_id.clone());
                format!("userId of {id} := {user_id}")
            }
            // A userId handed over, or duplicated. A hand-over within one run can meet Loops'
            // "Multiple contacts found" whichever order the writes take (open: see
            // docs/architecture.md), so it is generated with LOOPSYNC_HISTORY_OPEN=1 only.
            15 if variant.by_user_id && open_histories() => {
                let Some(other) = Model::pick(rng, present.iter().copied().filter(|k| *k != id))
                else {
                    return self.add();
                };
                let taken = self.rows[&other].user_id.clone();
                let hand_over = rng.random_bool(0.5);
                if hand_over {
                    let fresh = self.fresh("user");
                    self.rows.get_mut(&other).unwrap().user_id = Some(fresh);
                }
                self.rows.get_mut(&id).unwrap().user_id = taken.clone();
                format!(
                    "{id} takes the userId {taken:?} of {other}{}",
                    if hand_over {
                        ", which gets a new one"
                    } else {
                        " (a duplicate)"
                    }
                )
            }
            16 => {
                row.email = [None, Some("not-an-email".to_owned())][rng.random_range(0..2)].clone();
                format!("email of {id} := {:?} (invalid)", row.email)
            }
            17 | 18 => {
                let row = self.rows.remove(&id).unwrap();
                self.gone.insert(id, row);
                format!("{id} leaves")
            }
            19 => match Model::pick(rng, self.gone.keys().copied()) {
                Some(back) => {
                    let row = self.gone.remove(&back).unwrap();
                    self.rows.insert(back, row);
                    format!("{back} comes back")
                }
                None => self.add(),
            },
            // A key leaves and a new key arrives with its email and userId (open: see
            // docs/architecture.md).
            20 if open_histories() => {
                let row = self.rows.remove(&id).unwrap();
                let new = self.next_id;
                self.next_id += 1;
                let mut taken = Row::new(new);
                taken.email = row.email.clone();
                taken.user_id = row.user_id.clone();
                self.gone.insert(id, row);
                self.rows.insert(new, taken);
                format!("{id} leaves and {new} arrives with its email and userId")
            }
            _ => self.add(),
        }
    }

    fn add(&mut self) -> String {
        let id = self.next_id;
        self.next_id += 1;
        self.rows.insert(id, Row::new(id));
        format!("{id} is new")
    }

    /// Makes every row valid: names short, emails well formed and unique, userIds unique.
    fn make_valid(&mut self) -> Vec<String> {
        let mut said = Vec::new();
        let mut emails = BTreeSet::new();
        let mut user_ids = BTreeSet::new();
        let ids: Vec<i64> = self.rows.keys().copied().collect();
        for id in ids {
            let mut fresh_email = None;
            let mut fresh_user = None;
            {
                let row = &self.rows[&id];
                let bad_email = match &row.email {
                    Some(e) => !e.contains('@') || emails.contains(e),
                    None => true,
                };
                if bad_email {
                    fresh_email = Some(());
                }
                if row.user_id.as_ref().is_none_or(|u| user_ids.contains(u)) {
                    fresh_user = Some(());
                }
            }
            if fresh_email.is_some() {
                let email = self.fresh("email");
                said.push(format!("email of {id} := {email} (fixed)"));
                self.rows.get_mut(&id).unwrap().email = Some(email);
            }
            if fresh_user.is_some() {
                let user = self.fresh("user");
                said.push(format!("userId of {id} := {user} (fixed)"));
                self.rows.get_mut(&id).unwrap().user_id = Some(user);
            }
            let row = self.rows.get_mut(&id).unwrap();
            if row.first_name.len() > 500 {
                row.first_name = format!("Fixed{id}");
                said.push(format!("first name of {id} fixed"));
            }
            emails.insert(row.email.clone().unwrap());
            user_ids.insert(row.user_id.clone().unwrap());
        }
        said
    }

    fn table_sql(&self) -> String {
        let mut sql = "DELETE FROM users;".to_owned();
        if !self.rows.is_empty() {
            let values: Vec<String> = self.rows.iter().map(|(id, r)| r.values_sql(*id)).collect();
            let _ = write!(sql, "INSERT INTO users VALUES {};", values.join(", "));
        }
        sql
    }
}

/// Where the model and the state are.
enum Store {
    Postgres {
        database: TestDatabase,
        client: tokio_postgres::Client,
    },
    Sqlite {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    },
}

const TABLE: &str = "CREATE TABLE users (id BIGINT, email TEXT, user_id TEXT, first_name TEXT, \
                     plan TEXT, seats BIGINT, signed_up_at TEXT, newsletter BOOLEAN, vip BOOLEAN)";

impl Store {
    async fn postgres() -> Option<Store> {
        let database = TestDatabase::create().await?;
        let (client, connection) = tokio_postgres::connect(&database.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client.batch_execute(TABLE).await.unwrap();
        Some(Store::Postgres { database, client })
    }

    fn sqlite() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warehouse.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(TABLE)
            .unwrap();
        Store::Sqlite { _dir: dir, path }
    }

    fn name(&self) -> &'static str {
        match self {
            Store::Postgres { .. } => "PostgreSQL",
            Store::Sqlite { .. } => "SQLite",
        }
    }

    fn url(&self) -> String {
        match self {
            Store::Postgres { database, .. } => database.url.clone(),
            Store::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
        }
    }

    async fn execute(&self, sql: &str) {
        match self {
            Store::Postgres { client, .. } => client
                .batch_execute(&format!("BEGIN; {sql} COMMIT;"))
                .await
                .expect("model SQL"),
            Store::Sqlite { path, .. } => rusqlite::Connection::open(path)
                .unwrap()
                .execute_batch(&format!("BEGIN; {sql} COMMIT;"))
                .expect("model SQL"),
        }
    }

    /// The state's confirmed identities: (email, userId) of every record Loops holds for the
    /// sync, as the state believes.
    async fn confirmed(&self) -> Vec<(Option<String>, Option<String>)> {
        let sql = "SELECT confirmed_email, confirmed_user_id FROM {state} \
                   WHERE sync = 'users' AND confirmed_fp IS NOT NULL ORDER BY key";
        match self {
            Store::Postgres { client, .. } => client
                .query(&sql.replace("{state}", "loopsync.state"), &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
            Store::Sqlite { path, .. } => {
                let db = rusqlite::Connection::open(path).unwrap();
                let mut statement = db
                    .prepare(&sql.replace("{state}", "loopsync_state"))
                    .unwrap();
                statement
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            }
        }
    }
}

/// Says nothing.
struct Quiet;

impl RunObserver for Quiet {
    fn notice(&mut self, _line: String) {}
    fn progress(&mut self, _line: String) {}
    fn started(&mut self, _run_id: i64) {}
    fn finished(&mut self, _summary: &RunSummary) {}
    fn refused(&mut self, _refused: &Refused) {}
}

/// One deployment: its store, its simulated Loops, and its pipeline (one process).
struct Deployment {
    store: Store,
    sim: SimHandle,
    pipeline: Pipeline,
    runs: Runs,
    token: CancellationToken,
    /// The stretches of the simulator's event and workflow logs written while Loops had
    /// forgotten every idempotency key: `(events, workflows)` index ranges. A change whose every
    /// answer was lost and that is sent again past Loops' 24 hours of keys may fire again — the
    /// one case the design leaves open (docs/architecture.md, case 5).
    forgotten: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

impl Deployment {
    async fn start(store: Store, variant: Variant) -> Deployment {
        let sim = loopsync_simulator::spawn(SimConfig {
            settings: Settings {
                rate_limit: 1000,
                keys_consumed_on_failure: variant.keys_consumed_on_failure,
                ..Settings::default()
            },
            lists: vec![MailingList {
                id: "cm_news".into(),
                name: "Newsletter".into(),
                description: None,
                is_public: true,
            }],
            ..SimConfig::default()
        })
        .await
        .expect("start the simulator");
        let text = format!(
            r#"[warehouse]
url = "{url}"

[loops]
api_key = "test-key"
base_url = "{api}"
requests_per_second = 1000
max_attempts = 2
retry_backoff_ms = 5

[[sync]]
name = "users"
model = "select id, email, user_id, first_name, plan, seats, signed_up_at, newsletter, vip from users"
primary_key = "id"
identify_by = "{identify_by}"
behavior = "{behavior}"
on_remove = "{on_remove}"
trigger_workflows = {workflows}
max_removal_share = 1.0

[sync.mapping]
email = "email"
{user_id}firstName = "first_name"
userGroup = "plan"
seats = {{ column = "seats", type = "number" }}
signedUpAt = {{ column = "signed_up_at", type = "date" }}
vip = {{ column = "vip", type = "boolean" }}

[sync.mailing_lists]
"cm_news" = "newsletter"
"#,
            url = store.url(),
            api = sim.base_url(),
            identify_by = if variant.by_user_id {
                "userId"
            } else {
                "email"
            },
            behavior = if variant.mirror { "mirror" } else { "upsert" },
            on_remove = if variant.unsubscribe {
                "unsubscribe"
            } else {
                "delete"
            },
            workflows = variant.workflows,
            user_id = if variant.by_user_id {
                "userId = \"user_id\"\n"
            } else {
                ""
            },
        );
        let config = Config::parse(&text, |_| None).expect("the history's config");
        let token = CancellationToken::new();
        let mut pipeline = Pipeline::connect(config, token.clone())
            .await
            .expect("connect the pipeline");
        // A finished run is seen within 10 ms (the default 100 ms poll would be most of a step).
        let options = RunOptions {
            wait: WaitOptions {
                poll: std::time::Duration::from_millis(10),
                ..WaitOptions::default()
            },
            ..RunOptions::default()
        };
        let runs = Runs::start(&pipeline, options)
            .await
            .expect("start the runs");
        pipeline.spawn_all().expect("start the stages");
        Deployment {
            store,
            sim,
            pipeline,
            runs,
            token,
            forgotten: Vec::new(),
        }
    }

    async fn run(&mut self) -> Result<RunSummary, String> {
        let done = self
            .runs
            .once(&["users".to_owned()], &mut Quiet, &self.token)
            .await
            .map_err(|e| format!("the run failed: {e}"))?;
        match done.into_iter().next() {
            Some(SyncRun::Done(summary)) => Ok(*summary),
            other => Err(format!("the run did not run: {other:?}")),
        }
    }

    /// What Loops holds, by the identifier the sync matches on.
    fn loops(&self, variant: Variant) -> BTreeMap<String, Value> {
        let contacts = self.sim.contacts();
        contacts
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let id = if variant.by_user_id {
                    c["userId"].as_str().unwrap_or("(no userId)").to_owned()
                } else {
                    c["email"].as_str().unwrap().to_owned()
                };
                let mut reduced = json!({
                    "firstName": c["firstName"],
                    "userGroup": c["userGroup"],
                    "seats": c["seats"],
                    "signedUpAt": c["signedUpAt"],
                    "vip": c["vip"],
                    "mailingLists": c["mailingLists"],
                    "subscribed": c["subscribed"],
                });
                if variant.by_user_id {
                    reduced["email"] = c["email"].clone();
                }
                (id, reduced)
            })
            .collect()
    }

    async fn stop(self) {
        self.token.cancel();
        self.pipeline.stop().await;
        self.sim.shutdown().await;
    }
}

/// A fault for one run, on the endpoints that write (the preflight's reads are left alone).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// 503 on every write, after (or before) the effect: the retries are spent, dead letters.
    Errors {
        after_effect: bool,
    },
    /// The connection dropped after the effect.
    Dropped,
    /// Every write answered 429.
    RateLimited,
    /// Loops forgets every idempotency key (its 24 hours have passed).
    KeysForgotten,
}

impl Fault {
    fn draw(rng: &mut StdRng) -> Fault {
        match rng.random_range(0..20) {
            0..=3 => Fault::Errors { after_effect: true },
            4 | 5 => Fault::Errors {
                after_effect: false,
            },
            6 | 7 => Fault::Dropped,
            8 => Fault::RateLimited,
            9 => Fault::KeysForgotten,
            _ => Fault::None,
        }
    }

    fn apply(self, sim: &SimHandle, keys_consumed_on_failure: bool) {
        let writes = vec![
            "PUT /v1/contacts/update".to_owned(),
            "POST /v1/events/send".to_owned(),
            "POST /v1/contacts/delete".to_owned(),
        ];
        let faults = match self {
            Fault::None | Fault::KeysForgotten => Faults::default(),
            Fault::Errors { after_effect } => Faults {
                error_503: 1.0,
                after_effect: if after_effect { 1.0 } else { 0.0 },
                endpoints: writes,
                ..Faults::default()
            },
            Fault::Dropped => Faults {
                drop_connection: 1.0,
                after_effect: 1.0,
                endpoints: writes,
                ..Faults::default()
            },
            Fault::RateLimited => Faults {
                rate_limit_429: 1.0,
                endpoints: writes,
                ..Faults::default()
            },
        };
        sim.set_faults(faults).unwrap();
        sim.set_settings(Settings {
            rate_limit: 1000,
            keys_consumed_on_failure,
            idempotency_ttl_seconds: if self == Fault::KeysForgotten {
                0
            } else {
                86_400
            },
            ..Settings::default()
        })
        .unwrap();
    }
}

/// A reason as two deployments can agree on it: without numbers (the simulator's port, the
/// rate-limit headers' counts).
fn comparable(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    for c in reason.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What a run report says, without what differs between two deployments (ids, times).
fn report(summary: &RunSummary) -> Value {
    let mut v = serde_json::to_value(summary).unwrap();
    let o = v.as_object_mut().unwrap();
    for volatile in ["id", "requested_at", "finished_at", "duration_ms", "error"] {
        o.remove(volatile);
    }
    v
}

/// The invariant at a clean point, on one deployment: Loops holds exactly the model.
fn check(
    deployment: &Deployment,
    variant: Variant,
    model: &Model,
    ever: &BTreeSet<String>,
    holders: &BTreeMap<String, BTreeSet<i64>>,
) -> Result<(), String> {
    let loops = deployment.loops(variant);
    let mut problems = Vec::new();
    let mut expected = BTreeMap::new();
    for row in model.rows.values() {
        let mut want = row.contact();
        let id = if variant.by_user_id {
            want["email"] = json!(row.email);
            row.user_id.clone().unwrap()
        } else {
            row.email.clone().unwrap()
        };
        expected.insert(id, want);
    }
    for (id, want) in &expected {
        match loops.get(id) {
            Some(have) if have == want => {}
            have => problems.push(format!("{id}: want {want}, Loops has {have:?}")),
        }
    }
    for (id, have) in &loops {
        if expected.contains_key(id) {
            continue;
        }
        let fine = match (variant.mirror, variant.unsubscribe) {
            // Mirror deletes what left the model.
            (true, false) => false,
            // Mirror unsubscribes it; it must have been the sync's.
            (true, true) => have["subscribed"] == json!(false) && ever.contains(id),
            // Upsert leaves it.
            (false, _) => true,
        };
        if !fine {
            problems.push(format!("{id}: not in the model, Loops has {have}"));
        }
    }
    // A record's creation fires once: a contact sees at most one `contactCreated` per record
    // that ever held its email (a new record may take over the contact of one that left).
    let forgot_workflow = |i: usize| deployment.forgotten.iter().any(|(_, w)| w.contains(&i));
    let forgot_event = |i: usize| deployment.forgotten.iter().any(|(e, _)| e.contains(&i));
    let mut created: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, w) in deployment.sim.workflows().into_iter().enumerate() {
        if forgot_workflow(i) {
            continue;
        }
        if w.kind == "event_received" && w.event_name.as_deref() == Some("contactCreated") {
            *created
                .entry((w.contact_id.clone(), w.email.clone()))
                .or_default() += 1;
        }
    }
    for ((contact, email), n) in created {
        let records = holders.get(&email).map_or(0, BTreeSet::len);
        if n > records.max(1) {
            problems.push(format!(
                "contact {contact} ({email}): contactCreated fired {n} times, for {records} records"
            ));
        }
    }
    // No key taken twice.
    let mut keys = BTreeMap::new();
    for (i, e) in deployment.sim.events().into_iter().enumerate() {
        if forgot_event(i) {
            continue;
        }
        if let Some(k) = e.idempotency_key {
            *keys.entry(k).or_insert(0usize) += 1;
        }
    }
    if let Some((k, n)) = keys.iter().find(|(_, n)| **n > 1) {
        problems.push(format!("the event key {k} was taken {n} times"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "Loops differs from the model:\n  {}",
            problems.join("\n  ")
        ))
    }
}

/// The state agrees with Loops: under mirror with deletes, the records the state holds as
/// confirmed are exactly the contacts.
async fn check_state(deployment: &Deployment, variant: Variant) -> Result<(), String> {
    if !variant.mirror || variant.unsubscribe {
        return Ok(());
    }
    let loops = deployment.loops(variant);
    let state: BTreeSet<String> = deployment
        .store
        .confirmed()
        .await
        .into_iter()
        .filter_map(|(email, user_id)| if variant.by_user_id { user_id } else { email })
        .collect();
    let held: BTreeSet<String> = loops.keys().cloned().collect();
    if state == held {
        Ok(())
    } else {
        Err(format!(
            "the state's confirmed records differ from Loops: only in the state {:?}, only in \
             Loops {:?}",
            state.difference(&held).collect::<Vec<_>>(),
            held.difference(&state).collect::<Vec<_>>()
        ))
    }
}

async fn history(variant: Variant, seed: u64, steps: usize) {
    let Some(postgres) = Store::postgres().await else {
        return;
    };
    let mut deployments = vec![
        Deployment::start(postgres, variant).await,
        Deployment::start(Store::sqlite(), variant).await,
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::new(8);
    // What Loops was last told for each key, for reverts; every identifier ever sent.
    let mut synced: BTreeMap<i64, Row> = BTreeMap::new();
    let mut ever = BTreeSet::new();
    // Every key that ever had each email in the model.
    let mut holders: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    let mut log = format!(
        "{} · seed {seed} · replay: LOOPSYNC_HISTORY_SEED={seed} cargo test -p loopsync-e2e --test e2e adversarial::\n",
        variant.name
    );
    let fail = |log: &str, what: String| -> ! {
        panic!(
            "{what}\nthe history that broke it (replay with LOOPSYNC_HISTORY_SEED={seed}):\n{log}"
        )
    };
    for step in 1..=steps {
        let clean = step == steps || rng.random_bool(0.3);
        for _ in 0..rng.random_range(1..=3) {
            let line = model.change(&mut rng, variant, &synced);
            let _ = writeln!(log, "  {step}: {line}");
        }
        let fault = if clean {
            for line in model.make_valid() {
                let _ = writeln!(log, "  {step}: {line}");
            }
            Fault::None
        } else {
            Fault::draw(&mut rng)
        };
        let _ = writeln!(
            log,
            "  {step}: run{}",
            match fault {
                Fault::None if clean => " (clean point)".to_owned(),
                Fault::None => String::new(),
                other => format!(" under {other:?}"),
            }
        );
        for (key, row) in &model.rows {
            let id = if variant.by_user_id {
                &row.user_id
            } else {
                &row.email
            };
            if let Some(id) = id {
                ever.insert(id.clone());
            }
            if let Some(email) = &row.email {
                holders.entry(email.clone()).or_default().insert(*key);
            }
        }
        let mut reports = Vec::new();
        for d in &mut deployments {
            d.store.execute(&model.table_sql()).await;
            fault.apply(&d.sim, variant.keys_consumed_on_failure);
            let before = (d.sim.events().len(), d.sim.workflows().len());
            let ran = d.run().await;
            if fault == Fault::KeysForgotten {
                let after = (d.sim.events().len(), d.sim.workflows().len());
                d.forgotten.push((before.0..after.0, before.1..after.1));
            }
            fault.apply_none(&d.sim, variant.keys_consumed_on_failure);
            let summary = match ran {
                Ok(s) => s,
                Err(e) => fail(&log, format!("step {step} on {}: {e}", d.store.name())),
            };
            if clean {
                if summary.status != "succeeded" {
                    let records = d.pipeline.warehouse.records(summary.id).await.unwrap();
                    let records: Vec<String> = records
                        .iter()
                        .filter(|r| r.outcome != OutcomeStatus::Confirmed)
                        .map(|r| {
                            format!("{} {}: {:?} {:?}", r.key, r.operation, r.outcome, r.reason)
                        })
                        .collect();
                    fail(
                        &log,
                        format!(
                            "step {step} on {}: the clean run ended {}: {records:#?}",
                            d.store.name(),
                            summary.status,
                        ),
                    );
                }
                if let Err(e) = check(d, variant, &model, &ever, &holders) {
                    let records = d.pipeline.warehouse.records(summary.id).await.unwrap();
                    let records: Vec<String> = records
                        .iter()
                        .map(|r| {
                            format!("{} {}: {:?} {:?}", r.key, r.operation, r.outcome, r.reason)
                        })
                        .collect();
                    fail(
                        &log,
                        format!(
                            "step {step} on {}: {e}\nthe run's records: {records:#?}",
                            d.store.name()
                        ),
                    );
                }
                if let Err(e) = check_state(d, variant).await {
                    fail(&log, format!("step {step} on {}: {e}", d.store.name()));
                }
            }
            let records = d
                .pipeline
                .warehouse
                .records(summary.id)
                .await
                .unwrap()
                .into_iter()
                .map(|r| {
                    (
                        r.key,
                        r.operation,
                        r.outcome,
                        r.reason.map(|r| comparable(&r)),
                    )
                })
                .collect::<Vec<_>>();
            reports.push((report(&summary), records, d.loops(variant)));
        }
        if reports[0] != reports[1] {
            fail(
                &log,
                format!(
                    "step {step}: PostgreSQL and SQLite disagree:\n  {:?}\n  {:?}",
                    reports[0], reports[1]
                ),
            );
        }
        if fault == Fault::None {
            synced = model.rows.clone();
        }
    }
    for d in deployments {
        d.stop().await;
    }
}

impl Fault {
    fn apply_none(self, sim: &SimHandle, keys_consumed_on_failure: bool) {
        Fault::None.apply(sim, keys_consumed_on_failure);
    }
}

/// `LOOPSYNC_HISTORY_OPEN=1`: also the histories known to break the invariant (the open cases
/// of docs/architecture.md), to work on them.
fn open_histories() -> bool {
    std::env::var_os("LOOPSYNC_HISTORY_OPEN").is_some_and(|v| v == "1")
}

/// `LOOPSYNC_HISTORY_SEED`, else the commit's, else a fresh one; printed either way.
fn seed() -> u64 {
    loopsync_testkit::history_seed("adversarial")
}

fn steps(default: usize) -> usize {
    std::env::var("LOOPSYNC_HISTORY_STEPS")
        .map(|s| s.parse().expect("LOOPSYNC_HISTORY_STEPS is a number"))
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_mirror_with_workflows() {
    history(
        Variant {
            name: "email, mirror (delete), workflows",
            by_user_id: false,
            mirror: true,
            unsubscribe: false,
            workflows: true,
            keys_consumed_on_failure: false,
        },
        seed(),
        steps(350),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_id_mirror_unsubscribe() {
    history(
        Variant {
            name: "userId, mirror (unsubscribe)",
            by_user_id: true,
            mirror: true,
            unsubscribe: true,
            workflows: false,
            keys_consumed_on_failure: false,
        },
        seed(),
        steps(350),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_upsert_keys_consumed_on_failure() {
    history(
        Variant {
            name: "email, upsert, workflows, keys consumed on failure",
            by_user_id: false,
            mirror: false,
            unsubscribe: false,
            workflows: true,
            keys_consumed_on_failure: true,
        },
        seed(),
        steps(300),
    )
    .await;
}

// The cases of "Adversarial histories" that the generator finds, each alone: deterministic,
// on both state stores. Each failed before its fix.

/// The variants of the cases below.
const EMAIL_MIRROR: Variant = Variant {
    name: "email, mirror (delete), workflows",
    by_user_id: false,
    mirror: true,
    unsubscribe: false,
    workflows: true,
    keys_consumed_on_failure: false,
};

const USER_ID_UNSUBSCRIBE: Variant = Variant {
    name: "userId, mirror (unsubscribe)",
    by_user_id: true,
    mirror: true,
    unsubscribe: true,
    workflows: false,
    keys_consumed_on_failure: false,
};

/// Both deployments of a case: PostgreSQL and SQLite state, each with its own simulator.
async fn both(variant: Variant) -> Option<Vec<Deployment>> {
    let postgres = Store::postgres().await?;
    Some(vec![
        Deployment::start(postgres, variant).await,
        Deployment::start(Store::sqlite(), variant).await,
    ])
}

impl Deployment {
    /// Writes the model and runs under `fault`; the run's summary.
    async fn step(&mut self, model: &Model, fault: Fault, variant: Variant) -> RunSummary {
        self.store.execute(&model.table_sql()).await;
        fault.apply(&self.sim, variant.keys_consumed_on_failure);
        let ran = self.run().await;
        fault.apply_none(&self.sim, variant.keys_consumed_on_failure);
        ran.unwrap_or_else(|e| panic!("{}: {e}", self.store.name()))
    }

    /// The contact Loops holds for `id` (an email, or a userId), reduced.
    fn contact(&self, variant: Variant, id: &str) -> Option<Value> {
        self.loops(variant).get(id).cloned()
    }

    /// Runs under dropped connections: Loops applies every write and no answer comes back
    /// (`lost` dead letters); Loops holds `applied` after it.
    async fn lose(&mut self, model: &Model, variant: Variant, lost: i64, applied: &str) {
        let run = self.step(model, Fault::Dropped, variant).await;
        assert_eq!(run.dead_lettered, lost, "{}", self.store.name());
        assert!(
            self.contact(variant, applied).is_some(),
            "{}: Loops applied {applied}",
            self.store.name()
        );
    }

    /// A run without faults, which must succeed: nothing rejected nor dead-lettered.
    async fn clean(&mut self, model: &Model, variant: Variant) {
        let run = self.step(model, Fault::None, variant).await;
        assert_eq!(run.status, "succeeded", "{}: {run:?}", self.store.name());
        assert_eq!(run.rejected + run.dead_lettered, 0, "{}", self.store.name());
    }
}

/// Case 1: Loops applied `free → gold` but every answer was lost (retries spent: a dead
/// letter); the row goes back to `free`. The next run sends it again (Loops may hold `gold`),
/// where it used to find it unchanged and leave Loops on `gold` for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_a_lost_confirmation_then_a_revert() {
    let Some(deployments) = both(EMAIL_MIRROR).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(2);
        model.rows.get_mut(&1).unwrap().plan = Some("free".into());
        d.step(&model, Fault::None, EMAIL_MIRROR).await;
        model.rows.get_mut(&1).unwrap().plan = Some("gold".into());
        let lost = d
            .step(&model, Fault::Errors { after_effect: true }, EMAIL_MIRROR)
            .await;
        assert_eq!(lost.dead_lettered, 1, "{}", d.store.name());
        assert_eq!(
            d.contact(EMAIL_MIRROR, "user1@example.com").unwrap()["userGroup"],
            "gold",
            "Loops applied it"
        );
        model.rows.get_mut(&1).unwrap().plan = Some("free".into());
        let back = d.step(&model, Fault::None, EMAIL_MIRROR).await;
        assert_eq!(back.status, "succeeded");
        assert_eq!(
            d.contact(EMAIL_MIRROR, "user1@example.com").unwrap()["userGroup"],
            "free",
            "{}: Loops holds the row again",
            d.store.name()
        );
        // And then it is unchanged: nothing more is sent.
        let after = d.step(&model, Fault::None, EMAIL_MIRROR).await;
        assert_eq!(
            (after.changed, after.requests),
            (0, 0),
            "{}",
            d.store.name()
        );
        d.stop().await;
    }
}

/// Case 1, a removal: mirror deleted the contact but the answer was lost; the row comes back
/// unchanged. The contact is written again, where it used to stay deleted for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_a_lost_removal_then_the_row_returns() {
    let Some(deployments) = both(EMAIL_MIRROR).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(3);
        d.step(&model, Fault::None, EMAIL_MIRROR).await;
        let row = model.rows.remove(&2).unwrap();
        let lost = d
            .step(&model, Fault::Errors { after_effect: true }, EMAIL_MIRROR)
            .await;
        assert_eq!(lost.dead_lettered, 1);
        assert!(d.contact(EMAIL_MIRROR, "user2@example.com").is_none());
        model.rows.insert(2, row.clone());
        d.step(&model, Fault::None, EMAIL_MIRROR).await;
        assert_eq!(
            d.contact(EMAIL_MIRROR, "user2@example.com"),
            Some(row.contact()),
            "{}: the contact is back",
            d.store.name()
        );
        d.stop().await;
    }
}

/// Case 1, a create: Loops created the contact and fired `contactCreated`, the answer was lost;
/// then the row changes. The next write does not fire `contactCreated` again (the creation's
/// idempotency key is the record's, whatever its values).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_a_lost_create_then_a_change_fires_one_creation() {
    let Some(deployments) = both(EMAIL_MIRROR).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(1);
        let lost = d
            .step(&model, Fault::Errors { after_effect: true }, EMAIL_MIRROR)
            .await;
        assert_eq!(lost.dead_lettered, 1);
        model.rows.get_mut(&1).unwrap().plan = Some("gold".into());
        let next = d.step(&model, Fault::None, EMAIL_MIRROR).await;
        assert_eq!(next.status, "succeeded");
        let created = d
            .sim
            .workflows()
            .iter()
            .filter(|w| w.event_name.as_deref() == Some("contactCreated"))
            .count();
        assert_eq!(created, 1, "{}: contactCreated fired once", d.store.name());
        assert_eq!(
            d.contact(EMAIL_MIRROR, "user1@example.com").unwrap()["userGroup"],
            "gold"
        );
        d.stop().await;
    }
}

/// Case 1, a create whose answer was lost, then an email change: the re-key's write is the
/// record's creation, keyed as the lost create was, so `contactCreated` fires once (it used to
/// fire for the lost create and again for the re-key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_a_lost_create_then_an_email_change_fires_one_creation() {
    let Some(deployments) = both(EMAIL_MIRROR).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(1);
        let lost = d
            .step(&model, Fault::Errors { after_effect: true }, EMAIL_MIRROR)
            .await;
        assert_eq!(lost.dead_lettered, 1);
        model.rows.get_mut(&1).unwrap().email = Some("moved1@example.com".into());
        let next = d.step(&model, Fault::None, EMAIL_MIRROR).await;
        assert_eq!(next.status, "succeeded", "{:?}", report(&next));
        let created = d
            .sim
            .workflows()
            .iter()
            .filter(|w| w.event_name.as_deref() == Some("contactCreated"))
            .count();
        assert_eq!(created, 1, "{}: contactCreated fired once", d.store.name());
        assert!(d.contact(EMAIL_MIRROR, "moved1@example.com").is_some());
        assert!(
            d.contact(EMAIL_MIRROR, "user1@example.com").is_none(),
            "{}: the contact of the lost create is removed",
            d.store.name()
        );
        d.stop().await;
    }
}

/// Case 1, re-keys in a row whose answers are all lost: key 1 moves to `a`, then to `b`, each
/// write applied by Loops and every answer lost (its old contact's delete never sent), then to
/// `c` in a clean run. Every contact the lost versions may have made goes (the state keeps
/// each identity possibly applied, not only the last), where `a` used to stay for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_lost_re_keys_in_a_row_leave_no_contact_behind() {
    let Some(deployments) = both(EMAIL_MIRROR).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(2);
        d.step(&model, Fault::None, EMAIL_MIRROR).await;
        for (email, fault) in [
            ("a1@example.com", Fault::Errors { after_effect: true }),
            ("b1@example.com", Fault::Dropped),
            ("c1@example.com", Fault::None),
        ] {
            model.rows.get_mut(&1).unwrap().email = Some(email.into());
            d.step(&model, fault, EMAIL_MIRROR).await;
        }
        let emails: Vec<String> = d.loops(EMAIL_MIRROR).into_keys().collect();
        assert_eq!(
            emails,
            ["c1@example.com", "user2@example.com"],
            "{}",
            d.store.name()
        );
        d.stop().await;
    }
}

/// Case 1, a lost re-key then a revert: key 1 moves to `a` (applied, the answer lost), then back
/// to its confirmed email. The write finds the old contact; the contact the lost re-key may have
/// made goes too (it used to stay: the row was back at its confirmed identity).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_1_a_lost_re_key_then_a_revert_leaves_no_contact_behind() {
    let Some(deployments) = both(EMAIL_MIRROR).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(2);
        d.step(&model, Fault::None, EMAIL_MIRROR).await;
        model.rows.get_mut(&1).unwrap().email = Some("a1@example.com".into());
        d.step(&model, Fault::Errors { after_effect: true }, EMAIL_MIRROR)
            .await;
        model.rows.get_mut(&1).unwrap().email = Some("user1@example.com".into());
        let back = d.step(&model, Fault::None, EMAIL_MIRROR).await;
        assert_eq!(back.status, "succeeded", "{:?}", report(&back));
        let emails: Vec<String> = d.loops(EMAIL_MIRROR).into_keys().collect();
        assert_eq!(
            emails,
            ["user1@example.com", "user2@example.com"],
            "{}",
            d.store.name()
        );
        d.stop().await;
    }
}

/// Case 2: identified by userId, key 1 (userId u1) leaves and key 2 arrives with u1 in the same
/// run: the contact is key 2's now and is not removed (it used to be deleted while the state
/// said key 2 was confirmed). And two rows with one userId are invalid, both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_2_a_user_id_handed_over_is_not_removed() {
    let Some(deployments) = both(USER_ID_UNSUBSCRIBE).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(3);
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        let old = model.rows.remove(&1).unwrap();
        let mut new = Row::new(9);
        new.user_id = old.user_id.clone();
        new.email = old.email.clone();
        model.rows.insert(9, new.clone());
        let run = d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        assert_eq!(run.status, "succeeded", "{:?}", report(&run));
        assert_eq!(
            d.contact(USER_ID_UNSUBSCRIBE, "u1"),
            Some({
                let mut c = new.contact();
                c["email"] = json!(new.email);
                c
            }),
            "{}: u1 is key 9's, subscribed",
            d.store.name()
        );
        // A duplicate userId: both rows invalid, nothing sent for either.
        model.rows.get_mut(&2).unwrap().user_id = Some("u3".into());
        let dup = d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        assert_eq!(dup.invalid, 2, "{}: {:?}", d.store.name(), report(&dup));
        d.stop().await;
    }
}

/// Identified by userId, a record whose userId and email change in one run is a re-key: the
/// write finds no contact by either and Loops makes a new one; under mirror the old contact is
/// unsubscribed by its old userId (it used to stay, subscribed, no row owning it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_and_email_change_is_a_re_key() {
    let Some(deployments) = both(USER_ID_UNSUBSCRIBE).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(2);
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        let row = model.rows.get_mut(&1).unwrap();
        row.user_id = Some("u1-new".into());
        row.email = Some("moved1@example.com".into());
        let moved = row.clone();
        let run = d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        assert_eq!(run.status, "succeeded", "{:?}", report(&run));
        assert_eq!(
            d.contact(USER_ID_UNSUBSCRIBE, "u1-new"),
            Some({
                let mut c = moved.contact();
                c["email"] = json!(moved.email);
                c
            }),
            "{}",
            d.store.name()
        );
        assert_eq!(
            d.contact(USER_ID_UNSUBSCRIBE, "u1")
                .map(|c| c["subscribed"].clone()),
            Some(json!(false)),
            "{}: the old contact is unsubscribed",
            d.store.name()
        );
        d.stop().await;
    }
}

/// Case 2 by email: key 1 moves `e1 → f1` in a run where its row is invalid; new key 2 takes
/// `e1` and writes it. Once key 1 is fixed, its re-key writes f1 and leaves `e1` — key 2's
/// contact — alone (it used to delete it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_2_a_re_key_leaves_the_contact_another_record_took() {
    let Some(deployments) = both(EMAIL_MIRROR).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(2);
        d.step(&model, Fault::None, EMAIL_MIRROR).await;
        {
            let one = model.rows.get_mut(&1).unwrap();
            one.email = Some("f1@example.com".into());
            one.first_name = too_long();
        }
        let mut two = Row::new(7);
        two.email = Some("user1@example.com".into());
        model.rows.insert(7, two.clone());
        d.step(&model, Fault::None, EMAIL_MIRROR).await;
        model.rows.get_mut(&1).unwrap().first_name = "Fixed1".into();
        let fixed = d.step(&model, Fault::None, EMAIL_MIRROR).await;
        assert_eq!(fixed.status, "succeeded", "{:?}", report(&fixed));
        assert_eq!(
            d.contact(EMAIL_MIRROR, "user1@example.com"),
            Some(two.contact()),
            "{}: e1 is key 7's",
            d.store.name()
        );
        assert!(d.contact(EMAIL_MIRROR, "f1@example.com").is_some());
        d.stop().await;
    }
}

/// Case 10: a row that returns after mirror unsubscribed its contact is subscribed again; a
/// contact that unsubscribed on its own stays unsubscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_10_a_row_back_after_an_unsubscribe_is_subscribed_again() {
    let Some(deployments) = both(USER_ID_UNSUBSCRIBE).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(3);
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        let row = model.rows.remove(&1).unwrap();
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        assert_eq!(
            d.contact(USER_ID_UNSUBSCRIBE, "u1").unwrap()["subscribed"],
            false
        );
        model.rows.insert(1, row);
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        assert_eq!(
            d.contact(USER_ID_UNSUBSCRIBE, "u1").unwrap()["subscribed"],
            true,
            "{}: re-subscribed by the sync that unsubscribed it",
            d.store.name()
        );
        // Contact 2 unsubscribes on its own; a change of its row does not re-subscribe it.
        let client = reqwest::Client::new();
        let answer = client
            .put(format!("{}/v1/contacts/update", d.sim.base_url()))
            .bearer_auth("test-key")
            .json(&json!({"userId": "u2", "email": "user2@example.com", "subscribed": false}))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success());
        model.rows.get_mut(&2).unwrap().plan = Some("gold".into());
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        assert_eq!(
            d.contact(USER_ID_UNSUBSCRIBE, "u2").unwrap()["subscribed"],
            false,
            "{}: its own unsubscribe stands",
            d.store.name()
        );
        d.stop().await;
    }
}

/// Case 10 under a lost answer: mirror unsubscribed the contact but the answer was lost (a
/// dead letter); the row comes back unchanged. The contact is subscribed again: an unsubscribe
/// possibly applied counts as one applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_10_a_lost_unsubscribe_then_the_row_returns() {
    let Some(deployments) = both(USER_ID_UNSUBSCRIBE).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(3);
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        let row = model.rows.remove(&1).unwrap();
        let lost = d.step(&model, Fault::Dropped, USER_ID_UNSUBSCRIBE).await;
        assert_eq!(lost.dead_lettered, 1, "{}", d.store.name());
        assert_eq!(
            d.contact(USER_ID_UNSUBSCRIBE, "u1").unwrap()["subscribed"],
            false,
            "Loops applied it"
        );
        model.rows.insert(1, row);
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        assert_eq!(
            d.contact(USER_ID_UNSUBSCRIBE, "u1").unwrap()["subscribed"],
            true,
            "{}: re-subscribed",
            d.store.name()
        );
        d.stop().await;
    }
}

/// Case 11: a userId change whose answer was lost (Loops applied it: a dead letter), then the
/// row leaves. The record's confirmed userId is no longer in Loops: its unsubscribe must not
/// fail on it ("No contact found with this userId"), and the contact under the new userId is
/// unsubscribed (seeds 1067997300 and 2976652458 of the history above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_11_a_lost_user_id_change_then_the_row_leaves() {
    let Some(deployments) = both(USER_ID_UNSUBSCRIBE).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(3);
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        model.rows.get_mut(&1).unwrap().user_id = Some("v1".into());
        d.lose(&model, USER_ID_UNSUBSCRIBE, 1, "v1").await;
        model.rows.remove(&1);
        d.clean(&model, USER_ID_UNSUBSCRIBE).await;
        assert_eq!(
            d.contact(USER_ID_UNSUBSCRIBE, "v1").unwrap()["subscribed"],
            false,
            "{}: the contact under the new userId is unsubscribed",
            d.store.name()
        );
        assert!(d.contact(USER_ID_UNSUBSCRIBE, "u1").is_none());
        d.stop().await;
    }
}

/// Case 11 without the sync's doubt: someone changed the contact's userId in Loops, then the
/// row leaves. No contact holds the userId the sync confirmed, so none is subscribed by it:
/// the unsubscribe's goal is met (as a delete's 404), not a rejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_11_a_user_id_changed_in_loops_then_the_row_leaves() {
    let Some(deployments) = both(USER_ID_UNSUBSCRIBE).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(3);
        d.step(&model, Fault::None, USER_ID_UNSUBSCRIBE).await;
        let answer = reqwest::Client::new()
            .put(format!("{}/v1/contacts/update", d.sim.base_url()))
            .bearer_auth("test-key")
            .json(&json!({"email": "user1@example.com", "userId": "elsewhere"}))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success());
        model.rows.remove(&1);
        d.clean(&model, USER_ID_UNSUBSCRIBE).await;
        d.stop().await;
    }
}

/// Case 12: key 2 takes key 1's email while key 1 moves to a new address, both answers lost
/// (Loops applied them: dead letters); then key 1 leaves. Its confirmed email is key 2's now,
/// so its removal is released — but the contact its lost re-key made under the new address
/// must still go (seed 2237948 of `email_mirror_with_workflows`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_12_a_lost_re_key_then_the_row_leaves_its_old_email_taken() {
    let Some(deployments) = both(EMAIL_MIRROR).await else {
        return;
    };
    for mut d in deployments {
        let mut model = Model::new(3);
        d.step(&model, Fault::None, EMAIL_MIRROR).await;
        model.rows.get_mut(&1).unwrap().email = Some("new1@example.com".into());
        model.rows.get_mut(&2).unwrap().email = Some("user1@example.com".into());
        d.lose(&model, EMAIL_MIRROR, 2, "new1@example.com").await;
        model.rows.remove(&1);
        d.clean(&model, EMAIL_MIRROR).await;
        let loops = d.loops(EMAIL_MIRROR);
        assert!(
            !loops.contains_key("new1@example.com"),
            "{}: key 1 left, the contact its lost re-key made must go: {loops:#?}",
            d.store.name()
        );
        assert_eq!(
            loops["user1@example.com"]["firstName"],
            "First2",
            "{}: key 2's contact stays",
            d.store.name()
        );
        d.stop().await;
    }
}
