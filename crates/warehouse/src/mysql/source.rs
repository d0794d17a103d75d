//! MySQL and MariaDB as a [`Source`], through mysql_async: the model runs on the server,
//! every column cast to text there (`CAST(… AS CHAR)`), its rows streamed as they come.
//! Sessions run in UTC, so a `TIMESTAMP` reads as UTC, as PostgreSQL's do.

use async_trait::async_trait;
use loopsync_core::spec::SyncSpec;
use mysql_async::prelude::Queryable;

use crate::WarehouseError;
use crate::source::{Source, SourceDialect, TextRow, TextRows, channel_rows, read_sql};
use crate::source::{cursor_window, leave_out_before};

/// How the model is read on MySQL.
const DIALECT: SourceDialect = SourceDialect {
    quote: |name| format!("`{}`", name.replace('`', "``")),
    cast: |e| format!("CAST({e} AS CHAR)"),
    // In the session's time zone, UTC, as the column's text is read; a zero date ('0000-00-00',
    // which the state store reads as no time) is not before anything.
    before: |c, at| format!("{c} < FROM_UNIXTIME({at} / 1000) AND {c} >= '1000-01-01'"),
};

/// Whether the model's `column` (quoted, of the model's alias) is of a type whose text the
/// state store reads as the same instant: `DATETIME` and `TIMESTAMP` (read in UTC, the
/// session's zone) and `DATE`. A text column, which MySQL would compare by its own reading,
/// is not.
async fn is_time_column(
    connection: &mut mysql_async::Conn,
    spec: &SyncSpec,
    column: &str,
) -> Result<bool, mysql_async::Error> {
    use mysql_async::consts::ColumnType::*;
    let sql = format!(
        "SELECT {column} FROM ({}) AS model LIMIT 0",
        crate::model_sql(&spec.model)
    );
    let result = connection.query_iter(sql).await?;
    let time = result.columns_ref().first().is_some_and(|c| {
        matches!(
            c.column_type(),
            MYSQL_TYPE_DATETIME
                | MYSQL_TYPE_DATETIME2
                | MYSQL_TYPE_TIMESTAMP
                | MYSQL_TYPE_TIMESTAMP2
                | MYSQL_TYPE_DATE
                | MYSQL_TYPE_NEWDATE
        )
    });
    result.drop_result().await?;
    Ok(time)
}

/// A MySQL or MariaDB server, by URL (`mysql://user:password@host:port/database`).
pub struct MySqlSource {
    pool: mysql_async::Pool,
}

/// The server's error codes that say the model is wrong (a syntax error, an unknown table or
/// column, no privilege on it) rather than a server that is busy or going away: every server
/// error but too many connections, a shutdown, a lock wait and a deadlock.
fn is_model_error(code: u16) -> bool {
    code >= 1000 && !matches!(code, 1040 | 1053 | 1205 | 1213)
}

fn classify(sync: &str, what: &str, e: mysql_async::Error) -> WarehouseError {
    match e {
        mysql_async::Error::Server(s) if is_model_error(s.code) => {
            WarehouseError::model(sync, format!("{} (MySQL error {})", s.message, s.code))
        }
        mysql_async::Error::Server(s) => WarehouseError::Query {
            what: what.to_owned(),
            detail: format!("{} (MySQL error {})", s.message, s.code),
        },
        other => WarehouseError::Unavailable {
            what: what.to_owned(),
            detail: other.to_string(),
        },
    }
}

impl MySqlSource {
    /// Connects once, so a wrong URL or a server down is said at once.
    pub async fn connect(url: &str) -> Result<MySqlSource, WarehouseError> {
        let split = loopsync_core::warehouse_tls::split(url).map_err(WarehouseError::BadUrl)?;
        let opts = mysql_async::Opts::from_url(&split.url).map_err(|e| {
            WarehouseError::BadUrl(format!(
                "not a MySQL URL (mysql://user:password@host:port/database): {e}"
            ))
        })?;
        let at = format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port());
        let opts = mysql_async::OptsBuilder::from_opts(opts)
            // Only read: a model cannot change the source.
            .init(vec![
                "SET time_zone = '+00:00'",
                "SET SESSION TRANSACTION READ ONLY",
            ])
            .stmt_cache_size(0)
            .ssl_opts(crate::tls::mysql_ssl_opts(&split.tls)?);
        let pool = mysql_async::Pool::new(opts);
        let connection = tokio::time::timeout(std::time::Duration::from_secs(10), pool.get_conn())
            .await
            .map_err(|_| {
                WarehouseError::Connect("the MySQL server did not answer within 10 s".into())
            })?
            .map_err(|e| WarehouseError::Connect(format!("MySQL at {at}: {e}")))?;
        drop(connection);
        Ok(MySqlSource { pool })
    }

    async fn connection(&self, what: &str) -> Result<mysql_async::Conn, WarehouseError> {
        self.pool
            .get_conn()
            .await
            .map_err(|e| WarehouseError::Unavailable {
                what: what.to_owned(),
                detail: e.to_string(),
            })
    }
}

