//! Operator actions (SPEC 2 and 10): `stop`, `start` and `restart` of one
//! deployment or one executable, asked for on the control socket (`berth
//! stop ...`) or by a signed remote command, and carried out by the loop with
//! the machinery of the manual rows of SPEC 6.
//!
//! - `stop`: berth stops the container on the operator's behalf; the
//!   executable is `Stopped` ("stopped manually; restart policy suspended
//!   until reboot") until a `start` or a reboot, exactly as after a
//!   `docker stop`.
//! - `start`: a start by hand; the policy applies again, not counted.
//! - `restart`: stop and start now, counted; its `restart` event says who
//!   asked (`by`).
//!
//! Each goes through the executable's lifecycle (`lifecycle.rs`):
//! - a `stop` of a running executable is the engine's stop of its container,
//!   whose `kill` and `die` the table reads as any stop by someone else
//!   (`Suspended`, a `manual_stop` event, the state written at once); an
//!   executable that runs nothing is suspended as after a removal by hand;
//! - a `start` is the `Launch` of a start by hand (not counted);
//! - a `restart` commits a counted restart (durably, with its event naming
//!   who asked), then stops and starts the container while the executable
//!   is `Starting`, so the events of that stop are not read as an exit.
//!
//! The loop never waits: engine calls run as tasks, and the request travels
//! on as messages (`OperatorMsg`) until its effect is there; then the reply
//! carries the deployment's document.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::info;

use super::converge::STOP_GRACE_SECS;
use super::lifecycle::{Input, Life, Shown};
use super::{Msg, Supervisor};
use crate::model::{ErrorCode, ExecKey, Status, ROS_MASTER_DEPLOYMENT};
use crate::report::{Event, Reporter};
use crate::runtime::{ContainerRuntime, RuntimeError};

/// How long a request waits for executables busy with another engine call.
const BUSY_WAIT: Duration = Duration::from_secs(30);
/// How long the reply waits for the starts an action began.
const SETTLE_WAIT: Duration = Duration::from_secs(60);
/// Between two looks at a request that waits.
const RECHECK: Duration = Duration::from_millis(20);

/// What an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Stop,
    Start,
    Restart,
    /// Nothing: the deployment's document as it is.
    Document,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Stop => "stop",
            Action::Start => "start",
            Action::Restart => "restart",
            Action::Document => "document",
        }
    }

    /// `stop`, `start` or `restart`.
    pub fn parse(word: &str) -> Option<Action> {
        match word {
            "stop" => Some(Action::Stop),
            "start" => Some(Action::Start),
            "restart" => Some(Action::Restart),
            _ => None,
        }
    }
}

/// One operator action on a deployment, or on one of its executables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRequest {
    pub action: Action,
    pub deployment: String,
    /// `NAME` or `COMPONENT/NAME`; every executable when `None`.
    pub executable: Option<String>,
    /// Who asked, for the events: `berth restart (local)`, or the key id of
    /// a remote command.
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorError {
    #[error("no deployment {deployment} on this device")]
    NoDeployment { deployment: String },
    #[error("deployment {deployment} has no executable {executable}; it has {choices}")]
    NoExecutable {
        deployment: String,
        executable: String,
        choices: String,
    },
    #[error(
        "deployment {deployment} has several executables named {executable}; name one of {choices}"
    )]
    Ambiguous {
        deployment: String,
        executable: String,
        choices: String,
    },
    #[error("deployment {deployment} has no executable to {action} ({reason})")]
    NotRunnable {
        deployment: String,
        action: &'static str,
        reason: String,
    },
    #[error("the docker engine is unreachable; try again when it answers")]
    EngineDown,
    #[error("{executable} stayed busy with another engine call; try again")]
    Busy { executable: String },
    #[error("berth is stopping")]
    Stopped,
}

/// The deployment's document after the action, or why there is none.
pub type OperatorReply = Result<serde_json::Value, OperatorError>;

/// Sends operator actions to a running supervisor; cheap to clone.
#[derive(Debug, Clone)]
pub struct Operator(mpsc::UnboundedSender<Msg>);

