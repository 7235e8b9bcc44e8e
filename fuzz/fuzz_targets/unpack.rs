#![no_main]
//! Fuzz target `unpack`: see [`blocksync_fuzz::unpack`].

libfuzzer_sys::fuzz_target!(
    init: blocksync_fuzz::init("unpack"),
    |data: &[u8]| blocksync_fuzz::unpack(data)
);
