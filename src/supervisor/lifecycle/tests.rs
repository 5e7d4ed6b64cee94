//! The transition table, one test per row, named after it.

use super::*;
use crate::backoff::Backoff;
use crate::config::RestartSettings;
use tokio::time::Instant;
use RestartPolicy::*;

const SECOND: Duration = Duration::from_secs(1);

fn settings() -> RestartSettings {
    RestartSettings {
        backoff_initial: SECOND,
        backoff_max: Duration::from_secs(300),
        backoff_reset_after: Duration::from_secs(60),
    }
}

/// Runs one row: `consecutive` earlier restarts in a row.
fn row(life: Life, input: Input, policy: RestartPolicy, consecutive: u32) -> (Step, Instant) {
    let settings = settings();
    let now = Instant::now();
    let ctx = Ctx {
        policy,
        settings: &settings,
        backoff: Backoff { consecutive },
        now,
        min_ready: Duration::from_secs(10),
    };
    (step(&life, input, &ctx), now)
}

fn running() -> Life {
    Life::Running { killed: None }
}

fn died(code: i64) -> Input {
    Input::Died {
        code,
        at: 1_000,
        ran_for: Some(SECOND),
    }
}

fn shown(step: &Step) -> &Shown {
    step.effects
        .iter()
        .rev()
        .find_map(|e| match e {
            Effect::Show(s) => Some(s),
            _ => None,
        })
        .expect("a Show effect")
}

#[test]
fn launch_starts_uncounted_or_as_a_counted_restart() {
    let (s, _) = row(Life::Idle, Input::Launch { restart: None }, Always, 0);
    assert_eq!(
        s.life,
        Life::Starting {
            counted: false,
            then: None
        }
    );
    assert_eq!(s.effects, vec![Effect::Start]);
    let (s, _) = row(
        Life::Idle,
        Input::Launch {
            restart: Some(Exit::Interruption),
        },
        Always,
        0,
    );
    assert_eq!(
        s.effects,
        vec![Effect::Restart {
            after: Exit::Interruption
        }]
    );
}

#[test]
fn started_runs_and_a_counted_start_says_restarted() {
    let (s, _) = row(
        Life::Starting {
            counted: true,
            then: None,
        },
        Input::Started,
        Always,
        1,
    );
    assert_eq!(s.life, running());
    assert_eq!(
        s.effects,
        vec![Effect::Show(Shown::running()), Effect::Restarted]
    );
}

#[test]
fn exited_0_under_always_restarts_at_once_the_first_time() {
    let (s, _) = row(running(), died(0), Always, 0);
    assert_eq!(
        s.life,
        Life::Starting {
            counted: true,
            then: None
        }
    );
    assert!(s.effects.contains(&Effect::Restart {
        after: Exit::Code(0)
    }));
    assert_eq!(s.backoff.consecutive, 1);
}

#[test]
fn exited_0_under_on_failure_and_never_is_completed() {
    for policy in [OnFailure, Never] {
        let (s, _) = row(running(), died(0), policy, 0);
        assert_eq!(s.life, Life::Exited { code: Some(0) }, "{policy}");
        assert_eq!(shown(&s).status, Status::Completed, "{policy}");
    }
}

#[test]
fn exited_non_zero_under_always_and_on_failure_backs_off_after_the_first() {
    for policy in [Always, OnFailure] {
        // The third restart in a row waits initial × 2.
        let (s, now) = row(running(), died(3), policy, 2);
        assert_eq!(
            s.life,
            Life::BackingOff {
                due: now + 2 * SECOND,
                after: Exit::Code(3)
            },
            "{policy}"
        );
        let shown = shown(&s);
        assert_eq!(shown.status, Status::Pending);
        assert_eq!(
            shown.reason.as_deref(),
            Some("restarting in 2s after exit code 3 (back-off)")
        );
        assert_eq!(shown.error_code, Some(ErrorCode::ExecutableFailed));
        assert_eq!(shown.exit_code, Some(3));
    }
}

