//! Row deletes of run history: one statement (so one transaction) deletes a batch of tasks with
//! their events and queue items, so no crash can leave orphans behind.
//!
//! A batch works on one tenant's rows in one range, naming the range's partitions (a plan over
//! one table costs a fraction of a millisecond; over the parent it grows with the partitions),
//! while holding the range's `history_ranges` row in share mode: a range being rewritten is
//! skipped (the batch reports it missing), never waited for or failed on. If the range was
//! replaced meanwhile its row is gone and the batch touches nothing, whichever table its names
//! now denote; if its bounds moved (a carve), or its tables were dropped, the batch reports it
//! missing too. Every victim is checked by `retention_task_due` against the tenant's row as it is
//! when the batch runs: a tenant put on hold (set to forever), or restored, mid-run stops losing
//! rows at the next batch.

use chrono::{DateTime, Utc};
use sqlx::postgres::types::Oid;
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

use super::{due, held, interval, FINAL};
use crate::receipts::{self, RunReceipt};

/// How a pair's batches walk its rows, and where they have reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walk {
    /// A live tenant's final tasks by finish instant (`tasks_finished_due_idx`), up to its cutoff,
    /// from the instant reached (PostgreSQL text, so `-infinity` round-trips).
    Retained { after: String },
    /// Every task of a tenant deleted longer ago than the grace, by id (`tasks_tenant_id_id_idx`).
    Purged { after: Option<Uuid> },
}

impl Walk {
    pub fn retained() -> Walk {
        Walk::Retained { after: "-infinity".into() }
    }

    pub fn purged() -> Walk {
        Walk::Purged { after: None }
    }
}

/// What one batch deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub tasks: i64,
    pub events: i64,
    pub queue_items: i64,
}

/// One batch's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub deleted: Deleted,
    /// Tasks the batch looked at (locked rows of others skipped): fewer than its limit ends the walk.
    pub examined: i64,
    /// The range is being rewritten or carved, is gone, or its bounds moved since it was planned:
    /// nothing was done, the pair must be planned again.
    /// If its tables were dropped, the statement failed and so has the caller's transaction:
    /// nothing more may run in it.
    pub range_missing: bool,
}

#[derive(FromRow)]
struct BatchRow {
    tasks: i64,
    events: i64,
    queue_items: i64,
    examined: i64,
    present: bool,
    last_key: Option<String>,
    last_id: Option<Uuid>,
}

/// The rows of a pair to delete: those of `tenant_id` in the range whose partitions are
/// `tasks_relid` (named `tasks_table`) and `events_table`.
#[derive(Debug, Clone)]
pub struct PairRef {
    pub tasks_relid: Oid,
    /// The range's bounds as planned (SQL text): a batch finds the range missing once they have
    /// changed (a carve moves the future range's start, and its rows, elsewhere).
    pub lower: String,
    pub upper: String,
    pub tasks_table: String,
    pub events_table: String,
    pub tenant_id: Uuid,
}

impl PairRef {
    pub fn new(range: &super::Range, tenant_id: Uuid) -> PairRef {
        PairRef {
            tasks_relid: range.tasks_relid,
            lower: range.lower_text(),
            upper: range.upper_text(),
            tasks_table: range.tasks_name.clone(),
            events_table: range.events_name.clone(),
            tenant_id,
        }
    }
}

