//! The undo journal: what keeps the last good copy in a destination recoverable through
//! any interruption. Before a run overwrites a range of an existing destination, the
//! range's old bytes are appended to a journal and made durable (in group commits, see
//! [`undo`]); when the run completes and the destination is flushed, the journal is
//! removed. Until then `blocksync rollback` puts the destination back as it was before
//! the run ([`rollback`]), and the next run continues it, journaling anew after the
//! journals already there (a rollback then goes back past both).

pub(crate) mod format;
pub(crate) mod place;
pub(crate) mod restore;
pub(crate) mod rollback;
pub(crate) mod undo;
pub(crate) mod version;

pub use place::Place;
pub use undo::{Journal, Plan};

use crate::io::target::Identity;
use std::path::Path;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Journal a destination that holds a completed copy, or an unfinished run.
    #[default]
    Auto,
    /// Journal any existing destination (`--journal`).
    On,
    /// Never journal (`--no-journal`); an unfinished run's journals are dropped.
    Off,
}

impl Mode {
    /// As the hello carries it.
    pub fn byte(self) -> u8 {
        match self {
            Mode::Auto => 0,
            Mode::On => 1,
            Mode::Off => 2,
        }
    }

    /// From the hello's byte (checked by the decoder).
    pub fn from_byte(b: u8) -> Mode {
        match b {
            1 => Mode::On,
            2 => Mode::Off,
            _ => Mode::Auto,
        }
    }
}

/// Whether a run journals its destination, and why: decided on the destination's
/// machine before the confirmation, which says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A new destination (written under a temporary name) or a dry run: nothing to keep.
    Nothing,
    /// Journaled.
    On,
    /// Journaled, continuing the unfinished run(s) whose journals are there.
    Continues,
    /// Not journaled: there will be no way back (`--journal` would keep one).
    Off,
    /// `--no-journal` with an unfinished run's journals there: they are removed before
    /// anything is written, and the pre-run image with them.
    Drops,
    /// Would be journaled, but the journal's directory takes no new files (read-only,
    /// no permission): there is no way back unless `--journal-dir` names a place.
    Unavailable,
}

impl Decision {
    /// Whether the run journals.
    pub fn journals(self) -> bool {
        matches!(self, Decision::On | Decision::Continues)
    }

    /// As the reply carries it.
    pub fn byte(self) -> u8 {
        match self {
            Decision::Nothing => 0,
            Decision::On => 1,
            Decision::Continues => 2,
            Decision::Off => 3,
            Decision::Drops => 4,
            Decision::Unavailable => 5,
        }
    }

    /// From the reply's byte; `None` for an unknown one.
    pub fn from_byte(b: u8) -> Option<Decision> {
        Some(match b {
            0 => Decision::Nothing,
            1 => Decision::On,
            2 => Decision::Continues,
            3 => Decision::Off,
            4 => Decision::Drops,
            5 => Decision::Unavailable,
            _ => return None,
        })
    }

    /// What the confirmation adds about the way back.
    pub fn promise(self) -> &'static str {
        match self {
            Decision::Nothing => "",
            Decision::On => {
                " Its current contents are kept in an undo journal until the run completes (blocksync rollback puts them back)."
            }
            Decision::Continues => {
                " An unfinished run's undo journal is there: this run continues it, and blocksync rollback still puts back the contents from before that run."
            }
            Decision::Off => {
                " There is no way back: pass --journal to keep its current contents recoverable until the run completes."
            }
            Decision::Drops => {
                " --no-journal: the undo journal of an unfinished run is removed first, and with it the way back."
            }
            Decision::Unavailable => {
                " There is no way back: no undo journal can be kept beside it (its directory takes no new files); --journal-dir DIR keeps one elsewhere."
            }
        }
    }
}

/// Decides for an existing destination at `path` (resolved) with identity `id`. Asked
/// for (`--journal`, or an unfinished run to continue) where none can be kept is an
/// error, before anything is written; by default the confirmation says so.
///
/// Versions kept (`keep` above 0, or versions there and `keep` not given) need the
/// journal: the run is journaled as with `--journal`.
pub fn decide(
    mode: Mode,
    path: &Path,
    id: &Identity,
    place: &Place,
    keep: Option<u32>,
) -> crate::error::Result<Decision> {
    let live = place.list()?;
    let unfinished = !live.is_empty();
    let versions = match keep {
        Some(k) => k > 0,
        None => !version::list(place, live.first().map(|f| f.header.seq))?.is_empty(),
    };
    let decision = match (mode, unfinished) {
        (Mode::Off, true) => Decision::Drops,
        (Mode::Off, false) => Decision::Off,
        (_, true) => Decision::Continues,
        (Mode::On, false) => Decision::On,
        (Mode::Auto, false) if versions => Decision::On,
        (Mode::Auto, false) if place::completed_before(path, id) => Decision::On,
        (Mode::Auto, false) => Decision::Off,
    };
    if !decision.journals() {
        return Ok(decision);
    }
    match place.try_create() {
        Ok(()) => Ok(decision),
        Err(_) if mode == Mode::Auto && !unfinished => Ok(Decision::Unavailable),
        Err(e) => Err(place::journal_error(
            &place.dir,
            &format!(
                "cannot keep an undo journal here ({}); nothing was written: pass --journal-dir DIR to keep it elsewhere, or --no-journal",
                crate::error::os_text(&e)
            ),
        )),
    }
}

/// Removes the journals in `place` (`--no-journal` over an unfinished run).
pub fn drop_all(place: &Place) -> crate::error::Result<()> {
    for f in place.list()? {
        std::fs::remove_file(&f.path).map_err(|e| {
            place::journal_error(
                &f.path,
                &format!("cannot remove it: {}", crate::error::os_text(&e)),
            )
        })?;
    }
    place::sync_dir(&place.dir)
        .map_err(|e| place::journal_error(&place.dir, &crate::error::os_text(&e)))
}

#[cfg(test)]
mod tests;
