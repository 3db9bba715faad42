//! Queue items that can never run: their task no longer exists, has finished (succeeded, failed
//! or cancelled), or belongs to a deleted tenant.

use sqlx::{FromRow, PgConnection, PgExecutor};

use crate::heap::BlockRange;
use crate::receipts::{self, RunReceipt};
use crate::rule::{self, Rule};
use crate::sql::{Fragment, Sql};

/// The CTE adding a batch's deletions (`gone`: the items' tenant and insertion instant) to the
/// run's receipts under the rule `queue-items`, in the deleting statement.
fn receipt_cte(receipt: &RunReceipt) -> Fragment {
    receipts::add(
        receipt,
        "SELECT g.tenant_id, 'queue-items', 0, 0, count(*), min(g.inserted_at), max(g.inserted_at) FROM gone g GROUP BY g.tenant_id",
    )
}

#[derive(FromRow)]
struct Deleted {
    deleted: i64,
    rules_version: i64,
}

/// Deletes the due queue items on the pages of `range` (see [`crate::heap`]), then confirms the
/// rules ([`rule::confirm`]): one pass over the table in block ranges examines every item once.
/// Items locked by a worker are skipped.
pub async fn delete_block_range(
    conn: &mut PgConnection,
    range: BlockRange,
    rule: &Rule,
    receipt: &RunReceipt,
) -> Result<i64, sqlx::Error> {
    let (from, to) = range.tids();
    let mut sql = Sql::new(
        "WITH due AS (
             SELECT q.ctid FROM queue_items q
             WHERE q.ctid >= {from}::tid AND q.ctid < {to}::tid AND {due}
             FOR UPDATE OF q SKIP LOCKED
         ), gone AS (
             DELETE FROM queue_items q WHERE q.ctid = ANY (ARRAY (SELECT ctid FROM due)) RETURNING q.tenant_id, q.inserted_at
         ), receipt AS ({receipt})
         SELECT count(*) AS deleted, {version} AS rules_version FROM gone",
    );
    sql.bind("from", from)
        .bind("to", to)
        .with("due", rule.queue_item_due("q"))
        .with("receipt", receipt_cte(receipt))
        .raw("version", rule::VERSION);
    let row: Deleted = sql.build_query_as().fetch_one(&mut *conn).await?;
    if row.deleted > 0 {
        rule::confirm(conn, row.rules_version).await?;
    }
    Ok(row.deleted)
}

/// The planner's estimate of the queue items due now: no row is read (a count of a large queue
/// takes seconds, and the status page asks every few seconds).
pub async fn estimate_due(executor: impl PgExecutor<'_>, rule: &Rule) -> Result<f64, sqlx::Error> {
    let mut sql = Sql::new("EXPLAIN SELECT 1 FROM queue_items q WHERE {due}");
    sql.with("due", rule.queue_item_due("q"));
    let plan: String = sql.build_query_scalar().fetch_one(executor).await?;
    Ok(crate::heap::plan_rows(&plan))
}

/// How many queue items are due now, under `statement_timeout` (a dry run: it reads the whole
/// table, and locks nothing).
pub async fn count_due(
    pool: &sqlx::PgPool,
    rule: &Rule,
    statement_timeout: std::time::Duration,
) -> Result<i64, sqlx::Error> {
    let mut tx = pool
        .begin_with(format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = '{}ms'; SET LOCAL jit = off",
            statement_timeout.as_millis().max(1)
        ))
        .await?;
    let mut sql = Sql::new("SELECT count(*) FROM queue_items q WHERE {due}");
    sql.with("due", rule.queue_item_due("q"));
    let count = sql.build_query_scalar().fetch_one(&mut *tx).await?;
    tx.commit().await?;
    Ok(count)
}

/// What one batch of recorded candidates did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct CandidateBatch {
    /// Candidates taken from `queue_item_candidates`.
    pub candidates: i64,
    /// Their due queue items deleted.
    pub deleted: i64,
    #[sqlx(default)]
    rules_version: i64,
}

