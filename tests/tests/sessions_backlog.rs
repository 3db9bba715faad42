//! The sessions backlog: the heap walk in block ranges, its choice, its timeouts, its progress
//! and pacing. Row for row, on both sides of both cutoffs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use retention_controller::settings::SessionsSettings;
use retention_controller::tasks::sessions::SessionsTask;
use retention_controller::{
    run_once_with, Completion, Progress, RunOptions, RunOutcome, RunReport,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// `n` sessions with ~300 bytes of data each, so that a few tens of thousands fill the 1,024
/// pages from which the heap walk is considered.
async fn insert_padded(
    pool: &PgPool,
    n: i64,
    user: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Vec<Uuid> {
    insert_padded_sessions(pool, n, user, created_at, expires_at, 300).await
}

/// A backlog of `due` rows for each part of the rule (`2 * due` in all), interleaved on the heap with rows a minute on
/// the kept side of each cutoff. Returns the kept ids.
async fn seed_backlog(pool: &PgPool, due: i64) -> Vec<Uuid> {
    let now = db_now(pool).await;
    let day = chrono::Duration::days(1);
    let user = Some(insert_user(pool).await);
    let mut kept = Vec::new();
    for _ in 0..2 {
        insert_padded(pool, due / 2, user, now - day * 3, now - MINUTE).await;
        kept.extend(insert_padded(pool, 100, user, now - day * 3, now + MINUTE).await);
        insert_padded(pool, due / 2, None, now - day - MINUTE, now + day).await;
        kept.extend(insert_padded(pool, 100, None, now - day + MINUTE, now + day).await);
        kept.extend(insert_padded(pool, 100, user, now - day * 30, now + day).await);
    }
    sorted(kept)
}

async fn heap_pages(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT pg_relation_size('user_sessions') / 8192")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn run(pool: &PgPool, settings: SessionsSettings, options: &RunOptions) -> RunReport {
    match run_once_with(
        &SessionsTask::new(settings),
        pool,
        &CancellationToken::new(),
        options,
    )
    .await
    .unwrap()
    {
        RunOutcome::Ran(summary) => summary.report,
        other => panic!("nobody else holds the task, nor paused it: {other:?}"),
    }
}

fn counter(report: &RunReport, name: &str) -> Option<u64> {
    report
        .counters
        .iter()
        .find(|(what, _)| *what == name)
        .map(|(_, n)| *n)
}

/// Batches aiming at 1 ms: many small ones.
fn small_batches() -> RunOptions {
    RunOptions {
        batch_time: Duration::from_millis(1),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_backlog_goes_in_one_pass_over_the_heap_and_nothing_else_goes() {
    let db = TestDatabase::new().await;
    let kept = seed_backlog(&db.pool, 15_000).await;
    sqlx::query("ANALYZE user_sessions")
        .execute(&db.pool)
        .await
        .unwrap();
    let pages = heap_pages(&db.pool).await;
    assert!(
        pages >= 1_024,
        "the backlog must span the heap walk's minimum: {pages} pages"
    );

    let report = run(&db.pool, SessionsSettings::default(), &small_batches()).await;

    assert_eq!(session_ids(&db.pool).await, kept);
    assert_eq!(
        report.by_rule,
        vec![("expired", 15_000), ("anonymous", 15_000)]
    );
    assert_eq!(report.completion, Completion::Done);
    assert_eq!(
        counter(&report, "heap pages walked"),
        Some(pages as u64),
        "{report:?}"
    );
    assert!(
        report.batches > 10,
        "sized toward 1 ms, the walk takes many batches: {report:?}"
    );
    let refreshed = counter(&report, "analyzed").or(counter(&report, "analyze left to autovacuum"));
    assert_eq!(
        refreshed,
        Some(1),
        "a large purge refreshes the statistics: {report:?}"
    );
}

#[tokio::test]
async fn an_index_walk_that_finds_a_backlog_the_statistics_missed_switches_to_the_heap() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    sqlx::query("ALTER TABLE user_sessions SET (autovacuum_enabled = false)")
        .execute(pool)
        .await
        .unwrap();
    let now = db_now(pool).await;
    let mut kept = insert_padded(
        pool,
        20_000,
        None,
        now - MINUTE,
        now + chrono::Duration::days(1),
    )
    .await;
    // Statistics that know only fresh sessions: the planner expects nothing due.
    sqlx::query("ANALYZE user_sessions")
        .execute(pool)
        .await
        .unwrap();
    kept.extend(seed_backlog(pool, 20_000).await);

    let report = run(
        pool,
        SessionsSettings {
            batch_size: 500,
            ..Default::default()
        },
        &fixed_batches(),
    )
    .await;

    assert_eq!(session_ids(pool).await, sorted(kept));
    assert_eq!(report.deleted, 40_000);
    assert!(
        counter(&report, "heap pages walked").is_some(),
        "the walk switched: {report:?}"
    );
}

#[tokio::test]
async fn a_few_due_rows_among_many_go_along_the_indexes() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let mut kept = insert_padded(
        pool,
        30_000,
        None,
        now - MINUTE,
        now + chrono::Duration::days(1),
    )
    .await;
    sqlx::query("ANALYZE user_sessions")
        .execute(pool)
        .await
        .unwrap();
    let user = Some(insert_user(pool).await);
    insert_padded(
        pool,
        40,
        user,
        now - chrono::Duration::days(3),
        now - MINUTE,
    )
    .await;
    kept.extend(
        insert_padded(
            pool,
            40,
            user,
            now - chrono::Duration::days(3),
            now + MINUTE,
        )
        .await,
    );

    let report = run(pool, SessionsSettings::default(), &fixed_batches()).await;

    assert_eq!(session_ids(pool).await, sorted(kept));
    assert_eq!(report.by_rule, vec![("expired", 40)]);
    assert_eq!(
        report.batches, 1,
        "one statement for the whole rule: {report:?}"
    );
    assert_eq!(counter(&report, "heap pages walked"), None, "{report:?}");
    assert_eq!(
        counter(&report, "analyzed"),
        None,
        "40 rows are no reason to analyze"
    );
}

#[tokio::test]
async fn a_page_whose_row_stays_locked_is_left_for_the_next_run() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let kept = seed_backlog(pool, 15_000).await;
    sqlx::query("ANALYZE user_sessions")
        .execute(pool)
        .await
        .unwrap();
    // A request holds a due session (say, refreshing it) for the whole run.
    let mut request = pool.begin().await.unwrap();
    let (locked, page): (Uuid, i64) = sqlx::query_as(
        "SELECT id, (ctid::text::point)[0]::bigint FROM user_sessions
         WHERE id = (SELECT id FROM user_sessions WHERE expires_at < now() ORDER BY ctid OFFSET 5000 LIMIT 1)
         FOR UPDATE",
    )
    .fetch_one(&mut *request)
    .await
    .unwrap();
    let on_that_page: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM user_sessions WHERE (ctid::text::point)[0]::bigint = $1",
    )
    .bind(page)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(on_that_page.contains(&locked));
    let settings = SessionsSettings {
        lock_timeout: Duration::from_millis(50),
        ..Default::default()
    };

    let report = run(pool, settings.clone(), &fixed_batches()).await;

    // Everything due went but that one page, which was skipped whole.
    assert_eq!(counter(&report, "pages skipped"), Some(1), "{report:?}");
    let mut expected = kept.clone();
    expected.extend(on_that_page.iter().filter(|id| !kept.contains(id)));
    assert_eq!(session_ids(pool).await, sorted(expected));
    assert_eq!(report.completion, Completion::Done);

    // Once the request is done, the next run takes the rest.
    request.commit().await.unwrap();
    let next = run(pool, settings, &fixed_batches()).await;
    assert_eq!(session_ids(pool).await, kept);
    assert_eq!(report.deleted + next.deleted, 30_000);
}

