//! The layout of run history: days made ahead out of the future range, the default partition
//! never read nor grown, partitions an operator detached or attached by hand, tables the engine
//! detached, and cold ranges merged so the number of partitions stays bounded.

mod common;

use chrono::{Duration as Span, NaiveDate};
use common::*;
use retention_controller::settings::{PartitionsSettings, TaskHistorySettings};
use retention_controller::tasks::partitions::PartitionsTask;
use retention_controller::tasks::task_history::TaskHistoryTask;

fn partitions_task() -> PartitionsTask {
    PartitionsTask::new(
        PartitionsSettings::default(),
        std::time::Duration::from_secs(86_400),
    )
}

fn history_task() -> TaskHistoryTask {
    TaskHistoryTask::new(TaskHistorySettings::default())
}

fn day_name(day: NaiveDate) -> String {
    format!("tasks_p{}", day.format("%Y%m%d"))
}

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn days_are_carved_ahead_out_of_the_future_range_and_no_insert_ever_fails() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let today = now.date_naive();
    let tenant = insert_tenant(pool, None, None).await;
    let early = insert_task(pool, tenant, "queued", now + Span::days(3), None).await;
    let early_event = insert_event(pool, tenant, early, now).await;
    assert_eq!(home_of(pool, early).await, "tasks_future");

    let report = run_task(&partitions_task(), pool).await;

    let expected: Vec<String> = (0..7).map(|n| day_name(today + Span::days(n))).collect();
    assert_eq!(day_partitions(pool).await, expected);
    assert!(report.counters.contains(&("days created", 7)), "{report:?}");
    assert_eq!(
        home_of(pool, early).await,
        day_name(today + Span::days(3)),
        "moved out of the future range into its day"
    );
    assert_eq!(event_ids(pool).await, vec![early_event]);
    // Inserts at any date succeed: years back land in the default partition, years ahead in the
    // future range.
    let ancient = insert_task(pool, tenant, "queued", now - Span::days(365 * 30), None).await;
    let far = insert_task(pool, tenant, "queued", now + Span::days(365 * 80), None).await;
    assert_eq!(home_of(pool, ancient).await, "tasks_default");
    assert_eq!(home_of(pool, far).await, "tasks_future");
    // A second run has nothing to do.
    assert!(!run_task(&partitions_task(), pool)
        .await
        .counters
        .iter()
        .any(|(c, _)| *c == "days created"));
}

/// The default partition carries a CHECK that keeps it out of the managed area, so attaching a
/// day never reads it (PostgreSQL would otherwise scan it under an ACCESS EXCLUSIVE lock), and no
/// row is ever moved into it.
#[tokio::test]
async fn making_a_day_never_reads_the_default_partition_nor_moves_rows_into_it() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = insert_tenant(pool, None, None).await;
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at) SELECT $1, 'queued', $2 - g * interval '1 minute' FROM generate_series(1, 2000) g",
    )
    .bind(tenant)
    .bind(now - Span::days(400))
    .execute(pool)
    .await
    .unwrap();
    // Days ahead, carved in a transaction of ours, counting the scans of the default partition
    // it makes (the counter also holds the connection's scans not yet reported: the difference).
    let made = |drop_check: bool| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let scans = "SELECT pg_stat_get_xact_numscans('tasks_default'::regclass)";
            let before: i64 = sqlx::query_scalar(scans).fetch_one(&mut *tx).await.unwrap();
            if drop_check {
                sqlx::query("ALTER TABLE tasks_default DROP CONSTRAINT history_range")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            repository::history::ranges::take_layout_lock(&mut tx, true)
                .await
                .unwrap();
            let through =
                db_now(&pool).await.date_naive() + Span::days(if drop_check { 12 } else { 6 });
            repository::history::ranges::carve_days(
                &mut tx,
                through,
                std::time::Duration::from_secs(5),
            )
            .await
            .unwrap();
            let after: i64 = sqlx::query_scalar(scans).fetch_one(&mut *tx).await.unwrap();
            tx.rollback().await.unwrap();
            after - before
        }
    };
    assert_eq!(
        made(false).await,
        0,
        "no scan of the default partition while days are made"
    );
    // The same without the CHECK: PostgreSQL reads the default partition to attach each day.
    assert!(made(true).await > 0, "the check above can fail");
    run_task(&partitions_task(), pool).await;
    assert_eq!(
        count(pool, "SELECT count(*) FROM tasks_default").await,
        2000,
        "nothing moved into the default partition"
    );
}

