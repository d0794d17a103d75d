//! The config file as written: the TOML tables before they are checked (see `check`). Serde
//! fills the defaults and rejects unknown keys here; every other rule is in `check`.

use std::collections::BTreeMap;

use loopsync_core::spec::{Behavior, IdentifyBy, OnRemove};
use loopsync_core::value::PropertyKind;
use serde::Deserialize;

use crate::{LoopsConfig, NatsConfig, WarehouseConfig};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) warehouse: WarehouseConfig,
    pub(crate) loops: LoopsConfig,
    pub(crate) nats: Option<NatsConfig>,
    #[serde(default)]
    pub(crate) sync: Vec<RawSync>,
}

/// One `[[sync]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSync {
    pub(crate) name: String,
    pub(crate) model: String,
    pub(crate) primary_key: String,
    pub(crate) identify_by: IdentifyBy,
    #[serde(default = "default_behavior")]
    pub(crate) behavior: Behavior,
    /// Mirror only; `None`: not written (delete).
    #[serde(default)]
    pub(crate) on_remove: Option<OnRemove>,
    #[serde(default)]
    pub(crate) trigger_workflows: bool,
    #[serde(default = "default_event_on_create")]
    pub(crate) event_on_create: String,
    #[serde(default = "default_event_on_update")]
    pub(crate) event_on_update: String,
    pub(crate) schedule: Option<String>,
    #[serde(default = "default_max_removal_share")]
    pub(crate) max_removal_share: f64,
    #[serde(default)]
    pub(crate) mapping: BTreeMap<String, RawMapping>,
    #[serde(default)]
    pub(crate) mailing_lists: BTreeMap<String, String>,
    /// Event syncs only: the event's name, fixed or from a column.
    pub(crate) event: Option<RawEventName>,
    /// Event syncs only: `eventProperties` = column, or a table with a type.
    #[serde(default)]
    pub(crate) event_properties: BTreeMap<String, RawEventProperty>,
    /// Read only rows at or after this column's last confirmed value, minus `cursor_lookback`
    /// (a contact sync: diff only those, and the whole model every `full_diff_every`).
    pub(crate) cursor: Option<String>,
    /// With `cursor`: a duration such as `"1h"`, `"30m"`, `"2d"` (default `"1h"`).
    pub(crate) cursor_lookback: Option<String>,
    /// Contact syncs with a cursor: a duration such as `"1d"` (the default), `"12h"`.
    pub(crate) full_diff_every: Option<String>,
}

/// `event = "invoicePaid"`, or `event = { column = "event_name" }`.
#[derive(Debug)]
pub(crate) enum RawEventName {
    Fixed(String),
    Column(EventColumn),
}

/// A string or a table, each read by its own rules, so that a mistake inside the table is
/// said in the table's words (`type: unknown variant `datetime`, expected one of …`), not as
/// "data did not match any variant of untagged enum".
fn string_or_table<'de, D, T, R>(
    deserializer: D,
    string: impl FnOnce(String) -> R,
    table: impl FnOnce(T) -> R,
) -> Result<R, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error;
    match toml::Value::deserialize(deserializer)? {
        toml::Value::String(text) => Ok(string(text)),
        value @ toml::Value::Table(_) => serde_path_to_error::deserialize(value)
            .map(table)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner().to_string();
                let inner = inner.split("\nin `").next().unwrap_or_default().trim();
                D::Error::custom(format!("{path}: {inner}"))
            }),
        other => Err(D::Error::custom(format!(
            "expected a column name (a string) or a table such as {{ column = \"c\", type = \"date\" }}, found a {}",
            other.type_str()
        ))),
    }
}

impl<'de> Deserialize<'de> for RawEventName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        string_or_table(deserializer, RawEventName::Fixed, RawEventName::Column)
    }
}

impl<'de> Deserialize<'de> for RawMapping {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        string_or_table(deserializer, RawMapping::Column, RawMapping::Typed)
    }
}

impl<'de> Deserialize<'de> for RawEventProperty {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        string_or_table(
            deserializer,
            RawEventProperty::Column,
            RawEventProperty::Typed,
        )
    }
}

/// An event property: a column name, or `{ column, type }` (its names are free: no default
/// property to misspell).
#[derive(Debug)]
pub(crate) enum RawEventProperty {
    Column(String),
    Typed(TypedEventProperty),
}

/// `{ column = "…", type = "number" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TypedEventProperty {
    pub(crate) column: String,
    #[serde(rename = "type")]
    pub(crate) kind: Option<PropertyKind>,
}

/// `{ column = "…" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventColumn {
    pub(crate) column: String,
}

fn default_max_removal_share() -> f64 {
    loopsync_core::spec::DEFAULT_MAX_REMOVAL_SHARE
}
fn default_behavior() -> Behavior {
    Behavior::Upsert
}
fn default_event_on_create() -> String {
    "contactCreated".into()
}
fn default_event_on_update() -> String {
    "contactUpdated".into()
}

/// A mapping entry: a column name, or `{ column, type }`.
#[derive(Debug)]
pub(crate) enum RawMapping {
    Column(String),
    Typed(TypedMapping),
}

/// `{ column = "…", type = "date" }`; `custom = true` keeps a name that looks like a Loops
/// default property's misspelled (`firstname`) as a custom property of its own.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TypedMapping {
    pub(crate) column: String,
    #[serde(rename = "type")]
    pub(crate) kind: Option<PropertyKind>,
    #[serde(default)]
    pub(crate) custom: bool,
}