#[tokio::test]
async fn progress_is_reported_after_every_batch() {
    let db = TestDatabase::new().await;
    let kept = seed_backlog(&db.pool, 15_000).await;
    sqlx::query("ANALYZE user_sessions")
        .execute(&db.pool)
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let options = RunOptions {
        progress: Some({
            let seen = seen.clone();
            Arc::new(move |progress| seen.lock().unwrap().push(progress))
        }),
        ..small_batches()
    };

    let report = run(&db.pool, SessionsSettings::default(), &options).await;

    assert_eq!(session_ids(&db.pool).await, kept);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len() as u64, report.batches);
    let last = seen.last().unwrap();
    assert_eq!((last.deleted, last.left), (30_000, Some(0)));
    assert!(
        seen.windows(2).all(|w| w[0].deleted <= w[1].deleted),
        "deleted only grows"
    );
    assert!(
        seen.iter().all(|p| p.left.is_some()),
        "a heap walk can always estimate what is left"
    );
}

#[tokio::test]
async fn a_paced_run_is_cancelled_during_its_pause() {
    let db = TestDatabase::new().await;
    let kept = seed_backlog(&db.pool, 15_000).await;
    sqlx::query("ANALYZE user_sessions")
        .execute(&db.pool)
        .await
        .unwrap();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM user_sessions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    // Each batch is followed by a pause 3,000 times as long: the run sits in its first pause.
    let options = RunOptions {
        pause_ratio: 3_000.0,
        batch_time: Duration::from_millis(5),
        ..Default::default()
    };
    let cancel = CancellationToken::new();
    let task = Arc::new(SessionsTask::new(SessionsSettings::default()));
    let running = tokio::spawn({
        let (task, pool, cancel) = (task.clone(), db.pool.clone(), cancel.clone());
        async move { run_once_with(task.as_ref(), &pool, &cancel, &options).await }
    });
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM user_sessions")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if left < total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("cancelled promptly")
        .unwrap()
        .unwrap();
    let RunOutcome::Ran(summary) = outcome else {
        panic!("busy")
    };

    assert_eq!(summary.report.completion, Completion::Cancelled);
    assert_eq!(summary.report.batches, 1, "{:?}", summary.report);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM user_sessions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, total - summary.report.deleted as i64);
    let ids = session_ids(&db.pool).await;
    assert!(
        kept.iter().all(|id| ids.binary_search(id).is_ok()),
        "every keeper is still there"
    );
}

