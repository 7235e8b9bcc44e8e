//! The engine's messages over a byte stream: frames and the handshake, and the link
//! pumps that carry them one thread per direction, compressing blocks as the link allows.

pub(crate) mod frame;
pub(crate) mod link;
