//! The source half: reads the source a chunk at a time on its own thread (skipping holes,
//! spotting zero blocks), compares each block with what the destination half reports,
//! and sends the changed ranges: data, or a tiny zero message for zero blocks.

use super::messages::{Counts, FindingKind, ToDest, ToSource};
use super::salvage::{self, Salvager};
use super::{Compare, Config, Stats};
use crate::error::{Error, Kind, Result};
use crate::hash::BlockInfo;
use crate::io::pool::{Buf, Pool, Slice};
use crate::io::target::{self, Advice, Extents, Target};
use crossbeam_channel::{Receiver, Sender, bounded};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One chunk of the source.
struct Chunk {
    index: u64,
    /// The bytes, or `None` when nothing had to be read (all holes, or hashed ahead);
    /// then changed data blocks are read when sent. Bytes of zero blocks may be unread.
    data: Option<Buf>,
    /// Per block: all zero (a hole, or read and found zero).
    zeros: Vec<bool>,
    /// Unreadable byte ranges of the chunk (zero-filled in `data`), ascending.
    bad: Vec<Range<usize>>,
    /// Its blocks' digests, when the reader hashed them (see [`Readers`]).
    infos: Option<Vec<BlockInfo>>,
}

/// What the source's reader threads share. Usually one thread reads; when a digest file
/// stands in for the destination, the run is all reading and hashing, so two threads each
/// read a chunk and hash it while it is still in the CPU's caches.
struct Readers {
    /// The next chunk to claim.
    next: std::sync::atomic::AtomicU64,
    /// Threads reading.
    threads: usize,
    /// Hash chunks on the reading thread with this digest.
    hash: Option<crate::hash::HashKind>,
    errors: std::sync::Mutex<ErrorCount>,
}

/// The source half's counters now.
fn counts(stats: &Stats) -> Counts {
    Counts {
        read: Stats::get(&stats.source_read),
        same: Stats::get(&stats.blocks_same),
        changed: Stats::get(&stats.blocks_changed),
        changed_bytes: Stats::get(&stats.changed_bytes),
        zero: Stats::get(&stats.blocks_zero),
        holes: Stats::get(&stats.blocks_hole),
        zeroed: Stats::get(&stats.blocks_zeroed),
    }
}

/// What was counted since `before` (a verify pass reports only its own reads).
fn counts_since(now: Counts, before: Counts) -> Counts {
    Counts {
        read: now.read - before.read,
        same: now.same - before.same,
        changed: now.changed - before.changed,
        changed_bytes: now.changed_bytes - before.changed_bytes,
        zero: now.zero - before.zero,
        holes: now.holes - before.holes,
        zeroed: now.zeroed - before.zeroed,
    }
}

fn lost_destination() -> Error {
    Error::new(
        Kind::Internal,
        "the destination half stopped without saying why",
    )
}

/// The destination stopped taking messages: find out why from what it (or the link
/// carrying it) last said, waiting a while for that to arrive over a slow link.
fn why_gone(from_dest: &Receiver<ToSource>) -> Error {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while let Ok(msg) = from_dest.recv_deadline(deadline) {
        if let ToSource::Failed { kind, message } = msg {
            return Error::new(kind, message);
        }
    }
    lost_destination()
}

