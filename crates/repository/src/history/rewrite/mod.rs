//! Replacing adjacent ranges by one covering the same instants and holding only their kept rows:
//! compaction (one range) and merging (several). The cost is a read of the sources and a copy of
//! what is kept; nothing due is written anywhere, and the sources are dropped whole.
//!
//! A rewrite is a sequence of short transactions, each bounded (a block range of pages, a number
//! of log entries), recorded in `history_rewrites`, so it finishes at any size and resumes where
//! it stopped after a deadline, a restart or a crash. Its phases:
//!
//! 1. [`start`]: under the layout lock, mark the sources as being rewritten (their change log then
//!    records every write, the engine's own row deletes too), create the new range's tables
//!    (unattached), record the rule's instant (`rule_now`) and the rules' version.
//! 2. [`copy`]: the sources' tasks, then their events, in block ranges: each chunk copies what the
//!    rule keeps (tasks it does not find due, their events, orphan events too young to go or held)
//!    and records the tenants it saw and the orphans it met. Writers go on meanwhile.
//! 3. [`replay`] (catch-up): the writes the sources logged, replayed key by key (each changed task
//!    and event removed from the new tables and copied again if the rule keeps it now), in passes
//!    of bounded size; and every tenant whose rules changed since the copy began copied again the
//!    same way. The rules each tenant's rows were decided under are then recorded.
//! 4. [`swap`]: under the parents' lock (milliseconds): check that the rules are still those the
//!    copy followed and hold them until the commit, replay the last logged writes, detach the
//!    sources, attach the new range. One transaction: the sources are replaced whole, or not.
//! 5. [`count`]: the detached sources, which nothing writes to any more, counted in block ranges
//!    against the rule as the swap recorded it (its instant, the tenants' rules, the holds): what
//!    went, per tenant and rule, into the receipts of the run that started the rewrite, each chunk
//!    in one transaction with its receipts; and the queue items of the tasks that went deleted
//!    (by the queue-items rule, as it is then), with theirs. A crash in between loses nothing:
//!    the count resumes. Then the detached tables are dropped and the record deleted.
//!
//! The new range's rows are exactly what the rule keeps of the sources at the swap (under the
//! recorded instant and rules): so what the count finds due in the detached sources is exactly
//! what went, whatever writers did to the new range after the swap.
//!
//! Every step locks the rewrite's record (`FOR UPDATE SKIP LOCKED`): one runner at a time works on
//! a rewrite, and another finds it busy.

pub mod copy;
pub mod count;
pub mod replay;
pub mod swap;

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::types::{Oid, PgInterval};
use sqlx::{FromRow, PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use super::ranges::{self, take_layout_lock};
use super::{engine_write, LogMode, Range, RangeKind};
use crate::batch::{self, BatchLimits};
use crate::receipts::RunReceipt;
use crate::rule::{Holds, Rule};

/// Where a rewrite is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    CopyTasks,
    CopyEvents,
    CatchUp,
    /// Swapped: the detached sources' tasks are being counted.
    CountTasks,
    /// Then their events; past the last source, the tables are dropped.
    CountEvents,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::CopyTasks => "copy-tasks",
            Phase::CopyEvents => "copy-events",
            Phase::CatchUp => "catch-up",
            Phase::CountTasks => "count-tasks",
            Phase::CountEvents => "count-events",
        }
    }

    fn parse(text: &str) -> Phase {
        match text {
            "copy-tasks" => Phase::CopyTasks,
            "copy-events" => Phase::CopyEvents,
            "catch-up" => Phase::CatchUp,
            "count-tasks" => Phase::CountTasks,
            _ => Phase::CountEvents,
        }
    }

    /// Whether the sources are still attached (the swap is to come).
    pub fn before_swap(self) -> bool {
        self < Phase::CountTasks
    }
}

/// One of the ranges a rewrite replaces.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Source {
    pub position: i32,
    pub tasks_relid: Oid,
    pub events_relid: Oid,
    pub lower: DateTime<Utc>,
    pub upper: DateTime<Utc>,
}

