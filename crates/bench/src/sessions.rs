//! `bench sessions`: purging the reported sessions backlog, against one bare DELETE of the same
//! rows on an identical copy, in the same run.
//!
//! The backlog: `rows` anonymous sessions created over 30 days (every one past the 24 h TTL) and
//! 6,000 kept (5,991 anonymous from the last hour, 9 logged in), ~370 bytes a row as reported.
//! It is seeded once, vacuumed and analyzed (as autovacuum would have), and each strategy runs on
//! its own copy (`CREATE DATABASE ... TEMPLATE`) right after a CHECKPOINT, while a foreground
//! workload (200 requests/s: session lookups by id and inserts) measures its latency:
//!
//! 1. idle: the foreground alone;
//! 2. one bare `DELETE ... WHERE <rule>`;
//! 3. the common fix: a loop of `WITH s AS (SELECT id ... ORDER BY created_at LIMIT 1000 FOR
//!    UPDATE SKIP LOCKED) DELETE ... USING s` (stopped after a time budget and extrapolated);
//! 4. `engine retention run --task sessions` (full speed), as a separate process;
//! 5. the same with `--pace` (what `engine serve` does): paced by feedback (the default), and at
//!    the fixed ratio it starts from (`retention.pacing.feedback = false`).
//!
//! Then the steady state: `steady_rows` kept sessions and 100 due, one sessions run in-process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use retention_controller::settings::SessionsSettings;
use retention_controller::tasks::sessions::SessionsTask;
use retention_controller::{run_once_with, RunOptions, RunOutcome};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use repository::replication::{wal_position, wal_since};

use crate::db::{self, mb, BenchDb};

const SEED_DB: &str = "sessions_seed";
const KEPT_ANONYMOUS: i64 = 5_991;
const KEPT_LOGGED_IN: i64 = 9;
/// Foreground requests a second, half lookups, half inserts.
const FOREGROUND_RATE: u32 = 200;
const IDLE_FOR: Duration = Duration::from_secs(15);
/// The rule as the engine applies it with the default 24 h anonymous TTL.
const RULE: &str =
    "expires_at < now() OR (user_id IS NULL AND created_at < now() - interval '24 hours')";

pub struct Args {
    pub rows: i64,
    pub cte_budget: Duration,
    pub pace: Vec<f64>,
    pub batch_time: Option<String>,
    pub full_speed_batch_time: Option<String>,
    pub steady_rows: i64,
    /// Only the steady-state measurement.
    pub steady_only: bool,
    /// Rounds of every strategy (each on fresh copies); with more than one, medians and ranges.
    pub runs: usize,
    /// `retention.parallelism` for the engine's runs (default: the engine's).
    pub parallelism: Option<u32>,
    /// A streaming standby beside the bench's server, its lag sampled during every purge.
    pub standby: bool,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut bench = db::open().await?;
    if args.standby {
        bench.start_standby().await?;
        println!("with a streaming standby on this machine (the engine's runs wait while it is over retention.throttle.max_replica_lag behind)");
    }
    if args.steady_only {
        return steady_state(&bench, args.steady_rows).await;
    }
    let engine = engine_binary()?;
    let has_statements = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&bench.pool)
        .await
        .is_ok()
        && sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&bench.pool)
            .await
            .is_ok();
    println!(
        "bench sessions: {} due rows, {} kept",
        args.rows,
        KEPT_ANONYMOUS + KEPT_LOGGED_IN
    );
    seed(&bench, args.rows).await?;

    let mut rounds = Vec::new();
    for round in 0..args.runs.max(1) {
        if args.runs > 1 {
            println!("\n== run {} of {}", round + 1, args.runs);
        }
        let (idle, results) = one_round(&bench, &args, &engine, has_statements, round == 0).await?;
        print_report(&idle, &results);
        rounds.push((idle, results));
    }
    if rounds.len() > 1 {
        print_summary(&rounds);
    }
    if args.steady_rows > 0 {
        steady_state(&bench, args.steady_rows).await?;
    }
    Ok(())
}

