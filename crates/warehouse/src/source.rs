//! Warehouses loopsync only reads (MySQL and MariaDB, DuckDB with CSV and Parquet files, or a
//! PostgreSQL replica): a [`Source`] gives the model's rows as text, and the sync's state lives
//! in a state store of its own (SQLite or PostgreSQL, `[warehouse] state`), where the diff runs
//! over the rows it was given (see [`Warehouse::diff_model`](crate::Warehouse::diff_model)).

use async_trait::async_trait;
use futures::stream::BoxStream;
use loopsync_core::spec::SyncSpec;

use crate::{WarehouseError, model_sql};

/// One model row: the columns asked for, in order, as text (`None`: SQL NULL).
pub type TextRow = Vec<Option<String>>;

/// The model's rows, streamed.
pub type TextRows = BoxStream<'static, Result<TextRow, WarehouseError>>;

/// The seam of a warehouse that is only read: it runs the model and gives its rows as text.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// Checks that the model runs and has these columns, without reading a row.
    async fn check_model(&self, spec: &SyncSpec, columns: &[String]) -> Result<(), WarehouseError>;

    /// The model's rows: `columns`, each cast to text by the source, in the source's order.
    /// `since` (Unix milliseconds): an event sync's cursor window, which the source may apply
    /// itself ([`leave_out_before`]); the state store applies it exactly, whatever is given.
    async fn read(
        &self,
        spec: &SyncSpec,
        columns: &[String],
        since: Option<i64>,
    ) -> Result<TextRows, WarehouseError>;
}

/// How a source writes the query that reads a model.
pub(crate) struct SourceDialect {
    /// Quotes an identifier.
    pub quote: fn(&str) -> String,
    /// Casts an expression to text.
    pub cast: fn(&str) -> String,
    /// `column` (of a type the source reads as the state store does) is surely before `at`
    /// (Unix milliseconds), in the source's SQL; see [`leave_out_before`].
    pub before: fn(column: &str, at: i64) -> String,
}

/// The column of an event sync's cursor that a window starting at `since` reads, quoted, of
/// the model's alias; `None` without a cursor or a window.
pub(crate) fn cursor_window(
    spec: &SyncSpec,
    since: Option<i64>,
    dialect: &SourceDialect,
) -> Option<(String, i64)> {
    let cursor = spec.append.as_ref()?.cursor.as_ref()?;
    Some((format!("model.{}", (dialect.quote)(&cursor.column)), since?))
}

/// The condition by which a source reads only an event sync's cursor window: it leaves out the
/// rows whose cursor `column` is surely more than a millisecond before `since`, and reads every
/// other (NULL, a value it cannot compare: the state store keeps those, to send or refuse). It
/// is applied only to a column of a time type whose text the state store reads as the same
/// instant (the source checks the type first), so that it never leaves out a row the state
/// store's exact window keeps; the millisecond covers the store's rounding.
pub(crate) fn leave_out_before(dialect: &SourceDialect, column: &str, since: i64) -> String {
    format!(
        "NOT COALESCE({}, FALSE)",
        (dialect.before)(column, since.saturating_sub(1))
    )
}

/// `SELECT` of `columns` (each cast to text) from the model, the rows that meet `filter`;
/// `probe`: no rows.
pub(crate) fn read_sql(
    spec: &SyncSpec,
    columns: &[String],
    dialect: &SourceDialect,
    probe: bool,
    filter: Option<&str>,
) -> String {
    let select: Vec<String> = columns
        .iter()
        .map(|c| (dialect.cast)(&format!("model.{}", (dialect.quote)(c))))
        .collect();
    format!(
        "SELECT {} FROM ({}) AS model{}{}",
        select.join(", "),
        model_sql(&spec.model),
        filter.map(|f| format!(" WHERE {f}")).unwrap_or_default(),
        if probe { " LIMIT 0" } else { "" }
    )
}

/// The columns a sync reads from its model: the primary key first, then
/// [`SyncSpec::columns`] (which holds an event sync's cursor).
pub fn model_columns(spec: &SyncSpec) -> Vec<String> {
    let mut columns = vec![spec.primary_key.clone()];
    columns.extend(
        spec.columns()
            .into_iter()
            .filter(|c| *c != spec.primary_key),
    );
    columns
}

/// Streams what a blocking or spawned reader sends, after it said whether the model runs.
pub(crate) async fn channel_rows(
    ready: tokio::sync::oneshot::Receiver<Result<(), WarehouseError>>,
    rows: tokio::sync::mpsc::Receiver<Result<TextRow, WarehouseError>>,
    what: &str,
) -> Result<TextRows, WarehouseError> {
    use futures::StreamExt;
    ready.await.map_err(|_| WarehouseError::Query {
        what: what.to_owned(),
        detail: "the reader ended early".into(),
    })??;
    Ok(futures::stream::unfold(rows, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SyncSpec {
        let mut spec = crate::tests::spec("users", "users");
        spec.model = "select * from users;  ".into();
        spec
    }

    #[test]
    fn a_source_reads_the_key_then_the_mapped_columns_as_text() {
        let spec = spec();
        let columns = model_columns(&spec);
        assert_eq!(columns[0], spec.primary_key);
        assert_eq!(columns.len(), 1 + spec.columns().len());
        let mysql = SourceDialect {
            quote: |c| format!("`{}`", c.replace('`', "``")),
            cast: |e| format!("CAST({e} AS CHAR)"),
            before: |c, at| format!("{c} < {at}"),
        };
        let sql = read_sql(&spec, &columns[..2], &mysql, true, None);
        assert_eq!(
            sql,
            format!(
                "SELECT CAST(model.`{}` AS CHAR), CAST(model.`{}` AS CHAR) FROM (select * from users) AS model LIMIT 0",
                columns[0], columns[1]
            )
        );
        // The window: a millisecond before `since` is surely before; NULL is read.
        let filter = leave_out_before(&mysql, "model.`at`", 1_000);
        assert_eq!(filter, "NOT COALESCE(model.`at` < 999, FALSE)");
        assert!(
            read_sql(&spec, &columns[..1], &mysql, false, Some(&filter)).ends_with(
                "FROM (select * from users) AS model WHERE NOT COALESCE(model.`at` < 999, FALSE)"
            )
        );
    }
}
