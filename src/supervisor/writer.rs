//! The state writer: a task that owns the state files (`state::Journal`) so
//! that the loop never waits for a disk. The loop hands it restart
//! commitments (appended to the restart log, one `fdatasync` for all that
//! are queued) and whole snapshots of the state (every 2 s when something
//! changed, at once for a manual stop; the latest wins). Commitments go
//! first: a round that appends them ends there and reports them durable, and
//! a snapshot is written in a round when none is queued. Each job has a
//! generation (a [`Ticket`]); `durable` says up to which one the commitments
//! are on disk (they are appended in order) and up to which one the
//! snapshots are (a later one stands for the earlier), and a launch waits for
//! its own before it asks the engine to start the container. A write that fails is retried with back-off, and the loop is
//! told (`Msg::StateWrite`) so that it can show why a restart waits.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::Msg;
use crate::state::{Intent, Journal, State, StateError};

/// Back-off of retries after a failed write.
const RETRY_INITIAL: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Commitments appended since the last snapshot after which a waiting
/// snapshot is written in the same round (so that an endless stream of
/// commitments cannot starve it and grow the log without bound).
const SNAPSHOT_AFTER: usize = 64;

enum Job {
    Intent(u64, Intent),
    Snapshot(u64, Box<State>),
}

/// A job handed to the writer, what a launch waits for: a commitment is on
/// disk once the log holds it, a snapshot once it or a later one is in
/// `state.json` (a commitment appended meanwhile says nothing of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ticket {
    Commitment(u64),
    Snapshot(u64),
}

/// Up to which generation each kind of job is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Durable {
    pub(super) commitments: u64,
    pub(super) snapshots: u64,
    /// The last round failed. A snapshot's waiters (starts that are no
    /// restart, waiting for a record without a reservation) then go ahead:
    /// a robot whose disk is full still runs what it is asked to, at the
    /// risk of one start counted if berth is killed before the disk takes
    /// the record. A commitment is never waived.
    pub(super) failing: bool,
}

impl Durable {
    pub(super) fn holds(&self, ticket: Ticket) -> bool {
        match ticket {
            Ticket::Commitment(g) => self.commitments >= g,
            Ticket::Snapshot(g) => self.snapshots >= g || self.failing,
        }
    }

    /// Takes in what a round wrote; whether anything moved.
    fn advance(&mut self, done: Durable) -> bool {
        let before = *self;
        self.commitments = self.commitments.max(done.commitments);
        self.snapshots = self.snapshots.max(done.snapshots);
        *self != before
    }
}

/// What the writer tells the loop after each round of writing.
#[derive(Debug)]
pub(super) struct WriteReport {
    /// Something more is on disk now, or writing failed or works again
    /// ([`StateWriter::is_durable`] says what a ticket may go ahead on).
    pub(super) wrote: bool,
    /// What failed, if anything, and when the next attempt is.
    pub(super) error: Option<(String, Duration)>,
}

/// The loop's end of the writer.
pub(super) struct StateWriter {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    generation: u64,
    durable: watch::Receiver<Durable>,
}

/// The writer task before it runs: `Supervisor::run` starts it.
pub(super) struct WriterTask {
    journal: Journal,
    jobs: mpsc::UnboundedReceiver<Job>,
    durable: watch::Sender<Durable>,
}

impl WriterTask {
    /// Runs the writer; its reports come back to the loop on `report`. The
    /// task ends once the loop closes its end and what was queued is written.
    pub(super) fn spawn(self, report: mpsc::UnboundedSender<Msg>) -> JoinHandle<()> {
        tokio::spawn(run(self.journal, self.jobs, self.durable, report))
    }
}

impl StateWriter {
    pub(super) fn new(journal: Journal) -> (Self, WriterTask) {
        let (jobs, rx) = mpsc::unbounded_channel();
        let (durable_tx, durable) = watch::channel(Durable::default());
        let writer = StateWriter {
            jobs: Some(jobs),
            generation: 0,
            durable,
        };
        let task = WriterTask {
            journal,
            jobs: rx,
            durable: durable_tx,
        };
        (writer, task)
    }

