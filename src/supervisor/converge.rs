//! Converging to the files: what to do with each deployment is a pure plan
//! ([`plan`], with its own tests): new ones are provisioned, changed ones
//! updated (`update.rs`), removed ones deprovisioned (`retire.rs`), broken
//! ones reported `FailedToStart` without touching what runs. The files are
//! read off the loop. Also the dependency gates of SPEC 7, and what the engine
//! is asked to create for an executable.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tracing::{error, info, warn};

use super::{Deployment, Exec, Msg, Supervisor};
use crate::config::{self, Deployments};
use crate::model::{
    container_labels, container_name, labels, network_name, Network, Phase, Status,
    ROS_MASTER_DEPLOYMENT,
};
use crate::report::{Event, Reporter};
use crate::runtime::{ContainerRuntime, RuntimeError};

/// berth's own stops: SIGTERM, then SIGKILL after this many seconds.
pub(super) const STOP_GRACE_SECS: i64 = 10;
/// Wait before retrying a container that could not be removed.
pub(super) const REMOVE_RETRY: Duration = Duration::from_secs(5);
/// Suffix of an update's new container until it replaces the old one.
pub(super) const NEXT_SUFFIX: &str = ".next";
/// Suffix of the container an update replaced, kept until the new one has
/// proven itself.
pub(super) const PREV_SUFFIX: &str = ".prev";

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    /// SIGHUP or a change in `deployments_dir`: re-read everything, off the
    /// loop (`on_reloaded` applies it).
    pub(super) fn reload(&mut self) {
        self.reload_seq += 1;
        self.read_files(self.reload_seq, None);
    }

    /// Reads the agent config and the deployment files in a blocking task
    /// (a file read never holds the loop); the result comes back as
    /// `Msg::Reloaded`. With `only_if`, nothing comes back unless that
    /// deployment has a file.
    pub(super) fn read_files(&mut self, seq: u64, only_if: Option<String>) {
        let source = self.config.source.clone();
        let dir = self.config.deployments_dir.clone();
        let tx = self.tx.clone();
        self.tracker.spawn(async move {
            let read = tokio::task::spawn_blocking(move || {
                if let Some(id) = only_if {
                    if !config::load_deployments_dir(&dir).0.contains_key(&id) {
                        return None;
                    }
                }
                Some(FilesRead {
                    agent: config::load_agent(&source),
                    files: dir.is_dir().then(|| load_files(&dir)),
                })
            })
            .await;
            if let Ok(Some(read)) = read {
                let _ = tx.send(Msg::Reloaded {
                    seq,
                    read: Box::new(read),
                });
            }
        });
    }

    /// Applies what a reload read. A broken agent config is rejected and the
    /// running one stays in force.
    pub(super) fn on_reloaded(&mut self, seq: u64, read: FilesRead) {
        if seq < self.reload_seq {
            return; // a later reload is on its way
        }
        self.reloaded_seq = seq;
        match read.agent {
            Ok(new) => {
                if new.restart != self.config.restart {
                    info!("reload: new back-off settings apply to the next restarts");
                    self.config.restart = new.restart;
                }
                if new.device_id != self.config.device_id
                    || new.mqtt != self.config.mqtt
                    || new.docker != self.config.docker
                    || new.state_dir != self.config.state_dir
                    || new.deployments_dir != self.config.deployments_dir
                    || new.boot_id_file != self.config.boot_id_file
                    || new.ros != self.config.ros
                    || new.log != self.config.log
                {
                    warn!("reload: changes to device_id, deployments_dir, state_dir, boot_id_file, [docker], [mqtt], [ros] or [log] take effect when berth restarts");
                }
            }
            Err(errors) => {
                let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
                for line in &text {
                    error!("{line}");
                }
                error!("reload: the agent config is invalid; the running config stays in force");
                self.event(Event::device_error(
                    None,
                    format!("agent config rejected on reload: {}", text.join("; ")),
                ));
            }
        }
        let Some((specs, invalid)) = read.files else {
            // An unmounted or missing directory must not deprovision everything.
            error!(dir = %self.config.deployments_dir.display(), "reload: deployments_dir is missing; nothing changed");
            self.event(Event::device_error(
                None,
                format!(
                    "deployments_dir {} is missing; nothing changed",
                    self.config.deployments_dir.display()
                ),
            ));
            return;
        };
        info!(deployments = specs.len(), invalid = invalid.len(), "reload");
        if specs.is_empty()
            && invalid.is_empty()
            && self
                .deployments
                .iter()
                .any(|(id, d)| id != ROS_MASTER_DEPLOYMENT && !d.removing)
        {
            // Present but empty is not missing: the operator's word. Said
            // loudly, as it stops everything.
            warn!(dir = %self.config.deployments_dir.display(), "reload: deployments_dir holds no deployment file; deprovisioning every deployment");
            self.event(Event::device_error(
                None,
                format!(
                    "deployments_dir {} holds no deployment file; every deployment is deprovisioned",
                    self.config.deployments_dir.display()
                ),
            ));
        }
        self.converge(specs, invalid);
    }

    /// Makes the set of deployments match the files.
    pub(super) fn converge(&mut self, mut specs: Deployments, invalid: BTreeMap<String, String>) {
        let known: BTreeMap<String, Known> = self
            .deployments
            .iter()
            .filter(|(id, _)| *id != ROS_MASTER_DEPLOYMENT)
            .map(|(id, d)| {
                let known = Known {
                    source: d.spec.source.clone(),
                    ran: !d.execs.is_empty() || !d.retiring.is_empty(),
                    removing: d.removing,
                };
                (id.clone(), known)
            })
            .collect();
        for (id, change) in plan(&known, &mut specs, invalid, &self.config.deployments_dir) {
            match change {
                Change::Fail { source, reason } => self.mark_failed(&id, source, reason),
                Change::New | Change::Afresh => {
                    let spec = specs[&id].clone();
                    let exports = dependency_exports(&specs, &spec);
                    if change == Change::New {
                        info!(deployment = %id, "new deployment");
                    }
                    let dep =
                        Deployment::new(&self.config, spec, &exports, &mut self.state.executables);
                    self.deployments.insert(id.clone(), dep);
                    self.maybe_provision(&id);
                }
                Change::AfterRemoval => {
                    info!(deployment = %id, "file is back while deprovisioning; provisioning after it");
                }
                Change::Update => {
                    let spec = specs[&id].clone();
                    let exports = dependency_exports(&specs, &spec);
                    self.update(&id, spec, &exports);
                }
                Change::Deprovision => self.deprovision(&id),
            }
        }
        self.converge_ros();
    }

    /// A deployment whose file cannot be applied: `FailedToStart`; whatever
    /// it already runs keeps running.
    fn mark_failed(&mut self, id: &str, source: std::path::PathBuf, reason: String) {
        warn!(deployment = id, reason, "deployment cannot start");
        match self.deployments.get_mut(id) {
            Some(dep) => {
                dep.phase = Phase::FailedToStart;
                dep.failure = Some(reason.clone());
                dep.dirty = true;
            }
            None => {
                self.deployments.insert(
                    id.to_string(),
                    Deployment::failed(id, source, reason.clone()),
                );
            }
        }
    }

    /// The first dependency of `id` that is not yet `Succeeded` (or is in
    /// `Error`), if any.
    pub(super) fn unmet_dependency(&self, id: &str) -> Option<String> {
        self.first_dependency(id, |other| match other {
            Some(o) => o.phase != Phase::Succeeded || o.removing || o.status() == Status::Error,
            None => true,
        })
    }

    /// The first dependency of `id` in `Error`, if any (`DEP_E156`).
    pub(super) fn failed_dependency(&self, id: &str) -> Option<String> {
        self.first_dependency(id, |other| {
            other.is_some_and(|o| o.status() == Status::Error)
        })
    }

    /// The first of `id`'s dependencies (the shared ROS master included, for
    /// a ROS deployment) that `matches`, named for a reason.
    fn first_dependency(
        &self,
        id: &str,
        matches: impl Fn(Option<&Deployment>) -> bool,
    ) -> Option<String> {
        let dep = self.deployments.get(id)?;
        let ros = dep.spec.ros.then(|| ROS_MASTER_DEPLOYMENT.to_string());
        dep.spec
            .depends_on
            .iter()
            .chain(ros.as_ref())
            .find(|d| matches(self.deployments.get(*d)))
            .map(|d| describe(d))
    }

    /// Starts the deployments whose dependencies have come up.
    pub(super) fn provision_waiting(&mut self) {
        let waiting: Vec<String> = self
            .deployments
            .values()
            .filter(|d| {
                d.phase == Phase::InProgress
                    && (!d.spec.depends_on.is_empty() || d.spec.ros)
                    && !d.pulling
            })
            .map(|d| d.spec.id.clone())
            .collect();
        for id in waiting {
            if self.unmet_dependency(&id).is_none() {
                self.maybe_provision(&id);
            }
        }
    }
}

