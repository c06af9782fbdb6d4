//! Replays what the fuzzers kept (`fuzz/corpus/<target>/`, the minimized
//! corpus, and `fuzz/regressions/<target>/`, the inputs that once crashed
//! a target) through the targets' own entry points, on stable: CI covers
//! every input a fuzzer ever found interesting without needing nightly.
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

#[path = "../fuzz/src/lib.rs"]
mod targets;

#[test]
fn every_kept_input_passes_its_target() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failed = Vec::new();
    for &(name, target) in targets::TARGETS {
        let mut replayed = 0;
        for kept in ["corpus", "regressions"] {
            let Ok(entries) = fs::read_dir(fuzz.join(kept).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let input = fs::read(&path).unwrap();
                if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
                    failed.push(path);
                }
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no kept input for the fuzz target {name}");
    }
    assert!(
        failed.is_empty(),
        "these inputs fail their targets: {failed:?}"
    );
}
