//! Queue items that can never run: their task no longer exists, has finished (succeeded, failed
//! or cancelled), or belongs to a deleted tenant.

use sqlx::PgExecutor;

use crate::heap::BlockRange;
use crate::receipts::{self, RunReceipt};
use crate::history::{held, FINAL};

/// Deletes the due queue items on the pages of `range` (see [`crate::heap`]): one pass over the
/// table in block ranges examines every item once. Items locked by a worker are skipped.
pub async fn delete_block_range(executor: impl PgExecutor<'_>, range: BlockRange, receipt: &RunReceipt) -> Result<i64, sqlx::Error> {
    let (from, to) = range.tids();
    sqlx::query_scalar(&format!(
        "WITH due AS (
             SELECT q.ctid FROM queue_items q
             WHERE q.ctid >= $1::tid AND q.ctid < $2::tid AND ({due})
             FOR UPDATE OF q SKIP LOCKED
         ), gone AS (
             DELETE FROM queue_items q WHERE q.ctid = ANY (ARRAY (SELECT ctid FROM due)) RETURNING q.tenant_id, q.inserted_at
         ), {receipt}
         SELECT count(*) FROM gone",
        due = due(),
        receipt = receipt_cte("$3", "$4"),
    ))
    .bind(from)
    .bind(to)
    .bind(receipt.run_id)
    .bind(receipt.task)
    .fetch_one(executor)
    .await
}

/// A queue item `q` is due when its tenant is deleted or its task is gone or final, and no hold
/// covers its task (or its tenant).
fn due() -> String {
    format!(
        "(EXISTS (SELECT 1 FROM tenants tn WHERE tn.id = q.tenant_id AND tn.deleted_at IS NOT NULL)
          OR NOT EXISTS (SELECT 1 FROM tasks t
                         WHERE t.id = q.task_id AND t.inserted_at = q.task_inserted_at
                           AND t.status NOT IN {FINAL}))
         AND NOT {held}",
        held = held("q.tenant_id", "q.task_id", "now()")
    )
}

/// The CTE adding a batch's deletions (`gone`: the items' tenant and insertion instant) to the
/// run's receipts under the rule `queue-items`, in the deleting statement.
fn receipt_cte(run_id: &str, task: &str) -> String {
    let add = receipts::add(&format!(
        "SELECT {run_id}::uuid, g.tenant_id, 'queue-items', {task}::text, 0, 0, count(*), min(g.inserted_at), max(g.inserted_at)
         FROM gone g GROUP BY g.tenant_id"
    ));
    format!("receipt AS ({add})")
}

/// The planner's estimate of the queue items due now: no row is read (a count of a large queue
/// takes seconds, and the status page asks every few seconds).
pub async fn estimate_due(executor: impl PgExecutor<'_>) -> Result<f64, sqlx::Error> {
    let plan: String = sqlx::query_scalar(&format!("EXPLAIN SELECT 1 FROM queue_items q WHERE {}", due())).fetch_one(executor).await?;
    Ok(crate::heap::plan_rows(&plan))
}

/// How many queue items are due now.
pub async fn count_due(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!("SELECT count(*) FROM queue_items q WHERE {}", due()))
    .fetch_one(executor)
    .await
}

/// What one batch of recorded candidates did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct CandidateBatch {
    /// Candidates taken from `queue_item_candidates`.
    pub candidates: i64,
    /// Their due queue items deleted.
    pub deleted: i64,
}

/// Takes up to `limit` recorded candidates (tasks with queue items that finished or were
/// deleted) and deletes their queue items that are due, checked again against the rule now.
/// Items a worker holds are skipped: the heap walk finds them if they stay.
pub async fn delete_candidates_batch(executor: impl PgExecutor<'_>, limit: i64, receipt: &RunReceipt) -> Result<CandidateBatch, sqlx::Error> {
    sqlx::query_as(&format!(
        "WITH taken AS (
             DELETE FROM queue_item_candidates
             WHERE ctid = ANY (ARRAY (SELECT ctid FROM queue_item_candidates LIMIT $1 FOR UPDATE SKIP LOCKED))
             RETURNING task_id, task_inserted_at
         ), due AS (
             SELECT q.id FROM queue_items q
             WHERE (q.task_id, q.task_inserted_at) IN (SELECT task_id, task_inserted_at FROM taken) AND ({due})
             FOR UPDATE OF q SKIP LOCKED
         ), gone AS (
             DELETE FROM queue_items q WHERE q.id = ANY (ARRAY (SELECT id FROM due)) RETURNING q.tenant_id, q.inserted_at
         ), {receipt}
         SELECT (SELECT count(*) FROM taken) AS candidates, (SELECT count(*) FROM gone) AS deleted",
        due = due(),
        receipt = receipt_cte("$2", "$3"),
    ))
    .bind(limit)
    .bind(receipt.run_id)
    .bind(receipt.task)
    .fetch_one(executor)
    .await
}

/// Deletes up to `limit` queue items of deleted tenants, found through the tenant index (and
/// checked against the one rule, like every other statement here).
pub async fn delete_of_deleted_tenants_batch(executor: impl PgExecutor<'_>, limit: i64, receipt: &RunReceipt) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "WITH due AS (
             SELECT q.id FROM tenants t JOIN queue_items q ON q.tenant_id = t.id
             WHERE t.deleted_at IS NOT NULL AND ({due})
             LIMIT $1
             FOR UPDATE OF q SKIP LOCKED
         ), gone AS (
             DELETE FROM queue_items q WHERE q.id = ANY (ARRAY (SELECT id FROM due)) RETURNING q.tenant_id, q.inserted_at
         ), {receipt}
         SELECT count(*) FROM gone",
        due = due(),
        receipt = receipt_cte("$2", "$3"),
    ))
    .bind(limit)
    .bind(receipt.run_id)
    .bind(receipt.task)
    .fetch_one(executor)
    .await
}

/// Whether the heap is due a walk: the last complete one (its start, in Unix seconds, kept as
/// the watermark `swept_at`) was `every_seconds` ago or more, or there was none.
pub async fn sweep_due(executor: impl PgExecutor<'_>, swept_at: &str, every_seconds: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce((SELECT position FROM retention_watermarks WHERE name = $1), 0)
                <= extract(epoch FROM now())::bigint - $2",
    )
    .bind(swept_at)
    .bind(every_seconds)
    .fetch_one(executor)
    .await
}
