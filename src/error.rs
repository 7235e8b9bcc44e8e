//! Errors that end a run, each mapped to a documented exit code.
//!
//! Every failure the user can cause or fix gets its own [`Kind`], so scripts can tell a
//! missing source from a busy destination without parsing text. The message is one line
//! that names the thing and, where there is one, the fix.

use std::fmt;
use std::io;
use std::path::Path;

/// What went wrong, as far as the exit code is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bad command line: unknown option, ambiguous operands, bad block size.
    Usage,
    /// The source cannot be used: missing, unreadable, a directory.
    Source,
    /// The destination cannot be used: a directory, cannot be created or opened.
    Destination,
    /// The destination device is smaller than the source.
    TooSmall,
    /// The destination device is mounted or held by swap, LVM, md, or another device.
    Busy,
    /// Source and destination are the same file or device.
    SameFile,
    /// The destination exists and the change was not confirmed (no `-f`).
    NotConfirmed,
    /// `--verify` found destination blocks that differ from the source.
    Verify,
    /// Reading or writing failed on this machine during the sync (I/O error, disk full).
    Io,
    /// The ssh connection or the remote side could not be started or was lost, or I/O
    /// failed on the remote side.
    Remote,
    /// The peer spoke a protocol we do not understand or sent malformed data.
    Protocol,
    /// `--verify` found source blocks that changed while the sync ran: the destination
    /// holds them as they were read.
    SourceChanged,
    /// The sync finished, but some source bytes could not be read (bad sectors).
    Unreadable,
    /// A digest file or patch does not match the destination (changed behind its back,
    /// or meant for another target).
    StaleCache,
    /// Another run holds the destination (its lock names the pid).
    Locked,
    /// The undo journal cannot be kept (no room where it may grow, or it does not match
    /// the destination): the run stopped before overwriting more.
    Journal,
    /// `--check`: the destination differs from the source (nothing was written).
    Differs,
    /// Interrupted by a signal (Ctrl-C); what was written is flushed.
    Interrupted,
    /// A bug or an unexpected condition.
    Internal,
}

impl Kind {
    /// The process exit code for this kind; documented in `--help` and the README.
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Internal => 1,
            Kind::Usage => 2,
            Kind::Source => 3,
            Kind::Destination => 4,
            Kind::TooSmall => 5,
            Kind::Busy => 6,
            Kind::SameFile => 7,
            Kind::NotConfirmed => 8,
            Kind::Verify => 9,
            Kind::Io => 10,
            Kind::Remote => 11,
            Kind::Protocol => 12,
            Kind::SourceChanged => 13,
            Kind::Unreadable => 14,
            Kind::StaleCache => 15,
            Kind::Locked => 16,
            Kind::Journal => 17,
            Kind::Differs => 18,
            Kind::Interrupted => 130,
        }
    }

    /// Every kind, in exit-code order (for docs and tests).
    pub const ALL: [Kind; 19] = [
        Kind::Internal,
        Kind::Usage,
        Kind::Source,
        Kind::Destination,
        Kind::TooSmall,
        Kind::Busy,
        Kind::SameFile,
        Kind::NotConfirmed,
        Kind::Verify,
        Kind::Io,
        Kind::Remote,
        Kind::Protocol,
        Kind::SourceChanged,
        Kind::Unreadable,
        Kind::StaleCache,
        Kind::Locked,
        Kind::Journal,
        Kind::Differs,
        Kind::Interrupted,
    ];

    /// What the exit code means, for `--help` and the README (a test keeps the README's
    /// table equal to this one). Option names are in backticks, for Markdown.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Internal => "internal error (a bug)",
            Kind::Usage => "bad command line: options, ambiguous operands, block size",
            Kind::Source => "source missing, unreadable, or not a file/block device",
            Kind::Destination => "destination cannot be created or opened, or is a directory",
            Kind::TooSmall => {
                "destination device smaller than the source, or no room for a new file"
            }
            Kind::Busy => "destination device mounted or in use (see `--force-mounted`)",
            Kind::SameFile => "source and destination are the same file or device",
            Kind::NotConfirmed => "destination exists and the change was not confirmed (`-f`)",
            Kind::Verify => "`--verify` found destination bytes that differ from the source",
            Kind::Io => "a local read or write failed during the sync (I/O error, disk full)",
            Kind::Remote => {
                "ssh failed, the link was lost, or a read/write failed on the remote side"
            }
            Kind::Protocol => {
                "protocol error: the peer sent malformed data or speaks another version"
            }
            Kind::SourceChanged => {
                "`--verify` found source blocks that changed while the sync ran (use a snapshot)"
            }
            Kind::Unreadable => {
                "finished, but some source sectors were unreadable (see `--bad-blocks`)"
            }
            Kind::StaleCache => {
                "the digest file or patch does not match the destination (see `--digest-rebuild`)"
            }
            Kind::Locked => "the destination is in use by another blocksync run (its pid is named)",
            Kind::Journal => {
                "undo journal: no room (see `--journal-dir`) or no match; or a version cannot be restored"
            }
            Kind::Differs => {
                "`--check`: the destination differs from the source (nothing was written)"
            }
            Kind::Interrupted => {
                "interrupted (Ctrl-C); what was written is flushed, run again to finish"
            }
        }
    }
}

