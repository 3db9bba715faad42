//! Facts per range and tenant (`history_range_tenants`): rows, active tasks, and per final status
//! the oldest and newest finish instants, and when the next task becomes due under the tenant's
//! windows. A run reads the pairs whose time has come instead of probing every range for every
//! tenant, so a steady-state run costs what changed and what is due.
//!
//! The facts stay exact because every write into a range is logged (`history_changes`, by a
//! trigger on each partition) except the engine's own (which update the facts themselves) and,
//! while a range is being filled (its change log is `live`: today, the days ahead), the inserts
//! and updates that almost all land there: such a range is probed instead of trusted
//! ([`super::Range::is_live`]), and once its end has passed by the engine's checked clock it is
//! switched to log every write ([`switch_to_all`]) and its facts are rebuilt from its rows
//! ([`rebuild_take`], [`rebuild_chunk`], [`rebuild_finish`]: block ranges, each a short
//! transaction, however large the range). The triggers never read a clock.

use chrono::{DateTime, Utc};
use sqlx::postgres::types::Oid;
use sqlx::{FromRow, PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use super::{LogMode, Range};
use crate::batch::{self, BatchLimits};
use crate::heap::BlockRange;
use crate::rule::{Rule, ACTIVE};
use crate::sql::{Fragment, Sql};
use crate::tenants::FinalStatus;

/// The per-status columns of the facts, in the order of [`FinalStatus::ALL`].
const OLDEST: [&str; 3] = ["oldest_succeeded", "oldest_failed", "oldest_cancelled"];
const NEWEST: [&str; 3] = ["newest_succeeded", "newest_failed", "newest_cancelled"];

/// `alias.oldest_succeeded, alias.oldest_failed, alias.oldest_cancelled`, for [`Rule::next_due`].
fn oldest_of(alias: &str) -> [String; 3] {
    OLDEST.map(|column| format!("{alias}.{column}"))
}

fn next_due(rule: &Rule, tn: &str, alias: &str) -> Fragment {
    let [a, b, c] = oldest_of(alias);
    rule.next_due(tn, [&a, &b, &c])
}

/// The ranges whose facts are to be rebuilt now (see [`Range::needs_settle`]), oldest first, a
/// rebuild in progress first of all.
pub async fn to_settle(
    executor: impl PgExecutor<'_>,
    now: DateTime<Utc>,
) -> Result<Vec<Range>, sqlx::Error> {
    let rows: Vec<super::RangeRow> = sqlx::query_as(&format!(
        "SELECT {} FROM history_ranges r
         LEFT JOIN history_range_rebuild_state b ON b.tasks_relid = r.tasks_relid
         WHERE r.rewrite_id IS NULL
           AND ((r.log_mode = 'live' AND r.upper <= $1) OR (r.log_mode = 'all' AND r.settled_at IS NULL) OR b.tasks_relid IS NOT NULL)
         ORDER BY b.tasks_relid IS NULL, r.lower",
        super::RANGE_COLUMNS
    ))
    .bind(now)
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(Range::from).collect())
}

