//! SQLite's diff: the model joined with the state on a connection of its own (read-only), or
//! a source's rows staged by inserts into a temporary table.

use super::*;

/// The one email rule in SQL: trimmed of `EMAIL_TRIM`, ASCII letters lower-cased (SQLite's
/// `lower` folds ASCII only), as `loopsync_core::value::normalize_email` does.
pub(crate) fn email_key(expression: &str) -> String {
    format!("lower({})", trimmed(expression))
}

/// Trimmed of `EMAIL_TRIM` (Unicode's white space), as Rust's `str::trim` does: a userId as
/// the transformer sends it.
pub(crate) fn trimmed(expression: &str) -> String {
    let set: Vec<String> = EMAIL_TRIM.iter().map(|c| (*c as u32).to_string()).collect();
    format!("trim({expression}, char({}))", set.join(", "))
}

/// The state table as a read-only command reads it when there is none: no rows, its columns.
pub(super) const EMPTY_STATE: &str = "(SELECT NULL AS sync, NULL AS key, NULL AS confirmed_fp, \
     NULL AS confirmed_email, NULL AS confirmed_user_id, NULL AS parked_fp, \
     NULL AS generation, NULL AS emitted_run, NULL AS emitted_fp, NULL AS confirmed_run, NULL AS resubscribe, \
     NULL AS emitted_email, NULL AS emitted_user_id, NULL AS possibly_applied WHERE 0)";

impl Sqlite {
    /// The diff; with `staged`, the rows of a source are first loaded into [`STAGED`] in the
    /// diff's own connection (`spec` is then the [`staged_spec`]).
    pub(super) async fn diff_rows(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        staged: Option<ModelRows>,
        absent: bool,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        let condition = cursor_condition(spec, |c| at_or_after(c, "?2"));
        let since = condition.as_ref().map(|_| cursor_since(since));
        let sql = diff_sql(
            spec,
            &DiffDialect {
                cast: &|e| format!("CAST({e} AS TEXT)"),
                state: if absent {
                    EMPTY_STATE
                } else {
                    "loopsync_state"
                },
                param: "?1",
                collate: "",
                email_key: &email_key,
                trimmed: &trimmed,
                inline_state: true,
            },
            condition,
            None,
        );
        let columns = spec.columns();
        let sync = spec.name.clone();
        let path = self.path.clone();
        // A model of this file is explained in its own words; a staged one was checked by
        // its source.
        let own_spec = staged.is_none().then(|| spec.clone());
        let staged_rows = staged.map(|model| {
            // The source's rows, pumped to the blocking task that loads them.
            let (rows_tx, rows_rx) = tokio::sync::mpsc::channel(1024);
            let mut rows = model.rows;
            tokio::spawn(async move {
                while let Some(row) = rows.next().await {
                    let stop = row.is_err();
                    if rows_tx.send(row).await.is_err() || stop {
                        break;
                    }
                }
            });
            (model.columns, rows_rx)
        });
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<DiffRow, WarehouseError>>(256);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), WarehouseError>>();
        let schema = self.dialect.schema.clone();
        tokio::task::spawn_blocking(move || {
            set_schema(&schema);
            let model_error = |e: rusqlite::Error| WarehouseError::model(sync.clone(), e);
            let connection = match open_connection(&path) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // The model only reads: a statement that would write is refused (a staged diff
            // writes its temporary table).
            if staged_rows.is_none()
                && let Err(e) = connection.pragma_update(None, "query_only", true)
            {
                let _ = ready_tx.send(Err(error("make the diff's connection read-only")(e)));
                return;
            }
            if let Some((columns, rows)) = staged_rows
                && let Err(e) = stage(&connection, &columns, rows)
            {
                let _ = ready_tx.send(Err(e));
                return;
            }
            let mut statement = match connection.prepare(&q(&sql)) {
                Ok(s) => s,
                Err(e) => {
                    let error = match &own_spec {
                        Some(spec) => explained(&connection, spec, e),
                        None => model_error(e),
                    };
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            let query = match &since {
                Some(since) => statement.query(params![sync, since]),
                None => statement.query(params![sync]),
            };
            let mut rows = match query {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(model_error(e)));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            loop {
                let item = match rows.next() {
                    Ok(None) => break,
                    Ok(Some(row)) => (|| -> rusqlite::Result<DiffRow> {
                        let present: Option<i64> = row.get(0)?;
                        let key: Option<String> = row.get(1)?;
                        let values = match present {
                            Some(_) => {
                                let mut values = BTreeMap::new();
                                for (i, c) in columns.iter().enumerate() {
                                    values.insert(c.clone(), row.get::<_, Option<String>>(2 + i)?);
                                }
                                Some(values)
                            }
                            None => None,
                        };
                        Ok(DiffRow {
                            key,
                            values,
                            confirmed_fp: row.get(2 + columns.len())?,
                            confirmed_email: row.get(3 + columns.len())?,
                            confirmed_user_id: row.get(4 + columns.len())?,
                            email_rows: row.get::<_, Option<i64>>(5 + columns.len())?.unwrap_or(1),
                            parked_fp: row.get(6 + columns.len())?,
                            generation: row.get::<_, Option<i64>>(7 + columns.len())?.unwrap_or(0),
                            model_hash: None,
                            unchanged_untold: 0,
                            cursor_high: None,
                            unsure: row.get::<_, Option<i64>>("unsure")?.unwrap_or(0) != 0,
                            resubscribe: row.get::<_, Option<i64>>("resubscribe")?.unwrap_or(0)
                                != 0,
                            user_id_rows: row.get::<_, Option<i64>>("ucount")?.unwrap_or(1),
                            emitted_email: row.get("emitted_email")?,
                            emitted_user_id: row.get("emitted_user_id")?,
                            possibly_applied: crate::identities_of(row.get("possibly_applied")?),
                        })
                    })()
                    .map_err(|e| WarehouseError::Query {
                        what: format!("diff of sync {sync}"),
                        detail: e.to_string(),
                    }),
                    Err(e) => Err(stepping_error(&sync, e)),
                };
                let stop = item.is_err();
                if tx.blocking_send(item).is_err() || stop {
                    break;
                }
            }
        });
        ready_rx.await.map_err(|_| WarehouseError::Query {
            what: "diff".into(),
            detail: "the diff task ended early".into(),
        })??;
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .boxed())
    }
}

