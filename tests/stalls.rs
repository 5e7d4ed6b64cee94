//! An engine that does not answer never holds berth's loop, end to end: an
//! engine socket that accepts connections and stays silent, and an engine
//! that stalls mid-life (a proxy in front of the real engine's socket that
//! stops forwarding). In both, berth keeps feeding its watchdog, answers
//! SIGTERM at once, shows every deployment `Unknown` + `DEP_E301` within
//! `[docker] timeout_secs`, and recovers by itself when the engine answers.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `[docker] timeout_secs` in these tests.
const TIMEOUT: Duration = Duration::from_secs(2);
/// `WatchdogSec=2`, as systemd passes it.
const WATCHDOG_USEC: &str = "2000000";
const WATCHDOG: Duration = Duration::from_secs(2);
/// What berth itself may add to a bound (its start, a loaded machine).
const SLACK: Duration = Duration::from_secs(4);
/// How soon a SIGTERM must be answered.
const PROMPT: Duration = Duration::from_secs(3);

/// Sets `[docker] timeout_secs` in the config berth starts with.
fn with_timeout(berth: &Berth) {
    let text = std::fs::read_to_string(berth.config_path()).expect("read berth.toml");
    let text = text.replacen(
        "[docker]\n",
        &format!("[docker]\ntimeout_secs = {}\n", TIMEOUT.as_secs()),
        1,
    );
    assert!(
        text.contains("timeout_secs"),
        "no [docker] section:\n{text}"
    );
    berth.write_raw_config(&text);
}

/// systemd's end of `NOTIFY_SOCKET`: every line received, with when.
#[derive(Clone)]
struct Notifications(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notifications {
    /// Binds `<berth dir>/notify.sock` and points berth's next start at it.
    fn listen(berth: &mut Berth) -> Notifications {
        let path = berth.dir().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let received = Notifications(Arc::default());
        let sink = received.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut all = sink.0.lock().unwrap();
                for line in text.lines() {
                    all.push((Instant::now(), line.to_owned()));
                }
            }
        });
        berth
            .env("NOTIFY_SOCKET", path.to_str().unwrap())
            .env("WATCHDOG_USEC", WATCHDOG_USEC);
        received
    }

    /// The `WATCHDOG=1` pings between `from` and `to`.
    fn pings(&self, from: Instant, to: Instant) -> Vec<Instant> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, line)| line == "WATCHDOG=1" && *at >= from && *at <= to)
            .map(|(at, _)| *at)
            .collect()
    }

    /// Over `window` from now, `WATCHDOG=1` keeps coming, never with a gap
    /// systemd would take for a hung berth.
    fn assert_fed(&self, window: Duration, berth: &Berth) {
        let from = Instant::now();
        thread::sleep(window);
        let to = Instant::now();
        let pings = self.pings(from - WATCHDOG, to);
        let mut edges = vec![from];
        edges.extend(pings.iter().copied().filter(|at| *at >= from));
        edges.push(to);
        let longest = edges.windows(2).map(|w| w[1] - w[0]).max().unwrap();
        assert!(
            longest < WATCHDOG,
            "WATCHDOG=1 gap of {longest:?} (WatchdogSec=2s) in {window:?}; log:\n{}",
            berth.log()
        );
    }
}

/// SIGTERM, answered with a clean exit within [`PROMPT`].
fn assert_stops_promptly(berth: &mut Berth) {
    let asked = Instant::now();
    let status = berth.sigterm();
    let took = asked.elapsed();
    assert!(status.success(), "berth exited with {status}");
    assert!(
        took < PROMPT,
        "SIGTERM answered after {took:?}; log:\n{}",
        berth.log()
    );
}

fn unknown_for_the_engine(doc: &serde_json::Value) -> bool {
    doc["status"] == "Unknown"
        && doc["error_code"] == "DEP_E301"
        && exe(doc)["status"] == "Unknown"
        && exe(doc)["error_code"] == "DEP_E301"
}

