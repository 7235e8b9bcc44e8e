//! A stream as the source (`-`: standard input, through a real pipe): the destination is
//! read and compared as usual and only the blocks that differ are written, locally onto
//! files and devices and over ssh; a file is cut to the stream's length.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

const M: usize = 1024 * 1024;

/// Runs `blocksync ARGS` with `image` piped into its standard input by `cat`.
fn piped(image: &Path, args: &[&str]) -> Output {
    let mut cat = Command::new("cat")
        .arg(image)
        .stdout(Stdio::piped())
        .spawn()
        .expect("cat");
    let pipe = cat.stdout.take().unwrap();
    let out = Command::new(bin())
        .args(args)
        .stdin(Stdio::from(pipe))
        .output()
        .expect("run blocksync");
    // cat ends once blocksync has read all, or with a broken pipe when it stopped early.
    let _ = cat.wait();
    out
}

fn written(out: &Output) -> u64 {
    json(out)["bytes_written"].as_u64().expect("bytes_written")
}

#[test]
fn a_stream_onto_a_file_writes_only_the_blocks_that_differ() {
    let dir = tempfile::tempdir().unwrap();
    let (img, dst) = (dir.path().join("img"), dir.path().join("dst"));
    let old = data(10 * M, 61);
    fs::write(&dst, &old).unwrap();
    let mut new = old.clone();
    for at in [100, 3 * M + 5, 9 * M + 77] {
        new[at..at + 10].fill(0xee);
    }
    fs::write(&img, &new).unwrap();
    let out = piped(&img, &["-f", "--json", "-b", "64K", "-", s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), new);
    let j = json(&out);
    assert_eq!(j["blocks_changed"], 3, "{j}");
    // Locally a changed block is narrowed down to its changed 4 KiB pieces.
    assert_eq!(written(&out), 3 * 4096, "{j}");
    assert_eq!(j["size"], 10 * M, "{j}");

    // A shorter stream cuts the file to its length (and not on a block boundary).
    let short = 4 * M + 1000;
    fs::write(&img, &new[..short]).unwrap();
    let out = piped(&img, &["-f", "--json", "-b", "64K", "-", s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), &new[..short]);
    assert_eq!(json(&out)["size"], short);
    assert_eq!(written(&out), 0, "the bytes it holds are there already");

    // A longer one grows it; a new file is created.
    fs::write(&img, &new).unwrap();
    let out = piped(&img, &["-f", "-", s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), new);
    let fresh = dir.path().join("fresh");
    let out = piped(&img, &["-", s(&fresh)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&fresh).unwrap(), new);

    // An empty stream empties the file.
    fs::write(&img, b"").unwrap();
    let out = piped(&img, &["-f", "-", s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::metadata(&dst).unwrap().len(), 0);
}

#[test]
fn a_stream_onto_a_device_keeps_what_lies_past_its_end_and_a_longer_one_fails() {
    let old = data(8 * M, 62);
    let dev = LoopDev::new(8 * M as u64, &old);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    let mut new = data(5 * M, 63);
    new[..M].copy_from_slice(&old[..M]); // the first MiB is the same
    fs::write(&img, &new).unwrap();
    let out = piped(&img, &["-f", "--json", "-", s(&dev.dev)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let now = dev.read();
    assert_eq!(&now[..5 * M], &new[..]);
    assert_eq!(&now[5 * M..], &old[5 * M..], "past the stream's end");
    assert_eq!(written(&out), 4 * M as u64);

    // A stream longer than the device: the device is synced full, then exit 5.
    let long = data(9 * M, 64);
    fs::write(&img, &long).unwrap();
    let out = piped(&img, &["-f", "-", s(&dev.dev)]);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(stderr(&out).contains("holds more than"), "{}", stderr(&out));
    assert_eq!(dev.read(), &long[..8 * M]);
}

#[test]
fn a_stream_pushed_over_ssh_writes_only_what_differs() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let (img, dst) = (dir.path().join("img"), dir.path().join("dst"));
    let old = data(12 * M, 65);
    fs::write(&dst, &old).unwrap();
    let mut new = old.clone();
    new[7 * M..7 * M + 4].fill(1);
    fs::write(&img, &new).unwrap();
    let rsh = sshd.rsh();
    let to = format!("testhost:{}", dst.display());
    let args = [
        "-e",
        &rsh,
        "-S",
        bin(),
        "-f",
        "--json",
        "-b",
        "1M",
        "-",
        &to,
    ];
    let out = piped(&img, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), new);
    assert_eq!(written(&out), M as u64, "{}", stderr(&out));
    assert_eq!(json(&out)["size"], 12 * M);

    // Shorter: the remote file is cut to the stream's length.
    fs::write(&img, &new[..3 * M + 10]).unwrap();
    let out = piped(&img, &args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), &new[..3 * M + 10]);
}

#[test]
fn what_a_stream_cannot_do_is_refused_before_anything_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let (img, dst) = (dir.path().join("img"), dir.path().join("dst"));
    fs::write(&img, data(M, 66)).unwrap();
    fs::write(&dst, data(M, 67)).unwrap();
    let digest = dir.path().join("d");
    for extra in [
        &["-w", "2"][..],
        &["--verify"][..],
        &["--digest-file", s(&digest)][..],
    ] {
        let mut args = vec!["-f"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-", s(&dst)]);
        let out = piped(&img, &args);
        assert_eq!(code(&out), 2, "{extra:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("standard input"), "{}", stderr(&out));
        assert_eq!(fs::read(&dst).unwrap(), data(M, 67));
    }
    let out = piped(&img, &["-f", s(&img), "-"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("standard output"), "{}", stderr(&out));
}
