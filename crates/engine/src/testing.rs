//! Test fixtures: a SQLite warehouse in a temporary folder, with a `users` model table.

use std::path::PathBuf;
use std::sync::Arc;

use loopsync_core::spec::{
    Behavior, DEFAULT_MAX_REMOVAL_SHARE, IdentifyBy, MappedProperty, OnRemove, SyncSpec,
};
use loopsync_core::value::PropertyKind;
use loopsync_warehouse::Warehouse;

/// A prepared SQLite warehouse whose `users` table (`id`, `email`, `user_id`, all text, no
/// constraint: duplicate and NULL keys allowed) is the model of [`spec`].
pub(crate) struct Model {
    pub(crate) warehouse: Arc<dyn Warehouse>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Model {
    pub(crate) async fn new() -> Model {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warehouse.db");
        let warehouse = loopsync_warehouse::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        warehouse.prepare().await.unwrap();
        let model = Model {
            warehouse,
            path,
            _dir: dir,
        };
        model.execute("CREATE TABLE users (id TEXT, email TEXT, user_id TEXT)");
        model
    }

    /// Runs SQL on the warehouse's file, as whoever maintains the model would.
    pub(crate) fn execute(&self, sql: &str) {
        rusqlite::Connection::open(&self.path)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    /// Adds rows: (id, email, user_id).
    pub(crate) fn insert(&self, rows: &[(Option<&str>, Option<&str>, Option<&str>)]) {
        let db = rusqlite::Connection::open(&self.path).unwrap();
        for row in rows {
            db.execute(
                "INSERT INTO users (id, email, user_id) VALUES (?1, ?2, ?3)",
                rusqlite::params![row.0, row.1, row.2],
            )
            .unwrap();
        }
    }
}

/// Sync `s`: `users` upserted by email, with the userId mapped.
pub(crate) fn spec() -> SyncSpec {
    let property = |property: &str, column: &str| MappedProperty {
        property: property.into(),
        column: column.into(),
        kind: PropertyKind::String,
    };
    SyncSpec {
        name: "s".into(),
        model: "SELECT id, email, user_id FROM users".into(),
        primary_key: "id".into(),
        identify_by: IdentifyBy::Email,
        behavior: Behavior::Upsert,
        on_remove: OnRemove::Delete,
        trigger_workflows: false,
        event_on_create: "c".into(),
        event_on_update: "u".into(),
        properties: vec![property("email", "email"), property("userId", "user_id")],
        lists: vec![],
        max_removal_share: DEFAULT_MAX_REMOVAL_SHARE,
        append: None,
        incremental: None,
    }
}