/// Every exit code and what it means, success first: the one table `--help` and the
/// README show.
pub fn exit_codes() -> Vec<(i32, &'static str)> {
    let mut table = vec![(0, "success: the destination equals the source")];
    table.extend(Kind::ALL.iter().map(|k| (k.exit_code(), k.describe())));
    table.sort_by_key(|(code, _)| *code);
    table
}

/// An error that ends the run: a kind for the exit code and one line for the user.
#[derive(Debug)]
pub struct Error {
    /// Decides the exit code.
    pub kind: Kind,
    /// One line naming the thing and the fix.
    pub message: String,
}

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    /// An error about `path`, with the OS error text and an optional hint appended.
    pub fn io(kind: Kind, what: &str, path: &Path, err: &io::Error, hint: &str) -> Self {
        let mut message = format!("{what} {}: {}", path.display(), os_text(err));
        if !hint.is_empty() {
            message.push_str("; ");
            message.push_str(hint);
        }
        Error { kind, message }
    }
}

/// The OS error text without Rust's " (os error N)" suffix.
pub fn os_text(err: &io::Error) -> String {
    let s = err.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Text from the other machine (its error messages, its stderr) made harmless for a
/// terminal: control characters, which could move the cursor, clear the line or set the
/// window title, and bidirectional overrides, which could reorder what is shown, are
/// written as escapes (`\x1b`, `\u{202e}`); the rest is kept.
pub fn harmless(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c as u32) < 0x100 && c.is_control() {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else if bidi {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Most characters of a peer's stderr shown in an error.
pub const PEER_TEXT_MAX: usize = 4000;

/// A peer's stderr for a one-line error: its non-empty lines joined by " | ", made
/// [`harmless`], cut after [`PEER_TEXT_MAX`] characters.
pub fn peer_text(text: &str) -> String {
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    let mut out = harmless(&joined);
    if let Some((cut, _)) = out.char_indices().nth(PEER_TEXT_MAX) {
        out.truncate(cut);
        out.push_str(" ...");
    }
    out
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct() {
        let mut codes: Vec<i32> = Kind::ALL.iter().map(|k| k.exit_code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Kind::ALL.len());
        assert!(!codes.contains(&0));
    }

    #[test]
    fn peer_text_is_escaped_joined_and_bounded() {
        assert_eq!(
            harmless("a\x1b[2Kb\x07\r\u{9b}c\u{202e}d"),
            "a\\x1b[2Kb\\x07\\x0d\\x9bc\\u{202e}d"
        );
        assert_eq!(harmless("plain é ü"), "plain é ü");
        assert_eq!(peer_text("  one\n\n two \n"), "one | two");
        let long = "x".repeat(PEER_TEXT_MAX + 10);
        assert_eq!(peer_text(&long).chars().count(), PEER_TEXT_MAX + 4);
    }

    #[test]
    fn os_text_drops_suffix() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(os_text(&e), "No such file or directory");
    }
}
