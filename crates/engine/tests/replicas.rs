//! Several `engine serve` replicas on one database, from outside: killed with SIGKILL at random
//! moments during a purge, a database restart in the middle of a run, and runs that never overlap.
//! Every check is on exact rows: which survive, which are gone, and that nothing is orphaned.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use testkit::TestDatabase;
use uuid::Uuid;

/// What must be left once every due row is gone.
struct Expected {
    sessions: BTreeSet<Uuid>,
    tasks: BTreeSet<Uuid>,
    /// Events are kept exactly with their tasks.
    events: i64,
    /// Queue items stay only while their task is queued or running.
    queue_items: BTreeSet<Uuid>,
}

/// A backlog on both sides of every cutoff: sessions expired a minute ago or expiring in ten,
/// anonymous sessions a minute past or ten minutes short of a day old; tasks of two tenants
/// keeping a day, finished a minute past it (due) or ten minutes short of it, running ones past
/// it, and a tenant that keeps history forever. Each task has two events and a queue item.
async fn seed(pool: &PgPool, due_sessions: i64, due_tasks_per_tenant: i64) -> Expected {
    let mut sessions = BTreeSet::new();
    for sql in [
        // kept: logged in, not yet expired
        "INSERT INTO users (email) SELECT 'kept-' || g FROM generate_series(1, 200) g",
        "INSERT INTO user_sessions (user_id, created_at, expires_at)
         SELECT id, now() - interval '3 days', now() + interval '10 minutes' FROM users",
        // kept: anonymous, ten minutes short of the anonymous ttl (a day)
        "INSERT INTO user_sessions (created_at, expires_at)
         SELECT now() - interval '1 day' + interval '10 minutes', now() + interval '10 days' FROM generate_series(1, 200)",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    sessions.extend(
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM user_sessions")
            .fetch_all(pool)
            .await
            .unwrap(),
    );
    sqlx::query(
        "INSERT INTO user_sessions (user_id, created_at, expires_at)
         SELECT CASE WHEN g % 2 = 0 THEN (SELECT min(id::text)::uuid FROM users) END,
                now() - interval '1 day' - interval '1 minute',
                CASE WHEN g % 2 = 0 THEN now() - interval '1 minute' ELSE now() + interval '10 days' END
         FROM generate_series(1, $1) g",
    )
    .bind(due_sessions)
    .execute(pool)
    .await
    .unwrap();

    let tenants: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO tenants (slug, name, data_retention_period)
         VALUES ('acme', 'Acme', '1 day'), ('globex', 'Globex', '1 day'), ('forever', 'Forever', NULL) RETURNING id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for tenant in &tenants[..2] {
        sqlx::query(
            "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
             SELECT $1, 'succeeded', f - interval '5 minutes', f
             FROM (SELECT now() - interval '1 day' - interval '1 minute' - g * interval '1 second' AS f
                   FROM generate_series(0, $2 - 1) g) due",
        )
        .bind(tenant)
        .bind(due_tasks_per_tenant)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
             SELECT $1, 'failed', now() - interval '1 day', now() - interval '1 day' + interval '10 minutes' FROM generate_series(1, 50)
             UNION ALL
             SELECT $1, 'running', now() - interval '5 days', NULL FROM generate_series(1, 50)",
        )
        .bind(tenant)
        .execute(pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'succeeded', now() - interval '20 days', now() - interval '20 days' FROM generate_series(1, 50)",
    )
    .bind(tenants[2])
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type)
         SELECT tenant_id, id, inserted_at, e FROM tasks, (VALUES ('started'), ('finished')) events(e)",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO queue_items (tenant_id, task_id, task_inserted_at) SELECT tenant_id, id, inserted_at FROM tasks")
        .execute(pool)
        .await
        .unwrap();

    let kept_tasks = "SELECT id FROM tasks WHERE status = 'running' OR tenant_id = $1
                      OR finished_at > now() - interval '1 day'";
    let tasks: BTreeSet<Uuid> = sqlx::query_scalar(kept_tasks)
        .bind(tenants[2])
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let queue_items = sqlx::query_scalar("SELECT task_id FROM queue_items q JOIN tasks t ON t.id = q.task_id WHERE t.status = 'running'")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    Expected {
        sessions,
        events: 2 * tasks.len() as i64,
        tasks,
        queue_items,
    }
}

/// Rows still due: sessions and finished history past a day (the forever tenant's aside).
async fn due(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM user_sessions
                 WHERE expires_at < now() OR (user_id IS NULL AND created_at < now() - interval '1 day')),
                (SELECT count(*) FROM tasks t JOIN tenants tn ON tn.id = t.tenant_id
                 WHERE tn.data_retention_period IS NOT NULL AND t.status <> 'running'
                   AND t.finished_at < now() - tn.data_retention_period)",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Exactly the expected rows are left, and no event or queue item lost its task.
