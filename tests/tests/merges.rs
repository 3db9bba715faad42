//! Merges of cold ranges finish at any size: a cold month holding many rows kept forever is
//! merged by `partitions` under a statement timeout far shorter than one copy of it would take
//! (every step is a block range sized to well within it), with the few due rows among them gone
//! and every kept row there; and every merge the run planned is done in the same run.

mod common;

use std::time::Duration;

use chrono::{Datelike, Duration as Span, NaiveDate};
use common::*;
use retention_controller::settings::PartitionsSettings;
use retention_controller::tasks::partitions::PartitionsTask;

#[tokio::test]
async fn a_cold_month_of_kept_rows_merges_under_a_short_statement_timeout() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    // The whole month before last, and the first week of the month after it: cold, every day.
    let today = now.date_naive();
    let this_month = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap();
    let month = (this_month - Span::days(40)).with_day(1).unwrap();
    let next_month = (month + Span::days(40)).with_day(1).unwrap();
    create_day(pool, month).await;
    let forever = insert_tenant(pool, None, None).await;
    let daily = insert_tenant(pool, Some("1 day"), None).await;
    // 10,000 kept tasks a day, each with an event, and a due one a day.
    sqlx::query(
        "WITH t AS (INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
                    SELECT $1, 'succeeded', d + (g * interval '8 seconds'), d + interval '23 hours'
                    FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 day', interval '1 day') d, generate_series(1, 10000) g
                    RETURNING id, inserted_at)
         INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
         SELECT $1, id, inserted_at, 'done', inserted_at FROM t",
    )
    .bind(forever)
    .bind(day_start(month))
    .bind(day_start(next_month + Span::days(7)))
    .execute(pool)
    .await
    .unwrap();
    let mut due = Vec::new();
    let mut day = month;
    while day < next_month + Span::days(7) {
        due.push(
            insert_task_with_children(
                pool,
                daily,
                "succeeded",
                day_start(day) + Span::hours(1),
                Some(day_start(day) + Span::hours(2)),
            )
            .await,
        );
        day += Span::days(1);
    }
    let kept_before: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE tenant_id = $1")
        .bind(forever)
        .fetch_one(pool)
        .await
        .unwrap();
    // One INSERT ... SELECT of the month's kept rows takes longer than this (checked below).
    let statement_timeout = Duration::from_millis(250);
    let settings = PartitionsSettings {
        statement_timeout,
        ..Default::default()
    };
    let partitions = PartitionsTask::new(settings, Duration::from_secs(86_400));

    let report = run_task(&partitions, pool).await;

    assert_eq!(
        report.completion,
        retention_controller::Completion::Done,
        "{report:?}"
    );
    let spans: Vec<String> = sqlx::query_scalar(
        "SELECT tasks_relid::regclass::text FROM history_ranges WHERE lower >= $1 AND lower < $2 ORDER BY lower",
    )
    .bind(day_start(month))
    .bind(day_start(next_month + Span::days(7)))
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(spans.len(), 2, "the month in one range, and the next month's first quarter in another: {spans:?} {report:?}");
    let kept_after: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE tenant_id = $1")
        .bind(forever)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(kept_after, kept_before, "every kept row is there");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM task_events WHERE tenant_id = $1")
        .bind(forever)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(events, kept_before);
    let keys = task_keys(pool).await;
    assert!(
        due.iter().all(|(task, _, _)| !keys.contains(task)),
        "the due rows went with the merge"
    );
    assert!(
        report.longest_batch < statement_timeout,
        "every step within the statement timeout: {report:?}"
    );
    // The swap of 31 daily ranges for one: 40-90 ms here; `bench history --section merge` measures
    // it against the 100 ms goal. This bound, with room for a noisy machine, catches a swap whose
    // catalog changes went back to a round trip each (138-157 ms here).
    assert!(
        report.longest_lock < Duration::from_millis(150),
        "the history tables' lock: {report:?}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM history_rewrites")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "nothing left half done");

    // What a merge in one statement meets: the copy of the month, past the timeout.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!(
        "SET LOCAL statement_timeout = '{}ms'",
        statement_timeout.as_millis()
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    // A table like the range's (logged, with its indexes), as the merge's copy fills.
    sqlx::query("CREATE TABLE copy_of_the_month (LIKE tasks INCLUDING ALL)")
        .execute(&mut *tx)
        .await
        .unwrap();
    let one_statement =
        sqlx::query("INSERT INTO copy_of_the_month SELECT * FROM tasks WHERE tenant_id = $1")
            .bind(forever)
            .execute(&mut *tx)
            .await;
    match one_statement {
        Err(error) => assert!(repository::batch::is_timeout(&error), "{error}"),
        Ok(done) => panic!(
            "one statement copied the month's {} kept tasks within {statement_timeout:?}",
            done.rows_affected()
        ),
    }
}
