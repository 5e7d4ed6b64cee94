//! The Docker engine adapter: the only file that imports bollard. It speaks
//! API 1.41 (Docker 20.10, the oldest engine berth supports), maps the
//! engine's answers to berth's own types, and owns the engine's semantics:
//! every refusal is classified by its HTTP status into a [`RuntimeError`]
//! here, so nothing above reads the engine's message text.
//!
//! Every request is bounded by the `[docker] timeout_secs` setting, so that an
//! engine that accepts connections but never answers turns into
//! `Unreachable`. Long streams are not: the event stream and `logs --follow`
//! are bounded until their headers only, and a pull fails as `Unreachable`
//! when it goes that long without a progress message.
//!
//! Resource use is read from the cgroup files of the container where the
//! engine uses cgroup v1 or v2 with the `cgroupfs` or `systemd` driver, and
//! from the engine's one-shot stats otherwise (see docs/DESIGN.md for why).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, DeviceMapping, EndpointSettings, HealthConfig, HealthStatusEnum,
    HostConfig, HostConfigLogConfig, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, InspectContainerOptions,
    InspectNetworkOptions, ListContainersOptions, ListImagesOptions, LogsOptions,
    RemoveContainerOptions, RemoveImageOptions, RenameContainerOptions, StartContainerOptions,
    StatsOptions, StopContainerOptions,
};
use bollard::{ClientVersion, Docker};
use futures_util::{Stream, StreamExt};

use super::{
    bound_tail, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerStats, DiskUsage,
    EngineEvent, EventAction, EventStream, Health, ImageInfo, LogRotation, PullProgress,
    PullTracker, RegistryAuth, Result, RuntimeError, LOG_TAIL_LINES,
};
use crate::model::labels;

const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// The default of `[docker] timeout_secs`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Pull requests wait this long for their headers: their own stall
/// detection bounds them (the engine answers a pull's headers with its first
/// progress line, which a slow registry may delay).
const STREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The container events berth acts on. Filtering them at the engine keeps
/// the `exec_*` events of every healthcheck run out of berth's stream.
const EVENT_ACTIONS: &[&str] = &[
    "start",
    "die",
    "kill",
    "stop",
    "destroy",
    "oom",
    "rename",
    "health_status",
];

/// A Docker engine at `unix:///path` or `tcp://host:port`.
pub struct DockerRuntime {
    host: String,
    /// How long one request may take, and a pull go without progress.
    timeout: Duration,
    /// The `json-file` rotation every container is created with; `None`
    /// leaves the engine's default log settings.
    log_rotation: Option<LogRotation>,
    /// Built lazily: bollard refuses a unix socket that does not exist yet,
    /// and the engine may come up after berth.
    client: Mutex<Option<Docker>>,
    /// The engine's data root, asked once.
    data_root: tokio::sync::OnceCell<PathBuf>,
    /// The engine accepts two networks of one name: berth creates them one
    /// at a time, so the executables of a component starting together share one.
    network_lock: tokio::sync::Mutex<()>,
}

impl DockerRuntime {
    /// An engine with the default request timeout and no log rotation.
    pub fn new(host: &str) -> Self {
        DockerRuntime {
            host: host.to_string(),
            timeout: DEFAULT_TIMEOUT,
            log_rotation: None,
            client: Mutex::new(None),
            data_root: tokio::sync::OnceCell::new(),
            network_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The engine of `[docker]`, creating containers as `[containers]` says.
    pub fn from_settings(
        docker: &crate::config::DockerSettings,
        containers: &crate::config::ContainerSettings,
    ) -> Self {
        DockerRuntime::new(&docker.host)
            .with_timeout(docker.timeout)
            .with_log_rotation(containers.log_rotation)
    }

    /// How long one request may take before the engine counts as unreachable.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Creates every container with this `json-file` rotation.
    pub fn with_log_rotation(mut self, rotation: LogRotation) -> Self {
        self.log_rotation = Some(rotation);
        self
    }

    fn client(&self) -> Result<Docker> {
        let mut slot = self.client.lock().expect("docker client lock");
        if let Some(docker) = slot.as_ref() {
            return Ok(docker.clone());
        }
        // bollard counts whole seconds (a part is cut to 0, no time at all):
        // round up; `bounded` keeps the exact bound of each request.
        let secs = self.timeout.as_secs() + u64::from(self.timeout.subsec_nanos() > 0);
        let secs = secs.max(1);
        let docker = if let Some(path) = self.host.strip_prefix("unix://") {
            Docker::connect_with_unix(path, secs, &API_VERSION)
        } else {
            let addr = self.host.replacen("tcp://", "http://", 1);
            Docker::connect_with_http(&addr, secs, &API_VERSION)
        }
        .map_err(|e| RuntimeError::Unreachable(format!("{}: {e}", self.host)))?;
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// A client for pulls, whose headers may come late (see `STREAM_HEADER_TIMEOUT`).
    fn pull_client(&self) -> Result<Docker> {
        Ok(self.client()?.with_timeout(STREAM_HEADER_TIMEOUT))
    }

    /// Runs one engine request within the request timeout.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        object: &str,
        request: impl Future<Output = std::result::Result<T, BollardError>>,
    ) -> std::result::Result<T, Classified> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Classified::new(operation, object, e, &self.host)),
            Err(_) => Err(Classified::Unreachable(self.no_answer())),
        }
    }

    fn no_answer(&self) -> String {
        format!("{}: no answer within {:?}", self.host, self.timeout)
    }
}

/// An engine answer sorted by what it means, before the operation decides
/// which [`RuntimeError`] it is (a 404 means a missing image on create, a
/// missing container on start).
#[derive(Debug)]
enum Classified {
    /// An HTTP status with the engine's message.
    Status {
        status: u16,
        operation: &'static str,
        object: String,
        message: String,
    },
    /// No answer, or no connection.
    Unreachable(String),
}

