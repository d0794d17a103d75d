//! Typed publishing: each envelope goes to its stage's subject with its deterministic message id.

use bytes::Bytes;
use loopsync_core::codec;
use loopsync_core::envelope::{Operation, Outcome, RowChange, RunRequest};
use loopsync_core::keys;
use loopsync_core::stage::Stage;

use crate::{BusError, Messaging};

/// Asks the extractors for a run (exactly one of them takes it).
pub async fn run_request(bus: &dyn Messaging, request: &RunRequest) -> Result<(), BusError> {
    bus.publish(
        Stage::Extractor,
        &request.sync,
        &keys::run_message_id(&request.installation, request.run_id),
        Bytes::from(codec::encode(request)),
    )
    .await
}

/// extractor → transformer, a batch at once (see [`Messaging::publish_all`]).
pub async fn changes(bus: &dyn Messaging, changes: &[RowChange]) -> Result<(), BusError> {
    let messages = changes
        .iter()
        .map(|change| {
            let id = keys::message_id(
                "chg",
                &change.installation,
                change.run_id,
                &change.sync,
                &change.key,
                &change.fingerprint,
            );
            (change.sync.clone(), id, Bytes::from(codec::encode(change)))
        })
        .collect();
    bus.publish_all(Stage::Transformer, messages).await
}

/// transformer → loader.
pub async fn operation(bus: &dyn Messaging, op: &Operation) -> Result<(), BusError> {
    let id = keys::message_id(
        "op",
        &op.installation,
        op.run_id,
        &op.sync,
        &op.key,
        &op.fingerprint,
    );
    bus.publish(Stage::Loader, &op.sync, &id, Bytes::from(codec::encode(op)))
        .await
}

/// Any stage → checkpointer. One id per (run, record, status), and per attempt for an
/// `attempted` outcome: a repeat of the same outcome is dropped by the bus, and the
/// checkpointer ignores one that gets through anyway.
pub async fn outcome(bus: &dyn Messaging, outcome: &Outcome) -> Result<(), BusError> {
    let mut id = format!(
        "{}:{}",
        keys::message_id(
            "out",
            &outcome.installation,
            outcome.run_id,
            &outcome.sync,
            &outcome.key,
            &outcome.fingerprint
        ),
        outcome.status.as_str()
    );
    if let Some(attempt) = &outcome.attempt {
        id.push(':');
        id.push_str(attempt);
    }
    bus.publish(
        Stage::Checkpointer,
        &outcome.sync,
        &id,
        Bytes::from(codec::encode(outcome)),
    )
    .await?;
    // Invalid records are the transformer's finding; every other outcome the loader's (or the
    // worker's that gave up on a message: a dead letter).
    let stage = match outcome.status {
        loopsync_core::envelope::OutcomeStatus::Invalid => "transformer",
        _ => "loader",
    };
    metrics::counter!(
        "loopsync_records_total",
        "sync" => outcome.sync.clone(),
        "stage" => stage,
        "outcome" => outcome.status.as_str()
    )
    .increment(1);
    Ok(())
}