/// Deletes up to `limit` due tasks of the pair, with their events and queue items, walking as
/// `walk` says and moving it on, and adds what it deleted to the run's receipts.
///
/// Only due tasks are candidates (the index bound is the tenant's shortest window; the rule, with
/// each status's window and the holds, filters the rows passed): every candidate locked is deleted,
/// so the walk's cursor always moves on, and a kept row is never locked.
pub async fn delete_batch(
    executor: impl PgExecutor<'_>,
    pair: &PairRef,
    walk: &mut Walk,
    grace: std::time::Duration,
    limit: u32,
    receipt: &RunReceipt,
) -> Result<Batch, sqlx::Error> {
    let (access, order, cursor) = match walk {
        Walk::Retained { after } => (
            "t.status IN {FINAL}
             AND coalesce(t.finished_at, t.inserted_at) < retention_cutoff(now(), tn.shortest_retention_period)
             AND coalesce(t.finished_at, t.inserted_at) >= $3::timestamptz"
                .replace("{FINAL}", FINAL),
            "coalesce(t.finished_at, t.inserted_at)",
            after.clone(),
        ),
        Walk::Purged { after } => (
            // `>=`: a task id may repeat with another inserted_at; rows already deleted at that id
            // are passed again, once.
            "t.id >= $3::uuid".to_string(),
            "t.id",
            after.map_or_else(|| Uuid::nil().to_string(), |id| id.to_string()),
        ),
    };
    let sql = format!(
        "WITH r AS MATERIALIZED ({planned}),
         tn AS MATERIALIZED (SELECT * FROM tenants WHERE id = $2),
         candidates AS MATERIALIZED (
             SELECT c.* FROM r, tn CROSS JOIN LATERAL (
                 SELECT t.id, t.inserted_at, t.status, t.finished_at FROM {tasks_table} t
                 WHERE t.tenant_id = $2 AND {access} AND {candidate_rule}
                 ORDER BY {order}
                 LIMIT $4
                 FOR UPDATE OF t SKIP LOCKED) c
         ),
         victims AS MATERIALIZED (
             SELECT c.id, c.inserted_at FROM candidates c, tn WHERE {rule}
         ),
         events AS (
             DELETE FROM {events_table} e USING victims v
             WHERE e.task_id = v.id AND e.task_inserted_at = v.inserted_at RETURNING 1
         ), queue AS (
             DELETE FROM queue_items q USING victims v
             WHERE q.task_id = v.id AND q.task_inserted_at = v.inserted_at RETURNING 1
         ), gone AS (
             DELETE FROM {tasks_table} t USING victims v
             WHERE t.id = v.id AND t.inserted_at = v.inserted_at
             RETURNING t.id, coalesce(t.finished_at, t.inserted_at) AS key
         ), receipt AS (
             {receipt}
         )
         SELECT (SELECT count(*) FROM gone) AS tasks, (SELECT count(*) FROM events) AS events,
                (SELECT count(*) FROM queue) AS queue_items, (SELECT count(*) FROM candidates) AS examined,
                EXISTS (SELECT 1 FROM r) AS present,
                (SELECT max(key)::text FROM gone) AS last_key, (SELECT max(id::text)::uuid FROM gone) AS last_id",
        rule = due("c", "tn", "now()", "$5"),
        candidate_rule = due("t", "tn", "now()", "$5"),
        receipt = receipts::add(
            "SELECT $6::uuid, $2::uuid, CASE WHEN tn.deleted_at IS NULL THEN 'retention' ELSE 'deleted-tenants' END, $7::text,
                    g.tasks, (SELECT count(*) FROM events), (SELECT count(*) FROM queue), g.oldest, g.newest
             FROM tn, (SELECT count(*) AS tasks, min(key) AS oldest, max(key) AS newest FROM gone) g
             WHERE g.tasks > 0"
        ),
        planned = planned_range("$1", "$8", "$9"),
        tasks_table = pair.tasks_table,
        events_table = pair.events_table,
    );
    let result: Result<BatchRow, sqlx::Error> = sqlx::query_as(&sql)
        .bind(pair.tasks_relid)
        .bind(pair.tenant_id)
        .bind(cursor)
        .bind(i64::from(limit))
        .bind(interval(grace))
        .bind(receipt.run_id)
        .bind(receipt.task)
        .bind(&pair.lower)
        .bind(&pair.upper)
        .fetch_one(executor)
        .await;
    let row = match result {
        Ok(row) => row,
        Err(error) if is_undefined_table(&error) => {
            return Ok(Batch { deleted: Deleted::default(), examined: 0, range_missing: true });
        }
        Err(error) => return Err(error),
    };
    match walk {
        Walk::Retained { after } => {
            if let Some(key) = row.last_key {
                *after = key;
            }
        }
        Walk::Purged { after } => {
            if row.last_id.is_some() {
                *after = row.last_id;
            }
        }
    }
    Ok(Batch {
        deleted: Deleted { tasks: row.tasks, events: row.events, queue_items: row.queue_items },
        examined: row.examined,
        range_missing: !row.present,
    })
}

