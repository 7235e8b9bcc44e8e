//! Version history: `--keep-versions N` keeps the undo journals of the last N completed
//! runs as compressed reverse deltas on the destination's machine; `blocksync versions`
//! lists them and `blocksync restore --version K -o OUT` writes the image as it was K
//! runs ago, verified, without touching the destination. Files and devices, locally and
//! over ssh; a destination written by something else between runs cuts the history.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const M: usize = 1024 * 1024;

/// A destination's history: its images (oldest first), its state directory.
struct History {
    dir: tempfile::TempDir,
    state: PathBuf,
    src: PathBuf,
    dst: PathBuf,
    images: Vec<Vec<u8>>,
    rng: Rng,
    /// ssh words for a remote run, and whether the destination is the remote side.
    ssh: Vec<String>,
    remote_dst: bool,
}

impl History {
    fn new(first: Vec<u8>, dst: Option<PathBuf>, seed: u64) -> History {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let src = dir.path().join("src");
        let dst = dst.unwrap_or_else(|| dir.path().join("dst"));
        fs::write(&src, &first).unwrap();
        if !dst.starts_with("/dev") {
            fs::write(&dst, &first).unwrap();
        }
        let images = vec![read_all(&dst, first.len())];
        History {
            dir,
            state,
            src,
            dst,
            images,
            rng: Rng(seed),
            ssh: Vec::new(),
            remote_dst: false,
        }
    }

    /// blocksync with `args`, its state directory this history's.
    fn blocksync(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin());
        cmd.args(args).env("XDG_STATE_HOME", &self.state);
        output_within(&mut cmd, &format!("blocksync {args:?}"), 120)
    }

    /// How the destination is named on the command line.
    fn dst_word(&self) -> String {
        if self.remote_dst {
            format!("testhost:{}", s(&self.dst))
        } else {
            s(&self.dst).to_string()
        }
    }

    /// Changes the source (scattered 4 KiB writes; `resize` to a new length) and syncs
    /// it with `extra`, then records the image the destination holds.
    fn run(&mut self, extra: &[&str], resize: Option<usize>) -> Output {
        let mut img = fs::read(&self.src).unwrap();
        for _ in 0..5 {
            let at = self.rng.below(img.len() as u64 / 4096) as usize * 4096;
            let end = (at + 4096).min(img.len());
            img[at..end].copy_from_slice(&data(end - at, self.rng.next()));
        }
        if let Some(n) = resize {
            img.resize(n, 0x5a);
        }
        fs::write(&self.src, &img).unwrap();
        let mut args: Vec<String> = vec!["-f".into(), "-q".into(), "-b".into(), "64K".into()];
        args.extend(self.ssh.iter().cloned());
        args.extend(extra.iter().map(|x| x.to_string()));
        args.extend([s(&self.src).to_string(), self.dst_word()]);
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.blocksync(&words);
        assert_eq!(code(&out), 0, "run {extra:?}: {}", stderr(&out));
        let len = if self.dst.starts_with("/dev") {
            self.images[0].len()
        } else {
            fs::metadata(&self.dst).unwrap().len() as usize
        };
        self.images.push(read_all(&self.dst, len));
        out
    }

    /// `blocksync versions --json DST`.
    fn versions(&self) -> serde_json::Value {
        let mut args: Vec<String> = vec!["versions".into(), "--json".into()];
        args.extend(self.ssh.iter().cloned());
        args.push(self.dst_word());
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.blocksync(&words);
        assert_eq!(code(&out), 0, "versions: {}", stderr(&out));
        json(&out)
    }

    /// `blocksync restore DST --version K -o OUT` with `extra`.
    fn restore(&self, k: usize, out: &Path, extra: &[&str]) -> Output {
        let mut args: Vec<String> = vec!["restore".into(), "-q".into()];
        args.extend(self.ssh.iter().cloned());
        args.extend(extra.iter().map(|x| x.to_string()));
        args.extend([
            self.dst_word(),
            "--version".into(),
            k.to_string(),
            "-o".into(),
            s(out).to_string(),
        ]);
        let words: Vec<&str> = args.iter().map(String::as_str).collect();
        self.blocksync(&words)
    }

    /// Restores version `k` into a new file and checks it is the image `k` runs ago.
    fn check_restores(&self, k: usize) {
        let out = self.dir.path().join(format!("restored-{k}-{}", self.rng.0));
        let res = self.restore(k, &out, &[]);
        assert_eq!(code(&res), 0, "restore {k}: {}", stderr(&res));
        let want = &self.images[self.images.len() - 1 - k];
        let got = fs::read(&out).unwrap();
        assert!(
            got == *want,
            "version {k} restores {} bytes, not the image {k} runs ago ({} bytes)",
            got.len(),
            want.len()
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&out).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!partial_of(&out).exists(), "a partial restore was left");
        fs::remove_file(&out).unwrap();
    }

    /// Version files beside a file destination.
    fn version_files(&self) -> usize {
        let name = self.dst.file_name().unwrap().to_string_lossy().into_owned();
        fs::read_dir(self.dst.parent().unwrap())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".{name}.blocksync-version."))
            })
            .count()
    }
}

