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
use crate::io::codec::{Rd, Short, put_text, put_u8, put_u16, put_u32, put_u64};
use crate::io::target::{self, Target, TargetKind};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

const MAGIC: &[u8; 16] = b"BLKSYNC-PATCH\0\0\0";
const VERSION: u16 = 1;
const R_END: u8 = 0;
const R_DATA: u8 = 1;
const R_ZERO: u8 = 2;
/// Longest target name stored.
const MAX_LABEL: usize = 8192;

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
        let (have, holes, n) = crate::engine::prehash::read_chunk(
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
            crate::engine::prehash::infos_at(kind, data, len, block as usize, &holes, true)
        } else {
            crate::engine::prehash::infos_par(kind, data, len, block as usize, &holes, &|_| true)
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
struct Fingerprint(blake3::Hasher);

impl Fingerprint {
    fn add(&mut self, infos: &[BlockInfo], full: bool) {
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
    fn add_at(&mut self, index: u64, info: &BlockInfo) {
        self.0.update(&index.to_le_bytes());
        self.add(std::slice::from_ref(info), false);
    }

    fn done(&self) -> [u8; 32] {
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

fn put_header(out: &mut Vec<u8>, h: &PatchHeader) {
    out.extend_from_slice(MAGIC);
    put_u16(out, VERSION);
    put_u8(out, h.hash.id());
    for v in [h.block, h.source_size, h.target_size] {
        put_u64(out, v);
    }
    out.extend_from_slice(&h.expected);
    put_text(out, &h.label, MAX_LABEL);
}

/// A data record: offset, raw length, codec (1: zstd at `level`, when that saves at least
/// 1/16; 0: as is), stored length, bytes.
fn put_data_record(rec: &mut Vec<u8>, at: u64, raw: &[u8], level: i32) {
    put_u8(rec, R_DATA);
    put_u64(rec, at);
    put_u32(rec, raw.len() as u32);
    // Level 0 is off: not even tried (the result would be thrown away).
    let packed = (level > 0).then(|| compress(raw, level));
    match packed {
        Some(Ok(c)) if c.len() < raw.len() - raw.len() / 16 => {
            put_u8(rec, 1);
            put_u32(rec, c.len() as u32);
            rec.extend_from_slice(&c);
        }
        _ => {
            put_u8(rec, 0);
            put_u32(rec, raw.len() as u32);
            rec.extend_from_slice(raw);
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Blocks this thread compressed, so a test can tell that level 0 compresses none.
    static COMPRESSED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// `raw` compressed with zstd at `level`.
fn compress(raw: &[u8], level: i32) -> io::Result<Vec<u8>> {
    #[cfg(test)]
    COMPRESSED.with(|c| c.set(c.get() + 1));
    zstd::bulk::compress(raw, level)
}

/// What a patch applies to and produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchHeader {
    /// Block digest.
    pub hash: HashKind,
    /// Block size.
    pub block: u64,
    /// The source's size: the target's size after applying (files).
    pub source_size: u64,
    /// The target's size the patch expects.
    pub target_size: u64,
    /// Fingerprint of the expected target's block digests.
    pub expected: [u8; 32],
    /// The target's name as its digest file gave it.
    pub label: String,
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

fn bad_patch(what: &str) -> Error {
    Error::new(
        Kind::Source,
        format!("{what}; nothing was written (a patch is checked whole before it is applied)"),
    )
}

/// A patch read and checked whole (a copy of stdin is kept in a temporary file).
pub struct Patch {
    /// What it applies to and produces.
    pub header: PatchHeader,
    file: File,
    records_at: u64,
    /// The source's whole digest.
    pub source_digest: [u8; 32],
    /// Fingerprint of the blocks the patch leaves alone, as the target must hold them.
    untouched: [u8; 32],
    /// Blocks the patch writes, ascending.
    touched: Vec<u64>,
}

impl Patch {
    /// Reads `path` (`-`: stdin) and checks its checksum, structure and end record.
    pub fn open(path: &Path) -> Result<Patch> {
        let file = if path == Path::new("-") {
            // Spooled, so nothing is applied before the whole patch has arrived intact.
            let mut tmp = tempfile_in_tmp()?;
            io::copy(&mut io::stdin().lock(), &mut tmp).map_err(|e| {
                bad_patch(&format!("reading the patch from stdin: {}", os_text(&e)))
            })?;
            tmp
        } else {
            File::open(path).map_err(|e| Error::io(Kind::Source, "patch", path, &e, ""))?
        };
        let len = file
            .metadata()
            .map_err(|e| Error::io(Kind::Source, "patch", path, &e, ""))?
            .len();
        if len < 16 + 32 {
            return Err(bad_patch("the patch is truncated"));
        }
        let mut h = blake3::Hasher::new();
        let mut r = BufReader::with_capacity(1 << 20, &file);
        io::Seek::rewind(&mut r).map_err(|e| bad_patch(&e.to_string()))?;
        io::copy(&mut (&mut r).take(len - 32), &mut h).map_err(|e| bad_patch(&e.to_string()))?;
        let mut sum = [0u8; 32];
        r.read_exact(&mut sum)
            .map_err(|e| bad_patch(&e.to_string()))?;
        let mut head = [0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0)
            .map_err(|e| bad_patch(&e.to_string()))?;
        if &head != MAGIC {
            return Err(bad_patch("not a blocksync patch"));
        }
        if *h.finalize().as_bytes() != sum {
            return Err(bad_patch(
                "the patch is truncated or corrupted (checksum mismatch)",
            ));
        }
        let mut r = BufReader::new(&file);
        io::Seek::rewind(&mut r).map_err(|e| bad_patch(&e.to_string()))?;
        let header = read_header(&mut r)?;
        let records_at =
            io::Seek::stream_position(&mut r).map_err(|e| bad_patch(&e.to_string()))?;
        // Walk the records to find the end record: the structure must hold too.
        let mut count = 0u64;
        let mut touched = Vec::new();
        let (records, source_digest, untouched) = loop {
            let rec = read_record(&mut r, &header)?;
            match rec {
                Record::End {
                    records,
                    digest,
                    untouched,
                } => break (records, digest, untouched),
                Record::Data { offset, .. } | Record::Zero { offset, .. } => {
                    touched.push(offset / header.block);
                    count += 1;
                }
            }
        };
        touched.sort_unstable();
        let records_end =
            io::Seek::stream_position(&mut r).map_err(|e| bad_patch(&e.to_string()))?;
        if records != count || records_end != len - 32 {
            return Err(bad_patch(
                "the patch's end record does not match its contents",
            ));
        }
        Ok(Patch {
            header,
            file,
            records_at,
            source_digest,
            untouched,
            touched,
        })
    }
}

fn tempfile_in_tmp() -> Result<File> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "blocksync-patch-{}-{:x}",
        std::process::id(),
        u64::from_le_bytes(
            crate::digestfile::syncid::fresh()[..8]
                .try_into()
                .expect("8")
        )
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            Error::io(
                Kind::Io,
                "temporary file",
                &path,
                &e,
                "set TMPDIR to a writable directory",
            )
        })?;
    let _ = std::fs::remove_file(&path); // unnamed: gone when closed
    Ok(f)
}

/// The next `N` bytes of a patch; its end is an error.
fn read_fixed<const N: usize>(r: &mut impl Read) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)
        .map_err(|_| bad_patch("the patch is truncated"))?;
    Ok(b)
}

/// A field of a part read whole with [`read_fixed`]: it lies inside, so it cannot fall
/// short.
fn field<T>(f: std::result::Result<T, Short>) -> T {
    f.expect("inside the fixed part")
}

fn read_header(r: &mut impl Read) -> Result<PatchHeader> {
    let fixed = read_fixed::<{ 16 + 2 + 1 + 24 + 32 + 4 }>(r)?;
    let mut f = Rd(&fixed);
    field(f.take(MAGIC.len())); // checked by Patch::open
    let version = field(f.u16());
    if version != VERSION {
        return Err(bad_patch(&format!(
            "patch version {version}; this blocksync reads {VERSION}"
        )));
    }
    let hash =
        HashKind::from_id(field(f.u8())).ok_or_else(|| bad_patch("unknown hash in the patch"))?;
    let (block, source_size, target_size) = (field(f.u64()), field(f.u64()), field(f.u64()));
    if !(crate::size::MIN_BLOCK..=crate::size::MAX_BLOCK).contains(&block)
        || source_size > i64::MAX as u64
        || target_size > i64::MAX as u64
    {
        return Err(bad_patch("the patch has an impossible block size or size"));
    }
    let expected: [u8; 32] = field(f.array());
    let n = field(f.u32()) as usize;
    if n > MAX_LABEL {
        return Err(bad_patch("the patch has an oversized name"));
    }
    let mut label = vec![0u8; n];
    r.read_exact(&mut label)
        .map_err(|_| bad_patch("the patch is truncated"))?;
    Ok(PatchHeader {
        hash,
        block,
        source_size,
        target_size,
        expected,
        label: String::from_utf8_lossy(&label).into_owned(),
    })
}

enum Record {
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    End {
        records: u64,
        digest: [u8; 32],
        untouched: [u8; 32],
    },
}

fn read_record(r: &mut impl Read, h: &PatchHeader) -> Result<Record> {
    let [tag] = read_fixed::<1>(r)?;
    match tag {
        R_END => {
            let b = read_fixed::<{ 8 + 32 + 32 }>(r)?;
            let mut f = Rd(&b);
            Ok(Record::End {
                records: field(f.u64()),
                digest: field(f.array()),
                untouched: field(f.array()),
            })
        }
        R_ZERO => {
            let b = read_fixed::<16>(r)?;
            let mut f = Rd(&b);
            let (offset, len) = (field(f.u64()), field(f.u64()));
            if len > h.block || offset.checked_add(len).is_none_or(|e| e > h.source_size) {
                return Err(bad_patch("the patch has a zero range out of bounds"));
            }
            Ok(Record::Zero { offset, len })
        }
        R_DATA => {
            let b = read_fixed::<{ 8 + 4 + 1 + 4 }>(r)?;
            let mut f = Rd(&b);
            let (offset, raw) = (field(f.u64()), field(f.u32()) as u64);
            let (codec, n) = (field(f.u8()), field(f.u32()) as u64);
            if raw > h.block
                || n > h.block + 1024
                || offset.checked_add(raw).is_none_or(|e| e > h.source_size)
            {
                return Err(bad_patch("the patch has a block out of bounds"));
            }
            let mut bytes = vec![0u8; n as usize];
            r.read_exact(&mut bytes)
                .map_err(|_| bad_patch("the patch is truncated"))?;
            let data = match codec {
                0 if n == raw => bytes,
                1 => zstd::bulk::decompress(&bytes, raw as usize)
                    .ok()
                    .filter(|d| d.len() as u64 == raw)
                    .ok_or_else(|| bad_patch("the patch has a corrupt block"))?,
                _ => return Err(bad_patch("the patch has a bad block record")),
            };
            Ok(Record::Data { offset, data })
        }
        x => Err(bad_patch(&format!("the patch has an unknown record {x}"))),
    }
}

/// What `apply` did.
#[derive(Debug, Default)]
pub struct ApplyStats {
    /// Records applied.
    pub records: u64,
    /// Bytes written.
    pub written: u64,
    /// Target bytes read (the state check and the verification).
    pub read: u64,
}

/// `blocksync apply`: checks `t` is the state `p` expects, applies, flushes, verifies.
pub fn apply(p: &Patch, t: &Target) -> Result<ApplyStats> {
    let h = &p.header;
    let name = t.path.display().to_string();
    // The blocks both sizes hold: the target must have them (an apply cut short may have
    // grown a file already; it is resized only at the end).
    let common = h.target_size.min(h.source_size);
    let size_ok = match t.kind {
        TargetKind::File => {
            t.size == h.target_size || (t.size >= common && t.size <= h.source_size)
        }
        TargetKind::BlockDevice => t.size == h.target_size,
    };
    if !size_ok {
        return Err(Error::new(
            Kind::StaleCache,
            format!(
                "{name} is {} bytes, the patch is for a target of {} ({}); nothing was written",
                t.size, h.target_size, h.label
            ),
        ));
    }
    if t.kind == TargetKind::BlockDevice && t.size < h.source_size {
        return Err(Error::new(
            Kind::TooSmall,
            format!(
                "device {name} is {} bytes, the patch makes {}; nothing was written",
                t.size, h.source_size
            ),
        ));
    }
    let mut stats = ApplyStats::default();
    let mut state = Fingerprint::default();
    let mut next = p.touched.iter().peekable();
    stats.read += scan(t, common, h.block, h.hash, false, |offset, _, infos| {
        let first = offset / h.block;
        for (j, info) in infos.iter().enumerate() {
            let b = first + j as u64;
            while next.next_if(|&&t| t < b).is_some() {}
            if next.peek() == Some(&&b) {
                continue; // rewritten whole by the patch: its old content does not matter
            }
            state.add_at(b, info);
        }
        Ok(())
    })?;
    if state.done() != p.untouched {
        return Err(Error::new(
            Kind::StaleCache,
            format!(
                "{name} is not in the state the patch expects (it is for {} as its digests described it); nothing was written",
                h.label
            ),
        ));
    }
    // Checked: apply.
    let mut r = BufReader::with_capacity(1 << 20, &p.file);
    io::Seek::seek(&mut r, io::SeekFrom::Start(p.records_at))
        .map_err(|e| bad_patch(&e.to_string()))?;
    let werr = |at: u64, e: io::Error| {
        Error::io(
            Kind::Io,
            "writing",
            &t.path,
            &e,
            &format!("at byte {at}; run apply again once fixed"),
        )
    };
    loop {
        match read_record(&mut r, h)? {
            Record::End { .. } => break,
            Record::Data { offset, data } => {
                target::write_full_at(&t.file, &data, offset).map_err(|e| werr(offset, e))?;
                stats.written += data.len() as u64;
            }
            Record::Zero { offset, len } => {
                let done = match t.kind {
                    TargetKind::File => target::punch_hole(&t.file, offset, len),
                    TargetKind::BlockDevice => Err(io::ErrorKind::Unsupported.into()),
                };
                if done.is_err() {
                    target::write_zeros(&t.file, offset, len).map_err(|e| werr(offset, e))?;
                }
            }
        }
        stats.records += 1;
    }
    if t.kind == TargetKind::File && t.size != h.source_size {
        t.file
            .set_len(h.source_size)
            .map_err(|e| werr(h.source_size, e))?;
    }
    t.file.sync_all().map_err(|e| werr(0, e))?;
    // Verify at full strength against the source's digest, from the disk.
    target::advise(&t.file, 0, 0, target::Advice::DontNeed);
    let now = Target {
        size: match t.kind {
            TargetKind::File => h.source_size,
            TargetKind::BlockDevice => t.size,
        },
        path: t.path.clone(),
        file: t.file.try_clone().map_err(|e| werr(0, e))?,
        kind: t.kind,
        id: t.id,
    };
    let mut whole = Fingerprint::default();
    stats.read += scan(&now, h.source_size, h.block, h.hash, true, |_, _, infos| {
        whole.add(infos, true);
        Ok(())
    })?;
    if whole.done() != p.source_digest {
        return Err(Error::new(
            Kind::Verify,
            format!(
                "after applying, {name} does not match the source's digest; check the target's disk and apply again"
            ),
        ));
    }
    Ok(stats)
}

/// Opens the target digest file for `diff`, with one-line errors.
pub fn open_against(path: &Path) -> Result<DigestFile> {
    DigestFile::open(path).map_err(|m| Error::new(Kind::Usage, m))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `-C 0` means off: records go as they are and nothing is compressed only to be
    /// thrown away (every block was, once).
    #[test]
    fn level_zero_writes_raw_records_without_compressing() {
        let text: Vec<u8> = (0..65536).map(|i| b"patch "[i % 6]).collect();
        let compressed = || COMPRESSED.with(|c| c.get());
        let before = compressed();
        let mut rec = Vec::new();
        put_data_record(&mut rec, 4096, &text, 0);
        assert_eq!(compressed(), before, "level 0 compressed a block");
        let mut raw = vec![R_DATA];
        raw.extend_from_slice(&4096u64.to_le_bytes());
        raw.extend_from_slice(&65536u32.to_le_bytes());
        raw.push(0);
        raw.extend_from_slice(&65536u32.to_le_bytes());
        raw.extend_from_slice(&text);
        assert_eq!(rec, raw);
        // A level above 0 still compresses what shrinks.
        let mut rec = Vec::new();
        put_data_record(&mut rec, 4096, &text, 3);
        assert_eq!(compressed(), before + 1);
        assert_eq!(rec[13], 1, "codec zstd");
        assert!(rec.len() < raw.len() / 4);
    }
}
