use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::names::Names;
use loopsync_core::codec;
use loopsync_core::envelope::{Action, ChangeKind, Operation, Outcome, OutcomeStatus, VERSION};
use tokio::sync::Notify;

use super::*;
use crate::budget::Taker;
use crate::{Coordination, JetStreamBus, JetStreamOptions, LocalBus, RateBudget};

#[derive(Debug)]
struct TestError(ErrorClass);

impl Display for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "test failure {:?}", self.0)
    }
}

impl Classified for TestError {
    fn class(&self) -> ErrorClass {
        self.0
    }
}

/// Fails the first `failures` deliveries of every message with `class`, then succeeds.
struct Flaky {
    failures: u32,
    class: ErrorClass,
    calls: AtomicU32,
    handled: Mutex<Vec<Bytes>>,
    gave_up: Mutex<Vec<(Fate, String)>>,
    progress: Notify,
}

impl Flaky {
    fn new(failures: u32, class: ErrorClass) -> Arc<Flaky> {
        Arc::new(Flaky {
            failures,
            class,
            calls: AtomicU32::new(0),
            handled: Mutex::default(),
            gave_up: Mutex::default(),
            progress: Notify::new(),
        })
    }

    async fn wait_for(&self, what: impl Fn(&Flaky) -> bool) {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let notified = self.progress.notified();
                if what(self) {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("the worker made the expected progress in time");
    }
}

#[async_trait]
impl Handler for Flaky {
    type Error = TestError;

    async fn handle(&self, info: &DeliveryInfo, payload: &Bytes) -> Result<(), TestError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = if info.attempt <= self.failures {
            Err(TestError(self.class))
        } else {
            self.handled.lock().unwrap().push(payload.clone());
            Ok(())
        };
        self.progress.notify_waiters();
        result
    }

    async fn give_up(
        &self,
        _info: &DeliveryInfo,
        _payload: &Bytes,
        fate: Fate,
        reason: &str,
    ) -> Result<(), TestError> {
        self.gave_up.lock().unwrap().push((fate, reason.to_owned()));
        self.progress.notify_waiters();
        Ok(())
    }
}

