//! Server mode (`blocksync --server`): the remote end of an ssh sync. Speaks the protocol
//! on stdin/stdout, runs the source or destination half the client asks for, and makes
//! the same checks as a local run before writing anything.

use super::undo::{Pending, RollbackOptions, Undo, Wanted, rollback_here};
use crate::engine::messages::ToSource;
use crate::engine::{Compare, Config, Layout, RunOptions, Salvage, Stats, VerifyLog};
use crate::error::{Error, Kind, Result};
use crate::io::target::{self, Claim, Target, TargetKind};
use crate::journal;
use crate::wire::frame::{
    DecodeError, FLAG_DISCARD, FLAG_DROP_CACHE, FLAG_DRY_RUN, FLAG_FORCE_MOUNTED,
    FLAG_KEEP_UNREADABLE, FLAG_LEVEL_FIXED, FLAG_NO_SPARSE, FLAG_STREAM, FLAG_TRACK_ID,
    FLAG_VERIFY, Frame, GREETING, Go, Hello, ReadError, Reply, Role, VERSION, read_frame,
    write_frame,
};
use crate::wire::link::Peer;
use crate::wire::session::{Link, Pace};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Runs the server on this process's stdin and stdout; returns the exit code.
pub fn main() -> i32 {
    if let Some(code) = check_self() {
        return code;
    }
    let (Ok(input), Ok(output)) = (
        rustix::stdio::stdin().try_clone_to_owned(),
        rustix::stdio::stdout().try_clone_to_owned(),
    ) else {
        eprintln!("blocksync --server: cannot use stdin/stdout");
        return Kind::Internal.exit_code();
    };
    crate::ssh::connect::widen_pipe(&input);
    crate::ssh::connect::widen_pipe(&output);
    crate::wire::link::send_heartbeats();
    let mut input = File::from(input);
    let mut output = File::from(output);
    if output.write_all(GREETING).is_err() {
        return Kind::Remote.exit_code();
    }
    match serve(&mut input, &mut output) {
        Ok(()) => 0,
        Err(e) => {
            // The client prints it; stderr helps when even that fails.
            let _ = write_frame(
                &mut output,
                &Frame::Source(ToSource::Failed {
                    kind: e.kind,
                    message: e.message.clone(),
                }),
            );
            e.kind.exit_code()
        }
    }
}

/// `--server --expect ID [--check]`, as a deployed copy is started: a copy that does not
/// hash to the id the client asked for stops at once and asks to be copied again (the
/// launcher checks first; this catches what it could not, e.g. without sha256sum).
/// `--check` only checks. `None`: serve.
fn check_self() -> Option<i32> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let expect = args
        .iter()
        .position(|a| a == "--expect")
        .and_then(|i| args.get(i + 1))?;
    let only = args.iter().any(|a| a == "--check");
    if crate::ssh::deploy::is_self(expect) {
        return only.then_some(0);
    }
    if !only {
        let u = rustix::system::uname();
        println!(
            "#BSDEPLOY stale {} {}",
            u.sysname().to_string_lossy(),
            u.machine().to_string_lossy()
        );
    }
    Some(crate::ssh::deploy::STALE_EXIT)
}

fn host() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn read_hello(input: &mut impl Read) -> Result<Hello> {
    let mut buf = Vec::new();
    match read_frame(input, &mut buf) {
        Ok((Frame::Hello(h), _)) => Ok(h),
        Ok((other, _)) => Err(Error::new(
            Kind::Protocol,
            format!("expected a hello, got {other:?}"),
        )),
        Err(ReadError::Decode(DecodeError::Version(v))) => Err(Error::new(
            Kind::Protocol,
            format!(
                "the client speaks protocol {v}, blocksync on {} speaks {VERSION}; use the same blocksync version on both sides (or let it deploy itself)",
                host()
            ),
        )),
        Err(e) => Err(Error::new(
            Kind::Protocol,
            format!("reading the hello: {e}"),
        )),
    }
}

fn read_go(input: &mut impl Read) -> Result<Go> {
    let mut buf = Vec::new();
    match read_frame(input, &mut buf) {
        Ok((Frame::Go(g), _)) => Ok(g),
        Ok((other, _)) => Err(Error::new(
            Kind::Protocol,
            format!("expected go, got {other:?}"),
        )),
        Err(e) => Err(Error::new(Kind::Remote, format!("waiting for go: {e}"))),
    }
}

fn kind_byte(kind: TargetKind) -> u8 {
    match kind {
        TargetKind::File => 1,
        TargetKind::BlockDevice => 2,
    }
}

