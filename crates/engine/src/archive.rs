//! `engine tenant archive get|set` and `engine archive list`.

use std::process::ExitCode;
use std::time::Duration;

use repository::archives::{self, Policy};
use repository::rule::interval;
use repository::tenants::FinalStatus;
use retention_controller::archive_policy::{self, PolicyError};
use sqlx::postgres::types::PgInterval;

use crate::cli::{ArchiveCommand, TenantArchiveCommand};
use crate::database::Database;
use crate::output;
use crate::settings::Settings;

fn refuse(error: impl std::fmt::Display) -> anyhow::Result<ExitCode> {
    eprintln!("error: {error}");
    Ok(ExitCode::from(2))
}

fn statuses(policy: &Policy) -> Vec<FinalStatus> {
    policy
        .statuses
        .iter()
        .filter_map(|s| FinalStatus::parse(s))
        .collect()
}

fn retention_shown(retention: &Option<PgInterval>) -> String {
    match retention {
        None => "forever".to_string(),
        Some(i) => {
            // A month as humantime counts it (a year is 365.25 days), so "1 year" shows as 1year.
            let seconds = i.microseconds / 1_000_000
                + i64::from(i.days) * 86_400
                + i64::from(i.months) * 2_629_800;
            humantime::format_duration(Duration::from_secs(seconds.max(0) as u64)).to_string()
        }
    }
}

fn shown(policy: &Policy) -> String {
    format!(
        "{}: archive {} (archives kept {}{})",
        policy.slug,
        archive_policy::describe_statuses(&statuses(policy)),
        retention_shown(&policy.retention),
        if policy.deleted {
            "; archived after the tenant is deleted too"
        } else {
            ""
        }
    )
}

fn json(policy: &Policy) -> serde_json::Value {
    serde_json::json!({
        "archive": archive_policy::describe_statuses(&statuses(policy)),
        "archive_retention_period": retention_shown(&policy.retention),
        "statuses": statuses(policy).iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "archive_deleted": policy.deleted,
        "tenant": policy.id,
        "slug": policy.slug,
    })
}

