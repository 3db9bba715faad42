//! `engine tenant retention get|set`.

use std::process::ExitCode;

use repository::tenants::{FinalStatus, Tenant};
use retention_controller::tenant_retention::{self, RetentionError, Setting};

use crate::cli::TenantRetentionCommand;
use crate::database::Database;
use crate::output;
use crate::settings::Settings;

pub async fn retention(
    settings: &Settings,
    command: TenantRetentionCommand,
) -> anyhow::Result<ExitCode> {
    // The log lines' window: a path of its own.
    if let TenantRetentionCommand::Set {
        tenant,
        retention,
        logs: true,
        dry_run,
        ..
    } = &command
    {
        let window = match tenant_retention::parse_log_window(retention) {
            Ok(window) => window,
            Err(error) => {
                eprintln!("error: {error}");
                return Ok(ExitCode::from(2));
            }
        };
        let db = Database::open(settings, settings.database.migrate).await?;
        let result = if *dry_run {
            tenant_retention::preview_log_window(
                &db.pool,
                tenant,
                window,
                settings.retention.task_logs.max_age,
            )
            .await
        } else {
            tenant_retention::set_log_window(&db.pool, tenant, window)
                .await
                .map(|change| change.to_string())
        };
        db.close().await;
        return finish(result);
    }
    // Refuse a bad value before touching (or starting) any database.
    let setting = match &command {
        TenantRetentionCommand::Set {
            retention, status, ..
        } => {
            match status
                .as_deref()
                .map(tenant_retention::parse_status)
                .transpose()
                .and_then(|s| Setting::parse(s, retention))
            {
                Ok(setting) => Some(setting),
                Err(error) => {
                    eprintln!("error: {error}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
        TenantRetentionCommand::Get { .. } => None,
    };
    let db = Database::open(settings, settings.database.migrate).await?;
    let limits: tenant_retention::PreviewLimits = (&settings.retention.task_history).into();
    let result = match (&command, setting) {
        (TenantRetentionCommand::Get { tenant, json }, _) => {
            tenant_retention::get(&db.pool, tenant).await.map(|t| {
                if *json {
                    serde_json::to_string(&body(&t)).expect("serializable")
                } else {
                    let deleted = t
                        .deleted_at
                        .map(|at| format!(" [deleted at {at}]"))
                        .unwrap_or_default();
                    format!(
                        "tenant {} ({}): {}{deleted}",
                        t.slug,
                        t.id,
                        tenant_retention::windows(&t)
                    )
                }
            })
        }
        (
            TenantRetentionCommand::Set {
                tenant,
                dry_run: true,
                ..
            },
            Some(setting),
        ) => tenant_retention::preview(&db.pool, tenant, &[setting], limits)
            .await
            .map(|preview| preview.to_string()),
        (TenantRetentionCommand::Set { tenant, .. }, Some(setting)) => {
            tenant_retention::set(&db.pool, tenant, &[setting])
                .await
                .map(|change| change.to_string())
        }
        (TenantRetentionCommand::Set { .. }, None) => unreachable!("parsed above"),
    };
    db.close().await;
    finish(result)
}

/// Prints the outcome: a line, or the error (exit 2 for bad input).
fn finish(result: Result<String, RetentionError>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(line) => {
            output::line(line)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(
            error @ (RetentionError::Invalid { .. }
            | RetentionError::InvalidStatus(_)
            | RetentionError::InvalidLogWindow { .. }
            | RetentionError::UnknownTenant(_)),
        ) => {
            eprintln!("error: {error}");
            Ok(ExitCode::from(2))
        }
        Err(error) => Err(error.into()),
    }
}

/// A tenant's windows as the CLI's `--json` and the API show them: the default, each status's own
/// window, and the window each status gets in effect. Fields in alphabetical order, as the JSON
/// has always had them.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantRetention {
    /// The statuses with a window of their own (the others follow `data_retention_period`).
    pub by_status: StatusWindows,
    /// The default window of finished run history. A duration, or "forever".
    #[schema(examples("30days", "forever"))]
    pub data_retention_period: String,
    /// When the tenant was deleted (RFC 3339), or null.
    #[schema(required = true, format = DateTime)]
    pub deleted_at: Option<String>,
    /// The window each final status gets in effect.
    pub effective: EffectiveWindows,
    /// The log lines' window: a duration, "forever", or "default" (`retention.task_logs.max_age`).
    #[schema(examples("default", "14days", "forever"))]
    pub log_retention_period: String,
    /// `data_retention_period` in seconds; null for forever.
    #[schema(required = true, minimum = 3600)]
    pub seconds: Option<u64>,
    pub slug: String,
    pub tenant_id: uuid::Uuid,
}

/// The statuses with a window of their own (a status not named follows
/// `data_retention_period`). Each window: a duration as the engine writes it (humantime:
/// "30days", "1day 12h"), or "forever".
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusWindows {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub cancelled: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub failed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub succeeded: Option<String>,
}

/// The window each final status gets in effect: its own, else `data_retention_period`. Each
/// window: a duration as the engine writes it (humantime: "30days", "1day 12h"), or "forever".
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EffectiveWindows {
    pub cancelled: String,
    pub failed: String,
    pub succeeded: String,
}

pub fn body(tenant: &Tenant) -> TenantRetention {
    let mut by_status = StatusWindows::default();
    for (status, window) in &tenant.by_status {
        let shown = Some(tenant_retention::describe(*window));
        match status {
            FinalStatus::Succeeded => by_status.succeeded = shown,
            FinalStatus::Failed => by_status.failed = shown,
            FinalStatus::Cancelled => by_status.cancelled = shown,
        }
    }
    let effective = |status| tenant_retention::describe(tenant.window(status));
    TenantRetention {
        by_status,
        data_retention_period: tenant_retention::describe(tenant.retention),
        deleted_at: tenant.deleted_at.map(|at| at.to_rfc3339()),
        effective: EffectiveWindows {
            cancelled: effective(FinalStatus::Cancelled),
            failed: effective(FinalStatus::Failed),
            succeeded: effective(FinalStatus::Succeeded),
        },
        log_retention_period: tenant_retention::describe_logs(tenant.log_retention),
        seconds: tenant.retention.map(|d| d.as_secs()),
        slug: tenant.slug.clone(),
        tenant_id: tenant.id,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use repository::tenants::{FinalStatus, Tenant};
    use retention_controller::tenant_retention;
    use serde_json::{json, Value};

    /// The body as it was built before it had a type: the wire format to keep.
    fn as_it_was(tenant: &Tenant) -> String {
        let by_status: serde_json::Map<String, Value> = tenant
            .by_status
            .iter()
            .map(|(status, window)| {
                (
                    status.as_str().to_string(),
                    json!(tenant_retention::describe(*window)),
                )
            })
            .collect();
        let effective: serde_json::Map<String, Value> = FinalStatus::ALL
            .iter()
            .map(|status| {
                (
                    status.as_str().to_string(),
                    json!(tenant_retention::describe(tenant.window(*status))),
                )
            })
            .collect();
        json!({
            "tenant_id": tenant.id,
            "slug": tenant.slug,
            "data_retention_period": tenant_retention::describe(tenant.retention),
            "seconds": tenant.retention.map(|d| d.as_secs()),
            "by_status": by_status,
            "effective": effective,
            "log_retention_period": tenant_retention::describe_logs(tenant.log_retention),
            "deleted_at": tenant.deleted_at.map(|at| at.to_rfc3339()),
        })
        .to_string()
    }

    #[test]
    fn the_body_is_byte_for_byte_what_it_was() {
        let day = Duration::from_secs(86_400);
        let plain = Tenant {
            id: uuid::Uuid::new_v4(),
            slug: "acme".into(),
            name: "Acme".into(),
            retention: Some(30 * day),
            by_status: vec![],
            log_retention: None,
            deleted_at: None,
        };
        let every = Tenant {
            retention: None,
            by_status: vec![
                (
                    FinalStatus::Succeeded,
                    Some(day + Duration::from_secs(3600)),
                ),
                (FinalStatus::Failed, None),
                (FinalStatus::Cancelled, Some(7 * day)),
            ],
            log_retention: Some(Some(14 * day)),
            deleted_at: Some(chrono::Utc::now()),
            ..plain.clone()
        };
        let forever_logs = Tenant {
            by_status: vec![(FinalStatus::Failed, Some(90 * day))],
            log_retention: Some(None),
            ..plain.clone()
        };
        for tenant in [plain, every, forever_logs] {
            assert_eq!(
                serde_json::to_string(&super::body(&tenant)).unwrap(),
                as_it_was(&tenant)
            );
        }
    }
}
