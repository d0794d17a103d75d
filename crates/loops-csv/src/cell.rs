//! What one cell of Loops' CSV means, and how a value is written into one.
//!
//! Reading (Loops' "CSV Upload" page, and our decisions where it is silent):
//! * an empty cell (or one of blanks) never overwrites: [`Cell::Empty`];
//! * `null`, four lower-case letters, clears the value: [`Cell::Null`];
//! * booleans: `true`/`false` in any case (also `yes`/`no`, `1`/`0`);
//! * numbers: decimal text, `12.0` and `12` being one number;
//! * dates: ISO-8601 (with or without an offset, UTC without; a plain date is midnight UTC) or
//!   Unix milliseconds (always milliseconds in a cell: a file has no JSON type to tell seconds
//!   apart), read as the ISO-8601 text Loops shows (`2024-01-08T11:31:06.000Z`).
//!
//! Writing: `null` for a cleared value, dates as ISO-8601. A value no cell can carry (an empty
//! or blank text, which would read as "leave alone", or the text `null`, which would clear) is
//! refused: [`Unwritable`].

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde_json::Value;

/// The text of a cell that clears a value.
pub const NULL: &str = "null";

/// The separator of list ids in the `Mailing Lists` column (and `,` read too).
pub const LIST_SEPARATOR: char = ';';

/// How a column's cells are typed: the four types of Loops' properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellType {
    Text,
    Number,
    Boolean,
    Date,
}

/// What a cell says.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Nothing: the value is left as it is.
    Empty,
    /// `null`: the value is cleared.
    Null,
    /// A value, typed (a date as ISO-8601 text).
    Value(Value),
}

/// Reads one cell of a column of type `kind`. `Err` says what the text is not (never the text:
/// it is a person's data).
pub fn read_cell(kind: CellType, text: &str) -> Result<Cell, &'static str> {
    if text.trim().is_empty() {
        return Ok(Cell::Empty);
    }
    if text == NULL {
        return Ok(Cell::Null);
    }
    let t = text.trim();
    let value = match kind {
        CellType::Text => Value::String(text.to_owned()),
        CellType::Boolean => match t.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Value::Bool(true),
            "false" | "no" | "0" => Value::Bool(false),
            _ => return Err("not a boolean"),
        },
        CellType::Number => number(t).ok_or("not a number")?,
        CellType::Date => Value::String(iso(date_millis(t).ok_or("not a date")?)),
    };
    Ok(Cell::Value(value))
}

/// A number as JSON: integral values as integers.
fn number(text: &str) -> Option<Value> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::from(i));
    }
    let f = text.parse::<f64>().ok().filter(|f| f.is_finite())?;
    Some(if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Value::from(f)
    })
}

/// A date cell as Unix milliseconds: digits are milliseconds, else ISO-8601.
fn date_millis(text: &str) -> Option<i64> {
    if let Ok(millis) = text.parse::<i64>() {
        return Some(millis);
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.timestamp_millis());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z"] {
        if let Ok(at) = DateTime::parse_from_str(text, format) {
            return Some(at.timestamp_millis());
        }
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(at) = NaiveDateTime::parse_from_str(text, format) {
            return Some(at.and_utc().timestamp_millis());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc().timestamp_millis())
}

/// Unix milliseconds as Loops shows a date: `2024-01-08T11:31:06.000Z`.
fn iso(millis: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(millis)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_else(|| millis.to_string())
}

/// A value no cell can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unwritable {
    /// An empty or blank text: a cell would read as "leave the value alone".
    #[error("an empty text (an empty cell never overwrites)")]
    Blank,
    /// The text `null`: a cell would clear the value.
    #[error("the text `null` (a cell of it clears the value)")]
    NullText,
    /// Not a value a property holds (an array, an object, a date that is no number).
    #[error("not a {0} value")]
    Shape(&'static str),
}

/// The cell of `value` in a column of type `kind` (a date as the sync sends it, Unix
/// milliseconds, written as ISO-8601; JSON null as `null`).
pub fn write_cell(kind: CellType, value: &Value) -> Result<String, Unwritable> {
    match (kind, value) {
        (_, Value::Null) => Ok(NULL.to_owned()),
        (CellType::Date, Value::Number(n)) => n.as_i64().map(iso).ok_or(Unwritable::Shape("date")),
        (CellType::Date, Value::String(s)) => date_millis(s.trim())
            .map(iso)
            .ok_or(Unwritable::Shape("date")),
        (CellType::Date, _) => Err(Unwritable::Shape("date")),
        (_, Value::String(s)) if s.trim().is_empty() => Err(Unwritable::Blank),
        (_, Value::String(s)) if s == NULL => Err(Unwritable::NullText),
        (_, Value::String(s)) => Ok(s.clone()),
        (_, Value::Bool(b)) => Ok(b.to_string()),
        (_, Value::Number(n)) => Ok(n.to_string()),
        (_, Value::Array(_) | Value::Object(_)) => Err(Unwritable::Shape("property")),
    }
}

