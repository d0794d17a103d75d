//! `loopsync adopt`: records the model's current rows as already in Loops, without sending
//! anything — for a sync that takes over from another tool, or an event sync that starts from
//! now (its current rows count as sent; with a cursor, its watermark is their highest value). The next run sends only what changes
//! after. (A million contacts re-sent at 10 requests per second would cost 28 hours.) The sync's
//! state is then bound to the Loops the caller names: also the way forward for a sync pointed at
//! another Loops that holds its contacts.
//!
//! The keys are decided by the extractor's [`Decider`], and the identity recorded for each
//! (email, userId) is the one [`transform`] would send: adopted state cannot drift from what a
//! run would have confirmed.
//!
//! With Loops' audience export (`--from-loops-export`, after a CSV upload), only the records
//! the state has never held whose contact in the file is exactly what the run would write are
//! adopted (`verify`'s comparison, [`View::holds`]); the others stay for the API lane, counted
//! by reason. With the list of records `loopsync export` put in the upload's files
//! (`--exported DIR`), those of them not adopted — a row that left before the upload, or changed
//! — whose contact in the file is their upload are noted as possibly in Loops, as a create whose
//! answer was lost is: under mirror the next run takes out what the upload made for them.

use std::sync::Arc;

use futures::StreamExt;
use loopsync_bus::RateBudget;
use loopsync_config::Config;
use loopsync_core::destination::Destination;
use loopsync_core::envelope::{ChangeKind, Operation, RequestCounts};
use loopsync_core::spec::{IdentifyBy, SyncSpec};
use loopsync_extractor::decide::unchanged_note;
use loopsync_extractor::{Decided, Decider, Decision, Window};
use loopsync_loops_client::{ContactIdentity, LoopsClient};
use loopsync_transformer::transform;
use loopsync_transformer::verify::{Confirmed, Lookup, compare};
use loopsync_warehouse::{
    Adoption, DestinationBinding, DiffRow, Emitted, ExtractCounts, RunStatus, RunSummary,
    Unchanged, Warehouse, WarehouseError,
};

use crate::bulk::audience::{LoopsExport, View};
use crate::bulk::export::{RecordsHeader, Uploaded, read_records_file};
use crate::bulk::{BulkError, check_for_files};
use crate::pipeline::loops_client;
use crate::retry::with_retries;
use crate::{EngineError, destination};

/// Why `adopt_all` failed.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Reading Loops' audience export, or a sync a file cannot adopt.
    #[error(transparent)]
    Bulk(#[from] BulkError),
    /// Comparing what the earlier Loops confirmed with the file, when the state moves.
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
}

impl From<WarehouseError> for AdoptError {
    fn from(e: WarehouseError) -> AdoptError {
        AdoptError::Engine(e.into())
    }
}

impl loopsync_core::Classified for AdoptError {
    fn class(&self) -> loopsync_core::ErrorClass {
        match self {
            AdoptError::Engine(e) => e.class(),
            AdoptError::Bulk(e) => e.class(),
            AdoptError::Verify(e) => e.class(),
        }
    }
}

/// Records adopted per warehouse round trip.
const BATCH: usize = 1000;

