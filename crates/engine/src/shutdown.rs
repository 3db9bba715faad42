//! Signals to cancellation: the first SIGINT or SIGTERM cancels the engine's root token; later
//! ones are noted and change nothing (shutdown already finishes the batch in flight).

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Spawns the signal listener; `root` is cancelled on the first signal.
pub fn cancel_on_signal(root: CancellationToken) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(
        async move {
            loop {
                let name = tokio::select! {
                    _ = terminate.recv() => "SIGTERM",
                    _ = interrupt.recv() => "SIGINT",
                };
                if root.is_cancelled() {
                    tracing::warn!(
                        signal = name,
                        "already shutting down; finishing the batch in flight"
                    );
                } else {
                    tracing::info!(
                        signal = name,
                        "shutting down: finishing the batch in flight"
                    );
                    root.cancel();
                }
            }
        }
        // The signal's line carries the replica like every other.
        .in_current_span(),
    );
    Ok(())
}
