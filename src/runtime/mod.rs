//! The container engine as berth sees it: a trait with berth's own types, so
//! that the supervisor can be driven by the real Docker engine
//! (`runtime::docker`) or by a fake in unit tests. No bollard type crosses
//! this boundary, and no engine message text is read above it: the adapter
//! classifies every answer into [`RuntimeError`].
//!
//! Beside the trait live the pure helpers that interpret what the engine
//! reports: signal names of exit codes, CPU percent from two samples, pull
//! progress, the bounds of a log tail, and the masking of secret env values.

pub mod docker;
#[cfg(test)]
pub mod fake;
pub mod housekeeping;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;

/// Credentials for one registry, already read from their files.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub server: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    // The password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("server", &self.server)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Everything berth hands the engine to create one container. Its `Debug`
/// form masks secret-looking env values ([`masked_env`]).
#[derive(Clone, PartialEq, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// `None` keeps the image's own command.
    pub cmd: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub nano_cpus: Option<i64>,
    pub memory_bytes: Option<i64>,
    /// `host:container[:ro]` binds.
    pub binds: Vec<String>,
    pub devices: Vec<String>,
    /// Engine network mode: `host` by default, so that the executables of a
    /// component reach each other on localhost; or the name of an isolated
    /// component's own network.
    pub network_mode: String,
    /// Names the container answers to on that network (isolated components).
    pub network_aliases: Vec<String>,
    /// `host:ip` entries for `/etc/hosts` (`host-gateway` is the host).
    pub extra_hosts: Vec<String>,
    /// An `exec` liveness probe, run by the engine as the container's
    /// healthcheck; its verdicts arrive as [`EventAction::Health`] events.
    pub healthcheck: Option<Healthcheck>,
}

impl std::fmt::Debug for ContainerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerSpec")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("cmd", &self.cmd)
            .field("env", &masked_env(&self.env))
            .field("labels", &self.labels)
            .field("nano_cpus", &self.nano_cpus)
            .field("memory_bytes", &self.memory_bytes)
            .field("binds", &self.binds)
            .field("devices", &self.devices)
            .field("network_mode", &self.network_mode)
            .field("network_aliases", &self.network_aliases)
            .field("extra_hosts", &self.extra_hosts)
            .field("healthcheck", &self.healthcheck)
            .finish()
    }
}

/// A command the engine runs inside the container to judge its health
/// (the engine's `HealthConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    /// Exec form, run without a shell; exit 0 is healthy.
    pub command: Vec<String>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failures that make the container unhealthy.
    pub retries: u32,
    /// Grace after each start: failures in it do not count.
    pub start_period: Duration,
}

impl Healthcheck {
    /// The engine-run healthcheck of an `exec` probe; `None` for the probes
    /// berth runs itself (`tcp`, `http`) and for no probe.
    pub fn from_probe(probe: Option<&crate::model::Probe>) -> Option<Healthcheck> {
        let probe = probe?;
        match &probe.check {
            crate::model::ProbeCheck::Exec(command) => Some(Healthcheck {
                command: command.clone(),
                interval: probe.period(),
                timeout: probe.timeout(),
                retries: probe.failure_threshold,
                start_period: probe.initial_delay(),
            }),
            crate::model::ProbeCheck::Tcp(_) | crate::model::ProbeCheck::Http(_) => None,
        }
    }
}

/// How the engine's `json-file` log driver rotates a container's log
/// (`max-size`, `max-file`), so that a chatty executable never fills the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRotation {
    pub max_size_mb: u64,
    pub max_files: u32,
}

/// The engine's view of one container.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The image it was created from, as given.
    pub image: String,
    /// `created`, `running`, `exited`, `restarting`, `paused`, `dead`, `removing`.
    pub state: String,
    pub running: bool,
    pub exit_code: Option<i64>,
    /// RFC 3339 as the engine gives it; `0001-01-01T00:00:00Z` when never started.
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The engine's error from the last failed start, if any.
    pub error: Option<String>,
    /// The kernel's OOM killer ended the last run (the limit was `memory_mb`).
    pub oom_killed: bool,
    /// The container's address on its own network (isolated components);
    /// `None` on the host network, where it is reached at 127.0.0.1.
    pub ip_address: Option<String>,
    /// The engine-run healthcheck's verdict; `None` without one.
    pub health: Option<Health>,
}

