//! An in-memory container engine for unit tests, after youki's recording
//! syscall fake: it implements `ContainerRuntime`, records every call, keeps
//! images, containers and an event history, and lets a test play the world
//! around berth (a process exits, someone runs `docker stop`, the engine goes
//! away). It mimics the Docker engine where berth depends on it: a failed
//! start leaves the container `created` with an error and emits no event,
//! event times are engine nanoseconds equal to the container's `StartedAt`,
//! and a history query is inclusive at both ends.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{
    ContainerInfo, ContainerRuntime, ContainerSpec, EngineEvent, EventAction, EventStream,
    RegistryAuth, Result, RuntimeError,
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
            return Err(RuntimeError::Engine {
                operation: "start",
                object: id.to_string(),
                message,
            });
        }
        let at = self.tick();
        let c = self.containers.get_mut(id).expect("container exists");
        c.state = "running";
        c.exit_code = 0;
        c.error = None;
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

    // ---- playing the world around berth ------------------------------------------

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

impl ContainerRuntime for FakeRuntime {
    async fn ping(&self) -> Result<()> {
        let mut inner = self.lock();
        inner.calls.push(Call::Ping);
        inner.check_up()
    }

    async fn image_present(&self, image: &str) -> Result<bool> {
        let mut inner = self.lock();
        inner.calls.push(Call::ImagePresent(image.to_string()));
        inner.check_up()?;
        Ok(inner.present.contains(image))
    }

    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<()> {
        let mut inner = self.lock();
        inner.calls.push(Call::Pull(
            image.to_string(),
            auth.map(|a| a.server.clone()),
        ));
        inner.check_up()?;
        if !inner.registry.contains(image) {
            return Err(RuntimeError::ImageUnavailable {
                image: image.to_string(),
                message: format!(
                    "manifest for {image} not found: manifest unknown: manifest unknown"
                ),
            });
        }
        inner.present.insert(image.to_string());
        Ok(())
    }

    async fn list(&self, device_id: &str) -> Result<Vec<ContainerInfo>> {
        let mut inner = self.lock();
        inner.calls.push(Call::List(device_id.to_string()));
        inner.check_up()?;
        Ok(inner
            .containers
            .values()
            .filter(|c| c.device() == Some(device_id))
            .map(Container::info)
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo> {
        let mut inner = self.lock();
        inner.calls.push(Call::Inspect(id.to_string()));
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        Ok(inner.containers[&found].info())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String> {
        let mut inner = self.lock();
        inner.calls.push(Call::Create(spec.name.clone()));
        inner.check_up()?;
        if let Some(other) = inner.containers.values().find(|c| c.spec.name == spec.name) {
            return Err(RuntimeError::Engine {
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
            // The engine answers 404 "No such image", which the Docker
            // adapter turns into `NotFound` of the object it was creating.
            return Err(RuntimeError::NotFound(spec.name.clone()));
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
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<()> {
        let mut inner = self.lock();
        inner.calls.push(Call::Start(id.to_string()));
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        inner.start(&found)
    }

    async fn stop(&self, id: &str, _grace_secs: i64) -> Result<()> {
        let mut inner = self.lock();
        inner.calls.push(Call::Stop(id.to_string()));
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        inner.stop(&found);
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let mut inner = self.lock();
        inner.calls.push(Call::Remove(id.to_string()));
        inner.check_up()?;
        let found = inner
            .find(id)
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        inner.remove(&found);
        Ok(())
    }

    async fn ensure_network(&self, name: &str, _labels: &BTreeMap<String, String>) -> Result<()> {
        let mut inner = self.lock();
        inner.calls.push(Call::EnsureNetwork(name.to_string()));
        inner.check_up()
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        inner.calls.push(Call::RemoveNetwork(name.to_string()));
        inner.check_up()
    }

    async fn rename(&self, id: &str, name: &str) -> Result<()> {
        let mut inner = self.lock();
        inner
            .calls
            .push(Call::Rename(id.to_string(), name.to_string()));
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
            return Err(RuntimeError::Engine {
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
        assert!(err.to_string().contains(message), "{err}");
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
}
