//! The admin HTTP server: `/` (the status page), `/healthz` (the process is up), `/readyz` (the
//! database answers), `/metrics` (Prometheus text format), and the tenant retention API under `/api/v1`, which needs
//! `Authorization: Bearer <http.admin_token>`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use retention_controller::holds::{self, HoldError, HoldRequest};
use retention_controller::tenant_retention::{self, RetentionError, Setting};
use retention_controller::MaintenanceTask;
use serde_json::{json, Value};
use sqlx::PgPool;

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
        .route("/api/v1/holds", get(list_holds).post(add_hold))
        .route("/api/v1/holds/{id}", get(get_hold).delete(remove_hold))
        .route("/api/v1/receipts", get(list_receipts))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/", get(status_page))
        .merge(api)
        .with_state(state)
}

/// Readiness: the database answers a query within 2 s. 503 while it does not (a restart, a
/// failover): the engine keeps running, and its tasks back off and carry on once it is back.
async fn readyz(State(state): State<AppState>) -> Response {
    let probe = tokio::time::timeout(
        READY_TIMEOUT,
        sqlx::query("SELECT 1").execute(&state.readiness_pool),
    )
    .await;
    match probe {
        Ok(Ok(_)) => Json(json!({ "status": "ready" })).into_response(),
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
async fn metrics(State(state): State<AppState>) -> Response {
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
async fn status_page(State(state): State<AppState>) -> Response {
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
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
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

async fn get_retention(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match tenant_retention::get(&state.pool, &id).await {
        Ok(tenant) => Json(crate::tenant::body(&tenant)).into_response(),
        Err(err) => failure(err),
    }
}

const PUT_SHAPE: &str = r#"the body must be JSON {"data_retention_period": <window>, "by_status": {"succeeded"|"failed"|"cancelled": <window> | "default"}}, with either key or both; a window is a duration from 1h to 100years, "forever" or null (forever)"#;

#[derive(serde::Deserialize)]
struct DryRun {
    #[serde(default)]
    dry_run: bool,
}

/// The settings a PUT body asks for, all validated; `None` when the body has another shape.
fn put_settings(payload: &Value) -> Option<Result<Vec<Setting>, RetentionError>> {
    let object = payload.as_object()?;
    if object.is_empty()
        || object
            .keys()
            .any(|k| k != "data_retention_period" && k != "by_status")
    {
        return None;
    }
    let window = |value: &Value| match value {
        Value::String(text) => Some(text.clone()),
        Value::Null => Some("forever".to_string()),
        _ => None,
    };
    let mut settings = Vec::new();
    if let Some(value) = object.get("data_retention_period") {
        match Setting::parse(None, &window(value)?) {
            Ok(setting) => settings.push(setting),
            Err(error) => return Some(Err(error)),
        }
    }
    if let Some(by_status) = object.get("by_status") {
        for (status, value) in by_status.as_object()? {
            let value = window(value)?;
            let parsed = tenant_retention::parse_status(status)
                .and_then(|s| Setting::parse(Some(s), &value));
            match parsed {
                Ok(setting) => settings.push(setting),
                Err(error) => return Some(Err(error)),
            }
        }
    }
    Some(Ok(settings))
}

async fn put_retention(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<DryRun>,
    payload: Result<Json<Value>, JsonRejection>,
) -> Response {
    let Ok(Json(payload)) = payload else {
        return error(StatusCode::BAD_REQUEST, PUT_SHAPE);
    };
    let settings = match put_settings(&payload) {
        Some(Ok(settings)) if !settings.is_empty() => settings,
        Some(Err(err)) => return failure(err),
        _ => return error(StatusCode::BAD_REQUEST, PUT_SHAPE),
    };
    if query.dry_run {
        return match tenant_retention::preview(&state.pool, &id, &settings, state.preview).await {
            Ok(preview) => {
                let tasks: serde_json::Map<String, Value> = preview
                    .tasks
                    .iter()
                    .map(|(status, n)| (status.clone(), json!(n)))
                    .collect();
                Json(json!({
                    "dry_run": true,
                    "tenant": crate::tenant::body(&preview.after),
                    "would_delete": { "tasks": tasks, "events": preview.events },
                }))
                .into_response()
            }
            Err(err) => failure(err),
        };
    }
    match tenant_retention::set(&state.pool, &id, &settings).await {
        Ok(change) => Json(crate::tenant::body(&change.tenant)).into_response(),
        Err(err) => failure(err),
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

#[derive(serde::Deserialize)]
struct HoldsQuery {
    tenant: Option<String>,
    #[serde(default)]
    all: bool,
}

async fn list_holds(State(state): State<AppState>, Query(query): Query<HoldsQuery>) -> Response {
    match holds::list(&state.pool, query.tenant.as_deref(), query.all).await {
        Ok(list) => {
            Json(json!({ "holds": list.iter().map(crate::hold::hold_json).collect::<Vec<_>>() }))
                .into_response()
        }
        Err(err) => hold_failure(err),
    }
}

async fn get_hold(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    match repository::holds::get(&state.pool, id).await {
        Ok(Some(hold)) => Json(crate::hold::hold_json(&hold)).into_response(),
        Ok(None) => hold_failure(HoldError::UnknownHold(id)),
        Err(err) => hold_failure(err.into()),
    }
}

const HOLD_SHAPE: &str = r#"the body must be JSON {"tenant": "<id or slug>", "task": "<task id>" (optional), "reason": "<why>", "until": "<RFC 3339 instant or date>" (optional)}"#;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldBody {
    tenant: String,
    task: Option<String>,
    reason: String,
    until: Option<String>,
}

async fn add_hold(
    State(state): State<AppState>,
    payload: Result<Json<HoldBody>, JsonRejection>,
) -> Response {
    let Ok(Json(body)) = payload else {
        return error(StatusCode::BAD_REQUEST, HOLD_SHAPE);
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

#[derive(serde::Deserialize)]
struct RemoveQuery {
    reason: Option<String>,
}

async fn remove_hold(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(query): Query<RemoveQuery>,
) -> Response {
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

#[derive(serde::Deserialize)]
struct ReceiptsQuery {
    tenant: Option<String>,
    since: Option<String>,
    limit: Option<i64>,
}

async fn list_receipts(
    State(state): State<AppState>,
    Query(query): Query<ReceiptsQuery>,
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
        Ok(list) => Json(
            json!({ "receipts": list.iter().map(crate::hold::receipt_json).collect::<Vec<_>>() }),
        )
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