/// Waits (at most 20 s) until the loader's queue has nothing unsettled.
async fn settled(bus: &dyn Messaging) {
    loopsync_testkit::until(Duration::from_secs(20), "the queue is settled", || async {
        match bus.unsettled(Stage::Loader).await {
            Ok(0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

fn fast(max_attempts: u32) -> WorkerOptions {
    WorkerOptions {
        concurrency: 2,
        max_attempts,
        backoff: Backoff {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(100),
        },
        progress_every: Some(Duration::from_millis(200)),
        shutdown_grace: SHUTDOWN_GRACE,
    }
}

#[test]
fn settle_table() {
    let o = fast(3);
    let retry = |after| Err((ErrorClass::Retryable { after }, "503".to_owned()));
    assert_eq!(settle(Ok(()), 1, &o), Settle::Ack);
    assert!(matches!(settle(retry(None), 1, &o), Settle::Nak(d) if d <= Duration::from_millis(20)));
    assert_eq!(
        settle(retry(Some(Duration::from_secs(2))), 2, &o),
        Settle::Nak(Duration::from_secs(2)),
        "a server-given delay is honoured"
    );
    assert_eq!(
        settle(retry(Some(Duration::from_secs(3600))), 2, &o),
        Settle::Nak(MAX_SERVER_DELAY)
    );
    assert_eq!(
        settle(retry(None), 3, &o),
        Settle::DeadLetter("gave up after 3 attempts: 503".into())
    );
    assert_eq!(
        settle(Err((ErrorClass::Permanent, "400 bad".into())), 1, &o),
        Settle::Reject("400 bad".into())
    );
    assert_eq!(
        settle(Err((ErrorClass::Poison, "garbage".into())), 1, &o),
        Settle::DeadLetter("garbage".into())
    );
}

#[test]
fn backoff_grows_jitters_and_caps() {
    let b = Backoff {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(1),
    };
    for _ in 0..100 {
        let d1 = b.delay(1);
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d3 = b.delay(3);
        assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
        assert!(b.delay(30) <= Duration::from_secs(1));
    }
}

/// A running worker; `stop` cancels it and waits until it has drained.
struct Running(CancellationToken, tokio::task::JoinHandle<()>);

impl Running {
    async fn stop(self) {
        self.0.cancel();
        self.1.await.unwrap();
    }
}

async fn start(bus: Arc<dyn Messaging>, handler: Arc<Flaky>, options: WorkerOptions) -> Running {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move {
        run(bus, Stage::Loader, handler, options, token)
            .await
            .unwrap();
    });
    Running(shutdown, task)
}

async fn exercise_retry_then_success(bus: Arc<dyn Messaging>) {
    bus.publish(Stage::Loader, "users", "m1", Bytes::from_static(b"one"))
        .await
        .unwrap();
    // The same id again is a duplicate.
    bus.publish(Stage::Loader, "users", "m1", Bytes::from_static(b"one"))
        .await
        .unwrap();
    let handler = Flaky::new(2, ErrorClass::RETRY);
    let stop = start(bus.clone(), handler.clone(), fast(5)).await;
    handler
        .wait_for(|h| !h.handled.lock().unwrap().is_empty())
        .await;
    // Everything settled: a duplicate the bus had kept would still be outstanding, or handled.
    settled(&*bus).await;
    stop.stop().await;
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        3,
        "two failures, one success, no duplicate"
    );
    assert_eq!(handler.handled.lock().unwrap().len(), 1);
    assert!(handler.gave_up.lock().unwrap().is_empty());
}

async fn exercise_permanent_poison_and_exhaustion(bus: Arc<dyn Messaging>) {
    for (class, max, fate, reason) in [
        (
            ErrorClass::Permanent,
            5,
            Fate::Rejected,
            "test failure Permanent",
        ),
        (
            ErrorClass::Poison,
            5,
            Fate::DeadLettered,
            "test failure Poison",
        ),
        (
            ErrorClass::RETRY,
            3,
            Fate::DeadLettered,
            "gave up after 3 attempts",
        ),
    ] {
        let id = format!("{class:?}");
        bus.publish(Stage::Loader, "users", &id, Bytes::from(id.clone()))
            .await
            .unwrap();
        let handler = Flaky::new(u32::MAX, class);
        let stop = start(bus.clone(), handler.clone(), fast(max)).await;
        handler
            .wait_for(|h| !h.gave_up.lock().unwrap().is_empty())
            .await;
        // Nothing left to deliver: a further attempt would be outstanding, or counted.
        settled(&*bus).await;
        stop.stop().await;
        let gave_up = handler.gave_up.lock().unwrap().clone();
        assert_eq!(gave_up.len(), 1, "{class:?}: given up once");
        assert_eq!(gave_up[0].0, fate, "{class:?}");
        assert!(gave_up[0].1.contains(reason), "{class:?}: {}", gave_up[0].1);
        let expected_calls = if class.is_retryable() { max } else { 1 };
        assert_eq!(
            handler.calls.load(Ordering::SeqCst),
            expected_calls,
            "{class:?}"
        );
    }
    let letters = bus.dead_letters().await.unwrap();
    assert_eq!(
        letters.len(),
        2,
        "poison and exhausted, not the rejection: {letters:?}"
    );
    assert_eq!(letters[0].payload, Bytes::from("Poison"));
    assert_eq!(letters[1].attempts, 3);
    assert!(letters[1].reason.starts_with("gave up after 3 attempts"));
    assert_eq!(letters[1].sync, "users");
    assert_eq!(letters[1].stage, Stage::Loader);
}

#[tokio::test]
async fn local_retry_then_success() {
    exercise_retry_then_success(Arc::new(LocalBus::new(Names::new("t")))).await;
}

#[tokio::test]
async fn local_permanent_poison_and_exhaustion() {
    exercise_permanent_poison_and_exhaustion(Arc::new(LocalBus::new(Names::new("t")))).await;
}

/// A JetStream bus in a namespace of its own, whose streams are deleted when the returned
/// namespace is dropped.
async fn jetstream(
    options: &JetStreamOptions,
) -> Option<(Arc<JetStreamBus>, loopsync_testkit::TestNamespace)> {
    let ns = loopsync_testkit::TestNamespace::create("t")?;
    let names = Names::new(&ns.namespace);
    let bus = JetStreamBus::connect(&ns.url, names, options)
        .await
        .unwrap();
    Some((Arc::new(bus), ns))
}

#[tokio::test]
async fn jetstream_retry_then_success() {
    let Some((bus, _ns)) = jetstream(&JetStreamOptions::default()).await else {
        return;
    };
    exercise_retry_then_success(bus).await;
}

#[tokio::test]
async fn jetstream_permanent_poison_and_exhaustion() {
    let Some((bus, _ns)) = jetstream(&JetStreamOptions::default()).await else {
        return;
    };
    exercise_permanent_poison_and_exhaustion(bus).await;
}

/// The ledger is compare-and-set: a writer that read an older revision loses, on both buses.
async fn exercise_ledger_swaps(bus: Arc<dyn Coordination>) {
    assert_eq!(bus.ledger_get("abc").await.unwrap(), None);
    let first = bus
        .ledger_swap("abc", Bytes::from_static(b"v1"), None)
        .await
        .unwrap()
        .expect("created");
    assert_eq!(
        bus.ledger_swap("abc", Bytes::from_static(b"again"), None)
            .await
            .unwrap(),
        None,
        "it exists already"
    );
    let second = bus
        .ledger_swap("abc", Bytes::from_static(b"v2"), Some(first))
        .await
        .unwrap()
        .expect("updated at the revision read");
    assert_eq!(
        bus.ledger_swap("abc", Bytes::from_static(b"stale"), Some(first))
            .await
            .unwrap(),
        None,
        "an older revision loses"
    );
    let read = bus.ledger_get("abc").await.unwrap().unwrap();
    assert_eq!(
        (read.value, read.revision),
        (Bytes::from_static(b"v2"), second)
    );
}

#[tokio::test]
async fn jetstream_ledger_compare_and_set() {
    let Some((bus, _ns)) = jetstream(&JetStreamOptions::default()).await else {
        return;
    };
    exercise_ledger_swaps(bus).await;
}

#[tokio::test]
async fn local_ledger_compare_and_set() {
    exercise_ledger_swaps(Arc::new(LocalBus::new(Names::new("t")))).await;
}

/// A stage whose handler hangs on every message (as a worker that crashes on it would), and
/// whose `give_up` records the record's fate as an outcome, as the stages do.
struct Hangs {
    bus: Arc<dyn Messaging>,
    gave_up: Mutex<Vec<(Fate, String, u32)>>,
}

#[async_trait]
impl Handler for Hangs {
    type Error = BusError;

    async fn handle(&self, _info: &DeliveryInfo, _payload: &Bytes) -> Result<(), BusError> {
        std::future::pending().await
    }

    async fn give_up(
        &self,
        info: &DeliveryInfo,
        payload: &Bytes,
        fate: Fate,
        reason: &str,
    ) -> Result<(), BusError> {
        self.gave_up
            .lock()
            .unwrap()
            .push((fate, reason.to_owned(), info.attempt));
        let op: Operation = codec::decode(payload).expect("an operation");
        let outcome = Outcome::new(
            &op.sync,
            op.run_id,
            &op.key,
            &op.fingerprint,
            fate.status(),
            op.action.name(),
        )
        .with_installation(&op.installation)
        .with_reason(reason);
        crate::publish::outcome(&*self.bus, &outcome).await
    }
}

/// A message whose workers never settle it reaches the server's max-deliveries; the worker of
/// its stage takes the advisory and settles it as a dead letter through the stage's own
/// `give_up`: dead-lettered, removed from the work queue, its record given an outcome.
#[tokio::test]
async fn jetstream_max_deliveries_advisory_moves_to_dead_letters() {
    let options = JetStreamOptions {
        ack_wait: Duration::from_millis(500),
        max_deliver: 2,
        ..JetStreamOptions::default()
    };
    let Some((bus, _ns)) = jetstream(&options).await else {
        return;
    };
    let op = Operation {
        v: VERSION,
        sync: "users".into(),
        run_id: 9,
        key: "42".into(),
        fingerprint: "fp".into(),
        change: ChangeKind::Added,
        idempotency_key: "k".into(),
        action: Action::Upsert {
            email: Some("a@x.co".into()),
            user_id: None,
            properties: Default::default(),
            mailing_lists: Default::default(),
        },
        installation: "i".into(),
        also_remove: None,
    };
    bus.publish(
        Stage::Loader,
        "users",
        "op-1",
        Bytes::from(codec::encode(&op)),
    )
    .await
    .unwrap();

    // The loader's worker, hanging on the message at every delivery; no in-progress acks, so
    // the server redelivers it until it gives up.
    let handler = Arc::new(Hangs {
        bus: bus.clone(),
        gave_up: Mutex::default(),
    });
    let stop = CancellationToken::new();
    let worker = tokio::spawn(run(
        bus.clone() as Arc<dyn Messaging>,
        Stage::Loader,
        handler.clone(),
        WorkerOptions {
            concurrency: 4,
            progress_every: None,
            shutdown_grace: Duration::from_millis(100),
            ..WorkerOptions::default()
        },
        stop.clone(),
    ));
    let mut outcomes = bus.consume(Stage::Checkpointer, 1).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), outcomes.next())
        .await
        .expect("an outcome in time")
        .unwrap()
        .unwrap();
    let outcome: Outcome = codec::decode(&outcome.payload).unwrap();
    assert_eq!(outcome.status, OutcomeStatus::DeadLettered);
    assert_eq!((outcome.run_id, outcome.key.as_str()), (9, "42"));
    assert!(outcome.reason.unwrap().contains("delivered 2 times"));
    let gave_up = handler.gave_up.lock().unwrap().clone();
    assert_eq!(gave_up.len(), 1, "{gave_up:?}");
    assert_eq!((gave_up[0].0, gave_up[0].2), (Fate::DeadLettered, 2));
    // Stored before the message leaves the work queue.
    settled(&*bus).await;
    let letters = bus.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].stage, Stage::Loader);
    assert_eq!(codec::decode::<Operation>(&letters[0].payload).unwrap(), op);
    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// Two connections to one namespace of the test server (two processes of a deployment); the
