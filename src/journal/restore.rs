//! `blocksync restore DST --version K -o OUT`: the image DST held K runs ago, written
//! into OUT without touching DST. Version 1 undoes the last run, version 2 the one
//! before, and so on: for each byte the oldest of versions 1..=K that holds it wins,
//! and DST gives the rest. Everything is written in one pass in offset order, hashed
//! as it goes, then read back from the disk and hashed again.
//!
//! What makes the result the old image, and how each is checked:
//! - DST is in the state the newest version left it in (its state then is recorded);
//! - between consecutive versions nothing else wrote to DST (each records the state
//!   its run began in, which must be the state the one before ended in);
//! - each record's bytes check out against the checksum made when it was saved;
//! - OUT reads back from the disk as written.

use super::format::{Record, checksum};
use super::place::{Place, journal_error};
use super::rollback::insert;
use super::version::{self, Version};
use crate::error::{Error, Kind, Result, os_text};
use crate::io::target::{self, Target};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Where a restore writes.
pub struct Out<'a> {
    /// Open for writing (a new file, or a device checked by the caller).
    pub file: &'a File,
    /// Its path, for messages.
    pub path: &'a Path,
    /// A device: its size must hold the image, and zeros are written, not skipped.
    pub device: Option<u64>,
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The version written (its header).
    pub header: version::Header,
    /// Bytes taken from the versions (the rest came from DST).
    pub from_versions: u64,
    /// The image's size.
    pub size: u64,
    /// blake3 of the image, as written and as read back.
    pub digest: String,
}

/// Reads a version's payloads in index order, record by record.
struct Reader<'a> {
    version: &'a Version,
    index: Vec<Record>,
    stream: Box<dyn Read + 'a>,
    /// The next record not yet read from the stream.
    next: usize,
    /// The last record read, and its bytes.
    held: Option<usize>,
    data: Vec<u8>,
}

