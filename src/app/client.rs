//! A sync with one side on another machine: starts the remote side over ssh (one
//! connection per `-w` stream), makes the handshake and every check before anything is
//! written, then runs the local half of each stream with its messages carried by
//! `crate::wire::link`.

use super::interact::{Change, cancel_on_signals, confirm_change};
use super::local::{note_busy_source, open_dest_for_run};
use super::report::Reporter;
use super::settings::{RemoteSettings, Settings};
use super::streams::{Stream, connect_all, reap, refuse_all, send_all_go, with_stderr};
use super::undo::Undo;
use super::verdict::{Sides, conclude, seal_digests};
use crate::digestfile::trust;
use crate::engine::prehash::{Precomputed, Prehash};
use crate::engine::{Compare, Config, Layout, RunOptions, Stats, StreamEnd};
use crate::error::{Error, Kind, Result};
use crate::io::target::{self, Target, TargetKind};
use crate::journal::{Decision, Plan};
use crate::ssh::connect::Connection;
use crate::wire::frame::{
    FLAG_DISCARD, FLAG_DROP_CACHE, FLAG_DRY_RUN, FLAG_FORCE_MOUNTED, FLAG_KEEP_UNREADABLE,
    FLAG_LEVEL_FIXED, FLAG_NO_SPARSE, FLAG_STREAM, FLAG_TRACK_ID, FLAG_VERIFY, Hello, Reply, Role,
    RunPart,
};
use crate::wire::link::Peer;
use crate::wire::session::{Link, Pace};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// The remote side of a sync: which machine, which path there, which local path here.
pub(crate) struct Remote<'a> {
    /// `host` or `user@host`.
    pub host: &'a str,
    /// The path on that machine.
    pub path: &'a str,
    /// The path on this machine.
    pub local: &'a Path,
    /// The source is local (push); else the destination is (pull).
    pub push: bool,
}

impl<'a> Remote<'a> {
    /// Pushing `local` to `host:path`.
    pub fn push(host: &'a str, path: &'a str, local: &'a Path) -> Self {
        Remote {
            host,
            path,
            local,
            push: true,
        }
    }

    /// Pulling `host:path` onto `local`.
    pub fn pull(host: &'a str, path: &'a str, local: &'a Path) -> Self {
        Remote {
            host,
            path,
            local,
            push: false,
        }
    }

    fn remote_name(&self) -> String {
        format!("{}:{}", self.host, self.path)
    }

    fn local_name(&self) -> String {
        self.local.display().to_string()
    }
}

/// This machine's side, checked before ssh starts: an open source (push) or a probed
/// destination (pull).
enum Here {
    Source(Target),
    Dest(target::DestProbe),
}

impl Here {
    fn source(&self) -> Option<&Target> {
        match self {
            Here::Source(s) => Some(s),
            Here::Dest(_) => None,
        }
    }

    fn probe(&self) -> Option<&target::DestProbe> {
        match self {
            Here::Source(_) => None,
            Here::Dest(p) => Some(p),
        }
    }
}

/// The hello every stream sends: what the remote side is asked to do.
/// The hello of a run with `role` on the server, for its `path`; `src` is the source
/// when it is on this machine.
pub(super) fn hello_for(
    settings: &Settings,
    remote: &RemoteSettings,
    role: Role,
    path: &str,
    src: Option<&Target>,
) -> Hello {
    let bits = [
        (settings.dry_run, FLAG_DRY_RUN),
        (settings.force_mounted, FLAG_FORCE_MOUNTED),
        (settings.drop_remote, FLAG_DROP_CACHE),
        (!settings.sparse, FLAG_NO_SPARSE),
        (settings.discard, FLAG_DISCARD),
        (settings.verify, FLAG_VERIFY),
        (settings.salvage.keep_unreadable, FLAG_KEEP_UNREADABLE),
        (settings.digest.is_some(), FLAG_TRACK_ID),
        (remote.level_fixed, FLAG_LEVEL_FIXED),
        (settings.stream_source(), FLAG_STREAM),
    ];
    let flags = bits.iter().filter(|(on, _)| *on).fold(0, |f, (_, b)| f | b);
    Hello {
        role,
        path: path.to_string(),
        block: settings.block,
        hash: settings.hash,
        compress: remote.level,
        flags,
        pause_ms: settings.pause.as_millis() as u64,
        source_size: src.map_or(0, |s| s.size),
        bwlimit: remote.bwlimit / settings.workers as u64,
        refine: settings.refine,
        max_errors: settings.salvage.max_errors,
        source_mode: src.map_or(0, target::copy_mode),
        run: RunPart {
            id: crate::digestfile::syncid::fresh(),
            stream: 0,
            streams: settings.workers,
            journal: settings.journal.byte(),
            journal_dir: settings
                .journal_dir
                .as_ref()
                .map_or(String::new(), |d| d.display().to_string()),
            keep: settings.keep_versions,
            source_data: src.map_or(0, crate::io::policy::data_bytes),
            ..RunPart::default()
        },
    }
}

