//! Day partitions of `tasks` (on `inserted_at`) and `task_events` (on `task_inserted_at`), named
//! `tasks_pYYYYMMDD` and `task_events_pYYYYMMDD`, each covering one UTC day. Rows at any other
//! date live in the `_default` partitions, so an insert never fails.
//!
//! Removing a day is one short transaction: DETACH both partitions, re-check that every row in
//! them is due, move any row that is not (a task that raced in) back through the parent (it lands
//! in the default partition), delete the day's queue items. A crash rolls all of it back. The
//! detached tables are then dropped in a transaction of their own, so the parents' lock is not
//! held while the files are removed; a crash between the two leaves detached tables that the next
//! run drops ([`drop_detached_days`]).
//!
//! Why not `DETACH ... CONCURRENTLY`: PostgreSQL refuses it on a table that has a default
//! partition, and the default partition is what lets an insert at any date succeed. The plain
//! DETACH takes an ACCESS EXCLUSIVE lock on the parent for the few milliseconds of the
//! transaction; `lock_timeout` bounds how long it may wait (and so how long other sessions can
//! queue behind it), and a day that cannot get its lock is retried on the next run.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::history::{ident, task_partitions, Partition, ACTIVE, FINAL};
use crate::tenants::{grace_interval, HistoryRules};

const TASK_COLUMNS: &str = "id, tenant_id, status, inserted_at, finished_at, payload";
const EVENT_COLUMNS: &str = "id, tenant_id, task_id, task_inserted_at, event_type, created_at, data";

pub fn tasks_partition_name(day: NaiveDate) -> String {
    format!("tasks_p{}", day.format("%Y%m%d"))
}

pub fn events_partition_name(day: NaiveDate) -> String {
    format!("task_events_p{}", day.format("%Y%m%d"))
}

/// The day of a partition named `{table}_pYYYYMMDD`.
pub fn day_of(name: &str, table: &str) -> Option<NaiveDate> {
    let digits = name.strip_prefix(table)?.strip_prefix("_p")?;
    if digits.len() != 8 {
        return None;
    }
    NaiveDate::parse_from_str(digits, "%Y%m%d").ok()
}

/// The instants a day partition covers: `[start, end)`.
pub fn bounds(day: NaiveDate) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = day.and_time(NaiveTime::MIN).and_utc();
    (start, start + chrono::Duration::days(1))
}

/// Whether the day's task partition is attached.
pub async fn day_exists(executor: impl PgExecutor<'_>, day: NaiveDate) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                        WHERE i.inhparent = 'tasks'::regclass AND c.relname = $1)",
    )
    .bind(tasks_partition_name(day))
    .fetch_one(executor)
    .await
}

/// Creates and attaches the day's partitions of `tasks` and `task_events` in one transaction
/// (the caller's), first moving any rows of that day out of the default partitions. Returns the
/// number of rows moved.
pub async fn create_day(conn: &mut PgConnection, day: NaiveDate) -> Result<i64, sqlx::Error> {
    let (start, end) = bounds(day);
    let mut moved = 0;
    for (parent, key, name, columns) in [
        ("tasks", "inserted_at", tasks_partition_name(day), TASK_COLUMNS),
        ("task_events", "task_inserted_at", events_partition_name(day), EVENT_COLUMNS),
    ] {
        let (table, default) = (ident(&name), ident(&format!("{parent}_default")));
        sqlx::query(&format!("CREATE TABLE {table} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"))
            .execute(&mut *conn)
            .await?;
        // Lets ATTACH skip scanning the new table.
        sqlx::query(&format!(
            "ALTER TABLE {table} ADD CONSTRAINT {check} CHECK ({key} >= '{start}' AND {key} < '{end}')",
            check = ident(&format!("{name}_range")),
            start = start.to_rfc3339(),
            end = end.to_rfc3339(),
        ))
        .execute(&mut *conn)
        .await?;
        let result = sqlx::query(&format!(
            "WITH moved AS (DELETE FROM {default} WHERE {key} >= $1 AND {key} < $2 RETURNING {columns})
             INSERT INTO {table} ({columns}) SELECT {columns} FROM moved"
        ))
        .bind(start)
        .bind(end)
        .execute(&mut *conn)
        .await?;
        moved += result.rows_affected() as i64;
        sqlx::query(&format!(
            "ALTER TABLE {parent} ATTACH PARTITION {table} FOR VALUES FROM ('{start}') TO ('{end}')",
            start = start.to_rfc3339(),
            end = end.to_rfc3339(),
        ))
        .execute(&mut *conn)
        .await?;
        sqlx::query(&format!("ALTER TABLE {table} DROP CONSTRAINT {check}", check = ident(&format!("{name}_range"))))
            .execute(&mut *conn)
            .await?;
    }
    Ok(moved)
}

