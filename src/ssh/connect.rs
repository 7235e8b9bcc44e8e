//! Reaching the other machine: the system `ssh` client (so the user's config, agent,
//! ProxyJump and known_hosts apply) running the same blocksync binary in server mode on
//! the remote side, found on its PATH, given with `-S`, or copied there on first use.

use super::deploy::{DEPLOY_MARK, LAUNCHER, local_platform, self_id};
use super::quote::quote;
use crate::error::{Error, Kind, Result};
use crate::wire::frame::GREETING;
use std::io::Read;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

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
}

/// A running remote side: its stdin and stdout carry the protocol.
pub struct Connection {
    /// The ssh process.
    pub child: Child,
    /// To the remote side.
    pub writer: ChildStdin,
    /// From the remote side (the greeting already consumed).
    pub reader: ChildStdout,
    /// What ssh and the remote side printed on stderr (for error messages).
    pub stderr: Arc<Mutex<String>>,
    /// The host, for messages.
    pub host: String,
}

impl SshOptions {
    fn command(&self, host: &str, remote: &str) -> Result<Command> {
        let (mut cmd, default_ssh) = match &self.pass_env {
            Some(var) => {
                let pw = std::env::var(var).map_err(|_| {
                    Error::new(
                        Kind::Usage,
                        format!("-P {var}: environment variable {var} is not set; export it with the ssh password"),
                    )
                })?;
                let mut c = Command::new("sshpass");
                // sshpass -e reads SSHPASS, so the password never shows in ps.
                c.arg("-e").env("SSHPASS", pw).args(&self.program);
                (c, self.program.len() == 1 && self.program[0] == "ssh")
            }
            None => {
                let mut c = Command::new(&self.program[0]);
                c.args(&self.program[1..]);
                (c, self.program.len() == 1 && self.program[0] == "ssh")
            }
        };
        if default_ssh {
            // A dead peer or link is noticed in seconds, not at the TCP timeout.
            cmd.args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]);
        }
        if let Some(c) = &self.cipher {
            cmd.args(["-c", c]);
        }
        if let Some(i) = &self.identity {
            cmd.args(["-i", i]);
        }
        cmd.args(&self.extra);
        cmd.arg(host).arg(remote);
        Ok(cmd)
    }

    pub(super) fn spawn(
        &self,
        host: &str,
        remote: &str,
        stdin: Stdio,
    ) -> Result<(Child, Arc<Mutex<String>>)> {
        let mut cmd = self.command(host, remote)?;
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
        std::thread::spawn(move || {
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
        Ok((child, stderr))
    }

    /// Starts the remote side on `host` and waits for its greeting, deploying this binary
    /// first when the remote has none.
    pub fn connect(&self, host: &str) -> Result<Connection> {
        let (id, exe) = self_id()?;
        let bin = self.remote_bin.clone().unwrap_or_default();
        let launch = format!(
            "sh -c {} blocksync {} {} {}",
            quote(LAUNCHER),
            id,
            if self.sudo { 1 } else { 0 },
            quote(&bin)
        );
        for attempt in 0..2 {
            let (mut child, stderr) = self.spawn(host, &launch, Stdio::piped())?;
            let writer = child.stdin.take().expect("piped");
            let mut reader = child.stdout.take().expect("piped");
            widen_pipe(&writer);
            widen_pipe(&reader);
            let mut head = [0u8; 8];
            let got = read_up_to(&mut reader, &mut head);
            if got == GREETING.len() && &head == GREETING {
                return Ok(Connection {
                    child,
                    writer,
                    reader,
                    stderr,
                    host: host.to_string(),
                });
            }
            // Not a server: nothing more goes to it. Closing its input first lets a
            // wrapper in -e that copies stdin (a rate limiter, say) end too.
            drop(writer);
            let mut rest = Vec::new();
            let _ = reader.take(4096).read_to_end(&mut rest);
            let status = child.wait().ok();
            let mut out = head[..got].to_vec();
            out.extend_from_slice(&rest);
            let out = String::from_utf8_lossy(&out).to_string();
            if let Some(platform) = out.strip_prefix(DEPLOY_MARK) {
                let platform = platform.trim();
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
                            "{host} runs {platform} and has no blocksync; this binary is for {mine}: install blocksync there and give -S"
                        ),
                    ));
                }
                if attempt == 0 {
                    self.deploy_to(host, &id, &exe)?;
                    continue;
                }
            }
            let err = stderr.lock().map(|s| s.clone()).unwrap_or_default();
            return Err(start_failure(host, self, status, &err, &out));
        }
        Err(Error::new(
            Kind::Remote,
            format!("{host}: the deployed blocksync did not start"),
        ))
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
    let detail = last_line(stderr).unwrap_or("");
    let msg = if stderr.contains("a password is required")
        || stderr.contains("a terminal is required")
    {
        format!(
            "sudo on {host} wants a password; allow passwordless sudo (NOPASSWD) for blocksync there, or connect as root"
        )
    } else if code == Some(255) {
        format!(
            "ssh could not connect to {host}: {detail}; check the host name, your keys and `ssh {host}`"
        )
    } else if code == Some(127) || code == Some(126) {
        match &opts.remote_bin {
            Some(b) => format!("{host}: cannot run {b}: {detail}; check the path given with -S"),
            None => format!("{host}: cannot run blocksync: {detail}"),
        }
    } else if !stdout.trim().is_empty() {
        format!(
            "{host} printed {:?} instead of starting blocksync; a shell startup file may print text, or the remote blocksync is not this tool",
            stdout.chars().take(60).collect::<String>()
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
