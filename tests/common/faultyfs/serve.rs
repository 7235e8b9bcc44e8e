//! The threads that answer the kernel's FUSE requests for a [`super::FaultyFs`].

use super::protocol::*;
use super::{FILE_NAME, MAX_WRITABLE_SIZE, ReadReq, Shared, WriteReq, outside, overlaps};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Largest read the kernel sends without FUSE_MAX_PAGES is 32 pages, and the largest
/// write MAX_WRITE; room for headers.
const BUF: usize = 256 * 1024;

/// One serving thread: reads requests until told to stop or the kernel hangs up.
pub(super) fn serve(shared: &Shared, fd: RawFd) {
    let mut buf = vec![0u8; BUF];
    while !shared.stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // A short timeout so a stop request is seen soon.
        unsafe { libc::poll(&mut pfd, 1, 50) };
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Nothing yet, another thread took it, or it was interrupted away.
                Some(libc::EAGAIN | libc::EINTR | libc::ENOENT) => continue,
                // Unmounted or aborted.
                Some(libc::ENODEV) => return,
                e => {
                    eprintln!("faultyfs: read /dev/fuse: {e:?}");
                    return;
                }
            }
        }
        let req = &buf[..n as usize];
        if req.len() < IN_HEADER {
            continue;
        }
        let opcode = u32_at(req, 4);
        let unique = u64_at(req, 8);
        let nodeid = u64_at(req, 16);
        let body = &req[IN_HEADER..];
        let reply = match answer(shared, opcode, nodeid, body) {
            None => continue,
            Some(r) => r,
        };
        send(fd, unique, reply);
        if opcode == DESTROY {
            return;
        }
    }
}

/// Writes one reply; a reply to a request interrupted meanwhile is refused (ENOENT), which
/// is fine.
fn send(fd: RawFd, unique: u64, reply: Result<Vec<u8>, i32>) {
    let (err, payload) = match reply {
        Ok(p) => (0, p),
        Err(e) => (-e, Vec::new()),
    };
    let mut msg = Vec::with_capacity(16 + payload.len());
    msg.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&err.to_ne_bytes());
    msg.extend_from_slice(&unique.to_ne_bytes());
    msg.extend_from_slice(&payload);
    unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
}

/// The answer to one request: a payload, an errno, or None for requests with no reply.
fn answer(shared: &Shared, opcode: u32, nodeid: u64, body: &[u8]) -> Option<Result<Vec<u8>, i32>> {
    let size = shared.content.read().unwrap().len() as u64;
    let writable = shared.writable;
    Some(match opcode {
        INIT => init(body),
        LOOKUP => lookup(nodeid, body, size, writable),
        FORGET | BATCH_FORGET | INTERRUPT => return None,
        GETATTR => attr_out(nodeid, size, writable),
        OPEN if nodeid == FILE => open(body, writable),
        OPEN => Err(libc::EISDIR),
        OPENDIR if nodeid == ROOT => Ok(vec![0; 16]),
        OPENDIR => Err(libc::ENOTDIR),
        READ if nodeid == FILE => read(shared, body),
        READ => Err(libc::EISDIR),
        SETATTR | WRITE | CREATE if !writable => Err(libc::EROFS),
        WRITE if nodeid == FILE => write(shared, body),
        SETATTR if nodeid == FILE => setattr(shared, body),
        // The disk holds its one file and nothing else.
        SETATTR | WRITE | CREATE => Err(libc::EPERM),
        READDIR => readdir(body),
        STATFS => statfs(size),
        FSYNC => {
            // A volatile disk keeps, from now, what was written until now.
            let mut flushed = shared.flushed.lock().unwrap();
            if flushed.is_some() {
                *flushed = Some(shared.content.read().unwrap().clone());
            }
            Ok(Vec::new())
        }
        RELEASE | RELEASEDIR | FLUSH | FSYNCDIR | DESTROY => Ok(Vec::new()),
        // Everything else (xattrs, access, lseek, ...) is "not implemented": the kernel
        // remembers and falls back to its defaults.
        _ => Err(libc::ENOSYS),
    })
}

/// Answers INIT: the protocol version we speak and the limits we keep.
fn init(body: &[u8]) -> Result<Vec<u8>, i32> {
    let major = u32_at(body, 0);
    let minor = u32_at(body, 4);
    let max_readahead = u32_at(body, 8);
    let flags = u32_at(body, 12);
    if major < 7 {
        Err(libc::EPROTO)
    } else {
        let mut o = Out::default();
        o.u32(7);
        o.u32(if major > 7 { MINOR } else { minor.min(MINOR) });
        o.u32(max_readahead);
        o.u32(flags & (FUSE_ASYNC_READ | FUSE_BIG_WRITES));
        o.u16(16); // max_background
        o.u16(12); // congestion_threshold
        o.u32(MAX_WRITE);
        o.u32(1); // time_gran
        o.pad(64 - o.0.len()); // max_pages (default), flags2, unused
        Ok(o.0)
    }
}

/// Answers LOOKUP: the one file in the root, nothing else.
fn lookup(nodeid: u64, body: &[u8], size: u64, writable: bool) -> Result<Vec<u8>, i32> {
    let name = body.split(|&b| b == 0).next().unwrap_or(&[]);
    if nodeid == ROOT && name == FILE_NAME.as_bytes() {
        let mut o = Out::default();
        o.u64(FILE);
        o.u64(1); // generation
        o.u64(VALID_SECS);
        o.u64(VALID_SECS);
        o.u32(0);
        o.u32(0);
        attr(&mut o, FILE, size, writable);
        Ok(o.0)
    } else {
        Err(libc::ENOENT)
    }
}

