//! The words of the product contract as types: deployment specs, phases,
//! statuses and error codes, plus the one place that names containers and
//! labels them. Nothing here talks to the engine or the broker.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What berth does when an executable's container stops (SPEC 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        })
    }
}

/// When berth asks the registry for an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

/// Deployment phase (SPEC 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    InProgress,
    Provisioning,
    Succeeded,
    FailedToStart,
    FailedToUpdate,
    PartiallyDeprovisioned,
    DeploymentStopped,
}

/// Executable status. The declaration order is the precedence used to derive
/// a deployment's status from its executables (SPEC 5): the first wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Status {
    Error,
    Pending,
    Unknown,
    Stopped,
    Running,
    Completed,
}

/// Phases and statuses print as SPEC 5 names them (their serde names).
impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Status {
    /// A deployment's status from its executables': the first of SPEC 5's
    /// order that any of them has (`Error` before `Pending` before …).
    /// `None` for no executables.
    pub fn worst(statuses: impl IntoIterator<Item = Status>) -> Option<Status> {
        statuses.into_iter().min()
    }
}

/// The error codes of SPEC 5, written once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Device offline: the MQTT last will.
    #[serde(rename = "DEP_E151")]
    DeviceOffline,
    /// An executable exited too early or failed to start.
    #[serde(rename = "DEP_E152")]
    ExecutableFailed,
    /// A dependency of this deployment is in `Error`.
    #[serde(rename = "DEP_E156")]
    DependencyFailed,
    /// The image cannot be found or pulled.
    #[serde(rename = "DEP_E161")]
    ImageUnavailable,
    /// The Docker engine is unreachable.
    #[serde(rename = "DEP_E301")]
    EngineUnreachable,
    /// berth's state store could not be read or written.
    #[serde(rename = "DEP_E302")]
    StateStore,
    /// The deployment file is invalid: syntax, a value, a duplicate id, an
    /// unknown or cyclic dependency, unsafe file permissions, or a remote
    /// deployment outside the `[remote]` limits.
    #[serde(rename = "DEP_E303")]
    InvalidDeployment,
    /// A container could not be stopped or removed (`PartiallyDeprovisioned`).
    #[serde(rename = "DEP_E304")]
    ContainerNotRemoved,
    /// Not enough disk space to pull an image, even after garbage collection.
    #[serde(rename = "DEP_E305")]
    DiskFull,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::DeviceOffline => "DEP_E151",
            ErrorCode::ExecutableFailed => "DEP_E152",
            ErrorCode::DependencyFailed => "DEP_E156",
            ErrorCode::ImageUnavailable => "DEP_E161",
            ErrorCode::EngineUnreachable => "DEP_E301",
            ErrorCode::StateStore => "DEP_E302",
            ErrorCode::InvalidDeployment => "DEP_E303",
            ErrorCode::ContainerNotRemoved => "DEP_E304",
            ErrorCode::DiskFull => "DEP_E305",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an executable's command is given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum Command {
    /// Exec form: handed to the engine as the container's `Cmd`.
    Exec(Vec<String>),
    /// `run_as_bash = true`: run under `/bin/bash -c`.
    Bash(String),
}

impl Command {
    /// The argv handed to the engine.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Exec(argv) => argv.clone(),
            Command::Bash(line) => vec!["/bin/bash".into(), "-c".into(), line.clone()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Limits {
    pub cpus: Option<f64>,
    pub memory_mb: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Volume {
    pub host: String,
    pub container: String,
    pub read_only: bool,
}

/// How the executables of a component are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// The host's network: executables reach each other (and the robot's
    /// other programs) on `localhost`.
    #[default]
    Host,
    /// A bridge network of the component's own: executables reach each other
    /// by executable name, and nothing else shares their ports.
    Isolated,
}

/// One container's worth of spec.
///
/// Its JSON form is hashed into the `berth.spec-hash` label ([`spec_hash`]),
/// so it is a pinned format: a field added after 0.1.0 (here, in [`Limits`],
/// [`Volume`] or [`Command`]) must be left out of the JSON while it has its
/// default value, with `#[serde(skip_serializing_if = "...")]`, or every
/// container on every robot is recreated on upgrade. The fields of 0.1.0 keep
/// their form, `null`s included. `spec_hash_pins` checks it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecutableSpec {
    pub name: String,
    pub image: String,
    pub pull: PullPolicy,
    pub command: Option<Command>,
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
    pub volumes: Vec<Volume>,
    pub devices: Vec<String>,
    /// The component's `network`, carried here so that it is part of the
    /// spec hash: changing it recreates the containers.
    pub network: Network,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentSpec {
    pub name: String,
    pub executables: Vec<ExecutableSpec>,
}

/// A validated deployment file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentSpec {
    pub id: String,
    pub package: String,
    pub package_version: String,
    pub restart: RestartPolicy,
    pub depends_on: Vec<String>,
    pub ros: bool,
    pub env: BTreeMap<String, String>,
    pub exports: BTreeMap<String, String>,
    pub components: Vec<ComponentSpec>,
    /// `[update]`: how long a new version must prove itself.
    pub update: UpdateSpec,
    /// The file it came from, for messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// How a changed deployment is kept or rolled back (SPEC 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UpdateSpec {
    /// How long a new version must run (and be healthy, with a probe) to be
    /// kept; the previous container is removed only then.
    pub min_ready_secs: u64,
}

impl UpdateSpec {
    pub const DEFAULT_MIN_READY_SECS: u64 = 10;

