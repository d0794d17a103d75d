//! The bus on NATS JetStream.
//!
//! * [`provisioning`]: the streams, consumers and buckets, made by whoever connects.
//! * [`mover`]: the messages the server gave up on (max-deliveries advisories), per stage.
//! * [`erase`]: one person's messages and ledger entry erased (`loopsync forget`).
//!
//! Provisioning is declarative and idempotent: every process that connects makes sure the
//! streams and consumers exist, so workers can start in any order. Works on nats-server 2.9.10
//! (Debian's) and current 2.1x: nothing here needs a 2.10+ field, and the ledger's key-value
//! bucket is created by hand because async-nats' `create_key_value` fails against 2.9.

mod erase;
mod mover;
mod provisioning;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, Context, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use loopsync_core::stage::Stage;

pub use provisioning::max_deliver;
use provisioning::{bucket, provision};

use crate::budget::{SlotLedger, Stamp, Taker};
use crate::error::Source;
use crate::names::Names;
use crate::{
    Acker, BusError, Consumer, Coordination, DeadLetter, Delivery, Erased, Matcher, Messaging,
    Versioned, sync_of,
};

const HEADER_STAGE: &str = "Loopsync-Stage";
const HEADER_SUBJECT: &str = "Loopsync-Subject";
const HEADER_REASON: &str = "Loopsync-Reason";
const HEADER_ATTEMPTS: &str = "Loopsync-Attempts";
const HEADER_SEQUENCE: &str = "Loopsync-Sequence";

/// Tuning of the JetStream bus.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// How long a delivered message may stay unacknowledged before it is redelivered.
    pub ack_wait: Duration,
    /// Server-side cap on deliveries. The worker gives up at its own `max_attempts` first; this
    /// is the safety net for a message whose workers keep crashing, after which the
    /// max-deliveries advisory moves it to the dead-letter stream.
    pub max_deliver: i64,
    /// The same cap for the checkpointer's outcomes; -1: none.
    pub outcomes_max_deliver: i64,
    /// Window of `Nats-Msg-Id` deduplication.
    pub duplicate_window: Duration,
    /// The most bytes each work-queue stream holds; a full one refuses new messages.
    pub max_queue_bytes: u64,
    /// How to authenticate, and whether to use TLS.
    pub auth: NatsAuth,
}

/// How a process authenticates to NATS, and the TLS it asks for. `Debug` shows no secret.
#[derive(Clone, Default)]
pub struct NatsAuth {
    /// User and password.
    pub user_password: Option<(String, String)>,
    /// A token.
    pub token: Option<String>,
    /// A `.creds` file (a user JWT and its NKey seed).
    pub credentials: Option<std::path::PathBuf>,
    /// A PEM file of the CA that signed the server's certificate: TLS required.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAuth")
            .field("user", &self.user_password.as_ref().map(|(u, _)| u))
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("credentials", &self.credentials)
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

impl NatsAuth {
    /// `options` with this authentication and TLS.
    async fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, std::io::Error> {
        if let Some((user, password)) = &self.user_password {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &self.credentials {
            options = options.credentials_file(path).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("nats.credentials: cannot read {}: {e}", path.display()),
                )
            })?;
        }
        if let Some(ca) = &self.tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(options)
    }
}

impl Default for JetStreamOptions {
    fn default() -> Self {
        JetStreamOptions {
            ack_wait: loopsync_core::tuning::ACK_WAIT,
            max_deliver: 10,
            outcomes_max_deliver: -1,
            duplicate_window: loopsync_core::tuning::DUPLICATE_WINDOW,
            max_queue_bytes: loopsync_core::tuning::WORK_QUEUE_MAX_BYTES,
            auth: NatsAuth::default(),
        }
    }
}

/// The bus on NATS JetStream.
#[derive(Clone)]
pub struct JetStreamBus {
    client: async_nats::Client,
    js: Context,
    names: Names,
    ledger: kv::Store,
    budget: kv::Store,
    disconnects: Disconnects,
}