/// Tasks one tenant lost in a block-range batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantGone {
    pub tenant_id: Uuid,
    /// The tenant was deleted (so its rows went by the deleted-tenants part of the rule).
    pub purged: bool,
    pub tasks: i64,
}

/// What one block-range batch of a range sweep deleted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SweepBatch {
    pub tenants: Vec<TenantGone>,
    pub events: i64,
    pub queue_items: i64,
    /// As in [`Batch::range_missing`].
    pub range_missing: bool,
}

#[derive(FromRow)]
struct SweepRow {
    events: i64,
    queue_items: i64,
    present: bool,
    tenant_ids: Vec<Uuid>,
    purged: Vec<bool>,
    tasks: Vec<i64>,
}

/// Deletes every due task on the pages `blocks` of the range's tasks partition, whatever its
/// tenant, with their events and queue items: one statement, like [`delete_batch`], and the same
/// rule checked against each tenant's row as it is now.
///
/// A pass over a range in block ranges (a Tid Range Scan reads exactly those pages) costs what one
/// bare DELETE of the range costs, where walking it tenant by tenant through the indexes costs an
/// index probe and a lock per task and a statement per tenant. A task that a writer holds locked is
/// waited for (bounded by `lock_timeout`), then the rule is checked again on its newest version.
/// Events and queue items go by a join on the batch's tasks (unique keys: no semi-join's
/// de-duplication, 7% faster): an index probe each (~5 µs an event, where the bare DELETE's hash
/// join spends ~2.5). Planned once per connection (generic plans): planning the statement costs
/// ~3 ms, a batch 10-50 ms. Hashing the batch against one read of the range's events partition
/// (nested loops off) was 25-35% faster by hand on a day once a batch held an eighth of it, but
/// no faster in the engine, with generic or custom plans, at 50 or 200 ms batches.
///
/// Statements on disjoint block ranges of the same range may run at once (a parallel walk): they
/// share only their receipts' rows, which each statement locks in tenant order, so that two of
/// them wait for each other but never deadlock.
pub async fn delete_block_range(
    executor: impl PgExecutor<'_>,
    range: &super::Range,
    blocks: crate::heap::BlockRange,
    grace: std::time::Duration,
    receipt: &RunReceipt,
) -> Result<SweepBatch, sqlx::Error> {
    let (from, to) = blocks.tids();
    let sql = format!(
        "WITH r AS MATERIALIZED ({planned}),
         gone AS (
             DELETE FROM {tasks_table} t USING tenants tn
             WHERE EXISTS (SELECT 1 FROM r) AND t.ctid >= $2::tid AND t.ctid < $3::tid
               AND tn.id = t.tenant_id AND {rule}
             RETURNING t.id, t.inserted_at, t.tenant_id, tn.deleted_at IS NOT NULL AS purged,
                       coalesce(t.finished_at, t.inserted_at) AS key
         ), events AS (
             DELETE FROM {events_table} e USING gone g WHERE e.task_id = g.id AND e.task_inserted_at = g.inserted_at
             RETURNING e.tenant_id
         ), queue AS (
             DELETE FROM queue_items q USING gone g WHERE q.task_id = g.id AND q.task_inserted_at = g.inserted_at
             RETURNING q.tenant_id
         ), by_tenant AS (
             SELECT tenant_id, purged, count(*) AS tasks, min(key) AS oldest, max(key) AS newest FROM gone GROUP BY tenant_id, purged
         ), receipt AS (
             {receipt}
         )
         SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM queue) AS queue_items,
                EXISTS (SELECT 1 FROM r) AS present,
                coalesce((SELECT array_agg(tenant_id ORDER BY tenant_id) FROM by_tenant), '{{}}') AS tenant_ids,
                coalesce((SELECT array_agg(purged ORDER BY tenant_id) FROM by_tenant), '{{}}') AS purged,
                coalesce((SELECT array_agg(tasks ORDER BY tenant_id) FROM by_tenant), '{{}}') AS tasks",
        rule = due("t", "tn", "now()", "$4"),
        receipt = receipts::add(
            "SELECT $5::uuid, b.tenant_id, CASE WHEN b.purged THEN 'deleted-tenants' ELSE 'retention' END, $6::text, b.tasks,
                    coalesce(e.n, 0), coalesce(q.n, 0), b.oldest, b.newest
             FROM by_tenant b
             LEFT JOIN (SELECT tenant_id, count(*) AS n FROM events GROUP BY tenant_id) e ON e.tenant_id = b.tenant_id
             LEFT JOIN (SELECT tenant_id, count(*) AS n FROM queue GROUP BY tenant_id) q ON q.tenant_id = b.tenant_id
             ORDER BY b.tenant_id"
        ),
        planned = planned_range("$1", "$7", "$8"),
        tasks_table = range.tasks_name,
        events_table = range.events_name,
    );
    let result: Result<SweepRow, sqlx::Error> = sqlx::query_as(&sql)
        .bind(range.tasks_relid)
        .bind(from)
        .bind(to)
        .bind(interval(grace))
        .bind(receipt.run_id)
        .bind(receipt.task)
        .bind(range.lower_text())
        .bind(range.upper_text())
        .fetch_one(executor)
        .await;
    let row = match result {
        Ok(row) => row,
        Err(error) if is_undefined_table(&error) => return Ok(SweepBatch { range_missing: true, ..SweepBatch::default() }),
        Err(error) => return Err(error),
    };
    let tenants = row
        .tenant_ids
        .into_iter()
        .zip(row.purged)
        .zip(row.tasks)
        .map(|((tenant_id, purged), tasks)| TenantGone { tenant_id, purged, tasks })
        .collect();
    Ok(SweepBatch { tenants, events: row.events, queue_items: row.queue_items, range_missing: !row.present })
}

