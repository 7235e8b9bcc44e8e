//! The handshake: the client's Hello, the server's Reply and the client's Go, with the
//! greeting and version that tell blocksync apart from anything else on the stream.

use crate::hash::HashKind;
use crate::io::codec::{Rd, put_u8, put_u16, put_u32, put_u64};
use crate::wire::frame::{DecodeError, MAX_DIGESTS, MAX_SIZE, put_text, text};

/// What the server writes before anything else: tells blocksync apart from a login banner
/// or a shell error.
pub const GREETING: &[u8; 8] = b"BLKSYNC\x01";
/// Protocol version; a mismatch ends the handshake with a clear error on both sides.
pub const VERSION: u16 = 7;

/// Hello flag: report only, write nothing.
pub const FLAG_DRY_RUN: u32 = 1;
/// Hello flag: write to a device even if it is mounted.
pub const FLAG_FORCE_MOUNTED: u32 = 2;
/// Hello flag: drop read pages from the cache on the server.
pub const FLAG_DROP_CACHE: u32 = 4;
/// Hello flag: write real zeros, never punch holes (`--no-sparse`).
pub const FLAG_NO_SPARSE: u32 = 8;
/// Hello flag: zero device ranges with BLKZEROOUT (`--discard`).
pub const FLAG_DISCARD: u32 = 16;
/// Hello flag: after the sync, a `--verify` pass over the same stream.
pub const FLAG_VERIFY: u32 = 32;
/// Hello flag: leave the destination's old bytes where the source is unreadable.
pub const FLAG_KEEP_UNREADABLE: u32 = 64;
/// Hello flag: the destination reports its sync id, forgets it before writing, and
/// records the Go's id once the sync completed and is flushed (for `--digest-file`).
pub const FLAG_TRACK_ID: u32 = 128;
/// Hello flag: the destination does not read itself (the source has its digests in a
/// digest file); it only answers `ToDest::Check` spot-checks.
pub const FLAG_NO_READ: u32 = 256;

/// Hello flag: a restore goes on where it cannot check that nothing else wrote to the
/// destination between runs (`-f`: a device's counters started over with a restart).
pub const FLAG_UNCHECKED: u32 = 512;

/// Hello flag: the compression level was asked for: a source server compresses every
/// block at it (no adaptive skipping).
pub const FLAG_LEVEL_FIXED: u32 = 1024;
/// The source is a stream (standard input): the go's size is an upper bound, and the
/// source finishes at the stream's length.
pub const FLAG_STREAM: u32 = 2048;

/// Which half the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The server reads and sends blocks (pull).
    Source,
    /// The server receives and writes blocks (push).
    Dest,
    /// The server puts its destination back as it was before an unfinished run
    /// (`blocksync rollback host:DST`).
    Rollback,
    /// The server lists its destination's versions (`blocksync versions host:DST`).
    Versions,
    /// The server writes an old version of its destination into a new file or a device
    /// there (`blocksync restore host:DST --version K -o OUT`).
    Restore,
}

/// The client's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The server's half.
    pub role: Role,
    /// The path on the server.
    pub path: String,
    /// Block size.
    pub block: u64,
    /// Block digest.
    pub hash: HashKind,
    /// zstd level the source compresses written blocks with; 0 = off.
    pub compress: i32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Sleep after each block, in ms.
    pub pause_ms: u64,
    /// For a destination server: the source size, to refuse a too-small device early.
    pub source_size: u64,
    /// Bandwidth limit for the source's sending, bytes per second; 0 = none.
    pub bwlimit: u64,
    /// Sub-block size for refining changed blocks; 0 = send changed blocks whole.
    pub refine: u64,
    /// For a source server: give up after this many unreadable ranges (`--max-errors`);
    /// `u64::MAX` = never.
    pub max_errors: u64,
    /// For a destination server: the permission bits a new destination file gets (the
    /// source's; see `Target::copy_mode`).
    pub source_mode: u32,
    /// For a destination server: which run and stream this is, and how it journals.
    pub run: RunPart,
}

