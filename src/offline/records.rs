//! The patch file format: header, records (a block's data, zstd-compressed when that
//! pays, or a zero range), and the end record, written and read back with the shared
//! little-endian codec. Bounds are checked on reading: a bad patch is an error naming
//! what is wrong, never a panic.

use crate::error::{Error, Kind, Result};
use crate::hash::HashKind;
use crate::io::codec::{Rd, Short, put_text, put_u8, put_u16, put_u32, put_u64};
use std::io::{self, Read};

pub(crate) const MAGIC: &[u8; 16] = b"BLKSYNC-PATCH\0\0\0";
const VERSION: u16 = 1;
pub(crate) const R_END: u8 = 0;
pub(crate) const R_DATA: u8 = 1;
pub(crate) const R_ZERO: u8 = 2;
/// Longest target name stored.
const MAX_LABEL: usize = 8192;

pub(crate) fn put_header(out: &mut Vec<u8>, h: &PatchHeader) {
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
pub(crate) fn put_data_record(rec: &mut Vec<u8>, at: u64, raw: &[u8], level: i32) {
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

pub(crate) fn bad_patch(what: &str) -> Error {
    Error::new(
        Kind::Source,
        format!("{what}; nothing was written (a patch is checked whole before it is applied)"),
    )
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

pub(crate) fn read_header(r: &mut impl Read) -> Result<PatchHeader> {
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

/// One record of a patch.
pub(crate) enum Record {
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

pub(crate) fn read_record(r: &mut impl Read, h: &PatchHeader) -> Result<Record> {
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
