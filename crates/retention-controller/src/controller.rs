//! Running tasks: once ([`run_once`], for `engine retention run` and each scheduled run) and on
//! their schedules ([`Controller`], for `engine serve`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use repository::lease::{self, Lease, Renewal, Start};
use repository::maintenance::{self, Outcome};

use crate::clock_guard;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::schedule::{self, Schedule};
use crate::task::{
    Completion, MaintenanceTask, Progress, ProgressFn, RunContext, RunOptions, RunReport, TaskError,
};
use crate::telemetry;

/// A finished run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub run_id: Uuid,
    pub report: RunReport,
    pub elapsed: Duration,
    /// Why a cancelled run stopped, when it was not a shutdown.
    pub stopped_because: Option<StopReason>,
}

/// What [`run_once`] did.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    Ran(RunSummary),
    /// Another runner (this engine's loop, another replica, a manual run) holds the task's lease.
    Busy,
    /// An operator paused the task (`engine retention pause`).
    Paused,
    /// A scheduled run found the task's last run (on any replica) finished less than an
    /// interval ago; it is due after this long.
    NotDue(Duration),
}

/// Runs `task` once: takes its cross-replica lease (or returns [`RunOutcome::Busy`] at once),
/// deletes until nothing is due, the task's deadline passes, `cancel` fires or the lease keeper
/// stops it, and releases the lease. Every log line of the run carries the task's name and a
/// fresh run id.
pub async fn run_once(
    task: &dyn MaintenanceTask,
    pool: &PgPool,
    cancel: &CancellationToken,
) -> Result<RunOutcome, TaskError> {
    run_once_with(task, pool, cancel, &RunOptions::default()).await
}

/// [`run_once`], paced and watched as `options` say.
pub async fn run_once_with(
    task: &dyn MaintenanceTask,
    pool: &PgPool,
    cancel: &CancellationToken,
    options: &RunOptions,
) -> Result<RunOutcome, TaskError> {
    let run_id = Uuid::now_v7();
    let span = tracing::info_span!("retention_run", task = task.name(), %run_id);
    async {
        let asked_at = Instant::now();
        // The lease, the pause and schedule check, and the run's record: one statement, which
        // also reads the database's clock for the clock check.
        let scheduled_every = options.scheduled.then(|| task.schedule().interval);
        let asked = clock_guard::Asked::now();
        let lease = match lease::start_run(pool, task.name(), run_id, replica(), options.lease_ttl, scheduled_every).await? {
            Start::Started(lease) => lease,
            Start::Busy => {
                tracing::debug!("another runner holds the task's lease; skipping");
                telemetry::run_skipped(task.name(), "busy");
                return Ok(RunOutcome::Busy);
            }
            Start::Paused => {
                tracing::debug!("the task is paused; skipping");
                telemetry::run_skipped(task.name(), "paused");
                return Ok(RunOutcome::Paused);
            }
            Start::NotDue(wait) => {
                tracing::debug!(due_in_ms = wait.as_millis() as u64, "ran elsewhere recently; not due yet");
                return Ok(RunOutcome::NotDue(wait));
            }
        };
        let clock = asked.judge(lease.taken_at, options.max_clock_skew);
        let clock_read_at = Instant::now();
        let schedule = task.schedule();
        // The run stops when shut down or when its lease keeper says so.
        let stop = cancel.child_token();
        let ctx = RunContext::new(pool.clone(), run_id, stop.clone(), schedule.max_run_time, publishing_rows_left(task.name(), options))
            .with_wal_compression()
            .await;
        let started = Instant::now();
        telemetry::lease_held(task.name(), true);
        tracing::info!("run started");
        let lease_pool = options.lease_pool.as_ref().unwrap_or(pool);
        // Nothing is deleted under a clock that cannot be trusted.
        let (mut result, stopped_by) = match clock {
            Ok(database_clock) => run_beside_keeper(task, &ctx.with_clock(database_clock, clock_read_at), &stop, &lease, lease_pool, asked_at).await,
            Err(clock) => (Err(TaskError::Clock(clock)), None),
        };
        let elapsed = started.elapsed();
        if let Some(reason) = stopped_by.and_then(StopReason::lease_lost) {
            telemetry::lease_lost(task.name(), reason);
        }
        if let Some((pacing, ratio)) = ctx.pacing_summary() {
            drop(ctx); // the probe stops with the run
            record_pacing(task.name(), &pacing, ratio, result.as_mut().ok());
        }
        let stopped_because = match &result {
            Ok(report) if report.completion == Completion::Cancelled => stopped_by,
            _ => None,
        };
        let (outcome, rows, error) = match &result {
            Ok(report) => (outcome_of(report.completion), report.deleted, stopped_because.map(|r| r.as_str().to_owned())),
            Err(error) => (Outcome::Failed, 0, Some(error_chain(error))),
        };
        // The run's record and the lease's release: one transaction. If it fails (the database
        // is unreachable) the lease expires on its own.
        match maintenance::finish_run(pool, run_id, task.name(), rows, outcome, error.as_deref()).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("the task's lease had passed to another runner before the run ended");
                if stopped_by.and_then(StopReason::lease_lost).is_none() {
                    telemetry::lease_lost(task.name(), "lost");
                }
            }
            Err(error) => {
                tracing::warn!(%error, ttl_ms = lease.ttl.as_millis() as u64, "recording the run's end failed; its lease expires on its own")
            }
        }
        telemetry::run_finished(task.name(), elapsed, outcome, result.as_ref().ok());
        telemetry::lease_held(task.name(), false);
        if matches!(&result, Ok(report) if report.completion == Completion::Done) {
            telemetry::rows_due(task.name(), 0); // as of the run's start, nothing is left
        }
        let report = match result {
            Ok(report) => report,
            Err(error) => {
                tracing::error!(error = %error_chain(&error), elapsed_ms = elapsed.as_millis() as u64, "run failed");
                return Err(error);
            }
        };
        tracing::info!(
            deleted = report.deleted,
            batches = report.batches,
            longest_batch_ms = report.longest_batch.as_millis() as u64,
            longest_lock_ms = report.longest_lock.as_millis() as u64,
            elapsed_ms = elapsed.as_millis() as u64,
            completion = report.completion.as_str(),
            "run finished"
        );
        Ok(RunOutcome::Ran(RunSummary { run_id, report, elapsed, stopped_because }))
    }
    .instrument(span)
    .await
}

