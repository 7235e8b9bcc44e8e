//! A hostile or broken client against the real server (`blocksync --server` on pipes, as
//! ssh runs it): random bytes, truncated conversations, lying length prefixes, a wrong
//! magic or version, and a valid handshake followed by garbage. Every time the server
//! must exit non-zero within seconds, without a panic, and leave the destination named
//! in the Hello as it was (or, for a conversation cut after whole blocks arrived, with
//! at most those blocks written). The server runs with `XDG_STATE_HOME` in the test's
//! temp dir, where a destination keeps its sync-id record (`--digest-file` pushes), so
//! these tests never write into the real home.

mod common;

use blocksync::error::Kind;
use blocksync::testing::{
    BlockInfo, Counts, Data, FLAG_NO_READ, FLAG_TRACK_ID, Frame, GREETING, Go, HashKind, Hello,
    MAX_FRAME, Reply, Role, Slice, ToDest, ToSource, VERSION, read_frame, write_frame,
    write_raw_frame,
};
use common::{bin, data};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const K: usize = 1024;
/// The destination file's size; the "source" in these conversations is smaller, so a
/// Finish the server should never have acted on would show as a cut file.
const DEST_SIZE: usize = 256 * K;
const SOURCE_SIZE: u64 = 192 * K as u64;
const BLOCK: u64 = 4096;
/// A server that needs longer than this on a few KiB of input hangs.
const DEADLINE: Duration = Duration::from_secs(10);

/// How one server run ended.
struct Ended {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs `blocksync --server` in `dir` (its sync-id records in `dir/state`), writes
/// `input` to its stdin and closes it, reads everything it writes (a peer that stops
/// reading would block it on a full pipe, which is not what is tested here), and returns
/// how it ended. Fails the test on a hang or a death by signal.
fn serve(input: &[u8], dir: &Path) -> Ended {
    serve_with(input, dir, false)
}

/// [`serve`], with `keep_open`: the input stays open after `input` until the server has
/// written its last frame (a peer that is still there but says nothing more, so no end
/// of input races what the server makes of the frames before it).
fn serve_with(input: &[u8], dir: &Path, keep_open: bool) -> Ended {
    let (said_all, until_said) = std::sync::mpsc::channel::<()>();
    let mut child = Command::new(bin())
        .arg("--server")
        .current_dir(dir)
        .env("XDG_STATE_HOME", dir.join("state"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start blocksync --server");
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    // The server may stop reading at the first bad frame: a failed write is expected.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
        if keep_open {
            let _ = until_said.recv();
        }
    });
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut chunk = [0u8; 64 * K];
        let mut said_all = Some(said_all);
        while let Ok(n @ 1..) = stdout.read(&mut chunk) {
            out.extend_from_slice(&chunk[..n]);
            if said_all.is_some() && has_last_frame(&out) {
                said_all = None; // dropped: the input closes
            }
        }
        out
    });
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stderr.read_to_string(&mut out);
        out
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server hung for {DEADLINE:?} on {} bytes of input: {}",
                input_len(&writer),
                err_reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    let stdout = reader.join().expect("stdout reader");
    let stderr = err_reader.join().expect("stderr reader");
    let code = status
        .code()
        .unwrap_or_else(|| panic!("the server died by a signal ({status}): {stderr}"));
    Ended {
        code,
        stdout,
        stderr,
    }
}

/// Whether the server's output so far holds a frame that ends a conversation.
fn has_last_frame(out: &[u8]) -> bool {
    let Some(mut r) = out.strip_prefix(&GREETING[..]) else {
        return false;
    };
    let mut buf = Vec::new();
    while let Ok((frame, _)) = read_frame(&mut r, &mut buf) {
        if matches!(
            frame,
            Frame::Dest(ToDest::Abort { .. })
                | Frame::Source(ToSource::Failed { .. })
                | Frame::Source(ToSource::Done { .. })
        ) {
            return true;
        }
    }
    false
}

fn input_len(writer: &std::thread::JoinHandle<()>) -> &'static str {
    if writer.is_finished() {
        "all its"
    } else {
        "(still writing)"
    }
}

