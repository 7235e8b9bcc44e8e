//! The NBD protocol's numbers and its checked decoders. NBD is big-endian; every decoder
//! reads from a slice whose length the caller already bounded, and a field past the end,
//! a length that disagrees with what was asked or a value out of range is an error,
//! never a panic.

use crate::io::codec::{Rd, Short};

/// "NBDMAGIC", the server's first eight bytes.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// What an oldstyle server sends in place of IHAVEOPT.
pub const OLDSTYLE: u64 = 0x0000_4202_8186_1253;
/// The magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;

// NBD_OPT_GO information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) | 1;
pub const CHUNK_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Most bytes of one option reply we accept: larger ones are a protocol error, so a
/// hostile server cannot make us allocate what it likes during negotiation.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Most status descriptors in one block-status chunk (the limit the protocol asks
/// servers to keep); each is decoded as it arrives and merged with its neighbour.
pub const MAX_DESCRIPTORS: u32 = 1 << 20;
/// Most bytes of an error chunk: errno, message length, message, offset.
pub const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING as u32 + 8;

/// Big-endian fields from a checked reader.
pub fn be16(r: &mut Rd) -> Result<u16, Short> {
    r.array().map(u16::from_be_bytes)
}

pub fn be32(r: &mut Rd) -> Result<u32, Short> {
    r.array().map(u32::from_be_bytes)
}

pub fn be64(r: &mut Rd) -> Result<u64, Short> {
    r.array().map(u64::from_be_bytes)
}

/// The header of one option reply (20 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub len: u32,
}

/// Decodes an option reply header: the magic must match, the option must be the one
/// asked, and the length must be within [`MAX_OPTION_REPLY`].
pub fn option_reply(bytes: &[u8; 20], asked: u32) -> Result<OptReply, String> {
    let mut r = Rd(bytes);
    let short = |_| "truncated option reply".to_string();
    let magic = be64(&mut r).map_err(short)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(format!("bad option reply magic {magic:#x}"));
    }
    let option = be32(&mut r).map_err(short)?;
    let kind = be32(&mut r).map_err(short)?;
    let len = be32(&mut r).map_err(short)?;
    if option != asked {
        return Err(format!(
            "reply to option {option} when option {asked} was asked"
        ));
    }
    if len > MAX_OPTION_REPLY {
        return Err(format!(
            "option reply of {len} bytes (at most {MAX_OPTION_REPLY} accepted)"
        ));
    }
    Ok(OptReply { option, kind, len })
}

/// The name of an option error reply, for messages.
pub fn option_error_name(kind: u32) -> String {
    let name = match kind & !REP_ERR {
        1 => "unsupported",
        2 => "refused by the server's policy",
        3 => "invalid",
        4 => "not supported on the server's platform",
        5 => "TLS required",
        6 => "unknown export",
        7 => "server shutting down",
        8 => "block size required",
        9 => "too big",
        10 => "extended headers required",
        _ => return format!("error {kind:#x}"),
    };
    name.to_string()
}

/// What NBD_OPT_GO told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// Size in bytes and transmission flags.
    Export { size: u64, flags: u16 },
    /// Minimum, preferred and maximum block sizes.
    BlockSize { min: u32, preferred: u32, max: u32 },
    /// An information type we did not ask for or do not use.
    Other(u16),
}

/// Decodes the payload of an NBD_REP_INFO reply.
pub fn info(payload: &[u8]) -> Result<Info, String> {
    let mut r = Rd(payload);
    let short = |_| format!("truncated info reply ({} bytes)", payload.len());
    let kind = be16(&mut r).map_err(short)?;
    let info = match kind {
        INFO_EXPORT => Info::Export {
            size: be64(&mut r).map_err(short)?,
            flags: be16(&mut r).map_err(short)?,
        },
        INFO_BLOCK_SIZE => {
            let min = be32(&mut r).map_err(short)?;
            let preferred = be32(&mut r).map_err(short)?;
            let max = be32(&mut r).map_err(short)?;
            check_block_sizes(min, preferred, max)?;
            Info::BlockSize {
                min,
                preferred,
                max,
            }
        }
        other => return Ok(Info::Other(other)),
    };
    r.end()
        .map_err(|_| format!("info reply {kind} has trailing bytes"))?;
    Ok(info)
}

