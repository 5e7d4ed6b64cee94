//! Replays every file of the fuzz corpus (`fuzz/corpus/<target>/`) through
//! the same code as the fuzz targets (`fuzz/harness.rs`), on stable: inputs
//! that once crashed berth, and the seeds, stay fixed without nightly.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

fn replay(target: &str, run: &dyn Fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    for file in files {
        let data = std::fs::read(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&data)));
        assert!(outcome.is_ok(), "{} fails its fuzz target", file.display());
    }
}

#[test]
fn agent_config_corpus_replays() {
    replay("agent_config", &harness::agent_config);
}

#[test]
fn deployment_file_corpus_replays() {
    replay("deployment_file", &harness::deployment_file);
}

#[test]
fn engine_event_corpus_replays() {
    replay("engine_event", &harness::engine_event);
}

#[test]
fn remote_envelope_corpus_replays() {
    let dir = tempfile::tempdir().expect("a scratch dir");
    replay("remote_envelope", &|data| {
        harness::remote_envelope(dir.path(), data)
    });
}
