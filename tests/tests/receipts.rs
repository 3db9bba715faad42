//! Receipts are exact on every path, with writers at work: per tenant and rule, the tasks, events
//! and queue items a run's receipts name are those that went by the engine, counted from a ledger
//! kept outside it (what was there before, what writers added and removed meanwhile, what is there
//! after). A writer adds, finishes and deletes kept tasks beside the due ones, and deletes due
//! tasks itself now and then: those are not the engine's to receipt.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Duration as Span, Utc};
use common::*;
use repository::history::ranges;
use retention_controller::rewrites::{self, Naming, Outcome, Steps};
use retention_controller::settings::{QueueItemsSettings, TaskHistorySettings};
use retention_controller::tasks::queue_items::QueueItemsTask;
use retention_controller::tasks::task_history::TaskHistoryTask;
use retention_controller::{
    run_once_with, MaintenanceTask, RunContext, RunOptions, RunOutcome, RunReport,
};
use sqlx::PgPool;
use uuid::Uuid;

/// A task as the ledger knows it: its tenant, its events, its queue items, its payloads (those
/// whose bytes are in the object store too) and its log lines.
#[derive(Debug, Clone, Default)]
struct Known {
    tenant: Uuid,
    events: BTreeSet<i64>,
    items: BTreeSet<i64>,
    payloads: BTreeSet<i64>,
    external: BTreeSet<i64>,
    logs: BTreeSet<i64>,
}

/// What the writers did.
#[derive(Default)]
struct Writes {
    inserted: BTreeMap<TaskKey, Known>,
    /// Tasks a writer deleted (its delete found the row).
    deleted: BTreeSet<TaskKey>,
}

