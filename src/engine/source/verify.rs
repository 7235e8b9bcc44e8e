//! The verify pass for a chunk: the source's full-strength digests against the
//! destination's and against what the sync pass read.

use super::Chunk;
use super::compare::overlapping;
use super::refine::Refiner;
use crate::engine::messages::{FindingKind, ToDest};
use crate::engine::{Config, Stats};
use crate::error::{Error, Kind, Result};
use crate::hash::BlockInfo;

/// The verify pass for one chunk: compares the source's full-strength digests with the
/// destination's, and with what the sync pass read, and reports what differs.
pub(super) fn verify_chunk(
    config: &Config,
    chunk: &Chunk,
    theirs: &[BlockInfo],
    refiner: &Refiner,
    stats: &Stats,
) -> Result<()> {
    let Some(log) = &config.verify else {
        return Err(Error::new(Kind::Internal, "verify pass without a log"));
    };
    let block = config.layout.block as usize;
    let (offset, len) = config.layout.chunk_at(chunk.index);
    let data = chunk.data.as_deref().unwrap_or(&[]);
    let mine =
        crate::engine::blockhash::hash_blocks(log.kind, data, len, block, &chunk.zeros, true);
    // Sectors the sync could not read (now or then) are zeros or old bytes by design: not
    // a mismatch, and a sector that reads now is not a source that changed.
    let end = offset + len as u64;
    let mut bad = chunk.bad.clone();
    let then = stats
        .findings
        .lock()
        .expect("not poisoned")
        .unreadable
        .clone();
    for r in then.iter().filter(|r| r.start < end && r.end > offset) {
        bad.push((r.start.max(offset) - offset) as usize..(r.end.min(end) - offset) as usize);
    }
    let mut found = Vec::new();
    if bad.is_empty() && log.changed(offset, &mine) == Some(true) {
        // The destination holds what the sync read; the source moved on since.
        found.push((FindingKind::SourceChanged, offset, len as u64));
    } else {
        for (j, m) in mine.iter().enumerate() {
            let r = j * block..((j + 1) * block).min(len);
            let t = theirs.get(j).copied().unwrap_or(BlockInfo::Missing);
            if *m != t && overlapping(&bad, &r).is_empty() {
                found.push((
                    FindingKind::Mismatch,
                    offset + r.start as u64,
                    r.len() as u64,
                ));
            }
        }
    }
    for (kind, at, n) in found {
        stats.found(kind, at, n);
        refiner.send(ToDest::Finding {
            kind,
            offset: at,
            len: n,
        })?;
    }
    Stats::add(&stats.verified, len as u64);
    Ok(())
}
