//! Deciding what to send for a chunk: which blocks differ from the destination's (by
//! bytes or digests), and how each changed run goes (data, a zero range, data leaving
//! out zero pages, or a question for sub-block digests first).

use super::Chunk;
use crate::engine::messages::ToSource;
use crate::engine::{Compare, Config};
use crate::hash::BlockInfo;
use crate::io::target;
use std::ops::Range;

/// How a changed run of blocks is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Send {
    /// The source's bytes.
    Data,
    /// A zero range: the source blocks are all zero.
    Zero,
    /// The source's bytes over destination blocks known zero: all-zero pages inside
    /// can be left out, keeping a sparse destination thin.
    DataOverZero,
    /// Blocks that differ from the destination's: ask for its sub-block digests first,
    /// so only the changed pieces cross (see [`super::refine::Refiner`]).
    Refine,
}

/// Granularity of the zero pages left out of [`Send::DataOverZero`] runs: the usual
/// filesystem block.
const PAGE: usize = 4096;

/// The non-zero pages of `data`, as ranges of it.
pub(super) fn nonzero_pages(data: &[u8]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, page) in data.chunks(PAGE).enumerate() {
        if target::is_zero(page) {
            continue;
        }
        let r = i * PAGE..i * PAGE + page.len();
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// What to send for one chunk.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Changes {
    /// Byte ranges within the chunk, merged where adjacent and sent the same way.
    pub(super) ranges: Vec<(Range<usize>, Send)>,
    /// Blocks that differ.
    pub(super) blocks: u64,
    /// Of those, blocks sent as zero ranges.
    pub(super) zeroed: u64,
}

impl Changes {
    /// Adds a range, merging it into the last one when it continues it and goes the same
    /// way (blocks to refine stay apart: each is asked about on its own).
    pub(super) fn push(&mut self, r: Range<usize>, how: Send) {
        match self.ranges.last_mut() {
            Some((last, h)) if last.end == r.start && *h == how && how != Send::Refine => {
                last.end = r.end
            }
            _ => self.ranges.push((r, how)),
        }
    }
}

/// A block both sides hold in one process, differing: only its changed sub-blocks are
/// written (or all of it when most differ).
fn refine_bytes(changes: &mut Changes, config: &Config, mine: &[u8], theirs: &[u8], at: usize) {
    let piece = config.refine as usize;
    if piece == 0 || piece >= mine.len() {
        changes.push(at..at + mine.len(), Send::Data);
        return;
    }
    let differ: Vec<usize> = (0..mine.len().div_ceil(piece))
        .filter(|&i| {
            let r = i * piece..((i + 1) * piece).min(mine.len());
            mine[r.clone()] != theirs[r]
        })
        .collect();
    if differ.len() * 2 > mine.len().div_ceil(piece) {
        changes.push(at..at + mine.len(), Send::Data);
        return;
    }
    for i in differ {
        let r = i * piece..((i + 1) * piece).min(mine.len());
        changes.push(at + r.start..at + r.end, Send::Data);
    }
}

/// Which blocks of a chunk differ and how to send them. `mine`: the source's digests of
/// the chunk, when computed already.
pub(super) fn changed_ranges(
    config: &Config,
    chunk: &Chunk,
    theirs: &ToSource,
    mine: Option<&[BlockInfo]>,
) -> Changes {
    let block = config.layout.block as usize;
    let (offset, len) = config.chunk_at(chunk.index);
    let ahead = mine.or_else(|| config.precomputed.as_ref().and_then(|p| p.get(offset)));
    let mine = |r: &Range<usize>| -> &[u8] {
        &chunk
            .data
            .as_ref()
            .expect("data blocks are read unless hashed ahead")[r.clone()]
    };
    let refine = config.refine > 0 && (config.refine as usize) < block;
    let mut changes = Changes::default();
    for (j, &zero) in chunk.zeros.iter().enumerate() {
        let r = j * block..((j + 1) * block).min(len);
        let bad = overlapping(&chunk.bad, &r);
        if !bad.is_empty() && config.salvage.keep_unreadable {
            // Only the readable parts go; the destination keeps its old bytes in the rest.
            changes.blocks += 1;
            let mut at = r.start;
            for b in bad.iter().chain(std::iter::once(&(r.end..r.end))) {
                if b.start > at {
                    changes.push(at..b.start, Send::Data);
                }
                at = at.max(b.end);
            }
            continue;
        }
        let change = match theirs {
            ToSource::Bytes { data, zeros, .. } => {
                let their_zero = zeros.get(j) == Some(&true);
                match (zero, their_zero) {
                    (true, true) => None,
                    (true, false) => match data.get(r.clone()) {
                        Some(b) if target::is_zero(b) => None,
                        _ => Some(Send::Zero),
                    },
                    (false, true) if config.sparse => Some(Send::DataOverZero),
                    (false, true) => Some(Send::Data),
                    (false, false) => match data.get(r.clone()) {
                        Some(b) if b == mine(&r) => None,
                        Some(b) => {
                            changes.blocks += 1;
                            refine_bytes(&mut changes, config, mine(&r), b, r.start);
                            continue;
                        }
                        None => Some(Send::Data),
                    },
                }
            }
            ToSource::Digests { blocks, .. } => {
                let theirs = blocks.get(j).copied().unwrap_or(BlockInfo::Missing);
                match (zero, theirs) {
                    (true, BlockInfo::Zero) => None,
                    (true, _) => Some(Send::Zero),
                    (false, BlockInfo::Digest(d)) => {
                        // Hash only blocks the destination has: a new one costs no hashing.
                        let same = match ahead.and_then(|a| a.get(j)) {
                            Some(BlockInfo::Digest(known)) => *known == d,
                            _ => match config.compare {
                                Compare::Digest(kind) => kind.block_digest(mine(&r)) == d,
                                Compare::Bytes => false,
                            },
                        };
                        match (same, refine && r.len() > config.refine as usize) {
                            (true, _) => None,
                            (false, true) => Some(Send::Refine),
                            (false, false) => Some(Send::Data),
                        }
                    }
                    (false, BlockInfo::Zero) if config.sparse => Some(Send::DataOverZero),
                    (false, _) => Some(Send::Data),
                }
            }
            _ => unreachable!("checked by caller"),
        };
        // Refining re-reads the source, which would only fail again: send what we have.
        let change = change.map(|how| match how {
            Send::Refine if !bad.is_empty() => Send::Data,
            how => how,
        });
        let Some(how) = change else { continue };
        changes.blocks += 1;
        if how == Send::Zero {
            changes.zeroed += 1;
        }
        changes.push(r, how);
    }
    changes
}

