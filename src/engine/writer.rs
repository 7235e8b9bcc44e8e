//! The destination half's writing side: applies what the source sends, in order, answers
//! its questions about the destination, and seals the destination at the end.

use super::dest::failed;
use super::messages::{ToDest, ToSource};
use super::{Compare, Config, Stats};
use crate::error::{Error, Kind, Result, os_text};
use crate::io::pool::{Buf, Recycler, Slice};
use crate::io::target::DIRECT_ALIGN;
use crate::io::target::{self, Advice, Target, TargetKind};
use crate::journal::Journal;
use crate::journal::undo::GROUP;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

/// What the destination holds in each `piece`-sized part of the `len` bytes at `offset`:
/// the sub-blocks of a block to refine, or one piece for a spot-check of a digest file.
/// Runs on the writing thread, so it sees every write sent before the question.
fn pieces(
    dest: Option<&Target>,
    config: &Config,
    at: (u64, u64),
    piece: u64,
    stats: &Stats,
    pending: &[Op],
) -> std::io::Result<Vec<crate::hash::BlockInfo>> {
    let (offset, len) = at;
    let Compare::Digest(kind) = config.compare else {
        return Err(std::io::Error::other(
            "answering about blocks needs digests",
        ));
    };
    if piece == 0 || len == 0 || len > config.layout.block {
        return Err(std::io::Error::other(format!(
            "the source asked about {len} bytes in pieces of {piece}; refinement is off or the block is larger"
        )));
    }
    let have = dest.map_or(0, |d| d.size.saturating_sub(offset).min(len)) as usize;
    let mut data = vec![0u8; have];
    if let Some(d) = dest.filter(|_| have > 0) {
        let n = target::read_full_at(&d.file, &mut data, offset)?;
        data.truncate(n);
        Stats::add(&stats.dest_read, n as u64);
    }
    // What the destination holds includes the writes still held for the journal.
    for op in pending {
        op.overlay(offset, &mut data);
    }
    Ok(super::blockhash::block_infos(
        kind,
        &data,
        len as usize,
        piece as usize,
        &[],
    ))
}

/// Makes a range of the destination zero the cheapest way that keeps it correct.
fn zero_range(d: &Target, config: &Config, offset: u64, len: u64) -> std::io::Result<()> {
    match d.kind {
        TargetKind::File if config.sparse => {
            target::punch_hole(&d.file, offset, len).or_else(|e| match e.raw_os_error() {
                // Filesystems without hole punching (NFSv3, exFAT, ...) get real zeros.
                Some(libc::EOPNOTSUPP) => target::write_zeros(&d.file, offset, len),
                _ => Err(e),
            })
        }
        TargetKind::BlockDevice if config.discard => target::zero_out_device(&d.file, offset, len)
            .or_else(|_| target::write_zeros(&d.file, offset, len)),
        _ => {
            target::write_zeros(&d.file, offset, len)?;
            target::start_writeback(&d.file, offset, len);
            Ok(())
        }
    }
}

/// A failed write or flush, with the fix for a full disk.
fn io_error(what: String, e: std::io::Error) -> Error {
    let hint = if e.raw_os_error() == Some(libc::ENOSPC) {
        "; free space on it and run again to resume"
    } else {
        ""
    };
    Error::new(Kind::Io, format!("{what}: {}{hint}", os_text(&e)))
}

/// A group smaller than this is not committed only because the writer would wait.
const MIN_COMMIT: usize = 1 << 20;

/// A change held until the journal holding the bytes it overwrites is durable.
enum Op {
    Write(u64, Slice),
    Zero(u64, u64),
}

impl Op {
    /// Puts what this change writes over `data`, the destination's bytes at `offset`.
    fn overlay(&self, offset: u64, data: &mut [u8]) {
        let (at, len) = match self {
            Op::Write(at, d) => (*at, d.len() as u64),
            Op::Zero(at, len) => (*at, *len),
        };
        let end = offset + data.len() as u64;
        let (from, to) = (at.max(offset), (at + len).min(end));
        if from >= to {
            return;
        }
        let dst = &mut data[(from - offset) as usize..(to - offset) as usize];
        match self {
            Op::Write(_, d) => dst.copy_from_slice(&d[(from - at) as usize..(to - at) as usize]),
            Op::Zero(..) => dst.fill(0),
        }
    }
}

