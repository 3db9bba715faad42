//! Queue items that can never run: their task no longer exists, has finished (succeeded, failed
//! or cancelled), or belongs to a deleted tenant.

use sqlx::{FromRow, PgExecutor};

use crate::history::FINAL;

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromRow)]
pub struct QueueBatch {
    pub deleted: i64,
    /// Items examined (due or not).
    pub scanned: i64,
    /// The highest id examined: the next batch starts after it.
    pub last_id: Option<i64>,
}

/// Examines up to `limit` queue items with ids after `after`, in id order, and deletes those that
/// are due. Items locked by a worker are skipped.
pub async fn delete_batch(executor: impl PgExecutor<'_>, after: i64, limit: u32) -> Result<QueueBatch, sqlx::Error> {
    sqlx::query_as(&format!(
        "WITH scanned AS MATERIALIZED (
             SELECT q.id, q.tenant_id, q.task_id, q.task_inserted_at FROM queue_items q
             WHERE q.id > $1 ORDER BY q.id LIMIT $2
         ), due AS (
             SELECT q.id FROM queue_items q JOIN scanned s ON s.id = q.id
             WHERE EXISTS (SELECT 1 FROM tenants tn WHERE tn.id = q.tenant_id AND tn.deleted_at IS NOT NULL)
                OR NOT EXISTS (SELECT 1 FROM tasks t
                               WHERE t.id = q.task_id AND t.inserted_at = q.task_inserted_at
                                 AND t.status NOT IN {FINAL})
             FOR UPDATE OF q SKIP LOCKED
         ), gone AS (
             DELETE FROM queue_items q USING due WHERE q.id = due.id RETURNING 1
         )
         SELECT (SELECT count(*) FROM gone) AS deleted,
                (SELECT count(*) FROM scanned) AS scanned,
                (SELECT max(id) FROM scanned) AS last_id"
    ))
    .bind(after)
    .bind(i64::from(limit))
    .fetch_one(executor)
    .await
}

/// How many queue items are due now.
pub async fn count_due(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM queue_items q
         WHERE EXISTS (SELECT 1 FROM tenants tn WHERE tn.id = q.tenant_id AND tn.deleted_at IS NOT NULL)
            OR NOT EXISTS (SELECT 1 FROM tasks t
                           WHERE t.id = q.task_id AND t.inserted_at = q.task_inserted_at
                             AND t.status NOT IN {FINAL})"
    ))
    .fetch_one(executor)
    .await
}
