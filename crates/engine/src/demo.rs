//! `loopsync demo`'s embedded warehouse: an SQLite file with sample users and their product
//! events, and the changes the demo's second run finds. The binary only calls these.

use loopsync_core::{Classified, ErrorClass};

/// The demo's warehouse file could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("the demo's warehouse: {0}")]
pub struct DemoError(#[from] rusqlite::Error);

impl Classified for DemoError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Permanent
    }
}

const PLANS: [&str; 3] = ["free", "pro", "team"];

pub fn seed(path: &std::path::Path, users: u32) -> Result<(), DemoError> {
    let db = rusqlite::Connection::open(path)?;
    db.execute_batch(
        "DROP TABLE IF EXISTS users;
         CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT, first_name TEXT, plan TEXT,
                             signed_up_at TEXT, newsletter INTEGER);",
    )?;
    let names = [
        "Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Frances",
    ];
    for i in 1..=users {
        db.execute(
            "INSERT INTO users VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![
                i,
                format!("user{i}@example.com"),
                names[(i as usize) % names.len()],
                PLANS[(i as usize) % PLANS.len()],
                format!("2024-{:02}-{:02} 09:30:00", 1 + i % 12, 1 + i % 28),
                i % 2,
            ],
        )?;
    }
    seed_events(&db, users)
}

/// What a paying plan costs a month, in the demo's `invoicePaid` events.
fn price(plan: &str) -> i64 {
    match plan {
        "pro" => 29,
        "team" => 99,
        _ => 0,
    }
}

/// The event sync's table: each user on a paying plan started a trial when they signed up and
/// paid an invoice in January 2025 (free users have no events). One row = one event.
fn seed_events(db: &rusqlite::Connection, users: u32) -> Result<(), DemoError> {
    db.execute_batch(
        "DROP TABLE IF EXISTS user_events;
         CREATE TABLE user_events (event_id INTEGER PRIMARY KEY, email TEXT, event_name TEXT,
                                   plan TEXT, amount INTEGER, occurred_at TEXT);",
    )?;
    let mut insert = db.prepare(
        "INSERT INTO user_events (email, event_name, plan, amount, occurred_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for i in 1..=users {
        let plan = PLANS[(i as usize) % PLANS.len()];
        if price(plan) == 0 {
            continue;
        }
        let email = format!("user{i}@example.com");
        let (month, day) = (1 + i % 12, 1 + i % 28);
        insert.execute(rusqlite::params![
            email,
            "trialStarted",
            plan,
            0,
            format!("2024-{month:02}-{day:02}T09:45:00Z"),
        ])?;
        insert.execute(rusqlite::params![
            email,
            "invoicePaid",
            plan,
            price(plan),
            format!("2025-01-{day:02}T08:00:00Z"),
        ])?;
    }
    Ok(())
}

/// How many rows of `user_events` there are.
pub fn count_events(path: &std::path::Path) -> Result<usize, DemoError> {
    let db = rusqlite::Connection::open(path)?;
    let n: i64 = db.query_row("SELECT count(*) FROM user_events", [], |r| r.get(0))?;
    Ok(n as usize)
}

pub fn change_rows(path: &std::path::Path, users: u32) -> Result<ChangedEvents, DemoError> {
    let db = rusqlite::Connection::open(path)?;
    db.execute_batch(&format!(
        "UPDATE users SET plan = 'enterprise' WHERE id IN (1, 2, 3);
         INSERT INTO users VALUES ({a}, 'new.user{a}@example.com', 'Nova', 'free', '2024-12-01 10:00:00', 1);
         INSERT INTO users VALUES ({b}, 'new.user{b}@example.com', 'Orion', 'pro', '2024-12-02 11:00:00', 0);
         INSERT INTO users VALUES ({c}, 'not-an-email', 'Typo', 'free', '2024-12-03 12:00:00', 0);",
        a = users + 1,
        b = users + 2,
        c = users + 3,
    ))?;
    // Two new events, of the two users just added; and the newest invoice is corrected after it
    // was sent (within the cursor's lookback, so the second run reads it: ignored, not resent).
    db.execute_batch(&format!(
        "INSERT INTO user_events (email, event_name, plan, amount, occurred_at)
           VALUES ('new.user{a}@example.com', 'trialStarted', 'pro', 0, '2025-02-01T09:00:00Z');
         INSERT INTO user_events (email, event_name, plan, amount, occurred_at)
           VALUES ('new.user{b}@example.com', 'invoicePaid', 'pro', {price}, '2025-02-02T08:00:00Z');",
        a = users + 1,
        b = users + 2,
        price = price("pro"),
    ))?;
    let edited = db.execute(
        "UPDATE user_events SET amount = amount - 5
         WHERE event_id = (SELECT event_id FROM user_events
                           WHERE occurred_at < '2025-02-01' AND event_name = 'invoicePaid'
                           ORDER BY occurred_at DESC, event_id DESC LIMIT 1)",
        [],
    )?;
    Ok(ChangedEvents { added: 2, edited })
}

/// What the change step did to `user_events`.
pub struct ChangedEvents {
    pub added: usize,
    pub edited: usize,
}
