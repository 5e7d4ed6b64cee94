//! The local control socket behind `berth status`, and the operator commands
//! around it (SPEC 2).
//!
//! In the daemon, `Snapshot` sits between the supervisor and the MQTT
//! reporter: it keeps the latest document of every retained topic and passes
//! every publish on. `serve` answers a `status` line on
//! `<state_dir>/berth.sock` (mode 0600) with those documents, exactly as MQTT
//! carries them, so `berth status` works with the broker away.
//!
//! The same socket carries the operator actions `stop`, `start` and
//! `restart` (a line `restart DEPLOYMENT [EXECUTABLE]`) to the supervisor
//! and answers with the deployment's document after the effect.
//!
//! On the operator's side, `query_status` and `query_action` ask the socket
//! and `render_status` lays the answer out for a terminal. `logs` and `exec` talk to the Docker
//! engine directly, finding an executable's container by berth's labels, so
//! they work while the daemon is down too.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use serde::{Deserialize, Serialize};

use crate::model::{labels, ErrorCode, Phase, Status};
use crate::report::{AgentDoc, DeploymentDoc, Reporter, RosMasterDoc, Topic};
use crate::runtime::docker::{DockerRuntime, ExecRequest, LogRequest, OutputStream, TermSize};
use crate::runtime::{ContainerInfo, ContainerRuntime, RuntimeError};
use crate::supervisor::{Action, Operator, OperatorRequest};

/// The socket's file name in `state_dir`.
pub const SOCKET_NAME: &str = "berth.sock";
/// A client gets this long to send its request and read the answer.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests are one short line; a longer one is answered with an error
/// after reading no more than this (and one byte).
const MAX_REQUEST_BYTES: u64 = 256;
/// Exchanges served at once. Each holds a descriptor and a task for at most
/// `EXCHANGE_TIMEOUT`; a client beyond these is told at once that berth is
/// busy, so a flood of clients (or ones that never read) cannot take the
/// descriptors and the thread the supervisor needs.
pub const MAX_CLIENTS: usize = 32;
/// What a client beyond `MAX_CLIENTS` is told, written without waiting.
const BUSY_ANSWER: &[u8] = b"{\"error\":\"busy: too many control clients at once; try again\"}\n";
/// How long an operator action may take before the client gives up: a stop
/// waits for the executables' grace periods, a start may create containers.
const ACTION_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `berth exec` waits for the engine to record the exit code after
/// the command's output has ended.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(5);

/// Where the daemon listens for a given `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

// --- the snapshot --------------------------------------------------------------

/// A reporter that keeps the latest document of every retained topic and
/// forwards every publish to `inner`.
pub struct Snapshot<P> {
    inner: Arc<P>,
    latest: Mutex<Latest>,
    /// Counts the deployment documents published, for those who wait for one.
    changes: tokio::sync::watch::Sender<u64>,
}

/// Each document as the text published: a document as a `Value` takes
/// several times its size in memory, and it is read back only when asked.
#[derive(Default)]
struct Latest {
    agent: Option<String>,
    /// Sorted by deployment id, the order `berth status` shows them in.
    deployments: BTreeMap<String, String>,
    ros_master: Option<String>,
    /// The latest `metrics` document, for `berth status --wide`.
    metrics: Option<String>,
}

/// A document kept as text, read back.
fn parsed(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

impl<P> Snapshot<P> {
    pub fn new(inner: Arc<P>) -> Self {
        Snapshot {
            inner,
            latest: Mutex::new(Latest::default()),
            changes: tokio::sync::watch::channel(0).0,
        }
    }

    /// The latest document of deployment `id`.
    pub fn deployment(&self, id: &str) -> Option<Value> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        latest.deployments.get(id).map(|text| parsed(text))
    }

    /// Changes whenever a deployment document is published: subscribe
    /// first, then look with [`Snapshot::deployment`], then wait.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The answer to `status`: `{"agent": …, "deployments": [ … ],
    /// "ros_master": …}`, null where nothing was published yet.
    pub fn status(&self) -> Value {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let one = |text: &Option<String>| text.as_deref().map(parsed);
        json!({
            "agent": one(&latest.agent),
            "deployments": latest.deployments.values().map(|t| parsed(t)).collect::<Vec<_>>(),
            "ros_master": one(&latest.ros_master),
            "metrics": one(&latest.metrics),
        })
    }
}

impl<P: Reporter> Reporter for Snapshot<P> {
    fn publish(&self, topic: Topic, payload: Value) {
        {
            let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
            match &topic {
                Topic::Agent => latest.agent = Some(payload.to_string()),
                Topic::Deployment(id) => {
                    latest.deployments.insert(id.clone(), payload.to_string());
                }
                Topic::RosMaster => latest.ros_master = Some(payload.to_string()),
                Topic::Metrics => latest.metrics = Some(payload.to_string()),
                Topic::Events => {}
            }
        }
        let deployment = matches!(topic, Topic::Deployment(_));
        self.inner.publish(topic, payload);
        if deployment {
            self.changes.send_modify(|n| *n += 1);
        }
    }
}

// --- the server ----------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another berth answers on {}; stop it, or give this one another state_dir", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket; remove it", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot {operation} the control socket {}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ControlError {
    let path = path.to_path_buf();
    move |source| ControlError::Io {
        operation,
        path,
        source,
    }
}

