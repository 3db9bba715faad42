//! `bench queue-items`: the `queue-items` task's steady state. Many live queue items (10M by
//! default, over 10,000 running tasks) and, between runs, a few due ones (100: their tasks
//! finish). Measured: a whole `queue-items` run (lease, clock check, the recorded candidates,
//! deleted tenants' items, the sweep check, run log) against one bare DELETE of the same number
//! of items on the same table, alternating, in the same run. The first run, which walks the
//! whole heap once, is shown apart.

use std::time::{Duration, Instant};

use retention_controller::settings::QueueItemsSettings;
use retention_controller::tasks::queue_items::QueueItemsTask;
use retention_controller::{run_once, RunOutcome};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, step};

pub struct Args {
    pub items: i64,
    pub due: i64,
    pub samples: usize,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let bench = db::open().await?;
    println!(
        "\n== queue items, steady state: {} live items, {} due between runs",
        args.items, args.due
    );
    let pool = db::fresh_database(&bench, "queue_steady").await?;
    let tenant: Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (slug, name) VALUES ('queue', 'Queue') RETURNING id",
    )
    .fetch_one(&pool)
    .await?;
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status) SELECT $1, 'running' FROM generate_series(1, 10000)",
    )
    .bind(tenant)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO queue_items (tenant_id, task_id, task_inserted_at)
         SELECT $1, t.id, t.inserted_at FROM tasks t CROSS JOIN generate_series(1, $2::bigint / 10000)",
    )
    .bind(tenant)
    .bind(args.items)
    .execute(&pool)
    .await?;
    eprintln!("  seeded in {:.0}s", started.elapsed().as_secs_f64());
    step(&pool, "VACUUM ANALYZE", "VACUUM ANALYZE tasks, queue_items").await?;

    let task = QueueItemsTask::new(QueueItemsSettings::default());
    let started = Instant::now();
    run_task(&task, &pool).await?;
    println!(
        "  first run (walks the whole heap once)     {:>9.1} ms",
        ms(started.elapsed())
    );
    // Warm-up: the engine's pool keeps its prepared statements between runs.
    for sample in 0..3 {
        due_items(&pool, tenant, args.due, sample).await?;
        run_task(&task, &pool).await?;
    }
    let (mut engine, mut bare) = (Vec::new(), Vec::new());
    for sample in 0..args.samples {
        due_items(&pool, tenant, args.due, 100 + sample as i64).await?;
        let started = Instant::now();
        let deleted = run_task(&task, &pool).await?;
        engine.push(started.elapsed());
        anyhow::ensure!(
            deleted == args.due as u64,
            "the run deleted {deleted} items"
        );

        let tasks = due_items(&pool, tenant, args.due, 1000 + sample as i64).await?;
        // The trigger recorded these too: not the bare DELETE's business.
        sqlx::query("DELETE FROM queue_item_candidates")
            .execute(&pool)
            .await?;
        let started = Instant::now();
        let gone = sqlx::query("DELETE FROM queue_items WHERE task_id = ANY($1)")
            .bind(&tasks)
            .execute(&pool)
            .await?
            .rows_affected();
        bare.push(started.elapsed());
        anyhow::ensure!(
            gone == args.due as u64,
            "the bare DELETE removed {gone} items"
        );
    }
    let (engine, bare) = (median(&mut engine), median(&mut bare));
    println!(
        "  queue-items run                           median {:>7.1} ms",
        ms(engine)
    );
    println!(
        "  bare DELETE of the same number of items   median {:>7.1} ms",
        ms(bare)
    );
    println!(
        "  ratio run / bare DELETE: {:.2}x   (goal: at most 3x)",
        ms(engine) / ms(bare).max(0.001)
    );
    pool.close().await;
    db::drop_database(&bench, "queue_steady").await
}

/// `due` new tasks with a queue item each, then finished: their items become due.
async fn due_items(
    pool: &PgPool,
    tenant: Uuid,
    due: i64,
    sample: i64,
) -> anyhow::Result<Vec<Uuid>> {
    let tasks: Vec<Uuid> = sqlx::query_scalar(
        "WITH t AS (INSERT INTO tasks (tenant_id, status) SELECT $1, 'running' FROM generate_series(1, $2) RETURNING id, inserted_at),
              q AS (INSERT INTO queue_items (tenant_id, task_id, task_inserted_at, priority) SELECT $1, id, inserted_at, $3 FROM t)
         SELECT id FROM t",
    )
    .bind(tenant)
    .bind(due)
    .bind(sample as i32)
    .fetch_all(pool)
    .await?;
    sqlx::query("UPDATE tasks SET status = 'succeeded', finished_at = now() WHERE id = ANY($1)")
        .bind(&tasks)
        .execute(pool)
        .await?;
    Ok(tasks)
}

async fn run_task(task: &QueueItemsTask, pool: &PgPool) -> anyhow::Result<u64> {
    match run_once(task, pool, &CancellationToken::new()).await? {
        RunOutcome::Ran(summary) => Ok(summary.report.deleted),
        other => anyhow::bail!("queue-items did not run: {other:?}"),
    }
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