/// namespace lives as long as the first of the three.
async fn two_connections() -> Option<(
    loopsync_testkit::TestNamespace,
    Arc<JetStreamBus>,
    Arc<JetStreamBus>,
)> {
    let ns = loopsync_testkit::TestNamespace::create("t")?;
    let (url, names) = (ns.url.clone(), Names::new(&ns.namespace));
    let options = JetStreamOptions::default();
    let a = Arc::new(
        JetStreamBus::connect(&url, names.clone(), &options)
            .await
            .unwrap(),
    );
    let b = Arc::new(JetStreamBus::connect(&url, names, &options).await.unwrap());
    Some((ns, a, b))
}

/// Two processes (two connections) taking slots of one budget: the slots are `period` apart in
/// all, not per process (a slot may be handed out before it is due, by at most half a period:
/// its taker waits for the due time), and taking them takes the time they span.
#[tokio::test]
async fn jetstream_rate_budget_is_shared_between_connections() {
    let Some((_ns, a, b)) = two_connections().await else {
        return;
    };
    let period = Duration::from_millis(50);
    let started = tokio::time::Instant::now();
    let mut takers = Vec::new();
    for bus in [a.clone(), b.clone(), a, b] {
        takers.push(tokio::spawn(async move {
            let (mut due, taker) = (Vec::new(), Taker::default());
            for _ in 0..5 {
                let (first, _) = bus
                    .rate_slot("team-x", period, Duration::ZERO, 1, &taker)
                    .await
                    .unwrap();
                due.push(first);
            }
            due
        }));
    }
    let mut due = Vec::new();
    for t in takers {
        due.extend(t.await.unwrap());
    }
    due.sort_unstable();
    for w in due.windows(2) {
        assert!(w[1] - w[0] >= period.as_nanos() as u64, "{due:?}");
    }
    // 20 slots, the first at once, the last handed out at most half a period early.
    assert!(
        started.elapsed() >= period * 19 - period / 2,
        "{:?}",
        started.elapsed()
    );
}

