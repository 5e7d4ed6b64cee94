//! Engine events about an executable and the restart decisions they lead to.

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
        if exec.busy {
            exec.deferred.push(event);
            return;
        }
        if exec
            .container_id
            .as_deref()
            .is_some_and(|id| id != event.container_id)
        {
            return; // about an older container of this executable
        }
        let stale = event.time_nanos < exec.started_nanos;
        match event.action {
            EventAction::Kill { .. } if !exec.berth_stopping && !stale => {
                exec.killed_by_other = true;
            }
            EventAction::Die { exit_code } if !stale => {
                if matches!(
                    exec.status,
                    Status::Stopped | Status::Completed | Status::Error
                ) && exec.due.is_none()
                {
                    return; // already settled
                }
                let code = exit_code.unwrap_or(0);
                let happening = if exec.killed_by_other {
                    exec.manual_at = Some(event.time_nanos);
                    Happening::StoppedByHand
                } else {
                    Happening::Exited { code }
                };
                let ran_for = (exec.started_nanos > 0).then(|| {
                    Duration::from_nanos((event.time_nanos - exec.started_nanos).max(0) as u64)
                });
                exec.killed_by_other = false;
                self.apply(&key, happening, Some(code), ran_for);
            }
            EventAction::Start if !stale => {
                if exec.status == Status::Running {
                    return; // berth's own start, already applied
                }
                exec.started_nanos = event.time_nanos;
                exec.started_at = Some(timestamp(
                    SystemTime::UNIX_EPOCH + Duration::from_nanos(event.time_nanos as u64),
                ));
                exec.exit_code = None;
                exec.launched = true;
                self.apply(&key, Happening::StartedByHand, None, None);
            }
            EventAction::Destroy if !exec.berth_stopping => {
                exec.container_id = None;
                exec.started_at = None;
                let already_stopped = exec.status == Status::Stopped;
                let record = self.state.exec_mut(&key);
                record.container_id = None;
                if !already_stopped {
                    self.apply(&key, Happening::StoppedByHand, None, None);
                }
            }
            _ => {}
        }
    }

    /// Applies a restart decision to one executable.
    pub(super) fn apply(
        &mut self,
        key: &ExecKey,
        happening: Happening,
        code: Option<i64>,
        ran_for: Option<Duration>,
    ) {
        let Some(dep) = self.deployments.get(&key.deployment) else {
            return;
        };
        let policy = dep.spec.restart;
        let decision = decide(policy, &happening);
        let settings = self.config.restart;
        debug!(executable = %key, ?happening, ?decision, "decision");
        let exec = self.exec_mut(key).expect("exec exists");
        exec.exit_code = code.filter(|_| !matches!(happening, Happening::StartedByHand));
        let failed = code.is_some_and(|c| c != 0);
        let failure_code = failed.then_some(ErrorCode::ExecutableFailed);
        match decision {
            Decision::Restart => {
                let record = self.state.exec_mut(key);
                let delay = record.backoff.next_delay(&settings, ran_for);
                record.exit_code = code;
                let exit = code.map_or("an interruption".to_string(), |c| format!("exit code {c}"));
                if delay.is_zero() {
                    self.restart(key, &exit, code);
                } else {
                    self.mark_state_dirty();
                    let exec = self.exec_mut(key).expect("exec exists");
                    exec.set(
                        Status::Pending,
                        Some(format!(
                            "restarting in {} after {exit} (back-off)",
                            human(delay)
                        )),
                        failure_code,
                    );
                    exec.due = Some(Instant::now() + delay);
                    info!(executable = %key, exit_code = code, delay_ms = delay.as_millis() as u64, "restart after back-off");
                }
            }
            Decision::Complete => {
                exec.set(Status::Completed, None, None);
                self.record_status(key, Status::Completed, code);
            }
            Decision::Fail => {
                let reason = exit_reason(code.unwrap_or(0), policy);
                exec.set(
                    Status::Error,
                    Some(reason.clone()),
                    Some(ErrorCode::ExecutableFailed),
                );
                self.event(Event::exec_error(
                    key,
                    ErrorCode::ExecutableFailed,
                    code,
                    reason.clone(),
                ));
                self.record_status(key, Status::Error, code);
            }
            Decision::SuspendUntilReboot => {
                exec.set(Status::Stopped, Some(MANUAL_STOP_REASON.into()), None);
                exec.due = None;
                self.state.exec_mut(key).manual_stop = true;
                self.record_status(key, Status::Stopped, code);
                // Rare, and what an operator did by hand: on disk at once.
                self.save_state();
                info!(executable = %key, "stopped manually; restart policy suspended until reboot");
                self.event(Event::ManualStop {
                    deployment: key.deployment.clone(),
                    component: key.component.clone(),
                    executable: key.executable.clone(),
                    exit_code: code,
                    reason: MANUAL_STOP_REASON.into(),
                    by: None,
                });
            }
            Decision::LeaveStopped => {
                exec.set(Status::Stopped, Some(NEVER_INTERRUPTED_REASON.into()), None);
                self.record_status(key, Status::Stopped, code);
            }
            Decision::Resume => {
                exec.set(Status::Running, None, None);
                exec.due = None;
                let record = self.state.exec_mut(key);
                record.manual_stop = false;
                self.record_status(key, Status::Running, None);
                self.save_state();
            }
            Decision::Unchanged => {
                let record = self.state.exec(key).cloned().unwrap_or_default();
                self.restore_recorded(key, &record, code.unwrap_or(0));
                return;
            }
        }
        self.mark_dirty(&key.deployment);
    }

    /// Commits to a restart (counted, durably) and starts the container.
    pub(super) fn restart(&mut self, key: &ExecKey, exit: &str, code: Option<i64>) {
        let count = self.state.exec(key).map_or(0, |r| r.restart_count) + 1;
        info!(executable = %key, exit_code = code, restart_count = count, "restarting");
        self.event(Event::Restart {
            deployment: key.deployment.clone(),
            component: key.component.clone(),
            executable: key.executable.clone(),
            exit_code: code,
            reason: format!("restarting after {exit}"),
            restart_count: count,
            by: None,
        });
        if let Some(exec) = self.exec_mut(key) {
            // A start that keeps failing stays `Error` while it is retried.
            if exec.status != Status::Error {
                exec.set(
                    Status::Pending,
                    Some(format!("restarting after {exit}")),
                    None,
                );
            }
        }
        self.launch(key, true);
        self.mark_dirty(&key.deployment);
    }
}

pub(super) fn exit_reason(code: i64, policy: crate::model::RestartPolicy) -> String {
    format!("exited with code {code}; restart policy {policy}")
}
