//! Day partitions: created ahead, dropped whole once every row is due, and never dropped while
//! they hold something that is not.

mod common;

use chrono::{Duration as Span, NaiveDate};
use common::*;
use retention_controller::settings::{PartitionsSettings, TaskHistorySettings};
use retention_controller::tasks::partitions::PartitionsTask;
use retention_controller::tasks::task_history::TaskHistoryTask;

fn partitions_task() -> PartitionsTask {
    PartitionsTask::new(PartitionsSettings::default(), std::time::Duration::from_secs(86_400))
}

fn name(day: NaiveDate) -> String {
    repository::partitions::tasks_partition_name(day)
}

async fn home_of(pool: &sqlx::PgPool, task: TaskKey) -> String {
    sqlx::query_scalar("SELECT tableoid::regclass::text FROM tasks WHERE id = $1 AND inserted_at = $2")
        .bind(task.0)
        .bind(task.1)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn days_are_created_ahead_and_rows_already_in_the_default_partition_move_in() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let today = now.date_naive();
    let tenant = insert_tenant(pool, None, None).await;
    let early = insert_task(pool, tenant, "queued", now + Span::days(3), None).await;
    assert_eq!(home_of(pool, early).await, "tasks_default");

    let report = run_task(&partitions_task(), pool).await;

    let expected: Vec<String> = (0..7).map(|n| name(today + Span::days(n))).collect();
    assert_eq!(day_partitions(pool).await, expected);
    assert_eq!(report.counters, vec![("days created", 7)]);
    assert_eq!(home_of(pool, early).await, name(today + Span::days(3)));
    // Inserts at any date succeed: years back and ahead land in the default partition.
    for at in [now - Span::days(365 * 30), now + Span::days(365 * 80), now] {
        insert_task(pool, tenant, "queued", at, None).await;
    }
    // A second run has nothing to do.
    assert_eq!(run_task(&partitions_task(), pool).await.counters, vec![]);
}

struct Day {
    day: NaiveDate,
    tasks: Vec<TaskKey>,
    events: Vec<i64>,
    items: Vec<i64>,
}

/// A past day holding finished tasks of a two-day-retention tenant (all due), each with an event
/// and a queue item, plus whatever `extra` adds.
async fn seed_day(pool: &sqlx::PgPool, day: NaiveDate, tenant: uuid::Uuid) -> Day {
    create_day(pool, day).await;
    let at = repository::partitions::bounds(day).0 + Span::hours(12);
    let mut d = Day { day, tasks: vec![], events: vec![], items: vec![] };
    for status in ["succeeded", "failed", "cancelled", "succeeded"] {
        let task = insert_task(pool, tenant, status, at, Some(at + Span::hours(1))).await;
        d.events.push(insert_event(pool, tenant, task, at).await);
        d.items.push(insert_queue_item(pool, tenant, task).await);
        d.tasks.push(task);
    }
    d
}

