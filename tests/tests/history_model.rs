//! A randomized test: generate tenants, retentions and history across day ranges, the default
//! partition and the future range, run the controller's tasks once, and compare the survivors
//! with a model of the contract alone: a task is due when its tenant was deleted longer ago than
//! the grace, or it is final and finished (else inserted) before its live tenant's cutoff; its
//! events and queue items go with it; orphan events go after an hour; a queue item goes when its
//! task is gone or final or its tenant deleted. Nothing is held back: after one run, nothing due
//! is left.
//!
//! Every generated instant sits half a minute off a whole-minute distance from the base time, and
//! every period is whole minutes, so no row is within 30 s of a cutoff: the few seconds between
//! the model's clock and the tasks' clock cannot change a verdict.

mod common;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration as Span, Utc};
use common::*;
use retention_controller::tasks;
use uuid::Uuid;

const GRACE: Span = Span::hours(24);

#[derive(Clone)]
struct Tenant {
    retention: Option<Span>,
    deleted_at: Option<DateTime<Utc>>,
}

#[derive(Clone)]
struct Task {
    key: TaskKey,
    tenant: Uuid,
    status: &'static str,
    finished_at: Option<DateTime<Utc>>,
}

struct Event {
    id: i64,
    task: TaskKey,
    created_at: DateTime<Utc>,
}

struct Item {
    id: i64,
    tenant: Uuid,
    task: TaskKey,
}

/// An instant `minutes` whole minutes (plus half a minute) before `base`; negative is after.
fn ago(base: DateTime<Utc>, minutes: i64) -> DateTime<Utc> {
    base - Span::minutes(minutes) - Span::seconds(30)
}

const FINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// The tasks the contract says are due at `now`.
fn removed(
    tasks: &[Task],
    tenants: &HashMap<Uuid, Tenant>,
    now: DateTime<Utc>,
) -> HashSet<TaskKey> {
    tasks
        .iter()
        .filter(|t| task_due(t, tenants, now))
        .map(|t| t.key)
        .collect()
}

fn task_due(task: &Task, tenants: &HashMap<Uuid, Tenant>, now: DateTime<Utc>) -> bool {
    let Some(tenant) = tenants.get(&task.tenant) else {
        return false;
    };
    match (tenant.deleted_at, tenant.retention) {
        (Some(deleted), _) => deleted < now - GRACE,
        (None, Some(period)) => {
            FINAL.contains(&task.status) && task.finished_at.unwrap_or(task.key.1) < now - period
        }
        (None, None) => false,
    }
}

