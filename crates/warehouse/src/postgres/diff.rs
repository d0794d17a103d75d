//! PostgreSQL's diff: the model joined with the state in the warehouse, or a source's rows
//! staged by binary `COPY`; a contact sync's rows hashed, so that unchanged ones are left out.

use loopsync_core::value::parse_date_millis;

use super::*;

/// The diff's `work_mem`: its hash join holds the sync's state keys (about 55 MB a million).
/// Beyond it PostgreSQL spills to temporary files, slower but bounded.
pub(super) const DIFF_WORK_MEM: &str = "128MB";

/// How an incremental diff compares the state's keys (text) with the model's key: in the
/// key's own type where it knows one, so that an index on the key serves (a key the type
/// cannot be is no key of the model, and is left out before the cast), else as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyType {
    /// `smallint`, `integer`, `bigint`: the bounds.
    Integer(&'static str, &'static str, &'static str),
    Uuid,
    /// `text`, `varchar`: compared as they are.
    Text,
    /// Any other: the key cast to text, which no index serves.
    Other,
}

impl KeyType {
    pub(super) fn of(ty: &tokio_postgres::types::Type) -> KeyType {
        use tokio_postgres::types::Type;
        match *ty {
            Type::INT2 => KeyType::Integer("smallint", "-32768", "32767"),
            Type::INT4 => KeyType::Integer("integer", "-2147483648", "2147483647"),
            Type::INT8 => KeyType::Integer("bigint", "-9223372036854775808", "9223372036854775807"),
            Type::UUID => KeyType::Uuid,
            Type::TEXT | Type::VARCHAR => KeyType::Text,
            _ => KeyType::Other,
        }
    }

    /// `pk` is one of the keys (text) in column `column` of `keys` (a query): a semi-join,
    /// which PostgreSQL runs by the key's index or hashed, never searching a list per row.
    fn within(&self, pk: &str, keys: &str, column: &str) -> String {
        let c = format!("q.{column}");
        let typed = |ty: &str, valid: String| {
            format!("{pk} IN (SELECT CAST({c} AS {ty}) FROM ({keys}) AS q WHERE {valid})")
        };
        match self {
            KeyType::Integer(ty, min, max) => typed(
                ty,
                format!(
                    "CASE WHEN {c} ~ '^-?[0-9]{{1,19}}$'
                          THEN CAST({c} AS numeric) BETWEEN {min} AND {max} ELSE false END"
                ),
            ),
            KeyType::Uuid => typed(
                "uuid",
                format!(
                    "{c} ~ '^[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}$'"
                ),
            ),
            KeyType::Text => format!("{pk} IN (SELECT {c} FROM ({keys}) AS q)"),
            KeyType::Other => format!("({pk})::text IN (SELECT {c} FROM ({keys}) AS q)"),
        }
    }
}

/// The state's columns the decider reads beside a row (`x`, a state row; `model_email` as `xme`).
const STATE_COLUMNS: &str = "x.confirmed_fp, x.confirmed_email, x.confirmed_user_id, x.parked_fp,
     x.generation, x.model_email AS xme, x.emitted_run, x.emitted_fp, x.confirmed_run,
     x.resubscribe, x.emitted_email, x.emitted_user_id, x.possibly_applied";

/// `c` of [`changes_sql`] when `m` is the whole model (see its comment there).
const WHOLE_MODEL_C: &str = "c AS MATERIALIZED (
                  SELECT * FROM c0
                  UNION ALL
                  SELECT m.*, s.key, s.model_hash
                    FROM m JOIN s ON s.key = m.k
                   WHERE s.model_hash = m.h
                     AND m.ek IN (SELECT ek FROM c0 WHERE ek IS NOT NULL AND ek <> '')
                  UNION ALL
                  SELECT m.*, s.key, s.model_hash
                    FROM m JOIN s ON s.key = m.k
                   WHERE s.model_hash = m.h
                     AND m.k IN (SELECT k FROM c0 WHERE k IS NOT NULL)
                     AND NOT EXISTS (SELECT 1 FROM (SELECT DISTINCT ek FROM c0 WHERE ek <> '') x
                                      WHERE x.ek = m.ek)),";

