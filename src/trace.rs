//! An optional trace of berth's restart path, for `berth-bench`: when
//! `berth run --trace-file PATH` names a file, berth appends one line to it
//! per record, `<kind> <executable> <nanos>`:
//!
//! - `kind` is `die` (a `die` event received from the engine, as the loop
//!   takes it), `committed` (a restart's durable record is on disk: its
//!   launch goes ahead) or `start-request` (right before the start call to
//!   the engine);
//! - `executable` is `deployment/component/executable` from the container's
//!   labels (the container id when it has none of berth's labels);
//! - `nanos` is CLOCK_REALTIME in nanoseconds since the epoch, the clock of
//!   the engine's event timestamps, so that the bench lines both up.
//!
//! Off by default, and then a record costs one check of a `OnceLock`. On, a
//! record is one `write` of one line to a file opened with `O_APPEND`: no
//! lock and no buffer, so every line is whole and on disk (in the page cache)
//! the moment it is written, even if berth is killed. It talks to nothing
//! else; a line that cannot be written is dropped.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::labels;
use crate::runtime::{EngineEvent, EventAction};

static TRACE: OnceLock<File> = OnceLock::new();

/// What a trace line records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A `die` event of one of berth's containers reached the loop.
    Die,
    /// A restart's commitment is durable; its launch goes ahead.
    Committed,
    /// berth is about to ask the engine to start a container.
    StartRequest,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Die => "die",
            Kind::Committed => "committed",
            Kind::StartRequest => "start-request",
        }
    }
}

/// Opens (creates, appends to) the trace file for the rest of the process.
/// Called once, before the supervisor runs; a second call changes nothing.
pub fn enable(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let _ = TRACE.set(file);
    Ok(())
}

/// Records a `die` event as the loop receives it; other events are ignored.
pub fn die_received(event: &EngineEvent) {
    if TRACE.get().is_some() && matches!(event.action, EventAction::Die { .. }) {
        record(Kind::Die, &event.labels, &event.container_id);
    }
}

/// Records that a restart's commitment is durable, for the container so
/// labelled.
pub fn committed(container_labels: &BTreeMap<String, String>, container_id: &str) {
    if TRACE.get().is_some() {
        record(Kind::Committed, container_labels, container_id);
    }
}

/// Records a start request about to be sent for the container so labelled.
pub fn start_request(container_labels: &BTreeMap<String, String>, container_id: &str) {
    if TRACE.get().is_some() {
        record(Kind::StartRequest, container_labels, container_id);
    }
}

fn record(kind: Kind, container_labels: &BTreeMap<String, String>, container_id: &str) {
    let Some(mut file) = TRACE.get() else {
        return;
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let _ = file.write_all(line(kind, container_labels, container_id, nanos).as_bytes());
}

/// One trace line, newline included.
fn line(
    kind: Kind,
    container_labels: &BTreeMap<String, String>,
    container_id: &str,
    nanos: u128,
) -> String {
    let part = |name: &str| container_labels.get(name).map(String::as_str);
    let key = match (
        part(labels::DEPLOYMENT),
        part(labels::COMPONENT),
        part(labels::EXECUTABLE),
    ) {
        (Some(d), Some(c), Some(e)) => format!("{d}/{c}/{e}"),
        _ => container_id.to_owned(),
    };
    format!("{} {key} {nanos}\n", kind.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled() -> BTreeMap<String, String> {
        BTreeMap::from([
            (labels::DEPLOYMENT.to_owned(), "talker".to_owned()),
            (labels::COMPONENT.to_owned(), "main".to_owned()),
            (labels::EXECUTABLE.to_owned(), "app".to_owned()),
        ])
    }

    #[test]
    fn a_line_names_the_kind_the_executable_and_the_time() {
        assert_eq!(
            line(Kind::Die, &labelled(), "3f2a", 1_764_000_000_123_456_789),
            "die talker/main/app 1764000000123456789\n"
        );
        assert_eq!(
            line(Kind::StartRequest, &labelled(), "3f2a", 7),
            "start-request talker/main/app 7\n"
        );
    }

    #[test]
    fn a_container_without_berth_labels_is_named_by_its_id() {
        assert_eq!(line(Kind::Die, &BTreeMap::new(), "3f2a", 5), "die 3f2a 5\n");
    }
}
