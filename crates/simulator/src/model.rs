//! The Loops rules of `loops-api.md` as plain functions over an in-memory audience: identity and
//! upsert, validation, property types and dates, mailing lists. No HTTP here.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{
    EmailMatch, NumericDates, Settings, SettingsError, UnknownLists, UnknownProperties,
};

/// "most v1 … request body string values are limited to 500 characters" (`loops-api.md` §2.5).
pub const MAX_STRING_CHARS: usize = 500;

/// Names no custom property may take (`loops-api.md` §2.4).
pub const RESERVED_NAMES: &[&str] = &["id", "listId", "softDeleteAt", "teamId", "updatedAt"];

/// Keys of a request body that are not contact properties.
const REQUEST_KEYS: &[&str] = &[
    "email",
    "userId",
    "mailingLists",
    "eventName",
    "eventProperties",
];

/// The default (system) properties: key, label, type.
const DEFAULT_PROPERTIES: &[(&str, &str, PropertyType)] = &[
    ("firstName", "First Name", PropertyType::String),
    ("lastName", "Last Name", PropertyType::String),
    ("email", "Email", PropertyType::String),
    ("notes", "Notes", PropertyType::String),
    ("source", "Source", PropertyType::String),
    ("userGroup", "User Group", PropertyType::String),
    ("userId", "User Id", PropertyType::String),
    ("subscribed", "Subscribed", PropertyType::Boolean),
    ("createdAt", "Created At", PropertyType::Date),
];

/// A property type of Loops, as the simulated service knows it.
///
/// Deliberately not `loopsync_core::value::PropertyKind`: the simulator stands in for Loops and
/// depends on no loopsync crate, so a change to the pipeline's types cannot quietly change what
/// the stand-in accepts. Client and simulator meet only on the wire (the lowercase names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PropertyType {
    String,
    Number,
    Boolean,
    Date,
}

impl std::str::FromStr for PropertyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "string" => Ok(PropertyType::String),
            "number" => Ok(PropertyType::Number),
            "boolean" => Ok(PropertyType::Boolean),
            "date" => Ok(PropertyType::Date),
            other => Err(format!("unknown property type `{other}`")),
        }
    }
}

/// A mailing list, as `GET /v1/lists` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MailingList {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub is_public: bool,
}

/// An error answer: status and Loops-style message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 409,
            message: message.into(),
        }
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 404,
            message: message.into(),
        }
    }
}

/// One stored contact.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredContact {
    pub id: String,
    /// As sent; matched as `Settings::email_match` says.
    pub email: String,
    pub user_id: Option<String>,
    /// Every property but email and userId, in stored form (dates as ISO-8601 strings).
    pub props: BTreeMap<String, Value>,
    /// The lists the contact is subscribed to.
    pub lists: BTreeSet<String>,
}

/// What a contact write asks for, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContactWrite {
    pub email: Option<String>,
    pub user_id: Option<String>,
    pub props: Vec<(String, Value)>,
    pub lists: Vec<(String, bool)>,
    /// Unknown properties to create first (only with `unknown_properties = "create"`).
    pub new_properties: Vec<String>,
}

/// What a write did, for the workflow-trigger log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    pub id: String,
    pub email: String,
    pub user_id: Option<String>,
    pub created: bool,
    /// Properties whose value really changed (email and userId included).
    pub changed: Vec<String>,
    /// Lists the contact was added to (false or absent before, true now).
    pub added_to_lists: Vec<String>,
}

/// How identifiers are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `contacts/create`: a new contact or 409.
    Create,
    /// `contacts/update` and `events/send`: update or create (§2.3).
    Upsert,
}

/// The team's contacts, properties and lists.
#[derive(Debug, Default)]
pub struct Audience {
    contacts: BTreeMap<u64, StoredContact>,
    by_email: HashMap<String, u64>,
    by_user_id: HashMap<String, u64>,
    next_seq: u64,
    /// Custom properties in creation order.
    custom: Vec<(String, PropertyType)>,
    pub lists: Vec<MailingList>,
    /// What `by_email` is keyed by.
    email_match: EmailMatch,
}

/// The index key of an email: without surrounding blanks, and lower-cased unless matching is
/// case-sensitive (`loops-api.md` §9, §9.1).
pub fn email_key(email: &str, matching: EmailMatch) -> String {
    match matching {
        EmailMatch::CaseInsensitive => email.trim().to_lowercase(),
        EmailMatch::CaseSensitive => email.trim().to_owned(),
    }
}

/// A plain syntactic check: one `@`, something before it, a dotted domain, no blanks.
pub fn is_valid_email(email: &str) -> bool {
    if email.is_empty() || email.chars().any(char::is_whitespace) {
        return false;
    }
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !local.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
}

fn check_length(field: &str, text: &str) -> Result<(), ApiError> {
    let chars = text.chars().count();
    if chars > MAX_STRING_CHARS {
        return Err(ApiError::bad(format!(
            "{field} must be {MAX_STRING_CHARS} characters or fewer (it has {chars})."
        )));
    }
    Ok(())
}

