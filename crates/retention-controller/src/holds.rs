//! Holds (`engine hold ...`, `/api/v1/holds`): a tenant, or one task of it, that no retention rule
//! deletes until the hold is removed or its `until` passes. Requests are validated whole before
//! anything is written; adding and removing are recorded with who, when and why.

use chrono::{DateTime, NaiveDate, Utc};
use repository::holds::{self, Hold, NewHold};
use repository::{clock, tenants, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldError {
    #[error("no tenant with id or slug {0:?}")]
    UnknownTenant(String),
    #[error("invalid task id {0:?}: a task id is a UUID")]
    InvalidTask(String),
    #[error("tenant {tenant} has no task with id {task}")]
    UnknownTask { tenant: String, task: Uuid },
    #[error("a hold needs a reason: say why (for whoever reads it later)")]
    NoReason,
    #[error("invalid {0}: it contains a NUL character (\\u0000), which PostgreSQL's text cannot hold; allowed: any other text")]
    NulCharacter(&'static str),
    #[error("invalid until {0:?}: allowed: an instant in RFC 3339 (2027-01-31T12:00:00Z) or a date (2027-01-31, midnight UTC)")]
    InvalidUntil(String),
    #[error("until {until} is not in the future (the database's clock says {now}): a hold must end later than now, or never")]
    UntilPassed {
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    },
    #[error("no hold with id {0}")]
    UnknownHold(i64),
    #[error("hold {0} was already removed")]
    AlreadyRemoved(i64),
    #[error("database error: {0}")]
    Database(String),
}

impl From<sqlx::Error> for HoldError {
    fn from(error: sqlx::Error) -> Self {
        HoldError::Database(error.to_string())
    }
}

impl HoldError {
    /// A mistake in the request (as opposed to a database failure).
    pub fn is_bad_request(&self) -> bool {
        !matches!(
            self,
            HoldError::Database(_)
                | HoldError::UnknownTenant(_)
                | HoldError::UnknownTask { .. }
                | HoldError::UnknownHold(_)
        )
    }

    /// Something named does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            HoldError::UnknownTenant(_) | HoldError::UnknownTask { .. } | HoldError::UnknownHold(_)
        )
    }
}

/// A hold as asked for: the tenant's id or slug, optionally one task's id, why, and until when.
#[derive(Debug, Clone, Default)]
pub struct HoldRequest {
    pub tenant: String,
    pub task: Option<String>,
    pub reason: String,
    pub until: Option<String>,
}

/// An instant as the operator writes it: RFC 3339, or a date (its midnight, UTC).
pub fn parse_until(value: &str) -> Result<DateTime<Utc>, HoldError> {
    let text = value.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|day| day.and_hms_opt(0, 0, 0))
        .map(|at| at.and_utc())
        .ok_or_else(|| HoldError::InvalidUntil(value.to_string()))
}

/// Checks what can be checked without the database.
pub fn check(request: &HoldRequest) -> Result<(), HoldError> {
    if request.reason.contains('\0') {
        return Err(HoldError::NulCharacter("reason"));
    }
    if request.reason.trim().is_empty() {
        return Err(HoldError::NoReason);
    }
    if let Some(task) = &request.task {
        Uuid::parse_str(task.trim()).map_err(|_| HoldError::InvalidTask(task.clone()))?;
    }
    if let Some(until) = &request.until {
        parse_until(until)?;
    }
    Ok(())
}

/// Adds a hold for `request`, recorded as added by `by` (`cli`, or the API token's name).
pub async fn add(pool: &PgPool, request: &HoldRequest, by: &str) -> Result<Hold, HoldError> {
    check(request)?;
    let tenant = tenants::find(pool, request.tenant.trim())
        .await?
        .ok_or_else(|| HoldError::UnknownTenant(request.tenant.clone()))?;
    let task = request
        .task
        .as_deref()
        .map(|t| Uuid::parse_str(t.trim()).expect("checked"));
    if let Some(task) = task {
        if !holds::task_exists(pool, tenant.id, task).await? {
            return Err(HoldError::UnknownTask {
                tenant: tenant.slug,
                task,
            });
        }
    }
    let until = request
        .until
        .as_deref()
        .map(|u| parse_until(u).expect("checked"));
    if let Some(until) = until {
        let now = clock::now(pool).await?;
        if until <= now {
            return Err(HoldError::UntilPassed { until, now });
        }
    }
    let hold = holds::add(
        pool,
        &NewHold {
            tenant_id: tenant.id,
            task_id: task,
            reason: request.reason.trim(),
            until,
            created_by: by,
        },
    )
    .await?;
    tracing::info!(hold = hold.id, tenant_id = %hold.tenant_id, task_id = ?hold.task_id, until = ?hold.until, by, reason = %hold.reason, "hold added");
    Ok(hold)
}

