//! Every rule of the state, once: what a run, a record's state and an outcome become, for both
//! stores. Statements are written as for PostgreSQL, schema `loopsync`; [`Exec`] says them in
//! its store's dialect.

use loopsync_core::destination::Destination;
use loopsync_core::envelope::{ChangeKind, Outcome, OutcomeStatus, RequestCounts, is_null_key};
use loopsync_core::tuning::LEASE;

use super::{Exec, Row, params};
use crate::{
    Acceptance, Adoption, ConfirmedContact, DestinationBinding, DiffBasis, DiffKind, Emitted,
    ExtractCounts, FORGOTTEN_FP, RateSlot, RecordResult, RunStatus, RunSummary, StateReset,
    WarehouseError, is_removal, record_requests_sql, requests_of, settled_run_sql, stored,
    summary_request_sql, summary_rows_sql, watermark_sql,
};

/// The statuses of a run still in progress.
const OPEN: &str = "'requested', 'extracting', 'sending'";

/// Run transition: a run `sending` whose every record has an outcome ends `failed` (it carries
/// an error), `degraded` (some record rejected, dead-lettered, or invalid and not accepted) or
/// `succeeded`.
const FINISH_RUN: &str = "
UPDATE loopsync.runs
   SET status = CASE WHEN error IS NOT NULL THEN 'failed'
                     WHEN EXISTS (SELECT 1 FROM loopsync.records x WHERE x.run_id = loopsync.runs.id
                                   AND (x.outcome IN ('rejected', 'dead_lettered')
                                        OR (x.outcome = 'invalid' AND x.accepted = 0)))
                     THEN 'degraded' ELSE 'succeeded' END,
       finished_at = {now}
 WHERE id = $1 AND status = 'sending'
   AND (SELECT count(*) FROM loopsync.records x WHERE x.run_id = loopsync.runs.id) >= expected";

/// Finishes the runs among `runs` whose every record has an outcome.
pub(crate) async fn finish_runs(x: &mut dyn Exec, runs: Vec<i64>) -> Result<(), WarehouseError> {
    let sql = FINISH_RUN.replace("{now}", x.dialect().now());
    let items = runs.into_iter().map(|run| (0, params![run])).collect();
    x.batch("finish a run", &[sql], items).await?;
    Ok(())
}

/// The lease: a new run of `sync`, unless one is in progress; a run in progress whose waiting
/// process gave no sign of life for [`LEASE`] is closed first, as `interrupted`.
pub(crate) async fn create_run(x: &mut dyn Exec, sync: String) -> Result<i64, WarehouseError> {
    x.lock_sync_runs(&sync).await?;
    refuse_a_second_run(x, &sync).await?;
    let d = x.dialect().clone();
    let row = x
        .query(
            "create a run",
            &format!(
                "INSERT INTO loopsync.runs (sync, status, requested_at, heartbeat_at)
                 VALUES ($1, 'requested', {now}, {now}) RETURNING id",
                now = d.now()
            ),
            params![&sync],
        )
        .await?;
    first(&row, "create a run")?.int(0)
}

/// One run of a sync at a time: [`WarehouseError::RunInProgress`] if `sync` has a run in
/// progress (a run whose waiting process gave no sign of life for [`LEASE`] is closed first, as
/// `interrupted`). The caller holds [`Exec::lock_sync_runs`].
pub(crate) async fn refuse_a_second_run(
    x: &mut dyn Exec,
    sync: &str,
) -> Result<(), WarehouseError> {
    let d = x.dialect().clone();
    let since = "COALESCE(heartbeat_at, requested_at)";
    x.execute(
        "close abandoned runs",
        &format!(
            "UPDATE loopsync.runs
                SET status = 'interrupted', finished_at = {now},
                    error = 'its process stopped (no sign of life since ' || {since_text} || ')'
              WHERE sync = $1 AND status IN ({OPEN}) AND {since} < {lease}",
            now = d.now(),
            since_text = d.time_text(since),
            lease = d.ago("$2"),
        ),
        params![sync, LEASE.as_secs_f64()],
    )
    .await?;
    let open = x
        .query(
            "look for a run in progress",
            &format!(
                "SELECT id, status, {alive} FROM loopsync.runs
                  WHERE sync = $1 AND status IN ({OPEN})
                  ORDER BY id LIMIT 1",
                alive = d.time_text(since)
            ),
            params![sync],
        )
        .await?;
    if let Some(open) = open.first() {
        return Err(WarehouseError::RunInProgress {
            run_id: open.int(0)?,
            status: stored::<RunStatus>("look for a run in progress", &open.text(1)?)?,
            alive_at: open.text(2)?,
            sync: sync.to_owned(),
        });
    }
    Ok(())
}

/// The lease: the process that waits for a run is alive.
pub(crate) async fn heartbeat(x: &mut dyn Exec, run_id: i64) -> Result<(), WarehouseError> {
    let sql = format!(
        "UPDATE loopsync.runs SET heartbeat_at = {} WHERE id = $1",
        x.dialect().now()
    );
    x.execute("note that a run is alive", &sql, params![run_id])
        .await?;
    Ok(())
}

/// The extractor of `run_id` is alive: noted, and whether the run is still extracting (a run
/// closed meanwhile — given up by the stall timeout, interrupted — takes no more changes).
pub(crate) async fn extracting(x: &mut dyn Exec, run_id: i64) -> Result<bool, WarehouseError> {
    let sql = format!(
        "UPDATE loopsync.runs SET extract_alive_at = {}
          WHERE id = $1 AND status = 'extracting' RETURNING id",
        x.dialect().now()
    );
    let rows = x
        .query("note that an extractor is alive", &sql, params![run_id])
        .await?;
    Ok(!rows.is_empty())
}

pub(crate) async fn installation(x: &mut dyn Exec) -> Result<String, WarehouseError> {
    let rows = x
        .query(
            "read the installation id",
            "SELECT id FROM loopsync.installation",
            vec![],
        )
        .await?;
    first(&rows, "read the installation id")?.text(0)
}

/// Run transition: `requested` (or, redelivered, `extracting`) to `extracting`.
pub(crate) async fn claim_run(
    x: &mut dyn Exec,
    run_id: i64,
    redelivered: bool,
) -> Result<Option<String>, WarehouseError> {
    let sql = format!(
        "UPDATE loopsync.runs SET status = 'extracting', started_at = {}
          WHERE id = $1 AND (status = 'requested' OR ($2 AND status = 'extracting'))
          RETURNING sync",
        x.dialect().now()
    );
    let rows = x
        .query("claim a run", &sql, params![run_id, redelivered])
        .await?;
    rows.first().map(|r| r.text(0)).transpose()
}

