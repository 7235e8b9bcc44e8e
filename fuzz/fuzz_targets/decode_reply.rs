#![no_main]
//! Fuzz target `decode_reply`: see [`blocksync_fuzz::decode_reply`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_reply"),
    |data: &[u8]| blocksync_fuzz::decode_reply(data)
);
