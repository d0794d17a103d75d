//! What `loopsync verify` does: reads confirmed contacts back from Loops and reports where Loops
//! drifted from what the state says it confirmed; with `repair`, forgets the confirmation of
//! each drifted record so the next run re-sends it.
//!
//! The reasoning about one record is in `loopsync_transformer::verify` (pure); this module walks
//! the diff with the extractor's decider, picks the sample, reads Loops through the caller's
//! `find` (paced and retried as the caller's other calls to Loops), compares, and repairs. The
//! binary prints the [`Report`].

use std::future::Future;

use futures::StreamExt;
use loopsync_core::envelope::{ChangeKind, RequestCounts};
use loopsync_core::spec::SyncSpec;
use loopsync_core::{Classified, ErrorClass};
use loopsync_extractor::{Decided, Decider, Decision};
use loopsync_loops_client::{Contact, ContactIdentity, LoopsClient, LoopsError};
use loopsync_transformer::verify::{Confirmed, Drift, Lookup, Sample, compare, rank};
use loopsync_warehouse::{FORGOTTEN_FP, Warehouse, WarehouseError};
use serde::Serialize;
use serde_json::Value;

use crate::EngineError;
use crate::pipeline::Pipeline;
use crate::retry::with_retries;

/// The version of the `--json` report.
pub const REPORT_VERSION: u16 = 1;

/// What to verify of each sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Confirmed records to read back per sync; `None`: every one.
    pub sample: Option<usize>,
    /// Picks another deterministic sample (records are ranked by a hash of seed, sync and key).
    pub seed: u64,
    /// Forget the confirmed state of each drifted record, so the next run re-sends it.
    pub repair: bool,
    /// Only these records (`verify --key`); empty: every confirmed record (or the sample).
    /// A record asked for that Loops has not confirmed is reported, not read.
    pub keys: Vec<String>,
}

/// Confirmed records not verified, by why.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The model row changed since Loops confirmed it: the next run sends it.
    pub changed: u64,
    /// Forgotten by `verify --repair`: the next run re-sends it.
    pub repaired: u64,
    /// Gone from the model: its values are unknown (mirror removes it, upsert keeps it).
    pub removed: u64,
    /// Parked by `loopsync dlq park`.
    pub parked: u64,
    /// A run would not send it (a duplicated key or email, a value the transformer refuses).
    pub invalid: u64,
}

impl Skipped {
    /// All the skipped records, whatever the reason.
    pub fn total(&self) -> u64 {
        self.changed + self.repaired + self.removed + self.parked + self.invalid
    }
}

/// One drift of one record.
#[derive(Debug, Serialize)]
pub struct DriftReport {
    pub key: String,
    pub email: Option<String>,
    pub user_id: Option<String>,
    #[serde(flatten)]
    pub drift: Drift,
    /// In words: `planName is "gold" in Loops, "pro" confirmed`.
    pub text: String,
}

/// A record Loops could not be asked about (Loops refused the query).
#[derive(Debug, Serialize)]
pub struct Unreadable {
    pub key: String,
    /// Loops' refusal, with its causes.
    pub error: String,
}

/// The verification of one sync.
#[derive(Debug, Serialize)]
pub struct SyncReport {
    pub sync: String,
    /// Records per sync asked for; `null`: all.
    pub sample: Option<usize>,
    pub seed: u64,
    /// Records whose state holds a version Loops confirmed.
    pub confirmed: u64,
    /// Of them, those whose model row is still at that version: what can be verified.
    pub eligible: u64,
    /// Records read back from Loops and compared.
    pub checked: u64,
    /// Their keys, in key order.
    pub checked_keys: Vec<String>,
    /// Of `checked`, records with at least one drift.
    pub drifted: u64,
    /// `confirmed - eligible`: not verified; `skipped_by_reason` says why.
    pub skipped: u64,
    pub skipped_by_reason: Skipped,
    /// Records whose read Loops refused (4xx); not in `checked`.
    pub unreadable: Vec<Unreadable>,
    /// Requests sent to Loops (`GET /v1/contacts/find`, retries included).
    pub requests: u64,
    pub rate_limited: u64,
    /// With `--repair`: drifted records whose confirmation was forgotten (the next run
    /// re-sends them); `null` without.
    pub repaired: Option<u64>,
    /// What the reader should know about this sync's repair, if anything.
    pub note: Option<String>,
    pub drifts: Vec<DriftReport>,
    /// With `--key`: the keys asked for that have no contact Loops confirmed for this sync (not
    /// in the model nor the state, or never confirmed): nothing to read back.
    pub not_confirmed: Vec<String>,
}

