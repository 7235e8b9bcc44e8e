//! The application: entry dispatch, option handling, the local run, both sides of a
//! remote run, and the verdict (findings -> exit code -> summary).

pub(crate) mod badmap;
pub(crate) mod cli;
pub(crate) mod client;
pub(crate) mod endpoint;
pub(crate) mod offline;
pub(crate) mod report;
pub(crate) mod server;

use crate::digestfile::{syncid, trust as digestcache};
use crate::engine::{self, Compare, Config, Layout, Stats};
use crate::error::{Error, Kind, Result};
use crate::hash::HashKind;
use crate::io::target::{self, TargetKind};
use crate::size;
use crate::wire::frame as protocol;
use clap::Parser;
use cli::Args;
use endpoint::{Endpoint, Pair};
use report::{ProgressMode, Reporter, Summary};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::size::{MAX_BLOCK, MIN_BLOCK};

/// Parses the command line, runs, reports, and returns the process exit code.
pub fn main_entry() -> i32 {
    // The remote end of an ssh sync; not a user-facing mode, so not in --help.
    let first = std::env::args_os().nth(1);
    if first.as_ref().is_some_and(|a| a == "--server") {
        return server::main();
    }
    // `blocksync digest|diff|apply ...`; a file with such a name is written ./digest.
    if let Some(cmd) = first
        .as_ref()
        .and_then(|a| a.to_str())
        .filter(|a| offline::COMMANDS.contains(a))
    {
        return offline::main(cmd);
    }
    let args = Args::parse();
    let reporter = match reporter_for(&args) {
        Ok(r) => r,
        Err(e) => {
            Reporter::fallback().error(&e);
            return e.kind.exit_code();
        }
    };
    match run(&args, &reporter).map_err(interrupted_if_cancelled) {
        Ok(()) => 0,
        Err(e) => {
            reporter.error(&e);
            e.kind.exit_code()
        }
    }
}

fn reporter_for(args: &Args) -> Result<Reporter> {
    let progress = if args.no_progress {
        ProgressMode::Never
    } else if args.progress {
        ProgressMode::Always
    } else {
        ProgressMode::Auto
    };
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err(Error::new(
            Kind::Usage,
            "-t/--interval must be a positive number of seconds",
        ));
    }
    Reporter::new(
        args.quiet,
        args.verbose,
        args.json,
        progress,
        Duration::from_secs_f64(args.interval),
        args.output.as_deref(),
    )
}

/// The validated settings of a run.
pub(crate) struct Plan {
    /// Source and destination.
    pub pair: Pair,
    /// Block size.
    pub block: u64,
    /// Block digest.
    pub hash: HashKind,
    /// Sub-block size for refinement, 0 = off.
    pub refine: u64,
}

fn plan(args: &Args) -> Result<Plan> {
    let pair = endpoint::parse_operands(&args.operands, args.pull)
        .map_err(|m| Error::new(Kind::Usage, m))?;
    let block = size::parse_size(&args.block_size)
        .map_err(|m| Error::new(Kind::Usage, format!("block size {m}")))?;
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&block) {
        return Err(Error::new(
            Kind::Usage,
            format!(
                "block size {} is not usable; give 512 to 64M with -b (default 1M)",
                args.block_size
            ),
        ));
    }
    let hash: HashKind = args.hash.parse().map_err(|m| Error::new(Kind::Usage, m))?;
    if let Some(extra) = &args.additional_hash {
        extra
            .parse::<HashKind>()
            .map_err(|m| Error::new(Kind::Usage, format!("-2/--additionalhash: {m}")))?;
    }
    if args.workers == 0 {
        return Err(Error::new(Kind::Usage, "-w/--workers must be at least 1"));
    }
    if let Some(map) = &args.bad_blocks {
        target::check_writable(map, "--bad-blocks").map_err(|m| Error::new(Kind::Usage, m))?;
    }
    if let Some(df) = &args.digest_file {
        target::check_writable(df, "--digest-file").map_err(|m| Error::new(Kind::Usage, m))?;
        if matches!(pair.source, Endpoint::Remote { .. }) {
            return Err(Error::new(
                Kind::Usage,
                "--digest-file is kept on the source's machine: use it for a local sync or a push (run the pull as a push on the other machine)",
            ));
        }
    }
    let min_block = size::parse_size(&args.min_block)
        .map_err(|m| Error::new(Kind::Usage, format!("--min-block {m}")))?;
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&min_block) {
        return Err(Error::new(
            Kind::Usage,
            format!(
                "--min-block {} is not usable; give 512 to the block size",
                args.min_block
            ),
        ));
    }
    // No more pieces per block than a frame may list.
    let min_block = min_block.max(block.div_ceil(protocol::MAX_DIGESTS as u64));
    let refine = if args.no_refine || min_block >= block {
        0
    } else {
        min_block
    };
    Ok(Plan {
        pair,
        block,
        hash,
        refine,
    })
}