#[test]
fn exited_non_zero_under_never_is_error_dep_e152_with_an_event() {
    let (s, _) = row(running(), died(3), Never, 0);
    assert_eq!(s.life, Life::Exited { code: Some(3) });
    assert!(matches!(
        s.effects[0],
        Effect::Failed {
            error_code: ErrorCode::ExecutableFailed,
            exit_code: Some(3),
            ..
        }
    ));
    assert_eq!(shown(&s).status, Status::Error);
}

#[test]
fn could_not_start_retries_with_back_off_in_error() {
    for policy in [Always, OnFailure] {
        let (s, now) = row(
            Life::Starting {
                counted: true,
                then: None,
            },
            Input::StartRefused {
                reason: "exec: \"nope\"".into(),
            },
            policy,
            1,
        );
        assert_eq!(
            s.life,
            Life::BackingOff {
                due: now + SECOND,
                after: Exit::FailedStart("exec: \"nope\"".into())
            }
        );
        let shown = shown(&s);
        assert_eq!(shown.status, Status::Error);
        assert_eq!(
            shown.reason.as_deref(),
            Some("exec: \"nope\" (retrying in 1s)")
        );
    }
}

#[test]
fn could_not_start_under_never_is_error() {
    let (s, _) = row(
        Life::Starting {
            counted: false,
            then: None,
        },
        Input::StartRefused {
            reason: "nope".into(),
        },
        Never,
        0,
    );
    assert_eq!(s.life, Life::Exited { code: None });
    assert_eq!(shown(&s).error_code, Some(ErrorCode::ExecutableFailed));
}

#[test]
fn stopped_by_anyone_but_berth_is_suspended_until_reboot() {
    for policy in [Always, OnFailure, Never] {
        let (s, _) = row(
            running(),
            Input::Killed(Kill {
                at: 900,
                signal: Some(15),
            }),
            policy,
            0,
        );
        let (s, _) = row(s.life, died(0), policy, 0);
        assert_eq!(s.life, Life::Suspended { at: Some(900) }, "{policy}");
        assert!(s
            .effects
            .contains(&Effect::ManualStop { exit_code: Some(0) }));
        assert!(s.effects.contains(&Effect::SaveNow));
        assert_eq!(shown(&s).status, Status::Stopped);
    }
}

#[test]
fn a_signal_the_process_survives_is_not_a_manual_stop() {
    // `docker kill -s HUP`, and later an exit of its own.
    let (s, _) = row(
        running(),
        Input::Killed(Kill {
            at: 900,
            signal: Some(1),
        }),
        Always,
        0,
    );
    let (s, _) = row(s.life, died(3), Always, 0);
    assert!(matches!(s.life, Life::Starting { counted: true, .. }));
    // Killed by that very signal: a manual stop.
    let (s, _) = row(
        running(),
        Input::Killed(Kill {
            at: 900,
            signal: Some(1),
        }),
        Always,
        0,
    );
    let (s, _) = row(s.life, died(129), Always, 0);
    assert_eq!(s.life, Life::Suspended { at: Some(900) });
}

#[test]
fn removed_by_hand_is_suspended_once() {
    let (s, _) = row(running(), Input::Removed, Always, 0);
    assert_eq!(s.life, Life::Suspended { at: None });
    let (again, _) = row(s.life, Input::Removed, Always, 0);
    assert!(again.effects.is_empty());
}

#[test]
fn started_again_by_hand_after_such_a_stop_resumes_the_policy() {
    let (s, _) = row(
        Life::Suspended { at: None },
        Input::StartedByHand,
        Always,
        0,
    );
    assert_eq!(s.life, running());
    assert!(s.effects.contains(&Effect::SaveNow));
}

#[test]
fn interrupted_by_a_reboot_or_engine_restart() {
    for (policy, want) in [
        (Always, "restart"),
        (OnFailure, "restart"),
        (Never, "stopped"),
    ] {
        let (s, _) = row(
            Life::Idle,
            Input::Found {
                happening: Happening::Interrupted,
                code: Some(143),
                ran_for: None,
            },
            policy,
            0,
        );
        match want {
            "restart" => assert!(s.effects.contains(&Effect::Restart {
                after: Exit::Interruption
            })),
            _ => assert_eq!(s.life, Life::Interrupted),
        }
    }
}

