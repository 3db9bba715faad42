//! Driving rewrites (`repository::history::rewrite`) step by step: each step one bounded
//! transaction (a block range sized toward the run's batch duration, a pass of logged writes),
//! paced like a batch, checked for the deadline and shutdown between steps, and resumed by the
//! next run when a run stops in the middle. Both history tasks use it: `task-history` to compact
//! a range, `partitions` to merge cold ones; either finishes the count of any rewrite that was
//! swapped in (its receipts) before it does anything else.

use std::time::Duration;

use chrono::{DateTime, Utc};
use repository::batch::{self, BatchLimits};
use repository::history::rewrite::{self, copy, count, replay, swap, NotNow, Phase};
use repository::history::Range;
use tokio::time::Instant;
use uuid::Uuid;

use crate::batching::{BatchSizer, Settled};
use crate::history::{observe_rewrite, penalise_rewrites};
use crate::task::{RunContext, RunReport, TaskError};
use crate::telemetry;

/// How rewrites go about their steps.
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    /// Each step's transaction: the task's statement timeout (a step is sized well under it).
    pub limits: BatchLimits,
    /// The wait for the history tables' locks (the swap, the start's switch of the sources).
    pub lock_timeout: Duration,
    /// Deleted tenants' grace.
    pub grace: Duration,
}

/// How the rows a rewrite removed are named in the run's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `task-history`: tasks under `retention` or `deleted-tenants`, orphan events under
    /// `orphan-events`, their events under `events`, queue items under `queue-items`.
    Rules,
    /// `partitions`: under their table's name (`tasks`, `events`, `queue-items`).
    Tables,
}

/// What became of a rewrite in this run.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Swapped in and counted: its sources are gone.
    Done(Done),
    /// The run has to stop (deadline, shutdown): the rewrite resumes at the next run.
    Interrupted,
    /// It cannot go on now (a lock not had in time, another runner on it): it is tried again at
    /// the next run.
    Waiting(NotNow),
    /// Given up before its swap (it kept failing, or an operator took a source away): nothing was
    /// removed, the sources log as before.
    Abandoned(String),
}

/// A rewrite that completed.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub lower: DateTime<Utc>,
    pub upper: DateTime<Utc>,
    pub sources: usize,
    /// How long the swap held the history tables' lock.
    pub locked: Option<Duration>,
}

/// Steps at most per run that find the rules changed at the swap, before the rewrite waits for
/// the next run.
const SWAP_ATTEMPTS: usize = 5;
/// Logged writes a catch-up pass replays at most; a pass that finds fewer than
/// [`CAUGHT_UP_BELOW`] has caught up, and the swap follows.
const CATCH_UP_PASS: i64 = 2_000;
const CAUGHT_UP_BELOW: usize = 100;
/// Tasks of a tenant whose rules changed, copied again per step.
const TENANT_CHUNK: i64 = 2_000;
/// Pages of a copy's or a count's first step (it grows toward the batch duration from there).
const FIRST_PAGES: u32 = 16;
/// Steps that give up (timing out at a single page, again and again) before a rewrite that has
/// not swapped is abandoned.
const FAILURES_AT_MOST: i32 = 3;

/// Starts a rewrite of `sources` for the run of `task`, and drives it as far as the run allows.
pub async fn start(
    ctx: &RunContext,
    sources: &[Range],
    task: &'static str,
    steps: Steps,
    wait: bool,
    naming: Naming,
    report: &mut RunReport,
) -> Result<Outcome, TaskError> {
    let rule = ctx.rule(steps.grace);
    match rewrite::start(
        &ctx.pool,
        sources,
        (task, ctx.run_id),
        &rule,
        steps.limits,
        steps.lock_timeout,
        wait,
    )
    .await?
    {
        Ok(started) => {
            tracing::info!(rewrite = started.id, ranges = ?names(sources), "rewriting ranges: copying what they keep");
            advance(ctx, started.id, steps, naming, report).await
        }
        Err(why) => Ok(Outcome::Waiting(why)),
    }
}

