//! `blocksync apply`: a patch read and checked whole, then applied to a target in the
//! state it expects, flushed, and verified against the source's full-strength digest.

use crate::error::{Error, Kind, Result, os_text};
use crate::io::target::{self, Target, TargetKind};
use crate::offline::patch::{Fingerprint, scan};
use crate::offline::records::{MAGIC, PatchHeader, Record, bad_patch, read_header, read_record};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

/// A patch read and checked whole (a copy of stdin is kept in a temporary file).
pub struct Patch {
    /// What it applies to and produces.
    pub header: PatchHeader,
    file: File,
    records_at: u64,
    /// The source's whole digest.
    pub source_digest: [u8; 32],
    /// Fingerprint of the blocks the patch leaves alone, as the target must hold them.
    untouched: [u8; 32],
    /// Blocks the patch writes, ascending.
    touched: Vec<u64>,
}

impl Patch {
    /// Reads `path` (`-`: stdin) and checks its checksum, structure and end record.
    pub fn open(path: &Path) -> Result<Patch> {
        let file = if path == Path::new("-") {
            // Spooled, so nothing is applied before the whole patch has arrived intact.
            let mut tmp = tempfile_in_tmp()?;
            io::copy(&mut io::stdin().lock(), &mut tmp).map_err(|e| {
                bad_patch(&format!("reading the patch from stdin: {}", os_text(&e)))
            })?;
            tmp
        } else {
            File::open(path).map_err(|e| Error::io(Kind::Source, "patch", path, &e, ""))?
        };
        let len = file
            .metadata()
            .map_err(|e| Error::io(Kind::Source, "patch", path, &e, ""))?
            .len();
        if len < 16 + 32 {
            return Err(bad_patch("the patch is truncated"));
        }
        let mut h = blake3::Hasher::new();
        let mut r = BufReader::with_capacity(1 << 20, &file);
        io::Seek::rewind(&mut r).map_err(|e| bad_patch(&e.to_string()))?;
        io::copy(&mut (&mut r).take(len - 32), &mut h).map_err(|e| bad_patch(&e.to_string()))?;
        let mut sum = [0u8; 32];
        r.read_exact(&mut sum)
            .map_err(|e| bad_patch(&e.to_string()))?;
        let mut head = [0u8; 16];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0)
            .map_err(|e| bad_patch(&e.to_string()))?;
        if &head != MAGIC {
            return Err(bad_patch("not a blocksync patch"));
        }
        if *h.finalize().as_bytes() != sum {
            return Err(bad_patch(
                "the patch is truncated or corrupted (checksum mismatch)",
            ));
        }
        let mut r = BufReader::new(&file);
        io::Seek::rewind(&mut r).map_err(|e| bad_patch(&e.to_string()))?;
        let header = read_header(&mut r)?;
        let records_at =
            io::Seek::stream_position(&mut r).map_err(|e| bad_patch(&e.to_string()))?;
        // Walk the records to find the end record: the structure must hold too.
        let mut count = 0u64;
        let mut touched = Vec::new();
        let (records, source_digest, untouched) = loop {
            let rec = read_record(&mut r, &header)?;
            match rec {
                Record::End {
                    records,
                    digest,
                    untouched,
                } => break (records, digest, untouched),
                Record::Data { offset, .. } | Record::Zero { offset, .. } => {
                    touched.push(offset / header.block);
                    count += 1;
                }
            }
        };
        touched.sort_unstable();
        let records_end =
            io::Seek::stream_position(&mut r).map_err(|e| bad_patch(&e.to_string()))?;
        if records != count || records_end != len - 32 {
            return Err(bad_patch(
                "the patch's end record does not match its contents",
            ));
        }
        Ok(Patch {
            header,
            file,
            records_at,
            source_digest,
            untouched,
            touched,
        })
    }
}

fn tempfile_in_tmp() -> Result<File> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "blocksync-patch-{}-{:x}",
        std::process::id(),
        u64::from_le_bytes(
            crate::digestfile::syncid::fresh()[..8]
                .try_into()
                .expect("8")
        )
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            Error::io(
                Kind::Io,
                "temporary file",
                &path,
                &e,
                "set TMPDIR to a writable directory",
            )
        })?;
    let _ = std::fs::remove_file(&path); // unnamed: gone when closed
    Ok(f)
}

