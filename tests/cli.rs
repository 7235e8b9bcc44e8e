//! The command line people already know: blocksync.py's operand forms and hash names,
//! rsync's and cp's two operands, `--check`, the prompt's words, and the man page and
//! completions generated from the same definition as `--help`.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::process::Command;

const M: usize = 1024 * 1024;

/// `blocksync a.img b.img` is a local sync (as cp would read it), a new file too; a bare
/// word that is no file could be a host or a file: refused, naming both.
#[test]
fn two_plain_operands_are_files_unless_one_could_be_a_host() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("disk.img"), data(M, 1)).unwrap();
    let mut cmd = Command::new(bin());
    cmd.current_dir(dir.path())
        .args(["-q", "disk.img", "backup.img"]);
    let out = output_within(&mut cmd, "blocksync disk.img backup.img", 60);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(dir.path().join("backup.img")).unwrap(), data(M, 1));
    let mut cmd = Command::new(bin());
    cmd.current_dir(dir.path())
        .args(["-q", "disk.img", "backup"]);
    let out = output_within(&mut cmd, "blocksync disk.img backup", 60);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("could be a host") && e.contains("./backup") && e.contains("backup:disk.img"),
        "{e}"
    );
    assert!(!dir.path().join("backup").exists());
}

/// The seed's own form `SRC user@host` syncs to the same path there, and every hash name
/// blocksync.py's users pass to -1 (and -2) works: the SHA-2 ones as sha256, the others
/// as blake3, with a note saying so.
#[test]
fn blocksync_py_forms_and_hash_names_work() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    // SRC root@testhost: the destination is SRC's own path there; a relative one is
    // taken from the remote login's home (root's here), as blocksync.py did.
    let ssh = ["-e", &sshd.rsh(), "-S", bin()];
    let name = format!("blocksync-cli-seed-{}.img", std::process::id());
    fs::write(dir.path().join(&name), data(M, 2)).unwrap();
    let there = std::path::Path::new("/root").join(&name);
    let mut cmd = Command::new(bin());
    cmd.current_dir(dir.path())
        .args(["-f", "-q"])
        .args(ssh)
        .args([name.as_str(), "root@testhost"]);
    let out = output_within(&mut cmd, "blocksync SRC root@testhost", 60);
    let landed = fs::read(&there).ok();
    let _ = fs::remove_file(&there);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        landed.as_deref(),
        Some(&data(M, 2)[..]),
        "SRC's path in the remote home"
    );
    for (i, name) in [
        "md5", "sha1", "sha224", "sha256", "sha384", "sha512", "blake2b", "sha3_256",
    ]
    .into_iter()
    .enumerate()
    {
        fs::write(&src, data(M, 10 + i as u64)).unwrap();
        let dst = dir.path().join(format!("dst-{name}"));
        let there = format!("testhost:{}", s(&dst));
        let mut args: Vec<&str> = vec!["-f", "-1", name, "-2", name];
        args.extend(ssh);
        args.extend([s(&src), there.as_str()]);
        let out = run_within(&args, 60);
        assert_eq!(code(&out), 0, "-1 {name}: {}", stderr(&out));
        assert_eq!(
            fs::read(&dst).unwrap(),
            fs::read(&src).unwrap(),
            "-1 {name}"
        );
        let e = stderr(&out);
        let mapped = name != "sha256";
        assert_eq!(
            e.contains(&format!("hash '{name}'")),
            mapped,
            "-1 {name}: {e}"
        );
        assert!(
            e.contains("-2/--additionalhash is accepted"),
            "-2 {name}: {e}"
        );
    }
    let out = run_within(&["-1", "crc32", s(&src), "testhost:/tmp/x"], 30);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("unknown hash"), "{}", stderr(&out));
}

/// `blocksync` alone prints the whole option list, as blocksync.py's README promises,
/// and exits 2.
#[test]
fn no_arguments_print_every_option() {
    let out = run_within(&[], 30);
    assert_eq!(code(&out), 2);
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--keep-versions",
        "--check",
        "--journal",
        "Exit codes:",
        "--hash",
    ] {
        assert!(text.contains(opt), "{opt} missing from:\n{text}");
    }
}

/// `--check` compares only: exit 0 when equal, 18 when the destination differs or is
/// missing, and nothing is written or created.
#[test]
fn check_says_whether_they_differ_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    fs::write(&src, data(2 * M, 3)).unwrap();
    fs::write(&dst, data(2 * M, 3)).unwrap();
    let out = run_within(&["--check", "--json", s(&src), s(&dst)], 60);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["status"], "equal");
    let mut other = data(2 * M, 3);
    other[M + 5] ^= 1;
    fs::write(&dst, &other).unwrap();
    let out = run_within(&["--check", s(&src), s(&dst)], 60);
    assert_eq!(code(&out), 18, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 of 2 blocks differ"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(&dst).unwrap(), other, "--check wrote");
    let missing = dir.path().join("missing");
    let out = run_within(&["--check", s(&src), s(&missing)], 60);
    assert_eq!(code(&out), 18, "{}", stderr(&out));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
    assert!(!missing.exists() && !partial_of(&missing).exists());
}

