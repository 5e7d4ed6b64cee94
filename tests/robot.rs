//! Robot realities end to end (issue "robot realities"), against the real
//! engine and broker: liveness probes restart or fail an executable, and an
//! exit's events carry its evidence (last log lines, OOM kill).

mod common;

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
