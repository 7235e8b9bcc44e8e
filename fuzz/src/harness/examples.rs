//! Frame types and valid example frames of each, the seeds every target starts from.

use blocksync::error::Kind;
use blocksync::testing::{
    BlockInfo, Counts, Data, FLAG_DROP_CACHE, FLAG_DRY_RUN, FindingKind, Frame, Go, HashKind,
    Hello, MAX_BLOCK, MAX_DIGESTS, MIN_BLOCK, Reply, Role, RunPart, Slice, ToDest, ToSource,
    write_frame,
};
use std::sync::OnceLock;

/// Each frame type, one decoder each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    /// [`Frame::Hello`]
    Hello,
    /// [`Frame::Reply`]
    Reply,
    /// [`Frame::Go`]
    Go,
    /// [`Frame::Digests`]
    Digests,
    /// [`Frame::Verify`]
    Verify,
    /// [`Frame::Finding`]
    Finding,
    /// [`Frame::Pieces`]
    Pieces,
    /// [`Frame::Refine`]
    Refine,
    /// [`Frame::Check`]
    Check,
    /// [`Frame::Write`]
    Write,
    /// [`Frame::Zero`]
    Zero,
    /// [`Frame::Finish`]
    Finish,
    /// [`Frame::Abort`]
    Abort,
    /// [`Frame::Tally`]
    Tally,
    /// [`Frame::Done`]
    Done,
    /// [`Frame::Failed`]
    Failed,
}

/// Every frame type.
pub const ALL_TYPES: [Ty; 16] = [
    Ty::Hello,
    Ty::Reply,
    Ty::Go,
    Ty::Digests,
    Ty::Verify,
    Ty::Finding,
    Ty::Pieces,
    Ty::Refine,
    Ty::Check,
    Ty::Write,
    Ty::Zero,
    Ty::Finish,
    Ty::Abort,
    Ty::Tally,
    Ty::Done,
    Ty::Failed,
];

/// The type byte of `ty` on the wire, taken from the encoder so it never drifts.
pub fn type_byte(ty: Ty) -> u8 {
    static BYTES: OnceLock<[u8; ALL_TYPES.len()]> = OnceLock::new();
    let bytes = BYTES.get_or_init(|| ALL_TYPES.map(|t| examples(t)[0].encode().0));
    bytes[ALL_TYPES.iter().position(|t| *t == ty).expect("listed")]
}

/// Compressible, not trivially: what a zstd payload of real data looks like.
pub(super) fn text(len: usize) -> Vec<u8> {
    b"blocksync moves only the blocks that changed; "
        .iter()
        .cycle()
        .take(len)
        .copied()
        .collect()
}

pub(super) fn hello(role: Role, path: &str, block: u64, hash: HashKind, refine: u64) -> Hello {
    Hello {
        role,
        path: path.into(),
        block,
        hash,
        compress: 3,
        flags: FLAG_DRY_RUN | FLAG_DROP_CACHE,
        pause_ms: 0,
        source_size: 1 << 20,
        bwlimit: 0,
        refine,
        max_errors: u64::MAX,
        source_mode: 0o600,
        run: RunPart {
            streams: 1,
            ..Default::default()
        },
    }
}

/// Block states as Digests and Pieces carry them (digests cut to the block digest).
pub(super) fn infos(n: usize) -> Vec<BlockInfo> {
    (0..n)
        .map(|i| match i % 3 {
            0 => BlockInfo::Missing,
            1 => BlockInfo::Zero,
            _ => BlockInfo::Digest(HashKind::Blake3.block_digest(&i.to_le_bytes())),
        })
        .collect()
}

/// Block states as Verify carries them (digests at full length).
pub(super) fn full_infos(n: usize) -> Vec<BlockInfo> {
    (0..n)
        .map(|i| match i % 3 {
            0 => BlockInfo::Missing,
            1 => BlockInfo::Zero,
            _ => BlockInfo::Digest(HashKind::Sha256.digest(&i.to_le_bytes())),
        })
        .collect()
}

