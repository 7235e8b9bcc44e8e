//! End-to-end tests over a real sshd on a loopback port: push, pull, both operand forms,
//! awkward paths, remote errors, self-deploy, sudo, a killed peer, a sparse 4 GiB file.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;

const M: usize = 1024 * 1024;

/// blocksync args to reach the test sshd, with the built binary given as the remote one.
fn via(sshd: &Sshd) -> Vec<String> {
    vec![
        "-e".into(),
        sshd.rsh(),
        "-S".into(),
        bin().into(),
        "-f".into(),
        "--json".into(),
    ]
}

fn run_with(base: &[String], rest: &[&str]) -> std::process::Output {
    let mut args: Vec<&str> = base.iter().map(String::as_str).collect();
    args.extend_from_slice(rest);
    run(&args)
}

#[test]
fn push_and_pull_in_both_forms() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(5 * M + 333, 21);
    fs::write(&src, &content).unwrap();

    // Push, blocksync.py form, to a missing destination.
    let dst = dir.path().join("dst");
    let out = run_with(&via(&sshd), &["-b", "64K", s(&src), "testhost", s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    let j = json(&out);
    assert_eq!(j["blocks_changed"], 81);
    assert!(j["bytes_sent"].as_u64().unwrap() > 0);

    // Push again with a few changes, modern form: only the changed blocks cross.
    let mut next = content.clone();
    next[100] ^= 1;
    next[3 * M] ^= 1;
    fs::write(&src, &next).unwrap();
    let target = format!("testhost:{}", s(&dst));
    let out = run_with(&via(&sshd), &["-b", "64K", s(&src), &target]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), next);
    let j = json(&out);
    assert_eq!(j["blocks_changed"], 2);
    // Only the changed 4 KiB pieces of the two 64 KiB blocks crossed.
    assert_eq!(j["bytes_written"], 2 * 4096);

    // Pull, blocksync.py form, into an older copy.
    let back = dir.path().join("back");
    fs::write(&back, &content[..2 * M]).unwrap();
    let out = run_with(&via(&sshd), &["--pull", s(&back), "testhost", s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&back).unwrap(), next);
    let j = json(&out);
    assert_eq!(j["blocks_total"], 6);
    assert_eq!(j["blocks_same"], 1, "{j}");

    // Pull, modern form, to a missing file.
    let fresh = dir.path().join("fresh");
    let out = run_with(&via(&sshd), &[&target, s(&fresh)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&fresh).unwrap(), next);
}

#[test]
fn paths_with_spaces_and_metacharacters() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("my disk; $(touch pwned) 'x'.img");
    let dst = dir.path().join("copy of \"it\" & more.img");
    let content = data(M + 1, 22);
    fs::write(&src, &content).unwrap();
    let target = format!("testhost:{}", s(&dst));
    let out = run_with(&via(&sshd), &[s(&src), &target]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    assert!(!std::path::Path::new("pwned").exists());
}

#[test]
fn remote_errors_are_clear_and_write_nothing() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 23)).unwrap();
    // Missing remote directory.
    let bad = format!("testhost:{}/no/such/dir/dst", s(dir.path()));
    let out = run_with(&via(&sshd), &[s(&src), &bad]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("on testhost") && stderr(&out).contains("does not exist"));
    // Missing remote source, pulled.
    let missing = format!("testhost:{}/missing", s(dir.path()));
    let local = dir.path().join("local");
    let out = run_with(&via(&sshd), &[&missing, s(&local)]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("No such file"), "{}", stderr(&out));
    assert!(!local.exists());
    // Existing remote destination and no -f, no terminal.
    let dst = dir.path().join("dst");
    fs::write(&dst, b"old").unwrap();
    let args = [
        "-e",
        &sshd.rsh(),
        "-S",
        bin(),
        s(&src),
        &format!("testhost:{}", s(&dst)),
    ];
    let out = run(&args);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), b"old");
    // A host that does not answer.
    let out = run(&["-e", &sshd.rsh(), "-f", s(&src), "nosuchhost.invalid:/x"]);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ssh could not connect to nosuchhost.invalid"),
        "{}",
        stderr(&out)
    );
    // A wrong -S path.
    let out = run(&[
        "-e",
        &sshd.rsh(),
        "-S",
        "/nonexistent/blocksync",
        "-f",
        s(&src),
        &bad,
    ]);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(stderr(&out).contains("-S"), "{}", stderr(&out));
}

