#![no_main]
//! Fuzz target `frame_stream`: see [`blocksync_fuzz::frame_stream`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("frame_stream"),
    |data: &[u8]| blocksync_fuzz::frame_stream(data)
);
