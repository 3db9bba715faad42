//! `engine tenant archive get|set` and `engine archive list`.

use std::process::ExitCode;
use std::time::Duration;

use repository::archives::{self, Policy};
use repository::rule::interval;
use repository::tenants::FinalStatus;
use retention_controller::archive_policy::{self, PolicyError};
use retention_controller::human::{bytes, count, thousands};
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

/// A tenant's archive policy, as `engine tenant archive get --json` and the admin API show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct TenantArchive {
    /// `off`, `on` (every final status), or the statuses archived, e.g. `failed,cancelled`.
    #[schema(examples("off", "on", "failed,cancelled"))]
    pub archive: String,
    /// Whether the tenant's finished runs are still archived after it is deleted.
    pub archive_deleted: bool,
    /// How long its archives are kept, e.g. `1year`, or `forever`.
    #[schema(examples("1year", "forever"))]
    pub archive_retention_period: String,
    pub slug: String,
    /// The final statuses archived, each once.
    pub statuses: Vec<String>,
    pub tenant: uuid::Uuid,
}

pub fn policy_json(policy: &Policy) -> TenantArchive {
    TenantArchive {
        archive: archive_policy::describe_statuses(&statuses(policy)),
        archive_deleted: policy.deleted,
        archive_retention_period: retention_shown(&policy.retention),
        slug: policy.slug.clone(),
        statuses: statuses(policy)
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        tenant: policy.id,
    }
}

/// A change of a tenant's archive policy, parsed: what is `None` stays.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    pub statuses: Option<Vec<FinalStatus>>,
    /// `Some(None)`: forever.
    pub retention: Option<Option<Duration>>,
    pub deleted: Option<bool>,
}

/// What a change did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub before: Policy,
    pub after: Policy,
    /// Written archives whose expiry moved with a new retention.
    pub moved: u64,
}

