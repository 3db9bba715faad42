//! The `engine` binary from the outside: configuration errors, `migrate`, `retention run` (with
//! and without `--dry-run`), the embedded default database, and `serve` with graceful shutdown.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

use chrono::{DateTime, Utc};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testkit::TestDatabase;
use uuid::Uuid;

/// Runs `engine retention run` with one bad setting and checks it is refused with a message
/// naming `expected` parts, before touching any database.
fn assert_refused(env: &[(&str, &str)], args: &[&str], expected: &[&str]) {
    let mut cmd = engine();
    // A database that does not exist: a refusal must come before any connection attempt.
    cmd.env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none");
    cmd.envs(env.iter().copied());
    let output = cmd
        .args(if args.is_empty() {
            &["retention", "run"][..]
        } else {
            args
        })
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(2),
        "env {env:?}: stdout {stdout} stderr {stderr}"
    );
    for part in expected {
        assert!(
            stderr.contains(part),
            "env {env:?}: expected {part:?} in: {stderr}"
        );
    }
    assert!(
        !stderr.contains("connecting to the database"),
        "refused before connecting: {stderr}"
    );
}

#[test]
fn each_invalid_setting_is_refused_with_its_key_value_and_what_is_allowed() {
    assert_refused(
        &[("ENGINE__RETENTION__SESSIONS__INTERVAL", "soon")],
        &[],
        &["retention.sessions.interval", "soon", "\"90s\""],
    );
    assert_refused(
        &[("ENGINE__RETENTION__SESSIONS__ANONYMOUS_TTL", "30s")],
        &[],
        &[
            "retention.sessions.anonymous_ttl = \"30s\"",
            "a duration from 1m to 100years",
        ],
    );
    assert_refused(
        &[("ENGINE__RETENTION__SESSIONS__INTERVAL", "0s")],
        &[],
        &[
            "retention.sessions.interval = \"0s\"",
            "a duration from 1s to 7days",
        ],
    );
    assert_refused(
        &[("ENGINE__RETENTION__SESSIONS__BATCH_SIZE", "0")],
        &[],
        &["retention.sessions.batch_size = \"0\"", "from 1 to 100000"],
    );
    assert_refused(
        &[("ENGINE__RETENTION__SESSIONS__BATCH_SIZE", "lots")],
        &[],
        &["retention.sessions.batch_size", "lots", "integer"],
    );
    assert_refused(
        &[("ENGINE__RETENTION__QUEUE_ITEMS__INTERVAL", "8days")],
        &[],
        &[
            "retention.queue_items.interval = \"8days\"",
            "from 1s to 7days",
        ],
    );
    assert_refused(
        &[("ENGINE__RETENTION__TASK_HISTORY__INTERVAL", "-5m")],
        &[],
        &["retention.task_history.interval", "-5m"],
    );
    assert_refused(
        &[("ENGINE__HTTP__ADDR", "localhost")],
        &["serve"],
        &["http.addr", "127.0.0.1:8080"],
    );
    assert_refused(
        &[("ENGINE__RETENTION__SESIONS__INTERVAL", "1h")],
        &[],
        &["unknown field `sesions`", "sessions"],
    );
    assert_refused(
        &[("ENGINE__DATABASE__MAX_CONNECTIONS", "0")],
        &[],
        &["database.max_connections = 0", "1 to 100"],
    );
    assert_refused(
        &[("ENGINE__DATABASE__MIGRATE", "maybe")],
        &[],
        &["database.migrate", "maybe"],
    );
    assert_refused(
        &[("ENGINE__RETENTION__PACING__PAUSE_RATIO", "-1")],
        &[],
        &[
            "retention.pacing.pause_ratio = \"-1\"",
            "a number from 0 (full speed) to 3000",
        ],
    );
    assert_refused(
        &[("ENGINE__RETENTION__PACING__BATCH_TIME", "0s")],
        &[],
        &[
            "retention.pacing.batch_time = \"0s\"",
            "a duration from 1ms to 1s",
        ],
    );
    assert_refused(
        &[(
            "ENGINE__RETENTION__TASK_HISTORY__DELETED_TENANT_GRACE",
            "0s",
        )],
        &[],
        &[
            "retention.task_history.deleted_tenant_grace = \"0s\"",
            "a duration from 1h to 100years",
        ],
    );
    assert_refused(
        &[("ENGINE__RETENTION__PARTITIONS__LOCK_TIMEOUT", "10m")],
        &[],
        &[
            "retention.partitions.lock_timeout = \"10m\"",
            "a duration from 10ms to 5s",
        ],
    );
    assert_refused(
        &[("ENGINE__METRICS__TENANT_SERIES", "5000")],
        &[],
        &["metrics.tenant_series = 5000", "from 0 to 1000"],
    );
    assert_refused(
        &[("ENGINE__HTTP__MAX_CONNECTIONS", "0")],
        &["serve"],
        &["http.max_connections = 0", "from 1 to 32"],
    );
    assert_refused(
        &[("ENGINE__HTTP__REQUEST_TIMEOUT", "900ms")],
        &["serve"],
        &["http.request_timeout = \"900ms\"", "from 1s to 10m"],
    );
    assert_refused(
        &[("ENGINE__HTTP__MAX_BODY_BYTES", "100")],
        &["serve"],
        &["http.max_body_bytes = 100", "from 1024 to 16777216"],
    );
    assert_refused(
        &[("ENGINE__HTTP__MAX_HEADER_BYTES", "1000000")],
        &["serve"],
        &["http.max_header_bytes = 1000000", "from 1024 to 262144"],
    );
    assert_refused(
        &[("ENGINE__HTTP__MAX_BODY_BYTES", "64k")],
        &["serve"],
        &["http.max_body_bytes", "64k", "a whole number of bytes"],
    );
    assert_refused(
        &[("ENGINE__DATABASE__CONNECT_TIMEOUT", "1h")],
        &[],
        &["database.connect_timeout = \"1h\"", "from 100ms to 5m"],
    );
    assert_refused(
        &[],
        &["retention", "run", "--pace", "5000"],
        &["--pace = \"5000\"", "a number from 0 (full speed) to 3000"],
    );
    assert_refused(
        &[],
        &["retention", "run", "--pace", "-2"],
        &["--pace = \"-2\""],
    );
    assert_refused(
        &[],
        &["retention", "run", "--pace", "fast"],
        &["invalid value 'fast' for '--pace [<RATIO>]'"],
    );
    // The queue-items walk sizes itself: the key is gone, and an old config says so.
    assert_refused(
        &[("ENGINE__RETENTION__QUEUE_ITEMS__BATCH_SIZE", "100")],
        &[],
        &["unknown field `batch_size`"],
    );
}