    fn send(&mut self, job: impl FnOnce(u64) -> Job) -> u64 {
        self.generation += 1;
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(job(self.generation));
        }
        self.generation
    }

    /// Queues a restart commitment; returns what a launch waits for.
    pub(super) fn commit(&mut self, intent: Intent) -> Ticket {
        Ticket::Commitment(self.send(|g| Job::Intent(g, intent)))
    }

    /// Queues a snapshot of the whole state.
    pub(super) fn snapshot(&mut self, state: &State) -> Ticket {
        let state = Box::new(state.clone());
        Ticket::Snapshot(self.send(|g| Job::Snapshot(g, state)))
    }

    /// Resolves once `ticket` is durable; `false` if the writer is gone
    /// first (berth is stopping: the start must not happen).
    pub(super) fn wait_durable(
        &self,
        ticket: Ticket,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        let mut durable = self.durable.clone();
        async move { durable.wait_for(|d| d.holds(ticket)).await.is_ok() }
    }

    /// Whether `ticket` is durable already.
    pub(super) fn is_durable(&self, ticket: Ticket) -> bool {
        self.durable.borrow().holds(ticket)
    }

    /// No more jobs: the writer writes what is queued and ends.
    pub(super) fn close(&mut self) {
        self.jobs = None;
    }
}

