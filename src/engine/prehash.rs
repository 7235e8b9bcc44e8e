//! Hashing the local side while ssh logs in: the login takes a few hundred milliseconds
//! (much more over a WAN) during which the cores would idle. Whatever is hashed by the
//! time the remote side answers is not read or hashed again for comparison.

use super::Layout;
use crate::hash::BlockInfo;
use crate::hash::HashKind;
use crate::io::target;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// Most chunks hashed ahead (64 GiB at 4 MiB chunks).
const MAX_CHUNKS: usize = 16 << 10;
/// Most block entries kept (about 10 MiB), whatever the block size.
const MAX_ENTRIES: usize = 256 << 10;

/// Digests computed ahead, per chunk of the whole layout, from chunk 0 on.
#[derive(Debug, Default)]
pub struct Precomputed {
    chunk: u64,
    digests: Vec<Vec<BlockInfo>>,
    /// Bytes read to compute them.
    pub read: u64,
}

impl Precomputed {
    /// Drops the chunks at or past byte `end`: the other side holds nothing to compare
    /// them with (a push to a new or smaller destination), so they are better read and
    /// sent straight away than read twice.
    pub fn drop_from(&mut self, end: u64) {
        if self.chunk > 0 {
            self.digests.truncate(end.div_ceil(self.chunk) as usize);
        }
    }

    /// Keeps only the chunks that are the same under a layout of `real_size` bytes as
    /// under the `assumed_size` they were hashed for (a pull hashes the destination before
    /// the source's size is known).
    pub fn retain_matching(&mut self, assumed_size: u64, real_size: u64) {
        let c = self.chunk;
        let same = |i: usize| {
            let end = (i as u64 + 1) * c;
            end.min(assumed_size) == end.min(real_size)
        };
        let keep = (0..self.digests.len()).take_while(|&i| same(i)).count();
        self.digests.truncate(keep);
    }

    /// Digests of the blocks of the chunk starting at `offset` (only blocks the file held
    /// completely), if that chunk was hashed ahead.
    pub fn get(&self, offset: u64) -> Option<&[BlockInfo]> {
        if self.chunk == 0 || !offset.is_multiple_of(self.chunk) {
            return None;
        }
        self.digests
            .get((offset / self.chunk) as usize)
            .map(Vec::as_slice)
    }
}

/// A background pass hashing a file from the start until stopped.
pub struct Prehash {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Precomputed>,
}

/// What `data`, the bytes held at chunk `index` of `layout` (shorter than the chunk
/// where the file ends), holds per block: zero (also where `zeros` says so, without
/// looking), a digest, or missing for a block it does not hold completely.
pub fn chunk_info(
    kind: HashKind,
    layout: &Layout,
    index: u64,
    data: &[u8],
    zeros: &[bool],
) -> Vec<BlockInfo> {
    let (_, len) = layout.chunk_at(index);
    block_infos(kind, data, len, layout.block as usize, zeros)
}

/// What `data` (the held part of `len` bytes) holds per `block`-sized piece: zero (also
/// where `zeros` says so), a digest, or missing where it does not hold all of a piece.
pub fn block_infos(
    kind: HashKind,
    data: &[u8],
    len: usize,
    block: usize,
    zeros: &[bool],
) -> Vec<BlockInfo> {
    infos_at(kind, data, len, block, zeros, false)
}

/// What block `j` of `data` (the held part of `len` bytes) holds: zero (also where
/// `zeros` says so), missing where `data` ends inside it, else its digest (at full
/// strength when `full`).
fn block_info(
    kind: HashKind,
    data: &[u8],
    len: usize,
    block: usize,
    zeros: &[bool],
    full: bool,
    j: usize,
) -> BlockInfo {
    let r = j * block..((j + 1) * block).min(len);
    if zeros.get(j) == Some(&true) {
        BlockInfo::Zero
    } else if r.end > data.len() {
        BlockInfo::Missing
    } else if target::is_zero(&data[r.clone()]) {
        BlockInfo::Zero
    } else if full {
        BlockInfo::Digest(kind.digest(&data[r]))
    } else {
        BlockInfo::Digest(kind.block_digest(&data[r]))
    }
}

/// Like [`block_infos`], with digests at full strength when `full` (for `--verify`).
pub fn infos_at(
    kind: HashKind,
    data: &[u8],
    len: usize,
    block: usize,
    zeros: &[bool],
    full: bool,
) -> Vec<BlockInfo> {
    (0..len.div_ceil(block))
        .map(|j| block_info(kind, data, len, block, zeros, full, j))
        .collect()
}

