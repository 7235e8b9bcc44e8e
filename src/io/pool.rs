//! A fixed set of reusable I/O buffers. Readers block when all buffers are in flight,
//! which bounds memory whatever the device size, and reuse avoids the page faults of
//! fresh allocations (they cost 2-3x the read time in measurements on this hardware).

use crossbeam_channel::{Receiver, Sender, bounded};
use std::ops::{Deref, DerefMut, Range};
use std::sync::Arc;

/// A pool of `count` buffers of `size` bytes.
#[derive(Clone)]
pub struct Pool {
    take: Receiver<Vec<u8>>,
    give: Sender<Vec<u8>>,
}

impl Pool {
    /// Makes `count` buffers of `size` bytes each, allocated lazily on first use; each
    /// hands out a page-aligned start (room for the alignment is reserved up front, so
    /// it never moves): the kernel copies to and from an aligned buffer several times
    /// faster, and large blocks in one can be written with O_DIRECT.
    pub fn new(count: usize, size: usize) -> Self {
        let (give, take) = bounded(count);
        for _ in 0..count {
            give.send(Vec::with_capacity(size + PAGE))
                .expect("pool channel has room");
        }
        Pool { take, give }
    }

    /// Takes a buffer, waiting until one is free; `len` bytes long (contents unspecified).
    #[cfg(test)]
    pub fn get(&self, len: usize) -> Buf {
        let v = self.take.recv().expect("pool holds its own sender");
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
            match self.take.recv_timeout(std::time::Duration::from_millis(20)) {
                Ok(v) => return Some(self.wrap(v, len)),
                Err(_) => continue,
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
            home: Some(self.give.clone()),
        }
    }
}

/// Spare buffers for data received off the wire: a frame's buffer becomes the block
/// handed to the writer and comes back here once written, so receiving never touches
/// fresh memory (page faults cost more than the copy they save).
pub struct Recycler {
    take: Receiver<Vec<u8>>,
    give: Sender<Vec<u8>>,
}

impl Recycler {
    /// Keeps up to `count` spare buffers.
    pub fn new(count: usize) -> Self {
        let (give, take) = bounded(count);
        Recycler { take, give }
    }

    /// A spare buffer, or a new empty one.
    pub fn spare(&self) -> Vec<u8> {
        self.take.try_recv().unwrap_or_default()
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
    home: Option<Sender<Vec<u8>>>,
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
            home: Some(recycler.give.clone()),
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
            let _ = home.try_send(std::mem::take(&mut self.data));
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
        assert!(pool.take.try_recv().is_err(), "pool should be empty");
        drop(a);
        let c = pool.get(4);
        assert_eq!(c.len(), 4);
        drop((b, c));
        assert_eq!(pool.take.len(), 2);
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
        assert!(pool.take.try_recv().is_err());
        drop(s2);
        assert!(pool.take.try_recv().is_ok());
        assert_eq!(&*Slice::owned(b"xy".to_vec()), b"xy");
    }
}
