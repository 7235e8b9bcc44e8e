//! Putting a destination back as it was before the run its journals undo: every
//! journal, newest first, walked from its last sound record back to its first, so for
//! each byte the oldest saved contents win; then a file is cut back to its old size,
//! everything flushed, and each restored range read back and checked.

use super::format::{
    HEADER_LEN, MAX_ENTRIES, MAX_RECORD, PAGE, Record, checksum, decode_index, index_len,
};
use super::place::{Found, Place, belongs_to, journal_error};
use super::undo::GROUP;
use crate::error::{Error, Kind, Result, os_text};
use crate::io::target::{self, Target, TargetKind};
use std::collections::BTreeMap;

/// What a rollback did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Journals applied.
    pub journals: usize,
    /// Bytes written back.
    pub bytes: u64,
    /// The destination's size now (as before the run).
    pub size: u64,
}

/// The groups of `f` that check out, in order: where each starts and its records. A
/// group that does not (cut short or damaged) ends the journal: it is the commit being
/// written when the run died, and none of its writes had been made.
pub(super) fn groups(f: &Found) -> Result<Vec<(u64, Vec<Record>)>> {
    let io_err =
        |e: std::io::Error| journal_error(&f.path, &format!("cannot read it: {}", os_text(&e)));
    let len = f.file.metadata().map_err(io_err)?.len();
    let mut at = HEADER_LEN as u64;
    let mut out = Vec::new();
    let mut data = Vec::new();
    // A group that does not check out is the torn last one only if no more than one
    // group's worth of the file follows; otherwise the journal is damaged inside.
    let end = |at: u64, out| {
        if len - at > MAX_GROUP_BYTES {
            Err(journal_error(
                &f.path,
                &format!(
                    "is damaged at byte {at}, before its end; it is kept, nothing was restored from it"
                ),
            ))
        } else {
            Ok(out)
        }
    };
    while at + PAGE as u64 <= len {
        let mut first = vec![0u8; PAGE];
        if target::read_full_at(&f.file, &mut first, at).map_err(io_err)? != PAGE {
            return end(at, out);
        }
        let Some(n) = index_len(&first).filter(|&n| at + n <= len) else {
            return end(at, out);
        };
        let mut index = vec![0u8; n as usize];
        if target::read_full_at(&f.file, &mut index, at).map_err(io_err)? != n as usize {
            return end(at, out);
        }
        let Some(records) = decode_index(&index) else {
            return end(at, out);
        };
        let mut payload = at + n;
        let sound = records.iter().all(|r| {
            let ok = payload + r.payload_len() <= len
                && read_checked(f, payload, r, &mut data).is_some();
            payload += r.payload_len();
            ok
        });
        if !sound {
            return end(at, out);
        }
        out.push((at + n, records));
        at = payload;
    }
    Ok(out)
}

/// The most a group takes in the file: its index, and payloads up to two groups' worth
/// and a record (the writer commits once a group reaches [`GROUP`]).
const MAX_GROUP_BYTES: u64 =
    (MAX_ENTRIES as u64 * 40 + PAGE as u64) + 2 * GROUP as u64 + 2 * MAX_RECORD;

/// The payload of `rec` at `at` in the journal, checked against its checksum.
pub(super) fn read_checked<'a>(
    f: &Found,
    at: u64,
    rec: &Record,
    data: &'a mut Vec<u8>,
) -> Option<&'a [u8]> {
    data.clear();
    if !rec.zero {
        data.resize(rec.len as usize, 0);
        if target::read_full_at(&f.file, data, at).ok()? != data.len() {
            return None;
        }
    }
    (checksum(rec.offset, rec.len, rec.zero, data) == rec.sum).then_some(&data[..])
}

/// Calls `each` for every sound record of `f`, first to last.
fn forwards(f: &Found, mut each: impl FnMut(&Record) -> Result<()>) -> Result<()> {
    for (_, records) in groups(f)? {
        records.iter().try_for_each(&mut each)?;
    }
    Ok(())
}

/// Calls `each` for every sound record of `f` with its bytes, last first.
fn backwards(f: &Found, mut each: impl FnMut(&Record, &[u8]) -> Result<()>) -> Result<()> {
    let mut data = Vec::new();
    for (start, records) in groups(f)?.into_iter().rev() {
        // Where each payload starts: after the index, in order.
        let mut at = start;
        let starts: Vec<u64> = records
            .iter()
            .map(|r| {
                let s = at;
                at += r.payload_len();
                s
            })
            .collect();
        for (r, &s) in records.iter().zip(&starts).rev() {
            let bytes = read_checked(f, s, r, &mut data).ok_or_else(|| {
                journal_error(&f.path, "changed while it was read (a record no longer checks out); nothing more was restored from it")
            })?;
            each(r, bytes)?;
        }
    }
    Ok(())
}

