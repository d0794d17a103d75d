//! The rules of `loopsync reset` beyond the warehouse's own `reset_state`: a reset waits for
//! the sync's run to end (a run still going writes state again as Loops confirms its records),
//! and goes ahead only on a clear yes.

use loopsync_core::spec::SyncSpec;
use loopsync_warehouse::{RunSummary, Warehouse, WarehouseError};

/// What the sync's next run does once its state is forgotten, in words for the user.
pub fn next_run(spec: &SyncSpec) -> String {
    if spec.is_append() {
        return format!(
            "The next run sends every event of the model again: Loops refuses those it took in \
             the last 24 hours (their idempotency keys are the same), the older ones fire again. \
             To start from now instead, run loopsync adopt --sync {} after the reset.",
            spec.name
        );
    }
    if spec.trigger_workflows {
        return format!(
            "Warning: sync {name} triggers workflows, so the next run sends every row of the \
             model as a \"{created}\" event: every workflow it starts runs again for every \
             contact (Loops refuses only the events whose keys it took in the last 24 hours). \
             To take the contacts Loops holds as they are, with no event, run loopsync adopt \
             --sync {name} after the reset.",
            name = spec.name,
            created = spec.event_on_create,
        );
    }
    "The next run sends every row of the model to the Loops the config points at.".to_owned()
}

/// The sync's newest run, if it has not finished: one run of a sync at a time, so this is the
/// one a reset would race with.
pub async fn unfinished_run(
    warehouse: &dyn Warehouse,
    sync: &str,
) -> Result<Option<RunSummary>, WarehouseError> {
    Ok(warehouse
        .runs(Some(sync), 1)
        .await?
        .into_iter()
        .next()
        .filter(|run| !run.is_finished()))
}

/// Whether the answer to "forget the state?" is a yes (`y` or `yes`, any case, blanks
/// around); anything else, an empty line included, keeps the state.
pub fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

#[cfg(test)]
mod tests {
    use loopsync_warehouse::{SqliteWarehouse, StateStore};

    use super::*;

    /// An event sync's reset says that old events fire again, and how to start from now.
    #[test]
    fn a_reset_says_what_the_next_run_sends() {
        let mut spec = crate::testing::spec();
        assert!(next_run(&spec).contains("every row"));
        spec.trigger_workflows = true;
        let said = next_run(&spec);
        assert!(
            said.starts_with("Warning") && said.contains("\"c\" event"),
            "a reset of a workflow sync warns: {said}"
        );
        spec.behavior = loopsync_core::spec::Behavior::Append;
        let said = next_run(&spec);
        assert!(
            said.contains("24 hours") && said.contains("loopsync adopt --sync"),
            "{said}"
        );
    }

    #[test]
    fn only_a_clear_yes_resets() {
        for yes in ["y", "Y", "yes", " YES\n"] {
            assert!(is_yes(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "yes please", "ye"] {
            assert!(!is_yes(no), "{no:?}");
        }
    }

    /// A run in progress is found; once it has ended, or for a sync without runs, none is.
    #[tokio::test]
    async fn the_newest_run_is_unfinished_until_it_ends() {
        let path = std::env::temp_dir().join(format!(
            "{}.db",
            loopsync_testkit::unique("loopsync-engine-reset-")
        ));
        let warehouse = SqliteWarehouse::open(&path.display().to_string()).unwrap();
        warehouse.prepare().await.unwrap();
        assert!(unfinished_run(&warehouse, "users").await.unwrap().is_none());
        let run_id = warehouse.create_run("users").await.unwrap();
        let found = unfinished_run(&warehouse, "users").await.unwrap();
        assert_eq!(found.map(|r| r.id), Some(run_id));
        assert!(unfinished_run(&warehouse, "teams").await.unwrap().is_none());
        warehouse.fail_run(run_id, "stopped").await.unwrap();
        assert!(unfinished_run(&warehouse, "users").await.unwrap().is_none());
        drop(warehouse);
        let _ = std::fs::remove_file(&path);
    }
}