/// The columns of the model as written, run alone with no row; or its own error.
async fn model_columns(
    connection: &mut mysql_async::Conn,
    spec: &SyncSpec,
) -> Result<Vec<String>, String> {
    let sql = format!(
        "SELECT * FROM ({}) AS model LIMIT 0",
        crate::model_sql(&spec.model)
    );
    let result = connection
        .query_iter(sql)
        .await
        .map_err(|e| e.to_string())?;
    let columns = result
        .columns_ref()
        .iter()
        .map(|c| c.name_str().into_owned())
        .collect();
    result.drop_result().await.map_err(|e| e.to_string())?;
    Ok(columns)
}

/// A row's values as text; a value that is not UTF-8 (a binary column) is refused.
fn text_row(mut row: mysql_async::Row, sync: &str) -> Result<TextRow, WarehouseError> {
    (0..row.len())
        .map(|i| match row.take_opt::<Option<String>, usize>(i) {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(WarehouseError::Data {
                what: format!("a row of sync {sync}'s model"),
                detail: format!("column {} is not text: {e}", i + 1),
            }),
            None => Ok(None),
        })
        .collect()
}

#[async_trait]
impl Source for MySqlSource {
    async fn check_model(&self, spec: &SyncSpec, columns: &[String]) -> Result<(), WarehouseError> {
        let mut connection = self.connection("check the model").await?;
        let sql = read_sql(spec, columns, &DIALECT, true, None);
        match connection.query_drop(sql).await {
            Ok(()) => Ok(()),
            Err(mysql_async::Error::Server(s)) if is_model_error(s.code) => {
                // Said where it is: a column the mapping names that the model lacks, or the
                // model's own error.
                let own = model_columns(&mut connection, spec).await;
                let detail = format!("{} (MySQL error {})", s.message, s.code);
                Err(WarehouseError::Model {
                    sync: spec.name.clone(),
                    detail: crate::explain_model_error(spec, own, detail),
                })
            }
            Err(e) => Err(classify(&spec.name, "check the model", e)),
        }
    }

    async fn read(
        &self,
        spec: &SyncSpec,
        columns: &[String],
        since: Option<i64>,
    ) -> Result<TextRows, WarehouseError> {
        use futures::StreamExt;
        let mut connection = self.connection("read the model").await?;
        let filter = match cursor_window(spec, since, &DIALECT) {
            Some((column, since)) => is_time_column(&mut connection, spec, &column)
                .await
                .map_err(|e| classify(&spec.name, "read the model", e))?
                .then(|| leave_out_before(&DIALECT, &column, since)),
            None => None,
        };
        let sql = read_sql(spec, columns, &DIALECT, false, filter.as_deref());
        let sync = spec.name.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<TextRow, WarehouseError>>(1024);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let what = format!("read the model of sync {sync}");
            let mut result = match connection.query_iter(sql).await {
                Ok(result) => result,
                Err(e) => {
                    let _ = ready_tx.send(Err(classify(&sync, &what, e)));
                    return;
                }
            };
            let mut rows = match result.stream::<mysql_async::Row>().await {
                Ok(Some(rows)) => rows,
                Ok(None) => {
                    let _ = ready_tx.send(Ok(()));
                    return;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(classify(&sync, &what, e)));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            while let Some(row) = rows.next().await {
                let item = row
                    .map_err(|e| classify(&sync, &what, e))
                    .and_then(|row| text_row(row, &sync));
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        channel_rows(ready_rx, rx, "read the model").await
    }
}
