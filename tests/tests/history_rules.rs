//! Run-history retention, row for row: per-tenant windows, status-awareness, deleted tenants,
//! orphan events, and queue items.

mod common;

use std::time::Duration;

use chrono::Duration as Span;
use common::*;
use retention_controller::settings::{QueueItemsSettings, TaskHistorySettings};
use retention_controller::tasks::queue_items::QueueItemsTask;
use retention_controller::tasks::task_history::TaskHistoryTask;

fn history() -> TaskHistoryTask {
    TaskHistoryTask::new(TaskHistorySettings::default())
}

#[tokio::test]
async fn each_tenant_keeps_exactly_its_own_window_and_never_an_active_task() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let long_ago = now - Span::days(400);
    let (mut gone, mut kept) = (Expect::default(), Expect::default());

    for (retention, period) in [
        ("2 days", Span::days(2)),
        ("10 days", Span::days(10)),
        ("90 minutes", Span::minutes(90)),
    ] {
        let tenant = insert_tenant(pool, Some(retention), None).await;
        let cutoff = now - period;
        for status in ["succeeded", "failed", "cancelled"] {
            // finished a minute before / after the cutoff
            gone.add(
                insert_task_with_children(pool, tenant, status, long_ago, Some(cutoff - MINUTE))
                    .await,
            );
            kept.add(
                insert_task_with_children(pool, tenant, status, long_ago, Some(cutoff + MINUTE))
                    .await,
            );
        }
        // no finished_at: inserted_at counts
        gone.add(insert_task_with_children(pool, tenant, "failed", cutoff - MINUTE, None).await);
        kept.add(insert_task_with_children(pool, tenant, "failed", cutoff + MINUTE, None).await);
        // queued and running: never, however old
        for status in ["queued", "running"] {
            kept.add(insert_task_with_children(pool, tenant, status, long_ago, None).await);
            kept.add(
                insert_task_with_children(pool, tenant, status, long_ago, Some(long_ago)).await,
            );
        }
    }
    // NULL retention keeps forever; a tenant id with no tenant row is named by no rule.
    let forever = insert_tenant(pool, None, None).await;
    kept.add(insert_task_with_children(pool, forever, "succeeded", long_ago, Some(long_ago)).await);
    let unknown = uuid::Uuid::new_v4();
    kept.add(insert_task_with_children(pool, unknown, "succeeded", long_ago, Some(long_ago)).await);

    let report = run_task(&history(), pool).await;

    assert_eq!(task_keys(pool).await, sorted_keys(kept.tasks));
    assert_eq!(event_ids(pool).await, sorted_ids(kept.events));
    assert_eq!(queue_item_ids(pool).await, sorted_ids(kept.items));
    let removed = gone.tasks.len() as u64;
    assert_eq!(
        report.by_rule[..3],
        [
            ("retention", removed),
            ("events", removed),
            ("queue-items", removed)
        ]
    );
}

#[tokio::test]
async fn a_deleted_tenant_loses_everything_after_the_grace_and_nothing_before() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let grace = Span::hours(24);
    let recent = now - Span::hours(1);
    let (mut gone, mut kept) = (Expect::default(), Expect::default());

    let past_grace = insert_tenant(pool, None, Some(now - grace - MINUTE)).await;
    let within_grace = insert_tenant(pool, Some("1 hour"), Some(now - grace + MINUTE)).await;
    for status in ["queued", "running", "succeeded"] {
        gone.add(insert_task_with_children(pool, past_grace, status, recent, None).await);
        // Within the grace the tenant is not live, so even its long-finished tasks stay.
        kept.add(
            insert_task_with_children(
                pool,
                within_grace,
                status,
                now - Span::days(30),
                Some(now - Span::days(30)),
            )
            .await,
        );
    }
    let report = run_task(&history(), pool).await;

    assert_eq!(task_keys(pool).await, sorted_keys(kept.tasks));
    assert_eq!(event_ids(pool).await, sorted_ids(kept.events));
    assert_eq!(queue_item_ids(pool).await, sorted_ids(kept.items));
    assert!(
        report.by_rule.contains(&("deleted-tenants", 3)),
        "{report:?}"
    );

    // A configured grace moves the line.
    let settings = TaskHistorySettings {
        deleted_tenant_grace: Duration::from_secs(3600),
        ..Default::default()
    };
    run_task(&TaskHistoryTask::new(settings), pool).await;
    assert_eq!(task_keys(pool).await, vec![]);
}

