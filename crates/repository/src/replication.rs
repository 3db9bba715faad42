//! What the primary knows of its standbys (`pg_stat_replication`, `pg_replication_slots`): what
//! the retention throttle waits on. Reading the LSN columns needs the `pg_monitor` role (or a
//! superuser); without it they read as NULL.

use sqlx::{FromRow, PgExecutor};

/// One standby connected to this server (a walsender), as it reported itself last.
#[derive(Debug, Clone, PartialEq, FromRow)]
pub struct Standby {
    /// `application_name`, else the walsender's pid.
    pub name: String,
    /// `streaming`, `catchup`, `startup`, `backup`, `stopping`.
    pub state: String,
    /// The WAL position it has replayed, as `pg_lsn` text; NULL without `pg_monitor`.
    pub replay_lsn: Option<String>,
    /// Bytes of WAL written on the primary and not yet replayed there.
    pub lag_bytes: Option<i64>,
    /// PostgreSQL's own measure of replay lag (seconds); NULL once it has caught up and idles.
    pub replay_lag_seconds: Option<f64>,
}

/// One row of [`standbys`]' query: the current WAL position, then the standby's name, state,
/// replay position, lag in bytes and in seconds (all NULL when no standby streams).
type StandbyRow = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<f64>,
);

/// The standbys streaming from this server now, and the server's current WAL position.
pub async fn standbys(
    executor: impl PgExecutor<'_>,
) -> Result<(String, Vec<Standby>), sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT pg_current_wal_lsn()::text AS "current!", s.name AS "name?", s.state AS "state?", s.replay_lsn AS "replay_lsn?",
                s.lag_bytes AS "lag_bytes?", s.replay_lag_seconds AS "replay_lag_seconds?"
         FROM (SELECT 1) one LEFT JOIN (
             SELECT coalesce(nullif(application_name, ''), pid::text) AS name, state, replay_lsn::text AS replay_lsn,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS lag_bytes,
                    extract(epoch FROM replay_lag)::float8 AS replay_lag_seconds
             FROM pg_stat_replication) s ON true"#
    )
    .fetch_all(executor)
    .await?;
    let rows: Vec<StandbyRow> = rows
        .into_iter()
        .map(|r| {
            (
                r.current,
                r.name,
                r.state,
                r.replay_lsn,
                r.lag_bytes,
                r.replay_lag_seconds,
            )
        })
        .collect();
    let current = rows.first().map(|r| r.0.clone()).unwrap_or_default();
    let standbys = rows
        .into_iter()
        .filter_map(
            |(_, name, state, replay_lsn, lag_bytes, replay_lag_seconds)| {
                Some(Standby {
                    name: name?,
                    state: state.unwrap_or_default(),
                    replay_lsn,
                    lag_bytes,
                    replay_lag_seconds,
                })
            },
        )
        .collect();
    Ok((current, standbys))
}

/// The WAL inserted so far (`pg_current_wal_insert_lsn`, which counts WAL not yet written out,
/// as asynchronous commits leave it), as `pg_lsn` text: the start of a measurement of the WAL a
/// piece of work writes (see [`wal_since`]).
pub async fn wal_position(executor: impl PgExecutor<'_>) -> Result<String, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT pg_current_wal_insert_lsn()::text AS "position!""#)
        .fetch_one(executor)
        .await
}

/// Bytes of WAL inserted since `position` (from [`wal_position`]).
pub async fn wal_since(executor: impl PgExecutor<'_>, position: &str) -> Result<i64, sqlx::Error> {
    // `$1::text::pg_lsn`: the position is bound as text (the macros know no pg_lsn).
    sqlx::query_scalar!(
        r#"SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)::bigint AS "bytes!""#,
        position
    )
    .fetch_one(executor)
    .await
}

/// Replication slots no standby is using, with the WAL each holds back (bytes).
pub async fn inactive_slots(
    executor: impl PgExecutor<'_>,
) -> Result<Vec<(String, Option<i64>)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT slot_name::text AS "slot!", pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS "held?"
         FROM pg_replication_slots WHERE NOT active ORDER BY slot_name"#
    )
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(|r| (r.slot, r.held)).collect())
}
