//! Compressed full-page images for the engine's deletes (`retention.wal_compression`).
//!
//! Most of the WAL a purge writes is full-page images: the first change to a page after a
//! checkpoint copies the whole page into the WAL (a 1 GB backlog wrote 1.1 GB). The engine's
//! batches compress them (`SET LOCAL wal_compression`, for their own transactions only), which
//! writes less, sends less to the standbys and leaves the disk to the foreground sooner
//! (docs/benchmarks.md). Setting it needs a superuser or, from PostgreSQL 15, `GRANT SET ON
//! PARAMETER wal_compression TO <role>`; without it, or on a server built without the method,
//! batches write as the server is configured, and the log says why once per process.

use repository::batch;
use sqlx::PgPool;

use crate::settings::WalCompressionMethod;

/// Shared by every run of a process: whether the role may set the method is asked once.
#[derive(Debug)]
pub struct WalCompression {
    method: &'static str,
    settable: tokio::sync::OnceCell<bool>,
}

impl WalCompression {
    /// `None` for [`WalCompressionMethod::Off`].
    pub fn new(method: WalCompressionMethod) -> Option<Self> {
        Some(WalCompression {
            method: method.as_sql()?,
            settable: tokio::sync::OnceCell::new(),
        })
    }

    /// The method batches set, if this role may set it (asked at the first call that reaches the
    /// database; a failure to ask is asked again at the next run).
    pub async fn for_batches(&self, pool: &PgPool) -> Option<&'static str> {
        let settable = self
            .settable
            .get_or_try_init(|| async {
                batch::wal_compression_settable(pool, self.method).await.map(|settable| match settable {
                    Ok(()) => true,
                    Err(reason) => {
                        tracing::warn!(
                            method = self.method,
                            reason,
                            "batches write WAL as the server is configured: grant the role SET ON PARAMETER wal_compression \
                             (PostgreSQL 15+), or set retention.wal_compression = \"off\" to silence this"
                        );
                        false
                    }
                })
            })
            .await;
        match settable {
            Ok(true) => Some(self.method),
            Ok(false) => None,
            Err(error) => {
                tracing::debug!(%error, "could not ask whether wal_compression may be set; not this run");
                None
            }
        }
    }
}
