//! DuckDB as a [`Source`] (cargo feature `duckdb`): a DuckDB database file, opened read-only,
//! or an in-memory DuckDB whose model reads files itself (`read_csv('users.csv')`,
//! `read_parquet('export/*.parquet')`; relative paths are from the working folder). Every
//! column is cast to text in DuckDB (`CAST(… AS VARCHAR)`).

use std::path::PathBuf;

use async_trait::async_trait;
use duckdb::{AccessMode, Config, Connection};
use loopsync_core::spec::SyncSpec;

use crate::WarehouseError;
use crate::source::{Source, SourceDialect, TextRow, TextRows, channel_rows, read_sql};
use crate::source::{cursor_window, leave_out_before};

const DIALECT: SourceDialect = SourceDialect {
    quote: |name| format!("\"{}\"", name.replace('"', "\"\"")),
    cast: |e| format!("CAST({e} AS VARCHAR)"),
    // `epoch_ms` is a TIMESTAMP (no zone), as the column's text is read; an infinite time (which
    // the state store reads as no time) is not before anything.
    before: |c, at| format!("{c} < epoch_ms({at}::BIGINT) AND isfinite({c})"),
};

/// Whether the model's `column` (quoted, of the model's alias) is of a type whose text the
/// state store reads as the same instant: `TIMESTAMP` (no zone, read as UTC) and `DATE`. A
/// `TIMESTAMPTZ` (its text carries an offset) or a text column is not.
fn is_time_column(connection: &Connection, spec: &SyncSpec, column: &str) -> duckdb::Result<bool> {
    use duckdb::arrow::datatypes::DataType;
    let sql = format!(
        "SELECT {column} FROM ({}) AS model LIMIT 0",
        crate::model_sql(&spec.model)
    );
    let mut statement = connection.prepare(&sql)?;
    statement.execute([])?;
    Ok(matches!(
        statement.column_type(0),
        DataType::Timestamp(_, None) | DataType::Date32 | DataType::Date64
    ))
}

/// `duckdb:///path/file.duckdb` (read-only) or `duckdb://` (in memory).
pub struct DuckDbSource {
    path: Option<PathBuf>,
}

fn model_error(sync: &str) -> impl Fn(duckdb::Error) -> WarehouseError + '_ {
    move |e| WarehouseError::model(sync, e)
}

/// A model error said where it is (see [`crate::explain_model_error`]): the model as written,
/// prepared and run alone with no row, gives its columns (a mapped column it lacks is named)
/// or its own error.
fn explained(connection: &Connection, spec: &SyncSpec, e: duckdb::Error) -> WarehouseError {
    let own = (|| {
        let sql = format!(
            "SELECT * FROM ({}) AS model LIMIT 0",
            crate::model_sql(&spec.model)
        );
        let mut statement = connection.prepare(&sql)?;
        statement.execute([])?;
        Ok::<_, duckdb::Error>(statement.column_names())
    })()
    .map_err(|e| e.to_string());
    WarehouseError::Model {
        sync: spec.name.clone(),
        detail: crate::explain_model_error(spec, own, e.to_string()),
    }
}

impl DuckDbSource {
    /// Opens the database once, so a wrong path is said at once.
    pub fn open(url: &str) -> Result<DuckDbSource, WarehouseError> {
        let rest = url.strip_prefix("duckdb://").unwrap_or(url);
        let path = match rest {
            "" | ":memory:" | "/:memory:" => None,
            path => Some(PathBuf::from(path)),
        };
        let source = DuckDbSource { path };
        source.connection()?;
        Ok(source)
    }

    fn connection(&self) -> Result<Connection, WarehouseError> {
        let connect = |e: duckdb::Error| WarehouseError::Connect(e.to_string());
        match &self.path {
            None => Connection::open_in_memory_with_flags(config().map_err(connect)?),
            Some(path) => {
                if !path.exists() {
                    return Err(WarehouseError::Connect(format!(
                        "{}: no such DuckDB file",
                        path.display()
                    )));
                }
                let config = config()
                    .and_then(|c| c.access_mode(AccessMode::ReadOnly))
                    .map_err(connect)?;
                Connection::open_with_flags(path, config)
            }
        }
        .map_err(connect)
    }
}

