//! End-to-end tests of local syncs: the built binary on real files and loop devices.

mod common;

use common::*;
use std::fs;

const K: usize = 1024;
const M: usize = 1024 * 1024;

#[test]
fn new_destination_file_odd_size() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(3 * M + 123, 1);
    fs::write(&src, &content).unwrap();
    let out = run(&["--json", "-b", "64K", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    let j = json(&out);
    assert_eq!(j["destination_created"], true);
    assert_eq!(j["blocks_total"], 49);
    assert_eq!(j["blocks_changed"], 49);
    assert_eq!(j["bytes_written"], content.len());
}

#[test]
fn only_changed_blocks_are_written_and_second_run_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(10 * M + 5, 2);
    let mut old = content.clone();
    // One change in block 0, one straddling blocks 3 and 4, one in the partial last block.
    old[10] ^= 1;
    old[4 * M - 2] ^= 1;
    old[4 * M + 1] ^= 1;
    old[10 * M + 4] ^= 1;
    fs::write(&src, &content).unwrap();
    fs::write(&dst, &old).unwrap();
    let out = run(&["-f", "--json", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    let j = json(&out);
    assert_eq!(j["blocks_changed"], 4);
    assert_eq!(j["blocks_same"], 7);
    // Only the changed 4 KiB pieces (and the 5-byte tail) are written.
    assert_eq!(j["bytes_written"], 3 * 4096 + 5);
    // Without refinement, whole blocks.
    fs::write(&dst, &old).unwrap();
    let out = run(&["-f", "--json", "--no-refine", s(&src), s(&dst)]);
    assert_eq!(fs::read(&dst).unwrap(), content);
    assert_eq!(json(&out)["bytes_written"], 3 * M + 5);
    let out = run(&["-f", "--json", s(&src), s(&dst)]);
    let j = json(&out);
    assert_eq!(j["blocks_changed"], 0);
    assert_eq!(j["bytes_written"], 0);
}

#[test]
fn larger_destination_file_is_cut_to_source_size() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(M + 7, 3);
    fs::write(&src, &content).unwrap();
    fs::write(&dst, data(5 * M, 4)).unwrap();
    let out = run(&["-f", "--json", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    assert_eq!(json(&out)["destination_truncated_from"], 5 * M);
}

#[test]
fn smaller_destination_file_grows() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(2 * M + 100, 5);
    fs::write(&src, &content).unwrap();
    fs::write(&dst, &content[..M / 2 + 3]).unwrap();
    let out = run(&["-f", "--json", "-b", "4K", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    // Blocks wholly inside the old destination were already equal.
    assert_eq!(json(&out)["blocks_same"], (M / 2) / (4 * K));
}

#[test]
fn empty_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    fs::write(&src, b"").unwrap();
    fs::write(&dst, b"old").unwrap();
    let out = run(&["-f", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), b"");
}

#[test]
fn dry_run_writes_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(2 * M, 6);
    fs::write(&src, &content).unwrap();
    let out = run(&["-n", "--json", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!dst.exists(), "dry run created the destination");
    assert_eq!(json(&out)["blocks_changed"], 2);
    let mut old = content.clone();
    old[M + 1] ^= 0xff;
    fs::write(&dst, &old).unwrap();
    let out = run(&["--dry-run", "--json", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        fs::read(&dst).unwrap(),
        old,
        "dry run changed the destination"
    );
    let j = json(&out);
    assert_eq!(j["status"], "dry-run");
    assert_eq!(j["blocks_changed"], 1);
    assert_eq!(j["bytes_changed"], 4096);
    assert_eq!(j["bytes_written"], 0);
}

#[test]
fn blocksync_py_form_with_localhost() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(M + 1, 7);
    fs::write(&src, &content).unwrap();
    let out = run(&["-b", "65536", s(&src), "localhost", s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
}

#[test]
fn text_summary_and_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let log = dir.path().join("log");
    fs::write(&src, data(M, 8)).unwrap();
    fs::write(&log, "earlier\n").unwrap();
    let out = run(&["-o", s(&log), "-c", "aes128-ctr", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 blocks of 1.00 MiB: 0 same, 1 changed"),
        "{text}"
    );
    assert!(
        stderr(&out).contains("-c/--cipher applies to ssh"),
        "{}",
        stderr(&out)
    );
    let logged = fs::read_to_string(&log).unwrap();
    assert!(
        logged.starts_with("earlier\n"),
        "log was not appended: {logged}"
    );
    assert!(logged.contains("0 same, 1 changed"), "{logged}");
    // -q prints nothing on success.
    let out = run(&["-q", "-f", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0);
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
}

/// Asserts a refusal: exit code, a message naming `needle`, and `dst` untouched.
fn refused(args: &[&str], exit: i32, needle: &str) -> String {
    let out = run(args);
    let err = stderr(&out);
    assert_eq!(code(&out), exit, "args {args:?}: {err}");
    assert!(
        err.contains(needle),
        "args {args:?}: {err:?} lacks {needle:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    err
}

#[test]
fn refusals_leave_destination_alone() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    fs::write(&src, data(M, 9)).unwrap();
    let old = data(M, 10);
    fs::write(&dst, &old).unwrap();
    let missing = dir.path().join("missing");
    refused(&["-f", s(&missing), s(&dst)], 3, "missing: No such file");
    refused(&["-f", s(dir.path()), s(&dst)], 3, "is a directory");
    refused(&["-f", s(&src), s(dir.path())], 4, "is a directory");
    let deep = dir.path().join("no/such/dir/dst");
    refused(&["-f", s(&src), s(&deep)], 4, "does not exist");
    refused(&["-f", s(&src), s(&src)], 7, "same data");
    let link = dir.path().join("link");
    fs::hard_link(&src, &link).unwrap();
    refused(&["-f", s(&src), s(&link)], 7, "same data");
    refused(&["-f", "-b", "0", s(&src), s(&dst)], 2, "block size 0");
    refused(&["-f", "-b", "1G", s(&src), s(&dst)], 2, "block size 1G");
    refused(&["-f", "-1", "crc32", s(&src), s(&dst)], 2, "unknown hash");
    refused(&[s(&src), s(&dst)], 8, "pass -f");
    refused(&["-f", s(&src), "backup"], 2, "could be a host");
    refused(&["-f", s(&src), "localhost"], 2, "onto itself");
    refused(&["-f", s(&src), "h:/x"], 11, "ssh");
    assert_eq!(fs::read(&dst).unwrap(), old);
    assert!(!deep.exists());
}

#[test]
fn json_error_object() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let out = run(&["--json", s(&missing), s(&dir.path().join("d"))]);
    assert_eq!(code(&out), 3);
    let j = json(&out);
    assert_eq!(j["status"], "error");
    assert_eq!(j["exit_code"], 3);
}

#[test]
fn help_lists_examples_and_exit_codes() {
    let out = run(&["--help"]);
    assert_eq!(code(&out), 0);
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "Examples:",
        "Exit codes:",
        "--pull",
        "--blocksize",
        "--dry-run",
        "-1, --hash",
    ] {
        assert!(text.contains(needle), "help lacks {needle}");
    }
}

/// The harness itself: `run_within` reads a child's output while it runs, so more than a
/// pipe holds (64 KiB) neither blocks the child nor looks like a hang, and it still
/// kills one that does hang.
#[test]
fn run_within_takes_long_output_and_kills_a_hang() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        "head -c 1000000 /dev/zero; head -c 300000 /dev/zero >&2; exit 3",
    ]);
    let out = output_within(&mut cmd, "sh", 30);
    assert_eq!(code(&out), 3);
    assert_eq!((out.stdout.len(), out.stderr.len()), (1_000_000, 300_000));
    let hang = std::panic::catch_unwind(|| {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "echo started >&2; exec sleep 600"]);
        output_within(&mut cmd, "sleeper", 1)
    });
    let msg = *hang
        .expect_err("a hang must fail")
        .downcast::<String>()
        .unwrap();
    assert!(msg.contains("sleeper hung for 1 s: started"), "{msg}");
}

