//! The admin server's guard rails, from outside the process: sizes, deadlines, the database
//! slots, tenant ids on `/metrics` only when configured, and a flood of page loads and API
//! calls that leaves a retention run's batches alone.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use testkit::TestDatabase;

const TOKEN: &str = "flood-test-token-0123456789";

/// Sends `raw` as is; returns the status line's code (None when the server closed the
/// connection without an answer).
fn raw_request(port: u16, raw: &[u8]) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    stream.write_all(raw).ok()?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1)?.parse().ok()?;
    Some((status, response))
}

async fn tenant_windows(pool: &PgPool) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT slug, data_retention_period::text FROM tenants ORDER BY slug")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A database with tenant `acme`, served with the admin token and `env`.
async fn acme_served(env: &[(&str, &str)]) -> (TestDatabase, Served) {
    let db = TestDatabase::new().await;
    sqlx::query("INSERT INTO tenants (slug, name) VALUES ('acme', 'Acme')")
        .execute(&db.pool)
        .await
        .unwrap();
    let env: Vec<(&str, &str)> = [("ENGINE__HTTP__ADMIN_TOKEN", TOKEN)]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let served = Served::start(&db.url, &env);
    (db, served)
}

#[tokio::test]
async fn oversized_requests_are_refused_before_any_handler_runs() {
    let (db, served) = acme_served(&[
        ("ENGINE__HTTP__MAX_BODY_BYTES", "2048"),
        ("ENGINE__HTTP__MAX_HEADER_BYTES", "4096"),
    ])
    .await;
    let before = tenant_windows(&db.pool).await;
    let auth = format!("Bearer {TOKEN}");

    // A valid body, padded with spaces past the limit: the handler would accept it.
    let padded = format!(
        "{{\"data_retention_period\": \"2days\"{}}}",
        " ".repeat(3000)
    );
    let (status, body) = http(
        served.port,
        "PUT",
        "/api/v1/tenants/acme/retention",
        &[("Authorization", &auth)],
        Some(&padded),
    )
    .unwrap();
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("http.max_body_bytes (2048 bytes)"), "{body}");

    // The same without a length (chunked): cut off at the limit, refused the same way.
    let chunked = format!(
        "PUT /api/v1/tenants/acme/retention HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{padded}\r\n0\r\n\r\n",
        padded.len()
    );
    let (status, response) = raw_request(served.port, chunked.as_bytes()).unwrap();
    assert_eq!(status, 413, "{response}");

    // Headers past the limit: 431, naming the setting.
    let big = "x".repeat(5000);
    let (status, body) = http(
        served.port,
        "GET",
        "/api/v1/tenants/acme/retention",
        &[("Authorization", &auth), ("X-Padding", &big)],
        None,
    )
    .unwrap();
    assert_eq!(status, 431, "{body}");
    assert!(body.contains("http.max_header_bytes (4096)"), "{body}");
    assert_eq!(
        tenant_windows(&db.pool).await,
        before,
        "nothing changed by a refused request"
    );

    // Just under both limits, the same change goes through.
    let (status, body) = http(
        served.port,
        "PUT",
        "/api/v1/tenants/acme/retention",
        &[("Authorization", &auth), ("X-Padding", &"x".repeat(3000))],
        Some(&format!(
            "{{\"data_retention_period\": \"2days\"{}}}",
            " ".repeat(1900)
        )),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        tenant_windows(&db.pool).await,
        vec![("acme".to_string(), Some("48:00:00".to_string()))]
    );
}

