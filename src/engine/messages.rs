//! The messages the two halves of the engine exchange.
//!
//! The source half and the destination half never share anything but these messages, so
//! the same halves run in one process (local sync, messages passed over channels without
//! copying) or on two machines (messages framed over an ssh byte stream by `crate::wire`).

use crate::error::Kind;
use crate::hash::BlockInfo;
use crate::io::pool::{Buf, Slice};
/// The source half's counters, sent with Finish so a destination on another machine can
/// report them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Source bytes read.
    pub read: u64,
    /// Blocks found equal.
    pub same: u64,
    /// Blocks found different.
    pub changed: u64,
    /// Bytes of the changed blocks.
    pub changed_bytes: u64,
    /// Source blocks that are all zero (holes included).
    pub zero: u64,
    /// Source blocks in holes, never read.
    pub holes: u64,
    /// Changed blocks sent as a zero range instead of data.
    pub zeroed: u64,
}

/// What a [`ToDest::Finding`] reports about a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// The source could not read it (bad sectors).
    Unreadable,
    /// `--verify`: the destination differs from the source there.
    Mismatch,
    /// `--verify`: the source changed there while the sync ran.
    SourceChanged,
}

impl FindingKind {
    /// Every kind, in wire order.
    pub const ALL: [FindingKind; 3] = [
        FindingKind::Unreadable,
        FindingKind::Mismatch,
        FindingKind::SourceChanged,
    ];
}

/// From the source half to the destination half; `D` is a written block's bytes: a
/// shared buffer in this process, a packed payload on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToDest<D = Slice> {
    /// Write `data` at byte `offset` of the destination.
    Write {
        /// Byte offset in the destination.
        offset: u64,
        /// The bytes to write (one or more whole blocks, or the partial last block).
        data: D,
    },
    /// Every changed block has been sent: make a file destination exactly `size` bytes,
    /// flush everything to stable storage, then answer [`ToSource::Done`].
    Finish {
        /// The source size, which a file destination must end with.
        size: u64,
        /// What the source half found.
        counts: Counts,
    },
    /// Make `len` bytes at `offset` zero: punch a hole (file), or write zeros (device,
    /// or `--no-sparse`).
    Zero {
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// This block differs: answer with [`ToSource::Pieces`], what the destination holds
    /// in each sub-block, so only the changed pieces need to cross.
    Refine {
        /// Byte offset of the block.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// Spot-check: answer with [`ToSource::Pieces`] holding one entry, what the destination
    /// holds in this block (digest files must still describe the destination).
    Check {
        /// Byte offset of the block.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// Something the user must hear about a byte range (the source half may be on the
    /// other machine): recorded for the summary, the exit code and `--bad-blocks`.
    Finding {
        /// What was found.
        kind: FindingKind,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Stop early: flush what was written, leave the size alone, answer
    /// [`ToSource::Failed`] (never Done: a stopped run must not pass for a complete one).
    /// Carries why, so a destination on another machine can report it.
    Abort {
        /// Exit-code kind of the cause.
        kind: Kind,
        /// The cause, one line.
        message: String,
    },
}

/// From the destination half to the source half; `B` is the destination's raw bytes,
/// which only a half in the same process receives ([`Unsendable`] on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToSource<B = Buf> {
    /// The destination's own bytes for chunk `index`, shorter (or empty) where the
    /// destination ends. Only in one process, where moving a buffer costs nothing:
    /// comparing bytes directly is cheaper than hashing both sides.
    Bytes {
        /// Chunk number.
        index: u64,
        /// The destination bytes of that chunk that exist; the bytes of blocks marked in
        /// `zeros` may not have been read and must not be looked at.
        data: B,
        /// Per block of the chunk: known zero (a hole, or past the end of a sparse file).
        zeros: Vec<bool>,
    },
    /// What the destination holds in each block of chunk `index`.
    Digests {
        /// Chunk number.
        index: u64,
        /// One entry per block of the chunk (a shorter list: the rest are missing).
        blocks: Vec<BlockInfo>,
    },
    /// `--verify` pass: full-strength digests of the destination's blocks of chunk `index`.
    Verify {
        /// Chunk number.
        index: u64,
        /// One entry per block of the chunk (digests at full length).
        blocks: Vec<BlockInfo>,
    },
    /// The answer to [`ToDest::Refine`]: one entry per sub-block of the block.
    Pieces {
        /// Byte offset of the block.
        offset: u64,
        /// One per sub-block.
        pieces: Vec<BlockInfo>,
    },
    /// What the destination half wrote and read: sent just before its failure when it
    /// stopped early, so a remote destination's counters still reach the summary.
    Tally {
        /// Bytes written by the destination half.
        written: u64,
        /// Bytes read by the destination half.
        read: u64,
    },
    /// Everything written is on stable storage.
    Done {
        /// Bytes written by the destination half.
        written: u64,
        /// Bytes read by the destination half.
        read: u64,
        /// Bytes of undo journal it kept (for the summary of a push).
        journaled: u64,
    },
    /// The destination half failed and stopped.
    Failed {
        /// Decides the exit code.
        kind: Kind,
        /// One line naming the path and the cause.
        message: String,
    },
}

/// What stands for [`ToSource::Bytes`]' buffer on the wire: no value, so a frame can never
/// carry one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsendable {}

impl<D> ToDest<D> {
    /// The same message with a written block's bytes turned by `f` (packed for the wire,
    /// or unpacked from it); every other message as it is.
    pub fn try_map<E, X>(self, f: impl FnOnce(D) -> Result<E, X>) -> Result<ToDest<E>, X> {
        Ok(match self {
            ToDest::Write { offset, data } => ToDest::Write {
                offset,
                data: f(data)?,
            },
            ToDest::Finish { size, counts } => ToDest::Finish { size, counts },
            ToDest::Zero { offset, len } => ToDest::Zero { offset, len },
            ToDest::Refine { offset, len } => ToDest::Refine { offset, len },
            ToDest::Check { offset, len } => ToDest::Check { offset, len },
            ToDest::Finding { kind, offset, len } => ToDest::Finding { kind, offset, len },
            ToDest::Abort { kind, message } => ToDest::Abort { kind, message },
        })
    }
}

impl<B> ToSource<B> {
    /// The same message with the destination's raw bytes turned by `f`; every other
    /// message as it is.
    pub fn try_map<C, X>(self, f: impl FnOnce(B) -> Result<C, X>) -> Result<ToSource<C>, X> {
        Ok(match self {
            ToSource::Bytes { index, data, zeros } => ToSource::Bytes {
                index,
                data: f(data)?,
                zeros,
            },
            ToSource::Digests { index, blocks } => ToSource::Digests { index, blocks },
            ToSource::Verify { index, blocks } => ToSource::Verify { index, blocks },
            ToSource::Pieces { offset, pieces } => ToSource::Pieces { offset, pieces },
            ToSource::Tally { written, read } => ToSource::Tally { written, read },
            ToSource::Done {
                written,
                read,
                journaled,
            } => ToSource::Done {
                written,
                read,
                journaled,
            },
            ToSource::Failed { kind, message } => ToSource::Failed { kind, message },
        })
    }
}

impl ToSource<Unsendable> {
    /// A message off the wire, for a half in this process.
    pub fn received(self) -> ToSource {
        match self.try_map(|never: Unsendable| -> Result<Buf, Unsendable> { match never {} }) {
            Ok(m) => m,
            Err(never) => match never {},
        }
    }
}
