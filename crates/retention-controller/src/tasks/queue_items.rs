//! `queue-items`: deletes queue items whose task no longer exists, whose task is in a final state
//! (succeeded, failed, cancelled), or whose tenant has `deleted_at` set. Nothing else.

use repository::batch::{self, BatchLimits};
use repository::{queue_items, PgPool};

use crate::schedule::Schedule;
use crate::settings::QueueItemsSettings;
use crate::task::{DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "queue-items";

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

    /// One pass over the queue in id order: each batch examines the next `batch_size` items.
    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let limits = BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout).with_generic_plans();
        let mut report = RunReport::default();
        let mut after = 0i64;
        loop {
            if let Some(stop) = ctx.interrupted() {
                report.completion = stop;
                break;
            }
            let mut tx = batch::begin(&ctx.pool, limits).await?;
            let batch = queue_items::delete_batch(&mut *tx, after, self.settings.batch_size).await?;
            tx.commit().await?;
            report.record_batch("unrunnable", batch.deleted as u64);
            match batch.last_id {
                Some(last) if batch.scanned >= i64::from(self.settings.batch_size) => after = last,
                _ => break,
            }
        }
        Ok(report)
    }

    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        let mut report = DryRunReport::default();
        report.add("unrunnable", queue_items::count_due(pool).await? as u64);
        Ok(report)
    }
}
