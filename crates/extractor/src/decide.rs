//! What each key of the diff means: pure, so the run (`ExtractorStage`), the dry run
//! (`loopsync plan`), `loopsync adopt` and `loopsync verify` decide alike. [`Decider`] is the one
//! walk over the diff's rows: it groups them by key, names NULL keys, tallies the counts, and
//! keeps a replay to its keys; the callers only act on its decisions.

use std::collections::HashSet;

use loopsync_core::envelope::{ChangeKind, RowChange, VERSION};
use loopsync_core::spec::{Behavior, SyncSpec};
use loopsync_core::value::{normalize_email, parse_date_millis};
use loopsync_warehouse::{DiffRow, ExtractCounts, Unchanged};

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
    /// An event sync's row whose event Loops confirmed, with other values now (`fingerprint`):
    /// an event is sent once, so nothing is sent. Reported once as `ignored: already sent`: the
    /// run notes the new fingerprint as the event's, so the next run finds it unchanged.
    AlreadySent { key: String, fingerprint: String },
}

pub use loopsync_core::envelope::POSSIBLY_CREATED;

/// What a run, `plan` and `runs` say of a row whose event was sent before and changed since.
pub const ALREADY_SENT: &str = "ignored: already sent";

/// Decides one key that `rows_with_key` model rows carried (more than one: a duplicate key).
pub fn decide(spec: &SyncSpec, run_id: i64, row: DiffRow, rows_with_key: usize) -> Decision {
    decide_row(spec, run_id, &row, rows_with_key)
}

/// [`decide`], leaving the row to the caller ([`Decider`] hands it on with the decision).
fn decide_row(spec: &SyncSpec, run_id: i64, row: &DiffRow, rows_with_key: usize) -> Decision {
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
        resubscribe: row.resubscribe,
        possibly_applied: if row.unsure {
            row.possibly_applied.clone()
        } else {
            Vec::new()
        },
    };
    if spec.is_append() {
        return decide_event(spec, row, rows_with_key, change);
    }
    // A create whose answer was lost: Loops may hold the contact it wrote. The state knows its
    // identity, and treats it as the one to re-key or remove.
    let possibly_created = row.confirmed_fp.is_none()
        && row.unsure
        && (row.emitted_email.is_some() || row.emitted_user_id.is_some());
    let change = |kind, fingerprint, values| {
        let mut c = change(kind, fingerprint, values);
        if possibly_created {
            c.confirmed_email = row.emitted_email.clone();
            c.confirmed_user_id = row.emitted_user_id.clone();
        }
        c
    };
    let Some(values) = row.values.clone() else {
        // Confirmed before, gone from the model now. Mirror removes the contact — only those
        // this sync had confirmed (or possibly created): nothing else is in the state. A removal
        // that was parked (`loopsync dlq park`) is left alone while the record stays away.
        if row.confirmed_fp.is_some() && row.parked_fp == row.confirmed_fp {
            return Decision::Parked;
        }
        if possibly_created && spec.behavior == Behavior::Mirror {
            return Decision::Change(change(
                ChangeKind::Removed,
                POSSIBLY_CREATED.to_owned(),
                Default::default(),
            ));
        }
        return match (&row.confirmed_fp, spec.behavior) {
            (Some(confirmed), Behavior::Mirror) => Decision::Change(change(
                ChangeKind::Removed,
                confirmed.clone(),
                Default::default(),
            )),
            (Some(_), Behavior::Upsert | Behavior::Append) => Decision::RemovedKept,
            (None, _) => Decision::Nothing,
        };
    };
    if rows_with_key > 1 {
        return Decision::Invalid {
            reason: format!(
                "duplicate primary key: {rows_with_key} rows have this {}",
                spec.primary_key
            ),
            key,
            rows: rows_with_key,
        };
    }
    // Which column, never its value: a reason is kept and shown, and the value is a person's.
    let column_of = |property: &str| spec.property(property).map_or("", |p| p.column.as_str());
    if row.user_id_rows > 1 {
        return Decision::Invalid {
            reason: format!(
                "this row's userId (column {}) is on {} rows of this run: one contact cannot be \
                 two records",
                column_of("userId"),
                row.user_id_rows
            ),
            key,
            rows: 1,
        };
    }
    if row.email_rows > 1 {
        return Decision::Invalid {
            reason: format!(
                "this row's email (column {}) is on {} rows of this run: one contact cannot be \
                 two records",
                column_of("email"),
                row.email_rows
            ),
            key,
            rows: 1,
        };
    }
    if let Some(reason) = spec.too_long(&values) {
        return Decision::Invalid {
            reason,
            key,
            rows: 1,
        };
    }
    let fingerprint = spec.fingerprint(&values);
    if row.parked_fp.as_deref() == Some(fingerprint.as_str()) {
        return Decision::Parked;
    }
    match &row.confirmed_fp {
        // Back at what Loops confirmed, but a later version may have been applied with its
        // answer lost: Loops may hold that one. Sent again, so Loops holds the row.
        Some(confirmed) if *confirmed == fingerprint && row.unsure => {
            Decision::Change(change(ChangeKind::Changed, fingerprint, values))
        }
        Some(confirmed) if *confirmed == fingerprint => Decision::Unchanged,
        Some(_) => Decision::Change(change(ChangeKind::Changed, fingerprint, values)),
        None => Decision::Change(change(ChangeKind::Added, fingerprint, values)),
    }
}