/// The range a batch was planned on, still as planned: its `history_ranges` row (relid `relid`)
/// with the bounds `lower` and `upper` (SQL text parameters), in share mode. Empty when the range is
/// being rewritten or carved (its row is locked), was replaced (its row is gone), or had its bounds
/// moved (a carve of the future range moves its start, and the rows before it, to new ranges).
fn planned_range(relid: &str, lower: &str, upper: &str) -> String {
    format!(
        "SELECT 1 FROM history_ranges WHERE tasks_relid = {relid}
           AND lower = {lower}::timestamptz AND upper = {upper}::timestamptz FOR SHARE SKIP LOCKED"
    )
}

/// Whether a statement named a table that no longer exists (a range dropped meanwhile).
pub fn is_undefined_table(error: &sqlx::Error) -> bool {
    error.as_database_error().and_then(|e| e.code()).as_deref() == Some("42P01")
}

/// The highest event id handed out so far (committed or not), or 0. One read of the sequence.
pub async fn last_event_id(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM task_events_id_seq").fetch_one(executor).await
}

/// Deletes the events among the first `limit` with ids in `(after, up_to]` that are older than
/// `created_before` and whose task does not exist. Bounded both ways: by a range of ids, so that a
/// batch right after a mass delete, when the index is full of dead entries, costs the ids it
/// passes and not every dead entry up to the next live row; and by rows, so that a range of ids
/// that turns out dense costs no more than `limit` rows.
///
/// An orphan a hold covers (its tenant, or its task's id) is kept and passed: once the hold ends,
/// it goes when its range is next rewritten (compacted or merged).
pub async fn delete_orphan_events_batch(
    executor: impl PgExecutor<'_>,
    after: i64,
    up_to: i64,
    limit: u32,
    created_before: DateTime<Utc>,
    receipt: &RunReceipt,
) -> Result<OrphanBatch, sqlx::Error> {
    sqlx::query_as(&format!(
        "WITH scanned AS MATERIALIZED (
             SELECT e.id, e.task_inserted_at, e.created_at < $4 AS old_enough,
                    NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at) AS orphan
             FROM task_events e WHERE e.id > $1 AND e.id <= $2 ORDER BY e.id LIMIT $3
         ), gone AS (
             DELETE FROM task_events e USING scanned s
             WHERE e.id = s.id AND e.task_inserted_at = s.task_inserted_at AND s.old_enough AND s.orphan
               AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)
               AND NOT {held}
             RETURNING e.tenant_id, e.created_at
         ), receipt AS (
             {receipt}
         )
         SELECT (SELECT count(*) FROM gone) AS deleted,
                CASE WHEN (SELECT count(*) FROM scanned) < $3 THEN $2 ELSE (SELECT max(id) FROM scanned) END AS walked_to,
                (SELECT min(id) FROM scanned WHERE orphan AND NOT old_enough) AS first_undecided",
        held = held("e.tenant_id", "e.task_id", "now()"),
        receipt = receipts::add(
            "SELECT $5::uuid, g.tenant_id, 'orphan-events', $6::text, 0, count(*), 0, min(g.created_at), max(g.created_at)
             FROM gone g GROUP BY g.tenant_id"
        ),
    ))
    .bind(after)
    .bind(up_to)
    .bind(i64::from(limit))
    .bind(created_before)
    .bind(receipt.run_id)
    .bind(receipt.task)
    .fetch_one(executor)
    .await
}