/// Reads an identifier: absent, `null` and `""` are "not given".
fn identifier(body: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            check_length(key, s)?;
            Ok(Some(s.clone()))
        }
        Some(_) => Err(ApiError::bad(format!("{key} must be a string."))),
    }
}

/// Reads `email` and `userId` from a body; a given email must be valid.
pub fn identifiers(
    body: &Map<String, Value>,
) -> Result<(Option<String>, Option<String>), ApiError> {
    let email = identifier(body, "email")?;
    if let Some(e) = &email
        && !is_valid_email(e)
    {
        return Err(ApiError::bad(format!("Invalid email address: {e}")));
    }
    Ok((email, identifier(body, "userId")?))
}

/// A date as Loops accepts it (§2.5): a Unix timestamp (seconds or milliseconds as `numeric`
/// says), or one of the ISO-8601 string forms with an optional offset (UTC when absent). `None`
/// when it is no date.
pub fn parse_date(value: &Value, numeric: NumericDates) -> Option<DateTime<Utc>> {
    match value {
        Value::Number(n) => {
            let x = n.as_f64()?;
            if !x.is_finite() {
                return None;
            }
            let millis = match numeric {
                // Below 1e11 it is seconds (1e11 s is the year 5138; 1e11 ms is 1973).
                NumericDates::Auto if x.abs() < 1e11 => x * 1000.0,
                NumericDates::Auto | NumericDates::Millis => x,
            };
            DateTime::from_timestamp_millis(millis.round() as i64)
        }
        Value::String(s) => parse_date_text(s.trim()),
        _ => None,
    }
}

fn parse_date_text(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    // Split a trailing `Z` or `±HH:MM` after the date part.
    let (base, offset_seconds) = if let Some(base) = s.strip_suffix('Z') {
        (base, 0i64)
    } else if s.len() > 16
        && (s.as_bytes()[s.len() - 6] == b'+' || s.as_bytes()[s.len() - 6] == b'-')
        && s.as_bytes()[s.len() - 3] == b':'
    {
        let (base, offset) = s.split_at(s.len() - 6);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let hours: i64 = offset[1..3].parse().ok()?;
        let minutes: i64 = offset[4..6].parse().ok()?;
        (base, sign * (hours * 3600 + minutes * 60))
    } else {
        (s, 0)
    };
    let naive = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(base, f).ok())
    .or_else(|| {
        NaiveDate::parse_from_str(base, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
    })?;
    Some(naive.and_utc() - chrono::Duration::seconds(offset_seconds))
}

/// The stored (and returned) form of a date.
pub fn format_date(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Checks a value against a property type and gives its stored form. `null` clears. `numeric`
/// says how a number given for a date is read.
pub fn coerce(
    key: &str,
    kind: PropertyType,
    value: &Value,
    numeric: NumericDates,
) -> Result<Value, ApiError> {
    let wrong = |expected: &str| {
        ApiError::bad(format!(
            "Invalid value for property {key}: expected a {expected}."
        ))
    };
    match (kind, value) {
        (_, Value::Null) => Ok(Value::Null),
        (PropertyType::String, Value::String(s)) => {
            check_length(key, s)?;
            Ok(value.clone())
        }
        (PropertyType::String, _) => Err(wrong("string")),
        (PropertyType::Number, Value::Number(_)) => Ok(value.clone()),
        (PropertyType::Number, _) => Err(wrong("number")),
        (PropertyType::Boolean, Value::Bool(_)) => Ok(value.clone()),
        (PropertyType::Boolean, _) => Err(wrong("boolean")),
        (PropertyType::Date, _) => parse_date(value, numeric)
            .map(|d| Value::String(format_date(d)))
            .ok_or_else(|| {
                wrong(match numeric {
                    NumericDates::Auto => {
                        "date (Unix seconds or milliseconds, or an ISO-8601 date)"
                    }
                    NumericDates::Millis => "date (Unix milliseconds, or an ISO-8601 date)",
                })
            }),
    }
}

/// A camelCase property name: a lower-case letter, then letters and digits.
pub fn is_camel_case(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_alphanumeric())
}

/// "Plan Name" for "planName".
pub fn label_for(name: &str) -> String {
    let mut label = String::new();
    for (i, c) in name.chars().enumerate() {
        if i == 0 {
            label.extend(c.to_uppercase());
        } else if c.is_ascii_uppercase() {
            label.push(' ');
            label.push(c);
        } else {
            label.push(c);
        }
    }
    label
}

impl Audience {
    pub fn new(
        lists: Vec<MailingList>,
        properties: Vec<(String, PropertyType)>,
        email_match: EmailMatch,
    ) -> Audience {
        Audience {
            lists,
            custom: properties,
            email_match,
            ..Default::default()
        }
    }

    fn email_key(&self, email: &str) -> String {
        email_key(email, self.email_match)
    }

