//! The FUSE wire protocol as far as [`super::FaultyFs`] speaks it: opcodes and flags
//! from the kernel's include/uapi/linux/fuse.h, and the reply structs it sends.

pub(super) const LOOKUP: u32 = 1;
pub(super) const FORGET: u32 = 2;
pub(super) const GETATTR: u32 = 3;
pub(super) const SETATTR: u32 = 4;
pub(super) const OPEN: u32 = 14;
pub(super) const READ: u32 = 15;
pub(super) const WRITE: u32 = 16;
pub(super) const STATFS: u32 = 17;
pub(super) const RELEASE: u32 = 18;
pub(super) const FSYNC: u32 = 20;
pub(super) const FLUSH: u32 = 25;
pub(super) const INIT: u32 = 26;
pub(super) const OPENDIR: u32 = 27;
pub(super) const READDIR: u32 = 28;
pub(super) const RELEASEDIR: u32 = 29;
pub(super) const FSYNCDIR: u32 = 30;
pub(super) const CREATE: u32 = 35;
pub(super) const INTERRUPT: u32 = 36;
pub(super) const DESTROY: u32 = 38;
pub(super) const BATCH_FORGET: u32 = 42;

pub(super) const FUSE_ASYNC_READ: u32 = 1 << 0;
pub(super) const FUSE_BIG_WRITES: u32 = 1 << 5;
pub(super) const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// fuse_setattr_in.valid: the size is to change.
pub(super) const FATTR_SIZE: u32 = 1 << 3;
/// Bytes of struct fuse_write_in before the data.
pub(super) const WRITE_IN: usize = 40;
/// Largest write we take in one request: the default 32 pages, which is also what the
/// kernel would cut a direct write into anyway.
pub(super) const MAX_WRITE: u32 = 128 * 1024;
/// The protocol minor we speak; newer kernels talk down to it.
pub(super) const MINOR: u32 = 31;

pub(super) const ROOT: u64 = 1;
pub(super) const FILE: u64 = 2;
pub(super) const IN_HEADER: usize = 40;
/// Cache names and attributes for an hour: they never change, or (a writable file's
/// size) only through the kernel, which keeps its copy up to date.
pub(super) const VALID_SECS: u64 = 3600;

/// struct fuse_attr_out, for GETATTR and SETATTR.
pub(super) fn attr_out(nodeid: u64, size: u64, writable: bool) -> Result<Vec<u8>, i32> {
    let mut o = Out::default();
    o.u64(VALID_SECS);
    o.u32(0);
    o.u32(0);
    attr(&mut o, nodeid, size, writable);
    Ok(o.0)
}

/// struct fuse_attr: a read-only (or writable) file in a read-only directory.
pub(super) fn attr(o: &mut Out, nodeid: u64, size: u64, writable: bool) {
    let (size, mode, nlink) = if nodeid == FILE {
        let perm = if writable { 0o644 } else { 0o444 };
        (size, libc::S_IFREG | perm, 1)
    } else {
        (0, libc::S_IFDIR | 0o555, 2)
    };
    o.u64(nodeid); // ino
    o.u64(size);
    o.u64(size.div_ceil(512)); // blocks
    o.pad(24); // atime, mtime, ctime
    o.pad(12); // their nanoseconds
    o.u32(mode);
    o.u32(nlink);
    o.u32(rustix::process::geteuid().as_raw());
    o.u32(rustix::process::getegid().as_raw());
    o.u32(0); // rdev
    o.u32(4096); // blksize
    o.u32(0); // flags
}

/// A reply being built, in the kernel's (native) byte order.
#[derive(Default)]
pub(super) struct Out(pub(super) Vec<u8>);

impl Out {
    pub(super) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_ne_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_ne_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_ne_bytes());
    }
    pub(super) fn pad(&mut self, n: usize) {
        self.0.resize(self.0.len() + n, 0);
    }
}

/// Reads a field of a request; a short request reads as zeros rather than panicking a
/// serving thread (which would hang every reader).
pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_ne_bytes(s.try_into().unwrap()))
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_ne_bytes(s.try_into().unwrap()))
}
