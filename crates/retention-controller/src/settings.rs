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
/// The most rows an index-walk batch takes (batches adapt below it toward the batch duration).
/// At the ~90k rows/s an index-ordered delete reaches on a 2-core machine, 5,000 rows take
/// roughly 50 ms.
pub const DEFAULT_BATCH_SIZE: u32 = 5_000;
/// Tasks per history batch: each task takes its events and queue items with it.
pub const DEFAULT_HISTORY_BATCH_SIZE: u32 = 1_000;
pub const DEFAULT_MAX_RUN_TIME: Duration = Duration::from_secs(10 * 60);
/// The duration a paced batch aims at: each commit's WAL stays small (foreground commits queue
/// behind its flush). See docs/benchmarks.md for the measurements behind the paced defaults.
pub const DEFAULT_BATCH_TIME: Duration = Duration::from_millis(10);
/// The duration a full-speed batch aims at. With asynchronous commits a batch's fixed cost is
/// small: 50 ms batches purged the backlog as fast as 100-200 ms ones (0.78x a bare DELETE) and
/// leave room for a disk stall (batches of 2-3x the target were seen) under 250 ms.
pub const DEFAULT_FULL_SPEED_BATCH_TIME: Duration = Duration::from_millis(50);
/// Background runs pause this many times each batch's duration after it: at 1 the database is
/// the foreground's half of the time, and the foreground's p99 stayed within 1.4-1.9x of idle.
pub const DEFAULT_PAUSE_RATIO: f64 = 1.0;
/// With feedback, the least a paced run pauses after a batch (in multiples of its duration).
pub const DEFAULT_MIN_PAUSE_RATIO: f64 = 0.25;
/// With feedback, the most a paced run pauses after a batch.
pub const DEFAULT_MAX_PAUSE_RATIO: f64 = 16.0;
/// With feedback, how much slower than between batches the probe may commit while a batch runs.
pub const DEFAULT_MAX_SLOWDOWN: f64 = 2.0;
/// With feedback, how often the probe commits.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(20);
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest wait for the history tables' lock when a range is attached, rewritten or dropped.
pub const DEFAULT_HISTORY_LOCK_TIMEOUT: Duration = SECOND;
/// How far the clocks may disagree before runs refuse to delete.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Connections a full-speed block walk deletes on at once. One DELETE runs on one core; two
/// walking disjoint block ranges use a 2-core machine's both (docs/benchmarks.md).
pub const DEFAULT_PARALLELISM: u32 = 2;
/// The most connections a block walk may use at once.
pub const MAX_PARALLELISM: u32 = 16;
/// A dead runner holds its task at most this long; its run renews the lease every third of it.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// `retention.wal_compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum WalCompressionMethod {
    Off,
    Pglz,
    Lz4,
    Zstd,
}

impl TryFrom<String> for WalCompressionMethod {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "off" => Ok(WalCompressionMethod::Off),
            "pglz" => Ok(WalCompressionMethod::Pglz),
            "lz4" => Ok(WalCompressionMethod::Lz4),
            "zstd" => Ok(WalCompressionMethod::Zstd),
            other => Err(format!(
                "{other:?} is not allowed: one of \"off\", \"pglz\", \"lz4\", \"zstd\""
            )),
        }
    }
}

impl WalCompressionMethod {
    /// The value of PostgreSQL's `wal_compression` (`None`: leave the server's).
    pub fn as_sql(self) -> Option<&'static str> {
        match self {
            WalCompressionMethod::Off => None,
            WalCompressionMethod::Pglz => Some("pglz"),
            WalCompressionMethod::Lz4 => Some("lz4"),
            WalCompressionMethod::Zstd => Some("zstd"),
        }
    }
}

