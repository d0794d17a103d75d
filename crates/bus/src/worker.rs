//! The one place where the class of an error becomes an acknowledgement decision.
//!
//! A stage implements [`Handler`] (or [`BatchHandler`]); its errors carry an
//! [`ErrorClass`]. [`settle`] maps the result and the attempt number to [`Settle`]:
//!
//! | result | | message |
//! |---|---|---|
//! | `Ok` | | ack |
//! | retryable, attempts left | | nak with the server's delay or a jittered backoff |
//! | retryable, no attempts left | give up: dead-lettered | dead letter, then term |
//! | permanent | give up: rejected | ack (the rejection is the record's final state) |
//! | poison | give up: dead-lettered | dead letter, then term |
//!
//! "Give up" lets the stage record the record's fate (an outcome) before the message goes.
//! Acknowledgement always follows the effect: nothing is acked before `handle` returned.
//!
//! The bus may give up on a message too: one delivered its maximum number of times without
//! ever being settled, because a worker crashed or hung on it each time
//! ([`Messaging::exhausted`]). The workers of its stage take those beside their work and settle
//! each as a dead letter, through the same `give_up`: every fate is decided here.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use loopsync_core::reason::reason_class;
use loopsync_core::stage::Stage;
use loopsync_core::{Classified, ErrorClass};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{BusError, DeadLetter, Delivery, Messaging, sync_of};

/// What a handler sees of a delivery besides its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    pub subject: String,
    /// 1 on the first delivery.
    pub attempt: u32,
    pub sequence: u64,
}

/// Why a message will not be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The other side refused it for good.
    Rejected,
    /// Out of attempts, or unreadable.
    DeadLettered,
}

impl Fate {
    /// The outcome of a record given up this way.
    pub fn status(self) -> loopsync_core::envelope::OutcomeStatus {
        match self {
            Fate::Rejected => loopsync_core::envelope::OutcomeStatus::Rejected,
            Fate::DeadLettered => loopsync_core::envelope::OutcomeStatus::DeadLettered,
        }
    }
}

/// A stage's work on one message.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    type Error: Classified + Display + Send + Sync + 'static;

    /// Does the work. Returns only when its effect is final (published, stored, confirmed).
    async fn handle(&self, info: &DeliveryInfo, payload: &Bytes) -> Result<(), Self::Error>;

    /// The message will not be tried again: record the record's fate.
    async fn give_up(
        &self,
        info: &DeliveryInfo,
        payload: &Bytes,
        fate: Fate,
        reason: &str,
    ) -> Result<(), Self::Error>;

    /// The record the message is about, as log lines name it
    /// ([`loopsync_core::keys::log_key`], never the key itself); `None` when the message is no
    /// record's (a run request) or cannot be read.
    fn record(&self, _payload: &Bytes) -> Option<String> {
        None
    }
}

/// A stage's work on a batch of messages (all succeed or all fail).
#[async_trait]
pub trait BatchHandler: Send + Sync + 'static {
    type Error: Classified + Display + Send + Sync + 'static;
    async fn handle_batch(&self, batch: &[(DeliveryInfo, Bytes)]) -> Result<(), Self::Error>;

    /// The message will not be tried again (rejected, dead-lettered): record that where people
    /// look (`dlq list`) before it goes to the bus's dead letters. A retryable error keeps the
    /// message for later.
    async fn give_up(
        &self,
        _info: &DeliveryInfo,
        _payload: &Bytes,
        _reason: &str,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Exponential backoff with jitter: attempt n waits a random time in [d/2, d], with
/// d = min(cap, base · 2^(n-1)).
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: loopsync_core::tuning::BACKOFF_BASE,
            cap: loopsync_core::tuning::BACKOFF_CAP,
        }
    }
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        let full = self.base.saturating_mul(exp).min(self.cap);
        let jitter = rand::rng().random_range(0.5..=1.0);
        full.mul_f64(jitter)
    }
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Messages handled at once in this process (a message being acked, its handler done, no
    /// longer counts).
    pub concurrency: usize,
    /// Attempts before a retryable failure is given up.
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// While a handler runs, tell the bus it is still at work this often, so that a long
    /// extraction or a wait for the rate budget is not redelivered elsewhere. Set it below the
    /// bus's ack wait; `None` where the bus has no redelivery timer.
    pub progress_every: Option<Duration>,
    /// On shutdown, how long in-flight handlers may still run; then they are dropped and their
    /// messages nak'd, to be redelivered (nothing is acked that did not take effect).
    pub shutdown_grace: Duration,
}

