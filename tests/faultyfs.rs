//! The failing-disk harness itself (tests/common/faultyfs/): good sectors read back
//! exactly, bad ones fail with EIO at the granularity its module doc promises, through
//! the file and through a loop device, the delay slows reads, and nothing stays mounted.

mod common;

use common::faultyfs::*;
use common::*;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const K: u64 = 1024;

fn is_eio(r: &io::Result<impl std::fmt::Debug>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
}

/// Reads `len` bytes at `offset`, through `dd iflag=direct` in its own process, as the
/// tool under test will.
fn dd_direct(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    assert!(offset.is_multiple_of(512) && len.is_multiple_of(512));
    let out = Command::new("dd")
        .arg(format!("if={}", s(path)))
        .args(["bs=512", "iflag=direct", "status=none"])
        .arg(format!("skip={}", offset / 512))
        .arg(format!("count={}", len / 512))
        .output()
        .expect("run dd");
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A page-aligned buffer of `len` bytes, as O_DIRECT wants.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + 4096, 0);
    let skip = storage.as_ptr().align_offset(4096);
    &mut storage[skip..skip + len]
}

fn mounted(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(s(dir)))
}

#[test]
fn file_reads_fail_exactly_on_bad_sectors() {
    // One lone sector, a run across a page boundary, and the very last sector.
    let size = 1024 * K;
    let bad = [(69 * K, 512), (300 * K - 1024, 8 * K), (size - 512, 512)];
    let fs = FaultyFs::mount(size, 7, &bad, Duration::ZERO);
    assert_eq!(fs.content(), &data(size as usize, 7)[..]);
    let f = File::open(fs.path()).unwrap();

    // Every sector, one read each: exactly the bad ones fail.
    let mut buf = [0u8; 512];
    for off in (0..size).step_by(512) {
        let r = f.read_exact_at(&mut buf, off);
        if fs.is_bad(off, 512) {
            assert!(is_eio(&r), "sector at {off}: {r:?}");
        } else {
            r.unwrap_or_else(|e| panic!("sector at {off}: {e}"));
            assert_eq!(&buf[..], &fs.expected()[off as usize..off as usize + 512]);
        }
    }
    // The server saw each read as asked: nothing cached, nothing widened.
    let reads = fs.take_reads();
    assert_eq!(reads.len() as u64, size / 512);
    assert!(
        reads
            .iter()
            .all(|r| r.len == 512 && r.failed == fs.is_bad(r.offset, 512))
    );
    assert_eq!(fs.eio_count(), 1 + 16 + 1);

    // The neighbours of each bad range, explicitly; a byte inside fails.
    for &(off, len) in &bad {
        assert!(is_eio(&f.read_exact_at(&mut buf[..1], off + len - 1)));
        f.read_exact_at(&mut buf, off - 512).unwrap();
        if off + len < size {
            f.read_exact_at(&mut buf, off + len).unwrap();
        }
    }

    // A read touching a bad sector fails whole, not short.
    let mut big = vec![0u8; 64 * K as usize];
    assert!(is_eio(&f.read_at(&mut big, 64 * K)));
    // Past one request (32 pages of the buffer), it stops short before the bad request.
    let mut storage = Vec::new();
    let big = aligned(&mut storage, 256 * K as usize);
    let start = 300 * K - 1024 - 128 * K;
    fs.take_reads();
    let n = f.read_at(big, start).unwrap();
    assert_eq!(n as u64, 128 * K);
    assert_eq!(&big[..n], &fs.expected()[start as usize..][..n]);
    let reads = fs.take_reads();
    assert_eq!(reads.len(), 2, "{reads:?}");
    assert!(!reads[0].failed && reads[1].failed, "{reads:?}");
    assert!(is_eio(&f.read_at(big, start + n as u64)));
    assert!(is_eio(&std::fs::read(fs.path())));

    // Another process reading with O_DIRECT sees the same.
    for off in [0, 68 * K, 69 * K + 512, 300 * K - 1536, 308 * K - 1024] {
        let got = dd_direct(fs.path(), off, 512).unwrap();
        assert_eq!(&got[..], &fs.expected()[off as usize..off as usize + 512]);
    }
    let got = dd_direct(fs.path(), 512 * K, 64 * K).unwrap();
    assert_eq!(&got[..], &fs.expected()[512 * K as usize..576 * K as usize]);
    for off in [69 * K, 300 * K - 1024, 304 * K, size - 512] {
        let err = dd_direct(fs.path(), off, 512).unwrap_err();
        assert!(err.contains("Input/output error"), "{err}");
    }
}