/// Counts the times the connection to NATS dropped, so that a request waiting for its answer
/// can stop waiting when it does.
///
/// async-nats keeps a request written to a connection that then drops waiting for its whole
/// timeout (10 s): the answer cannot come, the server that would send it is gone (a restart, a
/// crash). Every worker with a request in flight at the moment would stall that long after
/// the server is back. A request issued while disconnected is sent once the client reconnects,
/// and is left to run.
#[derive(Clone)]
struct Disconnects(tokio::sync::watch::Receiver<u64>);

/// The connection dropped before the answer came.
#[derive(Debug)]
struct ConnectionDropped;

impl std::fmt::Display for ConnectionDropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the connection to NATS dropped before the answer came")
    }
}

impl std::error::Error for ConnectionDropped {}

impl Disconnects {
    /// The counter, and the client option that advances it.
    fn watch(options: async_nats::ConnectOptions) -> (async_nats::ConnectOptions, Disconnects) {
        let (count, counted) = tokio::sync::watch::channel(0u64);
        let count = std::sync::Arc::new(count);
        let options = options.event_callback(move |event| {
            let count = count.clone();
            async move {
                if matches!(event, async_nats::Event::Disconnected) {
                    count.send_modify(|n| *n += 1);
                }
            }
        });
        (options, Disconnects(counted))
    }

    /// `request`'s result, or [`ConnectionDropped`] if the connection drops first.
    async fn guard<F: std::future::Future>(
        &self,
        request: F,
    ) -> Result<F::Output, ConnectionDropped> {
        let mut seen = self.0.clone();
        seen.borrow_and_update();
        let dropped = async move {
            if seen.changed().await.is_err() {
                // The client is gone: nothing will count again.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            output = request => Ok(output),
            () = dropped => Err(ConnectionDropped),
        }
    }
}

impl std::fmt::Debug for JetStreamBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamBus")
            .field("names", &self.names)
            .finish()
    }
}

fn provision_error(what: impl Into<String>, e: impl Into<Source>) -> BusError {
    BusError::Provision {
        what: what.into(),
        source: e.into(),
    }
}

/// A publish's error: a message larger than the server's `max_payload` can never be taken
/// ([`BusError::TooLarge`], permanent); any other may pass on a later try (a full work queue
/// among them: it refuses new messages until its consumers catch up).
fn publish_error(subject: &str, e: jetstream::context::PublishError) -> BusError {
    let subject = subject.to_owned();
    if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded {
        BusError::TooLarge {
            subject,
            source: e.into(),
        }
    } else {
        BusError::Publish {
            subject,
            source: e.into(),
        }
    }
}

/// `(major, minor)` of a server version such as `2.9.10` or `2.11.0-beta.1`.
pub fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

