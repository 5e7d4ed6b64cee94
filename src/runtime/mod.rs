//! The container engine as berth sees it: a trait with berth's own types, so
//! that the supervisor can be driven by the real Docker engine
//! (`runtime::docker`) or by a fake in unit tests. No bollard type crosses
//! this boundary.

pub mod docker;
#[cfg(test)]
pub mod fake;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

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

/// Everything berth hands the engine to create one container.
#[derive(Debug, Clone, PartialEq, Default)]
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
}

impl ContainerInfo {
    /// The engine reports a never-started container with the zero time.
    pub fn has_started(&self) -> bool {
        self.started_at
            .as_deref()
            .is_some_and(|t| !t.starts_with("0001-"))
    }
}

/// What happened to a container, from the engine's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventAction {
    Start,
    Die { exit_code: Option<i64> },
    Kill { signal: Option<String> },
    Stop,
    Destroy,
    Oom,
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

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("docker engine unreachable: {0}")]
    Unreachable(String),
    #[error("image {image} not available: {message}")]
    ImageUnavailable { image: String, message: String },
    #[error("no such container {0}")]
    NotFound(String),
    #[error("{operation} {object} failed: {message}")]
    Engine {
        operation: &'static str,
        object: String,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
pub type EventStream = Pin<Box<dyn Stream<Item = Result<EngineEvent>> + Send>>;

/// The operations the supervisor needs from a container engine.
pub trait ContainerRuntime: Send + Sync + 'static {
    fn ping(&self) -> impl Future<Output = Result<()>> + Send;
    fn image_present(&self, image: &str) -> impl Future<Output = Result<bool>> + Send;
    fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
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
    /// Container events of this device from `since_nanos` (engine time) on;
    /// with `until_nanos` the stream ends there, without it it stays live.
    fn events(
        &self,
        device_id: &str,
        since_nanos: Option<i64>,
        until_nanos: Option<i64>,
    ) -> EventStream;
}
