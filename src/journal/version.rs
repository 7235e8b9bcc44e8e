//! Version history (`--keep-versions N`): when a journaled run completes, its journals
//! become a version instead of being removed: the destination's bytes as they were before
//! the run (merged over its streams and the unfinished runs it continued, the oldest
//! bytes winning), compressed, with the states of the destination it leads from and to.
//! Applied newest first onto a copy of the destination, versions 1..=K give the image as
//! it was K runs ago (see [`super::restore`]).
//!
//! A version file: a header page, then the zstd-compressed payloads of its non-zero
//! records in offset order, then the zstd-compressed index of all its records.

use super::format::{Record, checksum, truncated};
use super::place::{Found, Place, journal_error, open_checked, sync_dir};
use super::rollback::{groups, insert};
use crate::error::{Result, os_text};
use crate::io::codec::{Rd, put_u8, put_u32, put_u64};
use crate::io::target;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"BSVERS01";
/// The header takes the first page.
pub const HEADER_LEN: u64 = 4096;
const SUM_AT: usize = 4064;
/// Bytes of an index entry (offset, length, zero flag, checksum).
const ENTRY: usize = 33;
/// zstd level: the fastest; the old blocks of a disk compress well at any level.
const LEVEL: i32 = 1;
/// The most records a version may hold (its index is read whole into memory).
pub const MAX_RECORDS: u64 = 1 << 26;

/// What a version holds and what it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// The highest journal number it was made of: orders versions (newest highest).
    pub seq: u64,
    /// The destination: device and inode, and a block device's number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Device number of a block device; 0 for a file.
    pub rdev: u64,
    /// When the (oldest) run it undoes began, and when it completed.
    pub created: u64,
    /// When the run completed (seconds since the epoch).
    pub finished: u64,
    /// The destination's size before the run (what a restore cuts a file to).
    pub size_before: u64,
    /// The destination's size after the run.
    pub size_after: u64,
    /// How many versions the run asked to keep (the next run keeps as many by default).
    pub keep: u32,
    /// Records, and the bytes of the destination they hold.
    pub records: u64,
    /// Bytes of the destination the records hold.
    pub bytes: u64,
    /// Compressed payloads' length (after the header page), then the index's.
    pub data_len: u64,
    /// The compressed index's length.
    pub index_len: u64,
    /// blake3 (first 16 bytes) of the compressed index.
    pub index_sum: [u8; 16],
    /// What the run synced from.
    pub source: String,
    /// The destination's state when the run began and when it completed (see
    /// `syncid::state_of`): consecutive versions chain where one's `before` is the
    /// next older one's `after`.
    pub state_before: String,
    /// See `state_before`.
    pub state_after: String,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(HEADER_LEN as usize);
        p.extend_from_slice(MAGIC);
        for v in [
            self.seq,
            self.dev,
            self.ino,
            self.rdev,
            self.created,
            self.finished,
            self.size_before,
            self.size_after,
            self.records,
            self.bytes,
            self.data_len,
            self.index_len,
        ] {
            put_u64(&mut p, v);
        }
        put_u32(&mut p, self.keep);
        p.extend_from_slice(&self.index_sum);
        for s in [&self.source, &self.state_before, &self.state_after] {
            let s = truncated(s, 1000);
            put_u32(&mut p, s.len() as u32);
            p.extend_from_slice(s.as_bytes());
        }
        p.resize(SUM_AT, 0);
        let sum = blake3::hash(&p);
        p.extend_from_slice(&sum.as_bytes()[..16]);
        p.resize(HEADER_LEN as usize, 0);
        p
    }

    fn decode(page: &[u8]) -> std::result::Result<Header, String> {
        if page.len() < HEADER_LEN as usize || &page[..8] != MAGIC {
            return Err("not a blocksync version".into());
        }
        if blake3::hash(&page[..SUM_AT]).as_bytes()[..16] != page[SUM_AT..SUM_AT + 16] {
            return Err("its header is damaged".into());
        }
        let damaged = |_| "its header is damaged".to_string();
        let mut r = Rd(&page[8..SUM_AT]);
        let mut v = [0u64; 12];
        for x in &mut v {
            *x = r.u64().map_err(damaged)?;
        }
        let keep = r.u32().map_err(damaged)?;
        let index_sum = r.array().map_err(damaged)?;
        let mut text = || -> std::result::Result<String, String> {
            let n = r.u32().map_err(damaged)? as usize;
            Ok(String::from_utf8_lossy(r.take(n).map_err(damaged)?).into_owned())
        };
        let (source, state_before, state_after) = (text()?, text()?, text()?);
        let [
            seq,
            dev,
            ino,
            rdev,
            created,
            finished,
            size_before,
            size_after,
            records,
            bytes,
            data_len,
            index_len,
        ] = v;
        if records > MAX_RECORDS {
            return Err("its header is damaged".into());
        }
        Ok(Header {
            seq,
            dev,
            ino,
            rdev,
            created,
            finished,
            size_before,
            size_after,
            keep,
            records,
            bytes,
            data_len,
            index_len,
            index_sum,
            source,
            state_before,
            state_after,
        })
    }
}

