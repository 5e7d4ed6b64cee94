//! The persisted record in `state_dir`: restart counts, manual stops, the boot
//! id, the engine event position and the ROS master's owner. One JSON file,
//! replaced atomically (write a temporary file, fsync it, rename it over the
//! old one, fsync the directory), so that a `kill -9` or a power loss at any
//! moment leaves either the old record or the new one, never a mix.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::model::{ExecKey, RestartPolicy, Status};

const FILE_NAME: &str = "state.json";

/// The format this berth writes, in the file's `version` field. Each format
/// change bumps it and adds a step to [`migrate`]; berth reads every older
/// format and refuses a newer one (a downgrade) rather than lose its counts.
///
/// - 1: berth 0.1.0. A file without `version` is read as 1.
pub const FORMAT_VERSION: u32 = 1;

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
    /// A counted restart whose start may not have reached the engine yet.
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

/// Written before berth asks the engine to start a container again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRestart {
    /// The container's `StartedAt` before the restart: if the engine still
    /// shows it, the start never happened and is issued again (not recounted).
    pub prev_started_at: Option<String>,
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
const MIGRATIONS: [Migration; FORMAT_VERSION as usize - 1] = [];

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

/// The state file in `state_dir`.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
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
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The stored state; the default when there is none yet.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => {
                return Err(StateError::Io {
                    operation: "read",
                    path,
                    source,
                })
            }
        };
        let value = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        migrate(&path, value)
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

    /// Replaces the stored state atomically and durably.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE_NAME}.tmp"));
        let io = |operation: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io {
                operation,
                path,
                source,
            }
        };
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
        fs::rename(&tmp, &path).map_err(io("replace", &path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory of", &path))?;
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
        state.exec_mut(&key).pending_restart = Some(PendingRestart {
            prev_started_at: Some("t".into()),
        });
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
