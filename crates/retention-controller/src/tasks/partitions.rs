//! `partitions`: keeps the layout of run history (see `repository::history`) in shape:
//!
//! * days ahead: today and the next `premake_days - 1` days each get a range, carved out of the
//!   future range (which takes any later instant, so no insert ever fails);
//! * the catalog and the engine's records agree: a partition pair attached by hand is adopted, a
//!   range detached by hand is forgotten (never touched) and its hole filled with an empty range;
//! * the number of attached partitions stays bounded whatever is kept forever: ranges older than
//!   every finite retention merge by quarter of a month, then month, then year
//!   (`history_policy::merge_plan`), each merge a rewrite that copies what the ranges keep;
//! * tables the engine detached are dropped (by OID), also those a crash left behind.

use chrono::{DateTime, Utc};
use repository::batch::{self, BatchLimits};
use repository::history::{detached, facts, ranges, Range, RangeKind};
use repository::{clock, PgPool};

use crate::history as shared;
use crate::history_policy::{cold_horizon, merge_plan, Span};
use crate::rewrites::{self, Naming, Outcome, Steps};
use crate::schedule::Schedule;
use crate::settings::PartitionsSettings;
use crate::task::{DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "partitions";

pub struct PartitionsTask {
    settings: PartitionsSettings,
    /// The grace after which a deleted tenant's rows are due (`retention.task_history`): a merge
    /// copies only what is kept.
    deleted_tenant_grace: std::time::Duration,
}

impl PartitionsTask {
    pub fn new(settings: PartitionsSettings, deleted_tenant_grace: std::time::Duration) -> Self {
        PartitionsTask {
            settings,
            deleted_tenant_grace,
        }
    }

    fn limits(&self) -> BatchLimits {
        BatchLimits::new(self.settings.statement_timeout, self.settings.lock_timeout)
            .with_history_write()
            .with_generic_plans()
    }

    /// The last day to have a range: today plus `premake_days - 1`.
    fn through(&self, now: DateTime<Utc>) -> chrono::NaiveDate {
        now.date_naive() + chrono::Duration::days(i64::from(self.settings.premake_days.max(1)) - 1)
    }

    /// Reconciles the layout with the catalog and carves the days ahead, in one transaction under
    /// the layout lock. Another runner changing the layout, or a lock not had in time, leaves it
    /// to the next run.
    async fn shape_layout(
        &self,
        pool: &PgPool,
        now: DateTime<Utc>,
        report: &mut RunReport,
    ) -> Result<(), TaskError> {
        if ranges::in_shape(pool, self.through(now)).await? {
            return Ok(());
        }
        let mut tx = batch::begin(pool, self.limits()).await?;
        if !ranges::take_layout_lock(&mut tx, false).await? {
            tracing::info!(
                "another runner is changing the history layout; days ahead are checked next run"
            );
            return Ok(());
        }
        let reconciled = ranges::reconcile(&mut tx, now).await?;
        let carved = match ranges::carve_days(
            &mut tx,
            self.through(now),
            self.settings.lock_timeout,
        )
        .await
        {
            Ok(carved) => carved,
            // A lock the DDL could not get in time: retried on the next run, not a failure.
            // The same when the statement timeout ends the wait first (a `lock_timeout` at or
            // above it; and seen once in 40 simulated months, where the server's clock moves
            // under libfaketime, the LOCK outlived its 1 s `lock_timeout` and failed the run).
            Err(error) if batch::is_lock_not_had(&error) || batch::is_timeout(&error) => {
                tracing::warn!(%error, "could not lock the history tables in time to add days; retrying next run");
                return Ok(());
            }
            Err(error) => return Err(error.into()),
        };
        tx.commit().await?;
        if !reconciled.adopted.is_empty() {
            tracing::warn!(partitions = ?reconciled.adopted, "adopted partitions attached by hand; their facts are rebuilt before use");
            report.count("partitions adopted", reconciled.adopted.len() as u64);
        }
        if !reconciled.forgotten.is_empty() {
            tracing::warn!(partitions = ?reconciled.forgotten, "partitions were detached by hand: left alone, and their instants given to an empty range");
        }
        if !reconciled.filled.is_empty() {
            report.count("holes filled", reconciled.filled.len() as u64);
        }
        if !carved.days.is_empty() {
            tracing::info!(days = ?carved.days, rows_moved = carved.rows_moved, lock_ms = carved.locked.as_millis() as u64, "created day ranges");
            report.count("days created", carved.days.len() as u64);
            crate::telemetry::history_lock_held(NAME, carved.locked);
            report.held_parents_locked(carved.locked);
        }
        Ok(())
    }

    /// The merges due now: groups of adjacent cold ranges.
    async fn merges(
        &self,
        pool: &PgPool,
        now: DateTime<Utc>,
    ) -> Result<Vec<Vec<Range>>, TaskError> {
        let horizon = cold_horizon(now, facts::longest_window(pool).await?);
        let finite: Vec<Range> = ranges::all(pool)
            .await?
            .into_iter()
            .filter(|r| r.kind == RangeKind::Range && r.lower.is_some() && r.upper.is_some())
            .collect();
        let spans: Vec<Span> = finite
            .iter()
            .map(|r| Span {
                lower: r.lower.unwrap(),
                upper: r.upper.unwrap(),
                mergeable: !r.is_live() && !r.needs_settle(now) && r.rewrite_id.is_none(),
            })
            .collect();
        Ok(merge_plan(&spans, horizon)
            .into_iter()
            .map(|group| group.into_iter().map(|i| finite[i].clone()).collect())
            .collect())
    }
}

impl PartitionsTask {
    /// The day partitions of task payloads and logs: made for the days the history ranges are
    /// made for (today through the days ahead), and dropped once empty two days after their day.
    async fn shape_payload_days(
        &self,
        pool: &PgPool,
        now: chrono::DateTime<chrono::Utc>,
        report: &mut RunReport,
    ) -> Result<(), TaskError> {
        let today = now.date_naive();
        let days: Vec<chrono::NaiveDate> = today
            .iter_days()
            .take_while(|day| *day <= self.through(now))
            .collect();
        let mut conn = pool.acquire().await?;
        let created =
            repository::payloads::create_days(&mut conn, &days, self.settings.lock_timeout).await?;
        let dropped = repository::payloads::drop_empty_days(
            &mut conn,
            today - chrono::Duration::days(2),
            self.settings.lock_timeout,
        )
        .await?;
        if !created.is_empty() || !dropped.is_empty() {
            tracing::info!(?created, ?dropped, "payload and log day partitions");
        }
        report.count("payload partitions created", created.len() as u64);
        report.count("payload partitions dropped", dropped.len() as u64);
        Ok(())
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
        let mut report = RunReport::default();
        let limits = self.limits();
        // Tables detached by an earlier rewrite whose drop did not happen (a crash, a reader).
        let leftovers = detached::drop_recorded(&ctx.pool, self.settings.lock_timeout).await?;
        if !leftovers.dropped.is_empty() {
            tracing::warn!(tables = ?leftovers.dropped, "dropped tables an interrupted run had detached");
        }
        if !leftovers.left_alone.is_empty() {
            tracing::warn!(tables = ?leftovers.left_alone, "tables the engine detached were renamed or attached again: left alone");
        }
        let now = ctx.now();
        self.shape_layout(&ctx.pool, now, &mut report).await?;
        self.shape_payload_days(&ctx.pool, now, &mut report).await?;
        shared::refresh_facts(
            ctx,
            limits,
            self.deleted_tenant_grace,
            self.settings.lock_timeout,
            &mut report,
        )
        .await?;
        // Rewrites first: the count of any that was swapped in (its receipts are owed), and this
        // task's merges a run left in progress.
        let steps = Steps {
            limits,
            lock_timeout: self.settings.lock_timeout,
            grace: self.deleted_tenant_grace,
        };
        if let Some(stop) = rewrites::resume(ctx, NAME, steps, Naming::Tables, &mut report).await? {
            report.completion = stop;
            return Ok(report);
        }
        for group in self.merges(&ctx.pool, now).await? {
            if let Some(stop) = ctx.interrupted() {
                report.completion = stop;
                break;
            }
            // A merge can wait for the next run.
            match rewrites::start(ctx, &group, NAME, steps, false, Naming::Tables, &mut report)
                .await?
            {
                Outcome::Done(_) => report.count("ranges merged", 1),
                Outcome::Interrupted => {
                    report.completion = ctx.interrupted().unwrap_or_default();
                    break;
                }
                Outcome::Waiting(why) => {
                    let names: Vec<&str> = group.iter().map(|r| r.tasks_name.as_str()).collect();
                    tracing::info!(ranges = ?names, reason = why.as_str(), "ranges not merged now; the next run goes on");
                }
                Outcome::Abandoned(why) => {
                    let names: Vec<&str> = group.iter().map(|r| r.tasks_name.as_str()).collect();
                    tracing::warn!(ranges = ?names, reason = %why, "merge abandoned; nothing was removed");
                }
            }
        }
        repository::history::rewrite::prune_rule_changes(&ctx.pool).await?;
        Ok(report)
    }

    /// What a run would do now: the days it would create and the ranges it would merge (merges
    /// drop nothing that `task-history` has not already deleted, as a rule).
    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        let now = clock::now(pool).await?;
        let mut report = DryRunReport::default();
        let future = ranges::all(pool)
            .await?
            .into_iter()
            .find(|r| r.kind == RangeKind::Future);
        if let Some(lower) = future.and_then(|f| f.lower) {
            let missing = (self.through(now) - lower.date_naive()).num_days() + 1;
            if missing > 0 {
                tracing::info!(from = %lower.date_naive(), days = missing, "would create day ranges");
            }
        }
        for group in self.merges(pool, now).await? {
            let names: Vec<&str> = group.iter().map(|r| r.tasks_name.as_str()).collect();
            tracing::info!(ranges = ?names, "would merge these ranges into one");
            for range in &group {
                for pair in facts::pairs_of(
                    pool,
                    range.tasks_relid,
                    &repository::rule::Rule::new(now, self.deleted_tenant_grace),
                )
                .await?
                {
                    let due = pair.due_estimate().round() as u64;
                    if due > 0 {
                        report.add("tasks (estimated)", due);
                        report.add_tenant(pair.tenant_id, due);
                    }
                }
            }
        }
        Ok(report)
    }
}