/// A word read as `host:path` whose host could not be reached may have been meant as a
/// local file with a colon in its name: the error says how to write that.
fn colon_hint(mut e: Error, to: &Remote) -> Error {
    if e.kind == Kind::Remote && !to.host.contains('@') && !to.host.contains('.') {
        e.message.push_str(&format!(
            " ('{}:{}' was read as host:path, host '{}'; for a local file of that name write ./{}:{})",
            to.host, to.path, to.host, to.host, to.path
        ));
    }
    e
}

/// While ssh logs in, hashes the local side (see `engine::prehash`); returns the size it
/// assumed, to check against the real one once known.
fn start_prehash(settings: &Settings, here: &Here) -> Option<(Prehash, u64)> {
    let (block, hash) = (settings.block, settings.hash);
    match here {
        // A stream is read once, by the sync.
        Here::Source(_) if settings.stream_source() => None,
        Here::Source(s) => {
            let f = s.file.try_clone().ok()?;
            let layout = Layout::new(s.size, block);
            Some((Prehash::start(f, s.kind, s.size, layout, hash), s.size))
        }
        Here::Dest(p) => {
            let e = p.existing?;
            // The probed object itself, or nothing: digests of another file would
            // make changed blocks look the same.
            let f = std::fs::File::open(&p.path).ok()?;
            let now = target::Identity::of(&f.metadata().ok()?);
            if e.id != now {
                return None;
            }
            let layout = Layout::new(e.size, block);
            Some((Prehash::start(f, e.kind, e.size, layout, hash), e.size))
        }
    }
}

/// The checks that need both sides' answers, and the confirmation; returns the
/// destination as it was (kind and size; `None`: missing).
fn check_sides(
    settings: &Settings,
    reporter: &Reporter,
    to: &Remote,
    here: &Here,
    reply: &Reply,
    size: u64,
    undo: Option<&Undo>,
) -> Result<Option<(TargetKind, u64)>> {
    let (remote_name, local_name) = (to.remote_name(), to.local_name());
    match here {
        Here::Source(_) => {
            let existing = match reply.kind {
                0 => None,
                1 => Some((TargetKind::File, reply.size)),
                _ => Some((TargetKind::BlockDevice, reply.size)),
            };
            if let Some((kind, old)) = existing {
                let decision = Decision::from_byte(reply.journal).unwrap_or(Decision::Nothing);
                super::undo::note_unavailable(reporter, decision, &remote_name);
                let change = Change {
                    destination: &remote_name,
                    kind: kind.name(),
                    size: old,
                    source_size: size,
                    source: &local_name,
                    stream: settings.stream_source(),
                    undo: decision.promise(),
                };
                confirm_change(settings, reporter, &change)?;
            }
            Ok(existing)
        }
        Here::Dest(probe) => {
            if let Some(existing) = &probe.existing {
                target::check_destination(to.local, existing, size, settings.force_mounted)?;
            }
            if probe.shown().is_none() && !settings.dry_run {
                let data = reply.data.min(size);
                crate::io::policy::check_room_for_new(&probe.path, data, size, settings.sparse)?;
            }
            if let Some(existing) = &probe.shown() {
                if let Some(u) = undo {
                    super::undo::note_unavailable(reporter, u.decision, &local_name);
                }
                let change = Change {
                    destination: &local_name,
                    kind: existing.kind.name(),
                    size: existing.size,
                    source_size: size,
                    source: &remote_name,
                    stream: false,
                    undo: undo.map_or("", |u| u.decision.promise()),
                };
                confirm_change(settings, reporter, &change)?;
            }
            Ok(probe.shown().map(|e| (e.kind, e.size)))
        }
    }
}

