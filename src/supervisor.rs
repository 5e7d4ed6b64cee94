//! The supervisor loop: engine events and timers in, restart decisions and
//! status documents out. It owns every deployment's live state and the
//! persisted record, and is generic over the container runtime and the
//! reporter, so unit tests drive it with fakes and the daemon with the real
//! Docker engine and MQTT broker.
//!
//! One task runs the loop; engine calls that take time (pull, create, start)
//! run as tracked tasks and report back as messages. While such an operation
//! is in flight for an executable, engine events about it wait in a queue and
//! are applied after it, so each executable sees one ordered history.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::{AgentConfig, Deployments};

mod converge;
mod operator;
mod ros;
use crate::model::{
    key_from_labels, spec_hash, DeploymentSpec, ErrorCode, ExecKey, ExecutableSpec, Phase,
    PullPolicy, Status, ROS_MASTER_DEPLOYMENT,
};
use crate::notify::Notifier;
use crate::policy::{decide, Decision, Happening};
use crate::report::{timestamp, AgentDoc, DeploymentDoc, ExecutableDoc, Reporter, Topic};
use crate::runtime::{
    ContainerInfo, ContainerRuntime, ContainerSpec, EngineEvent, EventAction, RegistryAuth,
    RuntimeError,
};
use crate::state::{ExecRecord, PendingRestart, State, StateStore};
pub use converge::load_files;
pub use operator::{Action, Operator, OperatorError, OperatorRequest};

/// Back-off of reconnections to the engine.
const ENGINE_RETRY_INITIAL: Duration = Duration::from_millis(250);
const ENGINE_RETRY_MAX: Duration = Duration::from_secs(10);
/// Engine calls (pull, create, start) in flight at once.
const ENGINE_CALLS: usize = 4;
/// How long before its event stream ends an engine's shutdown may stop
/// containers (dockerd's default shutdown timeout is 15 s).
const ENGINE_SHUTDOWN_WINDOW: Duration = Duration::from_secs(30);
/// How often changes to the state that need not be durable at once are saved.
const POSITION_SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Everything the loop needs from outside, so tests can hand in their own.
pub struct Parts<R, P> {
    pub config: AgentConfig,
    pub deployments: Deployments,
    pub runtime: Arc<R>,
    pub reporter: Arc<P>,
    pub store: StateStore,
    pub state: State,
    pub boot_id: String,
    /// Registry credentials, already read from their files.
    pub registries: Vec<RegistryAuth>,
    /// systemd readiness, status and watchdog.
    pub notifier: Notifier,
    /// Deployment files that could not be read, by id (the file's stem), with
    /// the error: each is `FailedToStart`.
    pub invalid: BTreeMap<String, String>,
}

/// Messages into the loop.
#[derive(Debug)]
enum Msg {
    /// The engine answers again. `replay` holds what happened since the last
    /// event berth had applied (empty when it had none).
    EngineUp {
        replay: Vec<EngineEvent>,
    },
    EngineDown {
        error: String,
    },
    Event(EngineEvent),
    Pulled {
        deployment: String,
        result: Result<(), (String, RuntimeError)>,
    },
    Launched {
        key: ExecKey,
        container_id: Option<String>,
        result: Result<ContainerInfo, RuntimeError>,
    },
    /// Re-read the agent config and the deployment files.
    Reload,
    /// A container berth stopped and removed (deprovisioning or an update).
    Removed {
        key: ExecKey,
        result: Result<(), RuntimeError>,
    },
    /// An update's images are pulled and its new containers created, or the
    /// reason it cannot be applied.
    Prepared {
        deployment: String,
        result: Result<Vec<(ExecKey, String)>, String>,
    },
    /// An operator's stop, start or restart (`operator.rs`).
    Operator(operator::OperatorMsg),
}

/// Asks a running supervisor to re-read its files (SIGHUP, a change in
/// `deployments_dir`).
#[derive(Debug, Clone)]
pub struct Reloader(mpsc::UnboundedSender<Msg>);

impl Reloader {
    pub fn reload(&self) {
        let _ = self.0.send(Msg::Reload);
    }
}

/// Live state of one executable.
#[derive(Debug)]
struct Exec {
    key: ExecKey,
    spec: ExecutableSpec,
    env: BTreeMap<String, String>,
    hash: String,
    container_id: Option<String>,
    status: Status,
    reason: Option<String>,
    error_code: Option<ErrorCode>,
    exit_code: Option<i64>,
    started_at: Option<String>,
    /// Engine time of the start berth knows of: older events are stale.
    started_nanos: i64,
    /// An engine call for this executable is in flight.
    busy: bool,
    /// Events that arrived while busy, applied afterwards in order.
    deferred: Vec<EngineEvent>,
    /// When a back-off restart is due.
    due: Option<Instant>,
    /// A kill not sent by berth was seen: the next exit is a manual stop.
    killed_by_other: bool,
    /// berth itself is stopping or removing the container.
    berth_stopping: bool,
    /// Has been started successfully at least once in this deployment's life.
    launched: bool,
    /// The spec hash of the current container: differs from `hash` while an
    /// update has not been applied to it.
    container_hash: Option<String>,
    /// A created container of an update, waiting to replace the current one.
    pending_swap: Option<String>,
    /// Engine time of the manual stop berth saw for it, if any: an engine
    /// shutdown's own stops look like manual ones until the engine is back.
    manual_at: Option<i64>,
    /// The image of the current container (the previous one's while an
    /// update has not been applied).
    running_image: Option<String>,
}

/// Live state of one deployment.
#[derive(Debug)]
struct Deployment {
    spec: DeploymentSpec,
    phase: Phase,
    /// Images are present for every executable that needs a container.
    images_ready: bool,
    pulling: bool,
    pull_backoff: Backoff,
    pull_due: Option<Instant>,
    execs: Vec<Exec>,
    dirty: bool,
    /// Why the file cannot be applied (`FailedToStart`, `FailedToUpdate`).
    failure: Option<String>,
    /// Its file is gone: containers are being stopped and removed.
    removing: bool,
    /// An update's images are being pulled and containers created.
    updating: bool,
    /// Executables an update dropped, being stopped and removed.
    retiring: Vec<Exec>,
    /// The phase of the last published document: a change is an event.
    published_phase: Option<Phase>,
}

/// How the replay says a container ended while berth was away.
#[derive(Debug, Default, Clone, Copy)]
struct Replayed {
    killed_by_other: bool,
    manual: bool,
    died: bool,
    destroyed: bool,
}

