//! Thirty-two days of a multi-tenant engine, one `engine retention run` a day: PostgreSQL and the
//! engine run under libfaketime (Debian package `faketime`), whose clock the test moves a day at
//! a time, and every run is checked against a ledger the engine never touches.
//!
//! 100 tenants with windows of 1, 3, 7 and 14 days; two keeping forever, active only some days;
//! one task in 40 running for 10 days before it finishes; queued work that never finishes; a
//! tenant keeping succeeded tasks 1 day and cancelled ones 3 of its 14 from day 0; a tenant
//! deleted on day 8; a failed-task window of its own on day 10; a window shortened on day 12; a
//! tenant held from day 14 to 20; a tenant switched to forever on day 16; a tenant archiving its
//! failed tasks from day 0, another everything from day 10 (at the end, DuckDB reads exactly
//! the runs they had deleted from the archive files, each once).
//! After every run: nothing that must be kept is gone (tasks, their events, their queue items),
//! nothing that was due is left, no event outlives its task, and the attached partitions stay
//! within the longest finite window, the days made ahead, and a small constant.
//!
//! The same days run a second time with run history's statements under a short
//! `statement_timeout` and one more tenant keeping forever 20,000 tasks a day (with an event
//! each), counted day by day rather than tracked one by one: its rows fill the ranges the
//! engine compacts and merges, whose copies must then go in steps within the timeout.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration as Span, NaiveDate, TimeZone, Utc};
use common::*;
use sqlx::PgPool;
use uuid::Uuid;

/// A task's key: `(id, inserted_at)`.
type TaskKey = (Uuid, DateTime<Utc>);

const DAYS: i64 = 32;
const TENANTS: usize = 100;
const TASKS_PER_TENANT_A_DAY: usize = 40;
const GRACE: Span = Span::hours(24);
const PREMAKE_DAYS: i64 = 7;

use testkit::libfaketime;

/// The simulated clock: an offset from the real one, in a file libfaketime reads at every call.
struct Clock {
    file: PathBuf,
}

impl Clock {
    fn new(dir: &Path) -> Clock {
        let file = dir.join("offset");
        std::fs::write(&file, "+0\n").unwrap();
        Clock { file }
    }

    /// From now on the clock reads `at` or up to a second later, never earlier: the offset is
    /// whole seconds, rounded up (rounded toward zero, the clock could read a moment before a
    /// hold's end set at `at`, and a run at `at` keep what the ledger says is due).
    fn set(&self, at: DateTime<Utc>) {
        let offset = ((at - Utc::now()).num_milliseconds() + 999).div_euclid(1000);
        std::fs::write(&self.file, format!("{offset:+}\n")).unwrap();
    }

    /// The environment that puts a program under this clock.
    fn env(&self, threaded: bool) -> Vec<(String, String)> {
        vec![
            (
                "LD_PRELOAD".into(),
                libfaketime(threaded).display().to_string(),
            ),
            (
                "FAKETIME_TIMESTAMP_FILE".into(),
                self.file.display().to_string(),
            ),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }
}

#[derive(Clone, Copy)]
struct Tenant {
    window: Option<Span>,
    /// Windows of their own for succeeded, failed and cancelled tasks (`None`: as `window`;
    /// `Some(None)`: forever).
    own_windows: [Option<Option<Span>>; 3],
    /// A hold on the whole tenant, until then.
    held_until: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
    /// The final statuses it archives (`engine tenant archive set`).
    archives: &'static [&'static str],
}

#[derive(Clone)]
struct Task {
    tenant: Uuid,
    status: &'static str,
    finished_at: Option<DateTime<Utc>>,
    /// When a long-running task finishes.
    finishes: Option<DateTime<Utc>>,
}

impl Task {
    fn key_instant(&self, inserted_at: DateTime<Utc>) -> DateTime<Utc> {
        self.finished_at.unwrap_or(inserted_at)
    }
}

