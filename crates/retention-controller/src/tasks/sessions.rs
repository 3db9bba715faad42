//! `sessions`: deletes every `user_sessions` row that has expired (`expires_at < now`) or that
//! is anonymous (`user_id IS NULL`) and was created more than `anonymous_ttl` ago. Nothing else.
//!
//! A run chooses its walk from the planner's estimate of the rows due: a few (the usual dozens an
//! hour) go along the rule's indexes, costing O(due rows); a backlog (at least one due row per
//! heap page) goes in one pass over the heap in block ranges, at the speed of one bare DELETE. An
//! index walk that finds far more than estimated switches to the heap walk.

use std::time::Duration;

use repository::batch::{self, BatchLimits};
use repository::sessions::{self, Cursor, SessionCutoffs, SessionRule};
use repository::{clock, heap, PgPool};
use tokio::time::Instant;

use crate::batching::Settled;
use crate::block_walk::walk_blocks;
use crate::schedule::Schedule;
use crate::settings::SessionsSettings;
use crate::statistics::refresh_after_purge;
use crate::task::{Completion, DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "sessions";

pub struct SessionsTask {
    settings: SessionsSettings,
}

/// Due rows per heap page from which one pass over the heap is chosen over the indexes. An index
/// walk costs ~11 µs a row (~92k rows/s, a heap page visited per row), a heap walk ~22 µs a page
/// however many rows it holds (2.6M rows on 118k pages in ~2.6 s): they break even near two rows
/// a page. One errs toward the heap walk, whose cost is bounded by one sequential read.
const HEAP_WALK_ROWS_PER_PAGE: f64 = 1.0;
/// Below this many pages (8 MB) either walk takes milliseconds; the index walk never waits on a
/// row lock, so small tables keep it.
const HEAP_WALK_MIN_PAGES: u32 = 1_024;

const TABLE: &str = "user_sessions";

/// Due rows a run first deletes in one statement, whatever the walk after it: most runs find
/// fewer and are done (one transaction, where the walks cost a statement and a transaction per
/// part of the rule and the planner's estimate another round trip). Not with a `batch_size`
/// under it: such runs go straight to the walks.
const FEW_ROWS: u32 = 1_000;

fn heap_walk_pays(due: f64, pages: u32) -> bool {
    pages >= HEAP_WALK_MIN_PAGES && due >= HEAP_WALK_ROWS_PER_PAGE * f64::from(pages)
}

/// How the index walk ended.
enum IndexWalk {
    Finished,
    Interrupted,
    /// It deleted enough rows that the heap walk would have been cheaper: the estimate was stale.
    OverBudget,
}

impl SessionsTask {
    pub fn new(settings: SessionsSettings) -> Self {
        SessionsTask { settings }
    }

    async fn cutoffs(&self, pool: &PgPool) -> Result<SessionCutoffs, TaskError> {
        Ok(self.cutoffs_at(clock::now(pool).await?))
    }

    fn cutoffs_at(&self, now: chrono::DateTime<chrono::Utc>) -> SessionCutoffs {
        let ttl = chrono::Duration::from_std(self.settings.anonymous_ttl)
            .unwrap_or(chrono::Duration::MAX);
        SessionCutoffs::at(now, ttl)
    }

    /// The usual run's work: up to [`FEW_ROWS`] due rows in one statement, recorded in `report`
    /// (the caller reports the progress). `None` when skipped (`batch_size` asks for smaller
    /// batches); else whether that was all (fewer were due), and the batch's duration.
    async fn delete_few(
        &self,
        ctx: &RunContext,
        cutoffs: &SessionCutoffs,
        report: &mut RunReport,
    ) -> Result<Option<(bool, Duration)>, TaskError> {
        if self.settings.batch_size < FEW_ROWS {
            return Ok(None);
        }
        let started = Instant::now();
        let gone = sessions::delete_few(&ctx.pool, self.limits(ctx), cutoffs, FEW_ROWS).await?;
        let elapsed = started.elapsed();
        let deleted = gone.expired + gone.anonymous;
        if deleted > 0 {
            let parts = [
                (SessionRule::Expired.name(), gone.expired as u64),
                (SessionRule::AnonymousStale.name(), gone.anonymous as u64),
            ];
            report.record_batch_parts(
                &parts
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .collect::<Vec<_>>(),
            );
        }
        Ok(Some((deleted < i64::from(FEW_ROWS), elapsed)))
    }

    fn limits(&self, ctx: &RunContext) -> BatchLimits {
        ctx.batch_limits(BatchLimits::new(
            self.settings.statement_timeout,
            self.settings.lock_timeout,
        ))
    }

    /// Each part of the rule along its index, from a cursor, in batches of at most `batch_size`.
    async fn walk_indexes(
        &self,
        ctx: &RunContext,
        cutoffs: &SessionCutoffs,
        pages: u32,
        estimate: f64,
        report: &mut RunReport,
    ) -> Result<IndexWalk, TaskError> {
        let mut sizer = ctx.row_sizer(self.settings.batch_size);
        for rule in SessionRule::ALL {
            let mut cursor: Option<Cursor> = None;
            loop {
                if let Some(stop) = ctx.interrupted() {
                    report.completion = stop;
                    return Ok(IndexWalk::Interrupted);
                }
                if heap_walk_pays(report.deleted as f64, pages) {
                    return Ok(IndexWalk::OverBudget);
                }
                let limit = sizer.size();
                let started = Instant::now();
                let result = async {
                    let mut tx = batch::begin(&ctx.pool, self.limits(ctx)).await?;
                    let outcome =
                        sessions::delete_batch(&mut *tx, rule, cutoffs, cursor.as_ref(), limit)
                            .await?;
                    tx.commit().await?;
                    Ok(outcome)
                }
                .await;
                let elapsed = started.elapsed();
                let outcome = match sizer.settle(elapsed, result) {
                    Settled::Done(outcome) => outcome,
                    Settled::Retry(error) => {
                        tracing::warn!(rule = rule.name(), %error, next_limit = sizer.size(), "batch timed out; retrying smaller");
                        continue;
                    }
                    Settled::Again(error) => {
                        tracing::debug!(rule = rule.name(), %error, "batch rolled back by a deadlock; running it again");
                        report.count("batches run again", 1);
                        tokio::time::sleep(sizer.again_pause()).await;
                        continue;
                    }
                    Settled::GaveUp(error) => return Err(error.into()),
                };
                report.record_batch(rule.name(), outcome.deleted);
                tracing::debug!(
                    rule = rule.name(),
                    deleted = outcome.deleted,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "batch committed"
                );
                let left = (estimate - report.deleted as f64).max(0.0) as u64;
                ctx.batch_done(elapsed, report, Some(left)).await;
                // A short batch reached the end of the due rows (rows locked by a concurrent
                // request were skipped; the next run sees them again).
                if outcome.deleted < u64::from(limit) {
                    break;
                }
                cursor = outcome.next;
            }
        }
        Ok(IndexWalk::Finished)
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
        let cutoffs = self.cutoffs_at(ctx.database_clock().await?);
        let mut report = RunReport::default();
        if let Some(stop) = ctx.interrupted() {
            report.completion = stop;
            return Ok(report);
        }
        let few = self.delete_few(ctx, &cutoffs, &mut report).await?;
        if let Some((true, elapsed)) = few {
            if report.deleted > 0 {
                ctx.batch_recorded(elapsed, &mut report, Some(0));
            }
            return Ok(report);
        }
        let size = heap::size(&ctx.pool, TABLE).await?;
        let estimate = sessions::estimate_due(&ctx.pool, &cutoffs).await?;
        if let Some((_, elapsed)) = few {
            ctx.batch_done(elapsed, &mut report, Some(estimate.max(0.0).round() as u64))
                .await;
        }
        tracing::debug!(expired_before = %cutoffs.expired_before, anonymous_created_before = %cutoffs.anonymous_created_before, pages = size.pages, estimate, "cutoffs");
        let mut walk_heap = heap_walk_pays(estimate, size.pages);
        if !walk_heap {
            match self
                .walk_indexes(ctx, &cutoffs, size.pages, estimate, &mut report)
                .await?
            {
                IndexWalk::Finished => {}
                IndexWalk::Interrupted => return Ok(report),
                IndexWalk::OverBudget => {
                    tracing::info!(
                        deleted = report.deleted,
                        pages = size.pages,
                        "far more rows due than estimated; walking the heap for the rest"
                    );
                    walk_heap = true;
                }
            }
        }
        if walk_heap {
            tracing::info!(
                pages = size.pages,
                estimate,
                "backlog: walking the heap in block ranges"
            );
            let (pool, limits) = (&ctx.pool, self.limits(ctx));
            walk_blocks(ctx, &mut report, size.pages, |range| async move {
                let mut tx = batch::begin(pool, limits).await?;
                let gone = sessions::delete_block_range(&mut tx, &cutoffs, range).await?;
                tx.commit().await?;
                Ok(vec![
                    (SessionRule::Expired.name(), gone.expired as u64),
                    (SessionRule::AnonymousStale.name(), gone.anonymous as u64),
                ])
            })
            .await?;
            if report.completion != Completion::Done {
                return Ok(report);
            }
        }
        refresh_after_purge(ctx, TABLE, size, &mut report).await?;
        Ok(report)
    }

    async fn estimate_due(&self, pool: &PgPool) -> Result<Option<u64>, TaskError> {
        let cutoffs = self.cutoffs(pool).await?;
        Ok(Some(
            sessions::estimate_due(pool, &cutoffs).await?.round() as u64
        ))
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
            ..Default::default()
        })
    }
}
