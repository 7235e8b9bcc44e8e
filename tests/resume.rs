//! Interrupted runs are resumed by running again: many syncs killed at random moments
//! (kill -9 of the local or the remote process, a dropped ssh, Ctrl-C), with the source
//! changing between them, then one run that finishes, and the copy must be exact.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

const M: usize = 1024 * 1024;

/// Rewrites a few random 4 KiB pieces of the source (and its expected content).
fn mutate(rng: &mut Rng, path: &Path, content: &mut [u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below((content.len() - 4096) as u64) as usize;
        let piece = data(4096, rng.next());
        content[at..at + 4096].copy_from_slice(&piece);
        f.write_all_at(&piece, at as u64).unwrap();
    }
}

/// Waits for a killed or interrupted run to end; it must not hang.
fn reap(child: Child, what: &str) -> (i32, String) {
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{what}: took {:?} to end",
        started.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    // Ctrl-C before the handlers are installed (during the ssh login, before anything is
    // written) ends the process by the signal itself: the shell shows 130 all the same.
    use std::os::unix::process::ExitStatusExt;
    let code = match out.status.signal() {
        Some(2) => 130,
        _ => out.status.code().unwrap_or(-1),
    };
    (code, err)
}

#[test]
fn fifty_random_kills_over_ssh_then_an_exact_copy() {
    let sshd = Sshd::start();
    let seed = 0x5eed_0000 ^ std::process::id() as u64;
    eprintln!("seed {seed:#x}");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut content = data(12 * M + 777, 7);
    fs::write(&src, &content).unwrap();
    let pushed = dir.path().join("pushed");
    let pulled = dir.path().join("pulled");
    let remote_src = format!("testhost:{}", s(&src));
    let remote_dst = format!("testhost:{}", s(&pushed));
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["-e", &sshd.rsh(), "-S", bin(), "-f", "-q", "-b", "64K"]
            .iter()
            .map(|x| x.to_string())
            .collect();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let mut kinds = [0u32; 4];
    let mut interrupted = 0;
    for round in 0..50 {
        let push = rng.below(2) == 0;
        let ends: [&str; 2] = if push {
            [s(&src), &remote_dst]
        } else {
            [&remote_src, s(&pulled)]
        };
        // Slowed (3 ms per block, about 0.6 s a pass) so kills land inside a run, also
        // on a machine where ssh logs in fast.
        let mut child = spawn(&base(&["-p", "3", ends[0], ends[1]]));
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(rng.below(700)));
        let how = rng.below(4);
        kinds[how as usize] += 1;
        let what = format!("round {round} (push {push}, kill kind {how})");
        match how {
            0 => signal(pid, "-KILL"), // the local process dies
            1 => {
                // The remote process dies (if it is running yet).
                sshd.kill_remote_servers_now();
                let _ = child.kill();
            }
            2 => {
                // The ssh connection drops.
                for p in children(pid, "ssh") {
                    signal(p, "-KILL");
                }
            }
            _ => signal(pid, "-INT"), // Ctrl-C
        }
        let (code, err) = reap(child, &what);
        // A run may end just before the blow; otherwise the exit code says what happened.
        assert!(
            [0, 10, 11, 12, 130, -1].contains(&code),
            "{what}: exit {code}: {err}"
        );
        if how == 3 && code != 0 {
            assert_eq!(code, 130, "{what}: Ctrl-C must exit 130: {err}");
        }
        interrupted += (code != 0) as u32;
        if rng.below(3) == 0 {
            mutate(&mut rng, &src, &mut content);
        }
    }
    eprintln!(
        "kills by kind (local, remote, ssh, ctrl-c): {kinds:?}; {interrupted} runs cut short"
    );
    // Most blows must land inside a run, or the test proves little.
    assert!(
        interrupted >= 35,
        "only {interrupted} of 50 runs were cut short"
    );
    // Leftover remote processes from kills would hold nothing, but must not linger.
    std::thread::sleep(Duration::from_millis(200));
    sshd.kill_remote_servers_now();

    for (from, to, local) in [
        (s(&src), remote_dst.as_str(), &pushed),
        (remote_src.as_str(), s(&pulled), &pulled),
    ] {
        let out = run(&base(&["--verify", from, to])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>());
        assert_eq!(code(&out), 0, "final run: {}", stderr(&out));
        assert!(
            fs::read(local).unwrap() == content,
            "{} differs from the source after the final run",
            local.display()
        );
    }
}

#[test]
fn local_runs_killed_at_random_then_completed() {
    let seed = 0x10ca_1000 ^ std::process::id() as u64;
    eprintln!("seed {seed:#x}");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let mut content = data(16 * M, 8);
    fs::write(&src, &content).unwrap();
    for round in 0..20 {
        let args: Vec<String> = ["-f", "-q", "-b", "64K", "-p", "1", s(&src), s(&dst)]
            .iter()
            .map(|x| x.to_string())
            .collect();
        let mut child = spawn(&args);
        let pid = child.id();
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        let ctrl_c = rng.below(2) == 0;
        signal(pid, if ctrl_c { "-INT" } else { "-KILL" });
        let _ = child.kill();
        let (code, err) = reap(child, &format!("round {round}"));
        assert!(
            [0, 130, -1].contains(&code),
            "round {round}: exit {code}: {err}"
        );
        if rng.below(2) == 0 {
            mutate(&mut rng, &src, &mut content);
        }
    }
    let out = run(&["-f", "--verify", s(&src), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == content, "copy differs");
}