#[test]
fn had_exited_before_the_reboot() {
    let found = |code| Input::Found {
        happening: Happening::ExitedBeforeReboot { code },
        code: Some(code),
        ran_for: None,
    };
    let (s, _) = row(Life::Exited { code: Some(0) }, found(0), OnFailure, 0);
    assert_eq!(s.life, Life::Exited { code: Some(0) });
    assert_eq!(shown(&s).status, Status::Completed);
    let (s, _) = row(Life::Exited { code: Some(2) }, found(2), OnFailure, 0);
    assert!(matches!(s.life, Life::Starting { counted: true, .. }));
    let (s, _) = row(Life::Exited { code: Some(2) }, found(2), Never, 0);
    assert_eq!(shown(&s).status, Status::Error);
}

#[test]
fn the_back_off_over_restarts_counted() {
    let (s, _) = row(
        Life::BackingOff {
            due: Instant::now(),
            after: Exit::Code(1),
        },
        Input::Due,
        Always,
        2,
    );
    assert_eq!(
        s.effects,
        vec![Effect::Restart {
            after: Exit::Code(1)
        }]
    );
}

#[test]
fn the_engine_lost_keeps_the_life_and_shows_unknown() {
    let (s, _) = row(running(), Input::EngineLost, Always, 0);
    assert_eq!(s.life, running());
    assert_eq!(shown(&s).status, Status::Unknown);
    assert_eq!(shown(&s).error_code, Some(ErrorCode::EngineUnreachable));
}

#[test]
fn an_update_keeps_a_running_container_until_the_new_one_proves_itself() {
    let (s, now) = row(
        running(),
        Input::Replace {
            next: "new".into(),
            current: Some("old".into()),
        },
        Always,
        0,
    );
    let rep = Replacement {
        next: "new".into(),
        previous: Some("old".into()),
    };
    assert_eq!(s.life, Life::Replacing(rep.clone()));
    assert!(s.effects.contains(&Effect::Swap(rep)));
    let (s, _) = row(s.life, Input::Swapped, Always, 0);
    assert!(matches!(s.life, Life::Proving { ref previous, .. } if previous == "old"));
    let (s, _) = row(s.life, Input::Proven, Always, 0);
    assert_eq!(s.life, running());
    assert_eq!(
        s.effects,
        vec![Effect::DropPrevious {
            previous: "old".into()
        }]
    );
    let _ = now;
}

#[test]
fn a_crash_looping_executable_is_updated_at_once() {
    let (s, _) = row(
        Life::BackingOff {
            due: Instant::now(),
            after: Exit::Code(1),
        },
        Input::Replace {
            next: "new".into(),
            current: Some("old".into()),
        },
        Always,
        3,
    );
    assert_eq!(
        s.life,
        Life::Replacing(Replacement {
            next: "new".into(),
            previous: None
        })
    );
    let (s, _) = row(s.life, Input::Swapped, Always, 3);
    assert_eq!(s.life, running());
}

#[test]
fn a_new_version_that_exits_within_min_ready_is_rolled_back() {
    let proving = Life::Proving {
        until: Instant::now() + SECOND,
        previous: "old".into(),
        killed: None,
    };
    let (s, _) = row(proving, died(1), Always, 0);
    assert_eq!(s.life, Life::RollingBack);
    assert!(s.effects.contains(&Effect::RollBack {
        previous: "old".into(),
        reason: "exit code 1 within min_ready_secs".into(),
        error_code: ErrorCode::ExecutableFailed,
    }));
    let (s, _) = row(s.life, Input::Started, Always, 0);
    assert_eq!(s.life, running());
}

#[test]
fn a_new_version_that_cannot_start_is_rolled_back() {
    let (s, _) = row(
        Life::Replacing(Replacement {
            next: "new".into(),
            previous: Some("old".into()),
        }),
        Input::SwapFailed {
            reason: "exec: \"nope\"".into(),
        },
        Always,
        0,
    );
    assert_eq!(s.life, Life::RollingBack);
}

