//! `task-history`: per-tenant retention of run history. After a run that ends `done`, no task
//! that was due when it started remains, nor its events and queue items.
//!
//! * Due (`repository::rule`, the one rule): a final task (succeeded, failed, cancelled) of a
//!   live tenant whose `finished_at` (else `inserted_at`) is older than now minus its
//!   `data_retention_period`; every task of a tenant deleted more than `deleted_tenant_grace` ago.
//!   Queued and running tasks of a live tenant never; NULL retention keeps forever; rows of a
//!   tenant id with no tenants row are named by no rule. Evaluated against the tenant's row as it
//!   is in every batch.
//! * Orphan events (whose task does not exist) older than an hour.
//!
//! The run finds what is due from the facts (`repository::history::facts`): the (range, tenant)
//! pairs whose next due instant has come, the pairs of purged tenants, and, in ranges whose own
//! day is still live, one probe per tenant whose window is shorter than the range's age. For each
//! range it then chooses (`history_policy::choose`, by the costs measured here) between deleting
//! the due rows one batch at a time and rewriting the range with only what it keeps.

use std::collections::BTreeMap;
use std::time::Duration;

use repository::batch::{self, BatchLimits};
use repository::history::deletes::{self, PairRef, Walk};
use repository::history::facts::{self, Pair, ProbeScope};
use repository::history::{previews, ranges, Range, RangeKind};
use repository::receipts::RunReceipt;
use repository::rule::Rule;
use repository::{clock, heap, watermarks, PgPool};
use sqlx::postgres::types::Oid;
use tokio::time::Instant;
use uuid::Uuid;

