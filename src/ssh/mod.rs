//! Reaching the remote side: running ssh (`connect`), deploying this binary there when it
//! has none (`deploy`), shell quoting (`quote`), one login for a run's connections (`share`), `--timeout` on the link (`watch`).

pub(crate) mod connect;
pub(crate) mod deploy;
pub(crate) mod quote;
pub(crate) mod share;
pub(crate) mod watch;
