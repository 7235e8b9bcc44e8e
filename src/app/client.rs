//! A sync with one side on another machine: starts the remote side over ssh (one
//! connection per `-w` stream), makes the handshake and every check before anything is
//! written, then runs the local half of each stream with its messages carried by
//! [`crate::wire::link`].

use super::{Plan, Sides, conclude, confirm_change};
use crate::app::cli::Args;
use crate::app::report::Reporter;
use crate::app::server::buffers_for;
use crate::engine::prehash::Prehash;
use crate::engine::{Compare, Config, Layout, Stats};
use crate::error::{Error, Kind, Result};
use crate::io::target::{self, Target, TargetKind};
use crate::size;
use crate::ssh::connect::{Connection, SshOptions, split_shell};
use crate::wire::frame::{
    FLAG_DISCARD, FLAG_DROP_CACHE, FLAG_DRY_RUN, FLAG_FORCE_MOUNTED, FLAG_KEEP_UNREADABLE,
    FLAG_NO_SPARSE, FLAG_TRACK_ID, FLAG_VERIFY, Frame, Go, Hello, Reply, Role, read_frame,
    write_frame,
};
use crate::wire::link::{self, Peer};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// zstd level for changed blocks over ssh when `-C` gives none: fast, and still shrinks
/// compressible blocks well.
pub const DEFAULT_LEVEL: i32 = 1;

fn ssh_options(args: &Args) -> Result<SshOptions> {
    let usage = |m: String| Error::new(Kind::Usage, m);
    let program = match &args.rsh {
        Some(cmd) => split_shell(cmd).map_err(|m| usage(format!("-e/--rsh: {m}")))?,
        None => vec!["ssh".to_string()],
    };
    if program.is_empty() {
        return Err(usage("-e/--rsh is empty".into()));
    }
    let extra = match &args.extra_params {
        Some(x) => split_shell(x).map_err(|m| usage(format!("-x/--extraparams: {m}")))?,
        None => Vec::new(),
    };
    Ok(SshOptions {
        program,
        cipher: args.cipher.clone(),
        identity: args
            .identity
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        extra,
        pass_env: args.pass.clone(),
        sudo: args.sudo,
        remote_bin: args.remote_bin.clone(),
        deploy: !args.no_deploy,
    })
}

/// `--bwlimit` in bytes per second: a plain number is KiB/s, as in rsync.
fn bwlimit(args: &Args) -> Result<u64> {
    let Some(text) = &args.bwlimit else {
        return Ok(0);
    };
    let plain = text.chars().all(|c| c.is_ascii_digit());
    let n =
        size::parse_size(text).map_err(|m| Error::new(Kind::Usage, format!("--bwlimit {m}")))?;
    Ok(if plain { n * 1024 } else { n })
}

fn remote_notes(args: &Args, reporter: &Reporter) {
    if args.splay.is_some() {
        reporter
            .note("-l/--splay is accepted for blocksync.py compatibility; streams start at once");
    }
    if args.interpreter.is_some() {
        reporter.note("-I/--interpreter is not needed: the remote side is this same binary");
    }
    if args.create_dest {
        reporter.note("-T/--createdest is implied: a missing destination file is always created");
    }
    if args.additional_hash.is_some() {
        reporter.note(
            "-2/--additionalhash is accepted and not used: one strong digest per block is enough",
        );
    }
}

/// One started stream: the connection and the server's reply.
struct Stream {
    conn: Connection,
    reply: Reply,
}

fn handshake(opts: &SshOptions, host: &str, hello: &Hello) -> Result<Stream> {
    let mut conn = opts.connect(host)?;
    let mut buf = Vec::new();
    let sent = write_frame(&mut conn.writer, &Frame::Hello(hello.clone()));
    let answer = read_frame(&mut conn.reader, &mut buf);
    match (sent, answer) {
        (_, Ok((Frame::Reply(reply), _))) => Ok(Stream { conn, reply }),
        (_, Ok((Frame::Failed { kind, message }, _))) => {
            let _ = conn.child.wait();
            Err(Error::new(kind, format!("on {host}: {message}")))
        }
        (_, Ok((other, _))) => {
            drop(conn.writer);
            reap(&mut conn.child);
            Err(Error::new(
                Kind::Protocol,
                format!("{host} answered the hello with {other:?}"),
            ))
        }
        (_, Err(e)) => {
            let _ = conn.child.wait();
            let detail = conn
                .stderr
                .lock()
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            Err(Error::new(
                Kind::Remote,
                format!(
                    "{host}: the remote blocksync stopped during the handshake ({e}){}",
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                ),
            ))
        }
    }
}

