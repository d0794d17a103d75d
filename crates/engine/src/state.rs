//! The deployment's state as the binary sees it: opened from the config (its model and its state
//! store, whatever the URLs), and the types of what it reports (runs, per-record results). The
//! binary names these from here, never from the warehouse crate.

use std::sync::Arc;

use loopsync_config::Config;

pub use loopsync_warehouse::{
    ExtractCounts, RecordResult, RequestsByKind, RunStatus, RunSummary, StateReset, Warehouse,
    WarehouseError,
};

use crate::settings::warehouse_settings;

/// The config's deployment, its state's tables ready (made or migrated).
pub async fn open(config: &Config) -> Result<Arc<dyn Warehouse>, WarehouseError> {
    let warehouse = loopsync_warehouse::open(&warehouse_settings(config)).await?;
    warehouse.prepare().await?;
    Ok(warehouse)
}

/// The config's deployment for a command that only reads: nothing is made or migrated; a state
/// not made yet reads as empty.
pub async fn open_read_only(config: &Config) -> Result<Arc<dyn Warehouse>, WarehouseError> {
    let warehouse = loopsync_warehouse::open(&warehouse_settings(config)).await?;
    warehouse.read_only().await?;
    Ok(warehouse)
}

/// Whether `error` is a warehouse URL that names no warehouse (a mistake in the config).
pub fn is_bad_url(error: &WarehouseError) -> bool {
    matches!(error, WarehouseError::BadUrl(_))
}
