//! The rules of personal data kept in the state, for both stores: finding one person's
//! records, erasing them (`loopsync forget`), and pruning the per-run results older than the
//! retention (`[warehouse] records_retention`).

use loopsync_core::envelope::OldContact;

use super::{Exec, Row, params};
use crate::{Erasure, KeptRecord, Person, WarehouseError, identities_of};

/// What replaces a stored text (a record's reason, a run's error) that names an erased person.
pub(crate) const ERASED_TEXT: &str = "(erased by loopsync forget)";

/// The state's columns of a [`KeptRecord`], as [`kept`] reads them. The noted email is the
/// row's only while the row is noted (`model_hash`): a confirmation or a removal clears the
/// hash and leaves the email, which may then be one the record handed to another.
const KEPT: &str = "key, confirmed_email, confirmed_user_id, emitted_email, emitted_user_id,
                    CASE WHEN model_hash IS NOT NULL THEN model_email END, possibly_applied";

fn kept(row: &Row) -> Result<KeptRecord, WarehouseError> {
    Ok(KeptRecord {
        key: row.text(0)?,
        confirmed_email: row.opt_text(1)?,
        confirmed_user_id: row.opt_text(2)?,
        emitted_email: row.opt_text(3)?,
        emitted_user_id: row.opt_text(4)?,
        model_email: row.opt_text(5)?,
        possibly_applied: identities_of(row.opt_text(6)?),
        in_state: true,
    })
}

/// The records of `sync` that are `person`: by key, the record of that key (in the state, or
/// only in the results); by email (given as the email rule keeps it), every record whose
/// confirmed, model or sent email is it, or whose possibly applied identities hold it, and the
/// records whose key is that email.
pub(crate) async fn find_person(
    x: &mut dyn Exec,
    sync: String,
    person: Person,
) -> Result<Vec<KeptRecord>, WarehouseError> {
    let d = x.dialect().clone();
    let mut found: Vec<KeptRecord> = Vec::new();
    let (state_sql, results_sql, value) = match &person {
        Person::Key(key) => (
            format!("SELECT {KEPT} FROM loopsync.state WHERE sync = $1 AND key = $2"),
            "SELECT DISTINCT key FROM loopsync.records WHERE sync = $1 AND key = $2
             UNION SELECT DISTINCT key FROM loopsync.attempts WHERE sync = $1 AND key = $2"
                .to_owned(),
            key.clone(),
        ),
        Person::Email(email) => (
            format!(
                "SELECT {KEPT} FROM loopsync.state
                  WHERE sync = $1 AND ({c} = $2 OR {e} = $2
                        OR ({m} = $2 AND model_hash IS NOT NULL)
                        OR (possibly_applied IS NOT NULL AND {p}))",
                c = d.email_key("confirmed_email"),
                e = d.email_key("emitted_email"),
                m = d.email_key("model_email"),
                p = d.contains("lower(possibly_applied)", "$2"),
            ),
            format!(
                "SELECT DISTINCT key FROM loopsync.records WHERE sync = $1 AND {k} = $2
                 UNION SELECT DISTINCT key FROM loopsync.attempts WHERE sync = $1 AND {k} = $2",
                k = d.email_key("key")
            ),
            email.clone(),
        ),
    };
    for row in x
        .query(
            "find a person's records",
            &state_sql,
            params![&sync, &value],
        )
        .await?
    {
        let record = kept(&row)?;
        // The text search of the identities is a pre-filter: the email must be one of them.
        if let Person::Email(email) = &person
            && ![
                &record.confirmed_email,
                &record.emitted_email,
                &record.model_email,
            ]
            .iter()
            .any(|e| e.as_deref().is_some_and(|e| same_email(e, email)))
            && !record
                .possibly_applied
                .iter()
                .any(|c: &OldContact| c.email.as_deref().is_some_and(|e| same_email(e, email)))
        {
            continue;
        }
        found.push(record);
    }
    for row in x
        .query(
            "find a person's results",
            &results_sql,
            params![&sync, &value],
        )
        .await?
    {
        let key = row.text(0)?;
        if !found.iter().any(|r| r.key == key) {
            found.push(KeptRecord {
                key,
                ..KeptRecord::default()
            });
        }
    }
    found.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(found)
}

fn same_email(stored: &str, email: &str) -> bool {
    loopsync_core::value::normalize_email(stored) == email
}

