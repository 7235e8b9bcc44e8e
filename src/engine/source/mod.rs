//! The source half: reads the source a chunk at a time on its own thread (skipping holes,
//! spotting zero blocks), compares each block with what the destination half reports,
//! and sends the changed ranges: data, or a tiny zero message for zero blocks.
//!
//! - [`read`]: the reader threads;
//! - [`compare`]: which blocks of a chunk differ and how each changed run is sent;
//! - [`refine`]: questions and answers beyond the chunk reports (sub-block digests,
//!   spot-checks of a digest file);
//! - [`verify`]: the `--verify` pass's comparison;
//! - [`record`]: the digest file's gate and recording;
//! - here: the half's top level, taking chunks in order and sending what changed.

mod compare;
mod read;
mod record;
mod refine;
#[cfg(test)]
mod tests;
mod verify;

use super::messages::{Counts, FindingKind, ToDest, ToSource};
use super::{Compare, Config, Stats};
use crate::error::{Error, Kind, Result};
use crate::hash::{BlockInfo, HashKind};
use crate::io::pool::{Buf, Slice};
use crate::io::target::{self, Advice, Target};
use compare::{Changes, Send};
use crossbeam_channel::{Receiver, Sender};
use read::{ErrorCount, Readers, read_range};
use refine::Refiner;
use std::collections::BTreeMap;
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

impl Chunk {
    /// A chunk whose bytes were not read: all holes, or hashed ahead.
    fn unread(index: u64, zeros: Vec<bool>) -> Self {
        Chunk {
            index,
            data: None,
            zeros,
            bad: Vec::new(),
            infos: None,
        }
    }
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
    target::advise(&src.file, 0, 0, Advice::Sequential);
    let before = counts(stats);
    if config.verify_pass {
        stats.done.store(0, Ordering::Relaxed); // the progress starts over
    }
    let readers = Readers::new(src, config, stats, cancel);
    std::thread::scope(|s| {
        let (chunk_tx, chunk_rx) =
            crate::io::queue::bounded::<Result<Chunk>>(super::REPORTS_IN_FLIGHT);
        let readers = &readers;
        for _ in 0..readers.threads {
            let chunk_tx = chunk_tx.clone();
            s.spawn(move || readers.read_source(chunk_tx));
        }
        drop(chunk_tx);
        let pass = Pass {
            src,
            config,
            stats,
            cancel,
            chunks: &chunk_rx,
            early: BTreeMap::new(),
            errors: ErrorCount::default(),
            refiner: Refiner::new(src, config, stats, &to_dest, &from_dest),
        };
        let outcome = pass.run();
        // Stop the reader, which may be waiting for buffers that queued chunks hold.
        readers.stop.store(true, Ordering::Relaxed);
        drop(chunk_rx);
        let end = match &outcome {
            Ok(()) => ToDest::Finish {
                size: config
                    .stream
                    .as_ref()
                    .and_then(|s| s.end())
                    .unwrap_or(layout.size),
                counts: counts_since(counts(stats), before),
            },
            Err(e) => ToDest::Abort {
                kind: e.kind,
                message: e.message.clone(),
            },
        };
        let confirmed = match to_dest.send(end) {
            Ok(()) => {
                drop(to_dest);
                wait_done(&from_dest)
            }
            Err(_) => Err(why_gone(&from_dest)),
        };
        first_cause(outcome, confirmed)
    })
}

/// The run's result from this half's own outcome and the destination's last word. The
/// first error is the cause and a failure after it a consequence, except after an
/// interruption: then a destination that could not write or flush what it had is the
/// news ("what was written is flushed" would not be true).
fn first_cause(outcome: Result<()>, confirmed: Result<()>) -> Result<()> {
    match (outcome, confirmed) {
        (Err(e), Err(d)) if e.kind == Kind::Interrupted && d.kind == Kind::Io => Err(d),
        (Err(e), _) => Err(e),
        (Ok(()), confirmed) => confirmed,
    }
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

/// The compare-and-send side of one pass: takes the chunks in order, compares each with
/// the destination's report and sends what changed.
struct Pass<'a> {
    src: &'a Target,
    config: &'a Config,
    stats: &'a Stats,
    cancel: &'a AtomicBool,
    chunks: &'a crate::io::queue::Receiver<Result<Chunk>>,
    /// Chunks delivered ahead of their turn (several readers), by index.
    early: BTreeMap<u64, Chunk>,
    /// Unreadable areas so far, counted here because chunks come here in order.
    errors: ErrorCount,
    refiner: Refiner<'a>,
}

