//! A remote side that does not play along: one stopped with SIGSTOP (`--timeout`), fake
//! ones whose error text and stderr carry terminal escape sequences, and `-P`'s password
//! kept out of the environment of the programs blocksync starts.

mod common;

use blocksync::error::Kind;
use blocksync::testing::{Frame, GREETING, ToSource, write_frame};
use common::sshd::{Sshd, TestUser, descendants_named};
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const M: usize = 1024 * 1024;

fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Lets the stopped remote servers go (killed) when the test ends, pass or fail.
struct Unstop<'a>(&'a Sshd);

impl Drop for Unstop<'_> {
    fn drop(&mut self) {
        self.0.signal_remote_servers("KILL");
    }
}

/// Starts a slowed sync from `from` to `to`, stops the remote blocksync with SIGSTOP
/// once the destination (`written`, on this machine) holds `first`, and returns how the
/// run ended and how long after the stop.
fn stop_remote_mid_sync(
    sshd: &Sshd,
    from: &str,
    to: &str,
    written: &Path,
    first: &[u8],
) -> (std::process::Output, Duration) {
    let args = [
        "-e",
        &sshd.rsh(),
        "-S",
        bin(),
        "-f",
        "--timeout",
        "5",
        "-b",
        "64K",
        "-p",
        "20",
        from,
        to,
    ];
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (out, err) = (
        Drain::new(child.stdout.take().unwrap()),
        Drain::new(child.stderr.take().unwrap()),
    );
    wait_while_running(
        &mut child,
        "the first block is written",
        Duration::from_secs(30),
        || dest_holds(written, 0, first),
    );
    let _unstop = Unstop(sshd);
    assert_eq!(sshd.signal_remote_servers("STOP"), 1, "one remote server");
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "still running 30 s after the remote stopped: {}",
                String::from_utf8_lossy(&err.so_far())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = stopped.elapsed();
    let out = std::process::Output {
        status,
        stdout: out.finish(),
        stderr: err.finish(),
    };
    (out, took)
}

#[test]
fn a_stopped_remote_ends_the_run_after_the_timeout() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(32 * M, 151);
    fs::write(&src, &content).unwrap();
    let first = &content[..64 * 1024];
    let dst = dir.path().join("dst");
    let target = format!("testhost:{}", s(&dst));
    let (out, took) = stop_remote_mid_sync(&sshd, s(&src), &target, &dst, first);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let err = stderr(&out);
    assert!(
        err.contains("testhost (remote destination) stalled"),
        "{err}"
    );
    assert!(err.contains("--timeout 5"), "{err}");

    // Pulled: the remote source stops.
    let back = dir.path().join("back");
    let from = format!("testhost:{}", s(&src));
    let (out, took) = stop_remote_mid_sync(&sshd, &from, s(&back), &back, first);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(
        stderr(&out).contains("testhost (remote source) stalled"),
        "{}",
        stderr(&out)
    );
}

/// What a hostile peer writes to make a terminal lie: clear the line, print a green
/// all-clear, set the window title; and a bidirectional override.
const LIES: &str = "\x1b[2K\r\x1b[32mall good, 0 errors\x1b[0m\x1b]0;pwned\x07\u{202e}txt.exe";

fn assert_harmless(out: &std::process::Output, what: &str) {
    assert_eq!(code(out), 11, "{what}: {}", stderr(out));
    assert!(
        !out.stderr.contains(&0x1b),
        "{what}: raw ESC: {}",
        stderr(out)
    );
    assert!(
        !out.stderr.contains(&0x07) && !out.stderr.contains(&b'\r'),
        "{what}"
    );
    assert!(!stderr(out).contains('\u{202e}'), "{what}");
    assert!(
        stderr(out).contains(r"\x1b[32mall good"),
        "{what}: {}",
        stderr(out)
    );
}