/// The destination half's writing side: applies what the source sends, in order.
struct Writer<'a> {
    dest: Option<&'a Target>,
    /// The destination when this run writes (not a dry run).
    writable: Option<&'a Target>,
    /// A second, O_DIRECT descriptor for whole aligned blocks (dropped at its first
    /// failure).
    direct: Option<std::fs::File>,
    config: &'a Config,
    stats: &'a Stats,
    /// Bytes written by this half.
    written: u64,
    /// The undo journal, when this run keeps one.
    journal: Option<Journal>,
    /// Changes whose old bytes are saved in the journal's group not yet committed.
    pending: Vec<Op>,
    /// How many of `pending` hold blocks of their own (see [`Writer::release`]).
    released: usize,
    /// Buffers for them, used again once written.
    spares: Recycler,
}

impl<'a> Writer<'a> {
    fn writable(&self, what: &str) -> Result<&'a Target> {
        self.writable
            .ok_or_else(|| Error::new(Kind::Protocol, format!("source sent {what} in a dry run")))
    }

    /// Saves the old bytes of a range about to change (see [`crate::journal`]).
    fn save(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.journal.is_none() {
            return Ok(());
        }
        let d = self.writable("a change")?;
        let j = self.journal.as_mut().expect("checked");
        // In groups: a large zero range must not buffer more than one.
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(GROUP as u64);
            j.save(&d.file, at, n).map_err(|e| {
                io_error(
                    format!(
                        "reading destination {} at byte {at} for the undo journal",
                        d.path.display()
                    ),
                    e,
                )
            })?;
            if j.should_commit() {
                j.commit()?;
            }
            at += n;
        }
        Ok(())
    }

    /// A change from the source: applied now, or, with a journal, once its old bytes are.
    fn change(&mut self, op: Op) -> Result<()> {
        if self.journal.is_none() {
            return self.apply(op);
        }
        let (offset, len) = match &op {
            Op::Write(at, d) => (*at, d.len() as u64),
            Op::Zero(at, len) => (*at, *len),
        };
        self.writable("a change")?;
        self.save(offset, len)?;
        self.pending.push(op);
        if self.journal.as_ref().is_some_and(Journal::should_commit) {
            self.flush()?;
        }
        Ok(())
    }

    /// Commits the journal's group, then applies the changes it covers.
    fn flush(&mut self) -> Result<()> {
        if let Some(j) = self.journal.as_mut() {
            j.commit()?;
        }
        self.released = 0;
        for op in std::mem::take(&mut self.pending) {
            self.apply(op)?;
        }
        Ok(())
    }

    /// Before waiting for the source, which may be waiting for the buffers the held
    /// changes share with its reading: a group of some size is committed (and its
    /// changes applied); a small one keeps its changes, copied into buffers of their
    /// own ([`Writer::release`]), so scattered small changes share a few commits (each
    /// costs an index page and a flush) instead of one each.
    fn pause(&mut self) -> Result<()> {
        match &self.journal {
            Some(j) if j.buffered() < MIN_COMMIT => {
                self.release();
                Ok(())
            }
            _ => self.flush(),
        }
    }

    /// Copies the held changes' blocks out of the buffers they share with the source's
    /// reading into page-aligned ones of their own.
    fn release(&mut self) {
        for op in &mut self.pending[self.released..] {
            if let Op::Write(_, data) = op {
                // Recycled: fresh memory would cost more (page faults) than the copy.
                let len = data.len();
                let (mut own, at) = self.spares.aligned(len, DIRECT_ALIGN);
                own[at..at + len].copy_from_slice(data);
                let own = Buf::recycled(own, &self.spares);
                *data = Slice::new(std::sync::Arc::new(own), at..at + len);
            }
        }
        self.released = self.pending.len();
    }

    fn apply(&mut self, op: Op) -> Result<()> {
        match op {
            Op::Write(offset, data) => self.write(offset, &data),
            Op::Zero(offset, len) => self.zero(offset, len),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let d = self.writable("a block")?;
        let direct_ok = match &self.direct {
            Some(f) if target::direct_fits(data, offset) => {
                // Any failure (refused after all, a short write that left the next piece
                // unaligned, a media error) is written again through the page cache,
                // whose error, if any, is the one reported.
                let ok = target::write_full_at(f, data, offset).is_ok();
                if !ok {
                    self.direct = None;
                }
                ok
            }
            _ => false,
        };
        if !direct_ok {
            target::write_full_at(&d.file, data, offset).map_err(|e| {
                io_error(
                    format!("writing destination {} at byte {offset}", d.path.display()),
                    e,
                )
            })?;
            target::start_writeback(&d.file, offset, data.len() as u64);
        }
        self.written += data.len() as u64;
        Stats::add(&self.stats.written, data.len() as u64);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        let d = self.writable("a zero range")?;
        zero_range(d, self.config, offset, len).map_err(|e| {
            io_error(
                format!("zeroing destination {} at byte {offset}", d.path.display()),
                e,
            )
        })?;
        // Bytes of the destination changed, as much as a data write's (the summary's
        // blocks "as zeros" tell them apart).
        self.written += len;
        Stats::add(&self.stats.written, len);
        Ok(())
    }

    /// What the destination holds at `offset`, in pieces of `piece` bytes.
    fn pieces(&self, offset: u64, len: u64, piece: u64) -> Result<Vec<crate::hash::BlockInfo>> {
        let at = (offset, len);
        pieces(self.dest, self.config, at, piece, self.stats, &self.pending).map_err(|e| {
            let name = self
                .dest
                .map_or(String::new(), |d| format!(" {}", d.path.display()));
            io_error(format!("reading destination{name} at byte {offset}"), e)
        })
    }

    /// After the last message: a completed sync gives a file destination the source's
    /// `size`; then everything is flushed and, unless the source found the digest file
    /// stale, the sync id recorded.
    fn seal(&mut self, size: Option<u64>, stale: bool) -> Result<()> {
        let Some(d) = self.writable else {
            return Ok(());
        };
        self.flush()?;
        // Only the stream whose part ends the file resizes it (and journals a cut tail):
        // with -w, the others saw its size when they opened it.
        // (An empty part past the end, more streams than chunks, does not own it.)
        let l = self.config.layout;
        let owns_end = l.end == l.size && (l.start < l.end || l.start == 0);
        if let Some(size) = size.filter(|&n| d.kind == TargetKind::File && d.size != n && owns_end)
        {
            if size < d.size {
                // The bytes cut off are overwritten too, as far as a rollback goes.
                self.save(size, d.size - size)?;
                if let Some(j) = self.journal.as_mut() {
                    j.commit()?;
                }
            }
            d.file.set_len(size).map_err(|e| {
                io_error(
                    format!("resizing destination {} to {size} bytes", d.path.display()),
                    e,
                )
            })?;
        }
        d.file
            .sync_all()
            .map_err(|e| io_error(format!("flushing destination {}", d.path.display()), e))?;
        // A new file complete and flushed under its temporary name takes its own.
        // (With several streams, the last to complete; the others leave it, and the
        // records of the run, to that one.)
        let (path, named) = match (size, &self.config.rename_to) {
            (Some(_), Some(name)) => match self.config.share {
                Some(share) => match crate::io::partial::finish_shared(&d.path, name, share)? {
                    true => (name.as_path(), true),
                    false => (d.path.as_path(), false),
                },
                None => {
                    crate::io::partial::finish(&d.path, name)?;
                    (name.as_path(), true)
                }
            },
            _ => (d.path.as_path(), true),
        };
        if let Some(id) = self.config.track.as_ref().filter(|_| !stale && named) {
            // Flushed: what the source recorded for this run is now true here (for the
            // blocks it saw confirmed; a stopped run records the rest as unknown).
            crate::digestfile::syncid::store_at(path, &d.id, id).map_err(|e| {
                io_error(format!("recording the sync id of {}", d.path.display()), e)
            })?;
        }
        if self.config.drop_cache {
            target::advise(&d.file, 0, 0, Advice::DontNeed);
        }
        if size.is_some() {
            // Complete and flushed: the journal has done its work, and this destination
            // now holds a copy worth journaling next time.
            if let Some(j) = self.journal.take() {
                Stats::add(&self.stats.journaled, j.bytes());
                j.finish(path)?;
            }
            if named {
                let _ = crate::journal::place::record_completed(path, &d.id);
            }
        } else if let Some(j) = &self.journal {
            Stats::add(&self.stats.journaled, j.bytes());
        }
        Ok(())
    }
}

