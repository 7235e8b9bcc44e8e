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

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
            watchdog: Some(watchdog(dir.path())),
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
                .spawn(move || serve(&shared, fd))
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

    /// A read-only loop device over the file, detached on drop. It borrows `self` so it
    /// is detached before the filesystem goes away.
    pub fn loop_dev(&self) -> FaultyLoop<'_> {
        // losetup -f --show picks a free device atomically enough for parallel tests.
        let dev = super::sh("losetup", &["-f", "--show", "-r", super::s(&self.file)]);
        FaultyLoop {
            dev: PathBuf::from(dev),
            _fs: self,
        }
    }

    /// A writable loop device over the file (of a [`FaultyFs::writable`] mount), detached
    /// on drop: a block device to write to, whose writes reach this server when the
    /// kernel writes back its page cache (or at once with `O_DIRECT`), and which fails
    /// with EIO once the file [vanishes](FaultyFs::vanish).
    pub fn loop_dev_rw(&self) -> FaultyLoop<'_> {
        assert!(self.shared.writable, "loop_dev_rw needs FaultyFs::writable");
        let dev = super::sh("losetup", &["-f", "--show", super::s(&self.file)]);
        FaultyLoop {
            dev: PathBuf::from(dev),
            _fs: self,
        }
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

/// A loop block device over a [`FaultyFs`] file, read-only or writable; detached on drop.
pub struct FaultyLoop<'a> {
    /// /dev/loopN
    pub dev: PathBuf,
    _fs: &'a FaultyFs,
}

impl FaultyLoop<'_> {
    /// Forgets the device's cached pages (BLKFLSBUF), so the next buffered read of them
    /// reaches the server again.
    pub fn drop_cache(&self) {
        const BLKFLSBUF: libc::c_ulong = 0x1261; // _IO(0x12, 97); not in the libc crate
        let f = std::fs::File::open(&self.dev).expect("open loop device");
        let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF) };
        assert!(rc == 0, "BLKFLSBUF: {}", io::Error::last_os_error());
    }
}

impl Drop for FaultyLoop<'_> {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
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

