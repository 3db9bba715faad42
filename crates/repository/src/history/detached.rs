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
/// text) by rewrite `rewrite_id`, in the detaching transaction.
pub async fn record(
    conn: &mut PgConnection,
    relid: Oid,
    relname: &str,
    lower: &str,
    upper: &str,
    rewrite_id: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO history_detached (relid, relname, lower, upper, rewrite_id) VALUES ($1, $2, $3::text::timestamptz, $4::text::timestamptz, $5)",
        relid,
        relname,
        lower,
        upper,
        rewrite_id
    )
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
/// its own under `lock_timeout` (a table someone is reading is retried by the next call). The
/// sources of a rewrite whose count is not done are left to it (they are what it counts): its
/// last step drops them ([`super::rewrite::count::finish`]).
pub async fn drop_recorded(pool: &PgPool, lock_timeout: Duration) -> Result<Dropped, sqlx::Error> {
    let recorded: Vec<(Oid, String)> = sqlx::query!(
        "SELECT relid, relname FROM history_detached WHERE rewrite_id IS NULL ORDER BY detached_at, relid"
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|row| (row.relid, row.relname))
    .collect();
    let mut outcome = Dropped::default();
    for (relid, relname) in recorded {
        let mut tx = pool.begin().await?;
        sqlx::query!(
            "SELECT set_config('lock_timeout', $1, true)",
            format!("{}ms", lock_timeout.as_millis().max(1))
        )
        .fetch_one(&mut *tx)
        .await?;
        // The record's row lock: another runner dropping the same table meanwhile is left to it.
        let mine: Option<Oid> = sqlx::query_scalar!(
            "SELECT relid FROM history_detached WHERE relid = $1 AND rewrite_id IS NULL FOR UPDATE SKIP LOCKED",
            relid
        )
        .fetch_optional(&mut *tx)
        .await?;
        if mine.is_none() {
            continue;
        }
        match drop_if_ours(&mut tx, relid, &relname).await {
            Ok(Some(Ok(name))) => outcome.dropped.push(name),
            Ok(Some(Err(name))) => outcome.left_alone.push(name),
            Ok(None) => {}
            Err(error) if crate::batch::is_lock_not_had(&error) => continue,
            Err(error) => return Err(error),
        }
        sqlx::query!("DELETE FROM history_detached WHERE relid = $1", relid)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(outcome)
}

/// Drops table `relid` if it is still what the engine detached: same OID, the recorded name,
/// not a partition again. `Some(Ok(name))`: dropped; `Some(Err(name))`: it is something else now
/// (renamed, attached again), left alone; `None`: it is gone. In the caller's transaction, whose
/// `lock_timeout` bounds the wait for readers of the table.
pub(crate) async fn drop_if_ours(
    conn: &mut PgConnection,
    relid: Oid,
    relname: &str,
) -> Result<Option<Result<String, String>>, sqlx::Error> {
    let current: Option<(String, bool)> = sqlx::query!(
        r#"SELECT c.relname::text AS "relname!", c.relispartition FROM pg_class c
         WHERE c.oid = $1 AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'tasks'::regclass)"#,
        relid
    )
    .fetch_optional(&mut *conn)
    .await?
    .map(|row| (row.relname, row.relispartition));
    Ok(match current {
        Some((name, false)) if name == relname => {
            sqlx::query(&format!("DROP TABLE {}", super::ident(&name)))
                .execute(&mut *conn)
                .await?;
            Some(Ok(name))
        }
        Some((name, _)) => Some(Err(name)),
        None => None,
    })
}