/// `retention.*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSettings {
    /// How long a task's lease outlives its holder's last renewal: after a replica dies (or hangs,
    /// or loses the database) another takes its tasks within this. Renewed every third of it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How far the database's clock may be from this process's, or jump between two runs, before
    /// a run fails and deletes nothing (every cutoff comes from the database's clock).
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// Connections a full-speed run's block walks (sessions' heap walk, run history's sweeps)
    /// delete on at once, each on block ranges of its own. Paced runs use one.
    pub parallelism: u32,
    /// How the engine's batches compress the full-page images they write to the WAL (`off`,
    /// `pglz`, `lz4`, `zstd`): see [`crate::wal_compression`].
    pub wal_compression: WalCompressionMethod,
    pub throttle: ThrottleSettings,
    pub pacing: PacingSettings,
    pub sessions: SessionsSettings,
    pub queue_items: QueueItemsSettings,
    pub task_history: TaskHistorySettings,
    pub task_logs: TaskLogsSettings,
    pub partitions: PartitionsSettings,
    pub blobs: BlobsSettings,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings {
            lease_ttl: DEFAULT_LEASE_TTL,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            parallelism: DEFAULT_PARALLELISM,
            wal_compression: WalCompressionMethod::Lz4,
            throttle: ThrottleSettings::default(),
            pacing: PacingSettings::default(),
            sessions: SessionsSettings::default(),
            queue_items: QueueItemsSettings::default(),
            task_history: TaskHistorySettings::default(),
            task_logs: TaskLogsSettings::default(),
            partitions: PartitionsSettings::default(),
            blobs: BlobsSettings::default(),
        }
    }
}

impl RetentionSettings {
    /// Runs paced by `pause_ratio` (0: full speed), under leases of `lease_ttl`.
    pub fn run_options(&self, pause_ratio: f64) -> crate::RunOptions {
        crate::RunOptions {
            lease_ttl: self.lease_ttl,
            max_clock_skew: self.max_clock_skew,
            parallelism: self.parallelism,
            throttle: Some(std::sync::Arc::new(crate::throttle::ReplicaThrottle::new(
                self.throttle.clone(),
            ))),
            wal_compression: crate::wal_compression::WalCompression::new(self.wal_compression)
                .map(std::sync::Arc::new),
            ..self.pacing.run_options(pause_ratio)
        }
    }

    /// How the background controller runs: paced by `retention.pacing.pause_ratio`.
    pub fn paced(&self) -> crate::RunOptions {
        self.run_options(self.pacing.pause_ratio)
    }
}

/// `retention.pacing.*`: how hard every task's batches press on the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PacingSettings {
    /// The duration each paced batch aims at: batch sizes (rows, or heap pages for a block walk)
    /// grow and shrink toward it, within each task's `batch_size`. Small batches keep each commit's
    /// WAL small, which is what foreground commits wait behind.
    #[serde(with = "humantime_serde")]
    pub batch_time: Duration,
    /// The same for full-speed runs (`engine retention run` without `--pace`).
    #[serde(with = "humantime_serde")]
    pub full_speed_batch_time: Duration,
    /// Runs of `engine serve` (and `engine retention run --pace`) pause after each batch for this
    /// many times the batch's duration: 0 is full speed, 1 leaves the database alone half of the
    /// time, 4 four fifths. Manual runs are full speed unless `--pace` asks. With `feedback`,
    /// where every paced run starts.
    pub pause_ratio: f64,
    /// Paced runs set their pause ratio from what a probe transaction feels (see
    /// [`crate::feedback`]), between `min_pause_ratio` and `max_pause_ratio`. `false`: the ratio
    /// stays at `pause_ratio`.
    pub feedback: bool,
    pub min_pause_ratio: f64,
    pub max_pause_ratio: f64,
    /// The probe may commit this many times slower while a batch runs than between batches
    /// before the pauses grow.
    pub max_slowdown: f64,
    /// How often the probe commits while a paced run goes on.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
}

impl Default for PacingSettings {
    fn default() -> Self {
        PacingSettings {
            batch_time: DEFAULT_BATCH_TIME,
            full_speed_batch_time: DEFAULT_FULL_SPEED_BATCH_TIME,
            pause_ratio: DEFAULT_PAUSE_RATIO,
            feedback: true,
            min_pause_ratio: DEFAULT_MIN_PAUSE_RATIO,
            max_pause_ratio: DEFAULT_MAX_PAUSE_RATIO,
            max_slowdown: DEFAULT_MAX_SLOWDOWN,
            probe_interval: DEFAULT_PROBE_INTERVAL,
        }
    }
}

