//! The persisted record in `state_dir`: restart counts, manual stops, the boot
//! id, the engine event position and the ROS master's owner.
//!
//! Two files carry it. `state.json` is the whole record, replaced atomically
//! (write a temporary file, fsync it, rename it over the old one, fsync the
//! directory), so that a `kill -9` or a power loss at any moment leaves
//! either the old record or the new one, never a mix; the copy it replaced
//! is kept as `state.prev.json`, the fallback when `state.json` cannot be
//! read. `restarts.log` is the restart log: one line per restart commitment
//! (an executable's count and pending restart), appended with one
//! `fdatasync`, several times faster than replacing the whole file. Each
//! replacement of `state.json` (a compaction) starts a new log and keeps the
//! previous one as `restarts.prev.log`. Reading is `state.json` (or its
//! previous copy) with the logs replayed over it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::model::{ExecKey, RestartPolicy, Status};

const FILE_NAME: &str = "state.json";
const PREV_FILE_NAME: &str = "state.prev.json";
const LOG_NAME: &str = "restarts.log";
const PREV_LOG_NAME: &str = "restarts.prev.log";

/// The format this berth writes, in the file's `version` field. Each format
/// change bumps it and adds a step to [`migrate`]; berth reads every older
/// format and refuses a newer one (a downgrade) rather than lose its counts.
///
/// - 1: berth 0.1.0. A file without `version` is read as 1.
/// - 2: a pending restart may be a reservation (`reserved_for`), whose count
///   holds only if its container started again. Format 1 has none, so the
///   step changes nothing; a berth of format 1 would read a reservation as a
///   commitment and count one restart too many, so it must refuse format 2.
pub const FORMAT_VERSION: u32 = 2;

/// Fields missing from a file take their defaults, so that a field added in
/// a later format needs no migration step of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub version: u32,
    /// The boot id berth last ran under; a different one means a reboot.
    pub boot_id: Option<String>,
    /// Engine time (ns) of the last engine event berth has applied: where the
    /// replay starts after berth was down.
    pub event_position: Option<i64>,
    /// Keyed by `deployment/component/executable`.
    pub executables: BTreeMap<String, ExecRecord>,
    pub ros_master: Option<RosMasterRecord>,
    /// Image references berth pulled: the only ones its garbage collection
    /// may remove.
    pub pulled_images: std::collections::BTreeSet<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            version: FORMAT_VERSION,
            boot_id: None,
            event_position: None,
            executables: BTreeMap::new(),
            ros_master: None,
            pulled_images: Default::default(),
        }
    }
}

impl State {
    pub fn exec(&self, key: &ExecKey) -> Option<&ExecRecord> {
        self.executables.get(&key.to_string())
    }

    pub fn exec_mut(&mut self, key: &ExecKey) -> &mut ExecRecord {
        self.executables.entry(key.to_string()).or_default()
    }

    pub fn remove_exec(&mut self, key: &ExecKey) {
        self.executables.remove(&key.to_string());
    }
}

/// What berth remembers of one executable.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ExecRecord {
    /// Restarts so far, including one that is committed but not yet done
    /// (`pending_restart`): a restart is counted in the same write that
    /// commits berth to it, and the start then happens exactly once.
    pub restart_count: u64,
    pub container_id: Option<String>,
    /// The engine's `StartedAt` of the last start berth knows of.
    pub started_at: Option<String>,
    /// A counted restart whose start may not have reached the engine yet,
    /// or a reservation of the next one (see [`PendingRestart::reserved_for`]).
    pub pending_restart: Option<PendingRestart>,
    /// Stopped by hand; not restarted until the device reboots.
    pub manual_stop: bool,
    pub backoff: Backoff,
    /// The status berth last reported: after a reboot it tells an executable
    /// that was interrupted from one that had exited before.
    pub status: Option<Status>,
    pub exit_code: Option<i64>,
    /// Time deployed and time `Running` over the last 24 h (the `metrics`
    /// topic's availability), kept across berth restarts.
    pub availability: Availability,
}

