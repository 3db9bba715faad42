//! The status page at `/`, rendered by a real browser (headless Chromium, Debian package
//! `chromium`): what it shows after real runs, checked in the DOM the browser built.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use testkit::TestDatabase;

/// Chromium, from `CHROMIUM` or the usual places.
fn chromium() -> PathBuf {
    let candidates = [
        std::env::var("CHROMIUM").unwrap_or_default(),
        "/usr/bin/chromium".into(),
        "/usr/bin/chromium-browser".into(),
    ];
    candidates
        .iter()
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .find(|c| c.exists())
        .expect("headless Chromium is needed for this test: apt-get install chromium (or set CHROMIUM=/path/to/chromium)")
}

/// Runs headless Chromium on `url` with `args`; returns its stdout.
fn browse(url: &str, profile: &Path, args: &[&str]) -> String {
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .output()
        .expect("running chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The text of the first element of the DOM that starts with `open` (an opening tag's start), up
/// to its closing `close`.
fn element<'a>(dom: &'a str, open: &str, close: &str) -> &'a str {
    let start = dom
        .find(open)
        .unwrap_or_else(|| panic!("no {open} in the page:\n{dom}"));
    let end = dom[start..]
        .find(close)
        .map_or(dom.len(), |e| start + e + close.len());
    &dom[start..end]
}

#[tokio::test]
async fn the_status_page_shows_tasks_rows_deleted_tables_and_failures_in_a_browser() {
    let db = TestDatabase::new().await;
    // 7 anonymous sessions past their day, 2 fresh ones; a tenant keeping a day, with 3 tasks past it.
    sqlx::query(
        "INSERT INTO user_sessions (user_id, created_at, expires_at)
         SELECT NULL, now() - CASE WHEN g <= 7 THEN interval '2 days' ELSE interval '1 minute' END, now() + interval '28 days'
         FROM generate_series(1, 9) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let tenant: uuid::Uuid = sqlx::query_scalar("INSERT INTO tenants (slug, name, data_retention_period) VALUES ('acme-secret', 'Acme', '1 day') RETURNING id")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'succeeded', now() - g * interval '1 hour', now() - g * interval '1 hour' FROM unnest(array[30, 31, 32]) g",
    )
    .bind(tenant)
    .execute(&db.pool)
    .await
    .unwrap();
    let run = |args: &[&str]| {
        let output = engine()
            .env("DATABASE_URL", &db.url)
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {:?}", text(&output));
    };
    run(&[
        "retention",
        "run",
        "--task",
        "sessions",
        "--task",
        "task-history",
    ]);
    run(&["retention", "pause", "queue-items"]);
    // A failed run in the log, with an error that is not HTML.
    sqlx::query(
        "INSERT INTO maintenance_runs (run_id, task, replica, started_at, finished_at, outcome, error)
         VALUES (gen_random_uuid(), 'partitions', 'replica-b', now() - interval '1 hour', now() - interval '1 hour', 'failed',
                 'lock timeout on <tasks> & \"task_events\"')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let served = Served::start(
        &db.url,
        &[("ENGINE__RETENTION__PARTITIONS__INTERVAL", "1h")],
    );
    let url = format!("http://127.0.0.1:{}/", served.port);
    let profile = tempfile::tempdir().unwrap();

    let dom = browse(&url, profile.path(), &["--dump-dom"]);

    assert!(
        dom.contains("<title>engine · retention status</title>"),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<meta http-equiv="refresh" content="10">"#),
        "it refreshes itself"
    );
    // Every task, with its state, last outcome and rows.
    let tasks = element(&dom, r#"<section id="tasks">"#, "</section>");
    assert_eq!(tasks.matches("<tr data-task=").count(), 5, "{tasks}");
    assert!(
        tasks.contains(r#"<p id="outbox">Outbox (stored objects to delete): empty</p>"#),
        "{tasks}"
    );
    let sessions = element(tasks, r#"<tr data-task="sessions">"#, "</tr>");
    assert!(
        sessions.contains(r#"<td class="active">active</td>"#)
            && sessions.contains(r#"<td class="outcome-done">done</td>"#),
        "{sessions}"
    );
    assert!(
        sessions.contains(r#"<td class="n">7</td>"#),
        "7 rows deleted: {sessions}"
    );
    let history = element(tasks, r#"<tr data-task="task-history">"#, "</tr>");
    assert!(
        history.contains(r#"<td class="n">3</td>"#),
        "3 tasks deleted: {history}"
    );
    let queue = element(tasks, r#"<tr data-task="queue-items">"#, "</tr>");
    assert!(
        queue.contains(r#"<td class="paused">paused</td>"#) && queue.contains("<td>paused</td>"),
        "{queue}"
    );
    // The charts: this hour's bars hold the runs' rows, drawn as SVG rectangles.
    let charts = element(&dom, r#"<section id="deleted">"#, "</section>");
    let day = element(charts, r#"<svg id="chart-24h""#, "</svg>");
    assert!(
        day.contains(r#"data-series="sessions""#) && day.contains(r#"data-rows="7""#),
        "{day}"
    );
    assert!(
        day.contains(r#"data-series="task-history""#) && day.contains(r#"data-rows="3""#),
        "{day}"
    );
    assert_eq!(day.matches("<rect").count(), 2, "{day}");
    assert!(
        charts.contains(r#"<span id="total-24h">10</span>"#)
            && charts.contains(r#"<span id="total-30d">10</span>"#),
        "{charts}"
    );
    // The tables, with sizes.
    let tables = element(&dom, r#"<section id="tables">"#, "</section>");
    for table in [
        "user_sessions",
        "queue_items",
        "tasks",
        "task_events",
        "retention_receipts",
    ] {
        assert!(
            tables.contains(&format!(r#"<tr data-table="{table}">"#)),
            "{table}: {tables}"
        );
    }
    assert!(
        element(tables, r#"<tr data-table="tasks">"#, "</tr>").contains(" kB<"),
        "{tables}"
    );
    // The failed run, its error as text.
    let failures = element(&dom, r#"<section id="failures">"#, "</section>");
    assert!(
        failures.contains("replica-b")
            && failures.contains("lock timeout on &lt;tasks&gt; &amp; \"task_events\""),
        "{failures}"
    );
    // No tenant data.
    assert!(
        !dom.contains("acme") && !dom.contains(&tenant.to_string()),
        "a tenant on the page"
    );

    // And a picture of it: docs/status-page.png comes from here (STATUS_PAGE_SCREENSHOT=docs/status-page.png).
    let shot = std::env::var("STATUS_PAGE_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| profile.path().join("status-page.png"));
    let shot = std::env::current_dir().unwrap().join("../..").join(shot);
    browse(
        &url,
        profile.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1000,1250",
        ],
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a rendered page, not a blank one: {} bytes",
        png.len()
    );
}
