//! The source's reader threads: each claims the next chunk, reads its blocks that are not
//! holes (reading around unreadable sectors), marks its zero blocks, and hands it on.

use super::Chunk;
use crate::engine::messages::FindingKind;
use crate::engine::salvage::{self, Salvager};
use crate::engine::{Compare, Config, Stats};
use crate::error::{Error, Kind, Result};
use crate::hash::{BlockInfo, HashKind};
use crate::io::pool::{Buf, Pool, Slice};
use crate::io::target::{self, Advice, Extents, Target};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What the source's reader threads share. Usually one thread reads; when a digest file
/// stands in for the destination, the run is all reading and hashing, so two threads each
/// read a chunk and hash it while it is still in the CPU's caches.
pub(super) struct Readers<'a> {
    src: &'a Target,
    config: &'a Config,
    stats: &'a Stats,
    cancel: &'a AtomicBool,
    /// The buffers chunks are read into.
    pool: Pool,
    /// Set once the compare is done: readers stop, also while waiting for a buffer.
    pub(super) stop: AtomicBool,
    /// The next chunk to claim.
    next: AtomicU64,
    /// Threads reading.
    pub(super) threads: usize,
    /// Hash chunks on the reading thread with this digest.
    hash: Option<HashKind>,
}

impl<'a> Readers<'a> {
    pub(super) fn new(
        src: &'a Target,
        config: &'a Config,
        stats: &'a Stats,
        cancel: &'a AtomicBool,
    ) -> Self {
        // A digest file stands in for the destination: the run is reading and hashing.
        let cached = config.cache.as_ref().is_some_and(|c| c.old.is_some());
        Readers {
            src,
            config,
            stats,
            cancel,
            pool: Pool::new(config.buffers, config.layout.chunk as usize),
            stop: AtomicBool::new(false),
            next: AtomicU64::new(0),
            // A stream is read in order by one thread.
            threads: if cached && config.stream.is_none() {
                2
            } else {
                1
            },
            hash: match config.compare {
                Compare::Digest(k) if cached => Some(k),
                _ => None,
            },
        }
    }

    /// One reader thread: claims and reads chunks until none is left, the run stops, or a
    /// read fails (the failure is the last thing it sends).
    pub(super) fn read_source(&self, out: crate::io::queue::Sender<Result<Chunk>>) {
        let layout = self.config.layout;
        let mut thread = ReadThread {
            readers: self,
            extents: Extents::new(&self.src.file, self.src.kind),
            salvager: None,
        };
        loop {
            if self.cancel.load(Ordering::Relaxed) || self.stop.load(Ordering::Relaxed) {
                return;
            }
            // With several readers a buffer is taken before a chunk is claimed: the lowest
            // chunk not yet delivered then always has its buffer, so the compare, which takes
            // chunks in order, never waits for one that waits for a buffer.
            let held = match self.threads {
                1 => None,
                _ => match self.pool.get_unless(layout.chunk as usize, &self.stop) {
                    Some(b) => Some(b),
                    None => return,
                },
            };
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= layout.chunks() {
                return;
            }
            let Some(item) = thread.chunk(index, held) else {
                return; // stopped while waiting for a buffer
            };
            let failed = item.is_err();
            let stream = self.config.stream.as_ref();
            if let Some(stream) = stream.filter(|s| s.end().is_none()) {
                // Known before the last chunk goes, so the compare sees it with it.
                if index + 1 == layout.chunks() && more_in(self.src) {
                    stream.went_on();
                }
            }
            if out.send(item).is_err() || failed {
                return;
            }
            if stream.is_some_and(|s| s.end().is_some()) {
                return; // nothing follows the end
            }
        }
    }
}

/// One reader thread's own state.
struct ReadThread<'a> {
    readers: &'a Readers<'a>,
    extents: Option<Extents<'a>>,
    salvager: Option<Salvager<'a>>,
}

