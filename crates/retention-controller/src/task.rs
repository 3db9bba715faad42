//! What a maintenance task is, and what one run of it reports.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use repository::batch::BatchLimits;
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::batching::BatchSizer;
use crate::feedback::{Pacer, Summary};
use crate::schedule::Schedule;
use crate::settings::{DEFAULT_FULL_SPEED_BATCH_TIME, DEFAULT_LEASE_TTL};

/// One maintenance task. Implementations delete in bounded batches, each committed on its own,
/// and call [`RunContext::interrupted`] between batches.
#[async_trait::async_trait]
pub trait MaintenanceTask: Send + Sync + 'static {
    /// The task's name on the command line, in logs and in the database.
    fn name(&self) -> &'static str;

    /// How often the task runs and how long one run may take. Read before every run.
    fn schedule(&self) -> Schedule;

    /// Deletes what is due, batch by batch, until nothing is, the deadline passes or the run is
    /// cancelled. Nothing due is success.
    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError>;

    /// Counts what a run would delete now, deleting nothing.
    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError>;

    /// An estimate of the rows due now that costs next to nothing (statistics, the facts), for
    /// the status page; `None` when the task cannot tell cheaply.
    async fn estimate_due(&self, _pool: &PgPool) -> Result<Option<u64>, TaskError> {
        Ok(None)
    }
}

/// How a run paces itself, and who watches it.
#[derive(Clone)]
pub struct RunOptions {
    /// The duration each batch aims at: batch sizes adapt toward it.
    pub batch_time: Duration,
    /// After each batch, pause this many times the batch's duration: 0 is full speed, 4 leaves
    /// the database to others four fifths of the time. With `feedback`, where the ratio starts.
    pub pause_ratio: f64,
    /// A paced run's pause ratio follows a probe of what the foreground feels (see
    /// [`crate::feedback`]); `None`: it stays at `pause_ratio`.
    pub feedback: Option<crate::feedback::FeedbackOptions>,
    /// Called after every batch.
    pub progress: Option<ProgressFn>,
    /// A scheduled run (the controller's loop): skipped while the task's last run, on any
    /// replica, finished less than an interval ago. Manual runs are not.
    pub scheduled: bool,
    /// How long the task's lease outlives its last renewal: a runner that dies holds the task
    /// this long at most. The run renews it every third of this.
    pub lease_ttl: Duration,
    /// The pool lease renewals go through. Give them connections of their own (the engine does,
    /// see `Database::open`) so that they never wait behind batches holding every connection of
    /// the run's pool; unset, they share the run's pool.
    pub lease_pool: Option<PgPool>,
    /// How far the database's clock may be from this process's (and from where it should be
    /// since the last run) before a run refuses to delete: see [`crate::clock_guard`].
    pub max_clock_skew: Duration,
    /// Connections a full-speed block walk deletes on at once, each on its own block ranges.
    pub parallelism: u32,
    /// Waits between batches while a standby is too far behind; shared by every run of the
    /// process. `None`: never waits (tests and benchmarks that do not ask for it).
    pub throttle: Option<Arc<crate::throttle::ReplicaThrottle>>,
    /// Compresses the full-page images of the runs' deleting batches; shared by every run of the
    /// process. `None`: the server's setting.
    pub wal_compression: Option<Arc<crate::wal_compression::WalCompression>>,
}

/// Receives a run's progress after every batch.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Rows deleted so far in this run.
    pub deleted: u64,
    /// An estimate of the rows still due, when the task can tell.
    pub left: Option<u64>,
}

impl Default for RunOptions {
    /// Full speed, with the default full-speed batch duration.
    fn default() -> Self {
        RunOptions {
            batch_time: DEFAULT_FULL_SPEED_BATCH_TIME,
            pause_ratio: 0.0,
            feedback: None,
            progress: None,
            scheduled: false,
            lease_ttl: DEFAULT_LEASE_TTL,
            lease_pool: None,
            max_clock_skew: crate::settings::DEFAULT_MAX_CLOCK_SKEW,
            parallelism: crate::settings::DEFAULT_PARALLELISM,
            throttle: None,
            wal_compression: None,
        }
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("batch_time", &self.batch_time)
            .field("pause_ratio", &self.pause_ratio)
            .field("feedback", &self.feedback)
            .field("progress", &self.progress.is_some())
            .field("scheduled", &self.scheduled)
            .field("lease_ttl", &self.lease_ttl)
            .field("parallelism", &self.parallelism)
            .finish()
    }
}

