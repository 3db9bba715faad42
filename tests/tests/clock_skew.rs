//! A database whose clock jumped forward (bad NTP, a restored snapshot) makes rows due early:
//! runs refuse to delete while its clock is off from the engine's by more than
//! `retention.max_clock_skew`. The database runs under libfaketime, two hours ahead.

mod common;

use common::*;
use retention_controller::settings::SessionsSettings;
use retention_controller::tasks::sessions::{SessionsTask, NAME};
use retention_controller::{run_once_with, RunOptions, RunOutcome, TaskError};
use std::time::Duration;
use testkit::local_postgres::{LocalPostgres, Options};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn a_database_clock_two_hours_ahead_deletes_nothing() {
    let metrics = prometheus_recorder();
    let _recording = metrics::set_default_local_recorder(&metrics);
    let dir = tempfile::tempdir().unwrap();
    // Reachable by the unprivileged user the cluster runs as when the tests run as root.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut options = Options::throwaway(dir.path().join("pg"));
    options.env = vec![
        (
            "LD_PRELOAD".into(),
            testkit::libfaketime(false).display().to_string(),
        ),
        ("FAKETIME".into(), "+2h".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    let server = tokio::task::spawn_blocking(move || LocalPostgres::start(options))
        .await
        .unwrap()
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&server.url())
        .await
        .unwrap();
    repository::MIGRATOR.run(&pool).await.unwrap();
    let ahead: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM now() - $1::timestamptz)::float8")
            .bind(chrono::Utc::now())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        (7190.0..7210.0).contains(&ahead),
        "the database is two hours ahead: {ahead} s"
    );

    // By the engine's clock: one session expired an hour ago, one expires in an hour.
    let now = chrono::Utc::now();
    let user = Some(insert_user(&pool).await);
    let expired = insert_sessions(
        &pool,
        1,
        user,
        now - chrono::Duration::days(1),
        now - chrono::Duration::hours(1),
    )
    .await;
    let live = insert_sessions(
        &pool,
        1,
        user,
        now - chrono::Duration::days(1),
        now + chrono::Duration::hours(1),
    )
    .await;
    let task = SessionsTask::new(SessionsSettings::default());

    let error = run_once_with(
        &task,
        &pool,
        &CancellationToken::new(),
        &RunOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, TaskError::Clock(_)), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("is 2h") && message.contains("ahead of this process's"),
        "{message}"
    );
    assert!(
        message.contains("retention.max_clock_skew = 5m")
            && message.contains("nothing was deleted"),
        "{message}"
    );
    let mut all = [expired.clone(), live.clone()].concat();
    all.sort();
    assert_eq!(
        session_ids(&pool).await,
        all,
        "nothing is deleted under a skewed clock"
    );
    let (outcome, recorded): (String, String) =
        sqlx::query_as("SELECT outcome, error FROM maintenance_runs WHERE task = $1")
            .bind(NAME)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(outcome, "failed");
    assert!(recorded.contains("ahead of this process's"), "{recorded}");
    // What the alert on refusals counts (deploy/prometheus/alerts.yaml).
    let text = metrics.handle().render();
    assert_eq!(
        series_value(&text, "retention_clock_refusals_total", "reason=\"skewed\""),
        Some(1.0),
        "{text}"
    );

    // What the guard prevents: trusted, the database's clock deletes the live session too.
    let trusting = RunOptions {
        max_clock_skew: Duration::from_secs(3 * 3600),
        ..Default::default()
    };
    let RunOutcome::Ran(summary) =
        run_once_with(&task, &pool, &CancellationToken::new(), &trusting)
            .await
            .unwrap()
    else {
        panic!("ran")
    };
    assert_eq!(summary.report.deleted, 2);
    assert!(session_ids(&pool).await.is_empty());
    pool.close().await;
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap()
        .unwrap();
}

/// The change log's triggers never read the database's clock: a database clock stepped back into
/// a past, settled day used to make writes into that day look like writes of its own live window,
/// which skip the log, and the facts never learnt of them (a due task left for good).
#[tokio::test]
async fn a_database_clock_stepped_back_into_a_settled_day_hides_no_write() {
    use retention_controller::settings::TaskHistorySettings;
    use retention_controller::tasks::task_history::TaskHistoryTask;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    std::fs::set_permissions(&offset, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut options = Options::throwaway(dir.path().join("pg"));
    options.env = vec![
        (
            "LD_PRELOAD".into(),
            testkit::libfaketime(false).display().to_string(),
        ),
        (
            "FAKETIME_TIMESTAMP_FILE".into(),
            offset.display().to_string(),
        ),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    let server = tokio::task::spawn_blocking(move || LocalPostgres::start(options))
        .await
        .unwrap()
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&server.url())
        .await
        .unwrap();
    repository::MIGRATOR.run(&pool).await.unwrap();
    let now = db_now(&pool).await;
    let day = now.date_naive() - chrono::Duration::days(10);
    create_day(&pool, day).await;
    let tenant = insert_tenant(&pool, Some("1 day"), None).await;
    let at = day_start(day) + chrono::Duration::hours(12);
    insert_task(&pool, tenant, "running", at, None).await;
    let task = TaskHistoryTask::new(TaskHistorySettings::default());
    run_task(&task, &pool).await;

    // The database's clock steps back into the day; a task of the day finishes meanwhile.
    let back = (at + chrono::Duration::hours(1) - chrono::Utc::now()).num_seconds();
    std::fs::write(&offset, format!("{back:+}\n")).unwrap();
    let stepped: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        stepped.date_naive() == day,
        "the database's clock is in the day: {stepped}"
    );
    let finished = insert_task(
        &pool,
        tenant,
        "succeeded",
        at,
        Some(at + chrono::Duration::hours(2)),
    )
    .await;
    std::fs::write(&offset, "+0\n").unwrap();

    let report = run_task(&task, &pool).await;
    assert!(
        !task_keys(&pool).await.contains(&finished),
        "a due task written while the clock was back was left: {report:?}"
    );
    assert_eq!(
        report
            .by_rule
            .iter()
            .find(|(r, _)| *r == "retention")
            .map(|(_, n)| *n),
        Some(1),
        "{report:?}"
    );
    pool.close().await;
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap()
        .unwrap();
}
