#![no_main]
//! Fuzz target: see fuzz/harness.rs, `deployment_file`.

#[allow(dead_code)]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::deployment_file(data));
