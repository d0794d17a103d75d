//! `loopsync verify`: reads confirmed contacts back from Loops (`GET /v1/contacts/find`, each
//! request through the team's rate budget) and reports where Loops drifted from what the state
//! says it confirmed; `--repair` makes the next run re-send the drifted records.
//!
//! The reasoning is in `loopsync_transformer::verify` (pure, unit-tested); this module walks the
//! diff with the extractor's decider, reads Loops, and prints.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use loopsync_bus::RateBudget;
use loopsync_core::envelope::{ChangeKind, RequestCounts};
use loopsync_core::spec::SyncSpec;
use loopsync_extractor::{Decision, KeyGroups, decide_group};
use loopsync_loops_client::{ContactIdentity, LoopsClient, LoopsError};
use loopsync_transformer::verify::{Confirmed, Drift, Lookup, Sample, compare, rank};
use loopsync_warehouse::{FORGOTTEN_FP, Warehouse};
use serde::Serialize;
use serde_json::Value;

use crate::load_config_for;
use crate::pipeline::{Pipeline, with_retries};

/// The version of the `--json` report.
const REPORT_VERSION: u16 = 1;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this sync.
    #[arg(long)]
    sync: Option<String>,
    /// Confirmed records to read back per sync: a number, or `all` (also `0`).
    #[arg(long, default_value = "100", value_parser = parse_sample)]
    sample: SampleSize,
    /// Picks another deterministic sample (records are ranked by a hash of seed, sync and key).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Forget the confirmed state of each drifted record, so the next run re-sends it.
    #[arg(long)]
    repair: bool,
    #[arg(long)]
    json: bool,
}

/// `--sample`: `None` is every record.
#[derive(Debug, Clone, Copy)]
struct SampleSize(Option<usize>);

fn parse_sample(text: &str) -> Result<SampleSize, String> {
    match text.trim() {
        "all" | "0" => Ok(SampleSize(None)),
        t => t
            .parse::<usize>()
            .map(|n| SampleSize(Some(n)))
            .map_err(|_| format!("`{t}` is neither a number of records nor `all`")),
    }
}

/// Confirmed records not verified, by why.
#[derive(Debug, Default, Clone, Serialize)]
struct Skipped {
    /// The model row changed since Loops confirmed it: the next run sends it.
    changed: u64,
    /// Forgotten by `verify --repair`: the next run re-sends it.
    repaired: u64,
    /// Gone from the model: its values are unknown (mirror removes it, upsert keeps it).
    removed: u64,
    /// Parked by `loopsync dlq park`.
    parked: u64,
    /// A run would not send it (a duplicated key or email, a value the transformer refuses).
    invalid: u64,
}

impl Skipped {
    fn total(&self) -> u64 {
        self.changed + self.repaired + self.removed + self.parked + self.invalid
    }
}

/// One drift of one record.
#[derive(Debug, Serialize)]
struct DriftReport {
    key: String,
    email: Option<String>,
    user_id: Option<String>,
    #[serde(flatten)]
    drift: Drift,
    /// In words: `planName is "gold" in Loops, "pro" confirmed`.
    text: String,
}

/// A record Loops could not be asked about (Loops refused the query).
#[derive(Debug, Serialize)]
struct Unreadable {
    key: String,
    error: String,
}

/// The verification of one sync.
#[derive(Debug, Serialize)]
struct SyncReport {
    sync: String,
    /// Records per sync asked for; `null`: all.
    sample: Option<usize>,
    seed: u64,
    /// Records whose state holds a version Loops confirmed.
    confirmed: u64,
    /// Of them, those whose model row is still at that version: what can be verified.
    eligible: u64,
    /// Records read back from Loops and compared.
    checked: u64,
    /// Their keys, in key order.
    checked_keys: Vec<String>,
    /// Of `checked`, records with at least one drift.
    drifted: u64,
    /// `confirmed - eligible`: not verified; `skipped_by_reason` says why.
    skipped: u64,
    skipped_by_reason: Skipped,
    /// Records whose read Loops refused (4xx); not in `checked`.
    unreadable: Vec<Unreadable>,
    /// Requests sent to Loops (`GET /v1/contacts/find`, retries included).
    requests: u64,
    rate_limited: u64,
    /// With `--repair`: drifted records whose confirmation was forgotten (the next run
    /// re-sends them); `null` without.
    repaired: Option<u64>,
    /// What the reader should know about this sync's repair, if anything.
    note: Option<String>,
    drifts: Vec<DriftReport>,
}

