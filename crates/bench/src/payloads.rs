//! `bench payloads`: a backlog of due tasks whose payloads are kept in object storage (1M by
//! default, on the local filesystem store), removed by the engine as it ships: `task-history`
//! deletes the rows (their objects' keys go to the outbox in the same transactions), then `blobs`
//! deletes the objects. Against it, in the same run: a plain loop deleting the same objects one
//! by one through the same store. Printed: each side's time, objects per second, and the engine's
//! peak memory (its process's VmHWM).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use retention_controller::storage::{payload_key, Storage, StorageSettings};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::{self, step};
use crate::sessions::{engine_binary, wait_with_peak_rss};

pub struct Args {
    pub tasks: i64,
    pub tenants: usize,
    pub days: i64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let engine = engine_binary()?;
    let bench = db::open().await?;
    println!(
        "\n== payloads: {} due tasks of {} tenants over {} days, each with an external payload",
        args.tasks, args.tenants, args.days
    );
    let pool = db::fresh_database(&bench, "payloads_backlog").await?;
    let dir = tempfile::tempdir()?;
    let objects = dir.path().join("objects");
    let settings = StorageSettings {
        url: Some(format!("file://{}", objects.display())),
        ..Default::default()
    };
    let storage = Storage::open(&settings, dir.path()).map_err(|e| anyhow::anyhow!("{e}"))?;

    let started = Instant::now();
    let keys = seed_rows(&pool, &args).await?;
    eprintln!("  rows seeded in {:.0}s", started.elapsed().as_secs_f64());
    let started = Instant::now();
    write_objects(&objects, &keys)?;
    eprintln!(
        "  {} objects written in {:.0}s",
        keys.len(),
        started.elapsed().as_secs_f64()
    );
    step(
        &pool,
        "VACUUM ANALYZE",
        "VACUUM ANALYZE tasks, task_payloads",
    )
    .await?;

    // The engine, as it ships.
    let (reports, wall, peak_kb) =
        run_engine(&engine, &bench.url_for("payloads_backlog"), &objects).await?;
    let seconds = |task: &str| -> f64 {
        reports
            .iter()
            .find(|r| r["task"] == task)
            .and_then(|r| r["seconds"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let (rows_left, outbox_left): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM task_payloads), (SELECT count(*) FROM object_deletions)",
    )
    .fetch_one(&pool)
    .await?;
    let objects_left = count_files(&objects);
    anyhow::ensure!(
        rows_left == 0 && outbox_left == 0 && objects_left == 0,
        "the engine left {rows_left} payload rows, {outbox_left} outbox entries, {objects_left} objects"
    );
    let blobs_s = seconds("blobs");
    println!(
        "  engine: task-history {:>7.1} s (rows), blobs {:>7.1} s (objects: {:>8.0}/s), {:>7.1} s in all; peak RSS {:.1} MB",
        seconds("task-history"),
        blobs_s,
        keys.len() as f64 / blobs_s,
        wall.as_secs_f64(),
        peak_kb as f64 / 1024.0
    );

    // The same objects again, deleted by a plain loop through the same store.
    write_objects(&objects, &keys)?;
    let started = Instant::now();
    for key in &keys {
        storage
            .delete(key)
            .await
            .map_err(|e| anyhow::anyhow!("deleting {key}: {e}"))?;
    }
    let loop_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(count_files(&objects) == 0, "the loop left objects");
    println!(
        "  plain loop of deletes through the same store: {:>7.1} s (objects: {:>8.0}/s)",
        loop_s,
        keys.len() as f64 / loop_s
    );
    println!(
        "  ratio: blobs / loop {:.2}x; the engine in all (rows and objects) / loop {:.2}x",
        blobs_s / loop_s,
        wall.as_secs_f64() / loop_s
    );
    Ok(())
}

/// Tenants keeping a day; their tasks finished three days ago, spread over `days` past days,
/// each with one external payload row. Returns the keys.
async fn seed_rows(pool: &PgPool, args: &Args) -> anyhow::Result<Vec<String>> {
    let mut tenants = Vec::new();
    for i in 0..args.tenants {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO tenants (slug, name, data_retention_period) VALUES ($1, $1, '1 day') RETURNING id",
        )
        .bind(format!("tenant-{i}"))
        .fetch_one(pool)
        .await?;
        tenants.push(id);
    }
    sqlx::query(
        "WITH t AS (
             INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
             SELECT ($1::uuid[])[1 + g % array_length($1::uuid[], 1)], 'succeeded',
                    date_trunc('day', now()) - (3 + g % $3) * interval '1 day' + interval '6 hours',
                    date_trunc('day', now()) - (3 + g % $3) * interval '1 day' + interval '7 hours'
             FROM generate_series(1, $2::bigint) g
             RETURNING id, tenant_id, inserted_at)
         INSERT INTO task_payloads (tenant_id, task_id, task_inserted_at, kind, location, external_key, size_bytes)
         SELECT tenant_id, id, inserted_at, 'output', 'external', 'pending', 100 FROM t",
    )
    .bind(&tenants)
    .bind(args.tasks)
    .bind(args.days)
    .execute(pool)
    .await?;
    // Each key names its payload's id (known once inserted), as `engine payload put` makes it.
    sqlx::query(
        "UPDATE task_payloads SET external_key = 'payloads/' || tenant_id || '/' || to_char(task_inserted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') || '/' || id",
    )
    .execute(pool)
    .await?;
    // The update gave every old key to the outbox (its trigger): not part of the backlog.
    sqlx::query("TRUNCATE object_deletions")
        .execute(pool)
        .await?;
    let rows: Vec<(Uuid, chrono::DateTime<chrono::Utc>, i64)> =
        sqlx::query_as("SELECT tenant_id, task_inserted_at, id FROM task_payloads")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(tenant, at, id)| payload_key(tenant, at.date_naive(), id))
        .collect())
}