    pub fn min_ready(&self) -> Duration {
        Duration::from_secs(self.min_ready_secs)
    }
}

impl Default for UpdateSpec {
    fn default() -> Self {
        UpdateSpec {
            min_ready_secs: Self::DEFAULT_MIN_READY_SECS,
        }
    }
}

impl DeploymentSpec {
    /// Every executable with its component's name, in file order.
    pub fn executables(&self) -> impl Iterator<Item = (&ComponentSpec, &ExecutableSpec)> {
        self.components
            .iter()
            .flat_map(|c| c.executables.iter().map(move |e| (c, e)))
    }
}

/// Identifies one executable on the device.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExecKey {
    pub deployment: String,
    pub component: String,
    pub executable: String,
}

impl ExecKey {
    pub fn new(deployment: &str, component: &str, executable: &str) -> Self {
        ExecKey {
            deployment: deployment.into(),
            component: component.into(),
            executable: executable.into(),
        }
    }
}

impl fmt::Display for ExecKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.deployment, self.component, self.executable
        )
    }
}

/// The bridge network of an isolated component: `berth.<device>.<deployment>.<component>`.
pub fn network_name(device_id: &str, key: &ExecKey) -> String {
    format!("berth.{device_id}.{}.{}", key.deployment, key.component)
}

/// Label keys berth puts on every container it creates.
pub mod labels {
    pub const DEVICE: &str = "berth.device";
    pub const DEPLOYMENT: &str = "berth.deployment";
    pub const COMPONENT: &str = "berth.component";
    pub const EXECUTABLE: &str = "berth.executable";
    pub const SPEC_HASH: &str = "berth.spec-hash";
}

/// The shared ROS master is supervised as this internal deployment; the
/// underscore keeps it apart from every deployment id a file can give.
pub const ROS_MASTER_DEPLOYMENT: &str = "_ros";

/// The executable key of the shared ROS master.
pub fn ros_master_key() -> ExecKey {
    ExecKey::new(ROS_MASTER_DEPLOYMENT, "ros", "master")
}

/// The container name of SPEC 4: `berth.<device>.<deployment>.<component>.<executable>`,
/// and `berth.<device>.ros-master` for the shared ROS master.
pub fn container_name(device_id: &str, key: &ExecKey) -> String {
    if key.deployment == ROS_MASTER_DEPLOYMENT {
        return format!("berth.{device_id}.ros-master");
    }
    format!(
        "berth.{device_id}.{}.{}.{}",
        key.deployment, key.component, key.executable
    )
}

/// The labels of SPEC 4 for one executable's container.
pub fn container_labels(
    device_id: &str,
    key: &ExecKey,
    spec_hash: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::DEVICE.to_string(), device_id.to_string()),
        (labels::DEPLOYMENT.to_string(), key.deployment.clone()),
        (labels::COMPONENT.to_string(), key.component.clone()),
        (labels::EXECUTABLE.to_string(), key.executable.clone()),
        (labels::SPEC_HASH.to_string(), spec_hash.to_string()),
    ])
}

/// Reads an executable's key back from a container's labels.
pub fn key_from_labels(labels: &BTreeMap<String, String>) -> Option<ExecKey> {
    Some(ExecKey {
        deployment: labels.get(labels::DEPLOYMENT)?.clone(),
        component: labels.get(labels::COMPONENT)?.clone(),
        executable: labels.get(labels::EXECUTABLE)?.clone(),
    })
}

