//! `engine retention run`: the selected tasks once each, until nothing is due.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use retention_controller::human::{self, thousands};
use retention_controller::settings::check_pause_ratio;
use retention_controller::{
    run_once_with, Completion, MaintenanceTask, RunOptions, RunOutcome, RunReport, StopReason,
};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::database::Database;
use crate::output;
use crate::progress::Meter;
use crate::settings::Settings;
use crate::shutdown;
use crate::status;

/// How often a manual run retries while another runner holds a task.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// `pace`: `None` for full speed, `Some(None)` for the configured `retention.pacing.pause_ratio`,
/// `Some(Some(ratio))` for that ratio. With `json`, one JSON object per task on stdout (see
/// docs/operations.md, "Output for scripts").
pub async fn run(
    settings: &Settings,
    selected: &[String],
    dry_run: bool,
    pace: Option<Option<f64>>,
    json: bool,
) -> anyhow::Result<ExitCode> {
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
    let chosen: Vec<_> = settings
        .tasks()?
        .into_iter()
        .filter(|task| selected.is_empty() || selected.iter().any(|name| name == task.name()))
        .collect();

    let mut failed = false;
    for task in &chosen {
        if cancel.is_cancelled() {
            break;
        }
        let printed = if dry_run {
            dry_run_task(task.as_ref(), &db.pool, json).await
        } else {
            run_task(task.as_ref(), &db.pool, &cancel, &options)
                .await
                .map(|ran| ran.print(json))
        };
        match printed {
            Ok(Ok(())) => {}
            Ok(Err(error)) | Err(error) if output::reader_gone(&error) => return Err(error),
            Ok(Err(error)) | Err(error) => {
                if json {
                    output::line(json!({ "task": task.name(), "error": format!("{error:#}") }))?;
                } else {
                    output::line(format_args!("{}: failed: {error:#}", task.name()))?;
                }
                failed = true;
            }
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

async fn dry_run_task(
    task: &dyn MaintenanceTask,
    pool: &PgPool,
    json: bool,
) -> anyhow::Result<anyhow::Result<()>> {
    let report = task.dry_run(pool).await?;
    let ids: Vec<_> = report.by_tenant.iter().map(|(id, _)| *id).collect();
    let slugs = repository::tenants::slugs(pool, &ids).await?;
    let mut by_tenant = report.by_tenant.clone();
    by_tenant.sort_by(|(a, x), (b, y)| y.cmp(x).then(a.cmp(b)));
    if json {
        let tenants: Vec<Value> = by_tenant
            .iter()
            .map(|(id, tasks)| json!({ "tenant_id": id, "slug": slugs.get(id), "tasks": tasks }))
            .collect();
        output::line(
            json!({ "task": task.name(), "dry_run": true, "due": report.due, "by_rule": counts(&report.by_rule), "by_tenant": tenants }),
        )?;
        return Ok(Ok(()));
    }
    if report.due == 0 {
        output::line(format_args!("{}: nothing due [dry run]", task.name()))?;
    } else {
        output::line(format_args!(
            "{}: would delete {} rows{} [dry run: nothing deleted]",
            task.name(),
            thousands(report.due),
            parts(&report.by_rule)
        ))?;
    }
    for (tenant, tasks) in by_tenant {
        let slug = slugs
            .get(&tenant)
            .map(String::as_str)
            .unwrap_or("(no such tenant)");
        output::line(format_args!(
            "  tenant {slug} ({tenant}): {} tasks, with their events and queue items",
            thousands(tasks)
        ))?;
    }
    Ok(Ok(()))
}

/// What a manual run of one task did, over every run it took.
struct Ran {
    task: &'static str,
    report: RunReport,
    elapsed: Duration,
    runs: u32,
    stopped_because: Option<StopReason>,
    /// The task was paused: nothing ran.
    paused: bool,
}

impl Ran {
    /// Prints the summary line (or JSON object); a lease lost or not renewed left work undone,
    /// which is an error, where a pause is the operator's choice.
    fn print(&self, json: bool) -> anyhow::Result<()> {
        if json {
            output::line(self.json())?;
        } else {
            output::line(self.describe())?;
        }
        match self.stopped_because {
            Some(reason @ (StopReason::LeaseLost | StopReason::LeaseNotRenewed)) => {
                anyhow::bail!("{}; run again to finish", reason.as_str())
            }
            _ => Ok(()),
        }
    }

    /// "sessions: deleted 2,598,000 rows in 312 batches (expired: 1,000, anonymous-stale:
    /// 2,597,000) in 3.2 s, longest batch 61 ms"; "partitions: nothing due; days created: 7 (150 ms)".
    fn describe(&self) -> String {
        let (task, total) = (self.task, &self.report);
        if self.paused {
            return format!("{task}: paused, nothing deleted (`engine retention resume {task}` lets it run again)");
        }
        let counters: Vec<_> = total
            .counters
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| format!("{what}: {}", thousands(*n)))
            .collect();
        let counters = if counters.is_empty() {
            String::new()
        } else {
            format!("; {}", counters.join(", "))
        };
        let over = if self.runs > 1 {
            format!(" over {} runs", self.runs)
        } else {
            String::new()
        };
        let note = match (total.completion, self.stopped_because) {
            (Completion::Cancelled, Some(reason)) => format!(
                " [stopped: {}; the batch in flight was committed]",
                reason.as_str()
            ),
            (Completion::Cancelled, None) => {
                " [cancelled: the batch in flight was committed; run again to finish]".into()
            }
            _ => String::new(),
        };
        if total.deleted == 0 {
            return format!(
                "{task}: nothing due{counters} ({}{over}){note}",
                human::duration(self.elapsed)
            );
        }
        format!(
            "{task}: deleted {} rows in {} {}{}{counters} in {}{over}, longest batch {}{note}",
            thousands(total.deleted),
            thousands(total.batches),
            if total.batches == 1 {
                "batch"
            } else {
                "batches"
            },
            parts(&total.by_rule),
            human::duration(self.elapsed),
            human::duration(total.longest_batch),
        )
    }

    fn json(&self) -> Value {
        let total = &self.report;
        json!({
            "task": self.task,
            "paused": self.paused,
            "deleted": total.deleted,
            "batches": total.batches,
            "by_rule": counts(&total.by_rule),
            "counters": counts(&total.counters),
            "seconds": (self.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "longest_batch_ms": total.longest_batch.as_millis() as u64,
            "longest_lock_ms": total.longest_lock.as_millis() as u64,
            "runs": self.runs,
            "completion": total.completion.as_str(),
            "stopped_because": self.stopped_because.map(StopReason::as_str),
        })
    }
}

/// Runs until a run ends with nothing due: a run that stops at its deadline is followed by
/// another, and a task held by another runner is waited for.
async fn run_task(
    task: &dyn MaintenanceTask,
    pool: &PgPool,
    cancel: &CancellationToken,
    options: &RunOptions,
) -> anyhow::Result<Ran> {
    let started = Instant::now();
    let meter = Meter::new(task.name(), std::io::stderr().is_terminal());
    let options = RunOptions {
        progress: Some(meter.callback()),
        ..options.clone()
    };
    let mut ran = Ran {
        task: task.name(),
        report: RunReport::default(),
        elapsed: Duration::ZERO,
        runs: 0,
        stopped_because: None,
        paused: false,
    };
    let mut waiting_said = false;
    loop {
        let outcome = run_once_with(task, pool, cancel, &options).await;
        if outcome.is_err() {
            meter.finish();
        }
        match outcome? {
            RunOutcome::Ran(summary) => {
                ran.runs += 1;
                meter.run_ended(summary.report.deleted);
                ran.report.absorb(summary.report);
                ran.stopped_because = summary.stopped_because;
                if ran.report.completion != Completion::DeadlineReached {
                    break;
                }
            }
            RunOutcome::NotDue(_) => unreachable!("manual runs are not scheduled"),
            RunOutcome::Paused => {
                ran.paused = true;
                break;
            }
            RunOutcome::Busy => {
                if !waiting_said {
                    eprintln!("{}: another runner holds this task (`engine retention status` names it); waiting for it to finish or for its lease to expire", task.name());
                    waiting_said = true;
                }
                tokio::select! {
                    _ = cancel.cancelled() => {
                        ran.report.completion = Completion::Cancelled;
                        break;
                    }
                    _ = tokio::time::sleep(BUSY_RETRY) => {}
                }
            }
        }
    }
    meter.finish();
    ran.elapsed = started.elapsed();
    Ok(ran)
}

/// " (expired: 1,000, anonymous: 2,597,000)", leaving out the parts that deleted nothing;
/// empty when every part did.
fn parts(by_rule: &[(&'static str, u64)]) -> String {
    let parts: Vec<_> = by_rule
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(rule, n)| format!("{rule}: {}", thousands(*n)))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// `{"expired": 1000, ...}`.
fn counts(by_rule: &[(&'static str, u64)]) -> Value {
    Value::Object(
        by_rule
            .iter()
            .map(|(rule, n)| (rule.to_string(), json!(n)))
            .collect(),
    )
}

/// `engine retention pause|resume <task>`: persisted in `maintenance_tasks`, read by every
/// replica before each run and by a run in progress when it renews its lease.
pub async fn set_paused(settings: &Settings, task: &str, paused: bool) -> anyhow::Result<ExitCode> {
    let db = Database::open(settings, settings.database.migrate).await?;
    let changed = repository::maintenance::set_paused(&db.pool, task, paused).await?;
    db.close().await;
    let state = if paused { "paused" } else { "resumed" };
    if changed {
        output::line(format_args!(
            "{task}: {state}{}",
            if paused {
                " on every replica (a run in progress stops after its batch in flight, within seconds)"
            } else {
                ""
            }
        ))?;
    } else {
        output::line(format_args!(
            "{task}: already {}",
            if paused {
                "paused"
            } else {
                "running on its schedule"
            }
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `engine retention status`: one line per task, or with `json` one JSON object per task.
pub async fn status(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let db = Database::open(settings, settings.database.migrate).await?;
    let states = status::tasks(&db.pool, &settings.tasks()?, json).await;
    db.close().await;
    let states = states?;
    if json {
        for state in &states {
            output::line(serde_json::to_string(state)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    output::line(format_args!(
        "{:<13} {:<7} {:<20} {:<17} {:>10} {:<22} holder",
        "task", "paused", "last run (UTC)", "outcome", "rows", "next due (about, UTC)"
    ))?;
    let outbox = states.iter().find_map(|s| s.outbox.clone());
    let archives = states.iter().find_map(|s| s.archives.clone());
    for state in states {
        output::line(format_args!(
            "{:<13} {:<7} {:<20} {:<17} {:>10} {:<22} {}",
            state.task,
            if state.paused { "yes" } else { "no" },
            state
                .last_run_at
                .map(status::format_time)
                .unwrap_or_else(|| "never".into()),
            state.outcome.as_deref().unwrap_or("-"),
            state
                .rows
                .map(|n| thousands(n as u64))
                .unwrap_or_else(|| "-".into()),
            state.next_due.describe(),
            state.holder.as_deref().unwrap_or("-"),
        ))?;
    }
    if let Some(archives) = archives {
        output::line(format!("archives: {}", archives.describe()))?;
    }
    if let Some(outbox) = outbox {
        output::line(format_args!(
            "outbox (objects to delete): {}",
            outbox.describe()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `engine retention receipts`: the deletion receipts, oldest first.
pub async fn receipts(
    settings: &Settings,
    tenant: Option<&str>,
    since: Option<&str>,
    limit: i64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let since = match since
        .map(retention_controller::holds::parse_until)
        .transpose()
    {
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
            output::line(
                serde_json::to_string(&crate::hold::receipt_json(receipt)).expect("serializable"),
            )?;
        } else {
            output::line(crate::hold::describe_receipt(receipt))?;
        }
    }
    if receipts.is_empty() && !json {
        output::line("no receipts")?;
    }
    Ok(ExitCode::SUCCESS)
}
