//! Replays every checked-in seed (`fuzz/seeds/<target>/*`) through its target's body,
//! so `cargo test` catches a decoder that panics on an input the fuzzers once found
//! interesting, without libFuzzer.

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_seed_of_every_target_runs_without_a_panic() {
    for (name, body) in lc_fuzz_common::TARGETS {
        let dir = fuzz_dir().join("seeds").join(name);
        let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "{name} has no seeds");
        for seed in seeds {
            let bytes = std::fs::read(&seed).expect("a seed");
            eprintln!("{}", seed.display());
            body(&bytes);
        }
    }
}

#[test]
fn every_target_has_a_libfuzzer_binary_that_fuzz_run_builds() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in lc_fuzz_common::TARGETS {
        let file = fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"));
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            text.contains(&format!("lc_fuzz_common::{name}(")),
            "{} does not call lc_fuzz_common::{name}",
            file.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
    }
}