/// How long an executable was deployed and how long it was `Running`, in
/// hourly buckets over the last 24 hours.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Availability {
    /// Oldest first: (hour since the epoch, running ms, deployed ms).
    pub hours: Vec<(u64, u64, u64)>,
}

impl Availability {
    /// The window the share is taken over.
    pub const HOURS: u64 = 24;

    /// Adds `elapsed_ms` of being deployed (and `Running`, when `running`)
    /// in the hour of `now_secs` (unix seconds), and forgets hours that
    /// left the window.
    pub fn add(&mut self, now_secs: u64, elapsed_ms: u64, running: bool) {
        let hour = now_secs / 3600;
        match self.hours.last_mut() {
            Some(last) if last.0 == hour => {
                last.1 += if running { elapsed_ms } else { 0 };
                last.2 += elapsed_ms;
            }
            _ => self
                .hours
                .push((hour, if running { elapsed_ms } else { 0 }, elapsed_ms)),
        }
        self.hours.retain(|h| h.0 + Self::HOURS > hour);
    }

    /// Time `Running` / time deployed over the window; `None` before any.
    pub fn share(&self) -> Option<f64> {
        let (running, deployed) = self
            .hours
            .iter()
            .fold((0u64, 0u64), |(r, d), h| (r + h.1, d + h.2));
        (deployed > 0).then(|| running as f64 / deployed as f64)
    }
}

impl ExecRecord {
    /// The restarts that happened, if the container has not started again
    /// since the record was written: a reservation is not one yet.
    pub fn restarts_done(&self) -> u64 {
        let reserved = self
            .pending_restart
            .as_ref()
            .is_some_and(|p| p.reserved_for.is_some());
        self.restart_count - u64::from(reserved && self.restart_count > 0)
    }
}

/// Written before berth asks the engine to start a container again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRestart {
    /// The container's `StartedAt` before the restart: if the engine still
    /// shows it, the start never happened and is issued again (not recounted).
    pub prev_started_at: Option<String>,
    /// Set on a reservation: the commitment to the next restart of this
    /// container, written while it runs (format 2), so that its exit is
    /// restarted without waiting for a disk. Its count holds only if the
    /// container has been started since `prev_started_at`; otherwise the
    /// count is one less and the restart, if any, is decided again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_for: Option<String>,
}

impl PendingRestart {
    /// A commitment to restart the container that started at `prev_started_at`.
    pub fn after(prev_started_at: Option<String>) -> Self {
        PendingRestart {
            prev_started_at,
            reserved_for: None,
        }
    }
}

/// One line of the restart log: an executable's count and pending restart
/// right after a commitment. The values are absolute, so that replaying a
/// line over a record that already holds it changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    /// `deployment/component/executable`, as in `State::executables`.
    pub key: String,
    pub restart_count: u64,
    pub pending_restart: PendingRestart,
}

impl Intent {
    /// The commitment of `key` to log, if its record has one pending.
    pub fn of(key: &ExecKey, record: &ExecRecord) -> Option<Intent> {
        Some(Intent {
            key: key.to_string(),
            restart_count: record.restart_count,
            pending_restart: record.pending_restart.clone()?,
        })
    }
}

