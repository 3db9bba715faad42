//! How sessions runs behave around their edges: cancellation in the middle of a purge, the run
//! deadline, the cross-replica lease, and several controllers on one database at once.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use repository::lease;
use retention_controller::settings::SessionsSettings;
use retention_controller::tasks::sessions::{SessionsTask, NAME};
use retention_controller::{
    run_once, run_once_with, Completion, Controller, MaintenanceTask, ProgressFn, RunOptions,
    RunOutcome, RunSummary,
};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// `due` expired sessions and `kept` live ones; returns the kept ids.
async fn seed_backlog(pool: &sqlx::PgPool, due: i64, kept: i64) -> Vec<Uuid> {
    let now = db_now(pool).await;
    let day = chrono::Duration::days(1);
    let user = Some(insert_user(pool).await);
    insert_sessions(pool, due / 2, user, now - day * 2, now - MINUTE).await;
    insert_sessions(pool, due - due / 2, None, now - day * 2, now + day).await;
    insert_sessions(pool, kept, user, now - day * 2, now + MINUTE).await
}

async fn session_count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM user_sessions")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn ran(outcome: RunOutcome) -> RunSummary {
    match outcome {
        RunOutcome::Ran(summary) => summary,
        other => panic!("expected the run to take the lease: {other:?}"),
    }
}

#[tokio::test]
async fn cancellation_mid_purge_commits_whole_batches_and_deletes_nothing_else() {
    let db = TestDatabase::new().await;
    let (due, batch) = (40_000i64, 100u32);
    let kept = seed_backlog(&db.pool, due, 300).await;
    let total = due + kept.len() as i64;
    let task = Arc::new(SessionsTask::new(SessionsSettings {
        batch_size: batch,
        ..Default::default()
    }));

    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let (task, pool, cancel) = (task.clone(), db.pool.clone(), cancel.clone());
        async move { run_once_with(task.as_ref(), &pool, &cancel, &fixed_batches()).await }
    });
    // Cancel as soon as the first batches have committed.
    while session_count(&db.pool).await == total {
        tokio::task::yield_now().await;
    }
    cancel.cancel();
    let summary = ran(run.await.unwrap().unwrap());

    let left = session_count(&db.pool).await;
    assert_eq!(summary.report.completion, Completion::Cancelled);
    assert!(
        summary.report.deleted > 0 && (summary.report.deleted as i64) < due,
        "{:?}",
        summary.report
    );
    assert_eq!(
        left,
        total - summary.report.deleted as i64,
        "reported rows are exactly the rows gone"
    );
    assert_eq!(
        summary.report.deleted % u64::from(batch),
        0,
        "only whole batches were committed"
    );
    assert_eq!(
        summary.report.batches * u64::from(batch),
        summary.report.deleted
    );

    // Every keeper is still there, and the next run finishes the job.
    let next = ran(run_once(task.as_ref(), &db.pool, &CancellationToken::new())
        .await
        .unwrap());
    assert_eq!(next.report.completion, Completion::Done);
    assert_eq!(summary.report.deleted + next.report.deleted, due as u64);
    assert_eq!(session_ids(&db.pool).await, kept);
}

#[tokio::test]
async fn a_run_past_its_deadline_stops_before_the_next_batch() {
    let db = TestDatabase::new().await;
    let kept = seed_backlog(&db.pool, 10, 5).await;
    let task = SessionsTask::new(SessionsSettings {
        max_run_time: Duration::ZERO,
        ..Default::default()
    });

    let summary = ran(run_once(&task, &db.pool, &CancellationToken::new())
        .await
        .unwrap());

    assert_eq!(summary.report.completion, Completion::DeadlineReached);
    assert_eq!((summary.report.deleted, summary.report.batches), (0, 0));
    assert_eq!(session_count(&db.pool).await, 10 + kept.len() as i64);
}

