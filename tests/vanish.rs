//! Destination faults on a real (FUSE) disk, tests/common/faultyfs/ in its writable
//! mode: a destination that vanishes mid-run, as a file, as a block device and over ssh,
//! must end the run at once with the cause and the path (exit 10 locally, 11 remote),
//! never hang; and a disk that acknowledges writes it drops is caught by `--verify`.
//! The first tests check the writable harness itself.

mod common;

use common::faultyfs::{FaultyFs, WriteReq};
use common::sshd::Sshd;
use common::*;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

fn errno(r: &io::Result<impl std::fmt::Debug>) -> Option<i32> {
    r.as_ref().err().and_then(|e| e.raw_os_error())
}

fn mounted(dir: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(s(dir)))
}

/// A page-aligned buffer of `len` bytes, as O_DIRECT wants.
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    storage.resize(len + 4096, 0);
    let skip = storage.as_ptr().align_offset(4096);
    &mut storage[skip..skip + len]
}

/// Writes through `dd` in its own process (`oflag=direct` when `direct`); its stderr on
/// failure.
fn dd_write(path: &Path, offset: u64, data: &[u8], direct: bool) -> Result<(), String> {
    use std::io::Write;
    let mut cmd = Command::new("dd");
    cmd.arg(format!("of={}", s(path)))
        .args(["bs=512", "conv=notrunc,fsync", "status=none"])
        .arg(format!("seek={}", offset / 512));
    if direct {
        cmd.arg("oflag=direct");
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run dd");
    let _ = child.stdin.take().unwrap().write_all(data);
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn writable_file_takes_writes_truncation_and_fsync() {
    let size = 4 * M;
    let disk = FaultyFs::writable(size, 1);
    let mut want = data(size as usize, 1);
    assert!(disk.content() == want);
    let f = File::options()
        .read(true)
        .write(true)
        .open(disk.path())
        .unwrap();

    // Small, unaligned and large writes reach the server as made (direct I/O, no cache),
    // a large one cut into requests of at most 128 KiB.
    let big = data(M as usize, 2);
    for (off, part) in [(100, &big[..7]), (M - 3, &big[..4096]), (2 * M, &big[..])] {
        disk.take_writes();
        f.write_all_at(part, off).unwrap();
        want[off as usize..][..part.len()].copy_from_slice(part);
        let w = disk.take_writes();
        assert_eq!(w.iter().map(|w| w.len as usize).sum::<usize>(), part.len());
        assert!(
            w.iter().all(|w| w.len as u64 <= 128 * K && !w.lost),
            "{w:?}"
        );
        assert_eq!(w[0].offset, off);
    }
    assert!(disk.content() == want);
    let mut back = vec![0u8; size as usize];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == want);
    // Another process, buffered and O_DIRECT.
    dd_write(disk.path(), 64 * K, &big[..8 * K as usize], false).unwrap();
    dd_write(disk.path(), 128 * K, &big[..8 * K as usize], true).unwrap();
    want[64 * K as usize..][..8 * K as usize].copy_from_slice(&big[..8 * K as usize]);
    want[128 * K as usize..][..8 * K as usize].copy_from_slice(&big[..8 * K as usize]);
    assert!(disk.content() == want);

    // fsync succeeds; hole punching is not supported, as blocksync expects of some
    // filesystems (it writes zeros instead).
    f.sync_all().unwrap();
    let r = rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        0,
        4096,
    );
    assert_eq!(r, Err(rustix::io::Errno::OPNOTSUPP));

    // Growing by a write past the end, then truncating, in both directions.
    f.write_all_at(b"tail", size + 10).unwrap();
    assert_eq!(disk.size(), size + 14);
    assert_eq!(f.metadata().unwrap().len(), size + 14);
    assert_eq!(
        &disk.content()[size as usize..],
        b"\0\0\0\0\0\0\0\0\0\0tail"
    );
    f.set_len(M).unwrap();
    assert_eq!(disk.size(), M);
    assert_eq!(fs::metadata(disk.path()).unwrap().len(), M);
    f.set_len(2 * M).unwrap();
    want.truncate(M as usize);
    want.resize(2 * M as usize, 0);
    assert!(disk.content() == want);
    assert!(fs::read(disk.path()).unwrap() == want);
}