/// An engine socket that accepts every connection and never answers.
#[test]
fn a_silent_engine_is_unknown_within_the_timeout_and_never_holds_berth() {
    let dir = tempfile::tempdir().unwrap();
    let silent = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&silent).expect("bind the silent socket");
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let docker_host = format!("unix://{}", silent.display());
    let mut s = Harness::new("silent", |mut c| {
        c.docker_host = docker_host;
        c
    });
    with_timeout(&s.berth);
    s.berth.write_deployment(
        "app",
        &pull_never(&deployment_toml(
            "app",
            &restart_policy("always"),
            TEST_IMAGE,
            UNTIL_SIGTERM,
        )),
    );
    let notifications = Notifications::listen(&mut s.berth);
    let started = Instant::now();
    s.berth.start();

    let doc = s.wait("app", unknown_for_the_engine);
    let took = started.elapsed();
    assert!(
        took < TIMEOUT + SLACK,
        "Unknown after {took:?}, timeout {TIMEOUT:?}: {doc}"
    );
    let agent = s
        .sub
        .wait_for(&s.berth.topic("agent"), |d| d["state"] == "online", WAIT);
    assert_eq!(agent["docker"], "unreachable", "{agent}");
    assert_eq!(agent["error_code"], "DEP_E301", "{agent}");

    notifications.assert_fed(3 * WATCHDOG, &s.berth);
    assert!(s.berth.is_running(), "berth died:\n{}", s.berth.log());
    assert_stops_promptly(&mut s.berth);
}

/// A unix-socket forwarder in front of the real engine that can be told to
/// stall: then nothing goes through in either direction (the event stream
/// hangs, requests get no answer) until it is told to forward again.
struct Proxy {
    path: PathBuf,
    stalled: Arc<AtomicBool>,
}

impl Proxy {
    fn start(dir: &Path) -> Proxy {
        let path = dir.join("engine.sock");
        let listener = UnixListener::bind(&path).expect("bind the proxy socket");
        let stalled = Arc::new(AtomicBool::new(false));
        let gate = stalled.clone();
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone().unwrap(), engine.try_clone().unwrap()),
                    (engine, client),
                ] {
                    let gate = gate.clone();
                    thread::spawn(move || forward(from, to, &gate));
                }
            }
        });
        Proxy { path, stalled }
    }

    fn docker_host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`; whatever arrives while stalled is held until the
/// stall ends.
fn forward(mut from: UnixStream, mut to: UnixStream, stalled: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stalled.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(10));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// An engine that stalls mid-life: `Unknown` + `DEP_E301` within the
/// timeout, the watchdog fed and SIGTERM answered throughout, and when it
/// answers again the deployment is `Running` again, not restarted.
#[test]
fn an_engine_that_stalls_is_unknown_within_the_timeout_and_recovers_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(dir.path());
    let docker_host = proxy.docker_host();
    let mut s = Harness::new("stall", |mut c| {
        c.docker_host = docker_host;
        c
    });
    with_timeout(&s.berth);
    s.berth.write_deployment(
        "app",
        &pull_never(&deployment_toml(
            "app",
            &restart_policy("always"),
            TEST_IMAGE,
            UNTIL_SIGTERM,
        )),
    );
    let notifications = Notifications::listen(&mut s.berth);
    s.berth.start();
    s.wait("app", |d| d["status"] == "Running");
    let container = s.container_id("app");

    s.sub.clear();
    proxy.stall(true);
    let stalled_at = Instant::now();
    let doc = s.wait("app", unknown_for_the_engine);
    let took = stalled_at.elapsed();
    assert!(
        took < TIMEOUT + SLACK,
        "Unknown {took:?} after the stall, timeout {TIMEOUT:?}: {doc}"
    );
    s.sub.wait_for(
        &s.berth.topic("agent"),
        |d| d["docker"] == "unreachable",
        WAIT,
    );
    notifications.assert_fed(2 * WATCHDOG, &s.berth);

    s.sub.clear();
    proxy.stall(false);
    let doc = s.wait("app", |d| d["status"] == "Running");
    assert_eq!(doc["restart_count"], 0, "{doc}");
    assert_eq!(exe(&doc)["container_id"], container.as_str(), "{doc}");
    s.sub.wait_for(
        &s.berth.topic("agent"),
        |d| d["docker"] == "connected",
        WAIT,
    );
    assert_eq!(s.events.starts(&container), 1, "not restarted");

    // Stalled again, SIGTERM is answered at once.
    s.sub.clear();
    proxy.stall(true);
    s.wait("app", unknown_for_the_engine);
    assert_stops_promptly(&mut s.berth);
    proxy.stall(false);
    assert_eq!(s.events.starts(&container), 1, "not restarted");
}
