//! `--digest-file`: deciding, before anything is written, whether the digest file may
//! stand in for reading the destination, and setting up the file for the next run.

use crate::digestfile::cache::Cache;
use crate::digestfile::format::{DigestFile, DigestWriter, Header};
use crate::digestfile::syncid::SyncId;
use crate::error::{Error, Kind, Result};
use crate::hash::BlockInfo;
use crate::hash::HashKind;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// Spot-checks per run: enough to catch a destination replaced or rewritten wholesale,
/// cheap enough to be nothing next to the sync.
const SPOT_CHECKS: u64 = 8;

/// `--digest-file FILE` as the run asks for it.
#[derive(Debug, Clone)]
pub struct DigestOptions {
    /// The file, on the source's machine.
    pub path: PathBuf,
    /// `--digest-rebuild`: ignore its contents, read the destination, write it anew.
    pub rebuild: bool,
    /// A dry run reads the file but writes no new one.
    pub dry_run: bool,
}

/// How this run uses the digest file.
pub struct Use {
    /// For the engine (source half).
    pub cache: Arc<Cache>,
    /// The destination is not read (the old file is trusted after spot-checks).
    pub skip_reading: bool,
    /// The id the destination records when the sync completes.
    pub new_id: SyncId,
}

/// What is known of the destination before the sync.
pub struct DestState {
    /// How the digest file names it: a canonical local path, or `host:path`.
    pub label: String,
    /// Its size now (0: missing).
    pub size: u64,
    /// Its size once synced (a file ends up the source's size, a device keeps its own).
    pub size_after: u64,
    /// The id of the last sync completed onto it (zeros: none).
    pub sync_id: SyncId,
}

fn stale(path: &str, why: &str) -> Error {
    Error::new(
        Kind::StaleCache,
        format!(
            "digest file {path} {why}; run with --digest-rebuild to read the destination once and write a new one"
        ),
    )
}

/// Opens, checks and sets up the digest file of a run.
pub fn prepare(
    opts: &DigestOptions,
    hash: HashKind,
    block: u64,
    source_size: u64,
    dest: &DestState,
    streams: usize,
) -> Result<Use> {
    let path = &opts.path;
    let name = path.display().to_string();
    let old = if opts.rebuild || !path.exists() {
        None
    } else {
        let f = DigestFile::open(path).map_err(|m| {
            Error::new(
                Kind::StaleCache,
                format!("{m}; run with --digest-rebuild to write a new one"),
            )
        })?;
        let h = &f.header;
        if h.hash != hash || h.block != block {
            return Err(stale(
                &name,
                &format!(
                    "was made with --hash {} -b {}, this run uses --hash {} -b {}",
                    h.hash.name(),
                    h.block,
                    hash.name(),
                    block
                ),
            ));
        }
        if h.label != dest.label {
            return Err(stale(
                &name,
                &format!("describes {}, not {}", h.label, dest.label),
            ));
        }
        if h.sync_id == [0; 16] || h.sync_id != dest.sync_id {
            return Err(stale(
                &name,
                &format!(
                    "does not match {}: it was synced by another run or changed since",
                    dest.label
                ),
            ));
        }
        // u64::MAX: left by a run that did not complete, the size is not known.
        if h.target_size != u64::MAX && h.target_size != dest.size {
            return Err(stale(
                &name,
                &format!(
                    "says {} is {} bytes, it is {}",
                    dest.label, h.target_size, dest.size
                ),
            ));
        }
        Some(f)
    };
    // Only blocks whole in the file, in the source and in the destination: the last,
    // partial block of another size would never compare equal.
    let whole = |n: u64| n / block;
    let spot = match &old {
        Some(f) => pick_spots(
            f,
            whole(f.header.size)
                .min(whole(source_size))
                .min(whole(dest.size)),
        ),
        None => Vec::new(),
    };
    let new_id = crate::digestfile::syncid::fresh();
    let new =
        if opts.dry_run {
            None
        } else {
            let header = Header {
                hash,
                block,
                size: source_size,
                target_size: dest.size_after,
                sync_id: new_id,
                label: dest.label.clone(),
            };
            Some(DigestWriter::create(path, header).map_err(|e| {
                Error::io(Kind::Usage, "cannot write the digest file", path, &e, "")
            })?)
        };
    let skip_reading = old.is_some();
    let cache =
        Cache::new(hash, name, dest.label.clone(), old, spot, new, streams).map_err(|e| {
            Error::io(
                Kind::Io,
                "a temporary file beside the digest file",
                path,
                &e,
                "",
            )
        })?;
    Ok(Use {
        cache: Arc::new(cache),
        skip_reading,
        new_id,
    })
}

/// A few random blocks among the first `n` that the file has digests for.
fn pick_spots(f: &DigestFile, n: u64) -> Vec<u64> {
    if n == 0 {
        return Vec::new();
    }
    let seed = crate::digestfile::syncid::fresh();
    let mut x = u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")) | 1;
    let mut out = Vec::new();
    for _ in 0..SPOT_CHECKS * 4 {
        if out.len() as u64 >= SPOT_CHECKS.min(n) {
            break;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % n;
        let known = f.entries(b, 1).is_ok_and(|e| e[0] != BlockInfo::Missing);
        if known && !out.contains(&b) {
            out.push(b);
        }
    }
    out
}

/// Seals the new digest file after the run: complete when the sync succeeded, partial
/// when it failed, not at all when the old file was found stale (it must not be trusted
/// again). The `forget` ranges (what `--verify` found different) are recorded as unknown.
pub fn finish(cache: Arc<Cache>, outcome: &Result<()>, forget: &[Range<u64>]) -> Result<()> {
    if matches!(outcome, Err(e) if e.kind == Kind::StaleCache) {
        return Ok(()); // dropped: the temporary file goes, the old one stays (stale)
    }
    let name = cache.name.clone();
    match Arc::try_unwrap(cache) {
        Ok(c) => c.finish(outcome.is_ok(), forget).map_err(|e| {
            Error::new(
                Kind::Io,
                format!("writing digest file {name}: {}", crate::error::os_text(&e)),
            )
        }),
        Err(_) => Err(Error::new(Kind::Internal, "digest file still in use")),
    }
}