/// An event sync's row: sent once for the life of the sync. A row that left the model removes
/// nothing; a row whose cursor is NULL or not a date is invalid (it could never be read by its
/// cursor again).
fn decide_event(
    spec: &SyncSpec,
    row: &DiffRow,
    rows_with_key: usize,
    change: impl Fn(ChangeKind, String, std::collections::BTreeMap<String, Option<String>>) -> RowChange,
) -> Decision {
    let key = row.key.clone().unwrap_or_default();
    let Some(values) = row.values.clone() else {
        return Decision::Nothing;
    };
    if rows_with_key > 1 {
        return Decision::Invalid {
            reason: format!(
                "duplicate primary key: {rows_with_key} rows have this {}: an event id names one event",
                spec.primary_key
            ),
            key,
            rows: rows_with_key,
        };
    }
    if let Some(reason) = spec.too_long(&values) {
        return Decision::Invalid {
            reason,
            key,
            rows: 1,
        };
    }
    if let Some(cursor) = spec.append.as_ref().and_then(|a| a.cursor.as_ref()) {
        match values.get(&cursor.column).cloned().flatten() {
            None => {
                return Decision::Invalid {
                    reason: format!(
                        "the cursor {} is NULL: an event sync with a cursor reads its rows by it",
                        cursor.column
                    ),
                    key,
                    rows: 1,
                };
            }
            // A number is not a time the warehouse can compare with one: the window could
            // not keep it.
            Some(text) if cursor_millis_of(&text).is_none() => {
                return Decision::Invalid {
                    reason: format!("the cursor {}: not a date or a time", cursor.column),
                    key,
                    rows: 1,
                };
            }
            Some(_) => {}
        }
    }
    let fingerprint = spec.fingerprint(&values);
    if row.parked_fp.as_deref() == Some(fingerprint.as_str()) {
        return Decision::Parked;
    }
    match &row.confirmed_fp {
        Some(confirmed) if *confirmed == fingerprint => Decision::Unchanged,
        Some(_) => Decision::AlreadySent { key, fingerprint },
        None => Decision::Change(change(ChangeKind::Added, fingerprint, values)),
    }
}

/// The cursor value of a row, as Unix milliseconds, if its sync has a cursor and the row a
/// date or a time in it.
pub fn cursor_millis(spec: &SyncSpec, row: &DiffRow) -> Option<i64> {
    let cursor = spec.cursor()?;
    let text = row.values.as_ref()?.get(&cursor.column)?.as_deref()?;
    cursor_millis_of(text)
}

/// A cursor's text as Unix milliseconds: a date or a time, never a bare number.
fn cursor_millis_of(text: &str) -> Option<i64> {
    if text.trim().parse::<f64>().is_ok() {
        return None;
    }
    parse_date_millis(text)
}