/// Listens on `<state_dir>/berth.sock` and answers `status` until
/// `shutdown`, then removes the socket file. The accept loop and every
/// connection are tracked on `tracker`. Returns the socket's path. Operator
/// actions are refused: see [`serve_with_operator`].
pub fn serve<P: Reporter>(
    state_dir: &Path,
    snapshot: Arc<Snapshot<P>>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<PathBuf, ControlError> {
    serve_with_operator(state_dir, snapshot, None, shutdown, tracker)
}

/// As [`serve`], and carries `stop`, `start` and `restart` to `operator`.
pub fn serve_with_operator<P: Reporter>(
    state_dir: &Path,
    snapshot: Arc<Snapshot<P>>,
    operator: Option<Operator>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Result<PathBuf, ControlError> {
    let path = socket_path(state_dir);
    remove_stale(&path)?;
    let listener = UnixListener::bind(&path).map_err(io_error("create", &path))?;
    // Status documents are for the operator, not for every local user.
    let restricted = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::metadata(&path));
    let owner = match restricted {
        Ok(metadata) => metadata.uid(),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(io_error("restrict", &path)(e));
        }
    };
    info!(socket = %path.display(), "control socket listening");
    tracker.spawn(accept_loop(
        listener,
        path.clone(),
        owner,
        snapshot,
        operator,
        shutdown,
        tracker.clone(),
    ));
    Ok(path)
}

/// A socket left by a berth that did not stop cleanly is removed; one that
/// still answers belongs to a running berth and is left alone.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("inspect", path)(e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ControlError::InUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(io_error("remove the stale", path))
}

async fn accept_loop<P: Reporter>(
    listener: UnixListener,
    path: PathBuf,
    owner: u32,
    snapshot: Arc<Snapshot<P>>,
    operator: Option<Operator>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // The mode is set just after bind; a client that connected in between
        // is still turned away here.
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == owner || cred.uid() == 0 => {}
            Ok(cred) => {
                warn!(
                    uid = cred.uid(),
                    "control socket: refused a client of another user"
                );
                continue;
            }
            Err(e) => {
                warn!(error = %e, "control socket: cannot identify a client");
                continue;
            }
        }
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Never waits: a full socket buffer just loses the answer.
            let _ = stream.try_write(BUSY_ANSWER);
            debug!("control socket: too many clients; turned one away");
            continue;
        };
        let snapshot = Arc::clone(&snapshot);
        let operator = operator.clone();
        tracker.spawn(async move {
            let _slot = slot;
            // Reading the request and writing the answer are each bounded
            // by EXCHANGE_TIMEOUT inside; an operator action may wait for
            // its effect up to ACTION_TIMEOUT in between.
            let answered = answer(stream, &snapshot, operator.as_ref());
            let limit = ACTION_TIMEOUT + 2 * EXCHANGE_TIMEOUT;
            match tokio::time::timeout(limit, answered).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "control socket: request failed"),
                Err(_) => debug!("control socket: client too slow; closed"),
            }
        });
    }
    drop(listener);
    // Without the file, `berth status` says at once that berth is not running.
    if let Err(e) = std::fs::remove_file(&path) {
        debug!(error = %e, socket = %path.display(), "cannot remove the control socket");
    }
}

/// The runtime's own figures, added to the `status` answer (for the soak
/// bench: a task that never ends shows as growth here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuntimeFigures {
    /// Tasks spawned and not yet finished (tokio's `num_alive_tasks`).
    pub alive_tasks: usize,
}

/// `status` with `"runtime"`: the figures of the runtime answering it.
fn with_runtime(mut status: Value) -> Value {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        status["runtime"] = json!(RuntimeFigures {
            alive_tasks: handle.metrics().num_alive_tasks(),
        });
    }
    status
}

/// Reads one request line and writes one answer line.
async fn answer<P>(
    stream: UnixStream,
    snapshot: &Snapshot<P>,
    operator: Option<&Operator>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut request = Vec::new();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST_BYTES + 1));
    let reading = reader.read_until(b'\n', &mut request);
    // One deadline for the exchange, as for `status`; an operator action
    // gets a new one for its answer once its effect is there.
    let mut deadline = tokio::time::Instant::now() + EXCHANGE_TIMEOUT;
    tokio::time::timeout_at(deadline, reading)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request too slow"))??;
    let request = String::from_utf8_lossy(&request).into_owned();
    let words: Vec<&str> = request.split_whitespace().collect();
    let reply = if request.len() as u64 > MAX_REQUEST_BYTES {
        json!({ "error": format!("request longer than {MAX_REQUEST_BYTES} bytes") })
    } else {
        match words.as_slice() {
            ["status"] => with_runtime(snapshot.status()),
            [action, deployment, rest @ ..]
                if Action::parse(action).is_some() && rest.len() <= 1 =>
            {
                match operator {
                    Some(operator) => {
                        let action = Action::parse(action).expect("checked");
                        let request = OperatorRequest {
                            action,
                            deployment: deployment.to_string(),
                            executable: rest.first().map(|e| e.to_string()),
                            by: format!("berth {} (local)", action.as_str()),
                        };
                        let answer = match operator.request(request).await {
                            Ok(doc) => json!({"ok": true, "deployment": doc}),
                            Err(e) => json!({"error": e.to_string()}),
                        };
                        deadline = tokio::time::Instant::now() + EXCHANGE_TIMEOUT;
                        answer
                    }
                    None => json!({"error": "this berth takes no operator actions"}),
                }
            }
            _ => json!({
                "error": format!(
                    "unknown request {:?}; this berth answers `status`, and `stop`, `start` or \
                     `restart` DEPLOYMENT [EXECUTABLE]",
                    request.trim()
                )
            }),
        }
    };
    let mut line = reply.to_string();
    line.push('\n');
    let writing = async {
        write.write_all(line.as_bytes()).await?;
        write.shutdown().await
    };
    tokio::time::timeout_at(deadline, writing)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client too slow"))?
}

