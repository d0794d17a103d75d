//! The in-process bus: the same semantics as JetStream where the pipeline relies on them
//! (work queues shared by all consumers of a stage, message-id dedup, nak with delay,
//! redelivery counts), for one-process runs without NATS.
//!
//! Memory is bounded ([`LocalLimits`]): each stage keeps at most `in_memory` waiting messages in
//! memory and spills the rest, in order, to an anonymous temporary file (removed as it is
//! created: nothing is left behind when the process ends). Beyond `max_waiting` messages or
//! `max_spill_bytes` spilled, `publish` waits until the stage's consumers take some: the
//! extractor waits for the loader. The dedup of message ids and the ledger are bounded too. The
//! bus is not durable anyway: a killed process loses its queues, and the next run re-sends
//! what has no outcome.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::hash::BuildHasher;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::names::Names;
use async_trait::async_trait;
use bytes::Bytes;
use loopsync_core::stage::Stage;
use tokio::sync::Notify;

use crate::{
    Acker, BusError, Consumer, Coordination, DeadLetter, Delivery, Erased, Matcher, Messaging,
    Versioned,
};

const DUPLICATE_WINDOW: Duration = loopsync_core::tuning::DUPLICATE_WINDOW;

/// Bytes written to or read from a spill file at once.
const SPILL_CHUNK: usize = 64 * 1024;

/// The memory bounds of a [`LocalBus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalLimits {
    /// Waiting messages kept in memory per stage; the rest wait in the stage's spill file.
    pub in_memory: usize,
    /// Waiting messages per stage (in memory and spilled) at which `publish` waits.
    pub max_waiting: u64,
    /// Bytes spilled per stage at which `publish` waits.
    pub max_spill_bytes: u64,
    /// Message ids remembered for dedup (within the 120 s window): the oldest are forgotten
    /// beyond it. Correctness never relies on this dedup (the loader's ledger does it).
    pub dedup_ids: usize,
    /// Ledger entries kept: beyond it, entries not written for `ledger_keep` are forgotten.
    pub ledger_entries: usize,
    /// How long a ledger entry is kept at least after its last write.
    pub ledger_keep: Duration,
}

impl Default for LocalLimits {
    fn default() -> Self {
        LocalLimits {
            in_memory: 1024,
            max_waiting: 50_000_000,
            max_spill_bytes: 32 << 30,
            dedup_ids: 100_000,
            ledger_entries: 50_000,
            ledger_keep: Duration::from_secs(15 * 60),
        }
    }
}

#[derive(Debug)]
struct Queued {
    subject: String,
    payload: Bytes,
    attempt: u32,
    sequence: u64,
}

impl Queued {
    /// `[u32 len][u64 sequence][u32 attempt][u32 subject len][subject][payload]`, `len`
    /// counting what follows it.
    fn encode(&self, out: &mut Vec<u8>) {
        let len = 8 + 4 + 4 + self.subject.len() + self.payload.len();
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&self.sequence.to_le_bytes());
        out.extend_from_slice(&self.attempt.to_le_bytes());
        out.extend_from_slice(&(self.subject.len() as u32).to_le_bytes());
        out.extend_from_slice(self.subject.as_bytes());
        out.extend_from_slice(&self.payload);
    }

    fn decode(body: &[u8]) -> io::Result<Queued> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "corrupt spill record");
        let u32_at = |at: usize| -> io::Result<u32> {
            Ok(u32::from_le_bytes(
                body.get(at..at + 4).ok_or_else(bad)?.try_into().unwrap(),
            ))
        };
        let sequence = u64::from_le_bytes(body.get(0..8).ok_or_else(bad)?.try_into().unwrap());
        let attempt = u32_at(8)?;
        let subject_len = u32_at(12)? as usize;
        let subject = body.get(16..16 + subject_len).ok_or_else(bad)?;
        let subject = String::from_utf8(subject.to_vec()).map_err(|_| bad())?;
        Ok(Queued {
            subject,
            payload: Bytes::copy_from_slice(&body[16 + subject_len..]),
            attempt,
            sequence,
        })
    }
}