/// Answers OPEN of the file: refused for writing unless writable, direct I/O always.
fn open(body: &[u8], writable: bool) -> Result<Vec<u8>, i32> {
    if !writable && u32_at(body, 0) as i32 & libc::O_ACCMODE != libc::O_RDONLY {
        Err(libc::EROFS)
    } else {
        // Direct I/O: the kernel caches nothing, so every read and write comes here.
        let mut o = Out::default();
        o.u64(0);
        o.u32(FOPEN_DIRECT_IO);
        o.u32(0);
        Ok(o.0)
    }
}

/// Answers one READ of the file: EIO if it touches a bad range, after the delay; logged.
fn read(shared: &Shared, body: &[u8]) -> Result<Vec<u8>, i32> {
    let offset = u64_at(body, 8);
    let len = u32_at(body, 16);
    let (bad, delay) = {
        let f = shared.faults.lock().unwrap();
        (overlaps(&f.bad, offset, len as u64), f.delay)
    };
    pause(shared, delay);
    shared.log.lock().unwrap().push(ReadReq {
        offset,
        len,
        failed: bad,
    });
    if bad {
        shared.eio.fetch_add(1, Ordering::Relaxed);
        Err(libc::EIO)
    } else {
        let content = shared.content.read().unwrap();
        let size = content.len() as u64;
        let start = offset.min(size) as usize;
        let end = (offset + len as u64).min(size) as usize;
        Ok(content[start..end].to_vec())
    }
}

/// Answers SETATTR of a writable file: only a change of size does anything.
fn setattr(shared: &Shared, body: &[u8]) -> Result<Vec<u8>, i32> {
    if u32_at(body, 0) & FATTR_SIZE != 0 {
        let new = u64_at(body, 16);
        if new > MAX_WRITABLE_SIZE {
            return Err(libc::EFBIG);
        }
        let mut content = shared.content.write().unwrap();
        content.resize(new as usize, 0);
        shared.version.fetch_add(1, Ordering::Relaxed);
    }
    // Mode, owner and times stay as they are: nothing here depends on them.
    attr_out(
        FILE,
        shared.content.read().unwrap().len() as u64,
        shared.writable,
    )
}

/// Answers READDIR of the root: ".", ".." and the file, from `offset` on.
fn readdir(body: &[u8]) -> Result<Vec<u8>, i32> {
    let offset = u64_at(body, 8);
    let len = u32_at(body, 16) as usize;
    let entries: [(u64, &str, u32); 3] = [
        (ROOT, ".", libc::DT_DIR as u32),
        (ROOT, "..", libc::DT_DIR as u32),
        (FILE, FILE_NAME, libc::DT_REG as u32),
    ];
    let mut o = Out::default();
    for (i, &(ino, name, kind)) in entries.iter().enumerate().skip(offset as usize) {
        let rec = (24 + name.len()).div_ceil(8) * 8;
        if o.0.len() + rec > len {
            break;
        }
        o.u64(ino);
        o.u64(i as u64 + 1); // the offset of the next entry
        o.u32(name.len() as u32);
        o.u32(kind);
        o.0.extend_from_slice(name.as_bytes());
        o.pad(rec - 24 - name.len());
    }
    Ok(o.0)
}

/// Answers STATFS: a full filesystem of `size` bytes.
fn statfs(size: u64) -> Result<Vec<u8>, i32> {
    let mut o = Out::default();
    o.u64(size.div_ceil(512)); // blocks
    o.u64(0); // bfree
    o.u64(0); // bavail
    o.u64(2); // files
    o.u64(0); // ffree
    o.u32(512); // bsize
    o.u32(255); // namelen
    o.u32(512); // frsize
    o.pad(80 - o.0.len());
    Ok(o.0)
}

/// Answers one WRITE: stores the data (except in lost ranges), acknowledges all of it.
fn write(shared: &Shared, body: &[u8]) -> Result<Vec<u8>, i32> {
    let offset = u64_at(body, 8);
    let len = u32_at(body, 16);
    let Some(data) = body.get(WRITE_IN..WRITE_IN + len as usize) else {
        return Err(libc::EIO);
    };
    let end = offset.saturating_add(len as u64);
    if end > MAX_WRITABLE_SIZE {
        return Err(libc::EFBIG);
    }
    let (lost, delay) = {
        let f = shared.faults.lock().unwrap();
        (f.lost.clone(), f.delay)
    };
    pause(shared, delay);
    {
        let mut content = shared.content.write().unwrap();
        if end as usize > content.len() {
            content.resize(end as usize, 0);
        }
        for (s, e) in outside(&lost, offset, end) {
            content[s as usize..e as usize]
                .copy_from_slice(&data[(s - offset) as usize..(e - offset) as usize]);
        }
        shared.version.fetch_add(1, Ordering::Relaxed);
    }
    shared.writes.lock().unwrap().push(WriteReq {
        offset,
        len,
        lost: overlaps(&lost, offset, len as u64),
    });
    let mut o = Out::default();
    o.u32(len); // struct fuse_write_out: all of it, whatever was kept
    o.u32(0);
    Ok(o.0)
}

/// Sleeps `delay`, or less if the disk vanishes or is unmounted meanwhile; counted in
/// `held` meanwhile.
fn pause(shared: &Shared, delay: Duration) {
    if delay.is_zero() {
        return;
    }
    shared.held.fetch_add(1, Ordering::Relaxed);
    let until = Instant::now() + delay;
    while !shared.gone.load(Ordering::Relaxed) && !shared.stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
    shared.held.fetch_sub(1, Ordering::Relaxed);
}