/// Speaks the protocol until the sync is done.
pub fn serve(input: &mut File, output: &mut File) -> Result<()> {
    let hello = read_hello(input)?;
    match hello.role {
        Role::Dest => serve_dest(&hello, input, output),
        Role::Source => serve_source(&hello, input, output),
        Role::Rollback => serve_rollback(&hello, input, output),
        Role::Versions | Role::Restore => super::history::serve(&hello, input, output),
    }
}

/// The engine settings a hello and go describe, the same on both machines.
pub fn config_for(hello: &Hello, go: &Go) -> Config {
    let whole = Layout {
        // A stream source: the run may end short of go's size, where the stream did.
        open_end: hello.flags & FLAG_STREAM != 0,
        ..Layout::new(go.size, hello.block)
    };
    let layout = Layout {
        start: go.start,
        end: go.end,
        ..whole
    };
    let flag = |f: u32| hello.flags & f != 0;
    let run = RunOptions {
        compare: Compare::Digest(hello.hash),
        dry_run: flag(FLAG_DRY_RUN),
        pause: Duration::from_millis(hello.pause_ms),
        drop_cache: flag(FLAG_DROP_CACHE),
        sparse: !flag(FLAG_NO_SPARSE),
        discard: flag(FLAG_DISCARD),
        refine: hello.refine,
        salvage: Salvage {
            max_errors: hello.max_errors,
            keep_unreadable: flag(FLAG_KEEP_UNREADABLE),
        },
        verify: flag(FLAG_VERIFY).then(|| VerifyLog::new(hello.hash)),
    };
    let mut config = Config::build(layout, &run);
    if flag(FLAG_TRACK_ID) {
        config.track = Some(go.sync_id);
    }
    config.dest_reads = !go.no_read;
    config
}

fn serve_dest(hello: &Hello, input: &mut File, output: &mut File) -> Result<()> {
    let path = Path::new(&hello.path);
    let probe = target::probe_destination(path)?;
    // A new file is written under a temporary name (see io::partial).
    let probe = if hello.flags & FLAG_DRY_RUN == 0 {
        crate::io::partial::as_partial(probe)?
    } else {
        probe
    };
    let claim = claim_of(hello);
    // One run at a time: locked before any check, held until the run ends.
    let _held = target::hold(&probe, claim)?;
    let force_mounted = hello.flags & FLAG_FORCE_MOUNTED != 0;
    if let Some(existing) = &probe.existing {
        target::check_destination(path, existing, hello.source_size, force_mounted)?;
    }
    if probe.shown().is_none() && hello.flags & FLAG_DRY_RUN == 0 {
        let sparse = hello.flags & FLAG_NO_SPARSE == 0;
        let (data, size) = (hello.run.source_data, hello.source_size);
        crate::io::policy::check_room_for_new(&probe.path, data, size, sparse)?;
    }
    let track = hello.flags & FLAG_TRACK_ID != 0;
    let want = Wanted {
        mode: journal::Mode::from_byte(hello.run.journal),
        dir: Some(PathBuf::from(&hello.run.journal_dir)).filter(|d| !d.as_os_str().is_empty()),
        keep: hello.run.keep,
    };
    let undo = Undo::decide(&want, &probe, hello.flags & FLAG_DRY_RUN != 0)?;
    let reply = Reply {
        size: probe.shown().map_or(0, |e| e.size),
        kind: probe.shown().map_or(0, |e| kind_byte(e.kind)),
        sync_id: match probe.shown() {
            Some(e) if track => crate::digestfile::syncid::load_of(path, &e.id),
            _ => [0; 16],
        },
        mode: 0,
        journal: undo.decision.byte(),
        data: 0,
    };
    write_frame(output, &Frame::Reply(reply)).map_err(lost_client)?;
    let go = read_go(input)?;
    if !go.proceed {
        return Ok(());
    }
    let mut config = config_for(hello, &go);
    let from = std::env::var("SSH_CLIENT").map_or_else(
        |_| "a push".to_string(),
        |c| format!("a push from {}", c.split_whitespace().next().unwrap_or("?")),
    );
    let stream = (hello.run.stream, hello.run.streams);
    config.journal = undo.plan(hello.run.id, stream, from)?;
    config.rename_to = probe.final_path.clone();
    config.share = Some(crate::io::partial::Share {
        run_id: hello.run.id,
        stream: hello.run.stream,
        streams: hello.run.streams,
    });
    let dest: Option<Target> = if config.dry_run {
        match probe.existing {
            Some(_) => Some(target::open_read(path, "destination", Kind::Destination)?),
            None => None,
        }
    } else {
        // Only the first of parallel streams claims a device exclusively.
        let how = target::OpenDest {
            force_mounted: force_mounted || go.start > 0,
            mode: hello.source_mode,
            // With -w N, each stream may find the file another one created.
            shared: go.start > 0 || go.end < go.size,
            claim,
        };
        Some(target::open_destination(&probe, how)?)
    };
    let stats = Stats::default();
    let peer = Peer("the client".into());
    let link = Link {
        r: input,
        w: output,
        stats: &stats,
        peer: &peer,
    };
    link.dest_over(dest.as_ref(), &config, None, || {})
}

