//! The dead letters of `loopsync dlq`: the records whose latest outcome is dead-lettered
//! (retries spent, or an outcome the checkpointer could not record), read from
//! `loopsync.records` — the same with or without NATS — and selected by a [`Filter`]. `park`
//! sets them aside so that no run retries them until their data changes; a replay asks one run
//! per sync about those keys only ([`by_sync`] groups them).

use loopsync_core::envelope::OutcomeStatus;
use loopsync_core::{Classified, ErrorClass};
use loopsync_warehouse::{RecordResult, Warehouse, WarehouseError};
use tokio_util::sync::CancellationToken;

use crate::EngineError;
use crate::pipeline::Pipeline;
use crate::runs::{RunObserver, RunOptions, Runs, SyncRun};
/// Which dead letters: the filter every command about failed records shares.
pub use crate::selection::{Filter, by_sync, parse_since};

/// The dead letters `filter` selects, in the warehouse's order (that of `rejections`).
pub async fn dead_letters(
    warehouse: &dyn Warehouse,
    filter: &Filter,
) -> Result<Vec<RecordResult>, DlqError> {
    Ok(crate::selection::select(warehouse, OutcomeStatus::DeadLettered, filter).await?)
}

/// Parks `letters`: no run retries them until their data changes. Returns how many records
/// were parked.
pub async fn park(warehouse: &dyn Warehouse, letters: &[RecordResult]) -> Result<u64, DlqError> {
    let mut parked = 0;
    for (sync, keys) in by_sync(letters) {
        parked += warehouse.park(&sync, &keys).await?;
    }
    Ok(parked)
}

/// Why the dead letters could not be read or parked.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The warehouse failed.
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
}

impl Classified for DlqError {
    fn class(&self) -> ErrorClass {
        match self {
            DlqError::Warehouse(e) => e.class(),
        }
    }
}

/// `dlq replay`: one run per sync about its dead letters' keys only, each waited for, in the
/// order [`by_sync`] gives ([`Runs::each`]). The letters go where their syncs' state belongs,
/// or not at all: the API key's team is asked first (counted as the first replay's
/// preflight), and a sync bound to another Loops is refused (reported to `observer`, the
/// others go on). With `local`, this process runs the stages (else `loopsync worker`
/// processes do). `shutdown` cancelled: [`EngineError::Stopped`].
pub async fn replay(
    pipeline: &mut Pipeline,
    letters: &[RecordResult],
    local: bool,
    observer: &mut dyn RunObserver,
    shutdown: &CancellationToken,
) -> Result<Vec<SyncRun>, EngineError> {
    let mut runs = Runs::start(pipeline, RunOptions::default()).await?;
    if local {
        pipeline.spawn_all()?;
    }
    runs.each(by_sync(letters), observer, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::tests::record;

    /// Only the records whose latest outcome is dead-lettered, as the filter narrows them.
    #[tokio::test]
    async fn only_dead_letters_are_selected() {
        let model = crate::testing::Model::new().await;
        let w = &*model.warehouse;
        w.prepare().await.unwrap();
        let run = w.create_run("users").await.unwrap();
        let mut outcomes = Vec::new();
        for (key, status) in [
            ("1", OutcomeStatus::DeadLettered),
            ("2", OutcomeStatus::Invalid),
            ("3", OutcomeStatus::Rejected),
            ("4", OutcomeStatus::DeadLettered),
        ] {
            outcomes.push(
                loopsync_core::envelope::Outcome::new("users", run, key, "fp", status, "upsert")
                    .with_reason(format!("reason {key}")),
            );
        }
        w.record_outcomes(&outcomes).await.unwrap();
        let keys = |letters: Vec<RecordResult>| -> Vec<String> {
            letters.into_iter().map(|r| r.key).collect()
        };
        let all = dead_letters(w, &Filter::default()).await.unwrap();
        assert_eq!(keys(all), ["1", "4"]);
        let some = Filter {
            reason: Some("reason 4".into()),
            ..Filter::default()
        };
        assert_eq!(keys(dead_letters(w, &some).await.unwrap()), ["4"]);
        assert_eq!(
            by_sync(&[record("users", "1", "dead_lettered", "", "")]),
            [("users".to_owned(), vec!["1".to_owned()])]
        );
    }
}
