//! The outbox of stored objects to delete (`object_deletions`).
//!
//! An entry is written by trigger in the transaction that deletes (or re-keys) a payload row
//! pointing at an object, so it exists exactly when that delete committed. The `blobs` task
//! reads entries ([`due`]), checks that no payload row points at the key any more
//! ([`unreferenced`]), deletes the objects with no transaction open, and only then removes the
//! entries the store confirmed ([`remove`]); a failure puts an entry off ([`put_off`]). A crash
//! anywhere in between leaves the entry, and the next run deletes the object again: "not found"
//! counts as deleted.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

/// An object to delete.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Entry {
    pub id: i64,
    pub object_key: String,
    pub tenant_id: Uuid,
    /// The payload row whose object this is, or the archive (`retention_archives`) whose file
    /// it is: one of the two.
    pub payload_id: Option<i64>,
    pub task_inserted_at: Option<DateTime<Utc>>,
    pub archive_id: Option<i64>,
    pub size_bytes: i64,
    pub attempts: i32,
}

/// Up to `limit` entries whose time has come (`next_attempt_at` passed at `now`), oldest first.
pub async fn due(
    executor: impl PgExecutor<'_>,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as!(
        Entry,
        "SELECT id, object_key, tenant_id, payload_id, task_inserted_at, archive_id, size_bytes, attempts
         FROM object_deletions WHERE next_attempt_at <= $1 ORDER BY next_attempt_at, id LIMIT $2",
        now,
        limit
    )
    .fetch_all(executor)
    .await
}

/// Of `entries`, the ids of those whose key no payload row and no archive points at now: only
/// their objects may be deleted. (A row pointing at a key in the outbox is a writer's reuse of a
/// key, or an archive file begun again under its key: its object stays, and the entry is removed
/// with nothing deleted.)
pub async fn unreferenced(
    executor: impl PgExecutor<'_>,
    entries: &[Entry],
) -> Result<Vec<i64>, sqlx::Error> {
    let ids: Vec<i64> = entries.iter().map(|e| e.id).collect();
    sqlx::query_scalar!(
        "SELECT o.id FROM object_deletions o
         WHERE o.id = ANY($1)
           AND NOT EXISTS (SELECT 1 FROM task_payloads p WHERE p.external_key = o.object_key)
           AND NOT EXISTS (SELECT 1 FROM retention_archives a WHERE a.object_key = o.object_key)
         ORDER BY o.id",
        &ids
    )
    .fetch_all(executor)
    .await
}

/// Removes the entries `ids` (their objects deleted, or found missing, by the store).
pub async fn remove(executor: impl PgExecutor<'_>, ids: &[i64]) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query!("DELETE FROM object_deletions WHERE id = ANY($1)", ids)
            .execute(executor)
            .await?
            .rows_affected(),
    )
}

/// Puts entry `id` off after a failure: tried again `backoff` after `now`, its error kept.
pub async fn put_off(
    executor: impl PgExecutor<'_>,
    id: i64,
    now: DateTime<Utc>,
    backoff: std::time::Duration,
    error: &str,
) -> Result<(), sqlx::Error> {
    // The casts name the types the values are bound as (`$2 + $3` alone has no type to prepare).
    sqlx::query!(
        "UPDATE object_deletions SET attempts = attempts + 1, next_attempt_at = $2::timestamptz + $3::interval, last_error = $4 WHERE id = $1",
        id,
        now,
        crate::rule::interval(backoff),
        error
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// Of `keys`, those that no payload row, archive or outbox entry names: what the sweep may
/// delete of a batch of objects it found in the store (checked right before it deletes them).
pub async fn keys_unknown(
    executor: impl PgExecutor<'_>,
    keys: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT k AS "key!" FROM unnest($1::text[]) AS k
            WHERE NOT EXISTS (SELECT 1 FROM task_payloads WHERE external_key = k)
              AND NOT EXISTS (SELECT 1 FROM object_deletions WHERE object_key = k)
              AND NOT EXISTS (SELECT 1 FROM retention_archives WHERE object_key = k)"#,
        keys
    )
    .fetch_all(executor)
    .await
}

/// The outbox at a glance.
#[derive(Debug, Clone, Default, PartialEq, Eq, FromRow)]
pub struct Depth {
    pub entries: i64,
    pub bytes: i64,
    pub oldest_enqueued_at: Option<DateTime<Utc>>,
    /// Entries that failed at least once, and the latest error among them.
    pub failing: i64,
    pub last_error: Option<String>,
}

pub async fn depth(executor: impl PgExecutor<'_>) -> Result<Depth, sqlx::Error> {
    sqlx::query_as!(
        Depth,
        r#"SELECT count(*) AS "entries!", coalesce(sum(size_bytes), 0)::bigint AS "bytes!", min(enqueued_at) AS "oldest_enqueued_at?",
                count(*) FILTER (WHERE attempts > 0) AS "failing!",
                (SELECT last_error FROM object_deletions WHERE last_error IS NOT NULL ORDER BY next_attempt_at DESC LIMIT 1) AS "last_error?"
         FROM object_deletions"#
    )
    .fetch_one(executor)
    .await
}
