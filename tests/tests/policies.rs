//! Retention policies beyond one window: a window per final status, holds on a tenant or a task
//! (honoured by every path that deletes), deletion receipts that match what was deleted, and
//! previews that change nothing.

mod common;

use std::collections::BTreeMap;

use chrono::{DateTime, Duration as Span, Utc};
use common::*;
use repository::tenants::FinalStatus;
use retention_controller::holds::{self, HoldError, HoldRequest};
use retention_controller::settings::{QueueItemsSettings, TaskHistorySettings};
use retention_controller::tasks::queue_items::QueueItemsTask;
use retention_controller::tasks::task_history::TaskHistoryTask;
use retention_controller::tenant_retention::{self, RetentionError, Setting};
use sqlx::PgPool;
use uuid::Uuid;

fn history() -> TaskHistoryTask {
    TaskHistoryTask::new(TaskHistorySettings::default())
}

fn no_compaction() -> TaskHistoryTask {
    TaskHistoryTask::new(TaskHistorySettings {
        compaction: false,
        ..Default::default()
    })
}

async fn set(pool: &PgPool, tenant: Uuid, status: Option<&str>, value: &str) {
    let status = status.map(|s| tenant_retention::parse_status(s).unwrap());
    tenant_retention::set(
        pool,
        &tenant.to_string(),
        &[Setting::parse(status, value).unwrap()],
    )
    .await
    .unwrap();
}

async fn hold(
    pool: &PgPool,
    tenant: Uuid,
    task: Option<Uuid>,
    until: Option<DateTime<Utc>>,
) -> i64 {
    let request = HoldRequest {
        tenant: tenant.to_string(),
        task: task.map(|t| t.to_string()),
        reason: "litigation".into(),
        until: until.map(|u| u.to_rfc3339()),
    };
    holds::add(pool, &request, "test").await.unwrap().id
}

/// Noon of a day ten days back, given a range of its own.
async fn a_past_noon(pool: &PgPool) -> DateTime<Utc> {
    day_start(a_past_day(pool).await) + Span::hours(12)
}

/// `n` tasks of `tenant` in `status` inserted and finished at `at`, with an event each.
async fn seed(pool: &PgPool, tenant: Uuid, status: &str, at: DateTime<Utc>, n: i64) {
    seed_tasks(pool, tenant, status, at, at, n).await;
}

