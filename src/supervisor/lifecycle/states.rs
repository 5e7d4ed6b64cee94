//! What an executable's lifecycle is made of: its states ([`Life`]), what
//! can happen to it ([`Input`]), what the loop must do ([`Effect`]), what its
//! document shows ([`Shown`]) and what a transition needs ([`Ctx`]). The
//! table between them is [`super::step`].

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::RestartSettings;
use crate::model::{ErrorCode, RestartPolicy, Status};
use crate::policy::Happening;

/// Shown while an executable is stopped by hand.
pub const MANUAL_STOP_REASON: &str = "stopped manually; restart policy suspended until reboot";
/// Shown for an executable a reboot or an engine restart interrupted under `never`.
pub const NEVER_INTERRUPTED_REASON: &str =
    "interrupted by a reboot or engine restart; restart policy never";

/// Where one executable is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Life {
    /// Nothing under way: no container yet, or waiting for the engine, a
    /// dependency or an image before provisioning starts it.
    Idle,
    /// berth asked the engine to create and start its container; `counted`
    /// when this start is a restart. Engine events about it wait for the
    /// answer. `then`: an update that arrived meanwhile, applied after it.
    Starting {
        counted: bool,
        then: Option<Replacement>,
    },
    /// Its container runs. `killed`: a kill berth did not send was seen, so
    /// the exit that follows may be a manual stop.
    Running { killed: Option<Kill> },
    /// A restart waits out its back-off.
    BackingOff { due: Instant, after: Exit },
    /// Exited, and its policy does not restart it: `Completed` (code 0) or
    /// `Error` (a failure, or a start refused, under `never`).
    Exited { code: Option<i64> },
    /// Stopped by anyone but berth: not restarted until the device reboots or
    /// someone starts it by hand. `at`: engine time of the stop, when seen.
    Suspended { at: Option<i64> },
    /// A reboot or an engine restart interrupted it under `never`.
    Interrupted,
    /// An update replaces its container: the current one is stopped (and
    /// kept under another name when it was running well), the new one started.
    Replacing(Replacement),
    /// The new container of an update runs; it must keep running until
    /// `until` (`min_ready_secs`) or the previous one comes back.
    Proving {
        until: Instant,
        previous: String,
        killed: Option<Kill>,
    },
    /// The update failed: the new container goes, the previous one starts again.
    RollingBack,
    /// berth stops and removes its container (the deployment or the
    /// executable is gone); `retry_at`: when a refused removal is tried again.
    Retiring { retry_at: Option<Instant> },
}

/// An update's new container, and what it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    /// The new container, created under a temporary name.
    pub next: String,
    /// The current container, kept (stopped, renamed) until the new one has
    /// proven itself; `None` when it is removed at once (it was not running
    /// well, so it is no better than the new one).
    pub previous: Option<String>,
}

/// A kill berth did not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kill {
    /// Engine time, nanoseconds.
    pub at: i64,
    /// The signal number, when the engine said.
    pub signal: Option<i32>,
}

impl Kill {
    /// Whether an exit with `code` was this kill's doing. `docker stop` and
    /// `docker kill` send signals that end a process (or make it exit by its
    /// own trap, with any code); any other signal (`docker kill -s HUP`) only
    /// explains an exit that reports being killed by that very signal.
    pub fn explains(&self, code: i64) -> bool {
        match self.signal {
            None | Some(2 | 3 | 9 | 15) => true,
            Some(n) => code == 128 + i64::from(n),
        }
    }
}

/// What a restart follows, for its reason and event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Code(i64),
    FailedStart(String),
    Interruption,
    /// Its liveness probe failed (`failure_threshold` times in a row); why.
    Unhealthy(String),
}

