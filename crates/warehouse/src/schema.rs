//! The state's tables, written once for every backend: numbered migrations, each a list of
//! steps that a [`Dialect`] renders, and a version table (`migrations`) that says which have
//! run. Every step is idempotent (`IF NOT EXISTS`, or a column added only when missing), so a
//! state made before the version table existed is brought up to date by running them all.

/// An error when the state was migrated by a newer loopsync than this one.
pub(crate) fn newer_than_known(current: Option<i64>) -> Result<(), crate::WarehouseError> {
    match current {
        Some(v) if v > LATEST => Err(crate::WarehouseError::Unsupported(format!(
            "the state's tables are at version {v}, made by a newer loopsync; this one knows \
             versions up to {LATEST}: upgrade it"
        ))),
        _ => Ok(()),
    }
}

/// What differs between the backends that keep state: names, types, placeholders, collation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dialect {
    pub backend: Backend,
    /// `[warehouse] state_schema`: PostgreSQL's schema, SQLite's table-name prefix.
    pub schema: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

/// A column's type.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Ty {
    Text,
    BigInt,
    Int,
    /// A time: `timestamptz`, or SQLite's RFC 3339 text.
    Time,
    /// The runs' id: `bigserial`, `INTEGER PRIMARY KEY AUTOINCREMENT`.
    Serial,
}

/// A column's default.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Default {
    None,
    Zero,
    /// The time of the insert (PostgreSQL; SQLite's statements always give it).
    Now,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Column {
    pub name: &'static str,
    pub ty: Ty,
    pub not_null: bool,
    pub default: Default,
}

const fn col(name: &'static str, ty: Ty) -> Column {
    Column {
        name,
        ty,
        not_null: false,
        default: Default::None,
    }
}

const fn required(name: &'static str, ty: Ty) -> Column {
    Column {
        name,
        ty,
        not_null: true,
        default: Default::None,
    }
}

const fn zero(name: &'static str, ty: Ty) -> Column {
    Column {
        name,
        ty,
        not_null: true,
        default: Default::Zero,
    }
}

const fn now(name: &'static str) -> Column {
    Column {
        name,
        ty: Ty::Time,
        not_null: true,
        default: Default::Now,
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Step {
    /// `CREATE TABLE IF NOT EXISTS`; an empty primary key when a column is [`Ty::Serial`].
    Table {
        name: &'static str,
        columns: &'static [Column],
        primary_key: &'static str,
    },
    /// A column the table may lack.
    AddColumn { table: &'static str, column: Column },
    /// `CREATE INDEX IF NOT EXISTS`; `bytewise` columns are compared by their bytes.
    Index {
        name: &'static str,
        table: &'static str,
        columns: &'static [(&'static str, bool)],
        filter: Option<&'static str>,
    },
    /// `CREATE INDEX IF NOT EXISTS` on `(sync, the email rule of column)`: the dialect's own
    /// expression (`Dialect::email_key`), the one its statements compare.
    EmailIndex {
        name: &'static str,
        table: &'static str,
        column: &'static str,
        filter: Option<&'static str>,
    },
    /// The state's random id, made once.
    Installation,
}

/// One numbered change of the state's tables.
#[derive(Debug)]
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub steps: &'static [Step],
}

use Ty::{BigInt, Int, Serial, Text, Time};

