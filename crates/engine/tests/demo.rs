//! `engine demo`, driven as a new user would: it refuses a configured database, then seeds a
//! database of its own, cleans it by the rules, prints what changed, serves the status page and
//! stops on Ctrl-C.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sqlx::postgres::PgConnectOptions;
use testkit::TestDatabase;

async fn scalar(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn the_demo_cleans_a_database_of_its_own_by_the_rules_and_serves_the_status_page() {
    let db = TestDatabase::new().await;
    let exists = "SELECT count(*) FROM pg_database WHERE datname = 'engine_demo'";

    // A configured database: refused, nothing made.
    let refused = engine()
        .env("DATABASE_URL", &db.url)
        .arg("demo")
        .output()
        .unwrap();
    let (_, stderr) = text(&refused);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("engine_demo") && stderr.contains("--database-url"),
        "{stderr}"
    );
    assert_eq!(scalar(&db.pool, exists).await, 0);

    // Named explicitly: it runs there, in engine_demo.
    let port = free_port();
    let mut child = engine()
        .env("ENGINE__HTTP__ADDR", format!("127.0.0.1:{port}"))
        .args(["demo", "--database-url", &db.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines, received) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let started = Instant::now();
    let mut printed = Vec::new();
    while !printed
        .last()
        .is_some_and(|l: &String| l.contains("(Ctrl-C to stop)"))
    {
        let left = Duration::from_secs(600).saturating_sub(started.elapsed());
        match received.recv_timeout(left) {
            Ok(line) => printed.push(line),
            Err(_) => panic!("the demo did not finish:\n{}", printed.join("\n")),
        }
    }
    let output = printed.join("\n");
    assert!(
        output.contains(&format!("status page: http://127.0.0.1:{port}/")),
        "{output}"
    );
    let sessions_row = printed
        .iter()
        .find(|l| l.starts_with("user_sessions"))
        .unwrap_or_else(|| panic!("{output}"));
    assert!(
        sessions_row.split_whitespace().nth(1) == Some("260,009"),
        "260,000 anonymous and 9 logged-in: {sessions_row}"
    );

    // The page is up, and the database is clean by every rule, with everything kept still there.
    let (status, page) = http(port, "GET", "/", &[], None).unwrap();
    assert_eq!(status, 200);
    assert_eq!(page.matches("<tr data-task=").count(), 5, "{page}");
    assert!(page.contains(r#"<p id="outbox">"#), "{page}");
    let options: PgConnectOptions = db
        .url
        .parse::<PgConnectOptions>()
        .unwrap()
        .database("engine_demo");
    let demo = sqlx::PgPool::connect_with(options).await.unwrap();
    // Due as of each task's run (rows go on becoming due while the demo runs).
    let stale_anonymous = "SELECT count(*) FROM user_sessions WHERE user_id IS NULL
                           AND created_at < (SELECT last_started_at FROM maintenance_tasks WHERE task = 'sessions') - interval '1 day'";
    assert_eq!(scalar(&demo, stale_anonymous).await, 0);
    assert_eq!(
        scalar(
            &demo,
            "SELECT count(*) FROM user_sessions WHERE user_id IS NOT NULL"
        )
        .await,
        9
    );
    let past_window = "SELECT count(*) FROM tasks t JOIN tenants tn ON tn.id = t.tenant_id
                       WHERE t.status IN ('succeeded', 'failed', 'cancelled')
                         AND coalesce(t.finished_at, t.inserted_at)
                             < (SELECT last_started_at FROM maintenance_tasks WHERE task = 'task-history') - tn.data_retention_period";
    assert_eq!(
        scalar(&demo, past_window).await,
        0,
        "finished tasks past their tenant's window:\n{output}"
    );
    let of_deleted = "SELECT count(*) FROM tasks t JOIN tenants tn ON tn.id = t.tenant_id WHERE tn.deleted_at IS NOT NULL";
    assert_eq!(
        scalar(&demo, of_deleted).await,
        0,
        "the deleted tenants' tasks:\n{output}"
    );
    // Five tenants keep forever: 40 tasks a day each over 30 days, all there.
    let forever = "SELECT count(*) FROM tasks t JOIN tenants tn ON tn.id = t.tenant_id
                   WHERE tn.data_retention_period IS NULL AND t.status IN ('succeeded', 'failed', 'cancelled')";
    assert_eq!(scalar(&demo, forever).await, 5 * 40 * 30);
    assert_eq!(
        scalar(&demo, "SELECT count(*) FROM queue_items").await,
        10_000,
        "the queued tasks' items, and only those"
    );
    let orphans = "SELECT count(*) FROM task_events e WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id)";
    assert_eq!(scalar(&demo, orphans).await, 0);
    demo.close().await;

    // Ctrl-C: it stops cleanly.
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let stopped = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "still running 30 s after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    sqlx::query("DROP DATABASE engine_demo WITH (FORCE)")
        .execute(&db.pool)
        .await
        .unwrap();
}