/// Logs what a paced run's feedback did, publishes the ratio it ended at, and adds its decisions
/// to the run's counters (which `retention_run_events_total` counts).
fn record_pacing(
    task: &'static str,
    pacing: &crate::feedback::Summary,
    ratio: f64,
    report: Option<&mut RunReport>,
) {
    if pacing.probes == 0 {
        return;
    }
    tracing::info!(
        probes = pacing.probes,
        raised_by_latency = pacing.raised_by_latency,
        raised_by_waits = pacing.raised_by_waits,
        lowered = pacing.lowered,
        lowest_ratio = pacing.lowest_ratio,
        highest_ratio = pacing.highest_ratio,
        final_ratio = ratio,
        probe_p90_in_pauses_us = pacing.pauses_tail.as_micros() as u64,
        probe_p90_over_work_us = pacing.work_tail.as_micros() as u64,
        waiting_over_work = pacing.waiting_over_work,
        waiting_in_pauses = pacing.waiting_in_pauses,
        "pacing by feedback"
    );
    telemetry::paced(task, ratio);
    if let Some(report) = report {
        report.counters.extend([
            ("pace raised by latency", pacing.raised_by_latency),
            ("pace raised by waits", pacing.raised_by_waits),
            ("pace lowered", pacing.lowered),
        ]);
    }
}

/// Runs `task` with its lease keeper beside it (one tokio task, so nothing outlives the run); when
/// the keeper returns, `stop` makes the run end after its batch in flight. Returns the run's result
/// (a panic as an error) and why the keeper stopped it, if it did.
async fn run_beside_keeper(
    task: &dyn MaintenanceTask,
    ctx: &RunContext,
    stop: &CancellationToken,
    lease: &Lease,
    pool: &PgPool,
    asked: Instant,
) -> (Result<RunReport, TaskError>, Option<StopReason>) {
    let run = AssertUnwindSafe(task.run(ctx)).catch_unwind();
    tokio::pin!(run);
    let (result, stopped_by) = tokio::select! {
        result = &mut run => (result, None),
        reason = keep(lease, pool, asked) => {
            tracing::warn!(reason = reason.as_str(), "stopping the run after its batch in flight");
            stop.cancel();
            (run.await, Some(reason))
        }
    };
    (
        result.unwrap_or_else(|panic| Err(TaskError::Panicked(panic_message(panic.as_ref())))),
        stopped_by,
    )
}