/// No sync id (a destination with no record, a Go without `--digest-file`).
pub(super) const NO_ID: [u8; 16] = [0; 16];

/// A sync id as a client with `--digest-file` sends it.
pub(super) const SYNC_ID: [u8; 16] = [
    0x01, 0x5e, 0xed, 0x1d, 0xfe, 0x00, 0x80, 0x7f, 0xaa, 0x55, 0x10, 0x20, 0x30, 0x40, 0x50, 0xff,
];

/// Valid frames of type `ty`, covering each variant the decoder distinguishes.
pub fn examples(ty: Ty) -> Vec<Frame> {
    match ty {
        Ty::Hello | Ty::Reply | Ty::Go => handshake_examples(ty),
        Ty::Digests | Ty::Verify | Ty::Pieces | Ty::Tally | Ty::Done | Ty::Failed => {
            to_source_examples(ty)
        }
        Ty::Finding | Ty::Refine | Ty::Check | Ty::Write | Ty::Zero | Ty::Finish | Ty::Abort => {
            to_dest_examples(ty)
        }
    }
}

/// [`examples`] of the handshake: Hello, Reply, Go.
fn handshake_examples(ty: Ty) -> Vec<Frame> {
    match ty {
        Ty::Hello => vec![
            Frame::Hello(hello(
                Role::Dest,
                "/srv/a b;$(x)",
                1 << 20,
                HashKind::Blake3,
                4096,
            )),
            Frame::Hello(hello(Role::Source, "", MIN_BLOCK, HashKind::Xxh3, 0)),
            Frame::Hello(hello(
                Role::Dest,
                "/dev/déjà",
                MAX_BLOCK,
                HashKind::Sha256,
                MAX_BLOCK / MAX_DIGESTS as u64,
            )),
        ],
        Ty::Reply => vec![
            Frame::Reply(Reply {
                size: 0,
                kind: 0,
                sync_id: NO_ID,
                mode: 0o644,
                journal: 0,
                data: 0,
            }),
            Frame::Reply(Reply {
                size: 99,
                kind: 1,
                sync_id: SYNC_ID,
                mode: 0o644,
                journal: 0,
                data: 0,
            }),
            Frame::Reply(Reply {
                size: 1 << 40,
                kind: 2,
                sync_id: [0xff; 16],
                mode: 0o644,
                journal: 0,
                data: 0,
            }),
        ],
        Ty::Go => vec![
            Frame::Go(Go {
                proceed: true,
                size: 100,
                start: 0,
                end: 100,
                sync_id: NO_ID,
                no_read: false,
            }),
            Frame::Go(Go {
                proceed: false,
                size: 0,
                start: 0,
                end: 0,
                sync_id: NO_ID,
                no_read: false,
            }),
            Frame::Go(Go {
                proceed: true,
                size: 10 << 20,
                start: 4 << 20,
                end: 8 << 20,
                sync_id: SYNC_ID,
                no_read: true,
            }),
            Frame::Go(Go {
                proceed: false,
                size: 1 << 20,
                start: 0,
                end: 1 << 20,
                sync_id: [0xff; 16],
                no_read: true,
            }),
        ],
        _ => unreachable!("{ty:?} is no handshake frame"),
    }
}

