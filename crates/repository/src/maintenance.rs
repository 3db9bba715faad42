//! The retention controller's own state: which tasks an operator paused, and the run log
//! (`maintenance_runs`, one row per run, kept bounded). The run log commits without waiting for
//! the disk (`batch::begin_bookkeeping`); a pause or resume is an operator's act and waits.

use chrono::{DateTime, Utc};
use sqlx::postgres::types::PgInterval;
use sqlx::{FromRow, PgExecutor, PgPool};
use uuid::Uuid;

/// Runs kept per task in `maintenance_runs`; older ones are deleted as each run finishes.
pub const RUNS_KEPT_PER_TASK: i64 = 500;
/// Hours of rows deleted per task kept in `maintenance_rows_by_hour` (31 days).
pub const HOURS_KEPT: i64 = 31 * 24;

/// Pauses or resumes `task`; returns whether that changed anything.
pub async fn set_paused(
    executor: impl PgExecutor<'_>,
    task: &str,
    paused: bool,
) -> Result<bool, sqlx::Error> {
    let changed: Option<bool> = sqlx::query_scalar!(
        r#"INSERT INTO maintenance_tasks AS m (task, paused, paused_at) VALUES ($1, $2, CASE WHEN $2 THEN now() END)
         ON CONFLICT (task) DO UPDATE
             SET paused = excluded.paused, paused_at = excluded.paused_at, updated_at = now()
             WHERE m.paused IS DISTINCT FROM excluded.paused
         RETURNING true AS "changed!""#,
        task,
        paused
    )
    .fetch_optional(executor)
    .await?;
    Ok(changed.unwrap_or(false))
}

/// How a run ended, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    DeadlineReached,
    Cancelled,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::DeadlineReached => "deadline reached",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// Records how run `run_id` ended and trims the task's log to [`RUNS_KEPT_PER_TASK`] runs, and
/// releases the run's lease: one statement in one round trip, its own transaction, whose commit
/// does not wait for the disk ([`crate::batch::BOOKKEEPING_COMMIT`]). Returns whether the lease
/// was still the run's.
pub async fn finish_run(
    pool: &PgPool,
    run_id: Uuid,
    task: &str,
    rows: u64,
    outcome: Outcome,
    error: Option<&str>,
) -> Result<bool, sqlx::Error> {
    // The task's row is updated once (a statement may not update a row twice): the run's
    // record where the run is the task's last, the lease's release where the lease is the
    // run's. `before` is the row as the statement found it; a lease another runner took
    // meanwhile is theirs after the update, so `released` is false for it.
    // The last column is `crate::batch::BOOKKEEPING_COMMIT` (the macros take only literal text).
    let row = sqlx::query!(
        r#"WITH run AS (
             UPDATE maintenance_runs SET finished_at = now(), rows = $3, outcome = $4, error = $5
             WHERE run_id = $1
         ), state AS (
             UPDATE maintenance_tasks m
             SET last_finished_at = CASE WHEN m.last_run_id = $1 THEN now() ELSE m.last_finished_at END,
                 last_outcome = CASE WHEN m.last_run_id = $1 THEN $4 ELSE m.last_outcome END,
                 last_rows = CASE WHEN m.last_run_id = $1 THEN $3 ELSE m.last_rows END,
                 last_success_at = CASE WHEN m.last_run_id = $1 AND $4 <> 'failed' THEN now() ELSE m.last_success_at END,
                 updated_at = CASE WHEN m.last_run_id = $1 THEN now() ELSE m.updated_at END,
                 lease_run_id = CASE WHEN m.lease_run_id = $1 THEN NULL ELSE m.lease_run_id END,
                 lease_holder = CASE WHEN m.lease_run_id = $1 THEN NULL ELSE m.lease_holder END,
                 lease_expires_at = CASE WHEN m.lease_run_id = $1 THEN NULL ELSE m.lease_expires_at END
             FROM maintenance_tasks before
             WHERE m.task = $2 AND before.task = m.task AND (m.last_run_id = $1 OR m.lease_run_id = $1)
             RETURNING before.lease_run_id = $1 AND m.lease_run_id IS NULL AS released
         ), hourly AS (
             INSERT INTO maintenance_rows_by_hour AS h (task, hour, rows, runs, failed)
             VALUES ($2, date_trunc('hour', now()), $3, 1, CASE WHEN $4 = 'failed' THEN 1 ELSE 0 END)
             ON CONFLICT (task, hour) DO UPDATE
             SET rows = h.rows + excluded.rows, runs = h.runs + 1, failed = h.failed + excluded.failed
         ), old_hours AS (
             DELETE FROM maintenance_rows_by_hour WHERE hour < now() - $7::interval
         ), trimmed AS (
             DELETE FROM maintenance_runs r
             WHERE r.task = $2 AND r.run_id IN (
                 SELECT run_id FROM maintenance_runs WHERE task = $2 ORDER BY started_at DESC OFFSET $6
             )
         )
         SELECT bool_or(released) AS "released?", (SELECT set_config('synchronous_commit', 'off', true)) AS "commit!" FROM state"#,
        run_id,
        task,
        rows as i64,
        outcome.as_str(),
        error,
        RUNS_KEPT_PER_TASK,
        PgInterval {
            months: 0,
            days: 0,
            microseconds: HOURS_KEPT * 3_600_000_000,
        }
    )
    .fetch_one(pool)
    .await?;
    let released = row.released;
    Ok(released.unwrap_or(false))
}

