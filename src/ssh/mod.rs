//! Reaching the remote side: running ssh, deploying this binary there, shell quoting.

pub(crate) mod connect;