// --- berth status ----------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("berth is not running (no control socket at {})", path.display())]
    NotRunning { path: PathBuf },
    #[error("no permission to use {}; run this as the user berth runs as (root)", path.display())]
    Denied { path: PathBuf },
    #[error("cannot ask berth on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("berth on {} answered: {message}", path.display())]
    Refused { path: PathBuf, message: String },
}

/// The answer to `status`, as `berth status` reads it back: the latest
/// document of each retained topic, null (or empty) where nothing was
/// published yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub agent: Option<AgentDoc>,
    pub deployments: Vec<DeploymentDoc>,
    pub ros_master: Option<RosMasterDoc>,
    /// The latest `metrics` document; null before the first one (or when
    /// the topic is off).
    #[serde(default)]
    pub metrics: Option<crate::report::MetricsDoc>,
    /// The runtime's figures when the answer was made; absent from the
    /// answer of an older berth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeFigures>,
}

/// Asks the daemon behind `socket` for its status documents.
pub fn query_status(socket: &Path) -> Result<StatusAnswer, QueryError> {
    let answer = exchange(socket, "status", EXCHANGE_TIMEOUT)?;
    serde_json::from_value(answer).map_err(|e| QueryError::Refused {
        path: socket.to_path_buf(),
        message: format!("not a status document ({e})"),
    })
}

/// Asks the daemon behind `socket` to `stop`, `start` or `restart` a
/// deployment (or one of its executables: `NAME` or `COMPONENT/NAME`), and
/// returns the deployment's document after the effect.
pub fn query_action(
    socket: &Path,
    action: Action,
    deployment: &str,
    executable: Option<&str>,
) -> Result<DeploymentDoc, QueryError> {
    let bad = |what: &str| QueryError::Refused {
        path: socket.to_path_buf(),
        message: format!("{what} must be one word"),
    };
    if deployment.is_empty() || deployment.contains(char::is_whitespace) {
        return Err(bad("the deployment"));
    }
    if executable.is_some_and(|e| e.is_empty() || e.contains(char::is_whitespace)) {
        return Err(bad("the executable"));
    }
    let mut line = format!("{} {deployment}", action.as_str());
    if let Some(executable) = executable {
        line.push(' ');
        line.push_str(executable);
    }
    let answer = exchange(socket, &line, ACTION_TIMEOUT)?;
    serde_json::from_value(answer["deployment"].clone()).map_err(|e| QueryError::Refused {
        path: socket.to_path_buf(),
        message: format!("not a deployment document ({e})"),
    })
}

/// One request line, one answer line: the answer, or the error it names.
fn exchange(socket: &Path, request: &str, timeout: Duration) -> Result<Value, QueryError> {
    use std::io::Write as _;
    use std::os::unix::net::UnixStream;

    let path = socket.to_path_buf();
    let io = |source| QueryError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    QueryError::NotRunning { path }
                }
                std::io::ErrorKind::PermissionDenied => QueryError::Denied { path },
                _ => io(e),
            })
        }
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io)?;
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io)?;
    let answer: Value = serde_json::from_str(&line).map_err(|e| QueryError::Refused {
        path: path.clone(),
        message: format!("not an answer berth gives ({e})"),
    })?;
    match answer.get("error").and_then(Value::as_str) {
        Some(message) => Err(QueryError::Refused {
            path,
            message: message.to_string(),
        }),
        None => Ok(answer),
    }
}

const RED: &str = "31";
const GREEN: &str = "32";
const YELLOW: &str = "33";
const BOLD: &str = "1";

/// One table cell: its text and, on a terminal, its colour.
#[derive(Debug, Clone, PartialEq)]
struct Cell {
    text: String,
    colour: Option<&'static str>,
}

impl Cell {
    fn plain(text: impl Into<String>) -> Cell {
        Cell {
            text: text.into(),
            colour: None,
        }
    }

    fn coloured(text: String, colour: Option<&'static str>) -> Cell {
        Cell { text, colour }
    }
}

fn status_colour(status: Status) -> Option<&'static str> {
    match status {
        Status::Error => Some(RED),
        Status::Pending | Status::Unknown => Some(YELLOW),
        Status::Running => Some(GREEN),
        _ => None,
    }
}

fn phase_colour(phase: Phase) -> Option<&'static str> {
    match phase {
        Phase::FailedToStart | Phase::FailedToUpdate | Phase::PartiallyDeprovisioned => Some(RED),
        Phase::InProgress | Phase::Provisioning => Some(YELLOW),
        Phase::Succeeded => Some(GREEN),
        _ => None,
    }
}