fn send_go(stream: &mut Stream, go: Go) -> Result<()> {
    write_frame(&mut stream.conn.writer, &Frame::Go(go)).map_err(|e| {
        Error::new(
            Kind::Remote,
            format!(
                "{}: sending go: {}",
                stream.conn.host,
                crate::error::os_text(&e)
            ),
        )
    })?;
    Ok(())
}

fn refuse_all(streams: &mut [Stream]) {
    for s in streams {
        let _ = send_go(
            s,
            Go {
                proceed: false,
                size: 0,
                start: 0,
                end: 0,
                sync_id: [0; 16],
                no_read: false,
            },
        );
        let _ = s.conn.child.wait();
    }
}

/// Runs a sync between `local` and `host:remote_path`; `push` when the source is local.
pub(crate) fn run(
    args: &Args,
    reporter: &Reporter,
    plan: &Plan,
    host: &str,
    remote_path: &str,
    local: &Path,
    push: bool,
) -> Result<()> {
    let (block, hash, refine) = (plan.block, plan.hash, plan.refine);
    remote_notes(args, reporter);
    let opts = ssh_options(args)?;
    let level = if args.no_compress {
        0
    } else {
        args.compress.unwrap_or(DEFAULT_LEVEL)
    };
    let bw = bwlimit(args)?;
    // Local checks first: no ssh connection for a source that does not exist.
    let (src, probe) = if push {
        let src = target::open_source(local)?;
        super::note_busy_source(reporter, &src);
        (Some(src), None)
    } else {
        (None, Some(target::probe_destination(local)?))
    };
    let mut flags = 0;
    if args.dry_run {
        flags |= FLAG_DRY_RUN;
    }
    if args.force_mounted {
        flags |= FLAG_FORCE_MOUNTED;
    }
    if args.fadvise & 2 != 0 {
        flags |= FLAG_DROP_CACHE;
    }
    if args.no_sparse {
        flags |= FLAG_NO_SPARSE;
    }
    if args.discard {
        flags |= FLAG_DISCARD;
    }
    if args.verify {
        flags |= FLAG_VERIFY;
    }
    if args.keep_unreadable {
        flags |= FLAG_KEEP_UNREADABLE;
    }
    if args.digest_file.is_some() {
        flags |= FLAG_TRACK_ID;
    }
    let hello = Hello {
        role: if push { Role::Dest } else { Role::Source },
        path: remote_path.to_string(),
        block,
        hash,
        compress: level,
        flags,
        pause_ms: args.pause,
        source_size: src.as_ref().map_or(0, |s| s.size),
        bwlimit: bw / args.workers as u64,
        refine,
        max_errors: args.max_errors.unwrap_or(u64::MAX),
    };
    let remote_name = format!("{host}:{remote_path}");
    let local_name = local.display().to_string();

    // While ssh logs in, hash the local side (see engine::prehash).
    let prehash = match (&src, &probe) {
        (Some(s), _) => s
            .file
            .try_clone()
            .ok()
            .map(|f| Prehash::start(f, s.kind, s.size, Layout::new(s.size, block), hash)),
        (None, Some(p)) => p.existing.and_then(|e| {
            let f = std::fs::File::open(local).ok()?;
            Some(Prehash::start(
                f,
                e.kind,
                e.size,
                Layout::new(e.size, block),
                hash,
            ))
        }),
        _ => None,
    };
    let ahead_size = src
        .as_ref()
        .map(|s| s.size)
        .or_else(|| probe.as_ref().and_then(|p| p.existing).map(|e| e.size));

    // The first connection may deploy the binary; the others then find it cached.
    let first = handshake(&opts, host, &hello);
    let mut precomputed = prehash.map(Prehash::finish);
    let mut streams = vec![first?];
    if args.workers > 1 {
        let rest: Vec<Result<Stream>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..args.workers)
                .map(|_| s.spawn(|| handshake(&opts, host, &hello)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("handshake thread"))
                .collect()
        });
        for r in rest {
            match r {
                Ok(s) => streams.push(s),
                Err(e) => {
                    refuse_all(&mut streams);
                    return Err(e);
                }
            }
        }
    }
    let reply = streams[0].reply;
    let size = src.as_ref().map_or(reply.size, |s| s.size);
    let checked = (|| -> Result<Option<(TargetKind, u64)>> {
        if push {
            let existing = match reply.kind {
                0 => None,
                1 => Some((TargetKind::File, reply.size)),
                _ => Some((TargetKind::BlockDevice, reply.size)),
            };
            if let Some((kind, old)) = existing {
                confirm_change(args, reporter, &remote_name, kind.name(), old, &local_name)?;
            }
            Ok(existing)
        } else {
            let probe = probe.as_ref().expect("pull probes");
            if let Some(existing) = &probe.existing {
                if existing.kind == TargetKind::BlockDevice {
                    target::check_device(local, existing, size, args.force_mounted)?;
                }
                confirm_change(
                    args,
                    reporter,
                    &local_name,
                    existing.kind.name(),
                    existing.size,
                    &remote_name,
                )?;
            }
            Ok(probe.existing.map(|e| (e.kind, e.size)))
        }
    })();
    let existing = match checked {
        Ok(e) => e,
        Err(e) => {
            refuse_all(&mut streams);
            return Err(e);
        }
    };
    let dest = match &probe {
        Some(p) => match super::open_dest_for_run(args, p) {
            Ok(d) => d,
            Err(e) => {
                refuse_all(&mut streams);
                return Err(e);
            }
        },
        None => None,
    };

    let whole = Layout::new(size, block);
    let n = streams.len() as u64;
    if let (Some(p), Some(assumed)) = (precomputed.as_mut(), ahead_size) {
        p.retain_matching(assumed, size);
        if push {
            p.drop_from(reply.size);
        }
    }
    let ahead_read = precomputed.as_ref().map_or(0, |p| p.read);
    let precomputed = precomputed.map(std::sync::Arc::new);
    // With --digest-file (push only): may the file stand in for reading the destination?
    let cached = match src.as_ref().filter(|_| push) {
        Some(s) => {
            let state = crate::digestfile::trust::DestState {
                label: remote_name.clone(),
                size: existing.map_or(0, |e| e.1),
                size_after: match existing {
                    Some((TargetKind::BlockDevice, n)) => n,
                    _ => s.size,
                },
                sync_id: reply.sync_id,
            };
            match crate::digestfile::trust::prepare(
                args,
                hash,
                block,
                s.size,
                &state,
                streams.len(),
            ) {
                Ok(c) => c,
                Err(e) => {
                    refuse_all(&mut streams);
                    return Err(e);
                }
            }
        }
        None => None,
    };
    for i in 0..streams.len() {
        let part = whole.part(i as u64, n);
        let go = Go {
            proceed: true,
            size,
            start: part.start,
            end: part.end,
            sync_id: cached.as_ref().map_or([0; 16], |u| u.new_id),
            no_read: cached.as_ref().is_some_and(|u| u.skip_reading),
        };
        if let Err(e) = send_go(&mut streams[i], go) {
            // Refuse the streams not started; end the started ones (they stop at the
            // closed stream before any block arrives) and reap every ssh.
            refuse_all(&mut streams[i + 1..]);
            for s in &mut streams[..=i] {
                let _ = s.conn.child.kill();
                let _ = s.conn.child.wait();
            }
            return Err(e);
        }
    }

    let cancel = super::cancel_on_signals();
    let verify = args.verify.then(|| crate::engine::VerifyLog::new(hash));
    let stats = std::sync::Arc::new(Stats::default());
    Stats::add(
        if push {
            &stats.source_read
        } else {
            &stats.dest_read
        },
        ahead_read,
    );
    let started = Instant::now();
    let progress = reporter.start_progress(size, stats.clone());
    let result = std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, stream)| {
                let mut config = Config::new(whole.part(i as u64, n));
                config.compare = Compare::Digest(hash);
                config.dry_run = args.dry_run;
                config.pause = Duration::from_millis(args.pause);
                config.drop_cache = args.fadvise & 1 != 0;
                config.buffers = buffers_for(whole.chunk);
                config.dest_progress = !push;
                config.precomputed = precomputed.clone();
                config.sparse = !args.no_sparse;
                config.discard = args.discard;
                config.refine = refine;
                config.salvage = super::salvage_of(args);
                config.verify = verify.clone();
                if let Some(u) = &cached {
                    config.cache = Some(u.cache.clone());
                    config.dest_reads = !u.skip_reading;
                }
                let (stats, cancel, src, dest) = (&*stats, &*cancel, src.as_ref(), dest.as_ref());
                s.spawn(move || match src {
                    Some(src) => {
                        push_stream(src, &config, stream.conn, level, bw / n, stats, cancel)
                    }
                    None => pull_stream(dest, &config, stream.conn, stats, cancel),
                })
            })
            .collect();
        let mut first: Result<()> = Ok(());
        for h in handles {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(Error::new(Kind::Internal, "stream thread panicked")));
            // Keep the most telling error: a cause over "interrupted" or a lost link.
            if let Err(e) = r {
                let better = match &first {
                    Ok(()) => true,
                    Err(f) => f.kind == Kind::Interrupted && e.kind != Kind::Interrupted,
                };
                if better {
                    first = Err(e);
                }
            }
        }
        first
    });
    progress.finish();
    let result = match cached {
        Some(u) => {
            let sealed = crate::digestfile::trust::finish(u.cache, &result, &stats.findings());
            result.and(sealed)
        }
        None => result,
    };
    let (source, destination) = if push {
        (local_name, remote_name)
    } else {
        (remote_name, local_name)
    };
    let sides = Sides {
        source,
        destination,
        size,
        block,
        existing,
        source_here: push,
    };
    conclude(args, reporter, &stats, started, sides, result)
}