/// A rewrite in progress, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    pub id: i64,
    pub task: String,
    pub run_id: Uuid,
    pub lower: DateTime<Utc>,
    pub upper: DateTime<Utc>,
    pub new_tasks: Oid,
    pub new_events: Oid,
    pub new_tasks_name: String,
    pub new_events_name: String,
    pub rule_now: DateTime<Utc>,
    pub grace: Duration,
    pub rules_version: i64,
    pub phase: Phase,
    pub source: i32,
    pub block: i64,
    pub held_tenants: Option<Vec<Uuid>>,
    pub held_tasks: Option<Vec<Uuid>>,
    pub rows_read: i64,
    pub tasks_kept: i64,
    pub seconds: f64,
    pub lock_ms: Option<f64>,
    pub failures: i32,
    pub last_error: Option<String>,
    pub sources: Vec<Source>,
}

#[derive(FromRow)]
struct RewriteRow {
    id: i64,
    task: String,
    run_id: Uuid,
    lower: DateTime<Utc>,
    upper: DateTime<Utc>,
    new_tasks_relid: Oid,
    new_events_relid: Oid,
    new_tasks_name: String,
    new_events_name: String,
    rule_now: DateTime<Utc>,
    grace: PgInterval,
    rules_version: i64,
    phase: String,
    source: i32,
    block: i64,
    held_tenants: Option<Vec<Uuid>>,
    held_tasks: Option<Vec<Uuid>>,
    rows_read: i64,
    tasks_kept: i64,
    seconds: f64,
    lock_ms: Option<f64>,
    failures: i32,
    last_error: Option<String>,
}

const COLUMNS: &str = "id, task, run_id, lower, upper, new_tasks_relid, new_events_relid, new_tasks_name, new_events_name,
     rule_now, grace, rules_version, phase, source, block, held_tenants, held_tasks, rows_read, tasks_kept, seconds, lock_ms,
     failures, last_error";

impl Rewrite {
    /// The rule the copy and the replays decide by: at the rewrite's instant, with the holds and
    /// the tenants' rules as they are when each statement runs.
    pub fn rule(&self) -> Rule {
        Rule {
            now: self.rule_now,
            grace: self.grace,
            holds: Holds::Live,
        }
    }

    /// The rule as the swap recorded it (the holds then in force), for the count.
    pub fn recorded_rule(&self) -> Rule {
        Rule {
            now: self.rule_now,
            grace: self.grace,
            holds: Holds::Recorded {
                tenants: self.held_tenants.clone().unwrap_or_default(),
                tasks: self.held_tasks.clone().unwrap_or_default(),
            },
        }
    }

    /// The receipts its count adds to: those of the run that started it.
    pub fn receipt(&self) -> RunReceipt {
        RunReceipt::new(self.run_id, self.task.clone())
    }

    pub fn lower_text(&self) -> String {
        self.lower.to_rfc3339()
    }

    pub fn upper_text(&self) -> String {
        self.upper.to_rfc3339()
    }

    /// The source the phase's walk is on, if it has not passed the last.
    pub fn current_source(&self) -> Option<&Source> {
        usize::try_from(self.source)
            .ok()
            .and_then(|i| self.sources.get(i))
    }

    /// Whether every step is done but dropping the detached tables.
    pub fn counted(&self) -> bool {
        self.phase == Phase::CountEvents && self.current_source().is_none()
    }

    /// Every source's tasks and events partitions (their OIDs).
    pub fn source_relids(&self) -> Vec<Oid> {
        self.sources
            .iter()
            .flat_map(|s| [s.tasks_relid, s.events_relid])
            .collect()
    }

    fn from_row(row: RewriteRow, sources: Vec<Source>) -> Rewrite {
        Rewrite {
            id: row.id,
            task: row.task,
            run_id: row.run_id,
            lower: row.lower,
            upper: row.upper,
            new_tasks: row.new_tasks_relid,
            new_events: row.new_events_relid,
            new_tasks_name: row.new_tasks_name,
            new_events_name: row.new_events_name,
            rule_now: row.rule_now,
            grace: Duration::from_micros(u64::try_from(row.grace.microseconds).unwrap_or(0))
                + Duration::from_secs(u64::try_from(row.grace.days).unwrap_or(0) * 86_400),
            rules_version: row.rules_version,
            phase: Phase::parse(&row.phase),
            source: row.source,
            block: row.block,
            held_tenants: row.held_tenants,
            held_tasks: row.held_tasks,
            rows_read: row.rows_read,
            tasks_kept: row.tasks_kept,
            seconds: row.seconds,
            lock_ms: row.lock_ms,
            failures: row.failures,
            last_error: row.last_error,
            sources,
        }
    }
}

