//! The halves run over a link: the source or destination half on the calling thread,
//! the link's pumps ([`crate::wire::link`]) one thread per direction, and with `--verify`
//! the verify pass over the same stream.

use crate::engine::messages::ToSource;
use crate::engine::{self, Config, REPORTS_IN_FLIGHT, Stats};
use crate::error::{Error, Kind, Result};
use crate::io::target::Target;
use crate::wire::link::{
    LOOKAHEAD_BYTES, Peer, Questions, recv_from_dest, recv_questions_from_source, send_to_dest,
    send_to_source,
};
use crossbeam_channel::bounded;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// One end of a link: the byte stream both ways, the counters both directions add to,
/// and the peer's name for messages. The halves' runs take it instead of a long list of
/// arguments.
pub struct Link<'a, R, W> {
    /// What the peer sends.
    pub r: R,
    /// What goes to the peer.
    pub w: W,
    /// Counters for the summary.
    pub stats: &'a Stats,
    /// Names the peer in errors.
    pub peer: &'a Peer,
}

/// How the source side sends written blocks: zstd level (0 = off) and `--bwlimit` in
/// bytes per second (0 = none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Pace {
    /// zstd level; 0 = off.
    pub level: i32,
    /// Bytes per second on the wire (compressed as they go); 0 = unlimited.
    pub bwlimit: u64,
    /// The level was asked for: every block is compressed at it (see `Packer`).
    pub fixed: bool,
}

impl<R: Read + Send, W: Write + AsFd + Send> Link<'_, R, W> {
    /// Runs the source half with its messages carried over the link: the half on this
    /// thread, one thread per direction; then, with `--verify`, the verify pass over the
    /// same stream. `after` runs once the last pass's half and sending side are done,
    /// before its receiving thread is joined (a client reaps ssh there, so a stuck peer
    /// cannot keep that thread waiting).
    pub fn source_over(
        mut self,
        src: &Target,
        config: &Config,
        pace: Pace,
        cancel: &AtomicBool,
        after: impl FnOnce(),
    ) -> Result<()> {
        with_verify(config, after, |cfg, after, last| {
            // The verify pass sends no blocks: nothing to compress or to pace.
            let pace = if cfg.verify_pass {
                Pace::default()
            } else {
                pace
            };
            self.source_pass(src, cfg, pace, cancel, after, last)
        })
    }

    /// One pass of [`Link::source_over`]; calls `after` when it is the last pass or fails.
    fn source_pass(
        &mut self,
        src: &Target,
        config: &Config,
        pace: Pace,
        cancel: &AtomicBool,
        after: &mut Option<impl FnOnce()>,
        last: bool,
    ) -> Result<()> {
        let (r, w, stats, peer) = (&mut self.r, &mut self.w, self.stats, self.peer);
        let (to_dest, from_source) = bounded(config.buffers); // blocks in flight: bounds memory
        let (to_source, from_dest) = bounded(REPORTS_IN_FLIGHT);
        // The receiving thread reads well ahead of the source half (a few MiB of reports),
        // so a failure the peer sends behind queued reports is seen at once.
        let per_report = (config.layout.chunk / config.layout.block) as usize * 17 + 32;
        let (ahead_tx, ahead_rx) = bounded((LOOKAHEAD_BYTES / per_report).clamp(64, 16 << 10));
        std::thread::scope(|s| {
            s.spawn(move || recv_from_dest(r, ahead_tx, stats, peer));
            s.spawn(move || {
                for m in ahead_rx {
                    if to_source.send(m).is_err() {
                        return;
                    }
                }
            });
            let sender = s.spawn(move || send_to_dest(from_source, w, pace, stats, peer));
            let result = engine::source::run(src, config, to_dest, from_dest, stats, cancel);
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(Error::new(Kind::Internal, "sending thread panicked")));
            let result = result.and(sent);
            if (last || result.is_err())
                && let Some(f) = after.take()
            {
                f();
            }
            result
        })
    }
}