#[tokio::test]
async fn a_task_held_by_another_runner_is_skipped_without_deleting() {
    let db = TestDatabase::new().await;
    let kept = seed_backlog(&db.pool, 10, 5).await;
    let task = SessionsTask::new(SessionsSettings::default());

    let held = take_lease(&db.pool, NAME, "other:1", Duration::from_secs(60))
        .await
        .expect("free");
    let outcome = run_once(&task, &db.pool, &CancellationToken::new())
        .await
        .unwrap();
    assert!(matches!(outcome, RunOutcome::Busy));
    assert_eq!(session_count(&db.pool).await, 10 + kept.len() as i64);

    assert!(held.release(&db.pool).await.unwrap());
    let summary = ran(run_once(&task, &db.pool, &CancellationToken::new())
        .await
        .unwrap());
    assert_eq!(summary.report.deleted, 10);
    assert_eq!(session_ids(&db.pool).await, kept);
}

#[tokio::test]
async fn concurrent_runs_share_the_work_without_deadlock_or_overlap() {
    let db = TestDatabase::new().await;
    let due = 30_000i64;
    let kept = seed_backlog(&db.pool, due, 200).await;
    let task = Arc::new(SessionsTask::new(SessionsSettings {
        batch_size: 500,
        ..Default::default()
    }));

    // Four "replicas", each with its own pool, start runs at the same moment, repeatedly, until
    // nothing is due. Only one may hold the task at a time; every row is deleted exactly once.
    // Independently of the run log, each batch notes when it ended and in which run.
    let batches: Arc<Mutex<Vec<(usize, u32, Instant)>>> = Arc::default();
    let mut replicas = Vec::new();
    for replica in 0..4 {
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .connect(&db.url)
            .await
            .unwrap();
        let task = task.clone();
        let batches = batches.clone();
        replicas.push(tokio::spawn(async move {
            let (mut deleted, mut ran, mut busy) = (0u64, 0u32, 0u32);
            for attempt in 0..40 {
                let noted = batches.clone();
                let progress: ProgressFn = Arc::new(move |_| {
                    noted
                        .lock()
                        .unwrap()
                        .push((replica, attempt, Instant::now()))
                });
                let options = RunOptions {
                    progress: Some(progress),
                    ..Default::default()
                };
                match run_once_with(task.as_ref(), &pool, &CancellationToken::new(), &options)
                    .await
                    .unwrap()
                {
                    RunOutcome::Ran(summary) => {
                        deleted += summary.report.deleted;
                        ran += 1;
                    }
                    RunOutcome::Busy => busy += 1,
                    other => panic!("manual runs are neither paused nor scheduled: {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (deleted, ran, busy)
        }));
    }
    let results = futures::future::join_all(replicas).await;
    let results: Vec<(u64, u32, u32)> = results.into_iter().map(Result::unwrap).collect();

    // Each run's batches span an interval; no two runs' intervals meet.
    let mut spans: std::collections::BTreeMap<(usize, u32), (Instant, Instant)> =
        Default::default();
    for (replica, attempt, at) in batches.lock().unwrap().iter().copied() {
        let span = spans.entry((replica, attempt)).or_insert((at, at));
        span.0 = span.0.min(at);
        span.1 = span.1.max(at);
    }
    let mut spans: Vec<((usize, u32), (Instant, Instant))> = spans.into_iter().collect();
    spans.sort_by_key(|(_, (first, _))| *first);
    assert!(spans.len() > 1, "{spans:?}");
    for pair in spans.windows(2) {
        let ((run, (_, last)), (next, (first, _))) = (pair[0], pair[1]);
        assert!(
            last < first,
            "run {run:?} was still deleting after run {next:?} began"
        );
    }
    assert_eq!(
        results.iter().map(|r| r.0).sum::<u64>(),
        due as u64,
        "{results:?}"
    );
    assert!(
        results.iter().map(|r| r.2).sum::<u32>() > 0,
        "some attempts found the task held: {results:?}"
    );
    assert_eq!(session_ids(&db.pool).await, kept);
}

#[tokio::test]
async fn two_controllers_on_one_database_purge_exactly_the_due_rows() {
    let db = TestDatabase::new().await;
    let due = 20_000i64;
    let kept = seed_backlog(&db.pool, due, 200).await;
    let settings = SessionsSettings {
        interval: Duration::from_secs(1),
        batch_size: 300,
        ..Default::default()
    };

    let cancel = CancellationToken::new();
    let mut controllers = Vec::new();
    for _ in 0..2 {
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .connect(&db.url)
            .await
            .unwrap();
        let tasks: Vec<Arc<dyn MaintenanceTask>> =
            vec![Arc::new(SessionsTask::new(settings.clone()))];
        controllers.push(tokio::spawn(
            Controller::new(pool, tasks).run(cancel.child_token()),
        ));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while session_count(&db.pool).await > kept.len() as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the controllers did not converge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    for controller in controllers {
        tokio::time::timeout(Duration::from_secs(10), controller)
            .await
            .expect("controllers stop promptly")
            .unwrap();
    }
    assert_eq!(session_ids(&db.pool).await, kept);
}

#[tokio::test]
async fn racing_batches_without_the_lease_never_deadlock_or_delete_a_keeper() {
    // Defence in depth: even if two runners raced past the lease (an expired one), SKIP LOCKED
    // batches neither wait on each other nor remove anything outside the rule.
    let db = TestDatabase::new().await;
    let due = 20_000i64;
    let kept = seed_backlog(&db.pool, due, 200).await;
    let now = db_now(&db.pool).await;
    let cutoffs = repository::sessions::SessionCutoffs::at(now, chrono::Duration::hours(24));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let pool = db.pool.clone();
        workers.push(tokio::spawn(async move {
            let mut deleted = 0u64;
            for rule in repository::sessions::SessionRule::ALL {
                let mut cursor = None;
                loop {
                    let out = repository::sessions::delete_batch(
                        &pool,
                        rule,
                        &cutoffs,
                        cursor.as_ref(),
                        200,
                    )
                    .await
                    .unwrap();
                    deleted += out.deleted;
                    if out.deleted == 0 {
                        break;
                    }
                    cursor = out.next;
                }
            }
            deleted
        }));
    }
    let deleted: u64 = futures::future::join_all(workers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum();
    assert_eq!(deleted, due as u64);
    assert_eq!(session_ids(&db.pool).await, kept);
}

/// A task whose every run panics, counting its attempts.
struct Exploding {
    attempts: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait::async_trait]
impl MaintenanceTask for Exploding {
    fn name(&self) -> &'static str {
        "exploding"
    }
    fn schedule(&self) -> retention_controller::schedule::Schedule {
        retention_controller::schedule::Schedule {
            interval: Duration::from_secs(1),
            max_run_time: Duration::from_secs(10),
        }
    }
    async fn run(
        &self,
        _: &retention_controller::RunContext,
    ) -> Result<retention_controller::RunReport, retention_controller::TaskError> {
        self.attempts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        panic!("boom");
    }
    async fn dry_run(
        &self,
        _: &sqlx::PgPool,
    ) -> Result<retention_controller::DryRunReport, retention_controller::TaskError> {
        Ok(Default::default())
    }
}

#[tokio::test]
async fn a_panicking_run_is_an_error_and_releases_its_lease() {
    let db = TestDatabase::new().await;
    let task = Exploding {
        attempts: Default::default(),
    };
    let result = run_once(&task, &db.pool, &CancellationToken::new()).await;
    assert!(
        matches!(result, Err(retention_controller::TaskError::Panicked(ref m)) if m == "boom"),
        "{result:?}"
    );
    assert_eq!(
        lease::holder(&db.pool, "exploding").await.unwrap(),
        None,
        "the panicked run's lease was released"
    );
}

#[tokio::test]
async fn one_failing_task_does_not_stop_the_others() {
    let db = TestDatabase::new().await;
    let kept = seed_backlog(&db.pool, 2_000, 50).await;
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let settings = SessionsSettings {
        interval: Duration::from_secs(1),
        batch_size: 300,
        ..Default::default()
    };
    let tasks: Vec<Arc<dyn MaintenanceTask>> = vec![
        Arc::new(Exploding {
            attempts: attempts.clone(),
        }),
        Arc::new(SessionsTask::new(settings)),
    ];
    let cancel = CancellationToken::new();
    let controller = tokio::spawn(Controller::new(db.pool.clone(), tasks).run(cancel.clone()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while session_count(&db.pool).await > kept.len() as i64
        || attempts.load(std::sync::atomic::Ordering::SeqCst) == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions were not purged while another task failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(session_ids(&db.pool).await, kept);
}