use crate::batching::{BatchSizer, Settled};
use crate::block_walk::walk_blocks_sized;
use crate::history as shared;
use crate::history_policy::{choose, Costs, Estimate, Removal};
use crate::rewrites::{self, Naming, Outcome, Steps};
use crate::schedule::Schedule;
use crate::settings::TaskHistorySettings;
use crate::task::{DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "task-history";
const ORPHAN_WATERMARK: &str = "task-history.orphan-events";

pub struct TaskHistoryTask {
    settings: TaskHistorySettings,
    /// How often every range's events are swept for orphans the orphan walk cannot see
    /// (`retention.queue_items.sweep_interval`).
    orphan_sweep_interval: Duration,
    /// The wait for the parents' lock when a range is compacted.
    compaction_lock_timeout: Duration,
    /// Log lines older than this go, for tenants without a window of their own
    /// (`retention.task_logs.max_age`).
    log_window: Duration,
    /// The measured costs, and when they were read: they move slowly, so a run reads them at
    /// most every few minutes.
    costs: std::sync::Mutex<Option<(Costs, std::time::Instant)>>,
    /// Where archiving tenants' runs are written before they may go (`storage.url`); none: an
    /// archiving tenant's tasks wait (the rule keeps them until an archive holds them).
    archive_storage: Option<std::sync::Arc<crate::storage::Storage>>,
}

/// How long measured costs are used before they are read again.
const COSTS_READ_EVERY: Duration = Duration::from_secs(300);

/// The receipts this run's deletes add to.
fn receipt(ctx: &RunContext) -> RunReceipt {
    RunReceipt::new(ctx.run_id, NAME)
}

/// How one pair's row deletes ended.
enum PairDone {
    Finished,
    Interrupted,
    /// The range is being rewritten (or is gone): plan again once the rewrite is over.
    RangeMissing,
}

/// How a sweep of a range's pages ended.
enum Swept {
    /// Every page was walked; the facts say these pairs still hold due rows.
    Done {
        still_due: Vec<Pair>,
    },
    Interrupted,
    /// The range is being rewritten (or is gone): plan again once the rewrite is over.
    RangeMissing,
}

/// What a sweep's batches have deleted so far, per tenant, and whether they found the range gone.
#[derive(Default)]
struct SweepState {
    gone: BTreeMap<Uuid, i64>,
    missing: bool,
}

/// A range is swept page by page, rather than walked pair by pair through the indexes, when it has
/// at least this many pages and at least this many due tasks a page. The index walk costs ~40 µs
/// a task with its events (a probe and a lock per task, a statement and a facts probe per
/// tenant); a sweep reads every page (~30 µs a page of ~90 tasks) and deletes at the speed of one
/// bare DELETE (`bench history`, backlog section).
const SWEEP_ROWS_PER_PAGE: f64 = 1.0;
/// 1 MB: below it either way takes milliseconds, and the index walk never waits on a row lock.
const SWEEP_MIN_PAGES: u32 = 128;
/// The pages of a run's first sweep batch.
const SWEEP_FIRST_PAGES: u32 = 16;

/// What row deletes cost in a run: the time their batches took and the tasks they deleted.
#[derive(Default)]
struct RowDeleteCost {
    spent: Duration,
    tasks: u64,
}

/// The work of one run, range by range.
type Plan = Vec<(Range, Vec<Pair>)>;

impl TaskHistoryTask {
    pub fn new(settings: TaskHistorySettings) -> Self {
        TaskHistoryTask {
            settings,
            orphan_sweep_interval: crate::settings::QueueItemsSettings::default().sweep_interval,
            compaction_lock_timeout: crate::settings::DEFAULT_HISTORY_LOCK_TIMEOUT,
            log_window: crate::settings::DEFAULT_LOG_MAX_AGE,
            costs: Default::default(),
            archive_storage: None,
        }
    }

    /// Log lines go after this, for tenants without a window of their own (`retention.task_logs.max_age`).
    pub fn with_log_window(self, window: Duration) -> Self {
        TaskHistoryTask {
            log_window: window,
            ..self
        }
    }

    /// Every range's events are swept for late orphans this often (`retention.queue_items.sweep_interval`).
    /// Archives go to `storage` (see [`crate::archive`]).
    pub fn with_archive_storage(self, storage: std::sync::Arc<crate::storage::Storage>) -> Self {
        TaskHistoryTask {
            archive_storage: Some(storage),
            ..self
        }
    }

    /// The archiving tenants' due tasks written to their archives, before anything is deleted.
    async fn archive_due(&self, ctx: &RunContext, report: &mut RunReport) -> Result<(), TaskError> {
        let Some(storage) = &self.archive_storage else {
            return Ok(());
        };
        let rule = ctx.rule(self.settings.deleted_tenant_grace);
        let interrupted = || ctx.interrupted().is_some();
        let run = crate::archive::ArchiveRun {
            pool: &ctx.pool,
            storage,
            rule: &rule,
            run_id: ctx.run_id,
            lease_run: Some(ctx.run_id),
            receipt: receipt(ctx),
            limits: crate::archive::ArchiveLimits::default(),
            interrupted: &interrupted,
            pace: Some(ctx),
        };
        let archived = match crate::archive::archive_due(&run).await {
            Ok(archived) => archived,
            // The rest of the run goes on: what waits for its archive stays, by the rule.
            Err(error) => crate::archive::Archived {
                failures: 1,
                first_error: Some(error.to_string()),
                ..Default::default()
            },
        };
        report.count("archive files written", archived.files);
        report.count("tasks archived", archived.tasks);
        report.count("archive bytes written", archived.bytes);
        report.count("archives expired", archived.expired);
        if archived.late_rows > 0 {
            report.count("late rows of archived runs kept", archived.late_rows as u64);
            tracing::warn!(rows = archived.late_rows, "rows were written to archived runs while retention deleted them: kept, in no archive (docs/operations.md, \"Archiving\")");
        }
        if archived.failures > 0 {
            report.count("archive failures", archived.failures);
            tracing::warn!(
                failures = archived.failures,
                first_error = archived.first_error.as_deref().unwrap_or(""),
                "some archive files were not written; their tasks stay until a run archives them"
            );
        }
        if !archived.keys.is_empty() {
            tracing::info!(files = archived.files, tasks = archived.tasks, bytes = archived.bytes, keys = ?archived.keys, "archived");
        }
        Ok(())
    }

    /// The archive lag, at the end of a run (when the runs archived at its start are deleted,
    /// and the probe has only what still waits to walk past): how long the oldest waiting task
    /// has been due. Bounded by a statement timeout; left as it was when that passes.
    async fn measure_archive_lag(&self, ctx: &RunContext) {
        if self.archive_storage.is_none() {
            return;
        }
        let rule = ctx.rule(self.settings.deleted_tenant_grace);
        let probe = async {
            let mut tx = ctx.pool.begin().await?;
            // A setting, not a statement on the schema: nothing for the checked macros to check.
            sqlx::query("SET LOCAL statement_timeout = '5s'")
                .execute(&mut *tx)
                .await?;
            let oldest = repository::archives::oldest_waiting(&mut tx, &rule).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(oldest)
        };
        match probe.await {
            Ok(oldest) => crate::telemetry::archive_lag(
                oldest
                    .map(|at| (ctx.now() - at).to_std().unwrap_or_default())
                    .unwrap_or_default(),
            ),
            Err(error) => tracing::debug!(%error, "measuring the archive lag"),
        }
    }

    pub fn with_orphan_sweep_interval(self, interval: Duration) -> Self {
        TaskHistoryTask {
            orphan_sweep_interval: interval,
            ..self
        }
    }

    /// Compactions wait this long at most for the history tables' lock (`retention.partitions.lock_timeout`).
    pub fn with_compaction_lock_timeout(self, lock_timeout: Duration) -> Self {
        TaskHistoryTask {
            compaction_lock_timeout: lock_timeout,
            ..self
        }
    }

    /// Row-delete batches' limits.
    fn limits(&self, ctx: &RunContext) -> BatchLimits {
        ctx.batch_limits(self.base_limits())
    }

    /// The facts' and rewrites' limits: statements protected by locks rather than the lease.
    fn locked_limits(&self, ctx: &RunContext) -> BatchLimits {
        ctx.locked_limits(self.base_limits())
    }

    fn base_limits(&self) -> BatchLimits {
        BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout)
            .with_generic_plans()
            .with_history_write()
    }

    /// Every range with something due now (by `ctx`'s clock), with its due pairs, and that now.
    async fn plan(
        &self,
        ctx: &RunContext,
    ) -> Result<(Plan, chrono::DateTime<chrono::Utc>), TaskError> {
        // One snapshot: the layout and the rows probed as of the same moment. A carve committed
        // in between used to hide the rows it moved: gone from the range the plan knew, in a
        // range it did not. With one snapshot the plan names them where they were, and the
        // batches, finding that range's bounds moved, make the run plan again.
        let mut tx = repository::batch::begin_snapshot(&ctx.pool).await?;
        let rule = ctx.rule(self.settings.deleted_tenant_grace);
        let now = rule.now;
        let all = ranges::all(&mut *tx).await?;
        let mut pairs = facts::due_pairs(&mut *tx, &rule).await?;
        let bound = facts::probe_bound(&mut *tx, &rule).await?;
        let may_hold_due =
            |r: &&Range| bound.is_some_and(|b| r.lower.is_none_or(|lower| lower <= b));
        // Live ranges are probed whole; any other whose change log still waits (another runner
        // applying it in passes) for the tenants it names.
        let pending = facts::with_pending_changes(&mut *tx).await?;
        for range in all.iter().filter(may_hold_due) {
            let scope = if range.is_live() {
                ProbeScope::AllTenants
            } else if pending.contains(&range.tasks_relid) {
                ProbeScope::PendingChanges
            } else {
                continue;
            };
            for probed in facts::probe(&mut *tx, range, &rule, scope).await? {
                if !pairs
                    .iter()
                    .any(|p| p.tasks_relid == probed.tasks_relid && p.tenant_id == probed.tenant_id)
                {
                    pairs.push(probed);
                }
            }
        }
        tx.commit().await?;
        let mut by_range: BTreeMap<u32, Vec<Pair>> = BTreeMap::new();
        for pair in pairs {
            by_range.entry(pair.tasks_relid.0).or_default().push(pair);
        }
        Ok((
            all.into_iter()
                .filter_map(|range| {
                    by_range
                        .remove(&range.tasks_relid.0)
                        .map(|pairs| (range, pairs))
                })
                .collect(),
            now,
        ))
    }

    /// Deletes the due rows of one pair, batch by batch (a purged tenant's by id; a live tenant's
    /// status by status, each along its own window), then probes the pair again. Its log lines
    /// carry the tenant and the range (JSON logs show them as fields of the `pair` span).
    #[tracing::instrument(name = "pair", skip_all, fields(tenant = %pair.tenant_id, range = %range.tasks_name))]
    async fn delete_pair(
        &self,
        ctx: &RunContext,
        range: &Range,
        pair: &Pair,
        report: &mut RunReport,
        cost: &mut RowDeleteCost,
        sizer: &mut BatchSizer,
    ) -> Result<(PairDone, i64), TaskError> {
        let target = PairRef::new(range, pair.tenant_id);
        let mut walks: Vec<Walk> = if pair.purged {
            vec![Walk::purged()]
        } else {
            pair.statuses_to_walk()
                .into_iter()
                .map(Walk::retained)
                .collect()
        };
        let rule = if pair.purged {
            "deleted-tenants"
        } else {
            "retention"
        };
        let mut deleted_here = 0i64;
        if walks.is_empty() {
            // Planned by facts that say nothing is due after all (a window lengthened): their next
            // due instant moves on.
            let mut tx = repository::batch::begin_bookkeeping(&ctx.pool).await?;
            facts::resummarise(
                &mut tx,
                &[(range.tasks_relid, pair.tenant_id, 0)],
                &ctx.rule(self.settings.deleted_tenant_grace),
            )
            .await?;
            tx.commit().await?;
            return Ok((PairDone::Finished, 0));
        }
        let outcome = loop {
            if ctx.interrupted().is_some() {
                break PairDone::Interrupted;
            }
            let limit = sizer.size();
            let mut moved = walks[0].clone();
            let last_walk = walks.len() == 1;
            let started = Instant::now();
            let result = async {
                let mut tx = batch::begin(&ctx.pool, self.limits(ctx)).await?;
                let rule = ctx.rule(self.settings.deleted_tenant_grace);
                let done = deletes::delete_batch(
                    &mut tx,
                    &target,
                    &mut moved,
                    &rule,
                    limit,
                    &receipt(ctx),
                )
                .await?;
                // A missing range needs no facts (and its transaction may have failed on a
                // dropped table: nothing more may run in it).
                if !done.range_missing && done.examined < i64::from(limit) && last_walk {
                    // The pair's last walk ends with this batch: its facts move on in its transaction.
                    let deleted = deleted_here + done.deleted.tasks;
                    facts::resummarise(
                        &mut tx,
                        &[(range.tasks_relid, pair.tenant_id, -deleted)],
                        &rule,
                    )
                    .await?;
                }
                tx.commit().await?;
                Ok(done)
            }
            .await;
            let elapsed = started.elapsed();
            let done = match sizer.settle(elapsed, result) {
                Settled::Done(done) => done,
                Settled::Retry(error) => {
                    tracing::warn!(rule, %error, next_limit = sizer.size(), "batch timed out; retrying smaller");
                    continue;
                }
                Settled::Again(error) => {
                    tracing::debug!(rule, %error, "batch rolled back (a deadlock or a change of the rules); running it again");
                    report.count("batches run again", 1);
                    tokio::time::sleep(sizer.again_pause()).await;
                    continue;
                }
                Settled::GaveUp(error) => return Err(error.into()),
            };
            if done.range_missing {
                break PairDone::RangeMissing;
            }
            tracing::debug!(
                rule,
                range = range.tasks_name,
                tenant = %pair.tenant_id,
                tasks = done.deleted.tasks,
                events = done.deleted.events,
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                "batch committed"
            );
            walks[0] = moved;
            cost.spent += elapsed;
            cost.tasks += done.deleted.tasks as u64;
            deleted_here += done.deleted.tasks;
            report.record_batch(rule, done.deleted.tasks as u64);
            report.add_tenant_rows(pair.tenant_id, done.deleted.tasks as u64);
            report.add_rows("events", done.deleted.events as u64);
            report.add_rows("queue-items", done.deleted.queue_items as u64);
            report.add_rows("payloads", done.deleted.payloads as u64);
            report.add_rows("logs", done.deleted.logs as u64);
            report.count("objects to delete", done.deleted.objects as u64);
            ctx.batch_done(elapsed, report, None).await;
            if done.examined < i64::from(limit) {
                walks.remove(0);
                if walks.is_empty() {
                    break PairDone::Finished;
                }
            }
        };
        if deleted_here > 0 {
            report.count("pairs walked", 1);
        }
        Ok((outcome, deleted_here))
    }

    /// The pages of `range`'s tasks partition when one pass over them (a sweep) pays better than
    /// walking its due pairs through the indexes: the range is past (no writer is filling it),
    /// large enough to matter, and its due tasks are dense on its pages.
    async fn sweep_pays(
        &self,
        ctx: &RunContext,
        range: &Range,
        pairs: &[Pair],
    ) -> Result<Option<u32>, TaskError> {
        if range.kind == RangeKind::Future || range.is_live() {
            return Ok(None);
        }
        let due: f64 = pairs.iter().map(Pair::due_estimate).sum();
        if due < SWEEP_ROWS_PER_PAGE * f64::from(SWEEP_MIN_PAGES) {
            return Ok(None);
        }
        let Some(size) = heap::size_if_present(&ctx.pool, &range.tasks_name).await? else {
            // Dropped since it was planned: the row deletes find it missing.
            return Ok(None);
        };
        let pages = size.pages;
        let pays = pages >= SWEEP_MIN_PAGES && due >= SWEEP_ROWS_PER_PAGE * f64::from(pages);
        tracing::debug!(
            range = range.tasks_name,
            pages,
            due = due.round(),
            pays,
            "a sweep of the range's pages or its pairs' indexes"
        );
        Ok(pays.then_some(pages))
    }

    /// Deletes every due task on the first `pages` pages of `range`'s tasks partition, whatever its
    /// tenant, in block-range batches (see [`deletes::delete_block_range`]); then probes the
    /// facts of every tenant of the range, and returns the pairs they still say are due: rows that
    /// were locked past `lock_timeout` (their pages skipped), or moved to a later page by an
    /// update after the walk passed them. Those go by the index walk.
    async fn sweep_range(
        &self,
        ctx: &RunContext,
        range: &Range,
        pages: u32,
        sizer: &mut BatchSizer,
        report: &mut RunReport,
    ) -> Result<Swept, TaskError> {
        let limits = self.limits(ctx);
        let grace = self.settings.deleted_tenant_grace;
        let state = std::sync::Arc::new(std::sync::Mutex::new(SweepState::default()));
        tracing::info!(
            range = range.tasks_name,
            pages,
            "sweeping the range's pages: its due rows are dense"
        );
        let clock = ctx.clock();
        walk_blocks_sized(ctx, report, pages, sizer, |blocks| {
            let (pool, state, range, receipt) =
                (ctx.pool.clone(), state.clone(), range.clone(), receipt(ctx));
            async move {
                if state.lock().unwrap().missing {
                    return Ok(Vec::new());
                }
                let mut tx = batch::begin(&pool, limits).await?;
                let batch = deletes::delete_block_range(
                    &mut tx,
                    &range,
                    blocks,
                    &clock.rule(grace),
                    &receipt,
                )
                .await?;
                if batch.range_missing {
                    state.lock().unwrap().missing = true;
                    return Ok(Vec::new());
                }
                tx.commit().await?;
                let (mut retained, mut purged) = (0u64, 0u64);
                let mut state = state.lock().unwrap();
                for gone in &batch.tenants {
                    *state.gone.entry(gone.tenant_id).or_default() += gone.tasks;
                    *(if gone.purged {
                        &mut purged
                    } else {
                        &mut retained
                    }) += gone.tasks as u64;
                }
                Ok(vec![
                    ("retention", retained),
                    ("deleted-tenants", purged),
                    ("events", batch.events as u64),
                    ("queue-items", batch.queue_items as u64),
                    ("payloads", batch.payloads as u64),
                    ("logs", batch.logs as u64),
                ])
            }
        })
        .await?;
        let SweepState { gone, missing } = std::mem::take(&mut *state.lock().unwrap());
        for (tenant, tasks) in &gone {
            report.add_tenant_rows(*tenant, *tasks as u64);
        }
        if missing {
            return Ok(Swept::RangeMissing);
        }
        report.count("ranges swept", 1);
        let mut tx = repository::batch::begin_bookkeeping(&ctx.pool).await?;
        let rule = ctx.rule(grace);
        let mut probes: Vec<(Oid, Uuid, i64)> = gone
            .iter()
            .map(|(tenant, tasks)| (range.tasks_relid, *tenant, -tasks))
            .collect();
        for pair in facts::pairs_of(&mut *tx, range.tasks_relid, &rule).await? {
            if !gone.contains_key(&pair.tenant_id) {
                probes.push((range.tasks_relid, pair.tenant_id, 0));
            }
        }
        facts::resummarise(&mut tx, &probes, &rule).await?;
        let still_due: Vec<Pair> = facts::pairs_of(&mut *tx, range.tasks_relid, &rule)
            .await?
            .into_iter()
            .filter(Pair::is_due)
            .collect();
        tx.commit().await?;
        if ctx.interrupted().is_some() {
            return Ok(Swept::Interrupted);
        }
        Ok(Swept::Done { still_due })
    }

    /// How this task's rewrites (compactions) go about their steps.
    fn steps(&self, ctx: &RunContext) -> Steps {
        Steps {
            limits: self.locked_limits(ctx),
            lock_timeout: self.compaction_lock_timeout,
            grace: self.settings.deleted_tenant_grace,
        }
    }

    /// Gives up this task's compaction of `range` if one was started and is not swapped.
    async fn give_up_compaction(&self, ctx: &RunContext, range: &Range) -> Result<(), TaskError> {
        let mut conn = ctx.pool.acquire().await?;
        let started = repository::history::rewrite::in_progress(&mut conn)
            .await?
            .into_iter()
            .find(|r| {
                r.task == NAME
                    && r.phase.before_swap()
                    && r.sources.iter().any(|s| s.tasks_relid == range.tasks_relid)
            });
        drop(conn);
        if let Some(started) = started {
            repository::history::rewrite::abandon(
                &ctx.pool,
                started.id,
                self.locked_limits(ctx),
                self.compaction_lock_timeout,
            )
            .await?;
        }
        Ok(())
    }

    /// The measured costs, read again every [`COSTS_READ_EVERY`].
    async fn costs(&self, pool: &PgPool) -> Result<Costs, TaskError> {
        if let Some((costs, read)) = *self.costs.lock().unwrap() {
            if read.elapsed() < COSTS_READ_EVERY {
                return Ok(costs);
            }
        }
        let costs = shared::load_costs(pool).await?;
        *self.costs.lock().unwrap() = Some((costs, std::time::Instant::now()));
        Ok(costs)
    }

    /// Whether rewriting `range` (keeping what it keeps) costs less than deleting its due rows.
    fn rewrite_pays(
        range: &Range,
        rows: i64,
        pairs: &[Pair],
        now: chrono::DateTime<chrono::Utc>,
        costs: &Costs,
    ) -> bool {
        let rewritable = range.kind == RangeKind::Range
            && !range.is_live()
            && range.upper.is_some_and(|u| u <= now);
        let due: f64 = pairs.iter().map(Pair::due_estimate).sum();
        let rows = (rows as f64).max(due);
        let choice = choose(
            Estimate {
                rows,
                due,
                rewritable,
            },
            costs,
        );
        tracing::debug!(
            range = range.tasks_name,
            rows,
            due = due.round(),
            row_deletes_s = costs.row_deletes(due),
            rewrite_s = costs.rewrite(rows, rows - due),
            ?choice,
            "chose how the range's due rows leave"
        );
        choice == Removal::Rewrite
    }

    /// Walks the events that arrived since the last run, by ranges of ids, and deletes orphans
    /// older than an hour. The watermark never passes an orphan younger than that, so it is seen
    /// again once it is old enough; and the walk never passes the ids of a transaction that may
    /// still commit (see [`watermarks::set_pending`]), so an event committed late is walked too.
    /// A batch that keeps timing out ends the walk, not the run: the next run resumes it.
    async fn purge_orphan_events(
        &self,
        ctx: &RunContext,
        report: &mut RunReport,
    ) -> Result<(), TaskError> {
        // Not a history write: a range being rewritten must see these deletes in the change log.
        let limits = ctx.batch_limits(
            BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout)
                .with_generic_plans(),
        );
        let mut position = watermarks::get(&ctx.pool, ORPHAN_WATERMARK).await?;
        let mut pending = match watermarks::pending(&ctx.pool, ORPHAN_WATERMARK).await? {
            Some(pending) => pending,
            None => self.next_pending(ctx).await?,
        };
        // Most transactions last milliseconds: wait a little for those that were open.
        let waited = Instant::now();
        while !pending.settled
            && waited.elapsed() < ORPHAN_SETTLE_WAIT
            && ctx.interrupted().is_none()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            pending = watermarks::pending(&ctx.pool, ORPHAN_WATERMARK)
                .await?
                .unwrap_or(pending);
        }
        if !pending.settled {
            tracing::debug!(end = pending.end, "transactions that may hold event ids up to the walk's end are still open; the orphan walk waits");
            report.count("orphan walk waiting", 1);
            return Ok(());
        }
        let end = pending.end;
        if end <= position {
            // Everything settled was walked: the next end for the next run, if events arrived.
            if deletes::last_event_id(&ctx.pool).await? > end {
                self.next_pending(ctx).await?;
            }
            return Ok(());
        }
        let mut sizer = BatchSizer::new(
            ORPHAN_IDS_FIRST,
            ORPHAN_IDS_MIN,
            ORPHAN_IDS_MAX,
            ctx.batch_time(),
        );
        let mut safe = position;
        let mut undecided = false;
        while position < end {
            if let Some(stop) = ctx.interrupted() {
                report.completion = stop;
                break;
            }
            let up_to = position.saturating_add(i64::from(sizer.size())).min(end);
            let started = Instant::now();
            let result = async {
                let mut tx = batch::begin(&ctx.pool, limits).await?;
                let rows = sizer.size().min(ORPHAN_ROWS_MAX);
                let rule = ctx.rule(self.settings.deleted_tenant_grace);
                let batch = deletes::delete_orphan_events_batch(
                    &mut tx,
                    position,
                    up_to,
                    rows,
                    &rule,
                    &receipt(ctx),
                )
                .await?;
                let mut next_safe = safe;
                if let Some(first) = batch.first_undecided.filter(|_| !undecided) {
                    // A young orphan: the watermark stays before it until it is an hour old.
                    next_safe = first - 1;
                } else if !undecided {
                    next_safe = batch.walked_to;
                }
                watermarks::set(&mut *tx, ORPHAN_WATERMARK, next_safe).await?;
                tx.commit().await?;
                Ok((batch, next_safe))
            }
            .await;
            let elapsed = started.elapsed();
            let (batch, next_safe) = match sizer.settle(elapsed, result) {
                Settled::Done(done) => done,
                Settled::Retry(error) => {
                    tracing::warn!(%error, next_ids = sizer.size(), "orphan-events batch timed out; retrying smaller");
                    continue;
                }
                Settled::Again(error) => {
                    tracing::debug!(%error, "orphan-events batch rolled back (a deadlock or a change of the rules); running it again");
                    report.count("batches run again", 1);
                    tokio::time::sleep(sizer.again_pause()).await;
                    continue;
                }
                Settled::GaveUp(error) => {
                    tracing::warn!(%error, position, "an orphan-events batch keeps timing out; the walk resumes at the next run");
                    report.count("orphan walk stopped", 1);
                    return Ok(());
                }
            };
            undecided |= batch.first_undecided.is_some();
            safe = next_safe;
            position = batch.walked_to;
            report.record_batch("orphan-events", batch.deleted as u64);
            ctx.batch_done(elapsed, report, None).await;
        }
        if position >= end {
            self.next_pending(ctx).await?;
        }
        Ok(())
    }

    /// Every `orphan_sweep_interval`, one pass over every range's events in block ranges, deleting
    /// the orphans the rule finds due ([`deletes::delete_orphans_in_blocks`]): those that became
    /// orphans after the orphan walk passed them (their task deleted later, in a range merged
    /// since or not), and those a hold kept when the walk passed. The sweep's place (range and
    /// page) is kept after every batch, so a run that stops resumes it where it was.
    async fn sweep_orphans(
        &self,
        ctx: &RunContext,
        report: &mut RunReport,
    ) -> Result<(), TaskError> {
        let mut next = watermarks::get(&ctx.pool, ORPHAN_SWEEP_NEXT).await?;
        if next == 0 {
            let every = self.orphan_sweep_interval.as_secs() as i64;
            let last: i64 = watermarks::get(&ctx.pool, ORPHAN_SWEPT_AT).await?;
            if last > 0 && ctx.now().timestamp() < last + every {
                return Ok(());
            }
            watermarks::set(&ctx.pool, ORPHAN_SWEEP_STARTED, ctx.now().timestamp()).await?;
            next = 1;
            watermarks::set(&ctx.pool, ORPHAN_SWEEP_NEXT, next).await?;
            watermarks::set(&ctx.pool, ORPHAN_SWEEP_BLOCK, 0).await?;
        }
        let limits = ctx.batch_limits(
            BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout)
                .with_generic_plans(),
        );
        let mut sizer = ctx.block_sizer_within(SWEEP_FIRST_PAGES, self.settings.statement_timeout);
        let ranges: Vec<Range> = ranges::all(&ctx.pool)
            .await?
            .into_iter()
            .filter(|r| sweep_key(r) >= next)
            .collect();
        for range in ranges {
            let key = sweep_key(&range);
            // The page it stopped at holds only for the same table.
            let same_table = watermarks::get(&ctx.pool, ORPHAN_SWEEP_RELID).await?
                == i64::from(range.events_relid.0);
            let mut block = if key == next && same_table {
                watermarks::get(&ctx.pool, ORPHAN_SWEEP_BLOCK).await?
            } else {
                0
            };
            loop {
                if let Some(stop) = ctx.interrupted() {
                    report.completion = stop;
                    return Ok(());
                }
                let Some(size) = heap::size_if_present(&ctx.pool, &range.events_name).await? else {
                    return Ok(());
                };
                let pages = i64::from(size.pages);
                if block >= pages {
                    break;
                }
                let end = (block + i64::from(sizer.size())).min(pages);
                let blocks = heap::BlockRange {
                    start: block as u32,
                    end: end as u32,
                };
                let started = Instant::now();
                let result = async {
                    let mut tx = batch::begin(&ctx.pool, limits).await?;
                    let rule = ctx.rule(self.settings.deleted_tenant_grace);
                    let deleted = deletes::delete_orphans_in_blocks(
                        &mut tx,
                        &range,
                        blocks,
                        &rule,
                        &receipt(ctx),
                    )
                    .await?;
                    if deleted.is_some() {
                        watermarks::set(&mut *tx, ORPHAN_SWEEP_NEXT, key).await?;
                        watermarks::set(&mut *tx, ORPHAN_SWEEP_BLOCK, end).await?;
                        watermarks::set(
                            &mut *tx,
                            ORPHAN_SWEEP_RELID,
                            i64::from(range.events_relid.0),
                        )
                        .await?;
                    }
                    tx.commit().await?;
                    Ok(deleted)
                }
                .await;
                let elapsed = started.elapsed();
                match sizer.settle(elapsed, result) {
                    Settled::Done(Some(deleted)) => {
                        block = end;
                        report.record_batch("orphan-events", deleted as u64);
                        report.count("event pages swept", u64::from(blocks.pages()));
                        ctx.batch_done(elapsed, report, None).await;
                    }
                    // The range was swapped out or dropped meanwhile (its rows are in the range
                    // that replaced it, whose end is at least this one's), or a layout change
                    // holds it: the next run lists the ranges again and goes on from here.
                    Settled::Done(None) => return Ok(()),
                    Settled::Retry(error) => {
                        tracing::warn!(%error, next_pages = sizer.size(), "orphan sweep batch timed out; retrying smaller")
                    }
                    Settled::Again(error) => {
                        tracing::debug!(%error, "orphan sweep batch rolled back (a deadlock or a change of the rules); running it again");
                        report.count("batches run again", 1);
                        tokio::time::sleep(sizer.again_pause()).await;
                    }
                    Settled::GaveUp(error) if batch::is_timeout(&error) => {
                        tracing::warn!(%error, range = range.events_name, "an orphan sweep batch keeps timing out; the sweep resumes at the next run");
                        return Ok(());
                    }
                    Settled::GaveUp(error) => return Err(error.into()),
                }
            }
            next = key.saturating_add(1);
            watermarks::set(&ctx.pool, ORPHAN_SWEEP_NEXT, next).await?;
            watermarks::set(&ctx.pool, ORPHAN_SWEEP_BLOCK, 0).await?;
        }
        let started = watermarks::get(&ctx.pool, ORPHAN_SWEEP_STARTED).await?;
        watermarks::set(&ctx.pool, ORPHAN_SWEPT_AT, started).await?;
        watermarks::set(&ctx.pool, ORPHAN_SWEEP_NEXT, 0).await?;
        report.count("events swept", 1);
        Ok(())
    }

    /// Deletes the deletion receipts older than `receipts_keep`, a bounded batch at a time (they
    /// are nobody's data: counted as `receipts`, under no tenant).
    async fn purge_receipts(
        &self,
        ctx: &RunContext,
        report: &mut RunReport,
    ) -> Result<(), TaskError> {
        let before = ctx.now()
            - chrono::Duration::from_std(self.settings.receipts_keep)
                .unwrap_or(chrono::Duration::MAX);
        let limits = ctx.batch_limits(BatchLimits::new(
            self.settings.statement_timeout,
            self.settings.lock_timeout,
        ));
        while ctx.interrupted().is_none() {
            let started = Instant::now();
            let mut tx = batch::begin(&ctx.pool, limits).await?;
            let deleted =
                repository::receipts::delete_older_than(&mut *tx, before, RECEIPTS_BATCH).await?;
            tx.commit().await?;
            if deleted == 0 {
                break;
            }
            report.record_batch("receipts", deleted as u64);
            ctx.batch_done(started.elapsed(), report, None).await;
            if deleted < RECEIPTS_BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Records the events' last id as the orphan walk's next end.
    async fn next_pending(&self, ctx: &RunContext) -> Result<watermarks::Pending, TaskError> {
        let end = deletes::last_event_id(&ctx.pool).await?;
        Ok(watermarks::set_pending(&ctx.pool, ORPHAN_WATERMARK, end).await?)
    }
}

/// The orphan sweep's state (`retention_watermarks`): when the last complete sweep started (Unix
/// seconds), when the one in progress started, and where it is: the next range (by
/// [`sweep_key`]; 0: no sweep in progress) and the next page of its events.
const ORPHAN_SWEPT_AT: &str = "task-history.orphan-sweep.swept-at";
/// When the last complete walk of the payloads' and log lines' partitions for orphans ended, and
/// where a walk in progress stopped (the partition's OID and the page).
const DEPENDENTS_SWEPT_AT: &str = "task-history.orphan-dependents.swept-at";
const DEPENDENTS_RELID: &str = "task-history.orphan-dependents.relid";
const DEPENDENTS_BLOCK: &str = "task-history.orphan-dependents.block";
const ORPHAN_SWEEP_STARTED: &str = "task-history.orphan-sweep.started";
const ORPHAN_SWEEP_NEXT: &str = "task-history.orphan-sweep.next";
const ORPHAN_SWEEP_BLOCK: &str = "task-history.orphan-sweep.block";
const ORPHAN_SWEEP_RELID: &str = "task-history.orphan-sweep.relid";

/// A range's place in the orphan sweep's order: its lower bound in microseconds (the default
/// range, from -infinity, first).
/// Where the orphan sweep is, as the end of the range it is in: a merge or compaction that
/// replaces ranges the sweep is in or past the end of keeps (at least) the end of the last, so
/// the new range is swept rather than skipped (from its first page: see the relid check).
fn sweep_key(range: &Range) -> i64 {
    range
        .upper
        .map_or(i64::MAX, |upper| upper.timestamp_micros().max(2))
}

/// Receipts deleted per batch once past their keep.
const RECEIPTS_BATCH: i64 = 5_000;

/// How long the orphan walk waits for the transactions open when its end was recorded.
const ORPHAN_SETTLE_WAIT: Duration = Duration::from_secs(2);

/// Event ids an orphan-events batch walks: the first batch's, and the bounds its size adapts in.
const ORPHAN_IDS_FIRST: u32 = 10_000;
const ORPHAN_IDS_MIN: u32 = 100;
const ORPHAN_IDS_MAX: u32 = 1_000_000;
/// Events an orphan-events batch examines at most: a span of ids sized on sparse ids (those of a
/// dropped range, say) may turn out dense, and costs no more than this. 5,000 events take about
/// 30 ms with their probes of `tasks`, and 50 ms right after a million tasks were deleted (`bench
/// history`, compaction section; 10,000 took 80-190 ms there).
const ORPHAN_ROWS_MAX: u32 = 5_000;

#[async_trait::async_trait]
impl MaintenanceTask for TaskHistoryTask {
    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.settings.schedule()
    }

    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let mut report = RunReport::default();
        self.archive_due(ctx, &mut report).await?;
        // The due rows get most of the run; the orphan walk keeps the rest, so that a purge that
        // reaches its deadline does not starve it.
        self.purge_due(&ctx.narrowed(PURGE_SHARE), &mut report)
            .await?;
        let purged = report.completion;
        if purged == crate::Completion::Cancelled {
            return Ok(report);
        }
        self.purge_orphan_events(ctx, &mut report).await?;
        self.sweep_orphans(ctx, &mut report).await?;
        self.purge_due_logs(ctx, &mut report).await?;
        self.purge_receipts(ctx, &mut report).await?;
        // Last: a walk of every payload and log partition, resumed where a run stopped it.
        self.sweep_orphan_dependents(ctx, &mut report).await?;
        self.measure_archive_lag(ctx).await;
        if purged != crate::Completion::Done {
            report.completion = purged;
        }
        Ok(report)
    }

    /// From the facts: each due (range, tenant) pair's estimate (tasks only, without their
    /// events), as the run plans them.
    async fn estimate_due(&self, pool: &PgPool) -> Result<Option<u64>, TaskError> {
        let rule = Rule::new(clock::now(pool).await?, self.settings.deleted_tenant_grace);
        let pairs = facts::due_pairs(pool, &rule).await?;
        Ok(Some(
            pairs.iter().map(Pair::due_estimate).sum::<f64>().round() as u64,
        ))
    }

    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        self.count_due(pool).await
    }
}

