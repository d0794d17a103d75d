//! The statements behind [`Inspect`], for both stores: one record's state and history, the
//! records a run in progress has sent and not yet settled, and the failed records' reasons by
//! run. Reads only.

use async_trait::async_trait;

use super::rules::{record, record_columns};
use super::{Exec, Keeper, Row, Store, params, work};
use crate::inspect::{Attempt, Inspect, ReasonCount, RecordHistory, RecordOutcome, RecordState};
use crate::{FORGOTTEN_FP, UNSURE, WarehouseError};

/// The runs of sync `$1`: a key's results are found through them (by the results' primary key,
/// run and key) rather than by scanning every result of the sync.
const RUNS_OF_SYNC: &str = "SELECT id FROM loopsync.runs WHERE sync = $1";

pub(crate) async fn record_state(
    x: &mut dyn Exec,
    sync: String,
    key: String,
) -> Result<Option<RecordState>, WarehouseError> {
    let sql = format!(
        "SELECT CASE WHEN s.confirmed_fp IS NOT NULL THEN 1 ELSE 0 END, s.confirmed_run, {at},
                s.confirmed_email, s.confirmed_user_id, s.contact_id,
                CASE WHEN s.confirmed_fp = $3 THEN 1 ELSE 0 END,
                CASE WHEN s.confirmed_fp IS NULL AND s.confirmed_at IS NOT NULL THEN 1 ELSE 0 END,
                CASE WHEN s.parked_fp IS NOT NULL THEN 1 ELSE 0 END,
                s.generation, s.emitted_run, {UNSURE}
           FROM loopsync.state s WHERE s.sync = $1 AND s.key = $2",
        at = x.dialect().time_text("s.confirmed_at"),
    );
    let rows = x
        .query(
            "read a record's state",
            &sql,
            params![sync, key, FORGOTTEN_FP],
        )
        .await?;
    rows.first()
        .map(|r| {
            Ok(RecordState {
                confirmed: r.int(0)? == 1,
                confirmed_run: r.opt_int(1)?,
                confirmed_at: r.opt_text(2)?,
                confirmed_email: r.opt_text(3)?,
                confirmed_user_id: r.opt_text(4)?,
                contact_id: r.opt_text(5)?,
                repaired: r.int(6)? == 1,
                removed: r.int(7)? == 1,
                parked: r.int(8)? == 1,
                generation: r.count(9)?,
                sent_run: r.opt_int(10)?,
                sent_unconfirmed: r.int(11)? == 1,
            })
        })
        .transpose()
}

pub(crate) async fn record_history(
    x: &mut dyn Exec,
    sync: String,
    key: String,
) -> Result<RecordHistory, WarehouseError> {
    let outcomes_sql = format!(
        "SELECT {columns}, x.change FROM loopsync.records x
          WHERE x.run_id IN ({RUNS_OF_SYNC}) AND x.sync = $1 AND x.key = $2
          ORDER BY x.run_id",
        columns = record_columns(x, "x.accepted"),
    );
    let outcomes = x
        .query(
            "read a record's outcomes",
            &outcomes_sql,
            params![&sync, &key],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(RecordOutcome {
                result: record(r)?,
                change: r.opt_text(10)?,
            })
        })
        .collect::<Result<Vec<_>, WarehouseError>>()?;
    let attempts_sql = format!(
        "SELECT a.run_id, a.attempt, a.requests, a.writes, a.events, a.deletes, a.retries,
                a.rate_limited, a.reason, {at}
           FROM loopsync.attempts a
          WHERE a.run_id IN ({RUNS_OF_SYNC}) AND a.sync = $1 AND a.key = $2
          ORDER BY a.run_id, a.at, a.attempt",
        at = x.dialect().time_text("a.at"),
    );
    let attempts = x
        .query(
            "read a record's attempts",
            &attempts_sql,
            params![&sync, &key],
        )
        .await?
        .iter()
        .map(attempt)
        .collect::<Result<Vec<_>, WarehouseError>>()?;
    Ok(RecordHistory { outcomes, attempts })
}

fn attempt(r: &Row) -> Result<Attempt, WarehouseError> {
    Ok(Attempt {
        run_id: r.int(0)?,
        attempt: r.text(1)?,
        requests: r.count(2)?,
        writes: r.count(3)?,
        events: r.count(4)?,
        deletes: r.count(5)?,
        retries: r.count(6)?,
        rate_limited: r.count(7)?,
        reason: r.opt_text(8)?,
        at: r.text(9)?,
    })
}