impl State {
    /// Applies a logged commitment unless the record already holds it or a
    /// later one (a count only grows by commitments); a commitment, or a
    /// later reservation (for another run or container: after a rollback,
    /// say), replaces a reservation of the same count.
    pub fn apply_intent(&mut self, intent: &Intent) {
        let record = self.executables.entry(intent.key.clone()).or_default();
        let replaces_reservation = intent.restart_count == record.restart_count
            && record
                .pending_restart
                .as_ref()
                .is_some_and(|p| p.reserved_for.is_some());
        if intent.restart_count > record.restart_count || replaces_reservation {
            record.restart_count = intent.restart_count;
            record.pending_restart = Some(intent.pending_restart.clone());
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosMasterRecord {
    pub owner: String,
    pub policy: RestartPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {operation} state file {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is unreadable: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// Written by a later berth (a downgrade): its format is unknown here.
    #[error(
        "state file {path} has format version {version}, newer than {FORMAT_VERSION}: \
         it was written by a later berth; upgrade berth or move the file aside"
    )]
    Newer { path: PathBuf, version: u64 },
}

/// A JSON object of the state file, as read.
type Json = serde_json::Map<String, serde_json::Value>;

/// `MIGRATIONS[i]` rewrites format `i + 1` into format `i + 2`: one entry per
/// format change, never edited once released.
const MIGRATIONS: [Migration; FORMAT_VERSION as usize - 1] = [
    // 1 → 2: reservations are new; a format-1 file holds none.
    |_| Ok(()),
];

/// One format step: rewrites the object in place, or says why it cannot.
type Migration = fn(&mut Json) -> Result<(), String>;

/// Brings a state file of any earlier format to the current one: one step
/// per format version, applied in order, each a rewrite of the JSON. The
/// file's own `version` says where to start (none: 1, berth 0.1.0).
pub fn migrate(path: &Path, mut value: serde_json::Value) -> Result<State, StateError> {
    let corrupt = |message: String| StateError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let Some(object) = value.as_object_mut() else {
        return Err(corrupt("not a JSON object".into()));
    };
    let version = match object.get("version") {
        None => 1,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| corrupt(format!("format version {v} is not a number")))?,
    };
    if version > u64::from(FORMAT_VERSION) {
        return Err(StateError::Newer {
            path: path.to_path_buf(),
            version,
        });
    }
    if version == 0 {
        return Err(corrupt("format version 0 is not known".into()));
    }
    for step in &MIGRATIONS[(version - 1) as usize..] {
        step(object).map_err(corrupt)?;
    }
    object.insert("version".into(), FORMAT_VERSION.into());
    serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))
}

/// The state files in `state_dir`.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
    /// Unit tests make every write fail on demand (a full disk).
    #[cfg(test)]
    pub(crate) fail_writes: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// What `StateStore::recover` found, and what went wrong on the way
/// (`DEP_E302`, to report).
#[derive(Debug)]
pub struct Recovered {
    pub state: State,
    pub problems: Vec<String>,
}

