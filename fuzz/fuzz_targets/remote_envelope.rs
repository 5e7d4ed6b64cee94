#![no_main]
//! Fuzz target: see fuzz/harness.rs, `remote_envelope`.

#[allow(dead_code)]
#[path = "../harness.rs"]
mod harness;

use std::path::PathBuf;
use std::sync::OnceLock;

/// The trusted key and the record of request ids: in memory (`/dev/shm`)
/// where there is one, as the record is fsynced on every accepted command.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        base.join(format!("berth-fuzz-remote-{}", std::process::id()))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::remote_envelope(dir(), data));
