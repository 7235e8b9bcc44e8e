//! A hostile or broken client against the real server (`blocksync --server` on pipes, as
//! ssh runs it): random bytes, truncated conversations, lying length prefixes, a wrong
//! magic or version, and a valid handshake followed by garbage. Every time the server
//! must exit non-zero within seconds, without a panic, and leave the destination named
//! in the Hello as it was (or, for a conversation cut after whole blocks arrived, with
//! at most those blocks written). The fake peer is tests/common/fakepeer.rs; the
//! server runs with `XDG_STATE_HOME` in the test's temp dir, so these tests never write
//! into the real home. Tracked pushes, floods and unasked answers are in
//! tests/hostile_conversations.rs.

mod common;

use blocksync::error::Kind;
use blocksync::testing::{
    BlockInfo, Counts, Frame, GREETING, Go, HashKind, MAX_FRAME, Role, ToDest, ToSource, VERSION,
    read_frame, write_raw_frame,
};
use common::fakepeer::*;

#[test]
fn random_bytes_are_refused() {
    let scene = Scene::new();
    for (seed, len) in [(0, 0), (1, 1), (2, 3), (3, 4), (4, 5), (5, 64), (6, 4096)] {
        let what = format!("{len} random bytes");
        let ended = scene.serve(&noise(seed, len));
        assert_refused(&ended, &what);
        scene.assert_unchanged(&what);
    }
}

#[test]
fn lying_length_prefixes_are_refused() {
    let scene = Scene::new();
    let hello = wire(&[Frame::Hello(scene.hello(Role::Dest))]);
    for (len, what) in [
        (0u32, "a zero length"),
        (MAX_FRAME as u32 + 1, "a length over the frame bound"),
        (u32::MAX, "a length of 4 GiB"),
        (
            MAX_FRAME as u32,
            "a 64 MiB frame that ends after its header",
        ),
        (hello.len() as u32, "a hello longer than its bytes"),
    ] {
        let mut input = len.to_le_bytes().to_vec();
        input.extend_from_slice(&hello[4..]);
        let ended = scene.serve(&input);
        assert_refused(&ended, what);
        scene.assert_unchanged(what);
    }
}

#[test]
fn a_wrong_magic_or_version_is_refused_with_a_reason() {
    let scene = Scene::new();
    let (t, good) = Frame::Hello(scene.hello(Role::Dest)).encode();
    // The payload starts with the magic (8 bytes) and the version (2).
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for version in [0, 1, VERSION - 1, VERSION + 1, u16::MAX] {
        let mut p = good.clone();
        p[8..10].copy_from_slice(&version.to_le_bytes());
        cases.push((format!("protocol version {version}"), p));
    }
    let mut p = good.clone();
    p[..8].copy_from_slice(b"RSYNC\0\0\x01");
    cases.push(("another magic".into(), p));
    let mut p = good.clone();
    p[7] ^= 0xff;
    cases.push(("the greeting's version byte changed".into(), p));
    for (what, payload) in cases {
        let mut input = Vec::new();
        write_raw_frame(&mut input, t, &payload).unwrap();
        let ended = scene.serve(&input);
        assert_refused(&ended, &what);
        assert_eq!(ended.code, Kind::Protocol.exit_code(), "{what}");
        // The client hears why, as a Failed frame after the greeting.
        let mut r = &ended.stdout[GREETING.len()..];
        let (frame, _) = read_frame(&mut r, &mut Vec::new()).expect("a Failed frame");
        let Frame::Source(ToSource::Failed { kind, message }) = frame else {
            panic!("{what}: answered with {frame:?}")
        };
        assert_eq!(kind, Kind::Protocol, "{what}: {message}");
        if what.starts_with("protocol version") {
            assert!(message.contains("protocol"), "{what}: {message}");
        }
        scene.assert_unchanged(&what);
    }
}

#[test]
fn the_valid_conversation_these_tests_cut_succeeds() {
    // Guards the tests below: what they cut and corrupt is a push the server accepts.
    let scene = Scene::new();
    let push = valid_push(&scene);
    let ended = scene.serve(&push.input);
    assert_eq!(ended.code, 0, "{}", ended.stderr);
    let mut expect = scene.before.clone();
    for (_, offset, bytes) in &push.changes {
        let at = *offset as usize;
        expect[at..at + bytes.len()].copy_from_slice(bytes);
    }
    expect.truncate(SOURCE_SIZE as usize);
    assert!(std::fs::read(&scene.dest).unwrap() == expect);
}

#[test]
fn truncated_conversations_are_refused() {
    let probe = Scene::new();
    let push = valid_push(&probe);
    let full = push.input.len();
    // Every cut in the handshake and a little past it, then a spread through the blocks,
    // and the last bytes.
    let handshake = wire(&[Frame::Hello(probe.hello(Role::Dest)), go(SOURCE_SIZE)]).len();
    let mut cuts: Vec<usize> = (0..handshake + 24).collect();
    cuts.extend((handshake..full).step_by(97));
    cuts.extend(full - 8..full);
    for &(end, _, _) in &push.changes {
        cuts.extend([end - 1, end, end + 1]);
    }
    cuts.sort_unstable();
    cuts.dedup();
    for cut in cuts.into_iter().filter(|&c| c < full) {
        let scene = Scene::new();
        let what = format!("the push cut at byte {cut} of {full}");
        let ended = scene.serve(&push.input[..cut]);
        assert_refused(&ended, &what);
        // Blocks that arrived whole may have been written (an interrupted sync is
        // completed by running it again); nothing else, and no resize without a Finish.
        let now = std::fs::read(&scene.dest).unwrap();
        assert_eq!(now.len(), DEST_SIZE, "{what}: the size changed");
        let mut expect_old = scene.before.clone();
        for (end, offset, bytes) in &push.changes {
            let r = *offset as usize..*offset as usize + bytes.len();
            let (old, new) = (&scene.before[r.clone()], &now[r.clone()]);
            assert!(
                new == old || (*end <= cut && new == &bytes[..]),
                "{what}: bytes {r:?} are neither old nor the block sent"
            );
            expect_old[r.clone()].copy_from_slice(new);
        }
        assert!(
            expect_old == now,
            "{what}: bytes changed outside the blocks sent"
        );
    }
}

