//! Fuzz targets for blocksync's protocol decoders and handshake. The checks live in
//! `harness/`, shared with the bounded CI run in `tests/fuzz_smoke.rs`; this crate adds
//! the libFuzzer glue. Run `./run.sh [SECONDS_PER_TARGET]`.

mod harness;
pub use harness::*;

/// Runs once before fuzzing. With `BLOCKSYNC_FUZZ_SEEDS=DIR` set, writes the target's
/// seed inputs (valid frames and conversations) into DIR and exits instead, so `run.sh`
/// gets seeds that always match the current encoder.
pub fn init(name: &str) {
    private_state_home();
    let Some(dir) = std::env::var_os("BLOCKSYNC_FUZZ_SEEDS") else {
        return;
    };
    let target = TARGETS
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no target {name} in the harness"));
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir).expect("creating the seed directory");
    for (i, seed) in (target.seeds)().iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), seed).expect("writing a seed");
    }
    std::process::exit(0);
}
