//! Holds and rule changes bind on answer: once a hold (or a window change) has committed, no
//! delete that commits after it ignores it, whatever that delete was waiting for meanwhile (a row
//! lock, the history tables' lock). And a hold binds every path, the rewrite's replays and the
//! cleanup of queue items after it included.

mod common;

use std::time::Duration;

use chrono::Duration as Span;
use common::*;
use retention_controller::settings::TaskHistorySettings;
use retention_controller::tasks::task_history::TaskHistoryTask;
use sqlx::PgPool;
use uuid::Uuid;

async fn add_hold(pool: &PgPool, tenant: Uuid) {
    sqlx::query("INSERT INTO retention_holds (tenant_id, reason, created_by) VALUES ($1, 'litigation', 'test')")
        .bind(tenant)
        .execute(pool)
        .await
        .unwrap();
}

async fn wait_for(pool: &PgPool, what: &str, sql: &str) {
    let started = std::time::Instant::now();
    while !sqlx::query_scalar::<_, bool>(sql)
        .fetch_one(pool)
        .await
        .unwrap()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} never happened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn tasks_of(pool: &PgPool, tenant: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The range holding the instant `at`: its tasks and events partitions.
async fn partitions_at(pool: &PgPool, at: chrono::DateTime<chrono::Utc>) -> (String, String) {
    sqlx::query_as("SELECT tasks_relid::regclass::text, events_relid::regclass::text FROM history_ranges WHERE lower <= $1 AND upper > $1")
        .bind(at)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A sweep's batch waits for a worker's row lock; a hold on the tenant is created and answered
/// meanwhile. The batch, which read the rules before the hold, must not commit its deletes.
#[tokio::test]
async fn a_hold_answered_while_a_delete_waits_on_a_row_lock_binds_it() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let day = a_past_day(pool).await;
    let at = day_start(day) + Span::hours(12);
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    seed_tasks(pool, tenant, "succeeded", at, at + Span::hours(1), 15_000).await;
    // A worker holds the first task of the first page.
    let first: TaskKey = sqlx::query_as(
        "SELECT id, inserted_at FROM tasks WHERE ctid = '(0,1)' AND inserted_at = $1",
    )
    .bind(at)
    .fetch_one(pool)
    .await
    .unwrap();
    let mut worker = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM tasks WHERE id = $1 AND inserted_at = $2 FOR UPDATE")
        .bind(first.0)
        .bind(first.1)
        .execute(&mut *worker)
        .await
        .unwrap();
    let run = {
        let pool = pool.clone();
        let task = TaskHistoryTask::new(TaskHistorySettings {
            compaction: false,
            ..Default::default()
        });
        tokio::spawn(async move { run_task(&task, &pool).await })
    };
    wait_for(
        pool,
        "a batch waiting on the worker's row",
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                        WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE '%DELETE FROM%')",
    )
    .await;
    // Answered at once: the batch holds nothing a hold waits for.
    tokio::time::timeout(Duration::from_secs(5), add_hold(pool, tenant))
        .await
        .expect("the hold was answered");
    // (Another worker's batches, on other pages, may have committed before.)
    let left_at_answer = tasks_of(pool, tenant).await;
    worker.commit().await.unwrap();
    let report = run.await.unwrap();

    assert_eq!(
        tasks_of(pool, tenant).await,
        left_at_answer,
        "rows of the tenant went after its hold was answered: {report:?}"
    );
    assert!(
        report
            .counters
            .iter()
            .any(|(c, n)| *c == "batches run again" && *n >= 1),
        "{report:?}"
    );
}

/// A deleting transaction that has confirmed the rules holds them until it commits: a hold
/// created meanwhile waits, and is answered only after the delete committed.
#[tokio::test]
async fn a_hold_waits_for_a_delete_that_confirmed_the_rules_before_it() {
    use repository::history::deletes::{self, PairRef, Walk};
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let day = a_past_day(pool).await;
    let at = day_start(day) + Span::hours(12);
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    seed_tasks(pool, tenant, "succeeded", at, at + Span::hours(1), 10).await;
    let range = range_of_day(pool, day).await;
    let rule = repository::rule::Rule::new(now, Duration::from_secs(86_400));
    let receipt = repository::receipts::RunReceipt::new(Uuid::now_v7(), "task-history");
    let mut delete = pool.begin().await.unwrap();
    let batch = deletes::delete_batch(
        &mut delete,
        &PairRef::new(&range, tenant),
        &mut Walk::retained(repository::tenants::FinalStatus::Succeeded),
        &rule,
        4,
        &receipt,
    )
    .await
    .unwrap();
    assert_eq!(batch.deleted.tasks, 4);

    let hold = tokio::spawn({
        let pool = pool.clone();
        async move { add_hold(&pool, tenant).await }
    });
    wait_for(
        pool,
        "the hold waiting for the rules' lock",
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted)",
    )
    .await;
    assert!(!hold.is_finished());
    delete.commit().await.unwrap();
    hold.await.unwrap();
    assert_eq!(
        tasks_of(pool, tenant).await,
        6,
        "the delete committed before the hold, the rest is held"
    );
    run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;
    assert_eq!(tasks_of(pool, tenant).await, 6);
}

