//! Archives of run history: which tenants archive, the tasks waiting for their archive, what goes
//! into a file, and the manifest (`retention_archives`) with the tasks a written archive holds
//! (`retention_archived_tasks`), which is what lets them go (see [`crate::rule::Rule::archive_pending`]).

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::postgres::types::PgInterval;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::rule::Rule;
use crate::sql::Sql;
use crate::tenants::FinalStatus;

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
    sqlx::query_as!(
        ArchivingTenant,
        "SELECT id, slug, archive_statuses AS statuses, archive_retention_period AS retention
           FROM tenants
          WHERE archive_statuses <> '{}' AND (deleted_at IS NULL OR archive_deleted)
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
    /// `coalesce(finished_at, inserted_at)`: the instant its window counts from, and the walk's
    /// order (with the id).
    pub key_at: DateTime<Utc>,
    /// Since when it has been due: its instant plus its window (its tenant's deletion plus the
    /// grace, for a deleted tenant's).
    pub due_since: DateTime<Utc>,
}

impl PendingTask {
    /// Its place in the walk: (`key_at`, `id`).
    pub fn key(&self) -> (DateTime<Utc>, Uuid) {
        (self.key_at, self.id)
    }
}

/// Up to `limit` of `tenant`'s tasks of `status` due by the rule but for their archive, and not
/// archived as they are now, after `after` and up to `through` (inclusive) in
/// (coalesce(finished_at, inserted_at), id) order: what an archive file holds. Walks
/// `tasks_due_idx` (tenant, status, coalesce(finished_at, inserted_at)) from the cursor up to the
/// status's cutoff: each chunk reads the tasks past their window that have not gone (those
/// waiting, held, or archived and not yet deleted), never the ones still kept by it.
pub async fn pending(
    conn: &mut PgConnection,
    rule: &Rule,
    tenant: Uuid,
    status: FinalStatus,
    after: Option<(DateTime<Utc>, Uuid)>,
    through: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> Result<Vec<PendingTask>, sqlx::Error> {
    // Before any task: the year 1 (PostgreSQL's range starts in 4713 BC, chrono's far earlier).
    let start = DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).expect("the year 1");
    // After any task: the end of the year 9999.
    let end = DateTime::<Utc>::from_timestamp(253_402_300_799, 0).expect("the year 9999");
    let (after_at, after_id) = after.unwrap_or((start, Uuid::nil()));
    let (through_at, through_id) = through.unwrap_or((end, Uuid::max()));
    Sql::new(
        "WITH tn AS MATERIALIZED (SELECT * FROM tenants WHERE id = {tenant})
         SELECT t.id, t.tenant_id, t.status, t.inserted_at, t.finished_at, t.payload::text AS payload,
                coalesce(t.finished_at, t.inserted_at) AS key_at,
                (CASE WHEN tn.deleted_at IS NULL THEN coalesce(t.finished_at, t.inserted_at) + ({now} - {cutoff2})
                      ELSE tn.deleted_at + {grace} END) AS due_since
           FROM tn CROSS JOIN LATERAL (
                SELECT * FROM tasks t
                 WHERE t.tenant_id = tn.id AND t.status = '{status}'
                   AND coalesce(t.finished_at, t.inserted_at)
                       < (CASE WHEN tn.deleted_at IS NULL THEN {cutoff}
                               WHEN {purged} THEN 'infinity'::timestamptz
                               ELSE '-infinity'::timestamptz END)
                   AND (coalesce(t.finished_at, t.inserted_at), t.id) > ({after_at}, {after_id})
                   AND (coalesce(t.finished_at, t.inserted_at), t.id) <= ({through_at}, {through_id})
                   AND {due} AND {pending}
                 ORDER BY coalesce(t.finished_at, t.inserted_at), t.id
                 LIMIT {limit}) t
          ORDER BY key_at, t.id",
    )
    .bind("tenant", tenant)
    // A literal: `tasks_due_idx` is partial (final statuses), which a parameter would not prove.
    .raw("status", status.as_str())
    .with("cutoff", rule.status_cutoff(status, "tn"))
    .with("purged", rule.tenant_purged("tn"))
    .with("cutoff2", rule.status_cutoff(status, "tn"))
    .bind("now", rule.now)
    .bind("grace", crate::rule::interval(rule.grace))
    .bind("after_at", after_at)
    .bind("after_id", after_id)
    .bind("through_at", through_at)
    .bind("through_id", through_id)
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
    // The tasks' days bound the partitions each statement reads (a chunk's tasks finished about
    // together, mostly inserted on a day or two): without them, every task's lookup probes
    // every day's index.
    let (Some(lo), Some(hi)) = (at.iter().min().copied(), at.iter().max().copied()) else {
        return Ok((Vec::new(), Vec::new(), Vec::new()));
    };
    let events = sqlx::query_as!(
        EventRow,
        r#"SELECT e.task_id, e.id, e.event_type, e.created_at, e.data::text AS "data?"
             FROM task_events e JOIN unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)
               ON e.task_id = k.id AND e.task_inserted_at = k.at
            WHERE e.task_inserted_at BETWEEN $3 AND $4
            ORDER BY e.task_id, e.id"#,
        &ids,
        &at,
        lo,
        hi
    )
    .fetch_all(&mut *conn)
    .await?;
    let payloads = sqlx::query_as!(
        PayloadRow,
        "SELECT p.task_id, p.id, p.kind, p.location, p.inline_content, p.external_key, p.size_bytes, p.created_at
           FROM task_payloads p JOIN unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)
             ON p.task_id = k.id AND p.task_inserted_at = k.at
          WHERE p.task_inserted_at BETWEEN $3 AND $4
          ORDER BY p.task_id, p.id",
        &ids,
        &at,
        lo,
        hi
    )
    .fetch_all(&mut *conn)
    .await?;
    let logs = sqlx::query_as!(
        LogRow,
        "SELECT l.task_id, l.id, l.created_at, l.level, l.line
           FROM task_logs l JOIN unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)
             ON l.task_id = k.id AND l.task_inserted_at = k.at
          WHERE l.task_inserted_at BETWEEN $3 AND $4
          ORDER BY l.task_id, l.id",
        &ids,
        &at,
        lo,
        hi
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok((events, payloads, logs))
}