/// [`examples`] of what the destination side sends the source.
fn to_source_examples(ty: Ty) -> Vec<Frame> {
    match ty {
        Ty::Digests => vec![
            Frame::Source(ToSource::Digests {
                index: 7,
                blocks: infos(5),
            }),
            Frame::Source(ToSource::Digests {
                index: 0,
                blocks: vec![],
            }),
            Frame::Source(ToSource::Digests {
                index: 1,
                blocks: infos(64),
            }),
        ],
        Ty::Verify => vec![
            Frame::Source(ToSource::Verify {
                index: 3,
                blocks: full_infos(5),
            }),
            Frame::Source(ToSource::Verify {
                index: 0,
                blocks: vec![],
            }),
        ],
        Ty::Pieces => vec![
            Frame::Source(ToSource::Pieces {
                offset: 1 << 20,
                pieces: infos(4),
            }),
            Frame::Source(ToSource::Pieces {
                offset: 0,
                pieces: vec![],
            }),
        ],
        Ty::Tally => vec![Frame::Source(ToSource::Tally {
            written: 75,
            read: 76,
        })],
        Ty::Done => vec![Frame::Source(ToSource::Done {
            written: 77,
            read: 78,
            journaled: 79,
        })],
        Ty::Failed => vec![
            Frame::Source(ToSource::Failed {
                kind: Kind::TooSmall,
                message: "déjà vu".into(),
            }),
            Frame::Source(ToSource::Failed {
                kind: Kind::Internal,
                message: "x".repeat(300),
            }),
        ],
        _ => unreachable!("{ty:?} is not sent to the source"),
    }
}

/// [`examples`] of what the source side sends the destination.
fn to_dest_examples(ty: Ty) -> Vec<Frame> {
    let last_kind = *Kind::ALL.last().expect("kinds");
    match ty {
        Ty::Finding => FindingKind::ALL
            .iter()
            .map(|&kind| {
                Frame::Dest(ToDest::Finding {
                    kind,
                    offset: 512,
                    len: 4096,
                })
            })
            .collect(),
        Ty::Refine => vec![
            Frame::Dest(ToDest::Refine {
                offset: 1 << 20,
                len: 1 << 20,
            }),
            Frame::Dest(ToDest::Refine {
                offset: 0,
                len: MAX_BLOCK,
            }),
        ],
        Ty::Check => vec![
            Frame::Dest(ToDest::Check {
                offset: 1 << 20,
                len: 4096,
            }),
            Frame::Dest(ToDest::Check { offset: 0, len: 0 }),
            Frame::Dest(ToDest::Check {
                offset: u64::MAX - MAX_BLOCK,
                len: MAX_BLOCK,
            }),
        ],
        Ty::Write => vec![
            Frame::Dest(ToDest::Write {
                offset: 1 << 40,
                data: Data::Raw(Slice::owned(vec![1, 2, 3])),
            }),
            Frame::Dest(ToDest::Write {
                offset: 0,
                data: Data::Raw(Slice::owned(vec![])),
            }),
            Frame::Dest(ToDest::Write {
                offset: 4096,
                data: Data::pack(&Slice::owned(vec![0u8; 65536]), 3),
            }),
            Frame::Dest(ToDest::Write {
                offset: 8192,
                data: Data::pack(&Slice::owned(text(8192)), 1),
            }),
        ],
        Ty::Zero => vec![
            Frame::Dest(ToDest::Zero {
                offset: 1 << 30,
                len: 1 << 20,
            }),
            Frame::Dest(ToDest::Zero { offset: 0, len: 0 }),
        ],
        Ty::Finish => vec![Frame::Dest(ToDest::Finish {
            size: 5,
            counts: Counts {
                read: 1,
                same: 2,
                changed: 3,
                changed_bytes: 4,
                zero: 5,
                holes: 6,
                zeroed: 7,
            },
        })],
        Ty::Abort => vec![
            Frame::Dest(ToDest::Abort {
                kind: Kind::Io,
                message: "reading source: EIO".into(),
            }),
            Frame::Dest(ToDest::Abort {
                kind: last_kind,
                message: String::new(),
            }),
        ],
        _ => unreachable!("{ty:?} is not sent to the destination"),
    }
}

/// `f` as it travels: length prefix, type byte, payload.
pub fn wire(f: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, f).expect("writing to a Vec");
    out
}

pub(super) fn conversation(frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(wire).collect()
}