/// The default [`WorkerOptions::shutdown_grace`]: well below the 10 s in which a signal stops
/// any command (PRODUCT.md).
pub const SHUTDOWN_GRACE: Duration = loopsync_core::tuning::SHUTDOWN_GRACE;

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 4,
            max_attempts: loopsync_core::tuning::MAX_ATTEMPTS,
            backoff: Backoff::default(),
            progress_every: None,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

/// What happens to one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    Ack,
    Nak(Duration),
    /// Record the rejection, then ack.
    Reject(String),
    /// Record the fate, dead-letter, then term.
    DeadLetter(String),
}

/// The longest delay a server may ask for that we honour as is.
const MAX_SERVER_DELAY: Duration = Duration::from_secs(300);

/// When a retryable failure is tried again: the attempts a caller allows and the backoff
/// between them. [`retry_delay`] reads it; a worker's comes from its [`WorkerOptions`].
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts before a retryable failure is given up.
    pub max_attempts: u32,
    /// The wait before the next attempt when the server names none.
    pub backoff: Backoff,
}

impl WorkerOptions {
    /// The retry half of these options, for [`retry_delay`].
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            backoff: self.backoff.clone(),
        }
    }
}

/// The one retry rule, shared by the workers ([`settle`]) and every call to Loops outside the
/// pipeline (the engine's preflight, `check`, `verify`): after attempt `attempt` failed with
/// `class`, how long to wait before the next one, or `None` to give up. Only a retryable
/// failure with attempts left is tried again; it waits the server's delay (capped at
/// five minutes) or else the policy's jittered backoff.
pub fn retry_delay(class: ErrorClass, attempt: u32, policy: &RetryPolicy) -> Option<Duration> {
    match class {
        ErrorClass::Retryable { after } if attempt < policy.max_attempts => Some(
            after
                .map(|d| d.min(MAX_SERVER_DELAY))
                .unwrap_or_else(|| policy.backoff.delay(attempt)),
        ),
        _ => None,
    }
}

/// The rule of the table above.
pub fn settle(
    result: Result<(), (ErrorClass, String)>,
    attempt: u32,
    options: &WorkerOptions,
) -> Settle {
    match result {
        Ok(()) => Settle::Ack,
        Err((class @ ErrorClass::Retryable { .. }, reason)) => {
            match retry_delay(class, attempt, &options.retry_policy()) {
                Some(delay) => Settle::Nak(delay),
                None => Settle::DeadLetter(format!("gave up after {attempt} attempts: {reason}")),
            }
        }
        Err((ErrorClass::Permanent, reason)) => Settle::Reject(reason),
        Err((ErrorClass::Poison, reason)) => Settle::DeadLetter(reason),
    }
}

fn classify<E: Classified + Display>(result: Result<(), E>) -> Result<(), (ErrorClass, String)> {
    result.map_err(|e| (e.class(), e.to_string()))
}

