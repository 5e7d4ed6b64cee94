//! Crash-loop back-off arithmetic (SPEC 6), pure: the first restart after a
//! period of good running is immediate, each further consecutive failure
//! waits `initial`, doubling, up to `max`; a run of `reset_after` or longer
//! (or a reboot) starts the sequence again.

use std::time::Duration;

use crate::config::RestartSettings;

/// How many restarts in a row came without a good run in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Backoff {
    pub consecutive: u32,
}

impl Backoff {
    /// Records one more restart after an exit that came `ran_for` after the
    /// start, and returns how long to wait before it.
    pub fn next_delay(
        &mut self,
        settings: &RestartSettings,
        ran_for: Option<Duration>,
    ) -> Duration {
        if ran_for.is_some_and(|ran| ran >= settings.backoff_reset_after) {
            self.consecutive = 0;
        }
        let delay = delay_for(settings, self.consecutive);
        self.consecutive = self.consecutive.saturating_add(1);
        delay
    }

    /// A reboot starts the sequence again.
    pub fn reset(&mut self) {
        self.consecutive = 0;
    }
}

/// The wait before the restart that follows `consecutive` earlier ones.
pub fn delay_for(settings: &RestartSettings, consecutive: u32) -> Duration {
    if consecutive == 0 {
        return Duration::ZERO;
    }
    let doublings = (consecutive - 1).min(32);
    settings
        .backoff_initial
        .saturating_mul(1u32 << doublings.min(31))
        .min(settings.backoff_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RestartSettings {
        RestartSettings {
            backoff_initial: Duration::from_millis(1000),
            backoff_max: Duration::from_secs(300),
            backoff_reset_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn delays_grow_cap_and_reset() {
        let s = settings();
        // (ran for, expected delay): one row per consecutive exit.
        let rows: &[(u64, u64)] = &[
            (1, 0),    // first restart after good running: immediate
            (1, 1000), // then the initial delay
            (1, 2000), // doubling
            (1, 4000),
            (1, 8000),
            (1, 16000),
            (1, 32000),
            (1, 64000),
            (1, 128000),
            (1, 256000),
            (1, 300000), // capped at backoff_max
            (1, 300000),
            (60, 0),    // ran for backoff_reset_after: sequence starts again
            (59, 1000), // just short of it: keeps growing
            (3600, 0),
        ];
        let mut b = Backoff::default();
        for (i, &(ran, want)) in rows.iter().enumerate() {
            let got = b.next_delay(&s, Some(Duration::from_secs(ran)));
            assert_eq!(got, Duration::from_millis(want), "row {i}: ran {ran}s");
        }
    }

    #[test]
    fn unknown_run_time_keeps_the_sequence() {
        let s = settings();
        let mut b = Backoff { consecutive: 2 };
        assert_eq!(b.next_delay(&s, None), Duration::from_millis(2000));
    }

    #[test]
    fn reset_makes_the_next_restart_immediate() {
        let s = settings();
        let mut b = Backoff { consecutive: 7 };
        b.reset();
        assert_eq!(b.next_delay(&s, None), Duration::ZERO);
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let s = settings();
        assert_eq!(delay_for(&s, u32::MAX), s.backoff_max);
    }
}