impl Classified {
    fn new(operation: &'static str, object: &str, e: BollardError, host: &str) -> Self {
        match e {
            BollardError::DockerResponseServerError {
                status_code,
                message,
            } => Classified::Status {
                status: status_code,
                operation,
                object: object.to_string(),
                message,
            },
            // An error in a stream that started well (a pull, a log).
            BollardError::DockerStreamError { error } => Classified::Status {
                status: 500,
                operation,
                object: object.to_string(),
                message: error,
            },
            // An answer berth cannot read: the engine is there, but wrong.
            e @ (BollardError::JsonDataError { .. }
            | BollardError::JsonSerdeError { .. }
            | BollardError::StrParseError { .. }
            | BollardError::APIVersionParseError {}) => Classified::Status {
                status: 500,
                operation,
                object: object.to_string(),
                message: e.to_string(),
            },
            other => Classified::Unreachable(format!("{host}: {other}")),
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Classified::Status { status, .. } => Some(*status),
            Classified::Unreachable(_) => None,
        }
    }

    /// The meaning shared by every operation: 404 not found, 409 conflict,
    /// anything else the engine's refusal.
    fn into_error(self) -> RuntimeError {
        match self {
            Classified::Unreachable(message) => RuntimeError::Unreachable(message),
            Classified::Status {
                status: 404,
                object,
                ..
            } => RuntimeError::NotFound(object),
            Classified::Status {
                status: 409,
                operation,
                object,
                message,
            } => RuntimeError::Conflict {
                operation,
                object,
                message,
            },
            Classified::Status {
                operation,
                object,
                message,
                ..
            } => RuntimeError::Engine {
                operation,
                object,
                message,
            },
        }
    }
}

impl From<Classified> for RuntimeError {
    fn from(c: Classified) -> Self {
        c.into_error()
    }
}

/// The part of a failed start an operator needs. The engine wraps the OCI
/// runtime's words (`failed to create shim task: OCI runtime create failed:
/// runc create failed: unable to start container process: exec: "x":
/// executable file not found in $PATH: unknown`); the `exec: ...` part says
/// it all. Other failures are kept whole.
pub(crate) fn start_failure_reason(message: &str) -> String {
    if let Some(start) = message.find("exec: \"") {
        let rest = &message[start..];
        let end = rest.find(": unknown").unwrap_or(rest.len());
        return rest[..end].to_string();
    }
    message.to_string()
}

fn to_info(c: bollard::models::ContainerInspectResponse) -> ContainerInfo {
    let state = c.state.unwrap_or_default();
    let config = c.config.unwrap_or_default();
    let image = config.image.unwrap_or_default();
    let labels = config.labels.unwrap_or_default().into_iter().collect();
    // The address on the container's own network; the host network has none.
    let ip_address = c
        .network_settings
        .and_then(|n| n.networks)
        .into_iter()
        .flatten()
        .filter(|(name, _)| name != "host")
        .filter_map(|(_, endpoint)| endpoint.ip_address)
        .find(|ip| !ip.is_empty());
    let health = state
        .health
        .and_then(|h| h.status)
        .and_then(|status| match status {
            HealthStatusEnum::STARTING => Some(Health::Starting),
            HealthStatusEnum::HEALTHY => Some(Health::Healthy),
            HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
            HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
        });
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels,
        image,
        state: state.status.map(|s| s.to_string()).unwrap_or_default(),
        running: state.running.unwrap_or(false),
        exit_code: state.exit_code,
        started_at: state.started_at,
        finished_at: state.finished_at,
        error: state.error.filter(|e| !e.is_empty()),
        oom_killed: state.oom_killed.unwrap_or(false),
        ip_address,
        health,
    }
}

/// Splits `registry/repo:tag` into the image and tag the pull API wants.
fn split_reference(image: &str) -> (&str, &str) {
    if image.contains('@') {
        return (image, "");
    }
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (image, "latest"),
    }
}

/// Nanoseconds of a duration, as the engine's `HealthConfig` wants them.
fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// One line of a pull's progress stream, whichever way it was sent.
#[derive(Debug, Default, PartialEq)]
struct PullLine {
    layer: String,
    status: String,
    current: Option<u64>,
    total: Option<u64>,
    error: Option<String>,
}

impl PullLine {
    fn parse(line: &str) -> Option<PullLine> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let number = |key: &str| v["progressDetail"][key].as_u64();
        Some(PullLine {
            layer: v["id"].as_str().unwrap_or_default().to_string(),
            status: v["status"].as_str().unwrap_or_default().to_string(),
            current: number("current"),
            total: number("total"),
            error: v["error"].as_str().map(str::to_string),
        })
    }
}

