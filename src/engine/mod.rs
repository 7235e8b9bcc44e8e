//! The sync engine: a source half that reads, compares and decides what to send, and a
//! destination half that reads, writes and flushes. They talk only through
//! [`crate::protocol`] messages; [`sync_local`] runs both halves in one process.
//!
//! Both halves are pipelines: a reader thread per side fills pooled buffers a chunk
//! (several blocks) at a time, while the other threads compare and write, so reading,
//! comparing and writing overlap and memory stays bounded by the pools.

pub mod dest;
pub mod prehash;
pub mod source;

use crate::error::Result;
use crate::hash::HashKind;
use crate::protocol::{ToDest, ToSource};
use crate::target::Target;
use crossbeam_channel::bounded;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Capacity of the channels carrying chunk reports. Reports that hold a buffer are
/// bounded by the buffer pools anyway; the rest (holes, digests) are tiny, and a deep
/// queue lets a run of them pass without a thread wake-up each.
pub const REPORTS_IN_FLIGHT: usize = 256;

/// Reads are grouped into chunks of about this many bytes: large enough that per-read
/// and per-message costs vanish, small enough that a few of them bound memory.
pub const CHUNK_TARGET: u64 = 4 << 20;

/// How the sync's byte range is cut into chunks and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The source size, which a file destination ends with.
    pub size: u64,
    /// First byte this stream syncs (a multiple of `chunk`).
    pub start: u64,
    /// End of the range this stream syncs (exclusive).
    pub end: u64,
    /// Block size: the unit compared and written.
    pub block: u64,
    /// Chunk size: the unit read and passed between threads, a multiple of `block`.
    pub chunk: u64,
}

impl Layout {
    /// A layout for all `size` bytes in blocks of `block` bytes.
    pub fn new(size: u64, block: u64) -> Self {
        assert!(block > 0);
        let per_chunk = (CHUNK_TARGET / block).max(1);
        Layout {
            size,
            start: 0,
            end: size,
            block,
            chunk: per_chunk * block,
        }
    }

    /// Part `i` of `n` disjoint, chunk-aligned ranges covering the whole size (for
    /// parallel streams); some parts may be empty.
    pub fn part(&self, i: u64, n: u64) -> Self {
        let chunks = self.size.div_ceil(self.chunk);
        let per = chunks.div_ceil(n.max(1));
        let start = (i * per * self.chunk).min(self.size);
        let end = ((i + 1) * per * self.chunk).min(self.size);
        Layout {
            start,
            end,
            ..*self
        }
    }

    /// Number of chunks in the range.
    pub fn chunks(&self) -> u64 {
        (self.end - self.start).div_ceil(self.chunk)
    }

    /// Number of blocks in the range.
    pub fn blocks(&self) -> u64 {
        (self.end - self.start).div_ceil(self.block)
    }

    /// Byte offset and length of chunk `index` of the range.
    pub fn chunk_at(&self, index: u64) -> (u64, usize) {
        let offset = self.start + index * self.chunk;
        (offset, (self.end - offset).min(self.chunk) as usize)
    }
}

/// How the source half compares its blocks with the destination's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// The destination sends its bytes; compare them directly (one process only).
    Bytes,
    /// The destination sends block digests; the source hashes its blocks the same way.
    Digest(HashKind),
}

/// Settings shared by both halves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Chunks and blocks.
    pub layout: Layout,
    /// Bytes or digests.
    pub compare: Compare,
    /// Decide and report, write nothing.
    pub dry_run: bool,
    /// Sleep after each block (crude rate limit).
    pub pause: Duration,
    /// Drop read data from the page cache after use.
    pub drop_cache: bool,
    /// Buffers per reader pool.
    pub buffers: usize,
    /// The destination half counts progress (when the source half is on another machine).
    pub dest_progress: bool,
    /// Digests of this side hashed ahead (while ssh logged in), used instead of hashing.
    pub precomputed: Option<std::sync::Arc<prehash::Precomputed>>,
    /// Keep the destination thin: punch holes for zero ranges of files and treat a file
    /// destination's missing tail as zero. Off (`--no-sparse`): write real zeros.
    pub sparse: bool,
    /// Zero device ranges with BLKZEROOUT (`--discard`) rather than writing zeros.
    pub discard: bool,
    /// Sub-block size a changed block is narrowed down to (0: send it whole).
    pub refine: u64,
}