/// With `--digest-file` (push only): may the file stand in for reading the destination?
fn prepare_digests(
    settings: &Settings,
    to: &Remote,
    here: &Here,
    existing: Option<(TargetKind, u64)>,
    reply: &Reply,
    streams: usize,
) -> Result<Option<trust::Use>> {
    let (Some(src), Some(opts)) = (here.source(), &settings.digest) else {
        return Ok(None);
    };
    let state = trust::DestState {
        label: to.remote_name(),
        size: existing.map_or(0, |e| e.1),
        size_after: match existing {
            Some((TargetKind::BlockDevice, n)) => n,
            _ => src.size,
        },
        sync_id: reply.sync_id,
    };
    let u = trust::prepare(
        opts,
        settings.hash,
        settings.block,
        src.size,
        &state,
        streams,
    )?;
    Ok(Some(u))
}

/// This machine's side, opened and checked before any ssh connection (none for a source
/// that does not exist).
fn open_here(settings: &Settings, reporter: &Reporter, to: &Remote) -> Result<Here> {
    if to.push {
        let src = match settings.stream_source() {
            true => target::open_stdin()?,
            false => target::open_source(to.local)?,
        };
        note_busy_source(reporter, &src);
        return Ok(Here::Source(src));
    }
    let probe = target::probe_destination(to.local)?;
    // A new file is written under a temporary name (see io::partial).
    Ok(Here::Dest(if !settings.dry_run {
        crate::io::partial::as_partial(probe)?
    } else {
        probe
    }))
}

/// What the user hears of the started streams: notes, and with -v how they were reached
/// and what the server replied.
fn tell_connected(reporter: &Reporter, streams: &[Stream], host: &str) {
    for note in streams.iter().flat_map(|s| &s.conn.notes) {
        reporter.note(note);
    }
    for d in streams.iter().flat_map(|s| &s.conn.details) {
        reporter.detail(1, d);
    }
    let reply = streams[0].reply;
    reporter.detail(
        2,
        &format!(
            "{host}: replied: {} ({} bytes), undo journal decision {}",
            match reply.kind {
                0 => "no such file yet",
                1 => "a file",
                _ => "a block device",
            },
            reply.size,
            reply.journal
        ),
    );
}

/// Runs a sync between this machine and `to`.
pub(crate) fn run(settings: &Settings, reporter: &Reporter, to: &Remote) -> Result<()> {
    let remote = settings
        .remote
        .as_ref()
        .expect("a remote run has ssh settings");
    let here = open_here(settings, reporter, to)?;
    // One run at a time: a pulled-to destination is locked before any check.
    let _held = match here.probe() {
        Some(p) => target::hold(p, target::Claim::whole(!settings.dry_run))?,
        None => None,
    };
    let role = if to.push { Role::Dest } else { Role::Source };
    let hello = hello_for(settings, remote, role, to.path, here.source());
    let prehash = start_prehash(settings, &here);
    let connected = connect_all(settings, &remote.ssh, to.host, &hello);
    let mut precomputed = prehash.map(|(p, assumed)| (p.finish(), assumed));
    let mut streams = connected.map_err(|e| colon_hint(e, to))?;
    tell_connected(reporter, &streams, to.host);
    let reply = streams[0].reply;
    let size = here.source().map_or(reply.size, |s| s.size);
    // Everything until the go may still refuse: then no stream writes anything.
    let prepared = (|| {
        let undo = match here.probe() {
            Some(p) => Some(Undo::decide(&settings.undo_wanted(), p, settings.dry_run)?),
            None => None,
        };
        let existing = check_sides(settings, reporter, to, &here, &reply, size, undo.as_ref())?;
        let journal = match &undo {
            Some(u) => u.plan(hello.run.id, (0, settings.workers), to.remote_name())?,
            None => None,
        };
        let dest = match here.probe() {
            Some(p) => open_dest_for_run(settings, p, reply.mode)?,
            None => None,
        };
        let cached = prepare_digests(settings, to, &here, existing, &reply, streams.len())?;
        Ok((existing, dest, cached, journal))
    })();
    let (existing, dest, cached, journal) = match prepared {
        Ok(p) => p,
        Err(e) => {
            refuse_all(&mut streams);
            return Err(e);
        }
    };
    if let Some((p, assumed)) = precomputed.as_mut() {
        p.retain_matching(*assumed, size);
        if to.push {
            p.drop_from(reply.size);
        }
    }
    let stream = settings
        .stream_source()
        .then(|| Arc::new(StreamEnd::default()));
    let whole = match stream {
        Some(_) => super::local::stream_layout(existing, settings.block),
        None => Layout::new(size, settings.block),
    };
    reporter.detail(
        2,
        &format!(
            "go: {size} bytes in {} stream(s), {} byte blocks",
            streams.len(),
            settings.block
        ),
    );
    send_all_go(&mut streams, whole, cached.as_ref())?;

    let stats = Arc::new(Stats::default());
    let ahead = precomputed.map(|(p, _)| p);
    let here_read = if to.push {
        &stats.source_read
    } else {
        &stats.dest_read
    };
    Stats::add(here_read, ahead.as_ref().map_or(0, |p| p.read()));
    let job = Job {
        remote,
        run: settings.run_options(Compare::Digest(settings.hash)),
        whole,
        stream: stream.clone(),
        push: to.push,
        precomputed: ahead.map(Arc::new),
        cached: cached.as_ref(),
        src: here.source(),
        dest: dest.as_ref(),
        journal,
        rename_to: here.probe().and_then(|p| p.final_path.clone()),
        run_id: hello.run.id,
        stats: &stats,
        cancel: &cancel_on_signals(),
    };
    let started = Instant::now();
    let progress = reporter.start_progress(size, stats.clone());
    let result = job.run_streams(streams);
    progress.finish();
    let size = stream.as_deref().map_or(size, |s| s.size(&stats));
    let result = seal_digests(cached, result, &stats);
    let (source, destination) = if to.push {
        (to.local_name(), to.remote_name())
    } else {
        (to.remote_name(), to.local_name())
    };
    let sides = Sides {
        source,
        destination,
        size,
        block: settings.block,
        existing,
        source_here: to.push,
    };
    conclude(settings, reporter, &stats, started, sides, result)
}