pub struct Supervisor<R, P> {
    config: AgentConfig,
    runtime: Arc<R>,
    reporter: Arc<P>,
    store: StateStore,
    state: State,
    boot_id: String,
    /// The recorded boot differs from this one: reboot rules apply once.
    rebooted: bool,
    registries: Vec<RegistryAuth>,
    deployments: BTreeMap<String, Deployment>,
    engine_up: bool,
    /// Set once the first reconcile after start has run.
    reconciled: bool,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    tracker: TaskTracker,
    since: String,
    state_dirty: bool,
    notifier: Notifier,
    /// Starts decided during a reconcile, spawned after its one state write.
    held_launches: Option<Vec<(ExecKey, Option<String>, ContainerSpec)>>,
    /// Limits the engine calls in flight (see `spawn_engine_call`).
    engine_slots: Arc<tokio::sync::Semaphore>,
    /// Limits the starts of crash-looping executables (see `spawn_launch`).
    crash_lane: Arc<tokio::sync::Semaphore>,
    /// `READY=1` went out.
    ready_sent: bool,
    /// The event position when the engine went away.
    down_position: Option<i64>,
    /// Executables an engine restart interrupted, for the next reconcile.
    interrupted: std::collections::HashSet<ExecKey>,
}

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    pub fn from_parts(parts: Parts<R, P>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let Parts {
            config,
            deployments,
            runtime,
            reporter,
            store,
            mut state,
            boot_id,
            registries,
            notifier,
            invalid,
        } = parts;
        let rebooted = state.boot_id.as_deref().is_some_and(|b| b != boot_id);
        if rebooted {
            // A different boot clears every manual stop and the back-off.
            for record in state.executables.values_mut() {
                record.manual_stop = false;
                record.backoff.reset();
            }
        }
        state.boot_id = Some(boot_id.clone());
        let mut supervisor = Supervisor {
            config,
            runtime,
            reporter,
            store,
            state,
            boot_id,
            rebooted,
            registries,
            deployments: BTreeMap::new(),
            engine_up: false,
            reconciled: false,
            tx,
            rx,
            tracker: TaskTracker::new(),
            since: timestamp(SystemTime::now()),
            state_dirty: false,
            notifier,
            held_launches: None,
            engine_slots: Arc::new(tokio::sync::Semaphore::new(ENGINE_CALLS)),
            crash_lane: Arc::new(tokio::sync::Semaphore::new(ENGINE_CALLS / 2)),
            ready_sent: false,
            down_position: None,
            interrupted: Default::default(),
        };
        supervisor.converge(deployments, invalid);
        supervisor
    }

    /// A handle that makes the loop re-read its files.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.tx.clone())
    }

    /// Runs until `shutdown` is cancelled. Containers are left running.
    pub async fn run(mut self, shutdown: CancellationToken) {
        info!(
            device = %self.config.device_id,
            deployments = self.deployments.len(),
            rebooted = self.rebooted,
            "berth supervisor starting"
        );
        // The agent document goes out with the first answer (or silence) of
        // the engine, so that it never claims a state berth has not seen.
        self.save_state();
        for dep in self.deployments.values_mut() {
            dep.dirty = true;
        }
        self.publish_dirty();
        self.publish_summary();
        self.spawn_event_pump(shutdown.clone());

        let mut save_tick = tokio::time::interval(POSITION_SAVE_INTERVAL);
        // The watchdog is fed from this loop, so that a hung loop is caught.
        let mut watchdog_tick = tokio::time::interval(
            self.notifier
                .watchdog_interval()
                .unwrap_or(Duration::from_secs(3600)),
        );
        loop {
            let next_due = self.next_due();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = watchdog_tick.tick() => self.notifier.watchdog(),
                Some(msg) = self.rx.recv() => self.handle(msg).await,
                _ = sleep_until_opt(next_due) => self.fire_timers(),
                _ = save_tick.tick() => {
                    if self.state_dirty {
                        self.save_state();
                    }
                }
            }
            self.publish_dirty();
        }
        info!("berth supervisor stopping; containers keep running");
        self.notifier.stopping();
        self.tracker.close();
        // Engine calls in flight finish (or are abandoned with the process:
        // the state already records any restart they were committed to); the
        // starts that finish are recorded, nothing new is begun.
        let deadline = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = self.tracker.wait() => break,
                Some(msg) = self.rx.recv() => self.settle(msg),
            }
        }
        while let Ok(msg) = self.rx.try_recv() {
            self.settle(msg);
        }
        self.save_state();
    }

    /// During shutdown: records a start that completed, and nothing else.
    fn settle(&mut self, msg: Msg) {
        if let Msg::Launched {
            key,
            result: Ok(info),
            ..
        } = msg
        {
            let record = self.state.exec_mut(&key);
            record.pending_restart = None;
            record.started_at = info.started_at.clone();
            record.container_id = Some(info.id);
            record.status = Some(Status::Running);
        }
    }

    // ---- engine connection -------------------------------------------------

    /// Connects to the engine, replays what was missed, forwards live events,
    /// and starts over with back-off whenever the stream ends.
    fn spawn_event_pump(&self, shutdown: CancellationToken) {
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        let device = self.config.device_id.clone();
        let mut position = self.state.event_position;
        self.tracker.spawn(async move {
            use futures_util::StreamExt;
            let mut delay = ENGINE_RETRY_INITIAL;
            let mut reported_down = false;
            loop {
                if shutdown.is_cancelled() {
                    return;
                }
                let attempt = async {
                    runtime.ping().await?;
                    let now = unix_nanos(SystemTime::now());
                    // The live stream starts at `now`; the replay ends there.
                    let live = runtime.events(&device, Some(now), None);
                    let mut replay = Vec::new();
                    if let Some(since) = position {
                        let mut history = runtime.events(&device, Some(since), Some(now));
                        while let Some(event) = history.next().await {
                            replay.push(event?);
                        }
                    }
                    Ok::<_, RuntimeError>((live, replay))
                };
                let (mut live, replay) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    result = attempt => match result {
                        Ok(ok) => ok,
                        Err(e) => {
                            if !reported_down {
                                let _ = tx.send(Msg::EngineDown { error: e.to_string() });
                                reported_down = true;
                            }
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep(delay) => {}
                            }
                            delay = (delay * 2).min(ENGINE_RETRY_MAX);
                            continue;
                        }
                    }
                };
                delay = ENGINE_RETRY_INITIAL;
                if let Some(last) = replay.last() {
                    position = Some(last.time_nanos);
                }
                if tx.send(Msg::EngineUp { replay }).is_err() {
                    return;
                }
                let error = loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        item = live.next() => match item {
                            Some(Ok(event)) => {
                                position = Some(event.time_nanos);
                                if tx.send(Msg::Event(event)).is_err() {
                                    return;
                                }
                            }
                            Some(Err(e)) => break e.to_string(),
                            None => break "event stream ended".to_string(),
                        }
                    }
                };
                let _ = tx.send(Msg::EngineDown { error });
                reported_down = true;
                // Back off before the first reconnection too.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        });
    }

    /// Runs pulls, creates and starts as tracked tasks, a few at a time: the
    /// engine does not go faster with more, and each one in flight holds
    /// buffers (memory berth keeps once the burst is over).
    fn spawn_engine_call(&self, call: impl std::future::Future<Output = ()> + Send + 'static) {
        let slots = self.engine_slots.clone();
        self.tracker.spawn(async move {
            let _permit = slots.acquire_owned().await;
            call.await;
        });
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::EngineUp { replay } => self.on_engine_up(replay).await,
            Msg::EngineDown { error } => self.on_engine_down(&error),
            Msg::Event(event) => {
                self.note_position(event.time_nanos);
                self.on_event(event);
            }
            Msg::Pulled { deployment, result } => self.on_pulled(&deployment, result),
            Msg::Launched {
                key,
                container_id,
                result,
            } => self.on_launched(&key, container_id, result),
            Msg::Reload => self.reload(),
            Msg::Removed { key, result } => self.on_removed(&key, result),
            Msg::Prepared { deployment, result } => self.on_prepared(&deployment, result),
            Msg::Operator(msg) => self.on_operator(msg),
        }
        self.provision_waiting();
    }

    fn on_engine_down(&mut self, error: &str) {
        let was_up = self.engine_up;
        self.engine_up = false;
        if was_up {
            self.down_position = self.state.event_position;
        }
        warn!(error, "docker engine unreachable; retrying with back-off");
        for dep in self.deployments.values_mut() {
            dep.pull_due = None;
            for exec in &mut dep.execs {
                exec.due = None;
                exec.status = Status::Unknown;
                exec.reason = Some("docker engine unreachable".into());
                exec.error_code = Some(ErrorCode::EngineUnreachable);
            }
            dep.dirty = true;
        }
        if !self.reconciled {
            // berth is up and reporting the engine unreachable: ready, so that
            // systemd does not kill it for an engine that is late.
            self.notify_ready();
        }
        if was_up || !self.reconciled {
            self.publish_agent();
            self.event(serde_json::json!({
                "event": "error",
                "error_code": ErrorCode::EngineUnreachable,
                "reason": format!("docker engine unreachable: {error}"),
            }));
        }
    }

    async fn on_engine_up(&mut self, replay: Vec<EngineEvent>) {
        self.engine_up = true;
        info!(
            replayed = replay.len(),
            "docker engine connected; reconciling"
        );
        self.publish_agent();
        self.detect_engine_restart(&replay);
        // The listing is the truth after any reconnect; it is awaited here, in
        // the loop, so that no event is applied between it and the reconcile.
        match self.runtime.list(&self.config.device_id).await {
            Ok(containers) => self.reconcile(containers, &replay),
            Err(e) => self.on_engine_down(&e.to_string()),
        }
        if let Some(last) = replay.last() {
            self.note_position(last.time_nanos);
        }
        self.notify_ready();
        self.reconciled = true;
    }

    /// The engine keeps its recent events in memory: a replay from the last
    /// event berth saw holds at least that event, unless the engine restarted.
    /// Then the stops berth saw just before the stream ended were the engine
    /// shutting its containers down, not an operator: they follow the
    /// "interrupted by an engine restart" row instead of the manual-stop row.
    fn detect_engine_restart(&mut self, replay: &[EngineEvent]) {
        let Some(down) = self.down_position.take() else {
            return;
        };
        if !replay.is_empty() {
            return;
        }
        let since = down - ENGINE_SHUTDOWN_WINDOW.as_nanos() as i64;
        let keys: Vec<ExecKey> = self
            .deployments
            .values()
            .flat_map(|d| d.execs.iter())
            .filter(|e| e.manual_at.is_some_and(|t| t >= since))
            .map(|e| e.key.clone())
            .collect();
        for key in keys {
            info!(executable = %key, "stopped by the engine's shutdown, not by hand");
            if let Some(exec) = self.exec_mut(&key) {
                exec.manual_at = None;
            }
            let record = self.state.exec_mut(&key);
            record.manual_stop = false;
            record.status = Some(Status::Running);
            self.interrupted.insert(key);
        }
    }

    fn notify_ready(&mut self) {
        if !self.ready_sent {
            self.ready_sent = true;
            self.notifier.ready();
        }
    }

    // ---- reconcile -----------------------------------------------------------

    /// Brings every executable in line with the engine's listing, using the
    /// replayed history to tell manual stops from crashes.
    fn reconcile(&mut self, containers: Vec<ContainerInfo>, replay: &[EngineEvent]) {
        // Starts decided here wait for the one durable write at the end.
        self.held_launches = Some(Vec::new());
        let mut by_key: HashMap<ExecKey, ContainerInfo> = HashMap::new();
        let mut orphans = Vec::new();
        for info in containers {
            if info.name.ends_with(converge::NEXT_SUFFIX) {
                // An update's new container that never replaced the old one:
                // the update is prepared again.
                let runtime = self.runtime.clone();
                self.tracker.spawn(async move {
                    let _ = runtime.remove(&info.id).await;
                });
                continue;
            }
            match key_from_labels(&info.labels) {
                Some(key) if self.deployments.contains_key(&key.deployment) => {
                    by_key.insert(key, info);
                }
                Some(key) => orphans.push((key, info)),
                None => {}
            }
        }
        if self.config.deployments_dir.is_dir() {
            for (key, info) in orphans {
                self.remove_orphan(key, info);
            }
        } else if !orphans.is_empty() {
            // An unmounted or missing directory must not deprovision everything.
            warn!(
                dir = %self.config.deployments_dir.display(),
                containers = orphans.len(),
                "deployments_dir is missing; containers without a deployment left alone"
            );
        }
        let replayed = classify_replay(replay);
        let position = self.state.event_position;
        let keys: Vec<ExecKey> = self
            .deployments
            .values()
            .flat_map(|d| d.execs.iter().map(|e| e.key.clone()))
            .collect();
        for key in keys {
            let info = by_key.remove(&key);
            // A container removed meanwhile is found by the id berth recorded.
            let id = info
                .as_ref()
                .map(|i| i.id.clone())
                .or_else(|| self.state.exec(&key).and_then(|r| r.container_id.clone()));
            let seen = id
                .and_then(|id| replayed.get(&id).copied())
                .unwrap_or_default();
            self.reconcile_exec(&key, info, seen, position);
        }
        let ids: Vec<String> = self.deployments.keys().cloned().collect();
        for id in ids {
            // Files changed while berth was away are applied as updates.
            self.start_update(&id);
        }
        self.rebooted = false;
        self.interrupted.clear();
        self.save_state();
        for call in self.held_launches.take().unwrap_or_default() {
            self.spawn_launch(call);
        }
    }

    fn reconcile_exec(
        &mut self,
        key: &ExecKey,
        info: Option<ContainerInfo>,
        seen: Replayed,
        position: Option<i64>,
    ) {
        let rebooted = self.rebooted;
        let record = self.state.exec(key).cloned().unwrap_or_default();
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        if exec.busy {
            return;
        }
        exec.due = None;
        exec.killed_by_other = false;
        let Some(info) = info else {
            exec.container_id = None;
            exec.started_at = None;
            if seen.destroyed && !rebooted {
                // Removed by hand while berth was away.
                self.state.exec_mut(key).container_id = None;
                self.apply(key, Happening::StoppedByHand, None, None);
            } else if record.manual_stop && !rebooted {
                exec.set(Status::Stopped, Some(MANUAL_STOP_REASON.into()), None);
            } else {
                // No container: provisioning creates it. Set Pending so that
                // `maybe_provision` picks it up.
                exec.set(Status::Pending, Some("waiting for container".into()), None);
            }
            self.mark_dirty(&key.deployment);
            return;
        };
        exec.container_id = Some(info.id.clone());
        exec.container_hash = converge::container_hash(&info);
        exec.running_image = Some(info.image.clone());
        exec.started_at = info.started_at.clone().filter(|_| info.has_started());
        exec.started_nanos = exec.started_at.as_deref().map(parse_nanos).unwrap_or(0);
        exec.exit_code = None;
        if info.has_started() {
            exec.launched = true;
        }

        // A restart berth had committed to (and counted) before it went away.
        if let Some(pending) = &record.pending_restart {
            let happened = info.started_at != pending.prev_started_at;
            let record = self.state.exec_mut(key);
            if happened {
                record.pending_restart = None;
                record.started_at = info.started_at.clone();
            } else if !info.running {
                info!(executable = %key, "completing a restart committed before berth stopped");
                self.launch(key, false);
                return;
            }
        }

        let exec = self.exec_mut(key).expect("exec exists");
        if info.running {
            exec.set(Status::Running, None, None);
            let record = self.state.exec_mut(key);
            if record.manual_stop {
                // Started by hand while berth was away: the policy applies again.
                record.manual_stop = false;
            }
            record.started_at = info.started_at.clone();
            record.container_id = Some(info.id.clone());
            record.status = Some(Status::Running);
            self.mark_dirty(&key.deployment);
            return;
        }

        let code = info.exit_code.unwrap_or(0);
        let happening = if record.manual_stop && !rebooted {
            None // still suspended
        } else if rebooted {
            Some(match record.status {
                Some(Status::Completed) => Happening::ExitedBeforeReboot { code: 0 },
                Some(Status::Error) => Happening::ExitedBeforeReboot {
                    code: record.exit_code.unwrap_or(1),
                },
                _ => Happening::Interrupted,
            })
        } else if self.interrupted.remove(key) {
            Some(Happening::Interrupted)
        } else if seen.manual {
            Some(Happening::StoppedByHand)
        } else if info.state == "created" && !info.has_started() {
            if info.error.is_some() {
                Some(Happening::StartFailed)
            } else {
                // Created but never started (berth stopped in between).
                self.launch(key, false);
                return;
            }
        } else if !seen.died
            && record.status == Some(Status::Running)
            && position
                .is_some_and(|p| info.finished_at.as_deref().map(parse_nanos).unwrap_or(0) > p)
        {
            // It stopped after the last event berth saw, yet the engine's
            // history has no `die` for it: the engine restarted meanwhile and
            // its shutdown stopped the container.
            Some(Happening::Interrupted)
        } else if record.status == Some(Status::Running) || seen.died {
            Some(Happening::Exited { code })
        } else {
            // Exited before berth last looked: keep what was decided then.
            None
        };
        match happening {
            Some(happening) => {
                let ran_for = ran_for(&info);
                self.apply(key, happening, Some(code), ran_for);
            }
            None => self.restore_recorded(key, &record, code),
        }
    }

    /// Shows again what was decided about an executable that has not run
    /// since berth last looked (it exited before, and nothing changed).
    fn restore_recorded(&mut self, key: &ExecKey, record: &ExecRecord, code: i64) {
        let Some(policy) = self
            .deployments
            .get(&key.deployment)
            .map(|d| d.spec.restart)
        else {
            return;
        };
        let exec = self.exec_mut(key).expect("exec exists");
        exec.exit_code = Some(code);
        match record.status {
            Some(Status::Stopped) | None if record.manual_stop => {
                exec.set(Status::Stopped, Some(MANUAL_STOP_REASON.into()), None)
            }
            Some(Status::Completed) => exec.set(Status::Completed, None, None),
            Some(Status::Error) => exec.set(
                Status::Error,
                Some(exit_reason(code, policy)),
                Some(ErrorCode::ExecutableFailed),
            ),
            Some(Status::Stopped) => {
                exec.set(Status::Stopped, Some(NEVER_INTERRUPTED_REASON.into()), None)
            }
            _ => {
                self.apply(key, Happening::Exited { code }, Some(code), None);
                return;
            }
        }
        self.mark_dirty(&key.deployment);
    }

    // ---- provisioning ----------------------------------------------------------

    /// Pulls what is missing and creates the containers of executables that
    /// have none.
    fn maybe_provision(&mut self, id: &str) {
        if !self.engine_up {
            return;
        }
        let unmet = self.unmet_dependency(id);
        let Some(dep) = self.deployments.get_mut(id) else {
            return;
        };
        if dep.removing || dep.updating || dep.phase == Phase::FailedToStart {
            return;
        }
        if let Some(waiting) = unmet {
            // SPEC 7: nothing starts before its dependencies have.
            dep.phase = Phase::InProgress;
            for exec in dep
                .execs
                .iter_mut()
                .filter(|e| e.container_id.is_none() && !e.busy)
            {
                exec.set(
                    Status::Pending,
                    Some(format!("waiting for {waiting}")),
                    None,
                );
            }
            dep.dirty = true;
            return;
        }
        let needs: Vec<&Exec> = dep
            .execs
            .iter()
            .filter(|e| {
                // Waiting for a container, or for an image to retry.
                e.container_id.is_none()
                    && !e.busy
                    && (e.status == Status::Pending
                        || e.error_code == Some(ErrorCode::ImageUnavailable))
            })
            .collect();
        if needs.is_empty() {
            dep.update_phase();
            return;
        }
        if dep.pulling {
            return;
        }
        if !dep.images_ready {
            let images: Vec<(String, PullPolicy)> = needs
                .iter()
                .map(|e| (e.spec.image.clone(), e.spec.pull))
                .collect();
            dep.pulling = true;
            dep.pull_due = None;
            if dep.phase == Phase::InProgress {
                dep.phase = Phase::Provisioning;
            }
            // An image that could not be had stays `Error` while it is retried.
            for exec in dep
                .execs
                .iter_mut()
                .filter(|e| e.container_id.is_none() && e.status != Status::Error)
            {
                exec.set(
                    Status::Pending,
                    Some(format!("pulling image {}", exec.spec.image)),
                    None,
                );
            }
            dep.dirty = true;
            let runtime = self.runtime.clone();
            let tx = self.tx.clone();
            let registries = self.registries.clone();
            let deployment = id.to_string();
            self.spawn_engine_call(async move {
                let result = ensure_images(&*runtime, &images, &registries).await;
                let _ = tx.send(Msg::Pulled { deployment, result });
            });
            return;
        }
        let keys: Vec<ExecKey> = needs.iter().map(|e| e.key.clone()).collect();
        for key in keys {
            let counted = self
                .state
                .exec(&key)
                .is_some_and(|r| r.started_at.is_some());
            self.launch(&key, counted);
        }
    }

    fn on_pulled(&mut self, id: &str, result: Result<(), (String, RuntimeError)>) {
        let settings = self.config.restart;
        let Some(dep) = self.deployments.get_mut(id) else {
            return;
        };
        dep.pulling = false;
        match result {
            Ok(()) => {
                dep.images_ready = true;
                dep.pull_backoff = Backoff::default();
                self.maybe_provision(id);
            }
            Err((image, RuntimeError::Unreachable(e))) => {
                debug!(deployment = id, image, error = %e, "pull interrupted: engine unreachable");
                dep.dirty = true;
            }
            Err((image, e)) => {
                let delay = dep
                    .pull_backoff
                    .next_delay(&settings, None)
                    .max(settings.backoff_initial);
                dep.pull_due = Some(Instant::now() + delay);
                let reason = format!("{e}; retrying in {}", human(delay));
                warn!(deployment = id, image, error = %e, "image unavailable");
                for exec in dep.execs.iter_mut().filter(|x| x.container_id.is_none()) {
                    if exec.spec.image == image {
                        exec.set(
                            Status::Error,
                            Some(reason.clone()),
                            Some(ErrorCode::ImageUnavailable),
                        );
                    }
                }
                dep.dirty = true;
                self.event(serde_json::json!({
                    "event": "error",
                    "deployment": id,
                    "error_code": ErrorCode::ImageUnavailable,
                    "reason": e.to_string(),
                }));
            }
        }
    }

    // ---- starting containers ---------------------------------------------------

    /// Creates the container if there is none, then starts it. `counted`: this
    /// start is a restart and was already counted (or is counted now).
    fn launch(&mut self, key: &ExecKey, counted: bool) {
        let device = self.config.device_id.clone();
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        exec.busy = true;
        exec.due = None;
        exec.killed_by_other = false;
        let container_id = exec.container_id.clone();
        let spec = converge::container_spec(&device, exec);
        if counted {
            let record = self.state.exec_mut(key);
            if record.pending_restart.is_none() {
                record.restart_count += 1;
                record.pending_restart = Some(PendingRestart {
                    prev_started_at: record.started_at.clone(),
                });
                // The count and the commitment to start are one durable
                // write; a reconcile makes one write for all its restarts.
                if self.held_launches.is_none() {
                    self.save_state();
                }
            }
        }
        let call = (key.clone(), container_id, spec);
        match self.held_launches.as_mut() {
            Some(held) => held.push(call),
            None => self.spawn_launch(call),
        }
    }

    fn spawn_launch(&self, (key, container_id, spec): (ExecKey, Option<String>, ContainerSpec)) {
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        // Executables in a crash loop (two or more restarts in a row) share
        // a lane of their own before an engine slot, so that a storm of them
        // never makes a healthy executable wait behind it.
        let crash_lane = self
            .state
            .exec(&key)
            .is_some_and(|r| r.backoff.consecutive >= 2)
            .then(|| self.crash_lane.clone());
        let slots = self.engine_slots.clone();
        self.tracker.spawn(async move {
            let _lane = match crash_lane {
                Some(lane) => Some(lane.acquire_owned().await),
                None => None,
            };
            let _slot = slots.acquire_owned().await;
            let (container_id, result) = launch_container(&*runtime, container_id, &spec).await;
            let _ = tx.send(Msg::Launched {
                key,
                container_id,
                result,
            });
        });
    }

    fn on_launched(
        &mut self,
        key: &ExecKey,
        container_id: Option<String>,
        result: Result<ContainerInfo, RuntimeError>,
    ) {
        let policy = match self.deployments.get(&key.deployment) {
            Some(dep) => dep.spec.restart,
            None => return,
        };
        // Retired while its start was in flight: remove it now.
        if let Some(exec) = self.retiring_mut(key) {
            exec.busy = false;
            if container_id.is_some() {
                exec.container_id = container_id;
            }
            self.remove_container(key);
            return;
        }
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        exec.busy = false;
        exec.berth_stopping = false;
        if container_id.is_some() && container_id != exec.container_id {
            // A container created by this launch (or an update): current spec.
            exec.container_id = container_id.clone();
            exec.container_hash = Some(exec.hash.clone());
        }
        let restart_count = self.state.exec(key).map_or(0, |r| r.restart_count);
        match result {
            Ok(info) => {
                let exec = self.exec_mut(key).expect("exec exists");
                exec.launched = true;
                exec.running_image = Some(info.image.clone());
                exec.started_at = info.started_at.clone();
                exec.started_nanos = info.started_at.as_deref().map(parse_nanos).unwrap_or(0);
                exec.exit_code = None;
                exec.set(Status::Running, None, None);
                let record = self.state.exec_mut(key);
                let was_restart = record.pending_restart.take().is_some();
                record.started_at = info.started_at.clone();
                record.container_id = Some(info.id.clone());
                record.status = Some(Status::Running);
                record.exit_code = None;
                self.mark_state_dirty();
                info!(executable = %key, container = %short(&info.id), restart_count, "started");
                if was_restart {
                    self.event(serde_json::json!({
                        "event": "restarted",
                        "deployment": key.deployment,
                        "component": key.component,
                        "executable": key.executable,
                        "restart_count": restart_count,
                    }));
                }
            }
            Err(RuntimeError::Unreachable(e)) => {
                // The reconcile after the reconnection decides again; a
                // committed restart stays pending in the state.
                debug!(executable = %key, error = %e, "engine unreachable during start");
            }
            Err(RuntimeError::ImageUnavailable { message, .. }) => {
                let exec = self.exec_mut(key).expect("exec exists");
                exec.set(
                    Status::Error,
                    Some(message),
                    Some(ErrorCode::ImageUnavailable),
                );
                if let Some(dep) = self.deployments.get_mut(&key.deployment) {
                    dep.images_ready = false;
                }
                self.state.exec_mut(key).pending_restart = None;
                self.mark_state_dirty();
            }
            Err(e) => {
                // A failed start, such as a command missing from `$PATH`.
                let reason = engine_reason(&e);
                if let Some(exec) = self.exec_mut(key) {
                    // The retry follows this failed start, not an earlier exit.
                    exec.exit_code = None;
                }
                warn!(executable = %key, reason, "start failed");
                let record = self.state.exec_mut(key);
                record.pending_restart = None;
                record.status = Some(Status::Error);
                self.event(serde_json::json!({
                    "event": "error",
                    "deployment": key.deployment,
                    "component": key.component,
                    "executable": key.executable,
                    "error_code": ErrorCode::ExecutableFailed,
                    "reason": reason,
                }));
                match decide(policy, &Happening::StartFailed) {
                    Decision::Restart => {
                        let settings = self.config.restart;
                        let record = self.state.exec_mut(key);
                        let delay = record.backoff.next_delay(&settings, None);
                        self.mark_state_dirty();
                        let exec = self.exec_mut(key).expect("exec exists");
                        exec.set(
                            Status::Error,
                            Some(format!("{reason} (retrying in {})", human(delay))),
                            Some(ErrorCode::ExecutableFailed),
                        );
                        exec.due = Some(Instant::now() + delay);
                    }
                    _ => {
                        let exec = self.exec_mut(key).expect("exec exists");
                        exec.set(
                            Status::Error,
                            Some(reason),
                            Some(ErrorCode::ExecutableFailed),
                        );
                        self.mark_state_dirty();
                    }
                }
            }
        }
        self.mark_dirty(&key.deployment);
        if let Some(dep) = self.deployments.get_mut(&key.deployment) {
            dep.update_phase();
        }
        // An update waiting for this start to finish applies now.
        if self.exec_mut(key).is_some_and(|e| e.pending_swap.is_some()) {
            self.swap(key);
            return;
        }
        // Events that arrived meanwhile, in their order.
        let deferred = self
            .exec_mut(key)
            .map(|e| std::mem::take(&mut e.deferred))
            .unwrap_or_default();
        for event in deferred {
            self.on_event(event);
        }
    }

    // ---- engine events -----------------------------------------------------------

    fn on_event(&mut self, event: EngineEvent) {
        let Some(key) = key_from_labels(&event.labels) else {
            return;
        };
        if self
            .deployments
            .get(&key.deployment)
            .is_none_or(|dep| dep.removing)
        {
            return; // unknown, or being removed by berth
        }
        let Some(exec) = self.exec_mut(&key) else {
            return;
        };
        if exec.busy {
            exec.deferred.push(event);
            return;
        }
        if exec
            .container_id
            .as_deref()
            .is_some_and(|id| id != event.container_id)
        {
            return; // about an older container of this executable
        }
        let stale = event.time_nanos < exec.started_nanos;
        match event.action {
            EventAction::Kill { .. } if !exec.berth_stopping && !stale => {
                exec.killed_by_other = true;
            }
            EventAction::Die { exit_code } if !stale => {
                if matches!(
                    exec.status,
                    Status::Stopped | Status::Completed | Status::Error
                ) && exec.due.is_none()
                {
                    return; // already settled
                }
                let code = exit_code.unwrap_or(0);
                let happening = if exec.killed_by_other {
                    exec.manual_at = Some(event.time_nanos);
                    Happening::StoppedByHand
                } else {
                    Happening::Exited { code }
                };
                let ran_for = (exec.started_nanos > 0).then(|| {
                    Duration::from_nanos((event.time_nanos - exec.started_nanos).max(0) as u64)
                });
                exec.killed_by_other = false;
                self.apply(&key, happening, Some(code), ran_for);
            }
            EventAction::Start if !stale => {
                if exec.status == Status::Running {
                    return; // berth's own start, already applied
                }
                exec.started_nanos = event.time_nanos;
                exec.started_at = Some(timestamp(
                    SystemTime::UNIX_EPOCH + Duration::from_nanos(event.time_nanos as u64),
                ));
                exec.exit_code = None;
                exec.launched = true;
                self.apply(&key, Happening::StartedByHand, None, None);
            }
            EventAction::Destroy if !exec.berth_stopping => {
                exec.container_id = None;
                exec.started_at = None;
                let already_stopped = exec.status == Status::Stopped;
                let record = self.state.exec_mut(&key);
                record.container_id = None;
                if !already_stopped {
                    self.apply(&key, Happening::StoppedByHand, None, None);
                }
            }
            _ => {}
        }
    }

    /// Applies a restart decision to one executable.
    fn apply(
        &mut self,
        key: &ExecKey,
        happening: Happening,
        code: Option<i64>,
        ran_for: Option<Duration>,
    ) {
        let Some(dep) = self.deployments.get(&key.deployment) else {
            return;
        };
        let policy = dep.spec.restart;
        let decision = decide(policy, &happening);
        let settings = self.config.restart;
        debug!(executable = %key, ?happening, ?decision, "decision");
        let exec = self.exec_mut(key).expect("exec exists");
        exec.exit_code = code.filter(|_| !matches!(happening, Happening::StartedByHand));
        let failed = code.is_some_and(|c| c != 0);
        let failure_code = failed.then_some(ErrorCode::ExecutableFailed);
        match decision {
            Decision::Restart => {
                let record = self.state.exec_mut(key);
                let delay = record.backoff.next_delay(&settings, ran_for);
                record.exit_code = code;
                let exit = code.map_or("an interruption".to_string(), |c| format!("exit code {c}"));
                if delay.is_zero() {
                    self.restart(key, &exit, code);
                } else {
                    self.mark_state_dirty();
                    let exec = self.exec_mut(key).expect("exec exists");
                    exec.set(
                        Status::Pending,
                        Some(format!(
                            "restarting in {} after {exit} (back-off)",
                            human(delay)
                        )),
                        failure_code,
                    );
                    exec.due = Some(Instant::now() + delay);
                    info!(executable = %key, exit_code = code, delay_ms = delay.as_millis() as u64, "restart after back-off");
                }
            }
            Decision::Complete => {
                exec.set(Status::Completed, None, None);
                self.record_status(key, Status::Completed, code);
            }
            Decision::Fail => {
                let reason = exit_reason(code.unwrap_or(0), policy);
                exec.set(
                    Status::Error,
                    Some(reason.clone()),
                    Some(ErrorCode::ExecutableFailed),
                );
                self.event(serde_json::json!({
                    "event": "error",
                    "deployment": key.deployment,
                    "component": key.component,
                    "executable": key.executable,
                    "error_code": ErrorCode::ExecutableFailed,
                    "exit_code": code,
                    "reason": reason,
                }));
                self.record_status(key, Status::Error, code);
            }
            Decision::SuspendUntilReboot => {
                exec.set(Status::Stopped, Some(MANUAL_STOP_REASON.into()), None);
                exec.due = None;
                self.state.exec_mut(key).manual_stop = true;
                self.record_status(key, Status::Stopped, code);
                // Rare, and what an operator did by hand: on disk at once.
                self.save_state();
                info!(executable = %key, "stopped manually; restart policy suspended until reboot");
                self.event(serde_json::json!({
                    "event": "manual_stop",
                    "deployment": key.deployment,
                    "component": key.component,
                    "executable": key.executable,
                    "exit_code": code,
                    "reason": MANUAL_STOP_REASON,
                }));
            }
            Decision::LeaveStopped => {
                exec.set(Status::Stopped, Some(NEVER_INTERRUPTED_REASON.into()), None);
                self.record_status(key, Status::Stopped, code);
            }
            Decision::Resume => {
                exec.set(Status::Running, None, None);
                exec.due = None;
                let record = self.state.exec_mut(key);
                record.manual_stop = false;
                self.record_status(key, Status::Running, None);
                self.save_state();
            }
            Decision::Unchanged => {
                let record = self.state.exec(key).cloned().unwrap_or_default();
                self.restore_recorded(key, &record, code.unwrap_or(0));
                return;
            }
        }
        self.mark_dirty(&key.deployment);
    }

    /// Commits to a restart (counted, durably) and starts the container.
    fn restart(&mut self, key: &ExecKey, exit: &str, code: Option<i64>) {
        let count = self.state.exec(key).map_or(0, |r| r.restart_count) + 1;
        info!(executable = %key, exit_code = code, restart_count = count, "restarting");
        self.event(serde_json::json!({
            "event": "restart",
            "deployment": key.deployment,
            "component": key.component,
            "executable": key.executable,
            "exit_code": code,
            "reason": format!("restarting after {exit}"),
            "restart_count": count,
        }));
        if let Some(exec) = self.exec_mut(key) {
            // A start that keeps failing stays `Error` while it is retried.
            if exec.status != Status::Error {
                exec.set(
                    Status::Pending,
                    Some(format!("restarting after {exit}")),
                    None,
                );
            }
        }
        self.launch(key, true);
        self.mark_dirty(&key.deployment);
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        let mut pulls = Vec::new();
        let mut removals = Vec::new();
        for dep in self.deployments.values_mut() {
            if dep.pull_due.is_some_and(|t| t <= now) {
                dep.pull_due = None;
                pulls.push(dep.spec.id.clone());
            }
            for exec in &mut dep.execs {
                if exec.due.is_some_and(|t| t <= now) {
                    exec.due = None;
                    due.push((exec.key.clone(), exec.exit_code));
                }
            }
            for exec in &mut dep.retiring {
                if exec.due.is_some_and(|t| t <= now) {
                    exec.due = None;
                    removals.push(exec.key.clone());
                }
            }
        }
        for key in removals {
            self.remove_container(&key);
        }
        for (key, code) in due {
            let exit = code.map_or("a failed start".to_string(), |c| format!("exit code {c}"));
            self.restart(&key, &exit, code);
        }
        for id in pulls {
            self.maybe_provision(&id);
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.deployments
            .values()
            .flat_map(|d| {
                d.execs
                    .iter()
                    .chain(&d.retiring)
                    .filter_map(|e| e.due)
                    .chain(d.pull_due)
            })
            .min()
    }

    // ---- state and reports -------------------------------------------------------

    fn exec_mut(&mut self, key: &ExecKey) -> Option<&mut Exec> {
        self.deployments
            .get_mut(&key.deployment)?
            .execs
            .iter_mut()
            .find(|e| e.key == *key)
    }

    fn record_status(&mut self, key: &ExecKey, status: Status, code: Option<i64>) {
        let record = self.state.exec_mut(key);
        record.status = Some(status);
        record.exit_code = code;
        self.mark_state_dirty();
    }

    fn note_position(&mut self, nanos: i64) {
        if self.state.event_position.is_none_or(|p| nanos > p) {
            self.state.event_position = Some(nanos);
            self.state_dirty = true;
        }
    }

    /// A change the next periodic save (or any durable one) writes. Only the
    /// commitment to a restart must be on disk before berth acts on it; the
    /// rest (statuses, start times, the event position, manual stops) can be
    /// rebuilt from the engine after a crash, so it is written in batches.
    fn mark_state_dirty(&mut self) {
        self.state_dirty = true;
    }

    fn save_state(&mut self) {
        // Restart counts live in the state alone; mirror them for the docs.
        if let Err(e) = self.store.save(&self.state) {
            warn!(error = %e, "cannot save state");
            self.event(serde_json::json!({
                "event": "error",
                "error_code": ErrorCode::StateStore,
                "reason": e.to_string(),
            }));
        } else {
            self.state_dirty = false;
        }
    }

    fn mark_dirty(&mut self, id: &str) {
        if let Some(dep) = self.deployments.get_mut(id) {
            dep.dirty = true;
        }
    }

    fn publish_dirty(&mut self) {
        // A deployment's document shows its dependencies' errors: when one
        // changes, so may the documents of those that depend on it.
        loop {
            let dirty: Vec<String> = self
                .deployments
                .values()
                .filter(|d| d.dirty)
                .map(|d| d.spec.id.clone())
                .collect();
            let mut more = false;
            let master_dirty = dirty.iter().any(|d| d == ROS_MASTER_DEPLOYMENT);
            for dep in self.deployments.values_mut() {
                let affected = dep.spec.depends_on.iter().any(|d| dirty.contains(d))
                    || (dep.spec.ros && master_dirty);
                if !dep.dirty && affected {
                    dep.dirty = true;
                    more = true;
                }
            }
            if !more {
                break;
            }
        }
        let device = self.config.device_id.clone();
        let mut docs = Vec::new();
        for dep in self.deployments.values().filter(|d| d.dirty) {
            let (id, mut doc) = dep.document(&device, &self.state);
            if let Some(failed) = self.failed_dependency(&id) {
                doc.status = Status::Error;
                doc.error_code = Some(ErrorCode::DependencyFailed);
                doc.reason = Some(format!("{failed} is in Error"));
            }
            docs.push((id, doc));
        }
        if docs.is_empty() {
            return;
        }
        self.publish_summary();
        let mut changes = Vec::new();
        for dep in self.deployments.values_mut() {
            if dep.dirty && dep.published_phase != Some(dep.phase) {
                dep.published_phase = Some(dep.phase);
                changes.push((dep.spec.id.clone(), dep.phase, dep.failure.clone()));
            }
            dep.dirty = false;
        }
        for (id, phase, reason) in changes {
            self.event(serde_json::json!({
                "event": "phase",
                "deployment": id,
                "phase": phase,
                "reason": reason,
            }));
        }
        for (id, doc) in docs {
            if id == ROS_MASTER_DEPLOYMENT {
                self.publish_ros_master(&self.deployments[&id]);
                continue;
            }
            self.reporter.publish(
                Topic::Deployment(id),
                serde_json::to_value(doc).expect("documents serialize"),
            );
        }
    }

    /// The `STATUS=` line of `systemctl status`; the notifier drops it when
    /// it has not changed, and does nothing outside systemd.
    fn publish_summary(&self) {
        let summary = crate::notify::summary(
            self.deployments
                .values()
                .filter(|d| d.spec.id != ROS_MASTER_DEPLOYMENT)
                .map(|dep| {
                    let restarts = dep
                        .execs
                        .iter()
                        .map(|e| self.state.exec(&e.key).map_or(0, |r| r.restart_count))
                        .sum();
                    (dep.status(), restarts)
                }),
        );
        self.notifier.status(&summary);
    }

    fn publish_agent(&self) {
        let doc = AgentDoc {
            state: "online",
            version: env!("CARGO_PKG_VERSION"),
            boot_id: self.boot_id.clone(),
            docker: if self.engine_up {
                "connected"
            } else {
                "unreachable"
            },
            since: self.since.clone(),
            error_code: (!self.engine_up).then_some(ErrorCode::EngineUnreachable),
        };
        self.reporter.publish(
            Topic::Agent,
            serde_json::to_value(doc).expect("documents serialize"),
        );
    }

    fn event(&self, mut payload: serde_json::Value) {
        payload["device_id"] = self.config.device_id.clone().into();
        payload["time"] = timestamp(SystemTime::now()).into();
        self.reporter.publish(Topic::Events, payload);
    }
}

