//! The command line resolved once into validated settings: every option is checked here,
//! before anything is opened, and nothing below `app` sees a clap type.

use super::cli::Args;
use super::endpoint::{self, Endpoint, Pair};
use super::report::{ProgressMode, Reporter};
use crate::digestfile::trust::DigestOptions;
use crate::engine::{Compare, RunOptions, Salvage, VerifyLog};
use crate::error::{Error, Kind, Result};
use crate::hash::HashKind;
use crate::io::target;
use crate::size::{self, MAX_BLOCK, MIN_BLOCK};
use crate::ssh::connect::SshOptions;
use crate::ssh::quote::split_shell;
use crate::wire::frame::MAX_DIGESTS;
use std::path::PathBuf;
use std::time::Duration;

/// zstd level for changed blocks over ssh when `-C` gives none: fast, and still shrinks
/// compressible blocks well.
pub const DEFAULT_LEVEL: i32 = 1;

/// `--timeout` when none is given: long enough for any pause of a live peer (which says
/// it is alive every second), short enough that a stuck run ends on its own.
pub const DEFAULT_TIMEOUT: u64 = 120;

/// The validated settings of a sync.
pub(crate) struct Settings {
    /// Source and destination.
    pub pair: Pair,
    /// Block size.
    pub block: u64,
    /// Block digest.
    pub hash: HashKind,
    /// Sub-block size for refinement, 0 = off.
    pub refine: u64,
    /// `-n`: decide and report, write nothing.
    pub dry_run: bool,
    /// `--check`: a dry run whose exit code says whether the sides differ.
    pub check: bool,
    /// `-f`: change an existing destination without asking.
    pub force: bool,
    /// `--force-mounted`.
    pub force_mounted: bool,
    /// `--verify`.
    pub verify: bool,
    /// `--no-sparse` off.
    pub sparse: bool,
    /// `--discard`.
    pub discard: bool,
    /// `-p`: sleep after each block.
    pub pause: Duration,
    /// `-d` bit 1: drop this machine's page cache after use.
    pub drop_local: bool,
    /// `-d` bit 2: drop the remote machine's page cache after use.
    pub drop_remote: bool,
    /// Unreadable source sectors (`--max-errors`, `--keep-unreadable`).
    pub salvage: Salvage,
    /// `--bad-blocks FILE`.
    pub bad_blocks: Option<PathBuf>,
    /// `--digest-file FILE` (and `--digest-rebuild`).
    pub digest: Option<DigestOptions>,
    /// `-w`: ssh streams.
    pub workers: u32,
    /// A sync, or one of the commands about the last good copy.
    pub command: Command,
    /// `--keep-versions N`.
    pub keep_versions: Option<u32>,
    /// `--journal`, `--no-journal`, or neither.
    pub journal: crate::journal::Mode,
    /// `--journal-dir DIR`: on the destination's machine.
    pub journal_dir: Option<PathBuf>,
    /// How to reach the other machine; `None` for a local sync.
    pub remote: Option<RemoteSettings>,
    /// One-line notes on options that do nothing in this kind of run.
    pub notes: Vec<String>,
}

/// The settings of a sync with one side on another machine.
pub(crate) struct RemoteSettings {
    /// How to run ssh.
    pub ssh: SshOptions,
    /// zstd level for changed blocks; 0 = off.
    pub level: i32,
    /// The level was given (`--compress-level`): every block is compressed at it, even
    /// where the adaptive choice would send it as it is.
    pub level_fixed: bool,
    /// `--bwlimit` in bytes per second for the whole run; 0 = none.
    pub bwlimit: u64,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A sync.
    Sync,
    /// `blocksync rollback DST`: the destination is put back, no sync.
    Rollback,
    /// `blocksync versions DST`: the versions kept are listed.
    Versions,
    /// `blocksync restore DST --version K -o OUT`.
    Restore {
        /// K: 1 is the image before the last run.
        version: u32,
        /// OUT, on the destination's machine.
        out: PathBuf,
    },
}

