//! One runner per task across every engine on a database: a lease in `maintenance_tasks`
//! (`lease_run_id`, `lease_holder`, `lease_expires_at`). It is taken only when free or expired,
//! by the database's clock, in one conditional upsert, so two replicas can never both take it; its
//! holder renews it while the run goes on and clears it at the end. A holder that dies, hangs or
//! loses the database stops renewing, and its lease expires after its time to live. Its writes
//! commit without waiting for the disk (see `batch::begin_bookkeeping` for why that is safe).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

/// A lease on one task, held by run `run_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub task: String,
    pub run_id: Uuid,
    pub ttl: Duration,
    /// The database's clock (`clock_timestamp()`) when the lease was taken.
    pub taken_at: DateTime<Utc>,
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
    /// Extends the lease by its time to live from now, if it is still ours.
    pub async fn renew(&self, pool: &PgPool) -> Result<Renewal, sqlx::Error> {
        let mut tx = crate::batch::begin_bookkeeping(pool).await?;
        let paused: Option<bool> = sqlx::query_scalar!(
            "UPDATE maintenance_tasks SET lease_expires_at = now() + make_interval(secs => $3)
             WHERE task = $1 AND lease_run_id = $2
             RETURNING paused",
            self.task,
            self.run_id,
            self.ttl.as_secs_f64()
        )
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(match paused {
            Some(paused) => Renewal::Renewed { paused },
            None => Renewal::Lost,
        })
    }

    /// Clears the lease, if it is still ours; returns whether it was.
    pub async fn release(&self, pool: &PgPool) -> Result<bool, sqlx::Error> {
        let mut tx = crate::batch::begin_bookkeeping(pool).await?;
        let released = clear(&mut *tx, &self.task, self.run_id).await?;
        tx.commit().await?;
        Ok(released)
    }
}

/// Clears `task`'s lease if run `run_id` holds it; returns whether it did.
pub(crate) async fn clear(
    executor: impl PgExecutor<'_>,
    task: &str,
    run_id: Uuid,
) -> Result<bool, sqlx::Error> {
    let cleared = sqlx::query!(
        "UPDATE maintenance_tasks SET lease_run_id = NULL, lease_holder = NULL, lease_expires_at = NULL
         WHERE task = $1 AND lease_run_id = $2",
        task,
        run_id
    )
    .execute(executor)
    .await?;
    Ok(cleared.rows_affected() == 1)
}

/// How asking to start a run of a task went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The lease is this run's and the run is recorded as started.
    Started(Lease),
    /// Another runner holds an unexpired lease.
    Busy,
    /// An operator paused the task: nothing was taken.
    Paused,
    /// A scheduled run found the task's last run finished with nothing left less than an
    /// interval ago: nothing was taken; it is due after this long.
    NotDue(Duration),
}

/// Starts run `run_id` of `task` on `holder`: takes the task's lease if no unexpired lease exists
/// and, unless the task is paused or (for a `scheduled` run whose runs are `interval` apart) not
/// due yet, records the run as started: the task's last run, a row in the run log, and any run
/// of the task left unfinished closed as abandoned. Otherwise it takes nothing.
///
/// One statement, one round trip, its own transaction, whose commit does not wait for the disk
/// ([`crate::batch::BOOKKEEPING_COMMIT`]). The task's row is
/// taken only when every condition holds (the upsert's `WHERE`); when it is not, the row as the
/// statement found it says why.
pub async fn start_run(
    pool: &PgPool,
    task: &str,
    run_id: Uuid,
    holder: &str,
    ttl: Duration,
    scheduled_every: Option<Duration>,
) -> Result<Start, sqlx::Error> {
    // The last column is `crate::batch::BOOKKEEPING_COMMIT` (the macros take only literal text).
    let row = sqlx::query!(
        r#"WITH taken AS (
             INSERT INTO maintenance_tasks AS m (task, lease_run_id, lease_holder, lease_expires_at, last_run_id, last_started_at)
             VALUES ($1, $2, $3, now() + make_interval(secs => $4), $2, now())
             ON CONFLICT (task) DO UPDATE
                 SET lease_run_id = excluded.lease_run_id, lease_holder = excluded.lease_holder,
                     lease_expires_at = excluded.lease_expires_at, last_run_id = excluded.last_run_id,
                     last_started_at = excluded.last_started_at, last_finished_at = NULL,
                     last_outcome = NULL, last_rows = NULL, updated_at = now()
                 WHERE (m.lease_expires_at IS NULL OR m.lease_expires_at <= now())
                   AND NOT m.paused
                   AND NOT coalesce(m.last_outcome = 'done' AND m.last_finished_at + make_interval(secs => $5) > now(), false)
             RETURNING m.task
         ), abandoned AS (
             UPDATE maintenance_runs SET finished_at = now(), outcome = 'failed',
                    error = 'abandoned: its runner stopped before the run finished'
             WHERE task = $1 AND finished_at IS NULL AND EXISTS (SELECT 1 FROM taken)
         ), run AS (
             INSERT INTO maintenance_runs (run_id, task, replica, started_at) SELECT $2, $1, $3, now() FROM taken
         )
         SELECT EXISTS (SELECT 1 FROM taken) AS "started!", m.lease_expires_at > now() AS "held?", m.paused AS "paused?",
                CASE WHEN m.last_outcome = 'done'
                     THEN extract(epoch FROM m.last_finished_at + make_interval(secs => $5) - now())::float8 END AS "due_in?",
                clock_timestamp() AS "taken_at!", (SELECT set_config('synchronous_commit', 'off', true)) AS "commit!"
         FROM (SELECT) AS one LEFT JOIN maintenance_tasks m ON m.task = $1"#,
        task,
        run_id,
        holder,
        ttl.as_secs_f64(),
        scheduled_every.map(|every| every.as_secs_f64())
    )
    .fetch_one(pool)
    .await?;
    let (started, held, paused, due_in, taken_at) =
        (row.started, row.held, row.paused, row.due_in, row.taken_at);
    if started {
        return Ok(Start::Started(Lease {
            task: task.to_owned(),
            run_id,
            ttl,
            taken_at,
        }));
    }
    // Not taken: the row as the statement found it says why. A lease free then but taken by
    // another runner before this statement could is busy too.
    Ok(if held == Some(true) {
        Start::Busy
    } else if paused == Some(true) {
        Start::Paused
    } else if let (Some(_), Some(wait)) = (scheduled_every, due_in.filter(|secs| *secs > 0.0)) {
        Start::NotDue(Duration::from_secs_f64(wait))
    } else {
        Start::Busy
    })
}

/// Who holds `task`'s lease now (an unexpired lease), if anyone.
pub async fn holder(
    executor: impl PgExecutor<'_>,
    task: &str,
) -> Result<Option<String>, sqlx::Error> {
    // A lease in force always has a holder: a row with none fails to decode, as it always did.
    sqlx::query_scalar!(
        r#"SELECT lease_holder AS "lease_holder!" FROM maintenance_tasks WHERE task = $1 AND lease_expires_at > now()"#,
        task
    )
    .fetch_optional(executor)
    .await
}
