//! Digest files: what a target holds, block by block, so a later run can compare against
//! them instead of reading the target. Used by `--digest-file` (the destination's digests,
//! kept on the source's machine), `blocksync digest`, and patches.
//!
//! Layout: a header (magic, version, hash, block size, sizes, sync id, the target's name),
//! then one fixed-size entry per block (so entries are read and written in place, in any
//! order, in bounded memory), then a BLAKE3 checksum of everything before it. A file whose
//! checksum does not match is refused as a whole.

use crate::hash::BlockInfo;
use crate::hash::{BLOCK_DIGEST, Digest, HashKind, MAX_DIGEST};
use crate::io::codec::{Rd, put_text, put_u8, put_u16, put_u64};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 16] = b"BLKSYNC-DIGESTS\0";
const VERSION: u16 = 1;
/// Bytes per entry: a state byte and a 128-bit digest.
pub const ENTRY: usize = 1 + BLOCK_DIGEST;
const CHECKSUM: usize = 32;
/// Longest target name stored.
const MAX_LABEL: usize = 8192;

/// What a digest file describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The digest of each block.
    pub hash: HashKind,
    /// Block size.
    pub block: u64,
    /// Bytes described (the blocks cover exactly this many).
    pub size: u64,
    /// The target's size when the digests were taken (a device may be larger than `size`).
    pub target_size: u64,
    /// Identifies the sync that left the target in this state; the target's side keeps the
    /// same id (see [`crate::digestfile::syncid`]). Zero: none.
    pub sync_id: [u8; 16],
    /// The target, as named by the run that made the file (`host:path` or a path).
    pub label: String,
}

impl Header {
    /// Number of block entries.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block)
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        put_u16(&mut out, VERSION);
        put_u8(&mut out, self.hash.id());
        for v in [self.block, self.size, self.target_size] {
            put_u64(&mut out, v);
        }
        out.extend_from_slice(&self.sync_id);
        put_text(&mut out, &self.label, MAX_LABEL);
        out
    }

    fn decode(r: &mut impl Read) -> Result<(Header, usize), String> {
        let mut fixed = [0u8; 16 + 2 + 1 + 24 + 16 + 4];
        r.read_exact(&mut fixed)
            .map_err(|_| "too short to be a digest file".to_string())?;
        // Every field below lies inside `fixed`: reading them cannot fall short.
        let mut f = Rd(&fixed);
        let whole = |_| "too short to be a digest file".to_string();
        if f.take(MAGIC.len()).map_err(whole)? != MAGIC {
            return Err("not a blocksync digest file".into());
        }
        let version = f.u16().map_err(whole)?;
        if version != VERSION {
            return Err(format!(
                "digest file version {version}; this blocksync reads {VERSION}"
            ));
        }
        let hash =
            HashKind::from_id(f.u8().map_err(whole)?).ok_or("unknown hash in digest file")?;
        let (block, size, target_size) = (
            f.u64().map_err(whole)?,
            f.u64().map_err(whole)?,
            f.u64().map_err(whole)?,
        );
        if !(crate::size::MIN_BLOCK..=crate::size::MAX_BLOCK).contains(&block)
            || size > i64::MAX as u64
        {
            return Err("digest file has an impossible block size or size".into());
        }
        let sync_id: [u8; 16] = f.array().map_err(whole)?;
        let n = f.u32().map_err(whole)? as usize;
        if n > MAX_LABEL {
            return Err("digest file has an oversized name".into());
        }
        let mut label = vec![0u8; n];
        r.read_exact(&mut label)
            .map_err(|_| "digest file is truncated".to_string())?;
        let label = String::from_utf8(label).map_err(|_| "digest file name is not UTF-8")?;
        let header = Header {
            hash,
            block,
            size,
            target_size,
            sync_id,
            label,
        };
        Ok((header, fixed.len() + n))
    }
}

/// One entry's bytes.
pub fn encode_entry(info: &BlockInfo) -> [u8; ENTRY] {
    let mut e = [0u8; ENTRY];
    match info {
        BlockInfo::Missing => {}
        BlockInfo::Zero => e[0] = 1,
        BlockInfo::Digest(d) => {
            e[0] = 2;
            e[1..].copy_from_slice(&d.0[..BLOCK_DIGEST]);
        }
    }
    e
}