#[test]
fn a_config_file_is_layered_under_the_environment_and_its_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("engine.toml");
    std::fs::write(&file, "[retention.sessions]\nanonymous_ttl = \"10s\"\n").unwrap();
    let path = file.to_str().unwrap();
    assert_refused(
        &[],
        &["--config", path, "retention", "run"],
        &["retention.sessions.anonymous_ttl = \"10s\""],
    );
    assert_refused(
        &[("ENGINE_CONFIG", path)],
        &[],
        &["retention.sessions.anonymous_ttl = \"10s\""],
    );

    std::fs::write(&file, "[retention.sessions\n").unwrap();
    assert_refused(&[], &["--config", path, "retention", "run"], &[path]);
    assert_refused(
        &[],
        &["--config", "/nonexistent/engine.toml", "retention", "run"],
        &["/nonexistent/engine.toml", "no such file"],
    );
}

#[test]
fn an_unknown_task_is_refused_with_the_names_allowed() {
    let output = engine()
        .args(["retention", "run", "--task", "sesions"])
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr.contains("invalid value 'sesions'")
            && stderr.contains(
                "[possible values: partitions, task-history, queue-items, sessions, blobs]"
            ),
        "{stderr}"
    );
}

async fn seed(db: &TestDatabase) -> (Vec<Uuid>, Vec<Uuid>) {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let minute = chrono::Duration::minutes(1);
    let day = chrono::Duration::days(1);
    let mut due = Vec::new();
    let mut kept = Vec::new();
    for (anonymous, created, expires, is_due) in [
        (false, now - day, now - minute, true),
        (false, now - day, now + minute, false),
        (true, now - day - minute, now + day, true),
        (true, now - day + minute, now + day, false),
    ] {
        let user: Option<Uuid> = if anonymous {
            None
        } else {
            Some(
                sqlx::query_scalar("INSERT INTO users (id, email) VALUES (gen_random_uuid(), gen_random_uuid()::text) RETURNING id")
                    .fetch_one(&db.pool)
                    .await
                    .unwrap(),
            )
        };
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO user_sessions (id, user_id, created_at, expires_at) VALUES (gen_random_uuid(), $1, $2, $3) RETURNING id",
        )
        .bind(user)
        .bind(created)
        .bind(expires)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if is_due {
            due.push(id)
        } else {
            kept.push(id)
        }
    }
    kept.sort();
    (due, kept)
}

