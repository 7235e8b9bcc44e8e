#![no_main]
//! Fuzz target `decode_hello`: see [`blocksync_fuzz::decode_hello`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_hello"),
    |data: &[u8]| blocksync_fuzz::decode_hello(data)
);
