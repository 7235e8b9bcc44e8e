//! Where each side of a sync lives, and how the command's operands are read.
//!
//! Two forms are accepted:
//!
//! * the blocksync.py form, `SRC HOST [DST]` (three operands, or two where the second is a
//!   bare host word): HOST `localhost` means a local sync, DST defaults to SRC's path; with
//!   `--pull` the first path is the local destination and the last the remote source;
//! * the modern form, `SRC DST`, where either side may be `[user@]host:path` like rsync and scp.
//!
//! A word is remote (`host:path`) when it has a colon before any slash. In a two-operand
//! call, a second word without a colon is read (see [`second_word`]):
//! - as a local file when it exists, or has a `.` or `/` (`blocksync disk.img
//!   backup.img`, as cp and rsync would);
//! - as the host of the blocksync.py form when it is `user@host` (DST = SRC's path);
//! - `localhost` alone would sync SRC onto itself: refused;
//! - any other bare word (`backup`) could be either: refused with both readings named,
//!   never guessed.

use std::fmt;
use std::path::PathBuf;

/// One side of the sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A file or device on this machine.
    Local(PathBuf),
    /// A file or device on another machine, reached over ssh.
    Remote {
        /// `host` or `user@host`, passed to ssh as is (so ssh config aliases work).
        host: String,
        /// The path on the remote machine.
        path: String,
    },
}

impl Endpoint {
    /// True for a side on this machine.
    pub fn is_local(&self) -> bool {
        matches!(self, Endpoint::Local(_))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Local(p) => write!(f, "{}", p.display()),
            Endpoint::Remote { host, path } => write!(f, "{host}:{path}"),
        }
    }
}

/// The source and destination of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    /// Where blocks are read from.
    pub source: Endpoint,
    /// Where changed blocks are written.
    pub destination: Endpoint,
}

/// The host word that means "this machine" in the blocksync.py form.
const LOCALHOST: &str = "localhost";

/// Splits `host:path` when the colon comes before any slash; `None` for a plain path.
fn split_remote(word: &str) -> Option<(&str, &str)> {
    let colon = word.find(':')?;
    if word[..colon].contains('/') || colon == 0 {
        return None;
    }
    Some((&word[..colon], &word[colon + 1..]))
}

/// Turns a modern-form word into an endpoint. `localhost:path` stays remote: the user
/// wrote a host, so it goes through ssh like rsync would.
pub fn modern(word: &str) -> Result<Endpoint, String> {
    match split_remote(word) {
        Some((host, path)) => {
            if path.is_empty() {
                return Err(format!(
                    "'{word}' names host '{host}' but no path; write {host}:/path/to/file"
                ));
            }
            Ok(Endpoint::Remote {
                host: host.to_string(),
                path: path.to_string(),
            })
        }
        None => Ok(Endpoint::Local(PathBuf::from(word))),
    }
}

/// A side in the blocksync.py form: `localhost` means local, anything else is ssh.
fn seed_side(host: &str, path: &str) -> Endpoint {
    if host == LOCALHOST {
        Endpoint::Local(PathBuf::from(path))
    } else {
        Endpoint::Remote {
            host: host.to_string(),
            path: path.to_string(),
        }
    }
}

fn check_host(host: &str) -> Result<(), String> {
    if host.is_empty() || host.contains('/') || host.starts_with('-') || host.contains(':') {
        return Err(format!(
            "'{host}' is not a host name; the blocksync.py form is SRC HOST [DST]"
        ));
    }
    Ok(())
}

/// How a two-operand call's second word without a colon reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Second {
    /// A local path.
    File,
    /// `user@host` of the blocksync.py form, DST omitted.
    Host,
    /// Could be either.
    Ambiguous,
}

/// Reads a second operand that has no colon before a slash; `exists` tells whether a
/// path is there.
fn second_word(word: &str, exists: &dyn Fn(&str) -> bool) -> Second {
    if exists(word) || word.contains('/') || word.contains('.') {
        Second::File
    } else if word.contains('@') && !word.starts_with('@') && !word.ends_with('@') {
        Second::Host
    } else {
        Second::Ambiguous
    }
}