async fn sources_of(executor: impl PgExecutor<'_>, id: i64) -> Result<Vec<Source>, sqlx::Error> {
    sqlx::query_as!(
        Source,
        "SELECT position, tasks_relid, events_relid, lower, upper FROM history_rewrite_sources WHERE rewrite_id = $1 ORDER BY position",
        id
    )
    .fetch_all(executor)
    .await
}

/// Every rewrite in progress, oldest first.
pub async fn in_progress(conn: &mut PgConnection) -> Result<Vec<Rewrite>, sqlx::Error> {
    let rows: Vec<RewriteRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM history_rewrites ORDER BY id"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let mut rewrites = Vec::with_capacity(rows.len());
    for row in rows {
        let sources = sources_of(&mut *conn, row.id).await?;
        rewrites.push(Rewrite::from_row(row, sources));
    }
    Ok(rewrites)
}

/// The rewrite `id`, locked for the caller's transaction (the step it is about to take), or
/// `None` when it is gone. Another runner's step on it is waited for (up to the transaction's
/// `lock_timeout`: then the error says so, see `batch::is_lock_not_had`).
pub async fn lock(conn: &mut PgConnection, id: i64) -> Result<Option<Rewrite>, sqlx::Error> {
    let row: Option<RewriteRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM history_rewrites WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let sources = sources_of(&mut *conn, id).await?;
    Ok(Some(Rewrite::from_row(row, sources)))
}

/// Adds the time a step took to the rewrite's record (in the step's transaction).
pub async fn spent(conn: &mut PgConnection, id: i64, seconds: f64) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE history_rewrites SET seconds = seconds + $2 WHERE id = $1",
        id,
        seconds
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a step that failed (in a transaction of its own); returns the failures so far.
pub async fn failed(pool: &PgPool, id: i64, error: &str) -> Result<i32, sqlx::Error> {
    let failures: Option<i32> = sqlx::query_scalar!(
        "UPDATE history_rewrites SET failures = failures + 1, last_error = $2 WHERE id = $1 RETURNING failures",
        id,
        error
    )
    .fetch_optional(pool)
    .await?;
    Ok(failures.unwrap_or(0))
}

/// Why a rewrite did not start, or could not go on now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotNow {
    /// Another runner is changing the layout.
    LayoutBusy,
    /// A source range is held by another runner (a row-delete batch for a moment, a carve), is
    /// gone, or is being rewritten already.
    SourcesBusy,
    /// Another runner is working on this rewrite.
    Taken,
    /// Its steps kept failing: it is tried again at the next run.
    Failing,
    /// A lock on the history tables could not be had within the lock timeout.
    LockTimeout,
    /// Waiting for the history tables' lock closed a cycle of waits with a writer (a deadlock).
    Deadlock,
    /// The rules changed (or a change was being committed) since the rows were copied: the
    /// tenants concerned are copied again first.
    RulesChanged,
}

impl NotNow {
    pub fn as_str(self) -> &'static str {
        match self {
            NotNow::LayoutBusy => "another runner is changing the history layout",
            NotNow::SourcesBusy => {
                "a source range is held by another runner, gone, or being rewritten already"
            }
            NotNow::Taken => "another runner is working on this rewrite",
            NotNow::Failing => "its steps kept failing",
            NotNow::LockTimeout => "the history tables' lock could not be had in time",
            NotNow::Deadlock => "waiting for the history tables' lock deadlocked with a writer",
            NotNow::RulesChanged => "a tenant's retention or a hold changed since the copy",
        }
    }
}

/// Ends `tx` (rolling it back, and waiting for that, so that no lock it took outlives this call:
/// a transaction merely dropped is rolled back later, on its connection's next use) and says why.
pub(crate) async fn not_now<T>(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    why: NotNow,
) -> Result<Result<T, NotNow>, sqlx::Error> {
    tx.rollback().await?;
    Ok(Err(why))
}

/// The names of `parent`'s columns, in order, as an SQL list (a copy names them, so that it does
/// not depend on the order of a partition's columns).
pub(crate) async fn columns(conn: &mut PgConnection, parent: &str) -> Result<String, sqlx::Error> {
    // The parent by name: the server resolves it (`regclass`'s input).
    sqlx::query_scalar!(
        r#"SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) AS "columns!" FROM pg_attribute
         WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped"#,
        parent
    )
    .fetch_one(conn)
    .await
}

