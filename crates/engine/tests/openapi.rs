//! The admin API against its OpenAPI document, docs/openapi.json: the document is valid OpenAPI
//! 3.1 (`openapi-spec-validator`), it is what `/api/v1/openapi.json` serves, and schemathesis,
//! an API fuzzer, finds every answer of a real `engine serve` (on its embedded PostgreSQL) in it:
//! status codes, content types, headers and bodies, and no 5xx; without the token, with it, and
//! with the API disabled; and the guard's answers (431 over `http.max_header_bytes` for every
//! operation, 413 over `http.max_body_bytes`, 400 for a body cut off, 503 past
//! `http.request_timeout`). A proxy between
//! schemathesis and the engine snapshots the tenants, holds and receipts around every request: a
//! refused request (4xx, 5xx), a GET or a dry run that changed them fails the test. A run passes
//! only if schemathesis's JUnit report lists every operation as tested, and a document that
//! misdescribes an answer is shown to fail.
//!
//! Bounded: at most `MAX_EXAMPLES` test cases per operation and phase, one worker, a fixed seed,
//! and `RUN_TIMEOUT` per run; about 45 s in all on two cores.
//!
//! Needs PyPI's `schemathesis` and `openapi-spec-validator` (`.ci/run` installs them; see
//! [`testkit::tools::find`] for where they are looked for: `$SCHEMATHESIS`,
//! `$OPENAPI_SPEC_VALIDATOR` first). `SCHEMATHESIS_SEED=<n>` fuzzes with
//! another seed than the fixed one.

mod common;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The versions `.ci/run` installs (named in the message when one is missing).
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
const SPEC_VALIDATOR: &str = "openapi-spec-validator==0.9.0";
const TOKEN: &str = "openapi-test-token-0123456789";
/// The fixed seed (`SCHEMATHESIS_SEED` overrides it).
const SEED: u64 = 25;
/// Test cases per operation and phase.
const MAX_EXAMPLES: u32 = 100;
/// The longest one schemathesis run may take before the test fails (the runs take 1 to 15 s
/// each on two cores, the whole test about 45 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// The checks that hold for any request, however refused: no 5xx, and the status code, the
/// content type, the headers and the body each as the document says.
const CONFORMANCE: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                           response_headers_conformance,response_schema_conformance";

fn committed_document() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

fn validator() -> PathBuf {
    testkit::tools::find(
        "openapi-spec-validator",
        &format!("PyPI's {SPEC_VALIDATOR}: `python3 -m pip install '{SPEC_VALIDATOR}'`"),
    )
}

fn schemathesis() -> PathBuf {
    testkit::tools::find(
        "schemathesis",
        &format!("PyPI's {SCHEMATHESIS}: `python3 -m pip install '{SCHEMATHESIS}'`"),
    )
}

/// Panics unless the schemathesis found is 4.x, whose command line and configuration file the
/// test uses (`.ci/run` installs it only when there is none at all).
fn assert_schemathesis_4() {
    let output = std::process::Command::new(schemathesis())
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .expect("running schemathesis --version");
    let (stdout, stderr) = text(&output);
    assert!(
        stdout.contains("version 4."),
        "{} is not schemathesis 4 ({}{}): install PyPI's {SCHEMATHESIS} with \
         `python3 -m pip install '{SCHEMATHESIS}'`",
        schemathesis().display(),
        stdout.trim(),
        stderr.trim()
    );
}

/// `openapi-spec-validator FILE`: (success, its output).
fn validate(file: &Path) -> (bool, String) {
    let output = std::process::Command::new(validator())
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("running openapi-spec-validator");
    let (stdout, stderr) = text(&output);
    (output.status.success(), format!("{stdout}{stderr}"))
}

#[test]
fn the_committed_document_is_valid_openapi_3_1() {
    let path = committed_document();
    let document: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let (valid, output) = validate(&path);
    assert!(valid, "{} is not valid OpenAPI:\n{output}", path.display());

    // The validator does refuse a broken document: an operation whose response has no
    // description (required by OpenAPI).
    let mut broken = document.clone();
    broken["paths"]["/healthz"]["get"]["responses"]["200"]
        .as_object_mut()
        .unwrap()
        .remove("description");
    let dir = tempfile::tempdir().unwrap();
    let broken_path = dir.path().join("broken.json");
    std::fs::write(&broken_path, broken.to_string()).unwrap();
    let (valid, output) = validate(&broken_path);
    assert!(!valid, "a response without a description passed:\n{output}");
    assert!(output.contains("description"), "{output}");
}

/// `engine serve` on the embedded database under `data_dir`, killed when dropped.
struct Engine {
    child: std::process::Child,
    port: u16,
}