impl DockerRuntime {
    /// Follows a pull's progress lines: a line that does not come within the
    /// timeout is a stall (`Unreachable`), an `error` line a refusal.
    async fn follow_pull(
        &self,
        image: &str,
        mut lines: impl Stream<Item = Result<PullLine>> + Unpin,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<()> {
        let mut tracker = PullTracker::default();
        loop {
            let line = match tokio::time::timeout(self.timeout, lines.next()).await {
                Err(_) => {
                    return Err(RuntimeError::Unreachable(format!(
                        "{}: pull of {image} made no progress for {:?}",
                        self.host, self.timeout
                    )))
                }
                Ok(None) => return Ok(()),
                Ok(Some(line)) => line?,
            };
            if let Some(error) = line.error {
                return Err(RuntimeError::ImageUnavailable {
                    image: image.to_string(),
                    message: error,
                });
            }
            if let Some(p) = tracker.update(&line.layer, &line.status, line.current, line.total) {
                progress(p);
            }
        }
    }

    /// Where the engine keeps images and containers (`DockerRootDir`).
    pub async fn data_root(&self) -> Result<PathBuf> {
        self.data_root
            .get_or_try_init(|| async {
                let docker = self.client()?;
                let info = self.bounded("info", "engine", docker.info()).await?;
                info.docker_root_dir
                    .map(PathBuf::from)
                    .ok_or_else(|| RuntimeError::Engine {
                        operation: "info",
                        object: "engine".into(),
                        message: "no DockerRootDir in the engine's info".into(),
                    })
            })
            .await
            .cloned()
    }

    /// One reading from the engine's one-shot stats: one request, which
    /// the engine answers after sampling the cgroup itself.
    pub async fn stats_from_engine(&self, id: &str) -> Result<ContainerStats> {
        let docker = self.client()?;
        let options = StatsOptions {
            stream: false,
            one_shot: true,
        };
        let read = async {
            let mut stream = docker.stats(id, Some(options));
            stream.next().await.unwrap_or_else(|| {
                Err(BollardError::DockerStreamError {
                    error: "no stats in the answer".into(),
                })
            })
        };
        let s = self.bounded("stats", id, read).await?;
        let memory = s.memory_stats.unwrap_or_default();
        let usage = memory.usage.unwrap_or(0);
        // What `docker stats` shows: without the page cache the kernel may drop.
        let cache = memory
            .stats
            .as_ref()
            .and_then(|m| m.get("total_inactive_file").or(m.get("inactive_file")))
            .copied()
            .unwrap_or(0);
        Ok(ContainerStats {
            cpu_usage_nanos: s
                .cpu_stats
                .and_then(|c| c.cpu_usage)
                .and_then(|u| u.total_usage)
                .unwrap_or(0),
            memory_bytes: usage.saturating_sub(cache),
            memory_limit_bytes: memory.limit.filter(|l| *l < cgroup::UNLIMITED),
        })
    }

    /// One reading from the container's cgroup files, or `None` where they
    /// are not found (another layout, or an engine on another machine).
    pub fn stats_from_cgroup(&self, id: &str) -> Option<ContainerStats> {
        if !self.host.starts_with("unix://") {
            return None;
        }
        cgroup::read(Path::new(cgroup::ROOT), id)
    }
}

impl DockerRuntime {
    /// The containers of a device, each inspected, a few at a time: a robot
    /// with a hundred containers reconciles in a fraction of the time of one
    /// after the other. The first failure other than a container removed
    /// meanwhile ends it.
    async fn list_inspected(&self, device_id: &str) -> Result<Vec<ContainerInfo>> {
        let docker = self.client()?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{}={device_id}", labels::DEVICE)],
        )]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let summaries = self
            .bounded("list", "containers", docker.list_containers(Some(options)))
            .await?;
        let mut inspected = futures_util::stream::iter(summaries.into_iter().filter_map(|s| s.id))
            .map(|id| async move { self.inspect(&id).await })
            .buffered(8);
        let mut out = Vec::new();
        while let Some(result) = inspected.next().await {
            match result {
                Ok(info) => out.push(info),
                // Removed between the listing and the inspection.
                Err(RuntimeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn ping(&self) -> Result<()> {
        let docker = self.client()?;
        self.bounded("ping", "engine", docker.ping())
            .await
            .map(|_| ())
            // An engine that refuses a ping is no engine berth can use.
            .map_err(|e| match e {
                Classified::Unreachable(m) => RuntimeError::Unreachable(m),
                Classified::Status {
                    status, message, ..
                } => RuntimeError::Unreachable(format!(
                    "{}: ping answered {status}: {message}",
                    self.host
                )),
            })
    }

    async fn image_present(&self, image: &str) -> Result<bool> {
        let docker = self.client()?;
        match self
            .bounded("inspect image", image, docker.inspect_image(image))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn pull_with_progress(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &mut (dyn FnMut(PullProgress) + Send),
    ) -> Result<()> {
        let (from_image, tag) = split_reference(image);
        let unavailable = |message: String| RuntimeError::ImageUnavailable {
            image: image.to_string(),
            message,
        };
        if let Some(auth) = auth {
            let lines = pull_with_auth::pull(&self.host, from_image, tag, auth, self.timeout)
                .await
                .map_err(|e| match e {
                    pull_with_auth::Error::Unreachable(m) => RuntimeError::Unreachable(m),
                    pull_with_auth::Error::Refused(m) => unavailable(m),
                })?;
            return self.follow_pull(image, lines, progress).await;
        }
        let options = CreateImageOptions {
            from_image: Some(from_image.to_string()),
            tag: (!tag.is_empty()).then(|| tag.to_string()),
            ..Default::default()
        };
        let host = self.host.clone();
        let object = image.to_string();
        let lines = self
            .pull_client()?
            .create_image(Some(options), None, None)
            .map(move |item| match item {
                Ok(info) => {
                    let detail = info.progress_detail.unwrap_or_default();
                    Ok(PullLine {
                        layer: info.id.unwrap_or_default(),
                        status: info.status.unwrap_or_default(),
                        current: detail.current.and_then(|c| u64::try_from(c).ok()),
                        total: detail.total.and_then(|t| u64::try_from(t).ok()),
                        error: info.error.filter(|e| !e.is_empty()),
                    })
                }
                // Any refusal of a pull (404 unknown image, 500 registry
                // unreachable or denied) means the image cannot be had.
                Err(e) => match Classified::new("pull", &object, e, &host) {
                    Classified::Status { message, .. } => Ok(PullLine {
                        error: Some(message),
                        ..Default::default()
                    }),
                    Classified::Unreachable(m) => Err(RuntimeError::Unreachable(m)),
                },
            });
        self.follow_pull(image, Box::pin(lines), progress).await
    }

    async fn list(&self, device_id: &str) -> Result<Vec<ContainerInfo>> {
        // The listing and its inspections together answer within the
        // request timeout, or the engine is unreachable.
        match tokio::time::timeout(self.timeout, self.list_inspected(device_id)).await {
            Ok(result) => result,
            Err(_) => Err(RuntimeError::Unreachable(self.no_answer())),
        }
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo> {
        let docker = self.client()?;
        let request = docker.inspect_container(id, None::<InspectContainerOptions>);
        Ok(to_info(self.bounded("inspect", id, request).await?))
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String> {
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let devices = spec
            .devices
            .iter()
            .map(|d| DeviceMapping {
                path_on_host: Some(d.clone()),
                path_in_container: Some(d.clone()),
                cgroup_permissions: Some("rwm".into()),
            })
            .collect::<Vec<_>>();
        let log_config = self.log_rotation.map(|r| HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_string(), format!("{}m", r.max_size_mb)),
                ("max-file".to_string(), r.max_files.to_string()),
            ])),
        });
        let host_config = HostConfig {
            // berth enforces the policy itself (SPEC 6); the engine's is `no`.
            restart_policy: Some(bollard::models::RestartPolicy {
                name: Some(bollard::models::RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            network_mode: Some(spec.network_mode.clone()),
            nano_cpus: spec.nano_cpus,
            memory: spec.memory_bytes,
            binds: (!spec.binds.is_empty()).then(|| spec.binds.clone()),
            extra_hosts: (!spec.extra_hosts.is_empty()).then(|| spec.extra_hosts.clone()),
            devices: (!devices.is_empty()).then_some(devices),
            log_config,
            ..Default::default()
        };
        // An isolated component's network, with the executable's name as alias.
        let networking_config = (spec.network_mode != "host").then(|| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                spec.network_mode.clone(),
                EndpointSettings {
                    aliases: Some(spec.network_aliases.clone()),
                    ..Default::default()
                },
            )])),
        });
        let healthcheck = spec.healthcheck.as_ref().map(|h| HealthConfig {
            // Exec form: the engine runs it without a shell.
            test: Some(
                std::iter::once("CMD".to_string())
                    .chain(h.command.iter().cloned())
                    .collect(),
            ),
            interval: Some(nanos(h.interval)),
            timeout: Some(nanos(h.timeout)),
            retries: Some(i64::from(h.retries)),
            start_period: Some(nanos(h.start_period)),
            start_interval: None,
        });
        let body = ContainerCreateBody {
            networking_config,
            image: Some(spec.image.clone()),
            cmd: spec.cmd.clone(),
            env: Some(env),
            labels: Some(spec.labels.clone().into_iter().collect()),
            host_config: Some(host_config),
            healthcheck,
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let docker = self.client()?;
        let request = docker.create_container(Some(options), body);
        match self.bounded("create", &spec.name, request).await {
            Ok(response) => Ok(response.id),
            // 404 on create: the image, or an isolated component's network.
            Err(e) if e.status() == Some(404) => {
                if self.image_present(&spec.image).await? {
                    Err(e.into())
                } else {
                    Err(RuntimeError::ImageUnavailable {
                        image: spec.image.clone(),
                        message: format!("no such image: {}", spec.image),
                    })
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn start(&self, id: &str) -> Result<()> {
        let docker = self.client()?;
        let request = docker.start_container(id, None::<StartContainerOptions>);
        match self.bounded("start", id, request).await {
            Ok(()) => Ok(()),
            // 400 (the command cannot be run) or 500 (the runtime failed,
            // on older engines for the same reasons): a start failure.
            Err(Classified::Status {
                status: 400 | 500,
                object,
                message,
                ..
            }) => Err(RuntimeError::StartFailed {
                container: object,
                message: start_failure_reason(&message),
            }),
            Err(e) => Err(e.into()),
        }
    }

    async fn stop(&self, id: &str, grace_secs: i64) -> Result<()> {
        let options = StopContainerOptions {
            t: Some(grace_secs.clamp(0, i32::MAX as i64) as i32),
            signal: None,
        };
        let docker = self.client()?;
        // The engine answers once the grace period is over at the latest.
        let request = docker.stop_container(id, Some(options));
        let grace = Duration::from_secs(grace_secs.max(0) as u64);
        match tokio::time::timeout(self.timeout + grace, request).await {
            // 304 (already stopped) is a success for bollard.
            Ok(result) => result.map_err(|e| Classified::new("stop", id, e, &self.host).into()),
            Err(_) => Err(RuntimeError::Unreachable(self.no_answer())),
        }
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        let docker = self.client()?;
        let request = docker.remove_container(id, Some(options));
        Ok(self.bounded("remove", id, request).await?)
    }

    async fn rename(&self, id: &str, name: &str) -> Result<()> {
        let options = RenameContainerOptions {
            name: name.to_string(),
        };
        let docker = self.client()?;
        let request = docker.rename_container(id, options);
        Ok(self.bounded("rename", id, request).await?)
    }

    async fn ensure_network(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        let docker = self.client()?;
        let _one_at_a_time = self.network_lock.lock().await;
        let inspect = docker.inspect_network(name, None::<InspectNetworkOptions>);
        match self.bounded("inspect network", name, inspect).await {
            Ok(_) => return Ok(()),
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e.into()),
        }
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            labels: Some(labels.clone().into_iter().collect()),
            ..Default::default()
        };
        match self
            .bounded("create network", name, docker.create_network(request))
            .await
        {
            Ok(_) => Ok(()),
            // 409: created meanwhile.
            Err(e) if e.status() == Some(409) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        let docker = self.client()?;
        match self
            .bounded("remove network", name, docker.remove_network(name))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn log_tail(&self, id: &str, until_nanos: Option<i64>) -> Result<Vec<String>> {
        let docker = self.client()?;
        // The engine's `until` is in whole seconds and applies after its
        // tail: with an end, ask for the second that holds it, with
        // timestamps to cut it exactly, and a longer tail for the lines of a
        // new run that the engine counts in it.
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            timestamps: until_nanos.is_some(),
            until: until_nanos.map_or(0, |n| {
                i32::try_from(n.div_euclid(1_000_000_000) + 1).unwrap_or(i32::MAX)
            }),
            tail: (LOG_TAIL_LINES * if until_nanos.is_some() { 2 } else { 1 }).to_string(),
            ..Default::default()
        };
        let read = async {
            let mut text = Vec::new();
            let mut stream = docker.logs(id, Some(options));
            while let Some(chunk) = stream.next().await {
                if let Some(chunk) = to_chunk(chunk?) {
                    text.extend_from_slice(&chunk.bytes);
                }
            }
            Ok(text)
        };
        let text = self.bounded("logs", id, read).await?;
        let text = String::from_utf8_lossy(&text);
        Ok(match until_nanos {
            Some(until) => bound_tail(&super::lines_until(&text, until)),
            None => bound_tail(&text),
        })
    }

    async fn stats(&self, id: &str) -> Result<ContainerStats> {
        match self.stats_from_cgroup(id) {
            Some(stats) => Ok(stats),
            None => self.stats_from_engine(id).await,
        }
    }

    async fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let docker = self.client()?;
        let images = self
            .bounded(
                "list",
                "images",
                docker.list_images(Some(ListImagesOptions::default())),
            )
            .await?;
        let options = ListContainersOptions {
            all: true,
            ..Default::default()
        };
        let containers = self
            .bounded("list", "containers", docker.list_containers(Some(options)))
            .await?;
        let mut users: HashMap<String, Vec<String>> = HashMap::new();
        for c in containers {
            if let (Some(image), Some(id)) = (c.image_id, c.id) {
                users.entry(image).or_default().push(id);
            }
        }
        Ok(images
            .into_iter()
            .map(|i| ImageInfo {
                containers: users.remove(&i.id).unwrap_or_default(),
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                size_bytes: u64::try_from(i.size).unwrap_or(0),
                created: i.created,
                id: i.id,
            })
            .collect())
    }

    async fn remove_image(&self, reference: &str) -> Result<()> {
        let docker = self.client()?;
        let options = RemoveImageOptions {
            force: false,
            noprune: false,
        };
        let request = docker.remove_image(reference, Some(options), None);
        match self.bounded("remove image", reference, request).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn data_root_usage(&self) -> Result<DiskUsage> {
        let data_root = self.data_root().await?;
        let path = data_root.clone();
        // statvfs is a blocking call; keep it off the runtime's thread.
        let stat = tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&path))
            .await
            .map_err(|e| RuntimeError::Engine {
                operation: "statvfs",
                object: data_root.display().to_string(),
                message: e.to_string(),
            })?
            .map_err(|e| RuntimeError::Engine {
                operation: "statvfs",
                object: data_root.display().to_string(),
                message: e.desc().to_string(),
            })?;
        let fragment = stat.fragment_size() as u64;
        Ok(DiskUsage {
            data_root,
            total_bytes: stat.blocks() as u64 * fragment,
            free_bytes: stat.blocks_available() as u64 * fragment,
        })
    }

    fn events(
        &self,
        device_id: &str,
        since_nanos: Option<i64>,
        until_nanos: Option<i64>,
    ) -> EventStream {
        let docker = match self.client() {
            Ok(docker) => docker,
            Err(e) => return Box::pin(futures_util::stream::once(async { Err(e) })),
        };
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            (
                "label".to_string(),
                vec![format!("{}={device_id}", labels::DEVICE)],
            ),
            (
                "event".to_string(),
                EVENT_ACTIONS.iter().map(|a| a.to_string()).collect(),
            ),
        ]);
        let options = EventsOptions {
            since: since_nanos.map(engine_time),
            until: until_nanos.map(engine_time),
            filters: Some(filters),
        };
        let host = self.host.clone();
        // bollard's request timeout bounds the wait for the headers, which
        // the engine sends at once; the stream itself may be quiet for hours.
        Box::pin(docker.events(Some(options)).map(move |item| match item {
            Ok(message) => Ok(to_event(message)),
            Err(e) => Err(RuntimeError::Unreachable(format!(
                "{host}: event stream: {e}"
            ))),
        }))
    }
}

