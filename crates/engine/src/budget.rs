//! The Loops team's rate budget as every command takes it: the one place that decides where a
//! config's budget is kept. Over NATS when the config names a server (its key-value bucket,
//! shared by every process on it), else in the state store that every process of the
//! deployment shares ([`crate::slots`]). A `verify`, an `adopt` or a `check` beside a `run` or
//! a worker takes from the same budget instead of sending beside it, which would make both
//! meet 429s.

use std::sync::Arc;

use loopsync_bus::{Coordination, RateBudget};
use loopsync_config::Config;
use loopsync_warehouse::Warehouse;

use crate::EngineError;
use crate::settings::bus_settings;
use crate::slots::StoredSlots;

/// The team's budget for `config`: on `bus` (connected from the config) when the config names
/// NATS, else kept in `state`.
pub fn team_budget(
    config: &Config,
    bus: &Arc<dyn Coordination>,
    state: &Arc<dyn Warehouse>,
) -> RateBudget {
    let (name, per_second) = (config.loops.budget_name(), config.loops.requests_per_second);
    if config.nats.is_some() {
        RateBudget::shared(bus.clone(), name, per_second)
    } else {
        RateBudget::stored(Arc::new(StoredSlots(state.clone())), name, per_second)
    }
}

/// The team's budget for a command that starts no pipeline (`adopt`, `check`), its state's
/// tables ready: connects to NATS for it when the config names a server.
pub async fn connect(
    config: &Config,
    state: &Arc<dyn Warehouse>,
) -> Result<RateBudget, EngineError> {
    let installation = state.installation().await?;
    let bus = loopsync_bus::connect(&bus_settings(config), &installation).await?;
    Ok(team_budget(config, &bus.coordination, state))
}
