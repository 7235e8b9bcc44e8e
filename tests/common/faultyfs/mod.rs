//! A disk with bad sectors, for real: a tiny FUSE filesystem, served by threads of the
//! test process, that holds one read-only file of deterministic content and answers EIO
//! to every read touching chosen byte ranges, optionally after a delay (a slow disk).
//! In its writable mode ([`FaultyFs::writable`]) it is a destination disk instead, which
//! can drop chosen writes (a lying disk), hang, or vanish like a disk pulled out.
//!
//! It speaks the kernel's FUSE protocol itself over `/dev/fuse` and mounts with mount(2),
//! so it needs root but neither libfuse nor fusermount.
//!
//! What a reader sees (measured on Linux 6.18; tests/faultyfs.rs asserts each point):
//! - The file is opened with `FOPEN_DIRECT_IO`, so the kernel caches none of it: every
//!   read(2), buffered or `O_DIRECT`, reaches the server with the caller's own offset and
//!   length, split into requests of at most 32 pages of the caller's buffer (128 KiB, a
//!   bit less when the buffer is not page-aligned). A read fails exactly when it overlaps
//!   a bad range, so the sector right before or after one reads fine.
//! - A request that overlaps a bad range fails as a whole, like a disk failing a whole
//!   command. So a read(2) of up to 128 KiB touching a bad sector returns EIO and no
//!   data; a longer one whose bad part lies past its first request returns the requests
//!   before it (a short count), and the next read(2) gets EIO.
//! - A loop device over the file (`losetup -r`, see [`FaultyFs::loop_dev`]) read with
//!   `O_DIRECT` fails at sector (512 B) granularity too: a one-sector read becomes one
//!   512-byte request here. As on any block device, an `O_DIRECT` read fails whole (EIO,
//!   no short count) when any part of it is bad.
//! - The same loop device read *buffered* goes through its page cache, whose unit is one
//!   4 KiB page: a buffered read of any sector of a page holding a bad sector fails, and
//!   every other page reads fine. Failed readahead (16-128 KiB) is retried page by page,
//!   so it never widens the damage past the page; a long buffered read stops short at the
//!   bad page and the next read(2) gets EIO. See [`LOOP_BUFFERED_GRANULARITY`]. Pages read
//!   once stay cached: [`FaultyLoop::drop_cache`] forgets them, e.g. after
//!   [`FaultyFs::set_bad`].
//!
//! What a writer sees (tests/vanish.rs asserts each point):
//! - Writes reach the server as made, also buffered ones (direct I/O), cut into requests
//!   of at most 128 KiB; [`FaultyFs::content`] holds them. fsync succeeds; fallocate,
//!   so hole punching, fails with EOPNOTSUPP.
//! - A writable loop device over the file ([`FaultyFs::loop_dev_rw`]) has a page cache:
//!   buffered writes reach the server when the kernel writes them back, `O_DIRECT` ones
//!   before write(2) returns.
//! - After [`FaultyFs::vanish`], a request the server was still answering fails with
//!   ECONNABORTED ("Software caused connection abort") and every later one, open(2) of
//!   the path included, with ENOTCONN ("Transport endpoint is not connected"), in any
//!   process, at once. Through the loop device everything fails with EIO, except a
//!   buffered write of whole pages: it lands in the page cache, and the flush fails.
//!
//! Caveats: it needs root (mount(2), losetup) and bash. The delay is per request and four
//! threads answer, so up to four concurrent requests wait it out together. A writable
//! file lives in memory, twice over once [`FaultyFs::content`] copied it. Drop unmounts,
//! panics included; for a test process killed outright a watchdog process unmounts and
//! detaches its loop devices (see `watchdog`). Every EIO through a loop device also lands
//! in the kernel log as an I/O error.
//!
//! Layout: this file is the handle ([`FaultyFs`]) and the faults it injects;
//! `protocol.rs` the FUSE wire constants and reply encoding, `serve.rs` the threads that
//! answer the kernel, `loopdev.rs` loop devices over the file, `watchdog.rs` the cleanup
//! after a test process killed outright.

mod loopdev;
mod protocol;
mod serve;
mod watchdog;

// Unused in the test files that take no loop device (`common` is compiled into each).
#[allow(unused_imports)]
pub use loopdev::FaultyLoop;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// The one file's name in the mount point.
pub const FILE_NAME: &str = "disk.img";

/// Bad ranges must be aligned to this.
pub const SECTOR: u64 = 512;

/// The smallest unit a buffered read of a loop device over the file fails in: its page
/// cache works in pages, so one bad sector makes its whole 4 KiB page unreadable.
pub const LOOP_BUFFERED_GRANULARITY: u64 = 4096;

