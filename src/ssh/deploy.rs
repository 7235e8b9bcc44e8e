//! Nothing to install on the remote machine: a launcher that finds a blocksync there (the
//! `-S` path, one on its PATH, or our cached copy), and, when there is none, this binary
//! copied into a private per-user directory. A copy is named and checked by its SHA-256,
//! at install and before every run, so a corrupted or replaced copy is copied again,
//! never run; under `-s`, root runs only a copy of its own that it checked.

use super::connect::SshOptions;
use super::quote::quote;
use crate::error::{Error, Kind, Result, peer_text};
use sha2::Digest as _;
use std::io::{Read as _, Write};
use std::process::Stdio;

/// Printed by the launcher when the remote has no usable blocksync: `#BSDEPLOY
/// [stale ]SYSTEM MACHINE` (stale: a cached copy was there and failed its check).
pub(super) const DEPLOY_MARK: &str = "#BSDEPLOY";

/// Printed by the launcher under `-s` when root has no tool to check a copy with.
pub(super) const NO_HASH_MARK: &str = "#BSNOHASH";

/// Prints the SHA-256 of file `$1`, or nothing when there is no tool for it.
const HASH_FN: &str = r#"h() { { sha256sum "$1" || shasum -a 256 "$1" || openssl dgst -sha256 -r "$1"; } 2>/dev/null | { read -r s _ && echo "$s"; }; }"#;

/// The private directories a copy may live in, best first: the user's cache, the
/// runtime directory, and one of the user's own under /var/tmp (for a noexec home).
const PLACES: &str = r#"c="${XDG_CACHE_HOME:-$HOME/.cache}/blocksync"
r="${XDG_RUNTIME_DIR:+$XDG_RUNTIME_DIR/blocksync}"
v="/var/tmp/blocksync-$(id -u)""#;

/// Finds a blocksync on the remote and runs it in server mode: `-S` path ($3), else one
/// on the PATH, else our copy named by its hash ($1) if it still has that hash; otherwise
/// asks for a deploy, then with $5 = 1 waits until its input ends (its session carries
/// the run's shared login meanwhile). With `-s` ($2), a copy runs through the root step ($4).
const LAUNCHER_BODY: &str = r##"x= k="$5"
if [ -n "$3" ]; then b="$3"
elif command -v blocksync >/dev/null 2>&1; then b=blocksync
else
  b= t=
  for d in "$c" "$r" "$v"; do
    f="$d/blocksync-$1"
    [ -n "$d" ] && [ -f "$f" ] || continue
    s=$(h "$f")
    if [ -z "$s" ] || [ "$s" = "$1" ]; then b="$f"; break; fi
    t="stale "
  done
  [ -n "$b" ] || { echo "#BSDEPLOY $t$(uname -sm)"; [ "$k" != 1 ] || read -r _; exit 0; }
  x=1
fi
if [ "$2" != 1 ]; then
  [ -z "$x" ] || exec "$b" --server --expect "$1"
  exec "$b" --server
fi
[ -n "$x" ] || exec sudo -n "$b" --server
sudo -n /bin/sh -c "$4" blocksync-root "$1" "$b"
e=$?
[ $e != 97 ] || { echo "#BSDEPLOY stale $(uname -sm)"; [ "$k" != 1 ] || read -r _; }
[ $e != 98 ] || echo "#BSNOHASH"
exit $e"##;

/// Run by root under `-s` (one line, so a sudoers rule can name it exactly): copies the
/// user's copy ($2) into root's own 0700 directory unless a copy with hash $1 is already
/// there, checks the copy's hash, and runs it. Exit 97: the hash differs; 98: no tool.
pub const ROOT_STEP: &str = r#"umask 077; h() { { sha256sum "$1" || shasum -a 256 "$1"; } 2>/dev/null | { read -r s _ && echo "$s"; }; }; d=/var/cache/blocksync; mkdir -p "$d" && test -d "$d" && test ! -L "$d" && chown 0:0 "$d" && chmod 700 "$d" || exit 99; f="$d/blocksync-$1"; if test "$(h "$f")" != "$1"; then test -n "$(h "$2")" || exit 98; t=$(mktemp "$d/.incoming.XXXXXX") || exit 99; cat <"$2" >"$t" && test "$(h "$t")" = "$1" || { rm -f "$t"; exit 97; }; chmod 700 "$t" && mv -f "$t" "$f" || exit 99; fi; exec "$f" --server --expect "$1""#;

