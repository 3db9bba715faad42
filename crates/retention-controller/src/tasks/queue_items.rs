//! `queue-items`: deletes queue items whose task no longer exists, whose task is in a final state
//! (succeeded, failed, cancelled), or whose tenant has `deleted_at` set. Nothing else.
//!
//! Steady state costs the items due: row triggers on `tasks` record the tasks with queue items
//! that finish or are deleted (`queue_item_candidates`), and deleted tenants' items are found through
//! the tenant index. A walk of the whole heap runs on the first run and every `sweep_interval`.

use repository::batch::{self, BatchLimits};
use repository::{clock, heap, queue_items, watermarks, PgPool};
use tokio::time::Instant;

use crate::batching::Settled;
use crate::block_walk::walk_blocks;
use crate::schedule::Schedule;
use crate::settings::QueueItemsSettings;
use crate::statistics::refresh_after_purge;
use crate::task::{Completion, DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "queue-items";
const TABLE: &str = "queue_items";
const RULE: &str = "unrunnable";

/// When the last complete walk of the heap started (Unix seconds), in `retention_watermarks`.
const SWEPT_AT: &str = "queue-items.swept-at";
/// Candidates a batch takes at most (its size adapts below that).
const CANDIDATES_PER_BATCH: u32 = 1_000;

pub struct QueueItemsTask {
    settings: QueueItemsSettings,
}

impl QueueItemsTask {
    pub fn new(settings: QueueItemsSettings) -> Self {
        QueueItemsTask { settings }
    }
}

#[async_trait::async_trait]
impl MaintenanceTask for QueueItemsTask {
    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.settings.schedule()
    }

    /// The recorded candidates and the deleted tenants' items, by index: O(items due). Then,
    /// once every `sweep_interval` (and on the first run), one pass over the queue's heap in
    /// block ranges, examining every item once: it finds what no trigger recorded, and is how a
    /// backlog goes.
    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let limits = ctx.batch_limits(
            BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout)
                .with_generic_plans(),
        );
        let mut report = RunReport::default();
        let pool = &ctx.pool;
        let receipt = repository::receipts::RunReceipt::new(ctx.run_id, NAME);
        let receipt = &receipt;
        // Queue items go by the rule of run history (its holds), at the run's checked clock.
        let grace = std::time::Duration::ZERO;
        let mut sizer = ctx.row_sizer(CANDIDATES_PER_BATCH);
        loop {
            if let Some(stop) = ctx.interrupted() {
                report.completion = stop;
                return Ok(report);
            }
            let limit = i64::from(sizer.size());
            let started = Instant::now();
            let result = async {
                let mut tx = batch::begin(pool, limits).await?;
                let rule = ctx.rule(grace);
                let candidates =
                    queue_items::delete_candidates_batch(&mut tx, limit, &rule, receipt).await?;
                let of_deleted_tenants =
                    queue_items::delete_of_deleted_tenants_batch(&mut tx, limit, &rule, receipt)
                        .await?;
                tx.commit().await?;
                Ok((candidates, of_deleted_tenants))
            }
            .await;
            let elapsed = started.elapsed();
            let (candidates, of_deleted_tenants) = match sizer.settle(elapsed, result) {
                Settled::Done(done) => done,
                Settled::Retry(error) => {
                    tracing::warn!(%error, next_limit = sizer.size(), "queue-items batch timed out; retrying smaller");
                    continue;
                }
                Settled::Again(error) => {
                    tracing::debug!(%error, "queue-items batch rolled back (a deadlock or a change of the rules); running it again");
                    report.count("batches run again", 1);
                    tokio::time::sleep(sizer.again_pause()).await;
                    continue;
                }
                Settled::GaveUp(error) => return Err(error.into()),
            };
            let deleted = candidates.deleted + of_deleted_tenants;
            if candidates.candidates > 0 || deleted > 0 {
                report.record_batch(RULE, deleted as u64);
                ctx.batch_done(elapsed, &mut report, None).await;
            }
            if candidates.candidates < limit && of_deleted_tenants < limit {
                break;
            }
        }
        if !queue_items::sweep_due(
            pool,
            SWEPT_AT,
            self.settings.sweep_interval.as_secs() as i64,
            ctx.now(),
        )
        .await?
        {
            return Ok(report);
        }
        let swept_from = ctx.now();
        let size = heap::size(pool, TABLE).await?;
        walk_blocks(ctx, &mut report, size.pages, |range| async move {
            let mut tx = batch::begin(pool, limits).await?;
            let deleted =
                queue_items::delete_block_range(&mut tx, range, &ctx.rule(grace), receipt).await?;
            tx.commit().await?;
            Ok(vec![(RULE, deleted as u64)])
        })
        .await?;
        if report.completion == Completion::Done {
            watermarks::set(pool, SWEPT_AT, swept_from.timestamp()).await?;
            report.count("heap swept", 1);
            refresh_after_purge(ctx, TABLE, size, &mut report).await?;
        }
        Ok(report)
    }

    /// The planner's estimate (see [`queue_items::estimate_due`]).
    async fn estimate_due(&self, pool: &PgPool) -> Result<Option<u64>, TaskError> {
        let rule = repository::rule::Rule::new(clock::now(pool).await?, std::time::Duration::ZERO);
        Ok(Some(
            queue_items::estimate_due(pool, &rule).await?.round() as u64
        ))
    }

    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        let mut report = DryRunReport::default();
        let rule = repository::rule::Rule::new(clock::now(pool).await?, std::time::Duration::ZERO);
        report.add(
            RULE,
            queue_items::count_due(pool, &rule, self.settings.statement_timeout).await? as u64,
        );
        Ok(report)
    }
}
