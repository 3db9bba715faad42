//! Replacing adjacent ranges by one covering the same instants and holding only their kept rows:
//! compaction (one range) and merging (several). The cost is a read of the sources and a copy of
//! what is kept; nothing due is written anywhere, and the sources are dropped whole.
//!
//! One transaction, so a crash at any point leaves the sources as they were:
//!
//! 1. Under the layout lock, lock the sources' `history_ranges` rows (row deletes and the change
//!    log's consumers step aside), check their bounds in the catalog.
//! 2. Create the new range's tables and copy the kept rows into them: tasks for which
//!    `retention_task_due` is false, their events, and orphan events younger than an hour. Writers
//!    go on meanwhile; what they change in the sources is logged by the sources' triggers.
//! 3. Lock the parents (ACCESS EXCLUSIVE, at most `lock_timeout` of waiting). If a tenant's rules
//!    changed since the copy (a hold, a longer window), give up: the next attempt copies afresh.
//!    Under that lock no statement waits for a row lock: every row it changes is the rewrite's
//!    own (locked beforehand) or new, so no session waiting for the parents can block it (no
//!    deadlock with readers or writers of `tasks`).
//!    Otherwise replay the logged changes (each changed task and event is copied again, or not,
//!    as the rule says now), DETACH the sources, ATTACH the new range, record the detached tables
//!    by OID. Only catalog changes and the replay happen under the lock.
//! 4. After the commit: drop the detached tables, delete the queue items whose task went with
//!    them.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::postgres::types::Oid;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::ranges::{self, take_layout_lock};
use super::{detached, due, held, interval, Range, RangeKind, ENGINE_WRITE, ORPHAN_AGE};
use crate::batch::{self, BatchLimits};
use crate::receipts::{self, RunReceipt};

/// What a rewrite did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub lower: DateTime<Utc>,
    pub upper: DateTime<Utc>,
    /// How many ranges were replaced (1: compaction).
    pub sources: usize,
    pub tasks_kept: i64,
    pub events_kept: i64,
    /// Tasks that went with the sources, per tenant: (tenant, tasks, oldest, newest finish instant).
    pub dropped: Vec<DroppedTasks>,
    pub events_dropped: i64,
    pub queue_items_deleted: i64,
    /// Rows of the sources read to find what is kept.
    pub rows_read: i64,
    /// How long the parents' ACCESS EXCLUSIVE lock was held.
    pub locked: Duration,
}

impl Rewritten {
    pub fn tasks_dropped(&self) -> i64 {
        self.dropped.iter().map(|d| d.tasks).sum()
    }
}

/// Tasks of one tenant that went with a rewrite.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DroppedTasks {
    pub tenant_id: Uuid,
    pub tasks: i64,
    /// Their events (the tenant's events in the sources less those in the new range).
    #[sqlx(default)]
    pub events: i64,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
}

/// Why a rewrite did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRewritten {
    /// Another runner is changing the layout or holds a source (or a source is gone): try later.
    Busy,
    /// The parents' lock could not be had within `lock_timeout`: try later.
    LockTimeout,
    /// A tenant's rules changed while the kept rows were copied: try again, copying afresh.
    RulesChanged,
}

impl NotRewritten {
    pub fn as_str(self) -> &'static str {
        match self {
            NotRewritten::Busy => "another runner holds the layout or a source range",
            NotRewritten::LockTimeout => "the history tables' lock could not be had in time",
            NotRewritten::RulesChanged => "a tenant's retention changed during the copy",
        }
    }
}

