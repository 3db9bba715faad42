//! Status windows, previews, holds and receipts over the CLI and the admin API: the shapes, who is
//! recorded, and refusals that change nothing.

mod common;

use common::*;
use testkit::TestDatabase;

const TOKEN: &str = "test-admin-token-0123456789";

async fn tenant(db: &TestDatabase, slug: &str) -> uuid::Uuid {
    sqlx::query_scalar("INSERT INTO tenants (id, slug, name, data_retention_period) VALUES (gen_random_uuid(), $1, $1, '7 days') RETURNING id")
        .bind(slug)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

fn run(db: &TestDatabase, args: &[&str]) -> (i32, String, String) {
    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    (output.status.code().unwrap_or(-1), stdout, stderr)
}

async fn finished(
    db: &TestDatabase,
    tenant: uuid::Uuid,
    status: &str,
    days_ago: i32,
) -> uuid::Uuid {
    sqlx::query_scalar(
        "WITH t AS (INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
                    VALUES ($1, $2, now() - make_interval(days => $3), now() - make_interval(days => $3)) RETURNING id, inserted_at),
              e AS (INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type) SELECT $1, id, inserted_at, 'done' FROM t)
         SELECT id FROM t",
    )
    .bind(tenant)
    .bind(status)
    .bind(days_ago)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_cli_sets_status_windows_previews_holds_and_shows_receipts() {
    let db = TestDatabase::new().await;
    let id = tenant(&db, "acme").await;
    finished(&db, id, "failed", 10).await;
    finished(&db, id, "failed", 40).await;
    let held = finished(&db, id, "succeeded", 10).await;

    let (code, stdout, stderr) = run(
        &db,
        &[
            "tenant",
            "retention",
            "set",
            "acme",
            "30days",
            "--status",
            "failed",
            "--dry-run",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("dry run, nothing changed")
            && stdout.contains("would delete 2 tasks (succeeded 1, failed 1) and 2 events"),
        "{stdout}"
    );
    assert!(
        run(&db, &["tenant", "retention", "get", "acme"])
            .1
            .trim()
            .ends_with("data_retention_period = 7days, log_retention_period = default"),
        "the dry run changed nothing"
    );

    let (code, stdout, _) = run(
        &db,
        &[
            "tenant",
            "retention",
            "set",
            "acme",
            "30days",
            "--status",
            "failed",
        ],
    );
    assert_eq!(code, 0);
    assert!(stdout.contains("failed default -> 30days"), "{stdout}");
    let (_, stdout, _) = run(&db, &["tenant", "retention", "get", "acme", "--json"]);
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(json["by_status"], serde_json::json!({"failed": "30days"}));
    assert_eq!(
        json["effective"],
        serde_json::json!({"succeeded": "7days", "failed": "30days", "cancelled": "7days"})
    );

    let (code, stdout, stderr) = run(
        &db,
        &[
            "hold",
            "add",
            "--tenant",
            "acme",
            "--task",
            &held.to_string(),
            "--reason",
            "incident 7781",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("hold 1: ")
            && stdout.contains("in force")
            && stdout.contains("by cli: incident 7781"),
        "{stdout}"
    );
    let (code, _, _) = run(&db, &["retention", "run", "--task", "task-history"]);
    assert_eq!(code, 0);
    let left: Vec<(String, i32)> = sqlx::query_as(
        "SELECT status, extract(day FROM now() - finished_at)::int FROM tasks ORDER BY 1, 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        left,
        vec![("failed".to_string(), 10), ("succeeded".to_string(), 10)],
        "the held task and the failed one in its window stay"
    );

    let (code, stdout, _) = run(
        &db,
        &["retention", "receipts", "--tenant", "acme", "--json"],
    );
    assert_eq!(code, 0);
    let receipts: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(receipts.len(), 1, "{stdout}");
    assert_eq!(
        (
            receipts[0]["rule"].as_str(),
            receipts[0]["tasks"].as_i64(),
            receipts[0]["events"].as_i64()
        ),
        (Some("retention"), Some(1), Some(1))
    );

    let (code, stdout, _) = run(&db, &["hold", "remove", "1", "--reason", "closed"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("removed") && stdout.contains("by cli (closed)"),
        "{stdout}"
    );
    assert_eq!(run(&db, &["hold", "list"]).1.trim(), "no holds");
    assert!(run(&db, &["hold", "list", "--all"]).1.contains("hold 1:"));
}

#[tokio::test]
async fn the_cli_refuses_bad_holds_statuses_and_instants() {
    let db = TestDatabase::new().await;
    tenant(&db, "acme").await;
    for (args, message) in [
        (
            &["hold", "add", "--tenant", "nope", "--reason", "x"][..],
            "no tenant with id or slug \"nope\"",
        ),
        (
            &[
                "hold", "add", "--tenant", "acme", "--reason", "x", "--task", "12",
            ],
            "invalid task id \"12\"",
        ),
        (
            &[
                "hold",
                "add",
                "--tenant",
                "acme",
                "--reason",
                "x",
                "--task",
                "0193a0c4-0000-7000-8000-000000000000",
            ],
            "has no task with id",
        ),
        (
            &[
                "hold",
                "add",
                "--tenant",
                "acme",
                "--reason",
                "x",
                "--until",
                "2001-01-01",
            ],
            "is not in the future",
        ),
        (
            &[
                "hold", "add", "--tenant", "acme", "--reason", "x", "--until", "soon",
            ],
            "invalid until \"soon\"",
        ),
        (&["hold", "remove", "7"], "no hold with id 7"),
        (
            &["tenant", "retention", "set", "acme", "default"],
            "only a status's window can go back to the default",
        ),
        (
            &["retention", "receipts", "--since", "yesterday"],
            "invalid --since \"yesterday\"",
        ),
    ] {
        let (code, _, stderr) = run(&db, args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let holds: i64 = sqlx::query_scalar("SELECT count(*) FROM retention_holds")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(holds, 0);
}

#[tokio::test]
async fn the_api_sets_windows_by_status_previews_and_manages_holds() {
    let db = TestDatabase::new().await;
    let id = tenant(&db, "acme").await;
    finished(&db, id, "failed", 10).await;
    let served = Served::start(
        &db.url,
        &[
            ("ENGINE__HTTP__ADMIN_TOKEN", TOKEN),
            ("ENGINE__HTTP__ADMIN_TOKEN_NAME", "ops-bot"),
        ],
    );
    let value = format!("Bearer {TOKEN}");
    let auth = [("Authorization", value.as_str())];
    let path = "/api/v1/tenants/acme/retention";

    let body = r#"{"data_retention_period": "3days", "by_status": {"failed": "30days"}}"#;
    let (status, preview) = http(
        served.port,
        "PUT",
        &format!("{path}?dry_run=true"),
        &auth,
        Some(body),
    )
    .unwrap();
    assert_eq!(status, 200, "{preview}");
    let preview: serde_json::Value = serde_json::from_str(&preview).unwrap();
    assert_eq!(
        preview["would_delete"],
        serde_json::json!({"tasks": {}, "events": 0})
    );
    let (status, preview) = http(
        served.port,
        "PUT",
        &format!("{path}?dry_run=true"),
        &auth,
        Some(r#"{"by_status": {"failed": "2days"}}"#),
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&preview).unwrap()["would_delete"],
        serde_json::json!({"tasks": {"failed": 1}, "events": 1})
    );
    let (_, now) = http(served.port, "GET", path, &auth, None).unwrap();
    assert!(
        now.contains(r#""by_status":{}"#) && now.contains(r#""data_retention_period":"7days""#),
        "dry runs changed nothing: {now}"
    );

    let (status, set) = http(served.port, "PUT", path, &auth, Some(body)).unwrap();
    assert_eq!(status, 200, "{set}");
    let set: serde_json::Value = serde_json::from_str(&set).unwrap();
    assert_eq!(
        (
            set["data_retention_period"].as_str(),
            set["by_status"]["failed"].as_str()
        ),
        (Some("3days"), Some("30days"))
    );
    // A client that knows only data_retention_period leaves the status windows alone.
    let (_, set) = http(
        served.port,
        "PUT",
        path,
        &auth,
        Some(r#"{"data_retention_period": "5days"}"#),
    )
    .unwrap();
    assert!(set.contains(r#""by_status":{"failed":"30days"}"#), "{set}");
    for bad in [
        r#"{"by_status": {"done": "1day"}}"#,
        r#"{"by_status": {"failed": "5m"}}"#,
        r#"{"by_status": {"failed": 3}}"#,
        r#"{"by_status": []}"#,
    ] {
        let (status, body) = http(served.port, "PUT", path, &auth, Some(bad)).unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
    }

    let (status, hold) = http(
        served.port,
        "POST",
        "/api/v1/holds",
        &auth,
        Some(r#"{"tenant": "acme", "reason": "audit"}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{hold}");
    let hold: serde_json::Value = serde_json::from_str(&hold).unwrap();
    assert_eq!(
        (
            hold["created_by"].as_str(),
            hold["active"].as_bool(),
            hold["task_id"].is_null()
        ),
        (Some("ops-bot"), Some(true), true)
    );
    for (bad, expected) in [
        (r#"{"tenant": "nope", "reason": "x"}"#, 404),
        (r#"{"tenant": "acme", "reason": ""}"#, 400),
        (
            r#"{"tenant": "acme", "reason": "x", "until": "2001-01-01"}"#,
            400,
        ),
        (r#"{"tenant": "acme"}"#, 400),
    ] {
        let (status, body) = http(served.port, "POST", "/api/v1/holds", &auth, Some(bad)).unwrap();
        assert_eq!(status, expected, "{bad}: {body}");
    }
    let (_, list) = http(served.port, "GET", "/api/v1/holds?tenant=acme", &auth, None).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).unwrap()["holds"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let hold_path = format!("/api/v1/holds/{}?reason=done", hold["id"]);
    let (status, removed) = http(served.port, "DELETE", &hold_path, &auth, None).unwrap();
    assert_eq!(status, 200, "{removed}");
    assert!(
        removed.contains(r#""removed_by":"ops-bot""#)
            && removed.contains(r#""removed_reason":"done""#),
        "{removed}"
    );
    let (status, _) = http(served.port, "DELETE", &hold_path, &auth, None).unwrap();
    assert_eq!(status, 409);
    let (status, receipts) = http(
        served.port,
        "GET",
        "/api/v1/receipts?tenant=acme",
        &auth,
        None,
    )
    .unwrap();
    assert_eq!((status, receipts.as_str()), (200, r#"{"receipts":[]}"#));
}
