//! A fake peer for `blocksync --server`: runs the real server on pipes (as ssh runs it)
//! with its sync-id records in a temp dir, feeds it hand-made frames, and reads what it
//! answers. Shared by the hostile-client tests (tests/hostile_frames.rs and
//! tests/hostile_conversations.rs); unused by the other test files, hence the
//! `dead_code` allowance on `common`.

use super::{bin, data};
use blocksync::testing::{
    BlockInfo, Counts, Data, FLAG_NO_READ, FLAG_TRACK_ID, Frame, GREETING, Go, HashKind, Hello,
    MAX_FRAME, Reply, Role, RunPart, Slice, ToDest, ToSource, read_frame, write_frame,
    write_raw_frame,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const K: usize = 1024;
/// The destination file's size; the "source" in these conversations is smaller, so a
/// Finish the server should never have acted on would show as a cut file.
pub const DEST_SIZE: usize = 256 * K;
pub const SOURCE_SIZE: u64 = 192 * K as u64;
pub const BLOCK: u64 = 4096;
/// A server that needs longer than this on a few KiB of input hangs.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// How one server run ended.
pub struct Ended {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs `blocksync --server` in `dir` (its sync-id records in `dir/state`), writes
/// `input` to its stdin and closes it, reads everything it writes (a peer that stops
/// reading would block it on a full pipe, which is not what is tested here), and returns
/// how it ended. Fails the test on a hang or a death by signal.
pub fn serve(input: &[u8], dir: &Path) -> Ended {
    serve_with(input, dir, false)
}

/// [`serve`], with `keep_open`: the input stays open after `input` until the server has
/// written its last frame (a peer that is still there but says nothing more, so no end
/// of input races what the server makes of the frames before it).
pub fn serve_with(input: &[u8], dir: &Path, keep_open: bool) -> Ended {
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
pub fn has_last_frame(out: &[u8]) -> bool {
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

pub fn input_len(writer: &std::thread::JoinHandle<()>) -> &'static str {
    if writer.is_finished() {
        "all its"
    } else {
        "(still writing)"
    }
}

/// The server refused: a non-zero exit, no panic, and the greeting then at most a
/// Failed frame on stdout (never a Done).
pub fn assert_refused(ended: &Ended, what: &str) {
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
pub struct Scene {
    pub dir: tempfile::TempDir,
    pub dest: PathBuf,
    pub before: Vec<u8>,
}

impl Scene {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("dest.img");
        let before = data(DEST_SIZE, 7);
        std::fs::write(&dest, &before).unwrap();
        Scene { dir, dest, before }
    }

    pub fn hello(&self, role: Role) -> Hello {
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
            source_mode: 0o600,
            run: RunPart {
                streams: 1,
                ..Default::default()
            },
        }
    }

    pub fn serve(&self, input: &[u8]) -> Ended {
        serve(input, self.dir.path())
    }

    pub fn assert_unchanged(&self, what: &str) {
        let now = std::fs::read(&self.dest).unwrap();
        assert_eq!(now.len(), self.before.len(), "{what}: the size changed");
        assert!(now == self.before, "{what}: the destination changed");
    }
}

pub fn wire(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        write_frame(&mut out, f).unwrap();
    }
    out
}

pub fn go(size: u64) -> Frame {
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
pub fn answers(ended: &Ended) -> Vec<Frame> {
    let mut r = &ended.stdout[GREETING.len()..];
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    while let Ok((frame, _)) = read_frame(&mut r, &mut buf) {
        frames.push(frame);
    }
    frames
}

/// Bytes that are no frame: a deterministic mix of lengths.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    data(len, 1000 + seed)
}

/// A valid push of three changes (two blocks, one zero range) and a Finish.
pub struct Push {
    pub input: Vec<u8>,
    /// Where each change's frame ends in `input`, its offset and its new bytes.
    pub changes: Vec<(usize, u64, Vec<u8>)>,
}

pub fn valid_push(scene: &Scene) -> Push {
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

/// Frames a client must not send after a valid handshake, each with what it is: ranges
/// outside the file, frames out of place, then bytes that are no valid frame.
pub fn garbage_frames(hello: &Hello) -> Vec<(String, Vec<u8>)> {
    let mut cases = out_of_range_frames();
    cases.extend(out_of_place_frames(hello));
    cases.extend(malformed_frames());
    cases
}

/// Writes, zero ranges, refinements, spot-checks and a Finish outside what the Go named.
fn out_of_range_frames() -> Vec<(String, Vec<u8>)> {
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
    cases
}

/// Well-formed frames a destination never gets at this point of a conversation.
fn out_of_place_frames(hello: &Hello) -> Vec<(String, Vec<u8>)> {
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let mut frame = |what: &str, f: Frame| cases.push((what.into(), wire(&[f])));
    frame("a second hello", Frame::Hello(hello.clone()));
    frame(
        "a reply",
        Frame::Reply(Reply {
            size: 1,
            kind: 1,
            sync_id: [0; 16],
            mode: 0o644,
            journal: 0,
            data: 0,
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
            journaled: 0,
        }),
    );
    cases
}

/// Bytes that do not decode: corrupt blocks, unknown types, lying length prefixes, noise.
fn malformed_frames() -> Vec<(String, Vec<u8>)> {
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
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

/// The sync-id records the server left in the scene's state directory: (name, bytes).
pub fn records(scene: &Scene) -> Vec<(String, Vec<u8>)> {
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

pub const OLD_ID: [u8; 16] = [0x11; 16];
pub const NEW_ID: [u8; 16] = *b"another sync id!";

impl Scene {
    /// A push with `--digest-file`: the id tracked, the destination not reading itself.
    pub fn tracked_hello(&self) -> Hello {
        Hello {
            flags: FLAG_TRACK_ID | FLAG_NO_READ,
            ..self.hello(Role::Dest)
        }
    }

    /// What the server replies to a tracked Hello (the client then says no): the id the
    /// destination has on record.
    pub fn recorded_id(&self) -> [u8; 16] {
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

pub fn tracked_go(id: [u8; 16]) -> Frame {
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
pub fn tracked_push(scene: &Scene, id: [u8; 16]) -> (Vec<u8>, usize) {
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

/// A destination that a tracked sync may have written to has no id on record, or the id
/// of that sync (recorded once what arrived is flushed, even when the sync stopped: the
/// client's new digest file lists every block it sent as missing until the whole sync is
/// confirmed, see `engine::cache`); never an older id.
pub fn assert_no_stale_id(scene: &Scene, what: &str) {
    let id = scene.recorded_id();
    assert!(
        id == [0; 16] || id == NEW_ID,
        "{what}: the destination vouches for {id:?}"
    );
    for (name, bytes) in records(scene) {
        assert_eq!(bytes, NEW_ID, "{what}: record {name}");
    }
}

/// A field of /proc/PID/status (e.g. "VmHWM" in kB, "Threads"); `None` once it is gone.
pub fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