impl PacingSettings {
    /// Paced by `pause_ratio` (0: full speed), with the batch duration that goes with it.
    fn run_options(&self, pause_ratio: f64) -> crate::RunOptions {
        let batch_time = if pause_ratio > 0.0 {
            self.batch_time
        } else {
            self.full_speed_batch_time
        };
        let feedback =
            (self.feedback && pause_ratio > 0.0).then_some(crate::feedback::FeedbackOptions {
                min_pause_ratio: self.min_pause_ratio,
                max_pause_ratio: self.max_pause_ratio,
                max_slowdown: self.max_slowdown,
                probe_interval: self.probe_interval,
            });
        crate::RunOptions {
            batch_time,
            pause_ratio,
            feedback,
            ..Default::default()
        }
    }
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
    /// The most rows a batch of the index walk takes (one short transaction each); batches adapt
    /// below it toward `retention.pacing.batch_time`. The heap walk sizes its batches in pages.
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
        Schedule {
            interval: self.interval,
            max_run_time: self.max_run_time,
        }
    }
}

/// `retention.queue_items.*`: the queue-items task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueItemsSettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_run_time: Duration,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// Time between walks of the whole table. Between them, runs delete only the items recorded
    /// as candidates (their task finished or was deleted) and those of deleted tenants; a walk
    /// also finds anything else (an item added for a task already finished).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for QueueItemsSettings {
    fn default() -> Self {
        QueueItemsSettings {
            interval: DEFAULT_QUEUE_ITEMS_INTERVAL,
            max_run_time: DEFAULT_MAX_RUN_TIME,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            sweep_interval: DAY,
        }
    }
}

impl QueueItemsSettings {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            interval: self.interval,
            max_run_time: self.max_run_time,
        }
    }
}

/// `retention.task_history.*`: the task-history task (per-tenant retention of tasks, their
/// events and queue items; deleted tenants; orphan events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskHistorySettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A deleted tenant's history is kept this long after `deleted_at`, then all of it goes.
    #[serde(with = "humantime_serde")]
    pub deleted_tenant_grace: Duration,
    /// Whether a past range that keeps little next to what is due may be rewritten with only
    /// its kept rows (its old partitions dropped whole), when that costs less than deleting the
    /// due rows one batch at a time. Off: every due row goes by row deletes.
    pub compaction: bool,
    /// The most tasks a batch deletes (with their events and queue items); batches adapt below
    /// it toward `retention.pacing.batch_time`.
    pub batch_size: u32,
    #[serde(with = "humantime_serde")]
    pub max_run_time: Duration,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    /// How long deletion receipts (`retention_receipts`, `engine retention receipts`) are kept.
    #[serde(with = "humantime_serde")]
    pub receipts_keep: Duration,
}

/// `retention.task_logs.*`: the log lines' own window. `task-history` deletes them (log lines
/// also leave with their task, whatever their age).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskLogsSettings {
    /// Log lines older than this go, for tenants without a `log_retention_period` of their own.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

pub const DEFAULT_LOG_MAX_AGE: Duration = Duration::from_secs(7 * 86_400);

impl Default for TaskLogsSettings {
    fn default() -> Self {
        TaskLogsSettings {
            max_age: DEFAULT_LOG_MAX_AGE,
        }
    }
}

/// `retention.blobs.*`: the `blobs` task, which deletes the stored objects of payload rows that
/// are gone (the outbox), and sweeps the store for objects no row names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlobsSettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub max_run_time: Duration,
    /// Objects deleted per batch (one read of the outbox, one bulk delete, one update of it).
    pub batch_size: u32,
    /// Time between sweeps of the store for objects no row and no outbox entry names.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// The wait before the first retry of an object whose delete failed; each next retry waits
    /// twice as long, up to an hour.
    #[serde(with = "humantime_serde")]
    pub first_backoff: Duration,
    /// From `storage.orphan_grace`.
    #[serde(skip)]
    pub orphan_grace: Duration,
    /// From `storage.sweep_dry_run`: `Some(true)` only counts, `Some(false)` deletes from the
    /// first sweep on, `None` counts on the first sweep and deletes on the later ones.
    #[serde(skip)]
    pub sweep_dry_run: Option<bool>,
}

pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);

impl Default for BlobsSettings {
    fn default() -> Self {
        BlobsSettings {
            interval: MINUTE,
            max_run_time: DEFAULT_MAX_RUN_TIME,
            batch_size: 500,
            sweep_interval: DAY,
            first_backoff: FIRST_BACKOFF,
            orphan_grace: DAY,
            sweep_dry_run: None,
        }
    }
}

/// Deletion receipts are kept this long by default: over a year, for yearly audits.
pub const DEFAULT_RECEIPTS_KEEP: Duration = Duration::from_secs(400 * 86_400);

impl Default for TaskHistorySettings {
    fn default() -> Self {
        TaskHistorySettings {
            interval: DEFAULT_HISTORY_INTERVAL,
            deleted_tenant_grace: DAY,
            compaction: true,
            batch_size: DEFAULT_HISTORY_BATCH_SIZE,
            max_run_time: DEFAULT_MAX_RUN_TIME,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            receipts_keep: DEFAULT_RECEIPTS_KEEP,
        }
    }
}

impl TaskHistorySettings {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            interval: self.interval,
            max_run_time: self.max_run_time,
        }
    }
}

/// `retention.throttle.*`: waiting for the standbys (see [`crate::throttle`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleSettings {
    /// Purges wait between batches while a connected standby is more than this far behind, until
    /// it is under half of it. `0s` turns the throttle off.
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Duration,
    /// A standby whose replay position has not moved for this long while behind is stalled, and
    /// purges stop waiting for it (until it moves again).
    #[serde(with = "humantime_serde")]
    pub max_replica_stall: Duration,
    /// How often the standbys are read (at most; only between batches).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

pub const DEFAULT_MAX_REPLICA_LAG: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_REPLICA_STALL: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_THROTTLE_CHECK_INTERVAL: Duration = Duration::from_millis(500);

impl Default for ThrottleSettings {
    fn default() -> Self {
        ThrottleSettings {
            max_replica_lag: DEFAULT_MAX_REPLICA_LAG,
            max_replica_stall: DEFAULT_MAX_REPLICA_STALL,
            check_interval: DEFAULT_THROTTLE_CHECK_INTERVAL,
        }
    }
}

/// `retention.partitions.*`: the partitions task (day partitions of the history tables).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PartitionsSettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Days of partitions kept ready ahead of today (today included).
    pub premake_days: u32,
    /// Longest wait for the parents' lock when attaching or removing a day; the day is retried on
    /// the next run when it cannot be had.
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_run_time: Duration,
}

impl Default for PartitionsSettings {
    fn default() -> Self {
        PartitionsSettings {
            interval: HOUR,
            premake_days: 7,
            lock_timeout: DEFAULT_HISTORY_LOCK_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            max_run_time: DEFAULT_MAX_RUN_TIME,
        }
    }
}

impl PartitionsSettings {
    pub fn schedule(&self) -> Schedule {
        Schedule {
            interval: self.interval,
            max_run_time: self.max_run_time,
        }
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
        write!(
            f,
            "{} = {:?} is not allowed: {}",
            self.key, self.value, self.allowed
        )
    }
}

