//! Heap accounting, per thread so parallel test threads do not disturb each other, and
//! the bounds the checks hold decoding and reading to.

use blocksync::testing::{BlockInfo, MAX_FRAME};
use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;

/// The global allocator of every fuzz target: the system allocator, counting this
/// thread's live bytes so a check can bound what one decode allocates.
pub struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn grew(n: usize) {
    // try_with: allocations during thread teardown must not panic.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + n;
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        let _ = LARGEST.try_with(|l| l.set(l.get().max(n)));
    });
}

fn shrank(n: usize) {
    // Memory freed on another thread than it was allocated on would go negative.
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap use of one measured call on this thread.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Most bytes live at once, above what was live before the call.
    pub peak: usize,
    /// The largest single allocation.
    pub largest: usize,
}

/// Runs `f`, measuring this thread's heap use (not nested).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    LARGEST.with(|l| l.set(0));
    let r = f();
    let usage = Usage {
        peak: PEAK.with(Cell::get) - base,
        largest: LARGEST.with(Cell::get),
    };
    (r, usage)
}

/// Most bytes [`Frame::decode`] may hold for an `n`-byte payload: every field is backed by
/// payload bytes before anything is allocated, and the widest thing built per payload
/// byte is one [`BlockInfo`] (a block state byte).
pub fn decode_bound(n: usize) -> usize {
    n * std::mem::size_of::<BlockInfo>() + 1024
}

/// What `read_frame` reserves before the data arrives: a typical frame (a chunk plus
/// headers), never the length the prefix claims.
pub const RESERVE: usize = blocksync::testing::CHUNK_TARGET as usize + 4096;

/// Most bytes reading and decoding one frame may hold, given `n` bytes of input: the
/// up-front reservation, growth as data arrives, and the decode.
pub fn read_bound(n: usize) -> usize {
    RESERVE + 2 * n + decode_bound(n)
}

/// Largest single allocation a stream reader may make on `n` bytes of input: a frame
/// buffer, or a zstd block's stated size, both capped by [`MAX_FRAME`].
pub fn stream_largest(n: usize) -> usize {
    MAX_FRAME.max(RESERVE).max(2 * n) + 4096
}