/// The contract: nothing is due while a hold covers its tenant; else a task is due when its tenant
/// was deleted longer ago than the grace, or it is final and finished (else inserted) before its
/// live tenant's window for its status.
fn due(task: &Task, inserted_at: DateTime<Utc>, tenant: &Tenant, at: DateTime<Utc>) -> bool {
    if tenant.held_until.is_some_and(|until| until > at) {
        return false;
    }
    if let Some(deleted) = tenant.deleted_at {
        return deleted < at - GRACE;
    }
    let finished = matches!(task.status, "succeeded" | "failed" | "cancelled");
    let own = FINAL
        .iter()
        .position(|s| *s == task.status)
        .and_then(|i| tenant.own_windows[i]);
    let window = own.unwrap_or(tenant.window);
    match window {
        Some(window) => finished && task.key_instant(inserted_at) < at - window,
        None => false,
    }
}

/// The final statuses, in the order of [`Tenant::own_windows`].
const FINAL: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// Everything the test wrote, and what became of it.
#[derive(Default)]
struct Ledger {
    tenants: HashMap<Uuid, Tenant>,
    /// Tasks not yet deleted, by key.
    tasks: HashMap<TaskKey, Task>,
    /// Events of tasks not yet deleted.
    events: HashMap<i64, TaskKey>,
    /// Queue items of tasks not yet deleted.
    items: HashMap<i64, TaskKey>,
    /// The large tenant keeping forever: its tasks (each with one event) by day inserted.
    large: Option<(Uuid, BTreeMap<NaiveDate, i64>)>,
    /// Tasks deleted while their tenant archived their status: what the archives must hold.
    archived: Vec<Uuid>,
}

/// How a simulation differs from the first.
struct Variant {
    /// `statement_timeout` of the run-history tasks (task-history, partitions).
    statement_timeout: Option<&'static str>,
    /// Tasks a day, with an event each, of one more tenant keeping forever (0: no such tenant).
    large_forever_a_day: i64,
}

/// The simulations run one after the other: each has the machine's two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn thirty_two_days_under_a_moving_clock() {
    simulate(Variant {
        statement_timeout: None,
        large_forever_a_day: 0,
    })
    .await;
}

#[tokio::test]
async fn thirty_two_days_with_short_statements_and_a_large_forever_tenant() {
    simulate(Variant {
        statement_timeout: Some("1s"),
        large_forever_a_day: 20_000,
    })
    .await;
}

