//! The destination half: reads the destination a chunk at a time on its own thread and
//! reports it (bytes or digests), while this thread writes the changed ranges it receives,
//! then resizes a file destination, flushes, and confirms.

use super::{Compare, Config, Stats};
use crate::error::{Error, Kind, Result, os_text};
use crate::pool::Pool;
use crate::protocol::{ToDest, ToSource};
use crate::target::{self, Advice, Target, TargetKind};
use crossbeam_channel::{Receiver, Sender};

/// Runs the destination half until the source says it is finished (or goes away).
/// A failure is returned and also reported to the source as [`ToSource::Failed`].
pub fn run(
    dest: Option<&Target>,
    config: &Config,
    from_source: Receiver<ToDest>,
    to_source: Sender<ToSource>,
    stats: &Stats,
) -> Result<()> {
    let pool = Pool::new(config.buffers, config.layout.chunk as usize);
    if let Some(d) = dest {
        target::advise(&d.file, 0, 0, Advice::Sequential);
    }
    std::thread::scope(|s| {
        match config.compare {
            Compare::Bytes => {
                let reader_tx = to_source.clone();
                s.spawn(move || read_dest(dest, config, &pool, reader_tx, stats));
            }
            Compare::Digest(kind) => {
                // Reading and hashing on separate threads: one core each, overlapped.
                let (raw_tx, raw_rx) = crossbeam_channel::bounded(config.buffers);
                s.spawn(move || read_dest(dest, config, &pool, raw_tx, stats));
                let hash_tx = to_source.clone();
                s.spawn(move || hash_dest(kind, config, raw_rx, hash_tx));
            }
        }
        let result = write_dest(dest, config, from_source, &to_source, stats);
        if let Err(e) = &result {
            let _ = to_source.send(failed(e.kind, e.message.clone()));
        }
        result
    })
}

/// Turns the reader's chunks into digests of the blocks the destination fully holds
/// (a block it holds only part of counts as changed); passes anything else through.
fn hash_dest(
    kind: crate::hash::HashKind,
    config: &Config,
    chunks: Receiver<ToSource>,
    out: Sender<ToSource>,
) {
    for msg in chunks {
        let msg = match msg {
            ToSource::Bytes { index, data } => {
                let digests = super::prehash::chunk_digests(kind, &config.layout, index, &data);
                ToSource::Digests { index, digests }
            }
            other => other,
        };
        if out.send(msg).is_err() {
            return;
        }
    }
}

fn failed(kind: Kind, message: String) -> ToSource {
    ToSource::Failed { kind, message }
}

fn read_dest(
    dest: Option<&Target>,
    config: &Config,
    pool: &Pool,
    out: Sender<ToSource>,
    stats: &Stats,
) {
    let layout = config.layout;
    let have_size = dest.map_or(0, |d| d.size);
    for index in 0..layout.chunks() {
        let (offset, len) = layout.chunk_at(index);
        if let Some(digests) = config.precomputed.as_ref().and_then(|p| p.get(offset)) {
            // Hashed ahead: nothing to read.
            let msg = ToSource::Digests {
                index,
                digests: digests.to_vec(),
            };
            if out.send(msg).is_err() {
                return;
            }
            if config.dest_progress {
                Stats::add(&stats.done, len as u64);
            }
            continue;
        }
        let have = have_size.saturating_sub(offset).min(len as u64) as usize;
        let mut data = pool.get(have);
        if let Some(d) = dest.filter(|_| have > 0) {
            match target::read_full_at(&d.file, &mut data, offset) {
                Ok(n) => {
                    data.truncate(n);
                    Stats::add(&stats.dest_read, n as u64);
                    if config.drop_cache {
                        target::advise(&d.file, offset, n as u64, Advice::DontNeed);
                    }
                }
                Err(e) => {
                    let msg = format!(
                        "reading destination {} at byte {offset}: {}",
                        d.path.display(),
                        os_text(&e)
                    );
                    let _ = out.send(failed(Kind::Io, msg));
                    return;
                }
            }
        }
        if out.send(ToSource::Bytes { index, data }).is_err() {
            return; // the source finished or failed; it no longer needs our reads
        }
        if config.dest_progress {
            Stats::add(&stats.done, len as u64);
        }
    }
}

fn write_dest(
    dest: Option<&Target>,
    config: &Config,
    from_source: Receiver<ToDest>,
    to_source: &Sender<ToSource>,
    stats: &Stats,
) -> Result<()> {
    let mut written = 0u64;
    let writable = dest.filter(|_| !config.dry_run);
    let io_error = |what: String, e: std::io::Error| {
        let hint = if e.raw_os_error() == Some(libc::ENOSPC) {
            "; free space on it and run again to resume"
        } else {
            ""
        };
        Error::new(Kind::Io, format!("{what}: {}{hint}", os_text(&e)))
    };
    let (finish, size) = loop {
        match from_source.recv() {
            Ok(ToDest::Write { offset, data }) => {
                let Some(d) = writable else {
                    return Err(Error::new(
                        Kind::Protocol,
                        "source sent a block in a dry run",
                    ));
                };
                target::write_full_at(&d.file, &data, offset).map_err(|e| {
                    io_error(
                        format!("writing destination {} at byte {offset}", d.path.display()),
                        e,
                    )
                })?;
                target::start_writeback(&d.file, offset, data.len() as u64);
                written += data.len() as u64;
                Stats::add(&stats.written, data.len() as u64);
            }
            Ok(ToDest::Finish { size, .. }) => break (true, size),
            // Stopped early: flush what was written so a rerun resumes from it.
            Ok(ToDest::Abort { .. }) | Err(_) => break (false, 0),
        }
    };
    if let Some(d) = writable {
        if finish && d.kind == TargetKind::File && d.size != size {
            d.file.set_len(size).map_err(|e| {
                io_error(
                    format!("resizing destination {} to {size} bytes", d.path.display()),
                    e,
                )
            })?;
        }
        d.file
            .sync_all()
            .map_err(|e| io_error(format!("flushing destination {}", d.path.display()), e))?;
        if config.drop_cache {
            target::advise(&d.file, 0, 0, Advice::DontNeed);
        }
    }
    let read = Stats::get(&stats.dest_read);
    let _ = to_source.send(ToSource::Done { written, read });
    Ok(())
}
