//! Every refusal of SPEC 10, and signatures made by the `openssl` CLI, so
//! that the format is proven independent of berth's own code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use base64::Engine as _;

use super::*;
use crate::config::RemoteSettings;

const DEVICE: &str = "robot-42";

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A key pair made by openssl: `<dir>/<key_id>.key` and, in `trusted`,
/// `<key_id>.pem`.
fn openssl_key(dir: &Path, trusted: &Path, key_id: &str) -> PathBuf {
    let private = dir.join(format!("{key_id}.key"));
    let public = trusted.join(format!("{key_id}.pem"));
    openssl(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        private.to_str().unwrap(),
    ]);
    openssl(&[
        "pkey",
        "-in",
        private.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    private
}

/// The signature of `message` by `private`, as `openssl pkeyutl` makes it.
fn openssl_sign(dir: &Path, private: &Path, message: &[u8]) -> String {
    let input = dir.join("message.bin");
    std::fs::write(&input, message).unwrap();
    let signature = openssl(&[
        "pkeyutl",
        "-sign",
        "-inkey",
        private.to_str().unwrap(),
        "-rawin",
        "-in",
        input.to_str().unwrap(),
    ]);
    base64::engine::general_purpose::STANDARD.encode(signature)
}

struct Fixture {
    dir: tempfile::TempDir,
    trusted: PathBuf,
    state: PathBuf,
    private: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let trusted = dir.path().join("trusted");
        let state = dir.path().join("state");
        std::fs::create_dir(&trusted).unwrap();
        std::fs::create_dir(&state).unwrap();
        let private = openssl_key(dir.path(), &trusted, "ops");
        Fixture {
            dir,
            trusted,
            state,
            private,
        }
    }

    fn verifier(&self) -> Verifier {
        Verifier::new(DEVICE, &self.trusted, SeenRequests::open(&self.state))
    }

    /// An envelope signed by openssl with the trusted key `ops`.
    fn signed(
        &self,
        command: CommandName,
        id: &str,
        issued: SystemTime,
        payload: &str,
    ) -> Envelope {
        let mut envelope = Envelope {
            request_id: id.into(),
            issued_at: crate::report::timestamp(issued),
            payload: payload.into(),
            key_id: "ops".into(),
            signature: String::new(),
            timeout_secs: None,
        };
        let message = signed_message(DEVICE, command, &envelope);
        envelope.signature = openssl_sign(self.dir.path(), &self.private, &message);
        envelope
    }
}

#[test]
fn a_command_signed_by_openssl_is_accepted() {
    let f = Fixture::new();
    let now = SystemTime::now();
    let envelope = f.signed(CommandName::Restart, "r-1", now, "talker");
    f.verifier()
        .verify(CommandName::Restart, &envelope, now)
        .unwrap();
    // The exact bytes signed (SPEC 10).
    assert_eq!(
        signed_message(DEVICE, CommandName::Restart, &envelope),
        format!("robot-42\nrestart\nr-1\n{}\ntalker", envelope.issued_at).into_bytes()
    );
}

#[test]
fn keys_and_signatures_made_by_berth_are_what_openssl_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = keys::keygen(dir.path(), "ops").unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the private key is the owner's alone");
    assert!(
        keys::keygen(dir.path(), "ops").is_err(),
        "never overwritten"
    );
    // openssl derives the same public key from berth's private key ...
    let derived = openssl(&["pkey", "-in", private.to_str().unwrap(), "-pubout"]);
    assert_eq!(derived, std::fs::read(&public).unwrap());
    // ... and verifies berth's signature with berth's public key.
    let key = keys::signing_key(&private).unwrap();
    let message = b"robot-42\nstop\nr-2\n2026-11-28T16:00:00.000Z\ntalker";
    let signature = base64::engine::general_purpose::STANDARD
        .decode(keys::sign(&key, message))
        .unwrap();
    let msg = dir.path().join("m");
    let sig = dir.path().join("s");
    std::fs::write(&msg, message).unwrap();
    std::fs::write(&sig, signature).unwrap();
    let out = openssl(&[
        "pkeyutl",
        "-verify",
        "-pubin",
        "-inkey",
        public.to_str().unwrap(),
        "-rawin",
        "-in",
        msg.to_str().unwrap(),
        "-sigfile",
        sig.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out).contains("Verified Successfully"));
    // And berth signs with a private key openssl made.
    let f = Fixture::new();
    keys::signing_key(&f.private).unwrap();
}

