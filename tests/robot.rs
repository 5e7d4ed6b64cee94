//! Robot realities end to end (issue "robot realities"), against the real
//! engine, broker and registries of the tests' own: liveness probes restart
//! or fail an executable, an exit's events carry its evidence (last log
//! lines, OOM kill), metrics, image collection, a pull that cannot fit, and
//! a boot with the registry stopped.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Healthy for 5 s after each start, then the exec probe fails: a marker
/// file appears (and is removed again at the next start).
const SICKENS_AFTER_5S: &str = "rm -f /tmp/sick; (sleep 5; touch /tmp/sick) & \
    trap 'exit 0' TERM; while true; do sleep 1; done";

fn with_exec_probe(deployment: &str) -> String {
    format!(
        "{deployment}\n[components.executables.probe]\n\
         exec = [\"sh\", \"-c\", \"test ! -f /tmp/sick\"]\n\
         initial_delay_secs = 1\nperiod_secs = 1\ntimeout_secs = 1\nfailure_threshold = 2\n"
    )
}

fn event(s: &Harness, predicate: impl Fn(&Value) -> bool) -> Value {
    s.sub.wait_for(&s.berth.topic("events"), predicate, WAIT)
}

#[test]
fn an_exec_probe_that_starts_failing_restarts_an_always_executable() {
    let mut s = Harness::new("probe-always", |c| c);
    s.berth.write_deployment(
        "sick",
        &with_exec_probe(&deployment_toml(
            "sick",
            &restart_policy("always"),
            TEST_IMAGE,
            SICKENS_AFTER_5S,
        )),
    );
    s.berth.start();
    let doc = s.wait("sick", |d| exe(d)["health"] == "healthy");
    assert_eq!(doc["restart_count"], 0);
    let container = exe(&doc)["container_id"].as_str().unwrap().to_owned();

    let restart = event(&s, |e| e["event"] == "restart" && e["deployment"] == "sick");
    assert_eq!(
        restart["reason"],
        "restarting after unhealthy: exec probe failed 2 times in a row"
    );
    assert_eq!(restart["restart_count"], 1);
    let doc = s.wait("sick", |d| {
        d["restart_count"] == 1 && d["status"] == "Running"
    });
    assert_eq!(
        exe(&doc)["container_id"],
        container.as_str(),
        "the same container"
    );
    // berth's own stop is not an operator's.
    assert!(
        s.sub
            .messages_on(&s.berth.topic("events"))
            .iter()
            .all(|m| m.payload["event"] != "manual_stop"),
        "no manual_stop"
    );
    // From the engine's verdict to berth's stop and the start again.
    let history = s.events.history(&container, 0);
    let at = |action: &str, after: i128| {
        history
            .iter()
            .find(|(a, t)| a.as_str() == action && *t >= after)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("no {action} after {after}: {history:?}"))
    };
    let unhealthy = at("health_status: unhealthy", 0);
    let kill = at("kill", unhealthy);
    let start = at("start", kill);
    eprintln!(
        "probe failure to restart: {} ms to berth's stop, {} ms to the start",
        (kill - unhealthy) / 1_000_000,
        (start - unhealthy) / 1_000_000
    );
    assert!(start - unhealthy < 10_000_000_000, "{history:?}");
    // The new run is healthy again, then sick again: counted each time.
    s.wait("sick", |d| {
        d["restart_count"] == 1 && exe(d)["health"] == "healthy"
    });
}

#[test]
fn an_unhealthy_executable_under_never_is_an_error_and_left_running() {
    let mut s = Harness::new("probe-never", |c| c);
    s.berth.write_deployment(
        "sick",
        &with_exec_probe(&deployment_toml(
            "sick",
            &restart_policy("never"),
            TEST_IMAGE,
            SICKENS_AFTER_5S,
        )),
    );
    s.berth.start();
    let doc = s.wait("sick", |d| exe(d)["status"] == "Error");
    assert_eq!(exe(&doc)["error_code"], "DEP_E152");
    assert_eq!(exe(&doc)["health"], "unhealthy");
    let container = exe(&doc)["container_id"].as_str().unwrap().to_owned();
    assert_eq!(container_state(&container)["Running"], true, "left running");
    assert_eq!(s.events.starts(&container), 1);
    let error = event(&s, |e| e["event"] == "error" && e["deployment"] == "sick");
    assert_eq!(error["error_code"], "DEP_E152");
}

