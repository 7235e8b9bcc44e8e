//! The reader thread: reads every reply and chunk, checks it against the request it
//! answers (handle, command, offsets, lengths) and files the result for the caller. Any
//! violation breaks the connection with a protocol error that every waiter sees; no
//! length from the peer sizes an allocation without a cap.

use crate::error::{Kind, Result, os_text};
use crate::io::nbd::wire::{self, ServerError};
use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::{Condvar, Mutex, MutexGuard};

/// One extent of a block status reply, its flags as the context defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    /// `base:allocation`: not allocated on the server (NBD_STATE_HOLE).
    pub fn is_hole(&self) -> bool {
        self.flags & 1 != 0
    }

    /// `base:allocation`: reads as zeroes (NBD_STATE_ZERO).
    pub fn is_zero(&self) -> bool {
        self.flags & 2 != 0
    }

    /// `qemu:dirty-bitmap:NAME`: marked dirty.
    pub fn is_dirty(&self) -> bool {
        self.flags & 1 != 0
    }

    /// The first byte after the extent.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// Appends `e`, merged into the last extent when they touch and have the same flags.
pub fn push_extent(list: &mut Vec<Extent>, e: Extent) {
    match list.last_mut() {
        Some(last) if last.end() == e.offset && last.flags == e.flags => last.length += e.length,
        _ => list.push(e),
    }
}

/// What a finished request brought back.
#[derive(Debug, Default)]
pub struct Done {
    /// The data of a read.
    pub data: Vec<u8>,
    /// Block status: the extents per context id, clipped to the request.
    pub extents: Vec<(u32, Vec<Extent>)>,
}

/// A request the reader is filling in.
pub(super) struct Pending {
    pub cmd: u16,
    pub offset: u64,
    pub len: u32,
    /// A read's buffer, sized from our request.
    pub data: Vec<u8>,
    /// Bytes of a read the chunks have covered.
    pub covered: u64,
    pub extents: Vec<(u32, Vec<Extent>)>,
    /// The first error the server reported; later ones are dropped (bounded).
    pub error: Option<ServerError>,
}

pub(super) enum Slot {
    Pending(Pending),
    Done(Result<Done>),
}

pub(super) struct State {
    pub slots: HashMap<u64, Slot>,
    /// Why the connection can no longer be used, once it cannot.
    pub broken: Option<(Kind, String)>,
    /// We sent NBD_CMD_DISC: the server closing is expected.
    pub closing: bool,
}

pub(super) struct Shared {
    pub state: Mutex<State>,
    pub cond: Condvar,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking thread left the map as it was; keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the connection broken (the first reason wins) and wakes every waiter.
    pub fn fail(&self, kind: Kind, message: String) {
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some((kind, message));
        }
        self.cond.notify_all();
    }
}

/// Why the reader stopped.
enum Fail {
    Io(io::Error),
    Protocol(String),
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Self {
        Fail::Io(e)
    }
}

fn bad<T>(why: impl Into<String>) -> Result<T, Fail> {
    Err(Fail::Protocol(why.into()))
}

/// The request a reply answers, as far as checking it needs.
#[derive(Clone, Copy)]
struct Asked {
    cmd: u16,
    offset: u64,
    len: u64,
}

pub(super) struct Reader<R> {
    pub r: R,
    pub shared: std::sync::Arc<Shared>,
    pub structured: bool,
    /// The context ids negotiated.
    pub ids: Vec<u32>,
    pub who: String,
}

impl<R: Read> Reader<R> {
    /// Reads replies until the connection ends; then every waiter is told why.
    pub fn run(mut self) {
        let why = loop {
            if let Err(f) = self.one() {
                break f;
            }
        };
        let closing = self.shared.lock().closing;
        let (kind, message) = match why {
            Fail::Protocol(w) => (Kind::Protocol, format!("{}: protocol error: {w}", self.who)),
            Fail::Io(e) if closing => (Kind::Io, format!("{}: closed ({})", self.who, os_text(&e))),
            Fail::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => (
                Kind::Io,
                format!("{}: the server closed the connection", self.who),
            ),
            Fail::Io(e) => (
                Kind::Io,
                format!("{}: reading replies failed: {}", self.who, os_text(&e)),
            ),
        };
        self.shared.fail(kind, message);
    }

