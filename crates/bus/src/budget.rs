//! The rate budget of one Loops team, shared by every request to it: the loader's and the
//! preflight's. Here rather than in a stage because commands that run no stage take from it too;
//! on the bus because the shared kind is a slot of [`Coordination::rate_slot`]. The pacing rule
//! ([`next_due`], [`credible_due`], [`take_slots`]) is written once, over any [`SlotLedger`]:
//! a NATS key-value key, or (without NATS) a row of the state store that every process of the
//! deployment shares.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::{BusError, Coordination};

/// The interval between two requests of a budget of `per_second`: 1/`per_second`, plus 1 %
/// ([`slot_slack`]), so that `per_second` + 1 requests never fall into one second of a sliding
/// window, even when each slot is taken up to the slack late.
pub fn slot_period(per_second: u32) -> Duration {
    let base = Duration::from_secs(1) / per_second.max(1);
    base + base / 100
}

/// How late a slot may be taken and still keep the cadence (see [`next_due`]): 1 % of
/// 1/`per_second`. Over `per_second` slots that is the 1 % margin of [`slot_period`], so the
/// slots taken within any one second are still at most `per_second`.
pub fn slot_slack(per_second: u32) -> Duration {
    (Duration::from_secs(1) / per_second.max(1)) / 100
}

/// The due time of the slot after one taken at `now` that was due at `due` (nanoseconds, any
/// common origin): one `period` after the due time while the slot was taken no more than
/// `slack` late, so that the time a process takes to wake and take its slot (a timer's
/// granularity, a round trip to the shared ledger) is not lost from the budget at each slot;
/// after a longer pause, one `period` after `now − slack`. Any `n + 1` slots taken this way span
/// at least `n × (period − slack)`.
pub fn next_due(due: u64, now: u64, period: u64, slack: u64) -> u64 {
    due.max(now.saturating_sub(slack)) + period
}

/// How far ahead of this host's clock a stored due time may be and still be believed, beyond
/// the slots one round trip grants ([`loopsync_core::tuning::CLOCK_SKEW_ALLOWED`]). Such a due
/// time is taken as already past; the cost is that two hosts' slots may crowd one second for as
/// long as one clock is wrong, which Loops answers with 429s that are retried.
pub use loopsync_core::tuning::CLOCK_SKEW_ALLOWED;

/// The stored due time `due` as a taker whose clock reads `now` uses it: `due`, unless it is
/// more than `span` + [`CLOCK_SKEW_ALLOWED`] ahead (see there), then `now`.
pub fn credible_due(due: u64, now: u64, span: u64) -> u64 {
    let bound = now
        .saturating_add(span)
        .saturating_add(CLOCK_SKEW_ALLOWED.as_nanos() as u64);
    if due > bound {
        metrics::counter!("loopsync_rate_budget_future_slots_ignored_total").increment(1);
        tracing::warn!(
            ahead_ms = (due - now) / 1_000_000,
            "the shared rate budget's next slot is further ahead of this host's clock than any \
             taker writes: ignored (a host's clock, this one's or another's, is wrong)"
        );
        now
    } else {
        due
    }
}

/// How much of the budget a process takes from the shared ledger at once: the slots of 10 ms
/// (at least one). Below 100 requests/s that is one slot per round trip, as before; at a high
/// limit one round trip (a compare-and-swap on one key, which every process contends for)
/// per slot would cap the rate far below the limit.
const BLOCK: Duration = Duration::from_millis(10);

/// The same for a budget kept in the state store ([`RateBudget::stored`]): a round trip there
/// is a write of a database row, so slots are taken 50 ms at a time (at 10 requests/s still one
/// per round trip; at 100/s five).
const STORED_BLOCK: Duration = Duration::from_millis(50);

