//! `loopsync status` and the status page of `run --http-addr`: per sync, the last run, the next
//! scheduled run, the records pending, the dead letters, and why the sync is degraded. Read from
//! the state only: never the model, never Loops, so it needs the warehouse's settings alone and
//! answers while a run is going on. [`status`] makes it; [`history`] gives the page its charts.
//!
//! *Records pending* is what the state knows is not in Loops as the model last had it: the
//! records whose latest outcome is invalid, rejected or dead-lettered and that are not parked
//! (the next run tries each again), and the records a run in progress has sent and not yet
//! settled. Rows changed in the warehouse since the last run are not counted: only a diff
//! (`loopsync plan`) sees them.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use loopsync_config::SyncConfig;
use loopsync_core::envelope::OutcomeStatus;
pub use loopsync_core::reason::reason_class;
use loopsync_core::value::millis_to_rfc3339;
use loopsync_warehouse::{ReasonCount, RunStatus, RunSummary, Warehouse, WarehouseError};
use serde::Serialize;

/// The status of every sync asked about.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// When it was read.
    pub at: String,
    pub syncs: Vec<SyncStatus>,
}

/// One sync's status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SyncStatus {
    pub sync: String,
    /// `upsert`, `mirror` or `append`.
    pub behavior: String,
    /// The sync's `schedule`, as written.
    pub schedule: Option<String>,
    /// The schedule's next fire after [`Status::at`]: when a `loopsync run` that follows the
    /// schedules starts the next run.
    pub next_run_at: Option<String>,
    /// The newest run, finished or in progress (a run report, as `loopsync runs` prints it).
    pub last_run: Option<RunSummary>,
    pub pending: Pending,
    pub dead_letters: DeadLetters,
    /// Why the newest finished run ended degraded; `None` when it did not.
    pub degraded: Option<Degraded>,
}

/// Records not in Loops as the model last had them (see the module's documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pending {
    /// `retried + in_flight`.
    pub records: i64,
    /// Records whose latest outcome is invalid, rejected or dead-lettered, not parked: the
    /// next run tries them again.
    pub retried: i64,
    /// Of `retried`, by their latest outcome.
    pub invalid: i64,
    pub rejected: i64,
    pub dead_lettered: i64,
    /// Records a run in progress has sent and not yet settled.
    pub in_flight: i64,
}

/// Records whose latest outcome is dead-lettered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeadLetters {
    pub records: i64,
    /// Of them, parked by `loopsync dlq park`: no run retries them until their data changes.
    pub parked: i64,
}

/// Why a run ended degraded: its failed records, by outcome and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Degraded {
    pub run_id: i64,
    pub invalid: i64,
    pub rejected: i64,
    pub dead_lettered: i64,
    /// The failed records by outcome and kind of reason ([`reason_class`]), most first.
    pub reasons: Vec<Reason>,
}

/// How many failed records share an outcome and a kind of reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// `invalid`, `rejected` or `dead_lettered`.
    pub outcome: String,
    /// The kind of reason ([`reason_class`]): no key, email or value.
    pub reason: String,
    pub records: i64,
}

