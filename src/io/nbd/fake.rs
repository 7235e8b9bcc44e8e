//! Scripted servers for the unit tests: a stream that answers with prepared bytes (the
//! handshake), and a socketpair server that reads requests and sends prepared replies
//! (transmission), so malformed input can be fed to the real decoders.

use crate::io::nbd::conn::{Conn, Setup, Stream, Window};
use crate::io::nbd::wire;
use std::io::{self, Cursor, Read, Write};
use std::os::unix::net::UnixStream;

/// Reads come from the script; writes are kept.
pub struct Script {
    input: Cursor<Vec<u8>>,
    pub written: Vec<u8>,
}

impl Script {
    pub fn new(input: Vec<u8>) -> Script {
        Script {
            input: Cursor::new(input),
            written: Vec::new(),
        }
    }
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One option reply.
pub fn opt_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = wire::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A simple reply.
pub fn simple(errno: u32, handle: u64, data: &[u8]) -> Vec<u8> {
    let mut b = wire::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A structured reply chunk; `len` is the payload's own length unless given.
pub fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8], len: Option<u32>) -> Vec<u8> {
    let mut b = wire::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    let len = len.unwrap_or(payload.len() as u32);
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A connection to a server that reads `requests` requests, answers with `replies`,
/// then reads until the client goes (or closes at once when `hang_up`).
pub fn conn(
    structured: bool,
    ids: Vec<u32>,
    requests: usize,
    replies: Vec<u8>,
    hang_up: bool,
) -> Conn {
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    std::thread::spawn(move || {
        for _ in 0..requests {
            let mut h = [0u8; 28];
            if theirs.read_exact(&mut h).is_err() {
                return;
            }
            let cmd = u16::from_be_bytes([h[6], h[7]]);
            let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]);
            if cmd == wire::CMD_WRITE {
                let mut payload = vec![0u8; len as usize];
                if theirs.read_exact(&mut payload).is_err() {
                    return;
                }
            }
        }
        let _ = theirs.write_all(&replies);
        if !hang_up {
            let _ = io::copy(&mut theirs, &mut io::sink());
        }
    });
    let setup = Setup {
        structured,
        ids,
        who: "NBD export 'fake'".into(),
        window: Window {
            max_requests: 4,
            max_bytes: 1 << 20,
        },
    };
    Conn::start(Stream::Unix(ours), setup).expect("start")
}
