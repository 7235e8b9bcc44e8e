//! `--verify`'s record of what the sync pass read, to tell a destination that differs
//! from a source that changed under the sync.

use crate::hash::{BlockInfo, HashKind};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the source read in the sync pass, kept for `--verify` to tell a destination that
/// differs from a source that changed under the sync.
#[derive(Debug)]
pub struct VerifyLog {
    /// The digest both sides use for the verify pass.
    pub kind: HashKind,
    /// Per chunk (by byte offset): a fingerprint of its block digests as read.
    read: Mutex<HashMap<u64, Digest128>>,
}

/// A 128-bit fingerprint.
type Digest128 = [u8; 16];

impl VerifyLog {
    /// An empty log for digests of `kind`.
    pub fn new(kind: HashKind) -> Arc<Self> {
        Arc::new(VerifyLog {
            kind,
            read: Mutex::new(HashMap::new()),
        })
    }

    /// The fingerprint of a chunk's blocks (digests at either strength: only the first
    /// 128 bits count, so a verify pass's full digests match the sync pass's).
    pub fn fingerprint(blocks: &[BlockInfo]) -> Digest128 {
        let mut h = blake3::Hasher::new();
        for b in blocks {
            match b {
                BlockInfo::Missing => h.update(&[0]),
                BlockInfo::Zero => h.update(&[1]),
                BlockInfo::Digest(d) => h.update(&[2]).update(&d.0[..crate::hash::BLOCK_DIGEST]),
            };
        }
        h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }

    /// Records what the chunk at `offset` held when the sync read it.
    pub fn record(&self, offset: u64, blocks: &[BlockInfo]) {
        let fp = Self::fingerprint(blocks);
        self.read.lock().expect("not poisoned").insert(offset, fp);
    }

    /// Whether the chunk at `offset` holds something else now than when the sync read it
    /// (`None`: the sync did not record it).
    pub fn changed(&self, offset: u64, now: &[BlockInfo]) -> Option<bool> {
        let fp = Self::fingerprint(now);
        let read = self.read.lock().expect("not poisoned");
        read.get(&offset).map(|then| *then != fp)
    }
}
