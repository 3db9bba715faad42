//! A rewrite killed between its swap's commit and its count: the engine is SIGKILLed once the
//! swap has committed (the sources detached, nothing counted yet), and the next run counts the
//! detached sources and writes the receipts the first run owed, exactly: they match a ledger kept
//! outside the engine, queue items included, and nothing is counted twice.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use testkit::TestDatabase;
use uuid::Uuid;

#[test]
fn a_rewrite_killed_before_its_count_is_counted_by_the_next_run_exactly() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDatabase::new());
    let pool = db.pool.clone();
    // A past day that keeps little: 20,000 due tasks of two tenants, 500 kept; each task with an
    // event and a queue item.
    let (due_a, due_b, kept) = rt.block_on(async {
        let mut ids = Vec::new();
        for period in [Some("1 day"), Some("2 days"), None] {
            let id: Uuid = sqlx::query_scalar("INSERT INTO tenants (slug, name, data_retention_period) VALUES ($1, $1, $2::interval) RETURNING id")
                .bind(format!("t-{}", Uuid::new_v4()))
                .bind(period)
                .fetch_one(&pool)
                .await
                .unwrap();
            ids.push(id);
        }
        let day = chrono::Utc::now().date_naive() - chrono::Duration::days(10);
        let mut tx = pool.begin().await.unwrap();
        repository::history::ranges::take_layout_lock(&mut tx, true).await.unwrap();
        repository::history::ranges::extend_back(&mut tx, day, Duration::from_secs(5)).await.unwrap();
        tx.commit().await.unwrap();
        let at = repository::history::ranges::day_start(day) + chrono::Duration::hours(6);
        for (tenant, n) in [(ids[0], 12_000i64), (ids[1], 8_000), (ids[2], 500)] {
            sqlx::query(
                "WITH t AS (INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
                            SELECT $1, 'succeeded', $2, $2 + interval '1 hour' FROM generate_series(1, $3) RETURNING id, inserted_at),
                      e AS (INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
                            SELECT $1, id, inserted_at, 'done', inserted_at FROM t)
                 INSERT INTO queue_items (tenant_id, task_id, task_inserted_at) SELECT $1, id, inserted_at FROM t",
            )
            .bind(tenant)
            .bind(at)
            .bind(n)
            .execute(&pool)
            .await
            .unwrap();
        }
        (ids[0], ids[1], ids[2])
    });

    // Paced (a pause of 40 times each step after it, the swap included): the kill lands in the
    // pause after the swap.
    let mut run = engine()
        .env("DATABASE_URL", &db.url)
        .env("ENGINE__RETENTION__PACING__FEEDBACK", "false")
        .args(["retention", "run", "--task", "task-history", "--pace", "40"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let phase = || {
        rt.block_on(
            sqlx::query_as::<_, (String, i64)>("SELECT phase, block FROM history_rewrites")
                .fetch_optional(&pool),
        )
        .unwrap()
    };
    wait_until(
        "the swap to commit",
        Duration::from_secs(120),
        || matches!(phase(), Some((p, _)) if p == "count-tasks"),
    );
    run.kill().unwrap();
    run.wait().unwrap();
    let (killed_in, counted_pages) = phase().expect("the rewrite is still recorded");
    assert_eq!(
        (killed_in.as_str(), counted_pages),
        ("count-tasks", 0),
        "killed after the swap, before its count"
    );
    let receipts = |rt: &tokio::runtime::Runtime| -> BTreeMap<Uuid, (i64, i64, i64)> {
        rt.block_on(
            sqlx::query_as::<_, (Uuid, i64, i64, i64)>(
                "SELECT tenant_id, sum(tasks)::bigint, sum(events)::bigint, sum(queue_items)::bigint FROM retention_receipts GROUP BY 1",
            )
            .fetch_all(&pool),
        )
        .unwrap()
        .into_iter()
        .map(|(t, a, b, c)| (t, (a, b, c)))
        .collect()
    };
    assert!(
        receipts(&rt).is_empty(),
        "nothing was counted before the kill"
    );
    let detached: i64 = rt
        .block_on(sqlx::query_scalar("SELECT count(*) FROM history_detached").fetch_one(&pool))
        .unwrap();
    assert_eq!(detached, 2, "the detached sources wait for their count");

    // The next run counts them.
    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "run", "--task", "task-history"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let left = |tenant: Uuid| -> i64 {
        rt.block_on(
            sqlx::query_scalar("SELECT count(*) FROM tasks WHERE tenant_id = $1")
                .bind(tenant)
                .fetch_one(&pool),
        )
        .unwrap()
    };
    assert_eq!((left(due_a), left(due_b), left(kept)), (0, 0, 500));
    assert_eq!(
        receipts(&rt),
        BTreeMap::from([
            (due_a, (12_000, 12_000, 12_000)),
            (due_b, (8_000, 8_000, 8_000))
        ]),
        "the receipts of what the killed run removed, each row once"
    );
    let items: i64 = rt
        .block_on(sqlx::query_scalar("SELECT count(*) FROM queue_items").fetch_one(&pool))
        .unwrap();
    assert_eq!(items, 500);
    let (rewrites, detached): (i64, i64) = rt
        .block_on(sqlx::query_as("SELECT (SELECT count(*) FROM history_rewrites), (SELECT count(*) FROM history_detached)").fetch_one(&pool))
        .unwrap();
    assert_eq!((rewrites, detached), (0, 0), "counted, dropped, forgotten");
    let run_ids: i64 = rt
        .block_on(
            sqlx::query_scalar("SELECT count(DISTINCT run_id) FROM retention_receipts")
                .fetch_one(&pool),
        )
        .unwrap();
    assert_eq!(run_ids, 1, "under the run that removed the rows");
}