#[tokio::test]
async fn a_changed_retention_applies_at_the_next_run() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = insert_tenant(pool, Some("30 days"), None).await;
    let old = insert_task(
        pool,
        tenant,
        "succeeded",
        now - Span::days(5),
        Some(now - Span::days(5)),
    )
    .await;
    let young = insert_task(
        pool,
        tenant,
        "succeeded",
        now - Span::days(1),
        Some(now - Span::days(1)),
    )
    .await;
    let task = history();

    run_task(&task, pool).await;
    assert_eq!(task_keys(pool).await, sorted_keys(vec![old, young]));

    repository::tenants::set_retention(pool, tenant, Some(Duration::from_secs(3 * 86_400)))
        .await
        .unwrap();
    run_task(&task, pool).await;
    assert_eq!(task_keys(pool).await, vec![young]);

    repository::tenants::set_retention(pool, tenant, None)
        .await
        .unwrap();
    sqlx::query("UPDATE tasks SET finished_at = now() - interval '1000 days'")
        .execute(pool)
        .await
        .unwrap();
    run_task(&task, pool).await;
    assert_eq!(task_keys(pool).await, vec![young], "forever keeps");
}

#[tokio::test]
async fn orphan_events_go_after_an_hour_and_the_watermark_waits_for_young_ones() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = insert_tenant(pool, None, None).await;
    let task = insert_task(pool, tenant, "running", now - Span::days(3), None).await;
    let missing: TaskKey = (uuid::Uuid::new_v4(), now - Span::days(3));
    let wrong_instant: TaskKey = (task.0, task.1 - Span::seconds(1)); // right id, other inserted_at

    let old_orphan = insert_event(pool, tenant, missing, now - Span::hours(1) - MINUTE).await;
    let young_orphan = insert_event(pool, tenant, missing, now - Span::hours(1) + MINUTE).await;
    let old_mismatch = insert_event(pool, tenant, wrong_instant, now - Span::hours(2)).await;
    let linked_old = insert_event(pool, tenant, task, now - Span::days(2)).await;
    // A gap of ids (rolled-back inserts, or a mass delete): the walk passes it in several batches
    // of ids and still finds what lies beyond.
    sqlx::query(
        "SELECT setval('task_events_id_seq', (SELECT last_value FROM task_events_id_seq) + 25000)",
    )
    .execute(pool)
    .await
    .unwrap();
    let later_old_orphan = insert_event(pool, tenant, missing, now - Span::days(1)).await;

    let report = run_task(&history(), pool).await;
    assert!(report.by_rule.contains(&("orphan-events", 3)), "{report:?}");
    assert_eq!(event_ids(pool).await, vec![young_orphan, linked_old]);
    let _ = (old_orphan, old_mismatch, later_old_orphan);
    let watermark = repository::watermarks::get(pool, "task-history.orphan-events")
        .await
        .unwrap();
    assert_eq!(
        watermark,
        young_orphan - 1,
        "the watermark waits just before the young orphan"
    );

    // The young orphan ages past the hour: the next run finds it although it was seen before.
    sqlx::query("UPDATE task_events SET created_at = now() - interval '2 hours' WHERE id = $1")
        .bind(young_orphan)
        .execute(pool)
        .await
        .unwrap();
    run_task(&history(), pool).await;
    assert_eq!(event_ids(pool).await, vec![linked_old]);
}

