//! `bench history`: what run-history retention costs, against a bare DELETE of the same rows
//! measured in the same run. Three sections, each on a database of its own:
//!
//! 1. `steady`: many tenants keeping long windows over many day ranges (1,000 tenants, 60 days,
//!    10M tasks by default), and a few due rows (100) of a one-day tenant arriving between runs:
//!    a whole `partitions` run plus a whole `task-history` run, as `engine retention run` does
//!    them, against one bare DELETE of the same rows.
//! 2. `compaction`: one past day of due tasks (1M, one event each) that keeps some rows (100,000
//!    kept tasks, and again with none): rewritten by `task-history`, against the same day's due
//!    rows deleted by row deletes; wall time, WAL, and how long the parents' exclusive lock was
//!    held, with a foreground writer's worst latency meanwhile.
//! 3. `backlog`: 1M due tasks with 2M events over 30 days of 100 tenants: deleted by row deletes
//!    (compaction off; on `retention.parallelism` connections, and on one), against one bare
//!    DELETE of the same rows on an identical copy; and by the engine as it is (compaction on).
//! 4. `status`: the steady state of section 1 under status windows: every tenant keeps succeeded
//!    tasks 7 days and failed ones 90, with the kept failed tasks over all 60 days; the due rows
//!    are one tenant's succeeded tasks past their 7 days, against a bare DELETE of them.
//! 5. `merge`: a cold month holding 5M tasks kept forever (and a due task a day), merged by a
//!    `partitions` run under `statement_timeout = 1s`, against one `INSERT ... SELECT` of the same
//!    rows into a table like the range's (without a timeout, and with it).
//! 6. `archive` (only with `--archive`): an archiving tenant's backlog purged with and without
//!    archiving, against a COPY of the same runs to a file (see [`crate::history_archive`]).

use std::time::{Duration, Instant};

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use repository::batch::BatchLimits;
use repository::history::ranges;
use retention_controller::rewrites;
use retention_controller::settings::{PartitionsSettings, TaskHistorySettings};
use retention_controller::tasks::partitions::PartitionsTask;
use retention_controller::tasks::task_history::TaskHistoryTask;
use retention_controller::{
    run_once, run_once_with, MaintenanceTask, RunContext, RunOptions, RunOutcome, RunReport,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use repository::replication::{wal_position, wal_since};

use crate::db::{self, mb, step, BenchDb};

/// What to measure, and at what size.
pub struct Args {
    pub sections: Vec<String>,
    pub tenants: usize,
    pub days: i64,
    pub rows: i64,
    pub due: i64,
    pub samples: usize,
    pub day_rows: i64,
    pub kept: i64,
    pub backlog_tasks: i64,
    pub backlog_tenants: usize,
    pub backlog_days: i64,
    pub merge_rows: i64,
    pub merge_timeout: Duration,
    pub archive_tasks: i64,
    pub archive_days: i64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let bench = db::open().await?;
    // The archive section runs only when asked for (`--archive`).
    let all = args.sections.is_empty();
    if all || args.sections.iter().any(|s| s == "steady") {
        steady_under(&bench, &args, Windows::Whole).await?;
    }
    if all || args.sections.iter().any(|s| s == "compaction") {
        compaction(&bench, &args).await?;
    }
    if all || args.sections.iter().any(|s| s == "backlog") {
        backlog(&bench, &args).await?;
    }
    if all || args.sections.iter().any(|s| s == "status") {
        steady_under(&bench, &args, Windows::ByStatus).await?;
    }
    if all || args.sections.iter().any(|s| s == "merge") {
        merge(&bench, &args).await?;
    }
    if args.sections.iter().any(|s| s == "archive") {
        crate::history_archive::run(&bench, args.archive_tasks, args.archive_days).await?;
    }
    Ok(())
}

// ----- seeding ---------------------------------------------------------------------------------

pub(crate) async fn tenants(
    pool: &PgPool,
    prefix: &str,
    periods: &[Option<&str>],
    n: usize,
) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO tenants (slug, name, data_retention_period) VALUES ($1, $1, $2::interval) RETURNING id",
        )
        .bind(format!("{prefix}-{i}"))
        .bind(periods[i % periods.len()])
        .fetch_one(pool)
        .await?;
        ids.push(id);
    }
    Ok(ids)
}