/// What is about to be published for each key, in key order (the order of row locks), with
/// the identity it writes: until Loops confirms it, the version is *possibly applied*
/// ([`crate::DiffRow::unsure`]). The row's noted hash is forgotten, so the hashed diff reads the
/// row again; the identity of a version possibly applied is kept while a later one names none.
pub(crate) async fn mark_emitted(
    x: &mut dyn Exec,
    sync: String,
    run_id: i64,
    mut emitted: Vec<Emitted>,
) -> Result<(), WarehouseError> {
    emitted.sort_by(|a, b| a.key.cmp(&b.key));
    let sql = "INSERT INTO loopsync.state (sync, key, emitted_fp, emitted_run, emitted_email,
                                           emitted_user_id, resubscribe, possibly_applied)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
               ON CONFLICT (sync, key) DO UPDATE
                  SET emitted_fp = EXCLUDED.emitted_fp, emitted_run = EXCLUDED.emitted_run,
                      emitted_email = COALESCE(EXCLUDED.emitted_email, loopsync.state.emitted_email),
                      emitted_user_id = COALESCE(EXCLUDED.emitted_user_id,
                                                 loopsync.state.emitted_user_id),
                      resubscribe = CASE WHEN EXCLUDED.resubscribe = 1 THEN 1
                                         ELSE loopsync.state.resubscribe END,
                      possibly_applied = EXCLUDED.possibly_applied,
                      model_hash = NULL";
    let items = emitted
        .into_iter()
        .map(|e| {
            (
                0,
                params![
                    &sync,
                    e.key,
                    e.fingerprint,
                    run_id,
                    e.email,
                    e.user_id,
                    i64::from(e.unsubscribes),
                    crate::identities_text(&e.possibly_applied)
                ],
            )
        })
        .collect();
    x.batch("note emitted records", &[sql.to_owned()], items)
        .await?;
    Ok(())
}

/// Who owns a contact: the records of `sync` that Loops confirmed with one of `identities` (a
/// normalised email, or a userId). Asked [`OWNERS_CHUNK`] identities a statement (a statement
/// per identity, each reading the whole state, did not end within the warehouse's 60 s for
/// 5 000 removals of a million rows), by index (migration 17; before it, a scan of the state
/// normalising every email took 2.7 s for 5 000 removals of a million rows).
pub(crate) async fn owners(
    x: &mut dyn Exec,
    sync: String,
    mut identities: Vec<String>,
) -> Result<Vec<(String, Option<String>, Option<String>)>, WarehouseError> {
    identities.sort();
    identities.dedup();
    let mut owners = std::collections::BTreeSet::new();
    for chunk in identities.chunks(OWNERS_CHUNK) {
        let sql = owners_sql(x.dialect(), chunk.len());
        let mut params = params![&sync];
        params.extend(chunk.iter().map(|i| super::Value::from(i.as_str())));
        for row in x.query("read the owners of contacts", &sql, params).await? {
            owners.insert((row.text(0)?, row.opt_text(1)?, row.opt_text(2)?));
        }
    }
    Ok(owners.into_iter().collect())
}

/// [`owners`]' statement for `n` identities (`$2` on), by the indexes of migration 17
/// (`state_confirmed_email`, `state_confirmed_user_id`).
pub(crate) fn owners_sql(d: &crate::schema::Dialect, n: usize) -> String {
    // Two statements in one (a `UNION`, not an `OR`), so that each reads its own index.
    // PostgreSQL looks each identity up (`LATERAL … OFFSET 0`): it estimates a list of
    // thousands compared with an expression at every row of the state, and scans it (1.8 s
    // for 5 000 removals of a million rows); SQLite's planner takes the index for `IN`.
    let owners = |condition: String| match d.backend {
        crate::schema::Backend::Postgres => {
            let values: Vec<String> = (2..n + 2).map(|i| format!("(${i})")).collect();
            format!(
                "SELECT s.key, s.confirmed_email, s.confirmed_user_id
                   FROM (VALUES {}) AS i(identity)
                  CROSS JOIN LATERAL (
                        SELECT key, confirmed_email, confirmed_user_id FROM loopsync.state
                         WHERE sync = $1 AND confirmed_fp IS NOT NULL
                           AND {condition} = i.identity OFFSET 0) AS s",
                values.join(", ")
            )
        }
        crate::schema::Backend::Sqlite => format!(
            "SELECT key, confirmed_email, confirmed_user_id FROM loopsync.state
              WHERE sync = $1 AND confirmed_fp IS NOT NULL AND {condition} IN ({})",
            placeholders(n)
        ),
    };
    format!(
        "{} UNION {}",
        owners(d.email_key("confirmed_email")),
        owners("confirmed_user_id".to_owned())
    )
}

