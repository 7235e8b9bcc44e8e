//! Self-deploy as it meets real machines and attackers: a remote with no libc at all (a
//! chroot holding only a static busybox), an upload corrupted on the way, a cached copy
//! replaced afterwards, `-s` after the login user replaced its copy, and a noexec home.

mod common;

use common::sshd::{Sshd, TestUser};
use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const M: usize = 1024 * 1024;

/// The id (SHA-256, hex) a deployed copy of the test binary is named by.
fn id() -> String {
    blocksync::testing::hash_hex(&fs::read(bin()).unwrap())
}

/// Writes an executable shell script.
fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A machine with no libc: a directory holding a static busybox (its applets linked in
/// /bin), /dev/null, /tmp, /var/tmp and root's home, reached with an `-e` wrapper that
/// runs the remote command under `chroot DIR /bin/sh -c`.
struct Bare {
    dir: tempfile::TempDir,
    rsh: PathBuf,
}

impl Bare {
    fn new() -> Self {
        require_root();
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "this test needs a static busybox: apt-get install busybox-static (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        for d in ["bin", "dev", "tmp", "var/tmp", "root", "data"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for d in ["tmp", "var/tmp"] {
            fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o1777)).unwrap();
        }
        fs::copy(busybox, root.join("bin/busybox")).unwrap();
        sh(
            "mknod",
            &["-m", "666", s(&root.join("dev/null")), "c", "1", "3"],
        );
        let out = std::process::Command::new("chroot")
            .arg(&root)
            .args(["/bin/busybox", "--install", "-s", "/bin"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "busybox does not run in a bare chroot (is it busybox-static's?): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!root.join("lib").exists() && !root.join("usr").exists());
        let rsh = dir.path().join("rsh");
        // blocksync runs `RSH HOST COMMAND`: the command is the last word.
        script(
            &rsh,
            &format!(
                "for last; do :; done\nexec chroot {} /bin/env -i HOME=/root PATH=/bin /bin/sh -c \"$last\"",
                s(&root)
            ),
        );
        Bare { dir, rsh }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

#[test]
fn deploys_to_a_machine_without_libc_and_reuses_the_copy() {
    let bare = Bare::new();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(3 * M + 17, 141);
    fs::write(&src, &content).unwrap();
    let rsh = s(&bare.rsh);
    let out = run(&["-e", rsh, "-f", s(&src), "bare:/data/copy"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(bare.root().join("data/copy")).unwrap(), content);
    let copy = bare
        .root()
        .join(format!("root/.cache/blocksync/blocksync-{}", id()));
    let meta = fs::metadata(&copy).expect("the deployed copy, named by its hash");
    assert_eq!(meta.mode() & 0o077, 0, "private");
    assert_eq!(fs::read(&copy).unwrap(), fs::read(bin()).unwrap());
    let (ino, mtime) = (meta.ino(), meta.mtime_nsec());

    // Pulled back, and pushed again with changes: the same copy runs.
    let back = dir.path().join("back");
    let out = run(&["-e", rsh, "-f", "bare:/data/copy", s(&back)]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&back).unwrap(), content);
    let mut next = content.clone();
    next[2 * M] ^= 0xff;
    fs::write(&src, &next).unwrap();
    let out = run(&["-e", rsh, "-f", "--json", s(&src), "bare:/data/copy"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(json(&out)["blocks_changed"], 1);
    assert_eq!(fs::read(bare.root().join("data/copy")).unwrap(), next);
    let again = fs::metadata(&copy).unwrap();
    assert_eq!(
        (again.ino(), again.mtime_nsec()),
        (ino, mtime),
        "copied again"
    );
    assert!(!stderr(&out).contains("note"), "{}", stderr(&out));
}

/// The cache of the test sshd's root account.
fn cached(sshd: &Sshd) -> PathBuf {
    sshd.cache().join("blocksync")
}

#[test]
fn a_corrupted_upload_is_refused_and_a_replaced_copy_is_copied_again() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::write(&src, data(M, 142)).unwrap();
    let target = format!("testhost:{}", s(&dir.path().join("dst")));
    // Flips one byte of what goes to the installer (the only remote command that
    // prints BSINSTALLED).
    let flip = dir.path().join("flip-ssh");
    script(
        &flip,
        &format!(
            "case \"$*\" in\n*BSINSTALLED*) perl -e 'binmode STDIN; binmode STDOUT; local $/; my $d = <STDIN>; substr($d, 4096, 1) ^= chr(1); print $d' | {rsh} \"$@\";;\n*) exec {rsh} \"$@\";;\nesac",
            rsh = sshd.rsh()
        ),
    );
    let out = run(&["-e", s(&flip), "-f", s(&src), &target]);
    assert_eq!(code(&out), 11, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("corrupted on the way"),
        "{}",
        stderr(&out)
    );
    let left: Vec<_> = fs::read_dir(cached(&sshd))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "nothing installed, no temp file left: {left:?}"
    );

    // Deployed intact, then replaced by a program that leaves a marker: copied again,
    // never run.
    let out = run(&["-e", &sshd.rsh(), "-f", s(&src), &target]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let copy = cached(&sshd).join(format!("blocksync-{}", id()));
    let marker = dir.path().join("marker");
    script(
        &copy,
        &format!("touch {}\nexec {} \"$@\"", s(&marker), bin()),
    );
    let out = run(&["-e", &sshd.rsh(), "-f", s(&src), &target]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!marker.exists(), "the replaced copy ran");
    assert!(
        stderr(&out).contains("copying it again"),
        "{}",
        stderr(&out)
    );
    assert_eq!(fs::read(&copy).unwrap(), fs::read(bin()).unwrap());
}

/// Removes a sudoers rule and root's copy of the test binary when the test ends.
struct SudoGuard {
    rule: PathBuf,
}

impl SudoGuard {
    fn grant(user: &TestUser, line: &str) -> Self {
        let rule = PathBuf::from(format!("/etc/sudoers.d/{}", user.name));
        fs::write(&rule, format!("{line}\n")).unwrap();
        fs::set_permissions(&rule, fs::Permissions::from_mode(0o440)).unwrap();
        let guard = SudoGuard { rule };
        sh("visudo", &["-c", "-q", "-f", s(&guard.rule)]);
        guard
    }
}

impl Drop for SudoGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.rule);
        let _ = fs::remove_file(root_copy());
    }
}

