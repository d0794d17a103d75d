//! A taker's clock for the shared rate budget, and what it makes of an entry another taker
//! wrote. The clocks of two hosts are never compared: an entry says when its next slot is due
//! *after it was written* (its `due` minus its `written_at`, both read on the writer's clock),
//! and a reader counts that wait from when it read the entry, the latest the write can have
//! been, on its own clock. A slot so placed is never earlier in real time than its writer meant,
//! whatever the hosts' clocks say (seconds or hours apart, or stepped), and a wrong clock never
//! makes anyone wait longer than the wait the entry states. The price: a reader waits the
//! entry's age on top, the time from its write to the read — about a round trip to the ledger
//! when takers of two processes hand the budget to each other, nothing for a taker that reads
//! back its own write, and at most one block once for a taker that finds the budget idle.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// Of an entry, what a taker reads and writes: the next slot's due time and the writer's clock
/// when it wrote, both nanoseconds of the writer's [`Taker::now`]. Only their difference means
/// anything to another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub due: u64,
    pub written_at: u64,
}

/// The longest wait an entry can impose: a taker writes at most one period (at least 1 request
/// per second: 1.01 s) plus the lead it takes slots with and one round trip to the ledger beyond
/// its clock. An entry asking more was written by no such taker (a damaged value); it is cut to
/// this, so that it cannot stall the team.
pub const LONGEST_WAIT: Duration = Duration::from_secs(5);

/// One taker of a shared budget (one per [`super::RateBudget`] of a process): its clock, the
/// entry it last saw, and how long its round trips to the ledger take.
#[derive(Debug, Default)]
pub struct Taker {
    /// Nanoseconds added to this host's clock: tests give takers of one process clocks apart.
    skew: i64,
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    /// The entry last read or written, and its next slot on this taker's clock.
    known: Option<Known>,
    /// The longest recent round trip to the ledger, decaying (nanoseconds): slots are asked
    /// for this far ahead, so that they are not already late when the swap's answer comes.
    ahead: u64,
    /// Races for slots lost in a row since this taker last wrote ([`Taker::lost`]).
    lost: u32,
}

/// An entry as a taker placed it on its own clock when it first saw it (read again, the entry
/// is no younger: the times stay).
#[derive(Debug, Clone, Copy)]
struct Known {
    revision: u64,
    stamp: Stamp,
    due: Due,
}

/// When the next slot of an entry is due on a taker's clock ([`Taker::due`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// When the taker races the other takers for the slots after it: its writer knows its due
    /// time exactly, while another taker counts from its read, a round trip or two later;
    /// without an allowance for that, the writer would come first every time and a taker
    /// beside a busy one (a `verify` beside a `run`) would get no slot until it is done.
    pub race: u64,
    /// The latest the slot can be due: where the taker places the slots it takes after it, so
    /// that they are never earlier in real time than the writer meant.
    pub latest: u64,
}

impl Taker {
    /// A taker whose clock is `skew` nanoseconds off this host's (ahead when positive): for
    /// tests of hosts whose clocks differ.
    pub fn skewed(skew: i64) -> Taker {
        Taker {
            skew,
            ..Taker::default()
        }
    }

    /// This taker's clock, in Unix nanoseconds: the host's clock as read once by this process,
    /// advanced by the monotonic clock since (a step of the host's clock, made by NTP or by
    /// hand, never moves it back), plus the skew. The monotonic clock is tokio's (the system's;
    /// in tests it may be paused and advanced).
    pub fn now(&self) -> u64 {
        static START: OnceLock<(Instant, u64)> = OnceLock::new();
        let (at, unix) = START.get_or_init(|| (Instant::now(), super::unix_nanos()));
        let elapsed = u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX);
        unix.saturating_add(elapsed)
            .saturating_add_signed(self.skew)
    }

    /// When the next slot of `entry` (its stamp and revision; `None`: none kept, due at once)
    /// is due on this taker's clock, the entry having been read by a read answered at `now`.
    /// First seen, its wait counts from `now` (the write was before the answer: the latest it
    /// can be); the taker races for the slots after it a few of its round trips earlier
    /// ([`race_allowance`]). An entry this taker wrote is due exactly when it says.
    pub fn due(&self, entry: Option<(Stamp, u64)>, now: u64) -> Due {
        let Some((stamp, revision)) = entry else {
            return Due { race: 0, latest: 0 };
        };
        let mut seen = self.seen.lock().expect("taker lock");
        if let Some(k) = seen.known
            && k.revision == revision
            && k.stamp == stamp
        {
            return k.due;
        }
        let wait = stamp.due.saturating_sub(stamp.written_at);
        let longest = LONGEST_WAIT.as_nanos() as u64;
        if wait > longest {
            tracing::warn!(
                wait_ms = wait / 1_000_000,
                "the shared rate budget's entry asks for a longer wait than any taker writes: \
                 cut (the entry is damaged)"
            );
        }
        let latest = now.saturating_add(wait.min(longest));
        let due = Due {
            race: latest.saturating_sub(race_allowance(seen.ahead, seen.lost)),
            latest,
        };
        seen.known = Some(Known {
            revision,
            stamp,
            due,
        });
        due
    }

    /// Notes that this taker wrote `stamp` as revision `revision`.
    pub fn wrote(&self, revision: u64, stamp: Stamp) {
        let mut seen = self.seen.lock().expect("taker lock");
        seen.known = Some(Known {
            revision,
            stamp,
            due: Due {
                race: stamp.due,
                latest: stamp.due,
            },
        });
        seen.lost = 0;
    }

    /// Notes that another taker wrote first while this one waited to race for the slots after
    /// an entry, or swapped: a race lost.
    pub fn lost(&self) {
        let mut seen = self.seen.lock().expect("taker lock");
        seen.lost = seen.lost.saturating_add(1);
    }

    /// Notes how long a round trip to the ledger (a read or a swap) took.
    pub fn round_trip(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let mut seen = self.seen.lock().expect("taker lock");
        seen.ahead = took.max(seen.ahead - seen.ahead / 16);
    }

    /// How far ahead of its clock this taker asks for a slot (nanoseconds): its longest recent
    /// round trip to the ledger, decaying.
    pub fn ahead(&self) -> u64 {
        self.seen.lock().expect("taker lock").ahead
    }
}

