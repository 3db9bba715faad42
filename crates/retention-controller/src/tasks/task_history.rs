//! `task-history`: per-tenant retention of run history.
//!
//! * For each live tenant (`deleted_at IS NULL`) with a `data_retention_period` P: tasks whose
//!   status is final (succeeded, failed, cancelled) and whose `finished_at` (else `inserted_at`)
//!   is older than now - P, with their events and queue items, in one transaction per batch.
//!   Queued and running tasks of a live tenant are never deleted; NULL retention keeps forever.
//! * Tenants deleted more than `deleted_tenant_grace` ago: every task, event and queue item.
//! * Events older than an hour whose task does not exist (orphans).
//!
//! Days are left to the `partitions` task, which drops a day whole once all of its rows are
//! due: row deletes in a day take only the rows of tenants whose retention is shorter than the
//! longest one present, unless the day can never be dropped by time alone (rows kept forever,
//! unknown tenants, queued or running tasks), when every due row goes row by row.

use repository::batch::{self, BatchLimits};
use repository::history::{self, Deleted, Partition};
use repository::tenants::{self, HistoryRules};
use chrono::{DateTime, Utc};
use repository::{clock, partitions, watermarks, PgPool};

use tokio::time::Instant;
use uuid::Uuid;

use crate::batching::{BatchSizer, Settled};
use crate::schedule::Schedule;
use crate::settings::TaskHistorySettings;
use crate::task::{DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "task-history";
const ORPHAN_WATERMARK: &str = "task-history.orphan-events";

pub struct TaskHistoryTask {
    settings: TaskHistorySettings,
}

impl TaskHistoryTask {
    pub fn new(settings: TaskHistorySettings) -> Self {
        TaskHistoryTask { settings }
    }

    fn limits(&self, ctx: &RunContext) -> BatchLimits {
        ctx.batch_limits(BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout).with_generic_plans())
    }

    /// Each partition with the rules to apply in it row by row: every rule in the default (and
    /// any foreign) partition; in a day, what its summary leaves to row deletes (see
    /// `DaySummary::row_rules`). Partitions with nothing to delete are left out.
    async fn plan(&self, pool: &PgPool, now: DateTime<Utc>, rules: &HistoryRules) -> Result<Vec<(Partition, HistoryRules)>, TaskError> {
        let mut plan = Vec::new();
        for (partition, summary) in partitions::summarise_partitions(pool, now, self.settings.deleted_tenant_grace).await? {
            let here = match (partition.day, summary) {
                (Some(day), Some(summary)) => summary.row_rules(rules, partitions::removal_candidate(day, now)),
                _ => rules.clone(),
            };
            if !here.live.is_empty() || !here.purged.is_empty() {
                plan.push((partition, here));
            }
        }
        Ok(plan)
    }

    /// Deletes batch after batch from one partition until a batch comes back short.
    async fn purge_partition(
        &self,
        ctx: &RunContext,
        partition: &str,
        rules: &HistoryRules,
        report: &mut RunReport,
    ) -> Result<bool, TaskError> {
        let mut sizer = ctx.row_sizer(self.settings.batch_size);
        let mut cursors = history::Cursors::new();
        loop {
            if let Some(stop) = ctx.interrupted() {
                report.completion = stop;
                return Ok(false);
            }
            let limit = sizer.size();
            // The cursors move only with a committed batch.
            let mut moved = cursors.clone();
            let started = Instant::now();
            let result = async {
                let mut tx = batch::begin(&ctx.pool, self.limits(ctx)).await?;
                let deleted = history::delete_retained_batch(&mut *tx, partition, rules, &mut moved, limit).await?;
                tx.commit().await?;
                Ok((deleted, None))
            }
            .await;
            let Some((deleted, _)) = self.settle(ctx, &mut sizer, started, result, report, "retention").await? else { continue };
            cursors = moved;
            if deleted.tasks < i64::from(limit) {
                break;
            }
        }
        for tenant in &rules.purged {
            let mut after = None;
            loop {
                if let Some(stop) = ctx.interrupted() {
                    report.completion = stop;
                    return Ok(false);
                }
                let limit = sizer.size();
                let started = Instant::now();
                let result = async {
                    let mut tx = batch::begin(&ctx.pool, self.limits(ctx)).await?;
                    let batch = history::delete_purged_batch(&mut *tx, partition, *tenant, after, limit).await?;
                    tx.commit().await?;
                    Ok(batch)
                }
                .await;
                let Some((deleted, next)) = self.settle(ctx, &mut sizer, started, result, report, "deleted-tenants").await? else { continue };
                if deleted.tasks < i64::from(limit) {
                    break;
                }
                after = next;
            }
        }
        Ok(true)
    }

    /// Records a history batch (what it deleted, and where a purge continues): its rows when
    /// committed (then paces), `None` when it timed out and is to be retried smaller.
    async fn settle(
        &self,
        ctx: &RunContext,
        sizer: &mut BatchSizer,
        started: Instant,
        result: Result<(Deleted, Option<Uuid>), sqlx::Error>,
        report: &mut RunReport,
        rule: &'static str,
    ) -> Result<Option<(Deleted, Option<Uuid>)>, TaskError> {
        let elapsed = started.elapsed();
        match sizer.settle(elapsed, result) {
            Settled::Done(batch) => {
                record(report, rule, &batch.0);
                ctx.batch_done(elapsed, report, None).await;
                Ok(Some(batch))
            }
            Settled::Retry(error) => {
                tracing::warn!(rule, %error, next_limit = sizer.size(), "batch timed out; retrying smaller");
                Ok(None)
            }
            Settled::GaveUp(error) => Err(error.into()),
        }
    }

    /// Walks events that arrived since the last run and deletes orphans older than an hour.
    async fn purge_orphan_events(&self, ctx: &RunContext, now: chrono::DateTime<chrono::Utc>, report: &mut RunReport) -> Result<(), TaskError> {
        let limit = self.settings.batch_size.max(1000);
        let mut position = watermarks::get(&ctx.pool, ORPHAN_WATERMARK).await?;
        let mut safe = position;
        let mut undecided = false;
        loop {
            if let Some(stop) = ctx.interrupted() {
                report.completion = stop;
                break;
            }
            let started = Instant::now();
            let mut tx = batch::begin(&ctx.pool, self.limits(ctx)).await?;
            let batch = history::delete_orphan_events_batch(&mut *tx, position, now - partitions::MIN_AGE, limit).await?;
            if let Some(first) = batch.first_undecided {
                // A young orphan: the watermark stays before it until it is an hour old.
                if !undecided {
                    safe = first - 1;
                    undecided = true;
                }
            }
            if let Some(last) = batch.last_id {
                position = last;
                if !undecided {
                    safe = last;
                }
            }
            watermarks::set(&mut *tx, ORPHAN_WATERMARK, safe).await?;
            tx.commit().await?;
            report.record_batch("orphan-events", batch.deleted as u64);
            ctx.batch_done(started.elapsed(), report, None).await;
            if batch.scanned < i64::from(limit) {
                break;
            }
        }
        Ok(())
    }
}

