//! The bus: how the stages talk. All JetStream knowledge of loopsync lives in this crate.
//!
//! * [`Messaging`] is the seam of the messages: publish with a message id, consume a stage's
//!   work queue, dead-letter. [`Coordination`] is the rest the processes share: a small ledger
//!   (last confirmed version per record) and the rate budgets.
//! * [`JetStreamBus`] implements both on NATS JetStream (nats-server 2.9.10 and 2.1x): a
//!   work-queue stream per hop, one durable pull consumer per stage shared by all replicas,
//!   `Nats-Msg-Id` on every publish, a dead-letter stream fed by the workers, who also take
//!   their stage's max-deliveries advisories ([`Messaging::exhausted`]).
//! * [`LocalBus`] implements both in process, for one-process runs without NATS.
//! * [`RateBudget`] is a Loops team's rate budget, shared through [`Coordination`].
//! * [`worker`] is the one place where an error class becomes ack, nak(delay) or term.

pub mod budget;
mod error;
pub mod jetstream;
pub mod local;
pub mod names;
pub mod publish;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use loopsync_core::stage::Stage;
use tokio::task::JoinSet;

pub use budget::RateBudget;
pub use error::BusError;
pub use jetstream::{JetStreamBus, JetStreamOptions, NatsAuth};
pub use local::{LocalBus, LocalLimits};
pub use names::Names;

/// Which bus a deployment talks over.
#[derive(Debug, Clone)]
pub enum BusSettings {
    /// In this process only: one-process runs without NATS.
    InProcess(LocalLimits),
    /// NATS JetStream, shared by every process of the deployment.
    JetStream {
        /// The NATS server, `nats://host:port`.
        url: String,
        /// Prefixes every stream, subject, consumer and bucket name ([`Names`]), so several
        /// deployments can share one server.
        namespace: String,
        /// Ack wait, delivery cap and duplicate window.
        options: JetStreamOptions,
    },
}

/// A connected bus: its two halves, and the tasks it runs in the background.
pub struct Connected {
    /// For the stages and their workers.
    pub messaging: Arc<dyn Messaging>,
    /// For the loader's ledger and the rate budget: the same bus.
    pub coordination: Arc<dyn Coordination>,
    /// The bus's background tasks, for the caller to watch beside its workers (none today:
    /// even the messages the server gives up on are taken by the workers of their stage).
    pub tasks: JoinSet<Result<(), BusError>>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("tasks", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

/// Connects to the bus `settings` names (for JetStream: checks the server's version and
/// provisions every stream, consumer and bucket). The one place that picks an implementation,
/// so that no caller names one. `installation` (the state's id) scopes the messages: two
/// deployments on one namespace never take each other's ([`Names::scoped`]).
pub async fn connect(settings: &BusSettings, installation: &str) -> Result<Connected, BusError> {
    match settings {
        BusSettings::InProcess(limits) => {
            let bus = Arc::new(LocalBus::with_limits(Names::default(), limits.clone()));
            Ok(Connected {
                messaging: bus.clone(),
                coordination: bus,
                tasks: JoinSet::new(),
            })
        }
        BusSettings::JetStream {
            url,
            namespace,
            options,
        } => {
            let bus = Arc::new(
                JetStreamBus::connect(url, Names::scoped(namespace, installation), options).await?,
            );
            Ok(Connected {
                messaging: bus.clone(),
                coordination: bus,
                tasks: JoinSet::new(),
            })
        }
    }
}

/// A message that will not be processed again, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub stage: Stage,
    pub sync: String,
    pub subject: String,
    pub payload: Bytes,
    pub reason: String,
    pub attempts: u32,
    /// The message's sequence in its work-queue stream (0 when unknown).
    pub sequence: u64,
}

/// How the stages talk: messages on the work queues, and the dead letters.
///
/// Apart from [`Coordination`] because a stage that only passes messages on (the extractor,
/// the transformer, the worker loop) has no business with the ledger or the rate budget.
#[async_trait]
pub trait Messaging: Send + Sync + 'static {
    /// Publishes a message for `stage` about `sync` and waits until the bus has stored it. A
    /// second publish with the same `message_id` within the duplicate window is dropped. The
    /// bus names the subject: no code outside this crate builds one.
    async fn publish(
        &self,
        stage: Stage,
        sync: &str,
        message_id: &str,
        payload: Bytes,
    ) -> Result<(), BusError>;

    /// Publishes several messages for `stage`, in order, each as [`Messaging::publish`] would,
    /// and returns once the bus has stored every one (on an error, some may be stored: each
    /// has its message id, so publishing them again is safe). `(sync, message_id, payload)`.
    /// One at a time by default; a bus that can sends them all before waiting for the first
    /// acknowledgement.
    async fn publish_all(
        &self,
        stage: Stage,
        messages: Vec<(String, String, Bytes)>,
    ) -> Result<(), BusError> {
        for (sync, message_id, payload) in messages {
            self.publish(stage, &sync, &message_id, payload).await?;
        }
        Ok(())
    }

    /// Joins the stage's shared consumer; `batch` bounds how many messages are fetched ahead.
    async fn consume(&self, stage: Stage, batch: usize) -> Result<Box<dyn Consumer>, BusError>;

