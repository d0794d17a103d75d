//! Loops' audience export, read as the contacts `GET /v1/contacts/find` would return, so that
//! `adopt` and `verify` compare a file exactly as they compare Loops' answers
//! (`loopsync_transformer::verify::compare`). The file is held as its raw rows, indexed by
//! email and User ID; a row is typed only when looked up, by the sync's property types.

use std::collections::HashMap;
use std::path::Path;

use loopsync_core::envelope::{Action, Operation};
use loopsync_core::spec::{DEFAULT_PROPERTIES, SyncSpec};
use loopsync_core::value::normalize_email;
use loopsync_loops_csv::csv::StringRecord;
use loopsync_loops_csv::{Column, CsvError, read_row, resolve};
use loopsync_transformer::verify::{Confirmed, DriftKind, Lookup, compare};
use serde_json::{Map, Value};

use super::{BulkError, cell_type};

/// An audience export, read.
#[derive(Debug)]
pub struct LoopsExport {
    path: String,
    headers: StringRecord,
    rows: Vec<StringRecord>,
    /// Each email (as Loops matches them: trimmed, case-folded) and User ID → its row; `None`
    /// when two rows name it (which one Loops holds is unknown: neither proves anything).
    by_email: HashMap<String, Option<usize>>,
    by_user_id: HashMap<String, Option<usize>>,
}

/// Why a contact named on two rows of the file is not read (verify reports it unreadable).
const ON_TWO_ROWS: &str = "the file has two rows for this contact";

impl LoopsExport {
    /// Reads the file at `path`.
    pub fn open(path: &Path) -> Result<LoopsExport, BulkError> {
        let shown = path.display().to_string();
        let bad = |source: CsvError| BulkError::Csv {
            path: shown.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(|source| BulkError::Io {
            path: shown.clone(),
            source,
        })?;
        let mut reader = loopsync_loops_csv::reader(std::io::BufReader::new(file));
        let headers = reader.headers().map_err(|e| bad(e.into()))?.clone();
        let ids = resolve(&headers, &["email", "userId"], false).map_err(bad)?;
        let at = |name: &str| ids.iter().position(|c| *c == Column::Property(name.into()));
        let (email_at, user_id_at) = (at("email"), at("userId"));
        let mut export = LoopsExport {
            path: shown.clone(),
            headers,
            rows: Vec::new(),
            by_email: HashMap::new(),
            by_user_id: HashMap::new(),
        };
        for record in reader.records() {
            let record = record.map_err(|e| bad(e.into()))?;
            let n = export.rows.len();
            let cell = |at: Option<usize>| {
                at.and_then(|i| record.get(i))
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
            };
            if let Some(email) = cell(email_at) {
                note(&mut export.by_email, normalize_email(email), n);
            }
            if let Some(user_id) = cell(user_id_at) {
                note(&mut export.by_user_id, user_id.to_owned(), n);
            }
            export.rows.push(record);
        }
        Ok(export)
    }

    /// Contacts in the file.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The file as `spec` reads it: its columns resolved among the sync's properties and
    /// Loops' default ones (columns of neither are ignored).
    pub fn view<'a>(&'a self, spec: &'a SyncSpec) -> Result<View<'a>, BulkError> {
        let mut known: Vec<&str> = DEFAULT_PROPERTIES.iter().map(|(n, _)| *n).collect();
        known.extend(spec.properties.iter().map(|p| p.property.as_str()));
        let columns = resolve(&self.headers, &known, false).map_err(|source| BulkError::Csv {
            path: self.path.clone(),
            source,
        })?;
        Ok(View {
            file: self,
            spec,
            columns,
        })
    }
}

/// Notes that row `n` names `id`; a second row naming it makes it ambiguous.
fn note(index: &mut HashMap<String, Option<usize>>, id: String, n: usize) {
    index
        .entry(id)
        .and_modify(|at| *at = None)
        .or_insert(Some(n));
}

/// An export read for one sync.
#[derive(Debug)]
pub struct View<'a> {
    file: &'a LoopsExport,
    spec: &'a SyncSpec,
    columns: Vec<Column>,
}

