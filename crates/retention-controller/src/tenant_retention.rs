//! Reading and changing a tenant's run-history retention (`engine tenant retention ...` and
//! `/api/v1/tenants/{id}/retention`): the default window (`data_retention_period`) and a window per
//! final status. A change applies at the next `task-history` run; a preview shows what it would
//! delete, changing nothing.

use std::fmt;
use std::time::Duration;

use repository::tenants::{self, FinalStatus, StatusWindow, Tenant};
use repository::PgPool;

use crate::human::thousands;

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
    #[error("invalid status {0:?}: allowed: succeeded, failed, cancelled")]
    InvalidStatus(String),
    #[error("invalid log window {value:?}: {reason}; allowed: {LOG_ALLOWED}")]
    InvalidLogWindow { value: String, reason: String },
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
    let invalid = |reason: &str| RetentionError::Invalid {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    if text.eq_ignore_ascii_case("forever") {
        return Ok(None);
    }
    if text.is_empty() {
        return Err(invalid("it is empty"));
    }
    if text.starts_with('-') {
        return Err(invalid("it is negative"));
    }
    let duration =
        humantime::parse_duration(text).map_err(|e| invalid(&format!("not a duration ({e})")))?;
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
        Some(duration) => {
            humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
        }
        None => "forever".to_string(),
    }
}

/// A final status as the operator writes it (`--status`, the API's `by_status` keys).
pub fn parse_status(value: &str) -> Result<FinalStatus, RetentionError> {
    FinalStatus::parse(value.trim()).ok_or_else(|| RetentionError::InvalidStatus(value.to_string()))
}

/// The tenant whose id or slug is `key`.
pub async fn get(pool: &PgPool, key: &str) -> Result<Tenant, RetentionError> {
    tenants::find(pool, key)
        .await?
        .ok_or_else(|| RetentionError::UnknownTenant(key.to_string()))
}

/// One change of a tenant's windows: the default (`status` `None`), or one status's window
/// (`Own`, or back to the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub status: Option<FinalStatus>,
    pub window: StatusWindow,
}

impl Setting {
    /// Parses `value` (a duration or `forever`; for a status also `default`) for `status`.
    pub fn parse(status: Option<FinalStatus>, value: &str) -> Result<Setting, RetentionError> {
        if value.trim().eq_ignore_ascii_case("default") {
            if status.is_none() {
                return Err(RetentionError::Invalid {
                    value: value.to_string(),
                    reason: "only a status's window can go back to the default (give --status, or by_status in the API)".into(),
                });
            }
            return Ok(Setting {
                status,
                window: StatusWindow::Default,
            });
        }
        Ok(Setting {
            status,
            window: StatusWindow::Own(parse(value)?),
        })
    }
}

/// A change made by [`set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub before: Tenant,
    pub tenant: Tenant,
}

impl fmt::Display for Change {
    /// `tenant acme (id): data_retention_period 30days -> 7days, failed default -> 90days (...)`:
    /// what changed (a status's `default` is its following `data_retention_period`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let own = |t: &Tenant, status: FinalStatus| {
            t.by_status
                .iter()
                .find(|(s, _)| *s == status)
                .map_or_else(|| "default".to_string(), |(_, w)| describe(*w))
        };
        let mut changes = Vec::new();
        let logs_changed = self.before.log_retention != self.tenant.log_retention;
        if self.before.retention != self.tenant.retention
            || (self.before.by_status == self.tenant.by_status && !logs_changed)
        {
            changes.push(format!(
                "data_retention_period {} -> {}",
                describe(self.before.retention),
                describe(self.tenant.retention)
            ));
        }
        for status in FinalStatus::ALL {
            let (before, after) = (own(&self.before, status), own(&self.tenant, status));
            if before != after {
                changes.push(format!("{} {before} -> {after}", status.as_str()));
            }
        }
        if logs_changed {
            changes.push(format!(
                "log_retention_period {} -> {}",
                describe_logs(self.before.log_retention),
                describe_logs(self.tenant.log_retention)
            ));
        }
        write!(
            f,
            "tenant {} ({}): {} (applies at the next task-history run)",
            self.tenant.slug,
            self.tenant.id,
            changes.join(", ")
        )
    }
}

/// A tenant's windows in one line: `data_retention_period = 7days, failed = 30days,
/// log_retention_period = default`.
pub fn windows(tenant: &Tenant) -> String {
    let mut text = format!("data_retention_period = {}", describe(tenant.retention));
    for (status, window) in &tenant.by_status {
        text.push_str(&format!(", {} = {}", status.as_str(), describe(*window)));
    }
    text.push_str(&format!(
        ", log_retention_period = {}",
        describe_logs(tenant.log_retention)
    ));
    text
}

