//! Failures and interruptions end with a clear error and never hang: a full remote disk,
//! Ctrl-C on a sparse source, more changed blocks than refinement questions in flight.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;

const M: u64 = 1024 * 1024;

#[test]
fn full_remote_disk_is_an_error_not_a_hang() {
    let sshd = Sshd::start();
    let small = Tmpfs::new(16 * M);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    // 48 MiB of data, then a long sparse tail.
    let f = File::create(&src).unwrap();
    f.set_len(4 << 30).unwrap();
    f.write_all_at(&data(48 * M as usize, 40), 0).unwrap();
    drop(f);
    let dst = small.dir.path().join("dst");
    let target = format!("testhost:{}", s(&dst));
    let out = run_within(
        &["-e", &sshd.rsh(), "-S", bin(), "-f", s(&src), &target],
        60,
    );
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("No space left"), "{err}");
    assert!(err.contains("testhost"), "{err}");
}

#[test]
fn full_local_disk_is_an_error_not_a_hang() {
    let small = Tmpfs::new(8 * M);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(32 * M as usize, 41)).unwrap();
    let dst = small.dir.path().join("dst");
    let out = run_within(&["-f", s(&src), s(&dst)], 60);
    assert_eq!(code(&out), 10, "{}", stderr(&out));
    assert!(stderr(&out).contains("No space left"), "{}", stderr(&out));
}

#[test]
fn interrupting_a_sparse_sync_never_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let f = File::create(&src).unwrap();
    f.set_len(64 * M).unwrap();
    for i in 0..16u64 {
        // Data chunks between holes.
        f.write_all_at(&data(M as usize, 42 + i), i * 4 * M + 4096)
            .unwrap();
    }
    drop(f);
    for round in 0..6 {
        let dst = dir.path().join(format!("dst{round}"));
        let child = std::process::Command::new(bin())
            .args(["-p", "50", "-b", "256K", s(&src), s(&dst)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(150 + 50 * round));
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::INT,
        )
        .unwrap();
        let started = std::time::Instant::now();
        let out = child.wait_with_output().unwrap();
        assert!(
            started.elapsed().as_secs() < 10,
            "round {round} hung after Ctrl-C"
        );
        assert_eq!(code(&out), 130, "round {round}: {}", stderr(&out));
        // The next run completes the copy.
        let out = run_within(&["-f", s(&src), s(&dst)], 60);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert_eq!(fs::read(&dst).unwrap(), fs::read(&src).unwrap());
    }
}

#[test]
fn more_changed_blocks_than_open_questions() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(48 * M as usize, 43);
    fs::write(&src, &content).unwrap();
    // One byte differs in every 8 KiB block of the first 24 MiB: 3072 blocks to refine.
    let mut old = content.clone();
    for i in (0..24 * M as usize).step_by(8192) {
        old[i + 100] ^= 0xff;
    }
    fs::write(&dst, &old).unwrap();
    let target = format!("testhost:{}", s(&dst));
    let out = run_within(
        &[
            "-e",
            &sshd.rsh(),
            "-S",
            bin(),
            "-f",
            "--json",
            "-b",
            "8K",
            "--min-block",
            "4K",
            s(&src),
            &target,
        ],
        120,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    assert_eq!(json(&out)["blocks_changed"], 3072);
}