/// The protocol's rules for block sizes: powers of two, the minimum at most 64 KiB, the
/// preferred at least the minimum, the maximum a multiple of the minimum. Splitting
/// requests relies on them.
fn check_block_sizes(min: u32, preferred: u32, max: u32) -> Result<(), String> {
    let ok = min.is_power_of_two()
        && min <= 64 * 1024
        && preferred.is_power_of_two()
        && preferred >= min
        && max >= min
        && max.is_multiple_of(min);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid block sizes: minimum {min}, preferred {preferred}, maximum {max}"
        ))
    }
}

/// Decodes an NBD_REP_META_CONTEXT payload: the context id and its name.
pub fn meta_context(payload: &[u8]) -> Result<(u32, String), String> {
    let mut r = Rd(payload);
    let id = be32(&mut r).map_err(|_| "truncated meta context reply".to_string())?;
    let name = r.rest();
    if name.len() > MAX_STRING {
        return Err(format!("meta context name of {} bytes", name.len()));
    }
    let name = std::str::from_utf8(name).map_err(|_| "meta context name is not UTF-8")?;
    Ok((id, name.to_string()))
}

/// An error the server reported for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub errno: u32,
    pub message: String,
}

impl ServerError {
    /// "I/O error: message", with the server's text made harmless.
    pub fn describe(&self) -> String {
        let name = errno_name(self.errno);
        if self.message.is_empty() {
            name
        } else {
            format!("{name}: {}", crate::error::peer_text(&self.message))
        }
    }
}

/// The errno values NBD defines, as text.
pub fn errno_name(errno: u32) -> String {
    let name = match errno {
        1 => "operation not permitted",
        5 => "I/O error",
        12 => "out of memory",
        22 => "invalid argument",
        28 => "no space left",
        75 => "value too large",
        95 => "not supported",
        108 => "server shutting down",
        _ => return format!("error {errno}"),
    };
    name.to_string()
}

/// Decodes the payload of an ERROR or ERROR_OFFSET chunk (`with_offset`): the errno
/// must be nonzero and the message must fit in the chunk.
pub fn error_chunk(payload: &[u8], with_offset: bool) -> Result<ServerError, String> {
    let mut r = Rd(payload);
    let short = |_| format!("truncated error chunk ({} bytes)", payload.len());
    let errno = be32(&mut r).map_err(short)?;
    let len = be16(&mut r).map_err(short)? as usize;
    let text = r.take(len).map_err(short)?;
    if with_offset {
        be64(&mut r).map_err(short)?;
    }
    if errno == 0 {
        return Err("error chunk with error 0".to_string());
    }
    Ok(ServerError {
        errno,
        message: String::from_utf8_lossy(text).into_owned(),
    })
}

/// The 16 bytes after a structured reply's magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub len: u32,
}

pub fn chunk_header(b: &[u8; 16]) -> ChunkHeader {
    ChunkHeader {
        flags: u16::from_be_bytes([b[0], b[1]]),
        kind: u16::from_be_bytes([b[2], b[3]]),
        handle: u64::from_be_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]),
        len: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
    }
}

/// Checks that `[offset, offset + len)` lies within the request `[start, start + asked)`
/// and returns where it starts in the request's buffer.
pub fn within(offset: u64, len: u64, start: u64, asked: u64) -> Result<usize, String> {
    let end = offset.checked_add(len);
    match end {
        Some(end) if offset >= start && end <= start + asked => Ok((offset - start) as usize),
        _ => Err(format!(
            "reply chunk at {offset} (+{len}) outside the request at {start} (+{asked})"
        )),
    }
}

/// A request as the server receives it (28 bytes).
pub fn request(cmd: u16, flags: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut out = [0u8; 28];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&cmd.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&len.to_be_bytes());
    out
}

