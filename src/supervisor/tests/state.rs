//! The state record through the loop: a restart waits for its durable
//! record (`DEP_E302` while it cannot be written), and a corrupt state file
//! keeps its counts.

use super::*;

/// SPEC 5, `DEP_E302`: a restart whose record cannot be written (a full
/// disk) waits, shown as `Error` with the reason, and goes ahead once the
/// record is on disk; counted once.
#[tokio::test]
async fn a_restart_waits_for_its_record_and_goes_ahead_once_written() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
    let h = Harness::start(fake(), dir.path(), spec);
    h.running(0).await;
    h.store.fail_writes.store(true, SeqCst);
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
    assert_eq!(
        h.store.load().unwrap().exec(&key()).unwrap().restart_count,
        1,
        "counted once, on disk"
    );
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
