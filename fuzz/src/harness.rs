//! What every fuzz target checks, shared by the libFuzzer targets in `fuzz/` and by the
//! bounded run in `tests/fuzz_smoke.rs` (which includes this file by path), so the CI run
//! and the long runs check the same properties on every input:
//!
//! - decoding never panics (a panic aborts the fuzzer, or fails the test);
//! - decoding never allocates past [`decode_bound`], [`read_bound`] or, on a whole
//!   stream, [`stream_largest`], whatever the length and count fields claim;
//! - a frame that decodes re-encodes to the same bytes (only Go's flag byte is
//!   normalized), and satisfies every check the decoder promises;
//! - the handshake and the stream readers behind it hand the engine only messages inside
//!   the range the Go named.
//!
//! Seeds are valid encoded frames and conversations; [`mutate`] turns them into what a
//! broken or hostile peer might send, for runs without libFuzzer.

use blocksync::error::Kind;
use blocksync::testing as server;
use blocksync::testing::{
    self as link, BlockInfo, Counts, Data, FLAG_DROP_CACHE, FLAG_DRY_RUN, FLAG_NO_READ,
    FLAG_TRACK_ID, FLAG_VERIFY, FindingKind, Frame, GREETING, Go, HashKind, Hello, Layout,
    MAX_BLOCK, MAX_DIGESTS, MAX_FRAME, MAX_SIZE, MAX_TEXT, MIN_BLOCK, Peer, Recycler, Reply, Role,
    Slice, Stats, ToDest, ToSource, read_frame, read_frame_with, write_frame,
};
use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------
// Heap accounting, per thread so parallel test threads do not disturb each other.

/// The global allocator of every fuzz target: the system allocator, counting this
/// thread's live bytes so a check can bound what one decode allocates.
pub struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn grew(n: usize) {
    // try_with: allocations during thread teardown must not panic.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + n;
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
        let _ = LARGEST.try_with(|l| l.set(l.get().max(n)));
    });
}

fn shrank(n: usize) {
    // Memory freed on another thread than it was allocated on would go negative.
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n)));
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            shrank(layout.size());
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap use of one measured call on this thread.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Most bytes live at once, above what was live before the call.
    pub peak: usize,
    /// The largest single allocation.
    pub largest: usize,
}

/// Runs `f`, measuring this thread's heap use (not nested).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    LARGEST.with(|l| l.set(0));
    let r = f();
    let usage = Usage {
        peak: PEAK.with(Cell::get) - base,
        largest: LARGEST.with(Cell::get),
    };
    (r, usage)
}

/// Most bytes [`Frame::decode`] may hold for an `n`-byte payload: every field is backed by
/// payload bytes before anything is allocated, and the widest thing built per payload
/// byte is one [`BlockInfo`] (a block state byte).
pub fn decode_bound(n: usize) -> usize {
    n * std::mem::size_of::<BlockInfo>() + 1024
}

/// What `read_frame` reserves before the data arrives: a typical frame (a chunk plus
/// headers), never the length the prefix claims.
pub const RESERVE: usize = blocksync::testing::CHUNK_TARGET as usize + 4096;

/// Most bytes reading and decoding one frame may hold, given `n` bytes of input: the
/// up-front reservation, growth as data arrives, and the decode.
pub fn read_bound(n: usize) -> usize {
    RESERVE + 2 * n + decode_bound(n)
}

/// Largest single allocation a stream reader may make on `n` bytes of input: a frame
/// buffer, or a zstd block's stated size, both capped by [`MAX_FRAME`].
pub fn stream_largest(n: usize) -> usize {
    MAX_FRAME.max(RESERVE).max(2 * n) + 4096
}

// ---------------------------------------------------------------------------------------
// Frame types and examples.

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
fn text(len: usize) -> Vec<u8> {
    b"blocksync moves only the blocks that changed; "
        .iter()
        .cycle()
        .take(len)
        .copied()
        .collect()
}

fn hello(role: Role, path: &str, block: u64, hash: HashKind, refine: u64) -> Hello {
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
    }
}

