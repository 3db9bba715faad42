//! Row-level deletes of run history: a task goes together with its events and queue items, in
//! one statement (so one transaction), so no crash can leave orphans behind.
//!
//! Deletes work one partition of `tasks` at a time (the caller skips partitions that are wholly
//! due: those are dropped whole instead, see [`crate::partitions`]).

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

use crate::tenants::HistoryRules;

pub(crate) const FINAL: &str = "('succeeded', 'failed', 'cancelled')";
pub(crate) const ACTIVE: &str = "('queued', 'running')";

/// A partition of `tasks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    /// The UTC day a `tasks_pYYYYMMDD` partition holds; `None` for the default partition and any
    /// partition the engine did not create.
    pub day: Option<NaiveDate>,
}

/// Every attached partition of `tasks`, oldest day first, others last.
pub async fn task_partitions(executor: impl PgExecutor<'_>) -> Result<Vec<Partition>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'tasks'::regclass AND NOT i.inhdetachpending",
    )
    .fetch_all(executor)
    .await?;
    let mut partitions: Vec<Partition> =
        names.into_iter().map(|name| Partition { day: crate::partitions::day_of(&name, "tasks"), name }).collect();
    partitions.sort_by(|a, b| (a.day.is_none(), a.day, &a.name).cmp(&(b.day.is_none(), b.day, &b.name)));
    Ok(partitions)
}

/// What one batch deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deleted {
    pub tasks: i64,
    pub events: i64,
    pub queue_items: i64,
    /// Tasks per tenant.
    pub by_tenant: Vec<(Uuid, i64)>,
}

/// Where each tenant's walk of one partition has reached: the finish instant of the last task
/// deleted, as PostgreSQL's text (so `-infinity` round-trips). The next batch starts there, so a
/// batch never re-reads the index entries of rows earlier batches deleted (which stay on the index
/// pages, and even in the heap while any older snapshot is open, until vacuum).
pub type Cursors = std::collections::HashMap<Uuid, String>;

/// Deletes up to `limit` tasks of `partition` that are due under a live tenant's retention
/// (final, and finished before the tenant's cutoff), with their events and queue items, walking
/// each tenant's `tasks_finished_due_idx` range from its cursor; advances the cursors.
pub async fn delete_retained_batch(
    executor: impl PgExecutor<'_>,
    partition: &str,
    rules: &HistoryRules,
    cursors: &mut Cursors,
    limit: u32,
) -> Result<Deleted, sqlx::Error> {
    if rules.live.is_empty() {
        return Ok(Deleted::default());
    }
    let (tenants, cutoffs): (Vec<Uuid>, Vec<DateTime<Utc>>) = rules.live.iter().copied().unzip();
    let after: Vec<String> = tenants.iter().map(|id| cursors.get(id).cloned().unwrap_or_else(|| "-infinity".into())).collect();
    let victims = format!(
        "SELECT v.id, v.inserted_at FROM unnest($1::uuid[], $2::timestamptz[], $4::text[]) AS r(tenant_id, cutoff, after_key)
         CROSS JOIN LATERAL (
             SELECT t.id, t.inserted_at FROM {p} t
             WHERE t.tenant_id = r.tenant_id AND t.status IN {FINAL}
               AND coalesce(t.finished_at, t.inserted_at) < r.cutoff
               AND coalesce(t.finished_at, t.inserted_at) >= r.after_key::timestamptz
             ORDER BY coalesce(t.finished_at, t.inserted_at)
             LIMIT $3
             FOR UPDATE SKIP LOCKED
         ) v
         LIMIT $3",
        p = ident(partition)
    );
    let rows: Vec<DeletedRow> = sqlx::query_as(&delete_with_children(partition, &victims, "max(g.key)::text"))
        .bind(tenants)
        .bind(cutoffs)
        .bind(i64::from(limit))
        .bind(after)
        .fetch_all(executor)
        .await?;
    Ok(tally(rows, Some(cursors)))
}

/// Per tenant: tasks deleted and the position reached (as text); then the batch's events and
/// queue items (the same on every row).
type DeletedRow = (Uuid, i64, String, i64, i64);

fn tally(rows: Vec<DeletedRow>, mut cursors: Option<&mut Cursors>) -> Deleted {
    let mut deleted = Deleted::default();
    for (tenant, tasks, last_key, events, queue_items) in rows {
        deleted.tasks += tasks;
        deleted.by_tenant.push((tenant, tasks));
        (deleted.events, deleted.queue_items) = (events, queue_items);
        if let Some(cursors) = cursors.as_deref_mut() {
            cursors.insert(tenant, last_key);
        }
    }
    deleted
}

/// Deletes up to `limit` tasks of `partition` that belong to `tenant`, a purged tenant (deleted
/// longer ago than the grace period), whatever their state, with their events and queue items.
/// Walks `tasks_tenant_id_id_idx` from `after` (the last id deleted; `None` to start) and
/// returns the new position with the counts.
pub async fn delete_purged_batch(
    executor: impl PgExecutor<'_>,
    partition: &str,
    tenant: Uuid,
    after: Option<Uuid>,
    limit: u32,
) -> Result<(Deleted, Option<Uuid>), sqlx::Error> {
    // `>=`: a task id may repeat with another inserted_at; the rows already deleted at that id
    // are passed again, once.
    let from = if after.is_some() { "AND t.id >= $3" } else { "" };
    let victims = format!(
        "SELECT t.id, t.inserted_at FROM {p} t WHERE t.tenant_id = $1 {from}
         ORDER BY t.id LIMIT $2 FOR UPDATE SKIP LOCKED",
        p = ident(partition)
    );
    let sql = delete_with_children(partition, &victims, "max(g.id::text)");
    let mut query = sqlx::query_as(&sql)
        .bind(tenant)
        .bind(i64::from(limit));
    if let Some(after) = after {
        query = query.bind(after);
    }
    let rows: Vec<DeletedRow> = query.fetch_all(executor).await?;
    let last = rows.first().and_then(|row| Uuid::parse_str(&row.2).ok());
    Ok((tally(rows, None), last.or(after)))
}