/// The server refused: a non-zero exit, no panic, and the greeting then at most a
/// Failed frame on stdout (never a Done).
fn assert_refused(ended: &Ended, what: &str) {
    assert_ne!(ended.code, 0, "{what}: the server accepted it");
    assert!(
        !ended.stderr.contains("panicked"),
        "{what}: the server panicked: {}",
        ended.stderr
    );
    assert!(
        ended.stdout.starts_with(GREETING),
        "{what}: no greeting first"
    );
    let mut r = &ended.stdout[GREETING.len()..];
    let mut buf = Vec::new();
    let mut reason = String::new();
    while let Ok((frame, _)) = read_frame(&mut r, &mut buf) {
        assert!(
            !matches!(frame, Frame::Source(ToSource::Done { .. })),
            "{what}: the server confirmed a sync"
        );
        if let Frame::Source(ToSource::Failed { message, .. }) = frame {
            reason = message;
        }
    }
    // Shown with --nocapture: what the client would have been told.
    eprintln!("{what}: exit {}: {reason}", ended.code);
}

/// A temp dir with a destination file of known contents.
struct Scene {
    dir: tempfile::TempDir,
    dest: PathBuf,
    before: Vec<u8>,
}

impl Scene {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("dest.img");
        let before = data(DEST_SIZE, 7);
        std::fs::write(&dest, &before).unwrap();
        Scene { dir, dest, before }
    }

    fn hello(&self, role: Role) -> Hello {
        Hello {
            role,
            path: self.dest.to_str().unwrap().into(),
            block: BLOCK,
            hash: HashKind::Blake3,
            compress: 1,
            flags: 0,
            pause_ms: 0,
            source_size: SOURCE_SIZE,
            bwlimit: 0,
            refine: 0,
            max_errors: u64::MAX,
        }
    }

    fn serve(&self, input: &[u8]) -> Ended {
        serve(input, self.dir.path())
    }

    fn assert_unchanged(&self, what: &str) {
        let now = std::fs::read(&self.dest).unwrap();
        assert_eq!(now.len(), self.before.len(), "{what}: the size changed");
        assert!(now == self.before, "{what}: the destination changed");
    }
}

fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        write_frame(&mut out, f).unwrap();
    }
    out
}

fn go(size: u64) -> Frame {
    Frame::Go(Go {
        proceed: true,
        size,
        start: 0,
        end: size,
        sync_id: [0; 16],
        no_read: false,
    })
}

/// The frames after the greeting in what the server wrote.
fn answers(ended: &Ended) -> Vec<Frame> {
    let mut r = &ended.stdout[GREETING.len()..];
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    while let Ok((frame, _)) = read_frame(&mut r, &mut buf) {
        frames.push(frame);
    }
    frames
}

/// Bytes that are no frame: a deterministic mix of lengths.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    data(len, 1000 + seed)
}

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

/// A valid push of three changes (two blocks, one zero range) and a Finish.
struct Push {
    input: Vec<u8>,
    /// Where each change's frame ends in `input`, its offset and its new bytes.
    changes: Vec<(usize, u64, Vec<u8>)>,
}

