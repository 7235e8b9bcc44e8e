//! Output files a run writes beside its work (`--bad-blocks`, `--json`, digest files):
//! checked writable before the run, written whole or not at all.

use std::fs::File;
use std::io;
use std::path::Path;

/// Refuses an output file named by `option` whose directory does not exist or that is a
/// directory, before a run starts (one that cannot be written at the end would lose what
/// the run found).
pub fn check_writable(path: &Path, option: &str) -> std::result::Result<(), String> {
    if path.is_dir() {
        return Err(format!(
            "{option} {} is a directory; give a file name",
            path.display()
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(format!(
            "{option} {}: directory {} does not exist",
            path.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// Writes `path` through a temporary file beside it that `body` fills, flushed and
/// renamed into place: a reader sees the old file or the new one, whole. The temporary
/// file is removed if anything fails; `io_err` names the failing path in the error.
pub fn write_atomically<E>(
    path: &Path,
    body: impl FnOnce(&mut File) -> std::result::Result<(), E>,
    io_err: impl Fn(&Path, io::Error) -> E,
) -> std::result::Result<(), E> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        body(&mut f)?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
