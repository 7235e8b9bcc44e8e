//! The last good copy survives any interruption. Runs onto an existing destination keep
//! an undo journal; each is killed at a random moment (kill -9 of the local process, of
//! the remote server, of ssh; locally, in a push and a pull, with one or two streams),
//! and then either rolled back, which must give the destination exactly as it was
//! before the run, or run again, which must give the source. Never a mix.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const M: usize = 1024 * 1024;

/// Where a round syncs: local, push or pull, and with how many streams.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Local,
    Push(u32),
    Pull(u32),
}

/// One round's files: the source, the destination and what it held before.
struct Round {
    src: PathBuf,
    dst: PathBuf,
    before: Vec<u8>,
    after: Vec<u8>,
}

impl Round {
    /// A source and a destination that differ in about half of their 64 KiB blocks,
    /// the source sometimes shorter (the run then cuts the destination) or longer.
    fn new(dir: &Path, rng: &mut Rng) -> Round {
        let (src, dst) = (dir.join("src"), dir.join("dst"));
        let before = data(4 * M, rng.next());
        let mut after = before.clone();
        for b in 0..after.len() / (64 << 10) {
            if rng.below(2) == 0 {
                let at = b * (64 << 10);
                after[at..at + (64 << 10)].copy_from_slice(&data(64 << 10, rng.next()));
            }
        }
        match rng.below(4) {
            0 => after.truncate(3 * M + 4096),
            1 => after.extend_from_slice(&data(M, rng.next())),
            _ => {}
        }
        fs::write(&src, &after).unwrap();
        fs::write(&dst, &before).unwrap();
        Round {
            src,
            dst,
            before,
            after,
        }
    }

    /// Undo journals left beside the destination.
    fn journals(&self) -> usize {
        let name = self.dst.file_name().unwrap().to_string_lossy().into_owned();
        fs::read_dir(self.dst.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".{name}.blocksync-undo."))
            })
            .count()
    }
}

/// The words of a run (or, with `rollback`, of the rollback) in `mode`.
fn words(sshd: Option<&Sshd>, mode: Mode, r: &Round, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["-f".into(), "-q".into(), "-b".into(), "64K".into()];
    if let Some(sshd) = sshd {
        v.extend(["-e".into(), sshd.rsh(), "-S".into(), bin().into()]);
    }
    v.extend(extra.iter().map(|x| x.to_string()));
    let (src, dst) = (s(&r.src).to_string(), s(&r.dst).to_string());
    let there = |p: &str| format!("testhost:{p}");
    match mode {
        Mode::Local => v.extend([src, dst]),
        Mode::Push(w) => v.extend(["-w".into(), w.to_string(), src, there(&dst)]),
        Mode::Pull(w) => v.extend(["-w".into(), w.to_string(), there(&src), dst]),
    }
    v
}

/// Waits until nothing holds the destination (a server killed through its ssh ends
/// on its own).
fn wait_released(dst: &Path) {
    wait_until(
        "no process holds the destination",
        Duration::from_secs(30),
        || lock_holders(dst).is_empty(),
    );
}

/// Kills the run in `mode` as `how` says: 0 the local process, 1 the remote server(s),
/// 2 ssh.
fn blow(mode: Mode, how: u64, child: &mut std::process::Child, r: &Round, sshd: Option<&Sshd>) {
    let pid = child.id();
    match (mode, how) {
        (Mode::Local, _) | (_, 0) => signal(pid, "-KILL"),
        (_, 1) => {
            if let Some(sshd) = sshd {
                sshd.kill_remote_servers_now();
            }
            // A push's servers hold the destination.
            for p in lock_holders(&r.dst) {
                if p != pid {
                    signal(p, "-KILL");
                }
            }
        }
        _ => {
            for p in children(pid, "ssh") {
                signal(p, "-KILL");
            }
        }
    }
}

