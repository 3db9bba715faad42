//! The admin HTTP server: `/` (the status page), `/healthz` (the process is up), `/readyz` (the
//! database answers), `/metrics` (Prometheus text format), and the tenant retention API under `/api/v1`, which needs
//! `Authorization: Bearer <http.admin_token>`. `/api/v1/openapi.json` describes all of it (see
//! [`crate::openapi`]); each handler's `#[utoipa::path]` says what it answers.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use retention_controller::holds::{self, HoldError, HoldRequest};
use retention_controller::tenant_retention::{self, RetentionError, Setting};
use retention_controller::MaintenanceTask;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgPool;
use utoipa::{IntoParams, ToSchema};

use crate::archive::TenantArchive;
use crate::hold::{HoldJson, ReceiptJson};
use crate::tenant::TenantRetention;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// `/readyz`'s own connection.
    pub readiness_pool: PgPool,
    pub admin_token: Option<Arc<str>>,
    /// Recorded as who added or removed a hold through the API.
    pub admin_token_name: Arc<str>,
    /// For previews: `task-history`'s grace for deleted tenants and statement timeout.
    pub preview: tenant_retention::PreviewLimits,
    pub metrics: Option<PrometheusHandle>,
    /// The tasks the status page shows (their schedules, and estimates of the rows due).
    pub tasks: Arc<Vec<Arc<dyn MaintenanceTask>>>,
    /// The status page, rendered at most once a second however many load it.
    pub page: Arc<crate::status_page::PageCache>,
}

/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/api/v1/tenants/{id}/retention",
            get(get_retention).put(put_retention),
        )
        .route(
            "/api/v1/tenants/{id}/archive",
            get(get_archive).put(put_archive),
        )
        .route("/api/v1/holds", get(list_holds).post(add_hold))
        .route("/api/v1/holds/{id}", get(get_hold).delete(remove_hold))
        .route("/api/v1/receipts", get(list_receipts))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(status_page))
        .route("/api/v1/openapi.json", get(openapi_document))
        .merge(api)
        .fallback(no_such_path)
        .method_not_allowed_fallback(no_such_method)
        .with_state(state)
}

/// A path the server does not have: the API's JSON error, naming it (axum's own is empty).
async fn no_such_path(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no such path: {method} {}; the paths are /, /healthz, /readyz, /metrics and the API's in /api/v1/openapi.json",
            uri.path()
        ),
    )
}

/// A method a path does not take (axum adds the `Allow` header naming those it does).
async fn no_such_method(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} does not take {method}; the Allow header names the methods it takes",
            uri.path()
        ),
    )
}

/// An operation without query parameters: one given is refused, not ignored (a `?dry_run=true`
/// on a POST would otherwise go through as a real change).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

impl QueryShape for NoQuery {
    const ALLOWED: &'static str = "no query parameters";
}

/// `{"status": "ok"}`.
#[derive(serde::Serialize, ToSchema)]
pub struct Health {
    status: HealthStatus,
}

#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum HealthStatus {
    Ok,
}

/// `{"status": "ready"}`.
#[derive(serde::Serialize, ToSchema)]
pub struct Readiness {
    status: ReadinessStatus,
}

#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum ReadinessStatus {
    Ready,
}

/// Every refusal and failure: what was wrong, and what is allowed.
#[derive(serde::Serialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong and, for a bad request, what is allowed.
    #[schema(examples("no tenant with id or slug \"acme\""))]
    error: String,
}

/// Readiness: the database answers a query within 2 s. 503 while it does not (a restart, a
/// failover): the engine keeps running, and its tasks back off and carry on once it is back.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    responses(
        (status = 200, description = "The database answered within 2 s.", body = Readiness),
        (status = 503, description = "The database did not answer within 2 s, or failed.", body = ErrorBody),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let probe = tokio::time::timeout(
        READY_TIMEOUT,
        sqlx::query("SELECT 1").execute(&state.readiness_pool),
    )
    .await;
    match probe {
        Ok(Ok(_)) => Json(Readiness {
            status: ReadinessStatus::Ready,
        })
        .into_response(),
        Ok(Err(failure)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the database is unreachable: {failure}"),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the database did not answer within 2s",
        ),
    }
}

