//! The checkpointer: the stage that applies outcomes to the warehouse. Per-record results, the
//! confirmed fingerprint of each confirmed record, and the end of runs are written here in
//! batches; the sync's state advances only here, and only on Loops' confirmation.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use loopsync_bus::worker::{BatchHandler, DeliveryInfo};
use loopsync_core::codec::{self, DecodeError};
use loopsync_core::envelope::Outcome;
use loopsync_core::time::utc_seconds;
use loopsync_core::{Classified, ErrorClass};
use loopsync_warehouse::{Warehouse, WarehouseError};

/// What can go wrong checkpointing: an outcome that cannot be read, or a warehouse that does
/// not take it.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// An outcome on the bus that cannot be read.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The warehouse did not take the outcomes.
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
}

impl Classified for CheckpointError {
    fn class(&self) -> ErrorClass {
        match self {
            CheckpointError::Decode(e) => e.class(),
            CheckpointError::Warehouse(e) => e.class(),
        }
    }
}

/// Applies outcomes to the warehouse, a batch per transaction. Its worker never gives up on a
/// retryable error (a warehouse outage is waited out, however long); while the warehouse
/// fails, it says so once a minute ([`OUTAGE_LOG_EVERY`]).
pub struct Checkpointer {
    warehouse: Arc<dyn Warehouse>,
    failing: std::sync::Mutex<Failing>,
}

/// How often the checkpointer says that it cannot record outcomes.
pub const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(60);

/// Since when recording outcomes fails, and which messages wait.
#[derive(Default)]
struct Failing {
    since: Option<(std::time::SystemTime, tokio::time::Instant)>,
    last_said: Option<tokio::time::Instant>,
    /// The deliveries (by sequence) that failed since, and have not landed yet.
    waiting: HashSet<u64>,
}

impl Checkpointer {
    /// A checkpointer writing to `warehouse`.
    pub fn new(warehouse: Arc<dyn Warehouse>) -> Checkpointer {
        Checkpointer {
            warehouse,
            failing: std::sync::Mutex::new(Failing::default()),
        }
    }

    fn note(&self, batch: &[(DeliveryInfo, Bytes)], result: &Result<(), CheckpointError>) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                for (info, _) in batch {
                    failing.waiting.remove(&info.sequence);
                }
                if failing.waiting.is_empty()
                    && let Some((since, started)) = failing.since.take()
                {
                    failing.last_said = None;
                    tracing::warn!(
                        since = %utc_seconds(since),
                        "the checkpointer records outcomes again after {}s of failures",
                        started.elapsed().as_secs()
                    );
                }
            }
            Err(error) if error.class().is_retryable() => {
                let now = tokio::time::Instant::now();
                failing
                    .since
                    .get_or_insert((std::time::SystemTime::now(), now));
                failing
                    .waiting
                    .extend(batch.iter().map(|(i, _)| i.sequence));
                if failing
                    .last_said
                    .is_none_or(|t| now.duration_since(t) >= OUTAGE_LOG_EVERY)
                {
                    failing.last_said = Some(now);
                    let (since, _) = failing.since.expect("set above");
                    tracing::warn!(
                        %error,
                        "the checkpointer cannot record outcomes (failing since {}, {} outcomes waiting); \
                         it keeps retrying, nothing is dropped",
                        utc_seconds(since),
                        failing.waiting.len()
                    );
                }
            }
            Err(_) => {}
        }
    }
}

/// Text the warehouse takes whatever it held: NUL bytes written out.
fn printable(text: &str) -> String {
    text.replace('\0', "\\0")
}

#[async_trait]
impl BatchHandler for Checkpointer {
    type Error = CheckpointError;

    async fn handle_batch(&self, batch: &[(DeliveryInfo, Bytes)]) -> Result<(), CheckpointError> {
        let result = async {
            let outcomes = batch
                .iter()
                .map(|(_, payload)| codec::decode::<Outcome>(payload))
                .collect::<Result<Vec<_>, _>>()?;
            self.warehouse.record_outcomes(&outcomes).await?;
            Ok(())
        }
        .await;
        self.note(batch, &result);
        result
    }

    /// An outcome that cannot be recorded is recorded as the record's dead letter (the key
    /// written out if the warehouse refused it), so that `dlq list` shows it; one that cannot
    /// be read, under a key naming its delivery.
    async fn give_up(
        &self,
        info: &DeliveryInfo,
        payload: &Bytes,
        reason: &str,
    ) -> Result<(), CheckpointError> {
        let letter = match codec::decode::<Outcome>(payload) {
            Ok(o) => Outcome::dead_letter(
                &printable(&o.sync),
                o.run_id,
                &printable(&o.key),
                &printable(&o.operation),
                &o.installation,
                printable(&format!(
                    "its outcome ({:?}) could not be recorded: {reason}",
                    o.status
                )),
            ),
            Err(_) => Outcome::dead_letter(
                loopsync_bus::sync_of(&info.subject),
                0,
                &format!("unreadable outcome #{}", info.sequence),
                "none",
                "",
                printable(&format!("an outcome could not be read: {reason}")),
            ),
        };
        self.warehouse.record_outcomes(&[letter]).await?;
        tracing::error!(
            subject = info.subject,
            reason,
            "an outcome could not be recorded; it is a dead letter (loopsync dlq list)"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use loopsync_bus::worker::BatchHandler;
    use loopsync_core::envelope::OutcomeStatus;

    use super::*;

    fn info(sequence: u64) -> DeliveryInfo {
        DeliveryInfo {
            subject: "t.checkpointer.users".into(),
            attempt: 1,
            sequence,
        }
    }

    /// An outcome PostgreSQL refuses (a NUL byte in its key) fails its batch for good (so the
    /// worker splits the batch), and, given up, is recorded as a dead letter that `dlq list`
    /// (which reads `rejections`) shows.
    #[tokio::test]
    async fn an_outcome_that_cannot_be_recorded_is_a_dead_letter_dlq_list_shows() {
        let Some(db) = loopsync_testkit::TestDatabase::create().await else {
            return;
        };
        let warehouse: Arc<dyn Warehouse> = Arc::new(
            loopsync_warehouse::PgWarehouse::connect(&db.url)
                .await
                .unwrap(),
        );
        warehouse.prepare().await.unwrap();
        let run_id = warehouse.create_run("users").await.unwrap();
        let checkpointer = Checkpointer::new(warehouse.clone());
        let outcome = |key: &str| {
            Bytes::from(codec::encode(&Outcome::new(
                "users",
                run_id,
                key,
                "fp",
                OutcomeStatus::Confirmed,
                "upsert",
            )))
        };
        let bad = outcome("bad\0key");
        let batch = [(info(1), outcome("good")), (info(2), bad.clone())];
        let error = checkpointer.handle_batch(&batch).await.unwrap_err();
        assert_eq!(error.class(), ErrorClass::Permanent, "{error}");
        // Alone, the good one lands.
        checkpointer.handle_batch(&batch[..1]).await.unwrap();
        checkpointer
            .give_up(&info(2), &bad, &error.to_string())
            .await
            .unwrap();
        let letters: Vec<_> = warehouse
            .rejections(Some("users"))
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.outcome == "dead_lettered")
            .collect();
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(letters[0].key, "bad\\0key");
        assert!(
            letters[0]
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("could not be recorded")),
            "{letters:?}"
        );
    }
}
