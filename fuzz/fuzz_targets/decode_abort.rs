#![no_main]
//! Fuzz target `decode_abort`: see [`blocksync_fuzz::decode_abort`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_abort"),
    |data: &[u8]| blocksync_fuzz::decode_abort(data)
);
