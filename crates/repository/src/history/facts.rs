//! Facts per range and tenant (`history_range_tenants`): rows, active tasks, the oldest and
//! newest finish instants of final tasks, and when the next task becomes due under the tenant's
//! retention. A run reads the pairs whose time has come instead of probing every range for every
//! tenant, so a steady-state run costs what changed and what is due.
//!
//! The facts stay exact because every write into a range is logged (`history_changes`, by a
//! trigger on each partition) except the engine's own (which update the facts themselves) and
//! those during a range's own live window [lower, upper) by the database's clock, where almost
//! every insert lands: a range whose window has begun is probed instead of trusted
//! ([`super::Range::is_live`]), and once the window has passed its facts are rebuilt from its rows
//! ([`settle`]), after every transaction that was running when it passed has finished.

use chrono::{DateTime, Utc};
use sqlx::postgres::types::Oid;
use sqlx::{FromRow, PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use super::{next_due, tenant_held, Range, ACTIVE, FINAL};
use crate::batch::{self, BatchLimits};

/// Rebuilds the facts of the range whose `tasks` partition is `tasks_relid` from its rows, in the
/// caller's transaction (which holds the range's row lock, or created the range), and marks it
/// settled. Consumes the range's logged changes first: each was committed before the rows are
/// read, so the rebuild accounts for it. Returns the range's rows.
pub async fn rebuild(conn: &mut PgConnection, tasks_relid: Oid) -> Result<i64, sqlx::Error> {
    sqlx::query(
        "DELETE FROM history_changes c USING history_ranges r
         WHERE r.tasks_relid = $1 AND c.relid IN (r.tasks_relid, r.events_relid)",
    )
    .bind(tasks_relid)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM history_range_tenants WHERE tasks_relid = $1").bind(tasks_relid).execute(&mut *conn).await?;
    let table: String = sqlx::query_scalar("SELECT $1::regclass::text").bind(tasks_relid).fetch_one(&mut *conn).await?;
    let rows: i64 = sqlx::query_scalar(&format!(
        "WITH summary AS (
             SELECT t.tenant_id, count(*) AS rows,
                    count(*) FILTER (WHERE t.status IN {ACTIVE}) AS active,
                    min(coalesce(t.finished_at, t.inserted_at)) FILTER (WHERE t.status IN {FINAL}) AS oldest,
                    max(coalesce(t.finished_at, t.inserted_at)) FILTER (WHERE t.status IN {FINAL}) AS newest
             FROM {table} t
             GROUP BY t.tenant_id
         ), ins AS (
             INSERT INTO history_range_tenants (tasks_relid, tenant_id, rows, active, oldest_final, newest_final, next_due_at)
             SELECT $1, s.tenant_id, s.rows, s.active, s.oldest, s.newest,
                    {next_due}
             FROM summary s LEFT JOIN tenants tn ON tn.id = s.tenant_id
             RETURNING rows
         )
         SELECT coalesce(sum(rows), 0)::bigint FROM ins",
        next_due = next_due("s.oldest", "tn"),
    ))
    .bind(tasks_relid)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("UPDATE history_ranges SET rows = $2, settled_at = now(), settle_xid = NULL WHERE tasks_relid = $1")
        .bind(tasks_relid)
        .bind(rows)
        .execute(&mut *conn)
        .await?;
    Ok(rows)
}