/// Waits for a killed run to end; it must not hang (its stderr then says why).
fn reap_within(mut child: std::process::Child, what: &str, secs: u64) -> std::process::Output {
    let err = Drain::new(child.stderr.take().expect("piped stderr"));
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return std::process::Output {
                status,
                stdout: Vec::new(),
                stderr: err.finish(),
            };
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: the run hung after the blow: {}",
                String::from_utf8_lossy(&err.so_far())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Counts of what the rounds saw, to show the kills landed inside runs.
#[derive(Debug, Default)]
struct Tally {
    cut_short: u32,
    rolled_back: u32,
    finished: u32,
}

/// One round: start, kill at a random moment, then roll back or run again.
fn round(sshd: Option<&Sshd>, mode: Mode, dir: &Path, rng: &mut Rng, tally: &mut Tally) {
    let r = Round::new(dir, rng);
    let what = format!("{mode:?}");
    let mut child = spawn(&words(sshd, mode, &r, &["--journal", "-p", "8"]));
    // Late enough to be past the ssh login, early enough to land inside the run.
    let delay = match mode {
        Mode::Local => rng.below(450),
        _ => 200 + rng.below(900),
    };
    std::thread::sleep(Duration::from_millis(delay));
    let how = rng.below(3);
    blow(mode, how, &mut child, &r, sshd);
    let out = reap_within(child, &what, 30);
    let cut = !out.status.success();
    tally.cut_short += cut as u32;
    wait_released(&r.dst);
    let what = format!(
        "{what} kill {how} (exit {:?}: {})",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // Until one rollback has restored a journaled run, roll back; then either, at
    // random (the coin alone could leave none of 14 rounds rolled back).
    if tally.rolled_back == 0 || rng.below(2) == 0 {
        // Roll back: the destination as it was, exactly; with no journal (the run
        // completed, or died before writing), it is either the old or the new copy.
        let remote = matches!(mode, Mode::Push(_));
        let mut w = words(sshd, if remote { mode } else { Mode::Local }, &r, &[]);
        let dst = w.pop().unwrap();
        w.pop(); // the source
        // "-w N" goes too: a rollback has no streams.
        if let Some(at) = w.iter().position(|x| x == "-w") {
            w.drain(at..at + 2);
        }
        let mut args = vec!["rollback".to_string()];
        args.extend(w);
        args.push(dst);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_within(&args, 60);
        let now = fs::read(&r.dst).unwrap();
        match code(&out) {
            0 => {
                assert!(
                    now == r.before,
                    "{what}: the rollback did not restore the old copy"
                );
                tally.rolled_back += 1;
            }
            17 => {
                assert!(
                    stderr(&out).contains("no undo journal"),
                    "{what}: {}",
                    stderr(&out)
                );
                assert!(
                    now == r.before || now == r.after,
                    "{what}: no journal, and the destination is a mix of old and new"
                );
            }
            c => panic!("{what}: rollback exit {c}: {}", stderr(&out)),
        }
    } else {
        let args = words(sshd, mode, &r, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_within(&args, 60);
        assert_eq!(code(&out), 0, "{what}: the rerun: {}", stderr(&out));
        assert!(
            fs::read(&r.dst).unwrap() == r.after,
            "{what}: the rerun left another copy"
        );
        tally.finished += 1;
    }
    assert_eq!(
        r.journals(),
        0,
        "{what}: journals left after the rollback or rerun"
    );
}

fn rounds(sshd: Option<&Sshd>, modes: &[Mode], n: u32, seed: u64) {
    let seed = seed ^ std::process::id() as u64;
    eprintln!("seed {seed:#x}");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let mut tally = Tally::default();
    for i in 0..n {
        let mode = modes[i as usize % modes.len()];
        round(sshd, mode, dir.path(), &mut rng, &mut tally);
    }
    eprintln!("{tally:?}");
    // Most blows must land inside a run, or the test proves little.
    assert!(
        tally.cut_short * 2 >= n,
        "only {} of {n} runs were cut short",
        tally.cut_short
    );
    assert!(tally.rolled_back >= 1 && tally.finished >= 1, "{tally:?}");
}

#[test]
fn local_runs_killed_then_rolled_back_or_finished() {
    rounds(None, &[Mode::Local], 22, 0x10ca1);
}

#[test]
fn pushes_killed_then_rolled_back_or_finished() {
    let sshd = Sshd::start();
    rounds(Some(&sshd), &[Mode::Push(1), Mode::Push(2)], 14, 0x9054);
}

#[test]
fn pulls_killed_then_rolled_back_or_finished() {
    let sshd = Sshd::start();
    rounds(Some(&sshd), &[Mode::Pull(1), Mode::Pull(2)], 14, 0x9011);
}

/// A first copy killed midway leaves no file under the destination's name, only its
/// temporary one; the next run resumes into it (what it holds is not sent again) and
/// gives it the name once complete. Locally, in a push and in a pull, with one stream
/// and with two (the last to complete renames it).
#[test]
fn an_interrupted_first_copy_never_looks_finished() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(8 * M, 77);
    fs::write(&src, &content).unwrap();
    let modes = [
        Mode::Local,
        Mode::Push(1),
        Mode::Pull(1),
        Mode::Push(2),
        Mode::Pull(2),
    ];
    for (i, mode) in modes.into_iter().enumerate() {
        let dst = dir.path().join(format!("new{i}"));
        let partial = dir.path().join(format!(".new{i}.blocksync-partial"));
        let r = Round {
            src: src.clone(),
            dst: dst.clone(),
            before: Vec::new(),
            after: content.clone(),
        };
        let remote = (mode != Mode::Local).then_some(&sshd);
        let mut child = spawn(&words(remote, mode, &r, &["-p", "20"]));
        // Half written (by 64 KiB blocks, 20 ms each: ~2.5 s in all).
        wait_while_running(
            &mut child,
            "the copy is half written",
            Duration::from_secs(30),
            || {
                fs::metadata(&partial).is_ok_and(|m| m.len() > 0)
                    && file_holds(&partial, 3 * M as u64, &content[3 * M..3 * M + 4096])
            },
        );
        signal(child.id(), "-KILL");
        let _ = child.wait();
        wait_released(&partial);
        assert!(
            !dst.exists(),
            "{mode:?}: a killed first copy left {}",
            dst.display()
        );
        let args = words(remote, mode, &r, &["--json"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_within(&args, 60);
        assert_eq!(code(&out), 0, "{mode:?}: {}", stderr(&out));
        assert!(fs::read(&dst).unwrap() == content, "{mode:?}");
        assert!(!partial.exists(), "{mode:?}: the temporary name is gone");
        let left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!(".new{i}.")))
            .collect();
        assert!(left.is_empty(), "{mode:?}: left beside it: {left:?}");
        let j = json(&out);
        assert_eq!(j["destination_created"], true, "{mode:?}: {j}");
        assert!(
            j["blocks_same"].as_u64().unwrap() >= 48,
            "{mode:?}: resumed, not redone: {j}"
        );
    }
}

/// The confirmation says whether there is a way back: none for a destination no run
/// completed onto (unless --journal), the journal once one did.
#[test]
fn the_confirmation_says_whether_there_is_a_way_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    fs::write(&src, data(M, 1)).unwrap();
    fs::write(&dst, data(M, 2)).unwrap();
    let ask = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(extra)
            .args([s(&src), s(&dst)])
            .env("XDG_STATE_HOME", &state);
        output_within(&mut cmd, "blocksync", 60)
    };
    let out = ask(&[]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("There is no way back: pass --journal"),
        "{}",
        stderr(&out)
    );
    let out = ask(&["--journal"]);
    assert!(
        stderr(&out).contains("kept in an undo journal"),
        "{}",
        stderr(&out)
    );
    assert_eq!(code(&ask(&["-f"])), 0);
    // Completed once: journaled from now on, and the question says so.
    fs::write(&src, data(M, 3)).unwrap();
    let out = ask(&[]);
    assert!(
        stderr(&out).contains("kept in an undo journal"),
        "{}",
        stderr(&out)
    );
    let out = ask(&["--no-journal"]);
    assert!(stderr(&out).contains("no way back"), "{}", stderr(&out));
}