impl View<'_> {
    /// Whether the file has a lists column (Loops' audience export has one).
    pub fn has_lists(&self) -> bool {
        self.columns.contains(&Column::Lists)
    }

    /// The contact `lookup` names, as `contacts/find` shows one (`None`: not in the file).
    /// `Err`: its row has a cell its type refuses (the reason names the column), or two rows
    /// of the file name it.
    pub fn find(&self, lookup: &Lookup) -> Result<Option<Map<String, Value>>, String> {
        let at = match lookup {
            Lookup::Email(e) => self.file.by_email.get(&normalize_email(e)),
            Lookup::UserId(u) => self.file.by_user_id.get(u.trim()),
        };
        let Some(&at) = at else {
            return Ok(None);
        };
        let Some(at) = at else {
            return Err(ON_TWO_ROWS.into());
        };
        let spec = self.spec;
        let row = read_row(&self.columns, &self.file.rows[at], &|n| cell_type(spec, n))?;
        Ok(Some(row.into_contact()))
    }

    /// Whether the file says which of the sync's lists `contact` (one of its rows) is on: it
    /// has a lists column, and the row names only list ids the sync maps. A list named
    /// otherwise (by its name, or a list the sync does not know) may be one of the sync's:
    /// read as absent, a list the contact is on would pass as off.
    fn lists_readable(&self, contact: &Map<String, Value>) -> bool {
        self.has_lists()
            && contact
                .get("mailingLists")
                .and_then(Value::as_object)
                .is_none_or(|on| {
                    on.keys()
                        .all(|id| self.spec.lists.iter().any(|l| l.list_id == *id))
                })
    }

    /// Whether the contact of `op` (a run's write of a record) is in the file exactly as the
    /// write would leave it, by `verify`'s comparison, and the write takes nothing else out of
    /// Loops. `Err`: why not, in a few words (the reasons `adopt --from-loops-export` counts
    /// by).
    pub fn holds(&self, op: &Operation) -> Result<(), &'static str> {
        let action = &op.action;
        if op.also_remove.is_some() {
            // Contacts a lost write may have left: the API lane takes them out after the write,
            // an upload never does.
            return Err("it also takes out contacts a lost write may have left");
        }
        if matches!(action, Action::Rekey { .. }) {
            return Err("a new identity: the old contact is the API lane's");
        }
        let Some(confirmed) = Confirmed::from_action(action) else {
            return Err("a removal");
        };
        let Some(lookup) = confirmed.lookup(self.spec.identify_by) else {
            return Err("no identifier");
        };
        let found = self.find(&lookup).map_err(|why| {
            if why == ON_TWO_ROWS {
                "on two rows of the file"
            } else {
                "its row in the file has a value of the wrong type"
            }
        })?;
        if !confirmed.mailing_lists.is_empty()
            && let Some(contact) = &found
            && !self.lists_readable(contact)
        {
            return Err("its mailing lists cannot be read from the file");
        }
        let drifts = compare(self.spec, &confirmed, found.as_ref());
        if drifts.is_empty() {
            Ok(())
        } else if drifts.iter().any(|d| d.kind == DriftKind::Missing) {
            Err("not in the file")
        } else if drifts.iter().any(|d| d.kind == DriftKind::Property) {
            Err("a property differs")
        } else {
            Err("a mailing list differs")
        }
    }
}

#[cfg(test)]
mod tests {
    use loopsync_core::spec::MappedList;
    use serde_json::json;

    use super::*;
    use crate::testing::spec;

    fn file(text: &str) -> (tempfile::TempDir, LoopsExport) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audience.csv");
        std::fs::write(&path, text).unwrap();
        let file = LoopsExport::open(&path).unwrap();
        (dir, file)
    }

    /// An email on two rows (in any case, as Loops matches) names no contact: which one Loops
    /// holds is unknown. A User ID likewise.
    #[test]
    fn an_identifier_on_two_rows_is_found_on_neither() {
        let (_dir, file) =
            file("Email,User ID,Mailing Lists\na@x.co,u1,\n A@X.CO ,u2,\nb@x.co,u2,\nc@x.co,u3,\n");
        let spec = spec();
        let view = file.view(&spec).unwrap();
        let find = |lookup: Lookup| view.find(&lookup).map(|c| c.map(|c| c["email"].clone()));
        assert_eq!(
            find(Lookup::Email("a@x.co".into())),
            Err(ON_TWO_ROWS.into())
        );
        assert_eq!(find(Lookup::UserId("u2".into())), Err(ON_TWO_ROWS.into()));
        assert_eq!(
            find(Lookup::Email("c@x.co".into())),
            Ok(Some(json!("c@x.co")))
        );
        assert_eq!(find(Lookup::UserId("u1".into())), Ok(Some(json!("a@x.co"))));
        assert_eq!(find(Lookup::Email("d@x.co".into())), Ok(None));
    }

    /// The lists are read only from a lists column naming list ids the sync maps: a name, or
    /// a list the sync does not know, may be one of its lists named otherwise.
    #[test]
    fn lists_are_readable_only_as_ids_the_sync_maps() {
        let mut spec = spec();
        spec.lists = vec![MappedList {
            list_id: "news".into(),
            column: "newsletter".into(),
        }];
        let (_dir, with) = file("Email,Mailing Lists\na@x.co,news\n");
        let view = with.view(&spec).unwrap();
        let contact = |lists: Value| json!({"mailingLists": lists}).as_object().unwrap().clone();
        assert!(view.lists_readable(&contact(json!({}))));
        assert!(view.lists_readable(&contact(json!({"news": true}))));
        assert!(!view.lists_readable(&contact(json!({"Newsletter": true}))));
        assert!(!view.lists_readable(&contact(json!({"news": true, "other": true}))));
        let (_dir, without) = file("Email\na@x.co\n");
        let view = without.view(&spec).unwrap();
        assert!(!view.lists_readable(&contact(json!({}))));
    }
}
