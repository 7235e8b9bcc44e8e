//! Offline syncs: `blocksync digest`, `diff` and `apply`, on files and a loop device, over a
//! pipe and through ssh; patches for another target, truncated or corrupted patches are
//! refused without writing.

mod common;

use common::sshd::Sshd;
use common::*;
use std::fs;

const M: usize = 1024 * 1024;

fn sh_c(script: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .args(["-c", script])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn digest_diff_apply_round_trip_with_zeros_and_size_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let (dig, patch) = (dir.path().join("dst.dig"), dir.path().join("p"));
    let base = data(6 * M + 300, 1);
    fs::write(&dst, &base).unwrap();
    // The source: scattered writes, a zeroed range, and 1 MiB longer.
    let mut next = base.clone();
    next.extend_from_slice(&data(M, 2));
    for (i, at) in [5usize, 70_000, 3 * M + 17, 6 * M + 100].iter().enumerate() {
        next[*at..*at + 4096].copy_from_slice(&data(4096, 10 + i as u64));
    }
    next[M..M + 64 * 1024].fill(0);
    fs::write(&src, &next).unwrap();

    let out = run(&["digest", s(&dst), "-o", s(&dig)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(&["diff", s(&src), "--against", s(&dig), "-o", s(&patch)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    // Only the changed 4 KiB blocks (a write may straddle two) and the new tail travel.
    let size = fs::metadata(&patch).unwrap().len();
    assert!(size < (M + 80 * 1024) as u64, "patch of {size} bytes");
    let out = run(&["apply", "--json", s(&patch), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["verified"], true);
    assert!(fs::read(&dst).unwrap() == next);
    // An apply cut short (some blocks written, the file grown, not resized or verified)
    // is finished by applying again: only the blocks the patch leaves alone are checked.
    let mut partial = next[..base.len() + 4096].to_vec();
    partial[70_000..70_000 + 4096].copy_from_slice(&base[70_000..70_000 + 4096]);
    fs::write(&dst, &partial).unwrap();
    let out = run(&["apply", "--json", s(&patch), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == next);
    // And again: applying a patch twice is harmless.
    let out = run(&["apply", "--json", s(&patch), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == next);

    // Shrinking works too.
    let smaller = &next[..2 * M + 5];
    fs::write(&src, smaller).unwrap();
    let out = run(&["digest", "-b", "64K", s(&dst), "-o", s(&dig)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = sh_c(&format!(
        "{b} diff {src} --against {dig} | {b} apply - {dst}",
        b = bin(),
        src = s(&src),
        dig = s(&dig),
        dst = s(&dst)
    ));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == smaller);
}

#[test]
fn wrong_truncated_or_corrupted_patches_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, other) = (
        dir.path().join("src"),
        dir.path().join("dst"),
        dir.path().join("other"),
    );
    let (dig, patch) = (dir.path().join("d"), dir.path().join("p"));
    fs::write(&dst, data(4 * M, 3)).unwrap();
    fs::write(&other, data(4 * M, 4)).unwrap();
    let mut next = fs::read(&dst).unwrap();
    next[2 * M..2 * M + 9000].copy_from_slice(&data(9000, 5));
    fs::write(&src, &next).unwrap();
    assert_eq!(code(&run(&["digest", s(&dst), "-o", s(&dig)])), 0);
    assert_eq!(
        code(&run(&[
            "diff",
            s(&src),
            "--against",
            s(&dig),
            "-o",
            s(&patch)
        ])),
        0
    );
    let good = fs::read(&patch).unwrap();
    let before = fs::read(&other).unwrap();

    // Another target.
    let out = run(&["apply", s(&patch), s(&other)]);
    assert_eq!(code(&out), 15, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nothing was written"),
        "{}",
        stderr(&out)
    );
    assert!(fs::read(&other).unwrap() == before);

    // Truncated anywhere, or one bit flipped: refused, the right target untouched.
    let orig = fs::read(&dst).unwrap();
    for cut in [10, good.len() / 2, good.len() - 1] {
        fs::write(&patch, &good[..cut]).unwrap();
        let out = run(&["apply", s(&patch), s(&dst)]);
        assert_eq!(code(&out), 3, "cut {cut}: {}", stderr(&out));
        assert!(fs::read(&dst).unwrap() == orig);
    }
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 4;
    fs::write(&patch, &bad).unwrap();
    let out = run(&["apply", s(&patch), s(&dst)]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("corrupted"), "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == orig);
    // Truncated on a pipe: also refused before writing.
    let out = sh_c(&format!(
        "head -c {} {} | {} apply - {}",
        good.len() - 40,
        s(&patch),
        bin(),
        s(&dst)
    ));
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == orig);

    // The good patch still applies.
    fs::write(&patch, &good).unwrap();
    let out = run(&["apply", s(&patch), s(&dst)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(fs::read(&dst).unwrap() == next);
}

#[test]
fn patch_through_ssh_onto_a_loop_device() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let base = data(8 * M, 6);
    let dev = LoopDev::new(8 * M as u64, &base);
    let src = dir.path().join("src");
    let dig = dir.path().join("d");
    let mut next = base.clone();
    next[5 * M..5 * M + 4096].copy_from_slice(&data(4096, 7));
    next[7 * M..8 * M].fill(0);
    fs::write(&src, &next).unwrap();
    // Digests taken on the "remote" side, the patch piped through ssh.
    let out = run(&["digest", s(&dev.dev), "-o", s(&dig)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = sh_c(&format!(
        "{b} diff {src} --against {dig} | {rsh} testhost {b} apply - {dev}",
        b = bin(),
        src = s(&src),
        dig = s(&dig),
        rsh = sshd.rsh(),
        dev = s(&dev.dev)
    ));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(dev.read() == next);
}