/// Every migration, in order; the last one's version is [`LATEST`].
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "state, runs and records",
        steps: &[
            Step::Table {
                name: "state",
                columns: &[
                    required("sync", Text),
                    required("key", Text),
                    col("emitted_fp", Text),
                    col("emitted_run", BigInt),
                    col("confirmed_fp", Text),
                    col("confirmed_run", BigInt),
                    col("confirmed_at", Time),
                    col("contact_id", Text),
                ],
                primary_key: "sync, key",
            },
            Step::Table {
                name: "runs",
                columns: &[
                    required("id", Serial),
                    required("sync", Text),
                    required("status", Text),
                    now("requested_at"),
                    col("started_at", Time),
                    col("extracted_at", Time),
                    col("finished_at", Time),
                    col("expected", BigInt),
                    zero("added", BigInt),
                    zero("changed", BigInt),
                    zero("removed", BigInt),
                    zero("unchanged", BigInt),
                    col("error", Text),
                ],
                primary_key: "",
            },
            Step::Table {
                name: "records",
                columns: &[
                    required("run_id", BigInt),
                    required("sync", Text),
                    required("key", Text),
                    col("fingerprint", Text),
                    required("operation", Text),
                    required("outcome", Text),
                    col("reason", Text),
                    col("contact_id", Text),
                    zero("requests", Int),
                    now("at"),
                ],
                primary_key: "run_id, key",
            },
            Step::Index {
                name: "records_sync_outcome",
                table: "records",
                columns: &[("sync", false), ("outcome", false)],
                filter: None,
            },
        ],
    },
    Migration {
        version: 2,
        name: "the confirmed contact's identifiers",
        steps: &[
            Step::AddColumn {
                table: "state",
                column: col("confirmed_email", Text),
            },
            Step::AddColumn {
                table: "state",
                column: col("confirmed_user_id", Text),
            },
        ],
    },
    Migration {
        version: 3,
        name: "the installation id",
        steps: &[Step::Installation],
    },
    Migration {
        version: 4,
        name: "generations and heartbeats",
        steps: &[
            Step::AddColumn {
                table: "state",
                column: zero("generation", BigInt),
            },
            Step::AddColumn {
                table: "runs",
                column: col("heartbeat_at", Time),
            },
        ],
    },
    Migration {
        version: 5,
        name: "parked records",
        steps: &[Step::AddColumn {
            table: "state",
            column: col("parked_fp", Text),
        }],
    },
    Migration {
        version: 6,
        name: "requests by kind, attempts and invalid rows",
        steps: &[
            Step::AddColumn {
                table: "runs",
                column: zero("invalid_rows", BigInt),
            },
            Step::AddColumn {
                table: "runs",
                column: zero("preflight_requests", BigInt),
            },
            Step::AddColumn {
                table: "runs",
                column: zero("preflight_retries", BigInt),
            },
            Step::AddColumn {
                table: "runs",
                column: zero("preflight_rate_limited", BigInt),
            },
            Step::AddColumn {
                table: "records",
                column: col("change", Text),
            },
            Step::AddColumn {
                table: "records",
                column: zero("writes", Int),
            },
            Step::AddColumn {
                table: "records",
                column: zero("events", Int),
            },
            Step::AddColumn {
                table: "records",
                column: zero("deletes", Int),
            },
            Step::AddColumn {
                table: "records",
                column: zero("retries", Int),
            },
            Step::AddColumn {
                table: "records",
                column: zero("rate_limited", Int),
            },
            Step::Table {
                name: "attempts",
                columns: &[
                    required("run_id", BigInt),
                    required("sync", Text),
                    required("key", Text),
                    required("attempt", Text),
                    zero("requests", Int),
                    zero("writes", Int),
                    zero("events", Int),
                    zero("deletes", Int),
                    zero("retries", Int),
                    zero("rate_limited", Int),
                    col("reason", Text),
                    now("at"),
                ],
                primary_key: "run_id, key, attempt",
            },
        ],
    },
    Migration {
        version: 7,
        name: "destination bindings",
        steps: &[Step::Table {
            name: "destinations",
            columns: &[
                required("sync", Text),
                col("team", Text),
                required("base_url", Text),
                now("bound_at"),
            ],
            primary_key: "sync",
        }],
    },
    Migration {
        version: 8,
        name: "event syncs",
        steps: &[
            Step::AddColumn {
                table: "runs",
                column: zero("ignored", BigInt),
            },
            Step::AddColumn {
                table: "runs",
                column: col("cursor_high", BigInt),
            },
            Step::AddColumn {
                table: "runs",
                column: col("cursor_column", Text),
            },
        ],
    },
    Migration {
        version: 9,
        name: "unchanged rows noted",
        steps: &[
            Step::AddColumn {
                table: "state",
                column: col("model_hash", BigInt),
            },
            Step::AddColumn {
                table: "state",
                column: col("model_email", Text),
            },
            Step::Index {
                name: "state_model_email",
                table: "state",
                columns: &[("sync", false), ("model_email", true)],
                filter: Some("model_email IS NOT NULL"),
            },
        ],
    },
    Migration {
        version: 10,
        name: "possibly applied versions, tombstones that re-subscribe",
        steps: &[
            Step::AddColumn {
                table: "state",
                column: zero("resubscribe", BigInt),
            },
            Step::AddColumn {
                table: "state",
                column: col("emitted_email", Text),
            },
            Step::AddColumn {
                table: "state",
                column: col("emitted_user_id", Text),
            },
        ],
    },
    Migration {
        version: 11,
        name: "the extractor's sign of life",
        steps: &[Step::AddColumn {
            table: "runs",
            column: col("extract_alive_at", Time),
        }],
    },
    Migration {
        version: 12,
        name: "every identity possibly applied",
        steps: &[Step::AddColumn {
            table: "state",
            column: col("possibly_applied", Text),
        }],
    },
    Migration {
        version: 13,
        name: "the API key's fingerprint, accepted invalid records",
        steps: &[
            Step::AddColumn {
                table: "destinations",
                column: col("key_fingerprint", Text),
            },
            Step::AddColumn {
                table: "records",
                column: zero("accepted", Int),
            },
            Step::Table {
                name: "accepted",
                columns: &[
                    required("sync", Text),
                    required("key", Text),
                    required("reason", Text),
                    col("note", Text),
                    now("accepted_at"),
                ],
                primary_key: "sync, key",
            },
        ],
    },
    Migration {
        version: 14,
        name: "rate budgets shared through the state",
        steps: &[Step::Table {
            name: "rate_slots",
            columns: &[
                required("budget", Text),
                required("next_due", BigInt),
                required("revision", BigInt),
            ],
            primary_key: "budget",
        }],
    },
    Migration {
        version: 15,
        name: "a rate budget's due time beside the writer's clock",
        steps: &[Step::AddColumn {
            table: "rate_slots",
            column: col("written_at", BigInt),
        }],
    },
    Migration {
        version: 16,
        name: "which diff a contact sync's run ran, for which shape",
        steps: &[
            Step::AddColumn {
                table: "runs",
                column: col("diff_kind", Text),
            },
            Step::AddColumn {
                table: "runs",
                column: col("shape_seed", BigInt),
            },
            // The keys an incremental diff reads wherever their cursor is.
            Step::Index {
                name: "state_unnoted",
                table: "state",
                columns: &[("sync", false), ("key", false)],
                filter: Some("model_hash IS NULL"),
            },
        ],
    },
    Migration {
        version: 17,
        name: "the owners of a contact found by index",
        steps: &[
            // Who holds an email or a userId (`rules::owners`, asked for every removal and
            // re-key): by index, not a scan of the state normalising every email.
            Step::EmailIndex {
                name: "state_confirmed_email",
                table: "state",
                column: "confirmed_email",
                filter: Some("confirmed_fp IS NOT NULL"),
            },
            Step::Index {
                name: "state_confirmed_user_id",
                table: "state",
                columns: &[("sync", false), ("confirmed_user_id", false)],
                filter: Some("confirmed_fp IS NOT NULL"),
            },
        ],
    },
];

