//! The config file of `PRODUCT.md`: TOML, `${VAR}` replaced by the environment (an unset variable
//! is an error naming it), unknown keys rejected by their path, every sync checked before any
//! request is sent.

use std::path::Path;
use std::time::Duration;

use loopsync_core::secret::ApiKey;
use loopsync_core::spec::SyncSpec;
use serde::Deserialize;

mod check;
mod files;
mod raw;
mod transport;

pub use files::too_open;

use raw::RawConfig;

/// A config that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not valid TOML: {0}")]
    Syntax(#[source] toml::de::Error),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// How a message names the `i`-th `[[sync]]`: by its name (`sync "users"`), or by its index
/// (`sync[0]`, from 0) when it has no name a user could recognise (none, or not a valid one).
pub(crate) fn sync_label(i: usize, name: Option<&str>) -> String {
    match name {
        Some(name) if check::is_token(name) => format!("sync \"{name}\""),
        _ => format!("sync[{i}]"),
    }
}

/// A key path as serde or `${VAR}` substitution says it (`sync[1].schedule`), its sync named as
/// [`sync_label`] names it (`sync "users".schedule`). `names`: each `[[sync]]`'s `name`.
fn named_path(path: &str, names: &[Option<String>]) -> String {
    let Some(rest) = path.strip_prefix("sync[") else {
        return path.to_owned();
    };
    let Some((index, rest)) = rest.split_once(']') else {
        return path.to_owned();
    };
    match index.parse::<usize>() {
        Ok(i) => format!(
            "{}{rest}",
            sync_label(i, names.get(i).and_then(|n| n.as_deref()))
        ),
        Err(_) => path.to_owned(),
    }
}

/// Each `[[sync]]`'s `name`, as written (before anything is checked).
fn sync_names(value: &toml::Value) -> Vec<Option<String>> {
    value
        .get("sync")
        .and_then(toml::Value::as_array)
        .map(|syncs| {
            syncs
                .iter()
                .map(|s| {
                    s.get("name")
                        .and_then(toml::Value::as_str)
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub warehouse: WarehouseConfig,
    pub loops: LoopsConfig,
    pub nats: Option<NatsConfig>,
    pub syncs: Vec<SyncConfig>,
}

/// `[warehouse]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarehouseConfig {
    /// Where the model is read: `postgres://…`, `sqlite:///path/file.db`, `mysql://…`, or
    /// `duckdb:///path/file.duckdb` (`duckdb://` alone: an in-memory DuckDB, for models that read
    /// CSV or Parquet files with `read_csv` / `read_parquet`; needs a build with the `duckdb`
    /// feature).
    pub url: String,
    /// Where the syncs' state, runs and per-record results are kept, when not in the warehouse
    /// itself: `sqlite:///path/state.db` (one machine) or `postgres://…` (workers on many
    /// machines). Required for `mysql://` and `duckdb://` warehouses, which loopsync only reads;
    /// optional for PostgreSQL (a read-only replica) and SQLite.
    #[serde(default)]
    pub state: Option<String>,
    /// The schema (PostgreSQL) or table-name prefix (SQLite: `{state_schema}_state`, …) of the
    /// state's tables, so two deployments or test suites can share one database. Letters,
    /// digits and `_`, starting with a letter or `_`.
    #[serde(default = "default_state_schema")]
    pub state_schema: String,
    /// How long each run's per-record results (`records`, `attempts`: keys, reasons) are kept:
    /// a humantime duration (`"90d"`, `"2w"`); at the end of each run, those of the runs
    /// requested longer ago are deleted (the runs and their counts stay).
    #[serde(default = "default_records_retention", deserialize_with = "retention")]
    pub records_retention: Duration,
}

fn default_state_schema() -> String {
    "loopsync".to_owned()
}

/// `records_retention` when the config says none: 90 days.
pub const DEFAULT_RECORDS_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

fn default_records_retention() -> Duration {
    DEFAULT_RECORDS_RETENTION
}

/// A retention: a humantime duration of at least a minute (a shorter one would prune the
/// results of the run that just ended before anyone read them).
fn retention<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let duration = humantime::parse_duration(text.trim()).map_err(|e| {
        serde::de::Error::custom(format!(
            "\"{text}\" is not a duration such as \"90d\", \"2w\" or \"12h\": {e}"
        ))
    })?;
    if duration < Duration::from_secs(60) {
        return Err(serde::de::Error::custom(format!(
            "\"{text}\" is shorter than a minute: the results of a run would go before anyone \
             read them"
        )));
    }
    Ok(duration)
}

/// `[loops]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopsConfig {
    /// The team's key, a secret from the moment it is read: `Debug` of this config never shows
    /// it. An empty key is a config error. Or read from `api_key_file`.
    pub api_key: ApiKey,
    /// A file whose content (trimmed) is the API key, instead of `api_key` (a mounted secret).
    #[serde(default)]
    pub api_key_file: Option<String>,
    /// The API root without `/v1`. `https://`, or `http://` on a loopback host (127.0.0.0/8,
    /// `::1`, `localhost`) or with `allow_insecure_http`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Lets `base_url` be plain `http://` on a host that is not this machine (a simulator on a
    /// private network): the API key and contacts' data then cross that network unencrypted.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// The team's limit, shared by every worker and sync.
    #[serde(default = "default_rps")]
    pub requests_per_second: u32,
    /// Per request.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: f64,
    /// Attempts per operation before it is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The wait before an operation's first retry, in milliseconds; it doubles with each
    /// retry, up to 30 s.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Operations in flight per loader process.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Names the team's shared rate budget, so that two API keys of one Loops team share it.
    /// Without it, each key has a budget of its own.
    #[serde(default)]
    pub team: Option<String>,
}

impl LoopsConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_seconds)
    }

    /// The name of the rate budget every worker and sync of this config draws from: the
    /// team's when `team` is set (two keys of one team share it), else the API key's. A digest
    /// either way, so neither the key nor the team's name is readable in it.
    pub fn budget_name(&self) -> String {
        match &self.team {
            Some(team) => format!(
                "team-{}",
                loopsync_core::keys::record_id("loops-team", team.trim())
            ),
            None => self.api_key.budget_name(),
        }
    }
}