/// Slots taken a block at a time: two connections each take blocks of 4 from one budget; no
/// two blocks overlap, each block's slots are `period` apart, and a `RateBudget` over the bus
/// hands its block's slots out no earlier than they are due.
#[tokio::test]
async fn jetstream_rate_budget_hands_out_blocks_that_never_overlap() {
    let Some((_ns, a, b)) = two_connections().await else {
        return;
    };
    let period = Duration::from_millis(5);
    let mut blocks = Vec::new();
    let (one, two) = (Taker::default(), Taker::default());
    for (bus, taker) in [
        (&a, &one),
        (&b, &two),
        (&a, &one),
        (&b, &two),
        (&a, &one),
        (&b, &two),
    ] {
        let (first, granted) = bus
            .rate_slot("team-y", period, Duration::ZERO, 4, taker)
            .await
            .unwrap();
        assert_eq!(granted, 4);
        blocks.push(first);
    }
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        assert!(w[1] - w[0] >= 4 * period.as_nanos() as u64, "{blocks:?}");
    }
    // 1 000 requests/s: blocks of 9 slots, handed out about a millisecond apart.
    let budget = RateBudget::shared(a.clone(), "team-z".into(), 1000);
    let started = tokio::time::Instant::now();
    let mut at = Vec::new();
    for _ in 0..30 {
        budget.ready().await.unwrap();
        at.push(crate::budget::unix_nanos());
    }
    // None before it is due: the last at least 29 periods after the first slot's due time,
    // which is no later than the first was handed out.
    assert!(
        started.elapsed() >= Duration::from_micros(1010 * 29),
        "{:?}",
        started.elapsed()
    );
    assert!(at[29] - at[0] >= 29 * 1_010_000 - 2_000_000, "{at:?}");
}

#[tokio::test]
async fn local_rate_budget_paces() {
    let bus = LocalBus::new(Names::new("t"));
    let taker = Taker::default();
    let started = tokio::time::Instant::now();
    for _ in 0..5 {
        bus.rate_slot(
            "team-x",
            Duration::from_millis(40),
            Duration::ZERO,
            1,
            &taker,
        )
        .await
        .unwrap();
    }
    assert!(started.elapsed() >= Duration::from_millis(160));
}

/// Starts its work and never finishes it (an extraction that would outlive any grace).
#[derive(Default)]
struct Stuck {
    started: Notify,
}

#[async_trait]
impl Handler for Stuck {
    type Error = TestError;

    async fn handle(&self, _info: &DeliveryInfo, _payload: &Bytes) -> Result<(), TestError> {
        self.started.notify_one();
        std::future::pending().await
    }

    async fn give_up(
        &self,
        _info: &DeliveryInfo,
        _payload: &Bytes,
        _fate: Fate,
        _reason: &str,
    ) -> Result<(), TestError> {
        Ok(())
    }
}

/// On shutdown a worker whose handler does not finish within the grace drops it and returns;
/// the message is not acked but nak'd, and the next worker handles it.
#[tokio::test]
async fn local_shutdown_drops_a_stuck_handler_and_its_message_comes_back() {
    let bus: Arc<dyn Messaging> = Arc::new(LocalBus::default());
    bus.publish(Stage::Loader, "users", "m1", Bytes::from_static(b"one"))
        .await
        .unwrap();
    let stuck = Arc::new(Stuck::default());
    let shutdown = CancellationToken::new();
    let options = WorkerOptions {
        shutdown_grace: Duration::from_millis(200),
        ..fast(5)
    };
    let worker = tokio::spawn(run(
        bus.clone(),
        Stage::Loader,
        stuck.clone(),
        options,
        shutdown.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(20), stuck.started.notified())
        .await
        .expect("the handler started");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker returned after its grace, its handler dropped")
        .unwrap()
        .unwrap();
    assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 1, "not acked");
    let handler = Flaky::new(0, ErrorClass::RETRY);
    let next = start(bus.clone(), handler.clone(), fast(5)).await;
    handler
        .wait_for(|h| h.handled.lock().unwrap().len() == 1)
        .await;
    settled(&*bus).await;
    next.stop().await;
}