async fn simulate(variant: Variant) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let tempdir = tempfile::Builder::new()
        .prefix("engine-sim-")
        .tempdir()
        .unwrap();
    let dir = tempdir.path();
    // The server runs as another user when the test runs as root: it must read the clock file.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let clock = Clock::new(dir);
    std::fs::set_permissions(
        &clock.file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    // Day 0 at noon; 32 days from March 10 cross a month.
    let day0 = NaiveDate::from_ymd_opt(2027, 3, 10).unwrap();
    let noon =
        |day: i64| Utc.from_utc_datetime(&(day0 + Span::days(day)).and_hms_opt(12, 0, 0).unwrap());
    clock.set(noon(0));
    let mut options = testkit::local_postgres::Options::throwaway(dir.join("pg"));
    options.env = clock.env(false);
    let server =
        tokio::task::spawn_blocking(move || testkit::local_postgres::LocalPostgres::start(options))
            .await
            .unwrap()
            .unwrap();
    let url = server.url();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let db_now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        (db_now - noon(0)).num_seconds().abs() < 60,
        "the server is under the simulated clock: {db_now}"
    );
    let timeouts: Vec<(&str, &str)> = variant
        .statement_timeout
        .map(|t| {
            vec![
                ("ENGINE__RETENTION__TASK_HISTORY__STATEMENT_TIMEOUT", t),
                ("ENGINE__RETENTION__PARTITIONS__STATEMENT_TIMEOUT", t),
            ]
        })
        .unwrap_or_default();
    // Archives go to a directory of the test's.
    let objects = dir.join("objects");
    let storage_url = format!("file://{}", objects.display());
    let engine_run = |args: &[&str]| {
        let output = engine()
            .env("DATABASE_URL", &url)
            .env("ENGINE__STORAGE__URL", &storage_url)
            .envs(clock.env(true))
            .envs(timeouts.iter().copied())
            .args(args)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        assert!(
            output.status.success(),
            "engine {args:?} failed:\n{stdout}\n{stderr}"
        );
        stdout
    };
    engine_run(&["migrate"]);
    // As if the engine had measured slow row deletes: compaction pays for days with a few
    // thousand due rows, so both ways of removing rows take part (the engine goes on measuring).
    sqlx::query("INSERT INTO retention_costs (operation, seconds_per_row, samples) VALUES ('row-delete', 0.0001, 1)")
        .execute(&pool)
        .await
        .unwrap();

    let mut ledger = Ledger::default();
    let windows = [1, 3, 7, 14].map(Span::days);
    let mut ids = Vec::new();
    for n in 0..TENANTS {
        let window = match n {
            96 | 97 => None,
            99 => Some(Span::days(14)),
            _ => Some(windows[n % 4]),
        };
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO tenants (id, slug, name, data_retention_period) VALUES ($1, $2, $2, $3)",
        )
        .bind(id)
        .bind(format!("tenant-{n}"))
        .bind(window.map(|w| sqlx::postgres::types::PgInterval {
            months: 0,
            days: w.num_days() as i32,
            microseconds: 0,
        }))
        .execute(&pool)
        .await
        .unwrap();
        ledger.tenants.insert(
            id,
            Tenant {
                window,
                own_windows: [None; 3],
                held_until: None,
                deleted_at: None,
                archives: &[],
            },
        );
        ids.push(id);
    }
    let (deleted, shortened, held) = (ids[98], ids[99], ids[5]);
    // A 14-day tenant keeping succeeded tasks a day and cancelled ones three.
    for (status, window, days) in [("succeeded", "1day", 1), ("cancelled", "3days", 3)] {
        engine_run(&[
            "tenant",
            "retention",
            "set",
            "tenant-11",
            window,
            "--status",
            status,
        ]);
        let i = FINAL.iter().position(|s| *s == status).unwrap();
        ledger.tenants.get_mut(&ids[11]).unwrap().own_windows[i] = Some(Some(Span::days(days)));
    }
    // A 7-day tenant archiving its failed tasks from day 0 (another, everything from day 10).
    engine_run(&["tenant", "archive", "set", "tenant-2", "failed"]);
    ledger.tenants.get_mut(&ids[2]).unwrap().archives = &["failed"];
    if variant.large_forever_a_day > 0 {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO tenants (slug, name, data_retention_period) VALUES ('large', 'large', NULL) RETURNING id",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        ledger.large = Some((id, BTreeMap::new()));
    }

    let mut mechanisms: HashMap<&'static str, u64> = HashMap::new();
    let mut most_partitions = 0;
    for day in 0..DAYS {
        let now = noon(day);
        clock.set(now);
        let start = now - Span::hours(12);
        // The day's changes of tenants' rules, at 06:00 or 11:30.
        if day == 8 {
            let at = start + Span::hours(6);
            sqlx::query("UPDATE tenants SET deleted_at = $2 WHERE id = $1")
                .bind(deleted)
                .bind(at)
                .execute(&pool)
                .await
                .unwrap();
            ledger.tenants.get_mut(&deleted).unwrap().deleted_at = Some(at);
        }
        if day == 12 {
            sqlx::query("UPDATE tenants SET data_retention_period = '3 days' WHERE id = $1")
                .bind(shortened)
                .execute(&pool)
                .await
                .unwrap();
            ledger.tenants.get_mut(&shortened).unwrap().window = Some(Span::days(3));
        }
        if day == 16 {
            sqlx::query("UPDATE tenants SET data_retention_period = NULL WHERE id = $1")
                .bind(held)
                .execute(&pool)
                .await
                .unwrap();
            ledger.tenants.get_mut(&held).unwrap().window = None;
        }
        if day == 10 {
            engine_run(&["tenant", "archive", "set", "tenant-6", "on"]);
            ledger.tenants.get_mut(&ids[6]).unwrap().archives = &FINAL;
            // Failed tasks of a 14-day tenant kept a day.
            engine_run(&[
                "tenant",
                "retention",
                "set",
                "tenant-7",
                "1day",
                "--status",
                "failed",
            ]);
            ledger.tenants.get_mut(&ids[7]).unwrap().own_windows[1] = Some(Some(Span::days(1)));
        }
        if day == 14 {
            // A 3-day tenant held for six days: nothing of it goes until then, everything due after.
            let until = noon(20);
            engine_run(&[
                "hold",
                "add",
                "--tenant",
                "tenant-9",
                "--reason",
                "simulation",
                "--until",
                &until.to_rfc3339(),
            ]);
            ledger.tenants.get_mut(&ids[9]).unwrap().held_until = Some(until);
        }
        finish_long_runners(&pool, &mut ledger, start, now).await;
        insert_day(&pool, &mut ledger, &ids, day, start).await;
        insert_large(&pool, &mut ledger, variant.large_forever_a_day, start).await;

        let stdout = engine_run(&["retention", "run", "--json"]);
        for counter in ["ranges compacted", "ranges merged", "days created"] {
            if let Some(n) = counter_in(&stdout, counter) {
                *mechanisms.entry(counter).or_default() += n;
            }
        }
        check(&pool, &mut ledger, now, day).await;
        let partitions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'tasks'::regclass",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let longest = ledger
            .tenants
            .values()
            .filter(|t| t.deleted_at.is_none())
            .filter_map(|t| t.window)
            .max()
            .map_or(0, |w| w.num_days());
        // Days within the longest window and today, the days made ahead, the cold ranges of at
        // most a partial quarter and three quarters (a month merges once it is complete), the
        // default and the future partitions.
        let bound = longest + 1 + PREMAKE_DAYS + 4 + 2;
        if partitions > bound {
            let ranges: Vec<(String, String)> = sqlx::query_as(
                "SELECT tasks_relid::regclass::text, coalesce(rewrite_id::text, '') FROM history_ranges ORDER BY lower",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            let rewrites: Vec<(String, String, i32, Option<String>)> =
                sqlx::query_as("SELECT task, phase, failures, last_error FROM history_rewrites")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            let again = engine()
                .env("DATABASE_URL", &url)
                .env("RUST_LOG", "retention_controller=debug")
                .envs(clock.env(true))
                .envs(timeouts.iter().copied())
                .args(["retention", "run", "--task", "partitions"])
                .output()
                .unwrap();
            let (out, err) = text(&again);
            panic!("day {day}: {partitions} partitions attached, more than {bound}: {ranges:?}\nrewrites {rewrites:?}\n{stdout}\nagain:\n{out}\n{err}");
        }
        most_partitions = most_partitions.max(partitions);
    }
    eprintln!("at most {most_partitions} partitions; {mechanisms:?}");
    // The archives hold exactly the archiving tenants' runs deleted while they archived their
    // status, each once, as DuckDB reads them.
    let mut read = testkit::duckdb::archived_task_ids(&objects);
    read.sort();
    let mut expected: Vec<String> = ledger.archived.iter().map(Uuid::to_string).collect();
    expected.sort();
    assert!(
        !expected.is_empty(),
        "the archiving tenants had runs deleted"
    );
    assert_eq!(read.len(), expected.len(), "archived runs, each once");
    assert_eq!(
        read, expected,
        "the archived runs are those the ledger says were deleted"
    );
    // With 20,000 tasks a day kept forever in every range, a compaction never pays: row deletes
    // take the due rows, and merges copy the kept ones.
    let expected: &[&str] = if variant.large_forever_a_day > 0 {
        &["ranges merged"]
    } else {
        &["ranges compacted", "ranges merged"]
    };
    for counter in expected {
        assert!(
            mechanisms.get(counter).is_some_and(|n| *n > 0),
            "the simulation never saw {counter}: {mechanisms:?}"
        );
    }
    pool.close().await;
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .unwrap()
        .unwrap();
}

