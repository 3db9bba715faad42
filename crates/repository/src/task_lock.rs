//! One runner per task across every engine on a database: a session-level advisory lock, held
//! on a dedicated connection for the length of a run. A crashed holder's lock goes with its
//! connection, so a dead runner never blocks the others.

use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};

/// Proof that this process is the only runner of one task. Dropping it closes its connection,
/// which releases the lock.
pub struct TaskLock {
    task: String,
    conn: PoolConnection<Postgres>,
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
        // However this value is dropped (a panic included), the connection is closed rather than
        // returned to the pool with the lock still on it.
        conn.close_on_drop();
        Ok(Some(TaskLock { task: task.to_owned(), conn }))
    }

    /// Releases the lock now, reporting whether it was still held (it is lost if the connection
    /// broke during the run).
    pub async fn release(mut self) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
            .bind(lock_name(&self.task))
            .fetch_one(&mut *self.conn)
            .await
    }
}

fn lock_name(task: &str) -> String {
    format!("engine.retention.{task}")
}
