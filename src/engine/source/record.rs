//! The source half's side of `--digest-file`: every stream spot-checks the destination
//! against the file before anything is written, and each chunk's digests are recorded
//! for the next run.

use super::Chunk;
use super::compare::Changes;
use super::refine::Refiner;
use crate::digestfile::cache::{Cache, Gate};
use crate::engine::Layout;
use crate::error::{Error, Kind, Result};
use crate::hash::BlockInfo;

/// Starts this stream's recording and waits until every stream has spot-checked the
/// destination against the file; fails if any found it stale.
pub(super) fn gate(cache: &Cache, layout: &Layout, refiner: &mut Refiner) -> Result<()> {
    cache.begin(
        layout.start / layout.block,
        layout.end.div_ceil(layout.block),
    );
    // Every stream checks before any writes: a stale file must change nothing.
    let checked = refiner.spot_check(cache);
    let gate = cache.all_checked(checked.is_ok());
    checked?;
    match gate {
        Gate::Passed => Ok(()),
        Gate::Stale => Err(Error::new(
            Kind::StaleCache,
            format!(
                "digest file {} does not match {} (a spot-check of another stream failed); run with --digest-rebuild",
                cache.name, cache.dest
            ),
        )),
        Gate::TimedOut(waited) => Err(Error::new(
            Kind::Remote,
            format!(
                "timed out after {} s waiting for the other streams' spot-checks of {} against digest file {}; nothing was written",
                waited.as_secs(),
                cache.dest,
                cache.name
            ),
        )),
    }
}

/// Records the chunk's blocks: `mine`, the source's digests of them, with the blocks in
/// `changes` marked sent.
pub(super) fn record_chunk(
    cache: &Cache,
    layout: &Layout,
    chunk: &Chunk,
    changes: &Changes,
    mine: &[BlockInfo],
) -> Result<()> {
    let block = layout.block as usize;
    let (offset, _) = layout.chunk_at(chunk.index);
    let mut sent = vec![false; mine.len()];
    for (r, _) in &changes.ranges {
        for s in &mut sent[r.start / block..r.end.div_ceil(block)] {
            *s = true;
        }
    }
    // Blocks with unreadable sectors: what the destination holds there is not
    // what was read (old bytes, or zeros that a later read may contradict).
    let mut m = mine.to_vec();
    for r in &chunk.bad {
        for k in r.start / block..r.end.div_ceil(block) {
            m[k] = BlockInfo::Missing;
            sent[k] = false;
        }
    }
    cache
        .record(
            layout.start / layout.block,
            offset / layout.block,
            &m,
            &sent,
        )
        .map_err(|e| Error::new(Kind::Io, format!("writing digest file {}: {e}", cache.name)))
}
