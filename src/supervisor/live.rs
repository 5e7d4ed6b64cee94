//! The live model: what berth knows of each deployment and executable right
//! now, and the status documents built from it.

use super::*;

/// Live state of one executable: every fact about it has its home here, and
/// what berth persists of it ([`Exec::record`]) is derived from these.
#[derive(Debug)]
pub(super) struct Exec {
    pub(super) key: ExecKey,
    pub(super) spec: ExecutableSpec,
    pub(super) env: BTreeMap<String, String>,
    /// The hash of `spec` and `env`, the label its container carries.
    pub(super) hash: String,
    /// Where it is in its life.
    pub(super) life: Life,
    /// What its document shows.
    pub(super) shown: Shown,
    /// The container berth knows of.
    pub(super) container: Option<Container>,
    /// Restarts so far, including one committed but not yet started
    /// (`pending_restart`): a restart is counted in the same durable write
    /// that commits berth to it.
    pub(super) restart_count: u64,
    pub(super) backoff: Backoff,
    /// A counted restart whose start may not have reached the engine yet.
    pub(super) pending_restart: Option<PendingRestart>,
    /// The next restart of the running container, committed ahead (not yet
    /// counted here; the record counts it).
    pub(super) reservation: Option<Reservation>,
    /// The snapshot that takes a withdrawn reservation off the disk: a start
    /// that is not a counted restart waits for it.
    pub(super) unreserved: Option<Ticket>,
    /// Has been started at least once in its deployment's life.
    pub(super) launched: bool,
    /// Its container ran before and is gone (a reboot, say): starting it
    /// again is a counted restart.
    pub(super) lost_container: bool,
    /// Engine events that arrived while an engine call for it was in
    /// flight, applied after its answer, in order.
    pub(super) deferred: Vec<EngineEvent>,
    /// The spec hash of an update that was rolled back: not tried again
    /// until the file changes (or berth restarts).
    pub(super) rejected: Option<String>,
    /// The liveness probe's last verdict on its current run.
    pub(super) health: Option<crate::runtime::Health>,
    /// The crash evidence of its last exit, until an event carries it.
    pub(super) evidence: Option<crate::runtime::ExitEvidence>,
    /// The engine time of that exit: which log tail belongs to it.
    pub(super) evidence_at: Option<i64>,
    /// Set while an exit is applied: the launch it leads to, if any, takes
    /// it and says when its start is answered (the tail is read after).
    pub(super) start_signal: Option<Arc<tokio::sync::Notify>>,
    /// Its exit's inspection is being read (an exit by `SIGKILL` that the
    /// engine did not call an OOM kill): the exit waits for it.
    pub(super) reading_evidence: bool,
    /// Who asked for the stop under way (an operator's `stop`), for its
    /// `manual_stop` event.
    pub(super) stop_by: Option<String>,
    /// berth stops its container before the next start (an unhealthy restart).
    pub(super) stop_first: bool,
    /// The task running its `tcp` or `http` probe, for this container and start.
    pub(super) probe_watch: Option<ProbeWatch>,
    /// Time deployed and time `Running` over the last 24 h.
    pub(super) availability: crate::state::Availability,
}

/// A running probe task and the run it watches.
#[derive(Debug)]
pub(super) struct ProbeWatch {
    pub(super) container_id: String,
    pub(super) started_nanos: i64,
    pub(super) stop: CancellationToken,
}

impl Drop for ProbeWatch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A restart committed while its container still runs, so that its exit is
/// restarted without waiting for a disk: the record on disk counts it (one
/// more than `restart_count`) as pending for this run of this container. If
/// berth goes away, the count holds only if that container has started
/// again since (`reconcile`); otherwise the restart is decided again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Reservation {
    pub(super) container_id: String,
    /// The engine's `StartedAt` of the run it follows.
    pub(super) started_at: String,
    /// The count it commits to.
    pub(super) restart_count: u64,
    /// What makes it durable (read from disk: already).
    pub(super) ticket: Ticket,
    /// Read from disk and not yet checked against the engine by a
    /// reconcile: berth was away since it was written.
    pub(super) recovered: bool,
}

impl Reservation {
    /// Whether a restart of `exec` that was just counted can take it as its
    /// commitment: the same run of the same container, the same count.
    pub(super) fn covers(&self, exec: &Exec) -> bool {
        let Some(pending) = &exec.pending_restart else {
            return false;
        };
        exec.container
            .as_ref()
            .is_some_and(|c| c.id == self.container_id)
            && pending.prev_started_at.as_deref() == Some(self.started_at.as_str())
            && exec.restart_count == self.restart_count
    }
}