    /// Re-keys the email index for `matching`. Refused, with nothing changed, when two contacts
    /// would become one: their emails differ only in case and matching becomes case-insensitive.
    pub fn set_email_match(&mut self, matching: EmailMatch) -> Result<(), SettingsError> {
        if matching == self.email_match {
            return Ok(());
        }
        let mut index: HashMap<String, u64> = HashMap::with_capacity(self.contacts.len());
        for (seq, contact) in &self.contacts {
            if let Some(other) = index.insert(email_key(&contact.email, matching), *seq) {
                return Err(SettingsError::EmailsCollide {
                    first: self.contacts[&other].email.clone(),
                    second: contact.email.clone(),
                });
            }
        }
        self.by_email = index;
        self.email_match = matching;
        Ok(())
    }

    #[cfg(test)]
    pub fn contact_count(&self) -> usize {
        self.contacts.len()
    }

    fn custom_type(&self, key: &str) -> Option<PropertyType> {
        self.custom.iter().find(|(k, _)| k == key).map(|(_, t)| *t)
    }

    /// Every property, defaults first: `(key, label, type, is_custom)`.
    pub fn properties(&self) -> Vec<(String, String, PropertyType, bool)> {
        let defaults = DEFAULT_PROPERTIES
            .iter()
            .map(|(k, l, t)| ((*k).to_owned(), (*l).to_owned(), *t, false));
        let custom = self
            .custom
            .iter()
            .map(|(k, t)| (k.clone(), label_for(k), *t, true));
        defaults.chain(custom).collect()
    }

    /// `POST /v1/contacts/properties`.
    pub fn create_property(&mut self, name: &str, kind: PropertyType) -> Result<(), ApiError> {
        check_length("name", name)?;
        if RESERVED_NAMES.contains(&name) {
            return Err(ApiError::bad(format!("\"{name}\" is a reserved name.")));
        }
        if !is_camel_case(name) {
            return Err(ApiError::bad(format!(
                "Property name \"{name}\" must be in camelCase, e.g. planName."
            )));
        }
        if DEFAULT_PROPERTIES.iter().any(|(k, _, _)| *k == name) || self.custom_type(name).is_some()
        {
            return Err(ApiError::bad(format!(
                "A property with the name \"{name}\" already exists."
            )));
        }
        self.custom.push((name.to_owned(), kind));
        Ok(())
    }

    /// Validates the properties and lists of a contact write (create, update, event). Every
    /// top-level key that is not an identifier or a request key is a property.
    pub fn parse_write(
        &self,
        body: &Map<String, Value>,
        settings: &Settings,
    ) -> Result<ContactWrite, ApiError> {
        let (email, user_id) = identifiers(body)?;
        let numeric = settings.numeric_dates;
        let mut write = ContactWrite {
            email,
            user_id,
            ..Default::default()
        };
        for (key, value) in body {
            if REQUEST_KEYS.contains(&key.as_str()) {
                continue;
            }
            if RESERVED_NAMES.contains(&key.as_str()) {
                return Err(ApiError::bad(format!(
                    "\"{key}\" is a reserved name and cannot be set."
                )));
            }
            let stored = match key.as_str() {
                "notes" => {
                    return Err(ApiError::bad("notes cannot be set through the API."));
                }
                "optInStatus" => {
                    return Err(ApiError::bad("optInStatus cannot be set through the API."));
                }
                "subscribed" => match value {
                    Value::Bool(_) => value.clone(),
                    _ => return Err(ApiError::bad("subscribed must be a boolean.")),
                },
                "userGroup" => match value {
                    Value::Null => Value::String(String::new()),
                    _ => coerce(key, PropertyType::String, value, numeric)?,
                },
                "firstName" | "lastName" | "source" => {
                    coerce(key, PropertyType::String, value, numeric)?
                }
                "createdAt" => coerce(key, PropertyType::Date, value, numeric)?,
                _ => match self.custom_type(key) {
                    Some(kind) => coerce(key, kind, value, numeric)?,
                    None => match settings.unknown_properties {
                        UnknownProperties::Reject => {
                            return Err(ApiError::bad(format!(
                                "Contact property \"{key}\" does not exist. Create it first."
                            )));
                        }
                        UnknownProperties::Create => {
                            if !is_camel_case(key) {
                                return Err(ApiError::bad(format!(
                                    "Property name \"{key}\" must be in camelCase."
                                )));
                            }
                            write.new_properties.push(key.clone());
                            coerce(key, PropertyType::String, value, numeric)?
                        }
                    },
                },
            };
            write.props.push((key.clone(), stored));
        }
        write.lists = self.parse_lists(body.get("mailingLists"), settings)?;
        Ok(write)
    }