async fn assert_exactly(pool: &PgPool, expected: &Expected) {
    let set = |sql: &'static str| async move {
        sqlx::query_scalar::<_, Uuid>(sql)
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect::<BTreeSet<_>>()
    };
    let sessions = set("SELECT id FROM user_sessions").await;
    assert_eq!(sessions.len(), expected.sessions.len(), "sessions left");
    assert!(
        sessions == expected.sessions,
        "the surviving sessions are exactly the kept ones"
    );
    let tasks = set("SELECT id FROM tasks").await;
    assert_eq!(tasks.len(), expected.tasks.len(), "tasks left");
    assert!(
        tasks == expected.tasks,
        "the surviving tasks are exactly the kept ones"
    );
    let queue_items = set("SELECT task_id FROM queue_items").await;
    assert_eq!(
        queue_items, expected.queue_items,
        "queue items of running tasks stay, the rest go"
    );
    let (events, orphan_events, orphan_items): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM task_events),
                (SELECT count(*) FROM task_events e WHERE NOT EXISTS
                    (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)),
                (SELECT count(*) FROM queue_items q WHERE NOT EXISTS
                    (SELECT 1 FROM tasks t WHERE t.id = q.task_id AND t.inserted_at = q.task_inserted_at))",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        (events, orphan_events, orphan_items),
        (expected.events, 0, 0),
        "events stay with their tasks; no orphans"
    );
}

/// A run as the replicas' own logs tell it: when it started and when it finished, or when the
/// test killed its replica.
#[derive(Debug)]
struct LoggedRun {
    task: String,
    run_id: String,
    log: usize,
    started: chrono::DateTime<chrono::Utc>,
    ended: chrono::DateTime<chrono::Utc>,
}

/// Every run in the replicas' logs. `killed_at[i]` is when the test killed the replica that
/// wrote log `i` (a killed run ends then).
fn logged_runs(
    logs: &[std::path::PathBuf],
    killed_at: &[chrono::DateTime<chrono::Utc>],
) -> Vec<LoggedRun> {
    let mut runs = Vec::new();
    for (log, path) in logs.iter().enumerate() {
        let text = std::fs::read_to_string(path).unwrap();
        let mut open: HashMap<String, LoggedRun> = HashMap::new();
        for line in text.lines() {
            let field = |name: &str| {
                line.split(&format!("{name}=")).nth(1).map(|rest| {
                    rest.split([' ', '}'])
                        .next()
                        .unwrap()
                        .trim_matches('"')
                        .to_string()
                })
            };
            let (Some(task), Some(run_id)) = (field("task"), field("run_id")) else {
                continue;
            };
            let Some(at) = line
                .split_whitespace()
                .next()
                .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
            else {
                continue;
            };
            if line.ends_with("run started") {
                open.insert(
                    run_id.clone(),
                    LoggedRun {
                        task,
                        run_id,
                        log,
                        started: at,
                        ended: killed_at[log],
                    },
                );
            } else if line.contains("run finished") {
                if let Some(mut run) = open.remove(&run_id) {
                    run.ended = at;
                    runs.push(run);
                }
            }
        }
        runs.extend(open.into_values()); // killed mid-run: they end with the kill
    }
    runs
}

/// Replicas started by a test, each with its log, and when the test killed each (never: the
/// end of time).
struct Fleet {
    url: String,
    dir: tempfile::TempDir,
    logs: Vec<std::path::PathBuf>,
    killed_at: Vec<chrono::DateTime<chrono::Utc>>,
}

impl Fleet {
    fn new(url: &str) -> Fleet {
        Fleet {
            url: url.to_string(),
            dir: tempfile::tempdir().unwrap(),
            logs: Vec::new(),
            killed_at: Vec::new(),
        }
    }

    /// A replica, and the index of its log.
    fn start(&mut self, env: &[(&str, &str)]) -> (Served, usize) {
        let path = self
            .dir
            .path()
            .join(format!("replica-{}.log", self.logs.len()));
        let served = Served::start_logging(&self.url, env, std::fs::File::create(&path).unwrap());
        self.logs.push(path);
        self.killed_at
            .push(chrono::DateTime::<chrono::Utc>::MAX_UTC);
        (served, self.logs.len() - 1)
    }
}

