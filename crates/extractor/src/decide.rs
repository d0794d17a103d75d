//! What each key of the diff means: pure, so the run (`ExtractorStage`) and the dry run
//! (`loopsync plan`) decide alike.

use loopsync_core::envelope::{ChangeKind, RowChange, VERSION};
use loopsync_core::spec::{Behavior, SyncSpec};
use loopsync_core::value::normalize_email;
use loopsync_warehouse::{DiffRow, ExtractCounts};

/// The fate of one key in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Publish this change: added, changed, or (mirror) removed.
    Change(RowChange),
    /// Keep it as an invalid record, with the reason. `rows`: the model rows it stands for
    /// (a duplicate key is one record of several rows).
    Invalid {
        key: String,
        reason: String,
        rows: usize,
    },
    /// The fingerprint Loops confirmed: nothing to send.
    Unchanged,
    /// Left the model; an upsert sync leaves the contact in Loops.
    RemovedKept,
    /// Seen by an earlier run but never confirmed, and gone now: nothing to do.
    Nothing,
    /// Parked by `loopsync dlq park` at this very fingerprint: left alone until its data changes.
    Parked,
}

/// Decides one key that `rows_with_key` model rows carried (more than one: a duplicate key).
pub fn decide(spec: &SyncSpec, run_id: i64, row: DiffRow, rows_with_key: usize) -> Decision {
    let key = row.key.clone().unwrap_or_default();
    let change = |kind, fingerprint, values| RowChange {
        v: VERSION,
        sync: spec.name.clone(),
        run_id,
        key: key.clone(),
        fingerprint,
        kind,
        values,
        confirmed_email: row.confirmed_email.clone(),
        confirmed_user_id: row.confirmed_user_id.clone(),
        // The extractor sets it from the run request.
        installation: String::new(),
        generation: row.generation,
        keep_old_contact: false,
    };
    let Some(values) = row.values.clone() else {
        // Confirmed before, gone from the model now. Mirror removes the contact — only those
        // this sync had confirmed: nothing else is in the state. A removal that was parked
        // (`loopsync dlq park`) is left alone while the record stays away.
        if row.confirmed_fp.is_some() && row.parked_fp == row.confirmed_fp {
            return Decision::Parked;
        }
        return match (&row.confirmed_fp, spec.behavior) {
            (Some(confirmed), Behavior::Mirror) => Decision::Change(change(
                ChangeKind::Removed,
                confirmed.clone(),
                Default::default(),
            )),
            (Some(_), Behavior::Upsert) => Decision::RemovedKept,
            (None, _) => Decision::Nothing,
        };
    };
    if rows_with_key > 1 {
        return Decision::Invalid {
            reason: format!(
                "duplicate primary key: {rows_with_key} rows have {} = {key}",
                spec.primary_key
            ),
            key,
            rows: rows_with_key,
        };
    }
    if row.email_rows > 1 {
        let email = spec
            .property("email")
            .and_then(|p| values.get(&p.column).cloned().flatten())
            .unwrap_or_default();
        return Decision::Invalid {
            reason: format!(
                "the email {} is on {} rows of this run: one contact cannot be two records",
                normalize_email(&email),
                row.email_rows
            ),
            key,
            rows: 1,
        };
    }
    let fingerprint = spec.fingerprint(&values);
    if row.parked_fp.as_deref() == Some(fingerprint.as_str()) {
        return Decision::Parked;
    }
    match &row.confirmed_fp {
        Some(confirmed) if *confirmed == fingerprint => Decision::Unchanged,
        Some(_) => Decision::Change(change(ChangeKind::Changed, fingerprint, values)),
        None => Decision::Change(change(ChangeKind::Added, fingerprint, values)),
    }
}

/// Counts a decision.
pub fn tally(counts: &mut ExtractCounts, decision: &Decision) {
    match decision {
        Decision::Change(c) => {
            match c.kind {
                ChangeKind::Added => counts.added += 1,
                ChangeKind::Changed => counts.changed += 1,
                ChangeKind::Removed => counts.removed += 1,
            }
            counts.expected += 1;
        }
        Decision::Invalid { rows, .. } => {
            counts.invalid_rows += *rows as i64;
            counts.expected += 1;
        }
        // A parked record is counted with the unchanged: the run sends nothing for it.
        Decision::Unchanged | Decision::Parked => counts.unchanged += 1,
        Decision::RemovedKept => counts.removed += 1,
        Decision::Nothing => {}
    }
}

