//! The list of fuzz targets, each with its check and its seeds.

use super::{checks::*, examples::*, handshake::*, seeds::*};
use blocksync::testing::Frame;

/// A fuzz target: a check run on each input, and the valid inputs to start from.
pub struct Target {
    /// The name of its binary in `fuzz/fuzz_targets/`.
    pub name: &'static str,
    /// Panics when the input breaks a property.
    pub check: fn(&[u8]),
    /// Valid inputs.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

fn payloads(ty: Ty) -> Vec<Vec<u8>> {
    examples(ty).iter().map(|f| f.encode().1).collect()
}

fn stream_seeds() -> Vec<Vec<u8>> {
    let all: Vec<Frame> = ALL_TYPES.iter().flat_map(|t| examples(*t)).collect();
    let mut seeds: Vec<Vec<u8>> = all.iter().map(wire).collect();
    seeds.push(conversation(&all));
    seeds
}

fn unpack_seeds() -> Vec<Vec<u8>> {
    payloads(Ty::Write)
        .into_iter()
        .filter(|p| p[8] == 1)
        .map(|p| p[9..].to_vec())
        .collect()
}

macro_rules! decoder {
    ($name:ident, $ty:ident) => {
        /// Target: the decoder of one frame type, on a payload.
        pub fn $name(data: &[u8]) {
            decode_as(Ty::$ty, data)
        }
    };
}

decoder!(decode_hello, Hello);
decoder!(decode_reply, Reply);
decoder!(decode_go, Go);
decoder!(decode_digests, Digests);
decoder!(decode_verify, Verify);
decoder!(decode_finding, Finding);
decoder!(decode_pieces, Pieces);
decoder!(decode_refine, Refine);
decoder!(decode_check, Check);
decoder!(decode_write, Write);
decoder!(decode_zero, Zero);
decoder!(decode_finish, Finish);
decoder!(decode_abort, Abort);
decoder!(decode_tally, Tally);
decoder!(decode_done, Done);
decoder!(decode_failed, Failed);

macro_rules! decoder_target {
    ($name:ident, $ty:ident) => {
        Target {
            name: stringify!($name),
            check: $name,
            seeds: || payloads(Ty::$ty),
        }
    };
}

/// Every target, in the order `fuzz/run.sh` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame_stream",
        check: frame_stream,
        seeds: stream_seeds,
    },
    decoder_target!(decode_hello, Hello),
    decoder_target!(decode_reply, Reply),
    decoder_target!(decode_go, Go),
    decoder_target!(decode_digests, Digests),
    decoder_target!(decode_verify, Verify),
    decoder_target!(decode_finding, Finding),
    decoder_target!(decode_pieces, Pieces),
    decoder_target!(decode_refine, Refine),
    decoder_target!(decode_check, Check),
    decoder_target!(decode_write, Write),
    decoder_target!(decode_zero, Zero),
    decoder_target!(decode_finish, Finish),
    decoder_target!(decode_abort, Abort),
    decoder_target!(decode_tally, Tally),
    decoder_target!(decode_done, Done),
    decoder_target!(decode_failed, Failed),
    Target {
        name: "unpack",
        check: unpack,
        seeds: unpack_seeds,
    },
    Target {
        name: "handshake_server",
        check: handshake_server,
        seeds: server_seeds,
    },
    Target {
        name: "handshake_client",
        check: handshake_client,
        seeds: client_seeds,
    },
];