/// A version found in a place.
#[derive(Debug)]
pub struct Version {
    /// Its path.
    pub path: PathBuf,
    /// What it holds.
    pub header: Header,
    /// Its size on disk.
    pub file_len: u64,
    /// Open for reading.
    pub file: File,
}

impl Version {
    /// Its records, in offset order (the index read and checked).
    pub fn index(&self) -> Result<Vec<Record>> {
        let h = &self.header;
        let bad = |why: &str| journal_error(&self.path, why);
        let mut packed = vec![0u8; h.index_len as usize];
        let at = HEADER_LEN + h.data_len;
        let n = target::read_full_at(&self.file, &mut packed, at)
            .map_err(|e| bad(&format!("cannot read it: {}", os_text(&e))))?;
        if n != packed.len() || blake3::hash(&packed).as_bytes()[..16] != h.index_sum {
            return Err(bad("its index is damaged; this version cannot be restored"));
        }
        let want = h.records as usize * ENTRY;
        let mut raw = Vec::with_capacity(want);
        zstd::stream::read::Decoder::new(&packed[..])
            .and_then(|d| d.take(want as u64 + 1).read_to_end(&mut raw))
            .map_err(|e| bad(&format!("its index does not decompress: {e}")))?;
        if raw.len() != want {
            return Err(bad("its index is damaged; this version cannot be restored"));
        }
        let mut r = Rd(&raw);
        let mut out = Vec::with_capacity(h.records as usize);
        let mut end = 0;
        for _ in 0..h.records {
            let fields = (|| Some((r.u64().ok()?, r.u64().ok()?, r.u8().ok()?, r.array().ok()?)))();
            let Some((offset, len, zero, sum)) = fields else {
                return Err(bad("its index is damaged"));
            };
            if offset < end || len == 0 || zero > 1 || offset.checked_add(len).is_none() {
                return Err(bad("its index is damaged"));
            }
            end = offset + len;
            out.push(Record {
                offset,
                len,
                zero: zero == 1,
                sum: u128::from_le_bytes(sum),
            });
        }
        Ok(out)
    }

    /// Its payloads, as one stream in index order (non-zero records only).
    pub fn payloads(&self) -> Result<impl Read + '_> {
        let raw = ReadAt {
            file: &self.file,
            at: HEADER_LEN,
            end: HEADER_LEN + self.header.data_len,
        };
        zstd::stream::read::Decoder::new(raw)
            .map_err(|e| journal_error(&self.path, &format!("cannot read it: {}", os_text(&e))))
    }
}

/// Reads `file[at..end]` with pread, so several versions are read side by side.
struct ReadAt<'a> {
    file: &'a File,
    at: u64,
    end: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min((self.end - self.at) as usize);
        let got = std::os::unix::fs::FileExt::read_at(self.file, &mut buf[..n], self.at)?;
        self.at += got as u64;
        Ok(got)
    }
}

