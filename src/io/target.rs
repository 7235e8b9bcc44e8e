//! Opening the files and block devices a sync reads and writes: kinds, exact sizes, and
//! the destination probed before anything is written. The checks on devices (same data,
//! mounted or held) are in [`crate::io::policy`], positioned I/O, holes, zeroing and
//! page-cache advice in [`crate::io::raw`], output files in [`crate::io::outfile`]; all
//! are re-exported here, so `crate::io::target::X` keeps naming them.

use crate::error::{Error, Kind, Result};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use crate::io::lock::Claim;
pub use crate::io::outfile::{check_writable, write_atomically};
pub use crate::io::policy::{check_destination, device_in_use, same_data};
pub use crate::io::raw::{
    Advice, DIRECT_ALIGN, Extents, advise, clone_range, direct_fits, hole_blocks, is_zero,
    punch_hole, read_blocks_at, read_full_at, reopen_direct, reopen_direct_file, start_writeback,
    write_full_at, write_zeros, zero_out_device,
};

/// Whether the directory `path` would be created in is the filesystem mounted at /dev
/// (the kernel's device nodes), not one mounted below it.
fn on_dev_itself(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let dir = path
        .ancestors()
        .skip(1)
        .find_map(|a| std::fs::metadata(a).ok());
    match (dir, std::fs::metadata("/dev")) {
        (Some(d), Ok(dev)) => d.dev() == dev.dev(),
        _ => true,
    }
}

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A regular file: its size follows the source.
    File,
    /// A block device: fixed size, never resized.
    BlockDevice,
}

impl TargetKind {
    /// "file" or "block device", for messages and JSON.
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::File => "file",
            TargetKind::BlockDevice => "block device",
        }
    }
}

/// Identity of a file or device, for the same-file check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Device holding the inode.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// For block devices, the device number they stand for.
    pub rdev: Option<u64>,
}

impl Identity {
    /// The identity `meta` (an fstat or stat) describes.
    pub fn of(meta: &Metadata) -> Self {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            rdev: meta.file_type().is_block_device().then(|| meta.rdev()),
        }
    }
}

/// An open file or device with its kind and exact size.
#[derive(Debug)]
pub struct Target {
    /// The path as the user gave it.
    pub path: PathBuf,
    /// The open handle.
    pub file: File,
    /// File or block device.
    pub kind: TargetKind,
    /// Size in bytes (the block-device ioctl for devices).
    pub size: u64,
    /// Who it is, for the same-file check.
    pub id: Identity,
}

/// What the destination path is before anything is written.
#[derive(Debug)]
pub struct DestProbe {
    /// The path as the user gave it.
    pub path: PathBuf,
    /// `None` when the destination does not exist yet (it will be created).
    pub existing: Option<Existing>,
    /// For a new file written under a temporary name ([`crate::io::partial`]): the name
    /// it takes once complete; `path` is then the temporary one.
    pub final_path: Option<PathBuf>,
}

impl DestProbe {
    /// The destination as the user knows it: a partial copy left by an interrupted first
    /// copy is still a new destination (no confirmation, no journal, "created").
    pub fn shown(&self) -> Option<Existing> {
        self.existing.filter(|_| self.final_path.is_none())
    }
}

/// An existing destination.
#[derive(Debug, Clone, Copy)]
pub struct Existing {
    /// File or block device.
    pub kind: TargetKind,
    /// Current size.
    pub size: u64,
    /// Who it is.
    pub id: Identity,
}

fn kind_of(meta: &Metadata, what: &str, path: &Path, err_kind: Kind) -> Result<TargetKind> {
    let ft = meta.file_type();
    if ft.is_file() {
        Ok(TargetKind::File)
    } else if ft.is_block_device() {
        Ok(TargetKind::BlockDevice)
    } else if ft.is_dir() {
        Err(Error::new(
            err_kind,
            format!(
                "{what} {} is a directory; give a file or block device path",
                path.display()
            ),
        ))
    } else {
        Err(Error::new(
            err_kind,
            format!(
                "{what} {} is not a regular file or block device; blocksync syncs files and block devices",
                path.display()
            ),
        ))
    }
}

/// Whether a block device is set read-only (the BLKROGET ioctl).
pub fn device_read_only(file: &File) -> bool {
    use rustix::ioctl::{Getter, ioctl, opcode};
    // BLKROGET is _IO(0x12, 94) and writes an int.
    const BLKROGET: rustix::ioctl::Opcode = opcode::none(0x12, 94);
    // SAFETY: BLKROGET writes one c_int, which is what the Getter provides.
    unsafe { ioctl(file, Getter::<BLKROGET, libc::c_int>::new()) }.is_ok_and(|ro| ro != 0)
}