fn valid_push(scene: &Scene) -> Push {
    let mut input = wire(&[Frame::Hello(scene.hello(Role::Dest)), go(SOURCE_SIZE)]);
    let mut changes = Vec::new();
    let raw = data(BLOCK as usize, 70);
    let packed = vec![0x5a; BLOCK as usize];
    for (offset, frame, bytes) in [
        (
            0,
            Frame::Dest(ToDest::Write {
                offset: 0,
                data: Data::Raw(Slice::owned(raw.clone())),
            }),
            raw,
        ),
        (
            8 * BLOCK,
            Frame::Dest(ToDest::Write {
                offset: 8 * BLOCK,
                data: Data::pack(&Slice::owned(packed.clone()), 1),
            }),
            packed,
        ),
        (
            16 * BLOCK,
            Frame::Dest(ToDest::Zero {
                offset: 16 * BLOCK,
                len: BLOCK,
            }),
            vec![0; BLOCK as usize],
        ),
    ] {
        write_frame(&mut input, &frame).unwrap();
        changes.push((input.len(), offset, bytes));
    }
    write_frame(
        &mut input,
        &Frame::Dest(ToDest::Finish {
            size: SOURCE_SIZE,
            counts: Counts::default(),
        }),
    )
    .unwrap();
    Push { input, changes }
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

/// Frames a client must not send after a valid handshake, each with what it is.
fn garbage_frames(hello: &Hello) -> Vec<(String, Vec<u8>)> {
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let mut frame = |what: &str, f: Frame| cases.push((what.into(), wire(&[f])));
    frame(
        "a block past the end",
        Frame::Dest(ToDest::Write {
            offset: SOURCE_SIZE,
            data: Data::Raw(Slice::owned(vec![1; 512])),
        }),
    );
    frame(
        "a block across the end",
        Frame::Dest(ToDest::Write {
            offset: SOURCE_SIZE - 100,
            data: Data::Raw(Slice::owned(vec![1; 512])),
        }),
    );
    frame(
        "a block at the last offset",
        Frame::Dest(ToDest::Write {
            offset: u64::MAX,
            data: Data::Raw(Slice::owned(vec![1; 2])),
        }),
    );
    frame(
        "a zero range past the end",
        Frame::Dest(ToDest::Zero {
            offset: 0,
            len: SOURCE_SIZE + 1,
        }),
    );
    frame(
        "a refine past the end",
        Frame::Dest(ToDest::Refine {
            offset: SOURCE_SIZE,
            len: BLOCK,
        }),
    );
    frame(
        "a Finish of another size",
        Frame::Dest(ToDest::Finish {
            size: SOURCE_SIZE + 1,
            counts: Counts::default(),
        }),
    );
    frame(
        "a spot-check past the end",
        Frame::Dest(ToDest::Check {
            offset: SOURCE_SIZE,
            len: BLOCK,
        }),
    );
    frame(
        "a spot-check across the end",
        Frame::Dest(ToDest::Check {
            offset: SOURCE_SIZE - 100,
            len: BLOCK,
        }),
    );
    frame(
        "a spot-check of nothing",
        Frame::Dest(ToDest::Check { offset: 0, len: 0 }),
    );
    frame(
        "a spot-check longer than a block",
        Frame::Dest(ToDest::Check {
            offset: 0,
            len: 2 * BLOCK,
        }),
    );
    frame("a second hello", Frame::Hello(hello.clone()));
    frame(
        "a reply",
        Frame::Reply(Reply {
            size: 1,
            kind: 1,
            sync_id: [0; 16],
        }),
    );
    frame("a second go", go(SOURCE_SIZE));
    frame(
        "a Digests frame",
        Frame::Source(ToSource::Digests {
            index: 0,
            blocks: vec![BlockInfo::Zero],
        }),
    );
    frame(
        "a Done frame",
        Frame::Source(ToSource::Done {
            written: 0,
            read: 0,
        }),
    );
    // A zstd block whose bytes are not zstd, and one that claims more than it holds.
    let mut bad = wire(&[Frame::Dest(ToDest::Write {
        offset: 0,
        data: Data::pack(&Slice::owned(vec![0; BLOCK as usize]), 1),
    })]);
    let n = bad.len();
    bad[n - 6..].fill(0xee);
    cases.push(("a corrupt zstd block".into(), bad));
    let mut long = wire(&[Frame::Dest(ToDest::Write {
        offset: 0,
        data: Data::pack(&Slice::owned(vec![0; BLOCK as usize]), 1),
    })]);
    // Length prefix (4), type (1), offset (8), codec (1), then the stated size.
    long[14..18].copy_from_slice(&(BLOCK as u32 + 1).to_le_bytes());
    cases.push(("a zstd block shorter than stated".into(), long));
    let mut unknown = Vec::new();
    write_raw_frame(&mut unknown, 99, &[1, 2, 3]).unwrap();
    cases.push(("an unknown frame type".into(), unknown));
    cases.push(("a zero length prefix".into(), vec![0; 4]));
    cases.push((
        "a 4 GiB length prefix".into(),
        u32::MAX.to_le_bytes().to_vec(),
    ));
    let mut lying = (MAX_FRAME as u32).to_le_bytes().to_vec();
    lying.extend(noise(9, 100));
    cases.push(("a 64 MiB frame that ends early".into(), lying));
    for seed in 0..4 {
        cases.push((format!("random bytes ({seed})"), noise(seed, 2000)));
    }
    cases
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
            Role::Source => DEST_SIZE as u64,
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

/// The sync-id records the server left in the scene's state directory: (name, bytes).
fn records(scene: &Scene) -> Vec<(String, Vec<u8>)> {
    let dir = scene.dir.path().join("state/blocksync/sync-ids");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            // A record is the id, then what identifies the target's state.
            let mut bytes = std::fs::read(e.path()).unwrap();
            bytes.truncate(16);
            (name, bytes)
        })
        .collect();
    out.sort();
    out
}