/// Rebuilds the facts of every range that needs it ([`Range::needs_settle`]) and whose wait is
/// over: first the transaction id of now is recorded on it; the rebuild happens once every
/// transaction older than that has finished, so no write of its live window can commit unseen
/// after the rebuild read the rows. Usually both happen in the same call. Ranges another runner
/// is rebuilding or rewriting are skipped. Returns the ranges rebuilt.
pub async fn settle(pool: &PgPool, limits: BatchLimits) -> Result<Vec<String>, sqlx::Error> {
    let limits = bookkeeping(limits);
    // One read decides, in the usual case that nothing needs doing.
    let (to_mark, ready): (bool, Vec<Oid>) = sqlx::query_as(
        "SELECT coalesce(bool_or(settle_xid IS NULL AND (settled_at IS NULL OR (settled_at < upper AND upper <= now()))), false),
                coalesce(array_agg(tasks_relid ORDER BY lower)
                         FILTER (WHERE settle_xid IS NOT NULL AND settle_xid < pg_snapshot_xmin(pg_current_snapshot())), '{}')
         FROM history_ranges",
    )
    .fetch_one(pool)
    .await?;
    let mut waiting = ready;
    if to_mark {
        let mut tx = batch::begin(pool, limits).await?;
        sqlx::query(
            "UPDATE history_ranges SET settle_xid = pg_current_xact_id()
             WHERE settle_xid IS NULL AND (settled_at IS NULL OR (settled_at < upper AND upper <= now()))",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        waiting = sqlx::query_scalar(
            "SELECT tasks_relid FROM history_ranges
             WHERE settle_xid IS NOT NULL AND settle_xid < pg_snapshot_xmin(pg_current_snapshot()) ORDER BY lower",
        )
        .fetch_all(pool)
        .await?;
    }
    let mut settled = Vec::new();
    for relid in waiting {
        let mut tx = batch::begin(pool, limits).await?;
        let name: Option<String> = sqlx::query_scalar(
            "SELECT tasks_relid::regclass::text FROM history_ranges
             WHERE tasks_relid = $1 AND settle_xid IS NOT NULL FOR UPDATE SKIP LOCKED",
        )
        .bind(relid)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(name) = name else { continue };
        rebuild(&mut tx, relid).await?;
        tx.commit().await?;
        settled.push(name);
    }
    Ok(settled)
}

/// Facts are the engine's bookkeeping: their transactions use cached generic plans (their
/// statements run over every partition, where planning costs more than running) and commit
/// without waiting for the disk (`batch::begin_bookkeeping` says why that is safe).
pub fn bookkeeping(limits: BatchLimits) -> BatchLimits {
    limits.with_generic_plans().with_async_commit(true)
}

/// What [`refresh`] consumed from the change log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Tenants whose rules changed.
    pub tenants: u64,
    /// (range, tenant) pairs whose rows changed.
    pub pairs: u64,
}

/// Applies the logged changes to the facts: a tenant whose rules changed gets every pair's next
/// due instant recomputed; a pair whose rows changed is probed again. Entries of ranges locked by
/// a rewrite in progress are left to it (it replays them into the new range, and discards them
/// with the old one). One transaction.
pub async fn refresh(pool: &PgPool, limits: BatchLimits) -> Result<Refreshed, sqlx::Error> {
    let pending: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM history_changes)").fetch_one(pool).await?;
    if !pending {
        return Ok(Refreshed::default());
    }
    let mut tx = batch::begin(pool, bookkeeping(limits)).await?;
    let tenants: Vec<Uuid> = sqlx::query_scalar(&format!(
        "WITH gone AS (DELETE FROM history_changes WHERE relid = 0 RETURNING tenant_id),
              changed AS (SELECT DISTINCT tenant_id FROM gone),
              updated AS (
                  UPDATE history_range_tenants p
                  SET next_due_at = {next_due}
                  FROM changed c LEFT JOIN tenants tn ON tn.id = c.tenant_id
                  WHERE p.tenant_id = c.tenant_id
                  RETURNING 1)
         SELECT tenant_id FROM changed",
        next_due = next_due("p.oldest_final", "tn"),
    ))
    .fetch_all(&mut *tx)
    .await?;
    let changed: Vec<(Oid, Uuid, i64)> = sqlx::query_as(
        "WITH r AS (SELECT tasks_relid, events_relid FROM history_ranges FOR KEY SHARE SKIP LOCKED),
              gone AS (
                  DELETE FROM history_changes c USING r
                  WHERE c.relid IN (r.tasks_relid, r.events_relid)
                  RETURNING r.tasks_relid, c.relid = r.tasks_relid AS task_change, c.op, c.tenant_id)
         SELECT tasks_relid, tenant_id,
                sum(CASE op WHEN 'I' THEN 1 WHEN 'D' THEN -1 ELSE 0 END)::bigint
         FROM gone WHERE task_change GROUP BY tasks_relid, tenant_id",
    )
    .fetch_all(&mut *tx)
    .await?;
    resummarise(&mut tx, &changed).await?;
    tx.commit().await?;
    Ok(Refreshed { tenants: tenants.len() as u64, pairs: changed.len() as u64 })
}