/// Block states as Digests and Pieces carry them (digests cut to the block digest).
fn infos(n: usize) -> Vec<BlockInfo> {
    (0..n)
        .map(|i| match i % 3 {
            0 => BlockInfo::Missing,
            1 => BlockInfo::Zero,
            _ => BlockInfo::Digest(HashKind::Blake3.block_digest(&i.to_le_bytes())),
        })
        .collect()
}

/// Block states as Verify carries them (digests at full length).
fn full_infos(n: usize) -> Vec<BlockInfo> {
    (0..n)
        .map(|i| match i % 3 {
            0 => BlockInfo::Missing,
            1 => BlockInfo::Zero,
            _ => BlockInfo::Digest(HashKind::Sha256.digest(&i.to_le_bytes())),
        })
        .collect()
}

/// No sync id (a destination with no record, a Go without `--digest-file`).
const NO_ID: [u8; 16] = [0; 16];

/// A sync id as a client with `--digest-file` sends it.
const SYNC_ID: [u8; 16] = [
    0x01, 0x5e, 0xed, 0x1d, 0xfe, 0x00, 0x80, 0x7f, 0xaa, 0x55, 0x10, 0x20, 0x30, 0x40, 0x50, 0xff,
];

/// Valid frames of type `ty`, covering each variant the decoder distinguishes.
pub fn examples(ty: Ty) -> Vec<Frame> {
    let last_kind = *Kind::ALL.last().expect("kinds");
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
            }),
            Frame::Reply(Reply {
                size: 99,
                kind: 1,
                sync_id: SYNC_ID,
            }),
            Frame::Reply(Reply {
                size: 1 << 40,
                kind: 2,
                sync_id: [0xff; 16],
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
        Ty::Tally => vec![Frame::Source(ToSource::Tally {
            written: 75,
            read: 76,
        })],
        Ty::Done => vec![Frame::Source(ToSource::Done {
            written: 77,
            read: 78,
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
    }
}

/// `f` as it travels: length prefix, type byte, payload.
pub fn wire(f: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, f).expect("writing to a Vec");
    out
}

fn conversation(frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(wire).collect()
}

// ---------------------------------------------------------------------------------------
// Checks.

/// The checks the decoders promise for each frame they let through.
pub fn check_frame(f: &Frame) {
    match f {
        Frame::Hello(h) => {
            assert!((MIN_BLOCK..=MAX_BLOCK).contains(&h.block), "{h:?}");
            assert!(h.path.len() <= MAX_TEXT, "hello path too long");
            assert!(
                h.refine == 0
                    || (h.refine >= MIN_BLOCK && h.block.div_ceil(h.refine) <= MAX_DIGESTS as u64),
                "{h:?}"
            );
        }
        Frame::Reply(r) => assert!(r.kind <= 2 && r.size <= MAX_SIZE, "{r:?}"),
        Frame::Go(g) => {
            assert!(
                g.start <= g.end && g.end <= g.size && g.size <= MAX_SIZE,
                "{g:?}"
            )
        }
        Frame::Source(ToSource::Digests { blocks, .. })
        | Frame::Source(ToSource::Verify { blocks, .. }) => {
            assert!(blocks.len() <= MAX_DIGESTS)
        }
        Frame::Dest(ToDest::Finding { offset, len, .. }) => {
            assert!(offset.checked_add(*len).is_some())
        }
        Frame::Source(ToSource::Pieces { pieces, .. }) => assert!(pieces.len() <= MAX_DIGESTS),
        Frame::Dest(ToDest::Refine { offset, len })
        | Frame::Dest(ToDest::Check { offset, len }) => {
            assert!(*len <= MAX_BLOCK && offset.checked_add(*len).is_some())
        }
        Frame::Dest(ToDest::Zero { offset, len }) => assert!(offset.checked_add(*len).is_some()),
        Frame::Dest(ToDest::Write { data, .. }) => {
            if let Data::Zstd { len, .. } = data {
                assert!(*len as usize <= MAX_FRAME);
            }
        }
        Frame::Dest(ToDest::Abort { message, .. })
        | Frame::Source(ToSource::Failed { message, .. }) => {
            assert!(message.len() <= MAX_TEXT)
        }
        Frame::Dest(ToDest::Finish { .. })
        | Frame::Source(ToSource::Tally { .. })
        | Frame::Source(ToSource::Done { .. }) => {}
        Frame::Source(ToSource::Bytes { data, .. }) => match *data {},
    }
}

/// The payload the encoder produces for a frame decoded from `payload`: the same bytes,
/// except Go's flag byte, of which the decoder reads two bits (bit 0 proceed, bit 1
/// no_read) and ignores the rest, and which the encoder writes with only those two bits.
fn canonical(t: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = payload.to_vec();
    if t == type_byte(Ty::Go) && !p.is_empty() {
        p[0] &= 0b11;
    }
    p
}

/// One decoder: `Frame::decode` of a `ty` payload.
pub fn decode_as(ty: Ty, payload: &[u8]) {
    let t = type_byte(ty);
    let (decoded, usage) = measure(|| Frame::decode(t, payload));
    assert!(
        usage.peak <= decode_bound(payload.len()),
        "decoding {} payload bytes as {ty:?} held {} bytes",
        payload.len(),
        usage.peak
    );
    let Ok(frame) = decoded else { return };
    check_frame(&frame);
    let (t2, p2) = frame.encode();
    assert_eq!(t2, t, "{frame:?} re-encodes as another type");
    assert_eq!(p2, canonical(t, payload), "{frame:?} does not round-trip");
    let again = Frame::decode(t2, &p2).expect("a re-encoded frame decodes");
    assert_eq!(again, frame);
    // The streaming writer (which writes block data without copying) agrees.
    let w = wire(&frame);
    assert_eq!(&w[..4], &((p2.len() + 1) as u32).to_le_bytes());
    assert_eq!(w[4], t);
    assert_eq!(&w[5..], &p2[..]);
}

/// Target `frame_stream`: `read_frame` over a byte stream, frame after frame, as each
/// side reads its peer; then again the way a destination reads, raw blocks going into
/// recycled, page-aligned buffers.
pub fn frame_stream(data: &[u8]) {
    stream_frames(data, None);
    stream_frames(data, Some(&Recycler::new(2)));
}

fn stream_frames(data: &[u8], recycler: Option<&Recycler>) {
    let mut r = data;
    let mut buf = Vec::new();
    loop {
        let before = r.len();
        let (read, usage) = measure(|| read_frame_with(&mut r, &mut buf, recycler));
        assert!(
            usage.peak <= read_bound(before),
            "reading a frame from {before} bytes held {}",
            usage.peak
        );
        let Ok((frame, n)) = read else { return };
        let consumed = &data[data.len() - before..data.len() - r.len()];
        assert_eq!(n, consumed.len(), "{frame:?}: wrong size on the wire");
        check_frame(&frame);
        let t = consumed[4];
        let mut expect = consumed[..5].to_vec();
        expect.extend_from_slice(&canonical(t, &consumed[5..]));
        assert_eq!(wire(&frame), expect, "{frame:?} does not round-trip");
    }
}

/// Target `unpack`: the zstd decoder, on the bytes of a Write frame after its offset and
/// codec (the stated length, then the compressed bytes).
pub fn unpack(data: &[u8]) {
    let mut payload = vec![0u8; 8];
    payload.push(1); // codec: zstd
    payload.extend_from_slice(data);
    // Only what the frame decoder lets through can reach unpack.
    let Ok(Frame::Dest(ToDest::Write { data: packed, .. })) =
        Frame::decode(type_byte(Ty::Write), &payload)
    else {
        return;
    };
    let Data::Zstd { len, .. } = packed else {
        panic!("codec 1 decoded as raw")
    };
    let len = len as usize;
    // As the sync's receiver unpacks (into recycled, aligned buffers), then plainly.
    let recycler = Recycler::new(2);
    let (aligned, usage) = measure(|| packed.clone().unpack_with(Some(&recycler)));
    assert!(
        usage.peak <= len + data.len() + 2 * 4096,
        "unpacking to {len} bytes into a recycled buffer held {}",
        usage.peak
    );
    let (out, usage) = measure(|| packed.unpack());
    assert!(
        usage.peak <= len + data.len() + 4096,
        "unpacking to {len} bytes held {}",
        usage.peak
    );
    assert_eq!(aligned.is_ok(), out.is_ok(), "the two ways disagree");
    let Ok(out) = out else { return };
    assert_eq!(out.len(), len, "unpacked to another length than stated");
    assert_eq!(
        aligned.expect("checked"),
        out,
        "the two ways unpack differently"
    );
    // Small enough to be cheap: what unpacks packs and unpacks to the same bytes.
    if len <= 256 << 10 {
        let again = Data::pack(&out, 1).unpack().expect("own packing unpacks");
        assert_eq!(again, out);
    }
}

/// Points `$XDG_STATE_HOME` (where a destination records its sync id, see
/// the sync-id records) at a directory of this process's own under the temp dir, once,
/// so no fuzz input can make a run write into the real home. The targets open no file
/// today (a destination half without a target records nothing); this keeps it so if one
/// ever does. Called before any input runs: by `init` in the libFuzzer targets, first
/// thing in each test of `tests/fuzz_smoke.rs`.
pub fn private_state_home() {
    static DONE: OnceLock<std::path::PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let name = format!("blocksync-fuzz-state-{}", std::process::id());
        let dir = std::env::temp_dir().join(name);
        // SAFETY: set once, before any input runs. In a libFuzzer target `init` runs
        // before libFuzzer starts its threads; in the smoke test the other test threads
        // touch the environment only through `std::env`, whose calls are serialized.
        unsafe { std::env::set_var("XDG_STATE_HOME", &dir) };
        dir
    });
}