/// The container of an executable, as the engine last described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Container {
    pub(super) id: String,
    /// The spec hash it was created from: differs from the executable's
    /// while an update has not reached it.
    pub(super) hash: Option<String>,
    /// The image it runs (the previous version's during an update).
    pub(super) image: String,
    /// The engine's `StartedAt` of its last start, when it has started.
    pub(super) started_at: Option<String>,
    /// The same in engine nanoseconds: older events are stale.
    pub(super) started_nanos: i64,
    /// Its address on an isolated network, where berth's probes reach it;
    /// `None` on the host network (127.0.0.1).
    pub(super) ip_address: Option<String>,
    /// The engine said `oom` during this run (it does before the `die`).
    pub(super) oom_killed: bool,
}

impl Container {
    pub(super) fn from_info(info: &ContainerInfo) -> Container {
        let started_at = info.started_at.clone().filter(|_| info.has_started());
        Container {
            id: info.id.clone(),
            hash: converge::container_hash(info),
            image: info.image.clone(),
            started_nanos: started_at.as_deref().map(parse_nanos).unwrap_or(0),
            started_at,
            ip_address: info.ip_address.clone(),
            oom_killed: false,
        }
    }
}

impl Exec {
    /// A new executable, carrying over what was recorded of it.
    pub(super) fn new(
        key: ExecKey,
        spec: ExecutableSpec,
        env: BTreeMap<String, String>,
        record: Option<ExecRecord>,
    ) -> Exec {
        let hash = spec_hash(&spec, &env);
        let mut record = record.unwrap_or_default();
        let availability = std::mem::take(&mut record.availability);
        // A reservation on disk is not a restart yet: the reconcile counts
        // it if its container started again.
        let reservation = match record.pending_restart.take() {
            Some(PendingRestart {
                prev_started_at: Some(started_at),
                reserved_for: Some(container_id),
            }) => Some(Reservation {
                container_id,
                started_at,
                restart_count: record.restart_count,
                ticket: Ticket::Commitment(0),
                recovered: true,
            }),
            other => {
                record.pending_restart = other;
                None
            }
        };
        if reservation.is_some() {
            record.restart_count = record.restart_count.saturating_sub(1);
        }
        let life = recorded_life(&record);
        Exec {
            key,
            spec,
            env,
            hash,
            life,
            shown: Shown::new(
                Status::Pending,
                Some("waiting for the docker engine".into()),
                None,
            ),
            container: record.container_id.map(|id| Container {
                id,
                hash: None,
                image: String::new(),
                started_nanos: record.started_at.as_deref().map(parse_nanos).unwrap_or(0),
                started_at: record.started_at,
                ip_address: None,
                oom_killed: false,
            }),
            restart_count: record.restart_count,
            backoff: record.backoff,
            pending_restart: record.pending_restart,
            reservation,
            unreserved: None,
            launched: false,
            lost_container: false,
            deferred: Vec::new(),
            rejected: None,
            health: None,
            evidence: None,
            evidence_at: None,
            start_signal: None,
            reading_evidence: false,
            stop_by: None,
            stop_first: false,
            probe_watch: None,
            availability,
        }
    }

    /// Counts a restart of the current run and sets its commitment
    /// (`pending_restart`); returns the count. A committed restart not yet
    /// started (berth went away meanwhile) is completed, not counted again.
    pub(super) fn count_restart(&mut self) -> u64 {
        if self.pending_restart.is_none() {
            self.restart_count += 1;
            self.pending_restart = Some(PendingRestart::after(
                self.container.as_ref().and_then(|c| c.started_at.clone()),
            ));
        }
        self.restart_count
    }

    /// A container found without a spec: only ever stopped and removed.
    pub(super) fn orphan(key: ExecKey, container_id: String) -> Self {
        let spec = ExecutableSpec {
            name: String::new(),
            image: String::new(),
            pull: PullPolicy::Never,
            command: None,
            env: BTreeMap::new(),
            limits: Default::default(),
            volumes: Vec::new(),
            devices: Vec::new(),
            network: Default::default(),
            probe: None,
        };
        let mut exec = Exec::new(key, spec, BTreeMap::new(), None);
        exec.container = Some(Container {
            id: container_id,
            hash: None,
            image: String::new(),
            started_at: None,
            started_nanos: 0,
            ip_address: None,
            oom_killed: false,
        });
        exec.shown = Shown::new(Status::Pending, Some("stopping".into()), None);
        exec.life = Life::Retiring { retry_at: None };
        exec
    }

