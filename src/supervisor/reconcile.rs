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
            // When the stream ended (now, on the engine's clock, which is the
            // host's): the engine's shutdown kills came at most its shutdown
            // timeout before. The last event berth saw may be much older.
            self.down_position = Some(unix_nanos(SystemTime::now()));
        }
        warn!(error, "docker engine unreachable; retrying with back-off");
        let keys: Vec<ExecKey> = self
            .deployments
            .values_mut()
            .flat_map(|dep| {
                dep.pull_due = None;
                dep.dirty = true;
                dep.execs.iter().map(|e| e.key.clone())
            })
            .collect();
        for key in keys {
            self.feed(&key, Input::EngineLost);
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

    pub(super) fn on_engine_up(
        &mut self,
        replay: Vec<EngineEvent>,
        containers: Vec<ContainerInfo>,
    ) {
        self.engine_up = true;
        info!(
            replayed = replay.len(),
            "docker engine connected; reconciling"
        );
        self.publish_agent();
        self.detect_engine_restart(&replay);
        // The listing (made by the event pump, after the replay) is the truth
        // after any reconnect; no live event is applied before it.
        self.reconcile(containers, &replay);
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
        // Only a kill sent within the engine's shutdown time before its
        // stream ended can have been the engine's.
        let since = down - ENGINE_SHUTDOWN_WINDOW.as_nanos() as i64;
        let keys: Vec<ExecKey> = self
            .deployments
            .values()
            .flat_map(|d| d.execs.iter())
            .filter(|e| matches!(e.life, Life::Suspended { at: Some(t) } if t >= since))
            .map(|e| e.key.clone())
            .collect();
        for key in keys {
            info!(executable = %key, "stopped by the engine's shutdown, not by hand");
            if let Some(exec) = self.exec_mut(&key) {
                exec.life = Life::Running { killed: None };
            }
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
        let mut prevs = Vec::new();
        for info in containers {
            if info.name.ends_with(converge::PREV_SUFFIX) {
                // The previous container of an update berth did not see
                // through: it runs again if the current one is gone.
                prevs.push(info);
                continue;
            }
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
        for info in prevs {
            let key = key_from_labels(&info.labels);
            let runtime = self.runtime.clone();
            match key {
                Some(key)
                    if self.deployments.contains_key(&key.deployment)
                        && !by_key.contains_key(&key) =>
                {
                    info!(container = %info.name, "restoring the previous container of an unfinished update");
                    let name = crate::model::container_name(&self.config.device_id, &key);
                    let id = info.id.clone();
                    self.tracker.spawn(async move {
                        let _ = runtime.rename(&id, &name).await;
                    });
                    by_key.insert(key, info);
                }
                _ => {
                    self.tracker.spawn(async move {
                        let _ = runtime.remove(&info.id).await;
                    });
                }
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
        let position = self.state.event_position;
        // The engine keeps its last 256 events: a replay that does not reach
        // back to the last event berth saw has lost some. What it holds cannot
        // tell a manual stop from a crash then, so every exit is decided by
        // its exit code (as after an engine restart).
        let truncated = position.is_some_and(|p| {
            replay.len() >= ENGINE_EVENT_MEMORY || replay.first().is_some_and(|e| e.time_nanos > p)
        });
        let replayed = if truncated {
            warn!(
                events = replay.len(),
                "the engine's event history does not reach back to the last event berth saw; exits are decided by their exit codes"
            );
            HashMap::new()
        } else {
            classify_replay(replay)
        };
        let keys: Vec<ExecKey> = self
            .deployments
            .values()
            .flat_map(|d| d.execs.iter().map(|e| e.key.clone()))
            .collect();
        for key in keys {
            let info = by_key.remove(&key);
            // A container removed meanwhile is found by the id berth recorded.
            let id = info.as_ref().map(|i| i.id.clone()).or_else(|| {
                self.exec_mut(&key)
                    .and_then(|e| e.container_id().map(str::to_string))
            });
            let seen = id
                .and_then(|id| replayed.get(&id).copied())
                .unwrap_or_default();
            self.reconcile_exec(&key, info, seen, position.filter(|_| !truncated));
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
        let interrupted = self.interrupted.remove(key);
        let Some(policy) = self
            .deployments
            .get(&key.deployment)
            .map(|d| d.spec.restart)
        else {
            return;
        };
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        if exec.busy() {
            return;
        }
        let life = exec.life.clone();
        // What berth last knew: it was running (or about to be restarted).
        let was_running = matches!(
            life,
            Life::Running { .. } | Life::Proving { .. } | Life::BackingOff { .. }
        );
        let suspended = matches!(life, Life::Suspended { .. });
        let Some(info) = info else {
            // A reservation for a container that is gone counts nothing.
            exec.reservation = None;
            let ran_before = exec
                .container
                .take()
                .is_some_and(|c| c.started_at.is_some());
            if seen.destroyed && !rebooted {
                // Removed by hand while berth was away.
                self.feed(key, Input::Removed);
            } else if suspended && !rebooted {
                exec.shown = lifecycle::settled(&life, policy);
            } else {
                // No container: provisioning creates it, and starting one
                // that ran before is a restart.
                exec.lost_container = exec.lost_container || ran_before;
                exec.life = Life::Idle;
                exec.set(Status::Pending, Some("waiting for container".into()), None);
            }
            self.mark_dirty(&key.deployment);
            return;
        };
        exec.container = Some(Container::from_info(&info));
        if info.has_started() {
            exec.launched = true;
        }

        // A restart berth had reserved before it went away happened if the
        // same container has started since (berth's own start: the operator
        // starting it by hand while berth was away would be counted too).
        // A reservation kept in memory is checked by berth's own starts.
        let mut dropped = false;
        if let Some(r) = exec.reservation.take() {
            let same = r.container_id == info.id;
            let started_again =
                info.has_started() && info.started_at.as_deref() != Some(r.started_at.as_str());
            if same && started_again && r.recovered {
                info!(executable = %key, restart_count = r.restart_count, "a restart berth had reserved happened before it stopped");
                exec.restart_count = r.restart_count;
                exec.launched = true;
            } else if same && !started_again {
                // Checked now: from here on it is berth's own.
                exec.reservation = Some(Reservation {
                    recovered: false,
                    ..r
                });
            } else {
                // Started by hand while berth could not see it: on disk
                // the reservation would count that start.
                dropped = same;
            }
        }
        if dropped {
            self.unreserved(key);
        }
        let Some(exec) = self.exec_mut(key) else {
            return;
        };

        // A restart berth had committed to (and counted) before it went away.
        if let Some(pending) = exec.pending_restart.clone() {
            let happened = info.started_at != pending.prev_started_at;
            if happened {
                exec.pending_restart = None;
            } else if !info.running {
                info!(executable = %key, "completing a restart committed before berth stopped");
                exec.life = Life::Idle;
                self.feed(key, Input::Launch { restart: None });
                return;
            }
        }

        if info.running {
            // Still running, or started by hand while berth was away (the
            // policy applies again).
            exec.life = Life::Running { killed: None };
            exec.shown = Shown::running();
            self.mark_dirty(&key.deployment);
            self.reserve(key);
            return;
        }

        let code = info.exit_code.unwrap_or(0);
        let happening = if suspended && !rebooted {
            None // still suspended
        } else if rebooted {
            Some(match life {
                Life::Exited { code: Some(0) } => Happening::ExitedBeforeReboot { code: 0 },
                Life::Exited { code } => Happening::ExitedBeforeReboot {
                    code: code.unwrap_or(1),
                },
                _ => Happening::Interrupted,
            })
        } else if interrupted {
            Some(Happening::Interrupted)
        } else if seen.manual {
            Some(Happening::StoppedByHand)
        } else if info.state == "created" && !info.has_started() {
            if info.error.is_some() {
                Some(Happening::StartFailed)
            } else {
                // Created but never started (berth stopped in between).
                exec.life = Life::Idle;
                self.feed(key, Input::Launch { restart: None });
                return;
            }
        } else if !seen.died
            && was_running
            && position
                .is_some_and(|p| info.finished_at.as_deref().map(parse_nanos).unwrap_or(0) > p)
        {
            // It stopped after the last event berth saw, yet the engine's
            // history has no `die` for it: the engine restarted meanwhile and
            // its shutdown stopped the container.
            Some(Happening::Interrupted)
        } else if was_running || seen.died || life == Life::Idle {
            Some(Happening::Exited { code })
        } else {
            // Exited before berth last looked: keep what was decided then.
            None
        };
        match happening {
            Some(happening) => {
                // The reconcile's verdict replaces whatever was under way.
                if was_running {
                    exec.life = Life::Idle;
                }
                let ran_for = ran_for(&info);
                self.feed(
                    key,
                    Input::Found {
                        happening,
                        code: Some(code),
                        ran_for,
                    },
                );
            }
            None => {
                let mut shown = lifecycle::settled(&life, policy);
                shown.exit_code = Some(code);
                exec.shown = shown;
                self.mark_dirty(&key.deployment);
            }
        }
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