/// A value as one line of text: control characters (an engine message may
/// hold newlines or escapes) become spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// An optional value as one line of text, `-` when absent.
fn or_dash(text: Option<impl std::fmt::Display>) -> String {
    text.map_or_else(|| "-".to_string(), |t| one_line(&t.to_string()))
}

fn error_cell(code: Option<ErrorCode>) -> Cell {
    let colour = code.is_some().then_some(RED);
    Cell::coloured(or_dash(code.map(ErrorCode::as_str)), colour)
}

fn status_cell(status: Status) -> Cell {
    Cell::coloured(status.to_string(), status_colour(status))
}

/// Memory in the largest unit that keeps it above 1: `512M`, `1.5G`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value >= 10.0 || value.fract() == 0.0 {
        format!("{value:.0}{}", UNITS[unit])
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// The `--wide` cells of one executable: CPU, memory (of its limit), health.
fn wide_cells(
    metrics: Option<&crate::report::MetricsDoc>,
    deployment: &str,
    exe: &crate::report::ExecutableDoc,
) -> [Cell; 3] {
    let m = metrics.and_then(|m| {
        m.executables.iter().find(|e| {
            e.deployment == deployment && e.component == exe.component && e.executable == exe.name
        })
    });
    let cpu = or_dash(m.and_then(|m| m.cpu_percent).map(|p| format!("{p:.1}%")));
    let memory = match m.and_then(|m| m.memory_bytes) {
        Some(used) => match m.and_then(|m| m.memory_limit_bytes) {
            Some(limit) => format!("{}/{}", human_bytes(used), human_bytes(limit)),
            None => human_bytes(used),
        },
        None => "-".to_string(),
    };
    let health_colour = match exe.health.as_deref() {
        Some("healthy") => Some(GREEN),
        Some("unhealthy") => Some(RED),
        _ => None,
    };
    [
        Cell::plain(cpu),
        Cell::plain(memory),
        Cell::coloured(or_dash(exe.health.as_deref()), health_colour),
    ]
}

/// One row per deployment, each followed by one row per executable; `wide`
/// (with the latest metrics) adds CPU, memory and health before the reason.
fn table_rows(
    deployments: &[DeploymentDoc],
    wide: Option<Option<&crate::report::MetricsDoc>>,
) -> Vec<Vec<Cell>> {
    let mut header = vec!["DEPLOYMENT", "PHASE", "STATUS", "RESTARTS", "ERROR"];
    if wide.is_some() {
        header.extend(["CPU", "MEMORY", "HEALTH"]);
    }
    header.push("REASON");
    let mut rows = vec![header
        .into_iter()
        .map(|h| Cell::coloured(h.to_string(), Some(BOLD)))
        .collect::<Vec<_>>()];
    for doc in deployments {
        let mut row = vec![
            Cell::plain(one_line(&doc.deployment_id)),
            Cell::coloured(doc.phase.to_string(), phase_colour(doc.phase)),
            status_cell(doc.status),
            Cell::plain(doc.restart_count.to_string()),
            error_cell(doc.error_code),
        ];
        if wide.is_some() {
            row.extend([Cell::plain(""), Cell::plain(""), Cell::plain("")]);
        }
        row.push(Cell::plain(or_dash(doc.reason.as_deref())));
        rows.push(row);
        for exe in &doc.executables {
            let mut row = vec![
                Cell::plain(format!(
                    "  {}/{}",
                    one_line(&exe.component),
                    one_line(&exe.name)
                )),
                Cell::plain(""),
                status_cell(exe.status),
                Cell::plain(exe.restart_count.to_string()),
                error_cell(exe.error_code),
            ];
            if let Some(metrics) = wide {
                row.extend(wide_cells(metrics, &doc.deployment_id, exe));
            }
            row.push(Cell::plain(or_dash(exe.reason.as_deref())));
            rows.push(row);
        }
    }
    rows
}