impl<'a> Reader<'a> {
    fn new(version: &'a Version) -> Result<Reader<'a>> {
        Ok(Reader {
            index: version.index()?,
            stream: Box::new(version.payloads()?),
            version,
            next: 0,
            held: None,
            data: Vec::new(),
        })
    }

    /// The bytes of record `i` (records are asked for in order), checked.
    fn bytes(&mut self, i: usize) -> Result<&[u8]> {
        let bad = |why: &str| journal_error(&self.version.path, why);
        while self.held != Some(i) {
            let r = self.index[self.next];
            self.data.clear();
            if !r.zero {
                self.data.resize(r.len as usize, 0);
                self.stream.read_exact(&mut self.data).map_err(|e| {
                    bad(&format!(
                        "is cut short or damaged ({e}); nothing usable was restored"
                    ))
                })?;
            }
            if checksum(r.offset, r.len, r.zero, &self.data) != r.sum {
                return Err(bad("a record does not check out; the version is damaged"));
            }
            self.held = Some(self.next);
            self.next += 1;
        }
        Ok(&self.data)
    }
}

/// One part of the image: `start..end` from record `record` of version `version`, or
/// from DST where `version` is `None`.
#[derive(Debug, Clone, Copy)]
struct Part {
    start: u64,
    end: u64,
    from: Option<(usize, usize)>,
}

/// Writes the image `dest` held `k` runs ago into `out`. `unknown_ok`: go on where it
/// cannot be told whether something else wrote to a device between runs (its counters
/// started over with a restart).
pub fn restore(
    dest: &Target,
    place: &Place,
    k: u32,
    out: &Out,
    unknown_ok: bool,
) -> Result<Restored> {
    let versions = check_chain(dest, place, k, unknown_ok)?;
    let used = &versions[..k as usize];
    let size = used[k as usize - 1].header.size_before;
    if let Some(room) = out.device.filter(|&n| n < size) {
        return Err(Error::new(
            Kind::TooSmall,
            format!(
                "{} holds {room} bytes; version {k} of {} is {size} bytes",
                out.path.display(),
                dest.path.display()
            ),
        ));
    }
    let mut readers = used.iter().map(Reader::new).collect::<Result<Vec<_>>>()?;
    let parts = plan(&readers, size);
    let write_err = |e: std::io::Error| {
        Error::new(
            Kind::Io,
            format!("writing {}: {}", out.path.display(), os_text(&e)),
        )
    };
    let mut hasher = blake3::Hasher::new();
    let mut from_versions = 0;
    let (mut buf, at) = aligned(CHUNK);
    for p in &parts {
        match p.from {
            Some((v, i)) => {
                let r = &mut readers[v];
                let rec = r.index[i];
                let bytes = r.bytes(i)?;
                let n = (p.end - p.start) as usize;
                let piece = &mut buf[at..at + n];
                if rec.zero {
                    piece.fill(0);
                } else {
                    let from = (p.start - rec.offset) as usize;
                    piece.copy_from_slice(&bytes[from..from + n]);
                }
                put(out, piece, p.start).map_err(write_err)?;
                hasher.update(piece);
                from_versions += n as u64;
            }
            None => {
                let mut pos = p.start;
                while pos < p.end {
                    let n = ((p.end - pos) as usize).min(CHUNK);
                    let piece = &mut buf[at..at + n];
                    let got = target::read_full_at(&dest.file, piece, pos).map_err(|e| {
                        Error::new(
                            Kind::Io,
                            format!("reading {}: {}", dest.path.display(), os_text(&e)),
                        )
                    })?;
                    piece[got..].fill(0); // past DST's end: a later run grew into it
                    put(out, piece, pos).map_err(write_err)?;
                    hasher.update(piece);
                    pos += n as u64;
                }
            }
        }
    }
    if out.device.is_none() {
        out.file.set_len(size).map_err(write_err)?;
    }
    out.file.sync_all().map_err(write_err)?;
    let digest = hasher.finalize().to_hex().to_string();
    read_back(out, size, &digest)?;
    // DST must not have changed while it was read.
    let now = crate::digestfile::syncid::state_of(&dest.path, &dest.id);
    if now != used[0].header.state_after {
        return Err(Error::new(
            Kind::SourceChanged,
            format!(
                "{} was written while the restore read it; {} does not hold version {k}: run the restore again",
                dest.path.display(),
                out.path.display()
            ),
        ));
    }
    Ok(Restored {
        header: used[k as usize - 1].header.clone(),
        from_versions,
        size,
        digest,
    })
}

const CHUNK: usize = 4 << 20;

/// Writes `data` at `offset` of a new file, leaving holes where it is all zero.
fn put(out: &Out, data: &[u8], offset: u64) -> std::io::Result<()> {
    if out.device.is_none() && target::is_zero(data) {
        return Ok(());
    }
    target::write_full_at(out.file, data, offset)
}

/// The versions of `dest` in `place`, newest first, checked to lead back `k` runs from
/// what `dest` holds now.
fn check_chain(dest: &Target, place: &Place, k: u32, unknown_ok: bool) -> Result<Vec<Version>> {
    let name = dest.path.display();
    let live = place.list()?;
    if !live.is_empty() {
        return Err(Error::new(
            Kind::Journal,
            format!(
                "{name} has an unfinished run (its undo journal is in {}): put it back with blocksync rollback, or finish it by running again, then restore",
                place.dir.display()
            ),
        ));
    }
    let versions = version::list(place, None)?;
    if let Some(v) = versions.iter().find(|v| {
        (v.header.dev, v.header.ino, v.header.rdev)
            != (dest.id.dev, dest.id.ino, dest.id.rdev.unwrap_or(0))
    }) {
        return Err(journal_error(
            &v.path,
            &format!("is a version of another file or device than {name} (it was replaced since)"),
        ));
    }
    if k == 0 || k as usize > versions.len() {
        return Err(Error::new(
            Kind::Usage,
            format!(
                "{name} has {} version(s) kept (in {}); --version takes 1 (before the last run) to {}: blocksync versions lists them",
                versions.len(),
                place.dir.display(),
                versions.len()
            ),
        ));
    }
    let now = crate::digestfile::syncid::state_of(&dest.path, &dest.id);
    let unknown = |what: String| {
        Error::new(
            Kind::Journal,
            format!(
                "{what}: the machine restarted since, so nobody can tell whether something else wrote to it; pass -f to restore anyway"
            ),
        )
    };
    match link(&versions[0].header.state_after, &now) {
        Link::Same => {}
        Link::Unknown if unknown_ok => {}
        Link::Unknown => {
            return Err(unknown(format!(
                "{name} may have been written since its last run"
            )));
        }
        Link::Changed => {
            return Err(Error::new(
                Kind::Journal,
                format!(
                    "{name} was written since its last run (it is not as that run left it), so its versions no longer lead back from it; no version can be restored"
                ),
            ));
        }
    }
    for i in 1..k as usize {
        let (newer, older) = (&versions[i - 1].header, &versions[i].header);
        match link(&older.state_after, &newer.state_before) {
            Link::Same => {}
            Link::Unknown if unknown_ok => {}
            Link::Unknown => {
                return Err(unknown(format!(
                    "{name} between versions {} and {}",
                    i + 1,
                    i
                )));
            }
            Link::Changed => {
                return Err(Error::new(
                    Kind::Journal,
                    format!(
                        "{name} was written by something else between the runs of versions {} and {i}, so versions {} and older no longer lead back from it; version {i} is the oldest that can be restored",
                        i + 1,
                        i + 1
                    ),
                ));
            }
        }
    }
    Ok(versions)
}

/// The image's parts in offset order: for each byte, the oldest version that holds it
/// (the last of `readers`), else DST.
fn plan(readers: &[Reader], size: u64) -> Vec<Part> {
    let mut covered = BTreeMap::new();
    let mut parts = Vec::new();
    for (v, r) in readers.iter().enumerate().rev() {
        for (i, rec) in r.index.iter().enumerate() {
            let end = (rec.offset + rec.len).min(size);
            if rec.offset >= end {
                continue;
            }
            for (a, b) in version::uncovered(&covered, rec.offset, end) {
                // At most a chunk each, so one buffer holds any part.
                let mut s = a;
                while s < b {
                    let e = (s + CHUNK as u64).min(b);
                    parts.push(Part {
                        start: s,
                        end: e,
                        from: Some((v, i)),
                    });
                    s = e;
                }
            }
            insert(&mut covered, rec.offset, end);
        }
    }
    let mut at = 0;
    for (&s, &e) in &covered {
        if s > at {
            parts.push(Part {
                start: at,
                end: s,
                from: None,
            });
        }
        at = e;
    }
    if at < size {
        parts.push(Part {
            start: at,
            end: size,
            from: None,
        });
    }
    parts.sort_by_key(|p| p.start);
    parts
}

/// Reads OUT back from the disk (its cached pages dropped) and checks its digest.
fn read_back(out: &Out, size: u64, digest: &str) -> Result<()> {
    target::advise(out.file, 0, 0, target::Advice::DontNeed);
    let reopened = File::open(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(out.file)
    ));
    let file = reopened.as_ref().unwrap_or(out.file);
    let (mut buf, at) = aligned(CHUNK);
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0;
    while pos < size {
        let n = ((size - pos) as usize).min(CHUNK);
        let piece = &mut buf[at..at + n];
        let got = target::read_full_at(file, piece, pos).map_err(|e| {
            Error::new(
                Kind::Io,
                format!("reading {} back: {}", out.path.display(), os_text(&e)),
            )
        })?;
        if got < n {
            break;
        }
        hasher.update(piece);
        pos += n as u64;
    }
    if pos < size || hasher.finalize().to_hex().as_str() != digest {
        return Err(Error::new(
            Kind::Verify,
            format!(
                "{} does not read back as it was written; it does not hold the version (the disk under it may be failing)",
                out.path.display()
            ),
        ));
    }
    Ok(())
}