/// The overflow of a stage's queue, in order, in an anonymous temporary file. Its messages
/// are `[read_buf[read_pos..]] ++ file[read_at..written] ++ write_buf`.
#[derive(Debug, Default)]
struct Spill {
    file: Option<File>,
    /// Messages spilled and not yet read back.
    items: u64,
    /// Their encoded size.
    bytes: u64,
    written: u64,
    read_at: u64,
    write_buf: Vec<u8>,
    read_buf: Vec<u8>,
    read_pos: usize,
}

/// An open temporary file, already unlinked where the system allows it (not Windows): the
/// system frees it when the process ends. Named `loopsync-spill-…` while it has a name.
fn anonymous_file() -> io::Result<File> {
    let (file, path) = tempfile::Builder::new()
        .prefix("loopsync-spill-")
        .tempfile()?
        .into_parts();
    // Removes the name; the open file lives on.
    drop(path);
    Ok(file)
}

impl Spill {
    fn push(&mut self, item: &Queued) -> io::Result<()> {
        let before = self.write_buf.len();
        item.encode(&mut self.write_buf);
        self.items += 1;
        self.bytes += (self.write_buf.len() - before) as u64;
        if self.write_buf.len() >= SPILL_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        if self.file.is_none() {
            self.file = Some(anonymous_file()?);
        }
        let file = self.file.as_mut().expect("opened");
        file.seek(SeekFrom::Start(self.written))?;
        file.write_all(&self.write_buf)?;
        self.written += self.write_buf.len() as u64;
        self.write_buf.clear();
        Ok(())
    }

    /// Makes `n` unread bytes available in `read_buf` from `read_pos`.
    fn fill(&mut self, n: usize) -> io::Result<()> {
        while self.read_buf.len() - self.read_pos < n {
            if self.read_at == self.written {
                if self.write_buf.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "spill file ended early",
                    ));
                }
                self.flush()?;
            }
            self.read_buf.drain(..self.read_pos);
            self.read_pos = 0;
            let want = (n - self.read_buf.len())
                .max(SPILL_CHUNK)
                .min((self.written - self.read_at) as usize);
            let start = self.read_buf.len();
            self.read_buf.resize(start + want, 0);
            let file = self.file.as_mut().expect("a file holds what was flushed");
            file.seek(SeekFrom::Start(self.read_at))?;
            if let Err(e) = file.read_exact(&mut self.read_buf[start..]) {
                self.read_buf.truncate(start);
                return Err(e);
            }
            self.read_at += want as u64;
        }
        Ok(())
    }

    /// The oldest spilled message.
    fn pop(&mut self) -> io::Result<Option<Queued>> {
        if self.items == 0 {
            return Ok(None);
        }
        self.fill(4)?;
        let at = self.read_pos;
        let len = u32::from_le_bytes(self.read_buf[at..at + 4].try_into().unwrap()) as usize;
        self.fill(4 + len)?;
        let at = self.read_pos;
        let item = Queued::decode(&self.read_buf[at + 4..at + 4 + len])?;
        self.read_pos += 4 + len;
        self.items -= 1;
        self.bytes -= (4 + len) as u64;
        if self.items == 0 {
            self.reset()?;
        }
        Ok(Some(item))
    }

    /// Empty again: the file gives its space back.
    fn reset(&mut self) -> io::Result<()> {
        self.written = 0;
        self.read_at = 0;
        self.read_pos = 0;
        self.read_buf = Vec::new();
        self.write_buf = Vec::new();
        if let Some(file) = &self.file {
            file.set_len(0)?;
        }
        Ok(())
    }
}

/// The waiting messages of a stage: the oldest in memory, the overflow spilled. Everything
/// spilled is newer than everything in memory.
#[derive(Debug, Default)]
struct Waiting {
    memory: VecDeque<Queued>,
    spill: Spill,
}

impl Waiting {
    fn len(&self) -> u64 {
        self.memory.len() as u64 + self.spill.items
    }

    fn push(&mut self, item: Queued, in_memory: usize) -> io::Result<()> {
        if self.spill.items == 0 && self.memory.len() < in_memory {
            self.memory.push_back(item);
            Ok(())
        } else {
            self.spill.push(&item)
        }
    }

