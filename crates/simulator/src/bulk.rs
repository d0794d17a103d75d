//! Loops' CSV upload and audience export (`loops-api.md` §10), as the simulator's
//! `POST /_sim/import` and `GET /_sim/export`. Headers and cells are read and written by
//! `loopsync_loops_csv`, the rules of the upload are here:
//!
//! * a row's contact is found by its `User ID` first, then by its `Email`; found, it is
//!   updated, else created; a `User ID` match whose email differs fails the row;
//! * an empty cell never overwrites, `null` clears;
//! * a new contact is subscribed unless `Subscribed` is `false`, its `Source` is "CSV Upload"
//!   unless the row says; an unsubscribed contact is never re-subscribed;
//! * the lists chosen for the file (`lists`) are added to every row's contact, and workflows
//!   fire only when `trigger_loops` is on;
//! * a row naming a contact an earlier row of the file named is a duplicate, not applied.
//!
//! Nothing here is counted in `/_sim/stats`: an upload is not an API request.

use std::collections::HashSet;

use loopsync_loops_csv::{CellType, Column, cell, header_for, read_row, resolve};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::model::{ApiError, Mode, PropertyType, email_key};
use crate::state::{SimState, new_contact_id};

/// The `Source` of a contact created by an upload.
pub const CSV_SOURCE: &str = "CSV Upload";

/// A row the import did not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedRow {
    /// The row's line in the file (the header is line 1).
    pub line: u64,
    pub reason: String,
}

/// What an upload did, as Loops shows it after an upload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub new: u64,
    pub updated: u64,
    pub duplicate: u64,
    pub failed: u64,
    pub failures: Vec<FailedRow>,
}

fn cell_type(kind: PropertyType) -> CellType {
    match kind {
        PropertyType::String => CellType::Text,
        PropertyType::Number => CellType::Number,
        PropertyType::Boolean => CellType::Boolean,
        PropertyType::Date => CellType::Date,
    }
}

impl SimState {
    /// `POST /_sim/import`: applies an uploaded file. `lists`: the lists ticked on the review
    /// page; `trigger_loops`: the file's toggle. A file that cannot be read (not CSV, a column
    /// no property has, no Email nor User ID column, an unknown list) is refused whole.
    pub fn import(
        &mut self,
        file: &[u8],
        lists: &[String],
        trigger_loops: bool,
    ) -> Result<ImportReport, ApiError> {
        if let Some(unknown) = lists
            .iter()
            .find(|id| !self.audience.lists.iter().any(|l| &l.id == *id))
        {
            return Err(ApiError::bad(format!(
                "Mailing list {unknown} does not exist."
            )));
        }
        let properties = self.audience.properties();
        let known: Vec<&str> = properties
            .iter()
            .map(|(k, ..)| k.as_str())
            .filter(|k| *k != "notes")
            .collect();
        let type_of = |name: &str| {
            properties
                .iter()
                .find(|(k, ..)| k == name)
                .map_or(CellType::Text, |(_, _, t, _)| cell_type(*t))
        };
        let mut reader = loopsync_loops_csv::reader(file);
        let headers = reader
            .headers()
            .map_err(|e| ApiError::bad(format!("The file is not CSV: {e}")))?
            .clone();
        let columns = resolve(&headers, &known, true).map_err(|e| ApiError::bad(e.to_string()))?;
        // A lists column (an export uploaded again) is not the upload's: lists are per file.
        let columns: Vec<Column> = columns
            .into_iter()
            .map(|c| {
                if c == Column::Lists {
                    Column::Ignored
                } else {
                    c
                }
            })
            .collect();
        let mut report = ImportReport::default();
        let mut seen: HashSet<String> = HashSet::new();
        for record in reader.records() {
            let record = record.map_err(|e| ApiError::bad(format!("The file is not CSV: {e}")))?;
            let line = record.position().map_or(0, |p| p.line());
            let row = match read_row(&columns, &record, &type_of) {
                Ok(row) => row,
                Err(reason) => {
                    report.fail(line, reason);
                    continue;
                }
            };
            match self.import_row(row.values, lists, trigger_loops, &mut seen) {
                Ok(Imported::New) => report.new += 1,
                Ok(Imported::Updated) => report.updated += 1,
                Ok(Imported::Duplicate) => report.duplicate += 1,
                Err(reason) => report.fail(line, reason),
            }
        }
        Ok(report)
    }