#[test]
fn writable_loop_device_writes_reach_the_file() {
    let size = 4 * M;
    let disk = FaultyFs::writable(size, 3);
    let lo = disk.loop_dev_rw();
    assert_eq!(
        sh("blockdev", &["--getsize64", s(&lo.dev)]),
        size.to_string()
    );
    let mut want = data(size as usize, 3);
    let new = data(M as usize, 4);
    // Buffered, then flushed; and O_DIRECT, which reaches the file as it returns.
    dd_write(&lo.dev, 512, &new[..64 * K as usize], false).unwrap();
    want[512..][..64 * K as usize].copy_from_slice(&new[..64 * K as usize]);
    assert!(disk.content() == want);
    let direct = File::options()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&lo.dev)
        .unwrap();
    let mut storage = Vec::new();
    let buf = aligned(&mut storage, 512);
    buf.copy_from_slice(&new[..512]);
    disk.take_writes();
    direct.write_all_at(buf, 3 * M + 512).unwrap();
    assert_eq!(
        disk.take_writes(),
        [WriteReq {
            offset: 3 * M + 512,
            len: 512,
            lost: false
        }]
    );
    want[(3 * M + 512) as usize..][..512].copy_from_slice(&new[..512]);
    assert!(disk.content() == want);
}

#[test]
fn lost_writes_are_acknowledged_and_not_stored() {
    let disk = FaultyFs::writable(M, 5);
    let old = data(M as usize, 5);
    disk.lose_writes(&[(64 * K, 4 * K)]);
    let f = File::options()
        .read(true)
        .write(true)
        .open(disk.path())
        .unwrap();
    let new = data(128 * K as usize, 6);
    // One write straddling the lost range: acknowledged whole, stored around it.
    f.write_all_at(&new, 0).unwrap();
    f.sync_all().unwrap();
    let w = disk.take_writes();
    assert!(w.iter().any(|w| w.lost), "{w:?}");
    let mut want = old.clone();
    want[..128 * K as usize].copy_from_slice(&new);
    want[64 * K as usize..68 * K as usize].copy_from_slice(&old[64 * K as usize..68 * K as usize]);
    assert!(disk.content() == want);
    assert!(fs::read(disk.path()).unwrap() == want);
    // A write elsewhere is kept.
    disk.take_writes();
    f.write_all_at(&new[..4096], 512 * K).unwrap();
    assert!(!disk.take_writes()[0].lost);
    assert_eq!(&disk.content()[512 * K as usize..][..4096], &new[..4096]);
}

#[test]
fn a_vanished_disk_fails_everything_at_once() {
    let disk = FaultyFs::writable(4 * M, 7);
    let dir = disk.dir().to_path_buf();
    let lo = disk.loop_dev_rw();
    let f = File::options()
        .read(true)
        .write(true)
        .open(disk.path())
        .unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 0).unwrap();

    // A write the disk sits on (a hung disk) fails as soon as the disk vanishes.
    disk.set_delay(Duration::from_secs(3600));
    let t = Instant::now();
    let hung = std::thread::scope(|sc| {
        let w = sc.spawn(|| f.write_all_at(&buf, 8192));
        wait_until(
            "the disk holds the write (or it returns)",
            Duration::from_secs(30),
            || disk.held_requests() > 0 || w.is_finished(),
        );
        assert!(!w.is_finished(), "the delay did not hold the write");
        disk.vanish();
        w.join().unwrap()
    });
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // The kernel ends a request in flight with ECONNABORTED, later ones with ENOTCONN.
    assert_eq!(errno(&hung), Some(libc::ECONNABORTED), "{hung:?}");

    // Everything after fails at once: this handle, a new open, another process, the
    // loop device (EIO, as from a dead disk).
    let t = Instant::now();
    let r = f.write_all_at(&buf, 0);
    assert_eq!(errno(&r), Some(libc::ENOTCONN), "{r:?}");
    let r = f.read_exact_at(&mut buf, 0);
    assert_eq!(errno(&r), Some(libc::ENOTCONN), "{r:?}");
    let r = f.sync_all();
    assert_eq!(errno(&r), Some(libc::ENOTCONN), "{r:?}");
    let r = File::open(disk.path());
    assert_eq!(errno(&r), Some(libc::ENOTCONN), "{r:?}");
    let err = dd_write(disk.path(), 0, &buf, false).unwrap_err();
    assert!(err.contains("Transport endpoint is not connected"), "{err}");
    let err = dd_write(&lo.dev, 0, &buf, true).unwrap_err();
    assert!(err.contains("Input/output error"), "{err}");
    // Buffered: a partial page must be read first, so the write itself fails; a whole
    // page goes into the page cache and only the flush fails (as blocksync sees it).
    let err = dd_write(&lo.dev, 4096, &buf[..512], false).unwrap_err();
    assert!(err.contains("Input/output error"), "{err}");
    let dev = File::options().write(true).open(&lo.dev).unwrap();
    dev.write_all_at(&buf, 3 * M).unwrap();
    let r = dev.sync_all();
    assert_eq!(errno(&r), Some(libc::EIO), "{r:?}");
    drop(dev);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Still cleaned up: the loop device detached, the dead mount gone.
    let name = lo.dev.file_name().unwrap().to_owned();
    drop(lo);
    let t = Instant::now();
    drop(disk);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!mounted(&dir));
    // Detached (or since taken by another test, over another file).
    let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
    let backing = fs::read_to_string(backing).unwrap_or_default();
    assert!(!backing.contains(s(&dir)), "{backing}");
}

