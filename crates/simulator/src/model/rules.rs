//! What Loops accepts (`loops-api.md`): identifiers and emails, string lengths, property types
//! and dates, property names, and the answer a refusal gets. Plain functions, no state.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::{EmailMatch, NumericDates};

/// "most v1 … request body string values are limited to 500 characters" (`loops-api.md` §2.5).
pub const MAX_STRING_CHARS: usize = 500;

/// Names no custom property may take (`loops-api.md` §2.4).
pub const RESERVED_NAMES: &[&str] = &["id", "listId", "softDeleteAt", "teamId", "updatedAt"];

/// Keys of a request body that are not contact properties.
pub(super) const REQUEST_KEYS: &[&str] = &[
    "email",
    "userId",
    "mailingLists",
    "eventName",
    "eventProperties",
];

/// The default (system) properties: key, label, type.
pub(super) const DEFAULT_PROPERTIES: &[(&str, &str, PropertyType)] = &[
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

pub(super) fn check_length(field: &str, text: &str) -> Result<(), ApiError> {
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
