//! `engine tenant retention get|set`.

use std::process::ExitCode;

use repository::tenants::Tenant;
use retention_controller::tenant_retention::{self, RetentionError, Setting};
use serde_json::{json, Value};

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
                    body(&t).to_string()
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
/// window (`null`: forever), and the window each status gets in effect.
pub fn body(tenant: &Tenant) -> Value {
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
    let effective: serde_json::Map<String, Value> = repository::tenants::FinalStatus::ALL
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
}