/// Takes up to `limit` recorded candidates (tasks with queue items that finished or were
/// deleted) and deletes their queue items that are due, checked again against the rule now, then
/// confirms the rules. Items a worker holds are skipped: the heap walk finds them if they stay.
pub async fn delete_candidates_batch(
    conn: &mut PgConnection,
    limit: i64,
    rule: &Rule,
    receipt: &RunReceipt,
) -> Result<CandidateBatch, sqlx::Error> {
    let mut sql = Sql::new(
        "WITH taken AS (
             DELETE FROM queue_item_candidates
             WHERE ctid = ANY (ARRAY (SELECT ctid FROM queue_item_candidates LIMIT {limit} FOR UPDATE SKIP LOCKED))
             RETURNING task_id, task_inserted_at
         ), due AS (
             SELECT q.id FROM queue_items q
             WHERE (q.task_id, q.task_inserted_at) IN (SELECT task_id, task_inserted_at FROM taken) AND {due}
             FOR UPDATE OF q SKIP LOCKED
         ), gone AS (
             DELETE FROM queue_items q WHERE q.id = ANY (ARRAY (SELECT id FROM due)) RETURNING q.tenant_id, q.inserted_at
         ), receipt AS ({receipt})
         SELECT (SELECT count(*) FROM taken) AS candidates, (SELECT count(*) FROM gone) AS deleted, {version} AS rules_version",
    );
    sql.bind("limit", limit)
        .with("due", rule.queue_item_due("q"))
        .with("receipt", receipt_cte(receipt))
        .raw("version", rule::VERSION);
    let batch: CandidateBatch = sql.build_query_as().fetch_one(&mut *conn).await?;
    if batch.candidates > 0 {
        rule::confirm(conn, batch.rules_version).await?;
    }
    Ok(batch)
}

/// Deletes up to `limit` queue items of deleted tenants, found through the tenant index (and
/// checked against the one rule, like every other statement here), then confirms the rules.
pub async fn delete_of_deleted_tenants_batch(
    conn: &mut PgConnection,
    limit: i64,
    rule: &Rule,
    receipt: &RunReceipt,
) -> Result<i64, sqlx::Error> {
    let mut sql = Sql::new(
        "WITH due AS (
             SELECT q.id FROM tenants t JOIN queue_items q ON q.tenant_id = t.id
             WHERE t.deleted_at IS NOT NULL AND {due}
             LIMIT {limit}
             FOR UPDATE OF q SKIP LOCKED
         ), gone AS (
             DELETE FROM queue_items q WHERE q.id = ANY (ARRAY (SELECT id FROM due)) RETURNING q.tenant_id, q.inserted_at
         ), receipt AS ({receipt})
         SELECT count(*) AS deleted, {version} AS rules_version FROM gone",
    );
    sql.bind("limit", limit)
        .with("due", rule.queue_item_due("q"))
        .with("receipt", receipt_cte(receipt))
        .raw("version", rule::VERSION);
    let row: Deleted = sql.build_query_as().fetch_one(&mut *conn).await?;
    if row.deleted > 0 {
        rule::confirm(conn, row.rules_version).await?;
    }
    Ok(row.deleted)
}

/// Whether the heap is due a walk at `now` (the run's checked clock): the last complete one (its
/// start, in Unix seconds, kept as the watermark `swept_at`) was `every_seconds` before or more,
/// or there was none.
pub async fn sweep_due(
    executor: impl PgExecutor<'_>,
    swept_at: &str,
    every_seconds: i64,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<bool, sqlx::Error> {
    let last: Option<i64> = sqlx::query_scalar!(
        "SELECT position FROM retention_watermarks WHERE name = $1",
        swept_at
    )
    .fetch_optional(executor)
    .await?;
    Ok(last.unwrap_or(0) <= now.timestamp() - every_seconds)
}
