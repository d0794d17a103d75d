//! A sync, resolved from the config file: what the stages need to know about it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys;
use crate::value::{MAX_CHARS, PropertyKind, coerce, normalize_email};

/// How contacts are matched in Loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdentifyBy {
    #[serde(rename = "email")]
    Email,
    #[serde(rename = "userId")]
    UserId,
}

/// "Update or Create", or that plus removal; or an event sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    Upsert,
    Mirror,
    /// Each model row is one Loops event, sent once for the life of the sync (see
    /// [`AppendSpec`]).
    Append,
}

impl Behavior {
    /// The name in the config (`upsert`, `mirror`, `append`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Behavior::Upsert => "upsert",
            Behavior::Mirror => "mirror",
            Behavior::Append => "append",
        }
    }
}

/// The name of the event an event sync sends for a row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventName {
    /// The same name for every row (`event = "invoicePaid"`).
    Fixed(String),
    /// The row's value of this column (`event = { column = "event_name" }`).
    Column(String),
}

/// A sync's incremental read: only rows whose `column` is at or after the last confirmed run's
/// highest value minus `lookback_ms` (an event sync's [`AppendSpec::cursor`], a contact sync's
/// [`Incremental::cursor`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// A timestamp or date column of the model.
    pub column: String,
    /// How far before the highest value read by the last finished run the next run starts
    /// reading, in milliseconds: rows that arrive late by less than this are still sent.
    pub lookback_ms: i64,
}

/// What an event sync (`behavior = "append"`) adds to a sync: the event's name and properties,
/// and an optional cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendSpec {
    pub event: EventName,
    /// `eventProperties`, sorted by name. Dates go as ISO-8601 strings.
    pub event_properties: Vec<MappedProperty>,
    pub cursor: Option<Cursor>,
}

/// A contact sync's incremental diff (`cursor` on an upsert or mirror sync): a run diffs the
/// rows at or after the watermark minus the lookback (and every row the state has not noted
/// unchanged), and every `full_diff_every_ms` a run diffs the whole model, so that removals and
/// rows changed without their cursor are still found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incremental {
    pub cursor: Cursor,
    /// How long after the last full diff that settled every record a run diffs in full again,
    /// in milliseconds.
    pub full_diff_every_ms: i64,
}

/// What mirror does to a contact whose row left the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnRemove {
    #[default]
    Delete,
    Unsubscribe,
}

/// Loops' default contact properties that the API can set, and their types.
pub const DEFAULT_PROPERTIES: &[(&str, PropertyKind)] = &[
    ("email", PropertyKind::String),
    ("firstName", PropertyKind::String),
    ("lastName", PropertyKind::String),
    ("source", PropertyKind::String),
    ("userGroup", PropertyKind::String),
    ("userId", PropertyKind::String),
    ("subscribed", PropertyKind::Boolean),
    ("createdAt", PropertyKind::Date),
];

/// Names no property may take (`loops-api.md` §2.4), and default properties the API cannot set.
pub const RESERVED_NAMES: &[&str] = &[
    "id",
    "listId",
    "softDeleteAt",
    "teamId",
    "updatedAt",
    "notes",
    "optInStatus",
    "mailingLists",
];

/// The type of a default property, if `name` is one.
pub fn default_property_kind(name: &str) -> Option<PropertyKind> {
    DEFAULT_PROPERTIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)
}

/// One Loops property fed from one model column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedProperty {
    pub property: String,
    pub column: String,
    pub kind: PropertyKind,
}

/// One mailing list fed from one boolean column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedList {
    pub list_id: String,
    pub column: String,
}

/// A sync as the stages see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncSpec {
    pub name: String,
    pub model: String,
    pub primary_key: String,
    pub identify_by: IdentifyBy,
    pub behavior: Behavior,
    pub on_remove: OnRemove,
    pub trigger_workflows: bool,
    pub event_on_create: String,
    pub event_on_update: String,
    /// Sorted by property name.
    pub properties: Vec<MappedProperty>,
    /// Sorted by list id.
    pub lists: Vec<MappedList>,
    /// Mirror: the largest share of the sync's confirmed contacts one run may remove without
    /// `--allow-removals` (a model that returns no rows never removes without it).
    pub max_removal_share: f64,
    /// Set exactly when `behavior` is [`Behavior::Append`].
    #[serde(default)]
    pub append: Option<AppendSpec>,
    /// A contact sync's cursor; never set on an event sync (its cursor is the append's).
    /// Left out of the serialized spec when unset, so that a sync's shape seed (and the rows
    /// noted under it) stays what it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental: Option<Incremental>,
}