/// A contact sync's diff that leaves out what is unchanged ([`Warehouse::diff_changes`]): the
/// model's rows are hashed in the warehouse (the key and the mapped columns as a row's text,
/// seeded by the sync's shape, `$2`) and joined with the state on the key; a row whose hash is
/// the one noted when it was last found unchanged (`model_hash`, cleared whenever Loops'
/// confirmed fingerprint changes) is not read out, nor is its state. Read out, as
/// [`diff_sql`] gives them: new rows, changed rows, removed keys, NULL keys; and, for each
/// row read out with an email, how many model rows carry it: those read out, plus the rows noted
/// with it (`model_email`) less those of them read out (two unchanged rows cannot share an
/// email, or they would not have been noted). Its last row counts what was left out (column
/// `untold`). Only the rows read out are looked up, sorted or counted: no statement is planned
/// over the estimate of all rows, which PostgreSQL cannot know before the hash join.
///
/// With `window` (a contact sync's incremental diff, see `loopsync_core::spec::Incremental`)
/// it goes through only the model rows whose cursor is at or after `$3` (or NULL) and those
/// of the keys the state has not noted unchanged (new to the state since, sent, parked,
/// possibly applied, repaired, found invalid, …), and outside the window the rows sharing a
/// key or a noted email with a row read out; every other row is taken to be as noted, and no
/// key is found removed. Each row gone through is looked up in the state once, by its key's
/// index. Its last row also carries the highest cursor of the
/// rows gone through, not after now (column `cursor_high`; a sync without a cursor: NULL).
pub(super) fn changes_sql(spec: &SyncSpec, window: Option<&KeyType>) -> String {
    let columns = spec.columns();
    let pk = format!("model.{}", quote_ident(&spec.primary_key));
    let mut raw = vec![pk.clone()];
    raw.extend(columns.iter().map(|c| format!("model.{}", quote_ident(c))));
    let ek = match spec.property("email") {
        Some(p) => email_key(&format!("(model.{})::text", quote_ident(&p.column))),
        None => "CAST(NULL AS text)".to_owned(),
    };
    let model_columns: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!(", model.{} AS c{i}", quote_ident(c)))
        .collect();
    let out_columns: Vec<String> = (0..columns.len())
        .map(|i| format!(", (e.c{i})::text AS c{i}"))
        .collect();
    let tail_columns: Vec<String> = (0..columns.len())
        .map(|i| format!(", CAST(NULL AS text) AS c{i}"))
        .collect();
    // The cursor as `m` holds it (its column among the mapped ones), and its highest value.
    let cursor = spec.cursor().map(|c| {
        let i = columns
            .iter()
            .position(|x| *x == c.column)
            .expect("a cursor is read");
        (format!("model.{}", quote_ident(&c.column)), format!("c{i}"))
    });
    let cursor_high = match &cursor {
        Some((_, c)) => format!("(SELECT (max({c}))::text FROM m WHERE {c} <= now())"),
        None => "CAST(NULL AS text)".to_owned(),
    };
    // A model row as `m` holds it, of the rows that meet `condition`.
    let model_rows = |condition: &str| {
        format!(
            "SELECT 1 AS present, ({pk})::text AS k,
                    hashtextextended(ROW({raw})::text, $2) AS h, {ek} AS ek{model_columns}
               FROM ({model}) AS model WHERE {condition}",
            raw = raw.join(", "),
            model_columns = model_columns.concat(),
            model = model_sql(&spec.model),
        )
    };
    let (m, pre, c0, c, e, ecount, untold) = match (&cursor, window) {
        (Some((column, _)), Some(key_type)) => {
            // The window: rows whose cursor is at or after `$3` or NULL, and NULL keys (one
            // `OR` of conditions an index on each column can serve); then the rows of the keys
            // the state has not noted, wherever their cursor is (a semi-join on the key, in
            // its own type: by its index, or hashed — never a list searched per row).
            let recent = format!(
                "{column} >= CAST(CAST($3 AS text) AS timestamptz) OR {column} IS NULL
                 OR {pk} IS NULL"
            );
            let unnoted = "SELECT key FROM loopsync.state WHERE sync = $1 AND model_hash IS NULL";
            let m = format!(
                "{} UNION ALL {}",
                model_rows(&recent),
                model_rows(&format!(
                    "{} AND NOT ({recent})",
                    key_type.within(&pk, unnoted, "key")
                )),
            );
            // Each row gone through is looked up in the state once, every column the decider
            // reads with it (`ms`): an index lookup per row (`OFFSET 0`: not a join PostgreSQL
            // would plan for its estimate of all rows), not one more per row read out.
            let state_of = |k: &str| {
                format!(
                    "LATERAL (SELECT * FROM loopsync.state x
                               WHERE x.sync = $1 AND x.key = {k} OFFSET 0) x ON true"
                )
            };
            let pre = format!(
                "ms AS MATERIALIZED (
                  SELECT m.*, x.key AS skey, x.model_hash AS smh, {STATE_COLUMNS}
                    FROM m LEFT JOIN {x}),",
                x = state_of("m.k")
            );
            let c0 = "SELECT * FROM ms WHERE skey IS NULL OR smh IS DISTINCT FROM h".to_owned();
            // As over the whole model (`WHOLE_MODEL_C`), within the window; and every row
            // outside it whose key a row read out carries (a second copy of a key must not
            // become a re-key that removes the first's contact), or that the state noted with
            // an email a row read out carries. So every row of the model sharing a key or an
            // email with a row read out is read, as the full diff reads them — but a row that
            // arrived later than the lookback with no state (see docs/syncs.md).
            let partners = "SELECT k FROM c0 WHERE k IS NOT NULL
                 UNION SELECT y.key FROM loopsync.state y
                  WHERE y.sync = $1 AND y.model_hash IS NOT NULL
                    AND y.model_email IN (SELECT ek FROM c0 WHERE ek IS NOT NULL AND ek <> '')";
            let outside = model_rows(&format!(
                "{} AND NOT ({recent})
                 AND NOT EXISTS (SELECT 1 FROM loopsync.state u
                                  WHERE u.sync = $1 AND u.key = ({pk})::text
                                    AND u.model_hash IS NULL)",
                key_type.within(&pk, partners, "k")
            ));
            let c = format!(
                "c AS MATERIALIZED (
                  SELECT * FROM c0
                  UNION ALL
                  SELECT * FROM ms
                   WHERE smh = h
                     AND ek IN (SELECT ek FROM c0 WHERE ek IS NOT NULL AND ek <> '')
                  UNION ALL
                  SELECT * FROM ms
                   WHERE smh = h
                     AND k IN (SELECT k FROM c0 WHERE k IS NOT NULL)
                     AND NOT EXISTS (SELECT 1 FROM (SELECT DISTINCT ek FROM c0 WHERE ek <> '') y
                                      WHERE y.ek = ms.ek)
                  UNION ALL
                  SELECT o.*, x.key, x.model_hash, {STATE_COLUMNS}
                    FROM ({outside}) AS o LEFT JOIN {o}),",
                o = state_of("o.k"),
            );
            // Every model row carrying an email read out is in `e`: they are counted, and a
            // noted email whose row has left the model no longer counts.
            let ecount = "count(*) OVER (PARTITION BY e.ek)".to_owned();
            // The noted rows left out: every state row less the unnoted ones (an index each).
            let untold = "(SELECT count(*) FROM loopsync.state WHERE sync = $1)
                          - (SELECT count(*) FROM loopsync.state WHERE sync = $1 AND model_hash IS NULL)";
            // `c` carries the state's columns already.
            let e = "SELECT * FROM c".to_owned();
            (m, pre, c0, c, e, ecount, untold)
        }
        _ => (
            model_rows("true"),
            String::new(),
            "SELECT m.*, s.key AS skey, s.model_hash AS smh
               FROM m FULL OUTER JOIN s ON s.key = m.k
              WHERE m.k IS NULL OR s.key IS NULL OR s.model_hash IS DISTINCT FROM m.h"
                .to_owned(),
            WHOLE_MODEL_C.to_owned(),
            // An index lookup per row read out (`OFFSET 0`: not a join PostgreSQL would plan
            // for its estimate of all rows).
            format!(
                "SELECT c.*, {STATE_COLUMNS}
                   FROM c LEFT JOIN LATERAL (
                            SELECT * FROM loopsync.state x WHERE x.sync = $1 AND x.key = c.skey OFFSET 0
                        ) x ON true"
            ),
            "count(*) OVER (PARTITION BY e.ek)
                                   + (SELECT count(*) FROM loopsync.state y
                                       WHERE y.sync = $1 AND y.model_email = e.ek
                                         AND y.model_hash IS NOT NULL)
                                   - COALESCE(g.n, 0)"
                .to_owned(),
            "(SELECT count(*) FROM loopsync.state WHERE sync = $1 AND model_hash IS NOT NULL)",
        ),
    };
    format!(
        "WITH m AS ({m}),
              s AS (SELECT key, model_hash FROM loopsync.state WHERE sync = $1),
              {pre}
              c0 AS MATERIALIZED ({c0}),
              -- A row in sync whose email, or whose key, a row read out now carries is read out
              -- too: every row of a duplicated email or key is invalid, as in the plain diff.
              -- (Two copies of a key both equal to its noted row are not read: unchanged.)
              -- Two semi-joins, never `ek IN (…) OR k IN (…)`: an OR keeps each IN a subplan, and
              -- over `c0`, whose size PostgreSQL estimates in billions (a CTE has no statistics),
              -- an unhashed one that rescans `c0` for every model row (minutes at 1 M rows).
              -- The second leaves out what the first read (its email is one read out), by an
              -- anti-join with c0's distinct emails: estimated at 200 rows, hashed at once (over
              -- c0 itself, estimated at billions, the hash was split into batches: 30 s).
              {c}
              e AS MATERIALIZED ({e}),
              g AS (SELECT xme, count(DISTINCT skey) AS n FROM e
                     WHERE smh IS NOT NULL AND xme IS NOT NULL GROUP BY xme),
              d AS (
                  SELECT 0 AS tail, e.present, COALESCE(e.k, e.skey) AS key{out_columns},
                         e.confirmed_fp, e.confirmed_email, e.confirmed_user_id,
                         CASE WHEN e.ek IS NULL OR e.ek = '' THEN CAST(1 AS bigint)
                              ELSE {ecount}
                         END AS ecount,
                         e.parked_fp, e.generation, e.h AS model_hash, CAST(NULL AS bigint) AS untold,
                         {unsure} AS unsure, e.resubscribe, CAST(1 AS bigint) AS ucount,
                         e.emitted_email, e.emitted_user_id, e.possibly_applied,
                         CAST(NULL AS text) AS cursor_high
                    FROM e LEFT JOIN g ON g.xme = e.ek
                  UNION ALL
                  SELECT 1, NULL, NULL{tail_columns}, NULL, NULL, NULL, CAST(NULL AS bigint), NULL,
                         CAST(NULL AS bigint), CAST(NULL AS bigint),
                         {untold} - (SELECT count(DISTINCT skey) FROM c WHERE smh IS NOT NULL),
                         CAST(NULL AS bigint), CAST(NULL AS bigint), CAST(NULL AS bigint),
                         CAST(NULL AS text), CAST(NULL AS text), CAST(NULL AS text), {cursor_high})
         SELECT present, key{outer}, confirmed_fp, confirmed_email, confirmed_user_id, ecount,
                parked_fp, generation, model_hash, untold, unsure, resubscribe, ucount,
                emitted_email, emitted_user_id, possibly_applied, cursor_high
           FROM d ORDER BY tail, key COLLATE \"C\" NULLS LAST",
        unsure = crate::UNSURE.replace("s.", "e."),
        out_columns = out_columns.concat(),
        tail_columns = tail_columns.concat(),
        outer = (0..columns.len()).map(|i| format!(", c{i}")).collect::<String>(),
    )
}