impl Pass<'_> {
    fn run(mut self) -> Result<()> {
        let layout = self.config.layout;
        if let Some(c) = self.config.cache.as_deref() {
            record::gate(c, &layout, &mut self.refiner)?;
        }
        for index in 0..layout.chunks() {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Error::new(Kind::Interrupted, "interrupted"));
            }
            if let Some(e) = self.stats.peer_failure() {
                return Err(e);
            }
            let chunk = self.next_chunk(index)?;
            self.unreadable(&chunk)?;
            self.one_chunk(chunk)?;
            if let Some(stream) = &self.config.stream {
                let (offset, len) = layout.chunk_at(index);
                if stream.end().is_some_and(|e| e < offset + len as u64) {
                    break; // it ended in this chunk
                }
            }
        }
        if self.config.stream.as_ref().is_some_and(|s| s.is_longer()) {
            // Set by the reader before it sent the last chunk.
            return Err(read::stream_too_long(self.src, layout.size));
        }
        self.refiner.drain()
    }

    /// Chunk `index`: readers may deliver out of order, so early chunks wait their turn.
    fn next_chunk(&mut self, index: u64) -> Result<Chunk> {
        loop {
            if let Some(c) = self.early.remove(&index) {
                return Ok(c);
            }
            let c = self
                .chunks
                .recv()
                .map_err(|_| Error::new(Kind::Interrupted, "interrupted"))??;
            if c.index == index {
                return Ok(c);
            }
            self.early.insert(c.index, c);
        }
    }

    /// Records the chunk's unreadable ranges (before giving up, so a run that gives up
    /// still reports what it found) and counts them against `--max-errors`.
    fn unreadable(&mut self, chunk: &Chunk) -> Result<()> {
        let config = self.config;
        let (offset, _) = config.layout.chunk_at(chunk.index);
        if !config.verify_pass {
            read::record_unreadable(self.stats, offset, &chunk.bad);
        }
        let areas = self.errors.add(offset, &chunk.bad);
        let max = config.salvage.max_errors;
        if areas > max {
            return Err(read::too_many_errors(self.src, areas, max));
        }
        Ok(())
    }

    /// What the destination holds for `chunk`: its report, or the digest file's entries.
    fn their_report(&mut self, chunk: &Chunk) -> Result<ToSource> {
        let layout = self.config.layout;
        let (offset, len) = layout.chunk_at(chunk.index);
        let old = self.config.cache.as_ref().and_then(|c| c.old.as_ref());
        let theirs = match old {
            Some(old) => {
                self.refiner.take_ready()?;
                let blocks = old
                    .entries(offset / layout.block, len.div_ceil(layout.block as usize))
                    .map_err(|e| Error::new(Kind::Io, format!("reading digest file: {e}")))?;
                ToSource::Digests {
                    index: chunk.index,
                    blocks,
                }
            }
            None => self.refiner.next_report()?,
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
        Ok(theirs)
    }

    /// Compares one chunk and sends what changed (or, in the verify pass, reports it).
    fn one_chunk(&mut self, mut chunk: Chunk) -> Result<()> {
        let (config, stats) = (self.config, self.stats);
        let (offset, len) = config.chunk_at(chunk.index);
        let theirs = self.their_report(&chunk)?;
        match (config.verify_pass, config.compare, &theirs) {
            (true, _, ToSource::Verify { blocks, .. }) => {
                verify::verify_chunk(config, &chunk, blocks, &self.refiner, stats)?;
                Stats::add(&stats.done, len as u64);
                return Ok(());
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
            self.refiner.send(ToDest::Finding {
                kind: FindingKind::Unreadable,
                offset: offset + r.start as u64,
                len: r.len() as u64,
            })?;
        }
        let mine = self.own_digests(&mut chunk, &theirs);
        if let (Some(log), Some(m)) = (&config.verify, &mine) {
            // What the sync read, so the verify pass can tell a source that changed since.
            log.record(offset, m);
        }
        let changes = compare::changed_ranges(config, &chunk, &theirs, mine.as_deref());
        drop(theirs); // hand the destination's buffer back before waiting on anything else
        let cache = config.cache.as_deref();
        let mut record = match (cache, self.digest_kind(), mine) {
            (Some(_), Some(kind), Some(m)) => Some(record::ChunkRecord::new(
                &config.layout,
                kind,
                &chunk,
                &changes,
                m,
            )),
            _ => None,
        };
        let nblocks = len.div_ceil(config.layout.block as usize) as u64;
        self.count(&changes, nblocks);
        let data = chunk.data.map(Arc::new);
        self.send_changes(offset, data, changes, record.as_mut())?;
        // Recorded once sent: blocks read again for sending hold what was read then.
        if let (Some(c), Some(r)) = (cache, record) {
            let layout = config.layout;
            r.write(c, layout.start / layout.block)?;
        }
        Stats::add(&stats.done, len as u64);
        if !config.pause.is_zero() {
            let nblocks = u32::try_from(nblocks).unwrap_or(u32::MAX);
            std::thread::sleep(config.pause.saturating_mul(nblocks));
        }
        Ok(())
    }

    /// The source's own digests of the chunk, when something needs them all (a digest
    /// file to record, or a verify log) or the comparison is by digest. Computed once,
    /// also used to compare.
    fn own_digests(&self, chunk: &mut Chunk, theirs: &ToSource) -> Option<Vec<BlockInfo>> {
        let config = self.config;
        let cache = config.cache.as_deref();
        let kind = self.digest_kind()?;
        let all = cache.is_some_and(|c| c.records()) || config.verify.is_some();
        // Blocks whose digest the comparison needs: those the destination has.
        let compared = |j: usize| match theirs {
            ToSource::Digests { blocks, .. } => matches!(blocks.get(j), Some(BlockInfo::Digest(_))),
            _ => false,
        };
        let (offset, len) = config.chunk_at(chunk.index);
        let ahead = config.precomputed.as_ref().and_then(|p| p.get(offset));
        Some(match (chunk.infos.take(), ahead, &chunk.data) {
            (Some(hashed), _, _) => hashed, // by the reader
            (None, Some(a), None) => a.to_vec(),
            (None, _, data) => super::blockhash::hash_blocks_par(
                kind,
                data.as_deref().map_or(&[][..], |d| d),
                len,
                config.layout.block as usize,
                &chunk.zeros,
                &|j| all || compared(j),
            ),
        })
    }

    /// The digest of the source's own digests, when it needs them (see
    /// [`Pass::own_digests`]).
    fn digest_kind(&self) -> Option<HashKind> {
        let config = self.config;
        match (config.compare, config.cache.as_deref(), &config.verify) {
            (Compare::Digest(k), _, _) => Some(k),
            (_, Some(c), _) if c.records() => Some(c.kind),
            (_, _, Some(v)) => Some(v.kind),
            _ => None,
        }
    }

    /// Adds a chunk's changes (of `nblocks` blocks) to the counters.
    fn count(&self, changes: &Changes, nblocks: u64) {
        let stats = self.stats;
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
    }

    /// Sends the changed ranges of the chunk at `offset`, whose bytes are `shared` when
    /// they were read (else read again now); `record` learns what bytes were read again.
    fn send_changes(
        &mut self,
        offset: u64,
        shared: Option<Arc<Buf>>,
        changes: Changes,
        mut record: Option<&mut record::ChunkRecord>,
    ) -> Result<()> {
        for (r, how) in changes.ranges {
            let record = record.as_deref_mut();
            match how {
                Send::Refine => self.send_refine(offset, shared.as_ref(), r, record)?,
                _ if self.config.dry_run => {}
                Send::Zero => self.refiner.send(ToDest::Zero {
                    offset: offset + r.start as u64,
                    len: r.len() as u64,
                })?,
                _ => self.send_data(offset, shared.as_ref(), r, how, record)?,
            }
        }
        Ok(())
    }

    /// Asks about each block of `r` (asked even in a dry run: the answer tells how much
    /// would be written), sending it whole when too many questions are open.
    fn send_refine(
        &mut self,
        offset: u64,
        shared: Option<&Arc<Buf>>,
        r: Range<usize>,
        mut record: Option<&mut record::ChunkRecord>,
    ) -> Result<()> {
        let block = self.config.layout.block as usize;
        for b in (r.start..r.end).step_by(block) {
            let blen = (r.end - b).min(block);
            let at = offset + b as u64;
            if self.refiner.ask(at, blen as u64)? {
                if let Some(rec) = record.as_deref_mut() {
                    rec.refined(b);
                }
                continue;
            }
            Stats::add(&self.stats.changed_bytes, blen as u64);
            if !self.config.dry_run {
                let data = match shared {
                    Some(buf) => Slice::new(buf.clone(), b..b + blen),
                    None => {
                        let data = read_range(self.src, at, blen, self.stats)?;
                        if let Some(rec) = record.as_deref_mut() {
                            rec.resent(&(b..b + blen), &data);
                        }
                        data
                    }
                };
                self.refiner.send(ToDest::Write { offset: at, data })?;
            }
        }
        Ok(())
    }

    /// Sends the bytes of `r` (leaving out zero pages for [`Send::DataOverZero`]).
    fn send_data(
        &mut self,
        offset: u64,
        shared: Option<&Arc<Buf>>,
        r: Range<usize>,
        how: Send,
        record: Option<&mut record::ChunkRecord>,
    ) -> Result<()> {
        let at = offset + r.start as u64;
        let data = match shared {
            Some(buf) => Slice::new(buf.clone(), r.clone()),
            None => {
                let data = read_range(self.src, at, r.len(), self.stats)?;
                if let Some(rec) = record {
                    rec.resent(&r, &data);
                }
                data
            }
        };
        let pieces = if how == Send::DataOverZero {
            compare::nonzero_pages(&data)
        } else {
            std::iter::once(0..data.len()).collect()
        };
        for p in pieces {
            self.refiner.send(ToDest::Write {
                offset: at + p.start as u64,
                data: data.sub(p),
            })?;
        }
        Ok(())
    }
}
