//! The source half: reads the source a chunk at a time on its own thread, compares each
//! block with what the destination half reports, and sends the changed ranges.

use super::{Compare, Config, Stats};
use crate::error::{Error, Kind, Result};
use crate::pool::{Buf, Pool, Slice};
use crate::protocol::{Counts, ToDest, ToSource};
use crate::target::{self, Advice, Target};
use crossbeam_channel::{Receiver, Sender, bounded};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One chunk of the source: its bytes, or `None` when its digests were computed ahead
/// (then only changed blocks are read, when sent).
struct Chunk {
    index: u64,
    data: Option<Buf>,
}

fn lost_destination() -> Error {
    Error::new(
        Kind::Internal,
        "the destination half stopped without saying why",
    )
}

/// The destination stopped taking messages: find out why from what it (or the link
/// carrying it) last said, waiting briefly for that to arrive.
fn why_gone(from_dest: &Receiver<ToSource>) -> Error {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
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
    std::thread::scope(|s| {
        let (chunk_tx, chunk_rx) = bounded::<Result<Chunk>>(config.buffers);
        s.spawn(move || read_source(src, config, &pool, chunk_tx, stats, cancel));
        let outcome = compare_and_send(src, config, &chunk_rx, &to_dest, &from_dest, stats, cancel);
        // Unblock the reader (its sends now fail) before the scope joins it.
        drop(chunk_rx);
        let end = match &outcome {
            Ok(()) => ToDest::Finish {
                size: layout.size,
                counts: Counts {
                    read: Stats::get(&stats.source_read),
                    same: Stats::get(&stats.blocks_same),
                    changed: Stats::get(&stats.blocks_changed),
                    changed_bytes: Stats::get(&stats.changed_bytes),
                },
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

fn read_source(
    src: &Target,
    config: &Config,
    pool: &Pool,
    out: Sender<Result<Chunk>>,
    stats: &Stats,
    cancel: &AtomicBool,
) {
    let layout = config.layout;
    for index in 0..layout.chunks() {
        if cancel.load(Ordering::Relaxed) {
            return;
        }
        let (offset, len) = layout.chunk_at(index);
        let ahead = config.precomputed.as_ref().and_then(|p| p.get(offset));
        if ahead.is_some_and(|d| d.len() as u64 == (len as u64).div_ceil(layout.block)) {
            if out.send(Ok(Chunk { index, data: None })).is_err() {
                return;
            }
            continue;
        }
        let mut data = pool.get(len);
        let item = match target::read_full_at(&src.file, &mut data, offset) {
            Ok(n) if n == len => {
                Stats::add(&stats.source_read, len as u64);
                if config.drop_cache {
                    target::advise(&src.file, offset, len as u64, Advice::DontNeed);
                }
                Ok(Chunk {
                    index,
                    data: Some(data),
                })
            }
            Ok(n) => Err(Error::new(
                Kind::Source,
                format!(
                    "source {} shrank during the sync (short read at byte {}); sync from a snapshot or a read-only source",
                    src.path.display(),
                    offset + n as u64
                ),
            )),
            Err(e) => Err(Error::io(
                Kind::Io,
                "reading source",
                &src.path,
                &e,
                &format!("at byte {offset}"),
            )),
        };
        let failed = item.is_err();
        if out.send(item).is_err() || failed {
            return;
        }
    }
}

/// Which blocks of a chunk differ, as merged byte ranges within the chunk.
fn changed_ranges(
    config: &Config,
    chunk: &Chunk,
    theirs: &ToSource,
) -> Result<(Vec<Range<usize>>, u64)> {
    let block = config.layout.block as usize;
    let (offset, len) = config.layout.chunk_at(chunk.index);
    let ahead = config.precomputed.as_ref().and_then(|p| p.get(offset));
    let mine = |r: &Range<usize>| -> &[u8] {
        &chunk.data.as_ref().expect("read unless hashed ahead")[r.clone()]
    };
    let nblocks = len.div_ceil(block);
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut changed = 0u64;
    for j in 0..nblocks {
        let r = j * block..((j + 1) * block).min(len);
        let same = match (theirs, config.compare) {
            (ToSource::Bytes { data, .. }, _) => data.get(r.clone()) == Some(mine(&r)),
            // Hash only blocks the destination has: a new destination costs no hashing.
            (ToSource::Digests { digests, .. }, Compare::Digest(kind)) => digests
                .get(j)
                .is_some_and(|d| match ahead.and_then(|a| a.get(j)) {
                    Some(known) => d == known,
                    None => *d == kind.digest(mine(&r)),
                }),
            _ => unreachable!("checked by caller"),
        };
        if same {
            continue;
        }
        changed += 1;
        match ranges.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => ranges.push(r),
        }
    }
    Ok((ranges, changed))
}

/// Reads a changed range of a chunk that was hashed ahead and not kept.
fn read_range(src: &Target, offset: u64, len: usize, stats: &Stats) -> Result<Slice> {
    let mut buf = vec![0u8; len];
    match target::read_full_at(&src.file, &mut buf, offset) {
        Ok(n) if n == len => {
            Stats::add(&stats.source_read, len as u64);
            Ok(Slice::owned(buf))
        }
        Ok(_) => Err(Error::new(
            Kind::Source,
            format!(
                "source {} shrank during the sync; sync from a snapshot or a read-only source",
                src.path.display()
            ),
        )),
        Err(e) => Err(Error::io(
            Kind::Io,
            "reading source",
            &src.path,
            &e,
            &format!("at byte {offset}"),
        )),
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
    for index in 0..layout.chunks() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::new(Kind::Interrupted, "interrupted"));
        }
        let chunk = chunks
            .recv()
            .map_err(|_| Error::new(Kind::Interrupted, "interrupted"))??;
        let theirs = from_dest.recv().map_err(|_| lost_destination())?;
        let their_index = match &theirs {
            ToSource::Bytes { index, .. } | ToSource::Digests { index, .. } => *index,
            ToSource::Failed { kind, message } => return Err(Error::new(*kind, message.clone())),
            ToSource::Done { .. } => {
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
        if let (Compare::Digest(_), ToSource::Bytes { .. }) = (config.compare, &theirs) {
            return Err(Error::new(
                Kind::Protocol,
                "destination sent bytes, not digests",
            ));
        }
        let (ranges, changed) = changed_ranges(config, &chunk, &theirs)?;
        drop(theirs); // hand the destination's buffer back before waiting on anything else
        let (offset, len) = layout.chunk_at(index);
        let nblocks = (len as u64).div_ceil(layout.block);
        Stats::add(&stats.blocks_changed, changed);
        let changed_bytes: usize = ranges.iter().map(|r| r.len()).sum();
        Stats::add(&stats.changed_bytes, changed_bytes as u64);
        Stats::add(&stats.blocks_same, nblocks - changed);
        if !config.dry_run && !ranges.is_empty() {
            let shared = chunk.data.map(Arc::new);
            for r in ranges {
                let at = offset + r.start as u64;
                let data = match &shared {
                    Some(buf) => Slice::new(buf.clone(), r),
                    None => read_range(src, at, r.len(), stats)?,
                };
                let write = ToDest::Write { offset: at, data };
                to_dest.send(write).map_err(|_| why_gone(from_dest))?;
            }
        }
        Stats::add(&stats.done, len as u64);
        if !config.pause.is_zero() {
            std::thread::sleep(config.pause * nblocks as u32);
        }
    }
    Ok(())
}