/// Pages a block walk starts with (1 MB of heap); it grows toward the batch duration from there.
const FIRST_BLOCK_BATCH: u32 = 128;
/// Pages a block-walk batch never exceeds (128 MB of heap).
const MAX_BLOCK_BATCH: u32 = 16_384;

/// What a run may use and must obey.
pub struct RunContext {
    pub pool: PgPool,
    pub run_id: Uuid,
    cancel: CancellationToken,
    deadline: Instant,
    options: RunOptions,
    /// What [`RunOptions::wal_compression`] resolved to for this run.
    wal_compression: Option<&'static str>,
    /// The database's clock as the run's clock check read it, just before the run.
    clock: Option<RunClock>,
    /// A paced run's pacer, when its ratio follows feedback; shared by the run's contexts.
    pacer: Option<Arc<Pacer>>,
}

impl RunContext {
    pub fn new(
        pool: PgPool,
        run_id: Uuid,
        cancel: CancellationToken,
        max_run_time: Duration,
        options: RunOptions,
    ) -> Self {
        let pacer = match &options.feedback {
            Some(feedback) if options.pause_ratio > 0.0 => {
                Some(Arc::new(Pacer::new(feedback.clone(), options.pause_ratio)))
            }
            _ => None,
        };
        RunContext {
            pool,
            run_id,
            cancel,
            deadline: Instant::now() + max_run_time,
            options,
            wal_compression: None,
            clock: None,
            pacer,
        }
    }

    /// This context, knowing the database's clock at the run's start (read by the clock check,
    /// the reading arriving at `read_at`).
    pub fn with_clock(&self, clock: DateTime<Utc>, read_at: Instant) -> RunContext {
        RunContext {
            pool: self.pool.clone(),
            run_id: self.run_id,
            cancel: self.cancel.clone(),
            deadline: self.deadline,
            options: self.options.clone(),
            wal_compression: self.wal_compression,
            clock: Some(RunClock {
                reading: clock,
                read_at,
            }),
            pacer: self.pacer.clone(),
        }
    }

    /// The database's clock at the run's start: as the clock check read it, or read now. Cutoffs
    /// start from it (a reading taken a moment early only makes them earlier).
    pub async fn database_clock(&self) -> Result<DateTime<Utc>, sqlx::Error> {
        match self.clock {
            Some(clock) => Ok(clock.reading),
            None => repository::clock::now(&self.pool).await,
        }
    }

    /// The run's checked clock (see [`RunClock`]).
    pub fn clock(&self) -> RunClock {
        self.clock.unwrap_or(RunClock {
            reading: Utc::now(),
            read_at: Instant::now(),
        })
    }