#[test]
fn loop_device_fails_per_sector_direct_and_per_page_buffered() {
    let size = 1024 * K;
    // Sector 138, inside the page at 68 KiB; two sectors straddling the page boundary
    // at 196 KiB.
    let bad = [(69 * K, 512), (196 * K - 512, 1024)];
    let fs = FaultyFs::mount(size, 11, &bad, Duration::ZERO);
    let lo = fs.loop_dev();
    let dev = File::open(&lo.dev).unwrap();
    assert_eq!(
        sh("blockdev", &["--getsize64", s(&lo.dev)]),
        size.to_string()
    );
    let page_bad = |off: u64| {
        let page = off / LOOP_BUFFERED_GRANULARITY * LOOP_BUFFERED_GRANULARITY;
        fs.is_bad(page, LOOP_BUFFERED_GRANULARITY)
    };
    let window = (60 * K..76 * K).chain(188 * K..204 * K).step_by(512);

    // O_DIRECT: sector granularity, one 512-byte request per one-sector read.
    let direct = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&lo.dev)
        .unwrap();
    let mut storage = Vec::new();
    for off in window.clone() {
        fs.take_reads();
        let buf = aligned(&mut storage, 512);
        let r = direct.read_exact_at(buf, off);
        assert_eq!(is_eio(&r), fs.is_bad(off, 512), "sector at {off}: {r:?}");
        if r.is_ok() {
            assert_eq!(&buf[..], &fs.expected()[off as usize..off as usize + 512]);
        }
        let reads = fs.take_reads();
        assert_eq!(reads.len(), 1, "{reads:?}");
        assert_eq!((reads[0].offset, reads[0].len), (off, 512));
    }
    // A direct read touching a bad sector fails whole, even past the first request.
    let buf = aligned(&mut storage, 256 * K as usize);
    assert!(is_eio(&direct.read_at(buf, 0)));
    assert!(is_eio(&direct.read_at(buf, 196 * K - 128 * K)));
    // dd in another process, as the tool will read it.
    let err = dd_direct(&lo.dev, 69 * K, 512).unwrap_err();
    assert!(err.contains("Input/output error"), "{err}");
    for off in [69 * K - 512, 69 * K + 512, 196 * K - 1024, 196 * K + 512] {
        let got = dd_direct(&lo.dev, off, 512).unwrap();
        assert_eq!(&got[..], &fs.expected()[off as usize..off as usize + 512]);
    }

    // Buffered, from a cold cache each time: the whole 4 KiB page of a bad sector fails,
    // in spite of readahead reaching far wider.
    let mut buf = [0u8; 512];
    for off in window.clone() {
        lo.drop_cache();
        let r = dev.read_exact_at(&mut buf, off);
        assert_eq!(is_eio(&r), page_bad(off), "sector at {off}: {r:?}");
        if r.is_ok() {
            assert_eq!(&buf[..], &fs.expected()[off as usize..off as usize + 512]);
        }
    }
    // A whole buffered pass in pages: exactly the bad pages fail, all else is right.
    lo.drop_cache();
    let mut page = vec![0u8; LOOP_BUFFERED_GRANULARITY as usize];
    let mut failed = Vec::new();
    for off in (0..size).step_by(page.len()) {
        match dev.read_exact_at(&mut page, off) {
            Ok(()) => assert_eq!(page, &fs.expected()[off as usize..][..page.len()]),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => failed.push(off),
            Err(e) => panic!("page at {off}: {e}"),
        }
    }
    assert_eq!(failed, [68 * K, 192 * K, 196 * K]);
    // A long buffered read stops short at the bad page; the next one fails.
    lo.drop_cache();
    let mut long = vec![0u8; 64 * K as usize];
    assert_eq!(dev.read_at(&mut long, 64 * K).unwrap(), 4 * K as usize);
    assert!(is_eio(&dev.read_at(&mut long, 68 * K)));
}

