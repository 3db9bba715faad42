//! Steps both run-history tasks take: bringing the facts up to date, and keeping the measured
//! costs that choose between row deletes and a rewrite (driven by [`crate::rewrites`]).

use std::time::Duration;

use repository::batch::{self, BatchLimits};
use repository::history::{costs, deletes, facts, LogMode};
use tokio::time::Instant;

use crate::batching::Settled;

use crate::history_policy::Costs;
use crate::task::{RunContext, RunReport, TaskError};

/// The run-report counter of ranges replaced by rewrites: each a partition of `tasks` and one of
/// `task_events` dropped whole (`retention_partitions_dropped_total`).
pub const RANGES_REPLACED: &str = "ranges replaced";

/// Rebuilds the facts of ranges whose day has passed (or that were never built), and applies the
/// logged changes. A live range whose end has passed is switched to log every write first,
/// waiting at most `lock_timeout` (the history tables' lock wait) for its writers.
pub async fn refresh_facts(
    ctx: &RunContext,
    limits: BatchLimits,
    grace: Duration,
    lock_timeout: Duration,
    report: &mut RunReport,
) -> Result<(), TaskError> {
    settle(ctx, facts::bookkeeping(limits), grace, lock_timeout, report).await?;
    let refreshed = facts::refresh(&ctx.pool, limits, &ctx.rule(grace)).await?;
    tracing::debug!(
        tenants = refreshed.tenants,
        pairs = refreshed.pairs,
        "applied logged changes"
    );
    Ok(())
}

/// Pages a rebuild's first step reads (it grows toward the batch duration from there).
const REBUILD_FIRST_PAGES: u32 = 64;

/// Rebuilds the facts of every range that needs it, in block ranges (each a short transaction,
/// paced like a batch), however large the range: one bare read of it in all. Stops between steps
/// when the run is interrupted; the rebuild resumes where it stopped.
async fn settle(
    ctx: &RunContext,
    limits: BatchLimits,
    grace: Duration,
    lock_timeout: Duration,
    report: &mut RunReport,
) -> Result<(), TaskError> {
    let mut sizer = ctx.block_sizer_within(REBUILD_FIRST_PAGES, limits.statement_timeout);
    for range in facts::to_settle(&ctx.pool, ctx.now()).await? {
        if ctx.interrupted().is_some() {
            return Ok(());
        }
        if range.log_mode == LogMode::Live
            && !facts::switch_to_all(&ctx.pool, &range, limits, lock_timeout).await?
        {
            tracing::warn!(
                range = range.tasks_name,
                "writers kept the range's tables busy: it stays live (probed) until the next run"
            );
            continue;
        }
        loop {
            if ctx.interrupted().is_some() {
                return Ok(());
            }
            let started = Instant::now();
            let mut tx = batch::begin(&ctx.pool, limits.with_lock_timeout(lock_timeout)).await?;
            let Some(block) = facts::rebuild_take(&mut tx, range.tasks_relid).await? else {
                // Another runner is rebuilding it.
                tx.rollback().await?;
                break;
            };
            let result =
                facts::rebuild_chunk(&mut tx, range.tasks_relid, block, sizer.size()).await;
            match result {
                Ok(0) => {
                    facts::rebuild_finish(&mut tx, range.tasks_relid, &ctx.rule(grace)).await?;
                    tx.commit().await?;
                    tracing::info!(
                        range = range.tasks_name,
                        "rebuilt the facts of a range whose day has passed"
                    );
                    report.count("ranges settled", 1);
                    break;
                }
                Ok(pages) => {
                    tx.commit().await?;
                    let elapsed = started.elapsed();
                    let _ = sizer.settle_units(elapsed, pages, Ok(()));
                    report.count("fact pages read", u64::from(pages));
                    ctx.pause_after(elapsed).await;
                }
                // A layout change holding the range's tables (a carve attaching beside the
                // default range), or a batch too large: smaller, or the next run.
                Err(error) if batch::is_timeout(&error) => {
                    drop(tx);
                    match sizer.settle(started.elapsed(), Err::<(), _>(error)) {
                        Settled::GaveUp(error) => {
                            tracing::warn!(range = range.tasks_name, %error, "the range's facts could not be rebuilt now; the next run goes on");
                            break;
                        }
                        _ => continue,
                    }
                }
                // The range's tables were dropped meanwhile (a rewrite swapped it out).
                Err(error) if deletes::is_undefined_table(&error) => break,
                Err(error) => return Err(error.into()),
            }
        }
    }
    Ok(())
}

/// The costs measured on this database, with the defaults where nothing was measured yet.
pub async fn load_costs(pool: &sqlx::PgPool) -> Result<Costs, sqlx::Error> {
    let mut measured = Costs::default();
    for (operation, seconds) in costs::load(pool).await? {
        match operation.as_str() {
            ROW_DELETE => measured.row_delete_per_task = seconds,
            REWRITE_SCALE => {
                let base = Costs::default();
                measured.rewrite_per_task_read = base.rewrite_per_task_read * seconds;
                measured.rewrite_per_task_kept = base.rewrite_per_task_kept * seconds;
                measured.rewrite_fixed = base.rewrite_fixed * seconds;
            }
            _ => {}
        }
    }
    Ok(measured)
}

/// Seconds per task deleted row by row (with its events and queue items).
pub const ROW_DELETE: &str = "row-delete";
/// A rewrite's observed time over what the default costs predict.
const REWRITE_SCALE: &str = "rewrite-scale";

/// Records the time row deletes took, once enough tasks went for the figure to mean something.
pub async fn observe_row_deletes(
    pool: &sqlx::PgPool,
    tasks: u64,
    spent: Duration,
) -> Result<(), TaskError> {
    if tasks >= 1_000 {
        costs::observe(pool, ROW_DELETE, spent.as_secs_f64() / tasks as f64).await?;
    }
    Ok(())
}

/// Records what a completed rewrite cost (its steps' time, against what the default costs
/// predict for the rows it read and kept).
pub async fn observe_rewrite(
    pool: &sqlx::PgPool,
    rows_read: i64,
    kept: i64,
    seconds: f64,
) -> Result<(), sqlx::Error> {
    let predicted = Costs::default().rewrite(rows_read as f64, kept as f64);
    costs::observe(pool, REWRITE_SCALE, seconds / predicted).await
}

/// A rewrite that was abandoned after its steps kept failing makes rewrites look dearer: the
/// next choices lean to row deletes, until rewrites that complete bring the figure down again.
pub async fn penalise_rewrites(pool: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    let current = load_costs(pool)
        .await
        .map(|c| c.rewrite_fixed / Costs::default().rewrite_fixed)
        .unwrap_or(1.0);
    costs::observe(
        pool,
        REWRITE_SCALE,
        (current * REWRITE_FAILURE_PENALTY).max(REWRITE_FAILURE_PENALTY),
    )
    .await
}

/// How much dearer a failed rewrite makes the next (averaged in with a fifth of its weight).
const REWRITE_FAILURE_PENALTY: f64 = 10.0;
