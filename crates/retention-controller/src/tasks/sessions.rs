//! `sessions`: deletes every `user_sessions` row that has expired (`expires_at < now`) or that
//! is anonymous (`user_id IS NULL`) and was created more than `anonymous_ttl` ago. Nothing else.

use repository::batch::{self, BatchLimits};
use repository::sessions::{self, Cursor, SessionCutoffs, SessionRule};
use repository::{clock, PgPool};

use crate::schedule::Schedule;
use crate::settings::SessionsSettings;
use crate::task::{DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "sessions";

pub struct SessionsTask {
    settings: SessionsSettings,
}

impl SessionsTask {
    pub fn new(settings: SessionsSettings) -> Self {
        SessionsTask { settings }
    }

    async fn cutoffs(&self, pool: &PgPool) -> Result<SessionCutoffs, TaskError> {
        let now = clock::now(pool).await?;
        let ttl = chrono::Duration::from_std(self.settings.anonymous_ttl).unwrap_or(chrono::Duration::MAX);
        Ok(SessionCutoffs::at(now, ttl))
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout)
    }
}

#[async_trait::async_trait]
impl MaintenanceTask for SessionsTask {
    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.settings.schedule()
    }

    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let cutoffs = self.cutoffs(&ctx.pool).await?;
        tracing::debug!(expired_before = %cutoffs.expired_before, anonymous_created_before = %cutoffs.anonymous_created_before, "cutoffs");
        let limit = self.settings.batch_size;
        let mut report = RunReport::default();
        for rule in SessionRule::ALL {
            let mut cursor: Option<Cursor> = None;
            loop {
                if let Some(stop) = ctx.interrupted() {
                    report.completion = stop;
                    return Ok(report);
                }
                let mut tx = batch::begin(&ctx.pool, self.limits()).await?;
                let outcome = sessions::delete_batch(&mut *tx, rule, &cutoffs, cursor.as_ref(), limit).await?;
                tx.commit().await?;
                report.record_batch(rule.name(), outcome.deleted);
                tracing::debug!(rule = rule.name(), deleted = outcome.deleted, "batch committed");
                // A short batch reached the end of the due rows (rows locked by a concurrent
                // request were skipped; the next run sees them again).
                if outcome.deleted < u64::from(limit) {
                    break;
                }
                cursor = outcome.next;
            }
        }
        Ok(report)
    }

    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        let cutoffs = self.cutoffs(pool).await?;
        let due = sessions::count_due(pool, &cutoffs).await?;
        Ok(DryRunReport {
            due: due.total() as u64,
            by_rule: vec![
                (SessionRule::Expired.name(), due.expired as u64),
                (SessionRule::AnonymousStale.name(), due.anonymous as u64),
            ],
        })
    }
}
