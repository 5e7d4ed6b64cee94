//! What berth reports, and the trait it reports through. The documents are the
//! payloads of SPEC 9; `report::mqtt` carries them to the broker. Reporting
//! never blocks the supervisor: a reporter keeps the latest document of each
//! topic and delivers it when it can.

pub mod mqtt;

use serde::{Deserialize, Serialize};

use crate::model::{ErrorCode, Phase, RestartPolicy, Status};

/// A topic below `<topic_prefix>/<device_id>/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Topic {
    Agent,
    Deployment(String),
    RosMaster,
    Events,
    Metrics,
}

impl Topic {
    /// The full topic name: the one place topics are built.
    pub fn path(&self, prefix: &str, device_id: &str) -> String {
        match self {
            Topic::Agent => format!("{prefix}/{device_id}/agent"),
            Topic::Deployment(id) => format!("{prefix}/{device_id}/deployments/{id}"),
            Topic::RosMaster => format!("{prefix}/{device_id}/shared/ros-master"),
            Topic::Events => format!("{prefix}/{device_id}/events"),
            Topic::Metrics => format!("{prefix}/{device_id}/metrics"),
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

/// The `agent` document. Every field but `state` is absent from the offline
/// document (the last will), hence the defaults when it is read back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentDoc {
    /// `online` or `offline`.
    pub state: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub boot_id: String,
    /// `connected` or `unreachable`.
    #[serde(default)]
    pub docker: String,
    #[serde(default)]
    pub since: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<ErrorCode>,
}

/// The last will, and what berth publishes itself when it stops.
pub fn offline_doc() -> serde_json::Value {
    #[derive(Serialize)]
    struct Offline {
        state: &'static str,
        error_code: ErrorCode,
    }
    serde_json::to_value(Offline {
        state: "offline",
        error_code: ErrorCode::DeviceOffline,
    })
    .expect("documents serialize")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The liveness probe's verdict (`healthy`, `unhealthy`, `starting`);
    /// null without a probe.
    #[serde(default)]
    pub health: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// After an update that failed and was rolled back; null otherwise.
    #[serde(default)]
    pub update: Option<UpdateDoc>,
    pub updated_at: String,
}

/// The `update` object of a deployment document (SPEC 9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateDoc {
    /// The version that failed.
    pub package_version: String,
    /// `rolled-back`.
    pub state: String,
    pub reason: String,
    pub error_code: Option<ErrorCode>,
    pub at: String,
}

/// The `metrics` document (SPEC 9): one per `[metrics] interval_secs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsDoc {
    pub device_id: String,
    pub time: String,
    pub interval_secs: u64,
    /// The engine's data root; null when the engine did not say.
    pub data_root: Option<DataRootDoc>,
    pub executables: Vec<ExecMetricsDoc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRootDoc {
    pub path: String,
    pub size_bytes: u64,
    pub free_bytes: u64,
}

/// One executable's figures; those of a container that is not running are null.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecMetricsDoc {
    pub deployment: String,
    pub component: String,
    pub executable: String,
    pub status: Status,
    /// Percent of one core since the previous document (200 = two cores);
    /// null for the first reading of a run.
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub restart_count: u64,
    /// Seconds since its container's last start, while it runs.
    pub uptime_secs: Option<u64>,
    /// Time `Running` / time deployed over the last 24 h (0 to 1).
    pub availability: Option<f64>,
    pub health: Option<String>,
}

/// The `shared/ros-master` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosMasterDoc {
    pub device_id: String,
    /// The policy of the deployment that brought the master up.
    pub policy: RestartPolicy,
    /// That deployment.
    pub owner: Option<String>,
    /// The ROS deployments using it, in id order.
    pub users: Vec<String>,
    pub status: Status,
    pub reason: Option<String>,
    pub error_code: Option<ErrorCode>,
    pub container_id: Option<String>,
    pub restart_count: u64,
    pub updated_at: String,
}

/// One message on the `events` topic: what happened, when, on which device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventDoc {
    pub device_id: String,
    pub time: String,
    #[serde(flatten)]
    pub event: Event,
}

