//! Pulling images, creating and starting containers, and what their results mean.

use super::*;

/// How long after an unanswered call berth asks the engine again about
/// the executable's container.
const RECHECK_AFTER: Duration = Duration::from_secs(1);

/// A start decided, to be sent to the engine.
#[derive(Debug)]
pub(super) struct LaunchCall {
    key: ExecKey,
    /// The container to start; one is created when there is none.
    container_id: Option<String>,
    spec: ContainerSpec,
    /// Two or more restarts in a row: it takes the crash-loop lane.
    crash_looping: bool,
    /// Stop the running container first (a restart for unhealthiness).
    stop_first: bool,
    /// Told once the start was asked for and answered: the exit's log
    /// tail is read then, not beside the start.
    started: Option<Arc<tokio::sync::Notify>>,
    /// A counted restart: its record is on disk before the start.
    counted: bool,
}

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
            for exec in dep.execs.iter_mut().filter(|e| e.waiting()) {
                exec.set(
                    Status::Pending,
                    Some(format!("waiting for {waiting}")),
                    None,
                );
            }
            dep.dirty = true;
            return;
        }
        let needs: Vec<&Exec> = dep.execs.iter().filter(|e| e.waiting()).collect();
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
                .filter(|e| e.waiting() && e.shown.status != Status::Error)
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
            let housekeeping = self.housekeeping();
            self.spawn_engine_call(async move {
                let progress_tx = tx.clone();
                let progress_dep = deployment.clone();
                let mut throttle = crate::runtime::Throttle::new(PULL_PROGRESS_EVERY);
                let mut progress = move |image: &str, p: crate::runtime::PullProgress| {
                    if p.total_bytes > 0 && throttle.ready() {
                        let _ = progress_tx.send(Msg::PullProgress {
                            deployment: progress_dep.clone(),
                            image: image.to_string(),
                            progress: p,
                        });
                    }
                };
                let mut outcome = PullOutcome::default();
                let result = ensure_images_with(
                    &*runtime,
                    &images,
                    &registries,
                    Some(&housekeeping),
                    &mut progress,
                    &mut outcome,
                )
                .await;
                let _ = tx.send(Msg::Pulled {
                    deployment,
                    result,
                    outcome,
                });
            });
            return;
        }
        let launches: Vec<(ExecKey, Option<lifecycle::Exit>)> = needs
            .iter()
            .map(|e| {
                // A container that ran before and is gone (a reboot, say):
                // starting it again is a restart.
                let restart = e.lost_container.then_some(lifecycle::Exit::Interruption);
                (e.key.clone(), restart)
            })
            .collect();
        for (key, restart) in launches {
            self.feed(&key, Input::Launch { restart });
        }
    }

    /// What a collection may remove and must keep, as the loop knows it now.
    pub(super) fn housekeeping(&self) -> Housekeeping {
        let mut protected = std::collections::BTreeSet::new();
        for dep in self.deployments.values() {
            for exec in dep.execs.iter().chain(&dep.retiring) {
                protected.insert(exec.spec.image.clone());
                if let Some(c) = &exec.container {
                    protected.insert(c.image.clone());
                }
            }
        }
        Housekeeping {
            settings: self.config.images,
            pulled: self.state.pulled_images.clone(),
            protected,
        }
    }

    /// A pull's progress, for the reason of the executables waiting for it.
    pub(super) fn on_pull_progress(
        &mut self,
        id: &str,
        image: &str,
        progress: crate::runtime::PullProgress,
    ) {
        let Some(dep) = self.deployments.get_mut(id) else {
            return;
        };
        if !dep.pulling {
            return;
        }
        for exec in dep
            .execs
            .iter_mut()
            .filter(|e| e.waiting() && e.spec.image == image && e.shown.status == Status::Pending)
        {
            exec.set(
                Status::Pending,
                Some(format!("pulling image {image}: {progress}")),
                None,
            );
        }
        dep.dirty = true;
    }

    pub(super) fn on_pulled(
        &mut self,
        id: &str,
        result: Result<(), (String, RuntimeError)>,
        outcome: PullOutcome,
    ) {
        let settings = self.config.restart;
        for image in &outcome.pulled {
            self.state.pulled_images.insert(image.clone());
            self.state_dirty = true;
        }
        for image in &outcome.removed {
            self.state.pulled_images.remove(image);
            self.state_dirty = true;
        }
        for (image, reason) in &outcome.notes {
            warn!(
                deployment = id,
                image, reason, "pull failed; the present image runs"
            );
        }
        let Some(dep) = self.deployments.get_mut(id) else {
            return;
        };
        dep.pulling = false;
        if let Some((image, reason)) = outcome.disk_full {
            let delay = dep
                .pull_backoff
                .next_delay(&settings, None)
                .max(settings.backoff_initial);
            dep.pull_due = Some(Instant::now() + delay);
            warn!(deployment = id, image, reason, "pull does not fit");
            for exec in dep.execs.iter_mut().filter(|x| x.waiting()) {
                if exec.spec.image == image {
                    exec.set(
                        Status::Error,
                        Some(format!("{reason}; retrying in {}", human(delay))),
                        Some(ErrorCode::DiskFull),
                    );
                }
            }
            dep.dirty = true;
            self.event(Event::Error {
                deployment: Some(id.to_string()),
                component: None,
                executable: None,
                error_code: Some(ErrorCode::DiskFull),
                exit_code: None,
                reason,
                signal: None,
                oom_killed: None,
                log_tail: None,
            });
            return;
        }
        for (image, reason) in &outcome.notes {
            for exec in dep
                .execs
                .iter_mut()
                .filter(|x| x.waiting() && x.spec.image == *image)
            {
                exec.set(Status::Pending, Some(reason.clone()), None);
            }
        }
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
                for exec in dep.execs.iter_mut().filter(|x| x.waiting()) {
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
                    signal: None,
                    oom_killed: None,
                    log_tail: None,
                });
            }
        }
    }

    // ---- starting containers ---------------------------------------------------

    /// Creates the container if there is none, then starts it. A counted
    /// restart's commitment (`pending_restart`) is on disk before the start
    /// is requested; a reconcile makes one write for all the restarts it decides.
    pub(super) fn launch(&mut self, key: &ExecKey) {
        let device = self.config.device_id.clone();
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        let container_id = exec.container_id().map(str::to_string);
        let spec = converge::container_spec(&device, exec);
        // Executables in a crash loop (two or more restarts in a row) share
        // a lane of their own before an engine slot, so that a storm of them
        // never makes a healthy executable wait behind it.
        let crash_looping = exec.backoff.consecutive >= 2;
        let committed = exec.pending_restart.is_some();
        let stop_first = std::mem::take(&mut exec.stop_first);
        let started = exec.start_signal.take();
        let call = LaunchCall {
            key: key.clone(),
            container_id,
            spec,
            crash_looping,
            stop_first,
            started,
            counted: committed,
        };
        if committed {
            // The count and the commitment to start are one durable record;
            // the launch waits for it (see `spawn_launch`).
            self.commit_restart(key, stop_first);
        } else {
            self.hold_uncounted_start(key);
        }
        match self.held_launches.as_mut() {
            Some(held) => held.push(call),
            None => self.spawn_launch(call),
        }
    }

    pub(super) fn spawn_launch(&mut self, call: LaunchCall) {
        self.launched_in_turn = true;
        let LaunchCall {
            key,
            container_id,
            spec,
            crash_looping,
            stop_first,
            started,
            counted,
        } = call;
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        let crash_lane = crash_looping.then(|| self.crash_lane.clone());
        // Creating a container (and pulling its network into being) is the
        // heavy call; a start of one that exists is light.
        let slots = if container_id.is_some() {
            self.start_slots.clone()
        } else {
            self.engine_slots.clone()
        };
        let durable = self.durable_commitment(&key);
        self.tracker.spawn(async move {
            // No restart starts without its record on disk.
            if !durable.await {
                return;
            }
            if counted {
                crate::trace::committed(&spec.labels, container_id.as_deref().unwrap_or(""));
            }
            let _lane = match crash_lane {
                Some(lane) => Some(lane.acquire_owned().await),
                None => None,
            };
            let _slot = slots.acquire_owned().await;
            if let (true, Some(id)) = (stop_first, container_id.as_deref()) {
                // berth's own stop: its kill and die come before the start
                // that follows, and are stale to it.
                if let Err(e) = runtime.stop(id, converge::STOP_GRACE_SECS).await {
                    debug!(container = %short(id), error = %e, "stop before restart");
                }
            }
            let (container_id, result) = launch_container(&*runtime, container_id, &spec).await;
            if let Some(started) = started {
                started.notify_one();
            }
            let _ = tx.send(Msg::Launched {
                key,
                container_id,
                result,
            });
        });
    }

    /// A call about an executable went unanswered (the engine's request
    /// timeout) while its event stream may still be alive: ask the engine
    /// again what became of the container, and reconcile that executable
    /// alone from the answer. The next reconcile would do the same if the
    /// engine goes away meanwhile.
    pub(super) fn recheck(&self, key: &ExecKey, container: Option<String>) {
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        let key = key.clone();
        self.tracker.spawn(async move {
            tokio::time::sleep(RECHECK_AFTER).await;
            let result = match container {
                Some(id) => Some(runtime.inspect(&id).await),
                None => None,
            };
            let _ = tx.send(Msg::Rechecked { key, result });
        });
    }

    pub(super) fn on_rechecked(
        &mut self,
        key: &ExecKey,
        result: Option<Result<ContainerInfo, RuntimeError>>,
    ) {
        if !self.engine_up {
            return; // the reconcile after the reconnection decides
        }
        let position = self.state.event_position;
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        if exec.life != Life::Idle {
            return; // something else has happened to it since
        }
        match result {
            Some(Err(RuntimeError::Unreachable(_))) => {
                let container = exec.container_id().map(str::to_string);
                self.recheck(key, container);
            }
            Some(Ok(info)) => {
                self.reconcile_exec(
                    key,
                    Some(info),
                    super::reconcile::Replayed::default(),
                    position,
                );
            }
            Some(Err(_)) | None => {
                self.reconcile_exec(key, None, super::reconcile::Replayed::default(), position);
                self.maybe_provision(&key.deployment.clone());
            }
        }
        self.mark_dirty(&key.deployment);
    }

    /// The engine's answer to a launch, a swap or a rollback.
    pub(super) fn on_launched(
        &mut self,
        key: &ExecKey,
        container_id: Option<String>,
        result: Result<ContainerInfo, RuntimeError>,
    ) {
        let Some(exec) = self.exec_any_mut(key) else {
            return;
        };
        if let Some(id) = container_id.filter(|id| Some(id.as_str()) != exec.container_id()) {
            // A container this launch (or an update) created: current spec.
            exec.container = Some(Container {
                id,
                hash: Some(exec.hash.clone()),
                image: exec.spec.image.clone(),
                started_at: None,
                started_nanos: 0,
                ip_address: None,
                oom_killed: false,
            });
        }
        if matches!(exec.life, Life::Retiring { .. }) {
            // Retired while its start was in flight: remove it now.
            self.remove_container(key);
            return;
        }
        let swapping = matches!(exec.life, Life::Replacing(_));
        let started = result.is_ok();
        let input = match result {
            Ok(info) => {
                exec.container = Some(Container::from_info(&info));
                exec.launched = true;
                exec.lost_container = false;
                exec.pending_restart = None;
                exec.health = None;
                exec.evidence = None;
                exec.stop_by = None;
                info!(executable = %key, container = %short(&info.id), restart_count = exec.restart_count, "started");
                if swapping {
                    Input::Swapped
                } else {
                    Input::Started
                }
            }
            // The reconcile after the reconnection decides again; a
            // committed restart stays pending in the state.
            Err(RuntimeError::Unreachable(e)) => {
                debug!(executable = %key, error = %e, "engine unreachable during start");
                let container = exec.container_id().map(str::to_string);
                self.recheck(key, container);
                Input::Lost
            }
            Err(RuntimeError::ImageUnavailable { message, .. }) => {
                exec.pending_restart = None;
                Input::ImageMissing { reason: message }
            }
            Err(e) => {
                // A failed start, such as a command missing from `$PATH`.
                exec.pending_restart = None;
                exec.shown.exit_code = None;
                let reason = engine_reason(&e);
                if swapping {
                    Input::SwapFailed { reason }
                } else {
                    Input::StartRefused { reason }
                }
            }
        };
        self.state_dirty = true;
        self.feed(key, input);
        if started {
            // Its next restart is committed now, while it runs.
            self.reserve(key);
        }
        if let Some(dep) = self.deployments.get_mut(&key.deployment) {
            dep.update_phase();
        }
        self.apply_deferred(key);
    }

    /// Events that arrived while an engine call was in flight, in their order.
    pub(super) fn apply_deferred(&mut self, key: &ExecKey) {
        let deferred = self
            .exec_mut(key)
            .filter(|e| !e.busy())
            .map(|e| std::mem::take(&mut e.deferred))
            .unwrap_or_default();
        for event in deferred {
            self.on_event(event);
        }
    }
}

