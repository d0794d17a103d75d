use super::*;

#[test]
fn slots_leave_one_percent() {
    assert_eq!(slot_period(10), Duration::from_millis(101));
    assert_eq!(slot_slack(10), Duration::from_millis(1));
    assert_eq!(slot_period(1000), Duration::from_micros(1010));
}

/// A process takes 10 ms of slots per round trip to the ledger, at least one.
#[test]
fn slots_are_taken_ten_milliseconds_at_a_time() {
    let bus: Arc<dyn Coordination> = Arc::new(crate::LocalBus::new(crate::Names::new("t")));
    let count = |rps| match RateBudget::shared(bus.clone(), "b".into(), rps) {
        RateBudget::Shared { count, .. } => count,
        RateBudget::Local(_) => unreachable!(),
    };
    assert_eq!(
        [count(10), count(100), count(1000), count(1_000_000)],
        [1, 1, 9, 9900]
    );
}

/// Takers who wake late by a pseudo-random lateness, some of them far beyond the slack,
/// and who pause at times: no second (a sliding window, at any start) ever holds more than
/// `per_second` slots; and while the lateness stays within the slack, no time is lost.
#[test]
fn slots_never_crowd_a_second_and_lateness_within_the_slack_costs_nothing() {
    for per_second in [1u32, 10, 37, 1000] {
        let period = slot_period(per_second).as_nanos() as u64;
        let slack = slot_slack(per_second).as_nanos() as u64;
        let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(per_second);
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut due, mut taken) = (0u64, Vec::new());
        for i in 0..5_000 {
            let late = match random() % 10 {
                0 => random() % (3 * period),
                1 if i % 500 == 0 => 5_000_000_000,
                _ => random() % (slack + 1),
            };
            let now = due + late;
            taken.push(now);
            due = next_due(due, now, period, slack);
        }
        let n = per_second as usize;
        for w in taken.windows(n + 1) {
            assert!(
                w[n] - w[0] >= 1_000_000_000,
                "{} slots within {} ns at {per_second}/s",
                n + 1,
                w[n] - w[0]
            );
        }
        // Always within the slack: exactly one period apart.
        let (mut due, mut first, mut last) = (0u64, None, 0u64);
        for _ in 0..1_000 {
            let now = due + random() % (slack + 1);
            first.get_or_insert(due);
            last = due;
            due = next_due(due, now, period, slack);
        }
        assert_eq!(last - first.unwrap(), 999 * period);
    }
}

/// A ledger in memory; `delay` is its round trip (each read and swap waits it), and a swap is
/// answered `answer` after it was done. `written` keeps every stamp swapped in.
struct Memory {
    kept: Kept,
    delay: Duration,
    answer: Duration,
    written: Arc<std::sync::Mutex<Vec<Stamp>>>,
}

type Kept = Arc<std::sync::Mutex<Option<(Stamp, u64)>>>;

#[async_trait]
impl SlotLedger for Memory {
    async fn read_due(&self, _key: &str) -> Result<Option<(Stamp, u64)>, BusError> {
        wait(self.delay).await;
        Ok(*self.kept.lock().unwrap())
    }

    async fn swap_due(
        &self,
        _key: &str,
        next: Stamp,
        expected: Option<u64>,
    ) -> Result<Option<u64>, BusError> {
        wait(self.delay).await;
        let revision = {
            let mut kept = self.kept.lock().unwrap();
            if kept.map(|(_, revision)| revision) != expected {
                return Ok(None);
            }
            let revision = expected.unwrap_or(0) + 1;
            *kept = Some((next, revision));
            revision
        };
        self.written.lock().unwrap().push(next);
        wait(self.answer).await;
        Ok(Some(revision))
    }
}