#[tokio::test]
async fn a_partition_detached_by_hand_is_never_touched_and_its_instants_stay_insertable() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let today = now.date_naive();
    let day = today - Span::days(20);
    create_day(pool, day).await;
    let short = insert_tenant(pool, Some("1 day"), None).await;
    let at = day_start(day) + Span::hours(6);
    let kept_by_hand = insert_task(pool, short, "succeeded", at, Some(at)).await;
    // The documented way to keep a day: detach it and rename it, in one transaction.
    sqlx::raw_sql(&format!(
        "BEGIN; ALTER TABLE tasks DETACH PARTITION {d}; ALTER TABLE {d} RENAME TO kept_tasks;
         ALTER TABLE task_events DETACH PARTITION task_events_p{s}; ALTER TABLE task_events_p{s} RENAME TO kept_events; COMMIT;",
        d = day_name(day),
        s = day.format("%Y%m%d")
    ))
    .execute(pool)
    .await
    .unwrap();
    // A table named like a day partition, but covering other instants and never attached.
    let lookalike = day_name(today - Span::days(30));
    sqlx::query(&format!(
        "CREATE TABLE {lookalike} (LIKE tasks INCLUDING ALL)"
    ))
    .execute(pool)
    .await
    .unwrap();

    let report = run_task(&partitions_task(), pool).await;
    run_task(&history_task(), pool).await;
    run_task(&partitions_task(), pool).await;

    assert!(report.counters.contains(&("holes filled", 1)), "{report:?}");
    let kept: i64 = count(pool, "SELECT count(*) FROM kept_tasks").await;
    assert_eq!(kept, 1, "the detached day keeps its row");
    let (id,): (uuid::Uuid,) = sqlx::query_as("SELECT id FROM kept_tasks")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(id, kept_by_hand.0);
    assert_eq!(
        count(
            pool,
            &format!("SELECT count(*) FROM pg_class WHERE relname = '{lookalike}'")
        )
        .await,
        1
    );
    assert_eq!(
        count(pool, "SELECT count(*) FROM history_detached").await,
        0
    );
    // The hole was given to an empty range: an insert at that day succeeds.
    let late = insert_task(pool, short, "queued", at, None).await;
    assert_ne!(home_of(pool, late).await, "tasks_default");
}