/// `n` sessions that expired two days ago.
async fn expired_backlog(db: &TestDatabase, n: i64) {
    sqlx::query(
        "INSERT INTO user_sessions (created_at, expires_at) SELECT now() - interval '3 days', now() - interval '2 days'
         FROM generate_series(1, $1)",
    )
    .bind(n)
    .execute(&db.pool)
    .await
    .unwrap();
}

/// Waits until fewer than `total` sessions are left: a purge has committed its first batch.
async fn wait_for_the_first_deletes(db: &TestDatabase, total: i64) {
    let start = Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM user_sessions")
        .fetch_one(&db.pool)
        .await
        .unwrap()
        == total
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the purge never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn session_ids(db: &TestDatabase) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM user_sessions ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn retention_run_deletes_the_due_sessions_and_dry_run_deletes_nothing() {
    let db = TestDatabase::new().await;
    let (_, kept) = seed(&db).await;
    let before = session_ids(&db).await;

    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "run", "--dry-run"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stdout.contains(
            "sessions: would delete 2 rows (expired: 1, anonymous: 1) [dry run: nothing deleted]"
        ),
        "{stdout}"
    );
    assert_eq!(session_ids(&db).await, before);

    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "run", "--task", "sessions"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stdout.contains("sessions: deleted 2 rows in 1 batch (expired: 1, anonymous: 1)"),
        "{stdout}"
    );
    assert_eq!(session_ids(&db).await, kept);
    // Every log line of the run carries its run id.
    let run_lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("run started") || l.contains("run finished"))
        .collect();
    assert_eq!(run_lines.len(), 2, "{stderr}");
    assert!(
        run_lines
            .iter()
            .all(|l| l.contains("run_id=") && l.contains("task=\"sessions\"")),
        "{stderr}"
    );

    // Nothing due is success, and says so.
    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "run"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = text(&output).0;
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("sessions: nothing due; ")
                || l.starts_with("sessions: nothing due (")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("()") && !stdout.contains("[]"),
        "no empty parts: {stdout}"
    );
}