#[test]
fn deploys_itself_once_and_reuses_the_cache() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(M, 24);
    fs::write(&src, &content).unwrap();
    let target = format!("testhost:{}", s(&dst));
    // No -S: the remote PATH has no blocksync, so --no-deploy fails cleanly...
    let out = run(&["-e", &sshd.rsh(), "--no-deploy", "-f", s(&src), &target]);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(stderr(&out).contains("no blocksync"), "{}", stderr(&out));
    // ...and by default the binary copies itself into the per-user cache.
    let out = run(&["-e", &sshd.rsh(), "-f", s(&src), &target]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    let cache = sshd.cache().join("blocksync");
    let entries: Vec<_> = fs::read_dir(&cache).unwrap().flatten().collect();
    assert_eq!(entries.len(), 1, "one cached binary, no temp files left");
    use std::os::unix::fs::PermissionsExt;
    let mode = entries[0].metadata().unwrap().permissions().mode();
    assert_eq!(
        mode & 0o022,
        0,
        "cached binary must not be group/world writable"
    );
    let stamp = entries[0].metadata().unwrap().modified().unwrap();
    let out = run(&["-e", &sshd.rsh(), "-f", s(&src), &target]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let again = fs::read_dir(&cache).unwrap().flatten().next().unwrap();
    assert_eq!(
        again.metadata().unwrap().modified().unwrap(),
        stamp,
        "redeployed"
    );
}

/// Starts a slowed sync from `from` to `to` through `sshd`, kills the remote blocksync
/// mid-way (once the destination, at `written` on this machine, holds its first block
/// `first`), and returns what the local side printed once it noticed.
fn kill_remote_mid_sync(
    sshd: &Sshd,
    from: &str,
    to: &str,
    written: &std::path::Path,
    first: &[u8],
) -> std::process::Output {
    let mut args = via(sshd);
    args.extend(["-b", "64K", "-p", "20", from, to].map(String::from));
    let mut child = std::process::Command::new(bin())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Generous: ssh logins are slow on a loaded machine.
    wait_while_running(
        &mut child,
        "the first block is written",
        std::time::Duration::from_secs(30),
        || dest_holds(written, 0, first),
    );
    assert_eq!(sshd.kill_remote_servers(), 1, "one remote server to kill");
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed().as_secs() < 15, "took too long to notice");
    out
}

#[test]
fn killed_remote_side_is_an_error_not_a_hang() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(16 * M, 25);
    fs::write(&src, &content).unwrap();
    let first = &content[..64 * 1024];
    let target = format!("testhost:{}", s(&dst));
    let out = kill_remote_mid_sync(&sshd, s(&src), &target, &dst, first);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(stderr(&out).contains("testhost"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));

    // The same in pull mode: the remote source dies.
    let back = dir.path().join("back");
    let from = format!("testhost:{}", s(&src));
    let out = kill_remote_mid_sync(&sshd, &from, s(&back), &back, first);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(stderr(&out).contains("testhost"), "{}", stderr(&out));
}

