#![no_main]
//! Fuzz target `decode_write`: see [`blocksync_fuzz::decode_write`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_write"),
    |data: &[u8]| blocksync_fuzz::decode_write(data)
);
