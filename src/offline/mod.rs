//! The offline commands' work: digest files of a target, patches between a source and a
//! digest file (their format in `records`), and applying a patch.

pub(crate) mod apply;
pub(crate) mod patch;
pub(crate) mod records;
