//! The rules of the config beyond its shape: one function per section, each naming the key it
//! refuses. The first broken rule is the error.

use loopsync_core::spec::{
    AppendSpec, Behavior, Cursor, EventName, IdentifyBy, Incremental, MappedList, MappedProperty,
    OnRemove, RESERVED_NAMES, SyncSpec, default_property_kind,
};
use loopsync_core::value::PropertyKind;
use loopsync_core::{url, warehouse_url};

use crate::raw::{RawConfig, RawEventName, RawEventProperty, RawMapping, RawSync};
use crate::{Config, ConfigError, LoopsConfig, NatsConfig, Schedule, SyncConfig, invalid};

/// Letters, digits, `_` and `-`: a sync name is a NATS subject token.
pub(crate) fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_camel_case(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_alphanumeric())
}

impl RawConfig {
    /// Checks every section, in the order of the file's sections: `[loops]`, `[nats]`, then
    /// each `[[sync]]`.
    pub(crate) fn check(self) -> Result<Config, ConfigError> {
        check_warehouse(&self.warehouse)?;
        check_loops(&self.loops)?;
        if let Some(nats) = &self.nats {
            check_nats(nats)?;
        }
        let mut syncs = Vec::new();
        for (i, raw) in self.sync.into_iter().enumerate() {
            let sync = check_sync(i, raw, &syncs)?;
            syncs.push(sync);
        }
        Ok(Config {
            warehouse: self.warehouse,
            loops: self.loops,
            nats: self.nats,
            syncs,
        })
    }
}

/// `[warehouse]`: a state schema usable as an SQL identifier unquoted; a state store for the
/// warehouses loopsync only reads.
fn check_warehouse(warehouse: &crate::WarehouseConfig) -> Result<(), ConfigError> {
    let schema = &warehouse.state_schema;
    let mut chars = schema.chars();
    let identifier = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && schema.len() <= 48;
    if !identifier {
        return Err(invalid(
            "warehouse.state_schema",
            "use letters, digits and `_` (at most 48), starting with a letter or `_`",
        ));
    }
    let scheme = warehouse.url.split("://").next().unwrap_or_default();
    // A stand-in for an unset variable (a command that reads no warehouse) passes.
    if !warehouse.url.contains('\u{0}') && warehouse_url::scheme(&warehouse.url).is_none() {
        return Err(invalid(
            "warehouse.url",
            format!(
                "\"{}\" is not a warehouse URL: it starts with postgres://, sqlite:///, mysql:// \
                 or duckdb://",
                url::redact(&warehouse.url)
            ),
        ));
    }
    // TLS parameters of PostgreSQL and MySQL URLs (sslmode, sslrootcert) are judged now.
    for (setting, url) in [
        ("warehouse.url", Some(&warehouse.url)),
        ("warehouse.state", warehouse.state.as_ref()),
    ] {
        if let Some(url) = url
            && (url.starts_with("postgres") || url.starts_with("mysql"))
            && let Err(why) = loopsync_core::warehouse_tls::split(url)
        {
            return Err(invalid(setting, why));
        }
    }
    if warehouse_url::is_read_only(&warehouse.url) && warehouse.state.is_none() {
        return Err(invalid(
            "warehouse.state",
            format!(
                "a {scheme}:// warehouse is only read: say where the syncs' state is kept, \
                 `state = \"sqlite:///path/state.db\"` (one machine) or a postgres:// URL"
            ),
        ));
    }
    if let Some(state) = &warehouse.state
        && !warehouse_url::keeps_state(state)
    {
        return Err(invalid(
            "warehouse.state",
            "must start with sqlite:// or postgres://",
        ));
    }
    Ok(())
}

