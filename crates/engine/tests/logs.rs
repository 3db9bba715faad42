//! `log.format`: the human text by default, one JSON object per line with `json`, carrying the
//! replica, the task, the run id and the tenant from the spans.

mod common;

use common::*;
use serde_json::Value;
use testkit::TestDatabase;

/// The names and fields of the spans of a JSON log line, outermost first.
fn spans(line: &Value) -> Vec<&serde_json::Map<String, Value>> {
    line["spans"]
        .as_array()
        .map(|spans| spans.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

fn span<'a>(line: &'a Value, name: &str) -> Option<&'a serde_json::Map<String, Value>> {
    spans(line).into_iter().find(|span| span["name"] == name)
}

#[tokio::test]
async fn json_logs_carry_the_replica_the_run_and_the_tenant() {
    let db = TestDatabase::new().await;
    let tenant: uuid::Uuid =
        sqlx::query_scalar("INSERT INTO tenants (slug, name, data_retention_period) VALUES ('acme', 'Acme', interval '1 day') RETURNING id")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'succeeded', now() - interval '3 days', now() - interval '3 days' FROM generate_series(1, 50)",
    )
    .bind(tenant)
    .execute(&db.pool)
    .await
    .unwrap();

    let output = engine()
        .env("DATABASE_URL", &db.url)
        .env("ENGINE__LOG__FORMAT", "json")
        .env("ENGINE__METRICS__REPLICA", "replica-7")
        .env("RUST_LOG", "info,retention_controller=debug,sqlx=warn")
        .args(["retention", "run", "--task", "task-history"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line.get(key).is_some(), "{key} missing from {line}");
        }
        // Every line of the process is within the `engine` span and names the replica.
        assert_eq!(
            span(line, "engine").map(|s| &s["replica"]),
            Some(&Value::from("replica-7")),
            "{line}"
        );
    }
    let started = lines
        .iter()
        .find(|line| line["message"] == "run started")
        .expect("a 'run started' line");
    let run = span(started, "retention_run").expect("the run's span");
    assert_eq!(run["task"], "task-history");
    assert!(
        uuid::Uuid::parse_str(run["run_id"].as_str().unwrap()).is_ok(),
        "{started}"
    );
    let committed = lines
        .iter()
        .find(|line| line["message"] == "batch committed")
        .unwrap_or_else(|| panic!("a 'batch committed' line in {stderr}"));
    assert_eq!(
        span(committed, "pair").map(|s| &s["tenant"]),
        Some(&Value::from(tenant.to_string())),
        "{committed}"
    );
    assert_eq!(
        span(committed, "retention_run").map(|s| &s["run_id"]),
        Some(&run["run_id"]),
        "the batch's line names the same run: {committed}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn text_logs_are_the_default_and_a_bad_format_is_refused() {
    let db = TestDatabase::new().await;
    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "run", "--task", "sessions"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("run started"), "{stderr}");
    assert!(
        stderr
            .lines()
            .all(|line| !line.trim_start().starts_with('{')),
        "{stderr}"
    );

    let output = engine()
        .env("DATABASE_URL", &db.url)
        .env("ENGINE__LOG__FORMAT", "xml")
        .args(["retention", "run", "--task", "sessions"])
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for needle in ["log.format", "xml", "text", "json"] {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM maintenance_runs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1, "the refused command ran nothing");
}

/// In JSON mode the error that ends the process is a JSON line too, so a pipeline that parses
/// every line still sees why the engine stopped.
#[test]
fn a_fatal_error_in_json_mode_is_a_json_line() {
    // A port already taken: `serve` cannot bind its admin server.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = engine()
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("ENGINE__LOG__FORMAT", "json")
        .env("ENGINE__HTTP__ADDR", &addr)
        .arg("serve")
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line:?} in {stderr}"))
        })
        .collect();
    let last = lines.last().expect("a line saying why");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert_eq!(last["message"], "the command failed", "{last}");
    let error = last["error"].as_str().unwrap();
    assert!(
        error.contains("http.addr") && error.contains(&addr),
        "{error}"
    );
    assert!(last["spans"][0]["replica"].is_string(), "{last}");

    // Settings refused: they never loaded, yet the environment asked for JSON.
    let output = engine()
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("ENGINE__LOG__FORMAT", "json")
        .env("ENGINE__HTTP__MAX_CONNECTIONS", "0")
        .arg("serve")
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let line: Value = serde_json::from_str(stderr.trim())
        .unwrap_or_else(|_| panic!("not one JSON line: {stderr}"));
    assert_eq!(line["level"], "ERROR", "{line}");
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("http.max_connections = 0"),
        "{line}"
    );
}
