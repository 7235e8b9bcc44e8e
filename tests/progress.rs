//! Progress that tells the truth: under `--bwlimit` it follows the bytes that crossed
//! (not those compared and queued), and on an 80-column terminal (a real tmux) the bar
//! fits its line.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const M: u64 = 1024 * 1024;

#[test]
fn progress_under_a_bandwidth_limit_follows_what_crossed() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(24 * M as usize, 71)).unwrap();
    let dst = dir.path().join("dst");
    let rsh = sshd.rsh();
    let to = format!("testhost:{}", dst.display());
    let limit = 8 * M;
    let mut child = Command::new(bin())
        .args([
            "-e",
            &rsh,
            "-S",
            bin(),
            "-q",
            "--progress=json",
            "-t",
            "0.2",
        ])
        .args(["--bwlimit", "8M", "-C", "0", "-b", "256K", s(&src), &to])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in err.lines() {
        let line = line.unwrap();
        let at = started.elapsed().as_secs_f64();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        seen.push((at, v));
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(fs::metadata(&dst).unwrap().len(), 24 * M);
    assert!(seen.len() >= 5, "{seen:?}");
    for (at, v) in &seen {
        let done = v["done"].as_u64().unwrap();
        // What crossed by then, plus the pipes and ssh's buffers between (a few MiB);
        // before, 20 MiB showed done in the first second.
        let crossed = (limit as f64 * at) as u64;
        assert!(
            done <= crossed + 5 * M,
            "at {at:.2} s the progress showed {done} bytes done, more than {crossed} could cross: {seen:?}"
        );
        // Its own account agrees: the bytes sent keep up with what it calls done.
        assert!(v["bytes_sent"].as_u64().unwrap() + 5 * M >= done, "{v}");
    }
}

/// A private tmux server, killed when the test ends.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux runs (apt-get install tmux: .ci/run does)")
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn the_bar_fits_an_80_column_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(32 * M as usize, 72)).unwrap();
    let dst = dir.path().join("a-destination-with-a-rather-long-name.img");
    let done = dir.path().join("done");
    let tmux = Tmux {
        socket: format!("bs-{}", std::process::id()),
    };
    // 40 ms a block of 1 MiB: about 1.3 s of bar.
    let script = format!(
        "{} -p 40 {} {}; echo $? > {}; sleep 30",
        bin(),
        s(&src),
        s(&dst),
        s(&done)
    );
    let out = tmux.cmd(&[
        "new-session",
        "-d",
        "-x",
        "80",
        "-y",
        "24",
        "sh",
        "-c",
        &script,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bars = Vec::new();
    wait_until("the run ends", Duration::from_secs(60), || {
        // -J joins lines the terminal wrapped: a line over 80 columns shows as one.
        let pane = tmux.cmd(&["capture-pane", "-p", "-J"]);
        let text = String::from_utf8_lossy(&pane.stdout).to_string();
        if let Some(l) = text.lines().find(|l| l.contains("ETA")) {
            bars.push(l.trim_end().to_string());
        }
        done.exists()
    });
    assert_eq!(fs::read_to_string(&done).unwrap().trim(), "0");
    assert!(!bars.is_empty(), "no bar was drawn");
    for b in &bars {
        assert!(
            b.chars().count() <= 80,
            "the bar is {} columns: {b:?}",
            b.chars().count()
        );
        assert!(b.contains("MiB"), "{b:?}");
    }
}
