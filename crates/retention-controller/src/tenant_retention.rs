//! Reading and changing a tenant's run-history retention (`engine tenant retention ...` and
//! `/api/v1/tenants/{id}/retention`). A change applies at the next `task-history` run.

use std::fmt;
use std::time::Duration;

use repository::tenants::{self, Tenant};
use repository::PgPool;

pub const MIN_RETENTION: Duration = Duration::from_secs(3600);
/// 100 years as humantime counts them (365.25 days each).
pub const MAX_RETENTION: Duration = Duration::from_secs(3_155_760_000);
pub const ALLOWED: &str =
    "a duration from 1h to 100years, such as \"30days\", \"720h\" or \"1h 30m\", or \"forever\" to keep run history forever";

/// Why a retention value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error("invalid retention {value:?}: {reason}; allowed: {ALLOWED}")]
    Invalid { value: String, reason: String },
    #[error("no tenant with id or slug {0:?}")]
    UnknownTenant(String),
    #[error("database error: {0}")]
    Database(String),
}

impl From<sqlx::Error> for RetentionError {
    fn from(error: sqlx::Error) -> Self {
        RetentionError::Database(error.to_string())
    }
}

/// A retention period as the operator writes it: `None` is forever.
pub fn parse(value: &str) -> Result<Option<Duration>, RetentionError> {
    let text = value.trim();
    let invalid = |reason: &str| RetentionError::Invalid { value: value.to_string(), reason: reason.to_string() };
    if text.eq_ignore_ascii_case("forever") {
        return Ok(None);
    }
    if text.is_empty() {
        return Err(invalid("it is empty"));
    }
    if text.starts_with('-') {
        return Err(invalid("it is negative"));
    }
    let duration = humantime::parse_duration(text).map_err(|e| invalid(&format!("not a duration ({e})")))?;
    if duration.is_zero() {
        Err(invalid("it is zero"))
    } else if duration < MIN_RETENTION {
        Err(invalid("it is below 1 hour"))
    } else if duration > MAX_RETENTION {
        Err(invalid("it is above 100 years"))
    } else {
        Ok(Some(duration))
    }
}

/// A retention period as the engine shows it: humantime, or `forever`.
pub fn describe(retention: Option<Duration>) -> String {
    match retention {
        Some(duration) => humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string(),
        None => "forever".to_string(),
    }
}

/// The tenant whose id or slug is `key`.
pub async fn get(pool: &PgPool, key: &str) -> Result<Tenant, RetentionError> {
    tenants::find(pool, key).await?.ok_or_else(|| RetentionError::UnknownTenant(key.to_string()))
}

/// A change made by [`set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub before: Option<Duration>,
    pub tenant: Tenant,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tenant {} ({}): data_retention_period {} -> {} (applies at the next task-history run)",
            self.tenant.slug,
            self.tenant.id,
            describe(self.before),
            describe(self.tenant.retention)
        )
    }
}

/// Validates `value` first, then sets the retention of the tenant whose id or slug is `key`.
/// Nothing changes unless both are valid.
pub async fn set(pool: &PgPool, key: &str, value: &str) -> Result<Change, RetentionError> {
    let retention = parse(value)?;
    let tenant = get(pool, key).await?;
    let updated = tenants::set_retention(pool, tenant.id, retention)
        .await?
        .ok_or_else(|| RetentionError::UnknownTenant(key.to_string()))?;
    tracing::info!(tenant_id = %updated.id, slug = %updated.slug, before = %describe(tenant.retention), after = %describe(updated.retention), "tenant retention changed");
    Ok(Change { before: tenant.retention, tenant: updated })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(value: &str) -> String {
        match parse(value) {
            Err(RetentionError::Invalid { reason, .. }) => reason,
            other => panic!("{value:?} was accepted: {other:?}"),
        }
    }

    #[test]
    fn accepts_durations_within_bounds_and_forever() {
        assert_eq!(parse("forever").unwrap(), None);
        assert_eq!(parse("FOREVER").unwrap(), None);
        assert_eq!(parse("1h").unwrap(), Some(MIN_RETENTION));
        assert_eq!(parse("30days").unwrap(), Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse(" 720h ").unwrap(), Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse("1h 30m").unwrap(), Some(Duration::from_secs(5400)));
        assert_eq!(parse("100years").unwrap(), Some(MAX_RETENTION));
    }

    #[test]
    fn refuses_each_kind_of_bad_value_with_its_reason() {
        assert_eq!(reason("soon"), "not a duration (expected number at 0)");
        assert_eq!(reason(""), "it is empty");
        assert_eq!(reason("0s"), "it is zero");
        assert_eq!(reason("-5h"), "it is negative");
        assert_eq!(reason("59m"), "it is below 1 hour");
        assert_eq!(reason("101years"), "it is above 100 years");
        let message = parse("59m").unwrap_err().to_string();
        assert!(message.starts_with("invalid retention \"59m\": it is below 1 hour; allowed: a duration from 1h to 100years"), "{message}");
    }

    #[test]
    fn describes_whole_seconds_or_forever() {
        assert_eq!(describe(None), "forever");
        assert_eq!(describe(Some(Duration::from_secs(30 * 86_400))), "30days");
        assert_eq!(describe(Some(Duration::from_millis(3_600_500))), "1h");
    }
}
