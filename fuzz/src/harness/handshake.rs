//! The handshake targets: what the server makes of a client's bytes and a client of the
//! server's, through the link's stream readers, which must hand the engine only
//! messages inside the range the Go named.

use super::heap::*;
use blocksync::testing as server;
use blocksync::testing::{
    self as link, FLAG_TRACK_ID, FLAG_VERIFY, Frame, GREETING, Layout, MAX_BLOCK, MAX_DIGESTS,
    MAX_FRAME, MAX_TEXT, Peer, Role, Stats, ToDest, ToSource, read_frame,
};

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
        // These servers send one answer after the go: nothing more to decode.
        Role::Rollback | Role::Versions | Role::Restore => {}
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