/// A batch handler that fails, with `class`, every batch holding the payload `bad`.
struct OneBad {
    class: ErrorClass,
    landed: Mutex<Vec<Bytes>>,
    gave_up: Mutex<Vec<(Bytes, String)>>,
}

#[async_trait]
impl BatchHandler for OneBad {
    type Error = TestError;

    async fn handle_batch(&self, batch: &[(DeliveryInfo, Bytes)]) -> Result<(), TestError> {
        if batch.iter().any(|(_, p)| p.as_ref() == b"bad") {
            return Err(TestError(self.class));
        }
        self.landed
            .lock()
            .unwrap()
            .extend(batch.iter().map(|(_, p)| p.clone()));
        Ok(())
    }

    async fn give_up(
        &self,
        _info: &DeliveryInfo,
        payload: &Bytes,
        reason: &str,
    ) -> Result<(), TestError> {
        self.gave_up
            .lock()
            .unwrap()
            .push((payload.clone(), reason.to_owned()));
        Ok(())
    }
}

/// A batched checkpointer worker on `bus` (batches of up to 50, open while messages keep
/// coming 2 ms apart, 50 ms at most).
fn batched<H: BatchHandler>(
    bus: &Arc<LocalBus>,
    handler: Arc<H>,
    max_attempts: u32,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<Result<(), BusError>> {
    let options = BatchOptions {
        max_batch: 50,
        max_wait: Duration::from_millis(50),
        lull: Duration::from_millis(2),
        worker: fast(max_attempts),
    };
    tokio::spawn(run_batched(
        bus.clone() as Arc<dyn Messaging>,
        Stage::Checkpointer,
        handler,
        options,
        shutdown.clone(),
    ))
}

/// Publishes 30 checkpointer messages, one of them `bad`, and runs a batched worker (batches
/// of up to 50, so all 30 in one) until the 29 others landed.
async fn one_bad_in_a_batch(class: ErrorClass, max_attempts: u32) -> (Arc<OneBad>, Arc<LocalBus>) {
    let bus = Arc::new(LocalBus::new(Names::new("t")));
    for i in 0..30 {
        let payload = if i == 17 {
            "bad".to_owned()
        } else {
            format!("good {i}")
        };
        bus.publish(
            Stage::Checkpointer,
            "users",
            &format!("m{i}"),
            Bytes::from(payload),
        )
        .await
        .unwrap();
    }
    let handler = Arc::new(OneBad {
        class,
        landed: Mutex::default(),
        gave_up: Mutex::default(),
    });
    let shutdown = CancellationToken::new();
    let task = batched(&bus, handler.clone(), max_attempts, &shutdown);
    let watched = handler.clone();
    loopsync_testkit::until(Duration::from_secs(20), "the good ones landed", || {
        let landed = watched.landed.lock().unwrap().len();
        async move {
            if landed == 29 {
                Ok(())
            } else {
                Err(format!("{landed} landed"))
            }
        }
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    (handler, bus)
}

/// One outcome the warehouse refuses for good does not take its batch down: the batch is
/// split, the others land (once each), the bad one is given up (recorded, then dead-lettered).
#[tokio::test]
async fn batch_with_a_bad_message_is_split_so_the_rest_land() {
    let (handler, bus) = one_bad_in_a_batch(ErrorClass::Permanent, u32::MAX).await;
    let mut landed = handler.landed.lock().unwrap().clone();
    landed.sort();
    landed.dedup();
    assert_eq!(landed.len(), 29, "each once");
    let gave_up = handler.gave_up.lock().unwrap().clone();
    assert_eq!(gave_up.len(), 1);
    assert_eq!(gave_up[0].0, Bytes::from("bad"));
    let letters = bus.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].stage, Stage::Checkpointer);
}

/// One outcome that fails retryably forever does not hold its batch back forever either: after
/// a few attempts the batch is bisected and the others land; the bad one is retried, never
/// given up (the checkpointer's worker has no attempt limit).
#[tokio::test]
async fn batch_with_a_message_failing_retryably_forever_lets_the_rest_land() {
    let (handler, bus) = one_bad_in_a_batch(ErrorClass::RETRY, u32::MAX).await;
    assert!(handler.gave_up.lock().unwrap().is_empty());
    assert!(bus.dead_letters().await.unwrap().is_empty());
}

/// The checkpointer's consumer has no cap on deliveries (its messages are outcomes); the
/// others keep theirs.
#[test]
fn only_the_checkpointer_consumer_is_uncapped() {
    let options = JetStreamOptions::default();
    assert_eq!(
        crate::jetstream::max_deliver(Stage::Checkpointer, &options),
        -1
    );
    for stage in [Stage::Extractor, Stage::Transformer, Stage::Loader] {
        assert_eq!(
            crate::jetstream::max_deliver(stage, &options),
            options.max_deliver
        );
    }
}

/// A checkpointer consumer an earlier version made, capped at 12 deliveries, loses its cap when
/// a process of this version connects (create-or-update; nats-server 2.9 and later).
#[tokio::test]
async fn jetstream_an_earlier_checkpointer_consumer_loses_its_cap() {
    let options = JetStreamOptions::default();
    let Some((_bus, ns)) = jetstream(&options).await else {
        return;
    };
    let names = Names::new(&ns.namespace);
    let stream = names.stream(Stage::Checkpointer);
    let info = |ns_url: String, stream: String| async move {
        loopsync_testkit::nats::consumer_info(&ns_url, &stream, "checkpointer")
            .await
            .unwrap()["config"]["max_deliver"]
            .as_i64()
    };
    assert_eq!(info(ns.url.clone(), stream.clone()).await, Some(-1));
    // As an earlier version made it.
    loopsync_testkit::nats::request(
        &ns.url,
        &format!("$JS.API.CONSUMER.DELETE.{stream}.checkpointer"),
        b"",
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    let old = serde_json::json!({
        "stream_name": stream,
        "config": {
            "durable_name": "checkpointer",
            "ack_policy": "explicit",
            "ack_wait": options.ack_wait.as_nanos() as u64,
            "max_deliver": 12,
            "max_ack_pending": 1000,
        }
    });
    loopsync_testkit::nats::request(
        &ns.url,
        &format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.checkpointer"),
        old.to_string().as_bytes(),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert_eq!(info(ns.url.clone(), stream.clone()).await, Some(12));
    let _again = JetStreamBus::connect(&ns.url, names.clone(), &options)
        .await
        .unwrap();
    assert_eq!(info(ns.url.clone(), stream.clone()).await, Some(-1));
}

/// Panics on the first delivery of the message `b"bad"`; handles everything else.
#[derive(Default)]
struct Panics {
    handled: Mutex<Vec<(Bytes, u32)>>,
}

#[async_trait]
impl Handler for Panics {
    type Error = TestError;

    async fn handle(&self, info: &DeliveryInfo, payload: &Bytes) -> Result<(), TestError> {
        if info.attempt == 1 && &payload[..] == b"bad" {
            panic!("boom on the bad one");
        }
        self.handled
            .lock()
            .unwrap()
            .push((payload.clone(), info.attempt));
        Ok(())
    }

    async fn give_up(
        &self,
        _info: &DeliveryInfo,
        _payload: &Bytes,
        _fate: Fate,
        _reason: &str,
    ) -> Result<(), TestError> {
        Ok(())
    }
}

/// What the worker logs, captured.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    /// Captures the logs of this thread (the test's runtime is single-threaded, so its tasks'
    /// too) until the guard goes.
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish();
        (logs.clone(), tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A handler that panics does not take the worker with it: the next message is handled, the
/// panicked one is left unsettled (never acked), and the panic is logged with its stage and
/// message.
async fn exercise_a_panicking_handler(bus: Arc<dyn Messaging>) -> Arc<Panics> {
    let (logs, _guard) = Logs::capture();
    let handler = Arc::new(Panics::default());
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run(
        bus.clone(),
        Stage::Loader,
        handler.clone(),
        WorkerOptions {
            concurrency: 1,
            progress_every: None,
            ..fast(5)
        },
        shutdown.clone(),
    ));
    bus.publish(Stage::Loader, "users", "m1", Bytes::from_static(b"bad"))
        .await
        .unwrap();
    bus.publish(Stage::Loader, "users", "m2", Bytes::from_static(b"good"))
        .await
        .unwrap();
    let watched = handler.clone();
    loopsync_testkit::until(Duration::from_secs(20), "the good one is handled", || {
        let handled = watched.handled.lock().unwrap().clone();
        async move {
            if handled.iter().any(|(p, _)| &p[..] == b"good") {
                Ok(())
            } else {
                Err(format!("{handled:?}"))
            }
        }
    })
    .await;
    let logged = logs.text();
    assert!(
        logged.contains("a handler panicked")
            && logged.contains("loader")
            && logged.contains("boom on the bad one"),
        "{logged}"
    );
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    handler
}

#[tokio::test]
async fn local_a_panicking_handler_is_logged_and_its_message_not_acked() {
    let bus = Arc::new(LocalBus::new(Names::new("t")));
    let handler = exercise_a_panicking_handler(bus.clone()).await;
    // In process, the dropped message stays unsettled, as a crashed process's would.
    assert_eq!(bus.unsettled(Stage::Loader).await.unwrap(), 1);
    assert!(
        !handler
            .handled
            .lock()
            .unwrap()
            .iter()
            .any(|(p, _)| &p[..] == b"bad")
    );
}

#[tokio::test]
async fn jetstream_a_panicking_handler_is_logged_and_its_message_redelivered() {
    let options = JetStreamOptions {
        ack_wait: Duration::from_millis(500),
        ..JetStreamOptions::default()
    };
    let Some((bus, _ns)) = jetstream(&options).await else {
        return;
    };
    let handler = exercise_a_panicking_handler(bus.clone()).await;
    // The worker stopped: a second one takes the redelivery once the ack wait is over.
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(run(
        bus.clone() as Arc<dyn Messaging>,
        Stage::Loader,
        handler.clone(),
        WorkerOptions {
            progress_every: None,
            ..fast(5)
        },
        shutdown.clone(),
    ));
    settled(&*bus).await;
    assert!(
        handler
            .handled
            .lock()
            .unwrap()
            .iter()
            .any(|(p, attempt)| &p[..] == b"bad" && *attempt == 2),
        "the message that panicked came back"
    );
    shutdown.cancel();
    worker.await.unwrap().unwrap();
}

/// Records each batch it is given, and when.
#[derive(Default)]
struct Batches(Mutex<Vec<(tokio::time::Instant, usize)>>);

#[async_trait]
impl BatchHandler for Batches {
    type Error = TestError;

    async fn handle_batch(&self, batch: &[(DeliveryInfo, Bytes)]) -> Result<(), TestError> {
        self.0
            .lock()
            .unwrap()
            .push((tokio::time::Instant::now(), batch.len()));
        Ok(())
    }
}

/// A batch stays open while messages keep coming, and no longer: 30 waiting make one batch;
/// 20 arriving a millisecond apart make one; a message alone is handled a lull after it
/// arrived, not at the batch's longest wait (tokio's paused time: every wait shows as time
/// passed, exactly).
#[tokio::test(start_paused = true)]
async fn a_batch_stays_open_while_messages_keep_coming() {
    let bus = Arc::new(LocalBus::new(Names::new("t")));
    let put = |id: String| {
        let bus = bus.clone();
        async move {
            bus.publish(Stage::Checkpointer, "users", &id, Bytes::from("x"))
                .await
                .unwrap();
        }
    };
    for i in 0..30 {
        put(format!("m{i}")).await;
    }
    let handler = Arc::new(Batches::default());
    let shutdown = CancellationToken::new();
    let task = batched(&bus, handler.clone(), 3, &shutdown);
    let batches = |n: usize| {
        let handler = handler.clone();
        async move {
            for _ in 0..10_000 {
                if handler.0.lock().unwrap().len() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("{n} batches not handled in 10 s");
        }
    };
    batches(1).await;
    for i in 0..20 {
        put(format!("s{i}")).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    batches(2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let published = tokio::time::Instant::now();
    put("alone".to_owned()).await;
    batches(3).await;
    let seen = handler.0.lock().unwrap().clone();
    let sizes: Vec<usize> = seen.iter().map(|(_, n)| *n).collect();
    assert_eq!(sizes, [30, 20, 1], "{seen:?}");
    assert_eq!(
        seen[2].0 - published,
        Duration::from_millis(2),
        "the lone message waited for the lull only"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// Acknowledgements that wait for a condition: each `ack` waits until `until(its number, the
/// acks begun so far)` holds (or two seconds pass, counted in `waited_out`), then acks on the
/// bus underneath.
struct GatedAcks {
    bus: Arc<LocalBus>,
    gate: Arc<AckGate>,
}

type AckCondition = Box<dyn Fn(u32, u32) -> bool + Send + Sync>;

struct AckGate {
    begun: AtomicU32,
    /// Acks that waited the whole two seconds: their condition never came.
    waited_out: AtomicU32,
    until: AckCondition,
    changed: Notify,
}

impl AckGate {
    fn new(until: impl Fn(u32, u32) -> bool + Send + Sync + 'static) -> Arc<AckGate> {
        Arc::new(AckGate {
            begun: AtomicU32::new(0),
            waited_out: AtomicU32::new(0),
            until: Box::new(until),
            changed: Notify::new(),
        })
    }

    /// Something the condition reads changed.
    fn poke(&self) {
        self.changed.notify_waiters();
    }
}

struct GatedAcker {
    inner: Box<dyn crate::Acker>,
    gate: Arc<AckGate>,
}

#[async_trait]
impl crate::Acker for GatedAcker {
    async fn ack(&self) -> Result<(), BusError> {
        let number = self.gate.begun.fetch_add(1, Ordering::SeqCst) + 1;
        self.gate.poke();
        let open = async {
            loop {
                let changed = self.gate.changed.notified();
                if (self.gate.until)(number, self.gate.begun.load(Ordering::SeqCst)) {
                    return;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), open)
            .await
            .is_err()
        {
            self.gate.waited_out.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.ack().await
    }
    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.inner.nak(delay).await
    }
    async fn term(&self) -> Result<(), BusError> {
        self.inner.term().await
    }
    async fn progress(&self) -> Result<(), BusError> {
        self.inner.progress().await
    }
}

struct GatedConsumer {
    inner: Box<dyn crate::Consumer>,
    gate: Arc<AckGate>,
}

#[async_trait]
impl crate::Consumer for GatedConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        Some(self.inner.next().await?.map(|d| Delivery {
            acker: Box::new(GatedAcker {
                inner: d.acker,
                gate: self.gate.clone(),
            }),
            ..d
        }))
    }
}

#[async_trait]
impl Messaging for GatedAcks {
    async fn publish(
        &self,
        stage: Stage,
        sync: &str,
        message_id: &str,
        payload: Bytes,
    ) -> Result<(), BusError> {
        self.bus.publish(stage, sync, message_id, payload).await
    }
    async fn consume(
        &self,
        stage: Stage,
        batch: usize,
    ) -> Result<Box<dyn crate::Consumer>, BusError> {
        Ok(Box::new(GatedConsumer {
            inner: self.bus.consume(stage, batch).await?,
            gate: self.gate.clone(),
        }))
    }
    async fn exhausted(&self, stage: Stage) -> Result<Option<Box<dyn crate::Consumer>>, BusError> {
        self.bus.exhausted(stage).await
    }
    async fn dead_letter(&self, letter: DeadLetter) -> Result<(), BusError> {
        self.bus.dead_letter(letter).await
    }
    async fn dead_letters(&self) -> Result<Vec<DeadLetter>, BusError> {
        self.bus.dead_letters().await
    }
    async fn unsettled(&self, stage: Stage) -> Result<u64, BusError> {
        self.bus.unsettled(stage).await
    }
    async fn erase(&self, sync: &str, matches: &crate::Matcher) -> Result<crate::Erased, BusError> {
        self.bus.erase(sync, matches).await
    }
    async fn held(&self, sync: &str, matches: &crate::Matcher) -> Result<u64, BusError> {
        self.bus.held(sync, matches).await
    }
}

/// Counts the messages it handled, and tells the gate.
struct Counts {
    handled: Arc<AtomicU32>,
    gate: Arc<AckGate>,
}

#[async_trait]
impl Handler for Counts {
    type Error = TestError;

    async fn handle(&self, _info: &DeliveryInfo, _payload: &Bytes) -> Result<(), TestError> {
        self.handled.fetch_add(1, Ordering::SeqCst);
        self.gate.poke();
        Ok(())
    }

    async fn give_up(
        &self,
        _info: &DeliveryInfo,
        _payload: &Bytes,
        _fate: Fate,
        _reason: &str,
    ) -> Result<(), TestError> {
        Ok(())
    }
}

#[async_trait]
impl BatchHandler for Counts {
    type Error = TestError;

    async fn handle_batch(&self, batch: &[(DeliveryInfo, Bytes)]) -> Result<(), TestError> {
        self.handled.fetch_add(batch.len() as u32, Ordering::SeqCst);
        Ok(())
    }
}

/// `n` messages for `stage` on a new bus, and that bus behind acks that wait for `until`.
async fn gated(
    stage: Stage,
    n: u32,
    until: impl Fn(u32, u32) -> bool + Send + Sync + 'static,
) -> (Arc<dyn Messaging>, Arc<AckGate>) {
    let bus = Arc::new(LocalBus::new(Names::new("t")));
    for i in 0..n {
        bus.publish(stage, "users", &format!("m{i}"), Bytes::from("x"))
            .await
            .unwrap();
    }
    let gate = AckGate::new(until);
    let messaging = Arc::new(GatedAcks {
        bus,
        gate: gate.clone(),
    });
    (messaging, gate)
}

/// A handler's place among the worker's `concurrency` is let go once it is done, before its
/// message is acked: with one place, the next message is handled while the first's ack waits.
/// Here each ack but the last waits until the message after its own was handled, which would
/// never come if the ack held the place.
#[tokio::test]
async fn the_next_message_is_handled_while_an_ack_waits() {
    let handled = Arc::new(AtomicU32::new(0));
    let seen = handled.clone();
    let (bus, gate) = gated(Stage::Loader, 3, move |n, _| {
        seen.load(Ordering::SeqCst) > n.min(2)
    })
    .await;
    let handler = Arc::new(Counts {
        handled: handled.clone(),
        gate: gate.clone(),
    });
    let shutdown = CancellationToken::new();
    let options = WorkerOptions {
        concurrency: 1,
        ..fast(3)
    };
    let worker = tokio::spawn(run(
        bus.clone(),
        Stage::Loader,
        handler,
        options,
        shutdown.clone(),
    ));
    settled(&*bus).await;
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    assert_eq!(gate.begun.load(Ordering::SeqCst), 3);
    assert_eq!(
        gate.waited_out.load(Ordering::SeqCst),
        0,
        "an ack waited for a message that could not be handled before it ended"
    );
}

/// A batch's messages are acked all at once, not one after another (500 round trips to the bus
/// for a batch of 500): here each ack waits until all five of the batch's acks have begun.
#[tokio::test]
async fn a_batch_is_acked_all_at_once() {
    let (bus, gate) = gated(Stage::Checkpointer, 5, |_, begun| begun >= 5).await;
    let handled = Arc::new(AtomicU32::new(0));
    let handler = Arc::new(Counts {
        handled: handled.clone(),
        gate: gate.clone(),
    });
    let shutdown = CancellationToken::new();
    let options = BatchOptions {
        max_batch: 50,
        max_wait: Duration::from_millis(200),
        lull: Duration::from_millis(50),
        worker: fast(3),
    };
    let worker = tokio::spawn(run_batched(
        bus.clone(),
        Stage::Checkpointer,
        handler,
        options,
        shutdown.clone(),
    ));
    loopsync_testkit::until(Duration::from_secs(20), "the batch is acked", || {
        let bus = bus.clone();
        async move {
            match bus.unsettled(Stage::Checkpointer).await {
                Ok(0) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 5);
    assert_eq!(
        gate.waited_out.load(Ordering::SeqCst),
        0,
        "an ack waited for the batch's other acks, which had not begun"
    );
}
