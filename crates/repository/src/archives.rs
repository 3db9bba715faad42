//! Archives of run history: which tenants archive, the tasks waiting for their archive, what goes
//! into a file, and the manifest (`retention_archives`) with the tasks a written archive holds
//! (`retention_archived_tasks`), which is what lets them go (see [`crate::rule::Rule::archive_pending`]).

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::types::PgInterval;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::rule::Rule;
use crate::sql::Sql;

/// A tenant that archives some final statuses.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct ArchivingTenant {
    pub id: Uuid,
    pub slug: String,
    pub statuses: Vec<String>,
    /// How long its archives are kept; `None`: forever.
    pub retention: Option<PgInterval>,
}

/// The tenants with an archive policy (deleted ones only with `archive_deleted`).
pub async fn archiving_tenants(
    executor: impl PgExecutor<'_>,
) -> Result<Vec<ArchivingTenant>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, slug, archive_statuses AS statuses, archive_retention_period AS retention
           FROM tenants
          WHERE cardinality(archive_statuses) > 0 AND (deleted_at IS NULL OR archive_deleted)
          ORDER BY id",
    )
    .fetch_all(executor)
    .await
}

/// A task waiting for its archive, as read for the file.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct PendingTask {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub status: String,
    pub inserted_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub payload: Option<String>,
}

/// Up to `limit` of `tenant`'s tasks due by the rule but for their archive, and not yet archived,
/// after `after` in (inserted_at, id) order: what the next archive file holds. Walks the index
/// `tasks_tenant_archive_idx` (tenant, inserted_at, id) from the cursor: each chunk reads its own
/// rows, whatever the backlog.
pub async fn pending(
    conn: &mut PgConnection,
    rule: &Rule,
    tenant: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<PendingTask>, sqlx::Error> {
    pending_before(conn, rule, tenant, after, None, limit).await
}

/// [`pending`], of tasks inserted before `before` only (`None`: any).
pub async fn pending_before(
    conn: &mut PgConnection,
    rule: &Rule,
    tenant: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    before: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<PendingTask>, sqlx::Error> {
    // Before any task: the year 1 (PostgreSQL's range starts in 4713 BC, chrono's far earlier).
    let start = DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).expect("the year 1");
    let (after_at, after_id) = after.unwrap_or((start, Uuid::nil()));
    Sql::new(
        "SELECT t.id, t.tenant_id, t.status, t.inserted_at, t.finished_at, t.payload::text AS payload
           FROM tasks t LEFT JOIN tenants tn ON tn.id = t.tenant_id
          WHERE t.tenant_id = {tenant} AND (t.inserted_at, t.id) > ({after_at}, {after_id})
            AND t.inserted_at < {before}
            AND {due} AND {pending}
          ORDER BY t.inserted_at, t.id
          LIMIT {limit}",
    )
    .bind("tenant", tenant)
    .bind("after_at", after_at)
    .bind("after_id", after_id)
    // After any task: the end of the year 9999.
    .bind("before", before.unwrap_or(
        DateTime::<Utc>::from_timestamp(253_402_300_799, 0).expect("the year 9999"),
    ))
    .with("due", rule.task_due_unless_archiving("t", "tn"))
    .with("pending", rule.archive_pending("t"))
    .bind("limit", limit)
    .build_query_as()
    .fetch_all(conn)
    .await
}

/// An event of an archived task.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct EventRow {
    pub task_id: Uuid,
    pub id: i64,
    pub event_type: String,
    pub created_at: DateTime<Utc>,
    pub data: Option<String>,
}

/// A payload row of an archived task.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct PayloadRow {
    pub task_id: Uuid,
    pub id: i64,
    pub kind: String,
    pub location: String,
    pub inline_content: Option<Vec<u8>>,
    pub external_key: Option<String>,
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
}

/// A log line of an archived task.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct LogRow {
    pub task_id: Uuid,
    pub id: i64,
    pub created_at: DateTime<Utc>,
    pub level: String,
    pub line: String,
}

