//! When a task runs: its interval with jitter, and capped exponential backoff after failures.
//! Pure functions of their inputs (the random draw aside), tested without a database.

use std::time::Duration;

/// A task's timing, read before every run so a changed setting applies without a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Time between the end of one run and the start of the next.
    pub interval: Duration,
    /// How long one run may delete before it stops between batches.
    pub max_run_time: Duration,
}

/// Each interval is stretched or shrunk by up to this fraction, so replicas started together
/// drift apart.
pub const JITTER: f64 = 0.1;
/// The first run waits a random part of the interval, at most this long.
pub const MAX_FIRST_DELAY: Duration = Duration::from_secs(30);
/// The first retry after a failure waits this long; each further failure doubles it...
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// ...up to this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(600);
/// A run that stopped at its deadline with work left is continued after this pause.
pub const CATCH_UP_PAUSE: Duration = Duration::from_secs(5);

/// A uniform random draw in `[0, 1)`.
pub type Draw = f64;

/// Delay before a task's first run: a random part of its interval, at most [`MAX_FIRST_DELAY`].
pub fn first_delay(interval: Duration, draw: Draw) -> Duration {
    interval.min(MAX_FIRST_DELAY).mul_f64(draw)
}

/// The interval, stretched or shrunk by up to [`JITTER`].
pub fn jittered(interval: Duration, draw: Draw) -> Duration {
    interval.mul_f64(1.0 - JITTER + 2.0 * JITTER * draw)
}

/// Delay after the `failures`-th consecutive failure (1 or more): [`BACKOFF_BASE`] doubled per
/// failure, capped at [`BACKOFF_CAP`], then jittered.
pub fn backoff(failures: u32, draw: Draw) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let delay = BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_CAP);
    jittered(delay, draw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        let mid = 0.5; // no jitter
        assert_eq!(backoff(1, mid), Duration::from_secs(5));
        assert_eq!(backoff(2, mid), Duration::from_secs(10));
        assert_eq!(backoff(3, mid), Duration::from_secs(20));
        assert_eq!(backoff(7, mid), Duration::from_secs(320));
        assert_eq!(backoff(8, mid), Duration::from_secs(600));
        assert_eq!(backoff(u32::MAX, mid), Duration::from_secs(600));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let hour = Duration::from_secs(3600);
        assert_eq!(jittered(hour, 0.0), Duration::from_secs(3240));
        assert_eq!(jittered(hour, 0.5), hour);
        assert!(jittered(hour, 0.999_999) < Duration::from_secs(3960));
        assert!(jittered(hour, 0.999_999) > Duration::from_secs(3959));
    }

    #[test]
    fn first_run_waits_a_random_part_of_the_interval_capped() {
        assert_eq!(
            first_delay(Duration::from_secs(10), 0.5),
            Duration::from_secs(5)
        );
        assert_eq!(
            first_delay(Duration::from_secs(3600), 0.5),
            Duration::from_secs(15)
        );
        assert_eq!(first_delay(Duration::from_secs(3600), 0.0), Duration::ZERO);
    }
}