/// The diff's rows come ordered by key, NULL keys last: a key is complete when the next row's
/// key differs. Holds one row at a time.
#[derive(Debug, Default)]
pub struct KeyGroups {
    pending: Option<(DiffRow, usize)>,
    null_keys: usize,
}

impl KeyGroups {
    /// Takes the next row; returns the keys it completed.
    pub fn push(&mut self, row: DiffRow) -> Vec<(DiffRow, usize)> {
        let mut done = Vec::new();
        if row.key.is_none() {
            done.extend(self.pending.take());
            self.null_keys += 1;
            done.push((row, 1));
            return done;
        }
        match &mut self.pending {
            Some((held, n)) if held.key == row.key => *n += 1,
            _ => {
                done.extend(self.pending.take());
                self.pending = Some((row, 1));
            }
        }
        done
    }

    /// The last key.
    pub fn finish(&mut self) -> Option<(DiffRow, usize)> {
        self.pending.take()
    }
}

/// Decides a key group; a NULL key is invalid and named `(null #n)` in the order met.
pub fn decide_group(
    spec: &SyncSpec,
    run_id: i64,
    (row, n): (DiffRow, usize),
    null_seen: &mut usize,
) -> Decision {
    if row.key.is_none() {
        *null_seen += 1;
        return Decision::Invalid {
            key: format!("(null #{null_seen})"),
            reason: format!("{} is NULL", spec.primary_key),
            rows: 1,
        };
    }
    decide(spec, run_id, row, n)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use loopsync_core::spec::{IdentifyBy, MappedProperty, OnRemove};
    use loopsync_core::value::PropertyKind;

    use super::*;

    /// A sync identified by email, mapping only the email (also the extractor's fixture).
    pub(crate) fn spec(behavior: Behavior) -> SyncSpec {
        SyncSpec {
            name: "s".into(),
            model: "m".into(),
            primary_key: "id".into(),
            identify_by: IdentifyBy::Email,
            behavior,
            on_remove: OnRemove::Delete,
            trigger_workflows: false,
            event_on_create: "c".into(),
            event_on_update: "u".into(),
            properties: vec![MappedProperty {
                property: "email".into(),
                column: "email".into(),
                kind: PropertyKind::String,
            }],
            lists: vec![],
            max_removal_share: loopsync_core::spec::DEFAULT_MAX_REMOVAL_SHARE,
        }
    }

    fn row(key: Option<&str>, email: Option<&str>, confirmed: Option<&str>) -> DiffRow {
        DiffRow {
            key: key.map(str::to_owned),
            values: email.map(|e| BTreeMap::from([("email".to_owned(), Some(e.to_owned()))])),
            confirmed_fp: confirmed.map(str::to_owned),
            confirmed_email: confirmed.map(|_| "old@x.co".to_owned()),
            confirmed_user_id: None,
            email_rows: 1,
            parked_fp: None,
            generation: 0,
        }
    }

    #[test]
    fn decisions() {
        let s = spec(Behavior::Upsert);
        let new = decide(&s, 1, row(Some("1"), Some("a@x.co"), None), 1);
        let Decision::Change(c) = &new else {
            panic!("{new:?}")
        };
        assert_eq!(c.kind, ChangeKind::Added);
        let fp = c.fingerprint.clone();
        assert_eq!(
            decide(&s, 1, row(Some("1"), Some("a@x.co"), Some(&fp)), 1),
            Decision::Unchanged
        );
        let Decision::Change(c) = decide(&s, 1, row(Some("1"), Some("b@x.co"), Some(&fp)), 1)
        else {
            panic!()
        };
        assert_eq!(c.kind, ChangeKind::Changed);
        assert!(matches!(
            decide(&s, 1, row(Some("1"), Some("a@x.co"), None), 2),
            Decision::Invalid { .. }
        ));
        assert_eq!(
            decide(&s, 1, row(Some("1"), None, Some("fp")), 1),
            Decision::RemovedKept
        );
        assert_eq!(
            decide(&s, 1, row(Some("1"), None, None), 1),
            Decision::Nothing
        );
        let Decision::Change(c) = decide(
            &spec(Behavior::Mirror),
            1,
            row(Some("1"), None, Some("fp")),
            1,
        ) else {
            panic!()
        };
        assert_eq!(
            (c.kind, c.confirmed_email.as_deref()),
            (ChangeKind::Removed, Some("old@x.co"))
        );
        let mut twin = row(Some("2"), Some(" A@x.co"), None);
        twin.email_rows = 2;
        let Decision::Invalid { reason, .. } = decide(&s, 1, twin, 1) else {
            panic!()
        };
        assert!(
            reason.starts_with("the email a@x.co is on 2 rows"),
            "{reason}"
        );
    }

    /// Every model row lands in exactly one of added, changed, unchanged and invalid rows: a
    /// duplicate key is one invalid record of several rows. A row that left counts as removed.
    #[test]
    fn tally_counts_model_rows() {
        let s = spec(Behavior::Upsert);
        let Decision::Change(c) = decide(&s, 1, row(Some("1"), Some("a@x.co"), None), 1) else {
            panic!()
        };
        let fp = c.fingerprint.clone();
        let mut counts = ExtractCounts::default();
        let mut nulls = 0;
        let groups = [
            (row(Some("1"), Some("a@x.co"), None), 1),
            (row(Some("2"), Some("b@x.co"), Some("old")), 1),
            (row(Some("3"), Some("c@x.co"), None), 3),
            (row(Some("4"), Some("a@x.co"), Some(&fp)), 1),
            (row(Some("5"), None, Some("fp")), 1),
            (row(None, Some("n@x.co"), None), 1),
        ];
        for group in groups {
            tally(&mut counts, &decide_group(&s, 1, group, &mut nulls));
        }
        assert_eq!(
            (
                counts.added,
                counts.changed,
                counts.unchanged,
                counts.invalid_rows,
                counts.removed
            ),
            (1, 1, 1, 4, 1)
        );
        let model_rows = 1 + 1 + 3 + 1 + 1;
        assert_eq!(
            counts.added + counts.changed + counts.unchanged + counts.invalid_rows,
            model_rows
        );
        assert_eq!(counts.expected, 4, "two changes, two invalid records");
    }

    #[test]
    fn grouping_by_key() {
        let mut g = KeyGroups::default();
        assert!(g.push(row(Some("1"), Some("a"), None)).is_empty());
        assert!(g.push(row(Some("1"), Some("b"), None)).is_empty());
        let done = g.push(row(Some("2"), Some("c"), None));
        assert_eq!((done.len(), done[0].1), (1, 2));
        let done = g.push(row(None, Some("d"), None));
        assert_eq!(done.len(), 2, "the pending key, then the NULL one");
        let mut nulls = 0;
        let d = decide_group(&spec(Behavior::Upsert), 1, done[1].clone(), &mut nulls);
        assert_eq!(
            d,
            Decision::Invalid {
                key: "(null #1)".into(),
                reason: "id is NULL".into(),
                rows: 1,
            }
        );
        assert!(g.finish().is_none());
    }

    /// The change carries the record's generation; a parked removal stays parked.
    #[test]
    fn generation_and_parked_removals() {
        let s = spec(Behavior::Mirror);
        let mut r = row(Some("1"), Some("a@x.co"), Some("fp-old"));
        r.generation = 4;
        let Decision::Change(c) = decide(&s, 1, r, 1) else {
            panic!()
        };
        assert_eq!((c.kind, c.generation), (ChangeKind::Changed, 4));
        let mut gone = row(Some("2"), None, Some("fp"));
        assert!(matches!(
            decide(&s, 1, gone.clone(), 1),
            Decision::Change(RowChange {
                kind: ChangeKind::Removed,
                ..
            })
        ));
        gone.parked_fp = Some("fp".into());
        assert_eq!(decide(&s, 1, gone, 1), Decision::Parked);
        // A tombstone (removed before, nothing confirmed) that stays away: nothing to do.
        assert_eq!(
            decide(&s, 1, row(Some("3"), None, None), 1),
            Decision::Nothing
        );
    }
}
