//! A sync with both sides on this machine: every check, then both halves of the engine in
//! this process, comparing bytes directly.

use super::interact::{Change, cancel_on_signals, confirm_change};
use super::report::Reporter;
use super::settings::Settings;
use super::undo::Undo;
use super::verdict::{Sides, conclude, seal_digests};
use crate::digestfile::{syncid, trust};
use crate::engine::{self, Compare, Config, Layout, Stats};
use crate::error::{Error, Kind, Result};
use crate::io::target::{self, Claim, DestProbe, Target, TargetKind};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Syncs `src_path` onto `dst_path`.
pub(crate) fn run(
    settings: &Settings,
    reporter: &Reporter,
    src_path: &Path,
    dst_path: &Path,
) -> Result<()> {
    let stream = settings.stream_source();
    let src = if stream {
        target::open_stdin()?
    } else {
        target::open_source(src_path)?
    };
    let probe = target::probe_destination(dst_path)?;
    // A new file is written under a temporary name (or an interrupted first copy resumed).
    let probe = if settings.dry_run {
        probe
    } else {
        crate::io::partial::as_partial(probe)?
    };
    // One run at a time: locked before any check, held until the run ends.
    let _held = target::hold(&probe, Claim::whole(!settings.dry_run))?;
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
        target::check_destination(dst_path, existing, src.size, settings.force_mounted)?;
    }
    if probe.shown().is_none() && !settings.dry_run && !stream {
        let data = crate::io::policy::data_bytes(&src);
        crate::io::policy::check_room_for_new(&probe.path, data, src.size, settings.sparse)?;
    }
    note_busy_source(reporter, &src);
    let undo = Undo::decide(&settings.undo_wanted(), &probe, settings.dry_run)?;
    super::undo::note_unavailable(reporter, undo.decision, &dst_path.display().to_string());
    if let Some(existing) = &probe.shown() {
        let change = Change {
            destination: &dst_path.display().to_string(),
            kind: existing.kind.name(),
            size: existing.size,
            source_size: src.size,
            source: &src_path.display().to_string(),
            stream,
            undo: undo.decision.promise(),
        };
        confirm_change(settings, reporter, &change)?;
    }
    let source_label = src_path.display().to_string();
    let journal = undo.plan(crate::digestfile::syncid::fresh(), (0, 1), source_label)?;

    // Every check has passed: only now is the destination opened for writing or created.
    let dest = open_dest_for_run(settings, &probe, target::copy_mode(&src))?;

    let layout = match (stream, &dest) {
        (true, d) => stream_layout(d.as_ref().map(|d| (d.kind, d.size)), settings.block),
        (false, _) => Layout::new(src.size, settings.block),
    };
    let mut config = Config::build(layout, &settings.run_options(Compare::Bytes));
    config.stream = stream.then(Default::default);
    config.journal = journal;
    config.rename_to = probe.final_path.clone();
    let cached = prepare_cache(settings, dst_path, &probe, dest.as_ref(), src.size)?;
    if let Some(u) = &cached {
        config.cache = Some(u.cache.clone());
        config.track = (!settings.dry_run).then_some(u.new_id);
        if u.skip_reading {
            // The digest file stands in for the destination: compare digests.
            config.compare = Compare::Digest(settings.hash);
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
    let size = config
        .stream
        .as_deref()
        .map_or(src.size, |s| s.size(&stats));
    drop(config);
    let result = seal_digests(cached, result, &stats);
    let sides = Sides {
        source: src_path.display().to_string(),
        destination: dst_path.display().to_string(),
        size,
        block: settings.block,
        existing: probe.shown().map(|e| (e.kind, e.size)),
        source_here: true,
    };
    conclude(settings, reporter, &stats, started, sides, result)
}

/// The layout for a stream source onto a destination of `dest` (kind and size; `None`:
/// a new file): a device's size bounds it, a file's growth does not.
pub(crate) fn stream_layout(dest: Option<(TargetKind, u64)>, block: u64) -> Layout {
    match dest {
        Some((TargetKind::BlockDevice, size)) => Layout::stream(size, block),
        _ => Layout::stream(STREAM_BOUND, block),
    }
}

/// How long a stream onto a file may be: far past any disk (1 EiB), a multiple of every
/// chunk size.
const STREAM_BOUND: u64 = 1 << 60;

/// With `--digest-file`: whether the file may stand in for reading the destination.
fn prepare_cache(
    settings: &Settings,
    dst_path: &Path,
    probe: &DestProbe,
    dest: Option<&Target>,
    src_size: u64,
) -> Result<Option<trust::Use>> {
    Ok(match (dest, &settings.digest) {
        (Some(d), Some(opts)) => {
            let state = trust::DestState {
                label: std::fs::canonicalize(dst_path)
                    .unwrap_or_else(|_| dst_path.to_path_buf())
                    .display()
                    .to_string(),
                size: probe.existing.map_or(0, |e| e.size),
                size_after: match d.kind {
                    TargetKind::File => src_size,
                    TargetKind::BlockDevice => d.size,
                },
                sync_id: syncid::load(d),
            };
            Some(trust::prepare(
                opts,
                settings.hash,
                settings.block,
                src_size,
                &state,
                1,
            )?)
        }
        _ => None,
    })
}

/// Warns when the source device is in use: blocks changing under the sync make a
/// copy that matches no moment of the source.
pub(crate) fn note_busy_source(reporter: &Reporter, src: &Target) {
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
/// when missing) in a dry run, else for writing, creating a missing file with permission
/// bits `mode` (the source's: see [`target::copy_mode`]).
pub(crate) fn open_dest_for_run(
    settings: &Settings,
    probe: &DestProbe,
    mode: u32,
) -> Result<Option<Target>> {
    if settings.dry_run {
        match &probe.existing {
            Some(_) => Ok(Some(target::open_read(
                &probe.path,
                "destination",
                Kind::Destination,
            )?)),
            None => Ok(None),
        }
    } else {
        let how = target::OpenDest {
            force_mounted: settings.force_mounted,
            mode,
            shared: false,
            claim: Claim::whole(true),
        };
        Ok(Some(target::open_destination(probe, how)?))
    }
}
