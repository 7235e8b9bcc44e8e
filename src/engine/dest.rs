//! The destination half: reads the destination a chunk at a time on its own thread and
//! reports it (bytes or digests), while this thread writes the changed ranges it receives,
//! then resizes a file destination, flushes, and confirms.

use super::messages::{ToDest, ToSource};
use super::writer::write_dest;
use super::{Compare, Config, Stats};
use crate::error::{Error, Kind, Result, os_text};
use crate::io::pool::{Buf, Pool};
use crate::io::target::{self, Advice, Extents, Target, TargetKind};
use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};

/// Runs the destination half until the source says it is finished (or goes away).
/// A failure is returned and also reported to the source as [`ToSource::Failed`].
///
/// Chunk reports go to `to_source`; answers to refinement questions and a failure go to
/// `answers`, which must never block (unbounded, or the same channel when the source
/// reads everything it is sent): the writing thread must not wait for the source, which
/// may itself be waiting for the writer to take its blocks.
pub fn run(
    dest: Option<&Target>,
    config: &Config,
    from_source: Receiver<ToDest>,
    to_source: Sender<ToSource>,
    answers: Sender<ToSource>,
    stats: &Stats,
) -> Result<()> {
    let pool = Pool::new(config.buffers, config.layout.chunk as usize);
    let stop = AtomicBool::new(false);
    let stop = &stop;
    if let Some(d) = dest {
        if config.verify_pass {
            // Verify what is on the disk, not what is still in the page cache (the sync
            // flushed it, so these pages are clean and can be dropped).
            target::advise(&d.file, 0, 0, Advice::DontNeed);
        }
        target::advise(&d.file, 0, 0, Advice::Sequential);
    }
    if config.verify_pass && config.dest_progress {
        stats.done.store(0, std::sync::atomic::Ordering::Relaxed); // the progress starts over
    }
    if let Some(d) = dest.filter(|_| !config.dry_run && !config.verify_pass) {
        // From here on the destination no longer matches any digest file: every writing
        // run forgets the id, so a digest file is never trusted after a run without it.
        // A run that cannot forget it must not write: the record would vouch for a digest
        // file that no longer describes the destination.
        if let Err(e) = crate::digestfile::syncid::clear(d) {
            let e = Error::new(
                Kind::Io,
                format!(
                    "cannot forget the sync id of {} (record {}): {}; nothing was written. Make the record removable and run again",
                    d.path.display(),
                    crate::digestfile::syncid::record_path(d).display(),
                    os_text(&e)
                ),
            );
            let _ = answers.send(failed(e.kind, e.message.clone()));
            return Err(e);
        }
    }
    std::thread::scope(|s| {
        match config.compare {
            _ if !config.dest_reads => {} // a digest file stands in for reading
            Compare::Bytes => {
                let reader_tx = to_source.clone();
                s.spawn(move || read_dest(dest, config, &pool, reader_tx, stats, stop));
            }
            Compare::Digest(kind) => {
                // Reading and hashing on separate threads: one core each, overlapped.
                let (raw_tx, raw_rx) = crossbeam_channel::bounded(super::REPORTS_IN_FLIGHT);
                s.spawn(move || read_dest(dest, config, &pool, raw_tx, stats, stop));
                let hash_tx = to_source.clone();
                s.spawn(move || hash_dest(kind, config, raw_rx, hash_tx));
            }
        }
        let result = write_dest(dest, config, from_source, &to_source, &answers, stats);
        // The reader may be waiting for buffers that unread reports hold: stop it.
        stop.store(true, Ordering::Relaxed);
        if let Err(e) = &result {
            // Ahead of any queued reports, on the channel that never blocks: what was
            // written (a remote source reports it), then why it stopped.
            let _ = answers.send(ToSource::Tally {
                written: Stats::get(&stats.written),
                read: Stats::get(&stats.dest_read),
            });
            let _ = answers.send(failed(e.kind, e.message.clone()));
        }
        result
    })
}

/// Turns the reader's chunks into what the destination holds per block (zero, digest,
/// or missing); passes anything else through.
fn hash_dest(
    kind: crate::hash::HashKind,
    config: &Config,
    chunks: Receiver<ToSource>,
    out: Sender<ToSource>,
) {
    for msg in chunks {
        let msg = match msg {
            ToSource::Bytes { index, data, zeros } if config.verify_pass => {
                let (_, len) = config.layout.chunk_at(index);
                let block = config.layout.block as usize;
                ToSource::Verify {
                    index,
                    blocks: super::blockhash::hash_blocks(kind, &data, len, block, &zeros, true),
                }
            }
            ToSource::Bytes { index, data, zeros } => ToSource::Digests {
                index,
                blocks: super::blockhash::hash_chunk(kind, &config.layout, index, &data, &zeros),
            },
            other => other,
        };
        if out.send(msg).is_err() {
            return;
        }
    }
}