fn read_all(path: &Path, len: usize) -> Vec<u8> {
    let mut v = fs::read(path).unwrap();
    v.truncate(len);
    v
}

fn listed(v: &serde_json::Value) -> Vec<(u64, String)> {
    v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["size"].as_u64().unwrap(),
                x["restorable"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Five runs with --keep-versions 3 over a changing source (grown once, cut once):
/// every kept version restores exactly, the oldest are pruned, later runs keep as many
/// without the option, and --keep-versions 0 removes them.
#[test]
fn five_runs_keep_three_and_each_restores_exactly() {
    let mut h = History::new(data(2 * M, 1), None, 0x5e75);
    for round in 0..5 {
        let resize = match round {
            2 => Some(3 * M + 512),
            3 => Some(M + 4096),
            _ => None,
        };
        h.run(&["--keep-versions", "3"], resize);
    }
    let v = h.versions();
    let sizes: Vec<u64> = listed(&v).iter().map(|x| x.0).collect();
    // Before runs 5, 4 and 3: the sizes of images 4, 3 and 2.
    let want: Vec<u64> = (2..5).rev().map(|i| h.images[i].len() as u64).collect();
    assert_eq!(sizes, want, "{v}");
    assert!(listed(&v).iter().all(|x| x.1 == "yes"), "{v}");
    assert_eq!(h.version_files(), 3, "the oldest two are pruned");
    for k in 1..=3 {
        h.check_restores(k);
    }
    let out = h.restore(4, &h.dir.path().join("four"), &[]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("3 version(s) kept"),
        "{}",
        stderr(&out)
    );
    // The destination was only read.
    assert_eq!(fs::read(&h.dst).unwrap(), *h.images.last().unwrap());

    // Without the option the next run keeps as many.
    h.run(&[], None);
    assert_eq!(h.version_files(), 3);
    h.check_restores(1);
    h.check_restores(3);
    h.run(&["--keep-versions", "0"], None);
    assert_eq!(h.version_files(), 0);
    assert!(listed(&h.versions()).is_empty());
}

/// A restore never overwrites an existing file, and never the destination itself.
#[test]
fn a_restore_writes_only_a_new_file() {
    let mut h = History::new(data(M, 2), None, 0xf11e);
    h.run(&["--keep-versions", "2"], None);
    let there = h.dir.path().join("there");
    fs::write(&there, b"keep me").unwrap();
    let out = h.restore(1, &there, &[]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
    assert_eq!(fs::read(&there).unwrap(), b"keep me");
    let out = h.restore(1, &h.dst.clone(), &[]);
    assert_ne!(code(&out), 0);
    assert_eq!(fs::read(&h.dst).unwrap(), *h.images.last().unwrap());
    h.check_restores(1);
}

/// Something else writing to the destination cuts its history: versions made before
/// the write can no longer be restored (refused, exit 17), later ones still can; and a
/// write after the last run refuses them all.
#[test]
fn a_write_by_something_else_cuts_the_history() {
    let mut h = History::new(data(M, 3), None, 0xc07);
    h.run(&["--keep-versions", "5"], None);
    h.run(&[], None);
    poke(&h.dst, 12345);
    // The poke is in the destination now: the image before the next run holds it.
    let n = h.images.len();
    h.images[n - 1] = fs::read(&h.dst).unwrap();
    h.run(&[], None);
    let v = listed(&h.versions());
    assert_eq!(
        v.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
        ["yes", "no", "no"],
        "{v:?}"
    );
    h.check_restores(1);
    let out = h.restore(2, &h.dir.path().join("old"), &[]);
    assert_eq!(code(&out), 17, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("between the runs"),
        "{}",
        stderr(&out)
    );
    assert!(!h.dir.path().join("old").exists());
    poke(&h.dst, 999);
    let out = h.restore(1, &h.dir.path().join("new"), &[]);
    assert_eq!(code(&out), 17, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("written since its last run"),
        "{}",
        stderr(&out)
    );
}

fn poke(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_at(b"someone else", at).unwrap();
    f.sync_all().unwrap();
}

/// A device destination keeps its versions in the state directory; a version restores
/// into a file and onto another device.
#[test]
fn a_device_keeps_its_versions_in_the_state_directory() {
    let size = 2 * M;
    let dev = LoopDev::new(size as u64, &data(size, 4));
    let mut h = History::new(data(size, 4), Some(dev.dev.clone()), 0xde5);
    for _ in 0..3 {
        h.run(&["--keep-versions", "2"], None);
    }
    let v = h.versions();
    assert_eq!(listed(&v).len(), 2, "{v}");
    assert!(v["place"].as_str().unwrap().starts_with(s(&h.state)), "{v}");
    h.check_restores(1);
    h.check_restores(2);
    let other = LoopDev::new(size as u64, &[]);
    let out = h.restore(2, &other.dev, &["-f"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        other.read() == h.images[1],
        "the device does not hold version 2"
    );
}

/// Over ssh the versions live on the destination's machine: a push (two streams)
/// keeps them there, `versions host:DST` lists them and `restore host:DST` writes OUT
/// there; a pull keeps them on this machine.
#[test]
fn over_ssh_the_versions_live_on_the_destination_machine() {
    let sshd = Sshd::start();
    let ssh: Vec<String> = vec!["-e".into(), sshd.rsh(), "-S".into(), bin().into()];
    let mut h = History::new(data(3 * M, 5), None, 0x551);
    h.ssh = ssh.clone();
    h.remote_dst = true;
    h.run(&["--keep-versions", "2", "-w", "2"], None);
    h.run(&["-w", "2"], Some(3 * M - 8192));
    // The servers report the journal they kept (the bytes overwritten, and framing).
    let out = h.run(&["-w", "2", "--json"], None);
    let j = json(&out);
    let (journal, written) = (j["journal_bytes"].as_u64(), j["bytes_written"].as_u64());
    assert!(journal >= written && written > Some(0), "{j}");
    let v = h.versions();
    assert_eq!(listed(&v).len(), 2, "{v}");
    assert_eq!(h.version_files(), 2);
    h.check_restores(1);
    h.check_restores(2);

    // A pull: the destination (and its versions) here.
    let mut p = History::new(data(M, 6), None, 0x9011);
    let remote_src = format!("testhost:{}", s(&p.src));
    for keep in [["--keep-versions", "2"], ["-b", "64K"]] {
        let mut img = fs::read(&p.src).unwrap();
        img[4096..8192].copy_from_slice(&data(4096, p.rng.next()));
        fs::write(&p.src, &img).unwrap();
        let mut args: Vec<&str> = vec!["-f", "-q"];
        args.extend(ssh.iter().map(String::as_str));
        args.extend(keep);
        args.extend([remote_src.as_str(), s(&p.dst)]);
        let out = p.blocksync(&args);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        p.images.push(fs::read(&p.dst).unwrap());
    }
    assert_eq!(p.version_files(), 2);
    p.check_restores(2);
}