/// Classifies an error of the operator's calls (`berth logs`, `berth exec`).
fn engine_error(operation: &'static str, object: &str, e: BollardError) -> RuntimeError {
    Classified::new(operation, object, e, "docker engine").into()
}

/// The engine's `since`/`until` form: seconds with a nanosecond fraction.
fn engine_time(nanos: i64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}

/// Decodes one event as the engine sends it on `/events` (a JSON object)
/// into berth's own [`EngineEvent`]: what the stream does with each message.
pub fn decode_event(json: &[u8]) -> serde_json::Result<EngineEvent> {
    serde_json::from_slice(json).map(to_event)
}

fn to_event(message: bollard::models::EventMessage) -> EngineEvent {
    let actor = message.actor.unwrap_or_default();
    let attributes: BTreeMap<String, String> =
        actor.attributes.unwrap_or_default().into_iter().collect();
    let action = message.action.unwrap_or_default();
    EngineEvent {
        container_id: actor.id.unwrap_or_default(),
        action: to_action(&action, &attributes),
        labels: attributes,
        time_nanos: message
            .time_nano
            .or(message.time.map(|t| t.saturating_mul(1_000_000_000)))
            .unwrap_or(0),
    }
}

fn to_action(action: &str, attributes: &BTreeMap<String, String>) -> EventAction {
    match action {
        "start" => EventAction::Start,
        "die" => EventAction::Die {
            exit_code: attributes.get("exitCode").and_then(|c| c.parse().ok()),
        },
        "kill" => EventAction::Kill {
            signal: attributes.get("signal").cloned(),
        },
        "stop" => EventAction::Stop,
        "destroy" => EventAction::Destroy,
        "oom" => EventAction::Oom,
        "health_status: healthy" => EventAction::Health { healthy: true },
        "health_status: unhealthy" => EventAction::Health { healthy: false },
        other => EventAction::Other(other.to_string()),
    }
}

