//! Holds: a tenant, or one task of it, that nothing deletes while the hold is in force (not
//! removed, and its `until`, if any, not passed). Every deleting statement checks them (see
//! `history::held`). Rows are never deleted: who added and removed a hold, when and why, stays.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Hold {
    pub id: i64,
    pub tenant_id: Uuid,
    /// `None`: every task of the tenant.
    pub task_id: Option<Uuid>,
    pub reason: String,
    pub until: Option<DateTime<Utc>>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub removed_by: Option<String>,
    pub removed_at: Option<DateTime<Utc>>,
    pub removed_reason: Option<String>,
    /// In force now: not removed, not past its `until`.
    pub active: bool,
}

const COLUMNS: &str = "id, tenant_id, task_id, reason, until, created_by, created_at, removed_by, removed_at, removed_reason,
     (removed_at IS NULL AND (until IS NULL OR until > now())) AS active";

/// A new hold, already validated by the caller.
pub struct NewHold<'a> {
    pub tenant_id: Uuid,
    pub task_id: Option<Uuid>,
    pub reason: &'a str,
    pub until: Option<DateTime<Utc>>,
    pub created_by: &'a str,
}

pub async fn add(executor: impl PgExecutor<'_>, hold: &NewHold<'_>) -> Result<Hold, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO retention_holds (tenant_id, task_id, reason, until, created_by) VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
    ))
    .bind(hold.tenant_id)
    .bind(hold.task_id)
    .bind(hold.reason)
    .bind(hold.until)
    .bind(hold.created_by)
    .fetch_one(executor)
    .await
}

/// Holds, newest first: of one tenant, or all; only those in force unless `all`.
pub async fn list(
    executor: impl PgExecutor<'_>,
    tenant_id: Option<Uuid>,
    all: bool,
) -> Result<Vec<Hold>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM retention_holds
         WHERE ($1::uuid IS NULL OR tenant_id = $1)
           AND ($2 OR (removed_at IS NULL AND (until IS NULL OR until > now())))
         ORDER BY id DESC"
    ))
    .bind(tenant_id)
    .bind(all)
    .fetch_all(executor)
    .await
}

pub async fn get(executor: impl PgExecutor<'_>, id: i64) -> Result<Option<Hold>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM retention_holds WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(executor)
    .await
}

/// Ends a hold in force: records who removed it, when and why. `None` when there is no such hold
/// or it was already removed.
pub async fn remove(
    executor: impl PgExecutor<'_>,
    id: i64,
    removed_by: &str,
    reason: Option<&str>,
) -> Result<Option<Hold>, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE retention_holds SET removed_by = $2, removed_at = now(), removed_reason = $3
         WHERE id = $1 AND removed_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(removed_by)
    .bind(reason)
    .fetch_optional(executor)
    .await
}

/// Whether tenant `tenant_id` has a task with id `task_id` (in any range).
pub async fn task_exists(
    executor: impl PgExecutor<'_>,
    tenant_id: Uuid,
    task_id: Uuid,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tasks WHERE id = $1 AND tenant_id = $2)")
        .bind(task_id)
        .bind(tenant_id)
        .fetch_one(executor)
        .await
}
