//! The source half's side of `--digest-file`: every stream spot-checks the destination
//! against the file before anything is written, and each chunk's digests are recorded
//! for the next run.

use super::Chunk;
use super::compare::Changes;
use super::refine::Refiner;
use crate::digestfile::cache::{Cache, Gate};
use crate::engine::Layout;
use crate::engine::blockhash::block_infos;
use crate::error::{Error, Kind, Result};
use crate::hash::{BlockInfo, HashKind};
use std::ops::Range;

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

/// A chunk's digests to record, kept until its changes are sent: the file must hold what
/// was written, and blocks sent from bytes read again (hashed ahead, or refined) may hold
/// other bytes than those compared, if the source changed in between.
pub(super) struct ChunkRecord {
    kind: HashKind,
    block: usize,
    /// The chunk's first block, and its length in bytes.
    first: u64,
    len: usize,
    infos: Vec<BlockInfo>,
    /// Blocks written to the destination in this run.
    sent: Vec<bool>,
}

impl ChunkRecord {
    /// The record of `chunk` as compared: `mine`, the source's digests (of `kind`), with
    /// the blocks in `changes` marked sent.
    pub(super) fn new(
        layout: &Layout,
        kind: HashKind,
        chunk: &Chunk,
        changes: &Changes,
        mine: Vec<BlockInfo>,
    ) -> Self {
        let block = layout.block as usize;
        let (offset, len) = layout.chunk_at(chunk.index);
        let mut sent = vec![false; mine.len()];
        for (r, _) in &changes.ranges {
            for s in &mut sent[r.start / block..r.end.div_ceil(block)] {
                *s = true;
            }
        }
        // Blocks with unreadable sectors: what the destination holds there is not
        // what was read (old bytes, or zeros that a later read may contradict).
        let mut infos = mine;
        for r in &chunk.bad {
            for k in r.start / block..r.end.div_ceil(block) {
                infos[k] = BlockInfo::Missing;
                sent[k] = false;
            }
        }
        ChunkRecord {
            kind,
            block,
            first: offset / layout.block,
            len,
            infos,
            sent,
        }
    }

    /// `data`, the bytes of range `r` of the chunk, were read again and sent: the sent
    /// blocks wholly inside it hold those bytes (a block partly inside is unreadable,
    /// so recorded missing anyway).
    pub(super) fn resent(&mut self, r: &Range<usize>, data: &[u8]) {
        let b = self.block;
        for k in r.start.div_ceil(b)..self.infos.len() {
            let blk = k * b..((k + 1) * b).min(self.len);
            if blk.end > r.end {
                break;
            }
            if self.sent[k] {
                let part = &data[blk.start - r.start..blk.end - r.start];
                self.infos[k] = block_infos(self.kind, part, part.len(), b, &[])[0];
            }
        }
    }

    /// The block at `at` of the chunk is refined: the answer records what it holds then
    /// ([`Cache::record_sent`]).
    pub(super) fn refined(&mut self, at: usize) {
        self.infos[at / self.block] = BlockInfo::Missing;
    }

    /// Writes the record into the digest file of the stream starting at block `stream`.
    pub(super) fn write(self, cache: &Cache, stream: u64) -> Result<()> {
        cache
            .record(stream, self.first, &self.infos, &self.sent)
            .map_err(|e| Error::new(Kind::Io, format!("writing digest file {}: {e}", cache.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::source::Chunk;
    use crate::engine::source::compare::Send;

    #[test]
    fn resent_replaces_only_sent_blocks_wholly_in_the_range() {
        let kind = HashKind::Xxh3;
        let layout = Layout {
            size: 14,
            start: 0,
            end: 14,
            block: 4,
            chunk: 16,
            open_end: false,
        };
        let old = |b: u8| BlockInfo::Digest(kind.block_digest(&[b; 4]));
        let mut changes = Changes::default();
        changes.push(2..14, Send::Data); // block 0 in part (unreadable), blocks 1-3
        let chunk = Chunk {
            bad: std::iter::once(0..2).collect(),
            ..Chunk::unread(0, vec![false; 4])
        };
        let mine = vec![old(1), old(2), old(3), old(4)];
        let mut rec = ChunkRecord::new(&layout, kind, &chunk, &changes, mine);
        let data = [9u8; 12];
        rec.resent(&(2..14), &data);
        assert_eq!(
            rec.infos,
            vec![
                BlockInfo::Missing, // unreadable: never claimed
                BlockInfo::Digest(kind.block_digest(&[9; 4])),
                BlockInfo::Digest(kind.block_digest(&[9; 4])),
                BlockInfo::Digest(kind.block_digest(&[9; 2])), // the short last block
            ]
        );
        assert_eq!(rec.sent, vec![false, true, true, true]);
        rec.refined(4);
        assert_eq!(rec.infos[1], BlockInfo::Missing);
    }
}
