//! Helpers shared by the integration tests: ids unique to a test, and the real
//! services berth works with, each started for one test and stopped when its
//! handle is dropped: a Mosquitto broker, an MQTT subscriber, a registry, the
//! containers of one device in the Docker engine, and berth itself.
//!
//! On top of them: deployment files to give berth ([`deployment_toml`]) and
//! [`Harness`], one device's broker, subscriber and berth together.
//!
//! A service that cannot be started fails the test with a hint to run
//! `scripts/setup.sh`; nothing here skips a test.
//!
//! Each test file uses a subset of these helpers, hence the module-wide
//! `dead_code` allowance.
#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS, RecvTimeoutError};
use serde_json::Value;
use tempfile::TempDir;

/// Built by `scripts/setup.sh` from busybox-static: every applet in `/bin`, and
/// `/bin/bash` handing over to busybox's `sh` (busybox has no bash applet).
pub const TEST_IMAGE: &str = "berth-test/busybox:1";

/// The same image in the development registry that `scripts/setup.sh` runs
/// on 127.0.0.1:5000.
pub const REGISTRY_IMAGE: &str = "127.0.0.1:5000/berth/busybox:1";

/// How long a test waits for berth to publish what it expects, unless the
/// test says otherwise.
pub const WAIT: Duration = Duration::from_secs(30);

/// A script that runs until SIGTERM, then exits 0; SIGUSR1 makes it exit 5,
/// a crash on demand ([`crash`]). It checks for signals five times a second.
/// Once its traps are set it writes its own start time (field 22 of
/// `/proc/1/stat`) to [`READY_FILE`]: a signal sent before that would be
/// ignored (PID 1 ignores signals it has no handler for), and the start time
/// tells this run's file from one an earlier run of the container left.
pub const LONG_RUNNING: &str = "trap 'exit 0' TERM; trap 'exit 5' USR1; \
     cut -d' ' -f22 /proc/1/stat > /tmp/ready; while true; do sleep 0.2; done";

/// Where [`LONG_RUNNING`] says it is ready, in its container.
pub const READY_FILE: &str = "/tmp/ready";

/// A script that runs until SIGTERM, then exits 0, checking once a second.
/// The trap matters: PID 1 ignores the signals it has no handler for.
pub const UNTIL_SIGTERM: &str = "trap 'exit 0' TERM; while true; do sleep 1; done";

const SETUP_HINT: &str = "run scripts/setup.sh --tests";

/// How long a service gets to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(15);

// --- ids and ports -------------------------------------------------------------

/// An id unique to this call, this process and this moment, so that tests
/// sharing one engine and one machine never see each other's containers.
/// It is a valid device id (`[A-Za-z0-9_-]{1,64}`) and, when `prefix` starts
/// with a letter or digit, a valid deployment id too.
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let mut prefix: String = prefix
        .chars()
        .take(20)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if prefix.is_empty() {
        prefix.push('t');
    }
    // 20 + 1 + 8 (pid) + 1 + 20 (counter) + 1 + 10 (time) = 61 at most.
    format!(
        "{prefix}-{:x}-{n}-{:x}",
        std::process::id(),
        nanos % (1 << 40)
    )
}

/// Nanoseconds since the Unix epoch, the unit of the engine's event times.
pub fn nanos_now() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Polls `ready` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Standard base64 with padding, the alphabet of HTTP basic auth, which
/// includes `+` and `/`.
pub fn base64_std(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// --- child processes -----------------------------------------------------------

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn append_file(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Spawns `program args` with stdin closed and stdout and stderr appended to
/// `log`, so that no child holds the test's own output open.
fn spawn_logged(program: &str, args: &[&str], log: &Path) -> Child {
    let out = append_file(log);
    let err = out.try_clone().expect("clone log file handle");
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program} ({e}): {SETUP_HINT}"))
}

/// Waits for `child` to exit, for at most `timeout`.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().expect("wait for child");
        status.is_some()
    });
    status
}

fn send_signal(child: &Child, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits in i32"));
    signal::kill(pid, signal).unwrap_or_else(|e| panic!("send {signal} to {pid}: {e}"));
}

/// SIGTERM, then SIGKILL if the child has not exited within `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    if let Some(status) = child.try_wait().expect("wait for child") {
        return status;
    }
    send_signal(child, Signal::SIGTERM);
    if let Some(status) = wait_exit(child, grace) {
        return status;
    }
    let _ = child.kill();
    child.wait().expect("wait for killed child")
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

// --- MQTT broker -------------------------------------------------------------

/// A Mosquitto broker of its own on 127.0.0.1, without persistence: once
/// stopped and started again, it has forgotten every retained message and
/// session, as a broker that lost its disk would.
pub struct Broker {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl Broker {
    /// Starts a broker on a free port and waits until it accepts connections.
    pub fn new() -> Broker {
        let dir = tempfile::tempdir().expect("temp dir for mosquitto");
        let mut broker = Broker {
            port: 0,
            child: None,
            dir,
        };
        // The port may be taken between finding it and binding it: try again.
        for _ in 0..5 {
            broker.port = free_port();
            if broker.spawn() {
                return broker;
            }
        }
        panic!("mosquitto could not bind a port:\n{}", broker.log());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL for berth's `[mqtt] url`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("wait for mosquitto").is_none(),
            None => false,
        }
    }

