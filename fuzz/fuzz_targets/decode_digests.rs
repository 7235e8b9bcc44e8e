#![no_main]
//! Fuzz target `decode_digests`: see [`blocksync_fuzz::decode_digests`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_digests"),
    |data: &[u8]| blocksync_fuzz::decode_digests(data)
);
