//! Loading archived runs back into a schema of the operator's choosing (`engine archive
//! restore`): never into the live tables, where retention would delete them again.
//!
//! The schema gets four plain tables shaped like the live ones (`tasks`, `task_events`,
//! `task_payloads`, `task_logs`; no partitions, no triggers), each task row with the key of the
//! archive file it came from. A run restored again (from the same or a later file) replaces the
//! earlier copy, its dependents included: restoring twice gives the same rows.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// What a schema name may be: a lower-case SQL identifier.
pub const ALLOWED_SCHEMA: &str =
    "a new or restore-only schema: lower-case letters, digits and _, starting with a letter or _, at most 63 characters, not public, pg_* or information_schema, and not one holding the engine's tables";

/// Why `schema` cannot receive restored runs, if it cannot: a name that is not a plain
/// identifier, a system schema, or one that holds the engine's own tables (its migrations'
/// record or a `tasks` table that is not a restore's).
pub async fn refusal(conn: &mut PgConnection, schema: &str) -> Result<Option<String>, sqlx::Error> {
    let plain = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !plain {
        return Ok(Some("it is not a plain lower-case identifier".into()));
    }
    if schema == "public" || schema == "information_schema" || schema.starts_with("pg_") {
        return Ok(Some("it is a system or the default schema".into()));
    }
    // A schema on the search path (or one that would be: `$user`, named after a role) would put
    // the restored tables in front of the live ones for every unqualified statement.
    let found = sqlx::query!(
        r#"SELECT $1 = ANY (current_schemas(true)) AS "searched!",
                  EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS "a_role!""#,
        schema
    )
    .fetch_one(&mut *conn)
    .await?;
    if found.searched || found.a_role {
        return Ok(Some(
            "it is on the search path, or named after a role (\"$user\" is on it)".into(),
        ));
    }
    // Only a new schema, or one a restore made: never tables of someone else's.
    let held = sqlx::query!(
        r#"SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')) AS "relations!",
                EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                          JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relname = 'tasks' AND c.relkind = 'r'
                           AND a.attname = 'archive_key' AND NOT a.attisdropped) AS "restore_made!""#,
        schema
    )
    .fetch_one(&mut *conn)
    .await?;
    if held.relations > 0 && !held.restore_made {
        return Ok(Some("it holds tables a restore did not make".into()));
    }
    let engine = sqlx::query!(
        r#"SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relname = '_sqlx_migrations') AS "migrations!",
                EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relname = 'tasks') AS "live_tasks!",
                EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                          JOIN pg_namespace n ON n.oid = c.relnamespace
                         WHERE n.nspname = $1 AND c.relname = 'tasks' AND c.relkind = 'r'
                           AND a.attname = 'archive_key' AND NOT a.attisdropped) AS "restore_tasks!""#,
        schema
    )
    .fetch_one(&mut *conn)
    .await?;
    if engine.migrations || (engine.live_tasks && !engine.restore_tasks) {
        return Ok(Some("it holds the engine's own tables".into()));
    }
    Ok(None)
}

/// Runs to load, column by column (one entry per row of each table).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Runs {
    pub task_tenant: Vec<Uuid>,
    pub task_id: Vec<Uuid>,
    pub task_status: Vec<String>,
    pub task_inserted_at: Vec<DateTime<Utc>>,
    pub task_finished_at: Vec<Option<DateTime<Utc>>>,
    pub task_payload: Vec<Option<String>>,
    pub task_archive_key: Vec<String>,
    pub event_id: Vec<i64>,
    pub event_task: Vec<Uuid>,
    pub event_task_inserted_at: Vec<DateTime<Utc>>,
    pub event_type: Vec<String>,
    pub event_created_at: Vec<DateTime<Utc>>,
    pub event_data: Vec<Option<String>>,
    pub payload_id: Vec<i64>,
    pub payload_task: Vec<Uuid>,
    pub payload_task_inserted_at: Vec<DateTime<Utc>>,
    pub payload_kind: Vec<String>,
    pub payload_location: Vec<String>,
    pub payload_inline: Vec<Option<Vec<u8>>>,
    pub payload_key: Vec<Option<String>>,
    pub payload_size: Vec<i64>,
    pub payload_created_at: Vec<DateTime<Utc>>,
    pub log_id: Vec<i64>,
    pub log_task: Vec<Uuid>,
    pub log_task_inserted_at: Vec<DateTime<Utc>>,
    pub log_created_at: Vec<DateTime<Utc>>,
    pub log_level: Vec<String>,
    pub log_line: Vec<String>,
}

