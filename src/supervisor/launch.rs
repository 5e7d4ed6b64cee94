//! Pulling images, creating and starting containers, and what their results mean.

use super::*;

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    /// Pulls what is missing and creates the containers of executables that
    /// have none.
    pub(super) fn maybe_provision(&mut self, id: &str) {
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

    pub(super) fn on_pulled(&mut self, id: &str, result: Result<(), (String, RuntimeError)>) {
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
                self.event(Event::Error {
                    deployment: Some(id.to_string()),
                    component: None,
                    executable: None,
                    error_code: Some(ErrorCode::ImageUnavailable),
                    exit_code: None,
                    reason: e.to_string(),
                });
            }
        }
    }

    // ---- starting containers ---------------------------------------------------

    /// Creates the container if there is none, then starts it. `counted`: this
    /// start is a restart and was already counted (or is counted now).
    pub(super) fn launch(&mut self, key: &ExecKey, counted: bool) {
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

    pub(super) fn spawn_launch(
        &self,
        (key, container_id, spec): (ExecKey, Option<String>, ContainerSpec),
    ) {
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

    pub(super) fn on_launched(
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
                    self.event(Event::Restarted {
                        deployment: key.deployment.clone(),
                        component: key.component.clone(),
                        executable: key.executable.clone(),
                        restart_count,
                    });
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
                self.event(Event::exec_error(
                    key,
                    ErrorCode::ExecutableFailed,
                    None,
                    reason.clone(),
                ));
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
}

/// Pulls each image as its pull policy says.
pub(super) async fn ensure_images<R: ContainerRuntime>(
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
pub(super) fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// Creates the container when there is none, starts it, and reads it back.
pub(super) async fn launch_container<R: ContainerRuntime>(
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
pub(super) fn engine_reason(e: &RuntimeError) -> String {
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
