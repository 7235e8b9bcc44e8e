#![no_main]
//! Fuzz target `handshake_server`: see [`blocksync_fuzz::handshake_server`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("handshake_server"),
    |data: &[u8]| blocksync_fuzz::handshake_server(data)
);
