//! `loopsync export`: the records a run would create or update, as CSV files for Loops'
//! uploader — one set of files per set of mailing lists the records join (the lists are ticked
//! for a whole file on the upload's review page), split at [`MAX_ROWS`] rows. The records are
//! `plan`'s ([`crate::plan::plan`]): what a run would send, decided and mapped by the run's own
//! rules. Sends nothing, writes nothing to the state: the records the files create are listed
//! beside them ([`records_file`]), for `adopt --exported` to note those it does not adopt as
//! possibly in Loops.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use loopsync_core::envelope::Action;
use loopsync_core::spec::SyncSpec;
use loopsync_loops_csv::{header_for, write_cell};
use loopsync_warehouse::Warehouse;
use serde_json::Value;

use super::{BulkError, cell_type, check_for_files};
use crate::plan::{PlannedChange, PlannedRecord, SyncPlan, plan};

/// Rows per file by default: a file of some megabytes, well within what a browser uploads
/// (Loops documents no limit: `loops-api.md` §10.1).
pub const MAX_ROWS: usize = 50_000;

/// One file written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportFile {
    /// Its name in the folder.
    pub name: String,
    /// The lists to tick for it on the review page (the records join them).
    pub lists: Vec<String>,
    pub rows: u64,
}

/// A record the files may create in Loops (one new to the sync), as `records_file` lists it:
/// the write its row is uploaded as.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Uploaded {
    pub key: String,
    pub action: Action,
}

/// The first line of [`records_file`]: what the list is of, so that `adopt --exported` takes
/// it only for the state and the sync it was written from, and only while no run has been
/// since (a run may have settled what it lists).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordsHeader {
    pub v: u16,
    pub sync: String,
    /// The state's installation id, `None` when there was no state yet.
    pub installation: Option<String>,
    /// The sync's newest run when the files were written, `None` when it had none.
    pub after_run: Option<i64>,
}

/// The file beside the CSV files that lists the records they may create: a
/// [`RecordsHeader`], then one [`Uploaded`] a line, written as they are:
/// `users.records.jsonl`. Not for the upload.
pub fn records_file(sync: &str) -> String {
    format!("{}.records.jsonl", safe(sync))
}

/// Reads [`records_file`] of `sync` from `dir`, as `loopsync export` wrote it.
pub fn read_records_file(
    dir: &Path,
    sync: &str,
) -> Result<(RecordsHeader, Vec<Uploaded>), BulkError> {
    let path = dir.join(records_file(sync));
    let io = |source| BulkError::Io {
        path: path.display().to_string(),
        source,
    };
    let not_export = || BulkError::NotForFiles {
        sync: sync.to_owned(),
        why: "the records file beside the upload's files is not one `loopsync export` wrote",
    };
    let file = File::open(&path).map_err(io)?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(file));
    let header: RecordsHeader = match lines.next() {
        Some(line) => serde_json::from_str(&line.map_err(io)?).map_err(|_| not_export())?,
        None => return Err(not_export()),
    };
    let mut records = Vec::new();
    for line in lines {
        let line = line.map_err(io)?;
        if !line.trim().is_empty() {
            records.push(serde_json::from_str(&line).map_err(|_| not_export())?);
        }
    }
    Ok((header, records))
}

/// A record not in the files, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftOut {
    pub key: String,
    pub reason: String,
}

/// What `export` wrote for one sync.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    pub sync: String,
    /// The plan the files are taken from (its counts and requests: the API lane's cost).
    pub plan: SyncPlan,
    pub files: Vec<ExportFile>,
    /// Records in the files.
    pub rows: u64,
    /// The file listing the records new to the sync among them ([`records_file`]).
    pub records_file: String,
    /// Invalid records (as `rejections` lists them): in no file, and no run sends them.
    pub invalid: Vec<LeftOut>,
    /// Records a file cannot carry (a removal, a re-key, a value no cell holds): left for the
    /// API lane, the `run` after the upload sends them.
    pub for_api: Vec<LeftOut>,
}

/// The files of one set of lists being written.
struct Group {
    base: String,
    lists: Vec<String>,
    part: usize,
    rows_in_part: usize,
    /// Its file being written, in `files`.
    file: usize,
    writer: Option<loopsync_loops_csv::csv::Writer<BufWriter<File>>>,
}

