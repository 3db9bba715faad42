//! `queue-items`: deletes queue items whose task no longer exists, whose task is in a final state
//! (succeeded, failed, cancelled), or whose tenant has `deleted_at` set. Nothing else.

use repository::batch::{self, BatchLimits};
use repository::{heap, queue_items, PgPool};

use crate::block_walk::walk_blocks;
use crate::schedule::Schedule;
use crate::settings::QueueItemsSettings;
use crate::statistics::refresh_after_purge;
use crate::task::{Completion, DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "queue-items";
const TABLE: &str = "queue_items";
const RULE: &str = "unrunnable";

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

    /// One pass over the queue's heap in block ranges: every item is examined once.
    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let limits = ctx.batch_limits(BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout).with_generic_plans());
        let size = heap::size(&ctx.pool, TABLE).await?;
        let mut report = RunReport::default();
        let pool = &ctx.pool;
        walk_blocks(ctx, &mut report, size.pages, |range| async move {
            let mut tx = batch::begin(pool, limits).await?;
            let deleted = queue_items::delete_block_range(&mut *tx, range).await?;
            tx.commit().await?;
            Ok(vec![(RULE, deleted as u64)])
        })
        .await?;
        if report.completion == Completion::Done {
            refresh_after_purge(ctx, TABLE, size, &mut report).await?;
        }
        Ok(report)
    }

    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        let mut report = DryRunReport::default();
        report.add(RULE, queue_items::count_due(pool).await? as u64);
        Ok(report)
    }
}