/// Erases the records `keys` of `sync`: their state, results, attempts and acceptance; and every stored
/// text of the sync (a record's reason, an attempt's, a run's error) that holds one of `emails`
/// (lower-cased) is replaced by [`ERASED_TEXT`]. Refused while the sync has a run in progress
/// (its outcomes would write the records again).
pub(crate) async fn erase_person(
    x: &mut dyn Exec,
    sync: String,
    mut keys: Vec<String>,
    emails: Vec<String>,
) -> Result<Erasure, WarehouseError> {
    x.lock_sync_runs(&sync).await?;
    super::rules::refuse_a_second_run(x, &sync).await?;
    keys.sort();
    keys.dedup();
    // Row locks in (sync, key) order, as the checkpointer takes them: no deadlock.
    for key in &keys {
        x.lock_rows(
            "lock a record to erase",
            "SELECT key FROM loopsync.state WHERE sync = $1 AND key = $2 FOR UPDATE",
            params![&sync, key],
        )
        .await?;
    }
    let mut erasure = Erasure::default();
    for key in &keys {
        for (table, count) in [
            ("state", &mut erasure.state),
            ("records", &mut erasure.records),
            ("attempts", &mut erasure.attempts),
        ] {
            *count += x
                .execute(
                    "erase a record",
                    &format!("DELETE FROM loopsync.{table} WHERE sync = $1 AND key = $2"),
                    params![&sync, key],
                )
                .await?;
        }
        // Its acceptance as invalid (`loopsync rejections accept`), if any: the key goes.
        x.execute(
            "erase a record's acceptance",
            "DELETE FROM loopsync.accepted WHERE sync = $1 AND key = $2",
            params![&sync, key],
        )
        .await?;
    }
    let d = x.dialect().clone();
    for email in emails.iter().filter(|e| !e.is_empty()) {
        // Another record's noted email left stale by a re-key (the email handed over): the
        // note goes, and the row is read again by the next run.
        erasure.texts += x
            .execute(
                "erase a stale noted email",
                &format!(
                    "UPDATE loopsync.state SET model_email = NULL, model_hash = NULL
                      WHERE sync = $1 AND {m} = $2",
                    m = d.email_key("model_email"),
                ),
                params![&sync, email],
            )
            .await?;
        for (table, column) in [
            ("records", "reason"),
            ("attempts", "reason"),
            ("runs", "error"),
        ] {
            erasure.texts += x
                .execute(
                    "erase texts that name a person",
                    &format!(
                        "UPDATE loopsync.{table} SET {column} = $3
                          WHERE sync = $1 AND {column} IS NOT NULL AND {contains}",
                        contains = d.contains(&format!("lower({column})"), "$2"),
                    ),
                    params![&sync, email.to_lowercase(), ERASED_TEXT],
                )
                .await?;
        }
    }
    Ok(erasure)
}

/// Deletes the results and attempts of the runs requested more than `seconds` ago and finished
/// (of every sync); how many results went. A run whose dead letters go with them no longer
/// gives an event sync's watermark (its cursor is forgotten), so what it failed to send is
/// still read again. The runs stay, with their counts.
pub(crate) async fn prune_records(x: &mut dyn Exec, seconds: f64) -> Result<u64, WarehouseError> {
    let d = x.dialect().clone();
    let old = format!(
        "SELECT id FROM loopsync.runs
          WHERE requested_at < {ago} AND status NOT IN ('requested', 'extracting', 'sending')",
        ago = d.ago("$1")
    );
    x.execute(
        "forget the cursor of pruned runs",
        &format!(
            "UPDATE loopsync.runs SET cursor_high = NULL
              WHERE cursor_high IS NOT NULL AND id IN ({old})
                AND EXISTS (SELECT 1 FROM loopsync.records x
                             WHERE x.run_id = loopsync.runs.id AND x.outcome = 'dead_lettered')"
        ),
        params![seconds],
    )
    .await?;
    x.execute(
        "prune old attempts",
        &format!("DELETE FROM loopsync.attempts WHERE run_id IN ({old})"),
        params![seconds],
    )
    .await?;
    x.execute(
        "prune old results",
        // A dead letter stays while its run keeps a cursor: a run that became old, or closed,
        // after the first statement would otherwise lose its dead letters and keep its cursor,
        // and count as clean for an event sync's watermark. The next prune takes it.
        &format!(
            "DELETE FROM loopsync.records WHERE run_id IN ({old})
               AND (outcome <> 'dead_lettered'
                    OR run_id IN (SELECT id FROM loopsync.runs WHERE cursor_high IS NULL))"
        ),
        params![seconds],
    )
    .await
}
