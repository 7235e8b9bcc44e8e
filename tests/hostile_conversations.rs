//! A hostile or broken client against the real server, in conversations that decode:
//! `--digest-file` pushes (the destination's sync-id record must never vouch for a
//! destination a cut or garbled push may have changed), a flood of questions whose
//! answers are never read (bounded memory, a protocol error) and answers nobody asked
//! for. The fake peer is tests/common/fakepeer.rs; the server keeps its sync-id records
//! in the test's temp dir (`XDG_STATE_HOME`), never in the real home. Malformed frames
//! are in tests/hostile_frames.rs.

mod common;

use blocksync::error::Kind;
use blocksync::testing::{BlockInfo, Frame, Go, HashKind, Role, ToDest, ToSource, write_frame};
use common::bin;
use common::fakepeer::*;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