/// Aligns the cells in columns two spaces apart; the last column is not
/// padded. Colour codes go around the text, never into the padding.
fn layout(rows: &[Vec<Cell>], colour: bool) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|row| row.get(i))
                .map(|cell| cell.text.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                match cell.colour.filter(|_| colour && !cell.text.is_empty()) {
                    Some(code) => line.push_str(&format!("\x1b[{code}m{}\x1b[0m", cell.text)),
                    None => line.push_str(&cell.text),
                }
                if i + 1 < row.len() {
                    let pad = widths[i] - cell.text.chars().count();
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

fn paint(text: &str, code: Option<&'static str>, colour: bool) -> String {
    match code {
        Some(code) if colour => format!("\x1b[{code}m{text}\x1b[0m"),
        _ => text.to_string(),
    }
}

fn agent_line(agent: Option<&AgentDoc>, colour: bool) -> String {
    let Some(agent) = agent else {
        return "berth has not reported yet".to_string();
    };
    if agent.state != "online" {
        return format!(
            "berth {} ({})",
            paint(&one_line(&agent.state), Some(RED), colour),
            or_dash(agent.error_code.map(ErrorCode::as_str))
        );
    }
    let docker_colour = if agent.docker == "connected" {
        GREEN
    } else {
        RED
    };
    format!(
        "berth {} online since {}, boot {}, docker {}",
        one_line(&agent.version),
        one_line(&agent.since),
        one_line(&agent.boot_id),
        paint(&one_line(&agent.docker), Some(docker_colour), colour)
    )
}

fn ros_master_line(ros: &RosMasterDoc, colour: bool) -> String {
    let users = if ros.users.is_empty() {
        "-".to_string()
    } else {
        one_line(&ros.users.join(", "))
    };
    let mut line = format!(
        "ROS master: {}, owner {}, users {}, restarts {}",
        paint(&ros.status.to_string(), status_colour(ros.status), colour),
        or_dash(ros.owner.as_deref()),
        users,
        ros.restart_count,
    );
    if let Some(reason) = &ros.reason {
        line.push_str(&format!(", reason: {}", one_line(reason)));
    }
    line
}

/// One deployment's rows, as `berth status` shows them: what `berth stop`,
/// `start` and `restart` print after the effect.
pub fn render_deployment(doc: &DeploymentDoc, colour: bool) -> String {
    let mut text = layout(&table_rows(std::slice::from_ref(doc), None), colour).join("\n");
    text.push('\n');
    text
}

/// What `berth status` prints: the agent's line, the deployments table, and
/// the ROS master's line when there is one. `colour` adds ANSI colours.
pub fn render_status(status: &StatusAnswer, colour: bool) -> String {
    render(status, colour, false)
}

/// What `berth status --wide` prints: the table with CPU, memory and health
/// columns from the latest `metrics` document (`-` before the first one).
pub fn render_status_wide(status: &StatusAnswer, colour: bool) -> String {
    render(status, colour, true)
}

fn render(status: &StatusAnswer, colour: bool, wide: bool) -> String {
    let mut lines = vec![agent_line(status.agent.as_ref(), colour), String::new()];
    if status.deployments.is_empty() {
        lines.push("no deployments".to_string());
    } else {
        let wide = wide.then_some(status.metrics.as_ref());
        lines.extend(layout(&table_rows(&status.deployments, wide), colour));
    }
    if let Some(ros) = &status.ros_master {
        lines.push(String::new());
        lines.push(ros_master_line(ros, colour));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

// --- berth logs, berth exec ----------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("deployment {deployment} has no container on this device; `berth status` lists the deployments")]
    NoContainers { deployment: String },
    #[error("deployment {deployment} has no executable {executable}; it has {choices}")]
    NoSuchExecutable {
        deployment: String,
        executable: String,
        choices: String,
    },
    #[error("deployment {deployment} has several executables; name one of {choices}")]
    Ambiguous { deployment: String, choices: String },
    #[error("container {container} is not running ({state}); `berth logs` shows its output")]
    NotRunning { container: String, state: String },
    #[error(transparent)]
    Engine(#[from] RuntimeError),
    #[error("the engine did not report the exit code of the command")]
    NoExitCode,
    #[error("cannot {operation} the terminal")]
    Terminal {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

/// `component/executable`, the form the error messages list choices in.
fn exe_label(container: &ContainerInfo) -> String {
    format!(
        "{}/{}",
        container
            .labels
            .get(labels::COMPONENT)
            .map_or("?", String::as_str),
        container
            .labels
            .get(labels::EXECUTABLE)
            .map_or("?", String::as_str),
    )
}

/// Picks the container of `executable` (`NAME` or `COMPONENT/NAME`) among the
/// containers of `deployment`; without `executable`, the only one there is.
fn pick<'a>(
    containers: &'a [ContainerInfo],
    deployment: &str,
    executable: Option<&str>,
) -> Result<&'a ContainerInfo, ToolError> {
    let mut candidates: Vec<&ContainerInfo> = containers
        .iter()
        .filter(|c| c.labels.get(labels::DEPLOYMENT).map(String::as_str) == Some(deployment))
        .collect();
    candidates.sort_by_key(|c| exe_label(c));
    if candidates.is_empty() {
        return Err(ToolError::NoContainers {
            deployment: deployment.to_string(),
        });
    }
    let choices = |list: &[&ContainerInfo]| {
        list.iter()
            .map(|c| exe_label(c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let matching: Vec<&ContainerInfo> = match executable {
        None => candidates.clone(),
        Some(wanted) => candidates
            .iter()
            .copied()
            .filter(|c| {
                exe_label(c) == wanted
                    || c.labels.get(labels::EXECUTABLE).map(String::as_str) == Some(wanted)
            })
            .collect(),
    };
    match (matching.as_slice(), executable) {
        ([one], _) => Ok(one),
        ([], Some(wanted)) => Err(ToolError::NoSuchExecutable {
            deployment: deployment.to_string(),
            executable: wanted.to_string(),
            choices: choices(&candidates),
        }),
        (several, _) => Err(ToolError::Ambiguous {
            deployment: deployment.to_string(),
            choices: choices(several),
        }),
    }
}

/// The container of an executable of `deployment` on `device_id`, found by
/// berth's labels.
pub async fn find_container(
    runtime: &DockerRuntime,
    device_id: &str,
    deployment: &str,
    executable: Option<&str>,
) -> Result<ContainerInfo, ToolError> {
    let containers = runtime.list(device_id).await?;
    pick(&containers, deployment, executable).cloned()
}

/// Writes `bytes` and flushes. A reader that went away (`berth logs | head`)
/// is the end of the output, not an error: returns false then.
async fn emit(out: &mut (impl AsyncWrite + Unpin), bytes: &[u8]) -> Result<bool, ToolError> {
    let written = async {
        out.write_all(bytes).await?;
        out.flush().await
    };
    match written.await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(ToolError::Output(e)),
    }
}

/// Copies the container's stdout to ours and its stderr to ours until the log
/// ends (with `follow`, until the container stops).
pub async fn logs(
    runtime: &DockerRuntime,
    container: &ContainerInfo,
    request: LogRequest,
) -> Result<(), ToolError> {
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut chunks = runtime.logs(&container.id, request);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        let open = match chunk.stream {
            OutputStream::Stdout => emit(&mut stdout, &chunk.bytes).await?,
            OutputStream::Stderr => emit(&mut stderr, &chunk.bytes).await?,
        };
        if !open {
            break;
        }
    }
    Ok(())
}

/// The local terminal in raw mode (keys go to the container as typed, Ctrl-C
/// included); the saved mode comes back when this is dropped, and from the
/// panic hook should berth panic meanwhile.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<RawMode, ToolError> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
        let terminal = |operation| {
            move |e: rustix::io::Errno| ToolError::Terminal {
                operation,
                source: e.into(),
            }
        };
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).map_err(terminal("read the mode of"))?;
        let mut raw = saved.clone();
        raw.make_raw();
        let for_panic = saved.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, &for_panic);
            previous(info);
        }));
        tcsetattr(&stdin, OptionalActions::Now, &raw).map_err(terminal("set raw mode on"))?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use rustix::termios::{tcsetattr, OptionalActions};
        let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

