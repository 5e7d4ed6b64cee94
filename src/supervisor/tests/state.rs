//! The state record through the loop: a restart waits for its durable
//! record (`DEP_E302` while it cannot be written), and a corrupt state file
//! keeps its counts.

use super::*;

/// SPEC 5, `DEP_E302`: a restart whose record cannot be written (a full
/// disk since before the container started, so that not even its
/// reservation is on disk) waits, shown as `Error` with the reason, and goes
/// ahead once the record is on disk; counted once.
#[tokio::test]
async fn a_restart_waits_for_its_record_and_goes_ahead_once_written() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(fake(), dir.path(), spec);
    // Nothing of the supervisor has run yet (one thread): every write fails.
    h.store.fail_writes.store(true, SeqCst);
    h.running(0).await;
    h.runtime.exit(NAME, 3);
    let doc = h
        .wait_for("Error + DEP_E302", |d| {
            d["status"] == "Error" && d["error_code"] == "DEP_E302"
        })
        .await;
    let reason = exe(&doc)["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.starts_with("cannot write its restart record: ") && reason.contains("retrying in"),
        "{reason}"
    );
    assert_eq!(exe(&doc)["error_code"], "DEP_E302");
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 1, "no restart starts without its record");
    assert!(
        h.events()
            .iter()
            .any(|e| e["event"] == "error" && e["error_code"] == "DEP_E302"),
        "an error event: {:?}",
        h.events()
    );

    h.store.fail_writes.store(false, SeqCst);
    let doc = h.running(1).await;
    assert_eq!(exe(&doc)["error_code"], Value::Null);
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 2, "started once, once written");
    // On disk: the next run's reservation, one count up.
    reserved_on_disk(&h, 2).await;
    assert_eq!(
        h.store
            .load()
            .unwrap()
            .exec(&key())
            .unwrap()
            .restarts_done(),
        1,
        "counted once, on disk"
    );
    h.shutdown().await;
}

/// Waits until the record on disk (as a starting berth reads it) holds the
/// reservation of restart `count`.
async fn reserved_on_disk(h: &Harness, count: u64) {
    on_disk(h, &format!("a reservation of restart {count}"), |record| {
        let reserved = record
            .pending_restart
            .as_ref()
            .is_some_and(|p| p.reserved_for.is_some());
        reserved && record.restart_count == count
    })
    .await;
}

/// Waits until the record on disk (as a starting berth reads it) is `what`;
/// returns it.
async fn on_disk(h: &Harness, what: &str, pred: impl Fn(&ExecRecord) -> bool) -> ExecRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = h.store.recover().unwrap().state;
        let record = state.exec(&key()).cloned().unwrap_or_default();
        if pred(&record) {
            return record;
        }
        assert!(Instant::now() < deadline, "not {what} on disk: {record:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// berth runs the container until its reservation is on disk, then is
/// killed (its task aborted).
async fn killed_while_reserved(runtime: &Arc<FakeRuntime>, dir: &Path, spec: &DeploymentSpec) {
    let h = Harness::start(runtime.clone(), dir, spec.clone());
    h.running(0).await;
    reserved_on_disk(&h, 1).await;
    h.task.abort();
    let _ = h.task.await;
}

/// A running container's next restart is committed while it runs: its
/// exit is restarted without a write, even when the disk has failed since.
#[tokio::test]
async fn a_reserved_restart_goes_ahead_without_a_write() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(fake(), dir.path(), spec);
    h.running(0).await;
    reserved_on_disk(&h, 1).await;
    h.store.fail_writes.store(true, SeqCst);
    h.runtime.exit(NAME, 3);
    let doc = h.running(1).await;
    assert_eq!(exe(&doc)["error_code"], Value::Null);
    assert_eq!(h.starts(), 2);
    h.store.fail_writes.store(false, SeqCst);
    h.shutdown().await;
}

/// berth killed after a reserved restart was started, before anything
/// else reached the disk: the container has started since the reserved
/// run, so the restart happened and is counted, once; it is not restarted.
#[tokio::test]
async fn a_reserved_restart_that_happened_before_a_crash_is_counted_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.running(0).await;
    reserved_on_disk(&h, 1).await;
    // Nothing more reaches the disk: the next reservation, the snapshots.
    h.store.fail_writes.store(true, SeqCst);
    h.runtime.exit(NAME, 3);
    h.running(1).await;
    h.task.abort();
    let _ = h.task.await;
    h.store.fail_writes.store(false, SeqCst);
    assert_eq!(runtime.start_times(NAME).len(), 2);

    let h = Harness::start(runtime.clone(), dir.path(), spec);
    let doc = h.running(1).await;
    assert_eq!(exe(&doc)["restart_count"], 1);
    reserved_on_disk(&h, 2).await;
    assert_eq!(runtime.start_times(NAME).len(), 2, "adopted, not started");
    h.runtime.exit(NAME, 3);
    h.running(2).await;
    h.shutdown().await;
}

/// berth killed while the container runs on: the reservation on disk is
/// not a restart (the container has not started since), so nothing is
/// counted; its exit later is restarted and counted once.
#[tokio::test]
async fn a_reservation_without_a_restart_is_not_counted_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    killed_while_reserved(&runtime, dir.path(), &spec).await;

    let h = Harness::start(runtime.clone(), dir.path(), spec);
    h.running(0).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 1, "adopted, not started");
    h.runtime.exit(NAME, 3);
    let doc = h.running(1).await;
    assert_eq!(exe(&doc)["restart_count"], 1);
    h.shutdown().await;
}

