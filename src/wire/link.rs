//! Carries the engine's in-process messages over a byte stream as protocol frames, one
//! thread per direction, so both directions flow at once and neither half ever waits for
//! a round trip. Counts the bytes each way.

use crate::engine::messages::{ToDest, ToSource};
use crate::engine::{self, Config, Layout, REPORTS_IN_FLIGHT, Stats};
use crate::error::{Error, Kind, Result};
use crate::io::pool::{Recycler, Slice};
use crate::io::target::Target;
use crate::wire::frame::{Data, Frame, ReadError, read_frame, read_frame_with, write_frame};
use crossbeam_channel::bounded;
use crossbeam_channel::{Receiver, Sender};
use std::io::{BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// How far (in bytes of reports) the source side's receiving thread reads ahead.
const LOOKAHEAD_BYTES: usize = 32 << 20;

/// Write buffer per stream: big enough to batch small frames into few syscalls.
const WRITE_BUFFER: usize = 256 << 10;

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

/// The exit-code kind of a failure reported by the remote side: I/O failures there exit
/// with [`Kind::Remote`], so the code tells which machine failed; refusals keep their kind.
fn remote_kind(kind: Kind) -> Kind {
    match kind {
        Kind::Io | Kind::Internal => Kind::Remote,
        k => k,
    }
}

fn write_failed(peer: &Peer, e: std::io::Error) -> Error {
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
    level: i32,
    bwlimit: u64,
    stats: &Stats,
    peer: &Peer,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    let mut packer = Packer::new(level, bwlimit);
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
            sent += data.len() as u64;
        }
        Ok(match msg {
            ToDest::Write { offset, data } => {
                let q = queued();
                packer.wrote(log.take(), q);
                Frame::Write {
                    offset,
                    data: packer.pack(&data, q),
                }
            }
            ToDest::Zero { offset, len } => Frame::Zero { offset, len },
            ToDest::Refine { offset, len } => Frame::Refine { offset, len },
            ToDest::Finding { kind, offset, len } => Frame::Finding { kind, offset, len },
            ToDest::Check { offset, len } => Frame::Check { offset, len },
            ToDest::Finish { size, counts } => Frame::Finish { size, counts },
            ToDest::Abort { kind, message } => Frame::Abort { kind, message },
        })
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
        Frame::Write { .. } => Stats::add(data, n),
        Frame::Digests { .. } | Frame::Pieces { .. } | Frame::Verify { .. } => {
            Stats::add(digests, n)
        }
        _ => {}
    }
}

/// Compression at least this fast (bytes in per second) keeps ahead of any one ssh stream,
/// so it always pays: fewer bytes to encrypt and carry.
const FAST_PACKING: f64 = 1e9;

/// The link's speed is measured over at least this many seconds of raw blocks.
const LINK_WINDOW: f64 = 0.05;

/// While slow compression is skipped, every this many blocks one is compressed anyway,
/// to measure again (the data changes along a disk).
const REMEASURE: u32 = 16;

/// Bytes passed to the writes to ssh since it was last taken.
type WriteLog = std::rc::Rc<std::cell::Cell<u64>>;