/// A destination server's part in the run: what it locks and journals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunPart {
    /// The run's random id, the same for every `-w` stream of it.
    pub id: [u8; 16],
    /// This stream's index, `0..streams`.
    pub stream: u32,
    /// How many streams the run has (`-w`); at least 1.
    pub streams: u32,
    /// The undo journal: 0 auto, 1 on (`--journal`) or [`JOURNAL_OFF`] (see
    /// `journal::Mode`).
    pub journal: u8,
    /// Where journals are kept on the server (`--journal-dir`); empty: the default place.
    pub journal_dir: String,
    /// `--keep-versions N`; `None`: as the destination's versions say.
    pub keep: Option<u32>,
    /// For a restore: which version (1 = before the last run).
    pub version: u32,
    /// For a restore: the file or device it writes, on the server.
    pub out: String,
    /// For a destination server: the bytes of data the source holds (allocated), which
    /// a new destination file needs room for.
    pub source_data: u64,
}

/// The most versions a destination keeps.
pub const MAX_VERSIONS: u32 = 10_000;

/// Never journal (`--no-journal`).
pub const JOURNAL_OFF: u8 = 2;

/// At most this many parallel streams (`-w`).
pub const MAX_STREAMS: u32 = 64;

/// The server's answer to [`Hello`] once its checks passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The size of the server's file or device (0 for a missing destination).
    pub size: u64,
    /// 0 missing, 1 file, 2 block device.
    pub kind: u8,
    /// With [`FLAG_TRACK_ID`]: the id of the last sync completed onto the destination
    /// (zeros: none).
    pub sync_id: [u8; 16],
    /// From a source server: the permission bits a new destination file gets.
    pub mode: u32,
    /// From a destination server: whether the run will keep an undo journal, and why
    /// (`journal::Decision` as a byte, 0..=5).
    pub journal: u8,
    /// From a source server: the bytes of data its file holds (allocated; its size for a
    /// device), which a new destination file needs room for.
    pub data: u64,
}

/// The client's go-ahead (or not) after the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Go {
    /// False: the user declined; the server exits without writing.
    pub proceed: bool,
    /// The source size.
    pub size: u64,
    /// The byte range this stream syncs.
    pub start: u64,
    /// End of that range (exclusive).
    pub end: u64,
    /// With [`FLAG_TRACK_ID`]: the id the destination records once this sync completes.
    pub sync_id: [u8; 16],
    /// The destination need not read itself: the source compares against a digest file.
    pub no_read: bool,
}

/// Permission bits of a new file: nothing past 0o777 (no setuid, setgid or sticky).
fn mode(r: &mut Rd) -> Result<u32, DecodeError> {
    match r.u32()? {
        m if m <= 0o777 => Ok(m),
        m => Err(DecodeError::Unknown("file mode", m.into())),
    }
}

fn version(r: &mut Rd) -> Result<(), DecodeError> {
    match r.u16()? {
        VERSION => Ok(()),
        v => Err(DecodeError::Version(v)),
    }
}

impl Hello {
    pub(crate) fn encode(&self, p: &mut Vec<u8>) {
        p.extend_from_slice(GREETING);
        put_u16(p, VERSION);
        put_u8(
            p,
            match self.role {
                Role::Source => 1,
                Role::Dest => 2,
                Role::Rollback => 3,
                Role::Versions => 4,
                Role::Restore => 5,
            },
        );
        put_text(p, &self.path);
        put_u64(p, self.block);
        put_u8(p, self.hash.id());
        put_u32(p, self.compress as u32);
        put_u32(p, self.flags);
        for v in [
            self.pause_ms,
            self.source_size,
            self.bwlimit,
            self.refine,
            self.max_errors,
        ] {
            put_u64(p, v);
        }
        put_u32(p, self.source_mode);
        p.extend_from_slice(&self.run.id);
        put_u32(p, self.run.stream);
        put_u32(p, self.run.streams);
        put_u8(p, self.run.journal);
        put_text(p, &self.run.journal_dir);
        put_u32(p, self.run.keep.unwrap_or(u32::MAX));
        put_u32(p, self.run.version);
        put_text(p, &self.run.out);
        put_u64(p, self.run.source_data);
    }