pub(super) fn failed(kind: Kind, message: String) -> ToSource {
    ToSource::Failed { kind, message }
}

/// Which blocks of the chunk at `offset` (`len` bytes, the destination holding `have` of
/// them) are known zero without reading: holes, and in a sparse file destination the
/// blocks past its end (extending the file makes them zero). Also returns where the
/// chunk holds data, when the file can tell.
fn known_zero(
    dest: Option<&Target>,
    extents: Option<&mut Extents>,
    config: &Config,
    offset: u64,
    len: usize,
    have: usize,
) -> (Vec<bool>, Option<Vec<std::ops::Range<u64>>>) {
    let block = config.layout.block;
    let nblocks = (len as u64).div_ceil(block) as usize;
    let ranges = match extents {
        Some(e) if have > 0 => Some(e.data_in(offset..offset + have as u64)),
        _ => None,
    };
    let mut zeros = match &ranges {
        Some(d) => target::hole_blocks(d, offset, len, block),
        None => vec![false; nblocks],
    };
    let tail_is_zero = config.sparse && dest.is_none_or(|d| d.kind == TargetKind::File);
    for (j, z) in zeros.iter_mut().enumerate() {
        let start = j as u64 * block;
        let end = (start + block).min(len as u64);
        if end > have as u64 {
            // Past the end: zero once the file is extended, unless we must allocate it.
            *z = start >= have as u64 && tail_is_zero;
        }
    }
    (zeros, ranges)
}

fn read_dest(
    dest: Option<&Target>,
    config: &Config,
    pool: &Pool,
    out: Sender<ToSource>,
    stats: &Stats,
    stop: &AtomicBool,
) {
    let layout = config.layout;
    let block = layout.block as usize;
    let have_size = match dest {
        // The sync pass may have grown a file destination since it was opened.
        Some(d) if config.verify_pass && d.kind == TargetKind::File => {
            d.file.metadata().map_or(d.size, |m| m.len())
        }
        Some(d) => d.size,
        None => 0,
    };
    let mut extents = dest.and_then(|d| Extents::new(&d.file, d.kind));
    for index in 0..layout.chunks() {
        let (offset, len) = layout.chunk_at(index);
        if let Some(blocks) = config.precomputed.as_ref().and_then(|p| p.get(offset)) {
            // Hashed ahead: nothing to read.
            let msg = ToSource::Digests {
                index,
                blocks: blocks.to_vec(),
            };
            if out.send(msg).is_err() {
                return;
            }
            if config.dest_progress {
                Stats::add(&stats.done, len as u64);
            }
            continue;
        }
        let have = have_size.saturating_sub(offset).min(len as u64) as usize;
        let (zeros, ranges) = known_zero(dest, extents.as_mut(), config, offset, len, have);
        let holes = zeros.iter().all(|&z| z);
        let mut data = if holes {
            // Nothing to read, so no buffer: a run of holes never waits for the pool
            // (with a few buffers, that wait cost a thread wake-up per hole chunk).
            Buf::detached(Vec::new())
        } else {
            match pool.get_unless(have, stop) {
                Some(b) => b,
                None => return,
            }
        };
        if let Some(d) = dest.filter(|_| have > 0 && !holes) {
            // Read the runs of blocks not known zero.
            let ranges = ranges.as_deref();
            match target::read_blocks_at(&d.file, &mut data, offset, block, &zeros, ranges) {
                Ok(n) => Stats::add(&stats.dest_read, n),
                Err((at, e)) => {
                    let msg = format!(
                        "reading destination {} at byte {at}: {}",
                        d.path.display(),
                        os_text(&e)
                    );
                    let _ = out.send(failed(Kind::Io, msg));
                    return;
                }
            }
            if config.drop_cache {
                target::advise(&d.file, offset, have as u64, Advice::DontNeed);
            }
        }
        if out.send(ToSource::Bytes { index, data, zeros }).is_err() {
            return; // the source finished or failed; it no longer needs our reads
        }
        if config.dest_progress {
            Stats::add(&stats.done, len as u64);
            if config.verify_pass {
                Stats::add(&stats.verified, len as u64);
            }
        }
    }
}