/// Switches a live range to log every write: DDL on its two partitions, which waits up to
/// `lock_timeout` for the writers in flight there (so that every write it did not log has
/// committed once this returns). Returns false when the lock was not had in time (the range stays
/// live, probed, until a later run), or another runner has the range.
pub async fn switch_to_all(
    pool: &PgPool,
    range: &Range,
    limits: BatchLimits,
    lock_timeout: std::time::Duration,
) -> Result<bool, sqlx::Error> {
    let mut tx = batch::begin(pool, limits.with_lock_timeout(lock_timeout)).await?;
    let still: Option<String> = match sqlx::query_scalar!(
        "SELECT log_mode FROM history_ranges WHERE tasks_relid = $1 FOR UPDATE NOWAIT",
        range.tasks_relid
    )
    .fetch_optional(&mut *tx)
    .await
    {
        Ok(still) => still,
        Err(error) if batch::is_lock_not_had(&error) => return Ok(false),
        Err(error) => return Err(error),
    };
    if still.as_deref() != Some(LogMode::Live.as_str()) {
        tx.rollback().await?;
        return Ok(still.as_deref() == Some(LogMode::All.as_str()));
    }
    match super::ranges::set_log_mode(
        &mut tx,
        range.tasks_relid,
        range.events_relid,
        &range.lower_text(),
        LogMode::All,
    )
    .await
    {
        Ok(()) => {
            // Probed, not trusted, until the rebuild is done.
            sqlx::query!(
                "UPDATE history_ranges SET settled_at = NULL WHERE tasks_relid = $1",
                range.tasks_relid
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        }
        Err(error) if batch::is_lock_not_had(&error) => Ok(false),
        Err(error) => Err(error),
    }
}

/// Takes the rebuild of range `tasks_relid` for the caller's transaction, starting it if none is
/// in progress (consuming the range's logged changes: each was committed before the rebuild reads
/// any row, so the rebuild accounts for it). Returns the next page to read, or `None` when another
/// runner is rebuilding it.
pub async fn rebuild_take(
    conn: &mut PgConnection,
    tasks_relid: Oid,
) -> Result<Option<i64>, sqlx::Error> {
    let block: Option<i64> = sqlx::query_scalar!(
        "SELECT block FROM history_range_rebuild_state WHERE tasks_relid = $1 FOR UPDATE SKIP LOCKED",
        tasks_relid
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(block) = block {
        return Ok(Some(block));
    }
    let started: bool = sqlx::query_scalar!(
        r#"WITH new AS (INSERT INTO history_range_rebuild_state (tasks_relid, block) VALUES ($1, 0) ON CONFLICT DO NOTHING RETURNING 1)
         SELECT EXISTS (SELECT 1 FROM new) AS "started!""#,
        tasks_relid
    )
    .fetch_one(&mut *conn)
    .await?;
    if !started {
        return Ok(None);
    }
    sqlx::query!(
        "DELETE FROM history_changes c USING history_ranges r
         WHERE r.tasks_relid = $1 AND c.relid IN (r.tasks_relid, r.events_relid)",
        tasks_relid
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "DELETE FROM history_range_rebuilds WHERE tasks_relid = $1",
        tasks_relid
    )
    .execute(&mut *conn)
    .await?;
    Ok(Some(0))
}

/// Reads up to `pages` pages of the range's tasks partition from `block` (its rebuild's place,
/// taken by [`rebuild_take`]) and adds them up per tenant; returns the pages read (0: every page
/// has been, [`rebuild_finish`] is next). Writers go on meanwhile: a row an update moves ahead of
/// the walk may count twice (its rows are an estimate; its instants stay bounds), one it moves
/// behind is missed; either way the update is logged, and its pair probed again once the rebuild
/// is done. In the caller's transaction.
pub async fn rebuild_chunk(
    conn: &mut PgConnection,
    tasks_relid: Oid,
    block: i64,
    pages: u32,
) -> Result<u32, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT $1::oid::regclass::text AS "table!",
                  pg_relation_size($1::oid::regclass) / current_setting('block_size')::bigint AS "total!""#,
        tasks_relid
    )
    .fetch_one(&mut *conn)
    .await?;
    let (table, total) = (row.table, row.total);
    if block >= total {
        return Ok(0);
    }
    let start = u32::try_from(block).unwrap_or(u32::MAX);
    let end = u32::try_from((block + i64::from(pages.max(1))).min(total)).unwrap_or(u32::MAX);
    let blocks = BlockRange { start, end };
    let (from, to) = blocks.tids();
    let per_status = |f: &str, list: [&str; 3]| {
        FinalStatus::ALL
            .iter()
            .zip(list)
            .map(|(status, column)| format!("{f}(coalesce(t.finished_at, t.inserted_at)) FILTER (WHERE t.status = '{}') AS {column}", status.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let merged = OLDEST
        .iter()
        .map(|c| format!("{c} = least(r.{c}, excluded.{c})"))
        .chain(
            NEWEST
                .iter()
                .map(|c| format!("{c} = greatest(r.{c}, excluded.{c})")),
        )
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = Sql::new(
        "INSERT INTO history_range_rebuilds AS r (tasks_relid, tenant_id, rows, active, {columns})
         SELECT {relid}, t.tenant_id, count(*), count(*) FILTER (WHERE t.status IN {active}), {oldest}, {newest}
         FROM {table} t WHERE t.ctid >= {from}::tid AND t.ctid < {to}::tid
         GROUP BY t.tenant_id
         ON CONFLICT (tasks_relid, tenant_id) DO UPDATE
         SET rows = r.rows + excluded.rows, active = r.active + excluded.active, {merged}",
    );
    sql.raw("columns", fact_names())
        .bind("relid", tasks_relid)
        .raw("active", ACTIVE)
        .raw("oldest", per_status("min", OLDEST))
        .raw("newest", per_status("max", NEWEST))
        .raw("table", table)
        .bind("from", from)
        .bind("to", to)
        .raw("merged", merged);
    sql.build().execute(&mut *conn).await?;
    sqlx::query!(
        "UPDATE history_range_rebuild_state SET block = $2 WHERE tasks_relid = $1",
        tasks_relid,
        i64::from(end)
    )
    .execute(&mut *conn)
    .await?;
    Ok(blocks.pages())
}

/// Replaces the range's facts by what its rebuild gathered, and marks it settled at `rule`'s now.
/// In the caller's transaction, which holds the rebuild ([`rebuild_take`]). Returns the range's
/// rows.
pub async fn rebuild_finish(
    conn: &mut PgConnection,
    tasks_relid: Oid,
    rule: &Rule,
) -> Result<i64, sqlx::Error> {
    sqlx::query!(
        "DELETE FROM history_range_tenants WHERE tasks_relid = $1",
        tasks_relid
    )
    .execute(&mut *conn)
    .await?;
    let columns = fact_names();
    let mut sql = Sql::new(
        "WITH ins AS (
             INSERT INTO history_range_tenants (tasks_relid, tenant_id, rows, active, {columns}, next_due_at)
             SELECT s.tasks_relid, s.tenant_id, s.rows, s.active, {s_columns}, {next_due}
             FROM history_range_rebuilds s LEFT JOIN tenants tn ON tn.id = s.tenant_id
             WHERE s.tasks_relid = {relid}
             RETURNING rows
         )
         SELECT coalesce(sum(rows), 0)::bigint FROM ins",
    );
    sql.raw("columns", columns.clone())
        .raw(
            "s_columns",
            columns
                .split(", ")
                .map(|c| format!("s.{c}"))
                .collect::<Vec<_>>()
                .join(", "),
        )
        .with("next_due", next_due(rule, "tn", "s"))
        .bind("relid", tasks_relid);
    let rows: i64 = sql.build_query_scalar().fetch_one(&mut *conn).await?;
    sqlx::query!(
        "DELETE FROM history_range_rebuilds WHERE tasks_relid = $1",
        tasks_relid
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "DELETE FROM history_range_rebuild_state WHERE tasks_relid = $1",
        tasks_relid
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "UPDATE history_ranges SET rows = $2, settled_at = $3 WHERE tasks_relid = $1",
        tasks_relid,
        rows,
        rule.now
    )
    .execute(&mut *conn)
    .await?;
    Ok(rows)
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

/// Log entries a refresh consumes per transaction at most.
const REFRESH_PASS: i64 = 5_000;

/// Applies the logged changes to the facts: a tenant whose rules changed gets every pair's next
/// due instant recomputed; a pair whose rows changed is probed again. Entries of ranges being
/// rewritten or rebuilt, or locked by a layout change, are left (a rewrite replays its sources'
/// entries into the new range; a rebuild's are applied after it). In passes of at most
/// [`REFRESH_PASS`] entries, each one transaction, until a pass finds fewer.
pub async fn refresh(
    pool: &PgPool,
    limits: BatchLimits,
    rule: &Rule,
) -> Result<Refreshed, sqlx::Error> {
    let mut refreshed = Refreshed::default();
    loop {
        // Which kinds of entries wait: in a steady state, a few of some ranges' rows and no
        // tenant's rule change (each statement below skipped when it has nothing to consume).
        let pending = sqlx::query!(
            r#"SELECT EXISTS (SELECT 1 FROM history_changes WHERE relid = 0) AS "tenants!",
                      EXISTS (SELECT 1 FROM history_changes WHERE relid > 0) AS "ranges!""#
        )
        .fetch_one(pool)
        .await?;
        let (tenants_pending, ranges_pending) = (pending.tenants, pending.ranges);
        if !tenants_pending && !ranges_pending {
            return Ok(refreshed);
        }
        let mut tx = batch::begin(pool, bookkeeping(limits)).await?;
        let (tenant_entries, tenants) = if tenants_pending {
            refresh_tenants(&mut tx, rule).await?
        } else {
            (0, Vec::new())
        };
        let (entries, pairs) = if ranges_pending {
            refresh_ranges(&mut tx, rule).await?
        } else {
            (0, Vec::new())
        };
        tx.commit().await?;
        refreshed.tenants += tenants.len() as u64;
        refreshed.pairs += pairs.len() as u64;
        if tenant_entries < REFRESH_PASS && entries < REFRESH_PASS {
            return Ok(refreshed);
        }
    }
}

/// Consumes up to [`REFRESH_PASS`] logged rule changes of tenants: each changed tenant's pairs
/// get their next due instant again. Returns the entries consumed and the tenants.
async fn refresh_tenants(
    tx: &mut PgConnection,
    rule: &Rule,
) -> Result<(i64, Vec<Uuid>), sqlx::Error> {
    let mut sql = Sql::new(
        "WITH gone AS (DELETE FROM history_changes WHERE id = ANY (ARRAY (
                               SELECT id FROM history_changes WHERE relid = 0 LIMIT {limit}))
                           RETURNING tenant_id),
                  changed AS (SELECT DISTINCT tenant_id FROM gone),
                  updated AS (
                      UPDATE history_range_tenants p
                      SET next_due_at = {next_due}
                      FROM changed c LEFT JOIN tenants tn ON tn.id = c.tenant_id
                      WHERE p.tenant_id = c.tenant_id
                      RETURNING 1)
             SELECT (SELECT count(*) FROM gone), ARRAY (SELECT tenant_id FROM changed)",
    );
    sql.bind("limit", REFRESH_PASS)
        .with("next_due", next_due(rule, "tn", "p"));
    sql.build_query_as().fetch_one(&mut *tx).await
}