/// `[loops]`: limits at least 1, a positive timeout, an http(s) base URL, and https unless the
/// host is this machine or `allow_insecure_http` says otherwise.
fn check_loops(loops: &LoopsConfig) -> Result<(), ConfigError> {
    let base = &loops.base_url;
    let stand_in = base.contains('\u{0}');
    if !(stand_in || base.starts_with("http://") || base.starts_with("https://")) {
        return Err(invalid(
            "loops.base_url",
            format!(
                "\"{}\" is not an http:// or https:// URL",
                url::redact(base)
            ),
        ));
    }
    if base.starts_with("http://") && !loops.allow_insecure_http && !url::is_loopback(base) {
        return Err(invalid(
            "loops.base_url",
            format!(
                "\"{}\" is plain http: the API key and every contact's data would cross the \
                 network unencrypted. Use https://, or set loops.allow_insecure_http = true \
                 (a simulator on a private network; loopback hosts need neither)",
                url::redact(base)
            ),
        ));
    }
    if loops.requests_per_second == 0 {
        return Err(invalid("loops.requests_per_second", "must be at least 1"));
    }
    if loops.max_attempts == 0 {
        return Err(invalid("loops.max_attempts", "must be at least 1"));
    }
    if loops.concurrency == 0 {
        return Err(invalid("loops.concurrency", "must be at least 1"));
    }
    if loops.timeout_seconds.is_nan() || loops.timeout_seconds <= 0.0 {
        return Err(invalid("loops.timeout_seconds", "must be positive"));
    }
    // A record's claim must cover the requests of one attempt (a re-key's two, a 409's
    // follow-up write): see the loader's CLAIM.
    if loops.timeout_seconds > MAX_TIMEOUT_SECONDS {
        return Err(invalid(
            "loops.timeout_seconds",
            format!(
                "must be at most {MAX_TIMEOUT_SECONDS}: a record's claim (60 s) covers the \
                 requests of one attempt"
            ),
        ));
    }
    if loops.team.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(invalid("loops.team", "is empty"));
    }
    Ok(())
}

/// The longest `loops.timeout_seconds` ([`loopsync_core::tuning::MAX_REQUEST_TIMEOUT`]).
const MAX_TIMEOUT_SECONDS: f64 = loopsync_core::tuning::MAX_REQUEST_TIMEOUT.as_secs() as f64;

/// `[nats]`: a namespace usable as a subject token, a positive ack wait, one way to
/// authenticate and no credentials in cleartext ([`crate::transport`]), queues that hold a
/// message.
fn check_nats(nats: &NatsConfig) -> Result<(), ConfigError> {
    if !is_token(&nats.namespace) {
        return Err(invalid(
            "nats.namespace",
            "use letters, digits, `_` and `-` only",
        ));
    }
    if nats.ack_wait_seconds.is_nan() || nats.ack_wait_seconds <= 0.0 {
        return Err(invalid("nats.ack_wait_seconds", "must be positive"));
    }
    if nats.user.is_some() != nats.password.is_some() {
        return Err(invalid(
            if nats.user.is_some() {
                "nats.password"
            } else {
                "nats.user"
            },
            "nats.user and nats.password go together",
        ));
    }
    let ways = [
        nats.user.is_some(),
        nats.token.is_some(),
        nats.credentials.is_some(),
    ];
    if ways.iter().filter(|w| **w).count() > 1 {
        return Err(invalid(
            "nats",
            "one way to authenticate: user and password, token, or credentials",
        ));
    }
    if let Some(why) = crate::transport::plaintext_credentials(nats) {
        return Err(invalid("nats.url", why));
    }
    // A message of the server's largest (1 MiB by default) must fit in an empty queue.
    if nats.max_queue_bytes < MIN_QUEUE_BYTES {
        return Err(invalid(
            "nats.max_queue_bytes",
            format!("must be at least {MIN_QUEUE_BYTES} (8 MiB)"),
        ));
    }
    Ok(())
}

/// The smallest `nats.max_queue_bytes`.
const MIN_QUEUE_BYTES: u64 = 8 << 20;

