//! A restart of the Docker engine while berth runs (SPEC 6, "interrupted by a
//! restart of the Docker engine"). It runs on an engine of its own (own
//! socket, data root and exec root), so no other test sees it go away; the
//! nextest group `engine-restart` keeps it alone anyway.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Longer than `common::WAIT`: an engine takes a while to stop and start.
const WAIT: Duration = Duration::from_secs(60);

/// A dockerd of the test's own.
struct Engine {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Engine {
    fn start() -> Engine {
        let dir = tempfile::Builder::new()
            .prefix("berth-engine")
            .tempdir()
            .unwrap();
        let mut engine = Engine { dir, child: None };
        engine.up();
        // The test image, from the machine's engine.
        let mut save = Command::new("docker")
            .args(["save", TEST_IMAGE])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let status = Command::new("docker")
            .args(["-H", &engine.host(), "load"])
            .stdin(save.stdout.take().unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(save.wait().unwrap().success(), "docker save {TEST_IMAGE}");
        assert!(status.success(), "load the test image into the test engine");
        engine
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn host(&self) -> String {
        format!("unix://{}", self.path("docker.sock").display())
    }

    fn up(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("dockerd.log"))
            .unwrap();
        let child = Command::new("dockerd")
            .arg("--host")
            .arg(self.host())
            .arg("--data-root")
            .arg(self.path("root"))
            .arg("--exec-root")
            .arg(self.path("exec"))
            .arg("--pidfile")
            .arg(self.path("docker.pid"))
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd: run scripts/setup.sh");
        self.child = Some(child);
        let host = self.host();
        assert!(
            wait_until(Duration::from_secs(30), || Command::new("docker")
                .args(["-H", &host, "info"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())),
            "the test engine did not come up"
        );
    }

    /// A graceful engine shutdown: it stops its containers (SIGTERM).
    fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    fn docker(&self, args: &[&str]) -> String {
        let host = self.host();
        let mut all = vec!["-H", &host];
        all.extend_from_slice(args);
        docker(&all)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.child.is_some() {
            let ids = self.docker(&["ps", "-aq"]);
            for id in ids.split_whitespace() {
                let _ = self.docker(&["rm", "-f", id]);
            }
        }
        self.down();
        let _ = Command::new("umount")
            .arg(self.path("exec/netns/default"))
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn row_interrupted_by_an_engine_restart() {
    let mut engine = Engine::start();
    let device = unique_id("engine");
    let broker = Broker::new();
    let mut config = BerthConfig::new(&device, broker.port()).backoff(100, 1, 30);
    config.docker_host = engine.host();
    let mut berth = Berth::new(config);
    let sub = Subscriber::new(broker.port(), &format!("berth/{device}/#"));
    // (deployment, policy, script, before, after the engine restart, restarts)
    let rows = [
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
    ];
    for (id, policy, script, ..) in rows {
        berth.write_deployment(
            id,
            &deployment_toml(id, &restart_policy(policy), TEST_IMAGE, script),
        );
    }
    berth.start();
    let prefix = berth.topic("deployments/");
    let topic = |id: &str| format!("{prefix}{id}");
    for (id, _, _, before, ..) in rows {
        sub.wait_for(&topic(id), |d| d["status"] == before, WAIT);
    }

    engine.down();
    let agent = sub.wait_for(
        &berth.topic("agent"),
        |d| d["docker"] == "unreachable",
        WAIT,
    );
    assert_eq!(agent["state"], "online");
    assert_eq!(agent["error_code"], "DEP_E301");
    for (id, ..) in rows {
        let doc = sub.wait_for(&topic(id), |d| d["status"] == "Unknown", WAIT);
        assert_eq!(doc["error_code"], "DEP_E301", "{id}: {doc}");
    }
    assert!(berth.is_running(), "berth keeps running without the engine");

    engine.up();
    sub.wait_for(&berth.topic("agent"), |d| d["docker"] == "connected", WAIT);
    for (id, _, _, _, after, restarts) in rows {
        let doc = sub.wait_for(
            &topic(id),
            |d| d["status"] == after && d["restart_count"] == restarts,
            WAIT,
        );
        if after == "Stopped" {
            let reason = doc["executables"][0]["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains("interrupted"),
                "{id}: not a manual stop: {doc}"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    for (id, _, _, _, after, restarts) in rows {
        let doc: Value = sub.wait_for(&topic(id), |_| true, WAIT);
        assert_eq!(doc["status"], after, "{id}: {doc}");
        assert_eq!(doc["restart_count"], restarts, "{id}: {doc}");
    }
    berth.sigterm();
}