/// What the source does about unreadable sectors, from the options.
pub(crate) fn salvage_of(args: &Args) -> engine::Salvage {
    engine::Salvage {
        max_errors: args.max_errors.unwrap_or(u64::MAX),
        keep_unreadable: args.keep_unreadable,
    }
}

/// One-line notes for options that do nothing in a local sync.
fn local_notes(args: &Args) -> Vec<&'static str> {
    let mut notes = Vec::new();
    let mut say = |on: bool, text: &'static str| {
        if on {
            notes.push(text)
        }
    };
    say(
        args.workers > 1,
        "-w/--workers applies to ssh streams; a local sync already uses every core",
    );
    say(
        args.splay.is_some(),
        "-l/--splay is accepted for blocksync.py compatibility; streams start at once",
    );
    say(
        args.cipher.is_some(),
        "-c/--cipher applies to ssh; ignored for a local sync",
    );
    say(
        args.compress.is_some(),
        "-C/--compress applies to ssh; a local sync copies blocks directly",
    );
    say(
        args.identity.is_some()
            || args.pass.is_some()
            || args.extra_params.is_some()
            || args.rsh.is_some(),
        "ssh options (-i, -P, -x, -e) are ignored for a local sync",
    );
    say(
        args.sudo,
        "-s/--sudo applies to the remote side; run blocksync itself with sudo for local devices",
    );
    say(
        args.remote_bin.is_some(),
        "-S/--script names the remote blocksync; ignored for a local sync",
    );
    say(
        args.interpreter.is_some(),
        "-I/--interpreter is not needed: blocksync is one binary on both sides",
    );
    say(
        args.create_dest,
        "-T/--createdest is implied: a missing destination file is always created",
    );
    say(
        args.hash != "blake3" || args.additional_hash.is_some(),
        "a local sync compares bytes directly; -1/-2 hashes apply to remote syncs",
    );
    say(
        args.fadvise & 2 != 0,
        "-d bit 2 (remote page cache) does not apply to a local sync",
    );
    say(
        args.bwlimit.is_some() || args.no_compress || args.no_deploy,
        "--bwlimit, --no-compress and --no-deploy apply to ssh; ignored for a local sync",
    );
    notes
}

/// Runs the sync the arguments describe.
pub fn run(args: &Args, reporter: &Reporter) -> Result<()> {
    let plan = plan(args)?;
    match (&plan.pair.source, &plan.pair.destination) {
        (Endpoint::Local(s), Endpoint::Local(d)) => {
            for n in local_notes(args) {
                reporter.note(n);
            }
            run_local(args, reporter, &plan, s, d)
        }
        (Endpoint::Local(s), Endpoint::Remote { host, path }) => {
            client::run(args, reporter, &plan, host, path, s, true)
        }
        (Endpoint::Remote { host, path }, Endpoint::Local(d)) => {
            client::run(args, reporter, &plan, host, path, d, false)
        }
        _ => unreachable!("both remote is refused by parse_operands"),
    }
}

/// Asks before changing an existing destination, unless `-f` or a dry run; refuses when
/// there is no terminal to ask on.
pub(crate) fn confirm_change(
    args: &Args,
    reporter: &Reporter,
    destination: &str,
    kind: &str,
    size: u64,
    source: &str,
) -> Result<()> {
    if args.dry_run || args.force {
        return Ok(());
    }
    let question = format!(
        "destination {destination} exists ({kind} of {size} bytes) and will be overwritten where it differs from {source}. Continue?"
    );
    match reporter.confirm(&question) {
        Some(true) => Ok(()),
        Some(false) => Err(Error::new(
            Kind::NotConfirmed,
            format!("not confirmed; destination {destination} left unchanged"),
        )),
        None => Err(Error::new(
            Kind::NotConfirmed,
            format!(
                "destination {destination} exists and would be changed; pass -f to go ahead (no terminal to ask on)"
            ),
        )),
    }
}

/// The flag Ctrl-C or SIGTERM sets (handlers installed on the first call); a second
/// signal ends the process at once.
pub(crate) fn cancel_on_signals() -> Arc<AtomicBool> {
    static CANCEL: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    CANCEL
        .get_or_init(|| {
            let cancel = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.clone());
                let _ = signal_hook::flag::register(sig, cancel.clone());
            }
            cancel
        })
        .clone()
}

/// After Ctrl-C, whatever failed next (ssh dies of the same Ctrl-C, say) is reported as
/// the interruption it is.
fn interrupted_if_cancelled(e: Error) -> Error {
    if e.kind != Kind::Interrupted && cancel_on_signals().load(std::sync::atomic::Ordering::Relaxed)
    {
        Error::new(
            Kind::Interrupted,
            "interrupted; what was written is flushed. Run the same command again to finish",
        )
    } else {
        e
    }
}

