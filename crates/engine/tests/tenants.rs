//! Tenant retention settings over the CLI and the admin API: reading, changing, validation,
//! authentication and unknown tenants. A refused change changes nothing.

mod common;

use common::*;
use testkit::TestDatabase;
use uuid::Uuid;

const TOKEN: &str = "test-admin-token-0123456789";

async fn tenant(db: &TestDatabase, slug: &str) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO tenants (id, slug, name) VALUES (gen_random_uuid(), $1, $1) RETURNING id",
    )
    .bind(slug)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// The stored period as PostgreSQL prints it, or "NULL".
async fn stored(db: &TestDatabase, id: Uuid) -> String {
    sqlx::query_scalar(
        "SELECT coalesce(data_retention_period::text, 'NULL') FROM tenants WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

fn cli(db: &TestDatabase, args: &[&str]) -> (i32, String, String) {
    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["tenant", "retention"])
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    (output.status.code().unwrap_or(-1), stdout, stderr)
}

const BAD_VALUES: [(&str, &str); 6] = [
    ("soon", "not a duration"),
    ("", "it is empty"),
    ("0s", "it is zero"),
    ("-1h", "it is negative"),
    ("59m", "it is below 1 hour"),
    ("101years", "it is above 100 years"),
];

#[tokio::test]
async fn the_cli_reads_and_changes_retention_by_slug_or_id() {
    let db = TestDatabase::new().await;
    let id = tenant(&db, "acme").await;

    let (code, stdout, _) = cli(&db, &["get", "acme"]);
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        format!(
            "tenant acme ({id}): data_retention_period = 30days, log_retention_period = default"
        )
    );

    let (code, stdout, _) = cli(&db, &["set", &id.to_string(), "7days"]);
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), format!("tenant acme ({id}): data_retention_period 30days -> 7days (applies at the next task-history run)"));
    assert_eq!(stored(&db, id).await, "168:00:00");

    let (code, _, _) = cli(&db, &["set", "acme", "forever"]);
    assert_eq!(code, 0);
    assert_eq!(stored(&db, id).await, "NULL");
    assert!(cli(&db, &["get", "acme"])
        .1
        .contains("data_retention_period = forever"));
}

#[tokio::test]
async fn the_cli_sets_the_log_window_previews_it_and_refuses_bad_values() {
    let db = TestDatabase::new().await;
    let id = tenant(&db, "acme").await;
    let stored_logs = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT coalesce(log_retention_period::text, 'NULL') FROM tenants WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    // Three lines of a task, 2, 10 and 40 days old.
    let task = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO task_logs (tenant_id, task_id, task_inserted_at, created_at, level, line)
         SELECT $1, $2, now() - interval '41 days', now() - d * interval '1 day', 'info', 'x'
         FROM unnest(ARRAY[2, 10, 40]) d",
    )
    .bind(id)
    .bind(task)
    .execute(&db.pool)
    .await
    .unwrap();
    let (code, stdout, stderr) = cli(&db, &["set", "acme", "30days", "--logs", "--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("log_retention_period default -> 30days would delete 1 log lines"),
        "{stdout}"
    );
    assert_eq!(stored_logs().await, "NULL", "a dry run changes nothing");
    let (code, stdout, _) = cli(&db, &["set", "acme", "default", "--logs", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("would delete 2 log lines"), "{stdout}");

    let (code, stdout, _) = cli(&db, &["set", "acme", "30days", "--logs"]);
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), format!("tenant acme ({id}): log_retention_period default -> 30days (applies at the next task-history run)"));
    assert_eq!(stored_logs().await, "720:00:00");
    for (value, reason) in [
        ("soon", "not a duration"),
        ("30s", "below 1 minute"),
        ("-1d", "negative"),
        ("200years", "above 100 years"),
    ] {
        let (code, _, stderr) = cli(&db, &["set", "acme", value, "--logs"]);
        assert_eq!(code, 2, "{value}");
        assert!(
            stderr.contains(&format!("invalid log window {value:?}")) && stderr.contains(reason),
            "{stderr}"
        );
        assert_eq!(stored_logs().await, "720:00:00");
    }
    let (code, _, stderr) = cli(
        &db,
        &["set", "acme", "7days", "--logs", "--status", "failed"],
    );
    assert_eq!(code, 2, "{stderr}");
    let (code, stdout, _) = cli(&db, &["set", "acme", "default", "--logs"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("log_retention_period 30days -> default"),
        "{stdout}"
    );
    assert_eq!(stored_logs().await, "NULL");
    let (_, stdout, _) = cli(&db, &["get", "acme", "--json"]);
    let body: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(body["log_retention_period"], "default");
}