impl Operator {
    /// Carries out `request` and answers once its effect is there: stopped
    /// containers stopped, started ones running (or failed to start).
    pub async fn request(&self, request: OperatorRequest) -> OperatorReply {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Msg::Operator(OperatorMsg::Request(request, reply)))
            .map_err(|_| OperatorError::Stopped)?;
        answer.await.map_err(|_| OperatorError::Stopped)?
    }

    /// Re-reads the files, then answers with `deployment`'s document as it
    /// stands right after that reload (messages are handled in order).
    pub async fn reload_then_document(&self, deployment: &str) -> OperatorReply {
        self.0
            .send(Msg::Reload)
            .map_err(|_| OperatorError::Stopped)?;
        self.request(OperatorRequest {
            action: Action::Document,
            deployment: deployment.to_string(),
            executable: None,
            by: String::new(),
        })
        .await
    }
}

/// The messages of an operator action through the loop.
#[derive(Debug)]
pub(super) enum OperatorMsg {
    Request(OperatorRequest, oneshot::Sender<OperatorReply>),
    /// A request whose executables were busy, tried again until `deadline`.
    Retry {
        request: OperatorRequest,
        reply: oneshot::Sender<OperatorReply>,
        deadline: Instant,
    },
    /// Waiting for the effect of the action.
    Settle(Pending),
}

#[derive(Debug)]
pub(super) struct Pending {
    request: OperatorRequest,
    reply: oneshot::Sender<OperatorReply>,
    keys: Vec<ExecKey>,
    deadline: Instant,
}