/// What a run knows about its two sides, for the summary.
pub(crate) struct Sides {
    pub source: String,
    pub destination: String,
    pub size: u64,
    pub block: u64,
    /// The destination before the run: kind and size, or `None` when it was missing.
    pub existing: Option<(TargetKind, u64)>,
    /// The source half ran on this machine (its progress is how far the source was read).
    pub source_here: bool,
}

/// Prints the summary of a finished (or interrupted) run and returns its result.
pub(crate) fn conclude(
    args: &Args,
    reporter: &Reporter,
    stats: &Stats,
    started: Instant,
    sides: Sides,
    result: Result<()>,
) -> Result<()> {
    let mut summary = Summary::from_stats(stats, started.elapsed());
    summary.source = sides.source;
    summary.destination = sides.destination;
    summary.dry_run = args.dry_run;
    summary.size = sides.size;
    summary.block_size = sides.block;
    summary.blocks_total = sides.size.div_ceil(sides.block);
    summary.destination_created = sides.existing.is_none();
    match sides.existing {
        Some((TargetKind::File, old)) if old > sides.size => {
            summary.destination_truncated_from = Some(old)
        }
        Some((TargetKind::BlockDevice, old)) if old > sides.size => {
            summary.destination_tail_kept = Some(old - sides.size)
        }
        _ => {}
    }
    summary.status = if args.dry_run { "dry-run" } else { "ok" };
    let result = result.map_err(interrupted_if_cancelled);
    let findings = stats.findings();
    summary.unreadable_bytes = engine::Findings::bytes(&findings.unreadable);
    summary.unreadable_ranges = findings.unreadable.len() as u64;
    summary.mismatch_bytes = engine::Findings::bytes(&findings.mismatch);
    summary.source_changed_bytes = engine::Findings::bytes(&findings.source_changed);
    if args.verify && !args.dry_run && result.is_ok() {
        summary.verified_bytes = Some(Stats::get(&stats.verified));
    }
    if let Some(path) = &args.bad_blocks {
        // Written even when the run failed: it tells what was found so far.
        // After a failure, how far the source was read is known only for one stream read
        // here (a remote source's progress counts reports, some hashed ahead).
        let reached = match &result {
            Ok(()) => Some(sides.size),
            Err(_) if args.workers == 1 && sides.source_here => {
                Some(Stats::get(&stats.done).min(sides.size))
            }
            Err(_) => None,
        };
        let map = badmap::render(sides.size, &findings.unreadable, reached);
        badmap::write(path, &map)
            .map_err(|e| Error::io(Kind::Io, "writing the bad-blocks map", path, &e, ""))?;
        summary.bad_blocks_map = Some(path.display().to_string());
    }
    let first = |list: &[std::ops::Range<u64>]| list.first().map_or(0, |r| r.start);
    let outcome = match result {
        Ok(()) if summary.mismatch_bytes > 0 => {
            summary.status = "verify-failed";
            Err(Error::new(
                Kind::Verify,
                format!(
                    "verify failed: {} bytes in {} ranges of {} differ from the source (first at byte {}); run again to rewrite them, and check the destination's disk",
                    summary.mismatch_bytes,
                    findings.mismatch.len(),
                    summary.destination,
                    first(&findings.mismatch)
                ),
            ))
        }
        Ok(()) if summary.source_changed_bytes > 0 => {
            summary.status = "source-changed";
            Err(Error::new(
                Kind::SourceChanged,
                format!(
                    "the source changed while it was synced: {} bytes in {} ranges (first at byte {}); the destination holds them as they were read. Sync from a snapshot or a read-only source, or run again",
                    summary.source_changed_bytes,
                    findings.source_changed.len(),
                    first(&findings.source_changed)
                ),
            ))
        }
        Ok(()) if summary.unreadable_bytes > 0 => {
            summary.status = "unreadable";
            let there = if args.keep_unreadable {
                "the destination keeps its old bytes there"
            } else {
                "the destination has zeros there"
            };
            let map = match &args.bad_blocks {
                Some(p) => format!("map in {}", p.display()),
                None => "give --bad-blocks FILE for a map".to_string(),
            };
            Err(Error::new(
                Kind::Unreadable,
                format!(
                    "{} bytes of {} could not be read ({} ranges, first at byte {}); {there}; {map}",
                    summary.unreadable_bytes,
                    summary.source,
                    summary.unreadable_ranges,
                    first(&findings.unreadable)
                ),
            ))
        }
        Ok(()) => Ok(()),
        Err(e) if e.kind == Kind::Interrupted => {
            summary.status = "interrupted";
            summary.destination_truncated_from = None;
            Err(Error::new(
                Kind::Interrupted,
                "interrupted; what was written is flushed. Run the same command again to finish",
            ))
        }
        Err(e) => return Err(e),
    };
    if let Err(e) = &outcome {
        // One JSON object for scripts: the summary carries the error.
        summary.error = Some(e.message.clone());
        summary.exit_code = e.kind.exit_code();
    }
    reporter.summary(&summary);
    outcome
}

