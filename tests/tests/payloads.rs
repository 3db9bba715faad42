//! Task payloads and log lines: they leave with their task (with exact receipts, and the objects
//! of external payloads given to the outbox in the same transaction), log lines also by their
//! own window, and their day partitions take an insert at any date.

mod common;

use std::collections::BTreeSet;

use chrono::Duration as Span;
use common::*;
use repository::payloads::{self, Content, Kind};
use retention_controller::settings::{PartitionsSettings, TaskHistorySettings};
use retention_controller::tasks::partitions::PartitionsTask;
use retention_controller::tasks::task_history::TaskHistoryTask;
use sqlx::PgPool;
use uuid::Uuid;

/// An inline input and an external output (its key as the engine makes it), and two log lines
/// written `logged` ago, of `task`. Returns the external key.
async fn dependents(pool: &PgPool, tenant: Uuid, task: TaskKey, logged: Span) -> String {
    let id = payloads::reserve_id(pool).await.unwrap();
    payloads::insert(
        pool,
        id,
        tenant,
        task,
        Kind::Input,
        &Content::Inline(b"{\"n\": 1}".to_vec()),
    )
    .await
    .unwrap();
    let id = payloads::reserve_id(pool).await.unwrap();
    let key = format!(
        "payloads/{tenant}/{}/{id}",
        task.1.date_naive().format("%Y-%m-%d")
    );
    payloads::insert(
        pool,
        id,
        tenant,
        task,
        Kind::Output,
        &Content::External {
            key: key.clone(),
            size: 1000,
        },
    )
    .await
    .unwrap();
    let at = db_now(pool).await - logged;
    for line in ["started", "done"] {
        payloads::insert_log(pool, tenant, task, at, "info", line)
            .await
            .unwrap();
    }
    key
}