/// Applies `change` to the tenant whose id or slug is `key`, in one transaction (rolled back in
/// a dry run). `Ok(Err(..))`: no such tenant.
pub async fn apply(
    pool: &sqlx::PgPool,
    key: &str,
    change: &Change,
    dry_run: bool,
) -> anyhow::Result<Result<Applied, String>> {
    let mut tx = pool.begin().await?;
    let Some(before) = archives::policy(&mut *tx, key).await? else {
        return Ok(Err(format!("no tenant with id or slug {key:?}")));
    };
    let names = change
        .statuses
        .as_ref()
        .map(|s| s.iter().map(|s| s.as_str().to_string()).collect::<Vec<_>>());
    let retention = change.retention.map(|r| r.map(interval));
    let after = Policy {
        statuses: names.clone().unwrap_or_else(|| before.statuses.clone()),
        retention: retention.unwrap_or(before.retention),
        deleted: change.deleted.unwrap_or(before.deleted),
        ..before.clone()
    };
    let moved = archives::set_policy(
        &mut tx,
        before.id,
        &archives::PolicyChange {
            statuses: names,
            retention,
            deleted: change.deleted,
        },
    )
    .await?;
    if dry_run {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    Ok(Ok(Applied {
        before,
        after,
        moved,
    }))
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
                Ok(Change {
                    statuses: Some(statuses),
                    retention,
                    deleted,
                })
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
    match (command, change) {
        (TenantArchiveCommand::Get { json: as_json, .. }, _) => {
            let Some(policy) = archives::policy(&db.pool, key).await? else {
                return Ok(Err(format!("no tenant with id or slug {key:?}")));
            };
            Ok(Ok(if *as_json {
                serde_json::to_string(&policy_json(&policy)).expect("serializable")
            } else {
                shown(&policy)
            }))
        }
        (TenantArchiveCommand::Set { dry_run, .. }, Some(change)) => {
            let applied = match apply(&db.pool, key, &change, *dry_run).await? {
                Ok(applied) => applied,
                Err(refusal) => return Ok(Err(refusal)),
            };
            let moved = if applied.moved > 0 {
                format!(
                    "; the expiry of {} moves with it",
                    count(applied.moved, "archive", "archives")
                )
            } else {
                String::new()
            };
            Ok(Ok(if *dry_run {
                format!(
                    "would change {} to {}{moved} (dry run: nothing changed)",
                    shown(&applied.before),
                    shown(&applied.after)
                )
            } else {
                format!(
                    "changed {} to {}{moved}",
                    shown(&applied.before),
                    shown(&applied.after)
                )
            }))
        }
        (TenantArchiveCommand::Set { .. }, None) => unreachable!("a set is parsed first"),
    }
}

pub async fn archive(settings: &Settings, command: ArchiveCommand) -> anyhow::Result<ExitCode> {
    let (tenant, since, status, json) = match command {
        ArchiveCommand::List {
            tenant,
            since,
            status,
            json,
        } => (tenant, since, status, json),
        ArchiveCommand::Restore {
            tenant,
            from,
            to,
            into,
        } => return restore(settings, &tenant, &from, &to, &into).await,
    };
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
                "{}  {}  {}..{}  {} {} {}  {}  expires {}",
                a.object_key,
                a.slug.as_deref().unwrap_or("(deleted tenant)"),
                a.first_day,
                a.last_day,
                thousands(a.tasks.max(0) as u64),
                a.status,
                if a.tasks == 1 { "run" } else { "runs" },
                a.bytes
                    .map(|b| bytes(b.max(0) as u64))
                    .unwrap_or_else(|| "size unknown".into()),
                a.expires_at
                    .map(|at| at.to_rfc3339())
                    .unwrap_or_else(|| "never".into())
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn day(what: &str, value: &str) -> Result<chrono::NaiveDate, String> {
    value
        .parse::<chrono::NaiveDate>()
        .map_err(|_| format!("invalid {what} {value:?}: allowed: a date, YYYY-MM-DD"))
}

/// `engine archive restore`: the files of `tenant` holding days `from` to `to`, each checked
/// against its manifest row, their runs of those days loaded into `into` in one transaction.
async fn restore(
    settings: &Settings,
    tenant: &str,
    from: &str,
    to: &str,
    into: &str,
) -> anyhow::Result<ExitCode> {
    let (from, to) = match (day("--from", from), day("--to", to)) {
        (Ok(from), Ok(to)) if from <= to => (from, to),
        (Ok(from), Ok(to)) => {
            return refuse(format!(
                "invalid --from {from} after --to {to}: allowed: --from on or before --to"
            ))
        }
        (Err(e), _) | (_, Err(e)) => return refuse(e),
    };
    let db = Database::open(settings, settings.database.migrate).await?;
    let result = restore_with(settings, &db, tenant, from, to, into).await;
    db.close().await;
    match result? {
        Ok(line) => {
            output::line(line)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(refusal) => refuse(refusal),
    }
}

async fn restore_with(
    settings: &Settings,
    db: &Database,
    tenant: &str,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
    into: &str,
) -> anyhow::Result<Result<String, String>> {
    use retention_controller::archive_format;
    use sha2::{Digest, Sha256};
    let mut conn = db.pool.acquire().await?;
    if let Some(reason) = repository::restore::refusal(&mut conn, into).await? {
        return Ok(Err(format!(
            "invalid --into {into:?}: {reason}; allowed: {}",
            repository::restore::ALLOWED_SCHEMA
        )));
    }
    let Some(policy) = archives::policy(&mut *conn, tenant).await? else {
        return Ok(Err(format!("no tenant with id or slug {tenant:?}")));
    };
    let mut files =
        archives::list_between(&mut *conn, Some(policy.id), Some(from), Some(to), None).await?;
    // Oldest written first: a run archived again (it changed) ends as its later file has it.
    files.sort_by_key(|a| (a.written_at, a.id));
    let storage = settings.open_storage()?;
    let store = retention_controller::archive::store_id(&storage);
    // Every file read and checked before anything is loaded.
    let mut loaded = Vec::new();
    for file in &files {
        if file.store != store {
            return Ok(Err(format!(
                "the archive {} is in the store {}, not in storage.url's {store}: set storage.url to it to restore",
                file.object_key, file.store
            )));
        }
        let bytes = storage
            .get(&file.object_key)
            .await
            .map_err(|error| anyhow::anyhow!("reading {}: {error}", file.object_key))?
            .ok_or_else(|| {
                anyhow::anyhow!("the archive {} is not in the store", file.object_key)
            })?;
        let sha256: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if Some(bytes.len() as i64) != file.bytes || Some(&sha256) != file.sha256.as_ref() {
            anyhow::bail!(
                "the archive {} in the store is not the file recorded ({} bytes, SHA-256 {sha256}; recorded {:?} bytes, {:?}): nothing restored",
                file.object_key,
                bytes.len(),
                file.bytes,
                file.sha256
            );
        }
        let runs = archive_format::read(bytes)
            .map_err(|error| anyhow::anyhow!("reading {}: {error}", file.object_key))?;
        loaded.push((file.object_key.clone(), runs));
    }
    let mut tx = db.pool.begin().await?;
    repository::restore::prepare(&mut tx, into).await?;
    let (mut tasks, mut events, mut payloads, mut logs) = (0u64, 0usize, 0usize, 0usize);
    for (key, runs) in loaded {
        let mut columns = repository::restore::Runs::default();
        for run in runs {
            let day = run.finished_at.unwrap_or(run.inserted_at).date_naive();
            if day < from || day > to {
                continue;
            }
            events += run.events.len();
            payloads += run.payloads.len();
            logs += run.logs.len();
            push_run(&mut columns, &key, run);
        }
        tasks += repository::restore::load(&mut tx, into, &columns).await?;
    }
    tx.commit().await?;
    Ok(Ok(format!(
        "restored {} of {} ({}, {}, {}) from {} into schema {into}",
        count(tasks, "run", "runs"),
        policy.slug,
        count(events as u64, "event", "events"),
        count(payloads as u64, "payload", "payloads"),
        count(logs as u64, "log line", "log lines"),
        count(files.len() as u64, "archive file", "archive files"),
    )))
}

fn push_run(
    c: &mut repository::restore::Runs,
    key: &str,
    run: retention_controller::archive_format::ArchivedTask,
) {
    for e in run.events {
        c.event_id.push(e.id);
        c.event_task.push(run.task_id);
        c.event_task_inserted_at.push(run.inserted_at);
        c.event_type.push(e.event_type);
        c.event_created_at.push(e.created_at);
        c.event_data.push(e.data);
    }
    for p in run.payloads {
        c.payload_id.push(p.id);
        c.payload_task.push(run.task_id);
        c.payload_task_inserted_at.push(run.inserted_at);
        c.payload_kind.push(p.kind);
        c.payload_location.push(p.location);
        c.payload_inline.push(p.inline_content);
        c.payload_key.push(p.external_key);
        c.payload_size.push(p.size_bytes);
        c.payload_created_at.push(p.created_at);
    }
    for l in run.logs {
        c.log_id.push(l.id);
        c.log_task.push(run.task_id);
        c.log_task_inserted_at.push(run.inserted_at);
        c.log_created_at.push(l.created_at);
        c.log_level.push(l.level);
        c.log_line.push(l.line);
    }
    c.task_tenant.push(run.tenant_id);
    c.task_id.push(run.task_id);
    c.task_status.push(run.status);
    c.task_inserted_at.push(run.inserted_at);
    c.task_finished_at.push(run.finished_at);
    c.task_payload.push(run.payload);
    c.task_archive_key.push(key.to_string());
}