/// What the prompt says: a longer destination file is cut, and to what size.
#[test]
fn the_prompt_says_a_longer_file_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    fs::write(&src, data(M, 4)).unwrap();
    fs::write(&dst, data(3 * M, 5)).unwrap();
    let out = run_within(&[s(&src), s(&dst)], 60);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains(&format!("cut from {} to {} bytes", 3 * M, M)),
        "{e}"
    );
    assert_eq!(fs::metadata(&dst).unwrap().len(), 3 * M as u64);
}

/// A file on a filesystem mounted under /dev (/dev/shm) is a file, not a mistyped device;
/// a missing name in /dev itself is still refused. `--min-block` above `-b` is refused.
#[test]
fn messages_tell_files_from_devices_and_sizes_apart() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 6)).unwrap();
    let shm = std::path::PathBuf::from(format!("/dev/shm/blocksync-cli-{}", std::process::id()));
    let out = run_within(&["-q", s(&src), s(&shm)], 60);
    let copied = fs::read(&shm).ok();
    let _ = fs::remove_file(&shm);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(copied.as_deref(), Some(&data(M, 6)[..]));
    let out = run_within(&["-q", s(&src), "/dev/sdzz-typo"], 60);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("check the device name"),
        "{}",
        stderr(&out)
    );
    let out = run_within(&["-b", "1M", "--min-block", "8M", s(&src), "./x"], 60);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("larger than the block size"),
        "{}",
        stderr(&out)
    );
}

/// The man page renders (`man -l`) and shows the options; bash completes an option.
#[test]
fn the_man_page_and_completions_come_from_the_same_definition() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("blocksync.1");
    let out = run_within(&["--generate", "man"], 30);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    fs::write(&page, &out.stdout).unwrap();
    let mut man = Command::new("man");
    man.args(["-l", s(&page)])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100");
    let shown = output_within(&mut man, "man -l blocksync.1", 30);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "man -l failed: {}", stderr(&shown));
    for want in ["--keep-versions", "--journal", "Exit codes"] {
        assert!(
            text.contains(want),
            "{want} missing from the man page:\n{text}"
        );
    }
    let out = run_within(&["--generate", "complete-bash"], 30);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let script = dir.path().join("blocksync.bash");
    fs::write(&script, &out.stdout).unwrap();
    let probe = format!(
        "source {}; COMP_WORDS=(blocksync --keep-v); COMP_CWORD=1; _blocksync blocksync --keep-v blocksync; echo \"${{COMPREPLY[*]}}\"",
        s(&script)
    );
    let mut bash = Command::new("bash");
    bash.args(["-c", &probe]);
    let done = output_within(&mut bash, "bash completion", 30);
    let words = String::from_utf8_lossy(&done.stdout);
    assert!(
        words.contains("--keep-versions"),
        "completion gave {words:?}: {}",
        stderr(&done)
    );
    for kind in ["complete-zsh", "complete-fish"] {
        let out = run_within(&["--generate", kind], 30);
        assert_eq!(code(&out), 0, "{kind}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("keep-versions"),
            "{kind}"
        );
    }
    let out = run_within(&["--generate", "nroff"], 30);
    assert_eq!(code(&out), 2);
}

/// Compression options parse as users type them (`-C 9`, `-C9`, `-C=9`, `--compress=9`,
/// `--compress-level 9`, and blocksync.py's bare `-C`), and an asked-for level
/// compresses every block: compressible data crosses in a fraction of its size.
#[test]
fn compression_levels_parse_as_typed_and_always_compress() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    // Compressible: text-like, repetitive.
    let text: Vec<u8> = (0..4 * M)
        .map(|i| b"blocksync compresses this "[i % 26])
        .collect();
    fs::write(&src, &text).unwrap();
    let ssh = ["-e", &sshd.rsh(), "-S", bin()];
    for (i, form) in [
        &["-C", "9"][..],
        &["-C9"],
        &["-C=9"],
        &["--compress=9"],
        &["--compress-level", "9"],
        &["-C"],
    ]
    .into_iter()
    .enumerate()
    {
        let dst = dir.path().join(format!("dst{i}"));
        let there = format!("testhost:{}", s(&dst));
        let mut args: Vec<&str> = vec!["-f", "--json"];
        args.extend(ssh);
        args.extend(form);
        args.extend([s(&src), there.as_str()]);
        let out = run_within(&args, 60);
        assert_eq!(code(&out), 0, "{form:?}: {}", stderr(&out));
        assert_eq!(fs::read(&dst).unwrap(), text, "{form:?}");
        let sent = json(&out)["bytes_sent"].as_u64().unwrap();
        if form != ["-C"] {
            assert!(
                sent < text.len() as u64 / 20,
                "{form:?}: {sent} bytes sent for {}",
                text.len()
            );
        }
    }
}