/// A rewrite waits for the history tables' lock to swap its copy in; a hold on a tenant whose due
/// rows the copy left out is answered meanwhile. The swap must not go ahead with that copy.
#[tokio::test]
async fn a_hold_answered_while_a_rewrite_waits_for_the_tables_lock_binds_it() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let day = a_past_day(pool).await;
    let at = day_start(day) + Span::hours(12);
    let daily = insert_tenant(pool, Some("1 day"), None).await;
    let held = insert_tenant(pool, Some("1 day"), None).await;
    seed_tasks(pool, daily, "succeeded", at, at + Span::hours(1), 5_000).await;
    seed_tasks(pool, held, "succeeded", at, at + Span::hours(1), 50).await;
    // A reader of `tasks` keeps the swap waiting for its lock.
    let mut reader = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE ONLY tasks IN ACCESS SHARE MODE")
        .execute(&mut *reader)
        .await
        .unwrap();
    let task = TaskHistoryTask::new(TaskHistorySettings::default())
        .with_compaction_lock_timeout(Duration::from_secs(60));
    let run = {
        let pool = pool.clone();
        tokio::spawn(async move { run_task(&task, &pool).await })
    };
    wait_for(
        pool,
        "the swap waiting for its lock",
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = 'tasks'::regclass AND mode = 'AccessExclusiveLock' AND NOT granted)",
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), add_hold(pool, held))
        .await
        .expect("the hold was answered");
    reader.rollback().await.unwrap();
    let report = run.await.unwrap();

    assert_eq!(
        tasks_of(pool, held).await,
        50,
        "the held tenant lost rows after its hold was answered: {report:?}"
    );
    assert_eq!(tasks_of(pool, daily).await, 0, "{report:?}");
}

/// A held task that the application deletes while a rewrite copies its range: its events and its
/// queue item are the hold's, and stay, through the rewrite's replays and the cleanup of the
/// queue items of the tasks that went.
#[tokio::test]
async fn a_held_tasks_events_and_queue_item_survive_its_deletion_during_a_rewrite() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let day = a_past_day(pool).await;
    let at = day_start(day) + Span::hours(12);
    let daily = insert_tenant(pool, Some("1 day"), None).await;
    let held = insert_tenant(pool, Some("1 day"), None).await;
    seed_tasks(pool, daily, "succeeded", at, at + Span::hours(1), 5_000).await;
    let task = insert_task(pool, held, "succeeded", at, Some(at)).await;
    let events = [
        insert_event(pool, held, task, at).await,
        insert_event(pool, held, task, at + MINUTE).await,
    ];
    let item = insert_queue_item(pool, held, task).await;
    add_hold(pool, held).await;
    let (_, events_part) = partitions_at(pool, at).await;
    // Stall the rewrite's copy of the events: it waits for this lock, after it copied the tasks.
    let mut stall = pool.begin().await.unwrap();
    sqlx::query(&format!(
        "LOCK TABLE {events_part} IN ACCESS EXCLUSIVE MODE"
    ))
    .execute(&mut *stall)
    .await
    .unwrap();
    let run = {
        let pool = pool.clone();
        tokio::spawn(async move {
            run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), &pool).await
        })
    };
    wait_for(
        pool,
        "the copy waiting for the events partition",
        &format!("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = '{events_part}'::regclass AND NOT granted)"),
    )
    .await;
    // The application deletes the held task meanwhile.
    sqlx::query("DELETE FROM tasks WHERE id = $1 AND inserted_at = $2")
        .bind(task.0)
        .bind(task.1)
        .execute(pool)
        .await
        .unwrap();
    stall.rollback().await.unwrap();
    let report = run.await.unwrap();

    assert!(
        report.counters.contains(&("ranges compacted", 1)),
        "{report:?}"
    );
    let left = event_ids(pool).await;
    assert!(
        events.iter().all(|e| left.contains(e)),
        "the held task's events went: {left:?}"
    );
    assert!(
        queue_item_ids(pool).await.contains(&item),
        "the held task's queue item went"
    );
    assert_eq!(tasks_of(pool, daily).await, 0);
}

/// An operator's server defaults to REPEATABLE READ: the engine's deleting transactions still run
/// under READ COMMITTED (the rules' check must read the rules as they are at its commit, not as of
/// the transaction's first statement), so they work, and a hold binds them; and the check refuses
/// to run in any transaction that is not READ COMMITTED.
#[tokio::test]
async fn deletes_run_read_committed_whatever_the_servers_default() {
    let db = TestDatabase::new().await;
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE {name} SET default_transaction_isolation = 'repeatable read'"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let pool = &sqlx::PgPool::connect(&db.url).await.unwrap();
    let isolation: String = sqlx::query_scalar("SHOW default_transaction_isolation")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(isolation, "repeatable read");

    let day = a_past_day(pool).await;
    let at = day_start(day) + Span::hours(12);
    let (due, held) = (
        insert_tenant(pool, Some("1 day"), None).await,
        insert_tenant(pool, Some("1 day"), None).await,
    );
    seed_tasks(pool, due, "succeeded", at, at + Span::hours(1), 10).await;
    seed_tasks(pool, held, "succeeded", at, at + Span::hours(1), 10).await;
    add_hold(pool, held).await;
    run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;
    assert_eq!(tasks_of(pool, due).await, 0, "the due tenant's rows went");
    assert_eq!(tasks_of(pool, held).await, 10, "the held tenant's stayed");

    let mut tx = pool.begin().await.unwrap();
    let error =
        sqlx::query("SELECT retention_rules_unchanged((SELECT version FROM retention_rules))")
            .execute(&mut *tx)
            .await
            .unwrap_err();
    assert!(
        error.to_string().contains("needs READ COMMITTED"),
        "the check refused a REPEATABLE READ transaction: {error}"
    );
}