pub(super) fn write_dest(
    dest: Option<&Target>,
    config: &Config,
    from_source: Receiver<ToDest>,
    to_source: &Sender<ToSource>,
    answers: &Sender<ToSource>,
    stats: &Stats,
) -> Result<()> {
    let writable = dest.filter(|_| !config.dry_run);
    let journal = match (writable.filter(|_| !config.verify_pass), &config.journal) {
        (Some(d), Some(plan)) => Some(Journal::begin(plan, d)?),
        _ => None,
    };
    let mut w = Writer {
        dest,
        writable,
        direct: writable.and_then(target::reopen_direct),
        config,
        stats,
        written: 0,
        journal,
        pending: Vec::new(),
        released: 0,
        spares: Recycler::new(64),
    };
    let mut stale = false;
    // `Some(size)` once the source finished; `None` when it stopped early.
    let finished = loop {
        let msg = match from_source.try_recv() {
            Ok(m) => Ok(m),
            // Nothing waiting: apply the held changes before waiting (the source may be
            // waiting for the buffers they hold).
            Err(TryRecvError::Empty) => {
                w.pause()?;
                from_source.recv().map_err(|_| ())
            }
            Err(TryRecvError::Disconnected) => Err(()),
        };
        match msg {
            Ok(ToDest::Write { offset, data }) => {
                Stats::take(&stats.in_flight, data.len() as u64);
                w.change(Op::Write(offset, data))?
            }
            Ok(ToDest::Zero { offset, len }) => w.change(Op::Zero(offset, len))?,
            Ok(ToDest::Check { offset, len }) => {
                let pieces = w.pieces(offset, len, len)?;
                let _ = answers.send(ToSource::Pieces { offset, pieces });
            }
            Ok(ToDest::Refine { offset, len }) => {
                let pieces = w.pieces(offset, len, config.refine)?;
                // A closed channel means the source is gone; the loop ends on its own.
                let _ = answers.send(ToSource::Pieces { offset, pieces });
            }
            Ok(ToDest::Finding { kind, offset, len }) => {
                // Recorded here only when the source half is on another machine (else
                // it recorded them itself).
                if config.dest_progress {
                    stats.found(kind, offset, len);
                }
            }
            Ok(ToDest::Finish { size, .. }) => break Some(size),
            // The source found the digest file stale: record no id, it must not be trusted.
            Ok(ToDest::Abort {
                kind: Kind::StaleCache,
                ..
            }) => {
                stale = true;
                break None;
            }
            // Stopped early: flush what was written so a rerun resumes from it.
            Ok(ToDest::Abort { .. }) | Err(_) => break None,
        }
    };
    w.seal(finished, stale)?;
    let read = Stats::get(&stats.dest_read);
    let end = if finished.is_some() {
        ToSource::Done {
            written: w.written,
            read,
            journaled: Stats::get(&stats.journaled),
        }
    } else {
        // What was written still counts (a remote source reports it).
        let _ = to_source.send(ToSource::Tally {
            written: w.written,
            read,
        });
        // Flushed, but not complete: never let this pass for the end of a good run.
        failed(
            Kind::Protocol,
            "the destination stopped before the source finished; what was written is flushed"
                .into(),
        )
    };
    let _ = to_source.send(end);
    Ok(())
}
