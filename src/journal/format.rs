//! The journal file: a header naming the destination and the state it undoes, then undo
//! records, each the old bytes of one range (or a note that they were zero) framed by a
//! head and a trailer, so a scan finds where a torn tail starts and a rollback can walk
//! the records backwards without holding an index.

use crate::io::codec::{Rd, put_u8, put_u32, put_u64};

/// First bytes of a journal file.
pub const MAGIC: &[u8; 8] = b"BSUNDO01";
/// The header takes the first page; records follow.
pub const HEADER_LEN: usize = 4096;
/// A record's head and trailer, each: 64 bytes keeps payloads 64-aligned in memory.
pub const FRAME: usize = 64;
/// Largest range one record holds (larger ones are split).
pub const MAX_RECORD: u64 = 1 << 20;
/// Where the header's checksum is (over the bytes before it).
const SUM_AT: usize = 4064;
/// Where the completion flag is: outside the checksum, rewritten in place.
pub const DONE_AT: u64 = 4088;
/// Longest source label kept.
const MAX_LABEL: usize = 1024;

const HEAD: &[u8; 4] = b"UNDO";
const TAIL: &[u8; 4] = b"ODNU";
/// Record kinds: the old bytes follow, or they were all zero.
const DATA: u8 = 1;
const ZERO: u8 = 2;

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
        p.resize(SUM_AT, 0);
        let sum = blake3::hash(&p);
        p.extend_from_slice(&sum.as_bytes()[..16]);
        p.resize(HEADER_LEN, 0);
        p
    }

    /// Reads a header page; also whether the run's stream completed.
    pub fn decode(page: &[u8]) -> Result<(Header, bool), String> {
        if page.len() < HEADER_LEN || &page[..8] != MAGIC {
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
        let done = page[DONE_AT as usize] == 1;
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
        };
        Ok((h, done))
    }
}

fn truncated(s: &str, max: usize) -> &str {
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
    h.update(&[if zero { ZERO } else { DATA }]);
    h.update(&offset.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(data);
    h.digest128()
}

/// Bytes a record of `len` bytes takes in the file.
pub fn framed_len(len: u64, zero: bool) -> u64 {
    let payload = if zero {
        0
    } else {
        len.div_ceil(FRAME as u64) * FRAME as u64
    };
    2 * FRAME as u64 + payload
}

impl Record {
    /// Bytes this record takes in the file.
    pub fn framed_len(&self) -> u64 {
        framed_len(self.len, self.zero)
    }

    /// The head: what the payload is.
    pub fn head(&self) -> [u8; FRAME] {
        let mut p = Vec::with_capacity(FRAME);
        p.extend_from_slice(HEAD);
        put_u8(&mut p, if self.zero { ZERO } else { DATA });
        p.extend_from_slice(&[0; 3]);
        put_u64(&mut p, self.offset);
        put_u64(&mut p, self.len);
        p.extend_from_slice(&self.sum.to_le_bytes());
        p.resize(FRAME, 0);
        p.try_into().expect("one frame")
    }

    /// The trailer: the head's fields again and the record's length, so a reader going
    /// backwards finds where it starts.
    pub fn tail(&self) -> [u8; FRAME] {
        let mut t = self.head();
        t[..4].copy_from_slice(TAIL);
        t[48..56].copy_from_slice(&self.framed_len().to_le_bytes());
        t
    }

    /// Reads a head (or, with `tail`, a trailer); `None` when it is not one (the torn
    /// end of a journal, or damage).
    pub fn parse(frame: &[u8], tail: bool) -> Option<Record> {
        if frame.len() < FRAME || &frame[..4] != if tail { TAIL } else { HEAD } {
            return None;
        }
        let mut r = Rd(&frame[4..]);
        let zero = match r.u8().ok()? {
            DATA => false,
            ZERO => true,
            _ => return None,
        };
        r.take(3).ok()?;
        let (offset, len) = (r.u64().ok()?, r.u64().ok()?);
        let sum = u128::from_le_bytes(r.array().ok()?);
        if len == 0 || len > MAX_RECORD || offset.checked_add(len).is_none() {
            return None;
        }
        let rec = Record {
            offset,
            len,
            zero,
            sum,
        };
        if tail && frame[48..56] != rec.framed_len().to_le_bytes() {
            return None;
        }
        Some(rec)
    }
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
    fn records_parse_both_ways_and_reject_garbage() {
        let data = vec![5u8; 100];
        let r = Record {
            offset: 4096,
            len: 100,
            zero: false,
            sum: checksum(4096, 100, false, &data),
        };
        assert_eq!(r.framed_len(), 64 + 128 + 64);
        assert_eq!(Record::parse(&r.head(), false), Some(r));
        assert_eq!(Record::parse(&r.tail(), true), Some(r));
        assert_eq!(Record::parse(&r.head(), true), None);
        assert_eq!(Record::parse(&[0u8; 64], false), None);
        let mut big = r;
        big.len = MAX_RECORD + 1;
        assert_eq!(Record::parse(&big.head(), false), None);
        let mut torn = r.tail();
        torn[50] ^= 1;
        assert_eq!(Record::parse(&torn, true), None);
        assert_ne!(checksum(0, 1, false, &[0]), checksum(0, 1, true, &[]));
    }
}
