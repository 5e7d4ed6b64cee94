//! A restart of the Docker engine while berth runs (SPEC 6, "interrupted by a
//! restart of the Docker engine"). It runs on an engine of its own (own
//! socket, data root, exec root and network namespace), so no other test
//! sees it go away and the machine's engine keeps its networks; the nextest
//! group `engine-restart` keeps these tests alone anyway.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Longer than `common::WAIT`: an engine takes a while to stop and start.
const WAIT: Duration = Duration::from_secs(60);

/// How long the test's engine gets to answer after it is started, and to
/// exit after SIGTERM.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one `docker info` asking whether the engine is up may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The machine engine's default bridge, which a dockerd started with
/// `--bridge none` in the machine's network namespace deletes.
const HOST_BRIDGE: &str = "/sys/class/net/docker0";

/// A dockerd of the test's own, in a network namespace of its own
/// (`unshare --net`). moby deletes `docker0` when its bridge is disabled,
/// which in the machine's namespace would be the machine engine's bridge;
/// there it deletes nothing. The test reaches it through its unix socket,
/// which is a file and needs no network. Its containers' host network is
/// that namespace, with no interface up: nothing run there needs one.
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
        // Its own (empty) daemon.json: the machine's must not apply.
        std::fs::write(dir.path().join("daemon.json"), "{}\n").unwrap();
        let mut engine = Engine { dir, child: None };
        engine.up();
        engine
    }

    /// Copies the test image from the machine's engine.
    fn load_test_image(&self) {
        let mut save = Command::new("docker")
            .args(["save", TEST_IMAGE])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let status = Command::new("docker")
            .args(["-H", &self.host(), "load"])
            .stdin(save.stdout.take().unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(save.wait().unwrap().success(), "docker save {TEST_IMAGE}");
        assert!(status.success(), "load the test image into the test engine");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn host(&self) -> String {
        format!("unix://{}", self.path("docker.sock").display())
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.path("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn up(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("dockerd.log"))
            .unwrap();
        let p = |name: &str| self.path(name);
        // unshare execs dockerd: the child's pid is dockerd's.
        let child = Command::new("unshare")
            .args(["--net", "--", "dockerd", "--host"])
            .arg(self.host())
            .arg("--config-file")
            .arg(p("daemon.json"))
            .arg("--data-root")
            .arg(p("root"))
            .arg("--exec-root")
            .arg(p("exec"))
            .arg("--pidfile")
            .arg(p("docker.pid"))
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare and dockerd: run scripts/setup.sh");
        self.child = Some(child);
        let host = self.host();
        let deadline = Instant::now() + ENGINE_TIMEOUT;
        loop {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().unwrap());
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "the test engine exited before answering ({status}); its log:\n{}",
                    self.log()
                );
            }
            if docker_within(&host, &["info"], PROBE_TIMEOUT).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                self.down();
                panic!(
                    "the test engine did not answer on {host} within {ENGINE_TIMEOUT:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A graceful engine shutdown: it stops its containers (SIGTERM). One
    /// that has not exited after `ENGINE_TIMEOUT` is killed; returns
    /// whether it exited by itself.
    fn down(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if wait_exit(&mut child, ENGINE_TIMEOUT).is_some() {
            return true;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Ok(ids) = docker_within(&self.host(), &["ps", "-aq"], PROBE_TIMEOUT) {
                for id in ids.split_whitespace() {
                    let _ = docker_within(&self.host(), &["rm", "-f", id], WAIT);
                }
            }
        }
        if !self.down() {
            eprintln!(
                "the test engine did not stop within {ENGINE_TIMEOUT:?} and was killed; its log:\n{}",
                self.log()
            );
        }
        // dockerd bind-mounts its network namespace here.
        let _ = Command::new("umount")
            .arg(self.path("exec/netns/default"))
            .stderr(Stdio::null())
            .status();
    }
}

/// `docker -H host args`, given at most `timeout`: an engine that accepts
/// connections but never answers must not hang the test.
fn docker_within(host: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let out = tempfile::tempfile().unwrap();
    let mut child = Command::new("docker")
        .args(["-H", host])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker: run scripts/setup.sh");
    match wait_exit(&mut child, timeout) {
        Some(status) if status.success() => {
            use std::io::{Read, Seek};
            let mut out = out;
            let mut text = String::new();
            out.rewind().unwrap();
            out.read_to_string(&mut text).unwrap();
            Ok(text)
        }
        Some(status) => Err(format!("docker {args:?}: {status}")),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("docker {args:?}: no answer within {timeout:?}"))
        }
    }
}

