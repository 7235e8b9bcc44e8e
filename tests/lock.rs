//! One run at a time per destination: a second run onto a destination another run is
//! writing is refused at once (exit 16, naming the holder's pid), and the destination
//! ends up equal to the first run's source. Locally, to an existing and to a new file,
//! and over the test sshd with `-w 2`.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::time::{Duration, Instant};

const M: usize = 1024 * 1024;

/// The second run is refused at once, naming `first`'s pid; then `first` completes.
/// `dst` is the file the first run holds.
fn second_is_refused(mut first: std::process::Child, dst: &std::path::Path, second: &[&str]) {
    let pid = first.id();
    wait_while_running(
        &mut first,
        "the first run holds its lock",
        Duration::from_secs(30),
        || holds_lock(pid, dst),
    );
    let started = Instant::now();
    let out = run_within(second, 60);
    assert_eq!(code(&out), 16, "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once"
    );
    let err = stderr(&out);
    assert!(err.contains("in use by another blocksync"), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    let status = first.wait().unwrap();
    assert!(status.success(), "the first run completes: {status}");
}

#[test]
fn a_second_local_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, dst) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("dst"),
    );
    fs::write(&a, data(8 * M, 1)).unwrap();
    fs::write(&b, data(8 * M, 2)).unwrap();
    fs::write(&dst, data(8 * M, 3)).unwrap();
    let first = spawn(&["-f", "-p", "40", "-b", "256K", s(&a), s(&dst)]);
    second_is_refused(first, &dst, &["-f", s(&b), s(&dst)]);
    assert_eq!(fs::read(&dst).unwrap(), fs::read(&a).unwrap());
    // A dry run is refused too while a run writes; once it is over, it runs.
    let out = run(&["-n", s(&b), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn a_second_run_onto_a_file_being_created_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, dst) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("new"),
    );
    fs::write(&a, data(8 * M, 4)).unwrap();
    fs::write(&b, data(8 * M, 5)).unwrap();
    let first = spawn(&["-f", "-p", "40", "-b", "256K", s(&a), s(&dst)]);
    // Written under its temporary name until complete: that is what is locked.
    let partial = dir.path().join(".new.blocksync-partial");
    second_is_refused(first, &partial, &["-f", s(&b), s(&dst)]);
    assert_eq!(fs::read(&dst).unwrap(), fs::read(&a).unwrap());
    assert!(!partial.exists());
}

#[test]
fn a_second_push_with_two_streams_is_refused() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, dst) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("dst"),
    );
    fs::write(&a, data(8 * M, 6)).unwrap();
    fs::write(&b, data(8 * M, 7)).unwrap();
    fs::write(&dst, data(8 * M, 8)).unwrap();
    let rsh = sshd.rsh();
    let target = format!("testhost:{}", s(&dst));
    let base = [
        "-e",
        rsh.as_str(),
        "-S",
        bin(),
        "-f",
        "-w",
        "2",
        "-b",
        "256K",
    ];
    let mut first_args = base.to_vec();
    first_args.extend_from_slice(&["--bwlimit", "2M", s(&a), &target]);
    let mut first = spawn(&first_args);
    // The remote servers hold the locks: wait until both streams have theirs.
    wait_while_running(
        &mut first,
        "both streams hold their locks",
        Duration::from_secs(30),
        || lock_holders(&dst).len() >= 2,
    );
    let mut second_args = base.to_vec();
    second_args.extend_from_slice(&[s(&b), &target]);
    let started = Instant::now();
    let out = run_within(&second_args, 60);
    assert_eq!(code(&out), 16, "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused at once"
    );
    assert!(
        stderr(&out).contains("in use by another blocksync, pid"),
        "{}",
        stderr(&out)
    );
    let status = first.wait().unwrap();
    assert!(status.success(), "the first push completes: {status}");
    assert_eq!(fs::read(&dst).unwrap(), fs::read(&a).unwrap());
}
