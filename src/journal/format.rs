//! The journal file: a header page naming the destination and the state it undoes, then
//! group commits, each an index of undo records (the old bytes of one range, or a note
//! that they were zero) and their payloads, everything page-aligned so it is written with
//! O_DIRECT straight from an aligned buffer.

use crate::io::codec::{Rd, put_u8, put_u32, put_u64};

/// First bytes of a journal file.
pub const MAGIC: &[u8; 8] = b"BSUNDO02";
/// The first format, without the state the journal began in (read, never written).
const MAGIC_1: &[u8; 8] = b"BSUNDO01";
/// The header takes the first page; records follow.
pub const HEADER_LEN: usize = 4096;
/// Largest range one record holds (larger ones are split).
pub const MAX_RECORD: u64 = 1 << 20;
/// Where the header's checksum is (over the bytes before it).
const SUM_AT: usize = 4064;
/// Where the completion flag is: outside the checksum, rewritten in place.
pub const DONE_AT: u64 = 4088;
/// The completion flag of the journal that marks its whole run complete: the commit
/// point of removing a completed run's journals (any journal of its place with a lower
/// or equal number is then stale, whatever was removed before a crash).
pub const COMPLETE: u8 = 2;
/// Longest source label kept.
const MAX_LABEL: usize = 1024;
/// Longest state kept (what says the destination is unchanged, see `syncid::state_of`).
pub const MAX_STATE: usize = 1024;

const GROUP_MAGIC: &[u8; 8] = b"BSUNDOGR";
/// Bytes of an entry in a group's index.
const ENTRY: usize = 40;
/// Bytes before the entries in a group's index.
const INDEX_HEAD: usize = 32;
/// At most this many records in one group (its index stays small).
pub const MAX_ENTRIES: usize = 16384;

/// What a journal undoes: which destination, in which state, for which part of which run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The run's id (the same for every `-w` stream of it).
    pub run_id: [u8; 16],
    /// Order of journals in one place: a later run continuing an unfinished one gets a
    /// higher number; a rollback applies the highest first, so the oldest bytes win.
    pub seq: u64,
    /// This stream and the run's count of streams.
    pub stream: u32,
    /// How many streams the run has.
    pub streams: u32,
    /// The destination: device and inode, and for a block device its device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Device number of a block device; 0 for a file.
    pub rdev: u64,
    /// The destination's size when the run began (a file is cut back to it).
    pub size_before: u64,
    /// When the run began (seconds since the epoch).
    pub created: u64,
    /// What the run synced from, for `versions` and messages.
    pub source: String,
    /// The destination's state when the journal began (`syncid::state_of`): a version
    /// made of it follows on from the previous one only if that ended in this state.
    pub state: String,
}

impl Header {
    /// The header page.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(HEADER_LEN);
        p.extend_from_slice(MAGIC);
        p.extend_from_slice(&self.run_id);
        put_u64(&mut p, self.seq);
        put_u32(&mut p, self.stream);
        put_u32(&mut p, self.streams);
        for v in [
            self.dev,
            self.ino,
            self.rdev,
            self.size_before,
            self.created,
        ] {
            put_u64(&mut p, v);
        }
        let label = truncated(&self.source, MAX_LABEL);
        put_u32(&mut p, label.len() as u32);
        p.extend_from_slice(label.as_bytes());
        let state = truncated(&self.state, MAX_STATE);
        put_u32(&mut p, state.len() as u32);
        p.extend_from_slice(state.as_bytes());
        p.resize(SUM_AT, 0);
        let sum = blake3::hash(&p);
        p.extend_from_slice(&sum.as_bytes()[..16]);
        p.resize(HEADER_LEN, 0);
        p
    }

    /// Reads a header page; also whether the run's stream completed (its flag 1, or 2:
    /// the whole run completed, see [`COMPLETE`]).
    pub fn decode(page: &[u8]) -> Result<(Header, bool), String> {
        if page.len() < HEADER_LEN || (&page[..8] != MAGIC && &page[..8] != MAGIC_1) {
            return Err("not a blocksync journal".into());
        }
        if blake3::hash(&page[..SUM_AT]).as_bytes()[..16] != page[SUM_AT..SUM_AT + 16] {
            return Err("its header is damaged".into());
        }
        let mut r = Rd(&page[8..SUM_AT]);
        let short = |_| "its header is cut short".to_string();
        let run_id = r.array().map_err(short)?;
        let seq = r.u64().map_err(short)?;
        let (stream, streams) = (r.u32().map_err(short)?, r.u32().map_err(short)?);
        let mut v = [0u64; 5];
        for x in &mut v {
            *x = r.u64().map_err(short)?;
        }
        let n = r.u32().map_err(short)? as usize;
        if n > MAX_LABEL {
            return Err("its header is damaged".into());
        }
        let source = String::from_utf8_lossy(r.take(n).map_err(short)?).into_owned();
        let state = if &page[..8] == MAGIC {
            let n = r.u32().map_err(short)? as usize;
            if n > MAX_STATE {
                return Err("its header is damaged".into());
            }
            String::from_utf8_lossy(r.take(n).map_err(short)?).into_owned()
        } else {
            String::new()
        };
        let done = page[DONE_AT as usize] >= 1;
        let [dev, ino, rdev, size_before, created] = v;
        let h = Header {
            run_id,
            seq,
            stream,
            streams,
            dev,
            ino,
            rdev,
            size_before,
            created,
            source,
            state,
        };
        Ok((h, done))
    }
}

pub fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One undo record: the bytes of `offset..offset + len` before the run wrote there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Where in the destination.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
    /// They were all zero (no payload is stored).
    pub zero: bool,
    /// Checksum of the kind, range and bytes: checks the journal and the restored bytes.
    pub sum: u128,
}