/// A journal never fills its filesystem: the run stops (exit 17) before overwriting more,
/// the destination can be rolled back, and a journal kept elsewhere lets the run finish.
#[test]
fn a_journal_with_no_room_stops_the_run_and_the_copy_stays_recoverable() {
    let fs4 = Mounted::new(LoopDev::new(32 * M as u64, &[]));
    let dir = fs4.dir.path();
    let (src, dst) = (dir.join("src.img"), dir.join("dst.img"));
    let before = data(22 * M, 4);
    fs::write(&dst, &before).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    // The source on another filesystem: the destination's has room for little else.
    let src = elsewhere.path().join(src.file_name().unwrap());
    let after = data(22 * M, 5);
    fs::write(&src, &after).unwrap();
    let out = run_within(&["-f", "--journal", "-b", "64K", s(&src), s(&dst)], 60);
    assert_eq!(code(&out), 17, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("would fill its filesystem")
            && err.contains("--journal-dir")
            && err.contains("--no-journal"),
        "{err}"
    );
    // Whatever it overwrote before it stopped is in the journal.
    let out = run_within(&["rollback", "-f", s(&dst)], 60);
    assert!(matches!(code(&out), 0 | 17), "{}", stderr(&out));
    assert!(
        fs::read(&dst).unwrap() == before,
        "rolled back to the old copy"
    );
    let jdir = elsewhere.path().join("journals");
    fs::create_dir(&jdir).unwrap();
    let out = run_within(
        &[
            "-f",
            "--journal",
            "--journal-dir",
            s(&jdir),
            "--json",
            s(&src),
            s(&dst),
        ],
        60,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == after);
    assert!(json(&out)["journal_bytes"].as_u64().unwrap() >= 22 * M as u64);
    assert_eq!(
        fs::read_dir(&jdir).unwrap().count(),
        0,
        "removed once complete"
    );
}

