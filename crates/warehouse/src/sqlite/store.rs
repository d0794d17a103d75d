//! SQLite as a state store: its migrations runner (in one `BEGIN IMMEDIATE` transaction) and
//! the executor of the state's rules.

use super::*;

/// Brings the state's tables to [`LATEST`] in one write transaction (so two processes
/// preparing at once do not both migrate), running the migrations it lacks (see
/// [`crate::schema`]).
pub(super) fn migrate(c: &mut Connection) -> Result<(), WarehouseError> {
    let dialect = Dialect::sqlite(&current_schema());
    let migrations = dialect.table("migrations");
    let applied = |c: &Connection| -> Result<i64, WarehouseError> {
        c.query_row(
            &format!("SELECT COALESCE(max(version), 0) FROM {migrations}"),
            [],
            |r| r.get(0),
        )
        .map_err(error("read the state's schema version"))
    };
    c.execute_batch(&dialect.version_table())
        .map_err(error("create the state's version table"))?;
    let current = applied(c)?;
    newer_than_known(Some(current))?;
    if current == LATEST {
        return Ok(());
    }
    let tx = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(error("begin migrating the state's tables"))?;
    let current = applied(&tx)?;
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        let failed = |e: rusqlite::Error| WarehouseError::Query {
            what: format!("migration {} ({})", migration.version, migration.name),
            detail: e.to_string(),
        };
        for step in migration.steps {
            for rendered in dialect.render(step) {
                let sql = match rendered {
                    Rendered::Sql(sql) => sql,
                    Rendered::UnlessColumn { table, column, sql } => {
                        let present: bool = tx
                            .query_row(
                                "SELECT count(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                                params![table, column],
                                |r| r.get(0),
                            )
                            .map_err(failed)?;
                        if present {
                            continue;
                        }
                        sql
                    }
                };
                tx.execute_batch(&sql).map_err(failed)?;
            }
        }
        tx.execute(
            &format!("INSERT INTO {migrations} (version, name) VALUES (?1, ?2)"),
            params![migration.version, migration.name],
        )
        .map_err(error("record a migration"))?;
    }
    tx.commit().map_err(error("commit the state's migrations"))
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, Value as Owned, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Owned(Owned::Null),
            Value::Int(v) => ToSqlOutput::Owned(Owned::Integer(*v)),
            Value::Float(v) => ToSqlOutput::Owned(Owned::Real(*v)),
            Value::Bool(v) => ToSqlOutput::Owned(Owned::Integer(i64::from(*v))),
            Value::Text(v) => ToSqlOutput::Borrowed(ValueRef::Text(v.as_bytes())),
        })
    }
}

/// The executor on SQLite's connection, in the blocking thread that holds it (its futures are
/// ready at once: [`Sqlite::run`] drives them there).
pub(super) struct SqliteExec<'c> {
    pub(super) c: &'c mut Connection,
    pub(super) dialect: Dialect,
}

pub(super) fn value(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Float(f),
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            Value::Text(String::from_utf8_lossy(t).into_owned())
        }
    }
}

#[async_trait]
impl Exec for SqliteExec<'_> {
    fn dialect(&self) -> &Dialect {
        &self.dialect
    }

    async fn execute(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<u64, WarehouseError> {
        let sql = self.dialect.statement(sql);
        let mut statement = self.c.prepare_cached(&sql).map_err(error(what))?;
        let n = statement
            .execute(rusqlite::params_from_iter(params.iter()))
            .map_err(error(what))?;
        Ok(n as u64)
    }

    async fn query(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<Vec<Row>, WarehouseError> {
        let sql = self.dialect.statement(sql);
        let mut statement = self.c.prepare_cached(&sql).map_err(error(what))?;
        let n = statement.column_count();
        let mut rows = statement
            .query(rusqlite::params_from_iter(params.iter()))
            .map_err(error(what))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(error(what))? {
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                values.push(value(row.get_ref(i).map_err(error(what))?));
            }
            out.push(Row(values));
        }
        Ok(out)
    }

    async fn batch(
        &mut self,
        what: &str,
        statements: &[String],
        items: Vec<(usize, Vec<Value>)>,
    ) -> Result<u64, WarehouseError> {
        let statements: Vec<String> = statements
            .iter()
            .map(|s| self.dialect.statement(s))
            .collect();
        let mut changed = 0;
        for (i, params) in items {
            let mut statement = self.c.prepare_cached(&statements[i]).map_err(error(what))?;
            changed += statement
                .execute(rusqlite::params_from_iter(params.iter()))
                .map_err(error(what))? as u64;
        }
        Ok(changed)
    }

    async fn lock_sync_runs(&mut self, _sync: &str) -> Result<(), WarehouseError> {
        Ok(())
    }

    async fn lock_rows(
        &mut self,
        _what: &str,
        _sql: &str,
        _params: Vec<Value>,
    ) -> Result<(), WarehouseError> {
        Ok(())
    }
}
