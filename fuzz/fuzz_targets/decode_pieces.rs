#![no_main]
//! Fuzz target `decode_pieces`: see [`blocksync_fuzz::decode_pieces`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("decode_pieces"),
    |data: &[u8]| blocksync_fuzz::decode_pieces(data)
);