/// A paced engine run: its label, its `retention run` arguments and its environment.
type Pace = (&'static str, Vec<String>, Vec<(String, String)>);

/// Every strategy once, each on its own copy, with the idle foreground measured first; the
/// LIMIT 1000 loop only when `with_cte` (it is the common fix's reference, not a goal).
async fn one_round(
    bench: &BenchDb,
    args: &Args,
    engine: &Path,
    has_statements: bool,
    with_cte: bool,
) -> anyhow::Result<(Latencies, Vec<Measured>)> {
    let mut results = Vec::new();
    let idle = {
        let copy = Copy::create(bench, "idle").await?;
        if bench.has_standby() {
            // It replays the copy (CREATE DATABASE writes it all to the WAL) before the measure.
            standby_caught_up(&bench.pool).await?;
        }
        let foreground = Foreground::start(&copy.pool).await?;
        tokio::time::sleep(IDLE_FOR).await;
        let latencies = foreground.stop().await;
        copy.drop(bench).await?;
        latencies
    };
    eprintln!("  idle foreground: {}", idle.describe());

    results.push(
        measure(bench, "bare DELETE", has_statements, |copy| async move {
            let gone = sqlx::query(&format!("DELETE FROM user_sessions WHERE {RULE}"))
                .execute(&copy.pool)
                .await?
                .rows_affected();
            Ok(Outcome {
                deleted: gone,
                note: String::new(),
                extrapolated_to: None,
                peak_rss_kb: None,
            })
        })
        .await?,
    );

    let budget = args.cte_budget;
    let due = args.rows as u64;
    if with_cte {
        results.push(measure(bench, "CTE LIMIT 1000 loop", has_statements, move |copy| async move {
        let started = Instant::now();
        let mut deleted = 0u64;
        loop {
            let n = sqlx::query(&format!(
                "WITH s AS (SELECT id FROM user_sessions WHERE {RULE} ORDER BY created_at LIMIT 1000 FOR UPDATE SKIP LOCKED)
                 DELETE FROM user_sessions d USING s WHERE d.id = s.id"
            ))
            .execute(&copy.pool)
            .await?
            .rows_affected();
            deleted += n;
            if n == 0 || started.elapsed() >= budget {
                break;
            }
        }
        let elapsed = started.elapsed();
        let extrapolated_to = (deleted < due).then(|| elapsed.mul_f64(due as f64 / deleted.max(1) as f64));
        Ok(Outcome { deleted, note: String::new(), extrapolated_to, peak_rss_kb: None })
    })
    .await?);
    }

    let env = engine_env(args);
    results.push(
        measure(bench, "engine, full speed", has_statements, |copy| {
            let env = env.clone();
            async move { run_engine(engine, &copy.url, &env, &[]).await }
        })
        .await?,
    );
    // Paced: by feedback (the default) and at the fixed ratio it starts from.
    let fixed = |mut env: Vec<(String, String)>| {
        env.push(("ENGINE__RETENTION__PACING__FEEDBACK".into(), "false".into()));
        env
    };
    let paces: Vec<Pace> = if args.pace.is_empty() {
        vec![
            (
                "engine, paced (default: feedback)",
                vec!["--pace".into()],
                env.clone(),
            ),
            (
                "engine, paced, fixed ratio 1",
                vec!["--pace".into()],
                fixed(env.clone()),
            ),
        ]
    } else {
        let mut paces = Vec::new();
        for ratio in &args.pace {
            let pace = vec!["--pace".into(), ratio.to_string()];
            paces.push((
                &*Box::leak(format!("engine, --pace {ratio}, feedback").into_boxed_str()),
                pace.clone(),
                env.clone(),
            ));
            paces.push((
                &*Box::leak(format!("engine, --pace {ratio}, fixed").into_boxed_str()),
                pace,
                fixed(env.clone()),
            ));
        }
        paces
    };
    for (name, pace_args, env) in paces {
        results.push(
            measure(bench, name, has_statements, |copy| {
                let (env, pace_args) = (env.clone(), pace_args.clone());
                async move { run_engine(engine, &copy.url, &env, &pace_args).await }
            })
            .await?,
        );
    }

    Ok((idle, results))
}

/// What one strategy did.
struct Outcome {
    deleted: u64,
    note: String,
    /// The time the whole purge would take, when the strategy was stopped early.
    extrapolated_to: Option<Duration>,
    peak_rss_kb: Option<u64>,
}

struct Measured {
    name: &'static str,
    wall: Duration,
    outcome: Outcome,
    wal_bytes: i64,
    longest_statement: Option<(f64, String)>,
    foreground: Latencies,
    standby: Option<StandbyLag>,
}

/// How far the standby fell behind during a purge (`--standby`), as the primary saw it.
struct StandbyLag {
    /// The worst `replay_lag` sampled every 100 ms.
    worst: Duration,
    /// The most WAL written and not yet replayed.
    worst_bytes: i64,
    /// From the purge's end until the standby had replayed everything.
    caught_up_after: Duration,
}

/// Samples `pg_stat_replication` every 100 ms until stopped; returns the worst lag and bytes.
struct LagSampler {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<(Duration, i64)>>,
}

impl LagSampler {
    fn start(pool: &PgPool) -> LagSampler {
        let (pool, stop) = (pool.clone(), CancellationToken::new());
        let token = stop.clone();
        let handle = tokio::spawn(async move {
            let (mut worst, mut worst_bytes) = (Duration::ZERO, 0i64);
            while !token.is_cancelled() {
                let row: Option<(Option<f64>, Option<i64>)> = sqlx::query_as(
                    "SELECT extract(epoch FROM replay_lag)::float8, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint
                     FROM pg_stat_replication",
                )
                .fetch_optional(&pool)
                .await?;
                if let Some((lag, bytes)) = row {
                    worst = worst.max(Duration::from_secs_f64(lag.unwrap_or(0.0).max(0.0)));
                    worst_bytes = worst_bytes.max(bytes.unwrap_or(0));
                }
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            Ok((worst, worst_bytes))
        });
        LagSampler { stop, handle }
    }

    async fn stop(self) -> anyhow::Result<(Duration, i64)> {
        self.stop.cancel();
        self.handle.await?
    }
}

/// Waits until the standby has replayed all the primary has written; returns how long it took.
async fn standby_caught_up(pool: &PgPool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let behind: Option<i64> = sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint FROM pg_stat_replication")
            .fetch_optional(pool)
            .await?
            .flatten();
        if behind.is_some_and(|b| b <= 0) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the standby did not catch up in 10 minutes ({behind:?} bytes behind)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `purge` on a fresh copy after a CHECKPOINT, with the foreground running.
async fn measure<F, Fut>(
    bench: &BenchDb,
    name: &'static str,
    has_statements: bool,
    purge: F,
) -> anyhow::Result<Measured>
where
    F: FnOnce(Arc<Copy>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Outcome>>,
{
    let copy = Arc::new(Copy::create(bench, "run").await?);
    sqlx::query("CHECKPOINT").execute(&bench.pool).await?;
    if has_statements {
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&bench.pool)
            .await?;
    }
    if bench.has_standby() {
        standby_caught_up(&bench.pool).await?;
    }
    let lsn = wal_position(&bench.pool).await?;
    let sampler = bench.has_standby().then(|| LagSampler::start(&bench.pool));
    let foreground = Foreground::start(&copy.pool).await?;
    let started = Instant::now();
    let outcome = purge(copy.clone()).await?;
    let wall = started.elapsed();
    let foreground = foreground.stop().await;
    let wal_bytes = wal_since(&bench.pool, &lsn).await?;
    let standby = match sampler {
        Some(sampler) => {
            let (worst, worst_bytes) = sampler.stop().await?;
            let caught_up_after = standby_caught_up(&bench.pool).await?;
            eprintln!(
                "  {name}: the standby was at most {:.2} s ({:.0} MB) behind, and caught up {:.2} s after the end",
                worst.as_secs_f64(),
                mb(worst_bytes),
                caught_up_after.as_secs_f64()
            );
            Some(StandbyLag {
                worst,
                worst_bytes,
                caught_up_after,
            })
        }
        None => None,
    };
    let longest_statement = if has_statements {
        longest_statement(&bench.pool, &copy.name).await?
    } else {
        None
    };
    if let Some((ms, query)) = &longest_statement {
        eprintln!("  {name}: longest statement {ms:.0} ms: {query}");
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM user_sessions WHERE created_at < now() - interval '2 hours' AND user_id IS NULL")
        .fetch_one(&copy.pool)
        .await?;
    eprintln!(
        "  {name}: {} rows in {:.2}s{}{}, {left} due rows left; foreground {}",
        outcome.deleted,
        wall.as_secs_f64(),
        outcome
            .extrapolated_to
            .map(|t| format!(" (whole purge extrapolated: {:.0}s)", t.as_secs_f64()))
            .unwrap_or_default(),
        outcome.note,
        foreground.describe()
    );
    Arc::into_inner(copy)
        .context("copy still in use")?
        .drop(bench)
        .await?;
    Ok(Measured {
        name,
        wall,
        outcome,
        wal_bytes,
        longest_statement,
        foreground,
        standby,
    })
}

/// The longest single execution of any statement in database `name` (the foreground's excluded),
/// and the statement.
async fn longest_statement(pool: &PgPool, name: &str) -> anyhow::Result<Option<(f64, String)>> {
    Ok(sqlx::query_as(
        "SELECT s.max_exec_time, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 90)
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = $1 AND s.query NOT LIKE '/* foreground */%'
         ORDER BY s.max_exec_time DESC LIMIT 1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?)
}

fn print_report(idle: &Latencies, results: &[Measured]) {
    let bare = results[0].wall.as_secs_f64();
    println!();
    println!("| strategy | wall | vs bare DELETE | rows | WAL | longest statement | foreground p50 / p99 | engine peak RSS | standby: worst lag, WAL behind, caught up after the end |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| (idle) | | | | | | {:.2} / {:.2} ms | | |",
        idle.p50_ms, idle.p99_ms
    );
    for m in results {
        let (wall, note) = match m.outcome.extrapolated_to {
            Some(whole) => (whole.as_secs_f64(), " (extrapolated)"),
            None => (m.wall.as_secs_f64(), ""),
        };
        println!(
            "| {} | {:.2} s{note} | {:.2}x | {} | {:.0} MB | {} | {:.2} / {:.2} ms ({:.1}x / {:.1}x idle) | {} | {} |",
            m.name,
            wall,
            wall / bare,
            m.outcome.deleted,
            mb(m.wal_bytes),
            m.longest_statement.as_ref().map(|(ms, _)| format!("{ms:.0} ms")).unwrap_or_else(|| "n/a".into()),
            m.foreground.p50_ms,
            m.foreground.p99_ms,
            m.foreground.p50_ms / idle.p50_ms,
            m.foreground.p99_ms / idle.p99_ms,
            m.outcome.peak_rss_kb.map(|kb| format!("{:.1} MB", kb as f64 / 1024.0)).unwrap_or_default(),
            m.standby
                .as_ref()
                .map(|s| format!("{:.2} s, {:.0} MB, {:.2} s", s.worst.as_secs_f64(), mb(s.worst_bytes), s.caught_up_after.as_secs_f64()))
                .unwrap_or_default(),
        );
    }
}

/// Medians and ranges over the runs, each ratio against its own run's bare DELETE and idle
/// foreground.
fn print_summary(rounds: &[(Latencies, Vec<Measured>)]) {
    let mut names: Vec<&'static str> = Vec::new();
    for (_, results) in rounds {
        for m in results {
            if !names.contains(&m.name) {
                names.push(m.name);
            }
        }
    }
    println!("\n== {} runs: median (range)", rounds.len());
    println!("| strategy | vs bare DELETE | foreground p99 vs idle | foreground p99 vs the bare DELETE's |");
    println!("|---|---|---|---|");
    for name in names {
        let (mut walls, mut p99_idle, mut p99_bare) = (Vec::new(), Vec::new(), Vec::new());
        for (idle, results) in rounds {
            let bare = &results[0];
            if let Some(m) = results.iter().find(|m| m.name == name) {
                let wall = m.outcome.extrapolated_to.unwrap_or(m.wall).as_secs_f64();
                walls.push(wall / bare.wall.as_secs_f64());
                p99_idle.push(m.foreground.p99_ms / idle.p99_ms);
                p99_bare.push(m.foreground.p99_ms / bare.foreground.p99_ms);
            }
        }
        println!(
            "| {name} | {} | {} | {} |",
            spread(&mut walls),
            spread(&mut p99_idle),
            spread(&mut p99_bare)
        );
    }
}

/// "0.84x (0.79-0.91x)".
fn spread(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    format!(
        "{median:.2}x ({:.2}-{:.2}x)",
        values[0],
        values[values.len() - 1]
    )
}

// ----- seeding -----------------------------------------------------------------------------

async fn seed(bench: &BenchDb, rows: i64) -> anyhow::Result<()> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS {SEED_DB}"))
        .execute(&bench.pool)
        .await?;
    let pool = db::fresh_database(bench, SEED_DB).await?;
    let started = Instant::now();
    eprintln!("seeding {rows} due sessions over 30 days...");
    let chunk = 500_000i64;
    let mut done = 0;
    while done < rows {
        let n = chunk.min(rows - done);
        // Created evenly between 30 days and 25 hours ago, expiring 30 days after creation;
        // ~280 bytes of session data each, as in the report (969 MB for 2.6M rows).
        sqlx::query(
            "INSERT INTO user_sessions (user_id, data, created_at, updated_at, expires_at)
             SELECT NULL,
                    jsonb_build_object('csrf', md5(g::text), 'ua', repeat('Mozilla/5.0 ', 14), 'ip', '10.1.2.3',
                                       'flash', md5((g * 7)::text)),
                    c, c, c + interval '30 days'
             FROM generate_series($1::bigint, $2::bigint) g,
                  LATERAL (SELECT now() - interval '25 hours' - (g::float8 / $3) * (interval '30 days' - interval '25 hours') AS c) t",
        )
        .bind(done + 1)
        .bind(done + n)
        .bind(rows as f64)
        .execute(&pool)
        .await?;
        done += n;
        eprintln!("  {done} rows ({:.0}s)", started.elapsed().as_secs_f64());
    }
    // The kept: anonymous sessions of the last hour and nine logged-in users' old sessions.
    sqlx::query(
        "INSERT INTO user_sessions (user_id, data, created_at, updated_at, expires_at)
         SELECT NULL, jsonb_build_object('csrf', md5(g::text)), c, c, c + interval '30 days'
         FROM generate_series(1, $1) g, LATERAL (SELECT now() - (g % 3600) * interval '1 second' AS c) t",
    )
    .bind(KEPT_ANONYMOUS)
    .execute(&pool)
    .await?;
    for _ in 0..KEPT_LOGGED_IN {
        let user: Uuid = sqlx::query_scalar("INSERT INTO users (email) VALUES (gen_random_uuid()::text || '@example.test') RETURNING id")
            .fetch_one(&pool)
            .await?;
        sqlx::query(
            "INSERT INTO user_sessions (user_id, created_at, updated_at, expires_at)
             VALUES ($1, now() - interval '20 days', now(), now() + interval '10 days')",
        )
        .bind(user)
        .execute(&pool)
        .await?;
    }
    db::step(&pool, "VACUUM ANALYZE", "VACUUM ANALYZE user_sessions").await?;
    let size: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('user_sessions')")
        .fetch_one(&pool)
        .await?;
    let heap: i64 = sqlx::query_scalar("SELECT pg_relation_size('user_sessions')")
        .fetch_one(&pool)
        .await?;
    eprintln!(
        "  seeded in {:.0}s: table {:.0} MB with indexes, heap {:.0} MB",
        started.elapsed().as_secs_f64(),
        mb(size),
        mb(heap)
    );
    pool.close().await;
    Ok(())
}

/// An identical copy of the seeded database.
struct Copy {
    name: String,
    url: String,
    pool: PgPool,
}

impl Copy {
    async fn create(bench: &BenchDb, purpose: &str) -> anyhow::Result<Copy> {
        let name = format!("sessions_{purpose}");
        let pool = db::copy_database(bench, SEED_DB, &name).await?;
        let url = bench.url_for(&name);
        // Warm the cache the same way for every strategy: the heap and its indexes.
        sqlx::query("SELECT count(*) FROM user_sessions")
            .execute(&pool)
            .await?;
        Ok(Copy { name, url, pool })
    }

    async fn drop(self, bench: &BenchDb) -> anyhow::Result<()> {
        self.pool.close().await;
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .execute(&bench.pool)
            .await?;
        Ok(())
    }
}

// ----- the engine as a separate process ----------------------------------------------------

/// The release `engine` binary next to this one, built first if need be.
pub(crate) fn engine_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("engine");
    eprintln!("building the engine (cargo build --release -p engine)...");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", "engine"])
        .status()?;
    anyhow::ensure!(status.success(), "building the engine failed");
    anyhow::ensure!(
        path.exists(),
        "{} not found after building it",
        path.display()
    );
    Ok(path)
}

fn engine_env(args: &Args) -> Vec<(String, String)> {
    // BENCH_ENGINE_LOG=info shows the engine's own account of its runs.
    let log = std::env::var("BENCH_ENGINE_LOG").unwrap_or_else(|_| "warn".into());
    let mut env = vec![("RUST_LOG".to_string(), log)];
    if let Some(batch_time) = &args.batch_time {
        env.push((
            "ENGINE__RETENTION__PACING__BATCH_TIME".into(),
            batch_time.clone(),
        ));
    }
    if let Some(batch_time) = &args.full_speed_batch_time {
        env.push((
            "ENGINE__RETENTION__PACING__FULL_SPEED_BATCH_TIME".into(),
            batch_time.clone(),
        ));
    }
    if let Some(parallelism) = args.parallelism {
        env.push((
            "ENGINE__RETENTION__PARALLELISM".into(),
            parallelism.to_string(),
        ));
    }
    env
}

/// `engine retention run --task sessions [extra]` on `url`; its peak RSS is read from /proc while
/// it runs (VmHWM, the high-water mark, sampled every 50 ms).
async fn run_engine(
    engine: &Path,
    url: &str,
    env: &[(String, String)],
    extra: &[String],
) -> anyhow::Result<Outcome> {
    let child = tokio::process::Command::new(engine)
        .args(["retention", "run", "--task", "sessions", "--json"])
        .args(extra)
        .env("DATABASE_URL", url)
        .envs(env.iter().cloned())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let (output, peak_kb) = wait_with_peak_rss(child).await?;
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    anyhow::ensure!(output.status.success(), "engine failed: {stdout}");
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .with_context(|| format!("the engine's --json output: {stdout}"))?;
    let deleted = report["deleted"]
        .as_u64()
        .with_context(|| format!("no row count in the engine's output: {stdout}"))?;
    let note = format!(
        " [{} batches, longest {} ms; the run {} s of it, counters {}]",
        report["batches"], report["longest_batch_ms"], report["seconds"], report["counters"]
    );
    let peak_rss_kb = Some(peak_kb);
    Ok(Outcome {
        deleted,
        note,
        extrapolated_to: None,
        peak_rss_kb,
    })
}

/// Waits for `child` (stdout piped), sampling its peak RSS (VmHWM, kB) every 50 ms meanwhile.
pub(crate) async fn wait_with_peak_rss(
    child: tokio::process::Child,
) -> anyhow::Result<(std::process::Output, u64)> {
    let pid = child.id().context("engine pid")?;
    let peak = Arc::new(Mutex::new(0u64));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kb) = vm_hwm_kb(pid) {
                    let mut peak = peak.lock().unwrap();
                    *peak = (*peak).max(kb);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let output = child.wait_with_output().await?;
    sampler.abort();
    let peak_kb = *peak.lock().unwrap();
    Ok((output, peak_kb))
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

// ----- the foreground ----------------------------------------------------------------------

/// Requests at a fixed rate (open loop: a slow request does not delay the next one's start),
/// alternating a lookup of a kept session by id and the insert of a new anonymous session.
/// A request's latency runs from its scheduled start to its answer.
struct Foreground {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Vec<Duration>>,
}

struct Latencies {
    p50_ms: f64,
    p99_ms: f64,
    count: usize,
}

impl Latencies {
    fn describe(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms over {} requests",
            self.p50_ms, self.p99_ms, self.count
        )
    }
}

impl Foreground {
    async fn start(pool: &PgPool) -> anyhow::Result<Foreground> {
        let ids: Vec<Uuid> = sqlx::query_scalar("/* foreground */ SELECT id FROM user_sessions WHERE created_at > now() - interval '2 hours' OR user_id IS NOT NULL")
            .fetch_all(pool)
            .await?;
        anyhow::ensure!(!ids.is_empty(), "no kept sessions to look up");
        let stop = CancellationToken::new();
        let (pool, token) = (pool.clone(), stop.clone());
        let handle = tokio::spawn(async move {
            let latencies = Arc::new(Mutex::new(Vec::new()));
            let mut ticker = tokio::time::interval(Duration::from_secs(1) / FOREGROUND_RATE);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut requests = tokio::task::JoinSet::new();
            let mut n = 0usize;
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    tick = ticker.tick() => {
                        n += 1;
                        let (pool, latencies) = (pool.clone(), latencies.clone());
                        let id = ids[n % ids.len()];
                        let lookup = n.is_multiple_of(2);
                        requests.spawn(async move {
                            let result = if lookup {
                                sqlx::query("/* foreground */ SELECT data FROM user_sessions WHERE id = $1").bind(id).fetch_optional(&pool).await.map(|_| ())
                            } else {
                                sqlx::query("/* foreground */ INSERT INTO user_sessions (expires_at) VALUES (now() + interval '30 days')").execute(&pool).await.map(|_| ())
                            };
                            if result.is_ok() {
                                latencies.lock().unwrap().push(tick.elapsed());
                            }
                        });
                        while requests.try_join_next().is_some() {}
                    }
                }
            }
            while requests.join_next().await.is_some() {}
            let latencies = latencies.lock().unwrap().clone();
            latencies
        });
        Ok(Foreground { stop, handle })
    }

    async fn stop(self) -> Latencies {
        self.stop.cancel();
        let mut latencies = self.handle.await.unwrap_or_default();
        latencies.sort();
        let at = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Latencies {
            p50_ms: ms(at(0.5)),
            p99_ms: ms(at(0.99)),
            count: latencies.len(),
        }
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

// ----- steady state ------------------------------------------------------------------------

/// `kept` live sessions, then five times: 100 due sessions appear, one sessions run removes them.
/// Against a bare DELETE of 100 due rows by the same rule on the same table.
async fn steady_state(bench: &BenchDb, kept: i64) -> anyhow::Result<()> {
    sqlx::query("DROP DATABASE IF EXISTS sessions_steady")
        .execute(&bench.pool)
        .await?;
    let pool = db::fresh_database(bench, "sessions_steady").await?;
    eprintln!("steady state: seeding {kept} kept sessions...");
    let started = Instant::now();
    let chunk = 1_000_000i64;
    let mut done = 0;
    while done < kept {
        let n = chunk.min(kept - done);
        sqlx::query(
            "INSERT INTO user_sessions (user_id, created_at, updated_at, expires_at)
             SELECT NULL, now() - (g % 82800) * interval '1 second', now(), now() + interval '30 days'
             FROM generate_series(1, $1) g",
        )
        .bind(n)
        .execute(&pool)
        .await?;
        done += n;
    }
    db::step(&pool, "VACUUM ANALYZE", "VACUUM ANALYZE user_sessions").await?;
    eprintln!("  seeded in {:.0}s", started.elapsed().as_secs_f64());

    let seed_due = |pool: PgPool| async move {
        sqlx::query(
            "INSERT INTO user_sessions (user_id, created_at, updated_at, expires_at)
             SELECT NULL::uuid, now() - interval '25 hours', now(), now() + interval '1 day' FROM generate_series(1, 50)
             UNION ALL
             SELECT NULL::uuid, now() - interval '1 hour', now(), now() - interval '1 minute' FROM generate_series(1, 50)",
        )
        .execute(&pool)
        .await
    };
    let task = SessionsTask::new(SessionsSettings::default());
    let options = RunOptions::default();
    // A long-lived pool, as in `engine serve`: warm its plans first.
    for _ in 0..3 {
        seed_due(pool.clone()).await?;
        run_once_with(&task, &pool, &CancellationToken::new(), &options).await?;
    }
    let (mut engine_runs, mut whole_runs, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..7 {
        seed_due(pool.clone()).await?;
        let started = Instant::now();
        let outcome = run_once_with(&task, &pool, &CancellationToken::new(), &options).await?;
        let whole = started.elapsed();
        match outcome {
            RunOutcome::Ran(summary) => {
                anyhow::ensure!(
                    summary.report.deleted == 100,
                    "the run deleted {} rows, not 100",
                    summary.report.deleted
                );
                engine_runs.push(summary.elapsed);
                whole_runs.push(whole);
            }
            other => anyhow::bail!("the task did not run: {other:?}"),
        }
        seed_due(pool.clone()).await?;
        let started = Instant::now();
        let gone = sqlx::query(&format!("DELETE FROM user_sessions WHERE {RULE}"))
            .execute(&pool)
            .await?
            .rows_affected();
        bare.push(started.elapsed());
        anyhow::ensure!(gone == 100, "the bare DELETE deleted {gone} rows, not 100");
    }
    engine_runs.sort();
    whole_runs.sort();
    bare.sort();
    let median = |v: &[Duration]| ms(v[v.len() / 2]);
    println!();
    println!(
        "steady state, 100 due among {kept} kept ({} runs each): bare DELETE median {:.1} ms; sessions run median {:.1} ms ({:.1}x), max {:.1} ms; \
         with the lease taken and released (the whole run_once_with) median {:.1} ms ({:.1}x)",
        engine_runs.len(),
        median(&bare),
        median(&engine_runs),
        median(&engine_runs) / median(&bare),
        ms(*engine_runs.last().unwrap()),
        median(&whole_runs),
        median(&whole_runs) / median(&bare),
    );
    pool.close().await;
    sqlx::query("DROP DATABASE sessions_steady WITH (FORCE)")
        .execute(&bench.pool)
        .await?;
    Ok(())
}
