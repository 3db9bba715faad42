//! Tenants and their retention settings.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::types::PgInterval;
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

/// A tenant as the retention settings see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    /// How long finished run history is kept; `None` keeps it forever.
    pub retention: Option<Duration>,
    pub deleted_at: Option<DateTime<Utc>>,
}

#[derive(FromRow)]
struct TenantRow {
    id: Uuid,
    slug: String,
    name: String,
    retention_seconds: Option<f64>,
    deleted_at: Option<DateTime<Utc>>,
}

impl From<TenantRow> for Tenant {
    fn from(row: TenantRow) -> Self {
        Tenant {
            id: row.id,
            slug: row.slug,
            name: row.name,
            retention: row.retention_seconds.map(|s| Duration::from_secs_f64(s.max(0.0))),
            deleted_at: row.deleted_at,
        }
    }
}

const COLUMNS: &str =
    "id, slug, name, extract(epoch FROM data_retention_period)::float8 AS retention_seconds, deleted_at";

/// The tenant whose id or slug is `key` (an id wins when `key` parses as one).
pub async fn find(executor: impl PgExecutor<'_>, key: &str) -> Result<Option<Tenant>, sqlx::Error> {
    let id = Uuid::parse_str(key).ok();
    let row: Option<TenantRow> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM tenants WHERE id = $1 OR ($1 IS NULL AND slug = $2)"))
            .bind(id)
            .bind(key)
            .fetch_optional(executor)
            .await?;
    Ok(row.map(Tenant::from))
}

/// The slugs of those of `ids` that are tenants (ids of deleted tenants included).
pub async fn slugs(executor: impl PgExecutor<'_>, ids: &[Uuid]) -> Result<std::collections::HashMap<Uuid, String>, sqlx::Error> {
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, slug FROM tenants WHERE id = ANY($1)").bind(ids).fetch_all(executor).await?;
    Ok(rows.into_iter().collect())
}

/// Sets a tenant's retention (`None`: keep forever). Returns the updated tenant, or `None` when
/// there is no such tenant. The database refuses periods under one hour.
pub async fn set_retention(
    executor: impl PgExecutor<'_>,
    id: Uuid,
    retention: Option<Duration>,
) -> Result<Option<Tenant>, sqlx::Error> {
    let interval = retention.map(|d| PgInterval { months: 0, days: 0, microseconds: d.as_micros() as i64 });
    let row: Option<TenantRow> = sqlx::query_as(&format!(
        "UPDATE tenants SET data_retention_period = $2 WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(interval)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(Tenant::from))
}