async fn count(pool: &PgPool, sql: &str, tenant: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(tenant)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn each_final_status_keeps_exactly_its_own_window() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let long_ago = now - Span::days(400);
    let tenant = insert_tenant(pool, Some("2 days"), None).await;
    set(pool, tenant, Some("failed"), "10days").await;
    set(pool, tenant, Some("cancelled"), "forever").await;
    // A tenant keeping forever by default, with one status kept a day.
    let forever = insert_tenant(pool, None, None).await;
    set(pool, forever, Some("succeeded"), "1day").await;
    let (mut gone, mut kept) = (Expect::default(), Expect::default());
    for (who, status, window) in [
        (tenant, "succeeded", Some(Span::days(2))),
        (tenant, "failed", Some(Span::days(10))),
        (tenant, "cancelled", None),
        (forever, "succeeded", Some(Span::days(1))),
        (forever, "failed", None),
        (forever, "cancelled", None),
    ] {
        match window {
            Some(window) => {
                gone.add(
                    insert_task_with_children(
                        pool,
                        who,
                        status,
                        long_ago,
                        Some(now - window - MINUTE),
                    )
                    .await,
                );
                kept.add_without_item(
                    insert_task_with_children(
                        pool,
                        who,
                        status,
                        long_ago,
                        Some(now - window + MINUTE),
                    )
                    .await,
                );
            }
            None => kept.add_without_item(
                insert_task_with_children(pool, who, status, long_ago, Some(long_ago)).await,
            ),
        }
    }
    let got = tenant_retention::get(pool, &tenant.to_string())
        .await
        .unwrap();
    assert_eq!(
        got.window(FinalStatus::Failed),
        Some(std::time::Duration::from_secs(10 * 86_400))
    );
    assert_eq!(got.window(FinalStatus::Cancelled), None);
    assert_eq!(
        got.window(FinalStatus::Succeeded),
        Some(std::time::Duration::from_secs(2 * 86_400))
    );

    let report = run_task(&history(), pool).await;

    same(
        task_keys(pool).await,
        sorted_keys(kept.tasks.clone()),
        "tasks",
    );
    same(
        event_ids(pool).await,
        sorted_ids(kept.events.clone()),
        "events",
    );
    assert_eq!(
        report
            .by_rule
            .iter()
            .find(|(r, _)| *r == "retention")
            .map(|(_, n)| *n),
        Some(3),
        "{report:?}"
    );
    // Back to the default: the failed task kept by its own window is due under the tenant's 2 days.
    set(pool, tenant, Some("failed"), "default").await;
    run_task(&history(), pool).await;
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM tasks WHERE tenant_id = $1 AND status = 'failed'",
            tenant
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_dense_day_swept_and_one_walked_keep_each_status_window() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let at = a_past_noon(pool).await;
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    set(pool, tenant, Some("failed"), "30days").await;
    seed(pool, tenant, "succeeded", at, 15_000).await;
    seed(pool, tenant, "failed", at, 2_000).await;

    let report = run_task(&no_compaction(), pool).await;

    assert!(report.counters.contains(&("ranges swept", 1)), "{report:?}");
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM tasks WHERE tenant_id = $1 AND status = 'succeeded'",
            tenant
        )
        .await,
        0
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM tasks WHERE tenant_id = $1 AND status = 'failed'",
            tenant
        )
        .await,
        2_000
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM task_events WHERE tenant_id = $1",
            tenant
        )
        .await,
        2_000
    );
    // The failed tasks' pair stays due by the shortest window; the next run walks it and deletes nothing.
    let again = run_task(&no_compaction(), pool).await;
    assert_eq!(again.deleted, 0, "{again:?}");
}