/// What adopting one sync did.
#[derive(Debug, Clone, PartialEq)]
pub struct AdoptReport {
    /// The sync adopted.
    pub sync: String,
    /// The run that records the adoption (status `adopted`).
    pub run_id: i64,
    /// The model's rows: `added` and `changed` were adopted (new to the sync, or changed since
    /// Loops last confirmed them); `unchanged` already were; `invalid_rows` were not adopted.
    /// (`expected` means nothing here: an adoption sends nothing.)
    pub counts: ExtractCounts,
    /// Records not adopted: invalid to the extractor or refused by the transformer.
    pub invalid: i64,
    /// With Loops' audience export: records a run would write whose contact in the file is not
    /// that write, by reason; not adopted, the next run sends them.
    pub not_adopted: std::collections::BTreeMap<&'static str, u64>,
    /// With the records `loopsync export` put in the upload's files: those not adopted, noted as
    /// possibly in Loops (the next run makes sure of them, and under mirror takes out what the
    /// upload made for a row that left or changed its identity).
    pub uploaded_in_doubt: u64,
    /// With Loops' audience export, when the adoption moves the state to another Loops:
    /// records confirmed in the earlier one whose contact the file does not hold as confirmed,
    /// forgotten (as `verify --repair` forgets); the next run sends them.
    pub forgotten: u64,
    /// The destination the sync's state was bound to before (now it is bound to the one given).
    pub earlier: Option<DestinationBinding>,
    /// The adoption's run, as `loopsync runs` shows it.
    pub summary: Option<RunSummary>,
}

/// `loopsync adopt`: asks which team the API key belongs to (`GET /v1/api-key`, the one
/// request adopt makes, through the team's rate budget and counted with the first adoption),
/// then adopts each sync of `config` (or only `only`) as confirmed by that destination, on
/// `state`, handing each report to `each` as it is done. `on_run` is told each run's id as
/// soon as it exists. `exported`: the folder `loopsync export` wrote the uploaded files to,
/// whose records file lists the records they may have created.
pub async fn adopt_all(
    config: &Config,
    state: &Arc<dyn Warehouse>,
    only: Option<&str>,
    from_file: Option<&LoopsExport>,
    exported: Option<&std::path::Path>,
    mut on_run: impl FnMut(i64),
    mut each: impl FnMut(&AdoptReport, &Destination),
) -> Result<Vec<AdoptReport>, AdoptError> {
    let warehouse = &**state;
    let client = loops_client(config)?;
    // The team's budget, shared with a `run` or workers beside it.
    let budget = crate::budget::connect(config, state).await?;
    let mut preflight = RequestCounts::default();
    let configured =
        destination::configured(&client, &budget, config.loops.max_attempts, &mut preflight)
            .await?;
    let key_fingerprint = destination::key_fingerprint(warehouse, &config.loops.api_key).await?;
    let selected = || {
        config
            .syncs
            .iter()
            .map(|s| &s.spec)
            .filter(|spec| only.is_none_or(|n| n == spec.name))
    };
    // Every sync's records file read and checked before anything is adopted or forgotten.
    let mut uploads = std::collections::HashMap::new();
    if let Some(dir) = exported {
        for spec in selected() {
            let (header, records) = read_records_file(dir, &spec.name)?;
            check_records(warehouse, spec, &header).await?;
            uploads.insert(spec.name.clone(), records);
        }
    }
    let mut reports = Vec::new();
    for spec in selected() {
        let view = match from_file {
            Some(file) => {
                check_for_files(spec)?;
                let view = file.view(spec)?;
                check_sample(
                    warehouse,
                    spec,
                    &view,
                    &client,
                    &budget,
                    config.loops.max_attempts,
                    &mut preflight,
                )
                .await?;
                Some(view)
            }
            None => None,
        };
        let forgotten = match from_file {
            Some(file) => {
                forget_what_the_file_lacks(warehouse, spec, file, &configured, &key_fingerprint)
                    .await?
            }
            None => 0,
        };
        let uploaded = uploads.remove(&spec.name).unwrap_or_default();
        let mut report = adopt(
            warehouse,
            spec,
            &configured,
            &key_fingerprint,
            std::mem::take(&mut preflight),
            view.as_ref(),
            uploaded,
            &mut on_run,
        )
        .await?;
        report.forgotten = forgotten;
        each(&report, &configured);
        reports.push(report);
    }
    Ok(reports)
}