/// Records a run in progress has sent (noted before publishing) with no outcome yet.
pub(crate) async fn in_flight(x: &mut dyn Exec, sync: String) -> Result<i64, WarehouseError> {
    let sql = "SELECT count(*) FROM loopsync.state s JOIN loopsync.runs r ON r.id = s.emitted_run
                WHERE s.sync = $1 AND r.status IN ('requested', 'extracting', 'sending')
                  AND NOT EXISTS (SELECT 1 FROM loopsync.records x
                                   WHERE x.run_id = s.emitted_run AND x.key = s.key)";
    let rows = x
        .query("count records in flight", sql, params![sync])
        .await?;
    rows.first().map_or(Ok(0), |r| r.count(0))
}

pub(crate) async fn reason_counts(
    x: &mut dyn Exec,
    sync: String,
    from_run: i64,
) -> Result<Vec<ReasonCount>, WarehouseError> {
    let sql = "SELECT x.run_id, x.outcome, x.reason, count(*) FROM loopsync.records x
                WHERE x.run_id IN (SELECT id FROM loopsync.runs WHERE sync = $1 AND id >= $2)
                  AND x.outcome IN ('invalid', 'rejected', 'dead_lettered')
                GROUP BY x.run_id, x.outcome, x.reason
                ORDER BY x.run_id, x.outcome, x.reason";
    x.query(
        "count failed records by reason",
        sql,
        params![sync, from_run],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(ReasonCount {
            run_id: r.int(0)?,
            outcome: r.text(1)?,
            reason: r.opt_text(2)?,
            records: r.count(3)?,
        })
    })
    .collect()
}

#[async_trait]
impl<K: Keeper> Inspect for Store<K> {
    async fn record_state(
        &self,
        sync: &str,
        key: &str,
    ) -> Result<Option<RecordState>, WarehouseError> {
        if self.absent() {
            return Ok(None);
        }
        let (sync, key) = (sync.to_owned(), key.to_owned());
        self.keeper
            .auto(
                "read a record's state",
                work(move |x| Box::pin(record_state(x, sync, key))),
            )
            .await
    }

    async fn record_history(&self, sync: &str, key: &str) -> Result<RecordHistory, WarehouseError> {
        if self.absent() {
            return Ok(RecordHistory::default());
        }
        let (sync, key) = (sync.to_owned(), key.to_owned());
        self.keeper
            .auto(
                "read a record's history",
                work(move |x| Box::pin(record_history(x, sync, key))),
            )
            .await
    }

    async fn in_flight(&self, sync: &str) -> Result<i64, WarehouseError> {
        if self.absent() {
            return Ok(0);
        }
        let sync = sync.to_owned();
        self.keeper
            .auto(
                "count records in flight",
                work(move |x| Box::pin(in_flight(x, sync))),
            )
            .await
    }