    /// One row: found by User ID then Email, checked, written.
    fn import_row(
        &mut self,
        mut values: Map<String, Value>,
        lists: &[String],
        trigger_loops: bool,
        seen: &mut HashSet<String>,
    ) -> Result<Imported, String> {
        let text = |v: Option<&Value>, what: &str| match v {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(_) => Err(format!("{what} cannot be cleared")),
        };
        let email = text(values.get("email"), "Email")?;
        let user_id = text(values.get("userId"), "User ID")?;
        let matching = self.settings.email_match;
        let names: Vec<String> = email
            .iter()
            .map(|e| format!("e:{}", email_key(e, matching)))
            .chain(user_id.iter().map(|u| format!("u:{u}")))
            .collect();
        if names.is_empty() {
            return Err("no Email nor User ID".into());
        }
        if names.iter().any(|n| seen.contains(n)) {
            return Ok(Imported::Duplicate);
        }
        seen.extend(names);
        let by_user = user_id.as_deref().and_then(|u| {
            self.audience
                .resolve(None, Some(u), Mode::Upsert)
                .ok()
                .flatten()
        });
        let target = match (by_user, &email) {
            (Some(seq), Some(e)) => {
                let contact = self.audience.get(seq).expect("resolved contact exists");
                if email_key(&contact.email, matching) != email_key(e, matching) {
                    return Err(
                        "the User ID belongs to a contact with another email: not updated".into(),
                    );
                }
                Some(seq)
            }
            (Some(seq), None) => Some(seq),
            (None, Some(e)) => self
                .audience
                .resolve(Some(e), None, Mode::Upsert)
                .map_err(|e| e.message)?,
            (None, None) => None,
        };
        match target {
            None if email.is_none() => {
                return Err("no contact has this User ID, and a new contact needs an Email".into());
            }
            None => {
                values.entry("subscribed").or_insert(Value::Bool(true));
                values
                    .entry("source")
                    .or_insert(Value::String(CSV_SOURCE.into()));
            }
            Some(seq) => {
                let contact = self.audience.get(seq).expect("resolved contact exists");
                let unsubscribed = contact.props.get("subscribed") == Some(&Value::Bool(false));
                if unsubscribed && values.get("subscribed") == Some(&Value::Bool(true)) {
                    // The importer never re-subscribes.
                    values.remove("subscribed");
                }
            }
        }
        if !lists.is_empty() {
            let on = lists
                .iter()
                .map(|id| (id.clone(), Value::Bool(true)))
                .collect();
            values.insert("mailingLists".into(), Value::Object(on));
        }
        let write = self
            .audience
            .parse_write(&values, &self.settings)
            .map_err(|e| e.message)?;
        let created = target.is_none();
        let outcome = self.audience.apply(target, write, new_contact_id());
        if trigger_loops {
            self.log_write(&outcome);
        }
        Ok(if created {
            Imported::New
        } else {
            Imported::Updated
        })
    }

    /// `GET /_sim/export`: every contact as CSV, in creation order. Columns: the default
    /// properties by display name, `Mailing Lists` (ids, `;` between them), then the custom
    /// properties by display name; an unset value is an empty cell.
    pub fn export(&self) -> Result<Vec<u8>, ApiError> {
        let properties: Vec<(String, String)> = self
            .audience
            .properties()
            .into_iter()
            .filter(|(k, ..)| k != "notes")
            .map(|(k, label, _, custom)| {
                let header = if custom { label } else { header_for(&k) };
                (k, header)
            })
            .collect();
        let broken = |e: loopsync_loops_csv::csv::Error| ApiError {
            status: 500,
            message: format!("export failed: {e}"),
        };
        let mut out = loopsync_loops_csv::writer(Vec::new());
        let header = properties
            .iter()
            .map(|(_, h)| h.clone())
            .chain([loopsync_loops_csv::LISTS_HEADER.to_owned()]);
        out.write_record(header).map_err(broken)?;
        for contact in self.audience.all() {
            let json = self.audience.to_json(contact);
            let cells = properties
                .iter()
                .map(|(k, _)| match json.get(k) {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(v) => v.to_string(),
                })
                .chain([cell::write_lists(contact.lists.iter().map(String::as_str))]);
            out.write_record(cells).map_err(broken)?;
        }
        out.into_inner().map_err(|e| ApiError {
            status: 500,
            message: format!("export failed: {e}"),
        })
    }
}

