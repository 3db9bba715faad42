//! Holds: a tenant, or one task of it, that nothing deletes while the hold is in force (not
//! removed, and its `until`, if any, not passed). Every deleting statement checks them (see
//! `history::held`). Rows are never deleted: who added and removed a hold, when and why, stays.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

/// A row of `retention_holds` as the statements below return it (one column list, written out in
/// each: the checked macros take only literal text).
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

/// A new hold, already validated by the caller.
pub struct NewHold<'a> {
    pub tenant_id: Uuid,
    pub task_id: Option<Uuid>,
    pub reason: &'a str,
    pub until: Option<DateTime<Utc>>,
    pub created_by: &'a str,
}

pub async fn add(executor: impl PgExecutor<'_>, hold: &NewHold<'_>) -> Result<Hold, sqlx::Error> {
    sqlx::query_as!(
        Hold,
        r#"INSERT INTO retention_holds (tenant_id, task_id, reason, until, created_by) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, tenant_id, task_id, reason, until, created_by, created_at, removed_by, removed_at, removed_reason,
                (removed_at IS NULL AND (until IS NULL OR until > now())) AS "active!""#,
        hold.tenant_id,
        hold.task_id,
        hold.reason,
        hold.until,
        hold.created_by
    )
    .fetch_one(executor)
    .await
}

/// Holds, newest first: of one tenant, or all; only those in force unless `all`.
pub async fn list(
    executor: impl PgExecutor<'_>,
    tenant_id: Option<Uuid>,
    all: bool,
) -> Result<Vec<Hold>, sqlx::Error> {
    sqlx::query_as!(
        Hold,
        r#"SELECT id, tenant_id, task_id, reason, until, created_by, created_at, removed_by, removed_at, removed_reason,
                (removed_at IS NULL AND (until IS NULL OR until > now())) AS "active!"
         FROM retention_holds
         WHERE ($1::uuid IS NULL OR tenant_id = $1)
           AND ($2 OR (removed_at IS NULL AND (until IS NULL OR until > now())))
         ORDER BY id DESC"#,
        tenant_id,
        all
    )
    .fetch_all(executor)
    .await
}

pub async fn get(executor: impl PgExecutor<'_>, id: i64) -> Result<Option<Hold>, sqlx::Error> {
    sqlx::query_as!(
        Hold,
        r#"SELECT id, tenant_id, task_id, reason, until, created_by, created_at, removed_by, removed_at, removed_reason,
                (removed_at IS NULL AND (until IS NULL OR until > now())) AS "active!"
         FROM retention_holds WHERE id = $1"#,
        id
    )
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
    sqlx::query_as!(
        Hold,
        r#"UPDATE retention_holds SET removed_by = $2, removed_at = now(), removed_reason = $3
         WHERE id = $1 AND removed_at IS NULL
         RETURNING id, tenant_id, task_id, reason, until, created_by, created_at, removed_by, removed_at, removed_reason,
                (removed_at IS NULL AND (until IS NULL OR until > now())) AS "active!""#,
        id,
        removed_by,
        reason
    )
    .fetch_optional(executor)
    .await
}

/// Whether tenant `tenant_id` has a task with id `task_id` (in any range).
pub async fn task_exists(
    executor: impl PgExecutor<'_>,
    tenant_id: Uuid,
    task_id: Uuid,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM tasks WHERE id = $1 AND tenant_id = $2) AS "exists!""#,
        task_id,
        tenant_id
    )
    .fetch_one(executor)
    .await
}
