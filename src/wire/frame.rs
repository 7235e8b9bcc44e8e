//! Wire format, for halves on two machines.
//!
//! The server (the remote side) first writes [`GREETING`]. Then every message is a frame:
//! a little-endian u32 length (of what follows), a type byte, and the payload. Lengths are
//! bounded by [`MAX_FRAME`] before anything is allocated; every decoder checks each field
//! and rejects truncated, oversized or trailing bytes with an error, never a panic.
//!
//! Conversation: client Hello -> server Reply (or Failed) -> client Go (proceed or not),
//! then the engine messages both ways at once (digests one way, writes the other), ending
//! with the source's Finish, which the destination answers with Done, or its Abort,
//! answered with Failed (or Failed early, when the destination itself fails). Either
//! side sends Alive whenever it has had nothing to send for a second.
//!
//! This module holds the frames and their encoding; the handshake's types are in
//! [`crate::wire::handshake`], block payloads in [`crate::wire::data`], reading and
//! writing frames on a stream in [`crate::wire::stream`] (all re-exported here).

use crate::engine::messages::{Counts, FindingKind, ToDest, ToSource, Unsendable};
use crate::error::Kind;
use crate::hash::{BLOCK_DIGEST, BlockInfo, Digest, MAX_DIGEST};
use crate::io::codec::{Rd, Short, put_u8, put_u64};
use crate::io::pool::Slice;

pub use crate::wire::data::Data;
pub use crate::wire::handshake::{
    FLAG_DISCARD, FLAG_DROP_CACHE, FLAG_DRY_RUN, FLAG_FORCE_MOUNTED, FLAG_KEEP_UNREADABLE,
    FLAG_LEVEL_FIXED, FLAG_NO_READ, FLAG_NO_SPARSE, FLAG_STREAM, FLAG_TRACK_ID, FLAG_UNCHECKED,
    FLAG_VERIFY, GREETING, Go, Hello, MAX_STREAMS, MAX_VERSIONS, Reply, Role, RunPart, VERSION,
};
pub use crate::wire::stream::{
    ReadError, read_frame, read_frame_with, write_frame, write_raw_frame,
};

/// Largest frame accepted: a chunk of the largest block size plus headers.
pub const MAX_FRAME: usize = (crate::size::MAX_BLOCK as usize) + 1024;
/// Longest path or message text in a frame.
pub const MAX_TEXT: usize = 8192;
/// Most digests in one frame (a chunk of the smallest block size).
pub const MAX_DIGESTS: usize = (crate::engine::CHUNK_TARGET / crate::size::MIN_BLOCK) as usize;
/// Largest source or destination size in a frame: what `off_t` can address. Only a broken
/// or hostile peer sends more, and offsets past it would overflow range arithmetic.
pub const MAX_SIZE: u64 = i64::MAX as u64;
/// Bytes reserved up front for a frame: a chunk of blocks plus headers.
pub(crate) const PRESIZE: usize = (crate::engine::CHUNK_TARGET as usize) + 4096;

const T_HELLO: u8 = 1;
const T_REPLY: u8 = 2;
const T_GO: u8 = 3;
const T_DIGESTS: u8 = 16;
pub(crate) const T_WRITE: u8 = 17;
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
const T_TALLY: u8 = 28;
const T_ALIVE: u8 = 29;
const T_REPORT: u8 = 30;

/// Longest [`Frame::Report`].
pub const MAX_REPORT: usize = 4 << 20;

/// One decoded frame: the handshake, or an engine message as it crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Reply`].
    Reply(Reply),
    /// See [`Go`].
    Go(Go),
    /// From the source half; written blocks as packed for the wire.
    Dest(ToDest<Data>),
    /// From the destination half; its raw bytes never cross machines.
    Source(ToSource<Unsendable>),
    /// Either way: a pump with nothing to send says it is still there (so a stalled
    /// peer can be told from a quiet one, see `--timeout`). Carries nothing.
    Alive,
    /// From a server: the outcome of a command that is not a sync (`blocksync versions
    /// host:DST`, `restore`), as a JSON document (at most [`MAX_REPORT`] bytes).
    Report(String),
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

impl From<Short> for DecodeError {
    fn from(s: Short) -> Self {
        match s {
            Short::Truncated => DecodeError::Truncated,
            Short::Trailing(n) => DecodeError::Trailing(n),
        }
    }
}

/// A text field: its u32 length, bounded by [`MAX_TEXT`], then UTF-8.
pub(crate) fn text(r: &mut Rd) -> Result<String, DecodeError> {
    let n = r.u32()? as usize;
    if n > MAX_TEXT {
        return Err(DecodeError::TooLarge("text"));
    }
    String::from_utf8(r.take(n)?.to_vec()).map_err(|_| DecodeError::BadText)
}