/// Creates `schema`'s tables if missing (the caller checked [`refusal`]).
pub async fn prepare(conn: &mut PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    for statement in [
        format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""),
        format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".tasks (
                 id uuid NOT NULL, tenant_id uuid NOT NULL, status text NOT NULL,
                 inserted_at timestamptz NOT NULL, finished_at timestamptz NULL, payload jsonb NULL,
                 archive_key text NOT NULL, PRIMARY KEY (id, inserted_at))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".task_events (
                 id bigint NOT NULL, task_id uuid NOT NULL, task_inserted_at timestamptz NOT NULL,
                 tenant_id uuid NOT NULL, event_type text NOT NULL, created_at timestamptz NOT NULL,
                 data jsonb NULL, PRIMARY KEY (id, task_inserted_at))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".task_payloads (
                 id bigint NOT NULL, tenant_id uuid NOT NULL, task_id uuid NOT NULL,
                 task_inserted_at timestamptz NOT NULL, kind text NOT NULL, location text NOT NULL,
                 inline_content bytea NULL, external_key text NULL, size_bytes bigint NOT NULL,
                 created_at timestamptz NOT NULL, PRIMARY KEY (id, task_inserted_at))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".task_logs (
                 id bigint NOT NULL, tenant_id uuid NOT NULL, task_id uuid NOT NULL,
                 task_inserted_at timestamptz NOT NULL, created_at timestamptz NOT NULL,
                 level text NOT NULL, line text NOT NULL, PRIMARY KEY (id, task_inserted_at))"
        ),
    ] {
        sqlx::query(&statement).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Loads `runs` into `schema` (prepared), each run replacing an earlier copy of it with its
/// dependents. Returns the tasks loaded.
pub async fn load(conn: &mut PgConnection, schema: &str, runs: &Runs) -> Result<u64, sqlx::Error> {
    for table in ["task_events", "task_payloads", "task_logs"] {
        sqlx::query(&format!(
            "DELETE FROM \"{schema}\".{table} d USING unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)
              WHERE d.task_id = k.id AND d.task_inserted_at = k.at"
        ))
        .bind(&runs.task_id)
        .bind(&runs.task_inserted_at)
        .execute(&mut *conn)
        .await?;
    }
    let tasks = sqlx::query(&format!(
        "INSERT INTO \"{schema}\".tasks (tenant_id, id, status, inserted_at, finished_at, payload, archive_key)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::jsonb[], $7::text[])
         ON CONFLICT (id, inserted_at) DO UPDATE
            SET tenant_id = excluded.tenant_id, status = excluded.status, finished_at = excluded.finished_at,
                payload = excluded.payload, archive_key = excluded.archive_key"
    ))
    .bind(&runs.task_tenant)
    .bind(&runs.task_id)
    .bind(&runs.task_status)
    .bind(&runs.task_inserted_at)
    .bind(&runs.task_finished_at)
    .bind(&runs.task_payload)
    .bind(&runs.task_archive_key)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query(&format!(
        "INSERT INTO \"{schema}\".task_events (id, task_id, task_inserted_at, tenant_id, event_type, created_at, data)
         SELECT e.id, e.task_id, e.at, t.tenant_id, e.kind, e.created_at, e.data
           FROM unnest($1::int8[], $2::uuid[], $3::timestamptz[], $4::text[], $5::timestamptz[], $6::jsonb[])
                AS e(id, task_id, at, kind, created_at, data)
           JOIN \"{schema}\".tasks t ON t.id = e.task_id AND t.inserted_at = e.at"
    ))
    .bind(&runs.event_id)
    .bind(&runs.event_task)
    .bind(&runs.event_task_inserted_at)
    .bind(&runs.event_type)
    .bind(&runs.event_created_at)
    .bind(&runs.event_data)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO \"{schema}\".task_payloads (id, tenant_id, task_id, task_inserted_at, kind, location, inline_content,
                                                  external_key, size_bytes, created_at)
         SELECT p.id, t.tenant_id, p.task_id, p.at, p.kind, p.location, p.inline, p.key, p.size, p.created_at
           FROM unnest($1::int8[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[], $6::bytea[], $7::text[],
                       $8::int8[], $9::timestamptz[])
                AS p(id, task_id, at, kind, location, inline, key, size, created_at)
           JOIN \"{schema}\".tasks t ON t.id = p.task_id AND t.inserted_at = p.at"
    ))
    .bind(&runs.payload_id)
    .bind(&runs.payload_task)
    .bind(&runs.payload_task_inserted_at)
    .bind(&runs.payload_kind)
    .bind(&runs.payload_location)
    .bind(&runs.payload_inline)
    .bind(&runs.payload_key)
    .bind(&runs.payload_size)
    .bind(&runs.payload_created_at)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "INSERT INTO \"{schema}\".task_logs (id, tenant_id, task_id, task_inserted_at, created_at, level, line)
         SELECT l.id, t.tenant_id, l.task_id, l.at, l.created_at, l.level, l.line
           FROM unnest($1::int8[], $2::uuid[], $3::timestamptz[], $4::timestamptz[], $5::text[], $6::text[])
                AS l(id, task_id, at, created_at, level, line)
           JOIN \"{schema}\".tasks t ON t.id = l.task_id AND t.inserted_at = l.at"
    ))
    .bind(&runs.log_id)
    .bind(&runs.log_task)
    .bind(&runs.log_task_inserted_at)
    .bind(&runs.log_created_at)
    .bind(&runs.log_level)
    .bind(&runs.log_line)
    .execute(&mut *conn)
    .await?;
    Ok(tasks)
}
