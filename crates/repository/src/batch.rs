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

use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};

/// Limits applied to every statement of a batch's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    /// Reuse one generic plan per prepared statement: for statements over many partitions, whose
    /// planning costs more than their run.
    pub generic_plans: bool,
    /// Commit without waiting for the WAL flush (`synchronous_commit = off`).
    pub async_commit: bool,
    /// The batch writes run history and keeps the facts itself: the change log skips its writes.
    pub history_write: bool,
    /// `wal_compression` for the batch's full-page images (`lz4`, `pglz`, `zstd`), when the role
    /// may set it (see [`wal_compression_settable`]).
    pub wal_compression: Option<&'static str>,
}

impl BatchLimits {
    pub fn new(statement_timeout: Duration, lock_timeout: Duration) -> Self {
        BatchLimits {
            statement_timeout,
            lock_timeout,
            generic_plans: false,
            async_commit: false,
            history_write: false,
            wal_compression: None,
        }
    }

    pub fn with_generic_plans(self) -> Self {
        BatchLimits {
            generic_plans: true,
            ..self
        }
    }

    pub fn with_async_commit(self, async_commit: bool) -> Self {
        BatchLimits {
            async_commit,
            ..self
        }
    }

    pub fn with_history_write(self) -> Self {
        BatchLimits {
            history_write: true,
            ..self
        }
    }

    pub fn with_lock_timeout(self, lock_timeout: Duration) -> Self {
        BatchLimits {
            lock_timeout,
            ..self
        }
    }

    pub fn with_wal_compression(self, wal_compression: Option<&'static str>) -> Self {
        BatchLimits {
            wal_compression,
            ..self
        }
    }
}

/// Whether this role may set `wal_compression` to `method` in its transactions: a superuser, or
/// a role granted `SET ON PARAMETER wal_compression` (PostgreSQL 15+), on a server built with
/// the method. `Ok(Err(reason))` when it may not (PostgreSQL's words).
pub async fn wal_compression_settable(
    pool: &PgPool,
    method: &'static str,
) -> Result<Result<(), String>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let result = sqlx::query(&format!("SET LOCAL wal_compression = {method}"))
        .execute(&mut *tx)
        .await;
    match result {
        Ok(_) => Ok(Ok(())),
        // permission denied (42501), or a method the server was built without (22023)
        Err(sqlx::Error::Database(error))
            if matches!(error.code().as_deref(), Some("42501" | "22023")) =>
        {
            Ok(Err(error.message().to_owned()))
        }
        Err(error) => Err(error),
    }
}

/// Opens a transaction whose statements obey `limits` (`SET LOCAL`: they end with it). The
/// settings go with the BEGIN, in one round trip.
pub async fn begin(
    pool: &PgPool,
    limits: BatchLimits,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with(begin_statement(limits)).await
}

/// [`begin`] on a connection the caller holds.
pub async fn begin_on(
    conn: &mut PgConnection,
    limits: BatchLimits,
) -> Result<Transaction<'_, Postgres>, sqlx::Error> {
    conn.begin_with(begin_statement(limits)).await
}

/// A transaction for the engine's own bookkeeping (leases, the run log, facts): its statements
/// use cached generic plans and its commit does not wait for the WAL to reach the disk. A crash
/// of the database can lose its last ~0.6 s of such commits, and that is harmless: a lease taken
/// but lost makes its holder's next renewal fail (it stops), a release lost lets the lease expire
/// after its time to live, a run record or a refresh of facts lost is simply not there (the
/// facts' log entries come back with it).
pub async fn begin_bookkeeping(
    pool: &PgPool,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with(format!("BEGIN; {BOOKKEEPING_SETTINGS}"))
        .await
}

/// [`begin_bookkeeping`] whose statements all read one snapshot (`REPEATABLE READ`): for reads
/// that must agree with each other, such as a plan that reads the layout of ranges and then what
/// each range holds. Under the default `READ COMMITTED` each statement reads the database as of
/// its own start, so a change committed between two of them (a carve moving rows into a new
/// range) can be seen by the second and not the first. Its reads only: it must not write.
pub async fn begin_snapshot(pool: &PgPool) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with(format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; {BOOKKEEPING_SETTINGS}"
    ))
    .await
}

const BOOKKEEPING_SETTINGS: &str = "SET LOCAL synchronous_commit = off; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL jit = off";