fn host_bridge_exists() -> bool {
    Path::new(HOST_BRIDGE).exists()
}

/// The machine engine's default bridge outlives a second engine started and
/// stopped beside it, and still carries containers.
#[test]
fn a_second_engine_leaves_the_host_bridge_alone() {
    assert!(
        host_bridge_exists(),
        "the machine's engine has no docker0 before the test: its default bridge is \
         disabled, or was deleted (as a dockerd started with --bridge none outside a \
         network namespace of its own does); a restart of the engine makes it again"
    );
    let mut engine = Engine::start();
    assert!(
        host_bridge_exists(),
        "docker0 is gone once the second engine is up"
    );
    assert!(engine.down(), "the second engine stops on SIGTERM");
    engine.up();
    drop(engine);
    assert!(
        host_bridge_exists(),
        "docker0 is gone after the second engine stopped"
    );
    let name = unique_id("bridge");
    let out = try_docker(&[
        "run",
        "--rm",
        "--name",
        &name,
        "--network",
        "bridge",
        TEST_IMAGE,
        "true",
    ]);
    assert!(
        out.is_ok(),
        "a container on the machine's default bridge: {out:?}"
    );
}

#[test]
fn row_interrupted_by_an_engine_restart() {
    let mut engine = Engine::start();
    engine.load_test_image();
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

    assert!(engine.down(), "the test engine stops on SIGTERM");
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
    // Not a wait for an outcome: a window in which a wrong second restart
    // would show.
    std::thread::sleep(Duration::from_secs(1));
    for (id, _, _, _, after, restarts) in rows {
        let doc: Value = sub.wait_for(&topic(id), |_| true, WAIT);
        assert_eq!(doc["status"], after, "{id}: {doc}");
        assert_eq!(doc["restart_count"], restarts, "{id}: {doc}");
    }
    berth.sigterm();
}

/// A real `docker stop` well before an engine restart stays a manual stop:
/// only the kills the engine's own shutdown sends (within its shutdown
/// timeout of the stream's end) count as an interruption.
#[test]
fn a_manual_stop_before_an_engine_restart_stays_stopped() {
    let mut engine = Engine::start();
    engine.load_test_image();
    let device = unique_id("stopthenrestart");
    let broker = Broker::new();
    let mut config = BerthConfig::new(&device, broker.port()).backoff(100, 1, 30);
    config.docker_host = engine.host();
    let mut berth = Berth::new(config);
    let sub = Subscriber::new(broker.port(), &format!("berth/{device}/#"));
    berth.write_deployment(
        "held",
        &deployment_toml("held", &restart_policy("always"), TEST_IMAGE, LONG_RUNNING),
    );
    berth.start();
    let topic = berth.topic("deployments/held");
    let running = sub.wait_for(&topic, |d| d["status"] == "Running", WAIT);
    let container = running["executables"][0]["container_id"]
        .as_str()
        .unwrap()
        .to_owned();
    docker_within(&engine.host(), &["stop", "-t", "1", &container], WAIT)
        .expect("docker stop on the test engine");
    sub.wait_for(&topic, |d| d["status"] == "Stopped", WAIT);
    // Past the engine's shutdown timeout (15 s) and berth's second of margin:
    // the time itself is what this row is about.
    std::thread::sleep(Duration::from_secs(17));
    assert!(engine.down(), "the test engine stops on SIGTERM");
    sub.wait_for(
        &berth.topic("agent"),
        |d| d["docker"] == "unreachable",
        WAIT,
    );
    engine.up();
    sub.wait_for(&berth.topic("agent"), |d| d["docker"] == "connected", WAIT);
    let doc = sub.wait_for(
        &topic,
        |d| d["status"] == "Stopped" || d["status"] == "Running",
        WAIT,
    );
    // Not a wait for an outcome: a window in which a wrong restart would show.
    std::thread::sleep(Duration::from_secs(2));
    let latest = sub.wait_for(&topic, |_| true, WAIT);
    assert_eq!(doc["status"], "Stopped", "{doc}");
    assert_eq!(latest["status"], "Stopped", "still stopped: {latest}");
    assert_eq!(latest["restart_count"], 0, "{latest}");
    let reason = latest["executables"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("stopped manually"), "{latest}");
    berth.sigterm();
}
