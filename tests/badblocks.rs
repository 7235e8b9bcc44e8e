//! A failing source disk, for real: a FUSE file that answers EIO at chosen sectors
//! (tests/common/faultyfs/), read directly, through a loop device, and over ssh. Every
//! readable byte must arrive, the unreadable ones must be exactly those injected, and the
//! `--bad-blocks` map must say so.

mod common;

use common::faultyfs::FaultyFs;
use common::sshd::Sshd;
use common::*;
use std::fs;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Bad ranges at awkward places: one sector inside a block, a run across a block
/// boundary (64 KiB blocks below), a run across a chunk boundary, and the last sector.
fn injected(size: u64) -> Vec<(u64, u64)> {
    vec![
        (M + 512, 512),
        (2 * M - 4 * K, 8 * K),
        (4 * M - 512, 1024),
        (size - 512, 512),
    ]
}

fn ranges(bad: &[(u64, u64)]) -> Vec<Range<u64>> {
    bad.iter().map(|&(o, l)| o..o + l).collect()
}

/// What a copy with zeros for the unreadable bytes holds.
fn with_zeros(content: &[u8], bad: &[(u64, u64)]) -> Vec<u8> {
    let mut out = content.to_vec();
    for &(o, l) in bad {
        out[o as usize..(o + l) as usize].fill(0);
    }
    out
}

fn map_of(path: &Path) -> Vec<Range<u64>> {
    let text = fs::read_to_string(path).expect("the map was written");
    blocksync::testing::parse_bad(&text).expect("the map parses")
}

#[test]
fn unreadable_sectors_of_a_file_are_read_around_and_mapped() {
    let size = 6 * M + 4 * K;
    let bad = injected(size);
    let disk = FaultyFs::mount(size, 61, &bad, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("copy");
    let map = dir.path().join("copy.map");
    let out = run_within(
        &[
            "--json",
            "-b",
            "64K",
            "--bad-blocks",
            s(&map),
            s(disk.path()),
            s(&dst),
        ],
        120,
    );
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("could not be read") && err.contains(s(&map)),
        "{err}"
    );
    let j = json(&out);
    let total: u64 = bad.iter().map(|b| b.1).sum();
    assert_eq!(j["unreadable_bytes"], total, "{j}");
    assert_eq!(j["unreadable_ranges"], bad.len() as u64, "{j}");
    assert_eq!(j["status"], "unreadable");
    // Every readable byte copied; zeros exactly where the source failed.
    assert!(fs::read(&dst).unwrap() == with_zeros(disk.content(), &bad));
    assert_eq!(map_of(&map), ranges(&bad));

    // Run again: same outcome, nothing else changes (resumable, idempotent).
    let out = run_within(
        &[
            "-f",
            "--json",
            "--bad-blocks",
            s(&map),
            s(disk.path()),
            s(&dst),
        ],
        120,
    );
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    assert_eq!(json(&out)["bytes_written"], 0, "{}", stderr(&out));
    assert_eq!(map_of(&map), ranges(&bad));

    // --verify does not count the unreadable bytes as a difference.
    let out = run_within(&["-f", "--verify", "--json", s(disk.path()), s(&dst)], 120);
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    assert_eq!(json(&out)["mismatch_bytes"], 0);
}

