//! `nanobot verify DIR`: check a dataset against its manifest and name every problem file.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::fsutil::sha256_file;
use crate::journal::parse_journal_name;
use crate::manifest::Manifest;
use crate::meta::{EPISODES_PATH, INFO_PATH, STATS_PATH, TASKS_PATH};
use crate::writer::JOURNAL_DIR;
use crate::DatasetError;

/// One thing wrong with one file.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub path: PathBuf,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.what)
    }
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub files_checked: usize,
    pub rows: u64,
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Check every file the manifest lists (present, same size, same sha256, a readable Parquet
/// footer with the listed row count), the metadata files, and anything left over: data files the
/// manifest does not list, and journals not yet recovered.
pub fn verify(root: &Path) -> Result<VerifyReport, DatasetError> {
    let manifest = Manifest::load(root)?.ok_or_else(|| {
        DatasetError::invalid(
            &Manifest::path(root),
            "no manifest: not a NanoBot dataset (or nothing was ever finalized)",
        )
    })?;
    let mut report = VerifyReport::default();
    let mut problem = |path: PathBuf, what: String| report_push(&mut report, path, what);
    let mut listed = BTreeSet::new();
    for entry in &manifest.files {
        let path = root.join(&entry.path);
        listed.insert(path.clone());
        let (hash, len) = match sha256_file(&path) {
            Ok(v) => v,
            Err(DatasetError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                problem(
                    path,
                    format!(
                        "missing ({} rows, seq {}..={} listed in the manifest)",
                        entry.rows, entry.first_seq, entry.last_seq
                    ),
                );
                continue;
            }
            Err(e) => {
                problem(path, format!("unreadable: {e}"));
                continue;
            }
        };
        if len != entry.bytes {
            problem(path.clone(), format!("{len} bytes, the manifest lists {}", entry.bytes));
        }
        if hash != entry.sha256 {
            problem(
                path.clone(),
                format!("sha256 {hash} does not match the manifest's {}", entry.sha256),
            );
            continue;
        }
        match File::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|f| SerializedFileReader::new(f).map_err(|e| e.to_string()))
        {
            Ok(r) => {
                let rows = r.metadata().file_metadata().num_rows() as u64;
                if rows != entry.rows {
                    problem(path, format!("{rows} rows, the manifest lists {}", entry.rows));
                }
            }
            Err(e) => problem(path, format!("not a readable Parquet file: {e}")),
        }
    }
    for meta in [INFO_PATH, STATS_PATH, TASKS_PATH, EPISODES_PATH] {
        let path = root.join(meta);
        if !path.exists() {
            problem(path, "missing metadata file".into());
        }
    }
    let info_path = root.join(INFO_PATH);
    if let Ok(text) = std::fs::read_to_string(&info_path) {
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(info) => {
                let frames = info.get("total_frames").and_then(|v| v.as_u64());
                if frames != Some(manifest.total_rows()) {
                    problem(
                        info_path,
                        format!(
                            "total_frames {frames:?}, the manifest's files hold {}",
                            manifest.total_rows()
                        ),
                    );
                }
            }
            Err(e) => problem(info_path, format!("not JSON: {e}")),
        }
    }
    let data = root.join("data");
    for path in walk(&data) {
        if path.extension().is_some_and(|e| e == "parquet") && !listed.contains(&path) {
            problem(path, "data file not in the manifest".into());
        }
    }
    for path in walk(&root.join(JOURNAL_DIR)) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if parse_journal_name(&name).is_some() {
            problem(
                path,
                "journal not yet recovered into Parquet (open the dataset with the logger to recover it)".into(),
            );
        }
    }
    report.files_checked = manifest.files.len();
    report.rows = manifest.total_rows();
    report.bytes = manifest.files.iter().map(|f| f.bytes).sum();
    Ok(report)
}

fn report_push(report: &mut VerifyReport, path: PathBuf, what: String) {
    report.problems.push(Problem { path, what });
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