async fn run(
    mut journal: Journal,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    durable: watch::Sender<Durable>,
    report: mpsc::UnboundedSender<Msg>,
) {
    let mut intents: Vec<(u64, Intent)> = Vec::new();
    let mut snapshot: Option<(u64, Box<State>)> = None;
    // Commitments in the log that no snapshot on disk holds yet.
    let mut appended: Vec<(u64, Intent)> = Vec::new();
    let mut delay = RETRY_INITIAL;
    let mut failing = false;
    let mut open = true;
    loop {
        if intents.is_empty() && snapshot.is_none() {
            match jobs.recv().await {
                Some(job) => add(job, &mut intents, &mut snapshot),
                None => return,
            }
        }
        while open {
            match jobs.try_recv() {
                Ok(job) => add(job, &mut intents, &mut snapshot),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        let (back, error) = tokio::task::spawn_blocking(move || {
            let error = write(&mut journal, &mut intents, &mut snapshot, &mut appended);
            ((journal, intents, snapshot, appended), error)
        })
        .await
        .expect("the state writer does not panic");
        (journal, intents, snapshot, appended) = back;
        let (error, done) = error;
        let wrote = durable.send_if_modified(|d| {
            let moved = d.advance(done);
            let failing = error.is_some();
            let turned = d.failing != failing;
            d.failing = failing;
            moved || turned
        });
        let _ = report.send(Msg::StateWrite(WriteReport {
            wrote,
            error: error.as_ref().map(|e| (e.to_string(), delay)),
        }));
        match error {
            None => {
                delay = RETRY_INITIAL;
                failing = false;
            }
            Some(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot write the state; retrying");
                }
                failing = true;
                if !open && intents.is_empty() {
                    // Stopping, and no commitment waits: the batched state
                    // is rebuilt from the engine at the next start.
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
        if !open && intents.is_empty() && snapshot.is_none() {
            return;
        }
    }
}

fn add(job: Job, intents: &mut Vec<(u64, Intent)>, snapshot: &mut Option<(u64, Box<State>)>) {
    match job {
        Job::Intent(g, intent) => intents.push((g, intent)),
        Job::Snapshot(g, state) => *snapshot = Some((g, state)),
    }
}

/// One round of writing: the commitments queued, if any (the launches wait
/// for them: the round ends there, so that they are reported durable
/// without waiting for a snapshot), else the snapshot, which also holds the
/// commitments appended since it was taken (`appended`) before it rotates
/// the log they are in. Returns the error, if any, and what is durable now
/// (0 for a kind it did not write). What is written is taken out of
/// `intents` and `snapshot`; what failed stays for a retry.
fn write(
    journal: &mut Journal,
    intents: &mut Vec<(u64, Intent)>,
    snapshot: &mut Option<(u64, Box<State>)>,
    appended: &mut Vec<(u64, Intent)>,
) -> (Option<StateError>, Durable) {
    let mut done = Durable::default();
    if !intents.is_empty() {
        let lines: Vec<Intent> = intents.iter().map(|(_, i)| i.clone()).collect();
        match journal.append(&lines) {
            Ok(()) => {
                done.commitments = intents.last().map_or(0, |(g, _)| *g);
                appended.append(intents);
            }
            Err(e) => return (Some(e), done),
        }
        // The launches waiting for them go ahead now; the snapshot waits for
        // a round of its own, unless commitments never stop coming.
        if appended.len() < SNAPSHOT_AFTER {
            return (None, done);
        }
    }
    let Some((generation, state)) = snapshot.as_mut() else {
        return (None, done);
    };
    // Commitments made after the snapshot was taken are folded in, so that
    // the new file holds all of them before the log they are in is rotated
    // away.
    for (_, intent) in appended.iter().filter(|(g, _)| *g > *generation) {
        state.apply_intent(intent);
    }
    match journal.compact(state) {
        Ok(()) => {
            done.snapshots = *generation;
            appended.clear();
            *snapshot = None;
            (None, done)
        }
        Err(e) => (Some(e), done),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::SeqCst;

    use super::*;
    use crate::state::{PendingRestart, StateStore};

    fn intent(count: u64) -> Intent {
        Intent {
            key: "d/c/e".into(),
            restart_count: count,
            pending_restart: PendingRestart::after(Some(format!("t{count}"))),
        }
    }

    /// What `state.json` alone holds, without the logs.
    fn file_count(store: &StateStore) -> u64 {
        let text = std::fs::read_to_string(store.path()).unwrap();
        let state: State = serde_json::from_str(&text).unwrap();
        state
            .executables
            .get("d/c/e")
            .map_or(0, |r| r.restart_count)
    }

    #[test]
    fn a_snapshot_taken_before_a_commitment_still_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        let mut intents = vec![(2, intent(1))];
        let mut snapshot = Some((1, Box::new(State::default())));
        let mut appended = Vec::new();
        let (error, done) = write(&mut journal, &mut intents, &mut snapshot, &mut appended);
        assert!(error.is_none(), "{error:?}");
        assert!(
            done.holds(Ticket::Commitment(2)),
            "durable before the snapshot is written"
        );
        assert!(
            !done.holds(Ticket::Snapshot(1)),
            "a commitment says nothing of an earlier snapshot"
        );
        assert!(intents.is_empty() && snapshot.is_some());
        assert!(!store.path().exists(), "in the log only");
        assert_eq!(store.load().unwrap().executables["d/c/e"].restart_count, 1);
        let (error, done) = write(&mut journal, &mut intents, &mut snapshot, &mut appended);
        assert!(error.is_none(), "{error:?}");
        assert!(done.holds(Ticket::Snapshot(1)));
        assert!(snapshot.is_none() && appended.is_empty());
        assert_eq!(file_count(&store), 1, "folded into state.json");
        assert_eq!(store.load().unwrap().executables["d/c/e"].restart_count, 1);
    }

    #[test]
    fn a_later_snapshot_is_not_rolled_back_by_an_older_commitment() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        // The record was removed (deprovisioned) after its last commitment.
        let mut intents = vec![(1, intent(3))];
        let mut snapshot = Some((2, Box::new(State::default())));
        let mut appended = Vec::new();
        for _ in 0..2 {
            let (error, _) = write(&mut journal, &mut intents, &mut snapshot, &mut appended);
            assert!(error.is_none(), "{error:?}");
        }
        assert!(snapshot.is_none());
        assert_eq!(file_count(&store), 0);
        assert!(store.load().unwrap().executables.is_empty());
    }

    #[test]
    fn commitments_that_never_stop_do_not_starve_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        let mut snapshot = Some((1, Box::new(State::default())));
        let mut appended = Vec::new();
        for n in 0..SNAPSHOT_AFTER as u64 {
            let mut intents = vec![(n + 2, intent(n + 1))];
            let (error, done) = write(&mut journal, &mut intents, &mut snapshot, &mut appended);
            assert!(error.is_none(), "{error:?}");
            assert!(done.holds(Ticket::Commitment(n + 2)));
        }
        assert!(snapshot.is_none(), "written in the round of the 64th");
        assert!(appended.is_empty());
        assert_eq!(file_count(&store), SNAPSHOT_AFTER as u64);
    }

    #[test]
    fn a_failed_round_keeps_its_work_for_the_retry() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        store.fail_writes.store(true, SeqCst);
        let mut intents = vec![(1, intent(1))];
        let mut snapshot = Some((2, Box::new(State::default())));
        let mut appended = Vec::new();
        let (error, done) = write(&mut journal, &mut intents, &mut snapshot, &mut appended);
        assert!(error.is_some());
        assert_eq!(done, Durable::default(), "nothing durable");
        assert_eq!(intents.len(), 1);
        assert!(snapshot.is_some());

        store.fail_writes.store(false, SeqCst);
        intents.push((3, intent(2)));
        let (error, done) = write(&mut journal, &mut intents, &mut snapshot, &mut appended);
        assert!(error.is_none(), "{error:?}");
        assert!(done.holds(Ticket::Commitment(3)) && !done.holds(Ticket::Snapshot(2)));
        assert_eq!(store.load().unwrap().executables["d/c/e"].restart_count, 2);
        let (error, done) = write(&mut journal, &mut intents, &mut snapshot, &mut appended);
        assert!(error.is_none(), "{error:?}");
        assert!(done.holds(Ticket::Snapshot(2)));
        assert!(snapshot.is_none());
        assert_eq!(store.load().unwrap().executables["d/c/e"].restart_count, 2);
    }

    /// A full disk: a start that is no restart goes ahead without its
    /// record; a restart never does, and goes ahead once the disk takes it.
    #[tokio::test]
    async fn while_writes_fail_a_snapshot_is_waived_and_a_commitment_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        store.fail_writes.store(true, SeqCst);
        let (mut writer, task) = StateWriter::new(Journal::new(store.clone()));
        let (tx, _rx) = mpsc::unbounded_channel();
        let handle = task.spawn(tx);
        let snapshot = writer.snapshot(&State::default());
        assert!(writer.wait_durable(snapshot).await, "waived");
        let commitment = writer.commit(intent(1));
        let wait = writer.wait_durable(commitment);
        tokio::pin!(wait);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut wait)
                .await
                .is_err(),
            "a restart waits for its record"
        );
        store.fail_writes.store(false, SeqCst);
        assert!(wait.await);
        assert_eq!(store.load().unwrap().executables["d/c/e"].restart_count, 1);
        writer.close();
        handle.await.unwrap();
    }

    #[tokio::test]
    async fn launches_wait_for_their_generation_and_give_up_when_the_writer_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let (mut writer, task) = StateWriter::new(Journal::new(store));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let handle = task.spawn(tx);
        let ticket = writer.commit(intent(1));
        assert!(writer.wait_durable(ticket).await);
        match rx.recv().await {
            Some(Msg::StateWrite(report)) => assert!(report.wrote && writer.is_durable(ticket)),
            other => panic!("a write report: {other:?}"),
        }
        let never = writer.wait_durable(Ticket::Commitment(10));
        writer.close();
        handle.await.unwrap();
        assert!(!never.await, "the writer is gone: no start");
    }
}