/// Whose container runs.
fn running(life: &Life) -> bool {
    matches!(life, Life::Running { .. } | Life::Proving { .. })
}

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    /// A handle that carries out operator actions.
    pub fn operator(&self) -> Operator {
        Operator(self.tx.clone())
    }

    pub(super) fn on_operator(&mut self, msg: OperatorMsg) {
        match msg {
            OperatorMsg::Request(request, reply) => {
                let deadline = Instant::now() + BUSY_WAIT;
                self.operator_begin(request, reply, deadline)
            }
            OperatorMsg::Retry {
                request,
                reply,
                deadline,
            } => self.operator_begin(request, reply, deadline),
            OperatorMsg::Settle(pending) => self.operator_settle(pending),
        }
    }

    fn operator_begin(
        &mut self,
        request: OperatorRequest,
        reply: oneshot::Sender<OperatorReply>,
        deadline: Instant,
    ) {
        if request.action == Action::Document {
            // The files of a reload asked for before are read off the loop:
            // the document answers once they are applied.
            if self.reloaded_seq < self.reload_seq && Instant::now() < deadline {
                self.operator_later(OperatorMsg::Retry {
                    request,
                    reply,
                    deadline,
                });
                return;
            }
            let _ = reply.send(self.operator_document(&request.deployment));
            return;
        }
        let keys = match self.operator_targets(&request) {
            Ok(keys) => keys,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if !self.engine_up {
            let _ = reply.send(Err(OperatorError::EngineDown));
            return;
        }
        // Another engine call for one of them (a start, an update): wait
        // for it, so that each executable keeps one ordered history.
        if let Some(busy) = keys
            .iter()
            .find(|k| self.exec_mut(k).is_some_and(|e| e.busy()))
        {
            if Instant::now() >= deadline {
                let _ = reply.send(Err(OperatorError::Busy {
                    executable: busy.to_string(),
                }));
                return;
            }
            self.operator_later(OperatorMsg::Retry {
                request,
                reply,
                deadline,
            });
            return;
        }
        info!(
            action = request.action.as_str(),
            deployment = %request.deployment,
            executable = request.executable.as_deref().unwrap_or("*"),
            by = %request.by,
            "operator action"
        );
        let by = request.by.clone();
        let mut stops = Vec::new();
        for key in &keys {
            let Some(exec) = self.exec_mut(key) else {
                continue;
            };
            let container = exec.container_id().map(str::to_string);
            match (request.action, container) {
                (Action::Stop, Some(id)) if running(&exec.life) => {
                    // Its `manual_stop` says who asked.
                    exec.stop_by = Some(by.clone());
                    stops.push(id);
                }
                (Action::Stop, _) => {
                    if !matches!(exec.life, Life::Suspended { .. }) {
                        exec.stop_by = Some(by.clone());
                        // Nothing runs: suspended as after a removal by hand.
                        self.feed(key, Input::Removed);
                    }
                }
                (Action::Start, _) => self.operator_start(key, &by),
                (Action::Restart, container) => self.operator_restart(key, container, &by),
                (Action::Document, _) => {}
            }
        }
        if !stops.is_empty() {
            // The engine's stop: its kill and die come back as events, and
            // the lifecycle reads them as a stop by hand.
            let runtime = self.runtime.clone();
            self.tracker.spawn(async move {
                for id in stops {
                    if let Err(e) = runtime.stop(&id, STOP_GRACE_SECS).await {
                        if !matches!(e, RuntimeError::NotFound(_)) {
                            tracing::warn!(error = %e, "operator stop: engine refused");
                        }
                    }
                }
            });
        }
        self.operator_settle(Pending {
            request,
            reply,
            keys,
            deadline: Instant::now() + SETTLE_WAIT,
        });
    }

    /// Replies once the action's effect is there: no target busy with an
    /// engine call, and for a stop, none running.
    fn operator_settle(&mut self, pending: Pending) {
        let stop = pending.request.action == Action::Stop;
        let waiting = pending.keys.iter().any(|k| {
            self.exec_mut(k)
                .is_some_and(|e| e.busy() || (stop && running(&e.life)))
        });
        if waiting && Instant::now() < pending.deadline {
            self.operator_later(OperatorMsg::Settle(pending));
            return;
        }
        let document = self.operator_document(&pending.request.deployment);
        let _ = pending.reply.send(document);
    }

    /// Looks at a waiting request again a moment later.
    fn operator_later(&self, msg: OperatorMsg) {
        let tx = self.tx.clone();
        self.tracker.spawn(async move {
            tokio::time::sleep(RECHECK).await;
            let _ = tx.send(Msg::Operator(msg));
        });
    }

    /// A start by hand: the policy applies again; not counted.
    fn operator_start(&mut self, key: &ExecKey, by: &str) {
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        if running(&exec.life) {
            return;
        }
        info!(executable = %key, by, "started by the operator");
        self.exec_event(
            key,
            Event::Start {
                deployment: key.deployment.clone(),
                component: key.component.clone(),
                executable: key.executable.clone(),
                reason: "started by the operator".into(),
                by: by.to_string(),
            },
        );
        self.feed(key, Input::Launch { restart: None });
    }

    /// Starts an executable again now, counted like any restart (the count
    /// and the commitment in one durable write before the engine is asked);
    /// the restart event names who asked. A running container is stopped
    /// and started again by one task while the executable is `Starting`.
    fn operator_restart(&mut self, key: &ExecKey, container: Option<String>, by: &str) {
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        let was_running = running(&exec.life);
        let restart_count = exec.count_restart();
        exec.life = Life::Starting {
            counted: true,
            then: None,
        };
        exec.shown = Shown::new(
            Status::Pending,
            Some("restarting at the operator's request".into()),
            None,
        );
        info!(executable = %key, by, restart_count, "restarting at the operator's request");
        self.exec_event(
            key,
            Event::Restart {
                deployment: key.deployment.clone(),
                component: key.component.clone(),
                executable: key.executable.clone(),
                exit_code: None,
                reason: "restarting at the operator's request".into(),
                restart_count,
                by: Some(by.to_string()),
                signal: None,
                oom_killed: None,
                log_tail: None,
            },
        );
        self.mark_dirty(&key.deployment);
        match container.filter(|_| was_running) {
            Some(id) => {
                // The count and the commitment are on disk before the
                // engine is asked, as for any restart.
                self.commit_restart(key, true);
                let durable = self.durable_commitment(key);
                let runtime = self.runtime.clone();
                let tx = self.tx.clone();
                let key = key.clone();
                self.tracker.spawn(async move {
                    if !durable.await {
                        return;
                    }
                    let result = async {
                        runtime.stop(&id, STOP_GRACE_SECS).await?;
                        runtime.start(&id).await?;
                        runtime.inspect(&id).await
                    }
                    .await;
                    let _ = tx.send(Msg::Launched {
                        key,
                        container_id: Some(id),
                        result,
                    });
                });
            }
            // Nothing runs: started (created if need be) as any restart.
            None => self.launch(key),
        }
    }

    /// The executables a request is about.
    fn operator_targets(&self, request: &OperatorRequest) -> Result<Vec<ExecKey>, OperatorError> {
        let id = &request.deployment;
        let dep = self
            .deployments
            .get(id)
            .filter(|_| *id != ROS_MASTER_DEPLOYMENT)
            .ok_or_else(|| OperatorError::NoDeployment {
                deployment: id.clone(),
            })?;
        let action = request.action.as_str();
        if dep.removing {
            return Err(OperatorError::NotRunnable {
                deployment: id.clone(),
                action,
                reason: "it is being deprovisioned".into(),
            });
        }
        if dep.execs.is_empty() {
            return Err(OperatorError::NotRunnable {
                deployment: id.clone(),
                action,
                reason: dep
                    .failure
                    .clone()
                    .unwrap_or_else(|| format!("phase {:?}", dep.phase)),
            });
        }
        let label = |k: &ExecKey| format!("{}/{}", k.component, k.executable);
        let all: Vec<ExecKey> = dep.execs.iter().map(|e| e.key.clone()).collect();
        let Some(wanted) = &request.executable else {
            return Ok(all);
        };
        let choices = || all.iter().map(label).collect::<Vec<_>>().join(", ");
        let matching: Vec<ExecKey> = all
            .iter()
            .filter(|k| label(k) == *wanted || k.executable == *wanted)
            .cloned()
            .collect();
        match matching.len() {
            0 => Err(OperatorError::NoExecutable {
                deployment: id.clone(),
                executable: wanted.clone(),
                choices: choices(),
            }),
            1 => Ok(matching),
            _ => Err(OperatorError::Ambiguous {
                deployment: id.clone(),
                executable: wanted.clone(),
                choices: choices(),
            }),
        }
    }

    /// The document of a deployment as it would be published now.
    fn operator_document(&self, id: &str) -> OperatorReply {
        let dep = self
            .deployments
            .get(id)
            .filter(|_| id != ROS_MASTER_DEPLOYMENT)
            .ok_or_else(|| OperatorError::NoDeployment {
                deployment: id.to_string(),
            })?;
        let (_, mut doc) = dep.document(&self.config.device_id);
        if let Some(failed) = self.failed_dependency(id) {
            doc.status = Status::Error;
            doc.error_code = Some(ErrorCode::DependencyFailed);
            doc.reason = Some(format!("{failed} is in Error"));
        }
        Ok(serde_json::to_value(doc).expect("documents serialize"))
    }
}