/// Reading a container's resource use from its cgroup files: four small
/// reads, no engine request (see docs/DESIGN.md for the figures).
mod cgroup {
    use std::path::{Path, PathBuf};

    use super::ContainerStats;

    pub const ROOT: &str = "/sys/fs/cgroup";
    /// The kernel's "no limit" is a page-rounded `i64::MAX`; anything this
    /// large is no limit.
    pub const UNLIMITED: u64 = 1 << 62;

    /// The container's directories under `root` for cgroup v1 (`cpuacct`,
    /// `memory`) or v2 (one unified directory), with the `cgroupfs` or the
    /// `systemd` driver's naming.
    fn dirs(root: &Path, id: &str) -> Option<(PathBuf, PathBuf, bool)> {
        for leaf in [
            format!("docker/{id}"),
            format!("system.slice/docker-{id}.scope"),
        ] {
            let cpu = root.join("cpuacct").join(&leaf);
            let memory = root.join("memory").join(&leaf);
            if cpu.is_dir() && memory.is_dir() {
                return Some((cpu, memory, false));
            }
            let unified = root.join(&leaf);
            if unified.join("cpu.stat").is_file() {
                return Some((unified.clone(), unified, true));
            }
        }
        None
    }

    fn number(path: &Path) -> Option<u64> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// A value of a `key value` file such as `memory.stat`.
    fn field(path: &Path, key: &str) -> Option<u64> {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }

