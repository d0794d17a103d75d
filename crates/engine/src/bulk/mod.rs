//! The bulk lane: a first sync (or a full read-back) through Loops' CSV upload and audience
//! export instead of the API's requests, with the API lane's exactness:
//!
//! * [`export`]: the records a run would create or update — `plan`'s records, never a second
//!   row→operation rule — as files for Loops' uploader;
//! * [`audience`]: Loops' audience export read as the contacts `contacts/find` would return,
//!   for `adopt --from-loops-export` (`crate::adopt`, which adopts a record only when its
//!   contact in the file is what the sync would send, by `verify`'s comparison) and
//!   `verify --from-loops-export` (`crate::verify` with the file in place of Loops).
//!
//! The format (headers, cells) is `loopsync_loops_csv`'s, shared with the simulator.

pub mod audience;
pub mod export;

use loopsync_core::spec::{SyncSpec, default_property_kind};
use loopsync_core::value::PropertyKind;
use loopsync_core::{Classified, ErrorClass};
use loopsync_loops_csv::{CellType, CsvError};
use loopsync_warehouse::WarehouseError;

use crate::plan::PlanError;

/// What can go wrong in the bulk lane.
#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    /// The sync cannot go through a file (an event sync, a sync that fires events): a usage
    /// error, nothing done.
    #[error("sync {sync}: {why}")]
    NotForFiles { sync: String, why: &'static str },
    /// `adopt --from-loops-export`'s file is not an export of the Loops the sync is bound to
    /// (read back from it), or no audience export at all: refused, nothing adopted.
    #[error("sync {sync}: {why}")]
    NotThisLoops { sync: String, why: String },
    /// `adopt --exported`'s records file is not one to take for this sync now (another sync's,
    /// another state's, or a run has been since the export): refused, nothing adopted.
    #[error("sync {sync}: {why}")]
    RecordsRefused { sync: String, why: String },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A file is not Loops' CSV.
    #[error("{path}: {source}")]
    Csv {
        path: String,
        #[source]
        source: CsvError,
    },
    #[error(transparent)]
    Warehouse(#[from] WarehouseError),
}

impl BulkError {
    /// How loopsync was called: exit status 2.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            BulkError::NotForFiles { .. }
                | BulkError::NotThisLoops { .. }
                | BulkError::RecordsRefused { .. }
        )
    }
}

impl Classified for BulkError {
    fn class(&self) -> ErrorClass {
        match self {
            BulkError::Warehouse(e) => e.class(),
            _ => ErrorClass::Permanent,
        }
    }
}

impl From<PlanError<BulkError>> for BulkError {
    fn from(e: PlanError<BulkError>) -> BulkError {
        match e {
            PlanError::Warehouse(e) => BulkError::Warehouse(e),
            PlanError::Each(e) => e,
        }
    }
}

/// Refuses a sync whose records a file cannot carry: an event sync's rows are events, and a
/// sync with `trigger_workflows` sends each write as an event (the upload sends none).
pub fn check_for_files(spec: &SyncSpec) -> Result<(), BulkError> {
    let why = if spec.is_append() {
        "an event sync's rows are events: Loops' CSV upload sends none"
    } else if spec.trigger_workflows {
        "trigger_workflows sends each write as an event: Loops' CSV upload sends none"
    } else {
        return Ok(());
    };
    Err(BulkError::NotForFiles {
        sync: spec.name.clone(),
        why,
    })
}

/// The type of a property's cells: its mapping's, else a default property's, else text.
pub(crate) fn cell_type(spec: &SyncSpec, name: &str) -> CellType {
    let kind = spec
        .property(name)
        .map(|p| p.kind)
        .or_else(|| default_property_kind(name))
        .unwrap_or(PropertyKind::String);
    match kind {
        PropertyKind::String => CellType::Text,
        PropertyKind::Number => CellType::Number,
        PropertyKind::Boolean => CellType::Boolean,
        PropertyKind::Date => CellType::Date,
    }
}

/// `verify --from-loops-export`: [`crate::verify::verify`] with Loops' audience export in
/// place of `contacts/find` — every confirmed record of each sync (or `only`) compared with the
/// file by the same rules, no request to Loops. A contact whose row has a cell of the wrong
/// type is reported unreadable, as a query Loops refuses is. `--repair` forgets as verify does.
pub async fn verify_against(
    warehouse: &dyn loopsync_warehouse::Warehouse,
    syncs: &[&SyncSpec],
    only: Option<&str>,
    options: &crate::verify::Options,
    file: &audience::LoopsExport,
    progress: crate::verify::Progress<'_>,
) -> Result<crate::verify::Report, VerifyAgainstError> {
    use loopsync_core::envelope::RequestCounts;
    use loopsync_loops_client::{Contact, ContactIdentity, LoopsError};
    use loopsync_transformer::verify::Lookup;

    use crate::verify::ReadError;

    let mut report = crate::verify::Report::new();
    for spec in syncs {
        if only.is_some_and(|n| n != spec.name) || spec.is_append() {
            continue;
        }
        let view = file.view(spec)?;
        let find = |identity: ContactIdentity| {
            let lookup = match identity {
                ContactIdentity::Email(e) => Lookup::Email(e),
                ContactIdentity::UserId(u) => Lookup::UserId(u),
            };
            let found = match view.find(&lookup) {
                Ok(None) => Ok(None),
                Ok(Some(mut contact)) => {
                    // `contacts/find`'s shape: the file has no contact id.
                    contact.insert("id".into(), serde_json::Value::String(String::new()));
                    serde_json::from_value::<Contact>(serde_json::Value::Object(contact))
                        .map(Some)
                        .map_err(|e| ReadError::Loops(LoopsError::Usage(e.to_string())))
                }
                Err(why) => Err(ReadError::Loops(LoopsError::Usage(why))),
            };
            std::future::ready((found, RequestCounts::default()))
        };
        let one = crate::verify::verify_sync(warehouse, spec, options, 64, find, progress)
            .await
            .map_err(|e| crate::verify::VerifyError::Sync {
                sync: spec.name.clone(),
                source: Box::new(e),
            })?;
        report.push(one);
    }
    Ok(report)
}

/// Why `verify --from-loops-export` stopped.
#[derive(Debug, thiserror::Error)]
pub enum VerifyAgainstError {
    #[error(transparent)]
    Bulk(#[from] BulkError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
}

impl Classified for VerifyAgainstError {
    fn class(&self) -> ErrorClass {
        match self {
            VerifyAgainstError::Bulk(e) => e.class(),
            VerifyAgainstError::Verify(e) => e.class(),
        }
    }
}
