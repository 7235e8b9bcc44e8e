//! Reading around the unreadable sectors of a failing source, like ddrescue: a read that
//! fails with a media error is split in halves, down to the sector size; every piece that
//! reads is kept, every sector that does not is zero-filled and reported.
//!
//! Retries go through a second descriptor opened with O_DIRECT where the source allows it:
//! a buffered read of a block device fails a whole 4 KiB page for one bad 512-byte sector,
//! a direct read fails only that sector.

use crate::io::target::{self, Target, TargetKind};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;

/// Whether an I/O error means the medium could not deliver the data (worth reading
/// around), rather than a problem with the request or the file itself.
pub fn is_media_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::ENODATA | libc::EREMOTEIO | libc::EBADMSG)
    )
}

/// Logical sector size of a block device (BLKSSZGET); 512 for files.
pub fn sector_size(t: &Target) -> usize {
    if t.kind != TargetKind::BlockDevice {
        return 512;
    }
    use rustix::ioctl::{Getter, ioctl, opcode};
    // BLKSSZGET is _IO(0x12, 104) and writes an int.
    const BLKSSZGET: rustix::ioctl::Opcode = opcode::none(0x12, 104);
    // SAFETY: BLKSSZGET writes one c_int, which is what the Getter provides.
    match unsafe { ioctl(&t.file, Getter::<BLKSSZGET, libc::c_int>::new()) } {
        Ok(n) if n >= 512 && (n as usize).is_power_of_two() => n as usize,
        _ => 512,
    }
}

/// Reads pieces of one source around its bad sectors.
pub struct Salvager<'a> {
    file: &'a File,
    direct: Option<File>,
    sector: usize,
}

impl<'a> Salvager<'a> {
    /// A salvager for `src`, reading through O_DIRECT when the source can be opened so.
    pub fn new(src: &'a Target) -> Self {
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&src.path)
            .ok();
        Salvager {
            file: &src.file,
            direct,
            sector: sector_size(src),
        }
    }

    /// Fills `buf` with the bytes at `offset`, reading around media errors. Unreadable
    /// sectors are zero-filled and added to `bad` as ranges of `buf` shifted by `rel`.
    /// Other errors (and the end of the source) are returned.
    pub fn read(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        rel: usize,
        bad: &mut Vec<Range<usize>>,
    ) -> io::Result<()> {
        match self.read_once(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if is_media_error(&e) => {
                if buf.len() <= self.sector {
                    buf.fill(0);
                    let r = rel..rel + buf.len();
                    match bad.last_mut() {
                        Some(last) if last.end == r.start => last.end = r.end,
                        _ => bad.push(r),
                    }
                    return Ok(());
                }
                // Halves, the cut on a sector boundary (offsets here are sector-aligned).
                let half = (buf.len() / 2).div_ceil(self.sector) * self.sector;
                let half = half.min(buf.len() - 1).max(1);
                let (a, b) = buf.split_at_mut(half);
                self.read(a, offset, rel, bad)?;
                self.read(b, offset + half as u64, rel + half, bad)
            }
            Err(e) => Err(e),
        }
    }

    /// One attempt at the whole of `buf`; a short read is an `UnexpectedEof` error.
    fn read_once(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let aligned =
            offset.is_multiple_of(self.sector as u64) && buf.len().is_multiple_of(self.sector);
        if let Some(direct) = self.direct.as_ref().filter(|_| aligned) {
            // O_DIRECT wants an aligned buffer too: read into one, then copy.
            let mut scratch = vec![0u8; buf.len() + 4096];
            let at = scratch.as_ptr().align_offset(4096);
            let part = &mut scratch[at..at + buf.len()];
            match target::read_full_at(direct, part, offset) {
                Ok(n) if n == buf.len() => {
                    buf.copy_from_slice(part);
                    return Ok(());
                }
                Ok(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = None; // not supported here after all: buffered from now on
                }
                Err(e) => return Err(e),
            }
        }
        match target::read_full_at(self.file, buf, offset)? {
            n if n == buf.len() => Ok(()),
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_errors_are_told_apart() {
        assert!(is_media_error(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(!is_media_error(&io::Error::from_raw_os_error(libc::EBADF)));
        assert!(!is_media_error(&io::ErrorKind::UnexpectedEof.into()));
    }

    #[test]
    fn reads_a_healthy_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let t = target::open_source(&p).unwrap();
        let mut s = Salvager::new(&t);
        let mut buf = vec![0u8; 8192];
        let mut bad = Vec::new();
        s.read(&mut buf, 4096, 0, &mut bad).unwrap();
        assert_eq!(buf, data[4096..12288]);
        assert!(bad.is_empty());
        let mut tail = vec![0u8; 8192];
        let e = s.read(&mut tail, 16384, 0, &mut bad).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
