//! `engine tenant retention get|set`.

use std::process::ExitCode;

use retention_controller::tenant_retention::{self, RetentionError};

use crate::cli::TenantRetentionCommand;
use crate::database::Database;
use crate::settings::Settings;

pub async fn retention(settings: &Settings, command: TenantRetentionCommand) -> anyhow::Result<ExitCode> {
    // Refuse a bad value before touching (or starting) any database.
    if let TenantRetentionCommand::Set { retention, .. } = &command {
        if let Err(error) = tenant_retention::parse(retention) {
            eprintln!("error: {error}");
            return Ok(ExitCode::from(2));
        }
    }
    let db = Database::open(settings, settings.database.migrate).await?;
    let result = match &command {
        TenantRetentionCommand::Get { tenant } => tenant_retention::get(&db.pool, tenant).await.map(|t| {
            let deleted = t.deleted_at.map(|at| format!(" [deleted at {at}]")).unwrap_or_default();
            format!(
                "tenant {} ({}): data_retention_period = {}{deleted}",
                t.slug,
                t.id,
                tenant_retention::describe(t.retention)
            )
        }),
        TenantRetentionCommand::Set { tenant, retention } => {
            tenant_retention::set(&db.pool, tenant, retention).await.map(|change| change.to_string())
        }
    };
    db.close().await;
    match result {
        Ok(line) => {
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
        Err(error @ (RetentionError::Invalid { .. } | RetentionError::UnknownTenant(_))) => {
            eprintln!("error: {error}");
            Ok(ExitCode::from(2))
        }
        Err(error) => Err(error.into()),
    }
}
