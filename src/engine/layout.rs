//! How a sync's byte range is cut into chunks (the unit read and passed between threads)
//! and blocks (the unit compared and written).

/// Reads are grouped into chunks of about this many bytes: large enough that per-read
/// and per-message costs vanish, small enough that a few of them bound memory.
pub const CHUNK_TARGET: u64 = 4 << 20;

/// How the sync's byte range is cut into chunks and blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The source size, which a file destination ends with.
    pub size: u64,
    /// First byte this stream syncs (a multiple of `chunk`).
    pub start: u64,
    /// End of the range this stream syncs (exclusive).
    pub end: u64,
    /// Block size: the unit compared and written.
    pub block: u64,
    /// Chunk size: the unit read and passed between threads, a multiple of `block`.
    pub chunk: u64,
    /// The source is a stream whose length is known at its end: `size` is an upper
    /// bound, and the run may finish at any size up to it.
    pub open_end: bool,
}

impl Layout {
    /// A layout for all `size` bytes in blocks of `block` bytes.
    pub fn new(size: u64, block: u64) -> Self {
        assert!(block > 0);
        let per_chunk = (CHUNK_TARGET / block).max(1);
        Layout {
            size,
            start: 0,
            end: size,
            block,
            chunk: per_chunk * block,
            open_end: false,
        }
    }

    /// A layout for a stream source of at most `bound` bytes.
    pub fn stream(bound: u64, block: u64) -> Self {
        Layout {
            open_end: true,
            ..Layout::new(bound, block)
        }
    }

    /// Part `i` of `n` disjoint, chunk-aligned ranges covering the whole size (for
    /// parallel streams); some parts may be empty.
    pub fn part(&self, i: u64, n: u64) -> Self {
        let chunks = self.size.div_ceil(self.chunk);
        let per = chunks.div_ceil(n.max(1));
        let start = (i * per * self.chunk).min(self.size);
        let end = ((i + 1) * per * self.chunk).min(self.size);
        Layout {
            start,
            end,
            ..*self
        }
    }

    /// Number of chunks in the range.
    pub fn chunks(&self) -> u64 {
        (self.end - self.start).div_ceil(self.chunk)
    }

    /// Number of blocks in the range.
    pub fn blocks(&self) -> u64 {
        (self.end - self.start).div_ceil(self.block)
    }

    /// Byte offset and length of chunk `index` of the range.
    pub fn chunk_at(&self, index: u64) -> (u64, usize) {
        let offset = self.start + index * self.chunk;
        (offset, (self.end - offset).min(self.chunk) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_covers_size_exactly() {
        let l = Layout::new(10 * CHUNK_TARGET + 5, 1 << 20);
        assert_eq!(l.chunks(), 11);
        assert_eq!(l.chunk_at(10), (10 * CHUNK_TARGET, 5));
        assert_eq!(l.blocks(), 10 * 4 + 1);
        let l = Layout::new(0, 4096);
        assert_eq!(l.chunks(), 0);
        let l = Layout::new(100, 8 << 20);
        assert_eq!(l.chunk, 8 << 20);
        assert_eq!(l.chunk_at(0), (0, 100));
    }

    #[test]
    fn parts_are_disjoint_and_cover() {
        for (size, n) in [
            (10 * CHUNK_TARGET + 5, 3),
            (CHUNK_TARGET, 4),
            (0, 2),
            (7, 1),
        ] {
            let whole = Layout::new(size, 4096);
            let mut next = 0;
            let mut blocks = 0;
            for i in 0..n {
                let p = whole.part(i, n);
                assert_eq!(p.start, next);
                assert_eq!(p.start % whole.chunk, 0);
                next = p.end;
                blocks += p.blocks();
            }
            assert_eq!(next, size);
            assert_eq!(blocks, whole.blocks());
        }
    }
}