async fn keys(pool: &PgPool, sql: &str) -> BTreeSet<String> {
    sqlx::query_scalar(sql)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn payloads_and_logs_leave_with_their_task_and_objects_go_to_the_outbox_with_exact_receipts()
{
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let daily = insert_tenant(pool, Some("1 day"), None).await;
    let mut due_keys = BTreeSet::new();
    let mut kept_keys = BTreeSet::new();
    for i in 0..60 {
        let finished = if i < 50 {
            now - Span::days(3)
        } else {
            now - Span::hours(1)
        };
        let (task, _, _) =
            insert_task_with_children(pool, daily, "succeeded", at, Some(finished)).await;
        let key = dependents(pool, daily, task, Span::hours(1)).await;
        if i < 50 {
            due_keys.insert(key);
        } else {
            kept_keys.insert(key);
        }
    }
    let report = run_task(
        &TaskHistoryTask::new(TaskHistorySettings {
            compaction: false,
            ..Default::default()
        }),
        pool,
    )
    .await;
    assert_eq!(
        keys(
            pool,
            "SELECT external_key FROM task_payloads WHERE external_key IS NOT NULL"
        )
        .await,
        kept_keys
    );
    let inline_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM task_payloads WHERE location = 'inline'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(inline_left, 10);
    let logs_left: i64 = sqlx::query_scalar("SELECT count(*) FROM task_logs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(logs_left, 20);
    assert_eq!(
        keys(pool, "SELECT object_key FROM object_deletions").await,
        due_keys,
        "exactly the objects of the payloads that went are in the outbox"
    );
    let receipts = repository::receipts::list(pool, Some(daily), None, 100)
        .await
        .unwrap();
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    let r = &receipts[0];
    assert_eq!(
        (
            r.rule.as_str(),
            r.tasks,
            r.events,
            r.queue_items,
            r.payloads,
            r.logs,
            r.objects
        ),
        ("retention", 50, 50, 50, 100, 100, 50),
        "{report:?}"
    );
}

#[tokio::test]
async fn log_lines_go_by_their_own_window_per_tenant_and_never_under_a_hold() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    // Tasks kept forever: their log lines go by the log window alone.
    let plain = insert_tenant(pool, None, None).await;
    let longer = insert_tenant(pool, None, None).await;
    sqlx::query("UPDATE tenants SET log_retention_period = '30 days' WHERE id = $1")
        .bind(longer)
        .execute(pool)
        .await
        .unwrap();
    let held = insert_tenant(pool, None, None).await;
    sqlx::query(
        "INSERT INTO retention_holds (tenant_id, reason, created_by) VALUES ($1, 'audit', 'test')",
    )
    .bind(held)
    .execute(pool)
    .await
    .unwrap();
    let mut expected_left = BTreeSet::new();
    for tenant in [plain, longer, held] {
        let (task, _, _) = insert_task_with_children(pool, tenant, "succeeded", at, Some(at)).await;
        let now = db_now(pool).await;
        // Each side of the 7-day default and of the 30-day override.
        for (age, plain_keeps, longer_keeps) in [
            (Span::days(7) - Span::minutes(5), true, true),
            (Span::days(7) + Span::minutes(5), false, true),
            (Span::days(30) - Span::minutes(5), false, true),
            (Span::days(30) + Span::minutes(5), false, false),
        ] {
            let id = payloads::insert_log(pool, tenant, task, now - age, "info", "line")
                .await
                .unwrap();
            let keeps = if tenant == plain {
                plain_keeps
            } else if tenant == longer {
                longer_keeps
            } else {
                true
            };
            if keeps {
                expected_left.insert(id);
            }
        }
    }
    // A task of `plain` held by its id, with more old lines than a batch takes: kept, and no
    // batch stalls on them (the other tenants' lines still go).
    let (held_task, _, _) = insert_task_with_children(pool, plain, "succeeded", at, Some(at)).await;
    sqlx::query("INSERT INTO retention_holds (tenant_id, task_id, reason, created_by) VALUES ($1, $2, 'one task', 'test')")
        .bind(plain)
        .bind(held_task.0)
        .execute(pool)
        .await
        .unwrap();
    let now = db_now(pool).await;
    for _ in 0..5 {
        expected_left.insert(
            payloads::insert_log(pool, plain, held_task, now - Span::days(60), "info", "held")
                .await
                .unwrap(),
        );
    }
    let report = run_task(
        &TaskHistoryTask::new(TaskHistorySettings {
            batch_size: 2,
            ..Default::default()
        }),
        pool,
    )
    .await;
    assert!(report.batches < 20, "{report:?}");
    let left: BTreeSet<i64> = sqlx::query_scalar("SELECT id FROM task_logs")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(left, expected_left);
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(tasks, 4, "the log window deletes no task");
    let receipts: Vec<(Uuid, String, i64)> =
        sqlx::query_as("SELECT tenant_id, rule, logs FROM retention_receipts ORDER BY logs")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(
        receipts,
        vec![
            (longer, "log-retention".to_string(), 1),
            (plain, "log-retention".to_string(), 3)
        ]
    );
}

#[tokio::test]
async fn payloads_and_logs_take_an_insert_at_any_date_and_their_empty_past_days_are_dropped() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let tenant = insert_tenant(pool, None, None).await;
    let now = db_now(pool).await;
    // Before any day partition exists, far in the past and far ahead: the default takes them.
    let far_past = now - Span::days(4000);
    let far_ahead = now + Span::days(4000);
    for at in [far_past, far_ahead] {
        let task = insert_task(pool, tenant, "running", at, None).await;
        dependents(pool, tenant, task, Span::zero()).await;
    }
    // Today's rows already in the default: today keeps them there, the days ahead get partitions.
    let today_task = insert_task(pool, tenant, "running", now, None).await;
    dependents(pool, tenant, today_task, Span::zero()).await;
    let partitions = PartitionsTask::new(
        PartitionsSettings::default(),
        std::time::Duration::from_secs(86_400),
    );
    run_task(&partitions, pool).await;
    let children = |table: &'static str| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = $1::regclass ORDER BY 1",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .unwrap()
    };
    let tomorrow = now.date_naive() + Span::days(1);
    for table in ["task_payloads", "task_logs"] {
        let names = children(table).await;
        assert!(names.contains(&format!("{table}_default")), "{names:?}");
        assert!(
            !names.contains(&payloads::day_table(table, now.date_naive())),
            "today's rows are in the default: no partition for today: {names:?}"
        );
        assert!(
            names.contains(&payloads::day_table(table, tomorrow)),
            "{names:?}"
        );
    }
    // A row of tomorrow lands in tomorrow's partition; any date still works.
    let tomorrow_task = insert_task(
        pool,
        tenant,
        "running",
        day_start(tomorrow) + Span::hours(1),
        None,
    )
    .await;
    dependents(pool, tenant, tomorrow_task, Span::zero()).await;
    let home: String = sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM task_payloads WHERE task_id = $1 LIMIT 1",
    )
    .bind(tomorrow_task.0)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(home, payloads::day_table("task_payloads", tomorrow));

    // Empty day partitions two days past go; one with a row stays.
    let mut conn = pool.acquire().await.unwrap();
    let dropped = payloads::drop_empty_days(
        &mut conn,
        tomorrow + Span::days(3),
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert!(
        !dropped.contains(&payloads::day_table("task_payloads", tomorrow)),
        "{dropped:?}"
    );
    assert!(
        dropped.contains(&payloads::day_table(
            "task_payloads",
            tomorrow + Span::days(1)
        )),
        "{dropped:?}"
    );
    let payload_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM task_payloads")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(payload_rows, 8, "nothing was lost to a partition change");
}

