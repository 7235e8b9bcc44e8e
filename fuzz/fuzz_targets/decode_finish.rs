#![no_main]
//! Fuzz target `decode_finish`: see [`blocksync_fuzz::decode_finish`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_finish"),
    |data: &[u8]| blocksync_fuzz::decode_finish(data)
);
