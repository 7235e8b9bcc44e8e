//! Writing a journal during a run: the old bytes of every range before it is
//! overwritten, made durable in group commits (one write and one fdatasync per group),
//! never letting the journal take the last of its filesystem's free space.

use super::format::{
    DONE_AT, HEADER_LEN, Header, MAX_ENTRIES, MAX_RECORD, PAGE, Record, checksum, encode_index,
    pages,
};
use super::place::{Place, belongs_to, journal_error, sync_dir};
use crate::error::{Error, Kind, Result, os_text};
use crate::io::target::{self, Target};
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// How a run journals: decided before it starts (see [`super::decide`]), the same for
/// every stream of it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where the journals go.
    pub place: Place,
    /// The run's id.
    pub run_id: [u8; 16],
    /// This stream.
    pub stream: u32,
    /// The run's count of streams.
    pub streams: u32,
    /// What the run syncs from (kept in the header).
    pub source: String,
    /// `--keep-versions N`; `None`: as many as the destination's newest version asked
    /// for (none without versions).
    pub keep: Option<u32>,
}

/// An open journal of this run's stream.
pub struct Journal {
    file: File,
    path: PathBuf,
    place: Place,
    run_id: [u8; 16],
    streams: u32,
    keep: Option<u32>,
    /// The destination (its state goes into a version).
    dest_id: crate::io::target::Identity,
    /// Bytes of the destination that existed when the run began: only those have old
    /// contents to keep (a file grown by the run is cut back instead).
    size_before: u64,
    /// The same file opened with O_DIRECT, where the filesystem suits it: groups go
    /// from the aligned buffer to the disk, with no copy into the page cache and no
    /// writeback after it.
    direct: Option<File>,
    /// The destination again, where its blocks can be shared with the journal
    /// (reflinks: XFS, btrfs): a record's payload is then cloned from it at the commit
    /// instead of copied, and costs no write of its bytes. `None`: copied.
    share: Option<File>,
    /// Per record of the group: its payload is to be cloned.
    cloned: Vec<bool>,
    /// Payload bytes of the group in the file (cloned or copied).
    pending: usize,
    /// The records of the group being built, and the payloads copied in a page-aligned
    /// buffer (`buf[at..at + used]`).
    records: Vec<Record>,
    buf: Vec<u8>,
    at: usize,
    used: usize,
    /// The journal file's length.
    end: u64,
    /// Bytes of the destination saved so far.
    saved: u64,
}

/// A group commit holds at most about this much; the writer commits when it is reached.
pub const GROUP: usize = 8 << 20;