/// `$2, $3, …`: the placeholders of `n` parameters after the sync's `$1`.
fn placeholders(n: usize) -> String {
    (2..n + 2)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Identities asked a statement by [`owners`] (each statement reads the sync's state once):
/// within SQLite's 32 766 parameters and PostgreSQL's 65 535.
const OWNERS_CHUNK: usize = 10_000;

/// Run transition: `extracting` to `sending`, with the extraction's counts; `expected` counts
/// what the state holds (keys emitted in the run, keys with an outcome in it). Then finished,
/// if every record already has its outcome.
pub(crate) async fn finish_extract(
    x: &mut dyn Exec,
    run_id: i64,
    c: ExtractCounts,
) -> Result<(), WarehouseError> {
    let sql = format!(
        "UPDATE loopsync.runs SET status = 'sending', extracted_at = {now},
                expected = (SELECT count(*) FROM (
                    SELECT key FROM loopsync.state WHERE sync = loopsync.runs.sync AND emitted_run = $1
                    UNION SELECT key FROM loopsync.records WHERE run_id = $1) AS k),
                added = $2, changed = $3, removed = $4, unchanged = $5, invalid_rows = $6,
                error = COALESCE($7, error), ignored = $8, cursor_high = $9, cursor_column = $10,
                diff_kind = $11, shape_seed = $12
          WHERE id = $1 AND status = 'extracting'",
        now = x.dialect().now()
    );
    x.execute(
        "finish an extraction",
        &sql,
        params![
            run_id,
            c.added,
            c.changed,
            c.removed,
            c.unchanged,
            c.invalid_rows,
            c.error,
            c.ignored,
            c.cursor_high,
            c.cursor_column,
            c.diff.map(|d| d.as_str()),
            c.shape_seed
        ],
    )
    .await?;
    finish_runs(x, vec![run_id]).await
}

/// Confirm (adopted): the record is confirmed at its fingerprint in `run_id`, unparked, its
/// generation advanced. The generation counts the record's changes (confirmed, removed,
/// adopted, reset: the four places it moves, all in this file), so that what is sent next has
/// new idempotency keys. An adoption asks Loops for no contact, so it knows no contact id: the
/// one kept from an earlier confirmation goes (it may be another team's contact, and the
/// read-back of a new API key compares it). An adoption is a confirmation: like any final
/// outcome but an invalid one, it ends the record's acceptance (Loops holds its contact now).
pub(crate) async fn adopt(
    x: &mut dyn Exec,
    sync: String,
    run_id: i64,
    mut records: Vec<Adoption>,
) -> Result<(), WarehouseError> {
    records.sort_by(|a, b| a.key.cmp(&b.key));
    let sql = format!(
        "INSERT INTO loopsync.state (sync, key, confirmed_fp, confirmed_run, confirmed_at,
                                     confirmed_email, confirmed_user_id, model_hash, model_email)
         VALUES ($1, $2, $3, $4, {now}, $5, $6, $7, $8)
         ON CONFLICT (sync, key) DO UPDATE
            SET confirmed_fp = EXCLUDED.confirmed_fp, confirmed_run = EXCLUDED.confirmed_run,
                confirmed_at = EXCLUDED.confirmed_at,
                confirmed_email = EXCLUDED.confirmed_email,
                confirmed_user_id = EXCLUDED.confirmed_user_id,
                contact_id = NULL,
                parked_fp = NULL,
                model_hash = EXCLUDED.model_hash,
                model_email = EXCLUDED.model_email,
                generation = loopsync.state.generation + 1",
        now = x.dialect().now(),
    );
    let items = records
        .into_iter()
        .flat_map(|r| {
            let (hash, email) = r.unchanged.unzip();
            [
                (1, params![&sync, &r.key]),
                (
                    0,
                    params![
                        &sync,
                        r.key,
                        r.fingerprint,
                        run_id,
                        r.email,
                        r.user_id,
                        hash,
                        email.flatten()
                    ],
                ),
            ]
        })
        .collect();
    x.batch("adopt records", &[sql, FORGET_ACCEPTANCE.to_owned()], items)
        .await?;
    Ok(())
}

/// Park: records at the fingerprint of their latest outcome; runs leave them alone until their
/// data changes.
pub(crate) async fn park(
    x: &mut dyn Exec,
    sync: String,
    mut keys: Vec<String>,
) -> Result<u64, WarehouseError> {
    keys.sort();
    keys.dedup();
    let sql = "INSERT INTO loopsync.state (sync, key, parked_fp)
               SELECT sync, key, fingerprint FROM loopsync.records
                WHERE sync = $1 AND key = $2 ORDER BY run_id DESC LIMIT 1
               ON CONFLICT (sync, key) DO UPDATE SET parked_fp = EXCLUDED.parked_fp";
    let items = keys.into_iter().map(|k| (0, params![&sync, k])).collect();
    x.batch("park records", &[sql.to_owned()], items).await
}

/// Unpark: the next run tries the records again.
pub(crate) async fn unpark(
    x: &mut dyn Exec,
    sync: String,
    mut keys: Vec<String>,
) -> Result<u64, WarehouseError> {
    keys.sort();
    keys.dedup();
    let sql = "UPDATE loopsync.state SET parked_fp = NULL
                WHERE sync = $1 AND key = $2 AND parked_fp IS NOT NULL";
    let items = keys.into_iter().map(|k| (0, params![&sync, k])).collect();
    x.batch("unpark records", &[sql.to_owned()], items).await
}

pub(crate) async fn parked(
    x: &mut dyn Exec,
    sync: Option<String>,
) -> Result<Vec<(String, String)>, WarehouseError> {
    let sql = format!(
        "SELECT sync, key FROM loopsync.state
          WHERE parked_fp IS NOT NULL AND (CAST($1 AS text) IS NULL OR sync = $1)
          ORDER BY sync, key{}",
        x.dialect().bytewise()
    );
    x.query("read parked records", &sql, params![sync])
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.text(1)?)))
        .collect()
}

/// Run transition: an adoption run ends `adopted`, with its counts.
pub(crate) async fn finish_adopt(
    x: &mut dyn Exec,
    run_id: i64,
    c: ExtractCounts,
) -> Result<(), WarehouseError> {
    let sql = format!(
        "UPDATE loopsync.runs SET status = 'adopted', extracted_at = {now}, finished_at = {now},
                expected = 0, added = $2, changed = $3, removed = $4, unchanged = $5,
                invalid_rows = $6, ignored = $7, cursor_high = $8, cursor_column = $9,
                diff_kind = $10, shape_seed = $11
          WHERE id = $1",
        now = x.dialect().now()
    );
    x.execute(
        "finish an adoption",
        &sql,
        params![
            run_id,
            c.added,
            c.changed,
            c.removed,
            c.unchanged,
            c.invalid_rows,
            c.ignored,
            c.cursor_high,
            c.cursor_column,
            c.diff.map(|d| d.as_str()),
            c.shape_seed
        ],
    )
    .await?;
    Ok(())
}

pub(crate) async fn record_preflight(
    x: &mut dyn Exec,
    run_id: i64,
    c: RequestCounts,
) -> Result<(), WarehouseError> {
    x.execute(
        "record a run's preflight",
        "UPDATE loopsync.runs
            SET preflight_requests = $2, preflight_retries = $3, preflight_rate_limited = $4
          WHERE id = $1",
        params![run_id, c.total(), c.retries, c.rate_limited],
    )
    .await?;
    Ok(())
}

/// Run transition: to `failed`, with the error.
pub(crate) async fn fail_run(
    x: &mut dyn Exec,
    run_id: i64,
    error: String,
) -> Result<(), WarehouseError> {
    let sql = format!(
        "UPDATE loopsync.runs SET status = 'failed', finished_at = {}, error = $2 WHERE id = $1",
        x.dialect().now()
    );
    x.execute("fail a run", &sql, params![run_id, error])
        .await?;
    Ok(())
}

/// Run transition: a run in progress to `interrupted`, with why.
pub(crate) async fn interrupt_run(
    x: &mut dyn Exec,
    run_id: i64,
    why: String,
) -> Result<bool, WarehouseError> {
    let sql = format!(
        "UPDATE loopsync.runs SET status = 'interrupted', finished_at = {}, error = $2
          WHERE id = $1 AND status IN ({OPEN})",
        x.dialect().now()
    );
    let closed = x
        .execute("close an interrupted run", &sql, params![run_id, why])
        .await?;
    Ok(closed > 0)
}

/// An acceptance (`loopsync rejections accept`) applies to an invalid record of sync `{sync}`
/// and key `{key}` whose reason `{reason}` is the one accepted: the one rule of acceptance,
/// used when an outcome is recorded and when the rejections are listed.
const ACCEPTED: &str = "EXISTS (SELECT 1 FROM loopsync.accepted a
                 WHERE a.sync = {sync} AND a.key = {key} AND a.reason = COALESCE({reason}, ''))";

/// [`ACCEPTED`] for these expressions of a record's sync, key and reason.
fn accepted(sync: &str, key: &str, reason: &str) -> String {
    ACCEPTED
        .replace("{sync}", sync)
        .replace("{key}", key)
        .replace("{reason}", reason)
}

/// Outcomes: a final outcome's row in `records` (a repeat is ignored, except that a
/// confirmation replaces an earlier failure and adds its requests). An invalid outcome is
/// `accepted` when the record is accepted as invalid for that reason.
const INSERT_RECORD: &str = "INSERT INTO loopsync.records
        (run_id, sync, key, fingerprint, operation, outcome, reason, contact_id, requests, at,
         change, writes, events, deletes, retries, rate_limited, accepted)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, {at}, $11, $12, $13, $14, $15, $16,
             CASE WHEN $6 = 'invalid' AND {accepted} THEN 1 ELSE 0 END)
     ON CONFLICT (run_id, key) DO UPDATE
        SET fingerprint = EXCLUDED.fingerprint, operation = EXCLUDED.operation,
            outcome = EXCLUDED.outcome, reason = EXCLUDED.reason,
            contact_id = EXCLUDED.contact_id, accepted = EXCLUDED.accepted,
            change = COALESCE(EXCLUDED.change, loopsync.records.change),
            requests = loopsync.records.requests + EXCLUDED.requests,
            writes = loopsync.records.writes + EXCLUDED.writes,
            events = loopsync.records.events + EXCLUDED.events,
            deletes = loopsync.records.deletes + EXCLUDED.deletes,
            retries = loopsync.records.retries + EXCLUDED.retries,
            rate_limited = loopsync.records.rate_limited + EXCLUDED.rate_limited,
            at = EXCLUDED.at
      WHERE loopsync.records.outcome <> 'confirmed' AND EXCLUDED.outcome = 'confirmed'";