/// Runs the source half until the destination confirms the flush, or fails.
pub fn run(
    src: &Target,
    config: &Config,
    to_dest: Sender<ToDest>,
    from_dest: Receiver<ToSource>,
    stats: &Stats,
    cancel: &AtomicBool,
) -> Result<()> {
    let layout = config.layout;
    let pool = Pool::new(config.buffers, layout.chunk as usize);
    target::advise(&src.file, 0, 0, Advice::Sequential);
    let before = counts(stats);
    if config.verify_pass {
        stats.done.store(0, Ordering::Relaxed); // the progress starts over
    }
    // A digest file stands in for the destination: the run is reading and hashing.
    let cached = config.cache.as_ref().is_some_and(|c| c.old.is_some());
    let readers = Readers {
        next: std::sync::atomic::AtomicU64::new(0),
        threads: if cached { 2 } else { 1 },
        hash: match config.compare {
            Compare::Digest(k) if cached => Some(k),
            _ => None,
        },
        errors: std::sync::Mutex::new(ErrorCount {
            ranges: 0,
            last_end: u64::MAX,
        }),
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (chunk_tx, chunk_rx) = bounded::<Result<Chunk>>(super::REPORTS_IN_FLIGHT);
        let stop = &stop;
        let readers = &readers;
        for _ in 0..readers.threads {
            let (pool, chunk_tx) = (&pool, chunk_tx.clone());
            s.spawn(move || read_source(src, config, pool, chunk_tx, stats, cancel, stop, readers));
        }
        drop(chunk_tx);
        let outcome = compare_and_send(src, config, &chunk_rx, &to_dest, &from_dest, stats, cancel);
        // Stop the reader, which may be waiting for buffers that queued chunks hold.
        stop.store(true, Ordering::Relaxed);
        drop(chunk_rx);
        let end = match &outcome {
            Ok(()) => ToDest::Finish {
                size: layout.size,
                counts: counts_since(counts(stats), before),
            },
            Err(e) => ToDest::Abort {
                kind: e.kind,
                message: e.message.clone(),
            },
        };
        if to_dest.send(end).is_err() {
            return outcome.and(Err(why_gone(&from_dest)));
        }
        drop(to_dest);
        let confirmed = wait_done(&from_dest);
        // The first error is the cause; a failed flush after it is a consequence.
        outcome?;
        confirmed
    })
}

