#![no_main]
//! Fuzz target `decode_zero`: see [`blocksync_fuzz::decode_zero`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_zero"),
    |data: &[u8]| blocksync_fuzz::decode_zero(data)
);
