//! Sparse and zero-aware syncs: holes are not read, zero blocks travel as zero ranges,
//! destinations stay thin. On real files, loop devices and over a real sshd.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Bytes the filesystem has allocated for `p`.
fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// A sparse file of `size` bytes with random data at each (offset, len).
fn sparse_file(p: &Path, size: u64, extents: &[(u64, usize)]) {
    let f = File::create(p).unwrap();
    f.set_len(size).unwrap();
    for (i, &(off, len)) in extents.iter().enumerate() {
        f.write_all_at(&data(len, 100 + i as u64), off).unwrap();
    }
}

/// Where the first data at or after `from` in `p` lies, by SEEK_DATA (the size: none).
fn seek_data(p: &Path, from: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let f = File::open(p).unwrap();
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    let at = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if at < 0 {
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENXIO)
        );
        return f.metadata().unwrap().len();
    }
    at as u64
}

fn same(a: &Path, b: &Path) -> bool {
    fs::read(a).unwrap() == fs::read(b).unwrap()
}

#[test]
fn sparse_source_to_new_file_stays_thin_and_holes_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    // Extents deliberately not aligned to the 1 MiB blocks.
    sparse_file(
        &src,
        64 * M + 123,
        &[
            (3 * M + 4 * K, 40 * K as usize),
            (20 * M - 8 * K, (2 * M) as usize),
            (64 * M, 123),
        ],
    );
    let out = run(&["--json", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(same(&src, &dst));
    let j = json(&out);
    assert!(j["blocks_hole"].as_u64().unwrap() >= 58, "{j}");
    assert!(j["bytes_read_source"].as_u64().unwrap() <= 5 * M, "{j}");
    let (a, b) = (allocated(&src), allocated(&dst));
    assert!(b <= a + a / 20, "destination allocated {b}, source {a}");
}

#[test]
fn zero_source_blocks_over_data_become_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    fs::write(&dst, data(16 * M as usize, 1)).unwrap();
    // Source: data, then 8 MiB of written zeros, then a hole, then data.
    let mut content = data(16 * M as usize, 1);
    for b in &mut content[(4 * M) as usize..(12 * M) as usize] {
        *b = 0;
    }
    fs::write(&src, &content).unwrap();
    let before = allocated(&dst);
    let out = run(&["-f", "--json", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    let j = json(&out);
    assert_eq!(j["blocks_zeroed"], 8, "{j}");
    assert_eq!(j["blocks_zero"], 8, "{j}");
    // The 8 MiB made zero are written, as zero ranges (holes), not as data.
    assert_eq!(j["bytes_written"], 8 * M, "{j}");
    assert!(allocated(&dst) <= before - 7 * M, "holes were not punched");
    // Run again: nothing to do.
    let out = run(&["-f", "--json", s(&src), s(&dst)]);
    assert_eq!(json(&out)["blocks_changed"], 0);
}

#[test]
fn zero_runs_across_block_boundaries_and_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let size = 5 * 64 * K as usize + 1000;
    let mut content = data(size, 2);
    // Zeros from inside block 1 across blocks 2-3 (64 KiB blocks), and the whole tail.
    for b in &mut content[70 * K as usize..200 * K as usize] {
        *b = 0;
    }
    for b in &mut content[300 * K as usize..] {
        *b = 0;
    }
    fs::write(&src, &content).unwrap();
    fs::write(&dst, data(size + 5000, 3)).unwrap();
    let out = run(&["-f", "--json", "-b", "64K", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    let j = json(&out);
    // Blocks 2 and 5 (the partial tail) are all zero; 1, 3, 4 hold data too.
    assert_eq!(j["blocks_zero"], 2, "{j}");
    assert_eq!(j["blocks_zeroed"], 2, "{j}");
}

#[test]
fn holes_in_both_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let ext = [(10 * M, 5000usize), (200 * M, (M + 7) as usize)];
    sparse_file(&src, 256 * M, &ext);
    sparse_file(&dst, 256 * M, &ext);
    let out = run(&["-f", "--json", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["blocks_changed"], 0, "{j}");
    assert!(j["bytes_read_source"].as_u64().unwrap() <= 4 * M, "{j}");
    assert!(
        j["bytes_read_destination"].as_u64().unwrap() <= 4 * M,
        "{j}"
    );
    assert!(same(&src, &dst));
}

#[test]
fn no_sparse_allocates_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    sparse_file(&src, 16 * M, &[(M, 4096)]);
    let out = run(&["--no-sparse", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(same(&src, &dst));
    assert!(
        allocated(&dst) >= 16 * M,
        "allocated only {}",
        allocated(&dst)
    );
}

#[test]
fn dry_run_reports_zero_blocks_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    sparse_file(&src, 8 * M, &[(0, M as usize)]);
    let old = data(8 * M as usize, 4);
    fs::write(&dst, &old).unwrap();
    let out = run(&["-n", "--json", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["blocks_zero"], 7, "{j}");
    assert_eq!(j["blocks_hole"], 7, "{j}");
    assert_eq!(j["blocks_zeroed"], 7, "{j}");
    assert_eq!(fs::read(&dst).unwrap(), old);
    let text = run(&["-n", s(&src), s(&dst)]);
    let t = String::from_utf8_lossy(&text.stdout);
    assert!(
        t.contains("(7 as zeros)") && t.contains("7 of them holes not read"),
        "{t}"
    );
}

#[test]
fn zero_blocks_onto_a_device_with_and_without_discard() {
    for discard in [false, true] {
        let dev = LoopDev::new(8 * M, &data(8 * M as usize, 5));
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        sparse_file(&src, 6 * M + 512, &[(M + 3, 9000), (6 * M, 512)]);
        let mut args = vec!["-f", "--json"];
        if discard {
            args.push("--discard");
        }
        args.extend([s(&src), s(&dev.dev)]);
        let out = run(&args);
        assert_eq!(code(&out), 0, "discard {discard}: {}", stderr(&out));
        // The first block is zeroed. BLKZEROOUT on a loop device becomes a ZERO_RANGE of
        // the backing file, which leaves unwritten extents that SEEK_DATA skips; zeros
        // written instead are data. Looked at before reading the device, whose reads
        // would fill the page cache there.
        let first_data = seek_data(&dev.backing, 0);
        if discard {
            assert!(
                first_data >= M,
                "--discard wrote zeros: data at {first_data}"
            );
        } else {
            assert_eq!(first_data, 0, "without --discard zeros are written");
        }
        let now = dev.read();
        assert_eq!(&now[..(6 * M + 512) as usize], &fs::read(&src).unwrap()[..]);
        assert_eq!(
            &now[(7 * M) as usize..],
            &data(8 * M as usize, 5)[(7 * M) as usize..],
            "tail kept"
        );
        assert_eq!(json(&out)["blocks_zeroed"], 5);
    }
}

#[test]
fn sparse_over_ssh_both_ways() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    sparse_file(
        &src,
        512 * M,
        &[(7 * M + 5, 300_000), (500 * M, M as usize)],
    );
    let dst = dir.path().join("dst");
    let base = ["-e", &sshd.rsh(), "-S", bin(), "-f", "--json"];
    let target = format!("testhost:{}", s(&dst));
    let mut args = base.to_vec();
    args.extend([s(&src), target.as_str()]);
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(same(&src, &dst));
    let j = json(&out);
    assert!(j["bytes_sent"].as_u64().unwrap() < 3 * M, "{j}");
    assert!(allocated(&dst) <= allocated(&src) + allocated(&src) / 20);
    // Zero the first extent in the source: a zero range crosses, not data.
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0u8; 300_000], 7 * M + 5).unwrap();
    drop(f);
    let back = dir.path().join("back");
    fs::write(&back, data(4 * M as usize, 6)).unwrap();
    let mut args = base.to_vec();
    args.extend([target.as_str(), s(&back)]);
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(same(&back, &dst), "pulled copy differs");
    let mut args = base.to_vec();
    args.extend([s(&src), target.as_str()]);
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["blocks_zeroed"], 1, "{j}");
    assert!(j["bytes_sent"].as_u64().unwrap() < 100 * K, "{j}");
    assert!(same(&src, &dst));
}
