//! Agent config (`berth.toml`) and deployment files, in two stages: raw serde
//! structs that mirror the TOML (unknown keys rejected), then validated
//! settings. Every error names the file, line and column.
//!
//! Only the file system is touched here: `berth check-config`, start-up and
//! reload all go through [`load_agent`], [`load_deployments_dir`] and
//! [`check_all`], so they agree on what a valid file is.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, DeserializeOwned, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

mod mqtt_url;

pub use mqtt_url::{BrokerHost, MqttEndpoint, MqttUrlError, MqttUrlProblem, MQTTS_PORT, MQTT_PORT};

use crate::model::{
    Command, ComponentSpec, DeploymentSpec, ExecutableSpec, Limits, Network, Probe, ProbeCheck,
    PullPolicy, RestartPolicy, UpdateSpec, Volume,
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/berth.toml";
pub const DEFAULT_DEPLOYMENTS_DIR: &str = "/etc/berth/deployments.d";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth";
pub const DEFAULT_BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
pub const DEFAULT_TOPIC_PREFIX: &str = "berth";
const DEFAULT_KEEP_ALIVE_SECS: i64 = 30;
const DEFAULT_BACKOFF_INITIAL_MS: i64 = 1000;
const DEFAULT_BACKOFF_MAX_SECS: i64 = 300;
const DEFAULT_BACKOFF_RESET_AFTER_SECS: i64 = 60;
const DEFAULT_ROS_MASTER_IMAGE: &str = "ros:noetic-ros-core";
const DEFAULT_ROS_MASTER_COMMAND: &[&str] = &["roscore"];
const DEFAULT_ROS_MASTER_URI: &str = "http://localhost:11311";
const DEFAULT_DOCKER_TIMEOUT_SECS: i64 = 30;
const DEFAULT_LOG_MAX_SIZE_MB: i64 = 10;
const DEFAULT_LOG_MAX_FILES: i64 = 3;
const DEFAULT_MIN_FREE_MB: i64 = 1024;
const DEFAULT_GC_HIGH_PERCENT: i64 = 85;
const DEFAULT_GC_LOW_PERCENT: i64 = 70;
const DEFAULT_METRICS_INTERVAL_SECS: i64 = 60;
pub const DEFAULT_TRUSTED_KEYS_DIR: &str = "/etc/berth/trusted-keys";
const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];

const DEVICE_ID_RULE: &str = "use 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'";
const ID_RULE: &str = "use 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit";
const NAME_RULE: &str =
    "use 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit";
const DOCKER_HOST_RULE: &str = "use unix:///path/to/docker.sock or tcp://host:port";

/// Validated agent config (SPEC 3).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub device_id: String,
    pub deployments_dir: PathBuf,
    pub state_dir: PathBuf,
    pub boot_id_file: PathBuf,
    pub docker: DockerSettings,
    pub mqtt: MqttSettings,
    pub restart: RestartSettings,
    pub ros: RosSettings,
    pub log: LogSettings,
    pub containers: ContainerSettings,
    pub images: ImageSettings,
    pub metrics: MetricsSettings,
    pub remote: RemoteSettings,
    /// The file it came from.
    pub source: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DockerSettings {
    /// `unix:///path` or `tcp://host:port`.
    pub host: String,
    pub registries: Vec<RegistrySettings>,
    /// How long one engine request may take before the engine counts as
    /// unreachable; for a pull, how long it may go without progress.
    pub timeout: Duration,
}

impl DockerSettings {
    /// The defaults of an empty `[docker]` section.
    pub fn new(host: &str) -> Self {
        DockerSettings {
            host: host.to_string(),
            registries: Vec::new(),
            timeout: Duration::from_secs(DEFAULT_DOCKER_TIMEOUT_SECS as u64),
        }
    }
}

/// `[containers]`: how berth creates containers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerSettings {
    /// The engine's `json-file` log rotation of every container.
    pub log_rotation: crate::runtime::LogRotation,
}

impl Default for ContainerSettings {
    fn default() -> Self {
        ContainerSettings {
            log_rotation: crate::runtime::LogRotation {
                max_size_mb: DEFAULT_LOG_MAX_SIZE_MB as u64,
                max_files: DEFAULT_LOG_MAX_FILES as u32,
            },
        }
    }
}

/// `[images]`: image housekeeping (SPEC 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSettings {
    /// Free space on the engine's data root below which a pull first
    /// collects unused images, in bytes.
    pub min_free_bytes: u64,
    /// Use of the data root (percent) that starts a collection.
    pub gc_high_percent: u8,
    /// Use (percent) at which a collection stops; below `gc_high_percent`.
    pub gc_low_percent: u8,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            min_free_bytes: DEFAULT_MIN_FREE_MB as u64 * 1024 * 1024,
            gc_high_percent: DEFAULT_GC_HIGH_PERCENT as u8,
            gc_low_percent: DEFAULT_GC_LOW_PERCENT as u8,
        }
    }
}

/// `[metrics]`: the retained `metrics` topic (SPEC 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Time between two metrics documents; `None` (`interval_secs = 0`)
    /// turns the topic off.
    pub interval: Option<Duration>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            interval: Some(Duration::from_secs(DEFAULT_METRICS_INTERVAL_SECS as u64)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegistrySettings {
    pub server: String,
    pub username: String,
    /// Read when a pull needs it; the secret itself is never kept in config.
    pub password_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MqttSettings {
    /// The broker, from `url`.
    pub endpoint: MqttEndpoint,
    pub client_id: String,
    pub topic_prefix: String,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub keep_alive: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartSettings {
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub backoff_reset_after: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RosSettings {
    pub master_image: String,
    pub master_command: Vec<String>,
    pub master_uri: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub level: String,
    pub json: bool,
}

/// `[remote]`: signed commands over MQTT (SPEC 10), off unless enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteSettings {
    pub enabled: bool,
    /// `<key_id>.pem` files: the ed25519 public keys allowed to sign commands.
    pub trusted_keys_dir: PathBuf,
    /// Absolute, normalized host paths a remotely applied deployment may
    /// mount (the path itself or anything below it).
    pub allowed_host_paths: Vec<PathBuf>,
    /// Whether a remotely applied deployment may map host devices.
    pub allow_devices: bool,
}

impl Default for RemoteSettings {
    fn default() -> Self {
        RemoteSettings {
            enabled: false,
            trusted_keys_dir: PathBuf::from(DEFAULT_TRUSTED_KEYS_DIR),
            allowed_host_paths: Vec::new(),
            allow_devices: false,
        }
    }
}

/// Deployment files of a directory, loaded one by one so that a broken file
/// affects its deployment alone.
pub type Deployments = BTreeMap<String, DeploymentSpec>;

/// One problem in one file: at a 1-based line and column when it has a
/// place in the text, else about the file as a whole (its type, size, owner
/// or permissions, or that it cannot be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// `(line, column)`, both from 1.
    pub at: Option<(usize, usize)>,
    pub message: String,
}

/// `file:line:col: message`, or `file: message` without a place.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((line, col)) => {
                write!(f, "{}:{line}:{col}: {}", self.file.display(), self.message)
            }
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            at: None,
            message: one_line(message.into()),
        }
    }
}

/// A message quotes values from the file, which may hold newlines and other
/// control characters: escaped, so that each error stays one line and no
/// value can pass for another error (or a log line) of its own.
fn one_line(message: String) -> String {
    if !message.chars().any(char::is_control) {
        return message;
    }
    message
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// The largest deployment file berth reads (SPEC 8).
pub const MAX_DEPLOYMENT_FILE_BYTES: u64 = 1024 * 1024;

/// Why a deployment file was not read (SPEC 8): berth reads only regular
/// files (a symlink to one is followed) of at most 1 MiB, owned by root or
/// by berth's own user and not writable by group or others, because whoever
/// can write a deployment can mount any host path: root on the device.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open file: {}", io_message(.0))]
    Open(#[source] io::Error),
    #[error("not a regular file but {kind}; only regular files (or symlinks to one) are read")]
    NotRegular { kind: &'static str },
    #[error("file is larger than 1 MiB ({size} bytes)")]
    TooLarge { size: u64 },
    #[error(
        "file is owned by uid {owner}, not by root or berth's user (uid {euid}): \
         whoever can write a deployment is root on the device"
    )]
    Owner { owner: u32, euid: u32 },
    #[error(
        "file is a symlink made by uid {owner}, not by root or berth's user (uid {euid}): \
         whoever can write a deployment is root on the device"
    )]
    LinkOwner { owner: u32, euid: u32 },
    #[error("file is writable by {who} (mode {mode:04o}): run chmod go-w on it")]
    Writable { who: &'static str, mode: u32 },
    #[error("cannot read file: {}", io_message(.0))]
    Read(#[source] io::Error),
    #[error("file is not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
}

impl FileError {
    /// The file was removed between the listing and the read: there is
    /// nothing to apply, it is not an invalid deployment.
    pub fn is_gone(&self) -> bool {
        matches!(self, FileError::Open(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// Reads one deployment file safely: it is opened without blocking (a FIFO
/// never waits for a writer), its type, owner, mode and size are taken from
/// the opened descriptor (no race with a rename), and at most 1 MiB + 1 bytes
/// are read, so a file that grows meanwhile is still bounded.
pub fn read_deployment_file(path: &Path) -> Result<String, FileError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

    let euid = nix::unistd::geteuid().as_raw();
    // A symlink chooses what berth reads: whoever made it must be trusted
    // as much as the file's owner. (Its own mode means nothing.)
    if let Ok(link) = fs::symlink_metadata(path) {
        if link.file_type().is_symlink() {
            check_link_owner(link.uid(), euid)?;
        }
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits())
        .open(path)
        .map_err(FileError::Open)?;
    let meta = file.metadata().map_err(FileError::Read)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(FileError::NotRegular { kind });
    }
    check_owner_and_mode(meta.uid(), meta.mode(), euid)?;
    if meta.len() > MAX_DEPLOYMENT_FILE_BYTES {
        return Err(FileError::TooLarge { size: meta.len() });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_DEPLOYMENT_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(FileError::Read)?;
    if bytes.len() as u64 > MAX_DEPLOYMENT_FILE_BYTES {
        return Err(FileError::TooLarge {
            size: bytes.len() as u64,
        });
    }
    String::from_utf8(bytes).map_err(|e| FileError::NotUtf8 {
        offset: e.utf8_error().valid_up_to(),
    })
}

/// Who may make a symlink in `deployments_dir`: root or berth's own user.
fn check_link_owner(owner: u32, euid: u32) -> Result<(), FileError> {
    if owner != 0 && owner != euid {
        return Err(FileError::LinkOwner { owner, euid });
    }
    Ok(())
}

/// Who may write a deployment file: its owner, root or berth's own user
/// (`euid`), and nobody else.
fn check_owner_and_mode(owner: u32, mode: u32, euid: u32) -> Result<(), FileError> {
    if owner != 0 && owner != euid {
        return Err(FileError::Owner { owner, euid });
    }
    let mode = mode & 0o7777;
    if mode & 0o022 != 0 {
        let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
            (true, true) => "group and others",
            (true, false) => "its group",
            _ => "others",
        };
        return Err(FileError::Writable { who, mode });
    }
    Ok(())
}

/// The `id` a deployment file claims, when it can be read safely and parses
/// as TOML: an invalid file is reported under it. `None` otherwise (the
/// file's stem is then used).
pub fn deployment_id_of(path: &Path) -> Option<String> {
    let text = read_deployment_file(path).ok()?;
    if too_deep(&text).is_some() {
        return None;
    }
    let table = text.parse::<toml::Table>().ok()?;
    table.get("id")?.as_str().map(str::to_string)
}

/// Reads and validates the agent config. Relative paths in it are resolved
/// against the directory of `path`.
pub fn load_agent(path: &Path) -> Result<AgentConfig, Vec<ConfigError>> {
    load_agent_inner(path).1
}

/// Reads and validates one deployment file.
pub fn load_deployment(path: &Path) -> Result<DeploymentSpec, Vec<ConfigError>> {
    load_deployment_located(path).map(|located| located.spec)
}

/// Validates the text of an agent config as if read from `path` (relative
/// paths resolve against its directory). Touches no file.
pub fn parse_agent(path: &Path, text: &str) -> Result<AgentConfig, Vec<ConfigError>> {
    parse_agent_inner(path, text).1
}

/// Validates the text of a deployment file as if read from `path`. Touches
/// no file.
pub fn parse_deployment(path: &Path, text: &str) -> Result<DeploymentSpec, Vec<ConfigError>> {
    parse_deployment_located(path, text).map(|located| located.spec)
}

/// Loads every `*.toml` file of `dir` (not recursive, sorted by name, hidden
/// files skipped). Good files are keyed by id; each bad one comes back with
/// its errors. A directory that cannot be read is one entry naming the
/// directory; a duplicate id is an error on the later file.
pub fn load_deployments_dir(dir: &Path) -> (Deployments, Vec<(PathBuf, Vec<ConfigError>)>) {
    let (located, errors) = load_dir_located(dir);
    let good = located
        .into_iter()
        .map(|(id, located)| (id, located.spec))
        .collect();
    (good, errors)
}

/// Validates the text of a deployment file that is about to be written as
/// `path` in `dir` (a remote `apply`), as `berth check-config` would once it
/// is there: the file's own checks, then its id against the other files of
/// `dir` (a duplicate), then its dependencies (unknown ids, cycles through
/// it). The file that `path` names now, if any, is the one being replaced
/// and does not count. Nothing is written.
pub fn check_deployment_text(
    path: &Path,
    text: &str,
    dir: &Path,
) -> Result<DeploymentSpec, Vec<ConfigError>> {
    let located = parse_deployment_located(path, text)?;
    let (mut others, _) = load_dir_located(dir);
    others.retain(|_, l| l.spec.source != path);
    let id = located.spec.id.clone();
    if let Some(first) = others.get(&id) {
        return Err(vec![located.id_pos.error(
            path,
            format!(
                "duplicate deployment id \"{id}\": already used by {}",
                first.spec.source.display()
            ),
        )]);
    }
    let mut specs: Deployments = others.into_iter().map(|(id, l)| (id, l.spec)).collect();
    specs.insert(id.clone(), located.spec.clone());
    let mut errors = Vec::new();
    for problem in dependency_problems(&specs) {
        let index = match &problem {
            DependencyProblem::Unknown {
                deployment, index, ..
            } if *deployment == id => *index,
            DependencyProblem::Cycle(ids) if ids.contains(&id) => {
                let at = ids.iter().position(|d| *d == id).unwrap_or(0);
                let next = &ids[(at + 1).min(ids.len() - 1)];
                located
                    .spec
                    .depends_on
                    .iter()
                    .position(|d| d == next)
                    .unwrap_or(0)
            }
            _ => continue,
        };
        let pos = located
            .depends_on_pos
            .get(index)
            .copied()
            .unwrap_or(located.id_pos);
        errors.push(pos.error(path, problem.to_string()));
    }
    if errors.is_empty() {
        Ok(located.spec)
    } else {
        Err(errors)
    }
}

/// Everything `berth check-config` reports: the agent config, every
/// deployment file of its `deployments_dir`, and the dependencies between
/// deployments (unknown ids, cycles).
pub fn check_all(agent_path: &Path) -> Vec<ConfigError> {
    let (deployments_dir, agent) = load_agent_inner(agent_path);
    let mut errors = agent.err().unwrap_or_default();
    let Some(dir) = deployments_dir else {
        return errors;
    };
    let (located, bad) = load_dir_located(&dir);
    errors.extend(bad.into_iter().flat_map(|(_, errs)| errs));

    let specs: Deployments = located
        .iter()
        .map(|(id, l)| (id.clone(), l.spec.clone()))
        .collect();
    for problem in dependency_problems(&specs) {
        let (id, index) = match &problem {
            DependencyProblem::Unknown {
                deployment, index, ..
            } => (deployment, *index),
            DependencyProblem::Cycle(ids) => {
                let next = &ids[1];
                let spec = &specs[&ids[0]];
                let index = spec.depends_on.iter().position(|d| d == next).unwrap_or(0);
                (&ids[0], index)
            }
        };
        let l = &located[id];
        let pos = l.depends_on_pos.get(index).copied().unwrap_or(l.id_pos);
        errors.push(pos.error(&l.spec.source, problem.to_string()));
    }
    errors
}

/// Why a set of deployments cannot all start (SPEC 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DependencyProblem {
    /// `deployment`'s `depends_on[index]` names an id that is not deployed.
    Unknown {
        deployment: String,
        index: usize,
        dependency: String,
    },
    /// Deployments that wait for each other; the first id is repeated last.
    Cycle(Vec<String>),
}

impl DependencyProblem {
    /// The deployments that cannot start because of this problem.
    pub fn deployments(&self) -> &[String] {
        match self {
            DependencyProblem::Unknown { deployment, .. } => std::slice::from_ref(deployment),
            DependencyProblem::Cycle(ids) => &ids[..ids.len().saturating_sub(1)],
        }
    }
}

impl fmt::Display for DependencyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DependencyProblem::Unknown { dependency, .. } => {
                write!(f, "depends on unknown deployment \"{dependency}\"")
            }
            DependencyProblem::Cycle(ids) => write!(f, "dependency cycle: {}", ids.join(" -> ")),
        }
    }
}