#[test]
fn keep_unreadable_leaves_old_bytes_and_max_errors_gives_up() {
    let size = 6 * M + 4 * K;
    let bad = injected(size);
    let disk = FaultyFs::mount(size, 62, &bad, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("copy");
    let old = data(size as usize, 63);
    fs::write(&dst, &old).unwrap();
    let out = run_within(&["-f", "--keep-unreadable", s(disk.path()), s(&dst)], 120);
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("keeps its old bytes"),
        "{}",
        stderr(&out)
    );
    let mut want = disk.content().to_vec();
    for &(o, l) in &bad {
        let r = o as usize..(o + l) as usize;
        want[r.clone()].copy_from_slice(&old[r]);
    }
    assert!(
        fs::read(&dst).unwrap() == want,
        "old bytes kept only where unreadable"
    );

    // Giving up after two bad areas: an error, and the map holds what was found.
    let map = dir.path().join("map");
    let fresh = dir.path().join("fresh");
    let out = run_within(
        &[
            "--max-errors",
            "2",
            "--bad-blocks",
            s(&map),
            s(disk.path()),
            s(&fresh),
        ],
        120,
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-errors 2"), "{}", stderr(&out));
    // It stops inside the chunk where the third area starts (that area's first part).
    let found = map_of(&map);
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(found[..2], ranges(&bad)[..2]);
    assert_eq!(found[2].start, bad[2].0);
}

#[test]
fn a_loop_device_over_a_failing_disk_fails_only_its_bad_sectors() {
    let size = 6 * M + 4 * K;
    let bad = injected(size);
    let disk = FaultyFs::mount(size, 64, &bad, Duration::ZERO);
    let dev = disk.loop_dev();
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("copy");
    let map = dir.path().join("map");
    let out = run_within(
        &["--json", "--bad-blocks", s(&map), s(&dev.dev), s(&dst)],
        120,
    );
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    // The retries read with O_DIRECT: a bad 512-byte sector costs 512 bytes, not the
    // 4 KiB page a buffered read of the device would lose.
    assert_eq!(map_of(&map), ranges(&bad));
    assert!(fs::read(&dst).unwrap() == with_zeros(disk.content(), &bad));
}

#[test]
fn failing_disks_over_ssh_push_and_pull() {
    let sshd = Sshd::start();
    let size = 6 * M + 4 * K;
    let bad = injected(size);
    let disk = FaultyFs::mount(size, 65, &bad, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let want = with_zeros(disk.content(), &bad);
    let base = ["-e", &sshd.rsh(), "-S", bin(), "-f", "--json"];
    let rsh_args =
        |rest: &[&str]| -> Vec<String> { base.iter().chain(rest).map(|x| x.to_string()).collect() };
    let call = |rest: &[&str]| {
        let a = rsh_args(rest);
        run_within(&a.iter().map(String::as_str).collect::<Vec<_>>(), 120)
    };

    // Push: the failing disk is local, the copy remote.
    let pushed = dir.path().join("pushed");
    let map = dir.path().join("push.map");
    let remote = format!("testhost:{}", s(&pushed));
    let out = call(&["--bad-blocks", s(&map), s(disk.path()), &remote]);
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    assert_eq!(map_of(&map), ranges(&bad));
    assert!(fs::read(&pushed).unwrap() == want);

    // Pull: the failing disk is remote; its findings cross the link into the local map.
    let pulled = dir.path().join("pulled");
    let map = dir.path().join("pull.map");
    let remote = format!("testhost:{}", s(disk.path()));
    let out = call(&["--bad-blocks", s(&map), "--verify", &remote, s(&pulled)]);
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    let total: u64 = bad.iter().map(|b| b.1).sum();
    assert_eq!(json(&out)["unreadable_bytes"], total);
    assert_eq!(map_of(&map), ranges(&bad));
    assert!(fs::read(&pulled).unwrap() == want);
}

#[test]
fn a_slow_failing_disk_is_read_around_too() {
    // Every read waits 3 ms, like a disk retrying internally: the run still reads around
    // the bad sectors, and --verify (which reads the source again) agrees.
    let size = 3 * M;
    let bad = vec![(M + 4096, 512), (2 * M + 512, 1024)];
    let disk = FaultyFs::mount(size, 66, &bad, Duration::from_millis(3));
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("copy");
    let map = dir.path().join("map");
    let out = run_within(
        &[
            "--json",
            "--verify",
            "--bad-blocks",
            s(&map),
            s(disk.path()),
            s(&dst),
        ],
        120,
    );
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["mismatch_bytes"], 0, "{j}");
    assert_eq!(j["verified_bytes"], size, "{j}");
    assert_eq!(map_of(&map), ranges(&bad));
    assert!(fs::read(&dst).unwrap() == with_zeros(disk.content(), &bad));
}

#[test]
fn bad_sectors_with_a_digest_file_and_two_readers() {
    // With a digest file standing in for the destination, two threads read and hash the
    // source: unreadable sectors must be handled and mapped exactly the same.
    let size = 6 * M + 4 * K;
    let bad = injected(size);
    let disk = FaultyFs::mount(size, 67, &bad, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let (dst, dig, map) = (
        dir.path().join("copy"),
        dir.path().join("dig"),
        dir.path().join("map"),
    );
    let state = dir.path().join("state");
    let run_cached = || {
        std::process::Command::new(bin())
            .args(["-f", "--json", "-b", "64K", "--digest-file", s(&dig)])
            .args(["--bad-blocks", s(&map), s(disk.path()), s(&dst)])
            .env("XDG_STATE_HOME", &state)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = run_cached();
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    let out = run_cached(); // the digest file is used now
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    let j = json(&out);
    assert!(
        j["bytes_read_destination"].as_u64().unwrap() <= 8 * 64 * K,
        "{j}"
    );
    assert_eq!(map_of(&map), ranges(&bad));
    assert!(fs::read(&dst).unwrap() == with_zeros(disk.content(), &bad));
}

#[test]
fn max_errors_counts_in_order_with_two_readers() {
    // Two readers (a digest file stands in for the destination) finish chunks out of
    // order. A bad range across the chunk boundary is one area, and --max-errors must
    // count it once even when the chunk after the boundary is read first. Chunk 0 is
    // made slow to read (many bad blocks, each split down to its sector, every request
    // delayed) so chunk 1 usually is; the count must not depend on it either way.
    let size = 6 * M + 4 * K;
    let mut bad: Vec<(u64, u64)> = (1..=24).map(|k| (k * 128 * K + 512, 512)).collect();
    bad.push((4 * M - 512, 1024));
    let areas = bad.len() as u64;
    let disk = FaultyFs::mount(size, 68, &bad, Duration::from_millis(1));
    let dir = tempfile::tempdir().unwrap();
    let (dst, dig, map) = (
        dir.path().join("copy"),
        dir.path().join("dig"),
        dir.path().join("map"),
    );
    let state = dir.path().join("state");
    let run_cached = |max: Option<u64>| {
        let max = max.map(|m| m.to_string());
        let mut c = std::process::Command::new(bin());
        c.args(["-f", "--json", "-b", "64K", "--digest-file", s(&dig)])
            .args(["--bad-blocks", s(&map)]);
        if let Some(m) = &max {
            c.args(["--max-errors", m]);
        }
        c.args([s(disk.path()), s(&dst)])
            .env("XDG_STATE_HOME", &state)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = run_cached(None); // writes the digest file
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    assert_eq!(map_of(&map), ranges(&bad));

    // Exactly as many areas as allowed: not given up.
    let out = run_cached(Some(areas));
    assert_eq!(code(&out), 14, "{}", stderr(&out));
    let j = json(&out);
    assert!(
        j["bytes_read_destination"].as_u64().unwrap() <= 8 * 64 * K,
        "the digest file was not used, so one reader ran: {j}"
    );
    assert_eq!(j["unreadable_ranges"], areas, "{j}");
    assert_eq!(map_of(&map), ranges(&bad));
    assert!(fs::read(&dst).unwrap() == with_zeros(disk.content(), &bad));

    // One fewer allowed: given up inside chunk 0, where the last area starts.
    let out = run_cached(Some(areas - 1));
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("--max-errors {}", areas - 1)),
        "{err}"
    );
}
