//! The settings each stage's worker runs with, derived from the config in one place: how many
//! messages at once, how many attempts, how often a long handler tells NATS it is still at
//! work, and how often the server redelivers at most.

use std::time::Duration;

use loopsync_bus::worker::{Backoff, BatchOptions, WorkerOptions};
use loopsync_bus::{BusSettings, JetStreamOptions, LocalLimits};
use loopsync_config::Config;
use loopsync_core::stage::Stage;

/// Attempts of a run request (see [`loopsync_core::tuning::EXTRACTOR_ATTEMPTS`]).
pub use loopsync_core::tuning::EXTRACTOR_ATTEMPTS;

/// Messages the transformer maps at once in one process. The mapping is pure work, but each
/// message waits for two round trips to the bus (the operation's publish, the change's ack),
/// each 1–3 ms over NATS on a loaded machine: at eight at once, the round trips, not the work,
/// set its pace.
pub const TRANSFORMER_CONCURRENCY: usize = 128;

/// In-progress acks a third of the ack wait apart (JetStream only: the in-process bus has no
/// redelivery timer).
pub fn progress_every(config: &Config) -> Option<Duration> {
    config
        .nats
        .as_ref()
        .map(|n| loopsync_core::tuning::progress_every(n.ack_wait()))
}

/// The worker options of a one-message-at-a-time stage (every stage but the checkpointer,
/// which batches: see [`checkpointer_options`]). The extractor takes one run at a time and
/// waits out a warehouse outage ([`EXTRACTOR_ATTEMPTS`]); the transformer and the loader try
/// `loops.max_attempts` times, the loader with `loops.concurrency` requests in flight.
pub fn worker_options(config: &Config, stage: Stage) -> WorkerOptions {
    let (concurrency, max_attempts) = match stage {
        Stage::Extractor => (1, EXTRACTOR_ATTEMPTS),
        Stage::Transformer => (TRANSFORMER_CONCURRENCY, config.loops.max_attempts),
        Stage::Loader => (config.loops.concurrency, config.loops.max_attempts),
        Stage::Checkpointer => return checkpointer_options().worker,
    };
    WorkerOptions {
        concurrency,
        max_attempts,
        progress_every: progress_every(config),
        backoff: Backoff {
            base: Duration::from_millis(config.loops.retry_backoff_ms),
            ..Backoff::default()
        },
        ..WorkerOptions::default()
    }
}

/// The checkpointer's worker. It never gives up on a retryable error: an outcome is a record
/// sent to Loops, and a warehouse outage is waited out however long it lasts (backoff capped at
/// 30 s). What cannot be recorded at all is a dead letter (`dlq list`). Its batches, of up to
/// 500 outcomes, stay open while outcomes keep coming 2 ms apart, 50 ms at most: a run's last
/// outcome is recorded 2 ms after it arrives, and a steady flow is written in large batches
/// (closing each batch at once, on what was ready, cost 12 % of the contacts/s over NATS in
/// `scripts/bench-throughput.sh`).
pub fn checkpointer_options() -> BatchOptions {
    BatchOptions {
        max_batch: 500,
        max_wait: Duration::from_millis(50),
        lull: Duration::from_millis(2),
        worker: WorkerOptions {
            max_attempts: u32::MAX,
            ..WorkerOptions::default()
        },
    }
}

/// JetStream's deliveries of one message at most: the workers give up at their own attempts
/// (the extractor's [`EXTRACTOR_ATTEMPTS`] the most, unless `loops.max_attempts` is higher);
/// the server is the safety net after, two deliveries later.
pub fn max_deliver(config: &Config) -> i64 {
    i64::from(config.loops.max_attempts.max(EXTRACTOR_ATTEMPTS)) + 2
}

/// None for the checkpointer: its messages are outcomes, whose loss would leave records sent
/// but never recorded; it retries through a warehouse outage for as long as the outage lasts
/// (its worker never gives up on a retryable error: [`checkpointer_options`]), and what it
/// cannot record is recorded as a dead letter by the worker.
pub const OUTCOMES_MAX_DELIVER: i64 = -1;

/// The JetStream options of the config's `[nats]` section (`None` without one).
/// Which bus the config asks for: JetStream with `[nats]`, else in process.
pub fn bus_settings(config: &Config) -> BusSettings {
    match (&config.nats, jetstream_options(config)) {
        (Some(nats), Some(options)) => BusSettings::JetStream {
            url: nats.url.clone(),
            namespace: nats.namespace.clone(),
            options,
        },
        _ => BusSettings::InProcess(LocalLimits::default()),
    }
}