/// What `engine retention status` shows of one task.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct TaskState {
    pub task: String,
    pub paused: bool,
    pub last_run_id: Option<Uuid>,
    pub last_started_at: Option<DateTime<Utc>>,
    pub last_finished_at: Option<DateTime<Utc>>,
    pub last_outcome: Option<String>,
    pub last_rows: Option<i64>,
    pub last_success_at: Option<DateTime<Utc>>,
    /// The replica holding the task's lease (running it) now, if any.
    pub holder: Option<String>,
}

/// The recorded state of `task` (defaults when it never ran nor was paused).
pub async fn state(executor: impl PgExecutor<'_>, task: &str) -> Result<TaskState, sqlx::Error> {
    sqlx::query_as!(
        TaskState,
        r#"SELECT $1::text AS "task!", coalesce(m.paused, false) AS "paused!", m.last_run_id AS "last_run_id?",
                m.last_started_at AS "last_started_at?", m.last_finished_at AS "last_finished_at?",
                m.last_outcome AS "last_outcome?", m.last_rows AS "last_rows?", m.last_success_at AS "last_success_at?",
                CASE WHEN m.lease_expires_at > now() THEN m.lease_holder END AS "holder?"
         FROM (SELECT 1) one LEFT JOIN maintenance_tasks m ON m.task = $1"#,
        task
    )
    .fetch_one(executor)
    .await
}

/// Runs in the log of `task`, newest first.
pub async fn run_count(executor: impl PgExecutor<'_>, task: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM maintenance_runs WHERE task = $1"#,
        task
    )
    .fetch_one(executor)
    .await
}

/// Rows deleted by one task in one hour (the hour its runs finished).
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct HourRows {
    pub task: String,
    pub hour: DateTime<Utc>,
    pub rows: i64,
    pub runs: i32,
    pub failed: i32,
}

/// Rows deleted per task and hour since `since`, oldest first.
pub async fn rows_by_hour(
    executor: impl PgExecutor<'_>,
    since: DateTime<Utc>,
) -> Result<Vec<HourRows>, sqlx::Error> {
    sqlx::query_as!(
        HourRows,
        "SELECT task, hour, rows, runs, failed FROM maintenance_rows_by_hour WHERE hour >= $1 ORDER BY hour, task",
        since
    )
    .fetch_all(executor)
    .await
}

/// Rows deleted per task by the runs that started at or after `since` (finished or not yet).
pub async fn rows_since(
    executor: impl PgExecutor<'_>,
    since: DateTime<Utc>,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT task, coalesce(sum(rows), 0)::bigint AS "rows!" FROM maintenance_runs WHERE started_at >= $1 GROUP BY task"#,
        since
    )
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(|row| (row.task, row.rows)).collect())
}

/// A run that failed, as the run log has it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct FailedRun {
    pub run_id: Uuid,
    pub task: String,
    pub replica: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// The `limit` most recent failed runs, newest first.
pub async fn failed_runs(
    executor: impl PgExecutor<'_>,
    limit: i64,
) -> Result<Vec<FailedRun>, sqlx::Error> {
    sqlx::query_as!(
        FailedRun,
        "SELECT run_id, task, replica, started_at, finished_at, error FROM maintenance_runs
         WHERE outcome = 'failed' ORDER BY started_at DESC LIMIT $1",
        limit
    )
    .fetch_all(executor)
    .await
}

/// One of the tables retention keeps bounded, as the catalog sees it.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct TableSize {
    pub table: String,
    /// Heap, indexes and TOAST, summed over every partition.
    pub bytes: i64,
    /// Live rows as the statistics count them (updated as transactions commit, not exact).
    pub live_rows: i64,
    /// Partitions attached (0 for a plain table).
    pub partitions: i64,
}

/// The tables retention deletes from, with their size and live rows.
pub const BOUNDED_TABLES: [&str; 5] = [
    "user_sessions",
    "queue_items",
    "tasks",
    "task_events",
    "retention_receipts",
];

/// Size and live rows of each of [`BOUNDED_TABLES`], partitions summed into their parent.
pub async fn table_sizes(executor: impl PgExecutor<'_>) -> Result<Vec<TableSize>, sqlx::Error> {
    sqlx::query_as!(
        TableSize,
        r#"SELECT t.name AS "table!",
                coalesce(sum(pg_total_relation_size(l.relid)), 0)::bigint AS "bytes!",
                coalesce(sum(s.n_live_tup), 0)::bigint AS "live_rows!",
                (count(*) FILTER (WHERE l.level = 1))::bigint AS "partitions!"
         FROM unnest($1::text[]) WITH ORDINALITY AS t(name, n)
         CROSS JOIN LATERAL (
             SELECT p.relid::oid AS relid, p.level FROM pg_partition_tree(t.name::regclass) p WHERE p.isleaf
             UNION ALL
             SELECT c.oid, 0 FROM pg_class c WHERE c.oid = t.name::regclass AND c.relkind = 'r'
         ) l
         LEFT JOIN pg_stat_user_tables s ON s.relid = l.relid
         GROUP BY t.name, t.n ORDER BY t.n"#,
        BOUNDED_TABLES.as_slice() as &[&str]
    )
    .fetch_all(executor)
    .await
}