#[tokio::test]
async fn the_cli_refuses_bad_values_and_unknown_tenants_and_changes_nothing() {
    let db = TestDatabase::new().await;
    let id = tenant(&db, "acme").await;
    for (value, reason) in BAD_VALUES {
        let (code, _, stderr) = cli(&db, &["set", "acme", value]);
        assert_eq!(code, 2, "{value:?}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid retention {value:?}: {reason}")),
            "{value:?}: {stderr}"
        );
        assert!(
            stderr.contains("allowed: a duration from 1h to 100years"),
            "{stderr}"
        );
        assert_eq!(stored(&db, id).await, "30 days");
    }
    for args in [
        &["get", "nope"][..],
        &["set", "nope", "7days"],
        &["set", &Uuid::new_v4().to_string(), "7days"],
    ] {
        let (code, _, stderr) = cli(&db, args);
        assert_eq!(code, 2, "{args:?}");
        assert!(stderr.contains("no tenant with id or slug"), "{stderr}");
    }
    assert_eq!(stored(&db, id).await, "30 days");
}

fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {TOKEN}"))
}

#[tokio::test]
async fn the_api_needs_the_bearer_token() {
    let db = TestDatabase::new().await;
    let id = tenant(&db, "acme").await;
    let path = format!("/api/v1/tenants/{id}/retention");

    let disabled = Served::start(&db.url, &[]);
    let (status, body) = http(disabled.port, "GET", &path, &[], None).unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("http.admin_token"), "{body}");
    drop(disabled);

    let served = Served::start(&db.url, &[("ENGINE__HTTP__ADMIN_TOKEN", TOKEN)]);
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-token-0123456789".to_string())],
        vec![("Authorization", TOKEN.to_string())],
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = http(served.port, "GET", &path, &headers, None).unwrap();
        assert_eq!(status, 401, "{headers:?}: {body}");
        let (status, _) = http(
            served.port,
            "PUT",
            &path,
            &headers,
            Some(r#"{"data_retention_period":"1h"}"#),
        )
        .unwrap();
        assert_eq!(status, 401);
    }
    assert_eq!(stored(&db, id).await, "30 days");
    let (key, value) = bearer();
    let (status, body) = http(served.port, "GET", &path, &[(key, &value)], None).unwrap();
    assert_eq!(status, 200, "{body}");
    // RFC 7235: the scheme is case-insensitive.
    for scheme in ["bearer", "BEARER"] {
        let value = format!("{scheme} {TOKEN}");
        let (status, body) = http(served.port, "GET", &path, &[(key, &value)], None).unwrap();
        assert_eq!(status, 200, "{scheme}: {body}");
    }
}