/// `options` whose progress callback also publishes the run's estimate of the rows left.
fn publishing_rows_left(task: &'static str, options: &RunOptions) -> RunOptions {
    let inner = options.progress.clone();
    let progress: ProgressFn = Arc::new(move |progress: Progress| {
        if let Some(left) = progress.left {
            telemetry::rows_due(task, left);
        }
        if let Some(inner) = &inner {
            inner(progress);
        }
    });
    RunOptions {
        progress: Some(progress),
        ..options.clone()
    }
}

/// Why a run's lease keeper stopped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// An operator paused the task.
    Paused,
    /// The lease is no longer this run's: it expired and another runner took it, or an operator
    /// cleared it.
    LeaseLost,
    /// No renewal succeeded for half the lease's time to live (the database was unreachable).
    LeaseNotRenewed,
}

impl StopReason {
    /// The `reason` of `retention_leases_lost_total`, when the run lost its lease.
    fn lease_lost(self) -> Option<&'static str> {
        match self {
            StopReason::Paused => None,
            StopReason::LeaseLost => Some("lost"),
            StopReason::LeaseNotRenewed => Some("not renewed"),
        }
    }

    /// As recorded in `maintenance_runs.error` of the (cancelled) run.
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Paused => "paused by an operator",
            StopReason::LeaseLost => "lease lost: another runner took the task",
            StopReason::LeaseNotRenewed => {
                "lease not renewed for half its time to live (database unreachable)"
            }
        }
    }
}

/// Renews `lease` every third of its time to live while its run goes on, and returns (which
/// stops the run after its batch in flight) when an operator paused the task, when the lease was
/// lost, or when no renewal was confirmed for half the time to live, which is before any other
/// runner can take it. `asked` is when the lease was asked for: its expiry counts from no earlier.
async fn keep(lease: &Lease, pool: &PgPool, asked: Instant) -> StopReason {
    let every = lease.ttl / 3;
    let mut confirmed = asked;
    loop {
        tokio::time::sleep(every).await;
        let sent = Instant::now();
        match tokio::time::timeout(every, lease.renew(pool)).await {
            Ok(Ok(Renewal::Renewed { paused })) => {
                confirmed = sent;
                if paused {
                    return StopReason::Paused;
                }
            }
            Ok(Ok(Renewal::Lost)) => return StopReason::LeaseLost,
            Ok(Err(error)) => tracing::warn!(%error, "renewing the task's lease failed; retrying"),
            Err(_) => tracing::warn!(
                timeout_ms = every.as_millis() as u64,
                "renewing the task's lease timed out; retrying"
            ),
        }
        if confirmed.elapsed() >= lease.ttl / 2 {
            return StopReason::LeaseNotRenewed;
        }
    }
}

fn outcome_of(completion: Completion) -> Outcome {
    match completion {
        Completion::Done => Outcome::Done,
        Completion::DeadlineReached => Outcome::DeadlineReached,
        Completion::Cancelled => Outcome::Cancelled,
    }
}

/// This process, as named in `maintenance_runs` and as a lease's holder: `host:pid`.
pub fn replica() -> &'static str {
    static REPLICA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    REPLICA.get_or_init(|| format!("{}:{}", host_name(), std::process::id()))
}

/// The host's name (in Kubernetes, the pod's).
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

/// Runs every task on its own schedule until cancelled.
pub struct Controller {
    pool: PgPool,
    tasks: Vec<Arc<dyn MaintenanceTask>>,
    options: RunOptions,
}

impl Controller {
    /// Runs at full speed unless [`Controller::with_options`] paces them.
    pub fn new(pool: PgPool, tasks: Vec<Arc<dyn MaintenanceTask>>) -> Self {
        Controller {
            pool,
            tasks,
            options: RunOptions::default(),
        }
    }

    pub fn with_options(self, options: RunOptions) -> Self {
        Controller { options, ..self }
    }