/// A page-aligned buffer of `n` bytes: `(vec, start)`.
fn aligned(n: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; n + 4096];
    let at = v.as_ptr().align_offset(4096);
    (v, at)
}

/// How two states (`after` of one version, `before` of the next newer) relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The same: nothing wrote to the destination between the runs.
    Same,
    /// Different: something did, and older versions no longer apply.
    Changed,
    /// A device's counters started over (the machine restarted): nobody can tell.
    Unknown,
}

/// Whether the state `later` follows on from `earlier`.
pub fn link(earlier: &str, later: &str) -> Link {
    if earlier == later && !earlier.is_empty() {
        return Link::Same;
    }
    let boot = |s: &str| {
        s.strip_prefix("boot=")
            .and_then(|r| r.split(';').next())
            .map(str::to_string)
    };
    match (boot(earlier), boot(later)) {
        (Some(a), Some(b)) if a != b => {
            // A restart resets the write counter; the rest still has to agree.
            fn rest(s: &str) -> Vec<&str> {
                s.split(';')
                    .filter(|f| !f.starts_with("boot=") && !f.starts_with("written="))
                    .collect()
            }
            if rest(earlier) == rest(later) {
                Link::Unknown
            } else {
                Link::Changed
            }
        }
        _ => Link::Changed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links() {
        assert_eq!(link("a", "a"), Link::Same);
        assert_eq!(link("a", "b"), Link::Changed);
        assert_eq!(
            link("boot=x;written=5;size=9;", "boot=y;written=1;size=9;"),
            Link::Unknown
        );
        assert_eq!(
            link("boot=x;written=5;size=9;", "boot=y;written=1;size=8;"),
            Link::Changed
        );
        assert_eq!(
            link("boot=x;written=5;size=9;", "boot=x;written=6;size=9;"),
            Link::Changed
        );
    }
}