#[test]
fn delay_slows_every_read() {
    let delay = Duration::from_millis(100);
    let fs = FaultyFs::mount(64 * K, 3, &[(4 * K, 512)], delay);
    let f = File::open(fs.path()).unwrap();
    let mut buf = [0u8; 512];
    let t = Instant::now();
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(is_eio(&f.read_exact_at(&mut buf, 4 * K)));
    f.read_exact_at(&mut buf, 8 * K).unwrap();
    assert!(t.elapsed() >= 3 * delay, "{:?}", t.elapsed());
    // Through a loop device too, read directly by another process.
    let lo = fs.loop_dev();
    let t = Instant::now();
    dd_direct(&lo.dev, 0, 512).unwrap();
    assert!(t.elapsed() >= delay, "{:?}", t.elapsed());
    fs.set_delay(Duration::ZERO);
    let t = Instant::now();
    for off in (8 * K..40 * K).step_by(4096) {
        f.read_exact_at(&mut buf, off).unwrap();
    }
    assert!(t.elapsed() < 8 * delay / 2, "{:?}", t.elapsed());
}

#[test]
fn lists_one_file_whose_bad_ranges_can_heal_while_mounted() {
    let fs = FaultyFs::mount(64 * K, 5, &[(8 * K, 512)], Duration::ZERO);
    let names: Vec<_> = std::fs::read_dir(fs.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [FILE_NAME]);
    let f = File::open(fs.path()).unwrap();
    let mut buf = [0u8; 512];
    assert!(is_eio(&f.read_exact_at(&mut buf, 8 * K)));
    fs.set_bad(&[]);
    f.read_exact_at(&mut buf, 8 * K).unwrap();
    assert_eq!(&buf[..], &fs.expected()[8 * K as usize..][..512]);
    assert_eq!(fs.eio_count(), 1);
}

#[test]
fn unmounts_cleanly_even_on_panic_or_with_the_file_open() {
    // A panicking test still unmounts.
    let dir = std::sync::Mutex::new(None);
    let r = std::panic::catch_unwind(|| {
        let fs = FaultyFs::mount(64 * K, 1, &[], Duration::ZERO);
        *dir.lock().unwrap() = Some(fs.dir().to_path_buf());
        assert!(mounted(fs.dir()));
        panic!("a deliberate panic, to test the cleanup");
    });
    assert!(r.is_err());
    let dir = dir.into_inner().unwrap().unwrap();
    assert!(!mounted(&dir), "{} still mounted", dir.display());
    assert!(!dir.exists());

    // A file still open (a child, a forgotten handle) neither blocks the drop nor hangs
    // its reader: it reads ENOTCONN from then on.
    let fs = FaultyFs::mount(64 * K, 2, &[], Duration::ZERO);
    let dir = fs.dir().to_path_buf();
    let f = File::open(fs.path()).unwrap();
    let t = Instant::now();
    drop(fs);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!mounted(&dir));
    let r = f.read_at(&mut [0u8; 512], 0);
    assert!(
        matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ENOTCONN)),
        "{r:?}"
    );
}

#[test]
fn parallel_mounts_are_independent() {
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            std::thread::spawn(move || {
                let bad = (i + 1) * 4 * K;
                let fs = FaultyFs::mount(32 * K, 100 + i, &[(bad, 512)], Duration::ZERO);
                let f = File::open(fs.path()).unwrap();
                let mut all = vec![0u8; 32 * K as usize];
                for off in (0..32 * K).step_by(512) {
                    let sector = &mut all[off as usize..][..512];
                    let r = f.read_exact_at(sector, off);
                    assert_eq!(is_eio(&r), off == bad, "mount {i}, sector at {off}");
                }
                let mut want = data(32 * K as usize, 100 + i);
                want[bad as usize..][..512].fill(0);
                assert!(all == want, "mount {i} served another's data");
                fs.dir().to_path_buf()
            })
        })
        .collect();
    for t in threads {
        let dir = t.join().unwrap();
        assert!(!mounted(&dir));
    }
}