/// Runs blocksync with `args` while `disk` is its destination; once the first write has
/// reached the disk and `after` more has passed, the disk vanishes. Returns the run and
/// how long it went on after the vanish.
fn vanish_mid_run(disk: &FaultyFs, args: &[&str], after: Duration) -> (Output, Duration) {
    std::thread::scope(|sc| {
        let run = sc.spawn(|| run_within(args, 60));
        // Waits for a write rather than a fixed time: ssh may take a while to log in.
        let start = Instant::now();
        while disk.take_writes().is_empty() && !run.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no write reached the disk"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(after);
        assert!(
            !run.is_finished(),
            "the sync ended before the disk vanished"
        );
        disk.vanish();
        let t = Instant::now();
        let out = run.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (out, t.elapsed())
    })
}

/// A source of `size` bytes of `data(size, seed)` in a temp dir.
fn source(size: u64, seed: u64) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(size as usize, seed)).unwrap();
    (dir, src)
}

/// What a vanished disk says: ENOTCONN, or ECONNABORTED for a request it was answering;
/// through a loop device, EIO.
const CAUSES: [&str; 3] = [
    "Transport endpoint is not connected",
    "Software caused connection abort",
    "Input/output error",
];

/// One line that names `what` and the cause.
fn assert_one_line_naming(out: &Output, what: &str) {
    let err = stderr(out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(what), "{err}");
    assert!(CAUSES.iter().any(|c| err.contains(c)), "{err}");
}

/// Slowed to about 2 s (96 blocks of 256 KiB, 20 ms each), so the vanish comes mid-run.
const SLOW: [&str; 4] = ["-p", "20", "-b", "256K"];

#[test]
fn a_destination_file_that_vanishes_is_an_error_not_a_hang() {
    let size = 24 * M;
    let (_dir, src) = source(size, 10);
    let disk = FaultyFs::writable(size, 11);
    let mut args = SLOW.to_vec();
    args.extend(["-f", s(&src), s(disk.path())]);
    let (out, after) = vanish_mid_run(&disk, &args, Duration::from_millis(500));
    eprintln!(
        "{after:?} after the vanish: exit {:?}, {}",
        out.status,
        stderr(&out)
    );
    assert_eq!(code(&out), 10, "{}", stderr(&out));
    assert_one_line_naming(&out, s(disk.path()));
    assert!(after < Duration::from_secs(5), "{after:?}");
}

