//! Counters both halves update as they go, and the findings the user must hear about.

use super::messages::FindingKind;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Byte ranges the user must hear about, merged where adjacent.
#[derive(Debug, Default, Clone)]
pub struct Findings {
    /// Source ranges that could not be read.
    pub unreadable: Vec<Range<u64>>,
    /// `--verify`: destination ranges that differ from the source.
    pub mismatch: Vec<Range<u64>>,
    /// `--verify`: source ranges that changed while the sync ran.
    pub source_changed: Vec<Range<u64>>,
}

impl Findings {
    /// Adds a range, merging it with the last one of its kind when they touch.
    pub fn add(&mut self, kind: FindingKind, offset: u64, len: u64) {
        let list = match kind {
            FindingKind::Unreadable => &mut self.unreadable,
            FindingKind::Mismatch => &mut self.mismatch,
            FindingKind::SourceChanged => &mut self.source_changed,
        };
        let r = offset..offset.saturating_add(len);
        match list.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => list.push(r),
        }
    }

    /// Total bytes of a list of ranges.
    pub fn bytes(list: &[Range<u64>]) -> u64 {
        list.iter().map(|r| r.end - r.start).sum()
    }

    /// Sorts and merges each list (parallel streams add their ranges interleaved).
    pub fn normalize(&mut self) {
        for list in [
            &mut self.unreadable,
            &mut self.mismatch,
            &mut self.source_changed,
        ] {
            list.sort_by_key(|r| r.start);
            let mut out: Vec<Range<u64>> = Vec::with_capacity(list.len());
            for r in list.drain(..) {
                match out.last_mut() {
                    Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                    _ => out.push(r),
                }
            }
            *list = out;
        }
    }
}

/// Counters both halves update as they go; read by the progress display and the summary.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes read from the source.
    pub source_read: AtomicU64,
    /// Bytes read from the destination.
    pub dest_read: AtomicU64,
    /// Bytes written to the destination.
    pub written: AtomicU64,
    /// Bytes the undo journal took in its file (its records with their framing).
    pub journaled: AtomicU64,
    /// Blocks found equal.
    pub blocks_same: AtomicU64,
    /// Blocks found different (written, or to be written in a dry run).
    pub blocks_changed: AtomicU64,
    /// Bytes of the changed blocks (what a dry run would write).
    pub changed_bytes: AtomicU64,
    /// Source blocks that are all zero (holes included).
    pub blocks_zero: AtomicU64,
    /// Source blocks in holes: known zero without reading.
    pub blocks_hole: AtomicU64,
    /// Changed blocks sent as zero ranges (hole punched or zeros written), not data.
    pub blocks_zeroed: AtomicU64,
    /// Bytes sent over the link to the other machine.
    pub wire_sent: AtomicU64,
    /// Bytes received over the link.
    pub wire_received: AtomicU64,
    /// Of the bytes sent, block data frames.
    pub data_sent: AtomicU64,
    /// Of the bytes received, block data frames.
    pub data_received: AtomicU64,
    /// Of the bytes sent, digest frames.
    pub digests_sent: AtomicU64,
    /// Of the bytes received, digest frames.
    pub digests_received: AtomicU64,
    /// Source bytes compared so far (progress).
    pub done: AtomicU64,
    /// Block data the compare has sent on that is not yet on the wire (a push) or taken
    /// by the writer (a local run): the progress stays behind by it, so that rate and
    /// ETA tell what crossed, also under `--bwlimit`.
    pub in_flight: AtomicU64,
    /// Bytes compared at full strength by `--verify`.
    pub verified: AtomicU64,
    /// Unreadable, mismatched and changed ranges.
    pub findings: Mutex<Findings>,
    /// The other machine's half failed (its reason), seen by the link before the source
    /// half reaches it in the stream: the source half stops at once instead of working
    /// through the reports queued ahead of it.
    pub peer_failed: Mutex<Option<(crate::error::Kind, String)>>,
}

impl Stats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes `n` from a counter, stopping at zero (the halves of a run on two machines
    /// count their own parts).
    pub(crate) fn take(counter: &AtomicU64, n: u64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }

    /// Source bytes done as the progress shows them: compared, and what changed in
    /// them sent on or written.
    pub fn progress(&self) -> u64 {
        Self::get(&self.done).saturating_sub(Self::get(&self.in_flight))
    }

    /// Records a finding.
    pub fn found(&self, kind: FindingKind, offset: u64, len: u64) {
        let mut f = self.findings.lock().expect("not poisoned");
        f.add(kind, offset, len);
    }

    /// The peer's failure, if the link has seen one.
    pub fn peer_failure(&self) -> Option<crate::error::Error> {
        let f = self.peer_failed.lock().expect("not poisoned");
        f.as_ref()
            .map(|(k, m)| crate::error::Error::new(*k, m.clone()))
    }

    /// The findings so far, sorted and merged.
    pub fn findings(&self) -> Findings {
        let mut f = self.findings.lock().expect("not poisoned").clone();
        f.normalize();
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_merge_touching_ranges_of_one_kind_only() {
        let mut f = Findings::default();
        f.add(FindingKind::Unreadable, 0, 512);
        f.add(FindingKind::Unreadable, 512, 512); // touches: merged
        f.add(FindingKind::Mismatch, 1024, 4096); // another kind: its own list
        f.add(FindingKind::Unreadable, 4096, 512); // a gap: a new range
        f.add(FindingKind::SourceChanged, u64::MAX - 1, 10); // saturates, no overflow
        assert_eq!(f.unreadable, vec![0..1024, 4096..4608]);
        assert_eq!(f.mismatch, vec![1024..5120]);
        assert_eq!(f.source_changed, vec![u64::MAX - 1..u64::MAX]);
        assert_eq!(Findings::bytes(&f.unreadable), 1536);
    }

    #[test]
    fn normalize_sorts_and_merges_what_parallel_streams_interleave() {
        let mut f = Findings::default();
        for (at, len) in [(8192, 512), (0, 4096), (4096, 100), (2048, 1024), (9000, 1)] {
            f.add(FindingKind::Unreadable, at, len);
        }
        f.normalize();
        assert_eq!(f.unreadable, vec![0..4196, 8192..8704, 9000..9001]);
    }

    #[test]
    fn stats_hand_out_findings_normalized() {
        let s = Stats::default();
        s.found(FindingKind::Mismatch, 4096, 4096);
        s.found(FindingKind::Mismatch, 0, 4096);
        assert_eq!(s.findings().mismatch, vec![0..8192]);
        assert!(s.peer_failure().is_none());
    }
}