impl SyncReport {
    /// A report with nothing counted yet.
    fn new(spec: &SyncSpec, options: &Options) -> SyncReport {
        SyncReport {
            sync: spec.name.clone(),
            // Records asked for by key are all read back.
            sample: options.sample.filter(|_| options.keys.is_empty()),
            seed: options.seed,
            confirmed: 0,
            eligible: 0,
            checked: 0,
            checked_keys: Vec::new(),
            drifted: 0,
            skipped: 0,
            skipped_by_reason: Skipped::default(),
            unreadable: Vec::new(),
            requests: 0,
            rate_limited: 0,
            repaired: None,
            note: None,
            drifts: Vec::new(),
            not_confirmed: Vec::new(),
        }
    }
}

/// `verify --json`: every sync verified, with the totals.
#[derive(Debug, Serialize)]
pub struct Report {
    pub v: u16,
    pub checked: u64,
    pub drifted: u64,
    pub skipped: u64,
    pub syncs: Vec<SyncReport>,
}

impl Report {
    /// Nothing verified yet.
    pub fn new() -> Report {
        Report {
            v: REPORT_VERSION,
            checked: 0,
            drifted: 0,
            skipped: 0,
            syncs: Vec::new(),
        }
    }

    /// Adds one sync's verification to the totals.
    pub fn push(&mut self, one: SyncReport) {
        self.checked += one.checked;
        self.drifted += one.drifted;
        self.skipped += one.skipped;
        self.syncs.push(one);
    }

    /// No drift, and every record asked about could be read (and, with `--key`, was
    /// confirmed): what exit status 0 means.
    pub fn is_clean(&self) -> bool {
        self.drifted == 0
            && self
                .syncs
                .iter()
                .all(|s| s.unreadable.is_empty() && s.not_confirmed.is_empty())
    }
}

impl Default for Report {
    fn default() -> Report {
        Report::new()
    }
}

/// Why one contact could not be read from Loops.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Loops answered with an error (or the client refused to send the request).
    #[error(transparent)]
    Loops(#[from] LoopsError),
    /// The request could not be made at all (the team's rate budget failed, …).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl ReadError {
    /// Loops refused this query itself (400, 404, 409, or a query the client would not send):
    /// the record cannot be read, the others can.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ReadError::Loops(
                LoopsError::Invalid { .. }
                    | LoopsError::NotFound { .. }
                    | LoopsError::Conflict { .. }
                    | LoopsError::Usage(_)
            )
        )
    }
}

impl Classified for ReadError {
    fn class(&self) -> ErrorClass {
        match self {
            ReadError::Loops(e) => e.class(),
            ReadError::Other(_) => ErrorClass::RETRY,
        }
    }
}

/// Why a verification stopped (a refused read is not one: it is reported as unreadable).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// One sync's verification failed; the others before it were done.
    #[error("verifying sync {sync}")]
    Sync {
        sync: String,
        #[source]
        source: Box<VerifyError>,
    },
    /// Reading the diff, or forgetting what Loops confirmed.
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
    /// Loops could not be read (unreachable, a bad key, retries spent).
    #[error("reading the contact of key {key}")]
    Read {
        key: String,
        #[source]
        source: ReadError,
    },
    /// A contact Loops returned could not be turned into JSON to compare.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl Classified for VerifyError {
    fn class(&self) -> ErrorClass {
        match self {
            VerifyError::Sync { source, .. } => source.class(),
            VerifyError::Warehouse(e) => e.class(),
            VerifyError::Read { source, .. } => source.class(),
            VerifyError::Json(_) => ErrorClass::Permanent,
        }
    }
}