/// Outcomes: an acceptance ends with any final outcome of its record but an invalid one for the
/// reason accepted (the row changed: sent, or invalid for another reason).
const END_ACCEPTANCE: &str = "DELETE FROM loopsync.accepted
      WHERE sync = $1 AND key = $2
        AND NOT (CAST($3 AS text) = 'invalid' AND reason = COALESCE(CAST($4 AS text), ''))";

/// Outcomes: each attempt once; a repeated `attempted` outcome is ignored.
const INSERT_ATTEMPT: &str = "INSERT INTO loopsync.attempts
        (run_id, sync, key, attempt, requests, writes, events, deletes, retries, rate_limited,
         reason, at)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, {at})
     ON CONFLICT (run_id, key, attempt) DO NOTHING";

/// Confirm: Loops confirmed a record's fingerprint (never moving back to an older run, nor to
/// the run of a tombstone or of a `reset`'s fence: `confirmed_run` with nothing confirmed). The
/// generation advances unless this repeats the confirmation it has; the noted hash stays only
/// while the fingerprint does. A confirmation without a contact id (`events/send` answers
/// none) keeps the one the state has only while the confirmed email and userId stay: one for
/// another identity (a re-key through `events/send` makes a new contact) clears it, so that
/// the read-back of a new API key never compares the old contact's id.
const CONFIRM: &str = "INSERT INTO loopsync.state (sync, key, confirmed_fp, confirmed_run, confirmed_at,
                                    contact_id, confirmed_email, confirmed_user_id)
     VALUES ($1, $2, $3, $4, {now}, $5, $6, $7)
     ON CONFLICT (sync, key) DO UPDATE
        SET confirmed_fp = EXCLUDED.confirmed_fp, confirmed_run = EXCLUDED.confirmed_run,
            confirmed_at = EXCLUDED.confirmed_at,
            contact_id = CASE
                WHEN EXCLUDED.contact_id IS NOT NULL THEN EXCLUDED.contact_id
                WHEN lower(trim(EXCLUDED.confirmed_email))
                         <> lower(trim(loopsync.state.confirmed_email))
                  OR EXCLUDED.confirmed_user_id <> loopsync.state.confirmed_user_id
                THEN NULL
                ELSE loopsync.state.contact_id END,
            confirmed_email = COALESCE(EXCLUDED.confirmed_email, loopsync.state.confirmed_email),
            confirmed_user_id = COALESCE(EXCLUDED.confirmed_user_id, loopsync.state.confirmed_user_id),
            parked_fp = NULL, resubscribe = 0,
            emitted_email = CASE WHEN loopsync.state.emitted_run > EXCLUDED.confirmed_run
                                 THEN loopsync.state.emitted_email END,
            emitted_user_id = CASE WHEN loopsync.state.emitted_run > EXCLUDED.confirmed_run
                                   THEN loopsync.state.emitted_user_id END,
            possibly_applied = CASE WHEN loopsync.state.emitted_run > EXCLUDED.confirmed_run
                                      OR (loopsync.state.emitted_run = EXCLUDED.confirmed_run
                                          AND loopsync.state.emitted_fp <> EXCLUDED.confirmed_fp)
                                    THEN loopsync.state.possibly_applied END,
            model_hash = CASE WHEN loopsync.state.confirmed_fp = EXCLUDED.confirmed_fp
                              THEN loopsync.state.model_hash END,
            generation = loopsync.state.generation
                + CASE WHEN loopsync.state.confirmed_run IS NOT DISTINCT FROM EXCLUDED.confirmed_run
                        AND loopsync.state.confirmed_fp IS NOT DISTINCT FROM EXCLUDED.confirmed_fp
                       THEN 0 ELSE 1 END
      WHERE loopsync.state.confirmed_run IS NULL
         OR loopsync.state.confirmed_run < EXCLUDED.confirmed_run
         OR (loopsync.state.confirmed_run = EXCLUDED.confirmed_run
             AND loopsync.state.confirmed_fp IS NOT NULL)";

/// Remove: a confirmed removal leaves a tombstone: nothing confirmed, the generation advanced,
/// so a row that comes back is a new change with a new idempotency key. The tombstone says
/// whether the sync unsubscribed the contact (`$4`: the operation), so that a row that comes
/// back re-subscribes it. A removal of a contact a lost create may have made (nothing confirmed,
/// a version possibly applied) leaves a tombstone too.
const REMOVE: &str = "UPDATE loopsync.state
        SET confirmed_fp = NULL, confirmed_email = NULL, confirmed_user_id = NULL,
            contact_id = NULL, parked_fp = NULL, confirmed_run = $3, confirmed_at = {now},
            model_hash = NULL, generation = generation + 1,
            resubscribe = CASE WHEN $4 = 'unsubscribe' THEN 1 ELSE 0 END,
            emitted_email = CASE WHEN emitted_run > $3 THEN emitted_email END,
            emitted_user_id = CASE WHEN emitted_run > $3 THEN emitted_user_id END,
            possibly_applied = CASE WHEN emitted_run > $3 THEN possibly_applied END
      WHERE sync = $1 AND key = $2
        AND (confirmed_fp IS NOT NULL
             OR (emitted_run IS NOT NULL AND emitted_run > COALESCE(confirmed_run, 0)))
        AND (confirmed_run IS NULL OR confirmed_run < $3
             OR (confirmed_run = $3 AND confirmed_fp IS NOT NULL))";