/// The list ids of a `Mailing Lists` cell (`;` or `,` between them, blanks ignored).
pub fn read_lists(text: &str) -> Vec<String> {
    text.split([LIST_SEPARATOR, ','])
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The `Mailing Lists` cell of these list ids.
pub fn write_lists<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    ids.into_iter()
        .collect::<Vec<_>>()
        .join(&LIST_SEPARATOR.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn value(kind: CellType, text: &str) -> Value {
        match read_cell(kind, text).unwrap() {
            Cell::Value(v) => v,
            other => panic!("{text:?} read as {other:?}"),
        }
    }

    /// `null` clears, only in lower case; empty and blank cells never overwrite.
    #[test]
    fn null_clears_and_empty_leaves_alone() {
        for kind in [CellType::Text, CellType::Number, CellType::Date] {
            assert_eq!(read_cell(kind, "null"), Ok(Cell::Null));
            assert_eq!(read_cell(kind, ""), Ok(Cell::Empty));
            assert_eq!(read_cell(kind, "  "), Ok(Cell::Empty));
        }
        assert_eq!(value(CellType::Text, "NULL"), json!("NULL"));
        assert_eq!(value(CellType::Text, "Null"), json!("Null"));
    }

    #[test]
    fn booleans_in_any_case() {
        for t in ["true", "TRUE", "True", " yes ", "1"] {
            assert_eq!(value(CellType::Boolean, t), json!(true), "{t}");
        }
        for t in ["false", "FALSE", "no", "0"] {
            assert_eq!(value(CellType::Boolean, t), json!(false), "{t}");
        }
        assert_eq!(read_cell(CellType::Boolean, "maybe"), Err("not a boolean"));
    }

    /// ISO-8601 in its usual spellings and Unix milliseconds are one instant; digits are
    /// always milliseconds (86400000 is the second day of 1970, not a year in 1972).
    #[test]
    fn dates_as_iso_8601_or_unix_milliseconds() {
        let expect = json!("2024-01-08T11:31:06.000Z");
        for t in [
            "2024-01-08T11:31:06Z",
            "2024-01-08T11:31:06.000Z",
            "2024-01-08T12:31:06+01:00",
            "2024-01-08 11:31:06",
            "2024-01-08T11:31:06",
            "1704713466000",
        ] {
            assert_eq!(value(CellType::Date, t), expect, "{t}");
        }
        assert_eq!(
            value(CellType::Date, "86400000"),
            json!("1970-01-02T00:00:00.000Z")
        );
        assert_eq!(
            value(CellType::Date, "2024-01-08"),
            json!("2024-01-08T00:00:00.000Z")
        );
        assert_eq!(read_cell(CellType::Date, "yesterday"), Err("not a date"));
    }

    #[test]
    fn numbers() {
        assert_eq!(value(CellType::Number, "12.0"), json!(12));
        assert_eq!(value(CellType::Number, "1.5"), json!(1.5));
        assert_eq!(read_cell(CellType::Number, "many"), Err("not a number"));
    }

    /// What is written reads back as the same value; values no cell can carry are refused.
    #[test]
    fn writing_cells() {
        for (kind, v) in [
            (CellType::Text, json!("Ann")),
            (CellType::Number, json!(12)),
            (CellType::Number, json!(1.5)),
            (CellType::Boolean, json!(false)),
        ] {
            let text = write_cell(kind, &v).unwrap();
            assert_eq!(read_cell(kind, &text), Ok(Cell::Value(v)));
        }
        assert_eq!(
            write_cell(CellType::Date, &json!(1704713466000i64)).unwrap(),
            "2024-01-08T11:31:06.000Z"
        );
        assert_eq!(write_cell(CellType::Text, &Value::Null).unwrap(), "null");
        assert_eq!(
            write_cell(CellType::Text, &json!("")),
            Err(Unwritable::Blank)
        );
        assert_eq!(
            write_cell(CellType::Text, &json!("null")),
            Err(Unwritable::NullText)
        );
    }

    #[test]
    fn lists() {
        assert_eq!(read_lists(" news ; beta,,"), ["news", "beta"]);
        assert_eq!(write_lists(["news", "beta"]), "news;beta");
        assert!(read_lists("").is_empty());
    }
}