/// Waits for the ssh process to end after the protocol finished; kills it if it lingers,
/// so a stuck peer never hangs the run.
fn reap(conn_child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = conn_child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = conn_child.kill();
    let _ = conn_child.wait();
}

/// Adds what ssh printed (e.g. "Connection closed", "Killed") to a lost-link error.
fn with_stderr(e: Error, stderr: &std::sync::Mutex<String>) -> Error {
    if e.kind != Kind::Remote {
        return e;
    }
    let text = stderr.lock().map(|s| s.clone()).unwrap_or_default();
    match text.lines().map(str::trim).rfind(|l| !l.is_empty()) {
        Some(line) => Error::new(e.kind, format!("{} ({line})", e.message)),
        None => e,
    }
}

fn push_stream(
    src: &Target,
    config: &Config,
    conn: Connection,
    level: i32,
    bwlimit: u64,
    stats: &Stats,
    cancel: &AtomicBool,
) -> Result<()> {
    let Connection {
        mut child,
        writer,
        reader,
        stderr,
        host,
    } = conn;
    let peer = Peer(format!("{host} (remote destination)"));
    let reap_it = || reap(&mut child);
    link::source_over(
        src, config, reader, writer, level, bwlimit, stats, cancel, &peer, reap_it,
    )
    .map_err(|e| with_stderr(e, &stderr))
}

fn pull_stream(
    dest: Option<&Target>,
    config: &Config,
    conn: Connection,
    stats: &Stats,
    cancel: &AtomicBool,
) -> Result<()> {
    let Connection {
        mut child,
        writer,
        reader,
        stderr,
        host,
    } = conn;
    let peer = Peer(format!("{host} (remote source)"));
    let reap_it = || reap(&mut child);
    link::dest_over(
        dest,
        config,
        reader,
        writer,
        stats,
        Some(cancel),
        &peer,
        reap_it,
    )
    .map_err(|e| with_stderr(e, &stderr))
}