/// How often a pull's progress may change an executable's reason (SPEC 8).
pub(super) const PULL_PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What a collection may remove (images berth pulled) and must keep (those
/// a current deployment or a container of berth's names).
#[derive(Debug, Clone)]
pub(super) struct Housekeeping {
    pub(super) settings: crate::config::ImageSettings,
    pub(super) pulled: std::collections::BTreeSet<String>,
    pub(super) protected: std::collections::BTreeSet<String>,
}

/// What pulling did besides succeeding or failing.
#[derive(Debug, Default)]
pub(super) struct PullOutcome {
    /// Images berth pulled.
    pub(super) pulled: Vec<String>,
    /// Images a collection removed.
    pub(super) removed: Vec<String>,
    /// `pull = "always"` failed and the present image is used: (image, reason).
    pub(super) notes: Vec<(String, String)>,
    /// The pull does not fit even after a collection: (image, reason).
    pub(super) disk_full: Option<(String, String)>,
}

/// Removes unused images berth pulled, oldest first, as `[images]` says
/// (never one a container uses or `protected` names, never forced), and
/// returns the data root's use after it. `pulling`: a pull is about to start.
pub(super) async fn collect_images<R: ContainerRuntime>(
    runtime: &R,
    hk: &Housekeeping,
    pulling: bool,
    removed: &mut Vec<String>,
) -> Result<Option<crate::runtime::DiskUsage>, RuntimeError> {
    use crate::runtime::housekeeping::{collection_due, plan_collection};
    let usage = runtime.data_root_usage().await?;
    if collection_due(&usage, &hk.settings, pulling).is_none() {
        return Ok(Some(usage));
    }
    // Only a tag berth pulled and nothing protects can go. With none, the
    // engine's lists (every image and container on it: megabytes of heap on
    // a busy engine, that the allocator keeps) are not read.
    if hk.pulled.is_subset(&hk.protected) {
        return Ok(Some(usage));
    }
    let images = runtime.list_images().await?;
    let plan = plan_collection(&images, &usage, &hk.settings, |image| {
        !image.tags.is_empty()
            && image
                .tags
                .iter()
                .all(|t| hk.pulled.contains(t) && !hk.protected.contains(t))
    });
    for image in plan {
        for tag in &image.tags {
            match runtime.remove_image(tag).await {
                Ok(()) => {
                    info!(image = tag, size_bytes = image.size_bytes, "image removed");
                    removed.push(tag.clone());
                }
                Err(RuntimeError::Unreachable(e)) => return Err(RuntimeError::Unreachable(e)),
                Err(e) => debug!(image = tag, error = %e, "image kept"),
            }
        }
    }
    runtime.data_root_usage().await.map(Some)
}

/// Pulls each image as its pull policy says, collecting images first when
/// space is short (`housekeeping`), reporting progress, and saying what it
/// did in `outcome`.
pub(super) async fn ensure_images_with<R: ContainerRuntime>(
    runtime: &R,
    images: &[(String, PullPolicy)],
    registries: &[RegistryAuth],
    housekeeping: Option<&Housekeeping>,
    progress: &mut (dyn FnMut(&str, crate::runtime::PullProgress) + Send),
    outcome: &mut PullOutcome,
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
                if let Some(hk) = housekeeping {
                    match collect_images(runtime, hk, true, &mut outcome.removed).await {
                        Ok(Some(usage))
                            if !crate::runtime::housekeeping::pull_fits(&usage, &hk.settings) =>
                        {
                            outcome.disk_full = Some((
                                image.clone(),
                                format!(
                                    "no room to pull image {image}: {} MB free on {}, \
                                     [images] min_free_mb is {}",
                                    usage.free_bytes / (1024 * 1024),
                                    usage.data_root.display(),
                                    hk.settings.min_free_bytes / (1024 * 1024)
                                ),
                            ));
                            return Ok(());
                        }
                        Err(RuntimeError::Unreachable(e)) => {
                            return Err(fail(RuntimeError::Unreachable(e)))
                        }
                        _ => {}
                    }
                }
                let auth = registries.iter().find(|r| registry_of(image) == r.server);
                info!(image, authenticated = auth.is_some(), "pulling image");
                let mut report = |p| progress(image, p);
                match runtime.pull_with_progress(image, auth, &mut report).await {
                    Ok(()) => outcome.pulled.push(image.clone()),
                    // The registry cannot be reached (a robot booting
                    // offline): the image that is there runs.
                    Err(e) if present && !matches!(e, RuntimeError::Unreachable(_)) => {
                        outcome.notes.push((
                            image.clone(),
                            format!("pull failed ({e}); running the image present on the device"),
                        ));
                    }
                    Err(e) => return Err(fail(e)),
                }
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
        // A missing image comes back as `ImageUnavailable` from the adapter.
        None => match converge::create_container(runtime, spec).await {
            Ok(id) => id,
            Err(e) => return (None, Err(e)),
        },
    };
    debug!(container = %spec.name, "start request");
    crate::trace::start_request(&spec.labels, &id);
    if let Err(e) = runtime.start(&id).await {
        return (Some(id), Err(e));
    }
    let info = runtime.inspect(&id).await;
    (Some(id), info)
}

/// The reason an operator reads for a failed start: the adapter has already
/// kept the part that matters (`exec: "x": executable file not found in $PATH`).
pub(super) fn engine_reason(e: &RuntimeError) -> String {
    match e {
        RuntimeError::StartFailed { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