/// Told how far verify is: the sync, the contacts read back so far, and how many it reads
/// (once before the reads, with 0 done, then after each read). The binary prints it.
pub type Progress<'p> = &'p (dyn Fn(&str, usize, usize) + Sync);

/// `loopsync verify` on a connected pipeline: every sync of its config (or `only`), each
/// read of Loops through the team's rate budget and retried as the loader's requests are
/// ([`with_retries`]), `loops.concurrency` at a time; `progress` told as they go.
pub async fn verify_pipeline(
    pipeline: &Pipeline,
    client: &LoopsClient,
    only: Option<&str>,
    options: &Options,
    progress: Progress<'_>,
) -> Result<Report, VerifyError> {
    let (budget, attempts) = (&pipeline.budget, pipeline.config.loops.max_attempts);
    let find = |identity: ContactIdentity| async move {
        let mut counts = RequestCounts::default();
        let found = with_retries(budget, attempts, &mut counts, || {
            client.find_contact(&identity)
        })
        .await
        .map_err(|e| match e {
            EngineError::LoopsClient(e) => ReadError::Loops(e),
            e => ReadError::Other(e.into()),
        });
        (found, counts)
    };
    verify(
        &*pipeline.warehouse,
        pipeline.config.syncs.iter().map(|s| &s.spec),
        only,
        options,
        pipeline.config.loops.concurrency.max(1),
        find,
        progress,
    )
    .await
}

/// Verifies every sync of `syncs` (only the one named `only`, if given), one after the other.
/// `find` reads one contact and says how many requests it took; the binary passes Loops'
/// client through its paced, retried call, so verify spends the team's budget like a run.
pub async fn verify<'a, F, Fut>(
    warehouse: &dyn Warehouse,
    syncs: impl IntoIterator<Item = &'a SyncSpec>,
    only: Option<&str>,
    options: &Options,
    concurrency: usize,
    find: F,
    progress: Progress<'_>,
) -> Result<Report, VerifyError>
where
    F: Fn(ContactIdentity) -> Fut,
    Fut: Future<Output = (Result<Option<Contact>, ReadError>, RequestCounts)>,
{
    let mut report = Report::new();
    for spec in syncs {
        // An event sync's rows are events: Loops has no way to read one back.
        if only.is_some_and(|n| n != spec.name) || spec.is_append() {
            continue;
        }
        let one = verify_sync(warehouse, spec, options, concurrency, &find, progress)
            .await
            .map_err(|e| VerifyError::Sync {
                sync: spec.name.clone(),
                source: Box::new(e),
            })?;
        report.push(one);
    }
    Ok(report)
}

