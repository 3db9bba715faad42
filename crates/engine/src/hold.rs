//! `engine hold add|list|remove`, and the JSON shape of holds and receipts.

use std::process::ExitCode;

use repository::holds::Hold;
use repository::receipts::Receipt;
use retention_controller::holds::{self, HoldError, HoldRequest};
use retention_controller::human::thousands;
use serde_json::{json, Value};

use crate::cli::HoldCommand;
use crate::database::Database;
use crate::output;
use crate::settings::Settings;

/// Who the CLI records as adding or removing a hold.
const CLI: &str = "cli";

pub async fn hold(settings: &Settings, command: HoldCommand) -> anyhow::Result<ExitCode> {
    // Refuse what can be refused before touching (or starting) any database.
    if let HoldCommand::Add {
        tenant,
        task,
        reason,
        until,
    } = &command
    {
        let request = HoldRequest {
            tenant: tenant.clone(),
            task: task.clone(),
            reason: reason.clone(),
            until: until.clone(),
        };
        if let Err(error) = holds::check(&request) {
            eprintln!("error: {error}");
            return Ok(ExitCode::from(2));
        }
    }
    let db = Database::open(settings, settings.database.migrate).await?;
    let result = match command {
        HoldCommand::Add {
            tenant,
            task,
            reason,
            until,
        } => holds::add(
            &db.pool,
            &HoldRequest {
                tenant,
                task,
                reason,
                until,
            },
            CLI,
        )
        .await
        .map(|h| holds::describe(&h)),
        HoldCommand::List { tenant, all, json } => holds::list(&db.pool, tenant.as_deref(), all)
            .await
            .map(|list| {
                let lines: Vec<String> = list
                    .iter()
                    .map(|h| {
                        if json {
                            hold_json(h).to_string()
                        } else {
                            holds::describe(h)
                        }
                    })
                    .collect();
                if lines.is_empty() && !json {
                    "no holds".to_string()
                } else {
                    lines.join("\n")
                }
            }),
        HoldCommand::Remove { id, reason } => holds::remove(&db.pool, id, CLI, reason.as_deref())
            .await
            .map(|h| holds::describe(&h)),
    };
    db.close().await;
    match result {
        Ok(text) => {
            if !text.is_empty() {
                output::line(text)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(HoldError::Database(message)) => Err(anyhow::anyhow!("database error: {message}")),
        Err(error) => {
            eprintln!("error: {error}");
            Ok(ExitCode::from(2))
        }
    }
}

pub fn hold_json(hold: &Hold) -> Value {
    json!({
        "id": hold.id,
        "tenant_id": hold.tenant_id,
        "task_id": hold.task_id,
        "reason": hold.reason,
        "until": hold.until.map(|at| at.to_rfc3339()),
        "active": hold.active,
        "created_by": hold.created_by,
        "created_at": hold.created_at.to_rfc3339(),
        "removed_by": hold.removed_by,
        "removed_at": hold.removed_at.map(|at| at.to_rfc3339()),
        "removed_reason": hold.removed_reason,
    })
}

pub fn receipt_json(receipt: &Receipt) -> Value {
    json!({
        "run_id": receipt.run_id,
        "tenant_id": receipt.tenant_id,
        "slug": receipt.slug,
        "task": receipt.task,
        "rule": receipt.rule,
        "tasks": receipt.tasks,
        "events": receipt.events,
        "queue_items": receipt.queue_items,
        "oldest": receipt.oldest.map(|at| at.to_rfc3339()),
        "newest": receipt.newest.map(|at| at.to_rfc3339()),
        "first_at": receipt.first_at.to_rfc3339(),
        "last_at": receipt.last_at.to_rfc3339(),
    })
}

/// One receipt in a line for people.
pub fn describe_receipt(r: &Receipt) -> String {
    let span = match (r.oldest, r.newest) {
        (Some(oldest), Some(newest)) => {
            format!(", from {} to {}", oldest.to_rfc3339(), newest.to_rfc3339())
        }
        _ => String::new(),
    };
    format!(
        "{} run {} tenant {} ({}): {} by {}: {} tasks, {} events, {} queue items{span}",
        r.first_at.to_rfc3339(),
        r.run_id,
        r.slug.as_deref().unwrap_or("-"),
        r.tenant_id,
        r.task,
        r.rule,
        thousands(r.tasks.max(0) as u64),
        thousands(r.events.max(0) as u64),
        thousands(r.queue_items.max(0) as u64)
    )
}