impl ContainerInfo {
    /// The engine reports a never-started container with the zero time.
    pub fn has_started(&self) -> bool {
        self.started_at
            .as_deref()
            .is_some_and(|t| !t.starts_with("0001-"))
    }

    /// The signal that ended the last run, when the exit code says one did.
    pub fn signal(&self) -> Option<&'static str> {
        self.exit_code.and_then(signal_name)
    }

    /// Where berth reaches a `tcp` or `http` probe of this container: its own
    /// address on an isolated network, else the host's loopback.
    pub fn probe_host(&self) -> String {
        self.ip_address
            .clone()
            .unwrap_or_else(|| "127.0.0.1".to_string())
    }
}

/// The verdict of a probe: the engine's healthcheck, or berth's own. It
/// serializes as the document's `health` (`"starting"`, `"healthy"`,
/// `"unhealthy"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Within the start period, no verdict yet.
    Starting,
    Healthy,
    Unhealthy,
}

/// The name of the signal that killed a process, from its exit code: the
/// engine (like a shell) reports death by signal n as 128 + n. A process
/// that exits 128 + n by itself cannot be told apart; berth names the signal
/// only for codes of real signals (SIGHUP to SIGSYS).
pub fn signal_name(exit_code: i64) -> Option<&'static str> {
    let n = i32::try_from(exit_code.checked_sub(128)?).ok()?;
    if n <= 0 {
        return None;
    }
    nix::sys::signal::Signal::try_from(n)
        .ok()
        .map(nix::sys::signal::Signal::as_str)
}

/// What happened to a container, from the engine's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventAction {
    Start,
    Die {
        exit_code: Option<i64>,
    },
    Kill {
        signal: Option<String>,
    },
    Stop,
    Destroy,
    Oom,
    /// The engine-run healthcheck changed its verdict (`health_status`).
    Health {
        healthy: bool,
    },
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEvent {
    pub container_id: String,
    pub action: EventAction,
    pub labels: BTreeMap<String, String>,
    /// Engine time, nanoseconds since the epoch: the replay position.
    pub time_nanos: i64,
}

/// What went wrong with an engine call, classified by the Docker adapter from
/// the engine's HTTP status (never from its message text elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// No connection, a broken one, or no answer within the request timeout
    /// (a hung engine), or a pull that made no progress for that long.
    #[error("docker engine unreachable: {0}")]
    Unreachable(String),
    /// The image is not on the device and cannot be pulled: not in the
    /// registry, pull denied (404 on create or pull, or a pull that failed).
    #[error("image {image} not available: {message}")]
    ImageUnavailable { image: String, message: String },
    /// The container (or other object) does not exist (404).
    #[error("no such container {0}")]
    NotFound(String),
    /// The engine refused because of the object's state (409): a name in
    /// use, an image in use by a container, a container being removed.
    #[error("{operation} {object}: conflict: {message}")]
    Conflict {
        operation: &'static str,
        object: String,
        message: String,
    },
    /// The container exists but its process could not be started (400 or
    /// 500 on start), such as a command missing from `$PATH`. `message` is
    /// the part an operator needs: `exec: "x": executable file not found in $PATH`.
    #[error("{message}")]
    StartFailed { container: String, message: String },
    /// Any other refusal by the engine.
    #[error("{operation} {object} failed: {message}")]
    Engine {
        operation: &'static str,
        object: String,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
pub type EventStream = Pin<Box<dyn Stream<Item = Result<EngineEvent>> + Send>>;

/// How far a pull has come, over the layers the engine has announced so far
/// (the total grows while it learns of more layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PullProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

impl PullProgress {
    /// Whole percent done, 0 while the size is unknown.
    pub fn percent(&self) -> u8 {
        if self.total_bytes == 0 {
            return 0;
        }
        (self.done_bytes.min(self.total_bytes) * 100 / self.total_bytes) as u8
    }
}

impl std::fmt::Display for PullProgress {
    /// `45% of 27 MB`, the form of SPEC 8's reason.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = self.total_bytes as f64 / 1_000_000.0;
        if mb >= 10.0 {
            write!(f, "{}% of {:.0} MB", self.percent(), mb)
        } else {
            write!(f, "{}% of {:.1} MB", self.percent(), mb)
        }
    }
}

