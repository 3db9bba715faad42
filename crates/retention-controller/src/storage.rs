//! Object storage for the payloads that tasks offload (issue 24): a directory on this machine
//! (`file:///abs/path`) or a bucket of any S3-compatible store (`s3://bucket/prefix`), both
//! through the `object_store` crate.
//!
//! Keys are deterministic and name their owner ([`payload_key`]: tenant, day, payload id), so a
//! sweep can check every object it lists against the database. Keys are relative to the
//! configured prefix: what [`Storage::list`] returns goes back into [`Storage::get`] and
//! [`Storage::delete`] unchanged.
//!
//! A call fails within seconds when the store is down ([`CONNECT_TIMEOUT`], a few quick retries
//! inside `object_store`, [`RETRY_TIMEOUT`]): the caller, a maintenance task, does its own
//! backoff, and [`StorageError::is_retryable`] tells it whether trying again later may help.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use serde::Deserialize;
use uuid::Uuid;

use crate::settings::SettingError;

/// Where every payload object lives, under the configured prefix.
pub const PAYLOADS_PREFIX: &str = "payloads/";
/// Where archive files are (see [`crate::archive::archive_key`]).
pub const ARCHIVE_PREFIX: &str = "archive/";

/// How old an object with no row must be before a sweep may delete it: longer than any upload
/// takes to be followed by its row's commit.
pub const DEFAULT_ORPHAN_GRACE: Duration = Duration::from_secs(86_400);
const MIN_ORPHAN_GRACE: Duration = Duration::from_secs(1);
/// 100 years as humantime counts them (365.25 days each).
const MAX_ORPHAN_GRACE: Duration = Duration::from_secs(3_155_760_000);

/// The longest wait for a connection to an S3 endpoint. A store that is down refuses at once;
/// one that is unreachable costs this much per attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest one request may take, body included (payloads are small).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Retries of one request inside `object_store` (connection errors, 5xx, SlowDown, timeouts of
/// idempotent requests). Few and short: the caller backs off between runs.
pub const MAX_RETRIES: usize = 2;
/// No retry starts later than this after the first attempt.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(10);
/// The most keys one S3 DeleteObjects request takes.
pub const DELETE_BATCH: usize = 1_000;

/// `storage.*`: where offloaded payloads are kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// `file:///absolute/path` or `s3://bucket[/prefix]`. Unset: `file://<data_dir>/objects`.
    pub url: Option<String>,
    /// How old an object that no row names must be before the orphan sweep deletes it.
    #[serde(with = "humantime_serde")]
    pub orphan_grace: Duration,
    /// The orphan sweep only reports what it would delete. Unset: the sweep decides.
    pub sweep_dry_run: Option<bool>,
    /// For `s3://` URLs.
    pub s3: S3Settings,
}

impl Default for StorageSettings {
    fn default() -> Self {
        StorageSettings {
            url: None,
            orphan_grace: DEFAULT_ORPHAN_GRACE,
            sweep_dry_run: None,
            s3: S3Settings::default(),
        }
    }
}