/// Reads the operands (`SRC HOST [DST]` or `SRC DST`) into a source and destination.
pub fn parse_operands(operands: &[String], pull: bool) -> Result<Pair, String> {
    parse_operands_with(operands, pull, &|w| std::path::Path::new(w).exists())
}

/// [`parse_operands`], with `exists` telling whether a path is there.
fn parse_operands_with(
    operands: &[String],
    pull: bool,
    exists: &dyn Fn(&str) -> bool,
) -> Result<Pair, String> {
    let pair = match operands {
        [first, host, last] => {
            // blocksync.py form: the middle word is always the host.
            check_host(host)?;
            if split_remote(first).is_some() || split_remote(last).is_some() {
                return Err(format!(
                    "'{host}' is given as HOST, so '{first}' and '{last}' must be plain paths, not host:path"
                ));
            }
            if pull {
                Pair {
                    source: seed_side(host, last),
                    destination: Endpoint::Local(PathBuf::from(first)),
                }
            } else {
                Pair {
                    source: Endpoint::Local(PathBuf::from(first)),
                    destination: seed_side(host, last),
                }
            }
        }
        [first, second] => {
            let plain = split_remote(second).is_none() && !second.is_empty();
            if plain && second == LOCALHOST {
                // blocksync.py form with DST omitted: same path on the same machine.
                return Err(format!(
                    "'{first} localhost' would sync {first} onto itself; give a destination: {first} localhost DST"
                ));
            }
            match second_word(second, exists) {
                _ if !plain => {}
                Second::File => {}
                Second::Host => {
                    // The seed's own form: SRC user@host, the destination SRC's path there.
                    check_host(second)?;
                    if split_remote(first).is_some() {
                        return Err(format!(
                            "'{second}' is given as HOST, so '{first}' must be a plain path, not host:path"
                        ));
                    }
                    return Ok(if pull {
                        Pair {
                            source: seed_side(second, first),
                            destination: Endpoint::Local(PathBuf::from(first)),
                        }
                    } else {
                        Pair {
                            source: Endpoint::Local(PathBuf::from(first)),
                            destination: seed_side(second, first),
                        }
                    });
                }
                Second::Ambiguous => {
                    return Err(format!(
                        "'{second}' could be a host (blocksync.py form SRC HOST, destination {first} on {second}) \
                         or a new local file; write '{second}:{first}' for the host or './{second}' for the file"
                    ));
                }
            }
            // A host:path word that is also a file here: the user may mean either.
            if let Some((host, _)) = split_remote(second).filter(|_| exists(second)) {
                return Err(format!(
                    "'{second}' reads as host:path (host '{host}'), and a file of that name is here too; write './{second}' for the file"
                ));
            }
            let a = modern(first)?;
            let b = modern(second)?;
            if pull {
                // --pull keeps the blocksync.py order: local destination first, remote source last.
                if !b.is_local() {
                    Pair {
                        source: b,
                        destination: a,
                    }
                } else {
                    return Err(format!(
                        "--pull reads the last operand as the remote source, but '{second}' is local; \
                         write host:path or drop --pull"
                    ));
                }
            } else {
                Pair {
                    source: a,
                    destination: b,
                }
            }
        }
        _ => {
            return Err(format!(
                "expected 2 or 3 operands (SRC DST or SRC HOST [DST]), got {}",
                operands.len()
            ));
        }
    };
    if !pair.source.is_local() && !pair.destination.is_local() {
        return Err(format!(
            "both {} and {} are remote; run blocksync on one of those machines instead",
            pair.source, pair.destination
        ));
    }
    if let Endpoint::Local(p) = &pair.source
        && p.as_os_str().is_empty()
    {
        return Err("the source path is empty".into());
    }
    if let Endpoint::Local(p) = &pair.destination
        && p.as_os_str().is_empty()
    {
        return Err("the destination path is empty".into());
    }
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }
    fn local(p: &str) -> Endpoint {
        Endpoint::Local(PathBuf::from(p))
    }
    fn remote(h: &str, p: &str) -> Endpoint {
        Endpoint::Remote {
            host: h.into(),
            path: p.into(),
        }
    }

    #[test]
    fn seed_form_localhost() {
        let p = parse_operands(&ops(&["/a", "localhost", "/b"]), false).unwrap();
        assert_eq!(p.source, local("/a"));
        assert_eq!(p.destination, local("/b"));
    }

    #[test]
    fn seed_form_push_and_pull() {
        let p = parse_operands(&ops(&["/dev/sda", "root@backup", "/img"]), false).unwrap();
        assert_eq!(p.source, local("/dev/sda"));
        assert_eq!(p.destination, remote("root@backup", "/img"));
        let p = parse_operands(&ops(&["/local", "root@backup", "/remote src"]), true).unwrap();
        assert_eq!(p.source, remote("root@backup", "/remote src"));
        assert_eq!(p.destination, local("/local"));
    }

    #[test]
    fn the_second_word_reads_as_a_file_a_host_or_neither() {
        let none = |_: &str| false;
        let p = parse_operands_with(&ops(&["disk.img", "backup.img"]), false, &none).unwrap();
        assert_eq!(p.destination, local("backup.img"));
        let p = parse_operands_with(&ops(&["/dev/loop1", "root@host"]), false, &none).unwrap();
        assert_eq!(p.destination, remote("root@host", "/dev/loop1"));
        let p = parse_operands_with(&ops(&["/dev/loop1", "root@host"]), true, &none).unwrap();
        assert_eq!(p.source, remote("root@host", "/dev/loop1"));
        assert_eq!(p.destination, local("/dev/loop1"));
        // An existing file named like a host word is the file.
        let here = |w: &str| w == "backup";
        let p = parse_operands_with(&ops(&["/a", "backup"]), false, &here).unwrap();
        assert_eq!(p.destination, local("backup"));
        // host:path, also a file here: refused, with the ./ way out.
        let here = |w: &str| w == "with:colon.bin";
        let e = parse_operands_with(&ops(&["/a", "with:colon.bin"]), false, &here).unwrap_err();
        assert!(
            e.contains("host 'with'") && e.contains("./with:colon.bin"),
            "{e}"
        );
        let p = parse_operands_with(&ops(&["/a", "with:colon.bin"]), false, &none).unwrap();
        assert_eq!(p.destination, remote("with", "colon.bin"));
    }

    #[test]
    fn seed_form_dst_omitted_is_ambiguous_or_same() {
        let e = parse_operands_with(&ops(&["/a", "backup"]), false, &|_| false).unwrap_err();
        assert!(
            e.contains("could be a host") && e.contains("./backup"),
            "{e}"
        );
        let e = parse_operands(&ops(&["/a", "localhost"]), false).unwrap_err();
        assert!(e.contains("onto itself"), "{e}");
    }

    #[test]
    fn modern_forms() {
        let p = parse_operands(&ops(&["a.img", "./b.img"]), false).unwrap();
        assert_eq!(p.destination, local("./b.img"));
        let p = parse_operands(&ops(&["/dev/sda", "user@h:/dev/sdb"]), false).unwrap();
        assert_eq!(p.destination, remote("user@h", "/dev/sdb"));
        let p = parse_operands(&ops(&["h:/x", "/y"]), false).unwrap();
        assert_eq!(p.source, remote("h", "/x"));
        // A colon after a slash is part of a path.
        let p = parse_operands(&ops(&["/a", "./x:y"]), false).unwrap();
        assert_eq!(p.destination, local("./x:y"));
        let p = parse_operands(&ops(&["/dst", "h:/src"]), true).unwrap();
        assert_eq!(p.source, remote("h", "/src"));
        assert_eq!(p.destination, local("/dst"));
    }

    #[test]
    fn refusals() {
        assert!(parse_operands(&ops(&["h:/x", "g:/y"]), false).is_err());
        assert!(parse_operands(&ops(&["/x"]), false).is_err());
        assert!(parse_operands(&ops(&["/x", "h:"]), false).is_err());
        assert!(parse_operands(&ops(&["/x", "/y"]), true).is_err());
        assert!(parse_operands(&ops(&["/x", "a/b", "/y"]), false).is_err());
        assert!(parse_operands(&ops(&["h:/x", "host", "/y"]), false).is_err());
    }
}
