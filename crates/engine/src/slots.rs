//! The team's rate budget kept in the state store, for deployments without NATS: every process
//! that shares the state (a `run`, a `verify` beside it, a `dlq replay`) takes its requests'
//! slots from one row per team, so together they stay within Loops' limit. The pacing is the
//! bus's ([`loopsync_bus::budget::take_slots`]); the store only keeps the entry (the due time
//! and its writer's clock), swapped atomically.

use std::sync::Arc;

use async_trait::async_trait;
use loopsync_bus::BusError;
use loopsync_bus::budget::{SlotLedger, Stamp};
use loopsync_warehouse::Warehouse;

/// The state store as the [`SlotLedger`] of a shared rate budget.
pub struct StoredSlots(pub Arc<dyn Warehouse>);

/// A failure of the state store, as the budget says it (retryable when the store's is).
fn error(e: loopsync_warehouse::WarehouseError) -> BusError {
    BusError::Ledger {
        what: "ledger: rate budget in the state",
        source: Box::new(e),
    }
}

#[async_trait]
impl SlotLedger for StoredSlots {
    async fn read_due(&self, key: &str) -> Result<Option<(Stamp, u64)>, BusError> {
        let kept = self.0.read_rate_slot(key).await.map_err(error)?;
        Ok(kept.map(|k| {
            let stamp = Stamp {
                due: k.next_due.max(0) as u64,
                written_at: k.written_at.max(0) as u64,
            };
            (stamp, k.revision.max(0) as u64)
        }))
    }

    async fn swap_due(
        &self,
        key: &str,
        next: Stamp,
        expected: Option<u64>,
    ) -> Result<Option<u64>, BusError> {
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let swapped = self
            .0
            .swap_rate_slot(key, int(next.due), int(next.written_at), expected.map(int))
            .await
            .map_err(error)?;
        Ok(swapped.map(|revision| revision.max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use loopsync_bus::RateBudget;
    use loopsync_warehouse::SqliteWarehouse;

    use super::*;

    /// Two budgets on one state (two processes) share its slots: 21 requests at 10 per second,
    /// taken by both, span at least 2 s; alone, a budget paces the same; a due time is swapped
    /// only at the revision read.
    #[tokio::test]
    async fn two_processes_share_one_budget_through_the_state() {
        let path = std::env::temp_dir().join(format!(
            "{}.db",
            loopsync_testkit::unique("loopsync-engine-slots-")
        ));
        let open = || {
            let w = SqliteWarehouse::open(&path.display().to_string()).unwrap();
            Arc::new(w) as Arc<dyn Warehouse>
        };
        let (a, b) = (open(), open());
        a.prepare().await.unwrap();
        let stamp = |due| Stamp {
            due,
            written_at: due - 1,
        };
        let (one, two) = (StoredSlots(a.clone()), StoredSlots(b.clone()));
        assert_eq!(one.read_due("team").await.unwrap(), None);
        assert_eq!(one.swap_due("team", stamp(5), None).await.unwrap(), Some(1));
        assert_eq!(
            two.swap_due("team", stamp(6), None).await.unwrap(),
            None,
            "one row per team"
        );
        assert_eq!(
            two.swap_due("team", stamp(6), Some(9)).await.unwrap(),
            None,
            "a stale revision"
        );
        assert_eq!(
            two.swap_due("team", stamp(6), Some(1)).await.unwrap(),
            Some(2)
        );
        assert_eq!(one.read_due("team").await.unwrap(), Some((stamp(6), 2)));

        let budget = |w: Arc<dyn Warehouse>| {
            RateBudget::stored(Arc::new(StoredSlots(w)), "shared".into(), 10)
        };
        let (one, two) = (budget(a), budget(b));
        let start = tokio::time::Instant::now();
        let take = |budget: RateBudget, n: usize| async move {
            for _ in 0..n {
                budget.ready().await.unwrap();
            }
        };
        tokio::join!(take(one, 11), take(two, 10));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(2000),
            "21 slots at 10/s shared by two takers: {took:?}"
        );
        let _ = std::fs::remove_file(&path);
    }
}
