//! The messages the two halves of the engine exchange.
//!
//! The source half and the destination half never share anything but these messages, so
//! the same halves run in one process (local sync, messages passed over channels without
//! copying) or on two machines (messages framed over an ssh byte stream).

use crate::error::Kind;
use crate::hash::Digest;
use crate::pool::{Buf, Slice};

/// From the source half to the destination half.
pub enum ToDest {
    /// Write `data` at byte `offset` of the destination.
    Write {
        /// Byte offset in the destination.
        offset: u64,
        /// The bytes to write (one or more whole blocks, or the partial last block).
        data: Slice,
    },
    /// Every changed block has been sent: make a file destination exactly `size` bytes,
    /// flush everything to stable storage, then answer [`ToSource::Done`].
    Finish {
        /// The source size, which a file destination must end with.
        size: u64,
    },
    /// Stop early (interrupted): flush what was written, leave the size alone, answer
    /// [`ToSource::Done`].
    Abort,
}

/// From the destination half to the source half.
pub enum ToSource {
    /// The destination's own bytes for chunk `index`, shorter (or empty) where the
    /// destination ends. Only in one process, where moving a buffer costs nothing:
    /// comparing bytes directly is cheaper than hashing both sides.
    Bytes {
        /// Chunk number.
        index: u64,
        /// The destination bytes of that chunk that exist.
        data: Buf,
    },
    /// Digests of the destination's complete blocks in chunk `index`, in order; blocks the
    /// destination does not fully hold are left out (and so count as changed).
    Digests {
        /// Chunk number.
        index: u64,
        /// One digest per complete block, from the first block of the chunk.
        digests: Vec<Digest>,
    },
    /// Everything written is on stable storage.
    Done {
        /// Bytes written by the destination half.
        written: u64,
    },
    /// The destination half failed and stopped.
    Failed {
        /// Decides the exit code.
        kind: Kind,
        /// One line naming the path and the cause.
        message: String,
    },
}