/// How much earlier than its latest due time a taker races for the slots after an entry
/// another taker wrote: the time it may have counted beyond the writer — a failed swap and a
/// read again after the write, about three round trips (`ahead` being one) — and half a
/// millisecond; doubled for each race lost in a row beyond one (`lost`), up to 50 ms, so that a
/// taker that first read an entry long after it was written, and so lost every race by that
/// much, catches up in a few. (Taking turns, a taker loses one race between two it wins.) A
/// taker that wins early places its slots no earlier for it: the cost is the other taker's,
/// which reads that entry up to this much older and places its own slots that much later.
fn race_allowance(ahead: u64, lost: u32) -> u64 {
    let once = ahead.saturating_mul(3).saturating_add(500_000);
    once.saturating_mul(1 << lost.saturating_sub(1).min(16))
        .min(50_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(race: u64, latest: u64) -> Due {
        Due { race, latest }
    }

    /// An entry's wait counts from when it was first read, whatever the writer's clock said,
    /// and the taker races for the slots after it a little earlier; read again, it is not
    /// counted again; the taker's own write is due when it says; a damaged entry cannot stall
    /// the taker.
    #[test]
    fn an_entry_is_due_its_wait_after_it_was_read() {
        let taker = Taker::default();
        let hour = 3_600_000_000_000u64;
        let early = race_allowance(0, 0);
        assert_eq!(early, 500_000);
        // Written by a clock an hour ahead, due 100 ms after it was written.
        let ahead = Stamp {
            due: 2 * hour + 100_000_000,
            written_at: 2 * hour,
        };
        let at = 1_000_000_000;
        assert_eq!(
            taker.due(Some((ahead, 7)), at),
            due(at + 100_000_000 - early, at + 100_000_000)
        );
        assert_eq!(
            taker.due(Some((ahead, 7)), 5 * at),
            due(at + 100_000_000 - early, at + 100_000_000),
            "seen before"
        );
        // Written by a clock an hour behind.
        let behind = Stamp {
            due: 30_000_000,
            written_at: 10_000_000,
        };
        assert_eq!(
            taker.due(Some((behind, 8)), hour),
            due(hour + 20_000_000 - early, hour + 20_000_000)
        );
        assert_eq!(taker.due(None, 9), due(0, 0));
        let mine = Stamp {
            due: 500,
            written_at: 100,
        };
        taker.wrote(9, mine);
        assert_eq!(taker.due(Some((mine, 9)), 450), due(500, 500));
        let damaged = Stamp {
            due: u64::MAX,
            written_at: 0,
        };
        let longest = LONGEST_WAIT.as_nanos() as u64;
        assert_eq!(
            taker.due(Some((damaged, 10)), at),
            due(at + longest - early, at + longest)
        );
    }

    /// A taker races a little earlier than the latest an entry can be due; more, the more races
    /// it lost in a row; as little again once it wins.
    #[test]
    fn a_taker_that_keeps_losing_races_earlier() {
        let taker = Taker::default();
        let entry = |n: u64| {
            Some((
                Stamp {
                    due: 100_000_000,
                    written_at: 0,
                },
                n,
            ))
        };
        let early = |n| 100_000_000 - taker.due(entry(n), 0).race;
        assert_eq!(early(1), 500_000);
        taker.lost();
        assert_eq!(early(2), 500_000, "one race lost: taking turns");
        taker.lost();
        assert_eq!(early(3), 1_000_000);
        for _ in 0..20 {
            taker.lost();
        }
        assert_eq!(early(4), 50_000_000);
        taker.wrote(5, entry(5).unwrap().0);
        assert_eq!(early(6), 500_000);
    }

    #[test]
    fn a_taker_asks_ahead_by_its_longest_recent_round_trip() {
        let taker = Taker::default();
        assert_eq!(taker.ahead(), 0);
        taker.round_trip(Duration::from_millis(16));
        assert_eq!(taker.ahead(), 16_000_000);
        taker.round_trip(Duration::from_millis(1));
        assert_eq!(taker.ahead(), 15_000_000);
        taker.round_trip(Duration::from_millis(40));
        assert_eq!(taker.ahead(), 40_000_000);
    }

    #[test]
    fn a_skewed_clock_is_the_hosts_plus_its_skew() {
        let (host, ahead) = (Taker::default(), Taker::skewed(2_000_000_000));
        let (a, b) = (host.now(), ahead.now());
        assert!(b - a >= 2_000_000_000 && b - a < 2_100_000_000, "{a} {b}");
        assert!(host.now() >= a, "monotonic");
    }
}