fn peer() -> Peer {
    Peer("the fuzzer".into())
}

/// What the destination half may receive from the link: only blocks, zero ranges and
/// questions inside the stream's range, and a Finish of the agreed size.
fn check_to_dest(msg: &ToDest, layout: Layout) {
    let inside = |offset: u64, len: u64| {
        offset >= layout.start && offset.checked_add(len).is_some_and(|e| e <= layout.end)
    };
    match msg {
        ToDest::Write { offset, data } => {
            assert!(data.len() <= MAX_FRAME);
            assert!(
                inside(*offset, data.len() as u64),
                "write at {offset} outside {layout:?}"
            );
        }
        ToDest::Zero { offset, len } => {
            assert!(
                inside(*offset, *len),
                "zero {offset}+{len} outside {layout:?}"
            )
        }
        ToDest::Refine { offset, len } => {
            assert!(*len <= MAX_BLOCK);
            assert!(
                inside(*offset, *len),
                "refine {offset}+{len} outside {layout:?}"
            );
        }
        ToDest::Check { offset, len } => {
            assert!(*len <= MAX_BLOCK);
            assert!(
                inside(*offset, *len),
                "check {offset}+{len} outside {layout:?}"
            );
        }
        ToDest::Finding { offset, len, .. } => {
            assert!(
                inside(*offset, *len),
                "finding {offset}+{len} outside {layout:?}"
            )
        }
        ToDest::Finish { size, .. } => assert_eq!(*size, layout.size),
        ToDest::Abort { message, .. } => assert!(message.len() <= MAX_TEXT),
    }
}

