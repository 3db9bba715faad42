//! Refuses to delete when the clocks disagree. Every cutoff is computed from the database's
//! `now()`: a database clock that jumped forward (bad NTP, a restored snapshot of a VM) would
//! make rows due early. Before each run deletes anything, the database's clock is compared
//! with this process's wall clock, and with where it should be since the last check of this
//! process by the monotonic clock (which no one can set). Either past `retention.max_clock_skew`
//! fails the run, deleting nothing.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};

use crate::telemetry;

/// The database's clock at the last check that passed, and the boot-clock instant of that check.
static LAST_CHECK: Mutex<Option<(DateTime<Utc>, Duration)>> = Mutex::new(None);

/// Why the clocks cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error(
        "the database's clock ({database}) is {skew} {direction} this process's ({process}), more than \
         retention.max_clock_skew = {max}: nothing was deleted; fix the clocks (NTP) and the next run goes ahead"
    )]
    Skewed {
        database: DateTime<Utc>,
        process: DateTime<Utc>,
        skew: String,
        direction: &'static str,
        max: String,
    },
    #[error(
        "the database's clock jumped {jump} ahead since this process last checked it {elapsed} ago ({then} then, \
         {database} now), more than retention.max_clock_skew = {max}: nothing was deleted; once the database's \
         clock is known to be right, restart the engine"
    )]
    Jumped {
        then: DateTime<Utc>,
        database: DateTime<Utc>,
        elapsed: String,
        jump: String,
        max: String,
    },
}

/// When this process asked the database for a reading of its clock: the reading comes with
/// other work (the run's start reads `clock_timestamp()` in the statement that takes the lease),
/// and a run's cutoffs may start from it (it is no later than the run's first statement).
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    sent_wall: SystemTime,
    sent: Duration,
}

impl Asked {
    pub fn now() -> Asked {
        Asked {
            sent_wall: SystemTime::now(),
            sent: boot_clock(),
        }
    }

    /// Compares `database`, read by the database between [`Asked::now`] and this call, with this
    /// process's clocks; `Ok(database)` when they agree within `max_skew`.
    pub fn judge(
        self,
        database: DateTime<Utc>,
        max_skew: Duration,
    ) -> Result<DateTime<Utc>, ClockError> {
        let received = boot_clock();
        let round_trip = received.saturating_sub(self.sent);
        // The database read its clock somewhere within the round trip.
        let process: DateTime<Utc> = (self.sent_wall + round_trip / 2).into();
        telemetry::clock_skew((database - process).num_milliseconds() as f64 / 1000.0);
        let mut last = LAST_CHECK.lock().unwrap();
        let since_last = last.map(|(then, at)| (then, self.sent.saturating_sub(at)));
        let verdict = judge(
            database,
            process,
            since_last,
            max_skew + round_trip,
            max_skew,
        );
        match &verdict {
            Ok(()) => *last = Some((database, self.sent)),
            Err(ClockError::Skewed { .. }) => telemetry::clock_refused("skewed"),
            Err(ClockError::Jumped { .. }) => telemetry::clock_refused("jumped"),
        }
        verdict.map(|()| database)
    }
}

/// The verdict on the database's clock reading `database` while this process's read `process`,
/// given the last reading that passed and the time elapsed since by a clock nobody sets.
pub fn judge(
    database: DateTime<Utc>,
    process: DateTime<Utc>,
    since_last: Option<(DateTime<Utc>, Duration)>,
    allowed: Duration,
    max_skew: Duration,
) -> Result<(), ClockError> {
    let skew = database - process;
    let off = skew.abs().to_std().unwrap_or_default();
    if off > allowed {
        return Err(ClockError::Skewed {
            database,
            process,
            skew: human(off),
            direction: if skew > chrono::Duration::zero() {
                "ahead of"
            } else {
                "behind"
            },
            max: human(max_skew),
        });
    }
    if let Some((then, elapsed)) = since_last {
        let expected = then + chrono::Duration::from_std(elapsed).unwrap_or_default();
        if let Ok(jump) = (database - expected).to_std() {
            if jump > allowed {
                return Err(ClockError::Jumped {
                    then,
                    database,
                    elapsed: human(elapsed),
                    jump: human(jump),
                    max: human(max_skew),
                });
            }
        }
    }
    Ok(())
}

/// Time since boot, suspended time included (`CLOCK_BOOTTIME`): it cannot be set, and unlike the
/// monotonic clock it does not stand still while the machine sleeps.
fn boot_clock() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default()
}

fn human(duration: Duration) -> String {
    humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(300);

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    #[test]
    fn clocks_within_the_bound_pass_and_beyond_it_fail_either_way() {
        assert_eq!(judge(at(0), at(299), None, MAX, MAX), Ok(()));
        assert_eq!(judge(at(299), at(0), None, MAX, MAX), Ok(()));
        let ahead = judge(at(7200), at(0), None, MAX, MAX).unwrap_err();
        assert!(
            matches!(
                &ahead,
                ClockError::Skewed {
                    direction: "ahead of",
                    ..
                }
            ),
            "{ahead}"
        );
        assert!(
            ahead.to_string().contains("is 2h ahead of this process's"),
            "{ahead}"
        );
        assert!(
            ahead.to_string().contains("retention.max_clock_skew = 5m"),
            "{ahead}"
        );
        assert!(matches!(
            judge(at(0), at(301), None, MAX, MAX),
            Err(ClockError::Skewed {
                direction: "behind",
                ..
            })
        ));
    }

    /// Both wall clocks jumped together (one host, a bad NTP step): only the boot clock tells.
    #[test]
    fn a_jump_of_both_wall_clocks_is_caught_by_the_boot_clock() {
        let last = Some((at(0), Duration::from_secs(60)));
        assert_eq!(judge(at(60), at(60), last, MAX, MAX), Ok(()));
        assert_eq!(
            judge(at(360), at(360), last, MAX, MAX),
            Ok(()),
            "5 min of drift is allowed"
        );
        let jumped = judge(at(3660), at(3660), last, MAX, MAX).unwrap_err();
        assert!(matches!(jumped, ClockError::Jumped { .. }), "{jumped}");
        assert!(jumped.to_string().contains("jumped 1h ahead"), "{jumped}");
        // Backwards is not a danger to data: fewer rows are due.
        assert_eq!(judge(at(-3600), at(-3600), last, MAX, MAX), Ok(()));
    }
}