#[test]
fn a_destination_disk_that_stops_answering_then_vanishes_is_an_error_not_a_hang() {
    let size = 24 * M;
    let (_dir, src) = source(size, 12);
    let disk = FaultyFs::writable(size, 13);
    let mut args = SLOW.to_vec();
    args.extend(["-f", s(&src), s(disk.path())]);
    std::thread::scope(|sc| {
        let run = sc.spawn(|| run_within(&args, 60));
        let start = Instant::now();
        while disk.take_writes().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(30), "no write");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Hung: every request from now on waits; blocksync waits with it (a disk that
        // hangs without going away is the kernel's to time out, not ours).
        disk.set_delay(Duration::from_secs(3600));
        wait_until(
            "the hung disk holds a request of blocksync's (or the run ends)",
            Duration::from_secs(30),
            || disk.held_requests() > 0 || run.is_finished(),
        );
        assert!(!run.is_finished(), "the run ended with the disk hung");
        // Stuck on it, blocksync must keep waiting, not give up by a timeout of its own.
        // "Not within a while" needs a fixed while: this sleep checks, not synchronises.
        std::thread::sleep(Duration::from_millis(700));
        assert!(!run.is_finished(), "blocksync gave up on a hung disk");
        assert!(disk.held_requests() > 0);
        disk.vanish();
        let t = Instant::now();
        let out = run.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        eprintln!("{:?} after the vanish: {}", t.elapsed(), stderr(&out));
        assert_eq!(code(&out), 10, "{}", stderr(&out));
        assert_one_line_naming(&out, s(disk.path()));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    });
}

#[test]
fn a_destination_device_that_vanishes_is_an_error_not_a_hang() {
    let size = 24 * M;
    let (_dir, src) = source(size, 14);
    let disk = FaultyFs::writable(size, 15);
    let lo = disk.loop_dev_rw();
    let mut args = SLOW.to_vec();
    args.extend(["-f", s(&src), s(&lo.dev)]);
    let (out, after) = vanish_mid_run(&disk, &args, Duration::from_millis(500));
    eprintln!(
        "{after:?} after the vanish: exit {:?}, {}",
        out.status,
        stderr(&out)
    );
    assert_eq!(code(&out), 10, "{}", stderr(&out));
    assert_one_line_naming(&out, s(&lo.dev));
    assert!(after < Duration::from_secs(5), "{after:?}");
}

#[test]
fn a_remote_destination_that_vanishes_is_an_error_not_a_hang() {
    let sshd = Sshd::start();
    let size = 24 * M;
    let (_dir, src) = source(size, 16);
    let disk = FaultyFs::writable(size, 17);
    let rsh = sshd.rsh();
    let target = format!("testhost:{}", s(disk.path()));
    let mut args = vec!["-e", &rsh, "-S", bin()];
    args.extend(SLOW);
    args.extend(["-f", s(&src), &target]);
    let (out, after) = vanish_mid_run(&disk, &args, Duration::from_millis(500));
    eprintln!(
        "{after:?} after the vanish: exit {:?}, {}",
        out.status,
        stderr(&out)
    );
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert_one_line_naming(&out, "testhost");
    assert!(after < Duration::from_secs(5), "{after:?}");
}

/// Bytes in the blocks of `block` bytes that `ranges` touch.
fn blocks_touched(ranges: &[(u64, u64)], block: u64) -> u64 {
    let mut blocks: Vec<u64> = ranges
        .iter()
        .flat_map(|&(o, l)| o / block..(o + l).div_ceil(block))
        .collect();
    blocks.dedup();
    blocks.len() as u64 * block
}

