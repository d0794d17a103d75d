//! Erasing one person's messages (`loopsync forget`): each stream of the installation is walked
//! by the sync's subjects alone (the server finds the next message of a subject), every message
//! read is offered to the caller's matcher, and those it picks are deleted by sequence. The
//! server's delete overwrites the message where it is stored (no `no_erase`), so nothing of it
//! stays on disk. The ledger entry is purged with its history.

use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use loopsync_core::stage::Stage;

use super::{HEADER_STAGE, JetStreamBus};
use crate::error::Source;
use crate::{BusError, Erased, Matcher};

fn erase_error(what: impl Into<String>, source: impl Into<Source>) -> BusError {
    BusError::Erase {
        what: what.into(),
        source: source.into(),
    }
}

impl JetStreamBus {
    /// [`crate::Messaging::erase`] on JetStream.
    pub(super) async fn erase_messages(
        &self,
        sync: &str,
        matches: &Matcher,
    ) -> Result<Erased, BusError> {
        let mut erased = Erased::default();
        for stage in Stage::ALL {
            let stream = self.stream(&self.names.stream(stage)).await?;
            let subject = self.names.subject(stage, sync);
            erased.work_queues += walk(&stream, &subject, |_| Some(stage), matches, true).await?;
        }
        let dlq = self.stream(&self.names.dlq_stream()).await?;
        for stage in Stage::ALL {
            let subject = self.names.dlq_subject(stage, sync);
            // The stage a dead letter was for is in its header (the subject says it too).
            let stage_of = |m: &async_nats::jetstream::message::StreamMessage| {
                let named = m.headers.get(HEADER_STAGE).map(|v| v.as_str().to_owned());
                Some(
                    Stage::ALL
                        .into_iter()
                        .find(|s| Some(s.name()) == named.as_deref())
                        .unwrap_or(stage),
                )
            };
            erased.dead_letters += walk(&dlq, &subject, stage_of, matches, true).await?;
        }
        Ok(erased)
    }

    /// [`crate::Messaging::held`] on JetStream: the work queues walked as
    /// [`Self::erase_messages`] walks them, nothing deleted.
    pub(super) async fn held_messages(
        &self,
        sync: &str,
        matches: &Matcher,
    ) -> Result<u64, BusError> {
        let mut held = 0;
        for stage in Stage::ALL {
            let stream = self.stream(&self.names.stream(stage)).await?;
            let subject = self.names.subject(stage, sync);
            held += walk(&stream, &subject, |_| Some(stage), matches, false).await?;
        }
        Ok(held)
    }

    async fn stream(&self, name: &str) -> Result<Stream, BusError> {
        self.js
            .get_stream(name)
            .await
            .map_err(|e| erase_error(format!("reading stream {name}"), e))
    }

    /// [`crate::Coordination::ledger_forget`] on JetStream: a purge leaves one marker (the key
    /// is a digest) and no revision of the entry.
    pub(super) async fn ledger_purge(&self, key: &str) -> Result<bool, BusError> {
        let had = self
            .ledger
            .entry(key)
            .await
            .map_err(BusError::ledger)?
            .is_some_and(|e| e.operation == async_nats::jetstream::kv::Operation::Put);
        if had {
            self.ledger.purge(key).await.map_err(BusError::ledger)?;
        }
        Ok(had)
    }
}

/// Counts the messages of `subject` in `stream` that `matches` picks, and erases them when
/// `erase`; how many.
async fn walk(
    stream: &Stream,
    subject: &str,
    stage_of: impl Fn(&async_nats::jetstream::message::StreamMessage) -> Option<Stage>,
    matches: &Matcher,
    erase: bool,
) -> Result<u64, BusError> {
    let name = stream.cached_info().config.name.clone();
    let mut erased = 0;
    let mut from = 1;
    loop {
        let message = match stream.get_first_raw_message_by_subject(subject, from).await {
            Ok(message) => message,
            Err(e) if matches!(e.kind(), LastRawMessageErrorKind::NoMessageFound) => break,
            Err(e) => return Err(erase_error(format!("reading stream {name}"), e)),
        };
        from = message.sequence + 1;
        let Some(stage) = stage_of(&message) else {
            continue;
        };
        if matches(stage, &message.payload) {
            if erase {
                stream
                    .delete_message(message.sequence)
                    .await
                    .map_err(|e| erase_error(format!("deleting a message of stream {name}"), e))?;
            }
            erased += 1;
        }
    }
    Ok(erased)
}