/// `verify --json`.
#[derive(Debug, Serialize)]
struct Report {
    v: u16,
    checked: u64,
    drifted: u64,
    skipped: u64,
    syncs: Vec<SyncReport>,
}

/// A record to read back: the version verified and what Loops confirmed of it.
struct Candidate {
    fingerprint: String,
    confirmed: Confirmed,
}

pub async fn run(config_path: &Path, args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let config = load_config_for(config_path, args.sync.as_deref())?;
    // The bus, the warehouse and the team's rate budget, as a run has them; no worker starts.
    let pipeline = Pipeline::connect(config).await?;
    let client = pipeline.loops_client()?;
    let mut report = Report {
        v: REPORT_VERSION,
        checked: 0,
        drifted: 0,
        skipped: 0,
        syncs: Vec::new(),
    };
    let result = async {
        for sync in &pipeline.config.syncs {
            let spec = &sync.spec;
            if args.sync.as_ref().is_some_and(|n| *n != spec.name) {
                continue;
            }
            let one = verify_sync(
                &*pipeline.warehouse,
                &client,
                (&pipeline.budget, pipeline.config.loops.max_attempts),
                pipeline.config.loops.concurrency.max(1),
                spec,
                &args,
            )
            .await
            .with_context(|| format!("verifying sync {}", spec.name))?;
            report.checked += one.checked;
            report.drifted += one.drifted;
            report.skipped += one.skipped;
            report.syncs.push(one);
        }
        anyhow::Ok(())
    }
    .await;
    pipeline.stop().await;
    result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    let clean = report.drifted == 0 && report.syncs.iter().all(|s| s.unreadable.is_empty());
    Ok(ExitCode::from(if clean { 0 } else { crate::EXIT_FAILED }))
}

async fn verify_sync(
    warehouse: &dyn Warehouse,
    client: &LoopsClient,
    (budget, attempts): (&RateBudget, u32),
    concurrency: usize,
    spec: &SyncSpec,
    args: &VerifyArgs,
) -> anyhow::Result<SyncReport> {
    let mut report = SyncReport {
        sync: spec.name.clone(),
        sample: args.sample.0,
        seed: args.seed,
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
    };
    // Walk the diff as a run would, and keep the sample of records at their confirmed version.
    let mut sample = Sample::new(args.sample.0);
    let mut rows = warehouse.diff(spec).await?;
    let mut groups = KeyGroups::default();
    let mut nulls = 0;
    let mut consider = |report: &mut SyncReport, group: (loopsync_warehouse::DiffRow, usize)| {
        if group.0.confirmed_fp.is_none() {
            // Never confirmed: nothing in Loops to compare with.
            return;
        }
        let row = group.0.clone();
        let confirmed_fp = row.confirmed_fp.unwrap_or_default();
        report.confirmed += 1;
        let skipped = &mut report.skipped_by_reason;
        match decide_group(spec, 0, group, &mut nulls) {
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
                        sample.offer(rank(args.seed, &spec.name, &key), key, candidate);
                    }
                    Err(_) => skipped.invalid += 1,
                }
            }
            Decision::Change(change) => match change.kind {
                ChangeKind::Removed => skipped.removed += 1,
                _ if confirmed_fp == FORGOTTEN_FP => skipped.repaired += 1,
                _ => skipped.changed += 1,
            },
            Decision::RemovedKept | Decision::Nothing => skipped.removed += 1,
            Decision::Parked => skipped.parked += 1,
            Decision::Invalid { .. } => skipped.invalid += 1,
        }
    };
    while let Some(row) = rows.next().await {
        for group in groups.push(row?) {
            consider(&mut report, group);
        }
    }
    if let Some(group) = groups.finish() {
        consider(&mut report, group);
    }
    drop(rows);
    report.skipped = report.skipped_by_reason.total();

    // Read them back, `concurrency` at a time, each request through the team's budget.
    let reads = futures::stream::iter(sample.into_sorted())
        .map(|(key, candidate)| async move {
            let mut counts = RequestCounts::default();
            let found = match candidate.confirmed.lookup(spec.identify_by) {
                None => {
                    Err(LoopsError::Usage("no identifier to find the contact by".into()).into())
                }
                Some(lookup) => {
                    let identity = match lookup {
                        Lookup::Email(e) => ContactIdentity::Email(e),
                        Lookup::UserId(u) => ContactIdentity::UserId(u),
                    };
                    with_retries(budget, attempts, &mut counts, || {
                        client.find_contact(&identity)
                    })
                    .await
                }
            };
            (key, candidate, found, counts)
        })
        .buffered(concurrency)
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
            // ends the command.
            Err(e) if is_refusal(&e) => {
                report.unreadable.push(Unreadable {
                    key,
                    error: format!("{e:#}"),
                });
                continue;
            }
            Err(e) => return Err(e.context(format!("reading the contact of key {key}"))),
        };
        report.checked += 1;
        report.checked_keys.push(key.clone());
        let found = found
            .map(|contact| serde_json::to_value(&contact))
            .transpose()?;
        let drifts = compare(
            spec,
            &candidate.confirmed,
            found.as_ref().and_then(Value::as_object),
        );
        if drifts.is_empty() {
            continue;
        }
        report.drifted += 1;
        drifted.push((key.clone(), candidate.fingerprint.clone()));
        for drift in drifts {
            report.drifts.push(DriftReport {
                key: key.clone(),
                email: candidate.confirmed.email.clone(),
                user_id: candidate.confirmed.user_id.clone(),
                text: drift.describe(),
                drift,
            });
        }
    }
    if args.repair {
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

/// Loops refused this query itself (400, 404, 409): the record cannot be read, the others can.
fn is_refusal(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<LoopsError>(),
        Some(
            LoopsError::Invalid { .. }
                | LoopsError::NotFound { .. }
                | LoopsError::Conflict { .. }
                | LoopsError::Usage(_)
        )
    )
}