impl JetStreamBus {
    /// Connects, checks the server version and makes sure every stream and consumer exists.
    pub async fn connect(
        url: &str,
        names: Names,
        options: &JetStreamOptions,
    ) -> Result<JetStreamBus, BusError> {
        let connect = options
            .auth
            .apply(async_nats::ConnectOptions::new().name("loopsync"))
            .await
            .map_err(|e| BusError::Connect {
                url: loopsync_core::url::redact(url),
                source: async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::Io, e),
            })?;
        let (connect, disconnects) = Disconnects::watch(connect);
        let client = connect.connect(url).await.map_err(|e| BusError::Connect {
            url: loopsync_core::url::redact(url),
            source: e,
        })?;
        let version = client.server_info().version;
        match parse_version(&version) {
            Some(v) if v >= (2, 9) => {}
            _ => return Err(BusError::ServerTooOld { version }),
        }
        let js = jetstream::new(client.clone());
        provision(&js, &names, options).await?;
        let ledger = bucket(&js, &names.ledger_bucket()).await?;
        let budget = bucket(&js, &names.budget_bucket()).await?;
        Ok(JetStreamBus {
            client,
            js,
            names,
            ledger,
            budget,
            disconnects,
        })
    }

    /// Connects as [`JetStreamBus::connect`] would and checks the server's version and that
    /// JetStream answers, making nothing: what `loopsync check` asks. Returns the version.
    pub async fn probe(url: &str, options: &JetStreamOptions) -> Result<String, BusError> {
        let connect_error = |e| BusError::Connect {
            url: loopsync_core::url::redact(url),
            source: e,
        };
        let connect = options
            .auth
            .apply(async_nats::ConnectOptions::new().name("loopsync check"))
            .await
            .map_err(|e| {
                connect_error(async_nats::ConnectError::with_source(
                    async_nats::ConnectErrorKind::Io,
                    e,
                ))
            })?;
        let client = connect.connect(url).await.map_err(connect_error)?;
        let version = client.server_info().version;
        match parse_version(&version) {
            Some(v) if v >= (2, 9) => {}
            _ => return Err(BusError::ServerTooOld { version }),
        }
        // The account's JetStream info, asked as is (async-nats' own reader of the answer
        // expects fields that nats-server 2.9 does not send).
        let what = "JetStream (is the server started with -js?)";
        let answer = client
            .request("$JS.API.INFO", Bytes::new())
            .await
            .map_err(|e| provision_error(what, e))?;
        let answer: serde_json::Value =
            serde_json::from_slice(&answer.payload).map_err(|e| provision_error(what, e))?;
        if let Some(error) = answer.get("error") {
            return Err(provision_error(
                what,
                std::io::Error::other(error.to_string()),
            ));
        }
        Ok(version)
    }

    /// The stream and subject names of this deployment.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The server's version.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }
}

/// A stage's consumer failed.
fn consume_error(stage: Stage, source: Source) -> BusError {
    BusError::Consume {
        stage: stage.name().into(),
        source,
    }
}

impl JetStreamBus {
    /// The stage's durable consumer, shared by all its replicas.
    async fn stage_consumer(
        &self,
        stage: Stage,
    ) -> Result<jetstream::consumer::PullConsumer, BusError> {
        let stream = self
            .js
            .get_stream(self.names.stream(stage))
            .await
            .map_err(|e| consume_error(stage, e.into()))?;
        stream
            .get_consumer(stage.name())
            .await
            .map_err(|e| consume_error(stage, e))
    }

    /// Publishes and waits for the stream's acknowledgement, or for the connection to drop.
    async fn send(&self, subject: String, message: PublishMessage) -> Result<(), BusError> {
        let published = async {
            let ack = self
                .js
                .send_publish(subject.clone(), message)
                .await
                .map_err(|e| publish_error(&subject, e))?;
            ack.await.map_err(|e| publish_error(&subject, e))?;
            Ok(())
        };
        self.disconnects
            .guard(published)
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.clone(),
                source: e.into(),
            })?
    }
}

#[async_trait]
impl Messaging for JetStreamBus {
    async fn publish(
        &self,
        stage: Stage,
        sync: &str,
        message_id: &str,
        payload: Bytes,
    ) -> Result<(), BusError> {
        let message = PublishMessage::build()
            .payload(payload)
            .message_id(message_id);
        self.send(self.names.subject(stage, sync), message).await
    }

    async fn publish_all(
        &self,
        stage: Stage,
        messages: Vec<(String, String, Bytes)>,
    ) -> Result<(), BusError> {
        let Some(first) = messages.first() else {
            return Ok(());
        };
        let subject = self.names.subject(stage, &first.0);
        let published = async {
            // Every message handed to the connection first, in order; then every
            // acknowledgement: one round trip for the batch, not one per message.
            let mut acks = Vec::with_capacity(messages.len());
            for (sync, message_id, payload) in messages {
                let subject = self.names.subject(stage, &sync);
                let message = PublishMessage::build()
                    .payload(payload)
                    .message_id(message_id.as_str());
                let ack = self
                    .js
                    .send_publish(subject.clone(), message)
                    .await
                    .map_err(|e| publish_error(&subject, e))?;
                acks.push((subject, ack));
            }
            for (subject, ack) in acks {
                ack.await.map_err(|e| publish_error(&subject, e))?;
            }
            Ok(())
        };
        self.disconnects
            .guard(published)
            .await
            .map_err(|e| BusError::Publish {
                subject: subject.clone(),
                source: e.into(),
            })?
    }