/// The checksum a record carries for `data` (empty for a zero record).
pub fn checksum(offset: u64, len: u64, zero: bool, data: &[u8]) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&[if zero { 2 } else { 1 }]);
    h.update(&offset.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(data);
    h.digest128()
}

/// Pages, rounded up: payloads and indexes are page-aligned in the file and in memory,
/// so the journal is written with O_DIRECT and read into aligned buffers.
pub fn pages(n: u64) -> u64 {
    n.div_ceil(PAGE as u64) * PAGE as u64
}

/// The page size everything in a journal is aligned to.
pub const PAGE: usize = 4096;

impl Record {
    /// Bytes its payload takes in the file (a zero record has none).
    pub fn payload_len(&self) -> u64 {
        if self.zero { 0 } else { pages(self.len) }
    }
}

/// A group commit as it is in the file: an index (its records, checksummed) padded to
/// whole pages, then each record's payload padded to whole pages. A group is written
/// whole and made durable before any write it covers, so a group that does not check
/// out at a journal's end is a torn commit whose writes never happened.
pub fn encode_index(records: &[Record]) -> Vec<u8> {
    let mut body = Vec::with_capacity(records.len() * ENTRY);
    for r in records {
        put_u64(&mut body, r.offset);
        put_u64(&mut body, r.len);
        put_u8(&mut body, r.zero as u8);
        body.extend_from_slice(&[0; 7]);
        body.extend_from_slice(&r.sum.to_le_bytes());
    }
    let mut p = Vec::with_capacity(pages((INDEX_HEAD + body.len()) as u64) as usize);
    p.extend_from_slice(GROUP_MAGIC);
    put_u32(&mut p, records.len() as u32);
    put_u32(&mut p, 0);
    p.extend_from_slice(&blake3::hash(&body).as_bytes()[..16]);
    p.extend_from_slice(&body);
    p.resize(pages(p.len() as u64) as usize, 0);
    p
}

/// How many bytes the index of a group starting with `first` (its first page) takes;
/// `None` when this is no group (a torn end, or damage).
pub fn index_len(first: &[u8]) -> Option<u64> {
    if first.len() < INDEX_HEAD || &first[..8] != GROUP_MAGIC {
        return None;
    }
    let n = u32::from_le_bytes(first[8..12].try_into().ok()?) as usize;
    (n > 0 && n <= MAX_ENTRIES).then(|| pages((INDEX_HEAD + n * ENTRY) as u64))
}

/// The records of a group's index (all of its pages); `None` when it does not check out.
pub fn decode_index(index: &[u8]) -> Option<Vec<Record>> {
    let want = index_len(index)?;
    if (index.len() as u64) < want {
        return None;
    }
    let n = u32::from_le_bytes(index[8..12].try_into().ok()?) as usize;
    let body = &index[INDEX_HEAD..INDEX_HEAD + n * ENTRY];
    if blake3::hash(body).as_bytes()[..16] != index[16..32] {
        return None;
    }
    let mut r = Rd(body);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (offset, len) = (r.u64().ok()?, r.u64().ok()?);
        let zero = match r.u8().ok()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        r.take(7).ok()?;
        let sum = u128::from_le_bytes(r.array().ok()?);
        if len == 0 || len > MAX_RECORD || offset.checked_add(len).is_none() {
            return None;
        }
        out.push(Record {
            offset,
            len,
            zero,
            sum,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_damage_is_found() {
        let h = Header {
            run_id: [7; 16],
            seq: 3,
            stream: 1,
            streams: 2,
            dev: 2049,
            ino: 12,
            rdev: 0,
            size_before: 1 << 30,
            created: 1_700_000_000,
            source: "vm.img".into(),
            state: "4096 1.2 3.4".into(),
        };
        let mut page = h.encode();
        assert_eq!(page.len(), HEADER_LEN);
        assert_eq!(Header::decode(&page).unwrap(), (h.clone(), false));
        page[DONE_AT as usize] = 1;
        assert_eq!(Header::decode(&page).unwrap(), (h, true));
        page[40] ^= 1;
        assert!(Header::decode(&page).unwrap_err().contains("damaged"));
        assert!(Header::decode(&page[..100]).is_err());
    }

    #[test]
    fn group_indexes_round_trip_and_reject_garbage() {
        let data = vec![5u8; 100];
        let recs = [
            Record {
                offset: 4096,
                len: 100,
                zero: false,
                sum: checksum(4096, 100, false, &data),
            },
            Record {
                offset: 1 << 20,
                len: 1 << 20,
                zero: true,
                sum: checksum(1 << 20, 1 << 20, true, &[]),
            },
        ];
        let index = encode_index(&recs);
        assert_eq!(index.len(), PAGE);
        assert_eq!(index_len(&index), Some(PAGE as u64));
        assert_eq!(decode_index(&index).unwrap(), recs);
        assert_eq!(recs[0].payload_len(), PAGE as u64);
        assert_eq!(recs[1].payload_len(), 0);
        let mut bad = index.clone();
        bad[40] ^= 1;
        assert_eq!(decode_index(&bad), None);
        assert_eq!(index_len(&[0u8; 64]), None);
        let many: Vec<Record> = (0..200)
            .map(|i| Record {
                offset: i * 4096,
                ..recs[0]
            })
            .collect();
        let index = encode_index(&many);
        assert_eq!(index.len(), 2 * PAGE);
        assert_eq!(decode_index(&index[..PAGE]), None, "cut short");
        assert_eq!(decode_index(&index).unwrap().len(), 200);
        assert_ne!(checksum(0, 1, false, &[0]), checksum(0, 1, true, &[]));
    }
}
