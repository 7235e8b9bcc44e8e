//! The command line: options and operands, parsed with clap. Nothing here touches files.

use clap::{ArgAction, Parser};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Operands:
  SRC DST              modern form; either side may be [user@]host:path (remote, over ssh)
  SRC HOST [DST]       blocksync.py form; HOST 'localhost' is a local sync, DST defaults to SRC
  --pull DST HOST SRC  blocksync.py pull: local destination first, remote source last
  A word with a colon before any slash is host:path. In a two-operand call, a second word
  with neither '/' nor ':' could be a host or a file: blocksync refuses and names both.
  SRC '-' reads standard input once (a stream: its size is known at its end; a file DST is
  cut to it, a device keeps what lies past it; no -w, --verify or --digest-file).

The last good copy (see --journal, --keep-versions):
  blocksync rollback [OPTIONS] [HOST:]DST put DST back as it was before its unfinished run
  blocksync versions [OPTIONS] [HOST:]DST list the versions kept of DST (newest is 1)
  blocksync restore [OPTIONS] [HOST:]DST --version K -o OUT
                       write DST as it was K runs ago into OUT (a new file or a device, on
                       DST's machine), verified; DST is not touched

The man page and completions: blocksync --generate man|complete-bash|complete-zsh|complete-fish

Offline (no live link; see blocksync digest --help, ...):
  blocksync digest TARGET -o FILE        the block digests of a target
  blocksync diff SRC --against FILE      a patch: the blocks of SRC that differ
  blocksync apply PATCH|- TARGET         check, apply and verify a patch

Examples:
  blocksync /dev/sda /dev/sdb                  copy a failing disk onto a new one
  blocksync vm.img ./backup/vm.img             sync an image file locally, only changed blocks
  blocksync -n vm.img ./backup/vm.img          dry run: report what differs, write nothing
  blocksync /dev/vg/data backup:/srv/data.img  push a volume to a backup host over ssh
  blocksync backup:/srv/data.img /dev/vg/data  pull it back
  blocksync -b 4M /dev/sda localhost /dev/sdb  the blocksync.py form, local
  blocksync --verify vm.img backup:/srv/vm.img sync, then compare both sides in full
  blocksync --bad-blocks sda.map /dev/sda /dev/sdb   rescue a failing disk, map what was lost
  blocksync --digest-file vm.digests vm.img backup:/srv/vm.img   nightly: backup not read
  xzcat disk.img.xz | blocksync - /dev/sdb    restore a stream, writing only what differs
";

/// The text after the options in `--help`: operands, examples, and the exit codes from
/// the one table in [`crate::error::exit_codes`].
fn after_help() -> String {
    let mut text = format!("{}\n\nExit codes:\n", AFTER_HELP.trim_end());
    for (code, meaning) in crate::error::exit_codes() {
        text.push_str(&format!("  {code:>3}  {}\n", meaning.replace('`', "")));
    }
    text
}

impl Args {
    /// Parses the process's command line (exiting with usage on an error, like clap).
    pub fn from_command_line() -> Args {
        Args::from_words(std::env::args_os())
    }

    /// The command as `--help` shows it (with the operands, exit codes and examples).
    pub fn full_command() -> clap::Command {
        use clap::CommandFactory;
        Args::command().after_help(after_help())
    }

    /// Prints `--help` (on stdout).
    pub fn print_help_now() {
        let _ = Args::full_command().print_long_help();
    }

    /// Parses `words` (the program name first).
    pub fn from_words(words: impl IntoIterator<Item = std::ffi::OsString>) -> Args {
        use clap::FromArgMatches;
        let words = compat_words(words.into_iter().collect(), &|w| {
            std::path::Path::new(w).exists()
        });
        let matches = Args::full_command().get_matches_from(words);
        Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// The compression level as users type it, made into `--compress-level=N`: `-CN`,
/// `-C=N`, `--compress=N`, and `-C N` when N is a number and no file of that name is
/// here (`exists`), so it is no operand. Everything after `--` is left alone.
fn compat_words(
    words: Vec<std::ffi::OsString>,
    exists: &dyn Fn(&str) -> bool,
) -> Vec<std::ffi::OsString> {
    let level = |t: &str| {
        let digits = t.strip_prefix('-').unwrap_or(t);
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| t.to_string())
    };
    let mut out = Vec::with_capacity(words.len());
    let mut rest = words.into_iter().peekable();
    while let Some(w) = rest.next() {
        let Some(t) = w.to_str() else {
            out.push(w);
            continue;
        };
        if t == "--" {
            out.push(w);
            break;
        }
        let inline = t
            .strip_prefix("--compress=")
            .or_else(|| t.strip_prefix("-C="))
            .or_else(|| t.strip_prefix("-C").filter(|r| !r.is_empty()))
            .and_then(level);
        if let Some(n) = inline {
            out.push(format!("--compress-level={n}").into());
            continue;
        }
        if t == "-C" || t == "--compress" {
            let next = rest.peek().and_then(|n| n.to_str()).and_then(level);
            if let Some(n) = next.filter(|n| !exists(n)) {
                rest.next();
                out.push(format!("--compress-level={n}").into());
                continue;
            }
        }
        out.push(w);
    }
    out.extend(rest);
    out
}

/// blocksync: sync a file or block device onto another, locally or over ssh, writing only the
/// blocks that differ.
#[derive(Debug, Parser)]
#[command(
    name = "blocksync",
    version,
    about = "Sync a file or block device onto another, locally or over ssh, sending only changed blocks",
    override_usage = "blocksync [OPTIONS] SRC DST\n       blocksync [OPTIONS] SRC HOST [DST]\n       blocksync [OPTIONS] --pull DST HOST SRC\n       blocksync rollback|versions [OPTIONS] [HOST:]DST\n       blocksync restore [OPTIONS] [HOST:]DST --version K -o OUT",
    max_term_width = 100
)]
pub struct Args {
    /// SRC DST, or SRC HOST [DST] (blocksync.py form); see below.
    #[arg(value_name = "OPERANDS", num_args = 1..=3, required = true)]
    pub operands: Vec<String>,

