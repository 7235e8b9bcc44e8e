//! Disk I/O: opening and checking files and block devices, reading and writing them
//! (O_DIRECT, holes, zeroing), and the recycled buffers the pipelines read into.

pub(crate) mod pool;
pub(crate) mod target;