/// Outcomes, in one transaction: the runs' rows locked first (`finish_extract` waits for this
/// transaction, so one of the two sees every record of a complete run), then each outcome in
/// (sync, key) order (the order of row locks, as `mark_emitted` takes them: no deadlock), then
/// the runs whose every record now has an outcome finished.
pub(crate) async fn record_outcomes(
    x: &mut dyn Exec,
    mut outcomes: Vec<Outcome>,
) -> Result<(), WarehouseError> {
    let d = x.dialect().clone();
    let mut runs: Vec<i64> = outcomes.iter().map(|o| o.run_id).collect();
    runs.sort_unstable();
    runs.dedup();
    for run in &runs {
        x.lock_rows(
            "lock runs",
            "SELECT id FROM loopsync.runs WHERE id = $1 FOR UPDATE",
            params![*run],
        )
        .await?;
    }
    outcomes.sort_by(|a, b| (&a.sync, &a.key).cmp(&(&b.sync, &b.key)));
    let at = d.time_of_millis("$10");
    let statements = [
        INSERT_RECORD
            .replace("{at}", &at)
            .replace("{accepted}", &accepted("$2", "$3", "$7")),
        INSERT_ATTEMPT.replace("{at}", &d.time_of_millis("$12")),
        CONFIRM.replace("{now}", d.now()),
        REMOVE.replace("{now}", d.now()),
        END_ACCEPTANCE.to_owned(),
        // An invalid record (of a key: a NULL one has no row) has a state row with no noted
        // hash: the hashed diff reads it again, and an incremental one reads it wherever its
        // cursor is, so that its email counts against a duplicate, and it is sent once another
        // row's change makes it valid. A row without state is new to the sync: nothing else.
        "INSERT INTO loopsync.state (sync, key) VALUES ($1, $2)
         ON CONFLICT (sync, key) DO UPDATE SET model_hash = NULL
          WHERE loopsync.state.model_hash IS NOT NULL"
            .to_owned(),
    ];
    let mut items = Vec::with_capacity(2 * outcomes.len());
    for o in outcomes {
        let c = o.request_counts();
        if !o.status.is_final() {
            items.push((
                1,
                params![
                    o.run_id,
                    &o.sync,
                    &o.key,
                    o.attempt.as_deref().unwrap_or(""),
                    c.total(),
                    c.writes,
                    c.events,
                    c.deletes,
                    c.retries,
                    c.rate_limited,
                    o.reason,
                    o.at
                ],
            ));
            continue;
        }
        items.push((
            0,
            params![
                o.run_id,
                &o.sync,
                &o.key,
                &o.fingerprint,
                &o.operation,
                o.status.as_str(),
                o.reason.as_ref(),
                o.contact_id.as_ref(),
                c.total(),
                o.at,
                o.change.map(|c| c.as_str()),
                c.writes,
                c.events,
                c.deletes,
                c.retries,
                c.rate_limited
            ],
        ));
        items.push((
            4,
            params![&o.sync, &o.key, o.status.as_str(), o.reason.as_ref()],
        ));
        if o.status == OutcomeStatus::Invalid && !is_null_key(&o.key) {
            items.push((5, params![&o.sync, &o.key]));
        }
        if o.status == OutcomeStatus::Confirmed && is_removal(&o.operation) {
            items.push((3, params![o.sync, o.key, o.run_id, o.operation]));
        } else if o.status == OutcomeStatus::Confirmed {
            items.push((
                2,
                params![
                    o.sync,
                    o.key,
                    o.fingerprint,
                    o.run_id,
                    o.contact_id,
                    o.email,
                    o.user_id
                ],
            ));
        }
    }
    x.batch("record outcomes", &statements, items).await?;
    finish_runs(x, runs).await
}

/// The summary of runs: `filter` on `r`, newest first, at most `$2`.
fn summary_sql(x: &dyn Exec, filter: &str) -> String {
    let d = x.dialect();
    let outcome = |o: &str| format!("count(x.key) FILTER (WHERE x.outcome = '{o}')");
    let rows = summary_rows_sql(|condition| {
        format!("count(x.key) FILTER (WHERE x.outcome = 'invalid' AND {condition})")
    });
    format!(
        "SELECT r.id, r.sync, r.status, {requested}, {finished}, {duration},
                r.expected, {rows}, r.removed, r.unchanged,
                {confirmed}, {skipped}, {invalid}, {rejected}, {dead}, count(x.key), r.error,
                count(x.key) FILTER (WHERE x.operation = 'rekey' AND x.outcome = 'confirmed'),
                {requests},
                r.preflight_requests, r.preflight_retries, r.preflight_rate_limited,
                r.ignored, {extract_alive}, {alive},
                count(x.key) FILTER (WHERE x.outcome = 'invalid' AND x.accepted = 1), r.diff_kind
           FROM loopsync.runs r LEFT JOIN loopsync.records x ON x.run_id = r.id
          WHERE {filter}
          GROUP BY r.id ORDER BY r.id DESC LIMIT $2",
        requested = d.time_text("r.requested_at"),
        finished = d.time_text("r.finished_at"),
        duration = d.millis_between("r.requested_at", "r.finished_at"),
        confirmed = outcome("confirmed"),
        skipped = outcome("skipped"),
        invalid = outcome("invalid"),
        rejected = outcome("rejected"),
        dead = outcome("dead_lettered"),
        requests = summary_request_sql("loopsync.attempts"),
        extract_alive = d.time_text("r.extract_alive_at"),
        alive = d.time_text("COALESCE(r.heartbeat_at, r.requested_at)"),
    )
}

fn summary(row: &Row) -> Result<RunSummary, WarehouseError> {
    // The model's rows as the extractor counted them, the refused changes moved by the one
    // rule (`ExtractCounts::refuse`) that `plan` counts by too.
    let mut rows = ExtractCounts {
        added: row.count(7)?,
        changed: row.count(8)?,
        invalid_rows: row.count(9)?,
        ..ExtractCounts::default()
    };
    rows.refuse(ChangeKind::Added, row.count(10)?);
    rows.refuse(ChangeKind::Changed, row.count(11)?);
    let mut summary = RunSummary {
        id: row.int(0)?,
        sync: row.text(1)?,
        status: stored("read a run", &row.text(2)?)?,
        requested_at: row.text(3)?,
        finished_at: row.opt_text(4)?,
        duration_ms: row.opt_int(5)?,
        expected: row.opt_int(6)?,
        added: rows.added,
        changed: rows.changed,
        invalid_rows: rows.invalid_rows,
        removed: row.count(12)?,
        unchanged: row.count(13)?,
        confirmed: row.count(14)?,
        skipped: row.count(15)?,
        invalid: row.count(16)?,
        rejected: row.count(17)?,
        dead_lettered: row.count(18)?,
        records: row.count(19)?,
        error: row.opt_text(20)?,
        rekeyed: row.count(21)?,
        ignored: row.count(31)?,
        extract_alive_at: row.opt_text(32)?,
        alive_at: row.opt_text(33)?,
        accepted: row.count(34)?,
        diff: row.opt_text(35)?.as_deref().and_then(DiffKind::parse),
        ..RunSummary::default()
    };
    let mut loader = [0; 6];
    for (i, n) in loader.iter_mut().enumerate() {
        *n = row.count(22 + i)?;
    }
    let mut preflight = [0; 3];
    for (i, n) in preflight.iter_mut().enumerate() {
        *n = row.count(28 + i)?;
    }
    requests_of(&mut summary, loader, preflight);
    Ok(summary)
}

pub(crate) async fn run(
    x: &mut dyn Exec,
    run_id: i64,
) -> Result<Option<RunSummary>, WarehouseError> {
    let sql = summary_sql(x, "r.id = $1");
    let rows = x.query("read a run", &sql, params![run_id, 1i64]).await?;
    rows.first().map(summary).transpose()
}

pub(crate) async fn runs(
    x: &mut dyn Exec,
    sync: Option<String>,
    limit: i64,
) -> Result<Vec<RunSummary>, WarehouseError> {
    let sql = summary_sql(x, "(CAST($1 AS text) IS NULL OR r.sync = $1)");
    let rows = x.query("read runs", &sql, params![sync, limit]).await?;
    rows.iter().map(summary).collect()
}

