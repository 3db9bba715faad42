//! Run history, kept as ranges: `tasks` (on `inserted_at`) and `task_events` (on
//! `task_inserted_at`) are partitioned alike, and every instant from the start of the managed area
//! on belongs to exactly one attached range, a pair of partitions: a day, a wider span, or the
//! future (`tasks_future`, from the last day made ahead to MAXVALUE). The default partition takes
//! only what is older (its CHECK says so, which spares every ATTACH a scan of it), and nothing is
//! ever moved into it.
//!
//! * [`ranges`]: the layout: reading it, carving days out of the future range, filling a hole an
//!   operator left, adopting a partition attached by hand.
//! * [`facts`]: per range and tenant, what the rules need (oldest finished task, active tasks,
//!   rows, when the next task becomes due), kept exact by a log of writes, so that a run finds what
//!   is due without probing every range for every tenant.
//! * [`deletes`]: row deletes, batch by batch, each task with its events and queue items.
//! * [`rewrite`]: replacing ranges by one holding only their kept rows (compaction, merging).
//! * [`detached`]: the tables the engine detached itself, dropped by OID.
//!
//! What is due is decided by one SQL function, `retention_task_due` (see the migrations), in every
//! statement that deletes or drops history, against the tenant's row as it is when the statement
//! runs.

pub mod costs;
pub mod deletes;
pub mod detached;
pub mod facts;
pub mod ranges;
pub mod rewrite;

use chrono::{DateTime, Utc};
use sqlx::postgres::types::Oid;
use sqlx::FromRow;

pub(crate) const FINAL: &str = "('succeeded', 'failed', 'cancelled')";
pub(crate) const ACTIVE: &str = "('queued', 'running')";

/// The GUC the engine sets in its own history writes: the change log skips them (the engine
/// keeps the facts of what it deletes or moves itself).
pub(crate) const ENGINE_WRITE: &str = "SELECT set_config('engine.retention_write', 'on', true)";

/// Orphan events (whose task does not exist) are kept this long: their task may not be committed yet.
pub const ORPHAN_AGE: chrono::Duration = chrono::Duration::hours(1);

/// The rule for the task row `t` and its tenants row `tn` (LEFT JOINed: NULL columns when the
/// tenant has no row), at `now`, with the deleted tenants' `grace` (SQL expressions):
/// `retention_task_due` under the window of the task's status, and no hold on it. `t` needs `id`,
/// `status`, `finished_at` and `inserted_at`; `tn` the tenant's `id`, `deleted_at` and windows.
pub(crate) fn due(t: &str, tn: &str, now: &str, grace: &str) -> String {
    format!(
        "(retention_task_due({t}.status, {t}.finished_at, {t}.inserted_at, {tn}.id, {period}, {tn}.deleted_at, {now}, {grace})
          AND NOT {held})",
        period = period_for(t, tn),
        held = held(&format!("{tn}.id"), &format!("{t}.id"), now),
    )
}

/// The window of task `t` under tenant `tn`'s settings (NULL: forever).
pub(crate) fn period_for(t: &str, tn: &str) -> String {
    format!(
        "retention_period_for({t}.status, {tn}.data_retention_period, {tn}.succeeded_retention_period, \
         {tn}.failed_retention_period, {tn}.cancelled_retention_period)"
    )
}

/// Whether a hold covers the task `task` of `tenant` at `now` (`task` NULL: a hold on the whole
/// tenant; a hold on a task holds the tasks with that id). The holds in force are read once per
/// statement, as two arrays (uncorrelated subqueries: init plans), and each row costs two array
/// lookups: with no holds, nothing. A correlated EXISTS would cost a subplan call per row (1.1M
/// rows copied by a rewrite took 40% longer), and a SQL function with a subquery is not inlined.
pub(crate) fn held(tenant: &str, task: &str, now: &str) -> String {
    format!(
        "coalesce({tenant} = ANY (ARRAY (SELECT h.tenant_id FROM retention_holds h
                                         WHERE h.task_id IS NULL AND h.removed_at IS NULL AND (h.until IS NULL OR h.until > {now})))
                  OR {task} = ANY (ARRAY (SELECT h.task_id FROM retention_holds h
                                          WHERE h.task_id IS NOT NULL AND h.removed_at IS NULL AND (h.until IS NULL OR h.until > {now}))),
                  false)"
    )
}

/// Whether a hold covers the whole of tenant `tenant` at `now`.
pub(crate) fn tenant_held(tenant: &str, now: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM retention_holds h
                 WHERE h.tenant_id = {tenant} AND h.task_id IS NULL AND h.removed_at IS NULL AND (h.until IS NULL OR h.until > {now}))"
    )
}

/// When the oldest final task `oldest` of tenant `tn` in a range may first be due (NULL: not by
/// time alone): under the tenant's shortest window, and not before a hold on the whole tenant
/// ends (never, while one without an end holds it). Never later than the rule first holds.
pub(crate) fn next_due(oldest: &str, tn: &str) -> String {
    format!(
        "CASE WHEN EXISTS (SELECT 1 FROM retention_holds h WHERE h.tenant_id = {tn}.id AND h.task_id IS NULL
                             AND h.removed_at IS NULL AND h.until IS NULL) THEN NULL
              ELSE greatest(retention_next_due({oldest}, {tn}.shortest_retention_period, {tn}.deleted_at),
                            (SELECT max(h.until) FROM retention_holds h WHERE h.tenant_id = {tn}.id AND h.task_id IS NULL
                               AND h.removed_at IS NULL AND h.until > now()))
         END"
    )
}