/// A clean stop leaves no reservation: a container stopped and started by
/// hand while berth is away is not counted as berth's restart.
#[tokio::test]
async fn a_start_by_hand_while_berth_was_stopped_is_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.running(0).await;
    reserved_on_disk(&h, 1).await;
    h.shutdown().await;
    let record = StateStore::open(dir.path()).unwrap().load().unwrap();
    let record = record.exec(&key()).cloned().unwrap();
    assert_eq!((record.restart_count, record.pending_restart), (0, None));
    runtime.manual_stop(NAME);
    runtime.manual_start(NAME);

    let h = Harness::start(runtime.clone(), dir.path(), spec);
    let doc = h.running(0).await;
    assert_eq!(exe(&doc)["restart_count"], 0);
    reserved_on_disk(&h, 1).await;
    h.shutdown().await;
}

/// An unreadable `state.json` falls back to its previous copy and the
/// restart log: the counts stay, and a `DEP_E302` event says what happened.
#[tokio::test]
async fn a_corrupt_state_keeps_its_counts_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.running(0).await;
    for n in 1..=2 {
        h.runtime.exit(NAME, 3);
        h.running(n).await;
    }
    h.shutdown().await;
    std::fs::write(dir.path().join("state.json"), b"{ torn").unwrap();

    let h = Harness::start(runtime.clone(), dir.path(), spec);
    let doc = h.running(2).await;
    assert_eq!(exe(&doc)["restart_count"], 2);
    let events = h.events();
    let error = events
        .iter()
        .find(|e| e["event"] == "error" && e["error_code"] == "DEP_E302")
        .unwrap_or_else(|| panic!("a DEP_E302 event: {events:?}"));
    let reason = error["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("state.json"), "{reason}");
    assert!(dir.path().join("state.json.corrupt").exists());
    tokio::time::sleep(QUIET).await;
    assert_eq!(h.starts(), 3, "adopted, not restarted");
    h.shutdown().await;
}

/// Waits until the fake engine says the container no longer runs.
async fn stopped(runtime: &FakeRuntime) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while runtime.container(NAME).is_some_and(|c| c.running) {
        assert!(Instant::now() < deadline, "the container still runs");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An unhealthy restart stops its running container itself. berth killed
/// between that stop and the start must not take its own stop for a
/// manual one: the reservation does not stand for such a restart, its
/// commitment is on disk before the stop, and the next berth completes the
/// restart, counted once.
#[tokio::test]
async fn a_restart_that_stops_its_container_first_is_completed_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = super::robot::with_probe(
        deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker"),
        crate::model::ProbeCheck::Exec(vec!["true".into()]),
    );
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.running(0).await;
    reserved_on_disk(&h, 1).await;
    runtime.set_health(NAME, true);
    h.wait_for("healthy", |d| exe(d)["health"] == "healthy")
        .await;
    // berth's stop goes through; its start never answers.
    runtime.fault(Method::Start, Some(NAME), Fault::Hang);
    runtime.set_health(NAME, false);
    stopped(&runtime).await;
    h.task.abort();
    let _ = h.task.await;
    runtime.clear_faults();

    let h = Harness::start(runtime.clone(), dir.path(), spec);
    let doc = h.running(1).await;
    assert_eq!(exe(&doc)["restart_count"], 1);
    assert_eq!(runtime.start_times(NAME).len(), 2, "started once more");
    assert!(
        !h.events().iter().any(|e| e["event"] == "manual_stop"),
        "berth's own stop is no manual stop: {:?}",
        h.events()
    );
    h.shutdown().await;
}

/// A manual stop withdraws the reservation of the run it ended: berth
/// killed while the container is stopped, and the operator starting it by
/// hand meanwhile, is no restart of berth's.
#[tokio::test]
async fn a_manual_stop_withdraws_the_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
    h.running(0).await;
    reserved_on_disk(&h, 1).await;
    runtime.manual_stop(NAME);
    h.wait_for("Stopped", |d| exe(d)["status"] == "Stopped")
        .await;
    let record = on_disk(&h, "a manual stop", |r| r.manual_stop).await;
    assert_eq!((record.restart_count, record.pending_restart), (0, None));
    h.task.abort();
    let _ = h.task.await;
    runtime.manual_start(NAME);

    let h = Harness::start(runtime.clone(), dir.path(), spec);
    let doc = h.running(0).await;
    assert_eq!(
        exe(&doc)["restart_count"],
        0,
        "a start by hand is not counted"
    );
    h.shutdown().await;
}

/// A reservation read from disk and checked by the first reconcile is
/// berth's own from then on: after an engine restart, a start by hand made
/// before berth is back (the engine away meanwhile) is not taken for
/// berth's restart.
#[tokio::test]
async fn a_recovered_reservation_counts_a_start_only_at_the_first_reconcile() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = fake();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    killed_while_reserved(&runtime, dir.path(), &spec).await;

    let h = Harness::start(runtime.clone(), dir.path(), spec);
    h.running(0).await;
    runtime.set_down(true);
    h.wait_for("Unknown", |d| exe(d)["status"] == "Unknown")
        .await;
    runtime.restart_engine();
    runtime.manual_start(NAME);
    runtime.set_down(false);
    let doc = h.running(0).await;
    assert_eq!(
        exe(&doc)["restart_count"],
        0,
        "a start by hand is not counted"
    );
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        runtime.start_times(NAME).len(),
        1,
        "since the engine restart: the start by hand, none of berth's"
    );
    let doc = h.running(0).await;
    assert_eq!(exe(&doc)["restart_count"], 0);
    h.shutdown().await;
}
