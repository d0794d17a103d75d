//! The in-process bus: the same semantics as JetStream where the pipeline relies on them
//! (work queues shared by all consumers of a stage, message-id dedup, nak with delay,
//! redelivery counts), for one-process runs without NATS.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use loopsync_core::subjects::{Names, Stage};
use tokio::sync::Notify;

use crate::{Acker, Bus, BusError, Consumer, DeadLetter, Delivery, Versioned};

const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug)]
struct Queued {
    subject: String,
    payload: Bytes,
    attempt: u32,
    sequence: u64,
}

#[derive(Debug, Default)]
struct Queue {
    items: Mutex<VecDeque<Queued>>,
    ready: Notify,
    /// Published and not yet acknowledged or terminated.
    unsettled: AtomicU64,
}

impl Queue {
    fn settled(&self) {
        self.unsettled.fetch_sub(1, Ordering::SeqCst);
    }

    fn push(&self, item: Queued) {
        self.items.lock().expect("queue lock").push_back(item);
        self.ready.notify_one();
    }
}

/// The in-process bus. Cheap to clone: clones share the queues.
#[derive(Debug, Clone)]
pub struct LocalBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    names: Names,
    queues: HashMap<Stage, Arc<Queue>>,
    seen: Mutex<HashMap<String, Instant>>,
    sequence: Mutex<u64>,
    dead: Mutex<Vec<DeadLetter>>,
    ledger: Mutex<HashMap<String, Versioned>>,
    budgets: Mutex<HashMap<String, Arc<governor::DefaultDirectRateLimiter>>>,
}

impl Default for LocalBus {
    fn default() -> Self {
        LocalBus::new(Names::default())
    }
}

impl LocalBus {
    pub fn new(names: Names) -> LocalBus {
        LocalBus {
            inner: Arc::new(Inner {
                names,
                queues: Stage::ALL
                    .into_iter()
                    .map(|s| (s, Arc::new(Queue::default())))
                    .collect(),
                seen: Mutex::default(),
                sequence: Mutex::new(0),
                dead: Mutex::default(),
                ledger: Mutex::default(),
                budgets: Mutex::default(),
            }),
        }
    }

    /// Messages waiting in a stage's queue (not counting those being processed).
    pub fn pending(&self, stage: Stage) -> usize {
        self.inner.queues[&stage]
            .items
            .lock()
            .expect("queue lock")
            .len()
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn names(&self) -> &Names {
        &self.inner.names
    }

    async fn publish(
        &self,
        subject: &str,
        message_id: &str,
        payload: Bytes,
    ) -> Result<(), BusError> {
        let stage = self
            .inner
            .names
            .stage_of(subject)
            .ok_or_else(|| BusError::Publish {
                subject: subject.to_owned(),
                detail: "no stream holds this subject".into(),
            })?;
        {
            let now = Instant::now();
            let mut seen = self.inner.seen.lock().expect("dedup lock");
            if seen.len() > 50_000 {
                seen.retain(|_, at| now.duration_since(*at) < DUPLICATE_WINDOW);
            }
            if let Some(at) = seen.get(message_id)
                && now.duration_since(*at) < DUPLICATE_WINDOW
            {
                return Ok(());
            }
            seen.insert(message_id.to_owned(), now);
        }
        let sequence = {
            let mut s = self.inner.sequence.lock().expect("sequence lock");
            *s += 1;
            *s
        };
        self.inner.queues[&stage]
            .unsettled
            .fetch_add(1, Ordering::SeqCst);
        self.inner.queues[&stage].push(Queued {
            subject: subject.to_owned(),
            payload,
            attempt: 1,
            sequence,
        });
        Ok(())
    }

    async fn consume(&self, stage: Stage, _batch: usize) -> Result<Box<dyn Consumer>, BusError> {
        Ok(Box::new(LocalConsumer {
            queue: self.inner.queues[&stage].clone(),
        }))
    }

    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BusError> {
        self.inner.dead.lock().expect("dlq lock").push(letter);
        Ok(())
    }

    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError> {
        Ok(self.inner.dead.lock().expect("dlq lock").clone())
    }

    async fn ledger_get(&self, key: &str) -> Result<Option<Versioned>, BusError> {
        Ok(self
            .inner
            .ledger
            .lock()
            .expect("ledger lock")
            .get(key)
            .cloned())
    }

    async fn ledger_swap(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
    ) -> Result<Option<u64>, BusError> {
        let mut ledger = self.inner.ledger.lock().expect("ledger lock");
        let current = ledger.get(key).map(|v| v.revision);
        if current != expected {
            return Ok(None);
        }
        let revision = current.unwrap_or(0) + 1;
        ledger.insert(key.to_owned(), Versioned { value, revision });
        Ok(Some(revision))
    }

    async fn rate_slot(&self, budget: &str, period: Duration) -> Result<(), BusError> {
        let limiter = self
            .inner
            .budgets
            .lock()
            .expect("budget lock")
            .entry(budget.to_owned())
            .or_insert_with(|| {
                let quota = governor::Quota::with_period(period.max(Duration::from_nanos(1)))
                    .expect("a positive period")
                    .allow_burst(std::num::NonZeroU32::MIN);
                Arc::new(governor::RateLimiter::direct(quota))
            })
            .clone();
        limiter.until_ready().await;
        Ok(())
    }

    async fn unsettled(&self, stage: Stage) -> Result<u64, BusError> {
        Ok(self.inner.queues[&stage].unsettled.load(Ordering::SeqCst))
    }
}

struct LocalConsumer {
    queue: Arc<Queue>,
}

#[async_trait]
impl Consumer for LocalConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        loop {
            let notified = self.queue.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let item = self.queue.items.lock().expect("queue lock").pop_front();
            if let Some(item) = item {
                // Pass the wake-up on if more is waiting.
                if !self.queue.items.lock().expect("queue lock").is_empty() {
                    self.queue.ready.notify_one();
                }
                let acker = LocalAcker {
                    queue: self.queue.clone(),
                    item: Mutex::new(Some(Queued {
                        subject: item.subject.clone(),
                        payload: item.payload.clone(),
                        attempt: item.attempt,
                        sequence: item.sequence,
                    })),
                };
                return Some(Ok(Delivery {
                    subject: item.subject,
                    payload: item.payload,
                    attempt: item.attempt,
                    sequence: item.sequence,
                    acker: Box::new(acker),
                }));
            }
            notified.await;
        }
    }
}

