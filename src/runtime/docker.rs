//! The Docker engine adapter: the only file that imports bollard. It speaks
//! API 1.41 (Docker 20.10, the oldest engine berth supports) and maps the
//! engine's answers to berth's own types and errors.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, DeviceMapping, EndpointSettings, HostConfig, NetworkCreateRequest,
    NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, InspectContainerOptions,
    InspectNetworkOptions, ListContainersOptions, RemoveContainerOptions, RenameContainerOptions,
    StartContainerOptions, StopContainerOptions,
};
use bollard::{ClientVersion, Docker};
use futures_util::StreamExt;

use super::{
    ContainerInfo, ContainerRuntime, ContainerSpec, EngineEvent, EventAction, EventStream,
    RegistryAuth, Result, RuntimeError,
};
use crate::model::labels;

const API_VERSION: ClientVersion = ClientVersion {
    major_version: 1,
    minor_version: 41,
};
/// Seconds a single engine request may take (pulls stream and are not bound by it).
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// A Docker engine at `unix:///path` or `tcp://host:port`.
pub struct DockerRuntime {
    host: String,
    /// Built lazily: bollard refuses a unix socket that does not exist yet,
    /// and the engine may come up after berth.
    client: Mutex<Option<Docker>>,
    /// The engine accepts two networks of one name: berth creates them one
    /// at a time, so the executables of a component starting together share one.
    network_lock: tokio::sync::Mutex<()>,
}

impl DockerRuntime {
    pub fn new(host: &str) -> Self {
        DockerRuntime {
            host: host.to_string(),
            client: Mutex::new(None),
            network_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn client(&self) -> Result<Docker> {
        let mut slot = self.client.lock().expect("docker client lock");
        if let Some(docker) = slot.as_ref() {
            return Ok(docker.clone());
        }
        let docker = if let Some(path) = self.host.strip_prefix("unix://") {
            Docker::connect_with_unix(path, REQUEST_TIMEOUT_SECS, &API_VERSION)
        } else {
            let addr = self.host.replacen("tcp://", "http://", 1);
            Docker::connect_with_http(&addr, REQUEST_TIMEOUT_SECS, &API_VERSION)
        }
        .map_err(|e| RuntimeError::Unreachable(format!("{}: {e}", self.host)))?;
        *slot = Some(docker.clone());
        Ok(docker)
    }
}

/// Maps a bollard error on `operation` of `object` to berth's error.
fn engine_error(operation: &'static str, object: &str, e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError {
            status_code: 404,
            message,
        } if operation != "pull" => {
            let _ = message;
            RuntimeError::NotFound(object.to_string())
        }
        BollardError::DockerResponseServerError { message, .. } => RuntimeError::Engine {
            operation,
            object: object.to_string(),
            message,
        },
        BollardError::DockerStreamError { error } => RuntimeError::Engine {
            operation,
            object: object.to_string(),
            message: error,
        },
        other => RuntimeError::Unreachable(format!("{other}")),
    }
}

