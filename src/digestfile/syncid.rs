//! The destination side's record of the last sync that completed onto a target, so a
//! digest file (kept on the source's machine) can tell whether the destination is still
//! in the state it describes.
//!
//! The record is a small file per target in `$XDG_STATE_HOME/blocksync/sync-ids`
//! (default `~/.local/state/...`), keyed by the target's path and identity (device and
//! inode for a file, device number for a block device), so a file replaced by another
//! has no record. It is removed before a sync writes anything and written again only
//! after the destination has been flushed, so it never vouches for blocks not written.

use crate::io::target::{Identity, Target};
use std::io;
use std::path::PathBuf;

/// An id: 16 random bytes; all zero means "none".
pub type SyncId = [u8; 16];

/// A fresh random id.
pub fn fresh() -> SyncId {
    let mut id = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id))
        .is_ok();
    if !filled || id == [0; 16] {
        // No /dev/urandom: the time and pid are unique enough to tell runs apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        id = blake3::hash(format!("{t}-{}", std::process::id()).as_bytes()).as_bytes()[..16]
            .try_into()
            .expect("16 bytes");
    }
    id
}

/// `$XDG_STATE_HOME/blocksync/NAME` (default `~/.local/state/...`, `/var/lib/...`
/// without a home): where this user's records of its destinations are kept.
pub fn state_dir(name: &str) -> PathBuf {
    let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(h) => PathBuf::from(h).join(".local/state"),
            None => PathBuf::from("/var/lib"),
        },
    };
    base.join("blocksync").join(name)
}

fn dir() -> PathBuf {
    state_dir("sync-ids")
}

fn record(t: &Target) -> PathBuf {
    record_of(&t.path, &t.id)
}

/// Where the record of `t` is kept, for messages.
pub fn record_path(t: &Target) -> PathBuf {
    record(t)
}

fn record_of(path: &std::path::Path, id: &Identity) -> PathBuf {
    dir().join(key(path, id))
}

/// A name for the target at `path` with identity `id` in a state directory: the same
/// for the same path and file (or device), another for a file replaced by another.
pub fn key(path: &std::path::Path, id: &Identity) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let who = match id.rdev {
        Some(r) => format!("dev {r}"),
        None => format!("file {} {}", id.dev, id.ino),
    };
    let key = blake3::hash(format!("{}\0{who}", path.display()).as_bytes());
    key.to_hex()[..32].to_string()
}

/// What says the target is still the one, unchanged, that the id was stored for: a
/// file's size and change times (any write changes its ctime, whoever makes it), a
/// device's size and the identifiers the kernel knows it by (a disk's WWN or serial, a
/// mapped volume's uuid, a loop device's backing file), so a disk swapped in under the
/// same name has no record.
pub fn state_of(path: &std::path::Path, id: &Identity) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(path) else {
        return String::new();
    };
    match id.rdev {
        None => format!(
            "{} {}.{} {}.{}",
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ),
        Some(r) => {
            let (maj, min) = (libc::major(r), libc::minor(r));
            let sys = format!("/sys/dev/block/{maj}:{min}");
            let mut out = device_writes(&sys);
            for f in [
                "size",
                "device/wwid",
                "device/serial",
                "wwid",
                "dm/uuid",
                "loop/backing_file",
                "loop/offset",
            ] {
                if let Ok(v) = std::fs::read_to_string(format!("{sys}/{f}")) {
                    out.push_str(f);
                    out.push('=');
                    out.push_str(v.trim());
                    out.push(';');
                }
            }
            out
        }
    }
}

/// What tells that a device was written since: the sectors written to it (field 7 of its
/// sysfs stat, which every write of any program moves once it reaches the device) in
/// this boot, and for a loop device its backing file's size and change times. A device
/// written to by someone else, or a machine rebooted (the counters start over), has no
/// record, so its digest file is refused as stale and read once with --digest-rebuild.
fn device_writes(sys: &str) -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let written = std::fs::read_to_string(format!("{sys}/stat"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(6).map(str::to_string))
        .unwrap_or_default();
    let mut out = format!("boot={};written={written};", boot.trim());
    if let Ok(b) = std::fs::read_to_string(format!("{sys}/loop/backing_file"))
        && let Ok(m) = std::fs::metadata(b.trim_end_matches('\n'))
    {
        use std::os::unix::fs::MetadataExt;
        out.push_str(&format!(
            "backing={} {}.{} {}.{};",
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ));
    }
    out
}

/// The id of the last completed sync onto `t`, or zeros.
pub fn load(t: &Target) -> SyncId {
    load_of(&t.path, &t.id)
}

/// [`load`] for a target known by its path and identity (not opened).
pub fn load_of(path: &std::path::Path, id: &Identity) -> SyncId {
    match std::fs::read(record_of(path, id)) {
        Ok(b) if b.len() > 16 && b[16..] == *state_of(path, id).as_bytes() => {
            b[..16].try_into().expect("16 bytes")
        }
        _ => [0; 16],
    }
}

/// Forgets it: from now on `t` is being written.
pub fn clear(t: &Target) -> io::Result<()> {
    let path = record(t);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(()) => {
            // Durable before the first write: a crash must not bring the old id back.
            if let Some(d) = path.parent() {
                std::fs::File::open(d)?.sync_all()?;
            }
            Ok(())
        }
    }
}

/// Records `id` for the target at `at` with identity `who` (atomically), once it holds
/// what it describes and is flushed.
pub fn store_at(at: &std::path::Path, who: &Identity, id: &SyncId) -> io::Result<()> {
    let path = record_of(at, who);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut record = id.to_vec();
    record.extend_from_slice(state_of(at, who).as_bytes());
    std::fs::write(&tmp, record)?;
    std::fs::rename(&tmp, &path)
}
