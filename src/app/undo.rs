//! The undo journal as a run sees it: deciding, on the destination's machine, whether
//! the run keeps one (the confirmation says so), and the plan the destination half
//! journals by.

use super::endpoint::Endpoint;
use super::report::Reporter;
use super::settings::Settings;
use crate::engine::messages::ToSource;
use crate::error::{Error, Kind, Result};
use crate::io::target::{self, Claim, DestProbe, TargetKind};
use crate::journal::rollback::Restored;
use crate::journal::{self, Decision, Mode, Place, Plan};
use crate::wire::frame::{Frame, Go, Role, read_frame};
use std::path::Path;

/// What the command line (or a server's hello) asks of the journal.
#[derive(Debug, Clone, Default)]
pub(crate) struct Wanted {
    /// `--journal`, `--no-journal`, or neither.
    pub mode: Mode,
    /// `--journal-dir DIR`.
    pub dir: Option<std::path::PathBuf>,
    /// `--keep-versions N`.
    pub keep: Option<u32>,
}

/// The journal decision for a run's destination on this machine.
pub(crate) struct Undo {
    /// Journaled or not, and why.
    pub decision: Decision,
    /// Where its journals are (an existing destination only).
    pub place: Option<Place>,
    /// `--keep-versions`.
    keep: Option<u32>,
}

impl Undo {
    /// Decides for the destination `probe` (before the confirmation); a dry run or a
    /// new destination keeps nothing.
    pub fn decide(want: &Wanted, probe: &DestProbe, dry_run: bool) -> Result<Undo> {
        let Some(existing) = probe.shown().filter(|_| !dry_run) else {
            return Ok(Undo {
                decision: Decision::Nothing,
                place: None,
                keep: want.keep,
            });
        };
        let place = Place::of(&probe.path, &existing.id, want.dir.as_deref());
        let decision = journal::decide(want.mode, &probe.path, &existing.id, &place, want.keep)?;
        Ok(Undo {
            decision,
            place: Some(place),
            keep: want.keep,
        })
    }

    /// Once confirmed, before anything is written: drops an unfinished run's journals
    /// (`--no-journal`), or returns what the destination half journals by.
    pub fn plan(
        &self,
        run_id: [u8; 16],
        stream: (u32, u32),
        source: String,
    ) -> Result<Option<Plan>> {
        let Some(place) = &self.place else {
            return Ok(None);
        };
        if self.decision == Decision::Drops {
            journal::drop_all(place)?;
        }
        Ok(self.decision.journals().then(|| Plan {
            place: place.clone(),
            run_id,
            stream: stream.0,
            streams: stream.1,
            source,
            keep: self.keep,
        }))
    }
}

/// Says, even with `-f`, when a destination that would be journaled cannot be.
pub(crate) fn note_unavailable(reporter: &Reporter, decision: Decision, destination: &str) {
    if decision == Decision::Unavailable {
        reporter.note(&format!(
            "no undo journal for {destination}: its directory takes no new files, so an interrupted run leaves no way back; --journal-dir DIR keeps one elsewhere"
        ));
    }
}

/// `blocksync rollback [HOST:]DST`: puts the destination back as it was before the
/// unfinished run its journals undo, verifies it, and removes the journals.
pub(crate) fn rollback(settings: &Settings, reporter: &Reporter) -> Result<()> {
    let (restored, name) = match &settings.pair.destination {
        Endpoint::Local(path) => {
            let mut confirm = |p: &Pending| confirm_rollback(settings, reporter, p.what);
            let how = RollbackOptions {
                force_mounted: settings.force_mounted,
                journal_dir: settings.journal_dir.clone(),
            };
            (
                rollback_here(path, &how, &mut confirm)?,
                path.display().to_string(),
            )
        }
        Endpoint::Remote { host, path } => (
            rollback_there(settings, reporter, host, path)?,
            format!("{host}:{path}"),
        ),
    };
    let text = format!(
        "rolled back {name}: {} bytes restored from {} journal(s) and verified; {} bytes, as before the run",
        restored.bytes, restored.journals, restored.size
    );
    let json = serde_json::json!({
        "status": "ok",
        "rolled_back": name,
        "bytes_restored": restored.bytes,
        "journals": restored.journals,
        "size": restored.size,
    });
    reporter.outcome(&text, json);
    Ok(())
}