/// The settings of every connection: no extension is downloaded or loaded at run time — a
/// model that names a function of one it lacks fails instead of fetching code from the
/// internet (Parquet and CSV are built in) — and the settings are locked, so the model's SQL
/// cannot turn that back on. Files stay readable (`enable_external_access` keeps DuckDB's
/// default, on): reading them is what an in-memory source is for.
fn config() -> duckdb::Result<Config> {
    Config::default()
        .enable_autoload_extension(false)?
        .with("allow_community_extensions", "false")?
        .with("lock_configuration", "true")
}

#[async_trait]
impl Source for DuckDbSource {
    async fn check_model(&self, spec: &SyncSpec, columns: &[String]) -> Result<(), WarehouseError> {
        let connection = self.connection()?;
        let sql = read_sql(spec, columns, &DIALECT, true, None);
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || {
            connection
                .prepare(&sql)
                .and_then(|mut s| s.execute([]).map(|_| ()))
                .map_err(|e| explained(&connection, &spec, e))
        })
        .await
        .map_err(|e| WarehouseError::Query {
            what: "check the model".into(),
            detail: e.to_string(),
        })?
    }

    async fn read(
        &self,
        spec: &SyncSpec,
        columns: &[String],
        since: Option<i64>,
    ) -> Result<TextRows, WarehouseError> {
        let connection = self.connection()?;
        let window = cursor_window(spec, since, &DIALECT);
        let columns = columns.to_vec();
        let sync = spec.name.clone();
        let spec = spec.clone();
        let width = columns.len();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<TextRow, WarehouseError>>(1024);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let filter = match &window {
                Some((column, since)) => match is_time_column(&connection, &spec, column) {
                    Ok(time) => time.then(|| leave_out_before(&DIALECT, column, *since)),
                    Err(e) => {
                        let _ = ready_tx.send(Err(explained(&connection, &spec, e)));
                        return;
                    }
                },
                None => None,
            };
            let sql = read_sql(&spec, &columns, &DIALECT, false, filter.as_deref());
            let mut statement = match connection.prepare(&sql) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(explained(&connection, &spec, e)));
                    return;
                }
            };
            let mut rows = match statement.query([]) {
                Ok(rows) => rows,
                Err(e) => {
                    let _ = ready_tx.send(Err(model_error(&sync)(e)));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            loop {
                let item = match rows.next() {
                    Ok(None) => break,
                    Ok(Some(row)) => (0..width)
                        .map(|i| row.get::<_, Option<String>>(i))
                        .collect::<Result<TextRow, _>>()
                        .map_err(|e| WarehouseError::Query {
                            what: format!("read the model of sync {sync}"),
                            detail: e.to_string(),
                        }),
                    Err(e) => Err(model_error(&sync)(e)),
                };
                let stop = item.is_err();
                if tx.blocking_send(item).is_err() || stop {
                    break;
                }
            }
        });
        channel_rows(ready_rx, rx, "read the model").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Extensions neither installed nor loaded on demand, community ones refused, the settings
    /// locked; files still readable. For a file and for an in-memory DuckDB alike.
    #[test]
    fn no_extension_is_fetched_at_run_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.duckdb");
        Connection::open(&file)
            .unwrap()
            .execute_batch("CREATE TABLE t (x integer)")
            .unwrap();
        let url = format!("duckdb://{}", file.display());
        for source in [
            DuckDbSource::open("duckdb://").unwrap(),
            DuckDbSource::open(&url).unwrap(),
        ] {
            let connection = source.connection().unwrap();
            let setting = |name: &str| -> String {
                connection
                    .query_row(
                        &format!("SELECT current_setting('{name}')::VARCHAR"),
                        [],
                        |r| r.get(0),
                    )
                    .unwrap()
            };
            assert_eq!(setting("autoinstall_known_extensions"), "false");
            assert_eq!(setting("autoload_known_extensions"), "false");
            assert_eq!(setting("allow_community_extensions"), "false");
            assert_eq!(setting("enable_external_access"), "true");
            assert!(
                connection
                    .execute_batch("SET autoinstall_known_extensions = true")
                    .is_err(),
                "the settings are locked"
            );
        }
    }
}