/// The `i`-th `[[sync]]`, given the syncs before it (a name is used once). Its keys are named
/// by the sync's name (`sync "users".mapping.email`), by its index where the name itself is
/// wrong (`sync[1].name`).
fn check_sync(i: usize, raw: RawSync, before: &[SyncConfig]) -> Result<SyncConfig, ConfigError> {
    let indexed = |field: &str| format!("sync[{i}].{field}");
    if !is_token(&raw.name) {
        return Err(invalid(
            indexed("name"),
            format!("\"{}\": use letters, digits, `_` and `-` only", raw.name),
        ));
    }
    if before.iter().any(|s| s.spec.name == raw.name) {
        return Err(invalid(
            indexed("name"),
            format!("\"{}\" is used twice", raw.name),
        ));
    }
    let label = crate::sync_label(i, Some(&raw.name));
    let at = |field: &str| format!("{label}.{field}");
    if raw.model.trim().is_empty() {
        return Err(invalid(at("model"), "is empty"));
    }
    if raw.primary_key.trim().is_empty() {
        return Err(invalid(at("primary_key"), "is empty"));
    }
    for (field, name) in [
        ("event_on_create", &raw.event_on_create),
        ("event_on_update", &raw.event_on_update),
    ] {
        if name.trim().is_empty() || name.contains(':') {
            return Err(invalid(
                at(field),
                "an event name is not empty and has no `:`",
            ));
        }
    }
    // `delete`, the default, may be written anywhere (PRODUCT.md's example does); asking to
    // unsubscribe where nothing is removed is a mistake.
    if raw.on_remove == Some(OnRemove::Unsubscribe) && raw.behavior != Behavior::Mirror {
        return Err(invalid(
            at("on_remove"),
            format!(
                "is for mirror syncs only (behavior = \"mirror\"): behavior = \"{}\" removes nothing",
                raw.behavior.as_str()
            ),
        ));
    }
    let append = check_append(&at, &raw)?;
    let incremental = check_incremental(&at, &raw)?;
    let mut properties = Vec::new();
    for (property, mapping) in raw.mapping {
        properties.push(check_mapping(
            &at(&format!("mapping.{property}")),
            property,
            mapping,
        )?);
    }
    if !(0.0..=1.0).contains(&raw.max_removal_share) {
        return Err(invalid(
            at("max_removal_share"),
            format!(
                "is {}: a share of the confirmed contacts, from 0 to 1",
                raw.max_removal_share
            ),
        ));
    }
    // An event sync identified by userId addresses contacts that exist: its email is optional.
    let email_needed = append.is_none() || raw.identify_by == IdentifyBy::Email;
    if email_needed && !properties.iter().any(|p| p.property == "email") {
        return Err(invalid(
            at("mapping.email"),
            "is required: Loops cannot create a contact without an email",
        ));
    }
    if raw.identify_by == IdentifyBy::UserId && !properties.iter().any(|p| p.property == "userId") {
        return Err(invalid(
            at("mapping.userId"),
            "is required with identify_by = \"userId\"",
        ));
    }
    let schedule = match &raw.schedule {
        None => None,
        Some(text) => Some(Schedule::parse(text).map_err(|e| {
            invalid(
                at("schedule"),
                format!("\"{text}\" is not a cron expression: {e}"),
            )
        })?),
    };
    let lists = raw
        .mailing_lists
        .into_iter()
        .map(|(list_id, column)| MappedList { list_id, column })
        .collect();
    Ok(SyncConfig {
        spec: SyncSpec {
            name: raw.name,
            model: raw.model,
            primary_key: raw.primary_key,
            identify_by: raw.identify_by,
            behavior: raw.behavior,
            on_remove: raw.on_remove.unwrap_or_default(),
            trigger_workflows: raw.trigger_workflows,
            event_on_create: raw.event_on_create,
            event_on_update: raw.event_on_update,
            properties,
            lists,
            max_removal_share: raw.max_removal_share,
            append,
            incremental,
        },
        schedule,
    })
}