    /// `blocksync rollback DST`: put DST back as it was before an unfinished run.
    #[arg(long, hide = true)]
    pub rollback: bool,

    /// `blocksync versions DST`: list the versions kept.
    #[arg(long, hide = true)]
    pub versions: bool,

    /// `blocksync restore DST --version K -o OUT`.
    #[arg(long, hide = true, requires_all = ["restore_version", "restore_out"])]
    pub restore: bool,

    /// `blocksync restore`'s `--version K` (renamed: `--version` is the program's).
    #[arg(long, hide = true, value_name = "K", requires = "restore")]
    pub restore_version: Option<u32>,

    /// `blocksync restore`'s `-o OUT` (renamed: `-o` is the log file's).
    #[arg(long, hide = true, value_name = "OUT", requires = "restore")]
    pub restore_out: Option<PathBuf>,

    /// Pull: the first operand is the local destination, the last the remote source.
    #[arg(long)]
    pub pull: bool,

    /// Block size compared and sent, with K/M suffix (512..64M).
    #[arg(
        short = 'b',
        long = "blocksize",
        value_name = "SIZE",
        default_value = "1M"
    )]
    pub block_size: String,

    /// Report what differs; write nothing, create nothing.
    #[arg(short = 'n', long = "dry-run", visible_alias = "dryrun")]
    pub dry_run: bool,

    /// Compare only, as -n: exit 0 when the destination equals the source, 18 when it
    /// differs (or is missing), with the same summary.
    #[arg(long)]
    pub check: bool,

    /// Smallest piece a changed block is narrowed down to before sending (remote), or
    /// compared in (local).
    #[arg(long, value_name = "SIZE", default_value = "4K")]
    pub min_block: String,

    /// Send changed blocks whole, without narrowing them down.
    #[arg(long)]
    pub no_refine: bool,

    /// Write real zeros: never punch holes, allocate a new destination file fully.
    #[arg(long)]
    pub no_sparse: bool,

    /// Zero device ranges with BLKZEROOUT (discard / write-zeroes where the device
    /// guarantees zeros) instead of writing zeros.
    #[arg(long)]
    pub discard: bool,

    /// After the sync, re-read both sides and compare them at full digest strength; also
    /// finds source blocks that changed while the sync ran.
    #[arg(long)]
    pub verify: bool,

    /// Keep the destination's block digests in FILE (on this machine, the source's): the
    /// next run compares against it instead of reading the destination.
    #[arg(long, value_name = "FILE")]
    pub digest_file: Option<PathBuf>,

    /// Ignore the digest file's contents: read the destination once and write it anew.
    #[arg(long, requires = "digest_file")]
    pub digest_rebuild: bool,

    /// Write the unreadable source ranges to FILE (ddrescue mapfile format).
    #[arg(long, value_name = "FILE")]
    pub bad_blocks: Option<PathBuf>,

    /// Where the source is unreadable, leave the destination's old bytes (default: zeros).
    #[arg(long)]
    pub keep_unreadable: bool,

    /// Give up after N unreadable source areas (default: read around all of them).
    #[arg(long, value_name = "N")]
    pub max_errors: Option<u64>,

    /// Keep the destination's old contents in an undo journal until the run completes
    /// (default for a destination a run completed onto before, or with an unfinished run).
    #[arg(long, conflicts_with = "no_journal")]
    pub journal: bool,

    /// Keep the undo journals of the last N completed runs as versions (compressed, on
    /// the destination's machine): blocksync versions lists them, blocksync restore
    /// writes one out. Later runs keep as many unless told otherwise; 0 removes them.
    #[arg(long, value_name = "N", conflicts_with = "no_journal")]
    pub keep_versions: Option<u32>,

    /// Keep no undo journal: an interrupted run leaves no way back.
    #[arg(long)]
    pub no_journal: bool,

    /// Keep undo journals in DIR on the destination's machine (default: beside a file
    /// destination; the state directory for a device).
    #[arg(long, value_name = "DIR")]
    pub journal_dir: Option<PathBuf>,

    /// Do not ask before changing an existing destination.
    #[arg(short = 'f', long)]
    pub force: bool,

    /// Write to a destination device even if it is mounted or in use (dangerous).
    #[arg(long)]
    pub force_mounted: bool,

    /// Digest per block for remote syncs: blake3 (default), xxh3 (fast), sha256.
    /// blocksync.py's names are taken: the SHA-2 ones (sha512, its default) as sha256,
    /// the others (md5, sha1, blake2b, ...) as blake3, with a note.
    #[arg(
        short = '1',
        long = "hash",
        value_name = "NAME",
        default_value = "blake3"
    )]
    pub hash: String,

    /// Accepted for blocksync.py command lines and not used: one 128-bit digest per block
    /// is compared (--verify checks every block at full strength).
    #[arg(short = '2', long = "additionalhash", value_name = "NAME")]
    pub additional_hash: Option<String>,

    /// Parallel ssh streams over disjoint ranges (remote syncs).
    #[arg(short = 'w', long, value_name = "N", default_value_t = 1)]
    pub workers: u32,

    /// Delay in ms between starting workers (blocksync.py; accepted, streams start at once).
    #[arg(short = 'l', long, value_name = "MS")]
    pub splay: Option<u64>,

    /// Drop page cache after use, bitmask: 1 local side, 2 remote side (default 0: keep cache).
    #[arg(short = 'd', long, value_name = "MASK", default_value_t = 0)]
    pub fadvise: u8,

    /// Sleep this many ms after each block (crude rate limit).
    #[arg(short = 'p', long, value_name = "MS", default_value_t = 0)]
    pub pause: u64,

    /// ssh cipher (ssh -c), e.g. aes128-gcm@openssh.com.
    #[arg(short = 'c', long, value_name = "CIPHER")]
    pub cipher: Option<String>,

    /// Compress changed blocks (blocksync.py's on/off flag; over ssh they are by default,
    /// with zstd level 1 where that pays).
    #[arg(short = 'C', long)]
    pub compress: bool,

    /// Compress every changed block with zstd at LEVEL (-7..22), however fast the link
    /// (also written -C LEVEL, -CLEVEL, -C=LEVEL, --compress=LEVEL).
    #[arg(long, value_name = "LEVEL", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-7..=22))]
    pub compress_level: Option<i32>,

    /// Do not compress changed blocks.
    #[arg(long, conflicts_with_all = ["compress", "compress_level"])]
    pub no_compress: bool,

    /// Limit the rate of sent blocks, like rsync: KiB/s, or with a suffix (10M = 10 MiB/s).
    #[arg(long, value_name = "RATE")]
    pub bwlimit: Option<String>,

    /// Never copy this binary to the remote; fail when it has no blocksync.
    #[arg(long)]
    pub no_deploy: bool,

    /// End the run (exit 11) when the remote side has sent nothing and taken nothing for
    /// SECONDS while this side waits on it (default 120; 0 waits forever).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,

    /// ssh identity file (ssh -i).
    #[arg(short = 'i', long = "id", value_name = "FILE")]
    pub identity: Option<PathBuf>,

    /// Name of an environment variable holding the ssh password (uses sshpass).
    #[arg(short = 'P', long = "pass", value_name = "ENVVAR")]
    pub pass: Option<String>,

    /// Run the remote side with sudo -n.
    #[arg(short = 's', long)]
    pub sudo: bool,

    /// Extra ssh arguments, split shell-style.
    #[arg(
        short = 'x',
        long = "extraparams",
        value_name = "ARGS",
        allow_hyphen_values = true
    )]
    pub extra_params: Option<String>,

    /// Remote shell command instead of ssh, like rsync -e (e.g. "ssh -p 2222").
    #[arg(short = 'e', long = "rsh", value_name = "CMD")]
    pub rsh: Option<String>,

    /// Create the destination if missing (blocksync.py; always done, accepted).
    #[arg(short = 'T', long = "createdest")]
    pub create_dest: bool,

    /// Path of blocksync on the remote machine.
    #[arg(
        short = 'S',
        long = "script",
        visible_alias = "remote-bin",
        value_name = "PATH"
    )]
    pub remote_bin: Option<String>,

    /// Remote interpreter (blocksync.py; accepted, none is needed).
    #[arg(short = 'I', long, value_name = "NAME")]
    pub interpreter: Option<String>,

    /// Seconds between progress lines when not on a terminal (with -v).
    #[arg(short = 't', long, value_name = "SECS", default_value_t = 1.0)]
    pub interval: f64,

    /// Append the log (notes, summary, errors) to FILE.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Print only errors.
    #[arg(short = 'q', long, conflicts_with = "verbose")]
    pub quiet: bool,

    /// More output; progress lines every -t seconds when not on a terminal.
    #[arg(short = 'v', long, action = ArgAction::Count)]
    pub verbose: u8,

    /// Print the summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,

    /// Progress: a bar on a terminal, lines (every -t seconds) elsewhere; =lines for lines
    /// always, =json for one JSON object a line (for wrappers), on stderr.
    #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true,
          default_missing_value = "bar", overrides_with = "no_progress",
          value_parser = ["bar", "lines", "json"])]
    pub progress: Option<String>,

    /// Never show the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// `blocksync digest`: write the digests of a target, for `diff` on another machine.