/// Every kind of event berth sends, tagged by `event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// berth starts an executable again; the restart is counted.
    Restart {
        deployment: String,
        component: String,
        executable: String,
        /// The exit that led to it; null after an interruption or a failed start.
        exit_code: Option<i64>,
        reason: String,
        restart_count: u64,
        /// Who asked, for a restart an operator asked for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        /// The crash evidence of the exit, read once right after it (SPEC 9).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oom_killed: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_tail: Option<Vec<String>>,
    },
    /// A counted restart whose start the engine accepted.
    Restarted {
        deployment: String,
        component: String,
        executable: String,
        restart_count: u64,
    },
    /// Stopped by anyone but berth (an operator's `stop` included): the
    /// policy is suspended until a start or a reboot.
    ManualStop {
        deployment: String,
        component: String,
        executable: String,
        exit_code: Option<i64>,
        reason: String,
        /// Who asked, for an operator's `stop`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        /// The crash evidence of the exit, read once right after it (SPEC 9).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oom_killed: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_tail: Option<Vec<String>>,
    },
    /// An operator started an executable again; the policy applies again.
    Start {
        deployment: String,
        component: String,
        executable: String,
        reason: String,
        by: String,
    },
    /// An update failed and the previous version runs again.
    Rollback {
        deployment: String,
        component: String,
        executable: String,
        /// The version that failed.
        package_version: String,
        error_code: ErrorCode,
        reason: String,
    },
    /// A deployment's phase changed.
    Phase {
        deployment: String,
        phase: Phase,
        reason: Option<String>,
    },
    /// Something failed; `deployment` and below say where, when it is known.
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deployment: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        component: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        executable: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error_code: Option<ErrorCode>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i64>,
        reason: String,
        /// The crash evidence of the exit, read once right after it (SPEC 9).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oom_killed: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        log_tail: Option<Vec<String>>,
    },
}

impl Event {
    /// An `error` event about one executable.
    pub fn exec_error(
        key: &crate::model::ExecKey,
        error_code: ErrorCode,
        exit_code: Option<i64>,
        reason: String,
    ) -> Event {
        Event::Error {
            deployment: Some(key.deployment.clone()),
            component: Some(key.component.clone()),
            executable: Some(key.executable.clone()),
            error_code: Some(error_code),
            exit_code,
            reason,
            signal: None,
            oom_killed: None,
            log_tail: None,
        }
    }

    /// Adds an exit's crash evidence (signal, OOM kill, last log lines) to a
    /// `restart`, `manual_stop` or `error` event; other events are unchanged.
    pub fn with_evidence(mut self, evidence: Option<&crate::runtime::ExitEvidence>) -> Event {
        let Some(evidence) = evidence else {
            return self;
        };
        match &mut self {
            Event::Restart {
                signal,
                oom_killed,
                log_tail,
                ..
            }
            | Event::ManualStop {
                signal,
                oom_killed,
                log_tail,
                ..
            }
            | Event::Error {
                signal,
                oom_killed,
                log_tail,
                ..
            } => {
                *signal = evidence.signal.clone();
                *oom_killed = Some(evidence.oom_killed);
                *log_tail = Some(evidence.log_tail.clone());
            }
            _ => {}
        }
        self
    }

    /// A `restart`, `manual_stop` or `error` event that carries an exit's
    /// evidence.
    pub fn has_evidence(&self) -> bool {
        matches!(
            self,
            Event::Restart {
                log_tail: Some(_),
                ..
            } | Event::ManualStop {
                log_tail: Some(_),
                ..
            } | Event::Error {
                log_tail: Some(_),
                ..
            }
        )
    }

    /// Sets the log tail of an event that carries an exit's evidence.
    pub fn set_log_tail(&mut self, lines: Vec<String>) {
        if let Event::Restart { log_tail, .. }
        | Event::ManualStop { log_tail, .. }
        | Event::Error { log_tail, .. } = self
        {
            *log_tail = Some(lines);
        }
    }

    /// An `error` event about the device or berth itself.
    pub fn device_error(error_code: Option<ErrorCode>, reason: String) -> Event {
        Event::Error {
            deployment: None,
            component: None,
            executable: None,
            error_code,
            exit_code: None,
            reason,
            signal: None,
            oom_killed: None,
            log_tail: None,
        }
    }
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
