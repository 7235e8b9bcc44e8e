//! `--timeout`: a link on which nothing moves either way for that long, while this side
//! waits to read or write, ends with an error instead of waiting forever (a peer that is
//! stopped, or alive but stuck, which ssh's keepalives cannot see). A live peer is never
//! silent that long: its pumps send a heartbeat whenever they have been idle for a while
//! (`wire::link`), so only a peer that does nothing at all trips it.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When bytes last moved on a link, shared by its reading and writing ends.
#[derive(Debug)]
pub struct Clock {
    started: Instant,
    /// Milliseconds after `started` of the last progress.
    last: AtomicU64,
    limit: Duration,
}

impl Clock {
    /// A clock that trips after `limit` without progress, starting now.
    pub fn new(limit: Duration) -> Arc<Clock> {
        Arc::new(Clock {
            started: Instant::now(),
            last: AtomicU64::new(0),
            limit,
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn progress(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Waits until `fd` is ready for `events`; an error once nothing has moved for the
    /// limit. Only called after the operation found nothing to do, so however long this
    /// side itself was away, a peer that left something for it is never called stalled.
    fn wait(&self, fd: BorrowedFd, events: rustix::event::PollFlags) -> io::Result<()> {
        use rustix::event::{PollFd, Timespec, poll};
        loop {
            let now = self.now_ms();
            let idle = Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)));
            let left = match self.limit.checked_sub(idle) {
                Some(d) if !d.is_zero() => d.min(Duration::from_secs(1)),
                _ => return Err(self.stalled()),
            };
            let mut fds = [PollFd::new(&fd, events)];
            let timeout = Timespec::try_from(left).unwrap_or(Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            });
            match poll(&mut fds, Some(&timeout)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs `op` on a non-blocking fd until it does something, waiting for `events`
    /// in between; counts what it did as progress.
    fn drive(
        &self,
        fd: BorrowedFd,
        events: rustix::event::PollFlags,
        mut op: impl FnMut() -> io::Result<usize>,
    ) -> io::Result<usize> {
        loop {
            match op() {
                Ok(n) => {
                    if n > 0 {
                        self.progress();
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(fd, events)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn stalled(&self) -> io::Error {
        let secs = self.limit.as_secs();
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("nothing moved for {secs} s (--timeout {secs}; 0 waits forever)"),
        )
    }
}

/// One end of a link (a pipe to ssh), watched by a [`Clock`] when there is one.
#[derive(Debug)]
pub struct Watched<T> {
    inner: T,
    clock: Option<Arc<Clock>>,
    /// `inner`'s fd, to poll while `inner` is borrowed for the operation.
    fd: RawFd,
}

impl<T: AsFd> Watched<T> {
    /// `inner`, watched by `clock` (`None`: waits forever). A watched fd is made
    /// non-blocking (only this end of the pipe: the peer's is its own), since a blocking
    /// write of a large buffer waits until all of it fits, whatever poll said.
    pub fn new(inner: T, clock: Option<Arc<Clock>>) -> Self {
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        let clock = clock.filter(|_| {
            fcntl_getfl(&inner).is_ok_and(|f| fcntl_setfl(&inner, f | OFlags::NONBLOCK).is_ok())
        });
        let fd = inner.as_fd().as_raw_fd();
        Watched { inner, clock, fd }
    }
}

impl<T> Watched<T> {
    fn fd(&self) -> BorrowedFd<'static> {
        // SAFETY: `inner` owns the fd and lives as long as `self`; the borrow is used
        // only for one poll inside a method of `self`.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

impl<T: Read + AsFd> Read for Watched<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(clock) = &self.clock else {
            return self.inner.read(buf);
        };
        let fd = self.fd();
        clock.drive(fd, rustix::event::PollFlags::IN, || self.inner.read(buf))
    }
}

impl<T: Write + AsFd> Write for Watched<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(clock) = &self.clock else {
            return self.inner.write(buf);
        };
        let fd = self.fd();
        clock.drive(fd, rustix::event::PollFlags::OUT, || self.inner.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: AsFd> AsFd for Watched<T> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_pipe_trips_the_clock_and_a_busy_one_does_not() {
        let (r, w) = rustix::pipe::pipe().unwrap();
        let clock = Clock::new(Duration::from_millis(300));
        let mut reader = Watched::new(std::fs::File::from(r), Some(clock.clone()));
        let mut writer = std::fs::File::from(w);
        writer.write_all(b"ab").unwrap();
        let mut buf = [0u8; 2];
        // Ready at once: fine however long ago the last progress was.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(reader.read(&mut buf).unwrap(), 2);
        let started = Instant::now();
        let e = reader.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(e.to_string().contains("--timeout"), "{e}");
    }
}