/// What converging needs to know of a deployment berth has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Known {
    /// The file it came from.
    pub(super) source: std::path::PathBuf,
    /// It has executables (running, or being removed): a broken file leaves
    /// them as they are, a good one updates them.
    pub(super) ran: bool,
    /// Its file is gone and its containers are being removed.
    pub(super) removing: bool,
}

/// What converging does with one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    /// Its file cannot be applied: `FailedToStart` with the reason; what it
    /// runs keeps running.
    Fail {
        source: std::path::PathBuf,
        reason: String,
    },
    /// A file berth has not seen.
    New,
    /// Its file was broken and nothing ran: start it afresh.
    Afresh,
    /// Its file is back while it is being removed: provisioned after that.
    AfterRemoval,
    /// A file berth runs: applied as an update (a no-op when unchanged).
    Update,
    /// Its file is gone.
    Deprovision,
}

/// Converging, pure: from what berth has (`known`, the ROS master left
/// out), the valid files (`specs`) and the errors of the invalid ones by
/// id (`invalid`), what to do with each deployment, in id order. The specs
/// that cannot be applied (a file error, an unknown dependency, a cycle) are
/// taken out of `specs`.
pub(super) fn plan(
    known: &BTreeMap<String, Known>,
    specs: &mut Deployments,
    invalid: BTreeMap<String, String>,
    dir: &std::path::Path,
) -> Vec<(String, Change)> {
    // A file whose id could not be read is known by its stem: if a running
    // deployment came from that file, the error is that deployment's.
    let mut invalid: BTreeMap<String, String> = invalid
        .into_iter()
        .map(|(id, reason)| {
            if known.contains_key(&id) {
                return (id, reason);
            }
            let from_file = known
                .iter()
                .find(|(_, k)| k.source.file_stem().is_some() && file_stem(&k.source) == id)
                .map(|(id, _)| id.clone());
            (from_file.unwrap_or(id), reason)
        })
        .collect();
    // An unknown dependency or a cycle: FailedToStart with the reason. A
    // dependency whose file is broken is not unknown: the dependent waits.
    for problem in config::dependency_problems(specs) {
        if let config::DependencyProblem::Unknown { dependency, .. } = &problem {
            if invalid.contains_key(dependency) {
                continue;
            }
        }
        for id in problem.deployments() {
            invalid
                .entry(id.clone())
                .and_modify(|r| {
                    r.push_str("; ");
                    r.push_str(&problem.to_string());
                })
                .or_insert_with(|| problem.to_string());
        }
    }
    let mut sources = BTreeMap::new();
    for id in invalid.keys() {
        if let Some(spec) = specs.remove(id) {
            sources.insert(id.clone(), spec.source);
        }
    }
    let ids: BTreeSet<&String> = known
        .keys()
        .chain(specs.keys())
        .chain(invalid.keys())
        .collect();
    ids.into_iter()
        .filter_map(|id| {
            let change = if let Some(reason) = invalid.get(id) {
                let source = sources
                    .remove(id)
                    .unwrap_or_else(|| dir.join(format!("{id}.toml")));
                Change::Fail {
                    source,
                    reason: reason.clone(),
                }
            } else if specs.contains_key(id) {
                match known.get(id) {
                    None => Change::New,
                    Some(k) if k.removing => Change::AfterRemoval,
                    Some(k) if !k.ran => Change::Afresh,
                    Some(_) => Change::Update,
                }
            } else if known.get(id).is_some_and(|k| !k.removing) {
                Change::Deprovision
            } else {
                return None;
            };
            Some((id.clone(), change))
        })
        .collect()
}

