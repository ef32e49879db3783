//! Every input kept in `fuzz/corpus/<target>/` (seeds, and what `cargo fuzz` found and kept),
//! run through its target on stable: no panic, and no single allocation beyond
//! `MAX_ALLOCATION`. A failing input is named by its file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use nanobot_fuzzing::{MAX_ALLOCATION, TARGETS};

/// The system allocator, remembering the largest single request since the last reset.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn every_kept_input_runs_through_its_target_without_a_panic_or_a_huge_allocation() {
    let mut failures = Vec::new();
    let mut total = 0;
    for (name, target) in TARGETS {
        let dir = corpus().join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target keeps a corpus)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 3, "{}: only {} inputs", dir.display(), files.len());
        for file in files {
            let data = std::fs::read(&file).unwrap();
            LARGEST.store(0, Ordering::Relaxed);
            let outcome = std::panic::catch_unwind(|| target(&data));
            let largest = LARGEST.load(Ordering::Relaxed);
            match outcome {
                Err(e) => {
                    let why = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{}: panicked: {why}", file.display()));
                }
                Ok(()) if largest > MAX_ALLOCATION => failures.push(format!(
                    "{}: allocated {largest} bytes at once (at most {MAX_ALLOCATION})",
                    file.display()
                )),
                Ok(()) => {}
            }
            total += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_target_has_a_cargo_fuzz_binary_and_every_binary_a_target() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    let mut bins: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string()
        })
        .collect();
    bins.sort();
    let mut names: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(bins, names);
    let manifest = std::fs::read_to_string(dir.join("../Cargo.toml")).unwrap();
    for n in &names {
        assert!(
            manifest.contains(&format!("name = \"{n}\"")),
            "fuzz/Cargo.toml lists {n}"
        );
    }
}