/// Runs a stage's handler on its consumer until `shutdown`; then stops taking messages and lets
/// in-flight handlers finish for [`WorkerOptions::shutdown_grace`]. Those still running after it
/// are dropped (a handler may be dropped at any await: its effects are idempotent and the state
/// advances only on confirmation) and their messages nak'd at once, to be redelivered.
///
/// Beside its consumer it takes the stage's messages the bus gave up on
/// ([`Messaging::exhausted`]) and settles each as a [`Settle::DeadLetter`].
pub async fn run<H: Handler>(
    bus: Arc<dyn Messaging>,
    stage: Stage,
    handler: Arc<H>,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut consumer = bus.consume(stage, options.concurrency).await?;
    let mover = {
        let (bus, handler, options) = (bus.clone(), handler.clone(), options.clone());
        Mover::start(&*bus.clone(), stage, &shutdown, move |delivery, reason| {
            let (bus, handler, options) = (bus.clone(), handler.clone(), options.clone());
            async move {
                let info = info_of(&delivery);
                dead_letter(&*bus, stage, &*handler, &info, delivery, &reason, &options).await
            }
        })
        .await?
    };
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let abandon = CancellationToken::new();
    loop {
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let delivery = tokio::select! {
            () = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        match delivery {
            None => break,
            Some(Err(error)) => {
                tracing::warn!(stage = stage.name(), %error, "consumer error");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Some(Ok(delivery)) => {
                let (bus, handler, options) = (bus.clone(), handler.clone(), options.clone());
                let abandon = abandon.clone();
                tasks.spawn(async move {
                    process(
                        &*bus, stage, &*handler, delivery, &options, &abandon, permit,
                    )
                    .await;
                });
            }
        }
        while let Some(joined) = tasks.try_join_next() {
            log_panic(stage, joined);
        }
    }
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(options.shutdown_grace).await;
    };
    tokio::select! {
        () = drain(stage, &mut tasks) => {
            mover.stop(stage).await;
            return Ok(());
        }
        () = grace => {}
    }
    tracing::warn!(
        stage = stage.name(),
        in_flight = tasks.len(),
        "shutting down: handlers still running after {:?} are dropped, their messages nak'd",
        options.shutdown_grace
    );
    abandon.cancel();
    // Each abandoned task naks its message; a nak that does not answer soon is left to the
    // bus's redelivery timer.
    if tokio::time::timeout(Duration::from_secs(1), drain(stage, &mut tasks))
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    mover.stop(stage).await;
    Ok(())
}

async fn drain(stage: Stage, tasks: &mut JoinSet<()>) {
    while let Some(joined) = tasks.join_next().await {
        log_panic(stage, joined);
    }
}

/// Logs a task that panicked (its message is left unsettled: the bus redelivers it after its
/// ack wait). Without this, a panicking handler would go unnoticed but for the redeliveries.
fn log_panic(stage: Stage, joined: Result<(), JoinError>) {
    let Err(error) = joined else {
        return;
    };
    if !error.is_panic() {
        return;
    }
    let panic = error.into_panic();
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_owned());
    tracing::error!(
        stage = stage.name(),
        panic = %message,
        "a handler panicked: its message is left unsettled, to be redelivered"
    );
}

/// Why a message the bus gave up on is dead-lettered.
fn exhausted_reason(deliveries: u32) -> String {
    format!("delivered {deliveries} times without being settled (a worker crashed or hung on it)")
}

/// The task that takes a stage's messages the bus gave up on ([`Messaging::exhausted`]), beside
/// the worker's normal consumer and outside its concurrency limit: handlers hung on messages
/// hold every permit, and the messages they hang on are exactly the ones to take here.
struct Mover(Option<(CancellationToken, JoinHandle<()>)>);