    /// The stage's max-deliveries advisories, each as the message it is about (see [`mover`]).
    async fn exhausted(&self, stage: Stage) -> Result<Option<Box<dyn Consumer>>, BusError> {
        self.exhausted_consumer(stage).await.map(Some)
    }

    async fn consume(&self, stage: Stage, batch: usize) -> Result<Box<dyn Consumer>, BusError> {
        let messages = self
            .stage_consumer(stage)
            .await?
            .stream()
            .max_messages_per_batch(batch.max(1))
            .messages()
            .await
            .map_err(|e| consume_error(stage, e.into()))?;
        Ok(Box::new(JetStreamConsumer {
            stage,
            messages,
            disconnects: self.disconnects.clone(),
        }))
    }

    async fn unsettled(&self, stage: Stage) -> Result<u64, BusError> {
        let mut consumer = self.stage_consumer(stage).await?;
        let info = consumer
            .info()
            .await
            .map_err(|e| consume_error(stage, e.into()))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BusError> {
        let subject = self.names.dlq_subject(letter.stage, &letter.sync);
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_STAGE, letter.stage.name());
        headers.insert(HEADER_SUBJECT, letter.subject.as_str());
        // Header values are one line.
        headers.insert(
            HEADER_REASON,
            letter.reason.replace(['\r', '\n'], " ").as_str(),
        );
        headers.insert(HEADER_ATTEMPTS, letter.attempts.to_string().as_str());
        headers.insert(HEADER_SEQUENCE, letter.sequence.to_string().as_str());
        let id = format!(
            "dlq:{}:{}",
            self.names.stream(letter.stage),
            letter.sequence
        );
        let publish = PublishMessage::build()
            .payload(letter.payload)
            .headers(headers)
            .message_id(id);
        self.send(subject, publish).await
    }

    async fn erase(&self, sync: &str, matches: &Matcher) -> Result<Erased, BusError> {
        self.erase_messages(sync, matches).await
    }

    async fn held(&self, sync: &str, matches: &Matcher) -> Result<u64, BusError> {
        self.held_messages(sync, matches).await
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError> {
        let mut stream = self
            .js
            .get_stream(self.names.dlq_stream())
            .await
            .map_err(|e| provision_error("the dead-letter stream", e))?;
        let info = stream
            .info()
            .await
            .map_err(|e| provision_error("the dead-letter stream", e))?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut letters = Vec::new();
        if info.state.messages == 0 {
            return Ok(letters);
        }
        for seq in first..=last {
            let Ok(message) = stream.get_raw_message(seq).await else {
                continue;
            };
            let header = |name: &str| {
                message
                    .headers
                    .get(name)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            let stage = Stage::ALL
                .into_iter()
                .find(|s| s.name() == header(HEADER_STAGE))
                .unwrap_or(Stage::Loader);
            let subject = header(HEADER_SUBJECT);
            letters.push(DeadLetter {
                stage,
                sync: sync_of(&subject).to_owned(),
                subject,
                payload: message.payload.clone(),
                reason: header(HEADER_REASON),
                attempts: header(HEADER_ATTEMPTS).parse().unwrap_or(0),
                sequence: header(HEADER_SEQUENCE).parse().unwrap_or(0),
            });
        }
        Ok(letters)
    }
}

#[async_trait]
impl Coordination for JetStreamBus {
    async fn ledger_get(&self, key: &str) -> Result<Option<Versioned>, BusError> {
        let error = |e: Source| BusError::ledger(e);
        let entry = self
            .disconnects
            .guard(self.ledger.entry(key))
            .await
            .map_err(|e| error(e.into()))?
            .map_err(|e| error(e.into()))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| Versioned {
                value: e.value,
                revision: e.revision,
            }))
    }

    async fn ledger_forget(&self, key: &str) -> Result<bool, BusError> {
        self.ledger_purge(key).await
    }

