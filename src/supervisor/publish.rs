//! Publishing: the state record (handed to the writer task), the
//! deployment, agent and event documents, and the systemd status line.

use super::*;

impl<R: ContainerRuntime, P: Reporter> Supervisor<R, P> {
    pub(super) fn exec_mut(&mut self, key: &ExecKey) -> Option<&mut Exec> {
        self.deployments
            .get_mut(&key.deployment)?
            .execs
            .iter_mut()
            .find(|e| e.key == *key)
    }

    /// An executable, current or retiring.
    pub(super) fn exec_any_mut(&mut self, key: &ExecKey) -> Option<&mut Exec> {
        let dep = self.deployments.get_mut(&key.deployment)?;
        dep.execs
            .iter_mut()
            .chain(dep.retiring.iter_mut())
            .find(|e| e.key == *key)
    }

    pub(super) fn note_position(&mut self, nanos: i64) {
        if self.state.event_position.is_none_or(|p| nanos > p) {
            self.state.event_position = Some(nanos);
            self.state_dirty = true;
        }
    }

    /// A change the next periodic save (or any durable one) writes. Only the
    /// commitment to a restart must be on disk before berth acts on it; the
    /// rest (statuses, start times, the event position, manual stops) can be
    /// rebuilt from the engine after a crash, so it is written in batches.
    pub(super) fn mark_state_dirty(&mut self) {
        self.state_dirty = true;
    }

    /// The persisted record, derived from the live model; the records of
    /// executables that no deployment holds right now are kept as they were.
    pub(super) fn snapshot(&self) -> State {
        let mut state = self.state.clone();
        for dep in self.deployments.values() {
            for exec in dep.execs.iter().chain(&dep.retiring) {
                state
                    .executables
                    .insert(exec.key.to_string(), exec.record());
            }
        }
        state
    }

    /// Hands the writer a snapshot of the whole state, written as soon as
    /// it can (never on the loop).
    pub(super) fn save_state(&mut self) -> Ticket {
        let state = self.snapshot();
        self.state_dirty = false;
        self.writer.snapshot(&state)
    }

    /// Hands the writer the restart commitment of `key` (its count and
    /// pending restart): the launch waits until it is on disk.
    /// A reservation of this very restart (written while the container
    /// ran) is its commitment: nothing more is written, and the launch waits
    /// only if the reservation is not yet on disk itself. Not so for a
    /// restart that stops its running container first (`stops_running`: an
    /// unhealthy one, an operator's): berth's own stop would look like a
    /// manual one to a berth that went away before the start, so the
    /// commitment is written.
    pub(super) fn commit_restart(&mut self, key: &ExecKey, stops_running: bool) {
        let Some(exec) = self.exec_any_mut(key) else {
            return;
        };
        let reserved = exec
            .reservation
            .take()
            .filter(|r| !stops_running && r.covers(exec))
            .map(|r| r.ticket);
        let intent = Intent::of(key, &exec.record());
        let ticket = match (reserved, intent) {
            (Some(ticket), _) => Some(ticket),
            (None, Some(intent)) => Some(self.writer.commit(intent)),
            (None, None) => None,
        };
        if let Some(ticket) = ticket.filter(|t| !self.writer.is_durable(*t)) {
            self.commitments.insert(key.clone(), ticket);
        }
        self.mark_state_dirty();
    }

    /// Withdraws `key`'s reservation: the run it was for ended, or goes on,
    /// without a restart of berth's (a manual stop, an exit not restarted,
    /// an update). The record without it goes to disk at once.
    pub(super) fn withdraw_reservation(&mut self, key: &ExecKey) {
        let withdrawn = self
            .exec_any_mut(key)
            .is_some_and(|e| e.reservation.take().is_some());
        if withdrawn {
            self.unreserved(key);
        }
    }

    /// `key`'s reservation was taken away: the record without it goes to
    /// the writer at once, and a start that is not a restart waits for it.
    pub(super) fn unreserved(&mut self, key: &ExecKey) {
        let ticket = self.save_state();
        // What the turn changes after this (a status, an exit code) goes
        // with the next batched write.
        self.mark_state_dirty();
        if let Some(exec) = self.exec_any_mut(key) {
            exec.unreserved = Some(ticket);
        }
    }

