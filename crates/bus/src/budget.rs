//! The rate budget of one Loops team, shared by every request to it: the loader's and the
//! preflight's. Here rather than in a stage because commands that run no stage take from it too;
//! on the bus because the shared kind is a slot of [`Coordination::rate_slot`].

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::{BusError, Coordination};

/// The interval between two requests of a budget of `per_second`: 1/`per_second`, plus 2 % (at
/// least 1 ms) so that network jitter between processes cannot put `per_second` + 1 requests
/// into one second of a sliding window.
pub fn slot_period(per_second: u32) -> Duration {
    let base = Duration::from_secs(1) / per_second.max(1);
    base + (base / 50).max(Duration::from_millis(1))
}

/// The rate budget of one Loops team, shared by every request to it.
#[derive(Clone)]
pub enum RateBudget {
    /// Shared through the bus by every process of the deployment (the loader's).
    Shared {
        bus: Arc<dyn Coordination>,
        name: String,
        period: Duration,
    },
    /// This process only (commands that run without a bus, such as `check`).
    Local(Arc<DefaultDirectRateLimiter>),
}

impl RateBudget {
    /// The team's budget `name` on `bus`, whatever the number of syncs and workers: one per
    /// Loops team (the config's `LoopsConfig::budget_name`, or `ApiKey::budget_name`: never
    /// the key itself).
    pub fn shared(
        bus: Arc<dyn Coordination>,
        name: String,
        requests_per_second: u32,
    ) -> RateBudget {
        RateBudget::Shared {
            bus,
            name,
            period: slot_period(requests_per_second),
        }
    }

    /// A budget of this process alone: for commands that run without a bus, where no other
    /// process takes from the same team's requests.
    pub fn local(requests_per_second: u32) -> RateBudget {
        RateBudget::Local(Arc::new(pacer(requests_per_second)))
    }

    /// Waits for, and takes, the next request slot.
    pub async fn ready(&self) -> Result<(), BusError> {
        match self {
            RateBudget::Shared { bus, name, period } => bus.rate_slot(name, *period).await,
            RateBudget::Local(pacer) => {
                pacer.until_ready().await;
                Ok(())
            }
        }
    }
}

/// An even pace of `per_second` requests in this process: one every [`slot_period`], no burst.
pub fn pacer(per_second: u32) -> DefaultDirectRateLimiter {
    let quota = Quota::with_period(slot_period(per_second))
        .expect("a positive period")
        .allow_burst(NonZeroU32::MIN);
    RateLimiter::direct(quota)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_leave_room_for_jitter() {
        assert_eq!(slot_period(10), Duration::from_millis(102));
        assert_eq!(slot_period(1000), Duration::from_micros(2000));
    }

    #[test]
    fn pacer_has_no_burst() {
        let p = pacer(10);
        assert!(p.check().is_ok());
        assert!(p.check().is_err(), "the second request waits 100 ms");
    }
}