/// Adopts `spec`'s model as confirmed by `destination`: a run of status `adopted` records each
/// valid record's fingerprint and identity, then the sync's state is bound to `destination` and
/// the API key of `key_fingerprint`.
/// `preflight`: the requests the caller made to Loops for it (recorded with the run).
/// `on_run` is told the run's id as soon as it exists (so the caller can close it if stopped).
/// `uploaded`: the records an upload of `loopsync export`'s files may have created; those not
/// adopted, that the state did not hold and whose contact `against` has, are noted as possibly
/// in Loops, with the identity they were uploaded with.
#[allow(clippy::too_many_arguments)]
pub async fn adopt(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    destination: &Destination,
    key_fingerprint: &str,
    preflight: RequestCounts,
    against: Option<&View<'_>>,
    uploaded: Vec<Uploaded>,
    on_run: impl FnOnce(i64),
) -> Result<AdoptReport, WarehouseError> {
    let run_id = warehouse.create_run(&spec.name).await?;
    on_run(run_id);
    warehouse.claim_run(run_id, false).await?;
    if !preflight.is_empty() {
        warehouse.record_preflight(run_id, &preflight).await?;
    }
    let mut decider = Decider::new(spec, run_id);
    let mut invalid = 0;
    let mut not_adopted = std::collections::BTreeMap::new();
    let mut batch: Vec<Adoption> = Vec::new();
    // Rows adopted or found unchanged, noted after the batch: later diffs leave them out.
    let mut notes: Vec<Unchanged> = Vec::new();
    // The uploaded records still to settle: a key adopted, or that the state held, leaves.
    let mut pending: std::collections::HashMap<String, Uploaded> =
        uploaded.into_iter().map(|u| (u.key.clone(), u)).collect();
    // With an upload's records, every key the state holds must be seen (to be left alone):
    // the whole diff, not only the rows that changed since they were noted.
    let mut rows = if pending.is_empty() {
        warehouse.diff_changes(spec, None).await?
    } else {
        warehouse.diff(spec).await?
    };
    loop {
        let (pushed, last) = match rows.next().await {
            Some(row) => (Some(decider.push(row?)), None),
            None => (None, decider.finish()),
        };
        let done = pushed.is_none();
        for Decided { row, decision } in pushed.into_iter().flatten().chain(last) {
            // A record the state holds (confirmed, in doubt, or removed: a generation) has its
            // own doubt: the upload's is not noted over it.
            if !pending.is_empty()
                && (row.confirmed_fp.is_some() || row.unsure || row.generation != 0)
                && let Some(key) = &row.key
            {
                pending.remove(key);
            }
            match decision {
                // An event sync's row sent before and changed since: adopted as it is now.
                Decision::AlreadySent { key, fingerprint } => {
                    batch.push(Adoption {
                        key,
                        fingerprint,
                        email: row.confirmed_email,
                        user_id: row.confirmed_user_id,
                        unchanged: None,
                    });
                }
                Decision::Unchanged => {
                    notes.extend(unchanged_note(spec, &row, row.confirmed_fp.as_deref()));
                }
                Decision::Change(change) if change.kind != ChangeKind::Removed => {
                    match transform(spec, &change) {
                        Ok(op) => {
                            if let Some(Err(why)) = against.map(|file| file_proves(file, &row, &op))
                            {
                                *not_adopted.entry(why).or_insert(0) += 1;
                                continue;
                            }
                            let (email, user_id) = op.action.identity();
                            batch.push(Adoption {
                                unchanged: unchanged_note(spec, &row, Some(&change.fingerprint))
                                    .map(|n| (n.model_hash, n.email)),
                                key: change.key,
                                fingerprint: change.fingerprint,
                                email: email.map(str::to_owned),
                                user_id: user_id.map(str::to_owned),
                            });
                        }
                        // What the transformer refuses is not in Loops either: not adopted.
                        Err(_) => {
                            invalid += 1;
                            decider.count_as_invalid(&change);
                        }
                    }
                }
                Decision::Invalid { .. } => invalid += 1,
                _ => {}
            }
        }
        if batch.len() >= BATCH || notes.len() >= BATCH || done {
            for adopted in &batch {
                pending.remove(&adopted.key);
            }
            warehouse.adopt(&spec.name, run_id, &batch).await?;
            batch.clear();
            warehouse.note_unchanged(&spec.name, &notes).await?;
            notes.clear();
        }
        if done {
            break;
        }
    }
    drop(rows);
    let uploaded_in_doubt =
        note_uploaded_in_doubt(warehouse, spec, run_id, pending, against).await?;
    let mut counts = decider.into_counts();
    // An adopted event sync starts from now: its watermark is its highest row, never later.
    Window::everything(spec).close(&mut counts);
    warehouse.finish_adopt(run_id, &counts).await?;
    // Bound last: a sync whose adoption did not finish is still refused by the new
    // destination, so adopt is run again rather than a run sending a partial difference.
    let earlier = warehouse.destination(&spec.name).await?;
    warehouse
        .set_destination(&spec.name, destination, key_fingerprint)
        .await?;
    let summary = warehouse.run(run_id).await?;
    Ok(AdoptReport {
        sync: spec.name.clone(),
        run_id,
        counts,
        invalid,
        not_adopted,
        uploaded_in_doubt,
        forgotten: 0,
        earlier,
        summary,
    })
}