/// What `apply` did.
#[derive(Debug, Default)]
pub struct ApplyStats {
    /// Records applied.
    pub records: u64,
    /// Bytes written.
    pub written: u64,
    /// Target bytes read (the state check and the verification).
    pub read: u64,
}

/// `blocksync apply`: checks `t` is the state `p` expects, applies, flushes, verifies.
pub fn apply(p: &Patch, t: &Target) -> Result<ApplyStats> {
    let h = &p.header;
    let name = t.path.display().to_string();
    // The blocks both sizes hold: the target must have them (an apply cut short may have
    // grown a file already; it is resized only at the end).
    let common = h.target_size.min(h.source_size);
    let size_ok = match t.kind {
        TargetKind::File => {
            t.size == h.target_size || (t.size >= common && t.size <= h.source_size)
        }
        TargetKind::BlockDevice => t.size == h.target_size,
    };
    if !size_ok {
        return Err(Error::new(
            Kind::StaleCache,
            format!(
                "{name} is {} bytes, the patch is for a target of {} ({}); nothing was written",
                t.size, h.target_size, h.label
            ),
        ));
    }
    if t.kind == TargetKind::BlockDevice && t.size < h.source_size {
        return Err(Error::new(
            Kind::TooSmall,
            format!(
                "device {name} is {} bytes, the patch makes {}; nothing was written",
                t.size, h.source_size
            ),
        ));
    }
    let mut stats = ApplyStats::default();
    let mut state = Fingerprint::default();
    let mut next = p.touched.iter().peekable();
    stats.read += scan(t, common, h.block, h.hash, false, |offset, _, infos| {
        let first = offset / h.block;
        for (j, info) in infos.iter().enumerate() {
            let b = first + j as u64;
            while next.next_if(|&&t| t < b).is_some() {}
            if next.peek() == Some(&&b) {
                continue; // rewritten whole by the patch: its old content does not matter
            }
            state.add_at(b, info);
        }
        Ok(())
    })?;
    if state.done() != p.untouched {
        return Err(Error::new(
            Kind::StaleCache,
            format!(
                "{name} is not in the state the patch expects (it is for {} as its digests described it); nothing was written",
                h.label
            ),
        ));
    }
    // Checked: apply.
    let mut r = BufReader::with_capacity(1 << 20, &p.file);
    io::Seek::seek(&mut r, io::SeekFrom::Start(p.records_at))
        .map_err(|e| bad_patch(&e.to_string()))?;
    let werr = |at: u64, e: io::Error| {
        Error::io(
            Kind::Io,
            "writing",
            &t.path,
            &e,
            &format!("at byte {at}; run apply again once fixed"),
        )
    };
    loop {
        match read_record(&mut r, h)? {
            Record::End { .. } => break,
            Record::Data { offset, data } => {
                target::write_full_at(&t.file, &data, offset).map_err(|e| werr(offset, e))?;
                stats.written += data.len() as u64;
            }
            Record::Zero { offset, len } => {
                let done = match t.kind {
                    TargetKind::File => target::punch_hole(&t.file, offset, len),
                    TargetKind::BlockDevice => Err(io::ErrorKind::Unsupported.into()),
                };
                if done.is_err() {
                    target::write_zeros(&t.file, offset, len).map_err(|e| werr(offset, e))?;
                }
            }
        }
        stats.records += 1;
    }
    if t.kind == TargetKind::File && t.size != h.source_size {
        t.file
            .set_len(h.source_size)
            .map_err(|e| werr(h.source_size, e))?;
    }
    t.file.sync_all().map_err(|e| werr(0, e))?;
    // Verify at full strength against the source's digest, from the disk.
    target::advise(&t.file, 0, 0, target::Advice::DontNeed);
    let now = Target {
        size: match t.kind {
            TargetKind::File => h.source_size,
            TargetKind::BlockDevice => t.size,
        },
        path: t.path.clone(),
        file: t.file.try_clone().map_err(|e| werr(0, e))?,
        kind: t.kind,
        id: t.id,
    };
    let mut whole = Fingerprint::default();
    stats.read += scan(&now, h.source_size, h.block, h.hash, true, |_, _, infos| {
        whole.add(infos, true);
        Ok(())
    })?;
    if whole.done() != p.source_digest {
        return Err(Error::new(
            Kind::Verify,
            format!(
                "after applying, {name} does not match the source's digest; check the target's disk and apply again"
            ),
        ));
    }
    Ok(stats)
}
