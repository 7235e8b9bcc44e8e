//! Shared helpers for the integration tests: running the built binary, generating data,
//! and real loop devices and mounts that are cleaned up even when a test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
    /// Formats `dev` and mounts it.
    pub fn new(dev: LoopDev) -> Self {
        sh("mkfs.ext4", &["-q", "-F", s(&dev.dev)]);
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
pub mod faultyfs;
pub mod sshd;

/// Runs blocksync with `args`, failing the test (and killing it) if it takes longer than
/// `secs`: for tests whose point is "no hang".
pub fn run_within(args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run blocksync");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "blocksync {args:?} hung for {secs} s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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
