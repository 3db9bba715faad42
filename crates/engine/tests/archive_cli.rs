//! `engine tenant archive get|set` and `engine archive list`: a policy set and read back, bad
//! values refused with what is allowed (changing nothing), the manifest listed.

mod common;

use common::*;
use testkit::TestDatabase;
use uuid::Uuid;

fn cli(db: &TestDatabase, args: &[&str]) -> (i32, String, String) {
    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    (output.status.code().unwrap_or(-1), stdout, stderr)
}

async fn stored(db: &TestDatabase, id: Uuid) -> (Option<Vec<String>>, Option<String>) {
    sqlx::query_as(
        "SELECT archive_statuses, archive_retention_period::text FROM tenants WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_policy_is_set_read_back_and_bad_values_change_nothing() {
    let db = TestDatabase::new().await;
    let id: Uuid =
        sqlx::query_scalar("INSERT INTO tenants (slug, name) VALUES ('acme', 'Acme') RETURNING id")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    // The default: off, kept a year once on.
    assert_eq!(stored(&db, id).await, (Some(vec![]), Some("1 year".into())));
    let (code, out, err) = cli(&db, &["tenant", "archive", "get", "acme"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "acme: archive off (archives kept 1year)");

    let (code, out, err) = cli(
        &db,
        &[
            "tenant",
            "archive",
            "set",
            "acme",
            "failed,cancelled",
            "--retention",
            "7years",
            "--dry-run",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("dry run: nothing changed"), "{out}");
    assert_eq!(stored(&db, id).await, (Some(vec![]), Some("1 year".into())));

    let (code, out, err) = cli(
        &db,
        &[
            "tenant",
            "archive",
            "set",
            "acme",
            "failed,cancelled",
            "--retention",
            "7years",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("to acme: archive failed,cancelled"), "{out}");
    assert_eq!(
        stored(&db, id).await,
        (
            Some(vec!["failed".into(), "cancelled".into()]),
            Some("61362:00:00".into())
        )
    );
    let (code, out, err) = cli(&db, &["tenant", "archive", "get", "acme", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["archive"], "failed,cancelled");
    assert_eq!(json["statuses"], serde_json::json!(["failed", "cancelled"]));

    for (args, needles) in [
        (
            vec!["running"],
            vec!["\"running\" is not a final status", "allowed: off, on"],
        ),
        (vec!["failed,failed"], vec!["named twice"]),
        (
            vec!["on", "--retention", "12h"],
            vec!["below 1 day", "1day to 100years"],
        ),
        (vec!["on", "--retention", "later"], vec!["not a duration"]),
    ] {
        let mut all = vec!["tenant", "archive", "set", "acme"];
        all.extend(args.iter().copied());
        let (code, _, err) = cli(&db, &all);
        assert_eq!(code, 2, "{args:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
        }
    }
    let (code, _, err) = cli(&db, &["tenant", "archive", "set", "nobody", "on"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no tenant with id or slug \"nobody\""),
        "{err}"
    );
    assert_eq!(
        stored(&db, id).await,
        (
            Some(vec!["failed".into(), "cancelled".into()]),
            Some("61362:00:00".into())
        ),
        "the refused changes changed nothing"
    );

    let (code, out, err) = cli(&db, &["tenant", "archive", "set", "acme", "off"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("to acme: archive off"), "{out}");
    assert_eq!(stored(&db, id).await.0, Some(vec![]));
}

#[tokio::test]
async fn the_manifest_lists_written_files_by_tenant_day_and_status() {
    let db = TestDatabase::new().await;
    let acme: Uuid =
        sqlx::query_scalar("INSERT INTO tenants (slug, name) VALUES ('acme', 'Acme') RETURNING id")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO retention_archives (object_key, store, tenant_id, status, first_at, first_task, last_at, last_task,
                                         run_id, part, state, tasks, bytes, sha256, schema_version, written_at)
         VALUES ('archive/a/2026-11-01/r-0.parquet', 'file:///x', $1, 'failed', '2026-11-01 10:00Z', gen_random_uuid(),
                 '2026-11-01 11:00Z', gen_random_uuid(), gen_random_uuid(), 0, 'written', 3, 900, 'aa', 1, now()),
                ('archive/a/2026-11-02/r-0.parquet', 'file:///x', $1, 'succeeded', '2026-11-02 10:00Z', gen_random_uuid(),
                 '2026-11-02 11:00Z', gen_random_uuid(), gen_random_uuid(), 0, 'written', 2, 800, 'bb', 1, now()),
                ('archive/a/2026-11-03/r-0.parquet', 'file:///x', $1, 'failed', '2026-11-03 10:00Z', gen_random_uuid(),
                 '2026-11-03 11:00Z', gen_random_uuid(), gen_random_uuid(), 0, 'writing', 4, NULL, NULL, 1, NULL)",
    )
    .bind(acme)
    .execute(&db.pool)
    .await
    .unwrap();
    let keys = |args: &[&str]| {
        let mut all = vec!["archive", "list", "--json"];
        all.extend(args);
        let (code, out, err) = cli(&db, &all);
        assert_eq!(code, 0, "{err}");
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        rows.iter()
            .map(|r| r["key"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // A file still being written is not an archive yet.
    assert_eq!(
        keys(&[]),
        [
            "archive/a/2026-11-01/r-0.parquet",
            "archive/a/2026-11-02/r-0.parquet"
        ]
    );
    assert_eq!(
        keys(&["--status", "failed"]),
        ["archive/a/2026-11-01/r-0.parquet"]
    );
    assert_eq!(
        keys(&["--since", "2026-11-02", "--tenant", "acme"]),
        ["archive/a/2026-11-02/r-0.parquet"]
    );
    // As an operator reads it: the runs counted, the size with its unit.
    let (code, out, err) = cli(&db, &["archive", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("acme  2026-11-01..2026-11-01  3 failed runs  900 B  expires "),
        "{out}"
    );
    assert!(
        out.contains("acme  2026-11-02..2026-11-02  2 succeeded runs  800 B  expires "),
        "{out}"
    );
    let (code, _, err) = cli(&db, &["archive", "list", "--since", "yesterday"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("allowed: a date, YYYY-MM-DD"), "{err}");
    let (code, _, err) = cli(&db, &["archive", "list", "--tenant", "nobody"]);
    assert_eq!(code, 2, "{err}");

    // A new retention moves the expiry of the written archives (not of the one being written;
    // a year is 365.25 days, as humantime counts it);
    // a dry run says so and moves nothing.
    let expiries = || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT (expires_at - written_at)::text FROM retention_archives ORDER BY object_key",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap()
    };
    assert_eq!(expiries().await, [None, None, None]);
    let (code, out, err) = cli(
        &db,
        &[
            "tenant",
            "archive",
            "set",
            "acme",
            "failed",
            "--retention",
            "2years",
            "--dry-run",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("the expiry of 2 archives moves with it"),
        "{out}"
    );
    assert_eq!(expiries().await, [None, None, None]);
    let (code, out, err) = cli(
        &db,
        &[
            "tenant",
            "archive",
            "set",
            "acme",
            "failed",
            "--retention",
            "2years",
            "--deleted",
            "on",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("archived after the tenant is deleted too"),
        "{out}"
    );
    assert_eq!(
        expiries().await,
        [
            Some("730 days 12:00:00".to_string()),
            Some("730 days 12:00:00".to_string()),
            None
        ]
    );
    let (code, _, err) = cli(
        &db,
        &[
            "tenant",
            "archive",
            "set",
            "acme",
            "failed",
            "--deleted",
            "maybe",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("allowed: on or off"), "{err}");
}

/// `engine archive restore`: a tenant's runs archived and deleted by a real `engine retention
/// run`, loaded back into a schema of the operator's choosing, exactly those runs with their
/// events and log lines, the same after a second restore; the live schema and bad values refused.
#[tokio::test]
async fn archived_runs_restore_into_a_schema_of_their_own() {
    let db = TestDatabase::new().await;
    let dir = tempfile::tempdir().unwrap();
    let objects = format!("file://{}", dir.path().join("objects").display());
    let run = |args: &[&str]| {
        let output = engine()
            .env("DATABASE_URL", &db.url)
            .env("ENGINE__STORAGE__URL", &objects)
            .args(args)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        (output.status.code().unwrap_or(-1), stdout, stderr)
    };
    let acme: Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (slug, name, data_retention_period, archive_statuses)
         VALUES ('acme', 'Acme', '2 days', '{failed}') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // Five failed runs three days old (archived, then deleted), two a day old (kept), two
    // succeeded three days old (deleted without an archive).
    let old: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'failed', now() - interval '3 days' - n * interval '1 minute', now() - interval '3 days'
           FROM generate_series(1, 5) n RETURNING id",
    )
    .bind(acme)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, s, now() - interval '3 days', now() - d
           FROM (VALUES ('failed', interval '1 day'), ('failed', interval '1 day'),
                        ('succeeded', interval '3 days'), ('succeeded', interval '3 days')) v(s, d)",
    )
    .bind(acme)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO task_events (task_id, task_inserted_at, tenant_id, event_type, created_at)
         SELECT t.id, t.inserted_at, t.tenant_id, e, t.finished_at FROM tasks t, unnest(ARRAY['started', 'failed']) e
          WHERE t.id = ANY($1)",
    )
    .bind(&old)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO task_logs (tenant_id, task_id, task_inserted_at, level, line)
         SELECT t.tenant_id, t.id, t.inserted_at, 'error', 'card declined' FROM tasks t WHERE t.id = ANY($1)",
    )
    .bind(&old)
    .execute(&db.pool)
    .await
    .unwrap();
    let day: chrono::NaiveDate =
        sqlx::query_scalar("SELECT ((now() - interval '3 days') AT TIME ZONE 'UTC')::date")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let day = day.to_string();

    let (code, _, err) = run(&["retention", "run", "--task", "task-history"]);
    assert_eq!(code, 0, "{err}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 2, "the archived and the succeeded runs went");
    // What an operator sees.
    let (code, out, err) = run(&["retention", "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("archives: 1 tenant archives; 1 file (5 runs, "),
        "{out}"
    );
    let (code, out, err) = run(&["retention", "status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let history: serde_json::Value = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["task"] == "task-history")
        .expect("a line for task-history");
    assert_eq!(history["archives"]["files"], 1, "{history}");
    assert_eq!(history["archives"]["tasks"], 5, "{history}");
    let (code, out, err) = run(&["retention", "receipts", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("\"archived\""),
        "the run's receipt of what it archived: {out}"
    );

    for _ in 0..2 {
        let (code, out, err) = run(&[
            "archive",
            "restore",
            "--tenant",
            "acme",
            "--from",
            &day,
            "--to",
            &day,
            "--into",
            "restored_acme",
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("restored 5 runs of acme (10 events, 0 payloads, 5 log lines) from 1 archive file into schema restored_acme"),
            "{out}"
        );
    }
    let mut restored: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM restored_acme.tasks")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    restored.sort();
    let mut expected = old.clone();
    expected.sort();
    assert_eq!(restored, expected);
    let (events, logs, keys): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM restored_acme.task_events), (SELECT count(*) FROM restored_acme.task_logs),
                (SELECT count(DISTINCT archive_key) FROM restored_acme.tasks)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((events, logs, keys), (10, 5, 1));

    // Refused, changing nothing: the live schema, a schema on the search path or named after a
    // role, one holding tables a restore did not make, a name that is not an identifier, days
    // the wrong way round, an unknown tenant.
    for statement in [
        "CREATE SCHEMA reports",
        "CREATE TABLE reports.monthly (n int)",
    ] {
        sqlx::query(statement).execute(&db.pool).await.unwrap();
    }
    sqlx::query("CREATE ROLE analyst NOLOGIN")
        .execute(&db.pool)
        .await
        .unwrap();
    for (from, to, into, says) in [
        (
            day.as_str(),
            day.as_str(),
            "reports",
            "it holds tables a restore did not make",
        ),
        (day.as_str(), day.as_str(), "analyst", "named after a role"),
        (
            day.as_str(),
            day.as_str(),
            "public",
            "invalid --into \"public\"",
        ),
        (
            day.as_str(),
            day.as_str(),
            "Robert'); DROP",
            "not a plain lower-case identifier",
        ),
        (
            "2026-11-02",
            "2026-11-01",
            "x",
            "invalid --from 2026-11-02 after --to 2026-11-01",
        ),
        (
            "yesterday",
            day.as_str(),
            "x",
            "invalid --from \"yesterday\"",
        ),
    ] {
        let all = [
            "archive", "restore", "--tenant", "acme", "--from", from, "--to", to, "--into", into,
        ];
        let (code, _, err) = run(&all);
        assert_eq!(code, 2, "{all:?}: {err}");
        assert!(err.contains(says), "{all:?}: {err}");
    }
    let (code, _, err) = run(&[
        "archive", "restore", "--tenant", "nobody", "--from", &day, "--to", &day, "--into", "x",
    ]);
    assert_eq!(code, 2, "{err}");
    let schemas: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'x'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(schemas, 0, "a refused restore creates nothing");
}

/// The admin API's `GET|PUT /api/v1/tenants/{id}/archive`: the policy read, changed (and in a
/// dry run, shown as it would be, changing nothing), bad values refused with what is allowed,
/// changing nothing.
#[tokio::test]
async fn the_admin_api_reads_and_sets_the_archive_policy() {
    const TOKEN: &str = "test-admin-token-0123456789";
    let db = TestDatabase::new().await;
    let id: Uuid =
        sqlx::query_scalar("INSERT INTO tenants (slug, name) VALUES ('acme', 'Acme') RETURNING id")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let served = Served::start(&db.url, &[("ENGINE__HTTP__ADMIN_TOKEN", TOKEN)]);
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let path = format!("/api/v1/tenants/{id}/archive");

    let (status, body) = http(served.port, "GET", &path, &auth, None).unwrap();
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["archive"], "off");
    assert_eq!(json["archive_retention_period"], "1year");
    assert_eq!(json["archive_deleted"], false);

    let change = r#"{"archive": "failed,cancelled", "archive_retention_period": "forever"}"#;
    let (status, body) = http(
        served.port,
        "PUT",
        &format!("{path}?dry_run=true"),
        &auth,
        Some(change),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["tenant"]["archive"], "failed,cancelled");
    assert_eq!(stored(&db, id).await, (Some(vec![]), Some("1 year".into())));

    let (status, body) = http(
        served.port,
        "PUT",
        "/api/v1/tenants/acme/archive",
        &auth,
        Some(change),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        stored(&db, id).await,
        (
            Some(vec!["failed".to_string(), "cancelled".to_string()]),
            None
        )
    );

    for (body, says) in [
        (r#"{"archive": "sometimes"}"#, "allowed: off, on"),
        (r#"{"archive_retention_period": "2h"}"#, "it is below 1 day"),
        (
            r#"{"archive_deleted": "yes"}"#,
            "archive_deleted is a string, not true or false",
        ),
        (r#"{}"#, "the body names no key"),
        (r#"{"archive": "on", "window": "1d"}"#, "unknown key"),
    ] {
        let (status, answer) = http(served.port, "PUT", &path, &auth, Some(body)).unwrap();
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains(says), "{body}: {answer}");
    }
    let (status, _) = http(
        served.port,
        "PUT",
        "/api/v1/tenants/nobody/archive",
        &auth,
        Some(change),
    )
    .unwrap();
    assert_eq!(status, 404);
    let (status, _) = http(served.port, "GET", &path, &[], None).unwrap();
    assert_eq!(status, 401);
    assert_eq!(
        stored(&db, id).await,
        (
            Some(vec!["failed".to_string(), "cancelled".to_string()]),
            None
        ),
        "refused requests changed nothing"
    );
}