#[test]
fn escape_sequences_from_the_peer_reach_the_terminal_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(4096, 152)).unwrap();
    // A fake server that greets, then fails the hello with the lies.
    let said = dir.path().join("said");
    let mut bytes = GREETING.to_vec();
    let failed = ToSource::Failed {
        kind: Kind::Destination,
        message: LIES.into(),
    };
    write_frame(&mut bytes, &Frame::Source(failed)).unwrap();
    fs::write(&said, bytes).unwrap();
    let fake = dir.path().join("fake-server");
    script(&fake, &format!("cat {}", s(&said)));
    let run_fake = |rsh: &Path| {
        let log = dir.path().join("log");
        let out = run_within(
            &[
                "-e",
                s(rsh),
                "-S",
                "/x",
                "-f",
                "-o",
                s(&log),
                s(&src),
                "peer:/dst",
            ],
            60,
        );
        let logged = fs::read(&log).unwrap();
        assert!(!logged.contains(&0x1b), "raw ESC in the -o log");
        out
    };
    let out = run_fake(&fake);
    assert_eq!(code(&out), 4, "the peer's kind is kept: {}", stderr(&out));
    assert!(!out.stderr.contains(&0x1b), "raw ESC: {}", stderr(&out));
    assert!(
        stderr(&out).contains(r"\x1b]0;pwned\x07"),
        "{}",
        stderr(&out)
    );

    // One that prints them on stderr, many lines of it, and never starts: all of it is
    // shown, escaped.
    let noisy = dir.path().join("noisy-server");
    script(
        &noisy,
        &format!("printf 'first line\\n%s\\nlast line\\n' '{LIES}' >&2\nexit 3"),
    );
    let out = run_fake(&noisy);
    assert_harmless(&out, "stderr");
    assert!(stderr(&out).contains("first line"), "{}", stderr(&out));
    // One that prints them where the greeting should be.
    let chatty = dir.path().join("chatty-server");
    script(&chatty, &format!("printf '%s' '{LIES}'"));
    assert_harmless(&run_fake(&chatty), "stdout");
}

#[test]
fn a_password_variable_is_kept_from_ssh() {
    assert!(
        Path::new("/usr/bin/sshpass").exists(),
        "this test needs sshpass: apt-get install sshpass (.ci/run does)"
    );
    let sshd = Sshd::start_with_passwords();
    let user = TestUser::new(&sshd);
    let password = "hunter2-Pw-151";
    user.set_password(password);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(8 * M, 153);
    fs::write(&src, &content).unwrap();
    let dst = user.home.join("copy.img");
    let rsh = format!(
        "{} -o BatchMode=no -o PubkeyAuthentication=no -o PreferredAuthentications=password",
        sshd.rsh()
    );
    let to = user.at(&dst);
    let args = [
        "-e",
        &rsh,
        "-P",
        "BS_TEST_PW",
        "-S",
        bin(),
        "-f",
        "-b",
        "64K",
        "-p",
        "10",
    ];
    let mut child = Command::new(bin())
        .args(args)
        .args([s(&src), &to])
        .env("BS_TEST_PW", password)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = Drain::new(child.stderr.take().unwrap());
    let me = child.id();
    let mut ssh = Vec::new();
    wait_while_running(&mut child, "ssh runs", Duration::from_secs(30), || {
        // ssh itself (sshpass, which holds SSHPASS until it clears it, is its parent).
        ssh = descendants_named(me, "ssh")
            .into_iter()
            .filter(|p| {
                fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default() == "ssh\n"
            })
            .collect();
        !ssh.is_empty() && dest_holds(&dst, 0, &content[..4096])
    });
    for pid in &ssh {
        let env = fs::read(format!("/proc/{pid}/environ")).unwrap();
        let text = String::from_utf8_lossy(&env);
        assert!(!text.contains("BS_TEST_PW"), "the variable reached ssh");
        assert!(!text.contains(password), "the password reached ssh");
    }
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        String::from_utf8_lossy(&err.finish())
    );
    assert_eq!(fs::read(&dst).unwrap(), content);

    // A -P value that names no variable (the password itself, say) is not repeated.
    let log = dir.path().join("log");
    let out = run(&["-P", password, "-o", s(&log), "-f", s(&src), &to]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(!stderr(&out).contains(password), "{}", stderr(&out));
    assert!(!fs::read_to_string(&log).unwrap().contains(password));
}