/// `max_removal_share` when the config does not say.
pub const DEFAULT_MAX_REMOVAL_SHARE: f64 = 0.2;

impl SyncSpec {
    /// Each model column the sync reads, with the config key that names it (`primary_key`,
    /// `mapping.firstName`, `mailing_lists."cm_news"`, …): what an error about a column says.
    pub fn column_uses(&self) -> Vec<(String, String)> {
        let mut uses = vec![("primary_key".to_owned(), self.primary_key.clone())];
        uses.extend(
            self.properties
                .iter()
                .map(|p| (format!("mapping.{}", p.property), p.column.clone())),
        );
        uses.extend(
            self.lists
                .iter()
                .map(|l| (format!("mailing_lists.\"{}\"", l.list_id), l.column.clone())),
        );
        if let Some(append) = &self.append {
            if let EventName::Column(c) = &append.event {
                uses.push(("event.column".to_owned(), c.clone()));
            }
            uses.extend(
                append
                    .event_properties
                    .iter()
                    .map(|p| (format!("event_properties.{}", p.property), p.column.clone())),
            );
        }
        uses.extend(
            self.cursor()
                .map(|c| ("cursor".to_owned(), c.column.clone())),
        );
        uses
    }

    /// The model columns the sync reads (the primary key not included), sorted and distinct.
    pub fn columns(&self) -> Vec<String> {
        let mut columns: Vec<String> = self
            .properties
            .iter()
            .map(|p| p.column.clone())
            .chain(self.lists.iter().map(|l| l.column.clone()))
            .collect();
        if let Some(append) = &self.append {
            if let EventName::Column(c) = &append.event {
                columns.push(c.clone());
            }
            columns.extend(append.event_properties.iter().map(|p| p.column.clone()));
        }
        columns.extend(self.cursor().map(|c| c.column.clone()));
        columns.sort();
        columns.dedup();
        columns
    }

    /// Why a row cannot be sent, if one of the values the sync reads is longer than Loops
    /// accepts ([`MAX_CHARS`]): the one length rule, applied by the extractor before the row
    /// is published (a value of megabytes would not fit in a message) and by the transformer.
    /// The reason names the property and its column, never the value. The cursor is read as
    /// a time, not sent, so it is not judged here.
    pub fn too_long(&self, values: &BTreeMap<String, Option<String>>) -> Option<String> {
        let mut read: Vec<(String, &str)> = Vec::new();
        for p in &self.properties {
            read.push((p.property.clone(), &p.column));
        }
        for l in &self.lists {
            read.push((format!("mailing list {}", l.list_id), &l.column));
        }
        if let Some(append) = &self.append {
            if let EventName::Column(c) = &append.event {
                read.push(("the event name".to_owned(), c));
            }
            for p in &append.event_properties {
                read.push((format!("event property {}", p.property), &p.column));
            }
        }
        read.into_iter().find_map(|(what, column)| {
            let text = values.get(column)?.as_deref()?;
            // A character takes a byte at least: a text of few bytes needs no count.
            if text.len() <= MAX_CHARS {
                return None;
            }
            let chars = text.chars().count();
            (chars > MAX_CHARS).then(|| {
                format!(
                    "{what} (column {column}) is {chars} characters long; Loops accepts at most {MAX_CHARS}"
                )
            })
        })
    }

    /// A seed for the warehouse's hash of a model row's text (see the warehouse's
    /// `diff_changes`): a digest of the whole sync as configured and of loopsync's version, so
    /// that a row noted unchanged under one mapping — or by another version, which may render
    /// or fingerprint a row otherwise — is read again under any other (its fingerprint may
    /// differ). An upgrade costs one full read of the model.
    pub fn shape_seed(&self) -> i64 {
        // A contact cursor's column is read and hashed; its lookback and `full_diff_every`
        // only say when rows are read, and changing them reads nothing again.
        let mut spec = self.clone();
        if let Some(incremental) = &mut spec.incremental {
            incremental.cursor.lookback_ms = 0;
            incremental.full_diff_every_ms = 0;
        }
        let shape = serde_json::to_string(&spec).expect("a sync spec serializes");
        keys::seed(&format!("{} {shape}", env!("CARGO_PKG_VERSION")))
    }