    pub(super) fn set(
        &mut self,
        status: Status,
        reason: Option<String>,
        error_code: Option<ErrorCode>,
    ) {
        self.shown = Shown {
            status,
            reason,
            error_code,
            exit_code: self.shown.exit_code,
        };
    }

    pub(super) fn container_id(&self) -> Option<&str> {
        self.container.as_ref().map(|c| c.id.as_str())
    }

    /// Waiting to be provisioned: no container, nothing under way.
    pub(super) fn waiting(&self) -> bool {
        self.container.is_none() && self.life == Life::Idle
    }

    /// An engine call for it is in flight: its events wait.
    pub(super) fn busy(&self) -> bool {
        self.reading_evidence
            || matches!(
                self.life,
                Life::Starting { .. } | Life::Replacing(_) | Life::RollingBack
            )
            || (matches!(self.life, Life::Retiring { retry_at: None }) && self.container.is_some())
    }

    /// The document's `health`: null without a probe; `starting` until the
    /// probe's first verdict on a running container.
    pub(super) fn health_shown(&self) -> Option<String> {
        self.spec.probe.as_ref()?;
        let running = matches!(self.life, Life::Running { .. } | Life::Proving { .. });
        let health = match self.health {
            None if running => crate::runtime::Health::Starting,
            None => return None,
            Some(h) => h,
        };
        Some(
            match health {
                crate::runtime::Health::Starting => "starting",
                crate::runtime::Health::Healthy => "healthy",
                crate::runtime::Health::Unhealthy => "unhealthy",
            }
            .to_string(),
        )
    }

    /// What berth persists of it: derived, never written by hand.
    pub(super) fn record(&self) -> ExecRecord {
        // A reservation is recorded as the pending restart it commits to.
        let (restart_count, pending_restart) = match (&self.pending_restart, &self.reservation) {
            (None, Some(r)) if r.restart_count == self.restart_count + 1 => (
                r.restart_count,
                Some(PendingRestart {
                    prev_started_at: Some(r.started_at.clone()),
                    reserved_for: Some(r.container_id.clone()),
                }),
            ),
            _ => (self.restart_count, self.pending_restart.clone()),
        };
        ExecRecord {
            restart_count,
            container_id: self.container.as_ref().map(|c| c.id.clone()),
            started_at: self.container.as_ref().and_then(|c| c.started_at.clone()),
            pending_restart,
            manual_stop: matches!(self.life, Life::Suspended { .. }),
            backoff: self.backoff,
            status: match self.life {
                Life::Idle => None,
                Life::Exited { code: Some(0) } => Some(Status::Completed),
                Life::Exited { .. } => Some(Status::Error),
                Life::Suspended { .. } | Life::Interrupted => Some(Status::Stopped),
                _ => Some(Status::Running),
            },
            exit_code: match self.life {
                Life::Exited { code } => code,
                _ => self.shown.exit_code,
            },
            availability: self.availability.clone(),
        }
    }
}

/// The life an executable had when berth last recorded it.
fn recorded_life(record: &ExecRecord) -> Life {
    match record.status {
        _ if record.manual_stop => Life::Suspended { at: None },
        Some(Status::Completed) => Life::Exited { code: Some(0) },
        Some(Status::Error) => Life::Exited {
            code: record.exit_code,
        },
        Some(Status::Stopped) => Life::Interrupted,
        Some(Status::Running) => Life::Running { killed: None },
        _ => Life::Idle,
    }
}

/// Live state of one deployment.
#[derive(Debug)]
pub(super) struct Deployment {
    pub(super) spec: DeploymentSpec,
    pub(super) phase: Phase,
    /// Images are present for every executable that needs a container.
    pub(super) images_ready: bool,
    pub(super) pulling: bool,
    pub(super) pull_backoff: Backoff,
    pub(super) pull_due: Option<Instant>,
    pub(super) execs: Vec<Exec>,
    pub(super) dirty: bool,
    /// Why the file cannot be applied (`FailedToStart`, `FailedToUpdate`).
    pub(super) failure: Option<String>,
    /// Its file is gone: containers are being stopped and removed.
    pub(super) removing: bool,
    /// An update's images are being pulled and containers created.
    pub(super) updating: bool,
    /// Executables an update dropped, being stopped and removed.
    pub(super) retiring: Vec<Exec>,
    /// The phase of the last published document: a change is an event.
    pub(super) published_phase: Option<Phase>,
    /// The last update that failed and was rolled back (SPEC 9 `update`).
    pub(super) update: Option<crate::report::UpdateDoc>,
}

