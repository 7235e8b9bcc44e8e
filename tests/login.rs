//! One password prompt per run: the probe, the deploy and the relaunch share one ssh
//! login (a private ControlMaster), counted by an askpass program that ssh runs for
//! every password it asks.

mod common;

use common::sshd::{Sshd, TestUser};
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const M: usize = 1024 * 1024;

/// An askpass program that answers `password` and counts each question in `count`.
fn askpass(path: &Path, count: &Path, password: &str) {
    fs::write(
        path,
        format!(
            "#!/bin/sh\necho asked >> '{}'\nprintf '%s\\n' '{password}'\n",
            count.display()
        ),
    )
    .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn prompts(count: &Path) -> usize {
    fs::read_to_string(count)
        .unwrap_or_default()
        .lines()
        .count()
}

/// How many password logins sshd has accepted for `user`.
fn logins(sshd: &Sshd, user: &TestUser) -> usize {
    sshd.log()
        .matches(&format!("Accepted password for {} ", user.name))
        .count()
}

#[test]
fn a_first_run_with_a_password_asks_once() {
    let sshd = Sshd::start_with_passwords();
    let user = TestUser::new(&sshd);
    let password = "Pw-once-4417";
    user.set_password(password);
    let dir = tempfile::tempdir().unwrap();
    let (ask, count) = (dir.path().join("askpass"), dir.path().join("count"));
    askpass(&ask, &count, password);
    let src = dir.path().join("src");
    let content = data(6 * M, 4417);
    fs::write(&src, &content).unwrap();
    let dst = user.home.join("copy.img");
    // Password logins only, and no blocksync on the user's PATH: the first run probes,
    // copies this binary there and starts it again, three logins before this change.
    let rsh = format!(
        "{} -o BatchMode=no -o PubkeyAuthentication=no -o PreferredAuthentications=password -o NumberOfPasswordPrompts=1",
        sshd.rsh()
    );
    let to = user.at(&dst);
    let sync = |extra: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(["-e", &rsh, "-f", "-v", "-b", "64K"])
            .args(extra)
            .args([s(&src), &to])
            .env("SSH_ASKPASS", &ask)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env_remove("DISPLAY");
        let child_out = output_within(&mut cmd, "blocksync with a password", 120);
        assert!(child_out.status.success(), "{}", stderr(&child_out));
        child_out
    };
    let out = sync(&[]);
    assert!(
        stderr(&out).contains("copied there now"),
        "the run deployed: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("one login"), "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    assert_eq!(prompts(&count), 1, "the first run asked more than once");
    assert_eq!(logins(&sshd, &user), 1, "{}", sshd.log());

    // A run that finds its copy there asks once too.
    let mut changed = content.clone();
    changed[3 * M..3 * M + 100].fill(7);
    fs::write(&src, &changed).unwrap();
    let out = sync(&[]);
    assert!(stderr(&out).contains("reused"), "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), changed);
    assert_eq!(prompts(&count), 2);
    assert_eq!(logins(&sshd, &user), 2, "{}", sshd.log());

    // Nothing of the shared login outlives its run.
    wait_until(
        "no ssh of the shared login is left",
        Duration::from_secs(10),
        || {
            fs::read_dir("/proc").unwrap().flatten().all(|e| {
                !fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("ControlMaster=yes") && c.contains(&user.name)
                })
            })
        },
    );
}

#[test]
fn extra_streams_share_the_login_given_with_a_password_variable() {
    let sshd = Sshd::start_with_passwords();
    let user = TestUser::new(&sshd);
    let password = "Pw-streams-4418";
    user.set_password(password);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content = data(12 * M, 4418);
    fs::write(&src, &content).unwrap();
    let dst = user.home.join("copy.img");
    let rsh = format!(
        "{} -o BatchMode=no -o PubkeyAuthentication=no -o PreferredAuthentications=password",
        sshd.rsh()
    );
    let mut cmd = Command::new(bin());
    cmd.args([
        "-e",
        &rsh,
        "-P",
        "BS_LOGIN_PW",
        "-w",
        "3",
        "-f",
        "-b",
        "64K",
    ])
    .args([s(&src), &user.at(&dst)])
    .env("BS_LOGIN_PW", password);
    let out = output_within(&mut cmd, "blocksync -w 3 -P", 120);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::read(&dst).unwrap(), content);
    // Every stream went through the one master: sshd saw a single login.
    assert_eq!(logins(&sshd, &user), 1, "{}", sshd.log());
}