/// Prometheus text format (see `retention_controller::telemetry` for the metrics).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "probes",
    responses(
        (status = 200, description = "The process's metrics in Prometheus text format 0.0.4 (no tenant data unless `metrics.tenant_series` names tenants).",
            content_type = "text/plain; version=0.0.4", body = String),
        (status = 404, description = "This process records no metrics.", body = ErrorBody),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            handle.run_upkeep();
            (
                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                handle.render(),
            )
                .into_response()
        }
        None => error(
            StatusCode::NOT_FOUND,
            "metrics are not recorded by this process",
        ),
    }
}

/// The status page (see [`crate::status_page`]): open like `/metrics`, and like it without
/// tenant data.
#[utoipa::path(
    get,
    path = "/",
    tag = "probes",
    responses(
        (status = 200, description = "The status page for people: each task's schedule, last runs and rows due.",
            content_type = "text/html; charset=utf-8", body = String),
        (status = 503, description = "The database did not answer: a page saying so, which reloads itself.",
            content_type = "text/html; charset=utf-8", body = String),
    )
)]
pub async fn status_page(State(state): State<AppState>) -> Response {
    match state.page.page(&state.pool, &state.tasks).await {
        Ok(page) => Html(page.to_string()).into_response(),
        Err(failure) => {
            tracing::warn!(error = %failure, "status page");
            let body = format!(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{}\"><title>engine · retention status</title></head><body><h1>Retention status</h1><p id=\"unavailable\">The database did not answer; this page tries again every {} s.</p></body></html>",
                crate::status_page::REFRESH_SECONDS,
                crate::status_page::REFRESH_SECONDS
            );
            (StatusCode::SERVICE_UNAVAILABLE, Html(body)).into_response()
        }
    }
}

/// Liveness: the process is up and serving. Says nothing about the database.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "probes",
    responses((status = 200, description = "The process is up.", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: HealthStatus::Ok,
    })
}

/// This document: open (no token), as it holds no tenant data.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "probes",
    responses((status = 200, description = "The OpenAPI 3.1 document of this server (as committed in docs/openapi.json).",
        content_type = "application/json", body = Object))
)]
pub async fn openapi_document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// [`Path`], refusing with the API's JSON error (axum's own refusal is plain text).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid path: {}; allowed: percent-encoded UTF-8",
                    rejection.body_text().trim_start_matches("Invalid URL: ")
                ),
            )),
        }
    }
}

/// [`Query`], refusing with the API's JSON error naming the parameter and what the operation
/// allows (axum's own refusal is plain text).
pub struct ApiQuery<T>(pub T);

/// A query string's parameters, for refusals.
pub trait QueryShape {
    /// Every parameter and its values, as people write them.
    const ALLOWED: &'static str;
}

impl<S: Send + Sync, T: DeserializeOwned + QueryShape + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "invalid query string: {}; allowed: {}",
                    rejection
                        .body_text()
                        .trim_start_matches("Failed to deserialize query string: "),
                    T::ALLOWED
                ),
            )),
        }
    }
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = state.admin_token.as_deref() else {
        return error(
            StatusCode::FORBIDDEN,
            "the admin API is disabled: set http.admin_token to enable it",
        );
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => {
            next.run(request).await
        }
        _ => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (Authorization: Bearer <http.admin_token>)",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("valid header"),
            );
            response
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive (RFC
/// 7235, 2.1) and may be followed by more than one space.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    let token = rest.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Compares without stopping at the first difference, so timing does not reveal the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn failure(err: RetentionError) -> Response {
    match err {
        RetentionError::Invalid { .. }
        | RetentionError::InvalidStatus(_)
        | RetentionError::InvalidLogWindow { .. } => {
            error(StatusCode::BAD_REQUEST, err.to_string())
        }
        RetentionError::UnknownTenant(_) => error(StatusCode::NOT_FOUND, err.to_string()),
        RetentionError::Database(message) => {
            tracing::error!(error = %message, "tenant retention API");
            error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
    }
}

/// The tenant's id (a UUID) or slug.
const TENANT_KEY: &str = "The tenant's id (a UUID) or slug.";

#[utoipa::path(
    get,
    path = "/api/v1/tenants/{id}/retention",
    tag = "tenants",
    security(("bearer" = [])),
    params(("id" = String, Path, description = TENANT_KEY, min_length = 1)),
    responses(
        (status = 200, description = "The tenant's windows.", body = TenantRetention),
        (status = 400, description = "The path is not valid UTF-8 once percent-decoded.", body = ErrorBody),
        (status = 404, description = "No tenant with that id or slug.", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    )
)]
pub async fn get_retention(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    _: ApiQuery<NoQuery>,
) -> Response {
    match tenant_retention::get(&state.pool, &id).await {
        Ok(tenant) => Json(crate::tenant::body(&tenant)).into_response(),
        Err(err) => failure(err),
    }
}