/// `--json`: one object per task, for scripts, with the same figures as the human line.
#[tokio::test]
async fn run_and_status_print_json_for_scripts() {
    let db = TestDatabase::new().await;
    seed(&db).await;
    let run = |args: &[&str]| {
        let output = engine()
            .env("DATABASE_URL", &db.url)
            .args(args)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "{args:?}: {stderr}");
        stdout
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
            })
            .collect::<Vec<_>>()
    };

    let due = run(&[
        "retention",
        "run",
        "--dry-run",
        "--task",
        "sessions",
        "--json",
    ]);
    assert_eq!(
        due,
        vec![
            serde_json::json!({"task": "sessions", "dry_run": true, "due": 2, "by_rule": {"expired": 1, "anonymous": 1}, "by_tenant": []})
        ]
    );
    let ran = run(&["retention", "run", "--json"]);
    assert_eq!(
        ran.iter()
            .map(|o| o["task"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "partitions",
            "task-history",
            "queue-items",
            "sessions",
            "blobs"
        ]
    );
    let sessions = &ran[3];
    assert_eq!(
        (sessions["deleted"].as_u64(), sessions["batches"].as_u64()),
        (Some(2), Some(1)),
        "{sessions}"
    );
    assert_eq!(
        sessions["by_rule"],
        serde_json::json!({"expired": 1, "anonymous": 1})
    );
    assert_eq!(
        (
            sessions["completion"].as_str(),
            sessions["runs"].as_u64(),
            sessions["paused"].as_bool()
        ),
        (Some("done"), Some(1), Some(false))
    );
    assert!(
        sessions["seconds"].as_f64().is_some() && sessions["longest_batch_ms"].as_u64().is_some(),
        "{sessions}"
    );
    assert!(
        ran[0]["counters"]["days created"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{}",
        ran[0]
    );

    let status = run(&["retention", "status", "--json"]);
    assert_eq!(status.len(), 5);
    let blobs = status.iter().find(|o| o["task"] == "blobs").unwrap();
    assert_eq!(blobs["outbox"]["entries"], 0, "{blobs}");
    let sessions = status.iter().find(|o| o["task"] == "sessions").unwrap();
    assert_eq!(
        (
            sessions["outcome"].as_str(),
            sessions["rows"].as_i64(),
            sessions["paused"].as_bool()
        ),
        (Some("done"), Some(2), Some(false)),
        "{sessions}"
    );
    assert_eq!(sessions["next_due"]["state"], "at", "{sessions}");
    // The planner's estimate (a table this small has no statistics to speak of).
    assert!(sessions["rows_due"].is_u64(), "{sessions}");
    assert!(
        sessions["holder"].is_null() && sessions["last_run_at"].is_string(),
        "{sessions}"
    );
}

#[tokio::test]
async fn a_paced_run_deletes_the_same_rows_and_prints_no_terminal_codes_to_a_pipe() {
    let db = TestDatabase::new().await;
    let (_, kept) = seed(&db).await;

    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "run", "--task", "sessions", "--pace", "1"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stdout.contains("sessions: deleted 2 rows in 1 batch (expired: 1, anonymous: 1)"),
        "{stdout}"
    );
    assert!(stdout.contains("longest batch"), "{stdout}");
    assert_eq!(session_ids(&db).await, kept);
    assert!(
        !stderr.contains('\r') && !stderr.contains("\x1b[2K"),
        "progress redraws only on a terminal: {stderr:?}"
    );
}

/// `engine retention status | head -1`: a reader that has gone before the output is written ends
/// the command quietly (it used to panic on the broken pipe), after the work was done.
#[tokio::test]
async fn a_reader_that_has_gone_ends_the_command_quietly_after_its_work() {
    let db = TestDatabase::new().await;
    let (_, kept) = seed(&db).await;
    let commands: [&[&str]; 4] = [
        &["retention", "run", "--task", "sessions"],
        &["retention", "status"],
        &["retention", "status", "--json"],
        &["tenant", "retention", "get", "no-such-tenant-is-fine-here"],
    ];
    for args in commands {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = engine()
            .env("DATABASE_URL", &db.url)
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        if args[0] == "tenant" {
            // Its error goes to stderr, which is still there.
            assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains("no tenant"), "{args:?}: {stderr}");
        } else {
            assert!(
                output.status.success(),
                "{args:?}: {:?} {stderr}",
                output.status
            );
            assert!(!stderr.contains("error"), "{args:?}: {stderr}");
        }
    }
    assert_eq!(
        session_ids(&db).await,
        kept,
        "the run deleted what was due before its output failed"
    );
}