/// What one orphan-events batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromRow)]
pub struct OrphanBatch {
    pub deleted: i64,
    /// The id the walk reached: `up_to`, or the last id examined when the row limit stopped it.
    pub walked_to: i64,
    /// The lowest id of an orphan too young to delete: the watermark may not pass it.
    pub first_undecided: Option<i64>,
}

/// Orphan events older than `created_before` among the events after the watermark `after`.
pub async fn count_orphan_events(executor: impl PgExecutor<'_>, after: i64, created_before: DateTime<Utc>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM task_events e
         WHERE e.id > $1 AND e.created_at < $2
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)
           AND NOT {}",
        held("e.tenant_id", "e.task_id", "now()")
    ))
    .bind(after)
    .bind(created_before)
    .fetch_one(executor)
    .await
}

/// Tasks of one tenant that a run would delete now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromRow)]
pub struct TenantDue {
    pub tenant_id: Uuid,
    /// Under the live tenant's retention.
    pub retained: i64,
    /// Of a tenant deleted longer ago than the grace period.
    pub purged: i64,
}

/// Counts, per tenant with any, every task due now by the rule (each goes with its events and
/// queue items). Reads all of `tasks`: for an operator's dry run.
pub async fn count_due(executor: impl PgExecutor<'_>, grace: std::time::Duration) -> Result<Vec<TenantDue>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT t.tenant_id, count(*) FILTER (WHERE tn.deleted_at IS NULL) AS retained,
                count(*) FILTER (WHERE tn.deleted_at IS NOT NULL) AS purged
         FROM tasks t LEFT JOIN tenants tn ON tn.id = t.tenant_id
         WHERE {}
         GROUP BY t.tenant_id ORDER BY t.tenant_id",
        due("t", "tn", "now()", "$1")
    ))
    .bind(interval(grace))
    .fetch_all(executor)
    .await
}

/// What the next run would delete of one tenant now: its due tasks per status, and their events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TenantPreview {
    pub tasks: Vec<(String, i64)>,
    pub events: i64,
}

/// Counts, by the rule, the tasks of `tenant_id` due now per status, and their events (reads the
/// tenant's tasks through its index; for a dry run).
pub async fn preview_tenant(
    conn: &mut sqlx::PgConnection,
    tenant_id: Uuid,
    grace: std::time::Duration,
) -> Result<TenantPreview, sqlx::Error> {
    let rule = due("t", "tn", "now()", "$2");
    let tasks: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT t.status, count(*) FROM tasks t JOIN tenants tn ON tn.id = t.tenant_id
         WHERE t.tenant_id = $1 AND {rule}
         GROUP BY t.status
         ORDER BY array_position(ARRAY['succeeded', 'failed', 'cancelled', 'queued', 'running'], t.status)"
    ))
    .bind(tenant_id)
    .bind(interval(grace))
    .fetch_all(&mut *conn)
    .await?;
    let events: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM tasks t JOIN tenants tn ON tn.id = t.tenant_id
         JOIN task_events e ON e.task_id = t.id AND e.task_inserted_at = t.inserted_at
         WHERE t.tenant_id = $1 AND {rule}"
    ))
    .bind(tenant_id)
    .bind(interval(grace))
    .fetch_one(&mut *conn)
    .await?;
    Ok(TenantPreview { tasks, events })
}
