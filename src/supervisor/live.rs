//! The live model: what berth knows of each deployment and executable right
//! now, and the status documents built from it.

use super::*;

/// Live state of one executable.
#[derive(Debug)]
pub(super) struct Exec {
    pub(super) key: ExecKey,
    pub(super) spec: ExecutableSpec,
    pub(super) env: BTreeMap<String, String>,
    pub(super) hash: String,
    pub(super) container_id: Option<String>,
    pub(super) status: Status,
    pub(super) reason: Option<String>,
    pub(super) error_code: Option<ErrorCode>,
    pub(super) exit_code: Option<i64>,
    pub(super) started_at: Option<String>,
    /// Engine time of the start berth knows of: older events are stale.
    pub(super) started_nanos: i64,
    /// An engine call for this executable is in flight.
    pub(super) busy: bool,
    /// Events that arrived while busy, applied afterwards in order.
    pub(super) deferred: Vec<EngineEvent>,
    /// When a back-off restart is due.
    pub(super) due: Option<Instant>,
    /// A kill not sent by berth was seen: the next exit is a manual stop.
    pub(super) killed_by_other: bool,
    /// berth itself is stopping or removing the container.
    pub(super) berth_stopping: bool,
    /// Has been started successfully at least once in this deployment's life.
    pub(super) launched: bool,
    /// The spec hash of the current container: differs from `hash` while an
    /// update has not been applied to it.
    pub(super) container_hash: Option<String>,
    /// A created container of an update, waiting to replace the current one.
    pub(super) pending_swap: Option<String>,
    /// Engine time of the manual stop berth saw for it, if any: an engine
    /// shutdown's own stops look like manual ones until the engine is back.
    pub(super) manual_at: Option<i64>,
    /// The image of the current container (the previous one's while an
    /// update has not been applied).
    pub(super) running_image: Option<String>,
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
}

impl Exec {
    /// A container found without a spec: only ever stopped and removed.
    pub(super) fn orphan(key: ExecKey, container_id: String) -> Self {
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

    pub(super) fn set(
        &mut self,
        status: Status,
        reason: Option<String>,
        error_code: Option<ErrorCode>,
    ) {
        self.status = status;
        self.reason = reason;
        self.error_code = error_code;
    }
}

impl Deployment {
    /// `exports`: what the deployments this one depends on export.
    pub(super) fn new(
        config: &AgentConfig,
        spec: DeploymentSpec,
        exports: &BTreeMap<String, String>,
    ) -> Self {
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
        }
    }

    /// `Succeeded` once every executable has been started.
    pub(super) fn update_phase(&mut self) {
        if matches!(self.phase, Phase::InProgress | Phase::Provisioning)
            && self.execs.iter().all(|e| e.launched)
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
            .map(|e| e.status)
            .min()
        {
            Some(status) => status,
            None if self.failure.is_some() => Status::Error,
            None if self.phase == Phase::DeploymentStopped => Status::Stopped,
            None => Status::Pending,
        }
    }

    pub(super) fn document(&self, device_id: &str, state: &State) -> (String, DeploymentDoc) {
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
                health: None,
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
            update: None,
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
