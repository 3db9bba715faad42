//! The engine's whole settings tree, loaded once at start-up: built-in defaults, then an optional
//! TOML file (`--config` or `ENGINE_CONFIG`), then `ENGINE__SECTION__KEY` environment variables.
//! Loading validates every value; an error names the key, the value and what is allowed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use retention_controller::storage::{Storage, StorageSettings};
use retention_controller::RetentionSettings;
use serde::{Deserialize, Serialize};

pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    /// Where the engine keeps its own files (the embedded PostgreSQL cluster). Default:
    /// `/var/lib/engine` for root, `$XDG_DATA_HOME/engine` (`~/.local/share/engine`) otherwise.
    pub data_dir: Option<PathBuf>,
    pub retention: RetentionSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
    /// Where payloads offloaded from the database are kept (`storage.url`, default
    /// `file://<data_dir>/objects`), and the orphan sweep's settings. Never serialized: it may
    /// hold a secret.
    #[serde(skip_serializing)]
    pub storage: StorageSettings,
}

/// `metrics.*`: what `GET /metrics` exports, bounded whatever the number of tenants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Tenants that get a `retention_tenant_rows_deleted_total` series of their own: the first
    /// this many the process sees; the others are counted under `tenant="other"`. 0: none.
    pub tenant_series: u32,
    /// The `replica` label. Default: the host name (in Kubernetes, the pod's name).
    pub replica: Option<String>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            tenant_series: retention_controller::telemetry::DEFAULT_TENANT_SERIES as u32,
            replica: None,
        }
    }
}

/// Most tenants `metrics.tenant_series` may name.
pub const MAX_TENANT_SERIES: u32 = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// PostgreSQL URL. `DATABASE_URL` wins over it; with neither, the engine starts its own
    /// private PostgreSQL under `data_dir`.
    pub url: Option<String>,
    /// Apply pending migrations when `serve` or `retention run` starts.
    pub migrate: bool,
    pub max_connections: u32,
    /// How long to wait for a connection (at start-up, and from the pool).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: None,
            migrate: true,
            max_connections: 8,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of the admin server (`/healthz`, `/api/v1/...`). Loopback by default: the server
    /// speaks plain HTTP, so anything wider belongs behind a TLS-terminating proxy.
    pub addr: SocketAddr,
    /// Bearer token that `/api/v1/...` requests must carry. Unset: the API refuses every request.
    pub admin_token: Option<String>,
    /// The name recorded as who added or removed a hold through the API with that token.
    pub admin_token_name: String,
    /// Connections of the admin server's own pool (the status page, `/readyz`, the API), apart
    /// from `database.max_connections`: no load on the server takes a retention run's
    /// connection. Also how many such requests run at once; more wait up to a second, then get
    /// 503.
    pub max_connections: u32,
    /// Longest a request may take (and each of its statements): past it, 503.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest request body accepted (bytes): larger gets 413.
    pub max_body_bytes: usize,
    /// Largest request head accepted, all header names and values together (bytes): larger
    /// gets 431.
    pub max_header_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            addr: DEFAULT_HTTP_ADDR.parse().expect("valid default address"),
            admin_token: None,
            admin_token_name: "admin".into(),
            max_connections: 2,
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 64 * 1024,
            max_header_bytes: 16 * 1024,
        }
    }
}

/// `log.*`: how the engine writes its log (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// `log.format`: `text` for people, `json` (one object per line) for log pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Shortest admin token accepted.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the configuration file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    OutOfRange(Vec<String>),
}