/// Stores stdin ($2 bytes, SHA-256 $1) in the first private directory that can run it:
/// a temp file, size and hash checked, a trial run, then an atomic rename, so a partial
/// or corrupted copy is never run and nobody else can change it. Says on stdout where it
/// went (`#BSINSTALLED DIR`), which places could not run programs (`#BSNOEXEC DIR`), or
/// why it refused (`#BSBAD ...`, `#BSNOPLACE`).
const INSTALLER_BODY: &str = r##"umask 077
t=
trap 'rm -f "$t"' EXIT
for d in "$c" "$r" "$v"; do
  [ -n "$d" ] || continue
  mkdir -p "$d" 2>/dev/null
  [ -d "$d" ] && [ ! -L "$d" ] && [ -O "$d" ] && chmod 700 "$d" || continue
  n=$(mktemp "$d/.incoming.XXXXXX") || continue
  if [ -z "$t" ]; then cat >"$n"; else cat <"$t" >"$n"; rm -f "$t"; fi
  t="$n"
  z=$(wc -c <"$t")
  [ "$z" -eq "$2" ] || { echo "#BSBAD $z bytes arrived, not $2"; exit 3; }
  s=$(h "$t")
  [ -z "$s" ] || [ "$s" = "$1" ] || { echo "#BSBAD its SHA-256 is $s"; exit 3; }
  chmod 700 "$t"
  "$t" --server --expect "$1" --check >/dev/null 2>&1
  e=$?
  [ $e != 97 ] || { echo "#BSBAD it does not hash to its name"; exit 3; }
  if [ $e = 0 ] && mv -f "$t" "$d/blocksync-$1"; then t=; echo "#BSINSTALLED $d"; exit 0; fi
  echo "#BSNOEXEC $d"
done
echo "#BSNOPLACE"
exit 4"##;

/// The launcher script: the hash function and places, then its body.
pub(super) fn launcher() -> String {
    format!("{HASH_FN}\n{PLACES}\n{LAUNCHER_BODY}")
}

fn installer() -> String {
    format!("{HASH_FN}\n{PLACES}\n{INSTALLER_BODY}")
}

/// The exit code with which a copy that does not hash to the id it was asked for (or a
/// root step that found such a copy) stops.
pub const STALE_EXIT: i32 = 97;

/// The sudoers rule that lets `user` run `-s` syncs through a self-deployed copy, and
/// nothing else: the root step, word for word, with any id and copy.
pub fn sudoers_rule(user: &str) -> String {
    let mut step = String::new();
    for c in ROOT_STEP.chars() {
        // Characters sudoers reads as syntax in a command's arguments (the step holds
        // none of its wildcards, `*?[]`, so it matches only itself).
        if "\\,:=".contains(c) {
            step.push('\\');
        }
        step.push(c);
    }
    format!("{user} ALL=(root) NOPASSWD: /bin/sh -c {step} blocksync-root *")
}