fn default_base_url() -> String {
    "https://app.loops.so/api".into()
}
fn default_rps() -> u32 {
    10
}
fn default_timeout_seconds() -> f64 {
    10.0
}
fn default_max_attempts() -> u32 {
    loopsync_core::tuning::MAX_ATTEMPTS
}
fn default_concurrency() -> usize {
    4
}
fn default_retry_backoff_ms() -> u64 {
    loopsync_core::tuning::BACKOFF_BASE.as_millis() as u64
}

/// `[nats]`: without it, one process and an in-process bus. Its `Debug` shows no password or
/// token.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    /// Prefix of every stream, subject and consumer: several deployments can share a server.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// How long a delivered message may stay unacknowledged before another replica gets it.
    #[serde(default = "default_ack_wait")]
    pub ack_wait_seconds: f64,
    /// User name, with `password`.
    #[serde(default)]
    pub user: Option<String>,
    /// Password, with `user`.
    #[serde(default)]
    pub password: Option<String>,
    /// A token (the server's `authorization { token }`).
    #[serde(default)]
    pub token: Option<String>,
    /// A `.creds` file (NATS decentralised auth: a user JWT and its NKey seed).
    #[serde(default)]
    pub credentials: Option<String>,
    /// A PEM file of the CA that signed the server's certificate; turns TLS on (so does a
    /// `tls://` url).
    #[serde(default)]
    pub tls_ca: Option<String>,
    /// Lets a user, password, token or credentials file go to a server that is not on loopback
    /// without TLS (a trusted network); without it such a config is refused.
    #[serde(default)]
    pub allow_plaintext_credentials: bool,
    /// The most bytes each work-queue stream holds on the server (JetStream reserves them when
    /// it makes the stream); a full queue refuses new messages.
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: u64,
}

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsConfig")
            .field("url", &self.url)
            .field("namespace", &self.namespace)
            .field("ack_wait_seconds", &self.ack_wait_seconds)
            .field("user", &self.user)
            .field("password", &redacted(&self.password))
            .field("token", &redacted(&self.token))
            .field("credentials", &self.credentials)
            .field("tls_ca", &self.tls_ca)
            .field(
                "allow_plaintext_credentials",
                &self.allow_plaintext_credentials,
            )
            .field("max_queue_bytes", &self.max_queue_bytes)
            .finish()
    }
}

impl NatsConfig {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs_f64(self.ack_wait_seconds)
    }
}

fn default_namespace() -> String {
    "loopsync".into()
}
fn default_max_queue_bytes() -> u64 {
    loopsync_core::tuning::WORK_QUEUE_MAX_BYTES
}
fn default_ack_wait() -> f64 {
    loopsync_core::tuning::ACK_WAIT.as_secs_f64()
}

/// One `[[sync]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    pub spec: SyncSpec,
    /// Cron expression for `loopsync run` without `--once`, parsed when the config is read.
    pub schedule: Option<Schedule>,
}

/// A sync's `schedule`: a cron expression (UTC, seconds allowed), parsed once when the config
/// is read so that whoever follows it cannot meet an invalid one. It keeps its text for
/// messages, and reads as that text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    text: String,
    cron: croner::Cron,
}

impl Schedule {
    /// Parses a cron expression; the error is croner's words.
    pub fn parse(text: &str) -> Result<Schedule, String> {
        use std::str::FromStr;
        let cron = croner::Cron::from_str(text).map_err(|e| e.to_string())?;
        Ok(Schedule {
            text: text.to_owned(),
            cron,
        })
    }

    /// The expression as written in the config.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first fire time strictly after `time`; `None` when the expression fires no more.
    pub fn next_after(
        &self,
        time: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cron.find_next_occurrence(&time, false).ok()
    }
}

impl std::ops::Deref for Schedule {
    type Target = str;

    fn deref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let config = Config::parse(&text, |name| std::env::var(name).ok())?;
        config.warn_of_open_secret_files();
        Ok(config)
    }

    /// Reads the config for a command that needs only the warehouse (PRODUCT.md: such a command
    /// never needs Loops' secrets): a `${VAR}` that is not set is an error only in the
    /// warehouse's settings; elsewhere it stands for a value nobody reads.
    pub fn load_for_warehouse(path: &Path) -> Result<Config, ConfigError> {
        // Stands for an unset variable; no environment variable holds a NUL.
        const UNSET: &str = "\u{0}unset ";
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let config = Config::parse_with(
            &text,
            |name| Some(std::env::var(name).unwrap_or_else(|_| format!("{UNSET}{name}\u{0}"))),
            // Loops' secret is not read: it stands for a key nobody uses.
            |_| Ok(format!("{UNSET}api_key_file\u{0}")),
        )?;
        let warehouse = &config.warehouse;
        for (key, value) in [
            ("warehouse.url", Some(&warehouse.url)),
            ("warehouse.state", warehouse.state.as_ref()),
        ] {
            if let Some((_, unset)) = value.and_then(|v| v.split_once(UNSET)) {
                let name = unset.split('\u{0}').next().unwrap_or_default();
                return Err(invalid(
                    key,
                    format!("environment variable {name} is not set"),
                ));
            }
        }
        config.warn_of_open_secret_files();
        Ok(config)
    }

    /// Parses config text; `env` answers `${VAR}`.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::parse_with(text, env, |path| std::fs::read_to_string(path))
    }

    /// [`Config::parse`], `read` answering `loops.api_key_file`.
    fn parse_with(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
        read: impl Fn(&str) -> std::io::Result<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(ConfigError::Syntax)?;
        let names = sync_names(&value);
        let named = |e: ConfigError| match e {
            ConfigError::Invalid { key, message } => ConfigError::Invalid {
                key: named_path(&key, &names),
                message,
            },
            other => other,
        };
        substitute(&mut value, "", &env).map_err(named)?;
        read_api_key_file(&mut value, read)?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            // toml appends "in `table`" lines; the path already says where.
            let message = e.into_inner().to_string();
            let message = message
                .split("\nin `")
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            invalid(
                if path == "." {
                    "config".into()
                } else {
                    named_path(&path, &names)
                },
                message,
            )
        })?;
        raw.check()
    }

    /// The sync called `name`.
    pub fn sync(&self, name: &str) -> Option<&SyncConfig> {
        self.syncs.iter().find(|s| s.spec.name == name)
    }
}

