//! `bench history`: what the run-history tasks cost at scale.
//!
//! 1. Steady state: `rows` finished tasks kept (30 days, 9 tenants with a year's retention) and
//!    `due` rows of a one-day-retention tenant among them, in the two days that just passed its
//!    retention (where a steady state has them); the time of a whole `task-history` run, against
//!    a bare DELETE of the same number of rows through the same index.
//! 2. One day of `rows` due tasks removed by the `partitions` task (partition drop) against an
//!    identical day removed by `task-history`'s row deletes: wall time and WAL of each.

use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use repository::tenants::HistoryRules;
use repository::{batch, history, partitions};
use retention_controller::settings::TaskHistorySettings;
use retention_controller::tasks::task_history::TaskHistoryTask;
use retention_controller::{run_once, RunOutcome};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, mb, step, wal_lsn, wal_since};

const KEPT_DAYS: i64 = 30;
const SAMPLES: usize = 9;
const WARM_UP_RUNS: usize = 12;

pub async fn run(rows: i64, due: i64) -> anyhow::Result<()> {
    let bench = db::open().await?;
    let pool = &bench.pool;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let today = now.date_naive();
    println!("bench history: {rows} rows a day, {due} due rows in the steady-state run");

    // Tenants: nine that keep a year, one that keeps a day, one that keeps a week.
    let mut keepers = Vec::new();
    for n in 0..9 {
        keepers.push(tenant(pool, &format!("keep-{n}"), "365 days").await?);
    }
    let short = tenant(pool, "short", "1 day").await?;
    let weekly = tenant(pool, "weekly", "7 days").await?;

    eprintln!("seeding {rows} kept rows over {KEPT_DAYS} days...");
    for n in 1..=KEPT_DAYS {
        let day = today - chrono::Duration::days(n);
        let array: Vec<String> = keepers.iter().map(|id| format!("'{id}'")).collect();
        bulk_load_day(pool, day, rows / KEPT_DAYS, &format!("(ARRAY[{}]::uuid[])[1 + g % 9]", array.join(","))).await?;
    }
    step(pool, "ANALYZE", "ANALYZE tasks").await?;

    // 1. Steady state. The engine runs the task every few minutes on a long-lived pool, whose
    // connections keep their prepared plans: warm the pool up the same way before measuring.
    let task = TaskHistoryTask::new(TaskHistorySettings::default());
    let warm_up = Instant::now();
    for _ in 0..WARM_UP_RUNS {
        run_once(&task, pool, &CancellationToken::new()).await?;
    }
    eprintln!("  {WARM_UP_RUNS} warm-up runs: {:.0} ms", ms(warm_up.elapsed()));
    let mut engine_runs = Vec::new();
    let mut bare = Vec::new();
    for sample in 0..SAMPLES {
        seed_due(pool, short, due, today, sample as i64).await?;
        let started = Instant::now();
        let deleted = match run_once(&task, pool, &CancellationToken::new()).await? {
            RunOutcome::Ran(summary) => summary.report.by_rule.iter().find(|(r, _)| *r == "retention").map_or(0, |(_, n)| *n),
            other => anyhow::bail!("task-history did not run: {other:?}"),
        };
        engine_runs.push(started.elapsed());
        anyhow::ensure!(deleted == due as u64, "the run deleted {deleted} rows, expected {due}");

        seed_due(pool, short, due, today, sample as i64).await?;
        let started = Instant::now();
        let result = sqlx::query(
            "DELETE FROM tasks WHERE tenant_id = $1 AND status IN ('succeeded', 'failed', 'cancelled')
               AND coalesce(finished_at, inserted_at) < now() - interval '1 day'",
        )
        .bind(short)
        .execute(pool)
        .await?;
        bare.push(started.elapsed());
        anyhow::ensure!(result.rows_affected() == due as u64);
    }
    let (engine_median, bare_median) = (median(&mut engine_runs), median(&mut bare));
    println!();
    println!("steady state: {due} due among {rows} kept, {KEPT_DAYS} day partitions, {SAMPLES} samples after {WARM_UP_RUNS} warm-up runs");
    println!("  task-history run (whole run: tenants, {KEPT_DAYS} days checked, deletes, orphan sweep)");
    println!("    median {:>8.1} ms   max {:>8.1} ms   (goal: under 50 ms)", ms(engine_median), ms(*engine_runs.last().unwrap()));
    println!("  bare DELETE of the same rows through the same index");
    println!("    median {:>8.1} ms   max {:>8.1} ms", ms(bare_median), ms(*bare.last().unwrap()));
    println!("  ratio run / bare DELETE: {:.1}x", ms(engine_median) / ms(bare_median).max(0.001));

    // 2. A whole due day: partition drop versus row deletes.
    let (day_a, day_b) = (today - chrono::Duration::days(60), today - chrono::Duration::days(61));
    eprintln!("seeding two identical days of {rows} due rows...");
    bulk_load_day(pool, day_a, rows, &format!("'{weekly}'::uuid")).await?;
    bulk_load_day(pool, day_b, rows, &format!("'{weekly}'::uuid")).await?;
    step(pool, "VACUUM ANALYZE", "VACUUM ANALYZE tasks").await?;
    step(pool, "CHECKPOINT", "CHECKPOINT").await?;

    let grace = Duration::from_secs(86_400);
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let lsn = wal_lsn(pool).await?;
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    let summary = partitions::summarise_day(&mut conn, day_a, (&partitions::tasks_partition_name(day_a), &partitions::events_partition_name(day_a)), now, grace).await?;
    drop(conn);
    anyhow::ensure!(summary.wholly_due(), "day A is not wholly due");
    let checked = started.elapsed();
    let mut tx = pool.begin().await?;
    let removal = partitions::remove_day(&mut tx, day_a, now, grace, Duration::from_secs(5)).await?;
    tx.commit().await?;
    let locked = started.elapsed() - checked;
    let mut conn = pool.acquire().await?;
    partitions::drop_detached_days(&mut conn).await?;
    drop(conn);
    let drop_time = started.elapsed();
    let drop_wal = wal_since(pool, &lsn).await?;

    step(pool, "CHECKPOINT", "CHECKPOINT").await?;
    let rules = HistoryRules { live: vec![(weekly, now - chrono::Duration::days(7))], purged: vec![] };
    let tasks_b = partitions::tasks_partition_name(day_b);
    let limits = batch::BatchLimits::new(Duration::from_secs(30), Duration::from_secs(5)).with_generic_plans();
    let limit = TaskHistorySettings::default().batch_size;
    let lsn = wal_lsn(pool).await?;
    let started = Instant::now();
    let (mut deleted, mut batches, mut longest) = (0i64, 0u64, Duration::ZERO);
    let mut cursors = history::Cursors::new();
    loop {
        let batch_started = Instant::now();
        let mut tx = batch::begin(pool, limits).await?;
        let out = history::delete_retained_batch(&mut *tx, &tasks_b, &rules, &mut cursors, limit).await?;
        tx.commit().await?;
        longest = longest.max(batch_started.elapsed());
        deleted += out.tasks;
        batches += 1;
        if out.tasks < i64::from(limit) {
            break;
        }
    }
    let delete_time = started.elapsed();
    let delete_wal = wal_since(pool, &lsn).await?;
    anyhow::ensure!(deleted == rows, "row deletes removed {deleted} rows, expected {rows}");

    println!();
    println!("one day of {rows} due tasks (estimated by the planner at drop time: {})", removal.tasks_dropped);
    println!("  {:<44} {:>10} {:>12}", "", "wall", "WAL");
    println!(
        "  {:<44} {:>8.0} ms {:>9.2} MB   (goal: under 1 s and 10 MB)",
        "partitions: check + DETACH + DROP",
        ms(drop_time),
        mb(drop_wal)
    );
    println!("  {:<44} {:>8.1} ms", "  of which the wholly-due check", ms(checked));
    println!("  {:<44} {:>8.1} ms", "  of which the DETACH transaction (parents locked)", ms(locked));
    println!(
        "  {:<44} {:>8.0} ms {:>9.2} MB   ({batches} batches of {limit}, longest {:.0} ms)",
        "task-history: row deletes",
        ms(delete_time),
        mb(delete_wal),
        ms(longest)
    );
    println!(
        "  ratio drop / row deletes: time {:.4}x, WAL {:.5}x",
        ms(drop_time) / ms(delete_time),
        drop_wal as f64 / delete_wal.max(1) as f64
    );
    Ok(())
}