/// the "C" collation folds ASCII only), as `loopsync_core::value::normalize_email` does.
pub(crate) fn email_key(expression: &str) -> String {
    format!("lower({} COLLATE \"C\")", trimmed(expression))
}

/// Trimmed of `EMAIL_TRIM` (Unicode's white space), as Rust's `str::trim` does: a userId as
/// the transformer sends it.
pub(crate) fn trimmed(expression: &str) -> String {
    let set: String = EMAIL_TRIM
        .iter()
        .map(|c| format!("\\{:04X}", *c as u32))
        .collect();
    format!("btrim({expression}, U&'{set}')")
}

/// The state table as a read-only command reads it when there is none: no rows, its columns.
pub(super) const EMPTY_STATE: &str = "(SELECT CAST(NULL AS text) AS sync, CAST(NULL AS text) AS key, \
     CAST(NULL AS text) AS confirmed_fp, CAST(NULL AS text) AS confirmed_email, \
     CAST(NULL AS text) AS confirmed_user_id, CAST(NULL AS text) AS parked_fp, \
     CAST(NULL AS bigint) AS generation, CAST(NULL AS bigint) AS emitted_run, \
     CAST(NULL AS text) AS emitted_fp, \
     CAST(NULL AS bigint) AS confirmed_run, CAST(NULL AS bigint) AS resubscribe, \
     CAST(NULL AS text) AS emitted_email, CAST(NULL AS text) AS emitted_user_id, \
     CAST(NULL AS text) AS possibly_applied \
     WHERE false) AS empty_state";