/// Brings every rewrite in progress forward: the count of any that was swapped in (whoever
/// started it: its receipts are owed), and `task`'s own before their swap (resumed where they
/// stopped). Stops when the run is interrupted.
pub async fn resume(
    ctx: &RunContext,
    task: &'static str,
    steps: Steps,
    naming: Naming,
    report: &mut RunReport,
) -> Result<Option<crate::Completion>, TaskError> {
    let mut conn = ctx.pool.acquire().await?;
    let in_progress = rewrite::in_progress(&mut conn).await?;
    drop(conn);
    for pending in in_progress {
        if pending.phase.before_swap() && pending.task != task {
            continue;
        }
        tracing::info!(rewrite = pending.id, phase = pending.phase.as_str(), started_by = %pending.task, "resuming a rewrite");
        match advance(ctx, pending.id, steps, naming, report).await? {
            Outcome::Interrupted => return Ok(Some(ctx.interrupted().unwrap_or_default())),
            Outcome::Done(_) => report.count("rewrites resumed", 1),
            Outcome::Waiting(why) => tracing::info!(
                rewrite = pending.id,
                reason = why.as_str(),
                "the rewrite waits for the next run"
            ),
            Outcome::Abandoned(why) => {
                tracing::warn!(rewrite = pending.id, reason = %why, "rewrite abandoned; nothing was removed")
            }
        }
    }
    Ok(None)
}

/// One step's result, before it is judged.
enum Step {
    /// A chunk of pages (copied or counted): sized by the sizer.
    Pages(u32),
    /// The swap, holding the parents' lock this long: recorded and paced like a batch, not sized.
    Swapped(Duration),
    /// Something else done; go on.
    Other,
    /// The rewrite is counted and gone.
    Finished(Done),
    /// Stop here for this run.
    Stop(Outcome),
}

/// Drives rewrite `id` until it is done, the run is interrupted, or it cannot go on now.
pub async fn advance(
    ctx: &RunContext,
    id: i64,
    steps: Steps,
    naming: Naming,
    report: &mut RunReport,
) -> Result<Outcome, TaskError> {
    let mut sizer = ctx.block_sizer_within(FIRST_PAGES, steps.limits.statement_timeout);
    let mut swap_attempts = 0;
    loop {
        if ctx.interrupted().is_some() {
            return Ok(Outcome::Interrupted);
        }
        let started = Instant::now();
        let result = step(
            ctx,
            id,
            steps,
            naming,
            &mut sizer,
            &mut swap_attempts,
            report,
        )
        .await;
        let elapsed = started.elapsed();
        let pages = match result {
            Ok(Step::Pages(pages)) => pages,
            Ok(Step::Other) => continue,
            Ok(Step::Swapped(locked)) => {
                // The longest batch is the lock held; the pause answers the whole step.
                report.batches += 1;
                ctx.batch_recorded(locked, report, None);
                ctx.pause_after(elapsed).await;
                continue;
            }
            Ok(Step::Finished(done)) => return Ok(Outcome::Done(done)),
            Ok(Step::Stop(outcome)) => return Ok(outcome),
            Err(error) => match sizer.settle(elapsed, Err::<(), _>(error)) {
                Settled::Retry(error) => {
                    tracing::warn!(rewrite = id, %error, next_pages = sizer.size(), "rewrite step timed out; retrying smaller");
                    continue;
                }
                Settled::Again(error) => {
                    tracing::debug!(rewrite = id, %error, "rewrite step rolled back (a deadlock or a change of the rules); running it again");
                    report.count("batches run again", 1);
                    tokio::time::sleep(sizer.again_pause()).await;
                    continue;
                }
                Settled::GaveUp(error)
                    if batch::is_timeout(&error) || batch::is_retryable(&error) =>
                {
                    tracing::warn!(rewrite = id, %error, "a rewrite step gave up");
                    return gave_up(ctx, id, steps, &error.to_string()).await;
                }
                Settled::GaveUp(error) => return Err(error.into()),
                Settled::Done(()) => unreachable!("an error"),
            },
        };
        if pages > 0 {
            let _ = sizer.settle_units(elapsed, pages, Ok(()));
            report.batches += 1;
            ctx.batch_done(elapsed, report, None).await;
        }
    }
}

