//! PostgreSQL as a state store: its migrations runner (under an advisory lock), the privileges
//! the state needs, rows noted unchanged, and the executor of the state's rules.

use super::*;

impl Pg {
    /// The version of the newest migration applied, `None` when there is no version table.
    pub(super) async fn applied(&self, client: &Client) -> Result<Option<i64>, WarehouseError> {
        let sql = format!(
            "SELECT COALESCE(max(version), 0) FROM {}",
            self.dialect.table("migrations")
        );
        match client.query_one(&sql, &[]).await {
            Ok(row) => Ok(Some(row.get(0))),
            Err(e)
                if e.code() == Some(&SqlState::UNDEFINED_TABLE)
                    || e.code() == Some(&SqlState::INVALID_SCHEMA_NAME) =>
            {
                Ok(None)
            }
            Err(e) => Err(query_error("read the state's schema version")(e)),
        }
    }
}

impl Pg {
    /// What the state needs of this user (see [`Warehouse::check_privileges`]): to create
    /// the schema when it is missing (CREATE on the database), else to use it, make tables in
    /// it (while migrations are due) and write its tables.
    pub(super) async fn privileges(&self) -> Result<(), WarehouseError> {
        let client = self.client().await?;
        let schema = &self.dialect.schema;
        let row = client
            .query_one(
                "SELECT to_regnamespace($1) IS NOT NULL,
                        has_database_privilege(current_database(), 'CREATE'),
                        current_user::text, current_database()::text",
                &[schema],
            )
            .await
            .map_err(query_error("read the user's privileges"))?;
        let (exists, create_db, user, database): (bool, bool, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if !exists {
            return if create_db {
                Ok(())
            } else {
                Err(WarehouseError::Privileges(format!(
                    "user {user} may not create the state's schema {schema} in database \
                     {database}: GRANT CREATE ON DATABASE {database} TO {user}, or have it made \
                     (CREATE SCHEMA {schema} AUTHORIZATION {user})"
                )))
            };
        }
        let row = client
            .query_one(
                "SELECT has_schema_privilege($1, 'USAGE'), has_schema_privilege($1, 'CREATE')",
                &[schema],
            )
            .await
            .map_err(query_error("read the user's privileges"))?;
        let (usage, create): (bool, bool) = (row.get(0), row.get(1));
        let mut lacking = Vec::new();
        if !usage {
            lacking.push(format!("USAGE on schema {schema}"));
        }
        let current = self.applied(&client).await.ok().flatten();
        if !create && current != Some(LATEST) {
            lacking.push(format!(
                "CREATE on schema {schema} (its tables are not all made)"
            ));
        }
        if usage {
            let tables = client
                .query(
                    "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $1 AND c.relkind = 'r'
                        AND NOT (has_table_privilege(c.oid, 'SELECT')
                                 AND has_table_privilege(c.oid, 'INSERT')
                                 AND has_table_privilege(c.oid, 'UPDATE')
                                 AND has_table_privilege(c.oid, 'DELETE'))
                      ORDER BY 1",
                    &[schema],
                )
                .await
                .map_err(query_error("read the user's privileges"))?;
            let sequences = client
                .query(
                    "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $1 AND c.relkind = 'S'
                        AND CASE WHEN c.relkind = 'S' AND n.nspname = $1
                                 THEN NOT has_sequence_privilege(c.oid, 'USAGE') ELSE false END
                      ORDER BY 1",
                    &[schema],
                )
                .await
                .map_err(query_error("read the user's privileges"))?;
            if !sequences.is_empty() {
                let names: Vec<String> = sequences
                    .iter()
                    .map(|r| format!("{schema}.{}", r.get::<_, String>(0)))
                    .collect();
                lacking.push(format!("USAGE on sequence {}", names.join(", ")));
            }
            if !tables.is_empty() {
                let names: Vec<String> = tables.iter().map(|r| r.get(0)).collect();
                lacking.push(format!(
                    "SELECT, INSERT, UPDATE, DELETE on {}",
                    names
                        .iter()
                        .map(|t| format!("{schema}.{t}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if lacking.is_empty() {
            Ok(())
        } else {
            Err(WarehouseError::Privileges(format!(
                "user {user} lacks what the state needs: {} (docs/operations.md, Privileges)",
                lacking.join("; ")
            )))
        }
    }
}

impl Pg {
    /// Brings the state's tables to [`LATEST`], running the migrations it lacks (see
    /// [`crate::schema`]).
    pub(super) async fn migrate_tables(&self) -> Result<(), WarehouseError> {
        // A state whose tables are current needs no DDL, and takes no lock: a command started
        // beside a run that reads the state (its diff) must neither wait behind that read nor
        // make the run's own writes queue behind its ALTER TABLE.
        let current = self.applied(&*self.client().await?).await?;
        newer_than_known(current)?;
        if current == Some(LATEST) {
            return Ok(());
        }
        // Several processes may start at once: CREATE … IF NOT EXISTS races in PostgreSQL, so
        // one at a time under an advisory lock (one per schema); and the version is read again
        // under it: the process that waited for the lock finds the tables current (another
        // migrated them) and runs no DDL. Its ALTER TABLEs would otherwise queue behind the
        // first process's run (its diff reads the state) and make that run's own writes queue
        // behind them.
        let lock = schema_lock(&self.dialect.schema);
        let mut client = self.writer().await?;
        let tx = client
            .transaction()
            .await
            .map_err(query_error("begin migrating the state's tables"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
            .await
            .map_err(query_error(
                "wait for another process migrating the state's tables",
            ))?;
        let migrations = self.dialect.table("migrations");
        let known: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&migrations])
            .await
            .map_err(query_error("read the state's schema version"))?
            .get(0);
        let current = if known {
            tx.query_one(
                &format!("SELECT COALESCE(max(version), 0) FROM {migrations}"),
                &[],
            )
            .await
            .map_err(query_error("read the state's schema version"))?
            .get::<_, i64>(0)
        } else {
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}; {}",
                self.dialect.schema,
                self.dialect.version_table()
            ))
            .await
            .map_err(query_error("create the state's version table"))?;
            0
        };
        newer_than_known(Some(current))?;
        for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
            for step in migration.steps {
                for rendered in self.dialect.render(step) {
                    // PostgreSQL says IF NOT EXISTS of every step itself.
                    let (Rendered::Sql(sql) | Rendered::UnlessColumn { sql, .. }) = rendered;
                    tx.batch_execute(&sql)
                        .await
                        .map_err(|e| WarehouseError::Query {
                            what: format!("migration {} ({})", migration.version, migration.name),
                            detail: describe(&e),
                        })?;
                }
            }
            tx.execute(
                &format!("INSERT INTO {migrations} (version, name) VALUES ($1, $2)"),
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(query_error("record a migration"))?;
        }
        tx.commit()
            .await
            .map_err(query_error("commit the state's migrations"))
    }
}

impl Pg {
    pub(super) async fn note_rows(
        &self,
        sync: &str,
        rows: &[Unchanged],
    ) -> Result<(), WarehouseError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut rows: Vec<&Unchanged> = rows.iter().collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        let fps: Vec<&str> = rows.iter().map(|r| r.fingerprint.as_str()).collect();
        let hashes: Vec<i64> = rows.iter().map(|r| r.model_hash).collect();
        let emails: Vec<Option<&str>> = rows.iter().map(|r| r.email.as_deref()).collect();
        // Only while Loops' confirmed fingerprint is the one the row was found at: a
        // confirmation in between clears the hash (see `record_outcomes`), or this finds none.
        self.client()
            .await?
            .execute(
                &*self.sql(
                    "UPDATE loopsync.state s SET model_hash = t.h, model_email = t.e
                   FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[]) AS t(k, f, h, e)
                  WHERE s.sync = $1 AND s.key = t.k AND s.confirmed_fp = t.f",
                ),
                &[&sync, &keys, &fps, &hashes, &emails],
            )
            .await
            .map_err(query_error("note unchanged records"))?;
        Ok(())
    }
}

/// The advisory lock of migrating `schema`: the one of earlier versions for `loopsync`.
pub(super) fn schema_lock(schema: &str) -> i64 {
    if schema == crate::DEFAULT_SCHEMA {
        735560801
    } else {
        loopsync_core::keys::seed(&format!("loopsync schema {schema}"))
    }
}

/// A parameter as the statement's own type asks (an `integer` column takes an `i64` that fits).
impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::FLOAT8 => (*v as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => v.to_string().to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Value::Float(v) => match *ty {
                Type::FLOAT4 => (*v as f32).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Value::Text(v) => v.as_str().to_sql(ty, out),
            Value::Bool(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// A row of PostgreSQL as [`Value`]s, by each column's type.
pub(super) fn row(r: &tokio_postgres::Row) -> Result<Row, tokio_postgres::Error> {
    let mut values = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into())),
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::FLOAT4 => r
                .try_get::<_, Option<f32>>(i)?
                .map(|v| Value::Float(v.into())),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Value::Float),
            Type::BOOL => r.try_get::<_, Option<bool>>(i)?.map(Value::Bool),
            _ => r.try_get::<_, Option<String>>(i)?.map(Value::Text),
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

/// The executor on a connection or a transaction of PostgreSQL.
pub(super) struct PgExec<'a, C> {
    pub(super) c: &'a C,
    pub(super) dialect: &'a Dialect,
}

#[async_trait]
impl<C: GenericClient + Sync> Exec for PgExec<'_, C> {
    fn dialect(&self) -> &Dialect {
        self.dialect
    }

