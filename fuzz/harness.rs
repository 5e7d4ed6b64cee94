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

/// The remote command envelope (SPEC 10): the first byte picks the command
/// name (the topic's last level) and whether the harness signs the decoded
/// envelope itself with the trusted key, so that the checks after the
/// signature (the time window, the request ids seen) are reached; the rest
/// is the payload, as it comes off the broker. `dir` holds the trusted key
/// and the record of request ids (emptied for each input).
pub fn remote_envelope(dir: &Path, data: &[u8]) {
    use berth::remote::{
        decode, keys, signed_message, valid_request_id, CommandName, Refusal, SeenRequests,
        Verifier,
    };

    const NAMES: [&str; 8] = [
        "apply", "remove", "restart", "stop", "start", "reboot", "", "APPLY",
    ];
    const DEVICE: &str = "robot-42";
    const KEY_ID: &str = "fuzz-operator";
    let Some((&head, payload)) = data.split_first() else {
        return;
    };
    let name = NAMES[usize::from(head & 7)];
    let sign = head & 8 != 0;

    let trusted = dir.join("trusted");
    let state = dir.join("state");
    if !trusted.join(format!("{KEY_ID}.pem")).exists() {
        std::fs::create_dir_all(&trusted).expect("trusted keys dir");
        std::fs::create_dir_all(&state).expect("state dir");
        keys::keygen(&trusted, KEY_ID).expect("a key pair");
    }
    let key = keys::signing_key(&trusted.join(format!("{KEY_ID}.key"))).expect("the key");
    let _ = std::fs::remove_file(state.join(berth::remote::replay::FILE_NAME));

    // A refusal is one line (it goes into an event and a reply), says
    // something, and is short: berth publishes at most 256 KiB in one
    // message, and a reply too large to publish is dropped, which would
    // leave the command without its one reply.
    let check = |refusal: &Refusal| {
        let text = refusal.to_string();
        assert!(!text.is_empty(), "{refusal:?}");
        assert!(
            text.len() <= 1024,
            "a refusal of {} bytes: {:?}…",
            text.len(),
            text.chars().take(80).collect::<String>()
        );
        assert!(
            !text.chars().any(|c| c == '\n' || c == '\r'),
            "multi-line refusal: {text:?}"
        );
    };
    let (command, mut envelope) = match decode(name, payload) {
        Ok(decoded) => decoded,
        Err(rejected) => {
            assert!(matches!(
                rejected.refusal,
                Refusal::Malformed(_) | Refusal::UnknownCommand(_)
            ));
            if let Some(id) = &rejected.request_id {
                assert!(valid_request_id(id), "reply topic from {id:?}");
            }
            check(&rejected.refusal);
            return;
        }
    };
    assert_eq!(command.as_str(), name);
    if sign {
        envelope.key_id = KEY_ID.to_string();
        envelope.signature = keys::sign(&key, &signed_message(DEVICE, command, &envelope));
    }
    // 2026-12-02T00:00:00Z: the time window is fuzzed through issued_at.
    let now = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_796_169_600);
    let mut verifier = Verifier::new(DEVICE, &trusted, SeenRequests::open(&state));
    match verifier.verify(command, &envelope, now) {
        Ok(()) => {
            assert!(
                sign,
                "accepted without the harness's signature: {envelope:?}"
            );
            assert!(valid_request_id(&envelope.request_id));
            // Carried out once: the same command again is refused, also
            // by a berth that restarted (the record is on disk).
            let again = verifier.verify(command, &envelope, now);
            assert_eq!(again, Err(Refusal::Replayed(envelope.request_id.clone())));
            let mut restarted = Verifier::new(DEVICE, &trusted, SeenRequests::open(&state));
            let again = restarted.verify(command, &envelope, now);
            assert_eq!(again, Err(Refusal::Replayed(envelope.request_id.clone())));
            if !matches!(command, CommandName::Apply | CommandName::Remove) {
                match berth::remote::files::parse_target(&envelope.payload) {
                    Ok((deployment, executable)) => {
                        assert!(berth::config::is_deployment_id(&deployment));
                        assert!(executable.is_none_or(|e| e.split('/').count() == 2));
                    }
                    Err(refusal) => check(&refusal),
                }
            }
        }
        Err(refusal) => {
            if sign && valid_request_id(&envelope.request_id) {
                // Signed by a trusted key: refused only for its time.
                assert!(
                    matches!(
                        refusal,
                        Refusal::BadTime(_)
                            | Refusal::Expired { .. }
                            | Refusal::FromTheFuture { .. }
                    ),
                    "a well-signed command refused: {refusal:?}"
                );
            }
            check(&refusal);
        }
    }
}