/// A writer that counts what actually went into the pipe (a buffered writer in front
/// holds some back).
struct Counted<W> {
    inner: W,
    log: WriteLog,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.log.set(self.log.get() + n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Compresses blocks when that pays, in two ways:
/// - after blocks that do not shrink (random or encrypted data) it stops trying for a
///   while: the pause doubles (up to 64 blocks) with each failure and ends at the first
///   success;
/// - compression slower than [`FAST_PACKING`] runs on this thread while ssh empties the
///   pipe, so it pays only when the link time it saves (the bytes it removes) exceeds
///   the time ssh would sit idle waiting for it. Over a slow link blocks are compressed;
///   over a fast one, data that compresses slowly or little goes as it is (like zstd
///   --adapt).
struct Packer {
    level: i32,
    skip: u32,
    backoff: u32,
    /// Bytes in per second of the last compression that shrank a block, and its ratio
    /// (bytes out / bytes in).
    pack_rate: f64,
    pack_ratio: f64,
    /// Bytes per second ssh took when writes blocked (a moving average; 0: not seen).
    link_rate: f64,
    /// `--bwlimit` (0: none).
    bwlimit: f64,
    /// Blocks sent raw in a row because compression would have kept ssh waiting.
    unmeasured: u32,
    /// When the last block was handed over, and how many bytes the pipe held then.
    last: Option<(std::time::Instant, u64)>,
    /// Whether that block went raw (by choice or because it did not shrink).
    was_raw: bool,
    /// Seconds and bytes ssh took while raw blocks kept the pipe full, not yet measured.
    drained: (f64, u64),
}

impl Packer {
    fn new(level: i32, bwlimit: u64) -> Self {
        Packer {
            level,
            skip: 0,
            backoff: 1,
            pack_rate: f64::INFINITY,
            pack_ratio: 1.0,
            link_rate: 0.0,
            bwlimit: bwlimit as f64,
            unmeasured: 0,
            last: None,
            was_raw: false,
            drained: (0.0, 0),
        }
    }

    /// Notes that `bytes` went into the pipe since the last block and `queued` wait in it
    /// now. After a block sent as it was, the pipe stayed full meanwhile, so what ssh took
    /// out of it over that time is the link's speed (after a compressed one, the pipe may
    /// have run dry while we compressed: no measure).
    fn wrote(&mut self, bytes: u64, queued: Option<usize>) {
        let now = std::time::Instant::now();
        if let (Some((at, before)), Some(q)) = (self.last.filter(|_| self.was_raw), queued) {
            let secs = now.duration_since(at).as_secs_f64();
            let taken = (before + bytes).saturating_sub(q as u64);
            // Over at least LINK_WINDOW: ssh empties the pipe in bursts.
            self.drained = (self.drained.0 + secs, self.drained.1 + taken);
            let (secs, taken) = self.drained;
            if secs >= LINK_WINDOW {
                let rate = taken as f64 / secs;
                self.link_rate = if self.link_rate > 0.0 {
                    0.5 * self.link_rate + 0.5 * rate
                } else {
                    rate
                };
                self.drained = (0.0, 0);
            }
        }
        self.last = queued.map(|q| (now, q as u64));
    }

    /// Whether compressing `len` bytes would cost the link more time than it saves: ssh
    /// idles once the `queued` bytes in the pipe are sent and the block is still being
    /// compressed, and then carries fewer bytes.
    fn would_stall(&self, len: usize, queued: Option<usize>) -> bool {
        // With --bwlimit this thread sleeps between blocks anyway: time to compress in.
        if self.bwlimit > 0.0 || self.pack_rate >= FAST_PACKING {
            return false;
        }
        let Some(q) = queued else { return false };
        if self.link_rate == 0.0 {
            return true; // one block as it is, to see how fast ssh takes it
        }
        let idle = (len as f64 / self.pack_rate - q as f64 / self.link_rate).max(0.0);
        let saved = (1.0 - self.pack_ratio) * len as f64 / self.link_rate;
        idle > saved
    }

    /// `raw`, compressed or not; `q` tells how many bytes wait in the pipe to ssh
    /// (`None`: unknown, e.g. not a pipe).
    fn pack(&mut self, raw: &Slice, q: Option<usize>) -> Data {
        self.was_raw = true;
        if self.level <= 0 {
            return Data::Raw(raw.clone());
        }
        if self.skip > 0 {
            self.skip -= 1;
            return Data::Raw(raw.clone());
        }
        if self.unmeasured < REMEASURE && self.would_stall(raw.len(), q) {
            self.unmeasured += 1;
            return Data::Raw(raw.clone());
        }
        self.unmeasured = 0;
        let started = std::time::Instant::now();
        let data = Data::pack(raw, self.level);
        let secs = started.elapsed().as_secs_f64();
        self.was_raw = matches!(data, Data::Raw(_));
        if matches!(data, Data::Raw(_)) {
            self.skip = self.backoff;
            self.backoff = (self.backoff * 2).min(64);
        } else {
            self.backoff = 1;
            self.pack_rate = raw.len() as f64 / secs.max(1e-9);
            self.pack_ratio = data.bytes().len() as f64 / raw.len() as f64;
        }
        data
    }
}

/// Destination side, outgoing: encodes [`ToSource`] messages (chunk reports from `rx`,
/// answers and failures from `answers` first, then done or failed).
pub fn send_to_source(
    rx: Receiver<ToSource>,
    answers: Receiver<ToSource>,
    w: impl Write,
    stats: &Stats,
    peer: &Peer,
) -> Result<()> {
    pump(rx, Some(answers), w, stats, peer, |msg| match msg {
        ToSource::Digests { index, blocks } => Ok(Frame::Digests { index, blocks }),
        ToSource::Verify { index, blocks } => Ok(Frame::Verify { index, blocks }),
        ToSource::Pieces { offset, pieces } => Ok(Frame::Pieces { offset, pieces }),
        ToSource::Done { written, read } => Ok(Frame::Done { written, read }),
        ToSource::Failed { kind, message } => Ok(Frame::Failed { kind, message }),
        ToSource::Bytes { .. } => Err(Error::new(
            Kind::Internal,
            "raw destination bytes cannot cross machines",
        )),
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
    loop {
        let ready = extra
            .as_ref()
            .and_then(|x| x.try_recv().ok())
            .or_else(|| rx.try_recv().ok());
        let msg = match ready {
            Some(m) => m,
            None => {
                flush(&mut w)?;
                match &extra {
                    Some(x) => crossbeam_channel::select! {
                        recv(x) -> m => match m {
                            Ok(m) => m,
                            Err(_) => {
                                extra = None;
                                continue;
                            }
                        },
                        recv(rx) -> m => match m {
                            Ok(m) => m,
                            // Closed: whatever `extra` still holds (a failure) goes last.
                            Err(_) => match x.try_recv() {
                                Ok(m) => m,
                                Err(_) => return Ok(()),
                            },
                        },
                    },
                    None => match rx.recv() {
                        Ok(m) => m,
                        Err(_) => return Ok(()),
                    },
                }
            }
        };
        let frame = encode(msg)?;
        let last = matches!(
            frame,
            Frame::Finish { .. } | Frame::Abort { .. } | Frame::Done { .. } | Frame::Failed { .. }
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
                    Frame::Digests { index, blocks } => ToSource::Digests { index, blocks },
                    Frame::Verify { index, blocks } => ToSource::Verify { index, blocks },
                    Frame::Pieces { offset, pieces } => ToSource::Pieces { offset, pieces },
                    Frame::Done { written, read } => {
                        // The remote half's counters join ours for the summary.
                        Stats::add(&stats.dest_read, read);
                        Stats::add(&stats.written, written);
                        ToSource::Done { written, read }
                    }
                    Frame::Failed { kind, message } => ToSource::Failed {
                        kind: remote_kind(kind),
                        message: format!("{}: {message}", peer.0),
                    },
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

/// Destination side, incoming: decodes writes for the destination half, checking each
/// lies inside this stream's range. Returns `Ok` after the source's Finish; the source's
/// Abort reason or a broken stream is the error. Either way the sender is dropped, which
/// tells the destination half to flush and stop.
pub fn recv_from_source(
    mut r: impl Read,
    tx: Sender<ToDest>,
    layout: Layout,
    stats: &Stats,
    peer: &Peer,
) -> Result<()> {
    let mut buf = Vec::new();
    let recycler = Recycler::new(8);
    loop {
        let (frame, n) =
            read_frame_with(&mut r, &mut buf, Some(&recycler)).map_err(|e| lost(peer, &e))?;
        count(stats, &frame, n, false);
        let msg = match frame {
            Frame::Write { offset, data } => {
                let bytes = data.unpack_with(Some(&recycler)).map_err(|d| {
                    Error::new(Kind::Protocol, format!("{} sent a bad block: {d}", peer.0))
                })?;
                let end = offset.checked_add(bytes.len() as u64);
                if offset < layout.start || end.is_none_or(|e| e > layout.end) {
                    return Err(Error::new(
                        Kind::Protocol,
                        format!(
                            "{} sent a block at byte {offset}, outside the range {}..{}",
                            peer.0, layout.start, layout.end
                        ),
                    ));
                }
                ToDest::Write {
                    offset,
                    data: bytes,
                }
            }
            Frame::Zero { offset, len } => {
                if offset < layout.start || offset.saturating_add(len) > layout.end {
                    return Err(Error::new(
                        Kind::Protocol,
                        format!(
                            "{} sent a zero range at byte {offset}, outside the range {}..{}",
                            peer.0, layout.start, layout.end
                        ),
                    ));
                }
                ToDest::Zero { offset, len }
            }
            Frame::Refine { offset, len } => {
                if offset < layout.start || offset.saturating_add(len) > layout.end {
                    return Err(Error::new(
                        Kind::Protocol,
                        format!("{} asked about a block outside its range", peer.0),
                    ));
                }
                ToDest::Refine { offset, len }
            }
            Frame::Check { offset, len } => {
                if offset < layout.start || offset.saturating_add(len) > layout.end {
                    return Err(Error::new(
                        Kind::Protocol,
                        format!("{} asked to check a block outside its range", peer.0),
                    ));
                }
                ToDest::Check { offset, len }
            }
            Frame::Finding { kind, offset, len } => {
                if offset < layout.start || offset.saturating_add(len) > layout.end {
                    return Err(Error::new(
                        Kind::Protocol,
                        format!("{} reported a range outside its own", peer.0),
                    ));
                }
                ToDest::Finding { kind, offset, len }
            }
            Frame::Finish { size, counts } => {
                Stats::add(&stats.source_read, counts.read);
                Stats::add(&stats.blocks_same, counts.same);
                Stats::add(&stats.blocks_changed, counts.changed);
                Stats::add(&stats.changed_bytes, counts.changed_bytes);
                Stats::add(&stats.blocks_zero, counts.zero);
                Stats::add(&stats.blocks_hole, counts.holes);
                Stats::add(&stats.blocks_zeroed, counts.zeroed);
                if size != layout.size {
                    return Err(Error::new(
                        Kind::Protocol,
                        format!("{} finished with size {size}, not {}", peer.0, layout.size),
                    ));
                }
                let _ = tx.send(ToDest::Finish { size, counts });
                return Ok(());
            }
            Frame::Abort { kind, message } => {
                let _ = tx.send(ToDest::Abort {
                    kind,
                    message: message.clone(),
                });
                return Err(Error::new(
                    remote_kind(kind),
                    format!("{}: {message}", peer.0),
                ));
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
                    Ok((Frame::Finish { .. } | Frame::Abort { .. }, _)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            return Err(Error::new(Kind::Internal, "destination half stopped early"));
        }
    }
}

/// Runs the source half with its messages carried over `r`/`w`: the half on this thread,
/// one thread per direction; then, with `--verify`, the verify pass over the same stream.
/// `after` runs once the last pass's half and sending side are done, before its receiving
/// thread is joined (a client reaps ssh there, so a stuck peer cannot keep that thread
/// waiting).
#[allow(clippy::too_many_arguments)]
pub fn source_over(
    src: &Target,
    config: &Config,
    mut r: impl Read + Send,
    mut w: impl Write + AsFd + Send,
    level: i32,
    bwlimit: u64,
    stats: &Stats,
    cancel: &AtomicBool,
    peer: &Peer,
    after: impl FnOnce(),
) -> Result<()> {
    with_verify(config, after, |cfg, after, last| {
        // The verify pass sends no blocks: nothing to compress or to pace.
        let (level, bwlimit) = if cfg.verify_pass {
            (0, 0)
        } else {
            (level, bwlimit)
        };
        source_pass(
            src, cfg, &mut r, &mut w, level, bwlimit, stats, cancel, peer, after, last,
        )
    })
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

/// One pass of [`source_over`]; calls `after` when it is the last pass or fails.
#[allow(clippy::too_many_arguments)]
fn source_pass(
    src: &Target,
    config: &Config,
    r: impl Read + Send,
    w: impl Write + AsFd + Send,
    level: i32,
    bwlimit: u64,
    stats: &Stats,
    cancel: &AtomicBool,
    peer: &Peer,
    after: &mut Option<impl FnOnce()>,
    last: bool,
) -> Result<()> {
    let (to_dest, from_source) = bounded(config.buffers); // blocks in flight: bounds memory
    let (to_source, from_dest) = bounded(REPORTS_IN_FLIGHT);
    // The receiving thread reads well ahead of the source half (a few MiB of reports), so
    // a failure the peer sends behind queued reports is seen at once.
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
        let sender = s.spawn(move || send_to_dest(from_source, w, level, bwlimit, stats, peer));
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

/// Runs the destination half with its messages carried over `r`/`w`, like
/// [`source_over`] (the verify pass included). With `cancel` (a client), Ctrl-C tells the
/// remote source, which aborts, so this side flushes and stops.
#[allow(clippy::too_many_arguments)]
pub fn dest_over(
    dest: Option<&Target>,
    config: &Config,
    mut r: impl Read + Send,
    mut w: impl Write + Send,
    stats: &Stats,
    cancel: Option<&AtomicBool>,
    peer: &Peer,
    after: impl FnOnce(),
) -> Result<()> {
    with_verify(config, after, |cfg, after, last| {
        dest_pass(dest, cfg, &mut r, &mut w, stats, cancel, peer, after, last)
    })
}

/// One pass of [`dest_over`]; calls `after` when it is the last pass or fails.
#[allow(clippy::too_many_arguments)]
fn dest_pass(
    dest: Option<&Target>,
    config: &Config,
    r: impl Read + Send,
    w: impl Write + Send,
    stats: &Stats,
    cancel: Option<&AtomicBool>,
    peer: &Peer,
    after: &mut Option<impl FnOnce()>,
    last: bool,
) -> Result<()> {
    let (to_dest, from_source) = bounded(config.buffers); // blocks in flight: bounds memory
    let (to_source, from_dest) = bounded(REPORTS_IN_FLIGHT);
    let (answers, answers_rx) = crossbeam_channel::unbounded();
    let finished = AtomicBool::new(false);
    let layout = config.layout;
    std::thread::scope(|s| {
        let receiver = s.spawn(move || recv_from_source(r, to_dest, layout, stats, peer));
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
        let sender = s.spawn(move || send_to_source(from_dest, answers_rx, w, stats, peer));
        let written = engine::dest::run(dest, config, from_source, to_source, answers, stats);
        finished.store(true, Ordering::Relaxed);
        let _ = sender.join();
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
        written.and(received)
    })
}

#[cfg(test)]
mod packer_tests {
    use super::*;

    fn text(n: usize) -> Slice {
        Slice::owned((0..n).map(|i| b"some words, "[i % 12]).collect())
    }

    /// A packer that has measured: compression at 100 MB/s to a third of the size, and
    /// ssh taking `link` bytes a second.
    fn measured(link: f64) -> Packer {
        let mut p = Packer::new(1, 0);
        (p.pack_rate, p.pack_ratio, p.link_rate) = (100e6, 0.33, link);
        p
    }

    #[test]
    fn slow_compression_is_skipped_only_while_it_would_keep_ssh_waiting() {
        let block = text(1 << 20);
        // Nothing measured: compress first (and learn how fast), then one block raw to
        // see how fast ssh takes it.
        let mut p = Packer::new(1, 0);
        assert!(matches!(p.pack(&block, Some(0)), Data::Zstd { .. }));
        p.pack_rate = 100e6;
        assert!(matches!(p.pack(&block, Some(1 << 20)), Data::Raw(_)));
        // A fast link (500 MB/s): 1 MiB queued lasts ssh ~2 ms, compressing takes ~10 ms
        // to save ~1.4 ms. Raw, but every REMEASURE-th block is compressed to measure.
        let mut p = measured(500e6);
        for _ in 0..REMEASURE {
            assert!(matches!(p.pack(&block, Some(1 << 20)), Data::Raw(_)));
        }
        assert!(matches!(p.pack(&block, Some(1 << 20)), Data::Zstd { .. }));
        // A slow link (30 MB/s): 1 MiB queued lasts ~35 ms, or saving ~22 ms of link
        // time for ~10 ms idle: compress either way.
        let mut p = measured(30e6);
        assert!(matches!(p.pack(&block, Some(1 << 20)), Data::Zstd { .. }));
        let mut p = measured(30e6);
        assert!(matches!(p.pack(&block, Some(0)), Data::Zstd { .. }));
        // Not a pipe: as before, compress.
        let mut p = measured(500e6);
        assert!(matches!(p.pack(&block, None), Data::Zstd { .. }));
    }

    #[test]
    fn the_link_is_timed_only_while_raw_blocks_keep_the_pipe_full() {
        let mut p = Packer::new(1, 0);
        p.was_raw = true;
        p.wrote(0, Some(1 << 20));
        std::thread::sleep(std::time::Duration::from_millis(60));
        // 2 MiB written, 1 MiB still queued: ssh took 2 MiB in >= 60 ms.
        p.wrote(2 << 20, Some(1 << 20));
        assert!(p.link_rate > 0.0 && p.link_rate <= (2 << 20) as f64 / 0.06);
        // After a compressed block the pipe may have run dry: no measure.
        let before = p.link_rate;
        p.was_raw = false;
        std::thread::sleep(std::time::Duration::from_millis(60));
        p.wrote(10 << 20, Some(0));
        assert_eq!(p.link_rate, before);
    }

    #[test]
    fn fast_compression_bwlimit_and_level_zero_are_as_before() {
        let block = text(1 << 20);
        let mut p = measured(500e6);
        p.pack_rate = 2e9; // faster than any ssh: always worth it
        assert!(matches!(p.pack(&block, Some(0)), Data::Zstd { .. }));
        let mut p = Packer::new(1, 10 << 20); // --bwlimit: the sleeps leave time
        (p.pack_rate, p.link_rate) = (100e6, 500e6);
        assert!(matches!(p.pack(&block, Some(0)), Data::Zstd { .. }));
        let mut p = Packer::new(0, 0);
        assert!(matches!(p.pack(&block, Some(1 << 30)), Data::Raw(_)));
        // Incompressible: backs off, then tries again.
        let mut noise = vec![0u8; 1 << 16];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let noise = Slice::owned(noise);
        let mut p = Packer::new(1, 0);
        assert!(matches!(p.pack(&noise, None), Data::Raw(_)));
        assert_eq!(p.skip, 1);
    }
}
