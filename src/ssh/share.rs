//! One login for the connections a run makes: the probe, the deploy and the relaunch (and
//! with `-P`, the other `-w` streams) go through a private ssh ControlMaster, so a
//! password is asked once, not three times.
//!
//! The first connection is the master and carries its own session directly; only the
//! connections after it are relayed through it. The extra `-w` streams are relayed only
//! when `-P` gives a password: relayed, every stream's encryption runs on the master's
//! one core, which would undo what `-w` is for; with keys nothing is asked anyway.
//! Nothing is set up when the user's ssh config already names a ControlPath (theirs
//! applies), or when the remote shell (`-e`) is not ssh itself.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// The run's shared connection, decided on its first connect.
#[derive(Debug, Default)]
pub(crate) struct Share {
    /// The control socket, or `None` when no connection is shared.
    socket: OnceLock<Option<PathBuf>>,
    /// The master has been started (or tried).
    started: AtomicBool,
}

/// How one ssh invocation takes part in the shared connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Role {
    /// Not at all.
    Alone,
    /// The master: its socket is made at this path.
    Master(PathBuf),
    /// Through the master at this path (or on its own when the master is gone).
    Client(PathBuf),
}

impl Role {
    /// The ssh options for this role.
    pub fn options(&self) -> Vec<String> {
        match self {
            Role::Alone => Vec::new(),
            Role::Master(p) => vec![
                "-o".into(),
                "ControlMaster=yes".into(),
                "-o".into(),
                format!("ControlPath={}", p.display()),
                // The master ends with the last session, never lingers.
                "-o".into(),
                "ControlPersist=no".into(),
            ],
            Role::Client(p) => vec![
                "-o".into(),
                "ControlMaster=no".into(),
                "-o".into(),
                format!("ControlPath={}", p.display()),
            ],
        }
    }

    /// The role of the connections a probe in this role makes after it (the deploy
    /// and the relaunch): through the master.
    pub fn relayed(&self) -> Role {
        match self {
            Role::Alone => Role::Alone,
            Role::Master(p) | Role::Client(p) => Role::Client(p.clone()),
        }
    }

    /// Whether a master now holds the connection, so a session that ends early must
    /// wait to be released (the connections after it need the master).
    pub fn is_master(&self) -> bool {
        matches!(self, Role::Master(_))
    }
}

impl Share {
    /// The role of the next connection. `ssh_cmd` is the ssh command line without a
    /// host (to ask it for the user's config); `relay` says whether this connection may
    /// go through the master (the probe's deploy and relaunch, or any with `-P`).
    pub fn role(&self, ssh_cmd: &[String], host: &str, relay: bool) -> Role {
        let socket = self.socket.get_or_init(|| decide(ssh_cmd, host));
        let Some(socket) = socket else {
            return Role::Alone;
        };
        if !self.started.swap(true, Ordering::SeqCst) {
            return Role::Master(socket.clone());
        }
        if relay {
            Role::Client(socket.clone())
        } else {
            Role::Alone
        }
    }
}

/// The control socket for this run, when one may be set up.
fn decide(ssh_cmd: &[String], host: &str) -> Option<PathBuf> {
    let program = Path::new(ssh_cmd.first()?);
    if program.file_name()? != "ssh" || user_has_control_path(ssh_cmd, host) {
        return None;
    }
    let dir = private_dir()?;
    sweep(&dir);
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    Some(dir.join(format!("ssh-{}-{nonce:08x}", std::process::id())))
}

/// Whether `ssh -G` (the user's config for `host`, options included) names a ControlPath.
fn user_has_control_path(ssh_cmd: &[String], host: &str) -> bool {
    let out = std::process::Command::new(&ssh_cmd[0])
        .args(&ssh_cmd[1..])
        .arg("-G")
        .arg(host)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().any(|l| {
            l.strip_prefix("controlpath ")
                .is_some_and(|v| v.trim() != "none")
        }),
        // An ssh that cannot say: leave its connections alone.
        _ => true,
    }
}

/// A directory only this user can enter: `$XDG_RUNTIME_DIR/blocksync`, else
/// `/tmp/blocksync-UID`; `None` when it cannot be made so (someone else's, a symlink).
fn private_dir() -> Option<PathBuf> {
    let uid = rustix::process::getuid().as_raw();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(r) if Path::new(&r).is_absolute() => PathBuf::from(r).join("blocksync"),
        _ => std::env::temp_dir().join(format!("blocksync-{uid}")),
    };
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let private = meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o077 == 0;
    // A socket path is at most 108 bytes.
    (private && dir.as_os_str().len() < 70).then_some(dir)
}

/// Removes sockets left by runs that were killed (named by their pid).
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix("ssh-"))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_connection_is_the_master_and_only_relays_share_it() {
        let share = Share::default();
        let p = PathBuf::from("/run/x/ssh-1-0");
        share.socket.set(Some(p.clone())).unwrap();
        let cmd = vec!["ssh".to_string()];
        assert_eq!(share.role(&cmd, "h", false), Role::Master(p.clone()));
        assert_eq!(share.role(&cmd, "h", true), Role::Client(p.clone()));
        assert_eq!(share.role(&cmd, "h", false), Role::Alone);
        assert!(
            Role::Master(p.clone())
                .options()
                .contains(&"ControlMaster=yes".to_string())
        );
        assert!(
            Role::Client(p)
                .options()
                .contains(&"ControlMaster=no".to_string())
        );
    }

    #[test]
    fn a_remote_shell_that_is_not_ssh_shares_nothing() {
        let share = Share::default();
        let cmd = vec!["/usr/local/bin/my-wrapper".to_string(), "ssh".to_string()];
        assert_eq!(share.role(&cmd, "h", true), Role::Alone);
        assert_eq!(share.role(&cmd, "h", true), Role::Alone);
    }

    #[test]
    fn a_user_control_path_is_left_alone() {
        // ssh -G applies -o options given on the command line.
        let cmd: Vec<String> = ["ssh", "-o", "ControlPath=/tmp/mine-%C"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(user_has_control_path(&cmd, "example.invalid"));
        let none: Vec<String> = ["ssh", "-F", "/dev/null"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(!user_has_control_path(&none, "example.invalid"));
    }
}