/// Consumes up to [`REFRESH_PASS`] logged row changes, oldest first, of ranges not being
/// rewritten, rebuilt or changed by a layout change, and probes their pairs again. Returns the
/// entries consumed and the `(range, tenant, tasks added)` pairs.
async fn refresh_ranges(
    tx: &mut PgConnection,
    rule: &Rule,
) -> Result<(i64, Vec<(Oid, Uuid, i64)>), sqlx::Error> {
    let changed: Vec<(Oid, Uuid, i64, i64)> = sqlx::query!(
            r#"WITH r AS (SELECT tasks_relid, events_relid FROM history_ranges h
                        WHERE rewrite_id IS NULL AND NOT EXISTS (SELECT 1 FROM history_range_rebuild_state b WHERE b.tasks_relid = h.tasks_relid)
                        FOR KEY SHARE SKIP LOCKED),
                  -- Oldest first: a pair first seen in a pass is created from a probe of its
                  -- rows as they are now, which the deltas of its later entries then add to; in
                  -- id order those are the rows written after the entries applied (out of order,
                  -- a task's insert applied after its event's counted the task twice).
                  taken AS (
                      SELECT c.id FROM history_changes c
                      WHERE c.relid = ANY (ARRAY (SELECT tasks_relid FROM r UNION ALL SELECT events_relid FROM r))
                      ORDER BY c.id LIMIT $1),
                  deleted AS (
                      DELETE FROM history_changes c WHERE c.id = ANY (ARRAY (SELECT id FROM taken))
                      RETURNING c.relid, c.op, c.tenant_id),
                  gone AS (
                      SELECT r.tasks_relid, d.relid = r.tasks_relid AS task_change, d.op, d.tenant_id
                      FROM deleted d JOIN r ON d.relid IN (r.tasks_relid, r.events_relid))
             SELECT tasks_relid AS "tasks_relid!", tenant_id AS "tenant_id!",
                    sum(CASE WHEN task_change THEN CASE op WHEN 'I' THEN 1 WHEN 'D' THEN -1 ELSE 0 END ELSE 0 END)::bigint AS "delta!",
                    count(*) AS "entries!"
             FROM gone GROUP BY tasks_relid, tenant_id"#,
            REFRESH_PASS
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|row| (row.tasks_relid, row.tenant_id, row.delta, row.entries))
        .collect();
    let entries: i64 = changed.iter().map(|c| c.3).sum();
    let pairs: Vec<(Oid, Uuid, i64)> = changed
        .into_iter()
        .map(|(relid, tenant, delta, _)| (relid, tenant, delta))
        .collect();
    resummarise(&mut *tx, &pairs, rule).await?;
    Ok((entries, pairs))
}

