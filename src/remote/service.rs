//! The daemon's side of remote commands: takes each command the MQTT
//! reporter received, verifies it, carries it out (files for `apply` and
//! `remove`, the supervisor's operator actions for `restart`, `stop` and
//! `start`), and hands exactly one [`Reply`] back for
//! `replies/<request_id>`. Each refusal is also an `error` event.
//!
//! Commands are verified one at a time, in their order of arrival (the
//! record of request ids is written before a command is acted on); their
//! effects are then awaited concurrently, so a long `apply` does not hold
//! up a `stop`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{files, CommandName, Envelope, Refusal, Reply, Verifier, DEFAULT_TIMEOUT, MAX_TIMEOUT};
use crate::config::RemoteSettings;
use crate::control::Snapshot;
use crate::model::Phase;
use crate::report::{timestamp, Reporter, Topic};
use crate::supervisor::{Action, Operator, OperatorRequest};

/// A command as it came off the broker: the last level of its topic, and
/// the payload.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub command: String,
    pub payload: Vec<u8>,
}

/// Where replies go: `(request_id, reply)`; the MQTT reporter publishes it
/// on `replies/<request_id>`.
pub type ReplySink = Arc<dyn Fn(&str, Value) + Send + Sync>;

pub struct Service<P> {
    pub device_id: String,
    pub deployments_dir: PathBuf,
    pub remote: RemoteSettings,
    pub verifier: Verifier,
    pub operator: Operator,
    pub snapshot: Arc<Snapshot<P>>,
    pub replies: ReplySink,
}

impl<P: Reporter> Service<P> {
    /// Handles commands until `shutdown` or until the channel closes.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Incoming>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let this = Arc::new(Shared {
            device_id: self.device_id.clone(),
            deployments_dir: self.deployments_dir.clone(),
            remote: self.remote.clone(),
            operator: self.operator.clone(),
            snapshot: self.snapshot.clone(),
            replies: self.replies.clone(),
        });
        loop {
            let incoming = tokio::select! {
                () = shutdown.cancelled() => return,
                incoming = commands.recv() => match incoming {
                    Some(incoming) => incoming,
                    None => return,
                },
            };
            let Some((command, envelope)) = self.accept(&this, &incoming) else {
                continue;
            };
            let this = Arc::clone(&this);
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = this.execute(command, envelope) => {}
                }
            });
        }
    }

    /// Parses and verifies a command; a refusal is answered here.
    fn accept(&mut self, this: &Shared<P>, incoming: &Incoming) -> Option<(CommandName, Envelope)> {
        let (command, envelope) = match super::decode(&incoming.command, &incoming.payload) {
            Ok(decoded) => decoded,
            Err(rejected) => {
                this.refuse(
                    &incoming.command,
                    rejected.request_id.as_deref(),
                    &rejected.key_id,
                    &rejected.refusal,
                );
                return None;
            }
        };
        let reply_id =
            super::valid_request_id(&envelope.request_id).then_some(envelope.request_id.as_str());
        if let Err(refusal) = self.verifier.verify(command, &envelope, SystemTime::now()) {
            this.refuse(command.as_str(), reply_id, &envelope.key_id, &refusal);
            return None;
        }
        info!(
            request_id = %envelope.request_id,
            command = command.as_str(),
            key_id = %envelope.key_id,
            "remote command accepted"
        );
        Some((command, envelope))
    }
}

/// What the tasks that carry commands out share.
struct Shared<P> {
    device_id: String,
    deployments_dir: PathBuf,
    remote: RemoteSettings,
    operator: Operator,
    snapshot: Arc<Snapshot<P>>,
    replies: ReplySink,
}

