//! What a run reads of its model, and which diff a contact sync runs: the one rule the run
//! (`ExtractorStage`), `loopsync plan` and `loopsync adopt` share.
//!
//! An event sync with a cursor reads the rows at or after its watermark minus the lookback. A
//! contact sync with a cursor ([`Incremental`]) diffs incrementally — the rows at or after its
//! watermark minus the lookback, and every row the state has not noted unchanged — while the
//! run that gives the watermark is the sync's latest and its latest settled full diff is
//! younger than `full_diff_every`; any other run diffs the whole model, which finds removals
//! and rows changed without their cursor.

use loopsync_core::spec::{Incremental, SyncSpec};
use loopsync_warehouse::{DiffBasis, DiffKind, ExtractCounts, Warehouse, WarehouseError};

/// What a run of a sync reads of its model (see [`Window::read`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    /// The cursor column, for a sync with a cursor.
    pub column: Option<String>,
    /// The sync's watermark (Unix milliseconds): carried into the run's own, so it never goes
    /// back.
    pub watermark: Option<i64>,
    /// Read rows whose cursor is at or after this (Unix milliseconds); `None`: every row. A
    /// contact sync has one only when its diff is incremental.
    pub since: Option<i64>,
    /// A replay of some keys: it reads them wherever their cursor is, and leaves the watermark
    /// where it stood (the dead letters it does not replay are still behind it).
    pub replay: bool,
    /// A contact sync with a cursor: its diff (none for a replay; a sync without a cursor
    /// always diffs in full).
    pub diff: Option<DiffKind>,
    /// Why a contact sync with a cursor diffs in full (as `plan` and the run's log say it).
    pub why_full: Option<&'static str>,
    /// A contact sync with a cursor: its shape seed, kept with the run (a full diff counts
    /// only for the shape it read).
    pub seed: Option<i64>,
}

/// Which diff a contact sync with a cursor runs next ([`choose_diff`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffChoice {
    /// The whole model, for this reason.
    Full(&'static str),
    /// The rows whose cursor is at or after `since` (Unix milliseconds), and the rows the
    /// state has not noted.
    Incremental { since: i64 },
}

/// Why a diff is full, in the words `plan` prints.
pub mod why {
    pub const NOT_HERE: &str = "this warehouse diffs this sync in full (a model read from another database, or a sync that maps a userId)";
    pub const NO_WATERMARK: &str =
        "no watermark yet (the first run with this cursor, or after a reset)";
    pub const UNSETTLED: &str = "the last run did not settle every record (it failed, was interrupted, or left dead letters)";
    pub const NO_FULL_DIFF: &str = "no full diff has settled since the cursor was set";
    pub const DUE: &str = "the last full diff is older than full_diff_every";
    pub const CLOCK: &str = "the state store's clock reads before the last full diff";
    pub const SHAPE: &str = "the sync's model, mapping or behavior, or loopsync's version, changed since the last full diff";
}

/// The rule: incremental only while the watermark's run is the sync's latest finished run (no
/// run failed, was interrupted or left a dead letter since: what such a run may have left
/// unsure is read again by a full diff) and a settled full diff of the sync as it is now
/// (`seed`: its shape, see `SyncSpec::shape_seed`) is younger than `full_diff_every` by the
/// state store's own clock (a clock that went back forces a full diff rather than postponing
/// it).
pub fn choose_diff(
    incremental: &Incremental,
    basis: &DiffBasis,
    capable: bool,
    seed: i64,
) -> DiffChoice {
    if !capable {
        return DiffChoice::Full(why::NOT_HERE);
    }
    let Some(watermark) = basis.watermark else {
        return DiffChoice::Full(why::NO_WATERMARK);
    };
    if !basis.latest_run_settled {
        return DiffChoice::Full(why::UNSETTLED);
    }
    if basis.full_diff_age_ms.is_some() && basis.full_diff_seed != Some(seed) {
        return DiffChoice::Full(why::SHAPE);
    }
    match basis.full_diff_age_ms {
        None => DiffChoice::Full(why::NO_FULL_DIFF),
        Some(age) if age < 0 => DiffChoice::Full(why::CLOCK),
        Some(age) if age >= incremental.full_diff_every_ms => DiffChoice::Full(why::DUE),
        Some(_) => DiffChoice::Incremental {
            since: watermark.saturating_sub(incremental.cursor.lookback_ms),
        },
    }
}

impl Window {
    /// What a run of `spec` reads: an event sync with a cursor, the rows at or after its
    /// watermark minus the lookback (every row on its first run and on a `replay`); a contact
    /// sync, the whole model or, with a cursor, what [`choose_diff`] says.
    pub async fn read(
        warehouse: &dyn Warehouse,
        spec: &SyncSpec,
        replay: bool,
    ) -> Result<Window, WarehouseError> {
        if let Some(incremental) = &spec.incremental {
            return Window::contacts(warehouse, spec, incremental, replay).await;
        }
        let Some(cursor) = spec.cursor() else {
            return Ok(Window {
                replay,
                ..Window::default()
            });
        };
        let watermark = warehouse
            .cursor_watermark(&spec.name, &cursor.column)
            .await?;
        let since = watermark
            .filter(|_| !replay)
            .map(|w| w.saturating_sub(cursor.lookback_ms));
        Ok(Window {
            column: Some(cursor.column.clone()),
            watermark,
            since,
            replay,
            ..Window::default()
        })
    }

