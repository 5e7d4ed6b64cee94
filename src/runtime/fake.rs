//! An in-memory container engine for unit tests, after youki's recording
//! syscall fake: it implements `ContainerRuntime`, records every call, keeps
//! images, containers and an event history, and lets a test play the world
//! around berth (a process exits, someone runs `docker stop`, the engine goes
//! away). It mimics the Docker engine where berth depends on it: a failed
//! start leaves the container `created` with an error and emits no event,
//! event times are engine nanoseconds equal to the container's `StartedAt`,
//! and a history query is inclusive at both ends. Its errors are the ones
//! the Docker adapter classifies the engine's answers into.
//!
//! Any call can be made to fail ([`Fault`]): an error, a delay or a hang,
//! for one method and optionally one container or image, always or a number
//! of times; and the whole engine can go down and come back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{
    bound_tail, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerStats, DiskUsage,
    EngineEvent, EventAction, EventStream, ImageInfo, PullProgress, RegistryAuth, Result,
    RuntimeError,
};
use crate::model::labels;

/// The engine's zero time, shown for a container that never started or stopped.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// One call berth made, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Ping,
    ImagePresent(String),
    /// The image, and the registry server whose credentials came with it.
    Pull(String, Option<String>),
    List(String),
    Inspect(String),
    /// The container name.
    Create(String),
    Start(String),
    Stop(String),
    Remove(String),
    /// The container, and its new name.
    Rename(String, String),
    EnsureNetwork(String),
    RemoveNetwork(String),
    Events {
        since: Option<i64>,
        until: Option<i64>,
    },
    LogTail(String),
    Stats(String),
    ListImages,
    RemoveImage(String),
    DataRootUsage,
}

/// The methods of `ContainerRuntime`, to aim a [`Fault`] at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Ping,
    ImagePresent,
    Pull,
    List,
    Inspect,
    Create,
    Start,
    Stop,
    Remove,
    Rename,
    EnsureNetwork,
    RemoveNetwork,
    Events,
    LogTail,
    Stats,
    ListImages,
    RemoveImage,
    DataRootUsage,
}

/// What a call meets instead of (or before) the engine's answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The call fails with this error, doing nothing.
    Error(RuntimeError),
    /// The call waits this long (tokio time), then goes on as usual.
    Delay(Duration),
    /// The call never returns, like a hung engine; an event stream never
    /// yields.
    Hang,
}

#[derive(Debug, Clone)]
struct FaultRule {
    method: Method,
    /// A container (id, unique id prefix or name), image or network name;
    /// `None` for every call of the method.
    target: Option<String>,
    fault: Fault,
    /// How many more calls it applies to; `None` for all of them.
    remaining: Option<u32>,
}

#[derive(Debug, Clone)]
struct Container {
    id: String,
    spec: ContainerSpec,
    /// `created`, `running` or `exited`.
    state: &'static str,
    exit_code: i64,
    started_at: String,
    finished_at: String,
    error: Option<String>,
    oom_killed: bool,
    health: Option<super::Health>,
    /// What it wrote, line by line, both streams.
    log: Vec<String>,
    stats: ContainerStats,
}

impl Container {
    fn info(&self) -> ContainerInfo {
        ContainerInfo {
            id: self.id.clone(),
            name: self.spec.name.clone(),
            labels: self.spec.labels.clone(),
            image: self.spec.image.clone(),
            state: self.state.to_string(),
            running: self.state == "running",
            exit_code: Some(self.exit_code),
            started_at: Some(self.started_at.clone()),
            finished_at: Some(self.finished_at.clone()),
            error: self.error.clone(),
            oom_killed: self.oom_killed,
            ip_address: (self.spec.network_mode != "host").then(|| "172.30.0.2".to_string()),
            health: self.health,
        }
    }

    fn device(&self) -> Option<&str> {
        self.spec.labels.get(labels::DEVICE).map(String::as_str)
    }
}

struct Subscriber {
    device: String,
    tx: mpsc::UnboundedSender<Result<EngineEvent>>,
}

#[derive(Default)]
struct Inner {
    calls: Vec<Call>,
    present: BTreeSet<String>,
    registry: BTreeSet<String>,
    /// By id, in creation order of ids (ids grow).
    containers: BTreeMap<String, Container>,
    created: u64,
    /// Start failures: matched against the image, the container name or the
    /// command's program.
    start_failures: BTreeMap<String, String>,
    history: Vec<EngineEvent>,
    subscribers: Vec<Subscriber>,
    down: bool,
    last_nanos: i64,
    faults: Vec<FaultRule>,
    /// Image sizes in the registry (bytes), for pull progress.
    sizes: BTreeMap<String, u64>,
    /// When each present image was pulled or added, for its `created`.
    image_order: BTreeMap<String, i64>,
    disk: Option<DiskUsage>,
}

impl Inner {
    /// The engine clock: wall time, strictly increasing.
    fn tick(&mut self) -> i64 {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        self.last_nanos = now.max(self.last_nanos + 1);
        self.last_nanos
    }