#[derive(Debug, Parser)]
#[command(
    name = "blocksync digest",
    version,
    about = "Write the block digests of a file or device (for blocksync diff)",
    after_help = "Example:\n  blocksync digest /dev/vg/backup -o backup.digests   on the backup host\n  blocksync diff /dev/vg/data --against backup.digests -o changes.patch\n  blocksync apply changes.patch /dev/vg/backup\n\nSmall blocks make small patches (4K: a 4 KiB write costs 4 KiB); larger blocks make\nsmaller digest files (17 bytes per block).",
    max_term_width = 100
)]
pub struct DigestArgs {
    /// The file or device.
    pub target: PathBuf,
    /// Where to write the digests (`-`: stdout).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: PathBuf,
    /// Block size, with K/M suffix.
    #[arg(
        short = 'b',
        long = "blocksize",
        value_name = "SIZE",
        default_value = "4K"
    )]
    pub block_size: String,
    /// Block digest: blake3 (default), xxh3, sha256.
    #[arg(
        short = '1',
        long = "hash",
        value_name = "NAME",
        default_value = "blake3"
    )]
    pub hash: String,
    /// Print only errors.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// `blocksync diff`: the blocks of a source that differ from a target's digests.
#[derive(Debug, Parser)]
#[command(
    name = "blocksync diff",
    version,
    about = "Write a patch: the blocks of SRC that differ from a target's digests (blocksync digest)",
    after_help = "Example:\n  blocksync diff /dev/vg/data --against backup.digests | ssh backup blocksync apply - /dev/vg/backup",
    max_term_width = 100
)]
pub struct DiffArgs {
    /// The source file or device.
    pub source: PathBuf,
    /// The target's digests, from blocksync digest.
    #[arg(long, value_name = "FILE")]
    pub against: PathBuf,
    /// Where to write the patch (`-` or absent: stdout).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// zstd level for the blocks (0: none).
    #[arg(
        short = 'C',
        long = "compress",
        value_name = "LEVEL",
        default_value_t = 3
    )]
    pub compress: i32,
    /// Print only errors.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// `blocksync apply`: apply a patch to the target it was made for.
