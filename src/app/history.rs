//! `blocksync versions [HOST:]DST` and `blocksync restore [HOST:]DST --version K -o OUT`:
//! the versions `--keep-versions` keeps on the destination's machine, listed and written
//! out. Both work on the destination's machine (here, or a server's), and answer with a
//! JSON document that this machine prints (as text, or as it is with `--json`).

use super::endpoint::Endpoint;
use super::report::Reporter;
use super::settings::Settings;
use crate::engine::messages::ToSource;
use crate::error::{Error, Kind, Result};
use crate::io::target::{self, Claim, TargetKind};
use crate::journal::Place;
use crate::journal::restore::{Link, link};
use crate::journal::restore::{Out, restore};
use crate::journal::version;
use crate::wire::frame::{
    FLAG_FORCE_MOUNTED, FLAG_UNCHECKED, Frame, Go, Hello, Reply, Role, read_frame, write_frame,
};
use serde_json::{Value, json};
use std::fs::File;
use std::path::{Path, PathBuf};

/// What the commands need from the command line (or a server's hello).
pub(crate) struct HistoryOptions {
    /// `--journal-dir`.
    pub journal_dir: Option<PathBuf>,
    /// `-f`: restore where the chain cannot be checked (a device after a restart).
    pub unchecked: bool,
    /// `--force-mounted`: write a device OUT even if it is in use.
    pub force_mounted: bool,
}

impl HistoryOptions {
    fn of(settings: &Settings) -> HistoryOptions {
        HistoryOptions {
            journal_dir: settings.journal_dir.clone(),
            unchecked: settings.force,
            force_mounted: settings.force_mounted,
        }
    }

    fn from_hello(hello: &Hello) -> HistoryOptions {
        HistoryOptions {
            journal_dir: Some(PathBuf::from(&hello.run.journal_dir))
                .filter(|d| !d.as_os_str().is_empty()),
            unchecked: hello.flags & FLAG_UNCHECKED != 0,
            force_mounted: hello.flags & FLAG_FORCE_MOUNTED != 0,
        }
    }
}

/// `blocksync versions [HOST:]DST`.
pub(crate) fn versions(settings: &Settings, reporter: &Reporter) -> Result<()> {
    let listing = match &settings.pair.destination {
        Endpoint::Local(path) => list_here(path, &HistoryOptions::of(settings))?,
        Endpoint::Remote { host, path } => {
            let mut stream = start_there(settings, host, path, Role::Versions, None)?;
            finish_there(&mut stream, host)?
        }
    };
    reporter.outcome(&render(&listing), listing);
    Ok(())
}

/// The versions of the destination at `path` on this machine, newest first, each with
/// whether it can be restored.
pub(crate) fn list_here(path: &Path, how: &HistoryOptions) -> Result<Value> {
    let (probe_path, existing) = existing(path)?;
    let place = Place::of(&probe_path, &existing.id, how.journal_dir.as_deref());
    let live = place.list()?;
    let found = version::list(&place, live.first().map(|f| f.header.seq))?;
    let mut reach = if live.is_empty() {
        let now = crate::digestfile::syncid::state_of(&probe_path, &existing.id);
        found
            .first()
            .map_or(Link::Same, |v| link(&v.header.state_after, &now))
    } else {
        Link::Changed
    };
    let mut list = Vec::new();
    for (i, v) in found.iter().enumerate() {
        if i > 0 {
            let step = link(&v.header.state_after, &found[i - 1].header.state_before);
            reach = match (reach, step) {
                (Link::Changed, _) | (_, Link::Changed) => Link::Changed,
                (Link::Unknown, _) | (_, Link::Unknown) => Link::Unknown,
                _ => Link::Same,
            };
        }
        let h = &v.header;
        list.push(json!({
            "version": i + 1,
            "began": h.created,
            "completed": h.finished,
            "source": h.source,
            "size": h.size_before,
            "bytes": h.bytes,
            "stored": v.file_len,
            "restorable": match reach {
                Link::Same => "yes",
                Link::Unknown => "unchecked",
                Link::Changed => "no",
            },
        }));
    }
    Ok(json!({
        "destination": path.display().to_string(),
        "place": place.dir.display().to_string(),
        "unfinished_run": !live.is_empty(),
        "versions": list,
    }))
}