impl Pg {
    /// The diff, on a connection of its own; with `staged`, a source's rows are first loaded
    /// into [`STAGED`], a temporary table of that connection, which stands for the model.
    pub(super) async fn diff_rows(
        &self,
        spec: &SyncSpec,
        since: Option<i64>,
        leave_out_unchanged: bool,
        staged: Option<ModelRows>,
        absent: bool,
    ) -> Result<BoxStream<'static, Result<DiffRow, WarehouseError>>, WarehouseError> {
        // Its own connection: the stream holds it until drained.
        let client = open(&self.config).await?;
        client
            // No JIT: its compilation costs more than it saves on a diff (0.8 s measured on
            // 100 000 rows, whose plan PostgreSQL overestimates before its statistics are in).
            // No merge join: PostgreSQL cannot estimate the join of the model's keys (text of an
            // expression) with the state's, and takes it for billions of rows; it then sorted
            // the model, three times, for merge joins where a hash join reads it once
            // (`EXPLAIN ANALYZE` at 1 M rows: 9.3 s, hashed 4.7 s; docs/benchmarks.md).
            .batch_execute(&self.sql(&format!(
                "SET TIME ZONE 'UTC'; SET work_mem = '{DIFF_WORK_MEM}'; SET jit = off;
                 SET enable_mergejoin = off"
            )))
            .await
            .map_err(query_error("set the time zone"))?;
        if staged.is_none() {
            // The model only reads: a data-modifying statement in it (`WITH x AS (DELETE …)`)
            // is refused by PostgreSQL, not run. (A staged diff writes its temporary table.)
            client
                .batch_execute("SET default_transaction_read_only = on")
                .await
                .map_err(query_error("make the diff's session read-only"))?;
        }
        let is_staged = staged.is_some();
        let staged_spec_;
        let spec = match staged {
            Some(model) => {
                staged_spec_ = staged_spec(spec, &model.columns, |c| {
                    format!("CAST({c} AS timestamptz)")
                });
                stage(&client, model).await?;
                &staged_spec_
            }
            None => spec,
        };
        // An event sync reads few rows (a cursor) or sends each row once: it reads all it reads.
        let hashed = leave_out_unchanged && !spec.is_append() && !absent;
        // A contact sync's incremental diff: only the model in this database, whose rows it
        // noted (see `diffs_incrementally`); anything else diffs in full.
        let incremental = hashed && !is_staged && Keeper::diffs_incrementally(self, spec);
        let window = since.filter(|_| incremental);
        // Until rows are noted (a first run, after a reset or a change of the mapping), all are
        // read out: the plain diff, with the rows' hashes to note, costs less.
        // A sync that maps a userId counts the model's userIds (a duplicate is invalid): every
        // row is read, as the noted rows keep only their emails.
        // A sync that may diff incrementally always reads through `changes_sql`, whose last
        // row carries the highest cursor by the warehouse's own clock (its watermark).
        let leave_out = incremental
            || (hashed
                && spec.property("userId").is_none()
                && client
                    .query_one(
                        &*self.sql(
                            "SELECT EXISTS (SELECT 1 FROM loopsync.state
                                     WHERE sync = $1 AND model_hash IS NOT NULL)",
                        ),
                        &[&spec.name],
                    )
                    .await
                    .map_err(query_error("look for noted records"))?
                    .get::<_, bool>(0));
        // A model that does not run (42: syntax, names, privileges; 0A: not supported, such as
        // a data-modifying WITH inside it; 2F, 38, 39, P0: a function it calls failed), or
        // that would write (25: refused in the read-only session): the config's to fix, not
        // retried.
        let is_model = |e: &tokio_postgres::Error| {
            e.code().is_some_and(|c| {
                ["42", "0A", "25", "2F", "38", "39", "P0"]
                    .iter()
                    .any(|class| c.code().starts_with(class))
            })
        };
        // The window compares keys in the model key's own type: asked of the model, unrun.
        let key_type = match window {
            Some(_) => {
                let probe = format!(
                    "SELECT model.{} FROM ({}) AS model LIMIT 0",
                    quote_ident(&spec.primary_key),
                    model_sql(&spec.model)
                );
                match client.prepare(&self.sql(&probe)).await {
                    Ok(statement) => Some(KeyType::of(statement.columns()[0].type_())),
                    Err(e) if is_model(&e) => return Err(model_error(&client, spec, &e).await),
                    Err(e) => return Err(classify(&format!("diff of sync {}", spec.name), &e)),
                }
            }
            None => None,
        };
        let row_hash = |raw: &str| format!("hashtextextended(ROW({raw})::text, $2)");
        let sql = if leave_out {
            changes_sql(spec, key_type.as_ref())
        } else {
            diff_sql(
                spec,
                &DiffDialect {
                    cast: &|e| format!("({e})::text"),
                    state: if absent {
                        EMPTY_STATE
                    } else {
                        "loopsync.state"
                    },
                    param: "$1",
                    collate: "COLLATE \"C\"",
                    email_key: &email_key,
                    trimmed: &trimmed,
                    inline_state: false,
                },
                cursor_condition(spec, |c| at_or_after(c, "CAST($2 AS text)")),
                hashed.then_some(&row_hash as &dyn Fn(&str) -> String),
            )
        };
        tracing::debug!(sync = %spec.name, seed = spec.shape_seed(), %sql, "diff");
        let statement = match client.prepare(&self.sql(&sql)).await {
            Ok(statement) => statement,
            Err(e) if is_model(&e) => return Err(model_error(&client, spec, &e).await),
            Err(e) => return Err(classify(&format!("diff of sync {}", spec.name), &e)),
        };
        let since = (!hashed && statement.params().len() > 1).then(|| cursor_since(since));
        let seed = spec.shape_seed();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&spec.name];
        if let Some(since) = &since {
            params.push(since);
        }
        if hashed {
            params.push(&seed);
        }
        let window_since = window.map(|w| cursor_since(Some(w)));
        if let Some(since) = &window_since {
            params.push(since);
        }
        let rows = match client
            .query_raw(&statement, params.iter().map(|p| *p as &dyn ToSql))
            .await
        {
            Ok(rows) => rows,
            Err(e) if is_model(&e) => return Err(model_error(&client, spec, &e).await),
            Err(e) => return Err(classify(&format!("diff of sync {}", spec.name), &e)),
        };
        let columns = spec.columns();
        let sync = spec.name.clone();
        let stream = rows.map(move |row| {
            // The client lives as long as the stream.
            let _connection = &client;
            // A stream cut by an outage is retried (the extractor's message comes back); a
            // model that would write is refused for good.
            let row = row.map_err(|e| {
                if e.code().is_some_and(|c| {
                    ["0A", "25", "2F", "38", "39", "P0"]
                        .iter()
                        .any(|class| c.code().starts_with(class))
                }) {
                    WarehouseError::model(
                        sync.clone(),
                        format!("{} (the model only reads)", describe(&e)),
                    )
                } else {
                    classify(&format!("diff of sync {sync}"), &e)
                }
            })?;
            if leave_out {
                let untold: Option<i64> = row.get(9 + columns.len());
                if let Some(n) = untold {
                    let high: Option<String> = row.get("cursor_high");
                    return Ok(DiffRow {
                        cursor_high: high.as_deref().and_then(parse_date_millis),
                        ..DiffRow::untold(n)
                    });
                }
            }
            let present: Option<i32> = row.get(0);
            let key: Option<String> = row.get(1);
            let values = present.map(|_| {
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.clone(), row.get::<_, Option<String>>(2 + i)))
                    .collect::<BTreeMap<_, _>>()
            });
            Ok(DiffRow {
                key,
                values,
                confirmed_fp: row.get(2 + columns.len()),
                confirmed_email: row.get(3 + columns.len()),
                confirmed_user_id: row.get(4 + columns.len()),
                email_rows: row.get::<_, Option<i64>>(5 + columns.len()).unwrap_or(1),
                parked_fp: row.get(6 + columns.len()),
                generation: row.get::<_, Option<i64>>(7 + columns.len()).unwrap_or(0),
                model_hash: if hashed {
                    row.get(8 + columns.len())
                } else {
                    None
                },
                unchanged_untold: 0,
                cursor_high: None,
                unsure: row.get::<_, Option<i64>>("unsure").unwrap_or(0) != 0,
                resubscribe: row.get::<_, Option<i64>>("resubscribe").unwrap_or(0) != 0,
                user_id_rows: row.get::<_, Option<i64>>("ucount").unwrap_or(1),
                emitted_email: row.get("emitted_email"),
                emitted_user_id: row.get("emitted_user_id"),
                possibly_applied: crate::identities_of(row.get("possibly_applied")),
            })
        });
        // The row counting what was left out says 0 when nothing was: no row then.
        Ok(stream
            .filter(|row| {
                std::future::ready(!matches!(row, Ok(r) if r.key.is_none() && r.values.is_none() && !r.is_untold()))
            })
            .boxed())
    }
}

