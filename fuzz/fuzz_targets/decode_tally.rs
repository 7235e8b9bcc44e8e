#![no_main]
//! Fuzz target `decode_tally`: see [`blocksync_fuzz::decode_tally`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_tally"),
    |data: &[u8]| blocksync_fuzz::decode_tally(data)
);
