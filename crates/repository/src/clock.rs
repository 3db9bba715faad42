//! The database's clock: every replica evaluates retention rules against the same time.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// The database's `now()`.
pub async fn now(executor: impl PgExecutor<'_>) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(executor)
        .await
}