/// What removing a day did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayRemoval {
    /// Tasks and events dropped with the partitions.
    pub tasks_dropped: i64,
    pub events_dropped: i64,
    pub queue_items_deleted: i64,
    /// Rows that turned out not to be due after all and were moved to the default partitions.
    pub tasks_kept: i64,
    pub events_kept: i64,
}

/// Detaches a day whose rows were all found due, in the caller's transaction (see the module
/// documentation), leaving two standalone tables for [`drop_detached_days`]. `lock_timeout` caps
/// the wait for the parents' locks.
pub async fn remove_day(
    conn: &mut PgConnection,
    day: NaiveDate,
    now: DateTime<Utc>,
    deleted_grace: Duration,
    lock_timeout: Duration,
) -> Result<DayRemoval, sqlx::Error> {
    let (tasks, events) = (ident(&tasks_partition_name(day)), ident(&events_partition_name(day)));
    let (start, end) = bounds(day);
    sqlx::query("SELECT set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", lock_timeout.as_millis().max(1)))
        .execute(&mut *conn)
        .await?;
    sqlx::query(&format!("ALTER TABLE tasks DETACH PARTITION {tasks}")).execute(&mut *conn).await?;
    sqlx::query(&format!("ALTER TABLE task_events DETACH PARTITION {events}")).execute(&mut *conn).await?;

    // The caller found every row due; with the day detached, nothing can arrive any more. Check
    // again: if a row raced in (or a task was revived) it goes back through the parent, landing
    // in the default partition. Only that rare path reads the whole day.
    let (tasks_name, events_name) = (tasks_partition_name(day), events_partition_name(day));
    let still_due = summarise_day(&mut *conn, day, (&tasks_name, &events_name), now, deleted_grace).await?.wholly_due();
    let tasks_total = estimated_rows(&mut *conn, &tasks_name).await?;
    let events_total = estimated_rows(&mut *conn, &events_name).await?;
    let mut removal = DayRemoval { tasks_dropped: tasks_total, events_dropped: events_total, ..Default::default() };
    if still_due {
        removal.queue_items_deleted = sqlx::query(
            "DELETE FROM queue_items WHERE task_inserted_at >= $1 AND task_inserted_at < $2",
        )
        .bind(start)
        .bind(end)
        .execute(&mut *conn)
        .await?
        .rows_affected() as i64;
    } else {
        move_survivors(&mut *conn, &mut removal, &tasks, &events, (start, end), now, deleted_grace).await?;
    }
    Ok(removal)
}

/// Drops day tables that are no longer partitions: those [`remove_day`] detached (its caller
/// drops them right after, in a transaction of their own, so the parents' lock is not held while
/// the files are removed), and any a crash left between the two. Only `tasks_pYYYYMMDD` and
/// `task_events_pYYYYMMDD` tables are touched; rename a detached day to keep it. Returns the days
/// whose tables were dropped.
pub async fn drop_detached_days(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind = 'r' AND NOT c.relispartition
           AND (c.relname ~ '^tasks_p[0-9]{8}$' OR c.relname ~ '^task_events_p[0-9]{8}$')
         ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await?;
    for name in &names {
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", ident(name))).execute(&mut *conn).await?;
    }
    Ok(names)
}

