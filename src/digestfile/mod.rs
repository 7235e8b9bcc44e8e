//! `--digest-file`: the file format, the decision whether a digest file may stand in for
//! reading the destination, recording the digests of a run, and the destination's sync id.

pub(crate) mod cache;
pub(crate) mod format;
pub(crate) mod syncid;
pub(crate) mod trust;