/// Replaces `sources` (adjacent ranges of finite bounds, oldest first) by one range holding their
/// kept rows. `limits` bound each statement (the copy is one statement per table) and, when
/// `wait` says so, the wait for another runner's layout change to end; `lock_timeout` bounds the
/// wait for the parents' lock. What went is added to `receipt`'s run, per tenant, right after the
/// swap commits.
pub async fn rewrite(
    pool: &PgPool,
    sources: &[Range],
    grace: Duration,
    limits: BatchLimits,
    lock_timeout: Duration,
    wait: bool,
    receipt: &RunReceipt,
) -> Result<Result<Rewritten, NotRewritten>, sqlx::Error> {
    let (Some(first), Some(last)) = (sources.first(), sources.last()) else {
        return Err(sqlx::Error::Protocol("a rewrite needs at least one source range".into()));
    };
    let contiguous = sources.windows(2).all(|w| w[0].upper.is_some() && w[0].upper == w[1].lower);
    let finite = sources.iter().all(|r| r.kind == RangeKind::Range && r.lower.is_some() && r.upper.is_some());
    if !contiguous || !finite {
        return Err(sqlx::Error::Protocol("a rewrite takes adjacent ranges of finite bounds".into()));
    }
    let (lower, upper) = (first.lower.unwrap(), last.upper.unwrap());
    let (lower_text, upper_text) = (lower.to_rfc3339(), upper.to_rfc3339());

    let mut conn = pool.acquire().await?;
    prepare_kept_keys(&mut conn).await?;
    let mut tx = batch::begin_on(&mut conn, limits).await?;
    sqlx::query(ENGINE_WRITE).execute(&mut *tx).await?;
    match take_layout_lock(&mut tx, wait).await {
        Ok(true) => {}
        Ok(false) => return Ok(Err(NotRewritten::Busy)),
        Err(error) if batch::is_lock_timeout(&error) => return Ok(Err(NotRewritten::Busy)),
        Err(error) => return Err(error),
    }
    let relids: Vec<Oid> = sources.iter().map(|r| r.tasks_relid).collect();
    let locked: Vec<Oid> = match sqlx::query_scalar("SELECT tasks_relid FROM history_ranges WHERE tasks_relid = ANY($1) FOR UPDATE NOWAIT")
        .bind(&relids)
        .fetch_all(&mut *tx)
        .await
    {
        Ok(locked) => locked,
        Err(error) if batch::is_lock_timeout(&error) => return Ok(Err(NotRewritten::Busy)),
        Err(error) => return Err(error),
    };
    if locked.len() != sources.len() {
        return Ok(Err(NotRewritten::Busy));
    }
    for source in sources {
        ranges::verify_bounds(&mut tx, source).await?;
    }

    // 2. The copy. Tables named for the range plus `_new`; renamed once the sources are detached.
    let (new_tasks, new_events) = ranges::create_tables(&mut tx, &lower_text, &upper_text, "_new").await?;
    let (new_tasks_name, new_events_name): (String, String) =
        sqlx::query_as("SELECT $1::regclass::text, $2::regclass::text").bind(new_tasks).bind(new_events).fetch_one(&mut *tx).await?;
    let (rules_version, tasks_kept, rows_read): (i64, i64, i64) = sqlx::query_as(&format!(
        "WITH version AS (SELECT version FROM retention_rules),
              src AS (SELECT t.*, {rule} AS due FROM tasks t LEFT JOIN tenants tn ON tn.id = t.tenant_id
                      WHERE t.inserted_at >= $1::timestamptz AND t.inserted_at < $2::timestamptz),
              ins AS (INSERT INTO {new_tasks_name} SELECT id, tenant_id, status, inserted_at, finished_at, payload
                      FROM src WHERE NOT due RETURNING id, inserted_at),
              keys AS (INSERT INTO pg_temp.history_rewrite_kept SELECT id, inserted_at FROM ins RETURNING 1)
         SELECT (SELECT version FROM version), (SELECT count(*) FROM keys), (SELECT count(*) FROM src)",
        rule = due("t", "tn", "now()", "$3"),
    ))
    .bind(&lower_text)
    .bind(&upper_text)
    .bind(interval(grace))
    .fetch_one(&mut *tx)
    .await?;
    let mut events_kept = sqlx::query(&format!(
        "INSERT INTO {new_events_name}
         SELECT e.* FROM task_events e JOIN {new_tasks_name} k ON k.id = e.task_id AND k.inserted_at = e.task_inserted_at
         WHERE e.task_inserted_at >= $1::timestamptz AND e.task_inserted_at < $2::timestamptz"
    ))
    .bind(&lower_text)
    .bind(&upper_text)
    .execute(&mut *tx)
    .await?
    .rows_affected() as i64;
    events_kept += sqlx::query(&format!(
        "INSERT INTO {new_events_name}
         SELECT e.* FROM task_events e
         WHERE e.task_inserted_at >= $1::timestamptz AND e.task_inserted_at < $2::timestamptz
           AND (e.created_at >= now() - $3 OR {held})
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)
           -- A task deleted since the tasks were copied: its events were copied with it above (the
           -- replay then removes both).
           AND NOT EXISTS (SELECT 1 FROM {new_tasks_name} k WHERE k.id = e.task_id AND k.inserted_at = e.task_inserted_at)",
        held = held("e.tenant_id", "e.task_id", "now()"),
    ))
    .bind(&lower_text)
    .bind(&upper_text)
    .bind(interval(ORPHAN_AGE.to_std().unwrap_or_default()))
    .execute(&mut *tx)
    .await?
    .rows_affected() as i64;
    for table in [&new_tasks_name, &new_events_name] {
        sqlx::query(&format!("ANALYZE {table}")).execute(&mut *tx).await?;
    }
    // Catch up with the writers before locking: replay what they changed during the copy, pass
    // after pass, until a pass finds little, so that the replay under the lock has only the
    // changes of the last (short) pass to apply.
    let mut caught_up = Replay { tasks_added: 0, events_added: 0, tenants: Vec::new() };
    for _ in 0..CATCH_UP_PASSES {
        let pass = replay_changes(&mut tx, sources, (&new_tasks_name, &new_events_name), (&lower_text, &upper_text), grace).await?;
        caught_up.absorb(pass.0);
        if pass.1 < CAUGHT_UP_BELOW {
            break;
        }
    }

    // 3. The swap, under the parents' lock.
    let source_tables: Vec<&str> = sources.iter().flat_map(|s| [s.tasks_name.as_str(), s.events_name.as_str()]).collect();
    match ranges::lock_parents(&mut tx, &source_tables, lock_timeout).await {
        Ok(_) => {}
        Err(error) if batch::is_lock_timeout(&error) => return Ok(Err(NotRewritten::LockTimeout)),
        Err(error) => return Err(error),
    }
    let lock_started = Instant::now();
    // A plain read: under the parents' lock nothing may wait for a row lock that a session waiting
    // for the parents could hold (that is a deadlock). A change committed after this read lands
    // during the swap, the batch in flight; the next run sees it.
    let version_now: i64 = sqlx::query_scalar("SELECT version FROM retention_rules").fetch_one(&mut *tx).await?;
    if version_now != rules_version {
        return Ok(Err(NotRewritten::RulesChanged));
    }
    let (mut replay, _) = replay_changes(&mut tx, sources, (&new_tasks_name, &new_events_name), (&lower_text, &upper_text), grace).await?;
    replay.absorb(caught_up);
    let tasks_kept = tasks_kept + replay.tasks_added;
    events_kept += replay.events_added;

    let mut detached_tables = Vec::new();
    for source in sources {
        for (parent, relid, name) in
            [("tasks", source.tasks_relid, &source.tasks_name), ("task_events", source.events_relid, &source.events_name)]
        {
            sqlx::query(&format!("ALTER TABLE {parent} DETACH PARTITION {name}")).execute(&mut *tx).await?;
            let renamed = format!("{}_detached_{}", name.trim_matches('"'), relid.0);
            sqlx::query(&format!("ALTER TABLE {name} RENAME TO {}", super::ident(&renamed))).execute(&mut *tx).await?;
            let (low, high) = (source.lower_text(), source.upper_text());
            detached::record(&mut tx, relid, &renamed, &low, &high).await?;
            detached_tables.push((relid, parent));
        }
    }
    for relid in [new_tasks, new_events] {
        let statement: String = sqlx::query_scalar(
            "SELECT format('ALTER TABLE %s RENAME TO %I', $1::regclass, regexp_replace(relname, '_new$', '')) FROM pg_class WHERE oid = $1",
        )
        .bind(relid)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(&statement).execute(&mut *tx).await?;
    }
    ranges::attach(&mut tx, new_tasks, new_events, &lower_text, &upper_text).await?;
    sqlx::query("DELETE FROM history_ranges WHERE tasks_relid = ANY($1)").bind(&relids).execute(&mut *tx).await?;
    // Not settled: until its facts are rebuilt (right after the commit, or by the next run's
    // settle after a crash) the new range is probed, never trusted.
    ranges::record(&mut tx, (new_tasks, new_events), &lower_text, &upper_text, "range", tasks_kept, false).await?;
    tx.commit().await?;
    let locked = lock_started.elapsed();
    let mut settle = batch::begin_on(&mut conn, limits).await?;
    let mine: Option<Oid> = sqlx::query_scalar("SELECT tasks_relid FROM history_ranges WHERE tasks_relid = $1 FOR UPDATE SKIP LOCKED")
        .bind(new_tasks)
        .fetch_optional(&mut *settle)
        .await?;
    if mine.is_some() {
        super::facts::rebuild(&mut settle, new_tasks).await?;
    }
    // The old ranges' facts (ignored since their ranges are gone: removed for tidiness).
    sqlx::query("DELETE FROM history_range_tenants WHERE tasks_relid = ANY($1)").bind(&relids).execute(&mut *settle).await?;
    settle.commit().await?;

    // 4. After the commit: what went (the detached sources against the kept keys), then the
    // tables themselves and the queue items of the tasks that went.
    let mut dropped: Vec<DroppedTasks> = Vec::new();
    let mut events_by_tenant: std::collections::BTreeMap<Uuid, i64> = Default::default();
    for (relid, parent) in &detached_tables {
        if *parent == "tasks" {
            let per_tenant: Vec<DroppedTasks> = sqlx::query_as(&format!(
                "SELECT s.tenant_id, count(*) AS tasks, min(coalesce(s.finished_at, s.inserted_at)) AS oldest,
                        max(coalesce(s.finished_at, s.inserted_at)) AS newest
                 FROM {} s
                 WHERE NOT EXISTS (SELECT 1 FROM pg_temp.history_rewrite_kept k WHERE k.id = s.id AND k.inserted_at = s.inserted_at)
                 GROUP BY s.tenant_id ORDER BY s.tenant_id",
                regclass(&mut conn, *relid).await?
            ))
            .fetch_all(&mut *conn)
            .await?;
            for d in per_tenant {
                match dropped.iter_mut().find(|x| x.tenant_id == d.tenant_id) {
                    Some(x) => {
                        x.tasks += d.tasks;
                        x.oldest = x.oldest.min(d.oldest).or(x.oldest).or(d.oldest);
                        x.newest = x.newest.max(d.newest);
                    }
                    None => dropped.push(d),
                }
            }
        } else {
            let counts: Vec<(Uuid, i64)> =
                sqlx::query_as(&format!("SELECT tenant_id, count(*) FROM {} GROUP BY tenant_id", regclass(&mut conn, *relid).await?))
                    .fetch_all(&mut *conn)
                    .await?;
            for (tenant, n) in counts {
                *events_by_tenant.entry(tenant).or_default() += n;
            }
        }
    }
    let kept_events: Vec<(Uuid, i64)> =
        sqlx::query_as(&format!("SELECT tenant_id, count(*) FROM {} GROUP BY tenant_id", regclass(&mut conn, new_events).await?))
            .fetch_all(&mut *conn)
            .await?;
    for (tenant, n) in kept_events {
        if let Some(total) = events_by_tenant.get_mut(&tenant) {
            *total -= n;
        }
    }
    for (tenant, events) in events_by_tenant.into_iter().filter(|(_, n)| *n > 0) {
        match dropped.iter_mut().find(|d| d.tenant_id == tenant) {
            Some(d) => d.events = events,
            None => dropped.push(DroppedTasks { tenant_id: tenant, tasks: 0, events, oldest: None, newest: None }),
        }
    }
    let events_dropped = dropped.iter().map(|d| d.events).sum();
    record_receipts(&mut conn, receipt, &dropped).await?;
    sqlx::query("TRUNCATE pg_temp.history_rewrite_kept").execute(&mut *conn).await?;
    drop(conn);
    detached::drop_recorded(pool, limits.lock_timeout).await?;
    let queue_items_deleted = delete_queue_items_of_gone_tasks(pool, &lower_text, &upper_text, limits).await?;
    Ok(Ok(Rewritten {
        lower,
        upper,
        sources: sources.len(),
        tasks_kept,
        events_kept,
        dropped,
        events_dropped,
        queue_items_deleted,
        rows_read,
        locked,
    }))
}