/// A marker in place of a fingerprint: the version an upload of `loopsync export`'s files may
/// have written (the state keeps no values, and the next run sends the row whatever it is).
pub const UPLOADED: &str = "uploaded";

/// Notes, as published with the identity they were uploaded with and in doubt, the records of
/// `pending` (uploaded, not adopted, not held by the state) whose contact in Loops' audience
/// export `against`, at that identity, is what they were uploaded as (`verify`'s comparison):
/// the upload made or wrote that contact. The next run treats each as a create whose answer
/// was lost — it writes a row that is still there, and under mirror removes the contact of a
/// row that left (reading first whether it exists) or the one left at an identity the row no
/// longer has. A record the file has no contact for (its row failed, or its file was not
/// uploaded) is not noted, nor one whose contact differs (edited in Loops since, or someone
/// else's): that contact is no write of the sync's. Returns how many were noted.
async fn note_uploaded_in_doubt(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    run_id: i64,
    pending: std::collections::HashMap<String, Uploaded>,
    against: Option<&View<'_>>,
) -> Result<u64, WarehouseError> {
    let Some(file) = against else {
        return Ok(0);
    };
    let mut pending: Vec<Uploaded> = pending.into_values().collect();
    pending.sort_by(|a, b| a.key.cmp(&b.key));
    let doubtful: Vec<Emitted> = pending
        .into_iter()
        .filter_map(|u| {
            let (email, user_id) = u.action.identity();
            let (email, user_id) = (email.map(str::to_owned), user_id.map(str::to_owned));
            let lookup = match spec.identify_by {
                IdentifyBy::Email => email.clone().map(Lookup::Email),
                IdentifyBy::UserId => user_id.clone().map(Lookup::UserId),
            }?;
            // The contact there is the upload's write (as `verify` compares), not one that
            // merely has its email.
            let confirmed = Confirmed::from_action(&u.action)?;
            let found = file.find(&lookup).ok()??;
            compare(spec, &confirmed, Some(&found))
                .is_empty()
                .then(|| Emitted {
                    key: u.key,
                    fingerprint: UPLOADED.to_owned(),
                    email: email.clone(),
                    user_id: user_id.clone(),
                    unsubscribes: false,
                    possibly_applied: vec![loopsync_core::envelope::OldContact { email, user_id }],
                })
        })
        .collect();
    for chunk in doubtful.chunks(BATCH) {
        warehouse.mark_emitted_as(&spec.name, run_id, chunk).await?;
    }
    Ok(doubtful.len() as u64)
}

