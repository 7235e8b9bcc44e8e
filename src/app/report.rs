//! What the user sees: notes and errors on stderr (and the `-o` log), the progress bar or
//! periodic progress lines, the confirmation prompt, and the final summary as text or JSON.

use crate::engine::Stats;
use crate::error::Error;
use crate::size::human;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When to draw the progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// On a terminal only.
    Auto,
    /// Always (`--progress`): the bar on a terminal, lines elsewhere.
    Always,
    /// Lines, every `-t` seconds (`--progress=lines`).
    Lines,
    /// One JSON object a line, every `-t` seconds (`--progress=json`).
    Json,
    /// Never (`--no-progress`).
    Never,
}

/// Output settings and the open log file.
pub struct Reporter {
    quiet: bool,
    verbose: u8,
    json: bool,
    progress: ProgressMode,
    interval: Duration,
    log: Option<Mutex<File>>,
    /// The JSON summary went out (with the error in it): print no second object.
    summarized: AtomicBool,
}

impl Reporter {
    /// A reporter; opens `log` for appending (an error names the file).
    pub fn new(
        quiet: bool,
        verbose: u8,
        json: bool,
        progress: ProgressMode,
        interval: Duration,
        log: Option<&Path>,
    ) -> Result<Self, Error> {
        let log = match log {
            Some(p) => Some(Mutex::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| {
                        Error::io(crate::error::Kind::Usage, "log file", p, &e, "check -o")
                    })?,
            )),
            None => None,
        };
        Ok(Reporter {
            quiet,
            verbose,
            json,
            progress,
            interval,
            log,
            summarized: AtomicBool::new(false),
        })
    }

    /// A reporter that prints errors only, for failures before the options are known.
    pub fn fallback() -> Self {
        Reporter {
            quiet: true,
            verbose: 0,
            json: false,
            progress: ProgressMode::Never,
            interval: Duration::from_secs(1),
            log: None,
            summarized: AtomicBool::new(false),
        }
    }

    fn to_log(&self, line: &str) {
        if let Some(log) = &self.log
            && let Ok(mut f) = log.lock()
        {
            let _ = writeln!(f, "{line}");
        }
    }

    /// A note: something the user should know that does not stop the run.
    pub fn note(&self, msg: &str) {
        // Notes and errors may quote the other machine (or odd file names): nothing in
        // them may reach the terminal as a control sequence.
        let line = format!("blocksync: note: {}", crate::error::harmless(msg));
        if !self.quiet {
            eprintln!("{line}");
        }
        self.to_log(&line);
    }

    /// What `-v` (`level` 1) or `-vv` (2) adds: how the run goes about its work.
    pub fn detail(&self, level: u8, msg: &str) {
        let line = format!("blocksync: {}", crate::error::harmless(msg));
        if !self.quiet && self.verbose >= level {
            eprintln!("{line}");
        }
        if self.verbose >= level {
            self.to_log(&line);
        }
    }

    /// The error that ends the run: one line on stderr, and a JSON object with `--json`.
    pub fn error(&self, err: &Error) {
        let line = format!("blocksync: error: {}", crate::error::harmless(&err.message));
        eprintln!("{line}");
        self.to_log(&line);
        if self.json && !self.summarized.load(Ordering::Relaxed) {
            let v = serde_json::json!({
                "status": "error",
                "error": err.message,
                "exit_code": err.kind.exit_code(),
            });
            self.to_stdout(&format!("{v}\n"));
        }
    }

    /// Asks on the terminal whether to go on; `None` when there is no terminal to ask.
    pub fn confirm(&self, question: &str) -> Option<bool> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let tty = File::open("/dev/tty").ok()?;
        eprint!("blocksync: {question} [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::BufReader::new(tty).read_line(&mut answer).ok()?;
        let yes = matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes");
        self.to_log(&format!(
            "blocksync: {question} {}",
            if yes { "yes" } else { "no" }
        ));
        Some(yes)
    }

    /// Starts showing progress of `total` bytes, read from `stats`, until the returned
    /// handle is finished.
    pub fn start_progress(&self, total: u64, stats: Arc<Stats>) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let tty = std::io::stderr().is_terminal();
        let bar_wanted = match self.progress {
            ProgressMode::Always => tty,
            ProgressMode::Auto => !self.quiet && tty,
            _ => false,
        };
        // Off a terminal a bar draws nothing: --progress and -v print lines instead.
        let lines_wanted = !bar_wanted
            && match self.progress {
                ProgressMode::Always | ProgressMode::Lines | ProgressMode::Json => true,
                ProgressMode::Auto | ProgressMode::Never => self.verbose > 0 && !self.quiet,
            };
        let json = self.progress == ProgressMode::Json;
        let thread = if bar_wanted {
            // A stream's size is known at its end (total 0): no bar, no ETA.
            let (length, template) = match total {
                0 => (None, "{spinner} {bytes} {bytes_per_sec} {wide_msg}"),
                _ => (
                    Some(total),
                    // The bar takes what the terminal's width leaves: it never wraps.
                    "{wide_bar:.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                ),
            };
            let bar = ProgressBar::with_draw_target(length, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("template is valid")
                    .progress_chars("=> "),
            );
            let stop = stop.clone();
            Some(std::thread::spawn(move || {
                loop {
                    let done = stop.load(Ordering::Relaxed);
                    bar.set_position(stats.progress());
                    bar.set_message(format!(
                        "changed {}, written {}",
                        Stats::get(&stats.blocks_changed),
                        human(Stats::get(&stats.written).max(Stats::get(&stats.data_sent)))
                    ));
                    if done {
                        bar.finish_and_clear();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }))
        } else if lines_wanted {
            let stop = stop.clone();
            let interval = self.interval;
            Some(std::thread::spawn(move || {
                let start = Instant::now();
                let mut next = start + interval;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                    if Instant::now() < next {
                        continue;
                    }
                    next += interval;
                    let done = stats.progress();
                    let secs = start.elapsed().as_secs_f64();
                    let pct = if total == 0 {
                        100.0
                    } else {
                        done as f64 * 100.0 / total as f64
                    };
                    let rate = done as f64 / secs.max(1e-9);
                    if json {
                        let v = serde_json::json!({
                            "phase": "sync",
                            "elapsed_seconds": secs,
                            "done": done,
                            "total": total,
                            "rate_bytes_per_second": rate as u64,
                            "eta_seconds": if rate > 0.0 { (total.saturating_sub(done)) as f64 / rate } else { 0.0 },
                            "blocks_changed": Stats::get(&stats.blocks_changed),
                            "bytes_written": Stats::get(&stats.written),
                            "bytes_sent": Stats::get(&stats.wire_sent),
                        });
                        eprintln!("{v}");
                    } else {
                        let of = match total {
                            0 => " so far".to_string(), // a stream
                            _ => format!(" / {} ({pct:.1}%)", human(total)),
                        };
                        eprintln!(
                            "blocksync: {}{of}, {}/s, {} changed blocks, {} written",
                            human(done),
                            human(rate as u64),
                            Stats::get(&stats.blocks_changed),
                            human(Stats::get(&stats.written).max(Stats::get(&stats.data_sent)))
                        );
                    }
                }
            }))
        } else {
            None
        };
        Progress { stop, thread }
    }

    /// Prints the summary: text on stdout unless `-q`, or one JSON object with `--json`.
    pub fn summary(&self, s: &Summary) {
        let text = s.text();
        for line in text.lines() {
            self.to_log(&format!("blocksync: {line}"));
        }
        if self.json {
            let json = serde_json::to_string(s).expect("summary serializes");
            self.to_stdout(&format!("{json}\n"));
            self.summarized.store(true, Ordering::Relaxed);
        } else if !self.quiet {
            self.to_stdout(&text);
        }
    }

    /// Prints the outcome of a command other than a sync: `text` on stdout unless `-q`,
    /// or `json` with `--json`.
    pub fn outcome(&self, text: &str, json: serde_json::Value) {
        self.to_log(&format!("blocksync: {text}"));
        if self.json {
            self.to_stdout(&format!("{json}\n"));
            self.summarized.store(true, Ordering::Relaxed);
        } else if !self.quiet {
            self.to_stdout(&format!("{text}\n"));
        }
    }

    /// Writes to stdout; a closed or full stdout (`| head`, `> /dev/full`) must not turn a
    /// finished sync into a crash: the sync's own outcome decides the exit code.
    fn to_stdout(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        match written {
            Ok(()) => {}
            // The reader went away on purpose: nothing to tell it.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Err(e) => {
                let line = format!(
                    "blocksync: note: could not write the summary to stdout: {}",
                    crate::error::os_text(&e)
                );
                eprintln!("{line}");
                self.to_log(&line);
            }
        }
    }
}

