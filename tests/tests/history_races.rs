//! `task-history` and `partitions` running at once, on ranges both want to rewrite (the first to
//! compact a day, the second to merge cold days): neither fails the other, and after both end
//! nothing that was due when they started is left.

mod common;

use chrono::Duration as Span;
use common::*;
use retention_controller::settings::{PartitionsSettings, TaskHistorySettings};
use retention_controller::tasks::partitions::PartitionsTask;
use retention_controller::tasks::task_history::TaskHistoryTask;

#[tokio::test]
async fn the_history_tasks_never_fail_each_other() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let first = now.date_naive() - Span::days(24);
    create_day(pool, first).await;
    let daily = insert_tenant(pool, Some("1 day"), None).await;
    let forever = insert_tenant(pool, None, None).await;
    let history = TaskHistoryTask::new(TaskHistorySettings::default());
    let partitions = PartitionsTask::new(
        PartitionsSettings::default(),
        std::time::Duration::from_secs(86_400),
    );
    let mut kept = 0i64;
    for round in 0..4 {
        // Every past day gets due rows (enough that compacting it pays) and a few kept ones.
        sqlx::query(
            "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
             SELECT CASE WHEN g % 100 = 0 THEN $2 ELSE $1 END, 'succeeded', d + interval '6 hours', d + interval '7 hours'
             FROM generate_series($3::timestamptz, $4::timestamptz, interval '1 day') d, generate_series(1, 3000) g",
        )
        .bind(daily)
        .bind(forever)
        .bind(day_start(first))
        .bind(day_start(now.date_naive() - Span::days(2)))
        .execute(pool)
        .await
        .unwrap();
        kept += 23 * 30;
        let (a, b) = tokio::join!(run_task(&history, pool), run_task(&partitions, pool));
        let due_left = due_left(pool, now).await;
        assert_eq!(due_left, 0, "round {round}: {a:?} {b:?}");
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(
            left, kept,
            "round {round}: only the forever tenant's rows are left"
        );
    }
}

/// A tenant deleted two days ago with a task running since an hour from now (or from the
/// future range's start), in the future range: what a carve of today moves.
async fn running_task_of_a_deleted_tenant_in_the_future_range(
    pool: &sqlx::PgPool,
) -> (repository::history::Range, uuid::Uuid, TaskKey) {
    use repository::history::{ranges, RangeKind};
    let now = db_now(pool).await;
    let doomed = insert_tenant(pool, None, Some(now - Span::days(2))).await;
    let future = ranges::all(pool)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.kind == RangeKind::Future)
        .unwrap();
    let at = future.lower.unwrap().max(now) + Span::hours(1);
    let task = insert_task(pool, doomed, "running", at, None).await;
    assert_eq!(home_of(pool, task).await, future.tasks_name);
    (future, doomed, task)
}

#[tokio::test]
async fn a_batch_planned_before_a_carve_finds_the_range_moved_and_the_run_plans_again() {
    // Seen in CI: the demo's task-history run planned a deleted tenant's running tasks in the
    // future range (today had no range of its own yet); `partitions` then carved today out of it,
    // moving them into a new range, and the batches, finding nothing left where they were
    // planned, ended the run `done` with the tasks still there.
    use repository::history::deletes::{self, PairRef, Walk};
    use repository::history::ranges;
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let (future, doomed, task) = running_task_of_a_deleted_tenant_in_the_future_range(pool).await;
    let at = task.1;
    let planned = PairRef::new(&future, doomed);

    // The carve moves the task into a day of its own; the future range keeps its table.
    let mut tx = pool.begin().await.unwrap();
    ranges::take_layout_lock(&mut tx, true).await.unwrap();
    ranges::carve_days(&mut tx, at.date_naive(), std::time::Duration::from_secs(5))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_ne!(home_of(pool, task).await, future.tasks_name);

    let receipt = repository::receipts::RunReceipt::new(uuid::Uuid::now_v7(), "task-history");
    let rule =
        repository::rule::Rule::new(db_now(pool).await, std::time::Duration::from_secs(86_400));
    let mut conn = pool.acquire().await.unwrap();
    let batch = deletes::delete_batch(
        &mut conn,
        &planned,
        &mut Walk::purged(),
        &rule,
        100,
        &receipt,
    )
    .await
    .unwrap();
    assert!(
        batch.range_missing,
        "a batch on the range as planned must find it moved: {batch:?}"
    );
    assert_eq!(task_keys(pool).await, vec![task]);

    // A run plans the new range and deletes the task.
    run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;
    assert_eq!(task_keys(pool).await, vec![]);
}