    fn read<const N: usize>(&mut self) -> Result<[u8; N], Fail> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }

    fn one(&mut self) -> Result<(), Fail> {
        match u32::from_be_bytes(self.read::<4>()?) {
            wire::SIMPLE_REPLY_MAGIC => self.simple(),
            wire::STRUCTURED_REPLY_MAGIC if self.structured => self.chunk(),
            wire::STRUCTURED_REPLY_MAGIC => bad("structured reply that was not negotiated"),
            m => bad(format!("bad reply magic {m:#x}")),
        }
    }

    /// The request `handle` answers; a handle not in flight is a protocol error.
    fn asked(&self, handle: u64) -> Result<Asked, Fail> {
        match self.shared.lock().slots.get(&handle) {
            Some(Slot::Pending(p)) => Ok(Asked {
                cmd: p.cmd,
                offset: p.offset,
                len: u64::from(p.len),
            }),
            _ => bad(format!("reply for handle {handle}, which is not in flight")),
        }
    }

    /// Runs `f` on the pending request `handle` (known to be pending: only this thread
    /// finishes requests).
    fn with<T>(&self, handle: u64, f: impl FnOnce(&mut Pending) -> T) -> Result<T, Fail> {
        match self.shared.lock().slots.get_mut(&handle) {
            Some(Slot::Pending(p)) => Ok(f(p)),
            _ => bad(format!("handle {handle} vanished")),
        }
    }

    fn simple(&mut self) -> Result<(), Fail> {
        let errno = u32::from_be_bytes(self.read::<4>()?);
        let handle = u64::from_be_bytes(self.read::<8>()?);
        let a = self.asked(handle)?;
        if errno != 0 {
            let e = ServerError {
                errno,
                message: String::new(),
            };
            self.with(handle, |p| p.error = Some(e))?;
        } else if a.cmd == wire::CMD_READ && self.structured {
            return bad("simple reply with data to a read after structured replies");
        } else if a.cmd == wire::CMD_READ {
            self.read_data(handle, 0, a.len as usize)?;
        } else if a.cmd == wire::CMD_BLOCK_STATUS {
            return bad("block status answered by a simple reply");
        }
        self.finish(handle)
    }

    fn chunk(&mut self) -> Result<(), Fail> {
        let h = wire::chunk_header(&self.read::<16>()?);
        let a = self.asked(h.handle)?;
        let len = u64::from(h.len);
        match h.kind {
            wire::CHUNK_NONE if len == 0 && h.flags & wire::REPLY_FLAG_DONE != 0 => {}
            wire::CHUNK_NONE => return bad("NONE chunk with a payload or without DONE"),
            wire::CHUNK_OFFSET_DATA if a.cmd == wire::CMD_READ => {
                if len <= 8 || len - 8 > a.len {
                    return bad(format!("data chunk of {len} bytes for a read of {}", a.len));
                }
                let offset = u64::from_be_bytes(self.read::<8>()?);
                let at = wire::within(offset, len - 8, a.offset, a.len).map_err(Fail::Protocol)?;
                self.read_data(h.handle, at, (len - 8) as usize)?;
            }
            wire::CHUNK_OFFSET_HOLE if a.cmd == wire::CMD_READ && len == 12 => {
                let offset = u64::from_be_bytes(self.read::<8>()?);
                let size = u64::from(u32::from_be_bytes(self.read::<4>()?));
                if size == 0 {
                    return bad("hole chunk of length 0");
                }
                let at = wire::within(offset, size, a.offset, a.len).map_err(Fail::Protocol)?;
                self.with(h.handle, |p| {
                    p.data[at..at + size as usize].fill(0);
                    p.covered += size;
                })?;
            }
            wire::CHUNK_BLOCK_STATUS if a.cmd == wire::CMD_BLOCK_STATUS => {
                self.block_status(h.handle, a, len)?
            }
            wire::CHUNK_ERROR | wire::CHUNK_ERROR_OFFSET => {
                if len > u64::from(wire::MAX_ERROR_CHUNK) {
                    return bad(format!("error chunk of {len} bytes"));
                }
                let mut payload = vec![0u8; len as usize];
                self.r.read_exact(&mut payload)?;
                let with_offset = h.kind == wire::CHUNK_ERROR_OFFSET;
                let e = wire::error_chunk(&payload, with_offset).map_err(Fail::Protocol)?;
                self.with(h.handle, |p| {
                    p.error.get_or_insert(e);
                })?;
            }
            k => {
                let cmd = super::conn::cmd_name(a.cmd);
                return bad(format!("reply chunk type {k} ({len} bytes) to a {cmd}"));
            }
        }
        if h.flags & wire::REPLY_FLAG_DONE != 0 {
            self.finish(h.handle)?;
        }
        Ok(())
    }

    /// Reads `n` bytes of a read's data into its buffer at `at` (checked by the caller
    /// to lie within it), without holding the lock while the socket is read.
    fn read_data(&mut self, handle: u64, at: usize, n: usize) -> Result<(), Fail> {
        let mut buf = self.with(handle, |p| std::mem::take(&mut p.data))?;
        let got = self.r.read_exact(&mut buf[at..at + n]);
        self.with(handle, |p| {
            p.data = buf;
            p.covered += n as u64;
        })?;
        Ok(got?)
    }

    fn block_status(&mut self, handle: u64, a: Asked, len: u64) -> Result<(), Fail> {
        if len < 12 || !(len - 4).is_multiple_of(8) {
            return bad(format!("block status chunk of {len} bytes"));
        }
        let count = (len - 4) / 8;
        if count > u64::from(wire::MAX_DESCRIPTORS) {
            return bad(format!("block status with {count} descriptors"));
        }
        let id = u32::from_be_bytes(self.read::<4>()?);
        if !self.ids.contains(&id) {
            return bad(format!("block status for context id {id}, not negotiated"));
        }
        if self.with(handle, |p| p.extents.iter().any(|(i, _)| *i == id))? {
            return bad(format!("block status for context id {id} twice"));
        }
        let (mut list, mut at, end) = (Vec::new(), a.offset, a.offset + a.len);
        for _ in 0..count {
            let length = u64::from(u32::from_be_bytes(self.read::<4>()?));
            let flags = u32::from_be_bytes(self.read::<4>()?);
            if length == 0 {
                return bad("block status descriptor of length 0");
            }
            // The last descriptor may reach past the request: clip it, drop any after.
            if at < end {
                let length = length.min(end - at);
                push_extent(
                    &mut list,
                    Extent {
                        offset: at,
                        length,
                        flags,
                    },
                );
            }
            at = at.saturating_add(length);
        }
        self.with(handle, |p| p.extents.push((id, list)))
    }

    /// The request's last chunk came: file its result and wake the caller. Checked
    /// before it leaves the map, so a waiter never finds its request missing.
    fn finish(&mut self, handle: u64) -> Result<(), Fail> {
        let mut st = self.shared.lock();
        let Some(Slot::Pending(p)) = st.slots.get(&handle) else {
            return bad(format!("handle {handle} vanished"));
        };
        if p.error.is_none() {
            if p.cmd == wire::CMD_READ && p.covered != u64::from(p.len) {
                return bad(format!(
                    "read reply covered {} of {} bytes",
                    p.covered, p.len
                ));
            }
            if p.cmd == wire::CMD_BLOCK_STATUS && p.extents.is_empty() {
                return bad("block status reply without extents");
            }
        }
        let Some(Slot::Pending(p)) = st.slots.remove(&handle) else {
            unreachable!("checked just above");
        };
        let result = match p.error {
            Some(e) => Err(crate::error::Error::new(
                Kind::Io,
                format!(
                    "{}: {} at offset {} (+{}) failed: {}",
                    self.who,
                    super::conn::cmd_name(p.cmd),
                    p.offset,
                    p.len,
                    e.describe()
                ),
            )),
            None => Ok(Done {
                data: p.data,
                extents: p.extents,
            }),
        };
        st.slots.insert(handle, Slot::Done(result));
        self.shared.cond.notify_all();
        Ok(())
    }
}
