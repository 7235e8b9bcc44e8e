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
    // An existing (short) destination: a new one would be refused up front for want of
    // room; this one grows until the disk is full.
    fs::write(&dst, b"x").unwrap();
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
    fs::write(&dst, b"x").unwrap(); // existing: it grows until the disk is full
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
    // 50 ms a block: a run sends a chunk of 16 blocks (4 MiB, one data stretch), then
    // pauses 800 ms. Each round waits until the first stretch is in the destination, so
    // the run is past its start and into the sync, then lets 0-250 ms more pass, a
    // different time each round, so the signal lands at different points of the run.
    for round in 0..6 {
        let dst = dir.path().join(format!("dst{round}"));
        let mut child = std::process::Command::new(bin())
            .args(["-p", "50", "-b", "256K", s(&src), s(&dst)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let first = data(M as usize, 42);
        wait_while_running(
            &mut child,
            &format!("round {round}: the first data is written"),
            std::time::Duration::from_secs(30),
            || dest_holds(&dst, 4096, &first),
        );
        // Not synchronisation: only where in the run the signal lands.
        std::thread::sleep(std::time::Duration::from_millis(50 * round));
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

/// Runs blocksync as user nobody (uid 65534), for permission tests (we are root).
fn run_as_nobody(args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("setpriv")
}

#[test]
fn read_only_destinations_are_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(3 * M as usize, 50)).unwrap();

    // A file on a filesystem mounted read-only.
    let fs_ro = Tmpfs::new(16 * M);
    let dst = fs_ro.dir.path().join("dst");
    let old = data(3 * M as usize, 51);
    fs::write(&dst, &old).unwrap();
    sh("mount", &["-o", "remount,ro", s(fs_ro.dir.path())]);
    let out = run_within(&["-f", s(&src), s(&dst)], 30);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(s(&dst)), "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), old);
    // A missing file there cannot be created either.
    let out = run_within(&[s(&src), &format!("{}/new", s(fs_ro.dir.path()))], 30);
    assert_eq!(code(&out), 4, "{}", stderr(&out));

    // A block device set read-only.
    let dev = LoopDev::new(4 * M, &old);
    sh("blockdev", &["--setro", s(&dev.dev)]);
    let out = run_within(&["-f", s(&src), s(&dev.dev)], 30);
    sh("blockdev", &["--setrw", s(&dev.dev)]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains(s(&dev.dev)), "{}", stderr(&out));
    assert_eq!(&dev.read()[..old.len()], &old[..]);
}

#[test]
fn permission_denied_names_the_path_locally_and_remotely() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M as usize, 52)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
    let dst = dir.path().join("dst");
    let old = data(M as usize, 53);
    fs::write(&dst, &old).unwrap();
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).unwrap();

    // Locally, as a user who may read the source but not write the destination.
    let out = run_as_nobody(&["-f", s(&src), s(&dst)]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("Permission denied") && err.contains(s(&dst)),
        "{err}"
    );
    assert_eq!(fs::read(&dst).unwrap(), old);
    // An unreadable source is the source's fault.
    fs::set_permissions(&src, fs::Permissions::from_mode(0o600)).unwrap();
    let out = run_as_nobody(&["-f", s(&src), &format!("{}/x", s(dir.path()))]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();

    // Over ssh, as a user without write permission there: the remote says why.
    let sshd = Sshd::start();
    let user = common::sshd::TestUser::new(&sshd);
    let out = run_within(
        &[
            "-e",
            &sshd.rsh(),
            "-S",
            bin(),
            "-f",
            s(&src),
            &user.at(&dst),
        ],
        60,
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("Permission denied") && err.contains("testhost"),
        "{err}"
    );
    assert_eq!(fs::read(&dst).unwrap(), old);
}