/// Probes each `(range, tenant, rows added)` pair again: its active tasks, and per final status
/// its oldest and newest (index probes of the range's partition), its rows adjusted by `rows
/// added`, and its next due instant. A pair left with no rows is removed; pairs of ranges that
/// are gone are skipped. One statement per range.
pub async fn resummarise(
    conn: &mut PgConnection,
    pairs: &[(Oid, Uuid, i64)],
    rule: &Rule,
) -> Result<(), sqlx::Error> {
    let mut relids: Vec<Oid> = pairs.iter().map(|p| p.0).collect();
    relids.sort_by_key(|oid| oid.0);
    relids.dedup();
    let tables: Vec<(Oid, String)> = sqlx::query!(
        r#"SELECT tasks_relid, tasks_relid::regclass::text AS "table!" FROM history_ranges WHERE tasks_relid = ANY($1)"#,
        &relids
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|row| (row.tasks_relid, row.table))
    .collect();
    for (relid, table) in tables {
        let (tenants, deltas): (Vec<Uuid>, Vec<i64>) = pairs
            .iter()
            .filter(|p| p.0 == relid)
            .map(|p| (p.1, p.2))
            .unzip();
        // One index probe each, along (tenant, status, finish instant).
        let probes = FinalStatus::ALL
            .iter()
            .flat_map(|status| {
                let s = status.as_str();
                [
                    format!(
                        "(SELECT min(coalesce(t.finished_at, t.inserted_at)) FROM {table} t
                          WHERE t.tenant_id = c.tenant_id AND t.status = '{s}') AS oldest_{s}"
                    ),
                    format!(
                        "(SELECT max(coalesce(t.finished_at, t.inserted_at)) FROM {table} t
                          WHERE t.tenant_id = c.tenant_id AND t.status = '{s}') AS newest_{s}"
                    ),
                ]
            })
            .collect::<Vec<_>>()
            .join(",\n");
        let any_final = OLDEST
            .iter()
            .map(|c| format!("CASE WHEN x.{c} IS NULL THEN 0 ELSE 1 END"))
            .collect::<Vec<_>>()
            .join(" + ");
        let set = OLDEST
            .iter()
            .chain(NEWEST.iter())
            .map(|c| format!("{c} = kept.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let columns = fact_names();
        let kept_columns = OLDEST
            .iter()
            .chain(NEWEST.iter())
            .map(|c| format!("kept.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut sql = Sql::new(
            "WITH c AS (SELECT * FROM unnest({tenants}::uuid[], {deltas}::int8[]) AS c(tenant_id, delta)),
             probed AS (
                 SELECT {relid}::oid AS relid, c.tenant_id, c.delta, x.*, x.active + {any_final} AS least_rows
                 FROM c CROSS JOIN LATERAL (SELECT
                        (SELECT count(*) FROM {table} t WHERE t.tenant_id = c.tenant_id AND t.status IN {active}) AS active,
                        {probes}) x
                 WHERE EXISTS (SELECT 1 FROM history_ranges WHERE tasks_relid = {relid2})
             ), emptied AS (
                 DELETE FROM history_range_tenants p USING probed
                 WHERE p.tasks_relid = probed.relid AND p.tenant_id = probed.tenant_id AND probed.least_rows = 0
             ), kept AS (
                 SELECT probed.*, {next_due} AS next_due
                 FROM probed LEFT JOIN tenants tn ON tn.id = probed.tenant_id
                 WHERE probed.least_rows > 0
             ), updated AS (
                 UPDATE history_range_tenants p
                 SET rows = greatest(p.rows + kept.delta, kept.least_rows), active = kept.active, {set}, next_due_at = kept.next_due
                 FROM kept WHERE p.tasks_relid = kept.relid AND p.tenant_id = kept.tenant_id
                 RETURNING p.tasks_relid, p.tenant_id
             )
             INSERT INTO history_range_tenants (tasks_relid, tenant_id, rows, active, {columns}, next_due_at)
             SELECT kept.relid, kept.tenant_id, greatest(kept.delta, kept.least_rows), kept.active, {kept_columns}, kept.next_due
             FROM kept
             WHERE NOT EXISTS (SELECT 1 FROM updated u WHERE u.tasks_relid = kept.relid AND u.tenant_id = kept.tenant_id)
             ON CONFLICT (tasks_relid, tenant_id) DO NOTHING",
        );
        sql.bind("tenants", tenants)
            .bind("deltas", deltas)
            .bind("relid", relid)
            .bind("relid2", relid)
            .raw("any_final", any_final)
            .raw("table", table)
            .raw("active", ACTIVE)
            .raw("probes", probes)
            .raw("set", set)
            .raw("columns", columns)
            .raw("kept_columns", kept_columns)
            .with("next_due", next_due(rule, "tn", "probed"));
        let result = sql.build().execute(&mut *conn).await;
        match result {
            Ok(_) => {}
            // The range was dropped since it was looked up: its pairs went with it.
            Err(error) if super::deletes::is_undefined_table(&error) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// What the facts say of one final status in a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusFacts {
    /// The oldest and newest finish instant (else insertion) of the pair's tasks in this status
    /// (`None`: none, or not known, for a pair a probe found).
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
    /// Before when a task in this status is due now under the tenant's window (`None`: kept
    /// forever, or the tenant is deleted).
    pub cutoff: Option<DateTime<Utc>>,
}

/// One (range, tenant) pair: what the facts say, or what a probe of a live range found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub tasks_relid: Oid,
    pub tenant_id: Uuid,
    /// The tenant was deleted longer ago than the grace: every row of it is due.
    pub purged: bool,
    pub rows: i64,
    pub active: i64,
    /// Per final status, in the order of [`FinalStatus::ALL`].
    pub statuses: [StatusFacts; 3],
    /// Tasks in the whole range, as its pairs count them.
    pub range_rows: i64,
    /// Found by a probe of a live range: the facts are not known.
    pub probed: bool,
}

#[derive(FromRow)]
struct PairRow {
    tasks_relid: Oid,
    tenant_id: Uuid,
    purged: bool,
    rows: i64,
    active: i64,
    oldest_succeeded: Option<DateTime<Utc>>,
    newest_succeeded: Option<DateTime<Utc>>,
    oldest_failed: Option<DateTime<Utc>>,
    newest_failed: Option<DateTime<Utc>>,
    oldest_cancelled: Option<DateTime<Utc>>,
    newest_cancelled: Option<DateTime<Utc>>,
    cutoff_succeeded: Option<DateTime<Utc>>,
    cutoff_failed: Option<DateTime<Utc>>,
    cutoff_cancelled: Option<DateTime<Utc>>,
    range_rows: i64,
    probed: bool,
}

impl From<PairRow> for Pair {
    fn from(row: PairRow) -> Self {
        let status = |oldest, newest, cutoff| StatusFacts {
            oldest,
            newest,
            cutoff,
        };
        Pair {
            tasks_relid: row.tasks_relid,
            tenant_id: row.tenant_id,
            purged: row.purged,
            rows: row.rows,
            active: row.active,
            statuses: [
                status(
                    row.oldest_succeeded,
                    row.newest_succeeded,
                    row.cutoff_succeeded,
                ),
                status(row.oldest_failed, row.newest_failed, row.cutoff_failed),
                status(
                    row.oldest_cancelled,
                    row.newest_cancelled,
                    row.cutoff_cancelled,
                ),
            ],
            range_rows: row.range_rows,
            probed: row.probed,
        }
    }
}

/// The columns `cutoff_succeeded, cutoff_failed, cutoff_cancelled` of tenant `tn` at `rule`'s now
/// (NULL: kept forever, or the tenant is deleted).
fn cutoff_columns(rule: &Rule, tn: &str) -> Fragment {
    let mut columns = Fragment::default();
    for (i, status) in FinalStatus::ALL.into_iter().enumerate() {
        if i > 0 {
            columns = columns.push(", ");
        }
        columns = columns
            .push(format!(
                "CASE WHEN {tn}.id IS NOT NULL AND {tn}.deleted_at IS NULL AND "
            ))
            .then(rule.status_cutoff(status, tn))
            .push(" > '-infinity' THEN ")
            .then(rule.status_cutoff(status, tn))
            .push(format!(" END AS cutoff_{}", status.as_str()));
    }
    columns
}

/// The facts' per-status columns of pair alias `p`.
fn fact_columns(p: &str) -> String {
    OLDEST
        .iter()
        .zip(NEWEST)
        .map(|(o, n)| format!("{p}.{o}, {p}.{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pairs with something due now: those whose next due instant has come, and every pair of a
/// tenant deleted longer ago than the grace. Each part starts from its index (`next_due_at`, the
/// deleted tenants), so the cost is the pairs found, not all pairs. Ranges that are live are not
/// trusted: see [`probe`].
pub async fn due_pairs(
    executor: impl PgExecutor<'_>,
    rule: &Rule,
) -> Result<Vec<Pair>, sqlx::Error> {
    let mut sql = Sql::new(
        "SELECT p.tasks_relid, p.tenant_id, coalesce({purged}, false) AS purged,
                p.rows, p.active, {facts}, {cutoffs},
                (SELECT coalesce(sum(q.rows), 0)::bigint FROM history_range_tenants q WHERE q.tasks_relid = p.tasks_relid) AS range_rows,
                false AS probed
         FROM history_range_tenants p LEFT JOIN tenants tn ON tn.id = p.tenant_id
         WHERE p.next_due_at <= {now2} AND NOT {held}
         UNION
         SELECT p.tasks_relid, p.tenant_id, true AS purged, p.rows, p.active, {facts2}, {cutoffs2},
                (SELECT coalesce(sum(q.rows), 0)::bigint FROM history_range_tenants q WHERE q.tasks_relid = p.tasks_relid) AS range_rows,
                false AS probed
         -- From the tenants deleted past their grace (usually none) to their pairs: a generic
         -- plan, guessing a third of the tenants, would hash them against every pair (OFFSET 0
         -- keeps the lateral from being flattened into that join).
         FROM tenants tn CROSS JOIN LATERAL (SELECT * FROM history_range_tenants q WHERE q.tenant_id = tn.id OFFSET 0) p
         WHERE {purged2} AND NOT {held2}
         ORDER BY 1, 2",
    );
    sql.with("purged", rule.tenant_purged("tn"))
        .bind("now2", rule.now)
        .with("purged2", rule.tenant_purged("tn"))
        .raw("facts", fact_columns("p"))
        .raw("facts2", fact_columns("p"))
        .with("cutoffs", cutoff_columns(rule, "tn"))
        .with("cutoffs2", cutoff_columns(rule, "tn"))
        .with("held", rule.tenant_held("p.tenant_id"))
        .with("held2", rule.tenant_held("p.tenant_id"));
    let rows: Vec<PairRow> = sql.build_query_as().fetch_all(executor).await?;
    Ok(rows.into_iter().map(Pair::from).collect())
}

/// Which tenants of a range [`probe`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeScope {
    /// Every tenant: the range's facts may miss any write (a live range).
    AllTenants,
    /// The tenants with logged changes of the range not yet applied to its facts: the only pairs
    /// whose facts may be behind their rows (see [`with_pending_changes`]).
    PendingChanges,
}

/// The ranges whose change log holds task writes not yet applied to their facts, as the
/// caller's snapshot sees it. Another runner applies the log in passes of their own
/// transactions; a plan that read the facts between two passes, trusting them, missed the rows
/// of the entries still waiting (the last days written, about 1 run in 10 of `history_races`).
/// Entries and the facts they change are committed together, so in one snapshot the facts plus
/// these ranges' probes are the whole truth. One index probe per range.
pub async fn with_pending_changes(executor: impl PgExecutor<'_>) -> Result<Vec<Oid>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT h.tasks_relid FROM history_ranges h
         WHERE EXISTS (SELECT 1 FROM history_changes c WHERE c.relid = h.tasks_relid)
         ORDER BY h.lower NULLS FIRST",
    )
    .fetch_all(executor)
    .await
}

/// The tenants with something due in `range` now, found by probing its partition: tenants
/// deleted longer ago than the grace with a row there, and live tenants with a final task there
/// due under its status's window (one index probe per status, for the tenants whose shortest
/// window is shorter than the range's age). `scope` says which tenants are looked at.
pub async fn probe(
    executor: impl PgExecutor<'_>,
    range: &Range,
    rule: &Rule,
    scope: ProbeScope,
) -> Result<Vec<Pair>, sqlx::Error> {
    let mut due_by_status = Fragment::default();
    for (i, status) in FinalStatus::ALL.into_iter().enumerate() {
        if i > 0 {
            due_by_status = due_by_status.push(" OR ");
        }
        due_by_status = due_by_status
            .push(format!(
                "EXISTS (SELECT 1 FROM {table} t WHERE t.tenant_id = tn.id AND t.status = '{s}' AND coalesce(t.finished_at, t.inserted_at) < ",
                table = range.tasks_name,
                s = status.as_str()
            ))
            .then(rule.status_cutoff(status, "tn"))
            .push(")");
    }
    let mut sql = Sql::new(
        "WITH b AS MATERIALIZED (SELECT {lower}::timestamptz AS lower)
         SELECT {relid}::oid AS tasks_relid, tn.id AS tenant_id, tn.deleted_at IS NOT NULL AS purged,
                0::bigint AS rows, 0::bigint AS active,
                NULL::timestamptz AS oldest_succeeded, NULL::timestamptz AS newest_succeeded,
                NULL::timestamptz AS oldest_failed, NULL::timestamptz AS newest_failed,
                NULL::timestamptz AS oldest_cancelled, NULL::timestamptz AS newest_cancelled,
                {cutoffs},
                (SELECT coalesce(sum(q.rows), 0)::bigint FROM history_range_tenants q WHERE q.tasks_relid = {relid2}) AS range_rows,
                true AS probed
         FROM tenants tn, b
         WHERE NOT {held} {scope}
           AND (tn.shortest_retention_period IS NOT NULL OR tn.deleted_at IS NOT NULL)
           AND ((tn.deleted_at IS NULL AND b.lower <= {shortest} AND ({due_by_status}))
                OR ({purged} AND EXISTS (SELECT 1 FROM {table} t WHERE t.tenant_id = tn.id)))
         ORDER BY tn.id",
    );
    sql.bind("lower", range.lower_text())
        .bind("relid", range.tasks_relid)
        .bind("relid2", range.tasks_relid)
        .with("cutoffs", cutoff_columns(rule, "tn"))
        .with("held", rule.tenant_held("tn.id"))
        .with("shortest", rule.shortest_cutoff("tn"))
        .with("due_by_status", due_by_status)
        .raw("table", range.tasks_name.clone())
        .with("purged", rule.tenant_purged("tn"))
        .with(
            "scope",
            match scope {
                ProbeScope::AllTenants => Fragment::default(),
                ProbeScope::PendingChanges => Fragment::default()
                    .push(
                        "AND tn.id IN (SELECT c.tenant_id FROM history_changes c WHERE c.relid = ",
                    )
                    .bind(range.tasks_relid)
                    .push(")"),
            },
        );
    let rows: Vec<PairRow> = sql.build_query_as().fetch_all(executor).await?;
    Ok(rows.into_iter().map(Pair::from).collect())
}

/// The latest `lower` of a live range that [`probe`] may find something due in now: the latest
/// cutoff of any live tenant's shortest window (a range starting after it holds no task due by
/// retention), or every range while a tenant deleted longer ago than the grace exists. `None`:
/// no range needs probing. One read of `tenants`, so that a steady state's live ranges (today,
/// the days ahead) cost nothing when no window is shorter than their age.
pub async fn probe_bound(
    executor: impl PgExecutor<'_>,
    rule: &Rule,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let mut sql = Sql::new(
        "SELECT EXISTS (SELECT 1 FROM tenants tp WHERE {purged}),
                (SELECT nullif(max({shortest}), '-infinity') FROM tenants tn WHERE tn.deleted_at IS NULL)",
    );
    sql.with("purged", rule.tenant_purged("tp"))
        .with("shortest", rule.shortest_cutoff("tn"));
    let (purged, bound): (bool, Option<DateTime<Utc>>) =
        sql.build_query_as().fetch_one(executor).await?;
    Ok(if purged {
        Some(DateTime::<Utc>::MAX_UTC)
    } else {
        bound
    })
}

/// The longest finite window (of any final status) among live tenants (`None` when every live tenant keeps forever,
/// or there are none).
pub async fn longest_window(
    executor: impl PgExecutor<'_>,
) -> Result<Option<std::time::Duration>, sqlx::Error> {
    let seconds: Option<f64> = sqlx::query_scalar!(
        // Three aggregates over one read of the tenants (a lateral of three rows per tenant took
        // 4x as long: 2.3 ms against 0.5 for 1,000 tenants).
        "SELECT extract(epoch FROM greatest(
                    max(s) FILTER (WHERE s < interval '1000 years'),
                    max(f) FILTER (WHERE f < interval '1000 years'),
                    max(c) FILTER (WHERE c < interval '1000 years')))::float8
         FROM tenants tn,
              LATERAL (SELECT coalesce(tn.succeeded_retention_period, tn.data_retention_period) AS s,
                              coalesce(tn.failed_retention_period, tn.data_retention_period) AS f,
                              coalesce(tn.cancelled_retention_period, tn.data_retention_period) AS c) w
         WHERE tn.deleted_at IS NULL",
    )
    .fetch_one(executor)
    .await?;
    Ok(seconds.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))))
}

