//! The request ids already seen, so that a command is carried out once even
//! if it is sent again, also across berth restarts. Kept in
//! `<state_dir>/remote-requests.json`, replaced atomically on every accepted
//! command, and bounded: an id is kept until its command could no longer be
//! accepted anyway (older than `MAX_AGE` plus a margin), and at most
//! [`MAX_SEEN`] ids are kept; beyond that new commands are refused until
//! older ids expire, rather than forgetting an id that could be replayed.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Refusal, FUTURE_TOLERANCE, MAX_AGE};

pub const FILE_NAME: &str = "remote-requests.json";
/// The most request ids kept: 10 000 commands within six minutes is far
/// more than one robot takes.
pub const MAX_SEEN: usize = 10_000;
/// Kept this long past `MAX_AGE`, for clocks that move.
const MARGIN: Duration = Duration::from_secs(60);

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    /// Request id → its `issued_at`, in seconds since the epoch.
    seen: BTreeMap<String, u64>,
}

#[derive(Debug)]
pub struct SeenRequests {
    path: PathBuf,
    record: Record,
    max: usize,
}

impl SeenRequests {
    /// Loads the record of `state_dir`; a missing file is an empty record,
    /// an unreadable one is set aside (as `<file>.corrupt`) and replaced,
    /// with a warning: commands it named are older than a few minutes at
    /// worst, and the time window refuses those.
    pub fn open(state_dir: &Path) -> SeenRequests {
        let path = state_dir.join(FILE_NAME);
        let record = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "record of remote request ids unreadable; starting a new one");
                let _ = fs::rename(&path, path.with_extension("json.corrupt"));
                Record::default()
            }),
            Err(_) => Record::default(),
        };
        SeenRequests {
            path,
            record,
            max: MAX_SEEN,
        }
    }

    /// Keeps at most `max` ids instead of [`MAX_SEEN`].
    pub fn with_limit(mut self, max: usize) -> SeenRequests {
        self.max = max;
        self
    }

    pub fn len(&self) -> usize {
        self.record.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.record.seen.is_empty()
    }

    /// Records `id` (issued at `issued`), or refuses it when it was seen.
    /// Ids that can no longer be accepted are pruned first. The record is on
    /// disk before this returns `Ok`.
    pub fn record(&mut self, id: &str, issued: SystemTime, now: SystemTime) -> Result<(), Refusal> {
        if self.record.seen.contains_key(id) {
            return Err(Refusal::Replayed(id.to_string()));
        }
        let now_secs = secs(now);
        let keep = (MAX_AGE + MARGIN + FUTURE_TOLERANCE).as_secs();
        self.record
            .seen
            .retain(|_, at| now_secs.saturating_sub(*at) <= keep);
        if self.record.seen.len() >= self.max {
            return Err(Refusal::TooMany(self.record.seen.len()));
        }
        self.record.seen.insert(id.to_string(), secs(issued));
        if let Err(e) = self.save() {
            self.record.seen.remove(id);
            return Err(Refusal::Store(e.to_string()));
        }
        Ok(())
    }

    /// Write a temporary file, fsync it, rename it over the old one, fsync
    /// the directory.
    fn save(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(&self.record).expect("serializes"))?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