/// How late after its due time a slot may still be used: the 1 % margin of [`slot_period`]
/// over a second (10 ms). `per_second` + 1 requests then still span more than a second even
/// if one of them goes this late and the others on time; later, it could crowd the next
/// taker's request into the same second (a 429), so the slot is dropped.
const TOO_LATE: Duration = Duration::from_millis(10);

/// Slots dropped in a row before one is used however late: a taker whose every round trip to
/// the ledger outlasts the slot's lead must still send.
const MAX_DROPPED: u32 = 3;

/// Where a shared budget's next due time is kept: the time (Unix nanoseconds) under a
/// revision, read, and swapped only if the revision is still the one read (compare-and-set).
/// JetStream keeps it in a key-value key; without NATS, the state store keeps it in a row (one
/// per team). [`take_slots`] paces over either.
#[async_trait]
pub trait SlotLedger: Send + Sync + 'static {
    /// The stored due time of `budget` and its revision; `None` when none is stored yet.
    async fn read_due(&self, budget: &str) -> Result<Option<(u64, u64)>, BusError>;

    /// Stores `next` as `budget`'s due time if its revision is still `expected` (`None`: if
    /// none is stored). `false` when another taker wrote first: read again.
    async fn swap_due(
        &self,
        budget: &str,
        next: u64,
        expected: Option<u64>,
    ) -> Result<bool, BusError>;
}

/// How long before its due time a slot may be taken: the round trip to the ledger (a database
/// write, without NATS) is then over before the slot is due, and the request goes at its due
/// time, not a round trip later (which would crowd it against the next taker's, on time). Half
/// a period, at most 50 ms; the taker waits for the due time itself ([`RateBudget::ready`]).
fn lead(period: u64) -> u64 {
    (period / 2).min(50_000_000)
}

/// Takes up to `count` consecutive slots of `budget` from `ledger`, waiting until the first is
/// nearly due ([`lead`]): the one pacing rule of a shared budget ([`credible_due`],
/// [`next_due`]), whoever keeps the ledger. Returns the first slot's due time (Unix
/// nanoseconds) and how many were taken. Clocks of different hosts only need to agree to a
/// fraction of `period`.
pub async fn take_slots(
    ledger: &dyn SlotLedger,
    budget: &str,
    period: Duration,
    slack: Duration,
    count: u32,
) -> Result<(u64, u32), BusError> {
    let period = period.as_nanos() as u64;
    let slack = slack.as_nanos() as u64;
    let count = count.max(1);
    loop {
        let entry = ledger.read_due(budget).await?;
        let stored = entry.map_or(0, |(due, _)| due);
        let now = unix_nanos();
        let due = credible_due(stored, now, u64::from(count) * period);
        if now + lead(period) < due {
            let wait = due - lead(period) - now;
            tokio::time::sleep(Duration::from_nanos(wait.min(1_000_000_000))).await;
            continue;
        }
        // `count` slots: the first due now (or up to the slack before, keeping the cadence),
        // the next one `count` periods on.
        let first = next_due(due, now, period, slack) - period;
        let next = first + u64::from(count) * period;
        if ledger
            .swap_due(budget, next, entry.map(|(_, revision)| revision))
            .await?
        {
            return Ok((first, count));
        }
    }
}

/// Where a shared budget's slots come from.
#[derive(Clone)]
pub enum Slots {
    /// The bus's [`Coordination::rate_slot`] (NATS; in process, a bus in memory).
    Bus(Arc<dyn Coordination>),
    /// A [`SlotLedger`] of its own: the state store, shared by the processes that share it
    /// when there is no NATS.
    Ledger(Arc<dyn SlotLedger>),
}

impl Slots {
    async fn take(
        &self,
        name: &str,
        period: Duration,
        slack: Duration,
        count: u32,
    ) -> Result<(u64, u32), BusError> {
        match self {
            Slots::Bus(bus) => bus.rate_slot(name, period, slack, count).await,
            Slots::Ledger(ledger) => take_slots(&**ledger, name, period, slack, count).await,
        }
    }
}