/// Writes a text field, cut to [`MAX_TEXT`].
pub(crate) fn put_text(out: &mut Vec<u8>, s: &str) {
    crate::io::codec::put_text(out, s, MAX_TEXT);
}

/// A number (chunk index or offset) and a list of block states.
fn infos(r: &mut Rd, digest_len: usize) -> Result<(u64, Vec<BlockInfo>), DecodeError> {
    let at = r.u64()?;
    let n = r.u32()? as usize;
    if n > MAX_DIGESTS {
        return Err(DecodeError::TooLarge("digest count"));
    }
    let mut blocks = Vec::with_capacity(n.min(r.left()));
    for _ in 0..n {
        blocks.push(match r.u8()? {
            0 => BlockInfo::Missing,
            1 => BlockInfo::Zero,
            2 => {
                let mut d = [0u8; MAX_DIGEST];
                d[..digest_len].copy_from_slice(r.take(digest_len)?);
                BlockInfo::Digest(Digest(d))
            }
            x => return Err(DecodeError::Unknown("block state", x.into())),
        });
    }
    Ok((at, blocks))
}

fn put_infos(out: &mut Vec<u8>, at: u64, blocks: &[BlockInfo], digest_len: usize) {
    put_u64(out, at);
    crate::io::codec::put_u32(out, blocks.len() as u32);
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

fn kind_and_text(r: &mut Rd) -> Result<(Kind, String), DecodeError> {
    let k = r.u8()?;
    let kind = *Kind::ALL
        .get(k as usize)
        .ok_or(DecodeError::Unknown("error kind", k.into()))?;
    Ok((kind, text(r)?))
}

fn put_kind_and_text(out: &mut Vec<u8>, kind: Kind, message: &str) {
    put_u8(
        out,
        Kind::ALL.iter().position(|k| *k == kind).expect("listed") as u8,
    );
    put_text(out, message);
}

/// An offset and a length whose end must not overflow, and with `max_len`, a length
/// bounded by it (`what` names the range in the error).
fn range(r: &mut Rd, max_len: Option<u64>, what: &'static str) -> Result<(u64, u64), DecodeError> {
    let (offset, len) = (r.u64()?, r.u64()?);
    if max_len.is_some_and(|m| len > m) || offset.checked_add(len).is_none() {
        return Err(DecodeError::TooLarge(what));
    }
    Ok((offset, len))
}

/// The fields of a Write frame before its data.
pub(crate) fn write_header(offset: u64, data: &Data) -> Vec<u8> {
    let mut h = Vec::with_capacity(13);
    put_u64(&mut h, offset);
    match data {
        Data::Raw(_) => h.push(0),
        Data::Zstd { len, .. } => {
            h.push(1);
            crate::io::codec::put_u32(&mut h, *len);
        }
    }
    h
}

impl Frame {
    /// Type byte and payload.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut p = Vec::new();
        let t = match self {
            Frame::Hello(h) => {
                h.encode(&mut p);
                T_HELLO
            }
            Frame::Reply(r) => {
                r.encode(&mut p);
                T_REPLY
            }
            Frame::Go(g) => {
                g.encode(&mut p);
                T_GO
            }
            Frame::Source(ToSource::Digests { index, blocks }) => {
                put_infos(&mut p, *index, blocks, BLOCK_DIGEST);
                T_DIGESTS
            }
            Frame::Source(ToSource::Verify { index, blocks }) => {
                put_infos(&mut p, *index, blocks, MAX_DIGEST);
                T_VERIFY
            }
            Frame::Dest(ToDest::Finding { kind, offset, len }) => {
                let k = FindingKind::ALL.iter().position(|x| x == kind);
                put_u8(&mut p, k.expect("listed") as u8);
                put_u64(&mut p, *offset);
                put_u64(&mut p, *len);
                T_FINDING
            }
            Frame::Source(ToSource::Pieces { offset, pieces }) => {
                put_infos(&mut p, *offset, pieces, BLOCK_DIGEST);
                T_PIECES
            }
            Frame::Dest(ToDest::Refine { offset, len })
            | Frame::Dest(ToDest::Check { offset, len })
            | Frame::Dest(ToDest::Zero { offset, len }) => {
                put_u64(&mut p, *offset);
                put_u64(&mut p, *len);
                match self {
                    Frame::Dest(ToDest::Refine { .. }) => T_REFINE,
                    Frame::Dest(ToDest::Check { .. }) => T_CHECK,
                    _ => T_ZERO,
                }
            }
            Frame::Dest(ToDest::Write { offset, data }) => {
                p.extend_from_slice(&write_header(*offset, data));
                p.extend_from_slice(data.bytes());
                T_WRITE
            }
            Frame::Dest(ToDest::Finish { size, counts }) => {
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
                    put_u64(&mut p, v);
                }
                T_FINISH
            }
            Frame::Dest(ToDest::Abort { kind, message }) => {
                put_kind_and_text(&mut p, *kind, message);
                T_ABORT
            }
            Frame::Source(ToSource::Done {
                written,
                read,
                journaled,
            }) => {
                put_u64(&mut p, *written);
                put_u64(&mut p, *read);
                put_u64(&mut p, *journaled);
                T_DONE
            }
            Frame::Source(ToSource::Tally { written, read }) => {
                put_u64(&mut p, *written);
                put_u64(&mut p, *read);
                T_TALLY
            }
            Frame::Source(ToSource::Failed { kind, message }) => {
                put_kind_and_text(&mut p, *kind, message);
                T_FAILED
            }
            Frame::Source(ToSource::Bytes { data, .. }) => match *data {},
            Frame::Alive => T_ALIVE,
            Frame::Report(text) => {
                let text = &text.as_bytes()[..text.len().min(MAX_REPORT)];
                crate::io::codec::put_u32(&mut p, text.len() as u32);
                p.extend_from_slice(text);
                T_REPORT
            }
        };
        (t, p)
    }

    /// Decodes a frame of type `t` from `payload`.
    pub fn decode(t: u8, payload: &[u8]) -> Result<Frame, DecodeError> {
        let mut r = Rd(payload);
        let f = match t {
            T_HELLO => Frame::Hello(Hello::decode(&mut r)?),
            T_REPLY => Frame::Reply(Reply::decode(&mut r)?),
            T_GO => Frame::Go(Go::decode(&mut r)?),
            T_DIGESTS => {
                let (index, blocks) = infos(&mut r, BLOCK_DIGEST)?;
                Frame::Source(ToSource::Digests { index, blocks })
            }
            T_VERIFY => {
                let (index, blocks) = infos(&mut r, MAX_DIGEST)?;
                Frame::Source(ToSource::Verify { index, blocks })
            }
            T_FINDING => {
                let k = r.u8()?;
                let kind = *FindingKind::ALL
                    .get(k as usize)
                    .ok_or(DecodeError::Unknown("finding", k.into()))?;
                let (offset, len) = range(&mut r, None, "finding range")?;
                Frame::Dest(ToDest::Finding { kind, offset, len })
            }
            T_PIECES => {
                let (offset, pieces) = infos(&mut r, BLOCK_DIGEST)?;
                Frame::Source(ToSource::Pieces { offset, pieces })
            }
            T_REFINE => {
                let (offset, len) = range(&mut r, Some(crate::size::MAX_BLOCK), "refined block")?;
                Frame::Dest(ToDest::Refine { offset, len })
            }
            T_CHECK => {
                let (offset, len) = range(&mut r, Some(crate::size::MAX_BLOCK), "checked block")?;
                Frame::Dest(ToDest::Check { offset, len })
            }
            T_WRITE => decode_write(&mut r)?,
            T_ZERO => {
                let (offset, len) = range(&mut r, None, "zero range")?;
                Frame::Dest(ToDest::Zero { offset, len })
            }
            T_FINISH => Frame::Dest(ToDest::Finish {
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
            }),
            T_ABORT => {
                let (kind, message) = kind_and_text(&mut r)?;
                Frame::Dest(ToDest::Abort { kind, message })
            }
            T_DONE => Frame::Source(ToSource::Done {
                written: r.u64()?,
                read: r.u64()?,
                journaled: r.u64()?,
            }),
            T_TALLY => Frame::Source(ToSource::Tally {
                written: r.u64()?,
                read: r.u64()?,
            }),
            T_FAILED => {
                let (kind, message) = kind_and_text(&mut r)?;
                Frame::Source(ToSource::Failed { kind, message })
            }
            T_ALIVE => Frame::Alive,
            T_REPORT => {
                let n = r.u32()? as usize;
                if n > MAX_REPORT {
                    return Err(DecodeError::TooLarge("report"));
                }
                let text = std::str::from_utf8(r.take(n)?).map_err(|_| DecodeError::BadText)?;
                Frame::Report(text.to_string())
            }
            x => return Err(DecodeError::Unknown("frame type", x.into())),
        };
        r.end()?;
        Ok(f)
    }
}

fn decode_write(r: &mut Rd) -> Result<Frame, DecodeError> {
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
    Ok(Frame::Dest(ToDest::Write { offset, data }))
}

#[cfg(test)]
mod tests;