/// No two runs of one task overlapped, across every replica, by the replicas' own logs and the
/// instants of the test's kills (not by the run log, where the next run closes a killed one).
fn assert_runs_never_overlapped(runs: &mut [LoggedRun]) {
    runs.sort_by_key(|run| (run.task.clone(), run.started));
    assert!(runs.len() > 3, "{runs:?}");
    for pair in runs.windows(2) {
        let (run, next) = (&pair[0], &pair[1]);
        if run.task == next.task {
            assert!(
                run.ended <= next.started,
                "{}: run {} (log {}) lasted until {}, after run {} (log {}) started at {}",
                run.task,
                run.run_id,
                run.log,
                run.ended,
                next.run_id,
                next.log,
                next.started
            );
        }
    }
}

/// Replicas that purge slowly (a 30x pause after each batch), so that kills land mid-run.
const SLOW_REPLICA: &[(&str, &str)] = &[
    ("ENGINE__RETENTION__SESSIONS__INTERVAL", "1s"),
    ("ENGINE__RETENTION__TASK_HISTORY__INTERVAL", "1s"),
    ("ENGINE__RETENTION__QUEUE_ITEMS__INTERVAL", "1s"),
    ("ENGINE__RETENTION__PACING__PAUSE_RATIO", "30"),
    ("ENGINE__RETENTION__LEASE_TTL", "3s"),
];
const FAST_REPLICA: &[(&str, &str)] = &[
    ("ENGINE__RETENTION__SESSIONS__INTERVAL", "1s"),
    ("ENGINE__RETENTION__TASK_HISTORY__INTERVAL", "1s"),
    ("ENGINE__RETENTION__QUEUE_ITEMS__INTERVAL", "1s"),
    ("ENGINE__RETENTION__PACING__PAUSE_RATIO", "0"),
    ("ENGINE__RETENTION__LEASE_TTL", "3s"),
];

