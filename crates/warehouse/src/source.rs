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
    async fn read(&self, spec: &SyncSpec, columns: &[String]) -> Result<TextRows, WarehouseError>;
}

/// How a source writes the query that reads a model.
pub(crate) struct SourceDialect {
    /// Quotes an identifier.
    pub quote: fn(&str) -> String,
    /// Casts an expression to text.
    pub cast: fn(&str) -> String,
}

/// `SELECT` of `columns` (each cast to text) from the model; `probe`: no rows.
pub(crate) fn read_sql(
    spec: &SyncSpec,
    columns: &[String],
    dialect: &SourceDialect,
    probe: bool,
) -> String {
    let select: Vec<String> = columns
        .iter()
        .map(|c| (dialect.cast)(&format!("model.{}", (dialect.quote)(c))))
        .collect();
    format!(
        "SELECT {} FROM ({}) AS model{}",
        select.join(", "),
        model_sql(&spec.model),
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
        };
        let sql = read_sql(&spec, &columns[..2], &mysql, true);
        assert_eq!(
            sql,
            format!(
                "SELECT CAST(model.`{}` AS CHAR), CAST(model.`{}` AS CHAR) FROM (select * from users) AS model LIMIT 0",
                columns[0], columns[1]
            )
        );
    }
}