impl Journal {
    /// Starts this stream's journal of `dest`, after any left by unfinished runs (which
    /// must be of this destination). Durable, name included, before it returns.
    pub fn begin(plan: &Plan, dest: &Target) -> Result<Journal> {
        let place = &plan.place;
        // Before anything of this run is written (no stream writes before its journal
        // is named, and the lowest number is named first): the state a version of this
        // run goes back to.
        let state = crate::digestfile::syncid::state_of(&dest.path, &dest.id);
        place.ensure_dir().map_err(|e| {
            journal_error(&place.dir, &format!("cannot create it: {}", os_text(&e)))
        })?;
        let found = place.list()?;
        if let Some(f) = found.iter().find(|f| !belongs_to(f, &dest.id)) {
            return Err(journal_error(
                &f.path,
                &format!(
                    "undoes another file or device than {} (it was replaced since); remove it, and its siblings, if that is so",
                    dest.path.display()
                ),
            ));
        }
        // Numbers go on from the versions kept too: a version is named by its last.
        let kept = super::version::list(place, None)?;
        let mut seq = found
            .iter()
            .map(|f| f.header.seq)
            .chain(kept.iter().map(|v| v.header.seq))
            .max()
            .unwrap_or(0)
            + 1;
        drop(kept);
        let header = |seq| Header {
            run_id: plan.run_id,
            seq,
            stream: plan.stream,
            streams: plan.streams,
            dev: dest.id.dev,
            ino: dest.id.ino,
            rdev: dest.id.rdev.unwrap_or(0),
            size_before: dest.size,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            source: plan.source.clone(),
            state: state.clone(),
        };
        // Made complete under a temporary name, then renamed into place: a journal found
        // by its name always has its header (another stream may be listing them now).
        let tmp = place.dir.join(format!(
            "{}{seq:08}.{}.tmp{}",
            place.prefix,
            plan.stream,
            std::process::id()
        ));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| no_room_or(&tmp, &e, "cannot create it"))?;
        let page = header(seq).encode();
        if let Err(e) = target::write_full_at(&file, &page, 0).and_then(|()| file.sync_data()) {
            let _ = std::fs::remove_file(&tmp);
            return Err(no_room_or(&tmp, &e, "cannot write it"));
        }
        let path = loop {
            let path = place.name(seq, plan.stream);
            let cwd = rustix::fs::CWD;
            match rustix::fs::renameat_with(
                cwd,
                &tmp,
                cwd,
                &path,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => break path,
                // Another stream of this run took the number.
                Err(rustix::io::Errno::EXIST) => seq += 1,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(no_room_or(&path, &e.into(), "cannot name it"));
                }
            }
            // The header names its number: write it again for the next one.
            let page = header(seq).encode();
            target::write_full_at(&file, &page, 0)
                .and_then(|()| file.sync_data())
                .map_err(|e| no_room_or(&tmp, &e, "cannot write it"))?;
        };
        if let Err(e) = sync_dir(&place.dir) {
            return Err(no_room_or(&path, &e, "cannot make its name durable"));
        }
        Ok(Journal {
            path,
            place: place.clone(),
            run_id: plan.run_id,
            streams: plan.streams,
            keep: plan.keep,
            dest_id: dest.id,
            size_before: dest.size,
            direct: target::reopen_direct_file(&file),
            share: shareable(dest, &place.dir, &file),
            cloned: Vec::new(),
            pending: 0,
            file,
            records: Vec::new(),
            buf: Vec::new(),
            at: 0,
            used: 0,
            end: HEADER_LEN as u64,
            saved: 0,
        })
    }

    /// Bytes of old contents in the group being built.
    pub fn buffered(&self) -> usize {
        self.pending
    }

    /// Whether the group is big enough to commit (at [`GROUP`] bytes of payload, or
    /// near the most records a group holds).
    pub fn should_commit(&self) -> bool {
        self.pending >= GROUP || self.records.len() + 64 >= MAX_ENTRIES
    }

    /// Bytes of the destination saved so far.
    #[cfg(test)]
    pub fn saved(&self) -> u64 {
        self.saved
    }

    /// Bytes of groups committed to the journal file (its header not counted).
    pub fn bytes(&self) -> u64 {
        self.end - HEADER_LEN as u64
    }

    fn room(&mut self, n: usize) {
        if self.at + self.used + n <= self.buf.len() {
            return;
        }
        // Page-aligned (O_DIRECT needs it, and the kernel copies into an aligned buffer
        // fastest), grown once to what a group needs.
        let want = (self.used + n).max(GROUP + 2 * MAX_RECORD as usize);
        let mut fresh = vec![0u8; want + PAGE];
        let at = fresh.as_ptr().align_offset(PAGE);
        fresh[at..at + self.used].copy_from_slice(&self.buf[self.at..self.at + self.used]);
        self.buf = fresh;
        self.at = at;
    }

    /// Saves the old bytes of `offset..offset + len` of `dest` (the part that existed
    /// when the run began) into the group being built; [`Journal::commit`] makes them
    /// durable, which must come before the range is overwritten.
    pub fn save(&mut self, dest: &File, offset: u64, len: u64) -> io::Result<()> {
        let end = (offset + len).min(self.size_before);
        let mut at = offset;
        while at < end {
            let n = (end - at).min(MAX_RECORD);
            let room = pages(n) as usize;
            self.room(room);
            let start = self.at + self.used;
            let got = target::read_full_at(dest, &mut self.buf[start..start + n as usize], at)?;
            if got < n as usize {
                // Shorter than when the run began: its old bytes are not there to keep.
                return Err(io::Error::other(format!(
                    "the destination is shorter than when the run began ({} bytes); nothing more is written",
                    at + got as u64
                )));
            }
            self.buf[start + got..start + room].fill(0); // the page's padding
            let data = &self.buf[start..start + n as usize];
            let zero = target::is_zero(data);
            self.records.push(Record {
                offset: at,
                len: n,
                zero,
                sum: checksum(at, n, zero, if zero { &[] } else { data }),
            });
            // Whole blocks are shared with the destination at the commit; the bytes
            // were read for their checksum only.
            let clone = self.share.is_some()
                && at.is_multiple_of(PAGE as u64)
                && n.is_multiple_of(PAGE as u64);
            self.cloned.push(clone && !zero);
            if !zero {
                self.pending += room;
                if !clone {
                    self.used += room;
                }
            }
            self.saved += n;
            at += n;
        }
        Ok(())
    }

    /// Writes the group (its index, then its payloads) and makes it durable. Refuses
    /// (before anything more is overwritten) when the journal would leave its
    /// filesystem nearly full.
    pub fn commit(&mut self) -> Result<()> {
        if self.records.is_empty() {
            return Ok(());
        }
        let index = encode_index(&self.records);
        // The index into an aligned buffer of its own, for O_DIRECT.
        let mut aligned = vec![0u8; index.len() + PAGE];
        let a = aligned.as_ptr().align_offset(PAGE);
        aligned[a..a + index.len()].copy_from_slice(&index);
        let index = &aligned[a..a + index.len()];
        let total = (index.len() + self.pending) as u64;
        self.check_room(total)?;
        let written = if self.cloned.iter().any(|&c| c) {
            self.put_shared(index)
        } else {
            let payloads = &self.buf[self.at..self.at + self.used];
            let put = |f: &File| {
                target::write_full_at(f, index, self.end).and_then(|()| {
                    target::write_full_at(f, payloads, self.end + index.len() as u64)
                })
            };
            match &self.direct {
                Some(d) => put(d).or_else(|_| put(&self.file)), // refused after all: buffered
                None => put(&self.file),
            }
            .and_then(|()| self.file.sync_data())
        };
        written.map_err(|e| no_room_or(&self.path, &e, "cannot write it"))?;
        self.end += total;
        self.used = 0;
        self.pending = 0;
        self.records.clear();
        self.cloned.clear();
        Ok(())
    }

    /// A group with payloads shared with the destination: each cloned (or, where the
    /// filesystem refuses, read again and written: the destination is not written
    /// before the commit), the copied ones written, then the index; then everything,
    /// the clones' metadata included, made durable.
    fn put_shared(&mut self, index: &[u8]) -> io::Result<()> {
        let mut pos = self.end + index.len() as u64;
        let mut copied = self.at;
        let mut scratch = Vec::new();
        for (r, &clone) in self.records.iter().zip(&self.cloned) {
            if r.zero {
                continue;
            }
            let room = pages(r.len);
            let shared = match (&self.share, clone) {
                (Some(d), true) => target::clone_range(d, r.offset, r.len, &self.file, pos).is_ok(),
                _ => false,
            };
            if !shared && clone {
                // Not shareable after all (another block size, a filesystem that says
                // no): the bytes, as they still are in the destination.
                scratch.resize(room as usize, 0);
                let d = self.share.as_ref().expect("cloned records have a source");
                let n = target::read_full_at(d, &mut scratch[..r.len as usize], r.offset)?;
                if n < r.len as usize {
                    return Err(io::Error::other(
                        "the destination is shorter than when the run began",
                    ));
                }
                target::write_full_at(&self.file, &scratch, pos)?;
            } else if !clone {
                target::write_full_at(&self.file, &self.buf[copied..copied + room as usize], pos)?;
                copied += room as usize;
            }
            pos += room;
        }
        target::write_full_at(&self.file, index, self.end)?;
        self.file.sync_all()
    }

    /// The journal may use its filesystem's free space down to a reserve: a twentieth
    /// of the filesystem, at most 1 GiB.
    fn check_room(&self, more: u64) -> Result<()> {
        let Ok(st) = rustix::fs::fstatvfs(&self.file) else {
            return Ok(()); // cannot tell: the write itself reports a full disk
        };
        let frag = st.f_frsize.max(1);
        let free = st.f_bavail.saturating_mul(frag);
        let reserve = (st.f_blocks.saturating_mul(frag) / 20).min(1 << 30);
        if free >= more.saturating_add(reserve) {
            return Ok(());
        }
        Err(full(&self.path))
    }

    /// The run's stream completed and the destination is flushed: marks this journal
    /// done, and once every stream of the run is done, removes all the destination's
    /// journals (this run's and those of the unfinished runs it finished), after
    /// making a version of them when versions are kept. `path` is where the
    /// destination now is (a new file renamed into place); returns the version made.
    pub fn finish(self, path: &std::path::Path) -> Result<Option<PathBuf>> {
        let fail = |e: io::Error| {
            journal_error(&self.path, &format!("cannot complete it: {}", os_text(&e)))
        };
        target::write_full_at(&self.file, &[1], DONE_AT)
            .and_then(|()| self.file.sync_data())
            .map_err(fail)?;
        let found = self.place.list()?;
        let ours: Vec<_> = found
            .iter()
            .filter(|f| f.header.run_id == self.run_id)
            .collect();
        let all_done =
            (0..self.streams).all(|s| ours.iter().any(|f| f.header.stream == s && f.done));
        let mut made = None;
        if all_done {
            // A version a crash left before its run's commit point goes first.
            let kept = super::version::list(&self.place, found.first().map(|f| f.header.seq))?;
            let keep = match self.keep {
                Some(k) => k,
                None => kept.first().map_or(0, |v| v.header.keep),
            };
            drop(kept);
            if keep > 0 {
                // Durable before the commit point: a crash between leaves the journals
                // live, and this version stale (removed when found).
                let state_after = crate::digestfile::syncid::state_of(path, &self.dest_id);
                let size_after = std::fs::metadata(path).map_or(0, |m| m.len());
                let size_after = match self.dest_id.rdev {
                    Some(_) => self.size_before,
                    None => size_after,
                };
                let v = super::version::Made {
                    state_after,
                    size_after,
                    keep,
                    place: &self.place,
                };
                made = super::version::make(&found, &v)?;
                if made.is_none() {
                    // Another stream of this run, done at the same moment, made the
                    // version: it completes the run too.
                    return Ok(None);
                }
            }
            // The commit point: from here on this run counts as complete (a crash while
            // the journals are removed leaves them stale, never a partial set to apply).
            target::write_full_at(&self.file, &[super::format::COMPLETE], DONE_AT)
                .and_then(|()| self.file.sync_data())
                .map_err(fail)?;
            let others = found
                .iter()
                .map(|f| f.path.as_path())
                .filter(|p| *p != self.path);
            super::place::remove_in_order(&self.place.dir, others)?;
            let last = self.place.leftovers();
            let last = last
                .iter()
                .map(PathBuf::as_path)
                .chain([self.path.as_path()]);
            super::place::remove_in_order(&self.place.dir, last)?;
            if keep > 0 || self.keep == Some(0) {
                super::version::prune(&self.place, keep as usize)?;
            }
        }
        Ok(made)
    }
}