/// Probes each `(range, tenant, rows added)` pair again: its active tasks, oldest and newest
/// final tasks (index probes of the range's partition), its rows adjusted by `rows added`, and
/// its next due instant. A pair left with no rows is removed; pairs of ranges that are gone are
/// skipped. One statement per range.
pub async fn resummarise(conn: &mut PgConnection, pairs: &[(Oid, Uuid, i64)]) -> Result<(), sqlx::Error> {
    let mut relids: Vec<Oid> = pairs.iter().map(|p| p.0).collect();
    relids.sort_by_key(|oid| oid.0);
    relids.dedup();
    let tables: Vec<(Oid, String)> =
        sqlx::query_as("SELECT tasks_relid, tasks_relid::regclass::text FROM history_ranges WHERE tasks_relid = ANY($1)")
            .bind(&relids)
            .fetch_all(&mut *conn)
            .await?;
    for (relid, table) in tables {
        let (tenants, deltas): (Vec<Uuid>, Vec<i64>) = pairs.iter().filter(|p| p.0 == relid).map(|p| (p.1, p.2)).unzip();
        let result = sqlx::query(&format!(
            "WITH c AS (SELECT * FROM unnest($2::uuid[], $3::int8[]) AS c(tenant_id, delta)),
             probed AS (
                 SELECT $1::oid AS relid, c.tenant_id, c.delta, x.active, x.oldest, x.newest,
                        x.active + CASE WHEN x.oldest IS NULL THEN 0 ELSE 1 END AS least_rows
                 FROM c CROSS JOIN LATERAL (SELECT
                        (SELECT count(*) FROM {table} t WHERE t.tenant_id = c.tenant_id AND t.status IN {ACTIVE}) AS active,
                        (SELECT min(coalesce(t.finished_at, t.inserted_at)) FROM {table} t
                         WHERE t.tenant_id = c.tenant_id AND t.status IN {FINAL}) AS oldest,
                        (SELECT max(coalesce(t.finished_at, t.inserted_at)) FROM {table} t
                         WHERE t.tenant_id = c.tenant_id AND t.status IN {FINAL}) AS newest) x
                 WHERE EXISTS (SELECT 1 FROM history_ranges WHERE tasks_relid = $1)
             ), emptied AS (
                 DELETE FROM history_range_tenants p USING probed
                 WHERE p.tasks_relid = probed.relid AND p.tenant_id = probed.tenant_id AND probed.least_rows = 0
             ), kept AS (
                 SELECT probed.*, {next_due} AS next_due
                 FROM probed LEFT JOIN tenants tn ON tn.id = probed.tenant_id
                 WHERE probed.least_rows > 0
             ), updated AS (
                 UPDATE history_range_tenants p
                 SET rows = greatest(p.rows + kept.delta, kept.least_rows), active = kept.active, oldest_final = kept.oldest,
                     newest_final = kept.newest, next_due_at = kept.next_due
                 FROM kept WHERE p.tasks_relid = kept.relid AND p.tenant_id = kept.tenant_id
                 RETURNING p.tasks_relid, p.tenant_id
             )
             INSERT INTO history_range_tenants (tasks_relid, tenant_id, rows, active, oldest_final, newest_final, next_due_at)
             SELECT kept.relid, kept.tenant_id, greatest(kept.delta, kept.least_rows), kept.active, kept.oldest, kept.newest, kept.next_due
             FROM kept
             WHERE NOT EXISTS (SELECT 1 FROM updated u WHERE u.tasks_relid = kept.relid AND u.tenant_id = kept.tenant_id)
             ON CONFLICT (tasks_relid, tenant_id) DO NOTHING",
            next_due = next_due("probed.oldest", "tn"),
        ))
        .bind(relid)
        .bind(&tenants)
        .bind(&deltas)
        .execute(&mut *conn)
        .await;
        match result {
            Ok(_) => {}
            // The range was dropped since it was looked up: its pairs went with it.
            Err(error) if super::deletes::is_undefined_table(&error) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// One (range, tenant) pair: what the facts say, or what a probe of a live range found.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Pair {
    pub tasks_relid: Oid,
    pub tenant_id: Uuid,
    /// The tenant was deleted longer ago than the grace: every row of it is due.
    pub purged: bool,
    pub rows: i64,
    pub active: i64,
    pub oldest_final: Option<DateTime<Utc>>,
    pub newest_final: Option<DateTime<Utc>>,
    /// The tenant's retention cutoff now (`None`: keeps forever, or the tenant is deleted).
    pub cutoff: Option<DateTime<Utc>>,
    /// Tasks in the whole range, as its pairs count them.
    pub range_rows: i64,
}

/// Pairs with something due now: those whose next due instant has come, and every pair of a
/// tenant deleted longer ago than `grace`. Each part starts from its index (`next_due_at`, the
/// deleted tenants), so the cost is the pairs found, not all pairs. Ranges that are live are not
/// trusted: see [`probe`].
pub async fn due_pairs(executor: impl PgExecutor<'_>, grace: std::time::Duration) -> Result<Vec<Pair>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT p.tasks_relid, p.tenant_id, coalesce(tn.deleted_at < now() - $1, false) AS purged,
                p.rows, p.active, p.oldest_final, p.newest_final,
                CASE WHEN tn.deleted_at IS NULL AND retention_cutoff(now(), tn.shortest_retention_period) > '-infinity'
                     THEN retention_cutoff(now(), tn.shortest_retention_period) END AS cutoff,
                (SELECT coalesce(sum(q.rows), 0)::bigint FROM history_range_tenants q WHERE q.tasks_relid = p.tasks_relid) AS range_rows
         FROM history_range_tenants p LEFT JOIN tenants tn ON tn.id = p.tenant_id
         WHERE p.next_due_at <= now() AND NOT {held}
         UNION
         SELECT p.tasks_relid, p.tenant_id, true AS purged, p.rows, p.active, p.oldest_final, p.newest_final,
                NULL::timestamptz AS cutoff,
                (SELECT coalesce(sum(q.rows), 0)::bigint FROM history_range_tenants q WHERE q.tasks_relid = p.tasks_relid) AS range_rows
         FROM tenants tn JOIN history_range_tenants p ON p.tenant_id = tn.id
         WHERE tn.deleted_at < now() - $1 AND NOT {held}
         ORDER BY 1, 2",
        held = tenant_held("p.tenant_id", "now()"),
    ))
    .bind(super::interval(grace))
    .fetch_all(executor)
    .await
}

