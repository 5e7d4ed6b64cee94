//! berth: deployments from TOML run as supervised containers, reported over MQTT.

pub mod backoff;
pub mod config;
pub mod control;
pub mod model;
pub mod notify;
pub mod policy;
pub mod report;
pub mod runtime;
pub mod state;
pub mod supervisor;
pub mod watch;