/// Makes day ranges from `first` up to today (moving the managed area's start back), and the
/// week ahead.
pub(crate) async fn make_days(pool: &PgPool, first: NaiveDate) -> anyhow::Result<()> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let mut tx = pool.begin().await?;
    ranges::take_layout_lock(&mut tx, true).await?;
    ranges::extend_back(&mut tx, first, Duration::from_secs(60)).await?;
    ranges::carve_days(
        &mut tx,
        today(now) + chrono::Duration::days(6),
        Duration::from_secs(60),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Rebuilds the facts of the loaded ranges (what the first run after loading does).
pub(crate) async fn settle(pool: &PgPool) -> anyhow::Result<()> {
    let started = Instant::now();
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let rule = repository::rule::Rule::new(now, Duration::from_secs(86_400));
    let limits = BatchLimits::new(Duration::from_secs(600), Duration::from_secs(5));
    let ranges = repository::history::facts::to_settle(pool, now).await?;
    for range in &ranges {
        if range.log_mode == repository::history::LogMode::Live {
            repository::history::facts::switch_to_all(pool, range, limits, Duration::from_secs(5))
                .await?;
        }
        let mut tx = repository::batch::begin(pool, limits).await?;
        let block = repository::history::facts::rebuild_take(&mut tx, range.tasks_relid)
            .await?
            .unwrap_or(0);
        let mut block = block;
        loop {
            let pages = repository::history::facts::rebuild_chunk(
                &mut tx,
                range.tasks_relid,
                block,
                u32::MAX / 2,
            )
            .await?;
            if pages == 0 {
                break;
            }
            block += i64::from(pages);
        }
        repository::history::facts::rebuild_finish(&mut tx, range.tasks_relid, &rule).await?;
        tx.commit().await?;
    }
    eprintln!(
        "  facts of {} ranges rebuilt in {:.1}s",
        ranges.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Fills one day's range with `rows` finished tasks spread over the day, of the tenants
/// `tenants` (round robin), each with `events` events: loads the day's tables detached and
/// without indexes, then attaches them again (which builds the indexes), far faster than
/// inserting through them. The loads are not logged (the engine's own write); the range's facts
/// are rebuilt by the next run's settle.
pub(crate) async fn load_day(
    pool: &PgPool,
    day: NaiveDate,
    rows: i64,
    tenants: &[Uuid],
    status: &str,
    events: i64,
) -> anyhow::Result<()> {
    let (lower, upper) = (
        ranges::day_start(day),
        ranges::day_start(day + chrono::Duration::days(1)),
    );
    let (tasks, events_table): (String, String) = sqlx::query_as(
        "SELECT tasks_relid::regclass::text, events_relid::regclass::text FROM history_ranges WHERE lower = $1 AND upper = $2",
    )
    .bind(lower)
    .bind(upper)
    .fetch_one(pool)
    .await?;
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT set_config('engine.retention_write', 'on', false), set_config('maintenance_work_mem', '512MB', false)")
        .execute(&mut *conn)
        .await?;
    let bounds = format!(
        "FOR VALUES FROM ('{}') TO ('{}')",
        lower.to_rfc3339(),
        upper.to_rfc3339()
    );
    for (parent, table) in [("tasks", &tasks), ("task_events", &events_table)] {
        sqlx::query(&format!("ALTER TABLE {parent} DETACH PARTITION {table}"))
            .execute(&mut *conn)
            .await?;
        drop_indexes(&mut conn, table).await?;
    }
    sqlx::query(&format!(
        "INSERT INTO {tasks} (id, tenant_id, status, inserted_at, finished_at)
         SELECT gen_random_uuid(), ($3::uuid[])[1 + g % array_length($3::uuid[], 1)], $4, t, t + interval '1 minute'
         FROM (SELECT g, $1::timestamptz + (g * 86400.0 / $2) * interval '1 second' AS t FROM generate_series(0, $2 - 1) g) s"
    ))
    .bind(lower)
    .bind(rows)
    .bind(tenants)
    .bind(status)
    .execute(&mut *conn)
    .await?;
    if events > 0 {
        sqlx::query(&format!(
            "INSERT INTO {events_table} (id, tenant_id, task_id, task_inserted_at, event_type, created_at)
             SELECT nextval('task_events_id_seq'), t.tenant_id, t.id, t.inserted_at, 'progress', t.inserted_at
             FROM {tasks} t, generate_series(1, $1) n"
        ))
        .bind(events)
        .execute(&mut *conn)
        .await?;
    }
    for (parent, table) in [("tasks", &tasks), ("task_events", &events_table)] {
        sqlx::query(&format!(
            "ALTER TABLE {parent} ATTACH PARTITION {table} {bounds}"
        ))
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query("UPDATE history_ranges SET settled_at = NULL WHERE lower = $1")
        .bind(lower)
        .execute(&mut *conn)
        .await?;
    // The connection goes back to the pool: later writes through it are ordinary ones.
    sqlx::query("SELECT set_config('engine.retention_write', '', false)")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn drop_indexes(conn: &mut sqlx::PgConnection, table: &str) -> anyhow::Result<()> {
    let indexes: Vec<(String, bool)> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
         FROM pg_index i WHERE i.indrelid = $1::regclass",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    for (index, constraint) in indexes {
        let sql = if constraint {
            let name: String = sqlx::query_scalar(
                "SELECT conname::text FROM pg_constraint WHERE conindid = $1::regclass",
            )
            .bind(&index)
            .fetch_one(&mut *conn)
            .await?;
            format!("ALTER TABLE {table} DROP CONSTRAINT {name}")
        } else {
            format!("DROP INDEX {index}")
        };
        sqlx::query(&sql).execute(&mut *conn).await?;
    }
    Ok(())
}

async fn run_task(task: &dyn MaintenanceTask, pool: &PgPool) -> anyhow::Result<RunReport> {
    match run_once(task, pool, &CancellationToken::new()).await? {
        RunOutcome::Ran(summary) => Ok(summary.report),
        other => anyhow::bail!("{} did not run: {other:?}", task.name()),
    }
}

pub(crate) fn today(now: DateTime<Utc>) -> NaiveDate {
    now.date_naive()
}

// ----- 1. steady state --------------------------------------------------------------------------

/// The tenants' windows in a steady state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Windows {
    /// One window per tenant (90 days, 180 days, a year, forever); the due rows are a one-day
    /// tenant's.
    Whole,
    /// Succeeded tasks 7 days, failed ones 90; the due rows are one of the tenants' succeeded
    /// tasks past their 7 days, among every tenant's kept failed tasks of all the days.
    ByStatus,
}

async fn steady_under(bench: &BenchDb, args: &Args, windows: Windows) -> anyhow::Result<()> {
    let (title, name) = match windows {
        Windows::Whole => ("steady state", "history_steady"),
        Windows::ByStatus => (
            "steady state under status windows (succeeded 7 days, failed 90)",
            "history_status",
        ),
    };
    println!(
        "\n== {title}: {} tenants, {} days, {} tasks kept, {} due between runs",
        args.tenants, args.days, args.rows, args.due
    );
    let pool = db::fresh_database(bench, name).await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&pool).await?;
    let (keepers, due) = match windows {
        Windows::Whole => {
            let keepers = tenants(
                &pool,
                "keep",
                &[Some("90 days"), Some("180 days"), Some("365 days"), None],
                args.tenants,
            )
            .await?;
            let short = tenants(&pool, "short", &[Some("1 day")], 1).await?[0];
            // The bare DELETE takes the one-day rule whole: every final status.
            let due = Due::new(
                short,
                "failed",
                &["succeeded", "failed", "cancelled"],
                1,
                now,
                args.due,
            );
            (keepers, due)
        }
        Windows::ByStatus => {
            let keepers = tenants(&pool, "keep", &[Some("90 days")], args.tenants).await?;
            sqlx::query(
                "UPDATE tenants SET succeeded_retention_period = '7 days', failed_retention_period = '90 days'",
            )
            .execute(&pool)
            .await?;
            let due = Due::new(keepers[0], "succeeded", &["succeeded"], 7, now, args.due);
            (keepers, due)
        }
    };
    let first = today(now) - chrono::Duration::days(args.days);
    make_days(&pool, first).await?;
    let started = Instant::now();
    for n in 0..args.days {
        let day = first + chrono::Duration::days(n);
        let rows = args.rows / args.days;
        match windows {
            Windows::Whole => load_day(&pool, day, rows, &keepers, "succeeded", 0).await?,
            // What a steady state keeps: the failed tasks of every day, and the succeeded ones
            // of the last 7 days only.
            Windows::ByStatus if day >= today(now) - chrono::Duration::days(6) => {
                load_day(&pool, day, rows / 2, &keepers, "failed", 0).await?;
                add_finished(&pool, day, rows - rows / 2, &keepers, "succeeded").await?;
            }
            Windows::ByStatus => load_day(&pool, day, rows, &keepers, "failed", 0).await?,
        }
    }
    eprintln!(
        "  seeded {} tasks in {:.0}s",
        args.rows,
        started.elapsed().as_secs_f64()
    );
    step(&pool, "VACUUM ANALYZE", "VACUUM ANALYZE tasks").await?;
    let history = TaskHistoryTask::new(TaskHistorySettings::default());
    let partitions =
        PartitionsTask::new(PartitionsSettings::default(), Duration::from_secs(86_400));
    // The first run rebuilds the facts of every range from its rows (once in a range's life).
    settle(&pool).await?;
    // The engine's pool keeps its prepared plans between runs: warm it the same way.
    for _ in 0..5 {
        run_task(&partitions, &pool).await?;
        run_task(&history, &pool).await?;
    }
    // What autovacuum does within a minute: the change log's entries of the loads (under status
    // windows, the succeeded tasks inserted through the parent), consumed by the warm-up runs,
    // leave dead rows every check of the log reads through until then.
    step(&pool, "VACUUM", "VACUUM history_changes").await?;
    let statements = Statements::start(&pool).await;
    let (mut engine, mut bare) = (Vec::new(), Vec::new());
    for sample in 0..args.samples {
        due.seed(&pool, sample as i64).await?;
        let started = Instant::now();
        let a = run_task(&partitions, &pool).await?;
        let b = run_task(&history, &pool).await?;
        engine.push(started.elapsed());
        let deleted = b
            .by_rule
            .iter()
            .filter(|(r, _)| r.starts_with("retention"))
            .map(|(_, n)| *n)
            .sum::<u64>();
        anyhow::ensure!(
            deleted == args.due as u64,
            "task-history deleted {deleted} tasks, expected {}: {a:?} {b:?}",
            args.due
        );

        due.seed(&pool, sample as i64).await?;
        let started = Instant::now();
        let gone = due.bare_delete(&pool).await?;
        bare.push(started.elapsed());
        anyhow::ensure!(gone == args.due as u64, "the bare DELETE removed {gone}");
    }
    statements.print(&pool).await?;
    let partitions_count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_inherits WHERE inhparent = 'tasks'::regclass")
            .fetch_one(&pool)
            .await?;
    let (engine_median, bare_median) = (median(&mut engine), median(&mut bare));
    println!(
        "  {} samples; {partitions_count} partitions of tasks",
        args.samples
    );
    println!(
        "  partitions run + task-history run   median {:>7.1} ms   max {:>7.1} ms",
        ms(engine_median),
        ms(*engine.last().unwrap())
    );
    println!(
        "  bare DELETE of the same rows         median {:>7.1} ms   max {:>7.1} ms",
        ms(bare_median),
        ms(*bare.last().unwrap())
    );
    println!(
        "  ratio runs / bare DELETE: {:.2}x   (goal: at most 3x)",
        ms(engine_median) / ms(bare_median).max(0.001)
    );
    pool.close().await;
    db::drop_database(bench, name).await
}

/// With `BENCH_STATEMENTS` set (and `pg_stat_statements` loaded, as on the bench's own server):
/// the statements that took the most time between [`Statements::start`] and
/// [`Statements::print`], to stderr.
struct Statements(bool);

impl Statements {
    async fn start(pool: &PgPool) -> Statements {
        if std::env::var_os("BENCH_STATEMENTS").is_none() {
            return Statements(false);
        }
        let ready = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(pool)
            .await
            .is_ok()
            && sqlx::query("SELECT pg_stat_statements_reset()")
                .execute(pool)
                .await
                .is_ok();
        Statements(ready)
    }

    async fn print(&self, pool: &PgPool) -> anyhow::Result<()> {
        if !self.0 {
            return Ok(());
        }
        let top: Vec<(f64, f64, i64, String)> = sqlx::query_as(
            "SELECT total_exec_time, total_plan_time, calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 300)
             FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
             ORDER BY total_exec_time + total_plan_time DESC LIMIT 25",
        )
        .fetch_all(pool)
        .await?;
        eprintln!("  {:>9} {:>9} {:>6}", "exec", "plan", "calls");
        for (exec, plan, calls, query) in top {
            eprintln!("  {exec:>9.1} {plan:>9.1} {calls:>6}  {query}");
        }
        let (exec, plan, calls): (f64, f64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(total_exec_time), 0)::float8, coalesce(sum(total_plan_time), 0)::float8, coalesce(sum(calls), 0)::int8
             FROM pg_stat_statements WHERE toplevel AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(pool)
        .await?;
        eprintln!(
            "  top-level statements: {exec:.1} ms executing, {plan:.1} ms planning, {calls} calls"
        );
        Ok(())
    }
}

/// `rows` finished tasks of `status` spread over `day`, of `tenants` (round robin), inserted
/// through the parent (into a range [`load_day`] already filled, after it).
async fn add_finished(
    pool: &PgPool,
    day: NaiveDate,
    rows: i64,
    tenants: &[Uuid],
    status: &str,
) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO tasks (id, tenant_id, status, inserted_at, finished_at)
         SELECT gen_random_uuid(), ($3::uuid[])[1 + g % array_length($3::uuid[], 1)], $4, t, t + interval '1 minute'
         FROM (SELECT g, $1::timestamptz + (g * 86400.0 / $2) * interval '1 second' AS t FROM generate_series(0, $2 - 1) g) s",
    )
    .bind(ranges::day_start(day))
    .bind(rows)
    .bind(tenants)
    .bind(status)
    .execute(pool)
    .await?;
    Ok(())
}