/// Adds up the engine's per-layer pull messages into one [`PullProgress`].
/// Download bytes count; a layer that exists already, or is complete, counts
/// in full once its size is known.
#[derive(Debug, Default)]
pub struct PullTracker {
    /// Per layer id: (done, total).
    layers: BTreeMap<String, (u64, u64)>,
}

impl PullTracker {
    /// Takes one progress message: the layer, the engine's status word
    /// (`Downloading`, `Download complete`, `Pull complete`, ...), and its
    /// `progressDetail` numbers. Returns the new total when it changed.
    pub fn update(
        &mut self,
        layer: &str,
        status: &str,
        current: Option<u64>,
        total: Option<u64>,
    ) -> Option<PullProgress> {
        if layer.is_empty() {
            return None;
        }
        let before = self.progress();
        let entry = self.layers.entry(layer.to_string()).or_insert((0, 0));
        match status {
            "Downloading" => {
                if let Some(total) = total.filter(|t| *t > 0) {
                    entry.1 = total;
                }
                if let Some(current) = current {
                    entry.0 = current.min(entry.1.max(current));
                }
            }
            "Download complete" | "Pull complete" | "Already exists" | "Verifying Checksum" => {
                entry.0 = entry.1;
            }
            _ => {}
        }
        let after = self.progress();
        (after != before).then_some(after)
    }

    pub fn progress(&self) -> PullProgress {
        self.layers
            .values()
            .fold(PullProgress::default(), |p, (done, total)| PullProgress {
                done_bytes: p.done_bytes + done,
                total_bytes: p.total_bytes + total,
            })
    }
}

/// Calls a progress sink at most once per `every`, so that a reason shows
/// the progress of a pull without a document per engine message (SPEC 8:
/// at most every 2 s). The first progress passes at once.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<tokio::time::Instant>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Throttle { every, last: None }
    }

    /// Whether something may be reported now; if so, now is remembered.
    pub fn ready(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.every => false,
            _ => {
                self.last = Some(now);
                true
            }
        }
    }
}

/// At most this many lines of a container's log go into an exit event.
pub const LOG_TAIL_LINES: usize = 20;
/// At most this many bytes of them (SPEC 9: 20 lines and 4 KiB).
pub const LOG_TAIL_BYTES: usize = 4096;

/// Bounds the end of a container's output to [`LOG_TAIL_LINES`] lines and
/// [`LOG_TAIL_BYTES`] bytes (newlines not counted), keeping the last ones.
/// The line that does not fit whole keeps its end, up to the budget left.
pub fn bound_tail(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out: Vec<String> = Vec::new();
    let mut budget = LOG_TAIL_BYTES;
    for line in lines.iter().rev().take(LOG_TAIL_LINES) {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.len() <= budget {
            budget -= line.len();
            out.push(line.to_string());
            continue;
        }
        if budget > 0 {
            // Its end, cut at a character boundary.
            let mut start = line.len() - budget;
            while !line.is_char_boundary(start) {
                start += 1;
            }
            out.push(line[start..].to_string());
        }
        break;
    }
    out.reverse();
    out
}

/// The value berth prints instead of a secret.
pub const MASKED: &str = "******";

/// Whether an env variable looks like it holds a secret: its name contains
/// `PASSWORD`, `TOKEN`, `SECRET` or `KEY`, in any case.
pub fn is_secret_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["PASSWORD", "TOKEN", "SECRET", "KEY"]
        .iter()
        .any(|word| upper.contains(word))
}

