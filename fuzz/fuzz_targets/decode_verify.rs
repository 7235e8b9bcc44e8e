#![no_main]
//! Fuzz target `decode_verify`: see [`blocksync_fuzz::decode_verify`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_verify"),
    |data: &[u8]| blocksync_fuzz::decode_verify(data)
);
