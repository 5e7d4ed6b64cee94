//! Pure restart decisions: the table of SPEC 6 as one `match` over
//! (policy, what happened). The supervisor asks, this module answers; how long
//! to wait is `backoff`'s business.

use crate::model::RestartPolicy;

/// What happened to an executable's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happening {
    /// The main process exited by itself with this code.
    Exited { code: i64 },
    /// The engine refused to start it (for example a command not in `$PATH`).
    StartFailed,
    /// Stopped, killed or removed by anyone but berth.
    StoppedByHand,
    /// Started again by hand after such a stop.
    StartedByHand,
    /// It was running when the device rebooted or the engine restarted.
    Interrupted,
    /// It had already exited with this code before the device rebooted.
    ExitedBeforeReboot { code: i64 },
}

/// What berth does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start the container again (after the back-off); the start is counted.
    Restart,
    /// Exited 0 and not restarted: `Completed`.
    Complete,
    /// Failed and not restarted: `Error` + `DEP_E152`.
    Fail,
    /// Not restarted until the device reboots: `Stopped`, manual stop reason.
    SuspendUntilReboot,
    /// Interrupted under `never`: `Stopped`, not restarted.
    LeaveStopped,
    /// The policy applies again; nothing to do now.
    Resume,
    /// Keep the status it had.
    Unchanged,
}

/// The restart table of SPEC 6.
pub fn decide(policy: RestartPolicy, happening: &Happening) -> Decision {
    use Decision::*;
    use Happening::*;
    use RestartPolicy::*;
    match (policy, happening) {
        // exited with code 0: only `always` restarts.
        (Always, Exited { code: 0 }) => Restart,
        (OnFailure | Never, Exited { code: 0 }) => Complete,
        // exited non-zero (crash, OOM kill).
        (Always | OnFailure, Exited { .. }) => Restart,
        (Never, Exited { .. }) => Fail,
        // could not start: retried with back-off, except under `never`.
        (Always | OnFailure, StartFailed) => Restart,
        (Never, StartFailed) => Fail,
        // stopped by anyone but berth: suspended until the device reboots.
        (_, StoppedByHand) => SuspendUntilReboot,
        // started again by hand: the policy applies again.
        (_, StartedByHand) => Resume,
        // interrupted by a reboot or an engine restart.
        (Always | OnFailure, Interrupted) => Restart,
        (Never, Interrupted) => LeaveStopped,
        // had exited before the reboot.
        (Always, ExitedBeforeReboot { .. }) => Restart,
        (OnFailure, ExitedBeforeReboot { code: 0 }) => Unchanged,
        (OnFailure, ExitedBeforeReboot { .. }) => Restart,
        (Never, ExitedBeforeReboot { .. }) => Unchanged,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;
    use Happening::*;
    use RestartPolicy::*;

    /// One row per line of the SPEC 6 table, columns always / on-failure / never.
    #[test]
    fn restart_table() {
        let rows: &[(&str, Happening, [Decision; 3])] = &[
            (
                "exited with code 0",
                Exited { code: 0 },
                [Restart, Complete, Complete],
            ),
            (
                "exited non-zero",
                Exited { code: 3 },
                [Restart, Restart, Fail],
            ),
            (
                "killed by OOM (137)",
                Exited { code: 137 },
                [Restart, Restart, Fail],
            ),
            ("could not start", StartFailed, [Restart, Restart, Fail]),
            (
                "stopped, killed or removed by hand",
                StoppedByHand,
                [SuspendUntilReboot, SuspendUntilReboot, SuspendUntilReboot],
            ),
            (
                "started again by hand",
                StartedByHand,
                [Resume, Resume, Resume],
            ),
            (
                "interrupted by a reboot or engine restart",
                Interrupted,
                [Restart, Restart, LeaveStopped],
            ),
            (
                "had exited 0 before the reboot",
                ExitedBeforeReboot { code: 0 },
                [Restart, Unchanged, Unchanged],
            ),
            (
                "had failed before the reboot",
                ExitedBeforeReboot { code: 1 },
                [Restart, Restart, Unchanged],
            ),
        ];
        for (name, happening, want) in rows {
            for (policy, want) in [Always, OnFailure, Never].into_iter().zip(want) {
                assert_eq!(decide(policy, happening), *want, "{name} under {policy}");
            }
        }
    }
}