/// The log lines' window as the engine shows it: `default` (`retention.task_logs.max_age`), a
/// duration, or `forever`.
pub fn describe_logs(window: Option<Option<Duration>>) -> String {
    window.map_or_else(|| "default".to_string(), describe)
}

/// The log window least and most (as for run history, from 1 minute: log lines are cheap to
/// lose and costly to keep).
pub const MIN_LOG_RETENTION: Duration = Duration::from_secs(60);
pub const LOG_ALLOWED: &str =
    "a duration from 1m to 100years, such as \"14days\", \"forever\", or \"default\" (retention.task_logs.max_age)";

/// Parses a tenant's log window: `default` (`None`), `forever` (`Some(None)`) or a duration.
pub fn parse_log_window(value: &str) -> Result<Option<Option<Duration>>, RetentionError> {
    let text = value.trim();
    let invalid = |reason: &str| RetentionError::InvalidLogWindow {
        value: value.to_string(),
        reason: reason.to_string(),
    };
    if text.eq_ignore_ascii_case("default") {
        return Ok(None);
    }
    if text.eq_ignore_ascii_case("forever") {
        return Ok(Some(None));
    }
    if text.is_empty() {
        return Err(invalid("it is empty"));
    }
    if text.starts_with('-') {
        return Err(invalid("it is negative"));
    }
    let duration =
        humantime::parse_duration(text).map_err(|e| invalid(&format!("not a duration ({e})")))?;
    if duration < MIN_LOG_RETENTION {
        Err(invalid("it is below 1 minute"))
    } else if duration > MAX_RETENTION {
        Err(invalid("it is above 100 years"))
    } else {
        Ok(Some(Some(duration)))
    }
}

/// Sets the log window of the tenant whose id or slug is `key`.
pub async fn set_log_window(
    pool: &PgPool,
    key: &str,
    window: Option<Option<Duration>>,
) -> Result<Change, RetentionError> {
    let before = get(pool, key).await?;
    let updated = tenants::set_log_retention(pool, before.id, window)
        .await?
        .ok_or_else(|| RetentionError::UnknownTenant(key.to_string()))?;
    tracing::info!(tenant_id = %updated.id, slug = %updated.slug, before = %windows(&before), after = %windows(&updated), "tenant log window changed");
    Ok(Change {
        before,
        tenant: updated,
    })
}

/// The log lines of the tenant whose id or slug is `key` that the next run would delete under
/// the log window `window` (`default_window` standing for `default`), holds considered.
pub async fn preview_log_window(
    pool: &PgPool,
    key: &str,
    window: Option<Option<Duration>>,
    default_window: Duration,
) -> Result<String, RetentionError> {
    let tenant = get(pool, key).await?;
    let now = repository::clock::now(pool).await?;
    let effective = match window {
        None => Some(default_window),
        Some(own) => own,
    };
    let due = match effective {
        None => 0,
        Some(window) => {
            repository::payloads::count_due_logs(
                pool,
                tenant.id,
                window,
                &repository::rule::Rule::new(now, Duration::ZERO),
            )
            .await?
        }
    };
    Ok(format!(
        "tenant {} ({}): log_retention_period {} -> {} would delete {} log lines at the next task-history run (dry run: nothing changed)",
        tenant.slug,
        tenant.id,
        describe_logs(tenant.log_retention),
        describe_logs(window),
        thousands(due as u64)
    ))
}

/// Applies `settings` to the tenant `tenant_id` in the caller's transaction.
async fn apply(
    conn: &mut sqlx::PgConnection,
    tenant_id: uuid::Uuid,
    settings: &[Setting],
) -> Result<Tenant, RetentionError> {
    let mut updated = None;
    for setting in settings {
        updated = match setting.status {
            None => match setting.window {
                StatusWindow::Own(window) => {
                    tenants::set_retention(&mut *conn, tenant_id, window).await?
                }
                StatusWindow::Default => {
                    return Err(RetentionError::Invalid {
                        value: "default".into(),
                        reason: "only a status's window can go back to the default".into(),
                    })
                }
            },
            Some(status) => {
                tenants::set_status_retention(&mut *conn, tenant_id, status, setting.window).await?
            }
        };
    }
    updated.ok_or_else(|| RetentionError::UnknownTenant(tenant_id.to_string()))
}

/// Sets the windows of the tenant whose id or slug is `key`: every setting is validated before
/// this is called, and all apply in one transaction, or none.
pub async fn set(pool: &PgPool, key: &str, settings: &[Setting]) -> Result<Change, RetentionError> {
    let before = get(pool, key).await?;
    let mut tx = pool.begin().await?;
    let updated = apply(&mut tx, before.id, settings).await?;
    tx.commit().await?;
    tracing::info!(tenant_id = %updated.id, slug = %updated.slug, before = %windows(&before), after = %windows(&updated), "tenant retention changed");
    Ok(Change {
        before,
        tenant: updated,
    })
}