    pub fn read(root: &Path, id: &str) -> Option<ContainerStats> {
        let (cpu, memory, v2) = dirs(root, id)?;
        if v2 {
            let usage = number(&memory.join("memory.current"))?;
            let inactive = field(&memory.join("memory.stat"), "inactive_file").unwrap_or(0);
            let limit = std::fs::read_to_string(memory.join("memory.max"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            return Some(ContainerStats {
                cpu_usage_nanos: field(&cpu.join("cpu.stat"), "usage_usec")?.saturating_mul(1000),
                memory_bytes: usage.saturating_sub(inactive),
                memory_limit_bytes: limit.filter(|l| *l < UNLIMITED),
            });
        }
        let usage = number(&memory.join("memory.usage_in_bytes"))?;
        let inactive = field(&memory.join("memory.stat"), "total_inactive_file").unwrap_or(0);
        let limit = number(&memory.join("memory.limit_in_bytes"));
        Some(ContainerStats {
            cpu_usage_nanos: number(&cpu.join("cpuacct.usage"))?,
            memory_bytes: usage.saturating_sub(inactive),
            memory_limit_bytes: limit.filter(|l| *l < UNLIMITED),
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_v1_cgroupfs_and_v2_systemd_layouts() {
            let root = tempfile::tempdir().unwrap();
            let v1 = root.path();
            std::fs::create_dir_all(v1.join("cpuacct/docker/abc")).unwrap();
            std::fs::create_dir_all(v1.join("memory/docker/abc")).unwrap();
            std::fs::write(v1.join("cpuacct/docker/abc/cpuacct.usage"), "1500\n").unwrap();
            std::fs::write(v1.join("memory/docker/abc/memory.usage_in_bytes"), "9000\n").unwrap();
            std::fs::write(
                v1.join("memory/docker/abc/memory.stat"),
                "cache 5\ntotal_inactive_file 1000\n",
            )
            .unwrap();
            std::fs::write(
                v1.join("memory/docker/abc/memory.limit_in_bytes"),
                "9223372036854771712\n",
            )
            .unwrap();
            assert_eq!(
                read(v1, "abc"),
                Some(ContainerStats {
                    cpu_usage_nanos: 1500,
                    memory_bytes: 8000,
                    memory_limit_bytes: None,
                })
            );
            assert_eq!(read(v1, "other"), None);

            let root2 = tempfile::tempdir().unwrap();
            let dir = root2.path().join("system.slice/docker-def.scope");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").unwrap();
            std::fs::write(dir.join("memory.current"), "4096\n").unwrap();
            std::fs::write(dir.join("memory.stat"), "anon 1\ninactive_file 96\n").unwrap();
            std::fs::write(dir.join("memory.max"), "8388608\n").unwrap();
            assert_eq!(
                read(root2.path(), "def"),
                Some(ContainerStats {
                    cpu_usage_nanos: 7000,
                    memory_bytes: 4000,
                    memory_limit_bytes: Some(8_388_608),
                })
            );
        }
    }
}

/// Authenticated pulls, sent by hand: bollard encodes `X-Registry-Auth` with
/// standard base64 while the engine decodes URL-safe base64 and silently drops
/// credentials it cannot decode (any whose encoding holds `+` or `/`).
mod pull_with_auth {
    use std::time::Duration;

    use base64::Engine as _;
    use futures_util::{Stream, StreamExt};
    use http_body_util::{BodyExt, BodyStream, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;

    use super::{PullLine, RegistryAuth, RuntimeError, API_VERSION};

    pub enum Error {
        Unreachable(String),
        Refused(String),
    }

    /// Sends the pull and returns its progress lines once the engine has
    /// answered with a success; `timeout` bounds the connection and the wait
    /// for the answer.
    pub async fn pull(
        host: &str,
        image: &str,
        tag: &str,
        auth: &RegistryAuth,
        timeout: Duration,
    ) -> Result<impl Stream<Item = super::Result<PullLine>> + Unpin, Error> {
        let credentials = serde_json::json!({
            "username": auth.username,
            "password": auth.password,
            "serveraddress": auth.server,
        });
        let header = base64::engine::general_purpose::URL_SAFE.encode(credentials.to_string());
        let mut query = format!("fromImage={}", encode(image));
        if !tag.is_empty() {
            query.push_str(&format!("&tag={}", encode(tag)));
        }
        let uri = format!(
            "/v{}.{}/images/create?{query}",
            API_VERSION.major_version, API_VERSION.minor_version
        );
        let request = hyper::Request::post(uri)
            .header("Host", "docker")
            .header("X-Registry-Auth", header)
            .body(Empty::<Bytes>::new())
            .map_err(|e| Error::Unreachable(e.to_string()))?;

        let unreachable = |e: &dyn std::fmt::Display| Error::Unreachable(format!("{host}: {e}"));
        let send_request = async {
            if let Some(path) = host.strip_prefix("unix://") {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| unreachable(&e))?;
                send(TokioIo::new(stream), request).await
            } else {
                let addr = host.trim_start_matches("tcp://");
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| unreachable(&e))?;
                send(TokioIo::new(stream), request).await
            }
        };
        let response = tokio::time::timeout(timeout, send_request)
            .await
            .map_err(|_| unreachable(&format!("no answer within {timeout:?}")))??;
        let status = response.status();
        if !status.is_success() {
            let body = tokio::time::timeout(timeout, response.into_body().collect())
                .await
                .map_err(|_| unreachable(&format!("no answer within {timeout:?}")))?
                .map_err(|e| unreachable(&e))?
                .to_bytes();
            let text = String::from_utf8_lossy(&body);
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.trim().to_string());
            return Err(Error::Refused(message));
        }
        // A 200 streams progress lines; a failure arrives as an `error` line.
        let host = host.to_string();
        let frames = BodyStream::new(response.into_body());
        let lines = frames
            .scan(Vec::<u8>::new(), move |pending, frame| {
                let out: Vec<super::Result<PullLine>> = match frame {
                    Err(e) => vec![Err(RuntimeError::Unreachable(format!("{host}: {e}")))],
                    Ok(frame) => match frame.into_data() {
                        Ok(data) => {
                            pending.extend_from_slice(&data);
                            let mut lines = Vec::new();
                            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                                let line: Vec<u8> = pending.drain(..=end).collect();
                                if let Some(parsed) =
                                    PullLine::parse(String::from_utf8_lossy(&line).trim())
                                {
                                    lines.push(Ok(parsed));
                                }
                            }
                            lines
                        }
                        Err(_) => Vec::new(),
                    },
                };
                std::future::ready(Some(futures_util::stream::iter(out)))
            })
            .flatten();
        Ok(Box::pin(lines))
    }

    async fn send<S>(
        io: TokioIo<S>,
        request: hyper::Request<Empty<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, Error>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        tokio::spawn(connection);
        sender
            .send_request(request)
            .await
            .map_err(|e| Error::Unreachable(e.to_string()))
    }

    /// Percent-encodes a query value.
    fn encode(value: &str) -> String {
        value
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
}

/// Which stream of a container or exec a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A piece of a container's or an exec's output, as the engine sent it (not
/// split into lines). With a TTY everything arrives as `Stdout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub stream: OutputStream,
    pub bytes: Vec<u8>,
}

/// A stream of output chunks, ending when the engine closes it.
pub type OutputChunks =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<OutputChunk>> + Send>>;

/// What `berth logs` asks of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogRequest {
    /// Keep streaming until the container stops.
    pub follow: bool,
    /// Only the last N lines; `None` for all of them.
    pub tail: Option<u64>,
    /// Prefix each line with the engine's RFC 3339 time stamp.
    pub timestamps: bool,
}

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermSize {
    pub rows: u16,
    pub cols: u16,
}

