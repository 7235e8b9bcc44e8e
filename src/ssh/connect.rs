//! Reaching the other machine: the system `ssh` client (so the user's config, agent,
//! ProxyJump and known_hosts apply) running the same blocksync binary in server mode on
//! the remote side, found on its PATH, given with `-S`, or copied there on first use.

use super::deploy::{DEPLOY_MARK, NO_HASH_MARK, ROOT_STEP, launcher, local_platform, self_id};
use super::quote::quote;
use super::share::{Role, Share};
use super::watch::{Clock, Watched};
use crate::error::{Error, Kind, Result, harmless, peer_text};
use crate::wire::frame::GREETING;
use std::io::Read;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How to start the remote side.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    /// The remote shell command, split (`ssh` unless `-e`).
    pub program: Vec<String>,
    /// `-c` cipher.
    pub cipher: Option<String>,
    /// `-i` identity file.
    pub identity: Option<String>,
    /// `-x` extra arguments, split.
    pub extra: Vec<String>,
    /// `-P`: the name of the environment variable holding the password (for sshpass).
    pub pass_env: Option<String>,
    /// `-s`: run the remote side under `sudo -n`.
    pub sudo: bool,
    /// `-S`: the remote blocksync path.
    pub remote_bin: Option<String>,
    /// Copy this binary to the remote when it has none (default on).
    pub deploy: bool,
    /// `--timeout`: how long the link may stand still while this side waits on it
    /// (`None`: forever).
    pub timeout: Option<Duration>,
    /// The run's one login, shared by its connections (see [`super::share`]).
    pub share: Arc<Share>,
}