/// Unknown dependencies among `deployments`, then the cycles a depth-first
/// walk in id order meets, each once. A deployment that is on no cycle but
/// waits for one is not listed: it waits for a dependency that cannot start.
pub fn dependency_problems(deployments: &Deployments) -> Vec<DependencyProblem> {
    let mut problems = Vec::new();
    for (id, spec) in deployments {
        for (index, dep) in spec.depends_on.iter().enumerate() {
            if !deployments.contains_key(dep) {
                problems.push(DependencyProblem::Unknown {
                    deployment: id.clone(),
                    index,
                    dependency: dep.clone(),
                });
            }
        }
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit<'a>(
        id: &'a str,
        deployments: &'a Deployments,
        marks: &mut HashMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
        problems: &mut Vec<DependencyProblem>,
    ) {
        marks.insert(id, Mark::OnPath);
        path.push(id);
        for dep in &deployments[id].depends_on {
            match marks.get(dep.as_str()).copied() {
                Some(Mark::New) => visit(dep, deployments, marks, path, problems),
                Some(Mark::OnPath) => {
                    let start = path.iter().position(|p| p == dep).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        path[start..].iter().map(|s| s.to_string()).collect();
                    cycle.push(dep.clone());
                    problems.push(DependencyProblem::Cycle(cycle));
                }
                // Done, or unknown (reported above).
                _ => {}
            }
        }
        path.pop();
        marks.insert(id, Mark::Done);
    }

    let mut marks: HashMap<&str, Mark> = deployments
        .keys()
        .map(|id| (id.as_str(), Mark::New))
        .collect();
    for id in deployments.keys() {
        if marks[id.as_str()] == Mark::New {
            visit(id, deployments, &mut marks, &mut Vec::new(), &mut problems);
        }
    }
    problems
}

// ---------------------------------------------------------------------------
// Positions and errors

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    col: usize,
}

impl Pos {
    fn error(self, file: &Path, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            at: Some((self.line, self.col)),
            message: one_line(message.into()),
        }
    }
}

/// A file's name and text, to turn byte offsets into lines and columns.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        let before = &self.text.as_bytes()[..offset];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let col = self
            .text
            .get(line_start..offset)
            .map_or(offset - line_start, |s| s.chars().count())
            + 1;
        Pos { line, col }
    }

    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        self.pos(span.start).error(self.file, message)
    }

    fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        if let Some(offset) = too_deep(self.text) {
            return Err(self.error(
                offset..offset,
                format!("arrays and inline tables nested more than {MAX_NESTING} levels deep"),
            ));
        }
        toml::from_str(self.text).map_err(|e| {
            // toml's messages may span lines; ours are one line each.
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            let mut message = message.trim_end_matches('.').to_string();
            let span = e.span().unwrap_or(0..0);
            if message.is_empty() {
                // toml says nothing about some bad characters (a NUL in a
                // comment, say): name the character.
                message = match self.text.get(span.start..).and_then(|s| s.chars().next()) {
                    Some(c) if c.is_control() => format!(
                        "control character U+{:04X} is not allowed in TOML",
                        u32::from(c)
                    ),
                    _ => "invalid TOML".to_string(),
                };
            }
            self.error(span, message)
        })
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    fs::read_to_string(path)
        .map_err(|e| ConfigError::whole_file(path, format!("cannot read file: {}", io_message(&e))))
}

/// The OS's message, lowercased like ours.
fn io_message(e: &io::Error) -> String {
    let s = e.to_string();
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => s,
    }
}

/// The deepest nesting of arrays and inline tables a file may have: a real
/// deployment needs 3 (`volumes = [{ ... }]` in an executable). The `toml`
/// parser recurses once per level and stops only at 80, which in a debug
/// build takes more than 1 MiB of stack; 16 levels take a few hundred KiB.
pub const MAX_NESTING: usize = 16;

