//! Opening the files and block devices a sync reads and writes: kinds, exact sizes, the
//! checks made before anything is written (directory, same file, mounted or held device),
//! positioned I/O helpers and page-cache advice.

use crate::error::{Error, Kind, Result};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
    fn of(meta: &Metadata) -> Self {
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
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A missing device name is nearly always a typo: a file created in /dev
            // would fill its small tmpfs and leave the real disk untouched.
            if path.starts_with("/dev") {
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

/// Refuses a destination device smaller than `source_size`, or (unless `force_mounted`)
/// one that is mounted or in use.
pub fn check_device(
    path: &Path,
    existing: &Existing,
    source_size: u64,
    force_mounted: bool,
) -> Result<()> {
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

/// Opens (and for a missing file, creates) the destination for reading and writing.
/// Block devices are opened with O_EXCL unless `force_mounted`, which the kernel refuses
/// while the device is mounted or claimed, and which keeps others from claiming it meanwhile.
pub fn open_destination(probe: &DestProbe, force_mounted: bool) -> Result<Target> {
    let path = &probe.path;
    let mut opts = OpenOptions::new();
    opts.read(true).write(true);
    let excl_device =
        matches!(probe.existing, Some(e) if e.kind == TargetKind::BlockDevice) && !force_mounted;
    if excl_device {
        opts.custom_flags(libc::O_EXCL);
    }
    if probe.existing.is_none() {
        // Not create_new: parallel streams may race to create it; nothing is truncated.
        opts.create(true).mode(0o644);
    }
    let file = opts.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            Error::new(
                Kind::Busy,
                format!(
                    "destination {} is in use (mounted or claimed by the kernel); unmount it, or pass --force-mounted",
                    path.display()
                ),
            )
        } else {
            Error::io(Kind::Destination, "destination", path, &e, hint_for(&e))
        }
    })?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(Kind::Destination, "destination", path, &e, ""))?;
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

/// Reads into `buf` at `offset` until it is full or the end of the file; returns the
/// number of bytes read (short only at the end).
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `data` at `offset`.
pub fn write_full_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(data, offset)
}

/// What O_DIRECT transfers are aligned to here, in memory, offset and length: a page,
/// which every logical sector size in use divides.
pub const DIRECT_ALIGN: usize = 4096;

/// Writes shorter than this stay buffered: the page cache takes them without waiting
/// for the disk, and they are too few to cost much copying.
const DIRECT_MIN: usize = 256 << 10;

/// Filesystems whose O_DIRECT writes go straight to a local disk and mix well with
/// buffered I/O on the same file: ext4 and XFS. (On NFS every switch between the two
/// flushes the whole file's cache and each direct write is a round trip; btrfs and
/// others vary.)
const DIRECT_FILESYSTEMS: [u64; 2] = [0xEF53, 0x5846_5342];

/// The open target once more, for writing with O_DIRECT: large writes then go from our
/// buffer to the disk, without a copy into the page cache and a writeback after it (on
/// a first copy that is most of the destination's CPU, which ssh needs). Only for block
/// devices and files on [`DIRECT_FILESYSTEMS`]. Reopened through /proc/self/fd, so it is
/// the same file even if its path changed. `None` where it does not apply or the open
/// fails: everything is then written through the page cache.
pub fn reopen_direct(t: &Target) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let suits = match t.kind {
        TargetKind::BlockDevice => true,
        TargetKind::File => rustix::fs::fstatfs(&t.file)
            .is_ok_and(|s| DIRECT_FILESYSTEMS.contains(&(s.f_type as u64))),
    };
    if !suits {
        return None;
    }
    let file = &t.file;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

/// Whether `data` can be written at `offset` through O_DIRECT as it is: large enough
/// to be worth it, and aligned in memory, position and length.
pub fn direct_fits(data: &[u8], offset: u64) -> bool {
    data.len() >= DIRECT_MIN
        && data.len().is_multiple_of(DIRECT_ALIGN)
        && offset.is_multiple_of(DIRECT_ALIGN as u64)
        && data.as_ptr().addr().is_multiple_of(DIRECT_ALIGN)
}

/// Whether every byte of `data` is zero. Stops at the first non-zero 64-byte run, so
/// on real data it costs almost nothing; on zeros it runs at memory speed.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(64);
    words.all(|w| w.iter().fold(0u8, |a, &b| a | b) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Where a regular file holds data, from SEEK_DATA/SEEK_HOLE: holes are read as zeros
/// without touching the disk, so they need not be read at all. Remembers the last extent
/// found, so a run of chunks inside one extent costs no extra system calls.
pub struct Extents<'a> {
    file: &'a File,
    /// The cached answer: no data in `from..start`, data in `start..end`.
    from: u64,
    start: u64,
    end: u64,
}