const MANUAL_STOP_REASON: &str = "stopped manually; restart policy suspended until reboot";
const NEVER_INTERRUPTED_REASON: &str =
    "interrupted by a reboot or engine restart; restart policy never";

impl Exec {
    /// A container found without a spec: only ever stopped and removed.
    fn orphan(key: ExecKey, container_id: String) -> Self {
        Exec {
            key,
            spec: ExecutableSpec {
                name: String::new(),
                image: String::new(),
                pull: PullPolicy::Never,
                command: None,
                env: BTreeMap::new(),
                limits: Default::default(),
                volumes: Vec::new(),
                devices: Vec::new(),
                network: Default::default(),
            },
            env: BTreeMap::new(),
            hash: String::new(),
            container_id: Some(container_id),
            status: Status::Unknown,
            reason: None,
            error_code: None,
            exit_code: None,
            started_at: None,
            started_nanos: 0,
            busy: false,
            deferred: Vec::new(),
            due: None,
            killed_by_other: false,
            berth_stopping: true,
            launched: false,
            container_hash: None,
            pending_swap: None,
            manual_at: None,
            running_image: None,
        }
    }

    fn set(&mut self, status: Status, reason: Option<String>, error_code: Option<ErrorCode>) {
        self.status = status;
        self.reason = reason;
        self.error_code = error_code;
    }
}