/// The byte offset of the first bracket that opens level `MAX_NESTING + 1`,
/// if any. A cheap scan before parsing that skips comments and all four
/// kinds of strings, so that brackets inside them do not count. Malformed
/// text is left to the parser.
fn too_deep(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            quote @ (b'"' | b'\'') => {
                let basic = quote == b'"';
                let multi = bytes[i..].starts_with(if basic { b"\"\"\"" } else { b"'''" });
                i += if multi { 3 } else { 1 };
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' if basic => i += 1,
                        b'\n' if !multi => break,
                        b if b == quote => {
                            if !multi {
                                break;
                            }
                            if bytes[i..].starts_with(if basic { b"\"\"\"" } else { b"'''" }) {
                                // A closing delimiter may have up to two more
                                // quotes before it, inside the string.
                                while bytes.get(i + 3) == Some(&quote) {
                                    i += 1;
                                }
                                i += 2;
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Collects the validation errors of one file.
struct Checker<'a> {
    src: &'a Source<'a>,
    errors: Vec<ConfigError>,
}

impl<'a> Checker<'a> {
    fn new(src: &'a Source<'a>) -> Self {
        Checker {
            src,
            errors: Vec::new(),
        }
    }

    fn at<T>(&mut self, value: &Spanned<T>, message: impl Into<String>) {
        self.at_span(value.span(), message);
    }

    fn at_span(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.errors.push(self.src.error(span, message));
    }

    fn non_empty(&mut self, value: &Spanned<String>, key: &str) -> String {
        if value.get_ref().trim().is_empty() {
            self.at(value, format!("{key} must not be empty"));
        }
        value.get_ref().clone()
    }

    fn path(&mut self, base: &Path, value: &Spanned<String>, key: &str) -> PathBuf {
        let s = self.non_empty(value, key);
        resolve(base, &s)
    }

    fn path_or(
        &mut self,
        base: &Path,
        value: Option<&Spanned<String>>,
        key: &str,
        default: &str,
    ) -> PathBuf {
        match value {
            Some(v) => self.path(base, v, key),
            None => PathBuf::from(default),
        }
    }

    fn positive(&mut self, value: Option<&Spanned<i64>>, key: &str, default: i64) -> u64 {
        match value {
            Some(v) if *v.get_ref() <= 0 => {
                self.at(v, format!("{key} must be greater than 0"));
                default as u64
            }
            Some(v) => *v.get_ref() as u64,
            None => default as u64,
        }
    }

    fn env(
        &mut self,
        map: BTreeMap<Spanned<String>, String>,
        key: &str,
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (name, value) in map {
            if name.get_ref().is_empty() {
                self.at(&name, format!("{key}: a variable name must not be empty"));
            } else if name.get_ref().contains('=') {
                self.at(
                    &name,
                    format!(
                        "{key}: variable name \"{}\" must not contain '='",
                        name.get_ref()
                    ),
                );
            }
            out.insert(name.into_inner(), value);
        }
        out
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<ConfigError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }
}

/// The directory relative paths of `config` are resolved against.
fn base_dir(config: &Path) -> PathBuf {
    let absolute = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    absolute
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn resolve(base: &Path, value: &str) -> PathBuf {
    let path = Path::new(value);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

// ---------------------------------------------------------------------------
// Agent config

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    device_id: Spanned<String>,
    deployments_dir: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    boot_id_file: Option<Spanned<String>>,
    #[serde(default)]
    docker: RawDocker,
    #[serde(default)]
    mqtt: RawMqtt,
    #[serde(default)]
    restart: RawRestart,
    #[serde(default)]
    ros: RawRos,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    containers: RawContainers,
    #[serde(default)]
    images: RawImages,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    remote: RawRemote,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    host: Option<Spanned<String>>,
    #[serde(default)]
    registries: Vec<RawRegistry>,
    timeout_secs: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawContainers {
    log_max_size_mb: Option<Spanned<i64>>,
    log_max_files: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawImages {
    min_free_mb: Option<Spanned<i64>>,
    gc_high_percent: Option<Spanned<i64>>,
    gc_low_percent: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    interval_secs: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    server: Spanned<String>,
    username: Spanned<String>,
    password_file: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    url: Option<Spanned<String>>,
    client_id: Option<Spanned<String>>,
    topic_prefix: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    keep_alive_secs: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRestart {
    backoff_initial_ms: Option<Spanned<i64>>,
    backoff_max_secs: Option<Spanned<i64>>,
    backoff_reset_after_secs: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRos {
    master_image: Option<Spanned<String>>,
    master_command: Option<Spanned<Vec<String>>>,
    master_uri: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    enabled: Option<bool>,
    trusted_keys_dir: Option<Spanned<String>>,
    allowed_host_paths: Option<Vec<Spanned<String>>>,
    allow_devices: Option<bool>,
}

/// Also returns the deployments directory whenever the file parsed, so that
/// `check_all` can check the deployments even when another key is wrong.
fn load_agent_inner(path: &Path) -> (Option<PathBuf>, Result<AgentConfig, Vec<ConfigError>>) {
    match read(path) {
        Ok(text) => parse_agent_inner(path, &text),
        Err(e) => (None, Err(vec![e])),
    }
}

fn parse_agent_inner(
    path: &Path,
    text: &str,
) -> (Option<PathBuf>, Result<AgentConfig, Vec<ConfigError>>) {
    let src = Source { file: path, text };
    let raw: RawAgent = match src.parse() {
        Ok(raw) => raw,
        Err(e) => return (None, Err(vec![e])),
    };
    let base = base_dir(path);
    let mut c = Checker::new(&src);

    let device_id = raw.device_id.get_ref().clone();
    if !is_device_id(&device_id) {
        c.at(
            &raw.device_id,
            format!("invalid device_id \"{device_id}\": {DEVICE_ID_RULE}"),
        );
    }
    let deployments_dir = c.path_or(
        &base,
        raw.deployments_dir.as_ref(),
        "deployments_dir",
        DEFAULT_DEPLOYMENTS_DIR,
    );
    let state_dir = c.path_or(
        &base,
        raw.state_dir.as_ref(),
        "state_dir",
        DEFAULT_STATE_DIR,
    );
    let boot_id_file = c.path_or(
        &base,
        raw.boot_id_file.as_ref(),
        "boot_id_file",
        DEFAULT_BOOT_ID_FILE,
    );

    let docker = check_docker(&mut c, &base, raw.docker);
    let mqtt = check_mqtt(&mut c, &base, raw.mqtt, &device_id);
    let restart = check_restart(&mut c, &raw.restart);
    let ros = check_ros(&mut c, raw.ros);
    let log = check_log(&mut c, raw.log);
    let containers = check_containers(&mut c, &raw.containers);
    let images = check_images(&mut c, &raw.images);
    let metrics = check_metrics(&mut c, &raw.metrics);
    let remote = check_remote(&mut c, &base, raw.remote);

    let config = AgentConfig {
        device_id,
        deployments_dir: deployments_dir.clone(),
        state_dir,
        boot_id_file,
        docker,
        mqtt,
        restart,
        ros,
        log,
        containers,
        images,
        metrics,
        remote,
        source: path.to_path_buf(),
    };
    (Some(deployments_dir), c.finish(config))
}

fn is_device_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn check_docker(c: &mut Checker, base: &Path, raw: RawDocker) -> DockerSettings {
    let host = match &raw.host {
        Some(h) => {
            let s = h.get_ref();
            let ok = match s.split_once("://") {
                Some(("unix", path)) => path.starts_with('/'),
                Some(("tcp" | "http", addr)) => !addr.is_empty(),
                _ => false,
            };
            if !ok {
                c.at(
                    h,
                    format!("invalid docker host \"{s}\": {DOCKER_HOST_RULE}"),
                );
            }
            s.clone()
        }
        None => DEFAULT_DOCKER_HOST.to_string(),
    };
    let registries = raw
        .registries
        .into_iter()
        .map(|r| RegistrySettings {
            server: c.non_empty(&r.server, "server"),
            username: c.non_empty(&r.username, "username"),
            password_file: c.path(base, &r.password_file, "password_file"),
        })
        .collect();
    let timeout_secs = c.positive(
        raw.timeout_secs.as_ref(),
        "timeout_secs",
        DEFAULT_DOCKER_TIMEOUT_SECS,
    );
    DockerSettings {
        host,
        registries,
        timeout: Duration::from_secs(timeout_secs),
    }
}

/// An integer in `range`, or the default after an error naming the range.
fn in_range(
    c: &mut Checker,
    value: Option<&Spanned<i64>>,
    key: &str,
    range: std::ops::RangeInclusive<i64>,
    default: i64,
) -> i64 {
    match value {
        Some(v) if !range.contains(v.get_ref()) => {
            let message = if *range.end() == i64::MAX {
                format!("{key} must be at least {}", range.start())
            } else {
                format!(
                    "{key} must be between {} and {}",
                    range.start(),
                    range.end()
                )
            };
            c.at(v, message);
            default
        }
        Some(v) => *v.get_ref(),
        None => default,
    }
}

fn check_containers(c: &mut Checker, raw: &RawContainers) -> ContainerSettings {
    // The engine takes sizes in whole units; 1 MB to 1 TB is every sane one.
    let max_size_mb = in_range(
        c,
        raw.log_max_size_mb.as_ref(),
        "log_max_size_mb",
        1..=1_000_000,
        DEFAULT_LOG_MAX_SIZE_MB,
    );
    let max_files = in_range(
        c,
        raw.log_max_files.as_ref(),
        "log_max_files",
        1..=1000,
        DEFAULT_LOG_MAX_FILES,
    );
    ContainerSettings {
        log_rotation: crate::runtime::LogRotation {
            max_size_mb: max_size_mb as u64,
            max_files: max_files as u32,
        },
    }
}

fn check_images(c: &mut Checker, raw: &RawImages) -> ImageSettings {
    let min_free_mb = in_range(
        c,
        raw.min_free_mb.as_ref(),
        "min_free_mb",
        0..=i64::MAX,
        DEFAULT_MIN_FREE_MB,
    );
    let high = in_range(
        c,
        raw.gc_high_percent.as_ref(),
        "gc_high_percent",
        1..=100,
        DEFAULT_GC_HIGH_PERCENT,
    );
    let low = in_range(
        c,
        raw.gc_low_percent.as_ref(),
        "gc_low_percent",
        0..=99,
        DEFAULT_GC_LOW_PERCENT,
    );
    if low >= high {
        let span = raw
            .gc_low_percent
            .as_ref()
            .or(raw.gc_high_percent.as_ref())
            .map_or(0..0, Spanned::span);
        c.at_span(
            span,
            format!(
                "gc_low_percent ({low}) must be less than gc_high_percent ({high}): \
                 a collection stops below where it starts"
            ),
        );
    }
    ImageSettings {
        min_free_bytes: (min_free_mb as u64).saturating_mul(1024 * 1024),
        gc_high_percent: high as u8,
        gc_low_percent: low as u8,
    }
}

fn check_metrics(c: &mut Checker, raw: &RawMetrics) -> MetricsSettings {
    let secs = in_range(
        c,
        raw.interval_secs.as_ref(),
        "interval_secs",
        0..=i64::MAX,
        DEFAULT_METRICS_INTERVAL_SECS,
    );
    MetricsSettings {
        interval: (secs > 0).then(|| Duration::from_secs(secs as u64)),
    }
}

fn check_mqtt(c: &mut Checker, base: &Path, raw: RawMqtt, device_id: &str) -> MqttSettings {
    let endpoint = match &raw.url {
        Some(u) => u.get_ref().parse().unwrap_or_else(|e: MqttUrlError| {
            c.at(u, e.to_string());
            MqttEndpoint::default()
        }),
        None => MqttEndpoint::default(),
    };
    let client_id = match &raw.client_id {
        Some(id) => c.non_empty(id, "client_id"),
        None => format!("berth-{device_id}"),
    };
    let topic_prefix = match &raw.topic_prefix {
        Some(p) => {
            let s = p.get_ref();
            if s.is_empty() {
                c.at(p, "topic_prefix must not be empty");
            } else if s.contains(['#', '+']) {
                c.at(
                    p,
                    format!("topic_prefix \"{s}\" must not contain the wildcards '#' or '+'"),
                );
            } else if s.starts_with('/') || s.ends_with('/') {
                c.at(
                    p,
                    format!("topic_prefix \"{s}\" must not start or end with '/'"),
                );
            }
            s.clone()
        }
        None => DEFAULT_TOPIC_PREFIX.to_string(),
    };
    let username = raw.username.as_ref().map(|u| c.non_empty(u, "username"));
    if let (Some(p), None) = (&raw.password_file, &raw.username) {
        c.at(p, "password_file needs a username");
    }
    match (&raw.cert_file, &raw.key_file) {
        (Some(cert), None) => c.at(
            cert,
            "cert_file needs key_file (mutual tls uses both or neither)",
        ),
        (None, Some(key)) => c.at(
            key,
            "key_file needs cert_file (mutual tls uses both or neither)",
        ),
        _ => {}
    }
    let mut path =
        |v: &Option<Spanned<String>>, key: &str| v.as_ref().map(|v| c.path(base, v, key));
    let password_file = path(&raw.password_file, "password_file");
    let ca_file = path(&raw.ca_file, "ca_file");
    let cert_file = path(&raw.cert_file, "cert_file");
    let key_file = path(&raw.key_file, "key_file");
    let keep_alive_secs = match &raw.keep_alive_secs {
        // MQTT carries it as 16 bits; 0 would turn it off, and with it the
        // broker's detection of a vanished device (the last will).
        Some(k) if !(1..=65535).contains(k.get_ref()) => {
            c.at(k, "keep_alive_secs must be between 1 and 65535");
            DEFAULT_KEEP_ALIVE_SECS as u64
        }
        Some(k) => *k.get_ref() as u64,
        None => DEFAULT_KEEP_ALIVE_SECS as u64,
    };
    MqttSettings {
        endpoint,
        client_id,
        topic_prefix,
        username,
        password_file,
        ca_file,
        cert_file,
        key_file,
        keep_alive: Duration::from_secs(keep_alive_secs),
    }
}

fn check_restart(c: &mut Checker, raw: &RawRestart) -> RestartSettings {
    let initial_ms = c.positive(
        raw.backoff_initial_ms.as_ref(),
        "backoff_initial_ms",
        DEFAULT_BACKOFF_INITIAL_MS,
    );
    let max_secs = c.positive(
        raw.backoff_max_secs.as_ref(),
        "backoff_max_secs",
        DEFAULT_BACKOFF_MAX_SECS,
    );
    let reset_secs = c.positive(
        raw.backoff_reset_after_secs.as_ref(),
        "backoff_reset_after_secs",
        DEFAULT_BACKOFF_RESET_AFTER_SECS,
    );
    if max_secs.saturating_mul(1000) < initial_ms {
        let span = raw
            .backoff_max_secs
            .as_ref()
            .or(raw.backoff_initial_ms.as_ref())
            .map_or(0..0, Spanned::span);
        c.at_span(
            span,
            format!(
                "backoff_max_secs ({max_secs} s) must not be less than \
                 backoff_initial_ms ({initial_ms} ms)"
            ),
        );
    }
    RestartSettings {
        backoff_initial: Duration::from_millis(initial_ms),
        backoff_max: Duration::from_secs(max_secs),
        backoff_reset_after: Duration::from_secs(reset_secs),
    }
}

fn check_ros(c: &mut Checker, raw: RawRos) -> RosSettings {
    let master_image = match &raw.master_image {
        Some(image) => c.non_empty(image, "master_image"),
        None => DEFAULT_ROS_MASTER_IMAGE.to_string(),
    };
    let master_command = match raw.master_command {
        Some(cmd) => {
            if cmd.get_ref().is_empty() {
                c.at(&cmd, "master_command must not be empty");
            }
            cmd.into_inner()
        }
        None => DEFAULT_ROS_MASTER_COMMAND
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let master_uri = match &raw.master_uri {
        Some(uri) => {
            if !uri.get_ref().starts_with("http://") || uri.get_ref().len() == "http://".len() {
                c.at(
                    uri,
                    format!(
                        "invalid master_uri \"{}\": use http://host:port",
                        uri.get_ref()
                    ),
                );
            }
            uri.get_ref().clone()
        }
        None => DEFAULT_ROS_MASTER_URI.to_string(),
    };
    RosSettings {
        master_image,
        master_command,
        master_uri,
    }
}

fn check_log(c: &mut Checker, raw: RawLog) -> LogSettings {
    let level = match &raw.level {
        Some(level) => {
            if !LOG_LEVELS.contains(&level.get_ref().as_str()) {
                c.at(
                    level,
                    format!(
                        "invalid log level \"{}\": use one of {}",
                        level.get_ref(),
                        LOG_LEVELS.join(", ")
                    ),
                );
            }
            level.get_ref().clone()
        }
        None => "info".to_string(),
    };
    let json = match &raw.format {
        Some(format) => match format.get_ref().as_str() {
            "text" => false,
            "json" => true,
            other => {
                c.at(
                    format,
                    format!("invalid log format \"{other}\": use text or json"),
                );
                false
            }
        },
        None => false,
    };
    LogSettings { level, json }
}

fn check_remote(c: &mut Checker, base: &Path, raw: RawRemote) -> RemoteSettings {
    let trusted_keys_dir = c.path_or(
        base,
        raw.trusted_keys_dir.as_ref(),
        "trusted_keys_dir",
        DEFAULT_TRUSTED_KEYS_DIR,
    );
    let mut allowed_host_paths = Vec::new();
    for path in raw.allowed_host_paths.unwrap_or_default() {
        match normalize_host_path(path.get_ref()) {
            Some(normalized) => allowed_host_paths.push(normalized),
            None => c.at(
                &path,
                format!(
                    "allowed_host_paths: \"{}\" must be an absolute path without '..'",
                    path.get_ref()
                ),
            ),
        }
    }
    RemoteSettings {
        enabled: raw.enabled.unwrap_or(false),
        trusted_keys_dir,
        allowed_host_paths,
        allow_devices: raw.allow_devices.unwrap_or(false),
    }
}

/// An absolute path with `.` and repeated `/` removed; `None` for a relative
/// path or one with `..` (which could climb out of an allowed directory).
pub fn normalize_host_path(path: &str) -> Option<PathBuf> {
    use std::path::Component;
    let path = Path::new(path);
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for part in path.components() {
        match part {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => out.push(name),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Deployment files

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeployment {
    id: Spanned<String>,
    package: Spanned<String>,
    package_version: Spanned<String>,
    #[serde(default)]
    restart: RestartPolicy,
    #[serde(default)]
    depends_on: Vec<Spanned<String>>,
    #[serde(default)]
    ros: bool,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    exports: BTreeMap<Spanned<String>, String>,
    components: Option<Spanned<Vec<RawComponent>>>,
    update: Option<RawUpdate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpdate {
    min_ready_secs: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    name: Spanned<String>,
    #[serde(default)]
    network: Network,
    executables: Option<Spanned<Vec<RawExecutable>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExecutable {
    name: Spanned<String>,
    image: Spanned<String>,
    #[serde(default)]
    pull: PullPolicy,
    command: Option<Spanned<RawCommand>>,
    run_as_bash: Option<Spanned<bool>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    volumes: Vec<RawVolume>,
    #[serde(default)]
    devices: Vec<Spanned<String>>,
    probe: Option<Spanned<RawProbe>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    exec: Option<Spanned<Vec<String>>>,
    tcp: Option<Spanned<i64>>,
    http: Option<Spanned<String>>,
    initial_delay_secs: Option<Spanned<i64>>,
    period_secs: Option<Spanned<i64>>,
    timeout_secs: Option<Spanned<i64>>,
    failure_threshold: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    cpus: Option<Spanned<f64>>,
    memory_mb: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    host: Spanned<String>,
    container: Spanned<String>,
    #[serde(default)]
    read_only: bool,
}

/// `command` before `run_as_bash` is known: an array or a string.
enum RawCommand {
    Exec(Vec<String>),
    Line(String),
}

impl<'de> Deserialize<'de> for RawCommand {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CommandVisitor;
        impl<'de> Visitor<'de> for CommandVisitor {
            type Value = RawCommand;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of strings, or a string with run_as_bash = true")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawCommand, E> {
                Ok(RawCommand::Line(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawCommand, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<String>()? {
                    argv.push(arg);
                }
                Ok(RawCommand::Exec(argv))
            }
        }
        deserializer.deserialize_any(CommandVisitor)
    }
}

/// Files that did not load, each with its errors.
type BadFiles = Vec<(PathBuf, Vec<ConfigError>)>;

/// A deployment with the positions that cross-file checks point at.
struct Located {
    spec: DeploymentSpec,
    id_pos: Pos,
    depends_on_pos: Vec<Pos>,
}

fn load_deployment_located(path: &Path) -> Result<Located, Vec<ConfigError>> {
    let text = read_deployment_file(path)
        .map_err(|e| vec![ConfigError::whole_file(path, e.to_string())])?;
    parse_deployment_located(path, &text)
}

fn parse_deployment_located(path: &Path, text: &str) -> Result<Located, Vec<ConfigError>> {
    let src = Source { file: path, text };
    let raw: RawDeployment = src.parse().map_err(|e| vec![e])?;
    let mut c = Checker::new(&src);

    let id = raw.id.get_ref().clone();
    if !is_deployment_id(&id) {
        c.at(
            &raw.id,
            format!("invalid deployment id \"{id}\": {ID_RULE}"),
        );
    }
    let package = c.non_empty(&raw.package, "package");
    let package_version = c.non_empty(&raw.package_version, "package_version");
    for dep in &raw.depends_on {
        if *dep.get_ref() == id {
            c.at(
                dep,
                format!("deployment \"{id}\" must not depend on itself"),
            );
        }
    }
    let env = c.env(raw.env, "env");
    let exports = c.env(raw.exports, "exports");
    let update = match &raw.update {
        Some(u) => UpdateSpec {
            min_ready_secs: in_range(
                &mut c,
                u.min_ready_secs.as_ref(),
                "min_ready_secs",
                0..=i64::MAX,
                UpdateSpec::DEFAULT_MIN_READY_SECS as i64,
            ) as u64,
        },
        None => UpdateSpec::default(),
    };

    let mut components = Vec::new();
    match raw.components {
        None => c.at_span(0..0, "at least one [[components]] table is required"),
        Some(list) if list.get_ref().is_empty() => {
            c.at(&list, "at least one component is required")
        }
        Some(list) => {
            let mut seen: HashMap<String, Range<usize>> = HashMap::new();
            for component in list.into_inner() {
                let name = check_name(&mut c, &component.name, "component");
                if seen.insert(name.clone(), component.name.span()).is_some() {
                    c.at(
                        &component.name,
                        format!("duplicate component name \"{name}\""),
                    );
                }
                let mut executables =
                    check_executables(&mut c, &component.name, component.executables);
                for exe in &mut executables {
                    exe.network = component.network;
                }
                components.push(ComponentSpec { name, executables });
            }
        }
    }

    let spec = DeploymentSpec {
        id,
        package,
        package_version,
        restart: raw.restart,
        depends_on: raw.depends_on.iter().map(|d| d.get_ref().clone()).collect(),
        ros: raw.ros,
        env,
        exports,
        components,
        update,
        source: path.to_path_buf(),
    };
    let located = Located {
        spec,
        id_pos: src.pos(raw.id.span().start),
        depends_on_pos: raw
            .depends_on
            .iter()
            .map(|d| src.pos(d.span().start))
            .collect(),
    };
    c.finish(located)
}

pub fn is_deployment_id(s: &str) -> bool {
    is_name(s, false)
}

/// `[a-z0-9][a-z0-9-]{0,62}`, with `_` too when `underscore`. Names become
/// parts of container names, which `.` separates.
pub fn is_name(s: &str, underscore: bool) -> bool {
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && s.len() <= 63
        && chars.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (underscore && c == '_')
        })
}

fn check_name(c: &mut Checker, name: &Spanned<String>, what: &str) -> String {
    let s = name.get_ref();
    if !is_name(s, true) {
        c.at(name, format!("invalid {what} name \"{s}\": {NAME_RULE}"));
    }
    s.clone()
}

fn check_executables(
    c: &mut Checker,
    component: &Spanned<String>,
    raw: Option<Spanned<Vec<RawExecutable>>>,
) -> Vec<ExecutableSpec> {
    let list = match raw {
        None => {
            c.at(
                component,
                format!(
                    "component \"{}\" needs at least one [[components.executables]] table",
                    component.get_ref()
                ),
            );
            return Vec::new();
        }
        Some(list) if list.get_ref().is_empty() => {
            c.at(
                &list,
                format!(
                    "component \"{}\" needs at least one executable",
                    component.get_ref()
                ),
            );
            return Vec::new();
        }
        Some(list) => list.into_inner(),
    };
    let mut seen: HashMap<String, Range<usize>> = HashMap::new();
    let mut out = Vec::new();
    for exe in list {
        let name = check_name(c, &exe.name, "executable");
        if seen.insert(name.clone(), exe.name.span()).is_some() {
            c.at(
                &exe.name,
                format!(
                    "duplicate executable name \"{name}\" in component \"{}\"",
                    component.get_ref()
                ),
            );
        }
        let image = c.non_empty(&exe.image, "image");
        let command = check_command(c, exe.command, exe.run_as_bash);
        let env = c.env(exe.env, "env");
        let limits = check_limits(c, &exe.limits);
        let volumes = exe
            .volumes
            .iter()
            .map(|v| Volume {
                host: check_volume_path(c, &v.host, "host"),
                container: check_volume_path(c, &v.container, "container"),
                read_only: v.read_only,
            })
            .collect();
        let devices = exe
            .devices
            .iter()
            .map(|d| {
                if !d.get_ref().starts_with('/') {
                    c.at(
                        d,
                        format!("device \"{}\" must be an absolute path", d.get_ref()),
                    );
                }
                d.get_ref().clone()
            })
            .collect();
        let probe = exe.probe.map(|p| check_probe(c, p));
        out.push(ExecutableSpec {
            name,
            image,
            pull: exe.pull,
            command,
            env,
            limits,
            volumes,
            devices,
            network: Network::Host,
            probe: probe.flatten(),
        });
    }
    out
}

fn check_command(
    c: &mut Checker,
    command: Option<Spanned<RawCommand>>,
    run_as_bash: Option<Spanned<bool>>,
) -> Option<Command> {
    let bash = run_as_bash.as_ref().is_some_and(|b| *b.get_ref());
    let Some(command) = command else {
        if let Some(b) = run_as_bash.as_ref().filter(|_| bash) {
            c.at(b, "run_as_bash = true needs a command string");
        }
        return None;
    };
    let span = command.span();
    match (command.into_inner(), bash) {
        (RawCommand::Exec(argv), false) => {
            if argv.is_empty() {
                c.at_span(
                    span,
                    "command must not be empty; leave it out to use the image's default",
                );
            }
            Some(Command::Exec(argv))
        }
        (RawCommand::Line(line), true) => {
            if line.trim().is_empty() {
                c.at_span(span, "command must not be empty");
            }
            Some(Command::Bash(line))
        }
        (RawCommand::Line(_), false) => {
            c.at_span(
                span,
                "a string command needs run_as_bash = true; \
                 use an array of strings for the exec form",
            );
            None
        }
        (RawCommand::Exec(_), true) => {
            c.at_span(
                span,
                "run_as_bash = true needs a string command, not an array",
            );
            None
        }
    }
}

/// A `probe` table: exactly one of `exec`, `tcp`, `http`, and timings of at
/// least a second (a grace of 0 is allowed).
fn check_probe(c: &mut Checker, raw: Spanned<RawProbe>) -> Option<Probe> {
    let span = raw.span();
    let raw = raw.into_inner();
    let kinds: Vec<(&str, Range<usize>)> = [
        raw.exec.as_ref().map(|v| ("exec", v.span())),
        raw.tcp.as_ref().map(|v| ("tcp", v.span())),
        raw.http.as_ref().map(|v| ("http", v.span())),
    ]
    .into_iter()
    .flatten()
    .collect();
    // Every problem is reported, the timings' too; a probe without exactly
    // one kind is none.
    let one_kind = kinds.len() == 1;
    if kinds.is_empty() {
        c.at_span(
            span,
            "probe needs exactly one of exec, tcp or http; none is given",
        );
    }
    if kinds.len() > 1 {
        let names: Vec<&str> = kinds.iter().map(|(name, _)| *name).collect();
        c.at_span(
            kinds[1].1.clone(),
            format!(
                "probe needs exactly one of exec, tcp or http, not {}",
                names.join(" and ")
            ),
        );
    }
    let check = if !one_kind {
        None
    } else if let Some(exec) = raw.exec {
        if exec.get_ref().is_empty() || exec.get_ref()[0].trim().is_empty() {
            c.at(
                &exec,
                "probe exec must name a program: [\"program\", \"arg\", ...]",
            );
        }
        Some(ProbeCheck::Exec(exec.into_inner()))
    } else if let Some(port) = raw.tcp {
        if !(1..=65535).contains(port.get_ref()) {
            c.at(&port, "probe tcp must be a port from 1 to 65535");
        }
        Some(ProbeCheck::Tcp(u16::try_from(*port.get_ref()).unwrap_or(0)))
    } else {
        raw.http.map(|url| {
            if let Err(message) = crate::probe::HttpTarget::parse(url.get_ref()) {
                c.at(&url, format!("probe http: {message}"));
            }
            ProbeCheck::Http(url.into_inner())
        })
    };
    let mut secs = |value: Option<&Spanned<i64>>, key: &str, min: i64, default: u64| {
        in_range(c, value, key, min..=i64::MAX, default as i64) as u64
    };
    let initial_delay_secs = secs(
        raw.initial_delay_secs.as_ref(),
        "initial_delay_secs",
        0,
        Probe::DEFAULT_INITIAL_DELAY_SECS,
    );
    let period_secs = secs(
        raw.period_secs.as_ref(),
        "period_secs",
        1,
        Probe::DEFAULT_PERIOD_SECS,
    );
    let timeout_secs = secs(
        raw.timeout_secs.as_ref(),
        "timeout_secs",
        1,
        Probe::DEFAULT_TIMEOUT_SECS,
    );
    let failure_threshold = in_range(
        c,
        raw.failure_threshold.as_ref(),
        "failure_threshold",
        1..=i64::from(u32::MAX),
        i64::from(Probe::DEFAULT_FAILURE_THRESHOLD),
    ) as u32;
    Some(Probe {
        check: check?,
        initial_delay_secs,
        period_secs,
        timeout_secs,
        failure_threshold,
    })
}

fn check_limits(c: &mut Checker, raw: &RawLimits) -> Limits {
    if let Some(cpus) = &raw.cpus {
        if !(cpus.get_ref().is_finite() && *cpus.get_ref() > 0.0) {
            c.at(cpus, "cpus must be greater than 0");
        }
    }
    if let Some(mem) = &raw.memory_mb {
        if *mem.get_ref() <= 0 {
            c.at(mem, "memory_mb must be greater than 0");
        }
    }
    Limits {
        cpus: raw.cpus.as_ref().map(|v| *v.get_ref()),
        memory_mb: raw.memory_mb.as_ref().map(|v| (*v.get_ref()).max(0) as u64),
    }
}

fn check_volume_path(c: &mut Checker, path: &Spanned<String>, key: &str) -> String {
    let s = path.get_ref();
    if !s.starts_with('/') {
        c.at(path, format!("volume {key} path \"{s}\" must be absolute"));
    } else if s.contains(':') {
        // The engine's bind syntax separates host, container and mode with ':'.
        c.at(
            path,
            format!("volume {key} path \"{s}\" must not contain ':'"),
        );
    }
    s.clone()
}

fn load_dir_located(dir: &Path) -> (BTreeMap<String, Located>, BadFiles) {
    load_dir_located_with(dir, load_listed)
}

/// One listed file; `None` when it was removed since the listing (nothing
/// to apply: it is as if the listing had not seen it).
fn load_listed(path: &Path) -> Option<Result<Located, Vec<ConfigError>>> {
    match read_deployment_file(path) {
        Ok(text) => Some(parse_deployment_located(path, &text)),
        Err(e) if e.is_gone() => {
            tracing::debug!(file = %path.display(), "deployment file removed since the listing");
            None
        }
        Err(e) => Some(Err(vec![ConfigError::whole_file(path, e.to_string())])),
    }
}

/// `load_dir_located` with the loading of one file given, so that a test
/// can put a race between the listing and the read.
fn load_dir_located_with(
    dir: &Path,
    load: impl Fn(&Path) -> Option<Result<Located, Vec<ConfigError>>>,
) -> (BTreeMap<String, Located>, BadFiles) {
    let mut good: BTreeMap<String, Located> = BTreeMap::new();
    let mut bad = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            let message = match e.kind() {
                io::ErrorKind::NotFound => "deployments directory does not exist".to_string(),
                _ => format!("cannot read deployments directory: {}", io_message(&e)),
            };
            bad.push((
                dir.to_path_buf(),
                vec![ConfigError::whole_file(dir, message)],
            ));
            return (good, bad);
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                // Hidden files are editors' and tools' scratch files. Any other
                // `*.toml`, even a directory or a FIFO, is a deployment file:
                // the read says what is wrong with it.
                if name.starts_with('.') || !name.ends_with(".toml") {
                    continue;
                }
                files.push(path);
            }
            Err(e) => bad.push((
                dir.to_path_buf(),
                vec![ConfigError::whole_file(
                    dir,
                    format!("cannot read deployments directory: {}", io_message(&e)),
                )],
            )),
        }
    }
    files.sort();

    for file in files {
        let Some(loaded) = load(&file) else {
            continue;
        };
        match loaded {
            Ok(located) => {
                if let Some(first) = good.get(&located.spec.id) {
                    let error = located.id_pos.error(
                        &file,
                        format!(
                            "duplicate deployment id \"{}\": already used by {}",
                            located.spec.id,
                            first.spec.source.display()
                        ),
                    );
                    bad.push((file, vec![error]));
                } else {
                    good.insert(located.spec.id.clone(), located);
                }
            }
            Err(errors) => bad.push((file, errors)),
        }
    }
    (good, bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn messages(errors: &[ConfigError]) -> String {
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Each row must give exactly one error, containing `expected`, at
    /// `line`:`col`.
    fn assert_rows(
        rows: &[(&str, &str, &str, usize, usize)],
        load: impl Fn(&Path) -> Result<(), Vec<ConfigError>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut failures = Vec::new();
        for (name, text, expected, line, col) in rows {
            let path = write(dir.path(), &format!("{name}.toml"), text);
            match load(&path) {
                Ok(()) => failures.push(format!("{name}: accepted")),
                Err(errors) => {
                    let ok = errors.len() == 1
                        && errors[0].message.contains(expected)
                        && errors[0].at == Some((*line, *col))
                        && errors[0].file == path;
                    if !ok {
                        failures.push(format!(
                            "{name}: want {line}:{col}: ...{expected}..., got\n{}",
                            messages(&errors)
                        ));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn bad_agent_configs_are_rejected_with_position() {
        let rows: &[(&str, &str, &str, usize, usize)] = &[
            ("missing_device_id", "state_dir = \"/x\"\n", "missing field `device_id`", 1, 1),
            ("device_id_space", "device_id = \"robot 42\"\n", "invalid device_id \"robot 42\"", 1, 13),
            ("device_id_empty", "device_id = \"\"\n", "invalid device_id", 1, 13),
            ("device_id_dot", "device_id = \"robot.42\"\n", "invalid device_id", 1, 13),
            (
                "device_id_too_long",
                &format!("device_id = \"{}\"\n", "a".repeat(65)),
                "invalid device_id",
                1,
                13,
            ),
            ("device_id_type", "device_id = 42\n", "invalid type: integer `42`", 1, 13),
            ("syntax", "device_id = \"r\"\nstate_dir =\n", "invalid string", 2, 12),
            ("unknown_top", "device_id = \"r\"\ndeployment_dir = \"/x\"\n", "unknown field `deployment_dir`", 2, 1),
            ("unknown_docker", "device_id = \"r\"\n[docker]\nhots = \"x\"\n", "unknown field `hots`", 3, 1),
            (
                "unknown_registry",
                "device_id = \"r\"\n[[docker.registries]]\nserver = \"s\"\nusername = \"u\"\npassword = \"p\"\n",
                "unknown field `password`",
                5,
                1,
            ),
            ("unknown_mqtt", "device_id = \"r\"\n[mqtt]\nurll = \"x\"\n", "unknown field `urll`", 3, 1),
            ("unknown_restart", "device_id = \"r\"\n[restart]\nbackoff_ms = 1\n", "unknown field `backoff_ms`", 3, 1),
            ("unknown_ros", "device_id = \"r\"\n[ros]\nimage = \"x\"\n", "unknown field `image`", 3, 1),
            ("unknown_log", "device_id = \"r\"\n[log]\nlevels = \"x\"\n", "unknown field `levels`", 3, 1),
            ("unknown_remote", "device_id = \"r\"\n[remote]\nenable = true\n", "unknown field `enable`", 3, 1),
            ("remote_enabled_string", "device_id = \"r\"\n[remote]\nenabled = \"yes\"\n", "invalid type: string \"yes\", expected a boolean", 3, 11),
            ("remote_relative_path", "device_id = \"r\"\n[remote]\nallowed_host_paths = [\"/data\", \"data\"]\n", "allowed_host_paths: \"data\" must be an absolute path without '..'", 3, 32),
            ("remote_parent_path", "device_id = \"r\"\n[remote]\nallowed_host_paths = [\"/data/../etc\"]\n", "allowed_host_paths: \"/data/../etc\" must be an absolute path without '..'", 3, 23),
            ("remote_empty_keys_dir", "device_id = \"r\"\n[remote]\ntrusted_keys_dir = \"\"\n", "trusted_keys_dir must not be empty", 3, 20),
            ("unknown_table", "device_id = \"r\"\n[mqttt]\nurl = \"x\"\n", "unknown field `mqttt`", 2, 2),
            ("empty_state_dir", "device_id = \"r\"\nstate_dir = \"\"\n", "state_dir must not be empty", 2, 13),
            (
                "registry_missing_password_file",
                "device_id = \"r\"\n[[docker.registries]]\nserver = \"s\"\nusername = \"u\"\n",
                "missing field `password_file`",
                2,
                1,
            ),
            (
                "registry_empty_server",
                "device_id = \"r\"\n[[docker.registries]]\nserver = \"\"\nusername = \"u\"\npassword_file = \"p\"\n",
                "server must not be empty",
                3,
                10,
            ),
            ("docker_host_path", "device_id = \"r\"\n[docker]\nhost = \"/var/run/docker.sock\"\n", "invalid docker host", 3, 8),
            ("docker_host_relative_unix", "device_id = \"r\"\n[docker]\nhost = \"unix://docker.sock\"\n", "invalid docker host", 3, 8),
            ("mqtt_scheme", "device_id = \"r\"\n[mqtt]\nurl = \"http://broker:1883\"\n", "use mqtt://host[:port]", 3, 7),
            ("mqtt_no_scheme", "device_id = \"r\"\n[mqtt]\nurl = \"broker:1883\"\n", "invalid mqtt url", 3, 7),
            ("mqtt_no_host", "device_id = \"r\"\n[mqtt]\nurl = \"mqtt://:1883\"\n", "missing or invalid host", 3, 7),
            ("mqtt_bad_port", "device_id = \"r\"\n[mqtt]\nurl = \"mqtt://broker:99999\"\n", "port must be a number", 3, 7),
            ("mqtt_zero_port", "device_id = \"r\"\n[mqtt]\nurl = \"mqtt://broker:0\"\n", "port must be a number", 3, 7),
            ("mqtt_path", "device_id = \"r\"\n[mqtt]\nurl = \"mqtt://broker:1883/x\"\n", "a path or query is not allowed", 3, 7),
            ("mqtt_ipv6_bare", "device_id = \"r\"\n[mqtt]\nurl = \"mqtt://::1\"\n", "an ipv6 address goes in brackets", 3, 7),
            ("mqtt_ipv6_unclosed", "device_id = \"r\"\n[mqtt]\nurl = \"mqtt://[::1:1883\"\n", "missing ']'", 3, 7),
            ("mqtt_ipv6_not_an_address", "device_id = \"r\"\n[mqtt]\nurl = \"mqtt://[broker]:1883\"\n", "not an ipv6 address", 3, 7),
            ("mqtt_credentials", "device_id = \"r\"\n[mqtt]\nurl = \"mqtt://u:p@broker\"\n", "password_file", 3, 7),
            (
                "mqtt_cert_without_key",
                "device_id = \"r\"\n[mqtt]\nurl = \"mqtts://broker\"\ncert_file = \"/c.pem\"\n",
                "cert_file needs key_file",
                4,
                13,
            ),
            (
                "mqtt_key_without_cert",
                "device_id = \"r\"\n[mqtt]\nurl = \"mqtts://broker\"\nkey_file = \"/c.key\"\n",
                "key_file needs cert_file",
                4,
                12,
            ),
            (
                "mqtt_password_without_username",
                "device_id = \"r\"\n[mqtt]\npassword_file = \"/p\"\n",
                "password_file needs a username",
                3,
                17,
            ),
            ("mqtt_empty_client_id", "device_id = \"r\"\n[mqtt]\nclient_id = \"\"\n", "client_id must not be empty", 3, 13),
            ("topic_prefix_empty", "device_id = \"r\"\n[mqtt]\ntopic_prefix = \"\"\n", "topic_prefix must not be empty", 3, 16),
            ("topic_prefix_hash", "device_id = \"r\"\n[mqtt]\ntopic_prefix = \"a/#\"\n", "wildcards", 3, 16),
            ("topic_prefix_plus", "device_id = \"r\"\n[mqtt]\ntopic_prefix = \"+\"\n", "wildcards", 3, 16),
            ("topic_prefix_slash", "device_id = \"r\"\n[mqtt]\ntopic_prefix = \"berth/\"\n", "start or end with '/'", 3, 16),
            ("keep_alive_zero", "device_id = \"r\"\n[mqtt]\nkeep_alive_secs = 0\n", "between 1 and 65535", 3, 19),
            ("keep_alive_big", "device_id = \"r\"\n[mqtt]\nkeep_alive_secs = 70000\n", "between 1 and 65535", 3, 19),
            ("keep_alive_type", "device_id = \"r\"\n[mqtt]\nkeep_alive_secs = \"30\"\n", "invalid type: string", 3, 19),
            ("backoff_initial_zero", "device_id = \"r\"\n[restart]\nbackoff_initial_ms = 0\n", "backoff_initial_ms must be greater than 0", 3, 22),
            (
                "backoff_max_below_initial",
                "device_id = \"r\"\n[restart]\nbackoff_initial_ms = 5000\nbackoff_max_secs = 2\n",
                "backoff_max_secs (2 s) must not be less than backoff_initial_ms (5000 ms)",
                4,
                20,
            ),
            (
                "backoff_initial_above_default_max",
                "device_id = \"r\"\n[restart]\nbackoff_initial_ms = 301000\n",
                "must not be less than",
                3,
                22,
            ),
            ("backoff_max_negative", "device_id = \"r\"\n[restart]\nbackoff_max_secs = -1\n", "backoff_max_secs must be greater than 0", 3, 20),
            ("backoff_reset_zero", "device_id = \"r\"\n[restart]\nbackoff_reset_after_secs = 0\n", "backoff_reset_after_secs must be greater than 0", 3, 28),
            ("ros_empty_image", "device_id = \"r\"\n[ros]\nmaster_image = \"\"\n", "master_image must not be empty", 3, 16),
            ("ros_empty_command", "device_id = \"r\"\n[ros]\nmaster_command = []\n", "master_command must not be empty", 3, 18),
            ("ros_string_command", "device_id = \"r\"\n[ros]\nmaster_command = \"roscore\"\n", "invalid type: string", 3, 18),
            ("ros_uri", "device_id = \"r\"\n[ros]\nmaster_uri = \"localhost:11311\"\n", "invalid master_uri", 3, 14),
            ("log_level", "device_id = \"r\"\n[log]\nlevel = \"verbose\"\n", "invalid log level \"verbose\"", 3, 9),
            ("log_level_case", "device_id = \"r\"\n[log]\nlevel = \"INFO\"\n", "invalid log level", 3, 9),
            ("log_format", "device_id = \"r\"\n[log]\nformat = \"xml\"\n", "invalid log format \"xml\": use text or json", 3, 10),
        ];
        assert_rows(rows, |p| load_agent(p).map(|_| ()));
    }

    #[test]
    fn remote_settings_are_validated_and_normalized() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "berth.toml",
            "device_id = \"r\"\n[remote]\nenabled = true\ntrusted_keys_dir = \"keys\"\n\
             allowed_host_paths = [\"/data/\", \"/srv/./maps\"]\nallow_devices = true\n",
        );
        let config = load_agent(&path).unwrap();
        assert_eq!(
            config.remote,
            RemoteSettings {
                enabled: true,
                trusted_keys_dir: base_dir(&path).join("keys"),
                allowed_host_paths: vec![PathBuf::from("/data"), PathBuf::from("/srv/maps")],
                allow_devices: true,
            }
        );
        let path = write(dir.path(), "min.toml", "device_id = \"r\"\n");
        assert_eq!(load_agent(&path).unwrap().remote, RemoteSettings::default());
        assert!(!RemoteSettings::default().enabled);
    }

    #[test]
    fn agent_errors_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "berth.toml",
            "device_id = \"a b\"\n[log]\nlevel = \"loud\"\nformat = \"xml\"\n",
        );
        let errors = load_agent(&path).unwrap_err();
        let lines: Vec<_> = errors.iter().map(|e| e.at).collect();
        assert_eq!(
            lines,
            [Some((1, 13)), Some((3, 9)), Some((4, 10))],
            "{}",
            messages(&errors)
        );
    }

    #[test]
    fn error_display_is_file_line_col_message() {
        let e = ConfigError {
            file: PathBuf::from("/etc/berth/berth.toml"),
            at: Some((3, 7)),
            message: "invalid mqtt url".into(),
        };
        assert_eq!(e.to_string(), "/etc/berth/berth.toml:3:7: invalid mqtt url");
        let e = ConfigError { at: None, ..e };
        assert_eq!(e.to_string(), "/etc/berth/berth.toml: invalid mqtt url");
    }

    #[test]
    fn unreadable_file_is_an_error_without_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        for errors in [
            load_agent(&path).unwrap_err(),
            load_deployment(&path).unwrap_err(),
        ] {
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].at, None);
            assert!(
                errors[0]
                    .message
                    .starts_with("cannot read file: no such file")
                    || errors[0]
                        .message
                        .starts_with("cannot open file: no such file"),
                "{}",
                errors[0]
            );
        }
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "b.toml",
            "device_id = \"r\" # été\n[log]\n\"é\" = 1\n",
        );
        let errors = load_agent(&path).unwrap_err();
        assert_eq!(errors[0].at, Some((3, 1)));
        let path = write(
            dir.path(),
            "c.toml",
            "device_id = \"r\"\n[log]\nlevel = \"é\" ; x\n",
        );
        let errors = load_agent(&path).unwrap_err();
        assert_eq!(errors[0].at, Some((3, 13)), "{}", messages(&errors));
    }

    #[test]
    fn agent_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "berth.toml", "device_id = \"robot-42\"\n");
        let config = load_agent(&path).unwrap();
        assert_eq!(
            config,
            AgentConfig {
                device_id: "robot-42".into(),
                deployments_dir: "/etc/berth/deployments.d".into(),
                state_dir: "/var/lib/berth".into(),
                boot_id_file: "/proc/sys/kernel/random/boot_id".into(),
                docker: DockerSettings {
                    host: "unix:///var/run/docker.sock".into(),
                    registries: vec![],
                    timeout: Duration::from_secs(30),
                },
                mqtt: MqttSettings {
                    endpoint: MqttEndpoint {
                        tls: false,
                        host: BrokerHost::Ip([127, 0, 0, 1].into()),
                        port: 1883,
                    },
                    client_id: "berth-robot-42".into(),
                    topic_prefix: "berth".into(),
                    username: None,
                    password_file: None,
                    ca_file: None,
                    cert_file: None,
                    key_file: None,
                    keep_alive: Duration::from_secs(30),
                },
                restart: RestartSettings {
                    backoff_initial: Duration::from_millis(1000),
                    backoff_max: Duration::from_secs(300),
                    backoff_reset_after: Duration::from_secs(60),
                },
                ros: RosSettings {
                    master_image: "ros:noetic-ros-core".into(),
                    master_command: vec!["roscore".into()],
                    master_uri: "http://localhost:11311".into(),
                },
                log: LogSettings {
                    level: "info".into(),
                    json: false,
                },
                containers: ContainerSettings {
                    log_rotation: crate::runtime::LogRotation {
                        max_size_mb: 10,
                        max_files: 3,
                    },
                },
                images: ImageSettings {
                    min_free_bytes: 1024 * 1024 * 1024,
                    gc_high_percent: 85,
                    gc_low_percent: 70,
                },
                metrics: MetricsSettings {
                    interval: Some(Duration::from_secs(60)),
                },
                remote: RemoteSettings::default(),
                source: path.clone(),
            }
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "berth.toml",
            r#"
device_id = "r"
deployments_dir = "deployments.d"
state_dir = "../state"
boot_id_file = "boot/id"

[[docker.registries]]
server = "registry.example.com"
username = "robot"
password_file = "secrets/registry"

[mqtt]
url = "mqtts://broker.example.com"
username = "r"
password_file = "secrets/mqtt"
ca_file = "ca.pem"
cert_file = "/abs/client.pem"
key_file = "client.key"
"#,
        );
        let config = load_agent(&path).unwrap();
        let base = dir.path();
        assert_eq!(config.deployments_dir, base.join("deployments.d"));
        assert_eq!(config.state_dir, base.join("../state"));
        assert_eq!(config.boot_id_file, base.join("boot/id"));
        assert_eq!(
            config.docker.registries[0].password_file,
            base.join("secrets/registry")
        );
        assert_eq!(config.mqtt.password_file, Some(base.join("secrets/mqtt")));
        assert_eq!(config.mqtt.ca_file, Some(base.join("ca.pem")));
        assert_eq!(
            config.mqtt.cert_file,
            Some(PathBuf::from("/abs/client.pem"))
        );
        assert_eq!(config.mqtt.key_file, Some(base.join("client.key")));
        assert!(config.deployments_dir.is_absolute());
        assert_eq!(
            config.mqtt.endpoint,
            MqttEndpoint {
                tls: true,
                host: BrokerHost::Name("broker.example.com".into()),
                port: 8883,
            }
        );
    }

    #[test]
    fn the_mqtt_url_becomes_the_endpoint_the_reporter_uses() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [
            (
                "mqtt://[::1]:1884",
                false,
                BrokerHost::Ip("::1".parse().unwrap()),
                1884,
            ),
            (
                "mqtts://[fe80::1]",
                true,
                BrokerHost::Ip("fe80::1".parse().unwrap()),
                8883,
            ),
            (
                "mqtt://10.0.0.1",
                false,
                BrokerHost::Ip([10, 0, 0, 1].into()),
                1883,
            ),
            (
                "mqtts://broker.example.com:8884",
                true,
                BrokerHost::Name("broker.example.com".into()),
                8884,
            ),
        ];
        for (url, tls, host, port) in rows {
            let path = write(
                dir.path(),
                "berth.toml",
                &format!("device_id = \"r\"\n[mqtt]\nurl = \"{url}\"\n"),
            );
            let config = load_agent(&path).unwrap_or_else(|e| panic!("{url}: {}", messages(&e)));
            assert_eq!(
                config.mqtt.endpoint,
                MqttEndpoint { tls, host, port },
                "{url}"
            );
        }
    }

    #[test]
    fn a_bad_mqtt_url_names_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "berth.toml",
            "device_id = \"r\"\n\n[mqtt]\nurl = \"mqtt://[::1]x\"\n",
        );
        let errors = load_agent(&path).unwrap_err();
        assert_eq!(errors.len(), 1, "{}", messages(&errors));
        assert_eq!(
            errors[0].to_string(),
            format!(
                "{}:4:7: invalid mqtt url \"mqtt://[::1]x\": only ':' and a port may follow ']'",
                path.display()
            )
        );
    }

    const SPEC_AGENT: &str = r#"
device_id = "robot-42"                 # required, [A-Za-z0-9_-]{1,64}
deployments_dir = "/etc/berth/deployments.d"
state_dir = "/var/lib/berth"
boot_id_file = "/proc/sys/kernel/random/boot_id"   # what tells one boot from the next

[docker]
host = "unix:///var/run/docker.sock"

[[docker.registries]]                  # credentials for private registries
server = "registry.example.com"
username = "robot"
password_file = "/etc/berth/secrets/registry"    # never inline secrets in logs or MQTT

[mqtt]
url = "mqtt://127.0.0.1:1883"          # mqtts:// for TLS
client_id = "berth-robot-42"           # default: berth-<device_id>
topic_prefix = "berth"
username = "robot-42"                  # optional
password_file = "/etc/berth/secrets/mqtt"
ca_file = "/etc/berth/ca.pem"          # optional; client cert_file/key_file for mutual TLS
keep_alive_secs = 30

[restart]                              # crash-loop back-off, see section 6
backoff_initial_ms = 1000
backoff_max_secs = 300
backoff_reset_after_secs = 60

[ros]
master_image = "ros:noetic-ros-core"
master_command = ["roscore"]
master_uri = "http://localhost:11311"

[log]
level = "info"                         # RUST_LOG overrides
format = "text"                        # or "json"

[containers]                           # how berth creates containers
log_max_size_mb = 10                   # engine json-file rotation: a chatty executable never fills the disk
log_max_files = 3

[images]                               # image housekeeping, section 8
min_free_mb = 1024                     # below this, garbage-collect before a pull; still short: DEP_E305
gc_high_percent = 85                   # engine data root use that starts a collection
gc_low_percent = 70                    # where it stops

[metrics]
interval_secs = 60                     # 0 disables the metrics topic
"#;

    #[test]
    fn spec_agent_example_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "berth.toml", SPEC_AGENT);
        let config = load_agent(&path).unwrap();
        assert_eq!(config.device_id, "robot-42");
        assert_eq!(
            config.docker.registries,
            [RegistrySettings {
                server: "registry.example.com".into(),
                username: "robot".into(),
                password_file: "/etc/berth/secrets/registry".into(),
            }]
        );
        assert_eq!(config.mqtt.client_id, "berth-robot-42");
        assert_eq!(config.mqtt.username.as_deref(), Some("robot-42"));
        assert_eq!(
            config.mqtt.password_file,
            Some(PathBuf::from("/etc/berth/secrets/mqtt"))
        );
        assert_eq!(
            config.mqtt.ca_file,
            Some(PathBuf::from("/etc/berth/ca.pem"))
        );
        assert_eq!(config.mqtt.keep_alive, Duration::from_secs(30));
        assert_eq!(config.restart.backoff_initial, Duration::from_secs(1));
        assert_eq!(config.ros.master_command, ["roscore"]);
        assert_eq!(config.log.level, "info");
        assert!(!config.log.json);
        assert_eq!(config.containers, ContainerSettings::default());
        assert_eq!(config.images, ImageSettings::default());
        assert_eq!(config.metrics, MetricsSettings::default());

        let json = SPEC_AGENT.replace("format = \"text\"", "format = \"json\"");
        let path = write(dir.path(), "json.toml", &json);
        assert!(load_agent(&path).unwrap().log.json);
    }

    macro_rules! head {
        () => {
            "id = \"talker\"\npackage = \"p\"\npackage_version = \"1\"\n"
        };
    }
    // Lines 4 to 8; executable keys added after it land on line 9.
    macro_rules! exe {
        () => {
            "[[components]]\nname = \"c\"\n[[components.executables]]\nname = \"e\"\nimage = \"i\"\n"
        };
    }

    #[test]
    fn bad_deployment_files_are_rejected_with_position() {
        let long_id = format!(
            "id = \"{}\"\npackage = \"p\"\npackage_version = \"1\"\n{}",
            "a".repeat(64),
            exe!()
        );
        let rows: &[(&str, &str, &str, usize, usize)] = &[
            ("id_upper", concat!("id = \"Talker\"\npackage = \"p\"\npackage_version = \"1\"\n", exe!()), "invalid deployment id \"Talker\"", 1, 6),
            ("id_dash_first", concat!("id = \"-t\"\npackage = \"p\"\npackage_version = \"1\"\n", exe!()), "invalid deployment id", 1, 6),
            ("id_underscore", concat!("id = \"a_b\"\npackage = \"p\"\npackage_version = \"1\"\n", exe!()), "invalid deployment id", 1, 6),
            ("id_empty", concat!("id = \"\"\npackage = \"p\"\npackage_version = \"1\"\n", exe!()), "invalid deployment id", 1, 6),
            ("id_too_long", &long_id, "invalid deployment id", 1, 6),
            ("missing_id", concat!("package = \"p\"\npackage_version = \"1\"\n", exe!()), "missing field `id`", 1, 1),
            ("missing_package", concat!("id = \"t\"\npackage_version = \"1\"\n", exe!()), "missing field `package`", 1, 1),
            ("missing_version", concat!("id = \"t\"\npackage = \"p\"\n", exe!()), "missing field `package_version`", 1, 1),
            ("empty_version", concat!("id = \"t\"\npackage = \"p\"\npackage_version = \"\"\n", exe!()), "package_version must not be empty", 3, 19),
            ("restart", concat!(head!(), "restart = \"sometimes\"\n", exe!()), "unknown variant `sometimes`", 4, 11),
            ("unknown_top", concat!(head!(), "restrat = \"always\"\n", exe!()), "unknown field `restrat`", 4, 1),
            ("ros_type", concat!(head!(), "ros = \"yes\"\n", exe!()), "invalid type: string", 4, 7),
            ("self_dependency", concat!(head!(), "depends_on = [\"map\", \"talker\"]\n", exe!()), "must not depend on itself", 4, 22),
            ("env_key_equals", concat!(head!(), "env = { \"A=B\" = \"x\" }\n", exe!()), "must not contain '='", 4, 9),
            ("env_key_empty", concat!(head!(), "env = { \"\" = \"x\" }\n", exe!()), "env: a variable name must not be empty", 4, 9),
            ("env_value_type", concat!(head!(), "env = { A = 1 }\n", exe!()), "invalid type: integer `1`, expected a string", 4, 13),
            ("exports_key", concat!(head!(), "exports = { \"A=B\" = \"x\" }\n", exe!()), "exports: variable name \"A=B\"", 4, 13),
            ("no_components", head!(), "at least one [[components]] table is required", 1, 1),
            ("empty_components", concat!(head!(), "components = []\n"), "at least one component is required", 4, 14),
            ("unknown_component_key", concat!(head!(), "[[components]]\nname = \"c\"\nexecutable = []\n"), "unknown field `executable`", 6, 1),
            ("no_executables", concat!(head!(), "[[components]]\nname = \"c\"\n"), "component \"c\" needs at least one", 5, 8),
            ("empty_executables", concat!(head!(), "[[components]]\nname = \"c\"\nexecutables = []\n"), "needs at least one executable", 6, 15),
            ("component_name_upper", concat!(head!(), "[[components]]\nname = \"Greeter\"\n[[components.executables]]\nname = \"e\"\nimage = \"i\"\n"), "invalid component name \"Greeter\"", 5, 8),
            ("component_name_dot", concat!(head!(), "[[components]]\nname = \"a.b\"\n[[components.executables]]\nname = \"e\"\nimage = \"i\"\n"), "invalid component name", 5, 8),
            ("component_missing_name", concat!(head!(), "[[components]]\n[[components.executables]]\nname = \"e\"\nimage = \"i\"\n"), "missing field `name`", 4, 1),
            ("component_duplicate", concat!(head!(), exe!(), exe!()), "duplicate component name \"c\"", 10, 8),
            (
                "exe_duplicate",
                concat!(head!(), exe!(), "[[components.executables]]\nname = \"e\"\nimage = \"i\"\n"),
                "duplicate executable name \"e\" in component \"c\"",
                10,
                8,
            ),
            ("exe_name_upper", concat!(head!(), "[[components]]\nname = \"c\"\n[[components.executables]]\nname = \"E\"\nimage = \"i\"\n"), "invalid executable name \"E\"", 7, 8),
            ("exe_name_long", &format!("{}[[components]]\nname = \"c\"\n[[components.executables]]\nname = \"{}\"\nimage = \"i\"\n", head!(), "e".repeat(64)), "invalid executable name", 7, 8),
            ("exe_missing_image", concat!(head!(), "[[components]]\nname = \"c\"\n[[components.executables]]\nname = \"e\"\n"), "missing field `image`", 6, 1),
            ("exe_empty_image", concat!(head!(), "[[components]]\nname = \"c\"\n[[components.executables]]\nname = \"e\"\nimage = \" \"\n"), "image must not be empty", 8, 9),
            ("exe_unknown_key", concat!(head!(), exe!(), "cmd = [\"x\"]\n"), "unknown field `cmd`", 9, 1),
            ("pull", concat!(head!(), exe!(), "pull = \"sometimes\"\n"), "unknown variant `sometimes`", 9, 8),
            ("command_string", concat!(head!(), exe!(), "command = \"echo hi\"\n"), "a string command needs run_as_bash = true", 9, 11),
            ("command_string_bash_false", concat!(head!(), exe!(), "command = \"echo hi\"\nrun_as_bash = false\n"), "needs run_as_bash = true", 9, 11),
            ("command_array_bash", concat!(head!(), exe!(), "run_as_bash = true\ncommand = [\"echo\", \"hi\"]\n"), "run_as_bash = true needs a string command", 10, 11),
            ("bash_without_command", concat!(head!(), exe!(), "run_as_bash = true\n"), "run_as_bash = true needs a command string", 9, 15),
            ("command_empty_array", concat!(head!(), exe!(), "command = []\n"), "command must not be empty", 9, 11),
            ("command_empty_bash", concat!(head!(), exe!(), "command = \"\"\nrun_as_bash = true\n"), "command must not be empty", 9, 11),
            ("command_number", concat!(head!(), exe!(), "command = 1\n"), "expected an array of strings", 9, 11),
            ("command_element", concat!(head!(), exe!(), "command = [\"a\", 1]\n"), "invalid type: integer `1`, expected a string", 9, 17),
            ("cpus_zero", concat!(head!(), exe!(), "limits = { cpus = 0.0 }\n"), "cpus must be greater than 0", 9, 19),
            ("cpus_negative", concat!(head!(), exe!(), "limits = { cpus = -1 }\n"), "cpus must be greater than 0", 9, 19),
            ("cpus_nan", concat!(head!(), exe!(), "limits = { cpus = nan }\n"), "cpus must be greater than 0", 9, 19),
            ("memory_zero", concat!(head!(), exe!(), "limits = { memory_mb = 0 }\n"), "memory_mb must be greater than 0", 9, 24),
            ("memory_float", concat!(head!(), exe!(), "limits = { memory_mb = 1.5 }\n"), "invalid type: floating point", 9, 24),
            ("limits_unknown", concat!(head!(), exe!(), "limits = { cpus = 1, memory = 2 }\n"), "unknown field `memory`", 9, 22),
            ("volume_host_relative", concat!(head!(), exe!(), "volumes = [{ host = \"data\", container = \"/data\" }]\n"), "volume host path \"data\" must be absolute", 9, 21),
            ("volume_container_relative", concat!(head!(), exe!(), "volumes = [{ host = \"/data\", container = \"data\" }]\n"), "volume container path \"data\" must be absolute", 9, 42),
            ("volume_colon", concat!(head!(), exe!(), "volumes = [{ host = \"/a:b\", container = \"/data\" }]\n"), "must not contain ':'", 9, 21),
            ("volume_missing_container", concat!(head!(), exe!(), "volumes = [{ host = \"/data\" }]\n"), "missing field `container`", 9, 12),
            ("volume_unknown", concat!(head!(), exe!(), "volumes = [{ host = \"/a\", container = \"/b\", ro = true }]\n"), "unknown field `ro`", 9, 45),
            ("device_relative", concat!(head!(), exe!(), "devices = [\"ttyUSB0\"]\n"), "device \"ttyUSB0\" must be an absolute path", 9, 12),
            ("exe_env_key", concat!(head!(), exe!(), "env = { \"\" = \"x\" }\n"), "env: a variable name must not be empty", 9, 9),
        ];
        assert_rows(rows, |p| load_deployment(p).map(|_| ()));
    }

    #[test]
    fn bad_probes_and_updates_are_rejected_with_position() {
        // The probe table's header is line 9, its keys from line 10 on.
        macro_rules! probe {
            ($keys:expr) => {
                concat!(head!(), exe!(), "[components.executables.probe]\n", $keys)
            };
        }
        let rows: &[(&str, &str, &str, usize, usize)] = &[
            (
                "none",
                probe!("period_secs = 5\n"),
                "probe needs exactly one of exec, tcp or http; none is given",
                9,
                1,
            ),
            (
                "empty_table",
                probe!(""),
                "probe needs exactly one of exec, tcp or http; none is given",
                9,
                1,
            ),
            (
                "two",
                probe!("exec = [\"x\"]\ntcp = 80\n"),
                "probe needs exactly one of exec, tcp or http, not exec and tcp",
                11,
                7,
            ),
            (
                "three",
                probe!("http = \"http://a/\"\nexec = [\"x\"]\ntcp = 80\n"),
                "not exec and tcp and http",
                12,
                7,
            ),
            (
                "exec_empty",
                probe!("exec = []\n"),
                "probe exec must name a program",
                10,
                8,
            ),
            (
                "exec_type",
                probe!("exec = \"x\"\n"),
                "invalid type: string \"x\", expected a sequence",
                10,
                8,
            ),
            (
                "tcp_zero",
                probe!("tcp = 0\n"),
                "probe tcp must be a port from 1 to 65535",
                10,
                7,
            ),
            (
                "tcp_high",
                probe!("tcp = 70000\n"),
                "probe tcp must be a port from 1 to 65535",
                10,
                7,
            ),
            (
                "http_https",
                probe!("http = \"https://x/\"\n"),
                "probe http: \"https://x/\" must start with http://",
                10,
                8,
            ),
            (
                "http_no_host",
                probe!("http = \"http:///x\"\n"),
                "probe http: \"http:///x\" names no host",
                10,
                8,
            ),
            (
                "period_zero",
                probe!("tcp = 80\nperiod_secs = 0\n"),
                "period_secs must be at least 1",
                11,
                15,
            ),
            (
                "timeout_zero",
                probe!("tcp = 80\ntimeout_secs = 0\n"),
                "timeout_secs must be at least 1",
                11,
                16,
            ),
            (
                "threshold_zero",
                probe!("tcp = 80\nfailure_threshold = 0\n"),
                "failure_threshold must be between 1 and 4294967295",
                11,
                21,
            ),
            (
                "delay_negative",
                probe!("tcp = 80\ninitial_delay_secs = -1\n"),
                "initial_delay_secs must be at least 0",
                11,
                22,
            ),
            (
                "unknown_key",
                probe!("tcp = 80\nport = 1\n"),
                "unknown field `port`",
                11,
                1,
            ),
            (
                "update_negative",
                concat!(head!(), exe!(), "[update]\nmin_ready_secs = -1\n"),
                "min_ready_secs must be at least 0",
                10,
                18,
            ),
            (
                "update_unknown",
                concat!(head!(), exe!(), "[update]\nmin_ready = 1\n"),
                "unknown field `min_ready`",
                10,
                1,
            ),
        ];
        assert_rows(rows, |p| load_deployment(p).map(|_| ()));
    }

    #[test]
    fn every_problem_of_a_probe_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let text = concat!(
            head!(),
            exe!(),
            "[components.executables.probe]\nexec = [\"x\"]\nhttp = \"http://a/\"\n\
             period_secs = 0\nfailure_threshold = 0\n"
        );
        let errors = load_deployment(&write(dir.path(), "t.toml", text)).unwrap_err();
        let found: Vec<(usize, usize, &str)> = errors
            .iter()
            .map(|e| {
                let (line, col) = e.at.expect("a place in the text");
                (line, col, e.message.as_str())
            })
            .collect();
        assert_eq!(
            found,
            [
                (
                    11,
                    8,
                    "probe needs exactly one of exec, tcp or http, not exec and http"
                ),
                (12, 15, "period_secs must be at least 1"),
                (13, 21, "failure_threshold must be between 1 and 4294967295"),
            ]
        );
    }

    #[test]
    fn probes_default_and_zero_delay_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let text = concat!(
            head!(),
            exe!(),
            "[components.executables.probe]\nhttp = \"http://127.0.0.1:8080/healthz\"\n\
             initial_delay_secs = 0\n"
        );
        let path = write(dir.path(), "talker.toml", text);
        let spec = load_deployment(&path).unwrap();
        assert_eq!(
            spec.components[0].executables[0].probe,
            Some(Probe {
                check: ProbeCheck::Http("http://127.0.0.1:8080/healthz".into()),
                initial_delay_secs: 0,
                period_secs: 10,
                timeout_secs: 2,
                failure_threshold: 3,
            })
        );
        assert_eq!(spec.update, UpdateSpec { min_ready_secs: 10 });
        let path = write(dir.path(), "plain.toml", concat!(head!(), exe!()));
        let plain = load_deployment(&path).unwrap();
        assert_eq!(plain.components[0].executables[0].probe, None);
    }

    #[test]
    fn bad_housekeeping_sections_are_rejected_with_position() {
        let rows: &[(&str, &str, &str, usize, usize)] = &[
            (
                "docker_timeout_zero",
                "device_id = \"r\"\n[docker]\ntimeout_secs = 0\n",
                "timeout_secs must be greater than 0",
                3,
                16,
            ),
            (
                "log_size_zero",
                "device_id = \"r\"\n[containers]\nlog_max_size_mb = 0\n",
                "log_max_size_mb must be between 1 and 1000000",
                3,
                19,
            ),
            (
                "log_files_zero",
                "device_id = \"r\"\n[containers]\nlog_max_files = 0\n",
                "log_max_files must be between 1 and 1000",
                3,
                17,
            ),
            (
                "containers_unknown",
                "device_id = \"r\"\n[containers]\nlog_size = 1\n",
                "unknown field `log_size`",
                3,
                1,
            ),
            (
                "high_over_100",
                "device_id = \"r\"\n[images]\ngc_high_percent = 101\n",
                "gc_high_percent must be between 1 and 100",
                3,
                19,
            ),
            (
                "low_equals_high",
                "device_id = \"r\"\n[images]\ngc_high_percent = 80\ngc_low_percent = 80\n",
                "gc_low_percent (80) must be less than gc_high_percent (80)",
                4,
                18,
            ),
            (
                "low_over_default_high",
                "device_id = \"r\"\n[images]\ngc_low_percent = 90\n",
                "gc_low_percent (90) must be less than gc_high_percent (85)",
                3,
                18,
            ),
            (
                "high_under_default_low",
                "device_id = \"r\"\n[images]\ngc_high_percent = 50\n",
                "gc_low_percent (70) must be less than gc_high_percent (50)",
                3,
                19,
            ),
            (
                "min_free_negative",
                "device_id = \"r\"\n[images]\nmin_free_mb = -1\n",
                "min_free_mb must be at least 0",
                3,
                15,
            ),
            (
                "images_unknown",
                "device_id = \"r\"\n[images]\ngc_high = 1\n",
                "unknown field `gc_high`",
                3,
                1,
            ),
            (
                "metrics_negative",
                "device_id = \"r\"\n[metrics]\ninterval_secs = -5\n",
                "interval_secs must be at least 0",
                3,
                17,
            ),
            (
                "metrics_float",
                "device_id = \"r\"\n[metrics]\ninterval_secs = 1.5\n",
                "invalid type: floating point",
                3,
                17,
            ),
        ];
        assert_rows(rows, |p| load_agent(p).map(|_| ()));
    }

    #[test]
    fn metrics_interval_zero_disables_the_topic() {
        let dir = tempfile::tempdir().unwrap();
        let text = "device_id = \"r\"\n[metrics]\ninterval_secs = 0\n[images]\ngc_low_percent = 0\ngc_high_percent = 100\nmin_free_mb = 0\n[docker]\ntimeout_secs = 5\n";
        let config = load_agent(&write(dir.path(), "berth.toml", text)).unwrap();
        assert_eq!(config.metrics.interval, None);
        assert_eq!(
            config.images,
            ImageSettings {
                min_free_bytes: 0,
                gc_high_percent: 100,
                gc_low_percent: 0,
            }
        );
        assert_eq!(config.docker.timeout, Duration::from_secs(5));
    }

    const SPEC_DEPLOYMENT: &str = r#"