#[tokio::test]
async fn a_purge_that_reaches_its_deadline_leaves_time_for_the_orphan_walk() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    // 20,000 due tasks in batches of one: far more than the run's 6 s. In today's range (finished
    // "3 days ago"), which is live: walked through the indexes, never swept page by page.
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'succeeded', $2, $3 FROM generate_series(1, 20000)",
    )
    .bind(tenant)
    .bind(now)
    .bind(now - Span::days(3))
    .execute(pool)
    .await
    .unwrap();
    let missing: TaskKey = (uuid::Uuid::new_v4(), now - Span::days(3));
    let orphan = insert_event(pool, tenant, missing, now - Span::hours(2)).await;
    let settings = TaskHistorySettings {
        batch_size: 1,
        max_run_time: Duration::from_secs(6),
        compaction: false,
        ..Default::default()
    };

    let report = run_task(&TaskHistoryTask::new(settings), pool).await;
    assert_eq!(
        report.completion,
        retention_controller::Completion::DeadlineReached
    );
    let deleted = report
        .by_rule
        .iter()
        .find(|(rule, _)| *rule == "retention")
        .map_or(0, |(_, n)| *n);
    assert!(deleted > 0 && deleted < 20_000, "{report:?}");
    assert!(report.by_rule.contains(&("orphan-events", 1)), "{report:?}");
    assert!(!event_ids(pool).await.contains(&orphan));
}

#[tokio::test]
async fn queue_items_go_when_their_task_is_gone_or_finished_or_their_tenant_deleted() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let live = insert_tenant(pool, None, None).await;
    let deleted = insert_tenant(pool, None, Some(now - MINUTE)).await;
    let mut kept = Vec::new();
    let mut gone = Vec::new();

    for status in ["queued", "running"] {
        let task = insert_task(pool, live, status, now - Span::days(2), None).await;
        kept.push(insert_queue_item(pool, live, task).await);
        let task = insert_task(pool, deleted, status, now - Span::days(2), None).await;
        gone.push(insert_queue_item(pool, deleted, task).await);
    }
    for status in ["succeeded", "failed", "cancelled"] {
        let task = insert_task(pool, live, status, now - Span::days(2), Some(now - MINUTE)).await;
        gone.push(insert_queue_item(pool, live, task).await);
    }
    gone.push(insert_queue_item(pool, live, (uuid::Uuid::new_v4(), now)).await);
    let active = insert_task(pool, live, "queued", now, None).await;
    gone.push(insert_queue_item(pool, live, (active.0, active.1 + Span::seconds(1))).await);
    // an unknown tenant with a live task: no rule names it
    let unknown = uuid::Uuid::new_v4();
    let task = insert_task(pool, unknown, "queued", now, None).await;
    kept.push(insert_queue_item(pool, unknown, task).await);

    let report = run_task(&QueueItemsTask::new(QueueItemsSettings::default()), pool).await;

    assert_eq!(queue_item_ids(pool).await, sorted_ids(kept));
    assert_eq!(report.deleted, gone.len() as u64);
}