/// How a dependency is named in reasons.
fn describe(id: &str) -> String {
    if id == ROS_MASTER_DEPLOYMENT {
        "the shared ROS master".to_string()
    } else {
        format!("dependency {id}")
    }
}

/// What a reload read from disk.
#[derive(Debug)]
pub(super) struct FilesRead {
    agent: Result<config::AgentConfig, Vec<config::ConfigError>>,
    /// The deployment files; `None` when `deployments_dir` is missing.
    files: Option<(Deployments, BTreeMap<String, String>)>,
}

/// The deployment files of `dir`: the valid ones, and the error of each
/// invalid one by deployment id, every error also logged. The id of an
/// invalid file is its `id` when the file is TOML with a string `id`, else
/// the file's stem (and `converge` maps a stem back to the deployment that
/// file held).
pub fn load_files(dir: &std::path::Path) -> (Deployments, BTreeMap<String, String>) {
    let (specs, broken) = config::load_deployments_dir(dir);
    let mut invalid = BTreeMap::new();
    for (file, errors) in broken {
        if file == dir {
            // The directory itself: no deployment to blame.
            for e in &errors {
                error!("{e}");
            }
            continue;
        }
        let id = config::deployment_id_of(&file).unwrap_or_else(|| file_stem(&file));
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        for line in &text {
            error!("{line}");
        }
        invalid.insert(id, text.join("; "));
    }
    (specs, invalid)
}

