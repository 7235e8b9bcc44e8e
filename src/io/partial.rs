//! A new destination file is written under a temporary name in its directory
//! (`.NAME.blocksync-partial`) and renamed into place once complete and flushed, so an
//! interrupted first copy never leaves a file that looks like a finished backup. A rerun
//! finds the partial copy and resumes into it, sending only what it lacks.

use crate::error::{Error, Kind, Result};
use crate::io::target::{DestProbe, probe_destination};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The temporary name of a new file at `path`.
pub fn partial_of(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.blocksync-partial"))
}

/// For a new file destination, the probe of its partial copy (found, to resume into, or
/// to be created); any other destination as it is. A partial copy that is not this
/// user's own, or not a plain file, is refused: a run must not adopt what someone else
/// put there.
pub fn as_partial(probe: DestProbe) -> Result<DestProbe> {
    if probe.existing.is_some() || probe.final_path.is_some() {
        return Ok(probe);
    }
    let temp = partial_of(&probe.path);
    if let Ok(m) = std::fs::symlink_metadata(&temp) {
        let me = rustix::process::geteuid().as_raw();
        if !m.is_file() || m.uid() != me || m.mode() & 0o022 != 0 {
            return Err(Error::new(
                Kind::Destination,
                format!(
                    "{} is in the way of the new destination {} (a partial copy that is not this user's own file); remove it and run again",
                    temp.display(),
                    probe.path.display()
                ),
            ));
        }
    }
    let mut found = probe_destination(&temp)?;
    if found.path != temp {
        // A symlink planted since the check: never adopted.
        return Err(Error::new(
            Kind::Destination,
            format!(
                "{} became a symlink while it was checked; remove it and run again",
                temp.display()
            ),
        ));
    }
    found.final_path = Some(probe.path);
    Ok(found)
}

/// One of the streams of a run (`-w N`) writing one new file: the last to complete
/// gives it its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// The run's id.
    pub run_id: [u8; 16],
    /// This stream.
    pub stream: u32,
    /// The run's streams.
    pub streams: u32,
}

/// Stream `share.stream`'s part of the new file at `temp` is complete and flushed: marks
/// it so (a durable marker beside it), and once every stream of the run is, gives the
/// file its name `path`. Returns whether this stream did (the others leave it).
pub fn finish_shared(temp: &Path, path: &Path, share: Share) -> Result<bool> {
    if share.streams <= 1 {
        finish(temp, path)?;
        return Ok(true);
    }
    let name = temp
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy().into_owned());
    let run: String = share.run_id.iter().map(|b| format!("{b:02x}")).collect();
    let marker = |s: u32| temp.with_file_name(format!("{name}.{run}.{s}.done"));
    let io = |e: std::io::Error, what: &Path| {
        Error::new(
            Kind::Io,
            format!(
                "marking {} complete: {}",
                what.display(),
                crate::error::os_text(&e)
            ),
        )
    };
    let mine = marker(share.stream);
    std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&mine)
        .and_then(|_| sync_dir(path))
        .map_err(|e| io(e, &mine))?;
    if !(0..share.streams).all(|s| marker(s).exists()) {
        return Ok(false);
    }
    match rename_noreplace(temp, path) {
        // Another stream, done at the same moment, named it first.
        Err(rustix::io::Errno::NOENT) if path.exists() => return Ok(false),
        Err(e) => return Err(rename_error(temp, path, e)),
        Ok(()) => {}
    }
    sync_dir(path).map_err(|e| io(e, path))?;
    // The markers of this run and of earlier, interrupted ones.
    if let (Some(dir), true) = (temp.parent(), !name.is_empty())
        && let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        let prefix = format!("{name}.");
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with(&prefix) && n.ends_with(".done") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(true)
}

fn rename_noreplace(temp: &Path, path: &Path) -> std::result::Result<(), rustix::io::Errno> {
    let cwd = rustix::fs::CWD;
    rustix::fs::renameat_with(cwd, temp, cwd, path, rustix::fs::RenameFlags::NOREPLACE)
}

fn rename_error(temp: &Path, path: &Path, e: rustix::io::Errno) -> Error {
    let why = if e == rustix::io::Errno::EXIST {
        "a file appeared there while the copy was written".to_string()
    } else {
        crate::error::os_text(&e.into())
    };
    Error::new(
        Kind::Destination,
        format!(
            "the copy is complete in {} but cannot be renamed to {} ({why}); move it yourself",
            temp.display(),
            path.display()
        ),
    )
}

/// Fsyncs the directory `path` is in.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Gives the complete, flushed copy at `temp` its name `path`, never replacing a file
/// that appeared there meanwhile, and makes the name durable.
pub fn finish(temp: &Path, path: &Path) -> Result<()> {
    rename_noreplace(temp, path).map_err(|e| rename_error(temp, path, e))?;
    sync_dir(path).map_err(|e| {
        Error::new(
            Kind::Io,
            format!(
                "renamed to {}, but cannot flush its directory: {}",
                path.display(),
                crate::error::os_text(&e)
            ),
        )
    })
}
