//! The engine's messages over a byte stream: frames and the handshake, and the link
//! pumps that carry them one thread per direction, compressing blocks as the link allows.

pub(crate) mod data;
pub(crate) mod frame;
pub(crate) mod handshake;
pub(crate) mod link;
pub(crate) mod packer;
pub(crate) mod session;
pub(crate) mod stream;