/// What `berth exec` asks of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    /// Give the command a pseudo-terminal (output then comes as one stream).
    pub tty: bool,
}

/// A started exec: its output, and its stdin (shut it down for end of file).
pub struct ExecSession {
    /// The engine's exec id, for `resize_exec` and `exec_exit_code`.
    pub id: String,
    pub output: OutputChunks,
    pub input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
}

fn to_chunk(output: bollard::container::LogOutput) -> Option<OutputChunk> {
    use bollard::container::LogOutput;
    let (stream, message) = match output {
        LogOutput::StdOut { message } | LogOutput::Console { message } => {
            (OutputStream::Stdout, message)
        }
        LogOutput::StdErr { message } => (OutputStream::Stderr, message),
        LogOutput::StdIn { .. } => return None,
    };
    Some(OutputChunk {
        stream,
        bytes: message.to_vec(),
    })
}

/// The operator's calls (`berth logs`, `berth exec`): not part of
/// `ContainerRuntime`, since the supervisor never needs them.
impl DockerRuntime {
    /// The container's output, stdout and stderr kept apart. The stream ends
    /// at the end of the log, or with `follow` when the container stops.
    pub fn logs(&self, id: &str, request: LogRequest) -> OutputChunks {
        let docker = match self.client() {
            Ok(docker) => docker,
            Err(e) => return Box::pin(futures_util::stream::once(async { Err(e) })),
        };
        let options = bollard::query_parameters::LogsOptions {
            follow: request.follow,
            stdout: true,
            stderr: true,
            timestamps: request.timestamps,
            tail: request
                .tail
                .map_or_else(|| "all".to_string(), |n| n.to_string()),
            ..Default::default()
        };
        let object = id.to_string();
        Box::pin(docker.logs(id, Some(options)).filter_map(move |item| {
            let item = match item {
                Ok(output) => to_chunk(output).map(Ok),
                Err(e) => Some(Err(engine_error("logs", &object, e))),
            };
            std::future::ready(item)
        }))
    }

    /// Creates and starts `request.cmd` in the running container `id`, with
    /// stdin, stdout and stderr attached.
    pub async fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecSession> {
        let docker = self.client()?;
        let options = bollard::exec::CreateExecOptions {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(request.tty),
            cmd: Some(request.cmd.clone()),
            ..Default::default()
        };
        let exec_id = docker
            .create_exec(id, options)
            .await
            .map_err(|e| engine_error("exec in", id, e))?
            .id;
        let start = bollard::exec::StartExecOptions {
            detach: false,
            tty: request.tty,
            output_capacity: None,
        };
        match docker.start_exec(&exec_id, Some(start)).await {
            Ok(bollard::exec::StartExecResults::Attached { output, input }) => {
                let object = id.to_string();
                let output = output.filter_map(move |item| {
                    let item = match item {
                        Ok(output) => to_chunk(output).map(Ok),
                        Err(e) => Some(Err(engine_error("exec in", &object, e))),
                    };
                    std::future::ready(item)
                });
                Ok(ExecSession {
                    id: exec_id,
                    output: Box::pin(output),
                    input,
                })
            }
            Ok(bollard::exec::StartExecResults::Detached) => Err(RuntimeError::Engine {
                operation: "exec in",
                object: id.to_string(),
                message: "the engine detached the exec instead of attaching it".to_string(),
            }),
            Err(e) => Err(engine_error("exec in", id, e)),
        }
    }

    /// Tells the exec's pseudo-terminal its size.
    pub async fn resize_exec(&self, exec_id: &str, size: TermSize) -> Result<()> {
        let options = bollard::query_parameters::ResizeExecOptions {
            h: i32::from(size.rows),
            w: i32::from(size.cols),
        };
        self.client()?
            .resize_exec(exec_id, options)
            .await
            .map_err(|e| engine_error("resize exec", exec_id, e))
    }

