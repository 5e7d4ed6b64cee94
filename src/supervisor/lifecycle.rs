//! One executable's lifecycle (SPEC 6 and 8): the states it can be in, what
//! can happen to it, and the pure transition table between them. The loop
//! feeds each happening in and carries the effects out; nothing here awaits,
//! reads a clock or touches the engine, so every row is a plain unit test.
//!
//! ```text
//!            Launch                Started
//!   Idle ───────────► Starting ─────────────► Running ◄──────────────┐
//!    ▲                 │  ▲  StartRefused        │ Died / Found       │
//!    │ Lost            │  │  (policy: retry)     ▼                    │
//!    └─────────────────┘  └──── BackingOff ◄── decide(policy) ──► Exited
//!                               (Due)              │                  (Completed / Error)
//!                                                  ├──► Suspended (manual stop) ──StartedByHand──┘
//!                                                  └──► Interrupted (never)
//!   Running ──Unhealthy──► Starting (counted; berth stops it first) | Running + Error (never)
//!   Proving ──Unhealthy──► RollingBack
//!   Replace: any ──► Replacing ──Swapped──► Proving ──Proven──► Running
//!                        │                     │ Died / SwapFailed
//!                        └─────────────────────┴──► RollingBack ──Started──► Running (previous)
//!   Retire: any ──► Retiring (stop and remove; its count ends)
//! ```

use std::time::Duration;

use crate::model::{ErrorCode, RestartPolicy, Status};
use crate::policy::{decide, Decision, Happening};

mod states;
pub use states::*;

pub fn exit_reason(code: i64, policy: RestartPolicy) -> String {
    format!("exited with code {code}; restart policy {policy}")
}