#[tokio::test]
async fn a_payload_row_must_say_where_its_bytes_are() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let tenant = insert_tenant(pool, None, None).await;
    let now = db_now(pool).await;
    for (location, inline, key) in [
        ("inline", None, None),
        ("inline", Some(vec![1u8]), Some("k")),
        ("external", Some(vec![1u8]), Some("k")),
        ("external", None, None),
        ("elsewhere", None, Some("k")),
    ] {
        let result = sqlx::query(
            "INSERT INTO task_payloads (tenant_id, task_id, task_inserted_at, kind, location, inline_content, external_key, size_bytes)
             VALUES ($1, $2, $3, 'input', $4, $5, $6, 1)",
        )
        .bind(tenant)
        .bind(Uuid::new_v4())
        .bind(now)
        .bind(location)
        .bind(inline)
        .bind(key)
        .execute(pool)
        .await;
        let error = result.expect_err("refused");
        assert_eq!(
            error.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("23514"),
            "{location}: {error}"
        );
    }
}

#[tokio::test]
async fn payloads_and_logs_of_a_task_the_application_deleted_go_after_an_hour_unless_held() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let tenant = insert_tenant(pool, None, None).await;
    let held = insert_tenant(pool, None, None).await;
    sqlx::query(
        "INSERT INTO retention_holds (tenant_id, reason, created_by) VALUES ($1, 'audit', 'test')",
    )
    .bind(held)
    .execute(pool)
    .await
    .unwrap();
    // Tasks kept forever, deleted by the application; their payloads and lines written 2 hours
    // ago (orphans once the task is gone) or 30 minutes ago (too young: the task may be
    // uncommitted yet).
    let mut old_keys = BTreeSet::new();
    let mut kept_keys = BTreeSet::new();
    for (owner, age, goes) in [
        (tenant, Span::hours(2), true),
        (tenant, Span::minutes(30), false),
        (held, Span::hours(2), false),
    ] {
        let (task, _, _) = insert_task_with_children(pool, owner, "succeeded", at, Some(at)).await;
        let key = dependents(pool, owner, task, age).await;
        sqlx::query(
            "UPDATE task_payloads SET created_at = now() - $2::interval WHERE task_id = $1",
        )
        .bind(task.0)
        .bind(format!("{} seconds", age.num_seconds()))
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("DELETE FROM tasks WHERE id = $1")
            .bind(task.0)
            .execute(pool)
            .await
            .unwrap();
        if goes {
            old_keys.insert(key);
        } else {
            kept_keys.insert(key);
        }
    }
    // And a task still there: its payload and lines stay whatever their age.
    let (live, _, _) = insert_task_with_children(pool, tenant, "succeeded", at, Some(at)).await;
    kept_keys.insert(dependents(pool, tenant, live, Span::hours(3)).await);

    run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;
    assert_eq!(
        keys(
            pool,
            "SELECT external_key FROM task_payloads WHERE external_key IS NOT NULL"
        )
        .await,
        kept_keys
    );
    assert_eq!(
        keys(pool, "SELECT object_key FROM object_deletions").await,
        old_keys
    );
    let logs: i64 = sqlx::query_scalar("SELECT count(*) FROM task_logs")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(logs, 6, "two lines each of the three tasks kept");
    let receipts: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT rule, payloads, logs, objects FROM retention_receipts WHERE tenant_id = $1 AND rule LIKE 'orphan-%s' AND rule <> 'orphan-events' ORDER BY rule",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        receipts,
        vec![
            ("orphan-logs".to_string(), 0, 2, 0),
            ("orphan-payloads".to_string(), 2, 0, 1)
        ]
    );
}