/// Everything that goes with `tasks`: events, payloads, log lines, each in (task, id) order.
pub async fn dependents(
    conn: &mut PgConnection,
    tasks: &[PendingTask],
) -> Result<(Vec<EventRow>, Vec<PayloadRow>, Vec<LogRow>), sqlx::Error> {
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    let at: Vec<DateTime<Utc>> = tasks.iter().map(|t| t.inserted_at).collect();
    let events = sqlx::query_as(
        "SELECT e.task_id, e.id, e.event_type, e.created_at, e.data::text AS data
           FROM task_events e JOIN unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)
             ON e.task_id = k.id AND e.task_inserted_at = k.at
          ORDER BY e.task_id, e.id",
    )
    .bind(&ids)
    .bind(&at)
    .fetch_all(&mut *conn)
    .await?;
    let payloads = sqlx::query_as(
        "SELECT p.task_id, p.id, p.kind, p.location, p.inline_content, p.external_key, p.size_bytes, p.created_at
           FROM task_payloads p JOIN unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)
             ON p.task_id = k.id AND p.task_inserted_at = k.at
          ORDER BY p.task_id, p.id",
    )
    .bind(&ids)
    .bind(&at)
    .fetch_all(&mut *conn)
    .await?;
    let logs = sqlx::query_as(
        "SELECT l.task_id, l.id, l.created_at, l.level, l.line
           FROM task_logs l JOIN unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)
             ON l.task_id = k.id AND l.task_inserted_at = k.at
          ORDER BY l.task_id, l.id",
    )
    .bind(&ids)
    .bind(&at)
    .fetch_all(&mut *conn)
    .await?;
    Ok((events, payloads, logs))
}

/// Records that the file at `key` is being written (committed before the upload: no object is
/// ever without its manifest row). Returns its id.
#[allow(clippy::too_many_arguments)]
pub async fn begin(
    executor: impl PgExecutor<'_>,
    key: &str,
    tenant: Uuid,
    first_day: NaiveDate,
    last_day: NaiveDate,
    run_id: Uuid,
    part: i32,
    schema_version: i32,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO retention_archives (object_key, tenant_id, first_day, last_day, run_id, part, schema_version)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(key)
    .bind(tenant)
    .bind(first_day)
    .bind(last_day)
    .bind(run_id)
    .bind(part)
    .bind(schema_version)
    .fetch_one(executor)
    .await
}

/// What a written file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub tasks: Vec<(Uuid, DateTime<Utc>)>,
    pub events: i64,
    pub payloads: i64,
    pub logs: i64,
    /// Tasks by status, as JSON (`{"failed": 3}`).
    pub statuses: serde_json::Value,
    pub bytes: i64,
    pub sha256: String,
}

