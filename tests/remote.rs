//! Remote commands and operator actions against the real engine and real
//! Mosquitto brokers (SPEC 10): signed `apply`, `remove`, `restart`; every
//! refusal leaving disk and engine as they were; local `berth stop`,
//! `start`, `restart`; the stop that a reboot clears. Commands are signed by
//! the `openssl` CLI and published with `mosquitto_pub` where that proves the
//! format independent of berth's code, and by `berth fleet` elsewhere.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use common::*;

/// `[remote]` appended to berth's config.
fn enable_remote(berth: &Berth, trusted: &Path, allowed: &[&str]) {
    let text = fs::read_to_string(berth.config_path()).unwrap();
    let allowed: Vec<String> = allowed.iter().map(|p| format!("{p:?}")).collect();
    berth.write_raw_config(&format!(
        "{text}\n[remote]\nenabled = true\ntrusted_keys_dir = {:?}\nallowed_host_paths = [{}]\n",
        trusted.to_str().unwrap(),
        allowed.join(", ")
    ));
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs: run scripts/setup.sh");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An ed25519 pair made by openssl: `<dir>/<name>.key`, and the public key
/// as `<public_dir>/<name>.pem`.
fn openssl_key(dir: &Path, public_dir: &Path, name: &str) -> PathBuf {
    let private = dir.join(format!("{name}.key"));
    openssl(&[
        "genpkey",
        "-algorithm",
        "ed25519",
        "-out",
        private.to_str().unwrap(),
    ]);
    let public = public_dir.join(format!("{name}.pem"));
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

/// A command envelope signed by `openssl pkeyutl -sign -rawin`.
fn envelope(
    device: &str,
    command: &str,
    request_id: &str,
    issued: SystemTime,
    payload: &str,
    key: &Path,
) -> Value {
    let issued_at = humantime::format_rfc3339_millis(issued).to_string();
    let message = format!("{device}\n{command}\n{request_id}\n{issued_at}\n{payload}");
    let file = key.with_extension(format!("msg-{request_id}"));
    fs::write(&file, message).unwrap();
    let signature = openssl(&[
        "pkeyutl",
        "-sign",
        "-inkey",
        key.to_str().unwrap(),
        "-rawin",
        "-in",
        file.to_str().unwrap(),
    ]);
    json!({
        "request_id": request_id,
        "issued_at": issued_at,
        "payload": payload,
        "key_id": "ops",
        "signature": base64_std(&signature),
        "timeout_secs": 60,
    })
}

/// Publishes a command with mosquitto_pub and returns berth's reply.
fn send(h: &Harness, command: &str, envelope: &Value) -> Value {
    let id = envelope["request_id"].as_str().unwrap();
    // Only the reply to this sending counts (a replayed id had one before).
    h.sub.clear();
    mqtt_publish(
        h.broker.port(),
        &h.berth.topic(&format!("commands/{command}")),
        &envelope.to_string(),
        false,
    );
    h.sub
        .wait_for(&h.berth.topic(&format!("replies/{id}")), |_| true, WAIT)
}

fn refused(reply: &Value, why: &str) {
    assert_eq!(reply["ok"], false, "{reply:#}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains(why), "wanted {why:?} in {reply:#}");
}

/// What a refusal must leave untouched: the file and the running container.
struct Unchanged {
    file: PathBuf,
    text: String,
    container: String,
}

impl Unchanged {
    fn check(&self, h: &Harness, what: &str) {
        assert_eq!(
            fs::read_to_string(&self.file).unwrap(),
            self.text,
            "{what}: the file changed"
        );
        let ids = container_ids(h.berth.device_id());
        assert_eq!(
            ids,
            vec![self.container.clone()],
            "{what}: the containers changed"
        );
        assert_eq!(
            container_state(&self.container)["Running"],
            true,
            "{what}: the container stopped"
        );
    }
}

fn wait_online(h: &Harness) {
    h.sub.wait_for(
        &h.berth.topic("agent"),
        |d| d["state"] == "online" && d["docker"] == "connected",
        WAIT,
    );
}

#[test]
fn signed_commands_apply_update_restart_remove_and_every_refusal_changes_nothing() {
    let mut h = Harness::new("remote", |c| c);
    let keys = h.berth.dir().join("keys");
    let trusted = h.berth.dir().join("trusted");
    fs::create_dir_all(&keys).unwrap();
    fs::create_dir_all(&trusted).unwrap();
    let key = openssl_key(&keys, &trusted, "ops");
    let stranger_dir = h.berth.dir().join("stranger");
    fs::create_dir_all(&stranger_dir).unwrap();
    let stranger = openssl_key(&stranger_dir, &stranger_dir, "ops");
    enable_remote(&h.berth, &trusted, &["/tmp/berth-remote-allowed"]);
    h.berth.start();
    wait_online(&h);

    let device = h.berth.device_id().to_string();
    let id = unique_id("app");
    let v1 = pull_never(&deployment_toml(&id, "", TEST_IMAGE, LONG_RUNNING));

    // A signed apply of a new deployment: the file appears, it runs, the
    // reply carries Succeeded.
    let apply = envelope(&device, "apply", "apply-1", SystemTime::now(), &v1, &key);
    let reply = send(&h, "apply", &apply);
    assert_eq!(reply["ok"], true, "{reply:#}");
    assert_eq!(reply["request_id"], "apply-1");
    assert_eq!(reply["deployment"]["phase"], "Succeeded", "{reply:#}");
    assert_eq!(reply["deployment"]["status"], "Running", "{reply:#}");
    let file = h.berth.deployment_path(&id);
    assert_eq!(fs::read_to_string(&file).unwrap(), v1);
    let container = h.container_id(&id);
    let unchanged = Unchanged {
        file: file.clone(),
        text: v1.clone(),
        container: container.clone(),
    };
    unchanged.check(&h, "after apply");

    // Refusals: each is a reply and an error event, and nothing changes.
    let v2 = v1.replace("1.2.3", "2.0.0");
    let now = SystemTime::now();
    let mut unsigned = envelope(&device, "apply", "unsigned", now, &v2, &key);
    unsigned["signature"] = "".into();
    unsigned["key_id"] = "".into();
    let wrong_key = envelope(&device, "apply", "wrong-key", now, &v2, &stranger);
    let mut tampered = envelope(&device, "apply", "tampered", now, &v1, &key);
    tampered["payload"] = v2.clone().into();
    let expired = envelope(
        &device,
        "apply",
        "expired",
        now - Duration::from_secs(600),
        &v2,
        &key,
    );
    let outside = v2.replace(
        "command = ",
        "volumes = [{ host = \"/etc\", container = \"/host-etc\" }]\ncommand = ",
    );
    let mounts = envelope(&device, "apply", "mounts", now, &outside, &key);
    let invalid = envelope(
        &device,
        "apply",
        "invalid",
        now,
        &v2.replace("package_version", "restrat = 1\npackage_version"),
        &key,
    );
    let cases = [
        (&unsigned, "unsigned command"),
        (&wrong_key, "bad signature"),
        (&tampered, "bad signature"),
        (&expired, "expired"),
        (&mounts, "host path /etc is outside allowed_host_paths"),
        (&invalid, "unknown field `restrat`"),
        (&apply, "request id apply-1 was already used"),
    ];
    for (envelope, why) in cases {
        let reply = send(&h, "apply", envelope);
        refused(&reply, why);
        let request_id = envelope["request_id"].as_str().unwrap();
        h.sub.wait_for(
            &h.berth.topic("events"),
            |e| e["event"] == "error" && e["request_id"] == request_id,
            WAIT,
        );
        unchanged.check(&h, why);
    }
    // The log names the refusals, never the payload.
    assert!(!h.berth.log().contains("restrat"), "{}", h.berth.log());

    // The replayed id is refused after a restart of berth too.
    h.berth.sigterm();
    h.sub.clear();
    h.berth.start();
    wait_online(&h);
    refused(&send(&h, "apply", &apply), "was already used");
    unchanged.check(&h, "replay after a restart");

    // An update whose new version cannot be had: FailedToUpdate, and the
    // previous version keeps running.
    let broken = v1
        .replace("1.2.3", "9.9.9")
        .replace(TEST_IMAGE, "127.0.0.1:5000/berth/nope:1")
        .replace("pull = \"never\"\n", "");
    let update = envelope(&device, "apply", "update", SystemTime::now(), &broken, &key);
    let reply = send(&h, "apply", &update);
    assert_eq!(reply["ok"], false, "{reply:#}");
    assert_eq!(reply["deployment"]["phase"], "FailedToUpdate", "{reply:#}");
    assert_eq!(container_ids(&device), vec![container.clone()]);
    assert_eq!(container_state(&container)["Running"], true);

    // A restart through `berth fleet`, signed by berth: the previous
    // version's container is restarted.
    let fleet = |args: &[&str]| {
        let broker = h.broker.url();
        let key = key.to_str().unwrap().to_string();
        let mut all = vec!["fleet", "--broker", &broker];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--device", &device, "--key", &key]);
        h.berth.command(&all)
    };
    let out = fleet(&["restart", &id]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(reply["deployment"]["restart_count"], 1, "{reply:#}");
    h.sub.wait_for(
        &h.berth.topic("events"),
        |e| e["event"] == "restart" && e["by"] == "ops (remote)" && e["deployment"] == id.as_str(),
        WAIT,
    );

    // remove: the file goes, the deployment is deprovisioned.
    let out = fleet(&["remove", &id]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let reply: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        reply["deployment"]["phase"], "DeploymentStopped",
        "{reply:#}"
    );
    assert!(!file.exists());
    assert!(container_ids(&device).is_empty());

    // A refused command exits 1; a device that does not answer, 2.
    let out = fleet(&["remove", &id]);
    assert_eq!(out.status.code(), Some(1));
    let broker = h.broker.url();
    let out = h.berth.command(&[
        "fleet",
        "--broker",
        &broker,
        "stop",
        "x",
        "--device",
        "nobody-here",
        "--key",
        key.to_str().unwrap(),
        "--timeout",
        "1",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `berth stop`, `start` and `restart` through the control socket; a stop
/// holds until a reboot, which restarts the executable under `always`.
#[test]
fn local_operator_actions_follow_the_manual_rows() {
    let mut h = Harness::new("operator", |c| c);
    let id = unique_id("op");
    h.berth.write_deployment(
        &id,
        &pull_never(&deployment_toml(
            &id,
            &restart_policy("always"),
            TEST_IMAGE,
            LONG_RUNNING,
        )),
    );
    h.berth.start();
    h.wait(&id, |d| {
        d["phase"] == "Succeeded" && d["status"] == "Running"
    });
    let container = h.container_id(&id);

    let run = |args: &[&str]| {
        let out = h.berth.command(args);
        assert!(
            out.status.success(),
            "berth {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // stop: Stopped by berth on the operator's behalf, not restarted.
    let printed = run(&["stop", &id]);
    assert!(printed.contains("Stopped"), "{printed}");
    assert_eq!(container_state(&container)["Running"], false);
    let doc = h.wait(&id, |d| exe(d)["status"] == "Stopped");
    assert_eq!(
        exe(&doc)["reason"],
        "stopped manually; restart policy suspended until reboot"
    );
    h.sub.wait_for(
        &h.berth.topic("events"),
        |e| e["event"] == "manual_stop" && e["deployment"] == id.as_str(),
        WAIT,
    );
    assert_eq!(h.events.starts(&container), 1, "not restarted");

    // start: running again, not counted.
    run(&["start", &id, "app"]);
    let doc = h.wait(&id, |d| exe(d)["status"] == "Running");
    assert_eq!(doc["restart_count"], 0);
    assert_eq!(container_state(&container)["Running"], true);

    // restart: stopped and started now, counted, and the event says who.
    run(&["restart", &id, "main/app"]);
    let doc = h.wait(&id, |d| {
        d["restart_count"] == 1 && exe(d)["status"] == "Running"
    });
    assert_eq!(exe(&doc)["container_id"], container.as_str());
    h.sub.wait_for(
        &h.berth.topic("events"),
        |e| e["event"] == "restart" && e["by"] == "berth restart (local)",
        WAIT,
    );
    assert_eq!(h.events.starts(&container), 3);

    // Unknown targets are refused, naming what there is.
    let out = h.berth.command(&["stop", &id, "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("it has main/app"));

    // stop, then a reboot: under always, the executable runs again.
    run(&["stop", &id]);
    h.wait(&id, |d| exe(d)["status"] == "Stopped");
    h.berth.sigterm();
    assert_eq!(container_state(&container)["Running"], false);
    h.berth.set_boot_id(&unique_id("boot"));
    h.sub.clear();
    h.berth.start();
    let doc = h.wait(&id, |d| exe(d)["status"] == "Running");
    assert_eq!(doc["restart_count"], 2, "the reboot's restart is counted");
    assert_eq!(container_state(&container)["Running"], true);
}

/// SPEC 8 and 10: a signed apply of an update whose new version starts and
/// then exits within `min_ready_secs` (10 s by default) is rolled back; the reply carries
/// `FailedToUpdate` and the previous version runs again.
#[test]
fn a_signed_update_that_exits_early_is_rolled_back() {
    let mut h = Harness::new("rollback", |c| c);
    let keys = h.berth.dir().join("keys");
    let trusted = h.berth.dir().join("trusted");
    fs::create_dir_all(&keys).unwrap();
    fs::create_dir_all(&trusted).unwrap();
    let key = openssl_key(&keys, &trusted, "ops");
    enable_remote(&h.berth, &trusted, &[]);
    h.berth.start();
    wait_online(&h);
    let device = h.berth.device_id().to_string();
    let id = unique_id("rb");
    let v1 = pull_never(&deployment_toml(&id, "", TEST_IMAGE, LONG_RUNNING));
    let reply = send(
        &h,
        "apply",
        &envelope(&device, "apply", "v1", SystemTime::now(), &v1, &key),
    );
    assert_eq!(reply["deployment"]["phase"], "Succeeded", "{reply:#}");
    let old = h.container_id(&id);

    let crashing = pull_never(&deployment_toml(&id, "", TEST_IMAGE, "sleep 1; exit 3"))
        .replace("1.2.3", "2.0.0");
    let reply = send(
        &h,
        "apply",
        &envelope(&device, "apply", "v2", SystemTime::now(), &crashing, &key),
    );
    assert_eq!(reply["ok"], false, "{reply:#}");
    assert_eq!(reply["deployment"]["phase"], "FailedToUpdate", "{reply:#}");
    assert_eq!(reply["deployment"]["update"]["package_version"], "2.0.0");
    assert_eq!(reply["deployment"]["update"]["state"], "rolled-back");
    let doc = h.wait(&id, |d| {
        exe(d)["status"] == "Running" && exe(d)["container_id"] == old.as_str()
    });
    assert_eq!(exe(&doc)["image"], TEST_IMAGE);
    assert!(
        wait_until(WAIT, || container_state(&old)["Running"] == true),
        "the previous version runs"
    );
    assert_eq!(
        container_ids(&device),
        vec![old.clone()],
        "the new one is gone"
    );
}