const UNAVAILABLE: &str = "The database did not answer (nothing was changed).";

const PUT_SHAPE: &str = r#"the body must be JSON {"data_retention_period": <window>, "by_status": {"succeeded"|"failed"|"cancelled": <window> | "default"}}, with either key or both (by_status naming at least one status); a window is a duration from 1h to 100years, "forever" or null (forever)"#;

/// A change of a tenant's windows: `data_retention_period`, `by_status`, or both (at least one:
/// `minProperties`, set in [`crate::openapi`]). What is not named stays as it is.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // documents the body `put_settings` reads
pub struct RetentionChange {
    /// The default window of finished run history: a duration from 1h to 100years (humantime:
    /// "30days", "720h", "1h 30m"), or "forever"; null: forever. A value that is no such duration
    /// ("59m", "101years", "soon", "default") is answered 400.
    #[serde(default)]
    #[schema(examples("30days", "forever"))]
    data_retention_period: Option<String>,
    /// Windows of tasks that ended in a status, over the default.
    #[serde(default)]
    #[schema(nullable = false)]
    by_status: Option<StatusChanges>,
}

/// Each status named gets this window: a window as for `data_retention_period`, or "default"
/// (follow `data_retention_period` again). At least one status (`minProperties`, set in
/// [`crate::openapi`]).
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // documents the body `put_settings` reads
pub struct StatusChanges {
    /// A duration from 1h to 100years (humantime), "forever", or "default" (back to
    /// `data_retention_period`); null: forever. A value that is none of these is answered 400.
    #[serde(default)]
    #[schema(examples("90days", "default"))]
    succeeded: Option<String>,
    /// A duration from 1h to 100years (humantime), "forever", or "default" (back to
    /// `data_retention_period`); null: forever. A value that is none of these is answered 400.
    #[serde(default)]
    #[schema(examples("90days", "default"))]
    failed: Option<String>,
    /// A duration from 1h to 100years (humantime), "forever", or "default" (back to
    /// `data_retention_period`); null: forever. A value that is none of these is answered 400.
    #[serde(default)]
    #[schema(examples("90days", "default"))]
    cancelled: Option<String>,
}

/// What `PUT ...?dry_run=true` answers: the windows the tenant would have, and what the next
/// `task-history` run would delete under them.
#[derive(serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionPreview {
    /// Always true: nothing was changed.
    #[schema(schema_with = always_true)]
    dry_run: bool,
    tenant: TenantRetention,
    would_delete: WouldDelete,
}

/// What the next `task-history` run would delete.
#[derive(serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WouldDelete {
    #[schema(minimum = 0)]
    events: i64,
    /// Tasks per status (only the statuses with tasks due; `queued` and `running` only for a
    /// deleted tenant).
    #[schema(schema_with = tasks_by_status)]
    tasks: std::collections::BTreeMap<String, i64>,
}

fn always_true() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::Boolean)
        .enum_values(Some([true]))
        .build()
}

fn tasks_by_status() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
    let count = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Int64,
        )))
        .minimum(Some(1));
    let status = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some([
            "succeeded",
            "failed",
            "cancelled",
            "queued",
            "running",
        ]));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(status))
        .additional_properties(Some(AdditionalProperties::RefOr(count.into())))
        .build()
}

/// The tenant's windows after a change, or what a dry run would do.
#[derive(serde::Serialize, ToSchema)]
#[serde(untagged)]
pub enum RetentionAnswer {
    /// The change was made: the tenant's windows now.
    Set(TenantRetention),
    /// `dry_run=true`: nothing was changed.
    DryRun(RetentionPreview),
}

#[derive(serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DryRun {
    /// `true`: change nothing; answer what the change would do.
    #[serde(default)]
    #[param(default = false)]
    dry_run: bool,
}

impl QueryShape for DryRun {
    const ALLOWED: &'static str = "dry_run=true|false (optional)";
}