/// `storage.s3.*`. Whatever is unset comes from the environment as the AWS tools read it
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`, ...); what is set
/// here wins.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Settings {
    /// An S3-compatible endpoint (`http://127.0.0.1:8333` for SeaweedFS or MinIO). Unset: AWS.
    pub endpoint: Option<String>,
    /// Unset: the environment's, else `us-east-1` (what S3-compatible stores expect).
    pub region: Option<String>,
    /// Allow an `http://` endpoint (no TLS).
    pub allow_http: bool,
    /// Address buckets as `https://<bucket>.<endpoint>` rather than `https://<endpoint>/<bucket>`
    /// (path style, which S3-compatible stores need).
    pub virtual_hosted_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Where a [`StorageSettings::url`] points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on this machine (absolute).
    File(PathBuf),
    /// A bucket, and the prefix (no leading or trailing `/`, possibly empty) under which every
    /// key lives.
    S3 { bucket: String, prefix: String },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(dir) => write!(f, "file://{}", dir.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

const URL_ALLOWED: &str = "file:///absolute/path or s3://bucket[/prefix]";

impl StorageSettings {
    /// Where objects go; `data_dir` gives the default.
    pub fn location(&self, data_dir: &Path) -> Result<Location, SettingError> {
        self.parse_url("storage.url", data_dir)
    }

    fn parse_url(&self, key: &str, data_dir: &Path) -> Result<Location, SettingError> {
        let Some(raw) = &self.url else {
            return Ok(Location::File(data_dir.join("objects")));
        };
        let error = |allowed: String| SettingError {
            key: key.to_string(),
            value: raw.clone(),
            allowed,
        };
        let url = url::Url::parse(raw).map_err(|e| error(format!("a URL ({e}): {URL_ALLOWED}")))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(error(format!(
                "no query or fragment (`?`, `#`): {URL_ALLOWED}"
            )));
        }
        match url.scheme() {
            "file" => {
                // `file://dir/x` names a host `dir`, and `file:dir` is read as `/dir`: only the
                // three-slash form is unambiguous.
                if !raw.starts_with("file:///") {
                    return Err(error(format!(
                        "an absolute path after file:// (file:///var/lib/engine/objects); a relative path or a host is not allowed: {URL_ALLOWED}"
                    )));
                }
                let dir = url
                    .to_file_path()
                    .map_err(|()| error(format!("an absolute local path: {URL_ALLOWED}")))?;
                Ok(Location::File(dir))
            }
            "s3" => {
                let bucket = url.host_str().unwrap_or_default();
                if bucket.is_empty() {
                    return Err(error(format!(
                        "a bucket name after s3:// (s3://payloads-bucket/engine): {URL_ALLOWED}"
                    )));
                }
                check_bucket(bucket).map_err(|why| error(format!("{why}: {URL_ALLOWED}")))?;
                if url.port().is_some() || !url.username().is_empty() || url.password().is_some() {
                    return Err(error(format!(
                        "a bare bucket name after s3:// (no port or credentials: the endpoint is storage.s3.endpoint, credentials storage.s3.*): {URL_ALLOWED}"
                    )));
                }
                // The URL parser resolves `.` and `..` and escapes what it must: the prefix is
                // taken only as written.
                let prefix = url.path().trim_matches('/');
                let written = raw["s3://".len()..]
                    .split_once('/')
                    .map_or("", |(_, path)| path)
                    .trim_matches('/');
                if !prefix.is_empty() || !written.is_empty() {
                    let parsed = ObjectPath::parse(prefix);
                    if parsed.is_err() || prefix.contains("//") || prefix != written {
                        return Err(error(format!(
                            "a prefix of non-empty segments without `.`, `..` or characters to escape (s3://bucket/engine/prod): {URL_ALLOWED}"
                        )));
                    }
                }
                Ok(Location::S3 {
                    bucket: bucket.to_string(),
                    prefix: prefix.to_string(),
                })
            }
            other => Err(error(format!(
                "scheme {other:?} is not supported: {URL_ALLOWED}"
            ))),
        }
    }

    /// Every invalid value, each named by its full key (`prefix` is this section's key, normally
    /// `storage`).
    pub fn validate(&self, prefix: &str) -> Vec<SettingError> {
        let mut errors = Vec::new();
        let key = |name: &str| format!("{prefix}.{name}");
        // The data directory only fills in the default, which is always valid.
        let location = self.parse_url(&key("url"), Path::new("/"));
        if let Err(e) = &location {
            errors.push(e.clone());
        }
        if !(MIN_ORPHAN_GRACE..=MAX_ORPHAN_GRACE).contains(&self.orphan_grace) {
            errors.push(SettingError {
                key: key("orphan_grace"),
                value: humantime::format_duration(self.orphan_grace).to_string(),
                allowed: format!(
                    "a duration from {} to {}: how old an object no row names must be before the sweep deletes it (longer than an upload takes to be followed by its row; default {})",
                    humantime::format_duration(MIN_ORPHAN_GRACE),
                    humantime::format_duration(MAX_ORPHAN_GRACE),
                    humantime::format_duration(DEFAULT_ORPHAN_GRACE),
                ),
            });
        }
        let s3 = &self.s3;
        if let Some(endpoint) = &s3.endpoint {
            match url::Url::parse(endpoint) {
                Ok(url) if url.scheme() == "https" && url.host_str().is_some() => {}
                Ok(url) if url.scheme() == "http" && url.host_str().is_some() => {
                    if !s3.allow_http {
                        errors.push(SettingError {
                            key: key("s3.endpoint"),
                            value: endpoint.clone(),
                            allowed: format!(
                                "an https:// URL, or http:// with {prefix}.s3.allow_http = true"
                            ),
                        });
                    }
                }
                _ => errors.push(SettingError {
                    key: key("s3.endpoint"),
                    value: endpoint.clone(),
                    allowed: "an http:// or https:// URL with a host (http://127.0.0.1:8333)"
                        .into(),
                }),
            }
        }
        if s3.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
            errors.push(SettingError {
                key: key("s3.region"),
                value: String::new(),
                allowed: "a region name (us-east-1), or unset for the environment's".into(),
            });
        }
        for (name, value) in [
            ("s3.access_key_id", &s3.access_key_id),
            ("s3.secret_access_key", &s3.secret_access_key),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                errors.push(SettingError {
                    key: key(name),
                    value: String::new(),
                    allowed: "a non-empty value, or unset for the environment's".into(),
                });
            }
        }
        if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
            let (set, unset) = if s3.access_key_id.is_some() {
                ("s3.access_key_id", "s3.secret_access_key")
            } else {
                ("s3.secret_access_key", "s3.access_key_id")
            };
            errors.push(SettingError {
                key: key(unset),
                value: "(unset)".into(),
                allowed: format!("set together with {prefix}.{set}, or both unset"),
            });
        }
        errors
    }
}