/// Verifies one sync: walks its diff as a run would, reads the sample back from Loops
/// (`concurrency` at a time, each through `find`, `progress` told after each), compares, and
/// with `options.repair` forgets what Loops confirmed for each drifted record.
pub async fn verify_sync<F, Fut>(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    options: &Options,
    concurrency: usize,
    find: F,
    progress: Progress<'_>,
) -> Result<SyncReport, VerifyError>
where
    F: Fn(ContactIdentity) -> Fut,
    Fut: Future<Output = (Result<Option<Contact>, ReadError>, RequestCounts)>,
{
    let mut report = SyncReport::new(spec, options);
    // Walk the diff as a run would, and keep the sample of records at their confirmed version
    // (with `keys`, only those: the decider keeps them, as it keeps a replay's).
    let mut walk = Walk::new(spec, options);
    let mut rows = warehouse.diff(spec).await?;
    let mut decider = Decider::new(spec, 0).only_keys(options.keys.iter().cloned());
    while let Some(row) = rows.next().await {
        for decided in decider.push(row?) {
            walk.consider(&mut report, decided);
        }
    }
    if let Some(decided) = decider.finish() {
        walk.consider(&mut report, decided);
    }
    drop(rows);
    report.skipped = report.skipped_by_reason.total();
    report.not_confirmed = not_confirmed(&options.keys, &walk.seen);

    // Read them back, `concurrency` at a time.
    let find = &find;
    let sample = walk.sample.into_sorted();
    let total = sample.len();
    progress(&spec.name, 0, total);
    let mut done = 0;
    let reads = futures::stream::iter(sample)
        .map(|(key, candidate)| async move {
            let (found, counts) = match candidate.confirmed.lookup(spec.identify_by) {
                None => (
                    Err(ReadError::Loops(LoopsError::Usage(
                        "no identifier to find the contact by".into(),
                    ))),
                    RequestCounts::default(),
                ),
                Some(Lookup::Email(e)) => find(ContactIdentity::Email(e)).await,
                Some(Lookup::UserId(u)) => find(ContactIdentity::UserId(u)).await,
            };
            (key, candidate, found, counts)
        })
        .buffered(concurrency.max(1))
        .inspect(|_| {
            done += 1;
            progress(&spec.name, done, total);
        })
        .collect::<Vec<_>>()
        .await;
    let mut drifted = Vec::new();
    for (key, candidate, found, counts) in reads {
        report.requests += u64::from(counts.total());
        report.rate_limited += u64::from(counts.rate_limited);
        let found = match found {
            Ok(found) => found,
            // Loops refused this one query (a 400 for an identifier it does not accept):
            // report it, go on with the others. Anything else (Loops unreachable, a bad key)
            // ends the verification.
            Err(e) if e.is_refusal() => {
                report.unreadable.push(Unreadable {
                    key,
                    error: chain(&e),
                });
                continue;
            }
            Err(source) => return Err(VerifyError::Read { key, source }),
        };
        let found = found
            .map(|contact| serde_json::to_value(&contact))
            .transpose()?;
        if record_read(spec, &mut report, key.clone(), &candidate, found.as_ref()) {
            drifted.push((key, candidate.fingerprint));
        }
    }
    if options.repair {
        let repaired = warehouse.forget_confirmed(&spec.name, &drifted).await?;
        report.repaired = Some(repaired);
        if repaired > 0 && spec.trigger_workflows {
            // A repair is a new change (the record's generation moved on since the send that
            // drifted), so its write goes with a new Idempotency-Key — and fires its event.
            report.note = Some(
                "this sync writes through events/send: each repaired record is re-sent as an \
                 update, and fires its update event again"
                    .into(),
            );
        }
    }
    Ok(report)
}

/// The keys asked for (`verify --key`) that the walk met no confirmed record of, in key order.
fn not_confirmed(asked: &[String], seen: &std::collections::HashSet<String>) -> Vec<String> {
    let mut missing: Vec<String> = asked
        .iter()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

/// An error and its causes, as one line: `error: cause: its cause`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// A record to read back: the version verified and what Loops confirmed of it.
#[derive(Debug)]
struct Candidate {
    fingerprint: String,
    confirmed: Confirmed,
}

/// The walk over a sync's diff: counts the confirmed records by what a run would do with them,
/// and samples those still at their confirmed version.
struct Walk<'a> {
    spec: &'a SyncSpec,
    seed: u64,
    sample: Sample<Candidate>,
    /// The keys of the confirmed records met.
    seen: std::collections::HashSet<String>,
}

