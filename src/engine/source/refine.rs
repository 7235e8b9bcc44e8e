//! Talking to the destination half beyond the chunk reports: narrowing changed blocks
//! down to their changed sub-blocks (questions out, answers taken as they come) and
//! spot-checking a digest file's claims before anything is written.

use super::compare::{Changes, Send};
use super::read::read_range;
use super::{lost_destination, why_gone};
use crate::engine::messages::{ToDest, ToSource};
use crate::engine::{Compare, Config, Stats};
use crate::error::{Error, Kind, Result};
use crate::hash::BlockInfo;
use crate::io::target::Target;
use crossbeam_channel::{Receiver, Sender};

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
pub(super) struct Refiner<'a> {
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
    pub(super) fn new(
        src: &'a Target,
        config: &'a Config,
        stats: &'a Stats,
        to_dest: &'a Sender<ToDest>,
        from_dest: &'a Receiver<ToSource>,
    ) -> Self {
        Refiner {
            src,
            config,
            stats,
            to_dest,
            from_dest,
            pending: Default::default(),
            checks: Default::default(),
        }
    }

    pub(super) fn send(&self, msg: ToDest) -> Result<()> {
        if let ToDest::Write { data, .. } = &msg {
            Stats::add(&self.stats.in_flight, data.len() as u64);
        }
        self.to_dest.send(msg).map_err(|_| why_gone(self.from_dest))
    }

    /// Asks about the block at `offset`; `false` (not asked) when too many questions are
    /// open, then the caller sends the block whole: waiting here for answers could stall
    /// both sides, and memory for open questions stays bounded.
    pub(super) fn ask(&mut self, offset: u64, len: u64) -> Result<bool> {
        if self.pending.len() >= MAX_PENDING {
            return Ok(false);
        }
        self.pending.insert(offset, len);
        self.send(ToDest::Refine { offset, len })?;
        Ok(true)
    }

    /// The destination's next chunk report, handling answers that come first.
    pub(super) fn next_report(&mut self) -> Result<ToSource> {
        loop {
            let msg = self.from_dest.recv().map_err(|_| lost_destination())?;
            if let Some(report) = self.take(msg)? {
                return Ok(report);
            }
        }
    }

    /// Waits for every open question.
    pub(super) fn drain(&mut self) -> Result<()> {
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
    pub(super) fn take_ready(&mut self) -> Result<()> {
        while let Ok(msg) = self.from_dest.try_recv() {
            if let Some(other) = self.take(msg)? {
                return Err(unexpected(other));
            }
        }
        Ok(())
    }

    /// Checks a few destination blocks against the digest file before anything is sent:
    /// a destination changed behind the file's back must not be synced by it.
    pub(super) fn spot_check(&mut self, cache: &crate::digestfile::cache::Cache) -> Result<()> {
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
            // Counters of a destination about to fail (see its failure next).
            ToSource::Tally { .. } => Ok(None),
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
        let mine = crate::engine::blockhash::block_infos(kind, &data, len as usize, piece, &[]);
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
        // The block now holds what was just read, not what was compared (the chunk's
        // record left it missing for this).
        if let Some(c) = self.config.cache.as_deref().filter(|c| c.records()) {
            let info =
                crate::engine::blockhash::block_infos(kind, &data, data.len(), data.len(), &[]);
            c.record_sent(offset / self.config.layout.block, &info[0])
                .map_err(|e| {
                    Error::new(Kind::Io, format!("writing digest file {}: {e}", c.name))
                })?;
        }
        Ok(())
    }
}
