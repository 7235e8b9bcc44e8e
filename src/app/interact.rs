//! Talking to the person at the terminal: the confirmation before an existing destination
//! is changed, and Ctrl-C.

use super::report::Reporter;
use super::settings::Settings;
use crate::error::{Error, Kind, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the prompt shows about the destination about to be changed.
pub(crate) struct Change<'a> {
    /// The destination as given.
    pub destination: &'a str,
    /// `file` or `block device`.
    pub kind: &'a str,
    /// Its size now.
    pub size: u64,
    /// The source's size: a longer file destination is cut to it.
    pub source_size: u64,
    /// The source as given.
    pub source: &'a str,
    /// The source is a stream, whose size is known at its end.
    pub stream: bool,
    /// What the undo journal keeps (see [`crate::journal::Decision::promise`]).
    pub undo: &'static str,
}

/// Asks before changing an existing destination, unless `-f` or a dry run; refuses when
/// there is no terminal to ask on.
pub(crate) fn confirm_change(settings: &Settings, reporter: &Reporter, c: &Change) -> Result<()> {
    if settings.dry_run || settings.force {
        return Ok(());
    }
    let Change {
        destination,
        kind,
        size,
        source_size,
        source,
        stream,
        undo,
    } = c;
    let cut = match (*kind, size > source_size) {
        ("file", _) if *stream => ", then cut to the stream's length".to_string(),
        (_, _) if *stream => {
            " (bytes past the stream's end are kept; a longer stream is an error once the device is full)".to_string()
        }
        ("file", true) => format!(", then cut from {size} to {source_size} bytes"),
        (_, true) => format!(
            " (its last {} bytes, past the source's end, are kept)",
            size - source_size
        ),
        _ => String::new(),
    };
    let question = format!(
        "destination {destination} exists ({kind} of {size} bytes) and will be overwritten where it differs from {source}{cut}.{undo} Continue?"
    );
    match reporter.confirm(&question) {
        Some(true) => Ok(()),
        Some(false) => Err(Error::new(
            Kind::NotConfirmed,
            format!("not confirmed; destination {destination} left unchanged"),
        )),
        None => Err(Error::new(
            Kind::NotConfirmed,
            format!(
                "destination {destination} exists and would be changed{cut}; pass -f to go ahead (no terminal to ask on).{undo}"
            ),
        )),
    }
}

/// The flag Ctrl-C or SIGTERM sets (handlers installed on the first call); a second
/// signal ends the process at once.
pub(crate) fn cancel_on_signals() -> Arc<AtomicBool> {
    static CANCEL: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    CANCEL
        .get_or_init(|| {
            let cancel = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, cancel.clone());
                let _ = signal_hook::flag::register(sig, cancel.clone());
            }
            cancel
        })
        .clone()
}

/// Whether Ctrl-C or SIGTERM came.
pub(crate) fn cancelled() -> bool {
    cancel_on_signals().load(Ordering::Relaxed)
}