fn wait_done(from_dest: &Receiver<ToSource>) -> Result<()> {
    loop {
        match from_dest.recv() {
            Ok(ToSource::Done { .. }) => return Ok(()),
            Ok(ToSource::Failed { kind, message }) => return Err(Error::new(kind, message)),
            Ok(_) => continue, // read-ahead the destination sent before it saw the end
            Err(_) => return Err(lost_destination()),
        }
    }
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

/// Reads the blocks of a chunk that are not holes into `data`, reading around
/// unreadable sectors (zero-filled and added to `bad`), then marks which blocks are zero.
/// Returns the bytes read.
#[allow(clippy::too_many_arguments)]
fn read_blocks<'a>(
    src: &'a Target,
    offset: u64,
    block: usize,
    data: &mut [u8],
    zeros: &mut [bool],
    extents: Option<&[Range<u64>]>,
    salvager: &mut Option<Salvager<'a>>,
    bad: &mut Vec<Range<usize>>,
) -> Result<u64> {
    let holes = zeros.to_vec();
    let fail = |at: u64, e: &std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => shrank(src, at),
        _ => read_error(src, at, e),
    };
    let read = match target::read_blocks_at(&src.file, data, offset, block, &holes, extents) {
        Ok(n) => n,
        Err((_, e)) if salvage::is_media_error(&e) => {
            // Again block by block, splitting failed reads down to single sectors.
            let s = salvager.get_or_insert_with(|| Salvager::new(src));
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

/// The unreadable ranges of a chunk as absolute ranges, checked against `--max-errors`
/// (a range continuing the previous chunk's last one counts once).
struct ErrorCount {
    ranges: u64,
    last_end: u64,
}

impl ErrorCount {
    fn add(
        &mut self,
        src: &Target,
        config: &Config,
        offset: u64,
        bad: &[Range<usize>],
    ) -> Result<()> {
        for r in bad {
            let (s, e) = (offset + r.start as u64, offset + r.end as u64);
            if s != self.last_end {
                self.ranges += 1;
            }
            self.last_end = e;
        }
        if self.ranges > config.salvage.max_errors {
            return Err(Error::new(
                Kind::Source,
                format!(
                    "source {}: gave up after {} unreadable areas (--max-errors {}); what was copied is flushed",
                    src.path.display(),
                    self.ranges,
                    config.salvage.max_errors
                ),
            ));
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn read_source(
    src: &Target,
    config: &Config,
    pool: &Pool,
    out: Sender<Result<Chunk>>,
    stats: &Stats,
    cancel: &AtomicBool,
    stop: &AtomicBool,
    readers: &Readers,
) {
    let layout = config.layout;
    let block = layout.block as usize;
    let mut extents = Extents::new(&src.file, src.kind);
    let mut salvager = None;
    loop {
        if cancel.load(Ordering::Relaxed) || stop.load(Ordering::Relaxed) {
            return;
        }
        // With several readers a buffer is taken before a chunk is claimed: the lowest
        // chunk not yet delivered then always has its buffer, so the compare, which takes
        // chunks in order, never waits for one that waits for a buffer.
        let mut held = match readers.threads {
            1 => None,
            _ => match pool.get_unless(layout.chunk as usize, stop) {
                Some(b) => Some(b),
                None => return,
            },
        };
        let index = readers.next.fetch_add(1, Ordering::Relaxed);
        if index >= layout.chunks() {
            return;
        }
        let (offset, len) = layout.chunk_at(index);
        let nblocks = len.div_ceil(block);
        let ahead = config.precomputed.as_ref().and_then(|p| p.get(offset));
        if let Some(ahead) = ahead.filter(|a| a.len() == nblocks) {
            let zeros: Vec<bool> = ahead.iter().map(|b| *b == BlockInfo::Zero).collect();
            count_zeros(stats, &zeros);
            if out
                .send(Ok(Chunk {
                    index,
                    data: None,
                    zeros,
                    bad: Vec::new(),
                    infos: None,
                }))
                .is_err()
            {
                return;
            }
            continue;
        }
        // Blocks wholly in holes are zero without reading them.
        let data_ranges = extents
            .as_mut()
            .map(|e| e.data_in(offset..offset + len as u64));
        let mut zeros = match &data_ranges {
            Some(d) => target::hole_blocks(d, offset, len, layout.block),
            None => vec![false; nblocks],
        };
        let holes = zeros.iter().filter(|&&z| z).count();
        if !config.verify_pass {
            Stats::add(&stats.blocks_hole, holes as u64);
        }
        let item = if holes == nblocks {
            Ok(Chunk {
                index,
                data: None,
                zeros,
                bad: Vec::new(),
                infos: None,
            })
        } else {
            let mut data = match held.take() {
                Some(mut b) => {
                    b.truncate(len);
                    b
                }
                None => match pool.get_unless(len, stop) {
                    Some(b) => b,
                    None => return,
                },
            };
            let ranges = data_ranges.as_deref();
            let mut bad = Vec::new();
            let res = read_blocks(
                src,
                offset,
                block,
                &mut data,
                &mut zeros,
                ranges,
                &mut salvager,
                &mut bad,
            );
            if !config.verify_pass {
                // Recorded here, so a run that gives up still reports what it found.
                for r in &bad {
                    let at = offset + r.start as u64;
                    stats.found(FindingKind::Unreadable, at, r.len() as u64);
                }
            }
            res.and_then(|n| {
                let mut errors = readers.errors.lock().expect("not poisoned");
                errors.add(src, config, offset, &bad)?;
                Ok(n)
            })
            .map(|n| {
                Stats::add(&stats.source_read, n);
                if config.drop_cache {
                    target::advise(&src.file, offset, len as u64, Advice::DontNeed);
                }
                let infos = readers
                    .hash
                    .map(|k| super::prehash::infos_at(k, &data, len, block, &zeros, false));
                Chunk {
                    index,
                    data: Some(data),
                    zeros,
                    bad,
                    infos,
                }
            })
        };
        if let Ok(c) = &item
            && !config.verify_pass
        {
            count_zeros(stats, &c.zeros);
        }
        let failed = item.is_err();
        if out.send(item).is_err() || failed {
            return;
        }
    }
}

/// Adds the zero blocks of a chunk to the counters.
fn count_zeros(stats: &Stats, zeros: &[bool]) {
    Stats::add(
        &stats.blocks_zero,
        zeros.iter().filter(|&&z| z).count() as u64,
    );
}

/// How a changed run of blocks is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Send {
    /// The source's bytes.
    Data,
    /// A zero range: the source blocks are all zero.
    Zero,
    /// The source's bytes over destination blocks known zero: all-zero pages inside
    /// can be left out, keeping a sparse destination thin.
    DataOverZero,
    /// Blocks that differ from the destination's: ask for its sub-block digests first,
    /// so only the changed pieces cross (see [`Refiner`]).
    Refine,
}

/// Granularity of the zero pages left out of [`Send::DataOverZero`] runs: the usual
/// filesystem block.
const PAGE: usize = 4096;

/// The non-zero pages of `data`, as ranges of it.
fn nonzero_pages(data: &[u8]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, page) in data.chunks(PAGE).enumerate() {
        if target::is_zero(page) {
            continue;
        }
        let r = i * PAGE..i * PAGE + page.len();
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// What to send for one chunk.
#[derive(Default)]
struct Changes {
    /// Byte ranges within the chunk, merged where adjacent and sent the same way.
    ranges: Vec<(Range<usize>, Send)>,
    /// Blocks that differ.
    blocks: u64,
    /// Of those, blocks sent as zero ranges.
    zeroed: u64,
}

impl Changes {
    fn push(&mut self, r: Range<usize>, how: Send) {
        match self.ranges.last_mut() {
            Some((last, h)) if last.end == r.start && *h == how && how != Send::Refine => {
                last.end = r.end
            }
            _ => self.ranges.push((r, how)),
        }
    }
}

/// A block both sides hold in one process, differing: only its changed sub-blocks are
/// written (or all of it when most differ).
fn refine_bytes(changes: &mut Changes, config: &Config, mine: &[u8], theirs: &[u8], at: usize) {
    let piece = config.refine as usize;
    if piece == 0 || piece >= mine.len() {
        changes.push(at..at + mine.len(), Send::Data);
        return;
    }
    let differ: Vec<usize> = (0..mine.len().div_ceil(piece))
        .filter(|&i| {
            let r = i * piece..((i + 1) * piece).min(mine.len());
            mine[r.clone()] != theirs[r]
        })
        .collect();
    if differ.len() * 2 > mine.len().div_ceil(piece) {
        changes.push(at..at + mine.len(), Send::Data);
        return;
    }
    for i in differ {
        let r = i * piece..((i + 1) * piece).min(mine.len());
        changes.push(at + r.start..at + r.end, Send::Data);
    }
}

/// Which blocks of a chunk differ and how to send them.
fn changed_ranges(
    config: &Config,
    chunk: &Chunk,
    theirs: &ToSource,
    mine: Option<&[BlockInfo]>,
) -> Changes {
    let block = config.layout.block as usize;
    let (offset, len) = config.layout.chunk_at(chunk.index);
    let ahead = mine.or_else(|| config.precomputed.as_ref().and_then(|p| p.get(offset)));
    let mine = |r: &Range<usize>| -> &[u8] {
        &chunk
            .data
            .as_ref()
            .expect("data blocks are read unless hashed ahead")[r.clone()]
    };
    let refine = config.refine > 0 && (config.refine as usize) < block;
    let mut changes = Changes::default();
    for (j, &zero) in chunk.zeros.iter().enumerate() {
        let r = j * block..((j + 1) * block).min(len);
        let bad = overlapping(&chunk.bad, &r);
        if !bad.is_empty() && config.salvage.keep_unreadable {
            // Only the readable parts go; the destination keeps its old bytes in the rest.
            changes.blocks += 1;
            let mut at = r.start;
            for b in bad.iter().chain(std::iter::once(&(r.end..r.end))) {
                if b.start > at {
                    changes.push(at..b.start, Send::Data);
                }
                at = at.max(b.end);
            }
            continue;
        }
        let change = match theirs {
            ToSource::Bytes { data, zeros, .. } => {
                let their_zero = zeros.get(j) == Some(&true);
                match (zero, their_zero) {
                    (true, true) => None,
                    (true, false) => match data.get(r.clone()) {
                        Some(b) if target::is_zero(b) => None,
                        _ => Some(Send::Zero),
                    },
                    (false, true) if config.sparse => Some(Send::DataOverZero),
                    (false, true) => Some(Send::Data),
                    (false, false) => match data.get(r.clone()) {
                        Some(b) if b == mine(&r) => None,
                        Some(b) => {
                            changes.blocks += 1;
                            refine_bytes(&mut changes, config, mine(&r), b, r.start);
                            continue;
                        }
                        None => Some(Send::Data),
                    },
                }
            }
            ToSource::Digests { blocks, .. } => {
                let theirs = blocks.get(j).copied().unwrap_or(BlockInfo::Missing);
                match (zero, theirs) {
                    (true, BlockInfo::Zero) => None,
                    (true, _) => Some(Send::Zero),
                    (false, BlockInfo::Digest(d)) => {
                        // Hash only blocks the destination has: a new one costs no hashing.
                        let same = match ahead.and_then(|a| a.get(j)) {
                            Some(BlockInfo::Digest(known)) => *known == d,
                            _ => match config.compare {
                                Compare::Digest(kind) => kind.block_digest(mine(&r)) == d,
                                Compare::Bytes => false,
                            },
                        };
                        match (same, refine && r.len() > config.refine as usize) {
                            (true, _) => None,
                            (false, true) => Some(Send::Refine),
                            (false, false) => Some(Send::Data),
                        }
                    }
                    (false, BlockInfo::Zero) if config.sparse => Some(Send::DataOverZero),
                    (false, _) => Some(Send::Data),
                }
            }
            _ => unreachable!("checked by caller"),
        };
        // Refining re-reads the source, which would only fail again: send what we have.
        let change = change.map(|how| match how {
            Send::Refine if !bad.is_empty() => Send::Data,
            how => how,
        });
        let Some(how) = change else { continue };
        changes.blocks += 1;
        if how == Send::Zero {
            changes.zeroed += 1;
        }
        changes.push(r, how);
    }
    changes
}

/// The parts of the ranges in `bad` (ascending) that fall in `r`.
fn overlapping(bad: &[Range<usize>], r: &Range<usize>) -> Vec<Range<usize>> {
    bad.iter()
        .filter(|b| b.start < r.end && b.end > r.start)
        .map(|b| b.start.max(r.start)..b.end.min(r.end))
        .collect()
}

/// The verify pass for one chunk: compares the source's full-strength digests with the
/// destination's, and with what the sync pass read, and reports what differs.
fn verify_chunk(
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
    let mine = super::prehash::infos_at(log.kind, data, len, block, &chunk.zeros, true);
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

/// Reads a changed range of a chunk whose bytes were not kept.
fn read_range(src: &Target, offset: u64, len: usize, stats: &Stats) -> Result<Slice> {
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

/// Most blocks waiting for their sub-block digests at once; bounds the memory of the
/// questions in flight while keeping the link busy.
const MAX_PENDING: usize = 1024;

/// A message where only answers were expected ([`Refiner::take`] already turned a
/// failure into an error).
fn unexpected(_: ToSource) -> Error {
    Error::new(
        Kind::Protocol,
        "destination sent a report it was not asked for",
    )
}

/// Narrows changed blocks down to their changed sub-blocks without ever waiting for an
/// answer before going on: questions go out with the other messages, answers are taken
/// as they come back between the destination's chunk reports.
struct Refiner<'a> {
    src: &'a Target,
    config: &'a Config,
    stats: &'a Stats,
    to_dest: &'a Sender<ToDest>,
    from_dest: &'a Receiver<ToSource>,
    /// Blocks asked about: offset -> length.
    pending: std::collections::HashMap<u64, u64>,
    /// Spot-checks of a digest file in flight: offset -> what the file says is there.
    checks: std::collections::HashMap<u64, BlockInfo>,
}

impl<'a> Refiner<'a> {
    fn send(&self, msg: ToDest) -> Result<()> {
        self.to_dest.send(msg).map_err(|_| why_gone(self.from_dest))
    }

    /// Asks about the block at `offset`; `false` (not asked) when too many questions are
    /// open, then the caller sends the block whole: waiting here for answers could stall
    /// both sides, and memory for open questions stays bounded.
    fn ask(&mut self, offset: u64, len: u64) -> Result<bool> {
        if self.pending.len() >= MAX_PENDING {
            return Ok(false);
        }
        self.pending.insert(offset, len);
        self.send(ToDest::Refine { offset, len })?;
        Ok(true)
    }

    /// The destination's next chunk report, handling answers that come first.
    fn next_report(&mut self) -> Result<ToSource> {
        loop {
            let msg = self.from_dest.recv().map_err(|_| lost_destination())?;
            if let Some(report) = self.take(msg)? {
                return Ok(report);
            }
        }
    }

    /// Waits for every open question.
    fn drain(&mut self) -> Result<()> {
        self.answers_until(|r| r.pending.is_empty())
    }

    /// Takes answers until `done`; anything but an answer is an error here.
    fn answers_until(&mut self, done: impl Fn(&Self) -> bool) -> Result<()> {
        while !done(self) {
            let msg = self.from_dest.recv().map_err(|_| lost_destination())?;
            if let Some(other) = self.take(msg)? {
                return Err(unexpected(other));
            }
        }
        Ok(())
    }

    /// Handles whatever answers have arrived, without waiting (the chunk reports come
    /// from a digest file, so nothing else is expected).
    fn take_ready(&mut self) -> Result<()> {
        while let Ok(msg) = self.from_dest.try_recv() {
            if let Some(other) = self.take(msg)? {
                return Err(unexpected(other));
            }
        }
        Ok(())
    }

    /// Checks a few destination blocks against the digest file before anything is sent:
    /// a destination changed behind the file's back must not be synced by it.
    fn spot_check(&mut self, cache: &crate::digestfile::cache::Cache) -> Result<()> {
        let Some(old) = &cache.old else {
            return Ok(());
        };
        let layout = self.config.layout;
        for &b in &cache.spot {
            let offset = b * layout.block;
            if offset < layout.start || offset >= layout.end {
                continue;
            }
            let len = layout.block.min(layout.end - offset);
            let expect = old.entries(b, 1).map_err(|e| {
                Error::new(Kind::Io, format!("reading digest file {}: {e}", cache.name))
            })?[0];
            self.checks.insert(offset, expect);
            self.send(ToDest::Check { offset, len })?;
        }
        self.answers_until(|r| r.checks.is_empty())
    }

    /// Handles an answer; returns anything else.
    fn take(&mut self, msg: ToSource) -> Result<Option<ToSource>> {
        match msg {
            ToSource::Pieces { offset, pieces } if self.checks.contains_key(&offset) => {
                let expect = self.checks.remove(&offset).expect("checked above");
                if pieces.first() != Some(&expect) {
                    let (name, dest) = self
                        .config
                        .cache
                        .as_ref()
                        .map_or(("", ""), |c| (c.name.as_str(), c.dest.as_str()));
                    return Err(Error::new(
                        Kind::StaleCache,
                        format!(
                            "block at byte {offset} of {dest} is not what digest file {name} says: the destination changed behind its back; run with --digest-rebuild (reads the destination once)"
                        ),
                    ));
                }
                Ok(None)
            }
            ToSource::Pieces { offset, pieces } => {
                self.answer(offset, &pieces)?;
                Ok(None)
            }
            ToSource::Failed { kind, message } => Err(Error::new(kind, message)),
            other => Ok(Some(other)),
        }
    }

    /// Sends the pieces of the block at `offset` that differ from the destination's.
    fn answer(&mut self, offset: u64, theirs: &[BlockInfo]) -> Result<()> {
        let Some(len) = self.pending.remove(&offset) else {
            return Err(Error::new(
                Kind::Protocol,
                format!("destination answered about byte {offset}, which was not asked"),
            ));
        };
        let Compare::Digest(kind) = self.config.compare else {
            return Err(Error::new(Kind::Internal, "refining without digests"));
        };
        let piece = self.config.refine as usize;
        let data = read_range(self.src, offset, len as usize, self.stats)?;
        let mine = super::prehash::block_infos(kind, &data, len as usize, piece, &[]);
        if theirs.len() != mine.len() {
            return Err(Error::new(
                Kind::Protocol,
                format!(
                    "destination answered {} pieces for {}",
                    theirs.len(),
                    mine.len()
                ),
            ));
        }
        let differ: Vec<usize> = (0..mine.len()).filter(|&i| mine[i] != theirs[i]).collect();
        let mut changes = Changes::default();
        if differ.len() * 2 > mine.len() {
            // Most pieces differ: the whole block is cheaper than many small ones.
            changes.push(0..data.len(), Send::Data);
        } else {
            for i in differ {
                let r = i * piece..((i + 1) * piece).min(data.len());
                let how = if mine[i] == BlockInfo::Zero {
                    Send::Zero
                } else {
                    Send::Data
                };
                changes.push(r, how);
            }
        }
        let bytes: usize = changes.ranges.iter().map(|(r, _)| r.len()).sum();
        Stats::add(&self.stats.changed_bytes, bytes as u64);
        if self.config.dry_run {
            return Ok(());
        }
        for (r, how) in changes.ranges {
            let at = offset + r.start as u64;
            let msg = match how {
                Send::Zero => ToDest::Zero {
                    offset: at,
                    len: r.len() as u64,
                },
                _ => ToDest::Write {
                    offset: at,
                    data: data.sub(r),
                },
            };
            self.send(msg)?;
        }
        Ok(())
    }
}

fn compare_and_send(
    src: &Target,
    config: &Config,
    chunks: &Receiver<Result<Chunk>>,
    to_dest: &Sender<ToDest>,
    from_dest: &Receiver<ToSource>,
    stats: &Stats,
    cancel: &AtomicBool,
) -> Result<()> {
    let layout = config.layout;
    let block = layout.block as usize;
    let mut refiner = Refiner {
        src,
        config,
        stats,
        to_dest,
        from_dest,
        pending: Default::default(),
        checks: Default::default(),
    };
    let cache = config.cache.as_deref();
    let old = cache.and_then(|c| c.old.as_ref());
    if let Some(c) = cache {
        c.begin(
            layout.start / layout.block,
            layout.end.div_ceil(layout.block),
        );
        // Every stream checks before any writes: a stale file must change nothing.
        let checked = refiner.spot_check(c);
        let all = c.all_checked(checked.is_ok());
        checked?;
        if !all {
            return Err(Error::new(
                Kind::StaleCache,
                format!(
                    "digest file {} does not match {} (a spot-check of another stream failed); run with --digest-rebuild",
                    c.name, c.dest
                ),
            ));
        }
    }
    let mut early = std::collections::BTreeMap::new();
    for index in 0..layout.chunks() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::new(Kind::Interrupted, "interrupted"));
        }
        if let Some(e) = stats.peer_failure() {
            return Err(e);
        }
        // Readers may deliver out of order: keep early chunks until their turn.
        let mut chunk = loop {
            if let Some(c) = early.remove(&index) {
                break c;
            }
            let c = chunks
                .recv()
                .map_err(|_| Error::new(Kind::Interrupted, "interrupted"))??;
            if c.index == index {
                break c;
            }
            early.insert(c.index, c);
        };
        let (offset, len) = layout.chunk_at(index);
        let nblocks = len.div_ceil(block);
        let first = offset / layout.block;
        let theirs = match old {
            Some(old) => {
                refiner.take_ready()?;
                let blocks = old
                    .entries(first, nblocks)
                    .map_err(|e| Error::new(Kind::Io, format!("reading digest file: {e}")))?;
                ToSource::Digests { index, blocks }
            }
            None => refiner.next_report()?,
        };
        let their_index = match &theirs {
            ToSource::Bytes { index, .. }
            | ToSource::Digests { index, .. }
            | ToSource::Verify { index, .. } => *index,
            ToSource::Failed { kind, message } => return Err(Error::new(*kind, message.clone())),
            _ => {
                return Err(Error::new(
                    Kind::Protocol,
                    "destination confirmed before the last block was sent",
                ));
            }
        };
        if their_index != chunk.index {
            return Err(Error::new(
                Kind::Protocol,
                format!(
                    "destination sent chunk {their_index} where chunk {} was expected",
                    chunk.index
                ),
            ));
        }
        match (config.verify_pass, config.compare, &theirs) {
            (true, _, ToSource::Verify { blocks, .. }) => {
                verify_chunk(config, &chunk, blocks, &refiner, stats)?;
                Stats::add(&stats.done, len as u64);
                continue;
            }
            (false, Compare::Digest(_), ToSource::Digests { .. })
            | (false, Compare::Bytes, ToSource::Bytes { .. }) => {}
            _ => {
                return Err(Error::new(
                    Kind::Protocol,
                    "destination sent another kind of report than asked for",
                ));
            }
        }
        for r in &chunk.bad {
            refiner.send(ToDest::Finding {
                kind: FindingKind::Unreadable,
                offset: offset + r.start as u64,
                len: r.len() as u64,
            })?;
        }
        // The source's own digests, when something needs them all: a digest file to
        // record, or a verify log. Computed once, also used to compare.
        let kind = match (config.compare, cache, &config.verify) {
            (Compare::Digest(k), _, _) => Some(k),
            (_, Some(c), _) if c.records() => Some(c.kind),
            (_, _, Some(v)) => Some(v.kind),
            _ => None,
        };
        let all = cache.is_some_and(|c| c.records()) || config.verify.is_some();
        // Blocks whose digest the comparison needs: those the destination has.
        let compared = |j: usize| match &theirs {
            ToSource::Digests { blocks, .. } => matches!(blocks.get(j), Some(BlockInfo::Digest(_))),
            _ => false,
        };
        let mine = kind.map(|k| {
            let ahead = config.precomputed.as_ref().and_then(|p| p.get(offset));
            match (chunk.infos.take(), ahead, &chunk.data) {
                (Some(hashed), _, _) => hashed, // by the reader
                (None, Some(a), None) => a.to_vec(),
                (None, _, data) => super::prehash::infos_par(
                    k,
                    data.as_deref().map_or(&[][..], |d| d),
                    len,
                    block,
                    &chunk.zeros,
                    &|j| all || compared(j),
                ),
            }
        });
        if let (Some(log), Some(m)) = (&config.verify, &mine) {
            // What the sync read, so the verify pass can tell a source that changed since.
            log.record(offset, m);
        }
        let changes = changed_ranges(config, &chunk, &theirs, mine.as_deref());
        if let (Some(c), Some(m)) = (cache, &mine) {
            let mut sent = vec![false; nblocks];
            for (r, _) in &changes.ranges {
                for s in &mut sent[r.start / block..r.end.div_ceil(block)] {
                    *s = true;
                }
            }
            // Blocks with unreadable sectors: what the destination holds there is not
            // what was read (old bytes, or zeros that a later read may contradict).
            let mut m = m.clone();
            for r in &chunk.bad {
                for k in r.start / block..r.end.div_ceil(block) {
                    m[k] = BlockInfo::Missing;
                    sent[k] = false;
                }
            }
            c.record(layout.start / layout.block, first, &m, &sent)
                .map_err(|e| {
                    Error::new(Kind::Io, format!("writing digest file {}: {e}", c.name))
                })?;
        }
        drop(theirs); // hand the destination's buffer back before waiting on anything else
        let nblocks = nblocks as u64;
        let bytes: usize = changes
            .ranges
            .iter()
            .filter(|(_, h)| *h != Send::Refine)
            .map(|(r, _)| r.len())
            .sum();
        Stats::add(&stats.blocks_changed, changes.blocks);
        Stats::add(&stats.blocks_zeroed, changes.zeroed);
        Stats::add(&stats.changed_bytes, bytes as u64);
        Stats::add(&stats.blocks_same, nblocks - changes.blocks);
        let shared = chunk.data.map(Arc::new);
        for (r, how) in changes.ranges {
            let at = offset + r.start as u64;
            if how == Send::Refine {
                // Asked even in a dry run: the answer tells how much would be written.
                for b in (r.start..r.end).step_by(block) {
                    let blen = (r.end - b).min(block);
                    if refiner.ask(offset + b as u64, blen as u64)? {
                        continue;
                    }
                    Stats::add(&stats.changed_bytes, blen as u64);
                    if !config.dry_run {
                        let data = match &shared {
                            Some(buf) => Slice::new(buf.clone(), b..b + blen),
                            None => read_range(src, offset + b as u64, blen, stats)?,
                        };
                        let at = offset + b as u64;
                        refiner.send(ToDest::Write { offset: at, data })?;
                    }
                }
                continue;
            }
            if config.dry_run {
                continue;
            }
            let data = match (how, &shared) {
                (Send::Zero, _) => {
                    let msg = ToDest::Zero {
                        offset: at,
                        len: r.len() as u64,
                    };
                    refiner.send(msg)?;
                    continue;
                }
                (_, Some(buf)) => Slice::new(buf.clone(), r.clone()),
                (_, None) => read_range(src, at, r.len(), stats)?,
            };
            let pieces = if how == Send::DataOverZero {
                nonzero_pages(&data)
            } else {
                std::iter::once(0..data.len()).collect()
            };
            for p in pieces {
                let msg = ToDest::Write {
                    offset: at + p.start as u64,
                    data: data.sub(p),
                };
                refiner.send(msg)?;
            }
        }
        Stats::add(&stats.done, len as u64);
        if !config.pause.is_zero() {
            let nblocks = u32::try_from(nblocks).unwrap_or(u32::MAX);
            std::thread::sleep(config.pause.saturating_mul(nblocks));
        }
    }
    refiner.drain()
}
