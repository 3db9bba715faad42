//! `bench history --archive`: the backlog of a tenant that archives (1M failed tasks with two
//! events each over 10 days, by default), purged by the engine as it ships (`engine retention
//! run --task task-history`: each run written to Parquet in a file store, confirmed, recorded,
//! then deleted), against, on identical copies in the same run: the same purge without archiving,
//! and one `COPY (SELECT ...) TO STDOUT` of the same runs with their events (as JSON) streamed to
//! a file. Printed: wall time, bytes per run written, and the engine's peak RSS. The goal: what
//! archiving adds to the purge is at most the COPY's time.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::TryStreamExt;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use crate::db::{self, step, BenchDb};
use crate::history::{load_day, make_days, settle, tenants, today};
use crate::sessions::{engine_binary, wait_with_peak_rss};

const SEED: &str = "history_archive_seed";

pub async fn run(bench: &BenchDb, tasks: i64, days: i64) -> anyhow::Result<()> {
    let engine = engine_binary()?;
    let per_day = tasks / days;
    let tasks = per_day * days;
    println!(
        "\n== archive: {tasks} due failed tasks with {} events of one archiving tenant, over {days} days",
        2 * tasks
    );
    let pool = db::fresh_database(bench, SEED).await?;
    let now: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT now()").fetch_one(&pool).await?;
    let tenant = tenants(&pool, "archiving", &[Some("1 day")], 1).await?;
    let first = today(now) - chrono::Duration::days(days + 1);
    make_days(&pool, first).await?;
    let started = Instant::now();
    for n in 0..days {
        load_day(
            &pool,
            first + chrono::Duration::days(n),
            per_day,
            &tenant,
            "failed",
            2,
        )
        .await?;
    }
    eprintln!("  seeded in {:.0}s", started.elapsed().as_secs_f64());
    step(&pool, "VACUUM ANALYZE", "VACUUM ANALYZE tasks, task_events").await?;
    settle(&pool).await?;
    pool.close().await;

    println!(
        "  {:<52} {:>9} {:>13} {:>10}",
        "", "wall", "bytes per run", "peak RSS"
    );
    // 1. COPY of the same runs with their events, streamed to a file (the baseline).
    let copy_s;
    {
        let pool = db::copy_database(bench, SEED, "history_archive_copy").await?;
        warm(&pool).await?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("runs.copy");
        let started = Instant::now();
        let bytes = copy_out(&pool, tenant[0], &path).await?;
        copy_s = started.elapsed().as_secs_f64();
        println!(
            "  {:<52} {:>8.1}s {:>13.1} {:>10}",
            "COPY (SELECT runs, events as JSON) TO a file",
            copy_s,
            bytes as f64 / tasks as f64,
            "-"
        );
        pool.close().await;
        db::drop_database(bench, "history_archive_copy").await?;
    }
    // 2. The purge without archiving, then 3. with it.
    let mut walls = Vec::new();
    for (label, archive) in [
        ("the engine's purge, not archiving", false),
        ("the engine's purge, archiving (Parquet, zstd)", true),
    ] {
        let name = format!("history_archive_{}", if archive { "on" } else { "off" });
        let pool = db::copy_database(bench, SEED, &name).await?;
        if archive {
            sqlx::query("UPDATE tenants SET archive_statuses = '{failed}' WHERE id = $1")
                .bind(tenant[0])
                .execute(&pool)
                .await?;
        }
        warm(&pool).await?;
        let dir = tempfile::tempdir()?;
        let objects = dir.path().join("objects");
        let (wall, peak_kb) = run_engine(&engine, &bench.url_for(&name), &objects).await?;
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
            .fetch_one(&pool)
            .await?;
        anyhow::ensure!(left == 0, "{label}: {left} tasks left");
        let (files, archived, bytes): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(tasks), 0)::bigint, coalesce(sum(bytes), 0)::bigint
               FROM retention_archives WHERE state = 'written'",
        )
        .fetch_one(&pool)
        .await?;
        if archive {
            anyhow::ensure!(archived == tasks, "{archived} runs archived of {tasks}");
        }
        println!(
            "  {:<52} {:>8.1}s {:>13} {:>7.1} MB",
            label,
            wall.as_secs_f64(),
            if archive {
                format!("{:.1}", bytes as f64 / tasks as f64)
            } else {
                "-".into()
            },
            peak_kb as f64 / 1024.0
        );
        if archive {
            println!("    ({files} files, {:.1} MB in all)", db::mb(bytes));
        }
        walls.push(wall.as_secs_f64());
        pool.close().await;
        db::drop_database(bench, &name).await?;
    }
    let added = walls[1] - walls[0];
    println!(
        "  archiving adds {added:.1}s to the purge: {:.2}x the COPY's {copy_s:.1}s (goal: at most 1x)",
        added / copy_s
    );
    db::drop_database(bench, SEED).await?;
    Ok(())
}

/// The copy's tables read once (its pages in the cache), like the seed's were.
async fn warm(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    for table in ["tasks", "task_events"] {
        sqlx::query(&format!("SELECT count(*) FROM {table}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// `COPY (SELECT ...) TO STDOUT` of the tenant's runs with their events (JSON), written to `path`
/// as it streams. Returns the bytes written.
async fn copy_out(pool: &sqlx::PgPool, tenant: Uuid, path: &Path) -> anyhow::Result<u64> {
    let mut conn = pool.acquire().await?;
    let mut file = tokio::fs::File::create(path).await?;
    let mut stream = conn
        .copy_out_raw(&format!(
            "COPY (SELECT t.id, t.tenant_id, t.status, t.inserted_at, t.finished_at, t.payload,
                          (SELECT json_agg(json_build_object('id', e.id, 'event_type', e.event_type,
                                                             'created_at', e.created_at, 'data', e.data) ORDER BY e.id)
                             FROM task_events e WHERE e.task_id = t.id AND e.task_inserted_at = t.inserted_at) AS events
                     FROM tasks t WHERE t.tenant_id = '{tenant}' AND t.status = 'failed'
                    ORDER BY coalesce(t.finished_at, t.inserted_at), t.id) TO STDOUT"
        ))
        .await?;
    let mut bytes = 0u64;
    while let Some(chunk) = stream.try_next().await? {
        bytes += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok(bytes)
}

/// `engine retention run --task task-history`; wall time and peak RSS (kB).
async fn run_engine(engine: &Path, url: &str, objects: &Path) -> anyhow::Result<(Duration, u64)> {
    let log = std::env::var("BENCH_ENGINE_LOG").unwrap_or_else(|_| "warn".into());
    let started = Instant::now();
    let child = tokio::process::Command::new(engine)
        .args(["retention", "run", "--task", "task-history", "--json"])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", log)
        .env(
            "ENGINE__STORAGE__URL",
            format!("file://{}", objects.display()),
        )
        .env("ENGINE__RETENTION__TASK_HISTORY__MAX_RUN_TIME", "1day")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let (output, peak_kb) = wait_with_peak_rss(child).await?;
    let wall = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    anyhow::ensure!(output.status.success(), "engine failed: {stdout}");
    serde_json::from_str::<serde_json::Value>(stdout.lines().next().unwrap_or("{}"))
        .with_context(|| format!("the engine's --json output: {stdout}"))?;
    Ok((wall, peak_kb))
}
