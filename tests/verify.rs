//! `--verify`: a full-strength comparison of both sides after the sync, locally and over a
//! real sshd, and what it reports when the destination or the source changed under the
//! sync.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const M: usize = 1024 * 1024;

/// Starts blocksync with `args` in the background, stdout captured.
fn spawn(args: &[&str]) -> Child {
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start blocksync")
}

/// Waits until the first `len` bytes of `path` equal `want` (the sync wrote them), while
/// `child` still runs; panics after 30 s.
/// Waits until the new destination `path` (still under its temporary name) holds
/// `want` at its start; returns the path it is being written at.
fn wait_written(path: &Path, want: &[u8], child: &mut Child) -> std::path::PathBuf {
    let deadline = Instant::now() + Duration::from_secs(30);
    let partial = partial_of(path);
    loop {
        let mut buf = vec![0u8; want.len()];
        if let Ok(f) = fs::File::open(&partial)
            && f.read_exact_at(&mut buf, 0).is_ok()
            && buf == want
        {
            return partial;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sync ended before it was caught"
        );
        assert!(Instant::now() < deadline, "block 0 never written");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn finish(child: Child) -> std::process::Output {
    child.wait_with_output().expect("wait for blocksync")
}

fn setup(len: usize, seed: u64) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(len, seed);
    fs::write(&src, &content).unwrap();
    (dir, src, content)
}

#[test]
fn verify_passes_on_a_good_copy_new_and_resynced() {
    let (dir, src, mut content) = setup(9 * M + 100, 1);
    let dst = dir.path().join("dst");
    let out = run(&["--verify", "--json", "-b", "256K", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["verified_bytes"], content.len() as u64);
    assert_eq!(j["mismatch_bytes"], 0);
    assert_eq!(fs::read(&dst).unwrap(), content);

    content[5 * M] ^= 0x55;
    fs::write(&src, &content).unwrap();
    let out = run(&["--verify", "--json", "-f", "-b", "256K", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["blocks_changed"], 1);
    assert_eq!(j["verified_bytes"], content.len() as u64);
    assert_eq!(fs::read(&dst).unwrap(), content);

    // Without --verify there is no verify figure; a dry run verifies nothing.
    let out = run(&["--json", "-f", s(&src), s(&dst)]);
    assert!(json(&out)["verified_bytes"].is_null());
    let out = run(&["--json", "-n", "--verify", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(json(&out)["verified_bytes"].is_null());
}

#[test]
fn verify_finds_a_destination_changed_behind_the_sync() {
    let (dir, src, content) = setup(40 * M, 2);
    let dst = dir.path().join("dst");
    // 40 blocks at 50 ms each: block 0 is written long before the sync ends.
    let mut child = spawn(&["--verify", "--json", "-p", "50", s(&src), s(&dst)]);
    let written = wait_written(&dst, &content[..M], &mut child);
    // Another writer spoils block 0 of the destination after the sync wrote it.
    let f = fs::OpenOptions::new().write(true).open(written).unwrap();
    f.write_all_at(b"spoiled", 1000).unwrap();
    f.sync_all().unwrap();
    let out = finish(child);
    assert_eq!(code(&out), 9, "{}", stderr(&out));
    assert!(stderr(&out).contains("verify failed"), "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["status"], "verify-failed");
    assert_eq!(j["mismatch_bytes"], M as u64);

    // Running again repairs it and verifies clean.
    let out = run(&["--verify", "-f", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
}

#[test]
fn verify_tells_a_source_that_changed_during_the_sync() {
    let (dir, src, mut content) = setup(40 * M, 3);
    let dst = dir.path().join("dst");
    let mut child = spawn(&["--verify", "--json", "-p", "50", s(&src), s(&dst)]);
    wait_written(&dst, &content[..M], &mut child);
    // The source's block 0 changes after it was read and sent.
    let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(b"new data", 2000).unwrap();
    content[2000..2008].copy_from_slice(b"new data");
    let out = finish(child);
    assert_eq!(code(&out), 13, "{}", stderr(&out));
    assert!(stderr(&out).contains("snapshot"), "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["status"], "source-changed");
    assert!(j["source_changed_bytes"].as_u64().unwrap() >= M as u64);
    assert_eq!(j["mismatch_bytes"], 0);

    let out = run(&["--verify", "-f", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
}

/// blocksync args to reach the test sshd, with the built binary given as the remote one.
fn via(sshd: &Sshd) -> Vec<String> {
    vec![
        "-e".into(),
        sshd.rsh(),
        "-S".into(),
        bin().into(),
        "-f".into(),
        "--json".into(),
        "--verify".into(),
    ]
}

#[test]
fn verify_over_ssh_push_and_pull() {
    let sshd = Sshd::start();
    let (dir, src, content) = setup(7 * M + 5, 4);
    let dst = dir.path().join("dst");
    let remote = format!("testhost:{}", s(&dst));
    let base = via(&sshd);
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend_from_slice(&["-b", "512K", s(&src), &remote]);
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["verified_bytes"], content.len() as u64, "{j}");
    assert_eq!(fs::read(&dst).unwrap(), content);

    // Pull with -w 2: both streams verify their half.
    let back = dir.path().join("back");
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend_from_slice(&["-w", "2", &remote, s(&back)]);
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["verified_bytes"], content.len() as u64, "{j}");
    assert_eq!(fs::read(&back).unwrap(), content);
}

#[test]
fn verify_over_ssh_reports_a_remote_source_that_changed() {
    let sshd = Sshd::start();
    let (dir, src, _) = setup(40 * M, 5);
    let content = fs::read(&src).unwrap();
    let back = dir.path().join("back");
    let remote = format!("testhost:{}", s(&src));
    let base = via(&sshd);
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend_from_slice(&["-p", "50", &remote, s(&back)]);
    let mut child = spawn(&args);
    wait_written(&back, &content[..M], &mut child);
    let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(b"moved on", 3000).unwrap();
    let out = finish(child);
    // The remote source half found it; the finding crossed the link to this side.
    assert_eq!(code(&out), 13, "{}", stderr(&out));
    assert!(json(&out)["source_changed_bytes"].as_u64().unwrap() >= M as u64);
}