impl ReadThread<'_> {
    /// Chunk `index`, read into `held` or a buffer from the pool; `None` when the run
    /// stopped while waiting for one.
    fn chunk(&mut self, index: u64, held: Option<Buf>) -> Option<Result<Chunk>> {
        let r = self.readers;
        let layout = r.config.layout;
        let (offset, len) = layout.chunk_at(index);
        let nblocks = len.div_ceil(layout.block as usize);
        let ahead = r.config.precomputed.as_ref().and_then(|p| p.get(offset));
        if let Some(ahead) = ahead.filter(|a| a.len() == nblocks) {
            let zeros: Vec<bool> = ahead.iter().map(|b| *b == BlockInfo::Zero).collect();
            count_zeros(r.stats, &zeros);
            // Its holes were skipped when it was hashed ahead: still holes not read.
            let holes = r.config.precomputed.as_ref().and_then(|p| p.holes(offset));
            Stats::add(&r.stats.blocks_hole, holes.unwrap_or(0));
            return Some(Ok(Chunk::unread(index, zeros)));
        }
        // Blocks wholly in holes are zero without reading them (a stream has none).
        let data_ranges = self
            .extents
            .as_mut()
            .filter(|_| r.config.stream.is_none())
            .map(|e| e.data_in(offset..offset + len as u64));
        let zeros = match &data_ranges {
            Some(d) => target::hole_blocks(d, offset, len, layout.block),
            None => vec![false; nblocks],
        };
        let holes = zeros.iter().filter(|&&z| z).count();
        if !r.config.verify_pass {
            Stats::add(&r.stats.blocks_hole, holes as u64);
        }
        let item = if holes == nblocks {
            Ok(Chunk::unread(index, zeros))
        } else {
            let data = match held {
                Some(mut b) => {
                    b.truncate(len);
                    b
                }
                None => r.pool.get_unless(len, &r.stop)?,
            };
            self.read_data(index, data, zeros, data_ranges.as_deref())
        };
        if let Ok(c) = &item
            && !r.config.verify_pass
        {
            count_zeros(r.stats, &c.zeros);
        }
        Some(item)
    }

    /// Reads the chunk at `index` into `data` (`zeros`: its holes, `ranges`: its data,
    /// when known). Its unreadable ranges are recorded and counted by the compare, which
    /// takes chunks in order (readers finish them in any order); only a chunk whose read
    /// failed, which never gets there, has its ranges recorded here.
    fn read_data(
        &mut self,
        index: u64,
        mut data: Buf,
        mut zeros: Vec<bool>,
        ranges: Option<&[Range<u64>]>,
    ) -> Result<Chunk> {
        let r = self.readers;
        let (config, stats) = (r.config, r.stats);
        let (offset, len) = config.layout.chunk_at(index);
        let mut bad = Vec::new();
        let n = match self.read_blocks(offset, &mut data, &mut zeros, ranges, &mut bad) {
            Ok(n) if config.stream.is_some() => {
                // The stream may have ended in this chunk: only what it held.
                data.truncate(n as usize);
                zeros.truncate((n as usize).div_ceil(config.layout.block as usize));
                n
            }
            Ok(n) => n,
            Err(e) => {
                if !config.verify_pass {
                    // So a run that fails still reports what it found.
                    record_unreadable(stats, offset, &bad);
                }
                return Err(e);
            }
        };
        Stats::add(&stats.source_read, n);
        if config.drop_cache {
            target::advise(&r.src.file, offset, len as u64, Advice::DontNeed);
        }
        let block = config.layout.block as usize;
        let infos = r
            .hash
            .map(|k| crate::engine::blockhash::hash_blocks(k, &data, len, block, &zeros, false));
        Ok(Chunk {
            index,
            data: Some(data),
            zeros,
            bad,
            infos,
        })
    }

    /// Reads the blocks of a chunk that are not holes into `data`, reading around
    /// unreadable sectors (zero-filled and added to `bad`), then marks which blocks are
    /// zero. Returns the bytes read.
    fn read_blocks(
        &mut self,
        offset: u64,
        data: &mut [u8],
        zeros: &mut [bool],
        extents: Option<&[Range<u64>]>,
        bad: &mut Vec<Range<usize>>,
    ) -> Result<u64> {
        let src = self.readers.src;
        let block = self.readers.config.layout.block as usize;
        if let Some(stream) = &self.readers.config.stream {
            return read_stream(src, stream, (offset, block), data, zeros);
        }
        let holes = zeros.to_vec();
        let fail = |at: u64, e: &std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => shrank(src, at),
            _ => read_error(src, at, e),
        };
        let read = match target::read_blocks_at(&src.file, data, offset, block, &holes, extents) {
            Ok(n) => n,
            Err((_, e)) if salvage::is_media_error(&e) => {
                // Again block by block, splitting failed reads down to single sectors.
                let s = self.salvager.get_or_insert_with(|| Salvager::new(src));
                let mut n = 0;
                for (j, &hole) in holes.iter().enumerate() {
                    let r = j * block..((j + 1) * block).min(data.len());
                    if hole || r.is_empty() {
                        continue;
                    }
                    let at = offset + r.start as u64;
                    s.read(&mut data[r.clone()], at, r.start, bad)
                        .map_err(|e| fail(at, &e))?;
                    n += r.len() as u64;
                }
                n
            }
            Err((at, e)) => return Err(fail(at, &e)),
        };
        for (k, z) in zeros.iter_mut().enumerate() {
            if !*z {
                *z = target::is_zero(&data[k * block..((k + 1) * block).min(data.len())]);
            }
        }
        Ok(read)
    }
}

/// Reads a stream's next `data.len()` bytes (the chunk at `offset`) and marks its zero
/// blocks; at the stream's end, records its length. Returns the bytes read.
fn read_stream(
    src: &Target,
    stream: &crate::engine::StreamEnd,
    (offset, block): (u64, usize),
    data: &mut [u8],
    zeros: &mut [bool],
) -> Result<u64> {
    use std::io::Read;
    let mut got = 0;
    while got < data.len() {
        match (&src.file).read(&mut data[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(src, offset + got as u64, &e)),
        }
    }
    if got < data.len() {
        stream.ended_at(offset + got as u64);
    }
    for (k, z) in zeros.iter_mut().enumerate() {
        let r = (k * block).min(got)..((k + 1) * block).min(got);
        *z = target::is_zero(&data[r]);
    }
    Ok(got as u64)
}

