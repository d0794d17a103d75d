//! From warehouse text to Loops values. The extractor reads every mapped column as text (SQL
//! NULL as `None`), so one set of rules serves every warehouse; the transformer coerces the text
//! to the property's declared type, and the fingerprint is taken over the coerced value, so
//! `1.0` and `1` or two spellings of one instant are the same record version.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// "most v1 … request body string values are limited to 500 characters" (`loops-api.md` §2.5).
pub const MAX_CHARS: usize = 500;

/// The four property types of Loops: the one type for a property's kind in the pipeline, from
/// the config's `type = "date"` to the Loops client's `create_property` and the answers of
/// `GET /v1/contacts/properties` (serde writes and reads the same lowercase names Loops uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PropertyKind {
    String,
    Number,
    Boolean,
    Date,
}

impl PropertyKind {
    /// The name Loops and the config use: `string`, `number`, `boolean`, `date`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PropertyKind::String => "string",
            PropertyKind::Number => "number",
            PropertyKind::Boolean => "boolean",
            PropertyKind::Date => "date",
        }
    }
}

impl std::fmt::Display for PropertyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// Reads the names of [`PropertyKind::as_str`] (e.g. a property type typed on a command line).
impl std::str::FromStr for PropertyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "string" => Ok(PropertyKind::String),
            "number" => Ok(PropertyKind::Number),
            "boolean" => Ok(PropertyKind::Boolean),
            "date" => Ok(PropertyKind::Date),
            other => Err(format!(
                "unknown property type `{other}` (expected string, number, boolean or date)"
            )),
        }
    }
}

/// The characters trimmed from both ends of an email: Unicode's White_Space (tabs, newlines,
/// no-break spaces, …). The warehouse's SQL trims exactly these too (see
/// `loopsync_warehouse`'s email key), so the duplicate check and the product agree.
pub const EMAIL_TRIM: &[char] = &[
    '\u{9}', '\u{a}', '\u{b}', '\u{c}', '\u{d}', ' ', '\u{85}', '\u{a0}', '\u{1680}', '\u{2000}',
    '\u{2001}', '\u{2002}', '\u{2003}', '\u{2004}', '\u{2005}', '\u{2006}', '\u{2007}', '\u{2008}',
    '\u{2009}', '\u{200a}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}',
];

/// The one email rule (`loops-api.md` §9), wherever emails are compared or sent: trimmed of
/// [`EMAIL_TRIM`], and ASCII letters lower-cased. Only ASCII is folded because that is what every
/// warehouse's SQL folds alike (PostgreSQL's `lower` under the "C" collation, SQLite's `lower`),
/// and the duplicate check runs there; a non-ASCII letter is kept as written.
pub fn normalize_email(email: &str) -> String {
    email.trim_matches(EMAIL_TRIM).to_ascii_lowercase()
}

/// One `@`, something before it, a dotted domain, no blanks.
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

/// A date as Unix milliseconds, from the forms warehouses print: RFC 3339, PostgreSQL's
/// `2024-01-08 11:31:06.123+00`, MySQL's `2024-01-08 11:31:06`, a plain date, or Unix seconds or
/// milliseconds (below 10^11, seconds). Without an offset the time is UTC.
pub fn parse_date_millis(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(n) = text.parse::<i64>() {
        return Some(if n.abs() < 100_000_000_000 {
            n * 1000
        } else {
            n
        });
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(text) {
        return Some(dt.timestamp_millis());
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M%#z",
    ] {
        if let Ok(dt) = DateTime::parse_from_str(text, format) {
            return Some(dt.timestamp_millis());
        }
    }
    for format in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
            return Some(naive.and_utc().timestamp_millis());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc().timestamp_millis())
}

/// Formats Unix milliseconds for humans (reports).
pub fn millis_to_rfc3339(millis: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(millis)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| millis.to_string())
}

