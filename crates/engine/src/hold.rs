//! `engine hold add|list|remove`, and the JSON shape of holds and receipts.

use std::process::ExitCode;

use repository::holds::Hold;
use repository::receipts::Receipt;
use retention_controller::holds::{self, HoldError, HoldRequest};
use retention_controller::human::thousands;

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
                            serde_json::to_string(&hold_json(h)).expect("serializable")
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

/// A hold as the CLI's `--json` and the API show it. Fields in alphabetical order, as the JSON
/// has always had them.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Hold)]
pub struct HoldJson {
    /// In force now: not removed, and its `until` (if any) not passed.
    pub active: bool,
    /// RFC 3339.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Who added it: `cli`, or the API token's name (`http.admin_token_name`).
    pub created_by: String,
    pub id: i64,
    pub reason: String,
    /// When it was removed (RFC 3339), or null.
    #[schema(required = true, format = DateTime)]
    pub removed_at: Option<String>,
    #[schema(required = true)]
    pub removed_by: Option<String>,
    #[schema(required = true)]
    pub removed_reason: Option<String>,
    /// The one task held, or null: every task of the tenant.
    #[schema(required = true)]
    pub task_id: Option<uuid::Uuid>,
    pub tenant_id: uuid::Uuid,
    /// When it ends by itself (RFC 3339), or null: when removed.
    #[schema(required = true, format = DateTime)]
    pub until: Option<String>,
}

pub fn hold_json(hold: &Hold) -> HoldJson {
    HoldJson {
        active: hold.active,
        created_at: hold.created_at.to_rfc3339(),
        created_by: hold.created_by.clone(),
        id: hold.id,
        reason: hold.reason.clone(),
        removed_at: hold.removed_at.map(|at| at.to_rfc3339()),
        removed_by: hold.removed_by.clone(),
        removed_reason: hold.removed_reason.clone(),
        task_id: hold.task_id,
        tenant_id: hold.tenant_id,
        until: hold.until.map(|at| at.to_rfc3339()),
    }
}

/// What one run deleted for one tenant under one rule, as the CLI's `--json` and the API show
/// it. Fields in alphabetical order, as the JSON has always had them.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Receipt)]
pub struct ReceiptJson {
    /// The archive files the receipt names: written by the run (rule `archived`: what went into
    /// them, not a deletion), or expired and given to the outbox (rule `archive-expired`).
    pub archive_keys: Vec<String>,
    pub events: i64,
    /// When the run first deleted under this receipt (RFC 3339).
    #[schema(format = DateTime)]
    pub first_at: String,
    /// When the run last deleted under this receipt (RFC 3339).
    #[schema(format = DateTime)]
    pub last_at: String,
    /// Log lines that went with the tasks (or by the log window).
    pub logs: i64,
    /// The latest instant the rule counted from among the rows deleted (RFC 3339), or null.
    #[schema(required = true, format = DateTime)]
    pub newest: Option<String>,
    /// Stored objects given to the outbox (external payloads, expired archive files).
    pub objects: i64,
    /// The earliest instant the rule counted from among the rows deleted (RFC 3339), or null.
    #[schema(required = true, format = DateTime)]
    pub oldest: Option<String>,
    /// Payload rows that went with the tasks.
    pub payloads: i64,
    pub queue_items: i64,
    pub rule: String,
    pub run_id: uuid::Uuid,
    /// The tenant's slug, or null once the tenant has no row.
    #[schema(required = true)]
    pub slug: Option<String>,
    /// The retention task that deleted (`task-history`, ...).
    pub task: String,
    pub tasks: i64,
    pub tenant_id: uuid::Uuid,
}

pub fn receipt_json(receipt: &Receipt) -> ReceiptJson {
    ReceiptJson {
        archive_keys: receipt.archive_keys.clone(),
        events: receipt.events,
        first_at: receipt.first_at.to_rfc3339(),
        last_at: receipt.last_at.to_rfc3339(),
        logs: receipt.logs,
        newest: receipt.newest.map(|at| at.to_rfc3339()),
        objects: receipt.objects,
        oldest: receipt.oldest.map(|at| at.to_rfc3339()),
        payloads: receipt.payloads,
        queue_items: receipt.queue_items,
        rule: receipt.rule.clone(),
        run_id: receipt.run_id,
        slug: receipt.slug.clone(),
        task: receipt.task.clone(),
        tasks: receipt.tasks,
        tenant_id: receipt.tenant_id,
    }
}

/// One receipt in a line for people.
pub fn describe_receipt(r: &Receipt) -> String {
    let span = match (r.oldest, r.newest) {
        (Some(oldest), Some(newest)) => {
            format!(", from {} to {}", oldest.to_rfc3339(), newest.to_rfc3339())
        }
        _ => String::new(),
    };
    let files = if r.archive_keys.is_empty() {
        String::new()
    } else {
        format!(", archive files {}", r.archive_keys.join(" "))
    };
    format!(
        "{} run {} tenant {} ({}): {} by {}: {} tasks, {} events, {} queue items{span}{files}",
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

#[cfg(test)]
mod tests {
    use chrono::{Duration, Utc};
    use repository::holds::Hold;
    use repository::receipts::Receipt;
    use serde_json::json;

    #[test]
    fn holds_and_receipts_are_byte_for_byte_what_they_were_with_the_fields_added_since() {
        let now = Utc::now();
        let open = Hold {
            id: 7,
            tenant_id: uuid::Uuid::new_v4(),
            task_id: None,
            reason: "audit".into(),
            until: None,
            created_by: "cli".into(),
            created_at: now,
            removed_by: None,
            removed_at: None,
            removed_reason: None,
            active: true,
        };
        let removed = Hold {
            task_id: Some(uuid::Uuid::new_v4()),
            until: Some(now + Duration::days(30)),
            removed_by: Some("ops-bot".into()),
            removed_at: Some(now),
            removed_reason: Some("closed \"case\"".into()),
            active: false,
            ..open.clone()
        };
        for hold in [open, removed] {
            // As it was built before it had a type.
            let as_it_was = json!({
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
            });
            assert_eq!(
                serde_json::to_string(&super::hold_json(&hold)).unwrap(),
                as_it_was.to_string()
            );
        }
        let spanned = Receipt {
            run_id: uuid::Uuid::new_v4(),
            tenant_id: uuid::Uuid::new_v4(),
            slug: Some("acme".into()),
            rule: "status-window".into(),
            task: "task-history".into(),
            tasks: 3,
            events: 5,
            queue_items: 1,
            payloads: 2,
            logs: 4,
            objects: 0,
            oldest: Some(now - Duration::days(40)),
            newest: Some(now - Duration::days(31)),
            first_at: now,
            last_at: now,
            archive_keys: vec![],
        };
        let orphan = Receipt {
            slug: None,
            oldest: None,
            newest: None,
            ..spanned.clone()
        };
        for receipt in [spanned, orphan] {
            let as_it_was = json!({
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
                // Added since, each in its place in the alphabet: what went with the tasks, and
                // the archive files named.
                "payloads": receipt.payloads,
                "logs": receipt.logs,
                "objects": receipt.objects,
                "archive_keys": receipt.archive_keys,
            });
            assert_eq!(
                serde_json::to_string(&super::receipt_json(&receipt)).unwrap(),
                as_it_was.to_string()
            );
        }
    }
}