#[tokio::test]
async fn pause_resume_and_status_are_persisted_and_obeyed() {
    let db = TestDatabase::new().await;
    let (_, kept) = seed(&db).await;
    let before = session_ids(&db).await;
    let run = |args: &[&str]| {
        let output = engine()
            .env("DATABASE_URL", &db.url)
            .args(args)
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "{args:?}: {stderr}");
        stdout
    };

    assert!(run(&["retention", "pause", "sessions"]).contains("sessions: paused on every replica"));
    assert!(run(&["retention", "pause", "sessions"]).contains("sessions: already paused"));
    let stdout = run(&["retention", "run", "--task", "sessions"]);
    assert!(
        stdout.contains("sessions: paused, nothing deleted (`engine retention resume sessions`"),
        "{stdout}"
    );
    assert_eq!(session_ids(&db).await, before);
    let status = run(&["retention", "status"]);
    let line = |task: &str| {
        status
            .lines()
            .find(|l| l.starts_with(&format!("{task} ")))
            .unwrap_or_else(|| panic!("{task}: {status}"))
            .to_string()
    };
    let words = |task: &str| {
        line(task)
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        words("sessions")[..3],
        ["sessions", "yes", "never"],
        "{status}"
    );
    assert!(line("sessions").contains("paused"), "{status}");

    assert!(run(&["retention", "resume", "sessions"]).contains("sessions: resumed"));
    let stdout = run(&["retention", "run", "--task", "sessions"]);
    assert!(stdout.contains("sessions: deleted 2 rows"), "{stdout}");
    assert_eq!(session_ids(&db).await, kept);
    let status = run(&["retention", "status"]);
    let sessions: Vec<String> = status
        .lines()
        .find(|l| l.starts_with("sessions "))
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    // task, paused, date, time, outcome, rows, next-due date, next-due time, holder
    assert_eq!(
        (
            sessions[1].as_str(),
            sessions[4].as_str(),
            sessions[5].as_str(),
            sessions[8].as_str()
        ),
        ("no", "done", "2", "-"),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("queue-items ") && l.contains("never")),
        "tasks that never ran are listed: {status}"
    );
    // Another replica holds the task now.
    sqlx::query(
        "UPDATE maintenance_tasks SET lease_run_id = gen_random_uuid(), lease_holder = 'other-host:42',
                lease_expires_at = now() + interval '1 minute' WHERE task = 'sessions'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let status = run(&["retention", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("sessions ") && l.ends_with(" other-host:42")),
        "{status}"
    );

    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "pause", "session"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output)
        .1
        .contains("[possible values: partitions, task-history, queue-items, sessions, blobs]"));
}

#[tokio::test]
async fn a_pause_stops_a_manual_run_in_progress_within_seconds() {
    let db = TestDatabase::new().await;
    let (_, kept) = seed(&db).await;
    expired_backlog(&db, 20_000).await;
    // Paced to a crawl: a batch, then a pause of 3000 times its duration.
    let run = engine()
        .env("DATABASE_URL", &db.url)
        .env("ENGINE__RETENTION__LEASE_TTL", "3s")
        .args(["retention", "run", "--task", "sessions", "--pace", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_the_first_deletes(&db, 20_004).await;
    let paused = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "pause", "sessions"])
        .output()
        .unwrap();
    assert!(paused.status.success());
    let pausing = Instant::now();
    let output = run.wait_with_output().unwrap();
    let (stdout, stderr) = text(&output);
    assert!(
        pausing.elapsed() < Duration::from_secs(5),
        "stopped {:?} after the pause: {stderr}",
        pausing.elapsed()
    );
    assert!(output.status.success(), "{stderr}");
    assert!(
        stdout.contains("[stopped: paused by an operator; the batch in flight was committed]"),
        "{stdout}"
    );
    let ids = session_ids(&db).await;
    assert!(
        ids.len() > kept.len() && kept.iter().all(|id| ids.contains(id)),
        "stopped part way, keepers intact"
    );
}

#[tokio::test]
async fn the_kubernetes_configmap_holds_a_valid_configuration() {
    let db = TestDatabase::new().await;
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/k8s/configmap.yaml"
    ))
    .unwrap();
    // The block under `engine.toml: |`, without its indentation.
    let toml: String = manifest
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("engine.toml: |"))
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| format!("{}\n", line.get(4..).unwrap_or("")))
        .collect();
    assert!(toml.contains("[retention"), "{toml}");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &toml).unwrap();
    let output = engine()
        .env("DATABASE_URL", &db.url)
        .arg("--config")
        .arg(file.path())
        .args(["retention", "status"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{toml}\n{}", text(&output).1);
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let db = TestDatabase::new().await; // already migrated by the harness
    for _ in 0..2 {
        let output = engine()
            .env("DATABASE_URL", &db.url)
            .arg("migrate")
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "{stderr}");
        assert!(stdout.contains("database is up to date"), "{stdout}");
    }
}

#[test]
fn a_failing_run_exits_non_zero_and_says_why() {
    let output = engine()
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("ENGINE__DATABASE__CONNECT_TIMEOUT", "1s")
        .args(["retention", "run"])
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("connecting to the database at postgres://nobody@127.0.0.1:1/none"),
        "{stderr}"
    );
}