impl Mover {
    /// Starts taking the stage's exhausted messages, if the bus has any, and settling each with
    /// `settle(delivery, reason)` until `shutdown`.
    async fn start<F, Fut>(
        bus: &dyn Messaging,
        stage: Stage,
        shutdown: &CancellationToken,
        settle: F,
    ) -> Result<Mover, BusError>
    where
        F: Fn(Delivery, String) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), BusError>> + Send,
    {
        let Some(mut exhausted) = bus.exhausted(stage).await? else {
            return Ok(Mover(None));
        };
        let stop = shutdown.child_token();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = stopped.cancelled() => return,
                    d = exhausted.next() => d,
                };
                match next {
                    None => return,
                    Some(Err(error)) => {
                        tracing::warn!(stage = stage.name(), %error, "exhausted messages");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Some(Ok(delivery)) => {
                        let reason = exhausted_reason(delivery.attempt);
                        if let Err(error) = settle(delivery, reason).await {
                            // Offered again later; every step is idempotent.
                            tracing::warn!(stage = stage.name(), %error, "settling an exhausted message failed");
                        }
                    }
                }
            }
        });
        Ok(Mover(Some((stop, task))))
    }

    /// Stops taking; a settling under way gets a second to finish.
    async fn stop(self, stage: Stage) {
        let Some((stop, mut task)) = self.0 else {
            return;
        };
        stop.cancel();
        match tokio::time::timeout(Duration::from_secs(1), &mut task).await {
            Ok(joined) => log_panic(stage, joined),
            Err(_) => task.abort(),
        }
    }
}

/// Handles one delivery and settles it. `permit` (a place among the worker's
/// [`WorkerOptions::concurrency`]) is let go once the handler is done, before the settling: the
/// acknowledgement's round trip to the bus then overlaps the next message's work instead of
/// holding a place that work could use.
async fn process<H: Handler>(
    bus: &dyn Messaging,
    stage: Stage,
    handler: &H,
    delivery: Delivery,
    options: &WorkerOptions,
    abandon: &CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let info = info_of(&delivery);
    let handled = async {
        let handled = handler.handle(&info, &delivery.payload);
        match options.progress_every {
            None => handled.await,
            Some(every) => {
                tokio::pin!(handled);
                let mut ticks =
                    tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tokio::select! {
                        result = &mut handled => break result,
                        _ = ticks.tick() => {
                            if let Err(error) = delivery.acker.progress().await {
                                tracing::debug!(%error, "in-progress ack failed");
                            }
                        }
                    }
                }
            }
        }
    };
    let result = tokio::select! {
        result = handled => result,
        () = abandon.cancelled() => {
            // Shutting down: the handler is dropped mid-work; the message goes back.
            if let Err(error) = delivery.acker.nak(Duration::ZERO).await {
                tracing::debug!(stage = stage.name(), %error, "nak of an abandoned message failed");
            }
            return;
        }
    };
    drop(permit);
    let result = classify(result);
    let why = result.as_ref().err().map(|(_, reason)| reason.clone());
    let outcome = settle(result, info.attempt, options);
    let settled = match outcome {
        Settle::Ack => delivery.acker.ack().await,
        Settle::Nak(delay) => {
            tracing::info!(
                stage = stage.name(),
                sync = sync_of(&info.subject),
                record = handler.record(&delivery.payload).as_deref().unwrap_or("-"),
                attempt = info.attempt,
                delay_ms = delay.as_millis() as u64,
                // loopsync's words only: Loops' message may repeat an email or a value.
                reason = %reason_class("rejected", why.as_deref()),
                "retrying a message"
            );
            delivery.acker.nak(delay).await
        }
        Settle::Reject(reason) => {
            tracing::info!(
                stage = stage.name(),
                sync = sync_of(&info.subject),
                record = handler.record(&delivery.payload).as_deref().unwrap_or("-"),
                reason = %reason_class("rejected", Some(&reason)),
                "rejected"
            );
            match handler
                .give_up(&info, &delivery.payload, Fate::Rejected, &reason)
                .await
            {
                Ok(()) => delivery.acker.ack().await,
                Err(error) => {
                    tracing::warn!(stage = stage.name(), %error, "recording a rejection failed");
                    delivery
                        .acker
                        .nak(options.backoff.delay(info.attempt))
                        .await
                }
            }
        }
        Settle::DeadLetter(reason) => {
            dead_letter(bus, stage, handler, &info, delivery, &reason, options).await
        }
    };
    if let Err(error) = settled {
        // The message comes back after ack_wait; every effect is idempotent.
        tracing::warn!(stage = stage.name(), %error, "settling a message failed");
    }
}