/// What the next run would delete of a tenant under new settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub before: Tenant,
    pub after: Tenant,
    /// Tasks per final status (and `queued`/`running` of a deleted tenant), in status order.
    pub tasks: Vec<(String, i64)>,
    pub events: i64,
}

impl fmt::Display for Preview {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: i64 = self.tasks.iter().map(|(_, n)| n).sum();
        let n = |n: i64| thousands(n.max(0) as u64);
        let by_status: Vec<String> = self
            .tasks
            .iter()
            .map(|(status, count)| format!("{status} {}", n(*count)))
            .collect();
        write!(
            f,
            "dry run, nothing changed: tenant {} ({}) with {}: the next task-history run would delete {} tasks ({}) and {} events",
            self.after.slug,
            self.after.id,
            windows(&self.after),
            n(total),
            if by_status.is_empty() { "none".to_string() } else { by_status.join(", ") },
            n(self.events)
        )
    }
}

/// How previews count: the deleted tenants' grace and the statements' timeout of `task-history`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviewLimits {
    pub grace: Duration,
    pub statement_timeout: Duration,
}

impl From<&crate::settings::TaskHistorySettings> for PreviewLimits {
    fn from(settings: &crate::settings::TaskHistorySettings) -> Self {
        PreviewLimits {
            grace: settings.deleted_tenant_grace,
            statement_timeout: settings.statement_timeout,
        }
    }
}

/// `tenant` with `settings` applied, as [`set`] would leave it.
fn with_settings(tenant: &Tenant, settings: &[Setting]) -> Tenant {
    let mut after = tenant.clone();
    for setting in settings {
        match (setting.status, setting.window) {
            (None, StatusWindow::Own(window)) => after.retention = window,
            (None, StatusWindow::Default) => {}
            (Some(status), StatusWindow::Own(window)) => {
                after.by_status.retain(|(s, _)| *s != status);
                after.by_status.push((status, window));
                after.by_status.sort_by_key(|(s, _)| *s);
            }
            (Some(status), StatusWindow::Default) => after.by_status.retain(|(s, _)| *s != status),
        }
    }
    after
}

/// The rule's view of a tenant under `settings`: the windows they change, as stored.
fn proposed(
    tenant_id: uuid::Uuid,
    settings: &[Setting],
) -> repository::history::previews::ProposedRules {
    let stored = |window: Option<Duration>| window.map(repository::rule::interval);
    let mut proposed = repository::history::previews::ProposedRules {
        tenant_id,
        ..Default::default()
    };
    for setting in settings {
        let value = match setting.window {
            StatusWindow::Own(window) => match setting.status {
                None => stored(window),
                // A status's "forever" is stored as 1000 years.
                Some(_) => Some(window.map_or(
                    sqlx::postgres::types::PgInterval {
                        months: 12_000,
                        days: 0,
                        microseconds: 0,
                    },
                    repository::rule::interval,
                )),
            },
            StatusWindow::Default => None,
        };
        let column = match setting.status {
            None => &mut proposed.data_retention_period,
            Some(FinalStatus::Succeeded) => &mut proposed.succeeded_retention_period,
            Some(FinalStatus::Failed) => &mut proposed.failed_retention_period,
            Some(FinalStatus::Cancelled) => &mut proposed.cancelled_retention_period,
        };
        *column = Some(value);
    }
    proposed
}

/// What the next `task-history` run would delete of the tenant `key` under `settings`, by the
/// rule itself, changing nothing: the proposed windows go into the counting statements in place
/// of the tenant's, which only read (one snapshot, each statement under `limits`'
/// `statement_timeout`). Every setting is validated before this is called.
pub async fn preview(
    pool: &PgPool,
    key: &str,
    settings: &[Setting],
    limits: PreviewLimits,
) -> Result<Preview, RetentionError> {
    let before = get(pool, key).await?;
    if settings
        .iter()
        .any(|s| s.status.is_none() && s.window == StatusWindow::Default)
    {
        return Err(RetentionError::Invalid {
            value: "default".into(),
            reason: "only a status's window can go back to the default".into(),
        });
    }
    let after = with_settings(&before, settings);
    let rule = repository::rule::Rule::new(repository::clock::now(pool).await?, limits.grace);
    let due = repository::history::previews::tenant(
        pool,
        &proposed(before.id, settings),
        &rule,
        limits.statement_timeout,
    )
    .await?;
    Ok(Preview {
        before,
        after,
        tasks: due.tasks,
        events: due.events,
    })
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
        assert_eq!(
            parse("30days").unwrap(),
            Some(Duration::from_secs(30 * 86_400))
        );
        assert_eq!(
            parse(" 720h ").unwrap(),
            Some(Duration::from_secs(30 * 86_400))
        );
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