/// Like [`infos_at`] (128-bit digests), hashing on several cores at once (a chunk holds
/// several blocks), and only the blocks `want` selects (the others come back
/// [`BlockInfo::Missing`]).
pub fn infos_par(
    kind: HashKind,
    data: &[u8],
    len: usize,
    block: usize,
    zeros: &[bool],
    want: &(dyn Fn(usize) -> bool + Sync),
) -> Vec<BlockInfo> {
    let n = len.div_ceil(block);
    let one = |j: usize| -> BlockInfo {
        match want(j) {
            true => block_info(kind, data, len, block, zeros, false, j),
            false => BlockInfo::Missing,
        }
    };
    // XXH3 outruns reading: another thread would only take the reader's core.
    let threads = if kind == HashKind::Xxh3 {
        1
    } else {
        hash_threads().min(n)
    };
    if threads <= 1 || len < (256 << 10) {
        return (0..n).map(one).collect();
    }
    let per = n.div_ceil(threads);
    let mut out = vec![BlockInfo::Missing; n];
    std::thread::scope(|s| {
        let mut parts = out.chunks_mut(per).enumerate();
        // This thread takes the first part: one thread fewer to start per chunk.
        let first = parts.next();
        for (t, part) in parts {
            let one = &one;
            s.spawn(move || {
                for (k, slot) in part.iter_mut().enumerate() {
                    *slot = one(t * per + k);
                }
            });
        }
        if let Some((_, part)) = first {
            for (k, slot) in part.iter_mut().enumerate() {
                *slot = one(k);
            }
        }
    });
    out
}

/// Threads worth hashing on: one per core.
fn hash_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Reads chunk `index` of `layout` from `file`, which holds `have` bytes, into the start
/// of `buf`: holes are not read (zero-filled), blocks past `have` are not held. Returns
/// how many bytes of the chunk the file holds, which blocks are holes, and the bytes read.
pub fn read_chunk(
    file: &File,
    extents: Option<&mut target::Extents>,
    layout: &Layout,
    index: u64,
    have: u64,
    buf: &mut [u8],
) -> Result<(usize, Vec<bool>, u64), (u64, std::io::Error)> {
    let (offset, len) = layout.chunk_at(index);
    let block = layout.block as usize;
    let want = have.saturating_sub(offset).min(len as u64) as usize;
    let ranges = extents.map(|e| e.data_in(offset..offset + want as u64));
    let mut holes = match &ranges {
        Some(r) => target::hole_blocks(r, offset, len, layout.block),
        None => vec![false; len.div_ceil(block)],
    };
    for (j, h) in holes.iter_mut().enumerate() {
        // A block the file does not hold completely is missing, not a hole.
        *h &= ((j + 1) * block).min(len) <= want;
    }
    let n = target::read_blocks_at(
        file,
        &mut buf[..want],
        offset,
        block,
        &holes,
        ranges.as_deref(),
    )?;
    Ok((want, holes, n))
}

impl Prehash {
    /// Starts hashing `file`, which holds `have` bytes, over `layout` (the whole range).
    /// `tkind` tells whether the file can report its holes, which are then not read.
    pub fn start(
        file: File,
        tkind: target::TargetKind,
        have: u64,
        layout: Layout,
        kind: HashKind,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Precomputed {
                chunk: layout.chunk,
                ..Precomputed::default()
            };
            let mut buf = vec![0u8; layout.chunk as usize];
            let mut entries = 0;
            let mut extents = target::Extents::new(&file, tkind);
            for index in 0..layout.chunks().min(MAX_CHUNKS as u64) {
                if flag.load(Ordering::Relaxed) || entries >= MAX_ENTRIES {
                    break;
                }
                let Ok((want, holes, n)) =
                    read_chunk(&file, extents.as_mut(), &layout, index, have, &mut buf)
                else {
                    break; // the real pass will meet and report the error
                };
                out.read += n;
                let info = chunk_info(kind, &layout, index, &buf[..want], &holes);
                entries += info.len();
                out.digests.push(info);
            }
            out
        });
        Prehash { stop, thread }
    }

    /// Stops and returns what was hashed so far.
    pub fn finish(self) -> Precomputed {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_complete_blocks_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let layout = Layout {
            chunk: 8192,
            ..Layout::new(12_000, 4096)
        };
        let pre = Prehash::start(
            File::open(&p).unwrap(),
            target::TargetKind::File,
            10_000,
            layout,
            HashKind::Xxh3,
        );
        // Let it run to the end: the file is tiny.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let pre = pre.finish();
        assert_eq!(pre.read, 10_000);
        let first = pre.get(0).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(
            first[1],
            BlockInfo::Digest(HashKind::Xxh3.block_digest(&data[4096..8192]))
        );
        // The second chunk holds 1808 of 3808 bytes: no complete block.
        assert_eq!(pre.get(8192).unwrap(), &[BlockInfo::Missing]);
        assert!(pre.get(4096).is_none());
        let mut pre = pre;
        pre.retain_matching(12_000, 12_000);
        assert!(pre.get(8192).is_some());
        pre.retain_matching(12_000, 20_000);
        assert!(pre.get(0).is_some() && pre.get(8192).is_none());
        pre.drop_from(0);
        assert!(pre.get(0).is_none());
    }
}