/// Refuses `adopt --exported`'s records file unless it was written for `spec` from this state
/// (or before it existed), and no run but adoptions has been since: a run may have settled
/// what it lists (a removal, a confirmation), and the file would note it in doubt again.
async fn check_records(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    header: &RecordsHeader,
) -> Result<(), AdoptError> {
    let refuse = |why: String| BulkError::RecordsRefused {
        sync: spec.name.clone(),
        why,
    };
    if header.sync != spec.name {
        return Err(refuse(format!(
            "the records file beside the upload's files is sync {}'s",
            header.sync
        ))
        .into());
    }
    if let Some(installation) = &header.installation
        && *installation != warehouse.installation().await?
    {
        return Err(refuse(
            "the records file beside the upload's files was written from another state".into(),
        )
        .into());
    }
    let since = warehouse.runs(Some(&spec.name), 10_000).await?;
    if let Some(run) = since.iter().find(|r| {
        header.after_run.is_none_or(|after| r.id > after) && r.status != RunStatus::Adopted
    }) {
        return Err(refuse(format!(
            "run {} came after the export: the records file no longer says what the upload may \
             have left in doubt (adopt without --exported, or export again)",
            run.id
        ))
        .into());
    }
    Ok(())
}

/// Records of a file read back from the configured Loops before the first adoption.
const SAMPLE: usize = 5;

/// Ties Loops' audience export to the configured Loops before anything is adopted from it:
/// refuses a file without a lists column (Loops' export has one; the file `loopsync export`
/// writes for the upload has none), then reads back from Loops (`contacts/find`, through the
/// team's budget and retried as the API-key read-back is; counted in `counts`, the
/// adoption's preflight) up to [`SAMPLE`] of the records the file would adopt, and refuses the
/// file if any is missing or differs there: it is the export of another team, or no export.
async fn check_sample(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    file: &View<'_>,
    client: &LoopsClient,
    budget: &RateBudget,
    attempts: u32,
    counts: &mut RequestCounts,
) -> Result<(), AdoptError> {
    let refuse = |why: String| BulkError::NotThisLoops {
        sync: spec.name.clone(),
        why,
    };
    if !file.has_lists() {
        return Err(refuse(
            "the file has no Mailing Lists column: it is not Loops' audience export (the file \
             `loopsync export` writes for the upload has none)"
                .into(),
        )
        .into());
    }
    // The first records the file would adopt, as the adoption walks them.
    let mut sample = Vec::new();
    let mut decider = Decider::new(spec, 0);
    let mut rows = warehouse.diff_changes(spec, None).await?;
    let mut done = false;
    while sample.len() < SAMPLE && !done {
        let decided: Vec<Decided> = match rows.next().await {
            Some(row) => decider.push(row?).collect(),
            None => {
                done = true;
                decider.finish().into_iter().collect()
            }
        };
        for Decided { row, decision } in decided {
            if let Decision::Change(change) = decision
                && change.kind != ChangeKind::Removed
                && let Ok(op) = transform(spec, &change)
                && file_proves(file, &row, &op).is_ok()
                && let Some(confirmed) = Confirmed::from_action(&op.action)
            {
                sample.push(confirmed);
            }
        }
    }
    drop(rows);
    sample.truncate(SAMPLE);
    let mut differ = 0;
    for confirmed in &sample {
        let identity = match confirmed.lookup(spec.identify_by) {
            Some(Lookup::Email(e)) => ContactIdentity::Email(e),
            Some(Lookup::UserId(u)) => ContactIdentity::UserId(u),
            // `file_proves` adopts none without an identifier.
            None => continue,
        };
        let found =
            with_retries(budget, attempts, counts, || client.find_contact(&identity)).await?;
        let found = found.and_then(|c| match serde_json::to_value(&c) {
            Ok(serde_json::Value::Object(contact)) => Some(contact),
            _ => None,
        });
        if !compare(spec, confirmed, found.as_ref()).is_empty() {
            differ += 1;
        }
    }
    if differ > 0 {
        return Err(refuse(format!(
            "{differ} of {} records the file would adopt, read back from the configured Loops, \
             are missing or differ there: the file does not match the Loops the sync is bound \
             to (another team's export, or not an export)",
            sample.len()
        ))
        .into());
    }
    Ok(())
}