/// The destination side's reader (`link::recv_from_source`) on `r`, for one pass over
/// `layout`; a second thread takes the messages, as the destination half does. True when
/// the pass ended with the source's Finish (so a verify pass may follow).
fn stream_to_dest(r: &mut &[u8], layout: Layout) -> bool {
    let stats = Stats::default();
    let peer = peer();
    let n = r.len();
    // Bounded like the real link: a stream of tiny frames that each unpack to a large
    // block must not pile up here either.
    let (tx, rx) = crossbeam_channel::bounded(4);
    std::thread::scope(|s| {
        let checker = s.spawn(move || {
            for msg in rx {
                check_to_dest(&msg, layout);
            }
        });
        let (result, usage) =
            measure(|| link::recv_from_source(&mut *r, tx, layout, &stats, &peer));
        if let Err(p) = checker.join() {
            std::panic::resume_unwind(p);
        }
        assert!(
            usage.largest <= stream_largest(n),
            "allocated {} bytes at once",
            usage.largest
        );
        result.is_ok()
    })
}

/// The source side's reader (`link::recv_from_dest`) on `r`, for one pass.
fn stream_from_dest(r: &mut &[u8]) {
    let stats = Stats::default();
    let peer = peer();
    let n = r.len();
    let (tx, rx) = crossbeam_channel::unbounded();
    let (_, usage) = measure(|| link::recv_from_dest(&mut *r, tx, &stats, &peer));
    assert!(
        usage.largest <= stream_largest(n),
        "allocated {} bytes at once",
        usage.largest
    );
    for msg in rx.try_iter() {
        match msg {
            ToSource::Digests { blocks, .. } | ToSource::Verify { blocks, .. } => {
                assert!(blocks.len() <= MAX_DIGESTS)
            }
            ToSource::Pieces { pieces, .. } => assert!(pieces.len() <= MAX_DIGESTS),
            ToSource::Done { .. } => {}
            ToSource::Tally { .. } => panic!("a tally is counted, never passed on"),
            ToSource::Failed { message, .. } => {
                assert!(
                    message.len() <= MAX_TEXT + 512,
                    "a failure this long: {message}"
                )
            }
            ToSource::Bytes { .. } => panic!("raw destination bytes cannot cross machines"),
        }
    }
}