    fn pop(&mut self, in_memory: usize) -> io::Result<Option<Queued>> {
        // Read back from the spill a chunk at a time: once memory is down to half.
        if self.spill.items > 0 && self.memory.len() <= in_memory / 2 {
            while self.memory.len() < in_memory.max(1) {
                match self.spill.pop()? {
                    Some(item) => self.memory.push_back(item),
                    None => break,
                }
            }
        }
        Ok(self.memory.pop_front())
    }
}

#[derive(Debug)]
struct Queue {
    stage: Stage,
    waiting: Mutex<Waiting>,
    /// Something to consume.
    ready: Notify,
    /// Room to publish.
    room: Notify,
    /// Published and not yet acknowledged or terminated.
    unsettled: AtomicU64,
    limits: LocalLimits,
}

impl Queue {
    fn new(stage: Stage, limits: LocalLimits) -> Queue {
        Queue {
            stage,
            waiting: Mutex::default(),
            ready: Notify::new(),
            room: Notify::new(),
            unsettled: AtomicU64::new(0),
            limits,
        }
    }

    fn settled(&self) {
        self.unsettled.fetch_sub(1, Ordering::SeqCst);
    }

    fn has_room(&self, waiting: &Waiting) -> bool {
        waiting.len() < self.limits.max_waiting && waiting.spill.bytes < self.limits.max_spill_bytes
    }

    /// Back in line (a nak): never waits for room, the message is counted already.
    fn push_again(&self, item: Queued) -> io::Result<()> {
        self.waiting
            .lock()
            .expect("queue lock")
            .push(item, self.limits.in_memory)?;
        self.ready.notify_one();
        Ok(())
    }

    fn pop(&self) -> io::Result<Option<Queued>> {
        let mut waiting = self.waiting.lock().expect("queue lock");
        let item = waiting.pop(self.limits.in_memory)?;
        if item.is_some() {
            if waiting.len() > 0 {
                // Pass the wake-up on if more is waiting.
                self.ready.notify_one();
            }
            self.room.notify_waiters();
        }
        Ok(item)
    }
}

/// Message ids seen within the duplicate window, as 128-bit hashes, at most `cap` of them.
#[derive(Debug)]
struct Dedup {
    hashers: (RandomState, RandomState),
    at: HashMap<u128, Instant>,
    order: VecDeque<(u128, Instant)>,
    cap: usize,
}

