//! Exits and restarts: engine events about an executable become inputs of
//! its lifecycle ([`lifecycle::step`]), and the effects that come out are
//! carried out here (restarts committed and started, documents and events).

use super::*;

/// How long an exit by `SIGKILL` without the engine's `oom` waits for the
/// inspection, and a log tail read for the restart's start to be answered,
/// before they go on: a storm must not hold them.
const EVIDENCE_WAIT: Duration = Duration::from_millis(250);
/// How long the events of an exit wait for its log tail: a few
/// milliseconds on a quiet engine, hundreds on a loaded one, seconds on an
/// overloaded one (an event without the evidence is the worse outcome).
/// Nothing but the events waits for it.
const TAIL_WAIT: Duration = Duration::from_secs(5);

/// The events of one exit of an executable, held until its log tail is
/// read (at most [`TAIL_WAIT`]) so that they carry it. The restart does
/// not wait: the tail is read up to the exit's time, after the next start.
#[derive(Debug)]
pub(super) struct HeldExit {
    pub(super) key: ExecKey,
    /// The exit's engine time: which read answers it.
    at: i64,
    pub(super) docs: Vec<EventDoc>,
    /// `Some` once the read is over: the lines, or `None` if it failed.
    tail: Option<Option<Vec<String>>>,
}

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
            EventAction::Die { exit_code } => {
                let code = exit_code.unwrap_or(0);
                let died = Input::Died {
                    code,
                    at: event.time_nanos,
                    ran_for: (container.started_nanos > 0).then(|| {
                        Duration::from_nanos(
                            (event.time_nanos - container.started_nanos).max(0) as u64
                        )
                    }),
                };
                exec.probe_watch = None;
                // The exit's evidence from the events themselves: the code,
                // its signal, and the engine's `oom` that comes before it.
                let evidence = crate::runtime::ExitEvidence {
                    exit_code: Some(code),
                    signal: crate::runtime::signal_name(code).map(str::to_string),
                    oom_killed: container.oom_killed,
                    log_tail: Vec::new(),
                };
                if code != 137 || container.oom_killed {
                    self.on_evidence(&key, died, Some(evidence));
                    return;
                }
                // Killed by `SIGKILL` with no word of an OOM kill: the exit
                // waits (briefly) for the engine's inspection to say.
                let id = container.id.clone();
                exec.reading_evidence = true;
                let runtime = self.runtime.clone();
                let tx = self.tx.clone();
                self.tracker.spawn(async move {
                    let read = tokio::time::timeout(
                        EVIDENCE_WAIT,
                        crate::runtime::exit_inspection(&*runtime, &id),
                    )
                    .await;
                    let evidence = match read {
                        Ok(Ok(inspected)) => inspected,
                        Ok(Err(e)) => {
                            debug!(container = %short(&id), error = %e, "exit inspection unavailable");
                            evidence
                        }
                        Err(_) => {
                            debug!(container = %short(&id), "exit inspection not read in time");
                            evidence
                        }
                    };
                    let _ = tx.send(Msg::Evidence {
                        key,
                        input: died,
                        evidence: Some(evidence),
                    });
                });
                return;
            }
            EventAction::Oom => {
                container.oom_killed = true;
                return;
            }
            EventAction::Health { healthy } => {
                let Some(probe) = exec.spec.probe.as_ref() else {
                    return;
                };
                let failures = probe.failure_threshold;
                if healthy {
                    exec.health = Some(crate::runtime::Health::Healthy);
                    self.mark_dirty(&key.deployment);
                    return;
                }
                exec.health = Some(crate::runtime::Health::Unhealthy);
                info!(executable = %key, failures, "exec probe failed");
                Input::Unhealthy {
                    reason: format!("exec probe failed {failures} times in a row"),
                }
            }
            EventAction::Start => {
                if matches!(exec.life, Life::Running { .. } | Life::Proving { .. }) {
                    return; // berth's own start, already applied
                }
                container.started_nanos = event.time_nanos;
                container.oom_killed = false;
                container.started_at = Some(timestamp(
                    SystemTime::UNIX_EPOCH + Duration::from_nanos(event.time_nanos as u64),
                ));
                exec.launched = true;
                exec.shown.exit_code = None;
                exec.stop_by = None;
                // A reservation on disk would count this start as berth's
                // restart: the record without it goes to disk at once.
                if exec.reservation.take().is_some() {
                    self.save_state();
                }
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

    /// An exit is applied with what is known of it; its log tail is read
    /// meanwhile, and its events wait for it (see [`HeldExit`]).
    pub(super) fn on_evidence(
        &mut self,
        key: &ExecKey,
        input: Input,
        evidence: Option<crate::runtime::ExitEvidence>,
    ) {
        let Some(exec) = self.exec_any_mut(key) else {
            return;
        };
        exec.reading_evidence = false;
        exec.evidence = evidence;
        exec.evidence_at = match &input {
            Input::Died { at, .. } => Some(*at),
            _ => None,
        };
        let container = exec.container.as_ref().map(|c| c.id.clone());
        let tail = match (&input, container) {
            (Input::Died { at, .. }, Some(id)) => Some((id, *at)),
            _ => None,
        };
        let signal = Arc::new(tokio::sync::Notify::new());
        if let Some((_, at)) = &tail {
            exec.start_signal = Some(signal.clone());
            self.held.push(HeldExit {
                key: key.clone(),
                at: *at,
                docs: Vec::new(),
                tail: None,
            });
        }
        self.feed(key, input);
        if let Some((id, at)) = tail {
            // A restart started at once took the signal: the tail is read
            // once its start is answered, so that the engine serves the
            // start first; else it is read now.
            let restarting = self
                .exec_any_mut(key)
                .is_some_and(|e| e.start_signal.take().is_none());
            self.read_tail(key, id, at, restarting.then_some(signal));
        }
        if let Some(dep) = self.deployments.get_mut(&key.deployment) {
            dep.update_phase();
        }
        self.apply_deferred(key);
    }

    /// Reads the log of the run that ended at `at`, off the loop; after
    /// `started` says the restart's start was answered (at most
    /// [`EVIDENCE_WAIT`]), when there is one.
    fn read_tail(
        &self,
        key: &ExecKey,
        id: String,
        at: i64,
        started: Option<Arc<tokio::sync::Notify>>,
    ) {
        let runtime = self.runtime.clone();
        let tx = self.tx.clone();
        let key = key.clone();
        self.tracker.spawn(async move {
            if let Some(started) = started {
                let _ = tokio::time::timeout(EVIDENCE_WAIT, started.notified()).await;
            }
            let lines = match tokio::time::timeout(TAIL_WAIT, runtime.log_tail(&id, Some(at))).await
            {
                Ok(Ok(lines)) => Some(lines),
                Ok(Err(e)) => {
                    debug!(container = %short(&id), error = %e, "log tail unavailable");
                    None
                }
                Err(_) => {
                    debug!(container = %short(&id), "log tail not read in time");
                    None
                }
            };
            let _ = tx.send(Msg::LogTail { key, at, lines });
        });
    }

    /// An exit's log tail is read: its held events go out with it.
    pub(super) fn on_log_tail(&mut self, key: &ExecKey, at: i64, lines: Option<Vec<String>>) {
        if let Some(held) = self
            .held
            .iter_mut()
            .find(|h| &h.key == key && h.at == at && h.tail.is_none())
        {
            held.tail = Some(lines);
        }
        self.release_held(false);
    }

    /// Publishes the held exits whose tail is read and that no earlier exit
    /// of the same executable holds back (`all`: every one, at shutdown).
    pub(super) fn release_held(&mut self, all: bool) {
        let mut waiting: Vec<ExecKey> = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            let h = &self.held[i];
            if (all || h.tail.is_some()) && !waiting.contains(&h.key) {
                let h = self.held.remove(i);
                let mut tail = h.tail.flatten();
                for mut doc in h.docs {
                    if let Some(lines) = tail.take_if(|_| doc.event.has_evidence()) {
                        doc.event.set_log_tail(lines);
                    }
                    self.publish_event(doc);
                }
                // No event took it yet (a restart after a back-off): the
                // exit's evidence keeps it for the event to come.
                if let (Some(lines), Some(exec)) = (tail, self.exec_any_mut(&h.key)) {
                    if exec.evidence_at == Some(h.at) {
                        if let Some(evidence) = exec.evidence.as_mut() {
                            evidence.log_tail = lines;
                        }
                    }
                }
            } else {
                waiting.push(h.key.clone());
                i += 1;
            }
        }
    }

    /// A verdict of berth's own (`tcp`, `http`) probe on one run of a container.
    pub(super) fn on_probed(
        &mut self,
        key: &ExecKey,
        container_id: &str,
        started_nanos: i64,
        verdict: crate::probe::Verdict,
    ) {
        let Some(exec) = self.exec_any_mut(key) else {
            return;
        };
        let current = exec
            .probe_watch
            .as_ref()
            .is_some_and(|w| w.container_id == container_id && w.started_nanos == started_nanos);
        if !current || exec.busy() {
            return; // about a run that is over
        }
        match verdict {
            crate::probe::Verdict::Healthy => {
                exec.health = Some(crate::runtime::Health::Healthy);
                self.mark_dirty(&key.deployment);
            }
            crate::probe::Verdict::Unhealthy { failures, reason } => {
                exec.health = Some(crate::runtime::Health::Unhealthy);
                let kind = match exec.spec.probe.as_ref().map(|p| &p.check) {
                    Some(crate::model::ProbeCheck::Http(_)) => "http",
                    _ => "tcp",
                };
                info!(executable = %key, failures, reason, "probe failed");
                self.feed(
                    key,
                    Input::Unhealthy {
                        reason: format!("{kind} probe failed {failures} times in a row: {reason}"),
                    },
                );
            }
        }
    }

    /// Runs berth's own probe (`tcp`, `http`) while its container runs: one
    /// tracked task per run, from its start, cancelled when the run is over.
    /// `exec` probes are the engine's (its healthcheck), not run here.
    pub(super) fn sync_probe(&mut self, key: &ExecKey) {
        let tx = self.tx.clone();
        let Some(exec) = self.exec_any_mut(key) else {
            return;
        };
        let want = match (&exec.spec.probe, &exec.container, &exec.life) {
            (Some(probe), Some(c), Life::Running { .. } | Life::Proving { .. })
                if !matches!(probe.check, crate::model::ProbeCheck::Exec(_)) =>
            {
                Some((probe.clone(), c.clone()))
            }
            _ => None,
        };
        let same = match (&exec.probe_watch, &want) {
            (Some(w), Some((_, c))) => w.container_id == c.id && w.started_nanos == c.started_nanos,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        exec.probe_watch = None; // cancels the task of a run that is over
        let Some((probe, container)) = want else {
            return;
        };
        let stop = CancellationToken::new();
        exec.probe_watch = Some(ProbeWatch {
            container_id: container.id.clone(),
            started_nanos: container.started_nanos,
            stop: stop.clone(),
        });
        let host = container
            .ip_address
            .clone()
            .unwrap_or_else(|| "127.0.0.1".to_string());
        let key = key.clone();
        self.tracker.spawn(async move {
            let started = Instant::now();
            let report = |verdict| {
                let _ = tx.send(Msg::Probed {
                    key: key.clone(),
                    container_id: container.id.clone(),
                    started_nanos: container.started_nanos,
                    verdict,
                });
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = crate::probe::watch(&probe, started, || crate::probe::check(&probe, &host), report) => {}
            }
        });
    }

    /// [`Self::sync_probe`] for every executable (after a reconcile).
    pub(super) fn sync_all_probes(&mut self) {
        let keys: Vec<ExecKey> = self
            .deployments
            .values()
            .flat_map(|d| d.execs.iter().map(|e| e.key.clone()))
            .collect();
        for key in keys {
            self.sync_probe(&key);
        }
    }

    /// Ends every probe task (berth stops).
    pub(super) fn stop_probes(&mut self) {
        for dep in self.deployments.values_mut() {
            for exec in dep.execs.iter_mut().chain(dep.retiring.iter_mut()) {
                exec.probe_watch = None;
            }
        }
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
        // A reservation holds while its run runs or its restart is under way.
        // One read from disk waits for the reconcile, which tells whether
        // its restart happened (an engine lost before it is no verdict).
        let withdraw = exec.reservation.as_ref().is_some_and(|r| !r.recovered)
            && !matches!(
                exec.life,
                Life::Running { .. }
                    | Life::Proving { .. }
                    | Life::BackingOff { .. }
                    | Life::Starting { counted: true, .. }
            );
        if changed {
            self.state_dirty = true;
        }
        if withdraw {
            self.withdraw_reservation(key);
        }
        for effect in step.effects {
            self.carry(key, effect);
        }
        self.sync_probe(key);
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
                let evidence = self.exec_any_mut(key).and_then(|e| e.evidence.take());
                self.exec_event(
                    key,
                    Event::exec_error(key, error_code, exit_code, reason)
                        .with_evidence(evidence.as_ref()),
                );
            }
            Effect::ManualStop { exit_code } => {
                info!(executable = %key, "stopped manually; restart policy suspended until reboot");
                let (evidence, by) = self
                    .exec_any_mut(key)
                    .map(|e| (e.evidence.take(), e.stop_by.take()))
                    .unwrap_or_default();
                self.exec_event(
                    key,
                    Event::ManualStop {
                        deployment: key.deployment.clone(),
                        component: key.component.clone(),
                        executable: key.executable.clone(),
                        exit_code,
                        reason: MANUAL_STOP_REASON.into(),
                        by,
                        signal: None,
                        oom_killed: None,
                        log_tail: None,
                    }
                    .with_evidence(evidence.as_ref()),
                );
            }
            Effect::Restarted => {
                let restart_count = self.exec_mut(key).map_or(0, |e| e.restart_count);
                self.exec_event(
                    key,
                    Event::Restarted {
                        deployment: key.deployment.clone(),
                        component: key.component.clone(),
                        executable: key.executable.clone(),
                        restart_count,
                    },
                );
            }
            // What an operator did by hand: on disk at once.
            Effect::SaveNow => {
                self.save_state();
            }
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
        // A restart for unhealthiness stops the container first.
        exec.stop_first = matches!(after, lifecycle::Exit::Unhealthy(_));
        let evidence = exec.evidence.take();
        let restart_count = exec.count_restart();
        info!(executable = %key, exit_code, restart_count, "restarting");
        self.exec_event(
            key,
            Event::Restart {
                deployment: key.deployment.clone(),
                component: key.component.clone(),
                executable: key.executable.clone(),
                exit_code,
                reason,
                restart_count,
                by: None,
                signal: None,
                oom_killed: None,
                log_tail: None,
            }
            .with_evidence(evidence.as_ref()),
        );
        self.launch(key);
    }
}