impl Deployment {
    /// `exports`: what the deployments this one depends on export.
    fn new(config: &AgentConfig, spec: DeploymentSpec, exports: &BTreeMap<String, String>) -> Self {
        let execs = spec
            .executables()
            .map(|(component, exe)| {
                let env = merged_env(config, &spec, exe, exports);
                Exec {
                    key: ExecKey::new(&spec.id, &component.name, &exe.name),
                    hash: spec_hash(exe, &env),
                    spec: exe.clone(),
                    env,
                    container_id: None,
                    status: Status::Pending,
                    reason: Some("waiting for the docker engine".into()),
                    error_code: None,
                    exit_code: None,
                    started_at: None,
                    started_nanos: 0,
                    busy: false,
                    deferred: Vec::new(),
                    due: None,
                    killed_by_other: false,
                    berth_stopping: false,
                    launched: false,
                    container_hash: None,
                    pending_swap: None,
                    manual_at: None,
                    running_image: None,
                }
            })
            .collect();
        Deployment {
            spec,
            phase: Phase::InProgress,
            images_ready: false,
            pulling: false,
            pull_backoff: Backoff::default(),
            pull_due: None,
            execs,
            dirty: true,
            failure: None,
            removing: false,
            updating: false,
            retiring: Vec::new(),
            published_phase: None,
        }
    }