/// The SHA-256 of an executable, hex: the name and check of its remote copy.
pub fn hash_hex(exe: &[u8]) -> String {
    sha2::Sha256::digest(exe)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// This executable's id (the SHA-256 of /proc/self/exe, hex) and its bytes.
pub(super) fn self_id() -> Result<(String, Vec<u8>)> {
    let exe = std::fs::read("/proc/self/exe").map_err(|e| {
        Error::new(
            Kind::Internal,
            format!("reading own executable: {}", crate::error::os_text(&e)),
        )
    })?;
    Ok((hash_hex(&exe), exe))
}

/// Whether the running executable hashes to `id` (server mode's check before it serves).
/// Read through /proc/self/exe, or the path it was started by where there is no /proc
/// (a bare chroot).
pub fn is_self(id: &str) -> bool {
    let exe = std::fs::read("/proc/self/exe")
        .or_else(|_| std::fs::read(std::env::args_os().next().unwrap_or_default()));
    exe.is_ok_and(|exe| hash_hex(&exe) == id)
}

pub(super) fn local_platform() -> String {
    let u = rustix::system::uname();
    format!(
        "{} {}",
        u.sysname().to_string_lossy(),
        u.machine().to_string_lossy()
    )
}

/// Where the installer says a copy went or why it did not: notes for the user, or the
/// error.
fn installer_verdict(host: &str, out: &str, stderr: &str) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let mut noexec = Vec::new();
    for line in out.lines() {
        if let Some(dir) = line.strip_prefix("#BSNOEXEC ") {
            noexec.push(dir.to_string());
        } else if let Some(dir) = line.strip_prefix("#BSINSTALLED ") {
            if !noexec.is_empty() {
                notes.push(format!(
                    "{host}: {} cannot run programs (mounted noexec?); blocksync keeps its copy in {dir} instead",
                    noexec.join(" and ")
                ));
            }
            return Ok(notes);
        } else if let Some(why) = line.strip_prefix("#BSBAD ") {
            return Err(Error::new(
                Kind::Remote,
                format!(
                    "the copy of blocksync that reached {host} is not this binary ({why}); it was corrupted on the way and is not installed: check the link or the -e command, or install blocksync there and give -S"
                ),
            ));
        } else if line == "#BSNOPLACE" {
            let tried = if noexec.is_empty() {
                "no private directory could be made there (~/.cache, $XDG_RUNTIME_DIR, /var/tmp)"
                    .to_string()
            } else {
                format!(
                    "{} cannot run programs (mounted noexec?)",
                    noexec.join(", ")
                )
            };
            return Err(Error::new(
                Kind::Remote,
                format!(
                    "cannot put blocksync on {host}: {tried}; install blocksync there and give -S"
                ),
            ));
        }
    }
    let detail = peer_text(stderr);
    Err(Error::new(
        Kind::Remote,
        format!(
            "copying blocksync to {host} failed{}; install it there and give -S",
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        ),
    ))
}

impl SshOptions {
    /// Copies this binary to `host` as `blocksync-ID` in a private directory; returns
    /// notes for the user (where it went, when not where expected).
    pub(super) fn deploy_to(
        &self,
        host: &str,
        id: &str,
        exe: &[u8],
        role: &super::share::Role,
    ) -> Result<Vec<String>> {
        let install = format!(
            "sh -c {} blocksync {} {}",
            quote(&installer()),
            id,
            exe.len()
        );
        let (mut child, stderr) = self.spawn(host, &install, role, Stdio::piped())?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = std::io::Read::read_to_end(&mut (&mut stdout).take(64 << 10), &mut out);
            out
        });
        // A failed write shows in what the installer says (it counts the bytes).
        let _ = stdin.write_all(exe);
        drop(stdin);
        let out = reader.join().unwrap_or_default();
        let _ = child.wait();
        installer_verdict(host, &String::from_utf8_lossy(&out), &stderr.settled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_step_is_one_line_a_sudoers_rule_can_name() {
        assert!(!ROOT_STEP.contains(['\n', '#', '*', '?', '[', ']']));
        let rule = sudoers_rule("backup");
        assert!(rule.starts_with("backup ALL=(root) NOPASSWD: /bin/sh -c umask 077; "));
        assert!(rule.contains(r"chown 0\:0"), "{rule}");
        assert!(
            rule.ends_with(r#"--expect "$1" blocksync-root *"#),
            "{rule}"
        );
    }

    #[test]
    fn the_scripts_parse() {
        for script in [launcher(), installer(), ROOT_STEP.to_string()] {
            let ok = std::process::Command::new("sh")
                .args(["-n", "-c", &script])
                .status()
                .unwrap();
            assert!(ok.success(), "{script}");
        }
    }
}