    /// Now, by the run's checked clock.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock().now()
    }

    /// The retention rule of run history as of [`RunContext::now`], with deleted tenants' `grace`.
    pub fn rule(&self, grace: Duration) -> repository::rule::Rule {
        self.clock().rule(grace)
    }

    /// Resolves [`RunOptions::wal_compression`] for this run's batches (once per process).
    pub async fn with_wal_compression(self) -> Self {
        let wal_compression = match &self.options.wal_compression {
            Some(compression) => compression.for_batches(&self.pool).await,
            None => None,
        };
        RunContext {
            wal_compression,
            ..self
        }
    }

    /// This run's context with a nearer deadline: `share` of the time left (0 to 1).
    pub fn narrowed(&self, share: f64) -> RunContext {
        let left = self.deadline.saturating_duration_since(Instant::now());
        RunContext {
            pool: self.pool.clone(),
            run_id: self.run_id,
            cancel: self.cancel.clone(),
            deadline: Instant::now() + left.mul_f64(share.clamp(0.0, 1.0)),
            options: self.options.clone(),
            wal_compression: self.wal_compression,
            clock: self.clock,
            pacer: self.pacer.clone(),
        }
    }

    /// Why the run must stop before its next batch, if it must.
    pub fn interrupted(&self) -> Option<Completion> {
        if self.cancel.is_cancelled() {
            Some(Completion::Cancelled)
        } else if Instant::now() >= self.deadline {
            Some(Completion::DeadlineReached)
        } else {
            None
        }
    }

    /// `limits` for this run: full-speed runs commit asynchronously, paced ones synchronously
    /// (see [`repository::batch`]).
    ///
    /// A batch's `statement_timeout` is at most half the lease's time to live: the lease keeper
    /// gives up half a TTL after its last confirmed renewal, so a batch in flight at that moment
    /// ends (commits or times out) before the lease can pass to another runner.
    pub fn batch_limits(&self, limits: BatchLimits) -> BatchLimits {
        let statement_timeout = limits.statement_timeout.min(self.options.lease_ttl / 2);
        BatchLimits {
            statement_timeout,
            ..limits
        }
        .with_async_commit(self.options.pause_ratio == 0.0)
        .with_wal_compression(self.wal_compression)
    }

    /// `limits` for this run's statements that locks protect rather than the lease (a rewrite
    /// holds its ranges and the layout lock; facts are bookkeeping any runner may redo): like
    /// [`RunContext::batch_limits`], without the lease's bound on `statement_timeout`.
    pub fn locked_limits(&self, limits: BatchLimits) -> BatchLimits {
        limits
            .with_async_commit(self.options.pause_ratio == 0.0)
            .with_wal_compression(self.wal_compression)
    }

    /// The duration each batch of this run aims at.
    pub fn batch_time(&self) -> Duration {
        self.options.batch_time
    }

    /// How many connections a block walk deletes on at once: `parallelism` at full speed, one
    /// when paced (a paced run leaves the database to the foreground between its batches).
    pub fn block_workers(&self) -> usize {
        if self.options.pause_ratio > 0.0 {
            1
        } else {
            self.options.parallelism.max(1) as usize
        }
    }

    /// Sizes for batches of at most `max_rows` rows, starting at `max_rows`.
    pub fn row_sizer(&self, max_rows: u32) -> BatchSizer {
        BatchSizer::new(max_rows, 1, max_rows, self.options.batch_time)
    }

    /// Sizes for block-walk batches, in pages.
    pub fn block_sizer(&self) -> BatchSizer {
        self.block_sizer_from(FIRST_BLOCK_BATCH)
    }

    /// Sizes for block-walk batches, starting at `first` pages.
    pub fn block_sizer_from(&self, first: u32) -> BatchSizer {
        BatchSizer::new(first, 1, MAX_BLOCK_BATCH, self.options.batch_time)
    }

    /// Sizes for steps in block ranges that must also stay well within `statement_timeout` (a
    /// quarter of it), whatever the run's batch duration: a rewrite's or a facts rebuild's.
    pub fn block_sizer_within(&self, first: u32, statement_timeout: Duration) -> BatchSizer {
        BatchSizer::new(
            first,
            1,
            MAX_BLOCK_BATCH,
            self.options.batch_time.min(statement_timeout / 4),
        )
    }

    /// After every committed batch: reports progress, then pauses in proportion to the batch's
    /// duration when the run is paced (cut short by cancellation).
    pub async fn batch_done(&self, elapsed: Duration, report: &mut RunReport, left: Option<u64>) {
        self.batch_recorded(elapsed, report, left);
        self.pause_after(elapsed).await;
    }

    /// The first half of [`RunContext::batch_done`]: the longest batch and the progress.
    pub fn batch_recorded(&self, elapsed: Duration, report: &mut RunReport, left: Option<u64>) {
        report.longest_batch = report.longest_batch.max(elapsed);
        tracing::trace!(
            batch = report.batches,
            deleted_so_far = report.deleted,
            elapsed_ms = elapsed.as_millis() as u64,
            "batch done"
        );
        if let Some(progress) = &self.options.progress {
            progress(Progress {
                deleted: report.deleted,
                left,
            });
        }
    }

    /// The second half of [`RunContext::batch_done`]: the pause of a paced run, then the wait
    /// for the standbys (see [`crate::throttle`]).
    pub async fn pause_after(&self, elapsed: Duration) {
        self.pace(elapsed).await;
        if let Some(throttle) = &self.options.throttle {
            throttle.wait(&self.pool, &self.cancel).await;
        }
    }

    async fn pace(&self, elapsed: Duration) {
        if self.options.pause_ratio > 0.0 {
            let pause = match &self.pacer {
                Some(pacer) => pacer.pause_after(&self.pool, elapsed),
                None => elapsed.mul_f64(self.options.pause_ratio),
            };
            let _pausing = self.pacer.as_ref().map(|pacer| pacer.pausing());
            let started = Instant::now();
            tokio::select! {
                _ = self.cancel.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
            crate::telemetry::throttled_for("pace", started.elapsed());
        }
    }

    /// What the run's pacing by feedback did, with the ratio it ended at, when it had any.
    pub fn pacing_summary(&self) -> Option<(Summary, f64)> {
        self.pacer
            .as_ref()
            .map(|pacer| (pacer.summary(), pacer.ratio()))
    }
}

