//! The admin server's connections: at most [`MAX_OPEN_CONNECTIONS`] open at once, each closed
//! when a request's head has not arrived within [`HEADER_READ_TIMEOUT`] (or
//! `http.request_timeout`, if shorter), idle keep-alive ones included, and after
//! `http.request_timeout` + [`MAX_LIFETIME_OVER_REQUEST`] whatever it does. Without these, clients that
//! open connections and trickle their headers (or send nothing) would hold sockets without end,
//! until the process runs out of file descriptors, and then of database connections too.
//! [`crate::http_limits`] bounds what a request does once its head is in.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Connections open at once; more wait in the kernel's accept queue until one closes.
pub const MAX_OPEN_CONNECTIONS: usize = 256;
/// The longest a connection may take to send a request's head, or stay idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a connection lives, over `http.request_timeout`: keep-alive clients reconnect, and one
/// that never reads its answers frees its slot.
pub const MAX_LIFETIME_OVER_REQUEST: Duration = Duration::from_secs(60);
/// Each connection's read buffer: the largest request head hyper parses (`http.max_header_bytes`
/// is at most 256 KiB).
const READ_BUFFER: usize = 264 * 1024;
/// After `shutdown`, how long requests in flight have to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets the requests in flight
/// finish (for up to [`SHUTDOWN_GRACE`]).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    request_timeout: Duration,
    shutdown: CancellationToken,
) {
    let open = Arc::new(Semaphore::new(MAX_OPEN_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT.min(request_timeout))
        // A head past it is refused by hyper itself (431); below it, by `http.max_header_bytes`.
        .max_buf_size(READ_BUFFER)
        .keep_alive(true);
    let lifetime = request_timeout + MAX_LIFETIME_OVER_REQUEST;
    let mut said_full = false;
    loop {
        let permit = match open.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !said_full {
                    tracing::warn!(
                        open = MAX_OPEN_CONNECTIONS,
                        "the admin server has as many connections open as it keeps; new ones wait until one closes"
                    );
                    said_full = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = open.clone().acquire_owned() => permit.expect("never closed"),
                }
            }
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(%error, "the admin server could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    // A client that never reads its answers would hold its slot for good.
                    _ = tokio::time::sleep(lifetime) => {}
                    _ = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
                    }
                }
            }
            .in_current_span(),
        );
    }
    drop(listener);
    // Every connection's task holds a permit until it ends.
    let _ = tokio::time::timeout(
        SHUTDOWN_GRACE,
        open.acquire_many(MAX_OPEN_CONNECTIONS as u32),
    )
    .await;
}