impl<P: Reporter> Shared<P> {
    async fn execute(&self, command: CommandName, envelope: Envelope) {
        let timeout = envelope
            .timeout_secs
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
            .min(MAX_TIMEOUT);
        let request_id = envelope.request_id.as_str();
        let key_id = envelope.key_id.as_str();
        let refused = |refusal: Refusal| {
            self.refuse(command.as_str(), Some(request_id), key_id, &refusal);
        };
        let reply = match command {
            CommandName::Apply => {
                let id = match files::apply(&self.deployments_dir, &self.remote, &envelope.payload)
                {
                    Ok(id) => id,
                    Err(refusal) => return refused(refusal),
                };
                info!(request_id, deployment = %id, "remote apply written; waiting for the deployment");
                let settled = |p: Phase| {
                    matches!(
                        p,
                        Phase::Succeeded | Phase::FailedToStart | Phase::FailedToUpdate
                    )
                };
                let (doc, timed_out) = self.await_phase(&id, timeout, settled).await;
                outcome(request_id, doc, timed_out, Phase::Succeeded, timeout)
            }
            CommandName::Remove => {
                let id = envelope.payload.as_str();
                if let Err(refusal) = files::remove(&self.deployments_dir, id) {
                    return refused(refusal);
                }
                info!(request_id, deployment = %id, "remote remove: file deleted; waiting for the deployment");
                let stopped = |p: Phase| p == Phase::DeploymentStopped;
                let (doc, timed_out) = self.await_phase(id, timeout, stopped).await;
                outcome(
                    request_id,
                    doc,
                    timed_out,
                    Phase::DeploymentStopped,
                    timeout,
                )
            }
            CommandName::Restart | CommandName::Stop | CommandName::Start => {
                let (deployment, executable) = match files::parse_target(&envelope.payload) {
                    Ok(target) => target,
                    Err(refusal) => return refused(refusal),
                };
                let action = Action::parse(command.as_str()).expect("an operator action");
                let request = OperatorRequest {
                    action,
                    deployment,
                    executable,
                    by: format!("{key_id} (remote)"),
                };
                match tokio::time::timeout(timeout, self.operator.request(request)).await {
                    Ok(Ok(doc)) => Reply {
                        request_id: request_id.to_string(),
                        ok: true,
                        error: None,
                        deployment: Some(doc),
                    },
                    Ok(Err(e)) => Reply {
                        request_id: request_id.to_string(),
                        ok: false,
                        error: Some(e.to_string()),
                        deployment: None,
                    },
                    Err(_) => Reply {
                        request_id: request_id.to_string(),
                        ok: false,
                        error: Some(format!("no effect within {} s", timeout.as_secs())),
                        deployment: None,
                    },
                }
            }
        };
        info!(
            request_id,
            command = command.as_str(),
            ok = reply.ok,
            "remote command done"
        );
        (self.replies)(
            request_id,
            serde_json::to_value(&reply).expect("replies serialize"),
        );
    }

    /// Asks the supervisor to re-read the files, then waits until
    /// deployment `id`'s document is in a phase `wanted` accepts, or until
    /// `timeout`. Returns the latest document and whether it timed out.
    async fn await_phase(
        &self,
        id: &str,
        timeout: Duration,
        wanted: impl Fn(Phase) -> bool,
    ) -> (Option<Value>, bool) {
        let deadline = Instant::now() + timeout;
        // The document right after the reload: any later one is newer.
        let first = self.operator.reload_then_document(id).await.ok();
        let mut changes = self.snapshot.subscribe();
        let since = first
            .as_ref()
            .and_then(|d| d["updated_at"].as_str().map(str::to_string));
        let fresh = |doc: Value| {
            let newer = match (&since, doc["updated_at"].as_str()) {
                (Some(since), Some(at)) => at >= since.as_str(),
                _ => true,
            };
            newer.then_some(doc)
        };
        let mut doc = first.or_else(|| self.snapshot.deployment(id).and_then(fresh));
        loop {
            if let Some(d) = &doc {
                if phase_of(d).is_some_and(&wanted) {
                    return (doc, false);
                }
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return (doc, true),
                changed = changes.changed() => {
                    if changed.is_err() {
                        return (doc, true);
                    }
                    if let Some(latest) = self.snapshot.deployment(id).and_then(fresh) {
                        doc = Some(latest);
                    }
                }
            }
        }
    }