async fn dead_letter<H: Handler>(
    bus: &dyn Messaging,
    stage: Stage,
    handler: &H,
    info: &DeliveryInfo,
    delivery: Delivery,
    reason: &str,
    options: &WorkerOptions,
) -> Result<(), BusError> {
    // The sync and the record (its log key), not the subject: without NATS there is none,
    // and the record is what `dlq list` shows (by its key) and `dlq replay` sends again.
    tracing::warn!(
        stage = stage.name(),
        sync = sync_of(&info.subject),
        record = handler.record(&delivery.payload).as_deref().unwrap_or("-"),
        attempts = info.attempt,
        reason,
        "dead-lettered: given up and kept with its reason (loopsync dlq list shows it)"
    );
    match handler
        .give_up(info, &delivery.payload, Fate::DeadLettered, reason)
        .await
    {
        Ok(()) => {}
        // Unreadable: there is no record to give an outcome to; the dead letter is all.
        Err(error) if error.class() == ErrorClass::Poison => {}
        Err(error) => {
            tracing::warn!(stage = stage.name(), %error, "recording a dead letter failed");
            return delivery
                .acker
                .nak(options.backoff.delay(info.attempt))
                .await;
        }
    }
    let letter = DeadLetter {
        stage,
        sync: sync_of(&info.subject).to_owned(),
        subject: info.subject.clone(),
        payload: delivery.payload.clone(),
        reason: reason.to_owned(),
        attempts: info.attempt,
        sequence: info.sequence,
    };
    if let Err(error) = bus.dead_letter(letter).await {
        tracing::warn!(stage = stage.name(), %error, "dead-lettering failed");
        return delivery
            .acker
            .nak(options.backoff.delay(info.attempt))
            .await;
    }
    delivery.acker.term().await
}

/// How a batched worker runs.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub max_batch: usize,
    /// The longest a batch stays open once its first message arrived.
    pub max_wait: Duration,
    /// A batch closes when no message arrived for this long.
    pub lull: Duration,
    pub worker: WorkerOptions,
}

