//! The rate budget of one Loops team, shared by every request to it: the loader's and the
//! preflight's. Here rather than in a stage because commands that run no stage take from it too;
//! on the bus because the shared kind is a slot of [`Coordination::rate_slot`]. The pacing rule
//! ([`next_due`], [`Taker::due`], [`take_slots`]) is written once, over any [`SlotLedger`]:
//! a NATS key-value key, or (without NATS) a row of the state store that every process of the
//! deployment shares. No two hosts' clocks are compared ([`clock`]).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::{BusError, Coordination};

pub mod clock;

pub use clock::{Due, Stamp, Taker};

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
/// over a second (10 ms). `per_second` + 1 requests then still span a second even if the
/// first of them goes this late and the last on time; a slot later than that could crowd the
/// next ones into the same second (a 429), so it is not used: it is void, and so is every
/// slot of its block whose time passed as long ago ([`RateBudget::ready`]).
const TOO_LATE: Duration = Duration::from_millis(10);

/// The key of `budget`'s entry in a ledger: the team's budget name, and `.v2` for the entry's
/// form, a [`Stamp`] (the due time and the writer's clock when it wrote). Loopsync before it
/// kept a bare due time under the name alone, which it still reads: the two never meet, so an
/// older process beside a newer one paces apart from it instead of misreading its entry.
pub fn ledger_key(budget: &str) -> String {
    format!("{budget}.v2")
}

/// Where a shared budget's entry is kept: a [`Stamp`] under a revision, read, and swapped only
/// if the revision is still the one read (compare-and-set). JetStream keeps it in a key-value
/// key; without NATS, the state store keeps it in a row (one per team). [`take_slots`] paces
/// over either.
#[async_trait]
pub trait SlotLedger: Send + Sync + 'static {
    /// The entry under `key` ([`ledger_key`]) and its revision; `None` when none is kept yet.
    async fn read_due(&self, key: &str) -> Result<Option<(Stamp, u64)>, BusError>;

    /// Stores `next` under `key` if its revision is still `expected` (`None`: if none is kept):
    /// the new revision, or `None` when another taker wrote first (read again).
    async fn swap_due(
        &self,
        key: &str,
        next: Stamp,
        expected: Option<u64>,
    ) -> Result<Option<u64>, BusError>;
}

/// How long before its due time a slot may be taken: the round trip to the ledger (a database
/// write, without NATS) is then over before the slot is due, and the request goes at its due
/// time, not a round trip later (which would crowd it against the next taker's, on time). Half
/// a period, at most 50 ms; or, when longer, two of the taker's round trips (`ahead`: a read,
/// then a swap) and [`TIMER_LATENESS`]. The taker waits for the due time itself
/// ([`RateBudget::ready`]).
fn lead(period: u64, ahead: u64) -> u64 {
    let least = ahead
        .saturating_mul(2)
        .saturating_add(TIMER_LATENESS.as_nanos() as u64);
    (period / 2).min(50_000_000).max(least)
}

/// How late a taker that sleeps until a slot is nearly due may wake: tokio's timer has a
/// resolution of a millisecond, and a busy process is later still. Without it in the lead, at
/// a high budget (half a period is half a millisecond at 1 000/s) every block would start late
/// and a busy budget lose a tenth of its slots.
const TIMER_LATENESS: Duration = Duration::from_millis(2);