/// What to note of a row whose fingerprint is `fingerprint`, the one Loops confirmed (decided
/// [`Decision::Unchanged`], or just adopted), so that later diffs can leave it out
/// (`Warehouse::note_unchanged`): `None` when the warehouse gave no hash for it.
pub fn unchanged_note(
    spec: &SyncSpec,
    row: &DiffRow,
    fingerprint: Option<&str>,
) -> Option<Unchanged> {
    let email = match spec.property("email") {
        Some(p) => row
            .values
            .as_ref()?
            .get(&p.column)
            .cloned()
            .flatten()
            .map(|e| normalize_email(&e))
            .filter(|e| !e.is_empty()),
        None => None,
    };
    Some(Unchanged {
        key: row.key.clone()?,
        fingerprint: fingerprint?.to_owned(),
        model_hash: row.model_hash?,
        email,
    })
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
        // An upsert sync leaves the contact in Loops: nothing is removed, nothing counted.
        Decision::RemovedKept => {}
        Decision::AlreadySent { .. } => counts.ignored += 1,
        Decision::Nothing => {}
    }
}

/// What the removal guard weighs ([`RemovalGuard::refuses`]): the contacts the sync confirmed
/// and the model's rows, tallied from the diff's rows as they come, by the run and by `plan`
/// alike ([`Decider::guard`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemovalGuard {
    /// Keys whose contact Loops confirmed, or that a create whose answer was lost may have
    /// made: the contacts the sync may remove.
    pub confirmed: u64,
    /// Rows the model returned.
    pub model_rows: u64,
}

/// Why the removal guard holds a run's removals back: what the run would do, and the way on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardRefusal {
    /// What the removals would be (`the model returned no rows, so …`).
    pub why: String,
    /// What to do if the removals are wanted.
    pub way_on: String,
}

impl GuardRefusal {
    /// As a run says it, in its error: the removals were held back.
    pub fn for_run(&self) -> String {
        format!("{}; nothing was removed. {}", self.why, self.way_on)
    }

    /// As `plan` says it: what a run would do.
    pub fn for_plan(&self) -> String {
        format!(
            "{}: the removal guard would stop it (a run would remove none and fail). {}",
            self.why, self.way_on
        )
    }
}

impl RemovalGuard {
    /// Takes one row of the diff.
    pub fn see(&mut self, row: &DiffRow) {
        if row.is_untold() {
            // Unchanged rows left out: each is in the model and confirmed.
            let n = row.unchanged_untold as u64;
            self.confirmed += n;
            self.model_rows += n;
            return;
        }
        // A contact a lost create may have made counts as one the sync may remove.
        self.confirmed +=
            u64::from(row.confirmed_fp.is_some() || (row.unsure && row.emitted_email.is_some()));
        self.model_rows += u64::from(row.values.is_some());
    }

    /// The removal guard, the one rule of it: a run that would remove `removals` contacts
    /// removes none and fails when that is more than the sync's `max_removal_share` of the
    /// contacts it confirmed, or any at all when the model returned no rows — unless removals
    /// are allowed (`--allow-removals`). `None`: the removals go.
    pub fn refuses(
        &self,
        spec: &SyncSpec,
        removals: u64,
        allow_removals: bool,
    ) -> Option<GuardRefusal> {
        let share = spec.max_removal_share;
        let n = removals;
        if n == 0 || allow_removals {
            return None;
        }
        if self.model_rows == 0 {
            // No share lets an empty model remove anything: only the flag does.
            return Some(GuardRefusal {
                why: format!(
                    "the model returned no rows, so this run would remove all {n} contacts it \
                     confirmed"
                ),
                way_on: "If the model is right (the table is meant to be empty), run again with \
                         --allow-removals"
                    .to_owned(),
            });
        }
        if n as f64 <= share * self.confirmed as f64 {
            return None;
        }
        let needed = n as f64 / self.confirmed.max(1) as f64;
        Some(GuardRefusal {
            why: format!(
                "this run would remove {n} of the {} contacts the sync confirmed ({:.1} %), more \
                 than max_removal_share ({:.1} %)",
                self.confirmed,
                100.0 * needed,
                100.0 * share
            ),
            way_on: format!(
                "If the model is right, run again with --allow-removals (or set \
                 max_removal_share to at least {:.3} for sync {})",
                (needed * 1000.0).ceil() / 1000.0,
                spec.name
            ),
        })
    }
}