#[tokio::test]
async fn a_wholly_due_day_is_dropped_whole_and_every_other_day_is_kept() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let today = now.date_naive();
    let short = insert_tenant(pool, Some("2 days"), None).await;
    let forever = insert_tenant(pool, None, None).await;
    let gone_tenant = insert_tenant(pool, None, Some(now - Span::days(3))).await;

    let due = seed_day(pool, today - Span::days(10), short).await;
    // The same, plus a running task of a live tenant: kept, the rest deleted row by row.
    let running_day = seed_day(pool, today - Span::days(9), short).await;
    let at = repository::partitions::bounds(running_day.day).0;
    let running = insert_task(pool, short, "running", at, None).await;
    let running_event = insert_event(pool, short, running, at).await;
    // Plus a row of a keep-forever tenant.
    let forever_day = seed_day(pool, today - Span::days(8), short).await;
    let kept_forever = insert_task(pool, forever, "succeeded", repository::partitions::bounds(forever_day.day).0, Some(now - Span::days(8))).await;
    // Plus an orphan event written a minute ago (orphans are kept for an hour).
    let fresh_day = seed_day(pool, today - Span::days(7), short).await;
    let orphan_of_that_day = (uuid::Uuid::new_v4(), repository::partitions::bounds(fresh_day.day).0);
    let fresh_event = insert_event(pool, short, orphan_of_that_day, now - MINUTE).await;
    // A day of a tenant deleted past its grace: everything is due, even a running task.
    let purged_day = seed_day(pool, today - Span::days(6), gone_tenant).await;
    insert_task(pool, gone_tenant, "running", repository::partitions::bounds(purged_day.day).0, None).await;
    // A day within the tenant's window (2 days): not due yet.
    let young_day = seed_day(pool, today - Span::days(1), short).await;

    // task-history first: it deletes due rows around what must stay, and leaves wholly due days.
    run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;
    // A dry run counts exactly the tasks of the days it would drop, per tenant.
    let before = day_partitions(pool).await;
    let preview = retention_controller::MaintenanceTask::dry_run(&partitions_task(), pool).await.unwrap();
    let mut by_tenant = preview.by_tenant.clone();
    by_tenant.sort();
    let mut expected = vec![(short, 4), (gone_tenant, 5)];
    expected.sort();
    assert_eq!(by_tenant, expected);
    assert_eq!(preview.by_rule.first(), Some(&("tasks", 9)));
    assert_eq!(day_partitions(pool).await, before, "a dry run drops nothing");
    let report = run_task(&partitions_task(), pool).await;
    assert!(report.counters.contains(&("days dropped", 2)), "{report:?}");

    let days = day_partitions(pool).await;
    for gone in [due.day, purged_day.day] {
        assert!(!days.contains(&name(gone)), "{gone} dropped: {days:?}");
    }
    for kept in [running_day.day, forever_day.day, fresh_day.day, young_day.day] {
        assert!(days.contains(&name(kept)), "{kept} kept: {days:?}");
    }
    // The fresh-event day is due but for an hour-young orphan event: its rows wait for the drop
    // that comes once the event is an hour old, rather than going row by row.
    let mut tasks = vec![running, kept_forever];
    tasks.extend(young_day.tasks.iter().copied());
    tasks.extend(fresh_day.tasks.iter().copied());
    assert_eq!(task_keys(pool).await, sorted_keys(tasks));
    let mut events = vec![running_event, fresh_event];
    events.extend(young_day.events.iter().copied());
    events.extend(fresh_day.events.iter().copied());
    assert_eq!(event_ids(pool).await, sorted_ids(events));
    let mut items = young_day.items.clone();
    items.extend(fresh_day.items.iter().copied());
    assert_eq!(queue_item_ids(pool).await, sorted_ids(items));
    // The running task stayed in its own day's partition.
    assert_eq!(home_of(pool, running).await, name(running_day.day));
}

#[tokio::test]
async fn task_history_leaves_a_wholly_due_day_to_the_partitions_task() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let today = db_now(pool).await.date_naive();
    let short = insert_tenant(pool, Some("2 days"), None).await;
    let due = seed_day(pool, today - Span::days(5), short).await;

    let report = run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;
    assert_eq!(report.deleted, 0, "{report:?}");
    assert_eq!(task_keys(pool).await, sorted_keys(due.tasks.clone()));

    run_task(&partitions_task(), pool).await;
    assert_eq!(task_keys(pool).await, vec![]);
    assert!(event_ids(pool).await.is_empty());
    assert!(queue_item_ids(pool).await.is_empty());
    assert!(!day_partitions(pool).await.contains(&name(due.day)));
}

