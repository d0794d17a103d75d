//! Which property a header names, and the header written for a property.
//!
//! Loops' "CSV Upload" page recommends `Email`, `First Name`, `Last Name`, `User Group`,
//! `Source`, `User ID` and `Subscribed`, and takes custom properties as columns without saying
//! how their headers are spelled. Read: a header names the property whose API name or display
//! name it is, in any case and spacing (`First Name`, `firstName`, `first_name`, `FIRSTNAME`).
//! Written: the display names above for default properties, the API name for custom ones.

use crate::CsvError;

/// The header of the column of mailing lists (list ids, `;` between them) in an export.
pub const LISTS_HEADER: &str = "Mailing Lists";

/// Default properties' display names, by API name.
const DISPLAY_NAMES: &[(&str, &str)] = &[
    ("email", "Email"),
    ("firstName", "First Name"),
    ("lastName", "Last Name"),
    ("userGroup", "User Group"),
    ("source", "Source"),
    ("userId", "User ID"),
    ("subscribed", "Subscribed"),
    ("createdAt", "Created At"),
];

/// What a column holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// A property, by its API name.
    Property(String),
    /// The mailing lists the contact is on.
    Lists,
    /// A column no known property has (read leniently: left out).
    Ignored,
}

/// A header as compared: its letters and digits, lower-cased (`User ID`, `userId` and
/// `user_id` are one).
pub fn normalized(header: &str) -> String {
    header
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// The header written for a property: its display name if it is a default one, else its API
/// name (the display name Loops gives a custom property is not documented).
pub fn header_for(name: &str) -> String {
    DISPLAY_NAMES
        .iter()
        .find(|(api, _)| *api == name)
        .map_or(name, |(_, display)| display)
        .to_owned()
}

/// The column of each header, among the `known` API names. A header that names none of them
/// is an error when `strict` (an upload: a column would be dropped unseen), else
/// [`Column::Ignored`] (an export: properties the sync does not map). A file without an
/// `Email` or `User ID` column is refused: no row could name its contact.
pub fn resolve(
    headers: &csv::StringRecord,
    known: &[&str],
    strict: bool,
) -> Result<Vec<Column>, CsvError> {
    let lists = normalized(LISTS_HEADER);
    let mut columns = Vec::with_capacity(headers.len());
    for (position, header) in headers.iter().enumerate() {
        // A byte-order mark before the first header (spreadsheets write one).
        let key = normalized(header.trim_start_matches('\u{feff}'));
        let column = if key == lists || key == "mailinglists" {
            Column::Lists
        } else if let Some(name) = known.iter().find(|k| normalized(k) == key) {
            Column::Property((*name).to_owned())
        } else if strict {
            return Err(CsvError::UnknownColumn {
                position: position + 1,
                header: header.to_owned(),
            });
        } else {
            Column::Ignored
        };
        columns.push(column);
    }
    let names = |n: &str| columns.contains(&Column::Property(n.into()));
    if !names("email") && !names("userId") {
        return Err(CsvError::NoIdentifier);
    }
    Ok(columns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[&str]) -> csv::StringRecord {
        csv::StringRecord::from(headers.to_vec())
    }

    /// API names and display names, any case and spacing, name one property.
    #[test]
    fn headers_in_any_spelling() {
        let known = ["email", "userId", "firstName", "planName"];
        let columns = resolve(
            &record(&[
                "\u{feff}EMAIL",
                "User ID",
                "first_name",
                "Plan Name",
                "Mailing Lists",
                "Notes",
            ]),
            &known,
            false,
        )
        .unwrap();
        assert_eq!(
            columns,
            [
                Column::Property("email".into()),
                Column::Property("userId".into()),
                Column::Property("firstName".into()),
                Column::Property("planName".into()),
                Column::Lists,
                Column::Ignored,
            ]
        );
        let strict = resolve(&record(&["Email", "Notes"]), &known, true).unwrap_err();
        assert_eq!(strict.to_string(), "column 2 (\"Notes\") names no property");
        assert!(matches!(
            resolve(&record(&["First Name"]), &known, false),
            Err(CsvError::NoIdentifier)
        ));
    }

    #[test]
    fn headers_written() {
        assert_eq!(header_for("userId"), "User ID");
        assert_eq!(header_for("firstName"), "First Name");
        assert_eq!(header_for("planName"), "planName");
    }
}
