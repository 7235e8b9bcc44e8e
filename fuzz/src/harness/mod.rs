//! What every fuzz target checks, shared by the libFuzzer targets in `fuzz/` and by the
//! bounded run in `tests/fuzz_smoke.rs` (which includes this module by path), so the CI run
//! and the long runs check the same properties on every input:
//!
//! - decoding never panics (a panic aborts the fuzzer, or fails the test);
//! - decoding never allocates past [`decode_bound`], [`read_bound`] or, on a whole
//!   stream, [`stream_largest`], whatever the length and count fields claim;
//! - a frame that decodes re-encodes to the same bytes (only Go's flag byte is
//!   normalized), and satisfies every check the decoder promises;
//! - the handshake and the stream readers behind it hand the engine only messages inside
//!   the range the Go named.
//!
//! Seeds are valid encoded frames and conversations; [`mutate`] turns them into what a
//! broken or hostile peer might send, for runs without libFuzzer.
//!
//! Layout: `heap` (allocation accounting and bounds), `examples` (frame types, valid
//! frames), `checks` (frame checks, the decoder, stream and unpack targets), `handshake`
//! (the handshake targets), `seeds` (their seed conversations), `targets` (the list),
//! `mutate` (the mutation fuzzer).

mod checks;
mod examples;
mod handshake;
mod heap;
mod mutate;
mod seeds;
mod targets;

pub use checks::*;
pub use examples::*;
pub use handshake::*;
pub use heap::*;
pub use mutate::*;
pub use targets::*;

use std::sync::OnceLock;

/// Points `$XDG_STATE_HOME` (where a destination records its sync id, see
/// the sync-id records) at a directory of this process's own under the temp dir, once,
/// so no fuzz input can make a run write into the real home. The targets open no file
/// today (a destination half without a target records nothing); this keeps it so if one
/// ever does. Called before any input runs: by `init` in the libFuzzer targets, first
/// thing in each test of `tests/fuzz_smoke.rs`.
pub fn private_state_home() {
    static DONE: OnceLock<std::path::PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let name = format!("blocksync-fuzz-state-{}", std::process::id());
        let dir = std::env::temp_dir().join(name);
        // SAFETY: set once, before any input runs. In a libFuzzer target `init` runs
        // before libFuzzer starts its threads; in the smoke test the other test threads
        // touch the environment only through `std::env`, whose calls are serialized.
        unsafe { std::env::set_var("XDG_STATE_HOME", &dir) };
        dir
    });
}
