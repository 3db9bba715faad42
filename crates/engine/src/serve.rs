//! `engine serve`: the retention controller and the admin server, until SIGINT or SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use retention_controller::{telemetry, tenant_retention, Controller};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::database::Database;
use crate::settings::Settings;
use crate::{http, http_limits, http_listener, shutdown};

/// Installs the process's Prometheus recorder: the histograms of [`telemetry::BUCKETS`] (run
/// durations, 10 ms to 30 min) in buckets, the others as summaries.
fn metrics_recorder() -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in telemetry::BUCKETS {
        builder = builder.set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)?;
    }
    let handle = builder.install_recorder()?;
    telemetry::describe();
    Ok(handle)
}

pub async fn serve(settings: &Settings) -> anyhow::Result<()> {
    let root = CancellationToken::new();
    shutdown::cancel_on_signal(root.clone())?;
    let listener = tokio::net::TcpListener::bind(settings.http.addr)
        .await
        .with_context(|| {
            format!(
                "binding the admin server to http.addr = {}",
                settings.http.addr
            )
        })?;
    let db = Database::open(settings, settings.database.migrate).await?;
    let served = run(settings, &db, listener, root).await;
    db.close().await;
    tracing::info!("engine stopped");
    served
}

/// The retention controller (paced) and the admin server on `listener`, until `root` is
/// cancelled.
pub async fn run(
    settings: &Settings,
    db: &Database,
    listener: TcpListener,
    root: CancellationToken,
) -> anyhow::Result<()> {
    // Before the controller starts: what it records from its first moment (the counters it
    // makes exist at 0, the tasks' schedules) goes to this recorder.
    let metrics = metrics_recorder()?;
    let tasks = settings.tasks()?;
    let names: Vec<&str> = tasks.iter().map(|task| task.name()).collect();
    let shown = Arc::new(tasks.clone());
    let controller = tokio::spawn(
        Controller::new(db.pool.clone(), tasks)
            .with_options(db.run_options(settings.retention.paced()))
            .run(root.child_token())
            .in_current_span(),
    );

    tracing::info!(addr = %listener.local_addr()?, tasks = ?names, "engine serving");
    let state = http::AppState {
        pool: db.http_pool.clone(),
        readiness_pool: db.readiness_pool.clone(),
        admin_token: settings.http.admin_token.as_deref().map(Into::into),
        admin_token_name: settings.http.admin_token_name.as_str().into(),
        // A preview through the API ends by the request's deadline, not task-history's longer
        // statement timeout: its statement must not outlive the request that asked for it.
        preview: {
            let mut limits: tenant_retention::PreviewLimits =
                (&settings.retention.task_history).into();
            limits.statement_timeout = limits.statement_timeout.min(settings.http.request_timeout);
            limits
        },
        metrics: Some(metrics),
        tasks: shown,
        page: Default::default(),
    };
    if state.admin_token.is_none() {
        tracing::info!("http.admin_token is not set: the /api/v1 admin API refuses every request");
    }
    if !settings.http.addr.ip().is_loopback() && state.admin_token.is_some() {
        tracing::warn!(addr = %settings.http.addr, "the admin server speaks plain HTTP on a non-loopback address: the bearer token crosses the network in the clear unless a proxy in front terminates TLS (docs/operations.md)");
    }
    let router = http_limits::guard(http::router(state), &settings.http);
    http_listener::serve(
        listener,
        router,
        settings.http.request_timeout,
        root.child_token(),
    )
    .await;
    root.cancel();
    if let Err(error) = controller.await {
        tracing::error!(%error, "retention controller ended abnormally");
    }
    Ok(())
}
