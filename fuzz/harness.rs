//! What each fuzz target does with one input, shared by the targets in
//! `fuzz_targets/` (nightly, cargo-fuzz) and by `tests/fuzz_corpus.rs`,
//! which replays every corpus file on stable. Each function panics on a
//! broken invariant; everything else an input can cause is an `Err`.

use std::path::Path;

use berth::config::{self, ConfigError};
use berth::model::{container_labels, container_name, spec_hash, ExecKey};

/// Every error names the file it was given, and a place inside the text.
fn check_errors(path: &Path, text: &str, errors: &[ConfigError]) {
    assert!(!errors.is_empty(), "an Err with no error");
    let lines = text.split('\n').count();
    for e in errors {
        assert_eq!(e.file, path);
        assert!(!e.message.is_empty());
        assert!(!e.message.contains('\n'), "multi-line message: {e}");
        if let Some((line, col)) = e.at {
            assert!(line >= 1 && col >= 1, "{e}");
            assert!(line <= lines, "{e}: line past the end ({lines} lines)");
        }
        let _ = e.to_string();
    }
}

/// The agent config parser: `berth.toml` text.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/berth/berth.toml");
    match config::parse_agent(path, text) {
        Ok(agent) => {
            assert!(!agent.device_id.is_empty() && agent.device_id.len() <= 64);
            assert!(agent
                .device_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert!(agent.restart.backoff_initial <= agent.restart.backoff_max);
        }
        Err(errors) => check_errors(path, text, &errors),
    }
}

/// The deployment file parser: a deployment's TOML text.
pub fn deployment_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/berth/deployments.d/fuzz.toml");
    match config::parse_deployment(path, text) {
        Ok(spec) => {
            // What an accepted file becomes: names, labels and hashes.
            assert!(!spec.components.is_empty());
            let mut deployments = std::collections::BTreeMap::new();
            for (component, exe) in spec.executables() {
                let key = ExecKey::new(&spec.id, &component.name, &exe.name);
                let name = container_name("robot-42", &key);
                assert!(name.len() <= 255, "container name too long: {name}");
                assert!(!name.contains('/'));
                let hash = spec_hash(exe, &exe.env);
                assert_eq!(hash.len(), 16);
                let labels = container_labels("robot-42", &key, &hash);
                assert_eq!(berth::model::key_from_labels(&labels), Some(key));
            }
            deployments.insert(spec.id.clone(), spec);
            let _ = config::dependency_problems(&deployments);
        }
        Err(errors) => check_errors(path, text, &errors),
    }
}

/// The engine's event stream: one JSON message of `/events`.
pub fn engine_event(data: &[u8]) {
    if let Ok(event) = berth::runtime::docker::decode_event(data) {
        let _ = format!("{event:?}");
    }
}
