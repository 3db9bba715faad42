//! What `engine serve` tells an operator: `/metrics` after a purge, and `/readyz` through a
//! database outage, from outside the process.

mod common;

use std::time::Duration;

use common::*;
use sqlx::{Connection, Executor};
use testkit::TestDatabase;

/// The sum of the metric lines named `name` whose labels include every one of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of the one metric line named `name` whose labels include every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn metrics_count_what_the_runs_did_and_readyz_follows_the_database() {
    let db = TestDatabase::new().await;
    sqlx::query(
        "INSERT INTO user_sessions (user_id, created_at, expires_at)
         SELECT NULL, now() - interval '2 days', now() + interval '28 days' FROM generate_series(1, 7)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // A tenant keeping a day of history: three tasks are past it, two are not.
    let tenant: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (slug, name, data_retention_period) VALUES ('acme', 'Acme', '1 day') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'succeeded', now() - g * interval '1 hour', now() - g * interval '1 hour' FROM unnest(array[1, 2, 30, 31, 32]) g",
    )
    .bind(tenant)
    .execute(&db.pool)
    .await
    .unwrap();
    // And a past day of its history, wholly due and large enough that rewriting it (keeping
    // nothing) costs less than deleting its rows one by one: it leaves whole.
    let day = chrono::Utc::now().date_naive() - chrono::Duration::days(10);
    let mut tx = db.pool.begin().await.unwrap();
    repository::history::ranges::take_layout_lock(&mut tx, true)
        .await
        .unwrap();
    repository::history::ranges::extend_back(&mut tx, day, Duration::from_secs(5))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'succeeded', $2::date + interval '12 hours', $2::date + interval '13 hours' FROM generate_series(1, 5000)",
    )
    .bind(tenant)
    .bind(day)
    .execute(&db.pool)
    .await
    .unwrap();
    let served = Served::start(
        &db.url,
        &[
            ("ENGINE__RETENTION__SESSIONS__INTERVAL", "1s"),
            ("ENGINE__RETENTION__TASK_HISTORY__INTERVAL", "1s"),
            ("ENGINE__RETENTION__PARTITIONS__INTERVAL", "1s"),
            // Tenant ids on /metrics only when asked for (the default names none).
            ("ENGINE__METRICS__TENANT_SERIES", "5"),
        ],
    );
    let get = |path: &str| http(served.port, "GET", path, &[], None).unwrap_or((0, String::new()));

    // A run that leaves nothing due sets the estimate to 0 as it ends.
    wait_until("the sessions run", Duration::from_secs(30), || {
        let text = get("/metrics").1;
        metric(
            &text,
            "retention_runs_total",
            &["task=\"sessions\"", "outcome=\"done\""],
        )
        .is_some_and(|n| n >= 1.0)
            && metric(&text, "retention_rows_due", &["task=\"sessions\""]) == Some(0.0)
    });
    let (status, text) = get("/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        metric(
            &text,
            "retention_rows_deleted_total",
            &["task=\"sessions\"", "rule=\"anonymous\""]
        ),
        Some(7.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "retention_last_success_timestamp_seconds",
            &["task=\"sessions\""]
        )
        .is_some_and(|t| t > 1.7e9),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "retention_run_duration_seconds_count",
            &["task=\"sessions\""]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(text.contains("retention_lease_held{"), "{text}");
    // The schedule the alert on a task with no recent success measures against.
    assert_eq!(
        metric(
            &text,
            "retention_task_interval_seconds",
            &["task=\"sessions\""]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "retention_task_max_run_time_seconds",
            &["task=\"sessions\""]
        ),
        Some(600.0),
        "{text}"
    );
    // Counters alerts take increase() of exist from the start, at 0.
    assert_eq!(
        metric(
            &text,
            "retention_clock_refusals_total",
            &["reason=\"jumped\""]
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "retention_runs_total",
            &["task=\"sessions\"", "outcome=\"failed\""]
        ),
        Some(0.0),
        "{text}"
    );
    // The replica label is the host's name, the same after a restart (not `host:pid`).
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    for line in text
        .lines()
        .filter(|l| l.starts_with("retention_lease_held{"))
    {
        assert!(line.contains(&format!("replica=\"{host}\"")), "{line}");
    }
    assert!(
        metric(
            &text,
            "retention_runs_total",
            &["task=\"sessions\"", "outcome=\"done\""]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    // The day goes whole, by whichever history task gets to it first: `task-history` compacts
    // it, or `partitions` merges it with its neighbours (every window is a day, so it is cold).
    let tenant_label = format!("tenant=\"{tenant}\"");
    wait_until("the history tasks' runs", Duration::from_secs(30), || {
        metric_sum(
            &get("/metrics").1,
            "retention_tenant_rows_deleted_total",
            &[&tenant_label],
        ) == 5003.0
    });
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE tenant_id = $1")
        .bind(tenant)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 2, "the two tasks within the day stay");
    wait_until(
        "the past day to leave whole, not row by row",
        Duration::from_secs(30),
        || {
            metric_sum(
                &get("/metrics").1,
                "retention_partitions_dropped_total",
                &[],
            ) >= 1.0
        },
    );
    let text = get("/metrics").1;
    assert!(
        metric_sum(&text, "retention_history_lock_seconds_count", &[]) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(
            &text,
            "retention_rows_deleted_total",
            &["task=\"task-history\"", "rule=\"retention\""]
        ) + metric_sum(
            &text,
            "retention_rows_deleted_total",
            &["task=\"partitions\"", "rule=\"tasks\""]
        ),
        5003.0,
        "{text}"
    );
    assert_eq!(get("/readyz").0, 200);
    // Every metric family carries its HELP text (what `promtool check metrics` asks for).
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    assert!(families.len() >= 9, "{text}");
    for family in families {
        let help = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# HELP {family} ")))
            .unwrap_or_default();
        assert!(help.len() > 20, "{family} has no HELP: {text}");
    }

    // The database goes away (connections refused, every session cut), then comes back.
    // From another database of the server: a database cannot shut itself out.
    let name = db.name().to_string();
    let mut admin =
        sqlx::PgConnection::connect(&db.url.replacen(&format!("/{name}"), "/postgres", 1))
            .await
            .unwrap();
    admin
        .execute(format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false").as_str())
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&mut admin)
        .await
        .unwrap();
    wait_until(
        "/readyz to report the outage",
        Duration::from_secs(20),
        || get("/readyz").0 == 503,
    );
    let (_, body) = get("/readyz");
    assert!(body.contains("the database"), "{body}");
    assert_eq!(
        get("/healthz").0,
        200,
        "liveness does not depend on the database"
    );

    admin
        .execute(format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true").as_str())
        .await
        .unwrap();
    wait_until("/readyz to recover", Duration::from_secs(20), || {
        get("/readyz").0 == 200
    });
    // And the tasks carry on without a restart: a new due row goes.
    drop(admin);
    sqlx::query("INSERT INTO user_sessions (user_id, created_at, expires_at) VALUES (NULL, now(), now() - interval '1 minute')")
        .execute(&db.pool)
        .await
        .unwrap();
    wait_until(
        "the next sessions run after the outage",
        Duration::from_secs(60),
        || {
            metric(
                &get("/metrics").1,
                "retention_rows_deleted_total",
                &["task=\"sessions\"", "rule=\"expired\""],
            )
            .is_some_and(|n| n >= 1.0)
        },
    );
}

/// `retention_last_success_timestamp_seconds` exists from the start: the run log's last success
/// (any replica's, before a restart), or the start itself for a task that never succeeded, so
/// the alert on it (RetentionNoRecentSuccess) measures across restarts and catches a task that
/// never starts.
#[tokio::test]
async fn the_last_success_gauge_starts_from_the_run_log() {
    let db = TestDatabase::new().await;
    // Every task paused: no run of this server moves the gauges.
    for task in [
        "sessions",
        "queue-items",
        "task-history",
        "partitions",
        "blobs",
    ] {
        repository::maintenance::set_paused(&db.pool, task, true)
            .await
            .unwrap();
    }
    sqlx::query(
        "UPDATE maintenance_tasks SET last_success_at = '2026-11-30T12:00:00Z' WHERE task = 'sessions'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let served = Served::start(&db.url, &[]);
    let mut text = String::new();
    wait_until("the gauges to be set", Duration::from_secs(20), || {
        text = http(served.port, "GET", "/metrics", &[], None)
            .map(|(_, body)| body)
            .unwrap_or_default();
        metric(
            &text,
            "retention_last_success_timestamp_seconds",
            &["task=\"blobs\""],
        )
        .is_some()
    });
    let last = |task: &str| {
        metric(
            &text,
            "retention_last_success_timestamp_seconds",
            &[&format!("task=\"{task}\"")],
        )
    };
    // 2026-11-30T12:00:00Z
    assert_eq!(last("sessions"), Some(1_796_040_000.0), "{text}");
    for task in ["queue-items", "task-history", "partitions", "blobs"] {
        let at = last(task).unwrap_or_else(|| panic!("no gauge for {task}: {text}"));
        assert!(
            at >= before.floor() - 1.0 && at <= before + 60.0,
            "{task}: {at} against a start at {before}"
        );
    }
}

#[tokio::test]
async fn the_blobs_metrics_show_objects_deleted_the_outbox_and_orphans() {
    let db = TestDatabase::new().await;
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let tenant: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO tenants (slug, name) VALUES ('acme', 'Acme') RETURNING id")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // Ten objects: six whose payload rows went (their keys in the outbox), four that no row
    // names (writers that died between the object and its row).
    let keys: Vec<String> = (0..10)
        .map(|i| format!("payloads/{tenant}/2026-11-01/{i}"))
        .collect();
    for key in &keys {
        let path = objects.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"bytes").unwrap();
    }
    sqlx::query(
        "INSERT INTO object_deletions (object_key, tenant_id, payload_id, task_inserted_at, size_bytes)
         SELECT k, $2, 0, '2026-11-01', 5 FROM unnest($1::text[]) k",
    )
    .bind(keys[..6].to_vec())
    .bind(tenant)
    .execute(&db.pool)
    .await
    .unwrap();
    // Older than the sweep's grace.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let url = format!("file://{}", objects.display());
    let served = Served::start(
        &db.url,
        &[
            ("ENGINE__STORAGE__URL", url.as_str()),
            ("ENGINE__STORAGE__ORPHAN_GRACE", "1s"),
            ("ENGINE__STORAGE__SWEEP_DRY_RUN", "true"),
            ("ENGINE__RETENTION__BLOBS__INTERVAL", "1s"),
        ],
    );
    let get = || {
        http(served.port, "GET", "/metrics", &[], None)
            .map(|(_, text)| text)
            .unwrap_or_default()
    };
    wait_until("the blobs run's metrics", Duration::from_secs(30), || {
        let text = get();
        metric(
            &text,
            "retention_objects_deleted_total",
            &["source=\"outbox\""],
        ) == Some(6.0)
            && metric(&text, "retention_outbox_entries", &[]) == Some(0.0)
            && metric(&text, "retention_orphan_objects", &[]) == Some(4.0)
    });
    let text = get();
    assert_eq!(
        metric(&text, "retention_outbox_oldest_age_seconds", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "retention_object_delete_failures_total", &[]),
        Some(0.0),
        "{text}"
    );
    // The dry sweep deleted nothing: the orphans are still there.
    let left = std::fs::read_dir(objects.join(format!("payloads/{tenant}/2026-11-01")))
        .unwrap()
        .count();
    assert_eq!(left, 4);
}
