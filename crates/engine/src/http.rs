//! The admin HTTP server.

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub fn router() -> Router {
    Router::new().route("/healthz", get(healthz))
}

/// Liveness: the process is up and serving. Says nothing about the database.
async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}
