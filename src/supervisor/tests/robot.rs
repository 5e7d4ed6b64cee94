//! Robot realities through the loop, with the fake engine: liveness probes
//! (the engine's health events and berth's own tcp probe), the evidence an
//! exit carries, the metrics topic, pull progress, offline `pull = "always"`
//! and image collection.

use super::*;

pub(super) fn with_probe(
    mut spec: DeploymentSpec,
    check: crate::model::ProbeCheck,
) -> DeploymentSpec {
    spec.components[0].executables[0].probe = Some(crate::model::Probe {
        check,
        initial_delay_secs: 0,
        period_secs: 1,
        timeout_secs: 1,
        failure_threshold: 2,
    });
    spec
}

fn events_named(h: &Harness, name: &str) -> Vec<Value> {
    h.events()
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

/// SPEC 6, the unhealthy row: the engine's healthcheck (an exec probe) says
/// unhealthy; berth stops the container itself and restarts it, counted,
/// and its own stop is not a manual stop.
#[tokio::test]
async fn an_unhealthy_exec_probe_is_a_counted_restart_not_a_manual_stop() {
    let dir = tempfile::tempdir().unwrap();
    let spec = with_probe(
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
        crate::model::ProbeCheck::Exec(vec!["true".into()]),
    );
    let h = Harness::start(fake(), dir.path(), spec);
    let doc = h.running(0).await;
    assert_eq!(exe(&doc)["health"], "starting");
    assert!(h.runtime.spec(NAME).unwrap().healthcheck.is_some());
    h.runtime.set_health(NAME, true);
    h.wait_for("healthy", |d| exe(d)["health"] == "healthy")
        .await;

    h.runtime.set_health(NAME, false);
    let doc = h.running(1).await;
    assert_eq!(exe(&doc)["health"], "starting", "a new run, no verdict yet");
    tokio::time::sleep(QUIET).await;
    let restarts = events_named(&h, "restart");
    assert_eq!(restarts.len(), 1, "{restarts:?}");
    assert_eq!(
        restarts[0]["reason"],
        "restarting after unhealthy: exec probe failed 2 times in a row"
    );
    assert_eq!(restarts[0]["restart_count"], 1);
    assert!(
        events_named(&h, "manual_stop").is_empty(),
        "{:?}",
        h.events()
    );
    let calls = h.runtime.calls();
    let stop = calls.iter().position(|c| matches!(c, Call::Stop(_)));
    let second_start = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c, Call::Start(_)))
        .nth(1)
        .map(|(i, _)| i);
    assert!(
        stop.is_some() && stop < second_start,
        "berth stops it before starting it again: {calls:?}"
    );
    assert_eq!(h.starts(), 2);
    assert!(h.runtime.container(NAME).unwrap().running);
    h.shutdown().await;
}

#[tokio::test]
async fn an_unhealthy_executable_under_never_is_an_error_left_running() {
    let dir = tempfile::tempdir().unwrap();
    let spec = with_probe(
        deployment(RestartPolicy::Never, PullPolicy::IfNotPresent, "talker"),
        crate::model::ProbeCheck::Exec(vec!["true".into()]),
    );
    let h = Harness::start(fake(), dir.path(), spec);
    h.running(0).await;
    h.runtime.set_health(NAME, false);
    let doc = h.wait_for("Error", |d| exe(d)["status"] == "Error").await;
    assert_eq!(exe(&doc)["error_code"], "DEP_E152");
    assert_eq!(exe(&doc)["health"], "unhealthy");
    assert_eq!(
        exe(&doc)["reason"],
        "unhealthy: exec probe failed 2 times in a row; restart policy never"
    );
    tokio::time::sleep(QUIET).await;
    assert!(h.runtime.container(NAME).unwrap().running, "left running");
    assert_eq!(h.starts(), 1);
    assert_eq!(count(&h.runtime.calls(), |c| matches!(c, Call::Stop(_))), 0);
    let errors = events_named(&h, "error");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["error_code"], "DEP_E152");
    h.shutdown().await;
}

/// berth's own tcp probe, against a listener of the test's: healthy while
/// it accepts, a counted restart once it has refused `failure_threshold`
/// times in a row.
#[tokio::test]
async fn a_tcp_probe_is_run_by_berth_healthy_then_unhealthy() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let spec = with_probe(
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
        crate::model::ProbeCheck::Tcp(port),
    );
    let h = Harness::start(fake(), dir.path(), spec);
    h.running(0).await;
    assert!(
        h.runtime.spec(NAME).unwrap().healthcheck.is_none(),
        "berth runs tcp probes itself"
    );
    h.wait_for("healthy", |d| exe(d)["health"] == "healthy")
        .await;
    drop(listener);
    let doc = h.running(1).await;
    let restarts = events_named(&h, "restart");
    let reason = restarts[0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.starts_with("restarting after unhealthy: tcp probe failed 2 times in a row: "),
        "{reason}"
    );
    assert!(exe(&doc)["health"] == "starting" || exe(&doc)["health"] == "unhealthy");
    h.shutdown().await;
}

