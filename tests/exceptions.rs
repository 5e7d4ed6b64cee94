//! The exceptions of the restart table (SPEC 6) and durability, end to end
//! against the real engine and broker: manual stops while berth runs and
//! while it is down, hand starts, simulated reboots, and a kill -9 loop.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const MANUAL: &str = "stopped manually";

/// The seed of the kill -9 loop's random moments, to replay a run.
const KILL9_SEED_VAR: &str = "BERTH_TEST_KILL9_SEED";

/// The three ways of stopping by hand, each on its own deployment.
const HAND_STOPS: [(&str, &[&str]); 3] = [
    ("by-stop", &["stop", "-t", "1"]),
    ("by-kill", &["kill"]),
    ("by-rm", &["rm", "-f"]),
];

fn assert_stopped_and_left_alone(s: &Harness, id: &str, container: &str) {
    let doc = s.wait(id, |d| d["status"] == "Stopped");
    let reason = exe(&doc)["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(MANUAL), "{id}: {doc}");
    assert_eq!(doc["restart_count"], 0, "{id}: {doc}");
    // Not a wait for an outcome: a window in which a wrong restart would
    // show.
    std::thread::sleep(Duration::from_secs(2));
    if id != "by-rm" {
        assert_eq!(s.events.starts(container), 1, "{id}: not restarted");
        let c = container_state(container);
        assert_eq!(c["Running"], false, "{id}");
    } else {
        assert!(
            try_docker(&["inspect", container]).is_err(),
            "{id}: not recreated"
        );
        assert!(containers(s.berth.device_id())
            .iter()
            .all(|c| c["Config"]["Labels"]["berth.deployment"] != "by-rm"));
    }
    let latest = s.wait(id, |_| true);
    assert_eq!(latest["status"], "Stopped", "{id} stays stopped: {latest}");
}

/// A hand `docker start` after a manual stop: Running again, not counted, and
/// the policy applies again (a crash is restarted and counted).
fn assert_hand_start_resumes_policy(s: &Harness, id: &str, container: &str) {
    docker(&["start", container]);
    let doc = s.wait(id, |d| d["status"] == "Running");
    assert_eq!(
        doc["restart_count"], 0,
        "a hand start is not counted: {doc}"
    );
    crash(container);
    let doc = s.wait(id, |d| d["restart_count"] == 1 && d["status"] == "Running");
    assert_eq!(exe(&doc)["container_id"], container);
}

#[test]
fn row_stopped_killed_or_removed_by_hand_while_berth_runs() {
    let mut s = Harness::new("hand", |c| c.backoff(100, 1, 30));
    for (id, _) in HAND_STOPS {
        s.berth.write_deployment(
            id,
            &deployment_toml(id, &restart_policy("always"), TEST_IMAGE, LONG_RUNNING),
        );
    }
    s.berth.start();
    let mut ids = BTreeMap::new();
    for (id, args) in HAND_STOPS {
        s.wait(id, |d| d["status"] == "Running");
        let container = s.container_id(id);
        let mut cmd = args.to_vec();
        cmd.push(&container);
        docker(&cmd);
        ids.insert(id, container);
    }
    for (id, _) in HAND_STOPS {
        assert_stopped_and_left_alone(&s, id, &ids[id]);
    }
    let events = s.sub.messages_on(&s.berth.topic("events"));
    for (id, _) in HAND_STOPS {
        assert!(
            events
                .iter()
                .any(|m| m.payload["event"] == "manual_stop" && m.payload["deployment"] == id),
            "{id}: a manual_stop event"
        );
    }
    for (id, _) in &HAND_STOPS[..2] {
        assert_hand_start_resumes_policy(&s, id, &ids[id]);
    }
    s.berth.sigterm();
}

#[test]
fn row_stopped_killed_or_removed_by_hand_while_berth_is_down() {
    let mut s = Harness::new("handdown", |c| c.backoff(100, 1, 30));
    for (id, _) in HAND_STOPS {
        s.berth.write_deployment(
            id,
            &deployment_toml(id, &restart_policy("on-failure"), TEST_IMAGE, LONG_RUNNING),
        );
    }
    s.berth.start();
    let mut ids = BTreeMap::new();
    for (id, _) in HAND_STOPS {
        s.wait(id, |d| d["status"] == "Running");
        ids.insert(id, s.container_id(id));
    }
    // berth saves its event position at least every 2 s: once the saved one
    // covers the last start, stop it.
    let last_start = ids
        .values()
        .flat_map(|id| s.events.history(id, 0))
        .filter(|(action, _)| action == "start")
        .map(|(_, nanos)| nanos)
        .max()
        .expect("the engine started the containers");
    s.wait_saved("an event position covering the last start", |state| {
        state["event_position"]
            .as_i64()
            .is_some_and(|p| i128::from(p) >= last_start)
    });
    s.berth.sigterm();
    for (id, args) in HAND_STOPS {
        let mut cmd = args.to_vec();
        cmd.push(&ids[id]);
        docker(&cmd);
    }
    s.sub.clear();
    s.berth.start();
    for (id, _) in HAND_STOPS {
        assert_stopped_and_left_alone(&s, id, &ids[id]);
    }
    // A hand start while berth is down is seen at its next start.
    s.berth.sigterm();
    docker(&["start", &ids["by-stop"]]);
    s.sub.clear();
    s.berth.start();
    let doc = s.wait("by-stop", |d| d["status"] == "Running");
    assert_eq!(doc["restart_count"], 0);
    assert_hand_start_resumes_policy(&s, "by-kill", &ids["by-kill"]);
    s.berth.sigterm();
}

/// A crash while berth is down is a crash, not a manual stop: it is restarted
/// at berth's next start and counted.
#[test]
fn crash_while_berth_is_down_is_restarted() {
    let mut s = Harness::new("crashdown", |c| c.backoff(100, 1, 30));
    s.berth.write_deployment(
        "c",
        &deployment_toml("c", &restart_policy("on-failure"), TEST_IMAGE, LONG_RUNNING),
    );
    s.berth.start();
    s.wait("c", |d| d["status"] == "Running");
    let container = s.container_id("c");
    s.berth.sigterm();
    crash(&container);
    assert!(wait_until(WAIT, || container_state(&container)["Running"] == false));
    s.sub.clear();
    s.berth.start();
    let doc = s.wait("c", |d| d["restart_count"] == 1 && d["status"] == "Running");
    assert_eq!(exe(&doc)["container_id"], container.as_str());
    assert_eq!(s.events.starts(&container), 2);
    s.berth.sigterm();
}

/// A simulated reboot for each policy: berth stopped, the containers killed as
/// a power loss would, a new boot id, berth started.
#[test]
fn row_interrupted_by_a_device_reboot_and_row_had_exited_before_the_reboot() {
    let mut s = Harness::new("reboot", |c| c.backoff(100, 1, 30));
    // (deployment, policy, script, status before, status after, restarts after)
    let rows: [(&str, &str, &str, &str, &str, u64); 7] = [
        (
            "run-always",
            "always",
            LONG_RUNNING,
            "Running",
            "Running",
            1,
        ),
        (
            "run-onfail",
            "on-failure",
            LONG_RUNNING,
            "Running",
            "Running",
            1,
        ),
        ("run-never", "never", LONG_RUNNING, "Running", "Stopped", 0),
        (
            "done-onfail",
            "on-failure",
            "exit 0",
            "Completed",
            "Completed",
            0,
        ),
        ("done-never", "never", "exit 0", "Completed", "Completed", 0),
        ("failed-never", "never", "exit 3", "Error", "Error", 0),
        (
            "manual-always",
            "always",
            LONG_RUNNING,
            "Stopped",
            "Running",
            1,
        ),
    ];
    for (id, policy, script, ..) in rows {
        s.berth.write_deployment(
            id,
            &deployment_toml(id, &restart_policy(policy), TEST_IMAGE, script),
        );
    }
    s.berth.start();
    for (id, _, _, before, ..) in rows {
        if id == "manual-always" {
            s.wait(id, |d| d["status"] == "Running");
            docker(&["stop", "-t", "1", &s.container_id(id)]);
        }
        s.wait(id, |d| d["status"] == before);
    }
    // berth saves what it knows when it stops.
    s.berth.sigterm();
    for (id, ..) in rows {
        let c = s.container_id(id);
        if container_state(&c)["Running"] == true {
            docker(&["kill", &c]);
        }
    }
    s.berth.set_boot_id(&unique_id("newboot"));
    s.sub.clear();
    s.berth.start();
    for (id, _, _, _, after, restarts) in rows {
        let doc = s.wait(id, |d| {
            d["status"] == after && d["restart_count"] == restarts
        });
        if after == "Stopped" {
            let reason = exe(&doc)["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("interrupted"), "{id}: {doc}");
        }
    }
    // Not a wait for an outcome: a window in which a wrong second restart
    // would show.
    std::thread::sleep(Duration::from_secs(1));
    for (id, _, _, _, after, restarts) in rows {
        let doc = s.wait(id, |_| true);
        assert_eq!(doc["status"], after, "{id}: {doc}");
        assert_eq!(doc["restart_count"], restarts, "{id}: {doc}");
    }
    let state = s.saved_state();
    for record in state["executables"].as_object().unwrap().values() {
        assert_eq!(record["manual_stop"], false, "a reboot clears manual stops");
    }
    s.berth.sigterm();
}

/// kill -9 of berth at random moments while executables crash-loop: no
/// restart is lost or counted twice, and no container is duplicated.
#[test]
fn kill_9_loop_never_loses_or_doubles_a_count() {
    let mut s = Harness::new("kill9", |c| c.backoff(100, 1, 30));
    let loops = ["loop-a", "loop-b"];
    for id in loops {
        s.berth.write_deployment(
            id,
            &deployment_toml(
                id,
                &restart_policy("always"),
                TEST_IMAGE,
                "sleep 0.3; exit 1",
            ),
        );
    }
    // Replay a failed run with the seed it printed.
    let mut seed = match std::env::var(KILL9_SEED_VAR) {
        Ok(text) => text
            .parse::<u64>()
            .ok()
            .filter(|seed| *seed != 0)
            .unwrap_or_else(|| panic!("{KILL9_SEED_VAR}={text:?}: want a number above 0")),
        Err(_) => nanos_now() as u64 | 1,
    };
    eprintln!("kill -9 loop seed: {seed} (replay with {KILL9_SEED_VAR}={seed})");
    let mut random_ms = |lo: u64, hi: u64| {
        // xorshift: enough to scatter the kills.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        lo + seed % (hi - lo)
    };
    s.berth.start();
    for id in loops {
        s.wait(id, |d| exe(d)["container_id"].is_string());
    }
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(random_ms(100, 1500)));
        s.berth.kill9();
        s.berth.start();
    }
    // The last berth runs the loops a little before it is stopped.
    std::thread::sleep(Duration::from_secs(2));
    s.berth.sigterm();

    let cs = containers(s.berth.device_id());
    assert_eq!(cs.len(), loops.len(), "one container per executable");
    let state = s.saved_state();
    for id in loops {
        let c = cs
            .iter()
            .find(|c| c["Config"]["Labels"]["berth.deployment"] == id)
            .unwrap();
        let starts = s.events.starts(c["Id"].as_str().unwrap()) as u64;
        let record = &state["executables"][format!("{id}/main/app")];
        // A restart berth committed to (and counted) whose start had not
        // reached the engine when berth stopped: the next berth performs it
        // without counting it again.
        let committed_not_started = record["pending_restart"]["prev_started_at"]
            .as_str()
            .is_some_and(|prev| c["State"]["StartedAt"] == prev);
        assert_eq!(
            record["restart_count"].as_u64().unwrap(),
            starts - 1 + u64::from(committed_not_started),
            "{id}: restart_count against the engine's {starts} starts: {record}"
        );
        assert!(starts > 5, "{id}: the loop ran ({starts} starts)");
    }
}