    /// The fault a call of `method` on `target` meets, if any, used up once.
    fn take_fault(&mut self, method: Method, target: Option<&str>) -> Option<Fault> {
        let resolved = target.and_then(|t| self.find(t));
        let index = self.faults.iter().position(|rule| {
            rule.method == method
                && match (&rule.target, target) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(want), Some(got)) => {
                        want == got || (resolved.is_some() && self.find(want) == resolved)
                    }
                }
        })?;
        let rule = &mut self.faults[index];
        let fault = rule.fault.clone();
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                self.faults.remove(index);
            }
        }
        Some(fault)
    }

    fn check_up(&self) -> Result<()> {
        if self.down {
            return Err(RuntimeError::Unreachable(
                "unix:///var/run/docker.sock: connection refused".into(),
            ));
        }
        Ok(())
    }

    /// Finds a container by id, unique id prefix or name, like the engine.
    fn find(&self, name_or_id: &str) -> Option<String> {
        let name = name_or_id.trim_start_matches('/');
        if self.containers.contains_key(name_or_id) {
            return Some(name_or_id.to_string());
        }
        if let Some(c) = self.containers.values().find(|c| c.spec.name == name) {
            return Some(c.id.clone());
        }
        let mut prefixed = self
            .containers
            .keys()
            .filter(|id| id.starts_with(name_or_id));
        match (prefixed.next(), prefixed.next()) {
            (Some(id), None) => Some(id.clone()),
            _ => None,
        }
    }

    fn find_or_panic(&self, name_or_id: &str) -> String {
        self.find(name_or_id)
            .unwrap_or_else(|| panic!("fake engine has no container {name_or_id}"))
    }

    /// Records an event and hands it to every live stream of its device.
    fn emit(&mut self, id: &str, action: EventAction, at: i64) {
        self.emit_with(id, action, at, None);
    }

    /// `emit` with one more attribute, such as `oldName` of a rename.
    fn emit_with(&mut self, id: &str, action: EventAction, at: i64, extra: Option<(&str, String)>) {
        let container = &self.containers[id];
        let mut attributes = container.spec.labels.clone();
        if let Some((key, value)) = extra {
            attributes.insert(key.to_string(), value);
        }
        attributes.insert("name".into(), container.spec.name.clone());
        attributes.insert("image".into(), container.spec.image.clone());
        match &action {
            EventAction::Die {
                exit_code: Some(code),
            } => {
                attributes.insert("exitCode".into(), code.to_string());
            }
            EventAction::Kill {
                signal: Some(signal),
            } => {
                attributes.insert("signal".into(), signal.clone());
            }
            _ => {}
        }
        let device = container.device().map(str::to_string);
        let event = EngineEvent {
            container_id: id.to_string(),
            action,
            labels: attributes,
            time_nanos: at,
        };
        self.subscribers.retain(|s| {
            device.as_deref() != Some(s.device.as_str()) || s.tx.send(Ok(event.clone())).is_ok()
        });
        self.history.push(event);
    }

    /// The process of a running container ends with `code`.
    fn die(&mut self, id: &str, code: i64) {
        let at = self.tick();
        let c = self.containers.get_mut(id).expect("container exists");
        assert_eq!(
            c.state, "running",
            "fake engine: {} is not running",
            c.spec.name
        );
        c.state = "exited";
        c.exit_code = code;
        c.finished_at = rfc3339(at);
        self.emit(
            id,
            EventAction::Die {
                exit_code: Some(code),
            },
            at,
        );
    }

    fn kill(&mut self, id: &str, signal: &str) {
        let at = self.tick();
        self.emit(
            id,
            EventAction::Kill {
                signal: Some(signal.to_string()),
            },
            at,
        );
    }

    fn start(&mut self, id: &str) -> Result<()> {
        let c = &self.containers[id];
        if c.state == "running" {
            return Ok(()); // the engine answers 304 and emits nothing
        }
        let program = c.spec.cmd.as_ref().and_then(|cmd| cmd.first()).cloned();
        let failure = [Some(&c.spec.image), Some(&c.spec.name), program.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|k| self.start_failures.get(k))
            .cloned();
        if let Some(message) = failure {
            // What the engine does since 1.12: no start or die event, the
            // error and an exit code on the container, state unchanged.
            let c = self.containers.get_mut(id).expect("container exists");
            c.error = Some(message.clone());
            c.exit_code = if message.contains("permission denied") {
                126
            } else if message.contains("not found") || message.contains("no such file") {
                127
            } else {
                128
            };
            return Err(RuntimeError::StartFailed {
                container: id.to_string(),
                message: super::docker::start_failure_reason(&message),
            });
        }
        let at = self.tick();
        let c = self.containers.get_mut(id).expect("container exists");
        c.state = "running";
        c.exit_code = 0;
        c.error = None;
        c.oom_killed = false;
        c.health = c.spec.healthcheck.as_ref().map(|_| super::Health::Starting);
        c.started_at = rfc3339(at);
        self.emit(id, EventAction::Start, at);
        Ok(())
    }

    /// `docker stop`: SIGTERM, the process exits, then `stop`.
    fn stop(&mut self, id: &str) {
        if self.containers[id].state != "running" {
            return; // 304
        }
        self.kill(id, "15");
        self.die(id, 143);
        let at = self.tick();
        self.emit(id, EventAction::Stop, at);
    }

    /// `docker rm -f`.
    fn remove(&mut self, id: &str) {
        if self.containers[id].state == "running" {
            self.kill(id, "9");
            self.die(id, 137);
        }
        let at = self.tick();
        self.emit(id, EventAction::Destroy, at);
        self.containers.remove(id);
    }
}