/// Starts a rewrite of `sources` (adjacent ranges of finite bounds, oldest first, settled) for
/// `task`'s run `run_id`, deciding by `rule`'s instant: one transaction under the layout lock
/// (waited for up to `lock_timeout` when `wait`), which marks the sources (switching their change
/// log to record every write: DDL that waits as long for their writers) and creates the new
/// range's tables.
pub async fn start(
    pool: &PgPool,
    sources: &[Range],
    (task, run_id): (&str, Uuid),
    rule: &Rule,
    limits: BatchLimits,
    lock_timeout: Duration,
    wait: bool,
) -> Result<Result<Rewrite, NotNow>, sqlx::Error> {
    let (Some(first), Some(last)) = (sources.first(), sources.last()) else {
        return Err(sqlx::Error::Protocol(
            "a rewrite needs at least one source range".into(),
        ));
    };
    let contiguous = sources
        .windows(2)
        .all(|w| w[0].upper.is_some() && w[0].upper == w[1].lower);
    let finite = sources
        .iter()
        .all(|r| r.kind == RangeKind::Range && r.lower.is_some() && r.upper.is_some());
    if !contiguous || !finite {
        return Err(sqlx::Error::Protocol(
            "a rewrite takes adjacent ranges of finite bounds".into(),
        ));
    }
    let (lower, upper) = (first.lower.unwrap(), last.upper.unwrap());
    let (lower_text, upper_text) = (lower.to_rfc3339(), upper.to_rfc3339());
    let mut tx = batch::begin(pool, limits.with_lock_timeout(lock_timeout)).await?;
    engine_write(&mut tx).await?;
    match take_layout_lock(&mut tx, wait).await {
        Ok(true) => {}
        Ok(false) => return not_now(tx, NotNow::LayoutBusy).await,
        Err(error) if batch::is_lock_not_had(&error) => {
            return not_now(tx, NotNow::LayoutBusy).await
        }
        Err(error) => return Err(error),
    }
    let relids: Vec<Oid> = sources.iter().map(|r| r.tasks_relid).collect();
    let locked: Vec<Oid> = match sqlx::query_scalar!(
        "SELECT tasks_relid FROM history_ranges
         WHERE tasks_relid = ANY($1) AND rewrite_id IS NULL AND log_mode = 'all' AND settled_at IS NOT NULL
         FOR UPDATE NOWAIT",
        &relids
    )
    .fetch_all(&mut *tx)
    .await
    {
        Ok(locked) => locked,
        Err(error) if batch::is_lock_not_had(&error) => return not_now(tx, NotNow::SourcesBusy).await,
        Err(error) => return Err(error),
    };
    if locked.len() != sources.len() {
        return not_now(tx, NotNow::SourcesBusy).await;
    }
    for source in sources {
        ranges::verify_bounds(&mut tx, source).await?;
    }
    let (new_tasks, new_events) =
        ranges::create_tables(&mut tx, &lower_text, &upper_text, "_new", LogMode::All).await?;
    let names = sqlx::query!(
        r#"SELECT relname::text AS "tasks!", (SELECT relname::text FROM pg_class WHERE oid = $2) AS "events!" FROM pg_class WHERE oid = $1"#,
        new_tasks,
        new_events
    )
    .fetch_one(&mut *tx)
    .await?;
    let (new_tasks_name, new_events_name) = (names.tasks, names.events);
    let id: i64 = sqlx::query_scalar!(
        "INSERT INTO history_rewrites (task, run_id, lower, upper, new_tasks_relid, new_events_relid, new_tasks_name, new_events_name,
                                       rule_now, grace, rules_version, phase)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, version, 'copy-tasks' FROM retention_rules
         RETURNING id",
        task,
        run_id,
        lower,
        upper,
        new_tasks,
        new_events,
        new_tasks_name,
        new_events_name,
        rule.now,
        crate::rule::interval(rule.grace)
    )
    .fetch_one(&mut *tx)
    .await?;
    for (position, source) in sources.iter().enumerate() {
        sqlx::query!(
            "INSERT INTO history_rewrite_sources (rewrite_id, position, tasks_relid, events_relid, lower, upper) VALUES ($1, $2, $3, $4, $5, $6)",
            id,
            position as i32,
            source.tasks_relid,
            source.events_relid,
            source.lower,
            source.upper
        )
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query!(
        "UPDATE history_ranges SET rewrite_id = $2 WHERE tasks_relid = ANY($1)",
        &relids,
        id
    )
    .execute(&mut *tx)
    .await?;
    for source in sources {
        match ranges::set_log_mode(
            &mut tx,
            source.tasks_relid,
            source.events_relid,
            &source.lower_text(),
            LogMode::Rewrite,
        )
        .await
        {
            Ok(()) => {}
            Err(error) if batch::is_lock_not_had(&error) => {
                return not_now(tx, NotNow::LockTimeout).await
            }
            Err(error) if batch::is_retryable(&error) => {
                return not_now(tx, NotNow::Deadlock).await
            }
            Err(error) => return Err(error),
        }
    }
    let rewrite = lock(&mut tx, id).await?.expect("the rewrite just recorded");
    tx.commit().await?;
    Ok(Ok(rewrite))
}