/// The due rows arriving between the steady state's runs: `rows` finished tasks of `tenant`
/// and `status`, in the two days that just passed its window of `days` (the days before that a
/// steady state has already emptied), spread over those days. The bare DELETE takes them by
/// their tenant's rule for `statuses`.
struct Due {
    tenant: Uuid,
    status: &'static str,
    statuses: &'static [&'static str],
    days: i64,
    today: NaiveDate,
    rows: i64,
}

impl Due {
    fn new(
        tenant: Uuid,
        status: &'static str,
        statuses: &'static [&'static str],
        days: i64,
        now: DateTime<Utc>,
        rows: i64,
    ) -> Due {
        Due {
            tenant,
            status,
            statuses,
            days,
            today: today(now),
            rows,
        }
    }

    async fn seed(&self, pool: &PgPool, sample: i64) -> anyhow::Result<()> {
        let start = ranges::day_start(self.today - chrono::Duration::days(self.days + 2));
        // Inserted over the two days from `start` and finished 5 minutes later, all before the
        // day their window ends on begins: due at any time of that day. (Over the whole two days,
        // the last ones finished up to 4 minutes into it, and a section started just after
        // midnight found them not yet due: "deleted 99 tasks, expected 100".)
        sqlx::query(
            "INSERT INTO tasks (id, tenant_id, status, inserted_at, finished_at)
             SELECT gen_random_uuid(), $1, $5, t, t + interval '5 minutes'
             FROM (SELECT $2::timestamptz + ((g * 7919 + $3) % (2 * 24 * 60 - 10)) * interval '1 minute' AS t
                   FROM generate_series(1, $4) g) s",
        )
        .bind(self.tenant)
        .bind(start)
        .bind(sample)
        .bind(self.rows)
        .bind(self.status)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// One plain DELETE of the due rows by their tenant's rule for their status, without the
    /// engine's own triggers (as the engine's batches are); returns the rows deleted.
    async fn bare_delete(&self, pool: &PgPool) -> anyhow::Result<u64> {
        let mut tx = pool.begin().await?;
        sqlx::query("SET LOCAL engine.retention_write = 'on'")
            .execute(&mut *tx)
            .await?;
        let gone = sqlx::query(
            "DELETE FROM tasks WHERE tenant_id = $1 AND status = ANY($2)
               AND coalesce(finished_at, inserted_at) < now() - $3 * interval '1 day'",
        )
        .bind(self.tenant)
        .bind(self.statuses)
        .bind(self.days as i32)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(gone)
    }
}