/// Slots taken from the ledger and not yet handed out, in this process.
#[derive(Debug, Default)]
pub struct Block {
    /// When the next one is due (Unix nanoseconds).
    next: u64,
    left: u32,
}

/// The rate budget of one Loops team, shared by every request to it.
#[derive(Clone)]
pub enum RateBudget {
    /// Shared by every process of the deployment (the loader's): through NATS, or through the
    /// state store.
    Shared {
        slots: Slots,
        name: String,
        period: Duration,
        slack: Duration,
        /// Slots per round trip to the ledger.
        count: u32,
        block: Arc<tokio::sync::Mutex<Block>>,
    },
    /// This process only (commands that run without a bus, such as `check`).
    Local(Arc<DefaultDirectRateLimiter>),
}

impl RateBudget {
    /// The team's budget `name` on `bus`, whatever the number of syncs and workers: one per
    /// Loops team (the config's `LoopsConfig::budget_name`, or `ApiKey::budget_name`: never
    /// the key itself).
    pub fn shared(
        bus: Arc<dyn Coordination>,
        name: String,
        requests_per_second: u32,
    ) -> RateBudget {
        RateBudget::sharing(Slots::Bus(bus), name, requests_per_second, BLOCK)
    }

    /// The team's budget `name` kept in `ledger` (the state store, when there is no NATS):
    /// every process that shares the state shares it, so a `verify` beside a `run` never
    /// makes both meet 429s.
    pub fn stored(
        ledger: Arc<dyn SlotLedger>,
        name: String,
        requests_per_second: u32,
    ) -> RateBudget {
        RateBudget::sharing(
            Slots::Ledger(ledger),
            name,
            requests_per_second,
            STORED_BLOCK,
        )
    }

    fn sharing(
        slots: Slots,
        name: String,
        requests_per_second: u32,
        block: Duration,
    ) -> RateBudget {
        let period = slot_period(requests_per_second);
        metrics::gauge!("loopsync_rate_budget_per_second").set(f64::from(requests_per_second));
        RateBudget::Shared {
            slots,
            name,
            period,
            slack: slot_slack(requests_per_second),
            count: (block.as_nanos() / period.as_nanos()).clamp(1, u128::from(u32::MAX)) as u32,
            block: Arc::default(),
        }
    }

    /// A budget of this process alone: for commands that run without a bus, where no other
    /// process takes from the same team's requests.
    pub fn local(requests_per_second: u32) -> RateBudget {
        metrics::gauge!("loopsync_rate_budget_per_second").set(f64::from(requests_per_second));
        RateBudget::Local(Arc::new(pacer(requests_per_second)))
    }

    /// Waits for, and takes, the next request slot.
    pub async fn ready(&self) -> Result<(), BusError> {
        let taken = self.take().await;
        if taken.is_ok() {
            metrics::counter!("loopsync_rate_budget_acquired_total").increment(1);
        }
        taken
    }

    async fn take(&self) -> Result<(), BusError> {
        match self {
            RateBudget::Shared {
                slots,
                name,
                period,
                slack,
                count,
                block,
            } => {
                let mut dropped = 0;
                loop {
                    let mut block = block.lock().await;
                    if block.left == 0 {
                        let (first, granted) = slots.take(name, *period, *slack, *count).await?;
                        *block = Block {
                            next: first,
                            left: granted.max(1),
                        };
                    }
                    let at = block.next;
                    block.next += period.as_nanos() as u64;
                    block.left -= 1;
                    drop(block);
                    let now = unix_nanos();
                    if at > now {
                        tokio::time::sleep(Duration::from_nanos(at - now)).await;
                        return Ok(());
                    }
                    // A slot whose time passed while it was taken (a slow round trip to the
                    // ledger) would go late, against the next taker's on time: dropped, and
                    // another taken, a few times at most.
                    if now - at <= TOO_LATE.as_nanos() as u64 || dropped == MAX_DROPPED {
                        return Ok(());
                    }
                    dropped += 1;
                    metrics::counter!("loopsync_rate_budget_late_slots_dropped_total").increment(1);
                }
            }
            RateBudget::Local(pacer) => {
                pacer.until_ready().await;
                Ok(())
            }
        }
    }
}