/// The file `id` confirmed by the store: the manifest row `written`, expiring after `retention`
/// (`None`: never), and its tasks recorded as archived (which lets them go). In `conn`'s
/// transaction: one commit for both.
pub async fn written(
    conn: &mut PgConnection,
    id: i64,
    written: &Written,
    retention: Option<PgInterval>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE retention_archives
            SET state = 'written', tasks = $2, events = $3, payloads = $4, logs = $5, statuses = $6,
                bytes = $7, sha256 = $8, written_at = now(), expires_at = now() + $9
          WHERE id = $1 AND state = 'writing'",
    )
    .bind(id)
    .bind(written.tasks.len() as i64)
    .bind(written.events)
    .bind(written.payloads)
    .bind(written.logs)
    .bind(&written.statuses)
    .bind(written.bytes)
    .bind(&written.sha256)
    .bind(retention)
    .execute(&mut *conn)
    .await?;
    let (ids, at): (Vec<Uuid>, Vec<DateTime<Utc>>) = written.tasks.iter().copied().unzip();
    sqlx::query(
        "INSERT INTO retention_archived_tasks (task_id, task_inserted_at, archive_id)
         SELECT k.id, k.at, $3 FROM unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)",
    )
    .bind(&ids)
    .bind(&at)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A manifest row.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct Archive {
    pub id: i64,
    pub object_key: String,
    pub tenant_id: Uuid,
    pub slug: Option<String>,
    pub first_day: NaiveDate,
    pub last_day: NaiveDate,
    pub run_id: Uuid,
    pub state: String,
    pub tasks: i64,
    pub events: i64,
    pub payloads: i64,
    pub logs: i64,
    pub statuses: serde_json::Value,
    pub bytes: Option<i64>,
    pub sha256: Option<String>,
    pub schema_version: i32,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Written archives, oldest day first: of `tenant` (any when `None`), holding days from `since`
/// on, holding tasks of `status`.
pub async fn list(
    executor: impl PgExecutor<'_>,
    tenant: Option<Uuid>,
    since: Option<NaiveDate>,
    status: Option<&str>,
) -> Result<Vec<Archive>, sqlx::Error> {
    sqlx::query_as(
        "SELECT a.id, a.object_key, a.tenant_id, tn.slug, a.first_day, a.last_day, a.run_id, a.state,
                a.tasks, a.events, a.payloads, a.logs, a.statuses, a.bytes, a.sha256, a.schema_version,
                a.created_at, a.expires_at
           FROM retention_archives a LEFT JOIN tenants tn ON tn.id = a.tenant_id
          WHERE a.state = 'written' AND ($1::uuid IS NULL OR a.tenant_id = $1)
            AND ($2::date IS NULL OR a.last_day >= $2)
            AND ($3::text IS NULL OR a.statuses ? $3)
          ORDER BY a.first_day, a.tenant_id, a.id",
    )
    .bind(tenant)
    .bind(since)
    .bind(status)
    .fetch_all(executor)
    .await
}

/// A tenant's archive policy as stored.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Policy {
    pub id: Uuid,
    pub slug: String,
    pub statuses: Vec<String>,
    pub retention: Option<PgInterval>,
    pub deleted: bool,
}

/// The archive policy of the tenant whose id or slug is `key`.
pub async fn policy(
    executor: impl PgExecutor<'_>,
    key: &str,
) -> Result<Option<Policy>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, slug, coalesce(archive_statuses, '{}') AS statuses,
                archive_retention_period AS retention, archive_deleted AS deleted
           FROM tenants WHERE id::text = $1 OR slug = $1",
    )
    .bind(key)
    .fetch_optional(executor)
    .await
}

/// Sets tenant `id`'s archived statuses and, when `retention` is `Some`, how long its archives
/// are kept (`Some(None)`: forever).
pub async fn set_policy(
    executor: impl PgExecutor<'_>,
    id: Uuid,
    statuses: &[String],
    retention: Option<Option<PgInterval>>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE tenants SET archive_statuses = $2,
                archive_retention_period = CASE WHEN $3 THEN $4 ELSE archive_retention_period END
          WHERE id = $1",
    )
    .bind(id)
    .bind(statuses)
    .bind(retention.is_some())
    .bind(retention.flatten())
    .execute(executor)
    .await?;
    Ok(())
}

/// A file a run began and did not finish (it died, or the store failed): its key is fixed.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct Unfinished {
    pub id: i64,
    pub object_key: String,
    pub tenant_id: Uuid,
    pub first_day: NaiveDate,
}

/// The files begun and not written, oldest first.
pub async fn unfinished(executor: impl PgExecutor<'_>) -> Result<Vec<Unfinished>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, object_key, tenant_id, first_day FROM retention_archives
          WHERE state = 'writing' ORDER BY id",
    )
    .fetch_all(executor)
    .await
}

/// Forgets a begun file that holds nothing now (its tasks went another way): after its object
/// was deleted.
pub async fn forget(executor: impl PgExecutor<'_>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM retention_archives WHERE id = $1 AND state = 'writing'")
        .bind(id)
        .execute(executor)
        .await?;
    Ok(())
}
