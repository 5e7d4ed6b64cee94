//! Deployment files that are not what they claim (SPEC 8): a FIFO, a symlink
//! to `/dev/zero`, a 100 MB file, 10 000 nested tables, a world-writable
//! file, a directory named `*.toml`. Each makes its own deployment
//! `FailedToStart` with a reason naming the file, at start-up and on every
//! reload, is reported by `check-config`, and neither blocks berth (it
//! keeps feeding the systemd watchdog, observed through a stand-in
//! `NOTIFY_SOCKET`) nor disturbs a valid deployment beside it. Also: an
//! emptied `deployments_dir` deprovisions everything and says so; a missing
//! one deprovisions nothing, and is read when it appears, is mounted or is
//! replaced.
//! Real binary, engine and broker.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `WatchdogSec=10`, as systemd passes it; berth pings every 5 s. A file
/// that blocked berth would stop the pings altogether; the gaps are held to
/// what systemd would hold them to, with room for a loaded test machine
/// (the unit itself says 30 s).
const WATCHDOG_USEC: &str = "10000000";
const WATCHDOG: Duration = Duration::from_secs(10);

/// The `WATCHDOG=1` (and other) lines systemd's end of the socket got.
#[derive(Clone, Default)]
struct Notified(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notified {
    fn collect(socket: UnixDatagram) -> Notified {
        let notified = Notified::default();
        let sink = notified.clone();
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
        notified
    }

    fn times_of(&self, line: &str) -> Vec<Instant> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|(_, l)| l == line)
            .map(|(at, _)| *at)
            .collect()
    }

    /// Waits for `count` pings after `since`; then no two pings since the
    /// first one may be as far apart as the watchdog timeout.
    fn assert_fed(&self, since: Instant, count: usize, berth: &Berth) {
        let fed = wait_until(WAIT, || {
            self.times_of("WATCHDOG=1")
                .iter()
                .filter(|at| **at > since)
                .count()
                >= count
        });
        let pings = self.times_of("WATCHDOG=1");
        assert!(
            fed,
            "fewer than {count} WATCHDOG=1 since the hostile file was read ({} in all); log:\n{}",
            pings.len(),
            berth.log()
        );
        let longest = pings
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        assert!(
            longest < WATCHDOG,
            "WATCHDOG=1 gaps up to {longest:?} against WatchdogSec={WATCHDOG:?}: the loop stalled; log:\n{}",
            berth.log()
        );
    }
}

fn good_deployment() -> String {
    always_until_sigterm("good")
}

fn is_failed_to_start(doc: &Value, file: &Path, message: &str) -> bool {
    doc["phase"] == "FailedToStart"
        && doc["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&file.display().to_string()) && r.contains(message))
}

/// berth with a valid deployment `good` and the hostile `file_name` made
/// by `make` in its deployments dir: the hostile one fails alone with
/// `message`, at start-up and after a reload (SIGHUP), while `good` runs untouched
/// and the watchdog is fed throughout; `check-config` says the same.
fn hostile_file_fails_alone(
    prefix: &str,
    file_name: &str,
    make: impl FnOnce(&Path),
    message: &str,
) {
    let broker = Broker::new();
    let device = unique_id(prefix);
    let guard = EngineGuard::new(&device);
    let mut berth = Berth::new(BerthConfig::new(&device, broker.port()));
    berth.write_deployment("good", &good_deployment());
    let hostile: PathBuf = berth.deployments_dir().join(file_name);
    make(&hostile);
    let stem = file_name.trim_end_matches(".toml");

    let socket = berth.dir().join("notify.sock");
    let notified = Notified::collect(UnixDatagram::bind(&socket).expect("bind notify socket"));
    berth
        .env("NOTIFY_SOCKET", socket.to_str().unwrap())
        .env("WATCHDOG_USEC", WATCHDOG_USEC);
    let subscriber = Subscriber::new(broker.port(), &berth.topic("#"));
    let started = Instant::now();
    berth.start();

    // At start-up: the hostile file fails alone, the good one runs.
    let hostile_topic = berth.topic(&format!("deployments/{stem}"));
    subscriber.wait_for(
        &hostile_topic,
        |d| is_failed_to_start(d, &hostile, message),
        WAIT,
    );
    let good = wait_running(&subscriber, &berth, "good");
    notified.assert_fed(started, 2, &berth);
    assert!(
        !notified.times_of("READY=1").is_empty(),
        "no READY=1; log:\n{}",
        berth.log()
    );

    // A reload reads it again: the same failure, the same good container.
    let reloaded = Instant::now();
    berth.sighup();
    berth.wait_for_log("reload deployments=1 invalid=1", WAIT);
    let latest = subscriber.wait_for(&hostile_topic, |_| true, WAIT);
    assert!(
        is_failed_to_start(&latest, &hostile, message),
        "after the reload: {latest}"
    );
    notified.assert_fed(reloaded, 2, &berth);
    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "only good's container: {containers:?}");
    assert_eq!(containers[0]["State"]["Running"], true);
    assert_eq!(
        containers[0]["Id"].as_str(),
        exe(&good)["container_id"].as_str(),
        "good's container was replaced"
    );
    let latest = subscriber.wait_for(&berth.topic("deployments/good"), |_| true, WAIT);
    assert_eq!(latest["status"], "Running");
    assert_eq!(latest["restart_count"], 0);

    // check-config: `file: message`, exit 1.
    let out = berth.command(&["check-config"]);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "check-config: {printed}");
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with(&hostile.display().to_string()) && l.contains(message)),
        "check-config does not report {}: {printed}",
        hostile.display()
    );
    assert!(berth.sigterm().success(), "log:\n{}", berth.log());
}

