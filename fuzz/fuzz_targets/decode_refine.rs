#![no_main]
//! Fuzz target `decode_refine`: see [`blocksync_fuzz::decode_refine`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_refine"),
    |data: &[u8]| blocksync_fuzz::decode_refine(data)
);