/// Every path that deletes run history leaves held rows alone: row deletes through the indexes,
/// a sweep of a dense day, a compaction, the purge of a deleted tenant, queue items, and orphan
/// events; once the hold is removed (or ends), they go like any other.
#[tokio::test]
async fn holds_survive_every_deleting_path_until_removed() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let at = a_past_noon(pool).await;
    let long_ago = now - Span::days(400);
    // A held tenant, a tenant with one held task (in a dense day that is swept), a deleted tenant
    // past its grace with a held task, and a tenant held until an hour from now.
    let held = insert_tenant(pool, Some("1 day"), None).await;
    let one_task = insert_tenant(pool, Some("1 day"), None).await;
    let deleted = insert_tenant(pool, Some("1 day"), Some(now - Span::days(3))).await;
    let for_an_hour = insert_tenant(pool, Some("1 day"), None).await;
    seed(pool, one_task, "succeeded", at, 15_000).await;
    let held_row =
        insert_task_with_children(pool, held, "succeeded", long_ago, Some(long_ago)).await;
    let held_in_day = insert_task_with_children(pool, one_task, "failed", at, Some(at)).await;
    let held_of_deleted = insert_task_with_children(pool, deleted, "running", at, None).await;
    let other_of_deleted = insert_task_with_children(pool, deleted, "running", at, None).await;
    let hour_row =
        insert_task_with_children(pool, for_an_hour, "succeeded", long_ago, Some(long_ago)).await;
    // Orphans (their task is gone) two hours old: of the held tenant and of another.
    let held_orphan =
        insert_event(pool, held, (Uuid::new_v4(), long_ago), now - Span::hours(2)).await;
    let free_orphan = insert_event(
        pool,
        one_task,
        (Uuid::new_v4(), long_ago),
        now - Span::hours(2),
    )
    .await;
    let tenant_hold = hold(pool, held, None, None).await;
    let task_hold = hold(pool, one_task, Some(held_in_day.0 .0), None).await;
    hold(pool, deleted, Some(held_of_deleted.0 .0), None).await;
    hold(pool, for_an_hour, None, Some(now + Span::hours(1))).await;

    let report = run_task(&no_compaction(), pool).await;
    assert!(report.counters.contains(&("ranges swept", 1)), "{report:?}");
    run_task(&QueueItemsTask::new(QueueItemsSettings::default()), pool).await;

    let tasks = task_keys(pool).await;
    for (what, row) in [
        ("held tenant", held_row),
        ("held task in a swept day", held_in_day),
        ("held task of a deleted tenant", held_of_deleted),
        ("tenant held for an hour", hour_row),
    ] {
        assert!(tasks.contains(&row.0), "{what}: task gone");
        assert!(event_ids(pool).await.contains(&row.1), "{what}: event gone");
        assert!(
            queue_item_ids(pool).await.contains(&row.2),
            "{what}: queue item gone"
        );
    }
    assert!(
        !tasks.contains(&other_of_deleted.0),
        "the deleted tenant's other task went"
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM tasks WHERE tenant_id = $1",
            one_task
        )
        .await,
        1,
        "only the held task is left of the swept day"
    );
    let events = event_ids(pool).await;
    assert!(
        events.contains(&held_orphan) && !events.contains(&free_orphan),
        "orphans: the held tenant's stays"
    );

    // Removed: the rows go at the next run.
    holds::remove(pool, tenant_hold, "test", Some("case closed"))
        .await
        .unwrap();
    holds::remove(pool, task_hold, "test", None).await.unwrap();
    run_task(&history(), pool).await;
    let tasks = task_keys(pool).await;
    assert!(
        !tasks.contains(&held_row.0) && !tasks.contains(&held_in_day.0),
        "released rows go"
    );
    assert!(
        tasks.contains(&held_of_deleted.0) && tasks.contains(&hour_row.0),
        "the other holds still hold"
    );
    let record = repository::holds::get(pool, tenant_hold)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            record.created_by.as_str(),
            record.removed_by.as_deref(),
            record.removed_reason.as_deref(),
            record.active
        ),
        ("test", Some("test"), Some("case closed"), false)
    );
}

/// A compaction copies held rows like any kept row, whether the hold is on the tenant or a task.
#[tokio::test]
async fn a_compacted_day_keeps_its_held_rows() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let at = a_past_noon(pool).await;
    let daily = insert_tenant(pool, Some("1 day"), None).await;
    let held = insert_tenant(pool, Some("1 day"), None).await;
    seed(pool, daily, "succeeded", at, 3_000).await;
    let held_task = insert_task_with_children(pool, daily, "succeeded", at, Some(at)).await;
    let held_tenant_task = insert_task_with_children(pool, held, "cancelled", at, Some(at)).await;
    hold(pool, daily, Some(held_task.0 .0), None).await;
    hold(pool, held, None, None).await;

    let report = run_task(&history(), pool).await;

    assert!(
        report.counters.contains(&("ranges compacted", 1)),
        "{report:?}"
    );
    let tasks = task_keys(pool).await;
    assert_eq!(tasks, sorted_keys(vec![held_task.0, held_tenant_task.0]));
    assert_eq!(
        event_ids(pool).await,
        sorted_ids(vec![held_task.1, held_tenant_task.1])
    );
}