#[cfg(test)]
mod tests {
    //! Operator actions driven through the loop against the fake engine.

    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    use serde_json::Value;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::report::{MemoryReporter, Topic};
    use crate::runtime::fake::{Call, FakeRuntime};
    use crate::state::StateStore;
    use crate::supervisor::Parts;

    const IMAGE: &str = "registry.example.com/app:1.0";
    const NAME: &str = "berth.robot-1.app.main.app";

    fn request(action: Action, executable: Option<&str>) -> OperatorRequest {
        OperatorRequest {
            action,
            deployment: "app".into(),
            executable: executable.map(str::to_string),
            by: "test".into(),
        }
    }

    struct Loop {
        runtime: Arc<FakeRuntime>,
        reporter: Arc<MemoryReporter>,
        operator: Operator,
        token: CancellationToken,
    }

    fn start(dir: &Path) -> Loop {
        let agent = dir.join("berth.toml");
        std::fs::create_dir_all(dir.join("deployments.d")).unwrap();
        std::fs::write(
            &agent,
            "device_id = \"robot-1\"\ndeployments_dir = \"deployments.d\"\nstate_dir = \"state\"\n\
             [restart]\nbackoff_initial_ms = 100\nbackoff_max_secs = 1\n",
        )
        .unwrap();
        let file = dir.join("deployments.d/app.toml");
        std::fs::write(
            &file,
            format!(
                "id = \"app\"\npackage = \"p\"\npackage_version = \"1\"\n\
                 [[components]]\nname = \"main\"\n\
                 [[components.executables]]\nname = \"app\"\nimage = \"{IMAGE}\"\n"
            ),
        )
        .unwrap();
        let config = crate::config::load_agent(&agent).unwrap();
        let spec = crate::config::load_deployment(&file).unwrap();
        let store = StateStore::open(&config.state_dir).unwrap();
        let runtime = Arc::new(FakeRuntime::new().with_registry_image(IMAGE));
        let reporter = Arc::new(MemoryReporter::default());
        let supervisor = Supervisor::from_parts(Parts {
            config,
            deployments: BTreeMap::from([("app".to_string(), spec)]),
            runtime: runtime.clone(),
            reporter: reporter.clone(),
            state: store.load().unwrap(),
            store,
            boot_id: "boot-1".into(),
            registries: Vec::new(),
            notifier: crate::notify::Notifier::disabled(),
            invalid: BTreeMap::new(),
        });
        let operator = supervisor.operator();
        let token = CancellationToken::new();
        tokio::spawn(supervisor.run(token.clone()));
        Loop {
            runtime,
            reporter,
            operator,
            token,
        }
    }

