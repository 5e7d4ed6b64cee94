//! Agent config (`berth.toml`) and deployment files, in two stages: raw serde
//! structs that mirror the TOML (unknown keys rejected), then validated
//! settings. Every error names the file, line and column.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::DeploymentSpec;

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
    /// The file it came from.
    pub source: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DockerSettings {
    /// `unix:///path` or `tcp://host:port`.
    pub host: String,
    pub registries: Vec<RegistrySettings>,
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
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
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

/// Deployment files of a directory, loaded one by one so that a broken file
/// affects its deployment alone.
pub type Deployments = BTreeMap<String, DeploymentSpec>;
