//! One run at a time per destination: an open-file-description lock (`F_OFD_SETLK`) on
//! the byte range a run (or one `-w` stream of it) writes. The streams of one run lock
//! disjoint ranges and never conflict; a second run overlaps some range and is refused
//! at once. OFD locks belong to the open file, not the process, so closing another
//! descriptor of the same file (as POSIX locks would) never drops them.

use crate::error::{Error, Kind, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The bytes a run claims: `start..end`, `end` `None` for everything from `start` on
/// (the stream that may resize a file claims its end too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// First byte.
    pub start: u64,
    /// One past the last byte; `None`: to the end, however far it grows.
    pub end: Option<u64>,
    /// A writing run takes a write lock; a dry run a read lock (it may share with other
    /// readers, not with a writer).
    pub write: bool,
}

impl Claim {
    /// The whole destination, for a run with one stream.
    pub fn whole(write: bool) -> Claim {
        Claim {
            start: 0,
            end: None,
            write,
        }
    }
}

/// Takes `claim` on `file` (which must be open for writing for a write claim); a
/// conflict is refused with the holder's pid when it can be found.
pub fn take(file: &File, path: &Path, claim: Claim) -> Result<()> {
    if claim.end == Some(claim.start) {
        return Ok(()); // an empty part (more streams than chunks) writes nothing
    }
    let len = claim
        .end
        .map_or(0, |e| e.saturating_sub(claim.start).max(1));
    // SAFETY: a zeroed flock is a valid value; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if claim.write {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = claim.start.min(i64::MAX as u64) as libc::off_t;
    fl.l_len = len.min(i64::MAX as u64) as libc::off_t;
    // SAFETY: F_OFD_SETLK reads one struct flock, which `fl` is; the fd is open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => {
            let who = file.metadata().ok().and_then(|m| holder(m.dev(), m.ino()));
            let who = match who {
                Some((pid, name)) if name == "blocksync" => {
                    format!("another blocksync, pid {pid}")
                }
                Some((pid, name)) => format!("another program ({name}, pid {pid})"),
                None => "another blocksync (its pid is not visible to this user)".into(),
            };
            Err(Error::new(
                Kind::Locked,
                format!(
                    "destination {} is in use by {who}; nothing was written: wait for that run to end (or stop it) and run again",
                    path.display()
                ),
            ))
        }
        // A filesystem without locks (some FUSE or network mounts): nothing to hold.
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(()),
        _ => Err(Error::io(
            Kind::Destination,
            "destination",
            path,
            &e,
            "cannot lock it",
        )),
    }
}

/// The process holding a lock on the inode `ino` of device `dev`, found through
/// `/proc/*/fdinfo` (OFD locks show no pid in /proc/locks); only the processes this
/// user may inspect are seen.
fn holder(dev: u64, ino: u64) -> Option<(u32, String)> {
    let me = std::process::id();
    let wanted = format!(
        "{:02x}:{:02x}:{ino} ",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    let suffix = format!(":{ino} ");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            // "lock:\t1: OFDLCK ADVISORY  WRITE -1 08:02:1234 0 EOF"; the device part
            // may differ from stat's (btrfs), so the inode alone is a fallback.
            let held = info
                .lines()
                .filter(|l| l.starts_with("lock:"))
                .any(|l| l.contains(&wanted) || l.contains(&suffix));
            if held {
                let name = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                return Some((pid, name));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_claims_conflict_disjoint_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let open = || File::options().read(true).write(true).open(&p).unwrap();
        let (a, b, c) = (open(), open(), open());
        let part = |start, end| Claim {
            start,
            end,
            write: true,
        };
        take(&a, &p, part(0, Some(1024))).unwrap();
        // Another stream of the same run: the rest, to the end.
        take(&b, &p, part(1024, None)).unwrap();
        let e = take(&c, &p, Claim::whole(true)).unwrap_err();
        assert_eq!(e.kind, Kind::Locked);
        assert!(e.message.contains("in use by"), "{e}");
        drop(a);
        // Still held past 1024 by `b`.
        assert_eq!(
            take(&c, &p, part(0, Some(2048))).unwrap_err().kind,
            Kind::Locked
        );
        drop(b);
        take(&c, &p, Claim::whole(true)).unwrap();
    }

    #[test]
    fn readers_share_writers_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, b"x").unwrap();
        let ro = || File::open(&p).unwrap();
        let (a, b) = (ro(), ro());
        take(&a, &p, Claim::whole(false)).unwrap();
        take(&b, &p, Claim::whole(false)).unwrap();
        let w = File::options().write(true).open(&p).unwrap();
        assert_eq!(
            take(&w, &p, Claim::whole(true)).unwrap_err().kind,
            Kind::Locked
        );
    }
}
