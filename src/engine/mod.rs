//! The sync engine: a source half that reads, compares and decides what to send, and a
//! destination half that reads, writes and flushes. They talk only through the
//! [`messages`]; [`sync_local`] runs both halves in one process, `crate::wire` carries
//! them between two machines.
//!
//! Both halves are pipelines: a reader thread per side fills pooled buffers a chunk
//! (several blocks) at a time, while the other threads compare and write, so reading,
//! comparing and writing overlap and memory stays bounded by the pools.

pub(crate) mod blockhash;
mod config;
pub(crate) mod dest;
mod layout;
pub(crate) mod messages;
pub(crate) mod prehash;
pub(crate) mod salvage;
pub(crate) mod source;
mod stats;
mod verifylog;
mod writer;

pub use config::{Compare, Config, RunOptions, Salvage, StreamEnd};
pub use layout::{CHUNK_TARGET, Layout};
pub use stats::{Findings, Stats};
pub use verifylog::VerifyLog;

use crate::error::Result;
use crate::io::target::Target;
use crossbeam_channel::bounded;
use messages::{ToDest, ToSource};
use std::sync::atomic::AtomicBool;

/// Capacity of the channels carrying chunk reports. Reports that hold a buffer are
/// bounded by the buffer pools anyway; the rest (holes, digests) are tiny, and a deep
/// queue lets a run of them pass without a thread wake-up each.
pub const REPORTS_IN_FLIGHT: usize = 256;

/// Runs both halves in this process: `dest` is `None` only in a dry run onto a missing
/// destination. Returns when the destination has confirmed everything is flushed.
pub fn sync_local(
    src: &Target,
    dest: Option<&Target>,
    config: &Config,
    stats: &Stats,
    cancel: &AtomicBool,
) -> Result<()> {
    local_pass(src, dest, config, stats, cancel)?;
    if config.verify_follows() {
        local_pass(src, dest, &config.for_verify(), stats, cancel)?;
    }
    Ok(())
}

fn local_pass(
    src: &Target,
    dest: Option<&Target>,
    config: &Config,
    stats: &Stats,
    cancel: &AtomicBool,
) -> Result<()> {
    let (to_dest, from_source) = bounded::<ToDest>(config.buffers * 16);
    let (to_source, from_dest) = bounded::<ToSource>(REPORTS_IN_FLIGHT);
    std::thread::scope(|s| {
        // In one process blocks are compared by bytes: no refinement questions, so the
        // destination writer sends no answers that could wait on this bounded channel.
        debug_assert!(config.compare == Compare::Bytes || config.refine == 0);
        let answers = to_source.clone();
        let dest_half =
            s.spawn(move || dest::run(dest, config, from_source, to_source, answers, stats));
        let result = source::run(src, config, to_dest, from_dest, stats, cancel);
        // The destination's failures reach the source half as messages too; a panic is a bug.
        if dest_half.join().is_err() {
            return Err(crate::error::Error::new(
                crate::error::Kind::Internal,
                "destination thread panicked",
            ));
        }
        result
    })
}
