//! One bounded batch: a short transaction whose statements are capped by `statement_timeout` and
//! `lock_timeout`, so a batch can never hold locks or run for long.
//!
//! Full-speed batches commit asynchronously ([`BatchLimits::async_commit`]): a commit returns
//! without waiting for its WAL to reach the disk (the WAL writer flushes it within ~0.6 s).
//! Waiting made a purge three times slower than one bare DELETE (a flush per batch). What a crash
//! can cost is the last batches' deletions: those rows reappear, still due, and the next run
//! deletes them again. A crash can never make a batch delete more: every batch is atomic and
//! re-checks its rule. Paced batches commit synchronously: otherwise the next foreground commit
//! would wait to flush the batch's WAL, which is the very latency pacing is there to spare.

use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};

/// Limits applied to every statement of a batch's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    /// Reuse one generic plan per prepared statement (see
    /// [`crate::partitions::summarise_partitions`]): for statements over many partitions, whose
    /// planning costs more than their run.
    pub generic_plans: bool,
    /// Commit without waiting for the WAL flush (`synchronous_commit = off`).
    pub async_commit: bool,
}

impl BatchLimits {
    pub fn new(statement_timeout: Duration, lock_timeout: Duration) -> Self {
        BatchLimits { statement_timeout, lock_timeout, generic_plans: false, async_commit: false }
    }

    pub fn with_generic_plans(self) -> Self {
        BatchLimits { generic_plans: true, ..self }
    }

    pub fn with_async_commit(self, async_commit: bool) -> Self {
        BatchLimits { async_commit, ..self }
    }
}

/// Opens a transaction whose statements obey `limits` (`SET LOCAL`: they end with it).
pub async fn begin(pool: &PgPool, limits: BatchLimits) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "SELECT set_config('statement_timeout', $1, true), set_config('lock_timeout', $2, true),
                set_config('plan_cache_mode', $3, true), set_config('synchronous_commit', $4, true)",
    )
    .bind(millis(limits.statement_timeout))
    .bind(millis(limits.lock_timeout))
    .bind(if limits.generic_plans { "force_generic_plan" } else { "auto" })
    .bind(if limits.async_commit { "off" } else { "on" })
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

/// True when PostgreSQL gave up waiting for a lock (`lock_timeout`).
pub fn is_lock_timeout(error: &sqlx::Error) -> bool {
    error.as_database_error().and_then(|e| e.code()).as_deref() == Some("55P03")
}

/// True when a statement hit `statement_timeout` or `lock_timeout`: the batch was rolled back and
/// a smaller one may succeed.
pub fn is_timeout(error: &sqlx::Error) -> bool {
    let code = error.as_database_error().and_then(|e| e.code());
    matches!(code.as_deref(), Some("55P03" | "57014"))
}
