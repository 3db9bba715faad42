//! One runner per task across every engine on a database: a session-level advisory lock, held
//! on a dedicated connection for the length of a run. A crashed holder's lock goes with its
//! connection, so a dead runner never blocks the others.

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

/// Proof that this process is the only runner of one task. [`TaskLock::release`] unlocks and
/// returns the connection to the pool; dropping it without that (a panic) closes the connection
/// instead, which releases the lock, so a lock can never ride along in the pool.
pub struct TaskLock {
    task: String,
    conn: Option<PoolConnection<Postgres>>,
}

impl Drop for TaskLock {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

impl TaskLock {
    /// Takes the task's lock if no other session holds it; never waits.
    pub async fn try_acquire(pool: &PgPool, task: &str) -> Result<Option<TaskLock>, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
            .bind(lock_name(task))
            .fetch_one(&mut *conn)
            .await?;
        if !acquired {
            return Ok(None);
        }
        Ok(Some(TaskLock { task: task.to_owned(), conn: Some(conn) }))
    }

    /// Releases the lock now, reporting whether it was still held (it is lost if the connection
    /// broke during the run).
    pub async fn release(mut self) -> Result<bool, sqlx::Error> {
        let mut conn = self.conn.take().expect("a lock holds its connection until released");
        let released = sqlx::query_scalar("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
            .bind(lock_name(&self.task))
            .fetch_one(&mut *conn)
            .await;
        if !matches!(released, Ok(true)) {
            conn.close_on_drop();
        }
        released
    }
}

fn lock_name(task: &str) -> String {
    format!("engine.retention.{task}")
}

/// Whether some session holds `task`'s lock now (a run is in progress somewhere).
pub async fn is_held(executor: impl sqlx::PgExecutor<'_>, task: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks
                        WHERE locktype = 'advisory' AND granted AND objsubid = 1
                          AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0))",
    )
    .bind(lock_name(task))
    .fetch_one(executor)
    .await
}