/// Between walks of the heap, a run reads only what is due: items whose task finished or was
/// deleted (recorded by a trigger) and items of deleted tenants.
#[tokio::test]
async fn between_sweeps_queue_items_go_without_walking_the_heap() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let live = insert_tenant(pool, None, None).await;
    let task = QueueItemsTask::new(QueueItemsSettings::default());
    let mut kept = Vec::new();
    let mut running = Vec::new();
    for _ in 0..50 {
        let t = insert_task(pool, live, "running", now - Span::hours(1), None).await;
        kept.push(insert_queue_item(pool, live, t).await);
        running.push(t);
    }
    // The first run walks the heap once (nothing is due).
    let first = run_task(&task, pool).await;
    assert!(
        first.counters.iter().any(|(c, _)| *c == "heap swept"),
        "{first:?}"
    );

    // A task finishes, another is deleted, a tenant is deleted.
    sqlx::query("UPDATE tasks SET status = 'succeeded', finished_at = now() WHERE id = $1")
        .bind(running[0].0)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM tasks WHERE id = $1")
        .bind(running[1].0)
        .execute(pool)
        .await
        .unwrap();
    let doomed = insert_tenant(pool, None, None).await;
    let t = insert_task(pool, doomed, "queued", now, None).await;
    let of_doomed = insert_queue_item(pool, doomed, t).await;
    sqlx::query("UPDATE tenants SET deleted_at = now() WHERE id = $1")
        .bind(doomed)
        .execute(pool)
        .await
        .unwrap();
    // An item added for a task already finished: no trigger sees it; the next sweep does.
    let done = insert_task(
        pool,
        live,
        "succeeded",
        now - Span::hours(1),
        Some(now - MINUTE),
    )
    .await;
    let late_item = insert_queue_item(pool, live, done).await;

    let report = run_task(&task, pool).await;
    assert!(
        !report
            .counters
            .iter()
            .any(|(c, _)| *c == "heap pages walked"),
        "no heap walk: {report:?}"
    );
    assert_eq!(report.deleted, 3, "{report:?}");
    let mut left = kept[2..].to_vec();
    left.push(late_item);
    assert_eq!(queue_item_ids(pool).await, sorted_ids(left.clone()));
    let _ = of_doomed;

    // A sweep is due once `sweep_interval` has passed: it finds the late item.
    sqlx::query("UPDATE retention_watermarks SET position = position - 86400 WHERE name = 'queue-items.swept-at'").execute(pool).await.unwrap();
    let report = run_task(&task, pool).await;
    assert!(
        report.counters.iter().any(|(c, _)| *c == "heap swept"),
        "{report:?}"
    );
    assert_eq!(report.deleted, 1);
    assert_eq!(queue_item_ids(pool).await, sorted_ids(kept[2..].to_vec()));
}

#[tokio::test]
async fn a_purged_tenant_is_walked_batch_by_batch_to_the_end() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let gone = insert_tenant(pool, Some("1 hour"), Some(now - Span::days(3))).await;
    let live = insert_tenant(pool, None, None).await;
    let mut kept = Vec::new();
    for n in 0..25 {
        let status = ["queued", "running", "succeeded"][n % 3];
        insert_task(pool, gone, status, now - Span::hours(n as i64), None).await;
        kept.push(insert_task(pool, live, status, now - Span::hours(n as i64), None).await);
    }
    let settings = TaskHistorySettings {
        batch_size: 4,
        ..Default::default()
    };
    let report = run_task(&TaskHistoryTask::new(settings), pool).await;
    assert_eq!(task_keys(pool).await, sorted_keys(kept));
    assert!(
        report.by_rule.contains(&("deleted-tenants", 25)),
        "{report:?}"
    );
    // Batches of at most four tasks: at least seven of them for the 25.
    assert!(report.batches >= 7, "{report:?}");
}

#[tokio::test]
async fn a_deleted_tenant_loses_its_active_tasks_from_past_days_as_from_today() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let today = now.date_naive();
    create_day(pool, today - Span::days(3)).await;
    let doomed = insert_tenant(pool, Some("1 day"), Some(now - Span::days(2))).await;
    let forever = insert_tenant(pool, None, None).await;
    let mut kept = Expect::default();
    for back in 1..=3 {
        let day = day_start(today - Span::days(back));
        seed_tasks(
            pool,
            doomed,
            "succeeded",
            day + Span::hours(1),
            day + Span::hours(2),
            200,
        )
        .await;
        insert_task_with_children(pool, doomed, "running", day + Span::hours(23), None).await;
        kept.add(
            insert_task_with_children(
                pool,
                forever,
                "succeeded",
                day + Span::hours(1),
                Some(day + Span::hours(2)),
            )
            .await,
        );
        kept.add(
            insert_task_with_children(pool, forever, "running", day + Span::hours(23), None).await,
        );
    }
    insert_task_with_children(pool, doomed, "running", now - MINUTE, None).await;
    kept.add(insert_task_with_children(pool, forever, "running", now - MINUTE, None).await);

    let report = run_task(&history(), pool).await;

    assert_eq!(task_keys(pool).await, sorted_keys(kept.tasks));
    assert_eq!(event_ids(pool).await, sorted_ids(kept.events));
    assert_eq!(queue_item_ids(pool).await, sorted_ids(kept.items));
    assert!(
        report.by_rule.contains(&("deleted-tenants", 3 * 201 + 1)),
        "{report:?}"
    );
}