#[test]
fn interrupt_flushes_and_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let content = data(8 * M, 11);
    fs::write(&src, &content).unwrap();
    // -p slows the run to 20 ms a block (2.5 s in all) so the signal lands mid-sync:
    // once the first block is in the destination.
    let mut child = std::process::Command::new(bin())
        .args(["-b", "64K", "-p", "20", "--json", s(&src), s(&dst)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_while_running(
        &mut child,
        "the first block is written",
        std::time::Duration::from_secs(30),
        || dest_holds(&dst, 0, &content[..64 * 1024]),
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(code(&out), 130, "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    let first = String::from_utf8_lossy(&out.stdout);
    let line = first.lines().next().expect("summary before the error");
    let j: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(j["status"], "interrupted");
    let partial = j["blocks_changed"].as_u64().unwrap();
    assert!(partial > 0 && partial < 128, "{partial}");
    let out = run(&["-f", "--json", "-b", "64K", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    assert_eq!(json(&out)["blocks_same"].as_u64().unwrap(), partial);
}

#[test]
fn file_to_larger_device_keeps_tail() {
    let content = data(3 * M + 517, 12);
    let tail = data(M, 13);
    let mut initial = vec![0u8; 4 * M];
    initial.extend_from_slice(&tail);
    let dev = LoopDev::new(5 * M as u64, &initial);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, &content).unwrap();
    let out = run(&["-f", "--json", s(&src), s(&dev.dev)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let now = dev.read();
    assert_eq!(&now[..content.len()], &content[..]);
    assert_eq!(&now[4 * M..], &tail[..], "device tail changed");
    assert_eq!(now.len(), 5 * M);
    assert_eq!(json(&out)["destination_tail_kept"], 5 * M - content.len());
}

#[test]
fn device_to_file_and_device_to_device() {
    let content = data(2 * M, 14);
    let a = LoopDev::new(2 * M as u64, &content);
    let b = LoopDev::new(2 * M as u64, &data(2 * M, 15));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("img");
    let out = run(&["-f", s(&a.dev), s(&file)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&file).unwrap(), content);
    let out = run(&["-f", "--json", "-b", "4K", s(&a.dev), s(&b.dev)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(b.read(), content);
    // The same device twice, and a loop device over the destination file, are refused.
    refused(&["-f", s(&a.dev), s(&a.dev)], 7, "same data");
    refused(&["-f", s(&a.dev), s(&a.backing)], 7, "same data");
}

#[test]
fn device_too_small_is_refused() {
    let dev = LoopDev::new(M as u64, &data(M, 16));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M + 1, 17)).unwrap();
    let before = dev.read();
    refused(&["-f", s(&src), s(&dev.dev)], 5, "less than the");
    assert_eq!(dev.read(), before);
}

#[test]
fn mounted_device_is_refused() {
    let m = Mounted::new(LoopDev::new(8 * M as u64, &[]));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 18)).unwrap();
    let before = m.dev.read();
    refused(&["-f", s(&src), s(&m.dev.dev)], 6, "is mounted on");
    assert_eq!(m.dev.read(), before);
}

#[test]
fn swap_device_is_refused() {
    let dev = LoopDev::new(16 * M as u64, &[]);
    let mk = std::process::Command::new("mkswap")
        .arg(&dev.dev)
        .output()
        .unwrap();
    assert!(
        mk.status.success(),
        "mkswap: {}",
        String::from_utf8_lossy(&mk.stderr)
    );
    let on = std::process::Command::new("swapon")
        .arg(&dev.dev)
        .output()
        .unwrap();
    assert!(
        on.status.success(),
        "swapon: {}",
        String::from_utf8_lossy(&on.stderr)
    );
    struct SwapOff<'a>(&'a std::path::Path);
    impl Drop for SwapOff<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("swapoff").arg(self.0).output();
        }
    }
    let _off = SwapOff(&dev.dev);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 19)).unwrap();
    refused(&["-f", s(&src), s(&dev.dev)], 6, "swap");
}