fn root_copy() -> PathBuf {
    PathBuf::from(format!("/var/cache/blocksync/blocksync-{}", id()))
}

/// `cmd` run as `user` (no shell, no terminal); its exit code.
fn as_user(user: &TestUser, cmd: &[&str]) -> i32 {
    let out = std::process::Command::new("runuser")
        .args(["-u", &user.name, "--"])
        .args(cmd)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("runuser");
    out.status.code().unwrap_or(-1)
}

#[test]
fn sudo_never_runs_a_copy_the_login_user_can_change() {
    let sshd = Sshd::start();
    assert!(
        Path::new("/usr/bin/sudo").exists() && Path::new("/usr/sbin/visudo").exists(),
        "this test needs sudo: apt-get install sudo (.ci/run does)"
    );
    let user = TestUser::new(&sshd);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(M + 3, 143);
    fs::write(&src, &content).unwrap();
    let dst = user.home.join("copy.img");
    // Exactly the README's rule: -s works, and nothing else runs as root.
    let guard = SudoGuard::grant(&user, &blocksync::testing::sudoers_rule(&user.name));
    let args = ["-e", &sshd.rsh(), "-s", "-f", s(&src), &user.at(&dst)];
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    assert_eq!(fs::metadata(&dst).unwrap().uid(), 0, "written by root");
    let mine = fs::metadata(root_copy()).expect("root's own copy");
    assert_eq!((mine.uid(), mine.mode() & 0o077), (0, 0));
    assert_ne!(
        as_user(&user, &["sudo", "-n", "true"]),
        0,
        "the rule grants more"
    );

    // The user's copy replaced by a wrapper that leaves a marker, root's copy gone, and
    // sudo allowing anything: the wrapper is not run, as root or at all.
    let copy = user
        .home
        .join(format!(".cache/blocksync/blocksync-{}", id()));
    let marker = user.home.join("marker");
    script(
        &copy,
        &format!("id -u >{}\nexec {} \"$@\"", s(&marker), bin()),
    );
    sh("chown", &[&user.name, s(&copy)]);
    fs::remove_file(root_copy()).unwrap();
    drop(guard);
    let _guard = SudoGuard::grant(&user, &format!("{} ALL=(root) NOPASSWD: ALL", user.name));
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!marker.exists(), "ran the replaced copy");

    // Root's step itself refuses a copy that is not what the client asked for, even
    // when handed one directly (as a race past the login user's check would).
    script(&copy, &format!("id -u >{}", s(&marker)));
    fs::remove_file(root_copy()).unwrap();
    let step = blocksync::testing::ROOT_STEP;
    let cmd = [
        "sudo",
        "-n",
        "/bin/sh",
        "-c",
        step,
        "blocksync-root",
        &id(),
        s(&copy),
    ];
    assert_eq!(as_user(&user, &cmd), blocksync::testing::STALE_EXIT);
    assert!(!marker.exists(), "root ran the replaced copy");
    assert!(!root_copy().exists());
}

/// A tmpfs mounted noexec over a test user's home; unmounted, and the user's fallback
/// directory under /var/tmp removed, when the test ends.
struct NoexecHome {
    home: PathBuf,
    fallback: PathBuf,
}

impl Drop for NoexecHome {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.home)
            .output();
        let _ = fs::remove_dir_all(&self.fallback);
    }
}

#[test]
fn a_noexec_home_gets_a_copy_elsewhere_and_says_so() {
    let sshd = Sshd::start();
    let user = TestUser::new(&sshd);
    let uid = user.uid();
    let opts = format!("noexec,size=64m,mode=0755,uid={uid}");
    sh(
        "mount",
        &["-t", "tmpfs", "-o", &opts, "tmpfs", s(&user.home)],
    );
    let _home = NoexecHome {
        home: user.home.clone(),
        fallback: PathBuf::from(format!("/var/tmp/blocksync-{uid}")),
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(M, 144);
    fs::write(&src, &content).unwrap();
    let dst = user.home.join("copy.img");
    let args = ["-e", &sshd.rsh(), "-f", s(&src), &user.at(&dst)];
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    let err = stderr(&out);
    assert!(err.contains("cannot run programs"), "{err}");
    assert!(err.contains(&format!("/var/tmp/blocksync-{uid}")), "{err}");
    let copy = PathBuf::from(format!("/var/tmp/blocksync-{uid}/blocksync-{}", id()));
    let meta = fs::metadata(&copy).expect("the copy in the fallback");
    assert_eq!((meta.uid(), meta.mode() & 0o077), (uid, 0));
    assert_eq!(
        fs::metadata(copy.parent().unwrap()).unwrap().mode() & 0o777,
        0o700
    );
    // Found there next time, without a word.
    let out = run(&args);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stderr(&out).contains("note"), "{}", stderr(&out));
}