    impl Loop {
        async fn wait(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let latest = self.reporter.latest(&Topic::Deployment("app".into()));
                if let Some(doc) = latest.as_ref().filter(|d| pred(d)) {
                    return doc.clone();
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}: {latest:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        fn starts(&self) -> usize {
            let calls = self.runtime.calls();
            calls.iter().filter(|c| matches!(c, Call::Start(_))).count()
        }

        fn events(&self, kind: &str) -> Vec<Value> {
            let published = self.reporter.published.lock().unwrap();
            published
                .iter()
                .filter(|(t, v)| *t == Topic::Events && v["event"] == kind)
                .map(|(_, v)| v.clone())
                .collect()
        }
    }

    fn exe(doc: &Value) -> &Value {
        &doc["executables"][0]
    }

    #[tokio::test]
    async fn stop_start_and_restart_follow_the_manual_rows() {
        let dir = tempfile::tempdir().unwrap();
        let l = start(dir.path());
        l.wait("Running", |d| d["status"] == "Running").await;

        // stop: Stopped with the manual-stop reason, its own kill and die
        // read as neither a stop by someone else nor a crash.
        let doc = l
            .operator
            .request(request(Action::Stop, None))
            .await
            .unwrap();
        assert_eq!(exe(&doc)["status"], "Stopped", "{doc:#}");
        assert_eq!(
            exe(&doc)["reason"],
            super::super::lifecycle::MANUAL_STOP_REASON
        );
        assert_eq!(exe(&doc)["exit_code"], 143);
        assert_eq!(doc["restart_count"], 0);
        let mut stops = l.events("manual_stop");
        for _ in 0..1000 {
            if !stops.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            stops = l.events("manual_stop");
        }
        assert_eq!(stops.len(), 1, "{stops:?}");
        assert_eq!(stops[0]["by"], "test", "who asked");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(l.starts(), 1, "not restarted under always");
        assert!(!l.runtime.container(NAME).unwrap().running);

        // start: running again, not counted; the policy applies again.
        let doc = l
            .operator
            .request(request(Action::Start, Some("app")))
            .await
            .unwrap();
        assert_eq!(exe(&doc)["status"], "Running", "{doc:#}");
        assert_eq!(doc["restart_count"], 0);
        assert_eq!(l.events("start")[0]["by"], "test");
        l.runtime.exit(NAME, 1);
        l.wait("restarted after a crash", |d| {
            d["restart_count"] == 1 && exe(d)["status"] == "Running"
        })
        .await;

        // restart: stopped and started now, counted once.
        let doc = l
            .operator
            .request(request(Action::Restart, Some("main/app")))
            .await
            .unwrap();
        assert_eq!(doc["restart_count"], 2, "{doc:#}");
        assert_eq!(exe(&doc)["status"], "Running");
        let restarts = l.events("restart");
        assert_eq!(restarts.last().unwrap()["by"], "test");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            l.starts(),
            4,
            "first start, crash restart, operator restart"
        );
        let latest = l.reporter.latest(&Topic::Deployment("app".into())).unwrap();
        assert_eq!(latest["restart_count"], 2, "counted once: {latest:#}");
        l.token.cancel();
    }

    #[tokio::test]
    async fn unknown_targets_are_refused_with_the_choices() {
        let dir = tempfile::tempdir().unwrap();
        let l = start(dir.path());
        l.wait("Running", |d| d["status"] == "Running").await;
        let mut other = request(Action::Stop, None);
        other.deployment = "nope".into();
        assert_eq!(
            l.operator.request(other).await,
            Err(OperatorError::NoDeployment {
                deployment: "nope".into()
            })
        );
        let err = l
            .operator
            .request(request(Action::Restart, Some("x")))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "deployment app has no executable x; it has main/app"
        );
        let mut master = request(Action::Stop, None);
        master.deployment = ROS_MASTER_DEPLOYMENT.into();
        assert!(l.operator.request(master).await.is_err());
        assert_eq!(l.starts(), 1);
        l.token.cancel();
    }
}