/// One entry from its bytes.
pub fn decode_entry(e: &[u8]) -> Result<BlockInfo, String> {
    match e[0] {
        0 => Ok(BlockInfo::Missing),
        1 => Ok(BlockInfo::Zero),
        2 => {
            let mut d = [0u8; MAX_DIGEST];
            d[..BLOCK_DIGEST].copy_from_slice(&e[1..ENTRY]);
            Ok(BlockInfo::Digest(Digest(d)))
        }
        x => Err(format!("bad entry state {x} in digest file")),
    }
}

/// A digest file opened for reading, its checksum verified.
#[derive(Debug)]
pub struct DigestFile {
    /// What it describes.
    pub header: Header,
    file: File,
    entries_at: u64,
}

impl DigestFile {
    /// Opens and checks `path`. Errors are one line for the user.
    pub fn open(path: &Path) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| {
            format!(
                "digest file {}: {}",
                path.display(),
                crate::error::os_text(&e)
            )
        })?;
        let bad = |m: String| format!("digest file {}: {m}", path.display());
        let (header, at) = Header::decode(&mut io::BufReader::new(&file)).map_err(bad)?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        let want = at as u64 + header.blocks() * ENTRY as u64 + CHECKSUM as u64;
        if len != want {
            return Err(bad(format!(
                "is {len} bytes, expected {want}: truncated or damaged"
            )));
        }
        // The whole file is checked once here, so every entry read later can be trusted.
        io::Seek::rewind(&mut &file).map_err(|e| bad(e.to_string()))?;
        let mut h = blake3::Hasher::new();
        let mut r = io::BufReader::with_capacity(1 << 20, &file).take(len - CHECKSUM as u64);
        io::copy(&mut r, &mut h).map_err(|e| bad(e.to_string()))?;
        let mut sum = [0u8; CHECKSUM];
        file.read_exact_at(&mut sum, len - CHECKSUM as u64)
            .map_err(|e| bad(e.to_string()))?;
        if *h.finalize().as_bytes() != sum {
            return Err(bad("checksum mismatch: damaged".into()));
        }
        Ok(DigestFile {
            header,
            file,
            entries_at: at as u64,
        })
    }

    /// Entries of blocks `first..first + n` (entries past the end are missing).
    pub fn entries(&self, first: u64, n: usize) -> io::Result<Vec<BlockInfo>> {
        let total = self.header.blocks();
        let have = total.saturating_sub(first).min(n as u64) as usize;
        let mut raw = vec![0u8; have * ENTRY];
        self.file
            .read_exact_at(&mut raw, self.entries_at + first * ENTRY as u64)?;
        let mut out: Vec<BlockInfo> = raw
            .chunks(ENTRY)
            .map(|e| decode_entry(e).map_err(io::Error::other))
            .collect::<io::Result<_>>()?;
        out.resize(n, BlockInfo::Missing);
        Ok(out)
    }
}

/// Writes a digest file in place, entries in any order, then seals it atomically.
#[derive(Debug)]
pub struct DigestWriter {
    header: Header,
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    entries_at: u64,
}

