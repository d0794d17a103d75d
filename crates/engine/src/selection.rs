//! Which records a command about failed records acts on (`dlq list|replay|park|unpark`,
//! `rejections accept|unaccept`): the one filter of their `--sync`, `--reason`, `--since` and
//! `--key` flags, read from the records whose latest outcome failed
//! (`Warehouse::rejections`). Each command adds only which outcome it is about.

use chrono::{DateTime, Utc};
use loopsync_core::envelope::OutcomeStatus;
use loopsync_warehouse::{RecordResult, Warehouse, WarehouseError};

/// Which records: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this sync.
    pub sync: Option<String>,
    /// Only those whose reason contains this text.
    pub reason: Option<String>,
    /// Only those whose outcome was recorded at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only these records; empty: all.
    pub keys: Vec<String>,
}

impl Filter {
    /// Whether `record` meets every condition given (its outcome aside). A record whose time
    /// cannot be read is left out when `since` is given: it cannot be shown to be recent.
    pub fn matches(&self, record: &RecordResult) -> bool {
        self.sync.as_ref().is_none_or(|s| *s == record.sync)
            && (self.keys.is_empty() || self.keys.contains(&record.key))
            && self
                .reason
                .as_ref()
                .is_none_or(|t| record.reason.as_deref().unwrap_or("").contains(t.as_str()))
            && self
                .since
                .is_none_or(|s| DateTime::parse_from_rfc3339(&record.at).is_ok_and(|at| at >= s))
    }
}

/// A `since` time as the user writes it: RFC 3339, or a date (`2026-11-28`, midnight UTC), or
/// any form the warehouse's dates take. `None` when it is not a time.
pub fn parse_since(text: &str) -> Option<DateTime<Utc>> {
    loopsync_core::value::parse_date_millis(text).and_then(DateTime::from_timestamp_millis)
}

/// The records whose latest outcome is `outcome` and that `filter` selects, in the warehouse's
/// order (that of `rejections`).
pub async fn select(
    warehouse: &dyn Warehouse,
    outcome: OutcomeStatus,
    filter: &Filter,
) -> Result<Vec<RecordResult>, WarehouseError> {
    Ok(warehouse
        .rejections(filter.sync.as_deref())
        .await?
        .into_iter()
        .filter(|r| r.outcome == outcome && filter.matches(r))
        .collect())
}

/// The records' keys by sync, syncs in the order they first appear: what is done per sync
/// (one replay run, one park) is done once for its keys.
pub fn by_sync(records: &[RecordResult]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for r in records {
        match groups.iter_mut().find(|(s, _)| *s == r.sync) {
            Some((_, keys)) => keys.push(r.key.clone()),
            None => groups.push((r.sync.clone(), vec![r.key.clone()])),
        }
    }
    groups
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn record(
        sync: &str,
        key: &str,
        outcome: &str,
        reason: &str,
        at: &str,
    ) -> RecordResult {
        RecordResult {
            run_id: 1,
            sync: sync.into(),
            key: key.into(),
            operation: "upsert".into(),
            outcome: outcome.parse().unwrap(),
            reason: Some(reason.into()),
            contact_id: None,
            requests: 3,
            at: at.into(),
            accepted: false,
        }
    }

    fn records() -> Vec<RecordResult> {
        vec![
            record(
                "users",
                "1",
                "dead_lettered",
                "server error 503",
                "2026-11-27T23:59:59Z",
            ),
            record("users", "2", "invalid", "timed out", "2026-11-28T00:00:00Z"),
            record(
                "users",
                "3",
                "rejected",
                "invalid request (400)",
                "2026-11-28T10:00:00Z",
            ),
            record(
                "teams",
                "4",
                "dead_lettered",
                "server error 502",
                "2026-11-28T10:00:00+02:00",
            ),
            record("teams", "5", "invalid", "server error 500", "not a time"),
        ]
    }

    fn keys(filter: &Filter) -> Vec<String> {
        records()
            .into_iter()
            .filter(|r| filter.matches(r))
            .map(|r| r.key)
            .collect()
    }

    /// Whatever the outcome, every condition given narrows the selection.
    #[test]
    fn every_condition_given_narrows_the_selection() {
        assert_eq!(keys(&Filter::default()), ["1", "2", "3", "4", "5"]);
        let teams = Filter {
            sync: Some("teams".into()),
            ..Filter::default()
        };
        assert_eq!(keys(&teams), ["4", "5"]);
        let server = Filter {
            reason: Some("server error".into()),
            ..Filter::default()
        };
        assert_eq!(keys(&server), ["1", "4", "5"]);
        let some = Filter {
            keys: vec!["2".into(), "3".into(), "4".into()],
            reason: Some("e".into()),
            ..Filter::default()
        };
        assert_eq!(keys(&some), ["2", "3", "4"]);
    }

    /// `since` keeps what was recorded at or after the instant (offsets honoured) and leaves
    /// out a record whose time cannot be read.
    #[test]
    fn since_keeps_records_at_or_after_it() {
        let since = |text: &str| Filter {
            since: Some(parse_since(text).unwrap()),
            ..Filter::default()
        };
        assert_eq!(keys(&since("2026-11-28")), ["2", "3", "4"]);
        assert_eq!(keys(&since("2026-11-28T08:00:00Z")), ["3", "4"]);
        assert_eq!(keys(&since("2026-11-28T10:00:01Z")), Vec::<String>::new());
        assert_eq!(
            parse_since("2026-11-28T10:00:00Z").map(|t| t.to_rfc3339()),
            Some("2026-11-28T10:00:00+00:00".to_owned())
        );
        assert_eq!(parse_since("yesterday"), None);
    }

    /// One group per sync, in the order the syncs first appear, keys in the records' order.
    #[test]
    fn records_are_grouped_by_sync() {
        let letters = vec![
            record("users", "1", "dead_lettered", "", ""),
            record("teams", "9", "dead_lettered", "", ""),
            record("users", "2", "dead_lettered", "", ""),
        ];
        assert_eq!(
            by_sync(&letters),
            [
                ("users".to_owned(), vec!["1".to_owned(), "2".to_owned()]),
                ("teams".to_owned(), vec!["9".to_owned()]),
            ]
        );
        assert!(by_sync(&[]).is_empty());
    }
}