    async fn execute(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<u64, WarehouseError> {
        let sql = self.dialect.statement(sql);
        let statement = self.c.prepare(&sql).await.map_err(query_error(what))?;
        self.c
            .execute_raw(&statement, params.iter())
            .await
            .map_err(query_error(what))
    }

    async fn query(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<Vec<Row>, WarehouseError> {
        let sql = self.dialect.statement(sql);
        let statement = self.c.prepare(&sql).await.map_err(query_error(what))?;
        let params: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = self
            .c
            .query(&statement, &params)
            .await
            .map_err(query_error(what))?;
        rows.iter()
            .map(row)
            .collect::<Result<_, _>>()
            .map_err(query_error(what))
    }

    /// Every statement of the batch, in order, pipelined on the connection: sent without
    /// waiting for each answer (tokio-postgres sends a query when its future is first polled,
    /// and `try_join_all` polls them in order), so a batch costs about one round trip, not one
    /// per item. The first error fails the transaction and the batch.
    async fn batch(
        &mut self,
        what: &str,
        statements: &[String],
        items: Vec<(usize, Vec<Value>)>,
    ) -> Result<u64, WarehouseError> {
        if items.is_empty() {
            return Ok(0);
        }
        let sqls: Vec<String> = statements
            .iter()
            .map(|s| self.dialect.statement(s))
            .collect();
        let prepared = futures::future::try_join_all(sqls.iter().map(|s| self.c.prepare(s)))
            .await
            .map_err(query_error(what))?;
        let changed = futures::future::try_join_all(
            items
                .iter()
                .map(|(i, params)| self.c.execute_raw(&prepared[*i], params.iter())),
        )
        .await
        .map_err(query_error(what))?;
        Ok(changed.iter().sum())
    }

    async fn lock_sync_runs(&mut self, sync: &str) -> Result<(), WarehouseError> {
        self.c
            .execute(
                "SELECT pg_advisory_xact_lock(735560802, hashtext($1))",
                &[&sync],
            )
            .await
            .map_err(query_error("lock the sync's runs"))?;
        Ok(())
    }

    async fn lock_rows(
        &mut self,
        what: &str,
        sql: &str,
        params: Vec<Value>,
    ) -> Result<(), WarehouseError> {
        self.query(what, sql, params).await?;
        Ok(())
    }
}