// ----- 2. compaction ----------------------------------------------------------------------------

/// Rewrites `range` alone (as `task-history` compacts it), at full speed, to the end.
async fn rewrite_once(
    pool: &PgPool,
    range: &repository::history::Range,
    limits: BatchLimits,
    grace: Duration,
) -> anyhow::Result<(rewrites::Done, RunReport)> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
    let ctx = RunContext::new(
        pool.clone(),
        Uuid::now_v7(),
        CancellationToken::new(),
        Duration::from_secs(24 * 3600),
        RunOptions::default(),
    )
    .with_clock(now, tokio::time::Instant::now());
    let steps = rewrites::Steps {
        limits,
        lock_timeout: Duration::from_secs(5),
        grace,
    };
    let mut report = RunReport::default();
    match rewrites::start(
        &ctx,
        std::slice::from_ref(range),
        "task-history",
        steps,
        true,
        rewrites::Naming::Rules,
        &mut report,
    )
    .await?
    {
        rewrites::Outcome::Done(done) => Ok((done, report)),
        other => anyhow::bail!("not rewritten: {other:?}"),
    }
}

async fn compaction(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    println!(
        "\n== one past day of {} due tasks (one event each), rewritten or deleted row by row",
        args.day_rows
    );
    let pool = db::fresh_database(bench, "history_compaction").await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&pool).await?;
    let weekly = tenants(&pool, "weekly", &[Some("7 days")], 1).await?;
    let forever = tenants(&pool, "forever", &[None], 1).await?;
    let days: Vec<NaiveDate> = (20..23)
        .map(|n| today(now) - chrono::Duration::days(n))
        .collect();
    make_days(&pool, days[2]).await?;
    // Day 0 keeps `kept`, day 1 keeps nothing: both rewritten. Day 2, like day 0, by row deletes.
    for (day, kept) in [(days[0], args.kept), (days[1], 0), (days[2], args.kept)] {
        load_day(&pool, day, args.day_rows, &weekly, "succeeded", 1).await?;
        if kept > 0 {
            add_kept(&pool, day, kept, forever[0]).await?;
        }
    }
    step(&pool, "VACUUM ANALYZE", "VACUUM ANALYZE tasks, task_events").await?;
    settle(&pool).await?;
    let grace = Duration::from_secs(86_400);
    let limits =
        BatchLimits::new(Duration::from_secs(600), Duration::from_secs(5)).with_history_write();
    println!(
        "  {:<46} {:>9} {:>10} {:>14} {:>16}",
        "", "wall", "WAL", "lock held", "foreground max"
    );
    for (label, day) in [
        (format!("rewrite, keeping {} tasks", args.kept), days[0]),
        ("rewrite, keeping nothing".to_string(), days[1]),
    ] {
        let range = ranges::all(&pool)
            .await?
            .into_iter()
            .find(|r| r.lower == Some(ranges::day_start(day)))
            .expect("the day's range");
        step(&pool, "CHECKPOINT", "CHECKPOINT").await?;
        let foreground = Foreground::start(&pool, forever[0]).await?;
        let lsn = wal_position(&pool).await?;
        let started = Instant::now();
        let outcome = rewrite_once(&pool, &range, limits, grace).await?;
        let wall = started.elapsed();
        let wal = wal_since(&pool, &lsn).await?;
        let worst = foreground.stop().await?;
        let (done, report) = outcome;
        let dropped = report
            .by_rule
            .iter()
            .find(|(r, _)| *r == "retention")
            .map_or(0, |(_, n)| *n);
        anyhow::ensure!(dropped == args.day_rows as u64, "dropped {dropped} tasks");
        println!(
            "  {label:<46} {:>7.0} ms {:>7.1} MB {:>11.1} ms {:>13.1} ms",
            ms(wall),
            mb(wal),
            ms(done.locked.unwrap_or_default()),
            ms(worst)
        );
    }
    // The baseline: the same due rows, deleted by the task with compaction off.
    step(&pool, "CHECKPOINT", "CHECKPOINT").await?;
    let rows_only = TaskHistoryTask::new(TaskHistorySettings {
        compaction: false,
        ..Default::default()
    });
    let lsn = wal_position(&pool).await?;
    let started = Instant::now();
    let report = run_task(&rows_only, &pool).await?;
    let wall = started.elapsed();
    let wal = wal_since(&pool, &lsn).await?;
    let deleted = report
        .by_rule
        .iter()
        .find(|(r, _)| *r == "retention")
        .map_or(0, |(_, n)| *n);
    anyhow::ensure!(
        deleted == args.day_rows as u64,
        "row deletes removed {deleted} tasks"
    );
    println!(
        "  {:<46} {:>7.0} ms {:>7.1} MB   ({} batches, longest {:.0} ms)",
        format!("row deletes, keeping {} tasks (baseline)", args.kept),
        ms(wall),
        mb(wal),
        report.batches,
        ms(report.longest_batch)
    );
    pool.close().await;
    db::drop_database(bench, "history_compaction").await
}