/// One statement deleting the tasks `victims` selects (`id`, `inserted_at`, locked) and every
/// event and queue item that names them; one [`DeletedRow`] per tenant, whose position is
/// `position` over the deleted rows `g` (`g.id`, `g.key`).
fn delete_with_children(partition: &str, victims: &str, position: &str) -> String {
    format!(
        "WITH victims AS MATERIALIZED ({victims}),
         events AS (
             DELETE FROM task_events e USING victims v
             WHERE e.task_id = v.id AND e.task_inserted_at = v.inserted_at RETURNING 1
         ), queue AS (
             DELETE FROM queue_items q USING victims v
             WHERE q.task_id = v.id AND q.task_inserted_at = v.inserted_at RETURNING 1
         ), gone AS (
             DELETE FROM {p} t USING victims v
             WHERE t.id = v.id AND t.inserted_at = v.inserted_at
             RETURNING t.tenant_id, t.id, coalesce(t.finished_at, t.inserted_at) AS key
         )
         SELECT g.tenant_id, count(*), {position},
                (SELECT count(*) FROM events), (SELECT count(*) FROM queue)
         FROM gone g GROUP BY g.tenant_id",
        p = ident(partition)
    )
}

/// Deletes up to `limit` events older than `created_before` whose task does not exist, among
/// events with ids in `(after, up_to]`. Returns the rows deleted and the highest id examined.
pub async fn delete_orphan_events_batch(
    executor: impl PgExecutor<'_>,
    after: i64,
    created_before: DateTime<Utc>,
    limit: u32,
) -> Result<OrphanBatch, sqlx::Error> {
    sqlx::query_as(
        "WITH scanned AS MATERIALIZED (
             SELECT e.id, e.task_inserted_at, e.created_at < $2 AS old_enough,
                    NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at) AS orphan
             FROM task_events e WHERE e.id > $1 ORDER BY e.id LIMIT $3
         ), gone AS (
             DELETE FROM task_events e USING scanned s
             WHERE e.id = s.id AND e.task_inserted_at = s.task_inserted_at AND s.old_enough AND s.orphan
               AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM gone) AS deleted,
                (SELECT count(*) FROM scanned) AS scanned,
                (SELECT max(id) FROM scanned) AS last_id,
                (SELECT min(id) FROM scanned WHERE orphan AND NOT old_enough) AS first_undecided",
    )
    .bind(after)
    .bind(created_before)
    .bind(i64::from(limit))
    .fetch_one(executor)
    .await
}

/// What one orphan-events batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromRow)]
pub struct OrphanBatch {
    pub deleted: i64,
    pub scanned: i64,
    /// The highest event id examined.
    pub last_id: Option<i64>,
    /// The lowest id of an orphan too young to delete: the watermark may not pass it.
    pub first_undecided: Option<i64>,
}

/// A double-quoted SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Tasks of one tenant in one partition that a run would delete now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromRow)]
pub struct TenantDue {
    pub tenant_id: Uuid,
    /// Under the live tenant's retention.
    pub retained: i64,
    /// Of a tenant deleted longer ago than the grace period.
    pub purged: i64,
}

/// Counts, per tenant with any, what [`delete_retained_batch`] and [`delete_purged_batch`] would
/// delete from one partition (tasks; each goes with its events and queue items), through the
/// same indexes.
pub async fn count_due(executor: impl PgExecutor<'_>, partition: &str, rules: &HistoryRules) -> Result<Vec<TenantDue>, sqlx::Error> {
    let (tenants, cutoffs): (Vec<Uuid>, Vec<DateTime<Utc>>) = rules.live.iter().copied().unzip();
    sqlx::query_as(&format!(
        "SELECT r.tenant_id, c.n AS retained, 0::bigint AS purged
         FROM unnest($1::uuid[], $2::timestamptz[]) AS r(tenant_id, cutoff)
         CROSS JOIN LATERAL (
             SELECT count(*) AS n FROM {p} t
             WHERE t.tenant_id = r.tenant_id AND t.status IN {FINAL}
               AND coalesce(t.finished_at, t.inserted_at) < r.cutoff) c
         WHERE c.n > 0
         UNION ALL
         SELECT t.tenant_id, 0, count(*) FROM {p} t WHERE t.tenant_id = ANY($3::uuid[]) GROUP BY t.tenant_id",
        p = ident(partition)
    ))
    .bind(tenants)
    .bind(cutoffs)
    .bind(&rules.purged)
    .fetch_all(executor)
    .await
}

/// Orphan events older than `created_before` among the events after the watermark `after`.
pub async fn count_orphan_events(executor: impl PgExecutor<'_>, after: i64, created_before: DateTime<Utc>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM task_events e
         WHERE e.id > $1 AND e.created_at < $2
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)",
    )
    .bind(after)
    .bind(created_before)
    .fetch_one(executor)
    .await
}