#[test]
fn every_refusal_says_why() {
    let f = Fixture::new();
    let other = tempfile::tempdir().unwrap();
    // A key that is not trusted, under the trusted key's name.
    let stranger = openssl_key(other.path(), other.path(), "ops");
    let now = SystemTime::now();
    let good = f.signed(CommandName::Stop, "base", now, "talker");

    let unsigned = Envelope {
        signature: String::new(),
        ..good.clone()
    };
    let no_key = Envelope {
        key_id: String::new(),
        ..good.clone()
    };
    let unknown_key = Envelope {
        key_id: "nobody".into(),
        ..good.clone()
    };
    let climbing = Envelope {
        key_id: "../ops".into(),
        ..good.clone()
    };
    let slash = Envelope {
        key_id: "keys/ops".into(),
        ..good.clone()
    };
    let tampered = Envelope {
        payload: "listener".into(),
        ..good.clone()
    };
    let mut wrong_key = good.clone();
    wrong_key.signature = openssl_sign(
        other.path(),
        &stranger,
        &signed_message(DEVICE, CommandName::Stop, &good),
    );
    let not_base64 = Envelope {
        signature: "%%%".into(),
        ..good.clone()
    };
    let short = Envelope {
        signature: base64::engine::general_purpose::STANDARD.encode([1u8; 10]),
        ..good.clone()
    };
    let expired = f.signed(
        CommandName::Stop,
        "old",
        now - Duration::from_secs(301),
        "talker",
    );
    let future = f.signed(
        CommandName::Stop,
        "new",
        now + Duration::from_secs(60),
        "talker",
    );
    let bad_id = Envelope {
        request_id: "a/b".into(),
        ..good.clone()
    };
    let local_time = {
        let mut e = good.clone();
        e.issued_at = e.issued_at.replace('Z', "+02:00");
        e.request_id = "tz".into();
        let message = signed_message(DEVICE, CommandName::Stop, &e);
        e.signature = openssl_sign(f.dir.path(), &f.private, &message);
        e
    };

    let mut verifier = f.verifier();
    type Case<'a> = (&'a str, CommandName, &'a Envelope, fn(&Refusal) -> bool);
    let cases: Vec<Case> = vec![
        ("unsigned", CommandName::Stop, &unsigned, |r| {
            *r == Refusal::Unsigned
        }),
        ("no key id", CommandName::Stop, &no_key, |r| {
            *r == Refusal::Unsigned
        }),
        ("unknown key", CommandName::Stop, &unknown_key, |r| {
            matches!(r, Refusal::UnknownKey { .. })
        }),
        ("key id with ..", CommandName::Stop, &climbing, |r| {
            matches!(r, Refusal::BadKeyId(_))
        }),
        ("key id with /", CommandName::Stop, &slash, |r| {
            matches!(r, Refusal::BadKeyId(_))
        }),
        ("tampered payload", CommandName::Stop, &tampered, |r| {
            matches!(r, Refusal::BadSignature(_))
        }),
        ("another command name", CommandName::Start, &good, |r| {
            matches!(r, Refusal::BadSignature(_))
        }),
        ("wrong key", CommandName::Stop, &wrong_key, |r| {
            matches!(r, Refusal::BadSignature(_))
        }),
        ("not base64", CommandName::Stop, &not_base64, |r| {
            matches!(r, Refusal::BadSignature(_))
        }),
        ("not 64 bytes", CommandName::Stop, &short, |r| {
            matches!(r, Refusal::BadSignature(_))
        }),
        ("expired", CommandName::Stop, &expired, |r| {
            matches!(r, Refusal::Expired { age_secs: 301 })
        }),
        ("from the future", CommandName::Stop, &future, |r| {
            matches!(
                r,
                Refusal::FromTheFuture {
                    ahead_secs: 59..=60
                }
            )
        }),
        ("request id with /", CommandName::Stop, &bad_id, |r| {
            *r == Refusal::BadRequestId
        }),
        ("not utc", CommandName::Stop, &local_time, |r| {
            matches!(r, Refusal::BadTime(_))
        }),
    ];
    let mut failures = Vec::new();
    for (name, command, envelope, expected) in cases {
        match verifier.verify(command, envelope, now) {
            Err(refusal) if expected(&refusal) => {
                assert!(!refusal.to_string().is_empty());
            }
            other => failures.push(format!("{name}: {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        verifier.seen.is_empty(),
        "nothing refused is recorded as seen"
    );
    // The good one still passes: the refusals recorded nothing.
    verifier.verify(CommandName::Stop, &good, now).unwrap();
}

#[test]
fn the_clock_may_be_a_few_seconds_ahead() {
    let f = Fixture::new();
    let now = SystemTime::now();
    let ahead = f.signed(
        CommandName::Stop,
        "ahead",
        now + Duration::from_secs(4),
        "talker",
    );
    f.verifier().verify(CommandName::Stop, &ahead, now).unwrap();
    let too_far = f.signed(
        CommandName::Stop,
        "far",
        now + Duration::from_secs(6),
        "talker",
    );
    assert!(matches!(
        f.verifier().verify(CommandName::Stop, &too_far, now),
        Err(Refusal::FromTheFuture { .. })
    ));
}

#[test]
fn a_request_id_is_refused_the_second_time_also_after_a_restart() {
    let f = Fixture::new();
    let now = SystemTime::now();
    let envelope = f.signed(CommandName::Restart, "once", now, "talker");
    let mut verifier = f.verifier();
    verifier
        .verify(CommandName::Restart, &envelope, now)
        .unwrap();
    assert_eq!(
        verifier.verify(CommandName::Restart, &envelope, now),
        Err(Refusal::Replayed("once".into()))
    );
    // A new berth reads the record from state_dir.
    let mut restarted = f.verifier();
    assert_eq!(
        restarted.verify(
            CommandName::Restart,
            &envelope,
            now + Duration::from_secs(10)
        ),
        Err(Refusal::Replayed("once".into()))
    );
    assert!(f.state.join(replay::FILE_NAME).is_file());
}

#[test]
fn the_record_of_request_ids_forgets_expired_ids_and_is_bounded() {
    let state = tempfile::tempdir().unwrap();
    let mut seen = SeenRequests::open(state.path()).with_limit(50);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    seen.record("a", t0, t0).unwrap();
    // Past MAX_AGE, the margin and the tolerance, "a" is pruned.
    let later = t0 + Duration::from_secs(300 + 60 + 5 + 1);
    seen.record("b", later, later).unwrap();
    assert_eq!(seen.len(), 1);
    for i in 0..49 {
        seen.record(&format!("x{i}"), later, later).unwrap();
    }
    assert!(matches!(
        seen.record("one-too-many", later, later),
        Err(Refusal::TooMany(_))
    ));
    let reopened = SeenRequests::open(state.path());
    assert_eq!(reopened.len(), 50);
}

fn remote(paths: &[&str], allow_devices: bool) -> RemoteSettings {
    RemoteSettings {
        enabled: true,
        trusted_keys_dir: "/unused".into(),
        allowed_host_paths: paths.iter().map(PathBuf::from).collect(),
        allow_devices,
    }
}

fn deployment(id: &str, extra_exe: &str, top: &str) -> String {
    format!(
        r#"id = "{id}"
package = "p"
package_version = "1"
{top}

[[components]]
name = "main"

[[components.executables]]
name = "app"
image = "busybox"
{extra_exe}
"#
    )
}

#[test]
fn remote_deployments_stay_within_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let limits = remote(&["/data", "/srv/maps/"], false);
    let ok = [
        r#"volumes = [{ host = "/data", container = "/d" }]"#,
        r#"volumes = [{ host = "/data/maps/x", container = "/d" }]"#,
        r#"volumes = [{ host = "/srv/maps", container = "/d" }]"#,
        r#"volumes = [{ host = "/data/./a//b", container = "/d" }]"#,
        "",
    ];
    for (i, exe) in ok.iter().enumerate() {
        let id = format!("ok{i}");
        files::apply(dir.path(), &limits, &deployment(&id, exe, ""))
            .unwrap_or_else(|e| panic!("{exe}: {e}"));
    }
    let refused = [
        (
            r#"volumes = [{ host = "/etc", container = "/d" }]"#,
            "host path /etc is outside allowed_host_paths (/data, /srv/maps/)",
        ),
        (
            r#"volumes = [{ host = "/database", container = "/d" }]"#,
            "/database is outside",
        ),
        (
            r#"volumes = [{ host = "/data/../etc", container = "/d" }]"#,
            "/data/../etc is outside",
        ),
        (
            r#"devices = ["/dev/ttyUSB0"]"#,
            "main/app: maps devices (/dev/ttyUSB0) but allow_devices is false",
        ),
    ];
    for (i, (exe, want)) in refused.iter().enumerate() {
        let id = format!("no{i}");
        match files::apply(dir.path(), &limits, &deployment(&id, exe, "")) {
            Err(Refusal::Limits(message)) => assert!(message.contains(want), "{message}"),
            other => panic!("{exe}: {other:?}"),
        }
        assert!(
            !dir.path().join(format!("{id}.toml")).exists(),
            "nothing written"
        );
    }
    files::apply(
        dir.path(),
        &remote(&[], true),
        &deployment("dev", r#"devices = ["/dev/ttyUSB0"]"#, ""),
    )
    .unwrap();
}

#[test]
fn apply_validates_as_check_config_and_never_replaces_a_good_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let limits = remote(&[], false);
    let good = deployment("talker", "", "");
    assert_eq!(files::apply(dir.path(), &limits, &good).unwrap(), "talker");
    let path = dir.path().join("talker.toml");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644);

    let broken = good.replace("package_version", "restrat = 1\npackage_version");
    match files::apply(dir.path(), &limits, &broken) {
        Err(Refusal::Invalid(errors)) => {
            assert!(
                errors.contains("talker.toml:3:1: unknown field `restrat`"),
                "{errors}"
            );
        }
        other => panic!("{other:?}"),
    }
    match files::apply(dir.path(), &limits, "not toml [") {
        Err(Refusal::Invalid(errors)) => {
            assert!(errors.contains("remote-apply.toml:1:"), "{errors}")
        }
        other => panic!("{other:?}"),
    }
    let unknown_dep = deployment("talker", "", r#"depends_on = ["nope"]"#);
    match files::apply(dir.path(), &limits, &unknown_dep) {
        Err(Refusal::Invalid(errors)) => {
            assert!(
                errors.contains(r#"depends on unknown deployment "nope""#),
                "{errors}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Another file already has the id.
    std::fs::write(
        dir.path().join("other.toml"),
        deployment("listener", "", ""),
    )
    .unwrap();
    match files::apply(dir.path(), &limits, &deployment("listener", "", "")) {
        Err(Refusal::Invalid(errors)) => {
            assert!(errors.contains("duplicate deployment id"), "{errors}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        good,
        "the good file stays"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    // Replacing itself is not a duplicate; a cycle through it is refused.
    files::apply(
        dir.path(),
        &limits,
        &deployment("talker", "", r#"depends_on = ["listener"]"#),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("other.toml"),
        deployment("listener", "", r#"depends_on = ["talker"]"#),
    )
    .unwrap();
    match files::apply(
        dir.path(),
        &limits,
        &deployment("talker", "", r#"depends_on = ["listener"]"#),
    ) {
        Err(Refusal::Invalid(errors)) => assert!(errors.contains("dependency cycle"), "{errors}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn remove_deletes_only_a_deployment_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("talker.toml"), "x").unwrap();
    std::fs::write(dir.path().join("secret"), "x").unwrap();
    for bad in ["../secret", "secret/..", "Talker", "", "a b"] {
        assert!(
            matches!(files::remove(dir.path(), bad), Err(Refusal::BadTarget(_))),
            "{bad:?}"
        );
    }
    assert_eq!(
        files::remove(dir.path(), "listener"),
        Err(Refusal::NoFile {
            deployment: "listener".into()
        })
    );
    files::remove(dir.path(), "talker").unwrap();
    assert!(!dir.path().join("talker.toml").exists());
    assert!(dir.path().join("secret").exists());
}

#[test]
fn targets_name_a_deployment_or_one_executable() {
    assert_eq!(files::parse_target("talker"), Ok(("talker".into(), None)));
    assert_eq!(
        files::parse_target("talker/main/app_1"),
        Ok(("talker".into(), Some("main/app_1".into())))
    );
    for bad in ["", "talker/main", "../x", "talker/main/app/x", "Talker"] {
        assert!(files::parse_target(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn envelopes_read_what_any_fleet_tool_writes() {
    let text = r#"{"request_id":"r1","issued_at":"2026-11-28T16:00:00Z","payload":"talker","key_id":"ops","signature":"AAAA","timeout_secs":30}"#;
    let envelope: Envelope = serde_json::from_str(text).unwrap();
    assert_eq!(envelope.timeout_secs, Some(30));
    let unsigned: Envelope =
        serde_json::from_str(r#"{"request_id":"r1","issued_at":"x","payload":"p"}"#).unwrap();
    assert!(unsigned.signature.is_empty() && unsigned.key_id.is_empty());
    assert!(parse_utc("2026-11-28T16:00:00.123+00:00").is_ok());
    assert_eq!(CommandName::parse("apply"), Some(CommandName::Apply));
    assert_eq!(CommandName::parse("reboot"), None);
}

#[test]
fn a_payload_is_decoded_or_rejected_with_the_id_to_reply_to() {
    let good = br#"{"request_id":"r-1","issued_at":"2026-11-28T16:00:00Z","payload":"app","key_id":"ops","signature":"c2ln"}"#;
    let (command, envelope) = decode("restart", good).expect("an envelope");
    assert_eq!(command, CommandName::Restart);
    assert_eq!(
        (envelope.request_id.as_str(), envelope.key_id.as_str()),
        ("r-1", "ops")
    );

    let unknown = decode("reboot", good).expect_err("no such command");
    assert_eq!(
        unknown,
        Rejected {
            request_id: Some("r-1".into()),
            key_id: "ops".into(),
            refusal: Refusal::UnknownCommand("reboot".into()),
        }
    );

    // Malformed: the request id is still read, when it is a valid one.
    let wrong_type = br#"{"request_id":"r-2","issued_at":"2026-11-28T16:00:00Z","payload":5}"#;
    let rejected = decode("stop", wrong_type).expect_err("payload is not a string");
    assert_eq!(rejected.request_id.as_deref(), Some("r-2"));
    assert!(
        matches!(rejected.refusal, Refusal::Malformed(_)),
        "{rejected:?}"
    );
    let bad_id = br#"{"request_id":"a/b","payload":5}"#;
    assert_eq!(
        decode("stop", bad_id).expect_err("malformed").request_id,
        None
    );
    for not_an_object in [&b"[\"request_id\"]"[..], b"\"r-3\"", b"", b"{"] {
        let rejected = decode("stop", not_an_object).expect_err("malformed");
        assert_eq!(rejected.request_id, None);
        assert_eq!(rejected.key_id, "");
    }
}

/// Found by fuzzing (`fuzz/corpus/remote_envelope/crash-escaped-key-id.json`):
/// a refusal quoted the input whole, escaped (one byte 0x7f became the six
/// characters `\u{7f}`), so a command of 250 KB made a reply larger than
/// berth publishes (256 KiB), which was dropped: the command got no reply.
/// Every quoted value is now cut, and every refusal is short.
#[test]
fn a_refusal_quotes_only_the_start_of_a_value() {
    let f = Fixture::new();
    let huge = "\u{7f}".repeat(200_000);
    let short = |refusal: &Refusal, starts: &str| {
        let text = refusal.to_string();
        assert!(text.len() <= 1024, "{} bytes: {}", text.len(), &text[..80]);
        assert!(text.starts_with(starts), "{text}");
        assert!(text.contains('…'), "a cut is marked: {text}");
    };
    let good = f.signed(CommandName::Stop, "r-1", SystemTime::now(), "talker");

    let key_id = Envelope {
        key_id: format!("ops{huge}"),
        ..good.clone()
    };
    let refused = f
        .verifier()
        .verify(CommandName::Stop, &key_id, SystemTime::now());
    short(&refused.unwrap_err(), r#"invalid key_id "ops\u{7f}"#);

    let late = f.signed(CommandName::Stop, "r-2", SystemTime::now(), "talker");
    let mut time = late.clone();
    time.issued_at = format!("{}{huge}Z", late.issued_at);
    time.signature = openssl_sign(
        f.dir.path(),
        &f.private,
        &signed_message(DEVICE, CommandName::Stop, &time),
    );
    let refused = f
        .verifier()
        .verify(CommandName::Stop, &time, SystemTime::now());
    short(&refused.unwrap_err(), "invalid issued_at \"20");

    short(
        &files::parse_target(&format!("app/{huge}")).unwrap_err(),
        r#"invalid target "app/\u{7f}"#,
    );
    short(
        &files::remove(f.dir.path(), &huge).unwrap_err(),
        r#"invalid target "\u{7f}"#,
    );
    let payload = serde_json::to_vec(&serde_json::json!({
        "request_id": "r-3", "issued_at": "x", "payload": "p", "timeout_secs": huge,
    }))
    .unwrap();
    let rejected = decode("stop", &payload).unwrap_err();
    assert_eq!(rejected.request_id.as_deref(), Some("r-3"));
    short(
        &rejected.refusal,
        "not a command envelope: invalid type: string",
    );
    short(
        &decode(&huge, &serde_json::to_vec(&good).unwrap())
            .unwrap_err()
            .refusal,
        r#"unknown command "\u{7f}"#,
    );

    // Cut by characters, never inside one.
    assert_eq!(clip("äöü", 2), "äö…");
    assert_eq!(clip("äöü", 3), "äöü");
    assert_eq!(quote(&"x".repeat(QUOTE_MAX)), "x".repeat(QUOTE_MAX));
}