/// `kept` tasks of the forever tenant in `day`, each with an event, through the parent.
async fn add_kept(pool: &PgPool, day: NaiveDate, kept: i64, tenant: Uuid) -> anyhow::Result<()> {
    sqlx::query(
        "WITH t AS (INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
                    SELECT $1, 'succeeded', $2 + (g * 86400.0 / $3) * interval '1 second', $2 + interval '1 day'
                    FROM generate_series(0, $3 - 1) g RETURNING id, inserted_at)
         INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
         SELECT $1, id, inserted_at, 'done', inserted_at FROM t",
    )
    .bind(tenant)
    .bind(ranges::day_start(day))
    .bind(kept)
    .execute(pool)
    .await?;
    Ok(())
}

/// A foreground writer: inserts a task for today and reads it back, in a loop, and keeps its
/// worst latency.
struct Foreground {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<anyhow::Result<Duration>>,
}

impl Foreground {
    async fn start(pool: &PgPool, tenant: Uuid) -> anyhow::Result<Foreground> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (pool, flag) = (pool.clone(), stop.clone());
        let handle = tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let (id, at): (Uuid, DateTime<Utc>) =
                    sqlx::query_as("INSERT INTO tasks (tenant_id, status) VALUES ($1, 'queued') RETURNING id, inserted_at")
                        .bind(tenant)
                        .fetch_one(&pool)
                        .await?;
                sqlx::query("SELECT 1 FROM tasks WHERE id = $1 AND inserted_at = $2")
                    .bind(id)
                    .bind(at)
                    .execute(&pool)
                    .await?;
                worst = worst.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok(worst)
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Foreground { stop, handle })
    }

    async fn stop(self) -> anyhow::Result<Duration> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.await?
    }
}

