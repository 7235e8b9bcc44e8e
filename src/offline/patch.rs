//! Offline syncs without a live link: `blocksync digest` writes a target's digests,
//! `blocksync diff` writes only the blocks of a source that differ from them (a patch),
//! `blocksync apply` checks that a target is in the state the patch expects, applies it,
//! and verifies the result against the source's full-strength digest.
//!
//! Patch layout: a header (magic, version, hash, block size, the source's size, the
//! expected target's size and a fingerprint of its digests, the target's name), records
//! (a block's data, zstd-compressed when that pays, or a zero range), an end record (the
//! record count and the source's whole digest), and a BLAKE3 checksum of everything
//! before it. A patch is checked whole before anything is written: a truncated or
//! corrupted patch, or one for another target, changes nothing.

use crate::digestfile::format::{DigestFile, Header};
use crate::engine::Layout;
use crate::error::{Error, Kind, Result, os_text};
use crate::hash::BlockInfo;
use crate::hash::HashKind;
use crate::io::codec::{put_u8, put_u64};
use crate::io::target::{self, Target};
use crate::offline::records::{R_END, R_ZERO, put_data_record, put_header};
use std::io::{self, BufWriter, Write};
use std::path::Path;

pub use crate::offline::apply::{Patch, apply};
pub use crate::offline::records::PatchHeader;

/// Reads a target chunk by chunk (holes not read) and hands each chunk's block states to
/// `each`: digests cut to 128 bits, and at full strength when `full` (for the source's
/// whole digest). Returns the bytes read.
pub fn scan(
    t: &Target,
    size: u64,
    block: u64,
    kind: HashKind,
    full: bool,
    mut each: impl FnMut(u64, &[u8], &[BlockInfo]) -> Result<()>,
) -> Result<u64> {
    let layout = Layout::new(size, block);
    let mut extents = target::Extents::new(&t.file, t.kind);
    let mut buf = vec![0u8; layout.chunk as usize];
    let mut read = 0;
    target::advise(&t.file, 0, 0, target::Advice::Sequential);
    for index in 0..layout.chunks() {
        let (offset, len) = layout.chunk_at(index);
        let (have, holes, n) = crate::engine::blockhash::read_chunk(
            &t.file,
            extents.as_mut(),
            &layout,
            index,
            t.size,
            &mut buf,
        )
        .map_err(|(at, e)| {
            Error::io(
                Kind::Source,
                "reading",
                &t.path,
                &e,
                &format!("at byte {at}"),
            )
        })?;
        read += n;
        let data = &buf[..have];
        let infos = if full {
            crate::engine::blockhash::hash_blocks(kind, data, len, block as usize, &holes, true)
        } else {
            crate::engine::blockhash::hash_blocks_par(
                kind,
                data,
                len,
                block as usize,
                &holes,
                &|_| true,
            )
        };
        each(offset, data, &infos)?;
    }
    Ok(read)
}

/// The 128-bit form of a block state (what digest files hold).
fn short(info: &BlockInfo) -> BlockInfo {
    match info {
        BlockInfo::Digest(d) => {
            let mut c = *d;
            c.0[crate::hash::BLOCK_DIGEST..].fill(0);
            BlockInfo::Digest(c)
        }
        other => *other,
    }
}

/// A running fingerprint of a sequence of block states (the "state" a patch expects).
#[derive(Default)]
pub(crate) struct Fingerprint(blake3::Hasher);

impl Fingerprint {
    pub(crate) fn add(&mut self, infos: &[BlockInfo], full: bool) {
        let n = if full {
            crate::hash::MAX_DIGEST
        } else {
            crate::hash::BLOCK_DIGEST
        };
        for i in infos {
            match i {
                BlockInfo::Missing => self.0.update(&[0]),
                BlockInfo::Zero => self.0.update(&[1]),
                BlockInfo::Digest(d) => self.0.update(&[2]).update(&d.0[..n]),
            };
        }
    }
    /// Adds block `index`'s state (for fingerprints over a subset of the blocks).
    pub(crate) fn add_at(&mut self, index: u64, info: &BlockInfo) {
        self.0.update(&index.to_le_bytes());
        self.add(std::slice::from_ref(info), false);
    }

