//! Helpers for driving the `engine` binary from tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The engine with a clean environment: no inherited ENGINE*/DATABASE_URL/RUST_LOG settings.
pub fn engine() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_engine"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("ENGINE") || key == "DATABASE_URL" || key == "RUST_LOG" {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

pub fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request; returns (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `engine serve` on a free port, killed when dropped.
pub struct Served {
    pub child: std::process::Child,
    pub port: u16,
}

impl Served {
    pub fn start(database_url: &str, env: &[(&str, &str)]) -> Served {
        Served::start_logging(database_url, env, Stdio::null())
    }

    /// [`Served::start`], its log (stderr) going to `log`.
    pub fn start_logging(
        database_url: &str,
        env: &[(&str, &str)],
        log: impl Into<Stdio>,
    ) -> Served {
        let port = free_port();
        let child = engine()
            .env("DATABASE_URL", database_url)
            .env("ENGINE__HTTP__ADDR", format!("127.0.0.1:{port}"))
            .envs(env.iter().copied())
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_until("/healthz", Duration::from_secs(30), || {
            http(port, "GET", "/healthz", &[], None).is_some_and(|(s, _)| s == 200)
        });
        Served { child, port }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the engine is to find an S3 store's credentials.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// In its settings (`ENGINE__STORAGE__S3__ACCESS_KEY_ID`, ...).
    Settings,
    /// In the environment, as AWS's tools read them (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`), with no key in the engine's settings.
    Environment,
}

/// The engine's environment for `settings`' store.
pub fn store_env(
    settings: &retention_controller::storage::StorageSettings,
    credentials: Credentials,
) -> Vec<(&'static str, String)> {
    let mut env = vec![("ENGINE__STORAGE__URL", settings.url.clone().unwrap())];
    let s3 = &settings.s3;
    let (id, secret) = match credentials {
        Credentials::Settings => (
            "ENGINE__STORAGE__S3__ACCESS_KEY_ID",
            "ENGINE__STORAGE__S3__SECRET_ACCESS_KEY",
        ),
        Credentials::Environment => ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    };
    for (key, value) in [
        ("ENGINE__STORAGE__S3__ENDPOINT", s3.endpoint.clone()),
        ("ENGINE__STORAGE__S3__REGION", s3.region.clone()),
        (id, s3.access_key_id.clone()),
        (secret, s3.secret_access_key.clone()),
    ] {
        if let Some(value) = value {
            env.push((key, value));
        }
    }
    if s3.endpoint.is_some() {
        env.push(("ENGINE__STORAGE__S3__ALLOW_HTTP", s3.allow_http.to_string()));
        env.push((
            "ENGINE__STORAGE__S3__VIRTUAL_HOSTED_STYLE",
            s3.virtual_hosted_style.to_string(),
        ));
    }
    env
}
