//! Checks the test infrastructure itself (tests/common): the services the
//! other integration tests rely on really work, so that a failure there
//! points at berth and not at the bench.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// Its basic-auth header `base64("berth:<password>")` holds both `+` and
/// `/`, the characters that distinguish standard base64 from the URL-safe
/// kind, so that a registry test catches credentials encoded the wrong way.
const REGISTRY_USER: &str = "berth";
const REGISTRY_PASSWORD: &str = "s3cre???>robot";

#[test]
fn unique_ids_are_valid_device_and_deployment_ids_and_never_repeat() {
    let ids: Vec<String> = (0..1000).map(|_| unique_id("Infra_Test.x")).collect();
    for id in &ids {
        assert!((1..=64).contains(&id.len()), "{id} is {} long", id.len());
        assert!(
            id.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{id} has characters outside [a-z0-9-]"
        );
        assert!(id.starts_with("infra-test-x-"), "{id}");
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    let long = unique_id(&"p".repeat(100));
    assert!(long.len() <= 64, "{long} is {} long", long.len());
}

#[test]
fn base64_matches_known_vectors() {
    assert_eq!(base64_std(b""), "");
    assert_eq!(base64_std(b"f"), "Zg==");
    assert_eq!(base64_std(b"fo"), "Zm8=");
    assert_eq!(base64_std(b"foo"), "Zm9v");
    assert_eq!(base64_std(b"foobar"), "Zm9vYmFy");
    assert_eq!(base64_std(&[0xfb, 0xff]), "+/8=");
}

#[test]
fn broker_delivers_retained_and_live_messages_and_forgets_them_across_a_restart() {
    let mut broker = Broker::new();
    let subscriber = Subscriber::new(broker.port(), "infra/#");

    mqtt_publish(broker.port(), "infra/live", r#"{"n":1}"#, false);
    let live = subscriber.wait_for_message("infra/live", |v| v["n"] == 1, WAIT);
    assert!(!live.retained);

    mqtt_publish(broker.port(), "infra/kept", r#"{"n":2}"#, true);
    subscriber.wait_for("infra/kept", |v| v["n"] == 2, WAIT);
    // A new subscriber gets the retained message, flagged as such.
    let late = Subscriber::new(broker.port(), "infra/kept");
    let kept = late.wait_for_message("infra/kept", |v| *v == json!({"n": 2}), WAIT);
    assert!(kept.retained);

    let acknowledged = subscriber.subscriptions();
    broker.stop();
    assert!(
        !port_open(broker.port()),
        "the stopped broker still accepts"
    );
    subscriber.clear();
    broker.start();
    subscriber.wait_subscriptions(acknowledged + 1, WAIT);

    mqtt_publish(broker.port(), "infra/live", r#"{"n":3}"#, false);
    subscriber.wait_for("infra/live", |v| v["n"] == 3, WAIT);
    // Retained messages would have been delivered right after the new
    // subscription, before n=3 on the same connection: there were none.
    assert!(
        subscriber.messages_on("infra/kept").is_empty(),
        "the restarted broker still had retained messages: {:?}",
        subscriber.messages()
    );
}

#[test]
#[should_panic(expected = "no message on \"infra/never\" matched")]
fn subscriber_wait_fails_with_what_it_saw() {
    let broker = Broker::new();
    let subscriber = Subscriber::new(broker.port(), "infra/#");
    mqtt_publish(broker.port(), "infra/never", r#"{"n":1}"#, false);
    subscriber.wait_for("infra/never", |v| v["n"] == 2, Duration::from_secs(1));
}

#[test]
fn test_image_has_busybox_applets_and_a_bash_that_runs_commands() {
    let out = docker(&[
        "run",
        "--rm",
        "--network",
        "host",
        TEST_IMAGE,
        "sh",
        "-c",
        "echo $((40 + 2)); ls /tmp && echo tmp-ok",
    ]);
    assert_eq!(out, "42\ntmp-ok\n");
    let out = docker(&[
        "run",
        "--rm",
        "--network",
        "host",
        TEST_IMAGE,
        "/bin/bash",
        "-c",
        "echo \"$0 $1\"",
        "a",
        "b",
    ]);
    assert_eq!(out, "a b\n");
    let out = docker(&["run", "--rm", "--network", "host", TEST_IMAGE, "sleep", "0"]);
    assert_eq!(out, "");
}

#[test]
fn development_registry_serves_the_test_image() {
    assert_eq!(
        http_status(5000, "/v2/"),
        Some(200),
        "no open registry on 127.0.0.1:5000: run scripts/setup.sh"
    );
    docker(&["pull", "--quiet", REGISTRY_IMAGE]);
    let local = docker(&["image", "inspect", "--format", "{{.Id}}", TEST_IMAGE]);
    let pulled = docker(&["image", "inspect", "--format", "{{.Id}}", REGISTRY_IMAGE]);
    assert_eq!(
        local, pulled,
        "the registry holds another image than the local test image"
    );
}

#[test]
fn registry_without_auth_serves_what_was_pushed() {
    let registry = Registry::new();
    let reference = registry.push(TEST_IMAGE, "infra/open:1");
    assert_eq!(
        reference,
        format!("127.0.0.1:{}/infra/open:1", registry.port())
    );
    assert!(registry.login().is_none());

    docker(&["rmi", &reference]);
    assert!(try_docker(&["image", "inspect", &reference]).is_err());
    registry
        .pull_anonymously(&reference)
        .expect("anonymous pull from an open registry");
    assert_eq!(
        docker(&[
            "run",
            "--rm",
            "--network",
            "host",
            &reference,
            "echo",
            "pulled"
        ]),
        "pulled\n"
    );
}

#[test]
fn registry_with_auth_refuses_anonymous_pulls_and_serves_logged_in_ones() {
    let header = base64_std(format!("{REGISTRY_USER}:{REGISTRY_PASSWORD}").as_bytes());
    assert!(
        header.contains('+') && header.contains('/'),
        "pick a password whose basic-auth header has both + and /: {header}"
    );

    let registry = Registry::with_auth(REGISTRY_USER, REGISTRY_PASSWORD);
    assert_eq!(http_status(registry.port(), "/v2/"), Some(401));
    let reference = registry.push(TEST_IMAGE, "infra/private:1");

    docker(&["rmi", &reference]);
    let refused = registry
        .pull_anonymously(&reference)
        .expect_err("an anonymous pull from a registry with auth succeeded");
    assert!(
        refused.contains("no basic auth credentials") || refused.contains("unauthorized"),
        "unexpected refusal: {refused}"
    );
    registry.pull(&reference);
    assert_eq!(
        docker(&[
            "run",
            "--rm",
            "--network",
            "host",
            &reference,
            "echo",
            "pulled"
        ]),
        "pulled\n"
    );

    let login = registry
        .login()
        .expect("credentials of a registry with auth");
    assert_eq!(login.server, registry.server());
    assert_eq!(login.username, REGISTRY_USER);
    assert_eq!(
        std::fs::read_to_string(&login.password_file).expect("read password file"),
        REGISTRY_PASSWORD
    );
}

#[test]
fn engine_guard_removes_the_devices_containers_and_only_those() {
    let device = unique_id("infra");
    let other = unique_id("infra");
    let _other_guard = EngineGuard::new(&other);
    let run = |device: &str, name: &str| {
        docker(&[
            "run",
            "--detach",
            "--network",
            "host",
            "--label",
            &format!("berth.device={device}"),
            "--name",
            &format!("berth.{device}.{name}"),
            TEST_IMAGE,
            "sleep",
            "600",
        ])
    };
    {
        let guard = EngineGuard::new(&device);
        run(&device, "a");
        run(&device, "b");
        run(&other, "a");
        docker(&["stop", "--time", "0", &format!("berth.{device}.b")]);

        let inspected = guard.containers();
        assert_eq!(inspected.len(), 2);
        for c in &inspected {
            assert_eq!(c["Config"]["Labels"]["berth.device"], device.as_str());
        }
        let name = format!("/berth.{device}.a");
        let a = inspected
            .iter()
            .find(|c| c["Name"] == name.as_str())
            .expect("container a");
        assert_eq!(a["State"]["Running"], true);
        assert!(container(&format!("berth.{device}.a")).is_some());
    }
    assert!(
        containers(&device).is_empty(),
        "the guard left containers behind"
    );
    assert_eq!(
        containers(&other).len(),
        1,
        "the guard removed another device's container"
    );
}

#[test]
fn berth_helper_writes_a_spec_shaped_config_and_files() {
    let registry_password = tempfile::NamedTempFile::new().expect("temp file");
    let config = BerthConfig::new(&unique_id("infra"), 1883)
        .topic_prefix("fleet/test")
        .backoff(100, 1, 3)
        .registry(RegistryLogin {
            server: "127.0.0.1:5999".into(),
            username: "robot".into(),
            password_file: registry_password.path().to_owned(),
        });
    let mut berth = Berth::new(config.clone());

    let text = std::fs::read_to_string(berth.config_path()).expect("read berth.toml");
    let parsed: toml::Table = text.parse().expect("berth.toml is TOML");
    assert_eq!(
        parsed["device_id"].as_str(),
        Some(config.device_id.as_str())
    );
    assert_eq!(
        parsed["deployments_dir"]
            .as_str()
            .map(std::path::PathBuf::from),
        Some(berth.deployments_dir())
    );
    assert_eq!(
        parsed["state_dir"].as_str().map(std::path::PathBuf::from),
        Some(berth.state_dir())
    );
    assert_eq!(
        parsed["mqtt"]["url"].as_str(),
        Some("mqtt://127.0.0.1:1883")
    );
    assert_eq!(parsed["mqtt"]["topic_prefix"].as_str(), Some("fleet/test"));
    assert_eq!(
        parsed["restart"]["backoff_initial_ms"].as_integer(),
        Some(100)
    );
    assert_eq!(
        parsed["docker"]["registries"][0]["username"].as_str(),
        Some("robot")
    );
    assert_eq!(parsed["ros"]["master_image"].as_str(), Some(TEST_IMAGE));
    assert_eq!(parsed["log"]["format"].as_str(), Some("text"));
    assert_eq!(
        berth.topic("deployments/talker"),
        format!("fleet/test/{}/deployments/talker", config.device_id)
    );

    let first_boot = std::fs::read_to_string(berth.boot_id_file()).expect("read boot id");
    assert_eq!(first_boot.trim(), berth.boot_id());
    berth.set_boot_id("second-boot");
    assert_eq!(
        std::fs::read_to_string(berth.boot_id_file()).unwrap(),
        "second-boot\n"
    );

    berth.write_deployment("talker", "id = \"talker\"\n");
    assert_eq!(
        std::fs::read_to_string(berth.deployment_path("talker")).unwrap(),
        "id = \"talker\"\n"
    );
    let names: Vec<_> = std::fs::read_dir(berth.deployments_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["talker.toml"], "only the deployment file is left");
    berth.remove_deployment("talker");
    assert!(!berth.deployment_path("talker").exists());
}

#[test]
fn deployment_helpers_write_files_berth_accepts() {
    let script = "echo \"hi\"; sleep 1";
    let text = deployment_toml("talker", &restart_policy("never"), TEST_IMAGE, script);
    let parsed: toml::Table = text.parse().expect("a deployment file is TOML");
    assert_eq!(parsed["id"].as_str(), Some("talker"));
    assert_eq!(parsed["package"].as_str(), Some("pkg-talker"));
    assert_eq!(parsed["restart"].as_str(), Some("never"));
    let app = &parsed["components"][0]["executables"][0];
    assert_eq!(app["name"].as_str(), Some("app"));
    assert_eq!(app["image"].as_str(), Some(TEST_IMAGE));
    assert_eq!(
        app["command"],
        toml::Value::Array(["sh", "-c", script].map(toml::Value::from).to_vec())
    );
    assert!(app.get("pull").is_none());

    let never = pull_never(&text);
    let parsed_never: toml::Table = never.parse().expect("still TOML");
    let app_never = &parsed_never["components"][0]["executables"][0];
    assert_eq!(app_never["pull"].as_str(), Some("never"));
    assert_eq!(app_never["command"], app["command"]);

    let berth = Berth::new(BerthConfig::new(&unique_id("infra"), 1883));
    berth.write_deployment("talker", &text);
    berth.write_deployment(
        "never",
        &pull_never(&deployment_toml("never", "", TEST_IMAGE, script)),
    );
    let out = berth.command(&["check-config"]);
    assert!(
        out.status.success(),
        "berth check-config: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