/// The destination's versions in `place`, newest first. One that a crash left behind
/// before its run was marked complete (its journals are still there: `live_from`, the
/// lowest journal number found) is stale and removed.
pub fn list(place: &Place, live_from: Option<u64>) -> Result<Vec<Version>> {
    let entries = match std::fs::read_dir(&place.dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(journal_error(
                &place.dir,
                &format!("cannot list it: {}", os_text(&e)),
            ));
        }
    };
    let prefix = place.version_prefix();
    let mut found = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if super::place::is_leftover(rest, &e.path()) {
            continue;
        }
        let path = e.path();
        let file = open_checked(&path)?;
        let mut page = vec![0u8; HEADER_LEN as usize];
        let n = target::read_full_at(&file, &mut page, 0)
            .map_err(|e| journal_error(&path, &os_text(&e)))?;
        page.truncate(n);
        let header = Header::decode(&page).map_err(|why| journal_error(&path, &why))?;
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if file_len != HEADER_LEN + header.data_len + header.index_len {
            return Err(journal_error(
                &path,
                "is cut short or damaged; remove it (this version cannot be restored)",
            ));
        }
        found.push(Version {
            path,
            header,
            file_len,
            file,
        });
    }
    found.sort_by_key(|v| std::cmp::Reverse(v.header.seq));
    if let Some(from) = live_from {
        let (stale, kept): (Vec<Version>, Vec<Version>) =
            found.into_iter().partition(|v| v.header.seq >= from);
        super::place::remove_in_order(&place.dir, stale.iter().map(|v| v.path.as_path()))?;
        found = kept;
    }
    Ok(found)
}

/// Keeps the newest `keep` versions and removes the others, oldest first.
pub fn prune(place: &Place, keep: usize) -> Result<usize> {
    let found = list(place, None)?;
    let old: Vec<&Path> = found
        .iter()
        .skip(keep)
        .rev()
        .map(|v| v.path.as_path())
        .collect();
    super::place::remove_in_order(&place.dir, old.iter().copied())?;
    Ok(old.len())
}

/// What a run knows of the version it makes, beside its journals.
pub struct Made<'a> {
    /// The destination's state now, complete and flushed.
    pub state_after: String,
    /// Its size now.
    pub size_after: u64,
    /// `--keep-versions`.
    pub keep: u32,
    /// Where.
    pub place: &'a Place,
}

/// One piece of a journal record that goes into a version: the part of it no older
/// journal (or earlier record) holds.
struct Piece {
    journal: usize,
    record: Record,
    payload_at: u64,
    start: u64,
    end: u64,
}

/// Makes a version of the completed run whose journals are `found` (lowest number
/// first), durable under its name before it returns. `None`: another stream of the run,
/// done at the same moment, made it first (and completes the run).
pub fn make(found: &[Found], made: &Made) -> Result<Option<PathBuf>> {
    let oldest = &found[0].header;
    let size_before = oldest.size_before;
    let mut covered = BTreeMap::new();
    let mut pieces = Vec::new();
    for (j, f) in found.iter().enumerate() {
        for (start, records) in groups(f)? {
            let mut at = start;
            for r in records {
                let end = (r.offset + r.len).min(size_before);
                for (a, b) in uncovered(&covered, r.offset, end) {
                    pieces.push(Piece {
                        journal: j,
                        record: r,
                        payload_at: at,
                        start: a,
                        end: b,
                    });
                }
                if r.offset < end {
                    insert(&mut covered, r.offset, end);
                }
                at += r.payload_len();
            }
        }
    }
    pieces.sort_by_key(|p| p.start);
    let seq = found.iter().map(|f| f.header.seq).max().unwrap_or(0);
    let place = made.place;
    let tmp = place.dir.join(format!(
        "{}{seq:08}.tmp{}",
        place.version_prefix(),
        std::process::id()
    ));
    let fail = |e: io::Error| journal_error(&tmp, &format!("cannot write it: {}", os_text(&e)));
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(fail)?;
    let written = write_body(found, &pieces, &file);
    let (index, data_len, bytes) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let header = Header {
        seq,
        dev: oldest.dev,
        ino: oldest.ino,
        rdev: oldest.rdev,
        created: oldest.created,
        finished: now(),
        size_before,
        size_after: made.size_after,
        keep: made.keep,
        records: pieces.len() as u64,
        bytes,
        data_len,
        index_len: index.len() as u64,
        index_sum: blake3::hash(&index).as_bytes()[..16]
            .try_into()
            .expect("16"),
        source: oldest.source.clone(),
        state_before: oldest.state.clone(),
        state_after: made.state_after.clone(),
    };
    let finished = target::write_full_at(&file, &index, HEADER_LEN + data_len)
        .and_then(|()| target::write_full_at(&file, &header.encode(), 0))
        .and_then(|()| file.sync_all());
    if let Err(e) = finished {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(e));
    }
    let path = place.version_name(seq);
    let cwd = rustix::fs::CWD;
    match rustix::fs::renameat_with(cwd, &tmp, cwd, &path, rustix::fs::RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::EXIST) => {
            let _ = std::fs::remove_file(&tmp);
            return Ok(None);
        }
        named => named
            .map_err(io::Error::from)
            .and_then(|()| sync_dir(&place.dir))
            .map_err(|e| journal_error(&path, &format!("cannot name it: {}", os_text(&e))))?,
    }
    Ok(Some(path))
}