/// The status of each sync of `syncs` (only the one named `only`, if given), read from the
/// state at `now`.
pub async fn status(
    warehouse: &dyn Warehouse,
    syncs: &[SyncConfig],
    only: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Status, WarehouseError> {
    let mut out = Vec::new();
    for sync in syncs
        .iter()
        .filter(|s| only.is_none_or(|n| n == s.spec.name))
    {
        out.push(sync_status(warehouse, sync, now).await?);
    }
    Ok(Status {
        at: millis_to_rfc3339(now.timestamp_millis()),
        syncs: out,
    })
}

async fn sync_status(
    warehouse: &dyn Warehouse,
    sync: &SyncConfig,
    now: DateTime<Utc>,
) -> Result<SyncStatus, WarehouseError> {
    let name = &sync.spec.name;
    // One run of a sync at a time: the newest finished run is among the newest two.
    let runs = warehouse.runs(Some(name), 2).await?;
    let parked: HashSet<String> = warehouse
        .parked(Some(name))
        .await?
        .into_iter()
        .map(|(_, key)| key)
        .collect();
    let mut pending = Pending {
        in_flight: warehouse.in_flight(name).await?,
        ..Pending::default()
    };
    let mut dead_letters = DeadLetters::default();
    for record in warehouse.rejections(Some(name)).await? {
        let parked = parked.contains(&record.key);
        if record.outcome == OutcomeStatus::DeadLettered {
            dead_letters.records += 1;
            dead_letters.parked += i64::from(parked);
        }
        if parked {
            continue;
        }
        match record.outcome {
            OutcomeStatus::Invalid => pending.invalid += 1,
            OutcomeStatus::Rejected => pending.rejected += 1,
            OutcomeStatus::DeadLettered => pending.dead_lettered += 1,
            _ => continue,
        }
        pending.retried += 1;
    }
    pending.records = pending.retried + pending.in_flight;
    let degraded = match runs.iter().find(|r| r.is_finished()) {
        Some(run) if run.status == RunStatus::Degraded => {
            let counts = warehouse.reason_counts(name, run.id).await?;
            Some(Degraded {
                run_id: run.id,
                invalid: run.invalid,
                rejected: run.rejected,
                dead_lettered: run.dead_lettered,
                reasons: reasons_of(counts.iter().filter(|c| c.run_id == run.id)),
            })
        }
        _ => None,
    };
    Ok(SyncStatus {
        sync: name.clone(),
        behavior: sync.spec.behavior.as_str().to_owned(),
        schedule: sync.schedule.as_ref().map(|s| s.as_str().to_owned()),
        next_run_at: sync
            .schedule
            .as_ref()
            .and_then(|s| s.next_after(now))
            .map(|at| millis_to_rfc3339(at.timestamp_millis())),
        last_run: runs.into_iter().next(),
        pending,
        dead_letters,
        degraded,
    })
}

/// One run of the history: its report and its failed records by kind of reason.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryRun {
    pub run: RunSummary,
    pub reasons: Vec<Reason>,
}

/// The newest `runs` runs of `sync`, oldest first, each with its failed records by kind of
/// reason: what the status page charts.
pub async fn history(
    warehouse: &dyn Warehouse,
    sync: &str,
    runs: i64,
) -> Result<Vec<HistoryRun>, WarehouseError> {
    let mut newest = warehouse.runs(Some(sync), runs).await?;
    newest.reverse();
    let Some(oldest) = newest.first() else {
        return Ok(Vec::new());
    };
    let counts = warehouse.reason_counts(sync, oldest.id).await?;
    Ok(newest
        .into_iter()
        .map(|run| HistoryRun {
            reasons: reasons_of(counts.iter().filter(|c| c.run_id == run.id)),
            run,
        })
        .collect())
}

/// Counts grouped by outcome and [`reason_class`], most first (then by outcome and reason).
fn reasons_of<'a>(counts: impl Iterator<Item = &'a ReasonCount>) -> Vec<Reason> {
    let mut grouped: BTreeMap<(String, String), i64> = BTreeMap::new();
    for c in counts {
        let class = reason_class(&c.outcome, c.reason.as_deref());
        *grouped.entry((c.outcome.clone(), class)).or_default() += c.records;
    }
    let mut reasons: Vec<Reason> = grouped
        .into_iter()
        .map(|((outcome, reason), records)| Reason {
            outcome,
            reason,
            records,
        })
        .collect();
    reasons.sort_by_key(|r| std::cmp::Reverse(r.records));
    reasons
}

#[cfg(test)]
mod tests {
    use loopsync_core::envelope::{ChangeKind, Outcome};

    use super::*;
    use crate::testing::{Model, spec};

    fn outcome(run: i64, key: &str, status: OutcomeStatus, reason: &str) -> Outcome {
        let mut o = Outcome::new("s", run, key, &format!("f{key}"), status, "upsert");
        o.change = Some(ChangeKind::Added);
        if !reason.is_empty() {
            o.reason = Some(reason.into());
        }
        o
    }