impl Command {
    fn of(args: &Args) -> Command {
        match (&args.restore_version, &args.restore_out) {
            (Some(k), Some(out)) if args.restore => Command::Restore {
                version: *k,
                out: out.clone(),
            },
            _ if args.rollback => Command::Rollback,
            _ if args.versions => Command::Versions,
            _ => Command::Sync,
        }
    }

    /// The command's name, for messages; `None` for a sync.
    fn name(&self) -> Option<&'static str> {
        match self {
            Command::Sync => None,
            Command::Rollback => Some("rollback"),
            Command::Versions => Some("versions"),
            Command::Restore { .. } => Some("restore"),
        }
    }
}

/// `--min-block`'s default (clap's `default_value`).
const DEFAULT_MIN_BLOCK: &str = "4K";

impl Settings {
    /// Whether the source is standard input (`-`), a stream read once.
    pub fn stream_source(&self) -> bool {
        is_stdin(&self.pair.source)
    }

    /// What the run asks of the undo journal.
    pub fn undo_wanted(&self) -> super::undo::Wanted {
        super::undo::Wanted {
            mode: self.journal,
            dir: self.journal_dir.clone(),
            keep: self.keep_versions,
        }
    }

    /// Checks every option and operand.
    pub fn resolve(args: &Args) -> Result<Settings> {
        let command = Command::of(args);
        let pair = operands(args, &command)?;
        if let Some(k) = args
            .keep_versions
            .filter(|&k| k > crate::wire::frame::MAX_VERSIONS)
        {
            return Err(usage(format!(
                "--keep-versions {k}: at most {} versions are kept",
                crate::wire::frame::MAX_VERSIONS
            )));
        }
        let block = block_size(
            &args.block_size,
            "block size",
            "give 512 to 64M with -b (default 1M)",
        )?;
        let (hash, hash_note) = crate::hash::resolve(&args.hash).map_err(usage)?;
        if let Some(extra) = &args.additional_hash {
            crate::hash::resolve(extra).map_err(|m| usage(format!("-2/--additionalhash: {m}")))?;
        }
        if args.workers == 0 || args.workers > crate::wire::frame::MAX_STREAMS {
            return Err(usage(format!(
                "-w/--workers must be 1 to {}",
                crate::wire::frame::MAX_STREAMS
            )));
        }
        if let Some(map) = &args.bad_blocks {
            target::check_writable(map, "--bad-blocks").map_err(usage)?;
        }
        if let Some(df) = &args.digest_file {
            target::check_writable(df, "--digest-file").map_err(usage)?;
            if matches!(pair.source, Endpoint::Remote { .. }) {
                return Err(usage(
                    "--digest-file is kept on the source's machine: use it for a local sync or a push (run the pull as a push on the other machine)",
                ));
            }
        }
        let min_block = block_size(&args.min_block, "--min-block", "give 512 to the block size")?;
        if min_block > block && args.min_block != DEFAULT_MIN_BLOCK && !args.no_refine {
            return Err(usage(format!(
                "--min-block {} is larger than the block size {}; give 512 up to the block size (-b)",
                args.min_block, args.block_size
            )));
        }
        // No more pieces per block than a frame may list.
        let min_block = min_block.max(block.div_ceil(MAX_DIGESTS as u64));
        let refine = if args.no_refine || min_block >= block {
            0
        } else {
            min_block
        };
        let local = pair.source.is_local() && pair.destination.is_local();
        let stream = check_stream(args, &pair)?;
        // Over ssh a block's pieces are read again from the source: a stream cannot be.
        let refine = if stream && !local { 0 } else { refine };
        let remote = if local {
            None
        } else {
            Some(RemoteSettings {
                ssh: ssh_options(args)?,
                level: if args.no_compress {
                    0
                } else {
                    args.compress_level.unwrap_or(DEFAULT_LEVEL)
                },
                level_fixed: args.compress_level.is_some(),
                bwlimit: bwlimit(args.bwlimit.as_deref())?,
            })
        };
        Ok(Settings {
            pair,
            block,
            hash,
            refine,
            dry_run: args.dry_run || args.check,
            force: args.force,
            force_mounted: args.force_mounted,
            verify: args.verify,
            sparse: !args.no_sparse,
            discard: args.discard,
            pause: Duration::from_millis(args.pause),
            drop_local: args.fadvise & 1 != 0,
            drop_remote: args.fadvise & 2 != 0,
            salvage: Salvage {
                max_errors: args.max_errors.unwrap_or(u64::MAX),
                keep_unreadable: args.keep_unreadable,
            },
            bad_blocks: args.bad_blocks.clone(),
            digest: args.digest_file.as_ref().map(|path| DigestOptions {
                path: path.clone(),
                rebuild: args.digest_rebuild,
                dry_run: args.dry_run || args.check,
            }),
            workers: args.workers,
            command,
            keep_versions: args.keep_versions,
            check: args.check,
            journal: match (args.journal, args.no_journal) {
                (true, _) => crate::journal::Mode::On,
                (_, true) => crate::journal::Mode::Off,
                _ => crate::journal::Mode::Auto,
            },
            journal_dir: args.journal_dir.clone(),
            notes: if local {
                local_notes(args)
            } else {
                remote_notes(args)
            }
            .into_iter()
            .map(String::from)
            .chain(hash_note.filter(|_| !local))
            .collect(),
            remote,
        })
    }