/// Now, in Unix nanoseconds: the clock the shared ledger's due times are in.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// An even pace of `per_second` requests in this process: one every [`slot_period`], no burst.
pub fn pacer(per_second: u32) -> DefaultDirectRateLimiter {
    let quota = Quota::with_period(slot_period(per_second))
        .expect("a positive period")
        .allow_burst(NonZeroU32::MIN);
    RateLimiter::direct(quota)
}

#[cfg(test)]
mod tests {
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

    /// A due time a host with its clock an hour ahead wrote is not waited for; one within what
    /// a taker writes (its granted slots, plus a second of skew) is.
    #[test]
    fn a_due_time_far_in_the_future_is_not_believed() {
        let (now, span) = (1_000_000_000_000u64, 20_000_000u64);
        let hour = 3_600_000_000_000u64;
        assert_eq!(credible_due(now + hour, now, span), now);
        assert_eq!(credible_due(now + span, now, span), now + span);
        let edge = now + span + CLOCK_SKEW_ALLOWED.as_nanos() as u64;
        assert_eq!(credible_due(edge, now, span), edge);
        assert_eq!(credible_due(edge + 1, now, span), now);
        assert_eq!(credible_due(now - 5, now, span), now - 5);
    }

    /// A ledger in memory; `delay` is its round trip (each read and swap waits it).
    struct Memory {
        kept: Arc<std::sync::Mutex<Option<(u64, u64)>>>,
        delay: Duration,
    }

    #[async_trait]
    impl SlotLedger for Memory {
        async fn read_due(&self, _budget: &str) -> Result<Option<(u64, u64)>, BusError> {
            tokio::time::sleep(self.delay).await;
            Ok(*self.kept.lock().unwrap())
        }

        async fn swap_due(
            &self,
            _budget: &str,
            next: u64,
            expected: Option<u64>,
        ) -> Result<bool, BusError> {
            tokio::time::sleep(self.delay).await;
            let mut kept = self.kept.lock().unwrap();
            if kept.map(|(_, revision)| revision) != expected {
                return Ok(false);
            }
            *kept = Some((next, expected.unwrap_or(0) + 1));
            Ok(true)
        }
    }

    /// Two takers of one budget, one of them with a slow round trip to the ledger (beyond the
    /// lead a slot is taken with): the requests they let go never crowd a second (any 11 of
    /// them at 10/s span more than one), because a slot whose time passed while it was taken
    /// is not used late.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_ledger_never_makes_a_request_crowd_the_next_takers() {
        let kept = Arc::new(std::sync::Mutex::new(None));
        let budget = |delay| {
            RateBudget::stored(
                Arc::new(Memory {
                    kept: kept.clone(),
                    delay,
                }),
                "team".into(),
                10,
            )
        };
        let (slow, fast) = (budget(Duration::from_millis(45)), budget(Duration::ZERO));
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let take = |budget: RateBudget, n: usize| {
            let sent = sent.clone();
            async move {
                for _ in 0..n {
                    budget.ready().await.unwrap();
                    sent.lock().unwrap().push(unix_nanos());
                }
            }
        };
        tokio::join!(take(slow, 15), take(fast, 15));
        let mut sent = sent.lock().unwrap().clone();
        sent.sort_unstable();
        for w in sent.windows(11) {
            assert!(
                w[10] - w[0] > 1_000_000_000,
                "11 requests within {} ms",
                (w[10] - w[0]) / 1_000_000
            );
        }
    }

    #[test]
    fn pacer_has_no_burst() {
        let p = pacer(10);
        assert!(p.check().is_ok());
        assert!(p.check().is_err(), "the second request waits 100 ms");
    }
}