async fn tenant(pool: &PgPool, slug: &str, retention: &str) -> anyhow::Result<Uuid> {
    Ok(sqlx::query_scalar(
        "INSERT INTO tenants (id, slug, name, data_retention_period) VALUES (gen_random_uuid(), $1, $1, $2::interval) RETURNING id",
    )
    .bind(slug)
    .bind(retention)
    .fetch_one(pool)
    .await?)
}

/// Fills a day partition with `rows` finished tasks spread over the day, loading into the bare
/// table and letting ATTACH build its indexes (far faster than inserting through them).
async fn bulk_load_day(pool: &PgPool, day: NaiveDate, rows: i64, tenant_expr: &str) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    repository::partitions::create_day(&mut conn, day).await?;
    let name = partitions::tasks_partition_name(day);
    let (start, end) = partitions::bounds(day);
    sqlx::query(&format!("ALTER TABLE tasks DETACH PARTITION {name}")).execute(&mut *conn).await?;
    let indexes: Vec<String> = sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE tablename = $1")
        .bind(&name)
        .fetch_all(&mut *conn)
        .await?;
    for index in indexes {
        let constraint: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = $1)")
            .bind(&index)
            .fetch_one(&mut *conn)
            .await?;
        let sql = if constraint { format!("ALTER TABLE {name} DROP CONSTRAINT {index}") } else { format!("DROP INDEX {index}") };
        sqlx::query(&sql).execute(&mut *conn).await?;
    }
    let started = Instant::now();
    sqlx::query(&format!(
        "INSERT INTO {name} (id, tenant_id, status, inserted_at, finished_at)
         SELECT gen_random_uuid(), {tenant_expr}, 'succeeded', t, t + interval '1 minute'
         FROM (SELECT g, $1::timestamptz + (g * 86400.0 / $3) * interval '1 second' AS t
               FROM generate_series(0, $2 - 1) g) s"
    ))
    .bind(start)
    .bind(rows)
    .bind(rows as f64)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "ALTER TABLE tasks ATTACH PARTITION {name} FOR VALUES FROM ('{}') TO ('{}')",
        start.to_rfc3339(),
        end.to_rfc3339()
    ))
    .execute(&mut *conn)
    .await?;
    eprintln!("  {day}: {rows} rows in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `due` finished tasks of the one-day tenant, as a steady state has them: in the days that just
/// passed its retention (two and three days ago), spread over those days.
async fn seed_due(pool: &PgPool, tenant: Uuid, due: i64, today: NaiveDate, sample: i64) -> anyhow::Result<()> {
    let start = partitions::bounds(today - chrono::Duration::days(3)).0;
    sqlx::query(
        "INSERT INTO tasks (id, tenant_id, status, inserted_at, finished_at)
         SELECT gen_random_uuid(), $1, 'failed', t, t + interval '5 minutes'
         FROM (SELECT $2::timestamptz + ((g * 7919 + $3) % (2 * 24 * 60)) * interval '1 minute' AS t
               FROM generate_series(1, $4) g) s",
    )
    .bind(tenant)
    .bind(start)
    .bind(sample)
    .bind(due)
    .execute(pool)
    .await?;
    Ok(())
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