/// When adopting from `file` moves `spec`'s state to another Loops than the one it is bound
/// to: what the earlier Loops confirmed says nothing of the new one, and a file adopts only
/// records the state never held, so every record confirmed before is compared with the file
/// (`verify --from-loops-export --repair`) and those it does not hold as confirmed are
/// forgotten: the next run sends them. Returns how many were forgotten.
async fn forget_what_the_file_lacks(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    file: &LoopsExport,
    configured: &Destination,
    key_fingerprint: &str,
) -> Result<u64, AdoptError> {
    let moved = warehouse
        .destination(&spec.name)
        .await?
        .is_some_and(|bound| {
            crate::destination::verdict(&bound, configured, key_fingerprint)
                == crate::destination::Verdict::Elsewhere
        });
    if !moved {
        return Ok(0);
    }
    let options = crate::verify::Options {
        repair: true,
        ..crate::verify::Options::default()
    };
    let report = crate::bulk::verify_against(
        warehouse,
        &[spec],
        Some(&spec.name),
        &options,
        file,
        &|_, _, _| {},
    )
    .await
    .map_err(|e| match e {
        crate::bulk::VerifyAgainstError::Bulk(e) => AdoptError::Bulk(e),
        crate::bulk::VerifyAgainstError::Verify(e) => AdoptError::Verify(e),
    })?;
    Ok(report.syncs.iter().filter_map(|s| s.repaired).sum())
}