    pub(crate) fn decode(r: &mut Rd) -> Result<Hello, DecodeError> {
        if r.take(GREETING.len())? != GREETING {
            return Err(DecodeError::BadMagic);
        }
        version(r)?;
        let role = match r.u8()? {
            1 => Role::Source,
            2 => Role::Dest,
            3 => Role::Rollback,
            4 => Role::Versions,
            5 => Role::Restore,
            x => return Err(DecodeError::Unknown("role", x.into())),
        };
        let path = text(r)?;
        let block = r.u64()?;
        if !(crate::size::MIN_BLOCK..=crate::size::MAX_BLOCK).contains(&block) {
            return Err(DecodeError::TooLarge("block size"));
        }
        let h = r.u8()?;
        let hash = HashKind::from_id(h).ok_or(DecodeError::Unknown("hash", h.into()))?;
        let compress = r.u32()? as i32;
        Ok(Hello {
            role,
            path,
            block,
            hash,
            compress,
            flags: r.u32()?,
            pause_ms: r.u64()?,
            source_size: r.u64()?,
            bwlimit: r.u64()?,
            refine: match r.u64()? {
                0 => 0,
                x if x >= crate::size::MIN_BLOCK && block.div_ceil(x) <= MAX_DIGESTS as u64 => x,
                _ => return Err(DecodeError::TooLarge("refinement")),
            },
            max_errors: r.u64()?,
            source_mode: mode(r)?,
            run: run_part(r)?,
        })
    }
}

fn run_part(r: &mut Rd) -> Result<RunPart, DecodeError> {
    let id = r.array()?;
    let (stream, streams) = (r.u32()?, r.u32()?);
    if streams == 0 || streams > MAX_STREAMS || stream >= streams {
        return Err(DecodeError::Unknown("stream", stream.into()));
    }
    let journal = r.u8()?;
    if journal > JOURNAL_OFF {
        return Err(DecodeError::Unknown("journal mode", journal.into()));
    }
    let journal_dir = text(r)?;
    let keep = match r.u32()? {
        u32::MAX => None,
        k if k <= MAX_VERSIONS => Some(k),
        _ => return Err(DecodeError::TooLarge("versions kept")),
    };
    Ok(RunPart {
        id,
        stream,
        streams,
        journal,
        journal_dir,
        keep,
        version: r.u32()?,
        out: text(r)?,
        source_data: r.u64()?,
    })
}

impl Reply {
    pub(crate) fn encode(&self, p: &mut Vec<u8>) {
        put_u16(p, VERSION);
        put_u64(p, self.size);
        put_u8(p, self.kind);
        p.extend_from_slice(&self.sync_id);
        put_u32(p, self.mode);
        put_u8(p, self.journal);
        put_u64(p, self.data);
    }

    pub(crate) fn decode(r: &mut Rd) -> Result<Reply, DecodeError> {
        version(r)?;
        let size = r.u64()?;
        if size > MAX_SIZE {
            return Err(DecodeError::TooLarge("size"));
        }
        let kind = r.u8()?;
        if kind > 2 {
            return Err(DecodeError::Unknown("target kind", kind.into()));
        }
        Ok(Reply {
            size,
            kind,
            sync_id: r.array()?,
            mode: mode(r)?,
            journal: match r.u8()? {
                j @ 0..=5 => j,
                j => return Err(DecodeError::Unknown("journal decision", j.into())),
            },
            data: r.u64()?,
        })
    }
}

impl Go {
    /// Go ahead, for a server that runs no sync (a rollback, a restore): no range.
    pub fn ahead() -> Go {
        Go {
            proceed: true,
            size: 0,
            start: 0,
            end: 0,
            sync_id: [0; 16],
            no_read: false,
        }
    }

    pub(crate) fn encode(&self, p: &mut Vec<u8>) {
        put_u8(p, self.proceed as u8 | (self.no_read as u8) << 1);
        for v in [self.size, self.start, self.end] {
            put_u64(p, v);
        }
        p.extend_from_slice(&self.sync_id);
    }

    pub(crate) fn decode(r: &mut Rd) -> Result<Go, DecodeError> {
        let bits = r.u8()?;
        let (proceed, no_read) = (bits & 1 != 0, bits & 2 != 0);
        let (size, start, end) = (r.u64()?, r.u64()?, r.u64()?);
        if size > MAX_SIZE {
            return Err(DecodeError::TooLarge("size"));
        }
        if start > end || end > size {
            return Err(DecodeError::Unknown("range end", end));
        }
        Ok(Go {
            proceed,
            size,
            start,
            end,
            sync_id: r.array()?,
            no_read,
        })
    }
}
