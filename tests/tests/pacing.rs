//! Pacing by feedback against a real server: a paced run's pauses grow when its batches make
//! another backend wait, and shrink to their floor when nobody feels them.

mod common;

use std::time::Duration;

use common::*;
use retention_controller::feedback::FeedbackOptions;
use retention_controller::{
    run_once_with, MaintenanceTask, RunContext, RunOptions, RunOutcome, RunReport, TaskError,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const BATCH: Duration = Duration::from_millis(20);
/// At a fixed ratio of 1 a run makes at most `RUN_FOR / (2 x BATCH)`, 150 batches.
const RUN_FOR: Duration = Duration::from_secs(6);

/// For [`RUN_FOR`], batches that each hold the lock on row 1 of `pacing_rows` for [`BATCH`].
struct Locking;

#[async_trait::async_trait]
impl MaintenanceTask for Locking {
    fn name(&self) -> &'static str {
        "locking"
    }
    fn schedule(&self) -> retention_controller::schedule::Schedule {
        retention_controller::schedule::Schedule {
            interval: Duration::from_secs(60),
            max_run_time: Duration::from_secs(60),
        }
    }
    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let mut report = RunReport::default();
        let started = Instant::now();
        while started.elapsed() < RUN_FOR {
            if let Some(stop) = ctx.interrupted() {
                report.completion = stop;
                return Ok(report);
            }
            let batch = Instant::now();
            let mut tx = ctx.pool.begin().await?;
            sqlx::query("SELECT 1 FROM pacing_rows WHERE id = 1 FOR UPDATE")
                .execute(&mut *tx)
                .await?;
            sqlx::query("SELECT pg_sleep($1)")
                .bind(BATCH.as_secs_f64())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            report.record_batch("locked", 0);
            ctx.batch_done(batch.elapsed(), &mut report, None).await;
        }
        Ok(report)
    }
    async fn dry_run(
        &self,
        _pool: &sqlx::PgPool,
    ) -> Result<retention_controller::DryRunReport, TaskError> {
        Ok(Default::default())
    }
}

/// Paced from a ratio of 1, with feedback between 0.25 and 8 and a probe every 10 ms.
fn paced() -> RunOptions {
    RunOptions {
        batch_time: BATCH,
        pause_ratio: 1.0,
        feedback: Some(FeedbackOptions {
            min_pause_ratio: 0.25,
            max_pause_ratio: 8.0,
            max_slowdown: 2.0,
            probe_interval: Duration::from_millis(10),
        }),
        ..Default::default()
    }
}

async fn run_locking(pool: &sqlx::PgPool) -> RunReport {
    match run_once_with(&Locking, pool, &CancellationToken::new(), &paced())
        .await
        .unwrap()
    {
        RunOutcome::Ran(summary) => summary.report,
        other => panic!("did not run: {other:?}"),
    }
}

fn counter(report: &RunReport, name: &str) -> u64 {
    report
        .counters
        .iter()
        .find(|(what, _)| *what == name)
        .map_or(0, |(_, n)| *n)
}

async fn table(db: &TestDatabase) {
    sqlx::query("CREATE TABLE pacing_rows (id int PRIMARY KEY, n bigint NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO pacing_rows VALUES (1, 0)")
        .execute(&db.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn nobody_waiting_lets_the_pauses_shrink_to_their_floor() {
    show_logs();
    let db = TestDatabase::new().await;
    table(&db).await;

    let report = run_locking(&db.pool).await;

    // Lowered from 1 to the floor (0.25) takes two decisions or more; none was a raise by waits
    // (nobody else was there to wait).
    assert!(
        counter(&report, "pace lowered") >= 2,
        "{:?}",
        report.counters
    );
    assert_eq!(
        counter(&report, "pace raised by waits"),
        0,
        "{:?}",
        report.counters
    );
    // At 0.25, a cycle is 25 ms: far more batches than at a fixed 1 (at most 150).
    assert!(
        report.batches > 160,
        "{} batches, {:?}",
        report.batches,
        report.counters
    );
}

/// The foreground: one connection of `pool` updating row 1 over and over, so it waits on every
/// batch's lock and on nothing else (its commits do not wait for the disk). Cancel `stop`, and
/// the handle answers how many updates it made.
fn foreground(pool: &sqlx::PgPool, stop: &CancellationToken) -> tokio::task::JoinHandle<u64> {
    let (pool, stop) = (pool.clone(), stop.clone());
    tokio::spawn(async move {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SET synchronous_commit = off")
            .execute(&mut *conn)
            .await
            .unwrap();
        let mut updates = 0u64;
        while !stop.is_cancelled() {
            sqlx::query("UPDATE pacing_rows SET n = n + 1 WHERE id = 1")
                .execute(&mut *conn)
                .await
                .unwrap();
            updates += 1;
        }
        updates
    })
}

/// A pool on the test database whose connections are named `name` in pg_stat_activity.
async fn named_pool(db: &TestDatabase, name: &str) -> sqlx::PgPool {
    let options = db
        .url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .application_name(name);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_backend_waiting_on_the_batches_makes_the_pauses_grow() {
    show_logs();
    let db = TestDatabase::new().await;
    table(&db).await;
    let stop = CancellationToken::new();
    let foreground = foreground(&db.pool, &stop);

    let report = run_locking(&db.pool).await;
    stop.cancel();
    let updates = foreground.await.unwrap();

    assert!(updates > 0);
    assert!(
        counter(&report, "pace raised by waits") >= 1,
        "{:?}",
        report.counters
    );
    // Raised, the pauses leave the foreground most of the time: far fewer batches than at a
    // fixed 1 (up to 150).
    assert!(
        report.batches < 90,
        "{} batches, {:?}",
        report.batches,
        report.counters
    );
}

/// The engine's admin server names its connections `<engine's name>/http`: its page loads are
/// the engine's own, not the foreground the pauses make room for. The same waiting backend as
/// above, named so, raises nothing.
#[tokio::test]
async fn the_engines_own_admin_connections_waiting_do_not_make_the_pauses_grow() {
    show_logs();
    let db = TestDatabase::new().await;
    table(&db).await;
    let engine = named_pool(&db, "retention-engine").await;
    let admin = named_pool(&db, "retention-engine/http").await;
    let stop = CancellationToken::new();
    let foreground = foreground(&admin, &stop);

    let report = run_locking(&engine).await;
    stop.cancel();
    let updates = foreground.await.unwrap();

    assert!(updates > 0);
    assert_eq!(
        counter(&report, "pace raised by waits"),
        0,
        "{:?}",
        report.counters
    );
}
