//! Purges and a real streaming standby: a primary and a standby of its own (`pg_basebackup`),
//! both private clusters on Unix sockets. A purge at full speed keeps the standby within the
//! throttle's bound (plus a stated margin) and finishes; a standby whose replay stands still
//! holds purges (they wait once it is past the bound) only until it counts as stalled.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use retention_controller::settings::{RetentionSettings, SessionsSettings, ThrottleSettings};
use retention_controller::tasks::sessions::SessionsTask;
use retention_controller::{run_once_with, RunOptions, RunOutcome, RunReport};
use sqlx::PgPool;
use testkit::local_postgres::{LocalPostgres, Options};

/// The throttle's bound in this test, and how far past it the standby may be seen: one batch in
/// flight on each of the two workers (under 250 ms), a check interval (100 ms), and the
/// standby's replay of what was committed meanwhile, on a machine it shares with the primary.
const MAX_LAG: Duration = Duration::from_secs(1);
const MARGIN: Duration = Duration::from_secs(2);
/// With replay paused, the bound is lower, so that the wait begins early in the walk whatever the
/// machine's speed: at 1 s a 1M-row purge took 1.1-1.3 s, and its wait could begin after its last
/// batch (which waited then; in one CI run the purge's batches all came before it).
const STALLED_MAX_LAG: Duration = Duration::from_millis(300);
const STALL: Duration = Duration::from_secs(4);

struct Pair {
    primary: LocalPostgres,
    standby: LocalPostgres,
}

async fn start_pair() -> Pair {
    let dir = |name: &str| {
        let dir = tempfile::Builder::new()
            .prefix(name)
            .tempdir()
            .unwrap()
            .keep();
        // Reachable by the unprivileged user the clusters run as when the tests run as root.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        dir
    };
    let (primary_dir, standby_dir) = (dir("engine-primary-"), dir("engine-standby-"));
    let primary = tokio::task::spawn_blocking(move || {
        LocalPostgres::start(Options::throwaway(primary_dir.join("pg")))
    })
    .await
    .unwrap()
    .expect("start the primary");
    let from = primary.data_dir().to_path_buf();
    let standby = tokio::task::spawn_blocking(move || {
        LocalPostgres::start(Options::standby(standby_dir.join("pg"), &from))
    })
    .await
    .unwrap()
    .expect("start the standby");
    Pair { primary, standby }
}

