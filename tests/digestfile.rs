//! `--digest-file`: the destination's digests, kept on the source's machine, stand in for
//! reading the destination, locally and over ssh; a stale, damaged or foreign file is
//! refused before anything is written; a stopped run leaves a file that is still right.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

const M: usize = 1024 * 1024;

/// Rewrites `n` scattered 4 KiB pieces of `path` (and `content`).
fn change(path: &Path, content: &mut [u8], n: usize, seed: u64) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    let spots = data(n * 8, seed);
    for i in 0..n {
        let at = (u64::from_le_bytes(spots[i * 8..i * 8 + 8].try_into().unwrap())
            % (content.len() as u64 - 4096)) as usize;
        let piece = data(4096, seed + i as u64 + 1);
        content[at..at + 4096].copy_from_slice(&piece);
        f.write_all_at(&piece, at as u64).unwrap();
    }
}

/// Runs with a private state dir (where the destination keeps its sync id).
fn run_state(state: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin())
        .args(args)
        .env("XDG_STATE_HOME", state)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn local_digest_file_skips_reading_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let dig = dir.path().join("dst.digests");
    let mut content = data(24 * M + 100, 1);
    fs::write(&src, &content).unwrap();
    let sync = |extra: &[&str]| {
        let mut a = vec!["-f", "--json", "--digest-file", s(&dig)];
        a.extend_from_slice(extra);
        a.extend_from_slice(&[s(&src), s(&dst)]);
        run_state(&state, &a)
    };

    // First run: no file yet, a normal sync that writes one.
    let out = sync(&[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(dig.exists());
    assert_eq!(fs::read(&dst).unwrap(), content);

    // Next runs read the source only (and a few spot-checked blocks of the destination).
    for round in 0..3 {
        change(&src, &mut content, 10, 10 + round);
        let out = sync(&[]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let j = json(&out);
        assert!(
            j["bytes_read_destination"].as_u64().unwrap() <= 8 * M as u64,
            "{j}"
        );
        assert!(j["blocks_changed"].as_u64().unwrap() >= 1, "{j}");
        assert!(fs::read(&dst).unwrap() == content, "round {round}");
    }

    // The destination replaced behind the file's back: refused, nothing written.
    let other = data(content.len(), 99);
    fs::write(&dst, &other).unwrap();
    let out = sync(&[]);
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--digest-rebuild"),
        "{}",
        stderr(&out)
    );
    assert!(fs::read(&dst).unwrap() == other, "a refused run wrote");
    // Once found stale, never trusted again until rebuilt.
    let out = sync(&[]);
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    let out = sync(&["--digest-rebuild"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == content);

    // The source grows by a partial block, then shrinks: still trusted, still exact.
    for len in [content.len() + 777, content.len() - 5000] {
        content.resize(len, 0x5a);
        fs::write(&src, &content).unwrap();
        let out = sync(&[]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        assert!(fs::read(&dst).unwrap() == content);
    }

    // Rewritten in place with the same bytes by another tool: its change time moved, so
    // the file is not trusted (it cannot know what was written).
    fs::write(&dst, &content).unwrap();
    let out = sync(&[]);
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    let out = sync(&["--digest-rebuild"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    // A sync without the file changes the destination: the file is no longer trusted.
    change(&src, &mut content, 3, 50);
    let plain = run_state(&state, &["-f", "-q", s(&src), s(&dst)]);
    assert_eq!(code(&plain), 0, "{}", stderr(&plain));
    let out = sync(&[]);
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("synced by another run"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn damaged_foreign_or_mismatched_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let dst2 = dir.path().join("dst2");
    let dig = dir.path().join("d");
    fs::write(&src, data(5 * M, 2)).unwrap();
    let out = run_state(&state, &["-q", "--digest-file", s(&dig), s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    fs::copy(&dst, &dst2).unwrap();
    let good = fs::read(&dig).unwrap();

    // For another destination.
    let out = run_state(&state, &["-f", "--digest-file", s(&dig), s(&src), s(&dst2)]);
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    assert!(stderr(&out).contains("describes"), "{}", stderr(&out));
    // Another block size.
    let out = run_state(
        &state,
        &[
            "-f",
            "-b",
            "64K",
            "--digest-file",
            s(&dig),
            s(&src),
            s(&dst),
        ],
    );
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    // Damaged, then truncated.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x10;
    fs::write(&dig, &bad).unwrap();
    let out = run_state(&state, &["-f", "--digest-file", s(&dig), s(&src), s(&dst)]);
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    fs::write(&dig, &good[..good.len() - 7]).unwrap();
    let out = run_state(&state, &["-f", "--digest-file", s(&dig), s(&src), s(&dst)]);
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    // A pull cannot keep it on the source's machine.
    let out = run(&["--digest-file", s(&dig), "somehost:/x", s(&dst)]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[test]
fn an_interrupted_first_copy_and_a_verify_failure_leave_files_the_next_run_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let dig = dir.path().join("d");
    let content = data(40 * M, 9);
    fs::write(&src, &content).unwrap();
    let slow = |extra: &[&str]| {
        let mut a = vec!["-f", "-q", "-p", "50", "--digest-file", s(&dig)];
        a.extend_from_slice(extra);
        a.extend_from_slice(&[s(&src), s(&dst)]);
        std::process::Command::new(bin())
            .args(&a)
            .env("XDG_STATE_HOME", &state)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // A first copy stopped part-way (once it has written its first block): it is
    // under its temporary name, shorter than the source.
    let partial = dir.path().join(".dst.blocksync-partial");
    let mut child = slow(&[]);
    wait_while_running(
        &mut child,
        "the first block is written",
        Duration::from_secs(30),
        || file_holds(&partial, 0, &content[..64 * 1024]),
    );
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(130));
    assert!(fs::metadata(&partial).unwrap().len() < content.len() as u64);
    assert!(
        !dst.exists(),
        "an unfinished copy never has the destination's name"
    );
    let out = run_state(
        &state,
        &["-f", "-q", "--digest-file", s(&dig), s(&src), s(&dst)],
    );
    assert_eq!(code(&out), 0, "resuming: {}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == content);

    // --verify finds a block spoiled behind the sync: the file must not vouch for it.
    let mut next = content.clone();
    next[0] ^= 1;
    fs::write(&src, &next).unwrap();
    let mut child = slow(&["--verify"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut b = [0u8; 1];
        fs::File::open(&dst)
            .unwrap()
            .read_exact_at(&mut b, 0)
            .unwrap();
        if b[0] == next[0] {
            break;
        }
        assert!(child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let f = fs::OpenOptions::new().write(true).open(&dst).unwrap();
    f.write_all_at(b"spoiled", 4096).unwrap();
    f.sync_all().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(9));
    // The next run (no --verify) rewrites the spoiled block.
    let out = run_state(
        &state,
        &["-f", "-q", "--digest-file", s(&dig), s(&src), s(&dst)],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == next);
}

#[test]
fn an_interrupted_run_leaves_a_file_that_is_still_right() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let dig = dir.path().join("d");
    let mut content = data(32 * M, 3);
    fs::write(&src, &content).unwrap();
    let out = run_state(&state, &["-q", "--digest-file", s(&dig), s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Change every block, then stop a slow run part-way with Ctrl-C.
    for b in 0..32 {
        change_block(&src, &mut content, b * M);
    }
    let mut child = std::process::Command::new(bin())
        .args([
            "-f",
            "-q",
            "-p",
            "40",
            "--digest-file",
            s(&dig),
            s(&src),
            s(&dst),
        ])
        .env("XDG_STATE_HOME", &state)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Part-way: once the first changed block is in the destination.
    wait_while_running(
        &mut child,
        "the first changed block is written",
        Duration::from_secs(30),
        || dest_holds(&dst, 0, &content[..1]),
    );
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    // The next run trusts the file, re-sends what the stopped run may have written, and
    // the copy is exact.
    let out = run_state(
        &state,
        &["-f", "--json", "--digest-file", s(&dig), s(&src), s(&dst)],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(json(&out)["bytes_read_destination"].as_u64().unwrap() <= 8 * M as u64);
    assert!(fs::read(&dst).unwrap() == content);
    let out = run_state(&state, &["-f", "--verify", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

fn change_block(path: &Path, content: &mut [u8], at: usize) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    content[at] ^= 0xff;
    f.write_all_at(&content[at..at + 1], at as u64).unwrap();
}

#[test]
fn digest_file_over_ssh_push() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let dig = dir.path().join("d");
    let mut content = data(16 * M + 5, 4);
    fs::write(&src, &content).unwrap();
    let remote = format!("testhost:{}", s(&dst));
    let base = [
        "-e",
        &sshd.rsh(),
        "-S",
        bin(),
        "-f",
        "--json",
        "--digest-file",
        s(&dig),
    ];
    let push = || {
        let mut a = base.to_vec();
        a.extend_from_slice(&[s(&src), &remote]);
        run(&a)
    };
    let out = push();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    change(&src, &mut content, 10, 20);
    let out = push();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    // The remote destination read only its spot-checks and the changed blocks (to narrow
    // them down to their changed pieces), not the whole device.
    let changed = j["blocks_changed"].as_u64().unwrap();
    let read = j["bytes_read_destination"].as_u64().unwrap();
    assert!(read <= (8 + changed) * M as u64, "{j}");
    assert!(changed <= 10, "{j}");
    assert!(fs::read(&dst).unwrap() == content);

    // Replaced on the remote side: refused with the remote named, nothing written.
    let other = data(content.len(), 77);
    fs::write(&dst, &other).unwrap();
    let out = push();
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    assert!(stderr(&out).contains("testhost"), "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == other);
}

/// Makes a file immutable (even root cannot remove it) until dropped.
struct Immutable(std::path::PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// A writing run that cannot forget the destination's sync id must not write: the record
/// would go on vouching for a digest file that no longer describes the destination.
#[test]
fn a_run_that_cannot_forget_the_sync_id_fails_before_writing() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (src, dst, dig) = (
        dir.path().join("src"),
        dir.path().join("dst"),
        dir.path().join("digests"),
    );
    let mut content = data(4 * M, 41);
    fs::write(&src, &content).unwrap();
    let out = run_state(&state, &["-q", "--digest-file", s(&dig), s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let records: Vec<_> = fs::read_dir(state.join("blocksync/sync-ids"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    sh("chattr", &["+i", s(&records[0])]);
    let _guard = Immutable(records[0].clone());

    let before = fs::read(&dst).unwrap();
    change(&src, &mut content, 3, 42);
    let out = run_state(&state, &["-f", "-q", s(&src), s(&dst)]);
    assert_eq!(code(&out), 10, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("sync id") && err.contains(s(&records[0])),
        "{err}"
    );
    assert_eq!(fs::read(&dst).unwrap(), before, "written after all");
}

/// A device destination written by another program since the last run (dd of 4 KiB) is
/// noticed: its write counter moved, so the digest file is refused as stale instead of
/// reporting the block the same. Untouched, the file is trusted run after run.
#[test]
fn a_device_written_behind_the_digest_files_back_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (src, dig) = (dir.path().join("src"), dir.path().join("digests"));
    let mut content = data(8 * M, 81);
    fs::write(&src, &content).unwrap();
    let disk = LoopDev::new(8 * M as u64, &[]);
    let dev = s(&disk.dev);
    let args = [
        "-f",
        "--json",
        "-b",
        "64K",
        "--digest-file",
        s(&dig),
        s(&src),
        dev,
    ];
    let out = run_state(&state, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Trusted while nobody else writes: only the 8 spot-checked blocks are read.
    change(&src, &mut content, 2, 82);
    let out = run_state(&state, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert!(
        j["bytes_read_destination"].as_u64().unwrap() <= 8 * 65536,
        "{j}"
    );
    assert_eq!(disk.read(), content);

    // Another program writes 4 KiB straight to the device.
    sh(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={dev}"),
            "bs=4096",
            "count=1",
            "seek=77",
            "conv=notrunc",
            "status=none",
        ],
    );
    let out = run_state(&state, &args);
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    let mut rebuild = args.to_vec();
    rebuild.insert(0, "--digest-rebuild");
    let out = run_state(&state, &rebuild);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(disk.read(), content, "the rebuild put the block back");
}
