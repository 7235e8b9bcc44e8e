//! Frames on a byte stream: writing them (block data straight from its buffer) and
//! reading them with a bounded allocation, raw blocks landing page-aligned in recycled
//! buffers so the destination can write them with O_DIRECT as they are.

use crate::engine::messages::ToDest;
use crate::io::pool::{Buf, Recycler, Slice};
use crate::wire::data::Data;
use crate::wire::frame::{DecodeError, Frame, MAX_FRAME, PRESIZE, T_WRITE, write_header};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// Writes one frame; returns the bytes written. Block data is written from its buffer
/// directly, not copied into the frame first.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> io::Result<usize> {
    if let Frame::Dest(ToDest::Write { offset, data }) = frame {
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

/// The type, offset and codec 0 that start a raw block's frame.
const RAW_DATA: usize = 1 + 8 + 1;
const ALIGN: usize = crate::io::target::DIRECT_ALIGN;

/// [`read_frame`], taking the replacement for a buffer handed out with a raw block from
/// `recycler`, where written blocks' buffers come back.
pub fn read_frame_with(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    recycler: Option<&Recycler>,
) -> Result<(Frame, usize), ReadError> {
    let len = read_length(r)?;
    buf.clear();
    // A raw block of a typical size is read straight into a recycled buffer,
    // page-aligned. Within the usual reservation, alignment slack included: a lying
    // length costs no more.
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
            return Ok((Frame::Dest(ToDest::Write { offset, data }), len + 4));
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
        return Ok((Frame::Dest(ToDest::Write { offset, data }), len + 4));
    }
    let frame = Frame::decode(buf[0], &buf[1..])?;
    Ok((frame, len + 4))
}

/// A frame's length prefix, checked against [`MAX_FRAME`] before anything is allocated.
fn read_length(r: &mut impl Read) -> Result<usize, ReadError> {
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
    Ok(len)
}