/// How many threads answer the kernel, so concurrent readers (and the delay) overlap.
const THREADS: usize = 4;

/// The largest a writable file may grow (by writes or truncation): its content lives in
/// the test's memory. Past it, writes fail with EFBIG.
pub const MAX_WRITABLE_SIZE: u64 = 256 << 20;

/// One READ request the server answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadReq {
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes asked for.
    pub len: u32,
    /// Whether it was answered with EIO.
    pub failed: bool,
}

/// One WRITE request the server answered (writable mounts only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteReq {
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes written.
    pub len: u32,
    /// Whether any of it fell in a lost range (acknowledged, not stored).
    pub lost: bool,
}

/// What reads and writes meet; changeable while mounted.
struct Faults {
    bad: Vec<(u64, u64)>,
    lost: Vec<(u64, u64)>,
    delay: Duration,
}

/// State the serving threads share with the handle.
struct Shared {
    content: RwLock<Vec<u8>>,
    /// Bumped on every change of `content`, so [`FaultyFs::content`] copies it only then.
    version: AtomicU64,
    writable: bool,
    faults: Mutex<Faults>,
    stop: AtomicBool,
    /// Set by [`FaultyFs::vanish`]: a pending delay ends at once.
    gone: AtomicBool,
    log: Mutex<Vec<ReadReq>>,
    writes: Mutex<Vec<WriteReq>>,
    eio: AtomicU64,
    /// Requests being held by a delay right now.
    held: AtomicU64,
    /// With [`FaultyFs::volatile`]: the content as of the last fsync, what a power cut
    /// leaves.
    flushed: Mutex<Option<Vec<u8>>>,
}

/// A mounted faulty filesystem; unmounted, and its threads stopped, on drop.
pub struct FaultyFs {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    fd: Option<OwnedFd>,
    watchdog: Option<Child>,
    /// Copies of the content handed out by [`FaultyFs::content`], by version; never
    /// removed before drop, which is what lets it return a plain `&[u8]`.
    snapshots: Mutex<Vec<(u64, Box<[u8]>)>>,
    /// The connection's number in fusectl (the mount's minor device number).
    conn: u32,
    file: PathBuf,
    dir: tempfile::TempDir,
}

impl FaultyFs {
    /// Mounts a file of `size` bytes of `data(size, seed)` (see `common::data`), whose
    /// reads fail with EIO when they touch any `(offset, len)` of `bad` (512-aligned), and
    /// that sleeps `delay` before answering each read.
    pub fn mount(size: u64, seed: u64, bad: &[(u64, u64)], delay: Duration) -> FaultyFs {
        Self::with_content(super::data(size as usize, seed), bad, delay)
    }

    /// Like [`FaultyFs::mount`], but serving `content` (e.g. read from a regular file).
    pub fn with_content(content: Vec<u8>, bad: &[(u64, u64)], delay: Duration) -> FaultyFs {
        Self::start(content, false, bad, delay)
    }

    /// Mounts a *writable* file of `size` bytes of `data(size, seed)`: a disk to write to.
    /// Writes land in memory ([`FaultyFs::content`] shows them); truncation resizes it (up
    /// to [`MAX_WRITABLE_SIZE`]); fsync and flush succeed; fallocate (so hole punching)
    /// is not supported (EOPNOTSUPP), as on many filesystems. Faults to inject:
    /// [`FaultyFs::set_bad`] (reads), [`FaultyFs::lose_writes`], [`FaultyFs::set_delay`],
    /// [`FaultyFs::vanish`].
    pub fn writable(size: u64, seed: u64) -> FaultyFs {
        assert!(size <= MAX_WRITABLE_SIZE, "{size} bytes is too big to hold");
        Self::start(super::data(size as usize, seed), true, &[], Duration::ZERO)
    }