async fn insert_event(
    pool: &PgPool,
    tenant: Uuid,
    task: TaskKey,
    created_at: DateTime<Utc>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
         VALUES ($1, $2, $3, 'finished', $4) RETURNING id",
    )
    .bind(tenant)
    .bind(task.0)
    .bind(task.1)
    .bind(created_at)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The number a run's summary line gives for `counter` (`[..., ranges compacted: 3, ...]`).
/// `counter` summed over the tasks of a `retention run --json`.
fn counter_in(stdout: &str, counter: &str) -> Option<u64> {
    stdout
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{e}: {line}"))
        })
        .filter_map(|task| task["counters"][counter].as_u64())
        .reduce(|a, b| a + b)
}

/// Tasks that have run for ten days finish at 09:00 (an update of an old day), with an event.
async fn finish_long_runners(
    pool: &PgPool,
    ledger: &mut Ledger,
    start: DateTime<Utc>,
    now: DateTime<Utc>,
) {
    let finishing: Vec<TaskKey> = ledger
        .tasks
        .iter()
        .filter(|(_, t)| t.status == "running" && t.finishes.is_some_and(|at| at <= now))
        .map(|(k, _)| *k)
        .collect();
    let at = start + Span::hours(9);
    for key in finishing {
        let tenant = ledger.tasks[&key].tenant;
        let updated = sqlx::query("UPDATE tasks SET status = 'succeeded', finished_at = $3 WHERE id = $1 AND inserted_at = $2")
            .bind(key.0)
            .bind(key.1)
            .bind(at)
            .execute(pool)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(updated, 1, "a running task vanished: {key:?}");
        let task = ledger.tasks.get_mut(&key).unwrap();
        task.status = "succeeded";
        task.finished_at = Some(at);
        let event = insert_event(pool, tenant, key, at).await;
        ledger.events.insert(event, key);
    }
}

