//! The pacing probe's two statements (retention-controller's `feedback`), run on a connection
//! of its own between and during a paced run's batches.

use sqlx::PgConnection;

/// A commit that waits for its WAL to reach the disk: a transaction id taken (`pg_current_xact_id`
/// assigns one, so the implicit transaction writes a commit record) and committed. Its time is
/// what a foreground commit waits now. The id is read as text and ignored.
pub async fn commit(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT pg_current_xact_id()::text AS "xid!""#)
        .fetch_one(conn)
        .await?;
    Ok(())
}

/// Other client backends of this database, active and waiting on a lock, a lightweight lock or
/// I/O. The engine's own connections share the probe's `application_name` (the engine names
/// them), or extend it as `<name>/...` (its admin server's), and are left out.
pub async fn foreground_waiting(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*)::int4 AS "waiting!" FROM pg_stat_activity
            WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()
              AND datname = current_database()
              AND wait_event_type IN ('Lock', 'LWLock', 'IO')
              AND (current_setting('application_name') = ''
                   OR (application_name <> current_setting('application_name')
                       AND NOT starts_with(application_name, current_setting('application_name') || '/')))"#
    )
    .fetch_one(conn)
    .await
}
