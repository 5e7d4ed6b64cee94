//! berth's state files end to end (SPEC 5, `DEP_E302`): a state directory
//! that cannot be written (`chattr +i`) during a crash loop holds the
//! restarts until it can, and a `state.json` that cannot be read falls back to
//! its previous copy and the restart log, with the counts intact and an
//! error event on MQTT. The counts always match the engine's starts.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::*;

/// A deployment that crashes after a second, `crashes` times, then runs
/// (its runs are counted in the container's own filesystem, which a
/// restart keeps).
fn crashing(id: &str, crashes: u32) -> String {
    let script = format!(
        "n=$(cat /runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > /runs; \
         if [ $n -le {crashes} ]; then sleep 1; exit 3; fi; {UNTIL_SIGTERM}"
    );
    pull_never(&deployment_toml(
        id,
        &restart_policy("always"),
        TEST_IMAGE,
        &script,
    ))
}

/// Makes `state_dir` and the files in it immutable, and mutable again when
/// dropped (a failed test leaves nothing that cannot be removed).
struct Immutable(PathBuf);

impl Immutable {
    fn set(dir: &Path) -> Immutable {
        let guard = Immutable(dir.to_path_buf());
        guard.chattr("+i");
        guard
    }

    fn chattr(&self, flag: &str) {
        let mut paths = vec![self.0.clone()];
        for entry in std::fs::read_dir(&self.0).expect("read state_dir") {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                paths.push(entry.path());
            }
        }
        let status = Command::new("chattr")
            .arg(flag)
            .args(&paths)
            .status()
            .expect("run chattr (e2fsprogs)");
        assert!(status.success(), "chattr {flag} {paths:?}: {status}");
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        self.chattr("-i");
    }
}

/// While the state cannot be
/// written, a crash-looping executable is not restarted (no restart without
/// its record), the document says why, and once the state directory is
/// writable again the restarts go on by themselves; every count matches the
/// engine's starts.
#[test]
fn a_state_dir_that_cannot_be_written_holds_restarts_until_it_can() {
    let mut s = Harness::new("rostate", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment("loop", &crashing("loop", 4));
    s.berth.start();
    s.wait("loop", |d| {
        d["status"] == "Running" && d["restart_count"] == 1
    });
    let container = s.container_id("loop");
    let immutable = Immutable::set(&s.berth.state_dir());

    let doc = s.wait("loop", |d| {
        d["status"] == "Error" && d["error_code"] == "DEP_E302"
    });
    let reason = exe(&doc)["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("cannot write its restart record"),
        "{doc}"
    );
    s.sub.wait_for_message(
        &s.berth.topic("events"),
        |e| e["event"] == "error" && e["error_code"] == "DEP_E302",
        WAIT,
    );
    // Held: the restart is counted (once) and not started while its record
    // cannot be written.
    let starts = s.events.starts(&container);
    let held = doc["restart_count"].as_u64().expect("a count");
    assert_eq!(held as usize, starts, "counted once, not started: {doc}");
    thread::sleep(Duration::from_secs(2));
    assert_eq!(s.events.starts(&container), starts, "still held");
    let latest = s.wait("loop", |_| true);
    assert_eq!(latest["restart_count"], held, "{latest}");

    drop(immutable);
    let doc = s.wait("loop", |d| {
        d["status"] == "Running" && d["restart_count"] == 4
    });
    // Runs for good now: the engine's starts are the count plus the first.
    thread::sleep(Duration::from_secs(2));
    let latest = s.wait("loop", |_| true);
    assert_eq!(latest["restart_count"], 4, "{latest}");
    assert_eq!(exe(&latest)["container_id"], exe(&doc)["container_id"]);
    assert_eq!(s.events.starts(&container), 5, "starts = count + 1");
    s.berth.sigterm();

    // The count is on disk: a new berth adopts the container with it.
    s.sub.clear();
    s.berth.start();
    let doc = s.wait("loop", |d| d["status"] == "Running");
    assert_eq!(doc["restart_count"], 4, "{doc}");
    s.berth.sigterm();
}

/// A `state.json` that cannot be read: the previous copy and the restart
/// log give the counts back, the file is kept aside, and a `DEP_E302` error
/// event reaches MQTT; the running container is adopted, not restarted.
#[test]
fn a_corrupt_state_file_keeps_its_counts_and_says_so() {
    let mut s = Harness::new("corrupt", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment("loop", &crashing("loop", 2));
    s.berth.start();
    s.wait("loop", |d| {
        d["status"] == "Running" && d["restart_count"] == 2
    });
    let container = s.container_id("loop");
    assert!(s.berth.sigterm().success());
    let state = s.berth.state_dir().join("state.json");
    std::fs::write(&state, b"{\"version\":1,\"executables\":{\"lo").unwrap();

    s.sub.clear();
    s.berth.start();
    let event = s.sub.wait_for(
        &s.berth.topic("events"),
        |e| e["event"] == "error" && e["error_code"] == "DEP_E302",
        WAIT,
    );
    let reason = event["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("state.json") && reason.contains("state.prev.json"),
        "{event}"
    );
    let doc = s.wait("loop", |d| d["status"] == "Running");
    assert_eq!(doc["restart_count"], 2, "{doc}");
    assert_eq!(exe(&doc)["container_id"], container.as_str());
    assert!(s.berth.state_dir().join("state.json.corrupt").exists());
    assert_eq!(s.events.starts(&container), 3, "adopted, not restarted");
    assert!(s.berth.sigterm().success());
}