    pub(crate) fn done(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// `blocksync digest`: the digests of `t` (its whole size) to `out`.
pub fn digest(
    t: &Target,
    block: u64,
    kind: HashKind,
    label: String,
    out: impl Write,
) -> Result<()> {
    let header = Header {
        hash: kind,
        block,
        size: t.size,
        target_size: t.size,
        sync_id: [0; 16],
        label,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<BlockInfo>>(16);
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            scan(t, t.size, block, kind, false, |_, _, infos| {
                tx.send(infos.to_vec())
                    .map_err(|_| Error::new(Kind::Io, "writing the digests failed"))
            })
        });
        let written = crate::digestfile::format::write_stream(BufWriter::new(out), &header, || {
            Ok(rx.recv().ok())
        });
        let scanned = reader
            .join()
            .unwrap_or_else(|_| Err(Error::new(Kind::Internal, "digest thread panicked")));
        scanned?;
        written.map_err(|e| Error::new(Kind::Io, format!("writing the digests: {}", os_text(&e))))
    })
}

/// What `diff` wrote.
#[derive(Debug, Default)]
pub struct DiffStats {
    /// Blocks whose data went into the patch.
    pub data_blocks: u64,
    /// Blocks that became zero ranges.
    pub zero_blocks: u64,
    /// Patch bytes.
    pub bytes: u64,
    /// Source bytes read.
    pub read: u64,
}

/// A writer that counts and checksums what passes.
struct Summed<W: Write> {
    inner: W,
    hash: blake3::Hasher,
    bytes: u64,
}

impl<W: Write> Write for Summed<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hash.update(&b[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `blocksync diff`: the blocks of `src` that differ from `against` into `out`.
pub fn diff(src: &Target, against: &DigestFile, level: i32, out: impl Write) -> Result<DiffStats> {
    let h = &against.header;
    let (block, kind) = (h.block, h.hash);
    let io_err = |e: io::Error| Error::new(Kind::Io, format!("writing the patch: {}", os_text(&e)));
    // The expected state: the fingerprint of every entry of the digest file.
    let mut expected = Fingerprint::default();
    let mut at = 0;
    while at < h.blocks() {
        let n = (h.blocks() - at).min(1 << 16) as usize;
        let e = against
            .entries(at, n)
            .map_err(|e| Error::new(Kind::Source, format!("reading the digest file: {e}")))?;
        expected.add(&e, false);
        at += n as u64;
    }
    let header = PatchHeader {
        hash: kind,
        block,
        source_size: src.size,
        target_size: h.target_size,
        expected: expected.done(),
        label: h.label.clone(),
    };
    let mut w = Summed {
        inner: BufWriter::with_capacity(1 << 20, out),
        hash: blake3::Hasher::new(),
        bytes: 0,
    };
    let mut head = Vec::new();
    put_header(&mut head, &header);
    w.write_all(&head).map_err(io_err)?;
    let mut stats = DiffStats::default();
    let mut whole = Fingerprint::default();
    // The blocks the patch leaves alone, as the target must hold them: what apply checks,
    // so an apply cut short can be run again (the blocks it wrote are rewritten anyway).
    let mut untouched = Fingerprint::default();
    let mut records = 0u64;
    stats.read = scan(src, src.size, block, kind, true, |offset, data, infos| {
        whole.add(infos, true);
        let first = offset / block;
        let theirs = against
            .entries(first, infos.len())
            .map_err(|e| Error::new(Kind::Source, format!("reading the digest file: {e}")))?;
        for (j, mine) in infos.iter().enumerate() {
            let same = match (mine, &theirs[j]) {
                (BlockInfo::Zero, BlockInfo::Zero) => true,
                (m @ BlockInfo::Digest(_), t @ BlockInfo::Digest(_)) => short(m) == *t,
                _ => false,
            };
            if same {
                untouched.add_at(first + j as u64, &theirs[j]);
                continue;
            }
            let at = offset + j as u64 * block;
            let r =
                (j as u64 * block) as usize..(((j + 1) as u64 * block) as usize).min(data.len());
            let mut rec = Vec::new();
            if *mine == BlockInfo::Zero {
                put_u8(&mut rec, R_ZERO);
                put_u64(&mut rec, at);
                put_u64(&mut rec, r.len() as u64);
                stats.zero_blocks += 1;
            } else {
                put_data_record(&mut rec, at, &data[r], level);
                stats.data_blocks += 1;
            }
            records += 1;
            w.write_all(&rec).map_err(io_err)?;
        }
        Ok(())
    })?;
    let mut end = vec![R_END];
    put_u64(&mut end, records);
    end.extend_from_slice(&whole.done());
    end.extend_from_slice(&untouched.done());
    w.write_all(&end).map_err(io_err)?;
    let sum = *w.hash.finalize().as_bytes();
    w.inner.write_all(&sum).map_err(io_err)?;
    w.inner.flush().map_err(io_err)?;
    stats.bytes = w.bytes + 32;
    Ok(stats)
}

/// Opens the target digest file for `diff`, with one-line errors.
pub fn open_against(path: &Path) -> Result<DigestFile> {
    DigestFile::open(path).map_err(|m| Error::new(Kind::Usage, m))
}