    /// What the engine is asked to do in this run, comparing as `compare` says; a new
    /// `--verify` log, shared by the run's streams.
    pub fn run_options(&self, compare: Compare) -> RunOptions {
        RunOptions {
            compare,
            dry_run: self.dry_run,
            pause: self.pause,
            drop_cache: self.drop_local,
            sparse: self.sparse,
            discard: self.discard,
            refine: self.refine,
            salvage: self.salvage,
            verify: self.verify.then(|| VerifyLog::new(self.hash)),
        }
    }
}

/// The operands as endpoints (the commands take one, a sync two or three).
fn operands(args: &Args, command: &Command) -> Result<Pair> {
    Ok(match (command.name(), args.operands.as_slice()) {
        (Some(_), [dst]) => Pair {
            source: Endpoint::Local(PathBuf::new()),
            destination: endpoint::modern(dst).map_err(usage)?,
        },
        (Some(name), _) => {
            return Err(usage(format!("{name} takes one operand: DST or HOST:DST")));
        }
        (None, [_, .., last]) if last == target::STDIN && !args.pull => {
            return Err(usage(
                "the destination cannot be - (standard output): blocksync writes a file or device in place; give its path",
            ));
        }
        (None, ops) => endpoint::parse_operands(ops, args.pull).map_err(usage)?,
    })
}

fn is_stdin(e: &Endpoint) -> bool {
    matches!(e, Endpoint::Local(p) if p.as_os_str() == target::STDIN)
}

/// Whether the source is standard input; refuses what a stream cannot do (it is read
/// once, from start to end, and its size is known only at its end).
fn check_stream(args: &Args, pair: &Pair) -> Result<bool> {
    if !is_stdin(&pair.source) {
        return Ok(false);
    }
    let refused = [
        (
            args.workers > 1,
            "-w/--workers (a stream is read in order, once)",
        ),
        (
            args.verify,
            "--verify (a stream cannot be read a second time)",
        ),
        (
            args.digest_file.is_some(),
            "--digest-file (its size is known only at its end)",
        ),
    ];
    if let Some((_, what)) = refused.iter().find(|(on, _)| *on) {
        return Err(usage(format!(
            "source - (standard input) does not go with {what}; save the stream to a file first for that"
        )));
    }
    Ok(true)
}

fn usage(message: impl Into<String>) -> Error {
    Error::new(Kind::Usage, message)
}

/// A block size option: `what` names it, `give` says what to give instead.
fn block_size(text: &str, what: &str, give: &str) -> Result<u64> {
    let n = size::parse_size(text).map_err(|m| usage(format!("{what} {m}")))?;
    if !(MIN_BLOCK..=MAX_BLOCK).contains(&n) {
        return Err(usage(format!("{what} {text} is not usable; {give}")));
    }
    Ok(n)
}