/// A stable hash of what the container is made from: the executable's spec
/// and the environment it is given. Equal hashes mean nothing to recreate.
/// The first 8 bytes of the SHA-256 of the JSON of `(spec, env)`, in hex;
/// pinned across versions (see [`ExecutableSpec`]).
pub fn spec_hash(exe: &ExecutableSpec, env: &BTreeMap<String, String>) -> String {
    let json = serde_json::to_vec(&(exe, env)).expect("specs serialize");
    let digest = Sha256::digest(json);
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_precedence_follows_the_spec() {
        let order = [
            Status::Error,
            Status::Pending,
            Status::Unknown,
            Status::Stopped,
            Status::Running,
            Status::Completed,
        ];
        for pair in order.windows(2) {
            assert!(
                pair[0] < pair[1],
                "{:?} must come before {:?}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn container_name_is_the_spec_form() {
        let key = ExecKey::new("talker", "comp", "exe");
        assert_eq!(
            container_name("robot-42", &key),
            "berth.robot-42.talker.comp.exe"
        );
        let labels = container_labels("robot-42", &key, "abc");
        assert_eq!(key_from_labels(&labels), Some(key));
    }

    #[test]
    fn error_codes_serialize_as_spec_strings() {
        for code in [
            ErrorCode::DeviceOffline,
            ErrorCode::ExecutableFailed,
            ErrorCode::DependencyFailed,
            ErrorCode::ImageUnavailable,
            ErrorCode::EngineUnreachable,
            ErrorCode::StateStore,
            ErrorCode::InvalidDeployment,
            ErrorCode::ContainerNotRemoved,
            ErrorCode::DiskFull,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}

/// Spec hashes pinned with the code of berth 0.1.0: a change of any of them
/// recreates every container of that shape on upgrade, so it must be a
/// deliberate decision (see docs/DESIGN.md, "The spec hash").
#[cfg(test)]
mod spec_hash_pins {
    use super::*;

    fn minimal() -> ExecutableSpec {
        ExecutableSpec {
            name: "talker".into(),
            image: "registry.example.com/talker:1.0".into(),
            pull: PullPolicy::IfNotPresent,
            command: None,
            env: BTreeMap::new(),
            limits: Limits::default(),
            volumes: Vec::new(),
            devices: Vec::new(),
            network: Network::Host,
        }
    }

    fn full() -> ExecutableSpec {
        ExecutableSpec {
            name: "map-server".into(),
            image: "127.0.0.1:5000/berth/busybox:1".into(),
            pull: PullPolicy::Always,
            command: Some(Command::Exec(vec![
                "roslaunch".into(),
                "talker".into(),
                "talker.launch".into(),
            ])),
            env: BTreeMap::from([
                ("LOG_LEVEL".into(), "debug".into()),
                ("UNICODE".into(), "é \"quoted\" \n".into()),
            ]),
            limits: Limits {
                cpus: Some(0.5),
                memory_mb: Some(256),
            },
            volumes: vec![
                Volume {
                    host: "/data/maps".into(),
                    container: "/maps".into(),
                    read_only: true,
                },
                Volume {
                    host: "/tmp".into(),
                    container: "/scratch".into(),
                    read_only: false,
                },
            ],
            devices: vec!["/dev/ttyUSB0".into()],
            network: Network::Isolated,
        }
    }

    fn bash() -> ExecutableSpec {
        ExecutableSpec {
            name: "ticker".into(),
            image: "busybox".into(),
            pull: PullPolicy::Never,
            command: Some(Command::Bash("while true; do date; sleep 1; done".into())),
            limits: Limits {
                cpus: None,
                memory_mb: Some(64),
            },
            ..minimal()
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn spec_hashes_are_those_of_0_1_0() {
        let rows = [
            (minimal(), env(&[]), "c5a56816cb2542b2"),
            (
                minimal(),
                env(&[("ROS_MASTER_URI", "http://localhost:11311")]),
                "1b1975e44df35db6",
            ),
            (
                full(),
                env(&[("LOG_LEVEL", "debug"), ("ROBOT", "r42")]),
                "257cd7c03d190775",
            ),
            (bash(), env(&[("A", "1")]), "ae67802381802014"),
        ];
        for (i, (exe, env, want)) in rows.iter().enumerate() {
            let got = spec_hash(exe, env);
            assert_eq!(&got, want, "row {i}: the spec hash of {exe:?} changed");
        }
    }
}
