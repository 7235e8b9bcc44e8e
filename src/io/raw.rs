//! Positioned reads and writes, O_DIRECT, holes (SEEK_DATA, punching) and zeroing,
//! writeback and page-cache hints: the primitives under every read and write of a target.

use crate::io::target::{Target, TargetKind};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

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
    match t.kind {
        TargetKind::BlockDevice => direct_twin(&t.file),
        TargetKind::File => reopen_direct_file(&t.file),
    }
}

/// [`reopen_direct`] for a regular file (one on [`DIRECT_FILESYSTEMS`]).
pub fn reopen_direct_file(file: &File) -> Option<File> {
    rustix::fs::fstatfs(file)
        .is_ok_and(|s| DIRECT_FILESYSTEMS.contains(&(s.f_type as u64)))
        .then(|| direct_twin(file))?
}

fn direct_twin(file: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
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
    // The Setter passes a pointer to its value, so the value is the range itself (a
    // pointer here would hand the kernel a pointer to the pointer: EINVAL).
    // SAFETY: BLKZEROOUT reads two u64s through the pointer the Setter passes.
    unsafe { ioctl(file, Setter::<BLKZEROOUT, [u64; 2]>::new([offset, len])) }?;
    Ok(())
}

/// Makes `dst[dst_offset..][..len]` share the blocks of `src[src_offset..][..len]`
/// (FICLONERANGE: a reflink, on XFS, btrfs and the like), copying nothing: each side keeps
/// its bytes when the other is later overwritten. Offsets and the length must be
/// multiples of the filesystem's block size (the length may instead end at `src`'s end).
/// An error (EOPNOTSUPP, EXDEV, EINVAL) means: copy instead.
pub fn clone_range(
    src: &File,
    src_offset: u64,
    len: u64,
    dst: &File,
    dst_offset: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let range = libc::file_clone_range {
        src_fd: src.as_raw_fd() as i64,
        src_offset,
        src_length: len,
        dest_offset: dst_offset,
    };
    // SAFETY: FICLONERANGE reads one file_clone_range through the pointer, which lives
    // for the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &range) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

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

    /// A loop device over a file of `size` bytes of 0x5a, detached when dropped (a test
    /// that fails still cleans up).
    struct Loop {
        dev: String,
        _dir: tempfile::TempDir,
    }

    impl Loop {
        fn new(size: usize) -> Loop {
            let dir = tempfile::tempdir().unwrap();
            let backing = dir.path().join("backing");
            std::fs::write(&backing, vec![0x5au8; size]).unwrap();
            let out = std::process::Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&backing)
                .output()
                .expect("losetup runs (the tests need root)");
            assert!(out.status.success(), "losetup: {out:?}");
            let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
            Loop { dev, _dir: dir }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.dev])
                .output();
        }
    }

    /// The ioctl itself must work: the engine falls back to writing zeros when it fails,
    /// which would hide a broken call (it once passed a pointer to the pointer: EINVAL).
    #[test]
    fn blkzeroout_zeroes_a_loop_device() {
        let l = Loop::new(4 << 20);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&l.dev)
            .unwrap();
        zero_out_device(&f, 1 << 20, 1 << 20).expect("BLKZEROOUT on a loop device");
        let mut buf = vec![1u8; 4 << 20];
        assert_eq!(read_full_at(&f, &mut buf, 0).unwrap(), 4 << 20);
        assert!(buf[..1 << 20].iter().all(|&b| b == 0x5a));
        assert!(is_zero(&buf[1 << 20..2 << 20]));
        assert!(buf[2 << 20..].iter().all(|&b| b == 0x5a));
    }
}