/// S3's bucket naming rules, in short.
fn check_bucket(bucket: &str) -> Result<(), String> {
    let valid_chars = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    let ends = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&bucket.len())
        || !valid_chars
        || !ends(bucket.chars().next())
        || !ends(bucket.chars().last())
    {
        return Err(format!(
            "bucket {bucket:?} is not a valid bucket name (3 to 63 lowercase letters, digits, `-` and `.`, starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// The key of a payload: `payloads/<tenant>/<yyyy-mm-dd>/<payload id>`, relative to the prefix.
/// It names its owner, so a sweep can check it against the database.
pub fn payload_key(tenant: Uuid, day: NaiveDate, payload_id: i64) -> String {
    format!(
        "{PAYLOADS_PREFIX}{}/{}/{payload_id}",
        tenant.as_hyphenated(),
        day.format("%Y-%m-%d")
    )
}

/// What a storage call failed with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// No object at the key.
    #[error("no object at {key:?}")]
    NotFound { key: String },
    /// The store did not answer in time, refused the connection, or answered with a server
    /// error (5xx, SlowDown): the same call may succeed later.
    #[error("object store unavailable ({operation} {key:?}): {message}")]
    Unavailable {
        operation: &'static str,
        key: String,
        message: String,
    },
    /// Anything else: credentials refused, a bad request, a local I/O error.
    #[error("object store error ({operation} {key:?}): {message}")]
    Failed {
        operation: &'static str,
        key: String,
        message: String,
    },
    /// A key that is empty or has an empty, `.` or `..` segment.
    #[error("{key:?} is not a valid object key: {reason}")]
    InvalidKey { key: String, reason: String },
    /// The settings do not describe a usable store.
    #[error("invalid storage settings: {}", join(.0))]
    Settings(Vec<SettingError>),
    /// The store could not be set up (the directory could not be created, ...).
    #[error("cannot open the object store {url}: {message}")]
    Open { url: String, message: String },
}

fn join(errors: &[SettingError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl StorageError {
    /// Trying the same call again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Unavailable { .. })
    }

    fn from_store(operation: &'static str, key: &str, error: &object_store::Error) -> StorageError {
        let key = key.to_string();
        if let object_store::Error::NotFound { .. } = error {
            return StorageError::NotFound { key };
        }
        let message = error.to_string();
        if is_transient(error) {
            StorageError::Unavailable {
                operation,
                key,
                message,
            }
        } else {
            StorageError::Failed {
                operation,
                key,
                message,
            }
        }
    }
}

/// Whether an error from `object_store` is one that time may cure: a connection refused or
/// reset, a timeout, or a server error. `object_store` keeps the type carrying the HTTP status
/// private (its `RetryError`), so the status is read from its message ("Server returned non-2xx
/// status code: 503 ...") and S3's error codes from the body it quotes; transport failures are
/// the public `HttpError`, found on the source chain.
fn is_transient(error: &(dyn std::error::Error + 'static)) -> bool {
    use object_store::client::{HttpError, HttpErrorKind};
    use std::io::ErrorKind;
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(http) = e.downcast_ref::<HttpError>() {
            if matches!(
                http.kind(),
                HttpErrorKind::Connect
                    | HttpErrorKind::Request
                    | HttpErrorKind::Timeout
                    | HttpErrorKind::Interrupted
            ) {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                ErrorKind::TimedOut
                    | ErrorKind::Interrupted
                    | ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::NotConnected
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
            ) {
                return true;
            }
        }
        let text = e.to_string();
        if text.contains("status code: 5")
            || [
                "SlowDown",
                "InternalError",
                "ServiceUnavailable",
                "RequestTimeout",
            ]
            .iter()
            .any(|code| text.contains(&format!("<Code>{code}</Code>")))
        {
            return true;
        }
        current = e.source();
    }
    false
}

/// What [`Storage::delete`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// The object is gone. S3 answers a delete the same whether the key existed or not, so on
    /// S3 this is also the answer for a key that was never there.
    Removed,
    /// The store said there was no such object (a local directory says so; S3 does not).
    WasMissing,
}

/// One object [`Storage::list`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Relative to the configured prefix, as [`Storage::get`] and [`Storage::delete`] take it.
    pub key: String,
    pub last_modified: DateTime<Utc>,
    pub size: u64,
}

/// The object store the engine offloads payloads to, with keys relative to its prefix.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    location: Location,
    /// For messages: the location and, for S3, the endpoint. Never a secret.
    display: String,
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("url", &self.display)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

impl Storage {
    /// Opens the store the settings name (validating them first). A local directory is created
    /// if missing. Nothing is sent to an S3 store yet: a wrong bucket or credentials show on the
    /// first call.
    pub fn open(settings: &StorageSettings, data_dir: &Path) -> Result<Storage, StorageError> {
        let errors = settings.validate("storage");
        if !errors.is_empty() {
            return Err(StorageError::Settings(errors));
        }
        let location = settings
            .location(data_dir)
            .map_err(|e| StorageError::Settings(vec![e]))?;
        let open_error = |message: String| StorageError::Open {
            url: location.to_string(),
            message,
        };
        match &location {
            Location::File(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| open_error(format!("cannot create the directory: {e}")))?;
                let store = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| open_error(e.to_string()))?
                    // Directories of a tenant's day go when their last object does.
                    .with_automatic_cleanup(true)
                    // A row must never name a payload that a crash lost: an object is on disk
                    // when `put` returns, as on S3.
                    .with_fsync(true);
                Ok(Storage {
                    store: Arc::new(store),
                    display: location.to_string(),
                    location,
                })
            }
            Location::S3 { bucket, prefix } => {
                let s3 = &settings.s3;
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(s3.virtual_hosted_style)
                    .with_client_options(
                        ClientOptions::new()
                            .with_connect_timeout(CONNECT_TIMEOUT)
                            .with_timeout(REQUEST_TIMEOUT),
                    )
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig {
                            init_backoff: Duration::from_millis(100),
                            max_backoff: Duration::from_secs(1),
                            base: 2.0,
                        },
                        max_retries: MAX_RETRIES,
                        retry_timeout: RETRY_TIMEOUT,
                    });
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if s3.allow_http {
                    builder = builder.with_allow_http(true);
                }
                if let Some(region) = &s3.region {
                    builder = builder.with_region(region);
                }
                if let (Some(id), Some(secret)) = (&s3.access_key_id, &s3.secret_access_key) {
                    builder = builder
                        .with_access_key_id(id)
                        .with_secret_access_key(secret);
                }
                let store = builder.build().map_err(|e| open_error(e.to_string()))?;
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(store)
                } else {
                    Arc::new(PrefixStore::new(store, prefix.as_str()))
                };
                let display = match &s3.endpoint {
                    Some(endpoint) => format!("{location} at {endpoint}"),
                    None => location.to_string(),
                };
                Ok(Storage {
                    store,
                    location,
                    display,
                })
            }
        }
    }

    /// Where the objects are.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Whether the store is there at all. A directory store whose directory is gone (a volume
    /// not mounted, say) would answer every delete "not found", which counts as deleted: the
    /// outbox would let go of objects that live on, elsewhere. So its absence is "unavailable".
    /// (An S3 store answers for itself: every call fails while it is down.)
    pub fn check_available(&self) -> Result<(), StorageError> {
        match &self.location {
            Location::File(dir) if !dir.is_dir() => Err(StorageError::Unavailable {
                operation: "open",
                key: String::new(),
                message: format!(
                    "the directory {} is not there (not mounted?)",
                    dir.display()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Stores `bytes` at `key`, replacing any object there.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        let path = object_path(key)?;
        self.store
            .put(&path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| StorageError::from_store("put", key, &e))
    }

    /// The object at `key`, or `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        let path = object_path(key)?;
        let result = async { self.store.get(&path).await?.bytes().await }.await;
        match result {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StorageError::from_store("get", key, &e)),
        }
    }

    /// Whether there is an object at `key` (one HEAD request).
    pub async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        let path = object_path(key)?;
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StorageError::from_store("head", key, &e)),
        }
    }

    /// Deletes the object at `key`. A missing object counts as deleted; whether it was there is
    /// known only where the store says so (see [`Deleted`]): no HEAD is spent to find out.
    pub async fn delete(&self, key: &str) -> Result<Deleted, StorageError> {
        let path = object_path(key)?;
        match self.store.delete(&path).await {
            Ok(()) => Ok(Deleted::Removed),
            Err(object_store::Error::NotFound { .. }) => Ok(Deleted::WasMissing),
            Err(e) => Err(StorageError::from_store("delete", key, &e)),
        }
    }

    /// Deletes every key, [`DELETE_BATCH`] keys a request on S3 (DeleteObjects), one batch after
    /// the other, and tells each key's outcome in the order given. A missing object counts as
    /// deleted. A request that fails as a whole fails each of its keys with its error.
    pub async fn delete_many(&self, keys: Vec<String>) -> Vec<(String, Result<(), StorageError>)> {
        let mut outcomes = Vec::with_capacity(keys.len());
        let mut keys = keys.into_iter().peekable();
        while keys.peek().is_some() {
            let chunk: Vec<String> = keys.by_ref().take(DELETE_BATCH).collect();
            let mut valid = Vec::with_capacity(chunk.len());
            for key in chunk {
                match object_path(&key) {
                    Ok(path) => valid.push((key, path)),
                    Err(e) => outcomes.push((key, Err(e))),
                }
            }
            if valid.is_empty() {
                continue;
            }
            let paths: Vec<object_store::Result<ObjectPath>> =
                valid.iter().map(|(_, path)| Ok(path.clone())).collect();
            let results: Vec<object_store::Result<ObjectPath>> = self
                .store
                .delete_stream(stream::iter(paths).boxed())
                .collect()
                .await;
            if results.len() == valid.len() {
                // One result per key, in order (local files and S3's batches both keep it).
                for ((key, _), result) in valid.into_iter().zip(results) {
                    let outcome = match result {
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                        Err(e) => Err(StorageError::from_store("delete", &key, &e)),
                    };
                    outcomes.push((key, outcome));
                }
            } else {
                // The batch's request failed as a whole: one error stands for all of its keys.
                let error = results.into_iter().find_map(Result::err);
                for (key, _) in valid {
                    let outcome = match &error {
                        Some(e) => Err(StorageError::from_store("delete", &key, e)),
                        None => Err(StorageError::Failed {
                            operation: "delete",
                            key: key.clone(),
                            message: "the store reported fewer outcomes than keys".into(),
                        }),
                    };
                    outcomes.push((key, outcome));
                }
            }
        }
        outcomes
    }

    /// Every object whose key starts with the segments of `prefix` (relative to the configured
    /// prefix; `payloads/` takes `payloads/x` but not `payloadsx`), in no particular order. An
    /// empty prefix lists everything under the configured one.
    pub fn list(&self, prefix: &str) -> BoxStream<'static, Result<ListedObject, StorageError>> {
        let path = match ObjectPath::parse(prefix) {
            Ok(path) => path,
            Err(e) => {
                let error = StorageError::InvalidKey {
                    key: prefix.to_string(),
                    reason: e.to_string(),
                };
                return stream::once(async move { Err(error) }).boxed();
            }
        };
        let prefix = prefix.to_string();
        let listed = if path.is_root() {
            self.store.list(None)
        } else {
            self.store.list(Some(&path))
        };
        listed
            .map_ok(|meta| ListedObject {
                key: meta.location.to_string(),
                last_modified: meta.last_modified,
                size: meta.size,
            })
            .map_err(move |e| StorageError::from_store("list", &prefix, &e))
            .boxed()
    }

    /// [`Storage::list`], collected.
    pub async fn list_all(&self, prefix: &str) -> Result<Vec<ListedObject>, StorageError> {
        self.list(prefix).try_collect().await
    }
}

