//! Steps both run-history tasks take: bringing the facts up to date, and rewriting ranges
//! (compaction by `task-history`, merging by `partitions`) with what that did in the run's report.

use std::time::Duration;

use repository::batch::BatchLimits;
use repository::history::rewrite::{self, NotRewritten, Rewritten};
use repository::receipts::RunReceipt;
use repository::history::{costs, facts, Range};
use uuid::Uuid;

use crate::history_policy::Costs;
use crate::task::{RunContext, RunReport, TaskError};
use crate::telemetry;

/// The run-report counter of ranges replaced by rewrites: each a partition of `tasks` and one of
/// `task_events` dropped whole (`retention_partitions_dropped_total`).
pub const RANGES_REPLACED: &str = "ranges replaced";

/// Rebuilds the facts of ranges whose live window has passed, and applies the logged changes.
pub async fn refresh_facts(ctx: &RunContext, limits: BatchLimits, report: &mut RunReport) -> Result<(), TaskError> {
    let settled = facts::settle(&ctx.pool, limits).await?;
    if !settled.is_empty() {
        tracing::info!(ranges = ?settled, "rebuilt the facts of ranges whose day has passed");
        report.count("ranges settled", settled.len() as u64);
    }
    let refreshed = facts::refresh(&ctx.pool, limits).await?;
    tracing::debug!(tenants = refreshed.tenants, pairs = refreshed.pairs, "applied logged changes");
    Ok(())
}

/// The costs measured on this database, with the defaults where nothing was measured yet.
pub async fn load_costs(pool: &sqlx::PgPool) -> Result<Costs, TaskError> {
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
pub async fn observe_row_deletes(pool: &sqlx::PgPool, tasks: u64, spent: Duration) -> Result<(), TaskError> {
    if tasks >= 1_000 {
        costs::observe(pool, ROW_DELETE, spent.as_secs_f64() / tasks as f64).await?;
    }
    Ok(())
}

/// How a rewrite's removed rows are named in the report.
pub enum RemovedAs<'a> {
    /// `task-history`: tasks under `retention` or `deleted-tenants` (the tenants given), per tenant.
    Rules { purged: &'a [Uuid] },
    /// `partitions`: tasks, events and queue items under their table's name.
    Tables,
}

/// How a rewrite goes about it.
pub struct RewriteWith<'a> {
    pub task: &'static str,
    pub grace: Duration,
    pub limits: BatchLimits,
    /// The wait for the parents' lock.
    pub lock_timeout: Duration,
    /// Wait (up to the limits' lock timeout) for another runner's layout change to end, rather
    /// than give up at once.
    pub wait: bool,
    pub removed_as: RemovedAs<'a>,
}

/// Rewrites `sources` into one range and puts what went into `report`; `None` when it could not
/// be done now (busy, lock not had in time, rules changed), which the caller handles otherwise.
pub async fn rewrite(ctx: &RunContext, sources: &[Range], with: RewriteWith<'_>, report: &mut RunReport) -> Result<Option<Rewritten>, TaskError> {
    let RewriteWith { task, grace, limits, lock_timeout, wait, removed_as } = with;
    let started = tokio::time::Instant::now();
    let done = match rewrite::rewrite(&ctx.pool, sources, grace, limits, lock_timeout, wait, &RunReceipt { run_id: ctx.run_id, task }).await? {
        Ok(done) => done,
        Err(why) => {
            let level_warn = why == NotRewritten::LockTimeout;
            if level_warn {
                tracing::warn!(ranges = ?names(sources), reason = why.as_str(), "range not rewritten; retried later");
            } else {
                tracing::info!(ranges = ?names(sources), reason = why.as_str(), "range not rewritten; retried later");
            }
            return Ok(None);
        }
    };
    let elapsed = started.elapsed();
    let predicted = Costs::default().rewrite(done.rows_read as f64, done.tasks_kept as f64);
    costs::observe(&ctx.pool, REWRITE_SCALE, elapsed.as_secs_f64() / predicted).await?;
    telemetry::history_lock_held(task, done.locked);
    tracing::info!(
        ranges = ?names(sources),
        lower = %done.lower,
        upper = %done.upper,
        tasks_kept = done.tasks_kept,
        tasks_dropped = done.tasks_dropped(),
        events_dropped = done.events_dropped,
        queue_items = done.queue_items_deleted,
        lock_ms = done.locked.as_millis() as u64,
        elapsed_ms = elapsed.as_millis() as u64,
        "rewrote ranges: kept rows copied, the rest dropped whole"
    );
    report.batches += 1;
    report.longest_batch = report.longest_batch.max(done.locked);
    report.count(RANGES_REPLACED, done.sources as u64);
    match removed_as {
        RemovedAs::Rules { purged } => {
            for dropped in &done.dropped {
                let rule = if purged.contains(&dropped.tenant_id) { "deleted-tenants" } else { "retention" };
                report.add_rows(rule, dropped.tasks as u64);
                report.add_tenant_rows(dropped.tenant_id, dropped.tasks as u64);
            }
            report.add_rows("events", done.events_dropped as u64);
            report.add_rows("queue-items", done.queue_items_deleted as u64);
        }
        RemovedAs::Tables => {
            report.add_rows("tasks", done.tasks_dropped() as u64);
            report.add_rows("events", done.events_dropped as u64);
            report.add_rows("queue-items", done.queue_items_deleted as u64);
            for dropped in &done.dropped {
                report.add_tenant_rows(dropped.tenant_id, dropped.tasks as u64);
            }
        }
    }
    Ok(Some(done))
}

fn names(ranges: &[Range]) -> Vec<&str> {
    ranges.iter().map(|r| r.tasks_name.as_str()).collect()
}
