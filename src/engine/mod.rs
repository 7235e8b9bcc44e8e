//! The sync engine: a source half that reads, compares and decides what to send, and a
//! destination half that reads, writes and flushes. They talk only through
//! [`crate::wire::frame`] messages; [`sync_local`] runs both halves in one process.
//!
//! Both halves are pipelines: a reader thread per side fills pooled buffers a chunk
//! (several blocks) at a time, while the other threads compare and write, so reading,
//! comparing and writing overlap and memory stays bounded by the pools.

pub(crate) mod blockhash;
pub(crate) mod dest;
pub(crate) mod messages;
pub(crate) mod prehash;
pub(crate) mod salvage;
pub(crate) mod source;

use crate::error::Result;
use crate::hash::BlockInfo;
use crate::hash::HashKind;
use crate::io::target::Target;
use crossbeam_channel::bounded;
use messages::{FindingKind, ToDest, ToSource};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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

/// What the source does about unreadable sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Salvage {
    /// Give up (error) after this many unreadable ranges; `u64::MAX`: never.
    pub max_errors: u64,
    /// Leave the destination's old bytes where the source is unreadable, instead of zeros.
    pub keep_unreadable: bool,
}

impl Default for Salvage {
    fn default() -> Self {
        Salvage {
            max_errors: u64::MAX,
            keep_unreadable: false,
        }
    }
}

/// What the source read in the sync pass, kept for `--verify` to tell a destination that
/// differs from a source that changed under the sync.
#[derive(Debug)]
pub struct VerifyLog {
    /// The digest both sides use for the verify pass.
    pub kind: HashKind,
    /// Per chunk (by byte offset): a fingerprint of its block digests as read.
    read: Mutex<HashMap<u64, Digest128>>,
}

/// A 128-bit fingerprint.
type Digest128 = [u8; 16];

impl VerifyLog {
    /// An empty log for digests of `kind`.
    pub fn new(kind: HashKind) -> Arc<Self> {
        Arc::new(VerifyLog {
            kind,
            read: Mutex::new(HashMap::new()),
        })
    }

    /// The fingerprint of a chunk's blocks (digests at either strength: only the first
    /// 128 bits count, so a verify pass's full digests match the sync pass's).
    pub fn fingerprint(blocks: &[BlockInfo]) -> Digest128 {
        let mut h = blake3::Hasher::new();
        for b in blocks {
            match b {
                BlockInfo::Missing => h.update(&[0]),
                BlockInfo::Zero => h.update(&[1]),
                BlockInfo::Digest(d) => h.update(&[2]).update(&d.0[..crate::hash::BLOCK_DIGEST]),
            };
        }
        h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }

    /// Records what the chunk at `offset` held when the sync read it.
    pub fn record(&self, offset: u64, blocks: &[BlockInfo]) {
        let fp = Self::fingerprint(blocks);
        self.read.lock().expect("not poisoned").insert(offset, fp);
    }

    /// Whether the chunk at `offset` holds something else now than when the sync read it
    /// (`None`: the sync did not record it).
    pub fn changed(&self, offset: u64, now: &[BlockInfo]) -> Option<bool> {
        let fp = Self::fingerprint(now);
        let read = self.read.lock().expect("not poisoned");
        read.get(&offset).map(|then| *then != fp)
    }
}

/// Byte ranges the user must hear about, merged where adjacent.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    /// Source ranges that could not be read.
    pub unreadable: Vec<Range<u64>>,
    /// `--verify`: destination ranges that differ from the source.
    pub mismatch: Vec<Range<u64>>,
    /// `--verify`: source ranges that changed while the sync ran.
    pub source_changed: Vec<Range<u64>>,
}

impl Findings {
    /// Adds a range, merging it with the last one of its kind when they touch.
    pub fn add(&mut self, kind: FindingKind, offset: u64, len: u64) {
        let list = match kind {
            FindingKind::Unreadable => &mut self.unreadable,
            FindingKind::Mismatch => &mut self.mismatch,
            FindingKind::SourceChanged => &mut self.source_changed,
        };
        let r = offset..offset.saturating_add(len);
        match list.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => list.push(r),
        }
    }

    /// Total bytes of a list of ranges.
    pub fn bytes(list: &[Range<u64>]) -> u64 {
        list.iter().map(|r| r.end - r.start).sum()
    }

    /// Sorts and merges each list (parallel streams add their ranges interleaved).
    pub fn normalize(&mut self) {
        for list in [
            &mut self.unreadable,
            &mut self.mismatch,
            &mut self.source_changed,
        ] {
            list.sort_by_key(|r| r.start);
            let mut out: Vec<Range<u64>> = Vec::with_capacity(list.len());
            for r in list.drain(..) {
                match out.last_mut() {
                    Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                    _ => out.push(r),
                }
            }
            *list = out;
        }
    }
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
    /// Unreadable source sectors.
    pub salvage: Salvage,
    /// `--verify`: after the sync, a second pass compares both sides at full strength.
    pub verify: Option<Arc<VerifyLog>>,
    /// This is the verify pass: read (the destination from disk, not cache), hash at full
    /// strength, compare, write nothing.
    pub verify_pass: bool,
    /// `--digest-file` (source half): digests to compare against and to record.
    pub cache: Option<Arc<crate::digestfile::cache::Cache>>,
    /// The destination half reads the destination (off when a digest file stands in).
    pub dest_reads: bool,
    /// The destination half forgets its sync id before writing and records this one once
    /// the sync is flushed (see [`crate::digestfile::syncid`]).
    pub track: Option<crate::digestfile::syncid::SyncId>,
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
            salvage: Salvage::default(),
            verify: None,
            verify_pass: false,
            cache: None,
            dest_reads: true,
            track: None,
        }
    }

    /// Whether a verify pass follows this (successful) sync pass.
    pub fn verify_follows(&self) -> bool {
        self.verify.is_some() && !self.verify_pass && !self.dry_run
    }

    /// The settings of the verify pass that follows this sync pass.
    pub fn for_verify(&self) -> Config {
        let kind = self.verify.as_ref().map_or(HashKind::Blake3, |v| v.kind);
        Config {
            compare: Compare::Digest(kind),
            dry_run: true,
            pause: Duration::ZERO,
            precomputed: None,
            refine: 0,
            verify_pass: true,
            cache: None,
            dest_reads: true,
            track: None,
            ..self.clone()
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
    /// Bytes compared at full strength by `--verify`.
    pub verified: AtomicU64,
    /// Unreadable, mismatched and changed ranges.
    pub findings: Mutex<Findings>,
    /// The other machine's half failed (its reason), seen by the link before the source
    /// half reaches it in the stream: the source half stops at once instead of working
    /// through the reports queued ahead of it.
    pub peer_failed: Mutex<Option<(crate::error::Kind, String)>>,
}

impl Stats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Records a finding.
    pub fn found(&self, kind: FindingKind, offset: u64, len: u64) {
        let mut f = self.findings.lock().expect("not poisoned");
        f.add(kind, offset, len);
    }

    /// The peer's failure, if the link has seen one.
    pub fn peer_failure(&self) -> Option<crate::error::Error> {
        let f = self.peer_failed.lock().expect("not poisoned");
        f.as_ref()
            .map(|(k, m)| crate::error::Error::new(*k, m.clone()))
    }

    /// The findings so far, sorted and merged.
    pub fn findings(&self) -> Findings {
        let mut f = self.findings.lock().expect("not poisoned").clone();
        f.normalize();
        f
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
