//! The application: entry dispatch, the command line resolved into settings, the local
//! run, both sides of a remote run, and the verdict (findings -> exit code -> summary).

pub(crate) mod badmap;
mod cli;
mod client;
mod endpoint;
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
use settings::Settings;

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
    // `blocksync rollback [OPTIONS] DST`: the sync's options (ssh, --journal-dir, -f).
    let args = if first.as_ref().is_some_and(|a| a == "rollback") {
        let mut words: Vec<std::ffi::OsString> = std::env::args_os().collect();
        words[1] = "--rollback".into();
        Args::from_words(words)
    } else {
        Args::from_command_line()
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

/// Runs the sync the settings describe.
fn run(settings: &Settings, reporter: &Reporter) -> crate::error::Result<()> {
    for n in &settings.notes {
        reporter.note(n);
    }
    if settings.rollback {
        return undo::rollback(settings, reporter);
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
