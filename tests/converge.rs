//! Dependencies, live reload, updates, deprovisioning and the executable
//! fields (SPEC 4, 7, 8), end to end against the real engine and broker.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn a_dependency_chain_starts_in_order_with_exports() {
    let mut s = Harness::new("chain", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment(
        "c",
        &deployment_toml("c", r#"depends_on = ["b"]"#, TEST_IMAGE, LONG_RUNNING),
    );
    s.berth.write_deployment(
        "b",
        &deployment_toml(
            "b",
            "depends_on = [\"a\"]\nexports = { B_TOPIC = \"/b\" }",
            TEST_IMAGE,
            LONG_RUNNING,
        ),
    );
    s.berth.write_deployment(
        "a",
        &deployment_toml(
            "a",
            "exports = { A_URL = \"http://a:1\", SHARED = \"from-a\" }",
            TEST_IMAGE,
            LONG_RUNNING,
        ),
    );
    s.berth.start();
    for id in ["a", "b", "c"] {
        s.wait(id, |d| {
            d["phase"] == "Succeeded" && d["status"] == "Running"
        });
    }
    let started = |id: &str| {
        humantime::parse_rfc3339(
            s.container(id, "app")["State"]["StartedAt"]
                .as_str()
                .unwrap(),
        )
        .unwrap()
    };
    assert!(started("a") < started("b"), "a starts before b");
    assert!(started("b") < started("c"), "b starts before c");
    let env = env_of(&s.container("c", "app"));
    assert!(
        !env.iter().any(|e| e.starts_with("A_URL=")),
        "c does not depend on a directly: {env:?}"
    );
    assert!(env.contains(&"B_TOPIC=/b".to_owned()), "{env:?}");
    let env = env_of(&s.container("b", "app"));
    assert!(env.contains(&"A_URL=http://a:1".to_owned()), "{env:?}");
    assert!(env.contains(&"SHARED=from-a".to_owned()), "{env:?}");
    // Waiting was reported while it lasted.
    let waited = s
        .sub
        .messages_on(&s.berth.topic("deployments/c"))
        .iter()
        .any(|m| {
            m.payload["phase"] == "InProgress"
                && m.payload["status"] == "Pending"
                && exe(&m.payload)["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("waiting for dependency"))
        });
    assert!(waited, "c reported waiting for its dependency");
    s.berth.sigterm();
}

#[test]
fn a_failed_dependency_puts_its_dependent_in_error_until_it_recovers() {
    let mut s = Harness::new("depfail", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment(
        "base",
        &deployment_toml("base", r#"restart = "never""#, TEST_IMAGE, LONG_RUNNING),
    );
    s.berth.write_deployment(
        "app",
        &deployment_toml("app", r#"depends_on = ["base"]"#, TEST_IMAGE, LONG_RUNNING),
    );
    s.berth.start();
    s.wait("app", |d| d["status"] == "Running");
    let base = s.container("base", "app")["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    crash(&base);
    s.wait("base", |d| {
        d["status"] == "Error" && d["error_code"] == "DEP_E152"
    });
    let doc = s.wait("app", |d| d["status"] == "Error");
    assert_eq!(doc["error_code"], "DEP_E156");
    assert!(doc["reason"].as_str().unwrap().contains("base"), "{doc}");
    // Its own executable keeps running.
    assert_eq!(exe(&doc)["status"], "Running");
    docker(&["start", &base]);
    s.wait("base", |d| d["status"] == "Running");
    let doc = s.wait("app", |d| d["status"] == "Running");
    assert_eq!(doc["error_code"], Value::Null);
    s.berth.sigterm();
}

#[test]
fn a_cycle_and_an_unknown_dependency_fail_to_start() {
    let mut s = Harness::new("cycle", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment(
        "x",
        &deployment_toml("x", r#"depends_on = ["y"]"#, TEST_IMAGE, LONG_RUNNING),
    );
    s.berth.write_deployment(
        "y",
        &deployment_toml("y", r#"depends_on = ["x"]"#, TEST_IMAGE, LONG_RUNNING),
    );
    s.berth.write_deployment(
        "z",
        &deployment_toml("z", r#"depends_on = ["nope"]"#, TEST_IMAGE, LONG_RUNNING),
    );
    s.berth
        .write_deployment("ok", &deployment_toml("ok", "", TEST_IMAGE, LONG_RUNNING));
    s.berth.start();
    for id in ["x", "y"] {
        let doc = s.wait(id, |d| d["phase"] == "FailedToStart");
        let reason = doc["reason"].as_str().unwrap();
        assert!(
            reason.contains("dependency cycle") && reason.contains("x") && reason.contains("y"),
            "{doc}"
        );
    }
    let doc = s.wait("z", |d| d["phase"] == "FailedToStart");
    assert!(
        doc["reason"].as_str().unwrap().contains("\"nope\""),
        "{doc}"
    );
    s.wait("ok", |d| d["status"] == "Running");
    assert!(containers(s.berth.device_id())
        .iter()
        .all(|c| c["Config"]["Labels"]["berth.deployment"] == "ok"));
    s.berth.sigterm();
}

#[test]
fn files_added_edited_and_removed_while_berth_runs() {
    let mut s = Harness::new("reload", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment(
        "keep",
        &deployment_toml("keep", "", TEST_IMAGE, LONG_RUNNING),
    );
    s.berth.write_deployment(
        "edit",
        &deployment_toml(
            "edit",
            r#"env = { VERSION = "1" }"#,
            TEST_IMAGE,
            LONG_RUNNING,
        ),
    );
    s.berth.start();
    let keep = exe(&s.wait("keep", |d| d["status"] == "Running"))["container_id"].clone();
    let old = exe(&s.wait("edit", |d| d["status"] == "Running"))["container_id"].clone();

    // Watched: no signal needed.
    s.berth.write_deployment(
        "added",
        &deployment_toml("added", "", TEST_IMAGE, LONG_RUNNING),
    );
    s.wait("added", |d| d["status"] == "Running");
    s.berth.write_deployment(
        "edit",
        &deployment_toml(
            "edit",
            r#"env = { VERSION = "2" }"#,
            TEST_IMAGE,
            LONG_RUNNING,
        ),
    );
    // The update is kept once the new container has run for
    // min_ready_secs: then the phase is Succeeded and the old one is gone.
    let doc = s.wait("edit", |d| {
        d["status"] == "Running"
            && d["phase"] == "Succeeded"
            && exe(d)["container_id"] != old
            && exe(d)["container_id"].is_string()
    });
    assert_eq!(doc["update"], serde_json::Value::Null);
    assert!(env_of(&s.container("edit", "app")).contains(&"VERSION=2".to_owned()));
    assert!(
        wait_until(WAIT, || try_docker(&["inspect", old.as_str().unwrap()])
            .is_err()),
        "the old container is gone"
    );

    // An invalid file affects that deployment alone.
    s.berth
        .write_deployment("bad", "id = \"bad\"\npackage = 3\n");
    let doc = s.wait("bad", |d| d["phase"] == "FailedToStart");
    assert!(
        doc["reason"].as_str().unwrap().contains("bad.toml:2:"),
        "{doc}"
    );

    // With SIGHUP too; a removed file is deprovisioned.
    s.berth.remove_deployment("edit");
    s.berth.sighup();
    let doc = s.wait("edit", |d| d["phase"] == "DeploymentStopped");
    let msg = s.sub.wait_for_message(
        &s.berth.topic("deployments/edit"),
        |d| d["phase"] == "DeploymentStopped",
        WAIT,
    );
    assert_eq!(msg.payload, doc);
    assert!(containers(s.berth.device_id())
        .iter()
        .all(|c| c["Config"]["Labels"]["berth.deployment"] != "edit"));
    let late = Subscriber::new(s.broker.port(), &s.berth.topic("deployments/edit"));
    let retained = late.wait_for_message(&s.berth.topic("deployments/edit"), |_| true, WAIT);
    assert!(retained.retained && retained.payload["phase"] == "DeploymentStopped");

    // An invalid agent config on reload is rejected; berth carries on.
    let good = std::fs::read_to_string(s.berth.config_path()).unwrap();
    s.berth
        .write_raw_config("device_id = \"x\"\nnot_a_key = 1\n");
    s.berth.sighup();
    let event = s.sub.wait_for(
        &s.berth.topic("events"),
        |e| {
            e["event"] == "error"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("not_a_key"))
        },
        WAIT,
    );
    assert!(
        event["reason"].as_str().unwrap().contains("berth.toml:2:"),
        "{event}"
    );
    assert!(s.berth.is_running());
    s.berth.write_raw_config(&good);

    // The untouched deployment kept its container all along.
    let doc = s.wait("keep", |_| true);
    assert_eq!(exe(&doc)["container_id"], keep);
    assert_eq!(doc["status"], "Running");
    s.berth.sigterm();
}

#[test]
fn a_failed_update_keeps_the_old_container_then_a_good_one_applies() {
    let mut s = Harness::new("update", |c| c.backoff(100, 1, 30));
    s.berth
        .write_deployment("svc", &deployment_toml("svc", "", TEST_IMAGE, LONG_RUNNING));
    s.berth.start();
    let old = exe(&s.wait("svc", |d| d["status"] == "Running"))["container_id"].clone();
    s.berth.write_deployment(
        "svc",
        &deployment_toml(
            "svc",
            "",
            "127.0.0.1:5000/berth/no-such-image:9",
            LONG_RUNNING,
        ),
    );
    let doc = s.wait("svc", |d| d["phase"] == "FailedToUpdate");
    assert!(
        doc["reason"].as_str().unwrap().contains("no-such-image"),
        "{doc}"
    );
    assert_eq!(exe(&doc)["container_id"], old);
    let c = container_state(old.as_str().unwrap());
    assert_eq!(c["Running"], true, "the previous container keeps running");

    s.berth.write_deployment(
        "svc",
        &deployment_toml("svc", r#"env = { NEW = "yes" }"#, TEST_IMAGE, LONG_RUNNING),
    );
    let doc = s.wait("svc", |d| {
        d["phase"] == "Succeeded" && d["status"] == "Running" && exe(d)["container_id"] != old
    });
    let new = exe(&doc)["container_id"].as_str().unwrap();
    assert!(env_of(&s.container("svc", "app")).contains(&"NEW=yes".to_owned()));
    assert_eq!(s.container("svc", "app")["Id"], new);
    assert_eq!(containers(s.berth.device_id()).len(), 1);
    s.berth.sigterm();
}

/// An update to a crash-looping deployment applies at once, not after its
/// back-off.
#[test]
fn an_update_to_a_crash_loop_applies_at_once() {
    // A long back-off: 20 s after the second failure.
    let mut s = Harness::new("crashupd", |c| c.backoff(20_000, 60, 300));
    s.berth.write_deployment(
        "loop",
        &deployment_toml("loop", "", TEST_IMAGE, "sleep 0.2; exit 1"),
    );
    s.berth.start();
    s.wait("loop", |d| {
        exe(d)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("restarting in 20s"))
    });
    let t0 = std::time::Instant::now();
    s.berth.write_deployment(
        "loop",
        &deployment_toml("loop", "", TEST_IMAGE, LONG_RUNNING),
    );
    s.wait("loop", |d| {
        d["status"] == "Running" && d["phase"] == "Succeeded"
    });
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "applied after {:?}",
        t0.elapsed()
    );
    s.berth.sigterm();
}

#[test]
fn deprovisioning_retries_a_container_the_engine_refuses_to_remove() {
    let mut s = Harness::new("deprov", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment(
        "gone",
        &deployment_toml("gone", "", TEST_IMAGE, LONG_RUNNING),
    );
    s.berth.write_deployment(
        "stuck",
        &deployment_toml("stuck", "", TEST_IMAGE, LONG_RUNNING),
    );
    s.berth.start();
    s.wait("gone", |d| d["status"] == "Running");
    let stuck = exe(&s.wait("stuck", |d| d["status"] == "Running"))["container_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The engine cannot delete an immutable file of the container.
    let pinned = engine_root_dir()
        .join("containers")
        .join(&stuck)
        .join("hostname")
        .display()
        .to_string();
    let status = std::process::Command::new("chattr")
        .args(["+i", &pinned])
        .status()
        .unwrap();
    assert!(status.success(), "chattr +i {pinned}");
    struct Unpin(String);
    impl Drop for Unpin {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .args(["-i", &self.0])
                .status();
        }
    }
    let unpin = Unpin(pinned);

    s.berth.remove_deployment("gone");
    s.berth.remove_deployment("stuck");
    s.wait("gone", |d| d["phase"] == "DeploymentStopped");
    let doc = s.wait("stuck", |d| d["phase"] == "PartiallyDeprovisioned");
    assert!(
        exe(&doc)["reason"]
            .as_str()
            .unwrap()
            .contains("cannot remove"),
        "{doc}"
    );
    drop(unpin);
    s.wait("stuck", |d| d["phase"] == "DeploymentStopped");
    assert!(
        containers(s.berth.device_id()).is_empty(),
        "every container removed"
    );
    s.berth.sigterm();
}

#[test]
fn executable_fields_reach_the_engine() {
    let mut s = Harness::new("fields", |c| c.backoff(100, 1, 30));
    let port = free_port();
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("hello.txt"), "from the host").unwrap();
    let text = format!(
        r#"id = "fields"
package = "pkg"
package_version = "1"
restart = "on-failure"
env = {{ SHARED = "deployment", DEP_ONLY = "d" }}

[[components]]
name = "pair"

[[components.executables]]
name = "server"
image = "{TEST_IMAGE}"
pull = "never"
command = ["sh", "-c", "trap 'exit 0' TERM; while true; do echo pong-{port} | nc -l -p {port} > /dev/null; sleep 0.1; done"]
env = {{ SHARED = "executable", EXE_ONLY = "e" }}
limits = {{ cpus = 0.5, memory_mb = 64 }}
volumes = [{{ host = "{host}", container = "/data", read_only = true }}]
devices = ["/dev/zero"]

[[components.executables]]
name = "client"
image = "{TEST_IMAGE}"
pull = "if-not-present"
run_as_bash = true
command = "until echo ping | nc 127.0.0.1 {port} | grep pong-{port} > /dev/null; do sleep 0.2; done; cat /data/hello.txt 2>/dev/null; exit 0"
"#,
        host = host_dir.path().display()
    );
    s.berth.write_deployment("fields", &text);
    s.berth.start();
    let doc = s.wait("fields", |d| {
        d["executables"][1]["status"] == "Completed" && d["executables"][0]["status"] == "Running"
    });
    assert_eq!(doc["phase"], "Succeeded");

    let server = s.container("fields", "server");
    let hc = &server["HostConfig"];
    assert_eq!(hc["NetworkMode"], "host");
    assert_eq!(hc["NanoCpus"], 500_000_000);
    assert_eq!(hc["Memory"], 64 * 1024 * 1024);
    assert_eq!(
        hc["Binds"][0],
        format!("{}:/data:ro", host_dir.path().display())
    );
    assert_eq!(hc["Devices"][0]["PathOnHost"], "/dev/zero");
    assert_eq!(hc["RestartPolicy"]["Name"], "no");
    assert_eq!(server["Config"]["Cmd"][0], "sh");
    let env = env_of(&server);
    // The deployment's env wins over the executable's.
    assert!(env.contains(&"SHARED=deployment".to_owned()), "{env:?}");
    assert!(env.contains(&"EXE_ONLY=e".to_owned()), "{env:?}");
    assert!(env.contains(&"DEP_ONLY=d".to_owned()), "{env:?}");

    let client = s.container("fields", "client");
    assert_eq!(client["Config"]["Cmd"][0], "/bin/bash");
    assert_eq!(client["Config"]["Cmd"][1], "-c");
    // The two executables of the component talked over localhost: the
    // client completed, and it completes only once it has read the server's
    // own answer (`pong-PORT`) on 127.0.0.1 (a stranger on the port, or a
    // connection to itself, is retried). That the server also read the
    // client's `ping` is not asserted: busybox's `nc -l` may close the
    // connection once its answer is sent, before the `ping` is read.
    s.berth.sigterm();
}

#[test]
fn pull_never_with_an_absent_image_is_dep_e161() {
    let mut s = Harness::new("pullnever", |c| c.backoff(100, 1, 30));
    let text = pull_never(&deployment_toml(
        "n",
        "",
        "berth-test/absent:1",
        LONG_RUNNING,
    ));
    s.berth.write_deployment("n", &text);
    s.berth.start();
    let doc = s.wait("n", |d| d["status"] == "Error");
    assert_eq!(doc["error_code"], "DEP_E161");
    assert!(
        exe(&doc)["reason"]
            .as_str()
            .unwrap()
            .contains("pull = \"never\""),
        "{doc}"
    );
    s.berth.sigterm();
}

/// A file named other than its deployment's id, broken by an edit: the error
/// belongs to that deployment, which keeps running; no other appears.
#[test]
fn a_broken_edit_of_a_file_named_otherwise_keeps_its_deployment() {
    let mut s = Harness::new("fname", |c| c);
    let file = s.berth.deployments_dir().join("robot-app.toml");
    let write = |text: &str| {
        std::fs::write(file.with_extension("tmp"), text).unwrap();
        std::fs::rename(file.with_extension("tmp"), &file).unwrap();
    };
    write(&deployment_toml("bar", "", TEST_IMAGE, LONG_RUNNING));
    s.berth.start();
    let running = exe(&s.wait("bar", |d| d["status"] == "Running"))["container_id"].clone();
    for broken in [
        // A value that fails validation: the id is still readable.
        deployment_toml("bar", "restart = \"sometimes\"", TEST_IMAGE, LONG_RUNNING),
        // Not even TOML: known by the file it came from.
        "id = \"bar\"\npackage = \n".to_string(),
    ] {
        write(&broken);
        let doc = s.wait("bar", |d| d["phase"] == "FailedToStart");
        assert!(
            doc["reason"].as_str().unwrap().contains("robot-app.toml:"),
            "{doc}"
        );
        assert_eq!(
            exe(&doc)["container_id"],
            running,
            "the container is untouched"
        );
        assert_eq!(container_state(running.as_str().unwrap())["Running"], true);
    }
    // Not a wait for an outcome: a window in which a document named after
    // the file would show.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let topics: Vec<String> = s
        .sub
        .messages()
        .iter()
        .map(|m| m.topic.clone())
        .filter(|t| t.contains("/deployments/"))
        .collect();
    assert!(
        topics.iter().all(|t| t.ends_with("/deployments/bar")),
        "no deployment named after the file: {topics:?}"
    );
    // Mended: applied again, same container (nothing changed in its spec).
    write(&deployment_toml("bar", "", TEST_IMAGE, LONG_RUNNING));
    let doc = s.wait("bar", |d| d["phase"] == "Succeeded");
    assert_eq!(exe(&doc)["container_id"], running);
    s.berth.sigterm();
}