impl StateStore {
    /// Creates `state_dir` (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io {
                operation: "create directory for",
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(StateStore {
            dir: dir.to_path_buf(),
            #[cfg(test)]
            fail_writes: Default::default(),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The stored state: `state.json` (or its previous copy while a
    /// compaction is between its two renames) with the restart logs
    /// replayed; the default when there is none yet. An unreadable
    /// `state.json` is an error (`recover` falls back instead).
    pub fn load(&self) -> Result<State, StateError> {
        let (state, logs) = match read_state(&self.path())? {
            Some(state) => (state, &[LOG_NAME][..]),
            None => match read_state(&self.file(PREV_FILE_NAME))? {
                Some(state) => (state, &[PREV_LOG_NAME, LOG_NAME][..]),
                None => (State::default(), &[PREV_LOG_NAME, LOG_NAME][..]),
            },
        };
        let mut state = state;
        for log in logs {
            self.replay(&mut state, log)?;
        }
        Ok(state)
    }

    /// The stored state, whatever happened to it: an unreadable
    /// `state.json` is set aside (`state.json.corrupt`) and its previous
    /// copy used, with both restart logs replayed over it, so that no
    /// committed restart count is lost. Each problem is returned, to be
    /// reported (`DEP_E302`). A file written by a later berth (a downgrade)
    /// is the one error: it is not set aside, so that its counts are not
    /// lost to an older berth.
    pub fn recover(&self) -> Result<Recovered, StateError> {
        let mut problems = Vec::new();
        let state = match self.load() {
            Ok(state) => state,
            Err(e @ StateError::Newer { .. }) => return Err(e),
            Err(e) => {
                let mut problem = e.to_string();
                match self.set_aside() {
                    Ok(to) => problem.push_str(&format!("; moved to {}", to.display())),
                    Err(e) => problem.push_str(&format!("; {e}")),
                }
                let prev = self.file(PREV_FILE_NAME);
                let mut state = match read_state(&prev) {
                    Ok(Some(state)) => {
                        problem.push_str(&format!("; using the previous copy {}", prev.display()));
                        state
                    }
                    Ok(None) => {
                        problem.push_str(
                            "; no previous copy: counts are rebuilt from the restart log alone",
                        );
                        State::default()
                    }
                    Err(e) => {
                        problem.push_str(&format!(
                            "; {e}: counts are rebuilt from the restart log alone"
                        ));
                        State::default()
                    }
                };
                problems.push(problem);
                for log in [PREV_LOG_NAME, LOG_NAME] {
                    if let Err(e) = self.replay(&mut state, log) {
                        problems.push(e.to_string());
                    }
                }
                state
            }
        };
        Ok(Recovered { state, problems })
    }

    /// Applies every commitment of one restart log. A last line without its
    /// newline is a write that never completed (and was never acted on).
    fn replay(&self, state: &mut State, name: &str) -> Result<(), StateError> {
        let path = self.file(name);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(StateError::Io {
                    operation: "read",
                    path,
                    source,
                })
            }
        };
        let mut reader = std::io::BufReader::new(file);
        let mut line = String::new();
        let mut number = 0;
        loop {
            line.clear();
            let n = reader
                .read_line(&mut line)
                .map_err(|source| StateError::Io {
                    operation: "read",
                    path: path.clone(),
                    source,
                })?;
            number += 1;
            if n == 0 || !line.ends_with('\n') {
                return Ok(());
            }
            let intent: Intent = serde_json::from_str(&line).map_err(|e| StateError::Corrupt {
                path: path.clone(),
                message: format!("line {number}: {e}"),
            })?;
            state.apply_intent(&intent);
        }
    }

    /// Moves an unreadable state file aside (`state.json.corrupt`) so that
    /// berth can start afresh without destroying the evidence.
    pub fn set_aside(&self) -> Result<PathBuf, StateError> {
        let to = self.dir.join(format!("{FILE_NAME}.corrupt"));
        fs::rename(self.path(), &to).map_err(|source| StateError::Io {
            operation: "set aside",
            path: self.path(),
            source,
        })?;
        Ok(to)
    }

    /// Replaces the stored state atomically and durably, keeping the
    /// previous copy. The restart logs stay as they are.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        self.replace(state, false).map(drop)
    }

    #[cfg(test)]
    fn injected_failure(&self, path: &Path) -> Result<(), StateError> {
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StateError::Io {
                operation: "write",
                path: path.to_path_buf(),
                source: std::io::Error::from_raw_os_error(28), // ENOSPC
            });
        }
        Ok(())
    }

    #[cfg(not(test))]
    fn injected_failure(&self, _: &Path) -> Result<(), StateError> {
        Ok(())
    }

    /// Writes `state.json` through a temporary file, keeps the replaced one
    /// as `state.prev.json`, and with `rotate_log` starts a new restart log
    /// (the current one becomes `restarts.prev.log`), returning it open.
    /// One directory fsync makes all the renames durable.
    fn replace(&self, state: &State, rotate_log: bool) -> Result<Option<File>, StateError> {
        let path = self.path();
        self.injected_failure(&path)?;
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let json = serde_json::to_vec(state).expect("state serializes");
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        file.write_all(&json).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        drop(file);
        match fs::rename(&path, self.file(PREV_FILE_NAME)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("keep the previous copy of", &path)(e)),
        }
        fs::rename(&tmp, &path).map_err(io("replace", &path))?;
        let log = if rotate_log {
            let log = self.file(LOG_NAME);
            match fs::rename(&log, self.file(PREV_LOG_NAME)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("rotate", &log)(e)),
            }
            // The old log was just renamed away: this one is new and empty.
            Some(open_log(&log)?)
        } else {
            None
        };
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory of", &path))?;
        Ok(log)
    }
}

fn io(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io {
        operation,
        path,
        source,
    }
}

fn open_log(path: &Path) -> Result<File, StateError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(io("open", path))
}