/// The slow path of [`remove_day`]: copies every row that is not due back into the parents.
async fn move_survivors(
    conn: &mut PgConnection,
    removal: &mut DayRemoval,
    tasks: &str,
    events: &str,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    now: DateTime<Utc>,
    deleted_grace: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "CREATE TEMPORARY TABLE day_survivors ON COMMIT DROP AS
         SELECT t.* FROM {tasks} t LEFT JOIN tenants tn ON tn.id = t.tenant_id
         WHERE NOT coalesce(
             (tn.deleted_at IS NOT NULL AND tn.deleted_at < $1 - $2)
             OR (tn.deleted_at IS NULL AND t.status IN {FINAL}
                 AND coalesce(t.finished_at, t.inserted_at) < retention_cutoff($1, tn.data_retention_period)),
             false)"
    ))
    .bind(now)
    .bind(grace_interval(deleted_grace))
    .execute(&mut *conn)
    .await?;
    let tasks_kept = sqlx::query(&format!("INSERT INTO tasks ({TASK_COLUMNS}) SELECT {TASK_COLUMNS} FROM day_survivors"))
        .execute(&mut *conn)
        .await?
        .rows_affected() as i64;
    let events_kept = sqlx::query(&format!(
        "INSERT INTO task_events ({EVENT_COLUMNS}) OVERRIDING SYSTEM VALUE
         SELECT {EVENT_COLUMNS} FROM {events} e
         WHERE e.created_at >= $1 - interval '1 hour'
            OR EXISTS (SELECT 1 FROM day_survivors s WHERE s.id = e.task_id AND s.inserted_at = e.task_inserted_at)"
    ))
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected() as i64;
    removal.queue_items_deleted = sqlx::query(
        "DELETE FROM queue_items q WHERE q.task_inserted_at >= $1 AND q.task_inserted_at < $2
           AND NOT EXISTS (SELECT 1 FROM day_survivors s WHERE s.id = q.task_id AND s.inserted_at = q.task_inserted_at)",
    )
    .bind(start)
    .bind(end)
    .execute(&mut *conn)
    .await?
    .rows_affected() as i64;
    removal.tasks_kept = tasks_kept;
    removal.events_kept = events_kept;
    removal.tasks_dropped = (removal.tasks_dropped - tasks_kept).max(0);
    removal.events_dropped = (removal.events_dropped - events_kept).max(0);
    Ok(())
}

/// What a day holds, tenant by tenant, as far as the retention rules care. Read with one index
/// probe or two per tenant present, never by scanning the day.
#[derive(Debug, Clone, PartialEq)]
pub struct DaySummary {
    pub tenants: Vec<TenantInDay>,
    /// An event of that day was written less than an hour ago (it may be a young orphan).
    pub young_events: bool,
}

/// One tenant's rows in a day.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantInDay {
    pub tenant_id: Uuid,
    /// `live` (with a retention period), `forever` (NULL retention), `deleted` (within the grace),
    /// `purged` (deleted past the grace) or `unknown` (no such tenant).
    pub kind: String,
    /// The live tenant's retention period, in seconds.
    pub retention_seconds: Option<f64>,
    /// Some task of the tenant that day is queued or running.
    pub has_active: bool,
    /// Some finished task of the tenant that day is due.
    pub any_due: bool,
    /// Every finished task of the tenant that day is due (true when there are none).
    pub all_due: bool,
}

impl DaySummary {
    /// Every row of the day is due: it can be dropped whole.
    pub fn wholly_due(&self) -> bool {
        !self.young_events
            && self.tenants.iter().all(|t| t.kind == "purged" || (t.kind == "live" && !t.has_active && t.all_due))
    }