/// Target `handshake_server`: what the server does with the bytes a client sends: the
/// Hello, the Go, the engine settings they make (`server::config_for`), then the frames
/// of the sync for the role asked, and of the verify pass when the Hello asks for one
/// (no file is opened).
pub fn handshake_server(data: &[u8]) {
    let mut r = data;
    let mut buf = Vec::new();
    let Ok((Frame::Hello(hello), _)) = read_frame(&mut r, &mut buf) else {
        return;
    };
    let Ok((Frame::Go(go), _)) = read_frame(&mut r, &mut buf) else {
        return;
    };
    if !go.proceed {
        return;
    }
    let config = server::config_for(&hello, &go);
    // The Go's id is recorded only when the Hello asks for tracking, and the destination
    // half skips reading exactly when the Go says so.
    let track = hello.flags & FLAG_TRACK_ID != 0;
    assert_eq!(
        config.track,
        track.then_some(go.sync_id),
        "{hello:?} {go:?}"
    );
    assert_eq!(config.dest_reads, !go.no_read, "{go:?}");
    let l = config.layout;
    assert_eq!(
        (l.size, l.start, l.end, l.block),
        (go.size, go.start, go.end, hello.block)
    );
    assert!(
        l.chunk >= l.block && l.chunk.is_multiple_of(l.block),
        "{l:?}"
    );
    let verify = hello.flags & FLAG_VERIFY != 0;
    match hello.role {
        Role::Dest => {
            if stream_to_dest(&mut r, l) && verify {
                stream_to_dest(&mut r, l);
            }
        }
        Role::Source => {
            stream_from_dest(&mut r);
            if verify {
                stream_from_dest(&mut r);
            }
        }
    }
}

/// Target `handshake_client`: what a client does with the bytes the server sends: the
/// greeting, the Reply, the Go it would send for the reply's size, then the frames of a
/// push (digests coming back) and of a pull (blocks coming in), each with a verify pass.
pub fn handshake_client(data: &[u8]) {
    // The transport checks the greeting before any frame.
    let Some(mut r) = data.strip_prefix(GREETING.as_slice()) else {
        return;
    };
    let mut buf = Vec::new();
    let Ok((Frame::Reply(reply), _)) = read_frame(&mut r, &mut buf) else {
        return;
    };
    let mut push = r;
    stream_from_dest(&mut push);
    stream_from_dest(&mut push);
    // A pull of reply.size bytes in one stream, cut as remote.rs cuts it.
    let part = Layout::new(reply.size, 1 << 20).part(0, 1);
    assert_eq!(
        (part.start, part.end),
        (0, reply.size),
        "one stream must cover the whole source"
    );
    let mut pull = r;
    if stream_to_dest(&mut pull, part) {
        stream_to_dest(&mut pull, part);
    }
}

// ---------------------------------------------------------------------------------------
// Targets and seeds.

