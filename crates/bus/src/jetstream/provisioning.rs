//! Declarative, idempotent provisioning: every process that connects makes sure the streams,
//! consumers and buckets exist, so workers can start in any order.

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use loopsync_core::stage::Stage;

use super::{JetStreamOptions, provision_error};
use crate::BusError;
use crate::names::Names;

/// The consumer of the advisories that earlier versions shared between all stages.
const OLD_MOVER: &str = "dlq-mover";

/// The server's cap on deliveries of a stage's messages, as the options say (the engine
/// decides them: see its `settings`).
pub fn max_deliver(stage: Stage, options: &JetStreamOptions) -> i64 {
    match stage {
        Stage::Checkpointer => options.outcomes_max_deliver,
        _ => options.max_deliver,
    }
}

/// Makes sure every stream, consumer and bucket of `names` exists: the work queues and their
/// shared consumers, the dead letters, the advisories and each stage's consumer of them.
pub(super) async fn provision(
    js: &Context,
    names: &Names,
    options: &JetStreamOptions,
) -> Result<(), BusError> {
    for stage in Stage::ALL {
        let name = names.stream(stage);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![names.stream_subjects(stage)],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                duplicate_window: options.duplicate_window,
                // Outcomes never expire: a confirmation dropped would leave its record to be
                // sent again (an event sync's event past Loops' 24 hours of keys fires again).
                // A work item dropped unsent costs only a resend by the next run.
                max_age: if stage == Stage::Checkpointer {
                    Duration::ZERO
                } else {
                    loopsync_core::tuning::WORK_QUEUE_MAX_AGE
                },
                // Full, a queue refuses what comes (the publisher retries) rather than drop
                // work not yet done.
                max_bytes: bytes(options.max_queue_bytes),
                discard: DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| provision_error(format!("stream {name}"), e))?;
        let stream = limit(
            js,
            stream,
            bytes(options.max_queue_bytes),
            DiscardPolicy::New,
        )
        .await?;
        let config = pull::Config {
            durable_name: Some(stage.name().to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            max_deliver: max_deliver(stage, options),
            max_ack_pending: 1000,
            ..Default::default()
        };
        let what = || format!("consumer {} on {name}", stage.name());
        if stage == Stage::Checkpointer {
            // Create or update: a consumer made by an earlier version had a cap on deliveries.
            stream
                .create_consumer(config)
                .await
                .map_err(|e| provision_error(what(), e))?;
        } else {
            stream
                .get_or_create_consumer(stage.name(), config)
                .await
                .map_err(|e| provision_error(what(), e))?;
        }
    }
    // Copies for inspection (every dead letter is a record's outcome in the state too): when
    // full, the oldest go.
    let dlq = names.dlq_stream();
    let dlq_bytes = bytes(loopsync_core::tuning::DEAD_LETTER_MAX_BYTES);
    let stream = js
        .get_or_create_stream(stream::Config {
            name: dlq.clone(),
            subjects: vec![names.dlq_subjects()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            duplicate_window: options.duplicate_window,
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: dlq_bytes,
            discard: DiscardPolicy::Old,
            ..Default::default()
        })
        .await
        .map_err(|e| provision_error(format!("stream {dlq}"), e))?;
    limit(js, stream, dlq_bytes, DiscardPolicy::Old).await?;
    let advisories = names.advisory_stream();
    let advisory_bytes = bytes(loopsync_core::tuning::ADVISORY_MAX_BYTES);
    let stream = js
        .get_or_create_stream(stream::Config {
            name: advisories.clone(),
            subjects: names.advisory_subjects(),
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: advisory_bytes,
            discard: DiscardPolicy::Old,
            ..Default::default()
        })
        .await
        .map_err(|e| provision_error(format!("stream {advisories}"), e))?;
    let stream = limit(js, stream, advisory_bytes, DiscardPolicy::Old).await?;
    for stage in Stage::ALL {
        let name = names.exhausted_consumer(stage);
        stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: names.max_deliveries_subject(stage),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: loopsync_core::tuning::ACK_WAIT,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| provision_error(format!("consumer {name} on {advisories}"), e))?;
    }
    // The one mover of earlier versions, which every process ran: each stage's workers take
    // their own stage's advisories now (see `mover`). An upgraded deployment leaves nothing
    // behind; a consumer already gone is what we want.
    if stream.consumer_info(OLD_MOVER).await.is_ok() {
        stream
            .delete_consumer(OLD_MOVER)
            .await
            .map_err(|e| provision_error(format!("removing consumer {OLD_MOVER}"), e))?;
    }
    Ok(())
}

/// A byte count as JetStream's `max_bytes` (an `i64`).
fn bytes(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `stream` with the byte limit and discard policy asked for: a stream made by an earlier
/// version (without them), or under another `nats.max_queue_bytes`, is updated — unless it
/// holds more than the new limit, which the server would meet by dropping its oldest messages:
/// then it is left as it is, with a warning, until it has drained.
async fn limit(
    js: &Context,
    mut stream: stream::Stream,
    max_bytes: i64,
    discard: DiscardPolicy,
) -> Result<stream::Stream, BusError> {
    let info = stream.cached_info();
    if info.config.max_bytes == max_bytes && info.config.discard == discard {
        return Ok(stream);
    }
    let name = info.config.name.clone();
    if info.state.bytes > max_bytes.max(0) as u64 {
        tracing::warn!(
            stream = %name,
            bytes = info.state.bytes,
            max_bytes,
            "the stream holds more than its new byte limit: left as it is until it has drained"
        );
        return Ok(stream);
    }
    let config = stream::Config {
        max_bytes,
        discard,
        ..info.config.clone()
    };
    js.update_stream(config)
        .await
        .map_err(|e| provision_error(format!("limits of stream {name}"), e))?;
    stream
        .info()
        .await
        .map_err(|e| provision_error(format!("stream {name}"), e))?;
    Ok(stream)
}

/// A key-value bucket, its stream made by hand (what `create_key_value` would make), because
/// async-nats 0.51's `create_key_value` cannot read 2.9's account info.
pub(super) async fn bucket(js: &Context, bucket: &str) -> Result<kv::Store, BusError> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        discard: DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        storage: StorageType::File,
        duplicate_window: loopsync_core::tuning::DUPLICATE_WINDOW,
        ..Default::default()
    })
    .await
    .map_err(|e| provision_error(format!("bucket {bucket}"), e))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| provision_error(format!("bucket {bucket}"), e))
}