#[tokio::test]
async fn holds_refuse_bad_requests_and_change_nothing() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    let other = insert_tenant(pool, Some("1 day"), None).await;
    let task = insert_task(pool, other, "succeeded", now, Some(now)).await;
    let ok = HoldRequest {
        tenant: tenant.to_string(),
        reason: "audit".into(),
        ..Default::default()
    };
    let cases = [
        (
            HoldRequest {
                tenant: "no-such-tenant".into(),
                ..ok.clone()
            },
            HoldError::UnknownTenant("no-such-tenant".into()),
        ),
        (
            HoldRequest {
                task: Some(task.0.to_string()),
                ..ok.clone()
            },
            HoldError::UnknownTask {
                tenant: format!("t-{tenant}"),
                task: task.0,
            },
        ),
        (
            HoldRequest {
                task: Some("not-a-uuid".into()),
                ..ok.clone()
            },
            HoldError::InvalidTask("not-a-uuid".into()),
        ),
        (
            HoldRequest {
                reason: " ".into(),
                ..ok.clone()
            },
            HoldError::NoReason,
        ),
        (
            HoldRequest {
                until: Some("tomorrow".into()),
                ..ok.clone()
            },
            HoldError::InvalidUntil("tomorrow".into()),
        ),
    ];
    for (request, expected) in cases {
        let got = holds::add(pool, &request, "test").await.unwrap_err();
        match (&got, &expected) {
            (HoldError::UnknownTask { task: a, .. }, HoldError::UnknownTask { task: b, .. }) => {
                assert_eq!(a, b)
            }
            _ => assert_eq!(got, expected),
        }
    }
    let past = HoldRequest {
        until: Some((now - Span::minutes(1)).to_rfc3339()),
        ..ok.clone()
    };
    assert!(matches!(
        holds::add(pool, &past, "test").await,
        Err(HoldError::UntilPassed { .. })
    ));
    assert!(matches!(
        holds::remove(pool, 999, "test", None).await,
        Err(HoldError::UnknownHold(999))
    ));
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM retention_holds")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(none, 0, "nothing was recorded");
    let id = holds::add(pool, &ok, "test").await.unwrap().id;
    holds::remove(pool, id, "test", None).await.unwrap();
    assert_eq!(
        holds::remove(pool, id, "test", None).await.unwrap_err(),
        HoldError::AlreadyRemoved(id)
    );
}

#[tokio::test]
async fn bad_status_windows_are_refused_and_change_nothing() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let tenant = insert_tenant(pool, Some("7 days"), None).await;
    assert_eq!(
        tenant_retention::parse_status("done").unwrap_err(),
        RetentionError::InvalidStatus("done".into())
    );
    assert!(matches!(
        Setting::parse(Some(FinalStatus::Failed), "5m"),
        Err(RetentionError::Invalid { .. })
    ));
    assert!(matches!(
        Setting::parse(None, "default"),
        Err(RetentionError::Invalid { .. })
    ));
    let before = tenant_retention::get(pool, &tenant.to_string())
        .await
        .unwrap();
    // One bad setting among good ones: none applies.
    let settings = [
        Setting::parse(Some(FinalStatus::Failed), "30days").unwrap(),
        Setting {
            status: None,
            window: repository::tenants::StatusWindow::Default,
        },
    ];
    assert!(tenant_retention::set(pool, &tenant.to_string(), &settings)
        .await
        .is_err());
    assert_eq!(
        tenant_retention::get(pool, &tenant.to_string())
            .await
            .unwrap(),
        before
    );
}

/// What a preview says the next run would delete is what it deletes, and the preview changes
/// nothing.
#[tokio::test]
async fn a_preview_counts_what_the_run_then_deletes_and_changes_nothing() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = insert_tenant(pool, Some("30 days"), None).await;
    for (status, age) in [
        ("succeeded", 5),
        ("succeeded", 40),
        ("failed", 5),
        ("failed", 12),
        ("cancelled", 2),
    ] {
        let at = now - Span::days(age);
        insert_task_with_children(pool, tenant, status, at, Some(at)).await;
    }
    let settings = [
        Setting::parse(None, "3days").unwrap(),
        Setting::parse(Some(FinalStatus::Failed), "10days").unwrap(),
    ];
    let limits = tenant_retention::PreviewLimits {
        grace: std::time::Duration::from_secs(86_400),
        statement_timeout: std::time::Duration::from_secs(30),
    };
    let preview = tenant_retention::preview(pool, &tenant.to_string(), &settings, limits)
        .await
        .unwrap();
    assert_eq!(
        preview.tasks,
        vec![("succeeded".to_string(), 2), ("failed".to_string(), 1)]
    );
    assert_eq!(preview.events, 3);
    let unchanged = tenant_retention::get(pool, &tenant.to_string())
        .await
        .unwrap();
    assert_eq!(
        (unchanged.retention, unchanged.by_status.len()),
        (Some(std::time::Duration::from_secs(30 * 86_400)), 0)
    );
    assert_eq!(
        run_task(&history(), pool)
            .await
            .by_rule
            .iter()
            .find(|(r, _)| *r == "retention")
            .map(|(_, n)| *n),
        Some(1)
    );

    tenant_retention::set(pool, &tenant.to_string(), &settings)
        .await
        .unwrap();
    let report = run_task(&history(), pool).await;
    assert_eq!(
        report
            .by_rule
            .iter()
            .find(|(r, _)| *r == "retention")
            .map(|(_, n)| *n),
        Some(2),
        "{report:?}"
    );
}

