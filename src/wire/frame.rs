//! Wire format, for halves on two machines.
//!
//! The server (the remote side) first writes [`GREETING`]. Then every message is a frame:
//! a little-endian u32 length (of what follows), a type byte, and the payload. Lengths are
//! bounded by [`MAX_FRAME`] before anything is allocated; every decoder checks each field
//! and rejects truncated, oversized or trailing bytes with an error, never a panic.
//!
//! Conversation: client Hello -> server Reply (or Failed) -> client Go (proceed or not),
//! then the engine messages both ways at once (digests one way, writes the other), ending
//! with the source's Finish or Abort and the destination's Done (or Failed).

use crate::engine::messages::{Counts, FindingKind};
use crate::error::Kind;
use crate::hash::{BLOCK_DIGEST, BlockInfo, Digest, HashKind, MAX_DIGEST};
use crate::io::pool::{Buf, Recycler, Slice};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// What the server writes before anything else: tells blocksync apart from a login banner
/// or a shell error.
pub const GREETING: &[u8; 8] = b"BLKSYNC\x01";
/// Protocol version; a mismatch ends the handshake with a clear error on both sides.
pub const VERSION: u16 = 4;
/// Largest frame accepted: a chunk of the largest block size plus headers.
pub const MAX_FRAME: usize = (crate::size::MAX_BLOCK as usize) + 1024;
/// Longest path or message text in a frame.
pub const MAX_TEXT: usize = 8192;
/// Most digests in one frame (a chunk of the smallest block size).
pub const MAX_DIGESTS: usize = (crate::engine::CHUNK_TARGET / crate::size::MIN_BLOCK) as usize;
/// Largest source or destination size in a frame: what `off_t` can address. Only a broken
/// or hostile peer sends more, and offsets past it would overflow range arithmetic.
pub const MAX_SIZE: u64 = i64::MAX as u64;

const T_HELLO: u8 = 1;
const T_REPLY: u8 = 2;
const T_GO: u8 = 3;
const T_DIGESTS: u8 = 16;
const T_WRITE: u8 = 17;
const T_FINISH: u8 = 18;
const T_ABORT: u8 = 19;
const T_DONE: u8 = 20;
const T_FAILED: u8 = 21;
const T_ZERO: u8 = 22;
const T_REFINE: u8 = 23;
const T_PIECES: u8 = 24;
const T_VERIFY: u8 = 25;
const T_FINDING: u8 = 26;
const T_CHECK: u8 = 27;

/// Hello flag: report only, write nothing.
pub const FLAG_DRY_RUN: u32 = 1;
/// Hello flag: write to a device even if it is mounted.
pub const FLAG_FORCE_MOUNTED: u32 = 2;
/// Hello flag: drop read pages from the cache on the server.
pub const FLAG_DROP_CACHE: u32 = 4;
/// Hello flag: write real zeros, never punch holes (`--no-sparse`).
pub const FLAG_NO_SPARSE: u32 = 8;
/// Hello flag: zero device ranges with BLKZEROOUT (`--discard`).
pub const FLAG_DISCARD: u32 = 16;
/// Hello flag: after the sync, a `--verify` pass over the same stream.
pub const FLAG_VERIFY: u32 = 32;
/// Hello flag: leave the destination's old bytes where the source is unreadable.
pub const FLAG_KEEP_UNREADABLE: u32 = 64;
/// Hello flag: the destination reports its sync id, forgets it before writing, and
/// records the Go's id once the sync completed and is flushed (for `--digest-file`).
pub const FLAG_TRACK_ID: u32 = 128;
/// Hello flag: the destination does not read itself (the source has its digests in a
/// digest file); it only answers [`ToDest::Check`] spot-checks.
pub const FLAG_NO_READ: u32 = 256;

/// Which half the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The server reads and sends blocks (pull).
    Source,
    /// The server receives and writes blocks (push).
    Dest,
}

