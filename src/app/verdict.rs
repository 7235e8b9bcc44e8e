//! The end of a run: its findings and error become the exit code, the summary and, with
//! `--bad-blocks`, the map of what could not be read.

use super::badmap;
use super::interact::cancelled;
use super::report::{Reporter, Summary};
use super::settings::Settings;
use crate::digestfile::trust;
use crate::engine::{Findings, Stats};
use crate::error::{Error, Kind, Result};
use crate::io::target::TargetKind;
use std::ops::Range;
use std::time::Instant;

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

const INTERRUPTED: &str =
    "interrupted; what was written is flushed. Run the same command again to finish";

/// After Ctrl-C, ssh dies of the same signal, so a lost link is the interruption it is.
/// Any other failure (a write that failed, a flush that did not happen) is real and is
/// reported as such, with its own exit code.
pub(crate) fn interrupted_if_cancelled(e: Error) -> Error {
    if e.kind == Kind::Remote && cancelled() {
        Error::new(Kind::Interrupted, INTERRUPTED)
    } else {
        e
    }
}

/// Seals the run's new digest file, if it has one (see [`trust::finish`]): what
/// `--verify` found different is not vouched for.
pub(crate) fn seal_digests(
    cached: Option<trust::Use>,
    result: Result<()>,
    stats: &Stats,
) -> Result<()> {
    let Some(u) = cached else {
        return result;
    };
    let findings = stats.findings();
    let mut forget = findings.mismatch;
    forget.extend(findings.source_changed);
    let sealed = trust::finish(u.cache, &result, &forget);
    result.and(sealed)
}

/// Prints the summary of a finished (or interrupted) run and returns its result.
pub(crate) fn conclude(
    settings: &Settings,
    reporter: &Reporter,
    stats: &Stats,
    started: Instant,
    sides: Sides,
    result: Result<()>,
) -> Result<()> {
    let mut summary = summary_of(settings, stats, started, &sides);
    let result = result.map_err(interrupted_if_cancelled);
    let findings = stats.findings();
    summary.unreadable_bytes = Findings::bytes(&findings.unreadable);
    summary.unreadable_ranges = findings.unreadable.len() as u64;
    summary.mismatch_bytes = Findings::bytes(&findings.mismatch);
    summary.source_changed_bytes = Findings::bytes(&findings.source_changed);
    if settings.verify && !settings.dry_run && result.is_ok() {
        summary.verified_bytes = Some(Stats::get(&stats.verified));
    }
    if let Some(path) = &settings.bad_blocks {
        // Written even when the run failed: it tells what was found so far.
        // After a failure, how far the source was read is known only for one stream read
        // here (a remote source's progress counts reports, some hashed ahead).
        let reached = match &result {
            Ok(()) => Some(sides.size),
            Err(_) if settings.workers == 1 && sides.source_here => {
                Some(Stats::get(&stats.done).min(sides.size))
            }
            Err(_) => None,
        };
        let map = badmap::render(sides.size, &findings.unreadable, reached);
        badmap::write(path, &map)
            .map_err(|e| Error::io(Kind::Io, "writing the bad-blocks map", path, &e, ""))?;
        summary.bad_blocks_map = Some(path.display().to_string());
    }
    let outcome = match result {
        Ok(()) => findings_verdict(settings, &mut summary, &findings),
        Err(e) if e.kind == Kind::Interrupted => {
            summary.status = "interrupted";
            summary.destination_truncated_from = None;
            Err(Error::new(Kind::Interrupted, INTERRUPTED))
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

/// The summary's fields that the sides and counters give.
fn summary_of(settings: &Settings, stats: &Stats, started: Instant, sides: &Sides) -> Summary {
    let mut summary = Summary::from_stats(stats, started.elapsed());
    summary.source = sides.source.clone();
    summary.destination = sides.destination.clone();
    summary.dry_run = settings.dry_run;
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
    summary.status = if settings.dry_run { "dry-run" } else { "ok" };
    // A push's servers report theirs with their last answer.
    summary.journal_bytes = Some(Stats::get(&stats.journaled));
    summary
}

/// A run that completed: what its findings make of it, worst first.
fn findings_verdict(settings: &Settings, summary: &mut Summary, findings: &Findings) -> Result<()> {
    let first = |list: &[Range<u64>]| list.first().map_or(0, |r| r.start);
    if summary.mismatch_bytes > 0 {
        summary.status = "verify-failed";
        return Err(Error::new(
            Kind::Verify,
            format!(
                "verify failed: {} bytes in {} ranges of {} differ from the source (first at byte {}); run again to rewrite them, and check the destination's disk",
                summary.mismatch_bytes,
                findings.mismatch.len(),
                summary.destination,
                first(&findings.mismatch)
            ),
        ));
    }
    if summary.source_changed_bytes > 0 {
        summary.status = "source-changed";
        return Err(Error::new(
            Kind::SourceChanged,
            format!(
                "the source changed while it was synced: {} bytes in {} ranges (first at byte {}); the destination holds them as they were read. Sync from a snapshot or a read-only source, or run again",
                summary.source_changed_bytes,
                findings.source_changed.len(),
                first(&findings.source_changed)
            ),
        ));
    }
    if summary.unreadable_bytes > 0 {
        summary.status = "unreadable";
        let there = if settings.salvage.keep_unreadable {
            "the destination keeps its old bytes there"
        } else {
            "the destination has zeros there"
        };
        let map = match &settings.bad_blocks {
            Some(p) => format!("map in {}", p.display()),
            None => "give --bad-blocks FILE for a map".to_string(),
        };
        return Err(Error::new(
            Kind::Unreadable,
            format!(
                "{} bytes of {} could not be read ({} ranges, first at byte {}); {there}; {map}",
                summary.unreadable_bytes,
                summary.source,
                summary.unreadable_ranges,
                first(&findings.unreadable)
            ),
        ));
    }
    if settings.check {
        return check_verdict(summary);
    }
    Ok(())
}

/// `--check`: equal is success; a difference is its own exit code, saying what differs.
fn check_verdict(summary: &mut Summary) -> Result<()> {
    let mut what = Vec::new();
    if summary.destination_created {
        what.push(format!("{} does not exist", summary.destination));
    }
    if summary.blocks_changed > 0 && !summary.destination_created {
        what.push(format!(
            "{} of {} blocks differ ({} bytes)",
            summary.blocks_changed, summary.blocks_total, summary.bytes_changed
        ));
    }
    if let Some(old) = summary.destination_truncated_from {
        what.push(format!(
            "it is longer ({old} bytes, the source {})",
            summary.size
        ));
    }
    if what.is_empty() {
        summary.status = "equal";
        return Ok(());
    }
    summary.status = "differs";
    Err(Error::new(
        Kind::Differs,
        format!(
            "{} differs from {}: {}; nothing was written",
            summary.destination,
            summary.source,
            what.join(", ")
        ),
    ))
}
