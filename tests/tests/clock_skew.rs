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
    let dir = tempfile::tempdir().unwrap();
    // Reachable by the unprivileged user the cluster runs as when the tests run as root.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut options = Options::throwaway(dir.path().join("pg"));
    options.env = vec![
        ("LD_PRELOAD".into(), testkit::libfaketime(false).display().to_string()),
        ("FAKETIME".into(), "+2h".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    let server = tokio::task::spawn_blocking(move || LocalPostgres::start(options)).await.unwrap().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(4).connect(&server.url()).await.unwrap();
    repository::MIGRATOR.run(&pool).await.unwrap();
    let ahead: f64 = sqlx::query_scalar("SELECT extract(epoch FROM now() - $1::timestamptz)::float8")
        .bind(chrono::Utc::now())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!((7190.0..7210.0).contains(&ahead), "the database is two hours ahead: {ahead} s");

    // By the engine's clock: one session expired an hour ago, one expires in an hour.
    let now = chrono::Utc::now();
    let user = Some(insert_user(&pool).await);
    let expired = insert_sessions(&pool, 1, user, now - chrono::Duration::days(1), now - chrono::Duration::hours(1)).await;
    let live = insert_sessions(&pool, 1, user, now - chrono::Duration::days(1), now + chrono::Duration::hours(1)).await;
    let task = SessionsTask::new(SessionsSettings::default());

    let error = run_once_with(&task, &pool, &CancellationToken::new(), &RunOptions::default()).await.unwrap_err();
    assert!(matches!(error, TaskError::Clock(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("is 2h") && message.contains("ahead of this process's"), "{message}");
    assert!(message.contains("retention.max_clock_skew = 5m") && message.contains("nothing was deleted"), "{message}");
    let mut all = [expired.clone(), live.clone()].concat();
    all.sort();
    assert_eq!(session_ids(&pool).await, all, "nothing is deleted under a skewed clock");
    let (outcome, recorded): (String, String) =
        sqlx::query_as("SELECT outcome, error FROM maintenance_runs WHERE task = $1").bind(NAME).fetch_one(&pool).await.unwrap();
    assert_eq!(outcome, "failed");
    assert!(recorded.contains("ahead of this process's"), "{recorded}");

    // What the guard prevents: trusted, the database's clock deletes the live session too.
    let trusting = RunOptions { max_clock_skew: Duration::from_secs(3 * 3600), ..Default::default() };
    let RunOutcome::Ran(summary) = run_once_with(&task, &pool, &CancellationToken::new(), &trusting).await.unwrap() else { panic!("ran") };
    assert_eq!(summary.report.deleted, 2);
    assert!(session_ids(&pool).await.is_empty());
    pool.close().await;
    tokio::task::spawn_blocking(move || server.stop()).await.unwrap().unwrap();
}