/// What a started ssh prints on stderr, gathered by a thread of its own.
pub(super) struct Stderr {
    pub text: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Stderr {
    /// All of it, once ssh has ended: waits (a little) for the last of it to be read.
    pub fn settled(&self) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !self.reader.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.text.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A running remote side: its stdin and stdout carry the protocol.
pub struct Connection {
    /// The ssh process.
    pub child: Child,
    /// To the remote side.
    pub writer: Watched<ChildStdin>,
    /// From the remote side (the greeting already consumed).
    pub reader: Watched<ChildStdout>,
    /// What ssh and the remote side printed on stderr (for error messages).
    pub stderr: Arc<Mutex<String>>,
    /// The host, for messages.
    pub host: String,
    /// What the user should know about how the remote side was started (a copy made
    /// again, or put elsewhere than usual).
    pub notes: Vec<String>,
    /// What `-v` shows: the ssh command line, and how the remote blocksync was found
    /// (given with -S, reused, or copied there) and which it is.
    pub details: Vec<String>,
}

impl SshOptions {
    /// The remote shell's words up to the host: the program and every option given.
    fn ssh_words(&self) -> Vec<String> {
        let mut words = self.program.clone();
        if self.program.len() == 1 && self.program[0] == "ssh" {
            // A dead peer or link is noticed in seconds, not at the TCP timeout.
            words.extend(
                ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"].map(String::from),
            );
        }
        if let Some(c) = &self.cipher {
            words.extend(["-c".to_string(), c.clone()]);
        }
        if let Some(i) = &self.identity {
            words.extend(["-i".to_string(), i.clone()]);
        }
        words.extend(self.extra.iter().cloned());
        words
    }

    fn command(&self, host: &str, remote: &str, role: &Role) -> Result<Command> {
        let words = self.ssh_words();
        let mut cmd = match &self.pass_env {
            Some(var) => {
                let pw = password(var)?;
                let mut c = Command::new("sshpass");
                // sshpass -e reads SSHPASS (and clears it), so the password never shows
                // in ps; the user's variable is kept from ssh and everything it runs.
                c.arg("-e").env_remove(var).env("SSHPASS", pw).args(&words);
                c
            }
            None => {
                let mut c = Command::new(&words[0]);
                c.args(&words[1..]);
                c
            }
        };
        cmd.args(role.options());
        cmd.arg(host).arg(remote);
        Ok(cmd)
    }

    /// The role of a new connection in the run's shared login; `relay`: it may go
    /// through the master (see [`super::share`]).
    pub(super) fn role(&self, host: &str, relay: bool) -> Role {
        self.share
            .role(&self.ssh_words(), host, relay || self.pass_env.is_some())
    }

    /// The command line as `-v` shows it (a password is never on it: sshpass reads it
    /// from the environment).
    fn shown_command(&self, host: &str, remote: &str, role: &Role) -> String {
        match self.command(host, remote, role) {
            Ok(cmd) => std::iter::once(cmd.get_program())
                .chain(cmd.get_args())
                .map(|a| super::quote::quote(&a.to_string_lossy()))
                .collect::<Vec<_>>()
                .join(" "),
            Err(e) => format!("(cannot be built: {})", e.message),
        }
    }

    pub(super) fn spawn(
        &self,
        host: &str,
        remote: &str,
        role: &Role,
        stdin: Stdio,
    ) -> Result<(Child, Stderr)> {
        let mut cmd = self.command(host, remote, role)?;
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            let prog = if self.pass_env.is_some() {
                "sshpass"
            } else {
                self.program[0].as_str()
            };
            Error::new(
                Kind::Remote,
                format!(
                    "cannot run {prog}: {}; install it (openssh-client{}) or pass -e",
                    crate::error::os_text(&e),
                    if self.pass_env.is_some() {
                        ", sshpass"
                    } else {
                        ""
                    }
                ),
            )
        })?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                if let Ok(mut s) = sink.lock()
                    && s.len() < 64 * 1024
                {
                    s.push_str(&text);
                }
            }
        });
        Ok((
            child,
            Stderr {
                text: stderr,
                reader,
            },
        ))
    }

    /// Starts the remote side on `host` and waits for its greeting, deploying this binary
    /// first when the remote has none (or its copy failed its check).
    pub fn connect(&self, host: &str) -> Result<Connection> {
        let (id, exe) = self_id()?;
        let mut notes = Vec::new();
        let mut details = Vec::new();
        let mut role = self.role(host, false);
        // A probe that is the shared login's master stays until the connections after
        // it are made through it (see [`Held`]).
        let mut _held: Option<Held> = None;
        for attempt in 0..2 {
            let launch = self.launch_words(&id, role.is_master());
            details.push(format!(
                "ssh command: {}",
                self.shown_command(host, &launch, &role)
            ));
            if let Role::Master(p) = &role {
                details.push(format!(
                    "{host}: one login for this run's connections (ControlMaster {})",
                    p.display()
                ));
            }
            let (mut child, stderr) = self.spawn(host, &launch, &role, Stdio::piped())?;
            let writer = child.stdin.take().expect("piped");
            let mut reader = child.stdout.take().expect("piped");
            widen_pipe(&writer);
            widen_pipe(&reader);
            let mut head = [0u8; 8];
            let got = read_up_to(&mut reader, &mut head);
            if got == GREETING.len() && &head == GREETING {
                let found = match (&self.remote_bin, attempt) {
                    (Some(b), _) => format!("the blocksync given with -S ({b})"),
                    (None, 0) => {
                        "this binary's copy kept there, checked (sha256) and reused".into()
                    }
                    (None, _) => "this binary, copied there now and checked (sha256)".into(),
                };
                details.push(format!(
                    "{host}: runs {found}; blocksync {} here, protocol {}, id {}",
                    env!("CARGO_PKG_VERSION"),
                    crate::wire::frame::VERSION,
                    &id[..id.len().min(16)]
                ));
                // Watched from here on: before the greeting, ssh may be asking for a
                // password or a host key, which takes as long as the user does.
                let clock = self.timeout.map(Clock::new);
                return Ok(Connection {
                    child,
                    writer: Watched::new(writer, clock.clone()),
                    reader: Watched::new(reader, clock),
                    stderr: stderr.text,
                    host: host.to_string(),
                    notes,
                    details,
                });
            }
            let mut out = head[..got].to_vec();
            let holding = role.is_master() && attempt == 0;
            if holding {
                read_line(&mut reader, &mut out);
            }
            let (writer, status) = match out.starts_with(DEPLOY_MARK.as_bytes()) {
                true if holding => (Some(writer), None),
                _ => {
                    // Not a server: nothing more goes to it. Closing its input first
                    // lets a wrapper in -e that copies stdin (a rate limiter, say) end too.
                    drop(writer);
                    let _ = (&mut reader).take(4096).read_to_end(&mut out);
                    (None, child.wait().ok())
                }
            };
            let out = String::from_utf8_lossy(&out).to_string();
            if let Some(mark) = out.strip_prefix(DEPLOY_MARK) {
                if let Some(w) = writer {
                    _held = Some(Held {
                        child: Some(child),
                        writer: Some(w),
                    });
                }
                let (stale, platform) = match mark.trim().strip_prefix("stale ") {
                    Some(p) => (true, p.trim()),
                    None => (false, mark.trim()),
                };
                self.may_deploy(host, platform)?;
                if attempt == 0 {
                    if stale {
                        notes.push(format!(
                            "{host}: the copy of blocksync kept there is not this binary (changed or damaged since it was put there); copying it again"
                        ));
                    }
                    role = role.relayed();
                    notes.extend(self.deploy_to(host, &id, &exe, &role)?);
                    continue;
                }
            }
            if out.trim() == NO_HASH_MARK {
                return Err(Error::new(
                    Kind::Remote,
                    format!(
                        "sudo on {host}: root has no sha256sum to check the copy of blocksync it would run; install blocksync there and give -S"
                    ),
                ));
            }
            return Err(start_failure(host, self, status, &stderr.settled(), &out));
        }
        Err(Error::new(
            Kind::Remote,
            format!("{host}: the deployed blocksync did not start"),
        ))
    }

    /// The remote command that starts the launcher; `hold`: a launcher that asks for a
    /// deploy waits until its input ends (it carries the shared login meanwhile).
    fn launch_words(&self, id: &str, hold: bool) -> String {
        let bin = self.remote_bin.clone().unwrap_or_default();
        format!(
            "sh -c {} blocksync {} {} {} {} {}",
            quote(&launcher()),
            id,
            if self.sudo { 1 } else { 0 },
            quote(&bin),
            quote(ROOT_STEP),
            if hold { 1 } else { 0 }
        )
    }

    /// Whether this binary may be copied to `host`, which runs `platform`.
    fn may_deploy(&self, host: &str, platform: &str) -> Result<()> {
        if !self.deploy {
            return Err(Error::new(
                Kind::Remote,
                format!(
                    "{host} has no blocksync on its PATH; install it there, give its path with -S, or drop --no-deploy"
                ),
            ));
        }
        let mine = local_platform();
        if platform != mine {
            return Err(Error::new(
                Kind::Remote,
                format!(
                    "{host} runs {} and has no blocksync; this binary is for {mine}: install blocksync there and give -S",
                    harmless(platform)
                ),
            ));
        }
        Ok(())
    }
}