/// Writes the files of `spec` into `dir` (made if missing), `max_rows` rows at most per file.
pub async fn export(
    warehouse: &dyn Warehouse,
    spec: &SyncSpec,
    requests_per_second: u32,
    dir: &Path,
    max_rows: usize,
) -> Result<ExportReport, BulkError> {
    check_for_files(spec)?;
    std::fs::create_dir_all(dir).map_err(|source| BulkError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    // Email and User ID first, then every other mapped property: one header for every file.
    let mut columns = vec!["email".to_owned(), "userId".to_owned()];
    columns.extend(
        spec.properties
            .iter()
            .map(|p| p.property.clone())
            .filter(|p| p != "email" && p != "userId"),
    );
    let mut groups: HashMap<Vec<String>, Group> = HashMap::new();
    let mut files: Vec<ExportFile> = Vec::new();
    let (mut rows, mut invalid, mut for_api) = (0u64, Vec::new(), Vec::new());
    let records = records_file(&spec.name);
    let records_path = dir.join(&records);
    let records_error = |source| BulkError::Io {
        path: records_path.display().to_string(),
        source,
    };
    let mut uploaded = BufWriter::new(File::create(&records_path).map_err(records_error)?);
    let header = RecordsHeader {
        v: 1,
        sync: spec.name.clone(),
        // No state yet (a first sync): nothing to tell apart.
        installation: warehouse.installation().await.ok(),
        after_run: warehouse
            .runs(Some(&spec.name), 1)
            .await
            .ok()
            .and_then(|runs| runs.first().map(|r| r.id)),
    };
    serde_json::to_writer(&mut uploaded, &header).expect("a header serializes");
    std::io::Write::write_all(&mut uploaded, b"\n").map_err(records_error)?;
    let each = |record: PlannedRecord| -> Result<(), BulkError> {
        let PlannedRecord {
            key,
            change,
            action,
            reason,
            ..
        } = record;
        if change == PlannedChange::Invalid {
            invalid.push(LeftOut {
                key,
                reason: reason.unwrap_or_default(),
            });
            return Ok(());
        }
        let action = action.and_then(|a| serde_json::from_value::<Action>(a).ok());
        let uploaded_action = action.clone();
        let Some(Action::Upsert {
            email,
            user_id,
            properties,
            mailing_lists,
        }) = action
        else {
            let what = match change {
                PlannedChange::Removed => "a removal: only the API removes a contact",
                _ => "a new identity (re-key): the old contact is the API's to find",
            };
            for_api.push(LeftOut {
                key,
                reason: what.into(),
            });
            return Ok(());
        };
        let mut cells = Vec::with_capacity(columns.len());
        for name in &columns {
            let value = match name.as_str() {
                "email" => email.clone().map(Value::String),
                "userId" => user_id.clone().map(Value::String),
                _ => properties.get(name).cloned(),
            };
            match value.map(|v| write_cell(cell_type(spec, name), &v)) {
                None => cells.push(String::new()),
                Some(Ok(text)) => cells.push(text),
                Some(Err(why)) => {
                    for_api.push(LeftOut {
                        key,
                        reason: format!("{name}: {why}"),
                    });
                    return Ok(());
                }
            }
        }
        let lists: Vec<String> = mailing_lists
            .iter()
            .filter(|(_, on)| **on)
            .map(|(id, _)| id.clone())
            .collect();
        let group = groups.entry(lists.clone()).or_insert_with(|| Group {
            base: base_name(&spec.name, &lists),
            lists,
            part: 0,
            rows_in_part: 0,
            file: 0,
            writer: None,
        });
        if group.writer.is_none() || group.rows_in_part >= max_rows.max(1) {
            group.part += 1;
            group.rows_in_part = 0;
            let name = if group.part == 1 {
                format!("{}.csv", group.base)
            } else {
                format!("{}.part-{}.csv", group.base, group.part)
            };
            group.writer = Some(open(&dir.join(&name), &columns)?);
            group.file = files.len();
            files.push(ExportFile {
                name,
                lists: group.lists.clone(),
                rows: 0,
            });
        }
        let writer = group.writer.as_mut().expect("opened above");
        writer.write_record(&cells).map_err(|e| csv_error(dir, e))?;
        if change == PlannedChange::Added
            && let Some(action) = uploaded_action
        {
            let record = Uploaded { key, action };
            serde_json::to_writer(&mut uploaded, &record).expect("a record serializes");
            std::io::Write::write_all(&mut uploaded, b"\n").map_err(records_error)?;
        }
        group.rows_in_part += 1;
        rows += 1;
        files[group.file].rows += 1;
        Ok(())
    };
    let plan = plan(warehouse, spec, requests_per_second, each).await?;
    for group in groups.values_mut() {
        if let Some(mut writer) = group.writer.take() {
            writer.flush().map_err(|source| BulkError::Io {
                path: dir.display().to_string(),
                source,
            })?;
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    std::io::Write::flush(&mut uploaded).map_err(records_error)?;
    Ok(ExportReport {
        sync: spec.name.clone(),
        plan,
        files,
        rows,
        records_file: records,
        invalid,
        for_api,
    })
}

/// `users.lists-news+beta` or `users.no-lists`: says which lists to tick. Characters a file
/// name should not carry become `_`.
fn base_name(sync: &str, lists: &[String]) -> String {
    if lists.is_empty() {
        format!("{}.no-lists", safe(sync))
    } else {
        let lists: Vec<String> = lists.iter().map(|l| safe(l)).collect();
        format!("{}.lists-{}", safe(sync), lists.join("+"))
    }
}

/// `s` with the characters a file name should not carry as `_`.
fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A new file with the header row.
fn open(
    path: &PathBuf,
    columns: &[String],
) -> Result<loopsync_loops_csv::csv::Writer<BufWriter<File>>, BulkError> {
    let file = File::create(path).map_err(|source| BulkError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut writer = loopsync_loops_csv::writer(BufWriter::new(file));
    writer
        .write_record(columns.iter().map(|c| header_for(c)))
        .map_err(|e| csv_error(path, e))?;
    Ok(writer)
}

fn csv_error(path: &Path, e: loopsync_loops_csv::csv::Error) -> BulkError {
    BulkError::Csv {
        path: path.display().to_string(),
        source: e.into(),
    }
}

/// The lists a file's name says, for a reader: `news + beta`, or `none`.
pub fn lists_in_words(lists: &[String]) -> String {
    if lists.is_empty() {
        "none".into()
    } else {
        lists.join(" + ")
    }
}

/// Files by the lists to tick, for the steps printed.
pub fn by_lists(files: &[ExportFile]) -> BTreeMap<Vec<String>, Vec<&ExportFile>> {
    let mut by: BTreeMap<Vec<String>, Vec<&ExportFile>> = BTreeMap::new();
    for f in files {
        by.entry(f.lists.clone()).or_default().push(f);
    }
    by
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Model, spec};

    /// Files are split at `max_rows`; an invalid record is in none of them, and listed.
    #[tokio::test]
    async fn files_are_split_at_max_rows() {
        let model = Model::new().await;
        model.insert(&[
            (Some("1"), Some("a@x.co"), None),
            (Some("2"), Some("b@x.co"), Some("u2")),
            (Some("3"), Some("c@x.co"), None),
            (Some("4"), None, None),
            (Some("5"), Some("e@x.co"), None),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let report = export(&*model.warehouse, &spec(), 10, dir.path(), 2)
            .await
            .unwrap();
        let files: Vec<(&str, u64)> = report
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.rows))
            .collect();
        assert_eq!(files, [("s.no-lists.csv", 2), ("s.no-lists.part-2.csv", 2)]);
        assert_eq!((report.rows, report.invalid.len()), (4, 1));
        assert_eq!(report.invalid[0].key, "4");
        let first = std::fs::read_to_string(dir.path().join("s.no-lists.csv")).unwrap();
        assert_eq!(first, "Email,User ID\na@x.co,\nb@x.co,u2\n");
        assert_eq!(
            base_name("my sync", &["cm/news".into(), "beta".into()]),
            "my_sync.lists-cm_news+beta"
        );
    }
}