/// The env as berth may print it: values of secret-looking names masked.
pub fn masked_env(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    env.iter()
        .map(|(k, v)| {
            let v = if is_secret_name(k) {
                MASKED.to_string()
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

/// `NAME=value` as berth may print it (the engine's form of an env entry).
pub fn masked_env_entry(entry: &str) -> String {
    match entry.split_once('=') {
        Some((name, _)) if is_secret_name(name) => format!("{name}={MASKED}"),
        _ => entry.to_string(),
    }
}

/// One reading of a container's resource use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerStats {
    /// CPU time used since the container started, all cores, in ns.
    pub cpu_usage_nanos: u64,
    /// Memory in use, without the page cache the kernel can drop (what
    /// `docker stats` shows).
    pub memory_bytes: u64,
    /// The memory limit; `None` when the container has none.
    pub memory_limit_bytes: Option<u64>,
}

/// What an exit leaves behind (SPEC 9: the `events` of an exit), read once
/// right after it: flatten it into an event.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ExitEvidence {
    pub exit_code: Option<i64>,
    /// `SIGKILL`, ... when the exit code says a signal ended the process.
    pub signal: Option<String>,
    pub oom_killed: bool,
    /// The last lines of both streams ([`bound_tail`]); empty when the log
    /// could not be read (the container was removed meanwhile).
    pub log_tail: Vec<String>,
}

/// What the engine's inspection of an exited container says of its exit
/// (no log tail): one engine call, bounded by the request timeout.
pub async fn exit_inspection<R: ContainerRuntime>(runtime: &R, id: &str) -> Result<ExitEvidence> {
    let info = runtime.inspect(id).await?;
    Ok(ExitEvidence {
        exit_code: info.exit_code,
        signal: info.signal().map(str::to_string),
        oom_killed: info.oom_killed,
        log_tail: Vec::new(),
    })
}

/// The lines of a log read with timestamps (`<RFC 3339> <line>`, as the
/// engine writes them) that were written until `until_nanos`, without their
/// timestamps. A line without a timestamp is kept.
pub fn lines_until(text: &str, until_nanos: i64) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let (written, rest) = match line.split_once(' ') {
            Some((stamp, rest)) => match humantime::parse_rfc3339(stamp) {
                Ok(t) => (Some(t), rest),
                Err(_) => (None, line),
            },
            None => match humantime::parse_rfc3339(line) {
                Ok(t) => (Some(t), ""),
                Err(_) => (None, line),
            },
        };
        let late = written
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .is_some_and(|d| d.as_nanos() > until_nanos.max(0) as u128);
        if !late {
            out.push_str(rest);
            out.push('\n');
        }
    }
    out
}

/// Turns successive readings of each container's CPU counter into percent
/// of one core; one per device, fed at each metrics interval.
#[derive(Debug, Default)]
pub struct CpuMeter {
    last: BTreeMap<String, (u64, tokio::time::Instant)>,
}

impl CpuMeter {
    /// The percent since the previous reading of `id`; `None` for its first
    /// reading, or after its counter went back (a restart).
    pub fn sample(&mut self, id: &str, usage_nanos: u64, at: tokio::time::Instant) -> Option<f64> {
        let previous = self.last.insert(id.to_string(), (usage_nanos, at));
        let (before, then) = previous?;
        cpu_percent(before, usage_nanos, at.saturating_duration_since(then))
    }

    /// Forgets containers that are gone (keeps those in `ids`).
    pub fn retain(&mut self, ids: &[&str]) {
        self.last.retain(|id, _| ids.contains(&id.as_str()));
    }
}

/// CPU use between two readings, in percent of one core (200 = two cores
/// busy). A counter that went back (the container restarted) gives `None`.
pub fn cpu_percent(before_nanos: u64, after_nanos: u64, elapsed: Duration) -> Option<f64> {
    let used = after_nanos.checked_sub(before_nanos)?;
    let elapsed = elapsed.as_nanos();
    if elapsed == 0 {
        return None;
    }
    Some(used as f64 * 100.0 / elapsed as f64)
}

/// One image on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// `sha256:...`.
    pub id: String,
    /// `repo:tag` names; empty for a dangling image.
    pub tags: Vec<String>,
    pub size_bytes: u64,
    /// Unix seconds.
    pub created: i64,
    /// Ids of the containers (running or not, of any device) created from it.
    pub containers: Vec<String>,
}

/// The file system of the engine's data root (`DockerRootDir`): what image
/// housekeeping and the device metrics look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskUsage {
    pub data_root: std::path::PathBuf,
    pub total_bytes: u64,
    /// Free for an unprivileged writer (what a pull can use).
    pub free_bytes: u64,
}