#[test]
fn verify_catches_a_disk_that_drops_writes() {
    let size = 8 * M;
    let block = 64 * K;
    let (_dir, src) = source(size, 18);
    let want = data(size as usize, 18);
    let old = data(size as usize, 19);
    // One 4 KiB stretch inside a block, one across a block boundary.
    let lost = [(3 * M + 4 * K, 4 * K), (5 * M - 2 * K, 4 * K)];
    let mut holding = want.clone();
    for &(o, l) in &lost {
        let r = o as usize..(o + l) as usize;
        holding[r.clone()].copy_from_slice(&old[r]);
    }

    // As a file, and through a loop device, whose page cache must not hide the loss:
    // the verify pass drops it and reads the disk.
    for device in [false, true] {
        let disk = FaultyFs::writable(size, 19);
        let lo = device.then(|| disk.loop_dev_rw());
        let dst = lo.as_ref().map_or(disk.path(), |l| &l.dev).to_path_buf();
        disk.lose_writes(&lost);
        let out = run_within(
            &["-f", "--verify", "--json", "-b", "64K", s(&src), s(&dst)],
            60,
        );
        assert_eq!(code(&out), 9, "{}", stderr(&out));
        // Reported per block: the three blocks holding lost bytes.
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("verify failed") && err.contains(s(&dst)),
            "{err}"
        );
        assert!(
            err.contains("2 ranges") && err.contains("first at byte 3145728"),
            "{err}"
        );
        let j = json(&out);
        assert_eq!(j["mismatch_bytes"], blocks_touched(&lost, block), "{j}");
        assert_eq!(j["source_changed_bytes"], 0, "{j}");
        // Exactly the lost bytes are old.
        assert!(disk.content() == holding, "device: {device}");

        // Once the disk keeps its writes again, a rerun repairs the copy.
        disk.lose_writes(&[]);
        let out = run_within(&["-f", "--verify", s(&src), s(&dst)], 60);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(disk.content() == want, "device: {device}");
    }
}

/// Stricter than the tests above: a run that would go on for ~10 s more must stop
/// within a few seconds of its remote destination vanishing, not read and send the rest
/// of the source first (the remote's failure arrives behind the chunk reports it sent
/// ahead; the link reads ahead of the source half and tells it at once).
#[test]
fn a_remote_destination_that_vanishes_stops_the_run_promptly() {
    let sshd = Sshd::start();
    let size = 24 * M;
    let (_dir, src) = source(size, 20);
    let disk = FaultyFs::writable(size, 21);
    let rsh = sshd.rsh();
    let target = format!("testhost:{}", s(disk.path()));
    // 1.6 s per chunk of 16 blocks, ~10 s in all.
    let args = [
        "-e",
        &rsh,
        "-S",
        bin(),
        "-p",
        "100",
        "-b",
        "256K",
        "-f",
        s(&src),
        &target,
    ];
    let (out, after) = vanish_mid_run(&disk, &args, Duration::from_millis(500));
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(
        after < Duration::from_secs(4),
        "{after:?}: {}",
        stderr(&out)
    );
}

/// Whether `pid` has a SIGINT still waiting to be delivered (to any of its threads).
fn sigint_pending(pid: u32) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let sigint = 1u64 << (libc::SIGINT - 1);
    status
        .lines()
        .filter(|l| l.starts_with("ShdPnd:") || l.starts_with("SigPnd:"))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .any(|mask| mask & sigint != 0)
}

/// Ctrl-C while the destination disk hangs, then the disk goes away: the writes and the
/// flush after the interruption fail, so "interrupted; what was written is flushed"
/// would be a lie. The run reports the write failure, with its own exit code.
#[test]
fn a_write_failure_after_ctrl_c_is_reported_not_taken_for_the_interruption() {
    let size = 24 * M;
    let (dir, src) = source(size, 16);
    let disk = FaultyFs::writable(size, 17);
    let pidfile = dir.path().join("pid");
    // The shell records its pid, then becomes blocksync: the test can signal it.
    let script = format!("echo $$ > {}; exec \"$0\" \"$@\"", s(&pidfile));
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &script,
        bin(),
        "-b",
        "256K",
        "-f",
        s(&src),
        s(disk.path()),
    ]);
    std::thread::scope(|sc| {
        let run = sc.spawn(|| output_within(&mut cmd, "blocksync", 60));
        wait_until("a write reaches the disk", Duration::from_secs(30), || {
            !disk.take_writes().is_empty() || run.is_finished()
        });
        disk.set_delay(Duration::from_secs(3600));
        wait_until(
            "the hung disk holds a write",
            Duration::from_secs(30),
            || disk.held_requests() > 0 || run.is_finished(),
        );
        assert!(!run.is_finished(), "the run ended before the disk hung");
        let pid: u32 = fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
        wait_until("blocksync took the SIGINT", Duration::from_secs(30), || {
            !sigint_pending(pid)
        });
        disk.vanish();
        let out = run.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        assert_eq!(code(&out), 10, "{}", stderr(&out));
        assert_one_line_naming(&out, s(disk.path()));
        assert!(!stderr(&out).contains("interrupted"), "{}", stderr(&out));
    });
}