#[tokio::test]
async fn slow_requests_end_at_the_deadline_and_the_slots_turn_the_rest_away() {
    let (db, served) = acme_served(&[
        ("ENGINE__HTTP__MAX_CONNECTIONS", "1"),
        ("ENGINE__HTTP__REQUEST_TIMEOUT", "3s"),
    ])
    .await;
    let port = served.port;
    let auth = format!("Bearer {TOKEN}");
    // Reading a tenant waits behind this lock for as long as the test holds it.
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();

    let slow = {
        let auth = auth.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let answer = http(
                port,
                "GET",
                "/api/v1/tenants/acme/retention",
                &[("Authorization", &auth)],
                None,
            );
            (answer, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    // The one slot is taken: the next request that needs the database is turned away after a
    // second, while the routes that don't answer at once.
    let started = Instant::now();
    let (status, body) = http(port, "GET", "/", &[], None).unwrap();
    let waited = started.elapsed();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("http.max_connections"), "{body}");
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert_eq!(http(port, "GET", "/healthz", &[], None).unwrap().0, 200);
    assert_eq!(http(port, "GET", "/metrics", &[], None).unwrap().0, 200);

    let (answer, took) = slow.join().unwrap();
    let (status, body) = answer.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("http.request_timeout (3s)"), "{body}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(8),
        "{took:?}"
    );
    // PostgreSQL stops the statement too (the pool's statement_timeout, as long as the
    // deadline, timed from the statement's start: a connect's time after the request's), so
    // nothing of the request is left waiting on the lock a moment later.
    let since = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut *blocker)
        .await
        .unwrap();
        if waiting == 0 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "{waiting} statements still wait on the lock 2 s after the deadline"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    blocker.rollback().await.unwrap();
    let (status, body) = http(
        port,
        "GET",
        "/api/v1/tenants/acme/retention",
        &[("Authorization", &auth)],
        None,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn metrics_name_no_tenant_unless_configured() {
    let db = TestDatabase::new().await;
    let tenant: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (slug, name, data_retention_period) VALUES ('acme', 'Acme', interval '1 day') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'succeeded', now() - interval '3 days', now() - interval '3 days' FROM generate_series(1, 20)",
    )
    .bind(tenant)
    .execute(&db.pool)
    .await
    .unwrap();
    let served = Served::start(&db.url, &[]);
    let scrape = || {
        http(served.port, "GET", "/metrics", &[], None)
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    wait_until(
        "task-history to delete the tenant's rows",
        Duration::from_secs(60),
        || scrape().contains("retention_tenant_rows_deleted_total{"),
    );
    let text = scrape();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("retention_tenant_rows_deleted_total{"))
        .collect();
    assert!(!series.is_empty());
    for line in series {
        assert!(line.contains("tenant=\"other\""), "{line}");
    }
    assert!(!text.contains(&tenant.to_string()), "{text}");
}

/// Seeds `due` anonymous sessions past their time to live and 100 logged-in ones still valid.
async fn seed_sessions(pool: &PgPool, due: i64) {
    sqlx::query("TRUNCATE user_sessions, users CASCADE")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO user_sessions (created_at, expires_at)
         SELECT now() - interval '3 days', now() + interval '1 day' FROM generate_series(1, $1)",
    )
    .bind(due)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO users (email) SELECT 'kept-' || g FROM generate_series(1, 100) g")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO user_sessions (user_id, created_at, expires_at)
         SELECT id, now() - interval '1 hour', now() + interval '1 day' FROM users",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE user_sessions")
        .execute(pool)
        .await
        .unwrap();
}