/// An option as the server receives it: IHAVEOPT, option, length, data.
pub fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Appends a string after its 32-bit length.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_header(option: u32, kind: u32, len: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..16].copy_from_slice(&kind.to_be_bytes());
        b[16..].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn option_replies_are_checked() {
        let ok = option_reply(&reply_header(OPT_GO, REP_ACK, 0), OPT_GO).unwrap();
        assert_eq!(ok.kind, REP_ACK);
        let big = option_reply(&reply_header(OPT_GO, REP_INFO, 1 << 20), OPT_GO);
        assert!(big.unwrap_err().contains("at most"));
        let other = option_reply(&reply_header(OPT_STRUCTURED_REPLY, REP_ACK, 0), OPT_GO);
        assert!(other.unwrap_err().contains("option 8"));
        let mut bad = reply_header(OPT_GO, REP_ACK, 0);
        bad[0] ^= 1;
        assert!(option_reply(&bad, OPT_GO).unwrap_err().contains("magic"));
        assert_eq!(option_error_name(REP_ERR_UNKNOWN), "unknown export");
        assert_eq!(option_error_name(REP_ERR | 99), "error 0x80000063");
    }

    #[test]
    fn info_replies_decode_and_reject_bad_lengths_and_sizes() {
        let mut export = vec![0, 0];
        export.extend_from_slice(&(1u64 << 30).to_be_bytes());
        export.extend_from_slice(&3u16.to_be_bytes());
        let flags = 3;
        assert_eq!(
            info(&export),
            Ok(Info::Export {
                size: 1 << 30,
                flags
            })
        );
        assert!(info(&export[..9]).unwrap_err().contains("truncated"));
        let mut long = export.clone();
        long.push(0);
        assert!(info(&long).unwrap_err().contains("trailing"));

        let sizes = |min: u32, pref: u32, max: u32| {
            let mut b = vec![0, 3];
            for v in [min, pref, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            info(&b)
        };
        assert!(sizes(512, 4096, 32 << 20).is_ok());
        assert!(sizes(0, 4096, 32 << 20).is_err());
        assert!(sizes(3, 4096, 32 << 20).is_err());
        assert!(sizes(4096, 512, 32 << 20).is_err());
        assert!(sizes(1 << 20, 1 << 20, 1 << 21).is_err());
        assert!(sizes(512, 4096, 1000).is_err());
        assert_eq!(info(&[0, 9, 1, 2]), Ok(Info::Other(9)));
        assert!(info(&[0]).is_err());
    }

    #[test]
    fn meta_contexts_and_error_chunks_are_bounded() {
        let mut b = 7u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"base:allocation");
        assert_eq!(meta_context(&b), Ok((7, "base:allocation".to_string())));
        assert!(meta_context(&[0, 0]).is_err());
        let mut long = 1u32.to_be_bytes().to_vec();
        long.resize(4 + MAX_STRING + 1, b'a');
        assert!(meta_context(&long).is_err());
        let mut bad = 1u32.to_be_bytes().to_vec();
        bad.push(0xff);
        assert!(meta_context(&bad).is_err());

        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&3u16.to_be_bytes());
        e.extend_from_slice(b"bad");
        let err = error_chunk(&e, false).unwrap();
        assert_eq!(err.describe(), "I/O error: bad");
        assert!(error_chunk(&e, true).is_err(), "no room for the offset");
        e.extend_from_slice(&0u64.to_be_bytes());
        assert!(error_chunk(&e, true).is_ok());
        let mut lying = 5u32.to_be_bytes().to_vec();
        lying.extend_from_slice(&100u16.to_be_bytes());
        lying.extend_from_slice(b"short");
        assert!(error_chunk(&lying, false).is_err());
        let mut zero = 0u32.to_be_bytes().to_vec();
        zero.extend_from_slice(&0u16.to_be_bytes());
        assert!(error_chunk(&zero, false).is_err());
    }

    #[test]
    fn chunks_must_lie_within_their_request() {
        assert_eq!(within(4096, 512, 4096, 4096), Ok(0));
        assert_eq!(within(8000, 192, 4096, 4096), Ok(3904));
        assert!(within(4095, 512, 4096, 4096).is_err());
        assert!(within(8000, 193, 4096, 4096).is_err());
        assert!(within(u64::MAX, 2, 0, 4096).is_err());
        let h = chunk_header(&[0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 12]);
        assert_eq!((h.flags, h.kind, h.handle, h.len), (1, 2, 9, 12));
        let req = request(CMD_READ, 0, 5, 4096, 512);
        assert_eq!(&req[..4], &REQUEST_MAGIC.to_be_bytes());
        assert_eq!(&req[24..], &512u32.to_be_bytes());
    }
}
