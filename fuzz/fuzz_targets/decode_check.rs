#![no_main]
//! Fuzz target `decode_check`: see [`blocksync_fuzz::decode_check`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_check"),
    |data: &[u8]| blocksync_fuzz::decode_check(data)
);