    /// Time alone will never make the day wholly due: rows kept forever, rows of unknown tenants,
    /// or a queued or running task (which may never finish). Such a day is cleaned row by row.
    pub fn blocked(&self) -> bool {
        self.tenants.iter().any(|t| t.kind == "forever" || t.kind == "unknown" || (t.kind == "live" && t.has_active))
    }

    /// The rules to apply row by row in this day. A past day (`droppable`: it ended over an hour
    /// ago) that will be dropped whole once its longest-retention tenants' rows are due waits for
    /// that drop: only shorter-retention tenants' due rows (and purged tenants' rows) are deleted
    /// before it, and a wholly due day is left to the partitions task. A blocked day, or one not
    /// yet droppable, applies every rule. Tenants with nothing due are left out, so an empty
    /// result means no statement is needed.
    pub fn row_rules(&self, rules: &HistoryRules, droppable: bool) -> HistoryRules {
        if droppable && self.wholly_due() {
            return HistoryRules::default(); // the partitions task drops it whole
        }
        let longest = self
            .tenants
            .iter()
            .filter(|t| t.kind == "live")
            .filter_map(|t| t.retention_seconds)
            .fold(0.0f64, f64::max);
        let blocked = !droppable || self.blocked();
        let wanted = |id: &Uuid| {
            self.tenants.iter().any(|t| {
                t.tenant_id == *id && t.kind == "live" && t.any_due && (blocked || t.retention_seconds.unwrap_or(0.0) < longest)
            })
        };
        HistoryRules {
            live: rules.live.iter().filter(|(id, _)| wanted(id)).copied().collect(),
            purged: rules
                .purged
                .iter()
                .filter(|id| self.tenants.iter().any(|t| t.tenant_id == **id && t.kind == "purged"))
                .copied()
                .collect(),
        }
    }
}

/// Summarises one day from its partitions (attached or detached) `tables`: (tasks, events).
/// [`summarise_partitions`] does every attached day at once, under cached plans.
pub async fn summarise_day(
    conn: &mut PgConnection,
    day: NaiveDate,
    tables: (&str, &str),
    now: DateTime<Utc>,
    deleted_grace: Duration,
) -> Result<DaySummary, sqlx::Error> {
    let (start, end) = bounds(day);
    let (t, e) = (ident(tables.0), ident(tables.1));
    let in_day = "inserted_at >= $1 AND inserted_at < $2";
    let rows: Vec<(Option<Uuid>, Option<String>, Option<f64>, bool, bool, bool, bool)> = sqlx::query_as(&format!(
        "WITH RECURSIVE present(tenant_id) AS (
             (SELECT tenant_id FROM {t} WHERE {in_day} ORDER BY tenant_id LIMIT 1)
             UNION ALL
             SELECT (SELECT x.tenant_id FROM {t} x WHERE x.{in_day} AND x.tenant_id > present.tenant_id
                     ORDER BY x.tenant_id LIMIT 1)
             FROM present WHERE present.tenant_id IS NOT NULL
         ), described AS (
             SELECT p.tenant_id,
                    CASE WHEN tn.id IS NULL THEN 'unknown'
                         WHEN tn.deleted_at < $3 - $4 THEN 'purged'
                         WHEN tn.deleted_at IS NOT NULL THEN 'deleted'
                         WHEN tn.data_retention_period IS NULL THEN 'forever'
                         ELSE 'live' END AS kind,
                    extract(epoch FROM tn.data_retention_period)::float8 AS retention_seconds,
                    retention_cutoff($3, tn.data_retention_period) AS cutoff
             FROM present p LEFT JOIN tenants tn ON tn.id = p.tenant_id
             WHERE p.tenant_id IS NOT NULL
         )
         SELECT d.tenant_id, d.kind,
                CASE WHEN d.kind = 'live' THEN d.retention_seconds END AS retention_seconds,
                EXISTS (SELECT 1 FROM {t} a WHERE a.{in_day} AND a.tenant_id = d.tenant_id AND a.status IN {ACTIVE}) AS has_active,
                coalesce((SELECT min(coalesce(f.finished_at, f.inserted_at)) FROM {t} f
                          WHERE f.{in_day} AND f.tenant_id = d.tenant_id AND f.status IN {FINAL}) < d.cutoff, false) AS any_due,
                coalesce((SELECT max(coalesce(f.finished_at, f.inserted_at)) FROM {t} f
                          WHERE f.{in_day} AND f.tenant_id = d.tenant_id AND f.status IN {FINAL}) < d.cutoff, true) AS all_due,
                false AS young_events
         FROM described d
         UNION ALL
         -- One more row, last, carrying whether an event of the day is under an hour old.
         SELECT NULL, NULL, NULL, false, false, false,
                EXISTS (SELECT 1 FROM {e} WHERE task_inserted_at >= $1 AND task_inserted_at < $2
                                            AND created_at >= $3 - interval '1 hour')
         ORDER BY 1 NULLS LAST"
    ))
    .bind(start)
    .bind(end)
    .bind(now)
    .bind(grace_interval(deleted_grace))
    .fetch_all(&mut *conn)
    .await?;
    let mut summary = DaySummary { tenants: Vec::new(), young_events: false };
    for (tenant_id, kind, retention_seconds, has_active, any_due, all_due, young_events) in rows {
        match (tenant_id, kind) {
            (Some(tenant_id), Some(kind)) => {
                summary.tenants.push(TenantInDay { tenant_id, kind, retention_seconds, has_active, any_due, all_due })
            }
            _ => summary.young_events = young_events,
        }
    }
    Ok(summary)
}

