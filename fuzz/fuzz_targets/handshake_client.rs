#![no_main]
//! Fuzz target `handshake_client`: see [`blocksync_fuzz::handshake_client`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("handshake_client"),
    |data: &[u8]| blocksync_fuzz::handshake_client(data)
);
