//! A real sshd on a free loopback port with throwaway host and user keys, plus an ssh
//! config naming it `testhost`. Stopped and removed on drop, even when a test fails.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running test sshd.
pub struct Sshd {
    child: Child,
    /// Holds keys, config, logs and the remote cache dir.
    pub dir: tempfile::TempDir,
    /// The port it listens on.
    pub port: u16,
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (install openssh-client)");
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sshd {
    /// Starts sshd, retrying on another port if the one picked was taken meanwhile.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// [`Sshd::start`], also taking passwords (for `-P`; the test user's password is set
    /// with [`TestUser::set_password`]).
    pub fn start_with_passwords() -> Self {
        Self::start_with(true)
    }

    fn start_with(passwords: bool) -> Self {
        super::require_root();
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "these tests need sshd: apt-get install openssh-server (.ci/run does)"
        );
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut last_log = String::new();
        for _ in 0..5 {
            match Self::try_start(passwords) {
                Ok(s) => return s,
                Err(log) => last_log = log,
            }
        }
        panic!("sshd did not start: {last_log}");
    }

    fn try_start(passwords: bool) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("user_key"));
        std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir(d.join("cache")).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nPermitRootLogin yes\n\
             PasswordAuthentication {pw}\nKbdInteractiveAuthentication no\nUsePAM no\n\
             LogLevel {level}\nMatch User root\n  SetEnv XDG_CACHE_HOME={d}/cache XDG_STATE_HOME={d}/state\n",
            d = d.display(),
            pw = if passwords { "yes" } else { "no" },
            // With passwords, the log says each login ("Accepted password for").
            level = if passwords { "INFO" } else { "ERROR" }
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let client = format!(
            "Host testhost\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {d}/user_key\n\
             \x20 IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n\
             \x20 LogLevel ERROR\n  BatchMode yes\n",
            d = d.display()
        );
        std::fs::write(d.join("ssh_config"), client).unwrap();
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let mut sshd = Sshd { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(sshd);
            }
            if let Ok(Some(_)) = sshd.child.try_wait() {
                break; // the port was taken meanwhile
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(sshd.log())
    }

    /// The ssh client config that defines `testhost`.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    /// `-e` argument for blocksync: ssh with our config.
    pub fn rsh(&self) -> String {
        format!("ssh -F {}", self.ssh_config().display())
    }

    /// The remote side's per-user cache (XDG_CACHE_HOME of sessions).
    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Waits (up to 20 s: logins are slow on a loaded machine) until a blocksync runs
    /// through this sshd, then kills (SIGKILL) every such process; returns how many.
    pub fn kill_remote_servers(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = self.kill_remote_servers_now();
            if n > 0 || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills (SIGKILL) every blocksync process started through this sshd; returns how many.
    /// Only this sshd's descendants, so parallel tests are left alone.
    pub fn kill_remote_servers_now(&self) -> usize {
        self.signal_remote_servers("KILL")
    }

    /// Sends `signal` (a `kill` name: KILL, STOP, CONT) to every blocksync process started
    /// through this sshd; returns how many.
    pub fn signal_remote_servers(&self, signal: &str) -> usize {
        let pids = descendants_named(self.child.id(), "blocksync");
        for pid in &pids {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
        pids.len()
    }

    /// sshd's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

/// The parent of process `pid`, from /proc.
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(1)?.parse().ok()
}

/// The processes below `root` whose name starts with `name`.
pub fn descendants_named(root: u32, name: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !comm.starts_with(name) {
            continue;
        }
        let mut p = pid;
        while let Some(pp) = parent_of(p) {
            if pp == root {
                found.push(pid);
                break;
            }
            if pp <= 1 {
                break;
            }
            p = pp;
        }
    }
    found
}

/// A throwaway local user that can log in through the test sshd (same key), with a home
/// in a temp dir. Deleted on drop.
pub struct TestUser {
    /// The login name.
    pub name: String,
    /// Its home directory.
    pub home: PathBuf,
}

impl TestUser {
    /// Creates a user with no password (so sudo wants one) and no blocksync on its PATH.
    pub fn new(sshd: &Sshd) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("bst{}x{n}", std::process::id());
        let home = sshd.dir.path().join(format!("home-{name}"));
        // useradd/userdel lock /etc/passwd: one at a time in this process, and retry
        // while another process holds the lock.
        let _serial = USERS.lock().unwrap_or_else(|e| e.into_inner());
        let mut tries = 0;
        loop {
            let out = Command::new("useradd")
                // Password "*": no password works, yet the account is not locked (sshd
                // without PAM refuses locked accounts even with a valid key).
                .args(["-M", "-p", "*", "-s", "/bin/sh", "-d"])
                .arg(&home)
                .arg(&name)
                .output()
                .expect("useradd");
            if out.status.success() {
                break;
            }
            tries += 1;
            assert!(
                tries < 50,
                "useradd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::fs::create_dir(&home).unwrap();
        let chown = Command::new("chown")
            .arg(format!("{name}:"))
            .arg(&home)
            .status()
            .unwrap();
        assert!(chown.success());
        // sshd runs as root and must reach the user's home through the temp dir.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(sshd.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        TestUser { name, home }
    }

    /// Gives the user `password` (sshd started by [`Sshd::start_with_passwords`] takes it).
    pub fn set_password(&self, password: &str) {
        use std::io::Write;
        let mut child = Command::new("chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .expect("chpasswd");
        let line = format!("{}:{password}\n", self.name);
        child
            .stdin
            .take()
            .unwrap()
            .write_all(line.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "chpasswd");
    }

    /// The user's uid.
    pub fn uid(&self) -> u32 {
        super::sh("id", &["-u", &self.name]).parse().unwrap()
    }

    /// Passwordless sudo for this user would need sudoers; this one has none.
    pub fn at(&self, path: &Path) -> String {
        format!("{}@testhost:{}", self.name, path.display())
    }
}

/// Serializes user creation and removal within the test process.
static USERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for TestUser {
    fn drop(&mut self) {
        let _serial = USERS.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..50 {
            let ok = Command::new("userdel")
                .arg("-f")
                .arg(&self.name)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
