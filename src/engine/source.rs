//! The source half: reads the source a chunk at a time on its own thread (skipping holes,
//! spotting zero blocks), compares each block with what the destination half reports,
//! and sends the changed ranges: data, or a tiny zero message for zero blocks.

use super::{Compare, Config, Stats};
use crate::error::{Error, Kind, Result};
use crate::pool::{Buf, Pool, Slice};
use crate::protocol::{BlockInfo, Counts, ToDest, ToSource};
use crate::target::{self, Advice, Extents, Target};
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
                    zero: Stats::get(&stats.blocks_zero),
                    holes: Stats::get(&stats.blocks_hole),
                    zeroed: Stats::get(&stats.blocks_zeroed),
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

/// Reads the blocks of a chunk that are not holes (runs of them at once) into `data`,
/// then marks which blocks are zero. Returns the bytes read.
fn read_blocks(
    src: &Target,
    offset: u64,
    block: usize,
    data: &mut [u8],
    zeros: &mut [bool],
) -> Result<u64> {
    let mut read = 0;
    let mut j = 0;
    while j < zeros.len() {
        if zeros[j] {
            j += 1;
            continue;
        }
        let run_end = (j..zeros.len()).find(|&k| zeros[k]).unwrap_or(zeros.len());
        let r = j * block..(run_end * block).min(data.len());
        let at = offset + r.start as u64;
        match target::read_full_at(&src.file, &mut data[r.clone()], at) {
            Ok(n) if n == r.len() => read += n as u64,
            Ok(n) => return Err(shrank(src, at + n as u64)),
            Err(e) => return Err(read_error(src, at, &e)),
        }
        for (k, z) in zeros.iter_mut().enumerate().take(run_end).skip(j) {
            let b = k * block..((k + 1) * block).min(data.len());
            *z = target::is_zero(&data[b]);
        }
        j = run_end;
    }
    Ok(read)
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
    let block = layout.block as usize;
    let mut extents = Extents::new(&src.file, src.kind);
    for index in 0..layout.chunks() {
        if cancel.load(Ordering::Relaxed) {
            return;
        }
        let (offset, len) = layout.chunk_at(index);
        let nblocks = len.div_ceil(block);
        let ahead = config.precomputed.as_ref().and_then(|p| p.get(offset));
        if let Some(ahead) = ahead.filter(|a| a.len() == nblocks) {
            let zeros: Vec<bool> = ahead.iter().map(|b| *b == BlockInfo::Zero).collect();
            count_zeros(stats, &zeros, 0);
            if out
                .send(Ok(Chunk {
                    index,
                    data: None,
                    zeros,
                }))
                .is_err()
            {
                return;
            }
            continue;
        }
        // Blocks wholly in holes are zero without reading them.
        let mut zeros = match extents.as_mut() {
            Some(e) => target::hole_blocks(
                &e.data_in(offset..offset + len as u64),
                offset,
                len,
                layout.block,
            ),
            None => vec![false; nblocks],
        };
        let holes = zeros.iter().filter(|&&z| z).count();
        Stats::add(&stats.blocks_hole, holes as u64);
        let item = if holes == nblocks {
            Ok(Chunk {
                index,
                data: None,
                zeros,
            })
        } else {
            let mut data = pool.get(len);
            read_blocks(src, offset, block, &mut data, &mut zeros).map(|n| {
                Stats::add(&stats.source_read, n);
                if config.drop_cache {
                    target::advise(&src.file, offset, len as u64, Advice::DontNeed);
                }
                Chunk {
                    index,
                    data: Some(data),
                    zeros,
                }
            })
        };
        if let Ok(c) = &item {
            count_zeros(stats, &c.zeros, 0);
        }
        let failed = item.is_err();
        if out.send(item).is_err() || failed {
            return;
        }
    }
}

fn count_zeros(stats: &Stats, zeros: &[bool], _: u64) {
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
}

/// Granularity of the zero pages left out of [`Send::DataOverZero`] runs: the usual
/// filesystem block.
const PAGE: usize = 4096;