/// Puts `dest` back as it was before the oldest unfinished run its journals in `place`
/// undo, verifies it, and removes the journals.
pub fn rollback(dest: &Target, place: &Place) -> Result<Restored> {
    let found = place.list()?;
    if found.is_empty() {
        return Err(Error::new(
            Kind::Journal,
            format!(
                "no undo journal for {} (in {}): nothing to roll back; the last run completed, or it was not journaled",
                dest.path.display(),
                place.dir.display()
            ),
        ));
    }
    if let Some(f) = found.iter().find(|f| !belongs_to(f, &dest.id)) {
        return Err(journal_error(
            &f.path,
            &format!(
                "undoes another file or device than {}; nothing was written",
                dest.path.display()
            ),
        ));
    }
    // Forget any digest-file record first: the destination is about to change.
    crate::digestfile::syncid::clear(dest).map_err(|e| {
        Error::new(
            Kind::Io,
            format!(
                "cannot forget the sync id of {}: {}",
                dest.path.display(),
                os_text(&e)
            ),
        )
    })?;
    let write_err = |e: std::io::Error| {
        Error::new(
            Kind::Io,
            format!("writing {} back: {}", dest.path.display(), os_text(&e)),
        )
    };
    let mut done = Restored {
        journals: found.len(),
        ..Restored::default()
    };
    for f in found.iter().rev() {
        backwards(f, |rec, bytes| {
            if rec.zero {
                target::write_zeros(&dest.file, rec.offset, rec.len)
            } else {
                target::write_full_at(&dest.file, bytes, rec.offset)
            }
            .map_err(write_err)?;
            done.bytes += rec.len;
            Ok(())
        })?;
    }
    let size_before = found[0].header.size_before;
    done.size = dest.size;
    if dest.kind == TargetKind::File {
        dest.file.set_len(size_before).map_err(write_err)?;
        done.size = size_before;
    }
    dest.file.sync_all().map_err(write_err)?;
    verify(dest, &found)?;
    // Newest first, each removal durable: what a crash leaves is an oldest prefix of the
    // set, which applied again changes nothing.
    super::place::remove_in_order(&place.dir, found.iter().rev().map(|f| f.path.as_path()))?;
    Ok(done)
}

/// Reads every restored range back and checks it against the checksum of the bytes the
/// journal saved before the run overwrote them. Where records overlap, the oldest's
/// bytes are what the destination now holds, so a record is checked only where no
/// earlier one (of its journal, or of an older one) saved the same bytes.
fn verify(dest: &Target, found: &[Found]) -> Result<()> {
    // Ranges (start -> end) checked so far, merged.
    let mut seen: BTreeMap<u64, u64> = BTreeMap::new();
    let mut buf = Vec::new();
    for f in found {
        forwards(f, |rec: &Record| {
            let end = rec.offset + rec.len;
            let overlaps = seen
                .range(..end)
                .next_back()
                .is_some_and(|(_, &e)| e > rec.offset);
            if !overlaps {
                buf.resize(rec.len as usize, 0);
                let n = target::read_full_at(&dest.file, &mut buf, rec.offset).unwrap_or(0);
                let ok = n == buf.len()
                    && if rec.zero {
                        target::is_zero(&buf)
                    } else {
                        checksum(rec.offset, rec.len, false, &buf) == rec.sum
                    };
                if !ok {
                    return Err(Error::new(
                        Kind::Verify,
                        format!(
                            "{} does not read back as it was before the run at bytes {}..{end} after the rollback; the journals are kept ({})",
                            dest.path.display(),
                            rec.offset,
                            f.path.display()
                        ),
                    ));
                }
            }
            insert(&mut seen, rec.offset, end);
            Ok(())
        })?;
    }
    Ok(())
}

/// Adds `start..end` to a set of merged ranges.
pub(super) fn insert(set: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if let Some((&s, &e)) = set.range(..=start).next_back()
        && e >= start
    {
        start = s;
        end = end.max(e);
    }
    let inside: Vec<u64> = set.range(start..=end).map(|(&s, _)| s).collect();
    for s in inside {
        end = end.max(set.remove(&s).expect("listed"));
    }
    set.insert(start, end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge() {
        let mut m = BTreeMap::new();
        insert(&mut m, 10, 20);
        insert(&mut m, 30, 40);
        insert(&mut m, 20, 30);
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![(10, 40)]);
        let mut m = BTreeMap::new();
        insert(&mut m, 50, 60);
        insert(&mut m, 0, 5);
        insert(&mut m, 1, 55);
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![(0, 60)]);
    }
}
