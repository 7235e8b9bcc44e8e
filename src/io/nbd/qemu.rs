//! `qemu-nbd` serving one image file on a unix socket in a private directory, so an
//! image in any format qemu opens (qcow2, vmdk, vhdx, raw...) is read and written as
//! the disk the guest sees. The server lives as long as the [`QemuNbd`] value: dropping
//! it stops the process (cleanly, so the image and its bitmaps are
//! closed as they should be), reaps it and removes the directory.

use crate::error::{Error, Kind, Result, os_text, peer_text};
use crate::io::nbd::uri::Uri;
use crate::io::nbd::wire;
use std::ffi::{OsStr, OsString};
use std::fs::{DirBuilder, File};
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    pub image: PathBuf,
    /// qemu's name of the image format: `qcow2`, `raw`, `vmdk`, `vhdx`...
    pub format: String,
    pub read_only: bool,
    /// A persistent dirty bitmap of the image to expose as `qemu:dirty-bitmap:NAME`.
    pub bitmap: Option<String>,
    /// `--cache=none` (O_DIRECT, no host page cache) rather than writeback; flushes
    /// are honoured either way.
    pub direct: bool,
    /// The kind of errors: [`Kind::Source`] or [`Kind::Destination`].
    pub role: Kind,
}

impl QemuOptions {
    /// Writable, writeback cache, no bitmap.
    pub fn new(image: impl Into<PathBuf>, format: &str, role: Kind) -> QemuOptions {
        QemuOptions {
            image: image.into(),
            format: format.to_string(),
            read_only: false,
            bitmap: None,
            direct: false,
            role,
        }
    }
}

/// A running qemu-nbd.
pub struct QemuNbd {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

/// How long qemu-nbd may take to open the image and listen (a loaded machine, a large
/// image to check).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long qemu-nbd may take to close the image when asked to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of qemu-nbd's stderr put in an error.
const MAX_LOG: u64 = 64 * 1024;

/// Where qemu-nbd is in `path` (a PATH value), or the error that names its package.
pub fn qemu_nbd_in(path: &OsStr) -> Result<PathBuf> {
    std::env::split_paths(path)
        .map(|d| d.join("qemu-nbd"))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::new(Kind::Usage, "qemu-nbd not found: install qemu-utils"))
}

/// A new directory only we can enter, under the temp directory.
fn private_dir() -> std::io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut last = None;
    for _ in 0..16 {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!(
            "blocksync-nbd-{}-{seq}-{nanos}",
            std::process::id()
        ));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
}

impl QemuNbd {
    /// Starts qemu-nbd for `o.image` and waits until it serves it.
    pub fn start(o: &QemuOptions) -> Result<QemuNbd> {
        let path = std::env::var_os("PATH")
            .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"));
        let program = qemu_nbd_in(&path).map_err(|e| Error::new(o.role, e.message))?;
        let fail =
            |what: &str, e: std::io::Error| Error::new(o.role, format!("{what}: {}", os_text(&e)));
        let dir = private_dir().map_err(|e| fail("cannot make a directory for qemu-nbd", e))?;
        let socket = dir.join("nbd.sock");
        let log = dir.join("qemu-nbd.log");
        let spawned = File::create(&log).and_then(|log| {
            Command::new(&program)
                .args(args(o, &socket))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
        });
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(fail(&format!("cannot start {}", program.display()), e));
            }
        };
        // Owned from here: an early return kills it and removes the directory.
        let mut q = QemuNbd { child, dir, socket };
        q.wait_listening(o)?;
        Ok(q)
    }

    /// Polls until qemu-nbd greets on its socket, exits, or the deadline passes.
    fn wait_listening(&mut self, o: &QemuOptions) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let image = o.image.display();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::new(
                    o.role,
                    format!(
                        "qemu-nbd could not serve {image} ({status}): {}",
                        self.log()
                    ),
                ));
            }
            if self.greets() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::new(
                    o.role,
                    format!(
                        "qemu-nbd did not listen within {} s for {image}: {}",
                        START_TIMEOUT.as_secs(),
                        self.log()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether qemu-nbd sends its greeting: it listens before it opens the image, but
    /// greets only once the image is open.
    fn greets(&self) -> bool {
        let Ok(mut s) = UnixStream::connect(&self.socket) else {
            return false;
        };
        let mut magic = [0u8; 8];
        s.set_read_timeout(Some(Duration::from_secs(1))).is_ok()
            && s.read_exact(&mut magic).is_ok()
            && u64::from_be_bytes(magic) == wire::NBDMAGIC
    }

    /// What qemu-nbd wrote to stderr, bounded and made harmless.
    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(f) = File::open(self.dir.join("qemu-nbd.log")) {
            let _ = f.take(MAX_LOG).read_to_string(&mut text);
        }
        peer_text(&text)
    }

    /// The socket qemu-nbd listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The URI of its (default, unnamed) export.
    pub fn uri(&self) -> Uri {
        Uri::unix(&self.socket, "")
    }
}

fn args(o: &QemuOptions, socket: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        format!("--socket={}", socket.display()).into(),
        format!("--format={}", o.format).into(),
        // Stay up across connections (the readiness probe is one), a few at once.
        "--persistent".into(),
        "--shared=8".into(),
        // Trims reach the image, so trimmed ranges are deallocated and read as zeroes.
        "--discard=unmap".into(),
        if o.direct {
            "--cache=none"
        } else {
            "--cache=writeback"
        }
        .into(),
    ];
    if o.read_only {
        a.push("--read-only".into());
    }
    if let Some(b) = &o.bitmap {
        a.push(format!("--bitmap={b}").into());
    }
    a.push("--".into());
    a.push(o.image.clone().into());
    a
}

impl Drop for QemuNbd {
    /// Asks qemu-nbd to stop (SIGTERM), so it closes the image cleanly: its qcow2
    /// metadata written and its persistent dirty bitmaps stored and no longer marked in
    /// use (a killed qemu-nbd leaves them unusable). Killed only if it does not exit in
    /// time.
    fn drop(&mut self) {
        let pid = rustix::process::Pid::from_child(&self.child);
        // Best effort throughout: it may have exited already.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