impl RetentionSettings {
    /// Every out-of-range value, each named by its full key (`prefix` is this section's key,
    /// normally `retention`).
    pub fn validate(&self, prefix: &str) -> Vec<SettingError> {
        let mut errors = Vec::new();
        let key = |task: &str, name: &str| format!("{prefix}.{task}.{name}");
        check_duration(
            &mut errors,
            format!("{prefix}.lease_ttl"),
            self.lease_ttl,
            3 * SECOND..=10 * MINUTE,
        );
        check_duration(
            &mut errors,
            format!("{prefix}.max_clock_skew"),
            self.max_clock_skew,
            SECOND..=HOUR,
        );
        if !(1..=MAX_PARALLELISM).contains(&self.parallelism) {
            errors.push(SettingError {
                key: format!("{prefix}.parallelism"),
                value: self.parallelism.to_string(),
                allowed: format!("a whole number of connections from 1 to {MAX_PARALLELISM}"),
            });
        }
        let throttle = &self.throttle;
        if !throttle.max_replica_lag.is_zero() {
            check_duration(
                &mut errors,
                format!("{prefix}.throttle.max_replica_lag"),
                throttle.max_replica_lag,
                SECOND..=HOUR,
            );
        }
        check_duration(
            &mut errors,
            format!("{prefix}.throttle.max_replica_stall"),
            throttle.max_replica_stall,
            10 * SECOND..=DAY,
        );
        check_duration(
            &mut errors,
            format!("{prefix}.throttle.check_interval"),
            throttle.check_interval,
            Duration::from_millis(100)..=10 * SECOND,
        );
        check_duration(
            &mut errors,
            key("blobs", "interval"),
            self.blobs.interval,
            SECOND..=7 * DAY,
        );
        check_duration(
            &mut errors,
            key("blobs", "max_run_time"),
            self.blobs.max_run_time,
            SECOND..=DAY,
        );
        check_duration(
            &mut errors,
            key("blobs", "sweep_interval"),
            self.blobs.sweep_interval,
            MINUTE..=30 * DAY,
        );
        check_duration(
            &mut errors,
            key("blobs", "first_backoff"),
            self.blobs.first_backoff,
            Duration::from_millis(100)..=HOUR,
        );
        if !(1..=10_000).contains(&self.blobs.batch_size) {
            errors.push(SettingError {
                key: key("blobs", "batch_size"),
                value: self.blobs.batch_size.to_string(),
                allowed: "a whole number of objects from 1 to 10000".into(),
            });
        }
        check_duration(
            &mut errors,
            key("task_logs", "max_age"),
            self.task_logs.max_age,
            MINUTE..=Duration::from_secs(100 * 365 * 86_400),
        );
        let pacing = &self.pacing;
        // A batch is one transaction: longer ones hold their row locks and WAL that long.
        check_duration(
            &mut errors,
            key("pacing", "batch_time"),
            pacing.batch_time,
            Duration::from_millis(1)..=SECOND,
        );
        check_duration(
            &mut errors,
            key("pacing", "full_speed_batch_time"),
            pacing.full_speed_batch_time,
            Duration::from_millis(1)..=SECOND,
        );
        if let Some(error) = check_pause_ratio(&key("pacing", "pause_ratio"), pacing.pause_ratio) {
            errors.push(error);
        }
        if !(0.01..=MAX_PAUSE_RATIO).contains(&pacing.min_pause_ratio) {
            errors.push(SettingError {
                key: key("pacing", "min_pause_ratio"),
                value: pacing.min_pause_ratio.to_string(),
                allowed: format!("a number from 0.01 to {MAX_PAUSE_RATIO}: the least pause after a batch, in multiples of its duration"),
            });
        } else if !(pacing.min_pause_ratio..=MAX_PAUSE_RATIO).contains(&pacing.max_pause_ratio) {
            errors.push(SettingError {
                key: key("pacing", "max_pause_ratio"),
                value: pacing.max_pause_ratio.to_string(),
                allowed: format!(
                    "a number from min_pause_ratio ({}) to {MAX_PAUSE_RATIO}",
                    pacing.min_pause_ratio
                ),
            });
        }
        if !(1.1..=100.0).contains(&pacing.max_slowdown) {
            errors.push(SettingError {
                key: key("pacing", "max_slowdown"),
                value: pacing.max_slowdown.to_string(),
                allowed: "a number from 1.1 to 100: how many times slower the probe may commit while a batch runs".into(),
            });
        }
        check_duration(
            &mut errors,
            key("pacing", "probe_interval"),
            pacing.probe_interval,
            Duration::from_millis(10)..=10 * SECOND,
        );
        let s = &self.sessions;
        check_batch_size(&mut errors, &key("sessions", ""), s.batch_size);
        check_run(
            &mut errors,
            &key("sessions", ""),
            s.interval,
            s.max_run_time,
            s.statement_timeout,
            s.lock_timeout,
        );
        check_duration(
            &mut errors,
            key("sessions", "anonymous_ttl"),
            s.anonymous_ttl,
            MINUTE..=CENTURY,
        );
        let q = &self.queue_items;
        check_run(
            &mut errors,
            &key("queue_items", ""),
            q.interval,
            q.max_run_time,
            q.statement_timeout,
            q.lock_timeout,
        );
        check_duration(
            &mut errors,
            key("queue_items", "sweep_interval"),
            q.sweep_interval,
            MINUTE..=30 * DAY,
        );
        let h = &self.task_history;
        check_batch_size(&mut errors, &key("task_history", ""), h.batch_size);
        check_run(
            &mut errors,
            &key("task_history", ""),
            h.interval,
            h.max_run_time,
            h.statement_timeout,
            h.lock_timeout,
        );
        // Time to undo a mistaken soft delete before the tenant's history goes.
        check_duration(
            &mut errors,
            key("task_history", "deleted_tenant_grace"),
            h.deleted_tenant_grace,
            HOUR..=CENTURY,
        );
        check_duration(
            &mut errors,
            key("task_history", "receipts_keep"),
            h.receipts_keep,
            DAY..=CENTURY,
        );
        let p = &self.partitions;
        check_duration(
            &mut errors,
            key("partitions", "interval"),
            p.interval,
            SECOND..=7 * DAY,
        );
        check_duration(
            &mut errors,
            key("partitions", "max_run_time"),
            p.max_run_time,
            SECOND..=DAY,
        );
        check_duration(
            &mut errors,
            key("partitions", "statement_timeout"),
            p.statement_timeout,
            Duration::from_millis(100)..=HOUR,
        );
        check_duration(
            &mut errors,
            key("partitions", "lock_timeout"),
            p.lock_timeout,
            Duration::from_millis(10)..=MAX_LOCK_TIMEOUT,
        );
        if !(1..=90).contains(&p.premake_days) {
            errors.push(SettingError {
                key: key("partitions", "premake_days"),
                value: p.premake_days.to_string(),
                allowed: "a whole number of days from 1 to 90".into(),
            });
        }
        errors
    }
}