#[test]
fn an_update_during_a_start_waits_for_it_then_replaces_at_once() {
    let (s, _) = row(
        Life::Starting {
            counted: false,
            then: None,
        },
        Input::Replace {
            next: "new".into(),
            current: Some("old".into()),
        },
        Always,
        0,
    );
    let (s, _) = row(s.life, Input::Started, Always, 0);
    assert!(matches!(
        s.life,
        Life::Replacing(Replacement { previous: None, .. })
    ));
}

#[test]
fn retiring_removes_and_ignores_everything_after() {
    let (s, _) = row(running(), Input::Retire, Always, 0);
    assert_eq!(s.life, Life::Retiring { retry_at: None });
    assert!(s.effects.contains(&Effect::Remove));
    let (s, _) = row(s.life, died(1), Always, 0);
    assert!(s.effects.is_empty());
    // A start in flight: its answer removes the container.
    let (s, _) = row(
        Life::Starting {
            counted: false,
            then: None,
        },
        Input::Retire,
        Always,
        0,
    );
    assert!(!s.effects.contains(&Effect::Remove));
}

#[test]
fn what_does_not_apply_leaves_the_state_as_it_is() {
    let (s, _) = row(Life::Exited { code: Some(0) }, Input::Due, Always, 0);
    assert_eq!(s.life, Life::Exited { code: Some(0) });
    assert!(s.effects.is_empty());
}

#[test]
fn unhealthy_under_always_and_on_failure_is_a_counted_restart_at_once() {
    for policy in [Always, OnFailure] {
        let (s, _) = row(
            running(),
            Input::Unhealthy {
                reason: "exec probe failed 3 times".into(),
            },
            policy,
            2,
        );
        assert_eq!(
            s.life,
            Life::Starting {
                counted: true,
                then: None
            },
            "{policy}"
        );
        let after = Exit::Unhealthy("exec probe failed 3 times".into());
        assert!(s.effects.contains(&Effect::Restart {
            after: after.clone()
        }));
        assert_eq!(after.describe(), "unhealthy: exec probe failed 3 times");
        assert_eq!(
            shown(&s).reason.as_deref(),
            Some("restarting after unhealthy: exec probe failed 3 times")
        );
        assert_eq!(s.backoff, Backoff { consecutive: 2 });
    }
}

#[test]
fn unhealthy_under_never_is_error_dep_e152_and_left_running() {
    let (s, _) = row(
        running(),
        Input::Unhealthy {
            reason: "GET http://127.0.0.1/ answered 500".into(),
        },
        Never,
        0,
    );
    assert_eq!(s.life, running());
    let reason = "unhealthy: GET http://127.0.0.1/ answered 500; restart policy never";
    assert!(s.effects.contains(&Effect::Failed {
        error_code: ErrorCode::ExecutableFailed,
        exit_code: None,
        reason: reason.into(),
    }));
    assert_eq!(shown(&s).status, Status::Error);
    assert_eq!(shown(&s).error_code, Some(ErrorCode::ExecutableFailed));
    assert!(!s
        .effects
        .iter()
        .any(|e| matches!(e, Effect::Restart { .. } | Effect::Remove)));
}

#[test]
fn a_new_version_unhealthy_within_min_ready_is_rolled_back() {
    let proving = Life::Proving {
        until: Instant::now() + Duration::from_secs(10),
        previous: "old".into(),
        killed: None,
    };
    let (s, _) = row(
        proving,
        Input::Unhealthy {
            reason: "connection refused".into(),
        },
        Always,
        0,
    );
    assert_eq!(s.life, Life::RollingBack);
    assert!(s.effects.contains(&Effect::RollBack {
        previous: "old".into(),
        reason: "unhealthy within min_ready_secs: connection refused".into(),
        error_code: ErrorCode::ExecutableFailed,
    }));
}

#[test]
fn unhealthy_while_not_running_changes_nothing() {
    for life in [
        Life::Idle,
        Life::Exited { code: Some(1) },
        Life::Interrupted,
    ] {
        let (s, _) = row(
            life.clone(),
            Input::Unhealthy { reason: "x".into() },
            Always,
            0,
        );
        assert_eq!(s.life, life);
        assert!(s.effects.is_empty());
    }
}