pub async fn tenant_archive(
    settings: &Settings,
    command: TenantArchiveCommand,
) -> anyhow::Result<ExitCode> {
    // Refuse a bad value before touching (or starting) any database.
    let change = match &command {
        TenantArchiveCommand::Set {
            archive,
            retention,
            deleted,
            ..
        } => {
            let parsed: Result<_, PolicyError> = (|| {
                let statuses = archive_policy::parse_statuses(archive)?;
                let retention = retention
                    .as_deref()
                    .map(archive_policy::parse_retention)
                    .transpose()?;
                let deleted = deleted
                    .as_deref()
                    .map(archive_policy::parse_on_off)
                    .transpose()?;
                Ok((statuses, retention, deleted))
            })();
            match parsed {
                Ok(change) => Some(change),
                Err(error) => return refuse(error),
            }
        }
        TenantArchiveCommand::Get { .. } => None,
    };
    let db = Database::open(settings, settings.database.migrate).await?;
    let result = run(&db, &command, change).await;
    db.close().await;
    match result? {
        Ok(line) => {
            output::line(line)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(refusal) => refuse(refusal),
    }
}

type Change = (Vec<FinalStatus>, Option<Option<Duration>>, Option<bool>);

async fn run(
    db: &Database,
    command: &TenantArchiveCommand,
    change: Option<Change>,
) -> anyhow::Result<Result<String, String>> {
    let key = match command {
        TenantArchiveCommand::Get { tenant, .. } | TenantArchiveCommand::Set { tenant, .. } => {
            tenant
        }
    };
    let Some(before) = archives::policy(&db.pool, key).await? else {
        return Ok(Err(format!("no tenant with id or slug {key:?}")));
    };
    match (command, change) {
        (TenantArchiveCommand::Get { json: as_json, .. }, _) => Ok(Ok(if *as_json {
            json(&before).to_string()
        } else {
            shown(&before)
        })),
        (TenantArchiveCommand::Set { dry_run, .. }, Some((statuses, retention, deleted))) => {
            let names: Vec<String> = statuses.iter().map(|s| s.as_str().to_string()).collect();
            let retention = retention.map(|r| r.map(interval));
            let after = Policy {
                statuses: names.clone(),
                retention: retention.clone().unwrap_or(before.retention.clone()),
                deleted: deleted.unwrap_or(before.deleted),
                ..before.clone()
            };
            let change = archives::PolicyChange {
                statuses: Some(names),
                retention,
                deleted,
            };
            // Applied in a transaction; a dry run rolls it back (it only reads what moved).
            let mut tx = db.pool.begin().await?;
            let moved = archives::set_policy(&mut tx, before.id, &change).await?;
            let moved = if moved > 0 {
                format!("; the expiry of {moved} archive(s) moves with it")
            } else {
                String::new()
            };
            if *dry_run {
                tx.rollback().await?;
                return Ok(Ok(format!(
                    "would change {} to {}{moved} (dry run: nothing changed)",
                    shown(&before),
                    shown(&after)
                )));
            }
            tx.commit().await?;
            Ok(Ok(format!(
                "changed {} to {}{moved}",
                shown(&before),
                shown(&after)
            )))
        }
        (TenantArchiveCommand::Set { .. }, None) => unreachable!("a set is parsed first"),
    }
}

pub async fn archive(settings: &Settings, command: ArchiveCommand) -> anyhow::Result<ExitCode> {
    let ArchiveCommand::List {
        tenant,
        since,
        status,
        json,
    } = command;
    let since = match since
        .as_deref()
        .map(|s| s.parse::<chrono::NaiveDate>())
        .transpose()
    {
        Ok(since) => since,
        Err(_) => {
            return refuse(format!(
                "invalid --since {:?}: allowed: a date, YYYY-MM-DD",
                since.unwrap_or_default()
            ))
        }
    };
    let db = Database::open(settings, settings.database.migrate).await?;
    let listed = async {
        let tenant_id = match &tenant {
            Some(key) => match archives::policy(&db.pool, key).await? {
                Some(policy) => Some(policy.id),
                None => return Ok(Err(format!("no tenant with id or slug {key:?}"))),
            },
            None => None,
        };
        anyhow::Ok(Ok(archives::list(
            &db.pool,
            tenant_id,
            since,
            status.as_deref(),
        )
        .await?))
    }
    .await;
    db.close().await;
    let files = match listed? {
        Ok(files) => files,
        Err(refusal) => return refuse(refusal),
    };
    if json {
        let rows: Vec<serde_json::Value> = files
            .iter()
            .map(|a| {
                serde_json::json!({
                    "key": a.object_key, "store": a.store, "tenant": a.tenant_id, "slug": a.slug,
                    "status": a.status, "first_day": a.first_day, "last_day": a.last_day,
                    "run_id": a.run_id, "tasks": a.tasks, "events": a.events,
                    "payloads": a.payloads, "logs": a.logs, "bytes": a.bytes, "sha256": a.sha256,
                    "schema_version": a.schema_version, "created_at": a.created_at,
                    "written_at": a.written_at, "expires_at": a.expires_at,
                })
            })
            .collect();
        output::line(serde_json::Value::Array(rows))?;
    } else if files.is_empty() {
        output::line("no archives")?;
    } else {
        for a in &files {
            output::line(format!(
                "{}  {}  {}..{}  {} {} runs  {} bytes  expires {}",
                a.object_key,
                a.slug.as_deref().unwrap_or("(deleted tenant)"),
                a.first_day,
                a.last_day,
                a.tasks,
                a.status,
                a.bytes.unwrap_or(0),
                a.expires_at
                    .map(|at| at.to_rfc3339())
                    .unwrap_or_else(|| "never".into())
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