impl Exit {
    pub fn code(&self) -> Option<i64> {
        match self {
            Exit::Code(c) => Some(*c),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Exit::Code(c) => format!("exit code {c}"),
            Exit::FailedStart(_) => "a failed start".into(),
            Exit::Interruption => "an interruption".into(),
            Exit::Unhealthy(why) => format!("unhealthy: {why}"),
        }
    }
}

/// What happened to an executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Provisioning starts it; `restart`: the start is a counted restart
    /// after this (a container lost to a reboot, say).
    Launch { restart: Option<Exit> },
    /// The engine started its container.
    Started,
    /// The engine refused to start it; its words.
    StartRefused { reason: String },
    /// Its image is not there.
    ImageMissing { reason: String },
    /// The engine went away during the call: the next reconcile decides.
    Lost,
    /// A kill berth did not send.
    Killed(Kill),
    /// Its liveness probe failed `failure_threshold` times in a row; why.
    Unhealthy { reason: String },
    /// Its main process exited.
    Died {
        code: i64,
        at: i64,
        ran_for: Option<Duration>,
    },
    /// Started by someone else.
    StartedByHand,
    /// Its container was removed by someone else.
    Removed,
    /// The back-off is over.
    Due,
    /// What reconcile found happened while berth was not looking.
    Found {
        happening: Happening,
        code: Option<i64>,
        ran_for: Option<Duration>,
    },
    /// The engine is unreachable.
    EngineLost,
    /// An update's new container is ready to take over.
    Replace {
        next: String,
        current: Option<String>,
    },
    /// The update's new container runs.
    Swapped,
    /// The update's new container could not be started.
    SwapFailed { reason: String },
    /// The new container has run for `min_ready_secs`.
    Proven,
    /// The executable or its deployment is gone.
    Retire,
}

/// What the loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Count a restart (durably, before the start), send its event, start it.
    Restart { after: Exit },
    /// Start it; not counted.
    Start,
    /// What its document shows from now on.
    Show(Shown),
    /// An `error` event (the document shows the same).
    Failed {
        error_code: ErrorCode,
        exit_code: Option<i64>,
        reason: String,
    },
    /// A `manual_stop` event.
    ManualStop { exit_code: Option<i64> },
    /// A `restarted` event: a counted restart reached the engine.
    Restarted,
    /// Write the state at once: what an operator did by hand.
    SaveNow,
    /// The deployment's images must be pulled again.
    Repull,
    /// Stop the current container (keep it as `previous`, or remove it) and
    /// start `next` in its place.
    Swap(Replacement),
    /// Remove the kept previous container: the update holds.
    DropPrevious { previous: String },
    /// The update failed: remove the new container, start `previous` again,
    /// report `FailedToUpdate` with this reason.
    RollBack {
        previous: String,
        reason: String,
        error_code: ErrorCode,
    },
    /// Stop and remove its container.
    Remove,
}

/// The status part of an executable's document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub status: Status,
    pub reason: Option<String>,
    pub error_code: Option<ErrorCode>,
    pub exit_code: Option<i64>,
}

impl Shown {
    pub fn new(status: Status, reason: Option<String>, error_code: Option<ErrorCode>) -> Shown {
        Shown {
            status,
            reason,
            error_code,
            exit_code: None,
        }
    }

    pub(super) fn exit(mut self, code: Option<i64>) -> Shown {
        self.exit_code = code;
        self
    }

    pub fn running() -> Shown {
        Shown::new(Status::Running, None, None)
    }
}

/// What the transition needs besides the state.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    pub policy: RestartPolicy,
    pub settings: &'a RestartSettings,
    pub backoff: Backoff,
    pub now: Instant,
    pub min_ready: Duration,
}

/// The next state, the back-off record after it, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub life: Life,
    pub backoff: Backoff,
    pub effects: Vec<Effect>,
}

impl Step {
    pub(super) fn to(life: Life, ctx: &Ctx, effects: Vec<Effect>) -> Step {
        Step {
            life,
            backoff: ctx.backoff,
            effects,
        }
    }
}