impl Deployment {
    /// `exports`: what the deployments this one depends on export;
    /// `recorded`: what berth recorded of executables, each taken by its own.
    pub(super) fn new(
        config: &AgentConfig,
        spec: DeploymentSpec,
        exports: &BTreeMap<String, String>,
        recorded: &mut BTreeMap<String, ExecRecord>,
    ) -> Self {
        let execs = spec
            .executables()
            .map(|(component, exe)| {
                let env = merged_env(config, &spec, exe, exports);
                let key = ExecKey::new(&spec.id, &component.name, &exe.name);
                let record = recorded.remove(&key.to_string());
                Exec::new(key, exe.clone(), env, record)
            })
            .collect();
        let mut dep = Deployment::new_empty(spec);
        dep.execs = execs;
        dep
    }

    /// The stand-in for a deployment whose file cannot be applied.
    pub(super) fn failed(id: &str, source: std::path::PathBuf, reason: String) -> Self {
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
            update: Default::default(),
            source,
        };
        let mut dep = Deployment::new_empty(spec);
        dep.phase = Phase::FailedToStart;
        dep.failure = Some(reason);
        dep
    }

    pub(super) fn new_empty(spec: DeploymentSpec) -> Self {
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
            update: None,
        }
    }

    /// `Succeeded` once every executable has been started (and an update's
    /// new containers have proven themselves).
    pub(super) fn update_phase(&mut self) {
        if matches!(self.phase, Phase::InProgress | Phase::Provisioning)
            && self
                .execs
                .iter()
                .all(|e| e.launched && !matches!(e.life, Life::Replacing(_) | Life::Proving { .. }))
        {
            self.phase = Phase::Succeeded;
            self.dirty = true;
        }
    }

    /// The first status any executable has, in the order of SPEC 5.
    pub(super) fn status(&self) -> Status {
        match self
            .execs
            .iter()
            .chain(&self.retiring)
            .map(|e| e.shown.status)
            .min()
        {
            Some(status) => status,
            None if self.failure.is_some() => Status::Error,
            None if self.phase == Phase::DeploymentStopped => Status::Stopped,
            None => Status::Pending,
        }
    }

    pub(super) fn document(&self, device_id: &str) -> (String, DeploymentDoc) {
        let executables: Vec<ExecutableDoc> = self
            .execs
            .iter()
            .chain(&self.retiring)
            .map(|e| ExecutableDoc {
                component: e.key.component.clone(),
                name: e.key.executable.clone(),
                container_id: e.container.as_ref().map(|c| c.id.clone()),
                image: e
                    .container
                    .as_ref()
                    .map(|c| c.image.clone())
                    .filter(|i| !i.is_empty())
                    .unwrap_or_else(|| e.spec.image.clone()),
                status: e.shown.status,
                reason: e.shown.reason.clone(),
                error_code: e.shown.error_code,
                exit_code: e.shown.exit_code,
                restart_count: e.restart_count,
                started_at: e
                    .container
                    .as_ref()
                    .and_then(|c| c.started_at.as_deref())
                    .map(normalize_time),
                health: e.health_shown(),
            })
            .collect();
        let worst = executables.iter().min_by_key(|e| e.status);
        let status = self.status();
        let error_code = if executables.is_empty() && self.failure.is_some() {
            // The file itself cannot be applied.
            Some(ErrorCode::InvalidDeployment)
        } else {
            executables
                .iter()
                .filter(|e| e.status == status)
                .find_map(|e| e.error_code)
        };
        // A file that cannot be applied says why; otherwise the reason of the
        // executable that gives the deployment its status.
        let stopped = (self.phase == Phase::DeploymentStopped)
            .then(|| "deprovisioned: every container stopped and removed".to_string());
        let reason = self.failure.clone().or(stopped).or_else(|| {
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
            update: self.update.clone(),
            updated_at: timestamp(SystemTime::now()),
        };
        (self.spec.id.clone(), doc)
    }
}

/// The environment of one executable, later layers winning: the exports of
/// the deployments it depends on, the executable's own env, the deployment's
/// env (the operator's instance settings), and `ROS_MASTER_URI` for a ROS
/// deployment.
pub(super) fn merged_env(
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