/// An error met while stepping through the diff's rows: SQLite busy or locked (another process
/// writes), out of memory or a failed read of the file may pass, and the read is retried; any
/// other is the model's own, met on a value (a function of the model failing on a row: a
/// malformed JSON, an integer overflow), which a retry would meet again: the run fails at
/// once, as on PostgreSQL, instead of retrying until it stalls.
fn stepping_error(sync: &str, e: rusqlite::Error) -> WarehouseError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | OutOfMemory | SystemIoFailure) | None => {
            WarehouseError::Query {
                what: format!("diff of sync {sync}"),
                detail: e.to_string(),
            }
        }
        Some(_) => WarehouseError::model(sync, e),
    }
}

/// An event sync's cursor `column` at or after the time `since` (an SQL expression), compared
/// by `julianday`. A value SQLite cannot read as a time (`julianday` is NULL: a number, an
/// offset such as `+00`) is read on every run, for the extractor to send or refuse: never
/// dropped silently.
pub(super) fn at_or_after(column: &str, since: &str) -> String {
    format!("julianday({column}) IS NULL OR julianday({column}) >= julianday({since})")
}

/// Loads a source's rows into [`STAGED`], a temporary table of `connection`, in one
/// transaction.
pub(super) fn stage(
    connection: &Connection,
    columns: &[String],
    mut rows: tokio::sync::mpsc::Receiver<Result<crate::source::TextRow, WarehouseError>>,
) -> Result<(), WarehouseError> {
    let declared: Vec<String> = columns
        .iter()
        .map(|c| format!("{} TEXT", quote_ident(c)))
        .collect();
    connection
        .execute_batch(&format!(
            "CREATE TEMP TABLE {STAGED} ({}); BEGIN",
            declared.join(", ")
        ))
        .map_err(error("stage the model's rows"))?;
    let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
    let mut insert = connection
        .prepare(&format!(
            "INSERT INTO {STAGED} VALUES ({})",
            placeholders.join(", ")
        ))
        .map_err(error("stage the model's rows"))?;
    while let Some(row) = rows.blocking_recv() {
        insert
            .execute(rusqlite::params_from_iter(row?.iter()))
            .map_err(error("stage the model's rows"))?;
    }
    connection
        .execute_batch("COMMIT")
        .map_err(error("stage the model's rows"))
}