async fn scenario(seed: u64) {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let mut rng = fastrand::Rng::with_seed(seed);
    let now = db_now(pool).await;
    let today = now.date_naive();
    // Day ranges for the last 40 days and a week ahead; older rows land in the default
    // partition, later ones in the future range.
    create_day(pool, today - Span::days(40)).await;
    create_day(pool, today + Span::days(6)).await;

    let periods = [
        Some(Span::hours(1)),
        Some(Span::days(1)),
        Some(Span::days(3)),
        Some(Span::days(20)),
        None,
    ];
    let mut tenants = HashMap::new();
    for _ in 0..6 {
        let retention = periods[rng.usize(..periods.len())];
        let deleted_at = match rng.u8(..6) {
            0 => Some(ago(now, rng.i64(0..3 * 24 * 60))), // within or past the 24h grace
            _ => None,
        };
        let text = retention.map(|p| format!("{} minutes", p.num_minutes()));
        let id = insert_tenant(pool, text.as_deref(), deleted_at).await;
        tenants.insert(
            id,
            Tenant {
                retention,
                deleted_at,
            },
        );
    }
    let tenant_ids: Vec<Uuid> = tenants.keys().copied().collect();
    let unknown_tenant = Uuid::new_v4();

    let statuses = ["queued", "running", "succeeded", "failed", "cancelled"];
    let mut tasks_seeded = Vec::new();
    for _ in 0..400 {
        let tenant = if rng.u8(..20) == 0 {
            unknown_tenant
        } else {
            tenant_ids[rng.usize(..tenant_ids.len())]
        };
        let inserted_at = match rng.u8(..20) {
            0 => ago(now, 60 * 24 * rng.i64(365..3650)), // years back: default partition
            1 => ago(now, -60 * 24 * rng.i64(30..3650)), // ahead: default partition
            _ => ago(now, rng.i64(0..45 * 24 * 60)),     // the last 45 days
        };
        let status = statuses[rng.usize(..statuses.len())];
        let finished_at = match (status, rng.u8(..4)) {
            ("queued" | "running", _) | (_, 0) => None,
            _ => Some(inserted_at + Span::minutes(rng.i64(0..5 * 24 * 60))),
        };
        let key = insert_task(pool, tenant, status, inserted_at, finished_at).await;
        tasks_seeded.push(Task {
            key,
            tenant,
            status,
            finished_at,
        });
    }
    let mut events = Vec::new();
    let mut items = Vec::new();
    for _ in 0..600 {
        let (tenant, task) = if rng.u8(..5) == 0 {
            // an orphan: no task at that key
            (
                tenant_ids[rng.usize(..tenant_ids.len())],
                (Uuid::new_v4(), ago(now, rng.i64(0..45 * 24 * 60))),
            )
        } else {
            let t = &tasks_seeded[rng.usize(..tasks_seeded.len())];
            (t.tenant, t.key)
        };
        let created_at = ago(now, rng.i64(0..3 * 60)); // around the one-hour orphan line
        let id = insert_event(pool, tenant, task, created_at).await;
        events.push(Event {
            id,
            task,
            created_at,
        });
    }
    for _ in 0..200 {
        let (tenant, task) = if rng.u8(..5) == 0 {
            (
                tenant_ids[rng.usize(..tenant_ids.len())],
                (Uuid::new_v4(), now),
            )
        } else {
            let t = &tasks_seeded[rng.usize(..tasks_seeded.len())];
            (t.tenant, t.key)
        };
        let id = insert_queue_item(pool, tenant, task).await;
        items.push(Item { id, tenant, task });
    }

    // The controller's tasks, in their order, with small batches so every path loops.
    let mut settings = retention_controller::RetentionSettings::default();
    settings.task_history.batch_size = 7;
    for task in tasks::all(&settings, None) {
        run_task(task.as_ref(), pool).await;
    }

    // The model.
    let existed: HashSet<TaskKey> = tasks_seeded.iter().map(|t| t.key).collect();
    let gone = removed(&tasks_seeded, &tenants, now);
    let surviving: HashSet<TaskKey> = existed.difference(&gone).copied().collect();
    let status_of: HashMap<TaskKey, &str> =
        tasks_seeded.iter().map(|t| (t.key, t.status)).collect();
    let expected_tasks = sorted_keys(surviving.iter().copied().collect());
    let expected_events = sorted_ids(
        events
            .iter()
            .filter(|e| {
                if existed.contains(&e.task) {
                    surviving.contains(&e.task)
                } else {
                    // An orphan: gone after an hour.
                    e.created_at >= now - Span::hours(1)
                }
            })
            .map(|e| e.id)
            .collect(),
    );
    let expected_items = sorted_ids(
        items
            .iter()
            .filter(|q| {
                let tenant_deleted = tenants
                    .get(&q.tenant)
                    .is_some_and(|t| t.deleted_at.is_some());
                !tenant_deleted
                    && surviving.contains(&q.task)
                    && matches!(status_of.get(&q.task), Some(&"queued") | Some(&"running"))
            })
            .map(|q| q.id)
            .collect(),
    );

    same(
        task_keys(pool).await,
        expected_tasks,
        &format!("tasks, seed {seed}"),
    );
    same(
        event_ids(pool).await,
        expected_events,
        &format!("events, seed {seed}"),
    );
    same(
        queue_item_ids(pool).await,
        expected_items,
        &format!("queue items, seed {seed}"),
    );

    // A second pass finds nothing more to delete.
    for task in tasks::all(&settings, None) {
        let report = run_task(task.as_ref(), pool).await;
        assert_eq!(
            report.deleted,
            0,
            "{} deleted more on a second pass, seed {seed}",
            task.name()
        );
    }
}

#[tokio::test]
async fn survivors_match_a_model_of_the_contract() {
    let base = std::env::var("MODEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261122u64);
    for seed in base..base + 6 {
        scenario(seed).await;
    }
}
