//! Positions a task has reached in an ever-growing sequence, kept across runs and replicas.

use sqlx::PgExecutor;

/// The stored position, or 0.
pub async fn get(executor: impl PgExecutor<'_>, name: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> = sqlx::query_scalar("SELECT position FROM retention_watermarks WHERE name = $1")
        .bind(name)
        .fetch_optional(executor)
        .await?;
    Ok(position.unwrap_or(0))
}

pub async fn set(executor: impl PgExecutor<'_>, name: &str, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO retention_watermarks (name, position) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now()",
    )
    .bind(name)
    .bind(position)
    .execute(executor)
    .await?;
    Ok(())
}