/// The longest any lock wait may last. A waiting lock request queues every later conflicting
/// request behind it (a DETACH waiting for `tasks` stops every query on `tasks`), so a wait must
/// give up within seconds; what it was for is retried later.
const MAX_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest pause ratio: one batch a minute for a 20 ms batch.
const MAX_PAUSE_RATIO: f64 = 3_000.0;

/// A pause ratio: a number from 0 (full speed) to [`MAX_PAUSE_RATIO`].
pub fn check_pause_ratio(key: &str, ratio: f64) -> Option<SettingError> {
    (!(0.0..=MAX_PAUSE_RATIO).contains(&ratio)).then(|| SettingError {
        key: key.into(),
        value: ratio.to_string(),
        allowed: format!("a number from 0 (full speed) to {MAX_PAUSE_RATIO}: the pause after each batch, in multiples of its duration"),
    })
}

fn check_batch_size(errors: &mut Vec<SettingError>, prefix: &str, batch_size: u32) {
    if !(1..=100_000).contains(&batch_size) {
        errors.push(SettingError {
            key: format!("{prefix}batch_size"),
            value: batch_size.to_string(),
            allowed: "a whole number of rows from 1 to 100000".into(),
        });
    }
}

/// The settings every batching task has; `prefix` ends with a dot.
fn check_run(
    errors: &mut Vec<SettingError>,
    prefix: &str,
    interval: Duration,
    max_run_time: Duration,
    statement_timeout: Duration,
    lock_timeout: Duration,
) {
    check_duration(
        errors,
        format!("{prefix}interval"),
        interval,
        SECOND..=7 * DAY,
    );
    check_duration(
        errors,
        format!("{prefix}max_run_time"),
        max_run_time,
        SECOND..=DAY,
    );
    check_duration(
        errors,
        format!("{prefix}statement_timeout"),
        statement_timeout,
        Duration::from_millis(100)..=HOUR,
    );
    check_duration(
        errors,
        format!("{prefix}lock_timeout"),
        lock_timeout,
        Duration::from_millis(10)..=MAX_LOCK_TIMEOUT,
    );
}