    /// The exit code of a finished exec; `None` while it still runs.
    pub async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>> {
        let inspect = self
            .client()?
            .inspect_exec(exec_id)
            .await
            .map_err(|e| engine_error("inspect exec", exec_id, e))?;
        if inspect.running.unwrap_or(false) {
            return Ok(None);
        }
        Ok(inspect.exit_code)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    use super::*;
    use crate::runtime::ContainerRuntime;

    /// Found by fuzzing: an event with a `time` (seconds) far in the
    /// future and no `timeNano` overflowed when turned into nanoseconds.
    #[test]
    fn event_time_in_seconds_saturates() {
        let event = decode_event(br#"{"Action":"die","time":961660193053}"#).unwrap();
        assert_eq!(event.time_nanos, i64::MAX);
        let event = decode_event(br#"{"Action":"start","time":2,"timeNano":5}"#).unwrap();
        assert_eq!((event.action, event.time_nanos), (EventAction::Start, 5));
        let event = decode_event(br#"{"Action":"oom","time":3}"#).unwrap();
        assert_eq!(event.time_nanos, 3_000_000_000);
    }

    #[test]
    fn references_split_into_image_and_tag() {
        let rows = [
            ("busybox", ("busybox", "latest")),
            ("busybox:1", ("busybox", "1")),
            (
                "127.0.0.1:5000/berth/busybox:1",
                ("127.0.0.1:5000/berth/busybox", "1"),
            ),
            (
                "127.0.0.1:5000/berth/busybox",
                ("127.0.0.1:5000/berth/busybox", "latest"),
            ),
            ("img@sha256:abc", ("img@sha256:abc", "")),
        ];
        for (input, want) in rows {
            assert_eq!(split_reference(input), want, "{input}");
        }
    }

    #[test]
    fn start_failure_keeps_the_runtime_words_an_operator_needs() {
        let runc = "failed to create shim task: OCI runtime create failed: runc create failed: \
            unable to start container process: exec: \"nope\": executable file not found in \
            $PATH: unknown";
        assert_eq!(
            start_failure_reason(runc),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert_eq!(
            start_failure_reason("cannot join network of a non running container"),
            "cannot join network of a non running container"
        );
    }

    #[test]
    fn engine_statuses_become_berth_errors() {
        let status = |status_code: u16| {
            Classified::new(
                "remove",
                "c1",
                BollardError::DockerResponseServerError {
                    status_code,
                    message: "whatever the engine says".into(),
                },
                "unix:///x",
            )
            .into_error()
        };
        assert_eq!(status(404), RuntimeError::NotFound("c1".into()));
        assert!(matches!(
            status(409),
            RuntimeError::Conflict {
                operation: "remove",
                ..
            }
        ));
        assert!(matches!(status(500), RuntimeError::Engine { .. }));
        let timeout = Classified::new("list", "containers", BollardError::RequestTimeoutError, "h");
        assert!(matches!(timeout.into_error(), RuntimeError::Unreachable(_)));
    }

    #[test]
    fn health_status_events_are_decoded() {
        let none = BTreeMap::new();
        assert_eq!(
            to_action("health_status: healthy", &none),
            EventAction::Health { healthy: true }
        );
        assert_eq!(
            to_action("health_status: unhealthy", &none),
            EventAction::Health { healthy: false }
        );
        let die = BTreeMap::from([("exitCode".to_string(), "3".to_string())]);
        assert_eq!(
            to_action("die", &die),
            EventAction::Die { exit_code: Some(3) }
        );
    }

    #[test]
    fn pull_lines_are_parsed() {
        let line = r#"{"status":"Downloading","progressDetail":{"current":100,"total":400},"progress":"[==>   ]","id":"a1b2"}"#;
        assert_eq!(
            PullLine::parse(line),
            Some(PullLine {
                layer: "a1b2".into(),
                status: "Downloading".into(),
                current: Some(100),
                total: Some(400),
                error: None,
            })
        );
        let error = r#"{"errorDetail":{"message":"denied"},"error":"denied"}"#;
        assert_eq!(
            PullLine::parse(error).unwrap().error.as_deref(),
            Some("denied")
        );
    }

    /// A stand-in engine socket that accepts connections and reads requests
    /// but never answers, like a hung engine.
    fn silent_engine() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        let host = format!("unix://{}", path.display());
        (dir, host)
    }

    const BOUND: Duration = Duration::from_millis(400);

    /// Asserts that `call` ends as `Unreachable` no sooner than the timeout
    /// and within it plus a margin for a loaded machine.
    async fn assert_unreachable_in_time<T: std::fmt::Debug>(
        what: &str,
        call: impl Future<Output = Result<T>>,
    ) {
        let started = Instant::now();
        let result = call.await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(RuntimeError::Unreachable(_))),
            "{what}: {result:?}"
        );
        assert!(took >= BOUND, "{what}: gave up after {took:?}: {result:?}");
        assert!(
            took < BOUND + Duration::from_secs(3),
            "{what}: took {took:?}"
        );
    }

    #[tokio::test]
    async fn a_hung_engine_is_unreachable_within_the_timeout() {
        let (_dir, host) = silent_engine();
        let engine = DockerRuntime::new(&host).with_timeout(BOUND);
        assert_unreachable_in_time("ping", engine.ping()).await;
        assert_unreachable_in_time("list", engine.list("robot")).await;
        assert_unreachable_in_time("inspect", engine.inspect("c1")).await;
        assert_unreachable_in_time("image_present", engine.image_present("img:1")).await;
        assert_unreachable_in_time("start", engine.start("c1")).await;
        assert_unreachable_in_time("remove", engine.remove("c1")).await;
        assert_unreachable_in_time("stop", engine.stop("c1", 0)).await;
        let spec = ContainerSpec {
            name: "c1".into(),
            image: "img:1".into(),
            network_mode: "host".into(),
            ..Default::default()
        };
        assert_unreachable_in_time("create", engine.create(&spec)).await;
        assert_unreachable_in_time("log_tail", engine.log_tail("c1", None)).await;
        assert_unreachable_in_time("stats", engine.stats_from_engine("c1")).await;
        assert_unreachable_in_time("list_images", engine.list_images()).await;
        assert_unreachable_in_time("remove_image", engine.remove_image("img:1")).await;
        assert_unreachable_in_time("data_root_usage", engine.data_root_usage()).await;
        assert_unreachable_in_time("pull", engine.pull("img:1", None)).await;
        let auth = RegistryAuth {
            server: "registry.example.com".into(),
            username: "u".into(),
            password: "p".into(),
        };
        assert_unreachable_in_time("authenticated pull", engine.pull("img:1", Some(&auth))).await;
        let events = async { engine.events("robot", None, None).next().await.unwrap() };
        assert_unreachable_in_time("event stream headers", events).await;
    }

    /// A stand-in engine that answers a pull with one progress line, then
    /// stalls with the connection open.
    fn stalling_pull_engine() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let line = r#"{"status":"Downloading","progressDetail":{"current":1,"total":4},"id":"l1"}"#;
                    let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                                Transfer-Encoding: chunked\r\n\r\n";
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(chunk.as_bytes()).await;
                    while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        let host = format!("unix://{}", path.display());
        (dir, host)
    }

    #[tokio::test]
    async fn a_pull_without_progress_fails_as_unreachable() {
        let (_dir, host) = stalling_pull_engine();
        let engine = DockerRuntime::new(&host).with_timeout(BOUND);
        let mut seen = Vec::new();
        let started = Instant::now();
        let result = engine
            .pull_with_progress("img:1", None, &mut |p| seen.push(p))
            .await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(RuntimeError::Unreachable(ref m)) if m.contains("no progress")),
            "{result:?}"
        );
        assert!(
            took >= BOUND && took < BOUND + Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(
            seen,
            [PullProgress {
                done_bytes: 1,
                total_bytes: 4
            }]
        );
    }
}