/// A key as `object_store` takes it, refusing what would not round-trip.
fn object_path(key: &str) -> Result<ObjectPath, StorageError> {
    let invalid = |reason: String| StorageError::InvalidKey {
        key: key.to_string(),
        reason,
    };
    if key.is_empty() || key.starts_with('/') || key.ends_with('/') {
        return Err(invalid(
            "a key is non-empty and neither starts nor ends with `/`".into(),
        ));
    }
    let path = ObjectPath::parse(key).map_err(|e| invalid(e.to_string()))?;
    if path.as_ref() != key {
        return Err(invalid("a key is a plain relative path".into()));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url(url: &str) -> StorageSettings {
        StorageSettings {
            url: Some(url.into()),
            ..StorageSettings::default()
        }
    }

    fn keys(errors: &[SettingError]) -> Vec<&str> {
        errors.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn a_payload_key_names_tenant_day_and_id() {
        let tenant = Uuid::parse_str("0190F3A2-7B1C-7D4E-9F00-0123456789AB").unwrap();
        let day = NaiveDate::from_ymd_opt(2026, 3, 7).unwrap();
        assert_eq!(
            payload_key(tenant, day, 42),
            "payloads/0190f3a2-7b1c-7d4e-9f00-0123456789ab/2026-03-07/42"
        );
        assert!(payload_key(tenant, day, 42).starts_with(PAYLOADS_PREFIX));
        assert_eq!(
            payload_key(Uuid::nil(), NaiveDate::from_ymd_opt(999, 1, 2).unwrap(), -1),
            "payloads/00000000-0000-0000-0000-000000000000/0999-01-02/-1"
        );
        // Every payload key is a valid object key.
        object_path(&payload_key(tenant, day, i64::MAX)).unwrap();
    }

    #[test]
    fn the_default_is_a_directory_under_the_data_directory() {
        let settings = StorageSettings::default();
        assert!(settings.validate("storage").is_empty());
        assert_eq!(
            settings.location(Path::new("/var/lib/engine")).unwrap(),
            Location::File(PathBuf::from("/var/lib/engine/objects"))
        );
        assert_eq!(settings.orphan_grace, Duration::from_secs(86_400));
        assert_eq!(settings.sweep_dry_run, None);
    }

    #[test]
    fn urls_name_a_directory_or_a_bucket_and_prefix() {
        let data = Path::new("/data");
        assert_eq!(
            with_url("file:///srv/objects").location(data).unwrap(),
            Location::File(PathBuf::from("/srv/objects"))
        );
        assert_eq!(
            with_url("file:///srv/my%20objects/")
                .location(data)
                .unwrap(),
            Location::File(PathBuf::from("/srv/my objects/"))
        );
        assert_eq!(
            with_url("s3://bucket-1").location(data).unwrap(),
            Location::S3 {
                bucket: "bucket-1".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            with_url("s3://bucket-1/engine/prod/")
                .location(data)
                .unwrap(),
            Location::S3 {
                bucket: "bucket-1".into(),
                prefix: "engine/prod".into()
            }
        );
        assert_eq!(
            with_url("s3://bucket-1/engine/prod")
                .location(data)
                .unwrap()
                .to_string(),
            "s3://bucket-1/engine/prod"
        );
    }

    #[test]
    fn bad_urls_are_refused_with_what_is_allowed() {
        for (url, says) in [
            ("file://relative/dir", "absolute path"),
            ("file:relative", "absolute path"),
            ("relative/dir", "a URL"),
            ("/abs/dir", "a URL"),
            ("gs://bucket/x", "scheme \"gs\" is not supported"),
            ("https://s3.amazonaws.com/bucket", "scheme \"https\""),
            ("s3:///prefix", "a bucket name"),
            ("s3://", "a bucket name"),
            ("s3://Bucket", "not a valid bucket name"),
            ("s3://ab", "not a valid bucket name"),
            ("s3://bucket_x", "not a valid bucket name"),
            ("s3://bucket:9000/x", "no port"),
            ("s3://key:secret@bucket/x", "no port or credentials"),
            ("s3://bucket/a//b", "non-empty segments"),
            ("s3://bucket/a/../b", "non-empty segments"),
            ("s3://bucket/./b", "non-empty segments"),
            ("s3://bucket/a b", "non-empty segments"),
            ("s3://bucket/x?versionId=1", "no query"),
        ] {
            let errors = with_url(url).validate("storage");
            assert_eq!(keys(&errors), ["storage.url"], "{url}");
            let message = errors[0].to_string();
            assert!(message.contains(says), "{url}: {message}");
            assert!(message.contains(URL_ALLOWED), "{url}: {message}");
            assert!(message.contains(url), "{url}: {message}");
        }
    }

    #[test]
    fn orphan_grace_must_be_positive() {
        let settings = StorageSettings {
            orphan_grace: Duration::ZERO,
            ..StorageSettings::default()
        };
        let errors = settings.validate("storage");
        assert_eq!(keys(&errors), ["storage.orphan_grace"]);
        assert!(
            errors[0].to_string().contains("from 1s to"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn s3_settings_are_checked() {
        let mut settings = with_url("s3://bucket/x");
        settings.s3.endpoint = Some("http://127.0.0.1:8333".into());
        let errors = settings.validate("storage");
        assert_eq!(keys(&errors), ["storage.s3.endpoint"]);
        assert!(errors[0].to_string().contains("allow_http = true"));
        settings.s3.allow_http = true;
        assert!(settings.validate("storage").is_empty());

        settings.s3.endpoint = Some("127.0.0.1:8333".into());
        assert_eq!(keys(&settings.validate("storage")), ["storage.s3.endpoint"]);
        settings.s3.endpoint = Some("https://minio.internal:9000".into());
        assert!(settings.validate("storage").is_empty());

        settings.s3.access_key_id = Some("key".into());
        let errors = settings.validate("storage");
        assert_eq!(keys(&errors), ["storage.s3.secret_access_key"]);
        assert!(errors[0].to_string().contains("storage.s3.access_key_id"));
        settings.s3.secret_access_key = Some("secret".into());
        assert!(settings.validate("storage").is_empty());
        settings.s3.region = Some(" ".into());
        assert_eq!(keys(&settings.validate("storage")), ["storage.s3.region"]);
    }

    #[test]
    fn settings_deserialize_with_humantime_and_refuse_unknown_keys() {
        let settings: StorageSettings = serde_json::from_str(
            r#"{"url": "s3://b-1/p", "orphan_grace": "2h", "sweep_dry_run": true,
                "s3": {"endpoint": "http://127.0.0.1:1", "allow_http": true,
                       "access_key_id": "k", "secret_access_key": "s"}}"#,
        )
        .unwrap();
        assert_eq!(settings.orphan_grace, Duration::from_secs(7_200));
        assert_eq!(settings.sweep_dry_run, Some(true));
        assert!(settings.validate("storage").is_empty());
        let debug = format!("{settings:?}");
        assert!(!debug.contains("\"s\""), "the secret is not shown: {debug}");
        assert!(serde_json::from_str::<StorageSettings>(r#"{"bucket": "x"}"#).is_err());
        assert!(serde_json::from_str::<StorageSettings>(r#"{"s3": {"key": "x"}}"#).is_err());
    }

    #[test]
    fn keys_must_round_trip() {
        for key in ["", "/a", "a/", "a//b", "a/../b", "a/./b"] {
            assert!(
                matches!(object_path(key), Err(StorageError::InvalidKey { .. })),
                "{key:?}"
            );
        }
        assert_eq!(object_path("a/b/c").unwrap().as_ref(), "a/b/c");
    }

    #[test]
    fn open_refuses_invalid_settings_and_creates_the_directory() {
        let err = Storage::open(&with_url("ftp://x"), Path::new("/tmp")).unwrap_err();
        assert!(matches!(err, StorageError::Settings(_)), "{err}");
        assert!(err.to_string().contains("storage.url"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&StorageSettings::default(), dir.path()).unwrap();
        assert!(dir.path().join("objects").is_dir());
        assert_eq!(
            storage.location(),
            &Location::File(dir.path().join("objects"))
        );
    }
}
