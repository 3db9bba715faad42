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
//! * [`previews`]: what a run, or a tenant's proposed windows, would delete (dry runs).
//! * [`rewrite`]: replacing ranges by one holding only their kept rows (compaction, merging).
//! * [`detached`]: the tables the engine detached itself, dropped by OID.
//!
//! What is due is decided by the rule ([`crate::rule`]), in every statement that deletes history or
//! decides what a rewrite keeps, against the tenant's row and the holds as they are when the
//! statement runs.

pub mod costs;
pub mod deletes;
pub mod dependents;
pub mod detached;
pub mod facts;
pub mod previews;
pub mod ranges;
pub mod rewrite;

use chrono::{DateTime, Utc};
use sqlx::postgres::types::Oid;
use sqlx::{FromRow, PgConnection};

/// Sets the GUC the engine sets in its own history writes, for the caller's transaction: the
/// change log skips them (the engine keeps the facts of what it deletes or moves itself).
pub(crate) async fn engine_write(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query!("SELECT set_config('engine.retention_write', 'on', true)")
        .fetch_one(conn)
        .await?;
    Ok(())
}

/// The names of two relations (a range's partitions, by OID) as SQL identifiers, qualified
/// where the search path needs it.
pub(crate) async fn relation_names(
    conn: &mut PgConnection,
    first: Oid,
    second: Oid,
) -> Result<(String, String), sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT $1::oid::regclass::text AS "first!", $2::oid::regclass::text AS "second!""#,
        first,
        second
    )
    .fetch_one(conn)
    .await?;
    Ok((row.first, row.second))
}

pub use crate::rule::ORPHAN_AGE;

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

/// Which writes into a range its change-log triggers record (`history_ranges.log_mode`; see
/// migration `20261203000012`). The triggers never read a clock: the engine sets the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// Being filled: only a task finished before the range starts is logged; the range is probed,
    /// its facts are not trusted.
    Live,
    /// Every write except the engine's own (which keep the facts themselves).
    All,
    /// Every write, the engine's row deletes included: the range is being rewritten.
    Rewrite,
}

impl LogMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LogMode::Live => "live",
            LogMode::All => "all",
            LogMode::Rewrite => "rewrite",
        }
    }

    fn parse(text: &str) -> LogMode {
        match text {
            "live" => LogMode::Live,
            "rewrite" => LogMode::Rewrite,
            _ => LogMode::All,
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
    pub log_mode: LogMode,
    /// The rewrite it is a source of, if any.
    pub rewrite_id: Option<i64>,
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
    log_mode: String,
    rewrite_id: Option<i64>,
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
            log_mode: LogMode::parse(&row.log_mode),
            rewrite_id: row.rewrite_id,
            tasks_name: row.tasks_name,
            events_name: row.events_name,
        }
    }
}

/// The columns of [`RangeRow`] from `history_ranges r`.
pub(crate) const RANGE_COLUMNS: &str = "r.tasks_relid, r.events_relid,
    CASE WHEN r.lower = '-infinity' THEN NULL ELSE r.lower END AS lower,
    CASE WHEN r.upper = 'infinity' THEN NULL ELSE r.upper END AS upper,
    r.kind, r.rows, r.settled_at, r.log_mode, r.rewrite_id,
    r.tasks_relid::regclass::text AS tasks_name, r.events_relid::regclass::text AS events_name";

impl Range {
    /// The lower bound as SQL text (`-infinity` for the default partition), to bind as `$n::timestamptz`.
    pub fn lower_text(&self) -> String {
        self.lower
            .map_or_else(|| "-infinity".into(), |at| at.to_rfc3339())
    }

    /// The upper bound as SQL text (`infinity` for the future range).
    pub fn upper_text(&self) -> String {
        self.upper
            .map_or_else(|| "infinity".into(), |at| at.to_rfc3339())
    }

    /// Whether its facts may miss writes: it is being filled (its change log is live), or its
    /// facts were never rebuilt. Such a range is probed, not trusted.
    pub fn is_live(&self) -> bool {
        self.log_mode == LogMode::Live || self.settled_at.is_none()
    }

    /// Whether its facts are due to be rebuilt (the range switched to log every write first, if
    /// it was live): a live range once its end has passed by `now` (the run's checked clock), or
    /// one whose facts were never rebuilt.
    pub fn needs_settle(&self, now: DateTime<Utc>) -> bool {
        let ended = self.upper.is_some_and(|upper| upper <= now);
        (self.log_mode == LogMode::Live && ended)
            || (self.log_mode != LogMode::Live && self.settled_at.is_none())
    }
}

/// A double-quoted SQL identifier.
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn range(
        lower: Option<DateTime<Utc>>,
        upper: Option<DateTime<Utc>>,
        settled_at: Option<DateTime<Utc>>,
        log_mode: LogMode,
    ) -> Range {
        Range {
            tasks_relid: Oid(1),
            events_relid: Oid(2),
            lower,
            upper,
            kind: RangeKind::Range,
            rows: 0,
            settled_at,
            log_mode,
            rewrite_id: None,
            tasks_name: String::new(),
            events_name: String::new(),
        }
    }

    #[test]
    fn a_day_is_live_until_its_end_has_passed_and_its_facts_are_rebuilt() {
        let at = |d: u32, h: u32| Utc.with_ymd_and_hms(2026, 11, d, h, 0, 0).unwrap();
        let created_ahead = range(
            Some(at(10, 0)),
            Some(at(11, 0)),
            Some(at(3, 0)),
            LogMode::Live,
        );
        assert!(
            created_ahead.is_live(),
            "its writes are not logged: probed, whatever the clock says"
        );
        assert!(!created_ahead.needs_settle(at(10, 23)));
        assert!(
            created_ahead.needs_settle(at(11, 0)),
            "ended: switch to logging every write, rebuild"
        );
        let rebuilt = range(
            Some(at(10, 0)),
            Some(at(11, 0)),
            Some(at(11, 1)),
            LogMode::All,
        );
        assert!(!rebuilt.is_live() && !rebuilt.needs_settle(at(20, 0)));
        // A clock that steps back into the day changes nothing: the triggers log every write.
        assert!(!rebuilt.is_live() && !rebuilt.needs_settle(at(10, 12)));
        let adopted = range(Some(at(10, 0)), Some(at(11, 0)), None, LogMode::Live);
        assert!(
            adopted.is_live()
                && adopted.needs_settle(at(12, 0))
                && !adopted.needs_settle(at(10, 5))
        );
        let rewritten = range(Some(at(1, 0)), Some(at(8, 0)), None, LogMode::All);
        assert!(
            rewritten.is_live() && rewritten.needs_settle(at(9, 0)),
            "new from a rewrite: rebuilt before trusted"
        );
        let future = range(Some(at(17, 0)), None, Some(at(10, 0)), LogMode::All);
        assert!(!future.is_live() && !future.needs_settle(at(30, 0)));
    }
}