/// Every exit carries its evidence: the last lines, the signal, the OOM kill.
#[tokio::test]
async fn exits_carry_their_evidence_in_their_events() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(
        fake(),
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
    );
    h.running(0).await;
    for line in ["starting", "lost the map", "giving up"] {
        h.runtime.write_log(NAME, line);
    }
    h.runtime.exit(NAME, 3);
    h.running(1).await;
    let restart = h.wait_event("restart", |e| e["event"] == "restart").await;
    assert_eq!(restart["exit_code"], 3);
    assert_eq!(restart["oom_killed"], false);
    assert_eq!(restart.get("signal"), None, "no signal for exit 3");
    let tail = restart["log_tail"].as_array().unwrap();
    assert_eq!(tail.last().unwrap(), "giving up");
    assert!(tail.iter().any(|l| l == "lost the map"));

    // A second exit is restarted after a back-off: its event, made then,
    // still carries the tail read right after the exit.
    h.runtime.write_log(NAME, "lost it again");
    h.runtime.exit(NAME, 5);
    h.running(2).await;
    let restart = h
        .wait_event("second restart", |e| {
            e["event"] == "restart" && e["exit_code"] == 5
        })
        .await;
    assert_eq!(
        restart["log_tail"].as_array().unwrap().last().unwrap(),
        "lost it again",
        "{restart}"
    );

    h.runtime.manual_kill(NAME);
    h.wait_for("stopped by hand", |d| exe(d)["status"] == "Stopped")
        .await;
    let stop = h
        .wait_event("manual_stop", |e| e["event"] == "manual_stop")
        .await;
    assert_eq!(stop["signal"], "SIGKILL");
    assert_eq!(stop["exit_code"], 137);
    h.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let h = Harness::start(
        fake(),
        dir.path(),
        deployment(RestartPolicy::Never, PullPolicy::IfNotPresent, "talker"),
    );
    h.running(0).await;
    h.runtime.oom_kill(NAME);
    h.wait_for("Error", |d| exe(d)["status"] == "Error").await;
    let error = h.wait_event("error", |e| e["event"] == "error").await;
    assert_eq!(error["oom_killed"], true);
    assert_eq!(error["signal"], "SIGKILL");
    assert_eq!(error["exit_code"], 137);
    h.shutdown().await;
}

/// An exit is restarted without waiting for its log tail: the restart is
/// started at once, and its events wait for the tail (at most 250 ms) so
/// that they carry it, in order.
#[tokio::test(start_paused = true)]
async fn a_restart_does_not_wait_for_the_log_tail_its_event_does() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let h = Harness::start(
        runtime.clone(),
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
    );
    h.running(0).await;
    runtime.fault_times(
        Method::LogTail,
        None,
        Fault::Delay(Duration::from_millis(100)),
        1,
    );
    runtime.write_log(NAME, "last words");
    let exited = Instant::now();
    runtime.exit(NAME, 3);
    h.running(1).await;
    assert!(
        exited.elapsed() < Duration::from_millis(100),
        "started before the tail is read"
    );
    assert!(
        events_named(&h, "restart").is_empty(),
        "the event waits for the tail"
    );
    let restart = h.wait_event("restart", |e| e["event"] == "restart").await;
    // Polled every 5 ms of paused time: it went out when the tail came.
    let waited = exited.elapsed();
    assert!(
        waited >= Duration::from_millis(100) && waited <= Duration::from_millis(105),
        "{waited:?}"
    );
    assert_eq!(restart["log_tail"], serde_json::json!(["last words"]));
    // The engine is asked for the tail once the restart's start is answered.
    let calls = runtime.calls();
    let tail_read = calls.iter().position(|c| matches!(c, Call::LogTail(_)));
    let restart_start = calls.iter().rposition(|c| matches!(c, Call::Start(_)));
    assert!(tail_read > restart_start, "{calls:?}");
    let names: Vec<Value> = h
        .events()
        .iter()
        .map(|e| e["event"].clone())
        .filter(|name| name != "phase")
        .collect();
    assert_eq!(names, ["restart", "restarted"], "in order");

    // A tail that never comes: the events go out after 5 s without it.
    runtime.fault(Method::LogTail, None, Fault::Hang);
    let exited = Instant::now();
    runtime.exit(NAME, 4);
    h.running(2).await;
    let restart = h
        .wait_event("second restart", |e| {
            e["event"] == "restart" && e["exit_code"] == 4
        })
        .await;
    let waited = exited.elapsed();
    assert!(
        waited >= Duration::from_millis(5000) && waited <= Duration::from_millis(5005),
        "{waited:?}"
    );
    assert_eq!(restart["log_tail"], serde_json::json!([]));
    h.shutdown().await;
}