#[derive(Debug, Parser)]
#[command(
    name = "blocksync apply",
    version,
    about = "Apply a patch from blocksync diff: check the target is the state it expects, write, verify",
    max_term_width = 100
)]
pub struct ApplyArgs {
    /// The patch (`-`: stdin).
    pub patch: PathBuf,
    /// The file or device to change.
    pub target: PathBuf,
    /// Write to a mounted or in-use device (dangerous).
    #[arg(long)]
    pub force_mounted: bool,
    /// Print only errors.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_valid() {
        Args::command().debug_assert();
    }

    #[test]
    fn seed_short_options_parse() {
        let a = Args::try_parse_from([
            "blocksync",
            "-w",
            "2",
            "-l",
            "100",
            "-b",
            "4M",
            "-1",
            "xxh3",
            "-2",
            "sha256",
            "-d",
            "1",
            "-p",
            "5",
            "-c",
            "aes128-gcm@openssh.com",
            "-C",
            "-i",
            "/k",
            "-P",
            "PW",
            "-s",
            "-x",
            "-o StrictHostKeyChecking=no",
            "-n",
            "-T",
            "-S",
            "/usr/bin/blocksync",
            "-I",
            "python3",
            "-t",
            "2",
            "-o",
            "/tmp/log",
            "-f",
            "/a",
            "localhost",
            "/b",
        ])
        .unwrap();
        assert_eq!(a.workers, 2);
        assert_eq!(a.block_size, "4M");
        assert_eq!(a.hash, "xxh3");
        assert!(a.compress);
        assert_eq!(
            a.extra_params.as_deref(),
            Some("-o StrictHostKeyChecking=no")
        );
        assert!(a.dry_run && a.force && a.sudo && a.create_dest);
        assert_eq!(a.operands, vec!["/a", "localhost", "/b"]);
    }

    #[test]
    fn compression_parses_as_users_type_it() {
        let parse = |w: &[&str]| {
            let words: Vec<std::ffi::OsString> =
                ["blocksync"].iter().chain(w).map(|x| x.into()).collect();
            Args::try_parse_from(compat_words(words, &|_| false)).unwrap()
        };
        for form in [
            &["-C", "7"][..],
            &["-C7"],
            &["-C=7"],
            &["--compress=7"],
            &["--compress-level", "7"],
        ] {
            let mut w = form.to_vec();
            w.extend(["/a", "/b"]);
            let a = parse(&w);
            assert_eq!(
                (a.compress_level, a.operands.len()),
                (Some(7), 2),
                "{form:?}"
            );
        }
        let a = parse(&["-C", "/a", "/b"]);
        assert!(a.compress && a.compress_level.is_none() && a.operands.len() == 2);
        let a = parse(&["-C0", "/a", "/b"]);
        assert_eq!(a.compress_level, Some(0));
        // A file named 5 stays an operand.
        let words: Vec<std::ffi::OsString> = ["blocksync", "-C", "5", "/b"]
            .iter()
            .map(|x| x.into())
            .collect();
        let a = Args::try_parse_from(compat_words(words, &|w| w == "5")).unwrap();
        assert!(a.compress && a.operands == ["5", "/b"]);
        assert!(Args::try_parse_from(["blocksync", "--compress-level", "99", "/a", "/b"]).is_err());
    }
}