    /// Runs until `cancel` fires, then waits for every task to finish its batch in flight.
    pub async fn run(self, cancel: CancellationToken) {
        telemetry::controller_started();
        let mut loops = JoinSet::new();
        for task in self.tasks {
            let options = RunOptions {
                scheduled: true,
                ..self.options.clone()
            };
            let (pool, cancel) = (self.pool.clone(), cancel.child_token());
            let name = task.name();
            loops.spawn(
                async move {
                    last_success_from_the_log(&pool, name).await;
                    let lease_ttl = options.lease_ttl;
                    let run = || {
                        let (task, pool, cancel, options) =
                            (task.clone(), pool.clone(), cancel.clone(), options.clone());
                        async move { run_once_with(task.as_ref(), &pool, &cancel, &options).await }
                    };
                    let schedule = || {
                        let schedule = task.schedule();
                        telemetry::schedule(name, &schedule);
                        schedule
                    };
                    drive(schedule, run, lease_ttl, &cancel, fastrand::f64).await
                }
                .instrument(tracing::info_span!("retention_task", task = name)),
            );
        }
        while loops.join_next().await.is_some() {}
        tracing::info!("retention controller stopped");
    }
}

/// Sets the task's last-success gauge from the run log (see [`telemetry::last_success_known`]);
/// this start's time when the log has none or does not answer within a few seconds.
async fn last_success_from_the_log(pool: &PgPool, task: &'static str) {
    let recorded = tokio::time::timeout(
        Duration::from_secs(5),
        repository::maintenance::state(pool, task),
    )
    .await;
    let at = match recorded {
        Ok(Ok(state)) => state.last_success_at.map(std::time::SystemTime::from),
        Ok(Err(error)) => {
            tracing::debug!(%error, "reading the task's last success");
            None
        }
        Err(_) => None,
    };
    telemetry::last_success_known(task, at.unwrap_or_else(std::time::SystemTime::now));
}

/// How a loop iteration went, for choosing the next delay.
enum Step {
    Succeeded { work_left: bool },
    Busy,
    NotDue(Duration),
    Failed,
}