/// The session table of the task keys a rewrite kept: it outlives the rewrite's transaction, so
/// the detached sources can be compared with it after the commit, outside the lock.
async fn prepare_kept_keys(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('pg_temp.history_rewrite_kept') IS NOT NULL").fetch_one(&mut *conn).await?;
    if exists {
        sqlx::query("TRUNCATE pg_temp.history_rewrite_kept").execute(&mut *conn).await?;
    } else {
        sqlx::query("CREATE TEMPORARY TABLE history_rewrite_kept (id uuid NOT NULL, inserted_at timestamptz NOT NULL, PRIMARY KEY (id, inserted_at))")
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

async fn regclass(conn: &mut PgConnection, relid: Oid) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT $1::regclass::text").bind(relid).fetch_one(&mut *conn).await
}

/// A change-log entry: (partition, tenant, task id, task inserted_at, event id).
type LogEntry = (Oid, Uuid, Option<Uuid>, Option<DateTime<Utc>>, Option<i64>);

/// Passes of replay before the parents are locked, at most.
const CATCH_UP_PASSES: usize = 8;
/// A pass that replayed fewer changes than this has caught up.
const CAUGHT_UP_BELOW: usize = 100;

/// What replaying the sources' logged changes into the new range did.
struct Replay {
    tasks_added: i64,
    events_added: i64,
    /// Tenants whose tasks changed.
    tenants: Vec<Uuid>,
}

impl Replay {
    fn absorb(&mut self, other: Replay) {
        self.tasks_added += other.tasks_added;
        self.events_added += other.events_added;
        for tenant in other.tenants {
            if !self.tenants.contains(&tenant) {
                self.tenants.push(tenant);
            }
        }
    }
}

/// Every task and event the writers changed in the sources since the copy (as logged) is
/// deleted from the new range and copied again if it is kept now. Consumes the sources' log
/// entries; returns what it did and how many entries it replayed. Idempotent: a row changed again
/// meanwhile is logged again and replayed by the next call, the last of which runs under the
/// parents' lock, when no writer can change anything any more.
async fn replay_changes(
    conn: &mut PgConnection,
    sources: &[Range],
    (new_tasks, new_events): (&str, &str),
    (lower, upper): (&str, &str),
    grace: Duration,
) -> Result<(Replay, usize), sqlx::Error> {
    let task_relids: Vec<Oid> = sources.iter().map(|r| r.tasks_relid).collect();
    let event_relids: Vec<Oid> = sources.iter().map(|r| r.events_relid).collect();
    let entries: Vec<LogEntry> = sqlx::query_as(
        "DELETE FROM history_changes WHERE relid = ANY($1) OR relid = ANY($2)
         RETURNING relid, tenant_id, task_id, task_inserted_at, event_id",
    )
    .bind(&task_relids)
    .bind(&event_relids)
    .fetch_all(&mut *conn)
    .await?;
    let replayed = entries.len();
    let mut task_ids = Vec::new();
    let mut task_ats = Vec::new();
    let mut event_ids = Vec::new();
    let mut event_ats = Vec::new();
    let mut tenants = Vec::new();
    for (relid, tenant, task_id, task_at, event_id) in entries {
        if task_relids.contains(&relid) {
            if let (Some(id), Some(at)) = (task_id, task_at) {
                task_ids.push(id);
                task_ats.push(at);
            }
            if !tenants.contains(&tenant) {
                tenants.push(tenant);
            }
        } else if let (Some(id), Some(at)) = (event_id, task_at) {
            event_ids.push(id);
            event_ats.push(at);
        }
    }
    if task_ids.is_empty() && event_ids.is_empty() {
        return Ok((Replay { tasks_added: 0, events_added: 0, tenants }, replayed));
    }
    // Every statement here finds its rows through an index, keyed by the logged keys: this runs
    // under the parents' lock.
    let removed = sqlx::query(&format!(
        "WITH gone AS (DELETE FROM {new_tasks} n USING unnest($1::uuid[], $2::timestamptz[]) AS k(id, inserted_at)
                       WHERE n.id = k.id AND n.inserted_at = k.inserted_at RETURNING n.id, n.inserted_at)
         DELETE FROM pg_temp.history_rewrite_kept x USING gone WHERE x.id = gone.id AND x.inserted_at = gone.inserted_at"
    ))
    .bind(&task_ids)
    .bind(&task_ats)
    .execute(&mut *conn)
    .await?
    .rows_affected() as i64;
    let added: i64 = sqlx::query_scalar(&format!(
        "WITH k AS (SELECT DISTINCT * FROM unnest($1::uuid[], $2::timestamptz[]) AS k(id, inserted_at)),
              ins AS (INSERT INTO {new_tasks}
                      SELECT t.id, t.tenant_id, t.status, t.inserted_at, t.finished_at, t.payload
                      FROM k JOIN tasks t ON t.id = k.id AND t.inserted_at = k.inserted_at
                      LEFT JOIN tenants tn ON tn.id = t.tenant_id
                      WHERE t.inserted_at >= $3::timestamptz AND t.inserted_at < $4::timestamptz AND NOT {rule}
                      RETURNING id, inserted_at),
              keys AS (INSERT INTO pg_temp.history_rewrite_kept SELECT * FROM ins RETURNING 1)
         SELECT count(*) FROM keys",
        rule = due("t", "tn", "now()", "$5"),
    ))
    .bind(&task_ids)
    .bind(&task_ats)
    .bind(lower)
    .bind(upper)
    .bind(interval(grace))
    .fetch_one(&mut *conn)
    .await?;
    // The events named in the log, and every event of the tasks named in it.
    let mut events_removed = sqlx::query(&format!(
        "DELETE FROM {new_events} n USING unnest($1::int8[], $2::timestamptz[]) AS ev(id, at)
         WHERE n.id = ev.id AND n.task_inserted_at = ev.at"
    ))
    .bind(&event_ids)
    .bind(&event_ats)
    .execute(&mut *conn)
    .await?
    .rows_affected() as i64;
    events_removed += sqlx::query(&format!(
        "DELETE FROM {new_events} n USING unnest($1::uuid[], $2::timestamptz[]) AS k(id, at)
         WHERE n.task_id = k.id AND n.task_inserted_at = k.at"
    ))
    .bind(&task_ids)
    .bind(&task_ats)
    .execute(&mut *conn)
    .await?
    .rows_affected() as i64;
    let events_added = sqlx::query(&format!(
        "WITH named AS (
             SELECT e.id, e.task_inserted_at FROM unnest($1::int8[], $2::timestamptz[]) AS ev(id, at)
             JOIN task_events e ON e.id = ev.id AND e.task_inserted_at = ev.at
             WHERE e.task_inserted_at >= $5::timestamptz AND e.task_inserted_at < $6::timestamptz
             UNION
             SELECT e.id, e.task_inserted_at FROM unnest($3::uuid[], $4::timestamptz[]) AS k(id, at)
             JOIN task_events e ON e.task_id = k.id AND e.task_inserted_at = k.at
             WHERE e.task_inserted_at >= $5::timestamptz AND e.task_inserted_at < $6::timestamptz
         )
         INSERT INTO {new_events}
         SELECT e.* FROM named JOIN task_events e ON e.id = named.id AND e.task_inserted_at = named.task_inserted_at
         WHERE e.task_inserted_at >= $5::timestamptz AND e.task_inserted_at < $6::timestamptz
           AND (EXISTS (SELECT 1 FROM {new_tasks} k WHERE k.id = e.task_id AND k.inserted_at = e.task_inserted_at)
                OR (e.created_at >= now() - $7
                    AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)))"
    ))
    .bind(&event_ids)
    .bind(&event_ats)
    .bind(&task_ids)
    .bind(&task_ats)
    .bind(lower)
    .bind(upper)
    .bind(interval(ORPHAN_AGE.to_std().unwrap_or_default()))
    .execute(&mut *conn)
    .await?
    .rows_affected() as i64;
    Ok((Replay { tasks_added: added - removed, events_added: events_added - events_removed, tenants }, replayed))
}