/// A fuzz target: a check run on each input, and the valid inputs to start from.
pub struct Target {
    /// The name of its binary in `fuzz/fuzz_targets/`.
    pub name: &'static str,
    /// Panics when the input breaks a property.
    pub check: fn(&[u8]),
    /// Valid inputs.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

fn payloads(ty: Ty) -> Vec<Vec<u8>> {
    examples(ty).iter().map(|f| f.encode().1).collect()
}

fn stream_seeds() -> Vec<Vec<u8>> {
    let all: Vec<Frame> = ALL_TYPES.iter().flat_map(|t| examples(*t)).collect();
    let mut seeds: Vec<Vec<u8>> = all.iter().map(wire).collect();
    seeds.push(conversation(&all));
    seeds
}

fn unpack_seeds() -> Vec<Vec<u8>> {
    payloads(Ty::Write)
        .into_iter()
        .filter(|p| p[8] == 1)
        .map(|p| p[9..].to_vec())
        .collect()
}

fn server_seeds() -> Vec<Vec<u8>> {
    let size = 1 << 20;
    let go = Frame::Go(Go {
        proceed: true,
        size,
        start: 0,
        end: size,
        sync_id: NO_ID,
        no_read: false,
    });
    let push = Frame::Hello(hello(Role::Dest, "/tmp/x", 4096, HashKind::Blake3, 512));
    // A push with --digest-file: the destination tracks the sync id and, the source
    // having its digests, does not read itself; the source spot-checks a few blocks.
    let mut tracked = hello(Role::Dest, "/tmp/x", 4096, HashKind::Blake3, 0);
    tracked.flags |= FLAG_TRACK_ID | FLAG_NO_READ | FLAG_VERIFY;
    let no_read_go = Frame::Go(Go {
        proceed: true,
        size,
        start: 0,
        end: size,
        sync_id: SYNC_ID,
        no_read: true,
    });
    let pull = Frame::Hello(hello(Role::Source, "/tmp/x", 4096, HashKind::Xxh3, 512));
    let finish = Frame::Dest(ToDest::Finish {
        size,
        counts: Counts::default(),
    });
    vec![
        conversation(&[
            push.clone(),
            go.clone(),
            Frame::Dest(ToDest::Write {
                offset: 0,
                data: Data::Raw(Slice::owned(vec![7; 100])),
            }),
            Frame::Dest(ToDest::Write {
                offset: 4096,
                data: Data::pack(&Slice::owned(text(4096)), 1),
            }),
            Frame::Dest(ToDest::Zero {
                offset: 8192,
                len: 4096,
            }),
            Frame::Dest(ToDest::Refine {
                offset: 0,
                len: 4096,
            }),
            finish,
        ]),
        conversation(&[
            push.clone(),
            go.clone(),
            Frame::Dest(ToDest::Abort {
                kind: Kind::Io,
                message: "EIO".into(),
            }),
        ]),
        conversation(&[
            push,
            Frame::Go(Go {
                proceed: false,
                size: 0,
                start: 0,
                end: 0,
                sync_id: NO_ID,
                no_read: false,
            }),
        ]),
        conversation(&[
            Frame::Hello(tracked.clone()),
            no_read_go,
            Frame::Dest(ToDest::Check {
                offset: 0,
                len: 4096,
            }),
            Frame::Dest(ToDest::Check {
                offset: size - 4096,
                len: 4096,
            }),
            Frame::Dest(ToDest::Write {
                offset: 4096,
                data: Data::Raw(Slice::owned(vec![7; 4096])),
            }),
            Frame::Dest(ToDest::Zero {
                offset: 8192,
                len: 4096,
            }),
            Frame::Dest(ToDest::Finish {
                size,
                counts: Counts::default(),
            }),
            // The verify pass the Hello asks for.
            Frame::Dest(ToDest::Finish {
                size,
                counts: Counts::default(),
            }),
        ]),
        conversation(&[
            Frame::Hello(tracked),
            Frame::Go(Go {
                proceed: true,
                size,
                start: size / 2,
                end: size,
                sync_id: SYNC_ID,
                no_read: true,
            }),
            Frame::Dest(ToDest::Check {
                offset: size / 2,
                len: 4096,
            }),
            Frame::Dest(ToDest::Abort {
                kind: Kind::Io,
                message: "EIO".into(),
            }),
        ]),
        conversation(&[
            pull.clone(),
            go.clone(),
            Frame::Source(ToSource::Digests {
                index: 0,
                blocks: infos(8),
            }),
            Frame::Source(ToSource::Pieces {
                offset: 0,
                pieces: infos(8),
            }),
            Frame::Source(ToSource::Done {
                written: 1,
                read: 2,
            }),
        ]),
        conversation(&[
            pull,
            go,
            Frame::Source(ToSource::Failed {
                kind: Kind::Destination,
                message: "no space".into(),
            }),
        ]),
    ]
}

fn client_seeds() -> Vec<Vec<u8>> {
    let greeted = |frames: &[Frame]| {
        let mut out = GREETING.to_vec();
        out.extend(conversation(frames));
        out
    };
    let reply = Frame::Reply(Reply {
        size: 1 << 20,
        kind: 1,
        sync_id: NO_ID,
    });
    // A destination that recorded a sync (asked with FLAG_TRACK_ID), answering spot-checks.
    let tracked = Frame::Reply(Reply {
        size: 1 << 20,
        kind: 2,
        sync_id: SYNC_ID,
    });
    vec![
        greeted(&[
            reply.clone(),
            Frame::Source(ToSource::Digests {
                index: 0,
                blocks: infos(8),
            }),
            Frame::Source(ToSource::Pieces {
                offset: 0,
                pieces: infos(8),
            }),
            Frame::Source(ToSource::Done {
                written: 1,
                read: 2,
            }),
        ]),
        greeted(&[
            reply,
            Frame::Dest(ToDest::Write {
                offset: 0,
                data: Data::Raw(Slice::owned(vec![7; 100])),
            }),
            Frame::Dest(ToDest::Zero {
                offset: 4096,
                len: 4096,
            }),
            Frame::Dest(ToDest::Finish {
                size: 1 << 20,
                counts: Counts::default(),
            }),
        ]),
        greeted(&[Frame::Source(ToSource::Failed {
            kind: Kind::Destination,
            message: "refused".into(),
        })]),
        greeted(&[
            tracked,
            Frame::Source(ToSource::Pieces {
                offset: 0,
                pieces: infos(1),
            }),
            Frame::Source(ToSource::Pieces {
                offset: (1 << 20) - 4096,
                pieces: infos(3)[2..].to_vec(),
            }),
            Frame::Source(ToSource::Done {
                written: 4096,
                read: 8192,
            }),
        ]),
        greeted(&[Frame::Reply(Reply {
            size: 0,
            kind: 0,
            sync_id: NO_ID,
        })]),
    ]
}

macro_rules! decoder {
    ($name:ident, $ty:ident) => {
        /// Target: the decoder of one frame type, on a payload.
        pub fn $name(data: &[u8]) {
            decode_as(Ty::$ty, data)
        }
    };
}

decoder!(decode_hello, Hello);
decoder!(decode_reply, Reply);
decoder!(decode_go, Go);
decoder!(decode_digests, Digests);
decoder!(decode_verify, Verify);
decoder!(decode_finding, Finding);
decoder!(decode_pieces, Pieces);
decoder!(decode_refine, Refine);
decoder!(decode_check, Check);
decoder!(decode_write, Write);
decoder!(decode_zero, Zero);
decoder!(decode_finish, Finish);
decoder!(decode_abort, Abort);
decoder!(decode_tally, Tally);
decoder!(decode_done, Done);
decoder!(decode_failed, Failed);

macro_rules! decoder_target {
    ($name:ident, $ty:ident) => {
        Target {
            name: stringify!($name),
            check: $name,
            seeds: || payloads(Ty::$ty),
        }
    };
}

/// Every target, in the order `fuzz/run.sh` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame_stream",
        check: frame_stream,
        seeds: stream_seeds,
    },
    decoder_target!(decode_hello, Hello),
    decoder_target!(decode_reply, Reply),
    decoder_target!(decode_go, Go),
    decoder_target!(decode_digests, Digests),
    decoder_target!(decode_verify, Verify),
    decoder_target!(decode_finding, Finding),
    decoder_target!(decode_pieces, Pieces),
    decoder_target!(decode_refine, Refine),
    decoder_target!(decode_check, Check),
    decoder_target!(decode_write, Write),
    decoder_target!(decode_zero, Zero),
    decoder_target!(decode_finish, Finish),
    decoder_target!(decode_abort, Abort),
    decoder_target!(decode_tally, Tally),
    decoder_target!(decode_done, Done),
    decoder_target!(decode_failed, Failed),
    Target {
        name: "unpack",
        check: unpack,
        seeds: unpack_seeds,
    },
    Target {
        name: "handshake_server",
        check: handshake_server,
        seeds: server_seeds,
    },
    Target {
        name: "handshake_client",
        check: handshake_client,
        seeds: client_seeds,
    },
];