/// Every task with its events and queue items, as they are now.
async fn snapshot(pool: &PgPool) -> BTreeMap<TaskKey, Known> {
    let mut tasks: BTreeMap<TaskKey, Known> = BTreeMap::new();
    let rows: Vec<(Uuid, DateTime<Utc>, Uuid)> =
        sqlx::query_as("SELECT id, inserted_at, tenant_id FROM tasks")
            .fetch_all(pool)
            .await
            .unwrap();
    for (id, at, tenant) in rows {
        tasks.insert(
            (id, at),
            Known {
                tenant,
                ..Default::default()
            },
        );
    }
    let events: Vec<(i64, Uuid, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, task_id, task_inserted_at FROM task_events")
            .fetch_all(pool)
            .await
            .unwrap();
    for (id, task, at) in events {
        if let Some(known) = tasks.get_mut(&(task, at)) {
            known.events.insert(id);
        }
    }
    let items: Vec<(i64, Uuid, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, task_id, task_inserted_at FROM queue_items")
            .fetch_all(pool)
            .await
            .unwrap();
    for (id, task, at) in items {
        if let Some(known) = tasks.get_mut(&(task, at)) {
            known.items.insert(id);
        }
    }
    let payloads: Vec<(i64, Uuid, DateTime<Utc>, bool)> = sqlx::query_as(
        "SELECT id, task_id, task_inserted_at, location = 'external' FROM task_payloads",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (id, task, at, external) in payloads {
        if let Some(known) = tasks.get_mut(&(task, at)) {
            known.payloads.insert(id);
            if external {
                known.external.insert(id);
            }
        }
    }
    let logs: Vec<(i64, Uuid, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, task_id, task_inserted_at FROM task_logs")
            .fetch_all(pool)
            .await
            .unwrap();
    for (id, task, at) in logs {
        if let Some(known) = tasks.get_mut(&(task, at)) {
            known.logs.insert(id);
        }
    }
    tasks
}

/// Writes to the range of `at` until `stop`: tasks of `kept` (a tenant keeping forever) with an
/// event and a queue item each, finished now and then, deleted now and then; and, now and then, a
/// delete of one of `due` (the application removing a due task before the engine does).
async fn writer(
    pool: PgPool,
    kept: Uuid,
    at: DateTime<Utc>,
    due: Vec<TaskKey>,
    writes: Arc<Mutex<Writes>>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = fastrand::Rng::with_seed(11);
    let mut mine: Vec<TaskKey> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(3)).await;
        match rng.u8(..6) {
            0..=1 => {
                let (task, event, item) = insert_task_with_children(
                    &pool,
                    kept,
                    "running",
                    at + Span::seconds(rng.i64(0..3600)),
                    None,
                )
                .await;
                writes.lock().unwrap().inserted.insert(
                    task,
                    Known {
                        tenant: kept,
                        events: [event].into(),
                        items: [item].into(),
                        ..Default::default()
                    },
                );
                mine.push(task);
            }
            2 if !mine.is_empty() => {
                let task = mine[rng.usize(..mine.len())];
                sqlx::query("UPDATE tasks SET status = 'succeeded', finished_at = now() WHERE id = $1 AND inserted_at = $2")
                    .bind(task.0)
                    .bind(task.1)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            3 if !mine.is_empty() => {
                let task = mine.swap_remove(rng.usize(..mine.len()));
                delete(&pool, task, &writes).await;
            }
            4 if !due.is_empty() => {
                let task = due[rng.usize(..due.len())];
                delete(&pool, task, &writes).await;
            }
            _ => {}
        }
    }
}

async fn delete(pool: &PgPool, task: TaskKey, writes: &Arc<Mutex<Writes>>) {
    let found = sqlx::query("DELETE FROM tasks WHERE id = $1 AND inserted_at = $2")
        .bind(task.0)
        .bind(task.1)
        .execute(pool)
        .await
        .unwrap()
        .rows_affected();
    if found == 1 {
        writes.lock().unwrap().deleted.insert(task);
    }
}

/// Per (tenant, rule): tasks, events, queue items.
type Counts = BTreeMap<(Uuid, String), (i64, i64, i64)>;
/// Per (tenant, rule): payloads, log lines, objects given to the outbox.
type DependentCounts = BTreeMap<(Uuid, String), (i64, i64, i64)>;

/// What went by the engine, from the ledger: tasks there before or added since, gone now, not
/// deleted by a writer; under `deleted-tenants` for the tenants in `purged`. Their tasks, events
/// and queue items; and their payloads, log lines and objects.
fn expected(
    before: &BTreeMap<TaskKey, Known>,
    writes: &Writes,
    after: &BTreeMap<TaskKey, Known>,
    purged: &[Uuid],
) -> (Counts, DependentCounts) {
    let mut counts = Counts::new();
    let mut dependents = DependentCounts::new();
    for (key, known) in before.iter().chain(writes.inserted.iter()) {
        if after.contains_key(key) || writes.deleted.contains(key) {
            continue;
        }
        let rule = if purged.contains(&known.tenant) {
            "deleted-tenants"
        } else {
            "retention"
        };
        let c = counts.entry((known.tenant, rule.to_string())).or_default();
        c.0 += 1;
        c.1 += known.events.len() as i64;
        c.2 += known.items.len() as i64;
        let d = dependents
            .entry((known.tenant, rule.to_string()))
            .or_default();
        d.0 += known.payloads.len() as i64;
        d.1 += known.logs.len() as i64;
        d.2 += known.external.len() as i64;
    }
    (counts, dependents)
}

async fn receipts_of(pool: &PgPool, rules: &[&str]) -> Counts {
    receipt_sums(pool, rules, "tasks", "events", "queue_items").await
}

async fn dependent_receipts_of(pool: &PgPool, rules: &[&str]) -> DependentCounts {
    receipt_sums(pool, rules, "payloads", "logs", "objects").await
}

async fn receipt_sums(
    pool: &PgPool,
    rules: &[&str],
    a: &str,
    b: &str,
    c: &str,
) -> BTreeMap<(Uuid, String), (i64, i64, i64)> {
    let rows: Vec<(Uuid, String, i64, i64, i64)> = sqlx::query_as(&format!(
        "SELECT tenant_id, rule, sum({a})::bigint, sum({b})::bigint, sum({c})::bigint
           FROM retention_receipts GROUP BY 1, 2"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .filter(|r| rules.contains(&r.1.as_str()))
        .map(|(t, r, a, b, c)| ((t, r), (a, b, c)))
        .collect()
}

/// The due tenant's tasks (the writer deletes some of them itself).
async fn due_tasks(pool: &PgPool, tenant: Uuid) -> Vec<TaskKey> {
    sqlx::query_as("SELECT id, inserted_at FROM tasks WHERE tenant_id = $1 ORDER BY id LIMIT 300")
        .bind(tenant)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Seeds `n` due tasks of `tenant` at `at`, each with an event, a queue item, an input payload
/// kept inline, an output payload in the object store (on every second task) and a log line
/// (written now: within the log window, it goes with its task only).
async fn seed_due(pool: &PgPool, tenant: Uuid, at: DateTime<Utc>, n: i64) {
    sqlx::query(
        "WITH t AS (INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
                    SELECT $1, 'succeeded', $2, $2 + interval '1 hour' FROM generate_series(1, $3) RETURNING id, inserted_at),
              e AS (INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
                    SELECT $1, id, inserted_at, 'done', inserted_at FROM t),
              i AS (INSERT INTO task_payloads (tenant_id, task_id, task_inserted_at, kind, location, inline_content, size_bytes)
                    SELECT $1, id, inserted_at, 'input', 'inline', '\\x00', 1 FROM t),
              o AS (INSERT INTO task_payloads (tenant_id, task_id, task_inserted_at, kind, location, external_key, size_bytes)
                    SELECT $1, id, inserted_at, 'output', 'external', 'payloads/' || $1 || '/' || id, 10 FROM t
                     WHERE get_byte(uuid_send(id), 15) % 2 = 0),
              l AS (INSERT INTO task_logs (tenant_id, task_id, task_inserted_at, level, line)
                    SELECT $1, id, inserted_at, 'info', 'done' FROM t)
         INSERT INTO queue_items (tenant_id, task_id, task_inserted_at) SELECT $1, id, inserted_at FROM t",
    )
    .bind(tenant)
    .bind(at)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// Runs `run` while a writer writes, then compares the receipts under the task rules with the
/// ledger.
async fn with_writer<F, Fut>(
    pool: &PgPool,
    at: DateTime<Utc>,
    due_tenant: Uuid,
    purged: &[Uuid],
    run: F,
) -> String
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let kept = insert_tenant(pool, None, None).await;
    let due = due_tasks(pool, due_tenant).await;
    let before = snapshot(pool).await;
    let writes = Arc::new(Mutex::new(Writes::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(writer(
        pool.clone(),
        kept,
        at,
        due,
        writes.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = run().await;
    stop.store(true, Ordering::Relaxed);
    writing.await.unwrap();
    let after = snapshot(pool).await;
    let writes = std::mem::take(&mut *writes.lock().unwrap());
    assert!(!writes.inserted.is_empty(), "the writer wrote");
    let (expected, dependents) = expected(&before, &writes, &after, purged);
    let rules = ["retention", "deleted-tenants"];
    let got = receipts_of(pool, &rules).await;
    assert!(!expected.is_empty(), "something went: {report}");
    assert_eq!(got, expected, "receipts against the ledger: {report}");
    assert!(
        dependents
            .values()
            .all(|(p, l, o)| *p > 0 && *l > 0 && *o > 0),
        "payloads, log lines and objects went: {dependents:?}"
    );
    assert_eq!(
        dependent_receipts_of(pool, &rules).await,
        dependents,
        "payloads, log lines and objects in the receipts against the ledger: {report}"
    );
    report
}

fn history(compaction: bool) -> TaskHistoryTask {
    TaskHistoryTask::new(TaskHistorySettings {
        compaction,
        ..Default::default()
    })
}

async fn run(task: &dyn MaintenanceTask, pool: &PgPool) -> String {
    format!("{:?}", run_task(task, pool).await)
}

#[tokio::test]
async fn row_deletes_through_the_indexes_receipt_exactly() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    seed_due(pool, tenant, at, 300).await;
    let report = with_writer(pool, at, tenant, &[], || async {
        run(&history(false), pool).await
    })
    .await;
    assert!(!report.contains("ranges swept"), "{report}");
}

#[tokio::test]
async fn a_sweep_receipts_exactly() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    seed_due(pool, tenant, at, 15_000).await;
    let report = with_writer(pool, at, tenant, &[], || async {
        run(&history(false), pool).await
    })
    .await;
    assert!(report.contains("ranges swept"), "{report}");
}

#[tokio::test]
async fn a_purge_receipts_exactly() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let tenant = insert_tenant(pool, None, Some(now - Span::days(2))).await;
    seed_due(pool, tenant, at, 300).await;
    with_writer(pool, at, tenant, &[tenant], || async {
        run(&history(false), pool).await
    })
    .await;
}

#[tokio::test]
async fn a_compaction_receipts_exactly() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    seed_due(pool, tenant, at, 20_000).await;
    let report = with_writer(pool, at, tenant, &[], || async {
        run(&history(true), pool).await
    })
    .await;
    assert!(report.contains("ranges compacted"), "{report}");
}

#[tokio::test]
async fn a_merge_receipts_exactly() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let first = now.date_naive() - Span::days(12);
    create_day(pool, first).await;
    let (day1, day2) = (
        day_start(first) + Span::hours(12),
        day_start(first + Span::days(1)) + Span::hours(12),
    );
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    seed_due(pool, tenant, day1, 3_000).await;
    seed_due(pool, tenant, day2, 3_000).await;
    let all = ranges::all(pool).await.unwrap();
    let sources: Vec<_> = all
        .into_iter()
        .filter(|r| {
            r.lower == Some(day_start(first)) || r.lower == Some(day_start(first + Span::days(1)))
        })
        .collect();
    assert_eq!(sources.len(), 2);
    let report = with_writer(pool, day2, tenant, &[], || async {
        let ctx = RunContext::new(
            pool.clone(),
            Uuid::now_v7(),
            tokio_util::sync::CancellationToken::new(),
            Duration::from_secs(600),
            RunOptions::default(),
        )
        .with_clock(db_now(pool).await, tokio::time::Instant::now());
        let limits =
            repository::batch::BatchLimits::new(Duration::from_secs(30), Duration::from_secs(5))
                .with_generic_plans()
                .with_history_write();
        let steps = Steps {
            limits,
            lock_timeout: Duration::from_secs(5),
            grace: Duration::from_secs(86_400),
        };
        let mut report = RunReport::default();
        let outcome = rewrites::start(
            &ctx,
            &sources,
            "partitions",
            steps,
            true,
            Naming::Tables,
            &mut report,
        )
        .await
        .unwrap();
        assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
        format!("{report:?}")
    })
    .await;
    let _ = report;
}

/// Every event id of `tenant` now.
async fn events_of(pool: &PgPool, tenant: Uuid) -> BTreeSet<i64> {
    sqlx::query_scalar("SELECT id FROM task_events WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// A writer making orphans while a run goes: adds tasks of `tenant` with events two hours old
/// and deletes most of those tasks again (their events are then orphans, due), until `stop`.
/// Returns the events it added.
async fn orphan_maker(
    pool: PgPool,
    tenant: Uuid,
    at: DateTime<Utc>,
    stop: Arc<AtomicBool>,
) -> BTreeSet<i64> {
    let mut added = BTreeSet::new();
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let task = insert_task(&pool, tenant, "running", at, None).await;
        let created = db_now(&pool).await - Span::hours(2);
        for _ in 0..2 {
            added.insert(insert_event(&pool, tenant, task, created).await);
        }
        if !n.is_multiple_of(4) {
            sqlx::query("DELETE FROM tasks WHERE id = $1 AND inserted_at = $2")
                .bind(task.0)
                .bind(task.1)
                .execute(&pool)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    added
}

/// Orphan events (old enough) go with receipts of their own, by the walk and by the sweep, while
/// a writer makes more of them: the receipts name exactly the events that went.
#[tokio::test]
async fn orphan_events_receipt_exactly_by_the_walk_and_by_the_sweep() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let a = insert_tenant(pool, None, None).await;
    let b = insert_tenant(pool, None, None).await;
    let busy = insert_tenant(pool, None, None).await;
    for (tenant, n) in [(a, 3), (b, 5)] {
        for _ in 0..n {
            insert_event(pool, tenant, (Uuid::new_v4(), at), now - Span::hours(2)).await;
        }
    }
    let task = history(true);
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(orphan_maker(pool.clone(), busy, at, stop.clone()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    run_task(&task, pool).await;
    stop.store(true, Ordering::Relaxed);
    let added = writing.await.unwrap();
    let went = added.difference(&events_of(pool, busy).await).count() as i64;
    assert!(added.len() > 10, "the writer wrote: {}", added.len());
    let mut receipts = receipts_of(pool, &["orphan-events"]).await;
    let busy_receipt = receipts
        .remove(&(busy, "orphan-events".into()))
        .unwrap_or_default();
    assert_eq!(
        busy_receipt,
        (0, went, 0),
        "the writer's orphans that went, and only those"
    );
    assert_eq!(
        receipts,
        BTreeMap::from([
            ((a, "orphan-events".into()), (0, 3, 0)),
            ((b, "orphan-events".into()), (0, 5, 0))
        ])
    );
    sqlx::query("DELETE FROM retention_receipts WHERE tenant_id = $1")
        .bind(busy)
        .execute(pool)
        .await
        .unwrap();
    // Late orphans: their tasks deleted after the walk passed them; the sweep, a day later.
    let task_of_b = insert_task(pool, b, "running", at, None).await;
    for _ in 0..4 {
        insert_event(pool, b, task_of_b, now - Span::hours(2)).await;
    }
    run_task(&task, pool).await;
    sqlx::query("DELETE FROM tasks WHERE id = $1")
        .bind(task_of_b.0)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE retention_watermarks SET position = position - 86400 WHERE name = 'task-history.orphan-sweep.swept-at'").execute(pool).await.unwrap();
    run_task(&task, pool).await;
    // The writer's orphans that the first run left (orphaned after its walk) went since: all of them.
    let mut receipts = receipts_of(pool, &["orphan-events"]).await;
    let busy_later = receipts
        .remove(&(busy, "orphan-events".into()))
        .unwrap_or_default();
    let orphans_left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM task_events e WHERE e.tenant_id = $1
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)",
    )
    .bind(busy)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(orphans_left, 0, "every due orphan of the writer's is gone");
    assert_eq!(
        busy_later.1 + went,
        added.difference(&events_of(pool, busy).await).count() as i64,
        "the receipts name every event of the writer's that went, once"
    );
    assert_eq!(
        receipts,
        BTreeMap::from([
            ((a, "orphan-events".into()), (0, 3, 0)),
            ((b, "orphan-events".into()), (0, 9, 0))
        ])
    );
}

/// A worker while queue items are cleaned up: adds running tasks of `tenant` with a queue item,
/// finishes some (their items become due) and deletes others (theirs too), until `stop`.
/// Returns the items it added.
async fn queue_worker(pool: PgPool, tenant: Uuid, stop: Arc<AtomicBool>) -> BTreeSet<i64> {
    let mut added = BTreeSet::new();
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let now = db_now(&pool).await;
        let (task, _, item) = insert_task_with_children(&pool, tenant, "running", now, None).await;
        added.insert(item);
        let sql = match n % 3 {
            0 => "UPDATE tasks SET status = 'succeeded', finished_at = now() WHERE id = $1 AND inserted_at = $2",
            1 => "DELETE FROM tasks WHERE id = $1 AND inserted_at = $2",
            _ => "SELECT $1::uuid, $2::timestamptz",
        };
        sqlx::query(sql)
            .bind(task.0)
            .bind(task.1)
            .execute(&pool)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    added
}

/// The queue-items task's receipts, while a worker adds, finishes and deletes tasks: they name
/// exactly the items that went (the worker never deletes an item itself).
#[tokio::test]
async fn queue_item_cleanup_receipts_exactly() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = insert_tenant(pool, None, None).await;
    let busy = insert_tenant(pool, None, None).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = tokio::spawn(queue_worker(pool.clone(), busy, stop.clone()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut finished = BTreeSet::new();
    for n in 0..200 {
        let (_, _, item) = insert_task_with_children(
            pool,
            tenant,
            if n % 2 == 0 { "succeeded" } else { "running" },
            now,
            Some(now),
        )
        .await;
        if n % 2 == 0 {
            finished.insert(item);
        }
    }
    let summary = match run_once_with(
        &QueueItemsTask::new(QueueItemsSettings::default()),
        pool,
        &tokio_util::sync::CancellationToken::new(),
        &fixed_batches(),
    )
    .await
    .unwrap()
    {
        RunOutcome::Ran(summary) => summary,
        other => panic!("{other:?}"),
    };
    stop.store(true, Ordering::Relaxed);
    let added = writing.await.unwrap();
    assert!(added.len() > 10, "the worker wrote: {}", added.len());
    let left: BTreeSet<i64> = queue_item_ids(pool).await.into_iter().collect();
    assert!(finished.iter().all(|i| !left.contains(i)));
    let went = added.difference(&left).count() as i64;
    let mut expected = BTreeMap::from([(
        (tenant, "queue-items".into()),
        (0, 0, finished.len() as i64),
    )]);
    if went > 0 {
        expected.insert((busy, "queue-items".into()), (0, 0, went));
    }
    assert_eq!(
        receipts_of(pool, &["queue-items"]).await,
        expected,
        "{summary:?}"
    );
}