/// The `metrics` document every interval, in paused time: CPU in percent of
/// one core between two readings, memory, the data root, and availability
/// that drops once the executable is no longer `Running`.
#[tokio::test(start_paused = true)]
async fn metrics_go_out_every_interval_with_cpu_memory_disk_and_availability() {
    const EVERY: Duration = Duration::from_secs(10);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics.interval = Some(EVERY);
    let runtime = fake();
    runtime.set_disk(crate::runtime::DiskUsage {
        data_root: "/var/lib/docker".into(),
        total_bytes: 100 << 30,
        free_bytes: 40 << 30,
    });
    let h = Harness::start_with(
        runtime,
        dir.path(),
        vec![deployment(
            RestartPolicy::Never,
            PullPolicy::IfNotPresent,
            "talker",
        )],
        BOOT,
        cfg,
    );
    h.running(0).await;
    let stats = |cpu_secs: u64| crate::runtime::ContainerStats {
        cpu_usage_nanos: cpu_secs * 1_000_000_000,
        memory_bytes: 50 << 20,
        memory_limit_bytes: Some(256 << 20),
    };
    h.runtime.set_stats(NAME, stats(1));
    let metrics = |n: usize| {
        let h = &h;
        async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                let docs: Vec<Value> = h
                    .reporter
                    .published
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(t, _)| *t == Topic::Metrics)
                    .map(|(_, v)| v.clone())
                    .collect();
                if docs.len() >= n {
                    return docs[n - 1].clone();
                }
                assert!(Instant::now() < deadline, "no metrics document {n}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let first = metrics(1).await;
    assert_eq!(first["device_id"], DEVICE);
    assert_eq!(first["interval_secs"], 10);
    assert_eq!(first["data_root"]["size_bytes"], 100u64 << 30);
    assert_eq!(first["data_root"]["free_bytes"], 40u64 << 30);
    let m = &first["executables"][0];
    assert_eq!(m["executable"], "talker");
    assert_eq!(m["cpu_percent"], Value::Null, "one reading is no rate");
    assert_eq!(m["memory_bytes"], 50u64 << 20);
    assert_eq!(m["memory_limit_bytes"], 256u64 << 20);
    assert_eq!(m["restart_count"], 0);
    assert_eq!(m["health"], Value::Null, "no probe");

    // 5 s of CPU over a 10 s interval: half a core.
    h.runtime.set_stats(NAME, stats(6));
    let second = metrics(2).await;
    let m = &second["executables"][0];
    assert_eq!(m["cpu_percent"], 50.0);
    assert_eq!(m["availability"], 1.0);
    // Uptime runs on the engine's (wall) clock, which paused time does not move.
    assert!(m["uptime_secs"].is_u64(), "{m}");

    h.runtime.exit(NAME, 3);
    h.wait_for("Error", |d| exe(d)["status"] == "Error").await;
    let third = metrics(3).await;
    let fourth = metrics(4).await;
    let m = &fourth["executables"][0];
    assert_eq!(m["status"], "Error");
    assert_eq!(m["cpu_percent"], Value::Null);
    assert_eq!(m["uptime_secs"], Value::Null);
    let availability = m["availability"].as_f64().unwrap();
    assert!(
        availability < third["executables"][0]["availability"].as_f64().unwrap()
            && availability < 1.0,
        "availability drops: {third} {fourth}"
    );
    // Kept across berth restarts, in the state.
    let store = h.store.clone();
    h.shutdown().await;
    let record = store.load().unwrap().exec(&key()).cloned().unwrap();
    assert!(record.availability.share().unwrap() < 1.0);
}

/// SPEC 8: the pull's progress shows in the Pending reason.
#[tokio::test]
async fn pull_progress_shows_in_the_reason_and_the_image_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(FakeRuntime::new().with_registry_image_sized(IMAGE, 27_000_000));
    let h = Harness::start(
        runtime,
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
    );
    h.running(0).await;
    let mut reasons: Vec<String> = h
        .docs()
        .iter()
        .filter_map(|d| exe(d)["reason"].as_str().map(str::to_string))
        .filter(|r| r.starts_with(&format!("pulling image {IMAGE}: ")))
        .collect();
    reasons.dedup(); // other changes republish the document
    assert_eq!(
        reasons,
        vec![format!("pulling image {IMAGE}: 0% of 27 MB")],
        "one progress per 2 s at most"
    );
    let store = h.store.clone();
    h.shutdown().await;
    assert!(store.load().unwrap().pulled_images.contains(IMAGE));
}

