#![no_main]
//! Fuzz target: see fuzz/harness.rs, `agent_config`.

#[allow(dead_code)]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::agent_config(data));