    /// Stops the broker (SIGTERM) and waits until it has exited; clients see
    /// their connections closed.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("stop: the broker is not running");
        terminate(&mut child, Duration::from_secs(5));
    }

    /// Starts the broker again, on the same port.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "start: the broker is already running");
        assert!(
            self.spawn(),
            "mosquitto could not start again on port {}:\n{}",
            self.port,
            self.log()
        );
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log_path())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    /// Returns false if mosquitto exited before answering (port taken).
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let mut child = spawn_logged("mosquitto", &["-p", &port], &self.log_path());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for mosquitto") {
                assert!(
                    self.log().contains("Address already in use"),
                    "mosquitto exited with {status}:\n{}",
                    self.log()
                );
                return false;
            }
            if port_open(self.port) {
                self.child = Some(child);
                return true;
            }
            if Instant::now() >= deadline {
                kill_and_reap(&mut child);
                panic!(
                    "mosquitto did not accept connections on port {} within {START_TIMEOUT:?}:\n{}",
                    self.port,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }
}

/// Publishes one message with `mosquitto_pub`, QoS 1.
pub fn mqtt_publish(port: u16, topic: &str, payload: &str, retain: bool) {
    let port = port.to_string();
    let mut args = vec![
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-q",
        "1",
        "-t",
        topic,
        "-m",
        payload,
    ];
    if retain {
        args.push("-r");
    }
    let out = Command::new("mosquitto_pub")
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run mosquitto_pub ({e}): {SETUP_HINT}"));
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// --- MQTT subscriber -----------------------------------------------------------

/// One message as the subscriber received it.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    /// The payload parsed as JSON; a payload that is not JSON is kept as a
    /// string, an empty one (a cleared retained message) as null.
    pub payload: Value,
    /// Set by the broker on messages it delivers from its retained store when
    /// the subscription is made, not on live ones.
    pub retained: bool,
    pub received_at: Instant,
}

#[derive(Default)]
struct Inbox {
    messages: Vec<Message>,
    /// Subscriptions acknowledged so far: one per (re)connection.
    subscriptions: u64,
    last_error: Option<String>,
}

struct Shared {
    inbox: Mutex<Inbox>,
    changed: Condvar,
}