fn to_info(c: bollard::models::ContainerInspectResponse) -> ContainerInfo {
    let state = c.state.unwrap_or_default();
    let config = c.config.unwrap_or_default();
    let image = config.image.unwrap_or_default();
    let labels = config.labels.unwrap_or_default().into_iter().collect();
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

impl ContainerRuntime for DockerRuntime {
    async fn ping(&self) -> Result<()> {
        self.client()?
            .ping()
            .await
            .map(|_| ())
            .map_err(|e| RuntimeError::Unreachable(format!("{}: {e}", self.host)))
    }

    async fn image_present(&self, image: &str) -> Result<bool> {
        match self.client()?.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(engine_error("inspect image", image, e)),
        }
    }

    async fn pull(&self, image: &str, auth: Option<&RegistryAuth>) -> Result<()> {
        let (from_image, tag) = split_reference(image);
        let unavailable = |message: String| RuntimeError::ImageUnavailable {
            image: image.to_string(),
            message,
        };
        if let Some(auth) = auth {
            return pull_with_auth::pull(&self.host, from_image, tag, auth)
                .await
                .map_err(|e| match e {
                    pull_with_auth::Error::Unreachable(m) => RuntimeError::Unreachable(m),
                    pull_with_auth::Error::Refused(m) => unavailable(m),
                });
        }
        let options = CreateImageOptions {
            from_image: Some(from_image.to_string()),
            tag: (!tag.is_empty()).then(|| tag.to_string()),
            ..Default::default()
        };
        let mut progress = self.client()?.create_image(Some(options), None, None);
        while let Some(item) = progress.next().await {
            match item {
                Ok(_) => {}
                Err(BollardError::DockerResponseServerError { message, .. })
                | Err(BollardError::DockerStreamError { error: message }) => {
                    return Err(unavailable(message))
                }
                Err(e) => return Err(RuntimeError::Unreachable(format!("{}: {e}", self.host))),
            }
        }
        Ok(())
    }

    async fn list(&self, device_id: &str) -> Result<Vec<ContainerInfo>> {
        let docker = self.client()?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{}={device_id}", labels::DEVICE)],
        )]);
        let summaries = docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| engine_error("list", "containers", e))?;
        // A few inspections at a time: a robot with a hundred containers
        // reconciles in a fraction of the time of one after the other.
        let inspected: Vec<Result<ContainerInfo>> =
            futures_util::stream::iter(summaries.into_iter().filter_map(|s| s.id))
                .map(|id| async move { self.inspect(&id).await })
                .buffered(8)
                .collect()
                .await;
        let mut out = Vec::with_capacity(inspected.len());
        for result in inspected {
            match result {
                Ok(info) => out.push(info),
                // Removed between the listing and the inspection.
                Err(RuntimeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInfo> {
        self.client()?
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map(to_info)
            .map_err(|e| engine_error("inspect", id, e))
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
        let body = ContainerCreateBody {
            networking_config,
            image: Some(spec.image.clone()),
            cmd: spec.cmd.clone(),
            env: Some(env),
            labels: Some(spec.labels.clone().into_iter().collect()),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        self.client()?
            .create_container(Some(options), body)
            .await
            .map(|r| r.id)
            .map_err(|e| engine_error("create", &spec.name, e))
    }

    async fn start(&self, id: &str) -> Result<()> {
        self.client()?
            .start_container(id, None::<StartContainerOptions>)
            .await
            .map_err(|e| engine_error("start", id, e))
    }

    async fn stop(&self, id: &str, grace_secs: i64) -> Result<()> {
        let options = StopContainerOptions {
            t: Some(grace_secs.clamp(0, i32::MAX as i64) as i32),
            signal: None,
        };
        match self.client()?.stop_container(id, Some(options)).await {
            // 304: already stopped.
            Err(BollardError::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            other => other.map_err(|e| engine_error("stop", id, e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        self.client()?
            .remove_container(id, Some(options))
            .await
            .map_err(|e| engine_error("remove", id, e))
    }

    async fn rename(&self, id: &str, name: &str) -> Result<()> {
        let options = RenameContainerOptions {
            name: name.to_string(),
        };
        self.client()?
            .rename_container(id, options)
            .await
            .map_err(|e| engine_error("rename", id, e))
    }

    async fn ensure_network(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<()> {
        let docker = self.client()?;
        let _one_at_a_time = self.network_lock.lock().await;
        match docker
            .inspect_network(name, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => return Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(engine_error("inspect network", name, e)),
        }
        let request = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            labels: Some(labels.clone().into_iter().collect()),
            ..Default::default()
        };
        match docker.create_network(request).await {
            // 409: created meanwhile.
            Ok(_)
            | Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(engine_error("create network", name, e)),
        }
    }

    async fn remove_network(&self, name: &str) -> Result<()> {
        match self.client()?.remove_network(name).await {
            Ok(())
            | Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(engine_error("remove network", name, e)),
        }
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
        ]);
        let options = EventsOptions {
            since: since_nanos.map(engine_time),
            until: until_nanos.map(engine_time),
            filters: Some(filters),
        };
        let host = self.host.clone();
        Box::pin(docker.events(Some(options)).map(move |item| match item {
            Ok(message) => Ok(to_event(message)),
            Err(e) => Err(RuntimeError::Unreachable(format!(
                "{host}: event stream: {e}"
            ))),
        }))
    }
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
    let action = match action.as_str() {
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
        other => EventAction::Other(other.to_string()),
    };
    EngineEvent {
        container_id: actor.id.unwrap_or_default(),
        action,
        labels: attributes,
        time_nanos: message
            .time_nano
            .or(message.time.map(|t| t.saturating_mul(1_000_000_000)))
            .unwrap_or(0),
    }
}

/// Authenticated pulls, sent by hand: bollard encodes `X-Registry-Auth` with
/// standard base64 while the engine decodes URL-safe base64 and silently drops
/// credentials it cannot decode (any whose encoding holds `+` or `/`).
mod pull_with_auth {
    use base64::Engine as _;
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;

    use super::{RegistryAuth, API_VERSION};

    pub enum Error {
        Unreachable(String),
        Refused(String),
    }

    pub async fn pull(
        host: &str,
        image: &str,
        tag: &str,
        auth: &RegistryAuth,
    ) -> Result<(), Error> {
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
        let response = if let Some(path) = host.strip_prefix("unix://") {
            let stream = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| unreachable(&e))?;
            send(TokioIo::new(stream), request).await?
        } else {
            let addr = host.trim_start_matches("tcp://");
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(&e))?;
            send(TokioIo::new(stream), request).await?
        };
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(&e))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        if !status.is_success() {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| text.trim().to_string());
            return Err(Error::Refused(message));
        }
        // A 200 streams progress lines; a failure arrives as an `error` line.
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                if let Some(error) = v.get("error").and_then(|e| e.as_str()) {
                    return Err(Error::Refused(error.to_string()));
                }
            }
        }
        Ok(())
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
    use super::*;

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
}