/// Power lost in the middle of a run, on a disk (the FUSE disk of tests/common) that
/// loses everything written since the last fsync (blocksync's write-back hints reach it
/// as fsyncs, so what is lost is what was written since the last of them): the
/// destination holds a mix of the old copy and the writes that were kept. Rolled back,
/// it is the old copy exactly; run again, the source. The journal is on another
/// filesystem here (the FUSE disk holds one file); torn journal groups are tested in
/// src/journal/tests.rs.
#[test]
fn a_power_cut_midway_rolls_back_or_finishes() {
    use common::faultyfs::FaultyFs;
    let size = 8 * M as u64;
    let work = tempfile::tempdir().unwrap();
    let jdir = work.path().join("journals");
    fs::create_dir(&jdir).unwrap();
    for (round, then_rollback) in [(0u64, true), (1, false), (2, true)] {
        let disk = FaultyFs::writable(size, 40 + round);
        let before = disk.content().to_vec();
        let src = work.path().join(format!("src{round}"));
        let mut after = before.clone();
        // Every other 64 KiB block: 2 MiB a chunk, so a group commits at each pause.
        for b in (0..after.len()).step_by(128 << 10) {
            after[b..b + (64 << 10)].copy_from_slice(&data(64 << 10, round * 1000 + b as u64));
        }
        fs::write(&src, &after).unwrap();
        disk.volatile();
        let dst = disk.path().to_path_buf();
        let args: Vec<String> = [
            "-f",
            "-q",
            "--journal",
            "--journal-dir",
            s(&jdir),
            "-b",
            "64K",
            "-p",
            "30",
        ]
        .iter()
        .map(|x| x.to_string())
        .chain([s(&src).to_string(), s(&dst).to_string()])
        .collect();
        let mut child = spawn(&args);
        // Some writes reached the disk (not yet flushed).
        wait_while_running(
            &mut child,
            "a write reached the disk",
            Duration::from_secs(30),
            || disk.content()[..4096] == after[..4096],
        );
        signal(child.id(), "-KILL");
        let _ = child.wait();
        disk.power_cut();
        // What reached the disk and was flushed by then (a write-back hint is an fsync on
        // this disk) survives; the rest is lost.
        let now = disk.content();
        let mixed = (0..now.len())
            .step_by(64 << 10)
            .any(|b| now[b..b + 4096] == after[b..b + 4096]);
        assert!(mixed, "round {round}: some writes survive the cut");
        let out = if then_rollback {
            run_within(&["rollback", "-f", "--journal-dir", s(&jdir), s(&dst)], 60)
        } else {
            let args: Vec<&str> = args
                .iter()
                .map(String::as_str)
                .filter(|a| *a != "30" && *a != "-p")
                .collect();
            run_within(&args, 60)
        };
        assert_eq!(code(&out), 0, "round {round}: {}", stderr(&out));
        let want = if then_rollback { &before } else { &after };
        assert!(
            disk.content() == want.as_slice(),
            "round {round}: rollback {then_rollback}"
        );
        assert_eq!(
            fs::read_dir(&jdir).unwrap().count(),
            0,
            "round {round}: journals left"
        );
    }
}