fn terminal_size() -> Option<TermSize> {
    let size = rustix::termios::tcgetwinsize(std::io::stdin()).ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some(TermSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}

/// Reads our stdin on a thread of its own (a blocking read cannot be
/// cancelled; the process exits without waiting for it) and hands the bytes
/// over; the channel closes at end of file.
fn read_stdin() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// Runs `cmd` in the container and returns its exit code. With stdin on a
/// terminal the command gets a pseudo-terminal of the same size and the local
/// terminal goes raw until it ends; otherwise stdin, stdout and stderr are
/// plain pipes. A SIGHUP or SIGTERM to berth ends the session (the terminal
/// is restored) with 128 + the signal's number.
pub async fn exec(
    runtime: &DockerRuntime,
    container: &ContainerInfo,
    cmd: Vec<String>,
) -> Result<i64, ToolError> {
    use tokio::signal::unix::{signal, SignalKind};

    if !container.running {
        return Err(ToolError::NotRunning {
            container: container.name.clone(),
            state: container.state.clone(),
        });
    }
    let tty = std::io::stdin().is_terminal();
    let session = runtime
        .exec(&container.id, &ExecRequest { cmd, tty })
        .await?;
    let signals = |kind: SignalKind| {
        signal(kind).map_err(|source| ToolError::Terminal {
            operation: "watch the signals of",
            source,
        })
    };
    let mut hangup = signals(SignalKind::hangup())?;
    let mut terminate = signals(SignalKind::terminate())?;
    let mut resized = if tty {
        Some(signals(SignalKind::window_change())?)
    } else {
        None
    };
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    if tty {
        if let Some(size) = terminal_size() {
            // A failed resize leaves the default 80x24: not worth failing for.
            let _ = runtime.resize_exec(&session.id, size).await;
        }
    }

    let mut input = session.input;
    let mut stdin = read_stdin();
    let forward = async move {
        while let Some(bytes) = stdin.recv().await {
            if input.write_all(&bytes).await.is_err() || input.flush().await.is_err() {
                return;
            }
        }
        // End of file: the command sees its stdin close.
        let _ = input.shutdown().await;
    };
    tokio::pin!(forward);
    let mut forwarding = true;
    let mut output = session.output;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        tokio::select! {
            chunk = output.next() => {
                let Some(chunk) = chunk else { break };
                let chunk = chunk?;
                match chunk.stream {
                    OutputStream::Stdout => emit(&mut stdout, &chunk.bytes).await?,
                    OutputStream::Stderr => emit(&mut stderr, &chunk.bytes).await?,
                };
            }
            () = &mut forward, if forwarding => forwarding = false,
            Some(()) = async { resized.as_mut()?.recv().await } => {
                if let Some(size) = terminal_size() {
                    let _ = runtime.resize_exec(&session.id, size).await;
                }
            }
            _ = hangup.recv() => return Ok(128 + 1),
            _ = terminate.recv() => return Ok(128 + 15),
        }
    }

    let deadline = tokio::time::Instant::now() + EXIT_CODE_WAIT;
    loop {
        if let Some(code) = runtime.exec_exit_code(&session.id).await? {
            return Ok(code);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ToolError::NoExitCode);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::MemoryReporter;

    fn exe(component: &str, name: &str, status: &str, restarts: u64) -> Value {
        json!({
            "component": component, "name": name, "container_id": "abc",
            "image": "img:1", "status": status, "reason": null, "error_code": null,
            "exit_code": null, "restart_count": restarts, "started_at": null,
        })
    }

    fn deployment(id: &str, phase: &str, status: &str, executables: Vec<Value>) -> Value {
        json!({
            "device_id": "robot-42", "deployment_id": id, "package": "pkg",
            "package_version": "1.0.0", "phase": phase, "status": status,
            "error_code": null, "reason": null, "restart_policy": "always",
            "restart_count": 0, "executables": executables,
            "updated_at": "2026-11-28T16:00:00.125Z",
        })
    }

    /// Documents as `berth status` reads them back.
    fn typed(docs: Vec<Value>) -> Vec<DeploymentDoc> {
        docs.into_iter()
            .map(|d| serde_json::from_value(d).expect("a deployment document"))
            .collect()
    }

    #[test]
    fn table_rows_are_aligned_and_plain_without_a_terminal() {
        let mut failing = deployment(
            "listener",
            "Succeeded",
            "Error",
            vec![{
                let mut e = exe("ros", "listener", "Error", 5);
                e["error_code"] = json!("DEP_E152");
                e["reason"] = json!("exited with code 1; not restarted\n(on-failure)");
                e
            }],
        );
        failing["error_code"] = json!("DEP_E152");
        failing["reason"] = json!("listener failed");
        failing["restart_count"] = json!(5);

        let rows: [(&str, Vec<Value>, Vec<&str>); 3] = [
            (
                "one running deployment",
                vec![deployment(
                    "talker",
                    "Succeeded",
                    "Running",
                    vec![exe("main", "app", "Running", 0)],
                )],
                vec![
                    "DEPLOYMENT  PHASE      STATUS   RESTARTS  ERROR  REASON",
                    "talker      Succeeded  Running  0         -      -",
                    "  main/app             Running  0         -      -",
                ],
            ),
            (
                "an error with its code and a reason cleaned of newlines",
                vec![failing],
                vec![
                    "DEPLOYMENT      PHASE      STATUS  RESTARTS  ERROR     REASON",
                    "listener        Succeeded  Error   5         DEP_E152  listener failed",
                    "  ros/listener             Error   5         DEP_E152  exited with code 1; not restarted (on-failure)",
                ],
            ),
            (
                "several executables and deployments, missing fields shown as -",
                vec![
                    deployment(
                        "a",
                        "Provisioning",
                        "Pending",
                        vec![exe("c", "x", "Pending", 0), exe("c", "y", "Running", 12)],
                    ),
                    deployment("b", "FailedToStart", "Error", vec![]),
                ],
                vec![
                    "DEPLOYMENT  PHASE          STATUS   RESTARTS  ERROR  REASON",
                    "a           Provisioning   Pending  0         -      -",
                    "  c/x                      Pending  0         -      -",
                    "  c/y                      Running  12        -      -",
                    "b           FailedToStart  Error    0         -      -",
                ],
            ),
        ];
        for (name, docs, want) in rows {
            let lines = layout(&table_rows(&typed(docs), None), false);
            assert_eq!(lines, want, "{name}");
            assert!(lines.iter().all(|l| !l.contains('\x1b')), "{name}");
        }
    }

    #[test]
    fn wide_status_adds_cpu_memory_and_health_from_the_metrics() {
        let mut probed = exe("main", "app", "Running", 1);
        probed["health"] = json!("healthy");
        let docs = typed(vec![deployment(
            "talker",
            "Succeeded",
            "Running",
            vec![probed, exe("main", "idle", "Running", 0)],
        )]);
        let metrics: crate::report::MetricsDoc = serde_json::from_value(json!({
            "device_id": "robot-42", "time": "2026-11-28T16:00:00.000Z", "interval_secs": 60,
            "data_root": null,
            "executables": [{
                "deployment": "talker", "component": "main", "executable": "app",
                "status": "Running", "cpu_percent": 87.25, "memory_bytes": 52428800u64,
                "memory_limit_bytes": 268435456u64, "restart_count": 1, "uptime_secs": 30,
                "availability": 0.99, "health": "healthy",
            }],
        }))
        .unwrap();
        let lines = layout(&table_rows(&docs, Some(Some(&metrics))), false);
        assert_eq!(
            lines,
            vec![
                "DEPLOYMENT   PHASE      STATUS   RESTARTS  ERROR  CPU    MEMORY    HEALTH   REASON",
                "talker       Succeeded  Running  0         -                                -",
                "  main/app              Running  1         -      87.2%  50M/256M  healthy  -",
                "  main/idle             Running  0         -      -      -         -        -",
            ]
        );
        // Before the first metrics document: dashes.
        let lines = layout(&table_rows(&docs, Some(None)), false);
        assert_eq!(
            lines[2],
            "  main/app              Running  1         -      -    -       healthy  -"
        );
        assert_eq!(human_bytes(1536 * 1024 * 1024), "1.5G");
    }

    #[test]
    fn colours_only_on_a_terminal_and_outside_the_padding() {
        let docs = typed(vec![deployment(
            "talker",
            "Succeeded",
            "Error",
            vec![exe("main", "app", "Pending", 0)],
        )]);
        let lines = layout(&table_rows(&docs, None), true);
        assert_eq!(
            lines[1],
            "talker      \x1b[32mSucceeded\x1b[0m  \x1b[31mError\x1b[0m    0         -      -"
        );
        assert_eq!(
            lines[2],
            "  main/app             \x1b[33mPending\x1b[0m  0         -      -"
        );
    }

    #[test]
    fn status_output_has_agent_table_and_ros_master() {
        let status = json!({
            "agent": {"state": "online", "version": "0.1.0", "boot_id": "b1",
                      "docker": "unreachable", "since": "2026-11-28T16:00:00.000Z"},
            "deployments": [],
            "ros_master": {"device_id": "robot-42", "policy": "always", "owner": "talker",
                           "users": ["talker", "listener"], "status": "Running", "reason": null,
                           "error_code": null, "container_id": "abc", "restart_count": 2,
                           "updated_at": "2026-11-28T16:00:00.125Z"},
        });
        let status: StatusAnswer = serde_json::from_value(status).unwrap();
        assert_eq!(
            render_status(&status, false),
            "berth 0.1.0 online since 2026-11-28T16:00:00.000Z, boot b1, docker unreachable\n\
             \n\
             no deployments\n\
             \n\
             ROS master: Running, owner talker, users talker, listener, restarts 2\n"
        );
        let before_first_report: StatusAnswer =
            serde_json::from_value(json!({"agent": null, "deployments": [], "ros_master": null}))
                .unwrap();
        assert_eq!(
            render_status(&before_first_report, false),
            "berth has not reported yet\n\nno deployments\n"
        );
    }

    #[test]
    fn snapshot_keeps_the_latest_retained_documents_and_forwards_all() {
        let inner = Arc::new(MemoryReporter::default());
        let snapshot = Snapshot::new(Arc::clone(&inner));
        snapshot.publish(Topic::Deployment("b".into()), json!({"v": 1}));
        snapshot.publish(Topic::Deployment("a".into()), json!({"v": 2}));
        snapshot.publish(Topic::Deployment("b".into()), json!({"v": 3}));
        snapshot.publish(Topic::Events, json!({"event": "restart"}));
        snapshot.publish(Topic::Agent, json!({"state": "online"}));
        snapshot.publish(Topic::Metrics, json!({"interval_secs": 60}));
        assert_eq!(
            snapshot.status(),
            json!({
                "agent": {"state": "online"},
                "deployments": [{"v": 2}, {"v": 3}],
                "ros_master": null,
                "metrics": {"interval_secs": 60},
            })
        );
        assert_eq!(inner.published.lock().unwrap().len(), 6);
    }

    fn container(deployment: &str, component: &str, executable: &str) -> ContainerInfo {
        ContainerInfo {
            id: format!("{deployment}-{component}-{executable}"),
            labels: [
                (labels::DEPLOYMENT, deployment),
                (labels::COMPONENT, component),
                (labels::EXECUTABLE, executable),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn containers_are_picked_by_executable_name() {
        let all = [
            container("solo", "main", "app"),
            container("pair", "nav", "planner"),
            container("pair", "nav", "mapper"),
            container("twins", "left", "driver"),
            container("twins", "right", "driver"),
        ];
        let pick_id = |d: &str, e: Option<&str>| pick(&all, d, e).map(|c| c.id.clone());
        assert_eq!(pick_id("solo", None).unwrap(), "solo-main-app");
        assert_eq!(pick_id("solo", Some("app")).unwrap(), "solo-main-app");
        assert_eq!(pick_id("pair", Some("mapper")).unwrap(), "pair-nav-mapper");
        assert_eq!(
            pick_id("twins", Some("right/driver")).unwrap(),
            "twins-right-driver"
        );
        let errors = [
            (
                pick_id("pair", None),
                "deployment pair has several executables; name one of nav/mapper, nav/planner",
            ),
            (
                pick_id("pair", Some("x")),
                "deployment pair has no executable x; it has nav/mapper, nav/planner",
            ),
            (
                pick_id("twins", Some("driver")),
                "deployment twins has several executables; name one of left/driver, right/driver",
            ),
            (
                pick_id("gone", None),
                "deployment gone has no container on this device; `berth status` lists the deployments",
            ),
        ];
        for (result, want) in errors {
            assert_eq!(result.unwrap_err().to_string(), want);
        }
    }

    #[tokio::test]
    async fn the_socket_answers_status_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        // A socket file left by a berth that was killed.
        drop(std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap());
        let snapshot = Arc::new(Snapshot::new(Arc::new(MemoryReporter::default())));
        snapshot.publish(
            Topic::Deployment("talker".into()),
            deployment(
                "talker",
                "Succeeded",
                "Running",
                vec![exe("a", "b", "Running", 0)],
            ),
        );
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let path = serve(dir.path(), snapshot, shutdown.clone(), &tracker).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let answer = tokio::task::spawn_blocking(move || query_status(&path))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.deployments[0].status, Status::Running);
        // At least the accept loop is alive.
        assert!(answer.runtime.expect("runtime figures").alive_tasks >= 1);

        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        let path = socket_path(dir.path());
        assert!(!path.exists(), "the socket is removed on shutdown");
        assert!(matches!(
            query_status(&path),
            Err(QueryError::NotRunning { .. })
        ));
    }
}