/// A new destination file needs room for the source's data: on a filesystem with less
/// free space the run is refused before anything is written (locally, in a push and in
/// a pull), and a sparse source needs room only for its data.
#[test]
fn a_new_file_without_room_is_refused_before_writing() {
    let sshd = Sshd::start();
    let fs_small = Tmpfs::new(4 * M as u64);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(8 * M, 7)).unwrap();
    let ssh = ["-e", &sshd.rsh(), "-S", bin()];
    let dst = fs_small.dir.path().join("dst");
    let (here, there_src) = (s(&dst).to_string(), format!("testhost:{}", s(&src)));
    let there_dst = format!("testhost:{}", s(&dst));
    for (what, words) in [
        ("local", vec![s(&src), here.as_str()]),
        ("push", vec![s(&src), there_dst.as_str()]),
        ("pull", vec![there_src.as_str(), here.as_str()]),
    ] {
        let mut args: Vec<&str> = vec!["-q"];
        args.extend(ssh);
        args.extend(words);
        let out = run_within(&args, 60);
        assert_eq!(code(&out), 5, "{what}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no room for the new file"),
            "{what}: {}",
            stderr(&out)
        );
        assert!(
            !dst.exists() && !partial_of(&dst).exists(),
            "{what}: something was written"
        );
    }
    // Sparse: 64 MiB, 1 MiB of it data.
    let sparse = dir.path().join("sparse");
    let f = fs::File::create(&sparse).unwrap();
    f.set_len(64 * M as u64).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &data(M, 8), 5 * M as u64).unwrap();
    drop(f);
    let out = run_within(&["-q", s(&sparse), s(&dst)], 60);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == fs::read(&sparse).unwrap());
}

/// `-v` shows the ssh command line and how the remote blocksync was found and which it
/// is; `-vv` adds the protocol's steps; neither without -v.
#[test]
fn verbose_shows_how_the_remote_side_was_reached() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 9)).unwrap();
    let rsh = sshd.rsh();
    let there = format!("testhost:{}", s(&dir.path().join("dst")));
    let run_v = |v: &[&str]| {
        let mut args: Vec<&str> = vec!["-f", "--no-progress", "-e", &rsh];
        args.extend(v);
        args.extend([s(&src), there.as_str()]);
        let out = run_within(&args, 60);
        assert_eq!(code(&out), 0, "{v:?}: {}", stderr(&out));
        stderr(&out)
    };
    // Deployed: no -S, so the copy is made (or reused) in the remote cache.
    let quiet = run_v(&[]);
    assert!(!quiet.contains("ssh command:"), "{quiet}");
    let v = run_v(&["-v"]);
    assert!(v.contains("ssh command: ") && v.contains("testhost"), "{v}");
    assert!(
        v.contains("checked (sha256)") && v.contains("protocol "),
        "{v}"
    );
    assert!(!v.contains("replied:"), "{v}");
    let vv = run_v(&["-vv"]);
    assert!(
        vv.contains("replied: a file") && vv.contains("go: "),
        "{vv}"
    );
}

/// Off a terminal `--progress` prints lines (never nothing), and `--progress=json` one
/// JSON object a line with the bytes done, the total, the rate and what was written.
#[test]
fn progress_off_a_terminal_is_lines_or_json() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(16 * M, 11)).unwrap();
    // 50 ms a block: about 0.8 s, several -t 0.1 intervals.
    let slow = ["-f", "-p", "50", "-t", "0.1"];
    let dst = dir.path().join("a");
    let mut args = slow.to_vec();
    args.extend(["--progress", s(&src), s(&dst)]);
    let out = run_within(&args, 60);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.lines().filter(|l| l.contains(" / 16.0 MiB (")).count() >= 2,
        "{e}"
    );
    let dst = dir.path().join("b");
    let mut args = slow.to_vec();
    args.extend(["--progress=json", "-q", s(&src), s(&dst)]);
    let out = run_within(&args, 60);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let objs: Vec<serde_json::Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(objs.len() >= 2, "{objs:?}");
    let last = objs.last().unwrap();
    assert_eq!(last["total"], 16 * M as u64);
    assert!(last["done"].as_u64().unwrap() > 0 && last["bytes_written"].as_u64().unwrap() > 0);
    assert_eq!(last["phase"], "sync");
}

/// A word read as host:path whose host cannot be reached says how to write a local file
/// of that name.
#[test]
fn an_unreachable_colon_word_says_how_to_name_a_local_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 12)).unwrap();
    let rsh = "ssh -F /dev/null -o ConnectTimeout=5 -o BatchMode=yes";
    let host = format!("blocksync-no-such-host-{}", std::process::id());
    let word = format!("{host}:colon.bin");
    let out = run_within(&["-f", "-e", rsh, s(&src), &word], 60);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("write ./{word}")),
        "{}",
        stderr(&out)
    );
}
