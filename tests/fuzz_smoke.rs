//! A bounded run of every fuzz target for CI: the same checks as `fuzz/run.sh` (which
//! needs libFuzzer and minutes), driven by the harness's own mutation fuzzer from valid
//! frames, deterministic so a failure reproduces. `BLOCKSYNC_FUZZ_ITERS=N` runs N inputs
//! per target instead of the default.

// What only the libFuzzer targets use (and the re-exports of it) is unused here.
#[allow(dead_code, unused_imports)]
#[path = "../fuzz/src/harness/mod.rs"]
mod harness;

/// Inputs per target: a few seconds for all of them in a release build.
const DEFAULT_ITERS: u64 = 30_000;

#[test]
fn every_fuzz_target_survives_mutated_frames() {
    harness::private_state_home();
    let iters = std::env::var("BLOCKSYNC_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ITERS);
    for (i, target) in harness::TARGETS.iter().enumerate() {
        let started = std::time::Instant::now();
        let runs = harness::mutation_run(target, iters, 0x5eed + i as u64);
        eprintln!(
            "{:<18} {runs:>9} inputs in {:.1?}",
            target.name,
            started.elapsed()
        );
    }
}

/// The harness knows every frame type the encoder has: a new frame without a decoder
/// target would fail here (`type_byte` panics on a type it cannot find, and the bytes
/// must be distinct).
#[test]
fn every_frame_type_has_a_target() {
    harness::private_state_home();
    let mut bytes: Vec<u8> = harness::ALL_TYPES
        .iter()
        .map(|t| harness::type_byte(*t))
        .collect();
    bytes.sort_unstable();
    bytes.dedup();
    assert_eq!(bytes.len(), harness::ALL_TYPES.len());
    let names: Vec<&str> = harness::TARGETS.iter().map(|t| t.name).collect();
    for t in harness::ALL_TYPES {
        let name = format!("decode_{}", format!("{t:?}").to_lowercase());
        assert!(names.contains(&name.as_str()), "no target {name}");
    }
}
