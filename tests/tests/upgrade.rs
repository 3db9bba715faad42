//! Upgrading a database of the earlier layout (day partitions with gaps where days were dropped, a
//! default partition holding rows of any date, a day table left detached by a crash): the
//! migration to ranges keeps every row, moves nothing into the default partition, and after it
//! the tasks apply the rules as on a new database. The leftover table is never touched.

mod common;

use chrono::{Duration as Span, NaiveDate};
use common::*;
use uuid::Uuid;

/// The migration that converts the layout.
const RANGES: i64 = 20261129000006;

async fn old_day(pool: &sqlx::PgPool, day: NaiveDate) {
    let (start, end) = (day_start(day), day_start(day + Span::days(1)));
    for (parent, prefix) in [("tasks", "tasks"), ("task_events", "task_events")] {
        sqlx::query(&format!(
            "CREATE TABLE {prefix}_p{} PARTITION OF {parent} FOR VALUES FROM ('{}') TO ('{}')",
            day.format("%Y%m%d"),
            start.to_rfc3339(),
            end.to_rfc3339()
        ))
        .execute(pool)
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn an_earlier_layout_is_converted_in_place_and_keeps_every_row() {
    let db = TestDatabase::before_migration(RANGES).await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let today = now.date_naive();
    // Days -6, -5, (gap: -4, -3 were dropped), -2 .. +2; and a day table left detached.
    for n in [-6, -5, -2, -1, 0, 1, 2] {
        old_day(pool, today + Span::days(n)).await;
    }
    let leftover = format!("tasks_p{}", (today - Span::days(9)).format("%Y%m%d"));
    sqlx::query(&format!(
        "CREATE TABLE {leftover} (LIKE tasks INCLUDING ALL)"
    ))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {leftover} (tenant_id, status) VALUES (gen_random_uuid(), 'succeeded')"
    ))
    .execute(pool)
    .await
    .unwrap();
    let daily = insert_tenant(pool, Some("1 day"), None).await;
    let forever = insert_tenant(pool, None, None).await;
    let mut all = Expect::default();
    let mut due = Vec::new();
    // Rows at every kind of date: long ago and in the gap (the default partition), in days, ahead
    // of the last day (the default partition again).
    for (offset, tenant, status) in [
        (Span::days(-400), forever, "succeeded"),
        (Span::days(-400), daily, "succeeded"),
        (Span::days(-4) + Span::hours(3), daily, "succeeded"),
        (Span::days(-4) + Span::hours(3), forever, "running"),
        (Span::days(-3), daily, "failed"),
        (Span::days(-5), daily, "succeeded"),
        (Span::days(-5), forever, "succeeded"),
        (Span::hours(-1), daily, "succeeded"),
        (Span::days(20), forever, "queued"),
    ] {
        let at = now + offset;
        let finished = (status != "running" && status != "queued").then_some(at);
        let task = insert_task_with_children(pool, tenant, status, at, finished).await;
        if tenant == daily && finished.is_some_and(|f| f < now - Span::days(1)) {
            due.push(task.0 .0);
        }
        all.add(task);
    }
    let in_gap = all.tasks[2];
    assert_eq!(home_of(pool, in_gap).await, "tasks_default");

    repository::MIGRATOR.run(pool).await.unwrap();

    // Every row is still there; those at or after the first day left the default partition.
    same(
        task_keys(pool).await,
        sorted_keys(all.tasks.clone()),
        "tasks after the migration",
    );
    same(
        event_ids(pool).await,
        sorted_ids(all.events.clone()),
        "events after the migration",
    );
    same(
        queue_item_ids(pool).await,
        sorted_ids(all.items.clone()),
        "queue items after the migration",
    );
    let first = day_start(today - Span::days(6));
    let in_default: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT inserted_at FROM tasks_default ORDER BY 1")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(
        in_default.iter().all(|at| *at < first),
        "the default partition keeps only what is older: {in_default:?}"
    );
    assert_eq!(in_default.len(), 2);
    assert_ne!(
        home_of(pool, in_gap).await,
        "tasks_default",
        "the gap got a partition"
    );
    assert_eq!(home_of(pool, all.tasks[8]).await, "tasks_future");
    // Every attached partition is a recorded range, with its triggers (a range being filled logs
    // only the tasks finished before it: one trigger).
    let unrecorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_inherits i WHERE i.inhparent IN ('tasks'::regclass, 'task_events'::regclass)
           AND NOT EXISTS (SELECT 1 FROM history_ranges r WHERE i.inhrelid IN (r.tasks_relid, r.events_relid))",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(unrecorded, 0);
    let without_triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM history_ranges r
         WHERE (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid IN (r.tasks_relid, r.events_relid) AND t.tgname LIKE 'history_log%')
               <> CASE WHEN r.log_mode = 'live' THEN 1 ELSE 3 END",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(without_triggers, 0);

    // The tasks apply the rules: the daily tenant's tasks older than a day go with their events
    // and queue items, everything else stays; the leftover table is not the engine's.
    for task in retention_controller::tasks::all(&Default::default(), None) {
        run_task(task.as_ref(), pool).await;
    }
    let left: Vec<Uuid> = task_keys(pool).await.into_iter().map(|k| k.0).collect();
    let expected: Vec<Uuid> = all
        .tasks
        .iter()
        .map(|k| k.0)
        .filter(|id| !due.contains(id))
        .collect();
    same(sorted(left), sorted(expected), "tasks after the runs");
    let leftover_rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {leftover}"))
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(
        leftover_rows, 1,
        "a table the engine did not detach is never touched"
    );
}