/// Coerces warehouse text to a Loops value of `kind`. `Err` says why it cannot be, in words
/// fit for a rejection list, and never the value: a record's reason is kept and shown, and the
/// value is a person's data (`not a number`; the caller says which property and column).
pub fn coerce(kind: PropertyKind, text: &str) -> Result<Value, String> {
    match kind {
        PropertyKind::String => Ok(Value::String(text.to_owned())),
        PropertyKind::Number => {
            let t = text.trim();
            if let Ok(i) = t.parse::<i64>() {
                return Ok(Value::from(i));
            }
            match t.parse::<f64>() {
                Ok(f) if f.is_finite() => {
                    // 12.0 and 12 are one number.
                    if f.fract() == 0.0 && f.abs() < 9.0e15 {
                        Ok(Value::from(f as i64))
                    } else {
                        Ok(Value::from(f))
                    }
                }
                _ => Err("not a number".to_owned()),
            }
        }
        PropertyKind::Boolean => match text.trim().to_ascii_lowercase().as_str() {
            "t" | "true" | "1" | "yes" | "y" | "on" => Ok(Value::Bool(true)),
            "f" | "false" | "0" | "no" | "n" | "off" => Ok(Value::Bool(false)),
            _ => Err("not a boolean".to_owned()),
        },
        PropertyKind::Date => parse_date_millis(text)
            .map(Value::from)
            .ok_or_else(|| "not a date".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn property_kinds_read_what_they_write() {
        for kind in [
            PropertyKind::String,
            PropertyKind::Number,
            PropertyKind::Boolean,
            PropertyKind::Date,
        ] {
            assert_eq!(kind.as_str().parse::<PropertyKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.as_str());
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(kind.as_str()));
        }
        assert!("datetime".parse::<PropertyKind>().is_err());
    }

    /// Why a value cannot be coerced says what it is not, never the value: it is a person's.
    #[test]
    fn a_refusal_does_not_quote_the_value() {
        for (kind, text, why) in [
            (PropertyKind::Number, "ann@example.com", "not a number"),
            (PropertyKind::Boolean, "Ann Smith", "not a boolean"),
            (PropertyKind::Date, "born in Paris", "not a date"),
        ] {
            assert_eq!(coerce(kind, text).unwrap_err(), why);
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(coerce(PropertyKind::Number, "12").unwrap(), json!(12));
        assert_eq!(coerce(PropertyKind::Number, "12.00").unwrap(), json!(12));
        assert_eq!(coerce(PropertyKind::Number, " 12.5 ").unwrap(), json!(12.5));
        assert_eq!(coerce(PropertyKind::Number, "-3e2").unwrap(), json!(-300));
        assert!(coerce(PropertyKind::Number, "twelve").is_err());
        assert!(coerce(PropertyKind::Number, "NaN").is_err());
    }

    #[test]
    fn booleans_in_warehouse_spellings() {
        for t in ["t", "TRUE", "1", "yes"] {
            assert_eq!(
                coerce(PropertyKind::Boolean, t).unwrap(),
                json!(true),
                "{t}"
            );
        }
        for f in ["f", "false", "0", "No"] {
            assert_eq!(
                coerce(PropertyKind::Boolean, f).unwrap(),
                json!(false),
                "{f}"
            );
        }
        let e = coerce(PropertyKind::Boolean, "maybe").unwrap_err();
        assert_eq!(e, "not a boolean");
    }

    #[test]
    fn dates_from_every_warehouse() {
        let ms = 1_704_713_466_000i64;
        for text in [
            "2024-01-08 11:31:06+00",
            "2024-01-08 11:31:06.000+00",
            "2024-01-08 12:31:06+01:00",
            "2024-01-08T11:31:06Z",
            "2024-01-08T11:31:06.000Z",
            "2024-01-08 11:31:06",
            "2024-01-08T11:31:06",
            "1704713466",
            "1704713466000",
        ] {
            assert_eq!(
                coerce(PropertyKind::Date, text).unwrap(),
                json!(ms),
                "{text}"
            );
        }
        assert_eq!(
            parse_date_millis("2024-01-08"),
            Some(1_704_672_000_000),
            "a date is midnight UTC"
        );
        assert_eq!(
            parse_date_millis("2024-01-08 11:31:06.123456+00"),
            Some(ms + 123)
        );
        assert!(coerce(PropertyKind::Date, "soon").is_err());
        assert_eq!(millis_to_rfc3339(ms), "2024-01-08T11:31:06.000Z");
    }

    #[test]
    fn emails() {
        assert_eq!(normalize_email("  Ada@Example.COM "), "ada@example.com");
        assert!(is_valid_email("ada@example.com"));
        assert!(!is_valid_email("ada@example"));
        assert!(!is_valid_email("ada example.com"));
    }

    /// The trim set is Unicode's White_Space, exactly: what `str::trim` removes.
    #[test]
    fn the_email_trim_set_is_white_space() {
        for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
            assert_eq!(
                EMAIL_TRIM.contains(&c),
                c.is_whitespace(),
                "U+{:04X}",
                c as u32
            );
        }
        assert_eq!(
            normalize_email("\t\u{a0}Ada@Example.COM\n\u{3000}"),
            "ada@example.com"
        );
        assert_eq!(normalize_email("Élise@Example.com"), "Élise@example.com");
    }
}