impl<'a> Extents<'a> {
    /// Extents of `file`, or `None` for devices and filesystems without SEEK_DATA
    /// (then everything counts as data).
    pub fn new(file: &'a File, kind: TargetKind) -> Option<Self> {
        if kind != TargetKind::File {
            return None;
        }
        let mut e = Extents {
            file,
            from: 0,
            start: 0,
            end: 0,
        };
        e.lookup(0).ok()?;
        Some(e)
    }

    fn lookup(&mut self, pos: u64) -> io::Result<()> {
        use rustix::fs::{SeekFrom, seek};
        self.from = pos;
        match seek(self.file, SeekFrom::Data(pos)) {
            Ok(start) => {
                self.start = start;
                self.end = seek(self.file, SeekFrom::Hole(start))?;
            }
            Err(rustix::io::Errno::NXIO) => {
                self.start = u64::MAX;
                self.end = u64::MAX;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// The data ranges that overlap `range`, clipped to it; empty for a hole.
    /// On an error, the whole range counts as data (reading it is always correct).
    pub fn data_in(&mut self, range: std::ops::Range<u64>) -> Vec<std::ops::Range<u64>> {
        let mut out = Vec::new();
        let mut pos = range.start;
        while pos < range.end {
            let cached = self.from <= pos && (pos < self.end || self.start == u64::MAX);
            if !cached && self.lookup(pos).is_err() {
                out.push(pos..range.end);
                break;
            }
            if self.start >= range.end {
                break;
            }
            out.push(self.start.max(pos)..self.end.min(range.end));
            pos = self.end;
        }
        out
    }
}

/// Which blocks of the chunk at `offset`, `len` bytes in blocks of `block`, lie wholly in
/// holes according to `data` (the chunk's data ranges).
pub fn hole_blocks(
    data: &[std::ops::Range<u64>],
    offset: u64,
    len: usize,
    block: u64,
) -> Vec<bool> {
    let n = (len as u64).div_ceil(block) as usize;
    let mut hole = vec![true; n];
    for r in data {
        let first = ((r.start - offset) / block) as usize;
        let last = ((r.end - offset).div_ceil(block) as usize).min(n);
        for h in &mut hole[first..last] {
            *h = false;
        }
    }
    hole
}

/// Fills `buf` with the bytes at `offset`, reading only where `data` (absolute ranges,
/// ascending; `None`: everywhere) says the file holds data and zero-filling the holes.
/// Returns the bytes read; ending early is an `UnexpectedEof` error.
pub fn read_data_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    data: Option<&[std::ops::Range<u64>]>,
) -> io::Result<u64> {
    let end = offset + buf.len() as u64;
    let all = offset..end;
    let whole = std::slice::from_ref(&all);
    let mut pos = offset;
    let mut read = 0;
    for r in data.unwrap_or(whole) {
        let (s, e) = (r.start.max(offset), r.end.min(end));
        if s >= e {
            continue;
        }
        buf[(pos - offset) as usize..(s - offset) as usize].fill(0);
        let part = &mut buf[(s - offset) as usize..(e - offset) as usize];
        let n = read_full_at(file, part, s)?;
        if n < part.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file ends at byte {}", s + n as u64),
            ));
        }
        read += n as u64;
        pos = e;
    }
    buf[(pos - offset) as usize..].fill(0);
    Ok(read)
}

/// Reads the blocks of a chunk at `offset` that are not marked in `skip` (runs of them
/// at once, and within them only where `data` says the file holds data) into `buf`,
/// which holds the chunk's first `buf.len()` bytes. Returns the bytes read; an error
/// names the offset it happened at.
pub fn read_blocks_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    block: usize,
    skip: &[bool],
    data: Option<&[std::ops::Range<u64>]>,
) -> Result<u64, (u64, io::Error)> {
    let mut read = 0;
    let mut j = 0;
    while j < skip.len() && j * block < buf.len() {
        if skip[j] {
            j += 1;
            continue;
        }
        let end = (j..skip.len()).find(|&k| skip[k]).unwrap_or(skip.len());
        let r = j * block..(end * block).min(buf.len());
        let at = offset + r.start as u64;
        read += read_data_at(file, &mut buf[r], at, data).map_err(|e| (at, e))?;
        j = end;
    }
    Ok(read)
}

/// Makes `len` bytes at `offset` of a file a hole (reads as zeros, frees the space),
/// keeping the file size.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )?;
    Ok(())
}