    /// Before a start that is not a counted restart: a reservation on disk
    /// would count it, so the start waits until the record without it is
    /// on disk (see [`Self::durable_commitment`]).
    pub(super) fn hold_uncounted_start(&mut self, key: &ExecKey) {
        self.withdraw_reservation(key);
        let ticket = self.exec_any_mut(key).and_then(|e| e.unreserved.take());
        if let Some(ticket) = ticket.filter(|t| !self.writer.is_durable(*t)) {
            self.commitments.insert(key.clone(), ticket);
        }
    }

    /// Commits ahead to the next restart of `key`'s running container, if
    /// its policy may restart it, so that its exit is restarted at once: the
    /// record counts it as pending for this run (see [`Reservation`]).
    pub(super) fn reserve(&mut self, key: &ExecKey) {
        let restarts = self
            .deployments
            .get(&key.deployment)
            .is_some_and(|d| d.spec.restart != crate::model::RestartPolicy::Never);
        let Some(exec) = self.exec_mut(key) else {
            return;
        };
        let run = exec
            .container
            .as_ref()
            .and_then(|c| Some((c.id.clone(), c.started_at.clone()?)));
        let Some((container_id, started_at)) = run.filter(|_| restarts) else {
            exec.reservation = None;
            return;
        };
        if exec.pending_restart.is_some()
            || exec.reservation.as_ref().is_some_and(|r| {
                r.container_id == container_id
                    && r.started_at == started_at
                    && r.restart_count == exec.restart_count + 1
            })
        {
            return;
        }
        let restart_count = exec.restart_count + 1;
        let intent = Intent {
            key: key.to_string(),
            restart_count,
            pending_restart: PendingRestart {
                prev_started_at: Some(started_at.clone()),
                reserved_for: Some(container_id.clone()),
            },
        };
        let ticket = self.writer.commit(intent);
        if let Some(exec) = self.exec_mut(key) {
            exec.reservation = Some(Reservation {
                container_id,
                started_at,
                restart_count,
                ticket,
                recovered: false,
            });
        }
    }

    /// Waits (in a launch task) until the commitment of `key`, if it has one
    /// not yet on disk, is; `false` when berth stops first.
    pub(super) fn durable_commitment(
        &self,
        key: &ExecKey,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let wait = self
            .commitments
            .get(key)
            .map(|ticket| self.writer.wait_durable(*ticket));
        async move {
            match wait {
                Some(wait) => wait.await,
                None => true,
            }
        }
    }

    /// A round of the state writer: commitments now on disk let their
    /// restarts go ahead; while a commitment cannot be written its
    /// executable is `Error` + `DEP_E302`, saying so.
    pub(super) fn on_state_write(&mut self, report: WriteReport) {
        if report.wrote {
            let written: Vec<ExecKey> = self
                .commitments
                .iter()
                .filter(|(_, t)| self.writer.is_durable(**t))
                .map(|(k, _)| k.clone())
                .collect();
            for key in written {
                self.commitments.remove(&key);
                if let Some(exec) = self.exec_mut(&key) {
                    if exec.shown.error_code == Some(ErrorCode::StateStore) {
                        exec.set(
                            Status::Pending,
                            Some("restarting; its record is written".into()),
                            None,
                        );
                        self.mark_dirty(&key.deployment);
                    }
                }
            }
        }
        let Some((error, retry_in)) = report.error else {
            if self.state_write_error.take().is_some() {
                info!("the state is written again");
            }
            return;
        };
        if self.state_write_error.as_ref() != Some(&error) {
            self.event(Event::device_error(
                Some(ErrorCode::StateStore),
                format!("cannot write the state: {error}"),
            ));
            self.state_write_error = Some(error.clone());
        }
        let waiting: Vec<ExecKey> = self.commitments.keys().cloned().collect();
        for key in waiting {
            if let Some(exec) = self.exec_mut(&key) {
                exec.set(
                    Status::Error,
                    Some(format!(
                        "cannot write its restart record: {error}; the restart waits for it (retrying in {})",
                        human(retry_in)
                    )),
                    Some(ErrorCode::StateStore),
                );
                self.mark_dirty(&key.deployment);
            }
        }
    }