impl<'a> Walk<'a> {
    fn new(spec: &'a SyncSpec, options: &Options) -> Walk<'a> {
        Walk {
            spec,
            seed: options.seed,
            // Records asked for by key are all read back, whatever the sample size.
            sample: Sample::new(options.sample.filter(|_| options.keys.is_empty())),
            seen: std::collections::HashSet::new(),
        }
    }

    /// One key of the diff, decided as a run would.
    fn consider(&mut self, report: &mut SyncReport, Decided { row, decision }: Decided) {
        if row.confirmed_fp.is_none() {
            // Never confirmed: nothing in Loops to compare with.
            return;
        }
        let spec = self.spec;
        let confirmed_fp = row.confirmed_fp.unwrap_or_default();
        report.confirmed += 1;
        if let Some(key) = &row.key {
            self.seen.insert(key.clone());
        }
        let skipped = &mut report.skipped_by_reason;
        match decision {
            Decision::Unchanged => {
                let key = row.key.unwrap_or_default();
                match loopsync_transformer::verify::confirmed(
                    spec,
                    &key,
                    &confirmed_fp,
                    row.values.unwrap_or_default(),
                    row.confirmed_email,
                    row.confirmed_user_id,
                ) {
                    Ok(confirmed) => {
                        report.eligible += 1;
                        let candidate = Candidate {
                            fingerprint: confirmed_fp,
                            confirmed,
                        };
                        let rank = rank(self.seed, &spec.name, &key);
                        self.sample.offer(rank, key, candidate);
                    }
                    Err(_) => skipped.invalid += 1,
                }
            }
            // An event was sent, and its row changed since: no contact to compare.
            Decision::AlreadySent { .. } => skipped.changed += 1,
            Decision::Change(change) => match change.kind {
                ChangeKind::Removed => skipped.removed += 1,
                _ if confirmed_fp == FORGOTTEN_FP => skipped.repaired += 1,
                _ => skipped.changed += 1,
            },
            Decision::RemovedKept | Decision::Nothing => skipped.removed += 1,
            Decision::Parked => skipped.parked += 1,
            Decision::Invalid { .. } => skipped.invalid += 1,
        }
    }
}

/// Counts one record read back (`found`: the contact as JSON, `None` when Loops has none) and
/// reports its drifts. True when it drifted.
fn record_read(
    spec: &SyncSpec,
    report: &mut SyncReport,
    key: String,
    candidate: &Candidate,
    found: Option<&Value>,
) -> bool {
    report.checked += 1;
    report.checked_keys.push(key.clone());
    let drifts = compare(spec, &candidate.confirmed, found.and_then(Value::as_object));
    if drifts.is_empty() {
        return false;
    }
    report.drifted += 1;
    for drift in drifts {
        report.drifts.push(DriftReport {
            key: key.clone(),
            email: candidate.confirmed.email.clone(),
            user_id: candidate.confirmed.user_id.clone(),
            text: drift.describe(),
            drift,
        });
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use loopsync_core::spec::{Behavior, IdentifyBy, MappedProperty, OnRemove};
    use loopsync_core::value::PropertyKind;
    use loopsync_transformer::verify::DriftKind;
    use loopsync_warehouse::DiffRow;

    use super::*;

    /// A sync identified by email, mapping the email and a plan name.
    fn spec() -> SyncSpec {
        SyncSpec {
            name: "users".into(),
            model: "m".into(),
            primary_key: "id".into(),
            identify_by: IdentifyBy::Email,
            behavior: Behavior::Upsert,
            on_remove: OnRemove::Delete,
            trigger_workflows: false,
            event_on_create: "c".into(),
            event_on_update: "u".into(),
            properties: vec![
                MappedProperty {
                    property: "email".into(),
                    column: "email".into(),
                    kind: PropertyKind::String,
                },
                MappedProperty {
                    property: "planName".into(),
                    column: "plan".into(),
                    kind: PropertyKind::String,
                },
            ],
            lists: vec![],
            max_removal_share: loopsync_core::spec::DEFAULT_MAX_REMOVAL_SHARE,
            append: None,
            incremental: None,
        }
    }

    fn values(email: &str, plan: &str) -> BTreeMap<String, Option<String>> {
        BTreeMap::from([
            ("email".to_owned(), Some(email.to_owned())),
            ("plan".to_owned(), Some(plan.to_owned())),
        ])
    }

    /// A model row confirmed at `confirmed_fp` (`None`: never confirmed).
    fn row(key: &str, now: Option<(&str, &str)>, confirmed_fp: Option<&str>) -> DiffRow {
        DiffRow {
            key: Some(key.to_owned()),
            values: now.map(|(e, p)| values(e, p)),
            confirmed_fp: confirmed_fp.map(str::to_owned),
            confirmed_email: confirmed_fp.map(|_| format!("{key}@x.co")),
            confirmed_user_id: None,
            email_rows: 1,
            parked_fp: None,
            generation: 1,
            ..Default::default()
        }
    }

    fn options(sample: Option<usize>) -> Options {
        Options {
            sample,
            seed: 0,
            repair: false,
            keys: Vec::new(),
        }
    }

    /// Each confirmed record is either eligible (at its confirmed version) or skipped, with the
    /// reason a run would give; a record never confirmed is not counted at all.
    #[test]
    fn the_walk_counts_confirmed_records_by_what_a_run_would_do() {
        let spec = spec();
        let fp = |k: &str, plan: &str| spec.fingerprint(&values(&format!("{k}@x.co"), plan));
        let options = options(None);
        let mut report = SyncReport::new(&spec, &options);
        let mut walk = Walk::new(&spec, &options);
        let rows = vec![
            (row("1", Some(("1@x.co", "pro")), Some(&fp("1", "pro"))), 1),
            (row("2", Some(("2@x.co", "gold")), Some(&fp("2", "pro"))), 1),
            (row("3", Some(("3@x.co", "pro")), Some(FORGOTTEN_FP)), 1),
            (row("4", None, Some(&fp("4", "pro"))), 1),
            (row("5", Some(("5@x.co", "pro")), Some(&fp("5", "pro"))), 2),
            (row("6", Some(("6@x.co", "pro")), None), 1),
            (
                DiffRow {
                    parked_fp: Some(fp("7", "pro")),
                    ..row("7", Some(("7@x.co", "pro")), Some(&fp("7", "old")))
                },
                1,
            ),
            (row("8", Some(("8@x.co", "pro")), Some(&fp("8", "pro"))), 1),
        ];
        feed(&mut walk, &mut report, &spec, rows);
        assert_eq!(report.confirmed, 7);
        assert_eq!(report.eligible, 2);
        assert_eq!(
            report.skipped_by_reason,
            Skipped {
                changed: 1,
                repaired: 1,
                removed: 1,
                parked: 1,
                invalid: 1,
            }
        );
        assert_eq!(report.skipped_by_reason.total(), 5);
        let sampled: Vec<String> = walk
            .sample
            .into_sorted()
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(sampled, ["1", "8"]);
    }

    /// The sample keeps at most the number asked for, whatever the number eligible.
    #[test]
    fn the_walk_samples_at_most_the_size_asked() {
        let spec = spec();
        let options = options(Some(3));
        let mut report = SyncReport::new(&spec, &options);
        let mut walk = Walk::new(&spec, &options);
        for k in 0..10 {
            let key = k.to_string();
            let fp = spec.fingerprint(&values(&format!("{key}@x.co"), "pro"));
            let email = format!("{key}@x.co");
            feed(
                &mut walk,
                &mut report,
                &spec,
                vec![(row(&key, Some((&email, "pro")), Some(&fp)), 1)],
            );
        }
        assert_eq!(report.eligible, 10);
        assert_eq!(walk.sample.len(), 3);
    }

    /// Hands the walk what the decider makes of `groups` (each row `n` times: a duplicate key).
    fn feed(
        walk: &mut Walk,
        report: &mut SyncReport,
        spec: &SyncSpec,
        groups: Vec<(DiffRow, usize)>,
    ) {
        let mut decider = Decider::new(spec, 0);
        for (row, n) in groups {
            for _ in 0..n {
                for decided in decider.push(row.clone()) {
                    walk.consider(report, decided);
                }
            }
        }
        if let Some(decided) = decider.finish() {
            walk.consider(report, decided);
        }
    }

    fn candidate(spec: &SyncSpec, key: &str, plan: &str) -> Candidate {
        let v = values(&format!("{key}@x.co"), plan);
        let fingerprint = spec.fingerprint(&v);
        let confirmed = loopsync_transformer::verify::confirmed(
            spec,
            key,
            &fingerprint,
            v,
            Some(format!("{key}@x.co")),
            None,
        )
        .unwrap();
        Candidate {
            fingerprint,
            confirmed,
        }
    }

    /// A contact that agrees is checked and not drifted; one that differs, or is missing, is
    /// drifted, each difference reported with the record's identifiers and in words.
    #[test]
    fn reads_are_compared_with_what_loops_confirmed() {
        let spec = spec();
        let mut report = SyncReport::new(&spec, &options(None));
        let same = serde_json::json!({"id": "c1", "email": "1@x.co", "planName": "pro"});
        let other = serde_json::json!({"id": "c2", "email": "2@x.co", "planName": "gold"});
        let one = candidate(&spec, "1", "pro");
        let two = candidate(&spec, "2", "pro");
        let three = candidate(&spec, "3", "pro");
        assert!(!record_read(
            &spec,
            &mut report,
            "1".into(),
            &one,
            Some(&same)
        ));
        assert!(record_read(
            &spec,
            &mut report,
            "2".into(),
            &two,
            Some(&other)
        ));
        assert!(record_read(&spec, &mut report, "3".into(), &three, None));
        assert_eq!(report.checked, 3);
        assert_eq!(report.checked_keys, ["1", "2", "3"]);
        assert_eq!(report.drifted, 2);
        let drifts: Vec<(&str, DriftKind, &str)> = report
            .drifts
            .iter()
            .map(|d| (d.key.as_str(), d.drift.kind, d.text.as_str()))
            .collect();
        assert_eq!(
            drifts,
            [
                (
                    "2",
                    DriftKind::Property,
                    "planName is \"gold\" in Loops, \"pro\" confirmed"
                ),
                ("3", DriftKind::Missing, "not in Loops"),
            ]
        );
        assert_eq!(report.drifts[0].email.as_deref(), Some("2@x.co"));
    }

    /// With `--key`, the keys met as confirmed records are verified; the others are named, in
    /// key order, once each, and make the report unclean.
    #[test]
    fn keys_asked_for_and_not_confirmed_are_named() {
        let seen: std::collections::HashSet<String> = ["2".to_owned()].into();
        let asked: Vec<String> = ["9", "2", "10", "9"]
            .iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(not_confirmed(&asked, &seen), ["10", "9"]);
        assert!(not_confirmed(&[], &seen).is_empty());
        let spec = spec();
        let mut report = Report::new();
        report.push(SyncReport {
            not_confirmed: vec!["9".into()],
            ..SyncReport::new(&spec, &options(None))
        });
        assert!(!report.is_clean());
    }

    /// Only Loops' refusal of the query itself leaves the record unreadable; anything else
    /// ends the verification.
    #[test]
    fn only_a_refused_query_is_unreadable() {
        let refused = ReadError::Loops(LoopsError::Invalid {
            message: "bad email".into(),
        });
        assert!(refused.is_refusal());
        assert_eq!(chain(&refused), "invalid request (400): bad email");
        assert!(ReadError::Loops(LoopsError::Usage("no identifier".into())).is_refusal());
        assert!(!ReadError::Loops(LoopsError::Transport("reset".into())).is_refusal());
        assert!(
            !ReadError::Loops(LoopsError::Unauthorized {
                message: "revoked".into()
            })
            .is_refusal()
        );
        assert!(!ReadError::Other("the budget is gone".into()).is_refusal());
    }

    /// The exit status rule: clean only without drift and without unreadable records.
    #[test]
    fn a_report_is_clean_without_drift_or_unreadable_records() {
        let spec = spec();
        let mut report = Report::new();
        report.push(SyncReport::new(&spec, &options(None)));
        assert!(report.is_clean());
        let mut unreadable = SyncReport::new(&spec, &options(None));
        unreadable.unreadable.push(Unreadable {
            key: "1".into(),
            error: "refused".into(),
        });
        report.push(unreadable);
        assert!(!report.is_clean());
        let mut drifted = Report::new();
        drifted.push(SyncReport {
            drifted: 1,
            checked: 4,
            skipped: 2,
            ..SyncReport::new(&spec, &options(None))
        });
        assert!(!drifted.is_clean());
        assert_eq!(
            (drifted.checked, drifted.drifted, drifted.skipped),
            (4, 1, 2)
        );
    }

    /// The `--json` shape of a drift: the drift's fields flattened beside the record's.
    #[test]
    fn a_drift_kind_serialises_by_name() {
        let d = DriftReport {
            key: "7".into(),
            email: Some("b@x.co".into()),
            user_id: None,
            text: "not in Loops".into(),
            drift: Drift {
                kind: DriftKind::Missing,
                field: None,
                loops: None,
                confirmed: None,
            },
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"key": "7", "email": "b@x.co", "user_id": null, "kind": "missing",
                               "field": null, "loops": null, "confirmed": null,
                               "text": "not in Loops"})
        );
    }
}
