//! Where a destination's journals live, finding them, and trusting only our own: beside
//! a file destination (same filesystem, moved with it), in this user's state directory
//! for a device, or in `--journal-dir`. Also the record that a run completed onto a
//! destination, which turns journaling on for the next one.

use super::format::{HEADER_LEN, Header};
use crate::error::{Error, Kind, Result};
use crate::io::target::Identity;
use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The directory and name prefix of one destination's journals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The directory.
    pub dir: PathBuf,
    /// Every journal of the destination is named `PREFIX<seq>.<stream>`.
    pub prefix: String,
}

/// A journal found in a place.
#[derive(Debug)]
pub struct Found {
    /// Its path.
    pub path: PathBuf,
    /// What it undoes.
    pub header: Header,
    /// Its stream completed.
    pub done: bool,
    /// It marks its whole run complete (see [`super::format::COMPLETE`]).
    pub complete: bool,
    /// Open for reading.
    pub file: File,
}

impl Place {
    /// The place for the destination at `path` (resolved; a file or a device `id`), or in
    /// `dir` when given.
    pub fn of(path: &Path, id: &Identity, dir: Option<&Path>) -> Place {
        let key = crate::digestfile::syncid::key(path, id);
        match (dir, id.rdev, path.file_name()) {
            (Some(d), _, _) => Place {
                dir: d.to_path_buf(),
                prefix: format!("{key}.undo."),
            },
            (None, None, Some(name)) => Place {
                dir: match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                },
                prefix: format!(".{}.blocksync-undo.", name.to_string_lossy()),
            },
            _ => Place {
                dir: crate::digestfile::syncid::state_dir("journals"),
                prefix: format!("{key}.undo."),
            },
        }
    }

    /// Every version of the destination is named `VPREFIX<seq>` (see [`super::version`]).
    pub fn version_prefix(&self) -> String {
        match self.prefix.strip_suffix("undo.") {
            Some(stem) => format!("{stem}version."),
            None => format!("{}version.", self.prefix),
        }
    }

    /// The version made of the journals up to number `seq`.
    pub fn version_name(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{}{seq:08}", self.version_prefix()))
    }

    /// The journal of `stream` in the run numbered `seq`.
    pub fn name(&self, seq: u64, stream: u32) -> PathBuf {
        self.dir.join(format!("{}{seq:08}.{stream}", self.prefix))
    }

    /// Makes the directory (private) when it is this user's state directory.
    pub fn ensure_dir(&self) -> io::Result<()> {
        if self.dir.exists() {
            return Ok(());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
    }

    /// Whether a journal can be created here: makes the directory if it is this user's
    /// state directory, and creates and removes a trial file.
    pub fn try_create(&self) -> io::Result<()> {
        self.ensure_dir()?;
        let trial = self
            .dir
            .join(format!("{}trial.tmp{}", self.prefix, std::process::id()));
        File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&trial)?;
        std::fs::remove_file(&trial)
    }

    /// Journals a killed run left half made (under their temporary names).
    pub fn leftovers(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(&self.prefix))
                    .is_some_and(|rest| rest.contains(".tmp"))
            })
            .map(|e| e.path())
            .collect()
    }

    /// Every journal of the destination here, lowest `seq` first. One that is not this
    /// user's own (another owner, writable by others, a symlink) is an error: a rollback
    /// writes what a journal holds onto the destination.
    pub fn list(&self) -> Result<Vec<Found>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(journal_error(
                    &self.dir,
                    &format!("cannot list it: {}", os(&e)),
                ));
            }
        };
        let mut found = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&self.prefix)) else {
                continue;
            };
            if is_leftover(rest, &e.path()) {
                continue;
            }
            found.push(open_trusted(&e.path())?);
        }
        found.sort_by_key(|f| (f.header.seq, f.header.stream));
        // A completed run's removal cut short: everything up to its mark is stale.
        if let Some(upto) = found
            .iter()
            .filter(|f| f.complete)
            .map(|f| f.header.seq)
            .max()
        {
            let (stale, live): (Vec<Found>, Vec<Found>) =
                found.into_iter().partition(|f| f.header.seq <= upto);
            remove_in_order(&self.dir, stale.iter().map(|f| f.path.as_path()))?;
            found = live;
        }
        Ok(found)
    }
}