#[test]
fn an_exit_carries_the_last_lines_and_an_oom_kill_says_so() {
    let mut s = Harness::new("evidence", |c| c.backoff(200, 1, 30));
    s.berth.write_deployment(
        "crash",
        &deployment_toml(
            "crash",
            &restart_policy("on-failure"),
            TEST_IMAGE,
            "echo 'loading map'; echo 'map corrupt' >&2; sleep 1; echo 'giving up'; exit 3",
        ),
    );
    let hog = deployment_toml(
        "hog",
        &restart_policy("never"),
        TEST_IMAGE,
        // Holds ever more memory in the shell's own variable.
        "x=0123456789abcdef; while true; do x=$x$x; done",
    )
    .replace("command = [", "limits = { memory_mb = 16 }\ncommand = [");
    s.berth.write_deployment("hog", &hog);
    s.berth.start();

    let restart = event(&s, |e| {
        e["event"] == "restart" && e["deployment"] == "crash"
    });
    assert_eq!(restart["exit_code"], 3);
    assert_eq!(restart["oom_killed"], false);
    let tail: Vec<&str> = restart["log_tail"]
        .as_array()
        .expect("log_tail")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for line in ["loading map", "map corrupt", "giving up"] {
        assert!(tail.contains(&line), "{line} in {tail:?}");
    }

    let error = event(&s, |e| e["event"] == "error" && e["deployment"] == "hog");
    assert_eq!(error["oom_killed"], true, "{error}");
    assert_eq!(error["exit_code"], 137, "{error}");
    assert_eq!(error["signal"], "SIGKILL", "{error}");
}

/// A probe berth runs itself against a busybox `httpd` on the host network:
/// the `http` probe once the page goes away, the `tcp` probe once the server
/// is gone. Each is healthy first, then restarts its executable.
#[test]
fn tcp_and_http_probes_are_healthy_then_unhealthy() {
    let mut s = Harness::new("probe-net", |c| c);
    let http_port = free_port();
    let tcp_port = free_port();
    let server = |port: u16, breaks: &str| {
        format!(
            "mkdir -p /www; echo ok > /www/index.html; httpd -f -p {port} -h /www & pid=$!; \
             (sleep 4; {breaks}) & trap 'kill $pid; exit 0' TERM; while true; do sleep 1; done"
        )
    };
    let probe = |check: String| {
        format!(
            "\n[components.executables.probe]\n{check}\n\
             initial_delay_secs = 1\nperiod_secs = 1\ntimeout_secs = 1\nfailure_threshold = 2\n"
        )
    };
    s.berth.write_deployment(
        "web",
        &(deployment_toml(
            "web",
            &restart_policy("always"),
            TEST_IMAGE,
            &server(http_port, "rm /www/index.html"),
        ) + &probe(format!(
            "http = \"http://127.0.0.1:{http_port}/index.html\""
        ))),
    );
    s.berth.write_deployment(
        "port",
        &(deployment_toml(
            "port",
            &restart_policy("always"),
            TEST_IMAGE,
            &server(tcp_port, "kill $pid"),
        ) + &probe(format!("tcp = {tcp_port}"))),
    );
    s.berth.start();
    for id in ["web", "port"] {
        let doc = s.wait(id, |d| exe(d)["health"] == "healthy");
        assert_eq!(doc["restart_count"], 0, "{id}");
    }
    let web = event(&s, |e| e["event"] == "restart" && e["deployment"] == "web");
    let reason = web["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("restarting after unhealthy: http probe failed 2 times in a row: GET "),
        "{reason}"
    );
    assert!(reason.contains("404"), "{reason}");
    let port = event(&s, |e| e["event"] == "restart" && e["deployment"] == "port");
    let reason = port["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("restarting after unhealthy: tcp probe failed 2 times in a row: "),
        "{reason}"
    );
    for id in ["web", "port"] {
        s.wait(id, |d| {
            d["restart_count"] == 1 && d["status"] == "Running" && exe(d)["health"] == "healthy"
        });
    }
}