/// Per tenant with any: the pairs of a range (what a rewrite or an estimate needs).
pub async fn pairs_of(
    executor: impl PgExecutor<'_>,
    tasks_relid: Oid,
    rule: &Rule,
) -> Result<Vec<Pair>, sqlx::Error> {
    let mut sql = Sql::new(
        "SELECT p.tasks_relid, p.tenant_id, coalesce({purged}, false) AS purged,
                p.rows, p.active, {facts}, {cutoffs},
                (SELECT coalesce(sum(q.rows), 0)::bigint FROM history_range_tenants q WHERE q.tasks_relid = {relid}) AS range_rows,
                false AS probed
         FROM history_range_tenants p LEFT JOIN tenants tn ON tn.id = p.tenant_id
         WHERE p.tasks_relid = {relid2} ORDER BY p.tenant_id",
    );
    sql.with("purged", rule.tenant_purged("tn"))
        .raw("facts", fact_columns("p"))
        .with("cutoffs", cutoff_columns(rule, "tn"))
        .bind("relid", tasks_relid)
        .bind("relid2", tasks_relid);
    let rows: Vec<PairRow> = sql.build_query_as().fetch_all(executor).await?;
    Ok(rows.into_iter().map(Pair::from).collect())
}

impl Pair {
    /// Whether the facts say the pair holds a due task: any row of a purged tenant, or a final
    /// task of some status finished before that status's cutoff.
    pub fn is_due(&self) -> bool {
        if self.purged {
            return self.rows > 0;
        }
        self.statuses.iter().any(
            |s| matches!((s.cutoff, s.oldest), (Some(cutoff), Some(oldest)) if oldest < cutoff),
        )
    }