    async fn contacts(
        warehouse: &dyn Warehouse,
        spec: &SyncSpec,
        incremental: &Incremental,
        replay: bool,
    ) -> Result<Window, WarehouseError> {
        let column = incremental.cursor.column.clone();
        let basis = warehouse.diff_basis(&spec.name, &column).await?;
        let seed = spec.shape_seed();
        let mut window = Window {
            column: Some(column),
            watermark: basis.watermark,
            replay,
            seed: Some(seed),
            ..Window::default()
        };
        if replay {
            return Ok(window);
        }
        match choose_diff(
            incremental,
            &basis,
            warehouse.diffs_incrementally(spec),
            seed,
        ) {
            DiffChoice::Full(why) => {
                window.diff = Some(DiffKind::Full);
                window.why_full = Some(why);
            }
            DiffChoice::Incremental { since } => {
                window.diff = Some(DiffKind::Incremental);
                window.since = Some(since);
            }
        }
        Ok(window)
    }

    /// The window of a run that reads every row from no watermark (`loopsync adopt`). It
    /// leaves a watermark but counts as no full diff: an adoption from Loops' export leaves out
    /// the rows Loops does not hold as the sync would send them, and the next run's full diff
    /// sends them.
    pub fn everything(spec: &SyncSpec) -> Window {
        Window {
            column: spec.cursor().map(|c| c.column.clone()),
            ..Window::default()
        }
    }

    /// Records in `counts` the watermark the run leaves (see [`Window::next_watermark`]), the
    /// column it is of (a watermark of another column is never used), the diff it ran and the
    /// shape it ran for.
    pub fn close(&self, counts: &mut ExtractCounts) {
        counts.cursor_high = self.next_watermark(counts.cursor_high);
        counts.cursor_column = self.column.clone().filter(|_| counts.cursor_high.is_some());
        counts.diff = self.diff;
        counts.shape_seed = self.diff.and(self.seed);
    }

    /// The watermark a run leaves (stored with it, the sync's once the run has finished well):
    /// the highest cursor it read, never lower than the one it started from, and never later
    /// than now — a row dated in the future (a typo, another time zone) is sent, but must not
    /// move the window past the rows that will arrive before its date.
    ///
    /// A contact sync's full diff went through every row: its watermark is what it read, even
    /// below the one it started from (a watermark once set by a clock that ran ahead does not
    /// stay).
    pub fn next_watermark(&self, read: Option<i64>) -> Option<i64> {
        if self.replay {
            return self.watermark;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(i64::MAX, |d| {
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            });
        let read = read.map(|high| high.min(now));
        if self.diff == Some(DiffKind::Full) {
            return read;
        }
        read.max(self.watermark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loopsync_core::spec::Cursor;

    /// A run's watermark: what it read, capped at now, never lower than where it started.
    #[test]
    fn the_next_watermark_never_goes_back_nor_into_the_future() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let window = Window {
            watermark: Some(now - 60_000),
            ..Window::default()
        };
        assert_eq!(window.next_watermark(None), Some(now - 60_000));
        assert_eq!(
            window.next_watermark(Some(now - 120_000)),
            Some(now - 60_000)
        );
        assert_eq!(
            window.next_watermark(Some(now - 30_000)),
            Some(now - 30_000)
        );
        let full = Window {
            diff: Some(DiffKind::Full),
            ..window.clone()
        };
        assert_eq!(
            full.next_watermark(Some(now - 120_000)),
            Some(now - 120_000),
            "a full diff's is what it read"
        );
        let year_2099 = 4_070_908_800_000;
        let capped = window.next_watermark(Some(year_2099)).unwrap();
        assert!((now..now + 60_000).contains(&capped), "{capped}");
        assert_eq!(Window::default().next_watermark(None), None);
        let replay = Window {
            replay: true,
            ..window
        };
        assert_eq!(
            replay.next_watermark(Some(now)),
            Some(now - 60_000),
            "a replay keeps it"
        );
    }

    /// Incremental only with a watermark whose run is the latest, a settled full diff younger
    /// than `full_diff_every` by the store's clock, and a warehouse that can; the window
    /// starts the lookback before the watermark.
    #[test]
    fn a_contact_sync_diffs_incrementally_only_on_a_settled_recent_full_diff() {
        let incremental = Incremental {
            cursor: Cursor {
                column: "updated_at".into(),
                lookback_ms: 1_000,
            },
            full_diff_every_ms: 60_000,
        };
        let good = DiffBasis {
            watermark: Some(50_000),
            latest_run_settled: true,
            full_diff_age_ms: Some(59_999),
            full_diff_seed: Some(7),
        };
        let choose = |basis: &DiffBasis| choose_diff(&incremental, basis, true, 7);
        assert_eq!(choose(&good), DiffChoice::Incremental { since: 49_000 });
        assert_eq!(
            choose_diff(&incremental, &good, false, 7),
            DiffChoice::Full(why::NOT_HERE)
        );
        assert_eq!(
            choose_diff(&incremental, &good, true, 8),
            DiffChoice::Full(why::SHAPE),
            "another shape than the full diff's"
        );
        let cases = [
            (
                DiffBasis {
                    watermark: None,
                    ..good.clone()
                },
                why::NO_WATERMARK,
            ),
            (
                DiffBasis {
                    latest_run_settled: false,
                    ..good.clone()
                },
                why::UNSETTLED,
            ),
            (
                DiffBasis {
                    full_diff_age_ms: None,
                    full_diff_seed: None,
                    ..good.clone()
                },
                why::NO_FULL_DIFF,
            ),
            (
                DiffBasis {
                    full_diff_age_ms: Some(60_000),
                    ..good.clone()
                },
                why::DUE,
            ),
            (
                DiffBasis {
                    full_diff_age_ms: Some(-1),
                    ..good.clone()
                },
                why::CLOCK,
            ),
        ];
        for (basis, why) in cases {
            assert_eq!(choose(&basis), DiffChoice::Full(why), "{basis:?}");
        }
    }
}