/// Asks before a rollback overwrites `what`, unless `-f`.
pub(crate) fn confirm_rollback(settings: &Settings, reporter: &Reporter, what: &str) -> Result<()> {
    if settings.force {
        return Ok(());
    }
    let question = format!(
        "put {what} back as it was before its unfinished run? What the run wrote since is lost."
    );
    match reporter.confirm(&question) {
        Some(true) => Ok(()),
        Some(false) => Err(Error::new(
            Kind::NotConfirmed,
            format!("not confirmed; {what} left unchanged"),
        )),
        None => Err(Error::new(
            Kind::NotConfirmed,
            format!("a rollback rewrites {what}; pass -f to go ahead (no terminal to ask on)"),
        )),
    }
}

/// The rollback of a destination on this machine (also a server's): locked, checked like
/// a sync's destination, confirmed by `confirm` (told the path), then restored.
pub(crate) fn rollback_here(
    path: &Path,
    how: &RollbackOptions,
    confirm: &mut dyn FnMut(&Pending) -> Result<()>,
) -> Result<Restored> {
    let probe = target::probe_destination(path)?;
    let Some(existing) = probe.existing else {
        return Err(Error::new(
            Kind::Destination,
            format!("{} does not exist; nothing to roll back", path.display()),
        ));
    };
    let claim = Claim::whole(true);
    let _held = target::hold(&probe, claim)?;
    target::check_destination(path, &existing, 0, how.force_mounted)?;
    let place = Place::of(&probe.path, &existing.id, how.journal_dir.as_deref());
    let journals = place.list()?.len();
    if journals == 0 {
        return Err(Error::new(
            Kind::Journal,
            format!(
                "no undo journal for {} (looked in {}): nothing to roll back; the last run completed, or it kept no journal",
                path.display(),
                place.dir.display()
            ),
        ));
    }
    confirm(&Pending {
        what: &path.display().to_string(),
        journals,
        size: existing.size,
        kind: existing.kind,
    })?;
    let open = target::OpenDest {
        force_mounted: how.force_mounted,
        mode: 0o600,
        shared: false,
        claim,
    };
    let dest = target::open_destination(&probe, open)?;
    crate::journal::rollback::rollback(&dest, &place)
}

/// A rollback about to be made, for its confirmation.
pub(crate) struct Pending<'a> {
    /// The destination.
    pub what: &'a str,
    /// Journals found.
    pub journals: usize,
    /// Its size now.
    pub size: u64,
    /// File or device.
    pub kind: TargetKind,
}

/// `blocksync rollback host:DST`: the server does it, after the confirmation here.
fn rollback_there(
    settings: &Settings,
    reporter: &Reporter,
    host: &str,
    path: &str,
) -> Result<Restored> {
    let remote = settings
        .remote
        .as_ref()
        .expect("a remote rollback has ssh settings");
    let hello = super::client::hello_for(settings, remote, Role::Rollback, path, None);
    let mut stream = super::streams::handshake(&remote.ssh, host, &hello)?;
    let journals = u64::from_le_bytes(stream.reply.sync_id[..8].try_into().expect("8 bytes"));
    if let Err(e) = confirm_rollback(settings, reporter, &format!("{host}:{path}")) {
        super::streams::refuse_all(std::slice::from_mut(&mut stream));
        return Err(e);
    }
    super::streams::send_go(&mut stream, Go::ahead())?;
    let mut buf = Vec::new();
    let answer = read_frame(&mut stream.conn.reader, &mut buf);
    super::streams::reap(&mut stream.conn.child);
    match answer {
        Ok((Frame::Source(ToSource::Done { written, read, .. }), _)) => Ok(Restored {
            journals: journals as usize,
            bytes: written,
            size: read,
        }),
        Ok((Frame::Source(ToSource::Failed { kind, message }), _)) => {
            Err(Error::new(kind, format!("on {host}: {}", message)))
        }
        Ok((other, _)) => Err(Error::new(
            Kind::Protocol,
            format!("{host} answered the rollback with {other:?}"),
        )),
        Err(e) => Err(Error::new(
            Kind::Remote,
            format!("{host}: the remote blocksync stopped during the rollback ({e}); run it again"),
        )),
    }
}

/// What a rollback needs from the command line (or a server's hello).
pub(crate) struct RollbackOptions {
    /// `--force-mounted`.
    pub force_mounted: bool,
    /// `--journal-dir`.
    pub journal_dir: Option<std::path::PathBuf>,
}