/// The reporter the output options ask for.
pub(crate) fn reporter(args: &Args) -> Result<Reporter> {
    let progress = match (args.no_progress, args.progress.as_deref()) {
        (true, _) => ProgressMode::Never,
        (_, Some("json")) => ProgressMode::Json,
        (_, Some("lines")) => ProgressMode::Lines,
        (_, Some(_)) => ProgressMode::Always,
        (_, None) => ProgressMode::Auto,
    };
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        return Err(usage("-t/--interval must be a positive number of seconds"));
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

fn ssh_options(args: &Args) -> Result<SshOptions> {
    let program = match &args.rsh {
        Some(cmd) => split_shell(cmd).map_err(|m| usage(format!("-e/--rsh: {m}")))?,
        None => vec!["ssh".to_string()],
    };
    if program.is_empty() {
        return Err(usage("-e/--rsh is empty"));
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
        timeout: timeout(args.timeout)?,
        share: Default::default(),
    })
}

/// `--timeout` as a limit (`None`: forever). A peer says it is alive every second, so a
/// limit of one second could trip on a live one.
fn timeout(secs: Option<u64>) -> Result<Option<Duration>> {
    match secs.unwrap_or(DEFAULT_TIMEOUT) {
        0 => Ok(None),
        1 => Err(usage(
            "--timeout must be 0 (wait forever) or at least 2 seconds",
        )),
        n => Ok(Some(Duration::from_secs(n))),
    }
}

/// `--bwlimit` in bytes per second: a plain number is KiB/s, as in rsync.
fn bwlimit(text: Option<&str>) -> Result<u64> {
    let Some(text) = text else {
        return Ok(0);
    };
    let plain = text.chars().all(|c| c.is_ascii_digit());
    let n = size::parse_size(text).map_err(|m| usage(format!("--bwlimit {m}")))?;
    let n = if plain { n.checked_mul(1024) } else { Some(n) };
    n.ok_or_else(|| usage(format!("--bwlimit {text} is too large")))
}

/// The texts of the entries that are on.
fn those_on(table: &[(bool, &'static str)]) -> Vec<&'static str> {
    table
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, t)| *t)
        .collect()
}

/// One-line notes for options that do nothing in a local sync.
fn local_notes(args: &Args) -> Vec<&'static str> {
    let ssh_given = args.identity.is_some()
        || args.pass.is_some()
        || args.extra_params.is_some()
        || args.rsh.is_some();
    let table = [
        (
            args.workers > 1,
            "-w/--workers applies to ssh streams; a local sync already uses every core",
        ),
        (
            args.splay.is_some(),
            "-l/--splay is accepted for blocksync.py compatibility; streams start at once",
        ),
        (
            args.cipher.is_some(),
            "-c/--cipher applies to ssh; ignored for a local sync",
        ),
        (
            args.compress || args.compress_level.is_some(),
            "-C/--compress applies to ssh; a local sync copies blocks directly",
        ),
        (
            ssh_given,
            "ssh options (-i, -P, -x, -e) are ignored for a local sync",
        ),
        (
            args.sudo,
            "-s/--sudo applies to the remote side; run blocksync itself with sudo for local devices",
        ),
        (
            args.remote_bin.is_some(),
            "-S/--script names the remote blocksync; ignored for a local sync",
        ),
        (
            args.interpreter.is_some(),
            "-I/--interpreter is not needed: blocksync is one binary on both sides",
        ),
        (
            args.create_dest,
            "-T/--createdest is implied: a missing destination file is always created",
        ),
        (
            args.hash != "blake3" || args.additional_hash.is_some(),
            "a local sync compares bytes directly; -1/-2 hashes apply to remote syncs",
        ),
        (
            args.fadvise & 2 != 0,
            "-d bit 2 (remote page cache) does not apply to a local sync",
        ),
        (
            args.bwlimit.is_some() || args.no_compress || args.no_deploy,
            "--bwlimit, --no-compress and --no-deploy apply to ssh; ignored for a local sync",
        ),
        (
            args.timeout.is_some(),
            "--timeout applies to the link to a remote side; ignored for a local sync",
        ),
    ];
    those_on(&table)
}