const OLD_ID: [u8; 16] = [0x11; 16];
const NEW_ID: [u8; 16] = *b"another sync id!";

impl Scene {
    /// A push with `--digest-file`: the id tracked, the destination not reading itself.
    fn tracked_hello(&self) -> Hello {
        Hello {
            flags: FLAG_TRACK_ID | FLAG_NO_READ,
            ..self.hello(Role::Dest)
        }
    }

    /// What the server replies to a tracked Hello (the client then says no): the id the
    /// destination has on record.
    fn recorded_id(&self) -> [u8; 16] {
        let mut input = wire(&[Frame::Hello(self.tracked_hello())]);
        let stop = Go {
            proceed: false,
            size: 0,
            start: 0,
            end: 0,
            sync_id: [0; 16],
            no_read: false,
        };
        write_frame(&mut input, &Frame::Go(stop)).unwrap();
        let ended = self.serve(&input);
        assert_eq!(ended.code, 0, "{}", ended.stderr);
        match answers(&ended).first() {
            Some(Frame::Reply(r)) => r.sync_id,
            other => panic!("answered a hello with {other:?}"),
        }
    }
}

fn tracked_go(id: [u8; 16]) -> Frame {
    Frame::Go(Go {
        proceed: true,
        size: SOURCE_SIZE,
        start: 0,
        end: SOURCE_SIZE,
        sync_id: id,
        no_read: true,
    })
}

/// A valid `--digest-file` push: two spot-checks, one block, a Finish.
fn tracked_push(scene: &Scene, id: [u8; 16]) -> (Vec<u8>, usize) {
    let mut input = wire(&[
        Frame::Hello(scene.tracked_hello()),
        tracked_go(id),
        Frame::Dest(ToDest::Check {
            offset: 0,
            len: BLOCK,
        }),
        Frame::Dest(ToDest::Check {
            offset: SOURCE_SIZE - BLOCK,
            len: BLOCK,
        }),
        Frame::Dest(ToDest::Write {
            offset: 2 * BLOCK,
            data: Data::Raw(Slice::owned(vec![0x42; BLOCK as usize])),
        }),
    ]);
    let after_block = input.len();
    write_frame(
        &mut input,
        &Frame::Dest(ToDest::Finish {
            size: SOURCE_SIZE,
            counts: Counts::default(),
        }),
    )
    .unwrap();
    (input, after_block)
}