/// The version of the newest migration: what `prepare` brings the state to.
pub(crate) const LATEST: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// What a step needs to know of the table before it runs (SQLite adds a column only when it
/// is missing: it has no `ADD COLUMN IF NOT EXISTS`).
pub(crate) enum Rendered {
    Sql(String),
    /// Run `sql` unless `table` already has `column`.
    UnlessColumn {
        table: String,
        column: &'static str,
        sql: String,
    },
}

impl Dialect {
    pub fn postgres(schema: &str) -> Dialect {
        Dialect {
            backend: Backend::Postgres,
            schema: schema.to_owned(),
        }
    }

    pub fn sqlite(schema: &str) -> Dialect {
        Dialect {
            backend: Backend::Sqlite,
            schema: schema.to_owned(),
        }
    }

    /// A state table's name: `schema.name` (PostgreSQL), `schema_name` (SQLite). The schema is
    /// a plain identifier (the config checks it).
    pub fn table(&self, name: &str) -> String {
        match self.backend {
            Backend::Postgres => format!("{}.{name}", self.schema),
            Backend::Sqlite => format!("{}_{name}", self.schema),
        }
    }

    /// `sql` written for schema `loopsync` (`loopsync.state`, `loopsync_state`), for this one.
    /// Only whole names: `loopsync.` or `loopsync_` after a character that cannot be part of
    /// an identifier.
    pub fn sql(&self, sql: &str) -> String {
        if self.schema == crate::DEFAULT_SCHEMA {
            return sql.to_owned();
        }
        let (from, to) = match self.backend {
            Backend::Postgres => ("loopsync.", format!("{}.", self.schema)),
            Backend::Sqlite => ("loopsync_", format!("{}_", self.schema)),
        };
        let mut out = String::with_capacity(sql.len() + 16);
        let mut rest = sql;
        while let Some(at) = rest.find(from) {
            let whole = !rest[..at]
                .chars()
                .next_back()
                .or_else(|| out.chars().next_back())
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            out.push_str(&rest[..at]);
            out.push_str(if whole { &to } else { from });
            rest = &rest[at + from.len()..];
        }
        out.push_str(rest);
        out
    }

