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
        &["tenant", "archive", "set", "acme", "failed", "--retention", "2years", "--dry-run"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("the expiry of 2 archive(s) moves with it"), "{out}");
    assert_eq!(expiries().await, [None, None, None]);
    let (code, out, err) = cli(
        &db,
        &["tenant", "archive", "set", "acme", "failed", "--retention", "2years", "--deleted", "on"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("archived after the tenant is deleted too"), "{out}");
    assert_eq!(
        expiries().await,
        [Some("730 days 12:00:00".to_string()), Some("730 days 12:00:00".to_string()), None]
    );
    let (code, _, err) = cli(&db, &["tenant", "archive", "set", "acme", "failed", "--deleted", "maybe"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("allowed: on or off"), "{err}");
}