/// A running progress display.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Stops and clears the display.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a run did, for people and for scripts.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `ok`, `dry-run` or `interrupted`.
    pub status: &'static str,
    /// The source as given.
    pub source: String,
    /// The destination as given.
    pub destination: String,
    /// Nothing was written.
    pub dry_run: bool,
    /// Bytes synced (the source size).
    pub size: u64,
    /// Block size.
    pub block_size: u64,
    /// Blocks in the source.
    pub blocks_total: u64,
    /// Blocks found equal.
    pub blocks_same: u64,
    /// Blocks found different.
    pub blocks_changed: u64,
    /// Source blocks that are all zero (holes included).
    pub blocks_zero: u64,
    /// Source blocks in holes, never read.
    pub blocks_hole: u64,
    /// Changed blocks sent as zero ranges (a hole punched or zeros written), not as data.
    pub blocks_zeroed: u64,
    /// Bytes read from the source.
    pub bytes_read_source: u64,
    /// Bytes read from the destination.
    pub bytes_read_destination: u64,
    /// Bytes of the changed blocks (written, or to be written in a dry run).
    pub bytes_changed: u64,
    /// Bytes written to the destination.
    pub bytes_written: u64,
    /// Bytes sent over the ssh link (0 for a local sync).
    pub bytes_sent: u64,
    /// Bytes received over the ssh link.
    pub bytes_received: u64,
    /// Of the bytes sent, block data (after compression).
    pub data_sent: u64,
    /// Of the bytes received, block data.
    pub data_received: u64,
    /// Of the bytes sent, block digests.
    pub digests_sent: u64,
    /// Of the bytes received, block digests.
    pub digests_received: u64,
    /// Wall time.
    pub elapsed_seconds: f64,
    /// Source bytes compared per second.
    pub rate_bytes_per_second: f64,
    /// The destination file did not exist and was created.
    pub destination_created: bool,
    /// A larger destination file was cut to the source size; its old size.
    pub destination_truncated_from: Option<u64>,
    /// A larger destination device kept this many bytes past the source size.
    pub destination_tail_kept: Option<u64>,
    /// `--verify`: bytes compared at full strength after the sync (`None`: no verify).
    pub verified_bytes: Option<u64>,
    /// `--verify`: bytes of the destination that differ from the source.
    pub mismatch_bytes: u64,
    /// `--verify`: bytes of the source that changed while the sync ran.
    pub source_changed_bytes: u64,
    /// Source bytes that could not be read.
    pub unreadable_bytes: u64,
    /// Unreadable source ranges.
    pub unreadable_ranges: u64,
    /// Where the map of unreadable ranges was written (`--bad-blocks`).
    pub bad_blocks_map: Option<String>,
    /// Bytes the undo journal took (its records with their framing), when the
    /// destination is on this machine; 0 without one.
    pub journal_bytes: Option<u64>,
    /// The error the run ended with, if any (also printed on stderr).
    pub error: Option<String>,
    /// The process exit code.
    pub exit_code: i32,
}