/// Gives up rewrite `rewrite` before its swap (a step that keeps failing, sources an operator
/// took away): the sources log as before (DDL that waits up to `lock_timeout` for their
/// writers), the new tables are dropped (by OID, while they still carry the names they were
/// created with and are not partitions), and the record goes. Returns false when another runner
/// holds the rewrite, it is past its swap, or a lock was not had (in time, or at all: a deadlock
/// with a writer): the rewrite stays as it was, for a later run.
pub async fn abandon(
    pool: &PgPool,
    id: i64,
    limits: BatchLimits,
    lock_timeout: Duration,
) -> Result<bool, sqlx::Error> {
    match abandon_now(pool, id, limits, lock_timeout).await {
        Err(error) if batch::is_lock_not_had(&error) => Ok(false),
        result => result,
    }
}

async fn abandon_now(
    pool: &PgPool,
    id: i64,
    limits: BatchLimits,
    lock_timeout: Duration,
) -> Result<bool, sqlx::Error> {
    let mut tx = batch::begin(pool, limits.with_lock_timeout(lock_timeout)).await?;
    let rewrite = match lock(&mut tx, id).await {
        Ok(Some(rewrite)) if rewrite.phase.before_swap() => rewrite,
        Ok(_) => return tx.rollback().await.map(|()| false),
        Err(error) if batch::is_lock_not_had(&error) => return Ok(false),
        Err(error) => return Err(error),
    };
    let marked = sqlx::query!(
        r#"SELECT tasks_relid, events_relid, lower::text AS "lower!" FROM history_ranges WHERE rewrite_id = $1 FOR UPDATE"#,
        id
    )
    .fetch_all(&mut *tx)
    .await?;
    for range in marked {
        ranges::set_log_mode(
            &mut tx,
            range.tasks_relid,
            range.events_relid,
            &range.lower,
            LogMode::All,
        )
        .await?;
    }
    sqlx::query!(
        "UPDATE history_ranges SET rewrite_id = NULL WHERE rewrite_id = $1",
        id
    )
    .execute(&mut *tx)
    .await?;
    for (relid, name) in [
        (rewrite.new_tasks, &rewrite.new_tasks_name),
        (rewrite.new_events, &rewrite.new_events_name),
    ] {
        let current: Option<(String, bool)> = sqlx::query!(
            r#"SELECT relname::text AS "relname!", relispartition FROM pg_class WHERE oid = $1"#,
            relid
        )
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| (row.relname, row.relispartition));
        if matches!(&current, Some((current, false)) if current == name) {
            sqlx::query(&format!("DROP TABLE {}", super::ident(name)))
                .execute(&mut *tx)
                .await?;
        }
    }
    sqlx::query!("DELETE FROM history_rewrites WHERE id = $1", id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Whether the rewrite's sources are still the ranges it started from (an operator may have
/// detached one: the layout then forgot it), in the caller's transaction.
pub(crate) async fn sources_attached(
    conn: &mut PgConnection,
    rewrite: &Rewrite,
) -> Result<bool, sqlx::Error> {
    let relids: Vec<Oid> = rewrite.sources.iter().map(|s| s.tasks_relid).collect();
    let marked: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "marked!" FROM history_ranges WHERE rewrite_id = $1 AND tasks_relid = ANY($2)"#,
        rewrite.id,
        &relids
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(marked == rewrite.sources.len() as i64)
}

/// Deletes the records of which tenant each version of the rules changed that no rewrite needs
/// any more (those older than every rewrite's rules), a bounded batch at a time.
pub async fn prune_rule_changes(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let deleted = sqlx::query!(
            "DELETE FROM retention_rule_changes WHERE ctid = ANY (ARRAY (
                 SELECT ctid FROM retention_rule_changes
                 WHERE version <= coalesce((SELECT min(rules_version) FROM history_rewrites), (SELECT version FROM retention_rules))
                 LIMIT 10000))",
        )
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < 10_000 {
            return Ok(total);
        }
    }
}
