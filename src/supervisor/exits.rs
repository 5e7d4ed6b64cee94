//! Exits and restarts: engine events about an executable become inputs of
//! its lifecycle ([`lifecycle::step`]), and the effects that come out are
//! carried out here (restarts committed and started, documents and events).

use super::*;

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    pub(super) fn on_event(&mut self, event: EngineEvent) {
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
        if exec.busy() {
            exec.deferred.push(event);
            return;
        }
        let Some(container) = exec.container.as_mut() else {
            return;
        };
        if container.id != event.container_id {
            return; // about an older container of this executable
        }
        if event.time_nanos < container.started_nanos {
            return; // before the start berth knows of
        }
        let input = match event.action {
            EventAction::Kill { signal } => Input::Killed(Kill {
                at: event.time_nanos,
                signal: signal.and_then(|s| s.parse().ok()),
            }),
            EventAction::Die { exit_code } => Input::Died {
                code: exit_code.unwrap_or(0),
                at: event.time_nanos,
                ran_for: (container.started_nanos > 0).then(|| {
                    Duration::from_nanos((event.time_nanos - container.started_nanos).max(0) as u64)
                }),
            },
            EventAction::Start => {
                if matches!(exec.life, Life::Running { .. } | Life::Proving { .. }) {
                    return; // berth's own start, already applied
                }
                container.started_nanos = event.time_nanos;
                container.started_at = Some(timestamp(
                    SystemTime::UNIX_EPOCH + Duration::from_nanos(event.time_nanos as u64),
                ));
                exec.launched = true;
                exec.shown.exit_code = None;
                Input::StartedByHand
            }
            EventAction::Destroy => {
                exec.container = None;
                Input::Removed
            }
            _ => return,
        };
        self.feed(&key, input);
    }

    /// Feeds one happening into an executable's lifecycle and carries out
    /// what the transition says.
    pub(super) fn feed(&mut self, key: &ExecKey, input: Input) {
        let Some(dep) = self.deployments.get(&key.deployment) else {
            return;
        };
        let policy = dep.spec.restart;
        let settings = self.config.restart;
        let min_ready = dep.spec.update.min_ready();
        let Some(exec) = self.exec_any_mut(key) else {
            return;
        };
        // A back-off runs from the exit, not from when berth got to it (an
        // exit that waited for a start call in flight is that much older).
        let now = Instant::now();
        let now = match &input {
            Input::Died { at, .. } => {
                let age = unix_nanos(SystemTime::now()).saturating_sub(*at).max(0);
                now.checked_sub(Duration::from_nanos(age as u64))
                    .unwrap_or(now)
            }
            _ => now,
        };
        let ctx = lifecycle::Ctx {
            policy,
            settings: &settings,
            backoff: exec.backoff,
            now,
            min_ready,
        };
        let before = std::mem::discriminant(&exec.life);
        let step = lifecycle::step(&exec.life, input.clone(), &ctx);
        debug!(executable = %key, ?input, life = ?step.life, effects = ?step.effects, "step");
        let changed = exec.backoff != step.backoff || std::mem::discriminant(&step.life) != before;
        exec.life = step.life;
        exec.backoff = step.backoff;
        if changed {
            self.state_dirty = true;
        }
        for effect in step.effects {
            self.carry(key, effect);
        }
        self.mark_dirty(&key.deployment);
    }

    fn carry(&mut self, key: &ExecKey, effect: Effect) {
        match effect {
            Effect::Show(shown) => {
                if let Some(exec) = self.exec_any_mut(key) {
                    exec.shown = shown;
                }
            }
            Effect::Restart { after } => self.restart(key, after),
            Effect::Start => self.launch(key),
            Effect::Failed {
                error_code,
                exit_code,
                reason,
            } => {
                warn!(executable = %key, reason, "failed");
                self.event(Event::exec_error(key, error_code, exit_code, reason));
            }
            Effect::ManualStop { exit_code } => {
                info!(executable = %key, "stopped manually; restart policy suspended until reboot");
                self.event(Event::ManualStop {
                    deployment: key.deployment.clone(),
                    component: key.component.clone(),
                    executable: key.executable.clone(),
                    exit_code,
                    reason: MANUAL_STOP_REASON.into(),
                });
            }
            Effect::Restarted => {
                let restart_count = self.exec_mut(key).map_or(0, |e| e.restart_count);
                self.event(Event::Restarted {
                    deployment: key.deployment.clone(),
                    component: key.component.clone(),
                    executable: key.executable.clone(),
                    restart_count,
                });
            }
            // What an operator did by hand: on disk at once.
            Effect::SaveNow => self.save_state(),
            Effect::Repull => {
                if let Some(dep) = self.deployments.get_mut(&key.deployment) {
                    dep.images_ready = false;
                }
            }
            Effect::Swap(rep) => self.swap(key, rep),
            Effect::DropPrevious { previous } => self.drop_previous(key, previous),
            Effect::RollBack {
                previous,
                reason,
                error_code,
            } => self.roll_back(key, previous, reason, error_code),
            Effect::Remove => self.remove_container(key),
        }
    }

    /// Commits to a restart (counted, durably) and starts the container.
    pub(super) fn restart(&mut self, key: &ExecKey, after: lifecycle::Exit) {
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        let exit_code = after.code();
        let reason = format!("restarting after {}", after.describe());
        // A committed restart not yet started (berth went away meanwhile) is
        // completed, not counted again.
        if exec.pending_restart.is_none() {
            exec.restart_count += 1;
            exec.pending_restart = Some(PendingRestart {
                prev_started_at: exec.container.as_ref().and_then(|c| c.started_at.clone()),
            });
        }
        let restart_count = exec.restart_count;
        info!(executable = %key, exit_code, restart_count, "restarting");
        self.event(Event::Restart {
            deployment: key.deployment.clone(),
            component: key.component.clone(),
            executable: key.executable.clone(),
            exit_code,
            reason,
            restart_count,
            by: None,
        });
        self.launch(key);
    }
}