    /// The statuses whose tasks a walk of the pair looks at: those the facts say hold a due task,
    /// or, for a pair a probe found (no facts), every status with a finite window.
    pub fn statuses_to_walk(&self) -> Vec<FinalStatus> {
        let may_be_due = |s: &StatusFacts| match (s.cutoff, s.oldest) {
            (Some(cutoff), Some(oldest)) => oldest < cutoff,
            (Some(_), None) => self.probed,
            (None, _) => false,
        };
        FinalStatus::ALL
            .into_iter()
            .zip(self.statuses)
            .filter(|(_, s)| may_be_due(s))
            .map(|(status, _)| status)
            .collect()
    }

    /// An estimate of the pair's due tasks: all of a purged tenant's; of a live tenant's final
    /// tasks, for each status, the share whose finish instants lie before that status's cutoff
    /// (assuming them spread evenly between the oldest and the newest), the statuses taken to hold
    /// equal shares of the final tasks.
    pub fn due_estimate(&self) -> f64 {
        if self.purged {
            return self.rows as f64;
        }
        let present: Vec<&StatusFacts> = self
            .statuses
            .iter()
            .filter(|s| s.oldest.is_some())
            .collect();
        if present.is_empty() {
            return 0.0;
        }
        let finals = (self.rows - self.active).max(0) as f64;
        let share = finals / present.len() as f64;
        present
            .iter()
            .map(|s| {
                let (Some(cutoff), Some(oldest), Some(newest)) = (s.cutoff, s.oldest, s.newest)
                else {
                    return 0.0;
                };
                if cutoff <= oldest {
                    0.0
                } else if cutoff > newest || newest == oldest {
                    share
                } else {
                    let span = (newest - oldest).num_milliseconds() as f64;
                    share * ((cutoff - oldest).num_milliseconds() as f64 / span).clamp(0.0, 1.0)
                }
            })
            .sum()
    }
}