/// "started again by hand (docker start) after such a stop": the policy
/// applies again, for each policy; the hand start itself is not counted.
#[test]
fn row_started_again_by_hand() {
    let mut s = Harness::new("handstart", |c| c.backoff(100, 1, 30));
    // (deployment, policy, after a crash: status, restarts)
    let rows = [
        ("h-always", "always", "Running", 1),
        ("h-onfail", "on-failure", "Running", 1),
        ("h-never", "never", "Error", 0),
    ];
    for (id, policy, ..) in rows {
        s.berth.write_deployment(
            id,
            &deployment_toml(id, &restart_policy(policy), TEST_IMAGE, LONG_RUNNING),
        );
    }
    s.berth.start();
    for (id, _, after, restarts) in rows {
        s.wait(id, |d| d["status"] == "Running");
        let container = s.container_id(id);
        docker(&["stop", "-t", "1", &container]);
        s.wait(id, |d| d["status"] == "Stopped");
        docker(&["start", &container]);
        let doc = s.wait(id, |d| d["status"] == "Running");
        assert_eq!(doc["restart_count"], 0, "{id}: a hand start is not counted");
        crash(&container);
        let doc = s.wait(id, |d| {
            d["status"] == after && d["restart_count"] == restarts && exe(d)["exit_code"] != 0
        });
        if after == "Error" {
            assert_eq!(doc["error_code"], "DEP_E152", "{id}: {doc}");
        }
    }
    s.berth.sigterm();
}

/// `docker kill -s HUP` that the process survives is no manual stop: its
/// later exit of its own is a crash, restarted under `always`.
#[test]
fn a_signal_the_process_survives_is_not_a_manual_stop() {
    let mut s = Harness::new("hup", |c| c.backoff(100, 1, 30));
    let script = format!("trap '' HUP; {LONG_RUNNING}");
    s.berth.write_deployment(
        "h",
        &deployment_toml("h", &restart_policy("always"), TEST_IMAGE, &script),
    );
    let t0 = nanos_now();
    s.berth.start();
    s.wait("h", |d| d["status"] == "Running");
    let container = s.container_id("h");
    docker(&["kill", "-s", "HUP", &container]);
    assert!(
        wait_until(WAIT, || s
            .events
            .history(&container, t0)
            .iter()
            .any(|(action, _)| action == "kill")),
        "the engine's kill event"
    );
    assert_eq!(container_state(&container)["Running"], true, "HUP survived");
    crash(&container);
    let doc = s.wait("h", |d| d["restart_count"] == 1 && d["status"] == "Running");
    assert_eq!(exe(&doc)["container_id"], container.as_str());
    assert_eq!(s.events.starts(&container), 2);
    s.berth.sigterm();
}