/// An event whose task is deleted after the orphan walk passed it (in a past day, and in a range
/// merged since) is deleted by the sweep of every range's events, once the sweep interval has
/// passed; the dry run counts it as soon as it is due.
#[tokio::test]
async fn an_event_orphaned_after_the_walk_passed_it_goes_within_the_sweep_interval() {
    use retention_controller::settings::PartitionsSettings;
    use retention_controller::tasks::partitions::PartitionsTask;
    use retention_controller::MaintenanceTask;
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let today = now.date_naive();
    create_day(pool, today - Span::days(20)).await;
    let tenant = insert_tenant(pool, None, None).await;
    let (in_a_day, in_merged) = (
        now - Span::days(2),
        day_start(today - Span::days(19)) + Span::hours(3),
    );
    let mut tasks = Vec::new();
    let mut events = Vec::new();
    for at in [in_a_day, in_merged] {
        let task = insert_task(pool, tenant, "running", at, None).await;
        events.push(insert_event(pool, tenant, task, at).await);
        tasks.push(task);
    }
    let kept_task = insert_task(pool, tenant, "running", in_merged, None).await;
    let kept_event = insert_event(pool, tenant, kept_task, in_merged).await;
    // The walk passes the events (their tasks exist); the old days are merged.
    let task = history();
    run_task(&task, pool).await;
    let merged = run_task(
        &PartitionsTask::new(PartitionsSettings::default(), Duration::from_secs(86_400)),
        pool,
    )
    .await;
    assert!(
        merged
            .counters
            .iter()
            .any(|(c, n)| *c == "ranges merged" && *n > 0),
        "{merged:?}"
    );
    let home = home_of(pool, kept_task).await;
    assert!(
        home.len() == "tasks_p20261101_20261108".len(),
        "the old day was merged into a span: {home}"
    );

    // The application deletes both tasks: their events are orphans from now on.
    for task in &tasks {
        sqlx::query("DELETE FROM tasks WHERE id = $1 AND inserted_at = $2")
            .bind(task.0)
            .bind(task.1)
            .execute(pool)
            .await
            .unwrap();
    }
    let dry = task.dry_run(pool).await.unwrap();
    assert!(
        dry.by_rule.contains(&("orphan-events", 2)),
        "the dry run counts the late orphans: {dry:?}"
    );
    // Within the sweep interval, the last sweep was moments ago: they wait for the next.
    let report = run_task(&task, pool).await;
    assert_eq!(
        event_ids(pool).await,
        sorted_ids(vec![events[0], events[1], kept_event]),
        "{report:?}"
    );

    // A day later.
    sqlx::query("UPDATE retention_watermarks SET position = position - 86400 WHERE name = 'task-history.orphan-sweep.swept-at'")
        .execute(pool)
        .await
        .unwrap();
    let report = run_task(&task, pool).await;
    assert_eq!(event_ids(pool).await, vec![kept_event], "{report:?}");
    assert!(report.by_rule.contains(&("orphan-events", 2)), "{report:?}");
    assert!(report.counters.contains(&("events swept", 1)), "{report:?}");
    let receipted: i64 = sqlx::query_scalar(
        "SELECT sum(events)::bigint FROM retention_receipts WHERE rule = 'orphan-events'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(receipted, 2);
}

/// The longest finite window of any status among live tenants decides which ranges are cold (and
/// merged): a status's own window counts, forever (NULL, 1000 years) and deleted tenants do not.
#[tokio::test]
async fn the_longest_window_is_the_longest_finite_one_of_any_status_of_a_live_tenant() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let longest = || async {
        repository::history::facts::longest_window(pool)
            .await
            .unwrap()
            .map(|d| d.as_secs() / 86_400)
    };
    assert_eq!(longest().await, None, "no tenant");
    insert_tenant(pool, None, None).await;
    assert_eq!(longest().await, None, "forever only");
    let weekly = insert_tenant(pool, Some("7 days"), None).await;
    assert_eq!(longest().await, Some(7));
    sqlx::query("UPDATE tenants SET failed_retention_period = '30 days', succeeded_retention_period = '1000 years' WHERE id = $1")
        .bind(weekly)
        .execute(pool)
        .await
        .unwrap();
    assert_eq!(
        longest().await,
        Some(30),
        "a status's own window; 1000 years is forever"
    );
    insert_tenant(pool, Some("90 days"), Some(db_now(pool).await)).await;
    assert_eq!(
        longest().await,
        Some(30),
        "a deleted tenant's window is not"
    );
    insert_tenant(pool, Some("45 days"), None).await;
    assert_eq!(longest().await, Some(45));
}