impl DigestWriter {
    /// Starts a new file that will replace `path` when [`DigestWriter::finish`]ed; every
    /// entry starts missing.
    pub fn create(path: &Path, header: Header) -> io::Result<Self> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let head = header.encode();
        file.write_all_at(&head, 0)?;
        // Missing entries are all-zero bytes: a sparse file of the right length.
        file.set_len(head.len() as u64 + header.blocks() * ENTRY as u64)?;
        Ok(DigestWriter {
            header,
            path: path.to_path_buf(),
            tmp,
            file,
            entries_at: head.len() as u64,
        })
    }

    /// What the file will describe.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Where it goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes the recorded target size (`u64::MAX`: unknown).
    pub fn set_target_size(&mut self, size: u64) -> io::Result<()> {
        self.header.target_size = size;
        // Its place in the header: magic, version, hash, block, size.
        self.file
            .write_all_at(&size.to_le_bytes(), 16 + 2 + 1 + 8 + 8)
    }

    /// Sets the entries of blocks `first..`.
    pub fn put(&self, first: u64, infos: &[BlockInfo]) -> io::Result<()> {
        let n = (self.header.blocks().saturating_sub(first) as usize).min(infos.len());
        let mut raw = Vec::with_capacity(n * ENTRY);
        for i in &infos[..n] {
            raw.extend_from_slice(&encode_entry(i));
        }
        self.file
            .write_all_at(&raw, self.entries_at + first * ENTRY as u64)
    }

    /// Appends the checksum, flushes, and renames the file into place.
    pub fn finish(self) -> io::Result<()> {
        let len = self.entries_at + self.header.blocks() * ENTRY as u64;
        io::Seek::rewind(&mut &self.file)?;
        let mut h = blake3::Hasher::new();
        let mut r = io::BufReader::with_capacity(1 << 20, &self.file).take(len);
        io::copy(&mut r, &mut h)?;
        self.file.write_all_at(h.finalize().as_bytes(), len)?;
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename itself durable.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(()) // Drop's removal of the temporary name now finds nothing
    }
}

impl Drop for DigestWriter {
    fn drop(&mut self) {
        // Not finished (a failed run): the half-written file never replaces the old one.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes a whole digest file to `out` from a sequence of chunk entries (for `digest -o -`).
pub fn write_stream(
    mut out: impl Write,
    header: &Header,
    mut chunks: impl FnMut() -> io::Result<Option<Vec<BlockInfo>>>,
) -> io::Result<()> {
    let mut h = blake3::Hasher::new();
    let head = header.encode();
    h.update(&head);
    out.write_all(&head)?;
    let mut written = 0u64;
    while let Some(infos) = chunks()? {
        for i in &infos {
            let e = encode_entry(i);
            h.update(&e);
            out.write_all(&e)?;
            written += 1;
        }
    }
    if written != header.blocks() {
        return Err(io::Error::other(format!(
            "{written} entries for {} blocks",
            header.blocks()
        )));
    }
    out.write_all(h.finalize().as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(size: u64) -> Header {
        Header {
            hash: HashKind::Blake3,
            block: 4096,
            size,
            target_size: size,
            sync_id: [7; 16],
            label: "host:/dev/vg/data".into(),
        }
    }

    #[test]
    fn written_in_any_order_reads_back_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let w = DigestWriter::create(&p, header(3 * 4096 + 1)).unwrap();
        let d = BlockInfo::Digest(HashKind::Blake3.block_digest(b"x"));
        w.put(2, &[BlockInfo::Zero, d]).unwrap();
        w.put(0, &[d]).unwrap();
        w.finish().unwrap();
        let f = DigestFile::open(&p).unwrap();
        assert_eq!(f.header, header(3 * 4096 + 1));
        let e = f.entries(0, 6).unwrap();
        assert_eq!(
            e,
            vec![
                d,
                BlockInfo::Missing,
                BlockInfo::Zero,
                d,
                BlockInfo::Missing,
                BlockInfo::Missing
            ]
        );
        // One flipped bit anywhere is refused.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[80] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert!(DigestFile::open(&p).unwrap_err().contains("damaged"));
        std::fs::write(&p, &bytes[..bytes.len() - 1]).unwrap();
        assert!(DigestFile::open(&p).unwrap_err().contains("truncated"));
    }

    #[test]
    fn an_unfinished_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let w = DigestWriter::create(&p, header(4096)).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn streamed_equals_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let d = BlockInfo::Digest(HashKind::Blake3.block_digest(b"y"));
        let mut out = Vec::new();
        let mut left = vec![vec![d, BlockInfo::Zero]];
        write_stream(&mut out, &header(8192), || Ok(left.pop())).unwrap();
        std::fs::write(&p, &out).unwrap();
        let f = DigestFile::open(&p).unwrap();
        assert_eq!(f.entries(0, 2).unwrap(), vec![d, BlockInfo::Zero]);
    }
}