/// The file about to be written: which tasks it holds, fixed before the upload.
#[derive(Debug, Clone, PartialEq)]
pub struct Begun<'a> {
    pub key: &'a str,
    /// The store (`storage.url` without credentials).
    pub store: &'a str,
    pub tenant: Uuid,
    pub status: FinalStatus,
    /// The first and last task's (coalesce(finished_at, inserted_at), id).
    pub first: (DateTime<Utc>, Uuid),
    pub last: (DateTime<Utc>, Uuid),
    pub tasks: i64,
    pub run_id: Uuid,
    pub part: i32,
    pub schema_version: i32,
}

/// Records that the file `begun` is being written (committed before the upload: no object is
/// ever without its manifest row). Returns its id.
pub async fn begin(executor: impl PgExecutor<'_>, begun: &Begun<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        "INSERT INTO retention_archives (object_key, store, tenant_id, status, first_at, first_task, last_at, last_task,
                                         tasks, run_id, part, schema_version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
        begun.key,
        begun.store,
        begun.tenant,
        begun.status.as_str(),
        begun.first.0,
        begun.first.1,
        begun.last.0,
        begun.last.1,
        begun.tasks,
        begun.run_id,
        begun.part,
        begun.schema_version
    )
    .fetch_one(executor)
    .await
}

