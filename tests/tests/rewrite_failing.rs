//! A rewrite whose copy steps keep failing (each one cancelled by its statement timeout) costs
//! the run nothing: the range's due rows go by row deletes in the same run, the rewrite is given
//! up (its new tables dropped), and the failure is fed to the measured costs, so that rewrites
//! look dearer to the next choices. Its own test binary: the fault is switched on for the whole
//! process (`repository::history::rewrite::copy::testing`).

mod common;

use std::time::Duration;

use chrono::Duration as Span;
use common::*;
use repository::history::rewrite::copy::testing::stall_copies;
use retention_controller::settings::TaskHistorySettings;
use retention_controller::tasks::task_history::TaskHistoryTask;

#[tokio::test]
async fn a_rewrite_whose_copy_keeps_failing_falls_back_to_row_deletes_and_looks_dearer() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let day = a_past_day(pool).await;
    let at = day_start(day) + Span::hours(12);
    let daily = insert_tenant(pool, Some("1 day"), None).await;
    let forever = insert_tenant(pool, None, None).await;
    seed_tasks(pool, daily, "succeeded", at, at + Span::hours(1), 5_000).await;
    let mut kept = Vec::new();
    for _ in 0..3 {
        kept.push(
            insert_task_with_children(pool, forever, "succeeded", at, Some(at))
                .await
                .0,
        );
    }
    let task = TaskHistoryTask::new(TaskHistorySettings {
        statement_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let scale = || async {
        sqlx::query_scalar::<_, f64>(
            "SELECT seconds_per_row FROM retention_costs WHERE operation = 'rewrite-scale'",
        )
        .fetch_optional(pool)
        .await
        .unwrap()
    };
    let before = scale().await;

    stall_copies(true);
    let report = run_task(&task, pool).await;
    stall_copies(false);

    assert_eq!(
        report.deleted, 10_000,
        "5,000 tasks and their events, by row deletes: {report:?}"
    );
    assert!(
        !report
            .counters
            .iter()
            .any(|(c, _)| *c == "ranges compacted"),
        "{report:?}"
    );
    assert_eq!(
        task_keys(pool).await,
        sorted_keys(kept.clone()),
        "{report:?}"
    );
    let new_tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relname LIKE '%\\_new'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(new_tables, 0, "the rewrite's new tables are dropped");
    let in_progress: i64 = sqlx::query_scalar("SELECT count(*) FROM history_rewrites")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(in_progress, 0, "the rewrite is given up");
    let after = scale().await.expect("the failure is measured");
    assert!(
        after > before.unwrap_or(1.0) * 5.0,
        "rewrites look dearer: {before:?} -> {after}"
    );
}