/// A run's clock: the database's reading that the clock check accepted at the run's start,
/// advanced by this process's monotonic clock since the reading arrived (so it can only be early,
/// by the reading's half round trip). Every rule of the run is evaluated at [`RunClock::now`],
/// never at the database's `now()`: a database clock that steps during a run changes nothing.
/// (A context made by hand, in tests, has this process's wall clock.)
#[derive(Debug, Clone, Copy)]
pub struct RunClock {
    reading: DateTime<Utc>,
    read_at: Instant,
}

impl RunClock {
    pub fn now(&self) -> DateTime<Utc> {
        self.reading + chrono::Duration::from_std(self.read_at.elapsed()).unwrap_or_default()
    }

    /// The retention rule of run history as of now, with deleted tenants' `grace`.
    pub fn rule(&self, grace: Duration) -> repository::rule::Rule {
        repository::rule::Rule::new(self.now(), grace)
    }
}

/// How a run ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Completion {
    /// Nothing due is left (as of the run's start).
    #[default]
    Done,
    /// The run's deadline passed between batches; the rest waits for the next run.
    DeadlineReached,
    /// Shutdown or Ctrl-C: the batch in flight was committed, no new one started.
    Cancelled,
}

impl Completion {
    pub fn as_str(self) -> &'static str {
        match self {
            Completion::Done => "done",
            Completion::DeadlineReached => "deadline reached",
            Completion::Cancelled => "cancelled",
        }
    }
}