id = "talker"                          # unique on the device, [a-z0-9][a-z0-9-]{0,62}
package = "ros-talker"
package_version = "1.0.0"
restart = "always"                     # always | on-failure | never   (default always)
depends_on = ["map-server"]            # ids of other deployments on this device
ros = true                             # needs the shared ROS master (default false)
env = { ROBOT_NAME = "r42" }           # added to every executable's env
exports = { TALKER_TOPIC = "/chatter" }  # env handed to deployments that depend on this one

[[components]]
name = "talker"

[[components.executables]]
name = "talker"
image = "registry.example.com/talker:1.0"
pull = "if-not-present"                # always | if-not-present | never
command = ["roslaunch", "talker", "talker.launch"]   # optional, exec form
# command = "roslaunch talker talker.launch" with run_as_bash = true runs it under /bin/bash -c
env = { LOG_LEVEL = "debug" }
limits = { cpus = 0.5, memory_mb = 256 }
volumes = [{ host = "/data/maps", container = "/maps", read_only = true }]
devices = ["/dev/ttyUSB0"]

[components.executables.probe]         # liveness, optional; exactly one of exec / tcp / http
exec = ["talker-health"]               # run inside the container; exit 0 = healthy
# tcp = 8080                           # a TCP connect to this port succeeds
# http = "http://127.0.0.1:8080/healthz"   # GET answers 2xx or 3xx
initial_delay_secs = 5                 # grace after each start
period_secs = 10
timeout_secs = 2
failure_threshold = 3                  # consecutive failures that make it unhealthy