/// A column for a bookkeeping statement that runs as its own (implicit) transaction, making its
/// commit not wait for the disk as [`begin_bookkeeping`]'s transactions do: `set_config(...,
/// true)` sets `synchronous_commit` for the rest of the transaction, and it is read at the
/// commit, right after the statement. Its value (the text `off`) is to be ignored. The checked
/// statements that need it (`lease::start_run`, `maintenance::finish_run`) carry this text
/// written out: sqlx's macros take only literal text.
pub const BOOKKEEPING_COMMIT: &str = "(SELECT set_config('synchronous_commit', 'off', true))";

/// One batch of a single statement, `sql` (which must carry its values as literals), in one
/// round trip: the `SET LOCAL`s of `limits` and `sql` go as one simple query, which PostgreSQL
/// runs as one implicit transaction (committed after its last statement, rolled back whole on
/// an error). Returns the first row `sql` returns.
pub async fn one_statement<T>(
    pool: &PgPool,
    limits: BatchLimits,
    sql: &str,
) -> Result<T, sqlx::Error>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    let query = format!("{}; {sql}", set_locals(limits));
    let row = sqlx::raw_sql(&query).fetch_one(pool).await?;
    T::from_row(&row)
}

/// `BEGIN` and the `SET LOCAL`s of `limits`, as one simple query. READ COMMITTED whatever the
/// server's default: the rules' check before each deleting commit (`rule::confirm`) must read the
/// rules as they are then, not as of the transaction's first statement.
fn begin_statement(limits: BatchLimits) -> String {
    format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED; {}",
        set_locals(limits)
    )
}

/// The `SET LOCAL`s of `limits`. Every value is the engine's own (durations, fixed words):
/// nothing here comes from input. JIT compilation is off: the engine's statements are short, and
/// a generic plan's cost (estimated without its parameters' values) easily crosses
/// `jit_above_cost`, after which compiling took 750 ms of a 130 ms query.
fn set_locals(limits: BatchLimits) -> String {
    format!(
        "SET LOCAL statement_timeout = '{}'; SET LOCAL lock_timeout = '{}'; SET LOCAL plan_cache_mode = {}; \
         SET LOCAL synchronous_commit = {}; SET LOCAL engine.retention_write = '{}'; SET LOCAL jit = off{}",
        millis(limits.statement_timeout),
        millis(limits.lock_timeout),
        if limits.generic_plans { "force_generic_plan" } else { "auto" },
        if limits.async_commit { "off" } else { "on" },
        if limits.history_write { "on" } else { "" },
        limits.wal_compression.map(|method| format!("; SET LOCAL wal_compression = {method}")).unwrap_or_default(),
    )
}

fn millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

/// True when a lock was not had: PostgreSQL gave up waiting for it (`lock_timeout`, `55P03`), or
/// broke a cycle of waits by cancelling this transaction (a deadlock, `40P01`). Either way the
/// transaction is rolled back and nothing it did stays; every caller leaves the step to a later
/// attempt, quietly.
pub fn is_lock_not_had(error: &sqlx::Error) -> bool {
    let code = error.as_database_error().and_then(|e| e.code());
    matches!(code.as_deref(), Some("55P03" | "40P01"))
}

/// True when a statement hit `statement_timeout` or `lock_timeout`: the batch was rolled back and
/// a smaller one may succeed.
pub fn is_timeout(error: &sqlx::Error) -> bool {
    let code = error.as_database_error().and_then(|e| e.code());
    matches!(code.as_deref(), Some("55P03" | "57014"))
}

/// True when the transaction was rolled back to be run again as it is (SQLSTATE class 40): a
/// deadlock with another session (`40P01`, which PostgreSQL resolved by cancelling this one), or a
/// change of the retention rules that committed or was in progress while it ran (`40001`, from
/// `rule::confirm`). Nothing it did stays; running it again is safe and usually succeeds at once.
pub fn is_retryable(error: &sqlx::Error) -> bool {
    let code = error.as_database_error().and_then(|e| e.code());
    matches!(code.as_deref(), Some("40001" | "40P01"))
}

#[cfg(test)]
mod tests {
    /// The checked statements write [`super::BOOKKEEPING_COMMIT`] out: they must keep its text.
    #[test]
    fn checked_statements_carry_the_bookkeeping_commit() {
        for (file, source) in [
            ("lease.rs", include_str!("lease.rs")),
            ("maintenance.rs", include_str!("maintenance.rs")),
        ] {
            assert!(
                source.contains(super::BOOKKEEPING_COMMIT),
                "{file} no longer has the text of BOOKKEEPING_COMMIT"
            );
        }
    }
}