/// Exact size of an open block device, from the BLKGETSIZE64 ioctl.
pub fn block_device_size(file: &File) -> io::Result<u64> {
    use rustix::ioctl::{Getter, ioctl, opcode};
    // BLKGETSIZE64 is _IOR(0x12, 114, size_t).
    const BLKGETSIZE64: rustix::ioctl::Opcode = opcode::read::<u64>(0x12, 114);
    // SAFETY: BLKGETSIZE64 writes one u64, which is what the Getter provides.
    let size = unsafe { ioctl(file, Getter::<BLKGETSIZE64, u64>::new()) }?;
    Ok(size)
}

fn size_of(file: &File, kind: TargetKind, meta: &Metadata) -> io::Result<u64> {
    match kind {
        TargetKind::File => Ok(meta.len()),
        TargetKind::BlockDevice => block_device_size(file),
    }
}

fn hint_for(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound => "check the path",
        io::ErrorKind::PermissionDenied => "run as root or fix its permissions",
        _ => "",
    }
}

/// Opens the source for reading and finds its kind and size.
pub fn open_source(path: &Path) -> Result<Target> {
    open_read(path, "source", Kind::Source)
}

/// The word that names standard input as the source.
pub const STDIN: &str = "-";

/// Standard input as a stream source, read once in order: its size is 0 until its end.
/// A terminal is refused (nobody types a disk image).
pub fn open_stdin() -> Result<Target> {
    use std::io::IsTerminal;
    use std::os::fd::AsFd;
    let fd = std::io::stdin().as_fd().try_clone_to_owned().map_err(|e| {
        Error::new(
            Kind::Source,
            format!("source - (standard input): {}", crate::error::os_text(&e)),
        )
    })?;
    let file = File::from(fd);
    if file.is_terminal() {
        return Err(Error::new(
            Kind::Usage,
            "source - reads standard input, which is a terminal; pipe an image in, e.g. xzcat disk.img.xz | blocksync - /dev/sdX",
        ));
    }
    let meta = file
        .metadata()
        .map_err(|e| Error::io(Kind::Source, "source", Path::new("-"), &e, "standard input"))?;
    Ok(Target {
        path: PathBuf::from("- (standard input)"),
        file,
        kind: TargetKind::File,
        size: 0,
        id: Identity::of(&meta),
    })
}

/// Opens `path` read-only and finds its kind and size; errors call it `what` and have
/// `kind`.
pub fn open_read(path: &Path, what: &str, kind: Kind) -> Result<Target> {
    let meta =
        std::fs::metadata(path).map_err(|e| Error::io(kind, what, path, &e, hint_for(&e)))?;
    let tkind = kind_of(&meta, what, path, kind)?;
    let file = File::open(path).map_err(|e| Error::io(kind, what, path, &e, hint_for(&e)))?;
    let size = size_of(&file, tkind, &meta)
        .map_err(|e| Error::io(kind, what, path, &e, "cannot read its size"))?;
    Ok(Target {
        path: path.to_path_buf(),
        file,
        kind: tkind,
        size,
        id: Identity::of(&meta),
    })
}