/// Ranges whose day has not passed (today, the days made ahead) are probed rather than trusted:
/// only when a window is shorter than their age or a tenant is deleted past its grace, and then
/// what is due there goes, and nothing else.
#[tokio::test]
async fn what_is_due_in_today_and_the_days_ahead_goes_and_nothing_else() {
    use retention_controller::settings::PartitionsSettings;
    use retention_controller::tasks::partitions::PartitionsTask;
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    run_task(
        &PartitionsTask::new(PartitionsSettings::default(), Duration::from_secs(86_400)),
        pool,
    )
    .await;
    let now = db_now(pool).await;
    let tomorrow = day_start(now.date_naive() + Span::days(1)) + Span::hours(1);
    let hourly = insert_tenant(pool, Some("1 hour"), None).await;
    let weekly = insert_tenant(pool, Some("7 days"), None).await;
    let purged = insert_tenant(pool, Some("7 days"), Some(now - Span::days(2))).await;
    let in_grace = insert_tenant(pool, Some("7 days"), Some(now - Span::hours(2))).await;
    let at = now - Span::minutes(150);
    let finished = Some(now - Span::minutes(90));
    let due = [
        insert_task_with_children(pool, hourly, "succeeded", at, finished).await,
        insert_task_with_children(pool, purged, "running", tomorrow, None).await,
    ];
    let kept = [
        insert_task_with_children(pool, hourly, "succeeded", at, Some(now - Span::minutes(30)))
            .await,
        insert_task_with_children(pool, hourly, "running", at, None).await,
        insert_task_with_children(pool, weekly, "succeeded", at, finished).await,
        insert_task_with_children(pool, in_grace, "running", tomorrow, None).await,
    ];
    run_task(&history(), pool).await;
    let keys = task_keys(pool).await;
    for (task, _, _) in &due {
        assert!(!keys.contains(task), "due, left: {task:?}");
    }
    for (task, _, _) in &kept {
        assert!(keys.contains(task), "kept, gone: {task:?}");
    }
    assert_eq!(keys.len(), kept.len());
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM task_events")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        events,
        kept.len() as i64,
        "the due tasks' events went with them"
    );

    // With no window shorter than today's age and no tenant past its grace, nothing is probed
    // and nothing goes: the hourly tenant keeps a day from now on.
    sqlx::query("UPDATE tenants SET data_retention_period = '1 day' WHERE id = $1")
        .bind(hourly)
        .execute(pool)
        .await
        .unwrap();
    let rule = repository::rule::Rule::new(db_now(pool).await, Duration::from_secs(86_400));
    let bound = repository::history::facts::probe_bound(pool, &rule)
        .await
        .unwrap();
    assert_eq!(
        bound,
        Some(chrono::DateTime::<chrono::Utc>::MAX_UTC),
        "a tenant past its grace: every range"
    );
    sqlx::query("DELETE FROM tenants WHERE id = $1")
        .bind(purged)
        .execute(pool)
        .await
        .unwrap();
    let rule = repository::rule::Rule::new(db_now(pool).await, Duration::from_secs(86_400));
    let bound = repository::history::facts::probe_bound(pool, &rule)
        .await
        .unwrap();
    assert_eq!(
        bound,
        Some(rule.now - Span::days(1)),
        "the latest cutoff of the shortest windows"
    );
    run_task(&history(), pool).await;
    assert_eq!(task_keys(pool).await.len(), kept.len());
}
