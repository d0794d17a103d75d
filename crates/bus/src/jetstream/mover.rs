//! The messages the server gave up on: those that reached their consumer's max-deliveries
//! (a worker crashed or hung on each, every time).
//!
//! The server says so in an advisory, captured by the advisory stream; each stage has a durable
//! consumer of its own advisories there, shared by the processes that run the stage. This module
//! only turns an advisory back into the message it is about, as a [`Delivery`]: what the
//! message means, and what its record's fate is, is the stage's business (its `give_up`), and
//! the worker settles it like any other dead letter. Terminated advisories stay ignored: a
//! worker terminates a message only after it dead-lettered it.

use std::time::Duration;

use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, AckKind, stream};
use async_trait::async_trait;
use futures::StreamExt;
use loopsync_core::stage::Stage;
use serde::Deserialize;

use super::{Disconnects, JetStreamBus};
use crate::error::Source;
use crate::{Acker, BusError, Consumer, Delivery};

/// What we read of a max-deliveries advisory.
#[derive(Deserialize)]
struct Advisory {
    stream: String,
    stream_seq: u64,
    #[serde(default)]
    deliveries: u32,
}

impl JetStreamBus {
    /// Joins the stage's consumer of its max-deliveries advisories.
    pub(super) async fn exhausted_consumer(
        &self,
        stage: Stage,
    ) -> Result<Box<dyn Consumer>, BusError> {
        let name = self.names.exhausted_consumer(stage);
        let error = |e: Source| BusError::Consume {
            stage: name.clone(),
            source: e,
        };
        let advisories = self
            .js
            .get_stream(self.names.advisory_stream())
            .await
            .map_err(|e| error(e.into()))?;
        let consumer: PullConsumer = advisories.get_consumer(&name).await.map_err(&error)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(10)
            .messages()
            .await
            .map_err(|e| error(e.into()))?;
        let queue = self
            .js
            .get_stream(self.names.stream(stage))
            .await
            .map_err(|e| error(e.into()))?;
        Ok(Box::new(ExhaustedConsumer {
            name,
            queue_name: self.names.stream(stage),
            queue,
            messages,
            disconnects: self.disconnects.clone(),
        }))
    }
}

/// Yields, for each advisory, the message it is about, while that message is still in the
/// work queue.
struct ExhaustedConsumer {
    name: String,
    queue_name: String,
    queue: stream::Stream,
    messages: pull::Stream,
    disconnects: Disconnects,
}

#[async_trait]
impl Consumer for ExhaustedConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        loop {
            let advisory = match self.messages.next().await? {
                Ok(m) => m,
                Err(e) => {
                    return Some(Err(BusError::Consume {
                        stage: self.name.clone(),
                        source: e.into(),
                    }));
                }
            };
            let (advisory, acker) = advisory.split();
            let about = serde_json::from_slice::<Advisory>(&advisory.payload)
                .ok()
                .filter(|a| a.stream == self.queue_name);
            let Some(about) = about else {
                // Not one of ours, or unreadable: nothing to move.
                let _ = acker.ack().await;
                continue;
            };
            let message = match self.queue.get_raw_message(about.stream_seq).await {
                Ok(m) => m,
                // Acked or deleted in the meantime: nothing to move.
                Err(_) => {
                    let _ = acker.ack().await;
                    continue;
                }
            };
            return Some(Ok(Delivery {
                subject: message.subject.to_string(),
                payload: message.payload,
                attempt: about.deliveries.max(1),
                sequence: about.stream_seq,
                acker: Box::new(ExhaustedAcker {
                    queue: self.queue.clone(),
                    queue_name: self.queue_name.clone(),
                    sequence: about.stream_seq,
                    advisory: acker,
                    disconnects: self.disconnects.clone(),
                }),
            }));
        }
    }
}

/// Settles a message the server gave up on. Once its fate is recorded it is deleted from the
/// work queue (where it would otherwise stay: a work queue keeps what is not acked) and the
/// advisory acked; a nak leaves both, and the advisory comes back after the delay.
struct ExhaustedAcker {
    queue: stream::Stream,
    queue_name: String,
    sequence: u64,
    advisory: jetstream::message::Acker,
    disconnects: Disconnects,
}

impl ExhaustedAcker {
    async fn remove(&self) -> Result<(), BusError> {
        self.disconnects
            .guard(self.queue.delete_message(self.sequence))
            .await
            .map_err(|e| BusError::Ack {
                what: format!("deleting from {}", self.queue_name),
                source: e.into(),
            })?
            .map_err(|e| BusError::Ack {
                what: format!("deleting from {}", self.queue_name),
                source: e.into(),
            })?;
        self.disconnects
            .guard(self.advisory.double_ack())
            .await
            .map_err(BusError::ack)?
            .map_err(BusError::ack)
    }
}

#[async_trait]
impl Acker for ExhaustedAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.remove().await
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.advisory
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(BusError::ack)
    }

    async fn term(&self) -> Result<(), BusError> {
        self.remove().await
    }

    async fn progress(&self) -> Result<(), BusError> {
        self.advisory
            .ack_with(AckKind::Progress)
            .await
            .map_err(BusError::ack)
    }
}