#[test]
fn a_fifo_fails_alone_and_never_blocks() {
    hostile_file_fails_alone(
        "hostile-fifo",
        "fifo.toml",
        |path| {
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o644))
                .expect("mkfifo")
        },
        "not a regular file but a FIFO",
    );
}

#[test]
fn a_symlink_to_dev_zero_fails_alone() {
    hostile_file_fails_alone(
        "hostile-zero",
        "z.toml",
        |path| std::os::unix::fs::symlink("/dev/zero", path).expect("symlink"),
        "not a regular file but a character device",
    );
}

#[test]
fn a_100_mb_file_fails_alone_unread() {
    hostile_file_fails_alone(
        "hostile-huge",
        "huge.toml",
        // Sparse: 100 MB that take no disk.
        |path| {
            fs::File::create(path)
                .and_then(|f| f.set_len(100_000_000))
                .expect("create a 100 MB file")
        },
        "file is larger than 1 MiB (100000000 bytes)",
    );
}

#[test]
fn ten_thousand_nested_tables_fail_alone() {
    hostile_file_fails_alone(
        "hostile-nested",
        "nested.toml",
        |path| {
            let text = format!(
                "id = \"nested\"\na = {}1{}\n",
                "{ b = ".repeat(10_000),
                " }".repeat(10_000)
            );
            fs::write(path, text).expect("write");
        },
        "arrays and inline tables nested more than 16 levels deep",
    );
}

#[test]
fn a_world_writable_file_fails_alone() {
    hostile_file_fails_alone(
        "hostile-writable",
        "writable.toml",
        |path| {
            // A valid deployment, but anyone on the device could rewrite it.
            let text = pull_never(&deployment_toml("writable", "", TEST_IMAGE, UNTIL_SIGTERM));
            fs::write(path, text).expect("write");
            fs::set_permissions(path, fs::Permissions::from_mode(0o666)).expect("chmod");
        },
        "file is writable by group and others (mode 0666): run chmod go-w on it",
    );
}

#[test]
fn a_directory_named_toml_fails_alone() {
    hostile_file_fails_alone(
        "hostile-dir",
        "x.toml",
        |path| fs::create_dir(path).expect("mkdir"),
        "not a regular file but a directory",
    );
}

/// Emptying `deployments_dir` is the operator's word: everything is
/// deprovisioned, and an `error` event says why. Taking the directory away
/// (an unmounted disk) deprovisions nothing.
#[test]
fn an_empty_deployments_dir_deprovisions_all_and_a_missing_one_nothing() {
    let broker = Broker::new();
    let device = unique_id("hostile-emptydir");
    let guard = EngineGuard::new(&device);
    let mut berth = Berth::new(BerthConfig::new(&device, broker.port()));
    berth.write_deployment("good", &good_deployment());
    let subscriber = Subscriber::new(broker.port(), &berth.topic("#"));
    berth.start();
    let good = wait_running(&subscriber, &berth, "good");
    let events = berth.topic("events");

    // Missing: renamed away, then a reload.
    let dir = berth.deployments_dir();
    let away = berth.dir().join("deployments.away");
    fs::rename(&dir, &away).expect("move deployments_dir away");
    berth.sighup();
    subscriber.wait_for(
        &events,
        |e| {
            e["event"] == "error"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("is missing; nothing changed"))
        },
        WAIT,
    );
    let containers = guard.containers();
    assert_eq!(containers.len(), 1, "{containers:?}");
    assert_eq!(containers[0]["State"]["Running"], true);
    assert_eq!(
        containers[0]["Id"].as_str(),
        exe(&good)["container_id"].as_str()
    );

    // Back, then emptied.
    fs::rename(&away, &dir).expect("move deployments_dir back");
    berth.remove_deployment("good");
    berth.sighup();
    subscriber.wait_for(
        &events,
        |e| {
            e["event"] == "error"
                && e["reason"].as_str().is_some_and(|r| {
                    r.contains("holds no deployment file; every deployment is deprovisioned")
                })
        },
        WAIT,
    );
    subscriber.wait_for(
        &berth.topic("deployments/good"),
        |d| d["phase"] == "DeploymentStopped",
        WAIT,
    );
    assert!(
        wait_until(WAIT, || guard.containers().is_empty()),
        "containers left: {:?}",
        guard.containers()
    );
    assert!(berth.sigterm().success(), "log:\n{}", berth.log());
}

