//! blocksync: sync a large file or block device onto another, locally or over ssh, reading
//! both sides in fixed blocks and writing only the blocks that differ.
//!
//! Layers, lowest first; a module imports only from the layers below it:
//! - foundation: [`error`] (kinds and exit codes), `size`, `hash`;
//! - `io`: opening, probing and reading/writing files and devices, the buffer pool;
//! - `digestfile`: `--digest-file`'s format, trust decision and recording;
//! - `engine`: the source and destination halves and the messages between them;
//! - `wire`: those messages as frames over a byte stream, and the link pumps;
//! - `ssh`: connecting, deploying the remote side, shell quoting;
//! - `offline`: `digest`, `diff` and `apply`;
//! - `app`: the command line, the local run, both sides of a remote run, the verdict.

mod app;
mod digestfile;
mod engine;
pub mod error;
mod hash;
mod io;
mod journal;
mod offline;
mod size;
mod ssh;
mod wire;

pub use app::main_entry;

/// Internals the integration tests and the fuzz targets drive directly. Not a stable API.
#[doc(hidden)]
pub mod testing {
    pub use crate::app::badmap::parse_bad;
    pub use crate::app::server::config_for;
    pub use crate::engine::messages::{Counts, FindingKind, ToDest, ToSource};
    pub use crate::engine::{CHUNK_TARGET, Layout, Stats};
    pub use crate::error::exit_codes;
    pub use crate::hash::{BlockInfo, HashKind};
    pub use crate::io::nbd::{
        Address, BlockSizes, Client, Context, Extent, Flags, Handle, MAX_PAYLOAD, Options, QemuNbd,
        QemuOptions, Uri, qemu_nbd_in,
    };
    pub use crate::io::pool::{Recycler, Slice};
    pub use crate::size::{MAX_BLOCK, MIN_BLOCK};
    pub use crate::ssh::deploy::{ROOT_STEP, STALE_EXIT, hash_hex, sudoers_rule};
    pub use crate::wire::frame::{
        Data, FLAG_DROP_CACHE, FLAG_DRY_RUN, FLAG_NO_READ, FLAG_TRACK_ID, FLAG_VERIFY, Frame,
        GREETING, Go, Hello, MAX_DIGESTS, MAX_FRAME, MAX_REPORT, MAX_SIZE, MAX_TEXT, Reply, Role,
        RunPart, VERSION, read_frame, read_frame_with, write_frame, write_raw_frame,
    };
    pub use crate::wire::link::{Peer, recv_from_dest, recv_from_source};
}
