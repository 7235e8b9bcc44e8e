//! Disk I/O: opening and checking files and block devices, reading and writing them
//! (O_DIRECT, holes, zeroing), the recycled buffers the pipelines read into, and the
//! little-endian codec the on-disk and wire formats share.

pub(crate) mod codec;
pub(crate) mod lock;
pub(crate) mod nbd;
pub(crate) mod outfile;
pub(crate) mod partial;
pub(crate) mod policy;
pub(crate) mod pool;
pub(crate) mod queue;
pub(crate) mod raw;
pub(crate) mod target;