/// Runs a batch handler: up to `max_batch` messages are handled together and acked together. A
/// batch stays open while messages keep coming (each within `lull` of the one before, for at
/// most `max_wait`): under a steady flow the batches are large, and the last message of a burst
/// waits only `lull` (a fixed wait of 50 ms was most of a small run's time, as a run ends only
/// once its outcomes are recorded). A batch that fails for a reason other than a retryable
/// one is split and each message settled on its own, and one that keeps failing retryably is
/// bisected (see `settle_batch`), so one bad message cannot hold up others. The stage's
/// messages the bus gave up on ([`Messaging::exhausted`]) are given up on here too.
pub async fn run_batched<H: BatchHandler>(
    bus: Arc<dyn Messaging>,
    stage: Stage,
    handler: Arc<H>,
    options: BatchOptions,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let mut consumer = bus.consume(stage, options.max_batch).await?;
    let mover = {
        let (bus, handler, options) = (bus.clone(), handler.clone(), options.worker.clone());
        Mover::start(&*bus.clone(), stage, &shutdown, move |delivery, reason| {
            let (bus, handler, options) = (bus.clone(), handler.clone(), options.clone());
            async move {
                give_up_without_record(&*bus, stage, &*handler, delivery, reason, &options).await
            }
        })
        .await?
    };
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        let mut batch = match first {
            None => break,
            Some(Err(error)) => {
                tracing::warn!(stage = stage.name(), %error, "consumer error");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Some(Ok(d)) => vec![d],
        };
        // `next` is cancel-safe (the loop above drops it for the shutdown): a wait that ends
        // with nothing loses nothing.
        let deadline = tokio::time::Instant::now() + options.max_wait;
        while batch.len() < options.max_batch {
            let until = deadline.min(tokio::time::Instant::now() + options.lull);
            match tokio::time::timeout_at(until, consumer.next()).await {
                Ok(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
        settle_batch(&*bus, stage, &*handler, batch, &options.worker).await;
    }
    mover.stop(stage).await;
    Ok(())
}

fn info_of(delivery: &Delivery) -> DeliveryInfo {
    DeliveryInfo {
        subject: delivery.subject.clone(),
        attempt: delivery.attempt,
        sequence: delivery.sequence,
    }
}

/// A batch that failed retryably when one of its messages had been tried this often is
/// bisected: a message that always fails must not hold its batch back forever.
const BISECT_AFTER: u32 = 3;

async fn handle_some<H: BatchHandler>(
    handler: &H,
    batch: &[Delivery],
) -> Result<(), (ErrorClass, String)> {
    let items: Vec<(DeliveryInfo, Bytes)> = batch
        .iter()
        .map(|d| (info_of(d), d.payload.clone()))
        .collect();
    classify(handler.handle_batch(&items).await)
}

/// Handles a batch; when it fails:
/// * not retryably: each message is handled on its own, so one bad message cannot take down
///   the others;
/// * retryably, after [`BISECT_AFTER`] attempts: the batch is bisected, each half handled,
///   the half that lands acked, the failing half bisected again, down to the one message that
///   fails (about 2·log2(n) calls). When both halves fail, the cause is most likely the
///   warehouse itself, and the whole batch waits (nak) rather than being tried piece by piece.
async fn settle_batch<H: BatchHandler>(
    bus: &dyn Messaging,
    stage: Stage,
    handler: &H,
    batch: Vec<Delivery>,
    options: &WorkerOptions,
) {
    let mut failing = batch;
    let mut error = match handle_some(handler, &failing).await {
        Ok(()) => return settle_all(bus, stage, handler, failing, Ok(()), options).await,
        Err(error) => error,
    };
    let tried_before = failing.iter().map(|d| d.attempt).max().unwrap_or(1) >= BISECT_AFTER;
    while failing.len() > 1 && error.0.is_retryable() && tried_before {
        let right = failing.split_off(failing.len() / 2);
        let left = failing;
        match (
            handle_some(handler, &left).await,
            handle_some(handler, &right).await,
        ) {
            (Ok(()), Ok(())) => {
                settle_all(bus, stage, handler, left, Ok(()), options).await;
                return settle_all(bus, stage, handler, right, Ok(()), options).await;
            }
            (Ok(()), Err(e)) => {
                settle_all(bus, stage, handler, left, Ok(()), options).await;
                (failing, error) = (right, e);
            }
            (Err(e), Ok(())) => {
                settle_all(bus, stage, handler, right, Ok(()), options).await;
                (failing, error) = (left, e);
            }
            (Err(e), Err(_)) => {
                settle_all(bus, stage, handler, left, Err(e.clone()), options).await;
                return settle_all(bus, stage, handler, right, Err(e), options).await;
            }
        }
    }
    if !error.0.is_retryable() && failing.len() > 1 {
        // Split: each message on its own, so one bad message cannot hold up the others.
        for d in failing {
            let result = handle_some(handler, std::slice::from_ref(&d)).await;
            settle_without_record(bus, stage, handler, d, result, options).await;
        }
        return;
    }
    settle_all(bus, stage, handler, failing, Err(error), options).await;
}

async fn settle_all<H: BatchHandler>(
    bus: &dyn Messaging,
    stage: Stage,
    handler: &H,
    batch: Vec<Delivery>,
    result: Result<(), (ErrorClass, String)>,
    options: &WorkerOptions,
) {
    // All at once: each settling waits for the bus's answer, and one after another a batch of
    // 500 took 500 round trips (under load, most of a second for each batch).
    futures::future::join_all(
        batch
            .into_iter()
            .map(|d| settle_without_record(bus, stage, handler, d, result.clone(), options)),
    )
    .await;
}

/// Settles a message of a stage that has no record to give an outcome to (the checkpointer:
/// its messages *are* outcomes): rejected and dead-lettered both go to the dead letters, after
/// the handler recorded them where people look ([`BatchHandler::give_up`]).
async fn settle_without_record<H: BatchHandler>(
    bus: &dyn Messaging,
    stage: Stage,
    handler: &H,
    delivery: Delivery,
    result: Result<(), (ErrorClass, String)>,
    options: &WorkerOptions,
) {
    let info = info_of(&delivery);
    let settled = match settle(result, info.attempt, options) {
        Settle::Ack => delivery.acker.ack().await,
        Settle::Nak(delay) => delivery.acker.nak(delay).await,
        Settle::Reject(reason) | Settle::DeadLetter(reason) => {
            give_up_without_record(bus, stage, handler, delivery, reason, options).await
        }
    };
    if let Err(error) = settled {
        tracing::warn!(stage = stage.name(), %error, "settling a message failed");
    }
}

/// Gives up on a message of a stage that has no record to give an outcome to: recorded where
/// people look ([`BatchHandler::give_up`]), then dead-lettered; a retryable failure to record
/// it keeps the message for later.
async fn give_up_without_record<H: BatchHandler>(
    bus: &dyn Messaging,
    stage: Stage,
    handler: &H,
    delivery: Delivery,
    reason: String,
    options: &WorkerOptions,
) -> Result<(), BusError> {
    let info = info_of(&delivery);
    match handler.give_up(&info, &delivery.payload, &reason).await {
        Err(error) if error.class().is_retryable() => {
            tracing::warn!(stage = stage.name(), %error, "recording a dead letter failed");
            delivery
                .acker
                .nak(options.backoff.delay(info.attempt))
                .await
        }
        recorded => {
            if let Err(error) = recorded {
                tracing::error!(stage = stage.name(), %error, reason = %reason_class("dead_lettered", Some(&reason)), "a dead letter could not be recorded; it is in the bus's dead letters only");
            }
            dead_letter_raw(bus, stage, &info, delivery, &reason).await
        }
    }
}

/// Dead-letters a message whose handler has no record to give an outcome to.
async fn dead_letter_raw(
    bus: &dyn Messaging,
    stage: Stage,
    info: &DeliveryInfo,
    delivery: Delivery,
    reason: &str,
) -> Result<(), BusError> {
    bus.dead_letter(DeadLetter {
        stage,
        sync: sync_of(&info.subject).to_owned(),
        subject: info.subject.clone(),
        payload: delivery.payload.clone(),
        reason: reason.to_owned(),
        attempts: info.attempt,
        sequence: info.sequence,
    })
    .await?;
    delivery.acker.term().await
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod retry_tests {
    use super::*;

    /// `settle` naks exactly when `retry_delay` says to try again, with the same delay where
    /// it is not jittered (the server's, capped at five minutes).
    #[test]
    fn settle_follows_the_retry_rule() {
        let options = WorkerOptions {
            max_attempts: 3,
            ..WorkerOptions::default()
        };
        let policy = options.retry_policy();
        let classes = [
            ErrorClass::RETRY,
            ErrorClass::Retryable {
                after: Some(Duration::from_secs(7)),
            },
            ErrorClass::Retryable {
                after: Some(Duration::from_secs(3600)),
            },
            ErrorClass::Permanent,
            ErrorClass::Poison,
        ];
        for class in classes {
            for attempt in 1..=4 {
                let delay = retry_delay(class, attempt, &policy);
                let settled = settle(Err((class, "x".into())), attempt, &options);
                match (&settled, delay) {
                    (Settle::Nak(naked), Some(delay)) => {
                        if let ErrorClass::Retryable { after: Some(_) } = class {
                            assert_eq!(*naked, delay);
                        }
                        assert!(delay <= MAX_SERVER_DELAY);
                    }
                    (Settle::Reject(_) | Settle::DeadLetter(_), None) => {}
                    other => panic!("{class:?} attempt {attempt}: {other:?}"),
                }
            }
        }
        assert_eq!(
            retry_delay(ErrorClass::RETRY, 3, &policy),
            None,
            "out of attempts"
        );
        assert_eq!(
            retry_delay(classes[2], 1, &policy),
            Some(MAX_SERVER_DELAY),
            "the server's delay is capped"
        );
    }
}