/// The event sync's own keys (`behavior = "append"`): `event` is required there and every one of
/// them is refused elsewhere; `trigger_workflows` is refused there (each row already is an
/// event).
fn check_append(
    at: &impl Fn(&str) -> String,
    raw: &RawSync,
) -> Result<Option<AppendSpec>, ConfigError> {
    if raw.behavior != Behavior::Append {
        let given = [
            ("event", raw.event.is_some()),
            ("event_properties", !raw.event_properties.is_empty()),
        ];
        if let Some((key, _)) = given.iter().find(|(_, set)| *set) {
            return Err(invalid(
                at(key),
                format!(
                    "is for event syncs only (behavior = \"append\"), not behavior = \"{}\"",
                    raw.behavior.as_str()
                ),
            ));
        }
        return Ok(None);
    }
    if raw.trigger_workflows {
        return Err(invalid(
            at("trigger_workflows"),
            "an event sync sends each row as an event already: remove trigger_workflows",
        ));
    }
    let event = match &raw.event {
        None => {
            return Err(invalid(
                at("event"),
                "is required with behavior = \"append\": a name (event = \"invoicePaid\") or a column (event = { column = \"event_name\" })",
            ));
        }
        Some(RawEventName::Fixed(name)) => {
            if name.trim().is_empty() || name.contains(':') {
                return Err(invalid(
                    at("event"),
                    "an event name is not empty and has no `:`",
                ));
            }
            if name.chars().count() > loopsync_core::value::MAX_CHARS {
                return Err(invalid(
                    at("event"),
                    format!(
                        "an event name has at most {} characters",
                        loopsync_core::value::MAX_CHARS
                    ),
                ));
            }
            EventName::Fixed(name.clone())
        }
        Some(RawEventName::Column(c)) => {
            if c.column.trim().is_empty() {
                return Err(invalid(at("event.column"), "the column is empty"));
            }
            EventName::Column(c.column.clone())
        }
    };
    let mut event_properties = Vec::new();
    for (name, mapping) in &raw.event_properties {
        let key = at(&format!("event_properties.{name}"));
        if name.trim().is_empty() {
            return Err(invalid(key, "an event property needs a name"));
        }
        let (column, kind) = match mapping {
            RawEventProperty::Column(c) => (c.clone(), None),
            RawEventProperty::Typed(t) => (t.column.clone(), t.kind),
        };
        if column.trim().is_empty() {
            return Err(invalid(key, "the column is empty"));
        }
        event_properties.push(MappedProperty {
            property: name.clone(),
            column,
            kind: kind.unwrap_or(PropertyKind::String),
        });
    }
    let cursor = check_cursor(at, raw)?;
    Ok(Some(AppendSpec {
        event,
        event_properties,
        cursor,
    }))
}

/// The Loops default property `name` is a misspelling of (the same name but for case, `_`, `-`
/// and spaces: `firstname`, `first_name`, `Email`), if any; `None` for a default property
/// itself and for any other name.
fn near_default_property(name: &str) -> Option<&'static str> {
    let folded = |n: &str| -> String {
        n.chars()
            .filter(|c| !matches!(c, '_' | '-' | ' '))
            .flat_map(char::to_lowercase)
            .collect()
    };
    let wanted = folded(name);
    loopsync_core::spec::DEFAULT_PROPERTIES
        .iter()
        .map(|(d, _)| *d)
        .find(|d| *d != name && folded(d) == wanted)
}

/// `cursor` and `cursor_lookback`, of any sync.
fn check_cursor(
    at: &impl Fn(&str) -> String,
    raw: &RawSync,
) -> Result<Option<Cursor>, ConfigError> {
    Ok(match (&raw.cursor, &raw.cursor_lookback) {
        (None, Some(_)) => {
            return Err(invalid(
                at("cursor_lookback"),
                "needs a cursor (cursor = \"occurred_at\")",
            ));
        }
        (None, None) => None,
        (Some(column), lookback) => {
            if column.trim().is_empty() {
                return Err(invalid(at("cursor"), "the column is empty"));
            }
            let text = lookback.as_deref().unwrap_or(DEFAULT_LOOKBACK);
            let lookback = humantime::parse_duration(text).map_err(|e| {
                invalid(
                    at("cursor_lookback"),
                    format!("\"{text}\" is not a duration such as \"1h\", \"30m\" or \"2d\": {e}"),
                )
            })?;
            Some(Cursor {
                column: column.clone(),
                lookback_ms: i64::try_from(lookback.as_millis()).unwrap_or(i64::MAX),
            })
        }
    })
}