    async fn ledger_swap(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
    ) -> Result<Option<u64>, BusError> {
        use kv::{CreateErrorKind, UpdateErrorKind};
        let error = |e: Source| BusError::ledger(e);
        match expected {
            Some(revision) => match self
                .disconnects
                .guard(self.ledger.update(key, value, revision))
                .await
                .map_err(|e| error(e.into()))?
            {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(error(e.into())),
            },
            None => match self
                .disconnects
                .guard(self.ledger.create(key, value))
                .await
                .map_err(|e| error(e.into()))?
            {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(error(e.into())),
            },
        }
    }

    /// The budget's key ([`crate::budget::ledger_key`]) holds the theoretical arrival time of
    /// the next slot and the writer's clock when it wrote it. A process takes the slot by
    /// compare-and-swap on the key's revision; whoever loses the race reads again: the one
    /// pacing rule, [`crate::budget::take_slots`].
    async fn rate_slot(
        &self,
        budget: &str,
        period: Duration,
        slack: Duration,
        count: u32,
        taker: &Taker,
    ) -> Result<(u64, u32), BusError> {
        crate::budget::take_slots(self, budget, period, slack, count, taker).await
    }
}

/// The budget's key-value bucket as the [`SlotLedger`] of [`crate::budget::take_slots`]: a
/// key's value is its [`Stamp`], 16 bytes (the due time, then the time written, big-endian).
#[async_trait]
impl SlotLedger for JetStreamBus {
    async fn read_due(&self, key: &str) -> Result<Option<(Stamp, u64)>, BusError> {
        let entry = self
            .disconnects
            .guard(self.budget.entry(key))
            .await
            .map_err(|e| budget_error(e.into()))?
            .map_err(|e| budget_error(e.into()))?;
        Ok(entry.map(|e| (stamp_of(&e.value), e.revision)))
    }

    async fn swap_due(
        &self,
        key: &str,
        next: Stamp,
        expected: Option<u64>,
    ) -> Result<Option<u64>, BusError> {
        use kv::{CreateErrorKind, UpdateErrorKind};
        let value = stamp_value(next);
        match expected {
            Some(revision) => {
                let update = self.budget.update(key, value, revision);
                match self.disconnects.guard(update).await {
                    Err(dropped) => Err(budget_error(dropped.into())),
                    Ok(Ok(revision)) => Ok(Some(revision)),
                    Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
                    Ok(Err(e)) => Err(budget_error(e.into())),
                }
            }
            None => match self.disconnects.guard(self.budget.create(key, value)).await {
                Err(dropped) => Err(budget_error(dropped.into())),
                Ok(Ok(revision)) => Ok(Some(revision)),
                Ok(Err(e)) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
                Ok(Err(e)) => Err(budget_error(e.into())),
            },
        }
    }
}

/// A budget key's value: its [`Stamp`], 16 bytes big-endian (the due time, then the time it was
/// written).
fn stamp_value(stamp: Stamp) -> Bytes {
    let both = (u128::from(stamp.due) << 64) | u128::from(stamp.written_at);
    Bytes::copy_from_slice(&both.to_be_bytes())
}

/// A budget key's [`Stamp`]; a value of another form (damaged) reads as due at once.
fn stamp_of(value: &[u8]) -> Stamp {
    let both = <[u8; 16]>::try_from(value).map_or(0, u128::from_be_bytes);
    Stamp {
        due: (both >> 64) as u64,
        written_at: both as u64,
    }
}

/// A failure of the rate budget's bucket.
fn budget_error(source: Source) -> BusError {
    BusError::Ledger {
        what: "ledger: rate budget",
        source,
    }
}

struct JetStreamConsumer {
    stage: Stage,
    messages: pull::Stream,
    disconnects: Disconnects,
}