/// One task's loop: first run after a random part of the interval, then every (jittered)
/// interval; after a failure, capped exponential backoff instead. A task held elsewhere or paused
/// is asked again after about a lease's time to live (`recheck`): its holder may have died, an
/// operator may resume it. A failing or panicking run never ends the loop; only `cancel` does, and
/// never in the middle of a run.
async fn drive<S, R, F>(
    schedule: S,
    run: R,
    recheck: Duration,
    cancel: &CancellationToken,
    mut draw: impl FnMut() -> f64,
) where
    S: Fn() -> Schedule,
    R: Fn() -> F,
    F: Future<Output = Result<RunOutcome, TaskError>>,
{
    let mut delay = schedule::first_delay(schedule().interval, draw());
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let step = match AssertUnwindSafe(run()).catch_unwind().await {
            Ok(Ok(RunOutcome::Ran(summary))) => Step::Succeeded {
                work_left: summary.report.completion == Completion::DeadlineReached,
            },
            Ok(Ok(RunOutcome::Busy | RunOutcome::Paused)) => Step::Busy,
            Ok(Ok(RunOutcome::NotDue(wait))) => Step::NotDue(wait),
            // run_once has logged the run's own errors, with its run id.
            Ok(Err(_)) => Step::Failed,
            Err(panic) => {
                tracing::error!(error = %TaskError::Panicked(panic_message(panic.as_ref())), "run failed");
                Step::Failed
            }
        };
        let interval = schedule().interval;
        delay = match step {
            Step::Succeeded { work_left } => {
                failures = 0;
                if work_left {
                    tracing::info!(
                        "run stopped at its deadline with work left; continuing shortly"
                    );
                    schedule::CATCH_UP_PAUSE
                } else {
                    schedule::jittered(interval, draw())
                }
            }
            // Cheap (one statement when held, three when paused), and it bounds how long a dead
            // holder's task or a resumed task waits. A holder that is alive finishes its run, and
            // the next check finds the task not due.
            Step::Busy => recheck.mul_f64(1.0 + 0.5 * draw()).min(interval),
            // Another replica ran it: due when its interval ends, plus up to a tenth of an
            // interval so that replicas do not all wake at once.
            Step::NotDue(wait) => wait + interval.mul_f64(0.1 * draw()),
            Step::Failed => {
                failures = failures.saturating_add(1);
                let delay = schedule::backoff(failures, draw());
                tracing::warn!(
                    failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "retrying after backoff"
                );
                delay
            }
        };
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// An error and its sources, one line: "database error: pool timed out ...".
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use super::*;

    const INTERVAL: Duration = Duration::from_secs(60);
    const RECHECK: Duration = Duration::from_secs(8);

    fn schedule() -> Schedule {
        Schedule {
            interval: INTERVAL,
            max_run_time: Duration::from_secs(10),
        }
    }

    fn ran(completion: Completion) -> Result<RunOutcome, TaskError> {
        let report = RunReport {
            completion,
            ..Default::default()
        };
        Ok(RunOutcome::Ran(RunSummary {
            run_id: Uuid::nil(),
            report,
            elapsed: Duration::ZERO,
            stopped_because: None,
        }))
    }

    /// Drives a loop whose runs answer from `script` (then succeed), records when each run
    /// started (relative to the start), and stops it at `until`.
    async fn start_times(script: Vec<&'static str>, until: Duration) -> Vec<Duration> {
        let start = Instant::now();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let calls = AtomicU32::new(0);
        let cancel = CancellationToken::new();
        let stopper = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(until).await;
                cancel.cancel();
            })
        };
        let run = || {
            starts.lock().unwrap().push(start.elapsed());
            let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
            let answer = script.get(n).copied().unwrap_or("ok");
            async move {
                match answer {
                    "ok" => ran(Completion::Done),
                    "deadline" => ran(Completion::DeadlineReached),
                    "busy" => Ok(RunOutcome::Busy),
                    "paused" => Ok(RunOutcome::Paused),
                    "not due" => Ok(RunOutcome::NotDue(Duration::from_secs(20))),
                    "err" => Err(TaskError::Panicked("scripted failure".into())),
                    "panic" => panic!("scripted panic"),
                    other => unreachable!("{other}"),
                }
            }
        };
        drive(schedule, run, RECHECK, &cancel, || 0.5).await;
        stopper.await.unwrap();
        let times = starts.lock().unwrap().clone();
        times
    }

    fn secs(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|s| Duration::from_secs(*s)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn runs_every_interval_after_a_jittered_first_delay() {
        // first delay: min(60s, 30s) * 0.5 = 15s; then the interval (draw 0.5 = no jitter).
        let times = start_times(vec![], Duration::from_secs(200)).await;
        assert_eq!(times, secs(&[15, 75, 135, 195]));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_and_panics_back_off_exponentially_and_success_resets() {
        let times = start_times(
            vec!["err", "panic", "err", "ok", "err"],
            Duration::from_secs(160),
        )
        .await;
        // 15 (err) +5 -> 20 (panic) +10 -> 30 (err) +20 -> 50 (ok) +60 -> 110 (err) +5 -> 115 (ok) +60
        assert_eq!(times, secs(&[15, 20, 30, 50, 110, 115]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_stopped_by_its_deadline_continues_after_a_short_pause() {
        let times = start_times(vec!["deadline", "deadline", "ok"], Duration::from_secs(100)).await;
        assert_eq!(times, secs(&[15, 20, 25, 85]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_held_elsewhere_or_paused_is_asked_again_after_about_a_lease() {
        // 15 (busy) +8*1.25 -> 25 (paused) +10 -> 35 (ok) +60 -> 95
        let times = start_times(vec!["busy", "paused", "ok"], Duration::from_secs(100)).await;
        assert_eq!(times, secs(&[15, 25, 35, 95]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_not_yet_due_waits_until_it_is() {
        // 15 (not due in 20s) +20 +3 (a tenth of 60s at draw 0.5) -> 38 (ok) +60 -> 98
        let times = start_times(vec!["not due"], Duration::from_secs(100)).await;
        assert_eq!(times, secs(&[15, 38, 98]));
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_ends_the_wait_at_once() {
        let start = Instant::now();
        let cancel = CancellationToken::new();
        cancel.cancel();
        drive(
            schedule,
            || async { ran(Completion::Done) },
            RECHECK,
            &cancel,
            || 0.5,
        )
        .await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