/// A step that kept failing: recorded; before the swap, the rewrite is abandoned after a few.
async fn gave_up(
    ctx: &RunContext,
    id: i64,
    steps: Steps,
    error: &str,
) -> Result<Outcome, TaskError> {
    let failures = rewrite::failed(&ctx.pool, id, error).await?;
    tracing::warn!(rewrite = id, failures, %error, "a rewrite step kept failing");
    let mut conn = ctx.pool.acquire().await?;
    let phase = rewrite::in_progress(&mut conn)
        .await?
        .into_iter()
        .find(|r| r.id == id)
        .map(|r| r.phase);
    drop(conn);
    if failures >= FAILURES_AT_MOST
        && phase.is_some_and(Phase::before_swap)
        && rewrite::abandon(&ctx.pool, id, steps.limits, steps.lock_timeout).await?
    {
        penalise_rewrites(&ctx.pool).await?;
        return Ok(Outcome::Abandoned(format!(
            "{failures} steps failed, the last with: {error}"
        )));
    }
    Ok(Outcome::Waiting(NotNow::Failing))
}

async fn step(
    ctx: &RunContext,
    id: i64,
    steps: Steps,
    naming: Naming,
    sizer: &mut BatchSizer,
    swap_attempts: &mut usize,
    report: &mut RunReport,
) -> Result<Step, sqlx::Error> {
    let started = Instant::now();
    let mut tx = batch::begin(&ctx.pool, steps.limits).await?;
    let current = match rewrite::lock(&mut tx, id).await {
        Ok(Some(current)) => current,
        // Gone: another runner finished it (or gave it up).
        Ok(None) => return Ok(Step::Stop(Outcome::Waiting(NotNow::Taken))),
        // Another runner's step held it past the lock timeout.
        Err(error) if batch::is_lock_not_had(&error) => {
            return Ok(Step::Stop(Outcome::Waiting(NotNow::Taken)))
        }
        Err(error) => return Err(error),
    };
    match current.phase {
        Phase::CopyTasks | Phase::CopyEvents => {
            let copied = copy::chunk(&mut tx, &current, sizer.size()).await?;
            rewrite::spent(&mut tx, id, started.elapsed().as_secs_f64()).await?;
            tx.commit().await?;
            report.count("rewrite pages copied", u64::from(copied.pages));
            Ok(if copied.pages > 0 {
                Step::Pages(copied.pages)
            } else {
                Step::Other
            })
        }
        Phase::CatchUp => {
            let replayed = replay::log_pass(&mut tx, &current, CATCH_UP_PASS).await?;
            rewrite::spent(&mut tx, id, started.elapsed().as_secs_f64()).await?;
            tx.commit().await?;
            if replayed >= CAUGHT_UP_BELOW {
                return Ok(Step::Other);
            }
            // Tenants copied again (a large one takes many steps): what writers logged
            // meanwhile is caught up with first, so that the swap's final replay, under the
            // tables' lock, stays short.
            if copy_changed_tenants(ctx, id, steps).await? > 0 {
                return Ok(Step::Other);
            }
            if *swap_attempts >= SWAP_ATTEMPTS {
                return Ok(Step::Stop(Outcome::Waiting(NotNow::RulesChanged)));
            }
            *swap_attempts += 1;
            match swap::swap(&ctx.pool, id, steps.limits, steps.lock_timeout).await? {
                Ok(swapped) => {
                    telemetry::history_lock_held(task_name(&current.task), swapped.locked);
                    report.held_parents_locked(swapped.locked);
                    report.count(
                        crate::history::RANGES_REPLACED,
                        current.sources.len() as u64,
                    );
                    tracing::info!(
                        rewrite = id,
                        lower = %current.lower,
                        upper = %current.upper,
                        lock_ms = swapped.locked.as_millis() as u64,
                        "swapped the rewritten range in; counting what went"
                    );
                    Ok(Step::Swapped(swapped.locked))
                }
                Err(NotNow::RulesChanged) => Ok(Step::Other),
                Err(NotNow::SourcesBusy) if swap::sources_gone(&ctx.pool, id).await? => {
                    rewrite::abandon(&ctx.pool, id, steps.limits, steps.lock_timeout).await?;
                    Ok(Step::Stop(Outcome::Abandoned(
                        "a source range is no longer attached (detached by hand?)".into(),
                    )))
                }
                Err(why) => Ok(Step::Stop(Outcome::Waiting(why))),
            }
        }
        Phase::CountTasks | Phase::CountEvents => {
            if current.counted() {
                tx.commit().await?;
                if !count::finish(&ctx.pool, id, steps.limits, steps.lock_timeout).await? {
                    return Ok(Step::Stop(Outcome::Waiting(NotNow::Taken)));
                }
                observe_rewrite(
                    &ctx.pool,
                    current.rows_read,
                    current.tasks_kept,
                    current.seconds,
                )
                .await?;
                tracing::info!(rewrite = id, lower = %current.lower, upper = %current.upper, seconds = current.seconds, "rewrite done");
                return Ok(Step::Finished(Done {
                    lower: current.lower,
                    upper: current.upper,
                    sources: current.sources.len(),
                    locked: current
                        .lock_ms
                        .map(|ms| Duration::from_secs_f64(ms / 1000.0)),
                }));
            }
            let counted =
                count::chunk(&mut tx, &current, sizer.size(), &ctx.rule(steps.grace)).await?;
            rewrite::spent(&mut tx, id, started.elapsed().as_secs_f64()).await?;
            tx.commit().await?;
            for went in &counted.went {
                add_to_report(report, naming, went);
            }
            Ok(if counted.pages > 0 {
                Step::Pages(counted.pages)
            } else {
                Step::Other
            })
        }
    }
}