/// The JetStream tuning of the config's `[nats]`, if it has one.
pub fn jetstream_options(config: &Config) -> Option<JetStreamOptions> {
    config.nats.as_ref().map(|nats| JetStreamOptions {
        ack_wait: nats.ack_wait(),
        max_deliver: max_deliver(config),
        outcomes_max_deliver: OUTCOMES_MAX_DELIVER,
        max_queue_bytes: nats.max_queue_bytes,
        auth: loopsync_bus::NatsAuth {
            user_password: nats.user.clone().zip(nats.password.clone()),
            token: nats.token.clone(),
            credentials: nats.credentials.as_ref().map(Into::into),
            tls_ca: nats.tls_ca.as_ref().map(Into::into),
        },
        ..JetStreamOptions::default()
    })
}

/// The warehouse's settings of `config`: where the model is read, where the state is kept.
pub fn warehouse_settings(config: &Config) -> loopsync_warehouse::Settings {
    loopsync_warehouse::Settings {
        url: config.warehouse.url.clone(),
        state: config.warehouse.state.clone(),
        state_schema: config.warehouse.state_schema.clone(),
    }
}

#[cfg(test)]
mod tests {
    use loopsync_bus::worker;

    use super::*;

    const CONFIG: &str = r#"
[warehouse]
url = "sqlite:///w.db"

[loops]
api_key = "k"
concurrency = 3
max_attempts = 5

[nats]
url = "nats://127.0.0.1:4222"
ack_wait_seconds = 30

[[sync]]
name = "users"
model = "select id, email from users"
primary_key = "id"
identify_by = "email"

[sync.mapping]
email = "email"
"#;

    fn config(text: &str) -> Config {
        Config::parse(text, |_| None).unwrap()
    }

    /// Each stage's worker options, from the config: the extractor one run at a time with its
    /// own attempts, the transformer eight at once, the loader `loops.concurrency`; all of
    /// them say they are still at work a third of the ack wait apart.
    #[test]
    fn each_stage_runs_with_the_settings_of_the_config() {
        let config = config(CONFIG);
        let tenth = Some(Duration::from_secs(10));
        let extractor = worker_options(&config, Stage::Extractor);
        assert_eq!((extractor.concurrency, extractor.max_attempts), (1, 30));
        assert_eq!(extractor.progress_every, tenth);
        let transformer = worker_options(&config, Stage::Transformer);
        assert_eq!(
            (transformer.concurrency, transformer.max_attempts),
            (TRANSFORMER_CONCURRENCY, 5)
        );
        let loader = worker_options(&config, Stage::Loader);
        assert_eq!((loader.concurrency, loader.max_attempts), (3, 5));
        assert_eq!(loader.progress_every, tenth);
        assert_eq!(max_deliver(&config), 32);
        let js = jetstream_options(&config).unwrap();
        assert_eq!((js.ack_wait, js.max_deliver), (Duration::from_secs(30), 32));
        assert_eq!(
            js.outcomes_max_deliver, -1,
            "outcomes are never given up by the server"
        );
    }

    /// Without `[nats]`: no in-progress acks and no JetStream options; a `max_attempts` above
    /// the extractor's raises the server's limit with it.
    #[test]
    fn without_nats_nothing_is_redelivered_by_a_timer() {
        let text = CONFIG
            .replace(
                "[nats]\nurl = \"nats://127.0.0.1:4222\"\nack_wait_seconds = 30\n",
                "",
            )
            .replace("max_attempts = 5", "max_attempts = 40");
        let config = config(&text);
        assert!(config.nats.is_none());
        assert_eq!(worker_options(&config, Stage::Loader).progress_every, None);
        assert!(jetstream_options(&config).is_none());
        assert_eq!(max_deliver(&config), 42);
    }

    /// However long the warehouse is away, the checkpointer's outcomes wait (nak, backoff
    /// capped at 30 s): never dead-lettered for a retryable error.
    #[test]
    fn the_checkpointer_never_gives_up_on_a_retryable_error() {
        let options = checkpointer_options().worker;
        for attempt in [1, 20, 21, 1_000, 1_000_000] {
            match worker::settle(
                Err((loopsync_core::ErrorClass::RETRY, "warehouse down".into())),
                attempt,
                &options,
            ) {
                worker::Settle::Nak(delay) => assert!(delay <= Duration::from_secs(30)),
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        let batch = checkpointer_options();
        assert_eq!(
            (batch.max_batch, batch.max_wait, batch.lull),
            (500, Duration::from_millis(50), Duration::from_millis(2))
        );
        assert_eq!(
            worker_options(&config(CONFIG), Stage::Checkpointer).max_attempts,
            u32::MAX
        );
    }
}