impl ImportReport {
    fn fail(&mut self, line: u64, reason: String) {
        self.failed += 1;
        self.failures.push(FailedRow { line, reason });
    }
}

/// What one row did.
enum Imported {
    New,
    Updated,
    Duplicate,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::SimConfig;
    use crate::model::MailingList;

    fn sim() -> SimState {
        let list = |id: &str| MailingList {
            id: id.into(),
            name: id.into(),
            description: None,
            is_public: true,
        };
        SimState::new(&SimConfig {
            lists: vec![list("news"), list("beta")],
            properties: vec![
                ("planName".into(), PropertyType::String),
                ("seats".into(), PropertyType::Number),
                ("signedUpAt".into(), PropertyType::Date),
            ],
            ..SimConfig::default()
        })
    }

    fn contact(sim: &SimState, email: &str) -> Value {
        let found = sim.audience.find(Some(email), None).expect("the contact");
        sim.audience.to_json(found)
    }

    fn import(sim: &mut SimState, file: &str, lists: &[&str], trigger: bool) -> ImportReport {
        let lists: Vec<String> = lists.iter().map(|l| (*l).to_owned()).collect();
        sim.import(file.as_bytes(), &lists, trigger).unwrap()
    }

    /// New contacts: subscribed, Source "CSV Upload", the file's lists, typed cells, headers
    /// in any spelling; no workflow fires with the toggle off.
    #[test]
    fn new_contacts_take_the_files_lists_and_defaults() {
        let mut sim = sim();
        let report = import(
            &mut sim,
            "EMAIL,first name,Plan Name,seats,signed_up_at,Subscribed\n\
             a@x.co,Ann,pro,3,1704713466000,\n\
             b@x.co,Bob,,,2024-01-08T11:31:06Z,false\n",
            &["news"],
            false,
        );
        assert_eq!((report.new, report.updated, report.failed), (2, 0, 0));
        let a = contact(&sim, "a@x.co");
        assert_eq!(
            (
                &a["firstName"],
                &a["planName"],
                &a["seats"],
                &a["signedUpAt"]
            ),
            (
                &json!("Ann"),
                &json!("pro"),
                &json!(3),
                &json!("2024-01-08T11:31:06.000Z")
            )
        );
        assert_eq!(
            (&a["subscribed"], &a["source"], &a["mailingLists"]),
            (&json!(true), &json!(CSV_SOURCE), &json!({"news": true}))
        );
        let b = contact(&sim, "b@x.co");
        assert_eq!(
            (&b["subscribed"], &b["planName"]),
            (&json!(false), &Value::Null)
        );
        assert!(sim.workflows.is_empty(), "trigger loops off: no workflow");
        import(&mut sim, "Email\nc@x.co\n", &[], true);
        assert_eq!(sim.workflows.len(), 1, "trigger loops on: contact_added");
    }