    /// `mailingLists`: an object of `listId → boolean`; `[]` (PHP's empty object) and `null`
    /// mean none.
    fn parse_lists(
        &self,
        value: Option<&Value>,
        settings: &Settings,
    ) -> Result<Vec<(String, bool)>, ApiError> {
        let map = match value {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) if items.is_empty() => return Ok(Vec::new()),
            Some(Value::Object(map)) => map,
            Some(_) => {
                return Err(ApiError::bad(
                    "mailingLists must be an object of list IDs and booleans.",
                ));
            }
        };
        let mut lists = Vec::new();
        for (id, on) in map {
            let Value::Bool(on) = on else {
                return Err(ApiError::bad(format!(
                    "mailingLists.{id} must be true or false."
                )));
            };
            if settings.unknown_lists == UnknownLists::Reject
                && !self.lists.iter().any(|l| &l.id == id)
            {
                return Err(ApiError::bad(format!("Mailing list {id} does not exist.")));
            }
            lists.push((id.clone(), *on));
        }
        Ok(lists)
    }

    fn find_email(&self, email: &str) -> Option<u64> {
        self.by_email.get(&self.email_key(email)).copied()
    }

    fn find_user_id(&self, user_id: &str) -> Option<u64> {
        self.by_user_id.get(user_id).copied()
    }

    /// The contact a find would return.
    pub fn find(&self, email: Option<&str>, user_id: Option<&str>) -> Option<&StoredContact> {
        let seq = match (email, user_id) {
            (Some(e), _) => self.find_email(e),
            (None, Some(u)) => self.find_user_id(u),
            (None, None) => None,
        }?;
        self.contacts.get(&seq)
    }

    /// Resolves the identifiers of a write to an existing contact (`Some`) or a new one (`None`).
    pub fn resolve(
        &self,
        email: Option<&str>,
        user_id: Option<&str>,
        mode: Mode,
    ) -> Result<Option<u64>, ApiError> {
        let by_email = email.and_then(|e| self.find_email(e));
        let by_user = user_id.and_then(|u| self.find_user_id(u));
        match mode {
            Mode::Create => {
                if email.is_none() {
                    return Err(ApiError::bad("email is required to create a contact."));
                }
                if by_email.is_some() {
                    return Err(ApiError::conflict(
                        "An audience member with this email already exists.",
                    ));
                }
                if by_user.is_some() {
                    return Err(ApiError::conflict(
                        "An audience member with this userId already exists.",
                    ));
                }
                Ok(None)
            }
            Mode::Upsert => match (by_email, by_user) {
                (Some(a), Some(b)) if a != b => Err(ApiError::bad(
                    "Multiple contacts found for the given criteria",
                )),
                (Some(seq), _) | (None, Some(seq)) => Ok(Some(seq)),
                (None, None) => match (email, user_id) {
                    (Some(_), _) => Ok(None),
                    (None, Some(_)) => Err(ApiError::bad(
                        "No contact found with this userId. A new contact needs an email.",
                    )),
                    (None, None) => Err(ApiError::bad("Provide an email or a userId.")),
                },
            },
        }
    }

    /// Applies a validated write to the contact `target` (or a new contact when `None`).
    pub fn apply(
        &mut self,
        target: Option<u64>,
        write: ContactWrite,
        new_id: String,
    ) -> WriteOutcome {
        for name in &write.new_properties {
            if self.custom_type(name).is_none() {
                self.custom.push((name.clone(), PropertyType::String));
            }
        }
        let (seq, created) = match target {
            Some(seq) => (seq, false),
            None => {
                let seq = self.next_seq;
                self.next_seq += 1;
                let email = write.email.clone().expect("a new contact has an email");
                let mut props = BTreeMap::new();
                props.insert("firstName".into(), Value::Null);
                props.insert("lastName".into(), Value::Null);
                props.insert("source".into(), Value::String("API".into()));
                props.insert("subscribed".into(), Value::Bool(true));
                props.insert("userGroup".into(), Value::String(String::new()));
                self.by_email.insert(self.email_key(&email), seq);
                self.contacts.insert(
                    seq,
                    StoredContact {
                        id: new_id,
                        email,
                        user_id: None,
                        props,
                        lists: BTreeSet::new(),
                    },
                );
                (seq, true)
            }
        };
        let contact = self
            .contacts
            .get_mut(&seq)
            .expect("resolved contact exists");
        let mut changed = Vec::new();
        if let Some(email) = write.email
            && email != contact.email
        {
            let (old_key, new_key) = (
                email_key(&contact.email, self.email_match),
                email_key(&email, self.email_match),
            );
            self.by_email.remove(&old_key);
            self.by_email.insert(new_key, seq);
            contact.email = email;
            changed.push("email".to_owned());
        }
        if let Some(user_id) = write.user_id
            && contact.user_id.as_deref() != Some(user_id.as_str())
        {
            if let Some(old) = &contact.user_id {
                self.by_user_id.remove(old);
            }
            self.by_user_id.insert(user_id.clone(), seq);
            contact.user_id = Some(user_id);
            changed.push("userId".to_owned());
        }
        for (key, value) in write.props {
            let before = contact.props.get(&key).unwrap_or(&Value::Null);
            if *before != value {
                contact.props.insert(key.clone(), value);
                changed.push(key);
            }
        }
        let mut added_to_lists = Vec::new();
        for (id, on) in write.lists {
            if on {
                if contact.lists.insert(id.clone()) {
                    added_to_lists.push(id);
                }
            } else {
                contact.lists.remove(&id);
            }
        }
        WriteOutcome {
            id: contact.id.clone(),
            email: contact.email.clone(),
            user_id: contact.user_id.clone(),
            created,
            changed: if created { Vec::new() } else { changed },
            added_to_lists,
        }
    }

    /// Deletes the contact with this identifier.
    pub fn delete(&mut self, email: Option<&str>, user_id: Option<&str>) -> Result<(), ApiError> {
        let seq = match (email, user_id) {
            (Some(e), None) => self.find_email(e),
            (None, Some(u)) => self.find_user_id(u),
            _ => {
                return Err(ApiError::bad(
                    "Provide either an email or a userId, not both.",
                ));
            }
        }
        .ok_or_else(|| ApiError::not_found("Contact not found."))?;
        let contact = self.contacts.remove(&seq).expect("indexed contact exists");
        self.by_email.remove(&self.email_key(&contact.email));
        if let Some(u) = &contact.user_id {
            self.by_user_id.remove(u);
        }
        Ok(())
    }

    /// A contact as `contacts/find` returns it: default properties, `mailingLists` with only
    /// `true` entries, and every custom property (null when unset).
    pub fn to_json(&self, contact: &StoredContact) -> Value {
        let get = |k: &str| contact.props.get(k).cloned().unwrap_or(Value::Null);
        let mut map = Map::new();
        map.insert("id".into(), Value::String(contact.id.clone()));
        map.insert("email".into(), Value::String(contact.email.clone()));
        map.insert("firstName".into(), get("firstName"));
        map.insert("lastName".into(), get("lastName"));
        map.insert("source".into(), get("source"));
        map.insert("subscribed".into(), get("subscribed"));
        map.insert("userGroup".into(), get("userGroup"));
        map.insert(
            "userId".into(),
            contact.user_id.clone().map_or(Value::Null, Value::String),
        );
        let lists = contact
            .lists
            .iter()
            .map(|id| (id.clone(), Value::Bool(true)))
            .collect();
        map.insert("mailingLists".into(), Value::Object(lists));
        map.insert("optInStatus".into(), Value::Null);
        if let Some(created_at) = contact.props.get("createdAt") {
            map.insert("createdAt".into(), created_at.clone());
        }
        for (key, _) in &self.custom {
            map.insert(key.clone(), get(key));
        }
        Value::Object(map)
    }

    /// Every contact in creation order.
    pub fn all(&self) -> impl Iterator<Item = &StoredContact> {
        self.contacts.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn audience() -> Audience {
        Audience::new(
            vec![MailingList {
                id: "news".into(),
                name: "News".into(),
                description: None,
                is_public: true,
            }],
            vec![
                ("planName".into(), PropertyType::String),
                ("seats".into(), PropertyType::Number),
                ("trial".into(), PropertyType::Boolean),
                ("signedUpAt".into(), PropertyType::Date),
            ],
            EmailMatch::CaseInsensitive,
        )
    }

    /// One upsert as `contacts/update` does it.
    fn upsert(a: &mut Audience, v: Value) -> Result<WriteOutcome, ApiError> {
        let write = a.parse_write(&body(v), &Settings::default())?;
        let target = a.resolve(
            write.email.as_deref(),
            write.user_id.as_deref(),
            Mode::Upsert,
        )?;
        let id = format!("c{}", a.contact_count());
        Ok(a.apply(target, write, id))
    }

    #[test]
    fn email_validity() {
        for good in ["a@b.co", "first.last+tag@sub.example.com", "A@B.CO"] {
            assert!(is_valid_email(good), "{good}");
        }
        for bad in [
            "", "a", "a@b", "@b.co", "a@.co", "a@b.", "a b@c.co", "a@b..co", " a@b.co",
        ] {
            assert!(!is_valid_email(bad), "{bad}");
        }
    }

    #[test]
    fn dates_in_every_documented_form() {
        let expect = "2024-01-08T11:31:06.000Z";
        for v in [
            json!(1704713466),
            json!(1704713466000u64),
            json!("2024-01-08T11:31:06"),
            json!("2024-01-08T11:31:06.000"),
            json!("2024-01-08T11:31:06Z"),
            json!("2024-01-08 11:31:06"),
            json!("2024-01-08 11:31:06.000"),
            json!("2024-01-08T12:31:06+01:00"),
            json!("2024-01-08 06:31:06-05:00"),
        ] {
            let got = parse_date(&v, NumericDates::Auto).map(format_date);
            assert_eq!(got.as_deref(), Some(expect), "{v}");
        }
        assert_eq!(
            parse_date(&json!("2024-01-08 11:31"), NumericDates::Auto)
                .map(format_date)
                .as_deref(),
            Some("2024-01-08T11:31:00.000Z")
        );
        assert_eq!(
            parse_date(&json!("2024-01-08"), NumericDates::Auto)
                .map(format_date)
                .as_deref(),
            Some("2024-01-08T00:00:00.000Z")
        );
        for bad in [
            json!("yesterday"),
            json!("2024-13-01"),
            json!(true),
            json!([1]),
        ] {
            assert!(parse_date(&bad, NumericDates::Auto).is_none(), "{bad}");
        }
    }

    #[test]
    fn numbers_in_dates_are_seconds_below_1e11_or_always_millis() {
        let at = |v: Value, numeric| parse_date(&v, numeric).map(format_date);
        use NumericDates::{Auto, Millis};
        for (value, auto, millis) in [
            (
                json!(86_400_000),
                "1972-09-27T00:00:00.000Z",
                "1970-01-02T00:00:00.000Z",
            ),
            (
                json!(1000),
                "1970-01-01T00:16:40.000Z",
                "1970-01-01T00:00:01.000Z",
            ),
            (
                json!(1_704_713_466),
                "2024-01-08T11:31:06.000Z",
                "1970-01-20T17:31:53.466Z",
            ),
            (
                json!(-86_400_000),
                "1967-04-07T00:00:00.000Z",
                "1969-12-31T00:00:00.000Z",
            ),
            // Milliseconds from 10^11 on read the same either way.
            (
                json!(1_704_713_466_000u64),
                "2024-01-08T11:31:06.000Z",
                "2024-01-08T11:31:06.000Z",
            ),
            // Strings are not numbers.
            (
                json!("1970-01-02"),
                "1970-01-02T00:00:00.000Z",
                "1970-01-02T00:00:00.000Z",
            ),
        ] {
            assert_eq!(at(value.clone(), Auto).as_deref(), Some(auto), "{value}");
            assert_eq!(
                at(value.clone(), Millis).as_deref(),
                Some(millis),
                "{value}"
            );
        }
        assert_eq!(
            coerce("signedUpAt", PropertyType::Date, &json!(1000), Millis).unwrap(),
            json!("1970-01-01T00:00:01.000Z")
        );
        let e = coerce("signedUpAt", PropertyType::Date, &json!(true), Millis).unwrap_err();
        assert!(e.message.contains("Unix milliseconds"), "{}", e.message);
    }

    #[test]
    fn every_date_property_of_a_write_follows_numeric_dates() {
        let a = audience();
        let b = body(json!({"email": "a@x.co", "signedUpAt": 86_400_000, "createdAt": 1000}));
        let props = |numeric_dates| {
            let settings = Settings {
                numeric_dates,
                ..Default::default()
            };
            a.parse_write(&b, &settings).unwrap().props
        };
        assert_eq!(
            props(NumericDates::Auto),
            [
                ("createdAt".to_owned(), json!("1970-01-01T00:16:40.000Z")),
                ("signedUpAt".to_owned(), json!("1972-09-27T00:00:00.000Z")),
            ]
        );
        assert_eq!(
            props(NumericDates::Millis),
            [
                ("createdAt".to_owned(), json!("1970-01-01T00:00:01.000Z")),
                ("signedUpAt".to_owned(), json!("1970-01-02T00:00:00.000Z")),
            ]
        );
    }

    #[test]
    fn case_sensitive_emails_are_two_contacts() {
        let mut a = audience();
        a.set_email_match(EmailMatch::CaseSensitive).unwrap();
        let upper = upsert(&mut a, json!({"email": "A@x.co", "planName": "upper"})).unwrap();
        let lower = upsert(&mut a, json!({"email": "a@x.co", "planName": "lower"})).unwrap();
        assert!(upper.created && lower.created);
        assert_ne!(upper.id, lower.id);
        assert_eq!(a.contact_count(), 2);
        assert_eq!(a.find(Some("A@x.co"), None).unwrap().id, upper.id);
        assert_eq!(a.find(Some("a@x.co"), None).unwrap().id, lower.id);
        assert!(a.find(Some("A@X.CO"), None).is_none());
        // An update by exact email touches that contact only.
        let out = upsert(&mut a, json!({"email": "A@x.co", "planName": "upper2"})).unwrap();
        assert_eq!(out.id, upper.id);
        assert_eq!(
            a.find(Some("a@x.co"), None).unwrap().props["planName"],
            "lower"
        );
        // Create conflicts on the exact email only.
        assert_eq!(
            a.resolve(Some("a@x.co"), None, Mode::Create)
                .unwrap_err()
                .status,
            409
        );
        assert_eq!(a.resolve(Some("a@X.co"), None, Mode::Create), Ok(None));
        // Delete by exact email.
        assert_eq!(a.delete(Some("A@X.CO"), None).unwrap_err().status, 404);
        a.delete(Some("A@x.co"), None).unwrap();
        assert!(a.find(Some("A@x.co"), None).is_none());
        assert_eq!(a.find(Some("a@x.co"), None).unwrap().id, lower.id);
    }

    #[test]
    fn case_insensitive_emails_are_one_contact() {
        let mut a = audience();
        let upper = upsert(&mut a, json!({"email": "A@x.co"})).unwrap();
        let lower = upsert(&mut a, json!({"email": "a@x.co"})).unwrap();
        assert_eq!(upper.id, lower.id);
        assert_eq!(
            lower.changed,
            ["email"],
            "stored as sent, so a new spelling is a change"
        );
        assert_eq!(a.contact_count(), 1);
        assert_eq!(a.find(Some("A@X.CO"), None).unwrap().email, "a@x.co");
        a.delete(Some("A@X.CO"), None).unwrap();
        assert_eq!(a.contact_count(), 0);
    }

    #[test]
    fn switching_email_match_rekeys_or_refuses_when_contacts_would_merge() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "A@x.co"})).unwrap();
        a.set_email_match(EmailMatch::CaseSensitive).unwrap();
        assert!(a.find(Some("a@x.co"), None).is_none());
        assert!(a.find(Some("A@x.co"), None).is_some());
        upsert(&mut a, json!({"email": "a@x.co"})).unwrap();
        let e = a.set_email_match(EmailMatch::CaseInsensitive).unwrap_err();
        assert_eq!(
            e,
            SettingsError::EmailsCollide {
                first: "A@x.co".into(),
                second: "a@x.co".into()
            }
        );
        // Refused: nothing changed, matching is still exact.
        assert!(a.find(Some("A@X.CO"), None).is_none());
        assert_eq!(a.find(Some("a@x.co"), None).unwrap().email, "a@x.co");
        a.delete(Some("a@x.co"), None).unwrap();
        a.set_email_match(EmailMatch::CaseInsensitive).unwrap();
        assert_eq!(a.find(Some("A@X.CO"), None).unwrap().email, "A@x.co");
    }

    #[test]
    fn types_are_enforced_and_null_clears() {
        assert!(
            coerce(
                "seats",
                PropertyType::Number,
                &json!("3"),
                NumericDates::Auto
            )
            .is_err()
        );
        assert!(
            coerce(
                "trial",
                PropertyType::Boolean,
                &json!("true"),
                NumericDates::Auto
            )
            .is_err()
        );
        assert!(
            coerce(
                "planName",
                PropertyType::String,
                &json!(3),
                NumericDates::Auto
            )
            .is_err()
        );
        assert_eq!(
            coerce("seats", PropertyType::Number, &json!(3), NumericDates::Auto).unwrap(),
            json!(3)
        );
        assert_eq!(
            coerce(
                "seats",
                PropertyType::Number,
                &Value::Null,
                NumericDates::Auto
            )
            .unwrap(),
            Value::Null
        );
        let long = "x".repeat(501);
        let e = coerce(
            "planName",
            PropertyType::String,
            &json!(long),
            NumericDates::Auto,
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("planName"), "{}", e.message);
        assert!(
            coerce(
                "planName",
                PropertyType::String,
                &json!("é".repeat(500)),
                NumericDates::Auto
            )
            .is_ok()
        );
    }

    #[test]
    fn update_with_unknown_email_creates_with_defaults() {
        let mut a = audience();
        let out = upsert(&mut a, json!({"email": "new@x.co", "planName": "pro"})).unwrap();
        assert!(out.created);
        let c = a.find(Some("NEW@x.co"), None).unwrap();
        let j = a.to_json(c);
        assert_eq!(j["source"], "API");
        assert_eq!(j["subscribed"], true);
        assert_eq!(j["userGroup"], "");
        assert_eq!(j["firstName"], Value::Null);
        assert_eq!(j["planName"], "pro");
        assert_eq!(j["seats"], Value::Null);
        assert_eq!(j["mailingLists"], json!({}));
    }

    #[test]
    fn user_id_only_update_of_unknown_user_is_400_and_creates_nothing() {
        let mut a = audience();
        let e = upsert(&mut a, json!({"userId": "u1", "planName": "pro"})).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(a.contact_count(), 0);
    }

    #[test]
    fn email_of_one_contact_and_user_id_of_another_is_400() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co", "userId": "ua"})).unwrap();
        upsert(&mut a, json!({"email": "b@x.co", "userId": "ub"})).unwrap();
        let e = upsert(&mut a, json!({"email": "a@x.co", "userId": "ub"})).unwrap_err();
        assert_eq!(e.message, "Multiple contacts found for the given criteria");
        assert_eq!(e.status, 400);
    }

    #[test]
    fn email_changes_through_a_known_user_id() {
        let mut a = audience();
        let first = upsert(&mut a, json!({"email": "old@x.co", "userId": "u1"})).unwrap();
        let second = upsert(&mut a, json!({"email": "new@x.co", "userId": "u1"})).unwrap();
        assert_eq!(first.id, second.id);
        assert!(!second.created);
        assert_eq!(second.changed, vec!["email"]);
        assert!(a.find(Some("old@x.co"), None).is_none());
        assert_eq!(a.find(Some("new@x.co"), None).unwrap().id, first.id);
        assert_eq!(a.contact_count(), 1);
    }

    #[test]
    fn one_matching_identifier_writes_the_other() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co"})).unwrap();
        let out = upsert(&mut a, json!({"email": "a@x.co", "userId": "u9"})).unwrap();
        assert_eq!(out.changed, vec!["userId"]);
        assert_eq!(a.find(None, Some("u9")).unwrap().email, "a@x.co");
    }

    #[test]
    fn create_conflicts_on_email_any_case_and_on_user_id() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co", "userId": "u1"})).unwrap();
        let e = a.resolve(Some("A@X.CO"), None, Mode::Create).unwrap_err();
        assert_eq!(e.status, 409);
        let e = a
            .resolve(Some("b@x.co"), Some("u1"), Mode::Create)
            .unwrap_err();
        assert_eq!(e.status, 409);
        assert_eq!(a.resolve(Some("b@x.co"), None, Mode::Create), Ok(None));
    }

    #[test]
    fn null_identifiers_are_absent_and_null_clears_properties() {
        let mut a = audience();
        upsert(
            &mut a,
            json!({"email": "a@x.co", "userId": null, "firstName": "Ann", "mailingLists": []}),
        )
        .unwrap();
        let out = upsert(
            &mut a,
            json!({"email": "a@x.co", "userId": null, "firstName": null}),
        )
        .unwrap();
        assert_eq!(out.changed, vec!["firstName"]);
        let j = a.to_json(a.find(Some("a@x.co"), None).unwrap());
        assert_eq!(j["firstName"], Value::Null);
        assert_eq!(j["userId"], Value::Null);
    }

    #[test]
    fn identical_update_changes_nothing() {
        let mut a = audience();
        upsert(
            &mut a,
            json!({"email": "a@x.co", "seats": 3, "signedUpAt": 1704713466}),
        )
        .unwrap();
        // The same date in another form is the same value.
        let out = upsert(
            &mut a,
            json!({"email": "a@x.co", "seats": 3, "signedUpAt": "2024-01-08T11:31:06Z"}),
        )
        .unwrap();
        assert!(out.changed.is_empty(), "{:?}", out.changed);
    }

    #[test]
    fn lists_add_remove_and_unknown() {
        let mut a = audience();
        let out = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": true}}),
        )
        .unwrap();
        assert_eq!(out.added_to_lists, vec!["news"]);
        let again = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": true}}),
        )
        .unwrap();
        assert!(again.added_to_lists.is_empty());
        upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": false}}),
        )
        .unwrap();
        let back = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": true}}),
        )
        .unwrap();
        assert_eq!(back.added_to_lists, vec!["news"], "a re-add fires again");
        let e = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"nope": true}}),
        )
        .unwrap_err();
        assert!(e.message.contains("nope"));
        let e = upsert(
            &mut a,
            json!({"email": "a@x.co", "mailingLists": {"news": "yes"}}),
        )
        .unwrap_err();
        assert_eq!(e.status, 400);
        let e = upsert(&mut a, json!({"email": "a@x.co", "mailingLists": ["news"]})).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn reserved_unknown_and_unsettable_names_are_400() {
        let mut a = audience();
        for (key, needle) in [
            ("teamId", "reserved"),
            ("notes", "notes"),
            ("favouriteColour", "does not exist"),
        ] {
            let e = upsert(&mut a, json!({"email": "a@x.co", key: "x"})).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{key}: {}", e.message);
        }
        let e = upsert(&mut a, json!({"email": "a@x.co", "subscribed": "true"})).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn unknown_properties_can_be_created_as_strings() {
        let mut a = audience();
        let settings = Settings {
            unknown_properties: UnknownProperties::Create,
            ..Default::default()
        };
        let write = a
            .parse_write(
                &body(json!({"email": "a@x.co", "colour": "red"})),
                &settings,
            )
            .unwrap();
        a.apply(None, write, "c1".into());
        assert!(
            a.properties()
                .iter()
                .any(|(k, _, t, custom)| k == "colour" && *t == PropertyType::String && *custom)
        );
    }

    #[test]
    fn property_creation_rules() {
        let mut a = audience();
        assert!(
            a.create_property("companyName", PropertyType::String)
                .is_ok()
        );
        for bad in [
            "companyName",
            "firstName",
            "teamId",
            "Company",
            "company_name",
            "2x",
        ] {
            assert_eq!(
                a.create_property(bad, PropertyType::String)
                    .unwrap_err()
                    .status,
                400,
                "{bad}"
            );
        }
        assert_eq!(label_for("companyName"), "Company Name");
    }

    #[test]
    fn delete_by_one_identifier() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co", "userId": "u1"})).unwrap();
        assert_eq!(
            a.delete(Some("a@x.co"), Some("u1")).unwrap_err().status,
            400
        );
        assert_eq!(a.delete(None, None).unwrap_err().status, 400);
        assert_eq!(a.delete(None, Some("nobody")).unwrap_err().status, 404);
        assert!(a.delete(None, Some("u1")).is_ok());
        assert!(a.find(Some("a@x.co"), None).is_none());
        assert!(a.find(None, Some("u1")).is_none());
    }

    #[test]
    fn resubscribe_is_a_change() {
        let mut a = audience();
        upsert(&mut a, json!({"email": "a@x.co", "subscribed": false})).unwrap();
        let out = upsert(&mut a, json!({"email": "a@x.co", "subscribed": true})).unwrap();
        assert_eq!(out.changed, vec!["subscribed"]);
    }
}