/// A `deployments_dir` missing at start deprovisions nothing and is read as
/// soon as it is created, without a SIGHUP; one put in
/// its place later (a symlink pointed at another directory, as release tools
/// do) is read, and then watched in its turn.
#[test]
fn a_deployments_dir_that_appears_later_or_is_replaced_is_read_and_watched() {
    let broker = Broker::new();
    let device = unique_id("hostile-latedir");
    let guard = EngineGuard::new(&device);
    let mut berth = Berth::new(BerthConfig::new(&device, broker.port()));
    let dir = berth.deployments_dir();
    fs::remove_dir(&dir).expect("no deployments_dir at start");
    let subscriber = Subscriber::new(broker.port(), &berth.topic("#"));
    berth.start();
    subscriber.wait_for(&berth.topic("agent"), |d| d["docker"] == "connected", WAIT);
    berth.wait_for_log(
        "deployments_dir is missing; it is read when it appears",
        WAIT,
    );
    assert!(guard.containers().is_empty());

    let release = |name: &str, ids: &[&str]| {
        let path = berth.dir().join(name);
        fs::create_dir(&path).expect("release dir");
        for id in ids {
            write_atomically(&path.join(format!("{id}.toml")), &always_until_sigterm(id));
        }
        path
    };
    let running = |id: &str| wait_running(&subscriber, &berth, id);

    // It appears: a symlink to a release.
    let a = release("release-a", &["first"]);
    std::os::unix::fs::symlink(&a, &dir).expect("deployments_dir appears");
    running("first");

    // Replaced: the symlink swapped to another release in one rename.
    let b = release("release-b", &["second"]);
    let swap = berth.dir().join("deployments.next");
    std::os::unix::fs::symlink(&b, &swap).expect("the new link");
    fs::rename(&swap, &dir).expect("swap the link");
    running("second");
    subscriber.wait_for(
        &berth.topic("deployments/first"),
        |d| d["phase"] == "DeploymentStopped",
        WAIT,
    );

    // The new release is the one watched now: a file added to it is read.
    write_atomically(&b.join("third.toml"), &always_until_sigterm("third"));
    running("third");
    assert!(
        wait_until(WAIT, || guard.containers().len() == 2),
        "second's and third's containers: {:?}",
        guard.containers()
    );
    assert!(berth.sigterm().success(), "log:\n{}", berth.log());
}

fn wait_running(subscriber: &Subscriber, berth: &Berth, id: &str) -> Value {
    subscriber.wait_for(
        &berth.topic(&format!("deployments/{id}")),
        |d| d["status"] == "Running",
        WAIT,
    )
}

fn always_until_sigterm(id: &str) -> String {
    pull_never(&deployment_toml(
        id,
        &restart_policy("always"),
        TEST_IMAGE,
        UNTIL_SIGTERM,
    ))
}

/// A bind mount over a path, undone when dropped (also when the test fails).
struct Mounted(PathBuf);

impl Mounted {
    fn bind(from: &Path, onto: &Path) -> Mounted {
        let out = std::process::Command::new("mount")
            .arg("--bind")
            .args([from, onto])
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount --bind: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted(onto.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A disk mounted on `deployments_dir` after berth started (the mount
/// point was there, empty) makes no inotify event; berth follows the mount
/// table, reads the mounted directory and watches it from then on.
#[test]
fn a_disk_mounted_on_deployments_dir_later_is_read_and_watched() {
    let broker = Broker::new();
    let device = unique_id("hostile-mounted");
    let guard = EngineGuard::new(&device);
    let disk = tempfile::tempdir().expect("the disk's files");
    write_atomically(
        &disk.path().join("first.toml"),
        &always_until_sigterm("first"),
    );
    let mut berth = Berth::new(BerthConfig::new(&device, broker.port()));
    let subscriber = Subscriber::new(broker.port(), &berth.topic("#"));
    berth.start();
    subscriber.wait_for(&berth.topic("agent"), |d| d["docker"] == "connected", WAIT);
    let running = |id: &str| wait_running(&subscriber, &berth, id);

    // Undone when the test ends, also when it fails (a lazy unmount: berth
    // may still hold the directory then).
    let _mounted = Mounted::bind(disk.path(), &berth.deployments_dir());
    running("first");

    // The mounted directory is the one watched now.
    berth.write_deployment("second", &always_until_sigterm("second"));
    running("second");
    assert!(
        wait_until(WAIT, || guard.containers().len() == 2),
        "first's and second's containers: {:?}",
        guard.containers()
    );
    assert!(berth.sigterm().success(), "log:\n{}", berth.log());
}