/// Takes up to `count` consecutive slots of `budget` from `ledger`, waiting until the first is
/// nearly due ([`lead`]): the one pacing rule of a shared budget, whoever keeps the ledger. The
/// entry read is due when `taker` makes it ([`Taker::due`]: its wait counted from when it was
/// read, so that no two hosts' clocks are ever compared); the taker races for the slots after
/// it from [`Due::race`] and places them after [`Due::latest`] ([`next_due`]), the first no
/// earlier than its swap will be back ([`Taker::ahead`]); the entry written states the wait
/// after them on the taker's clock. Returns the first slot's due time on the taker's clock
/// ([`Taker::now`]) and how many were taken.
pub async fn take_slots(
    ledger: &dyn SlotLedger,
    budget: &str,
    period: Duration,
    slack: Duration,
    count: u32,
    taker: &Taker,
) -> Result<(u64, u32), BusError> {
    let key = ledger_key(budget);
    let period = period.as_nanos() as u64;
    let slack = slack.as_nanos() as u64;
    let count = count.max(1);
    // The revision this taker waits to race for the slots after (or swapped at): another one
    // read then means a race lost.
    let mut racing = None;
    loop {
        let started = tokio::time::Instant::now();
        let entry = ledger.read_due(&key).await?;
        taker.round_trip(started.elapsed());
        let revision = entry.map(|(_, revision)| revision);
        if racing.take().is_some_and(|r| Some(r) != revision) {
            taker.lost();
        }
        let now = taker.now();
        let due = taker.due(entry, now);
        let ahead = taker.ahead();
        let lead = lead(period, ahead);
        if now + lead < due.race {
            let wait = due.race - lead - now;
            racing = revision;
            tokio::time::sleep(Duration::from_nanos(wait.min(1_000_000_000))).await;
            continue;
        }
        // `count` slots: the first due now (or up to the slack before, keeping the cadence),
        // the next one `count` periods on.
        let first = next_due(due.latest, now + ahead, period, slack) - period;
        let next = Stamp {
            due: first + u64::from(count) * period,
            written_at: now,
        };
        let started = tokio::time::Instant::now();
        racing = revision;
        let swapped = ledger.swap_due(&key, next, revision).await?;
        taker.round_trip(started.elapsed());
        if let Some(revision) = swapped {
            taker.wrote(revision, next);
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
        taker: &Taker,
    ) -> Result<(u64, u32), BusError> {
        match self {
            Slots::Bus(bus) => bus.rate_slot(name, period, slack, count, taker).await,
            Slots::Ledger(ledger) => take_slots(&**ledger, name, period, slack, count, taker).await,
        }
    }
}

/// Slots taken from the ledger and not yet handed out, in this process.
#[derive(Debug, Default)]
pub struct Block {
    /// When the next one is due (on the taker's clock).
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
        /// This process's taker of the budget: its clock, what it saw of the ledger.
        taker: Arc<Taker>,
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
        let count = slots_per_block(requests_per_second, BLOCK);
        RateBudget::sharing(
            Slots::Bus(bus),
            name,
            requests_per_second,
            count,
            Taker::default(),
        )
    }

    /// The team's budget `name` kept in `ledger` (the state store, when there is no NATS):
    /// every process that shares the state shares it, so a `verify` beside a `run` never
    /// makes both meet 429s.
    pub fn stored(
        ledger: Arc<dyn SlotLedger>,
        name: String,
        requests_per_second: u32,
    ) -> RateBudget {
        let count = slots_per_block(requests_per_second, STORED_BLOCK);
        RateBudget::sharing(
            Slots::Ledger(ledger),
            name,
            requests_per_second,
            count,
            Taker::default(),
        )
    }

    fn sharing(
        slots: Slots,
        name: String,
        requests_per_second: u32,
        count: u32,
        taker: Taker,
    ) -> RateBudget {
        metrics::gauge!("loopsync_rate_budget_per_second").set(f64::from(requests_per_second));
        RateBudget::Shared {
            slots,
            name,
            period: slot_period(requests_per_second),
            slack: slot_slack(requests_per_second),
            count,
            block: Arc::default(),
            taker: Arc::new(taker),
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
                taker,
            } => {
                let step = period.as_nanos() as u64;
                let too_late = TOO_LATE.as_nanos() as u64;
                loop {
                    let mut block = block.lock().await;
                    if block.left == 0 {
                        let (first, granted) =
                            slots.take(name, *period, *slack, *count, taker).await?;
                        *block = Block {
                            next: first,
                            left: granted.max(1),
                        };
                    }
                    // The slots whose time passed more than `TOO_LATE` ago while they were taken
                    // (a slow round trip to the ledger) would go late, crowding the ones after
                    // them: void, every one of them, never a burst of late requests.
                    let now = taker.now();
                    if now > block.next + too_late {
                        let late = (now - too_late - block.next)
                            .div_ceil(step)
                            .min(u64::from(block.left));
                        block.next += late * step;
                        block.left -= late as u32;
                        metrics::counter!("loopsync_rate_budget_late_slots_dropped_total")
                            .increment(late);
                        continue;
                    }
                    let at = block.next;
                    block.next += step;
                    block.left -= 1;
                    drop(block);
                    if at > now {
                        tokio::time::sleep(Duration::from_nanos(at - now)).await;
                    }
                    // Woken too late (a busy process): the same.
                    if taker.now() <= at + too_late {
                        return Ok(());
                    }
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

/// The slots of `block` at `per_second` (at least one).
fn slots_per_block(per_second: u32, block: Duration) -> u32 {
    (block.as_nanos() / slot_period(per_second).as_nanos()).clamp(1, u128::from(u32::MAX)) as u32
}

/// Now, in Unix nanoseconds, by this host's clock as it reads now (a [`Taker`]'s clock starts
/// from it).
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
mod tests;
