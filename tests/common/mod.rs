//! Shared helpers for the integration tests: running the built binary, generating data,
//! and real loop devices and mounts that are cleaned up even when a test fails.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The blocksync binary cargo built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blocksync")
}

/// Runs blocksync with `args`, stdin closed, no terminal.
pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run blocksync")
}

/// Exit code of a finished run (panics on death by signal).
pub fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Parses the `--json` summary from stdout.
pub fn json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("bad json {text:?}: {e}"))
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Fails the test with the reason when not root (loop devices and mounts need it).
pub fn require_root() {
    if !rustix::process::geteuid().is_root() {
        panic!("this test needs root for loop devices; run the suite as root (see README)");
    }
}

pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop block device over a file in a temp dir, detached on drop.
pub struct LoopDev {
    /// /dev/loopN
    pub dev: PathBuf,
    /// The backing file.
    pub backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDev {
    /// A device of exactly `size` bytes holding `contents` at its start (rest zero).
    pub fn new(size: u64, contents: &[u8]) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        std::fs::write(&backing, contents).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&backing)
            .unwrap();
        f.set_len(size).unwrap();
        drop(f);
        // losetup -f --show picks a free device atomically enough for parallel tests.
        let dev = sh("losetup", &["-f", "--show", s(&backing)]);
        LoopDev {
            dev: PathBuf::from(dev),
            backing,
            _dir: dir,
        }
    }

    /// The device's whole contents.
    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.dev).unwrap()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

/// An ext4 filesystem on a loop device, mounted in a temp dir, unmounted on drop.
pub struct Mounted {
    /// The mount point.
    pub dir: tempfile::TempDir,
    /// The device (dropped after the unmount).
    pub dev: LoopDev,
}

impl Mounted {
    /// Formats `dev` (ext4) and mounts it.
    pub fn new(dev: LoopDev) -> Self {
        Mounted::with_fs(dev, "ext4")
    }

    /// Formats `dev` with `mkfs.FS` and mounts it.
    pub fn with_fs(dev: LoopDev, fs: &str) -> Self {
        let force = if fs == "ext4" { "-F" } else { "-f" };
        sh(&format!("mkfs.{fs}"), &["-q", force, s(&dev.dev)]);
        let dir = tempfile::tempdir().unwrap();
        sh("mount", &[s(&dev.dev), s(dir.path())]);
        Mounted { dir, dev }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}
pub mod fakepeer;
pub mod faultyfs;
pub mod sshd;

/// Runs blocksync with `args`, failing the test (and killing it) if it takes longer than
/// `secs`: for tests whose point is "no hang". Its stdout and stderr are read while it
/// runs, so however much it prints it never blocks on a full pipe.
pub fn run_within(args: &[&str], secs: u64) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    output_within(&mut cmd, &format!("blocksync {args:?}"), secs)
}

/// [`run_within`] for any command, named `what` in the failure.
pub fn output_within(cmd: &mut Command, what: &str, secs: u64) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    let stdout = Drain::new(child.stdout.take().expect("piped stdout"));
    let stderr = Drain::new(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut exited = false;
    // Done once it has exited and both pipes are at their end.
    while !(exited && stdout.is_done() && stderr.is_done()) {
        if Instant::now() > deadline {
            let how = if exited {
                // Something it started still holds its output open.
                "exited but its output stayed open"
            } else {
                "hung"
            };
            // (A no-op for a child already reaped.)
            let _ = child.kill();
            let _ = child.wait();
            // What it printed before the kill, once it had a moment to arrive.
            let grace = Instant::now() + Duration::from_secs(2);
            while !stderr.is_done() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!(
                "{what} {how} for {secs} s: {}",
                String::from_utf8_lossy(&stderr.so_far())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
        exited = exited || child.try_wait().expect("wait").is_some();
    }
    Output {
        // Reaped already: returns its status at once.
        status: child.wait().expect("wait"),
        stdout: stdout.finish(),
        stderr: stderr.finish(),
    }
}

/// One output pipe of a child, read to its end on a thread of its own into a buffer that
/// can be looked at while it fills.
pub struct Drain {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Drain {
    /// Starts reading `pipe`.
    pub fn new(mut pipe: impl Read + Send + 'static) -> Self {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 64 * 1024];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
        Drain { buf, thread }
    }

    /// Whether the pipe has reached its end (every writer closed it).
    pub fn is_done(&self) -> bool {
        self.thread.is_finished()
    }

    /// A copy of what has arrived so far.
    pub fn so_far(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }

    /// Waits for the end of the pipe and returns all of it.
    pub fn finish(self) -> Vec<u8> {
        self.thread.join().expect("pipe reader");
        std::mem::take(&mut *self.buf.lock().unwrap())
    }
}

/// Polls `cond` every few milliseconds until it holds; fails the test, saying it was
/// waiting until `what`, if it still does not after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// [`wait_until`] for a condition that `child` is to bring about: also fails the test at
/// once, with its exit status, if the child ends first (the condition would never come,
/// or came and went unseen).
pub fn wait_while_running(
    child: &mut Child,
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) {
    wait_until(what, timeout, || {
        if cond() {
            return true;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("blocksync ended ({status}) before {what}");
        }
        false
    });
}

/// Whether the file at `path` holds `want` at `offset` (false while it is missing or
/// too short).
pub fn file_holds(path: &Path, offset: u64, want: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; want.len()];
    std::fs::File::open(path).is_ok_and(|f| f.read_exact_at(&mut buf, offset).is_ok())
        && buf == want
}

/// A tmpfs of `size` bytes mounted in a temp dir, unmounted on drop.
pub struct Tmpfs {
    /// The mount point.
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts it.
    pub fn new(size: u64) -> Self {
        require_root();
        let dir = tempfile::tempdir().unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                s(dir.path()),
            ],
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).output();
    }
}

/// Whether `pid` holds a lock on the file at `path` (an OFD lock, seen in its fdinfo).
pub fn holds_lock(pid: u32, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let ino = format!(":{} ", meta.ino());
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_to_string(fd.path()).is_ok_and(|info| {
            info.lines()
                .any(|l| l.starts_with("lock:") && l.contains(&ino))
        })
    })
}

/// The processes holding a lock on the file at `path`.
pub fn lock_holders(path: &Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|&pid| holds_lock(pid, path))
        .collect()
}

/// A small deterministic generator, so a failure can be replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Starts blocksync with `args`, stdin closed, stdout dropped, stderr piped.
pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Child {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start blocksync")
}

/// Children of `pid` named `name`.
pub fn children(pid: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').unwrap_or(0) + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split(' ')
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        if ppid == pid && comm == name {
            out.push(p);
        }
    }
    out
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// Where a new destination file is written until complete (see blocksync's io::partial).
pub fn partial_of(dst: &Path) -> PathBuf {
    let name = dst.file_name().unwrap().to_string_lossy().into_owned();
    dst.with_file_name(format!(".{name}.blocksync-partial"))
}

/// Whether the destination `dst`, under its name or (a new file still being written)
/// its temporary one, holds `want` at `offset`.
pub fn dest_holds(dst: &Path, offset: u64, want: &[u8]) -> bool {
    file_holds(dst, offset, want) || file_holds(&partial_of(dst), offset, want)
}