#[test]
fn garbage_after_a_valid_push_handshake_is_refused() {
    let scene = Scene::new();
    let hello = scene.hello(Role::Dest);
    let handshake = wire(&[Frame::Hello(hello.clone()), go(SOURCE_SIZE)]);
    for (what, garbage) in garbage_frames(&hello) {
        let mut input = handshake.clone();
        input.extend(&garbage);
        let what = format!("push, then {what}");
        let ended = scene.serve(&input);
        assert_refused(&ended, &what);
        scene.assert_unchanged(&what);
    }
}

#[test]
fn garbage_after_a_valid_pull_handshake_is_refused() {
    // The server is the source: its file must stay as it is, and the client's answers
    // (digests, piece digests) are what can lie.
    let scene = Scene::new();
    let hello = scene.hello(Role::Source);
    let size = DEST_SIZE as u64;
    let handshake = wire(&[Frame::Hello(hello.clone()), go(size)]);
    let mut cases = garbage_frames(&hello);
    let digest = BlockInfo::Digest(HashKind::Blake3.block_digest(b"x"));
    for (what, f) in [
        (
            "digests of a chunk past the end",
            Frame::Source(ToSource::Digests {
                index: u64::MAX,
                blocks: vec![digest],
            }),
        ),
        (
            "more digests than the chunk has blocks",
            Frame::Source(ToSource::Digests {
                index: 0,
                blocks: vec![BlockInfo::Zero; 8192],
            }),
        ),
        (
            "piece digests nobody asked for",
            Frame::Source(ToSource::Pieces {
                offset: u64::MAX - 1,
                pieces: vec![digest; 16],
            }),
        ),
        (
            "verify digests outside a verify pass",
            Frame::Source(ToSource::Verify {
                index: 0,
                blocks: vec![digest],
            }),
        ),
        (
            "a Finish (the wrong direction)",
            Frame::Dest(ToDest::Finish {
                size,
                counts: Counts::default(),
            }),
        ),
    ] {
        cases.push((what.into(), wire(&[f])));
    }
    for (what, garbage) in cases {
        let mut input = handshake.clone();
        input.extend(&garbage);
        let what = format!("pull, then {what}");
        let ended = scene.serve(&input);
        // The source may finish on its own before it reads the garbage only if it sent
        // every block and heard Done; neither happens here.
        assert_refused(&ended, &what);
        scene.assert_unchanged(&what);
    }
}

#[test]
fn a_go_the_server_cannot_honor_is_refused() {
    let scene = Scene::new();
    let hello = scene.hello(Role::Dest);
    for (what, g) in [
        (
            "a range past the size",
            Go {
                proceed: true,
                size: 10,
                start: 0,
                end: 11,
                sync_id: [0; 16],
                no_read: false,
            },
        ),
        (
            "a range that ends before it starts",
            Go {
                proceed: true,
                size: SOURCE_SIZE,
                start: 2 * BLOCK,
                end: BLOCK,
                sync_id: [0; 16],
                no_read: false,
            },
        ),
        (
            "a size no file can have",
            Go {
                proceed: true,
                size: u64::MAX,
                start: 0,
                end: u64::MAX,
                sync_id: [7; 16],
                no_read: true,
            },
        ),
    ] {
        let mut input = wire(&[Frame::Hello(hello.clone())]);
        let (t, p) = Frame::Go(g).encode();
        write_raw_frame(&mut input, t, &p).unwrap();
        let ended = scene.serve(&input);
        assert_refused(&ended, what);
        scene.assert_unchanged(what);
    }
}

#[test]
fn an_odd_but_decodable_go_then_a_lost_client_ends_quickly() {
    // Ranges the decoder lets through but no client sends: the largest size a file can
    // have (the destination half would report digests for 2^41 chunks), a range that is
    // not on chunk boundaries, an empty range. The client then leaves; the server must
    // notice and stop instead of working through the range.
    let scene = Scene::new();
    let max = i64::MAX as u64;
    for role in [Role::Dest, Role::Source] {
        // A source server checks the size against its file first.
        let full = match role {
            Role::Dest => SOURCE_SIZE,
            _ => DEST_SIZE as u64,
        };
        for (what, g) in [
            ("the largest size", (max, 0, max)),
            ("a range ending at the largest size", (max, max - 4096, max)),
            ("a range off chunk boundaries", (full, 1, full - 1)),
            ("an empty range", (full, 4096, 4096)),
        ] {
            let (size, start, end) = g;
            let go = Frame::Go(Go {
                proceed: true,
                size,
                start,
                end,
                sync_id: [0; 16],
                no_read: false,
            });
            let what = format!("{role:?} server, {what}");
            for tail in [vec![], noise(3, 64)] {
                let mut input = wire(&[Frame::Hello(scene.hello(role)), go.clone()]);
                input.extend(&tail);
                let ended = scene.serve(&input);
                assert_refused(&ended, &what);
                scene.assert_unchanged(&what);
            }
        }
    }
}
