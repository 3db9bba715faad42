//! The controller's settings: the `retention` section of the engine's configuration.
//! Durations are humantime strings ("90s", "15m", "24h"). Every value is checked by
//! [`RetentionSettings::validate`], whose errors name the key, the value and what is allowed.

use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::schedule::Schedule;

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);
/// 100 years as humantime counts them (365.25 days each).
const CENTURY: Duration = Duration::from_secs(3_155_760_000);

pub const DEFAULT_SESSIONS_INTERVAL: Duration = HOUR;
pub const DEFAULT_ANONYMOUS_TTL: Duration = DAY;
pub const DEFAULT_HISTORY_INTERVAL: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_QUEUE_ITEMS_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Rows per batch. At the ~90k rows/s an index-ordered delete reaches on a 2-core machine, a
/// 5,000-row batch commits in roughly 50 ms: short locks, few round trips.
pub const DEFAULT_BATCH_SIZE: u32 = 5_000;
pub const DEFAULT_MAX_RUN_TIME: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// `retention.*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    pub sessions: SessionsSettings,
    pub queue_items: QueueItemsSettings,
    pub task_history: TaskHistorySettings,
}

/// `retention.sessions.*`: the sessions task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsSettings {
    /// Time between runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Anonymous sessions (no user) older than this are deleted even before they expire.
    #[serde(with = "humantime_serde")]
    pub anonymous_ttl: Duration,
    /// Rows deleted per batch (one short transaction each).
    pub batch_size: u32,
    /// A run stops between batches once it has run this long; the next run carries on.
    #[serde(with = "humantime_serde")]
    pub max_run_time: Duration,
    /// Cap on each statement of a batch.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Cap on waiting for a lock within a batch.
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
}

impl Default for SessionsSettings {
    fn default() -> Self {
        SessionsSettings {
            interval: DEFAULT_SESSIONS_INTERVAL,
            anonymous_ttl: DEFAULT_ANONYMOUS_TTL,
            batch_size: DEFAULT_BATCH_SIZE,
            max_run_time: DEFAULT_MAX_RUN_TIME,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        }
    }
}

impl SessionsSettings {
    pub fn schedule(&self) -> Schedule {
        Schedule { interval: self.interval, max_run_time: self.max_run_time }
    }
}

/// `retention.queue_items.*`. Accepted and validated now; the task that uses it arrives with
/// run-history retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueItemsSettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for QueueItemsSettings {
    fn default() -> Self {
        QueueItemsSettings { interval: DEFAULT_QUEUE_ITEMS_INTERVAL }
    }
}

/// `retention.task_history.*`. Accepted and validated now; the task that uses it arrives with
/// run-history retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskHistorySettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for TaskHistorySettings {
    fn default() -> Self {
        TaskHistorySettings { interval: DEFAULT_HISTORY_INTERVAL }
    }
}

/// One invalid setting: which key, what it held, what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub key: String,
    pub value: String,
    pub allowed: String,
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {:?} is not allowed: {}", self.key, self.value, self.allowed)
    }
}

impl RetentionSettings {
    /// Every out-of-range value, each named by its full key (`prefix` is this section's key,
    /// normally `retention`).
    pub fn validate(&self, prefix: &str) -> Vec<SettingError> {
        let mut errors = Vec::new();
        let s = &self.sessions;
        let key = |name: &str| format!("{prefix}.sessions.{name}");
        check_duration(&mut errors, key("interval"), s.interval, SECOND..=7 * DAY);
        check_duration(&mut errors, key("anonymous_ttl"), s.anonymous_ttl, MINUTE..=CENTURY);
        check_duration(&mut errors, key("max_run_time"), s.max_run_time, SECOND..=DAY);
        check_duration(&mut errors, key("statement_timeout"), s.statement_timeout, Duration::from_millis(100)..=HOUR);
        check_duration(&mut errors, key("lock_timeout"), s.lock_timeout, Duration::from_millis(10)..=10 * MINUTE);
        if !(1..=100_000).contains(&s.batch_size) {
            errors.push(SettingError {
                key: key("batch_size"),
                value: s.batch_size.to_string(),
                allowed: "a whole number of rows from 1 to 100000".into(),
            });
        }
        check_duration(&mut errors, format!("{prefix}.queue_items.interval"), self.queue_items.interval, SECOND..=7 * DAY);
        check_duration(&mut errors, format!("{prefix}.task_history.interval"), self.task_history.interval, SECOND..=7 * DAY);
        errors
    }
}

fn check_duration(errors: &mut Vec<SettingError>, key: String, value: Duration, allowed: RangeInclusive<Duration>) {
    if !allowed.contains(&value) {
        errors.push(SettingError {
            key,
            value: humantime::format_duration(value).to_string(),
            allowed: format!(
                "a duration from {} to {}",
                humantime::format_duration(*allowed.start()),
                humantime::format_duration(*allowed.end())
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(RetentionSettings::default().validate("retention"), vec![]);
    }

    #[test]
    fn each_out_of_range_value_is_named() {
        let mut settings = RetentionSettings::default();
        settings.sessions.interval = Duration::ZERO;
        settings.sessions.batch_size = 0;
        settings.sessions.anonymous_ttl = Duration::from_secs(59);
        let errors = settings.validate("retention");
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["retention.sessions.interval", "retention.sessions.anonymous_ttl", "retention.sessions.batch_size"]);
        assert_eq!(
            errors[1].to_string(),
            "retention.sessions.anonymous_ttl = \"59s\" is not allowed: a duration from 1m to 100years"
        );
    }
}