fn check_duration(
    errors: &mut Vec<SettingError>,
    key: String,
    value: Duration,
    allowed: RangeInclusive<Duration>,
) {
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
    fn a_wal_compression_method_is_one_postgresql_knows_or_off() {
        assert_eq!(
            WalCompressionMethod::try_from("lz4".to_string()),
            Ok(WalCompressionMethod::Lz4)
        );
        assert_eq!(
            WalCompressionMethod::try_from("off".to_string())
                .unwrap()
                .as_sql(),
            None
        );
        assert_eq!(
            WalCompressionMethod::try_from("zstd".to_string())
                .unwrap()
                .as_sql(),
            Some("zstd")
        );
        assert_eq!(
            WalCompressionMethod::try_from("gzip".to_string()),
            Err("\"gzip\" is not allowed: one of \"off\", \"pglz\", \"lz4\", \"zstd\"".to_string())
        );
        assert_eq!(
            RetentionSettings::default().wal_compression,
            WalCompressionMethod::Lz4
        );
    }

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
        assert_eq!(
            keys,
            [
                "retention.sessions.batch_size",
                "retention.sessions.interval",
                "retention.sessions.anonymous_ttl"
            ]
        );
        assert_eq!(
            errors[2].to_string(),
            "retention.sessions.anonymous_ttl = \"59s\" is not allowed: a duration from 1m to 100years"
        );
    }

    #[test]
    fn unsafe_values_are_refused() {
        let mut settings = RetentionSettings::default();
        settings.task_history.deleted_tenant_grace = Duration::ZERO;
        settings.partitions.lock_timeout = 10 * MINUTE;
        settings.sessions.lock_timeout = 6 * SECOND;
        settings.pacing.batch_time = 2 * SECOND;
        let errors: Vec<String> = settings
            .validate("retention")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [
                "retention.pacing.batch_time = \"2s\" is not allowed: a duration from 1ms to 1s",
                "retention.sessions.lock_timeout = \"6s\" is not allowed: a duration from 10ms to 5s",
                "retention.task_history.deleted_tenant_grace = \"0s\" is not allowed: a duration from 1h to 100years",
                "retention.partitions.lock_timeout = \"10m\" is not allowed: a duration from 10ms to 5s",
            ]
        );
        settings.task_history.deleted_tenant_grace = HOUR;
        settings.partitions.lock_timeout = 5 * SECOND;
        settings.sessions.lock_timeout = 5 * SECOND;
        settings.pacing.batch_time = SECOND;
        assert_eq!(settings.validate("retention"), vec![]);
    }

    #[test]
    fn pacing_by_feedback_names_its_bounds() {
        let mut settings = RetentionSettings::default();
        settings.pacing.min_pause_ratio = 0.0;
        settings.pacing.max_slowdown = 1.0;
        settings.pacing.probe_interval = Duration::from_millis(5);
        let errors: Vec<String> = settings
            .validate("retention")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            errors,
            [
                "retention.pacing.min_pause_ratio = \"0\" is not allowed: a number from 0.01 to 3000: the least pause after a batch, in multiples of its duration",
                "retention.pacing.max_slowdown = \"1\" is not allowed: a number from 1.1 to 100: how many times slower the probe may commit while a batch runs",
                "retention.pacing.probe_interval = \"5ms\" is not allowed: a duration from 10ms to 10s",
            ]
        );
        settings.pacing = PacingSettings {
            min_pause_ratio: 2.0,
            max_pause_ratio: 1.0,
            ..PacingSettings::default()
        };
        let errors: Vec<String> = settings
            .validate("retention")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors, ["retention.pacing.max_pause_ratio = \"1\" is not allowed: a number from min_pause_ratio (2) to 3000"]);
        settings.pacing.max_pause_ratio = 2.0;
        assert_eq!(settings.validate("retention"), vec![]);
    }
}