/// The diff's rows come ordered by key, NULL keys last: a key is complete when the next row's
/// key differs. Holds one row at a time.
#[derive(Debug, Default)]
struct KeyGroups {
    pending: Option<(DiffRow, usize)>,
}

impl KeyGroups {
    /// Takes the next row; returns the keys it completed.
    fn push(&mut self, row: DiffRow) -> Vec<(DiffRow, usize)> {
        let mut done = Vec::new();
        if row.key.is_none() {
            done.extend(self.pending.take());
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
    fn finish(&mut self) -> Option<(DiffRow, usize)> {
        self.pending.take()
    }
}

/// Decides a key group; a NULL key is invalid and named `(null #n)` in the order met.
fn decide_group(
    spec: &SyncSpec,
    run_id: i64,
    (row, n): &(DiffRow, usize),
    null_seen: &mut usize,
) -> Decision {
    if row.key.is_none() {
        *null_seen += 1;
        return Decision::Invalid {
            key: loopsync_core::envelope::null_key(*null_seen),
            reason: format!("{} is NULL", spec.primary_key),
            rows: 1,
        };
    }
    decide_row(spec, run_id, row, *n)
}

/// One key decided: the (first) diff row that carried it, and its fate.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// The row as the diff gave it: what Loops confirmed for the key, and the model's values.
    pub row: DiffRow,
    /// What the key means for the run.
    pub decision: Decision,
}

/// Walks a sync's diff: takes its rows in the order the warehouse gives them (by key, NULL keys
/// last) and yields one [`Decided`] per key once the key is complete. It is the only place that
/// groups rows by key, numbers NULL keys (`(null #n)`, in the order met), counts the decisions
/// ([`tally`]), and, for a replay, keeps only the keys asked for: the run, the dry run, adopt
/// and verify cannot disagree on any of it. Holds one row at a time.
#[derive(Debug)]
pub struct Decider<'a> {
    spec: &'a SyncSpec,
    run_id: i64,
    /// When not empty, the only keys decided (a replay of dead letters).
    only: HashSet<String>,
    groups: KeyGroups,
    null_seen: usize,
    counts: ExtractCounts,
    guard: RemovalGuard,
}

impl<'a> Decider<'a> {
    /// Decides the keys of `spec`'s diff for run `run_id` (the id goes into each change; a
    /// caller that publishes nothing may pass 0).
    pub fn new(spec: &'a SyncSpec, run_id: i64) -> Decider<'a> {
        Decider {
            spec,
            run_id,
            only: HashSet::new(),
            groups: KeyGroups::default(),
            null_seen: 0,
            counts: ExtractCounts::default(),
            guard: RemovalGuard::default(),
        }
    }

    /// Decides only these keys, and counts only them (`loopsync dlq replay`); none: all keys.
    /// A NULL key is never among them.
    pub fn only_keys(mut self, keys: impl IntoIterator<Item = String>) -> Decider<'a> {
        self.only = keys.into_iter().collect();
        self
    }

    /// Takes the diff's next row; yields the keys it completed (at most two: the key held
    /// before, and a NULL key, complete on its own), each already counted.
    pub fn push(&mut self, row: DiffRow) -> impl Iterator<Item = Decided> + use<> {
        let mut done = [None, None];
        self.guard.see(&row);
        if row.is_untold() {
            // Rows the warehouse left out as unchanged: counted, unless only some keys are
            // asked for (their rows are read in full, see `Warehouse::diff_changes`).
            if self.only.is_empty() {
                self.counts.unchanged += row.unchanged_untold;
            }
            // The highest cursor of the rows the diff went through, left out or not.
            self.counts.cursor_high = self.counts.cursor_high.max(row.cursor_high);
            return done.into_iter().flatten();
        }
        for (slot, group) in done.iter_mut().zip(self.groups.push(row)) {
            *slot = self.decide(group);
        }
        done.into_iter().flatten()
    }

    /// The last key, once the diff has no more rows.
    pub fn finish(&mut self) -> Option<Decided> {
        let group = self.groups.finish()?;
        self.decide(group)
    }

    /// What the transformer refused of a change this decider yielded: counted as one invalid
    /// row instead of an added or changed one, as a run's report counts it
    /// ([`ExtractCounts::refuse`]; `loopsync adopt` records nothing for it, `plan` lists it).
    pub fn count_as_invalid(&mut self, change: &RowChange) {
        self.counts.refuse(change.kind, 1);
    }