/// `loops.api_key_file`: its content, trimmed, becomes `loops.api_key` (which must not be set
/// too). A file that cannot be read is an error naming the key, never the file's content.
fn read_api_key_file(
    value: &mut toml::Value,
    read: impl Fn(&str) -> std::io::Result<String>,
) -> Result<(), ConfigError> {
    let Some(loops) = value.get_mut("loops").and_then(toml::Value::as_table_mut) else {
        return Ok(());
    };
    let Some(file) = loops.get("api_key_file") else {
        return Ok(());
    };
    let Some(path) = file.as_str().map(str::to_owned) else {
        return Err(invalid("loops.api_key_file", "must be a path"));
    };
    if loops.contains_key("api_key") {
        return Err(invalid(
            "loops.api_key_file",
            "set api_key or api_key_file, not both",
        ));
    }
    let key = read(&path)
        .map_err(|e| invalid("loops.api_key_file", format!("cannot read {path}: {e}")))?
        .trim()
        .to_owned();
    loops.insert("api_key".into(), toml::Value::String(key));
    Ok(())
}

/// Replaces `${VAR}` in every string value.
fn substitute(
    value: &mut toml::Value,
    path: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after
                    .find('}')
                    .ok_or_else(|| invalid(path, "`${` without a closing `}`"))?;
                let name = &after[..end];
                let replacement = env(name).ok_or_else(|| {
                    invalid(path, format!("environment variable {name} is not set"))
                })?;
                out.push_str(&replacement);
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute(item, &format!("{path}[{i}]"), env)?;
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                substitute(item, &child, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use loopsync_core::spec::IdentifyBy;
    use loopsync_core::value::PropertyKind;

    use super::*;

    const EXAMPLE: &str = r#"
[warehouse]
url = "postgres://root@127.0.0.1:5432/test"

[loops]
api_key = "${LOOPS_API_KEY}"
base_url = "https://app.loops.so/api"
requests_per_second = 10

[nats]
url = "nats://127.0.0.1:4222"

[[sync]]
name = "users"
model = "select id, email, first_name, plan, signed_up_at, newsletter from users"
primary_key = "id"
identify_by = "email"
behavior = "upsert"
on_remove = "delete"
trigger_workflows = false
event_on_create = "contactCreated"
event_on_update = "contactUpdated"
schedule = "*/15 * * * *"

[sync.mapping]
email = "email"
userId = "id"
firstName = "first_name"
planName = "plan"
signedUpAt = { column = "signed_up_at", type = "date" }

[sync.mailing_lists]
"cm_newsletter_list_id" = "newsletter"
"#;

    fn env(name: &str) -> Option<String> {
        (name == "LOOPS_API_KEY").then(|| "secret".to_owned())
    }

    fn error_of(text: &str) -> String {
        Config::parse(text, env).unwrap_err().to_string()
    }

    /// `[warehouse]` with `lines` after its `url`, and the rest of the example.
    fn with_warehouse(url: &str, lines: &str) -> String {
        let rest = EXAMPLE.split_once("[loops]").unwrap().1;
        format!("[warehouse]\nurl = \"{url}\"\n{lines}\n[loops]{rest}")
    }

    /// `warehouse.records_retention`: 90 days unless said, a humantime duration of at least a
    /// minute; anything else is an error naming the key.
    #[test]
    fn results_are_kept_for_the_retention() {
        let config = Config::parse(&with_warehouse("postgres://h/db", ""), env).unwrap();
        assert_eq!(
            config.warehouse.records_retention,
            DEFAULT_RECORDS_RETENTION
        );
        assert_eq!(DEFAULT_RECORDS_RETENTION, Duration::from_secs(90 * 86_400));
        let two_weeks = with_warehouse("postgres://h/db", "records_retention = \"2w\"");
        assert_eq!(
            Config::parse(&two_weeks, env)
                .unwrap()
                .warehouse
                .records_retention,
            Duration::from_secs(14 * 86_400)
        );
        for (value, says) in [
            ("soon", "is not a duration"),
            ("10s", "shorter than a minute"),
        ] {
            let text = with_warehouse(
                "postgres://h/db",
                &format!("records_retention = \"{value}\""),
            );
            let e = error_of(&text);
            assert!(
                e.starts_with("warehouse.records_retention: ") && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn the_state_has_a_schema_and_may_live_apart_from_the_warehouse() {
        let config = Config::parse(&with_warehouse("postgres://h/db", ""), env).unwrap();
        assert_eq!(config.warehouse.state_schema, "loopsync");
        assert_eq!(config.warehouse.state, None);
        let config = Config::parse(
            &with_warehouse(
                "mysql://root@127.0.0.1/shop",
                "state = \"sqlite:///var/lib/loopsync/state.db\"\nstate_schema = \"ls_2\"",
            ),
            env,
        )
        .unwrap();
        assert_eq!(config.warehouse.state_schema, "ls_2");
        assert_eq!(
            config.warehouse.state.as_deref(),
            Some("sqlite:///var/lib/loopsync/state.db")
        );
        for (url, lines, key, says) in [
            (
                "mysql://h/db",
                "",
                "warehouse.state",
                "a mysql:// warehouse is only read",
            ),
            (
                "duckdb://",
                "",
                "warehouse.state",
                "a duckdb:// warehouse is only read",
            ),
            (
                "duckdb://",
                "state = \"mysql://h/x\"",
                "warehouse.state",
                "must start with",
            ),
            (
                "postgres://h/db",
                "state_schema = \"a-b\"",
                "warehouse.state_schema",
                "letters",
            ),
            (
                "postgres://h/db",
                "state_schema = \"1x\"",
                "warehouse.state_schema",
                "starting",
            ),
            (
                "postgres://h/db",
                "state_schema = \"\"",
                "warehouse.state_schema",
                "letters",
            ),
            (
                "postgres://h/db?sslmode=sometimes",
                "",
                "warehouse.url",
                "not one of disable",
            ),
            (
                "mysql://h/db?require_ssl=true",
                "state = \"postgres://h/s\"",
                "warehouse.url",
                "say `sslmode`",
            ),
            (
                "mysql://h/db",
                "state = \"postgres://h/s?sslmode=disable&sslrootcert=ca.pem\"",
                "warehouse.state",
                "verify-full",
            ),
        ] {
            let e = error_of(&with_warehouse(url, lines));
            assert!(e.starts_with(key) && e.contains(says), "{url} {lines}: {e}");
        }
    }

    #[test]
    fn the_product_example_parses() {
        let config = Config::parse(EXAMPLE, env).unwrap();
        assert_eq!(config.loops.api_key, "secret");
        assert_eq!(config.nats.as_ref().unwrap().namespace, "loopsync");
        let sync = &config.syncs[0];
        assert_eq!(sync.schedule.as_deref(), Some("*/15 * * * *"));
        let spec = &sync.spec;
        assert_eq!(spec.identify_by, IdentifyBy::Email);
        assert_eq!(
            spec.property("signedUpAt").unwrap().kind,
            PropertyKind::Date
        );
        assert_eq!(
            spec.property("planName").unwrap().kind,
            PropertyKind::String
        );
        assert_eq!(spec.lists[0].list_id, "cm_newsletter_list_id");
        assert_eq!(
            spec.columns(),
            [
                "email",
                "first_name",
                "id",
                "newsletter",
                "plan",
                "signed_up_at"
            ]
        );
    }

    /// The key is a secret from the moment it is read: a config printed for debugging does not
    /// carry it, and an empty key is refused by its path.
    #[test]
    fn the_api_key_never_shows_and_is_not_empty() {
        let config = Config::parse(EXAMPLE, |_| Some("s3cr3t-key".into())).unwrap();
        assert_eq!(config.loops.api_key.expose(), "s3cr3t-key");
        for shown in [
            format!("{config:?}"),
            format!("{config:#?}"),
            config.loops.api_key.to_string(),
        ] {
            assert!(!shown.contains("s3cr3t-key"), "{shown}");
        }
        let e = Config::parse(EXAMPLE, |_| Some(" ".into()))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "loops.api_key: the API key is empty");
        let e = error_of(&EXAMPLE.replace("api_key = \"${LOOPS_API_KEY}\"\n", ""));
        assert!(e.starts_with("loops: missing field `api_key`"), "{e}");
    }

    #[test]
    fn unset_variable_is_named() {
        let e = Config::parse(EXAMPLE, |_| None).unwrap_err().to_string();
        assert_eq!(
            e,
            "loops.api_key: environment variable LOOPS_API_KEY is not set"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let e = error_of(&EXAMPLE.replace("requests_per_second = 10", "requests_per_sec = 10"));
        assert!(
            e.starts_with("loops.requests_per_sec: unknown field"),
            "{e}"
        );
        assert!(!e.contains("\n"), "{e}");
        assert!(e.contains("requests_per_sec"), "{e}");
        let e = error_of(&EXAMPLE.replace("schedule =", "scheduel ="));
        assert!(e.starts_with("sync \"users\""), "{e}");
        assert!(e.contains("scheduel"), "{e}");
        let e = error_of(&EXAMPLE.replace("type = \"date\"", "type = \"date\", fmt = \"x\""));
        assert!(e.contains("sync \"users\".mapping.signedUpAt"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = error_of(&EXAMPLE.replace("identify_by = \"email\"", "identify_by = \"phone\""));
        assert!(e.starts_with("sync \"users\".identify_by"), "{e}");
        let e = error_of(&EXAMPLE.replace("type = \"date\"", "type = \"datetime\""));
        assert!(e.contains("signedUpAt"), "{e}");
        let e = error_of(&EXAMPLE.replace("firstName = \"first_name\"", "teamId = \"first_name\""));
        assert_eq!(
            e,
            "sync \"users\".mapping.teamId: \"teamId\" is reserved by Loops and cannot be mapped"
        );
        let e = error_of(&EXAMPLE.replace("planName = \"plan\"", "plan_name = \"plan\""));
        assert!(e.starts_with("sync \"users\".mapping.plan_name: "), "{e}");
        let e = error_of(&EXAMPLE.replace("email = \"email\"\n", ""));
        assert!(
            e.starts_with("sync \"users\".mapping.email: is required"),
            "{e}"
        );
        let e = error_of(&EXAMPLE.replace(
            "firstName = \"first_name\"",
            "firstName = { column = \"first_name\", type = \"number\" }",
        ));
        assert!(e.contains("default property of type string"), "{e}");
        let e = error_of(&EXAMPLE.replace("name = \"users\"", "name = \"my users\""));
        assert!(e.starts_with("sync[0].name"), "{e}");
        let e = error_of(&EXAMPLE.replace("requests_per_second = 10", "requests_per_second = 0"));
        assert_eq!(e, "loops.requests_per_second: must be at least 1");
        // A timeout the record's claim cannot cover (case 6 of "Adversarial histories").
        let e = error_of(&EXAMPLE.replace(
            "requests_per_second = 10",
            "requests_per_second = 10\ntimeout_seconds = 45",
        ));
        assert!(
            e.starts_with("loops.timeout_seconds: must be at most 20"),
            "{e}"
        );
        let e = error_of(&EXAMPLE.replace(
            "event_on_update = \"contactUpdated\"",
            "event_on_update = \"a:b\"",
        ));
        assert!(e.starts_with("sync \"users\".event_on_update"), "{e}");
        let twice = format!(
            "{EXAMPLE}\n{}",
            &EXAMPLE[EXAMPLE.find("[[sync]]").unwrap()..]
        );
        assert!(error_of(&twice).starts_with("sync[1].name"));
    }

    /// A config error names the sync by its name, wherever it is found (a rule, the file's
    /// shape, an unset variable); by its index only when it has no usable name.
    #[test]
    fn syncs_are_named_by_their_names() {
        let e = error_of(&EXAMPLE.replace("email = \"email\"\n", ""));
        assert!(e.starts_with("sync \"users\".mapping.email: "), "{e}");
        let e = error_of(&EXAMPLE.replace("schedule =", "scheduel ="));
        assert!(
            e.starts_with("sync \"users\".scheduel: unknown field"),
            "{e}"
        );
        let e = Config::parse(
            &EXAMPLE.replace("model = \"select", "model = \"${MODEL_FILTER} select"),
            env,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "sync \"users\".model: environment variable MODEL_FILTER is not set"
        );
        let nameless = error_of(&EXAMPLE.replace("name = \"users\"\n", ""));
        assert!(
            nameless.starts_with("sync[0]: missing field `name`"),
            "{nameless}"
        );
    }

    /// A mapping name that is a Loops default property's but for case, `_` or spaces is a
    /// misspelling (it would be a custom property, and every contact would change): refused
    /// with the name meant and the way to insist; `custom = true` insists.
    #[test]
    fn a_misspelled_default_property_is_refused_unless_insisted_on() {
        let e =
            error_of(&EXAMPLE.replace("firstName = \"first_name\"", "firstname = \"first_name\""));
        assert!(
            e.starts_with("sync \"users\".mapping.firstname: \"firstname\" is not Loops' default property firstName")
                && e.contains("did you mean firstName?")
                && e.contains("firstname = { column = \"first_name\", custom = true }"),
            "{e}"
        );
        let e =
            error_of(&EXAMPLE.replace("firstName = \"first_name\"", "first_name = \"first_name\""));
        assert!(
            e.starts_with("sync \"users\".mapping.first_name: a Loops property name is camelCase: did you mean firstName"),
            "{e}"
        );
        let e = error_of(&EXAMPLE.replace("userId = \"id\"", "userid = \"id\""));
        assert!(e.contains("did you mean userId?"), "{e}");
        let insisted = EXAMPLE.replace(
            "firstName = \"first_name\"",
            "firstname = { column = \"first_name\", custom = true }",
        );
        let config = Config::parse(&insisted, env).unwrap();
        assert!(
            config.syncs[0].spec.property("firstname").is_some(),
            "insisted on: a custom property of its own"
        );
        let e = error_of(&EXAMPLE.replace(
            "firstName = \"first_name\"",
            "firstName = { column = \"first_name\", custom = true }",
        ));
        assert!(e.contains("firstName is a Loops default property"), "{e}");
        // Names that only resemble no default property are custom properties, as before.
        assert!(Config::parse(&EXAMPLE.replace("planName", "plan"), env).is_ok());
    }

    #[test]
    fn schedules_are_cron_expressions() {
        let e = error_of(&EXAMPLE.replace("*/15 * * * *", "every quarter hour"));
        assert!(
            e.starts_with(
                "sync \"users\".schedule: \"every quarter hour\" is not a cron expression"
            ),
            "{e}"
        );
        assert!(
            Config::parse(&EXAMPLE.replace("*/15 * * * *", "*/2 * * * * *"), env).is_ok(),
            "seconds allowed"
        );
    }

    /// A schedule is parsed once, at load, and says when it fires next (UTC), strictly after
    /// the time given.
    #[test]
    fn a_schedule_says_when_it_fires_next() {
        use chrono::TimeZone;
        let quarter = Schedule::parse("*/15 * * * *").unwrap();
        assert_eq!(quarter.as_str(), "*/15 * * * *");
        assert_eq!(quarter.to_string(), "*/15 * * * *");
        let at = |h, m, s| chrono::Utc.with_ymd_and_hms(2026, 1, 2, h, m, s).unwrap();
        assert_eq!(quarter.next_after(at(3, 4, 5)), Some(at(3, 15, 0)));
        assert_eq!(
            quarter.next_after(at(3, 15, 0)),
            Some(at(3, 30, 0)),
            "strictly after"
        );
        assert_eq!(
            quarter.next_after(at(23, 59, 0)),
            Some(at(0, 0, 0) + chrono::Days::new(1))
        );
        let seconds = Schedule::parse("*/2 * * * * *").unwrap();
        assert_eq!(seconds.next_after(at(3, 4, 5)), Some(at(3, 4, 6)));
        assert!(Schedule::parse("every quarter hour").is_err());
        let config = Config::parse(EXAMPLE, env).unwrap();
        let parsed = config.syncs[0].schedule.as_ref().unwrap();
        assert_eq!(parsed, &quarter);
    }

    #[test]
    fn user_id_identity_needs_user_id_mapping() {
        let text = EXAMPLE
            .replace("identify_by = \"email\"", "identify_by = \"userId\"")
            .replace("userId = \"id\"\n", "");
        assert!(error_of(&text).starts_with("sync \"users\".mapping.userId"));
    }

    #[test]
    fn nats_is_optional_and_syntax_errors_are_reported() {
        let text = EXAMPLE.replace("[nats]\nurl = \"nats://127.0.0.1:4222\"\n", "");
        assert!(Config::parse(&text, env).unwrap().nats.is_none());
        assert!(error_of("[warehouse\n").starts_with("not valid TOML"));
    }

    const EVENTS: &str = r#"
[[sync]]
name = "product_events"
model = "select event_id, email, event_name, plan, amount, occurred_at from user_events"
primary_key = "event_id"
identify_by = "email"
behavior = "append"
event = { column = "event_name" }
cursor = "occurred_at"
cursor_lookback = "90m"

[sync.mapping]
email = "email"

[sync.event_properties]
plan = "plan"
amount = { column = "amount", type = "number" }
"#;

    /// PRODUCT.md's event sync parses: the event name's column, typed event properties, the
    /// cursor and its lookback; every column is read.
    #[test]
    fn an_event_sync_parses() {
        use loopsync_core::spec::{Behavior, EventName};
        let config = Config::parse(&format!("{EXAMPLE}{EVENTS}"), env).unwrap();
        let spec = &config.sync("product_events").unwrap().spec;
        assert_eq!(spec.behavior, Behavior::Append);
        let append = spec.append.as_ref().unwrap();
        assert_eq!(append.event, EventName::Column("event_name".into()));
        assert_eq!(append.event_properties[0].property, "amount");
        assert_eq!(append.event_properties[0].kind, PropertyKind::Number);
        assert_eq!(append.event_properties[1].kind, PropertyKind::String);
        let cursor = append.cursor.as_ref().unwrap();
        assert_eq!(
            (cursor.column.as_str(), cursor.lookback_ms),
            ("occurred_at", 5_400_000)
        );
        assert_eq!(
            spec.columns(),
            ["amount", "email", "event_name", "occurred_at", "plan"]
        );
        assert!(config.syncs[0].spec.append.is_none());
        let fixed = EVENTS
            .replace(
                "event = { column = \"event_name\" }",
                "event = \"invoicePaid\"",
            )
            .replace("cursor_lookback = \"90m\"\n", "");
        let config = Config::parse(&format!("{EXAMPLE}{fixed}"), env).unwrap();
        let append = config.syncs[1].spec.append.clone().unwrap();
        assert_eq!(append.event, EventName::Fixed("invoicePaid".into()));
        assert_eq!(
            append.cursor.unwrap().lookback_ms,
            3_600_000,
            "1h by default"
        );
    }

    /// PRODUCT.md's contact sync with a cursor: its column is read, the lookback and
    /// `full_diff_every` have their defaults (1h, 1d), and a duration is checked.
    #[test]
    fn a_contact_sync_takes_a_cursor() {
        let text = EXAMPLE.replace("on_remove = \"delete\"", "cursor = \"updated_at\"");
        let spec = Config::parse(&text, env).unwrap().syncs[0].spec.clone();
        let incremental = spec.incremental.clone().unwrap();
        assert_eq!(incremental.cursor.column, "updated_at");
        assert_eq!(incremental.cursor.lookback_ms, 3_600_000);
        assert_eq!(incremental.full_diff_every_ms, 86_400_000);
        assert_eq!(spec.cursor(), Some(&incremental.cursor));
        assert!(spec.columns().contains(&"updated_at".to_owned()));
        assert!(spec.append.is_none());
        let text = EXAMPLE.replace(
            "on_remove = \"delete\"",
            "cursor = \"updated_at\"\ncursor_lookback = \"5m\"\nfull_diff_every = \"6h\"",
        );
        let spec = Config::parse(&text, env).unwrap().syncs[0].spec.clone();
        let incremental = spec.incremental.clone().unwrap();
        assert_eq!(incremental.cursor.lookback_ms, 300_000);
        assert_eq!(incremental.full_diff_every_ms, 6 * 3_600_000);
        let e = error_of(&EXAMPLE.replace(
            "on_remove = \"delete\"",
            "cursor = \"updated_at\"\nfull_diff_every = \"daily\"",
        ));
        assert!(
            e.starts_with("sync \"users\".full_diff_every: \"daily\" is not a duration"),
            "{e}"
        );
        // Without a cursor the spec's shape seed is what it was before contact cursors.
        let plain = Config::parse(EXAMPLE, env).unwrap().syncs[0].spec.clone();
        assert_eq!(plain.incremental, None);
        assert_ne!(plain.shape_seed(), spec.shape_seed());
    }

    /// An event sync's keys are refused elsewhere, and its own mistakes are named.
    #[test]
    fn event_sync_mistakes_are_named() {
        let e = error_of(&EXAMPLE.replace("on_remove = \"delete\"", "event = \"x\""));
        assert!(
            e.starts_with("sync \"users\".event: is for event syncs only"),
            "{e}"
        );
        let e = error_of(&EXAMPLE.replace("on_remove = \"delete\"", "full_diff_every = \"1h\""));
        assert!(
            e.starts_with("sync \"users\".full_diff_every: needs a cursor"),
            "{e}"
        );
        let with =
            |from: &str, to: &str| error_of(&format!("{EXAMPLE}{}", EVENTS.replace(from, to)));
        let e = with("event = { column = \"event_name\" }\n", "");
        assert!(
            e.starts_with("sync \"product_events\".event: is required"),
            "{e}"
        );
        let e = with("event = { column = \"event_name\" }", "event = \"a:b\"");
        assert!(e.starts_with("sync \"product_events\".event: "), "{e}");
        let long = format!("event = \"{}\"", "e".repeat(501));
        let e = with("event = { column = \"event_name\" }", &long);
        assert!(e.contains("at most 500 characters"), "{e}");
        let e = with("\"90m\"", "\"soon\"");
        assert!(
            e.starts_with("sync \"product_events\".cursor_lookback: \"soon\" is not a duration"),
            "{e}"
        );
        let e = with("cursor = \"occurred_at\"\n", "");
        assert!(
            e.starts_with("sync \"product_events\".cursor_lookback: needs a cursor"),
            "{e}"
        );
        let e = with(
            "cursor = \"occurred_at\"\n",
            "cursor = \"occurred_at\"\nfull_diff_every = \"1h\"\n",
        );
        assert!(
            e.starts_with("sync \"product_events\".full_diff_every: is for contact syncs"),
            "{e}"
        );
        let e = with(
            "behavior = \"append\"",
            "behavior = \"append\"\ntrigger_workflows = true",
        );
        assert!(
            e.starts_with("sync \"product_events\".trigger_workflows"),
            "{e}"
        );
        let e = with("type = \"number\"", "type = \"money\"");
        assert!(
            e.contains("sync \"product_events\".event_properties.amount"),
            "{e}"
        );
        let e = with("email = \"email\"\n", "");
        assert!(
            e.starts_with("sync \"product_events\".mapping.email: is required"),
            "{e}"
        );
        // Identified by userId, an event addresses an existing contact: no email needed.
        let by_user = EVENTS
            .replace("identify_by = \"email\"", "identify_by = \"userId\"")
            .replace("email = \"email\"", "userId = \"user_id\"");
        assert!(Config::parse(&format!("{EXAMPLE}{by_user}"), env).is_ok());
    }

    /// `[loops] team` names the rate budget: two keys of one team share it; without it, each
    /// key has its own. An empty team is refused.
    #[test]
    fn a_team_shares_its_budget_across_keys() {
        let with = |key: &str, team: &str| {
            Config::parse(
                &EXAMPLE.replace(
                    "requests_per_second = 10",
                    &format!("requests_per_second = 10\n{team}"),
                ),
                |_| Some(key.to_owned()),
            )
            .unwrap()
            .loops
            .budget_name()
        };
        assert_eq!(
            with("key-a", "team = \"acme\""),
            with("key-b", "team = \"acme\"")
        );
        assert_ne!(
            with("key-a", "team = \"acme\""),
            with("key-a", "team = \"other\"")
        );
        assert_ne!(with("key-a", ""), with("key-b", ""));
        assert_eq!(
            with("key-a", ""),
            ApiKey::new("key-a").unwrap().budget_name(),
            "without a team, the key's budget as before"
        );
        assert!(!with("key-a", "team = \"acme\"").contains("acme"));
        let e = error_of(&EXAMPLE.replace(
            "requests_per_second = 10",
            "requests_per_second = 10\nteam = \" \"",
        ));
        assert_eq!(e, "loops.team: is empty");
    }

    /// The TOML parser's error is kept as the source, and the message still says it.
    #[test]
    fn a_syntax_error_keeps_the_parser_error() {
        let e = Config::parse("[warehouse\n", env).unwrap_err();
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(e.to_string(), format!("not valid TOML: {source}"));
    }

    /// The keys a table accepts, as serde lists them when it meets an unknown one.
    fn accepted(text: &str) -> Vec<String> {
        let error = error_of(text);
        let expected = error
            .split("expected")
            .nth(1)
            .unwrap_or_else(|| panic!("no list of keys in: {error}"));
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// docs/configuration.md lists exactly the keys the config accepts, each enumerated value
    /// exactly the values it accepts: the reference is checked against the types here.
    #[test]
    fn the_configuration_reference_matches_the_config() {
        let doc = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/configuration.md"
        ));
        // `| `key` | type | default | what |`
        let rows: Vec<(String, String)> = doc
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.split(" | ").collect();
                (
                    cells[0]
                        .trim_start_matches("| ")
                        .trim_matches('`')
                        .to_owned(),
                    cells[1].to_owned(),
                )
            })
            .collect();
        let documented = |prefix: &str| -> Vec<String> {
            let mut keys: Vec<String> = rows
                .iter()
                .filter_map(|(k, _)| k.strip_prefix(prefix))
                .filter(|k| !k.contains('.'))
                .map(str::to_owned)
                .collect();
            keys.sort();
            keys
        };
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let sync = EXAMPLE.split_once("[sync.mapping]").unwrap().0;
        for (prefix, text) in [
            ("warehouse.", EXAMPLE.replace("[warehouse]\n", "[warehouse]\nzzz = 1\n")),
            ("loops.", EXAMPLE.replace("[loops]\n", "[loops]\nzzz = 1\n")),
            ("nats.", EXAMPLE.replace("[nats]\n", "[nats]\nzzz = 1\n")),
            ("sync.", format!("{sync}zzz = 1\n[sync.mapping]\nemail = \"email\"\n")),
            (
                "sync.mapping.*.",
                format!("{sync}[sync.mapping]\nemail = \"email\"\nseats = {{ zzz = 1 }}\n"),
            ),
            (
                "sync.event_properties.*.",
                format!(
                    "{}behavior = \"append\"\nevent = \"e\"\n[sync.mapping]\nemail = \"email\"\n[sync.event_properties]\nx = {{ zzz = 1 }}\n",
                    sync.replace("behavior = \"upsert\"\non_remove = \"delete\"\ntrigger_workflows = false\n", "")
                ),
            ),
            (
                "sync.event.",
                format!(
                    "{}behavior = \"append\"\nevent = {{ zzz = 1 }}\n[sync.mapping]\nemail = \"email\"\n",
                    sync.replace("behavior = \"upsert\"\non_remove = \"delete\"\ntrigger_workflows = false\n", "")
                ),
            ),
        ] {
            assert_eq!(
                documented(prefix),
                sorted(accepted(&text)),
                "docs/configuration.md against the keys of {prefix}*"
            );
        }
        // Each enumerated value is one the config takes, and each one it takes is listed.
        for (key, field, line) in [
            ("sync.identify_by", "identify_by", "identify_by = \"zzz\""),
            ("sync.behavior", "behavior", "behavior = \"zzz\""),
            ("sync.on_remove", "on_remove", "on_remove = \"zzz\""),
            ("sync.mapping.*.type", "type", "zzz"),
        ] {
            let (_, kind) = rows.iter().find(|(k, _)| k == key).unwrap();
            let mut listed: Vec<String> = kind
                .split('`')
                .skip(1)
                .step_by(2)
                .map(|v| v.trim_matches('"').to_owned())
                .collect();
            listed.sort();
            let text = if field == "type" {
                format!(
                    "{sync}[sync.mapping]\nemail = \"email\"\nseats = {{ column = \"s\", type = \"zzz\" }}\n"
                )
            } else {
                let pattern = format!("{field} = ");
                let mut out = String::new();
                for l in sync.lines() {
                    if !l.starts_with(&pattern) {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
                format!("{out}{line}\n[sync.mapping]\nemail = \"email\"\n")
            };
            assert_eq!(listed, sorted(accepted(&text)), "the values of {key}");
        }
    }

    /// The mistakes a new user makes, each said with the key and what it takes.
    #[test]
    fn mistakes_say_where_and_what_is_taken() {
        let sync = EXAMPLE.split_once("[sync.mapping]").unwrap().0;
        let typed = error_of(&format!(
            "{sync}[sync.mapping]\nemail = \"email\"\nsignedUpAt = {{ column = \"s\", type = \"datetime\" }}\n"
        ));
        assert_eq!(
            typed,
            "sync \"users\".mapping.signedUpAt: type: unknown variant `datetime`, expected one of `string`, `number`, `boolean`, `date`"
        );
        let neither = error_of(&format!("{sync}[sync.mapping]\nemail = 3\n"));
        assert!(
            neither.starts_with(
                "sync \"users\".mapping.email: expected a column name (a string) or a table"
            ),
            "{neither}"
        );
        let unsubscribe =
            error_of(&EXAMPLE.replace("on_remove = \"delete\"", "on_remove = \"unsubscribe\""));
        assert_eq!(
            unsubscribe,
            "sync \"users\".on_remove: is for mirror syncs only (behavior = \"mirror\"): behavior = \"upsert\" removes nothing"
        );
        let url = error_of(&EXAMPLE.replace(
            "postgres://root@127.0.0.1:5432/test",
            "postgress://root:hunter2@127.0.0.1/test",
        ));
        assert_eq!(
            url,
            "warehouse.url: \"postgress://root:***@127.0.0.1/test\" is not a warehouse URL: it starts with postgres://, sqlite:///, mysql:// or duckdb://"
        );
        let base = error_of(&EXAMPLE.replace("https://app.loops.so/api", "app.loops.so/api"));
        assert_eq!(
            base,
            "loops.base_url: \"app.loops.so/api\" is not an http:// or https:// URL"
        );
        let empty = Config::parse(EXAMPLE, |_| Some(String::new())).unwrap_err();
        assert_eq!(empty.to_string(), "loops.api_key: the API key is empty");
        let nats = error_of(&EXAMPLE.replace("[nats]\n", "[nats]\nuser = \"u\"\n"));
        assert_eq!(
            nats,
            "nats.password: nats.user and nats.password go together"
        );
    }

    /// `loops.api_key_file`: the key read from a file, trimmed; not with `api_key`; a file that
    /// cannot be read names the key and the path; a command that needs only the warehouse does
    /// not read it.
    #[test]
    fn the_api_key_may_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("loopsync-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("key");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let text = EXAMPLE.replace(
            "api_key = \"${LOOPS_API_KEY}\"",
            &format!("api_key_file = \"{}\"", file.display()),
        );
        let config = Config::parse(&text, env).unwrap();
        assert!(config.loops.api_key == "from-a-file");
        assert!(
            !format!("{config:?}").contains("from-a-file"),
            "Debug shows no key"
        );
        let both = error_of(&text.replace("api_key_file", "api_key = \"x\"\napi_key_file"));
        assert_eq!(
            both,
            "loops.api_key_file: set api_key or api_key_file, not both"
        );
        std::fs::remove_file(&file).unwrap();
        let missing = error_of(&text);
        assert!(
            missing.starts_with(&format!(
                "loops.api_key_file: cannot read {}: ",
                file.display()
            )),
            "{missing}"
        );
        let path = dir.join("loopsync.toml");
        std::fs::write(&path, &text).unwrap();
        assert!(
            Config::load_for_warehouse(&path).is_ok(),
            "not read for the warehouse alone"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The README is the page of a user's first hour: at most 150 lines, and its config
    /// sample is a config loopsync reads.
    #[test]
    fn the_readme_is_short_and_its_config_sample_is_read() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let lines = readme.lines().count();
        assert!(lines <= 150, "the README has {lines} lines");
        let sample = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a toml block in the README");
        let config = Config::parse(sample, env).unwrap();
        assert_eq!(config.syncs.len(), 1);
        assert!(
            config.syncs[0].schedule.is_some(),
            "the sample has a schedule"
        );
    }

    /// Every relative link of the README and docs/ resolves to a file of the repository (the
    /// Loops API notes the docs cite among them).
    #[test]
    fn the_docs_links_resolve() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut pages = vec![root.join("README.md")];
        for entry in std::fs::read_dir(root.join("docs")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "md") {
                pages.push(path);
            }
        }
        let mut broken = Vec::new();
        let mut cites_api_notes = false;
        for page in &pages {
            let text = std::fs::read_to_string(page).unwrap();
            for part in text.split("](").skip(1) {
                let target = part.split(')').next().unwrap_or_default();
                let target = target.split('#').next().unwrap_or_default();
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                cites_api_notes |= target.ends_with("loops-api.md");
                if !page.parent().unwrap().join(target).exists() {
                    broken.push(format!("{}: {target}", page.display()));
                }
            }
        }
        assert!(broken.is_empty(), "links to nothing: {broken:?}");
        assert!(cites_api_notes, "the docs link the Loops API notes");
        assert!(root.join("docs/loops-api.md").exists());
    }

    /// `loops.base_url` is https, or plain http on this machine (127.0.0.0/8, `::1`,
    /// `localhost`); elsewhere plain http is refused, naming the setting that allows it.
    #[test]
    fn plain_http_to_loops_only_on_loopback_or_when_allowed() {
        let with = |url: &str, extra: &str| {
            EXAMPLE.replace(
                "base_url = \"https://app.loops.so/api\"",
                &format!("base_url = \"{url}\"{extra}"),
            )
        };
        let refused = error_of(&with("http://sim:8788/api", ""));
        assert!(
            refused.starts_with("loops.base_url: \"http://sim:8788/api\" is plain http")
                && refused.contains("loops.allow_insecure_http = true"),
            "{refused}"
        );
        let hidden = error_of(&with("http://proxy:s3cret@loops.example/api", ""));
        assert!(!hidden.contains("s3cret"), "{hidden}");
        for url in [
            "http://127.0.0.1:8788/api",
            "http://localhost:8788/api",
            "http://[::1]:8788/api",
        ] {
            let config = Config::parse(&with(url, ""), env).unwrap();
            assert!(!config.loops.allow_insecure_http, "{url}");
        }
        let allowed = Config::parse(
            &with("http://sim:8788/api", "\nallow_insecure_http = true"),
            env,
        )
        .unwrap();
        assert!(allowed.loops.allow_insecure_http);
        assert_eq!(allowed.loops.base_url, "http://sim:8788/api");
    }
}