/// A task as its archive file holds it: what the rule compares the live task with.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedTask {
    pub id: Uuid,
    pub inserted_at: DateTime<Utc>,
    pub status: String,
    pub finished_at: Option<DateTime<Utc>>,
    pub events: i32,
    pub payloads: i32,
    pub logs: i32,
    /// The highest id of each the file holds, if any.
    pub max_event_id: Option<i64>,
    pub max_payload_id: Option<i64>,
    pub max_log_id: Option<i64>,
}

/// What a written file holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub tasks: Vec<ArchivedTask>,
    pub bytes: i64,
    pub sha256: String,
}

/// Why a confirmed file was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum NotRecorded {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The run no longer holds task-history's lease: another run may be writing the same file.
    #[error(
        "the run {0} no longer holds the task-history lease; the file is left to the run that does"
    )]
    LeaseLost(Uuid),
    /// The manifest row is not `writing` any more (another run finished or removed it).
    #[error("the manifest row {0} is no longer being written")]
    NotWriting(i64),
}

/// The file `id` confirmed by the store: the manifest row `written`, expiring after `retention`
/// (`None`: never), its tasks recorded as archived as they are in it (which lets them go), and
/// the run's receipt (rule `archived`) naming its key. In `conn`'s transaction: one commit for
/// all. With `lease_run`, only while that run holds task-history's lease (checked under a share
/// lock: a run taking the lease over waits for this commit, then sees the file written).
pub async fn written(
    conn: &mut PgConnection,
    id: i64,
    written: &Written,
    retention: Option<PgInterval>,
    lease_run: Option<Uuid>,
    receipt: &crate::receipts::RunReceipt,
) -> Result<(), NotRecorded> {
    if let Some(run) = lease_run {
        let held: Option<i32> = sqlx::query_scalar!(
            r#"SELECT 1 AS "held!" FROM maintenance_tasks WHERE task = 'task-history' AND lease_run_id = $1
                AND lease_expires_at > now() FOR SHARE"#,
            run
        )
        .fetch_optional(&mut *conn)
        .await?;
        if held.is_none() {
            return Err(NotRecorded::LeaseLost(run));
        }
    }
    let events: i64 = written.tasks.iter().map(|t| i64::from(t.events)).sum();
    let payloads: i64 = written.tasks.iter().map(|t| i64::from(t.payloads)).sum();
    let logs: i64 = written.tasks.iter().map(|t| i64::from(t.logs)).sum();
    let row = sqlx::query!(
        "UPDATE retention_archives
            SET state = 'written', tasks = $2, events = $3, payloads = $4, logs = $5,
                bytes = $6, sha256 = $7, written_at = now(), expires_at = now() + $8
          WHERE id = $1 AND state = 'writing'
          RETURNING tenant_id, object_key",
        id,
        written.tasks.len() as i64,
        events,
        payloads,
        logs,
        written.bytes,
        written.sha256,
        retention
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some((tenant, key)) = row.map(|row| (row.tenant_id, row.object_key)) else {
        return Err(NotRecorded::NotWriting(id));
    };
    let tasks = &written.tasks;
    let finished: Vec<Option<DateTime<Utc>>> = tasks.iter().map(|t| t.finished_at).collect();
    let max_event_ids: Vec<Option<i64>> = tasks.iter().map(|t| t.max_event_id).collect();
    let max_payload_ids: Vec<Option<i64>> = tasks.iter().map(|t| t.max_payload_id).collect();
    let max_log_ids: Vec<Option<i64>> = tasks.iter().map(|t| t.max_log_id).collect();
    // The macro's check of an array parameter takes no NULL elements: the arrays that hold them
    // are bound with their type stated (`as`), which skips that check.
    sqlx::query!(
        "INSERT INTO retention_archived_tasks AS ra (task_id, task_inserted_at, archive_id, status, finished_at, events, payloads, logs,
                                                     max_event_id, max_payload_id, max_log_id)
         SELECT k.id, k.at, $3, k.status, k.finished_at, k.events, k.payloads, k.logs, k.me, k.mp, k.ml
           FROM unnest($1::uuid[], $2::timestamptz[], $4::text[], $5::timestamptz[], $6::int4[], $7::int4[], $8::int4[],
                       $9::int8[], $10::int8[], $11::int8[])
                AS k(id, at, status, finished_at, events, payloads, logs, me, mp, ml)
         ON CONFLICT (task_inserted_at, task_id) DO UPDATE
            SET archive_id = excluded.archive_id, status = excluded.status, finished_at = excluded.finished_at,
                events = excluded.events, payloads = excluded.payloads, logs = excluded.logs,
                max_event_id = excluded.max_event_id, max_payload_id = excluded.max_payload_id,
                max_log_id = excluded.max_log_id",
        &tasks.iter().map(|t| t.id).collect::<Vec<_>>(),
        &tasks.iter().map(|t| t.inserted_at).collect::<Vec<_>>(),
        id,
        &tasks.iter().map(|t| t.status.clone()).collect::<Vec<_>>(),
        &finished as &[Option<DateTime<Utc>>],
        &tasks.iter().map(|t| t.events).collect::<Vec<_>>(),
        &tasks.iter().map(|t| t.payloads).collect::<Vec<_>>(),
        &tasks.iter().map(|t| t.logs).collect::<Vec<_>>(),
        &max_event_ids as &[Option<i64>],
        &max_payload_ids as &[Option<i64>],
        &max_log_ids as &[Option<i64>]
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "INSERT INTO retention_receipts AS rr (run_id, task, tenant_id, rule, tasks, events, payloads, logs, archive_keys, oldest, newest)
         VALUES ($1, $2, $3, 'archived', $4, $5, $6, $7, ARRAY[$8], $9, $10)
         ON CONFLICT (run_id, tenant_id, rule) DO UPDATE
         SET tasks = rr.tasks + excluded.tasks, events = rr.events + excluded.events,
             payloads = rr.payloads + excluded.payloads, logs = rr.logs + excluded.logs,
             archive_keys = rr.archive_keys || excluded.archive_keys,
             oldest = least(rr.oldest, excluded.oldest), newest = greatest(rr.newest, excluded.newest), last_at = now()",
        receipt.run_id,
        receipt.task,
        tenant,
        tasks.len() as i64,
        events,
        payloads,
        logs,
        key,
        tasks.iter().map(|t| t.finished_at.unwrap_or(t.inserted_at)).min(),
        tasks.iter().map(|t| t.finished_at.unwrap_or(t.inserted_at)).max()
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A manifest row.
#[derive(Debug, Clone, PartialEq, FromRow, serde::Serialize)]
pub struct Archive {
    pub id: i64,
    pub object_key: String,
    pub store: String,
    pub tenant_id: Uuid,
    pub slug: Option<String>,
    pub status: String,
    pub first_day: NaiveDate,
    pub last_day: NaiveDate,
    pub run_id: Uuid,
    pub state: String,
    pub tasks: i64,
    pub events: i64,
    pub payloads: i64,
    pub logs: i64,
    pub bytes: Option<i64>,
    pub sha256: Option<String>,
    pub schema_version: i32,
    pub created_at: DateTime<Utc>,
    pub written_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Written archives, oldest day first: of `tenant` (any when `None`), holding days from `since`
/// on, of tasks of `status`.
pub async fn list(
    executor: impl PgExecutor<'_>,
    tenant: Option<Uuid>,
    since: Option<NaiveDate>,
    status: Option<&str>,
) -> Result<Vec<Archive>, sqlx::Error> {
    list_between(executor, tenant, since, None, status).await
}

/// [`list`], of files holding days up to `until` too (inclusive).
pub async fn list_between(
    executor: impl PgExecutor<'_>,
    tenant: Option<Uuid>,
    since: Option<NaiveDate>,
    until: Option<NaiveDate>,
    status: Option<&str>,
) -> Result<Vec<Archive>, sqlx::Error> {
    // The days are generated columns (never NULL, though not declared so); the tenant's row may
    // be gone (the outer join).
    sqlx::query_as!(
        Archive,
        r#"SELECT a.id, a.object_key, a.store, a.tenant_id, tn.slug AS "slug?", a.status,
                  a.first_day AS "first_day!", a.last_day AS "last_day!", a.run_id,
                  a.state, a.tasks, a.events, a.payloads, a.logs, a.bytes, a.sha256, a.schema_version,
                  a.created_at, a.written_at, a.expires_at
             FROM retention_archives a LEFT JOIN tenants tn ON tn.id = a.tenant_id
            WHERE a.state = 'written' AND ($1::uuid IS NULL OR a.tenant_id = $1)
              AND ($2::date IS NULL OR a.last_day >= $2)
              AND ($3::date IS NULL OR a.first_day <= $3)
              AND ($4::text IS NULL OR a.status = $4)
            ORDER BY a.first_day, a.tenant_id, a.id"#,
        tenant,
        since,
        until,
        status
    )
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
    sqlx::query_as!(
        Policy,
        "SELECT id, slug, archive_statuses AS statuses,
                archive_retention_period AS retention, archive_deleted AS deleted
           FROM tenants WHERE id::text = $1 OR slug = $1",
        key
    )
    .fetch_optional(executor)
    .await
}

/// A change of a tenant's archive policy; `None`: unchanged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyChange {
    pub statuses: Option<Vec<String>>,
    /// `Some(None)`: forever.
    pub retention: Option<Option<PgInterval>>,
    pub deleted: Option<bool>,
}

/// Sets tenant `id`'s archive policy. A new retention moves the expiry of the tenant's written
/// archives too (written_at + the new period; forever: none): how long archives are kept is the
/// policy's answer, whenever they were written. Returns how many archives' expiry moved.
pub async fn set_policy(
    conn: &mut PgConnection,
    id: Uuid,
    change: &PolicyChange,
) -> Result<u64, sqlx::Error> {
    sqlx::query!(
        "UPDATE tenants SET archive_statuses = coalesce($2, archive_statuses),
                archive_retention_period = CASE WHEN $3 THEN $4 ELSE archive_retention_period END,
                archive_deleted = coalesce($5, archive_deleted)
          WHERE id = $1",
        id,
        change.statuses.as_deref(),
        change.retention.is_some(),
        change.retention.flatten(),
        change.deleted
    )
    .execute(&mut *conn)
    .await?;
    let Some(retention) = &change.retention else {
        return Ok(0);
    };
    Ok(sqlx::query!(
        "UPDATE retention_archives SET expires_at = written_at + $2
          WHERE tenant_id = $1 AND state = 'written' AND expires_at IS DISTINCT FROM written_at + $2",
        id,
        *retention
    )
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// A file a run began and did not finish (it died, or the store failed): its key and its tasks
/// are fixed.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct Unfinished {
    pub id: i64,
    pub object_key: String,
    pub store: String,
    pub tenant_id: Uuid,
    pub status: String,
    pub first_at: DateTime<Utc>,
    pub first_task: Uuid,
    pub last_at: DateTime<Utc>,
    pub last_task: Uuid,
    pub tasks: i64,
}

impl Unfinished {
    pub fn first(&self) -> (DateTime<Utc>, Uuid) {
        (self.first_at, self.first_task)
    }
    pub fn last(&self) -> (DateTime<Utc>, Uuid) {
        (self.last_at, self.last_task)
    }
}

/// The files begun and not written, oldest first.
pub async fn unfinished(executor: impl PgExecutor<'_>) -> Result<Vec<Unfinished>, sqlx::Error> {
    sqlx::query_as!(
        Unfinished,
        "SELECT id, object_key, store, tenant_id, status, first_at, first_task, last_at, last_task, tasks
           FROM retention_archives WHERE state = 'writing' ORDER BY id",
    )
    .fetch_all(executor)
    .await
}

/// Forgets a begun file that holds nothing now (its tasks went another way, or its tenant no
/// longer archives): the row goes and its object, if the upload got that far, goes through the
/// outbox (the row's delete trigger), exactly once.
pub async fn forget(executor: impl PgExecutor<'_>, id: i64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "DELETE FROM retention_archives WHERE id = $1 AND state = 'writing'",
        id
    )
    .execute(executor)
    .await?
    .rows_affected())
}

/// Removes up to `limit` records of archived tasks that are gone (their task deleted, and no
/// row of theirs left: see [`late_rows`]): they let nothing go any more, and an archive expires
/// only once none of its tasks is recorded. Not while a rewrite's detached source waits to be
/// counted (its count reads them). Returns how many.
pub async fn clean_gone(executor: impl PgExecutor<'_>, limit: i64) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        "DELETE FROM retention_archived_tasks WHERE (task_inserted_at, task_id) IN (
             SELECT ra.task_inserted_at, ra.task_id FROM retention_archived_tasks ra
              WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = ra.task_id AND t.inserted_at = ra.task_inserted_at)
                AND NOT EXISTS (SELECT 1 FROM task_events e WHERE e.task_id = ra.task_id AND e.task_inserted_at = ra.task_inserted_at
                                   AND e.id > coalesce(ra.max_event_id, 0))
                AND NOT EXISTS (SELECT 1 FROM task_payloads p WHERE p.task_id = ra.task_id AND p.task_inserted_at = ra.task_inserted_at
                                   AND p.id > coalesce(ra.max_payload_id, 0))
                AND NOT EXISTS (SELECT 1 FROM task_logs l WHERE l.task_id = ra.task_id AND l.task_inserted_at = ra.task_inserted_at
                                   AND l.id > coalesce(ra.max_log_id, 0))
              LIMIT $1)
           AND NOT EXISTS (SELECT 1 FROM history_detached)",
        limit
    )
    .execute(executor)
    .await?
    .rows_affected())
}