fn print_text(report: &Report) {
    for s in &report.syncs {
        let sample = match s.sample {
            None => "all".to_owned(),
            Some(n) => n.to_string(),
        };
        println!(
            "sync {} · checked {} · drifted {} · skipped {}\n  of {} confirmed records, {} at their confirmed version · sample {sample}, seed {} · {} requests to Loops",
            s.sync, s.checked, s.drifted, s.skipped, s.confirmed, s.eligible, s.seed, s.requests
        );
        for d in &s.drifts {
            let who = match (&d.email, &d.user_id) {
                (Some(e), _) => format!(" ({e})"),
                (None, Some(u)) => format!(" (userId {u})"),
                (None, None) => String::new(),
            };
            println!("  key {}{who}: {}", d.key, d.text);
        }
        for u in &s.unreadable {
            println!("  key {}: not read: {}", u.key, u.error);
        }
        let k = &s.skipped_by_reason;
        if s.skipped > 0 {
            let reasons: Vec<String> = [
                (k.changed, "changed in the model (the next run sends them)"),
                (k.repaired, "repaired (the next run re-sends them)"),
                (k.removed, "gone from the model"),
                (k.parked, "parked"),
                (k.invalid, "invalid"),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, why)| format!("{n} {why}"))
            .collect();
            println!("  skipped: {}", reasons.join(" · "));
        }
        if let Some(n) = s.repaired {
            if n > 0 {
                println!(
                    "  repaired: forgot what Loops confirmed for {n} drifted record{}: the next run re-sends {}",
                    if n == 1 { "" } else { "s" },
                    if n == 1 { "it" } else { "them" }
                );
            } else if s.drifted > 0 {
                println!("  repaired: nothing to forget (a run confirmed them again meanwhile)");
            }
        } else if s.drifted > 0 {
            println!("  (loopsync verify --repair makes the next run re-send the drifted records)");
        }
        if let Some(note) = &s.note {
            println!("  note: {note}");
        }
    }
    if report.syncs.is_empty() {
        println!("no sync to verify");
    }
}

#[cfg(test)]
mod tests {
    use loopsync_transformer::verify::DriftKind;

    use super::*;

    #[test]
    fn sample_sizes() {
        assert_eq!(parse_sample("all").unwrap().0, None);
        assert_eq!(parse_sample("0").unwrap().0, None);
        assert_eq!(parse_sample("25").unwrap().0, Some(25));
        assert!(parse_sample("-1").is_err());
        assert!(parse_sample("some").is_err());
    }

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
