//! The engine connection coming and going, and reconciling with its listing:
//! the replayed history tells manual stops from crashes while berth was away.

use super::*;

/// How the replay says a container ended while berth was away.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Replayed {
    pub(super) killed_by_other: bool,
    pub(super) manual: bool,
    pub(super) died: bool,
    pub(super) destroyed: bool,
}

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    pub(super) fn on_engine_down(&mut self, error: &str) {
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
            self.event(Event::device_error(
                Some(ErrorCode::EngineUnreachable),
                format!("docker engine unreachable: {error}"),
            ));
        }
    }

    pub(super) async fn on_engine_up(&mut self, replay: Vec<EngineEvent>) {
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
    pub(super) fn detect_engine_restart(&mut self, replay: &[EngineEvent]) {
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

    pub(super) fn notify_ready(&mut self) {
        if !self.ready_sent {
            self.ready_sent = true;
            self.notifier.ready();
        }
    }

    // ---- reconcile -----------------------------------------------------------

    /// Brings every executable in line with the engine's listing, using the
    /// replayed history to tell manual stops from crashes.
    pub(super) fn reconcile(&mut self, containers: Vec<ContainerInfo>, replay: &[EngineEvent]) {
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

    pub(super) fn reconcile_exec(
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
    pub(super) fn restore_recorded(&mut self, key: &ExecKey, record: &ExecRecord, code: i64) {
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
}

/// Per container id, what the replayed history says about how it ended.
pub(super) fn classify_replay(replay: &[EngineEvent]) -> HashMap<String, Replayed> {
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

pub(super) fn ran_for(info: &ContainerInfo) -> Option<Duration> {
    let started = parse_nanos(info.started_at.as_deref()?);
    let finished = parse_nanos(info.finished_at.as_deref()?);
    (started > 0 && finished >= started).then(|| Duration::from_nanos((finished - started) as u64))
}