/// The bytes this stream of the run locks: its part of the source, the last stream also
/// everything past it (it may resize a file).
fn claim_of(hello: &Hello) -> Claim {
    let write = hello.flags & FLAG_DRY_RUN == 0;
    let (i, n) = (u64::from(hello.run.stream), u64::from(hello.run.streams));
    if n <= 1 {
        return Claim::whole(write);
    }
    let part = Layout::new(hello.source_size, hello.block).part(i, n);
    Claim {
        start: part.start,
        end: (i + 1 < n).then_some(part.end),
        write,
    }
}

fn serve_source(hello: &Hello, input: &mut File, output: &mut File) -> Result<()> {
    let src = target::open_source(Path::new(&hello.path))?;
    let reply = Reply {
        size: src.size,
        kind: kind_byte(src.kind),
        sync_id: [0; 16],
        mode: target::copy_mode(&src),
        journal: 0,
        data: crate::io::policy::data_bytes(&src),
    };
    write_frame(output, &Frame::Reply(reply)).map_err(lost_client)?;
    let go = read_go(input)?;
    if !go.proceed {
        return Ok(());
    }
    if go.size != src.size {
        return Err(Error::new(
            Kind::Protocol,
            format!(
                "client expects a source of {} bytes, not {}",
                go.size, src.size
            ),
        ));
    }
    let config = config_for(hello, &go);
    let stats = Stats::default();
    let peer = Peer("the client".into());
    // Nobody presses Ctrl-C here: the client stops us by closing the stream.
    let cancel = AtomicBool::new(false);
    let (level, bw) = (hello.compress, hello.bwlimit);
    let link = Link {
        r: input,
        w: output,
        stats: &stats,
        peer: &peer,
    };
    let pace = Pace {
        level,
        bwlimit: bw,
        fixed: hello.flags & FLAG_LEVEL_FIXED != 0,
    };
    link.source_over(&src, &config, pace, &cancel, || {})
}

/// `blocksync rollback host:DST` on the server: the same checks as a local rollback,
/// then a reply (the first 8 bytes of its id: the journals found), and the rollback once
/// the client says go.
fn serve_rollback(hello: &Hello, input: &mut File, output: &mut File) -> Result<()> {
    let how = RollbackOptions {
        force_mounted: hello.flags & FLAG_FORCE_MOUNTED != 0,
        journal_dir: Some(PathBuf::from(&hello.run.journal_dir))
            .filter(|d| !d.as_os_str().is_empty()),
    };
    let mut confirm = |p: &Pending| -> Result<()> {
        let mut sync_id = [0u8; 16];
        sync_id[..8].copy_from_slice(&(p.journals as u64).to_le_bytes());
        let reply = Reply {
            size: p.size,
            kind: kind_byte(p.kind),
            sync_id,
            mode: 0,
            journal: 0,
            data: 0,
        };
        write_frame(output, &Frame::Reply(reply)).map_err(lost_client)?;
        match read_go(input)? {
            go if go.proceed => Ok(()),
            _ => Err(Error::new(
                Kind::NotConfirmed,
                "the rollback was not confirmed",
            )),
        }
    };
    let done = rollback_here(Path::new(&hello.path), &how, &mut confirm)?;
    let end = Frame::Source(ToSource::Done {
        written: done.bytes,
        read: done.size,
        journaled: 0,
    });
    write_frame(output, &end).map_err(lost_client)?;
    Ok(())
}

/// Waits for the client's go; a refusal is `refused`.
pub(super) fn expect_go(input: &mut impl Read, refused: &str) -> Result<()> {
    match read_go(input)? {
        go if go.proceed => Ok(()),
        _ => Err(Error::new(Kind::NotConfirmed, refused.to_string())),
    }
}

pub(super) fn lost_client(e: std::io::Error) -> Error {
    Error::new(
        Kind::Remote,
        format!("the client went away: {}", crate::error::os_text(&e)),
    )
}