/// The parts of the ranges in `bad` (ascending) that fall in `r`.
pub(super) fn overlapping(bad: &[Range<usize>], r: &Range<usize>) -> Vec<Range<usize>> {
    bad.iter()
        .filter(|b| b.start < r.end && b.end > r.start)
        .map(|b| b.start.max(r.start)..b.end.min(r.end))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Layout;
    use crate::hash::HashKind;
    use crate::io::pool::Buf;

    /// Blocks of 4 bytes, chunks of 16: small enough to spell out every byte.
    fn config(size: u64) -> Config {
        let layout = Layout {
            size,
            start: 0,
            end: size,
            block: 4,
            chunk: 16,
            open_end: false,
        };
        Config::build(layout, &Default::default())
    }

    fn chunk(data: &[u8], bad: Vec<Range<usize>>) -> Chunk {
        Chunk {
            index: 0,
            data: Some(Buf::detached(data.to_vec())),
            zeros: data.chunks(4).map(target::is_zero).collect(),
            bad,
            infos: None,
        }
    }

    fn bytes(data: &[u8], zeros: Vec<bool>) -> ToSource {
        ToSource::Bytes {
            index: 0,
            data: Buf::detached(data.to_vec()),
            zeros,
        }
    }

    fn digest(b: &[u8]) -> BlockInfo {
        BlockInfo::Digest(HashKind::Xxh3.block_digest(b))
    }

    #[test]
    fn nonzero_pages_merges_runs_and_keeps_a_short_tail() {
        let mut data = vec![0u8; 4 * PAGE + 100];
        data[PAGE + 7] = 1;
        data[3 * PAGE - 1] = 2;
        data[4 * PAGE + 99] = 3;
        assert_eq!(
            nonzero_pages(&data),
            vec![PAGE..3 * PAGE, 4 * PAGE..4 * PAGE + 100]
        );
        assert_eq!(nonzero_pages(&[]), Vec::<Range<usize>>::new());
        assert_eq!(nonzero_pages(&[0; PAGE + 1]), Vec::<Range<usize>>::new());
        assert_eq!(nonzero_pages(&[9; 10]), vec![0..10]);
    }

    #[test]
    fn changes_merge_only_adjacent_ranges_sent_alike_and_never_refines() {
        let mut c = Changes::default();
        c.push(0..4, Send::Data);
        c.push(4..8, Send::Data); // continues: merged
        c.push(8..12, Send::Zero); // another way: apart
        c.push(16..20, Send::Zero); // a gap: apart
        c.push(20..24, Send::Refine);
        c.push(24..28, Send::Refine); // each refined block is asked about alone
        c.push(28..32, Send::DataOverZero);
        assert_eq!(
            c.ranges,
            vec![
                (0..8, Send::Data),
                (8..12, Send::Zero),
                (16..20, Send::Zero),
                (20..24, Send::Refine),
                (24..28, Send::Refine),
                (28..32, Send::DataOverZero),
            ]
        );
    }

    #[test]
    fn overlapping_clips_to_the_range() {
        let bad = [2..5, 8..12, 20..30];
        assert_eq!(overlapping(&bad, &(4..10)), vec![4..5, 8..10]);
        assert_eq!(overlapping(&bad, &(0..40)), bad.to_vec());
        // Touching is not overlapping.
        assert_eq!(overlapping(&bad, &(12..20)), Vec::<Range<usize>>::new());
        assert_eq!(overlapping(&bad, &(21..22)), vec![21..22]);
    }

    #[test]
    fn refine_bytes_sends_the_differing_pieces_unless_most_differ() {
        let mut config = config(64);
        config.refine = 4;
        let mine = [1u8; 16];
        let mut theirs = mine;
        theirs[5] = 0; // piece 1
        theirs[15] = 0; // piece 3
        let mut c = Changes::default();
        refine_bytes(&mut c, &config, &mine, &theirs, 32);
        // Half the pieces differ: still piecewise.
        assert_eq!(c.ranges, vec![(36..40, Send::Data), (44..48, Send::Data)]);

        theirs[0] = 0; // three of four differ: the whole block is cheaper
        let mut c = Changes::default();
        refine_bytes(&mut c, &config, &mine, &theirs, 32);
        assert_eq!(c.ranges, vec![(32..48, Send::Data)]);

        for piece in [0, 16] {
            // Off, or pieces no smaller than the block: whole.
            config.refine = piece;
            let mut c = Changes::default();
            refine_bytes(&mut c, &config, &mine, &mine, 0);
            assert_eq!(c.ranges, vec![(0..16, Send::Data)]);
        }
        // Blocks do not count here: the caller counts the block.
        assert_eq!((c.blocks, c.zeroed), (0, 0));
    }

    #[test]
    fn changed_ranges_by_bytes() {
        let config = config(16);
        let mine = [1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 4, 4, 4, 4];
        let dest = [1, 1, 1, 1, 9, 2, 2, 2, 5, 0, 0, 0, 0, 0, 0, 0];
        // Block 3 reported as a known zero (a hole), so its bytes are not compared.
        let theirs = bytes(&dest, vec![false, false, false, true]);
        let c = changed_ranges(&config, &chunk(&mine, vec![]), &theirs, None);
        assert_eq!(
            c,
            Changes {
                ranges: vec![
                    (4..8, Send::Data),
                    (8..12, Send::Zero),
                    (12..16, Send::DataOverZero),
                ],
                blocks: 3,
                zeroed: 1,
            }
        );
        // Not sparse: plain bytes over the zero block.
        let mut dense = config.clone();
        dense.sparse = false;
        let c = changed_ranges(&dense, &chunk(&mine, vec![]), &theirs, None);
        assert_eq!(
            c.ranges,
            vec![
                (4..8, Send::Data),
                (8..12, Send::Zero),
                (12..16, Send::Data)
            ]
        );
    }

    #[test]
    fn changed_ranges_by_digests_refines_only_readable_changed_blocks() {
        let mut config = config(14); // the last block is 2 bytes
        config.compare = Compare::Digest(HashKind::Xxh3);
        config.refine = 2;
        let mine = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4];
        let theirs = ToSource::Digests {
            index: 0,
            blocks: vec![
                digest(&mine[0..4]),   // same
                digest(&[7, 7, 7, 7]), // differs: refined
                BlockInfo::Zero,       // known zero: data leaving out zero pages
                digest(&[4, 5]),       // differs, but no larger than a piece: whole
            ],
        };
        let c = changed_ranges(&config, &chunk(&mine, vec![]), &theirs, None);
        assert_eq!(
            c,
            Changes {
                ranges: vec![
                    (4..8, Send::Refine),
                    (8..12, Send::DataOverZero),
                    (12..14, Send::Data),
                ],
                blocks: 3,
                zeroed: 0,
            }
        );
        // An unreadable sector in the refined block: refining would re-read it, so the
        // block goes whole, as read.
        let c = changed_ranges(
            &config,
            &chunk(&mine, std::iter::once(5..6).collect()),
            &theirs,
            None,
        );
        assert_eq!(c.ranges[0], (4..8, Send::Data));
        // Digests given by the caller are used instead of hashing: claiming block 1 is
        // what the destination has makes it the same.
        let known = [digest(&mine[0..4]), digest(&[7, 7, 7, 7])];
        let c = changed_ranges(&config, &chunk(&mine, vec![]), &theirs, Some(&known));
        assert_eq!(c.ranges[0], (8..12, Send::DataOverZero));
        assert_eq!(c.blocks, 2);
    }

    #[test]
    fn keep_unreadable_sends_only_the_readable_parts_of_a_block() {
        let mut config = config(16);
        config.salvage.keep_unreadable = true;
        let mine = [1u8; 16];
        let dest = [1u8; 16];
        let theirs = bytes(&dest, vec![false; 4]);
        // Unreadable: one byte inside block 1, and block 2's end into block 3's start.
        let c = changed_ranges(&config, &chunk(&mine, vec![5..6, 10..13]), &theirs, None);
        assert_eq!(
            c,
            Changes {
                ranges: vec![
                    (4..5, Send::Data),
                    (6..10, Send::Data),
                    (13..16, Send::Data)
                ],
                blocks: 3,
                zeroed: 0,
            }
        );
    }
}