    pub(super) fn mark_dirty(&mut self, id: &str) {
        if let Some(dep) = self.deployments.get_mut(id) {
            dep.dirty = true;
        }
    }

    pub(super) fn publish_dirty(&mut self) {
        // A deployment's document shows its dependencies' errors: when one
        // changes, so may the documents of those that depend on it.
        loop {
            let dirty: Vec<String> = self
                .deployments
                .values()
                .filter(|d| d.dirty)
                .map(|d| d.spec.id.clone())
                .collect();
            let mut more = false;
            let master_dirty = dirty.iter().any(|d| d == ROS_MASTER_DEPLOYMENT);
            for dep in self.deployments.values_mut() {
                let affected = dep.spec.depends_on.iter().any(|d| dirty.contains(d))
                    || (dep.spec.ros && master_dirty);
                if !dep.dirty && affected {
                    dep.dirty = true;
                    more = true;
                }
            }
            if !more {
                break;
            }
        }
        let device = self.config.device_id.clone();
        let mut docs = Vec::new();
        for dep in self.deployments.values().filter(|d| d.dirty) {
            let (id, mut doc) = dep.document(&device);
            if let Some(failed) = self.failed_dependency(&id) {
                doc.status = Status::Error;
                doc.error_code = Some(ErrorCode::DependencyFailed);
                doc.reason = Some(format!("{failed} is in Error"));
            }
            docs.push((id, doc));
        }
        if docs.is_empty() {
            return;
        }
        self.publish_summary();
        let mut changes = Vec::new();
        for dep in self.deployments.values_mut() {
            if dep.dirty && dep.published_phase != Some(dep.phase) {
                dep.published_phase = Some(dep.phase);
                changes.push((dep.spec.id.clone(), dep.phase, dep.failure.clone()));
            }
            dep.dirty = false;
        }
        for (id, phase, reason) in changes {
            self.event(Event::Phase {
                deployment: id,
                phase,
                reason,
            });
        }
        for (id, doc) in docs {
            if id == ROS_MASTER_DEPLOYMENT {
                self.publish_ros_master(&self.deployments[&id]);
                continue;
            }
            self.reporter.publish(
                Topic::Deployment(id),
                serde_json::to_value(doc).expect("documents serialize"),
            );
        }
    }

    /// The `STATUS=` line of `systemctl status`; the notifier drops it when
    /// it has not changed, and does nothing outside systemd.
    pub(super) fn publish_summary(&self) {
        let summary = crate::notify::summary(
            self.deployments
                .values()
                .filter(|d| d.spec.id != ROS_MASTER_DEPLOYMENT)
                .map(|dep| {
                    let restarts = dep.execs.iter().map(|e| e.restart_count).sum();
                    (dep.status(), restarts)
                }),
        );
        self.notifier.status(&summary);
    }

    pub(super) fn publish_agent(&self) {
        let doc = AgentDoc {
            state: "online".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            boot_id: self.boot_id.clone(),
            docker: if self.engine_up {
                "connected"
            } else {
                "unreachable"
            }
            .into(),
            since: self.since.clone(),
            error_code: (!self.engine_up).then_some(ErrorCode::EngineUnreachable),
        };
        self.reporter.publish(
            Topic::Agent,
            serde_json::to_value(doc).expect("documents serialize"),
        );
    }

    pub(super) fn event(&self, event: Event) {
        self.publish_event(self.event_doc(event));
    }

    /// An event about one executable: held behind an exit of it whose log
    /// tail is being read, so that its events keep their order.
    pub(super) fn exec_event(&mut self, key: &ExecKey, event: Event) {
        let doc = self.event_doc(event);
        match self.held.iter_mut().rev().find(|h| &h.key == key) {
            Some(held) => held.docs.push(doc),
            None => self.publish_event(doc),
        }
    }

    /// An event stamped now.
    pub(super) fn event_doc(&self, event: Event) -> EventDoc {
        EventDoc {
            device_id: self.config.device_id.clone(),
            time: timestamp(SystemTime::now()),
            event,
        }
    }

    pub(super) fn publish_event(&self, doc: EventDoc) {
        self.reporter.publish(
            Topic::Events,
            serde_json::to_value(doc).expect("documents serialize"),
        );
    }
}
