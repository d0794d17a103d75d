//! Loops' CSV files, as one set of rules: the file its uploader reads (Audience → Import →
//! Upload CSV) and the file its audience export writes (`docs/loops-api.md`, *CSV upload and
//! audience export*). The simulator's `/_sim/import` and `/_sim/export` and the commands of the
//! bulk lane (`export`, `adopt --from-loops-export`, `verify --from-loops-export`) all read and
//! write through this crate, so the two sides cannot disagree on a header or a cell.
//!
//! * [`columns`]: which property a header names (API name or display name, any case and
//!   spacing), and the header written for a property.
//! * [`cell`]: what a cell means (`null` clears, empty never overwrites, booleans, dates as
//!   ISO-8601 or Unix milliseconds) and how a value is written.
//!
//! Deliberately not the pipeline's `PropertyKind`: the simulator stands in for Loops and must
//! not follow the pipeline's types; each side maps its own type to [`CellType`].

pub mod cell;
pub mod columns;

use std::io::{Read, Write};

use loopsync_core::{Classified, ErrorClass};
use serde_json::{Map, Value};

pub use cell::{Cell, CellType, Unwritable, read_cell, write_cell};
pub use columns::{Column, LISTS_HEADER, header_for, normalized, resolve};
/// The CSV crate these files are read and written with.
pub use csv;

/// What can go wrong reading or writing a file.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    /// The file is not CSV (a quote left open, a row of another width, not UTF-8) or could
    /// not be read or written.
    #[error("{0}")]
    Csv(#[from] csv::Error),
    /// The header row names a column no property has.
    #[error("column {position} ({header:?}) names no property")]
    UnknownColumn { position: usize, header: String },
    /// The file has no `Email` nor `User ID` column: no row could name its contact.
    #[error("the file has neither an Email nor a User ID column")]
    NoIdentifier,
}

impl Classified for CsvError {
    fn class(&self) -> ErrorClass {
        // The file is what it is: reading it again gives the same answer.
        ErrorClass::Permanent
    }
}

/// A reader over a file of Loops' CSV (a header row, then one contact per row).
pub fn reader<R: Read>(input: R) -> csv::Reader<R> {
    csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(input)
}

/// A writer of Loops' CSV (every field quoted only when it must be).
pub fn writer<W: Write>(output: W) -> csv::Writer<W> {
    csv::WriterBuilder::new().from_writer(output)
}

/// One row, read: the cells that say something (an empty cell is left out: it never
/// overwrites), `null` as JSON null, and the mailing lists of the lists column.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    /// API name → value (typed by [`read_cell`]; `Value::Null` for `null`).
    pub values: Map<String, Value>,
    /// The list ids of the `Mailing Lists` column, if it has one.
    pub lists: Vec<String>,
}

impl Row {
    /// The row as `GET /v1/contacts/find` shows a contact: its values and `mailingLists` as
    /// `{id: true}` (the export holds the lists a contact is on).
    pub fn into_contact(self) -> Map<String, Value> {
        let mut contact = self.values;
        let lists = self
            .lists
            .into_iter()
            .map(|id| (id, Value::Bool(true)))
            .collect();
        contact.insert("mailingLists".into(), Value::Object(lists));
        contact
    }
}

/// Reads one record under `columns` (from [`resolve`]), each property's cell typed by
/// `type_of`. `Err` names the column and what is wrong, never the value (a person's data).
pub fn read_row(
    columns: &[Column],
    record: &csv::StringRecord,
    type_of: &dyn Fn(&str) -> CellType,
) -> Result<Row, String> {
    let mut row = Row::default();
    for (column, text) in columns.iter().zip(record.iter()) {
        match column {
            Column::Ignored => {}
            Column::Lists => row.lists = cell::read_lists(text),
            Column::Property(name) => match read_cell(type_of(name), text) {
                Ok(Cell::Empty) => {}
                Ok(Cell::Null) => {
                    row.values.insert(name.clone(), Value::Null);
                }
                Ok(Cell::Value(v)) => {
                    row.values.insert(name.clone(), v);
                }
                Err(why) => return Err(format!("column {}: {why}", header_for(name))),
            },
        }
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn type_of(name: &str) -> CellType {
        match name {
            "subscribed" | "trial" => CellType::Boolean,
            "seats" => CellType::Number,
            "signedUpAt" => CellType::Date,
            _ => CellType::Text,
        }
    }

    /// A file written here reads back as the same contact; `null` and an empty cell stay
    /// apart; quotes, commas and newlines in a value survive.
    #[test]
    fn a_file_reads_back_what_was_written() {
        let known = ["email", "firstName", "trial", "seats", "signedUpAt"];
        let mut out = writer(Vec::new());
        out.write_record(
            known
                .iter()
                .map(|n| header_for(n))
                .chain([LISTS_HEADER.to_owned()]),
        )
        .unwrap();
        out.write_record([
            "a@x.co",
            "Ann, \"the\"\nfirst",
            "true",
            "null",
            "2024-01-08T11:31:06.000Z",
            "news;beta",
        ])
        .unwrap();
        out.write_record(["b@x.co", "", "FALSE", "12.0", "1704713466000", ""])
            .unwrap();
        let bytes = out.into_inner().unwrap();
        let mut input = reader(&bytes[..]);
        let columns = resolve(input.headers().unwrap(), &known, false).unwrap();
        let rows: Vec<Row> = input
            .records()
            .map(|r| read_row(&columns, &r.unwrap(), &type_of).unwrap())
            .collect();
        assert_eq!(
            Value::Object(rows[0].clone().into_contact()),
            json!({"email": "a@x.co", "firstName": "Ann, \"the\"\nfirst", "trial": true,
                   "seats": null, "signedUpAt": "2024-01-08T11:31:06.000Z",
                   "mailingLists": {"news": true, "beta": true}})
        );
        assert_eq!(
            Value::Object(rows[1].values.clone()),
            json!({"email": "b@x.co", "trial": false, "seats": 12,
                   "signedUpAt": "2024-01-08T11:31:06.000Z"}),
            "the empty firstName is left out; Unix milliseconds read as the same instant"
        );
    }

    /// A refused cell names its column, never its value.
    #[test]
    fn a_bad_cell_names_its_column_not_its_value() {
        let mut input = reader(&b"Email,Seats\na@x.co,many\n"[..]);
        let columns = resolve(input.headers().unwrap(), &["email", "seats"], false).unwrap();
        let record = input.records().next().unwrap().unwrap();
        let why = read_row(&columns, &record, &type_of).unwrap_err();
        assert_eq!(why, "column seats: not a number");
    }
}