/// Why a PUT body was refused.
enum PutRefusal {
    /// Not of the shape [`PUT_SHAPE`] says: what is wrong with it.
    Shape(String),
    /// A window or a status that is not allowed.
    Invalid(RetentionError),
}

/// The settings a PUT body asks for, all validated (at least one).
fn put_settings(payload: &Value) -> Result<Vec<Setting>, PutRefusal> {
    let shape = |what: String| Err(PutRefusal::Shape(what));
    let Some(object) = payload.as_object() else {
        return shape(format!("the body is {}, not an object", json_kind(payload)));
    };
    if object.is_empty() {
        return shape("the body names no key".into());
    }
    if let Some(key) = object
        .keys()
        .find(|k| *k != "data_retention_period" && *k != "by_status")
    {
        return shape(format!("unknown key {key:?}"));
    }
    let window = |name: &str, value: &Value| match value {
        Value::String(text) => Ok(text.clone()),
        Value::Null => Ok("forever".to_string()),
        other => Err(PutRefusal::Shape(format!(
            "{name} is {}, not a string or null",
            json_kind(other)
        ))),
    };
    let mut settings = Vec::new();
    if let Some(value) = object.get("data_retention_period") {
        let value = window("data_retention_period", value)?;
        settings.push(Setting::parse(None, &value).map_err(PutRefusal::Invalid)?);
    }
    if let Some(by_status) = object.get("by_status") {
        let Some(by_status) = by_status.as_object() else {
            return shape(format!(
                "by_status is {}, not an object",
                json_kind(by_status)
            ));
        };
        if by_status.is_empty() {
            return shape("by_status names no status".into());
        }
        for (status, value) in by_status {
            let value = window(&format!("by_status.{status}"), value)?;
            let parsed = tenant_retention::parse_status(status)
                .and_then(|s| Setting::parse(Some(s), &value));
            settings.push(parsed.map_err(PutRefusal::Invalid)?);
        }
    }
    Ok(settings)
}

/// A PUT's JSON body, or the 400 that says what was wrong with it and what `shape` it must have.
#[allow(clippy::result_large_err)] // the error is the answer, built once per refused request
fn json_body(payload: Result<Json<Value>, JsonRejection>, shape: &str) -> Result<Value, Response> {
    payload.map(|Json(payload)| payload).map_err(|rejection| {
        let problem = body_problem(&rejection);
        error(StatusCode::BAD_REQUEST, format!("{problem}; {shape}"))
    })
}

/// "a number", "an array", ... for refusals.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What was wrong with a body that is not the JSON an operation reads, in its refusal's words:
/// the content type, JSON's syntax, or (with a typed body) a field, as serde names it.
fn body_problem(rejection: &JsonRejection) -> String {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "the request's Content-Type is not application/json".to_string()
        }
        JsonRejection::JsonSyntaxError(err) => format!(
            "the body is not JSON ({})",
            err.body_text()
                .trim_start_matches("Failed to parse the request body as JSON: ")
        ),
        JsonRejection::JsonDataError(err) => err
            .body_text()
            .trim_start_matches("Failed to deserialize the JSON body into the target type: ")
            .to_string(),
        other => other.body_text(),
    }
}

/// Changes a tenant's windows (applied at the next `task-history` run), or with `dry_run=true`
/// shows what the change would delete, changing nothing.
#[utoipa::path(
    put,
    path = "/api/v1/tenants/{id}/retention",
    tag = "tenants",
    security(("bearer" = [])),
    params(("id" = String, Path, description = TENANT_KEY, min_length = 1), DryRun),
    request_body(content = RetentionChange, content_type = "application/json"),
    responses(
        (status = 200, description = "The tenant's windows after the change; with `dry_run=true`, what the change would do (nothing was changed).",
            body = RetentionAnswer),
        (status = 400, description = "The body, a window or the query string is not as allowed (the message says what is); nothing was changed.",
            body = ErrorBody),
        (status = 404, description = "No tenant with that id or slug.", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    )
)]
pub async fn put_retention(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DryRun>,
    payload: Result<Json<Value>, JsonRejection>,
) -> Response {
    let payload = match json_body(payload, PUT_SHAPE) {
        Ok(payload) => payload,
        Err(refused) => return refused,
    };
    let settings = match put_settings(&payload) {
        Ok(settings) => settings,
        Err(PutRefusal::Invalid(err)) => return failure(err),
        Err(PutRefusal::Shape(problem)) => {
            return error(StatusCode::BAD_REQUEST, format!("{problem}; {PUT_SHAPE}"))
        }
    };
    if query.dry_run {
        return match tenant_retention::preview(&state.pool, &id, &settings, state.preview).await {
            Ok(preview) => Json(RetentionAnswer::DryRun(RetentionPreview {
                dry_run: true,
                tenant: crate::tenant::body(&preview.after),
                would_delete: WouldDelete {
                    events: preview.events,
                    tasks: preview.tasks.into_iter().collect(),
                },
            }))
            .into_response(),
            Err(err) => failure(err),
        };
    }
    match tenant_retention::set(&state.pool, &id, &settings).await {
        Ok(change) => {
            Json(RetentionAnswer::Set(crate::tenant::body(&change.tenant))).into_response()
        }
        Err(err) => failure(err),
    }
}

