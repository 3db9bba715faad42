//! Positions a task has reached in an ever-growing sequence, kept across runs and replicas.

use sqlx::PgExecutor;

/// The stored position, or 0.
pub async fn get(executor: impl PgExecutor<'_>, name: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> = sqlx::query_scalar!(
        "SELECT position FROM retention_watermarks WHERE name = $1",
        name
    )
    .fetch_optional(executor)
    .await?;
    Ok(position.unwrap_or(0))
}

pub async fn set(
    executor: impl PgExecutor<'_>,
    name: &str,
    position: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO retention_watermarks (name, position) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now()",
        name,
        position
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// The end a walk may reach: ids up to `end` were all taken by transactions that have ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub end: i64,
    /// Every transaction that could have taken an id up to `end` has ended.
    pub settled: bool,
}

/// The walk's pending end, if one was recorded, and whether it has settled: every transaction in
/// progress when `pending_snapshot` was taken has ended.
pub async fn pending(
    executor: impl PgExecutor<'_>,
    name: &str,
) -> Result<Option<Pending>, sqlx::Error> {
    // `settled` is the same test in both statements (the macros take only literal text).
    let row = sqlx::query!(
        r#"SELECT pending_position AS "end!",
                  NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(pending_snapshot) x WHERE pg_xact_status(x) = 'in progress') AS "settled!"
           FROM retention_watermarks WHERE name = $1 AND pending_position IS NOT NULL"#,
        name
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|row| Pending {
        end: row.end,
        settled: row.settled,
    }))
}

/// Records `end` (the sequence's last value, read before this call) as the walk's pending end,
/// with the transactions in progress now: it settles once they have all ended (others, newer,
/// do not hold it up). An id is taken by the statement that inserts its row, which has a
/// transaction id by then or within microseconds (the row's insert assigns it), so every
/// transaction that took an id up to `end` is among them or has ended. (An id taken by an explicit `nextval()` long before the insert,
/// in a transaction with no id yet, is not covered; the engine's writers never do that.)
pub async fn set_pending(
    executor: impl PgExecutor<'_>,
    name: &str,
    end: i64,
) -> Result<Pending, sqlx::Error> {
    let row = sqlx::query!(
        r#"INSERT INTO retention_watermarks (name, position, pending_position, pending_snapshot)
         VALUES ($1, 0, $2, pg_current_snapshot())
         ON CONFLICT (name) DO UPDATE
         SET pending_position = excluded.pending_position, pending_snapshot = excluded.pending_snapshot, updated_at = now()
         RETURNING pending_position AS "end!",
                   NOT EXISTS (SELECT 1 FROM pg_snapshot_xip(pending_snapshot) x WHERE pg_xact_status(x) = 'in progress') AS "settled!""#,
        name,
        end
    )
    .fetch_one(executor)
    .await?;
    Ok(Pending {
        end: row.end,
        settled: row.settled,
    })
}