/// Sleeps `delay`, if any (a sleep of nothing still waits for the timer's next tick).
async fn wait(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// A taker of the budget kept in `kept`, at `per_second` with blocks of `count` slots, whose
/// round trips to the ledger take `delay` and whose clock is `skew` nanoseconds off the host's.
fn taker(kept: &Kept, per_second: u32, count: u32, delay: Duration, skew: i64) -> RateBudget {
    let ledger = Memory {
        kept: kept.clone(),
        delay,
        answer: Duration::ZERO,
        written: Arc::default(),
    };
    let slots = Slots::Ledger(Arc::new(ledger));
    RateBudget::sharing(slots, "team".into(), per_second, count, Taker::skewed(skew))
}

/// The real (monotonic) instants at which requests went. The tests that take slots run on
/// tokio's paused clock, which moves on to the next timer whenever every task waits: the time
/// they measure is the pacing's alone, whatever else the machine is doing.
type Sent = Arc<std::sync::Mutex<Vec<tokio::time::Instant>>>;

/// `callers` tasks each take `n` slots of `budget`, noting in `sent` when each was used.
async fn send(budget: RateBudget, callers: usize, n: usize, sent: Sent) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (budget, sent) = (budget.clone(), sent.clone());
        tasks.spawn(async move {
            for _ in 0..n {
                budget.ready().await.unwrap();
                sent.lock().unwrap().push(tokio::time::Instant::now());
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// The budget's invariant: any `per_second` + 1 of the requests sent span at least a second of
/// real time (Loops counts a sliding second).
fn assert_within_budget(sent: &Sent, per_second: usize) {
    let mut sent = sent.lock().unwrap().clone();
    sent.sort_unstable();
    for (i, w) in sent.windows(per_second + 1).enumerate() {
        let span = w[per_second] - w[0];
        assert!(
            span >= Duration::from_secs(1),
            "requests {i} to {}: {} within {span:?}",
            i + per_second,
            per_second + 1
        );
    }
}

/// Two hosts take from one budget of 10 a second, one with its clock `skew` ahead of the
/// other's: whatever the skew, the requests they send together never crowd a second.
async fn hosts_apart_share_the_budget(skew: i64) {
    let kept = Kept::default();
    let sent = Sent::default();
    let slow = taker(&kept, 10, 1, Duration::from_millis(2), 0);
    let fast = taker(&kept, 10, 1, Duration::from_millis(2), skew);
    tokio::join!(
        send(slow, 2, 8, sent.clone()),
        send(fast, 2, 8, sent.clone())
    );
    assert_within_budget(&sent, 10);
    let sent = sent.lock().unwrap();
    let span = *sent.iter().max().unwrap() - *sent.iter().min().unwrap();
    assert!(
        span < Duration::from_secs(4),
        "32 requests at 10/s took {span:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn hosts_two_seconds_apart_share_the_budget() {
    hosts_apart_share_the_budget(2_000_000_000).await;
}

#[tokio::test(start_paused = true)]
async fn hosts_minutes_apart_share_the_budget() {
    hosts_apart_share_the_budget(-300_000_000_000).await;
}

/// A host whose clock is `skew` ahead takes slots and leaves; a host that joins then waits for
/// the next slot (one period after the last one), never for the skew.
async fn a_host_that_joins_after_a_fast_one_waits_no_skew(skew: i64) {
    let kept = Kept::default();
    let sent = Sent::default();
    let fast = taker(&kept, 10, 1, Duration::from_millis(2), skew);
    send(fast, 1, 5, sent.clone()).await;
    let joins = taker(&kept, 10, 1, Duration::from_millis(2), 0);
    send(joins, 1, 2, sent.clone()).await;
    assert_within_budget(&sent, 10);
    let sent = sent.lock().unwrap();
    let waited = sent[5] - sent[4];
    assert!(
        waited >= Duration::from_millis(100) && waited < Duration::from_millis(400),
        "the joining host's first request {waited:?} after the last of the fast host"
    );
}

#[tokio::test(start_paused = true)]
async fn a_host_that_joins_after_one_a_second_ahead_waits_no_skew() {
    a_host_that_joins_after_a_fast_one_waits_no_skew(900_000_000).await;
}

#[tokio::test(start_paused = true)]
async fn a_host_that_joins_after_one_an_hour_ahead_waits_no_skew() {
    a_host_that_joins_after_a_fast_one_waits_no_skew(3_600_000_000_000).await;
}

/// At 1 000 requests a second, a taker whose swaps on the ledger are answered 30 ms after they
/// are done (longer than a slot's lead, half a period), taking 49 slots a round trip as the
/// state store's ledger does, beside a taker that keeps every other slot busy: the slots of a
/// block whose time passed while its swap was answered are void, never sent late at once, so
/// the requests never crowd a second, and each request of the slow taker goes within
/// `TOO_LATE` of a slot of its own; and the slow taker still gets what it asks for.
#[tokio::test(start_paused = true)]
async fn a_late_block_at_a_high_budget_sends_no_burst() {
    let kept = Kept::default();
    let (sent, slow_sent) = (Sent::default(), Sent::default());
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ledger = Memory {
        kept: kept.clone(),
        delay: Duration::ZERO,
        answer: Duration::from_millis(30),
        written: written.clone(),
    };
    let blocks = slots_per_block(1000, STORED_BLOCK);
    assert_eq!(blocks, 49);
    let slow = RateBudget::sharing(
        Slots::Ledger(Arc::new(ledger)),
        "team".into(),
        1000,
        blocks,
        Taker::default(),
    );
    let fast = taker(&kept, 1000, slots_per_block(1000, BLOCK), Duration::ZERO, 0);
    // The takers' clock (no skew) at a known instant.
    let (then, clock) = (tokio::time::Instant::now(), Taker::default().now());
    let beside = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        send(slow, 1, 49, slow_sent.clone()).await;
    };
    let all = async { tokio::join!(send(fast, 4, 600, sent.clone()), beside) };
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("both takers done");
    // The slow taker's slots, and when each of its requests went, on the takers' clock.
    let period = slot_period(1000).as_nanos() as u64;
    let mut slots: Vec<u64> = written
        .lock()
        .unwrap()
        .iter()
        .flat_map(|s| (1..=u64::from(blocks)).map(move |i| s.due - i * period))
        .collect();
    slots.sort_unstable();
    let went: Vec<u64> = slow_sent
        .lock()
        .unwrap()
        .iter()
        .map(|t| clock + (*t - then).as_nanos() as u64)
        .collect();
    assert_eq!(went.len(), 49);
    let too_late = TOO_LATE.as_nanos() as u64;
    let mut free = slots.iter().peekable();
    for at in &went {
        // The earliest slot not used yet that is due within `TOO_LATE` before it.
        while free.next_if(|due| **due + too_late < *at).is_some() {}
        assert!(
            free.next_if(|due| **due <= *at).is_some(),
            "a request of the slow taker went at {} ms with no slot of its own due within \
             the 10 ms before",
            (at - clock) / 1_000_000
        );
    }
    sent.lock()
        .unwrap()
        .extend(slow_sent.lock().unwrap().iter());
    assert_within_budget(&sent, 1000);
}

/// Two takers of one budget at 10/s, one of them with a slow round trip to the ledger (beyond
/// the lead a slot is taken with): the requests they let go never crowd a second, because a
/// slot whose time passed while it was taken is not used late.
#[tokio::test(start_paused = true)]
async fn a_slow_ledger_never_makes_a_request_crowd_the_next_takers() {
    let (kept, sent) = (Kept::default(), Sent::default());
    let slow = taker(&kept, 10, 1, Duration::from_millis(45), 0);
    let fast = taker(&kept, 10, 1, Duration::ZERO, 0);
    tokio::join!(
        send(slow, 1, 15, sent.clone()),
        send(fast, 1, 15, sent.clone())
    );
    assert_within_budget(&sent, 10);
}

#[test]
fn pacer_has_no_burst() {
    let p = pacer(10);
    assert!(p.check().is_ok());
    assert!(p.check().is_err(), "the second request waits 100 ms");
}

/// A taker beside one that wants every slot (a `verify` beside a `run`): it gets its share
/// (about one slot in two), not only what the other leaves when it is done.
#[tokio::test(start_paused = true)]
async fn a_taker_beside_a_busy_one_gets_its_share() {
    let kept = Kept::default();
    let (sent, few) = (Sent::default(), Sent::default());
    let run = taker(&kept, 10, 1, Duration::from_millis(2), 0);
    let verify = taker(&kept, 10, 1, Duration::from_millis(2), 0);
    let beside = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = tokio::time::Instant::now();
        send(verify, 1, 5, few.clone()).await;
        started.elapsed()
    };
    let ((), took) = tokio::join!(send(run, 4, 10, sent.clone()), beside);
    assert!(
        took < Duration::from_millis(1_600),
        "5 slots beside a busy taker took {took:?}"
    );
    sent.lock().unwrap().extend(few.lock().unwrap().iter());
    assert_within_budget(&sent, 10);
}