/// A record's columns as [`record`] reads them (`x` is the record's alias), whether it is
/// accepted as `accepted`.
pub(crate) fn record_columns(x: &dyn Exec, accepted: &str) -> String {
    format!(
        "x.run_id, x.sync, x.key, x.operation, x.outcome, x.reason, x.contact_id,
         CAST(({requests}) AS bigint), {at}, {accepted}",
        requests = record_requests_sql("loopsync.attempts"),
        at = x.dialect().time_text("x.at"),
    )
}

pub(crate) fn record(r: &Row) -> Result<RecordResult, WarehouseError> {
    Ok(RecordResult {
        run_id: r.int(0)?,
        sync: r.text(1)?,
        key: r.text(2)?,
        operation: r.text(3)?,
        outcome: stored("read records", &r.text(4)?)?,
        reason: r.opt_text(5)?,
        contact_id: r.opt_text(6)?,
        requests: r.int(7)?,
        at: r.text(8)?,
        accepted: r.int(9)? != 0,
    })
}

pub(crate) async fn records(
    x: &mut dyn Exec,
    run_id: i64,
) -> Result<Vec<RecordResult>, WarehouseError> {
    let sql = format!(
        "SELECT {} FROM loopsync.records x WHERE run_id = $1 ORDER BY key",
        record_columns(x, "x.accepted")
    );
    let rows = x.query("read records", &sql, params![run_id]).await?;
    rows.iter().map(record).collect()
}

/// Records whose latest outcome is invalid, rejected or dead-lettered; an invalid one accepted
/// now for its latest reason is `accepted`.
pub(crate) async fn rejections(
    x: &mut dyn Exec,
    sync: Option<String>,
) -> Result<Vec<RecordResult>, WarehouseError> {
    let sql = format!(
        "SELECT {columns} FROM (
            SELECT *, row_number() OVER (PARTITION BY sync, key ORDER BY run_id DESC) AS n
              FROM loopsync.records WHERE CAST($1 AS text) IS NULL OR sync = $1) AS x
          WHERE n = 1 AND outcome IN ('invalid', 'rejected', 'dead_lettered')
          ORDER BY sync, key",
        columns = record_columns(
            x,
            &format!(
                "CASE WHEN x.outcome = 'invalid' AND {} THEN 1 ELSE 0 END",
                accepted("x.sync", "x.key", "x.reason")
            )
        )
    );
    let rows = x.query("read rejections", &sql, params![sync]).await?;
    rows.iter().map(record).collect()
}

/// `verify --repair`: the confirmed fingerprint forgotten (see [`FORGOTTEN_FP`]) while it is
/// the one verify compared against; rows locked in key order first.
pub(crate) async fn forget_confirmed(
    x: &mut dyn Exec,
    sync: String,
    mut records: Vec<(String, String)>,
) -> Result<u64, WarehouseError> {
    records.sort();
    for (key, _) in &records {
        x.lock_rows(
            "lock records to forget",
            "SELECT key FROM loopsync.state WHERE sync = $1 AND key = $2 FOR UPDATE",
            params![&sync, key],
        )
        .await?;
    }
    let sql = "UPDATE loopsync.state SET confirmed_fp = $4, model_hash = NULL
                WHERE sync = $1 AND key = $2 AND confirmed_fp = $3";
    let items = records
        .into_iter()
        .map(|(key, fp)| (0, params![&sync, key, fp, FORGOTTEN_FP]))
        .collect();
    x.batch("forget confirmations", &[sql.to_owned()], items)
        .await
}

fn binding(row: &Row) -> Result<DestinationBinding, WarehouseError> {
    Ok(DestinationBinding {
        destination: Destination::new(row.opt_text(0)?, &row.text(1)?),
        bound_at: row.text(2)?,
        key_fingerprint: row.opt_text(3)?,
    })
}

pub(crate) async fn destination(
    x: &mut dyn Exec,
    sync: String,
) -> Result<Option<DestinationBinding>, WarehouseError> {
    let sql = format!(
        "SELECT team, base_url, {}, key_fingerprint FROM loopsync.destinations WHERE sync = $1",
        x.dialect().time_text("bound_at")
    );
    let rows = x
        .query("read a sync's destination", &sql, params![sync])
        .await?;
    rows.first().map(binding).transpose()
}

/// Binds the sync unless it is bound: the earlier binding, or `None` (bound now).
pub(crate) async fn bind_destination(
    x: &mut dyn Exec,
    sync: String,
    destination: Destination,
    key_fingerprint: String,
) -> Result<Option<DestinationBinding>, WarehouseError> {
    let sql = format!(
        "INSERT INTO loopsync.destinations (sync, team, base_url, bound_at, key_fingerprint)
         VALUES ($1, $2, $3, {}, $4) ON CONFLICT (sync) DO NOTHING",
        x.dialect().now()
    );
    // A binding deleted (by a reset) between the insert and the read: insert again.
    for _ in 0..3 {
        let inserted = x
            .execute(
                "bind a sync to its destination",
                &sql,
                params![
                    &sync,
                    destination.team.as_deref(),
                    &destination.base_url,
                    &key_fingerprint
                ],
            )
            .await?;
        if inserted == 1 {
            return Ok(None);
        }
        if let Some(earlier) = destination_of(x, &sync).await? {
            return Ok(Some(earlier));
        }
    }
    Err(WarehouseError::Query {
        what: "bind a sync to its destination".into(),
        detail: "the binding kept changing under a concurrent reset".into(),
    })
}

async fn destination_of(
    x: &mut dyn Exec,
    sync: &str,
) -> Result<Option<DestinationBinding>, WarehouseError> {
    destination(x, sync.to_owned()).await
}

/// Rebinds the sync (`loopsync adopt`). The contact ids the state keeps are Loops' ids in the
/// binding they were confirmed under: bound anywhere else now (another team or URL, or another
/// API key, which may be another team of the same name), they are forgotten, so that no later
/// read-back compares another Loops' ids. The same binding keeps them.
pub(crate) async fn set_destination(
    x: &mut dyn Exec,
    sync: String,
    destination: Destination,
    key_fingerprint: String,
) -> Result<(), WarehouseError> {
    let same = destination_of(x, &sync).await?.is_some_and(|b| {
        b.destination == destination && b.key_fingerprint.as_deref() == Some(&key_fingerprint)
    });
    if !same {
        // Row locks in (sync, key) order, as the checkpointer takes them: no deadlock.
        x.lock_rows(
            "lock a sync's contact ids",
            "SELECT key FROM loopsync.state WHERE sync = $1 AND contact_id IS NOT NULL
              ORDER BY key FOR UPDATE",
            params![&sync],
        )
        .await?;
        x.execute(
            "forget a sync's contact ids",
            "UPDATE loopsync.state SET contact_id = NULL
              WHERE sync = $1 AND contact_id IS NOT NULL",
            params![&sync],
        )
        .await?;
    }
    let sql = format!(
        "INSERT INTO loopsync.destinations (sync, team, base_url, bound_at, key_fingerprint)
         VALUES ($1, $2, $3, {now}, $4)
         ON CONFLICT (sync) DO UPDATE
            SET team = EXCLUDED.team, base_url = EXCLUDED.base_url, bound_at = EXCLUDED.bound_at,
                key_fingerprint = EXCLUDED.key_fingerprint",
        now = x.dialect().now()
    );
    x.execute(
        "bind a sync to its destination",
        &sql,
        params![
            sync,
            destination.team,
            destination.base_url,
            key_fingerprint
        ],
    )
    .await?;
    Ok(())
}

