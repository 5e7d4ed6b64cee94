//! Retiring: deprovisioning a deployment whose file is gone, and removing
//! the containers of executables an update dropped; a refused removal is
//! retried (`PartiallyDeprovisioned`, `DEP_E304`).

use std::collections::BTreeSet;

use super::converge::{REMOVE_RETRY, STOP_GRACE_SECS};
use super::*;
use crate::model::{network_name, Network};

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    /// A removed file: stop and remove every container, then report
    /// `DeploymentStopped` (or `PartiallyDeprovisioned` while one resists).
    pub(super) fn deprovision(&mut self, id: &str) {
        let Some(dep) = self.deployments.get_mut(id) else {
            return;
        };
        info!(deployment = id, "deployment file removed; deprovisioning");
        dep.removing = true;
        dep.pull_due = None;
        dep.dirty = true;
        let execs: Vec<Exec> = dep.execs.drain(..).collect();
        dep.retiring.extend(execs);
        let keys: Vec<ExecKey> = dep.retiring.iter().map(|e| e.key.clone()).collect();
        for key in keys {
            self.feed(&key, Input::Retire);
        }
        self.finish_deprovision(id);
    }

    /// Stops and removes the container of a retiring executable.
    pub(super) fn remove_container(&mut self, key: &ExecKey) {
        let Some(exec) = self.retiring_mut(key) else {
            return;
        };
        exec.life = Life::Retiring { retry_at: None };
        let Some(id) = exec.container_id().map(str::to_string) else {
            self.forget_retired(key);
            return;
        };
        exec.set(Status::Pending, Some("stopping".into()), None);
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        let key = key.clone();
        self.tracker.spawn(async move {
            let _ = runtime.stop(&id, STOP_GRACE_SECS).await;
            let result = match runtime.remove(&id).await {
                Err(RuntimeError::NotFound(_)) => Ok(()),
                other => other,
            };
            let _ = tx.send(Msg::Removed { key, result });
        });
    }

    pub(super) fn on_removed(&mut self, key: &ExecKey, result: Result<(), RuntimeError>) {
        let Some(exec) = self.retiring_mut(key) else {
            return;
        };
        match result {
            Ok(()) => {
                exec.container = None;
                self.forget_retired(key);
            }
            Err(e) => {
                warn!(executable = %key, error = %e, "cannot remove container; retrying");
                exec.set(
                    Status::Error,
                    Some(format!("cannot remove container: {e}")),
                    Some(ErrorCode::ContainerNotRemoved),
                );
                exec.life = Life::Retiring {
                    retry_at: Some(Instant::now() + REMOVE_RETRY),
                };
                if let Some(dep) = self.deployments.get_mut(&key.deployment) {
                    if dep.removing {
                        dep.phase = Phase::PartiallyDeprovisioned;
                    }
                    dep.dirty = true;
                }
            }
        }
        self.finish_deprovision(&key.deployment);
    }

    /// Drops a retired executable whose container is gone; its count ends.
    pub(super) fn forget_retired(&mut self, key: &ExecKey) {
        if let Some(dep) = self.deployments.get_mut(&key.deployment) {
            dep.retiring.retain(|e| e.key != *key);
            dep.dirty = true;
        }
        self.state.remove_exec(key);
        self.mark_state_dirty();
    }

    /// Once every container of a removed deployment is gone: its final
    /// retained document says `DeploymentStopped`, and berth forgets it.
    pub(super) fn finish_deprovision(&mut self, id: &str) {
        let Some(dep) = self.deployments.get_mut(id) else {
            return;
        };
        if !dep.removing || !dep.retiring.is_empty() {
            return;
        }
        dep.phase = Phase::DeploymentStopped;
        dep.dirty = true;
        // The networks of its isolated components go with it.
        let networks: BTreeSet<String> = dep
            .spec
            .executables()
            .filter(|(_, e)| e.network == Network::Isolated)
            .map(|(c, e)| network_name(&self.config.device_id, &ExecKey::new(id, &c.name, &e.name)))
            .collect();
        for name in networks {
            let runtime = self.runtime.clone();
            self.tracker.spawn(async move {
                if let Err(e) = runtime.remove_network(&name).await {
                    warn!(network = name, error = %e, "cannot remove network");
                }
            });
        }
        info!(deployment = id, "deprovisioned");
        self.publish_dirty();
        self.deployments.remove(id);
        if id == ROS_MASTER_DEPLOYMENT {
            self.ros_master_removed();
        } else {
            self.converge_ros();
        }
        // A file that came back meanwhile is provisioned afresh (read off
        // the loop; it comes back as a reload).
        self.read_files(self.reload_seq, Some(id.to_string()));
    }

    /// A container of a deployment that has no file (removed while berth
    /// was away): deprovisioned like any removed deployment.
    pub(super) fn remove_orphan(&mut self, key: ExecKey, info: crate::runtime::ContainerInfo) {
        info!(container = %info.name, "container of a deployment that has no file; deprovisioning");
        let id = key.deployment.clone();
        let dep = self.deployments.entry(id.clone()).or_insert_with(|| {
            let mut dep =
                Deployment::failed(&id, self.config.deployments_dir.clone(), String::new());
            dep.failure = None;
            dep.phase = Phase::Provisioning;
            dep.removing = true;
            dep
        });
        let mut exec = Exec::orphan(key.clone(), info.id);
        exec.shown.status = Status::Pending;
        dep.retiring.push(exec);
        dep.dirty = true;
        self.remove_container(&key);
    }

    pub(super) fn retiring_mut(&mut self, key: &ExecKey) -> Option<&mut Exec> {
        self.deployments
            .get_mut(&key.deployment)?
            .retiring
            .iter_mut()
            .find(|e| e.key == *key)
    }
}