/// Rows (events, payloads, log lines) left of runs an archiving tenant had archived and
/// retention deleted: written while the run's delete ran, after its snapshot, so in no archive.
/// The orphan rules keep them ([`Rule::orphan_of_archived`]); an operator decides (see
/// docs/operations.md, "Archiving").
pub async fn late_rows(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT coalesce(sum((SELECT count(*) FROM task_events e WHERE e.task_id = ra.task_id AND e.task_inserted_at = ra.task_inserted_at
                                AND e.id > coalesce(ra.max_event_id, 0))
                           + (SELECT count(*) FROM task_payloads p WHERE p.task_id = ra.task_id AND p.task_inserted_at = ra.task_inserted_at
                                AND p.id > coalesce(ra.max_payload_id, 0))
                           + (SELECT count(*) FROM task_logs l WHERE l.task_id = ra.task_id AND l.task_inserted_at = ra.task_inserted_at
                                AND l.id > coalesce(ra.max_log_id, 0))), 0)::bigint AS "late!"
           FROM retention_archived_tasks ra
          WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = ra.task_id AND t.inserted_at = ra.task_inserted_at)"#,
    )
    .fetch_one(executor)
    .await
}

/// Whether run `run` holds task-history's lease now: checked before each upload, so that a
/// run that lost it does not write a file another run may be writing.
pub async fn lease_held(executor: impl PgExecutor<'_>, run: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM maintenance_tasks WHERE task = 'task-history' AND lease_run_id = $1
                            AND lease_expires_at > now()) AS "held!""#,
        run
    )
    .fetch_one(executor)
    .await
}

