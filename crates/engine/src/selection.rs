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

impl Filter {
    /// What of this filter selected nothing among `letters` (the dead letters it selected),
    /// in words: each `--key` that is no dead letter of the scope, else a `--reason` or
    /// `--since` that matched none. `None` when every key matched, or when no such filter was
    /// given (`--sync` only chooses the scope: nothing in it is not a mistake). `park`,
    /// `unpark` and `replay` refuse such a filter (exit 1) rather than do nothing silently.
    pub fn unmatched(&self, letters: &[RecordResult]) -> Option<String> {
        let scope = match &self.sync {
            Some(sync) => format!("of sync {sync}"),
            None => "of any sync".to_owned(),
        };
        let missing: Vec<&str> = self
            .keys
            .iter()
            .filter(|k| !letters.iter().any(|r| r.key == **k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let (noun, keys) = if missing.len() == 1 {
                ("the key", missing[0].to_owned())
            } else {
                ("the keys", missing.join(", "))
            };
            return Some(format!(
                "no dead letter {scope} matches --key: nothing has {noun} {keys} among the \
                 dead letters{also} (loopsync dlq list shows them); nothing was done",
                also = self.described(false),
            ));
        }
        if letters.is_empty() && (self.reason.is_some() || self.since.is_some()) {
            return Some(format!(
                "no dead letter {scope} matches{}: nothing was done (loopsync dlq list shows \
                 them)",
                self.described(true)
            ));
        }
        None
    }

    /// The `--reason` and `--since` filters, in words (`lead`: as the object of "matches").
    fn described(&self, lead: bool) -> String {
        let mut parts = Vec::new();
        if let Some(reason) = &self.reason {
            parts.push(format!("--reason {reason:?}"));
        }
        if let Some(since) = &self.since {
            parts.push(format!("--since {}", since.to_rfc3339()));
        }
        match (parts.is_empty(), lead) {
            (true, _) => String::new(),
            (false, true) => format!(" {}", parts.join(" and ")),
            (false, false) => format!(" that match {}", parts.join(" and ")),
        }
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

    /// A filter that selects nothing is said, naming what matched nothing: a key that is no
    /// dead letter (among several that are), a reason or a time that matched none; a scope
    /// (`--sync`) alone with nothing in it, or a filter that matched, is not a mistake.
    #[test]
    fn a_filter_that_matches_nothing_is_said() {
        let letters: Vec<RecordResult> = records()
            .into_iter()
            .filter(|r| r.outcome == OutcomeStatus::DeadLettered)
            .collect();
        let select = |filter: &Filter| -> Vec<RecordResult> {
            letters
                .iter()
                .filter(|r| filter.matches(r))
                .cloned()
                .collect()
        };
        let keys = Filter {
            sync: Some("users".into()),
            keys: vec!["1".into(), "99999".into()],
            ..Filter::default()
        };
        let said = keys
            .unmatched(&select(&keys))
            .expect("99999 is no dead letter");
        assert!(
            said.contains("no dead letter of sync users matches --key")
                && said.contains("the key 99999")
                && !said.contains("1,"),
            "{said}"
        );
        let found = Filter {
            keys: vec!["1".into()],
            ..Filter::default()
        };
        assert_eq!(found.unmatched(&select(&found)), None);
        let reason = Filter {
            reason: Some("no such reason".into()),
            ..Filter::default()
        };
        let said = reason.unmatched(&select(&reason)).unwrap();
        assert!(
            said.contains("no dead letter of any sync matches --reason \"no such reason\""),
            "{said}"
        );
        let scope = Filter {
            sync: Some("nothing-here".into()),
            ..Filter::default()
        };
        assert_eq!(scope.unmatched(&select(&scope)), None);
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