async fn last_analyze(pool: &PgPool) -> Option<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT last_analyze FROM pg_stat_user_tables WHERE relname = 'user_sessions'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_analyze_after_a_purge_never_waits_for_a_vacuum_in_progress() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    insert_padded(
        pool,
        100,
        None,
        db_now(pool).await,
        db_now(pool).await + MINUTE,
    )
    .await;

    assert_eq!(
        repository::heap::analyze(pool, "user_sessions")
            .await
            .unwrap(),
        repository::heap::Analyzed::Done
    );
    let analyzed = last_analyze(pool).await;
    assert!(analyzed.is_some(), "the ANALYZE ran");

    // A VACUUM's or another ANALYZE's lock, as autovacuum holds it after a purge.
    let mut vacuum = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE user_sessions IN SHARE UPDATE EXCLUSIVE MODE")
        .execute(&mut *vacuum)
        .await
        .unwrap();
    // It used to wait 100 ms for the lock (its lock_timeout) every time; now it never waits.
    // The fastest of three, so that one stall of a noisy machine cannot fail it.
    let mut fastest = Duration::MAX;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        assert_eq!(
            repository::heap::analyze(pool, "user_sessions")
                .await
                .unwrap(),
            repository::heap::Analyzed::Busy
        );
        fastest = fastest.min(started.elapsed());
    }
    assert!(
        fastest < Duration::from_millis(100),
        "left to the vacuum without waiting for its lock: {fastest:?}"
    );
    vacuum.rollback().await.unwrap();
    assert_eq!(
        last_analyze(pool).await,
        analyzed,
        "nothing was analyzed while the vacuum held the table"
    );
}