/// What a range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeKind {
    /// The default partition: everything before the managed area.
    Default,
    /// A day or a wider span of instants.
    Range,
    /// From the last day made ahead on, to MAXVALUE.
    Future,
}

impl RangeKind {
    fn parse(text: &str) -> RangeKind {
        match text {
            "default" => RangeKind::Default,
            "future" => RangeKind::Future,
            _ => RangeKind::Range,
        }
    }
}

/// One attached range: a partition of `tasks` and one of `task_events` covering `[lower, upper)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub tasks_relid: Oid,
    pub events_relid: Oid,
    /// `None`: from -infinity (the default partition).
    pub lower: Option<DateTime<Utc>>,
    /// `None`: to +infinity (the future range).
    pub upper: Option<DateTime<Utc>>,
    pub kind: RangeKind,
    /// Tasks, as last counted (adjusted by known deletes and logged writes since).
    pub rows: i64,
    /// When its facts were last rebuilt from its rows (`None`: never).
    pub settled_at: Option<DateTime<Utc>>,
    pub tasks_name: String,
    pub events_name: String,
}

#[derive(FromRow)]
pub(crate) struct RangeRow {
    tasks_relid: Oid,
    events_relid: Oid,
    lower: Option<DateTime<Utc>>,
    upper: Option<DateTime<Utc>>,
    kind: String,
    rows: i64,
    settled_at: Option<DateTime<Utc>>,
    tasks_name: String,
    events_name: String,
}

impl From<RangeRow> for Range {
    fn from(row: RangeRow) -> Self {
        Range {
            tasks_relid: row.tasks_relid,
            events_relid: row.events_relid,
            lower: row.lower,
            upper: row.upper,
            kind: RangeKind::parse(&row.kind),
            rows: row.rows,
            settled_at: row.settled_at,
            tasks_name: row.tasks_name,
            events_name: row.events_name,
        }
    }
}

/// The columns of [`RangeRow`] from `history_ranges r`.
pub(crate) const RANGE_COLUMNS: &str = "r.tasks_relid, r.events_relid,
    CASE WHEN r.lower = '-infinity' THEN NULL ELSE r.lower END AS lower,
    CASE WHEN r.upper = 'infinity' THEN NULL ELSE r.upper END AS upper,
    r.kind, r.rows, r.settled_at,
    r.tasks_relid::regclass::text AS tasks_name, r.events_relid::regclass::text AS events_name";

impl Range {
    /// The lower bound as SQL text (`-infinity` for the default partition), to bind as `$n::timestamptz`.
    pub fn lower_text(&self) -> String {
        self.lower.map_or_else(|| "-infinity".into(), |at| at.to_rfc3339())
    }

    /// The upper bound as SQL text (`infinity` for the future range).
    pub fn upper_text(&self) -> String {
        self.upper.map_or_else(|| "infinity".into(), |at| at.to_rfc3339())
    }

    /// Whether its facts may miss writes: never rebuilt, or its live window has begun and it has
    /// not been rebuilt since the window ended. Such a range is probed, not trusted.
    pub fn is_live(&self, now: DateTime<Utc>) -> bool {
        match self.settled_at {
            None => true,
            Some(settled) => self.lower.is_none_or(|lower| lower <= now) && self.upper.is_none_or(|upper| settled < upper),
        }
    }

    /// Whether its facts are due to be rebuilt: never built, or its live window has ended since.
    pub fn needs_settle(&self, now: DateTime<Utc>) -> bool {
        match self.settled_at {
            None => true,
            Some(settled) => self.upper.is_some_and(|upper| settled < upper && upper <= now),
        }
    }
}

/// A double-quoted SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A `PgInterval` of exactly `duration` (microseconds only: no calendar arithmetic).
pub(crate) fn interval(duration: std::time::Duration) -> sqlx::postgres::types::PgInterval {
    sqlx::postgres::types::PgInterval { months: 0, days: 0, microseconds: duration.as_micros().min(i64::MAX as u128) as i64 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn range(lower: Option<DateTime<Utc>>, upper: Option<DateTime<Utc>>, settled_at: Option<DateTime<Utc>>) -> Range {
        Range {
            tasks_relid: Oid(1),
            events_relid: Oid(2),
            lower,
            upper,
            kind: RangeKind::Range,
            rows: 0,
            settled_at,
            tasks_name: String::new(),
            events_name: String::new(),
        }
    }

    #[test]
    fn a_day_is_live_from_its_start_until_rebuilt_after_its_end() {
        let at = |d: u32, h: u32| Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap();
        let created_ahead = range(Some(at(10, 0)), Some(at(11, 0)), Some(at(3, 0)));
        assert!(!created_ahead.is_live(at(9, 23)), "ahead of its day every write is logged");
        assert!(created_ahead.is_live(at(10, 0)));
        assert!(created_ahead.is_live(at(11, 5)), "ended, not yet rebuilt");
        assert!(!created_ahead.needs_settle(at(10, 23)));
        assert!(created_ahead.needs_settle(at(11, 0)));
        let rebuilt = range(Some(at(10, 0)), Some(at(11, 0)), Some(at(11, 1)));
        assert!(!rebuilt.is_live(at(20, 0)) && !rebuilt.needs_settle(at(20, 0)));
        assert!(range(Some(at(10, 0)), Some(at(11, 0)), None).needs_settle(at(1, 0)), "adopted: never rebuilt");
        let future = range(Some(at(17, 0)), None, Some(at(10, 0)));
        assert!(!future.is_live(at(16, 0)) && future.is_live(at(17, 0)) && !future.needs_settle(at(30, 0)));
    }
}
