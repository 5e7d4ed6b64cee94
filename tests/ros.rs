//! The shared ROS master (SPEC 6), end to end: started before the first ROS
//! deployment's executables, the first deployment's policy kept whatever
//! later ones say, removed after the last one, and the manual-stop exception.
//! The master is a stand-in built from the test image (`[ros]` in the config).

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The ROS side of the harness: the shared master and ROS deployments.
impl Harness {
    fn master(&self, predicate: impl Fn(&Value) -> bool) -> Value {
        self.sub
            .wait_for(&self.berth.topic("shared/ros-master"), predicate, WAIT)
    }

    fn master_container(&self) -> Option<Value> {
        container(&format!("berth.{}.ros-master", self.berth.device_id()))
    }

    fn add_ros(&self, id: &str, policy: &str) {
        self.berth.write_deployment(
            id,
            &deployment_toml(
                id,
                &format!("{}\nros = true", restart_policy(policy)),
                TEST_IMAGE,
                LONG_RUNNING,
            ),
        );
    }
}

fn started_at(c: &Value) -> std::time::SystemTime {
    humantime::parse_rfc3339(c["State"]["StartedAt"].as_str().unwrap()).unwrap()
}

/// (first, its policy, second, its policy): the master keeps the first's.
#[test]
fn the_first_ros_deployment_sets_the_master_policy_in_either_order() {
    for (first, first_policy, second, second_policy) in [
        ("talker", "always", "listener", "never"),
        ("listener", "never", "talker", "always"),
    ] {
        let mut s = Harness::new("rosorder", |c| c.backoff(100, 1, 30));
        s.berth.start();
        s.add_ros(first, first_policy);
        let doc = s.master(|d| d["status"] == "Running");
        assert_eq!(doc["policy"], first_policy);
        assert_eq!(doc["owner"], first);
        s.wait(first, |d| d["status"] == "Running");
        let master = s.master_container().expect("the master container");
        let node = containers(s.berth.device_id())
            .into_iter()
            .find(|c| c["Config"]["Labels"]["berth.deployment"] == first)
            .unwrap();
        assert!(
            started_at(&master) < started_at(&node),
            "the master starts first"
        );
        let env = env_of(&node);
        assert!(
            env.contains(&"ROS_MASTER_URI=http://localhost:11311".to_owned()),
            "{env:?}"
        );

        s.add_ros(second, second_policy);
        s.wait(second, |d| d["status"] == "Running");
        let doc = s.master(|d| d["users"].as_array().is_some_and(|u| u.len() == 2));
        assert_eq!(
            doc["policy"], first_policy,
            "later deployments do not change it"
        );
        assert_eq!(doc["owner"], first);
        let masters = containers(s.berth.device_id())
            .into_iter()
            .filter(|c| c["Name"].as_str().unwrap().ends_with(".ros-master"))
            .count();
        assert_eq!(masters, 1, "one master for the device");
        s.berth.sigterm();
    }
}

#[test]
fn the_master_stays_until_the_last_ros_deployment_goes() {
    let mut s = Harness::new("roslife", |c| c.backoff(100, 1, 30));
    s.berth.start();
    s.add_ros("first", "on-failure");
    s.master(|d| d["status"] == "Running");
    s.add_ros("second", "never");
    s.wait("second", |d| d["status"] == "Running");
    let master_id = s.master_container().unwrap()["Id"].clone();

    // The first goes; the master stays, with the first's policy.
    s.berth.remove_deployment("first");
    s.wait("first", |d| d["phase"] == "DeploymentStopped");
    let doc = s.master(|d| d["users"] == serde_json::json!(["second"]));
    assert_eq!(doc["policy"], "on-failure");
    assert_eq!(doc["status"], "Running");
    assert_eq!(s.master_container().unwrap()["Id"], master_id);

    // Across a restart of berth too.
    s.berth.sigterm();
    s.sub.clear();
    s.berth.start();
    let doc = s.master(|d| d["status"] == "Running");
    assert_eq!(doc["policy"], "on-failure");
    assert_eq!(s.master_container().unwrap()["Id"], master_id);

    // The last goes: the master is removed.
    s.berth.remove_deployment("second");
    s.wait("second", |d| d["phase"] == "DeploymentStopped");
    s.master(|d| d["status"] == "Stopped");
    assert!(s.master_container().is_none(), "the master is removed");

    // The next ROS deployment is the first again.
    s.add_ros("third", "always");
    let doc = s.master(|d| d["status"] == "Running" && d["owner"] == "third");
    assert_eq!(doc["policy"], "always");
    assert_ne!(s.master_container().unwrap()["Id"], master_id);
    s.berth.sigterm();
}

#[test]
fn a_manual_stop_of_the_master_is_respected() {
    let mut s = Harness::new("rosstop", |c| c.backoff(100, 1, 30));
    s.berth.start();
    s.add_ros("node", "always");
    s.master(|d| d["status"] == "Running");
    s.wait("node", |d| d["status"] == "Running");
    let id = s.master_container().unwrap()["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    docker(&["stop", "-t", "1", &id]);
    let doc = s.master(|d| d["status"] == "Stopped");
    assert!(
        doc["reason"].as_str().unwrap().contains("stopped manually"),
        "{doc}"
    );
    // Not a wait for an outcome: a window in which a wrong restart would
    // show.
    std::thread::sleep(Duration::from_secs(2));
    let state = s.master_container().unwrap();
    assert_eq!(state["State"]["Running"], false, "not restarted");
    assert_eq!(s.master(|_| true)["restart_count"], 0);
    docker(&["start", &id]);
    s.master(|d| d["status"] == "Running");
    s.berth.sigterm();
}