// ---------------------------------------------------------------------------------------
// A mutation fuzzer for runs without libFuzzer (CI): not coverage-guided, but seeded with
// valid frames and biased to the edits that matter for a framed protocol.

/// A small deterministic generator (xorshift64), so any failure reproduces from its seed.
pub struct Rng(u64);

impl Rng {
    /// Seeded; any seed works.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.bits() % n as u64) as usize
    }
}

/// Length and count values at the edges of what decoders accept.
fn edge_u32(rng: &mut Rng, near: usize) -> u32 {
    let edges = [
        0,
        1,
        5,
        MAX_TEXT,
        MAX_TEXT + 1,
        MAX_DIGESTS,
        MAX_DIGESTS + 1,
        MAX_FRAME,
        MAX_FRAME + 1,
        u32::MAX as usize,
        near.saturating_sub(1),
        near + 1,
    ];
    edges[rng.below(edges.len())] as u32
}

/// Offsets, sizes and block sizes at the edges of what decoders and the link accept.
fn edge_u64(rng: &mut Rng) -> u64 {
    let edges = [
        0,
        1,
        MIN_BLOCK - 1,
        MIN_BLOCK,
        MAX_BLOCK,
        MAX_BLOCK + 1,
        1 << 20,
        i64::MAX as u64,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
        rng.bits(),
    ];
    edges[rng.below(edges.len())]
}