/// A preview writes nothing: a tenant insert, a window change and a hold never wait behind one,
/// however long its count takes, and the count itself stops at `statement_timeout`.
#[tokio::test]
async fn a_preview_never_blocks_writers_and_has_a_statement_timeout() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let day = a_past_day(pool).await;
    let at = day_start(day) + Span::hours(12);
    let tenant = insert_tenant(pool, Some("30 days"), None).await;
    let other = insert_tenant(pool, Some("30 days"), None).await;
    insert_task(pool, tenant, "succeeded", at, Some(at)).await;
    let tasks_part: String = sqlx::query_scalar(
        "SELECT tasks_relid::regclass::text FROM history_ranges WHERE lower <= $1 AND upper > $1",
    )
    .bind(at)
    .fetch_one(pool)
    .await
    .unwrap();
    // Something slow in the preview's count: here, a lock its read waits for.
    let mut stall = pool.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {tasks_part} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *stall)
        .await
        .unwrap();
    let preview = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let limits = tenant_retention::PreviewLimits {
                grace: std::time::Duration::from_secs(86_400),
                statement_timeout: std::time::Duration::from_secs(3),
            };
            tenant_retention::preview(
                &pool,
                &tenant.to_string(),
                &[Setting::parse(None, "1day").unwrap()],
                limits,
            )
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!preview.is_finished(), "the preview is counting");
    let writes = async {
        sqlx::query("INSERT INTO tenants (slug, name) VALUES ('new-one', 'new-one')")
            .execute(pool)
            .await
            .unwrap();
        set(pool, other, None, "7days").await;
        set(pool, tenant, Some("failed"), "60days").await;
        hold(pool, tenant, None, None).await;
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), writes)
        .await
        .expect("writes waited behind a preview");
    let counted = preview.await.unwrap();
    assert!(
        matches!(&counted, Err(RetentionError::Database(message)) if message.contains("statement timeout")),
        "{counted:?}"
    );
    stall.rollback().await.unwrap();
}

/// What was deleted per tenant, from a ledger kept before the runs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Deleted {
    tasks: i64,
    events: i64,
    oldest: Option<DateTime<Utc>>,
    newest: Option<DateTime<Utc>>,
}