fn run_local(
    args: &Args,
    reporter: &Reporter,
    plan: &Plan,
    src_path: &Path,
    dst_path: &Path,
) -> Result<()> {
    let block = plan.block;
    let src = target::open_source(src_path)?;
    let probe = target::probe_destination(dst_path)?;
    if let Some(existing) = &probe.existing {
        if target::same_data(&src.id, &existing.id) {
            return Err(Error::new(
                Kind::SameFile,
                format!(
                    "source {} and destination {} are the same data; give a different destination",
                    src_path.display(),
                    dst_path.display()
                ),
            ));
        }
        if existing.kind == TargetKind::BlockDevice {
            target::check_device(dst_path, existing, src.size, args.force_mounted)?;
        }
    }
    note_busy_source(reporter, &src);
    if let Some(existing) = &probe.existing {
        confirm_change(
            args,
            reporter,
            &dst_path.display().to_string(),
            existing.kind.name(),
            existing.size,
            &src_path.display().to_string(),
        )?;
    }

    // Every check has passed: only now is the destination opened for writing or created.
    let dest = open_dest_for_run(args, &probe)?;

    let layout = Layout::new(src.size, block);
    let mut config = Config::new(layout);
    config.compare = Compare::Bytes;
    config.dry_run = args.dry_run;
    config.pause = Duration::from_millis(args.pause);
    config.drop_cache = args.fadvise & 1 != 0;
    config.buffers = server::buffers_for(layout.chunk);
    config.sparse = !args.no_sparse;
    config.discard = args.discard;
    config.refine = plan.refine;
    config.salvage = salvage_of(args);
    if args.verify {
        config.verify = Some(engine::VerifyLog::new(plan.hash));
    }
    let cached = match &dest {
        Some(d) => {
            let state = digestcache::DestState {
                label: std::fs::canonicalize(dst_path)
                    .unwrap_or_else(|_| dst_path.to_path_buf())
                    .display()
                    .to_string(),
                size: probe.existing.map_or(0, |e| e.size),
                size_after: match d.kind {
                    TargetKind::File => src.size,
                    TargetKind::BlockDevice => d.size,
                },
                sync_id: syncid::load(d),
            };
            digestcache::prepare(args, plan.hash, block, src.size, &state, 1)?
        }
        None => None,
    };
    if let Some(u) = &cached {
        config.cache = Some(u.cache.clone());
        config.track = (!args.dry_run).then_some(u.new_id);
        if u.skip_reading {
            // The digest file stands in for the destination: compare digests.
            config.compare = Compare::Digest(plan.hash);
            config.dest_reads = false;
            config.refine = 0;
        }
    }

    let cancel = cancel_on_signals();
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let progress = reporter.start_progress(src.size, stats.clone());
    let result = engine::sync_local(&src, dest.as_ref(), &config, &stats, &cancel);
    progress.finish();
    drop(config);
    let result = match cached {
        Some(u) => {
            let sealed = digestcache::finish(u.cache, &result, &stats.findings());
            result.and(sealed)
        }
        None => result,
    };
    let sides = Sides {
        source: src_path.display().to_string(),
        destination: dst_path.display().to_string(),
        size: src.size,
        block,
        existing: probe.existing.map(|e| (e.kind, e.size)),
        source_here: true,
    };
    conclude(args, reporter, &stats, started, sides, result)
}

/// Warns when the source device is in use: blocks changing under the sync make a
/// copy that matches no moment of the source.
pub(crate) fn note_busy_source(reporter: &Reporter, src: &target::Target) {
    if src.kind == TargetKind::BlockDevice
        && let Some(why) = src.id.rdev.and_then(target::device_in_use)
    {
        reporter.note(&format!(
            "source {} is in use ({why}); blocks changing during the sync make an inconsistent copy: sync from a snapshot or unmounted device",
            src.path.display()
        ));
    }
}

/// Opens the local destination once every check has passed: read-only (or not at all
/// when missing) in a dry run, else for writing, creating a missing file.
pub(crate) fn open_dest_for_run(
    args: &Args,
    probe: &target::DestProbe,
) -> Result<Option<target::Target>> {
    if args.dry_run {
        match &probe.existing {
            Some(_) => Ok(Some(target::open_read(
                &probe.path,
                "destination",
                Kind::Destination,
            )?)),
            None => Ok(None),
        }
    } else {
        Ok(Some(target::open_destination(probe, args.force_mounted)?))
    }
}