/// The planner's estimate of a table's rows (0 before its first ANALYZE): what a drop reports,
/// since counting a day would read all of it.
pub async fn estimated_rows(executor: impl PgExecutor<'_>, table: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = $1::regclass")
        .bind(ident(table))
        .fetch_one(executor)
        .await
}

/// Tasks per tenant in one partition of `tasks`: what a dry run of a drop reports (it reads the
/// whole day, which only an operator's dry run does).
pub async fn tasks_by_tenant(executor: impl PgExecutor<'_>, partition: &str) -> Result<Vec<(uuid::Uuid, i64)>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT tenant_id, count(*) FROM {} GROUP BY tenant_id ORDER BY tenant_id", ident(partition)))
        .fetch_all(executor)
        .await
}

/// Every attached partition of `tasks`, oldest day first, with its day's summary (`None` for the
/// default partition and any the engine did not create). One transaction with cached generic
/// plans (`SET LOCAL`, so the setting cannot outlive it, even on an error): planning a summary
/// costs more than running it, and a generic plan per day makes a summary cost its probes alone.
pub async fn summarise_partitions(
    pool: &PgPool,
    now: DateTime<Utc>,
    deleted_grace: Duration,
) -> Result<Vec<(Partition, Option<DaySummary>)>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('plan_cache_mode', 'force_generic_plan', true)").execute(&mut *tx).await?;
    let mut summaries = Vec::new();
    for partition in task_partitions(&mut *tx).await? {
        let summary = match partition.day {
            Some(day) => {
                let tables = (partition.name.as_str(), events_partition_name(day));
                Some(summarise_day(&mut tx, day, (tables.0, &tables.1), now, deleted_grace).await?)
            }
            None => None,
        };
        summaries.push((partition, summary));
    }
    tx.commit().await?;
    Ok(summaries)
}

/// No retention is shorter than an hour (the database refuses it) and orphan events are kept an
/// hour: a day that ended less than an hour ago cannot be wholly due.
pub const MIN_AGE: chrono::Duration = chrono::Duration::hours(1);

/// Whether a day is old enough to be checked for removal.
pub fn removal_candidate(day: NaiveDate, now: DateTime<Utc>) -> bool {
    bounds(day).1 <= now - MIN_AGE
}