/// An in-memory engine; share it as `Arc<FakeRuntime>` between the supervisor
/// and the test that drives it.
#[derive(Default)]
pub struct FakeRuntime {
    inner: Mutex<Inner>,
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("fake engine lock")
    }

    // ---- setting the scene -----------------------------------------------------

    /// An image already present on the device.
    pub fn with_image(self, image: &str) -> Self {
        self.lock().present.insert(image.to_string());
        self
    }

    /// An image the registry has: a pull makes it present.
    pub fn with_registry_image(self, image: &str) -> Self {
        self.lock().registry.insert(image.to_string());
        self
    }

    /// Every start of a container whose image, name or command program is
    /// `target` fails with the engine error `message`, until cleared.
    pub fn fail_start(&self, target: &str, message: &str) {
        self.lock()
            .start_failures
            .insert(target.to_string(), message.to_string());
    }

    pub fn clear_fail_start(&self, target: &str) {
        self.lock().start_failures.remove(target);
    }

    /// The engine stops answering (`true`): pings and every other call fail
    /// and live event streams end. What happens to containers meanwhile is
    /// still recorded in the history, as in a real engine.
    pub fn set_down(&self, down: bool) {
        let mut inner = self.lock();
        inner.down = down;
        if down {
            inner.subscribers.clear();
        }
    }

    /// Every call of `method` (on `target` only, when given: a container by
    /// id, id prefix or name, an image or a network) meets `fault` until
    /// [`FakeRuntime::clear_faults`]. The first matching rule wins.
    pub fn fault(&self, method: Method, target: Option<&str>, fault: Fault) {
        self.add_fault(method, target, fault, None);
    }

    /// [`FakeRuntime::fault`] for the next `times` matching calls only.
    pub fn fault_times(&self, method: Method, target: Option<&str>, fault: Fault, times: u32) {
        if times > 0 {
            self.add_fault(method, target, fault, Some(times));
        }
    }

    fn add_fault(
        &self,
        method: Method,
        target: Option<&str>,
        fault: Fault,
        remaining: Option<u32>,
    ) {
        self.lock().faults.push(FaultRule {
            method,
            target: target.map(str::to_string),
            fault,
            remaining,
        });
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// A registry image of `bytes`, whose pull reports progress.
    pub fn with_registry_image_sized(self, image: &str, bytes: u64) -> Self {
        {
            let mut inner = self.lock();
            inner.registry.insert(image.to_string());
            inner.sizes.insert(image.to_string(), bytes);
        }
        self
    }

    /// What `data_root_usage` answers from now on.
    pub fn set_disk(&self, usage: DiskUsage) {
        self.lock().disk = Some(usage);
    }

    // ---- playing the world around berth ------------------------------------------

    /// The container's process writes a line (to either stream).
    pub fn write_log(&self, name_or_id: &str, line: &str) {
        let mut inner = self.lock();
        let id = inner.find_or_panic(name_or_id);
        let c = inner.containers.get_mut(&id).expect("container exists");
        c.log.push(line.to_string());
    }

    /// What the next `stats` of the container reads.
    pub fn set_stats(&self, name_or_id: &str, stats: ContainerStats) {
        let mut inner = self.lock();
        let id = inner.find_or_panic(name_or_id);
        inner
            .containers
            .get_mut(&id)
            .expect("container exists")
            .stats = stats;
    }

    /// The engine-run healthcheck of a running container changes its
    /// verdict (`health_status` event).
    pub fn set_health(&self, name_or_id: &str, healthy: bool) {
        let mut inner = self.lock();
        let id = inner.find_or_panic(name_or_id);
        let at = inner.tick();
        inner
            .containers
            .get_mut(&id)
            .expect("container exists")
            .health = Some(if healthy {
            super::Health::Healthy
        } else {
            super::Health::Unhealthy
        });
        inner.emit(&id, EventAction::Health { healthy }, at);
    }

    /// The kernel's OOM killer ends a running container: `oom`, then `die`
    /// with 137 and `OOMKilled` on the container.
    pub fn oom_kill(&self, name_or_id: &str) {
        let mut inner = self.lock();
        let id = inner.find_or_panic(name_or_id);
        let at = inner.tick();
        inner.emit(&id, EventAction::Oom, at);
        inner.die(&id, 137);
        inner
            .containers
            .get_mut(&id)
            .expect("container exists")
            .oom_killed = true;
    }

    /// The main process of a running container exits by itself (`die`).
    pub fn exit(&self, name_or_id: &str, code: i64) {
        let mut inner = self.lock();
        let id = inner.find_or_panic(name_or_id);
        inner.die(&id, code);
    }

    /// `docker stop` by someone else: `kill`, `die`, `stop`.
    pub fn manual_stop(&self, name_or_id: &str) {
        let mut inner = self.lock();
        let id = inner.find_or_panic(name_or_id);
        inner.stop(&id);
    }

    /// `docker kill` by someone else: `kill` (SIGKILL), `die` with 137.
    pub fn manual_kill(&self, name_or_id: &str) {
        let mut inner = self.lock();
        let id = inner.find_or_panic(name_or_id);
        inner.kill(&id, "9");
        inner.die(&id, 137);
    }

    /// `docker start` by someone else.
    pub fn manual_start(&self, name_or_id: &str) {
        let mut inner = self.lock();
        let id = inner.find_or_panic(name_or_id);
        inner.start(&id).expect("manual start succeeds");
    }

    /// `docker rm -f` by someone else.
    pub fn manual_remove(&self, name_or_id: &str) {
        let mut inner = self.lock();
        let id = inner.find_or_panic(name_or_id);
        inner.remove(&id);
    }

    /// The engine restarts, or the device reboots: running containers stop
    /// without an event anyone could see (the engine keeps its event history
    /// in memory only, so it is lost too), live streams end, and the engine
    /// answers again.
    pub fn restart_engine(&self) {
        let mut inner = self.lock();
        inner.subscribers.clear();
        inner.history.clear();
        let running: Vec<String> = inner
            .containers
            .values()
            .filter(|c| c.state == "running")
            .map(|c| c.id.clone())
            .collect();
        for id in running {
            let at = inner.tick();
            let c = inner.containers.get_mut(&id).expect("container exists");
            c.state = "exited";
            c.exit_code = 143;
            c.finished_at = rfc3339(at);
        }
    }

    // ---- looking -------------------------------------------------------------------

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Every event the engine emitted, in order.
    pub fn history(&self) -> Vec<EngineEvent> {
        self.lock().history.clone()
    }

    pub fn container(&self, name_or_id: &str) -> Option<ContainerInfo> {
        let inner = self.lock();
        let id = inner.find(name_or_id)?;
        Some(inner.containers[&id].info())
    }

    /// The spec a container was created from.
    pub fn spec(&self, name_or_id: &str) -> Option<ContainerSpec> {
        let inner = self.lock();
        let id = inner.find(name_or_id)?;
        Some(inner.containers[&id].spec.clone())
    }

    pub fn image_is_present(&self, image: &str) -> bool {
        self.lock().present.contains(image)
    }

    /// Engine times (ns) of the `start` events of a container.
    pub fn start_times(&self, name_or_id: &str) -> Vec<i64> {
        let inner = self.lock();
        let Some(id) = inner.find(name_or_id) else {
            return Vec::new();
        };
        inner
            .history
            .iter()
            .filter(|e| e.container_id == id && e.action == EventAction::Start)
            .map(|e| e.time_nanos)
            .collect()
    }
}