struct LocalAcker {
    queue: Arc<Queue>,
    item: Mutex<Option<Queued>>,
}

impl LocalAcker {
    fn take(&self) -> Option<Queued> {
        self.item.lock().expect("acker lock").take()
    }
}

#[async_trait]
impl Acker for LocalAcker {
    async fn ack(&self) -> Result<(), BusError> {
        if self.take().is_some() {
            self.queue.settled();
        }
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        if let Some(mut item) = self.take() {
            item.attempt += 1;
            let queue = self.queue.clone();
            if delay.is_zero() {
                queue.push(item);
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    queue.push(item);
                });
            }
        }
        Ok(())
    }

    async fn term(&self) -> Result<(), BusError> {
        if self.take().is_some() {
            self.queue.settled();
        }
        Ok(())
    }

    async fn progress(&self) -> Result<(), BusError> {
        // No redelivery timer in process.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> LocalBus {
        LocalBus::new(Names::new("t"))
    }

    #[tokio::test]
    async fn dedup_within_window() {
        let bus = bus();
        bus.publish("t.ops.users", "m1", Bytes::from_static(b"a"))
            .await
            .unwrap();
        bus.publish("t.ops.users", "m1", Bytes::from_static(b"a"))
            .await
            .unwrap();
        bus.publish("t.ops.users", "m2", Bytes::from_static(b"b"))
            .await
            .unwrap();
        assert_eq!(bus.pending(Stage::Loader), 2);
        assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 2);
        assert!(
            bus.publish("t.nowhere.users", "m3", Bytes::new())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn nak_redelivers_with_attempt_count_after_delay() {
        let bus = bus();
        bus.publish("t.ops.users", "m1", Bytes::from_static(b"a"))
            .await
            .unwrap();
        let mut c = bus.consume(Stage::Loader, 1).await.unwrap();
        let d = c.next().await.unwrap().unwrap();
        assert_eq!(d.attempt, 1);
        let started = Instant::now();
        d.acker.nak(Duration::from_millis(100)).await.unwrap();
        let again = c.next().await.unwrap().unwrap();
        assert_eq!(again.attempt, 2);
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(
            bus.unsettled(Stage::Loader).await.unwrap(),
            1,
            "waiting again"
        );
        again.acker.ack().await.unwrap();
        assert_eq!(bus.pending(Stage::Loader), 0);
        assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn consumers_of_a_stage_share_the_queue() {
        let bus = bus();
        for i in 0..10 {
            bus.publish("t.ops.s", &format!("m{i}"), Bytes::from(vec![i as u8]))
                .await
                .unwrap();
        }
        let mut a = bus.consume(Stage::Loader, 1).await.unwrap();
        let mut b = bus.consume(Stage::Loader, 1).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(a.next().await.unwrap().unwrap().payload[0]);
            got.push(b.next().await.unwrap().unwrap().payload[0]);
        }
        got.sort();
        assert_eq!(got, (0..10).collect::<Vec<u8>>());
    }
}
