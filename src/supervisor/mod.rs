//! The supervisor loop: engine events and timers in, restart decisions and
//! status documents out. It owns every deployment's live state and the
//! persisted record, and is generic over the container runtime and the
//! reporter, so unit tests drive it with fakes and the daemon with the real
//! Docker engine and MQTT broker.
//!
//! One task runs the loop, and it never waits for I/O: engine calls (pull,
//! create, start, and the listing at each reconnection, made by the event
//! pump), state writes (the writer task) and the reading of files run as
//! tracked tasks and report back as messages. The watchdog is fed from the
//! loop, so it says that the loop is alive. While an engine call is in
//! flight for an executable, engine events about it wait in a queue and are
//! applied after it, so each executable sees one ordered history.

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
mod exits;
mod launch;
mod lifecycle;
mod live;
mod metrics;
mod operator;
mod publish;
mod reconcile;
mod retire;
mod ros;
mod update;
mod writer;

use crate::model::{
    key_from_labels, spec_hash, DeploymentSpec, ErrorCode, ExecKey, ExecutableSpec, Phase,
    PullPolicy, Status, ROS_MASTER_DEPLOYMENT,
};
use crate::notify::Notifier;
use crate::policy::Happening;
use crate::report::{
    timestamp, AgentDoc, DeploymentDoc, Event, EventDoc, ExecutableDoc, Reporter, Topic, UpdateDoc,
};
use crate::runtime::{
    ContainerInfo, ContainerRuntime, ContainerSpec, EngineEvent, EventAction, RegistryAuth,
    RuntimeError,
};
use crate::state::{ExecRecord, Intent, Journal, PendingRestart, State, StateStore};
pub use converge::load_files;
use launch::*;
use lifecycle::{Effect, Input, Kill, Life, Shown, MANUAL_STOP_REASON};
use live::*;
pub use operator::{Action, Operator, OperatorError, OperatorRequest};
use writer::{StateWriter, Ticket, WriteReport};