impl Summary {
    /// Fills the counters from `stats`.
    pub fn from_stats(stats: &Stats, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        let done = Stats::get(&stats.done);
        Summary {
            status: "ok",
            source: String::new(),
            destination: String::new(),
            dry_run: false,
            size: 0,
            block_size: 0,
            blocks_total: 0,
            blocks_same: Stats::get(&stats.blocks_same),
            blocks_changed: Stats::get(&stats.blocks_changed),
            blocks_zero: Stats::get(&stats.blocks_zero),
            blocks_hole: Stats::get(&stats.blocks_hole),
            blocks_zeroed: Stats::get(&stats.blocks_zeroed),
            bytes_read_source: Stats::get(&stats.source_read),
            bytes_read_destination: Stats::get(&stats.dest_read),
            bytes_changed: Stats::get(&stats.changed_bytes),
            bytes_written: Stats::get(&stats.written),
            bytes_sent: Stats::get(&stats.wire_sent),
            bytes_received: Stats::get(&stats.wire_received),
            data_sent: Stats::get(&stats.data_sent),
            data_received: Stats::get(&stats.data_received),
            digests_sent: Stats::get(&stats.digests_sent),
            digests_received: Stats::get(&stats.digests_received),
            elapsed_seconds: secs,
            rate_bytes_per_second: if secs > 0.0 { done as f64 / secs } else { 0.0 },
            journal_bytes: None,
            destination_created: false,
            destination_truncated_from: None,
            destination_tail_kept: None,
            verified_bytes: None,
            mismatch_bytes: 0,
            source_changed_bytes: 0,
            unreadable_bytes: 0,
            unreadable_ranges: 0,
            bad_blocks_map: None,
            error: None,
            exit_code: 0,
        }
    }