/// The non-zero pages of `data` (a run starting at chunk offset `base`), as ranges.
fn nonzero_pages(data: &[u8], base: usize) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, page) in data.chunks(PAGE).enumerate() {
        if target::is_zero(page) {
            continue;
        }
        let r = base + i * PAGE..base + i * PAGE + page.len();
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// Which blocks of a chunk differ, as merged byte ranges within the chunk, each sent as
/// data or as zeros.
fn changed_ranges(config: &Config, chunk: &Chunk, theirs: &ToSource) -> Vec<(Range<usize>, Send)> {
    let block = config.layout.block as usize;
    let (offset, len) = config.layout.chunk_at(chunk.index);
    let ahead = config.precomputed.as_ref().and_then(|p| p.get(offset));
    let mine = |r: &Range<usize>| -> &[u8] {
        &chunk
            .data
            .as_ref()
            .expect("data blocks are read unless hashed ahead")[r.clone()]
    };
    let mut ranges: Vec<(Range<usize>, Send)> = Vec::new();
    for (j, &zero) in chunk.zeros.iter().enumerate() {
        let r = j * block..((j + 1) * block).min(len);
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
                    (false, false) => (data.get(r.clone()) != Some(mine(&r))).then_some(Send::Data),
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
                                Compare::Digest(kind) => kind.digest(mine(&r)) == d,
                                Compare::Bytes => false,
                            },
                        };
                        (!same).then_some(Send::Data)
                    }
                    (false, BlockInfo::Zero) if config.sparse => Some(Send::DataOverZero),
                    (false, _) => Some(Send::Data),
                }
            }
            _ => unreachable!("checked by caller"),
        };
        let Some(how) = change else { continue };
        match ranges.last_mut() {
            Some((last, h)) if last.end == r.start && *h == how => last.end = r.end,
            _ => ranges.push((r, how)),
        }
    }
    ranges
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
        let ranges = changed_ranges(config, &chunk, &theirs);
        drop(theirs); // hand the destination's buffer back before waiting on anything else
        let (offset, len) = layout.chunk_at(index);
        let nblocks = len.div_ceil(block) as u64;
        let blocks_in = |r: &Range<usize>| (r.len().div_ceil(block)) as u64;
        let changed: u64 = ranges.iter().map(|(r, _)| blocks_in(r)).sum();
        let zeroed: u64 = ranges
            .iter()
            .filter(|(_, h)| *h == Send::Zero)
            .map(|(r, _)| blocks_in(r))
            .sum();
        let changed_bytes: usize = ranges.iter().map(|(r, _)| r.len()).sum();
        Stats::add(&stats.blocks_changed, changed);
        Stats::add(&stats.blocks_zeroed, zeroed);
        Stats::add(&stats.changed_bytes, changed_bytes as u64);
        Stats::add(&stats.blocks_same, nblocks - changed);
        if !config.dry_run && !ranges.is_empty() {
            let shared = chunk.data.map(Arc::new);
            for (r, how) in ranges {
                let at = offset + r.start as u64;
                let data = match (how, &shared) {
                    (Send::Zero, _) => {
                        let msg = ToDest::Zero {
                            offset: at,
                            len: r.len() as u64,
                        };
                        to_dest.send(msg).map_err(|_| why_gone(from_dest))?;
                        continue;
                    }
                    (_, Some(buf)) => Slice::new(buf.clone(), r.clone()),
                    (_, None) => read_range(src, at, r.len(), stats)?,
                };
                let whole = std::iter::once(0..data.len()).collect();
                let pieces = if how == Send::DataOverZero {
                    nonzero_pages(&data, 0)
                } else {
                    whole
                };
                for p in pieces {
                    let msg = ToDest::Write {
                        offset: at + p.start as u64,
                        data: data.sub(p),
                    };
                    to_dest.send(msg).map_err(|_| why_gone(from_dest))?;
                }
            }
        }
        Stats::add(&stats.done, len as u64);
        if !config.pause.is_zero() {
            std::thread::sleep(config.pause * nblocks as u32);
        }
    }
    Ok(())
}
