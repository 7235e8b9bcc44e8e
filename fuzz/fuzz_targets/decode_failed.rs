#![no_main]
//! Fuzz target `decode_failed`: see [`blocksync_fuzz::decode_failed`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_failed"),
    |data: &[u8]| blocksync_fuzz::decode_failed(data)
);