/// Looks at the destination without changing anything: exists or not, kind, size.
pub fn probe_destination(path: &Path) -> Result<DestProbe> {
    // A symlink given (/dev/disk/by-id/..., /dev/vg/lv) is resolved once, here: what is
    // checked and then opened is its target, whatever the link points to later.
    let resolved = resolve_link(path)?;
    let path = resolved.as_path();
    match std::fs::metadata(path) {
        Ok(meta) => {
            let kind = kind_of(&meta, "destination", path, Kind::Destination)?;
            let size = match kind {
                TargetKind::File => meta.len(),
                TargetKind::BlockDevice => {
                    let f = File::open(path).map_err(|e| {
                        Error::io(Kind::Destination, "destination", path, &e, hint_for(&e))
                    })?;
                    block_device_size(&f).map_err(|e| {
                        Error::io(
                            Kind::Destination,
                            "destination",
                            path,
                            &e,
                            "cannot read its size",
                        )
                    })?
                }
            };
            Ok(DestProbe {
                path: path.to_path_buf(),
                existing: Some(Existing {
                    kind,
                    size,
                    id: Identity::of(&meta),
                }),
                final_path: None,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A missing device name is nearly always a typo: a file created in /dev
            // would fill its small tmpfs and leave the real disk untouched. (A file on
            // another filesystem mounted under /dev, such as /dev/shm, is a file.)
            if path.starts_with("/dev") && on_dev_itself(path) {
                return Err(Error::new(
                    Kind::Destination,
                    format!(
                        "destination {} does not exist; check the device name (blocksync does not create files in /dev)",
                        path.display()
                    ),
                ));
            }
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            match std::fs::metadata(parent) {
                Ok(m) if m.is_dir() => Ok(DestProbe {
                    path: path.to_path_buf(),
                    existing: None,
                    final_path: None,
                }),
                Ok(_) => Err(Error::new(
                    Kind::Destination,
                    format!(
                        "destination {}: {} is not a directory; check the path",
                        path.display(),
                        parent.display()
                    ),
                )),
                Err(e) => Err(Error::new(
                    Kind::Destination,
                    format!(
                        "destination {}: directory {} does not exist ({}); create it first",
                        path.display(),
                        parent.display(),
                        crate::error::os_text(&e)
                    ),
                )),
            }
        }
        Err(e) => Err(Error::io(
            Kind::Destination,
            "destination",
            path,
            &e,
            hint_for(&e),
        )),
    }
}

/// Opens (and for a missing file, creates) the destination for reading and writing.
/// Block devices are opened with O_EXCL unless `force_mounted`, which the kernel refuses
/// while the device is mounted or claimed, and which keeps others from claiming it meanwhile.
/// The permission bits a new destination file gets when `t` is its source: the source
/// file's own (never setuid, setgid or sticky), or owner-only for a device, whose copy
/// holds a whole disk. The umask still applies.
pub fn copy_mode(t: &Target) -> u32 {
    match t.kind {
        TargetKind::BlockDevice => 0o600,
        TargetKind::File => t.file.metadata().map_or(0o600, |m| {
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777
        }),
    }
}

/// `path`, or the file a symlink there points to; a dangling symlink is refused (its
/// target would be created wherever it points).
fn resolve_link(path: &Path) -> Result<PathBuf> {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return Ok(path.to_path_buf());
    }
    std::fs::canonicalize(path).map_err(|e| {
        let to = std::fs::read_link(path).map_or(String::new(), |t| t.display().to_string());
        Error::new(
            Kind::Destination,
            format!(
                "destination {} is a symlink to {to}, which cannot be followed ({}); give the path of the file or device itself",
                path.display(),
                crate::error::os_text(&e)
            ),
        )
    })
}

/// How the destination is opened once every check has passed.
#[derive(Debug, Clone, Copy)]
pub struct OpenDest {
    /// Write to a device even if it is in use: no `O_EXCL` on it.
    pub force_mounted: bool,
    /// Permission bits of a new file (see [`copy_mode`]).
    pub mode: u32,
    /// Another stream of this run may have created the file already (a later `-w`
    /// stream on the server side): an existing regular file is then not an error.
    pub shared: bool,
    /// What a file this open creates is locked for (an existing destination was locked
    /// by [`hold`] before its checks).
    pub claim: Claim,
}

/// Locks an existing destination for this run before any check looks at it, through a
/// descriptor of its own kept for the whole run (see [`crate::io::lock`]); `None` when
/// it cannot be opened that way (the open for writing then reports why).
pub fn hold(probe: &DestProbe, claim: Claim) -> Result<Option<File>> {
    let Some(existing) = &probe.existing else {
        return Ok(None);
    };
    let mut opts = OpenOptions::new();
    opts.read(true).write(claim.write);
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    let Ok(file) = opts.open(&probe.path) else {
        return Ok(None);
    };
    match file.metadata() {
        Ok(m) if Identity::of(&m) == existing.id => {}
        // Replaced since the probe: the open for writing refuses it.
        _ => return Ok(None),
    }
    crate::io::lock::take(&file, &probe.path, claim)?;
    Ok(Some(file))
}

/// Opens (or creates) the destination once every check has passed, and makes sure what
/// was opened is what was checked: a new file is created, never found (`O_EXCL`, which
/// also never follows a symlink); an existing one must be the same file or device as
/// probed.
pub fn open_destination(probe: &DestProbe, how: OpenDest) -> Result<Target> {
    let OpenDest {
        force_mounted,
        mode,
        shared,
        claim,
    } = how;
    let path = &probe.path;
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    let excl_device =
        matches!(probe.existing, Some(e) if e.kind == TargetKind::BlockDevice) && !force_mounted;
    // The path was resolved by the probe: a symlink found now was planted since.
    opts.custom_flags(libc::O_NOFOLLOW | if excl_device { libc::O_EXCL } else { 0 });
    if probe.existing.is_none() {
        opts.create_new(true).mode(mode);
    }
    let mut opened = opts.open(path);
    if shared && matches!(&opened, Err(e) if e.kind() == io::ErrorKind::AlreadyExists) {
        // Created by the first stream of this run (O_NOFOLLOW: never through a link).
        opened = opts.create_new(false).create(true).open(path);
    }
    let file = opened.map_err(|e| {
        let (kind, what) = match (e.kind(), e.raw_os_error()) {
            (io::ErrorKind::AlreadyExists, _) => (
                Kind::Destination,
                "appeared after it was checked (created meanwhile, maybe a symlink); nothing was written: check what it is and run again",
            ),
            (_, Some(libc::ELOOP)) => (
                Kind::Destination,
                "became a symlink after it was checked; nothing was written: check what it is and run again",
            ),
            (_, Some(libc::EBUSY)) => (
                Kind::Busy,
                "is in use (mounted or claimed by the kernel); unmount it, or pass --force-mounted",
            ),
            _ => return Error::io(Kind::Destination, "destination", path, &e, hint_for(&e)),
        };
        Error::new(kind, format!("destination {} {what}", path.display()))
    })?;

    if probe.existing.is_none() {
        // Created (or joined, for a later stream) by this run: claim it at once.
        crate::io::lock::take(&file, path, claim)?;
    }
    let meta = file
        .metadata()
        .map_err(|e| Error::io(Kind::Destination, "destination", path, &e, ""))?;
    if let Some(e) = &probe.existing
        && e.id != Identity::of(&meta)
    {
        return Err(Error::new(
            Kind::Destination,
            format!(
                "destination {} is another file or device than the one checked (it was replaced meanwhile); nothing was written: check what it is and run again",
                path.display()
            ),
        ));
    }
    let kind = kind_of(&meta, "destination", path, Kind::Destination)?;
    let size = size_of(&file, kind, &meta).map_err(|e| {
        Error::io(
            Kind::Destination,
            "destination",
            path,
            &e,
            "cannot read its size",
        )
    })?;
    // Root may open a read-only device for writing; every write would then fail.
    if kind == TargetKind::BlockDevice && device_read_only(&file) {
        return Err(Error::new(
            Kind::Destination,
            format!(
                "destination {} is a read-only device; make it writable (blockdev --setrw) or pick another",
                path.display()
            ),
        ));
    }
    Ok(Target {
        path: path.clone(),
        file,
        kind,
        size,
        id: Identity::of(&meta),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_errors_name_path_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = open_source(&missing).unwrap_err();
        assert_eq!(e.kind, Kind::Source);
        assert!(e.message.contains("nope") && e.message.contains("No such file"));
        let e = open_source(dir.path()).unwrap_err();
        assert!(e.message.contains("is a directory"), "{e}");
        let e = open_source(Path::new("/dev/null")).unwrap_err();
        assert!(e.message.contains("not a regular file"), "{e}");
    }

    #[test]
    fn probe_missing_destination_needs_parent() {
        let dir = tempfile::tempdir().unwrap();
        let p = probe_destination(&dir.path().join("new")).unwrap();
        assert!(p.existing.is_none());
        let e = probe_destination(&dir.path().join("no/such/new")).unwrap_err();
        assert_eq!(e.kind, Kind::Destination);
        assert!(e.message.contains("does not exist"), "{e}");
        let e = probe_destination(Path::new("/dev/sdzz9")).unwrap_err();
        assert!(e.message.contains("device name"), "{e}");
    }

    #[test]
    fn same_file_through_hard_link() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let b = dir.path().join("b");
        std::fs::hard_link(&a, &b).unwrap();
        let ta = open_source(&a).unwrap();
        let pb = probe_destination(&b).unwrap();
        assert!(same_data(&ta.id, &pb.existing.unwrap().id));
        let c = dir.path().join("c");
        std::fs::write(&c, b"x").unwrap();
        let pc = probe_destination(&c).unwrap();
        assert!(!same_data(&ta.id, &pc.existing.unwrap().id));
    }
}