/// An expired archive given to the outbox.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct Expired {
    pub tenant_id: Uuid,
    pub object_key: String,
    pub bytes: Option<i64>,
}

/// Deletes up to `limit` archives of `store` expired at `now` (`expires_at` passed) that hold
/// no live task, each object given to the outbox by the row's delete, and writes the receipts
/// (rule `archive-expired`, naming the keys); the caller commits. Returns what went.
pub async fn expire(
    conn: &mut PgConnection,
    store: &str,
    now: DateTime<Utc>,
    limit: i64,
    receipt: &crate::receipts::RunReceipt,
) -> Result<Vec<Expired>, sqlx::Error> {
    let gone: Vec<Expired> = sqlx::query_as!(
        Expired,
        "DELETE FROM retention_archives WHERE id IN (
             SELECT a.id FROM retention_archives a
              WHERE a.store = $1 AND a.state = 'written' AND a.expires_at <= $2
                AND NOT EXISTS (SELECT 1 FROM retention_archived_tasks ra WHERE ra.archive_id = a.id)
              ORDER BY a.expires_at, a.id LIMIT $3 FOR UPDATE SKIP LOCKED)
         RETURNING tenant_id, object_key, bytes",
        store,
        now,
        limit
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut by_tenant: std::collections::BTreeMap<Uuid, Vec<String>> = Default::default();
    for e in &gone {
        by_tenant
            .entry(e.tenant_id)
            .or_default()
            .push(e.object_key.clone());
    }
    for (tenant, keys) in by_tenant {
        sqlx::query!(
            "INSERT INTO retention_receipts AS rr (run_id, task, tenant_id, rule, objects, archive_keys)
             VALUES ($1, $2, $3, 'archive-expired', $4, $5)
             ON CONFLICT (run_id, tenant_id, rule) DO UPDATE
             SET objects = rr.objects + excluded.objects, archive_keys = rr.archive_keys || excluded.archive_keys,
                 last_at = now()",
            receipt.run_id,
            receipt.task,
            tenant,
            keys.len() as i64,
            &keys
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(gone)
}

/// Archive lag: since when the task of an archiving tenant that has waited longest for its
/// archive has been due (its instant plus its window), or `None` when none waits. One probe per archiving tenant and status along
/// `tasks_due_idx`.
pub async fn oldest_waiting(
    conn: &mut PgConnection,
    rule: &Rule,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let mut oldest: Option<DateTime<Utc>> = None;
    for tenant in archiving_tenants(&mut *conn).await? {
        for status in tenant.statuses.iter().filter_map(|s| FinalStatus::parse(s)) {
            if let Some(first) = pending(&mut *conn, rule, tenant.id, status, None, None, 1)
                .await?
                .into_iter()
                .next()
            {
                let since = first.due_since;
                oldest = Some(oldest.map_or(since, |o| o.min(since)));
            }
        }
    }
    Ok(oldest)
}

/// The archives at a glance, when any tenant archives or any archive exists.
#[derive(Debug, Clone, Default, PartialEq, Eq, FromRow, serde::Serialize)]
pub struct Summary {
    /// Tenants with an archive policy.
    pub tenants: i64,
    /// Files written, the runs and bytes in them, the latest written.
    pub files: i64,
    pub tasks: i64,
    pub bytes: i64,
    pub last_written_at: Option<DateTime<Utc>>,
    /// Files begun and not finished (a run died, or the store failed): written again next run.
    pub writing: i64,
}

pub async fn summary(executor: impl PgExecutor<'_>) -> Result<Summary, sqlx::Error> {
    sqlx::query_as!(
        Summary,
        r#"SELECT (SELECT count(*) FROM tenants WHERE archive_statuses <> '{}') AS "tenants!",
                  count(*) FILTER (WHERE state = 'written') AS "files!",
                  coalesce(sum(tasks) FILTER (WHERE state = 'written'), 0)::bigint AS "tasks!",
                  coalesce(sum(bytes) FILTER (WHERE state = 'written'), 0)::bigint AS "bytes!",
                  max(written_at) AS "last_written_at?",
                  count(*) FILTER (WHERE state = 'writing') AS "writing!"
             FROM retention_archives"#,
    )
    .fetch_one(executor)
    .await
}