impl DiskUsage {
    /// Used share of the file system, in percent (0 to 100).
    pub fn used_percent(&self) -> u8 {
        if self.total_bytes == 0 {
            return 0;
        }
        let used = self.total_bytes.saturating_sub(self.free_bytes);
        (used.saturating_mul(100) / self.total_bytes).min(100) as u8
    }
}

/// The operations the supervisor needs from a container engine.
pub trait ContainerRuntime: Send + Sync + 'static {
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;
    fn image_present(&self, image: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Pulls an image. A pull that makes no progress for the request timeout
    /// fails as `Unreachable`; a refused one as `ImageUnavailable`.
    fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            let mut ignore = |_: PullProgress| {};
            self.pull_with_progress(image, auth, &mut ignore).await
        }
    }
    /// [`ContainerRuntime::pull`], calling `progress` each time the byte
    /// count changes (pair it with a [`Throttle`] for a reason).
    fn pull_with_progress(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> impl Future<Output = Result<()>> + Send;
    /// All containers (running or not) labelled with this device.
    fn list(&self, device_id: &str) -> impl Future<Output = Result<Vec<ContainerInfo>>> + Send;
    fn inspect(&self, id: &str) -> impl Future<Output = Result<ContainerInfo>> + Send;
    /// Creates the container and returns its id.
    fn create(&self, spec: &ContainerSpec) -> impl Future<Output = Result<String>> + Send;
    fn start(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// SIGTERM, then SIGKILL after `grace_secs`.
    fn stop(&self, id: &str, grace_secs: i64) -> impl Future<Output = Result<()>> + Send;
    fn remove(&self, id: &str) -> impl Future<Output = Result<()>> + Send;
    fn rename(&self, id: &str, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// Creates a bridge network with these labels unless it exists.
    fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Removes a network; one that does not exist is fine.
    fn remove_network(&self, name: &str) -> impl Future<Output = Result<()>> + Send;
    /// The last lines the container wrote, both streams in order, bounded
    /// by [`bound_tail`]: read once, after an exit. With `until_nanos`
    /// (engine time), only what was written until then: the lines of an
    /// exited run, read after the container was started again.
    fn log_tail(
        &self,
        id: &str,
        until_nanos: Option<i64>,
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// One reading of the container's CPU and memory use.
    fn stats(&self, id: &str) -> impl Future<Output = Result<ContainerStats>> + Send;
    /// Every image on the device, with the containers created from it.
    fn list_images(&self) -> impl Future<Output = Result<Vec<ImageInfo>>> + Send;
    /// Removes an image by id or `repo:tag`, never forced: an image a
    /// container uses, or an id with several tags, is a `Conflict` (remove
    /// such an image tag by tag: the last one deletes it).
    fn remove_image(&self, reference: &str) -> impl Future<Output = Result<()>> + Send;
    /// Size and free space of the engine's data root.
    fn data_root_usage(&self) -> impl Future<Output = Result<DiskUsage>> + Send;
    /// Container events of this device from `since_nanos` (engine time) on;
    /// with `until_nanos` the stream ends there, without it it stays live.
    fn events(
        &self,
        device_id: &str,
        since_nanos: Option<i64>,
        until_nanos: Option<i64>,
    ) -> EventStream;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Probe, ProbeCheck};

    #[test]
    fn exit_codes_name_the_signal_that_killed() {
        let rows = [
            (137, Some("SIGKILL")),
            (143, Some("SIGTERM")),
            (139, Some("SIGSEGV")),
            (134, Some("SIGABRT")),
            (129, Some("SIGHUP")),
            (0, None),
            (1, None),
            (3, None),
            (127, None),
            (128, None),
            (255, None),
            (-1, None),
        ];
        for (code, want) in rows {
            assert_eq!(signal_name(code), want, "{code}");
        }
    }

    #[test]
    fn a_log_tail_keeps_the_last_20_lines_within_4_kib() {
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let tail = bound_tail(&text);
        assert_eq!(tail.len(), LOG_TAIL_LINES);
        assert_eq!(tail[0], "line 11");
        assert_eq!(tail[19], "line 30");

        let wide = "w".repeat(1000);
        let text = format!("first\n{wide}\n{wide}\n{wide}\n{wide}\n{wide}\nlast\r\n");
        let tail = bound_tail(&text);
        assert_eq!(tail.iter().map(String::len).sum::<usize>(), LOG_TAIL_BYTES);
        assert_eq!(tail.last().map(String::as_str), Some("last"));
        assert_eq!(tail.len(), 6, "the oldest wide line keeps its end");
        assert_eq!(tail[0].len(), 4096 - 4 - 4000);

        let huge = format!("{}é{}", "a".repeat(5000), "b".repeat(100));
        let tail = bound_tail(&huge);
        assert_eq!(tail.len(), 1);
        assert!(tail[0].len() <= LOG_TAIL_BYTES && tail[0].ends_with('b'));
        assert!(bound_tail("").is_empty());
    }

    #[test]
    fn secret_looking_env_values_are_masked() {
        let env = BTreeMap::from([
            ("DB_PASSWORD".to_string(), "hunter2".to_string()),
            ("api_token".to_string(), "t0k".to_string()),
            ("ClientSecret".to_string(), "s3".to_string()),
            ("SSH_KEY_FILE".to_string(), "/k".to_string()),
            ("ROBOT_NAME".to_string(), "r42".to_string()),
        ]);
        let masked = masked_env(&env);
        assert_eq!(masked["ROBOT_NAME"], "r42");
        for name in ["DB_PASSWORD", "api_token", "ClientSecret", "SSH_KEY_FILE"] {
            assert_eq!(masked[name], MASKED, "{name}");
        }
        assert_eq!(
            masked_env_entry("MQTT_PASSWORD=x=y"),
            "MQTT_PASSWORD=******"
        );
        assert_eq!(masked_env_entry("LOG_LEVEL=debug"), "LOG_LEVEL=debug");
        assert_eq!(masked_env_entry("NOVALUE"), "NOVALUE");
        let spec = ContainerSpec {
            env: env.clone(),
            ..Default::default()
        };
        let printed = format!("{spec:?}");
        assert!(printed.contains("r42"), "{printed}");
        for secret in ["hunter2", "t0k", "s3", "/k"] {
            assert!(!printed.contains(secret), "{printed}");
        }
    }

    #[test]
    fn pull_progress_adds_up_the_layers() {
        let mut t = PullTracker::default();
        assert_eq!(t.update("", "Pulling from berth/busybox", None, None), None);
        assert_eq!(t.update("a", "Pulling fs layer", None, None), None);
        assert_eq!(
            t.update("a", "Downloading", Some(100), Some(1000)),
            Some(PullProgress {
                done_bytes: 100,
                total_bytes: 1000
            })
        );
        let p = t.update("b", "Downloading", Some(500), Some(1000)).unwrap();
        assert_eq!((p.done_bytes, p.total_bytes, p.percent()), (600, 2000, 30));
        assert_eq!(t.update("b", "Downloading", Some(500), Some(1000)), None);
        t.update("a", "Download complete", None, None);
        t.update("a", "Extracting", Some(10), Some(1000));
        let p = t.update("b", "Pull complete", None, None).unwrap();
        assert_eq!(p.percent(), 100);
        assert_eq!(p.to_string(), "100% of 0.0 MB");
        let big = PullProgress {
            done_bytes: 12_150_000,
            total_bytes: 27_000_000,
        };
        assert_eq!(big.to_string(), "45% of 27 MB");
        assert_eq!(PullProgress::default().percent(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_lets_one_report_through_per_period() {
        let mut throttle = Throttle::new(Duration::from_secs(2));
        assert!(throttle.ready(), "the first passes");
        assert!(!throttle.ready());
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(!throttle.ready());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(throttle.ready());
        assert!(!throttle.ready());
    }

    #[test]
    fn cpu_percent_is_of_one_core() {
        let second = Duration::from_secs(1);
        assert_eq!(cpu_percent(0, 1_000_000_000, second), Some(100.0));
        assert_eq!(cpu_percent(0, 1_500_000_000, second), Some(150.0));
        assert_eq!(cpu_percent(10, 10, second), Some(0.0));
        assert_eq!(cpu_percent(10, 5, second), None, "restarted meanwhile");
        assert_eq!(cpu_percent(0, 5, Duration::ZERO), None);
    }

    #[tokio::test(start_paused = true)]
    async fn cpu_meter_compares_each_reading_with_the_one_before() {
        let mut meter = CpuMeter::default();
        let t0 = tokio::time::Instant::now();
        assert_eq!(meter.sample("a", 1_000, t0), None, "first reading");
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(meter.sample("a", 1_000 + 30_000_000_000, t1), Some(50.0));
        assert_eq!(meter.sample("a", 5, t1 + Duration::from_secs(60)), None);
        meter.sample("b", 0, t1);
        meter.retain(&["b"]);
        assert_eq!(meter.sample("a", 10, t1 + Duration::from_secs(61)), None);
    }

    #[tokio::test]
    async fn exit_inspection_reads_code_signal_and_oom() {
        let fake = fake::FakeRuntime::new().with_image("img:1");
        let spec = ContainerSpec {
            name: "c".into(),
            image: "img:1".into(),
            network_mode: "host".into(),
            ..Default::default()
        };
        let id = fake.create(&spec).await.unwrap();
        fake.start(&id).await.unwrap();
        fake.write_log("c", "bye");
        fake.exit("c", 139);
        let evidence = exit_inspection(&fake, &id).await.unwrap();
        assert_eq!(
            evidence,
            ExitEvidence {
                exit_code: Some(139),
                signal: Some("SIGSEGV".into()),
                oom_killed: false,
                log_tail: vec![],
            }
        );
        let json = serde_json::to_value(&evidence).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"exit_code": 139, "signal": "SIGSEGV", "oom_killed": false, "log_tail": []})
        );
        assert_eq!(fake.log_tail(&id, None).await.unwrap(), vec!["bye"]);
        assert_eq!(
            serde_json::to_value(Health::Unhealthy).unwrap(),
            serde_json::json!("unhealthy")
        );
    }

    #[test]
    fn a_log_read_with_timestamps_is_cut_at_the_exit() {
        let text = "2026-12-02T01:30:17.820545123Z first\n\
                    2026-12-02T01:30:17.999999999Z last words\n\
                    not stamped\n\
                    2026-12-02T01:30:18.000000001Z the next run\n";
        let exit = humantime::parse_rfc3339("2026-12-02T01:30:18Z")
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        assert_eq!(lines_until(text, exit), "first\nlast words\nnot stamped\n");
        assert_eq!(
            lines_until(text, exit + 1),
            format!("{}the next run\n", lines_until(text, exit))
        );
        assert_eq!(lines_until("", exit), "");
    }

    #[test]
    fn disk_use_in_percent() {
        let usage = |total, free| DiskUsage {
            data_root: "/var/lib/docker".into(),
            total_bytes: total,
            free_bytes: free,
        };
        assert_eq!(usage(1000, 150).used_percent(), 85);
        assert_eq!(usage(1000, 1000).used_percent(), 0);
        assert_eq!(usage(0, 0).used_percent(), 0);
    }

    #[test]
    fn only_exec_probes_become_engine_healthchecks() {
        let probe = |check| Probe {
            check,
            initial_delay_secs: 5,
            period_secs: 10,
            timeout_secs: 2,
            failure_threshold: 3,
        };
        assert_eq!(
            Healthcheck::from_probe(Some(&probe(ProbeCheck::Exec(vec!["ok".into()])))),
            Some(Healthcheck {
                command: vec!["ok".into()],
                interval: Duration::from_secs(10),
                timeout: Duration::from_secs(2),
                retries: 3,
                start_period: Duration::from_secs(5),
            })
        );
        assert_eq!(
            Healthcheck::from_probe(Some(&probe(ProbeCheck::Tcp(80)))),
            None
        );
        assert_eq!(
            Healthcheck::from_probe(Some(&probe(ProbeCheck::Http("http://x/".into())))),
            None
        );
        assert_eq!(Healthcheck::from_probe(None), None);
    }
}