/// The binding's API key, while the sync is bound to `destination`.
pub(crate) async fn set_key_fingerprint(
    x: &mut dyn Exec,
    sync: String,
    destination: Destination,
    key_fingerprint: String,
) -> Result<bool, WarehouseError> {
    let changed = x
        .execute(
            "record the API key of a sync's destination",
            "UPDATE loopsync.destinations SET key_fingerprint = $4
              WHERE sync = $1 AND base_url = $3
                AND (team = $2 OR (team IS NULL AND CAST($2 AS text) IS NULL))",
            params![
                sync,
                destination.team,
                destination.base_url,
                key_fingerprint
            ],
        )
        .await?;
    Ok(changed > 0)
}

/// Records whose contact Loops confirmed: those whose contact id is known first (only an id
/// tells one team's contact from another's of the same email), then the most recently
/// confirmed.
pub(crate) async fn confirmed_contacts(
    x: &mut dyn Exec,
    sync: String,
    limit: i64,
) -> Result<Vec<ConfirmedContact>, WarehouseError> {
    let sql = format!(
        "SELECT key, confirmed_email, confirmed_user_id, contact_id FROM loopsync.state
          WHERE sync = $1 AND confirmed_fp IS NOT NULL
          ORDER BY contact_id IS NULL, confirmed_at IS NULL, confirmed_at DESC, key{} LIMIT $2",
        x.dialect().bytewise()
    );
    x.query("read confirmed contacts", &sql, params![sync, limit])
        .await?
        .iter()
        .map(|r| {
            Ok(ConfirmedContact {
                key: r.text(0)?,
                email: r.opt_text(1)?,
                user_id: r.opt_text(2)?,
                contact_id: r.opt_text(3)?,
            })
        })
        .collect()
}

/// Keys whose contact Loops holds, per query of [`accept_invalid`].
const IN_LOOPS_CHUNK: usize = 500;

/// Accepts invalid records `(key, reason)` of `sync` as invalid for that reason, each only
/// while its latest outcome still is (decided by the insert itself: a run that recorded
/// another outcome since the caller read the record leaves it unaccepted). A record whose
/// contact Loops confirmed and still holds (its row was sent, then became invalid: Loops keeps
/// the values it last confirmed for as long as the row stays invalid), or may hold (a write
/// dead-lettered since its last confirmation: its answers lost, its effect maybe not), is
/// accepted only when `in_loops_too` says the stale contact is intended; else its key is
/// returned. (Not "emitted since": the extractor notes as emitted a change the transformer then
/// refuses, which never reaches Loops.)
pub(crate) async fn accept_invalid(
    x: &mut dyn Exec,
    sync: String,
    mut records: Vec<(String, String)>,
    note: Option<String>,
    in_loops_too: bool,
) -> Result<Acceptance, WarehouseError> {
    records.sort();
    records.dedup_by(|a, b| a.0 == b.0);
    let mut in_loops = Vec::new();
    if !in_loops_too {
        for chunk in records.chunks(IN_LOOPS_CHUNK) {
            let keys = placeholders(chunk.len());
            let sql = format!(
                "SELECT key FROM loopsync.state
                  WHERE sync = $1 AND confirmed_fp IS NOT NULL AND key IN ({keys})
                 UNION
                 SELECT r.key FROM loopsync.records r
                   LEFT JOIN loopsync.state s ON s.sync = r.sync AND s.key = r.key
                  WHERE r.sync = $1 AND r.key IN ({keys}) AND r.outcome = 'dead_lettered'
                    AND r.run_id > COALESCE(s.confirmed_run, 0)"
            );
            let mut params = params![&sync];
            params.extend(chunk.iter().map(|(key, _)| super::Value::from(key)));
            for row in x.query("find contacts Loops holds", &sql, params).await? {
                in_loops.push(row.text(0)?);
            }
        }
        in_loops.sort();
        records.retain(|(key, _)| in_loops.binary_search(key).is_err());
    }
    let sql = format!(
        "INSERT INTO loopsync.accepted (sync, key, reason, note, accepted_at)
         SELECT CAST($1 AS text), CAST($2 AS text), CAST($3 AS text), CAST($4 AS text), {now}
          WHERE EXISTS (SELECT 1 FROM (SELECT r.outcome, r.reason FROM loopsync.records r
                                        WHERE r.sync = $1 AND r.key = $2
                                        ORDER BY r.run_id DESC LIMIT 1) AS latest
                         WHERE latest.outcome = 'invalid'
                           AND COALESCE(latest.reason, '') = $3)
         ON CONFLICT (sync, key) DO UPDATE
            SET reason = EXCLUDED.reason, note = EXCLUDED.note,
                accepted_at = EXCLUDED.accepted_at",
        now = x.dialect().now()
    );
    let tried = records.len() as u64;
    let items = records
        .into_iter()
        .map(|(key, reason)| (0, params![&sync, key, reason, note.as_deref()]))
        .collect();
    let accepted = x.batch("accept invalid records", &[sql], items).await?;
    Ok(Acceptance {
        accepted,
        outcome_changed: tried - accepted,
        in_loops,
    })
}

/// Ends the acceptances of these keys of `sync`.
pub(crate) async fn unaccept_invalid(
    x: &mut dyn Exec,
    sync: String,
    mut keys: Vec<String>,
) -> Result<u64, WarehouseError> {
    keys.sort();
    keys.dedup();
    let items = keys.into_iter().map(|k| (0, params![&sync, k])).collect();
    x.batch(
        "unaccept invalid records",
        &[FORGET_ACCEPTANCE.to_owned()],
        items,
    )
    .await
}

/// Ends the acceptance of key `$2` of sync `$1`: `rejections unaccept`, and an adoption (a
/// confirmation that writes no outcome, so [`END_ACCEPTANCE`] never sees it).
const FORGET_ACCEPTANCE: &str = "DELETE FROM loopsync.accepted WHERE sync = $1 AND key = $2";