    /// The sync's cursor, an event sync's or a contact sync's, if it has one.
    pub fn cursor(&self) -> Option<&Cursor> {
        match &self.append {
            Some(append) => append.cursor.as_ref(),
            None => self.incremental.as_ref().map(|i| &i.cursor),
        }
    }

    /// An event sync (`behavior = "append"`).
    pub fn is_append(&self) -> bool {
        self.behavior == Behavior::Append
    }

    /// The property mapped to `name`, if any.
    pub fn property(&self, name: &str) -> Option<&MappedProperty> {
        self.properties.iter().find(|p| p.property == name)
    }

    /// The fingerprint of a row: over the mapped properties and lists only, each coerced to its
    /// type (emails normalised), NULL distinct from "". Two rows with the same fingerprint make
    /// the same Loops request; a column that is not mapped changes nothing. The property names
    /// are part of it, so adding a mapping re-sends every record once, as Census does.
    pub fn fingerprint(&self, values: &BTreeMap<String, Option<String>>) -> String {
        let mut parts: Vec<String> =
            Vec::with_capacity(2 * (self.properties.len() + self.lists.len()));
        for p in &self.properties {
            parts.push(format!("p:{}", p.property));
            parts.push(canonical(
                values.get(&p.column).cloned().flatten(),
                p.kind,
                p.property == "email",
            ));
        }
        for l in &self.lists {
            parts.push(format!("l:{}", l.list_id));
            parts.push(canonical(
                values.get(&l.column).cloned().flatten(),
                PropertyKind::Boolean,
                false,
            ));
        }
        if let Some(append) = &self.append {
            match &append.event {
                EventName::Fixed(name) => parts.push(format!("e:{name}")),
                EventName::Column(c) => {
                    parts.push("e:".to_owned());
                    parts.push(canonical(
                        values.get(c).cloned().flatten(),
                        PropertyKind::String,
                        false,
                    ));
                }
            }
            for p in &append.event_properties {
                parts.push(format!("ep:{}", p.property));
                parts.push(canonical(
                    values.get(&p.column).cloned().flatten(),
                    p.kind,
                    false,
                ));
            }
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        keys::fingerprint(&refs)
    }
}

fn canonical(value: Option<String>, kind: PropertyKind, is_email: bool) -> String {
    match value {
        None => "\u{1}null".to_owned(),
        Some(text) => {
            let text = if is_email {
                normalize_email(&text)
            } else {
                text
            };
            match coerce(kind, &text) {
                Ok(v) => v.to_string(),
                Err(_) => format!("\u{1}raw:{text}"),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn users_spec() -> SyncSpec {
        SyncSpec {
            name: "users".into(),
            model: "select * from users".into(),
            primary_key: "id".into(),
            identify_by: IdentifyBy::Email,
            behavior: Behavior::Upsert,
            on_remove: OnRemove::Delete,
            trigger_workflows: false,
            event_on_create: "contactCreated".into(),
            event_on_update: "contactUpdated".into(),
            properties: vec![
                MappedProperty {
                    property: "email".into(),
                    column: "email".into(),
                    kind: PropertyKind::String,
                },
                MappedProperty {
                    property: "firstName".into(),
                    column: "first_name".into(),
                    kind: PropertyKind::String,
                },
                MappedProperty {
                    property: "seats".into(),
                    column: "seats".into(),
                    kind: PropertyKind::Number,
                },
                MappedProperty {
                    property: "signedUpAt".into(),
                    column: "signed_up_at".into(),
                    kind: PropertyKind::Date,
                },
            ],
            lists: vec![MappedList {
                list_id: "news".into(),
                column: "newsletter".into(),
            }],
            max_removal_share: DEFAULT_MAX_REMOVAL_SHARE,
            append: None,
            incremental: None,
        }
    }

    fn row(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect()
    }

    /// The hashed diff's seed names loopsync's version: rows noted unchanged by another
    /// version are read again (it may render or fingerprint them otherwise).
    #[test]
    fn the_shape_seed_names_the_version() {
        let spec = users_spec();
        let shape = serde_json::to_string(&spec).unwrap();
        assert_ne!(spec.shape_seed(), keys::seed(&shape));
        assert_eq!(
            spec.shape_seed(),
            keys::seed(&format!("{} {shape}", env!("CARGO_PKG_VERSION")))
        );
        let mut other = users_spec();
        other.primary_key = "user_id".into();
        assert_ne!(spec.shape_seed(), other.shape_seed());
        // A sync without a contact cursor serializes as before there was one: its noted rows
        // stay noted across the upgrade. With one, the cursor's column is read and hashed.
        assert!(!shape.contains("incremental"));
        let mut cursored = users_spec();
        cursored.incremental = Some(Incremental {
            cursor: Cursor {
                column: "updated_at".into(),
                lookback_ms: 0,
            },
            full_diff_every_ms: 1,
        });
        assert_ne!(spec.shape_seed(), cursored.shape_seed());
        assert!(cursored.columns().contains(&"updated_at".to_owned()));
        let mut tuned = cursored.clone();
        tuned.incremental = Some(Incremental {
            cursor: Cursor {
                column: "updated_at".into(),
                lookback_ms: 3_600_000,
            },
            full_diff_every_ms: 86_400_000,
        });
        assert_eq!(
            cursored.shape_seed(),
            tuned.shape_seed(),
            "tuning is no shape"
        );
    }

    /// The one length rule: 500 characters pass (counted as characters, not bytes), 501 do
    /// not, in a property or a list's column; the reason names the column and never the value.
    #[test]
    fn a_value_longer_than_loops_accepts_is_named_by_its_column() {
        let spec = users_spec();
        let long = "é".repeat(MAX_CHARS);
        let fits = row(&[("email", Some("ada@x.co")), ("first_name", Some(&long))]);
        assert_eq!(spec.too_long(&fits), None);
        let longer = format!("{long}x");
        let too_long = row(&[("email", Some("ada@x.co")), ("first_name", Some(&longer))]);
        let reason = spec.too_long(&too_long).expect("too long");
        assert_eq!(
            reason,
            "firstName (column first_name) is 501 characters long; Loops accepts at most 500"
        );
        assert!(!reason.contains('é'));
        let list = row(&[("newsletter", Some(&"t".repeat(2_000_000)))]);
        assert_eq!(
            spec.too_long(&list).as_deref(),
            Some(
                "mailing list news (column newsletter) is 2000000 characters long; Loops accepts \
                 at most 500"
            )
        );
    }

    #[test]
    fn columns_are_distinct_and_sorted() {
        assert_eq!(
            users_spec().columns(),
            ["email", "first_name", "newsletter", "seats", "signed_up_at"]
        );
    }

    #[test]
    fn fingerprint_ignores_spelling_but_not_meaning() {
        let spec = users_spec();
        let base = row(&[
            ("email", Some("ada@x.co")),
            ("first_name", Some("Ada")),
            ("seats", Some("3")),
            ("signed_up_at", Some("2024-01-08 11:31:06+00")),
            ("newsletter", Some("t")),
            ("unmapped", Some("whatever")),
        ]);
        let fp = spec.fingerprint(&base);
        let mut same = base.clone();
        same.insert("email".into(), Some("  ADA@x.co".into()));
        same.insert("seats".into(), Some("3.0".into()));
        same.insert("signed_up_at".into(), Some("2024-01-08T11:31:06Z".into()));
        same.insert("newsletter".into(), Some("true".into()));
        same.insert("unmapped".into(), Some("changed".into()));
        assert_eq!(spec.fingerprint(&same), fp);

        let mut changed = base.clone();
        changed.insert("first_name".into(), Some("Ada L.".into()));
        assert_ne!(spec.fingerprint(&changed), fp);

        let mut empty = base.clone();
        empty.insert("first_name".into(), Some(String::new()));
        let mut null = base.clone();
        null.insert("first_name".into(), None);
        assert_ne!(
            spec.fingerprint(&empty),
            spec.fingerprint(&null),
            "NULL is not \"\""
        );
    }

    #[test]
    fn adding_a_mapping_changes_the_fingerprint() {
        let mut spec = users_spec();
        let values = row(&[("email", Some("a@x.co")), ("last_name", Some("L"))]);
        let before = spec.fingerprint(&values);
        spec.properties.push(MappedProperty {
            property: "lastName".into(),
            column: "last_name".into(),
            kind: PropertyKind::String,
        });
        assert_ne!(spec.fingerprint(&values), before);
    }
}