/// What a run deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    pub deleted: u64,
    pub batches: u64,
    /// Rows deleted per part of the task's rule, in the task's order.
    pub by_rule: Vec<(&'static str, u64)>,
    /// Rows of tenant-owned tables deleted row by row, per tenant (tasks with their events and
    /// queue items), for tasks whose rules are per tenant.
    pub by_tenant: Vec<(Uuid, u64)>,
    /// Other things a run did, by name (partitions created, days dropped).
    pub counters: Vec<(&'static str, u64)>,
    /// The longest committed batch, begin to commit.
    pub longest_batch: Duration,
    /// The longest run history's parents (`tasks`, `task_events`) were held locked exclusively
    /// (a swap, a carve of day ranges): what foreground writers may have waited.
    pub longest_lock: Duration,
    pub completion: Completion,
}

impl RunReport {
    /// Records that the parents were held locked exclusively for `held`.
    pub fn held_parents_locked(&mut self, held: Duration) {
        self.longest_lock = self.longest_lock.max(held);
    }

    /// Counts one committed batch of `rule`.
    pub fn record_batch(&mut self, rule: &'static str, deleted: u64) {
        self.batches += 1;
        self.add_rows(rule, deleted);
    }

    /// Counts one committed batch that deleted rows under several rules.
    pub fn record_batch_parts(&mut self, parts: &[(&'static str, u64)]) {
        self.batches += 1;
        for (rule, deleted) in parts {
            self.add_rows(rule, *deleted);
        }
    }

    /// Counts rows deleted under `rule` outside the batch count (children deleted with a batch,
    /// partitions dropped whole).
    pub fn add_rows(&mut self, rule: &'static str, deleted: u64) {
        self.deleted += deleted;
        add_to(&mut self.by_rule, rule, deleted);
    }

    /// Counts `rows` deleted for `tenant` (already counted under a rule).
    pub fn add_tenant_rows(&mut self, tenant: Uuid, rows: u64) {
        add_to(&mut self.by_tenant, tenant, rows);
    }

    /// Counts something other than deleted rows.
    pub fn count(&mut self, what: &'static str, n: u64) {
        add_to(&mut self.counters, what, n);
    }

    /// Adds a later run's report to this one (a manual run that spans several runs); the
    /// completion becomes the later run's.
    pub fn absorb(&mut self, later: RunReport) {
        self.deleted += later.deleted;
        self.batches += later.batches;
        for (rule, deleted) in later.by_rule {
            add_to(&mut self.by_rule, rule, deleted);
        }
        for (what, n) in later.counters {
            add_to(&mut self.counters, what, n);
        }
        for (tenant, n) in later.by_tenant {
            add_to(&mut self.by_tenant, tenant, n);
        }
        self.longest_batch = self.longest_batch.max(later.longest_batch);
        self.longest_lock = self.longest_lock.max(later.longest_lock);
        self.completion = later.completion;
    }
}

fn add_to<K: PartialEq>(totals: &mut Vec<(K, u64)>, key: K, n: u64) {
    match totals.iter_mut().find(|(k, _)| *k == key) {
        Some((_, total)) => *total += n,
        None => totals.push((key, n)),
    }
}

/// What a run would delete now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRunReport {
    pub due: u64,
    pub by_rule: Vec<(&'static str, u64)>,
    /// Tasks due per tenant (each goes with its events and queue items), for tasks whose rules
    /// are per tenant.
    pub by_tenant: Vec<(Uuid, u64)>,
}

impl DryRunReport {
    pub fn add(&mut self, rule: &'static str, due: u64) {
        self.due += due;
        add_to(&mut self.by_rule, rule, due);
    }

    /// Counts `due` tasks of `tenant` (already counted under a rule).
    pub fn add_tenant(&mut self, tenant: Uuid, due: u64) {
        add_to(&mut self.by_tenant, tenant, due);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("the run panicked: {0}")]
    Panicked(String),
    #[error(transparent)]
    Clock(#[from] crate::clock_guard::ClockError),
    /// The run could not finish what was due for a reason that may pass by the next run.
    #[error("{0}")]
    Incomplete(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(pause_ratio: f64) -> RunContext {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@localhost/none")
            .unwrap();
        let options = RunOptions {
            pause_ratio,
            ..Default::default()
        };
        RunContext::new(
            pool,
            Uuid::nil(),
            CancellationToken::new(),
            Duration::from_secs(1),
            options,
        )
    }

    #[tokio::test]
    async fn full_speed_commits_asynchronously_and_paced_runs_do_not() {
        let limits = BatchLimits::new(Duration::from_secs(1), Duration::from_secs(1));
        assert!(context(0.0).batch_limits(limits).async_commit);
        assert!(!context(1.0).batch_limits(limits).async_commit);
    }

    #[tokio::test]
    async fn a_batch_cannot_outlive_its_lease() {
        let limits = BatchLimits::new(Duration::from_secs(30), Duration::from_secs(5));
        let ctx = context(1.0); // the default lease: 10 s
        assert_eq!(
            ctx.batch_limits(limits).statement_timeout,
            Duration::from_secs(5)
        );
        assert_eq!(
            ctx.batch_limits(limits).lock_timeout,
            Duration::from_secs(5)
        );
        let short = BatchLimits::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(
            ctx.batch_limits(short).statement_timeout,
            Duration::from_secs(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_pause_is_proportional_to_the_batch_and_cut_short_by_cancellation() {
        let ctx = context(3.0);
        let mut report = RunReport::default();
        let started = Instant::now();
        ctx.batch_done(Duration::from_millis(20), &mut report, None)
            .await;
        assert_eq!(started.elapsed(), Duration::from_millis(60));
        assert_eq!(report.longest_batch, Duration::from_millis(20));

        ctx.cancel.cancel();
        let started = Instant::now();
        ctx.batch_done(Duration::from_secs(10), &mut report, None)
            .await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(report.longest_batch, Duration::from_secs(10));
    }
}