impl Engine {
    fn start(data_dir: &Path, token: Option<&str>, env: &[(&str, &str)]) -> Engine {
        let port = free_port();
        let mut command = engine();
        command
            .env("ENGINE__DATA_DIR", data_dir)
            .env("ENGINE__HTTP__ADDR", format!("127.0.0.1:{port}"))
            .envs(env.iter().copied())
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(data_dir.join("engine.log")).unwrap());
        if let Some(token) = token {
            command.env("ENGINE__HTTP__ADMIN_TOKEN", token);
        }
        let engine = Engine {
            child: command.spawn().unwrap(),
            port,
        };
        let start = Instant::now();
        while http(port, "GET", "/readyz", &[], None).is_none_or(|(s, _)| s != 200) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "engine serve was not ready within 2 minutes:\n{}",
                std::fs::read_to_string(data_dir.join("engine.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        engine
    }

    /// Stops it (SIGTERM) and waits: the embedded PostgreSQL stops with it.
    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the tests seeded: the ids schemathesis is given to reach real resources with.
struct Seeded {
    tenants: Vec<String>,
    holds: Vec<i64>,
}

/// Two tenants (acme with a window of its own for failed tasks, two finished tasks and a log
/// window; globex deleted an hour ago), three holds (on acme, on one of its tasks until next
/// year, and one removed) and two receipts (one of a tenant without a row).
async fn seed(pool: &PgPool) -> Seeded {
    let acme: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (slug, name, failed_retention_period, log_retention_period)
         VALUES ('acme', 'Acme', '90 days', '14 days') RETURNING id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let globex: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (slug, name, deleted_at) VALUES ('globex', 'Globex', now() - interval '1 hour')
         RETURNING id",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let task: uuid::Uuid = sqlx::query_scalar(
        "WITH t AS (INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
                    VALUES ($1, 'succeeded', now() - interval '2 days', now() - interval '2 days'),
                           ($1, 'failed', now() - interval '3 days', now() - interval '3 days')
                    RETURNING id, inserted_at),
              e AS (INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type)
                    SELECT $1, id, inserted_at, 'done' FROM t)
         SELECT id FROM t ORDER BY inserted_at DESC LIMIT 1",
    )
    .bind(acme)
    .fetch_one(pool)
    .await
    .unwrap();
    let holds: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO retention_holds (tenant_id, task_id, reason, until, created_by, removed_by, removed_at, removed_reason)
         VALUES ($1, NULL, 'audit 2026', NULL, 'cli', NULL, NULL, NULL),
                ($1, $2, 'support case 17', now() + interval '1 year', 'admin', NULL, NULL, NULL),
                ($1, NULL, 'old audit', NULL, 'cli', 'cli', now(), 'closed')
         RETURNING id",
    )
    .bind(acme)
    .bind(task)
    .fetch_all(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO retention_receipts (run_id, tenant_id, rule, task, tasks, events, queue_items, oldest, newest)
         VALUES (gen_random_uuid(), $1, 'status-window', 'task-history', 3, 5, 0, now() - interval '40 days', now() - interval '31 days'),
                (gen_random_uuid(), gen_random_uuid(), 'deleted-tenant', 'task-history', 1, 0, 0, NULL, NULL)",
    )
    .bind(acme)
    .execute(pool)
    .await
    .unwrap();
    Seeded {
        tenants: vec![
            "acme".into(),
            acme.to_string(),
            "globex".into(),
            globex.to_string(),
        ],
        holds,
    }
}

/// The rows the API reads and writes, as text: tenants (with their windows), holds, receipts.
async fn snapshot(pool: &PgPool) -> Result<String, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT concat_ws(E'\\n',
             (SELECT string_agg(t::text, E'\\n' ORDER BY t.id) FROM tenants t),
             (SELECT string_agg(h::text, E'\\n' ORDER BY h.id) FROM retention_holds h),
             (SELECT string_agg(r::text, E'\\n' ORDER BY r.run_id, r.tenant_id, r.rule) FROM retention_receipts r))",
    )
    .fetch_one(pool)
    .await
}

/// One request through the proxy and its answer.
#[derive(Debug, Clone)]
struct Exchange {
    method: String,
    /// The request target: path and query, as sent.
    target: String,
    /// 0: no answer.
    status: u16,
    /// The rows before and after, when the request changed them.
    changed: Option<(String, String)>,
    /// One of schemathesis's probes of what the server accepts (e.g. a NUL in a header, which
    /// hyper answers 400 before the engine sees it), not a test case.
    probe: bool,
}

impl Exchange {
    /// The route the target matched (ids replaced by `{id}`), without the query.
    fn route(&self) -> String {
        let path = self.target.split('?').next().unwrap_or_default();
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["", "api", "v1", "tenants", _, "retention"] => "/api/v1/tenants/{id}/retention".into(),
            ["", "api", "v1", "tenants", _, "archive"] => "/api/v1/tenants/{id}/archive".into(),
            ["", "api", "v1", "holds", _] => "/api/v1/holds/{id}".into(),
            _ => path.to_string(),
        }
    }

    fn is_dry_run(&self) -> bool {
        self.target
            .split_once('?')
            .is_some_and(|(_, query)| query.split('&').any(|pair| pair == "dry_run=true"))
    }

    /// A request that must change nothing: refused or failed, a read, or a dry run.
    fn must_change_nothing(&self) -> bool {
        self.status >= 400
            || self.status == 0
            || matches!(self.method.as_str(), "GET" | "HEAD" | "OPTIONS")
            || self.is_dry_run()
    }
}