    /// What the removal guard weighs, of every row taken so far (a replay's too: the guard
    /// weighs the whole sync).
    pub fn guard(&self) -> RemovalGuard {
        self.guard
    }

    /// The counts so far.
    pub fn counts(&self) -> &ExtractCounts {
        &self.counts
    }

    /// The counts of the whole diff, once it is walked.
    pub fn into_counts(self) -> ExtractCounts {
        self.counts
    }

    fn decide(&mut self, group: (DiffRow, usize)) -> Option<Decided> {
        if !self.only.is_empty() && !group.0.key.as_ref().is_some_and(|k| self.only.contains(k)) {
            return None;
        }
        let decision = decide_group(self.spec, self.run_id, &group, &mut self.null_seen);
        tally(&mut self.counts, &decision);
        // An event sync's watermark is the highest cursor it read; a contact sync's comes in
        // the diff's last row, capped by the warehouse's clock (`DiffRow::cursor_high`).
        if self.spec.is_append()
            && let Some(at) = cursor_millis(self.spec, &group.0)
        {
            self.counts.cursor_high = self.counts.cursor_high.max(Some(at));
        }
        Some(Decided {
            row: group.0,
            decision,
        })
    }
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
            append: None,
            incremental: None,
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
            ..Default::default()
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
        // Which column, not the person's email: a reason is kept and shown.
        assert!(
            reason.starts_with("this row's email (column email) is on 2 rows"),
            "{reason}"
        );
        assert!(!reason.to_lowercase().contains("a@x.co"), "{reason}");
    }

    /// A value longer than Loops accepts makes the row invalid here, before it is published
    /// (a value of megabytes would not fit in a message), by the column, not the value.
    #[test]
    fn a_row_with_a_value_too_long_is_invalid_before_it_is_published() {
        let s = spec(Behavior::Upsert);
        let huge = format!("{}@x.co", "a".repeat(2 << 20));
        let decision = decide(&s, 1, row(Some("1"), Some(&huge), None), 1);
        assert_eq!(
            decision,
            Decision::Invalid {
                key: "1".into(),
                reason: format!(
                    "email (column email) is {} characters long; Loops accepts at most 500",
                    huge.len()
                ),
                rows: 1,
            }
        );
    }

    /// Every model row lands in exactly one of added, changed, unchanged and invalid rows: a
    /// duplicate key is one invalid record of several rows. A row that left counts as removed
    /// under mirror; under upsert, which removes nothing, it is not counted.
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
            tally(&mut counts, &decide_group(&s, 1, &group, &mut nulls));
        }
        assert_eq!(
            (
                counts.added,
                counts.changed,
                counts.unchanged,
                counts.invalid_rows,
                counts.removed
            ),
            (1, 1, 1, 4, 0)
        );
        let mut mirror = ExtractCounts::default();
        let gone = (row(Some("5"), None, Some("fp")), 1);
        tally(
            &mut mirror,
            &decide_group(&spec(Behavior::Mirror), 1, &gone, &mut nulls),
        );
        assert_eq!((mirror.removed, mirror.expected), (1, 1));
        let model_rows = 1 + 1 + 3 + 1 + 1;
        assert_eq!(
            counts.added + counts.changed + counts.unchanged + counts.invalid_rows,
            model_rows
        );
        assert_eq!(counts.expected, 4, "two changes, two invalid records");
    }

    /// The removal guard: an empty model removes nothing without --allow-removals, whatever
    /// max_removal_share says, and its hint names only the flag; above the share, the hint
    /// names the share that would let the run through.
    #[test]
    fn the_removal_guard_gives_the_way_that_works() {
        let mut s = spec(Behavior::Mirror);
        s.max_removal_share = 1.0;
        let empty = RemovalGuard {
            confirmed: 10,
            model_rows: 0,
        };
        let refusal = empty
            .refuses(&s, 10, false)
            .expect("an empty model is refused");
        assert!(
            refusal.why.contains("the model returned no rows"),
            "{refusal:?}"
        );
        assert!(refusal.way_on.contains("--allow-removals"), "{refusal:?}");
        assert!(
            !refusal.for_run().contains("max_removal_share"),
            "raising the share does nothing for an empty model: {}",
            refusal.for_run()
        );
        assert_eq!(empty.refuses(&s, 10, true), None, "--allow-removals");
        assert_eq!(empty.refuses(&s, 0, false), None, "nothing to remove");
        s.max_removal_share = 0.2;
        let some = RemovalGuard {
            confirmed: 10,
            model_rows: 7,
        };
        assert_eq!(some.refuses(&s, 2, false), None, "20 % is allowed");
        let refusal = some.refuses(&s, 3, false).expect("30 % is too many");
        assert!(
            refusal.for_run().contains(
                "would remove 3 of the 10 contacts the sync confirmed (30.0 %), more than \
                 max_removal_share (20.0 %); nothing was removed"
            ) && refusal
                .way_on
                .contains("max_removal_share to at least 0.300 for sync s"),
            "{refusal:?}"
        );
        assert!(
            refusal
                .for_plan()
                .contains("the removal guard would stop it")
        );
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
        let d = decide_group(&spec(Behavior::Upsert), 1, &done[1], &mut nulls);
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

    /// Walks rows as the diff gives them.
    fn walk(decider: &mut Decider<'_>, rows: Vec<DiffRow>) -> Vec<Decided> {
        let mut out = Vec::new();
        for r in rows {
            out.extend(decider.push(r));
        }
        out.extend(decider.finish());
        out
    }

    /// The decider groups rows by key (a duplicate key is one invalid record), names NULL keys
    /// in the order met, hands each key's row on with its decision, and counts as [`tally`].
    #[test]
    fn decider_groups_decides_and_counts() {
        let s = spec(Behavior::Upsert);
        let mut decider = Decider::new(&s, 7);
        let decided = walk(
            &mut decider,
            vec![
                row(Some("1"), Some("a@x.co"), None),
                row(Some("2"), Some("b@x.co"), None),
                row(Some("2"), Some("c@x.co"), None),
                row(Some("3"), None, Some("fp")),
                row(None, Some("n1@x.co"), None),
                row(None, Some("n2@x.co"), None),
            ],
        );
        let keys: Vec<_> = decided.iter().map(|d| d.row.key.as_deref()).collect();
        assert_eq!(keys, [Some("1"), Some("2"), Some("3"), None, None]);
        let Decision::Change(c) = &decided[0].decision else {
            panic!("{:?}", decided[0])
        };
        assert_eq!(
            (c.kind, c.run_id, c.key.as_str()),
            (ChangeKind::Added, 7, "1")
        );
        assert!(matches!(
            decided[1].decision,
            Decision::Invalid { rows: 2, .. }
        ));
        assert_eq!(decided[2].decision, Decision::RemovedKept);
        let nulls: Vec<_> = decided[3..]
            .iter()
            .map(|d| match &d.decision {
                Decision::Invalid { key, .. } => key.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(nulls, ["(null #1)", "(null #2)"]);
        assert_eq!(
            decided[4].row.values.as_ref().unwrap()["email"].as_deref(),
            Some("n2@x.co"),
            "the row comes with its decision"
        );
        let mut expected = ExtractCounts::default();
        for d in &decided {
            tally(&mut expected, &d.decision);
        }
        assert_eq!(decider.counts(), &expected);
        assert_eq!(
            (
                expected.added,
                expected.removed,
                expected.invalid_rows,
                expected.expected
            ),
            (1, 0, 4, 4)
        );
    }

    /// A replay decides and counts only its keys; a NULL key is never one of them.
    #[test]
    fn decider_keeps_a_replay_to_its_keys() {
        let s = spec(Behavior::Upsert);
        let mut decider = Decider::new(&s, 1).only_keys(["2".to_owned(), "4".to_owned()]);
        let decided = walk(
            &mut decider,
            vec![
                row(Some("1"), Some("a@x.co"), None),
                row(Some("2"), Some("b@x.co"), None),
                row(Some("3"), Some("c@x.co"), None),
                row(Some("4"), Some("d@x.co"), Some("old")),
                row(None, Some("n@x.co"), None),
            ],
        );
        let keys: Vec<_> = decided.iter().map(|d| d.row.key.as_deref()).collect();
        assert_eq!(keys, [Some("2"), Some("4")]);
        let counts = decider.into_counts();
        assert_eq!(
            (counts.added, counts.changed, counts.invalid_rows),
            (1, 1, 0)
        );
    }

    /// A change the transformer refuses moves from its kind's count to the invalid rows.
    #[test]
    fn decider_counts_a_refused_change_as_invalid() {
        let s = spec(Behavior::Upsert);
        let mut decider = Decider::new(&s, 1);
        let decided = walk(&mut decider, vec![row(Some("1"), Some("a@x.co"), None)]);
        let Decision::Change(c) = &decided[0].decision else {
            panic!()
        };
        decider.count_as_invalid(c);
        let counts = decider.into_counts();
        assert_eq!((counts.added, counts.invalid_rows), (0, 1));
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

#[cfg(test)]
mod event_tests {
    use std::collections::BTreeMap;

    use loopsync_core::spec::{AppendSpec, Cursor, EventName};

    use super::tests::spec;
    use super::*;

    fn events() -> SyncSpec {
        SyncSpec {
            behavior: Behavior::Append,
            append: Some(AppendSpec {
                event: EventName::Fixed("paid".into()),
                event_properties: vec![],
                cursor: Some(Cursor {
                    column: "at".into(),
                    lookback_ms: 0,
                }),
            }),
            ..spec(Behavior::Upsert)
        }
    }

    fn row(key: &str, at: Option<&str>, confirmed: Option<&str>) -> DiffRow {
        DiffRow {
            key: Some(key.into()),
            values: Some(BTreeMap::from([
                ("email".to_owned(), Some("a@x.co".to_owned())),
                ("at".to_owned(), at.map(str::to_owned)),
            ])),
            confirmed_fp: confirmed.map(str::to_owned),
            confirmed_email: None,
            confirmed_user_id: None,
            email_rows: 3,
            parked_fp: None,
            generation: 0,
            ..Default::default()
        }
    }

    /// An event is new (sent), confirmed at its values (nothing), confirmed at others (already
    /// sent: ignored, never sent again); its cursor must be a date; a key that left the model
    /// removes nothing; many events share an email. The decider keeps the highest cursor read.
    #[test]
    fn events_are_sent_once() {
        let s = events();
        let when = "2026-01-02 03:04:05+00";
        let at = Some(when);
        let fp = s.fingerprint(&row("1", at, None).values.unwrap());
        let mut decider = Decider::new(&s, 7);
        let mut decisions = Vec::new();
        for r in [
            row("1", at, None),
            row("2", at, Some(&fp)),
            row("3", at, Some("an older fingerprint")),
            row("4", None, None),
            row("5", Some("soon"), None),
            row("6", Some("2026-01-01"), None),
            row("7", Some("1767322800"), None),
        ] {
            decisions.extend(decider.push(r).map(|d| d.decision));
        }
        decisions.extend(decider.finish().map(|d| d.decision));
        assert!(matches!(&decisions[0], Decision::Change(c) if c.kind == ChangeKind::Added));
        assert_eq!(decisions[1], Decision::Unchanged);
        assert!(matches!(&decisions[2], Decision::AlreadySent { key, .. } if key == "3"));
        assert!(
            matches!(&decisions[3], Decision::Invalid { reason, .. } if reason.contains("cursor at is NULL"))
        );
        assert!(
            matches!(&decisions[4], Decision::Invalid { reason, .. } if reason.contains("not a date"))
        );
        let counts = decider.into_counts();
        assert_eq!(
            (
                counts.added,
                counts.unchanged,
                counts.ignored,
                counts.invalid_rows
            ),
            (2, 1, 1, 3)
        );
        assert!(
            matches!(&decisions[6], Decision::Invalid { reason, .. } if reason.contains("not a date or a time"))
        );
        assert_eq!(counts.cursor_high, parse_date_millis(when));
        let gone = DiffRow {
            values: None,
            ..row("9", at, Some(&fp))
        };
        assert_eq!(decide(&s, 7, gone, 1), Decision::Nothing);
        assert!(matches!(
            decide(&s, 7, row("1", at, None), 2),
            Decision::Invalid { rows: 2, .. }
        ));
    }
}
