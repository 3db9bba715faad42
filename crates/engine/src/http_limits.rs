//! The admin server's guard rails, so no load on it can delay a retention run or exhaust the
//! process: a request head and body of bounded size, a deadline for every request, and at most
//! `http.max_connections` requests at the database at once (they use a pool of their own, see
//! [`crate::database::Database::http_pool`]); the rest wait a moment, then get 503. `/readyz`
//! has a slot (and a connection) of its own, so a flood of the page cannot turn a replica unready.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::settings::HttpSettings;

/// How long a request waits for one of the database slots before it is turned away.
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// The route with a slot (and a connection) of its own.
pub const READINESS: &str = "/readyz";

#[derive(Clone)]
struct Limits {
    slots: Arc<Semaphore>,
    readiness_slot: Arc<Semaphore>,
    max_connections: u32,
    request_timeout: Duration,
    max_body_bytes: usize,
    max_header_bytes: usize,
}

/// `router` with the limits of `http.*` around every route.
pub fn guard(router: Router, settings: &HttpSettings) -> Router {
    let limits = Limits {
        slots: Arc::new(Semaphore::new(settings.max_connections as usize)),
        readiness_slot: Arc::new(Semaphore::new(1)),
        max_connections: settings.max_connections,
        request_timeout: settings.request_timeout,
        max_body_bytes: settings.max_body_bytes,
        max_header_bytes: settings.max_header_bytes,
    };
    // The last layer added runs first: the deadline bounds everything (a body trickling in, the
    // wait for a slot, the handler); then the sizes, so nothing is queued for a request refused.
    router
        .layer(middleware::from_fn_with_state(
            limits.clone(),
            database_slot,
        ))
        .layer(middleware::from_fn_with_state(limits.clone(), sizes))
        // The extractors' own limit (2 MB by default) follows the setting.
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(middleware::from_fn_with_state(limits, deadline))
}

/// Routes that answer from the process alone, without the database: never queued behind the
/// page or the API, so liveness and scrapes answer under any load. (The OpenAPI document says
/// which routes can be answered "busy" from this, see [`crate::openapi`].)
pub fn without_database(path: &str) -> bool {
    matches!(path, "/healthz" | "/metrics" | "/api/v1/openapi.json")
}

async fn sizes(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    let head: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum::<usize>()
        + request.uri().to_string().len();
    if head > limits.max_header_bytes {
        return refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request's target and headers take {head} bytes: at most http.max_header_bytes ({}) are accepted",
                limits.max_header_bytes
            ),
        );
    }
    // Read whole here, up to the limit, whether or not it declares its length: the handlers
    // get a body already in memory, and one too large is refused before any of them runs.
    let (parts, body) = request.into_parts();
    match axum::body::to_bytes(body, limits.max_body_bytes).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(error) if too_large(&error) => refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than http.max_body_bytes ({} bytes)",
                limits.max_body_bytes
            ),
        ),
        Err(_) => refuse(
            StatusCode::BAD_REQUEST,
            "the request body was cut off before its declared end".to_string(),
        ),
    }
}

fn too_large(error: &axum::Error) -> bool {
    std::error::Error::source(error)
        .is_some_and(|inner| inner.is::<http_body_util::LengthLimitError>())
}

async fn deadline(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    let reads_only = matches!(request.method(), &Method::GET | &Method::HEAD);
    match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the request took longer than http.request_timeout ({}); {}",
                humantime::format_duration(limits.request_timeout),
                if reads_only {
                    "try again later"
                } else {
                    // Its statement may have committed just before the deadline.
                    "it may have taken effect: look before sending it again"
                }
            ),
        ),
    }
}

async fn database_slot(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    if without_database(request.uri().path()) {
        return next.run(request).await;
    }
    let readiness = request.uri().path() == READINESS;
    let slots = if readiness {
        &limits.readiness_slot
    } else {
        &limits.slots
    };
    match tokio::time::timeout(SLOT_WAIT, slots.clone().acquire_owned()).await {
        Ok(Ok(_slot)) => next.run(request).await,
        _ => {
            let message = if readiness {
                "another readiness check has been waiting on the database for a second; try again"
                    .to_string()
            } else {
                format!(
                    "the admin server is busy: it serves {} requests that use the database at once (http.max_connections); try again",
                    limits.max_connections
                )
            };
            let mut response = refuse(StatusCode::SERVICE_UNAVAILABLE, message);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}