/// `COPY`, every column text), and analyzes it for the diff's plan.
pub(super) async fn stage(client: &Client, model: ModelRows) -> Result<(), WarehouseError> {
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    let what = "stage the model's rows";
    let ModelRows { columns, mut rows } = model;
    let declared: Vec<String> = columns
        .iter()
        .map(|c| format!("{} text", quote_ident(c)))
        .collect();
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE {STAGED} ({})",
            declared.join(", ")
        ))
        .await
        .map_err(|e| classify(what, &e))?;
    let sink = client
        .copy_in(&format!("COPY {STAGED} FROM STDIN (FORMAT binary)"))
        .await
        .map_err(|e| classify(what, &e))?;
    let types = vec![Type::TEXT; columns.len()];
    let writer = BinaryCopyInWriter::new(sink, &types);
    futures::pin_mut!(writer);
    while let Some(row) = rows.next().await {
        let row = row?;
        let values: Vec<&(dyn ToSql + Sync)> =
            row.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        writer
            .as_mut()
            .write(&values)
            .await
            .map_err(|e| classify(what, &e))?;
    }
    writer.finish().await.map_err(|e| classify(what, &e))?;
    client
        .batch_execute(&format!("ANALYZE {STAGED}"))
        .await
        .map_err(|e| classify(what, &e))
}

/// An event sync's cursor `column` at or after the time `since` (an SQL text expression).
/// The session's time zone is UTC (see `diff`), so a `timestamp` without time zone reads as
/// UTC, as the extractor reads its text.
pub(super) fn at_or_after(column: &str, since: &str) -> String {
    format!("{column} >= CAST({since} AS timestamptz)")
}