/// Plans a run makes at most: a range rewritten or carved under one pass (by `partitions`, or
/// another process) is planned again in the next.
const PLAN_PASSES: usize = 3;

/// The share of a run's time the due rows get before the orphan walk.
const PURGE_SHARE: f64 = 0.9;

impl TaskHistoryTask {
    /// Every `orphan_sweep_interval`: walks every partition of `task_payloads` and `task_logs` in
    /// block ranges and deletes the rows whose task is gone (deleted by the application: the
    /// engine's own paths delete them with their task), older than an hour and not held. A walk
    /// cut short starts again at the next run.
    async fn sweep_orphan_dependents(
        &self,
        ctx: &RunContext,
        report: &mut RunReport,
    ) -> Result<(), TaskError> {
        let last = watermarks::get(&ctx.pool, DEPENDENTS_SWEPT_AT).await?;
        let every = self.orphan_sweep_interval.as_secs() as i64;
        // A walk in progress (a partition recorded) goes on whatever the time.
        let mut resume_at = watermarks::get(&ctx.pool, DEPENDENTS_RELID).await?;
        if resume_at == 0 && last > 0 && ctx.now().timestamp() < last + every {
            return Ok(());
        }
        let limits = ctx.batch_limits(
            BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout)
                .with_generic_plans(),
        );
        let mut sizer = ctx.block_sizer_within(SWEEP_FIRST_PAGES, self.settings.statement_timeout);
        let mut partitions = Vec::new();
        for table in repository::payloads::DAY_TABLES {
            for partition in repository::payloads::partitions(&ctx.pool, table).await? {
                partitions.push((table, partition));
            }
        }
        for (table, partition) in partitions {
            let relid = repository::payloads::relid_of(&ctx.pool, &partition).await?;
            if resume_at != 0 && relid != resume_at {
                // Before the partition the walk stopped in (or dropped since: then from the start).
                if !(relid == 0
                    || repository::payloads::relation_exists(&ctx.pool, resume_at).await?)
                {
                    resume_at = 0;
                } else {
                    continue;
                }
            }
            {
                let mut block = if resume_at != 0 {
                    watermarks::get(&ctx.pool, DEPENDENTS_BLOCK).await?
                } else {
                    0
                };
                resume_at = 0;
                loop {
                    if let Some(stop) = ctx.interrupted() {
                        report.completion = stop;
                        return Ok(());
                    }
                    let Some(size) = heap::size_if_present(&ctx.pool, &partition).await? else {
                        break;
                    };
                    let pages = i64::from(size.pages);
                    if block >= pages {
                        break;
                    }
                    let end = (block + i64::from(sizer.size())).min(pages);
                    let blocks = heap::BlockRange {
                        start: block as u32,
                        end: end as u32,
                    };
                    let started = Instant::now();
                    let result = async {
                        let mut tx = batch::begin(&ctx.pool, limits).await?;
                        let deleted = repository::payloads::delete_orphans_in_blocks(
                            &mut tx,
                            table,
                            &partition,
                            blocks,
                            &ctx.rule(self.settings.deleted_tenant_grace),
                            &receipt(ctx),
                        )
                        .await?;
                        tx.commit().await?;
                        Ok(deleted)
                    }
                    .await;
                    let elapsed = started.elapsed();
                    let deleted = match sizer.settle_units(elapsed, (end - block) as u32, result) {
                        Settled::Done(Some(deleted)) => deleted,
                        Settled::Done(None) => break,
                        Settled::Retry(_) => continue,
                        Settled::Again(_) => {
                            report.count("batches run again", 1);
                            continue;
                        }
                        Settled::GaveUp(error) => return Err(error.into()),
                    };
                    let rule = if table == "task_payloads" {
                        "orphan-payloads"
                    } else {
                        "orphan-logs"
                    };
                    report.record_batch(rule, deleted as u64);
                    ctx.batch_done(elapsed, report, None).await;
                    block = end;
                    watermarks::set(&ctx.pool, DEPENDENTS_RELID, relid).await?;
                    watermarks::set(&ctx.pool, DEPENDENTS_BLOCK, block).await?;
                }
            }
        }
        watermarks::set(&ctx.pool, DEPENDENTS_SWEPT_AT, ctx.now().timestamp()).await?;
        watermarks::set(&ctx.pool, DEPENDENTS_RELID, 0).await?;
        watermarks::set(&ctx.pool, DEPENDENTS_BLOCK, 0).await?;
        Ok(())
    }

    /// Deletes the log lines due by the log window, tenant by tenant, oldest first, in batches.
    async fn purge_due_logs(
        &self,
        ctx: &RunContext,
        report: &mut RunReport,
    ) -> Result<(), TaskError> {
        if ctx.interrupted().is_some() {
            return Ok(());
        }
        let rule = ctx.rule(self.settings.deleted_tenant_grace);
        let tenants =
            repository::payloads::tenants_with_due_logs(&ctx.pool, &rule, self.log_window).await?;
        let mut sizer = ctx.row_sizer(self.settings.batch_size);
        for tenant in tenants {
            loop {
                if let Some(stop) = ctx.interrupted() {
                    report.completion = stop;
                    return Ok(());
                }
                let limit = sizer.size();
                let started = Instant::now();
                let result = async {
                    let mut tx = batch::begin(&ctx.pool, self.limits(ctx)).await?;
                    let gone = repository::payloads::delete_due_logs(
                        &mut tx,
                        tenant,
                        &ctx.rule(self.settings.deleted_tenant_grace),
                        self.log_window,
                        limit,
                        &receipt(ctx),
                    )
                    .await?;
                    tx.commit().await?;
                    Ok(gone)
                }
                .await;
                let elapsed = started.elapsed();
                let gone = match sizer.settle(elapsed, result) {
                    Settled::Done(gone) => gone,
                    Settled::Retry(error) => {
                        tracing::warn!(%error, next_limit = sizer.size(), "log batch timed out; retrying smaller");
                        continue;
                    }
                    Settled::Again(_) => {
                        report.count("batches run again", 1);
                        tokio::time::sleep(sizer.again_pause()).await;
                        continue;
                    }
                    Settled::GaveUp(error) => return Err(error.into()),
                };
                report.record_batch("log-retention", gone.logs as u64);
                report.add_rows("logs", gone.logs as u64);
                ctx.batch_done(elapsed, report, None).await;
                if gone.examined < i64::from(limit) {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Deletes what is due, range by range. Stops early (setting the report's completion) when
    /// `ctx` is interrupted.
    async fn purge_due(&self, ctx: &RunContext, report: &mut RunReport) -> Result<(), TaskError> {
        let limits = self.locked_limits(ctx);
        shared::refresh_facts(
            ctx,
            limits,
            self.settings.deleted_tenant_grace,
            self.compaction_lock_timeout,
            report,
        )
        .await?;
        // Rewrites first: the count of any that was swapped in (its receipts are owed), and this
        // task's compactions a run left in progress.
        if let Some(stop) =
            rewrites::resume(ctx, NAME, self.steps(ctx), Naming::Rules, report).await?
        {
            report.completion = stop;
            return Ok(());
        }
        let mut costs: Option<Costs> = None;
        let mut cost = RowDeleteCost::default();
        // One sizer for the run: what one pair's batches learnt sizes the next pair's.
        let mut sizer = ctx.row_sizer(self.settings.batch_size);
        // And one for the sweeps: the ranges of a backlog are alike. It starts small, since a
        // range's pages hold its events' cost too (128 pages took 160-280 ms where 50 ms was the aim).
        let mut block_sizer = ctx.block_sizer_from(SWEEP_FIRST_PAGES);
        // Another pass only for pairs whose range was rewritten or carved under the last one.
        for pass in 1..=PLAN_PASSES {
            let (plan, now) = self.plan(ctx).await?;
            let mut missing = false;
            for (range, pairs) in plan {
                if let Some(stop) = ctx.interrupted() {
                    report.completion = stop;
                    return Ok(());
                }
                // A range being rewritten (a merge by `partitions`) loses its due rows by row
                // deletes meanwhile: its change log records them, and its rewrite replays them.
                let rewritable = self.settings.compaction
                    && range.kind == RangeKind::Range
                    && !range.is_live()
                    && range.rewrite_id.is_none();
                if rewritable {
                    if costs.is_none() {
                        costs = Some(self.costs(&ctx.pool).await?);
                    }
                    let rows = pairs.first().map_or(0, |p| p.range_rows);
                    if Self::rewrite_pays(&range, rows, &pairs, now, costs.as_ref().unwrap()) {
                        // A carve or a merge holding the layout usually ends soon: wait for it.
                        match rewrites::start(
                            ctx,
                            std::slice::from_ref(&range),
                            NAME,
                            self.steps(ctx),
                            true,
                            Naming::Rules,
                            report,
                        )
                        .await?
                        {
                            Outcome::Done(_) => {
                                report.count("ranges compacted", 1);
                                continue;
                            }
                            Outcome::Interrupted => {
                                report.completion = ctx.interrupted().unwrap_or_default();
                                return Ok(());
                            }
                            // Not now (a lock not had in time, a runner in the way): the range's
                            // due rows go by row deletes, and a rewrite started is given up, so
                            // that it does not replay every one of them.
                            Outcome::Waiting(why) => {
                                tracing::info!(
                                    range = range.tasks_name,
                                    reason = why.as_str(),
                                    "range not compacted; its due rows go by row deletes"
                                );
                                self.give_up_compaction(ctx, &range).await?;
                                // A step that kept failing: the next choice leans to row
                                // deletes rather than make the same copy fail again.
                                if why == repository::history::rewrite::NotNow::Failing {
                                    crate::history::penalise_rewrites(&ctx.pool).await?;
                                }
                            }
                            Outcome::Abandoned(why) => {
                                tracing::warn!(range = range.tasks_name, reason = %why, "compaction abandoned; its due rows go by row deletes");
                            }
                        }
                    }
                }
                let mut pairs = pairs;
                if let Some(pages) = self.sweep_pays(ctx, &range, &pairs).await? {
                    match self
                        .sweep_range(ctx, &range, pages, &mut block_sizer, report)
                        .await?
                    {
                        Swept::Done { still_due } => pairs = still_due,
                        Swept::Interrupted => {
                            report.completion = ctx.interrupted().unwrap_or_default();
                            return Ok(());
                        }
                        Swept::RangeMissing => {
                            missing = true;
                            continue;
                        }
                    }
                }
                // A walk that ends early (interrupted) leaves its pair's facts to be probed here.
                let mut touched = Vec::new();
                let mut interrupted = false;
                for pair in &pairs {
                    let (done, deleted) = self
                        .delete_pair(ctx, &range, pair, report, &mut cost, &mut sizer)
                        .await?;
                    if matches!(done, PairDone::Interrupted) {
                        touched.push((range.tasks_relid, pair.tenant_id, -deleted));
                    }
                    match done {
                        PairDone::Finished => {}
                        PairDone::Interrupted => {
                            interrupted = true;
                            break;
                        }
                        PairDone::RangeMissing => {
                            missing = true;
                            break;
                        }
                    }
                }
                if !touched.is_empty() {
                    let mut tx = repository::batch::begin_bookkeeping(&ctx.pool).await?;
                    facts::resummarise(
                        &mut tx,
                        &touched,
                        &ctx.rule(self.settings.deleted_tenant_grace),
                    )
                    .await?;
                    tx.commit().await?;
                }
                if interrupted {
                    report.completion = ctx.interrupted().unwrap_or_default();
                    return Ok(());
                }
            }
            if !missing {
                break;
            }
            if pass == PLAN_PASSES {
                // Not `done`: due rows may be left in ranges that moved under every pass.
                return Err(TaskError::Incomplete(format!(
                    "ranges were rewritten or carved under each of {PLAN_PASSES} passes; what is still due waits for the next run"
                )));
            }
            // Another runner is rewriting a range: once it is done, the range's due rows are
            // either gone with it or in the new range, which the next plan names.
            let mut tx = batch::begin(
                &ctx.pool,
                BatchLimits::new(self.settings.max_run_time, self.settings.max_run_time),
            )
            .await?;
            ranges::take_layout_lock(&mut tx, true).await?;
            tx.commit().await?;
        }
        shared::observe_row_deletes(&ctx.pool, cost.tasks, cost.spent).await?;
        Ok(())
    }

    /// What a run would delete now: counted by the rule, range by range, reading only.
    async fn count_due(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        let rule = Rule::new(clock::now(pool).await?, self.settings.deleted_tenant_grace);
        let mut report = DryRunReport::default();
        let due = previews::due(pool, &rule, self.settings.statement_timeout).await?;
        for tenant in due.tenants {
            report.add("retention", tenant.retained as u64);
            report.add("deleted-tenants", tenant.purged as u64);
            report.add_tenant(tenant.tenant_id, (tenant.retained + tenant.purged) as u64);
        }
        report.add("orphan-events", due.orphan_events as u64);
        Ok(report)
    }
}