impl Settings {
    /// Loads and validates the settings.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        let defaults = Config::try_from(&Settings::default())
            .map_err(|e| SettingsError::Invalid(e.to_string()))?;
        let mut builder = Config::builder().add_source(defaults);
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SettingsError::File {
                    path: path.to_path_buf(),
                    message: "no such file".into(),
                });
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        builder = builder.add_source(
            Environment::with_prefix("ENGINE")
                .prefix_separator("__")
                .separator("__"),
        );
        let settings: Settings =
            builder
                .build()
                .and_then(Config::try_deserialize)
                .map_err(|e| match (file, &e) {
                    (Some(path), config::ConfigError::FileParse { .. }) => SettingsError::File {
                        path: path.to_path_buf(),
                        message: e.to_string(),
                    },
                    _ => SettingsError::Invalid(explain(&e.to_string())),
                })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let mut errors: Vec<String> = self
            .retention
            .validate("retention")
            .into_iter()
            .chain(self.storage.validate("storage"))
            .map(|e| e.to_string())
            .collect();
        if !(1..=100).contains(&self.database.max_connections) {
            errors.push(format!(
                "database.max_connections = {} is not allowed: a whole number from 1 to 100",
                self.database.max_connections
            ));
        }
        if self.retention.parallelism > self.database.max_connections {
            errors.push(format!(
                "retention.parallelism = {} is not allowed: at most database.max_connections ({}), since each worker holds a connection",
                self.retention.parallelism, self.database.max_connections
            ));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(300))
            .contains(&self.database.connect_timeout)
        {
            errors.push(format!(
                "database.connect_timeout = {:?} is not allowed: a duration from 100ms to 5m",
                humantime::format_duration(self.database.connect_timeout).to_string()
            ));
        }
        if let Some(token) = &self.http.admin_token {
            if token.len() < MIN_ADMIN_TOKEN_LEN || token.chars().any(char::is_whitespace) {
                errors.push(format!(
                    "http.admin_token (value hidden, {} characters) is not allowed: at least {MIN_ADMIN_TOKEN_LEN} characters without spaces",
                    token.len()
                ));
            }
        }
        let name = &self.http.admin_token_name;
        if name.trim().is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            errors.push(format!(
                "http.admin_token_name = {name:?} is not allowed: 1 to 64 printable characters"
            ));
        }
        if !(1..=32).contains(&self.http.max_connections) {
            errors.push(format!(
                "http.max_connections = {} is not allowed: a whole number from 1 to 32",
                self.http.max_connections
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.http.request_timeout)
        {
            errors.push(format!(
                "http.request_timeout = {:?} is not allowed: a duration from 1s to 10m",
                humantime::format_duration(self.http.request_timeout).to_string()
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.http.max_body_bytes) {
            errors.push(format!(
                "http.max_body_bytes = {} is not allowed: a whole number of bytes from 1024 to 16777216 (16 MiB)",
                self.http.max_body_bytes
            ));
        }
        if !(1024..=256 * 1024).contains(&self.http.max_header_bytes) {
            errors.push(format!(
                "http.max_header_bytes = {} is not allowed: a whole number of bytes from 1024 to 262144 (256 KiB)",
                self.http.max_header_bytes
            ));
        }
        if self.metrics.tenant_series > MAX_TENANT_SERIES {
            errors.push(format!(
                "metrics.tenant_series = {} is not allowed: a whole number from 0 to {MAX_TENANT_SERIES} (each is a series per task)",
                self.metrics.tenant_series
            ));
        }
        if let Some(replica) = &self.metrics.replica {
            let fine = !replica.is_empty()
                && replica.len() <= 100
                && replica.chars().all(|c| c.is_ascii_graphic());
            if !fine {
                errors.push(format!(
                    "metrics.replica = {replica:?} is not allowed: 1 to 100 visible ASCII characters (a host or pod name), or leave it unset"
                ));
            }
        }
        if matches!(&self.database.url, Some(url) if url.trim().is_empty()) {
            errors.push("database.url = \"\" is not allowed: a PostgreSQL URL (postgres://...), or leave it unset".into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SettingsError::OutOfRange(errors))
        }
    }

    /// The engine's data directory, defaulted as documented on [`Settings::data_dir`].
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// The object store `storage.url` names (made, for the default directory, when missing).
    pub fn open_storage(&self) -> anyhow::Result<std::sync::Arc<Storage>> {
        Storage::open(&self.storage, &self.data_dir())
            .map(std::sync::Arc::new)
            .map_err(|error| anyhow::anyhow!("storage.url: {error}"))
    }

    /// Every maintenance task, `blobs` with the object store.
    pub fn tasks(
        &self,
    ) -> anyhow::Result<Vec<std::sync::Arc<dyn retention_controller::MaintenanceTask>>> {
        let storage = self.open_storage()?;
        Ok(retention_controller::tasks::all(
            &self.retention,
            Some((storage, &self.storage)),
        ))
    }
}

fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/engine");
    }
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/share")));
    data_home.map_or_else(|| PathBuf::from(".engine-data"), |dir| dir.join("engine"))
}

/// Adds what is allowed to the `config` crate's terse messages about the value types it knows.
fn explain(message: &str) -> String {
    let hint = if message.contains("timeout")
        || message.contains("interval")
        || message.contains("ttl")
        || message.contains("max_run_time")
    {
        " (durations are written like \"90s\", \"15m\", \"24h\", \"7days\")"
    } else if message.contains("`log.format`") {
        " (allowed: \"text\" or \"json\")"
    } else if message.contains("_bytes") {
        " (a whole number of bytes, like 65536)"
    } else if message.contains("http.addr") {
        " (an address and port, like \"127.0.0.1:8080\" or \"[::]:8080\")"
    } else if message.contains("unknown field") {
        " (see docs/configuration.md for every key)"
    } else {
        ""
    };
    format!("{message}{hint}")
}
