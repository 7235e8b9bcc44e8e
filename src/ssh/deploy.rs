//! Nothing to install on the remote machine: a launcher that finds a blocksync there (the
//! `-S` path, one on its PATH, or our cached copy), and, when there is none, this binary
//! copied into a private per-user cache.

use super::connect::{SshOptions, last_line};
use super::quote::quote;
use crate::error::{Error, Kind, Result};
use std::io::Write;
use std::process::Stdio;

/// Printed by the launcher when the remote has no blocksync to run.
pub(super) const DEPLOY_MARK: &str = "#BSDEPLOY";

/// Finds a blocksync on the remote and runs it in server mode: `-S` path, else one on the
/// PATH, else our own copy in the per-user cache; otherwise asks for a deploy.
pub(super) const LAUNCHER: &str = r##"c="${XDG_CACHE_HOME:-$HOME/.cache}/blocksync/blocksync-$1"
if [ -n "$3" ]; then b="$3"
elif command -v blocksync >/dev/null 2>&1; then b=blocksync
elif [ -x "$c" ]; then b="$c"
else echo "#BSDEPLOY $(uname -sm)"; exit 0; fi
if [ "$2" = 1 ]; then exec sudo -n "$b" --server; else exec "$b" --server; fi"##;

/// Stores stdin as the cached binary: private directory, temp file, size check, atomic
/// rename, so a partial copy is never run and nobody else can change it.
const INSTALLER: &str = r#"set -e
umask 077
d="${XDG_CACHE_HOME:-$HOME/.cache}/blocksync"
mkdir -p "$d"
chmod 700 "$d"
t=$(mktemp "$d/.incoming.XXXXXX")
trap 'rm -f "$t"' EXIT
cat >"$t"
[ "$(wc -c <"$t")" -eq "$2" ]
chmod 700 "$t"
mv -f "$t" "$d/blocksync-$1"
trap - EXIT"#;

/// A short identity of this executable (its BLAKE3, hex), naming the cached remote copy.
pub(super) fn self_id() -> Result<(String, Vec<u8>)> {
    let exe = std::fs::read("/proc/self/exe").map_err(|e| {
        Error::new(
            Kind::Internal,
            format!("reading own executable: {}", crate::error::os_text(&e)),
        )
    })?;
    let hex: String = blake3::hash(&exe).as_bytes()[..10]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, exe))
}

pub(super) fn local_platform() -> String {
    let u = rustix::system::uname();
    format!(
        "{} {}",
        u.sysname().to_string_lossy(),
        u.machine().to_string_lossy()
    )
}

impl SshOptions {
    /// Copies this binary to `host`'s cache as `blocksync-ID`.
    pub(super) fn deploy_to(&self, host: &str, id: &str, exe: &[u8]) -> Result<()> {
        let install = format!("sh -c {} blocksync {} {}", quote(INSTALLER), id, exe.len());
        let (mut child, stderr) = self.spawn(host, &install, Stdio::piped())?;
        let mut stdin = child.stdin.take().expect("piped");
        let wrote = stdin.write_all(exe);
        drop(stdin);
        let status = child.wait().map_err(|e| {
            Error::new(
                Kind::Remote,
                format!("waiting for ssh: {}", crate::error::os_text(&e)),
            )
        })?;
        if wrote.is_err() || !status.success() {
            let err = stderr.lock().map(|s| s.clone()).unwrap_or_default();
            return Err(Error::new(
                Kind::Remote,
                format!(
                    "copying blocksync to {host} failed{}; install it there and give -S",
                    last_line(&err)
                        .map(|l| format!(": {l}"))
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }
}
