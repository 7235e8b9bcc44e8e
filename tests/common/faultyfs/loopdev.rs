//! Loop block devices over a [`FaultyFs`] file.

use super::FaultyFs;
use crate::common::{s, sh};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

impl FaultyFs {
    /// A read-only loop device over the file, detached on drop. It borrows `self` so it
    /// is detached before the filesystem goes away.
    pub fn loop_dev(&self) -> FaultyLoop<'_> {
        // losetup -f --show picks a free device atomically enough for parallel tests.
        let dev = sh("losetup", &["-f", "--show", "-r", s(&self.file)]);
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
        let dev = sh("losetup", &["-f", "--show", s(&self.file)]);
        FaultyLoop {
            dev: PathBuf::from(dev),
            _fs: self,
        }
    }
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