/// The physical block ranges of `path` (from `filefrag -v`).
fn physical_extents(path: &Path) -> Vec<(u64, u64)> {
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .expect("filefrag (e2fsprogs) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').map(str::trim).collect();
            let (a, b) = f.get(2)?.split_once("..")?;
            Some((a.trim().parse().ok()?, b.trim().parse::<u64>().ok()? + 1))
        })
        .collect()
}

/// On a filesystem with reflinks (XFS here) the journal shares the old blocks with the
/// destination instead of copying them: the journal of a run killed midway is made of
/// the destination's old blocks (its data is where the destination's was), and the
/// rollback gives the old image exactly; a rerun then finishes.
#[test]
fn with_reflinks_the_journal_takes_the_old_blocks_instead_of_copying() {
    let fs = Mounted::with_fs(LoopDev::new(640 * M as u64, &[]), "xfs");
    let (src, dst) = (fs.dir.path().join("src"), fs.dir.path().join("dst"));
    let before = data(64 * M, 5);
    let mut after = before.clone();
    let mut rng = Rng(0x3f5);
    for b in 0..64 {
        if rng.below(10) < 3 {
            after[b * M..(b + 1) * M].copy_from_slice(&data(M, rng.next()));
        }
    }
    fs::write(&src, &after).unwrap();
    fs::write(&dst, &before).unwrap();
    sh("sync", &[]);
    let old = physical_extents(&dst);
    assert!(
        !old.is_empty(),
        "filefrag found no extents of {}",
        dst.display()
    );
    let r = Round {
        src: src.clone(),
        dst: dst.clone(),
        before: before.clone(),
        after: after.clone(),
    };
    let mut child = spawn(&words(None, Mode::Local, &r, &["--journal", "-p", "20"]));
    let journal = fs.dir.path().join(".dst.blocksync-undo.00000001.0");
    wait_while_running(
        &mut child,
        "a few groups journaled",
        Duration::from_secs(60),
        || fs::metadata(&journal).is_ok_and(|m| m.len() >= 4 * M as u64),
    );
    signal(child.id(), "-KILL");
    let _ = child.wait();
    wait_released(&dst);
    let mut inside = 0;
    let mut total = 0;
    for (a, b) in physical_extents(&journal) {
        for blk in a..b {
            total += 1;
            inside += old.iter().any(|&(s, e)| blk >= s && blk < e) as u64;
        }
    }
    // All but the header and the groups' index pages were the destination's blocks.
    assert!(
        total > 256 && inside * 10 >= total * 9,
        "{inside} of the journal's {total} blocks were the destination's"
    );
    let out = run_within(&["rollback", "-f", "-q", s(&dst)], 60);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        fs::read(&dst).unwrap() == before,
        "rolled back to the old image"
    );
    let args = words(None, Mode::Local, &r, &["--journal"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_within(&args, 60);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == after);
    assert_eq!(r.journals(), 0);
}
