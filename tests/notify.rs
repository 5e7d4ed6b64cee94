//! berth under a stand-in for systemd: the real binary with `NOTIFY_SOCKET`
//! pointing at a datagram socket this test binds, as systemd does for a
//! `Type=notify` unit with `WatchdogSec=`. Checks what `systemctl` relies
//! on: `READY=1` once the deployments are reconciled, `STATUS=` lines,
//! `WATCHDOG=1` at half the watchdog timeout, `STOPPING=1` on SIGTERM.

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `WatchdogSec=2`, as systemd passes it.
const WATCHDOG_USEC: &str = "2000000";
const WATCHDOG: Duration = Duration::from_secs(2);

/// What systemd's end of the socket received, with when.
#[derive(Clone)]
struct Received(Arc<Mutex<Vec<(Instant, String)>>>);

impl Received {
    /// Reads every datagram `socket` gets until the test ends.
    fn collect(socket: UnixDatagram) -> Received {
        let received = Received(Arc::default());
        let sink = received.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                // One datagram may carry several assignments, one a line.
                let mut all = sink.0.lock().unwrap();
                for line in text.lines() {
                    all.push((Instant::now(), line.to_owned()));
                }
            }
        });
        received
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.0.lock().unwrap().clone()
    }

    fn lines(&self) -> Vec<String> {
        self.all().into_iter().map(|(_, line)| line).collect()
    }

    fn times_of(&self, line: &str) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|(_, l)| l == line)
            .map(|(at, _)| at)
            .collect()
    }

    /// Waits for a line that satisfies `predicate`; panics with everything
    /// received otherwise.
    fn wait_for(&self, what: &str, predicate: impl Fn(&str) -> bool, berth: &Berth) -> Instant {
        let mut found = None;
        wait_until(WAIT, || {
            found = self
                .all()
                .into_iter()
                .find(|(_, line)| predicate(line))
                .map(|(at, _)| at);
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no {what} within {WAIT:?}; received {:?}; log:\n{}",
                self.lines(),
                berth.log()
            )
        })
    }
}

fn running(guard: &EngineGuard) -> bool {
    guard
        .containers()
        .iter()
        .any(|c| c["State"]["Running"] == true)
}

#[test]
fn ready_status_watchdog_and_stopping_reach_systemd() {
    let broker = Broker::new();
    let device = unique_id("notify");
    let guard = EngineGuard::new(&device);
    let mut berth = Berth::new(BerthConfig::new(&device, broker.port()));
    berth.write_deployment(
        "app",
        &pull_never(&deployment_toml(
            "app",
            &restart_policy("always"),
            TEST_IMAGE,
            UNTIL_SIGTERM,
        )),
    );

    let socket_path = berth.dir().join("notify.sock");
    let received = Received::collect(UnixDatagram::bind(&socket_path).expect("bind notify socket"));
    berth
        .env("NOTIFY_SOCKET", socket_path.to_str().unwrap())
        .env("WATCHDOG_USEC", WATCHDOG_USEC);
    berth.start();

    // READY=1 comes once the first reconcile has run; the container it
    // decided on is then created and started.
    let ready = received.wait_for("READY=1", |l| l == "READY=1", &berth);
    assert!(
        wait_until(WAIT, || running(&guard)),
        "the deployment's container never ran; received {:?}; log:\n{}",
        received.lines(),
        berth.log()
    );
    assert_eq!(
        received.times_of("READY=1").len(),
        1,
        "READY=1 more than once: {:?}",
        received.lines()
    );

    // STATUS= follows the deployment from pending to running, and an
    // unchanged summary is not sent again.
    received.wait_for(
        "STATUS= with the deployment running",
        |l| l == "STATUS=1 deployment: 1 running; 0 restarts",
        &berth,
    );
    let statuses: Vec<String> = received
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("STATUS="))
        .collect();
    assert!(
        statuses.windows(2).all(|w| w[0] != w[1]),
        "a STATUS= line repeated: {statuses:?}"
    );

    // WATCHDOG=1 every second (half of WatchdogSec=2): four more after this
    // moment, and never a gap systemd would take for a hang.
    let window_start = Instant::now().max(ready);
    let pings_since = || {
        received
            .times_of("WATCHDOG=1")
            .iter()
            .filter(|at| **at >= window_start)
            .count()
    };
    assert!(
        wait_until(WAIT, || pings_since() >= 4),
        "{} WATCHDOG=1 in {WAIT:?}; received {:?}",
        pings_since(),
        received.lines()
    );
    let pings = received.times_of("WATCHDOG=1");
    let longest = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest < WATCHDOG,
        "WATCHDOG=1 gaps up to {longest:?} against WatchdogSec=2s"
    );

    // SIGTERM: STOPPING=1, a clean exit, and the container left running.
    let status = berth.sigterm();
    assert!(status.success(), "berth exited with {status}");
    received.wait_for("STOPPING=1", |l| l == "STOPPING=1", &berth);
    assert!(running(&guard), "stopping berth stopped the container");
}

/// systemd may name an abstract socket (`@name`), as it does for user
/// managers and in containers; with no deployments, READY=1 still comes.
#[test]
fn an_abstract_notify_socket_gets_ready_without_deployments() {
    let broker = Broker::new();
    let device = unique_id("notify-abstract");
    let _guard = EngineGuard::new(&device);
    let mut berth = Berth::new(BerthConfig::new(&device, broker.port()));

    let name = format!("berth-test-{device}");
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let received = Received::collect(UnixDatagram::bind_addr(&addr).expect("bind abstract"));
    berth.env("NOTIFY_SOCKET", &format!("@{name}"));
    berth.start();

    received.wait_for("READY=1", |l| l == "READY=1", &berth);
    // No WATCHDOG_USEC: no watchdog pings. Not a wait for an outcome: a
    // window in which a wrong ping would show.
    thread::sleep(Duration::from_secs(1));
    assert!(
        received.times_of("WATCHDOG=1").is_empty(),
        "WATCHDOG=1 without WATCHDOG_USEC: {:?}",
        received.lines()
    );
    berth.sigterm();
    received.wait_for("STOPPING=1", |l| l == "STOPPING=1", &berth);
}

/// A NOTIFY_SOCKET nobody listens on is not berth's problem.
#[test]
fn a_dead_notify_socket_does_not_stop_berth() {
    let broker = Broker::new();
    let device = unique_id("notify-dead");
    let _guard = EngineGuard::new(&device);
    let mut berth = Berth::new(BerthConfig::new(&device, broker.port()));
    let missing = berth.dir().join("nobody-here.sock");
    assert!(!Path::new(&missing).exists());
    berth
        .env("NOTIFY_SOCKET", missing.to_str().unwrap())
        .env("WATCHDOG_USEC", WATCHDOG_USEC);
    let subscriber = Subscriber::new(broker.port(), &berth.topic("agent"));
    berth.start();
    subscriber.wait_for(&berth.topic("agent"), |doc| doc["state"] == "online", WAIT);
    // Not a wait for an outcome: long enough for a ping or two into the
    // void, which must not harm berth.
    thread::sleep(WATCHDOG);
    assert!(berth.is_running(), "berth died:\n{}", berth.log());
    assert!(berth.sigterm().success());
}