/// The tenant's archive policy: which final statuses are written to Parquet files before their
/// runs are deleted, how long the files are kept, and whether a deleted tenant's are.
#[utoipa::path(
    get,
    path = "/api/v1/tenants/{id}/archive",
    tag = "tenants",
    security(("bearer" = [])),
    params(("id" = String, Path, description = TENANT_KEY, min_length = 1)),
    responses(
        (status = 200, description = "The tenant's archive policy.", body = TenantArchive),
        (status = 400, description = "The path is not valid UTF-8 once percent-decoded.", body = ErrorBody),
        (status = 404, description = "No tenant with that id or slug.", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    )
)]
pub async fn get_archive(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    _: ApiQuery<NoQuery>,
) -> Response {
    match repository::archives::policy(&state.pool, &id).await {
        Ok(Some(policy)) => Json(crate::archive::policy_json(&policy)).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no tenant with id or slug {id:?}"),
        ),
        Err(err) => {
            tracing::error!(error = %err, "tenant archive API");
            error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
    }
}

const ARCHIVE_SHAPE: &str = r#"the body must be JSON {"archive": "off"|"on"|"<status>[,<status>]", "archive_retention_period": <duration from 1day to 100years> | "forever" | null, "archive_deleted": true|false}, with at least one key"#;

/// A change of a tenant's archive policy: any of the keys (at least one: `minProperties`, set
/// in [`crate::openapi`]). What is not named stays as it is.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // documents the body `archive_change` reads
pub struct ArchiveChange {
    /// `off`, `on` (every final status), or final statuses separated by commas (succeeded,
    /// failed, cancelled).
    #[serde(default)]
    #[schema(nullable = false, examples("failed", "on", "off"))]
    archive: Option<String>,
    /// How long archives are kept: a duration from 1day to 100years (humantime: "1year",
    /// "90days"), or "forever"; null: forever. Moves the expiry of the tenant's written archives.
    #[serde(default)]
    #[schema(examples("7years", "forever"))]
    archive_retention_period: Option<String>,
    /// Whether the tenant's finished runs are still archived after it is deleted.
    #[serde(default)]
    #[schema(nullable = false)]
    archive_deleted: Option<bool>,
}

/// The policy after the change (or, with `dry_run=true`, as it would be).
#[derive(serde::Serialize, ToSchema)]
pub struct ArchiveAnswer {
    /// True when nothing was changed.
    dry_run: bool,
    /// Written archives whose expiry moved (or would move) with a new retention.
    archives_expiry_moved: u64,
    tenant: TenantArchive,
}