/// Sessions left (the due ones and the 100 kept).
async fn sessions_left(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM user_sessions")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// The time the sessions runs recorded so far spent, start to finish: the batches' time, not
/// when the scheduler got to them.
async fn sessions_runs_time(pool: &PgPool) -> Duration {
    let seconds: f64 = sqlx::query_scalar(
        "SELECT coalesce(sum(extract(epoch FROM finished_at - started_at)), 0)::float8
         FROM maintenance_runs WHERE task = 'sessions' AND finished_at IS NOT NULL",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    Duration::from_secs_f64(seconds)
}

/// Once the due sessions are all gone (however many runs that took): the time their runs spent.
async fn swept(pool: &PgPool, since: Instant) -> Duration {
    loop {
        if sessions_left(pool).await == 100 {
            // The run that deleted the last rows records its end a moment later.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return sessions_runs_time(pool).await;
        }
        assert!(
            since.elapsed() < Duration::from_secs(240),
            "the due sessions did not go"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_page_loads_and_api_calls_leaves_a_retention_run_alone() {
    const DUE: i64 = 150_000;
    let db = TestDatabase::new().await;
    for slug in ["acme", "globex"] {
        sqlx::query("INSERT INTO tenants (slug, name) VALUES ($1, $1)")
            .bind(slug)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    // Few connections for the runs, so that any the page took would show; a short wait for
    // one, so that a run starved of them fails rather than crawls.
    let env = [
        ("ENGINE__HTTP__ADMIN_TOKEN", TOKEN),
        ("ENGINE__HTTP__MAX_CONNECTIONS", "2"),
        ("ENGINE__DATABASE__MAX_CONNECTIONS", "2"),
        ("ENGINE__RETENTION__PARALLELISM", "1"),
        ("ENGINE__DATABASE__CONNECT_TIMEOUT", "1s"),
        ("ENGINE__RETENTION__SESSIONS__BATCH_SIZE", "1000"),
        ("ENGINE__RETENTION__PACING__FEEDBACK", "false"),
        ("ENGINE__RETENTION__PACING__PAUSE_RATIO", "1"),
        // Small batches, many of them: a run of a second or more that the flood overlaps.
        ("ENGINE__RETENTION__PACING__BATCH_TIME", "1ms"),
        // Each server's first sessions run is the one measured; the schedule it keeps in the
        // database would otherwise put the second server's first run an hour after the first's.
        ("ENGINE__RETENTION__SESSIONS__INTERVAL", "2s"),
    ];

    // The baseline: the same run with no one at the server.
    seed_sessions(&db.pool, DUE).await;
    let started = Instant::now();
    let served = Served::start(&db.url, &env);
    let alone = swept(&db.pool, started).await;
    drop(served);

    seed_sessions(&db.pool, DUE).await;
    sqlx::query("DELETE FROM maintenance_runs")
        .execute(&db.pool)
        .await
        .unwrap();
    let due: i64 = sqlx::query_scalar("SELECT count(*) FROM user_sessions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(due, DUE + 100);
    let started = Instant::now();
    let served = Served::start(&db.url, &env);
    let port = served.port;
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let turned_away = Arc::new(AtomicU64::new(0));
    let unexpected = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let auth = format!("Bearer {TOKEN}");
    let flooders: Vec<_> = (0..24)
        .map(|i| {
            let (stop, answered, turned_away, unexpected, auth) = (
                stop.clone(),
                answered.clone(),
                turned_away.clone(),
                unexpected.clone(),
                auth.clone(),
            );
            std::thread::spawn(move || {
                let paths = [
                    "/",
                    "/api/v1/tenants/acme/retention",
                    "/api/v1/holds",
                    "/api/v1/receipts?limit=100",
                ];
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    let path = paths[n % paths.len()];
                    n += 1;
                    match http(port, "GET", path, &[("Authorization", &auth)], None) {
                        Some((200, _)) => answered.fetch_add(1, Ordering::Relaxed),
                        Some((503, _)) => turned_away.fetch_add(1, Ordering::Relaxed),
                        other => {
                            unexpected
                                .lock()
                                .unwrap()
                                .push(format!("{path}: {other:?}"));
                            0
                        }
                    };
                }
            })
        })
        .collect();
    // While the flood goes, by name in pg_stat_activity: the runs' connections (the engine's
    // name) never more than their pools allow, the page's and the API's (`<name>/http`) never
    // more than http.max_connections.
    let (mut most_run, mut most_http) = (0i64, 0i64);
    let flooded = loop {
        let (run, http): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE application_name = 'retention-engine'),
                    count(*) FILTER (WHERE application_name = 'retention-engine/http')
               FROM pg_stat_activity",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        most_run = most_run.max(run);
        most_http = most_http.max(http);
        if sessions_left(&db.pool).await == 100 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            break sessions_runs_time(&db.pool).await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the due sessions did not go under the flood"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        flooder.join().unwrap();
    }
    let (answered, turned_away) = (
        answered.load(Ordering::Relaxed),
        turned_away.load(Ordering::Relaxed),
    );
    println!(
        "{DUE} due sessions: their runs took {:.2} s alone, {:.2} s under the flood ({answered} answers, {turned_away} turned away); at most {most_run} run and {most_http} admin connections",
        alone.as_secs_f64(),
        flooded.as_secs_f64()
    );
    assert!(
        unexpected.lock().unwrap().is_empty(),
        "{:?}",
        unexpected.lock().unwrap()
    );
    assert!(
        answered >= 50,
        "the flood reached the database: {answered} answers"
    );
    // The page and the API went through their own pool, and only through it: on a shared
    // pool no connection carries the admin name, and the runs' count grows.
    assert!(
        (1..=2).contains(&most_http),
        "{most_http} admin connections (http.max_connections is 2)"
    );
    // database.max_connections (2) + the lease keepers' (2) + the pacing probe's own (1).
    assert!(most_run <= 5, "{most_run} run connections");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM user_sessions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 100, "every due session went, every kept one stayed");
    let failed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM maintenance_runs WHERE outcome = 'failed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(failed, 0, "no run of any task failed under the flood");
    // The machine's two cores serve the flood too, so the run may slow a little; a run that
    // waited for connections would take several times longer, or fail.
    assert!(
        flooded <= alone * 2 + Duration::from_secs(5),
        "{flooded:?} under the flood against {alone:?} alone"
    );
}