    fn start(content: Vec<u8>, writable: bool, bad: &[(u64, u64)], delay: Duration) -> FaultyFs {
        super::require_root();
        check_bad(bad);
        let shared = Arc::new(Shared {
            content: RwLock::new(content),
            version: AtomicU64::new(0),
            writable,
            faults: Mutex::new(Faults {
                bad: bad.to_vec(),
                lost: Vec::new(),
                delay,
            }),
            stop: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            writes: Mutex::new(Vec::new()),
            eio: AtomicU64::new(0),
            held: AtomicU64::new(0),
            flushed: Mutex::new(None),
        });
        let dir = tempfile::tempdir().expect("mount point");
        // CLOEXEC: a child (blocksync, dd) holding it would keep the connection alive
        // after we close it. NONBLOCK: idle threads must notice `stop`.
        let raw = unsafe {
            libc::open(
                c"/dev/fuse".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        assert!(raw >= 0, "open /dev/fuse: {}", io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Built before mounting, so that Drop cleans up whatever step fails; the watchdog
        // first of all, so the mount is never without one.
        let mut fs = FaultyFs {
            shared,
            threads: Vec::new(),
            fd: Some(fd),
            watchdog: Some(watchdog::watchdog(dir.path())),
            snapshots: Mutex::new(Vec::new()),
            conn: 0,
            file: dir.path().join(FILE_NAME),
            dir,
        };
        let target = CString::new(fs.dir.path().as_os_str().as_bytes()).unwrap();
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        // allow_other: blocksync, dd and the loop driver read it, not only this process.
        let opts = CString::new(format!(
            "fd={raw},rootmode=40000,user_id={uid},group_id={gid},allow_other"
        ))
        .unwrap();
        let ro = if writable { 0 } else { libc::MS_RDONLY };
        let rc = unsafe {
            libc::mount(
                c"faultyfs".as_ptr(),
                target.as_ptr(),
                c"fuse.faultyfs".as_ptr(),
                ro | libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        assert!(rc == 0, "mount fuse: {}", io::Error::last_os_error());
        for i in 0..THREADS {
            let shared = fs.shared.clone();
            let fd = fs.fd.as_ref().unwrap().as_raw_fd();
            let t = std::thread::Builder::new()
                .name(format!("faultyfs-{i}"))
                .spawn(move || serve::serve(&shared, fd))
                .expect("spawn faultyfs thread");
            fs.threads.push(t);
        }
        // Waits for INIT, so a broken server fails here rather than in the test.
        let meta = std::fs::metadata(&fs.file).expect("stat the faulty file");
        assert_eq!(meta.len(), fs.size());
        // Found now: once vanished, the mount can no longer be asked.
        fs.conn = libc::minor(meta.dev() as libc::dev_t);
        fs
    }

    /// The file with bad sectors.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The mount point.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The file's whole content, as the good parts read back; for a writable file, a copy
    /// as of this call (kept until drop, so call it after the writes, not in a loop
    /// between them).
    pub fn content(&self) -> &[u8] {
        let mut snaps = self.snapshots.lock().unwrap();
        let content = self.shared.content.read().unwrap();
        // Read under the content lock, so it matches what is copied.
        let version = self.shared.version.load(Ordering::Relaxed);
        if snaps.last().map(|s| s.0) != Some(version) {
            snaps.push((version, content.clone().into_boxed_slice()));
        }
        let last: &[u8] = &snaps.last().unwrap().1;
        // SAFETY: the boxed copy is never mutated nor dropped before `self` is (`snapshots`
        // only grows), and growing the Vec moves the boxes, not the bytes they point to.
        unsafe { std::slice::from_raw_parts(last.as_ptr(), last.len()) }
    }

    /// Same as [`FaultyFs::content`]: what a perfect copy holds.
    pub fn expected(&self) -> &[u8] {
        self.content()
    }

    /// The file's size now.
    pub fn size(&self) -> u64 {
        self.shared.content.read().unwrap().len() as u64
    }

    /// The bad ranges now in force.
    pub fn bad(&self) -> Vec<(u64, u64)> {
        self.shared.faults.lock().unwrap().bad.clone()
    }

    /// Replaces the bad ranges, e.g. to heal a sector that should read on a retry.
    pub fn set_bad(&self, bad: &[(u64, u64)]) {
        check_bad(bad);
        self.shared.faults.lock().unwrap().bad = bad.to_vec();
    }

    /// Replaces the delay before each read's (and write's) answer. A long one makes a
    /// disk that stops answering; [`FaultyFs::vanish`] and drop cut it short.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.faults.lock().unwrap().delay = delay;
    }

    /// A lying disk: from now on, writes touching any `(offset, len)` of `lost`
    /// (512-aligned) are acknowledged in full but leave the bytes in those ranges as they
    /// were; the rest of each write lands. Reads return what is stored, so only a re-read
    /// finds out. Writable mounts only.
    pub fn lose_writes(&self, lost: &[(u64, u64)]) {
        assert!(self.shared.writable, "lose_writes needs FaultyFs::writable");
        check_bad(lost);
        self.shared.faults.lock().unwrap().lost = lost.to_vec();
    }

    /// A disk with a volatile write cache: from now on, what is written is only kept
    /// once an fsync asks for it; [`FaultyFs::power_cut`] loses the rest.
    pub fn volatile(&self) {
        assert!(self.shared.writable, "volatile needs FaultyFs::writable");
        let now = self.shared.content.read().unwrap().clone();
        *self.shared.flushed.lock().unwrap() = Some(now);
    }

    /// The power goes: the file is as it was at the last fsync (or at
    /// [`FaultyFs::volatile`]), everything written since is lost. The disk keeps serving
    /// (as it would after power came back).
    pub fn power_cut(&self) {
        let kept = self
            .shared
            .flushed
            .lock()
            .unwrap()
            .clone()
            .expect("FaultyFs::volatile first");
        *self.shared.content.write().unwrap() = kept;
        self.shared.version.fetch_add(1, Ordering::Relaxed);
    }

    /// How many requests (reads or writes) the delay is holding right now: with a long
    /// delay, those that a disk that stopped answering sits on. A request taken before
    /// the delay was set is not held.
    pub fn held_requests(&self) -> u64 {
        self.shared.held.load(Ordering::Relaxed)
    }

    /// Returns and forgets the writes answered so far, in answer order.
    pub fn take_writes(&self) -> Vec<WriteReq> {
        std::mem::take(&mut *self.shared.writes.lock().unwrap())
    }

    /// The device goes away, like a disk pulled out: aborts the FUSE connection (as
    /// `echo 1 > /sys/fs/fuse/connections/N/abort` does), so requests in flight fail at
    /// once and every later operation on the mount, by any process and through any loop
    /// device over the file, fails too. Nothing waits for the serving threads. The mount
    /// point stays (a dead mount, as a pulled disk leaves one) until drop.
    pub fn vanish(&self) {
        self.shared.gone.store(true, Ordering::Relaxed);
        abort_connection(self.conn).expect("abort the FUSE connection");
    }

    /// Whether a read of `len` bytes at `offset` overlaps a bad range now.
    pub fn is_bad(&self, offset: u64, len: u64) -> bool {
        overlaps(&self.shared.faults.lock().unwrap().bad, offset, len)
    }

    /// How many reads were answered with EIO so far.
    pub fn eio_count(&self) -> u64 {
        self.shared.eio.load(Ordering::Relaxed)
    }

    /// Returns and forgets the reads answered so far, in answer order.
    pub fn take_reads(&self) -> Vec<ReadReq> {
        std::mem::take(&mut *self.shared.log.lock().unwrap())
    }
}

/// Aborts FUSE connection `conn` through fusectl. Where fusectl is not mounted (no
/// systemd), mounts it privately for the moment: it is one instance wherever it is
/// mounted, so this changes nothing anyone else sees.
fn abort_connection(conn: u32) -> io::Result<()> {
    let abort = |root: &Path| std::fs::write(root.join(conn.to_string()).join("abort"), "1");
    let sys = Path::new("/sys/fs/fuse/connections");
    if sys.join(conn.to_string()).exists() {
        return abort(sys);
    }
    let dir = tempfile::tempdir()?;
    let target = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
    let rc = unsafe {
        libc::mount(
            c"fusectl".as_ptr(),
            target.as_ptr(),
            c"fusectl".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let r = abort(dir.path());
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    r
}

impl Drop for FaultyFs {
    fn drop(&mut self) {
        // Detach, not a plain unmount, so a loop device or a child that still holds the
        // file cannot make this fail. Force too, which aborts the connection in the same
        // step: a detached mount whose server dies with a killed test could no longer be
        // found to abort, and whoever holds its file would hang (see `watchdog`).
        if let Ok(target) = CString::new(self.dir.path().as_os_str().as_bytes()) {
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_FORCE | libc::MNT_DETACH) };
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Whoever still holds the file gets ENOTCONN from now on.
        self.fd.take();
        if let Some(mut w) = self.watchdog.take() {
            use std::io::Write;
            let _ = w.stdin.take().map(|mut i| i.write_all(b"done\n"));
            let _ = w.wait();
        }
    }
}

fn check_bad(bad: &[(u64, u64)]) {
    for &(off, len) in bad {
        assert!(
            off.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR) && len > 0,
            "range ({off}, {len}) is not whole 512-byte sectors"
        );
    }
}

fn overlaps(bad: &[(u64, u64)], offset: u64, len: u64) -> bool {
    bad.iter()
        .any(|&(b, blen)| offset < b + blen && b < offset + len)
}

/// The parts of `start..end` outside every range of `holes`, in order.
fn outside(holes: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut holes: Vec<_> = holes.iter().map(|&(o, l)| (o, o + l)).collect();
    holes.sort_unstable();
    let mut out = Vec::new();
    let mut pos = start;
    for (hs, he) in holes {
        if he <= pos || hs >= end {
            continue;
        }
        if hs > pos {
            out.push((pos, hs));
        }
        pos = pos.max(he);
    }
    if pos < end {
        out.push((pos, end));
    }
    out
}