#[tokio::test]
async fn only_tables_the_engine_recorded_as_detached_are_dropped() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let today = db_now(pool).await.date_naive();
    let (gone_day, renamed_day) = (today - Span::days(5), today - Span::days(4));
    create_day(pool, gone_day).await;
    // As after a crash between a rewrite's commit and its drop: two tables recorded as detached
    // (their instants handed to other partitions), one of which an operator then renamed to keep.
    for day in [gone_day, renamed_day] {
        let (lower, upper) = (day_start(day), day_start(day + Span::days(1)));
        let relids: (sqlx::postgres::types::Oid, sqlx::postgres::types::Oid) =
            sqlx::query_as("SELECT tasks_relid, events_relid FROM history_ranges WHERE lower = $1")
                .bind(lower)
                .fetch_one(pool)
                .await
                .unwrap();
        let mut tx = pool.begin().await.unwrap();
        for (parent, relid) in [("tasks", relids.0), ("task_events", relids.1)] {
            let name: String = sqlx::query_scalar("SELECT $1::regclass::text")
                .bind(relid)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            sqlx::query(&format!("ALTER TABLE {parent} DETACH PARTITION {name}"))
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query("INSERT INTO history_detached (relid, relname, lower, upper) VALUES ($1, $2, $3, $4)")
                .bind(relid)
                .bind(&name)
                .bind(lower)
                .bind(upper)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        sqlx::query("DELETE FROM history_ranges WHERE lower = $1")
            .bind(lower)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    sqlx::query(&format!(
        "ALTER TABLE {} RENAME TO kept_by_operator",
        day_name(renamed_day)
    ))
    .execute(pool)
    .await
    .unwrap();

    run_task(&partitions_task(), pool).await;

    assert_eq!(
        count(
            pool,
            &format!(
                "SELECT count(*) FROM pg_class WHERE relname = '{}'",
                day_name(gone_day)
            )
        )
        .await,
        0
    );
    assert_eq!(
        count(
            pool,
            "SELECT count(*) FROM pg_class WHERE relname = 'kept_by_operator'"
        )
        .await,
        1
    );
    assert_eq!(
        count(pool, "SELECT count(*) FROM history_detached").await,
        0
    );
}

/// Forty past days, each with tasks of a three-day tenant (due) and of a forever tenant, a running
/// task and a queued one (kept): task-history empties them, the partitions task merges every day
/// older than the longest window by quarter of a month and whole months, and every kept row
/// survives with its events and queue items.
#[tokio::test]
async fn cold_ranges_merge_and_keep_every_kept_row() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let today = now.date_naive();
    let first = today - Span::days(40);
    create_day(pool, first).await;
    let three_days = insert_tenant(pool, Some("3 days"), None).await;
    let forever = insert_tenant(pool, None, None).await;
    let mut kept = Expect::default();
    for n in 0..40 {
        let at = day_start(first + Span::days(n)) + Span::hours(8);
        for _ in 0..3 {
            let task = insert_task_with_children(pool, three_days, "succeeded", at, Some(at)).await;
            if at >= now - Span::days(3) {
                kept.add_without_item(task);
            }
        }
        kept.add_without_item(
            insert_task_with_children(pool, forever, "succeeded", at, Some(at)).await,
        );
        kept.add(insert_task_with_children(pool, three_days, "running", at, None).await);
        kept.add(insert_task_with_children(pool, forever, "queued", at, None).await);
    }
    let partitions_before = day_partitions(pool).await.len();

    // Two passes: a range merges once its facts are settled, which waits for every transaction
    // older than it on the server (other tests' among them) to finish.
    for _ in 0..2 {
        for task in retention_controller::tasks::all(&Default::default(), None) {
            run_task(task.as_ref(), pool).await;
        }
    }

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
    same(
        queue_item_ids(pool).await,
        sorted_ids(kept.items.clone()),
        "queue items",
    );
    // Days older than the longest window (3 days) plus one merged: by quarter of a month, and a
    // whole month once complete. At most: today and 6 ahead, 4 days within the window, one day
    // past it, one partial quarter, three quarters, one month, and a partial quarter of the
    // month before.
    let after = day_partitions(pool).await.len();
    assert!(after < partitions_before, "{after} >= {partitions_before}");
    assert!(
        after <= 7 + 4 + 1 + 1 + 3 + 1 + 1,
        "{after}: {:?}",
        day_partitions(pool).await
    );
    // A second pass changes nothing.
    run_task(&partitions_task(), pool).await;
    assert_eq!(day_partitions(pool).await.len(), after);
    same(
        task_keys(pool).await,
        sorted_keys(kept.tasks),
        "tasks after a second pass",
    );
}

/// Adding days waits for the parents' lock; a wait that the statement timeout ends (here a
/// reader holding `tasks_future`, and a `lock_timeout` above the statement timeout) is retried
/// on the next run, like a lock not had in time: the run does not fail, and nothing changed.
#[tokio::test]
async fn days_that_cannot_be_locked_within_the_statement_timeout_are_added_next_run() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let today = db_now(pool).await.date_naive();
    let task = PartitionsTask::new(
        PartitionsSettings {
            lock_timeout: std::time::Duration::from_secs(30),
            statement_timeout: std::time::Duration::from_secs(1),
            ..PartitionsSettings::default()
        },
        std::time::Duration::from_secs(86_400),
    );
    let mut reader = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM tasks_future")
        .execute(&mut *reader)
        .await
        .unwrap();

    let report = run_task(&task, pool).await;

    assert!(
        !report.counters.iter().any(|(c, _)| *c == "days created"),
        "{report:?}"
    );
    assert!(day_partitions(pool).await.is_empty());
    reader.rollback().await.unwrap();
    let report = run_task(&task, pool).await;
    assert!(report.counters.contains(&("days created", 7)), "{report:?}");
    let expected: Vec<String> = (0..7).map(|n| day_name(today + Span::days(n))).collect();
    assert_eq!(day_partitions(pool).await, expected);
}
