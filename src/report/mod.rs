//! What berth reports, and the trait it reports through. The documents are the
//! payloads of SPEC 9; `report::mqtt` carries them to the broker. Reporting
//! never blocks the supervisor: a reporter keeps the latest document of each
//! topic and delivers it when it can.

pub mod mqtt;

use serde::Serialize;

use crate::model::{ErrorCode, Phase, RestartPolicy, Status};

/// A topic below `<topic_prefix>/<device_id>/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Topic {
    Agent,
    Deployment(String),
    RosMaster,
    Events,
}

impl Topic {
    /// The full topic name: the one place topics are built.
    pub fn path(&self, prefix: &str, device_id: &str) -> String {
        match self {
            Topic::Agent => format!("{prefix}/{device_id}/agent"),
            Topic::Deployment(id) => format!("{prefix}/{device_id}/deployments/{id}"),
            Topic::RosMaster => format!("{prefix}/{device_id}/shared/ros-master"),
            Topic::Events => format!("{prefix}/{device_id}/events"),
        }
    }

    /// Every topic but `events` is retained.
    pub fn retained(&self) -> bool {
        !matches!(self, Topic::Events)
    }
}

/// Where berth's documents go. `publish` must return at once.
pub trait Reporter: Send + Sync + 'static {
    /// Replaces the latest document of a retained topic, or queues an event.
    fn publish(&self, topic: Topic, payload: serde_json::Value);
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentDoc {
    pub state: &'static str,
    pub version: &'static str,
    pub boot_id: String,
    /// `connected` or `unreachable`.
    pub docker: &'static str,
    pub since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<ErrorCode>,
}

/// The last will, and what berth publishes itself when it stops.
pub fn offline_doc() -> serde_json::Value {
    serde_json::json!({"state": "offline", "error_code": ErrorCode::DeviceOffline})
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExecutableDoc {
    pub component: String,
    pub name: String,
    pub container_id: Option<String>,
    pub image: String,
    pub status: Status,
    pub reason: Option<String>,
    pub error_code: Option<ErrorCode>,
    pub exit_code: Option<i64>,
    pub restart_count: u64,
    pub started_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeploymentDoc {
    pub device_id: String,
    pub deployment_id: String,
    pub package: String,
    pub package_version: String,
    pub phase: Phase,
    pub status: Status,
    pub error_code: Option<ErrorCode>,
    pub reason: Option<String>,
    pub restart_policy: RestartPolicy,
    pub restart_count: u64,
    pub executables: Vec<ExecutableDoc>,
    pub updated_at: String,
}

/// RFC 3339 UTC with milliseconds, the form of every time in the documents.
pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A reporter that keeps what it was given, for unit tests.
#[derive(Debug, Default)]
pub struct MemoryReporter {
    pub published: std::sync::Mutex<Vec<(Topic, serde_json::Value)>>,
}

impl Reporter for MemoryReporter {
    fn publish(&self, topic: Topic, payload: serde_json::Value) {
        self.published.lock().unwrap().push((topic, payload));
    }
}

impl MemoryReporter {
    /// The latest document of a topic.
    pub fn latest(&self, topic: &Topic) -> Option<serde_json::Value> {
        self.published
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(t, _)| t == topic)
            .map(|(_, v)| v.clone())
    }
}
