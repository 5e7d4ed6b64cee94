//! Updates (SPEC 8): a changed file's new images pulled and containers
//! created beside the running ones, each swapped in and kept only once it has
//! run for `min_ready_secs`; a failure rolls back to the previous container
//! without a pull.

use super::converge::{
    container_spec, create_container, NEXT_SUFFIX, PREV_SUFFIX, STOP_GRACE_SECS,
};
use super::*;
use crate::model::container_name;

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    /// A changed file: the new spec applies to the executables whose spec
    /// hash changed; the others are not touched.
    pub(super) fn update(
        &mut self,
        id: &str,
        spec: crate::model::DeploymentSpec,
        exports: &BTreeMap<String, String>,
    ) {
        let mut fresh = Deployment::new(&self.config, spec, exports, &mut self.state.executables);
        let Some(dep) = self.deployments.get_mut(id) else {
            return;
        };
        let unchanged = dep.spec == fresh.spec
            && dep.execs.len() == fresh.execs.len()
            && dep
                .execs
                .iter()
                .zip(&fresh.execs)
                .all(|(a, b)| a.key == b.key && a.hash == b.hash);
        if unchanged && dep.failure.is_none() {
            return;
        }
        info!(deployment = id, "deployment file changed");
        // Carry the live state of each executable that stays over to the new spec.
        let mut old: BTreeMap<ExecKey, Exec> =
            dep.execs.drain(..).map(|e| (e.key.clone(), e)).collect();
        for exec in &mut fresh.execs {
            if let Some(mut live) = old.remove(&exec.key) {
                live.spec = exec.spec.clone();
                live.env = std::mem::take(&mut exec.env);
                live.hash = exec.hash.clone();
                std::mem::swap(exec, &mut live);
            }
        }
        dep.execs = fresh.execs;
        let retired: Vec<ExecKey> = old.keys().cloned().collect();
        dep.retiring.extend(old.into_values());
        dep.spec = fresh.spec;
        dep.failure = None;
        dep.update = None;
        dep.images_ready = false;
        dep.dirty = true;
        if dep.phase == Phase::FailedToStart || dep.phase == Phase::FailedToUpdate {
            dep.phase = Phase::Provisioning;
        }
        for key in retired {
            self.feed(&key, Input::Retire);
        }
        self.start_update(id);
    }

    /// Pulls the images of the executables whose container is out of date and
    /// creates their new containers beside the old ones.
    pub(super) fn start_update(&mut self, id: &str) {
        let device = self.config.device_id.clone();
        let Some(dep) = self.deployments.get_mut(id) else {
            return;
        };
        if dep.updating || dep.removing || !self.engine_up {
            return;
        }
        let outdated: Vec<(
            ExecKey,
            crate::runtime::ContainerSpec,
            crate::model::PullPolicy,
        )> = dep
            .execs
            .iter()
            .filter(|e| {
                e.container
                    .as_ref()
                    .is_some_and(|c| c.hash.as_deref() != Some(e.hash.as_str()))
                    && e.rejected.as_deref() != Some(e.hash.as_str())
                    && !matches!(e.life, Life::Retiring { .. })
            })
            .map(|e| {
                let mut spec = container_spec(&device, e);
                spec.name.push_str(NEXT_SUFFIX);
                (e.key.clone(), spec, e.spec.pull)
            })
            .collect();
        if outdated.is_empty() {
            self.maybe_provision(id);
            return;
        }
        dep.updating = true;
        dep.phase = Phase::Provisioning;
        dep.dirty = true;
        let runtime = self.runtime.clone();
        let registries = self.registries.clone();
        let tx = self.tx.clone();
        let deployment = id.to_string();
        let housekeeping = self.housekeeping();
        self.spawn_engine_call(async move {
            let images: Vec<_> = outdated
                .iter()
                .map(|(_, s, pull)| (s.image.clone(), *pull))
                .collect();
            let result = async {
                let mut outcome = super::launch::PullOutcome::default();
                let pulled = super::launch::ensure_images_with(
                    &*runtime,
                    &images,
                    &registries,
                    Some(&housekeeping),
                    &mut |_, _| {},
                    &mut outcome,
                )
                .await;
                if !outcome.pulled.is_empty() {
                    let _ = tx.send(Msg::Collected {
                        pulled: std::mem::take(&mut outcome.pulled),
                        removed: std::mem::take(&mut outcome.removed),
                    });
                }
                pulled.map_err(|(_, e)| e.to_string())?;
                if let Some((_, reason)) = outcome.disk_full {
                    return Err(reason);
                }
                let mut created = Vec::new();
                for (key, spec, _) in &outdated {
                    // A leftover of an update berth did not finish.
                    let _ = runtime.remove(&spec.name).await;
                    match create_container(&*runtime, spec).await {
                        Ok(id) => created.push((key.clone(), id)),
                        Err(e) => {
                            for (_, id) in &created {
                                let _ = runtime.remove(id).await;
                            }
                            return Err(e.to_string());
                        }
                    }
                }
                Ok(created)
            }
            .await;
            let _ = tx.send(Msg::Prepared { deployment, result });
        });
    }

    pub(super) fn on_prepared(&mut self, id: &str, result: Result<Vec<(ExecKey, String)>, String>) {
        let Some(dep) = self.deployments.get_mut(id) else {
            return;
        };
        dep.updating = false;
        dep.dirty = true;
        match result {
            Err(reason) => {
                warn!(
                    deployment = id,
                    reason, "update failed; the previous containers keep running"
                );
                dep.phase = Phase::FailedToUpdate;
                dep.failure = Some(reason.clone());
                dep.update = Some(UpdateDoc {
                    package_version: dep.spec.package_version.clone(),
                    state: "rolled-back".into(),
                    reason,
                    error_code: Some(ErrorCode::ImageUnavailable),
                    at: timestamp(SystemTime::now()),
                });
            }
            Ok(created) => {
                for (key, next) in created {
                    let Some(exec) = self.exec_mut(&key) else {
                        continue;
                    };
                    let current = exec.container_id().map(str::to_string);
                    self.feed(&key, Input::Replace { next, current });
                }
            }
        }
    }

    /// Replaces an executable's container by the one its update created:
    /// stop the old one and keep it under another name (or remove it), give
    /// the new one its name, start it.
    pub(super) fn swap(&mut self, key: &ExecKey, rep: lifecycle::Replacement) {
        let device = self.config.device_id.clone();
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        let old = exec.container_id().map(str::to_string);
        let name = container_name(&device, key);
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        let key = key.clone();
        self.tracker.spawn(async move {
            if let Some(old) = old {
                let _ = runtime.stop(&old, STOP_GRACE_SECS).await;
                let kept = match &rep.previous {
                    Some(_) => runtime.rename(&old, &format!("{name}{PREV_SUFFIX}")).await,
                    None => match runtime.remove(&old).await {
                        Err(RuntimeError::NotFound(_)) => Ok(()),
                        other => other,
                    },
                };
                if let Err(e) = kept {
                    let _ = tx.send(Msg::Launched {
                        key,
                        container_id: Some(rep.next),
                        result: Err(e),
                    });
                    return;
                }
            }
            let result = async {
                runtime.rename(&rep.next, &name).await?;
                runtime.start(&rep.next).await?;
                runtime.inspect(&rep.next).await
            }
            .await;
            let _ = tx.send(Msg::Launched {
                key,
                container_id: Some(rep.next),
                result,
            });
        });
    }

    /// The update holds: its previous container goes.
    pub(super) fn drop_previous(&mut self, key: &ExecKey, previous: String) {
        info!(executable = %key, "update proven; removing the previous container");
        if let Some(dep) = self.deployments.get_mut(&key.deployment) {
            dep.update_phase();
        }
        let runtime = self.runtime.clone();
        self.tracker.spawn(async move {
            if let Err(e) = runtime.remove(&previous).await {
                warn!(container = %short(&previous), error = %e, "cannot remove the previous container");
            }
        });
    }

    /// The update failed: its new container goes, the previous one runs again
    /// (no pull: its image is still there), and the document says why.
    pub(super) fn roll_back(
        &mut self,
        key: &ExecKey,
        previous: String,
        reason: String,
        error_code: ErrorCode,
    ) {
        let device = self.config.device_id.clone();
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        exec.rejected = Some(exec.hash.clone());
        let failed = exec.container_id().map(str::to_string);
        let reason = format!("{}/{}: {reason}", key.component, key.executable);
        warn!(executable = %key, reason, "update failed; rolling back");
        if let Some(dep) = self.deployments.get_mut(&key.deployment) {
            dep.phase = Phase::FailedToUpdate;
            dep.update = Some(UpdateDoc {
                package_version: dep.spec.package_version.clone(),
                state: "rolled-back".into(),
                reason: reason.clone(),
                error_code: Some(error_code),
                at: timestamp(SystemTime::now()),
            });
            let version = dep.spec.package_version.clone();
            self.exec_event(
                key,
                Event::Rollback {
                    deployment: key.deployment.clone(),
                    component: key.component.clone(),
                    executable: key.executable.clone(),
                    package_version: version,
                    error_code,
                    reason,
                },
            );
        }
        // Starting the previous container again is no restart: a
        // reservation of the new one's on disk must not count it.
        self.hold_uncounted_start(key);
        let durable = self.durable_commitment(key);
        let name = container_name(&device, key);
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        let key = key.clone();
        self.tracker.spawn(async move {
            if let Some(failed) = failed.filter(|f| *f != previous) {
                let _ = runtime.stop(&failed, STOP_GRACE_SECS).await;
                if let Err(e) = runtime.remove(&failed).await {
                    warn!(container = %short(&failed), error = %e, "cannot remove the failed update's container");
                }
            }
            if !durable.await {
                return;
            }
            let result = async {
                runtime.rename(&previous, &name).await?;
                runtime.start(&previous).await?;
                runtime.inspect(&previous).await
            }
            .await;
            let _ = tx.send(Msg::Launched {
                key,
                container_id: Some(previous),
                result,
            });
        });
    }
}