/// What every stream of a started run shares.
struct Job<'a> {
    remote: &'a RemoteSettings,
    run: RunOptions,
    whole: Layout,
    /// A stream source: where it ended.
    stream: Option<Arc<StreamEnd>>,
    push: bool,
    precomputed: Option<Arc<Precomputed>>,
    cached: Option<&'a trust::Use>,
    src: Option<&'a Target>,
    dest: Option<&'a Target>,
    /// A pull's undo journal (each stream keeps its own part).
    journal: Option<Plan>,
    /// A pull to a new file: the name its temporary one becomes.
    rename_to: Option<std::path::PathBuf>,
    /// The run's id (its streams share the new file).
    run_id: [u8; 16],
    stats: &'a Stats,
    cancel: &'a AtomicBool,
}

impl Job<'_> {
    /// The engine settings of stream `i`.
    fn config(&self, i: u64, n: u64) -> Config {
        let mut config = Config::build(self.whole.part(i, n), &self.run);
        config.dest_progress = !self.push;
        config.precomputed = self.precomputed.clone();
        config.journal = self.journal.clone().map(|p| Plan {
            stream: i as u32,
            ..p
        });
        config.rename_to = self.rename_to.clone();
        config.stream = self.stream.clone();
        config.share = Some(crate::io::partial::Share {
            run_id: self.run_id,
            stream: i as u32,
            streams: n as u32,
        });
        if let Some(u) = self.cached {
            config.cache = Some(u.cache.clone());
            config.dest_reads = !u.skip_reading;
        }
        config
    }

    /// Runs every stream on a thread of its own; returns the most telling error.
    fn run_streams(&self, streams: Vec<Stream>) -> Result<()> {
        let n = streams.len() as u64;
        std::thread::scope(|s| {
            let handles: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(i, stream)| {
                    let config = self.config(i as u64, n);
                    s.spawn(move || self.run_stream(&config, stream.conn, n))
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
        })
    }

    /// One stream: this side's half, its messages carried over the ssh connection.
    fn run_stream(&self, config: &Config, conn: Connection, n: u64) -> Result<()> {
        let Connection {
            mut child,
            writer,
            reader,
            stderr,
            host,
            ..
        } = conn;
        let role = if self.src.is_some() {
            "destination"
        } else {
            "source"
        };
        let peer = Peer(format!("{host} (remote {role})"));
        let link = Link {
            r: reader,
            w: writer,
            stats: self.stats,
            peer: &peer,
        };
        let reap_it = || reap(&mut child);
        let result = match self.src {
            Some(src) => {
                let pace = Pace {
                    level: self.remote.level,
                    bwlimit: self.remote.bwlimit / n,
                    fixed: self.remote.level_fixed,
                };
                link.source_over(src, config, pace, self.cancel, reap_it)
            }
            None => link.dest_over(self.dest, config, Some(self.cancel), reap_it),
        };
        result.map_err(|e| with_stderr(e, &stderr))
    }
}
