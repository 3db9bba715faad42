//! The admin HTTP server: `/healthz` (the process is up), `/readyz` (the database answers),
//! `/metrics` (Prometheus text format), and the tenant retention API under `/api/v1`, which needs
//! `Authorization: Bearer <http.admin_token>`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use repository::tenants::Tenant;
use retention_controller::tenant_retention::{self, RetentionError};
use serde_json::{json, Value};
use sqlx::PgPool;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub admin_token: Option<Arc<str>>,
    pub metrics: Option<PrometheusHandle>,
}

/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/tenants/{id}/retention", get(get_retention).put(put_retention))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(state)
}

/// Readiness: the database answers a query within 2 s. 503 while it does not (a restart, a
/// failover): the engine keeps running, and its tasks back off and carry on once it is back.
async fn readyz(State(state): State<AppState>) -> Response {
    let probe = tokio::time::timeout(READY_TIMEOUT, sqlx::query("SELECT 1").execute(&state.pool)).await;
    match probe {
        Ok(Ok(_)) => Json(json!({ "status": "ready" })).into_response(),
        Ok(Err(failure)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("the database is unreachable: {failure}")),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the database did not answer within 2s"),
    }
}

/// Prometheus text format (see `retention_controller::telemetry` for the metrics).
async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => {
            handle.run_upkeep();
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "metrics are not recorded by this process"),
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
        return error(StatusCode::FORBIDDEN, "the admin API is disabled: set http.admin_token to enable it");
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), expected.as_bytes()) => next.run(request).await,
        _ => {
            let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token (Authorization: Bearer <http.admin_token>)");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid header"));
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

fn body(tenant: &Tenant) -> Json<Value> {
    Json(json!({
        "tenant_id": tenant.id,
        "slug": tenant.slug,
        "data_retention_period": tenant_retention::describe(tenant.retention),
        "seconds": tenant.retention.map(|d| d.as_secs()),
        "deleted_at": tenant.deleted_at.map(|at| at.to_rfc3339()),
    }))
}

fn failure(err: RetentionError) -> Response {
    match err {
        RetentionError::Invalid { .. } => error(StatusCode::BAD_REQUEST, err.to_string()),
        RetentionError::UnknownTenant(_) => error(StatusCode::NOT_FOUND, err.to_string()),
        RetentionError::Database(message) => {
            tracing::error!(error = %message, "tenant retention API");
            error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
    }
}

async fn get_retention(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match tenant_retention::get(&state.pool, &id).await {
        Ok(tenant) => body(&tenant).into_response(),
        Err(err) => failure(err),
    }
}

const PUT_SHAPE: &str = r#"the body must be JSON {"data_retention_period": "<duration from 1h to 100years>" | "forever" | null}"#;

async fn put_retention(State(state): State<AppState>, Path(id): Path<String>, payload: Result<Json<Value>, JsonRejection>) -> Response {
    let Ok(Json(payload)) = payload else {
        return error(StatusCode::BAD_REQUEST, PUT_SHAPE);
    };
    let value = match payload.as_object() {
        Some(object) if object.len() == 1 => match object.get("data_retention_period") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Null) => "forever".to_string(),
            _ => return error(StatusCode::BAD_REQUEST, PUT_SHAPE),
        },
        _ => return error(StatusCode::BAD_REQUEST, PUT_SHAPE),
    };
    match tenant_retention::set(&state.pool, &id, &value).await {
        Ok(change) => body(&change.tenant).into_response(),
        Err(err) => failure(err),
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR abc", "Bearer  abc"] {
            assert_eq!(bearer_token(value), Some("abc"), "{value:?}");
        }
        for value in ["Basic abc", "Bearerabc", "Bearer", "Bearer ", "Token abc", ""] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