/// The transition table. Every arm states its rule; a happening that does
/// not apply to the state leaves it as it is (the fallback at the end).
pub fn step(life: &Life, input: Input, ctx: &Ctx) -> Step {
    use Input::*;
    use Life::*;
    match (life, input) {
        // The executable or its deployment is gone: from any state.
        (Retiring { .. }, Retire) => Step::to(life.clone(), ctx, vec![]),
        // A call in flight: its answer removes the container.
        (Starting { .. } | Replacing(_) | RollingBack, Retire) => Step::to(
            Retiring { retry_at: None },
            ctx,
            vec![Effect::Show(Shown::new(
                Status::Pending,
                Some("stopping".into()),
                None,
            ))],
        ),
        (_, Retire) => Step::to(
            Retiring { retry_at: None },
            ctx,
            vec![
                Effect::Show(Shown::new(Status::Pending, Some("stopping".into()), None)),
                Effect::Remove,
            ],
        ),
        (Retiring { .. }, _) => Step::to(life.clone(), ctx, vec![]),

        // Provisioning starts what has no running container.
        (
            Idle | Exited { .. } | Suspended { .. } | Interrupted | BackingOff { .. },
            Launch { restart },
        ) => {
            let counted = restart.is_some();
            let effect = match restart {
                Some(after) => Effect::Restart { after },
                None => Effect::Start,
            };
            Step::to(
                Starting {
                    counted,
                    then: None,
                },
                ctx,
                vec![effect],
            )
        }

        // The engine answers a start.
        (
            Starting {
                then: Some(rep),
                counted,
            },
            Started,
        ) => {
            let mut effects = vec![Effect::Swap(rep.clone()), updating()];
            if *counted {
                effects.insert(0, Effect::Restarted);
            }
            Step::to(Replacing(rep.clone()), ctx, effects)
        }
        (Starting { counted, .. }, Started) => {
            let mut effects = vec![Effect::Show(Shown::running())];
            if *counted {
                effects.push(Effect::Restarted);
            }
            Step::to(Running { killed: None }, ctx, effects)
        }
        // A crash-looping executable is updated at once, whatever its start did.
        (
            Starting {
                then: Some(rep), ..
            },
            StartRefused { .. } | ImageMissing { .. },
        ) => Step::to(
            Replacing(rep.clone()),
            ctx,
            vec![Effect::Swap(rep.clone()), updating()],
        ),
        (Starting { .. } | RollingBack, StartRefused { reason }) => refused(reason, ctx),
        (Starting { .. } | RollingBack, ImageMissing { reason }) => Step::to(
            Idle,
            ctx,
            vec![
                Effect::Show(Shown::new(
                    Status::Error,
                    Some(reason),
                    Some(ErrorCode::ImageUnavailable),
                )),
                Effect::Repull,
            ],
        ),
        (Starting { .. } | Replacing(_) | RollingBack, Lost) => Step::to(Idle, ctx, vec![]),
        // The previous version runs again.
        (RollingBack, Started) => Step::to(
            Running { killed: None },
            ctx,
            vec![Effect::Show(Shown::running())],
        ),

        // A kill berth did not send: the exit that follows decides.
        (Running { .. }, Killed(kill)) => Step::to(Running { killed: Some(kill) }, ctx, vec![]),
        (
            Proving {
                until, previous, ..
            },
            Killed(kill),
        ) => Step::to(
            Proving {
                until: *until,
                previous: previous.clone(),
                killed: Some(kill),
            },
            ctx,
            vec![],
        ),

        // An exit: the restart table of SPEC 6.
        (Running { killed }, Died { code, at, ran_for }) => {
            let happening = match killed {
                Some(kill) if kill.explains(code) => Happening::StoppedByHand,
                _ => Happening::Exited { code },
            };
            let at = killed.map(|k| k.at).unwrap_or(at);
            decided(life, happening, Some(code), ran_for, Some(at), ctx)
        }
        // A manual stop while an update proves itself: the operator's word
        // holds, and the update with it.
        (
            Proving {
                previous,
                killed: Some(kill),
                ..
            },
            Died { code, .. },
        ) if kill.explains(code) => {
            let mut step = decided(
                life,
                Happening::StoppedByHand,
                Some(code),
                None,
                Some(kill.at),
                ctx,
            );
            step.effects.push(Effect::DropPrevious {
                previous: previous.clone(),
            });
            step
        }
        // The new version exits within `min_ready_secs`: roll back.
        (Proving { previous, .. }, Died { code, .. }) => rollback(
            previous,
            format!("exit code {code} within min_ready_secs"),
            ErrorCode::ExecutableFailed,
            ctx,
        ),
        (Proving { previous, .. }, Removed) => {
            let mut step = decided(life, Happening::StoppedByHand, None, None, None, ctx);
            step.effects.push(Effect::DropPrevious {
                previous: previous.clone(),
            });
            step
        }
        (
            Proving {
                previous, killed, ..
            },
            Proven,
        ) => Step::to(
            Running { killed: *killed },
            ctx,
            vec![Effect::DropPrevious {
                previous: previous.clone(),
            }],
        ),

        // A liveness probe gave up on it: the restart table's row for
        // unhealthy (SPEC 6). `always` and `on-failure` restart it, counted,
        // at once (berth stops it first: the probe's own period is the pace);
        // `never` reports it and leaves it running.
        (Running { killed }, Unhealthy { reason }) => match ctx.policy {
            RestartPolicy::Never => {
                let reason = format!("unhealthy: {reason}; restart policy never");
                Step::to(
                    Running { killed: *killed },
                    ctx,
                    vec![
                        Effect::Failed {
                            error_code: ErrorCode::ExecutableFailed,
                            exit_code: None,
                            reason: reason.clone(),
                        },
                        Effect::Show(Shown::new(
                            Status::Error,
                            Some(reason),
                            Some(ErrorCode::ExecutableFailed),
                        )),
                    ],
                )
            }
            _ => {
                let after = Exit::Unhealthy(reason);
                Step::to(
                    Starting {
                        counted: true,
                        then: None,
                    },
                    ctx,
                    vec![
                        Effect::Show(Shown::new(
                            Status::Pending,
                            Some(format!("restarting after {}", after.describe())),
                            None,
                        )),
                        Effect::Restart { after },
                    ],
                )
            }
        },
        // An update's new version must also stay healthy while it proves itself.
        (Proving { previous, .. }, Unhealthy { reason }) => rollback(
            previous,
            format!("unhealthy within min_ready_secs: {reason}"),
            ErrorCode::ExecutableFailed,
            ctx,
        ),

        // Started again by hand after a stop: the policy applies again.
        (
            Suspended { .. } | Exited { .. } | Interrupted | BackingOff { .. } | Idle,
            StartedByHand,
        ) => decided(life, Happening::StartedByHand, None, None, None, ctx),

        // Removed by someone else: a manual stop, unless it already was one.
        (Suspended { .. }, Removed) => Step::to(life.clone(), ctx, vec![]),
        (Running { .. } | BackingOff { .. } | Exited { .. } | Interrupted | Idle, Removed) => {
            decided(life, Happening::StoppedByHand, None, None, None, ctx)
        }

        // The back-off is over.
        (BackingOff { after, .. }, Due) => Step::to(
            Starting {
                counted: true,
                then: None,
            },
            ctx,
            vec![Effect::Restart {
                after: after.clone(),
            }],
        ),

        // What happened while berth was not looking.
        (
            Idle
            | Running { .. }
            | Exited { .. }
            | Suspended { .. }
            | Interrupted
            | BackingOff { .. },
            Found {
                happening,
                code,
                ran_for,
            },
        ) => decided(life, happening, code, ran_for, None, ctx),

        // The engine went away: berth cannot tell; the reconcile after it
        // decides again (and no timer fires meanwhile).
        (_, EngineLost) => Step::to(life.clone(), ctx, vec![unreachable()]),

        // An update's new container is ready: a container running well is
        // kept until the new one has proven itself; any other is no better
        // than the new one and goes at once.
        (
            Starting {
                counted,
                then: None,
            },
            Replace { next, .. },
        ) => Step::to(
            Starting {
                counted: *counted,
                then: Some(Replacement {
                    next,
                    previous: None,
                }),
            },
            ctx,
            vec![],
        ),
        (
            Running { .. }
            | BackingOff { .. }
            | Exited { .. }
            | Suspended { .. }
            | Interrupted
            | Idle
            | Proving { .. },
            Replace { next, current },
        ) => {
            let keep = matches!(life, Running { .. }) && current.is_some();
            let rep = Replacement {
                next,
                previous: if keep { current } else { None },
            };
            Step::to(
                Replacing(rep.clone()),
                ctx,
                vec![Effect::Swap(rep), updating()],
            )
        }
        (Replacing(rep), Swapped) => match &rep.previous {
            Some(previous) if !ctx.min_ready.is_zero() => Step::to(
                Proving {
                    until: ctx.now + ctx.min_ready,
                    previous: previous.clone(),
                    killed: None,
                },
                ctx,
                vec![Effect::Show(Shown::running())],
            ),
            Some(previous) => Step::to(
                Running { killed: None },
                ctx,
                vec![
                    Effect::Show(Shown::running()),
                    Effect::DropPrevious {
                        previous: previous.clone(),
                    },
                ],
            ),
            None => Step::to(
                Running { killed: None },
                ctx,
                vec![Effect::Show(Shown::running())],
            ),
        },
        (Replacing(rep), SwapFailed { reason }) => match &rep.previous {
            Some(previous) => rollback(previous, reason, ErrorCode::ExecutableFailed, ctx),
            None => refused(reason, ctx),
        },

        // Anything else does not apply to the state it finds.
        (_, _) => Step::to(life.clone(), ctx, vec![]),
    }
}