#[test]
fn a_tracked_push_without_reading_answers_spot_checks_and_records_its_id() {
    let scene = Scene::new();
    assert_eq!(
        scene.recorded_id(),
        [0; 16],
        "a fresh destination has no id"
    );
    let (input, _) = tracked_push(&scene, OLD_ID);
    let ended = scene.serve(&input);
    assert_eq!(ended.code, 0, "{}", ended.stderr);
    let frames = answers(&ended);
    let Some(Frame::Reply(reply)) = frames.first() else {
        panic!("no reply first: {frames:?}")
    };
    assert_eq!(
        (reply.size, reply.kind, reply.sync_id),
        (DEST_SIZE as u64, 1, [0; 16])
    );
    // Each spot-check is answered with one entry, the destination's block; the
    // destination sends no digests of its own (it does not read itself).
    let digest = |at: u64| {
        let at = at as usize;
        BlockInfo::Digest(HashKind::Blake3.block_digest(&scene.before[at..at + BLOCK as usize]))
    };
    let pieces: Vec<_> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Source(ToSource::Pieces { offset, pieces }) => Some((*offset, pieces.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        pieces,
        [
            (0, vec![digest(0)]),
            (SOURCE_SIZE - BLOCK, vec![digest(SOURCE_SIZE - BLOCK)])
        ]
    );
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, Frame::Source(ToSource::Digests { .. }))),
        "a no-read destination sent digests: {frames:?}"
    );
    assert!(
        matches!(frames.last(), Some(Frame::Source(ToSource::Done { .. }))),
        "{frames:?}"
    );
    let mut expect = scene.before.clone();
    expect[2 * BLOCK as usize..3 * BLOCK as usize].fill(0x42);
    expect.truncate(SOURCE_SIZE as usize);
    assert!(std::fs::read(&scene.dest).unwrap() == expect);
    // The id is on record, in the state directory the server was given, and reported
    // only to a client that asks for tracking.
    let recs = records(&scene);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].1, OLD_ID);
    assert_eq!(scene.recorded_id(), OLD_ID);
    let mut input = wire(&[Frame::Hello(scene.hello(Role::Dest))]);
    write_frame(
        &mut input,
        &Frame::Go(Go {
            proceed: false,
            size: 0,
            start: 0,
            end: 0,
            sync_id: [0; 16],
            no_read: false,
        }),
    )
    .unwrap();
    let untracked = scene.serve(&input);
    assert!(
        matches!(answers(&untracked).first(), Some(Frame::Reply(r)) if r.sync_id == [0; 16]),
        "an untracked hello was told the id"
    );
}

/// A destination that a tracked sync may have written to has no id on record, or the id
/// of that sync (recorded once what arrived is flushed, even when the sync stopped: the
/// client's new digest file lists every block it sent as missing until the whole sync is
/// confirmed, see `engine::cache`); never an older id.
fn assert_no_stale_id(scene: &Scene, what: &str) {
    let id = scene.recorded_id();
    assert!(
        id == [0; 16] || id == NEW_ID,
        "{what}: the destination vouches for {id:?}"
    );
    for (name, bytes) in records(scene) {
        assert_eq!(bytes, NEW_ID, "{what}: record {name}");
    }
}

#[test]
fn a_tracked_push_cut_short_never_leaves_the_old_id() {
    let scene = Scene::new();
    let (input, _) = tracked_push(&scene, OLD_ID);
    assert_eq!(scene.serve(&input).code, 0);
    assert_eq!(scene.recorded_id(), OLD_ID);
    let (input, after_block) = tracked_push(&scene, NEW_ID);
    let handshake = wire(&[Frame::Hello(scene.tracked_hello()), tracked_go(NEW_ID)]).len();
    for cut in [handshake, after_block, input.len() - 1] {
        let what = format!("the tracked push cut at byte {cut} of {}", input.len());
        let ended = scene.serve(&input[..cut]);
        assert_refused(&ended, &what);
        // The destination may hold some of the new blocks: the old id must not vouch
        // for it.
        assert_no_stale_id(&scene, &what);
    }
}

#[test]
fn garbage_after_a_tracked_no_read_push_handshake_is_refused() {
    let scene = Scene::new();
    let hello = scene.tracked_hello();
    let handshake = wire(&[Frame::Hello(hello.clone()), tracked_go(NEW_ID)]);
    for (what, garbage) in garbage_frames(&hello) {
        let mut input = handshake.clone();
        input.extend(&garbage);
        let what = format!("tracked push, then {what}");
        let ended = scene.serve(&input);
        assert_refused(&ended, &what);
        scene.assert_unchanged(&what);
        assert_no_stale_id(&scene, &what);
    }
}