    fn ty(&self, ty: Ty) -> &'static str {
        match (self.backend, ty) {
            (Backend::Postgres, Text) => "text",
            (Backend::Postgres, BigInt) => "bigint",
            (Backend::Postgres, Int) => "integer",
            (Backend::Postgres, Time) => "timestamptz",
            (Backend::Postgres, Serial) => "bigserial PRIMARY KEY",
            (Backend::Sqlite, Text | Time) => "TEXT",
            (Backend::Sqlite, BigInt | Int) => "INTEGER",
            (Backend::Sqlite, Serial) => "INTEGER PRIMARY KEY AUTOINCREMENT",
        }
    }

    fn column(&self, c: &Column) -> String {
        let mut out = format!("{} {}", c.name, self.ty(c.ty));
        if c.not_null && !matches!(c.ty, Serial) {
            out.push_str(" NOT NULL");
        }
        match (c.default, self.backend) {
            (Default::Zero, _) => out.push_str(" DEFAULT 0"),
            (Default::Now, Backend::Postgres) => out.push_str(" DEFAULT now()"),
            (Default::Now, Backend::Sqlite) | (Default::None, _) => {}
        }
        out
    }

    /// What orders text by its bytes.
    pub fn bytewise(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => " COLLATE \"C\"",
            Backend::Sqlite => "",
        }
    }

    /// The version table.
    pub fn version_table(&self) -> String {
        let table = self.table("migrations");
        match self.backend {
            Backend::Postgres => format!(
                "CREATE TABLE IF NOT EXISTS {table} (version bigint PRIMARY KEY, name text NOT NULL, \
                 applied_at timestamptz NOT NULL DEFAULT now())"
            ),
            Backend::Sqlite => format!(
                "CREATE TABLE IF NOT EXISTS {table} (version INTEGER PRIMARY KEY, name TEXT NOT NULL, \
                 applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
            ),
        }
    }

    /// `CREATE INDEX IF NOT EXISTS` of `columns` (rendered) on `table`.
    fn index(&self, name: &str, table: &str, columns: &str, filter: Option<&str>) -> Rendered {
        // SQLite's index names are the file's, not a table's: prefixed like tables.
        let name = match self.backend {
            Backend::Postgres => name.to_owned(),
            Backend::Sqlite => self.table(name),
        };
        Rendered::Sql(format!(
            "CREATE INDEX IF NOT EXISTS {name} ON {} ({columns}){}",
            self.table(table),
            filter.map(|f| format!(" WHERE {f}")).unwrap_or_default()
        ))
    }

    /// The statements of a step.
    pub fn render(&self, step: &Step) -> Vec<Rendered> {
        match step {
            Step::Table {
                name,
                columns,
                primary_key,
            } => {
                let mut parts: Vec<String> = columns.iter().map(|c| self.column(c)).collect();
                if !primary_key.is_empty() {
                    parts.push(format!("PRIMARY KEY ({primary_key})"));
                }
                vec![Rendered::Sql(format!(
                    "CREATE TABLE IF NOT EXISTS {} ({})",
                    self.table(name),
                    parts.join(", ")
                ))]
            }
            Step::AddColumn { table, column } => {
                let table = self.table(table);
                match self.backend {
                    Backend::Postgres => vec![Rendered::Sql(format!(
                        "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {}",
                        self.column(column)
                    ))],
                    Backend::Sqlite => vec![Rendered::UnlessColumn {
                        sql: format!("ALTER TABLE {table} ADD COLUMN {}", self.column(column)),
                        table,
                        column: column.name,
                    }],
                }
            }
            Step::Index {
                name,
                table,
                columns,
                filter,
            } => {
                let columns: Vec<String> = columns
                    .iter()
                    .map(|(c, bytewise)| {
                        format!("{c}{}", if *bytewise { self.bytewise() } else { "" })
                    })
                    .collect();
                vec![self.index(name, table, &columns.join(", "), *filter)]
            }
            Step::EmailIndex {
                name,
                table,
                column,
                filter,
            } => vec![self.index(
                name,
                table,
                &format!("sync, ({})", self.email_key(column)),
                *filter,
            )],
            Step::Installation => {
                let table = self.table("installation");
                match self.backend {
                    Backend::Postgres => vec![
                        Rendered::Sql(format!(
                            "CREATE TABLE IF NOT EXISTS {table} (one boolean PRIMARY KEY DEFAULT true \
                             CHECK (one), id text NOT NULL)"
                        )),
                        Rendered::Sql(format!(
                            "INSERT INTO {table} (id) VALUES (md5(random()::text || \
                             clock_timestamp()::text)) ON CONFLICT DO NOTHING"
                        )),
                    ],
                    Backend::Sqlite => vec![
                        Rendered::Sql(format!(
                            "CREATE TABLE IF NOT EXISTS {table} (one INTEGER PRIMARY KEY \
                             CHECK (one = 1), id TEXT NOT NULL)"
                        )),
                        Rendered::Sql(format!(
                            "INSERT OR IGNORE INTO {table} (one, id) VALUES (1, lower(hex(randomblob(16))))"
                        )),
                    ],
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_one_by_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
        }
        assert_eq!(LATEST, MIGRATIONS.len() as i64);
    }

    #[test]
    fn each_backend_writes_the_steps_in_its_own_words() {
        let pg = Dialect::postgres("ls2");
        let sqlite = Dialect::sqlite("ls2");
        let step = &MIGRATIONS[4].steps[0];
        let [Rendered::Sql(sql)] = &pg.render(step)[..] else {
            panic!()
        };
        assert_eq!(
            sql,
            "ALTER TABLE ls2.state ADD COLUMN IF NOT EXISTS parked_fp text"
        );
        let [Rendered::UnlessColumn { table, column, sql }] = &sqlite.render(step)[..] else {
            panic!()
        };
        assert_eq!(
            (table.as_str(), *column, sql.as_str()),
            (
                "ls2_state",
                "parked_fp",
                "ALTER TABLE ls2_state ADD COLUMN parked_fp TEXT"
            )
        );
        let index = &MIGRATIONS[8].steps[2];
        let [Rendered::Sql(sql)] = &pg.render(index)[..] else {
            panic!()
        };
        assert_eq!(
            sql,
            "CREATE INDEX IF NOT EXISTS state_model_email ON ls2.state (sync, model_email COLLATE \"C\") WHERE model_email IS NOT NULL"
        );
        assert_eq!(
            pg.sql("SELECT 1 FROM loopsync.state"),
            "SELECT 1 FROM ls2.state"
        );
        assert_eq!(
            sqlite.sql("SELECT 1 FROM loopsync_state"),
            "SELECT 1 FROM ls2_state"
        );
        let tricky = Dialect::postgres("x_loopsync");
        assert_eq!(
            tricky
                .sql("SELECT 1 FROM loopsync.state JOIN x_loopsync.runs ON (loopsync.runs.id = 1)"),
            "SELECT 1 FROM x_loopsync.state JOIN x_loopsync.runs ON (x_loopsync.runs.id = 1)"
        );
    }
}
