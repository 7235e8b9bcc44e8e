//! `blocksync --generate KIND`: the man page and shell completions, generated from the
//! command-line definition itself so they never drift from `--help` (ripgrep's
//! convention). The package installs what this prints (see `pkg/deb.sh`).

use super::cli::Args;
use std::io::Write;

/// What `--generate` takes.
pub(crate) const KINDS: &[&str] = &[
    "man",
    "complete-bash",
    "complete-zsh",
    "complete-fish",
    "complete-elvish",
    "complete-powershell",
];

/// Prints `kind` on stdout; the exit code.
pub(crate) fn main(kind: Option<&str>) -> i32 {
    let mut out = Vec::new();
    let done = match kind {
        Some("man") => clap_mangen::Man::new(Args::full_command())
            .render(&mut out)
            .map_err(|e| e.to_string()),
        Some(k) if k.starts_with("complete-") => match k["complete-".len()..].parse() {
            Ok(shell) => {
                let shell: clap_complete::Shell = shell;
                clap_complete::generate(shell, &mut Args::full_command(), "blocksync", &mut out);
                Ok(())
            }
            Err(_) => Err(unknown(k)),
        },
        Some(k) => Err(unknown(k)),
        None => Err(format!("--generate takes one of: {}", KINDS.join(", "))),
    };
    match done.and_then(|()| {
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(&out)
            .and_then(|()| stdout.flush())
            .map_err(|e| e.to_string())
    }) {
        Ok(()) => 0,
        Err(why) => {
            eprintln!("blocksync: error: {why}");
            2
        }
    }
}

fn unknown(kind: &str) -> String {
    format!(
        "--generate {}: unknown; give one of: {}",
        crate::error::peer_text(kind),
        KINDS.join(", ")
    )
}