#[tokio::test]
async fn the_api_reads_and_changes_retention_and_refuses_bad_requests() {
    let db = TestDatabase::new().await;
    let id = tenant(&db, "acme").await;
    let served = Served::start(&db.url, &[("ENGINE__HTTP__ADMIN_TOKEN", TOKEN)]);
    let (key, value) = bearer();
    let auth = [(key, value.as_str())];
    let path = format!("/api/v1/tenants/{id}/retention");

    let (status, body) = http(served.port, "GET", &path, &auth, None).unwrap();
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["tenant_id"], id.to_string());
    assert_eq!(json["slug"], "acme");
    assert_eq!(json["data_retention_period"], "30days");
    assert_eq!(json["seconds"], 30 * 86_400);

    let (status, body) = http(
        served.port,
        "PUT",
        &path,
        &auth,
        Some(r#"{"data_retention_period":"36h"}"#),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(r#""data_retention_period":"1day 12h""#),
        "{body}"
    );
    assert_eq!(stored(&db, id).await, "36:00:00");
    // By slug too; null and "forever" keep forever.
    let (status, _) = http(
        served.port,
        "PUT",
        "/api/v1/tenants/acme/retention",
        &auth,
        Some(r#"{"data_retention_period":null}"#),
    )
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(stored(&db, id).await, "NULL");
    let (status, _) = http(
        served.port,
        "PUT",
        &path,
        &auth,
        Some(r#"{"data_retention_period":"2h"}"#),
    )
    .unwrap();
    assert_eq!(status, 200);

    for (value, reason) in BAD_VALUES {
        let request = serde_json::json!({ "data_retention_period": value }).to_string();
        let (status, body) = http(served.port, "PUT", &path, &auth, Some(&request)).unwrap();
        assert_eq!(status, 400, "{value:?}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(json["error"].as_str().unwrap().contains(reason), "{body}");
    }
    for malformed in [
        "not json",
        "{}",
        r#"{"data_retention_period": 3600}"#,
        r#"{"data_retention_period":"2h","x":1}"#,
        "[]",
    ] {
        let (status, body) = http(served.port, "PUT", &path, &auth, Some(malformed)).unwrap();
        assert_eq!(status, 400, "{malformed}: {body}");
        assert!(body.contains(r#""error""#), "{body}");
    }
    assert_eq!(
        stored(&db, id).await,
        "02:00:00",
        "refused requests changed nothing"
    );

    for unknown in [Uuid::new_v4().to_string(), "nope".to_string()] {
        let path = format!("/api/v1/tenants/{unknown}/retention");
        let (status, body) = http(served.port, "GET", &path, &auth, None).unwrap();
        assert_eq!(status, 404, "{body}");
        let (status, _) = http(
            served.port,
            "PUT",
            &path,
            &auth,
            Some(r#"{"data_retention_period":"2h"}"#),
        )
        .unwrap();
        assert_eq!(status, 404);
    }
}

#[test]
fn a_short_admin_token_is_refused_at_start_up() {
    let output = engine()
        .env("ENGINE__HTTP__ADMIN_TOKEN", "short")
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .arg("serve")
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr.contains(
            "http.admin_token (value hidden, 5 characters) is not allowed: at least 16 characters"
        ),
        "{stderr}"
    );
    assert!(
        !stderr.contains("short\""),
        "the token itself is never printed: {stderr}"
    );
}

/// Inserts finished tasks of `tenant`, one per age in hours.
async fn finished_tasks(db: &TestDatabase, tenant: Uuid, hours_ago: &[i32]) {
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'succeeded', now() - g * interval '1 hour', now() - g * interval '1 hour' FROM unnest($2::int[]) g",
    )
    .bind(tenant)
    .bind(hours_ago)
    .execute(&db.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_dry_run_counts_what_would_go_per_tenant_and_the_run_deletes_exactly_that() {
    let db = TestDatabase::new().await;
    let acme = tenant(&db, "acme").await;
    let globex = tenant(&db, "globex").await;
    let forever = tenant(&db, "keeps-forever").await;
    sqlx::query("UPDATE tenants SET data_retention_period = CASE WHEN id = $3 THEN NULL ELSE interval '1 day' END WHERE id IN ($1, $2, $3)")
        .bind(acme)
        .bind(globex)
        .bind(forever)
        .execute(&db.pool)
        .await
        .unwrap();
    finished_tasks(&db, acme, &[1, 30, 40, 50]).await;
    finished_tasks(&db, globex, &[23, 25, 26]).await;
    finished_tasks(&db, forever, &[100, 200]).await;

    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "run", "--dry-run", "--task", "task-history"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(
        stdout,
        format!(
            "task-history: would delete 5 rows (retention: 5) [dry run: nothing deleted]\n\
             \x20 tenant acme ({acme}): 3 tasks, with their events and queue items\n\
             \x20 tenant globex ({globex}): 2 tasks, with their events and queue items\n"
        )
    );
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tasks")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    assert_eq!(count().await, 9, "a dry run deletes nothing");

    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "run", "--task", "task-history"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output).1);
    let left: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT tenant_id, round(extract(epoch FROM now() - finished_at) / 3600)::int FROM tasks ORDER BY 1, 2",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let mut expected = vec![(acme, 1), (globex, 23), (forever, 100), (forever, 200)];
    expected.sort();
    assert_eq!(left, expected);
}