fn archive_change(payload: &Value) -> Result<crate::archive::Change, String> {
    use retention_controller::archive_policy;
    let Some(object) = payload.as_object() else {
        return Err(format!("the body is {}, not an object", json_kind(payload)));
    };
    if object.is_empty() {
        return Err("the body names no key".into());
    }
    if let Some(key) = object.keys().find(|k| {
        !matches!(
            k.as_str(),
            "archive" | "archive_retention_period" | "archive_deleted"
        )
    }) {
        return Err(format!("unknown key {key:?}"));
    }
    let mut change = crate::archive::Change::default();
    if let Some(value) = object.get("archive") {
        let Value::String(text) = value else {
            return Err(format!("archive is {}, not a string", json_kind(value)));
        };
        change.statuses = Some(archive_policy::parse_statuses(text).map_err(|e| e.to_string())?);
    }
    if let Some(value) = object.get("archive_retention_period") {
        change.retention = Some(match value {
            Value::Null => None,
            Value::String(text) => {
                archive_policy::parse_retention(text).map_err(|e| e.to_string())?
            }
            other => {
                return Err(format!(
                    "archive_retention_period is {}, not a string or null",
                    json_kind(other)
                ))
            }
        });
    }
    if let Some(value) = object.get("archive_deleted") {
        let Value::Bool(deleted) = value else {
            return Err(format!(
                "archive_deleted is {}, not true or false",
                json_kind(value)
            ));
        };
        change.deleted = Some(*deleted);
    }
    Ok(change)
}

/// Changes a tenant's archive policy (applied from the next `task-history` run), or with
/// `dry_run=true` shows it as it would be, changing nothing.
#[utoipa::path(
    put,
    path = "/api/v1/tenants/{id}/archive",
    tag = "tenants",
    security(("bearer" = [])),
    params(("id" = String, Path, description = TENANT_KEY, min_length = 1), DryRun),
    request_body(content = ArchiveChange, content_type = "application/json"),
    responses(
        (status = 200, description = "The policy after the change; with `dry_run=true`, as it would be (nothing was changed).",
            body = ArchiveAnswer),
        (status = 400, description = "The body, a value or the query string is not as allowed (the message says what is); nothing was changed.",
            body = ErrorBody),
        (status = 404, description = "No tenant with that id or slug.", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    )
)]
pub async fn put_archive(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DryRun>,
    payload: Result<Json<Value>, JsonRejection>,
) -> Response {
    let payload = match json_body(payload, ARCHIVE_SHAPE) {
        Ok(payload) => payload,
        Err(refused) => return refused,
    };
    let change = match archive_change(&payload) {
        Ok(change) => change,
        Err(problem) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{problem}; {ARCHIVE_SHAPE}"),
            )
        }
    };
    match crate::archive::apply(&state.pool, &id, &change, query.dry_run).await {
        Ok(Ok(applied)) => Json(ArchiveAnswer {
            dry_run: query.dry_run,
            archives_expiry_moved: applied.moved,
            tenant: crate::archive::policy_json(&applied.after),
        })
        .into_response(),
        Ok(Err(refusal)) => error(StatusCode::NOT_FOUND, refusal),
        Err(err) => {
            tracing::error!(error = %err, "tenant archive API");
            error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
    }
}

fn hold_failure(err: HoldError) -> Response {
    if let HoldError::Database(message) = &err {
        tracing::error!(error = %message, "holds API");
        return error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable");
    }
    if err.is_not_found() {
        return error(StatusCode::NOT_FOUND, err.to_string());
    }
    if matches!(err, HoldError::AlreadyRemoved(_)) {
        return error(StatusCode::CONFLICT, err.to_string());
    }
    error(StatusCode::BAD_REQUEST, err.to_string())
}

#[derive(serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HoldsQuery {
    /// Only this tenant's holds: its id (a UUID) or slug.
    tenant: Option<String>,
    /// `true`: removed and ended holds too.
    #[serde(default)]
    #[param(default = false)]
    all: bool,
}

impl QueryShape for HoldsQuery {
    const ALLOWED: &'static str = "tenant=<id or slug>, all=true|false (both optional)";
}

/// `{"holds": [...]}`.
#[derive(serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldList {
    holds: Vec<HoldJson>,
}

/// The holds in force (with `all=true`: every hold ever added), of one tenant or of all.
#[utoipa::path(
    get,
    path = "/api/v1/holds",
    tag = "holds",
    security(("bearer" = [])),
    params(HoldsQuery),
    responses(
        (status = 200, description = "The holds, newest first.", body = HoldList),
        (status = 400, description = "The query string is not as allowed.", body = ErrorBody),
        (status = 404, description = "No tenant with that id or slug.", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    )
)]
pub async fn list_holds(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<HoldsQuery>,
) -> Response {
    match holds::list(&state.pool, query.tenant.as_deref(), query.all).await {
        Ok(list) => Json(HoldList {
            holds: list.iter().map(crate::hold::hold_json).collect(),
        })
        .into_response(),
        Err(err) => hold_failure(err),
    }
}