/// The password `-P` names. A value that is not a variable name may be the password
/// itself: it is never repeated in the error (which also goes to the `-o` log).
fn password(var: &str) -> Result<String> {
    let name = var.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !name {
        return Err(Error::new(
            Kind::Usage,
            "-P takes the name of an environment variable that holds the ssh password, and what was given is no variable name (not shown, in case it is the password); export the password, e.g. as SSHPASS, and give -P SSHPASS",
        ));
    }
    std::env::var(var).map_err(|_| {
        Error::new(
            Kind::Usage,
            format!(
                "-P {var}: environment variable {var} is not set; export it with the ssh password"
            ),
        )
    })
}

/// A probe session kept open while the connections after it are made: its ssh is the
/// shared login's master. Dropped (when `connect` returns, whichever way), it ends the
/// probe's session; the master stays while the sessions made through it last, and a
/// thread reaps it then.
struct Held {
    child: Option<Child>,
    writer: Option<ChildStdin>,
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.writer.take());
        if let Some(mut child) = self.child.take() {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}

/// Reads into `out` until it holds a newline or 4 KiB, or the stream ends.
fn read_line(r: &mut impl Read, out: &mut Vec<u8>) {
    let mut byte = [0u8; 1];
    while !out.contains(&b'\n') && out.len() < 4096 {
        match r.read(&mut byte) {
            Ok(1) => out.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    got
}

/// The last non-empty line of `text`, trimmed (what ssh said last).
pub(crate) fn last_line(text: &str) -> Option<&str> {
    text.lines().map(str::trim).rfind(|l| !l.is_empty())
}

/// One line saying why the remote side did not start.
fn start_failure(
    host: &str,
    opts: &SshOptions,
    status: Option<std::process::ExitStatus>,
    stderr: &str,
    stdout: &str,
) -> Error {
    let code = status.and_then(|s| s.code());
    // The whole of what the remote said (bounded, escaped): its last line alone often
    // hides the cause.
    let detail = peer_text(stderr);
    let msg = if stderr.contains("a password is required")
        || stderr.contains("a terminal is required")
    {
        format!(
            "sudo on {host} wants a password; allow blocksync passwordless sudo there (the README gives the sudoers rule), or connect as root"
        )
    } else if code == Some(255) {
        format!(
            "ssh could not connect to {host}: {}; check the host name, your keys and `ssh {host}`",
            harmless(last_line(stderr).unwrap_or(""))
        )
    } else if code == Some(127) || code == Some(126) {
        match &opts.remote_bin {
            Some(b) => format!("{host}: cannot run {b}: {detail}; check the path given with -S"),
            None => format!("{host}: cannot run blocksync: {detail}"),
        }
    } else if !stdout.trim().is_empty() {
        format!(
            "{host} printed \"{}\" instead of starting blocksync; a shell startup file may print text, or the remote blocksync is not this tool",
            harmless(&stdout.chars().take(200).collect::<String>())
        )
    } else {
        format!(
            "the remote side on {host} did not start{}",
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        )
    };
    Error::new(Kind::Remote, msg)
}

/// Bytes a pipe to or from ssh may hold (Linux's default limit for unprivileged users).
const PIPE_SIZE: usize = 1 << 20;

/// Widens a pipe from its default 64 KiB to [`PIPE_SIZE`], so a whole block passes
/// between blocksync and ssh in one go rather than in 16 handovers, each waking the other
/// side. A hint: `fd` may be no pipe (a socket from sshd), or the limit lower.
pub fn widen_pipe(fd: impl std::os::fd::AsFd) {
    let _ = rustix::pipe::fcntl_setpipe_size(fd, PIPE_SIZE);
}
