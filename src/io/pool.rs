//! A fixed set of reusable I/O buffers. Readers block when all buffers are in flight,
//! which bounds memory whatever the device size, and reuse avoids the page faults of
//! fresh allocations (they cost 2-3x the read time in measurements on this hardware).

use std::ops::{Deref, DerefMut, Range};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Where free buffers wait: a list under a lock, and a condition variable a taker
/// sleeps on. (A channel would do, but its blocking receive spins and yields the CPU a
/// few times before it sleeps: hundreds of `sched_yield` calls a run.)
#[derive(Clone)]
struct Shelf(Arc<(Mutex<Spares>, Condvar, usize)>);

/// The buffers on a shelf.
type Spares = Vec<Vec<u8>>;

impl Shelf {
    /// Holds at most `cap` buffers.
    fn new(cap: usize) -> Shelf {
        Shelf(Arc::new((
            Mutex::new(Vec::with_capacity(cap)),
            Condvar::new(),
            cap,
        )))
    }

    /// Puts `v` back (dropped when the shelf is full), waking one taker.
    fn put(&self, v: Vec<u8>) {
        let (list, ready, cap) = &*self.0;
        let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() < *cap {
            list.push(v);
            ready.notify_one();
        }
    }

    /// A buffer if one is there.
    fn try_take(&self) -> Option<Vec<u8>> {
        let mut list = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        list.pop()
    }

    /// A buffer, waiting up to `wait` for one (asleep, not spinning).
    fn take_within(&self, wait: Duration) -> Option<Vec<u8>> {
        let (list, ready, _) = &*self.0;
        let list = list.lock().unwrap_or_else(|e| e.into_inner());
        let (mut list, _) = ready
            .wait_timeout_while(list, wait, |l| l.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        list.pop()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.0.lock().unwrap().len()
    }
}

/// A pool of `count` buffers of `size` bytes.
#[derive(Clone)]
pub struct Pool {
    shelf: Shelf,
}

impl Pool {
    /// Makes `count` buffers of `size` bytes each, allocated lazily on first use; each
    /// hands out a page-aligned start (room for the alignment is reserved up front, so
    /// it never moves): the kernel copies to and from an aligned buffer several times
    /// faster, and large blocks in one can be written with O_DIRECT.
    pub fn new(count: usize, size: usize) -> Self {
        let shelf = Shelf::new(count);
        for _ in 0..count {
            shelf.put(Vec::with_capacity(size + PAGE));
        }
        Pool { shelf }
    }

    /// Takes a buffer, waiting until one is free; `len` bytes long (contents unspecified).
    #[cfg(test)]
    pub fn get(&self, len: usize) -> Buf {
        let v = loop {
            if let Some(v) = self.shelf.take_within(Duration::from_secs(1)) {
                break v;
            }
        };
        self.wrap(v, len)
    }

    /// Like [`Pool::get`], but gives up (`None`) once `stop` is set: buffers held by
    /// messages nobody will read again would otherwise keep a reader waiting forever.
    pub fn get_unless(&self, len: usize, stop: &std::sync::atomic::AtomicBool) -> Option<Buf> {
        use std::sync::atomic::Ordering;
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            if let Some(v) = self.shelf.take_within(Duration::from_millis(20)) {
                return Some(self.wrap(v, len));
            }
        }
    }

    fn wrap(&self, mut v: Vec<u8>, len: usize) -> Buf {
        if v.len() < len + PAGE {
            v.resize(len + PAGE, 0);
        }
        let at = v.as_ptr().align_offset(PAGE);
        Buf {
            data: v,
            at,
            len,
            home: Some(self.shelf.clone()),
        }
    }
}

/// Spare buffers for data received off the wire: a frame's buffer becomes the block
/// handed to the writer and comes back here once written, so receiving never touches
/// fresh memory (page faults cost more than the copy they save).
pub struct Recycler {
    shelf: Shelf,
}

impl Recycler {
    /// Keeps up to `count` spare buffers.
    pub fn new(count: usize) -> Self {
        Recycler {
            shelf: Shelf::new(count),
        }
    }

    /// A spare buffer, or a new empty one.
    pub fn spare(&self) -> Vec<u8> {
        self.shelf.try_take().unwrap_or_default()
    }

