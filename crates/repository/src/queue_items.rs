//! Queue items that can never run: their task no longer exists, has finished (succeeded, failed
//! or cancelled), or belongs to a deleted tenant.

use sqlx::PgExecutor;

use crate::heap::BlockRange;
use crate::history::FINAL;

/// Deletes the due queue items on the pages of `range` (see [`crate::heap`]): one pass over the
/// table in block ranges examines every item once. Items locked by a worker are skipped.
pub async fn delete_block_range(executor: impl PgExecutor<'_>, range: BlockRange) -> Result<i64, sqlx::Error> {
    let (from, to) = range.tids();
    sqlx::query_scalar(&format!(
        "WITH due AS (
             SELECT q.ctid FROM queue_items q
             WHERE q.ctid >= $1::tid AND q.ctid < $2::tid AND ({due})
             FOR UPDATE OF q SKIP LOCKED
         ), gone AS (
             DELETE FROM queue_items q WHERE q.ctid = ANY (ARRAY (SELECT ctid FROM due)) RETURNING 1
         )
         SELECT count(*) FROM gone",
        due = due()
    ))
    .bind(from)
    .bind(to)
    .fetch_one(executor)
    .await
}

/// A queue item `q` is due when its tenant is deleted or its task is gone or final.
fn due() -> String {
    format!(
        "EXISTS (SELECT 1 FROM tenants tn WHERE tn.id = q.tenant_id AND tn.deleted_at IS NOT NULL)
         OR NOT EXISTS (SELECT 1 FROM tasks t
                        WHERE t.id = q.task_id AND t.inserted_at = q.task_inserted_at
                          AND t.status NOT IN {FINAL})"
    )
}

/// How many queue items are due now.
pub async fn count_due(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM queue_items q WHERE {}", due()))
    .fetch_one(executor)
    .await
}