#[async_trait]
impl Consumer for JetStreamConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        let message = match self.messages.next().await? {
            Ok(m) => m,
            Err(e) => {
                return Some(Err(BusError::Consume {
                    stage: self.stage.name().into(),
                    source: e.into(),
                }));
            }
        };
        let (attempt, sequence) = match message.info() {
            Ok(info) => {
                // The consumer's lag: messages not delivered yet, as of this one.
                metrics::gauge!("loopsync_consumer_pending", "consumer" => self.stage.name())
                    .set(info.pending as f64);
                (info.delivered.max(1) as u32, info.stream_sequence)
            }
            Err(_) => (1, 0),
        };
        let (message, acker) = message.split();
        Some(Ok(Delivery {
            subject: message.subject.to_string(),
            payload: message.payload,
            attempt,
            sequence,
            acker: Box::new(JetStreamAcker {
                acker,
                disconnects: self.disconnects.clone(),
            }),
        }))
    }
}

struct JetStreamAcker {
    acker: jetstream::message::Acker,
    disconnects: Disconnects,
}

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(&self) -> Result<(), BusError> {
        // Wait for the server's confirmation: narrows the "acked but lost" window.
        self.disconnects
            .guard(self.acker.double_ack())
            .await
            .map_err(BusError::ack)?
            .map_err(BusError::ack)
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.acker
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(BusError::ack)
    }

    async fn term(&self) -> Result<(), BusError> {
        self.acker
            .ack_with(AckKind::Term)
            .await
            .map_err(BusError::ack)
    }

    async fn progress(&self) -> Result<(), BusError> {
        self.acker
            .ack_with(AckKind::Progress)
            .await
            .map_err(BusError::ack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::unix_nanos;
    use loopsync_core::Classified;

    #[test]
    fn versions() {
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert_eq!(parse_version("2.11.0-beta.1"), Some((2, 11)));
        assert!(parse_version("2.10.0").unwrap() >= (2, 9));
        assert!(parse_version("2.8.4").unwrap() < (2, 9));
        assert_eq!(parse_version("nonsense"), None);
    }

    /// Every stream is limited in bytes as well as age: a work queue by the options, and
    /// when full it refuses what comes (the publisher's error is retryable) instead of dropping
    /// work; the dead letters and advisories drop their oldest. A stream made without limits
    /// (an earlier version) gets them when a process connects.
    #[tokio::test]
    async fn streams_are_limited_in_bytes() {
        use async_nats::jetstream::stream::DiscardPolicy;
        use loopsync_core::tuning::{ADVISORY_MAX_BYTES, DEAD_LETTER_MAX_BYTES};
        let Some(ns) = loopsync_testkit::TestNamespace::create("t") else {
            return;
        };
        let names = Names::new(&ns.namespace);
        let options = JetStreamOptions {
            max_queue_bytes: 16 << 10,
            ..JetStreamOptions::default()
        };
        let bus = JetStreamBus::connect(&ns.url, names.clone(), &options)
            .await
            .expect("connect");
        let limits = |name: String| {
            let js = bus.js.clone();
            async move {
                let mut stream = js.get_stream(&name).await.expect("the stream");
                let config = &stream.info().await.expect("its info").config;
                (config.max_bytes, config.discard)
            }
        };
        for stage in Stage::ALL {
            assert_eq!(
                limits(names.stream(stage)).await,
                (16 << 10, DiscardPolicy::New),
                "{stage:?}"
            );
        }
        assert_eq!(
            limits(names.dlq_stream()).await,
            (DEAD_LETTER_MAX_BYTES as i64, DiscardPolicy::Old)
        );
        assert_eq!(
            limits(names.advisory_stream()).await,
            (ADVISORY_MAX_BYTES as i64, DiscardPolicy::Old)
        );

        // Full: the next message is refused, retryably; the first ones are still there.
        let payload = Bytes::from(vec![b'x'; 1024]);
        let mut refused = None;
        for i in 0..64 {
            if let Err(e) = bus
                .publish(Stage::Transformer, "s", &format!("m{i}"), payload.clone())
                .await
            {
                refused = Some((i, e));
                break;
            }
        }
        let (stored, error) = refused.expect("a full queue refuses a message");
        assert!(stored > 4, "{stored} messages of 1 KiB fit in 16 KiB");
        assert!(error.class().is_retryable(), "{error}");
        let mut changes = bus
            .js
            .get_stream(names.stream(Stage::Transformer))
            .await
            .unwrap();
        let info = changes.info().await.unwrap();
        assert_eq!(
            (info.state.first_sequence, info.state.messages),
            (1, stored)
        );

        // Made without limits: given them on the next connect.
        let runs = names.stream(Stage::Extractor);
        let mut bare = bus
            .js
            .get_stream(&runs)
            .await
            .unwrap()
            .cached_info()
            .config
            .clone();
        bare.max_bytes = -1;
        bare.discard = DiscardPolicy::Old;
        bus.js.update_stream(bare).await.expect("limits removed");
        assert_eq!(limits(runs.clone()).await, (-1, DiscardPolicy::Old));
        JetStreamBus::connect(&ns.url, names.clone(), &options)
            .await
            .expect("connect again");
        assert_eq!(limits(runs).await, (16 << 10, DiscardPolicy::New));
    }

    /// A message larger than the server's `max_payload` can never be published: a permanent
    /// error, so its record is settled at once instead of retried run after run.
    #[tokio::test]
    async fn a_message_larger_than_the_server_takes_is_a_permanent_error() {
        let Some(ns) = loopsync_testkit::TestNamespace::create("t") else {
            return;
        };
        let bus = JetStreamBus::connect(
            &ns.url,
            Names::new(&ns.namespace),
            &JetStreamOptions::default(),
        )
        .await
        .expect("connect");
        let huge = Bytes::from(vec![b'x'; bus.client.server_info().max_payload + 1]);
        let error = bus
            .publish(Stage::Transformer, "s", "huge", huge.clone())
            .await
            .expect_err("too large");
        assert!(matches!(error, BusError::TooLarge { .. }), "{error:?}");
        assert_eq!(error.class(), loopsync_core::ErrorClass::Permanent);
        let error = bus
            .publish_all(Stage::Transformer, vec![("s".into(), "huge".into(), huge)])
            .await
            .expect_err("too large");
        assert_eq!(
            error.class(),
            loopsync_core::ErrorClass::Permanent,
            "{error}"
        );
        // An ordinary one goes.
        bus.publish(Stage::Transformer, "s", "small", Bytes::from_static(b"x"))
            .await
            .expect("published");
    }

    /// An upgraded deployment leaves nothing behind: the mover consumer that earlier versions
    /// shared between all stages goes when a process connects, and each stage has its own.
    #[tokio::test]
    async fn connecting_replaces_the_old_shared_mover() {
        use async_nats::jetstream::consumer::AckPolicy;
        let Some(ns) = loopsync_testkit::TestNamespace::create("t") else {
            return;
        };
        let names = Names::new(&ns.namespace);
        let options = JetStreamOptions::default();
        let bus = JetStreamBus::connect(&ns.url, names.clone(), &options)
            .await
            .expect("connect");
        let advisories = bus.js.get_stream(names.advisory_stream()).await.unwrap();
        advisories
            .create_consumer(pull::Config {
                durable_name: Some("dlq-mover".into()),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
        JetStreamBus::connect(&ns.url, names.clone(), &options)
            .await
            .expect("connect again");
        assert!(advisories.consumer_info("dlq-mover").await.is_err());
        for stage in Stage::ALL {
            let name = names.exhausted_consumer(stage);
            assert!(advisories.consumer_info(&name).await.is_ok(), "{name}");
        }
    }

    /// Outcomes never expire in their queue (a confirmation dropped would be sent again); the
    /// other work queues keep a week.
    #[tokio::test]
    async fn outcomes_never_expire() {
        let Some(ns) = loopsync_testkit::TestNamespace::create("t") else {
            return;
        };
        let names = Names::new(&ns.namespace);
        let bus = JetStreamBus::connect(&ns.url, names.clone(), &JetStreamOptions::default())
            .await
            .expect("connect");
        for stage in Stage::ALL {
            let mut stream = bus.js.get_stream(names.stream(stage)).await.unwrap();
            let max_age = stream.info().await.unwrap().config.max_age;
            let want = if stage == Stage::Checkpointer {
                Duration::ZERO
            } else {
                loopsync_core::tuning::WORK_QUEUE_MAX_AGE
            };
            assert_eq!(max_age, want, "{}", stage.name());
        }
    }

    /// Case 7 of "Adversarial histories": a host with its clock an hour ahead wrote the team's
    /// next slot (due a period after it wrote, by its clock); another host takes its slot a
    /// period after it read the entry, not an hour later, and writes the wait after its own
    /// slot on its own clock. The entry loopsync kept before (a bare due time under the
    /// budget's name, read by older processes) is neither read nor written.
    #[tokio::test]
    async fn a_slot_written_by_a_clock_an_hour_ahead_stalls_no_one() {
        let Some(ns) = loopsync_testkit::TestNamespace::create("t") else {
            return;
        };
        let bus = JetStreamBus::connect(
            &ns.url,
            Names::new(&ns.namespace),
            &JetStreamOptions::default(),
        )
        .await
        .expect("connect");
        let hour = 3_600_000_000_000u64;
        let period = Duration::from_millis(100);
        let step = period.as_nanos() as u64;
        let written_at = unix_nanos() + hour;
        let ahead = Stamp {
            due: written_at + step,
            written_at,
        };
        let key = crate::budget::ledger_key("team-skew");
        bus.budget.put(&key, stamp_value(ahead)).await.unwrap();
        let older = Bytes::copy_from_slice(&(unix_nanos() + hour).to_be_bytes());
        bus.budget.put("team-skew", older.clone()).await.unwrap();
        let taker = Taker::default();
        let asked = taker.now();
        let (first, _) = tokio::time::timeout(
            Duration::from_secs(10),
            bus.rate_slot("team-skew", period, Duration::ZERO, 1, &taker),
        )
        .await
        .expect("a slot within seconds, not an hour")
        .unwrap();
        assert!(
            first >= asked + step && first < asked + step + 1_000_000_000,
            "due {} ms after it was asked for",
            (first - asked) / 1_000_000
        );
        let next = stamp_of(&bus.budget.get(&key).await.unwrap().unwrap());
        assert_eq!(next.due, first + step, "one period after the slot");
        assert!(next.written_at >= asked && next.written_at <= taker.now());
        assert_eq!(bus.budget.get("team-skew").await.unwrap(), Some(older));
    }

    /// A request written to a connection that then drops is never answered: the server that
    /// would answer it is gone. It fails when the connection drops, not at its timeout, so
    /// that a NATS restart does not stall every worker for that long.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_in_flight_fail_when_the_connection_drops() {
        use loopsync_testkit::nats::NatsServer;
        let Some(mut server) = NatsServer::start().await else {
            return;
        };
        let names = Names::new(&loopsync_testkit::unique("t"));
        let bus = JetStreamBus::connect(&server.url(), names, &JetStreamOptions::default())
            .await
            .expect("connect");
        // A hung server: it reads requests and answers none.
        server.freeze();
        let started = tokio::time::Instant::now();
        let get = bus.ledger_get("k");
        let publish = bus.publish(Stage::Loader, "s", "m", Bytes::from_static(b"x"));
        tokio::pin!(get, publish);
        let polled = futures::poll!(&mut get);
        assert!(
            polled.is_pending(),
            "answered by a frozen server: {polled:?}"
        );
        let polled = futures::poll!(&mut publish);
        assert!(
            polled.is_pending(),
            "answered by a frozen server: {polled:?}"
        );
        server.kill().await;
        let within = Duration::from_secs(30);
        let (get, publish) = tokio::time::timeout(within, futures::future::join(get, publish))
            .await
            .expect("the requests ended");
        let waited = started.elapsed();
        // The read may also come back empty from the dropping connection (a direct get's
        // answer is read as "no message"): harmless, as every ledger write is compare-and-set
        // and a wrong "no entry" only loses the swap and reads again.
        assert!(
            matches!(get, Err(_) | Ok(None)) && publish.is_err(),
            "{get:?} {publish:?}"
        );
        assert!(
            waited < Duration::from_secs(3),
            "the requests waited {waited:?} after the connection dropped: {get:?} {publish:?}"
        );
    }
}