/// The per-status fact columns (oldest, then newest), as an SQL list.
fn fact_names() -> String {
    OLDEST
        .iter()
        .chain(NEWEST.iter())
        .copied()
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, day, 0, 0, 0).unwrap()
    }

    fn pair(statuses: [StatusFacts; 3]) -> Pair {
        Pair {
            tasks_relid: Oid(1),
            tenant_id: Uuid::nil(),
            purged: false,
            rows: 100,
            active: 0,
            statuses,
            range_rows: 100,
            probed: false,
        }
    }

    #[test]
    fn a_status_kept_longer_makes_nothing_due_and_nothing_walked() {
        // Succeeded kept 7 days (cutoff the 23rd), failed 90 days (cutoff in August): only failed
        // tasks, from the 15th to the 20th.
        let failed = StatusFacts {
            oldest: Some(at(15)),
            newest: Some(at(20)),
            cutoff: Some(at(1) - chrono::Duration::days(90)),
        };
        let none = StatusFacts {
            cutoff: Some(at(23)),
            ..Default::default()
        };
        let kept = pair([none, failed, none]);
        assert!(!kept.is_due());
        assert_eq!(kept.due_estimate(), 0.0);
        // Succeeded tasks from the 20th to the 26th as well: half of them are due.
        let succeeded = StatusFacts {
            oldest: Some(at(20)),
            newest: Some(at(26)),
            cutoff: Some(at(23)),
        };
        let some = pair([succeeded, failed, none]);
        assert!(some.is_due());
        assert_eq!(some.statuses_to_walk(), vec![FinalStatus::Succeeded]);
        assert_eq!(some.due_estimate(), 25.0);
    }

    #[test]
    fn a_probed_pair_walks_every_status_with_a_finite_window() {
        let unknown = |cutoff| StatusFacts {
            oldest: None,
            newest: None,
            cutoff,
        };
        let probed = Pair {
            probed: true,
            ..pair([unknown(Some(at(23))), unknown(None), unknown(Some(at(2)))])
        };
        assert_eq!(
            probed.statuses_to_walk(),
            vec![FinalStatus::Succeeded, FinalStatus::Cancelled]
        );
    }
}