impl<R: Read + Send, W: Write + Send> Link<'_, R, W> {
    /// Runs the destination half with its messages carried over the link, like
    /// [`Link::source_over`] (the verify pass included). With `cancel` (a client), Ctrl-C
    /// tells the remote source, which aborts, so this side flushes and stops.
    pub fn dest_over(
        mut self,
        dest: Option<&Target>,
        config: &Config,
        cancel: Option<&AtomicBool>,
        after: impl FnOnce(),
    ) -> Result<()> {
        with_verify(config, after, |cfg, after, last| {
            self.dest_pass(dest, cfg, cancel, after, last)
        })
    }

    /// One pass of [`Link::dest_over`]; calls `after` when it is the last pass or fails.
    fn dest_pass(
        &mut self,
        dest: Option<&Target>,
        config: &Config,
        cancel: Option<&AtomicBool>,
        after: &mut Option<impl FnOnce()>,
        last: bool,
    ) -> Result<()> {
        let (r, w, stats, peer) = (&mut self.r, &mut self.w, self.stats, self.peer);
        let (to_dest, from_source) = bounded(config.buffers); // blocks in flight: bounds memory
        let (to_source, from_dest) = bounded(REPORTS_IN_FLIGHT);
        let (answers, answers_rx) = crossbeam_channel::unbounded();
        let finished = AtomicBool::new(false);
        let layout = config.layout;
        // Bounds the answers queued for a peer that asks but does not read.
        let open = &Questions::default();
        std::thread::scope(|s| {
            let receiver =
                s.spawn(move || recv_questions_from_source(r, to_dest, layout, stats, peer, open));
            if let Some(cancel) = cancel {
                let (finished, tx) = (&finished, answers.clone());
                s.spawn(move || {
                    while !finished.load(Ordering::Relaxed) {
                        if cancel.load(Ordering::Relaxed) {
                            let _ = tx.send(ToSource::Failed {
                                kind: Kind::Interrupted,
                                message: "interrupted on the destination side".into(),
                            });
                            return;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                });
            }
            let sender =
                s.spawn(move || send_to_source(from_dest, answers_rx, w, stats, peer, open));
            // Set however the destination half ends, a panic included: the watcher
            // above must not outlive it (the scope would wait for it forever).
            let done = Finished(&finished);
            let written = engine::dest::run(dest, config, from_source, to_source, answers, stats);
            drop(done);
            // Done (or Failed) reaches the peer only through the sender: its failure is
            // this side's, or a run the peer never heard confirmed would pass.
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(Error::new(Kind::Internal, "sending thread panicked")));
            if (last || written.is_err())
                && let Some(f) = after.take()
            {
                f();
            }
            let received = receiver
                .join()
                .unwrap_or_else(|_| Err(Error::new(Kind::Internal, "receiving thread panicked")));
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return written.and(Err(Error::new(Kind::Interrupted, "interrupted")));
            }
            // The peer's own account (an Abort's reason, a lost stream) before ours of
            // failing to send to it, which usually follows from it.
            written.and(received).and(sent)
        })
    }
}

/// Sets its flag when dropped.
struct Finished<'a>(&'a AtomicBool);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `pass` for the sync and, with `--verify`, once more for the verify pass over the
/// same stream. `after` runs once: inside the last pass (or the first that fails), where
/// the pass calls it, or here if no pass did.
fn with_verify<A: FnOnce()>(
    config: &Config,
    after: A,
    mut pass: impl FnMut(&Config, &mut Option<A>, bool) -> Result<()>,
) -> Result<()> {
    let mut after = Some(after);
    let verify = config.verify_follows().then(|| config.for_verify());
    let synced = pass(config, &mut after, verify.is_none());
    let result = match (synced, verify) {
        (Ok(()), Some(v)) => pass(&v, &mut after, true),
        (result, _) => result,
    };
    if let Some(f) = after.take() {
        f();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::messages::{Counts, ToDest};
    use crate::engine::{Compare, Layout};
    use crate::wire::frame::{Frame, write_frame};

    /// A peer that only says Finish, for an empty range in a dry run: the destination
    /// half's only message back is Done.
    fn finish_only() -> Vec<u8> {
        let mut input = Vec::new();
        let finish = Frame::Dest(ToDest::Finish {
            size: 0,
            counts: Counts::default(),
        });
        write_frame(&mut input, &finish).unwrap();
        input
    }

    fn dest_config() -> Config {
        let mut config = Config::build(Layout::new(0, 4096), &Default::default());
        config.compare = Compare::Digest(crate::hash::HashKind::Blake3);
        config.dry_run = true;
        config
    }

    struct Failing;

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::EPIPE))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Panicking;

    impl Write for Panicking {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            panic!("a writer that panics");
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn run_dest(w: impl Write + Send) -> Result<()> {
        let (stats, peer) = (Stats::default(), Peer("the test".into()));
        let input = finish_only();
        let link = Link {
            r: &input[..],
            w,
            stats: &stats,
            peer: &peer,
        };
        link.dest_over(None, &dest_config(), None, || {})
    }

    /// The run itself succeeds; only confirming it to the peer fails. That must not pass
    /// for a confirmed sync (the peer never heard Done).
    #[test]
    fn a_destination_that_cannot_send_its_answer_fails() {
        assert!(run_dest(Vec::new()).is_ok(), "the conversation is valid");
        let e = run_dest(Failing).expect_err("Done was never sent");
        assert_eq!(e.kind, Kind::Remote, "{e}");
        assert!(e.message.contains("sending to the test"), "{e}");
        let e = run_dest(Panicking).expect_err("the sending thread panicked");
        assert_eq!(e.kind, Kind::Internal, "{e}");
    }
}