/// Holds of the tenant `tenant` (id or slug), or of all; those in force unless `all`.
pub async fn list(pool: &PgPool, tenant: Option<&str>, all: bool) -> Result<Vec<Hold>, HoldError> {
    let tenant_id = match tenant {
        Some(key) => Some(
            tenants::find(pool, key.trim())
                .await?
                .ok_or_else(|| HoldError::UnknownTenant(key.to_string()))?
                .id,
        ),
        None => None,
    };
    Ok(holds::list(pool, tenant_id, all).await?)
}

/// Removes hold `id`, recorded as removed by `by`, with an optional reason.
pub async fn remove(
    pool: &PgPool,
    id: i64,
    by: &str,
    reason: Option<&str>,
) -> Result<Hold, HoldError> {
    if reason.is_some_and(|r| r.contains('\0')) {
        return Err(HoldError::NulCharacter("reason"));
    }
    match holds::remove(
        pool,
        id,
        by,
        reason.map(str::trim).filter(|r| !r.is_empty()),
    )
    .await?
    {
        Some(hold) => {
            tracing::info!(hold = hold.id, tenant_id = %hold.tenant_id, by, "hold removed");
            Ok(hold)
        }
        None => match holds::get(pool, id).await? {
            Some(_) => Err(HoldError::AlreadyRemoved(id)),
            None => Err(HoldError::UnknownHold(id)),
        },
    }
}

/// One line for people.
pub fn describe(hold: &Hold) -> String {
    let scope = hold
        .task_id
        .map_or_else(|| "every task".to_string(), |task| format!("task {task}"));
    let until = hold.until.map_or_else(
        || "until removed".to_string(),
        |u| format!("until {}", u.to_rfc3339()),
    );
    let state = match (&hold.removed_at, hold.active) {
        (Some(at), _) => format!(
            "removed {} by {}{}",
            at.to_rfc3339(),
            hold.removed_by.as_deref().unwrap_or("?"),
            hold.removed_reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        (None, true) => "in force".to_string(),
        (None, false) => "ended".to_string(),
    };
    format!(
        "hold {}: tenant {}, {scope}, {until}; {state}; added {} by {}: {}",
        hold.id,
        hold.tenant_id,
        hold.created_at.to_rfc3339(),
        hold.created_by,
        hold.reason
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_is_an_instant_or_a_date() {
        assert_eq!(
            parse_until("2027-01-31T12:00:00Z").unwrap().to_rfc3339(),
            "2027-01-31T12:00:00+00:00"
        );
        assert_eq!(
            parse_until("2027-01-31").unwrap().to_rfc3339(),
            "2027-01-31T00:00:00+00:00"
        );
        assert_eq!(
            parse_until("next week"),
            Err(HoldError::InvalidUntil("next week".into()))
        );
    }

    #[test]
    fn a_request_without_reason_or_with_a_bad_task_is_refused() {
        let ok = HoldRequest {
            tenant: "acme".into(),
            reason: "litigation".into(),
            ..Default::default()
        };
        assert_eq!(check(&ok), Ok(()));
        assert_eq!(
            check(&HoldRequest {
                reason: "  ".into(),
                ..ok.clone()
            }),
            Err(HoldError::NoReason)
        );
        assert_eq!(
            check(&HoldRequest {
                reason: "a\0b".into(),
                ..ok.clone()
            }),
            Err(HoldError::NulCharacter("reason"))
        );
        assert_eq!(
            check(&HoldRequest {
                task: Some("42".into()),
                ..ok.clone()
            }),
            Err(HoldError::InvalidTask("42".into()))
        );
    }
}
