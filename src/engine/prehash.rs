//! Hashing the local side while ssh logs in: the login takes a few hundred milliseconds
//! (much more over a WAN) during which the cores would idle. Whatever is hashed by the
//! time the remote side answers is not read or hashed again for comparison.

use super::Layout;
use super::blockhash::{hash_chunk, read_chunk};
use crate::hash::BlockInfo;
use crate::hash::HashKind;
use crate::io::target;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// Most chunks hashed ahead (64 GiB at 4 MiB chunks).
const MAX_CHUNKS: usize = 16 << 10;
/// Most block entries kept (about 10 MiB), whatever the block size.
const MAX_ENTRIES: usize = 256 << 10;

/// Digests computed ahead, per chunk of the whole layout, from chunk 0 on.
#[derive(Debug, Default)]
pub struct Precomputed {
    chunk: u64,
    chunks: Vec<Ahead>,
}

/// One chunk hashed ahead.
#[derive(Debug)]
struct Ahead {
    digests: Vec<BlockInfo>,
    /// Bytes read to hash it.
    read: u64,
    /// Its blocks in holes, known zero without reading.
    holes: u64,
}

impl Precomputed {
    /// Digests as if hashed ahead: `digests[i]` for chunk `i` of `chunk` bytes.
    #[cfg(test)]
    pub(crate) fn from_digests(chunk: u64, digests: Vec<Vec<BlockInfo>>) -> Self {
        let chunks = digests
            .into_iter()
            .map(|digests| Ahead {
                digests,
                read: 0,
                holes: 0,
            })
            .collect();
        Precomputed { chunk, chunks }
    }

    /// Bytes read to hash the chunks kept: those the sync uses instead of reading them
    /// (the rest it reads itself, and counts then).
    pub fn read(&self) -> u64 {
        self.chunks.iter().map(|c| c.read).sum()
    }

    /// How many blocks of the chunk at `offset` are in holes, if it was hashed ahead.
    pub fn holes(&self, offset: u64) -> Option<u64> {
        self.at(offset).map(|c| c.holes)
    }

    fn at(&self, offset: u64) -> Option<&Ahead> {
        if self.chunk == 0 || !offset.is_multiple_of(self.chunk) {
            return None;
        }
        self.chunks.get((offset / self.chunk) as usize)
    }

    /// Drops the chunks at or past byte `end`: the other side holds nothing to compare
    /// them with (a push to a new or smaller destination), so they are better read and
    /// sent straight away than read twice.
    pub fn drop_from(&mut self, end: u64) {
        if self.chunk > 0 {
            self.chunks.truncate(end.div_ceil(self.chunk) as usize);
        }
    }

    /// Keeps only the chunks that are the same under a layout of `real_size` bytes as
    /// under the `assumed_size` they were hashed for (a pull hashes the destination before
    /// the source's size is known).
    pub fn retain_matching(&mut self, assumed_size: u64, real_size: u64) {
        let c = self.chunk;
        let same = |i: usize| {
            let end = (i as u64 + 1) * c;
            end.min(assumed_size) == end.min(real_size)
        };
        let keep = (0..self.chunks.len()).take_while(|&i| same(i)).count();
        self.chunks.truncate(keep);
    }

    /// Digests of the blocks of the chunk starting at `offset` (only blocks the file held
    /// completely), if that chunk was hashed ahead.
    pub fn get(&self, offset: u64) -> Option<&[BlockInfo]> {
        self.at(offset).map(|c| c.digests.as_slice())
    }
}

/// A background pass hashing a file from the start until stopped.
pub struct Prehash {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Precomputed>,
}

impl Prehash {
    /// Starts hashing `file`, which holds `have` bytes, over `layout` (the whole range).
    /// `tkind` tells whether the file can report its holes, which are then not read.
    pub fn start(
        file: File,
        tkind: target::TargetKind,
        have: u64,
        layout: Layout,
        kind: HashKind,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Precomputed {
                chunk: layout.chunk,
                ..Precomputed::default()
            };
            let mut buf = vec![0u8; layout.chunk as usize];
            let mut entries = 0;
            let mut extents = target::Extents::new(&file, tkind);
            for index in 0..layout.chunks().min(MAX_CHUNKS as u64) {
                if flag.load(Ordering::Relaxed) || entries >= MAX_ENTRIES {
                    break;
                }
                let Ok((want, holes, n)) =
                    read_chunk(&file, extents.as_mut(), &layout, index, have, &mut buf)
                else {
                    break; // the real pass will meet and report the error
                };
                let digests = hash_chunk(kind, &layout, index, &buf[..want], &holes);
                entries += digests.len();
                out.chunks.push(Ahead {
                    digests,
                    read: n,
                    holes: holes.iter().filter(|&&h| h).count() as u64,
                });
            }
            out
        });
        Prehash { stop, thread }
    }

    /// Stops and returns what was hashed so far.
    pub fn finish(self) -> Precomputed {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_complete_blocks_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let layout = Layout {
            chunk: 8192,
            ..Layout::new(12_000, 4096)
        };
        let pre = Prehash::start(
            File::open(&p).unwrap(),
            target::TargetKind::File,
            10_000,
            layout,
            HashKind::Xxh3,
        );
        // Let it run to the end (the file is tiny), so `finish` cuts nothing short.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !pre.thread.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "hashing 10 KB took 30 s"
            );
            std::thread::yield_now();
        }
        let pre = pre.finish();
        assert_eq!(pre.read(), 10_000);
        let first = pre.get(0).unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(
            first[1],
            BlockInfo::Digest(HashKind::Xxh3.block_digest(&data[4096..8192]))
        );
        // The second chunk holds 1808 of 3808 bytes: no complete block.
        assert_eq!(pre.get(8192).unwrap(), &[BlockInfo::Missing]);
        assert!(pre.get(4096).is_none());
        let mut pre = pre;
        pre.retain_matching(12_000, 12_000);
        assert!(pre.get(8192).is_some());
        pre.retain_matching(12_000, 20_000);
        assert!(pre.get(0).is_some() && pre.get(8192).is_none());
        // What was dropped is read again by the sync, and counted there.
        assert_eq!(pre.read(), 8192);
        assert_eq!(pre.holes(0), Some(0));
        pre.drop_from(0);
        assert!(pre.get(0).is_none());
        assert_eq!(pre.read(), 0);
    }
}
