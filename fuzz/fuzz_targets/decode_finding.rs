#![no_main]
//! Fuzz target `decode_finding`: see [`blocksync_fuzz::decode_finding`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_finding"),
    |data: &[u8]| blocksync_fuzz::decode_finding(data)
);