async fn ledger(pool: &PgPool) -> BTreeMap<(Uuid, Uuid, DateTime<Utc>), (DateTime<Utc>, i64)> {
    type Row = (Uuid, Uuid, DateTime<Utc>, DateTime<Utc>, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT t.tenant_id, t.id, t.inserted_at, coalesce(t.finished_at, t.inserted_at),
                (SELECT count(*) FROM task_events e WHERE e.task_id = t.id AND e.task_inserted_at = t.inserted_at)
         FROM tasks t",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(tenant, id, at, key, events)| ((tenant, id, at), (key, events)))
        .collect()
}

/// Receipts match the rows deleted, per tenant and rule, whichever way they went: row deletes
/// through the indexes, a sweep, a compaction.
#[tokio::test]
async fn receipts_match_what_was_deleted_exactly() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let at = a_past_noon(pool).await;
    let swept = insert_tenant(pool, Some("1 day"), None).await;
    let walked = insert_tenant(pool, Some("1 day"), None).await;
    let purged = insert_tenant(pool, Some("1 day"), Some(now - Span::days(3))).await;
    seed(pool, swept, "succeeded", at, 15_000).await;
    for age in [3, 5, 9] {
        let t = now - Span::days(age);
        insert_task_with_children(pool, walked, "failed", t, Some(t)).await;
        insert_task_with_children(pool, purged, "running", t, None).await;
    }
    let before = ledger(pool).await;

    run_task(&no_compaction(), pool).await;

    let after = ledger(pool).await;
    let mut expected: BTreeMap<(Uuid, String), Deleted> = BTreeMap::new();
    for ((tenant, id, at), (key, events)) in &before {
        if after.contains_key(&(*tenant, *id, *at)) {
            continue;
        }
        let rule = if *tenant == purged {
            "deleted-tenants"
        } else {
            "retention"
        };
        let d = expected.entry((*tenant, rule.to_string())).or_default();
        d.tasks += 1;
        d.events += events;
        d.oldest = Some(d.oldest.map_or(*key, |o| o.min(*key)));
        d.newest = Some(d.newest.map_or(*key, |n| n.max(*key)));
    }
    let receipts = repository::receipts::list(pool, None, None, 1000)
        .await
        .unwrap();
    let got: BTreeMap<(Uuid, String), Deleted> = receipts
        .iter()
        .filter(|r| r.rule != "orphan-events")
        .map(|r| {
            (
                (r.tenant_id, r.rule.clone()),
                Deleted {
                    tasks: r.tasks,
                    events: r.events,
                    oldest: r.oldest,
                    newest: r.newest,
                },
            )
        })
        .collect();
    assert_eq!(got.len(), 3, "{receipts:?}");
    assert_eq!(got, expected);
    assert!(receipts.iter().all(|r| r.task == "task-history"));
    assert_eq!(
        receipts
            .iter()
            .map(|r| r.run_id)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        1,
        "one run"
    );

    // A compaction's receipt: a day of 5,000 due tasks that keeps 10 of a forever tenant.
    let day2 = at - Span::days(1);
    create_day(pool, day2.date_naive()).await;
    let forever = insert_tenant(pool, None, None).await;
    seed(pool, swept, "succeeded", day2, 5_000).await;
    seed(pool, forever, "succeeded", day2, 10).await;
    let report = run_task(&history(), pool).await;
    assert!(
        report.counters.contains(&("ranges compacted", 1)),
        "{report:?}"
    );
    let compacted: Vec<_> = repository::receipts::list(pool, Some(swept), None, 1000)
        .await
        .unwrap();
    let last = compacted.iter().max_by_key(|r| r.first_at).unwrap();
    assert_eq!(
        (last.tasks, last.events, last.rule.as_str()),
        (5_000, 5_000, "retention"),
        "{compacted:?}"
    );
    assert_eq!((last.oldest, last.newest), (Some(day2), Some(day2)));
}

/// The queue-items task's deletions get receipts too, per tenant, under `queue-items`.
#[tokio::test]
async fn queue_item_receipts_match_the_items_deleted() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let a = insert_tenant(pool, None, None).await;
    let b = insert_tenant(pool, None, None).await;
    for (tenant, finished) in [(a, 3), (b, 1)] {
        for _ in 0..finished {
            insert_task_with_children(pool, tenant, "succeeded", now, Some(now)).await;
        }
        insert_task_with_children(pool, tenant, "running", now, None).await;
    }
    let report = run_task(&QueueItemsTask::new(QueueItemsSettings::default()), pool).await;
    assert_eq!(report.deleted, 4, "{report:?}");
    let receipts = repository::receipts::list(pool, None, None, 100)
        .await
        .unwrap();
    let got: BTreeMap<Uuid, (String, i64)> = receipts
        .iter()
        .map(|r| (r.tenant_id, (r.rule.clone(), r.queue_items)))
        .collect();
    assert_eq!(
        got,
        BTreeMap::from([
            (a, ("queue-items".to_string(), 3)),
            (b, ("queue-items".to_string(), 1))
        ])
    );
}
