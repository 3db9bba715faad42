//! One runner per task across every engine on a database: a lease in `maintenance_tasks`
//! (`lease_run_id`, `lease_holder`, `lease_expires_at`). It is taken only when free or expired,
//! by the database's clock, in one conditional upsert, so two replicas can never both take it; its
//! holder renews it while the run goes on and clears it at the end. A holder that dies, hangs or
//! loses the database stops renewing, and its lease expires after its time to live.

use std::time::Duration;

use sqlx::PgExecutor;
use uuid::Uuid;

/// A lease on one task, held by run `run_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub task: String,
    pub run_id: Uuid,
    pub ttl: Duration,
}

/// What a renewal learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours for another time to live; `paused` says whether an operator paused the task.
    Renewed { paused: bool },
    /// Another runner holds the task now (ours expired and was taken) or an operator cleared it.
    Lost,
}

impl Lease {
    /// Takes `task`'s lease for run `run_id` of `holder` if no unexpired lease exists; never waits.
    pub async fn try_acquire(
        executor: impl PgExecutor<'_>,
        task: &str,
        run_id: Uuid,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, sqlx::Error> {
        // Concurrent takers queue on the row; the second sees the first's lease and takes nothing.
        let taken: Option<bool> = sqlx::query_scalar(
            "INSERT INTO maintenance_tasks AS m (task, lease_run_id, lease_holder, lease_expires_at)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4))
             ON CONFLICT (task) DO UPDATE
                 SET lease_run_id = excluded.lease_run_id, lease_holder = excluded.lease_holder,
                     lease_expires_at = excluded.lease_expires_at
                 WHERE m.lease_expires_at IS NULL OR m.lease_expires_at <= now()
             RETURNING true",
        )
        .bind(task)
        .bind(run_id)
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .fetch_optional(executor)
        .await?;
        Ok(taken.map(|_| Lease { task: task.to_owned(), run_id, ttl }))
    }

    /// Extends the lease by its time to live from now, if it is still ours.
    pub async fn renew(&self, executor: impl PgExecutor<'_>) -> Result<Renewal, sqlx::Error> {
        let paused: Option<bool> = sqlx::query_scalar(
            "UPDATE maintenance_tasks SET lease_expires_at = now() + make_interval(secs => $3)
             WHERE task = $1 AND lease_run_id = $2
             RETURNING paused",
        )
        .bind(&self.task)
        .bind(self.run_id)
        .bind(self.ttl.as_secs_f64())
        .fetch_optional(executor)
        .await?;
        Ok(match paused {
            Some(paused) => Renewal::Renewed { paused },
            None => Renewal::Lost,
        })
    }

    /// Clears the lease, if it is still ours; returns whether it was.
    pub async fn release(&self, executor: impl PgExecutor<'_>) -> Result<bool, sqlx::Error> {
        let released = sqlx::query(
            "UPDATE maintenance_tasks SET lease_run_id = NULL, lease_holder = NULL, lease_expires_at = NULL
             WHERE task = $1 AND lease_run_id = $2",
        )
        .bind(&self.task)
        .bind(self.run_id)
        .execute(executor)
        .await?;
        Ok(released.rows_affected() == 1)
    }
}

/// Who holds `task`'s lease now (an unexpired lease), if anyone.
pub async fn holder(executor: impl PgExecutor<'_>, task: &str) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT lease_holder FROM maintenance_tasks WHERE task = $1 AND lease_expires_at > now()")
        .bind(task)
        .fetch_optional(executor)
        .await
}