/// Cleans up after a test process killed outright (SIGKILL, Ctrl-C), where Drop never
/// runs. Worse than a stale mount: if the process was reading its own file, that reader
/// waits uninterruptibly for an answer the dead server threads will never send, and as
/// the reader keeps the process's /dev/fuse fd open, nothing ever aborts the connection;
/// the process stays a zombie. Even closing its files at exit can hang the same way, on
/// the FLUSH of the faulty file. So a watcher outside it (its own process group, so
/// Ctrl-C spares it) waits for "done" from Drop, or for the process to end or start
/// exiting, and then detaches loop devices over the file and force-unmounts, which
/// aborts the connection.
fn watchdog(dir: &Path) -> Child {
    const SCRIPT: &str = r#"
        trap '' INT TERM HUP QUIT
        while :; do
            read -r -t 0.2 line; rc=$?
            [ $rc -eq 0 ] && [ "$line" = done ] && exit 0
            [ $rc -gt 128 ] || break # end of input without "done": the test died
            read -r st < "/proc/$1/stat" || break
            st=(${st##*) })
            # Dead, or dying (PF_EXITING) and maybe stuck closing its files.
            [ "${st[0]}" = Z ] && break
            (( st[6] & 4 )) && break
        done
        # Loop devices over the file would outlive it, failing every read.
        loops=()
        for f in /sys/block/loop*/loop/backing_file; do
            read -r b < "$f" && [ "$b" = "$3" ] || continue
            d=${f#/sys/block/}
            loops+=("/dev/${d%%/*}")
        done 2>/dev/null
        umount -f -l "$2"
        for d in "${loops[@]}"; do losetup -d "$d"; done
        rmdir "$2"
    "#;
    Command::new("bash")
        .args(["-c", SCRIPT, "faultyfs-watchdog"])
        .arg(std::process::id().to_string())
        .arg(dir)
        .arg(dir.join(FILE_NAME))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start the faultyfs watchdog")
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

// Opcodes and flags from the kernel's include/uapi/linux/fuse.h.
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const FSYNCDIR: u32 = 30;
const CREATE: u32 = 35;
const INTERRUPT: u32 = 36;
const DESTROY: u32 = 38;
const BATCH_FORGET: u32 = 42;

const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// fuse_setattr_in.valid: the size is to change.
const FATTR_SIZE: u32 = 1 << 3;
/// Bytes of struct fuse_write_in before the data.
const WRITE_IN: usize = 40;
/// Largest write we take in one request: the default 32 pages, which is also what the
/// kernel would cut a direct write into anyway.
const MAX_WRITE: u32 = 128 * 1024;
/// The protocol minor we speak; newer kernels talk down to it.
const MINOR: u32 = 31;

const ROOT: u64 = 1;
const FILE: u64 = 2;
const IN_HEADER: usize = 40;
/// Cache names and attributes for an hour: they never change, or (a writable file's
/// size) only through the kernel, which keeps its copy up to date.
const VALID_SECS: u64 = 3600;
/// Largest read the kernel sends without FUSE_MAX_PAGES is 32 pages, and the largest
/// write MAX_WRITE; room for headers.
const BUF: usize = 256 * 1024;

/// One serving thread: reads requests until told to stop or the kernel hangs up.
fn serve(shared: &Shared, fd: RawFd) {
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
        INIT => {
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
        LOOKUP => {
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
        FORGET | BATCH_FORGET | INTERRUPT => return None,
        GETATTR => attr_out(nodeid, size, writable),
        OPEN if nodeid == FILE => {
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
        OPEN => Err(libc::EISDIR),
        OPENDIR if nodeid == ROOT => Ok(vec![0; 16]),
        OPENDIR => Err(libc::ENOTDIR),
        READ if nodeid == FILE => {
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
        READ => Err(libc::EISDIR),
        SETATTR | WRITE | CREATE if !writable => Err(libc::EROFS),
        WRITE if nodeid == FILE => write(shared, body),
        SETATTR if nodeid == FILE => {
            if u32_at(body, 0) & FATTR_SIZE != 0 {
                let new = u64_at(body, 16);
                if new > MAX_WRITABLE_SIZE {
                    return Some(Err(libc::EFBIG));
                }
                let mut content = shared.content.write().unwrap();
                content.resize(new as usize, 0);
                shared.version.fetch_add(1, Ordering::Relaxed);
            }
            // Mode, owner and times stay as they are: nothing here depends on them.
            attr_out(FILE, shared.content.read().unwrap().len() as u64, writable)
        }
        // The disk holds its one file and nothing else.
        SETATTR | WRITE | CREATE => Err(libc::EPERM),
        READDIR => {
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
        STATFS => {
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
        RELEASE | RELEASEDIR | FLUSH | FSYNC | FSYNCDIR | DESTROY => Ok(Vec::new()),
        // Everything else (xattrs, access, lseek, ...) is "not implemented": the kernel
        // remembers and falls back to its defaults.
        _ => Err(libc::ENOSYS),
    })
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

/// struct fuse_attr_out, for GETATTR and SETATTR.
fn attr_out(nodeid: u64, size: u64, writable: bool) -> Result<Vec<u8>, i32> {
    let mut o = Out::default();
    o.u64(VALID_SECS);
    o.u32(0);
    o.u32(0);
    attr(&mut o, nodeid, size, writable);
    Ok(o.0)
}

/// struct fuse_attr: a read-only (or writable) file in a read-only directory.
fn attr(o: &mut Out, nodeid: u64, size: u64, writable: bool) {
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
struct Out(Vec<u8>);

impl Out {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_ne_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_ne_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_ne_bytes());
    }
    fn pad(&mut self, n: usize) {
        self.0.resize(self.0.len() + n, 0);
    }
}

/// Reads a field of a request; a short request reads as zeros rather than panicking a
/// serving thread (which would hang every reader).
fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_ne_bytes(s.try_into().unwrap()))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_ne_bytes(s.try_into().unwrap()))
}