/// The length of a log's complete lines (up to its last newline).
fn complete_lines(path: &Path) -> std::io::Result<u64> {
    let text = fs::read(path)?;
    Ok(text
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i as u64 + 1))
}

/// `Ok(None)` when the file does not exist.
fn read_state(path: &Path) -> Result<Option<State>, StateError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                operation: "read",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let value = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    migrate(path, value).map(Some)
}

/// The writing end of the store, owned by the supervisor's writer task:
/// restart commitments are appended to the log, whole states replace
/// `state.json` and start a new log.
#[derive(Debug)]
pub struct Journal {
    store: StateStore,
    /// The open log; `None` after a failure, reopened on the next write.
    log: Option<File>,
    /// Length of the log's complete lines: a failed append is cut back to it.
    len: u64,
}

impl Journal {
    pub fn new(store: StateStore) -> Self {
        Journal {
            store,
            log: None,
            len: 0,
        }
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    /// Appends commitments to the restart log and makes them durable (one
    /// `fdatasync`).
    pub fn append(&mut self, intents: &[Intent]) -> Result<(), StateError> {
        let path = self.store.file(LOG_NAME);
        self.store.injected_failure(&path)?;
        let mut lines = Vec::new();
        for intent in intents {
            serde_json::to_writer(&mut lines, intent).expect("intents serialize");
            lines.push(b'\n');
        }
        if self.log.is_none() {
            let existed = path.exists();
            let file = open_log(&path)?;
            self.len = complete_lines(&path).map_err(io("read", &path))?;
            if file.metadata().map_err(io("read", &path))?.len() > self.len {
                // A line a crash cut short was never acted on: cut it off, so
                // that the next line starts on a line of its own.
                file.set_len(self.len).map_err(io("repair", &path))?;
            }
            if !existed {
                // A new file is durable once its directory entry is.
                File::open(&self.store.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io("sync directory of", &path))?;
            }
            self.log = Some(file);
        }
        let file = self.log.as_mut().expect("log is open");
        match file.write_all(&lines).and_then(|()| file.sync_data()) {
            Ok(()) => {
                self.len += lines.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut a partial line off, so that the next append starts clean.
                let _ = file.set_len(self.len);
                self.log = None;
                Err(io("append to", &path)(e))
            }
        }
    }

    /// Replaces `state.json` with `state` (which holds every commitment
    /// logged so far) and starts a new log.
    pub fn compact(&mut self, state: &State) -> Result<(), StateError> {
        self.log = None;
        let log = self.store.replace(state, true)?;
        self.log = log;
        self.len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod availability_tests {
    use super::Availability;

    #[test]
    fn availability_is_the_share_running_over_the_last_24_hours() {
        let mut a = Availability::default();
        assert_eq!(a.share(), None);
        let t0 = 1_000 * 3600;
        a.add(t0, 3_600_000, true);
        a.add(t0 + 3600, 1_800_000, true);
        a.add(t0 + 3600, 1_800_000, false);
        assert_eq!(a.share(), Some(0.75));
        // 24 hours later the first hour has left the window.
        a.add(t0 + 24 * 3600, 3_600_000, false);
        assert_eq!(a.hours.len(), 2);
        assert_eq!(a.share(), Some(1_800_000.0 / 7_200_000.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_a_fresh_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s")).unwrap();
        assert_eq!(store.load().unwrap(), State::default());
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut state = State {
            boot_id: Some("b1".into()),
            event_position: Some(42),
            ..State::default()
        };
        let key = ExecKey::new("d", "c", "e");
        state.exec_mut(&key).restart_count = 7;
        state.exec_mut(&key).pending_restart = Some(PendingRestart::after(Some("t".into())));
        store.save(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
        assert!(!dir.path().join("state.json.tmp").exists());
    }

    #[test]
    fn corrupt_file_is_an_error_and_can_be_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        fs::write(store.path(), b"{ not json").unwrap();
        let err = store.load().unwrap_err();
        assert!(err.to_string().contains("state.json"), "{err}");
        let aside = store.set_aside().unwrap();
        assert!(aside.exists());
        assert_eq!(store.load().unwrap(), State::default());
    }

    fn intent(key: &str, count: u64, prev: &str) -> Intent {
        Intent {
            key: key.into(),
            restart_count: count,
            pending_restart: PendingRestart::after(Some(prev.into())),
        }
    }

    #[test]
    fn a_commitment_replaces_a_reservation_of_the_same_count_and_not_the_reverse() {
        let mut state = State::default();
        let reservation = Intent {
            key: "d/c/e".into(),
            restart_count: 3,
            pending_restart: PendingRestart {
                prev_started_at: Some("t2".into()),
                reserved_for: Some("c1".into()),
            },
        };
        state.apply_intent(&reservation);
        let record = state.executables["d/c/e"].clone();
        assert_eq!((record.restart_count, record.restarts_done()), (3, 2));
        // A commitment of the same count (the reservation did not cover it).
        let commitment = intent("d/c/e", 3, "t9");
        state.apply_intent(&commitment);
        let record = state.executables["d/c/e"].clone();
        assert_eq!(record.pending_restart, Some(commitment.pending_restart));
        assert_eq!(record.restarts_done(), 3);
        // A reservation never replaces a commitment of its count.
        state.apply_intent(&reservation);
        assert_eq!(state.executables["d/c/e"].restarts_done(), 3);
    }

    #[test]
    fn a_later_reservation_replaces_an_earlier_one_of_the_same_count() {
        let mut state = State::default();
        let reserve = |container: &str, run: &str| Intent {
            key: "d/c/e".into(),
            restart_count: 3,
            pending_restart: PendingRestart {
                prev_started_at: Some(run.into()),
                reserved_for: Some(container.into()),
            },
        };
        state.apply_intent(&reserve("old", "t1"));
        // The previous container runs again after a rollback: a new run.
        let later = reserve("old", "t2");
        state.apply_intent(&later);
        let record = &state.executables["d/c/e"];
        assert_eq!(record.pending_restart, Some(later.pending_restart));
        assert_eq!(record.restarts_done(), 2);
    }

    #[test]
    fn a_reservation_survives_the_log_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        let reservation = Intent {
            key: "d/c/e".into(),
            restart_count: 1,
            pending_restart: PendingRestart {
                prev_started_at: Some("t0".into()),
                reserved_for: Some("c1".into()),
            },
        };
        journal.append(std::slice::from_ref(&reservation)).unwrap();
        let state = store.load().unwrap();
        assert_eq!(
            state.executables["d/c/e"].pending_restart,
            Some(reservation.pending_restart.clone())
        );
        journal.compact(&state).unwrap();
        assert_eq!(store.load().unwrap(), state);
    }

    #[test]
    fn a_logged_commitment_is_read_back_without_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        journal.append(&[intent("d/c/e", 1, "t0")]).unwrap();
        journal.append(&[intent("d/c/e", 2, "t1")]).unwrap();
        let record = store.load().unwrap().executables["d/c/e"].clone();
        assert_eq!(record.restart_count, 2);
        assert_eq!(
            record.pending_restart.unwrap().prev_started_at.as_deref(),
            Some("t1")
        );
    }

    #[test]
    fn an_older_or_repeated_commitment_changes_nothing() {
        let mut state = State::default();
        state.apply_intent(&intent("d/c/e", 3, "t2"));
        state.executables.get_mut("d/c/e").unwrap().pending_restart = None;
        let before = state.clone();
        state.apply_intent(&intent("d/c/e", 3, "t2"));
        state.apply_intent(&intent("d/c/e", 2, "t1"));
        assert_eq!(state, before);
    }

    #[test]
    fn a_torn_last_line_is_a_commitment_never_made() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        journal.append(&[intent("d/c/e", 1, "t0")]).unwrap();
        let mut log = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_NAME))
            .unwrap();
        log.write_all(br#"{"key":"d/c/e","restart_count":2,"pend"#)
            .unwrap();
        assert_eq!(store.load().unwrap().executables["d/c/e"].restart_count, 1);
        // The next berth's first append starts on a line of its own.
        let mut journal = Journal::new(store.clone());
        journal.append(&[intent("d/c/e", 2, "t1")]).unwrap();
        assert_eq!(store.load().unwrap().executables["d/c/e"].restart_count, 2);
    }

    #[test]
    fn a_compaction_keeps_the_previous_copies_and_starts_a_new_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        journal.append(&[intent("d/c/e", 1, "t0")]).unwrap();
        let first = store.load().unwrap();
        journal.compact(&first).unwrap();
        journal.append(&[intent("d/c/e", 2, "t1")]).unwrap();
        let second = store.load().unwrap();
        journal.compact(&second).unwrap();
        assert_eq!(store.load().unwrap(), second);
        assert_eq!(
            read_state(&dir.path().join(PREV_FILE_NAME)).unwrap(),
            Some(first)
        );
        assert_eq!(
            fs::read_to_string(dir.path().join(LOG_NAME)).unwrap(),
            "",
            "a new log"
        );
        assert!(fs::read_to_string(dir.path().join(PREV_LOG_NAME))
            .unwrap()
            .contains(r#""restart_count":2"#));
    }

    #[test]
    fn a_corrupt_state_falls_back_to_its_previous_copy_and_the_logs() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        let mut state = State {
            boot_id: Some("b1".into()),
            ..State::default()
        };
        state.apply_intent(&intent("d/c/e", 1, "t0"));
        journal.compact(&state).unwrap();
        journal.append(&[intent("d/c/e", 2, "t1")]).unwrap();
        state.apply_intent(&intent("d/c/e", 2, "t1"));
        journal.compact(&state).unwrap();
        journal.append(&[intent("d/c/e", 3, "t2")]).unwrap();
        fs::write(store.path(), b"\0\0\0").unwrap();

        assert!(store.load().is_err());
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.state.boot_id.as_deref(), Some("b1"));
        assert_eq!(recovered.state.executables["d/c/e"].restart_count, 3);
        assert_eq!(recovered.problems.len(), 1, "{:?}", recovered.problems);
        assert!(
            recovered.problems[0].contains("state.prev.json"),
            "{:?}",
            recovered.problems
        );
        assert!(dir.path().join("state.json.corrupt").exists());
    }