    /// The summary as a few lines of text.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let verb = if self.dry_run { "would write" } else { "wrote" };
        let state = match self.status {
            "interrupted" => " (interrupted)",
            "dry-run" => " (dry run, nothing written)",
            "verify-failed" => " (VERIFY FAILED)",
            "source-changed" => " (source changed during the sync)",
            "unreadable" => " (source partly unreadable)",
            _ => "",
        };
        out.push_str(&format!(
            "{} -> {}{state}\n  {} blocks of {}: {} same, {} changed",
            self.source,
            self.destination,
            self.blocks_total,
            human(self.block_size),
            self.blocks_same,
            self.blocks_changed
        ));
        if self.blocks_zeroed > 0 {
            out.push_str(&format!(" ({} as zeros)", self.blocks_zeroed));
        }
        if self.blocks_zero > 0 {
            out.push_str(&format!(
                "; {} zero in the source, {} of them holes not read",
                self.blocks_zero, self.blocks_hole
            ));
        }
        out.push('\n');
        let written = if self.dry_run {
            self.bytes_changed
        } else {
            self.bytes_written
        };
        out.push_str(&format!(
            "  read {} source + {} destination, {verb} {}, {:.2} s, {}/s\n",
            human(self.bytes_read_source),
            human(self.bytes_read_destination),
            human(written),
            self.elapsed_seconds,
            human(self.rate_bytes_per_second as u64),
        ));
        if let Some(j) = self.journal_bytes.filter(|&j| j > 0) {
            out.push_str(&format!(
                "  undo journal: {} (the run completed: removed, or kept as a version with --keep-versions)\n",
                human(j)
            ));
        }
        if self.bytes_sent + self.bytes_received > 0 {
            out.push_str(&format!(
                "  network: sent {} (data {}, digests {}), received {} (data {}, digests {})\n",
                human(self.bytes_sent),
                human(self.data_sent),
                human(self.digests_sent),
                human(self.bytes_received),
                human(self.data_received),
                human(self.digests_received)
            ));
        }
        if self.destination_created {
            let c = if self.dry_run {
                "would be created"
            } else {
                "created"
            };
            out.push_str(&format!("  destination {c}\n"));
        }
        if let Some(old) = self.destination_truncated_from {
            let c = if self.dry_run { "would be cut" } else { "cut" };
            out.push_str(&format!(
                "  destination file {c} from {} to {} bytes\n",
                old, self.size
            ));
        }
        if self.unreadable_bytes > 0 {
            let map = match &self.bad_blocks_map {
                Some(m) => format!("; map in {m}"),
                None => String::new(),
            };
            out.push_str(&format!(
                "  UNREADABLE: {} in {} ranges of the source{map}\n",
                human(self.unreadable_bytes),
                self.unreadable_ranges
            ));
        }
        if let Some(v) = self.verified_bytes {
            let verdict = if self.mismatch_bytes > 0 {
                format!("{} DIFFER", human(self.mismatch_bytes))
            } else if self.source_changed_bytes > 0 {
                format!(
                    "the source changed in {} while syncing",
                    human(self.source_changed_bytes)
                )
            } else {
                "identical".to_string()
            };
            out.push_str(&format!(
                "  verify: {} compared at full strength: {verdict}\n",
                human(v)
            ));
        }
        if let Some(tail) = self.destination_tail_kept {
            out.push_str(&format!(
                "  destination device is {} larger than the source; its last {tail} bytes were left as they were\n",
                human(tail)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_text_and_json() {
        let stats = Stats::default();
        Stats::add(&stats.blocks_same, 3);
        Stats::add(&stats.blocks_changed, 1);
        Stats::add(&stats.written, 4096);
        Stats::add(&stats.done, 16384);
        let mut s = Summary::from_stats(&stats, Duration::from_secs(2));
        s.source = "a".into();
        s.destination = "b".into();
        s.blocks_total = 4;
        s.block_size = 4096;
        s.size = 16384;
        s.destination_tail_kept = Some(512);
        let t = s.text();
        assert!(t.contains("3 same, 1 changed"), "{t}");
        assert!(t.contains("wrote 4.00 KiB"), "{t}");
        assert!(t.contains("last 512 bytes"), "{t}");
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["blocks_changed"], 1);
        assert_eq!(v["rate_bytes_per_second"], 8192.0);
    }
}
