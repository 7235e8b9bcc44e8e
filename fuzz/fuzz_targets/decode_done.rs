#![no_main]
//! Fuzz target `decode_done`: see [`blocksync_fuzz::decode_done`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_done"),
    |data: &[u8]| blocksync_fuzz::decode_done(data)
);
