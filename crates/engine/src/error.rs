//! What can go wrong in the engine, with the class of each failure where a caller decides on
//! it (the binary: exit status 2 for a usage error or a refusal, 1 otherwise).

use loopsync_bus::BusError;
use loopsync_core::{Classified, ErrorClass};
use loopsync_loops_client::LoopsError;
use loopsync_warehouse::WarehouseError;

use crate::destination::Refused;
use crate::runs::Stalled;

/// An engine failure. Variants that wrap another error carry it as their source, so a caller
/// printing the chain (`{:#}` through `anyhow`) reads the same words as the inner error's.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The config names no such sync (`--sync NAME`): a usage error.
    #[error("no sync named \"{0}\" in the config")]
    UnknownSync(String),
    /// The config has no `[[sync]]`: a usage error.
    #[error("the config has no [[sync]]")]
    NoSync,
    /// Following the schedules, but none of the syncs asked for has one: a usage error.
    #[error(
        "no sync has a schedule: add `schedule = \"*/15 * * * *\"` to a [[sync]], or use --once"
    )]
    NoSchedule,
    /// What a sync maps cannot be sent to this Loops (a mailing list it lacks, a property it
    /// types otherwise): found before the run, nothing was sent. A config error.
    #[error("sync {sync}: nothing sent, every record would be refused by Loops: {}", problems.join("; "))]
    Unsendable { sync: String, problems: Vec<String> },
    /// A sync's state belongs to another Loops than the configured one: nothing was sent.
    #[error(transparent)]
    Refused(Box<Refused>),
    /// A run made no progress for the wait's no-progress deadline; it was given up.
    #[error(transparent)]
    Stalled(Box<Stalled>),
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A call to Loops failed; `context` says which.
    #[error("{context}")]
    Loops {
        context: String,
        #[source]
        source: LoopsError,
    },
    /// A call to Loops failed outside any named step (a client that cannot be built, a
    /// request `verify` could not make).
    #[error(transparent)]
    LoopsClient(#[from] LoopsError),
    /// A worker's task panicked.
    #[error("a worker panicked")]
    WorkerPanicked(#[source] tokio::task::JoinError),
    /// A worker ended on its own, without an error and without being asked to stop.
    #[error("a worker stopped")]
    WorkerStopped,
    /// No sync's schedule fires again.
    #[error("no schedule has a next occurrence")]
    NoNextOccurrence,
    /// The shutdown token was cancelled before the work was done.
    #[error("stopped by a signal")]
    Stopped,
}

impl EngineError {
    /// A failure of how loopsync was called or configured, or a refusal: the binary's exit
    /// status 2 rather than 1.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            EngineError::UnknownSync(_)
                | EngineError::NoSync
                | EngineError::NoSchedule
                | EngineError::Refused(_)
                | EngineError::Unsendable { .. }
                | EngineError::Warehouse(WarehouseError::BadUrl(_))
        )
    }

    /// Another run of the sync is in progress (a second scheduler, a replay).
    pub fn is_run_in_progress(&self) -> bool {
        matches!(
            self,
            EngineError::Warehouse(WarehouseError::RunInProgress { .. })
        )
    }

    /// Wraps a Loops error with what the engine was doing.
    pub(crate) fn loops(context: impl Into<String>) -> impl FnOnce(LoopsError) -> EngineError {
        let context = context.into();
        move |source| EngineError::Loops { context, source }
    }
}

impl Classified for EngineError {
    fn class(&self) -> ErrorClass {
        match self {
            EngineError::Warehouse(e) => e.class(),
            EngineError::Bus(e) => e.class(),
            EngineError::Loops { source, .. } | EngineError::LoopsClient(source) => source.class(),
            EngineError::UnknownSync(_)
            | EngineError::NoSync
            | EngineError::NoSchedule
            | EngineError::Refused(_)
            | EngineError::Unsendable { .. }
            | EngineError::Stalled(_)
            | EngineError::WorkerPanicked(_)
            | EngineError::WorkerStopped
            | EngineError::NoNextOccurrence
            | EngineError::Stopped => ErrorClass::Permanent,
        }
    }
}

impl From<Refused> for EngineError {
    fn from(refused: Refused) -> EngineError {
        EngineError::Refused(Box::new(refused))
    }
}

impl From<Stalled> for EngineError {
    fn from(stalled: Stalled) -> EngineError {
        EngineError::Stalled(Box::new(stalled))
    }
}