impl FakeRuntime {
    /// Records a call, then meets its fault if one is set: an error returns
    /// at once, a delay waits, a hang never ends.
    async fn call(&self, call: Call, method: Method, target: Option<&str>) -> Result<()> {
        let fault = {
            let mut inner = self.lock();
            inner.calls.push(call);
            inner.take_fault(method, target)
        };
        match fault {
            None => Ok(()),
            Some(Fault::Error(e)) => Err(e),
            Some(Fault::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Fault::Hang) => std::future::pending().await,
        }
    }
}

impl ContainerRuntime for FakeRuntime {
    async fn ping(&self) -> Result<()> {
        self.call(Call::Ping, Method::Ping, None).await?;
        self.lock().check_up()
    }

    async fn image_present(&self, image: &str) -> Result<bool> {
        self.call(
            Call::ImagePresent(image.to_string()),
            Method::ImagePresent,
            Some(image),
        )
        .await?;
        let inner = self.lock();
        inner.check_up()?;
        Ok(inner.present.contains(image))
    }

    async fn pull_with_progress(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<()> {
        let call = Call::Pull(image.to_string(), auth.map(|a| a.server.clone()));
        self.call(call, Method::Pull, Some(image)).await?;
        let size = {
            let mut inner = self.lock();
            inner.check_up()?;
            if !inner.registry.contains(image) {
                return Err(RuntimeError::ImageUnavailable {
                    image: image.to_string(),
                    message: format!(
                        "manifest for {image} not found: manifest unknown: manifest unknown"
                    ),
                });
            }
            let at = inner.tick();
            inner.present.insert(image.to_string());
            inner.image_order.insert(image.to_string(), at);
            inner.sizes.get(image).copied()
        };
        if let Some(size) = size {
            for done in [0, size / 2, size] {
                progress(PullProgress {
                    done_bytes: done,
                    total_bytes: size,
                });
            }
        }
        Ok(())
    }

    async fn list(&self, device_id: &str) -> Result<Vec<ContainerInfo>> {
        self.call(Call::List(device_id.to_string()), Method::List, None)
            .await?;
        let inner = self.lock();
        inner.check_up()?;
        Ok(inner
            .containers
            .values()
            .filter(|c| c.device() == Some(device_id))
            .map(Container::info)
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo> {
        self.call(Call::Inspect(id.to_string()), Method::Inspect, Some(id))
            .await?;
        let inner = self.lock();
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        Ok(inner.containers[&found].info())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String> {
        self.call(
            Call::Create(spec.name.clone()),
            Method::Create,
            Some(&spec.name),
        )
        .await?;
        let mut inner = self.lock();
        inner.check_up()?;
        if let Some(other) = inner.containers.values().find(|c| c.spec.name == spec.name) {
            return Err(RuntimeError::Conflict {
                operation: "create",
                object: spec.name.clone(),
                message: format!(
                    "Conflict. The container name \"/{}\" is already in use by container \"{}\". \
                     You have to remove (or rename) that container to be able to reuse that name.",
                    spec.name, other.id
                ),
            });
        }
        if !inner.present.contains(&spec.image) {
            // The engine answers 404, which the Docker adapter, having
            // checked that the image is absent, reports as unavailable.
            return Err(RuntimeError::ImageUnavailable {
                image: spec.image.clone(),
                message: format!("no such image: {}", spec.image),
            });
        }
        inner.created += 1;
        let digest = Sha256::digest(format!("{}:{}", inner.created, spec.name));
        let id: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        inner.containers.insert(
            id.clone(),
            Container {
                id: id.clone(),
                spec: spec.clone(),
                state: "created",
                exit_code: 0,
                started_at: ZERO_TIME.into(),
                finished_at: ZERO_TIME.into(),
                error: None,
                oom_killed: false,
                health: None,
                log: Vec::new(),
                stats: ContainerStats {
                    cpu_usage_nanos: 0,
                    memory_bytes: 0,
                    memory_limit_bytes: spec.memory_bytes.map(|m| m as u64),
                },
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.call(Call::Start(id.to_string()), Method::Start, Some(id))
            .await?;
        let mut inner = self.lock();
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        inner.start(&found)
    }

    async fn stop(&self, id: &str, _grace_secs: i64) -> Result<()> {
        self.call(Call::Stop(id.to_string()), Method::Stop, Some(id))
            .await?;
        let mut inner = self.lock();
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        inner.stop(&found);
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        self.call(Call::Remove(id.to_string()), Method::Remove, Some(id))
            .await?;
        let mut inner = self.lock();
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        inner.remove(&found);
        Ok(())
    }

    async fn ensure_network(&self, name: &str, _labels: &BTreeMap<String, String>) -> Result<()> {
        self.call(
            Call::EnsureNetwork(name.to_string()),
            Method::EnsureNetwork,
            Some(name),
        )
        .await?;
        self.lock().check_up()
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        self.call(
            Call::RemoveNetwork(name.to_string()),
            Method::RemoveNetwork,
            Some(name),
        )
        .await?;
        self.lock().check_up()
    }

    async fn rename(&self, id: &str, name: &str) -> Result<()> {
        self.call(
            Call::Rename(id.to_string(), name.to_string()),
            Method::Rename,
            Some(id),
        )
        .await?;
        let mut inner = self.lock();
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        let name = name.trim_start_matches('/');
        if let Some(other) = inner
            .containers
            .values()
            .find(|c| c.spec.name == name && c.id != found)
        {
            return Err(RuntimeError::Conflict {
                operation: "rename",
                object: id.to_string(),
                message: format!(
                    "Error when allocating new name: Conflict. The container name \"/{name}\" \
                     is already in use by container \"{}\". You have to remove (or rename) that \
                     container to be able to reuse that name.",
                    other.id
                ),
            });
        }
        let c = inner.containers.get_mut(&found).expect("container exists");
        let old = std::mem::replace(&mut c.spec.name, name.to_string());
        let at = inner.tick();
        let old_name = ("oldName", format!("/{old}"));
        inner.emit_with(
            &found,
            EventAction::Other("rename".into()),
            at,
            Some(old_name),
        );
        Ok(())
    }

    /// The fake's lines carry no time: `until_nanos` is not applied.
    async fn log_tail(&self, id: &str, _until_nanos: Option<i64>) -> Result<Vec<String>> {
        self.call(Call::LogTail(id.to_string()), Method::LogTail, Some(id))
            .await?;
        let inner = self.lock();
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        let log = &inner.containers[&found].log;
        let from = log.len().saturating_sub(super::LOG_TAIL_LINES);
        Ok(bound_tail(&log[from..].join("\n")))
    }

    async fn stats(&self, id: &str) -> Result<ContainerStats> {
        self.call(Call::Stats(id.to_string()), Method::Stats, Some(id))
            .await?;
        let inner = self.lock();
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        Ok(inner.containers[&found].stats)
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>> {
        self.call(Call::ListImages, Method::ListImages, None)
            .await?;
        let inner = self.lock();
        inner.check_up()?;
        Ok(inner
            .present
            .iter()
            .map(|image| ImageInfo {
                id: image_id(image),
                tags: vec![image.clone()],
                size_bytes: inner.sizes.get(image).copied().unwrap_or(0),
                created: inner.image_order.get(image).copied().unwrap_or(0) / 1_000_000_000,
                containers: inner
                    .containers
                    .values()
                    .filter(|c| &c.spec.image == image)
                    .map(|c| c.id.clone())
                    .collect(),
            })
            .collect())
    }

    async fn remove_image(&self, reference: &str) -> Result<()> {
        self.call(
            Call::RemoveImage(reference.to_string()),
            Method::RemoveImage,
            Some(reference),
        )
        .await?;
        let mut inner = self.lock();
        inner.check_up()?;
        let Some(image) = inner
            .present
            .iter()
            .find(|i| *i == reference || image_id(i) == reference)
            .cloned()
        else {
            return Err(RuntimeError::NotFound(reference.to_string()));
        };
        if let Some(user) = inner.containers.values().find(|c| c.spec.image == image) {
            return Err(RuntimeError::Conflict {
                operation: "remove image",
                object: reference.to_string(),
                message: format!(
                    "unable to remove repository reference \"{image}\" (must force) - \
                     container {} is using its referenced image",
                    &user.id[..12]
                ),
            });
        }
        inner.present.remove(&image);
        Ok(())
    }

    async fn data_root_usage(&self) -> Result<DiskUsage> {
        self.call(Call::DataRootUsage, Method::DataRootUsage, None)
            .await?;
        let inner = self.lock();
        inner.check_up()?;
        Ok(inner.disk.clone().unwrap_or(DiskUsage {
            data_root: "/var/lib/docker".into(),
            total_bytes: 64 << 30,
            free_bytes: 32 << 30,
        }))
    }

    fn events(
        &self,
        device_id: &str,
        since_nanos: Option<i64>,
        until_nanos: Option<i64>,
    ) -> EventStream {
        let mut inner = self.lock();
        inner.calls.push(Call::Events {
            since: since_nanos,
            until: until_nanos,
        });
        match inner.take_fault(Method::Events, None) {
            None => {}
            Some(Fault::Error(e)) => return Box::pin(futures_util::stream::iter([Err(e)])),
            Some(Fault::Hang) => return Box::pin(futures_util::stream::pending()),
            Some(Fault::Delay(d)) => {
                // Subscribed now; nothing comes out before the delay.
                drop(inner);
                let now = self.events_now(device_id, since_nanos, until_nanos);
                let wait = futures_util::stream::once(tokio::time::sleep(d))
                    .filter_map(|()| std::future::ready(None));
                return Box::pin(wait.chain(now));
            }
        }
        drop(inner);
        self.events_now(device_id, since_nanos, until_nanos)
    }
}

impl FakeRuntime {
    /// The event stream as the engine would give it now.
    fn events_now(
        &self,
        device_id: &str,
        since_nanos: Option<i64>,
        until_nanos: Option<i64>,
    ) -> EventStream {
        let mut inner = self.lock();
        if let Err(e) = inner.check_up() {
            return Box::pin(futures_util::stream::iter([Err(e)]));
        }
        // Like the engine: history only when a bound is given, inclusive.
        let past: Vec<Result<EngineEvent>> = if since_nanos.is_some() || until_nanos.is_some() {
            inner
                .history
                .iter()
                .filter(|e| e.labels.get(labels::DEVICE).map(String::as_str) == Some(device_id))
                .filter(|e| since_nanos.is_none_or(|s| e.time_nanos >= s))
                .filter(|e| until_nanos.is_none_or(|u| e.time_nanos <= u))
                .cloned()
                .map(Ok)
                .collect()
        } else {
            Vec::new()
        };
        let past = futures_util::stream::iter(past);
        if until_nanos.is_some() {
            return Box::pin(past);
        }
        // Subscribed under the same lock as the history was read: no event
        // is lost or seen twice between the two.
        let (tx, mut rx) = mpsc::unbounded_channel();
        inner.subscribers.push(Subscriber {
            device: device_id.to_string(),
            tx,
        });
        let live = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        Box::pin(past.chain(live))
    }
}

/// A stable `sha256:` id of an image name in the fake.
fn image_id(image: &str) -> String {
    let digest = Sha256::digest(image.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// RFC 3339 UTC with nanoseconds, as the engine writes `StartedAt`.
fn rfc3339(nanos: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, image: &str, cmd: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.into(),
            image: image.into(),
            cmd: Some(vec![cmd.into()]),
            labels: BTreeMap::from([(labels::DEVICE.to_string(), "dev".to_string())]),
            network_mode: "host".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn records_calls_and_mimics_the_engine() {
        let fake = FakeRuntime::new().with_registry_image("img:1");
        let mut live = fake.events("dev", None, None);
        assert!(
            fake.create(&spec("c", "img:1", "run")).await.is_err(),
            "image absent"
        );
        fake.pull("img:1", None).await.unwrap();
        let id = fake.create(&spec("c", "img:1", "run")).await.unwrap();
        assert_eq!(fake.container("c").unwrap().state, "created");
        assert!(!fake.container("c").unwrap().has_started());
        fake.start(&id).await.unwrap();
        let info = fake.inspect(&id[..12]).await.unwrap();
        assert!(info.running);
        let started = live.next().await.unwrap().unwrap();
        assert_eq!(started.action, EventAction::Start);
        assert_eq!(started.labels["name"], "c");
        assert_eq!(
            humantime::parse_rfc3339(info.started_at.as_deref().unwrap()).unwrap(),
            SystemTime::UNIX_EPOCH + Duration::from_nanos(started.time_nanos as u64),
            "StartedAt is the start event's time"
        );

        fake.manual_stop("c");
        let actions: Vec<EventAction> = fake.history().into_iter().map(|e| e.action).collect();
        assert_eq!(
            actions,
            [
                EventAction::Start,
                EventAction::Kill {
                    signal: Some("15".into())
                },
                EventAction::Die {
                    exit_code: Some(143)
                },
                EventAction::Stop,
            ]
        );
        let times: Vec<i64> = fake.history().iter().map(|e| e.time_nanos).collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
        let (from, to) = (times[1], times[2]);
        let window: Vec<_> = fake.events("dev", Some(from), Some(to)).collect().await;
        assert_eq!(window.len(), 2, "history bounds are inclusive");
        assert!(fake
            .events("other", Some(0), Some(i64::MAX))
            .next()
            .await
            .is_none());

        assert_eq!(
            fake.calls()[..4],
            [
                Call::Events {
                    since: None,
                    until: None
                },
                Call::Create("c".into()),
                Call::Pull("img:1".into(), None),
                Call::Create("c".into()),
            ]
        );
    }

    #[tokio::test]
    async fn failed_start_leaves_the_container_created_without_events() {
        let fake = FakeRuntime::new().with_image("img:1");
        let message = "OCI runtime create failed: exec: \"nope\": executable file not found in $PATH: unknown";
        fake.fail_start("nope", message);
        let id = fake.create(&spec("c", "img:1", "nope")).await.unwrap();
        let err = fake.start(&id).await.unwrap_err();
        assert_eq!(
            err,
            RuntimeError::StartFailed {
                container: id.clone(),
                message: "exec: \"nope\": executable file not found in $PATH".into()
            }
        );
        let info = fake.container(&id).unwrap();
        assert_eq!(
            (info.state.as_str(), info.exit_code),
            ("created", Some(127))
        );
        assert_eq!(info.error.as_deref(), Some(message));
        assert!(fake.history().is_empty());
        fake.clear_fail_start("nope");
        fake.start(&id).await.unwrap();
        assert!(fake.container(&id).unwrap().error.is_none());
    }

    #[tokio::test]
    async fn down_engine_fails_calls_and_ends_streams() {
        let fake = FakeRuntime::new().with_image("img:1");
        let id = fake.create(&spec("c", "img:1", "run")).await.unwrap();
        let mut live = fake.events("dev", None, None);
        fake.set_down(true);
        assert!(matches!(
            fake.ping().await,
            Err(RuntimeError::Unreachable(_))
        ));
        assert!(live.next().await.is_none());
        assert!(matches!(
            fake.start(&id).await,
            Err(RuntimeError::Unreachable(_))
        ));
        fake.set_down(false);
        fake.ping().await.unwrap();
        fake.start(&id).await.unwrap();
        fake.exit("c", 3);
        assert_eq!(fake.container("c").unwrap().exit_code, Some(3));
        assert_eq!(fake.start_times("c").len(), 1);
    }

    #[tokio::test]
    async fn rename_keeps_names_unique_and_emits_an_event() {
        let fake = FakeRuntime::new().with_image("img:1");
        let a = fake.create(&spec("a", "img:1", "run")).await.unwrap();
        fake.create(&spec("b", "img:1", "run")).await.unwrap();
        let err = fake.rename(&a, "b").await.unwrap_err();
        assert!(err.to_string().contains("Conflict"), "{err}");
        fake.rename(&a, "a-old").await.unwrap();
        assert_eq!(fake.container(&a).unwrap().name, "a-old");
        assert!(fake.container("a").is_none());
        let event = fake.history().pop().unwrap();
        assert_eq!(event.action, EventAction::Other("rename".into()));
        assert_eq!(
            (
                event.labels["name"].as_str(),
                event.labels["oldName"].as_str()
            ),
            ("a-old", "/a")
        );
        assert_eq!(
            fake.calls().last(),
            Some(&Call::Rename(a.clone(), "a-old".into()))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn faults_fail_delay_or_hang_a_method_per_container() {
        let fake = FakeRuntime::new().with_image("img:1");
        let a = fake.create(&spec("a", "img:1", "run")).await.unwrap();
        let b = fake.create(&spec("b", "img:1", "run")).await.unwrap();
        let refused = RuntimeError::Conflict {
            operation: "start",
            object: "a".into(),
            message: "busy".into(),
        };
        fake.fault_times(Method::Start, Some("a"), Fault::Error(refused.clone()), 1);
        assert_eq!(fake.start(&a).await, Err(refused), "by id, aimed by name");
        fake.start(&a).await.expect("only once");
        fake.start(&b).await.expect("another container");

        fake.fault(
            Method::Inspect,
            Some("b"),
            Fault::Delay(Duration::from_secs(3)),
        );
        let before = tokio::time::Instant::now();
        fake.inspect(&a).await.unwrap();
        assert_eq!(before.elapsed(), Duration::ZERO);
        fake.inspect("b").await.unwrap();
        assert_eq!(before.elapsed(), Duration::from_secs(3));

        fake.fault(Method::List, None, Fault::Hang);
        let hung = tokio::time::timeout(Duration::from_secs(3600), fake.list("dev")).await;
        assert!(hung.is_err(), "a hung call never returns");
        assert_eq!(
            fake.calls().last(),
            Some(&Call::List("dev".into())),
            "a hung call is recorded"
        );
        fake.clear_faults();
        assert_eq!(fake.list("dev").await.unwrap().len(), 2);

        fake.fault_times(Method::Events, None, Fault::Hang, 1);
        let mut hung = fake.events("dev", None, None);
        assert!(tokio::time::timeout(Duration::from_secs(60), hung.next())
            .await
            .is_err());
        fake.fault_times(
            Method::Events,
            None,
            Fault::Delay(Duration::from_secs(2)),
            1,
        );
        let mut late = fake.events("dev", None, None);
        let before = tokio::time::Instant::now();
        fake.exit("a", 1);
        let event = late.next().await.unwrap().unwrap();
        assert_eq!(event.action, EventAction::Die { exit_code: Some(1) });
        assert_eq!(before.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test]
    async fn crash_evidence_oom_health_and_log_tail() {
        let fake = FakeRuntime::new().with_image("img:1");
        let mut with_probe = spec("c", "img:1", "run");
        with_probe.healthcheck = Some(crate::runtime::Healthcheck {
            command: vec!["check".into()],
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            retries: 3,
            start_period: Duration::from_secs(5),
        });
        let id = fake.create(&with_probe).await.unwrap();
        fake.start(&id).await.unwrap();
        assert_eq!(
            fake.inspect(&id).await.unwrap().health,
            Some(crate::runtime::Health::Starting)
        );
        fake.set_health("c", false);
        assert_eq!(
            fake.history().last().unwrap().action,
            EventAction::Health { healthy: false }
        );
        for i in 0..30 {
            fake.write_log("c", &format!("line {i}"));
        }
        fake.oom_kill("c");
        let info = fake.inspect(&id).await.unwrap();
        assert!(info.oom_killed);
        assert_eq!(info.exit_code, Some(137));
        assert_eq!(info.signal(), Some("SIGKILL"));
        let tail = fake.log_tail(&id, None).await.unwrap();
        assert_eq!(tail.len(), 20);
        assert_eq!(tail.first().map(String::as_str), Some("line 10"));
        assert_eq!(tail.last().map(String::as_str), Some("line 29"));
        fake.start(&id).await.unwrap();
        assert!(!fake.inspect(&id).await.unwrap().oom_killed);
    }

    #[tokio::test]
    async fn images_are_listed_with_users_and_removed_unforced() {
        let fake = FakeRuntime::new()
            .with_image("img:1")
            .with_registry_image_sized("img:2", 1000);
        let mut seen = Vec::new();
        fake.pull_with_progress("img:2", None, &mut |p| seen.push(p.percent()))
            .await
            .unwrap();
        assert_eq!(seen, [0, 50, 100]);
        let id = fake.create(&spec("c", "img:1", "run")).await.unwrap();
        let images = fake.list_images().await.unwrap();
        let used = images.iter().find(|i| i.tags == ["img:1"]).unwrap();
        assert_eq!(used.containers, [id]);
        let unused = images.iter().find(|i| i.tags == ["img:2"]).unwrap();
        assert_eq!(unused.size_bytes, 1000);
        assert!(matches!(
            fake.remove_image("img:1").await,
            Err(RuntimeError::Conflict { .. })
        ));
        fake.remove_image(&unused.id).await.unwrap();
        assert!(!fake.image_is_present("img:2"));
        assert_eq!(
            fake.remove_image("img:2").await,
            Err(RuntimeError::NotFound("img:2".into()))
        );
    }
}
