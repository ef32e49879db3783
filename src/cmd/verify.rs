//! `nanobot verify DIR...`: each dataset (or each dataset under DIR) against its manifest:
//! every file present, intact and as listed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use nanobot_dataset::verify;

/// `dir` when it is a dataset, else the datasets directly under it (sorted; none: empty).
pub fn dataset_roots(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if dir.join("meta/manifest.json").is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("meta/manifest.json").is_file())
        .collect();
    found.sort();
    Ok(found)
}

pub fn verify_cmd(dirs: &[PathBuf]) -> anyhow::Result<u8> {
    let mut bad = 0usize;
    let mut roots = Vec::new();
    for d in dirs {
        let found = dataset_roots(d)?;
        if found.is_empty() {
            eprintln!(
                "{}: no dataset here (no meta/manifest.json, nor in a subdirectory)",
                d.display()
            );
            bad += 1;
        }
        roots.extend(found);
    }
    for root in &roots {
        match verify(root) {
            Ok(r) if r.ok() => println!(
                "{}: ok — {} files, {} rows, {} bytes",
                root.display(),
                r.files_checked,
                r.rows,
                r.bytes
            ),
            Ok(r) => {
                bad += 1;
                println!("{}: {} problem(s)", root.display(), r.problems.len());
                for p in &r.problems {
                    println!("  {p}");
                }
            }
            Err(e) => {
                bad += 1;
                println!("{}: {e}", root.display());
            }
        }
    }
    Ok(if bad == 0 { 0 } else { 1 })
}