/// The `metrics` topic, read from MQTT: a busy loop shows more than half a
/// core, an idle executable less than 5 %, and a crash loop's availability
/// drops below 1.
#[test]
fn metrics_are_plausible_and_availability_drops_in_a_crash_loop() {
    let mut s = Harness::new("metrics", |c| c.backoff(200, 1, 30));
    let config = std::fs::read_to_string(s.berth.config_path()).unwrap();
    s.berth
        .write_raw_config(&format!("{config}\n[metrics]\ninterval_secs = 2\n"));
    s.berth.write_deployment(
        "busy",
        &deployment_toml(
            "busy",
            &restart_policy("always"),
            TEST_IMAGE,
            // Four busy loops: more than half a core even when other work
            // keeps both cores busy (the share is per runnable process).
            "trap 'exit 0' TERM; for i in 1 2 3; do (while true; do :; done) & done; while true; do :; done",
        ),
    );
    s.berth.write_deployment(
        "idle",
        &deployment_toml("idle", &restart_policy("always"), TEST_IMAGE, UNTIL_SIGTERM),
    );
    s.berth.write_deployment(
        "flaky",
        &deployment_toml(
            "flaky",
            &restart_policy("always"),
            TEST_IMAGE,
            "sleep 1; exit 1",
        ),
    );
    s.berth.start();
    let topic = s.berth.topic("metrics");
    let figure = |doc: &Value, id: &str, field: &str| -> Option<f64> {
        doc["executables"]
            .as_array()?
            .iter()
            .find(|e| e["deployment"] == id)?[field]
            .as_f64()
    };
    let doc = s.sub.wait_for(
        &topic,
        |d| {
            figure(d, "busy", "cpu_percent").is_some()
                && figure(d, "idle", "cpu_percent").is_some()
                && figure(d, "flaky", "availability").is_some_and(|a| a < 1.0)
        },
        Duration::from_secs(60),
    );
    let busy = figure(&doc, "busy", "cpu_percent").unwrap();
    let idle = figure(&doc, "idle", "cpu_percent").unwrap();
    // A share of a core: how much the busy loops get depends on what else
    // the machine runs, but always far more than the idle one.
    assert!(
        busy > 10.0 && busy > 10.0 * idle.max(0.5),
        "busy loop: {busy} %, idle {idle} % ({doc})"
    );
    assert!(idle < 5.0, "idle: {idle} % ({doc})");
    assert!(figure(&doc, "idle", "memory_bytes").unwrap() > 0.0);
    assert!(
        doc["data_root"]["size_bytes"].as_u64().unwrap() > 0,
        "{doc}"
    );
    assert!(doc["data_root"]["free_bytes"].as_u64().is_some(), "{doc}");
    // Retained: a subscriber that comes later gets the latest at once.
    let late = Subscriber::new(s.broker.port(), &topic);
    let message = late.wait_for_message(&topic, |_| true, WAIT);
    assert!(message.retained, "retained");
    assert_eq!(message.payload["device_id"], s.berth.device_id());
}

