//! `--digest-file` on the source half: compare against the destination's digests kept
//! from the last run instead of reading the destination (spot-checking a few of its
//! blocks first), and record the digests of this run for the next one.
//!
//! The new file must never claim a block that was not written. Blocks sent during the run
//! are recorded as missing at first and their digests kept aside; only when the
//! destination confirms the whole sync are they filled in. A run that fails still leaves a
//! usable file: unchanged blocks as compared, sent blocks missing (they are compared and
//! sent again next time), blocks not reached as they were.

use crate::digestfile::format::{DigestFile, DigestWriter};
use crate::hash::BlockInfo;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Mutex;
use std::time::Duration;

/// How long a stream waits for the other streams' spot-checks: they start together, so
/// one that has not checked by then is stuck.
const GATE_TIMEOUT: Duration = Duration::from_secs(120);

/// How the spot-checks of all streams came out ([`Cache::all_checked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Every stream checked and found the file right.
    Passed,
    /// Some stream found the destination is not what the file says.
    Stale,
    /// Some stream did not check within the wait: the file is not known stale, but
    /// writing on a partial check is not safe either.
    TimedOut(Duration),
}

/// The digest files of one run, shared by its streams.
#[derive(Debug)]
pub struct Cache {
    /// The block digest.
    pub kind: crate::hash::HashKind,
    /// The digest file's path, for messages.
    pub name: String,
    /// The destination it describes, for messages.
    pub dest: String,
    /// The previous run's digests of the destination (`None`: read the destination).
    pub old: Option<DigestFile>,
    /// Blocks of the destination to check against `old` before anything is written.
    pub spot: Vec<u64>,
    new: Option<Mutex<Recorder>>,
    /// Streams that spot-check before any of them writes: (arrived, any failed).
    gate: (Mutex<(usize, bool)>, std::sync::Condvar),
    streams: usize,
    /// How long [`Cache::all_checked`] waits ([`GATE_TIMEOUT`]; tests shorten it).
    gate_timeout: Duration,
}

#[derive(Debug)]
struct Recorder {
    writer: DigestWriter,
    /// Digests of the blocks sent, applied once the sync is confirmed.
    sent: io::BufWriter<std::fs::File>,
    sent_path: std::path::PathBuf,
    /// Per stream (by its first byte): the next block not yet recorded, and its end.
    progress: HashMap<u64, (u64, u64)>,
}

impl Recorder {
    /// Keeps aside what sent block `index` holds; entries apply in order, the last wins.
    fn sent_entry(&mut self, index: u64, info: &BlockInfo) -> io::Result<()> {
        let mut e = [0u8; 8 + crate::digestfile::format::ENTRY];
        e[..8].copy_from_slice(&index.to_le_bytes());
        e[8..].copy_from_slice(&crate::digestfile::format::encode_entry(info));
        self.sent.write_all(&e)
    }
}