fn record(report: &mut RunReport, rule: &'static str, deleted: &Deleted) {
    report.record_batch(rule, deleted.tasks as u64);
    for (tenant, tasks) in &deleted.by_tenant {
        report.add_tenant_rows(*tenant, *tasks as u64);
    }
    report.add_rows("events", deleted.events as u64);
    report.add_rows("queue-items", deleted.queue_items as u64);
}

#[async_trait::async_trait]
impl MaintenanceTask for TaskHistoryTask {
    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.settings.schedule()
    }

    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let now = clock::now(&ctx.pool).await?;
        let rules = tenants::history_rules(&ctx.pool, now, self.settings.deleted_tenant_grace).await?;
        tracing::debug!(live = rules.live.len(), purged = rules.purged.len(), "tenant rules");
        let mut report = RunReport::default();
        for (partition, here) in self.plan(&ctx.pool, now, &rules).await? {
            if !self.purge_partition(ctx, &partition.name, &here, &mut report).await? {
                return Ok(report);
            }
        }
        self.purge_orphan_events(ctx, now, &mut report).await?;
        Ok(report)
    }

    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        let now = clock::now(pool).await?;
        let rules = tenants::history_rules(pool, now, self.settings.deleted_tenant_grace).await?;
        let mut report = DryRunReport::default();
        for (partition, here) in self.plan(pool, now, &rules).await? {
            for due in history::count_due(pool, &partition.name, &here).await? {
                report.add("retention", due.retained as u64);
                report.add("deleted-tenants", due.purged as u64);
                report.add_tenant(due.tenant_id, (due.retained + due.purged) as u64);
            }
        }
        let orphans = history::count_orphan_events(pool, watermarks::get(pool, ORPHAN_WATERMARK).await?, now - partitions::MIN_AGE).await?;
        report.add("orphan-events", orphans as u64);
        Ok(report)
    }
}