/// One-line notes for options a remote sync accepts and does not use.
fn remote_notes(args: &Args) -> Vec<&'static str> {
    let table = [
        (
            args.splay.is_some(),
            "-l/--splay is accepted for blocksync.py compatibility; streams start at once",
        ),
        (
            args.interpreter.is_some(),
            "-I/--interpreter is not needed: the remote side is this same binary",
        ),
        (
            args.create_dest,
            "-T/--createdest is implied: a missing destination file is always created",
        ),
        (
            args.additional_hash.is_some(),
            "-2/--additionalhash is accepted for blocksync.py command lines and not used: one 128-bit digest per block is compared (--verify checks every block at full strength)",
        ),
    ];
    those_on(&table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn resolve(line: &[&str]) -> Result<Settings> {
        let args = Args::try_parse_from(std::iter::once("blocksync").chain(line.iter().copied()))
            .expect("clap accepts it");
        Settings::resolve(&args)
    }

    #[test]
    fn options_are_resolved_once_into_plain_settings() {
        let s = resolve(&[
            "-b",
            "64K",
            "--min-block",
            "8K",
            "-p",
            "5",
            "-d",
            "3",
            "./a",
            "./b",
        ])
        .unwrap();
        assert_eq!((s.block, s.refine), (64 << 10, 8 << 10));
        assert_eq!(s.pause, Duration::from_millis(5));
        assert!(s.drop_local && s.drop_remote && s.sparse && s.remote.is_none());
        assert_eq!(
            s.notes,
            vec!["-d bit 2 (remote page cache) does not apply to a local sync".to_string()]
        );
        let s = resolve(&[
            "--compress-level=5",
            "-w",
            "2",
            "--bwlimit",
            "8",
            "./a",
            "host:b",
        ])
        .unwrap();
        let r = s.remote.expect("a remote run");
        assert_eq!((r.level, r.bwlimit, s.workers), (5, 8192, 2));
        assert!(s.notes.is_empty());
        // A block too large for a frame's digest list still refines in legal pieces.
        let s = resolve(&["-b", "64M", "--min-block", "512", "./a", "./b"]).unwrap();
        assert_eq!(s.refine, (64 << 20) / MAX_DIGESTS as u64);
        assert_eq!(resolve(&["--no-refine", "./a", "./b"]).unwrap().refine, 0);
    }

    #[test]
    fn bad_options_are_usage_errors_naming_the_option() {
        for (line, names) in [
            (&["-b", "100", "./a", "./b"][..], "block size 100"),
            (&["-b", "128M", "./a", "./b"], "block size 128M"),
            (&["--min-block", "1", "./a", "./b"], "--min-block 1"),
            (&["-w", "0", "./a", "h:b"], "-w/--workers"),
            (&["-1", "crc32", "./a", "./b"], "crc32"),
            (
                &["-b", "1M", "--min-block", "8M", "./a", "./b"],
                "--min-block 8M",
            ),
            (&["-e", "", "./a", "h:b"], "-e/--rsh"),
            (&["--digest-file", "/tmp/d", "h:a", "./b"], "--digest-file"),
            (&["--timeout", "1", "./a", "h:b"], "--timeout"),
        ] {
            let e = resolve(line)
                .err()
                .unwrap_or_else(|| panic!("{line:?} accepted"));
            assert_eq!(e.kind, Kind::Usage, "{line:?}");
            assert!(e.message.contains(names), "{line:?}: {}", e.message);
        }
    }

    #[test]
    fn bwlimit_is_kib_unless_suffixed_and_never_wraps() {
        assert_eq!(bwlimit(None).unwrap(), 0);
        assert_eq!(bwlimit(Some("100")).unwrap(), 100 * 1024);
        assert_eq!(bwlimit(Some("10M")).unwrap(), 10 << 20);
        // u64::MAX / 1024 + 1 KiB/s would wrap to a tiny rate.
        let huge = (u64::MAX / 1024 + 1).to_string();
        let e = bwlimit(Some(&huge)).unwrap_err();
        assert_eq!(e.kind, Kind::Usage);
        assert!(e.message.contains("--bwlimit"), "{}", e.message);
    }
}