impl Dedup {
    fn new(cap: usize) -> Dedup {
        Dedup {
            hashers: (RandomState::new(), RandomState::new()),
            at: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    fn hash(&self, id: &str) -> u128 {
        (u128::from(self.hashers.0.hash_one(id)) << 64) | u128::from(self.hashers.1.hash_one(id))
    }

    /// Whether `id` was seen within the window; notes it as seen now if not.
    fn seen(&mut self, id: &str, now: Instant) -> bool {
        while let Some(&(h, at)) = self.order.front() {
            if now.duration_since(at) < DUPLICATE_WINDOW && self.order.len() < self.cap {
                break;
            }
            self.order.pop_front();
            if self.at.get(&h) == Some(&at) {
                self.at.remove(&h);
            }
        }
        let h = self.hash(id);
        if self
            .at
            .get(&h)
            .is_some_and(|at| now.duration_since(*at) < DUPLICATE_WINDOW)
        {
            return true;
        }
        self.at.insert(h, now);
        self.order.push_back((h, now));
        false
    }

    fn forget(&mut self, id: &str) {
        let h = self.hash(id);
        self.at.remove(&h);
    }

    fn len(&self) -> usize {
        self.at.len()
    }
}

/// The ledger, bounded: beyond `cap` entries, those not written for `keep` are forgotten.
/// Revisions come from one counter, so a forgotten entry's revision never comes back.
#[derive(Debug)]
struct Ledger {
    entries: HashMap<String, (Versioned, Instant)>,
    revisions: u64,
    /// The size at which the next pruning happens.
    prune_at: usize,
    cap: usize,
    keep: Duration,
}

impl Ledger {
    fn swap(&mut self, key: &str, value: Bytes, expected: Option<u64>) -> Option<u64> {
        let current = self.entries.get(key).map(|(v, _)| v.revision);
        if current != expected {
            return None;
        }
        self.revisions += 1;
        let revision = self.revisions;
        self.entries.insert(
            key.to_owned(),
            (Versioned { value, revision }, Instant::now()),
        );
        if self.entries.len() >= self.prune_at {
            let keep = self.keep;
            self.entries.retain(|_, (_, at)| at.elapsed() < keep);
            self.prune_at = self.cap.max(2 * self.entries.len());
        }
        Some(revision)
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
    seen: Mutex<Dedup>,
    sequence: AtomicU64,
    dead: Mutex<Vec<DeadLetter>>,
    ledger: Mutex<Ledger>,
    budgets: Mutex<HashMap<String, Arc<governor::DefaultDirectRateLimiter>>>,
}

impl Default for LocalBus {
    fn default() -> Self {
        LocalBus::new(Names::default())
    }
}

impl LocalBus {
    pub fn new(names: Names) -> LocalBus {
        LocalBus::with_limits(names, LocalLimits::default())
    }

    pub fn with_limits(names: Names, limits: LocalLimits) -> LocalBus {
        LocalBus {
            inner: Arc::new(Inner {
                names,
                queues: Stage::ALL
                    .into_iter()
                    .map(|s| (s, Arc::new(Queue::new(s, limits.clone()))))
                    .collect(),
                seen: Mutex::new(Dedup::new(limits.dedup_ids)),
                sequence: AtomicU64::new(0),
                dead: Mutex::default(),
                ledger: Mutex::new(Ledger {
                    entries: HashMap::new(),
                    revisions: 0,
                    prune_at: limits.ledger_entries.max(1),
                    cap: limits.ledger_entries.max(1),
                    keep: limits.ledger_keep,
                }),
                budgets: Mutex::default(),
            }),
        }
    }

    /// Messages waiting in a stage's queue, in memory or spilled (not counting those being
    /// processed).
    pub fn pending(&self, stage: Stage) -> usize {
        self.inner.queues[&stage]
            .waiting
            .lock()
            .expect("queue lock")
            .len() as usize
    }

    /// Waiting messages of a stage held in memory (at most [`LocalLimits::in_memory`]).
    pub fn in_memory(&self, stage: Stage) -> usize {
        self.inner.queues[&stage]
            .waiting
            .lock()
            .expect("queue lock")
            .memory
            .len()
    }

    /// Bytes of a stage's messages waiting in its spill file.
    pub fn spilled_bytes(&self, stage: Stage) -> u64 {
        self.inner.queues[&stage]
            .waiting
            .lock()
            .expect("queue lock")
            .spill
            .bytes
    }

    /// Message ids the dedup remembers.
    pub fn remembered_ids(&self) -> usize {
        self.inner.seen.lock().expect("dedup lock").len()
    }

    /// The stream and subject names it gives its messages.
    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// Entries in the ledger.
    pub fn ledger_len(&self) -> usize {
        self.inner.ledger.lock().expect("ledger lock").entries.len()
    }
}

/// An error of a stage's spill file, saying so.
fn spill(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("in-process queue spill file: {e}"))
}

fn spill_error(stage: Stage, e: &io::Error) -> BusError {
    BusError::Publish {
        subject: stage.name().to_owned(),
        source: spill(e).into(),
    }
}

#[async_trait]
impl Messaging for LocalBus {
    /// Waits while the stage holds [`LocalLimits::max_waiting`] messages (or
    /// [`LocalLimits::max_spill_bytes`] spilled).
    async fn publish(
        &self,
        stage: Stage,
        sync: &str,
        message_id: &str,
        payload: Bytes,
    ) -> Result<(), BusError> {
        let subject = self.inner.names.subject(stage, sync);
        let queue = &self.inner.queues[&stage];
        loop {
            let room = queue.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut waiting = queue.waiting.lock().expect("queue lock");
                if queue.has_room(&waiting) {
                    // Noted as seen only once it is queued: a publish cancelled while it
                    // waits for room can be made again.
                    let mut seen = self.inner.seen.lock().expect("dedup lock");
                    if seen.seen(message_id, Instant::now()) {
                        return Ok(());
                    }
                    let item = Queued {
                        subject: subject.clone(),
                        payload,
                        attempt: 1,
                        sequence: self.inner.sequence.fetch_add(1, Ordering::SeqCst) + 1,
                    };
                    if let Err(e) = waiting.push(item, queue.limits.in_memory) {
                        seen.forget(message_id);
                        return Err(spill_error(stage, &e));
                    }
                    queue.unsettled.fetch_add(1, Ordering::SeqCst);
                    drop(seen);
                    drop(waiting);
                    queue.ready.notify_one();
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// None: in process, a crashed handler takes the bus down with it, so no message is ever
    /// delivered without being settled more often than the worker allows.
    async fn exhausted(&self, _stage: Stage) -> Result<Option<Box<dyn Consumer>>, BusError> {
        Ok(None)
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

    async fn unsettled(&self, stage: Stage) -> Result<u64, BusError> {
        Ok(self.inner.queues[&stage].unsettled.load(Ordering::SeqCst))
    }

    /// None: the work queues live and die with the run of this process.
    async fn held(&self, _sync: &str, _matches: &Matcher) -> Result<u64, BusError> {
        Ok(0)
    }

    /// The dead letters only: the work queues live and die with the run of this process,
    /// and `loopsync forget` refuses while a run is in progress.
    async fn erase(&self, sync: &str, matches: &Matcher) -> Result<Erased, BusError> {
        let mut dead = self.inner.dead.lock().expect("dlq lock");
        let before = dead.len();
        dead.retain(|l| l.sync != sync || !matches(l.stage, &l.payload));
        Ok(Erased {
            work_queues: 0,
            dead_letters: (before - dead.len()) as u64,
        })
    }
}

#[async_trait]
impl Coordination for LocalBus {
    async fn ledger_get(&self, key: &str) -> Result<Option<Versioned>, BusError> {
        Ok(self
            .inner
            .ledger
            .lock()
            .expect("ledger lock")
            .entries
            .get(key)
            .map(|(v, _)| v.clone()))
    }

    async fn ledger_swap(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
    ) -> Result<Option<u64>, BusError> {
        Ok(self
            .inner
            .ledger
            .lock()
            .expect("ledger lock")
            .swap(key, value, expected))
    }

    async fn ledger_forget(&self, key: &str) -> Result<bool, BusError> {
        Ok(self
            .inner
            .ledger
            .lock()
            .expect("ledger lock")
            .entries
            .remove(key)
            .is_some())
    }

    async fn rate_slot(
        &self,
        budget: &str,
        period: Duration,
        _slack: Duration,
        _count: u32,
        taker: &crate::budget::Taker,
    ) -> Result<(u64, u32), BusError> {
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
        // One at a time: governor's cells are taken in process, with no round trip to save.
        Ok((taker.now(), 1))
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
            let item = match self.queue.pop() {
                Ok(item) => item,
                Err(e) => {
                    return Some(Err(BusError::Consume {
                        stage: self.queue.stage.name().to_owned(),
                        source: spill(&e).into(),
                    }));
                }
            };
            if let Some(item) = item {
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
                queue.push_again(item).map_err(|e| {
                    queue.settled();
                    BusError::ack(spill(&e))
                })?;
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(error) = queue.push_again(item) {
                        // Lost, as a killed process loses its queues: the next run re-sends it.
                        tracing::error!(%error, "a message naked could not be queued again");
                        queue.settled();
                    }
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
        bus.publish(Stage::Loader, "users", "m1", Bytes::from_static(b"a"))
            .await
            .unwrap();
        bus.publish(Stage::Loader, "users", "m1", Bytes::from_static(b"a"))
            .await
            .unwrap();
        bus.publish(Stage::Loader, "users", "m2", Bytes::from_static(b"b"))
            .await
            .unwrap();
        assert_eq!(bus.pending(Stage::Loader), 2);
        assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 2);
        // A message for a stream that does not exist cannot be written any more: the bus
        // names the subject from the stage.
    }

    #[tokio::test]
    async fn nak_redelivers_with_attempt_count_after_delay() {
        let bus = bus();
        bus.publish(Stage::Loader, "users", "m1", Bytes::from_static(b"a"))
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
            bus.publish(
                Stage::Loader,
                "s",
                &format!("m{i}"),
                Bytes::from(vec![i as u8]),
            )
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
    fn small(in_memory: usize, max_waiting: u64) -> LocalBus {
        LocalBus::with_limits(
            Names::new("t"),
            LocalLimits {
                in_memory,
                max_waiting,
                ..LocalLimits::default()
            },
        )
    }

    async fn publish_n(bus: &LocalBus, range: std::ops::Range<u32>) {
        for i in range {
            bus.publish(
                Stage::Loader,
                "s",
                &format!("m{i}"),
                Bytes::from(i.to_le_bytes().to_vec()),
            )
            .await
            .unwrap();
        }
    }

    fn number(d: &Delivery) -> u32 {
        u32::from_le_bytes(d.payload[..4].try_into().unwrap())
    }

    /// Beyond `in_memory`, messages wait in the spill file; they come back in the order they
    /// were published, also when publishing goes on while they are read back, and memory never
    /// holds more than the bound.
    #[tokio::test]
    async fn order_is_kept_through_the_spill_and_memory_stays_bounded() {
        let bus = small(8, u64::MAX);
        publish_n(&bus, 0..1000).await;
        assert_eq!(bus.pending(Stage::Loader), 1000);
        assert_eq!(bus.in_memory(Stage::Loader), 8);
        assert!(bus.spilled_bytes(Stage::Loader) > 0);
        assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 1000);
        let mut c = bus.consume(Stage::Loader, 1).await.unwrap();
        let mut got = Vec::new();
        for round in 0..2000u32 {
            if round % 3 == 0 && round < 1500 {
                // Published while the spill is being read back: after all of it.
                publish_n(&bus, 1000 + round / 3..1000 + round / 3 + 1).await;
            }
            let d = c.next().await.unwrap().unwrap();
            got.push(number(&d));
            d.acker.ack().await.unwrap();
            assert!(bus.in_memory(Stage::Loader) <= 8);
            if bus.pending(Stage::Loader) == 0 {
                break;
            }
        }
        assert_eq!(got, (0..1500).collect::<Vec<u32>>());
        assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 0);
        assert_eq!(bus.spilled_bytes(Stage::Loader), 0, "the spill is emptied");
        // And again: the emptied file is used anew.
        publish_n(&bus, 5000..5100).await;
        for i in 5000..5100 {
            let d = c.next().await.unwrap().unwrap();
            assert_eq!(number(&d), i);
            d.acker.ack().await.unwrap();
        }
    }

    /// Messages larger than a spill chunk come back whole.
    #[tokio::test]
    async fn large_messages_survive_the_spill() {
        let bus = small(1, u64::MAX);
        let big = |i: u8| Bytes::from(vec![i; SPILL_CHUNK * 2 + usize::from(i)]);
        for i in 0..5u8 {
            bus.publish(Stage::Loader, "s", &format!("b{i}"), big(i))
                .await
                .unwrap();
        }
        let mut c = bus.consume(Stage::Loader, 1).await.unwrap();
        for i in 0..5u8 {
            let d = c.next().await.unwrap().unwrap();
            assert_eq!(d.payload, big(i));
            assert_eq!(d.subject, "t.ops.s");
            d.acker.ack().await.unwrap();
        }
    }

    /// A nak'd message goes back in line behind the spilled ones, with its attempt counted,
    /// and `unsettled` counts it until it is settled.
    #[tokio::test]
    async fn nak_redelivers_behind_the_spill() {
        let bus = small(2, u64::MAX);
        publish_n(&bus, 0..10).await;
        let mut c = bus.consume(Stage::Loader, 1).await.unwrap();
        let first = c.next().await.unwrap().unwrap();
        assert_eq!((number(&first), first.attempt), (0, 1));
        first.acker.nak(Duration::ZERO).await.unwrap();
        assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 10);
        let second = c.next().await.unwrap().unwrap();
        second.acker.term().await.unwrap();
        let mut order = Vec::new();
        for _ in 0..9 {
            let d = c.next().await.unwrap().unwrap();
            order.push((number(&d), d.attempt));
            d.acker.ack().await.unwrap();
        }
        let mut expected: Vec<(u32, u32)> = (2..10).map(|i| (i, 1)).collect();
        expected.push((0, 2));
        assert_eq!(order, expected);
        assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 0);
        assert_eq!(bus.pending(Stage::Loader), 0);
    }

    /// At `max_waiting`, publish waits (the extractor waits for the loader) and goes on as
    /// soon as a consumer takes a message.
    #[tokio::test]
    async fn publish_waits_at_the_cap_and_resumes_when_consumers_take() {
        let bus = small(2, 5);
        publish_n(&bus, 0..5).await;
        let blocked = {
            let bus = bus.clone();
            tokio::spawn(async move { publish_n(&bus, 5..7).await })
        };
        // Waiting for room: it cannot finish while nobody consumes (the sleep only bounds how
        // long we look).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!blocked.is_finished(), "publish went past the cap");
        assert_eq!(bus.pending(Stage::Loader), 5);
        let mut c = bus.consume(Stage::Loader, 1).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..7 {
            let d = tokio::time::timeout(Duration::from_secs(10), c.next())
                .await
                .expect("a message within 10 s")
                .unwrap()
                .unwrap();
            got.push(number(&d));
            d.acker.ack().await.unwrap();
            assert!(bus.pending(Stage::Loader) <= 5);
        }
        tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("the publisher resumed")
            .unwrap();
        assert_eq!(got, (0..7).collect::<Vec<u32>>());
        assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 0);
    }

    /// A publish cancelled while it waits for room can be made again (its id was not noted).
    #[tokio::test]
    async fn a_publish_cancelled_while_waiting_can_be_retried() {
        let bus = small(1, 1);
        publish_n(&bus, 0..1).await;
        let attempt = bus.publish(
            Stage::Loader,
            "s",
            "m1",
            Bytes::from(1u32.to_le_bytes().to_vec()),
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(100), attempt)
                .await
                .is_err()
        );
        let mut c = bus.consume(Stage::Loader, 1).await.unwrap();
        c.next().await.unwrap().unwrap().acker.ack().await.unwrap();
        publish_n(&bus, 1..2).await;
        assert_eq!(bus.pending(Stage::Loader), 1);
    }

    /// The dedup remembers at most `dedup_ids` ids, still dropping a repeat of a recent one.
    #[tokio::test]
    async fn dedup_memory_is_bounded() {
        let bus = LocalBus::with_limits(
            Names::new("t"),
            LocalLimits {
                dedup_ids: 100,
                ..LocalLimits::default()
            },
        );
        publish_n(&bus, 0..1000).await;
        assert!(bus.remembered_ids() <= 100, "{}", bus.remembered_ids());
        publish_n(&bus, 990..1000).await;
        assert_eq!(bus.pending(Stage::Loader), 1000, "recent repeats dropped");
    }

    /// The ledger forgets entries not written for `ledger_keep` once it holds
    /// `ledger_entries`; compare-and-set still refuses a revision read before.
    #[tokio::test]
    async fn ledger_is_bounded_and_revisions_never_repeat() {
        let bus = LocalBus::with_limits(
            Names::new("t"),
            LocalLimits {
                ledger_entries: 10,
                ledger_keep: Duration::ZERO,
                ..LocalLimits::default()
            },
        );
        let first = bus
            .ledger_swap("k0", Bytes::from_static(b"a"), None)
            .await
            .unwrap()
            .unwrap();
        for i in 1..100 {
            bus.ledger_swap(&format!("k{i}"), Bytes::from_static(b"v"), None)
                .await
                .unwrap()
                .unwrap();
            assert!(bus.ledger_len() <= 10, "{}", bus.ledger_len());
        }
        // k0 was forgotten; written anew, it gets a revision never handed out before.
        let again = bus
            .ledger_swap("k0", Bytes::from_static(b"b"), None)
            .await
            .unwrap()
            .unwrap();
        assert!(again > first);
        assert_eq!(
            bus.ledger_swap("k0", Bytes::from_static(b"c"), Some(first))
                .await
                .unwrap(),
            None
        );
    }
}