// ----- 3. backlog -------------------------------------------------------------------------------

async fn backlog(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let per_day = args.backlog_tasks / args.backlog_days;
    println!(
        "\n== a backlog of {} due tasks with {} events: {} tenants, {} days",
        per_day * args.backlog_days,
        2 * per_day * args.backlog_days,
        args.backlog_tenants,
        args.backlog_days
    );
    const SEED: &str = "history_backlog_seed";
    let pool = db::fresh_database(bench, SEED).await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&pool).await?;
    let daily = tenants(&pool, "daily", &[Some("1 day")], args.backlog_tenants).await?;
    let first = today(now) - chrono::Duration::days(args.backlog_days + 1);
    make_days(&pool, first).await?;
    let started = Instant::now();
    for n in 0..args.backlog_days {
        load_day(
            &pool,
            first + chrono::Duration::days(n),
            per_day,
            &daily,
            "succeeded",
            2,
        )
        .await?;
    }
    eprintln!("  seeded in {:.0}s", started.elapsed().as_secs_f64());
    step(&pool, "VACUUM ANALYZE", "VACUUM ANALYZE tasks, task_events").await?;
    // The facts, rebuilt once (as the first run after loading would): not part of the purge.
    settle(&pool).await?;
    pool.close().await;

    println!("  {:<44} {:>9} {:>8} {:>10}", "", "wall", "vs bare", "WAL");
    let mut bare_wall = Duration::ZERO;
    for (label, kind) in [
        ("bare DELETE of the same rows (baseline)", 0),
        ("row deletes (compaction off)", 1),
        ("row deletes, one connection (compaction off)", 3),
        ("the engine as it is (compaction on)", 2),
    ] {
        let copy = format!("history_backlog_{kind}");
        let pool = db::copy_database(bench, SEED, &copy).await?;
        sqlx::query("SELECT count(*) FROM tasks")
            .execute(&pool)
            .await?;
        sqlx::query("SELECT count(*) FROM task_events")
            .execute(&pool)
            .await?;
        step(&pool, "CHECKPOINT", "CHECKPOINT").await?;
        let lsn = wal_position(&pool).await?;
        let started = Instant::now();
        let detail = match kind {
            0 => {
                // Without the engine's own triggers (the change log, queue-item candidates),
                // which skip the engine's batches the same way: one plain DELETE.
                let mut tx = pool.begin().await?;
                sqlx::query("SET LOCAL engine.retention_write = 'on'")
                    .execute(&mut *tx)
                    .await?;
                let gone = sqlx::query(
                    "WITH gone AS (
                         DELETE FROM tasks t USING tenants tn
                         WHERE tn.id = t.tenant_id AND t.status IN ('succeeded', 'failed', 'cancelled')
                           AND coalesce(t.finished_at, t.inserted_at) < now() - tn.data_retention_period
                         RETURNING t.id, t.inserted_at)
                     DELETE FROM task_events e USING gone WHERE e.task_id = gone.id AND e.task_inserted_at = gone.inserted_at",
                )
                .execute(&mut *tx)
                .await?
                .rows_affected();
                tx.commit().await?;
                anyhow::ensure!(
                    gone == 2 * (per_day * args.backlog_days) as u64,
                    "the bare DELETE removed {gone} events"
                );
                String::new()
            }
            _ => {
                let settings = TaskHistorySettings {
                    compaction: kind == 2,
                    ..Default::default()
                };
                let options = RunOptions {
                    parallelism: if kind == 3 {
                        1
                    } else {
                        RunOptions::default().parallelism
                    },
                    ..RunOptions::default()
                };
                let report = match run_once_with(
                    &TaskHistoryTask::new(settings),
                    &pool,
                    &CancellationToken::new(),
                    &options,
                )
                .await?
                {
                    RunOutcome::Ran(summary) => summary.report,
                    other => anyhow::bail!("task-history did not run: {other:?}"),
                };
                let deleted = report
                    .by_rule
                    .iter()
                    .find(|(r, _)| *r == "retention")
                    .map_or(0, |(_, n)| *n);
                anyhow::ensure!(
                    deleted == (per_day * args.backlog_days) as u64,
                    "removed {deleted} tasks: {report:?}"
                );
                let compacted = report
                    .counters
                    .iter()
                    .find(|(c, _)| *c == "ranges compacted")
                    .map_or(0, |(_, n)| *n);
                format!(
                    "   ({} batches, longest {:.0} ms, {compacted} ranges compacted)",
                    report.batches,
                    ms(report.longest_batch)
                )
            }
        };
        let wall = started.elapsed();
        let wal = wal_since(&pool, &lsn).await?;
        if kind == 0 {
            bare_wall = wall;
        }
        println!(
            "  {label:<44} {:>7.2} s {:>7.2}x {:>7.0} MB{detail}",
            wall.as_secs_f64(),
            wall.as_secs_f64() / bare_wall.as_secs_f64().max(1e-9),
            mb(wal)
        );
        pool.close().await;
        db::drop_database(bench, &copy).await?;
    }
    println!("  (goal: row deletes within 1.5x the bare DELETE, batches under 250 ms)");
    db::drop_database(bench, SEED).await
}

