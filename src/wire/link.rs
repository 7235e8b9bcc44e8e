//! Carries the engine's in-process messages over a byte stream as protocol frames, one
//! thread per direction, so both directions flow at once and neither half ever waits for
//! a round trip. Counts the bytes each way.

use crate::engine::messages::{ToDest, ToSource};
use crate::engine::{Layout, Stats};
use crate::error::{Error, Kind, Result};
use crate::io::pool::Recycler;
use crate::wire::data::Data;
use crate::wire::frame::{Frame, ReadError, read_frame, read_frame_with, write_frame};
use crate::wire::packer::{Counted, Packer, WriteLog};
use crossbeam_channel::{Receiver, Sender};
use std::io::{BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How far (in bytes of reports) the source side's receiving thread reads ahead.
pub(crate) const LOOKAHEAD_BYTES: usize = 32 << 20;

/// Write buffer per stream: big enough to batch small frames into few syscalls.
const WRITE_BUFFER: usize = 256 << 10;

/// Most questions (Refine, Check) a peer may have open on the destination side: asked,
/// and the answer not sent yet. A blocksync source keeps at most 1024 refinements open
/// (`MAX_PENDING` in engine/source.rs), and its few spot-checks before any; a peer past
/// twice that is not reading its answers, which would pile up here without end (the
/// answers channel never blocks the writer, so nothing else holds the questions back).
pub const MAX_OPEN_QUESTIONS: usize = 2048;

/// Questions the peer asked that this side has not answered yet: counted up by the
/// receiving thread, down by the sending one.
#[derive(Debug, Default)]
pub struct Questions(AtomicUsize);

impl Questions {
    /// One more asked; how many are open now.
    fn asked(&self) -> usize {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// One answered (sent).
    fn answered(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// Describes the peer in error messages, e.g. `backup (remote destination)`.
#[derive(Debug, Clone)]
pub struct Peer(pub String);

fn lost(peer: &Peer, err: &ReadError) -> Error {
    match err {
        ReadError::Decode(d) => Error::new(
            Kind::Protocol,
            format!(
                "{} sent a malformed frame ({d}); is it the same blocksync version?",
                peer.0
            ),
        ),
        ReadError::Closed => Error::new(
            Kind::Remote,
            format!("lost the connection to {} (it closed the stream)", peer.0),
        ),
        ReadError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => stalled(peer, e),
        ReadError::Io(e) => Error::new(
            Kind::Remote,
            format!(
                "lost the connection to {}: {}",
                peer.0,
                crate::error::os_text(e)
            ),
        ),
    }
}

/// The peer said nothing and took nothing for `--timeout` (see `ssh::watch`).
fn stalled(peer: &Peer, e: &std::io::Error) -> Error {
    Error::new(
        Kind::Remote,
        format!("{} stalled: {}", peer.0, crate::error::os_text(e)),
    )
}

/// A pump that has had nothing to send for this long sends [`Frame::Alive`].
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether idle pumps send [`Frame::Alive`]: in server mode, whose client watches the
/// link (`--timeout`); not in the client, whose own heartbeats would sit in the pipe to
/// a stopped peer and pass for progress.
static HEARTBEATS: AtomicBool = AtomicBool::new(false);

/// Turns heartbeats on for this process (server mode).
pub fn send_heartbeats() {
    HEARTBEATS.store(true, Ordering::Relaxed);
}

/// What a peer says, made harmless before it joins one of our messages.
fn told(peer: &Peer, message: &str) -> String {
    format!("{}: {}", peer.0, crate::error::harmless(message))
}

/// The exit-code kind of a failure reported by the remote side: I/O failures there exit
/// with [`Kind::Remote`], so the code tells which machine failed; refusals keep their kind.
fn remote_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Io | Kind::Internal => Kind::Remote,
        k => k,
    }
}

fn write_failed(peer: &Peer, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::TimedOut {
        return stalled(peer, &e);
    }
    Error::new(
        Kind::Remote,
        format!("sending to {}: {}", peer.0, crate::error::os_text(&e)),
    )
}

/// Source side, outgoing: encodes [`ToDest`] messages, compressing written blocks at
/// `level` (0 = off), until the source half's Finish or Abort.
pub fn send_to_dest(
    rx: Receiver<ToDest>,
    w: impl Write + AsFd,
    pace: super::session::Pace,
    stats: &Stats,
    peer: &Peer,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    let bwlimit = pace.bwlimit;
    let mut packer = Packer::new(pace.level, bwlimit, pace.fixed);
    // Asks the pipe to ssh how much it holds (FIONREAD works on a pipe's writing end).
    let pipe = w.as_fd().try_clone_to_owned().ok();
    let queued = || {
        let p = pipe.as_ref()?;
        rustix::io::ioctl_fionread(p).ok().map(|n| n as usize)
    };
    let log = WriteLog::default();
    let w = Counted {
        inner: w,
        log: log.clone(),
    };
    pump(rx, None, w, stats, peer, |msg| {
        if bwlimit > 0 {
            // Sleep until the bytes sent so far fit the rate (like rsync --bwlimit).
            let due = std::time::Duration::from_secs_f64(sent as f64 / bwlimit as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if let ToDest::Write { data, .. } = &msg {
            Stats::take(&stats.in_flight, data.len() as u64);
        }
        // A written block is packed for the link; everything else crosses as it is.
        let packed = msg.try_map(|data| -> Result<Data> {
            let q = queued();
            packer.wrote(log.take(), q);
            Ok(packer.pack(&data, q))
        })?;
        // --bwlimit counts the bytes as they go on the wire, compressed.
        if let ToDest::Write { data, .. } = &packed {
            sent += data.bytes().len() as u64;
        }
        Ok(Frame::Dest(packed))
    })
}

/// Counts a frame of `n` bytes on the wire, and separately block data and digests.
fn count(stats: &Stats, frame: &Frame, n: usize, sent: bool) {
    let n = n as u64;
    let (all, data, digests) = if sent {
        (&stats.wire_sent, &stats.data_sent, &stats.digests_sent)
    } else {
        (
            &stats.wire_received,
            &stats.data_received,
            &stats.digests_received,
        )
    };
    Stats::add(all, n);
    match frame {
        Frame::Dest(ToDest::Write { .. }) => Stats::add(data, n),
        Frame::Source(ToSource::Digests { .. })
        | Frame::Source(ToSource::Pieces { .. })
        | Frame::Source(ToSource::Verify { .. }) => Stats::add(digests, n),
        _ => {}
    }
}

/// Destination side, outgoing: encodes [`ToSource`] messages (chunk reports from `rx`,
/// answers and failures from `answers` first, then done or failed).
/// Answers sent count down `open`.
pub fn send_to_source(
    rx: Receiver<ToSource>,
    answers: Receiver<ToSource>,
    w: impl Write,
    stats: &Stats,
    peer: &Peer,
    open: &Questions,
) -> Result<()> {
    pump(rx, Some(answers), w, stats, peer, |msg| {
        if matches!(msg, ToSource::Pieces { .. }) {
            open.answered();
        }
        let sendable = msg.try_map(|_| {
            Err(Error::new(
                Kind::Internal,
                "raw destination bytes cannot cross machines",
            ))
        })?;
        Ok(Frame::Source(sendable))
    })
}

/// Moves messages from `rx` (and, first, from `extra`) to `w` as frames until a final
/// frame or `rx` closes. Flushes whenever no message is waiting, so nothing sits in the
/// buffer while the peer waits for it, yet bursts of small frames go out in few writes.
fn pump<M>(
    rx: Receiver<M>,
    mut extra: Option<Receiver<M>>,
    w: impl Write,
    stats: &Stats,
    peer: &Peer,
    mut encode: impl FnMut(M) -> Result<Frame>,
) -> Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, w);
    let flush = |w: &mut BufWriter<_>| w.flush().map_err(|e| write_failed(peer, e));
    let beat = HEARTBEATS.load(Ordering::Relaxed);
    let idle = if beat {
        HEARTBEAT
    } else {
        std::time::Duration::from_secs(3600)
    };
    loop {
        let ready = extra
            .as_ref()
            .and_then(|x| x.try_recv().ok())
            .or_else(|| rx.try_recv().ok());
        let msg = match ready {
            Some(m) => m,
            None => {
                flush(&mut w)?;
                let next = match &extra {
                    Some(x) => crossbeam_channel::select! {
                        recv(x) -> m => match m {
                            Ok(m) => Some(m),
                            Err(_) => {
                                extra = None;
                                continue;
                            }
                        },
                        recv(rx) -> m => match m {
                            Ok(m) => Some(m),
                            // Closed: whatever `extra` still holds (a failure) goes last.
                            Err(_) => match x.try_recv() {
                                Ok(m) => Some(m),
                                Err(_) => return Ok(()),
                            },
                        },
                        default(idle) => None,
                    },
                    None => match rx.recv_timeout(idle) {
                        Ok(m) => Some(m),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                        Err(_) => return Ok(()),
                    },
                };
                match next {
                    Some(m) => m,
                    None if !beat => continue,
                    None => {
                        // Nothing to say for a while: say that we are still here.
                        let n = write_frame(&mut w, &Frame::Alive)
                            .map_err(|e| write_failed(peer, e))?;
                        count(stats, &Frame::Alive, n, true);
                        continue;
                    }
                }
            }
        };
        let frame = encode(msg)?;
        let last = matches!(
            frame,
            Frame::Dest(ToDest::Finish { .. })
                | Frame::Dest(ToDest::Abort { .. })
                | Frame::Source(ToSource::Done { .. })
                | Frame::Source(ToSource::Failed { .. })
        );
        let n = write_frame(&mut w, &frame).map_err(|e| write_failed(peer, e))?;
        count(stats, &frame, n, true);
        if last {
            return flush(&mut w);
        }
    }
}

/// Source side, incoming: decodes digests and the final answer for the source half.
/// A broken stream becomes a [`ToSource::Failed`] so the source half stops with the cause.
pub fn recv_from_dest(mut r: impl Read, tx: Sender<ToSource>, stats: &Stats, peer: &Peer) {
    let mut buf = Vec::new();
    loop {
        let msg = match read_frame(&mut r, &mut buf) {
            Ok((frame, n)) => {
                count(stats, &frame, n, false);
                match frame {
                    Frame::Source(ToSource::Done {
                        written,
                        read,
                        journaled,
                    }) => {
                        // The remote half's counters join ours for the summary.
                        Stats::add(&stats.dest_read, read);
                        Stats::add(&stats.written, written);
                        Stats::add(&stats.journaled, journaled);
                        ToSource::Done {
                            written,
                            read,
                            journaled,
                        }
                    }
                    Frame::Source(ToSource::Tally { written, read }) => {
                        // The same, from a remote half that stopped early; its failure
                        // follows. Only the counters need it: nothing to pass on.
                        Stats::add(&stats.dest_read, read);
                        Stats::add(&stats.written, written);
                        continue;
                    }
                    Frame::Source(ToSource::Failed { kind, message }) => ToSource::Failed {
                        kind: remote_kind(kind),
                        message: told(peer, &message),
                    },
                    Frame::Alive => continue,
                    // Chunk reports and answers, for the source half.
                    Frame::Source(report) => report.received(),
                    other => ToSource::Failed {
                        kind: Kind::Protocol,
                        message: format!("{} sent an unexpected {other:?}", peer.0),
                    },
                }
            }
            Err(e) => {
                let e = lost(peer, &e);
                ToSource::Failed {
                    kind: e.kind,
                    message: e.message,
                }
            }
        };
        let end = !matches!(
            msg,
            ToSource::Digests { .. } | ToSource::Pieces { .. } | ToSource::Verify { .. }
        );
        if let ToSource::Failed { kind, message } = &msg {
            // Told at once, ahead of the reports still queued for the source half.
            *stats.peer_failed.lock().expect("not poisoned") = Some((*kind, message.clone()));
        }
        if tx.send(msg).is_err() || end {
            return;
        }
    }
}

/// A range the peer names must lie inside this stream's; else a protocol error: the peer,
/// then `what` it did.
fn inside(
    layout: &Layout,
    offset: u64,
    len: u64,
    peer: &Peer,
    what: impl FnOnce() -> String,
) -> Result<()> {
    if offset < layout.start || offset.saturating_add(len) > layout.end {
        return Err(Error::new(Kind::Protocol, format!("{} {}", peer.0, what())));
    }
    Ok(())
}

/// Checks that what the remote source half sends stays inside this stream's range.
fn within(msg: &ToDest, layout: &Layout, peer: &Peer) -> Result<()> {
    let range = |offset: u64| {
        format!(
            "at byte {offset}, outside the range {}..{}",
            layout.start, layout.end
        )
    };
    match msg {
        // (An end past u64::MAX saturates, so it is outside too.)
        ToDest::Write { offset, data } => inside(layout, *offset, data.len() as u64, peer, || {
            format!("sent a block {}", range(*offset))
        }),
        ToDest::Zero { offset, len } => inside(layout, *offset, *len, peer, || {
            format!("sent a zero range {}", range(*offset))
        }),
        ToDest::Refine { offset, len } => inside(layout, *offset, *len, peer, || {
            "asked about a block outside its range".into()
        }),
        ToDest::Check { offset, len } => inside(layout, *offset, *len, peer, || {
            "asked to check a block outside its range".into()
        }),
        ToDest::Finding { offset, len, .. } => inside(layout, *offset, *len, peer, || {
            "reported a range outside its own".into()
        }),
        ToDest::Finish { .. } | ToDest::Abort { .. } => Ok(()),
    }
}

/// The remote source half's counters, from its Finish, join this side's for the summary.
fn add_counts(stats: &Stats, counts: &crate::engine::messages::Counts) {
    Stats::add(&stats.source_read, counts.read);
    Stats::add(&stats.blocks_same, counts.same);
    Stats::add(&stats.blocks_changed, counts.changed);
    Stats::add(&stats.changed_bytes, counts.changed_bytes);
    Stats::add(&stats.blocks_zero, counts.zero);
    Stats::add(&stats.blocks_hole, counts.holes);
    Stats::add(&stats.blocks_zeroed, counts.zeroed);
}

/// Destination side, incoming: decodes writes for the destination half, checking each
/// lies inside this stream's range. Returns `Ok` after the source's Finish; the source's
/// Abort reason or a broken stream is the error. Either way the sender is dropped, which
/// tells the destination half to flush and stop. Every question counts as open: nothing
/// answers them here (the destination side's run uses [`recv_questions_from_source`]).
pub fn recv_from_source(
    r: impl Read,
    tx: Sender<ToDest>,
    layout: Layout,
    stats: &Stats,
    peer: &Peer,
) -> Result<()> {
    recv_questions_from_source(r, tx, layout, stats, peer, &Questions::default())
}

/// [`recv_from_source`], counting each question in `open`; more than
/// [`MAX_OPEN_QUESTIONS`] unanswered is a protocol error.
pub fn recv_questions_from_source(
    mut r: impl Read,
    tx: Sender<ToDest>,
    layout: Layout,
    stats: &Stats,
    peer: &Peer,
    open: &Questions,
) -> Result<()> {
    let mut buf = Vec::new();
    let recycler = Recycler::new(8);
    loop {
        let (frame, n) =
            read_frame_with(&mut r, &mut buf, Some(&recycler)).map_err(|e| lost(peer, &e))?;
        count(stats, &frame, n, false);
        if matches!(
            frame,
            Frame::Dest(ToDest::Refine { .. }) | Frame::Dest(ToDest::Check { .. })
        ) && open.asked() > MAX_OPEN_QUESTIONS
        {
            return Err(Error::new(
                Kind::Protocol,
                format!(
                    "{} asked more than {MAX_OPEN_QUESTIONS} questions without reading the answers",
                    peer.0
                ),
            ));
        }
        let msg = match frame {
            Frame::Dest(ToDest::Finish { size, counts }) => {
                add_counts(stats, &counts);
                if size != layout.size && !(layout.open_end && size <= layout.size) {
                    return Err(Error::new(
                        Kind::Protocol,
                        format!("{} finished with size {size}, not {}", peer.0, layout.size),
                    ));
                }
                let _ = tx.send(ToDest::Finish { size, counts });
                return Ok(());
            }
            Frame::Dest(ToDest::Abort { kind, message }) => {
                let _ = tx.send(ToDest::Abort {
                    kind,
                    message: message.clone(),
                });
                return Err(Error::new(remote_kind(kind), told(peer, &message)));
            }
            Frame::Alive => continue,
            Frame::Dest(m) => {
                let m = m.try_map(|data| {
                    data.unpack_with(Some(&recycler)).map_err(|d| {
                        Error::new(Kind::Protocol, format!("{} sent a bad block: {d}", peer.0))
                    })
                })?;
                within(&m, &layout, peer)?;
                m
            }
            other => {
                return Err(Error::new(
                    Kind::Protocol,
                    format!("{} sent an unexpected {other:?}", peer.0),
                ));
            }
        };
        if tx.send(msg).is_err() {
            // The destination half failed (and says why on its own). Keep reading so the
            // source is never stuck sending to us before it hears of the failure.
            loop {
                match read_frame(&mut r, &mut buf) {
                    Ok((
                        Frame::Dest(ToDest::Finish { .. }) | Frame::Dest(ToDest::Abort { .. }),
                        _,
                    ))
                    | Err(_) => break,
                    Ok(_) => {}
                }
            }
            return Err(Error::new(Kind::Internal, "destination half stopped early"));
        }
    }
}