/// Whether the name after a place's prefix (`rest`) is a temporary one (`.tmpPID`): such
/// a file is half made by a run, and removed here when that run's process is gone (one
/// still running is another stream of a run, naming its own).
pub fn is_leftover(rest: &str, path: &Path) -> bool {
    let Some((_, pid)) = rest.split_once(".tmp") else {
        return false;
    };
    let dead = pid
        .parse::<u32>()
        .is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists());
    if dead {
        let _ = std::fs::remove_file(path);
    }
    true
}

/// Opens a journal and checks it is ours: a regular file (never through a symlink) of
/// this user, writable by nobody else, with a sound header.
pub fn open_trusted(path: &Path) -> Result<Found> {
    let file = open_checked(path)?;
    let mut page = vec![0u8; HEADER_LEN];
    let n = crate::io::target::read_full_at(&file, &mut page, 0)
        .map_err(|e| journal_error(path, &os(&e)))?;
    page.truncate(n);
    let (header, done) = Header::decode(&page).map_err(|why| journal_error(path, &why))?;
    let complete = page.get(super::format::DONE_AT as usize) == Some(&super::format::COMPLETE);
    Ok(Found {
        path: path.to_path_buf(),
        header,
        done,
        complete,
        file,
    })
}

/// Opens a journal or version for reading if it is ours: a regular file (never through
/// a symlink) of this user, writable by nobody else.
pub fn open_checked(path: &Path) -> Result<File> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| journal_error(path, &format!("cannot open it: {}", os(&e))))?;
    let m = file.metadata().map_err(|e| journal_error(path, &os(&e)))?;
    let me = rustix::process::geteuid().as_raw();
    if !m.is_file() || m.uid() != me || m.mode() & 0o022 != 0 {
        return Err(journal_error(
            path,
            &format!(
                "is not this user's own journal (owner uid {}, mode {:o}); it is never used: remove it if you do not know where it came from",
                m.uid(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(file)
}

/// Whether `found` undoes the destination `id`.
pub fn belongs_to(found: &Found, id: &Identity) -> bool {
    let h = &found.header;
    (h.dev, h.ino, h.rdev) == (id.dev, id.ino, id.rdev.unwrap_or(0))
}

/// An error about the journal at `path`.
pub fn journal_error(path: &Path, why: &str) -> Error {
    Error::new(Kind::Journal, format!("journal {}: {why}", path.display()))
}

fn os(e: &io::Error) -> String {
    crate::error::os_text(e)
}

fn completed_record(path: &Path, id: &Identity) -> PathBuf {
    crate::digestfile::syncid::state_dir("completed").join(crate::digestfile::syncid::key(path, id))
}

/// Whether a run completed onto this destination (as this user, on this machine): it
/// then holds a copy worth keeping, and is journaled by default.
pub fn completed_before(path: &Path, id: &Identity) -> bool {
    completed_record(path, id).exists()
}

/// Records that a run completed onto this destination.
pub fn record_completed(path: &Path, id: &Identity) -> io::Result<()> {
    let rec = completed_record(path, id);
    if let Some(d) = rec.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)?;
    }
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    std::fs::write(rec, format!("{}\n{when}\n", path.display()))
}

/// Removes `paths` one at a time, each removal durable before the next (the order is
/// the caller's: what is left after a crash must still be a consistent set).
pub fn remove_in_order<'a>(dir: &Path, paths: impl Iterator<Item = &'a Path>) -> Result<()> {
    for p in paths {
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(journal_error(p, &format!("cannot remove it: {}", os(&e))));
            }
            _ => {}
        }
        sync_dir(dir).map_err(|e| journal_error(dir, &os(&e)))?;
    }
    Ok(())
}

/// Fsyncs a directory, so names created or removed in it survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