fn file_stem(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The exports of the deployments `spec` depends on, in `depends_on` order
/// (a later dependency wins on a clash).
pub(super) fn dependency_exports(
    specs: &Deployments,
    spec: &crate::model::DeploymentSpec,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for dep in &spec.depends_on {
        if let Some(other) = specs.get(dep) {
            env.extend(other.exports.clone());
        }
    }
    env
}

/// The host's name inside an isolated component's containers.
pub(super) const HOST_ALIAS: &str = "host.docker.internal";

/// What the engine is asked to create for one executable.
pub(super) fn container_spec(device_id: &str, exec: &Exec) -> crate::runtime::ContainerSpec {
    crate::runtime::ContainerSpec {
        name: container_name(device_id, &exec.key),
        image: exec.spec.image.clone(),
        cmd: exec.spec.command.as_ref().map(|c| c.argv()),
        env: exec.env.clone(),
        labels: container_labels(device_id, &exec.key, &exec.hash),
        nano_cpus: exec.spec.limits.cpus.map(|c| (c * 1e9) as i64),
        memory_bytes: exec.spec.limits.memory_mb.map(|m| (m * 1024 * 1024) as i64),
        binds: exec
            .spec
            .volumes
            .iter()
            .map(|v| {
                let mode = if v.read_only { ":ro" } else { "" };
                format!("{}:{}{mode}", v.host, v.container)
            })
            .collect(),
        devices: exec.spec.devices.clone(),
        network_mode: match exec.spec.network {
            Network::Host => "host".into(),
            Network::Isolated => network_name(device_id, &exec.key),
        },
        network_aliases: match exec.spec.network {
            Network::Host => Vec::new(),
            Network::Isolated => vec![exec.key.executable.clone()],
        },
        // From an isolated network, the host (and so the shared ROS master)
        // is `host.docker.internal`.
        extra_hosts: match exec.spec.network {
            Network::Host => Vec::new(),
            Network::Isolated => vec![format!("{HOST_ALIAS}:host-gateway")],
        },
        healthcheck: crate::runtime::Healthcheck::from_probe(exec.spec.probe.as_ref()),
    }
}

/// Creates a container, and first the network of an isolated component.
pub(super) async fn create_container<R: ContainerRuntime>(
    runtime: &R,
    spec: &crate::runtime::ContainerSpec,
) -> Result<String, RuntimeError> {
    if spec.network_mode != "host" {
        let device = spec.labels.get(labels::DEVICE).cloned().unwrap_or_default();
        let labels = BTreeMap::from([(labels::DEVICE.to_string(), device)]);
        runtime.ensure_network(&spec.network_mode, &labels).await?;
    }
    runtime.create(spec).await
}

/// The spec hash a container was created from.
pub(super) fn container_hash(info: &crate::runtime::ContainerInfo) -> Option<String> {
    info.labels.get(labels::SPEC_HASH).cloned()
}

#[cfg(test)]
mod tests {
    //! The converging plan, one case per test.

    use std::path::{Path, PathBuf};

    use super::*;

    const DIR: &str = "/etc/berth/deployments.d";

    fn spec(id: &str, depends_on: &[&str]) -> crate::model::DeploymentSpec {
        crate::model::DeploymentSpec {
            id: id.into(),
            package: "p".into(),
            package_version: "1".into(),
            restart: Default::default(),
            depends_on: depends_on.iter().map(|d| d.to_string()).collect(),
            ros: false,
            env: BTreeMap::new(),
            exports: BTreeMap::new(),
            components: Vec::new(),
            update: Default::default(),
            source: PathBuf::from(format!("{DIR}/{id}.toml")),
        }
    }

    fn specs(list: &[(&str, &[&str])]) -> Deployments {
        list.iter()
            .map(|(id, deps)| (id.to_string(), spec(id, deps)))
            .collect()
    }

    fn known(list: &[(&str, &str, bool, bool)]) -> BTreeMap<String, Known> {
        list.iter()
            .map(|(id, file, ran, removing)| {
                let k = Known {
                    source: PathBuf::from(format!("{DIR}/{file}")),
                    ran: *ran,
                    removing: *removing,
                };
                (id.to_string(), k)
            })
            .collect()
    }

    fn run(
        known: &BTreeMap<String, Known>,
        mut specs: Deployments,
        invalid: &[(&str, &str)],
    ) -> Vec<(String, Change)> {
        let invalid = invalid
            .iter()
            .map(|(id, r)| (id.to_string(), r.to_string()))
            .collect();
        plan(known, &mut specs, invalid, Path::new(DIR))
    }

    #[test]
    fn new_changed_and_removed_files() {
        let got = run(
            &known(&[
                ("kept", "kept.toml", true, false),
                ("gone", "gone.toml", true, false),
            ]),
            specs(&[("kept", &[]), ("added", &[])]),
            &[],
        );
        assert_eq!(
            got,
            [
                ("added".into(), Change::New),
                ("gone".into(), Change::Deprovision),
                ("kept".into(), Change::Update),
            ]
        );
    }

    #[test]
    fn a_broken_file_of_a_running_deployment_is_that_deployments_failure() {
        // The file's id could not be read: it is known by its stem, and the
        // deployment that came from it keeps running.
        let got = run(
            &known(&[("talker", "robot.toml", true, false)]),
            specs(&[]),
            &[("robot", "robot.toml:3:1: expected a value")],
        );
        assert_eq!(
            got,
            [(
                "talker".into(),
                Change::Fail {
                    source: PathBuf::from(format!("{DIR}/{}.toml", "talker")),
                    reason: "robot.toml:3:1: expected a value".into()
                }
            )]
        );
    }

    #[test]
    fn an_unknown_dependency_and_a_cycle_fail_to_start() {
        let got = run(
            &BTreeMap::new(),
            specs(&[("a", &["b"]), ("b", &["a"]), ("c", &["nowhere"])]),
            &[],
        );
        let failed: Vec<&str> = got
            .iter()
            .filter(|(_, c)| matches!(c, Change::Fail { .. }))
            .map(|(id, _)| id.as_str())
            .collect();
        assert_eq!(failed, ["a", "b", "c"]);
    }

    #[test]
    fn a_dependency_whose_file_is_broken_is_waited_for_not_unknown() {
        let got = run(
            &BTreeMap::new(),
            specs(&[("app", &["map"])]),
            &[("map", "map.toml:1:1: bad")],
        );
        assert_eq!(got[0], ("app".into(), Change::New));
        assert!(matches!(got[1], (ref id, Change::Fail { .. }) if id == "map"));
    }

    #[test]
    fn a_file_back_while_removing_waits_and_a_broken_one_that_never_ran_starts_afresh() {
        let got = run(
            &known(&[
                ("back", "back.toml", true, true),
                ("fixed", "fixed.toml", false, false),
            ]),
            specs(&[("back", &[]), ("fixed", &[])]),
            &[],
        );
        assert_eq!(
            got,
            [
                ("back".into(), Change::AfterRemoval),
                ("fixed".into(), Change::Afresh),
            ]
        );
    }

    #[test]
    fn a_deployment_being_removed_is_left_to_finish() {
        let got = run(
            &known(&[("going", "going.toml", true, true)]),
            specs(&[]),
            &[],
        );
        assert!(got.is_empty(), "{got:?}");
    }
}