/// The listing as text: one line a version.
fn render(listing: &Value) -> String {
    let dest = listing["destination"].as_str().unwrap_or("");
    let empty = Vec::new();
    let list = listing["versions"].as_array().unwrap_or(&empty);
    if list.is_empty() {
        return format!("{dest}: no versions kept (--keep-versions N keeps the last N)");
    }
    let mut out = format!(
        "versions of {dest} (kept in {}; blocksync restore {dest} --version K -o OUT):\n  K  run completed (UTC)   image size  old bytes   stored      source",
        listing["place"].as_str().unwrap_or("")
    );
    for v in list {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let note = match v["restorable"].as_str() {
            Some("no") => {
                "  (cannot be restored: the destination was written since by something else)"
            }
            Some("unchecked") => "  (unchecked: the machine restarted; -f restores it)",
            _ => "",
        };
        out.push_str(&format!(
            "\n  {:<2} {}  {:>10}  {:>10}  {:>10}  {}{note}",
            n("version"),
            utc(n("completed")),
            crate::size::human(n("size")),
            crate::size::human(n("bytes")),
            crate::size::human(n("stored")),
            crate::error::peer_text(v["source"].as_str().unwrap_or("")),
        ));
    }
    if listing["unfinished_run"].as_bool() == Some(true) {
        out.push_str(
            "\n  an unfinished run is there: blocksync rollback, or run again, before a restore",
        );
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` of seconds since the epoch (UTC).
fn utc(secs: u64) -> String {
    let (days, rest) = (secs / 86400, secs % 86400);
    // Days to a civil date (the proleptic Gregorian calendar, from 1970-01-01).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// `blocksync restore [HOST:]DST --version K -o OUT`.
pub(crate) fn restore_cmd(
    settings: &Settings,
    reporter: &Reporter,
    k: u32,
    out: &Path,
) -> Result<()> {
    let how = HistoryOptions::of(settings);
    let done = match &settings.pair.destination {
        Endpoint::Local(path) => {
            let mut confirm = |what: &str| confirm_device(settings, reporter, what);
            restore_here(path, &how, k, out, &mut confirm)?
        }
        Endpoint::Remote { host, path } => {
            let mut stream = start_there(settings, host, path, Role::Restore, Some((k, out)))?;
            if stream.reply.kind == 2 {
                let what = format!("{host}:{}", out.display());
                if let Err(e) = confirm_device(settings, reporter, &what) {
                    super::streams::refuse_all(std::slice::from_mut(&mut stream));
                    return Err(e);
                }
            }
            super::streams::send_go(&mut stream, Go::ahead())?;
            finish_there(&mut stream, host)?
        }
    };
    let text = format!(
        "restored version {k} of {} (as it was before the run completed {} UTC) into {}: {} bytes, {} of them from the version; read back and verified (blake3 {})",
        done["destination"].as_str().unwrap_or(""),
        utc(done["completed"].as_u64().unwrap_or(0)),
        done["out"].as_str().unwrap_or(""),
        done["size"].as_u64().unwrap_or(0),
        done["from_version"].as_u64().unwrap_or(0),
        done["blake3"].as_str().unwrap_or(""),
    );
    reporter.outcome(&crate::error::peer_text(&text), done);
    Ok(())
}

/// Asks before a restore overwrites the device `what`, unless `-f`.
fn confirm_device(settings: &Settings, reporter: &Reporter, what: &str) -> Result<()> {
    if settings.force {
        return Ok(());
    }
    let question = format!("overwrite the device {what} with the restored image?");
    match reporter.confirm(&question) {
        Some(true) => Ok(()),
        Some(false) => Err(Error::new(
            Kind::NotConfirmed,
            format!("not confirmed; {what} left unchanged"),
        )),
        None => Err(Error::new(
            Kind::NotConfirmed,
            format!(
                "a restore overwrites the device {what}; pass -f to go ahead (no terminal to ask on)"
            ),
        )),
    }
}

/// The restore on this machine (also a server's): DST read (never written), OUT a new
/// file (written as `.OUT.blocksync-partial`, renamed when verified) or a device
/// (checked like a sync's destination, `confirm` told its name).
pub(crate) fn restore_here(
    path: &Path,
    how: &HistoryOptions,
    k: u32,
    out: &Path,
    confirm: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Value> {
    let probe = target::probe_destination(path)?;
    let Some(existing) = probe.existing else {
        return Err(Error::new(
            Kind::Destination,
            format!("{} does not exist; it has no versions", path.display()),
        ));
    };
    // Shared with other readers, not with a run writing it.
    let _held = target::hold(&probe, Claim::whole(false))?;
    let dest = target::open_read(&probe.path, "destination", Kind::Destination)?;
    if target::Identity::of(
        &dest
            .file
            .metadata()
            .map_err(|e| Error::io(Kind::Destination, "destination", path, &e, ""))?,
    ) != existing.id
    {
        return Err(Error::new(
            Kind::Destination,
            format!(
                "{} was replaced while it was checked; run again",
                path.display()
            ),
        ));
    }
    let place = Place::of(&probe.path, &existing.id, how.journal_dir.as_deref());
    let out_probe = crate::io::partial::as_partial(target::probe_destination(out)?)?;
    let device = match (&out_probe.existing, &out_probe.final_path) {
        (Some(e), _) if e.kind == TargetKind::BlockDevice => Some(e.size),
        (Some(_), None) => {
            return Err(Error::new(
                Kind::Destination,
                format!(
                    "{} exists; a restore writes a new file (or a device): name one that does not exist",
                    out.display()
                ),
            ));
        }
        _ => None,
    };
    if let Some(e) = &out_probe.existing
        && device.is_some()
    {
        if e.id == existing.id {
            return Err(Error::new(
                Kind::SameFile,
                format!(
                    "{} is the destination itself; a restore never writes it",
                    out.display()
                ),
            ));
        }
        target::check_destination(&out_probe.path, e, 0, how.force_mounted)?;
        confirm(&out.display().to_string())?;
    }
    let open = target::OpenDest {
        force_mounted: how.force_mounted,
        mode: 0o600,
        shared: false,
        claim: Claim::whole(true),
    };
    let target_out = target::open_destination(&out_probe, open)?;
    if device.is_none() {
        // A partial copy of an earlier restore: holes are left unwritten, so start empty.
        target_out
            .file
            .set_len(0)
            .map_err(|e| Error::io(Kind::Io, "output", &out_probe.path, &e, ""))?;
    }
    let sink = Out {
        file: &target_out.file,
        path: out,
        device,
    };
    let done = restore(&dest, &place, k, &sink, how.unchecked)?;
    if let Some(name) = &out_probe.final_path {
        crate::io::partial::finish(&out_probe.path, name)?;
    }
    Ok(json!({
        "status": "ok",
        "destination": path.display().to_string(),
        "version": k,
        "out": out.display().to_string(),
        "began": done.header.created,
        "completed": done.header.finished,
        "source": done.header.source,
        "size": done.size,
        "from_version": done.from_versions,
        "blake3": done.digest,
    }))
}

/// The destination at `path`, which must exist: its resolved path and what it is.
fn existing(path: &Path) -> Result<(PathBuf, target::Existing)> {
    let probe = target::probe_destination(path)?;
    match probe.existing {
        Some(e) => Ok((probe.path, e)),
        None => Err(Error::new(
            Kind::Destination,
            format!("{} does not exist; it has no versions", path.display()),
        )),
    }
}

/// Starts the command on the server of `host`.
fn start_there(
    settings: &Settings,
    host: &str,
    path: &str,
    role: Role,
    restore: Option<(u32, &Path)>,
) -> Result<super::streams::Stream> {
    let remote = settings
        .remote
        .as_ref()
        .expect("a remote command has ssh settings");
    let mut hello = super::client::hello_for(settings, remote, role, path, None);
    if let Some((k, out)) = restore {
        hello.run.version = k;
        hello.run.out = out.display().to_string();
    }
    if settings.force {
        hello.flags |= FLAG_UNCHECKED;
    }
    super::streams::handshake(&remote.ssh, host, &hello)
}

/// The server's answer: its report, or why it failed.
fn finish_there(stream: &mut super::streams::Stream, host: &str) -> Result<Value> {
    let mut buf = Vec::new();
    let answer = read_frame(&mut stream.conn.reader, &mut buf);
    super::streams::reap(&mut stream.conn.child);
    match answer {
        Ok((Frame::Report(text), _)) => serde_json::from_str(&text).map_err(|e| {
            Error::new(
                Kind::Protocol,
                format!("{host} sent a report that is not JSON: {e}"),
            )
        }),
        Ok((Frame::Source(ToSource::Failed { kind, message }), _)) => {
            Err(Error::new(kind, format!("on {host}: {message}")))
        }
        Ok((other, _)) => Err(Error::new(
            Kind::Protocol,
            format!("{host} answered with {other:?}"),
        )),
        Err(e) => Err(Error::new(
            Kind::Remote,
            format!("{host}: the remote blocksync stopped ({e}); run it again"),
        )),
    }
}

/// `blocksync versions|restore host:DST` on the server.
pub(crate) fn serve(hello: &Hello, input: &mut File, output: &mut File) -> Result<()> {
    let how = HistoryOptions::from_hello(hello);
    let path = Path::new(&hello.path);
    let reply = |kind: u8| Reply {
        size: 0,
        kind,
        sync_id: [0; 16],
        mode: 0,
        journal: 0,
        data: 0,
    };
    let report = match hello.role {
        Role::Versions => {
            let listing = list_here(path, &how)?;
            write_frame(output, &Frame::Reply(reply(0))).map_err(super::server::lost_client)?;
            listing
        }
        _ => {
            // The client asks before a device is overwritten: the reply says it is one.
            let out = PathBuf::from(&hello.run.out);
            let device = target::probe_destination(&out)
                .ok()
                .and_then(|p| p.existing)
                .is_some_and(|e| e.kind == TargetKind::BlockDevice);
            let kind = if device { 2 } else { 1 };
            write_frame(output, &Frame::Reply(reply(kind))).map_err(super::server::lost_client)?;
            super::server::expect_go(input, "the restore was not confirmed")?;
            restore_here(path, &how, hello.run.version, &out, &mut |_| Ok(()))?
        }
    };
    write_frame(output, &Frame::Report(report.to_string())).map_err(super::server::lost_client)?;
    Ok(())
}
