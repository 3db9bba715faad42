//! The orphan-events walk against writers that hold transactions open: an event committed late,
//! below ids already walked, is still found; a batch that keeps timing out on a held row ends the
//! walk, not the run. Each test holds a transaction across a run, and the walk waits for the
//! transactions open when it recorded its end, so these tests take turns (and have this test
//! process's cluster to themselves).

mod common;

use std::time::Duration;

use chrono::Duration as Span;
use common::*;
use retention_controller::settings::TaskHistorySettings;
use retention_controller::tasks::task_history::TaskHistoryTask;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn history() -> TaskHistoryTask {
    TaskHistoryTask::new(TaskHistorySettings::default())
}

#[tokio::test]
async fn an_orphan_event_committed_late_below_the_watermark_is_still_found() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = insert_tenant(pool, None, None).await;
    swept_just_now(pool).await;
    let missing: TaskKey = (uuid::Uuid::new_v4(), now - Span::days(3));
    // A writer takes an event id and commits late; meanwhile a later id commits.
    let mut late = pool.begin().await.unwrap();
    let late_id = insert_event(&mut *late, tenant, missing, now - Span::hours(2)).await;
    let early = insert_event(pool, tenant, missing, now - Span::hours(2)).await;
    assert!(early > late_id);

    // While the writer's transaction is open, the walk does not pass its ids.
    let report = run_task(&history(), pool).await;
    assert!(
        !report
            .by_rule
            .iter()
            .any(|(rule, _)| *rule == "orphan-events"),
        "{report:?}"
    );
    assert!(
        report.counters.contains(&("orphan walk waiting", 1)),
        "{report:?}"
    );
    late.commit().await.unwrap();
    assert_eq!(event_ids(pool).await, vec![late_id, early]);

    // Once it committed, both orphans go: the late one was not left behind the watermark.
    let report = run_task(&history(), pool).await;
    assert!(report.by_rule.contains(&("orphan-events", 2)), "{report:?}");
    assert_eq!(event_ids(pool).await, Vec::<i64>::new());
}

#[tokio::test]
async fn an_orphan_batch_that_keeps_timing_out_ends_the_walk_not_the_run() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = insert_tenant(pool, None, None).await;
    let missing: TaskKey = (uuid::Uuid::new_v4(), now - Span::days(3));
    swept_just_now(pool).await;
    let settings = TaskHistorySettings {
        lock_timeout: Duration::from_millis(10),
        ..Default::default()
    };
    let task = TaskHistoryTask::new(settings);
    // Young when first walked: the watermark waits before it.
    let orphan = insert_event(pool, tenant, missing, now - Span::minutes(30)).await;
    run_task(&task, pool).await;
    sqlx::query(
        "UPDATE task_events SET created_at = created_at - interval '2 hours' WHERE id = $1",
    )
    .bind(orphan)
    .execute(pool)
    .await
    .unwrap();
    // A writer holds the orphan's row: every batch that reaches it waits out its lock_timeout.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM task_events WHERE id = $1 FOR UPDATE")
        .bind(orphan)
        .execute(&mut *holder)
        .await
        .unwrap();

    let report = run_task(&task, pool).await;
    assert_eq!(report.completion, retention_controller::Completion::Done);
    assert!(
        report.counters.contains(&("orphan walk stopped", 1)),
        "{report:?}"
    );
    assert_eq!(event_ids(pool).await, vec![orphan]);

    holder.rollback().await.unwrap();
    let report = run_task(&task, pool).await;
    assert!(report.by_rule.contains(&("orphan-events", 1)), "{report:?}");
    assert_eq!(event_ids(pool).await, Vec::<i64>::new());
}

/// The late-orphans sweep lists the ranges once per run. A range swapped out meanwhile (a merge
/// keeps its sources' names, so the name now reaches a detached table the merge's count reads)
/// or changed by a layout change is not the range it listed: its batch deletes nothing there and
/// says so, and the sweep's place does not move past it.
#[tokio::test]
async fn the_orphan_sweep_touches_only_the_range_it_listed() {
    use repository::history::deletes;
    let _turn = ONE_AT_A_TIME.lock().await;
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let day = a_past_day(pool).await;
    let tenant = insert_tenant(pool, None, None).await;
    let missing: TaskKey = (uuid::Uuid::new_v4(), day_start(day) + Span::hours(1));
    insert_event(pool, tenant, missing, now - Span::days(2)).await;
    let listed = range_of_day(pool, day).await;
    let rule = repository::rule::Rule::new(now, Duration::from_secs(86_400));
    let receipt = repository::receipts::RunReceipt::new(uuid::Uuid::now_v7(), "task-history");
    let blocks = repository::heap::BlockRange { start: 0, end: 10 };
    let sweep = |range: repository::history::Range| {
        let (rule, receipt) = (rule.clone(), receipt.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let gone = deletes::delete_orphans_in_blocks(&mut tx, &range, blocks, &rule, &receipt)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            gone
        }
    };

    // The same table under other bounds: what a merge that kept the name leaves the listing with.
    let mut stale = listed.clone();
    stale.upper = stale.upper.map(|u| u + Span::days(30));
    assert_eq!(sweep(stale).await, None, "not the range listed");
    // A layout change holding the range's record.
    let mut carve = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM history_ranges WHERE tasks_relid = $1 FOR UPDATE")
        .bind(listed.tasks_relid)
        .execute(&mut *carve)
        .await
        .unwrap();
    assert_eq!(sweep(listed.clone()).await, None, "held by a layout change");
    carve.rollback().await.unwrap();
    assert_eq!(event_ids(pool).await.len(), 1, "the orphan is still there");

    assert_eq!(sweep(listed).await, Some(1), "the range as listed");
    assert!(event_ids(pool).await.is_empty());
}
