//! A new destination file is written under a temporary name in its directory
//! (`.NAME.blocksync-partial`) and renamed into place once complete and flushed, so an
//! interrupted first copy never leaves a file that looks like a finished backup. A rerun
//! finds the partial copy and resumes into it, sending only what it lacks.

use crate::error::{Error, Kind, Result};
use crate::io::target::{DestProbe, probe_destination};
use std::os::unix::fs::MetadataExt;
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

/// Gives the complete, flushed copy at `temp` its name `path`, never replacing a file
/// that appeared there meanwhile, and makes the name durable.
pub fn finish(temp: &Path, path: &Path) -> Result<()> {
    let cwd = rustix::fs::CWD;
    rustix::fs::renameat_with(cwd, temp, cwd, path, rustix::fs::RenameFlags::NOREPLACE).map_err(|e| {
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
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| {
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