[update]                               # optional, section 8
min_ready_secs = 10                    # a new version must run (and be healthy) this long to be kept
"#;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn spec_deployment_example_parses() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "talker.toml", SPEC_DEPLOYMENT);
        let spec = load_deployment(&path).unwrap();
        assert_eq!(
            spec,
            DeploymentSpec {
                id: "talker".into(),
                package: "ros-talker".into(),
                package_version: "1.0.0".into(),
                restart: RestartPolicy::Always,
                depends_on: vec!["map-server".into()],
                ros: true,
                env: map(&[("ROBOT_NAME", "r42")]),
                exports: map(&[("TALKER_TOPIC", "/chatter")]),
                components: vec![ComponentSpec {
                    name: "talker".into(),
                    executables: vec![ExecutableSpec {
                        name: "talker".into(),
                        image: "registry.example.com/talker:1.0".into(),
                        pull: PullPolicy::IfNotPresent,
                        command: Some(Command::Exec(vec![
                            "roslaunch".into(),
                            "talker".into(),
                            "talker.launch".into(),
                        ])),
                        env: map(&[("LOG_LEVEL", "debug")]),
                        limits: Limits {
                            cpus: Some(0.5),
                            memory_mb: Some(256),
                        },
                        volumes: vec![Volume {
                            host: "/data/maps".into(),
                            container: "/maps".into(),
                            read_only: true,
                        }],
                        devices: vec!["/dev/ttyUSB0".into()],
                        network: Network::Host,
                        probe: Some(Probe {
                            check: ProbeCheck::Exec(vec!["talker-health".into()]),
                            initial_delay_secs: 5,
                            period_secs: 10,
                            timeout_secs: 2,
                            failure_threshold: 3,
                        }),
                    }],
                }],
                update: UpdateSpec { min_ready_secs: 10 },
                source: path.clone(),
            }
        );

        let bash = SPEC_DEPLOYMENT.replace(
            r#"command = ["roslaunch", "talker", "talker.launch"]"#,
            "command = \"roslaunch talker talker.launch\"\nrun_as_bash = true",
        );
        let path = write(dir.path(), "bash.toml", &bash);
        let spec = load_deployment(&path).unwrap();
        assert_eq!(
            spec.components[0].executables[0].command,
            Some(Command::Bash("roslaunch talker talker.launch".into()))
        );
    }

    #[test]
    fn deployment_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let text = concat!(
            head!(),
            exe!(),
            "run_as_bash = false\n",
            "[[components]]\nname = \"d\"\n[[components.executables]]\nname = \"e\"\nimage = \"j\"\n",
            "[[components.executables]]\nname = \"f_2\"\nimage = \"k\"\npull = \"never\"\n",
        );
        let path = write(dir.path(), "t.toml", text);
        let spec = load_deployment(&path).unwrap();
        assert_eq!(spec.restart, RestartPolicy::Always);
        assert!(spec.depends_on.is_empty() && !spec.ros);
        assert!(spec.env.is_empty() && spec.exports.is_empty());
        let exes: Vec<_> = spec
            .executables()
            .map(|(c, e)| (c.name.as_str(), e.name.as_str(), e.pull))
            .collect();
        assert_eq!(
            exes,
            [
                ("c", "e", PullPolicy::IfNotPresent),
                ("d", "e", PullPolicy::IfNotPresent),
                ("d", "f_2", PullPolicy::Never),
            ]
        );
        let e = &spec.components[0].executables[0];
        assert_eq!(e.command, None);
        assert_eq!(e.limits, Limits::default());
        assert!(e.volumes.is_empty() && e.devices.is_empty() && e.env.is_empty());

        for (policy, want) in [
            ("always", RestartPolicy::Always),
            ("on-failure", RestartPolicy::OnFailure),
            ("never", RestartPolicy::Never),
        ] {
            let text = format!("{}restart = \"{policy}\"\n{}", head!(), exe!());
            let path = write(dir.path(), "p.toml", &text);
            assert_eq!(load_deployment(&path).unwrap().restart, want);
        }
    }

    fn deployment(id: &str, depends_on: &[&str]) -> String {
        let deps: Vec<_> = depends_on.iter().map(|d| format!("\"{d}\"")).collect();
        format!(
            "id = \"{id}\"\npackage = \"p\"\npackage_version = \"1\"\ndepends_on = [{}]\n{}",
            deps.join(", "),
            exe!()
        )
    }

    #[test]
    fn deployments_dir_loads_toml_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "b.toml", &deployment("beta", &[]));
        write(d, "a.toml", &deployment("alpha", &[]));
        let broken = write(d, "c.toml", "id = \"gamma\"\n");
        write(d, "README.md", "not a deployment");
        write(d, ".hidden.toml", "garbage");
        write(d, "d.toml.bak", "garbage");
        fs::create_dir(d.join("sub.toml")).unwrap();
        write(&d.join("sub.toml"), "e.toml", &deployment("nested", &[]));
        let dup = write(d, "z.toml", &deployment("alpha", &[]));

        let (good, bad) = load_deployments_dir(d);
        assert_eq!(good.keys().collect::<Vec<_>>(), ["alpha", "beta"]);
        assert_eq!(good["alpha"].source, d.join("a.toml"));
        let files: Vec<_> = bad.iter().map(|(f, _)| f.clone()).collect();
        // A directory named *.toml is not read into: it is a deployment
        // file that is not a regular file.
        assert_eq!(files, [broken, d.join("sub.toml"), dup.clone()]);
        assert_eq!(
            bad[1].1[0].to_string(),
            format!(
                "{}: not a regular file but a directory; only regular files (or symlinks to one) are read",
                d.join("sub.toml").display()
            )
        );
        let dup_errors = &bad[2].1;
        assert_eq!(dup_errors.len(), 1);
        let e = &dup_errors[0];
        assert_eq!((e.file.clone(), e.at), (dup, Some((1, 6))));
        assert_eq!(
            e.message,
            format!(
                "duplicate deployment id \"alpha\": already used by {}",
                d.join("a.toml").display()
            )
        );
    }

    fn read_error(path: &Path) -> String {
        match read_deployment_file(path) {
            Ok(text) => panic!("{} was read: {} bytes", path.display(), text.len()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Without O_NONBLOCK this open would wait forever for a writer.
        assert!(read_error(&fifo).contains("not a regular file but a FIFO"));
    }

    #[test]
    fn a_symlink_to_a_device_is_refused_and_to_a_file_followed() {
        let dir = tempfile::tempdir().unwrap();
        let zero = dir.path().join("z.toml");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert!(read_error(&zero).contains("not a regular file but a character device"));

        let target = write(dir.path(), "real", "id = \"x\"\n");
        let link = dir.path().join("x.toml");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_deployment_file(&link).unwrap(), "id = \"x\"\n");
    }

    #[test]
    fn only_root_and_berths_user_may_make_a_symlink_to_a_deployment() {
        // (link owner, berth's euid, accepted)
        for (owner, euid, accepted) in [
            (0, 0, true),
            (0, 1000, true),
            (1000, 1000, true),
            (1001, 1000, false),
            (1000, 0, false),
        ] {
            assert_eq!(
                check_link_owner(owner, euid).is_ok(),
                accepted,
                "owner {owner} euid {euid}"
            );
        }
        assert!(check_link_owner(65534, 0)
            .unwrap_err()
            .to_string()
            .starts_with("file is a symlink made by uid 65534"));
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("x.toml");
        fs::create_dir(&sub).unwrap();
        assert!(read_error(&sub).contains("not a regular file but a directory"));
    }

    #[test]
    fn a_file_over_1_mib_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        // Sparse: 100 MB that take no disk.
        let file = fs::File::create(&big).unwrap();
        file.set_len(100_000_000).unwrap();
        assert_eq!(
            read_error(&big),
            "file is larger than 1 MiB (100000000 bytes)"
        );
        file.set_len(MAX_DEPLOYMENT_FILE_BYTES + 1).unwrap();
        assert!(read_error(&big).contains("larger than 1 MiB"));
        file.set_len(MAX_DEPLOYMENT_FILE_BYTES).unwrap();
        assert_eq!(
            read_deployment_file(&big).unwrap().len() as u64,
            MAX_DEPLOYMENT_FILE_BYTES
        );
    }

    #[test]
    fn a_file_writable_by_group_or_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "w.toml", "id = \"w\"\n");
        for (mode, who) in [
            (0o666, "group and others"),
            (0o646, "others"),
            (0o664, "its group"),
        ] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                read_error(&path),
                format!("file is writable by {who} (mode {mode:04o}): run chmod go-w on it")
            );
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_deployment_file(&path).is_ok());
    }

    #[test]
    fn only_root_and_berths_user_may_own_a_deployment_file() {
        // (owner, mode, berth's euid, accepted)
        let rows = [
            (0, 0o644, 0, true),
            (0, 0o644, 1000, true),
            (1000, 0o600, 1000, true),
            (1001, 0o644, 1000, false),
            (1000, 0o644, 0, false),
            (0, 0o664, 0, false),
            (0, 0o4755, 0, true),
        ];
        for (owner, mode, euid, accepted) in rows {
            let got = check_owner_and_mode(owner, mode, euid);
            assert_eq!(
                got.is_ok(),
                accepted,
                "owner {owner} mode {mode:o} euid {euid}: {got:?}"
            );
        }
        assert_eq!(
            check_owner_and_mode(1001, 0o644, 1000)
                .unwrap_err()
                .to_string(),
            "file is owned by uid 1001, not by root or berth's user (uid 1000): \
             whoever can write a deployment is root on the device"
        );
    }

    #[test]
    fn a_file_that_is_not_utf8_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.toml");
        fs::write(&path, b"id = \"\xff\"\n").unwrap();
        assert_eq!(
            read_error(&path),
            "file is not UTF-8 text (invalid byte at offset 6)"
        );
    }

    #[test]
    fn a_file_removed_between_listing_and_read_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.toml", &deployment("alpha", &[]));
        write(d, "b.toml", &deployment("beta", &[]));
        let (good, bad) = load_dir_located_with(d, |path| {
            if path.ends_with("a.toml") {
                fs::remove_file(path).unwrap();
            }
            load_listed(path)
        });
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(good.keys().collect::<Vec<_>>(), ["beta"]);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // toml_edit stops at 80 levels (unless its `unbounded` feature is
        // on, which berth must never enable): 10 000 levels of every kind
        // of nesting are one error, parsed on a small stack.
        const DEPTH: usize = 10_000;
        let forms = [
            format!("a = {}1{}\n", "[".repeat(DEPTH), "]".repeat(DEPTH)),
            format!("a = {}1{}\n", "{b = ".repeat(DEPTH), "}".repeat(DEPTH)),
            format!("[{}]\n", vec!["a"; DEPTH].join(".")),
            format!("{} = 1\n", vec!["a"; DEPTH].join(".")),
            format!("[[{}]]\n", vec!["a"; DEPTH].join(".")),
            (0..DEPTH)
                .map(|i| format!("[{}]\n", vec!["a"; i + 1].join(".")))
                .take(200)
                .collect(),
        ];
        let first = forms[0].clone();
        let handle = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || {
                forms
                    .iter()
                    .map(|text| {
                        let agent = parse_agent(Path::new("deep.toml"), text).is_err();
                        let deployment = parse_deployment(Path::new("deep.toml"), text).is_err();
                        agent && deployment
                    })
                    .collect::<Vec<_>>()
            })
            .expect("spawn");
        assert_eq!(handle.join().expect("no stack overflow"), [true; 6]);
        let error = &parse_deployment(Path::new("d.toml"), &first).unwrap_err()[0];
        assert_eq!(
            error.to_string(),
            "d.toml:1:21: arrays and inline tables nested more than 16 levels deep"
        );
    }

    /// Found by fuzzing: a value with a newline made a message of two
    /// lines, which could pass for another error of check-config.
    #[test]
    fn values_in_messages_are_escaped_to_one_line() {
        let text = "device_id = \"\"\"a\n/etc/x.toml:1:1: fake\"\"\"\n";
        let errors = parse_agent(Path::new("b.toml"), text).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            format!(
                "b.toml:1:13: invalid device_id \"a\\n/etc/x.toml:1:1: fake\": {DEVICE_ID_RULE}"
            )
        );
    }

    /// Found by fuzzing: toml's error for a NUL in a comment has no message.
    #[test]
    fn a_control_character_is_named_in_the_error() {
        let errors = parse_deployment(Path::new("d.toml"), "# a comment \0 with a NUL\nid = 1\n")
            .unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "d.toml:1:13: control character U+0000 is not allowed in TOML"
        );
    }

    #[test]
    fn nesting_scan_skips_strings_and_comments() {
        let deep = "[".repeat(MAX_NESTING + 1);
        let ok = "[".repeat(MAX_NESTING);
        // (text, offset of the bracket too deep)
        let rows: Vec<(String, Option<usize>)> = vec![
            (format!("a = {ok}1"), None),
            (format!("a = {deep}"), Some(4 + MAX_NESTING)),
            (format!("a = \"{deep}\""), None),
            (format!("a = '{deep}'"), None),
            (format!("a = \"\"\"\n{deep}\n\"\"\""), None),
            (format!("a = '''{deep}'''"), None),
            (format!("# {deep}\na = 1"), None),
            (format!("a = \"\\\"{deep}\""), None),
            (
                format!("a = \"\"\"x\"\"\"\"\nb = {deep}"),
                Some(17 + MAX_NESTING),
            ),
            (format!("a = \"x\nb = {deep}"), Some(11 + MAX_NESTING)),
            (format!("{}{}{ok}", "]".repeat(50), "}".repeat(50)), None),
        ];
        for (text, want) in rows {
            assert_eq!(too_deep(&text), want, "{text:?}");
        }
    }

    #[test]
    fn missing_deployments_dir_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let (good, bad) = load_deployments_dir(&missing);
        assert!(good.is_empty());
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].0, missing);
        assert_eq!(
            bad[0].1[0].to_string(),
            format!(
                "{}: deployments directory does not exist",
                missing.display()
            )
        );
    }

    #[test]
    fn dependency_problems_finds_unknown_ids_and_cycles() {
        let spec = |id: &str, deps: &[&str]| {
            let dir = tempfile::tempdir().unwrap();
            let path = write(dir.path(), "x.toml", &deployment(id, deps));
            load_deployment(&path).unwrap()
        };
        let deployments: Deployments = [
            spec("a", &["b"]),
            spec("b", &["c", "ghost"]),
            spec("c", &["a"]),
            spec("d", &["a", "e"]),
            spec("e", &["d"]),
            spec("f", &["c"]),
        ]
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect();
        let problems = dependency_problems(&deployments);
        let cycle =
            |ids: &[&str]| DependencyProblem::Cycle(ids.iter().map(|s| s.to_string()).collect());
        assert_eq!(
            problems,
            [
                DependencyProblem::Unknown {
                    deployment: "b".into(),
                    index: 1,
                    dependency: "ghost".into()
                },
                cycle(&["a", "b", "c", "a"]),
                cycle(&["d", "e", "d"]),
            ]
        );
        assert_eq!(
            problems[1].to_string(),
            "dependency cycle: a -> b -> c -> a"
        );
        assert_eq!(problems[1].deployments(), ["a", "b", "c"]);
        assert_eq!(
            problems[0].to_string(),
            "depends on unknown deployment \"ghost\""
        );
    }

    fn agent_with_dir(dir: &Path, agent: &str) -> PathBuf {
        fs::create_dir_all(dir.join("deployments.d")).unwrap();
        write(dir, "berth.toml", agent)
    }

    #[test]
    fn check_all_reports_files_and_dependencies_with_positions() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent_with_dir(
            dir.path(),
            "device_id = \"r\"\ndeployments_dir = \"deployments.d\"\n",
        );
        let d = dir.path().join("deployments.d");
        let a = write(&d, "a.toml", &deployment("a", &["b"]));
        let b = write(&d, "b.toml", &deployment("b", &["x", "a"]));
        let c = write(&d, "c.toml", &deployment("c", &["nobody"]));
        let broken = write(&d, "d.toml", &deployment("BAD", &[]));

        let got: Vec<_> = check_all(&agent).iter().map(|e| e.to_string()).collect();
        assert_eq!(
            got,
            [
                format!(
                    "{}:1:6: invalid deployment id \"BAD\": {ID_RULE}",
                    broken.display()
                ),
                format!("{}:4:15: depends on unknown deployment \"x\"", b.display()),
                format!(
                    "{}:4:15: depends on unknown deployment \"nobody\"",
                    c.display()
                ),
                format!("{}:4:15: dependency cycle: a -> b -> a", a.display()),
            ]
        );
    }

    #[test]
    fn check_all_checks_deployments_even_when_the_agent_config_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent_with_dir(
            dir.path(),
            "device_id = \"r\"\ndeployments_dir = \"deployments.d\"\n[log]\nlevel = \"loud\"\n",
        );
        write(&dir.path().join("deployments.d"), "a.toml", "id = \"a\"\n");
        let errors = check_all(&agent);
        assert_eq!(errors.len(), 2, "{}", messages(&errors));
        assert!(errors[0].message.starts_with("invalid log level"));
        assert!(errors[1].message.contains("missing field `package`"));

        let unparsable = write(dir.path(), "broken.toml", "device_id = \n");
        assert_eq!(check_all(&unparsable).len(), 1);
    }

    #[test]
    fn check_all_reports_a_missing_deployments_dir() {
        let dir = tempfile::tempdir().unwrap();
        let agent = write(
            dir.path(),
            "berth.toml",
            "device_id = \"r\"\ndeployments_dir = \"gone\"\n",
        );
        let errors = check_all(&agent);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, dir.path().join("gone"));
    }

    #[test]
    fn repository_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/berth.toml");
        let errors = check_all(&path);
        assert!(errors.is_empty(), "{}", messages(&errors));

        let config = load_agent(&path).unwrap();
        assert_eq!(config.device_id, "robot-dev");
        assert_eq!(
            config.deployments_dir,
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/deployments.d")
        );
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/berth-dev"));
        let (deployments, bad) = load_deployments_dir(&config.deployments_dir);
        assert!(bad.is_empty());
        assert_eq!(deployments.keys().collect::<Vec<_>>(), ["hello", "ticker"]);
        assert_eq!(deployments["hello"].restart, RestartPolicy::Always);
        assert_eq!(deployments["ticker"].restart, RestartPolicy::OnFailure);
    }
}
