//! The offline commands, `blocksync digest | diff | apply`: argument handling, files, and
//! the one-line reports (the work itself is in [`crate::offline::patch`]).

use crate::app::cli::{ApplyArgs, DiffArgs, DigestArgs};
use crate::error::{Error, Kind, Result};
use crate::hash::HashKind;
use crate::io::target;
use clap::Parser;
use std::io::{IsTerminal, Write};
use std::path::Path;

/// The subcommands, by the word that selects them.
pub const COMMANDS: [&str; 3] = ["digest", "diff", "apply"];

/// Runs the subcommand named by the first argument; returns the exit code.
pub fn main(command: &str) -> i32 {
    let args = std::env::args_os().skip(2);
    let name = std::iter::once(std::ffi::OsString::from(format!("blocksync {command}")));
    let result = match command {
        "digest" => run_digest(&DigestArgs::parse_from(name.chain(args))),
        "diff" => run_diff(&DiffArgs::parse_from(name.chain(args))),
        _ => run_apply(&ApplyArgs::parse_from(name.chain(args))),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("blocksync {command}: error: {}", e.message);
            e.kind.exit_code()
        }
    }
}

fn block_size(text: &str) -> Result<u64> {
    let b = crate::size::parse_size(text)
        .map_err(|m| Error::new(Kind::Usage, format!("block size {m}")))?;
    if !(crate::size::MIN_BLOCK..=crate::size::MAX_BLOCK).contains(&b) {
        return Err(Error::new(
            Kind::Usage,
            format!("block size {text} is not usable; give 512 to 64M"),
        ));
    }
    Ok(b)
}

/// Writes to `path` through a temporary file renamed into place once complete, or to
/// stdout for `-` (refused on a terminal: the output is binary).
fn write_output(
    path: Option<&Path>,
    what: &str,
    body: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    match path.filter(|p| *p != Path::new("-")) {
        None => {
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                return Err(Error::new(
                    Kind::Usage,
                    format!("the {what} is binary: give -o FILE or redirect stdout"),
                ));
            }
            body(&mut stdout.lock())
        }
        Some(p) => {
            crate::io::target::check_writable(p, "-o").map_err(|m| Error::new(Kind::Usage, m))?;
            crate::io::target::write_atomically(
                p,
                |f| body(f),
                |at, e| Error::io(Kind::Io, "writing", at, &e, ""),
            )
        }
    }
}

fn run_digest(a: &DigestArgs) -> Result<()> {
    let block = block_size(&a.block_size)?;
    let kind: HashKind = a.hash.parse().map_err(|m| Error::new(Kind::Usage, m))?;
    let t = target::open_read(&a.target, "target", Kind::Source)?;
    let label = std::fs::canonicalize(&a.target)
        .unwrap_or_else(|_| a.target.clone())
        .display()
        .to_string();
    write_output(Some(&a.output), "digest file", |w| {
        crate::offline::patch::digest(&t, block, kind, label, w)
    })?;
    if !a.quiet {
        eprintln!(
            "blocksync digest: {} ({} bytes) in {} blocks of {block} -> {}",
            a.target.display(),
            t.size,
            t.size.div_ceil(block),
            a.output.display()
        );
    }
    Ok(())
}

fn run_diff(a: &DiffArgs) -> Result<()> {
    let against = crate::offline::patch::open_against(&a.against)?;
    let src = target::open_source(&a.source)?;
    let mut stats = None;
    write_output(a.output.as_deref(), "patch", |w| {
        stats = Some(crate::offline::patch::diff(&src, &against, a.compress, w)?);
        Ok(())
    })?;
    if let (Some(s), false) = (stats, a.quiet) {
        eprintln!(
            "blocksync diff: {} against {}: {} blocks changed, {} zeroed; patch of {} bytes",
            a.source.display(),
            against.header.label,
            s.data_blocks,
            s.zero_blocks,
            s.bytes
        );
    }
    Ok(())
}

fn run_apply(a: &ApplyArgs) -> Result<()> {
    // The patch first: a bad one must not even open the target for writing.
    let patch = crate::offline::patch::Patch::open(&a.patch)?;
    let probe = target::probe_destination(&a.target)?;
    let Some(existing) = probe.existing else {
        return Err(Error::new(
            Kind::Destination,
            format!(
                "target {} does not exist; a patch changes an existing target",
                a.target.display()
            ),
        ));
    };
    let claim = target::Claim::whole(true);
    let _held = target::hold(&probe, claim)?;
    target::check_destination(
        &a.target,
        &existing,
        patch.header.source_size,
        a.force_mounted,
    )?;
    let how = target::OpenDest {
        force_mounted: a.force_mounted,
        // An existing target only (checked above): never created.
        mode: 0o600,
        shared: false,
        claim,
    };
    let t = target::open_destination(&probe, how)?;
    let started = std::time::Instant::now();
    let s = crate::offline::patch::apply(&patch, &t)?;
    let secs = started.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "status": "ok",
            "target": a.target.display().to_string(),
            "records": s.records,
            "bytes_written": s.written,
            "bytes_read": s.read,
            "size": patch.header.source_size,
            "verified": true,
            "elapsed_seconds": secs,
        });
        // A closed stdout must not undo an applied patch's exit code.
        let _ = writeln!(std::io::stdout().lock(), "{v}");
    } else if !a.quiet {
        eprintln!(
            "blocksync apply: {} records, {} bytes written to {}; verified against the source's digest ({secs:.2} s)",
            s.records,
            s.written,
            a.target.display()
        );
    }
    Ok(())
}