/// An update whose new version never becomes healthy within
/// `min_ready_secs` is rolled back to the previous container.
#[test]
fn an_update_that_never_becomes_healthy_is_rolled_back() {
    let mut s = Harness::new("probe-update", |c| c);
    let v1 = deployment_toml("svc", &restart_policy("always"), TEST_IMAGE, UNTIL_SIGTERM);
    s.berth.write_deployment("svc", &v1);
    s.berth.start();
    let old = exe(&s.wait("svc", |d| d["status"] == "Running"))["container_id"].clone();

    let v2 = deployment_toml(
        "svc",
        &format!(
            "{}\n[update]\nmin_ready_secs = 30",
            restart_policy("always")
        ),
        TEST_IMAGE,
        UNTIL_SIGTERM,
    )
    .replace("package_version = \"1.2.3\"", "package_version = \"2.0.0\"")
        + "\n[components.executables.probe]\nexec = [\"false\"]\n\
           initial_delay_secs = 1\nperiod_secs = 1\ntimeout_secs = 1\nfailure_threshold = 2\n";
    s.berth.write_deployment("svc", &v2);
    let rollback = event(&s, |e| e["event"] == "rollback" && e["deployment"] == "svc");
    let reason = rollback["reason"].as_str().unwrap();
    assert!(
        reason.ends_with("unhealthy within min_ready_secs: exec probe failed 2 times in a row"),
        "{reason}"
    );
    assert_eq!(rollback["package_version"], "2.0.0");
    let doc = s.wait("svc", |d| {
        d["status"] == "Running" && exe(d)["container_id"] == old && d["update"].is_object()
    });
    assert_eq!(doc["update"]["state"], "rolled-back", "{doc}");
    assert_eq!(container_state(old.as_str().unwrap())["Running"], true);
}

/// `pull = "always"` for the executable of deployment file `file`.
fn pull_always(file: &str, image: &str) -> String {
    let file = file.replace(
        &format!("image = \"{image}\""),
        &format!("image = \"{image}\"\npull = \"always\""),
    );
    assert!(file.contains("pull = \"always\""));
    file
}

/// A robot booting offline: the image was pulled from a registry of the
/// test's own, which is then stopped; `pull = "always"` runs the present
/// image, and says so.
#[test]
fn pull_always_with_the_registry_stopped_runs_the_present_image() {
    let mut registry = Registry::new();
    let mut s = Harness::new("offline", |c| c);
    let image = registry.push(
        TEST_IMAGE,
        &format!("berth/{}:1", s.berth.device_id().to_lowercase()),
    );
    // On the device as a pull leaves it, then the registry goes away.
    docker(&["rmi", &image]);
    registry.pull(&image);
    registry.stop();
    s.berth.write_deployment(
        "boot",
        &pull_always(
            &deployment_toml("boot", &restart_policy("always"), &image, UNTIL_SIGTERM),
            &image,
        ),
    );
    s.berth.start();
    let said = s.wait("boot", |d| {
        exe(d)["reason"]
            .as_str()
            .is_some_and(|r| r.contains("running the image present on the device"))
    });
    assert_eq!(exe(&said)["status"], "Pending");
    let reason = exe(&said)["reason"].as_str().unwrap();
    assert!(reason.contains("pull failed"), "{reason}");
    let doc = s.wait("boot", |d| d["status"] == "Running");
    assert_eq!(exe(&doc)["image"], image.as_str());
    let container = exe(&doc)["container_id"].as_str().unwrap();
    assert_eq!(container_state(container)["Running"], true);
}

/// A pull that cannot fit, with the real engine and registry: `min_free_mb`
/// above the data root's free space, so a collection (which finds nothing
/// of berth's to remove) leaves it short, and the pull of an image absent
/// from the device never starts.
#[test]
fn a_pull_that_cannot_fit_is_dep_e305_and_pulls_nothing() {
    let registry = Registry::new();
    let mut s = Harness::new("nofit", |c| c);
    let image = registry.push(
        TEST_IMAGE,
        &format!("berth/{}:1", s.berth.device_id().to_lowercase()),
    );
    // Only in the registry now.
    docker(&["rmi", &image]);
    let present = || try_docker(&["image", "inspect", &image]).is_ok();
    assert!(!present());
    // A petabyte: more than any test machine's data root holds.
    let config = std::fs::read_to_string(s.berth.config_path()).unwrap();
    s.berth
        .write_raw_config(&format!("{config}\n[images]\nmin_free_mb = 1000000000\n"));
    s.berth.write_deployment(
        "big",
        &pull_always(
            &deployment_toml("big", &restart_policy("always"), &image, UNTIL_SIGTERM),
            &image,
        ),
    );
    s.berth.start();
    let doc = s.wait("big", |d| d["status"] == "Error");
    assert_eq!(doc["error_code"], "DEP_E305", "{doc}");
    assert_eq!(exe(&doc)["error_code"], "DEP_E305", "{doc}");
    let reason = exe(&doc)["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("no room to pull image {image}: ")),
        "{reason}"
    );
    assert!(
        reason.contains("[images] min_free_mb is 1000000000"),
        "{reason}"
    );
    let error = event(&s, |e| e["event"] == "error" && e["deployment"] == "big");
    assert_eq!(error["error_code"], "DEP_E305");
    assert!(!present(), "the image was not pulled");
    assert!(
        containers(s.berth.device_id()).is_empty(),
        "no container was created"
    );
}

