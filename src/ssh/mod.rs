//! Reaching the remote side: running ssh (`connect`), deploying this binary there when it
//! has none (`deploy`), shell quoting (`quote`).

pub(crate) mod connect;
mod deploy;
pub(crate) mod quote;