/// Waits until nothing is due and every queue item of a finished task is gone.
async fn wait_converged(pool: &PgPool, within: Duration) {
    let start = Instant::now();
    loop {
        let stale_items: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM queue_items q WHERE NOT EXISTS
                 (SELECT 1 FROM tasks t WHERE t.id = q.task_id AND t.status = 'running')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if due(pool).await == (0, 0) && stale_items == 0 {
            return;
        }
        assert!(
            start.elapsed() < within,
            "not converged within {within:?}: due {:?}, queue items {stale_items}",
            due(pool).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn replicas_killed_at_random_moments_lose_nothing_orphan_nothing_and_converge() {
    let db = TestDatabase::new().await;
    let expected = seed(&db.pool, 200_000, 4_000).await;
    let seed = fastrand::u64(..);
    eprintln!("kill schedule seed: {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let mut fleet = Fleet::new(&db.url);
    let mut replicas: Vec<(Served, usize)> = (0..3).map(|_| fleet.start(SLOW_REPLICA)).collect();
    let mut last_due = due(&db.pool).await;
    let mut kills = 0;
    // Up to twelve kills, for as long as the purge lasts.
    while kills < 12 && last_due != (0, 0) {
        tokio::time::sleep(Duration::from_millis(rng.u64(200..1_500))).await;
        let mut victim = rng.usize(..replicas.len());
        if kills == 0 {
            // The first kill takes a runner in the middle of its run (if one holds a lease now),
            // so that at least one run is left to be closed as abandoned.
            let holders: Vec<String> = sqlx::query_scalar("SELECT coalesce(lease_holder, '') FROM maintenance_tasks WHERE lease_expires_at > now()")
                .fetch_all(&db.pool)
                .await
                .unwrap();
            if let Some(running) = replicas.iter().position(|(r, _)| {
                holders
                    .iter()
                    .any(|h| h.ends_with(&format!(":{}", r.child.id())))
            }) {
                victim = running;
            }
        }
        let killed = chrono::Utc::now();
        replicas[victim].0.child.kill().unwrap(); // SIGKILL
        replicas[victim].0.child.wait().unwrap();
        fleet.killed_at[replicas[victim].1] = killed;
        kills += 1;
        // Committed progress stays: what is due never grows back.
        let now_due = due(&db.pool).await;
        assert!(
            now_due.0 <= last_due.0 && now_due.1 <= last_due.1,
            "due went from {last_due:?} to {now_due:?}"
        );
        last_due = now_due;
        // Nothing within retention went, whatever was in flight.
        let kept_sessions: i64 =
            sqlx::query_scalar("SELECT count(*) FROM user_sessions WHERE id = ANY($1)")
                .bind(expected.sessions.iter().copied().collect::<Vec<_>>())
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            kept_sessions,
            expected.sessions.len() as i64,
            "after kill {kills}"
        );
        replicas[victim] = fleet.start(SLOW_REPLICA);
    }
    assert!(kills >= 1, "the purge finished before the first kill");
    // SIGKILL, all at once, whatever they were doing.
    let killed = chrono::Utc::now();
    for (_, log) in &replicas {
        fleet.killed_at[*log] = killed;
    }
    drop(replicas);

    // One full-speed replica finishes the job.
    let (finisher, _) = fleet.start(FAST_REPLICA);
    wait_converged(&db.pool, Duration::from_secs(120)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(finisher.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut finisher = finisher;
    let finisher_pid = finisher.child.id();
    assert!(finisher.child.wait().unwrap().success());

    assert_exactly(&db.pool, &expected).await;
    assert_runs_never_overlapped(&mut logged_runs(&fleet.logs, &fleet.killed_at));
    let abandoned: i64 =
        sqlx::query_scalar("SELECT count(*) FROM maintenance_runs WHERE error LIKE 'abandoned%'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    eprintln!(
        "{kills} kills; due when they ended: {last_due:?}; runs abandoned by a kill: {abandoned}"
    );
    assert!(
        abandoned >= 1,
        "killed runs are closed as abandoned by the next run"
    );
    // (A killed replica's lease may not have expired yet: it is left to expire.)
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM maintenance_tasks WHERE lease_holder LIKE '%:' || $1",
    )
    .bind(finisher_pid.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(held, 0, "the last replica released its leases on SIGTERM");
}

/// A private cluster this test can stop and start again.
fn start_cluster(dir: &std::path::Path) -> testkit::local_postgres::LocalPostgres {
    testkit::local_postgres::LocalPostgres::start(testkit::local_postgres::Options::persistent(
        dir.to_path_buf(),
    ))
    .unwrap_or_else(|e| panic!("start a private PostgreSQL: {e}"))
}

#[tokio::test]
async fn a_database_restart_mid_run_is_ridden_out_without_an_engine_restart() {
    let dir = tempfile::Builder::new()
        .prefix("engine-restart-pg-")
        .tempdir()
        .unwrap();
    let cluster_dir = dir.path().join("pg");
    let cluster = {
        let cluster_dir = cluster_dir.clone();
        tokio::task::spawn_blocking(move || start_cluster(&cluster_dir))
            .await
            .unwrap()
    };
    let url = cluster.url();
    let output = engine()
        .env("DATABASE_URL", &url)
        .arg("migrate")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output).1);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let expected = seed(&pool, 100_000, 1_000).await;
    let engine = Served::start(
        &url,
        &[
            ("ENGINE__RETENTION__SESSIONS__INTERVAL", "1s"),
            ("ENGINE__RETENTION__PACING__PAUSE_RATIO", "3"),
            ("ENGINE__RETENTION__LEASE_TTL", "3s"),
        ],
    );
    let get = |path: &str| {
        http(engine.port, "GET", path, &[], None)
            .map(|(status, _)| status)
            .unwrap_or(0)
    };

    // A sessions run has deleted some rows and is still going.
    let start = Instant::now();
    loop {
        let (running, deleted_some): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM maintenance_runs WHERE task = 'sessions' AND finished_at IS NULL),
                    (SELECT count(*) FROM user_sessions) < 100400",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if running && deleted_some {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no sessions run started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pool.close().await;

    // Fast shutdown: every session is cut, the run's batch in flight fails.
    tokio::task::spawn_blocking(move || cluster.stop().unwrap())
        .await
        .unwrap();
    wait_until(
        "/readyz to report the database down",
        Duration::from_secs(20),
        || get("/readyz") == 503,
    );
    assert_eq!(
        get("/healthz"),
        200,
        "liveness does not depend on the database"
    );
    std::thread::sleep(Duration::from_secs(2)); // the tasks fail and back off
    let _cluster = {
        let cluster_dir = cluster_dir.clone();
        tokio::task::spawn_blocking(move || start_cluster(&cluster_dir))
            .await
            .unwrap()
    };
    wait_until("/readyz to recover", Duration::from_secs(30), || {
        get("/readyz") == 200
    });

    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    wait_converged(&pool, Duration::from_secs(120)).await;
    let mut engine = engine;
    assert!(
        engine.child.try_wait().unwrap().is_none(),
        "the same engine process carried on"
    );
    assert_exactly(&pool, &expected).await;
    let interrupted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM maintenance_runs WHERE task = 'sessions' AND outcome = 'failed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        interrupted >= 1,
        "the run the restart cut short is recorded as failed"
    );
    // The run that finished the purge records itself once its last steps (statistics) are done.
    let start = Instant::now();
    loop {
        let recovered: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM maintenance_runs WHERE task = 'sessions' AND outcome = 'done'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if recovered >= 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no later run finished the purge"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pool.close().await;
    drop(engine); // before the cluster stops
}