/// An HTTP proxy in front of the engine that takes one request at a time and snapshots the rows
/// the API touches before and after each.
struct Proxy {
    port: u16,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: u16, pool: PgPool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let exchanges = Arc::new(Mutex::new(Vec::new()));
        let one_at_a_time = Arc::new(tokio::sync::Mutex::new(()));
        let log = exchanges.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (pool, log, turn) = (pool.clone(), log.clone(), one_at_a_time.clone());
                tokio::spawn(async move {
                    let _ = relay(client, upstream, &pool, &log, &turn).await;
                });
            }
        });
        Proxy {
            port,
            exchanges,
            task,
        }
    }

    /// The exchanges since the last call.
    fn take(&self) -> Vec<Exchange> {
        std::mem::take(&mut *self.exchanges.lock().unwrap())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head and body) from `client`; `None` at end of stream.
async fn read_request(client: &mut TcpStream) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
        if buffer.len() > 1 << 20 {
            return Err(std::io::Error::other("request head over 1 MiB"));
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|line| line.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let mut body = buffer.split_off(head_end);
    if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
        while !body.ends_with(b"0\r\n\r\n") {
            let n = client.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        let length: usize = header("content-length:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while body.len() < length {
            let n = client.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Ok(Some((buffer, body)))
}

/// The head with `Connection: close` in place of the client's connection headers.
fn closing(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + 20);
    let text = &head[..head.len() - 2]; // up to the last header's CRLF
    for line in text.split_inclusive(|&b| b == b'\n') {
        let lower = String::from_utf8_lossy(line).to_ascii_lowercase();
        if lower.starts_with("connection:") || lower.starts_with("keep-alive:") {
            continue;
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

async fn relay(
    mut client: TcpStream,
    upstream: u16,
    pool: &PgPool,
    log: &Mutex<Vec<Exchange>>,
    turn: &tokio::sync::Mutex<()>,
) -> std::io::Result<()> {
    let Some((head, body)) = read_request(&mut client).await? else {
        return Ok(());
    };
    let request_line =
        String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or_default())
            .into_owned();
    let probe = String::from_utf8_lossy(&head)
        .to_ascii_lowercase()
        .contains("\r\nx-schemathesis-probe:");
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();

    let _turn = turn.lock().await;
    let before = snapshot(pool).await;
    let answer = tokio::time::timeout(Duration::from_secs(60), async {
        let mut engine = TcpStream::connect(("127.0.0.1", upstream)).await?;
        engine.write_all(&closing(&head)).await?;
        engine.write_all(&body).await?;
        let mut response = Vec::new();
        engine.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    })
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("no answer within 60 s")))
    .unwrap_or_default();
    let after = snapshot(pool).await;
    let status = String::from_utf8_lossy(&answer[..answer.len().min(16)])
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let changed = match (before, after) {
        (Ok(before), Ok(after)) if before == after => None,
        (before, after) => Some((format!("{before:?}"), format!("{after:?}"))),
    };
    log.lock().unwrap().push(Exchange {
        method,
        target,
        status,
        changed,
        probe,
    });
    client.write_all(&answer).await?;
    client.shutdown().await
}

/// What schemathesis (and reading the code after it) found, one request each: before the fixes
/// these answered 503 (a NUL reaching PostgreSQL), a plain-text 400 that the document does not
/// describe, or (a body of another shape) a 400 that said what is allowed but not what was
/// wrong. Each is now a JSON refusal that names what was wrong, and changes nothing.
async fn refusals_found_by_fuzzing(port: u16, pool: &PgPool, hold: i64) {
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let before = snapshot(pool).await.unwrap();
    let cases: [(&str, String, Option<&str>, u16, &str); 18] = [
        (
            "DELETE",
            format!("/api/v1/holds/{hold}?reason=a%00b"),
            None,
            400,
            "invalid reason: it contains a NUL character",
        ),
        (
            "POST",
            "/api/v1/holds".into(),
            Some(r#"{"tenant": "acme", "reason": "a\u0000b"}"#),
            400,
            "invalid reason: it contains a NUL character",
        ),
        (
            "GET",
            "/api/v1/tenants/a%00b/retention".into(),
            None,
            404,
            "no tenant with id or slug",
        ),
        (
            "GET",
            "/api/v1/holds?tenant=a%00b".into(),
            None,
            404,
            "no tenant with id or slug",
        ),
        (
            "PUT",
            "/api/v1/tenants/a%00b/retention".into(),
            Some(r#"{"data_retention_period": "2h"}"#),
            404,
            "no tenant with id or slug",
        ),
        (
            "GET",
            "/api/v1/holds/abc".into(),
            None,
            400,
            "invalid hold id \"abc\": allowed: an integer",
        ),
        (
            "DELETE",
            "/api/v1/holds/1.5".into(),
            None,
            400,
            "invalid hold id \"1.5\": allowed: an integer",
        ),
        (
            "GET",
            "/api/v1/receipts?limit=ten".into(),
            None,
            400,
            "invalid query string: limit: invalid digit found in string; allowed: tenant=<id or slug>, since=<RFC 3339 instant or date>, limit=<1 to 100000>",
        ),
        (
            "PUT",
            "/api/v1/tenants/acme/retention?dry_run=yes".into(),
            Some(r#"{"data_retention_period": "2h"}"#),
            400,
            "invalid query string: dry_run: provided string was not `true` or `false`; allowed: dry_run=true|false",
        ),
        (
            "GET",
            "/api/v1/tenants/%FF/retention".into(),
            None,
            400,
            "invalid path: Invalid UTF-8 in `id`",
        ),
        (
            "PUT",
            "/api/v1/tenants/acme/retention".into(),
            Some(r#"{"data_retention_period": "2h", "by_status": {}}"#),
            400,
            "by_status names no status; the body must be JSON",
        ),
        // A body refused for its shape says what was wrong with it, then what is allowed.
        (
            "PUT",
            "/api/v1/tenants/acme/retention".into(),
            Some(r#"{"data_retention_period": "2h", "dry_run": true}"#),
            400,
            "unknown key \"dry_run\"; the body must be JSON {\"data_retention_period\"",
        ),
        (
            "POST",
            "/api/v1/holds".into(),
            Some(r#"{"tenant": "acme"}"#),
            400,
            "missing field `reason` at line 1 column 18; the body must be JSON {\"tenant\"",
        ),
        (
            "POST",
            "/api/v1/holds".into(),
            Some(r#"{"tenant": 7, "reason": "audit"}"#),
            400,
            "tenant: invalid type: integer `7`, expected a string",
        ),
        // A query on an operation that takes none is refused, not ignored: this one would
        // otherwise add a hold.
        (
            "POST",
            "/api/v1/holds?dry_run=true".into(),
            Some(r#"{"tenant": "acme", "reason": "audit"}"#),
            400,
            "unknown field `dry_run`, there are no fields; allowed: no query parameters",
        ),
        (
            "GET",
            "/api/v1/tenants/acme/retention?verbose=1".into(),
            None,
            400,
            "allowed: no query parameters",
        ),
        // Paths and methods the server does not have: the same JSON error, naming them.
        (
            "GET",
            "/api/v1/nope".into(),
            None,
            404,
            "no such path: GET /api/v1/nope",
        ),
        (
            "PATCH",
            "/api/v1/holds".into(),
            Some("{}"),
            405,
            "/api/v1/holds does not take PATCH",
        ),
    ];
    for (method, target, body, status, message) in cases {
        let (got, answer) = http(port, method, &target, &auth, body).unwrap();
        assert_eq!(got, status, "{method} {target}: {answer}");
        let json: serde_json::Value = serde_json::from_str(&answer)
            .unwrap_or_else(|_| panic!("{method} {target}: not JSON: {answer}"));
        let error = json["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{method} {target}: {answer}");
    }
    // A misspelt parameter is refused, not ignored (`?limt=5` listed every receipt).
    let (got, answer) = http(port, "GET", "/api/v1/receipts?limt=5", &auth, None).unwrap();
    assert_eq!(got, 400, "{answer}");
    assert!(answer.contains("unknown field `limt`"), "{answer}");
    assert_eq!(
        snapshot(pool).await.unwrap(),
        before,
        "a refusal changed the rows"
    );
}

/// A schemathesis run's outcome.
struct Run {
    success: bool,
    output: String,
    /// The operations its JUnit report lists ("GET /healthz", ...; and "Stateful tests").
    tested: BTreeSet<String>,
}

impl Run {
    /// Panics unless the run passed and its report lists each of `operations` as tested: a run
    /// that reached no operation (a filter too narrow, a document it could not load) fails.
    fn assert_passed(&self, what: &str, operations: &BTreeSet<String>) {
        assert!(self.success, "schemathesis {what}:\n{}", self.output);
        let untested: Vec<&String> = operations.difference(&self.tested).collect();
        assert!(
            !operations.is_empty() && untested.is_empty(),
            "schemathesis {what} did not test {untested:?} (its report lists {:?}):\n{}",
            self.tested,
            self.output
        );
    }
}

/// The names of the test cases of a JUnit report (schemathesis gives each operation one).
fn junit_test_cases(xml: &str) -> BTreeSet<String> {
    xml.split("<testcase name=\"")
        .skip(1)
        // A testcase schemathesis skipped (or could not run) was not tested.
        .filter(|case| !case.contains("<skipped") && !case.contains("<error"))
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name))
        .map(|name| {
            name.replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&")
        })
        .collect()
}

/// Every operation of `document`, as schemathesis names them ("GET /healthz").
fn operations(document: &serde_json::Value) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            all.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    all
}

/// `schemathesis run` against the engine through the proxy with `checks`, bounded in examples
/// and time.
#[allow(clippy::too_many_arguments)]
async fn run_schemathesis(
    dir: &Path,
    config: &Path,
    location: &str,
    base_url: Option<&str>,
    max_examples: u32,
    checks: &str,
    args: &[&str],
) -> Run {
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.to_string());
    let name = fastrand::u32(..);
    let log = dir.join(format!("schemathesis-{name}.log"));
    let junit = dir.join(format!("schemathesis-{name}.xml"));
    let mut command = tokio::process::Command::new(schemathesis());
    command
        .arg("--config-file")
        .arg(config)
        .args(["run", location, "--checks", checks])
        .args(["--max-examples", &max_examples.to_string()])
        .args(["--seed", &seed])
        .args(["--workers", "1", "--request-timeout", "20"])
        .args(["--generation-database", "none", "--no-color"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&junit)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::options().append(true).open(&log).unwrap(),
        ))
        .kill_on_drop(true);
    if let Some(url) = base_url {
        command.args(["--url", url]);
    }
    let mut child = command.spawn().expect("running schemathesis");
    let status = tokio::time::timeout(RUN_TIMEOUT, child.wait()).await;
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    match status {
        Ok(status) => Run {
            success: status.unwrap().success(),
            output,
            tested: junit_test_cases(&std::fs::read_to_string(&junit).unwrap_or_default()),
        },
        Err(_) => {
            let _ = child.kill().await;
            panic!(
                "schemathesis did not finish within {} s:\n{output}",
                RUN_TIMEOUT.as_secs()
            )
        }
    }
}

/// Panics with the exchanges that changed rows they must not have.
fn assert_refusals_changed_nothing(run: &str, exchanges: &[Exchange]) {
    let mut report = String::new();
    for exchange in exchanges
        .iter()
        .filter(|e| e.must_change_nothing() && e.changed.is_some())
    {
        let (before, after) = exchange.changed.as_ref().unwrap();
        let _ = writeln!(
            report,
            "{} {} answered {} and changed the rows:\nbefore: {before}\nafter:  {after}",
            exchange.method, exchange.target, exchange.status
        );
    }
    assert!(report.is_empty(), "{run}:\n{report}");
}

/// The (method, route, status) seen.
fn answers(exchanges: &[Exchange]) -> BTreeSet<(String, String, u16)> {
    exchanges
        .iter()
        .map(|e| (e.method.clone(), e.route(), e.status))
        .collect()
}

/// The schemathesis configuration: the seeded ids, offered half the time in place of generated
/// ones, so that requests reach real tenants and holds.
fn config(seeded: &Seeded) -> String {
    let quoted: Vec<String> = seeded.tenants.iter().map(|t| format!("{t:?}")).collect();
    let holds: Vec<String> = seeded.holds.iter().map(|h| h.to_string()).collect();
    format!(
        r#"# Written by crates/engine/tests/openapi.rs.
[dictionaries.tenants]
values = [{tenants}]
[dictionaries.holds]
values = [{holds}]

[parameters]
"query.tenant" = {{ dictionary = "tenants", probability = 0.5 }}
"body.tenant" = {{ dictionary = "tenants", probability = 0.5 }}

[[operations]]
include-path-regex = "^/api/v1/tenants/"
parameters = {{ "path.id" = {{ dictionary = "tenants", probability = 0.5 }} }}

[[operations]]
include-path-regex = "^/api/v1/holds/"
parameters = {{ "path.id" = {{ dictionary = "holds", probability = 0.5 }} }}

# A body the schema allows can still be refused for what no JSON Schema can say: a window out of
# 1h..100years ("59m" is a string like "1h"), a hold's `until` already past by the database's
# clock, an archive policy naming no final status or one twice. Those operations may answer 400
# to schema-valid data (their documents say so).
[[operations]]
include-operation-id = ["put_retention", "add_hold", "put_archive"]
checks = {{ positive_data_acceptance = {{ expected-statuses = ["2xx", "400", "401", "403", "404"] }} }}
"#,
        tenants = quoted.join(", "),
        holds = holds.join(", ")
    )
}

/// An answer, read whole.
struct Answer {
    status: u16,
    /// Names in lower case.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `head` and then `body` to the engine, waits `pause` in between (a body that trickles
/// in), closes the sending side after them if `then_close` (a body cut off), and reads the
/// answer.
fn exchange(port: u16, head: &str, body: &[u8], pause: Duration, then_close: bool) -> Answer {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    std::thread::sleep(pause);
    // The server may answer, and close, before it has read the whole body.
    let _ = stream.write_all(body);
    if then_close {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {response:?}"));
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Panics unless `document` says `method route` may answer `answer`: its status, its content
/// type, the headers it documents that the answer carries (an integer where it says so), and a
/// JSON object body with each property the schema requires, of the type it gives.
fn assert_documented(document: &serde_json::Value, method: &str, route: &str, answer: &Answer) {
    let what = format!("{method} {route} answered {}", answer.status);
    let operation = &document["paths"][route][method.to_lowercase()];
    assert!(operation.is_object(), "{what}: no such operation");
    let response = &operation["responses"][answer.status.to_string()];
    assert!(
        response.is_object(),
        "{what}, which the document does not say"
    );
    let content_type = answer.header("content-type").unwrap_or_default();
    let mut schema = &response["content"][content_type]["schema"];
    assert!(
        schema.is_object(),
        "{what} as {content_type}, which the document does not say"
    );
    if let Some(name) = schema["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
    {
        schema = &document["components"]["schemas"][name];
    }
    let body: serde_json::Value = serde_json::from_str(&answer.body)
        .unwrap_or_else(|_| panic!("{what}: not JSON: {}", answer.body));
    assert_eq!(schema["type"], "object", "{what}: {schema}");
    for key in schema["required"].as_array().into_iter().flatten() {
        let key = key.as_str().unwrap();
        let kind = schema["properties"][key]["type"]
            .as_str()
            .unwrap_or_default();
        let fits = match kind {
            "string" => body[key].is_string(),
            "integer" => body[key].is_i64(),
            "boolean" => body[key].is_boolean(),
            "object" => body[key].is_object(),
            "array" => body[key].is_array(),
            _ => !body[key].is_null(),
        };
        assert!(fits, "{what}: `{key}` is not {kind:?}: {}", answer.body);
    }
    for (name, header) in response["headers"].as_object().into_iter().flatten() {
        let Some(value) = answer.header(&name.to_ascii_lowercase()) else {
            continue;
        };
        if header["schema"]["type"] == "integer" {
            assert!(value.parse::<i64>().is_ok(), "{what}: {name}: {value}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_in_the_document_and_refusals_change_nothing() {
    let started = Instant::now();
    // Fails at once, saying how to install it, when it is missing or not 4.x.
    assert_schemathesis_4();
    let dir = tempfile::tempdir().unwrap();
    // Reachable by the unprivileged user the cluster runs as when the tests run as root.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let engine = Engine::start(dir.path(), Some(TOKEN), &[]);

    // The served document is the committed one (which the engine's unit test compares with
    // what the code generates), and needs no token.
    let (status, served) = http(engine.port, "GET", "/api/v1/openapi.json", &[], None).unwrap();
    assert_eq!(status, 200);
    assert!(
        served == std::fs::read_to_string(committed_document()).unwrap(),
        "GET /api/v1/openapi.json is not docs/openapi.json: regenerate it with \
         `ENGINE_WRITE_OPENAPI=1 cargo test -p engine --bin engine openapi`"
    );
    let document: serde_json::Value = serde_json::from_str(&served).unwrap();
    let served_path = dir.path().join("served.json");
    std::fs::write(&served_path, &served).unwrap();
    // What a run loaded from the server tests: every operation but the document's own.
    let mut api = operations(&document);
    assert!(api.remove("GET /api/v1/openapi.json"), "{api:?}");
    assert!(api.len() >= 11, "{api:?}");

    let url = format!(
        "postgres://{}@localhost:5432/{}?host={}",
        testkit::local_postgres::SUPERUSER,
        testkit::local_postgres::DATABASE,
        dir.path().join("postgres").display()
    );
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    // Only requests change the rows: no retention run deletes (and writes receipts) meanwhile.
    for task in retention_controller::tasks::NAMES {
        repository::maintenance::set_paused(&pool, task, true)
            .await
            .unwrap();
    }
    let seeded = seed(&pool).await;
    refusals_found_by_fuzzing(engine.port, &pool, seeded.holds[0]).await;
    let config_path = dir.path().join("schemathesis.toml");
    std::fs::write(&config_path, config(&seeded)).unwrap();
    let proxy = Proxy::start(engine.port, pool.clone()).await;
    let location = format!("http://127.0.0.1:{}/api/v1/openapi.json", proxy.port);
    let base_url = format!("http://127.0.0.1:{}", proxy.port);
    let bearer = format!("Authorization: Bearer {TOKEN}");

    // A document that says otherwise than the server is caught: the tenant's `slug` said to be
    // an integer.
    let mut wrong = document.clone();
    wrong["components"]["schemas"]["TenantRetention"]["properties"]["slug"] =
        serde_json::json!({"type": "integer"});
    let wrong_path = dir.path().join("wrong.json");
    std::fs::write(&wrong_path, wrong.to_string()).unwrap();
    let caught = run_schemathesis(
        dir.path(),
        &config_path,
        wrong_path.to_str().unwrap(),
        Some(&base_url),
        10,
        "all",
        &[
            "--include-operation-id",
            "get_retention",
            "--phases",
            "examples,fuzzing",
            "--header",
            &bearer,
        ],
    )
    .await;
    assert!(
        !caught.success && caught.output.contains("Response violates schema"),
        "schemathesis did not catch a wrong response schema:\n{}",
        caught.output
    );
    assert!(
        caught.tested.contains("GET /api/v1/tenants/{id}/retention"),
        "{:?}",
        caught.tested
    );
    proxy.take();

    // 1. Without the token: every operation under /api/v1 but the document answers 401 (or 405
    // to a method it does not have), and nothing changes.
    let before = snapshot(&pool).await.unwrap();
    let run = run_schemathesis(
        dir.path(),
        &config_path,
        &location,
        None,
        MAX_EXAMPLES,
        "all",
        &[],
    )
    .await;
    run.assert_passed("without the token", &api);
    let exchanges = proxy.take();
    assert_refusals_changed_nothing("without the token", &exchanges);
    assert_eq!(
        snapshot(&pool).await.unwrap(),
        before,
        "requests without the token changed the rows"
    );
    let protected: Vec<&Exchange> = exchanges
        .iter()
        .filter(|e| e.target.starts_with("/api/v1/") && e.route() != "/api/v1/openapi.json")
        .collect();
    assert!(protected.len() > 100, "{} requests", protected.len());
    let let_through: Vec<String> = protected
        .iter()
        .filter(|e| e.status != 401 && e.status != 405)
        .map(|e| format!("{} {} -> {}", e.method, e.target, e.status))
        .collect();
    assert!(
        let_through.is_empty(),
        "answered without the token:\n{}",
        let_through.join("\n")
    );
    eprintln!(
        "without the token: {} requests, {:?} so far",
        exchanges.len(),
        started.elapsed()
    );

    // 2. With the token. `use_after_free` is left out: a removed hold stays on record and
    // readable (`GET /api/v1/holds/{id}` shows who removed it, when and why), by design.
    let run = run_schemathesis(
        dir.path(),
        &config_path,
        &location,
        None,
        MAX_EXAMPLES,
        "all",
        &["--header", &bearer, "--exclude-checks", "use_after_free"],
    )
    .await;
    run.assert_passed("with the token", &api);
    let exchanges = proxy.take();
    assert_refusals_changed_nothing("with the token", &exchanges);
    // The seeded ids let requests through to real tenants and holds: each operation succeeded,
    // and was refused, at least once.
    let seen = answers(&exchanges);
    let missing: Vec<String> = [
        ("GET", "/api/v1/tenants/{id}/retention", 200),
        ("GET", "/api/v1/tenants/{id}/retention", 404),
        ("PUT", "/api/v1/tenants/{id}/retention", 200),
        ("PUT", "/api/v1/tenants/{id}/retention", 400),
        ("PUT", "/api/v1/tenants/{id}/retention", 404),
        ("GET", "/api/v1/holds", 200),
        ("GET", "/api/v1/holds", 400),
        ("GET", "/api/v1/holds", 404),
        ("POST", "/api/v1/holds", 201),
        ("POST", "/api/v1/holds", 400),
        ("POST", "/api/v1/holds", 404),
        ("GET", "/api/v1/holds/{id}", 200),
        ("GET", "/api/v1/holds/{id}", 400),
        ("GET", "/api/v1/holds/{id}", 404),
        ("DELETE", "/api/v1/holds/{id}", 200),
        ("DELETE", "/api/v1/holds/{id}", 409),
        ("GET", "/api/v1/receipts", 200),
        ("GET", "/api/v1/receipts", 400),
        ("GET", "/api/v1/receipts", 404),
    ]
    .into_iter()
    .filter(|(m, r, s)| !seen.contains(&(m.to_string(), r.to_string(), *s)))
    .map(|(m, r, s)| format!("{m} {r} -> {s}"))
    .collect();
    assert!(
        missing.is_empty(),
        "schemathesis never got these answers with the token:\n{}",
        missing.join("\n")
    );
    assert!(
        exchanges.iter().any(|e| e.is_dry_run() && e.status == 200),
        "no dry run succeeded"
    );
    eprintln!(
        "with the token: {} requests, {:?} so far",
        exchanges.len(),
        started.elapsed()
    );

    // 3. The guard's answers (http_limits) are the document's. A header that takes the
    // request's head past http.max_header_bytes (16 KiB): every operation answers 431, as
    // documented, and nothing changes. (The document is read from its file: the server would
    // refuse it too.)
    let before = snapshot(&pool).await.unwrap();
    let padding = format!("X-Padding: {}", "a".repeat(17 * 1024));
    let run = run_schemathesis(
        dir.path(),
        &config_path,
        served_path.to_str().unwrap(),
        Some(&base_url),
        5,
        CONFORMANCE,
        &[
            "--header",
            &bearer,
            "--header",
            &padding,
            "--phases",
            "examples,fuzzing",
        ],
    )
    .await;
    run.assert_passed(
        "with a head over http.max_header_bytes",
        &operations(&document),
    );
    let exchanges = proxy.take();
    assert_refusals_changed_nothing("with a head over http.max_header_bytes", &exchanges);
    let not_431: Vec<String> = exchanges
        .iter()
        .filter(|e| !e.probe && e.status != 431)
        .map(|e| format!("{} {} -> {}", e.method, e.target, e.status))
        .collect();
    assert!(
        exchanges.len() >= operations(&document).len() && not_431.is_empty(),
        "{} requests; not answered 431:\n{}",
        exchanges.len(),
        not_431.join("\n")
    );
    // A body over http.max_body_bytes (64 KiB): 413, as documented, before any handler runs.
    let body = format!(
        "{{\"data_retention_period\": \"2days\"{}}}",
        " ".repeat(65 * 1024)
    );
    let head = format!(
        "PUT /api/v1/tenants/acme/retention HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         {bearer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let answer = exchange(engine.port, &head, body.as_bytes(), Duration::ZERO, false);
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert!(
        answer.body.contains("http.max_body_bytes"),
        "{}",
        answer.body
    );
    assert_documented(&document, "PUT", "/api/v1/tenants/{id}/retention", &answer);
    // A body cut off before its declared length: 400, even where no body is read.
    for (method, target, route) in [
        (
            "PUT",
            "/api/v1/tenants/acme/retention",
            "/api/v1/tenants/{id}/retention",
        ),
        ("GET", "/healthz", "/healthz"),
    ] {
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{bearer}\r\n\
             Content-Type: application/json\r\nContent-Length: 40\r\n\r\n"
        );
        let answer = exchange(engine.port, &head, b"{", Duration::ZERO, true);
        assert_eq!(answer.status, 400, "{method} {target}: {}", answer.body);
        assert!(answer.body.contains("cut off"), "{}", answer.body);
        assert_documented(&document, method, route, &answer);
    }
    assert_eq!(
        snapshot(&pool).await.unwrap(),
        before,
        "requests over the limits changed the rows"
    );
    drop(proxy);
    pool.close().await;
    engine.stop();

    // 4. The API disabled (no http.admin_token): 403 to everything under /api/v1 but the
    // document, nothing changes. `missing_required_header` is left out: it wants 401 for a
    // request without `Authorization`, but with no token configured no header could do, and
    // the answer is 403 (saying to set http.admin_token) whatever the request carries. A short
    // deadline (http.request_timeout = 2s), for a body that trickles in past it.
    let engine = Engine::start(dir.path(), None, &[("ENGINE__HTTP__REQUEST_TIMEOUT", "2s")]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let proxy = Proxy::start(engine.port, pool.clone()).await;
    let location = format!("http://127.0.0.1:{}/api/v1/openapi.json", proxy.port);
    let before = snapshot(&pool).await.unwrap();
    let protected_operations: BTreeSet<String> = api
        .iter()
        .filter(|o| o.contains(" /api/v1/"))
        .cloned()
        .collect();
    let run = run_schemathesis(
        dir.path(),
        &config_path,
        &location,
        None,
        20,
        "all",
        &[
            "--include-path-regex",
            "^/api/v1/",
            "--header",
            &bearer,
            "--exclude-checks",
            "missing_required_header",
        ],
    )
    .await;
    run.assert_passed("with the API disabled", &protected_operations);
    let exchanges = proxy.take();
    assert_refusals_changed_nothing("API disabled", &exchanges);
    let let_through: Vec<String> = exchanges
        .iter()
        .filter(|e| e.target.starts_with("/api/v1/") && e.route() != "/api/v1/openapi.json")
        .filter(|e| e.status != 403 && e.status != 405)
        .map(|e| format!("{} {} -> {}", e.method, e.target, e.status))
        .collect();
    assert!(
        let_through.is_empty(),
        "answered with the API disabled:\n{}",
        let_through.join("\n")
    );
    // A body that has not arrived by the deadline: 503 naming http.request_timeout, as
    // documented.
    let head = "PUT /api/v1/tenants/acme/retention HTTP/1.1\r\nHost: localhost\r\n\
                Connection: close\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n";
    let answer = exchange(engine.port, head, b"{", Duration::from_secs(3), false);
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(
        answer.body.contains("http.request_timeout"),
        "{}",
        answer.body
    );
    assert_documented(&document, "PUT", "/api/v1/tenants/{id}/retention", &answer);
    assert_eq!(snapshot(&pool).await.unwrap(), before);
    drop(proxy);
    pool.close().await;
    engine.stop();
    eprintln!("schemathesis passes took {:?}", started.elapsed());
}
