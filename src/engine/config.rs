//! The settings both halves run with, built in one place from what a run asks for.

use super::Layout;
use super::VerifyLog;
use crate::hash::HashKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

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
    pub precomputed: Option<Arc<super::prehash::Precomputed>>,
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
    /// The destination half keeps an undo journal of what it overwrites.
    pub journal: Option<crate::journal::Plan>,
    /// A new file written under a temporary name: the name it takes once complete.
    pub rename_to: Option<std::path::PathBuf>,
    /// With several streams writing that file: which this one is (the last to complete
    /// renames it).
    pub share: Option<crate::io::partial::Share>,
    /// The source is a stream (standard input), read once from start to end: where it
    /// ended, once it has (see [`StreamEnd`]).
    pub stream: Option<Arc<StreamEnd>>,
}

/// Where a stream source ended. Its size is known only at its end, so the run's layout
/// is an upper bound (a device's size, or a large one for a file) and the source half
/// stops at the chunk the stream ended in.
#[derive(Debug)]
pub struct StreamEnd {
    /// The stream's length once its end was read (`u64::MAX` until then).
    end: AtomicU64,
    /// The stream went on past the layout's end (a device too small for it).
    longer: AtomicBool,
}

impl Default for StreamEnd {
    fn default() -> Self {
        StreamEnd {
            end: AtomicU64::new(u64::MAX),
            longer: AtomicBool::new(false),
        }
    }
}

impl StreamEnd {
    /// The stream's length, once its end has been read.
    pub fn end(&self) -> Option<u64> {
        let e = self.end.load(Ordering::SeqCst);
        (e != u64::MAX).then_some(e)
    }

    /// The stream's size as far as the run got: its length, or what was read of it (a
    /// run that stopped early, or one that filled a device).
    pub fn size(&self, stats: &super::Stats) -> u64 {
        self.end()
            .unwrap_or_else(|| super::Stats::get(&stats.source_read))
    }

    /// The stream ended after `len` bytes.
    pub fn ended_at(&self, len: u64) {
        self.end.store(len, Ordering::SeqCst);
    }

    /// The stream holds more than the layout's end.
    pub fn went_on(&self) {
        self.longer.store(true, Ordering::SeqCst);
    }

    /// Whether it held more than the layout's end.
    pub fn is_longer(&self) -> bool {
        self.longer.load(Ordering::SeqCst)
    }
}

/// What a run asks of the engine, the same for each of its streams and on both machines:
/// built from the command line (a local run, a client) or from the handshake (a server).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Bytes or digests.
    pub compare: Compare,
    /// Decide and report, write nothing.
    pub dry_run: bool,
    /// Sleep after each block.
    pub pause: Duration,
    /// Drop read data from this machine's page cache after use.
    pub drop_cache: bool,
    /// Punch holes / treat a file's missing tail as zero (off: `--no-sparse`).
    pub sparse: bool,
    /// Zero device ranges with BLKZEROOUT.
    pub discard: bool,
    /// Sub-block size for refinement (0: off).
    pub refine: u64,
    /// Unreadable source sectors.
    pub salvage: Salvage,
    /// `--verify`: the log shared by the run's streams.
    pub verify: Option<Arc<VerifyLog>>,
}

impl Default for RunOptions {
    /// Compare bytes, write, keep the destination sparse: a plain local sync.
    fn default() -> Self {
        RunOptions {
            compare: Compare::Bytes,
            dry_run: false,
            pause: Duration::ZERO,
            drop_cache: false,
            sparse: true,
            discard: false,
            refine: 0,
            salvage: Salvage::default(),
            verify: None,
        }
    }
}

/// Buffers per pool: about 16 MiB in flight per side, at least two chunks.
fn buffers_for(chunk: u64) -> usize {
    ((16u64 << 20) / chunk).clamp(2, 8) as usize
}

impl Config {
    /// The settings of one stream over `layout`; what is particular to a run (hashed
    /// ahead, digest file, progress on the destination side) is set by the caller.
    pub fn build(layout: Layout, run: &RunOptions) -> Self {
        Config {
            layout,
            compare: run.compare,
            dry_run: run.dry_run,
            pause: run.pause,
            drop_cache: run.drop_cache,
            buffers: buffers_for(layout.chunk),
            dest_progress: false,
            precomputed: None,
            sparse: run.sparse,
            discard: run.discard,
            refine: run.refine,
            salvage: run.salvage,
            verify: run.verify.clone(),
            verify_pass: false,
            cache: None,
            dest_reads: true,
            track: None,
            journal: None,
            rename_to: None,
            share: None,
            stream: None,
        }
    }

    /// Byte offset and length of chunk `index`: the layout's, cut where a stream source
    /// ended.
    pub fn chunk_at(&self, index: u64) -> (u64, usize) {
        let (offset, len) = self.layout.chunk_at(index);
        match self.stream.as_ref().and_then(|s| s.end()) {
            Some(end) => (offset, end.saturating_sub(offset).min(len as u64) as usize),
            None => (offset, len),
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
            journal: None,
            rename_to: None,
            share: None,
            stream: None,
            ..self.clone()
        }
    }
}