/// The standby's replay lag as the primary reports it, sampled every 50 ms until `stop`.
fn sample_lag(
    pool: PgPool,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Duration, usize)> {
    tokio::spawn(async move {
        let (mut worst, mut samples) = (Duration::ZERO, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let lag: Option<f64> = sqlx::query_scalar(
                "SELECT extract(epoch FROM replay_lag)::float8 FROM pg_stat_replication",
            )
            .fetch_optional(&pool)
            .await
            .unwrap()
            .flatten();
            worst = worst.max(Duration::from_secs_f64(lag.unwrap_or(0.0)));
            samples += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (worst, samples)
    })
}

/// A full-speed sessions run with the throttle at `max_lag`; returns its report and the instants
/// of its batches.
async fn purge(pool: &PgPool, max_lag: Duration) -> (RunReport, Vec<Instant>) {
    let settings = RetentionSettings {
        throttle: ThrottleSettings {
            max_replica_lag: max_lag,
            max_replica_stall: STALL,
            check_interval: Duration::from_millis(100),
        },
        ..Default::default()
    };
    let batches = Arc::new(Mutex::new(Vec::new()));
    let seen = batches.clone();
    let options = RunOptions {
        progress: Some(Arc::new(move |_| seen.lock().unwrap().push(Instant::now()))),
        ..settings.run_options(0.0)
    };
    let task = SessionsTask::new(SessionsSettings::default());
    let report = match run_once_with(
        &task,
        pool,
        &tokio_util::sync::CancellationToken::new(),
        &options,
    )
    .await
    .unwrap()
    {
        RunOutcome::Ran(summary) => summary.report,
        other => panic!("{other:?}"),
    };
    let batches = batches.lock().unwrap().clone();
    (report, batches)
}

/// `n` anonymous sessions two days old, ~300 bytes each as reported (a 2.6M-row purge writes
/// about a gigabyte of WAL).
async fn seed_due(pool: &PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO user_sessions (user_id, data, created_at, updated_at, expires_at)
         SELECT NULL, jsonb_build_object('pad', repeat('x', 300)), now() - interval '2 days', now(), now() + interval '28 days'
         FROM generate_series(1, $1)",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn purges_keep_a_standby_within_the_bound_and_a_stalled_standby_holds_them_only_so_long() {
    show_logs();
    let pair = start_pair().await;
    let pool = PgPool::connect(&pair.primary.url()).await.unwrap();
    repository::MIGRATOR.run(&pool).await.unwrap();
    let standby = PgPool::connect(&pair.standby.url()).await.unwrap();
    let now = db_now(&pool).await;
    let kept = insert_sessions(
        &pool,
        1_000,
        None,
        now - chrono::Duration::hours(1),
        now + chrono::Duration::days(29),
    )
    .await;
    seed_due(&pool, 2_600_000).await;
    sqlx::query("VACUUM ANALYZE user_sessions")
        .execute(&pool)
        .await
        .unwrap();
    // The standby has caught up with the seed before the purge starts.
    wait_for_replay(&pool).await;

    // 1. The standby replays as fast as it can: the purge keeps it within the bound.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = sample_lag(pool.clone(), stop.clone());
    let started = Instant::now();
    let (report, _) = purge(&pool, MAX_LAG).await;
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst, samples) = sampler.await.unwrap();
    eprintln!("2.6M rows purged in {took:?} with the standby at most {worst:?} behind ({samples} samples)");
    assert_eq!(report.deleted, 2_600_000, "{report:?}");
    assert!(samples >= 10, "{samples} samples");
    assert!(
        worst <= MAX_LAG + MARGIN,
        "the standby was {worst:?} behind, over {MAX_LAG:?} + {MARGIN:?}"
    );
    assert_eq!(session_ids(&pool).await, kept);

    // 2. The standby stops replaying: the purge waits, then goes on once the standby has stood
    //    still for STALL, and finishes.
    wait_for_replay(&pool).await;
    seed_due(&pool, 1_000_000).await;
    sqlx::query("VACUUM ANALYZE user_sessions")
        .execute(&pool)
        .await
        .unwrap();
    wait_for_replay(&pool).await;
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&standby)
        .await
        .unwrap();
    let started = Instant::now();
    let (report, batches) = purge(&pool, STALLED_MAX_LAG).await;
    let took = started.elapsed();
    assert_eq!(report.deleted, 1_000_000, "{report:?}");
    assert_eq!(session_ids(&pool).await, kept);
    let (at, longest_gap) = batches
        .windows(2)
        .enumerate()
        .map(|(i, w)| (i, w[1] - w[0]))
        .max_by_key(|(_, gap)| *gap)
        .unwrap_or_default();
    eprintln!(
        "with replay paused: {took:?}, {} batches, longest wait between two {longest_gap:?} after batch {}",
        batches.len(),
        at + 1
    );
    // It waits from when the standby is STALLED_MAX_LAG behind until it has stood still for
    // STALL (both counted from the throttle's first look, after the first batch).
    let expected = STALL - STALLED_MAX_LAG - Duration::from_millis(500);
    assert!(
        longest_gap >= expected,
        "the purge waited only {longest_gap:?} between batches, under {expected:?}"
    );
    assert!(
        took < STALL + Duration::from_secs(60),
        "a stalled standby held the purge for {took:?}"
    );
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby)
        .await
        .unwrap();
    wait_for_replay(&pool).await;

    standby.close().await;
    pool.close().await;
    let Pair { primary, standby } = pair;
    tokio::task::spawn_blocking(move || {
        standby.stop().unwrap();
        primary.stop().unwrap();
    })
    .await
    .unwrap();
}

/// Until the standby has replayed everything the primary has written.
async fn wait_for_replay(pool: &PgPool) {
    let started = Instant::now();
    loop {
        let behind: Option<i64> = sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint FROM pg_stat_replication",
        )
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten();
        if behind.is_some_and(|b| b <= 0) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the standby did not catch up: {behind:?} bytes behind"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
