#![no_main]
//! Fuzz target: see fuzz/harness.rs, `engine_event`.

#[allow(dead_code)]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::engine_event(data));