/// The tenants with something due in a live `range` now, found by probing its partition: tenants deleted
/// longer ago than `grace`, and live tenants whose retention is shorter than the range's age (a
/// task in the range is not finished before the range began, or the change log says so), each
/// checked with one index probe.
pub async fn probe(executor: impl PgExecutor<'_>, range: &Range, grace: std::time::Duration) -> Result<Vec<Pair>, sqlx::Error> {
    sqlx::query_as(&format!(
        "WITH b AS MATERIALIZED (SELECT $2::timestamptz AS lower)
         SELECT $1::oid AS tasks_relid, tn.id AS tenant_id, tn.deleted_at IS NOT NULL AS purged,
                0::bigint AS rows, 0::bigint AS active, NULL::timestamptz AS oldest_final, NULL::timestamptz AS newest_final,
                CASE WHEN tn.deleted_at IS NULL THEN retention_cutoff(now(), tn.shortest_retention_period) END AS cutoff,
                (SELECT coalesce(sum(q.rows), 0)::bigint FROM history_range_tenants q WHERE q.tasks_relid = $1) AS range_rows
         FROM tenants tn, b
         WHERE NOT {held}
           AND (tn.shortest_retention_period IS NOT NULL OR tn.deleted_at IS NOT NULL)
           AND (tn.deleted_at IS NULL AND retention_next_due(b.lower, tn.shortest_retention_period, NULL) <= now()
                AND EXISTS (SELECT 1 FROM {table} t WHERE t.tenant_id = tn.id AND t.status IN {FINAL}
                               AND coalesce(t.finished_at, t.inserted_at) < retention_cutoff(now(), tn.shortest_retention_period)))
            OR (tn.deleted_at < now() - $3 AND NOT {held} AND EXISTS (SELECT 1 FROM {table} t WHERE t.tenant_id = tn.id))
         ORDER BY tn.id",
        table = range.tasks_name,
        held = tenant_held("tn.id", "now()"),
    ))
    .bind(range.tasks_relid)
    .bind(range.lower_text())
    .bind(super::interval(grace))
    .fetch_all(executor)
    .await
}