/// The destination again, for sharing its blocks with the journal, when both are files
/// on one filesystem that clones ranges: tried once, into a nameless file beside the
/// journal (never into the journal: what the trial put there could pass for a group).
fn shareable(dest: &Target, dir: &std::path::Path, journal: &File) -> Option<File> {
    use std::os::unix::fs::MetadataExt;
    if dest.kind != target::TargetKind::File || dest.size < PAGE as u64 {
        return None;
    }
    if journal.metadata().ok()?.dev() != dest.file.metadata().ok()?.dev() {
        return None;
    }
    let trial = File::options()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
        .ok()?;
    let d = dest.file.try_clone().ok()?;
    target::clone_range(&d, 0, PAGE as u64, &trial, 0).ok()?;
    Some(d)
}

fn full(path: &std::path::Path) -> Error {
    Error::new(
        Kind::Journal,
        format!(
            "the undo journal {} would fill its filesystem; the run stopped before overwriting more, and the destination can be put back (blocksync rollback) or finished by running again with --journal-dir on a filesystem with room, or --no-journal",
            path.display()
        ),
    )
}

fn no_room_or(path: &std::path::Path, e: &io::Error, what: &str) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => full(path),
        _ => journal_error(path, &format!("{what}: {}", os_text(e))),
    }
}