/// Zeroes `len` bytes at `offset` of a block device with BLKZEROOUT, which the kernel
/// carries out with the device's write-zeroes or discard support where that guarantees
/// zeros, else by writing zeros.
pub fn zero_out_device(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use rustix::ioctl::{Setter, ioctl, opcode};
    // BLKZEROOUT is _IO(0x12, 127) taking a pointer to [start, length].
    const BLKZEROOUT: rustix::ioctl::Opcode = opcode::none(0x12, 127);
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64s through the pointer the Setter passes.
    unsafe { ioctl(file, Setter::<BLKZEROOUT, *const [u64; 2]>::new(&range)) }?;
    Ok(())
}

/// Writes `len` zero bytes at `offset`.
pub fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Starts writing `len` bytes at `offset` back to the disk without waiting, so the final
/// fsync finds little left to do and the disk works while the sync goes on. A hint:
/// failures are ignored (fsync at the end still decides).
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Page-cache advice for a whole file.
#[derive(Debug, Clone, Copy)]
pub enum Advice {
    /// We read front to back: read ahead more.
    Sequential,
    /// We are done with this range: drop it from the cache.
    DontNeed,
}

/// Gives the kernel page-cache advice for `len` bytes at `offset` (0 = to the end).
/// Advice is a hint: failures are ignored on purpose.
pub fn advise(file: &File, offset: u64, len: u64, advice: Advice) {
    use rustix::fs::{Advice as A, fadvise};
    let a = match advice {
        Advice::Sequential => A::Sequential,
        Advice::DontNeed => A::DontNeed,
    };
    let _ = fadvise(file, offset, std::num::NonZeroU64::new(len), a);
}

/// Refuses an output file named by `option` whose directory does not exist or that is a
/// directory, before a run starts (one that cannot be written at the end would lose what
/// the run found).
pub fn check_writable(path: &Path, option: &str) -> std::result::Result<(), String> {
    if path.is_dir() {
        return Err(format!(
            "{option} {} is a directory; give a file name",
            path.display()
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "{option} {}: directory {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// Writes `path` through a temporary file beside it that `body` fills, flushed and
/// renamed into place: a reader sees the old file or the new one, whole. The temporary
/// file is removed if anything fails; `io_err` names the failing path in the error.
pub fn write_atomically<E>(
    path: &Path,
    body: impl FnOnce(&mut File) -> std::result::Result<(), E>,
    io_err: impl Fn(&Path, io::Error) -> E,
) -> std::result::Result<(), E> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        body(&mut f)?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_large_aligned_writes_go_direct() {
        let mut v = vec![0x5au8; (1 << 20) + DIRECT_ALIGN];
        let at = v.as_ptr().align_offset(DIRECT_ALIGN);
        let block = &mut v[at..at + (1 << 20)];
        assert!(direct_fits(block, 8192));
        assert!(!direct_fits(block, 8192 + 512), "unaligned offset");
        assert!(
            !direct_fits(&block[1..], 8192),
            "unaligned memory and length"
        );
        assert!(
            !direct_fits(&block[..DIRECT_ALIGN * 2], 8192),
            "too short to be worth it"
        );
        assert!(direct_fits(&block[..DIRECT_MIN], 0));
    }

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

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_zero(&v));
        v[4096] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn extents_find_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 4 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], (16 << 20) - 4096).unwrap();
        let mut e = Extents::new(&f, TargetKind::File).unwrap();
        assert!(e.data_in(0..(1 << 20)).is_empty());
        let d = e.data_in((4 << 20) - 8192..(5 << 20));
        assert_eq!(d.len(), 1);
        assert!(d[0].start <= 4 << 20 && d[0].end >= (4 << 20) + 4096);
        let holes = hole_blocks(&d, (4 << 20) - 8192, 1 << 20, 4096);
        assert_eq!(&holes[..2], &[true, true]);
        assert!(!holes[2]);
        assert!(holes[3..].iter().all(|&h| h));
        assert!(!e.data_in((15 << 20)..(16 << 20)).is_empty());
        assert!(e.data_in((8 << 20)..(9 << 20)).is_empty());
    }

    #[test]
    fn punching_and_zeroing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        punch_hole(&f, 64 << 10, 128 << 10).unwrap();
        write_zeros(&f, 512 << 10, 100_000).unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 1 << 20);
        assert!(is_zero(&data[64 << 10..192 << 10]));
        assert!(is_zero(&data[512 << 10..(512 << 10) + 100_000]));
        assert_eq!(data[(512 << 10) + 100_000], 7);
        assert_eq!(data[(64 << 10) - 1], 7);
    }

    #[test]
    fn read_full_at_stops_at_eof() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, vec![7u8; 1000]).unwrap();
        let f = File::open(&a).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(read_full_at(&f, &mut buf, 0).unwrap(), 1000);
        assert_eq!(read_full_at(&f, &mut buf, 900).unwrap(), 100);
        assert_eq!(read_full_at(&f, &mut buf, 5000).unwrap(), 0);
    }
}