/// Reset: the sync's records forgotten, not deleted: each keeps its generation, moved on, so
/// what the next run sends has new idempotency keys (a reset to the same Loops is not mistaken
/// for the sends it forgot). Its cursor and its binding go too; its runs and results stay.
pub(crate) async fn reset_state(
    x: &mut dyn Exec,
    sync: String,
) -> Result<StateReset, WarehouseError> {
    // Row locks in (sync, key) order, as the checkpointer takes them: no deadlock.
    x.lock_rows(
        "lock a sync's state",
        "SELECT key FROM loopsync.state WHERE sync = $1 ORDER BY key FOR UPDATE",
        params![&sync],
    )
    .await?;
    // What is really forgotten: the records whose contact Loops confirmed. The others only
    // had a version sent (never confirmed), or were parked.
    let rows = x
        .query(
            "count a sync's confirmed records",
            "SELECT count(*) FROM loopsync.state WHERE sync = $1 AND confirmed_fp IS NOT NULL",
            params![&sync],
        )
        .await?;
    let confirmed_records = first(&rows, "count a sync's confirmed records")?.count(0)? as u64;
    let state_records = x
        .execute(
            "forget a sync's state",
            // The newest run of the sync stays as `confirmed_run` with nothing confirmed: a
            // fence, so that an outcome of that run or an older one (its operations still
            // queued in NATS, sent to the Loops the state is reset from) never becomes state.
            "UPDATE loopsync.state
                    SET confirmed_fp = NULL, confirmed_at = NULL,
                        confirmed_run = (SELECT max(id) FROM loopsync.runs WHERE sync = $1),
                        confirmed_email = NULL, confirmed_user_id = NULL, contact_id = NULL,
                        emitted_fp = NULL, emitted_run = NULL, parked_fp = NULL, model_hash = NULL,
                        emitted_email = NULL, emitted_user_id = NULL, resubscribe = 0,
                        possibly_applied = NULL,
                        generation = generation + 1
                  WHERE sync = $1
                    AND (confirmed_fp IS NOT NULL OR emitted_fp IS NOT NULL OR parked_fp IS NOT NULL
                         OR resubscribe = 1 OR emitted_email IS NOT NULL
                         OR emitted_user_id IS NOT NULL OR possibly_applied IS NOT NULL)",
            params![&sync],
        )
        .await?;
    // An event sync's watermark goes with its state: the next run reads every row.
    x.execute(
        "forget a sync's cursor",
        "UPDATE loopsync.runs SET cursor_high = NULL WHERE sync = $1 AND cursor_high IS NOT NULL",
        params![&sync],
    )
    .await?;
    let sql = format!(
        "DELETE FROM loopsync.destinations WHERE sync = $1
         RETURNING team, base_url, {}, key_fingerprint",
        x.dialect().time_text("bound_at")
    );
    let rows = x
        .query("forget a sync's destination", &sql, params![&sync])
        .await?;
    Ok(StateReset {
        confirmed_records,
        state_records,
        destination: rows.first().map(binding).transpose()?,
    })
}

/// An event sync's watermark (see [`watermark_sql`]).
pub(crate) async fn cursor_watermark(
    x: &mut dyn Exec,
    sync: String,
    column: String,
) -> Result<Option<i64>, WarehouseError> {
    let sql = watermark_sql("loopsync.runs", "loopsync.records", "$1", "$2");
    let rows = x
        .query("read a sync's cursor", &sql, params![sync, column])
        .await?;
    rows.first().map(|r| r.int(0)).transpose()
}

/// What decides a contact sync's next diff (see [`DiffBasis`]): its watermark and the run
/// that gives it, the latest finished run, and the age of its latest settled full diff — none
/// when an adoption came after it (one from Loops' export leaves rows out: a full diff sends
/// them).
pub(crate) async fn diff_basis(
    x: &mut dyn Exec,
    sync: String,
    column: String,
) -> Result<DiffBasis, WarehouseError> {
    let what = "read what decides a sync's diff";
    let sql = watermark_sql("loopsync.runs", "loopsync.records", "$1", "$2");
    let rows = x.query(what, &sql, params![&sync, &column]).await?;
    let Some(mark) = rows.first() else {
        return Ok(DiffBasis::default());
    };
    let (watermark, mark_run) = (mark.int(0)?, mark.int(1)?);
    let rows = x
        .query(
            what,
            &format!(
                "SELECT max(id) FROM loopsync.runs
                  WHERE sync = $1 AND status NOT IN ({in_progress})",
                in_progress = OPEN
            ),
            params![&sync],
        )
        .await?;
    let latest = first(&rows, what)?.opt_int(0)?;
    let d = x.dialect().clone();
    let sql = format!(
        "SELECT {age}, r.shape_seed FROM loopsync.runs r
          WHERE r.sync = $1 AND r.diff_kind = 'full' AND r.cursor_column = $2
            AND r.cursor_high IS NOT NULL AND {settled}
            AND NOT EXISTS (SELECT 1 FROM loopsync.runs a
                             WHERE a.sync = r.sync AND a.id > r.id AND a.status = 'adopted')
          ORDER BY r.id DESC LIMIT 1",
        age = d.millis_between("r.requested_at", d.now()),
        settled = settled_run_sql("r", "loopsync.records"),
    );
    let rows = x.query(what, &sql, params![&sync, &column]).await?;
    Ok(DiffBasis {
        watermark: Some(watermark),
        latest_run_settled: latest == Some(mark_run),
        full_diff_age_ms: rows.first().map(|r| r.int(0)).transpose()?,
        full_diff_seed: rows.first().map(|r| r.opt_int(1)).transpose()?.flatten(),
    })
}

fn first<'r>(rows: &'r [Row], what: &str) -> Result<&'r Row, WarehouseError> {
    rows.first().ok_or_else(|| WarehouseError::Query {
        what: what.to_owned(),
        detail: "no row".into(),
    })
}

/// A shared rate budget's entry ([`crate::StateStore::read_rate_slot`]).
pub(crate) async fn read_rate_slot(
    x: &mut dyn Exec,
    budget: String,
) -> Result<Option<RateSlot>, WarehouseError> {
    let rows = x
        .query(
            "read a rate budget",
            "SELECT next_due, COALESCE(written_at, 0), revision FROM loopsync.rate_slots
              WHERE budget = $1",
            params![&budget],
        )
        .await?;
    rows.first()
        .map(|r| {
            Ok(RateSlot {
                next_due: r.int(0)?,
                written_at: r.int(1)?,
                revision: r.int(2)?,
            })
        })
        .transpose()
}

/// Stores a shared rate budget's next due time and its writer's clock if its revision is still
/// `expected` (`None`: if it has none yet): one statement, atomic on both stores
/// (compare-and-set). The new revision, or `None` when another process wrote first
/// ([`crate::StateStore::swap_rate_slot`]).
pub(crate) async fn swap_rate_slot(
    x: &mut dyn Exec,
    budget: String,
    next: i64,
    written_at: i64,
    expected: Option<i64>,
) -> Result<Option<i64>, WarehouseError> {
    let changed = match expected {
        Some(revision) => {
            x.execute(
                "take a rate budget's slots",
                "UPDATE loopsync.rate_slots SET next_due = $2, written_at = $3,
                        revision = revision + 1
                  WHERE budget = $1 AND revision = $4",
                params![&budget, next, written_at, revision],
            )
            .await?
        }
        None => {
            x.execute(
                "take a rate budget's first slots",
                "INSERT INTO loopsync.rate_slots (budget, next_due, written_at, revision)
                 VALUES ($1, $2, $3, 1)
                 ON CONFLICT (budget) DO NOTHING",
                params![&budget, next, written_at],
            )
            .await?
        }
    };
    Ok((changed == 1).then(|| expected.map_or(1, |r| r + 1)))
}
