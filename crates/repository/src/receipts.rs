//! Deletion receipts: per run, tenant and rule, what was deleted, written by the deleting
//! statements themselves ([`add`]), kept for a time of their own.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

use crate::sql::Fragment;

/// Which run's receipts a deleting statement adds to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReceipt {
    pub run_id: Uuid,
    /// The maintenance task deleting (`task-history`, `queue-items`, `partitions`).
    pub task: String,
}

impl RunReceipt {
    pub fn new(run_id: Uuid, task: impl Into<String>) -> RunReceipt {
        RunReceipt {
            run_id,
            task: task.into(),
        }
    }
}

/// A statement (or a CTE's body) adding `rows` to the run's receipts: `rows` is a query yielding
/// (tenant_id, rule, tasks, events, queue_items, oldest, newest), at most one row per tenant and
/// rule; a receipt already there for that run, tenant and rule grows by them. Rows go in tenant
/// order, so that statements adding to the same receipts at once (a parallel sweep) wait for each
/// other but never deadlock.
pub(crate) fn add(receipt: &RunReceipt, rows: &str) -> Fragment {
    add_with_dependents(
        receipt,
        &format!(
            "SELECT y.tenant_id, y.rule, y.tasks, y.events, y.queue_items, 0, 0, 0, y.oldest, y.newest
             FROM ({rows}) AS y(tenant_id, rule, tasks, events, queue_items, oldest, newest)"
        ),
    )
}

/// [`add`] for statements that delete tasks: `rows` also yields, after `queue_items`, the
/// payloads, log lines and stored objects (payloads kept outside the database, their deletion
/// now in the outbox) that went with them.
pub(crate) fn add_with_dependents(receipt: &RunReceipt, rows: &str) -> Fragment {
    Fragment::text("INSERT INTO retention_receipts AS rr (run_id, task, tenant_id, rule, tasks, events, queue_items, payloads, logs, objects, oldest, newest) SELECT ")
        .bind(receipt.run_id)
        .push(", ")
        .bind(receipt.task.clone())
        .push(format!(
            ", x.tenant_id, x.rule, x.tasks, x.events, x.queue_items, x.payloads, x.logs, x.objects, x.oldest, x.newest
             FROM ({rows}) AS x(tenant_id, rule, tasks, events, queue_items, payloads, logs, objects, oldest, newest)
             ORDER BY x.tenant_id, x.rule
             ON CONFLICT (run_id, tenant_id, rule) DO UPDATE
             SET tasks = rr.tasks + excluded.tasks, events = rr.events + excluded.events,
                 queue_items = rr.queue_items + excluded.queue_items, payloads = rr.payloads + excluded.payloads,
                 logs = rr.logs + excluded.logs, objects = rr.objects + excluded.objects,
                 oldest = least(rr.oldest, excluded.oldest), newest = greatest(rr.newest, excluded.newest), last_at = now()"
        ))
}

/// A receipt as read back.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Receipt {
    pub run_id: Uuid,
    pub tenant_id: Uuid,
    /// The tenant's slug, when the tenant still has a row.
    pub slug: Option<String>,
    pub rule: String,
    pub task: String,
    pub tasks: i64,
    pub events: i64,
    pub queue_items: i64,
    /// Payloads, log lines and stored objects (external payloads, their deletion in the outbox).
    pub payloads: i64,
    pub logs: i64,
    pub objects: i64,
    /// The earliest and latest instant the rule counted from among the rows deleted (a task's
    /// finish, else its insertion; an orphan event's creation).
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
    /// When the run first and last deleted under this receipt.
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    /// The archive files named: written by the run (rule `archived`: what went into them, not
    /// deleted), or expired and given to the outbox (rule `archive-expired`).
    pub archive_keys: Vec<String>,
}

/// Receipts, oldest first: of one tenant or all, written since `since` (or all).
pub async fn list(
    executor: impl PgExecutor<'_>,
    tenant_id: Option<Uuid>,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<Receipt>, sqlx::Error> {
    sqlx::query_as!(
        Receipt,
        r#"SELECT r.run_id, r.tenant_id, tn.slug AS "slug?", r.rule, r.task, r.tasks, r.events, r.queue_items, r.payloads, r.logs, r.objects, r.oldest, r.newest,
                r.first_at, r.last_at, r.archive_keys
         FROM retention_receipts r LEFT JOIN tenants tn ON tn.id = r.tenant_id
         WHERE ($1::uuid IS NULL OR r.tenant_id = $1) AND ($2::timestamptz IS NULL OR r.first_at >= $2)
         ORDER BY r.first_at, r.tenant_id, r.rule
         LIMIT $3"#,
        tenant_id,
        since,
        limit
    )
    .fetch_all(executor)
    .await
}

/// Deletes up to `limit` receipts written before `before`; returns how many.
pub async fn delete_older_than(
    executor: impl PgExecutor<'_>,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"WITH gone AS (
             DELETE FROM retention_receipts WHERE ctid = ANY (ARRAY (
                 SELECT ctid FROM retention_receipts WHERE first_at < $1 ORDER BY first_at LIMIT $2 FOR UPDATE SKIP LOCKED))
             RETURNING 1)
         SELECT count(*) AS "deleted!" FROM gone"#,
        before,
        limit
    )
    .fetch_one(executor)
    .await
}