    /// The stand-in for a deployment whose file cannot be applied.
    fn failed(id: &str, source: std::path::PathBuf, reason: String) -> Self {
        let spec = DeploymentSpec {
            id: id.to_string(),
            package: String::new(),
            package_version: String::new(),
            restart: Default::default(),
            depends_on: Vec::new(),
            ros: false,
            env: BTreeMap::new(),
            exports: BTreeMap::new(),
            components: Vec::new(),
            source,
        };
        let mut dep = Deployment::new_empty(spec);
        dep.phase = Phase::FailedToStart;
        dep.failure = Some(reason);
        dep
    }

    fn new_empty(spec: DeploymentSpec) -> Self {
        Deployment {
            spec,
            phase: Phase::InProgress,
            images_ready: false,
            pulling: false,
            pull_backoff: Backoff::default(),
            pull_due: None,
            execs: Vec::new(),
            dirty: true,
            failure: None,
            removing: false,
            updating: false,
            retiring: Vec::new(),
            published_phase: None,
        }
    }

    /// `Succeeded` once every executable has been started.
    fn update_phase(&mut self) {
        if matches!(self.phase, Phase::InProgress | Phase::Provisioning)
            && self.execs.iter().all(|e| e.launched)
        {
            self.phase = Phase::Succeeded;
            self.dirty = true;
        }
    }

    /// The first status any executable has, in the order of SPEC 5.
    fn status(&self) -> Status {
        match self
            .execs
            .iter()
            .chain(&self.retiring)
            .map(|e| e.status)
            .min()
        {
            Some(status) => status,
            None if self.failure.is_some() => Status::Error,
            None if self.phase == Phase::DeploymentStopped => Status::Stopped,
            None => Status::Pending,
        }
    }

    fn document(&self, device_id: &str, state: &State) -> (String, DeploymentDoc) {
        let executables: Vec<ExecutableDoc> = self
            .execs
            .iter()
            .chain(&self.retiring)
            .map(|e| ExecutableDoc {
                component: e.key.component.clone(),
                name: e.key.executable.clone(),
                container_id: e.container_id.clone(),
                image: e
                    .running_image
                    .clone()
                    .unwrap_or_else(|| e.spec.image.clone()),
                status: e.status,
                reason: e.reason.clone(),
                error_code: e.error_code,
                exit_code: e.exit_code,
                restart_count: state.exec(&e.key).map_or(0, |r| r.restart_count),
                started_at: e.started_at.as_deref().map(normalize_time),
            })
            .collect();
        let worst = executables.iter().min_by_key(|e| e.status);
        let status = self.status();
        let error_code = executables
            .iter()
            .filter(|e| e.status == status)
            .find_map(|e| e.error_code);
        // A file that cannot be applied says why; otherwise the reason of the
        // executable that gives the deployment its status.
        let reason = self.failure.clone().or_else(|| {
            worst.filter(|e| e.reason.is_some()).map(|e| {
                format!(
                    "{}/{}: {}",
                    e.component,
                    e.name,
                    e.reason.as_deref().unwrap_or("")
                )
            })
        });
        let doc = DeploymentDoc {
            device_id: device_id.to_string(),
            deployment_id: self.spec.id.clone(),
            package: self.spec.package.clone(),
            package_version: self.spec.package_version.clone(),
            phase: self.phase,
            status,
            error_code,
            reason,
            restart_policy: self.spec.restart,
            restart_count: executables.iter().map(|e| e.restart_count).sum(),
            executables,
            updated_at: timestamp(SystemTime::now()),
        };
        (self.spec.id.clone(), doc)
    }
}