/// A field of /proc/PID/status (e.g. "VmHWM" in kB, "Threads"); `None` once it is gone.
fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A peer that asks and asks (refinements) but never reads the answers: the server
/// must call that a protocol error once more are open than a blocksync source ever has,
/// instead of queuing answers without end (a flood took a server to 473 MB in 15 s).
#[test]
fn a_flood_of_questions_never_read_is_a_protocol_error_in_bounded_memory() {
    use std::os::fd::AsRawFd;
    const FLOOD: usize = 40_000;
    const BIG_BLOCK: u64 = 64 * K as u64;
    let scene = Scene::new();
    let mut hello = scene.hello(Role::Dest);
    // Each answer is 128 piece digests: what piles up is large.
    (hello.block, hello.refine, hello.source_size) = (BIG_BLOCK, 512, DEST_SIZE as u64);
    let mut input = wire(&[Frame::Hello(hello), go(DEST_SIZE as u64)]);
    for i in 0..FLOOD {
        let offset = (i as u64 % (DEST_SIZE as u64 / BIG_BLOCK)) * BIG_BLOCK;
        let refine = Frame::Dest(ToDest::Refine {
            offset,
            len: BIG_BLOCK,
        });
        write_frame(&mut input, &refine).unwrap();
    }
    let mut child = Command::new(bin())
        .arg("--server")
        .current_dir(scene.dir.path())
        .env("XDG_STATE_HOME", scene.dir.path().join("state"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start blocksync --server");
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped");
    // The whole flood fits in the pipe, so it is all sent whether or not the server
    // reads; its answers stay unread.
    // SAFETY: fcntl on a pipe descriptor we own; no memory is passed.
    let sized = unsafe { libc::fcntl(stdin.as_raw_fd(), libc::F_SETPIPE_SZ, 2 << 20) };
    assert!(sized as usize >= input.len(), "pipe of {sized} bytes");
    stdin.write_all(&input).unwrap();
    let handshake = input.len() - FLOOD * 21;
    let started = Instant::now();
    let waiting = |what: &str| {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = Command::new("kill").arg(pid.to_string()).output();
            panic!("the server never {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // First until it has read more questions than any source keeps open (bytes still in
    // the pipe: FIONREAD on its writing end)...
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int, which `queued` is.
        let ok = unsafe { libc::ioctl(stdin.as_raw_fd(), libc::FIONREAD, &mut queued) };
        assert_eq!(ok, 0, "FIONREAD");
        if input.len() - queued as usize > handshake + 2048 * 21 {
            break;
        }
        waiting("read the flood");
    }
    // ...then, its input ended, until it is done with it (read to the end, or refused):
    // only the main thread and the one sending answers, blocked on the full stdout pipe,
    // are left.
    drop(stdin);
    while proc_status(pid, "Threads").is_some_and(|n| n > 2) {
        waiting("finished with its input");
    }
    let peak = proc_status(pid, "VmHWM").unwrap_or(0);
    // Now read, so the server can say why and exit.
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    let ended = Ended {
        code: status.code().expect("no death by a signal"),
        stdout: reader.join().unwrap(),
        stderr,
    };
    // What the client is told, in the server's last Failed frame.
    let said = answers(&ended).into_iter().rev().find_map(|f| match f {
        Frame::Source(ToSource::Failed { message, .. }) => Some(message),
        _ => None,
    });
    eprintln!("flood: peak RSS {peak} kB, exit {}: {said:?}", ended.code);
    assert_eq!(
        ended.code,
        Kind::Protocol.exit_code(),
        "not a protocol error: {said:?} {}",
        ended.stderr
    );
    assert!(
        said.as_ref().is_some_and(|m| m.contains("without reading")),
        "{said:?}"
    );
    assert!(peak < 64 << 10, "the server grew to {peak} kB");
    scene.assert_unchanged("a flood of questions");
}

/// Piece digests for a block the source never asked about (here it asks about none: no
/// refinement) are a protocol error on the source side.
#[test]
fn answers_never_asked_for_are_a_protocol_error() {
    let scene = Scene::new();
    let hello = scene.hello(Role::Source);
    let digest = BlockInfo::Digest(HashKind::Blake3.block_digest(b"x"));
    let input = wire(&[
        Frame::Hello(hello),
        go(DEST_SIZE as u64),
        Frame::Source(ToSource::Pieces {
            offset: 0,
            pieces: vec![digest],
        }),
    ]);
    let ended = serve_with(&input, scene.dir.path(), true);
    assert_refused(&ended, "unasked pieces");
    assert_eq!(
        ended.code,
        Kind::Protocol.exit_code(),
        "not a protocol error: {}",
        ended.stderr
    );
    let said = answers(&ended).into_iter().find_map(|f| match f {
        Frame::Source(ToSource::Failed { message, .. }) => Some(message),
        _ => None,
    });
    assert!(
        said.as_ref().is_some_and(|m| m.contains("not asked")),
        "{said:?}"
    );
    scene.assert_unchanged("unasked pieces");
}