/// The hold's id.
const HOLD_ID: &str = "The hold's id.";

/// The hold's id from the path: an integer; else the refusal.
fn hold_id(id: &str) -> Result<i64, String> {
    id.parse().map_err(|_| {
        format!("invalid hold id {id:?}: allowed: an integer (the id a hold was added with)")
    })
}

/// One hold, in force or not.
#[utoipa::path(
    get,
    path = "/api/v1/holds/{id}",
    tag = "holds",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = HOLD_ID)),
    responses(
        (status = 200, description = "The hold.", body = HoldJson),
        (status = 400, description = "The id is not an integer.", body = ErrorBody),
        (status = 404, description = "No hold with that id.", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    )
)]
pub async fn get_hold(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    _: ApiQuery<NoQuery>,
) -> Response {
    let id = match hold_id(&id) {
        Ok(id) => id,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match repository::holds::get(&state.pool, id).await {
        Ok(Some(hold)) => Json(crate::hold::hold_json(&hold)).into_response(),
        Ok(None) => hold_failure(HoldError::UnknownHold(id)),
        Err(err) => hold_failure(err.into()),
    }
}

const HOLD_SHAPE: &str = r#"the body must be JSON {"tenant": "<id or slug>", "task": "<task id>" (optional), "reason": "<why>", "until": "<RFC 3339 instant or date>" (optional)}"#;

/// A hold to add: a tenant, or one task of it, that no retention rule deletes until the hold is
/// removed or its `until` passes.
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewHold)]
pub struct HoldBody {
    /// The tenant's id (a UUID) or slug.
    #[schema(examples("acme"))]
    tenant: String,
    /// One task of the tenant (its id); absent or null: every task of the tenant.
    #[serde(default)]
    #[schema(format = Uuid)]
    task: Option<String>,
    /// Why (kept with the hold for whoever reads it later): at least one character that is not
    /// white space (as Rust's `char::is_whitespace` says, which the server trims), and no NUL.
    #[schema(
        pattern = "^[^\\u0000]*[^\\u0000\\t\\n\\u000b\\f\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000][^\\u0000]*$",
        examples("legal hold: case 2026-17")
    )]
    reason: String,
    /// When the hold ends by itself: an RFC 3339 instant or a date (its midnight, UTC), later
    /// than the database's clock says now (an instant already past is answered 400). Absent or
    /// null: until removed.
    #[serde(default)]
    #[schema(schema_with = instant_or_date)]
    until: Option<String>,
}

/// An RFC 3339 instant or a date (`2027-01-31`: its midnight, UTC).
fn instant_or_date() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
    let string = |format| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(format)))
    };
    OneOfBuilder::new()
        .item(string(KnownFormat::DateTime))
        .item(string(KnownFormat::Date))
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .description(Some(
            "An RFC 3339 instant or a date (its midnight, UTC); null: none.",
        ))
        .build()
        .into()
}

/// Adds a hold.
#[utoipa::path(
    post,
    path = "/api/v1/holds",
    tag = "holds",
    security(("bearer" = [])),
    request_body(content = HoldBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The hold, in force.", body = HoldJson),
        (status = 400, description = "The body is not as allowed (the message says what is), or `until` is not in the future; nothing was added.",
            body = ErrorBody),
        (status = 404, description = "No tenant with that id or slug, or the tenant has no task with that id; nothing was added.",
            body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    )
)]
pub async fn add_hold(
    State(state): State<AppState>,
    _: ApiQuery<NoQuery>,
    payload: Result<Json<HoldBody>, JsonRejection>,
) -> Response {
    let body = match payload {
        Ok(Json(body)) => body,
        Err(rejection) => {
            let problem = body_problem(&rejection);
            return error(StatusCode::BAD_REQUEST, format!("{problem}; {HOLD_SHAPE}"));
        }
    };
    let request = HoldRequest {
        tenant: body.tenant,
        task: body.task,
        reason: body.reason,
        until: body.until,
    };
    match holds::add(&state.pool, &request, &state.admin_token_name).await {
        Ok(hold) => (StatusCode::CREATED, Json(crate::hold::hold_json(&hold))).into_response(),
        Err(err) => hold_failure(err),
    }
}

#[derive(serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    /// Why it is removed (kept with the hold); blank: none given. No NUL.
    #[param(pattern = "^[^\\u0000]*$")]
    reason: Option<String>,
}

