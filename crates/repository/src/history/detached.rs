//! The tables the engine detached itself. Each is recorded by OID in `history_detached` in the
//! transaction that detaches it, and dropped after that transaction commits, in one of its own,
//! so the parents' lock is not held while files are unlinked. A crash between the two leaves the
//! record, and the next run drops the table. A table is dropped only while it is the one recorded:
//! same OID, same name, not a partition again. Anything else (a table an operator detached, a
//! recorded table an operator renamed to keep it, or attached again) is never touched.

use std::time::Duration;

use sqlx::postgres::types::Oid;
use sqlx::{PgConnection, PgPool};

/// Records that `relid` (now named `relname`) was detached from the range `[lower, upper)` (SQL
/// text), in the detaching transaction.
pub async fn record(conn: &mut PgConnection, relid: Oid, relname: &str, lower: &str, upper: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO history_detached (relid, relname, lower, upper) VALUES ($1, $2, $3::timestamptz, $4::timestamptz)")
        .bind(relid)
        .bind(relname)
        .bind(lower)
        .bind(upper)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// What became of the recorded tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropped {
    pub dropped: Vec<String>,
    /// Recorded tables that are no longer what the engine detached (renamed, attached again):
    /// forgotten, left as they are.
    pub left_alone: Vec<String>,
}

/// Drops every recorded table that is still what the engine detached, each in a transaction of
/// its own under `lock_timeout` (a table someone is reading is retried by the next call).
pub async fn drop_recorded(pool: &PgPool, lock_timeout: Duration) -> Result<Dropped, sqlx::Error> {
    let recorded: Vec<(Oid, String)> = sqlx::query_as("SELECT relid, relname FROM history_detached ORDER BY detached_at, relid")
        .fetch_all(pool)
        .await?;
    let mut outcome = Dropped::default();
    for (relid, relname) in recorded {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", lock_timeout.as_millis().max(1)))
            .execute(&mut *tx)
            .await?;
        // The record's row lock: another runner dropping the same table meanwhile is left to it.
        let mine: Option<Oid> = sqlx::query_scalar("SELECT relid FROM history_detached WHERE relid = $1 FOR UPDATE SKIP LOCKED")
            .bind(relid)
            .fetch_optional(&mut *tx)
            .await?;
        if mine.is_none() {
            continue;
        }
        let current: Option<(String, bool)> = sqlx::query_as(
            "SELECT c.relname::text, c.relispartition FROM pg_class c
             WHERE c.oid = $1 AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'tasks'::regclass)",
        )
        .bind(relid)
        .fetch_optional(&mut *tx)
        .await?;
        match current {
            Some((name, false)) if name == relname => {
                match sqlx::query(&format!("DROP TABLE {}", super::ident(&name))).execute(&mut *tx).await {
                    Ok(_) => {}
                    Err(error) if crate::batch::is_lock_timeout(&error) => continue,
                    Err(error) => return Err(error),
                }
                outcome.dropped.push(name);
            }
            Some((name, _)) => outcome.left_alone.push(name),
            None => {}
        }
        sqlx::query("DELETE FROM history_detached WHERE relid = $1").bind(relid).execute(&mut *tx).await?;
        tx.commit().await?;
    }
    Ok(outcome)
}