    async fn reason_counts(
        &self,
        sync: &str,
        from_run: i64,
    ) -> Result<Vec<ReasonCount>, WarehouseError> {
        if self.absent() {
            return Ok(Vec::new());
        }
        let sync = sync.to_owned();
        self.keeper
            .auto(
                "count failed records by reason",
                work(move |x| Box::pin(reason_counts(x, sync, from_run))),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use loopsync_core::envelope::{ChangeKind, Outcome, OutcomeStatus, RequestCounts};

    use crate::tests::{Fixture, confirmed, postgres, spec, sqlite};

    /// One record's state and history, the records a run in progress has in flight, and the
    /// failed records' reasons, as both stores read them.
    async fn inspecting(f: Fixture) {
        let w = &f.warehouse;
        w.prepare().await.unwrap();
        let spec = spec("users", "users");
        let first = w.create_run("users").await.unwrap();
        // 5 is sent and never answered: its run ends without it (its process died).
        w.mark_emitted(
            "users",
            first,
            &[
                ("1".into(), "f1".into()),
                ("2".into(), "f2".into()),
                ("5".into(), "f5".into()),
            ],
        )
        .await
        .unwrap();
        let mut attempted = Outcome::new(
            "users",
            first,
            "2",
            "f2",
            OutcomeStatus::Attempted,
            "upsert",
        )
        .with_counts(RequestCounts {
            writes: 1,
            ..RequestCounts::default()
        })
        .with_reason("server error 503: down");
        attempted.attempt = Some("7.1".into());
        let mut rejected =
            Outcome::new("users", first, "2", "f2", OutcomeStatus::Rejected, "upsert")
                .with_reason("invalid request (400): no such list");
        rejected.change = Some(ChangeKind::Added);
        let mut one = confirmed(&spec, first, "1", "f1");
        one.email = Some("one@x.co".into());
        one.change = Some(ChangeKind::Added);
        w.record_outcomes(&[one, attempted, rejected])
            .await
            .unwrap();
        w.fail_run(first, "done").await.unwrap();
        assert_eq!(w.in_flight("users").await.unwrap(), 0, "no run in progress");
        // Another sync's record of the same key is none of this sync's.
        let elsewhere = w.create_run("others").await.unwrap();
        let other = Outcome::new(
            "others",
            elsewhere,
            "2",
            "g",
            OutcomeStatus::Invalid,
            "none",
        )
        .with_reason("elsewhere");
        w.record_outcomes(&[other]).await.unwrap();
        w.fail_run(elsewhere, "done").await.unwrap();

        let state = w.record_state("users", "1").await.unwrap().unwrap();
        assert!(
            state.confirmed && !state.sent_unconfirmed && !state.parked,
            "{state:?}"
        );
        assert_eq!(state.confirmed_run, Some(first));
        assert_eq!(state.confirmed_email.as_deref(), Some("one@x.co"));
        assert_eq!(state.contact_id.as_deref(), Some("c-1"));
        assert!(
            state
                .confirmed_at
                .as_deref()
                .is_some_and(|t| t.ends_with('Z')),
            "{state:?}"
        );
        let two = w.record_state("users", "2").await.unwrap().unwrap();
        assert!(!two.confirmed && two.sent_unconfirmed, "{two:?}");
        assert_eq!(two.sent_run, Some(first));
        assert_eq!(w.record_state("users", "9").await.unwrap(), None);

        let history = w.record_history("users", "2").await.unwrap();
        let outcomes: Vec<(i64, &str, Option<&str>, Option<&str>)> = history
            .outcomes
            .iter()
            .map(|o| {
                (
                    o.result.run_id,
                    o.result.outcome.as_str(),
                    o.result.reason.as_deref(),
                    o.change.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            outcomes,
            [(
                first,
                "rejected",
                Some("invalid request (400): no such list"),
                Some("added")
            )]
        );
        assert_eq!(history.attempts.len(), 1, "{history:?}");
        let a = &history.attempts[0];
        assert_eq!(
            (
                a.run_id,
                a.attempt.as_str(),
                a.requests,
                a.writes,
                a.reason.as_deref()
            ),
            (first, "7.1", 1, 1, Some("server error 503: down"))
        );
        assert_eq!(
            history.outcomes[0].result.requests, 1,
            "the attempt's request counts"
        );
        assert!(
            w.record_history("users", "9")
                .await
                .unwrap()
                .outcomes
                .is_empty()
        );

        // A run in progress: what it has sent and not settled is in flight.
        let second = w.create_run("users").await.unwrap();
        w.mark_emitted(
            "users",
            second,
            &[("2".into(), "f2".into()), ("3".into(), "f3".into())],
        )
        .await
        .unwrap();
        assert_eq!(w.in_flight("users").await.unwrap(), 2);
        assert_eq!(w.in_flight("others").await.unwrap(), 0);
        w.record_outcomes(&[confirmed(&spec, second, "3", "f3")])
            .await
            .unwrap();
        assert_eq!(w.in_flight("users").await.unwrap(), 1);
        let mut invalid = Outcome::new("users", second, "2", "f2", OutcomeStatus::Invalid, "none")
            .with_reason("malformed email (column email)");
        invalid.change = Some(ChangeKind::Changed);
        w.record_outcomes(&[invalid]).await.unwrap();
        assert_eq!(w.in_flight("users").await.unwrap(), 0);

        let reasons: Vec<(i64, String, Option<String>, i64)> = w
            .reason_counts("users", first)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.run_id, r.outcome, r.reason, r.records))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    first,
                    "rejected".into(),
                    Some("invalid request (400): no such list".into()),
                    1
                ),
                (
                    second,
                    "invalid".into(),
                    Some("malformed email (column email)".into()),
                    1
                ),
            ]
        );
        assert_eq!(w.reason_counts("users", second).await.unwrap().len(), 1);
        assert_eq!(
            w.record_history("users", "2").await.unwrap().outcomes.len(),
            2
        );
    }

    #[tokio::test]
    async fn postgres_inspecting() {
        let Some(f) = postgres().await else { return };
        inspecting(f).await;
    }

    #[tokio::test]
    async fn sqlite_inspecting() {
        inspecting(sqlite()).await;
    }
}
