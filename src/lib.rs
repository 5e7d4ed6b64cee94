//! berth: deployments from TOML run as supervised containers, reported over MQTT.
//!
//! ```text
//!  config ──► supervisor ◄── runtime (ContainerRuntime: docker | fake)
//!               │   │
//!   policy, backoff   state (restarts.log + state.json, by a writer task)
//!               │
//!               ▼
//!   report (Reporter) ──► control (snapshot, berth status) ──► report::mqtt
//! ```
//!
//! - [`config`] turns `berth.toml` and the deployment files into validated
//!   settings and specs ([`model`]), every error with file, line and column.
//! - [`supervisor`] is the loop: engine events, timers and the results of
//!   engine calls in; restart decisions ([`policy`], [`backoff`]) and status
//!   documents out. It never waits for I/O: engine calls, state writes and
//!   file reads run as tasks that answer with messages. It is generic over
//!   [`runtime::ContainerRuntime`] and [`report::Reporter`], so it runs
//!   against the real Docker engine and broker or against fakes.
//! - [`state`] is what survives berth: restart counts (written before each
//!   restart, exactly once), manual stops, the boot id, the engine event
//!   position, the ROS master's owner.
//! - [`probe`] runs the `tcp` and `http` liveness probes (the engine runs
//!   `exec` ones as healthchecks).
//! - [`remote`] verifies signed commands from MQTT (SPEC 10) and carries
//!   them out: deployment files written or removed, operator actions
//!   (`stop`, `start`, `restart`) handed to the supervisor; [`fleet`] is the
//!   operator's side, `berth fleet`.
//! - [`control`] serves the latest documents and the operator actions on a
//!   local socket; [`notify`]
//!   speaks systemd's notify protocol; [`watch`] turns changes in the
//!   deployments directory into reloads; [`trace`] is the optional restart
//!   trace that `berth-bench` reads (`berth run --trace-file`).
//!
//! `src/main.rs` wires the real adapters and maps errors to exit codes;
//! `docs/DESIGN.md` explains the choices.

pub mod backoff;
pub mod config;
pub mod control;
pub mod fleet;
pub mod model;
pub mod notify;
pub mod policy;
pub mod probe;
pub mod remote;
pub mod report;
pub mod runtime;
pub mod state;
pub mod supervisor;
pub mod trace;
pub mod watch;