/// Back-off of reconnections to the engine.
const ENGINE_RETRY_INITIAL: Duration = Duration::from_millis(250);
const ENGINE_RETRY_MAX: Duration = Duration::from_secs(10);
/// Engine calls (pull, create, start) in flight at once.
const ENGINE_CALLS: usize = 4;
/// Starts of existing containers in flight at once: a start holds little,
/// and many executables exiting together (a shared dependency died, a power
/// glitch) are restarted together, not four at a time.
const START_CALLS: usize = 32;
/// How long before its event stream ends an engine's shutdown may have sent
/// the kills that stopped containers: dockerd's default shutdown timeout
/// (15 s), and a second for the stream to end. A manual stop whose kill came
/// earlier than that is certainly an operator's.
const ENGINE_SHUTDOWN_WINDOW: Duration = Duration::from_secs(16);
/// How many events the engine keeps in memory (moby's events buffer).
const ENGINE_EVENT_MEMORY: usize = 256;
/// How often changes to the state that need not be durable at once are saved.
const POSITION_SAVE_INTERVAL: Duration = Duration::from_secs(2);
/// At shutdown, how long the tasks in flight and then the last state write
/// may take: together well within the unit's `TimeoutStopSec=15`.
const TASKS_DEADLINE: Duration = Duration::from_secs(5);
const WRITER_DEADLINE: Duration = Duration::from_secs(2);

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
    /// event berth had applied (empty when it had none); `containers` is the
    /// listing made after it, the truth to reconcile with.
    EngineUp {
        replay: Vec<EngineEvent>,
        containers: Vec<ContainerInfo>,
    },
    EngineDown {
        error: String,
    },
    Event(EngineEvent),
    Pulled {
        deployment: String,
        result: Result<(), (String, RuntimeError)>,
        outcome: PullOutcome,
    },
    /// How far a deployment's pull has come (at most every 2 s).
    PullProgress {
        deployment: String,
        image: String,
        progress: crate::runtime::PullProgress,
    },
    /// Images berth pulled, and images a collection removed.
    Collected {
        pulled: Vec<String>,
        removed: Vec<String>,
    },
    Launched {
        key: ExecKey,
        container_id: Option<String>,
        result: Result<ContainerInfo, RuntimeError>,
    },
    /// What the engine says of one executable's container after a call
    /// about it went unanswered (`None`: it has no container).
    Rechecked {
        key: ExecKey,
        result: Option<Result<ContainerInfo, RuntimeError>>,
    },
    /// Re-read the agent config and the deployment files.
    Reload,
    /// What a reload read (off the loop); `seq` tells a stale read.
    Reloaded {
        seq: u64,
        read: Box<converge::FilesRead>,
    },
    /// A round of the state writer.
    StateWrite(WriteReport),
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
    /// An exit, and its evidence once read (`None`: could not be read).
    Evidence {
        key: ExecKey,
        input: Input,
        evidence: Option<crate::runtime::ExitEvidence>,
    },
    /// The log tail of the exit at `at` (`None`: could not be read in time).
    LogTail {
        key: ExecKey,
        at: i64,
        lines: Option<Vec<String>>,
    },
    /// The engine's figures for the `metrics` document.
    Metrics(metrics::Reading),
    /// berth's own probe changed its verdict on one run of a container.
    Probed {
        key: ExecKey,
        container_id: String,
        started_nanos: i64,
        verdict: crate::probe::Verdict,
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

pub struct Supervisor<R, P> {
    config: AgentConfig,
    runtime: Arc<R>,
    reporter: Arc<P>,
    /// Writes the state off the loop (see `writer`).
    writer: StateWriter,
    /// The writer task, started by `run`.
    writer_task: Option<writer::WriterTask>,
    /// Restart commitments (and records a start not counted must not
    /// overtake) not yet durable: their launches wait for them.
    commitments: BTreeMap<ExecKey, Ticket>,
    /// The events of exits whose log tail is being read, in order.
    held: Vec<exits::HeldExit>,
    /// The state write failure last reported, while writes fail.
    state_write_error: Option<String>,
    /// Problems found reading the state at start-up (`DEP_E302`), reported
    /// as events once the loop runs.
    state_problems: Vec<String>,
    /// The latest reload asked for: an older read that comes back is stale.
    reload_seq: u64,
    /// The last reload whose files were applied: a reload is under way
    /// while it is behind `reload_seq`.
    reloaded_seq: u64,
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
    held_launches: Option<Vec<LaunchCall>>,
    /// A launch task was spawned in this turn of the loop: it runs (and asks
    /// the engine) before the loop goes on with documents and messages.
    launched_in_turn: bool,
    /// Limits the engine calls in flight (see `spawn_engine_call`).
    engine_slots: Arc<tokio::sync::Semaphore>,
    /// Limits the starts of existing containers (see `spawn_launch`).
    start_slots: Arc<tokio::sync::Semaphore>,
    /// Limits the starts of crash-looping executables (see `spawn_launch`).
    crash_lane: Arc<tokio::sync::Semaphore>,
    /// `READY=1` went out.
    ready_sent: bool,
    /// When the engine went away (host clock, nanoseconds): its shutdown
    /// stops came at most its shutdown timeout before.
    down_position: Option<i64>,
    /// Executables an engine restart interrupted, for the next reconcile.
    interrupted: std::collections::HashSet<ExecKey>,
    /// The `metrics` topic's bookkeeping.
    metrics: metrics::Metrics,
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
        let (writer, writer_task) = StateWriter::new(Journal::new(store));
        let mut supervisor = Supervisor {
            config,
            runtime,
            reporter,
            writer,
            writer_task: Some(writer_task),
            commitments: BTreeMap::new(),
            held: Vec::new(),
            state_write_error: None,
            state_problems: Vec::new(),
            reload_seq: 0,
            reloaded_seq: 0,
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
            launched_in_turn: false,
            engine_slots: Arc::new(tokio::sync::Semaphore::new(ENGINE_CALLS)),
            start_slots: Arc::new(tokio::sync::Semaphore::new(START_CALLS)),
            crash_lane: Arc::new(tokio::sync::Semaphore::new(ENGINE_CALLS / 2)),
            ready_sent: false,
            down_position: None,
            interrupted: Default::default(),
            metrics: Default::default(),
        };
        supervisor.converge(deployments, invalid);
        supervisor
    }

    /// Problems met reading the state (`StateStore::recover`): each is
    /// reported as a `DEP_E302` error event once the loop runs.
    pub fn report_state_problems(&mut self, problems: Vec<String>) {
        self.state_problems.extend(problems);
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
        let writer = self
            .writer_task
            .take()
            .expect("run once")
            .spawn(self.tx.clone());
        for problem in std::mem::take(&mut self.state_problems) {
            warn!(error = %problem, error_code = %ErrorCode::StateStore, "state unreadable");
            self.event(Event::device_error(Some(ErrorCode::StateStore), problem));
        }
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
        let mut metrics_tick = self.config.metrics.interval.map(|every| {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        loop {
            let next_due = self.next_due();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = watchdog_tick.tick() => self.notifier.watchdog(),
                Some(msg) = self.rx.recv() => self.handle(msg),
                _ = sleep_until_opt(next_due) => self.fire_timers(),
                _ = metrics::tick(&mut metrics_tick) => self.collect_metrics(),
                _ = save_tick.tick() => {
                    if self.state_dirty {
                        self.save_state();
                    }
                }
            }
            if std::mem::take(&mut self.launched_in_turn) {
                // The restart's start request first (one thread runs all).
                tokio::task::yield_now().await;
            }
            self.publish_dirty();
        }
        info!("berth supervisor stopping; containers keep running");
        self.notifier.stopping();
        self.stop_probes();
        self.tracker.close();
        // Engine calls in flight finish (or are abandoned with the process:
        // the state already records any restart they were committed to); the
        // starts that finish are recorded, nothing new is begun.
        let deadline = tokio::time::sleep(TASKS_DEADLINE);
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
        // Events held for a log tail go out with what was read.
        self.release_held(true);
        // A clean stop leaves no reservation on disk, so that a container
        // started by hand while berth is away is not taken for its restart.
        for dep in self.deployments.values_mut() {
            for exec in dep.execs.iter_mut().chain(dep.retiring.iter_mut()) {
                exec.reservation = None;
            }
        }
        // The writer writes the last snapshot and ends.
        self.save_state();
        self.writer.close();
        if tokio::time::timeout(WRITER_DEADLINE, writer).await.is_err() {
            warn!(
                "the last state write did not finish; the next start rebuilds it from the engine"
            );
        }
    }

    /// During shutdown: records a start that completed, and nothing else.
    fn settle(&mut self, msg: Msg) {
        if let Msg::LogTail { key, at, lines } = msg {
            self.on_log_tail(&key, at, lines);
            return;
        }
        if let Msg::Launched {
            key,
            result: Ok(info),
            ..
        } = msg
        {
            if let Some(exec) = self.exec_any_mut(&key) {
                exec.pending_restart = None;
                exec.container = Some(Container::from_info(&info));
                exec.life = Life::Running { killed: None };
            }
        }
    }

    // ---- engine connection -------------------------------------------------

    /// Connects to the engine, replays what was missed, lists the
    /// containers, forwards live events, and starts over with back-off
    /// whenever the stream ends or the engine stops answering. Every call it
    /// makes is bounded by `[docker] timeout_secs`, and while the stream is
    /// open a ping every third of that time checks that the engine still
    /// answers (an engine that hangs sends no events and no end), so that a
    /// hung engine is `EngineDown` within that time.
    fn spawn_event_pump(&self, shutdown: CancellationToken) {
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        let device = self.config.device_id.clone();
        let timeout = self.config.docker.timeout;
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
                    bounded(timeout, "ping", runtime.ping()).await?;
                    let now = unix_nanos(SystemTime::now());
                    // The live stream starts at `now`; the replay ends there.
                    let live = runtime.events(&device, Some(now), None);
                    let mut replay = Vec::new();
                    if let Some(since) = position {
                        let history = async {
                            let mut history = runtime.events(&device, Some(since), Some(now));
                            while let Some(event) = history.next().await {
                                replay.push(event?);
                            }
                            Ok(())
                        };
                        bounded(timeout, "event replay", history).await?;
                    }
                    // The listing is the truth after any reconnect: taken
                    // after the replay, and sent with it before any live
                    // event, so that none is applied in between.
                    let containers =
                        bounded(timeout, "container listing", runtime.list(&device)).await?;
                    Ok::<_, RuntimeError>((live, replay, containers))
                };
                let (mut live, replay, containers) = tokio::select! {
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
                if tx.send(Msg::EngineUp { replay, containers }).is_err() {
                    return;
                }
                let mut answered = Instant::now();
                let mut ping: Option<
                    std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
                > = None;
                let error = loop {
                    let next_ping = answered + timeout / 3;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        item = live.next() => match item {
                            Some(Ok(event)) => {
                                answered = Instant::now();
                                position = Some(event.time_nanos);
                                if tx.send(Msg::Event(event)).is_err() {
                                    return;
                                }
                            }
                            Some(Err(e)) => break e.to_string(),
                            None => break "event stream ended".to_string(),
                        },
                        _ = tokio::time::sleep_until(next_ping), if ping.is_none() => {
                            let runtime = runtime.clone();
                            // Whatever the engine last answered, it must answer
                            // again within the timeout.
                            let deadline = answered + timeout;
                            ping = Some(Box::pin(async move {
                                tokio::time::timeout_at(deadline, runtime.ping()).await
                            }));
                        }
                        result = poll_opt(&mut ping) => {
                            ping = None;
                            match result {
                                Ok(Ok(())) => answered = Instant::now(),
                                Ok(Err(e)) => break e.to_string(),
                                Err(_) => break format!("no answer within {}", human(timeout)),
                            }
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

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::EngineUp { replay, containers } => {
                self.on_engine_up(replay, containers);
                // Containers the reconcile found running get their probes.
                self.sync_all_probes();
            }
            Msg::EngineDown { error } => self.on_engine_down(&error),
            Msg::Event(event) => {
                crate::trace::die_received(&event);
                self.note_position(event.time_nanos);
                self.on_event(event);
            }
            Msg::Pulled {
                deployment,
                result,
                outcome,
            } => self.on_pulled(&deployment, result, outcome),
            Msg::PullProgress {
                deployment,
                image,
                progress,
            } => self.on_pull_progress(&deployment, &image, progress),
            Msg::Collected { pulled, removed } => self.on_collected(pulled, removed),
            Msg::Launched {
                key,
                container_id,
                result,
            } => self.on_launched(&key, container_id, result),
            Msg::Rechecked { key, result } => self.on_rechecked(&key, result),
            Msg::Reload => self.reload(),
            Msg::Reloaded { seq, read } => self.on_reloaded(seq, *read),
            Msg::StateWrite(report) => self.on_state_write(report),
            Msg::Removed { key, result } => self.on_removed(&key, result),
            Msg::Prepared { deployment, result } => self.on_prepared(&deployment, result),
            Msg::Metrics(reading) => self.on_metrics(reading),
            Msg::Evidence {
                key,
                input,
                evidence,
            } => self.on_evidence(&key, input, evidence),
            Msg::LogTail { key, at, lines } => self.on_log_tail(&key, at, lines),
            Msg::Probed {
                key,
                container_id,
                started_nanos,
                verdict,
            } => self.on_probed(&key, &container_id, started_nanos, verdict),
            Msg::Operator(msg) => self.on_operator(msg),
        }
        self.provision_waiting();
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
            for exec in dep.execs.iter().chain(&dep.retiring) {
                match exec.life {
                    Life::BackingOff { due: t, .. } if t <= now => {
                        due.push((exec.key.clone(), Input::Due));
                    }
                    Life::Proving { until, .. } if until <= now => {
                        due.push((exec.key.clone(), Input::Proven));
                    }
                    Life::Retiring { retry_at: Some(t) } if t <= now => {
                        removals.push(exec.key.clone());
                    }
                    _ => {}
                }
            }
        }
        for key in removals {
            self.remove_container(&key);
        }
        for (key, input) in due {
            self.feed(&key, input);
            if let Some(dep) = self.deployments.get_mut(&key.deployment) {
                dep.update_phase();
            }
        }
        for id in pulls {
            self.maybe_provision(&id);
        }
    }

    /// The next timer of any executable or deployment. While the engine is
    /// away, no restart is due: the reconcile after it decides again.
    fn next_due(&self) -> Option<Instant> {
        let engine_up = self.engine_up;
        self.deployments
            .values()
            .flat_map(|d| {
                d.execs
                    .iter()
                    .chain(&d.retiring)
                    .filter_map(move |e| match e.life {
                        Life::BackingOff { due, .. } if engine_up => Some(due),
                        Life::Proving { until, .. } if engine_up => Some(until),
                        Life::Retiring { retry_at } => retry_at,
                        _ => None,
                    })
                    .chain(d.pull_due)
            })
            .min()
    }
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

use lifecycle::human;

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// An engine call that gives up after `timeout`: the engine is then
/// unreachable.
async fn bounded<T>(
    timeout: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<T, RuntimeError>>,
) -> Result<T, RuntimeError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(RuntimeError::Unreachable(format!(
            "{what}: no answer within {}",
            human(timeout)
        ))),
    }
}

/// Awaits the future if there is one, else never resolves.
async fn poll_opt<F: std::future::Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
