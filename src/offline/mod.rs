//! The offline commands' work: digest files of a target, patches between a source and a
//! digest file, and applying a patch.

pub(crate) mod patch;