impl QueryShape for RemoveQuery {
    const ALLOWED: &'static str = "reason=<why> (optional)";
}

/// Removes a hold: it no longer holds anything, and stays on record with who removed it, when
/// and why.
#[utoipa::path(
    delete,
    path = "/api/v1/holds/{id}",
    tag = "holds",
    security(("bearer" = [])),
    params(("id" = i64, Path, description = HOLD_ID), RemoveQuery),
    responses(
        (status = 200, description = "The hold, removed.", body = HoldJson),
        (status = 400, description = "The id is not an integer, or the query string is not as allowed; nothing was changed.",
            body = ErrorBody),
        (status = 404, description = "No hold with that id.", body = ErrorBody),
        (status = 409, description = "The hold was already removed; nothing was changed.", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    )
)]
pub async fn remove_hold(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<RemoveQuery>,
) -> Response {
    let id = match hold_id(&id) {
        Ok(id) => id,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match holds::remove(
        &state.pool,
        id,
        &state.admin_token_name,
        query.reason.as_deref(),
    )
    .await
    {
        Ok(hold) => Json(crate::hold::hold_json(&hold)).into_response(),
        Err(err) => hold_failure(err),
    }
}

#[derive(serde::Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReceiptsQuery {
    /// Only this tenant's receipts: its id (a UUID) or slug.
    tenant: Option<String>,
    /// Only receipts first written at or after this: an RFC 3339 instant or a date (its
    /// midnight, UTC).
    #[param(schema_with = instant_or_date_given)]
    since: Option<String>,
    /// At most this many receipts (the oldest of those that match).
    #[param(minimum = 1, maximum = 100000, default = 1000)]
    limit: Option<i64>,
}

impl QueryShape for ReceiptsQuery {
    const ALLOWED: &'static str =
        "tenant=<id or slug>, since=<RFC 3339 instant or date>, limit=<1 to 100000> (all optional)";
}

/// [`instant_or_date`], without null (a query parameter is absent instead).
fn instant_or_date_given() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
    let string = |format| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(format)))
    };
    OneOfBuilder::new()
        .item(string(KnownFormat::DateTime))
        .item(string(KnownFormat::Date))
        .build()
        .into()
}

/// `{"receipts": [...]}`.
#[derive(serde::Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceiptList {
    receipts: Vec<ReceiptJson>,
}

/// What retention runs deleted, per run, tenant and rule: the oldest first.
#[utoipa::path(
    get,
    path = "/api/v1/receipts",
    tag = "receipts",
    security(("bearer" = [])),
    params(ReceiptsQuery),
    responses(
        (status = 200, description = "The receipts, oldest first (by when each was first written).", body = ReceiptList),
        (status = 400, description = "A query parameter is not as allowed (the message says what is).", body = ErrorBody),
        (status = 404, description = "No tenant with that id or slug.", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    )
)]
pub async fn list_receipts(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ReceiptsQuery>,
) -> Response {
    let since = match query.since.as_deref().map(holds::parse_until).transpose() {
        Ok(since) => since,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid since: allowed: an RFC 3339 instant or a date (2026-11-01)",
            )
        }
    };
    let limit = query.limit.unwrap_or(1000);
    if !(1..=100_000).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid limit {limit}: allowed: 1 to 100000"),
        );
    }
    let tenant_id = match query.tenant.as_deref() {
        Some(key) => match repository::tenants::find(&state.pool, key).await {
            Ok(Some(tenant)) => Some(tenant.id),
            Ok(None) => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no tenant with id or slug {key:?}"),
                )
            }
            Err(err) => return hold_failure(err.into()),
        },
        None => None,
    };
    match repository::receipts::list(&state.pool, tenant_id, since, limit).await {
        Ok(list) => Json(ReceiptList {
            receipts: list.iter().map(crate::hold::receipt_json).collect(),
        })
        .into_response(),
        Err(err) => hold_failure(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer abc",
            "bearer abc",
            "BEARER abc",
            "bEaReR abc",
            "Bearer  abc",
        ] {
            assert_eq!(bearer_token(value), Some("abc"), "{value:?}");
        }
        for value in [
            "Basic abc",
            "Bearerabc",
            "Bearer",
            "Bearer ",
            "Token abc",
            "",
        ] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