fn updating() -> Effect {
    Effect::Show(Shown::new(Status::Pending, Some("updating".into()), None))
}

fn unreachable() -> Effect {
    Effect::Show(Shown::new(
        Status::Unknown,
        Some("docker engine unreachable".into()),
        Some(ErrorCode::EngineUnreachable),
    ))
}

fn rollback(previous: &str, reason: String, error_code: ErrorCode, ctx: &Ctx) -> Step {
    Step::to(
        Life::RollingBack,
        ctx,
        vec![
            Effect::Show(Shown::new(
                Status::Pending,
                Some(format!("rolling back: {reason}")),
                None,
            )),
            Effect::RollBack {
                previous: previous.to_string(),
                reason,
                error_code,
            },
        ],
    )
}

/// A start the engine refused: retried with back-off, `Error` meanwhile
/// (`never`: `Error` for good).
fn refused(reason: String, ctx: &Ctx) -> Step {
    let failed = Effect::Failed {
        error_code: ErrorCode::ExecutableFailed,
        exit_code: None,
        reason: reason.clone(),
    };
    match decide(ctx.policy, &Happening::StartFailed) {
        Decision::Restart => {
            let mut backoff = ctx.backoff;
            let delay = backoff.next_delay(ctx.settings, None);
            Step {
                life: Life::BackingOff {
                    due: ctx.now + delay,
                    after: Exit::FailedStart(reason.clone()),
                },
                backoff,
                effects: vec![
                    failed,
                    Effect::Show(Shown::new(
                        Status::Error,
                        Some(format!("{reason} (retrying in {})", human(delay))),
                        Some(ErrorCode::ExecutableFailed),
                    )),
                ],
            }
        }
        _ => Step::to(
            Life::Exited { code: None },
            ctx,
            vec![
                failed,
                Effect::Show(Shown::new(
                    Status::Error,
                    Some(reason),
                    Some(ErrorCode::ExecutableFailed),
                )),
            ],
        ),
    }
}