impl Cache {
    /// A cache comparing against `old` (if any) and recording into `new` (if any).
    pub fn new(
        kind: crate::hash::HashKind,
        name: String,
        dest: String,
        old: Option<DigestFile>,
        spot: Vec<u64>,
        new: Option<DigestWriter>,
        streams: usize,
    ) -> io::Result<Self> {
        let new = match new {
            Some(writer) => {
                // Next to the digest file: its directory is known to be writable.
                let dir = writer.path().parent().map(|d| d.to_path_buf());
                let dir = dir.filter(|d| !d.as_os_str().is_empty());
                let id = crate::digestfile::syncid::fresh();
                let sent_path = dir.unwrap_or_else(|| ".".into()).join(format!(
                    ".blocksync-sent-{}-{:x}",
                    std::process::id(),
                    u64::from_le_bytes(id[..8].try_into().expect("8 bytes"))
                ));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&sent_path)?;
                Some(Mutex::new(Recorder {
                    writer,
                    sent: io::BufWriter::new(file),
                    sent_path,
                    progress: HashMap::new(),
                }))
            }
            None => None,
        };
        Ok(Cache {
            kind,
            name,
            dest,
            old,
            spot,
            new,
            gate: (Mutex::new((0, false)), std::sync::Condvar::new()),
            streams: streams.max(1),
            gate_timeout: GATE_TIMEOUT,
        })
    }

    /// Every stream calls this once after its spot-checks: nobody writes before all have
    /// checked, and if any found the file stale, all stop.
    pub fn all_checked(&self, passed: bool) -> Gate {
        let (lock, cv) = &self.gate;
        let mut g = lock.lock().expect("not poisoned");
        g.0 += 1;
        g.1 |= !passed;
        cv.notify_all();
        let deadline = std::time::Instant::now() + self.gate_timeout;
        while g.0 < self.streams {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                // A stream that found the file stale is the better reason to give.
                return match g.1 {
                    true => Gate::Stale,
                    false => Gate::TimedOut(self.gate_timeout),
                };
            }
            g = cv.wait_timeout(g, left).expect("not poisoned").0;
        }
        if g.1 { Gate::Stale } else { Gate::Passed }
    }

    /// Whether this run records a new digest file.
    pub fn records(&self) -> bool {
        self.new.is_some()
    }

    /// A stream covering blocks `first..end` starts.
    pub fn begin(&self, first: u64, end: u64) {
        if first >= end {
            return; // an empty stream covers nothing (and must not claim a block)
        }
        if let Some(r) = &self.new {
            r.lock()
                .expect("not poisoned")
                .progress
                .insert(first, (first, end));
        }
    }

    /// Records the blocks `first..` of a chunk: `infos` as the source holds them, `sent`
    /// marking those written to the destination in this run.
    pub fn record(
        &self,
        stream: u64,
        first: u64,
        infos: &[BlockInfo],
        sent: &[bool],
    ) -> io::Result<()> {
        let Some(r) = &self.new else { return Ok(()) };
        let mut r = r.lock().expect("not poisoned");
        let mut now: Vec<BlockInfo> = infos.to_vec();
        for (j, s) in sent.iter().enumerate() {
            if *s {
                r.sent_entry(first + j as u64, &infos[j])?;
                now[j] = BlockInfo::Missing;
            }
        }
        r.writer.put(first, &now)?;
        if let Some(p) = r.progress.get_mut(&stream) {
            p.0 = first + infos.len() as u64;
        }
        Ok(())
    }

    /// Records what block `index`, sent later than its chunk was recorded (a refined
    /// block), holds once written; it replaces what the chunk's record said of it.
    pub fn record_sent(&self, index: u64, info: &BlockInfo) -> io::Result<()> {
        let Some(r) = &self.new else { return Ok(()) };
        r.lock().expect("not poisoned").sent_entry(index, info)
    }

    /// Seals the new digest file: complete when `confirmed` (the destination holds every
    /// block), else the partial file described above; either way the blocks in `forget`
    /// (byte ranges found different by --verify) are unknown.
    pub fn finish(self, confirmed: bool, forget: &[std::ops::Range<u64>]) -> io::Result<()> {
        let Some(r) = self.new else { return Ok(()) };
        let Recorder {
            mut writer,
            sent,
            sent_path,
            progress,
        } = r.into_inner().expect("not poisoned");
        let result = (|| {
            let mut sent = sent.into_inner().map_err(|e| e.into_error())?;
            if confirmed {
                std::io::Seek::rewind(&mut sent)?;
                let mut r = io::BufReader::with_capacity(1 << 20, sent);
                let mut e = [0u8; 8 + crate::digestfile::format::ENTRY];
                loop {
                    match r.read_exact(&mut e) {
                        Ok(()) => {}
                        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => break,
                        Err(err) => return Err(err),
                    }
                    let index = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
                    let info = crate::digestfile::format::decode_entry(&e[8..])
                        .map_err(io::Error::other)?;
                    writer.put(index, &[info])?;
                }
            } else {
                // The destination's size is unknown until a run completes (writes past its
                // end grew it, the final resize never came).
                writer.set_target_size(u64::MAX)?;
                // Blocks not reached are still as the old file says.
                for (next, end) in progress.values() {
                    let mut at = *next;
                    while at < *end {
                        let n = (*end - at).min(1 << 16) as usize;
                        let old = match &self.old {
                            Some(o) => o.entries(at, n)?,
                            None => vec![BlockInfo::Missing; n],
                        };
                        writer.put(at, &old)?;
                        at += n as u64;
                    }
                }
            }
            let block = writer.header().block;
            for r in forget {
                let (a, b) = (r.start / block, r.end.div_ceil(block));
                writer.put(a, &vec![BlockInfo::Missing; (b - a) as usize])?;
            }
            writer.finish()
        })();
        let _ = std::fs::remove_file(&sent_path);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(streams: usize) -> Cache {
        let kind = crate::hash::HashKind::Xxh3;
        Cache::new(
            kind,
            "dig".into(),
            "dst".into(),
            None,
            vec![],
            None,
            streams,
        )
        .unwrap()
    }

    #[test]
    fn a_stream_that_never_checks_is_a_timeout_not_a_stale_file() {
        let mut c = cache(2);
        c.gate_timeout = Duration::from_millis(50);
        assert_eq!(
            c.all_checked(true),
            Gate::TimedOut(Duration::from_millis(50))
        );
    }

    #[test]
    fn a_failed_check_while_another_stream_never_comes_is_stale() {
        let mut c = cache(3);
        c.gate_timeout = Duration::from_millis(50);
        assert_eq!(c.all_checked(false), Gate::Stale);
        assert_eq!(c.all_checked(true), Gate::Stale);
    }

    #[test]
    fn streams_wait_for_each_other_and_share_the_outcome() {
        for (second, want) in [(true, Gate::Passed), (false, Gate::Stale)] {
            let c = cache(2);
            let outcomes = std::thread::scope(|s| {
                let a = s.spawn(|| c.all_checked(true));
                let b = s.spawn(|| c.all_checked(second));
                [a.join().unwrap(), b.join().unwrap()]
            });
            assert_eq!(outcomes, [want, want]);
        }
        assert_eq!(cache(1).all_checked(true), Gate::Passed);
    }
}