    #[test]
    fn a_write_that_failed_is_retried_cleanly() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut journal = Journal::new(store.clone());
        journal.append(&[intent("d/c/e", 1, "t0")]).unwrap();
        store.fail_writes.store(true, SeqCst);
        assert!(journal.append(&[intent("d/c/e", 2, "t1")]).is_err());
        assert!(journal.compact(&State::default()).is_err());
        store.fail_writes.store(false, SeqCst);
        journal.append(&[intent("d/c/e", 2, "t1")]).unwrap();
        let text = fs::read_to_string(dir.path().join(LOG_NAME)).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(store.load().unwrap().executables["d/c/e"].restart_count, 2);
    }
    #[test]
    fn a_file_without_version_is_the_first_format() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        fs::write(
            store.path(),
            br#"{"boot_id":"b","executables":{"d/c/e":{"restart_count":3,"manual_stop":true}}}"#,
        )
        .unwrap();
        let state = store.load().unwrap();
        assert_eq!(state.version, FORMAT_VERSION);
        let exec = state.exec(&ExecKey::new("d", "c", "e")).unwrap();
        assert_eq!((exec.restart_count, exec.manual_stop), (3, true));
    }

    #[test]
    fn a_newer_format_is_refused_not_read_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        fs::write(store.path(), br#"{"version":99,"executables":{}}"#).unwrap();
        let err = store.load().unwrap_err();
        assert!(
            matches!(err, StateError::Newer { version: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_version_that_is_not_a_known_number_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        for text in [
            &br#"{"version":"1"}"#[..],
            b"[1,2]",
            b"{\"version\":-1}",
            b"{\"version\":0}",
        ] {
            fs::write(store.path(), text).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        }
    }
}