impl Config {
    /// Defaults for `layout`: byte comparison, four buffers per side.
    pub fn new(layout: Layout) -> Self {
        Config {
            layout,
            compare: Compare::Bytes,
            dry_run: false,
            pause: Duration::ZERO,
            drop_cache: false,
            buffers: 4,
            dest_progress: false,
            precomputed: None,
            sparse: true,
            discard: false,
            refine: 0,
        }
    }
}

/// Counters both halves update as they go; read by the progress display and the summary.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes read from the source.
    pub source_read: AtomicU64,
    /// Bytes read from the destination.
    pub dest_read: AtomicU64,
    /// Bytes written to the destination.
    pub written: AtomicU64,
    /// Blocks found equal.
    pub blocks_same: AtomicU64,
    /// Blocks found different (written, or to be written in a dry run).
    pub blocks_changed: AtomicU64,
    /// Bytes of the changed blocks (what a dry run would write).
    pub changed_bytes: AtomicU64,
    /// Source blocks that are all zero (holes included).
    pub blocks_zero: AtomicU64,
    /// Source blocks in holes: known zero without reading.
    pub blocks_hole: AtomicU64,
    /// Changed blocks sent as zero ranges (hole punched or zeros written), not data.
    pub blocks_zeroed: AtomicU64,
    /// Bytes sent over the link to the other machine.
    pub wire_sent: AtomicU64,
    /// Bytes received over the link.
    pub wire_received: AtomicU64,
    /// Of the bytes sent, block data frames.
    pub data_sent: AtomicU64,
    /// Of the bytes received, block data frames.
    pub data_received: AtomicU64,
    /// Of the bytes sent, digest frames.
    pub digests_sent: AtomicU64,
    /// Of the bytes received, digest frames.
    pub digests_received: AtomicU64,
    /// Source bytes compared so far (progress).
    pub done: AtomicU64,
}

impl Stats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Runs both halves in this process: `dest` is `None` only in a dry run onto a missing
/// destination. Returns when the destination has confirmed everything is flushed.
pub fn sync_local(
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
        debug_assert_eq!(config.compare, Compare::Bytes);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_covers_size_exactly() {
        let l = Layout::new(10 * CHUNK_TARGET + 5, 1 << 20);
        assert_eq!(l.chunks(), 11);
        assert_eq!(l.chunk_at(10), (10 * CHUNK_TARGET, 5));
        assert_eq!(l.blocks(), 10 * 4 + 1);
        let l = Layout::new(0, 4096);
        assert_eq!(l.chunks(), 0);
        let l = Layout::new(100, 8 << 20);
        assert_eq!(l.chunk, 8 << 20);
        assert_eq!(l.chunk_at(0), (0, 100));
    }

    #[test]
    fn parts_are_disjoint_and_cover() {
        for (size, n) in [
            (10 * CHUNK_TARGET + 5, 3),
            (CHUNK_TARGET, 4),
            (0, 2),
            (7, 1),
        ] {
            let whole = Layout::new(size, 4096);
            let mut next = 0;
            let mut blocks = 0;
            for i in 0..n {
                let p = whole.part(i, n);
                assert_eq!(p.start, next);
                assert_eq!(p.start % whole.chunk, 0);
                next = p.end;
                blocks += p.blocks();
            }
            assert_eq!(next, size);
            assert_eq!(blocks, whole.blocks());
        }
    }
}