#[tokio::test]
async fn a_row_that_races_into_a_day_being_dropped_survives_in_the_default_partition() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let today = now.date_naive();
    let short = insert_tenant(pool, Some("2 days"), None).await;
    let day = seed_day(pool, today - Span::days(5), short).await;
    // Checked as wholly due, then a running task arrives before the drop.
    let at = repository::partitions::bounds(day.day).0 + Span::hours(3);
    let late = insert_task(pool, short, "running", at, None).await;
    let late_event = insert_event(pool, short, late, at).await;
    let late_item = insert_queue_item(pool, short, late).await;

    let mut tx = pool.begin().await.unwrap();
    let removal = repository::partitions::remove_day(&mut tx, day.day, now, std::time::Duration::from_secs(86_400), std::time::Duration::from_secs(1))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // As after a crash right after the DETACH: the next partitions run drops the detached tables.
    let detached: Vec<String> = sqlx::query_scalar("SELECT relname::text FROM pg_class WHERE relname IN ($1, $2) ORDER BY 1")
        .bind(name(day.day))
        .bind(repository::partitions::events_partition_name(day.day))
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(detached.len(), 2, "detached, not yet dropped");
    run_task(&partitions_task(), pool).await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_class WHERE relname IN ($1, $2)")
        .bind(name(day.day))
        .bind(repository::partitions::events_partition_name(day.day))
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the next run finished the removal");

    assert_eq!((removal.tasks_kept, removal.events_kept), (1, 1));
    assert_eq!(task_keys(pool).await, vec![late]);
    assert_eq!(home_of(pool, late).await, "tasks_default");
    assert_eq!(event_ids(pool).await, vec![late_event]);
    assert_eq!(queue_item_ids(pool).await, vec![late_item]);
    assert!(!day_partitions(pool).await.contains(&name(day.day)));
}

#[tokio::test]
async fn rows_at_out_of_range_dates_follow_the_same_rules() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let short = insert_tenant(pool, Some("2 days"), None).await;
    run_task(&partitions_task(), pool).await;
    let ancient = now - Span::days(365 * 30);
    let future = now + Span::days(365 * 80);
    let ancient_due = insert_task(pool, short, "succeeded", ancient, Some(ancient)).await;
    let ancient_running = insert_task(pool, short, "running", ancient, None).await;
    let future_done = insert_task(pool, short, "succeeded", future, Some(future)).await;
    assert_eq!(home_of(pool, ancient_due).await, "tasks_default");

    run_task(&partitions_task(), pool).await;
    run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;

    assert_eq!(task_keys(pool).await, sorted_keys(vec![ancient_running, future_done]));
}

#[tokio::test]
async fn in_a_past_day_the_longest_retention_waits_for_the_drop_and_shorter_ones_go_row_by_row() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let day = now.date_naive() - Span::days(10);
    create_day(pool, day).await;
    let short = insert_tenant(pool, Some("2 days"), None).await;
    let long = insert_tenant(pool, Some("9 days 12 hours"), None).await;
    let at = repository::partitions::bounds(day).0 + Span::hours(1);
    // The long tenant's first task is due (finished 9.5 days + 1 minute ago), its second not yet.
    let long_due = insert_task(pool, long, "succeeded", at, Some(now - Span::hours(9 * 24 + 12) - MINUTE)).await;
    let long_young = insert_task(pool, long, "succeeded", at, Some(now - Span::hours(9 * 24 + 12) + MINUTE)).await;
    let short_due = insert_task(pool, short, "succeeded", at, Some(at)).await;

    for task in retention_controller::tasks::all(&Default::default()) {
        run_task(task.as_ref(), pool).await;
    }
    // The short tenant's row went at once; the long tenant's due row waits for its day.
    assert_eq!(task_keys(pool).await, sorted_keys(vec![long_due, long_young]));
    let _ = short_due;

    // Once everything in the day is due, the day goes whole.
    sqlx::query("UPDATE tasks SET finished_at = finished_at - interval '2 minutes' WHERE id = $1")
        .bind(long_young.0)
        .execute(pool)
        .await
        .unwrap();
    let report = run_task(&partitions_task(), pool).await;
    assert!(report.counters.contains(&("days dropped", 1)), "{report:?}");
    assert!(task_keys(pool).await.is_empty());

    // The same day with a running task can never be dropped by time alone: due rows go row by row.
    let day = now.date_naive() - Span::days(12);
    create_day(pool, day).await;
    let at = repository::partitions::bounds(day).0;
    let running = insert_task(pool, long, "running", at, None).await;
    insert_task(pool, long, "succeeded", at, Some(now - Span::days(10))).await;
    run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;
    assert_eq!(task_keys(pool).await, vec![running]);
}