/// Builds a distinct image from the test image (a label of its own), so
/// that each version has its own id.
fn build_version(tag: &str, version: u32) {
    let dockerfile = format!("FROM {TEST_IMAGE}\nLABEL berth.test.version={version}\n");
    let mut child = std::process::Command::new("docker")
        .args(["build", "-q", "-t", tag, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker build");
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dockerfile.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "docker build {tag}");
}

/// Three versions pulled over time (an update each): a collection removes
/// the unused versions berth pulled, and keeps the one that runs and an
/// image berth did not pull. The data root's fullness is simulated with
/// `gc_high_percent = 1`, so every metrics reading collects.
#[test]
fn collection_removes_only_unused_images_berth_pulled() {
    let registry = Registry::new();
    let mut s = Harness::new("gc", |c| c);
    let repo = s.berth.device_id().to_lowercase();
    let local = |v: u32| format!("berth-test/{repo}:v{v}");
    struct Cleanup(Vec<String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for image in &self.0 {
                let _ = try_docker(&["rmi", image]);
            }
        }
    }
    let mut cleanup = Cleanup(Vec::new());
    let mut pushed = Vec::new();
    for v in 1..=3 {
        build_version(&local(v), v);
        cleanup.0.push(local(v));
        let reference = registry.push(&local(v), &format!("berth/{repo}:v{v}"));
        cleanup.0.push(reference.clone());
        // Only in the registry now: berth pulls it, under that name alone.
        docker(&["rmi", &reference, &local(v)]);
        pushed.push(reference);
    }
    // Not berth's: present on the device, never pulled by berth.
    let foreign = format!("berth-test/{repo}-foreign:1");
    build_version(&foreign, 9);
    cleanup.0.push(foreign.clone());

    let config = std::fs::read_to_string(s.berth.config_path()).unwrap();
    s.berth.write_raw_config(&format!(
        "{config}\n[metrics]\ninterval_secs = 1\n\
         \n[images]\nmin_free_mb = 0\ngc_high_percent = 1\ngc_low_percent = 0\n"
    ));
    s.berth.start();
    for (i, image) in pushed.iter().enumerate() {
        let file = deployment_toml(
            "app",
            &format!("{}\n[update]\nmin_ready_secs = 1", restart_policy("always")),
            image,
            UNTIL_SIGTERM,
        )
        .replace("1.2.3", &format!("1.{i}.0"));
        s.berth.write_deployment("app", &file);
        s.wait("app", |d| {
            d["phase"] == "Succeeded"
                && d["status"] == "Running"
                && exe(d)["image"] == image.as_str()
        });
    }
    let present = |image: &str| try_docker(&["image", "inspect", image]).is_ok();
    assert!(
        wait_until(WAIT, || !present(&pushed[0]) && !present(&pushed[1])),
        "the unused versions berth pulled are removed; berth's log:\n{}",
        s.berth
            .stdout()
            .lines()
            .chain(s.berth.stderr().lines())
            .filter(|l| l.contains("image") || l.contains("collect"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(present(&pushed[2]), "the version that runs stays");
    assert!(present(&foreign), "an image berth did not pull stays");
    assert!(present(TEST_IMAGE));
}