    /// An update: an empty cell never overwrites, `null` clears, `Subscribed=true` never
    /// re-subscribes, lists are added; matching by User ID first, then Email.
    #[test]
    fn updates_match_user_id_then_email_and_never_resubscribe() {
        let mut sim = sim();
        import(
            &mut sim,
            "Email,User ID,First Name,planName,Subscribed\n\
             a@x.co,u1,Ann,pro,false\n\
             b@x.co,,Bob,gold,\n",
            &[],
            false,
        );
        let report = import(
            &mut sim,
            "Email,User ID,First Name,planName,Subscribed\n\
             a@x.co,u1,,null,true\n\
             B@X.co,u2,Bobby,,\n",
            &["beta"],
            false,
        );
        assert_eq!((report.new, report.updated, report.failed), (0, 2, 0));
        let a = contact(&sim, "a@x.co");
        assert_eq!(
            (
                &a["firstName"],
                &a["planName"],
                &a["subscribed"],
                &a["mailingLists"]
            ),
            (
                &json!("Ann"),
                &Value::Null,
                &json!(false),
                &json!({"beta": true})
            ),
            "empty kept Ann, null cleared planName, true did not re-subscribe"
        );
        let b = contact(&sim, "b@x.co");
        assert_eq!(
            (&b["userId"], &b["firstName"], &b["planName"]),
            (&json!("u2"), &json!("Bobby"), &json!("gold")),
            "matched by email, the User ID set"
        );
    }

    /// Failed rows carry their line and why; a User ID whose contact has another email is one;
    /// a second row for one contact is a duplicate; the others are applied.
    #[test]
    fn failed_and_duplicate_rows() {
        let mut sim = sim();
        import(&mut sim, "Email,User ID\na@x.co,u1\n", &[], false);
        let report = import(
            &mut sim,
            "Email,User ID,seats\n\
             other@x.co,u1,1\n\
             c@x.co,,many\n\
             not-an-email,,\n\
             ,u9,\n\
             d@x.co,,2\n\
             D@x.co,,3\n",
            &[],
            false,
        );
        assert_eq!(
            (report.new, report.updated, report.duplicate, report.failed),
            (1, 0, 1, 4)
        );
        let lines: Vec<u64> = report.failures.iter().map(|f| f.line).collect();
        assert_eq!(lines, [2, 3, 4, 5]);
        assert!(
            report.failures[0].reason.contains("another email"),
            "{report:?}"
        );
        assert!(
            report.failures[1].reason.contains("not a number"),
            "{report:?}"
        );
        assert!(sim.audience.find(Some("other@x.co"), None).is_none());
        assert_eq!(
            contact(&sim, "d@x.co")["seats"],
            json!(2),
            "the first row is kept"
        );
    }

    /// A file is refused whole for a column no property has, or an unknown list.
    #[test]
    fn unreadable_files_are_refused_whole() {
        let mut sim = sim();
        let e = sim
            .import(b"Email,Shoe Size\na@x.co,4\n", &[], false)
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("names no property"), "{}", e.message);
        let e = sim
            .import(b"Email\na@x.co\n", &["nope".into()], false)
            .unwrap_err();
        assert!(e.message.contains("does not exist"), "{}", e.message);
        assert_eq!(sim.audience.all().count(), 0);
    }

    /// The export reads back, by the crate's reader, as the contacts `/_sim/contacts` shows.
    #[test]
    fn the_export_reads_back_as_the_audience() {
        let mut sim = sim();
        import(
            &mut sim,
            "Email,User ID,planName,seats,signedUpAt\na@x.co,u1,\"pro, yearly\",3,2024-01-08\n",
            &["news", "beta"],
            false,
        );
        let file = sim.export().unwrap();
        let mut reader = loopsync_loops_csv::reader(&file[..]);
        let known = [
            "email",
            "userId",
            "planName",
            "seats",
            "signedUpAt",
            "subscribed",
        ];
        let columns = resolve(reader.headers().unwrap(), &known, false).unwrap();
        let type_of = |n: &str| match n {
            "seats" => CellType::Number,
            "signedUpAt" => CellType::Date,
            "subscribed" => CellType::Boolean,
            _ => CellType::Text,
        };
        let rows: Vec<Value> = reader
            .records()
            .map(|r| {
                Value::Object(
                    read_row(&columns, &r.unwrap(), &type_of)
                        .unwrap()
                        .into_contact(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                json!({"email": "a@x.co", "userId": "u1", "planName": "pro, yearly", "seats": 3,
                    "signedUpAt": "2024-01-08T00:00:00.000Z", "subscribed": true,
                    "mailingLists": {"beta": true, "news": true}})
            ]
        );
    }
}