fn exit_reason(code: i64, policy: crate::model::RestartPolicy) -> String {
    format!("exited with code {code}; restart policy {policy}")
}

/// The environment of one executable, later layers winning: the exports of
/// the deployments it depends on, the executable's own env, the deployment's
/// env (the operator's instance settings), and `ROS_MASTER_URI` for a ROS
/// deployment.
fn merged_env(
    config: &AgentConfig,
    spec: &DeploymentSpec,
    exe: &ExecutableSpec,
    exports: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = exports.clone();
    env.extend(exe.env.clone());
    env.extend(spec.env.clone());
    if spec.ros {
        let uri = match exe.network {
            crate::model::Network::Host => config.ros.master_uri.clone(),
            // The master is on the host network.
            crate::model::Network::Isolated => config
                .ros
                .master_uri
                .replacen("localhost", converge::HOST_ALIAS, 1)
                .replacen("127.0.0.1", converge::HOST_ALIAS, 1),
        };
        env.insert("ROS_MASTER_URI".into(), uri);
    }
    env
}

/// Pulls each image as its pull policy says.
async fn ensure_images<R: ContainerRuntime>(
    runtime: &R,
    images: &[(String, PullPolicy)],
    registries: &[RegistryAuth],
) -> Result<(), (String, RuntimeError)> {
    let mut done: Vec<&str> = Vec::new();
    for (image, pull) in images {
        if done.contains(&image.as_str()) {
            continue;
        }
        let fail = |e| (image.clone(), e);
        let present = runtime.image_present(image).await.map_err(fail)?;
        match (pull, present) {
            (PullPolicy::Never, false) => {
                return Err(fail(RuntimeError::ImageUnavailable {
                    image: image.clone(),
                    message: "not present and pull = \"never\"".into(),
                }))
            }
            (PullPolicy::IfNotPresent, true) | (PullPolicy::Never, true) => {}
            (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => {
                let auth = registries.iter().find(|r| registry_of(image) == r.server);
                info!(image, authenticated = auth.is_some(), "pulling image");
                runtime.pull(image, auth).await.map_err(fail)?;
            }
        }
        done.push(image);
    }
    Ok(())
}

/// The registry host of an image reference (`docker.io` when none is named).
fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// Creates the container when there is none, starts it, and reads it back.
async fn launch_container<R: ContainerRuntime>(
    runtime: &R,
    container_id: Option<String>,
    spec: &ContainerSpec,
) -> (Option<String>, Result<ContainerInfo, RuntimeError>) {
    let id = match container_id {
        Some(id) => id,
        None => match converge::create_container(runtime, spec).await {
            Ok(id) => id,
            Err(RuntimeError::Engine { message, .. }) if message.contains("No such image") => {
                return (
                    None,
                    Err(RuntimeError::ImageUnavailable {
                        image: spec.image.clone(),
                        message,
                    }),
                )
            }
            Err(RuntimeError::NotFound(_)) => {
                return (
                    None,
                    Err(RuntimeError::ImageUnavailable {
                        image: spec.image.clone(),
                        message: format!("no such image: {}", spec.image),
                    }),
                )
            }
            Err(e) => return (None, Err(e)),
        },
    };
    debug!(container = %spec.name, "start request");
    if let Err(e) = runtime.start(&id).await {
        return (Some(id), Err(e));
    }
    let info = runtime.inspect(&id).await;
    (Some(id), info)
}

/// The part of an engine error an operator needs: for a command missing from
/// `$PATH`, the runtime's own `exec: "...": executable file not found in $PATH`.
fn engine_reason(e: &RuntimeError) -> String {
    let message = match e {
        RuntimeError::Engine { message, .. } => message.as_str(),
        other => return other.to_string(),
    };
    if let Some(start) = message.find("exec: \"") {
        let rest = &message[start..];
        let end = rest.find(": unknown").unwrap_or(rest.len());
        return rest[..end].to_string();
    }
    message.to_string()
}

/// Per container id, what the replayed history says about how it ended.
fn classify_replay(replay: &[EngineEvent]) -> HashMap<String, Replayed> {
    let mut out: HashMap<String, Replayed> = HashMap::new();
    for event in replay {
        let seen = out.entry(event.container_id.clone()).or_default();
        match event.action {
            EventAction::Kill { .. } => seen.killed_by_other = true,
            EventAction::Die { .. } => {
                seen.died = true;
                seen.manual = seen.killed_by_other;
                seen.killed_by_other = false;
            }
            EventAction::Destroy => {
                seen.destroyed = true;
                seen.manual = true;
            }
            EventAction::Start => {
                *seen = Replayed::default();
            }
            _ => {}
        }
    }
    out
}

fn ran_for(info: &ContainerInfo) -> Option<Duration> {
    let started = parse_nanos(info.started_at.as_deref()?);
    let finished = parse_nanos(info.finished_at.as_deref()?);
    (started > 0 && finished >= started).then(|| Duration::from_nanos((finished - started) as u64))
}

/// Nanoseconds since the epoch of an RFC 3339 time; 0 when unparsable.
fn parse_nanos(t: &str) -> i64 {
    humantime::parse_rfc3339(t)
        .ok()
        .map(unix_nanos)
        .unwrap_or(0)
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The engine's nanosecond times, shown with milliseconds like every other time.
fn normalize_time(t: &str) -> String {
    humantime::parse_rfc3339(t)
        .map(timestamp)
        .unwrap_or_else(|_| t.to_string())
}

fn human(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The loop driven by the fake engine and the memory reporter, in real
    //! time with a 100 ms back-off.

    use std::path::Path;

    use serde_json::Value;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::config::{DockerSettings, LogSettings, MqttSettings, RestartSettings, RosSettings};
    use crate::model::{labels, Command, ComponentSpec, Limits, RestartPolicy};
    use crate::report::MemoryReporter;
    use crate::runtime::fake::{Call, FakeRuntime};

    const DEVICE: &str = "robot-42";
    const BOOT: &str = "3f1c0d6e-boot-1";
    const IMAGE: &str = "registry.example.com/talker:1.0";
    const NAME: &str = "berth.robot-42.talker.talker.talker";
    const INITIAL: Duration = Duration::from_millis(100);
    /// Long enough for any restart berth would wrongly make to show.
    const QUIET: Duration = Duration::from_millis(350);
    const NOPE: &str = "failed to create shim task: OCI runtime create failed: runc create failed: \
        unable to start container process: exec: \"nope\": executable file not found in $PATH: unknown";
    const NOPE_REASON: &str = "exec: \"nope\": executable file not found in $PATH";

    fn config(state_dir: &Path) -> AgentConfig {
        AgentConfig {
            device_id: DEVICE.into(),
            deployments_dir: state_dir.join("deployments.d"),
            state_dir: state_dir.to_path_buf(),
            boot_id_file: state_dir.join("boot_id"),
            docker: DockerSettings {
                host: "unix:///var/run/docker.sock".into(),
                registries: Vec::new(),
            },
            mqtt: MqttSettings {
                url: "mqtt://127.0.0.1:1883".into(),
                client_id: format!("berth-{DEVICE}"),
                topic_prefix: "berth".into(),
                username: None,
                password_file: None,
                ca_file: None,
                cert_file: None,
                key_file: None,
                keep_alive: Duration::from_secs(30),
            },
            restart: RestartSettings {
                backoff_initial: INITIAL,
                backoff_max: Duration::from_secs(2),
                backoff_reset_after: Duration::from_secs(60),
            },
            ros: RosSettings {
                master_image: "ros:noetic-ros-core".into(),
                master_command: vec!["roscore".into()],
                master_uri: "http://localhost:11311".into(),
            },
            log: LogSettings {
                level: "debug".into(),
                json: false,
            },
            remote: Default::default(),
            source: state_dir.join("berth.toml"),
        }
    }

    fn deployment(restart: RestartPolicy, pull: PullPolicy, program: &str) -> DeploymentSpec {
        DeploymentSpec {
            id: "talker".into(),
            package: "ros-talker".into(),
            package_version: "1.0.0".into(),
            restart,
            depends_on: Vec::new(),
            ros: false,
            env: BTreeMap::from([("ROBOT_NAME".into(), "r42".into())]),
            exports: BTreeMap::new(),
            components: vec![ComponentSpec {
                name: "talker".into(),
                executables: vec![ExecutableSpec {
                    name: "talker".into(),
                    image: IMAGE.into(),
                    pull,
                    command: Some(Command::Exec(vec![program.into(), "--rate=10".into()])),
                    env: BTreeMap::from([("LOG_LEVEL".into(), "debug".into())]),
                    limits: Limits {
                        cpus: Some(0.5),
                        memory_mb: Some(256),
                    },
                    volumes: Vec::new(),
                    devices: Vec::new(),
                    network: Default::default(),
                }],
            }],
            source: "/etc/berth/deployments.d/talker.toml".into(),
        }
    }

    fn key() -> ExecKey {
        ExecKey::new("talker", "talker", "talker")
    }

    /// One supervisor running in a task, with its fakes.
    struct Harness {
        runtime: Arc<FakeRuntime>,
        reporter: Arc<MemoryReporter>,
        store: StateStore,
        token: CancellationToken,
        task: JoinHandle<()>,
    }

    impl Harness {
        fn start(runtime: Arc<FakeRuntime>, state_dir: &Path, spec: DeploymentSpec) -> Self {
            Self::start_on_boot(runtime, state_dir, spec, BOOT)
        }

        fn start_on_boot(
            runtime: Arc<FakeRuntime>,
            state_dir: &Path,
            spec: DeploymentSpec,
            boot_id: &str,
        ) -> Self {
            let store = StateStore::open(state_dir).unwrap();
            let reporter = Arc::new(MemoryReporter::default());
            let token = CancellationToken::new();
            let supervisor = Supervisor::from_parts(Parts {
                config: config(state_dir),
                deployments: BTreeMap::from([(spec.id.clone(), spec)]),
                runtime: runtime.clone(),
                reporter: reporter.clone(),
                store: store.clone(),
                state: store.load().unwrap(),
                boot_id: boot_id.into(),
                registries: Vec::new(),
                notifier: crate::notify::Notifier::disabled(),
                invalid: BTreeMap::new(),
            });
            let task = tokio::spawn(supervisor.run(token.clone()));
            Harness {
                runtime,
                reporter,
                store,
                token,
                task,
            }
        }

        /// Every document published for the deployment, oldest first.
        fn docs(&self) -> Vec<Value> {
            let topic = Topic::Deployment("talker".into());
            let published = self.reporter.published.lock().unwrap();
            published
                .iter()
                .filter(|(t, _)| *t == topic)
                .map(|(_, v)| v.clone())
                .collect()
        }

        fn events(&self) -> Vec<Value> {
            let published = self.reporter.published.lock().unwrap();
            published
                .iter()
                .filter(|(t, _)| *t == Topic::Events)
                .map(|(_, v)| v.clone())
                .collect()
        }

        /// Waits until the latest deployment document satisfies `pred`.
        async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let latest = self.reporter.latest(&Topic::Deployment("talker".into()));
                if let Some(doc) = latest.as_ref().filter(|d| pred(d)) {
                    return doc.clone();
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}; latest document: {:#}",
                    latest.unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        async fn running(&self, restart_count: u64) -> Value {
            self.wait_for(&format!("Running with {restart_count} restarts"), |d| {
                d["status"] == "Running" && d["restart_count"] == restart_count
            })
            .await
        }

        fn starts(&self) -> usize {
            count(&self.runtime.calls(), |c| matches!(c, Call::Start(_)))
        }

        async fn shutdown(self) {
            self.token.cancel();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("supervisor stops on cancel")
                .unwrap();
        }
    }

    fn count(calls: &[Call], pred: impl Fn(&Call) -> bool) -> usize {
        calls.iter().filter(|c| pred(c)).count()
    }

    fn exe(doc: &Value) -> &Value {
        &doc["executables"][0]
    }

    fn fake() -> Arc<FakeRuntime> {
        Arc::new(FakeRuntime::new().with_registry_image(IMAGE))
    }

    #[tokio::test]
    async fn provisions_a_deployment_to_succeeded_and_running() {
        let dir = tempfile::tempdir().unwrap();
        let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
        let h = Harness::start(fake(), dir.path(), spec.clone());
        let doc = h
            .wait_for("Succeeded/Running", |d| {
                d["phase"] == "Succeeded" && d["status"] == "Running"
            })
            .await;

        let info = h
            .runtime
            .container(NAME)
            .expect("container named as SPEC 4 says");
        assert!(info.running);
        assert_eq!(doc["device_id"], DEVICE);
        assert_eq!(doc["restart_policy"], "always");
        assert_eq!(doc["restart_count"], 0);
        assert_eq!(doc["error_code"], Value::Null);
        assert_eq!(doc["reason"], Value::Null);
        assert_eq!(exe(&doc)["restart_count"], 0);
        assert_eq!(exe(&doc)["container_id"], info.id.as_str());
        assert_eq!(exe(&doc)["image"], IMAGE);
        assert_eq!(
            exe(&doc)["started_at"],
            normalize_time(info.started_at.as_deref().unwrap()).as_str()
        );

        let created = h.runtime.spec(NAME).unwrap();
        let (_, exe_spec) = spec.executables().next().unwrap();
        let env = merged_env(&config(dir.path()), &spec, exe_spec, &BTreeMap::new());
        assert_eq!(
            created.labels,
            BTreeMap::from([
                (labels::DEVICE.to_string(), DEVICE.to_string()),
                (labels::DEPLOYMENT.to_string(), "talker".to_string()),
                (labels::COMPONENT.to_string(), "talker".to_string()),
                (labels::EXECUTABLE.to_string(), "talker".to_string()),
                (labels::SPEC_HASH.to_string(), spec_hash(exe_spec, &env)),
            ])
        );
        assert_eq!(
            created.cmd,
            Some(vec!["talker".to_string(), "--rate=10".to_string()])
        );
        assert_eq!(created.env["ROBOT_NAME"], "r42");
        assert_eq!(created.env["LOG_LEVEL"], "debug");
        assert_eq!(created.network_mode, "host");
        assert_eq!(created.nano_cpus, Some(500_000_000));
        assert_eq!(created.memory_bytes, Some(256 * 1024 * 1024));

        let calls = h.runtime.calls();
        let pull = calls
            .iter()
            .position(|c| *c == Call::Pull(IMAGE.into(), None));
        let create = calls.iter().position(|c| *c == Call::Create(NAME.into()));
        assert!(
            pull.is_some() && pull < create,
            "pull before create: {calls:?}"
        );
        assert_eq!(count(&calls, |c| matches!(c, Call::Create(_))), 1);
        assert_eq!(h.starts(), 1);
        assert!(
            h.docs().iter().any(|d| d["phase"] == "Provisioning"
                && exe(d)["status"] == "Pending"
                && exe(d)["reason"] == format!("pulling image {IMAGE}").as_str()),
            "a Pending document while pulling"
        );
        // Statuses and start times are saved in batches; shutdown writes them.
        let store = h.store.clone();
        h.shutdown().await;
        let record = store.load().unwrap().exec(&key()).cloned().unwrap();
        assert_eq!(record.status, Some(Status::Running));
        assert_eq!(record.restart_count, 0);
        assert_eq!(record.container_id.as_deref(), Some(info.id.as_str()));
    }

    /// SPEC 6, the first two rows of the table, one row per policy.
    #[tokio::test]
    async fn exits_follow_the_restart_table() {
        struct Row {
            policy: RestartPolicy,
            code: i64,
            status: &'static str,
            exit_code: Option<i64>,
            restart_count: u64,
            error_code: Option<&'static str>,
        }
        use RestartPolicy::*;
        #[rustfmt::skip]
        let rows = [
            Row { policy: Always, code: 0, status: "Running", exit_code: None, restart_count: 1, error_code: None },
            Row { policy: Always, code: 3, status: "Running", exit_code: None, restart_count: 1, error_code: None },
            Row { policy: OnFailure, code: 0, status: "Completed", exit_code: Some(0), restart_count: 0, error_code: None },
            Row { policy: OnFailure, code: 3, status: "Running", exit_code: None, restart_count: 1, error_code: None },
            Row { policy: Never, code: 0, status: "Completed", exit_code: Some(0), restart_count: 0, error_code: None },
            Row { policy: Never, code: 3, status: "Error", exit_code: Some(3), restart_count: 0, error_code: Some("DEP_E152") },
        ];
        let runs = rows.into_iter().map(|row| async move {
            let name = format!("exit {} under {}", row.code, row.policy);
            let dir = tempfile::tempdir().unwrap();
            let spec = deployment(row.policy, PullPolicy::IfNotPresent, "talker");
            let h = Harness::start(fake(), dir.path(), spec);
            h.running(0).await;
            h.runtime.exit(NAME, row.code);
            let doc = h
                .wait_for(&name, |d| {
                    d["status"] == row.status && d["restart_count"] == row.restart_count
                })
                .await;
            tokio::time::sleep(QUIET).await;
            let last = h
                .reporter
                .latest(&Topic::Deployment("talker".into()))
                .unwrap();
            assert_eq!(last["status"], doc["status"], "{name}: settled");
            assert_eq!(h.starts() as u64, 1 + row.restart_count, "{name}: starts");
            assert_eq!(last["restart_count"], row.restart_count, "{name}");
            assert_eq!(exe(&last)["restart_count"], row.restart_count, "{name}");
            assert_eq!(
                exe(&last)["exit_code"],
                serde_json::json!(row.exit_code),
                "{name}"
            );
            assert_eq!(
                last["error_code"],
                serde_json::json!(row.error_code),
                "{name}"
            );
            assert_eq!(
                exe(&last)["error_code"],
                serde_json::json!(row.error_code),
                "{name}"
            );
            assert_eq!(last["phase"], "Succeeded", "{name}");
            if row.status == "Error" {
                let reason = exe(&last)["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(reason.contains("exited with code 3"), "{name}: {reason}");
            }
            let record = h.store.load().unwrap().exec(&key()).cloned().unwrap();
            assert_eq!(
                record.restart_count, row.restart_count,
                "{name}: persisted count"
            );
            h.shutdown().await;
        });
        futures_util::future::join_all(runs).await;
    }

    #[tokio::test]
    async fn back_off_grows_from_immediate_to_doubling() {
        let dir = tempfile::tempdir().unwrap();
        let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
        let h = Harness::start(fake(), dir.path(), spec);
        h.running(0).await;
        for n in 1..=3 {
            h.runtime.exit(NAME, 3);
            h.running(n).await;
        }
        let history = h.runtime.history();
        let dies: Vec<i64> = history
            .iter()
            .filter(|e| matches!(e.action, EventAction::Die { .. }))
            .map(|e| e.time_nanos)
            .collect();
        let starts = h.runtime.start_times(NAME);
        assert_eq!((dies.len(), starts.len()), (3, 4));
        let waited: Vec<Duration> = dies
            .iter()
            .zip(&starts[1..])
            .map(|(die, start)| Duration::from_nanos((start - die) as u64))
            .collect();
        let want = [Duration::ZERO, INITIAL, 2 * INITIAL];
        for (i, (got, want)) in waited.iter().zip(want).enumerate() {
            assert!(
                *got >= want,
                "restart {}: waited {got:?}, less than {want:?}",
                i + 1
            );
        }
        // Wall time cannot show "immediate" on a loaded machine; the reasons
        // do: the first restart never waited out a back-off.
        let mut backoffs: Vec<(String, Value)> = h
            .docs()
            .iter()
            .map(exe)
            .filter(|e| e["status"] == "Pending")
            .filter(|e| {
                e["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("restarting in"))
            })
            .map(|e| {
                (
                    e["reason"].as_str().unwrap().to_string(),
                    e["error_code"].clone(),
                )
            })
            .collect();
        backoffs.dedup();
        assert_eq!(
            backoffs,
            [
                (
                    "restarting in 0.1s after exit code 3 (back-off)".to_string(),
                    "DEP_E152".into()
                ),
                (
                    "restarting in 0.2s after exit code 3 (back-off)".to_string(),
                    "DEP_E152".into()
                ),
            ]
        );
        h.shutdown().await;
    }

    /// `docker stop`, `docker kill` and `docker rm -f` by hand all suspend
    /// the policy; a `docker start` by hand brings it back.
    #[tokio::test]
    async fn manual_stop_suspends_the_policy_until_started_by_hand() {
        type Act = fn(&FakeRuntime, &str);
        let rows: [(&str, Act); 3] = [
            ("docker stop", FakeRuntime::manual_stop),
            ("docker kill", FakeRuntime::manual_kill),
            ("docker rm -f", FakeRuntime::manual_remove),
        ];
        let runs = rows.into_iter().map(|(name, act)| async move {
            let dir = tempfile::tempdir().unwrap();
            let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
            let h = Harness::start(fake(), dir.path(), spec);
            h.running(0).await;
            act(&h.runtime, NAME);
            let doc = h.wait_for(name, |d| d["status"] == "Stopped").await;
            assert_eq!(exe(&doc)["reason"], MANUAL_STOP_REASON, "{name}");
            assert_eq!(
                doc["reason"],
                format!("talker/talker: {MANUAL_STOP_REASON}").as_str()
            );
            assert_eq!(doc["error_code"], Value::Null, "{name}");
            tokio::time::sleep(QUIET).await;
            let last = h
                .reporter
                .latest(&Topic::Deployment("talker".into()))
                .unwrap();
            assert_eq!(last["status"], "Stopped", "{name}: not restarted");
            assert_eq!(last["restart_count"], 0, "{name}");
            assert_eq!(h.starts(), 1, "{name}: no start after the manual stop");
            assert_eq!(
                count(&h.runtime.calls(), |c| matches!(c, Call::Create(_))),
                1,
                "{name}"
            );
            assert!(
                h.store.load().unwrap().exec(&key()).unwrap().manual_stop,
                "{name}"
            );
            assert!(
                h.events().iter().any(|e| e["event"] == "manual_stop"),
                "{name}: a manual_stop event"
            );
            if name == "docker stop" {
                h.runtime.manual_start(NAME);
                h.running(0).await;
                assert!(!h.store.load().unwrap().exec(&key()).unwrap().manual_stop);
                h.runtime.exit(NAME, 3);
                h.running(1).await;
            }
            h.shutdown().await;
        });
        futures_util::future::join_all(runs).await;
    }

    #[tokio::test]
    async fn missing_image_is_an_error_with_dep_e161() {
        let rows = [
            ("not in the registry", PullPolicy::IfNotPresent, false, 1),
            ("absent and pull = never", PullPolicy::Never, true, 0),
        ];
        let runs = rows
            .into_iter()
            .map(|(name, pull, in_registry, pulls)| async move {
                let dir = tempfile::tempdir().unwrap();
                let runtime = if in_registry {
                    fake()
                } else {
                    Arc::new(FakeRuntime::new())
                };
                let h = Harness::start(
                    runtime,
                    dir.path(),
                    deployment(RestartPolicy::Always, pull, "talker"),
                );
                let doc = h.wait_for(name, |d| d["status"] == "Error").await;
                assert_eq!(doc["error_code"], "DEP_E161", "{name}");
                assert_eq!(exe(&doc)["error_code"], "DEP_E161", "{name}");
                let reason = exe(&doc)["reason"].as_str().unwrap();
                assert!(reason.contains(IMAGE), "{name}: {reason}");
                assert_eq!(doc["phase"], "Provisioning", "{name}");
                let calls = h.runtime.calls();
                assert!(
                    count(&calls, |c| matches!(c, Call::Pull(..))) >= pulls,
                    "{name}: {calls:?}"
                );
                if pulls == 0 {
                    assert_eq!(count(&calls, |c| matches!(c, Call::Pull(..))), 0, "{name}");
                }
                assert_eq!(
                    count(&calls, |c| matches!(c, Call::Create(_) | Call::Start(_))),
                    0
                );
                h.shutdown().await;
            });
        futures_util::future::join_all(runs).await;
    }

    #[tokio::test]
    async fn failed_start_is_an_error_with_the_exec_reason() {
        // Under `never` it stays failed.
        let dir = tempfile::tempdir().unwrap();
        let runtime = fake();
        runtime.fail_start("nope", NOPE);
        let h = Harness::start(
            runtime,
            dir.path(),
            deployment(RestartPolicy::Never, PullPolicy::IfNotPresent, "nope"),
        );
        let doc = h
            .wait_for("start failure", |d| d["status"] == "Error")
            .await;
        assert_eq!(doc["error_code"], "DEP_E152");
        assert_eq!(exe(&doc)["reason"], NOPE_REASON);
        assert_eq!(
            doc["reason"],
            format!("talker/talker: {NOPE_REASON}").as_str()
        );
        assert_eq!(doc["phase"], "Provisioning", "never started successfully");
        tokio::time::sleep(QUIET).await;
        assert_eq!(h.starts(), 1, "never: no retry");
        assert_eq!(h.runtime.container(NAME).unwrap().state, "created");
        h.shutdown().await;

        // Under `always` it is retried with back-off, `Error` while it fails,
        // and each retry counts as a restart.
        let dir = tempfile::tempdir().unwrap();
        let runtime = fake();
        runtime.fail_start("nope", NOPE);
        let h = Harness::start(
            runtime,
            dir.path(),
            deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "nope"),
        );
        let doc = h
            .wait_for("start failure retried", |d| {
                d["status"] == "Error" && d["restart_count"].as_u64() >= Some(2)
            })
            .await;
        assert_eq!(doc["error_code"], "DEP_E152");
        let reason = exe(&doc)["reason"].as_str().unwrap();
        assert!(
            reason.starts_with(NOPE_REASON) && reason.contains("retrying in"),
            "{reason}"
        );
        h.runtime.clear_fail_start("nope");
        let doc = h
            .wait_for("running after the failure is fixed", |d| {
                d["status"] == "Running" && d["phase"] == "Succeeded"
            })
            .await;
        assert_eq!(doc["error_code"], Value::Null);
        assert_eq!(
            doc["restart_count"],
            h.starts() as u64 - 1,
            "every retry counted once"
        );
        h.shutdown().await;
    }

    #[tokio::test]
    async fn engine_down_is_unknown_then_reconciled() {
        let dir = tempfile::tempdir().unwrap();
        let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
        let h = Harness::start(fake(), dir.path(), spec);
        h.running(0).await;
        h.runtime.set_down(true);
        let doc = h.wait_for("Unknown", |d| d["status"] == "Unknown").await;
        assert_eq!(doc["error_code"], "DEP_E301");
        assert_eq!(exe(&doc)["error_code"], "DEP_E301");
        let agent = h.reporter.latest(&Topic::Agent).unwrap();
        assert_eq!(
            (agent["docker"].as_str(), agent["error_code"].as_str()),
            (Some("unreachable"), Some("DEP_E301"))
        );

        // The container crashes while berth cannot see the engine.
        h.runtime.exit(NAME, 3);
        tokio::time::sleep(QUIET).await;
        assert_eq!(
            h.reporter
                .latest(&Topic::Deployment("talker".into()))
                .unwrap()["status"],
            "Unknown"
        );
        h.runtime.set_down(false);
        let doc = h.running(1).await;
        assert_eq!(doc["error_code"], Value::Null);
        assert_eq!(doc["phase"], "Succeeded");
        assert_eq!(
            h.reporter.latest(&Topic::Agent).unwrap()["docker"],
            "connected"
        );
        assert_eq!(h.starts(), 2);
        h.shutdown().await;
    }

    #[tokio::test]
    async fn a_restarted_supervisor_adopts_the_running_container() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = fake();
        let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
        let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
        h.running(0).await;
        runtime.exit(NAME, 3);
        h.running(1).await;
        h.shutdown().await;
        assert!(
            runtime.container(NAME).unwrap().running,
            "containers outlive berth"
        );

        let before = runtime.calls().len();
        let h = Harness::start(runtime.clone(), dir.path(), spec);
        let doc = h
            .wait_for("adopted", |d| {
                d["status"] == "Running" && d["phase"] == "Succeeded"
            })
            .await;
        assert_eq!(doc["restart_count"], 1, "counts survive a berth restart");
        assert_eq!(
            exe(&doc)["container_id"],
            runtime.container(NAME).unwrap().id.as_str()
        );
        let after = &runtime.calls()[before..];
        assert_eq!(
            count(after, |c| matches!(
                c,
                Call::Create(_) | Call::Start(_) | Call::Stop(_) | Call::Remove(_)
            )),
            0,
            "adopted untouched: {after:?}"
        );
        runtime.exit(NAME, 3);
        h.running(2).await;
        h.shutdown().await;
    }

    /// SPEC 6, "interrupted by a restart of the Docker engine": the engine
    /// comes back with the container exited and no `die` in its history.
    #[tokio::test]
    async fn engine_restart_interrupts_by_policy() {
        let rows = [
            (RestartPolicy::Always, "Running", 1, None),
            (RestartPolicy::OnFailure, "Running", 1, None),
            (
                RestartPolicy::Never,
                "Stopped",
                0,
                Some(NEVER_INTERRUPTED_REASON),
            ),
        ];
        let runs = rows
            .into_iter()
            .map(|(policy, status, restarts, reason)| async move {
                let dir = tempfile::tempdir().unwrap();
                let spec = deployment(policy, PullPolicy::IfNotPresent, "talker");
                let h = Harness::start(fake(), dir.path(), spec);
                h.running(0).await;
                h.runtime.restart_engine();
                let doc = h
                    .wait_for(&format!("{status} under {policy}"), |d| {
                        d["status"] == status && d["restart_count"] == restarts
                    })
                    .await;
                assert_eq!(exe(&doc)["reason"], serde_json::json!(reason), "{policy}");
                tokio::time::sleep(QUIET).await;
                assert_eq!(h.starts() as u64, 1 + restarts, "{policy}");
                h.shutdown().await;
            });
        futures_util::future::join_all(runs).await;
    }

    /// SPEC 6: a different boot clears a manual stop and restarts what the
    /// reboot interrupted, counted once.
    #[tokio::test]
    async fn a_reboot_clears_a_manual_stop() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = fake();
        let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
        let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
        h.running(0).await;
        runtime.manual_stop(NAME);
        h.wait_for("Stopped", |d| d["status"] == "Stopped").await;
        h.shutdown().await;

        // Same boot: still suspended.
        let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
        let doc = h
            .wait_for("still Stopped", |d| d["status"] == "Stopped")
            .await;
        assert_eq!(exe(&doc)["reason"], MANUAL_STOP_REASON);
        tokio::time::sleep(QUIET).await;
        assert_eq!(h.starts(), 1);
        h.shutdown().await;

        runtime.restart_engine();
        let h = Harness::start_on_boot(runtime.clone(), dir.path(), spec, "3f1c0d6e-boot-2");
        h.running(1).await;
        tokio::time::sleep(QUIET).await;
        assert_eq!(h.starts(), 2);
        let state = h.store.load().unwrap();
        assert_eq!(state.boot_id.as_deref(), Some("3f1c0d6e-boot-2"));
        assert!(!state.exec(&key()).unwrap().manual_stop);
        h.shutdown().await;
    }

    /// SPEC 6, "berth down, same boot": what happened while berth was away is
    /// told apart by replaying the engine's events.
    #[tokio::test]
    async fn replay_tells_a_manual_stop_from_a_crash_while_berth_was_away() {
        type Act = fn(&FakeRuntime, &str);
        let crash: Act = |f, name| f.exit(name, 3);
        let rows: [(&str, Act, &str, u64); 3] = [
            ("docker stop", FakeRuntime::manual_stop, "Stopped", 0),
            ("crash", crash, "Running", 1),
            ("docker rm -f", FakeRuntime::manual_remove, "Stopped", 0),
        ];
        let runs = rows
            .into_iter()
            .map(|(name, act, status, restarts)| async move {
                let dir = tempfile::tempdir().unwrap();
                let runtime = fake();
                let spec = deployment(RestartPolicy::Always, PullPolicy::IfNotPresent, "talker");
                let h = Harness::start(runtime.clone(), dir.path(), spec.clone());
                h.running(0).await;
                h.shutdown().await;
                act(&runtime, NAME);
                let h = Harness::start(runtime.clone(), dir.path(), spec);
                h.wait_for(name, |d| {
                    d["status"] == status && d["restart_count"] == restarts
                })
                .await;
                tokio::time::sleep(QUIET).await;
                assert_eq!(h.starts() as u64, 1 + restarts, "{name}");
                h.shutdown().await;
            });
        futures_util::future::join_all(runs).await;
    }
}
