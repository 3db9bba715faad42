//! Tenants and their retention settings.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::types::PgInterval;
use sqlx::PgExecutor;
use uuid::Uuid;

/// A final status with a window of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FinalStatus {
    Succeeded,
    Failed,
    Cancelled,
}

impl FinalStatus {
    pub const ALL: [FinalStatus; 3] = [
        FinalStatus::Succeeded,
        FinalStatus::Failed,
        FinalStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Succeeded => "succeeded",
            FinalStatus::Failed => "failed",
            FinalStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<FinalStatus> {
        FinalStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// A window: `None` keeps forever.
pub type Window = Option<Duration>;

/// A tenant as the retention settings see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    /// How long finished run history is kept (`data_retention_period`); `None` keeps it forever.
    pub retention: Window,
    /// The statuses with a window of their own, and that window (`None`: forever).
    pub by_status: Vec<(FinalStatus, Window)>,
    /// The log lines' own window (`log_retention_period`): `None` follows
    /// `retention.task_logs.max_age`; `Some(None)` keeps them forever.
    pub log_retention: Option<Window>,
    pub deleted_at: Option<DateTime<Utc>>,
}

impl Tenant {
    /// The window of tasks that ended in `status`.
    pub fn window(&self, status: FinalStatus) -> Window {
        self.by_status
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(self.retention, |(_, w)| *w)
    }
}

/// A row of `tenants` as the statements below return it (their `RETURNING` lists are one list,
/// written out in each: the checked macros take only literal text).
struct TenantRow {
    id: Uuid,
    slug: String,
    name: String,
    retention_seconds: Option<f64>,
    succeeded_seconds: Option<f64>,
    failed_seconds: Option<f64>,
    cancelled_seconds: Option<f64>,
    log_seconds: Option<f64>,
    deleted_at: Option<DateTime<Utc>>,
}

/// A stored override of at least this long is "forever" (`retention_cutoff`'s convention).
const FOREVER_SECONDS: f64 = 1000.0 * 365.0 * 86_400.0;

fn window(seconds: Option<f64>) -> Window {
    seconds
        .filter(|s| *s < FOREVER_SECONDS)
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
}

impl From<TenantRow> for Tenant {
    fn from(row: TenantRow) -> Self {
        let by_status = [
            (FinalStatus::Succeeded, row.succeeded_seconds),
            (FinalStatus::Failed, row.failed_seconds),
            (FinalStatus::Cancelled, row.cancelled_seconds),
        ]
        .into_iter()
        .filter_map(|(status, seconds)| seconds.map(|s| (status, window(Some(s)))))
        .collect();
        Tenant {
            id: row.id,
            slug: row.slug,
            name: row.name,
            retention: window(row.retention_seconds),
            by_status,
            log_retention: row.log_seconds.map(|s| window(Some(s))),
            deleted_at: row.deleted_at,
        }
    }
}

/// The tenant whose id or slug is `key` (an id wins when `key` parses as one).
pub async fn find(executor: impl PgExecutor<'_>, key: &str) -> Result<Option<Tenant>, sqlx::Error> {
    // No slug holds a NUL (PostgreSQL's text cannot), and binding one fails the statement.
    if key.contains('\0') {
        return Ok(None);
    }
    let id = Uuid::parse_str(key).ok();
    let row = sqlx::query_as!(
        TenantRow,
        "SELECT id, slug, name, extract(epoch FROM data_retention_period)::float8 AS retention_seconds,
                extract(epoch FROM succeeded_retention_period)::float8 AS succeeded_seconds,
                extract(epoch FROM failed_retention_period)::float8 AS failed_seconds,
                extract(epoch FROM cancelled_retention_period)::float8 AS cancelled_seconds,
                extract(epoch FROM log_retention_period)::float8 AS log_seconds, deleted_at
         FROM tenants WHERE id = $1 OR ($1 IS NULL AND slug = $2)",
        id,
        key
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(Tenant::from))
}

/// The slugs of those of `ids` that are tenants (ids of deleted tenants included).
pub async fn slugs(
    executor: impl PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, String>, sqlx::Error> {
    let rows = sqlx::query!("SELECT id, slug FROM tenants WHERE id = ANY($1)", ids)
        .fetch_all(executor)
        .await?;
    Ok(rows.into_iter().map(|row| (row.id, row.slug)).collect())
}

fn interval(duration: Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: duration.as_micros() as i64,
    }
}

/// Sets a tenant's retention (`None`: keep forever). Returns the updated tenant, or `None` when
/// there is no such tenant. The database refuses periods under one hour.
pub async fn set_retention(
    executor: impl PgExecutor<'_>,
    id: Uuid,
    retention: Window,
) -> Result<Option<Tenant>, sqlx::Error> {
    let row = sqlx::query_as!(
        TenantRow,
        "UPDATE tenants SET data_retention_period = $2 WHERE id = $1
         RETURNING id, slug, name, extract(epoch FROM data_retention_period)::float8 AS retention_seconds,
                extract(epoch FROM succeeded_retention_period)::float8 AS succeeded_seconds,
                extract(epoch FROM failed_retention_period)::float8 AS failed_seconds,
                extract(epoch FROM cancelled_retention_period)::float8 AS cancelled_seconds,
                extract(epoch FROM log_retention_period)::float8 AS log_seconds, deleted_at",
        id,
        retention.map(interval)
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(Tenant::from))
}

/// What a status's window becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWindow {
    /// A window of its own (`None`: forever, stored as 1000 years).
    Own(Window),
    /// As `data_retention_period` (the override is removed).
    Default,
}

/// Sets (or removes) the window of tasks of one final status. Returns the updated tenant, or
/// `None` when there is no such tenant.
pub async fn set_status_retention(
    executor: impl PgExecutor<'_>,
    id: Uuid,
    status: FinalStatus,
    window: StatusWindow,
) -> Result<Option<Tenant>, sqlx::Error> {
    let value = match window {
        StatusWindow::Own(Some(duration)) => Some(interval(duration)),
        StatusWindow::Own(None) => Some(PgInterval {
            months: 12_000,
            days: 0,
            microseconds: 0,
        }),
        StatusWindow::Default => None,
    };
    // One statement per column (a trigger fires on updates of these columns alone).
    let row = match status {
        FinalStatus::Succeeded => {
            sqlx::query_as!(
                TenantRow,
                "UPDATE tenants SET succeeded_retention_period = $2 WHERE id = $1
                 RETURNING id, slug, name, extract(epoch FROM data_retention_period)::float8 AS retention_seconds,
                           extract(epoch FROM succeeded_retention_period)::float8 AS succeeded_seconds,
                           extract(epoch FROM failed_retention_period)::float8 AS failed_seconds,
                           extract(epoch FROM cancelled_retention_period)::float8 AS cancelled_seconds,
                           extract(epoch FROM log_retention_period)::float8 AS log_seconds, deleted_at",
                id,
                value
            )
            .fetch_optional(executor)
            .await?
        }
        FinalStatus::Failed => {
            sqlx::query_as!(
                TenantRow,
                "UPDATE tenants SET failed_retention_period = $2 WHERE id = $1
                 RETURNING id, slug, name, extract(epoch FROM data_retention_period)::float8 AS retention_seconds,
                           extract(epoch FROM succeeded_retention_period)::float8 AS succeeded_seconds,
                           extract(epoch FROM failed_retention_period)::float8 AS failed_seconds,
                           extract(epoch FROM cancelled_retention_period)::float8 AS cancelled_seconds,
                           extract(epoch FROM log_retention_period)::float8 AS log_seconds, deleted_at",
                id,
                value
            )
            .fetch_optional(executor)
            .await?
        }
        FinalStatus::Cancelled => {
            sqlx::query_as!(
                TenantRow,
                "UPDATE tenants SET cancelled_retention_period = $2 WHERE id = $1
                 RETURNING id, slug, name, extract(epoch FROM data_retention_period)::float8 AS retention_seconds,
                           extract(epoch FROM succeeded_retention_period)::float8 AS succeeded_seconds,
                           extract(epoch FROM failed_retention_period)::float8 AS failed_seconds,
                           extract(epoch FROM cancelled_retention_period)::float8 AS cancelled_seconds,
                           extract(epoch FROM log_retention_period)::float8 AS log_seconds, deleted_at",
                id,
                value
            )
            .fetch_optional(executor)
            .await?
        }
    };
    Ok(row.map(Tenant::from))
}

/// Sets the log lines' window of a tenant: `None` follows `retention.task_logs.max_age` again,
/// `Some(None)` keeps them forever (stored as 1000 years). Returns the updated tenant, or `None`
/// when there is no such tenant.
pub async fn set_log_retention(
    executor: impl PgExecutor<'_>,
    id: Uuid,
    window: Option<Window>,
) -> Result<Option<Tenant>, sqlx::Error> {
    let value = match window {
        Some(Some(duration)) => Some(interval(duration)),
        Some(None) => Some(PgInterval {
            months: 12_000,
            days: 0,
            microseconds: 0,
        }),
        None => None,
    };
    let row = sqlx::query_as!(
        TenantRow,
        "UPDATE tenants SET log_retention_period = $2 WHERE id = $1
         RETURNING id, slug, name, extract(epoch FROM data_retention_period)::float8 AS retention_seconds,
                extract(epoch FROM succeeded_retention_period)::float8 AS succeeded_seconds,
                extract(epoch FROM failed_retention_period)::float8 AS failed_seconds,
                extract(epoch FROM cancelled_retention_period)::float8 AS cancelled_seconds,
                extract(epoch FROM log_retention_period)::float8 AS log_seconds, deleted_at",
        id,
        value
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.map(Tenant::from))
}
