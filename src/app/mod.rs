//! The application: entry dispatch, the command line resolved into settings, the local
//! run, both sides of a remote run, and the verdict (findings -> exit code -> summary).

pub(crate) mod badmap;
mod cli;
mod client;
mod endpoint;
mod generate;
mod history;
mod interact;
mod local;
mod offline;
mod report;
pub(crate) mod server;
mod settings;
mod streams;
mod undo;
mod verdict;

use cli::Args;
use endpoint::Endpoint;
use report::Reporter;
use settings::{Command, Settings};

/// Parses the command line, runs, reports, and returns the process exit code.
pub fn main_entry() -> i32 {
    // The remote end of an ssh sync; not a user-facing mode, so not in --help.
    let first = std::env::args_os().nth(1);
    // No arguments at all: the full option list, as blocksync.py's users expect.
    if first.is_none() {
        Args::print_help_now();
        return 2;
    }
    if first.as_ref().is_some_and(|a| a == "--server") {
        return server::main();
    }
    // The man page and completions (before clap: they need no operands).
    if first.as_ref().is_some_and(|a| a == "--generate") {
        let kind = std::env::args().nth(2);
        return generate::main(kind.as_deref());
    }
    // `blocksync digest|diff|apply ...`; a file with such a name is written ./digest.
    if let Some(cmd) = first
        .as_ref()
        .and_then(|a| a.to_str())
        .filter(|a| offline::COMMANDS.contains(a))
    {
        return offline::main(cmd);
    }
    // `blocksync rollback|versions|restore [OPTIONS] DST`: the sync's options (ssh,
    // --journal-dir, -f).
    let args = match first.as_ref().and_then(|a| a.to_str()) {
        Some(cmd @ ("rollback" | "versions" | "restore")) => {
            Args::from_words(undo_words(cmd, std::env::args_os().collect()))
        }
        _ => Args::from_command_line(),
    };
    let reporter = match settings::reporter(&args) {
        Ok(r) => r,
        Err(e) => {
            Reporter::fallback().error(&e);
            return e.kind.exit_code();
        }
    };
    let result = Settings::resolve(&args).and_then(|s| run(&s, &reporter));
    match result.map_err(verdict::interrupted_if_cancelled) {
        Ok(()) => 0,
        Err(e) => {
            reporter.error(&e);
            e.kind.exit_code()
        }
    }
}

/// The words of `blocksync CMD ...` as the sync's command line parses them: the command
/// becomes its hidden flag, and a restore's `--version K` and `-o OUT` (names the sync
/// gives to other things) become their own.
fn undo_words(cmd: &str, mut words: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    words[1] = format!("--{cmd}").into();
    if cmd != "restore" {
        return words;
    }
    let mut out = Vec::with_capacity(words.len());
    let mut rest = words.into_iter();
    for w in rest.by_ref() {
        let Some(t) = w.to_str() else {
            out.push(w);
            continue;
        };
        if t == "--" {
            out.push(w);
            break;
        }
        let renamed = match t {
            "--version" => "--restore-version".to_string(),
            "-o" | "--output" => "--restore-out".to_string(),
            _ => match (t.strip_prefix("--version="), t.strip_prefix("--output=")) {
                (Some(k), _) => format!("--restore-version={k}"),
                (_, Some(o)) => format!("--restore-out={o}"),
                _ => match t
                    .strip_prefix("-o")
                    .filter(|o| !o.is_empty() && !t.starts_with("--"))
                {
                    Some(o) => format!("--restore-out={}", o.strip_prefix('=').unwrap_or(o)),
                    None => t.to_string(),
                },
            },
        };
        out.push(renamed.into());
    }
    out.extend(rest);
    out
}

/// Runs the sync the settings describe.
fn run(settings: &Settings, reporter: &Reporter) -> crate::error::Result<()> {
    for n in &settings.notes {
        reporter.note(n);
    }
    match &settings.command {
        Command::Sync => {}
        Command::Rollback => return undo::rollback(settings, reporter),
        Command::Versions => return history::versions(settings, reporter),
        Command::Restore { version, out } => {
            return history::restore_cmd(settings, reporter, *version, out);
        }
    }
    match (&settings.pair.source, &settings.pair.destination) {
        (Endpoint::Local(s), Endpoint::Local(d)) => local::run(settings, reporter, s, d),
        (Endpoint::Local(s), Endpoint::Remote { host, path }) => {
            client::run(settings, reporter, &client::Remote::push(host, path, s))
        }
        (Endpoint::Remote { host, path }, Endpoint::Local(d)) => {
            client::run(settings, reporter, &client::Remote::pull(host, path, d))
        }
        _ => unreachable!("both remote is refused by parse_operands"),
    }
}