/// Applies the restart table to what happened.
fn decided(
    life: &Life,
    happening: Happening,
    code: Option<i64>,
    ran_for: Option<Duration>,
    at: Option<i64>,
    ctx: &Ctx,
) -> Step {
    let policy = ctx.policy;
    let failure = code
        .filter(|c| *c != 0)
        .map(|_| ErrorCode::ExecutableFailed);
    match decide(policy, &happening) {
        Decision::Restart => {
            let after = match (&happening, code) {
                (Happening::StartFailed, _) => Exit::FailedStart(String::new()),
                (Happening::Interrupted, _) => Exit::Interruption,
                (_, Some(c)) => Exit::Code(c),
                (_, None) => Exit::Interruption,
            };
            let mut backoff = ctx.backoff;
            let delay = backoff.next_delay(ctx.settings, ran_for);
            if delay.is_zero() {
                return Step {
                    life: Life::Starting {
                        counted: true,
                        then: None,
                    },
                    backoff,
                    effects: vec![
                        Effect::Show(
                            Shown::new(
                                Status::Pending,
                                Some(format!("restarting after {}", after.describe())),
                                None,
                            )
                            .exit(code),
                        ),
                        Effect::Restart { after },
                    ],
                };
            }
            let reason = format!(
                "restarting in {} after {} (back-off)",
                human(delay),
                after.describe()
            );
            Step {
                life: Life::BackingOff {
                    due: ctx.now + delay,
                    after,
                },
                backoff,
                effects: vec![Effect::Show(
                    Shown::new(Status::Pending, Some(reason), failure).exit(code),
                )],
            }
        }
        Decision::Complete => Step::to(
            Life::Exited { code: Some(0) },
            ctx,
            vec![Effect::Show(
                Shown::new(Status::Completed, None, None).exit(code),
            )],
        ),
        Decision::Fail => {
            let code = code.unwrap_or(1);
            let reason = exit_reason(code, policy);
            Step::to(
                Life::Exited { code: Some(code) },
                ctx,
                vec![
                    Effect::Failed {
                        error_code: ErrorCode::ExecutableFailed,
                        exit_code: Some(code),
                        reason: reason.clone(),
                    },
                    Effect::Show(
                        Shown::new(
                            Status::Error,
                            Some(reason),
                            Some(ErrorCode::ExecutableFailed),
                        )
                        .exit(Some(code)),
                    ),
                ],
            )
        }
        Decision::SuspendUntilReboot => Step::to(
            Life::Suspended { at },
            ctx,
            vec![
                Effect::Show(
                    Shown::new(Status::Stopped, Some(MANUAL_STOP_REASON.into()), None).exit(code),
                ),
                Effect::ManualStop { exit_code: code },
                Effect::SaveNow,
            ],
        ),
        Decision::LeaveStopped => Step::to(
            Life::Interrupted,
            ctx,
            vec![Effect::Show(
                Shown::new(Status::Stopped, Some(NEVER_INTERRUPTED_REASON.into()), None).exit(code),
            )],
        ),
        Decision::Resume => Step::to(
            Life::Running { killed: None },
            ctx,
            vec![Effect::Show(Shown::running()), Effect::SaveNow],
        ),
        Decision::Unchanged => Step::to(
            life.clone(),
            ctx,
            vec![Effect::Show(settled(life, policy).exit(code))],
        ),
    }
}

/// What a settled state shows: the document of an executable that has not
/// run since berth last looked.
pub fn settled(life: &Life, policy: RestartPolicy) -> Shown {
    match life {
        Life::Exited { code: Some(0) } => Shown::new(Status::Completed, None, None).exit(Some(0)),
        Life::Exited { code: Some(code) } => Shown::new(
            Status::Error,
            Some(exit_reason(*code, policy)),
            Some(ErrorCode::ExecutableFailed),
        )
        .exit(Some(*code)),
        Life::Exited { code: None } => Shown::new(
            Status::Error,
            Some("could not be started; restart policy never".into()),
            Some(ErrorCode::ExecutableFailed),
        ),
        Life::Suspended { .. } => {
            Shown::new(Status::Stopped, Some(MANUAL_STOP_REASON.into()), None)
        }
        Life::Interrupted => {
            Shown::new(Status::Stopped, Some(NEVER_INTERRUPTED_REASON.into()), None)
        }
        Life::Running { .. } | Life::Proving { .. } => Shown::running(),
        _ => Shown::new(Status::Pending, None, None),
    }
}

pub fn human(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests;
