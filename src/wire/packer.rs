//! The adaptive compressor on the source's sending side: compresses written blocks when
//! that saves link time, and counts what actually went into the pipe to time the link.

use crate::io::pool::Slice;
use crate::wire::data::Data;
use std::io::Write;

/// Compression at least this fast (bytes in per second) keeps ahead of any one ssh stream,
/// so it always pays: fewer bytes to encrypt and carry.
const FAST_PACKING: f64 = 1e9;

/// The link's speed is measured over at least this many seconds of raw blocks.
const LINK_WINDOW: f64 = 0.05;

/// While slow compression is skipped, every this many blocks one is compressed anyway,
/// to measure again (the data changes along a disk).
const REMEASURE: u32 = 16;

/// Bytes passed to the writes to ssh since it was last taken.
pub(crate) type WriteLog = std::rc::Rc<std::cell::Cell<u64>>;

/// A writer that counts what actually went into the pipe (a buffered writer in front
/// holds some back).
pub(crate) struct Counted<W> {
    pub(crate) inner: W,
    pub(crate) log: WriteLog,
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
pub(crate) struct Packer {
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
    /// The level was asked for (`--compress-level`): compress every block at it.
    fixed: bool,
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
    pub(crate) fn new(level: i32, bwlimit: u64, fixed: bool) -> Self {
        Packer {
            level,
            fixed,
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
    pub(crate) fn wrote(&mut self, bytes: u64, queued: Option<usize>) {
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
        if self.fixed || self.bwlimit > 0.0 || self.pack_rate >= FAST_PACKING {
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
    pub(crate) fn pack(&mut self, raw: &Slice, q: Option<usize>) -> Data {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Slice {
        Slice::owned((0..n).map(|i| b"some words, "[i % 12]).collect())
    }

    /// A packer that has measured: compression at 100 MB/s to a third of the size, and
    /// ssh taking `link` bytes a second.
    fn measured(link: f64) -> Packer {
        let mut p = Packer::new(1, 0, false);
        (p.pack_rate, p.pack_ratio, p.link_rate) = (100e6, 0.33, link);
        p
    }

    #[test]
    fn slow_compression_is_skipped_only_while_it_would_keep_ssh_waiting() {
        let block = text(1 << 20);
        // Nothing measured: compress first (and learn how fast), then one block raw to
        // see how fast ssh takes it.
        let mut p = Packer::new(1, 0, false);
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
        let mut p = Packer::new(1, 0, false);
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
        let mut p = Packer::new(1, 10 << 20, false); // --bwlimit: the sleeps leave time
        (p.pack_rate, p.link_rate) = (100e6, 500e6);
        assert!(matches!(p.pack(&block, Some(0)), Data::Zstd { .. }));
        let mut p = Packer::new(0, 0, false);
        assert!(matches!(p.pack(&block, Some(1 << 30)), Data::Raw(_)));
        // Incompressible: backs off, then tries again.
        let mut noise = vec![0u8; 1 << 16];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let noise = Slice::owned(noise);
        let mut p = Packer::new(1, 0, false);
        assert!(matches!(p.pack(&noise, None), Data::Raw(_)));
        assert_eq!(p.skip, 1);
    }
}