/// `pull = "always"` with the registry out of reach and the image present:
/// the present image runs, and the reason said so.
#[tokio::test]
async fn pull_always_offline_runs_the_present_image() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(FakeRuntime::new().with_image(IMAGE));
    let h = Harness::start(
        runtime,
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::Always, "talker"),
    );
    h.running(0).await;
    assert!(h.runtime.calls().contains(&Call::Pull(IMAGE.into(), None)));
    assert!(
        h.docs().iter().any(|d| exe(d)["reason"]
            .as_str()
            .is_some_and(|r| r.ends_with("running the image present on the device"))),
        "the reason says so"
    );
    h.shutdown().await;
}

/// Before a pull with less than `min_free_mb` free: unused images berth
/// pulled go, others stay; a pull that still does not fit is DEP_E305.
#[tokio::test]
async fn a_pull_that_does_not_fit_collects_then_is_dep_e305() {
    const OLD: &str = "registry.example.com/talker:0.9";
    const FOREIGN: &str = "registry.example.com/someone-else:1";
    let dir = tempfile::tempdir().unwrap();
    let store = StateStore::open(dir.path()).unwrap();
    let mut state = store.load().unwrap();
    state.pulled_images.insert(OLD.into());
    store.save(&state).unwrap();
    let runtime = Arc::new(
        FakeRuntime::new()
            .with_image(OLD)
            .with_image(FOREIGN)
            .with_registry_image(IMAGE),
    );
    runtime.set_disk(crate::runtime::DiskUsage {
        data_root: "/var/lib/docker".into(),
        total_bytes: 10 << 30,
        free_bytes: 100 << 20,
    });
    let h = Harness::start(
        runtime,
        dir.path(),
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
    );
    let doc = h
        .wait_for("DEP_E305", |d| exe(d)["error_code"] == "DEP_E305")
        .await;
    assert_eq!(exe(&doc)["status"], "Error");
    let reason = exe(&doc)["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("no room to pull image {IMAGE}: 100 MB free")),
        "{reason}"
    );
    let calls = h.runtime.calls();
    assert!(calls.contains(&Call::RemoveImage(OLD.into())), "{calls:?}");
    assert!(
        !calls.contains(&Call::RemoveImage(FOREIGN.into())),
        "not berth's"
    );
    assert!(!calls.contains(&Call::Pull(IMAGE.into(), None)), "no pull");
    let error = events_named(&h, "error").pop().unwrap();
    assert_eq!(error["error_code"], "DEP_E305");
    let store = h.store.clone();
    h.shutdown().await;
    assert!(!store.load().unwrap().pulled_images.contains(OLD));
}

/// berth restarted while a container runs: the reconcile adopts it, and
/// berth's own probe watches it again.
#[tokio::test]
async fn an_adopted_container_is_probed_again() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let spec = with_probe(
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
        crate::model::ProbeCheck::Tcp(port),
    );
    let runtime = fake();
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.wait_for("healthy", |d| exe(d)["health"] == "healthy")
        .await;
    h.shutdown().await;

    let h = Harness::start(runtime, dir.path(), spec);
    h.wait_for("healthy again", |d| exe(d)["health"] == "healthy")
        .await;
    assert_eq!(h.starts(), 1, "adopted, not restarted");
    drop(listener);
    h.running(1).await;
    h.shutdown().await;
}

/// A collection that is due but has nothing berth pulled to remove does not
/// read the engine's lists of images and containers (megabytes of transient
/// heap on a busy engine, every metrics interval while the disk stays full);
/// once an image berth pulled is no longer protected, it reads them and
/// removes it.
#[tokio::test]
async fn a_due_collection_with_nothing_removable_lists_nothing() {
    const OLD: &str = "registry.example.com/talker:0.9";
    let runtime = FakeRuntime::new().with_image(OLD);
    runtime.set_disk(crate::runtime::DiskUsage {
        data_root: "/var/lib/docker".into(),
        total_bytes: 10 << 30,
        free_bytes: 1 << 30,
    });
    let mut hk = launch::Housekeeping {
        settings: crate::config::ImageSettings::default(),
        pulled: std::collections::BTreeSet::from([OLD.to_string()]),
        protected: std::collections::BTreeSet::from([OLD.to_string()]),
    };
    let mut removed = Vec::new();
    let usage = launch::collect_images(&runtime, &hk, false, &mut removed)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(usage.used_percent(), 90, "a collection is due");
    assert!(removed.is_empty());
    let calls = runtime.calls();
    assert!(!calls.contains(&Call::ListImages), "{calls:?}");

    hk.protected.clear();
    launch::collect_images(&runtime, &hk, false, &mut removed)
        .await
        .unwrap();
    assert_eq!(removed, vec![OLD.to_string()]);
    assert!(runtime.calls().contains(&Call::ListImages));
}