/// The longest finite window (of any final status) among live tenants (`None` when every live tenant keeps forever,
/// or there are none).
pub async fn longest_window(executor: impl PgExecutor<'_>) -> Result<Option<std::time::Duration>, sqlx::Error> {
    let seconds: Option<f64> = sqlx::query_scalar(
        "SELECT max(extract(epoch FROM w.period))::float8
         FROM tenants tn, LATERAL (VALUES (coalesce(tn.succeeded_retention_period, tn.data_retention_period)),
                                          (coalesce(tn.failed_retention_period, tn.data_retention_period)),
                                          (coalesce(tn.cancelled_retention_period, tn.data_retention_period))) AS w(period)
         WHERE tn.deleted_at IS NULL AND w.period < interval '1000 years'",
    )
    .fetch_one(executor)
    .await?;
    Ok(seconds.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))))
}

/// Per tenant with any: the pairs of a range (what a rewrite or an estimate needs).
pub async fn pairs_of(executor: impl PgExecutor<'_>, tasks_relid: Oid, grace: std::time::Duration) -> Result<Vec<Pair>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.tasks_relid, p.tenant_id, coalesce(tn.deleted_at < now() - $2, false) AS purged,
                p.rows, p.active, p.oldest_final, p.newest_final,
                CASE WHEN tn.deleted_at IS NULL AND retention_cutoff(now(), tn.shortest_retention_period) > '-infinity'
                     THEN retention_cutoff(now(), tn.shortest_retention_period) END AS cutoff,
                (SELECT coalesce(sum(q.rows), 0)::bigint FROM history_range_tenants q WHERE q.tasks_relid = $1) AS range_rows
         FROM history_range_tenants p LEFT JOIN tenants tn ON tn.id = p.tenant_id
         WHERE p.tasks_relid = $1 ORDER BY p.tenant_id",
    )
    .bind(tasks_relid)
    .bind(super::interval(grace))
    .fetch_all(executor)
    .await
}

impl Pair {
    /// Whether the facts say the pair holds a due task: any row of a purged tenant, or a final
    /// task finished before a live tenant's cutoff.
    pub fn is_due(&self) -> bool {
        if self.purged {
            return self.rows > 0;
        }
        matches!((self.cutoff, self.oldest_final), (Some(cutoff), Some(oldest)) if oldest < cutoff)
    }

    /// An estimate of the pair's due tasks: all of a purged tenant's; of a live tenant's final
    /// tasks, the share whose finish instants lie before the cutoff (assuming them spread evenly
    /// between the oldest and the newest).
    pub fn due_estimate(&self) -> f64 {
        if self.purged {
            return self.rows as f64;
        }
        let (Some(cutoff), Some(oldest), Some(newest)) = (self.cutoff, self.oldest_final, self.newest_final) else {
            return 0.0;
        };
        let finals = (self.rows - self.active).max(0) as f64;
        if cutoff <= oldest {
            0.0
        } else if cutoff > newest || newest == oldest {
            finals
        } else {
            let span = (newest - oldest).num_milliseconds() as f64;
            finals * ((cutoff - oldest).num_milliseconds() as f64 / span).clamp(0.0, 1.0)
        }
    }
}