    /// The status of a sync: the newest run, the next fire of its schedule, the records the
    /// next run retries (not the parked dead letter, nor a record confirmed since it failed),
    /// the records in flight, the dead letters, and why the last finished run is degraded.
    #[tokio::test]
    async fn a_sync_status_is_read_from_the_state() {
        let model = Model::new().await;
        let w = &*model.warehouse;
        let syncs = [SyncConfig {
            spec: spec(),
            schedule: Some(loopsync_config::Schedule::parse("0 3 * * *").unwrap()),
        }];
        let now = DateTime::parse_from_rfc3339("2026-01-02T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);

        let empty = status(w, &syncs, None, now).await.unwrap();
        assert_eq!(empty.at, "2026-01-02T10:00:00.000Z");
        let s = &empty.syncs[0];
        assert_eq!((s.sync.as_str(), s.behavior.as_str()), ("s", "upsert"));
        assert_eq!(s.next_run_at.as_deref(), Some("2026-01-03T03:00:00.000Z"));
        assert_eq!((s.last_run.clone(), s.degraded.clone()), (None, None));
        assert_eq!(s.pending, Pending::default());

        // Run 1: 1 confirmed, 2 rejected, 3 invalid, 4 and 5 dead-lettered (5 parked after).
        let first = w.create_run("s").await.unwrap();
        w.claim_run(first, false).await.unwrap();
        let keys: Vec<(String, String)> =
            (1..=5).map(|k| (k.to_string(), format!("f{k}"))).collect();
        w.mark_emitted("s", first, &keys).await.unwrap();
        w.finish_extract(
            first,
            &loopsync_warehouse::ExtractCounts {
                added: 5,
                expected: 5,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        w.record_outcomes(&[
            outcome(first, "1", OutcomeStatus::Confirmed, ""),
            outcome(
                first,
                "2",
                OutcomeStatus::Rejected,
                "invalid request (400): a@b is bad",
            ),
            outcome(
                first,
                "3",
                OutcomeStatus::Invalid,
                "malformed email (column email)",
            ),
            outcome(
                first,
                "4",
                OutcomeStatus::DeadLettered,
                "gave up after 2 attempts: server error 503: x",
            ),
            outcome(
                first,
                "5",
                OutcomeStatus::DeadLettered,
                "gave up after 2 attempts: server error 503: y",
            ),
        ])
        .await
        .unwrap();
        assert_eq!(w.park("s", &["5".to_owned()]).await.unwrap(), 1);
        // Run 2, in progress: sends 2 again (confirmed now) and 6 (no answer yet).
        let second = w.create_run("s").await.unwrap();
        w.claim_run(second, false).await.unwrap();
        w.mark_emitted(
            "s",
            second,
            &[("2".into(), "f2".into()), ("6".into(), "f6".into())],
        )
        .await
        .unwrap();
        w.record_outcomes(&[outcome(second, "2", OutcomeStatus::Confirmed, "")])
            .await
            .unwrap();

        let now = status(w, &syncs, Some("s"), now).await.unwrap();
        let s = &now.syncs[0];
        let last = s.last_run.as_ref().unwrap();
        assert_eq!((last.id, last.status), (second, RunStatus::Extracting));
        assert_eq!(
            s.pending,
            Pending {
                records: 3,
                retried: 2,
                invalid: 1,
                rejected: 0,
                dead_lettered: 1,
                in_flight: 1,
            }
        );
        assert_eq!(
            s.dead_letters,
            DeadLetters {
                records: 2,
                parked: 1
            }
        );
        let degraded = s.degraded.as_ref().expect("run 1 ended degraded");
        assert_eq!(
            (
                degraded.run_id,
                degraded.invalid,
                degraded.rejected,
                degraded.dead_lettered
            ),
            (first, 1, 1, 2)
        );
        let reasons: Vec<(&str, &str, i64)> = degraded
            .reasons
            .iter()
            .map(|r| (r.outcome.as_str(), r.reason.as_str(), r.records))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    "dead_lettered",
                    "gave up after 2 attempts: server error 503",
                    2
                ),
                ("invalid", "malformed email (column email)", 1),
                ("rejected", "invalid request (400)", 1),
            ]
        );
        assert!(
            !serde_json::to_string(&now).unwrap().contains("a@b"),
            "no email in the status"
        );
        assert!(
            status(w, &syncs, Some("other"), Utc::now())
                .await
                .unwrap()
                .syncs
                .is_empty()
        );

        // The history: both runs, oldest first, each with its reasons.
        let history = history(w, "s", 10).await.unwrap();
        let runs: Vec<(i64, usize)> = history
            .iter()
            .map(|h| (h.run.id, h.reasons.len()))
            .collect();
        assert_eq!(runs, [(first, 3), (second, 0)]);
    }
}
