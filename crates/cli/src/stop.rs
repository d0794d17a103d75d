//! How every command stops on SIGTERM or SIGINT (PRODUCT.md: within 10 s, in any phase, the
//! state consistent; a second signal exits at once).
//!
//! The first signal cancels one token ([`requested`]) that the command and its pipeline observe;
//! `main` gives the command [`GRACE`] to wind down (a pipeline's workers give their in-flight
//! handlers less, then nak their messages), then abandons whatever still runs, as SIGKILL would:
//! the state only advances on Loops' confirmation, in the checkpointer's transactions. Runs the
//! process was waiting for ([`watch_run`]) are closed as `interrupted` at once, with a short
//! deadline (if the warehouse does not answer, the lease closes them later). A second signal
//! exits the process at once.

use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use loopsync_engine::state::Warehouse;
use tokio_util::sync::CancellationToken;

/// How long a command may wind down after the first signal before it is abandoned.
pub const GRACE: Duration = loopsync_core::tuning::COMMAND_GRACE;

/// The deadline of the write that closes the open runs as `interrupted`.
const CLOSE_DEADLINE: Duration = loopsync_core::tuning::CLOSE_DEADLINE;

static TOKEN: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);
static SIGNAL: OnceLock<&'static str> = OnceLock::new();
/// Runs this process waits for: closed as `interrupted` when it is stopped.
static OPEN_RUNS: Mutex<Vec<(Arc<dyn Warehouse>, i64)>> = Mutex::new(Vec::new());

/// The stop asked by the first signal; every command and pipeline observes it.
pub fn token() -> CancellationToken {
    TOKEN.clone()
}

/// Resolves once a signal asked the process to stop.
pub async fn requested() {
    TOKEN.cancelled().await
}

/// The signal that asked the process to stop, if one did.
pub fn signal() -> Option<&'static str> {
    SIGNAL.get().copied()
}

/// The command was stopped by a signal: `main` says so on one line, without "error:".
#[derive(Debug, thiserror::Error)]
#[error("stopped by a signal")]
pub struct Stopped;

/// This process waits for `run_id`: if it is stopped first, the run is closed `interrupted`.
pub fn watch_run(warehouse: Arc<dyn Warehouse>, run_id: i64) {
    OPEN_RUNS
        .lock()
        .expect("open runs")
        .push((warehouse, run_id));
}

/// `run_id` is over: nothing to close.
pub fn run_over(run_id: i64) {
    OPEN_RUNS
        .lock()
        .expect("open runs")
        .retain(|(_, id)| *id != run_id);
}

/// Closes every watched run still in progress as `interrupted` ("stopped by SIGTERM"), within
/// [`CLOSE_DEADLINE`]; returns the ids of those closed.
pub async fn close_open_runs() -> Vec<i64> {
    let open = std::mem::take(&mut *OPEN_RUNS.lock().expect("open runs"));
    if open.is_empty() {
        return Vec::new();
    }
    let why = format!("stopped by {}", signal().unwrap_or("a signal"));
    let close = futures::future::join_all(open.iter().map(|(warehouse, run_id)| {
        let why = why.as_str();
        async move {
            match warehouse.interrupt_run(*run_id, why).await {
                Ok(true) => Some(*run_id),
                Ok(false) => None,
                Err(error) => {
                    crate::logs::warn(&format!(
                        "run {run_id} could not be marked interrupted ({error}); the next run closes it when its lease expires"
                    ));
                    None
                }
            }
        }
    }));
    match tokio::time::timeout(CLOSE_DEADLINE, close).await {
        Ok(closed) => closed.into_iter().flatten().collect(),
        Err(_) => {
            crate::logs::warn(&format!(
                "the warehouse did not answer within {CLOSE_DEADLINE:?}: the next run closes the interrupted run when its lease expires"
            ));
            Vec::new()
        }
    }
}

/// Listens for SIGTERM and SIGINT (from now on: they no longer end the process by default):
/// the first cancels [`token`], a second exits the process at once with `second_status`.
pub fn listen(second_status: u8) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::warn!("cannot listen for SIGTERM and SIGINT");
            return;
        };
        tokio::spawn(async move {
            let mut next = async || {
                tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                }
            };
            let first = next().await;
            let _ = SIGNAL.set(first);
            TOKEN.cancel();
            let second = next().await;
            crate::logs::info(&format!("{second} again: exiting at once"));
            std::process::exit(i32::from(second_status));
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = SIGNAL.set("Ctrl-C");
            TOKEN.cancel();
        }
        if tokio::signal::ctrl_c().await.is_ok() {
            crate::logs::info("Ctrl-C again: exiting at once");
            std::process::exit(i32::from(second_status));
        }
    });
}
