//! Updates that roll back (SPEC 8): the previous container is kept until the
//! new one has run for `min_ready_secs`, a new version that fails in that
//! time is rolled back without a pull, and a berth killed in the middle of
//! an update leaves exactly one version running after its next start.
//! Against the real engine, broker and registry.

mod common;

use common::*;

/// A deployment file with one executable, its version, image, pull policy,
/// script and `min_ready_secs`.
fn versioned(version: &str, image: &str, pull: &str, script: &str, min_ready: u64) -> String {
    format!(
        r#"id = "svc"
package = "pkg-svc"
package_version = "{version}"

[update]
min_ready_secs = {min_ready}

[[components]]
name = "main"

[[components.executables]]
name = "app"
image = "{image}"
pull = "{pull}"
command = ["sh", "-c", {script}]
"#,
        script = toml::Value::String(script.to_owned())
    )
}

/// The names of the device's containers, `docker inspect` style (`/name`).
fn names(device: &str) -> Vec<String> {
    containers(device)
        .iter()
        .map(|c| c["Name"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn a_new_version_that_exits_is_rolled_back_with_the_registry_stopped() {
    let registry = Registry::new();
    let image = registry.push(TEST_IMAGE, "berth/rollback:1");
    let mut s = Harness::new("offrollback", |c| c.backoff(100, 1, 30));
    // The running version pulls its image every time it is created: a
    // rollback that pulled would fail with the registry gone.
    s.berth.write_deployment(
        "svc",
        &versioned("1.0.0", &image, "always", LONG_RUNNING, 1),
    );
    s.berth.start();
    let running = s.wait("svc", |d| {
        d["phase"] == "Succeeded" && d["status"] == "Running"
    });
    let old = exe(&running)["container_id"].as_str().unwrap().to_owned();

    drop(registry);
    // The new version exits at once, within its min_ready_secs.
    s.berth.write_deployment(
        "svc",
        &versioned("2.0.0", TEST_IMAGE, "if-not-present", "exit 1", 30),
    );
    let doc = s.wait("svc", |d| {
        d["phase"] == "FailedToUpdate" && d["status"] == "Running"
    });
    assert_eq!(
        exe(&doc)["container_id"],
        old.as_str(),
        "the previous container runs: {doc}"
    );
    assert_eq!(doc["update"]["state"], "rolled-back", "{doc}");
    assert_eq!(doc["update"]["package_version"], "2.0.0", "{doc}");
    assert_eq!(doc["update"]["error_code"], "DEP_E152", "{doc}");
    assert!(
        doc["update"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("main/app") && r.contains("exit code 1")),
        "{doc}"
    );
    assert_eq!(container_state(&old)["Running"], true);
    // The failed version's container goes; nothing else is left behind.
    let device = s.berth.device_id().to_owned();
    assert!(
        wait_until(WAIT, || containers(&device).len() == 1),
        "one container left: {:?}",
        names(&device)
    );
    let rollback =
        s.sub
            .wait_for_message(&s.berth.topic("events"), |e| e["event"] == "rollback", WAIT);
    assert_eq!(rollback.payload["package_version"], "2.0.0");
    s.berth.sigterm();
}

#[test]
fn a_kill_9_in_the_middle_of_an_update_leaves_one_version_running() {
    let mut s = Harness::new("killupdate", |c| c.backoff(100, 1, 30));
    // A long min_ready_secs: the update is caught with both containers there.
    s.berth.write_deployment(
        "svc",
        &versioned("1.0.0", TEST_IMAGE, "if-not-present", LONG_RUNNING, 120),
    );
    s.berth.start();
    let running = s.wait("svc", |d| {
        d["phase"] == "Succeeded" && d["status"] == "Running"
    });
    let old = exe(&running)["container_id"].as_str().unwrap().to_owned();
    let script = format!("export V=2; {LONG_RUNNING}");
    s.berth.write_deployment(
        "svc",
        &versioned("2.0.0", TEST_IMAGE, "if-not-present", &script, 120),
    );
    // The new container runs and proves itself; the old one waits, stopped.
    let proving = s.wait("svc", |d| {
        d["status"] == "Running"
            && d["phase"] == "Provisioning"
            && exe(d)["container_id"].is_string()
            && exe(d)["container_id"] != old.as_str()
    });
    let new = exe(&proving)["container_id"].as_str().unwrap().to_owned();
    let device = s.berth.device_id().to_owned();
    assert!(
        wait_until(WAIT, || containers(&device).len() == 2),
        "the new container and the kept previous one: {:?}",
        names(&device)
    );
    s.berth.kill9();

    s.berth.start();
    // Exactly one version runs, and nothing of the update is left behind.
    let one = wait_until(WAIT, || {
        let all = containers(&device);
        all.len() == 1 && all[0]["State"]["Running"] == true
    });
    assert!(one, "one running container: {:?}", names(&device));
    let left = containers(&device);
    assert_eq!(left[0]["Id"], new.as_str(), "the new version stays");
    let doc = s.wait("svc", |d| {
        d["phase"] == "Succeeded" && d["status"] == "Running"
    });
    assert_eq!(exe(&doc)["container_id"], new.as_str());
    assert_eq!(exe(&doc)["restart_count"], 0);
    s.berth.sigterm();
}