/// A task row to insert: id, tenant, status, inserted_at, finished_at.
type NewTask = (
    Uuid,
    Uuid,
    &'static str,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
);

/// The day's work: tasks inserted between midnight and 11:00, with their events and queue items.
async fn insert_day(
    pool: &PgPool,
    ledger: &mut Ledger,
    tenants: &[Uuid],
    day: i64,
    start: DateTime<Utc>,
) {
    let mut rows: Vec<NewTask> = Vec::new();
    for (n, tenant) in tenants.iter().enumerate() {
        let active = match n {
            96 => day % 2 == 0,
            97 => day % 5 == 0,
            _ => ledger.tenants[tenant].deleted_at.is_none(),
        };
        if !active {
            continue;
        }
        for k in 0..TASKS_PER_TENANT_A_DAY {
            let seq = n * TASKS_PER_TENANT_A_DAY + k;
            let inserted_at = start + Span::seconds((seq as i64 * 9_901) % (11 * 3600));
            let (status, finished_at, finishes) = if seq % 40 == 7 {
                ("running", None, Some(start + Span::days(10)))
            } else if seq % 97 == 3 {
                ("queued", None, None)
            } else {
                let status = match seq % 10 {
                    3 => "failed",
                    7 => "cancelled",
                    _ => "succeeded",
                };
                (status, Some(inserted_at + Span::minutes(5)), None)
            };
            let id = Uuid::new_v4();
            rows.push((id, *tenant, status, inserted_at, finished_at));
            ledger.tasks.insert(
                (id, inserted_at),
                Task {
                    tenant: *tenant,
                    status,
                    finished_at,
                    finishes,
                },
            );
        }
    }
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let tenant_ids: Vec<Uuid> = rows.iter().map(|r| r.1).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.2).collect();
    let inserted: Vec<DateTime<Utc>> = rows.iter().map(|r| r.3).collect();
    let finished: Vec<Option<DateTime<Utc>>> = rows.iter().map(|r| r.4).collect();
    sqlx::query(
        "INSERT INTO tasks (id, tenant_id, status, inserted_at, finished_at)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::timestamptz[], $5::timestamptz[])",
    )
    .bind(&ids)
    .bind(&tenant_ids)
    .bind(&statuses)
    .bind(&inserted)
    .bind(&finished)
    .execute(pool)
    .await
    .unwrap();
    // An event when each task starts, another when it finishes; a queue item for those that wait.
    let events: Vec<(i64, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
         SELECT t.tenant, t.id, t.at, e.kind, CASE e.kind WHEN 'started' THEN t.at ELSE t.finished END
         FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[]) AS t(id, tenant, at, finished)
         CROSS JOIN LATERAL (VALUES ('started'), ('finished')) e(kind)
         WHERE e.kind = 'started' OR t.finished IS NOT NULL
         RETURNING id, task_id, task_inserted_at",
    )
    .bind(&ids)
    .bind(&tenant_ids)
    .bind(&inserted)
    .bind(&finished)
    .fetch_all(pool)
    .await
    .unwrap();
    for (id, task, at) in events {
        ledger.events.insert(id, (task, at));
    }
    let waiting: Vec<usize> = (0..rows.len())
        .filter(|i| matches!(rows[*i].2, "queued" | "running"))
        .collect();
    let items: Vec<(i64, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO queue_items (tenant_id, task_id, task_inserted_at)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[]) RETURNING id, task_id, task_inserted_at",
    )
    .bind(waiting.iter().map(|i| rows[*i].1).collect::<Vec<_>>())
    .bind(waiting.iter().map(|i| rows[*i].0).collect::<Vec<_>>())
    .bind(waiting.iter().map(|i| rows[*i].3).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
    .unwrap();
    for (id, task, at) in items {
        ledger.items.insert(id, (task, at));
    }
}

