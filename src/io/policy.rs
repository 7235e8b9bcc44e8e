//! The checks on a destination device before anything is written: is it the source's
//! data (same inode or device, or a loop device over the other's file), is it mounted,
//! swap, or held by LVM/md/dm (from /proc/self/mountinfo, /proc/swaps and sysfs).

use crate::error::{Error, Kind, Result};
use crate::io::target::{Existing, Identity, TargetKind};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// `"MAJ:MIN"` of a device number, as /proc and /sys spell it.
fn dev_name(rdev: u64) -> String {
    format!("{}:{}", libc::major(rdev), libc::minor(rdev))
}

/// The file a loop device reads from, if `rdev` is a bound loop device.
pub fn loop_backing_file(rdev: u64) -> Option<PathBuf> {
    let p = format!("/sys/dev/block/{}/loop/backing_file", dev_name(rdev));
    let text = std::fs::read_to_string(p).ok()?;
    let t = text.trim_end_matches('\n');
    (!t.is_empty()).then(|| PathBuf::from(t))
}

/// Whether two identities are the same data: same inode, same device, or a loop device
/// over the other's file.
pub fn same_data(a: &Identity, b: &Identity) -> bool {
    if a.dev == b.dev && a.ino == b.ino {
        return true;
    }
    if let (Some(x), Some(y)) = (a.rdev, b.rdev)
        && x == y
    {
        return true;
    }
    let backs = |dev: &Identity, file: &Identity| -> bool {
        let Some(rdev) = dev.rdev else { return false };
        let Some(backing) = loop_backing_file(rdev) else {
            return false;
        };
        std::fs::metadata(backing)
            .map(|m| m.dev() == file.dev && m.ino() == file.ino)
            .unwrap_or(false)
    };
    backs(a, b) || backs(b, a)
}

/// Device numbers of `rdev` and its partitions.
fn device_and_partitions(rdev: u64) -> Vec<(String, u64)> {
    let mut out = vec![(dev_name(rdev), rdev)];
    let dir = format!("/sys/dev/block/{}", dev_name(rdev));
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path().join("dev")) else {
                continue;
            };
            if e.path().join("partition").exists()
                && let Some((ma, mi)) = text.trim().split_once(':')
                && let (Ok(ma), Ok(mi)) = (ma.parse::<u32>(), mi.parse::<u32>())
            {
                out.push((text.trim().to_string(), libc::makedev(ma, mi)));
            }
        }
    }
    out
}

/// Why a block device is in use (mounted, swap, held by LVM/md/dm), or `None` when free.
pub fn device_in_use(rdev: u64) -> Option<String> {
    let devs = device_and_partitions(rdev);
    if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
        for line in info.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() > 4
                && let Some((name, _)) = devs.iter().find(|(n, _)| n == f[2])
            {
                return Some(format!("device {name} is mounted on {}", f[4]));
            }
        }
    }
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let Some(p) = line.split_whitespace().next() else {
                continue;
            };
            if let Ok(m) = std::fs::metadata(p)
                && m.file_type().is_block_device()
                && devs.iter().any(|(_, d)| *d == m.rdev())
            {
                return Some(format!("it is in use as swap ({p})"));
            }
        }
    }
    for (name, _) in &devs {
        if let Ok(mut holders) = std::fs::read_dir(format!("/sys/dev/block/{name}/holders"))
            && let Some(Ok(h)) = holders.next()
        {
            return Some(format!(
                "device {name} is held by {} (LVM, md, dm or similar)",
                h.file_name().to_string_lossy()
            ));
        }
    }
    None
}

/// The loop devices (their device numbers) that read from the file `file`.
fn loop_devices_over(file: &Identity) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(rdev) = std::fs::read_to_string(e.path().join("dev"))
            .ok()
            .and_then(|t| {
                let (ma, mi) = t.trim().split_once(':')?;
                Some(libc::makedev(ma.parse().ok()?, mi.parse().ok()?))
            })
        else {
            continue;
        };
        let backs = loop_backing_file(rdev)
            .and_then(|b| std::fs::metadata(b).ok())
            .is_some_and(|m| m.dev() == file.dev && m.ino() == file.ino);
        if backs {
            out.push(rdev);
        }
    }
    out
}

/// The bytes of data `t` holds: a file's allocated blocks (its holes cost nothing), a
/// device's size.
pub fn data_bytes(t: &crate::io::target::Target) -> u64 {
    use std::os::unix::fs::MetadataExt;
    match t.kind {
        TargetKind::BlockDevice => t.size,
        TargetKind::File => t
            .file
            .metadata()
            .map_or(t.size, |m| (m.blocks() * 512).min(t.size)),
    }
}

/// Refuses a new destination file at `path` whose filesystem has less free space than
/// the `data` bytes the source holds (less what a partial copy there holds already), so
/// a copy never stops with a full disk halfway. `sparse: false` (`--no-sparse`) needs
/// room for `size`, every byte written.
pub fn check_room_for_new(path: &Path, data: u64, size: u64, sparse: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let need = if sparse { data } else { size };
    let have = std::fs::metadata(path).map_or(0, |m| m.blocks() * 512);
    let need = need.saturating_sub(have);
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(st) = rustix::fs::statvfs(dir) else {
        return Ok(()); // cannot tell: a full disk is still reported when it happens
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize.max(1));
    if need <= free {
        return Ok(());
    }
    Err(Error::new(
        Kind::TooSmall,
        format!(
            "no room for the new file {}: the source holds {need} bytes of data and {} has {free} bytes free; free some space or choose another place",
            path.display(),
            dir.display()
        ),
    ))
}

/// Refuses a destination that is in use (unless `force_mounted`): a device mounted, swap
/// or held, or a file that backs such a loop device (writing under a mounted filesystem
/// damages it); and a destination device smaller than `source_size`.
pub fn check_destination(
    path: &Path,
    existing: &Existing,
    source_size: u64,
    force_mounted: bool,
) -> Result<()> {
    if existing.kind == TargetKind::File {
        if force_mounted {
            return Ok(());
        }
        for rdev in loop_devices_over(&existing.id) {
            if let Some(why) = device_in_use(rdev) {
                return Err(Error::new(
                    Kind::Busy,
                    format!(
                        "destination {} backs loop device /dev/block/{}, which is in use: {why}; unmount or detach it first (losetup -d), or pass --force-mounted",
                        path.display(),
                        dev_name(rdev)
                    ),
                ));
            }
        }
        return Ok(());
    }
    if existing.size < source_size {
        return Err(Error::new(
            Kind::TooSmall,
            format!(
                "destination device {} holds {} bytes, less than the {source_size} bytes of the source; use a device at least as large",
                path.display(),
                existing.size,
            ),
        ));
    }
    if !force_mounted && let Some(why) = existing.id.rdev.and_then(device_in_use) {
        return Err(Error::new(
            Kind::Busy,
            format!(
                "destination {} is in use: {why}; unmount or release it first, or pass --force-mounted",
                path.display()
            ),
        ));
    }
    Ok(())
}