/// Whether Loops' audience export proves that Loops holds `op`, the write of `row`: only for
/// a record the state has never held (no change of it ever confirmed, no send of it in doubt,
/// nothing confirmed), whose contact in the file is that write ([`View::holds`]). A file says
/// nothing of when it was taken: a record the API lane wrote (or removed) since may hold
/// something newer in Loops than the file shows, so it stays the API lane's. `Err`: why not,
/// in a few words (the reasons the report counts by).
fn file_proves(file: &View<'_>, row: &DiffRow, op: &Operation) -> Result<(), &'static str> {
    if row.generation != 0 || row.unsure || row.confirmed_fp.is_some() {
        return Err("held by the state before: the API lane's");
    }
    file.holds(op)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use loopsync_bus::{LocalBus, Messaging, Names};
    use loopsync_core::envelope::{RunRequest, VERSION};
    use loopsync_core::stage::Stage;
    use loopsync_extractor::ExtractorStage;

    use super::*;
    use crate::plan::tests::plan_all;
    use crate::testing::{Model, spec};

    fn loops() -> Destination {
        Destination::new(Some("team".into()), "http://127.0.0.1:1/api")
    }

    async fn adopt_model(model: &Model, spec: &SyncSpec) -> AdoptReport {
        adopt(
            &*model.warehouse,
            spec,
            &loops(),
            "k1",
            RequestCounts::default(),
            None,
            Vec::new(),
            |_| {},
        )
        .await
        .unwrap()
    }

    /// After adopt a plan has nothing to send; a row changed after is the one change planned.
    #[tokio::test]
    async fn after_adopt_a_plan_sends_only_what_changed() {
        let model = Model::new().await;
        model.insert(&[
            (Some("1"), Some("a@x.co"), None),
            (Some("2"), Some("b@x.co"), None),
            (Some("3"), None, None),
        ]);
        let spec = spec();
        let mut told = None;
        let report = adopt(
            &*model.warehouse,
            &spec,
            &loops(),
            "k1",
            RequestCounts::default(),
            None,
            Vec::new(),
            |id| told = Some(id),
        )
        .await
        .unwrap();
        assert_eq!(told, Some(report.run_id));
        assert_eq!(
            (
                report.counts.added,
                report.counts.invalid_rows,
                report.invalid
            ),
            (2, 1, 1),
            "the row without an email is not adopted"
        );
        assert_eq!(report.earlier, None);
        assert_eq!(
            report.summary.as_ref().map(|s| s.status.as_str()),
            Some("adopted")
        );
        assert_eq!(
            model
                .warehouse
                .destination("s")
                .await
                .unwrap()
                .map(|b| b.destination),
            Some(loops())
        );

        let (plan, records) = plan_all(&*model.warehouse, &spec).await;
        assert_eq!(
            (plan.requests, plan.counts.unchanged),
            (0, 2),
            "{records:?}"
        );
        assert_eq!(records.len(), 1, "only the invalid row: {records:?}");

        model.execute("UPDATE users SET email = 'b2@x.co' WHERE id = '2'");
        let (plan, records) = plan_all(&*model.warehouse, &spec).await;
        let changed: Vec<_> = records
            .iter()
            .filter(|r| r.change != crate::plan::PlannedChange::Invalid)
            .map(|r| (r.key.as_str(), r.change.as_str()))
            .collect();
        assert_eq!(changed, [("2", "changed")]);
        assert_eq!((plan.requests, plan.counts.unchanged), (1, 1));

        let again = adopt_model(&model, &spec).await;
        assert_eq!(
            again.earlier.map(|b| b.destination),
            Some(loops()),
            "bound by the first adoption"
        );
        assert_eq!((again.counts.changed, again.counts.unchanged), (1, 1));
    }

    /// The identity recorded is what `transform` would send: a blank userId is no userId, an
    /// email is normalized. (The old adopt recorded `Some("")` for the blank userId.)
    #[tokio::test]
    async fn adopt_records_the_identity_transform_sends() {
        let model = Model::new().await;
        model.insert(&[
            (Some("1"), Some(" A@X.co "), Some("  ")),
            (Some("2"), Some("b@x.co"), Some(" u2 ")),
        ]);
        let spec = spec();
        adopt_model(&model, &spec).await;
        let mut rows = model.warehouse.diff(&spec).await.unwrap();
        let mut confirmed = Vec::new();
        while let Some(row) = rows.next().await {
            let row = row.unwrap();
            confirmed.push((row.key.unwrap(), row.confirmed_email, row.confirmed_user_id));
        }
        assert_eq!(
            confirmed,
            [
                ("1".to_owned(), Some("a@x.co".to_owned()), None),
                (
                    "2".to_owned(),
                    Some("b@x.co".to_owned()),
                    Some("u2".to_owned())
                ),
            ]
        );
    }

    /// After adopt, a run's extraction finds nothing to publish.
    #[tokio::test]
    async fn after_adopt_an_extraction_publishes_nothing() {
        let model = Model::new().await;
        model.insert(&[
            (Some("1"), Some("a@x.co"), Some("u1")),
            (Some("2"), Some("b@x.co"), Some("  ")),
        ]);
        let spec = spec();
        adopt_model(&model, &spec).await;
        let bus = Arc::new(LocalBus::new(Names::new("t")));
        let stage = ExtractorStage::new(bus.clone(), model.warehouse.clone(), [spec.clone()]);
        let run_id = model.warehouse.create_run("s").await.unwrap();
        model.warehouse.claim_run(run_id, false).await.unwrap();
        let counts = stage
            .extract(
                &spec,
                &RunRequest {
                    v: VERSION,
                    sync: "s".into(),
                    run_id,
                    only_keys: vec![],
                    installation: model.warehouse.installation().await.unwrap(),
                    allow_removals: false,
                },
            )
            .await
            .unwrap();
        assert_eq!((counts.unchanged, counts.expected), (2, 0), "{counts:?}");
        assert_eq!(bus.unsettled(Stage::Transformer).await.unwrap(), 0);
    }
}