/// Deletes the queue items of `[lower, upper)` whose task no longer exists (they went with a
/// rewrite), in batches.
/// Adds what a rewrite dropped to the run's receipts, one row per tenant, under the rule of the
/// tenant's state (deleted or not).
async fn record_receipts(conn: &mut PgConnection, receipt: &RunReceipt, dropped: &[DroppedTasks]) -> Result<(), sqlx::Error> {
    let tenants: Vec<Uuid> = dropped.iter().map(|d| d.tenant_id).collect();
    let tasks: Vec<i64> = dropped.iter().map(|d| d.tasks).collect();
    let events: Vec<i64> = dropped.iter().map(|d| d.events).collect();
    let oldest: Vec<Option<DateTime<Utc>>> = dropped.iter().map(|d| d.oldest).collect();
    let newest: Vec<Option<DateTime<Utc>>> = dropped.iter().map(|d| d.newest).collect();
    sqlx::query(&receipts::add(
        "SELECT $1, d.tenant_id, CASE WHEN tn.deleted_at IS NOT NULL THEN 'deleted-tenants' ELSE 'retention' END, $2,
                d.tasks, d.events, 0, d.oldest, d.newest
         FROM unnest($3::uuid[], $4::int8[], $5::int8[], $6::timestamptz[], $7::timestamptz[]) AS d(tenant_id, tasks, events, oldest, newest)
         LEFT JOIN tenants tn ON tn.id = d.tenant_id",
    ))
    .bind(receipt.run_id)
    .bind(receipt.task)
    .bind(&tenants)
    .bind(&tasks)
    .bind(&events)
    .bind(&oldest)
    .bind(&newest)
    .execute(conn)
    .await?;
    Ok(())
}

async fn delete_queue_items_of_gone_tasks(pool: &PgPool, lower: &str, upper: &str, limits: BatchLimits) -> Result<i64, sqlx::Error> {
    let mut total = 0;
    loop {
        let mut tx = batch::begin(pool, limits).await?;
        let deleted = sqlx::query(
            "DELETE FROM queue_items WHERE id IN (
                 SELECT q.id FROM queue_items q
                 WHERE q.task_inserted_at >= $1::timestamptz AND q.task_inserted_at < $2::timestamptz
                   AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = q.task_id AND t.inserted_at = q.task_inserted_at)
                 LIMIT 10000 FOR UPDATE SKIP LOCKED)",
        )
        .bind(lower)
        .bind(upper)
        .execute(&mut *tx)
        .await?
        .rows_affected() as i64;
        tx.commit().await?;
        total += deleted;
        if deleted < 10_000 {
            return Ok(total);
        }
    }
}