/// Whether a stream holds more bytes (one is read: only asked once the layout is done).
fn more_in(src: &Target) -> bool {
    use std::io::Read;
    let mut one = [0u8; 1];
    loop {
        match (&src.file).read(&mut one) {
            Ok(n) => return n > 0,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// The error of a stream longer than the device it is synced onto.
pub(super) fn stream_too_long(src: &Target, size: u64) -> Error {
    Error::new(
        Kind::TooSmall,
        format!(
            "{} holds more than the destination's {size} bytes: those were synced and flushed, the rest of the stream was not; give a larger destination",
            src.path.display()
        ),
    )
}

/// The unreadable areas met so far, for `--max-errors`: a range continuing the previous
/// chunk's last one is the same area.
#[derive(Debug)]
pub(super) struct ErrorCount {
    areas: u64,
    last_end: u64,
}

impl Default for ErrorCount {
    fn default() -> Self {
        ErrorCount {
            areas: 0,
            last_end: u64::MAX,
        }
    }
}

impl ErrorCount {
    /// Adds the unreadable ranges `bad` (ascending) of the chunk at `offset`, which must
    /// follow the chunk added last; returns the areas counted so far.
    pub(super) fn add(&mut self, offset: u64, bad: &[Range<usize>]) -> u64 {
        for r in bad {
            let (s, e) = (offset + r.start as u64, offset + r.end as u64);
            if s != self.last_end {
                self.areas += 1;
            }
            self.last_end = e;
        }
        self.areas
    }
}

/// The error of a run that met more than `max` unreadable areas.
pub(super) fn too_many_errors(src: &Target, areas: u64, max: u64) -> Error {
    Error::new(
        Kind::Source,
        format!(
            "source {}: gave up after {areas} unreadable areas (--max-errors {max}); what was copied is flushed",
            src.path.display(),
        ),
    )
}

/// Records the unreadable ranges `bad` of the chunk at `offset` as findings.
pub(super) fn record_unreadable(stats: &Stats, offset: u64, bad: &[Range<usize>]) {
    for b in bad {
        let at = offset + b.start as u64;
        stats.found(FindingKind::Unreadable, at, b.len() as u64);
    }
}

/// Adds the zero blocks of a chunk to the counters.
fn count_zeros(stats: &Stats, zeros: &[bool]) {
    Stats::add(
        &stats.blocks_zero,
        zeros.iter().filter(|&&z| z).count() as u64,
    );
}

fn shrank(src: &Target, at: u64) -> Error {
    Error::new(
        Kind::Source,
        format!(
            "source {} shrank during the sync (short read at byte {at}); sync from a snapshot or a read-only source",
            src.path.display()
        ),
    )
}

fn read_error(src: &Target, at: u64, e: &std::io::Error) -> Error {
    Error::io(
        Kind::Io,
        "reading source",
        &src.path,
        e,
        &format!("at byte {at}"),
    )
}

/// Reads a changed range of a chunk whose bytes were not kept.
pub(super) fn read_range(src: &Target, offset: u64, len: usize, stats: &Stats) -> Result<Slice> {
    let mut buf = vec![0u8; len];
    match target::read_full_at(&src.file, &mut buf, offset) {
        Ok(n) if n == len => {
            Stats::add(&stats.source_read, len as u64);
            Ok(Slice::owned(buf))
        }
        Ok(n) => Err(shrank(src, offset + n as u64)),
        Err(e) => Err(read_error(src, offset, &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_count_merges_ranges_that_continue_across_chunks() {
        let mut c = ErrorCount::default();
        assert_eq!(c.add(0, &[]), 0);
        // Two areas in the first chunk (1000 bytes), the second running to its end.
        assert_eq!(c.add(0, &[10..20, 900..1000]), 2);
        // The next chunk starts with that area's continuation, then a new one.
        assert_eq!(c.add(1000, &[0..5, 50..60]), 3);
        // A chunk without bad ranges breaks nothing; one starting later is a new area.
        assert_eq!(c.add(2000, &[]), 3);
        assert_eq!(c.add(3000, std::slice::from_ref(&(0..1))), 4);
        // A range starting where the last ended, inside one chunk, continues it too
        // (the salvager merges those, this counts them once either way).
        assert_eq!(c.add(4000, &[0..1, 1..2]), 5);
    }

    #[test]
    fn error_count_starts_a_first_area_at_byte_zero() {
        // `last_end` starts at no byte a range can start at, so an area at 0 counts.
        let mut c = ErrorCount::default();
        assert_eq!(c.add(0, std::slice::from_ref(&(0..512))), 1);
    }
}
