//! `engine retention run`: the selected tasks once each, until nothing is due.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use retention_controller::settings::check_pause_ratio;
use retention_controller::{run_once_with, tasks, Completion, MaintenanceTask, RunOptions, RunOutcome, RunReport, StopReason};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::database::Database;
use crate::progress::Meter;
use crate::settings::Settings;
use crate::shutdown;

/// How often a manual run retries while another runner holds a task.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// `pace`: `None` for full speed, `Some(None)` for the configured `retention.pacing.pause_ratio`,
/// `Some(Some(ratio))` for that ratio.
pub async fn run(settings: &Settings, selected: &[String], dry_run: bool, pace: Option<Option<f64>>) -> anyhow::Result<ExitCode> {
    let pacing = &settings.retention.pacing;
    let pause_ratio = match pace {
        None => 0.0,
        Some(None) => pacing.pause_ratio,
        Some(Some(ratio)) => ratio,
    };
    if let Some(error) = check_pause_ratio("--pace", pause_ratio) {
        eprintln!("error: {error}");
        return Ok(ExitCode::from(2));
    }
    let cancel = CancellationToken::new();
    shutdown::cancel_on_signal(cancel.clone())?;
    let db = Database::open(settings, settings.database.migrate).await?;
    let options = db.run_options(settings.retention.run_options(pause_ratio));
    let chosen: Vec<_> = tasks::all(&settings.retention)
        .into_iter()
        .filter(|task| selected.is_empty() || selected.iter().any(|name| name == task.name()))
        .collect();

    let mut failed = false;
    for task in &chosen {
        if cancel.is_cancelled() {
            break;
        }
        let result = if dry_run { dry_run_task(task.as_ref(), &db.pool).await } else { run_task(task.as_ref(), &db.pool, &cancel, &options).await };
        if let Err(error) = result {
            println!("{}: failed: {error:#}", task.name());
            failed = true;
        }
    }
    db.close().await;
    Ok(if failed {
        ExitCode::FAILURE
    } else if cancel.is_cancelled() {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

async fn dry_run_task(task: &dyn MaintenanceTask, pool: &PgPool) -> anyhow::Result<()> {
    let report = task.dry_run(pool).await?;
    println!("{}: would delete {} rows ({}) [dry run: nothing deleted]", task.name(), report.due, parts(&report.by_rule));
    let ids: Vec<_> = report.by_tenant.iter().map(|(id, _)| *id).collect();
    let slugs = repository::tenants::slugs(pool, &ids).await?;
    let mut by_tenant = report.by_tenant.clone();
    by_tenant.sort_by(|(a, x), (b, y)| y.cmp(x).then(a.cmp(b)));
    for (tenant, tasks) in by_tenant {
        let slug = slugs.get(&tenant).map(String::as_str).unwrap_or("(no such tenant)");
        println!("  tenant {slug} ({tenant}): {tasks} tasks, with their events and queue items");
    }
    Ok(())
}

/// Runs until a run ends with nothing due: a run that stops at its deadline is followed by
/// another, and a task held by another runner is waited for.
async fn run_task(task: &dyn MaintenanceTask, pool: &PgPool, cancel: &CancellationToken, options: &RunOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let meter = Meter::new(task.name(), std::io::stderr().is_terminal());
    let options = RunOptions { progress: Some(meter.callback()), ..options.clone() };
    let mut total = RunReport::default();
    let mut stopped_because = None;
    let mut runs = 0u32;
    let mut waiting_said = false;
    loop {
        let outcome = run_once_with(task, pool, cancel, &options).await;
        if outcome.is_err() {
            meter.finish();
        }
        match outcome? {
            RunOutcome::Ran(summary) => {
                runs += 1;
                meter.run_ended(summary.report.deleted);
                total.absorb(summary.report);
                stopped_because = summary.stopped_because;
                if total.completion != Completion::DeadlineReached {
                    break;
                }
            }
            RunOutcome::NotDue(_) => unreachable!("manual runs are not scheduled"),
            RunOutcome::Paused => {
                meter.finish();
                println!("{0}: paused, nothing deleted (`engine retention resume {0}` lets it run again)", task.name());
                return Ok(());
            }
            RunOutcome::Busy => {
                if !waiting_said {
                    eprintln!("{}: another runner holds this task (`engine retention status` names it); waiting for it to finish or for its lease to expire", task.name());
                    waiting_said = true;
                }
                tokio::select! {
                    _ = cancel.cancelled() => {
                        total.completion = Completion::Cancelled;
                        break;
                    }
                    _ = tokio::time::sleep(BUSY_RETRY) => {}
                }
            }
        }
    }
    meter.finish();
    let note = match (total.completion, stopped_because) {
        (Completion::Cancelled, Some(reason)) => format!(" [stopped: {}; the batch in flight was committed]", reason.as_str()),
        (Completion::Cancelled, None) => " [cancelled: the batch in flight was committed; run again to finish]".into(),
        _ => String::new(),
    };
    let counters = if total.counters.is_empty() { String::new() } else { format!(" [{}]", parts(&total.counters)) };
    println!(
        "{}: deleted {} rows in {} batches ({}){counters} in {:.2}s, longest batch {} ms{}{note}",
        task.name(),
        total.deleted,
        total.batches,
        parts(&total.by_rule),
        started.elapsed().as_secs_f64(),
        total.longest_batch.as_millis(),
        if runs > 1 { format!(" over {runs} runs") } else { String::new() },
    );
    // A pause is the operator's choice; a lease lost or not renewed left work undone.
    match stopped_because {
        Some(reason @ (StopReason::LeaseLost | StopReason::LeaseNotRenewed)) => anyhow::bail!("{}; run again to finish", reason.as_str()),
        _ => Ok(()),
    }
}

fn parts(by_rule: &[(&'static str, u64)]) -> String {
    by_rule.iter().map(|(rule, n)| format!("{rule}: {n}")).collect::<Vec<_>>().join(", ")
}

/// `engine retention pause|resume <task>`: persisted in `maintenance_tasks`, read by every
/// replica before each run and by a run in progress when it renews its lease.
pub async fn set_paused(settings: &Settings, task: &str, paused: bool) -> anyhow::Result<ExitCode> {
    let db = Database::open(settings, settings.database.migrate).await?;
    let changed = repository::maintenance::set_paused(&db.pool, task, paused).await?;
    db.close().await;
    let state = if paused { "paused" } else { "resumed" };
    if changed {
        println!("{task}: {state}{}", if paused { " on every replica (a run in progress stops after its batch in flight, within seconds)" } else { "" });
    } else {
        println!("{task}: already {}", if paused { "paused" } else { "running on its schedule" });
    }
    Ok(ExitCode::SUCCESS)
}

/// `engine retention status`: one line per task.
pub async fn status(settings: &Settings) -> anyhow::Result<ExitCode> {
    let db = Database::open(settings, settings.database.migrate).await?;
    println!("{:<13} {:<7} {:<20} {:<17} {:>10} {:<22} holder", "task", "paused", "last run (UTC)", "outcome", "rows", "next due (about, UTC)");
    for task in tasks::all(&settings.retention) {
        let state = repository::maintenance::state(&db.pool, task.name()).await?;
        let held = state.holder.is_some();
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string());
        let next_due = match (state.paused, state.last_finished_at) {
            (true, _) => "paused".to_string(),
            (false, Some(finished)) => {
                let interval = chrono::Duration::from_std(task.schedule().interval).unwrap_or(chrono::Duration::MAX);
                time(finished.checked_add_signed(interval)).unwrap_or_else(|| "-".into())
            }
            (false, None) if held => "running now".into(),
            (false, None) => "on the next start".into(),
        };
        let holder = state.holder.clone().unwrap_or_else(|| "-".into());
        println!(
            "{:<13} {:<7} {:<20} {:<17} {:>10} {:<22} {}",
            task.name(),
            if state.paused { "yes" } else { "no" },
            time(state.last_started_at).unwrap_or_else(|| "never".into()),
            state.last_outcome.as_deref().unwrap_or(if held { "running" } else { "-" }),
            state.last_rows.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            next_due,
            holder,
        );
    }
    db.close().await;
    Ok(ExitCode::SUCCESS)
}

/// `engine retention receipts`: the deletion receipts, oldest first.
pub async fn receipts(settings: &Settings, tenant: Option<&str>, since: Option<&str>, limit: i64, json: bool) -> anyhow::Result<ExitCode> {
    let since = match since.map(retention_controller::holds::parse_until).transpose() {
        Ok(since) => since,
        Err(_) => {
            eprintln!(
                "error: invalid --since {:?}: allowed: an instant in RFC 3339 (2026-11-01T00:00:00Z) or a date (2026-11-01)",
                since.unwrap_or_default()
            );
            return Ok(ExitCode::from(2));
        }
    };
    if limit < 1 {
        eprintln!("error: invalid --limit {limit}: allowed: 1 or more");
        return Ok(ExitCode::from(2));
    }
    let db = Database::open(settings, settings.database.migrate).await?;
    let tenant_id = match tenant {
        Some(key) => match repository::tenants::find(&db.pool, key).await? {
            Some(t) => Some(t.id),
            None => {
                db.close().await;
                eprintln!("error: no tenant with id or slug {key:?}");
                return Ok(ExitCode::from(2));
            }
        },
        None => None,
    };
    let receipts = repository::receipts::list(&db.pool, tenant_id, since, limit).await;
    db.close().await;
    let receipts = receipts?;
    for receipt in &receipts {
        if json {
            println!("{}", crate::hold::receipt_json(receipt));
        } else {
            println!("{}", crate::hold::describe_receipt(receipt));
        }
    }
    if receipts.is_empty() && !json {
        println!("no receipts");
    }
    Ok(ExitCode::SUCCESS)
}