    /// An `error` event, a warning without the payload, and the reply when
    /// there is a request id to reply to.
    fn refuse(&self, command: &str, request_id: Option<&str>, key_id: &str, refusal: &Refusal) {
        // The last level of the topic, as it came (for an unknown command).
        let command = super::quote(command);
        let command = command.as_str();
        warn!(
            request_id = request_id.unwrap_or("-"),
            command,
            key_id,
            kind = refusal_kind(refusal),
            "remote command refused"
        );
        let event = RefusalEvent {
            event: "error",
            device_id: &self.device_id,
            time: timestamp(SystemTime::now()),
            error_code: refusal.error_code(),
            reason: format!("remote command {command} refused: {refusal}"),
            command,
            request_id,
            key_id,
        };
        self.snapshot.publish(
            Topic::Events,
            serde_json::to_value(event).expect("events serialize"),
        );
        if let Some(request_id) = request_id {
            let reply = Reply {
                request_id: request_id.to_string(),
                ok: false,
                error: Some(refusal.to_string()),
                deployment: None,
            };
            (self.replies)(
                request_id,
                serde_json::to_value(&reply).expect("replies serialize"),
            );
        }
    }
}

/// The `error` event of a refused command: SPEC 9's error event, with the
/// command, its request id and its key.
#[derive(serde::Serialize)]
struct RefusalEvent<'a> {
    event: &'static str,
    device_id: &'a str,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_code: Option<crate::model::ErrorCode>,
    reason: String,
    command: &'a str,
    request_id: Option<&'a str>,
    key_id: &'a str,
}

fn phase_of(doc: &Value) -> Option<Phase> {
    serde_json::from_value(doc["phase"].clone()).ok()
}

/// The reply of an `apply` or `remove` from the document it waited for.
fn outcome(
    request_id: &str,
    doc: Option<Value>,
    timed_out: bool,
    success: Phase,
    timeout: Duration,
) -> Reply {
    let phase = doc.as_ref().and_then(phase_of);
    let ok = phase == Some(success) && !timed_out;
    let error = if ok {
        None
    } else if timed_out {
        Some(format!(
            "not {success:?} within {} s; the deployment is {}",
            timeout.as_secs(),
            phase.map_or("unknown".to_string(), |p| format!("{p:?}"))
        ))
    } else {
        let reason = doc
            .as_ref()
            .and_then(|d| d["reason"].as_str().map(str::to_string));
        Some(format!(
            "{}{}",
            phase.map_or("unknown".to_string(), |p| format!("{p:?}")),
            reason.map(|r| format!(": {r}")).unwrap_or_default()
        ))
    };
    Reply {
        request_id: request_id.to_string(),
        ok,
        error,
        deployment: doc,
    }
}

/// A short name of the refusal for the log, which never carries the
/// payload or what it contained.
fn refusal_kind(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::Malformed(_) => "malformed",
        Refusal::UnknownCommand(_) => "unknown command",
        Refusal::BadRequestId => "bad request id",
        Refusal::Unsigned => "unsigned",
        Refusal::BadKeyId(_) => "bad key id",
        Refusal::UnknownKey { .. } => "unknown key",
        Refusal::BadKey { .. } => "unusable trusted key",
        Refusal::BadSignature(_) => "bad signature",
        Refusal::BadTime(_) => "bad issued_at",
        Refusal::Expired { .. } => "expired",
        Refusal::FromTheFuture { .. } => "from the future",
        Refusal::Replayed(_) => "replayed request id",
        Refusal::TooMany(_) => "too many recent commands",
        Refusal::Store(_) => "request id record not written",
        Refusal::Limits(_) => "outside the [remote] limits",
        Refusal::Invalid(_) => "invalid deployment",
        Refusal::BadTarget(_) => "bad target",
        Refusal::NoFile { .. } => "no such deployment file",
        Refusal::Write(_) => "deployment file not written",
    }
}