/// Copies again, key by key, the rows of every tenant whose rules changed since the rewrite's
/// rows were decided, then records the rules they now follow (and each tenant's).
async fn copy_changed_tenants(
    ctx: &RunContext,
    id: i64,
    steps: Steps,
) -> Result<usize, sqlx::Error> {
    let mut tx = batch::begin(&ctx.pool, steps.limits).await?;
    let Some(current) = rewrite::lock(&mut tx, id).await? else {
        return Ok(0);
    };
    let (version, tenants) = replay::changed_tenants(&mut tx, &current).await?;
    tx.commit().await?;
    for tenant in &tenants {
        let mut after: Option<Uuid> = None;
        loop {
            let mut tx = batch::begin(&ctx.pool, steps.limits).await?;
            let Some(current) = rewrite::lock(&mut tx, id).await? else {
                return Ok(0);
            };
            let next =
                replay::tenant_chunk(&mut tx, &current, *tenant, after, TENANT_CHUNK).await?;
            tx.commit().await?;
            match next {
                Some(last) => after = Some(last),
                None => break,
            }
        }
    }
    let mut tx = batch::begin(&ctx.pool, steps.limits).await?;
    let Some(current) = rewrite::lock(&mut tx, id).await? else {
        return Ok(0);
    };
    if version != current.rules_version {
        tracing::info!(
            rewrite = id,
            tenants = tenants.len(),
            "copied again the rows of tenants whose rules changed during the rewrite"
        );
        replay::caught_up_with(&mut tx, &current, version).await?;
    }
    let caught_up = rewrite::lock(&mut tx, id).await?.unwrap_or(current);
    replay::record_tenant_rules(&mut tx, &caught_up).await?;
    tx.commit().await?;
    Ok(tenants.len())
}

fn add_to_report(report: &mut RunReport, naming: Naming, went: &count::Went) {
    let (tasks, events, queue) = (
        went.tasks as u64,
        went.events as u64,
        went.queue_items as u64,
    );
    match naming {
        Naming::Rules => {
            let rule = match went.rule.as_str() {
                "deleted-tenants" => "deleted-tenants",
                "orphan-events" => "orphan-events",
                _ => "retention",
            };
            if rule == "orphan-events" {
                report.add_rows(rule, events);
            } else {
                report.add_rows(rule, tasks);
                report.add_rows("events", events);
            }
            report.add_rows("queue-items", queue);
        }
        Naming::Tables => {
            report.add_rows("tasks", tasks);
            report.add_rows("events", events);
            report.add_rows("queue-items", queue);
        }
    }
    if tasks > 0 {
        report.add_tenant_rows(went.tenant_id, tasks);
    }
}

fn task_name(task: &str) -> &'static str {
    match task {
        crate::tasks::partitions::NAME => crate::tasks::partitions::NAME,
        _ => crate::tasks::task_history::NAME,
    }
}

fn names(ranges: &[Range]) -> Vec<&str> {
    ranges.iter().map(|r| r.tasks_name.as_str()).collect()
}
