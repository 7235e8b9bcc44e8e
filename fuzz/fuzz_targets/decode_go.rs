#![no_main]
//! Fuzz target `decode_go`: see [`blocksync_fuzz::decode_go`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_go"),
    |data: &[u8]| blocksync_fuzz::decode_go(data)
);
