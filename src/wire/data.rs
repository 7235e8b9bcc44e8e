//! A written block's payload on the wire: as is, or zstd-compressed when that pays.

use crate::io::pool::{Buf, Recycler, Slice};
use crate::wire::frame::{DecodeError, PRESIZE};
use std::sync::Arc;

/// A block payload on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// As is (shares the sender's buffer: no copy).
    Raw(Slice),
    /// zstd-compressed; `len` is the size after decompression.
    Zstd {
        /// Decompressed length.
        len: u32,
        /// Compressed bytes.
        bytes: Vec<u8>,
    },
}

impl Data {
    /// `raw` compressed at `level` when that saves at least 1/16, else as is.
    pub fn pack(raw: &Slice, level: i32) -> Data {
        match pack_bytes(raw, level) {
            Some(bytes) => Data::Zstd {
                len: raw.len() as u32,
                bytes,
            },
            None => Data::Raw(raw.clone()),
        }
    }

    /// The bytes as they travel (compressed or not).
    pub fn bytes(&self) -> &[u8] {
        match self {
            Data::Raw(b) => b,
            Data::Zstd { bytes, .. } => bytes,
        }
    }

    /// The bytes, decompressed, with a bounded output size.
    pub fn unpack(self) -> Result<Slice, DecodeError> {
        self.unpack_with(None)
    }

    /// [`Data::unpack`], decompressing into a page-aligned buffer from `recycler` (as raw
    /// blocks arrive), so compressed blocks too can be written with O_DIRECT.
    pub fn unpack_with(self, recycler: Option<&Recycler>) -> Result<Slice, DecodeError> {
        const ALIGN: usize = crate::io::target::DIRECT_ALIGN;
        match self {
            Data::Raw(b) => Ok(b),
            // Within the usual frame reservation: a spare never grows past it.
            Data::Zstd { len, bytes }
                if let Some(rc) = recycler
                    && len as usize + ALIGN <= PRESIZE =>
            {
                let n = len as usize;
                let (mut v, at) = rc.aligned(n, ALIGN);
                match zstd::bulk::decompress_to_buffer(&bytes, &mut v[at..at + n]) {
                    Ok(got) if got == n => {
                        Ok(Slice::new(Arc::new(Buf::recycled(v, rc)), at..at + n))
                    }
                    _ => Err(DecodeError::BadCompression),
                }
            }
            Data::Zstd { len, bytes } => {
                let out = zstd::bulk::decompress(&bytes, len as usize)
                    .map_err(|_| DecodeError::BadCompression)?;
                if out.len() != len as usize {
                    return Err(DecodeError::BadCompression);
                }
                Ok(Slice::owned(out))
            }
        }
    }
}

/// `raw` compressed at `level` if that saves at least 1/16; `None` (keep it as is) when
/// it does not, and at level 0 (off) without trying.
pub fn pack_bytes(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    if level <= 0 {
        return None;
    }
    zstd::bulk::compress(raw, level)
        .ok()
        .filter(|c| c.len() < raw.len() - raw.len() / 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_blocks_unpack_page_aligned_too() {
        let recycler = Recycler::new(2);
        let text: Vec<u8> = (0..(512 << 10)).map(|i| b"blocksync "[i % 10]).collect();
        let packed = Data::pack(&Slice::owned(text.clone()), 1);
        assert!(matches!(packed, Data::Zstd { .. }));
        let out = packed.clone().unpack_with(Some(&recycler)).unwrap();
        assert_eq!(&*out, &text[..]);
        assert!(
            out.as_ptr()
                .addr()
                .is_multiple_of(crate::io::target::DIRECT_ALIGN)
        );
        // A stated length the bytes do not fill, or exceed: refused either way.
        for len in [text.len() as u32 - 1, text.len() as u32 + 1] {
            let Data::Zstd { bytes, .. } = packed.clone() else {
                unreachable!()
            };
            let lying = Data::Zstd { len, bytes };
            assert_eq!(
                lying.unpack_with(Some(&recycler)),
                Err(DecodeError::BadCompression),
                "stated {len}"
            );
        }
    }
}