#[test]
fn without_a_database_or_server_binaries_the_engine_says_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let output = engine()
        .env("ENGINE_PG_BIN_DIR", dir.path())
        .env("ENGINE__DATA_DIR", dir.path())
        .args(["retention", "run"])
        .output()
        .unwrap();
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no PostgreSQL server binaries found"),
        "{stderr}"
    );
    assert!(
        stderr.contains("apt-get install postgresql") && stderr.contains("DATABASE_URL"),
        "{stderr}"
    );
}

#[test]
fn without_a_database_the_engine_runs_on_its_own_private_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    // Reachable by the unprivileged user the cluster runs as when the tests run as root.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for _ in 0..2 {
        // The second start reuses the cluster the first one created.
        let output = engine()
            .env("ENGINE__DATA_DIR", dir.path())
            .args(["retention", "run"])
            .output()
            .unwrap();
        let (stdout, stderr) = text(&output);
        assert!(output.status.success(), "{stderr}");
        assert!(stdout.contains("sessions: nothing due"), "{stdout}");
        assert!(
            stderr.contains("stopped the embedded PostgreSQL"),
            "{stderr}"
        );
    }
    assert!(dir.path().join("postgres/PG_VERSION").exists());
    assert!(
        !dir.path().join("postgres/postmaster.pid").exists(),
        "the server was stopped"
    );
}

#[tokio::test]
async fn serve_answers_healthz_purges_and_stops_on_sigterm_mid_purge() {
    let db = TestDatabase::new().await;
    let (_, kept) = seed(&db).await;
    // A backlog that takes many batches.
    expired_backlog(&db, 60_000).await;
    let port = free_port();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = engine()
        .env("DATABASE_URL", &db.url)
        .env("ENGINE__HTTP__ADDR", format!("127.0.0.1:{port}"))
        .env("ENGINE__RETENTION__SESSIONS__INTERVAL", "1s")
        .env("ENGINE__RETENTION__SESSIONS__BATCH_SIZE", "200")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();

    wait_until("/healthz", Duration::from_secs(30), || {
        http(port, "GET", "/healthz", &[], None)
            .is_some_and(|(status, body)| status == 200 && body.contains(r#"{"status":"ok"}"#))
    });
    let total = 60_004i64;
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM user_sessions")
            .fetch_one(&db.pool)
            .await
            .unwrap()
    };
    wait_for_the_first_deletes(&db, total).await;

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "serve did not stop within 10 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let logs = std::fs::read_to_string(log.path()).unwrap();
    assert!(status.success(), "exit {status:?}: {logs}");
    assert!(
        logs.contains("shutting down") && logs.contains("engine stopped"),
        "{logs}"
    );

    // Stopped mid-purge, the batch in flight committed whole: exactly the rows the runs reported
    // are gone (batches are sized by time, so their sizes vary).
    let left = count().await;
    let deleted = total - left;
    assert!(
        left > kept.len() as i64,
        "SIGTERM came before the purge could finish: {logs}"
    );
    let reported: i64 = logs
        .lines()
        .filter(|line| line.contains("task=\"sessions\"") && line.contains("run finished"))
        .filter_map(|line| {
            line.split("deleted=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<i64>()
                .ok()
        })
        .sum();
    assert_eq!(deleted, reported, "{logs}");
    assert!(logs.contains("completion=\"cancelled\""), "{logs}");
    let ids = session_ids(&db).await;
    assert!(
        kept.iter().all(|id| ids.contains(id)),
        "every keeper survives"
    );
    // It released its leases (not left to expire) and recorded the run it stopped.
    let leases: i64 =
        sqlx::query_scalar("SELECT count(*) FROM maintenance_tasks WHERE lease_run_id IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(leases, 0, "{logs}");
    let (outcome, rows): (String, i64) =
        sqlx::query_as("SELECT outcome, rows FROM maintenance_runs WHERE task = 'sessions' ORDER BY started_at DESC LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((outcome.as_str(), rows), ("cancelled", deleted), "{logs}");

    // The next run finishes the job and leaves exactly the keepers.
    let output = engine()
        .env("DATABASE_URL", &db.url)
        .args(["retention", "run"])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(session_ids(&db).await, kept);
}