/// Writes the payloads of `pieces` (compressed, after the header page) and returns the
/// compressed index, the payloads' length and the bytes held.
fn write_body(found: &[Found], pieces: &[Piece], file: &File) -> Result<(Vec<u8>, u64, u64)> {
    let mut out = Counted {
        file,
        at: HEADER_LEN,
    };
    let mut z = zstd::stream::write::Encoder::new(&mut out, LEVEL)
        .map_err(|e| journal_error(&found[0].path, &os_text(&e)))?;
    let mut index = Vec::with_capacity(pieces.len() * ENTRY);
    let mut data = Vec::new();
    let mut loaded: Option<(usize, u64)> = None;
    let mut bytes = 0;
    for p in pieces {
        let f = &found[p.journal];
        let len = p.end - p.start;
        let zero = p.record.zero;
        let part: &[u8] = if zero {
            &[]
        } else {
            if loaded != Some((p.journal, p.payload_at)) {
                super::rollback::read_checked(f, p.payload_at, &p.record, &mut data).ok_or_else(
                    || {
                        journal_error(
                            &f.path,
                            "a record no longer checks out; no version was kept",
                        )
                    },
                )?;
                loaded = Some((p.journal, p.payload_at));
            }
            let from = (p.start - p.record.offset) as usize;
            &data[from..from + len as usize]
        };
        let zero = zero || target::is_zero(part);
        put_u64(&mut index, p.start);
        put_u64(&mut index, len);
        put_u8(&mut index, zero as u8);
        let sum = checksum(p.start, len, zero, if zero { &[] } else { part });
        index.extend_from_slice(&sum.to_le_bytes());
        if !zero {
            z.write_all(part)
                .map_err(|e| journal_error(&found[0].path, &os_text(&e)))?;
        }
        bytes += len;
    }
    z.finish()
        .map_err(|e| journal_error(&found[0].path, &os_text(&e)))?;
    let data_len = out.at - HEADER_LEN;
    let packed = zstd::bulk::compress(&index, LEVEL)
        .map_err(|e| journal_error(&found[0].path, &os_text(&e)))?;
    Ok((packed, data_len, bytes))
}

/// Writes at a position with pwrite, counting.
struct Counted<'a> {
    file: &'a File,
    at: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        target::write_full_at(self.file, buf, self.at)?;
        self.at += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The parts of `start..end` not in `set` (merged ranges), in order.
pub(super) fn uncovered(set: &BTreeMap<u64, u64>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = start;
    let first = set
        .range(..=start)
        .next_back()
        .map(|(&s, _)| s)
        .unwrap_or(start);
    for (&s, &e) in set.range(first..end) {
        if e <= at {
            continue;
        }
        if s > at {
            out.push((at, s.min(end)));
        }
        at = at.max(e);
        if at >= end {
            break;
        }
    }
    if at < end {
        out.push((at, end));
    }
    out
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncovered_parts() {
        let mut m = BTreeMap::new();
        insert(&mut m, 10, 20);
        insert(&mut m, 30, 40);
        assert_eq!(uncovered(&m, 0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(uncovered(&m, 12, 18), vec![]);
        assert_eq!(uncovered(&m, 15, 35), vec![(20, 30)]);
        assert_eq!(uncovered(&m, 40, 45), vec![(40, 45)]);
        assert_eq!(uncovered(&BTreeMap::new(), 5, 9), vec![(5, 9)]);
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            seq: 4,
            records: 3,
            source: "vm.img".into(),
            state_before: "1 2.3 4.5".into(),
            state_after: "1 6.7 8.9".into(),
            index_sum: [9; 16],
            keep: 3,
            ..Header::default()
        };
        let mut page = h.encode();
        assert_eq!(Header::decode(&page).unwrap(), h);
        page[20] ^= 1;
        assert!(Header::decode(&page).is_err());
    }
}