/// Applies one to four random edits to `input`: bit flips, byte changes, truncation,
/// insertion and deletion, length and number fields set to edge values, splices from
/// `pool` and repeated ranges.
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let n = input.len();
        let at = if n == 0 { 0 } else { rng.below(n) };
        match rng.below(10) {
            0 if n > 0 => input[at] ^= 1 << rng.below(8),
            1 if n > 0 => input[at] = [0, 1, 2, 0x7f, 0x80, 0xff, rng.bits() as u8][rng.below(7)],
            2 => input.truncate(at),
            3 => {
                for _ in 0..1 + rng.below(16) {
                    input.insert(at, rng.bits() as u8);
                }
            }
            4 if n > 0 => {
                let end = (at + 1 + rng.below(16)).min(n);
                input.drain(at..end);
            }
            5 if n >= 4 => {
                let at = rng.below(n - 3);
                let v = edge_u32(rng, n - at);
                input[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
            6 if n >= 8 => {
                let at = rng.below(n - 7);
                let v = edge_u64(rng);
                input[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            7 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let to = from + rng.below(other.len() - from) + 1;
                    let cut = (at + rng.below(n - at + 1)).min(n);
                    input.splice(at..cut, other[from..to].iter().copied());
                }
            }
            8 if n > 0 => {
                let end = (at + 1 + rng.below(64)).min(n);
                let piece = input[at..end].to_vec();
                input.splice(end..end, piece);
            }
            _ => {
                let extra: Vec<u8> = (0..rng.below(32)).map(|_| rng.bits() as u8).collect();
                input.extend(extra);
            }
        }
    }
}

/// Runs `target` on its seeds and `iterations` mutated inputs (one in eight starts from
/// random bytes instead of a seed); returns the executions. On a failing input, panics
/// with the target, the input in hex, and the failure.
pub fn mutation_run(target: &Target, iterations: u64, seed: u64) -> u64 {
    let seeds = (target.seeds)();
    let mut rng = Rng::new(seed);
    let mut runs = 0;
    let mut run = |input: &[u8]| {
        if let Err(e) = std::panic::catch_unwind(|| (target.check)(input)) {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            panic!("{} failed on input {hex}: {why}", target.name);
        }
        runs += 1;
    };
    for s in &seeds {
        run(s);
    }
    for _ in 0..iterations {
        let mut input = if rng.below(8) == 0 || seeds.is_empty() {
            (0..rng.below(64)).map(|_| rng.bits() as u8).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        mutate(&mut rng, &mut input, &seeds);
        run(&input);
    }
    runs
}