#[test]
fn sparse_4gib_file_both_ways() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let f = fs::File::create(&src).unwrap();
    f.set_len(4 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&data(M, 26), 3 << 30).unwrap();
    drop(f);
    let dst = dir.path().join("dst");
    let f = fs::File::create(&dst).unwrap();
    f.set_len(4 << 30).unwrap();
    drop(f);
    let out = run_with(&via(&sshd), &[s(&src), &format!("testhost:{}", s(&dst))]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["blocks_changed"], 1);
    let back = dir.path().join("back");
    let f = fs::File::create(&back).unwrap();
    f.set_len(4 << 30).unwrap();
    drop(f);
    let out = run_with(&via(&sshd), &[&format!("testhost:{}", s(&dst)), s(&back)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["blocks_changed"], 1);
    let g = fs::File::open(&back).unwrap();
    let mut buf = vec![0u8; M];
    g.read_exact_at(&mut buf, 3 << 30).unwrap();
    assert_eq!(buf, data(M, 26));
    assert_eq!(g.metadata().unwrap().len(), 4 << 30);
}

#[test]
fn deploys_to_an_account_without_blocksync() {
    let sshd = Sshd::start();
    let user = common::sshd::TestUser::new(&sshd);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(M + 5, 27);
    fs::write(&src, &content).unwrap();
    let dst = user.home.join("copy.img");
    let out = run(&["-e", &sshd.rsh(), "-f", s(&src), &user.at(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    let cached: Vec<_> = fs::read_dir(user.home.join(".cache/blocksync"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(cached.len(), 1);
    use std::os::unix::fs::MetadataExt;
    let meta = cached[0].metadata().unwrap();
    assert_eq!(meta.mode() & 0o077, 0, "cached binary must be private");
    let uid = fs::metadata(&user.home).unwrap().uid();
    assert_eq!(meta.uid(), uid, "owned by the user");
}

#[test]
fn sudo_wanting_a_password_is_said_plainly() {
    let sshd = Sshd::start();
    assert!(
        std::path::Path::new("/usr/bin/sudo").exists(),
        "this test needs sudo: apt-get install sudo (.ci/run does)"
    );
    let user = common::sshd::TestUser::new(&sshd);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 28)).unwrap();
    let dst = user.home.join("copy.img");
    let out = run(&[
        "-e",
        &sshd.rsh(),
        "-s",
        "-S",
        bin(),
        "-f",
        s(&src),
        &user.at(&dst),
    ]);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(stderr(&out).contains("sudo on"), "{}", stderr(&out));
    assert!(stderr(&out).contains("password"), "{}", stderr(&out));
    assert!(!dst.exists());
}

#[test]
fn parallel_streams_cover_the_whole_file() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(37 * M + 4097, 29);
    fs::write(&src, &content).unwrap();
    let dst = dir.path().join("dst");
    let mut old = content.clone();
    for i in (0..old.len()).step_by(5 * M + 17) {
        old[i] ^= 0x5a;
    }
    old.truncate(20 * M);
    fs::write(&dst, &old).unwrap();
    let target = format!("testhost:{}", s(&dst));
    let out = run_with(&via(&sshd), &["-w", "3", s(&src), &target]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    let j = json(&out);
    assert_eq!(j["blocks_total"], 38);
    assert_eq!(
        j["blocks_same"].as_u64().unwrap() + j["blocks_changed"].as_u64().unwrap(),
        38
    );
    // And pulled back with 2 streams over a stale copy.
    let back = dir.path().join("back");
    fs::write(&back, &old).unwrap();
    let out = run_with(&via(&sshd), &["-w", "2", &target, s(&back)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&back).unwrap(), content);
}

/// How many of `path`'s pages are in the page cache (mincore over a mapping).
fn resident_pages(path: &std::path::Path) -> usize {
    let f = fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    use std::os::fd::AsRawFd;
    // SAFETY: a read-only shared mapping of an open file, unmapped before returning;
    // mincore writes one byte per page into `vec`, which holds that many.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::mincore(p, len, vec.as_mut_ptr()), 0);
        libc::munmap(p, len);
    }
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

#[test]
fn large_blocks_are_written_around_the_page_cache() {
    let sshd = Sshd::start();
    // On ext4 of its own (a tmpfs file lives in the page cache whatever we do).
    let fs4 = Mounted::new(LoopDev::new(160 * M as u64, &[]));
    let dir = fs4.dir.path();
    let src = dir.join("src");
    let content = data(16 * M + 4097, 31);
    fs::write(&src, &content).unwrap();

    // Pushed to a new file: the remote side writes whole blocks with O_DIRECT.
    let dst = dir.join("dst");
    let out = run_with(&via(&sshd), &[s(&src), &format!("testhost:{}", s(&dst))]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let (cached, pages) = (resident_pages(&dst), content.len().div_ceil(4096));
    assert!(
        cached * 10 < pages,
        "{cached} of {pages} pages of the copy are cached: it went through the page cache"
    );
    assert_eq!(fs::read(&dst).unwrap(), content);

    // Compressible blocks too: they are unpacked into aligned buffers.
    let text: Vec<u8> = (0..16 * M).map(|i| b"a disk image "[i % 13]).collect();
    let (tsrc, tdst) = (dir.join("text"), dir.join("text.copy"));
    fs::write(&tsrc, &text).unwrap();
    // A level asked for compresses every block, however fast the link looks (the
    // adaptive choice may send some raw on a loaded machine: not what this tests).
    let there = format!("testhost:{}", s(&tdst));
    let out = run_with(&via(&sshd), &["--compress-level", "1", s(&tsrc), &there]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert!(j["bytes_sent"].as_u64().unwrap() < M as u64, "{j}");
    let cached = resident_pages(&tdst);
    assert!(
        cached * 10 < text.len() / 4096,
        "{cached} pages of the text copy are cached"
    );
    assert_eq!(fs::read(&tdst).unwrap(), text);

    // Pulled over an older copy: changed blocks go around the cache on this side too.
    let back = dir.join("back");
    let mut old = content.clone();
    for i in (0..old.len()).step_by(M) {
        old[i] ^= 1;
    }
    fs::write(&back, &old).unwrap();
    let out = run_with(&via(&sshd), &[&format!("testhost:{}", s(&src)), s(&back)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&back).unwrap(), content);

    // Onto a bigger loop device, checked by --verify, which re-reads it from the disk.
    let dev = LoopDev::new(20 * M as u64, &data(20 * M, 32));
    let target = format!("testhost:{}", s(&dev.dev));
    let out = run_with(&via(&sshd), &["--verify", s(&src), &target]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(&dev.read()[..content.len()], &content[..]);
}

/// The summary's counters say what happened: a first push reads the source once, and a
/// re-sync of a sparse file counts its holes as holes, also when they were hashed ahead
/// while ssh logged in.
#[test]
fn counters_tell_what_a_push_read() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(8 * M, 61);
    fs::write(&src, &content).unwrap();
    let dst = dir.path().join("dst");
    let target = format!("testhost:{}", s(&dst));
    let out = run_with(&via(&sshd), &[s(&src), &target]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["bytes_read_source"], 8 * M, "{j}");
    assert_eq!(j["bytes_written"], 8 * M, "{j}");

    // 64 MiB, of which 4 MiB at 16 MiB are data: 60 of the 64 blocks are holes.
    let sparse = dir.path().join("sparse");
    let f = fs::File::create(&sparse).unwrap();
    f.set_len(64 * M as u64).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data(4 * M, 62), 16 * M as u64).unwrap();
    drop(f);
    let copy = format!("testhost:{}", s(&dir.path().join("copy")));
    let out = run_with(&via(&sshd), &[s(&sparse), &copy]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run_with(&via(&sshd), &[s(&sparse), &copy]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let j = json(&out);
    assert_eq!(j["blocks_changed"], 0, "{j}");
    assert_eq!(j["blocks_zero"], 60, "{j}");
    assert_eq!(j["blocks_hole"], 60, "{j}");
    assert_eq!(j["bytes_read_source"], 4 * M, "{j}");
}

/// Ctrl-C in a push: the remote destination flushes what it wrote and says how much,
/// so the summary does not claim nothing was written.
#[test]
fn an_interrupted_push_counts_what_the_remote_wrote() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(16 * M, 63);
    fs::write(&src, &content).unwrap();
    let target = format!("testhost:{}", s(&dst));
    let mut args = via(&sshd);
    args.extend(["-b", "64K", "-p", "5", s(&src), &target].map(String::from));
    let mut child = std::process::Command::new(bin())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = Drain::new(child.stdout.take().unwrap());
    let stderr_pipe = Drain::new(child.stderr.take().unwrap());
    let first = &content[..64 * 1024];
    wait_while_running(
        &mut child,
        "the remote wrote the first block",
        std::time::Duration::from_secs(30),
        || dest_holds(&dst, 0, first),
    );
    // Only blocksync, not ssh: the remote side hears of it through the stream.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    let (out, err) = (stdout.finish(), stderr_pipe.finish());
    let err = String::from_utf8_lossy(&err);
    assert_eq!(status.code(), Some(130), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out).expect("one JSON summary");
    assert_eq!(j["status"], "interrupted", "{j}");
    let written = j["bytes_written"].as_u64().unwrap();
    assert!(
        written >= first.len() as u64 && written < content.len() as u64,
        "{j}"
    );
}

/// Over ssh too, a new destination file gets the source's permission bits, whichever
/// side creates it.
#[test]
fn new_files_over_ssh_get_the_sources_permission_bits() {
    use std::os::unix::fs::PermissionsExt;
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 72)).unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o600)).unwrap();
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let pushed = dir.path().join("pushed");
    let out = run_with(&via(&sshd), &[s(&src), &format!("testhost:{}", s(&pushed))]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(mode(&pushed), 0o600, "push");
    let pulled = dir.path().join("pulled");
    let out = run_with(&via(&sshd), &[&format!("testhost:{}", s(&src)), s(&pulled)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(mode(&pulled), 0o600, "pull");
}

/// A symlink planted at a new destination's path while ssh logs in (after blocksync
/// checked the path) is never followed: the pull refuses, the victim is untouched.
#[test]
fn a_symlink_planted_during_the_login_is_not_followed() {
    use std::os::unix::fs::PermissionsExt;
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 76)).unwrap();
    let victim = dir.path().join("victim.txt");
    fs::write(&victim, b"precious").unwrap();
    let new = dir.path().join("new.img");
    let (started, go) = (dir.path().join("started"), dir.path().join("go"));
    // Holds the login until the test has planted the link.
    let wrapper = dir.path().join("slow-ssh");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ntouch {}\nwhile [ ! -e {} ]; do sleep 0.01; done\nexec {} \"$@\"\n",
            s(&started),
            s(&go),
            sshd.rsh()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let remote = format!("testhost:{}", s(&src));
    let args = ["-e", s(&wrapper), "-S", bin(), "-f", &remote, s(&new)];
    std::thread::scope(|sc| {
        let run = sc.spawn(|| run_within(&args, 60));
        wait_until(
            "blocksync checked the destination and started ssh",
            std::time::Duration::from_secs(30),
            || started.exists() || run.is_finished(),
        );
        std::os::unix::fs::symlink(&victim, &new).unwrap();
        fs::write(&go, b"").unwrap();
        let out = run.join().unwrap();
        assert_eq!(code(&out), 4, "{}", stderr(&out));
        assert!(stderr(&out).contains(s(&new)), "{}", stderr(&out));
    });
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert!(fs::symlink_metadata(&new).unwrap().file_type().is_symlink());
}

/// Parallel streams of one push create a new destination file together.
#[test]
fn parallel_streams_create_a_new_file() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(9 * M + 3, 77);
    fs::write(&src, &content).unwrap();
    let dst = dir.path().join("dst");
    let out = run_with(
        &via(&sshd),
        &["-w", "3", s(&src), &format!("testhost:{}", s(&dst))],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
}