/// The client's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The server's half.
    pub role: Role,
    /// The path on the server.
    pub path: String,
    /// Block size.
    pub block: u64,
    /// Block digest.
    pub hash: HashKind,
    /// zstd level the source compresses written blocks with; 0 = off.
    pub compress: i32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Sleep after each block, in ms.
    pub pause_ms: u64,
    /// For a destination server: the source size, to refuse a too-small device early.
    pub source_size: u64,
    /// Bandwidth limit for the source's sending, bytes per second; 0 = none.
    pub bwlimit: u64,
    /// Sub-block size for refining changed blocks; 0 = send changed blocks whole.
    pub refine: u64,
    /// For a source server: give up after this many unreadable ranges (`--max-errors`);
    /// `u64::MAX` = never.
    pub max_errors: u64,
}

/// The server's answer to [`Hello`] once its checks passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The size of the server's file or device (0 for a missing destination).
    pub size: u64,
    /// 0 missing, 1 file, 2 block device.
    pub kind: u8,
    /// With [`FLAG_TRACK_ID`]: the id of the last sync completed onto the destination
    /// (zeros: none).
    pub sync_id: [u8; 16],
}

/// The client's go-ahead (or not) after the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Go {
    /// False: the user declined; the server exits without writing.
    pub proceed: bool,
    /// The source size.
    pub size: u64,
    /// The byte range this stream syncs.
    pub start: u64,
    /// End of that range (exclusive).
    pub end: u64,
    /// With [`FLAG_TRACK_ID`]: the id the destination records once this sync completes.
    pub sync_id: [u8; 16],
    /// The destination need not read itself: the source compares against a digest file.
    pub no_read: bool,
}

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

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Reply`].
    Reply(Reply),
    /// See [`Go`].
    Go(Go),
    /// What the destination holds in each block of a chunk.
    Digests {
        /// Chunk number in the stream's range.
        index: u64,
        /// One per block.
        blocks: Vec<BlockInfo>,
    },
    /// Zero a range.
    Zero {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Ask for a block's sub-block digests.
    Refine {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// `--verify`: full-strength digests of a chunk's blocks.
    Verify {
        /// Chunk number in the stream's range.
        index: u64,
        /// One per block.
        blocks: Vec<BlockInfo>,
    },
    /// Spot-check a block.
    Check {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A byte range the user must hear about.
    Finding {
        /// What was found.
        kind: FindingKind,
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A block's sub-block digests.
    Pieces {
        /// Byte offset of the block.
        offset: u64,
        /// One per sub-block.
        pieces: Vec<BlockInfo>,
    },
    /// Bytes to write at an offset.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Data,
    },
    /// All sent; resize, flush, confirm.
    Finish {
        /// Source size.
        size: u64,
        /// The source half's counters.
        counts: Counts,
    },
    /// Stop early; flush, confirm.
    Abort {
        /// Exit-code kind of the cause.
        kind: Kind,
        /// The cause.
        message: String,
    },
    /// Everything is flushed.
    Done {
        /// Bytes written.
        written: u64,
        /// Bytes read.
        read: u64,
    },
    /// The peer failed.
    Failed {
        /// Exit-code kind.
        kind: Kind,
        /// One line.
        message: String,
    },
}

/// A frame that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than a field needs.
    #[error("frame truncated")]
    Truncated,
    /// Bytes left after the last field.
    #[error("frame has {0} trailing bytes")]
    Trailing(usize),
    /// A length or count over its bound.
    #[error("{0} too large")]
    TooLarge(&'static str),
    /// An unknown type, role, hash, kind or codec number.
    #[error("unknown {0} {1}")]
    Unknown(&'static str, u64),
    /// Text that is not UTF-8.
    #[error("text is not UTF-8")]
    BadText,
    /// A compressed payload that does not decompress to its stated length.
    #[error("compressed block is corrupt")]
    BadCompression,
    /// The other side speaks another protocol version.
    #[error("protocol version {0}, this blocksync speaks {VERSION}")]
    Version(u16),
    /// The stream does not start with the greeting or a Hello.
    #[error("not a blocksync stream")]
    BadMagic,
}

/// Checked reads from a frame payload.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn text(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        if n > MAX_TEXT {
            return Err(DecodeError::TooLarge("text"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError::BadText)
    }
    /// A number (chunk index or offset) and a list of block states.
    fn infos(&mut self, digest_len: usize) -> Result<(u64, Vec<BlockInfo>), DecodeError> {
        let at = self.u64()?;
        let n = self.u32()? as usize;
        if n > MAX_DIGESTS {
            return Err(DecodeError::TooLarge("digest count"));
        }
        let mut blocks = Vec::with_capacity(n.min(self.0.len()));
        for _ in 0..n {
            blocks.push(match self.u8()? {
                0 => BlockInfo::Missing,
                1 => BlockInfo::Zero,
                2 => BlockInfo::Digest(self.digest(digest_len)?),
                x => return Err(DecodeError::Unknown("block state", x.into())),
            });
        }
        Ok((at, blocks))
    }
    fn digest(&mut self, len: usize) -> Result<Digest, DecodeError> {
        let mut d = [0u8; MAX_DIGEST];
        d[..len].copy_from_slice(self.take(len)?);
        Ok(Digest(d))
    }
    fn kind_and_text(&mut self) -> Result<(Kind, String), DecodeError> {
        let k = self.u8()?;
        let kind = *Kind::ALL
            .get(k as usize)
            .ok_or(DecodeError::Unknown("error kind", k.into()))?;
        Ok((kind, self.text()?))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn end(self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.0.len()))
        }
    }
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    // Texts are ours (paths, messages): cut rather than fail, on a char boundary.
    let mut n = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

fn put_infos(out: &mut Vec<u8>, at: u64, blocks: &[BlockInfo], digest_len: usize) {
    out.extend_from_slice(&at.to_le_bytes());
    out.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    for b in blocks {
        match b {
            BlockInfo::Missing => out.push(0),
            BlockInfo::Zero => out.push(1),
            BlockInfo::Digest(d) => {
                out.push(2);
                out.extend_from_slice(&d.0[..digest_len]);
            }
        }
    }
}

fn kind_id(kind: Kind) -> u8 {
    Kind::ALL.iter().position(|k| *k == kind).expect("listed") as u8
}

impl Frame {
    /// Type byte and payload.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut p = Vec::new();
        let t = match self {
            Frame::Hello(h) => {
                p.extend_from_slice(GREETING);
                p.extend_from_slice(&VERSION.to_le_bytes());
                p.push(match h.role {
                    Role::Source => 1,
                    Role::Dest => 2,
                });
                put_text(&mut p, &h.path);
                p.extend_from_slice(&h.block.to_le_bytes());
                p.push(h.hash.id());
                p.extend_from_slice(&h.compress.to_le_bytes());
                p.extend_from_slice(&h.flags.to_le_bytes());
                p.extend_from_slice(&h.pause_ms.to_le_bytes());
                p.extend_from_slice(&h.source_size.to_le_bytes());
                p.extend_from_slice(&h.bwlimit.to_le_bytes());
                p.extend_from_slice(&h.refine.to_le_bytes());
                p.extend_from_slice(&h.max_errors.to_le_bytes());
                T_HELLO
            }
            Frame::Reply(r) => {
                p.extend_from_slice(&VERSION.to_le_bytes());
                p.extend_from_slice(&r.size.to_le_bytes());
                p.push(r.kind);
                p.extend_from_slice(&r.sync_id);
                T_REPLY
            }
            Frame::Go(g) => {
                p.push(g.proceed as u8 | (g.no_read as u8) << 1);
                for v in [g.size, g.start, g.end] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                p.extend_from_slice(&g.sync_id);
                T_GO
            }
            Frame::Digests { index, blocks } => {
                put_infos(&mut p, *index, blocks, BLOCK_DIGEST);
                T_DIGESTS
            }
            Frame::Verify { index, blocks } => {
                put_infos(&mut p, *index, blocks, MAX_DIGEST);
                T_VERIFY
            }
            Frame::Finding { kind, offset, len } => {
                let k = FindingKind::ALL.iter().position(|x| x == kind);
                p.push(k.expect("listed") as u8);
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
                T_FINDING
            }
            Frame::Pieces { offset, pieces } => {
                put_infos(&mut p, *offset, pieces, BLOCK_DIGEST);
                T_PIECES
            }
            Frame::Refine { offset, len } => {
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
                T_REFINE
            }
            Frame::Check { offset, len } => {
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
                T_CHECK
            }
            Frame::Zero { offset, len } => {
                p.extend_from_slice(&offset.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
                T_ZERO
            }
            Frame::Write { offset, data } => {
                p.extend_from_slice(&write_header(*offset, data));
                p.extend_from_slice(data.bytes());
                T_WRITE
            }
            Frame::Finish { size, counts } => {
                for v in [
                    *size,
                    counts.read,
                    counts.same,
                    counts.changed,
                    counts.changed_bytes,
                    counts.zero,
                    counts.holes,
                    counts.zeroed,
                ] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                T_FINISH
            }
            Frame::Abort { kind, message } => {
                p.push(kind_id(*kind));
                put_text(&mut p, message);
                T_ABORT
            }
            Frame::Done { written, read } => {
                p.extend_from_slice(&written.to_le_bytes());
                p.extend_from_slice(&read.to_le_bytes());
                T_DONE
            }
            Frame::Failed { kind, message } => {
                p.push(kind_id(*kind));
                put_text(&mut p, message);
                T_FAILED
            }
        };
        (t, p)
    }

    /// Decodes a frame of type `t` from `payload`.
    pub fn decode(t: u8, payload: &[u8]) -> Result<Frame, DecodeError> {
        let mut r = Rd(payload);
        let f = match t {
            T_HELLO => {
                if r.take(GREETING.len())? != GREETING {
                    return Err(DecodeError::BadMagic);
                }
                let v = r.u16()?;
                if v != VERSION {
                    return Err(DecodeError::Version(v));
                }
                let role = match r.u8()? {
                    1 => Role::Source,
                    2 => Role::Dest,
                    x => return Err(DecodeError::Unknown("role", x.into())),
                };
                let path = r.text()?;
                let block = r.u64()?;
                if !(crate::size::MIN_BLOCK..=crate::size::MAX_BLOCK).contains(&block) {
                    return Err(DecodeError::TooLarge("block size"));
                }
                let h = r.u8()?;
                let hash = HashKind::from_id(h).ok_or(DecodeError::Unknown("hash", h.into()))?;
                let compress = r.u32()? as i32;
                Frame::Hello(Hello {
                    role,
                    path,
                    block,
                    hash,
                    compress,
                    flags: r.u32()?,
                    pause_ms: r.u64()?,
                    source_size: r.u64()?,
                    bwlimit: r.u64()?,
                    refine: match r.u64()? {
                        0 => 0,
                        x if x >= crate::size::MIN_BLOCK
                            && block.div_ceil(x) <= MAX_DIGESTS as u64 =>
                        {
                            x
                        }
                        _ => return Err(DecodeError::TooLarge("refinement")),
                    },
                    max_errors: r.u64()?,
                })
            }
            T_REPLY => {
                let v = r.u16()?;
                if v != VERSION {
                    return Err(DecodeError::Version(v));
                }
                let size = r.u64()?;
                if size > MAX_SIZE {
                    return Err(DecodeError::TooLarge("size"));
                }
                let kind = r.u8()?;
                if kind > 2 {
                    return Err(DecodeError::Unknown("target kind", kind.into()));
                }
                let sync_id = r.take(16)?.try_into().expect("16 bytes");
                Frame::Reply(Reply {
                    size,
                    kind,
                    sync_id,
                })
            }
            T_GO => {
                let bits = r.u8()?;
                let (proceed, no_read) = (bits & 1 != 0, bits & 2 != 0);
                let (size, start, end) = (r.u64()?, r.u64()?, r.u64()?);
                if size > MAX_SIZE {
                    return Err(DecodeError::TooLarge("size"));
                }
                if start > end || end > size {
                    return Err(DecodeError::Unknown("range end", end));
                }
                let sync_id = r.take(16)?.try_into().expect("16 bytes");
                Frame::Go(Go {
                    proceed,
                    size,
                    start,
                    end,
                    sync_id,
                    no_read,
                })
            }
            T_DIGESTS => {
                let (index, blocks) = r.infos(BLOCK_DIGEST)?;
                Frame::Digests { index, blocks }
            }
            T_VERIFY => {
                let (index, blocks) = r.infos(MAX_DIGEST)?;
                Frame::Verify { index, blocks }
            }
            T_FINDING => {
                let k = r.u8()?;
                let kind = *FindingKind::ALL
                    .get(k as usize)
                    .ok_or(DecodeError::Unknown("finding", k.into()))?;
                let (offset, len) = (r.u64()?, r.u64()?);
                if offset.checked_add(len).is_none() {
                    return Err(DecodeError::TooLarge("finding range"));
                }
                Frame::Finding { kind, offset, len }
            }
            T_PIECES => {
                let (offset, pieces) = r.infos(BLOCK_DIGEST)?;
                Frame::Pieces { offset, pieces }
            }
            T_REFINE => {
                let (offset, len) = (r.u64()?, r.u64()?);
                if len > crate::size::MAX_BLOCK || offset.checked_add(len).is_none() {
                    return Err(DecodeError::TooLarge("refined block"));
                }
                Frame::Refine { offset, len }
            }
            T_CHECK => {
                let (offset, len) = (r.u64()?, r.u64()?);
                if len > crate::size::MAX_BLOCK || offset.checked_add(len).is_none() {
                    return Err(DecodeError::TooLarge("checked block"));
                }
                Frame::Check { offset, len }
            }
            T_WRITE => {
                let offset = r.u64()?;
                let data = match r.u8()? {
                    0 => Data::Raw(Slice::owned(r.rest().to_vec())),
                    1 => {
                        let len = r.u32()?;
                        if len as usize > MAX_FRAME {
                            return Err(DecodeError::TooLarge("block"));
                        }
                        Data::Zstd {
                            len,
                            bytes: r.rest().to_vec(),
                        }
                    }
                    x => return Err(DecodeError::Unknown("codec", x.into())),
                };
                Frame::Write { offset, data }
            }
            T_ZERO => {
                let (offset, len) = (r.u64()?, r.u64()?);
                if offset.checked_add(len).is_none() {
                    return Err(DecodeError::TooLarge("zero range"));
                }
                Frame::Zero { offset, len }
            }
            T_FINISH => Frame::Finish {
                size: r.u64()?,
                counts: Counts {
                    read: r.u64()?,
                    same: r.u64()?,
                    changed: r.u64()?,
                    changed_bytes: r.u64()?,
                    zero: r.u64()?,
                    holes: r.u64()?,
                    zeroed: r.u64()?,
                },
            },
            T_ABORT => {
                let (kind, message) = r.kind_and_text()?;
                Frame::Abort { kind, message }
            }
            T_DONE => Frame::Done {
                written: r.u64()?,
                read: r.u64()?,
            },
            T_FAILED => {
                let (kind, message) = r.kind_and_text()?;
                Frame::Failed { kind, message }
            }
            x => return Err(DecodeError::Unknown("frame type", x.into())),
        };
        r.end()?;
        Ok(f)
    }
}

impl Data {
    /// `raw` compressed at `level` when that saves at least 1/16, else as is.
    pub fn pack(raw: &Slice, level: i32) -> Data {
        if level > 0
            && let Ok(c) = zstd::bulk::compress(raw, level)
            && c.len() < raw.len() - raw.len() / 16
        {
            return Data::Zstd {
                len: raw.len() as u32,
                bytes: c,
            };
        }
        Data::Raw(raw.clone())
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

/// The fields of a Write frame before its data.
fn write_header(offset: u64, data: &Data) -> Vec<u8> {
    let mut h = Vec::with_capacity(13);
    h.extend_from_slice(&offset.to_le_bytes());
    match data {
        Data::Raw(_) => h.push(0),
        Data::Zstd { len, .. } => {
            h.push(1);
            h.extend_from_slice(&len.to_le_bytes());
        }
    }
    h
}

/// Writes one frame; returns the bytes written. Block data is written from its buffer
/// directly, not copied into the frame first.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> io::Result<usize> {
    if let Frame::Write { offset, data } = frame {
        let header = write_header(*offset, data);
        let body = data.bytes();
        let len = (1 + header.len() + body.len()) as u32;
        w.write_all(&len.to_le_bytes())?;
        w.write_all(&[T_WRITE])?;
        w.write_all(&header)?;
        w.write_all(body)?;
        return Ok(len as usize + 4);
    }
    let (t, payload) = frame.encode();
    write_raw_frame(w, t, &payload)
}

/// Writes a frame of type `t` with `payload`; returns the bytes written.
pub fn write_raw_frame(w: &mut impl Write, t: u8, payload: &[u8]) -> io::Result<usize> {
    let len = (payload.len() + 1) as u32;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&[t])?;
    w.write_all(payload)?;
    Ok(payload.len() + 5)
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream ended at a frame boundary.
    #[error("the connection closed")]
    Closed,
    /// The stream failed or ended inside a frame.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The frame was malformed.
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
}

/// Reads and decodes one frame, reusing `buf`; returns it with its size on the wire.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<(Frame, usize), ReadError> {
    read_frame_with(r, buf, None)
}

/// [`read_frame`], taking the replacement for a buffer handed out with a raw block from
/// `recycler`, where written blocks' buffers come back.
pub fn read_frame_with(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    recycler: Option<&Recycler>,
) -> Result<(Frame, usize), ReadError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Err(DecodeError::Truncated.into());
    }
    if len > MAX_FRAME {
        return Err(DecodeError::TooLarge("frame").into());
    }
    buf.clear();
    // A raw block (type, offset, codec 0, bytes) of a typical size is read straight into
    // a recycled buffer, page-aligned, so the destination can hand it to the disk with
    // O_DIRECT as it is.
    const RAW_DATA: usize = 1 + 8 + 1;
    const ALIGN: usize = crate::io::target::DIRECT_ALIGN;
    // Within the usual reservation, alignment slack included: a lying length costs no more.
    if let Some(rc) = recycler
        && len > RAW_DATA
        && len - RAW_DATA + ALIGN <= PRESIZE
    {
        let mut head = [0u8; RAW_DATA];
        r.read_exact(&mut head)?;
        if head[0] == T_WRITE && head[RAW_DATA - 1] == 0 {
            let offset = u64::from_le_bytes(head[1..9].try_into().expect("8 bytes"));
            let n = len - RAW_DATA;
            let (mut v, at) = rc.aligned(n, ALIGN);
            r.read_exact(&mut v[at..at + n])?;
            let whole = Arc::new(Buf::recycled(v, rc));
            let data = Data::Raw(Slice::new(whole, at..at + n));
            return Ok((Frame::Write { offset, data }, len + 4));
        }
        buf.extend_from_slice(&head);
    }
    // Reserve for a typical frame only, then grow with the data actually received, so a
    // lying length costs little.
    buf.reserve(len.min(PRESIZE));
    let rest = len - buf.len();
    r.take(rest as u64).read_to_end(buf)?;
    if buf.len() != len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    // A raw block otherwise keeps the frame's own buffer instead of a copy; the next
    // frame starts a new buffer.
    if buf[0] == T_WRITE && len >= RAW_DATA && buf[RAW_DATA - 1] == 0 {
        let offset = u64::from_le_bytes(buf[1..9].try_into().expect("8 bytes"));
        let spare = recycler.map(Recycler::spare).unwrap_or_default();
        let taken = std::mem::replace(buf, spare);
        let whole = Arc::new(match recycler {
            Some(rc) => Buf::recycled(taken, rc),
            None => Buf::detached(taken),
        });
        let data = Data::Raw(Slice::new(whole, RAW_DATA..len));
        return Ok((Frame::Write { offset, data }, len + 4));
    }
    let frame = Frame::decode(buf[0], &buf[1..])?;
    Ok((frame, len + 4))
}

/// Bytes reserved up front for a frame: a chunk of blocks plus headers.
const PRESIZE: usize = (crate::engine::CHUNK_TARGET as usize) + 4096;

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                role: Role::Dest,
                path: "/srv/a file with spaces;$(x)".into(),
                block: 1 << 20,
                hash: HashKind::Blake3,
                compress: 3,
                flags: FLAG_DRY_RUN | FLAG_DROP_CACHE,
                pause_ms: 5,
                source_size: 12345,
                bwlimit: 1 << 20,
                refine: 4096,
                max_errors: u64::MAX,
            }),
            Frame::Reply(Reply {
                size: 99,
                kind: 2,
                sync_id: [3; 16],
            }),
            Frame::Check {
                offset: 1 << 20,
                len: 4096,
            },
            Frame::Go(Go {
                proceed: true,
                size: 100,
                start: 0,
                end: 100,
                sync_id: [9; 16],
                no_read: true,
            }),
            Frame::Digests {
                index: 7,
                blocks: vec![
                    BlockInfo::Digest(HashKind::Blake3.block_digest(b"a")),
                    BlockInfo::Zero,
                    BlockInfo::Missing,
                    BlockInfo::Digest(HashKind::Xxh3.block_digest(b"b")),
                ],
            },
            Frame::Verify {
                index: 3,
                blocks: vec![
                    BlockInfo::Digest(HashKind::Blake3.digest(b"full")),
                    BlockInfo::Zero,
                ],
            },
            Frame::Finding {
                kind: FindingKind::SourceChanged,
                offset: 512,
                len: 4096,
            },
            Frame::Zero {
                offset: 1 << 30,
                len: 1 << 20,
            },
            Frame::Refine {
                offset: 1 << 20,
                len: 1 << 20,
            },
            Frame::Pieces {
                offset: 1 << 20,
                pieces: vec![
                    BlockInfo::Zero,
                    BlockInfo::Digest(HashKind::Blake3.block_digest(b"c")),
                ],
            },
            Frame::Write {
                offset: 1 << 40,
                data: Data::Raw(Slice::owned(vec![1, 2, 3])),
            },
            Frame::Write {
                offset: 4096,
                data: Data::pack(&Slice::owned(vec![0u8; 65536]), 3),
            },
            Frame::Finish {
                size: 5,
                counts: Counts {
                    read: 1,
                    same: 2,
                    changed: 3,
                    changed_bytes: 4,
                    zero: 5,
                    holes: 6,
                    zeroed: 7,
                },
            },
            Frame::Abort {
                kind: Kind::Io,
                message: "reading source: EIO".into(),
            },
            Frame::Done {
                written: 77,
                read: 78,
            },
            Frame::Failed {
                kind: Kind::TooSmall,
                message: "déjà vu".into(),
            },
        ]
    }

    fn bytes(f: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, f).unwrap();
        out
    }

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        for f in samples() {
            let wire = bytes(&f);
            let (back, n) = read_frame(&mut &wire[..], &mut buf).unwrap();
            assert_eq!(back, f);
            assert_eq!(n, wire.len());
        }
        let zeros = Slice::owned(vec![0u8; 65536]);
        assert!(matches!(
            Data::pack(&zeros, 3),
            Data::Zstd { len: 65536, .. }
        ));
        assert_eq!(Data::pack(&zeros, 3).unpack().unwrap(), zeros);
        let mut noise = vec![0u8; 4096];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let noise = Slice::owned(noise);
        assert!(matches!(Data::pack(&noise, 3), Data::Raw(_)));
    }

    #[test]
    fn raw_blocks_arrive_page_aligned_for_direct_writes() {
        let recycler = Recycler::new(2);
        let mut noise = vec![0u8; 300 << 10];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let frames = [
            Frame::Write {
                offset: 4096,
                data: Data::Raw(Slice::owned(noise.clone())),
            },
            Frame::Zero { offset: 0, len: 9 },
            Frame::Write {
                offset: 1 << 20,
                data: Data::Raw(Slice::owned(noise[..5].to_vec())),
            },
            Frame::Refine {
                offset: 1 << 20,
                len: 1 << 16,
            },
        ];
        let wire: Vec<u8> = frames.iter().flat_map(bytes).collect();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        for want in &frames {
            let (got, _) = read_frame_with(&mut r, &mut buf, Some(&recycler)).unwrap();
            assert_eq!(&got, want);
            if let Frame::Write {
                data: Data::Raw(d), ..
            } = &got
            {
                assert!(
                    d.as_ptr()
                        .addr()
                        .is_multiple_of(crate::io::target::DIRECT_ALIGN)
                );
            }
        }
        // Cut inside a raw block's header or bytes: an error, as without a recycler.
        let one = bytes(&frames[0]);
        for cut in [5, 10, 4 + 10 + 1000, one.len() - 1] {
            assert!(read_frame_with(&mut &one[..cut], &mut buf, Some(&recycler)).is_err());
        }
    }

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

    #[test]
    fn every_truncation_is_an_error() {
        let mut buf = Vec::new();
        for f in samples() {
            let wire = bytes(&f);
            for cut in 0..wire.len() {
                assert!(
                    read_frame(&mut &wire[..cut], &mut buf).is_err(),
                    "{f:?} cut {cut}"
                );
            }
            let (t, p) = f.encode();
            for cut in 0..p.len() {
                // A Write's data may legally be shorter; every other frame must fail.
                if t != T_WRITE || cut < 9 {
                    assert!(Frame::decode(t, &p[..cut]).is_err(), "{f:?} cut {cut}");
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_oversize_and_unknowns_are_rejected() {
        let (t, mut p) = Frame::Done {
            written: 1,
            read: 2,
        }
        .encode();
        p.push(0);
        assert_eq!(Frame::decode(t, &p), Err(DecodeError::Trailing(1)));
        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut &huge[..], &mut buf),
            Err(ReadError::Decode(DecodeError::TooLarge(_)))
        ));
        assert!(Frame::decode(99, &[]).is_err());
        let mut hello = samples()[0].encode().1;
        hello[8] = 9; // version
        assert_eq!(Frame::decode(T_HELLO, &hello), Err(DecodeError::Version(9)));
        let mut digests = Vec::new();
        digests.extend_from_slice(&0u64.to_le_bytes());
        digests.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            Frame::decode(T_DIGESTS, &digests),
            Err(DecodeError::TooLarge("digest count"))
        );
        // A zstd payload that claims more than it holds.
        let (t, mut w) = Frame::Write {
            offset: 0,
            data: Data::pack(&Slice::owned(vec![0u8; 65536]), 3),
        }
        .encode();
        w[9..13].copy_from_slice(&65537u32.to_le_bytes());
        let Frame::Write { data, .. } = Frame::decode(t, &w).unwrap() else {
            panic!()
        };
        assert_eq!(data.unpack(), Err(DecodeError::BadCompression));
    }

    /// Found by fuzz target handshake_client: a Reply of almost 2^64 bytes overflowed the
    /// client's range arithmetic (Layout::part) in a pull. No file is that large.
    #[test]
    fn sizes_past_off_t_are_rejected() {
        let reply = |size: u64| {
            let r = Reply {
                size,
                kind: 1,
                sync_id: [0; 16],
            };
            Frame::Reply(r).encode().1
        };
        let go = |size: u64| {
            let g = Go {
                proceed: true,
                size,
                start: 0,
                end: size,
                sync_id: [0; 16],
                no_read: false,
            };
            Frame::Go(g).encode().1
        };
        assert!(Frame::decode(T_REPLY, &reply(MAX_SIZE)).is_ok());
        assert!(Frame::decode(T_GO, &go(MAX_SIZE)).is_ok());
        for size in [MAX_SIZE + 1, u64::MAX] {
            let too_large = Err(DecodeError::TooLarge("size"));
            assert_eq!(Frame::decode(T_REPLY, &reply(size)), too_large);
            assert_eq!(Frame::decode(T_GO, &go(size)), too_large);
        }
    }

    /// Property test: random and mutated frames decode to an error or a frame, never panic,
    /// and never allocate past the bound.
    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let wires: Vec<Vec<u8>> = samples().iter().map(bytes).collect();
        let mut buf = Vec::new();
        for round in 0..20_000 {
            let mut w = if round % 4 == 0 {
                let n = (next() % 64) as usize;
                (0..n).map(|_| next() as u8).collect()
            } else {
                wires[(next() % wires.len() as u64) as usize].clone()
            };
            for _ in 0..1 + next() % 4 {
                if w.is_empty() {
                    break;
                }
                let i = (next() % w.len() as u64) as usize;
                match next() % 3 {
                    0 => w[i] = next() as u8,
                    1 => w.truncate(i),
                    _ => w.insert(i, next() as u8),
                }
            }
            if let Ok((Frame::Write { data, .. }, _)) = read_frame(&mut &w[..], &mut buf) {
                let _ = data.unpack();
            }
        }
    }
}