    /// A spare buffer with room for `n` bytes starting at an `align`-aligned address,
    /// and where that start is. It is sized exactly, so it never grows past the largest
    /// `n + align` asked for.
    pub fn aligned(&self, n: usize, align: usize) -> (Vec<u8>, usize) {
        let mut v = self.spare();
        if v.len() < n + align {
            v.reserve_exact(n + align - v.len());
            v.resize(n + align, 0);
        }
        let at = v.as_ptr().align_offset(align);
        (v, at)
    }
}

/// A buffer that goes back to its pool when dropped.
pub struct Buf {
    /// The whole allocation; the buffer is `data[at..at + len]`.
    data: Vec<u8>,
    at: usize,
    len: usize,
    home: Option<Shelf>,
}

impl Buf {
    /// Shortens it to `len` bytes (a chunk shorter than the buffer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A buffer that belongs to no pool.
    pub fn detached(data: Vec<u8>) -> Self {
        let len = data.len();
        Buf {
            data,
            at: 0,
            len,
            home: None,
        }
    }

    /// A buffer that goes back to `recycler` when dropped.
    pub fn recycled(data: Vec<u8>, recycler: &Recycler) -> Self {
        let len = data.len();
        Buf {
            data,
            at: 0,
            len,
            home: Some(recycler.shelf.clone()),
        }
    }
}

/// What buffers are aligned to.
const PAGE: usize = 4096;

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[self.at..self.at + self.len]
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.at..self.at + self.len]
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            // The pool may be gone at shutdown; then the buffer is simply freed.
            home.put(std::mem::take(&mut self.data));
        }
    }
}

/// A range of a shared buffer: lets several writes point into one read chunk without copying.
#[derive(Clone)]
pub struct Slice {
    buf: Arc<Buf>,
    range: Range<usize>,
}

impl Slice {
    /// The bytes `range` of `buf`.
    pub fn new(buf: Arc<Buf>, range: Range<usize>) -> Self {
        assert!(range.end <= buf.len(), "slice out of its buffer");
        Slice { buf, range }
    }

    /// The part `range` of this slice (relative to it).
    pub fn sub(&self, range: Range<usize>) -> Slice {
        assert!(range.end <= self.len(), "sub-slice out of its slice");
        Slice {
            buf: self.buf.clone(),
            range: self.range.start + range.start..self.range.start + range.end,
        }
    }

    /// A slice owning `data` outright.
    pub fn owned(data: Vec<u8>) -> Self {
        let len = data.len();
        Slice {
            buf: Arc::new(Buf::detached(data)),
            range: 0..len,
        }
    }
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slice({} bytes)", self.len())
    }
}

impl PartialEq for Slice {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Slice {}

impl Deref for Slice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_on_drop() {
        let pool = Pool::new(2, 16);
        let a = pool.get(16);
        let b = pool.get(8);
        assert_eq!(b.len(), 8);
        assert_eq!(pool.shelf.len(), 0, "pool should be empty");
        drop(a);
        let c = pool.get(4);
        assert_eq!(c.len(), 4);
        drop((b, c));
        assert_eq!(pool.shelf.len(), 2);
    }

    #[test]
    fn buffers_are_page_aligned_every_time() {
        let pool = Pool::new(2, 1 << 20);
        for len in [1 << 20, 4096, 1 << 20, 100] {
            let mut b = pool.get(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr().addr() % PAGE, 0, "{len}");
            b.truncate(len / 2);
            assert_eq!((b.len(), b.as_ptr().addr() % PAGE), (len / 2, 0));
        }
    }

    #[test]
    fn slices_share_a_buffer() {
        let pool = Pool::new(1, 8);
        let mut b = pool.get(8);
        b.copy_from_slice(b"abcdefgh");
        let shared = Arc::new(b);
        let s1 = Slice::new(shared.clone(), 0..3);
        let s2 = Slice::new(shared, 5..8);
        assert_eq!(&*s1, b"abc");
        assert_eq!(&*s2, b"fgh");
        drop(s1);
        assert_eq!(pool.shelf.len(), 0);
        drop(s2);
        assert_eq!(pool.shelf.len(), 1);
        assert_eq!(&*Slice::owned(b"xy".to_vec()), b"xy");
    }
}