/// A contact sync's `cursor` (see [`Incremental`]) and `full_diff_every`; an event sync's cursor
/// is its append's, and `full_diff_every` is refused there (an event sync removes nothing).
fn check_incremental(
    at: &impl Fn(&str) -> String,
    raw: &RawSync,
) -> Result<Option<Incremental>, ConfigError> {
    if raw.behavior == Behavior::Append {
        if raw.full_diff_every.is_some() {
            return Err(invalid(
                at("full_diff_every"),
                "is for contact syncs (upsert, mirror): an event sync removes nothing",
            ));
        }
        return Ok(None);
    }
    let Some(cursor) = check_cursor(at, raw)? else {
        if raw.full_diff_every.is_some() {
            return Err(invalid(
                at("full_diff_every"),
                "needs a cursor (cursor = \"updated_at\"): without one every run diffs in full",
            ));
        }
        return Ok(None);
    };
    let text = raw
        .full_diff_every
        .as_deref()
        .unwrap_or(DEFAULT_FULL_DIFF_EVERY);
    let every = humantime::parse_duration(text).map_err(|e| {
        invalid(
            at("full_diff_every"),
            format!("\"{text}\" is not a duration such as \"1d\", \"12h\" or \"30m\": {e}"),
        )
    })?;
    Ok(Some(Incremental {
        cursor,
        full_diff_every_ms: i64::try_from(every.as_millis()).unwrap_or(i64::MAX),
    }))
}

/// `full_diff_every` when the config does not say.
const DEFAULT_FULL_DIFF_EVERY: &str = "1d";

/// `cursor_lookback` when the config does not say.
const DEFAULT_LOOKBACK: &str = "1h";

/// One `mapping.<property>` (its key is `key`): a camelCase name Loops does not reserve, a
/// column, and a type that agrees with a Loops default property's.
fn check_mapping(
    key: &str,
    property: String,
    mapping: RawMapping,
) -> Result<MappedProperty, ConfigError> {
    if RESERVED_NAMES.contains(&property.as_str()) {
        return Err(invalid(
            key,
            format!("\"{property}\" is reserved by Loops and cannot be mapped"),
        ));
    }
    let near = near_default_property(&property);
    if !is_camel_case(&property) {
        let hint = near
            .map(|d| format!(": did you mean {d}, Loops' default property?"))
            .unwrap_or_else(|| ", e.g. planName".to_owned());
        return Err(invalid(
            key,
            format!("a Loops property name is camelCase{hint}"),
        ));
    }
    let (column, kind, custom) = match mapping {
        RawMapping::Column(c) => (c, None, false),
        RawMapping::Typed(t) => (t.column, t.kind, t.custom),
    };
    match near {
        Some(default) if !custom => {
            return Err(invalid(
                key,
                format!(
                    "\"{property}\" is not Loops' default property {default} (property names \
                     are case-sensitive): did you mean {default}? As written, it would be a new \
                     custom property, and every contact's {default} would stay as it is. If you \
                     do mean a custom property of its own, say so: {property} = {{ column = \
                     \"{column}\", custom = true }}"
                ),
            ));
        }
        _ => {}
    }
    if custom && default_property_kind(&property).is_some() {
        return Err(invalid(
            key,
            format!(
                "{property} is a Loops default property: `custom = true` is for a custom \
                 property whose name looks like a default one's"
            ),
        ));
    }
    if column.trim().is_empty() {
        return Err(invalid(key, "the column is empty"));
    }
    let kind = match (default_property_kind(&property), kind) {
        (Some(fixed), Some(given)) if fixed != given => {
            return Err(invalid(
                key,
                format!(
                    "{property} is a Loops default property of type {}, not {}",
                    fixed.as_str(),
                    given.as_str()
                ),
            ));
        }
        (Some(fixed), _) => fixed,
        (None, given) => given.unwrap_or(PropertyKind::String),
    };
    Ok(MappedProperty {
        property,
        column,
        kind,
    })
}
