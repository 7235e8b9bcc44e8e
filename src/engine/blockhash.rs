//! What the blocks of a chunk hold: zero, missing, or a digest, hashed on one thread or
//! several; and reading a chunk to hash it (holes not read). Shared by both halves, hashing
//! ahead and the offline commands, so that every side describes a block the same way.

use super::Layout;
use crate::hash::BlockInfo;
use crate::hash::HashKind;
use crate::io::target;
use std::fs::File;

/// What `data`, the bytes held at chunk `index` of `layout` (shorter than the chunk
/// where the file ends), holds per block: zero (also where `zeros` says so, without
/// looking), a digest, or missing for a block it does not hold completely.
pub(crate) fn hash_chunk(
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
pub(crate) fn block_infos(
    kind: HashKind,
    data: &[u8],
    len: usize,
    block: usize,
    zeros: &[bool],
) -> Vec<BlockInfo> {
    hash_blocks(kind, data, len, block, zeros, false)
}

/// What block `j` of `data` (the held part of `len` bytes) holds: zero (also where
/// `zeros` says so), missing where `data` ends inside it, else its digest (at full
/// strength when `full`).
fn hash_block(
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
pub(crate) fn hash_blocks(
    kind: HashKind,
    data: &[u8],
    len: usize,
    block: usize,
    zeros: &[bool],
    full: bool,
) -> Vec<BlockInfo> {
    (0..len.div_ceil(block))
        .map(|j| hash_block(kind, data, len, block, zeros, full, j))
        .collect()
}

/// Like [`hash_blocks`] (128-bit digests), hashing on several cores at once (a chunk holds
/// several blocks), and only the blocks `want` selects (the others come back
/// [`BlockInfo::Missing`]).
pub(crate) fn hash_blocks_par(
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
            true => hash_block(kind, data, len, block, zeros, false, j),
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
pub(crate) fn read_chunk(
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