#[tokio::test]
async fn a_plan_sees_the_layout_and_the_rows_as_of_one_moment() {
    // Seen in CI (the demo again): a carve committed while a task-history run was planning,
    // after the plan had read the layout (today still in the future range) and before it
    // probed the future range's rows (no longer there: moved to today's new range, which the
    // plan did not know). Nothing was planned for them and the run ended `done`, leaving a
    // deleted tenant's six running tasks.
    use repository::history::ranges;
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let (future, _, task) = running_task_of_a_deleted_tenant_in_the_future_range(pool).await;
    let at = task.1;

    // The carve holds the future range's tables until it commits: the run's probe of them waits.
    let mut carve = pool.begin().await.unwrap();
    ranges::take_layout_lock(&mut carve, true).await.unwrap();
    ranges::carve_days(
        &mut carve,
        at.date_naive(),
        std::time::Duration::from_secs(5),
    )
    .await
    .unwrap();
    let history = TaskHistoryTask::new(TaskHistorySettings::default());
    let run = tokio::spawn({
        let pool = pool.clone();
        async move { run_task(&history, &pool).await }
    });
    // The probe of a live range's rows (`facts::probe`), waiting for a lock.
    let probe = "WITH b AS MATERIALIZED (SELECT $%::timestamptz AS lower)%";
    let waiting = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                  WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1)";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sqlx::query_scalar::<_, bool>(waiting)
        .bind(probe)
        .fetch_one(pool)
        .await
        .unwrap()
    {
        assert!(
            !run.is_finished(),
            "the run ended without reading the future range while the carve held it"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the run's probe of the future range never waited for the carve"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    carve.commit().await.unwrap();
    assert_ne!(
        home_of(pool, task).await,
        future.tasks_name,
        "the carve moved the task into a day of its own"
    );

    let report = run.await.unwrap();
    assert_eq!(
        report.completion,
        retention_controller::Completion::Done,
        "{report:?}"
    );
    assert_eq!(
        task_keys(pool).await,
        vec![],
        "the run that ended done left the deleted tenant's task: {report:?}"
    );
}

/// Tasks due by the rule at `now`.
async fn due_left(pool: &sqlx::PgPool, now: chrono::DateTime<chrono::Utc>) -> i64 {
    let rule = repository::rule::Rule::new(now, std::time::Duration::from_secs(86_400));
    let mut count = repository::sql::Sql::new(
        "SELECT count(*) FROM tasks t LEFT JOIN tenants tn ON tn.id = t.tenant_id WHERE {due}",
    );
    count.with("due", rule.task_due("t", "tn"));
    count.build_query_scalar().fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn due_rows_written_to_a_range_another_runner_is_rewriting_are_planned_by_their_change_log() {
    // The known race of `the_history_tasks_never_fail_each_other`, made certain: a plan trusted
    // the facts of every range that was not live, while the change log of some still waited
    // (another runner applying it in passes, or a merge in progress, whose ranges the refresh
    // leaves to its replay). The rows those entries wrote were not planned. Here `partitions`
    // has started a merge of two past days and stopped before copying (its next run resumes
    // it); due rows are then written to one of them: `task-history` must delete them now.
    use repository::history::ranges;
    use retention_controller::rewrites::{self, Naming, Outcome, Steps};
    use retention_controller::{RunContext, RunOptions, RunReport};
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let first = now.date_naive() - Span::days(12);
    create_day(pool, first).await;
    let daily = insert_tenant(pool, Some("1 day"), None).await;
    let forever = insert_tenant(pool, None, None).await;
    let noon = day_start(first) + Span::hours(12);
    seed_tasks(pool, forever, "succeeded", noon, noon, 10).await;
    // The facts know the rows so far.
    run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;
    let sources: Vec<_> = ranges::all(pool)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| {
            r.lower == Some(day_start(first)) || r.lower == Some(day_start(first + Span::days(1)))
        })
        .collect();
    assert_eq!(sources.len(), 2);

    let stopped = tokio_util::sync::CancellationToken::new();
    stopped.cancel();
    let ctx = RunContext::new(
        pool.clone(),
        uuid::Uuid::now_v7(),
        stopped,
        std::time::Duration::from_secs(600),
        RunOptions::default(),
    )
    .with_clock(now, tokio::time::Instant::now());
    let steps = Steps {
        limits: repository::batch::BatchLimits::new(
            std::time::Duration::from_secs(30),
            std::time::Duration::from_secs(5),
        )
        .with_generic_plans()
        .with_history_write(),
        lock_timeout: std::time::Duration::from_secs(5),
        grace: std::time::Duration::from_secs(86_400),
    };
    let outcome = rewrites::start(
        &ctx,
        &sources,
        "partitions",
        steps,
        true,
        Naming::Tables,
        &mut RunReport::default(),
    )
    .await
    .unwrap();
    assert!(matches!(outcome, Outcome::Interrupted), "{outcome:?}");

    // Written after the merge began: logged, and left in the log for the merge's replay.
    seed_tasks(pool, daily, "succeeded", noon, noon, 500).await;
    seed_tasks(pool, daily, "failed", noon, noon, 300).await;
    insert_task(pool, daily, "running", noon, None).await;
    assert_eq!(due_left(pool, now).await, 800);

    run_task(&TaskHistoryTask::new(TaskHistorySettings::default()), pool).await;
    assert_eq!(
        due_left(pool, now).await,
        0,
        "the rows written to the range being merged were not planned"
    );
    let left: Vec<(uuid::Uuid, String, i64)> = sqlx::query_as(
        "SELECT tenant_id, status, count(*) FROM tasks GROUP BY 1, 2 ORDER BY tenant_id = $1, 2",
    )
    .bind(daily)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        vec![
            (forever, "succeeded".to_string(), 10),
            (daily, "running".to_string(), 1)
        ]
    );

    // The merge then resumes and swaps: the same rows, and only they, are left.
    let partitions = PartitionsTask::new(
        PartitionsSettings::default(),
        std::time::Duration::from_secs(86_400),
    );
    run_task(&partitions, pool).await;
    let after: Vec<(uuid::Uuid, String, i64)> = sqlx::query_as(
        "SELECT tenant_id, status, count(*) FROM tasks GROUP BY 1, 2 ORDER BY tenant_id = $1, 2",
    )
    .bind(daily)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(after, left);
}