#[test]
fn force_mounted_skips_the_in_use_check() {
    let m = Mounted::new(LoopDev::new(8 * M as u64, &[]));
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 20)).unwrap();
    let before = m.dev.read();
    // A dry run, so the mounted filesystem is not damaged.
    let out = run(&["-n", "--force-mounted", "--json", s(&src), s(&m.dev.dev)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["blocks_changed"], 1);
    assert_eq!(m.dev.read(), before);
}

/// A summary nobody can read (`| true`, `> /dev/full`) does not undo a good sync: the
/// sync's outcome decides the exit code, and no panic.
#[test]
fn a_closed_or_full_stdout_does_not_fail_a_good_sync() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(2 * M + 7, 31);
    fs::write(&src, &content).unwrap();
    for (i, json) in [false, true].into_iter().enumerate() {
        let closed = dir.path().join(format!("closed{i}"));
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader); // every write to the pipe now fails with EPIPE
        let mut args = vec!["-f", s(&src), s(&closed)];
        if json {
            args.insert(0, "--json");
        }
        let out = std::process::Command::new(bin())
            .args(&args)
            .stdout(writer)
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "json {json}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
        assert_eq!(fs::read(&closed).unwrap(), content);

        let full = dir.path().join(format!("full{i}"));
        let mut args = vec!["-f", s(&src), s(&full)];
        if json {
            args.insert(0, "--json");
        }
        let out = std::process::Command::new(bin())
            .args(&args)
            .stdout(fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "json {json}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{err}");
        assert!(err.contains("could not write the summary"), "{err}");
        assert_eq!(fs::read(&full).unwrap(), content);
    }
}

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A new destination file is no more readable than its source: the source file's
/// permission bits (never setuid/setgid), owner-only for a copy of a device.
#[test]
fn a_new_destination_file_gets_the_sources_permission_bits() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let content = data(M + 5, 71);
    for (i, mode) in [0o600, 0o640, 0o4755].into_iter().enumerate() {
        let src = dir.path().join(format!("src{i}"));
        fs::write(&src, &content).unwrap();
        fs::set_permissions(&src, fs::Permissions::from_mode(mode)).unwrap();
        let dst = dir.path().join(format!("dst{i}"));
        let out = run(&["-q", s(&src), s(&dst)]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        // The test runs with the usual umask 022, which leaves these bits alone.
        assert_eq!(mode_of(&dst), mode & 0o777, "source mode {mode:o}");
    }
    let disk = LoopDev::new(M as u64, &content[..M]);
    let copy = dir.path().join("disk.img");
    let out = run(&["-q", s(&disk.dev), s(&copy)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(mode_of(&copy), 0o600, "a copy of a device");
}

/// An image file that backs a mounted loop device is refused like the mounted device:
/// writing under a mounted filesystem would damage it. A loop device nobody uses is fine.
#[test]
fn a_file_backing_a_mounted_loop_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(8 * M, 73)).unwrap();
    let mounted = Mounted::new(LoopDev::new(8 * M as u64, &[]));
    let image = mounted.dev.backing.clone();
    let before = fs::read(&image).unwrap();
    let out = run(&["-f", s(&src), s(&image)]);
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("backs loop device") && err.contains("mounted"),
        "{err}"
    );
    assert!(err.contains(s(&image)), "{err}");
    assert!(fs::read(&image).unwrap() == before, "the image was written");

    // Bound to a loop device but not mounted: nothing uses it, the sync goes ahead.
    let idle = LoopDev::new(8 * M as u64, &[]);
    let out = run(&["-f", s(&src), s(&idle.backing)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&idle.backing).unwrap(), fs::read(&src).unwrap());
}

/// A destination given as a symlink is resolved once: its target is checked and synced,
/// the link left as it is; a dangling one is refused, and nothing is created.
#[test]
fn destination_symlinks_are_resolved_once_and_dangling_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(M + 9, 74);
    fs::write(&src, &content).unwrap();
    let real = dir.path().join("real.img");
    fs::write(&real, data(M, 75)).unwrap();
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let out = run(&["-f", "-q", s(&src), s(&link)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&real).unwrap(), content);
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    let dangling = dir.path().join("dangling.img");
    let nowhere = dir.path().join("nowhere.img");
    std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
    let out = run(&["-f", "-q", s(&src), s(&dangling)]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("symlink"), "{}", stderr(&out));
    assert!(!nowhere.exists(), "the link's target was created");
}