/// Subscribes to a topic filter on a broker and collects every message in
/// the background. It reconnects and subscribes again after the broker
/// restarts, with a clean session each time.
pub struct Subscriber {
    filter: String,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects, subscribes to `filter` (QoS 1) and returns once the broker
    /// has acknowledged the subscription.
    pub fn new(broker_port: u16, filter: &str) -> Subscriber {
        let mut options = MqttOptions::new(unique_id("sub"), "127.0.0.1", broker_port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_session(true);
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = Client::new(options, 64);

        let shared = Arc::new(Shared {
            inbox: Mutex::new(Inbox::default()),
            changed: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            let filter = filter.to_owned();
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let event = match connection.recv_timeout(Duration::from_millis(250)) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    let mut inbox = shared.inbox.lock().expect("subscriber inbox");
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            // A clean session forgets subscriptions: make it
                            // again on every connection.
                            if let Err(e) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce)
                            {
                                inbox.last_error = Some(format!("subscribe: {e}"));
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => inbox.subscriptions += 1,
                        Ok(Event::Incoming(Packet::Publish(publish))) => {
                            inbox.messages.push(Message {
                                topic: publish.topic.clone(),
                                payload: parse_payload(&publish.payload),
                                retained: publish.retain,
                                received_at: Instant::now(),
                            });
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            inbox.last_error = Some(e.to_string());
                            drop(inbox);
                            // rumqttc reconnects on the next poll; do not spin
                            // while the broker is away.
                            thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    }
                    drop(inbox);
                    shared.changed.notify_all();
                }
                let _ = client.try_disconnect();
            })
        };
        let subscriber = Subscriber {
            filter: filter.to_owned(),
            shared,
            stop,
            thread: Some(thread),
        };
        subscriber.wait_subscriptions(1, START_TIMEOUT);
        subscriber
    }

    /// How many times the subscription has been acknowledged: one more after
    /// each reconnection.
    pub fn subscriptions(&self) -> u64 {
        self.shared
            .inbox
            .lock()
            .expect("subscriber inbox")
            .subscriptions
    }

    /// Waits until the subscription has been acknowledged `n` times in all;
    /// after a broker restart, pass `subscriptions()` from before it plus one.
    pub fn wait_subscriptions(&self, n: u64, timeout: Duration) {
        let inbox = self.shared.inbox.lock().expect("subscriber inbox");
        let (inbox, _) = self
            .shared
            .changed
            .wait_timeout_while(inbox, timeout, |inbox| inbox.subscriptions < n)
            .expect("subscriber inbox");
        assert!(
            inbox.subscriptions >= n,
            "subscription to {:?} acknowledged {} times, expected {n} within {timeout:?} (last error: {:?}; {SETUP_HINT} if mosquitto is missing)",
            self.filter,
            inbox.subscriptions,
            inbox.last_error
        );
    }

    /// Every message received so far, oldest first.
    pub fn messages(&self) -> Vec<Message> {
        self.shared
            .inbox
            .lock()
            .expect("subscriber inbox")
            .messages
            .clone()
    }

    /// The messages received so far on `topic`, oldest first.
    pub fn messages_on(&self, topic: &str) -> Vec<Message> {
        self.shared
            .inbox
            .lock()
            .expect("subscriber inbox")
            .messages
            .iter()
            .filter(|m| m.topic == topic)
            .cloned()
            .collect()
    }

    /// Forgets what was received, so that later waits see only new messages.
    pub fn clear(&self) {
        self.shared
            .inbox
            .lock()
            .expect("subscriber inbox")
            .messages
            .clear();
    }

    /// The payload of the latest message on `topic` that satisfies
    /// `predicate`, waiting up to `timeout` for one; panics with what arrived
    /// on that topic (or, if nothing did, on any topic) otherwise.
    pub fn wait_for(
        &self,
        topic: &str,
        predicate: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Value {
        self.wait_for_message(topic, predicate, timeout).payload
    }

    /// Like `wait_for`, with the whole message (retained flag included).
    pub fn wait_for_message(
        &self,
        topic: &str,
        predicate: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Message {
        let latest = |inbox: &Inbox| {
            inbox
                .messages
                .iter()
                .rev()
                .find(|m| m.topic == topic && predicate(&m.payload))
                .cloned()
        };
        let deadline = Instant::now() + timeout;
        let mut inbox = self.shared.inbox.lock().expect("subscriber inbox");
        loop {
            if let Some(message) = latest(&inbox) {
                return message;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            inbox = self
                .shared
                .changed
                .wait_timeout(inbox, deadline - now)
                .expect("subscriber inbox")
                .0;
        }
        let on_topic: Vec<&Message> = inbox.messages.iter().filter(|m| m.topic == topic).collect();
        let seen = if on_topic.is_empty() {
            let topics: Vec<&str> = inbox.messages.iter().map(|m| m.topic.as_str()).collect();
            format!("nothing on that topic; topics seen: {topics:?}")
        } else {
            on_topic
                .iter()
                .map(|m| format!("  retained={} {}", m.retained, m.payload))
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "no message on {topic:?} matched within {timeout:?} (subscribed to {:?}, last connection error: {:?}); received:\n{seen}",
            self.filter, inbox.last_error
        );
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn parse_payload(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

// --- registry --------------------------------------------------------------------

/// A Docker registry of its own on 127.0.0.1 (plain HTTP, which the engine
/// allows for 127.0.0.0/8), with its own storage and, optionally, basic auth.
/// Images pushed through it are untagged locally when it is dropped.
pub struct Registry {
    port: u16,
    child: Child,
    dir: TempDir,
    auth: Option<(String, String)>,
    pushed: Mutex<Vec<String>>,
}

impl Registry {
    /// A registry anyone may push to and pull from.
    pub fn new() -> Registry {
        Registry::start(None)
    }

    /// A registry that requires `username` and `password` (htpasswd, bcrypt).
    pub fn with_auth(username: &str, password: &str) -> Registry {
        Registry::start(Some((username.to_owned(), password.to_owned())))
    }

    fn start(auth: Option<(String, String)>) -> Registry {
        let dir = tempfile::tempdir().expect("temp dir for the registry");
        let auth_section = match &auth {
            Some((username, password)) => {
                let htpasswd = dir.path().join("htpasswd");
                let out = Command::new("htpasswd")
                    .args(["-Bbn", username, password])
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run htpasswd ({e}): {SETUP_HINT}"));
                assert!(
                    out.status.success(),
                    "htpasswd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let line = String::from_utf8(out.stdout).expect("htpasswd prints ASCII");
                fs::write(&htpasswd, format!("{}\n", line.trim())).expect("write htpasswd");
                fs::write(dir.path().join("password"), password).expect("write password file");
                format!(
                    "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        let config = dir.path().join("config.yml");
        let log = dir.path().join("registry.log");
        for _ in 0..5 {
            let port = free_port();
            fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: warn\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n\
                     {auth_section}",
                    dir.path().join("data").display()
                ),
            )
            .expect("write registry config");
            let mut child = spawn_logged(
                "docker-registry",
                &["serve", config.to_str().expect("utf-8 temp path")],
                &log,
            );
            // With auth on, an anonymous GET /v2/ is refused: that is up too.
            let auth_on = auth.is_some();
            let up = |status: u16| status == 200 || (auth_on && status == 401);
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if child.try_wait().expect("wait for registry").is_some() {
                    let text = read_lossy(&log);
                    assert!(
                        text.contains("address already in use"),
                        "docker-registry exited:\n{text}"
                    );
                    break;
                }
                if http_status(port, "/v2/").is_some_and(&up) {
                    return Registry {
                        port,
                        child,
                        dir,
                        auth,
                        pushed: Mutex::new(Vec::new()),
                    };
                }
                if Instant::now() >= deadline {
                    kill_and_reap(&mut child);
                    panic!(
                        "docker-registry did not answer /v2/ on port {port} within {START_TIMEOUT:?}:\n{}",
                        read_lossy(&log)
                    );
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        panic!(
            "docker-registry could not bind a port:\n{}",
            read_lossy(&log)
        );
    }

    /// `127.0.0.1:PORT`, the registry part of an image reference and the
    /// `server` of berth's `[[docker.registries]]`.
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn username(&self) -> Option<&str> {
        self.auth.as_ref().map(|(u, _)| u.as_str())
    }

    pub fn password(&self) -> Option<&str> {
        self.auth.as_ref().map(|(_, p)| p.as_str())
    }

    /// A file holding the password and nothing else (no newline), for
    /// berth's `password_file`.
    pub fn password_file(&self) -> Option<PathBuf> {
        self.auth.as_ref().map(|_| self.dir.path().join("password"))
    }

    /// berth's `[[docker.registries]]` entry for this registry, if it has auth.
    pub fn login(&self) -> Option<RegistryLogin> {
        Some(RegistryLogin {
            server: self.server(),
            username: self.username()?.to_owned(),
            password_file: self.password_file()?,
        })
    }

    /// Tags `local_image` as `<server>/<repo_tag>`, pushes it (logged in when
    /// the registry has auth) and returns that reference.
    pub fn push(&self, local_image: &str, repo_tag: &str) -> String {
        let reference = format!("{}/{repo_tag}", self.server());
        docker(&["tag", local_image, &reference]);
        self.pushed
            .lock()
            .expect("pushed list")
            .push(reference.clone());
        self.logged_in_docker(&["push", &reference]);
        reference
    }

    /// Pulls `reference` through the engine, logged in when the registry has
    /// auth.
    pub fn pull(&self, reference: &str) {
        self.logged_in_docker(&["pull", reference]);
    }

    /// Pulls `reference` with no credentials at all; the error is the CLI's
    /// stderr.
    pub fn pull_anonymously(&self, reference: &str) -> Result<(), String> {
        let config = self.dir.path().join("docker-anonymous");
        fs::create_dir_all(&config).expect("create empty docker config dir");
        let out = Command::new("docker")
            .env("DOCKER_CONFIG", &config)
            .args(["pull", reference])
            .output()
            .expect("run docker");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn log(&self) -> String {
        read_lossy(&self.dir.path().join("registry.log"))
    }

    /// Stops the registry process, as a registry out of reach; its data
    /// and the images it pushed stay until it is dropped.
    pub fn stop(&mut self) {
        kill_and_reap(&mut self.child);
        assert!(
            http_status(self.port, "/v2/").is_none(),
            "the registry on port {} still answers after it was stopped",
            self.port
        );
    }

    /// Runs the docker CLI with a config directory of this registry's own
    /// (so that parallel tests never share `~/.docker/config.json`), logged
    /// in for the duration of the command when the registry has auth.
    fn logged_in_docker(&self, args: &[&str]) -> String {
        let config = self.dir.path().join("docker-config");
        fs::create_dir_all(&config).expect("create docker config dir");
        let config = config.to_str().expect("utf-8 temp path");
        let server = self.server();
        if let Some((username, password)) = &self.auth {
            let mut login = Command::new("docker")
                .env("DOCKER_CONFIG", config)
                .args(["login", &server, "--username", username, "--password-stdin"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run docker login");
            login
                .stdin
                .take()
                .expect("docker login stdin")
                .write_all(password.as_bytes())
                .expect("write password to docker login");
            let out = login.wait_with_output().expect("wait for docker login");
            assert!(
                out.status.success(),
                "docker login {server} failed: {}\nregistry log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        let result = docker_in(Some(config), args);
        if self.auth.is_some() {
            let _ = docker_in(Some(config), &["logout", &server]);
        }
        result.unwrap_or_else(|e| {
            panic!("docker {args:?} failed: {e}\nregistry log:\n{}", self.log())
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        let pushed = std::mem::take(&mut *self.pushed.lock().unwrap_or_else(|e| e.into_inner()));
        for reference in pushed {
            let _ = try_docker(&["rmi", &reference]);
        }
    }
}

/// The status code of `GET http://127.0.0.1:port/path`, or None if nothing
/// answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    // "HTTP/1.1 200"
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

// --- Docker engine -------------------------------------------------------------

fn docker_in(config_dir: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut command = Command::new("docker");
    if let Some(dir) = config_dir {
        command.env("DOCKER_CONFIG", dir);
    }
    let out: Output = command
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker ({e}): {SETUP_HINT}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ))
    }
}

/// Runs the docker CLI and returns its stdout; a failure is an error holding
/// the exit status and stderr.
pub fn try_docker(args: &[&str]) -> Result<String, String> {
    docker_in(None, args)
}

/// Runs the docker CLI and returns its stdout; panics with stderr on failure.
pub fn docker(args: &[&str]) -> String {
    try_docker(args).unwrap_or_else(|e| {
        panic!("docker {args:?} failed: {e}\n(is the engine running? {SETUP_HINT})")
    })
}

/// Whether the [`LONG_RUNNING`] script of this run of `container` has set
/// its traps.
pub fn long_running_ready(container: &str) -> bool {
    let check = format!("test \"$(cat {READY_FILE})\" = \"$(cut -d' ' -f22 /proc/1/stat)\"");
    try_docker(&["exec", container, "sh", "-c", &check]).is_ok()
}

/// Crashes the [`LONG_RUNNING`] script of `container` (exit 5), once it is
/// ready to take the signal.
pub fn crash(container: &str) {
    assert!(
        wait_until(WAIT, || long_running_ready(container)),
        "{container}: the script did not write {READY_FILE} within {WAIT:?}"
    );
    docker(&["exec", container, "sh", "-c", "kill -USR1 1"]);
}

/// The engine's data root (`DockerRootDir`): `/var/lib/docker` unless the
/// engine was told otherwise.
pub fn engine_root_dir() -> PathBuf {
    PathBuf::from(docker(&["info", "--format", "{{.DockerRootDir}}"]).trim())
}

/// The ids of every container, running or not, labelled `berth.device=<device_id>`.
pub fn container_ids(device_id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "--all",
        "--quiet",
        "--no-trunc",
        "--filter",
        &format!("label=berth.device={device_id}"),
    ])
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// `docker inspect` of every container of the device.
pub fn containers(device_id: &str) -> Vec<Value> {
    let mut error = String::new();
    // A container removed between `ps` and `inspect` fails the inspect (a
    // removal under way can take a while on a loaded engine): ask again.
    for attempt in 0..20 {
        if attempt > 0 {
            thread::sleep(Duration::from_millis(50));
        }
        let ids = container_ids(device_id);
        if ids.is_empty() {
            return Vec::new();
        }
        let mut args = vec!["inspect", "--type", "container"];
        args.extend(ids.iter().map(String::as_str));
        match try_docker(&args) {
            Ok(json) => {
                return serde_json::from_str(&json).expect("docker inspect prints a JSON array")
            }
            Err(e) => error = e,
        }
    }
    panic!("docker inspect of the containers of {device_id} failed: {error}");
}

/// `docker inspect` of the container with this exact name, if there is one.
pub fn container(name: &str) -> Option<Value> {
    let json = try_docker(&["inspect", "--type", "container", name]).ok()?;
    let mut all: Vec<Value> = serde_json::from_str(&json).expect("docker inspect prints JSON");
    all.pop()
}

/// Removes every container of the device, whatever state it is in.
pub fn remove_containers(device_id: &str) {
    let ids = container_ids(device_id);
    if ids.is_empty() {
        return;
    }
    let mut args = vec!["rm", "--force", "--volumes"];
    args.extend(ids.iter().map(String::as_str));
    // A container that is already going away is no failure here.
    let _ = try_docker(&args);
}

/// The `State` of `docker inspect` of one container, by id or name.
pub fn container_state(container: &str) -> Value {
    let out = docker(&["inspect", "--format", "{{json .State}}", container]);
    serde_json::from_str(out.trim()).expect("docker inspect prints JSON")
}

/// The environment (`KEY=value`) of a container, from its `docker inspect`.
pub fn env_of(container: &Value) -> Vec<String> {
    container["Config"]["Env"]
        .as_array()
        .expect("Config.Env of docker inspect")
        .iter()
        .map(|v| v.as_str().expect("an Env entry is a string").to_owned())
        .collect()
}

/// The engine's own event stream for one device, recorded to a file from the
/// moment it is made. The engine keeps only its 256 most recent events for a
/// later `docker events --since`, which tests running side by side overflow;
/// a stream opened before berth starts sees every event.
pub struct EventLog {
    child: Child,
    path: PathBuf,
    device_id: String,
    _dir: TempDir,
}

/// Label of the marker containers with which an [`EventLog`] knows that its
/// stream has caught up. They carry the device's `berth.device` too (the
/// engine ANDs label filters), but no deployment, component or executable
/// label, so berth ignores their events and never lists them as its own.
const EVENT_LOG_MARKER: &str = "berth-test.event-log-marker";

impl EventLog {
    pub fn start(device_id: &str) -> EventLog {
        let dir = tempfile::tempdir().expect("temp dir for the event log");
        let path = dir.path().join("events.jsonl");
        let file = File::create(&path).expect("create the event log");
        let since = format!("{:.9}", nanos_now() as f64 / 1e9);
        let child = Command::new("docker")
            .args(["events", "--since", &since, "--format", "{{json .}}"])
            .arg("--filter")
            .arg(format!("label=berth.device={device_id}"))
            .args(["--filter", "type=container"])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("docker events: {e} ({SETUP_HINT})"));
        // `--since` covers the moment the stream takes to open.
        EventLog {
            child,
            path,
            device_id: device_id.to_owned(),
            _dir: dir,
        }
    }

    fn events(&self) -> Vec<Value> {
        fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// Returns once the log holds every event the engine had emitted when
    /// it was called: the engine sends its events in order, so once the
    /// `destroy` of a marker container made now is in the file, so is
    /// everything before it.
    pub fn catch_up(&self) {
        let device = format!("berth.device={}", self.device_id);
        let marker = docker(&[
            "create",
            "--label",
            &device,
            "--label",
            EVENT_LOG_MARKER,
            TEST_IMAGE,
            "true",
        ])
        .trim()
        .to_owned();
        docker(&["rm", &marker]);
        let is_marker = |v: &Value| {
            (v["id"] == marker.as_str() || v["Actor"]["ID"] == marker.as_str())
                && v["Action"] == "destroy"
        };
        assert!(
            wait_until(WAIT, || self.events().iter().any(is_marker)),
            "the engine's event stream did not deliver the destroy of marker {marker} within {WAIT:?}"
        );
    }

    /// (action, engine time in ns) of a container's events since
    /// `since_nanos`, up to the moment of the call.
    pub fn history(&self, container_id: &str, since_nanos: i128) -> Vec<(String, i128)> {
        self.catch_up();
        self.events()
            .into_iter()
            .filter(|v| v["id"] == container_id || v["Actor"]["ID"] == container_id)
            .map(|v| {
                (
                    v["Action"].as_str().unwrap_or("").to_owned(),
                    v["timeNano"].as_i64().unwrap_or(0) as i128,
                )
            })
            .filter(|(_, t)| *t >= since_nanos)
            .collect()
    }

    /// How many times the engine has started a container.
    pub fn starts(&self, container_id: &str) -> usize {
        self.history(container_id, 0)
            .iter()
            .filter(|(a, _)| a == "start")
            .count()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes every container labelled `berth.device=<device_id>` when dropped,
/// also when the test panics. Create it before anything starts containers.
pub struct EngineGuard(pub String);

impl EngineGuard {
    pub fn new(device_id: &str) -> EngineGuard {
        EngineGuard(device_id.to_owned())
    }

    pub fn containers(&self) -> Vec<Value> {
        containers(&self.0)
    }
}

impl Drop for EngineGuard {
    fn drop(&mut self) {
        remove_containers(&self.0);
    }
}

// --- berth ---------------------------------------------------------------------

/// One `[[docker.registries]]` entry of berth's config.
#[derive(Debug, Clone)]
pub struct RegistryLogin {
    pub server: String,
    pub username: String,
    pub password_file: PathBuf,
}

/// What a test may choose in berth's agent config (SPEC 3); the paths are
/// the helper's. The defaults keep tests fast: short back-off, short
/// keep-alive, debug logs.
#[derive(Debug, Clone)]
pub struct BerthConfig {
    pub device_id: String,
    pub mqtt_port: u16,
    pub topic_prefix: String,
    pub keep_alive_secs: u64,
    pub docker_host: String,
    pub registries: Vec<RegistryLogin>,
    pub backoff_initial_ms: u64,
    pub backoff_max_secs: u64,
    pub backoff_reset_after_secs: u64,
    pub ros_master_image: String,
    pub ros_master_command: Vec<String>,
    pub ros_master_uri: String,
    pub log_level: String,
    pub log_format: String,
    /// `mqtt`, or `mqtts` for TLS; the broker is `mqtt_host`:`mqtt_port`.
    pub mqtt_scheme: String,
    /// The host of the broker's url: `127.0.0.1`, or `[::1]` for IPv6.
    pub mqtt_host: String,
    pub mqtt_username: Option<String>,
    pub mqtt_password_file: Option<PathBuf>,
    pub mqtt_ca_file: Option<PathBuf>,
    pub mqtt_cert_file: Option<PathBuf>,
    pub mqtt_key_file: Option<PathBuf>,
}

impl BerthConfig {
    pub fn new(device_id: &str, mqtt_port: u16) -> BerthConfig {
        BerthConfig {
            device_id: device_id.to_owned(),
            mqtt_port,
            topic_prefix: "berth".to_owned(),
            keep_alive_secs: 5,
            docker_host: "unix:///var/run/docker.sock".to_owned(),
            registries: Vec::new(),
            backoff_initial_ms: 200,
            backoff_max_secs: 2,
            backoff_reset_after_secs: 10,
            ros_master_image: TEST_IMAGE.to_owned(),
            // Stands in for roscore: runs until stopped, and stops at once
            // on SIGTERM (PID 1 ignores signals it has no handler for).
            ros_master_command: ["sh", "-c", UNTIL_SIGTERM].map(str::to_owned).to_vec(),
            ros_master_uri: "http://localhost:11311".to_owned(),
            log_level: "debug".to_owned(),
            log_format: "text".to_owned(),
            mqtt_scheme: "mqtt".to_owned(),
            mqtt_host: "127.0.0.1".to_owned(),
            mqtt_username: None,
            mqtt_password_file: None,
            mqtt_ca_file: None,
            mqtt_cert_file: None,
            mqtt_key_file: None,
        }
    }

    pub fn registry(mut self, login: RegistryLogin) -> BerthConfig {
        self.registries.push(login);
        self
    }

    pub fn topic_prefix(mut self, prefix: &str) -> BerthConfig {
        self.topic_prefix = prefix.to_owned();
        self
    }

    pub fn backoff(mut self, initial_ms: u64, max_secs: u64, reset_after_secs: u64) -> BerthConfig {
        self.backoff_initial_ms = initial_ms;
        self.backoff_max_secs = max_secs;
        self.backoff_reset_after_secs = reset_after_secs;
        self
    }

    /// The topic of `suffix` for this device: `<prefix>/<device_id>/<suffix>`.
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}/{}/{suffix}", self.topic_prefix, self.device_id)
    }

    fn to_toml(&self, dir: &Path) -> String {
        let s = |v: &str| toml::Value::String(v.to_owned()).to_string();
        let p = |v: PathBuf| s(v.to_str().expect("utf-8 temp path"));
        let mut text = format!(
            "device_id = {}\n\
             deployments_dir = {}\n\
             state_dir = {}\n\
             boot_id_file = {}\n\
             \n\
             [docker]\n\
             host = {}\n",
            s(&self.device_id),
            p(dir.join("deployments.d")),
            p(dir.join("state")),
            p(dir.join("boot_id")),
            s(&self.docker_host),
        );
        for r in &self.registries {
            text += &format!(
                "\n[[docker.registries]]\nserver = {}\nusername = {}\npassword_file = {}\n",
                s(&r.server),
                s(&r.username),
                p(r.password_file.clone()),
            );
        }
        let command = toml::Value::Array(
            self.ros_master_command
                .iter()
                .map(|a| toml::Value::String(a.clone()))
                .collect(),
        );
        let mut mqtt_extra = String::new();
        if let Some(username) = &self.mqtt_username {
            mqtt_extra += &format!("username = {}\n", s(username));
        }
        for (key, path) in [
            ("password_file", &self.mqtt_password_file),
            ("ca_file", &self.mqtt_ca_file),
            ("cert_file", &self.mqtt_cert_file),
            ("key_file", &self.mqtt_key_file),
        ] {
            if let Some(path) = path {
                mqtt_extra += &format!("{key} = {}\n", p(path.clone()));
            }
        }
        text += &format!(
            "\n[mqtt]\nurl = {}\ntopic_prefix = {}\nkeep_alive_secs = {}\n{mqtt_extra}\
             \n[restart]\nbackoff_initial_ms = {}\nbackoff_max_secs = {}\nbackoff_reset_after_secs = {}\n\
             \n[ros]\nmaster_image = {}\nmaster_command = {command}\nmaster_uri = {}\n\
             \n[log]\nlevel = {}\nformat = {}\n",
            s(&format!(
                "{}://{}:{}",
                self.mqtt_scheme, self.mqtt_host, self.mqtt_port
            )),
            s(&self.topic_prefix),
            self.keep_alive_secs,
            self.backoff_initial_ms,
            self.backoff_max_secs,
            self.backoff_reset_after_secs,
            s(&self.ros_master_image),
            s(&self.ros_master_uri),
            s(&self.log_level),
            s(&self.log_format),
        );
        text
    }
}

/// The berth binary as `berth run --config <dir>/berth.toml`, with its
/// deployments, state and boot id file in a temp dir of its own, and its
/// stdout and stderr kept in files there. Dropping it kills berth (SIGKILL)
/// and leaves the containers: pair it with an `EngineGuard`.
pub struct Berth {
    dir: TempDir,
    config: BerthConfig,
    boot_id: String,
    child: Option<Child>,
    /// Extra environment for `berth run` (NOTIFY_SOCKET, say).
    env: Vec<(String, String)>,
}

impl Berth {
    /// Writes the config, an empty deployments dir, a state dir and a boot id;
    /// does not start berth.
    pub fn new(config: BerthConfig) -> Berth {
        let dir = tempfile::tempdir().expect("temp dir for berth");
        fs::create_dir(dir.path().join("deployments.d")).expect("create deployments dir");
        // As systemd's StateDirectory= would.
        fs::create_dir(dir.path().join("state")).expect("create state dir");
        let mut berth = Berth {
            dir,
            config,
            boot_id: String::new(),
            child: None,
            env: Vec::new(),
        };
        berth.write_config();
        berth.set_boot_id(&unique_id("boot"));
        berth
    }

    pub fn config(&self) -> &BerthConfig {
        &self.config
    }

    /// Change the config, then `write_config()` and `sighup()` (or restart).
    pub fn config_mut(&mut self) -> &mut BerthConfig {
        &mut self.config
    }

    /// `<prefix>/<device_id>/<suffix>`.
    pub fn topic(&self, suffix: &str) -> String {
        self.config.topic(suffix)
    }

    pub fn device_id(&self) -> &str {
        &self.config.device_id
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("berth.toml")
    }

    pub fn deployments_dir(&self) -> PathBuf {
        self.dir.path().join("deployments.d")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn boot_id_file(&self) -> PathBuf {
        self.dir.path().join("boot_id")
    }

    /// Writes `berth.toml` from the current `BerthConfig`.
    pub fn write_config(&self) {
        write_atomically(&self.config_path(), &self.config.to_toml(self.dir.path()));
    }

    /// Replaces `berth.toml` with `text`, for tests of broken configs.
    pub fn write_raw_config(&self, text: &str) {
        write_atomically(&self.config_path(), text);
    }

    /// Writes `<deployments_dir>/<id>.toml` in one step (berth never sees half
    /// a file).
    pub fn write_deployment(&self, id: &str, toml_text: &str) {
        write_atomically(&self.deployment_path(id), toml_text);
    }

    pub fn remove_deployment(&self, id: &str) {
        let path = self.deployment_path(id);
        fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {}: {e}", path.display()));
    }

    pub fn deployment_path(&self, id: &str) -> PathBuf {
        self.deployments_dir().join(format!("{id}.toml"))
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Writes a new boot id, as a reboot would; berth reads it when it starts.
    pub fn set_boot_id(&mut self, boot_id: &str) {
        write_atomically(&self.boot_id_file(), &format!("{boot_id}\n"));
        self.boot_id = boot_id.to_owned();
    }

    /// Sets `key=value` in the environment of the next `start()`.
    pub fn env(&mut self, key: &str, value: &str) -> &mut Berth {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts `berth run`; returns at once.
    pub fn start(&mut self) {
        assert!(!self.is_running(), "start: berth is already running");
        let stdout = append_file(&self.stdout_path());
        let stderr = append_file(&self.stderr_path());
        let config = self.config_path();
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_BACKTRACE", "1")
            .env_remove("RUST_LOG")
            .env_remove("BERTH_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn berth");
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().expect("wait for berth").is_none(),
            None => false,
        }
    }

    /// Sends SIGHUP: berth re-reads its config and deployment files.
    pub fn sighup(&self) {
        send_signal(
            self.child.as_ref().expect("sighup: berth is not running"),
            Signal::SIGHUP,
        );
    }

    /// Sends SIGTERM and waits for berth to exit (20 s at most, more than the
    /// unit's TimeoutStopSec); panics with the log if it does not.
    pub fn sigterm(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("sigterm: berth was not started");
        if child.try_wait().expect("wait for berth").is_none() {
            send_signal(child, Signal::SIGTERM);
        }
        self.wait_exit(Duration::from_secs(20))
    }

    /// Kills berth with SIGKILL, as a crash or a power cut would: no clean-up,
    /// no offline message (the broker sends the last will).
    pub fn kill9(&mut self) {
        let child = self.child.as_mut().expect("kill9: berth was not started");
        kill_and_reap(child);
    }

    /// Waits for berth to exit by itself (a bad config, say) and returns its
    /// status; panics with the log after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("berth was not started");
        match wait_exit(child, timeout) {
            Some(status) => status,
            None => {
                kill_and_reap(child);
                panic!(
                    "berth did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Runs another berth command (`check-config`, `status --json`, ...)
    /// against this instance's config (through `BERTH_CONFIG`).
    pub fn command(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(args)
            .env("BERTH_CONFIG", self.config_path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run berth")
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path())
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path())
    }

    /// stdout and stderr of every run of this instance so far.
    pub fn log(&self) -> String {
        format!(
            "--- berth stdout ---\n{}--- berth stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// Waits until the output contains `needle`; panics with the log if it
    /// does not within `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let found = wait_until(timeout, || {
            self.stdout().contains(needle) || self.stderr().contains(needle)
        });
        assert!(
            found,
            "berth did not log {needle:?} within {timeout:?}; log:\n{}",
            self.log()
        );
    }

    fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("berth.stdout.log")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("berth.stderr.log")
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
        // The test's output is shown when it fails: put berth's there too.
        if thread::panicking() {
            eprintln!("{}", tail(&self.log(), 200));
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Writes `path` through a temp file and a rename, so that a reader sees the
/// old content or the new, never part of it. The temp name does not end in
/// `.toml`, so berth does not take it for a deployment.
pub fn write_atomically(path: &Path, text: &str) {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

// --- deployments -----------------------------------------------------------------

/// A deployment file (SPEC 4) with the id `id`, package `pkg-<id>` version
/// `1.2.3`, and one component `main` whose one executable `app` runs
/// `script` under `sh -c` in `image`. `extra` goes into the top-level table
/// before the components, a setting a line: `restart_policy("never")`,
/// `depends_on = ["a"]`, `env = { K = "v" }`, or "" for none.
pub fn deployment_toml(id: &str, extra: &str, image: &str, script: &str) -> String {
    format!(
        r#"id = "{id}"
package = "pkg-{id}"
package_version = "1.2.3"
{extra}

[[components]]
name = "main"

[[components.executables]]
name = "app"
image = "{image}"
command = ["sh", "-c", {script}]
"#,
        script = toml::Value::String(script.to_owned())
    )
}

/// `restart = "<policy>"`: the `extra` of [`deployment_toml`] for a
/// deployment with that restart policy.
pub fn restart_policy(policy: &str) -> String {
    format!(r#"restart = "{policy}""#)
}

/// A deployment file from [`deployment_toml`] with `pull = "never"` for its
/// executable: berth must find the image in the engine.
pub fn pull_never(deployment: &str) -> String {
    let mut out = String::with_capacity(deployment.len() + 16);
    for line in deployment.lines() {
        out.push_str(line);
        out.push('\n');
        if line.starts_with("image = ") {
            out.push_str("pull = \"never\"\n");
        }
    }
    assert!(out.contains("pull = "), "no image line in:\n{deployment}");
    out
}

/// The first executable of a deployment document (`executables[0]`), the
/// only one of a deployment from [`deployment_toml`].
pub fn exe(doc: &Value) -> &Value {
    &doc["executables"][0]
}

// --- one device's harness --------------------------------------------------------

/// What most end-to-end tests start from: a device id of their own, an
/// `EngineGuard` for it, a broker, berth configured for both (not started)
/// and a subscriber to every topic of the device, subscribed before berth
/// publishes anything.
///
/// Dropping it stops the subscriber, kills berth, stops the broker and then
/// removes the device's containers, also when the test panics.
pub struct Harness {
    /// Subscribed to `<topic_prefix>/<device_id>/#`.
    pub sub: Subscriber,
    pub berth: Berth,
    pub broker: Broker,
    /// The engine's events for the device, from before berth starts.
    pub events: EventLog,
    _guard: EngineGuard,
}

impl Harness {
    /// A device id made from `prefix` (see [`unique_id`]), and berth's
    /// config as `configure` makes it from [`BerthConfig::new`]'s defaults:
    /// `|c| c` keeps them, `|c| c.backoff(100, 1, 30)` shortens the back-off.
    pub fn new(prefix: &str, configure: impl FnOnce(BerthConfig) -> BerthConfig) -> Harness {
        let device = unique_id(prefix);
        let guard = EngineGuard::new(&device);
        let events = EventLog::start(&device);
        let broker = Broker::new();
        let berth = Berth::new(configure(BerthConfig::new(&device, broker.port())));
        let sub = Subscriber::new(broker.port(), &berth.topic("#"));
        Harness {
            sub,
            berth,
            broker,
            events,
            _guard: guard,
        }
    }

    /// The topic of deployment `id`'s document: `<prefix>/<device>/deployments/<id>`.
    pub fn deployment_topic(&self, id: &str) -> String {
        self.berth.topic(&format!("deployments/{id}"))
    }

    /// The latest document of deployment `id` that satisfies `predicate`,
    /// waiting up to [`WAIT`] for one (see [`Subscriber::wait_for`]).
    pub fn wait(&self, id: &str, predicate: impl Fn(&Value) -> bool) -> Value {
        self.sub
            .wait_for(&self.deployment_topic(id), predicate, WAIT)
    }

    /// The container id of deployment `id`'s first executable, waiting for a
    /// document that names one.
    pub fn container_id(&self, id: &str) -> String {
        exe(&self.wait(id, |d| exe(d)["container_id"].is_string()))["container_id"]
            .as_str()
            .expect("container_id is a string")
            .to_owned()
    }

    /// `docker inspect` of the container of `executable` in `deployment`;
    /// panics if there is none.
    pub fn container(&self, deployment: &str, executable: &str) -> Value {
        containers(self.berth.device_id())
            .into_iter()
            .find(|c| {
                c["Config"]["Labels"]["berth.deployment"] == deployment
                    && c["Config"]["Labels"]["berth.executable"] == executable
            })
            .unwrap_or_else(|| panic!("no container for {deployment}/{executable}"))
    }

    /// Waits until berth's saved state (`state.json`, written atomically)
    /// satisfies `predicate`; returns it.
    pub fn wait_saved(&self, what: &str, predicate: impl Fn(&Value) -> bool) -> Value {
        let path = self.berth.state_dir().join("state.json");
        let read = || {
            fs::read_to_string(&path)
                .ok()
                .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        };
        let mut last = None;
        let held = wait_until(WAIT, || {
            last = read();
            last.as_ref().is_some_and(&predicate)
        });
        assert!(
            held,
            "berth did not save {what} within {WAIT:?}; state.json: {last:?}"
        );
        last.expect("checked above")
    }

    /// berth's saved state, `state.json` in its state dir, parsed.
    pub fn saved_state(&self) -> Value {
        let path = self.berth.state_dir().join("state.json");
        let text =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_str(&text).expect("state.json is JSON")
    }
}