/// Writes the objects straight to the store's directory, on four threads.
fn write_objects(root: &Path, keys: &[String]) -> anyhow::Result<()> {
    let chunk = keys.len().div_ceil(4).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = keys
            .chunks(chunk)
            .map(|keys| {
                scope.spawn(move || -> std::io::Result<()> {
                    let body = [b'x'; 100];
                    for key in keys {
                        let path = root.join(key);
                        if let Err(error) = std::fs::write(&path, body) {
                            if error.kind() != std::io::ErrorKind::NotFound {
                                return Err(error);
                            }
                            std::fs::create_dir_all(path.parent().unwrap())?;
                            std::fs::write(&path, body)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle.join().expect("writer thread")?;
        }
        Ok::<(), std::io::Error>(())
    })?;
    Ok(())
}

fn count_files(root: &Path) -> usize {
    fn walk(dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| {
                let path = e.path();
                if path.is_dir() {
                    walk(&path)
                } else {
                    1
                }
            })
            .sum()
    }
    walk(root)
}

/// `engine retention run --task task-history --task blobs --json`; its reports, wall time and
/// peak RSS (kB).
async fn run_engine(
    engine: &Path,
    url: &str,
    objects: &Path,
) -> anyhow::Result<(Vec<serde_json::Value>, Duration, u64)> {
    let log = std::env::var("BENCH_ENGINE_LOG").unwrap_or_else(|_| "warn".into());
    let started = Instant::now();
    let child = tokio::process::Command::new(engine)
        .args([
            "retention",
            "run",
            "--task",
            "task-history",
            "--task",
            "blobs",
            "--json",
        ])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", log)
        .env(
            "ENGINE__STORAGE__URL",
            format!("file://{}", objects.display()),
        )
        .env("ENGINE__RETENTION__TASK_HISTORY__MAX_RUN_TIME", "1day")
        .env("ENGINE__RETENTION__BLOBS__MAX_RUN_TIME", "1day")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let (output, peak_kb) = wait_with_peak_rss(child).await?;
    let wall = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    anyhow::ensure!(output.status.success(), "engine failed: {stdout}");
    let reports = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<serde_json::Value>, _>>()
        .with_context(|| format!("the engine's --json output: {stdout}"))?;
    Ok((reports, wall, peak_kb))
}