    /// The messages of `stage` the bus itself gave up on: delivered its maximum number of times
    /// without ever being settled (a worker crashed or hung on each, every time). `None` where
    /// the bus never gives up. The worker of the stage settles each as a dead letter, through
    /// the stage's own `give_up`: `term` (or `ack`) then removes it from the work queue, `nak`
    /// leaves it to be offered again after the delay.
    async fn exhausted(&self, stage: Stage) -> Result<Option<Box<dyn Consumer>>, BusError>;

    /// Stores a dead letter.
    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BusError>;

    /// The stored dead letters, oldest first.
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError>;

    /// Messages of a stage's work queue not yet settled (acknowledged or terminated): waiting,
    /// being processed, or waiting to be redelivered. The stage's lag; 0 once it is idle.
    async fn unsettled(&self, stage: Stage) -> Result<u64, BusError>;

    /// Erases the stored messages about `sync` that `matches` picks (`loopsync forget`), in
    /// every stage's work queue and in the dead letters; `matches` is given the stage a
    /// message is for and its payload. Each is read, then deleted by its sequence (JetStream
    /// overwrites its content where it is stored). Returns how many went, per place.
    async fn erase(&self, sync: &str, matches: &Matcher) -> Result<Erased, BusError>;

    /// How many messages about `sync` that `matches` picks are in the stages' work queues,
    /// deleting none (`loopsync forget`, before it erases anything): such a message may be in
    /// a worker's hands, which deleting it from the stream would not stop — its worker would
    /// go on, call Loops and publish what comes next, writing the person back.
    async fn held(&self, sync: &str, matches: &Matcher) -> Result<u64, BusError>;
}

/// Picks the messages to erase: `(the stage a message is for, its payload)`.
pub type Matcher = dyn Fn(Stage, &[u8]) -> bool + Send + Sync;

/// What [`Messaging::erase`] erased.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Erased {
    /// Messages of the stages' work queues (run requests, changes, operations, outcomes).
    pub work_queues: u64,
    /// Dead letters.
    pub dead_letters: u64,
}

/// What the processes of a deployment agree on besides messages: the loader's ledger (last
/// confirmed version per record) and the shared rate budgets.
///
/// Apart from [`Messaging`] because the rate budget is also taken by commands that pass no
/// messages (the preflight), and only the loader needs both.
#[async_trait]
pub trait Coordination: Send + Sync + 'static {
    /// Reads the ledger entry of a record, with its revision.
    async fn ledger_get(&self, key: &str) -> Result<Option<Versioned>, BusError>;

    /// Writes the ledger entry of a record if its revision is still `expected` (`None`: if
    /// the record has no entry). Returns the new revision, or `None` when someone else wrote
    /// first: read again and decide again. Compare-and-set, so two loaders sending two
    /// versions of one record can never overwrite each other's word.
    async fn ledger_swap(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
    ) -> Result<Option<u64>, BusError>;

    /// Erases the ledger entry of a record, and every earlier revision of it (`loopsync
    /// forget`); whether there was one.
    async fn ledger_forget(&self, key: &str) -> Result<bool, BusError>;

    /// Takes one request slot of the rate budget `budget`, shared by every process on this bus,
    /// waiting until one is free. Slots are `period` apart, and a slot taken up to `slack` late
    /// keeps the cadence ([`budget::next_due`]): no burst beyond that.
    /// Up to `count` consecutive slots may be taken at once (`period` apart, the first due
    /// now, or shortly: a slot may be handed out up to half a period, or two round trips to the
    /// ledger, before it is due, and the caller waits for that time, as [`RateBudget`] does):
    /// returns the first one's due time on `taker`'s clock ([`budget::Taker::now`]) and how
    /// many were taken.
    async fn rate_slot(
        &self,
        budget: &str,
        period: Duration,
        slack: Duration,
        count: u32,
        taker: &budget::Taker,
    ) -> Result<(u64, u32), BusError>;
}

/// A ledger entry and its revision (which the next compare-and-set names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Bytes,
    pub revision: u64,
}

/// One replica's handle on a stage's consumer.
#[async_trait]
pub trait Consumer: Send {
    /// The next message; `None` when the consumer is closed.
    async fn next(&mut self) -> Option<Result<Delivery, BusError>>;
}

/// Settles one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(&self) -> Result<(), BusError>;
    async fn nak(&self, delay: Duration) -> Result<(), BusError>;
    async fn term(&self) -> Result<(), BusError>;
    /// "Still working on it": restarts the redelivery timer.
    async fn progress(&self) -> Result<(), BusError>;
}

/// A delivered message.
pub struct Delivery {
    pub subject: String,
    pub payload: Bytes,
    /// 1 on the first delivery.
    pub attempt: u32,
    /// Sequence in the stream (0 when the bus has none).
    pub sequence: u64,
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("subject", &self.subject)
            .field("attempt", &self.attempt)
            .field("sequence", &self.sequence)
            .field("bytes", &self.payload.len())
            .finish()
    }
}

/// The sync a subject is about: its last token.
pub fn sync_of(subject: &str) -> &str {
    subject.rsplit('.').next().unwrap_or(subject)
}
