//! The transmission phase: requests written by the caller's thread, replies read by one
//! reader thread that files each under its handle until the caller collects it.
//!
//! Why a reader thread: a caller that pipelines writes and reads on one thread can
//! deadlock, blocked sending a write's payload while the server is blocked sending a
//! read's data that nobody reads. The reader drains the socket at all times, so the
//! caller's writes always progress. Memory stays bounded by the window: at most
//! `max_requests` requests and `max_bytes` of read buffers are submitted and not yet
//! collected, and every buffer is sized from our own request, never from the peer.

use crate::error::{Error, Kind, Result, os_text};
use crate::io::nbd::reader::{Done, Pending, Reader, Shared, Slot, State};
use crate::io::nbd::uri::Address;
use crate::io::nbd::wire;
use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A TCP or unix socket to the server.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn connect(address: &Address) -> io::Result<Stream> {
        Ok(match address {
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                // Request headers are small and sent one by one: do not wait for more.
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Address::Unix(path) => Stream::Unix(UnixStream::connect(path)?),
        })
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        // Best effort: the socket may already be closed by the peer.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// A deadline for each read and write (the handshake), or none (transmission).
    pub fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A submitted request, to collect with [`Conn::wait`]. Not `Clone`: each is collected
/// once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a submitted request must be collected with wait"]
pub struct Handle(u64);

/// One request's header fields.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub cmd: u16,
    pub flags: u16,
    pub offset: u64,
    pub len: u32,
}

/// How much may be submitted and not yet collected.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub max_requests: usize,
    pub max_bytes: usize,
}

/// What the connection needs from the handshake.
pub struct Setup {
    pub structured: bool,
    /// The context ids the server gave.
    pub ids: Vec<u32>,
    /// Names the export in messages.
    pub who: String,
    pub window: Window,
}

/// A connection in the transmission phase.
pub struct Conn {
    stream: Stream,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    next: u64,
    window: Window,
    /// Submitted and not collected: handle -> bytes of read buffer.
    in_flight: HashMap<u64, usize>,
    bytes: usize,
    who: String,
}

pub fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        wire::CMD_READ => "read",
        wire::CMD_WRITE => "write",
        wire::CMD_FLUSH => "flush",
        wire::CMD_TRIM => "trim",
        wire::CMD_WRITE_ZEROES => "write zeroes",
        wire::CMD_BLOCK_STATUS => "block status",
        _ => "request",
    }
}

impl Conn {
    /// Starts the reader thread on a clone of `stream`.
    pub fn start(stream: Stream, setup: Setup) -> Result<Conn> {
        let err = |e: io::Error| {
            Error::new(
                Kind::Io,
                format!("{}: cannot start: {}", setup.who, os_text(&e)),
            )
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                slots: HashMap::new(),
                broken: None,
                closing: false,
            }),
            cond: Condvar::new(),
        });
        let reader = Reader {
            r: BufReader::with_capacity(64 * 1024, stream.try_clone().map_err(err)?),
            shared: Arc::clone(&shared),
            structured: setup.structured,
            ids: setup.ids,
            who: setup.who.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader.run())
            .map_err(err)?;
        Ok(Conn {
            stream,
            shared,
            reader: Some(handle),
            next: 1,
            window: setup.window,
            in_flight: HashMap::new(),
            bytes: 0,
            who: setup.who,
        })
    }

    /// Whether a request with `read_len` bytes of read buffer fits in the window now.
    pub fn has_room(&self, read_len: usize) -> bool {
        self.in_flight.len() < self.window.max_requests
            && (self.in_flight.is_empty() || self.bytes + read_len <= self.window.max_bytes)
    }

    fn broken(&self) -> Option<Error> {
        let st = self.shared.lock();
        st.broken.as_ref().map(|(k, m)| Error::new(*k, m.clone()))
    }

    /// Sends one request; its reply is collected with [`Conn::wait`]. `payload` is the
    /// data of a write. Fails without sending when the window is full.
    pub fn submit(&mut self, req: Request, payload: &[u8]) -> Result<Handle> {
        let Request {
            cmd,
            flags,
            offset,
            len,
        } = req;
        if let Some(e) = self.broken() {
            return Err(e);
        }
        let read_len = if cmd == wire::CMD_READ {
            len as usize
        } else {
            0
        };
        if !self.has_room(read_len) {
            return Err(Error::new(
                Kind::Internal,
                format!(
                    "{}: too many requests in flight: collect replies first",
                    self.who
                ),
            ));
        }
        let handle = self.next;
        self.next += 1;
        let pending = Pending {
            cmd,
            offset,
            len,
            data: vec![0; read_len],
            covered: 0,
            extents: Vec::new(),
            error: None,
        };
        // Filed before sending: the reply may come before write_all returns.
        self.shared
            .lock()
            .slots
            .insert(handle, Slot::Pending(pending));
        self.in_flight.insert(handle, read_len);
        self.bytes += read_len;
        let header = wire::request(cmd, flags, handle, offset, len);
        let sent = self
            .stream
            .write_all(&header)
            .and_then(|_| self.stream.write_all(payload));
        if let Err(e) = sent {
            let why = format!("{}: sending a request failed: {}", self.who, os_text(&e));
            self.shared.fail(Kind::Io, why);
            self.stream.shutdown();
            self.in_flight.remove(&handle);
            self.bytes -= read_len;
            // The reader may know better why (the server's last words).
            return Err(self.broken().unwrap_or_else(|| Error::new(Kind::Io, "")));
        }
        Ok(Handle(handle))
    }

    /// Waits for the reply to `h`.
    pub fn wait(&mut self, h: Handle) -> Result<Done> {
        if let Some(bytes) = self.in_flight.remove(&h.0) {
            self.bytes -= bytes;
        }
        let mut st = self.shared.lock();
        loop {
            if let Some(Slot::Done(_)) = st.slots.get(&h.0) {
                let Some(Slot::Done(r)) = st.slots.remove(&h.0) else {
                    unreachable!("checked just above");
                };
                return r;
            }
            if let Some((k, m)) = st.broken.clone() {
                st.slots.remove(&h.0);
                return Err(Error::new(k, m));
            }
            if !st.slots.contains_key(&h.0) {
                return Err(Error::new(
                    Kind::Internal,
                    format!("unknown NBD handle {}", h.0),
                ));
            }
            st = self.shared.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Collects what is in flight, sends NBD_CMD_DISC and stops the reader.
    pub fn close(mut self) -> Result<()> {
        let handles: Vec<u64> = self.in_flight.keys().copied().collect();
        let mut first = None;
        for h in handles {
            if let Err(e) = self.wait(Handle(h)) {
                first.get_or_insert(e);
            }
        }
        let broken = self.broken();
        self.disconnect();
        match first.or(broken) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn disconnect(&mut self) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        self.shared.lock().closing = true;
        let disc = wire::request(wire::CMD_DISC, 0, 0, 0, 0);
        // Best effort: a server already gone needs no goodbye.
        let _ = self.stream.write_all(&disc);
        self.stream.shutdown();
        let _ = reader.join();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.disconnect();
    }
}
