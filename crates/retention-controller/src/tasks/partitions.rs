//! `partitions`: keeps day partitions of `tasks` and `task_events` ready ahead of today, and
//! removes a past day whole once every row in it is due under every tenant's rules (see
//! `repository::partitions` for how, and why a day holding a queued or running task of a live
//! tenant is never dropped).

use chrono::{DateTime, NaiveDate, Utc};
use repository::{clock, partitions, PgPool};

use crate::schedule::Schedule;
use crate::settings::PartitionsSettings;
use crate::task::{DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "partitions";
/// The run-report counter of days whose partitions were dropped whole.
pub const DAYS_DROPPED: &str = "days dropped";

pub struct PartitionsTask {
    settings: PartitionsSettings,
    /// The grace after which a deleted tenant's rows are due (`retention.task_history`).
    deleted_tenant_grace: std::time::Duration,
}

impl PartitionsTask {
    pub fn new(settings: PartitionsSettings, deleted_tenant_grace: std::time::Duration) -> Self {
        PartitionsTask { settings, deleted_tenant_grace }
    }

    fn days_ahead(&self, now: DateTime<Utc>) -> impl Iterator<Item = NaiveDate> {
        let today = now.date_naive();
        (0..i64::from(self.settings.premake_days)).map(move |n| today + chrono::Duration::days(n))
    }

    /// Past days whose rows are all due now.
    async fn removable_days(&self, pool: &PgPool, now: DateTime<Utc>) -> Result<Vec<NaiveDate>, TaskError> {
        Ok(partitions::summarise_partitions(pool, now, self.deleted_tenant_grace)
            .await?
            .into_iter()
            .filter_map(|(partition, summary)| {
                let day = partition.day?;
                (partitions::removal_candidate(day, now) && summary?.wholly_due()).then_some(day)
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl MaintenanceTask for PartitionsTask {
    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.settings.schedule()
    }

    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let now = clock::now(&ctx.pool).await?;
        let mut report = RunReport::default();
        let limits = repository::batch::BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout);
        // Finish a removal a crash interrupted after its DETACH.
        let mut conn = ctx.pool.acquire().await?;
        let leftovers = partitions::drop_detached_days(&mut conn).await?;
        if !leftovers.is_empty() {
            tracing::warn!(tables = ?leftovers, "dropped day tables left detached by an interrupted run");
        }
        drop(conn);
        for day in self.days_ahead(now) {
            if partitions::day_exists(&ctx.pool, day).await? {
                continue;
            }
            let mut tx = repository::batch::begin(&ctx.pool, limits).await?;
            match partitions::create_day(&mut tx, day).await {
                Ok(moved) => {
                    tx.commit().await?;
                    tracing::info!(%day, moved_from_default = moved, "created day partitions");
                    report.count("days created", 1);
                }
                // A lock the DDL could not get in time: retried on the next run, not a failure.
                Err(error) if repository::batch::is_lock_timeout(&error) => {
                    tracing::warn!(%day, "could not lock the history tables in time to add a day; retrying next run");
                }
                Err(error) => return Err(error.into()),
            }
        }
        for day in self.removable_days(&ctx.pool, now).await? {
            if let Some(stop) = ctx.interrupted() {
                report.completion = stop;
                break;
            }
            let mut tx = repository::batch::begin(&ctx.pool, limits).await?;
            match partitions::remove_day(&mut tx, day, now, self.deleted_tenant_grace, self.settings.lock_timeout).await {
                Ok(removal) => {
                    tx.commit().await?;
                    // The files go outside the parents' lock.
                    let mut conn = ctx.pool.acquire().await?;
                    partitions::drop_detached_days(&mut conn).await?;
                    tracing::info!(
                        %day,
                        tasks = removal.tasks_dropped,
                        events = removal.events_dropped,
                        queue_items = removal.queue_items_deleted,
                        kept = removal.tasks_kept,
                        "dropped day partitions"
                    );
                    report.batches += 1;
                    report.count(DAYS_DROPPED, 1);
                    report.add_rows("tasks", removal.tasks_dropped as u64);
                    report.add_rows("events", removal.events_dropped as u64);
                    report.add_rows("queue-items", removal.queue_items_deleted as u64);
                }
                // A lock the DDL could not get in time: retried on the next run, not a failure.
                Err(error) if repository::batch::is_lock_timeout(&error) => {
                    tracing::warn!(%day, "could not lock the history tables in time to drop a day; retrying next run");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(report)
    }

    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        let now = clock::now(pool).await?;
        let mut report = DryRunReport::default();
        for day in self.removable_days(pool, now).await? {
            let by_tenant = partitions::tasks_by_tenant(pool, &partitions::tasks_partition_name(day)).await?;
            let events = partitions::estimated_rows(pool, &partitions::events_partition_name(day)).await?;
            let tasks: i64 = by_tenant.iter().map(|(_, n)| n).sum();
            tracing::info!(%day, tasks, events, "would drop this day's partitions (events are a planner estimate)");
            report.add("tasks", tasks as u64);
            report.add("events (estimated)", events as u64);
            for (tenant, n) in by_tenant {
                report.add_tenant(tenant, n as u64);
            }
        }
        Ok(report)
    }
}