/// The large tenant's day: `n` succeeded tasks between midnight and 11:00, an event each.
async fn insert_large(pool: &PgPool, ledger: &mut Ledger, n: i64, start: DateTime<Utc>) {
    let Some((tenant, days)) = &mut ledger.large else {
        return;
    };
    sqlx::query(
        "WITH t AS (INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
                    SELECT $1, 'succeeded', t, t + interval '1 minute'
                    FROM (SELECT $2 + (g * 39600.0 / $3) * interval '1 second' AS t FROM generate_series(0, $3 - 1) g) s
                    RETURNING id, inserted_at, finished_at)
         INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
         SELECT $1, id, inserted_at, 'finished', finished_at FROM t",
    )
    .bind(*tenant)
    .bind(start)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
    *days.entry(start.date_naive()).or_default() += n;
}

/// After a run at `now`: the database holds exactly what the contract keeps.
async fn check(pool: &PgPool, ledger: &mut Ledger, now: DateTime<Utc>, day: i64) {
    // The large tenant: every task of every day, once, and its one event.
    let large = ledger.large.as_ref().map(|(id, _)| *id).unwrap_or_default();
    if let Some((_, days)) = &ledger.large {
        let expected: Vec<(NaiveDate, i64, i64)> =
            days.iter().map(|(day, n)| (*day, *n, *n)).collect();
        for (what, sql) in [
            ("tasks", "SELECT (inserted_at AT TIME ZONE 'UTC')::date, count(*), count(DISTINCT id) FROM tasks WHERE tenant_id = $1 GROUP BY 1 ORDER BY 1"),
            ("events", "SELECT (task_inserted_at AT TIME ZONE 'UTC')::date, count(*), count(DISTINCT task_id) FROM task_events WHERE tenant_id = $1 GROUP BY 1 ORDER BY 1"),
        ] {
            let found: Vec<(NaiveDate, i64, i64)> = sqlx::query_as(sql).bind(large).fetch_all(pool).await.unwrap();
            assert_eq!(found, expected, "day {day}: the large tenant's {what} (by day: rows, distinct tasks)");
        }
    }
    let present: HashSet<TaskKey> =
        sqlx::query_as("SELECT id, inserted_at FROM tasks WHERE tenant_id <> $1")
            .bind(large)
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut lost = Vec::new();
    let mut late = Vec::new();
    let mut gone = Vec::new();
    for (key, task) in &ledger.tasks {
        let is_due = due(task, key.1, &ledger.tenants[&task.tenant], now);
        match (is_due, present.contains(key)) {
            (false, false) => lost.push((*key, task.status, task.finished_at)),
            (true, true) => late.push((*key, task.status, task.finished_at)),
            (true, false) => gone.push(*key),
            (false, true) => {}
        }
    }
    assert!(
        lost.is_empty(),
        "day {day}: {} kept tasks were deleted, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(3)]
    );
    assert!(
        late.is_empty(),
        "day {day}: {} due tasks were left, e.g. {:?}",
        late.len(),
        &late[..late.len().min(3)]
    );
    let unknown = present
        .iter()
        .filter(|k| !ledger.tasks.contains_key(k))
        .count();
    assert_eq!(unknown, 0, "day {day}: tasks the test never wrote");
    for key in &gone {
        let task = ledger.tasks.remove(key).expect("a task of the ledger");
        if ledger.tenants[&task.tenant].archives.contains(&task.status) {
            ledger.archived.push(key.0);
        }
    }
    // Events: exactly those of the tasks left (no orphans, none lost).
    let events: HashSet<i64> =
        sqlx::query_scalar("SELECT id FROM task_events WHERE tenant_id <> $1")
            .bind(large)
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    ledger
        .events
        .retain(|_, task| ledger.tasks.contains_key(task));
    let expected: HashSet<i64> = ledger.events.keys().copied().collect();
    let orphans = events.difference(&expected).count();
    let missing = expected.difference(&events).count();
    assert_eq!(
        (orphans, missing),
        (0, 0),
        "day {day}: events of deleted tasks left, and kept events missing"
    );
    // Queue items: those of queued or running tasks of live tenants, and every one of a tenant
    // held now. Once a hold ends, its tenant's items of finished tasks wait for the next walk of
    // the whole table (the queue-items contract: within `sweep_interval`, a day, plus a run).
    let items: HashSet<i64> = sqlx::query_scalar("SELECT id FROM queue_items")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let waiting = |tenant: &Tenant| {
        tenant
            .held_until
            .is_some_and(|until| until <= now && now < until + Span::days(2))
    };
    let mut expected = HashSet::new();
    let mut may_stay = HashSet::new();
    ledger.items.retain(|id, key| {
        let Some(task) = ledger.tasks.get(key) else {
            return false;
        };
        let tenant = &ledger.tenants[&task.tenant];
        if (matches!(task.status, "queued" | "running") && tenant.deleted_at.is_none())
            || tenant.held_until.is_some_and(|until| until > now)
        {
            expected.insert(*id);
            true
        } else if waiting(tenant) {
            may_stay.insert(*id);
            true
        } else {
            false
        }
    });
    let left: HashSet<i64> = items.difference(&may_stay).copied().collect();
    assert_eq!(left, expected, "day {day}: queue items");
}