// ----- 5. merge ----------------------------------------------------------------------------------

async fn merge(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    println!(
        "\n== a cold month holding {} tasks kept forever, merged under statement_timeout = {} ms",
        args.merge_rows,
        args.merge_timeout.as_millis()
    );
    let pool = db::fresh_database(bench, "history_merge").await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&pool).await?;
    let forever = tenants(&pool, "forever", &[None], 1).await?[0];
    let daily = tenants(&pool, "daily", &[Some("1 day")], 1).await?[0];
    // The month before last: cold whatever today's day of the month.
    let this_month = today(now).with_day(1).expect("the 1st");
    let month = (this_month - chrono::Duration::days(40))
        .with_day(1)
        .expect("the 1st");
    let next_month = (month + chrono::Duration::days(40))
        .with_day(1)
        .expect("the 1st");
    let days = (next_month - month).num_days();
    make_days(&pool, month).await?;
    let started = Instant::now();
    for n in 0..days {
        load_day(
            &pool,
            month + chrono::Duration::days(n),
            args.merge_rows / days,
            &[forever],
            "succeeded",
            0,
        )
        .await?;
    }
    let kept = args.merge_rows / days * days;
    // A due task a day, of the one-day tenant: the merge removes them.
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'succeeded', d + interval '1 hour', d + interval '2 hours'
         FROM generate_series($2::timestamptz, $3::timestamptz - interval '1 day', interval '1 day') d",
    )
    .bind(daily)
    .bind(ranges::day_start(month))
    .bind(ranges::day_start(next_month))
    .execute(&pool)
    .await?;
    eprintln!(
        "  seeded {kept} tasks in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    step(&pool, "VACUUM ANALYZE", "VACUUM ANALYZE tasks").await?;
    settle(&pool).await?;
    let (lower, upper) = (ranges::day_start(month), ranges::day_start(next_month));

    // The baseline: the month's kept rows in one statement, into a table like the range's.
    step(
        &pool,
        "a table like the range's",
        "CREATE TABLE month_copy (LIKE tasks INCLUDING ALL)",
    )
    .await?;
    let copy = "INSERT INTO month_copy SELECT * FROM tasks
                WHERE inserted_at >= $1 AND inserted_at < $2 AND tenant_id = $3";
    let mut tx = pool.begin().await?;
    sqlx::query(&format!(
        "SET LOCAL statement_timeout = '{}ms'",
        args.merge_timeout.as_millis()
    ))
    .execute(&mut *tx)
    .await?;
    let started = Instant::now();
    let timed = sqlx::query(copy)
        .bind(lower)
        .bind(upper)
        .bind(forever)
        .execute(&mut *tx)
        .await;
    let cancelled_after = started.elapsed();
    drop(tx);
    let timed_out = matches!(&timed, Err(e) if repository::batch::is_timeout(e));
    step(&pool, "CHECKPOINT", "CHECKPOINT").await?;
    let lsn = wal_position(&pool).await?;
    let started = Instant::now();
    let copied = sqlx::query(copy)
        .bind(lower)
        .bind(upper)
        .bind(forever)
        .execute(&pool)
        .await?
        .rows_affected();
    let (one_wall, one_wal) = (started.elapsed(), wal_since(&pool, &lsn).await?);
    anyhow::ensure!(copied == kept as u64, "copied {copied}");
    step(&pool, "DROP TABLE", "DROP TABLE month_copy").await?;

    // The engine: a partitions run, its steps sized to stay well within the timeout.
    let partitions = PartitionsTask::new(
        PartitionsSettings {
            statement_timeout: args.merge_timeout,
            ..Default::default()
        },
        Duration::from_secs(86_400),
    );
    step(&pool, "CHECKPOINT", "CHECKPOINT").await?;
    let foreground = Foreground::start(&pool, forever).await?;
    let lsn = wal_position(&pool).await?;
    let started = Instant::now();
    let report = run_task(&partitions, &pool).await;
    let (wall, wal) = (started.elapsed(), wal_since(&pool, &lsn).await?);
    let worst = foreground.stop().await?;
    let report = report?;
    anyhow::ensure!(
        report.completion == retention_controller::Completion::Done,
        "{report:?}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM history_rewrites")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(left == 0, "{left} rewrites left: {report:?}");
    let merged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM history_ranges WHERE lower = $1 AND upper = $2")
            .bind(lower)
            .bind(upper)
            .fetch_one(&pool)
            .await?;
    anyhow::ensure!(merged == 1, "the month is not one range: {report:?}");
    let (kept_after, due_after): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE tenant_id = $1), count(*) FILTER (WHERE tenant_id = $2) FROM tasks
         WHERE inserted_at >= $3 AND inserted_at < $4",
    )
    .bind(forever)
    .bind(daily)
    .bind(lower)
    .bind(upper)
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(
        kept_after == kept && due_after == 0,
        "kept {kept_after} of {kept}, {due_after} due left"
    );
    println!(
        "  {:<52} {:>9} {:>10} {:>16} {:>14} {:>16}",
        "", "wall", "WAL", "longest stmt", "lock held", "foreground max"
    );
    println!(
        "  {:<52} {:>7.0} ms {:>7.1} MB {:>13.0} ms {:>14} {:>16}",
        format!("one INSERT ... SELECT of the {kept} (baseline)"),
        ms(one_wall),
        mb(one_wal),
        ms(one_wall),
        "",
        ""
    );
    println!(
        "  {:<52} {:>7.0} ms   ({})",
        "... the same under the statement timeout",
        ms(cancelled_after),
        if timed_out {
            "cancelled by the timeout".to_string()
        } else {
            format!("not cancelled: {timed:?}")
        }
    );
    println!(
        "  {:<52} {:>7.0} ms {:>7.1} MB {:>13.0} ms {:>11.1} ms {:>13.1} ms",
        format!("partitions run: {} merges", count(&report, "ranges merged")),
        ms(wall),
        mb(wal),
        ms(report.longest_batch),
        ms(report.longest_lock),
        ms(worst)
    );
    println!(
        "  ratio run / one INSERT ... SELECT: {:.2}x wall, {:.2}x WAL; {} steps, {} rewrite pages copied",
        ms(wall) / ms(one_wall).max(0.001),
        mb(wal) / mb(one_wal).max(0.001),
        report.batches,
        count(&report, "rewrite pages copied")
    );
    pool.close().await;
    db::drop_database(bench, "history_merge").await
}

fn count(report: &RunReport, what: &str) -> u64 {
    report
        .counters
        .iter()
        .find(|(name, _)| *name == what)
        .map_or(0, |(_, n)| *n)
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
