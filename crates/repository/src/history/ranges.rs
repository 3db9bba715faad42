//! The layout of run history: which ranges are attached, and the changes the engine makes to it
//! (days carved out of the future range, holes filled, partitions adopted). Every change to the
//! layout happens under the layout lock ([`take_layout_lock`]), so changes made by different
//! tasks or replicas never interleave.
//!
//! Where the parents' ACCESS EXCLUSIVE lock is needed (detaching), it is taken after the tables
//! to attach have been created and the `history_ranges` rows to change have been locked, and held
//! for catalog changes and the rows of the future range only. Under it, no statement waits for a
//! row lock: a session holding one while it waits for the parents would deadlock with it. Facts
//! that moved rows make stale are rebuilt later, by `facts::settle`, outside the lock.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use sqlx::postgres::types::Oid;
use sqlx::{PgConnection, PgExecutor};

use super::{engine_write, relation_names, LogMode, Range, RangeRow, RANGE_COLUMNS};

/// Every attached range the engine manages, oldest first (the default partition first, the
/// future range last).
pub async fn all(executor: impl PgExecutor<'_>) -> Result<Vec<Range>, sqlx::Error> {
    let rows: Vec<RangeRow> = sqlx::query_as(&format!(
        "SELECT {RANGE_COLUMNS} FROM history_ranges r ORDER BY r.lower"
    ))
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(Range::from).collect())
}

/// A transaction-scoped lock that serialises every change the engine makes to the layout.
const LAYOUT_LOCK: i64 = 0x656e_6769_6e65_4c59; // "engineLY"

/// Takes the layout lock for the caller's transaction: waits (up to the transaction's
/// `lock_timeout`) when `wait`, else returns false at once if another holds it.
pub async fn take_layout_lock(conn: &mut PgConnection, wait: bool) -> Result<bool, sqlx::Error> {
    if wait {
        sqlx::query!("SELECT pg_advisory_xact_lock($1)", LAYOUT_LOCK)
            .execute(&mut *conn)
            .await?;
        Ok(true)
    } else {
        sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_xact_lock($1) AS "taken!""#,
            LAYOUT_LOCK
        )
        .fetch_one(&mut *conn)
        .await
    }
}

/// Locks both parents, and `partitions` (names as the catalog gives them), in ACCESS EXCLUSIVE
/// mode for a detach, waiting at most `lock_timeout`. Other partitions are not locked: every
/// query through the parents waits on the parents' lock, and the partitions named are the only
/// ones whose rows the transaction reads under it.
pub(crate) async fn lock_parents(
    conn: &mut PgConnection,
    partitions: &[&str],
    lock_timeout: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "SELECT set_config('lock_timeout', $1, true)",
        format!("{}ms", lock_timeout.as_millis().max(1))
    )
    .fetch_one(&mut *conn)
    .await?;
    let mut tables = vec!["ONLY tasks", "ONLY task_events"];
    tables.extend_from_slice(partitions);
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    ))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The instant a UTC day starts.
pub fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(NaiveTime::MIN).and_utc()
}

/// Creates (unattached) the two tables of `[lower, upper)`, named for the range plus `suffix`,
/// their change log in `mode`.
pub(crate) async fn create_tables(
    conn: &mut PgConnection,
    lower: &str,
    upper: &str,
    suffix: &str,
    mode: LogMode,
) -> Result<(Oid, Oid), sqlx::Error> {
    // The bounds are SQL text (`-infinity`, `infinity` among them), cast by the server.
    let row = sqlx::query!(
        r#"SELECT tasks_relid AS "tasks_relid!", events_relid AS "events_relid!"
             FROM history_create_range_tables($1::text::timestamptz, $2::text::timestamptz, $3, $4)"#,
        lower,
        upper,
        suffix,
        mode.as_str()
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok((row.tasks_relid, row.events_relid))
}

/// Puts the change log of the range with partitions `tasks` and `events` (lower bound `lower`,
/// SQL text) in `mode`, and records it. DDL on the two partitions: it waits for the writers in
/// flight there (up to the transaction's `lock_timeout`), and new writers wait for it until the
/// transaction ends.
pub(crate) async fn set_log_mode(
    conn: &mut PgConnection,
    tasks: Oid,
    events: Oid,
    lower: &str,
    mode: LogMode,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "SELECT history_install_triggers($1::oid::regclass, $2::oid::regclass, $3::text::timestamptz, $4)",
        tasks,
        events,
        lower,
        mode.as_str()
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "UPDATE history_ranges SET log_mode = $2 WHERE tasks_relid = $1",
        tasks,
        mode.as_str()
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A new range's change-log mode: `live` while its end is still to come by `now`, else `all`.
fn mode_for(upper: &str, now: DateTime<Utc>) -> LogMode {
    match parse_instant(upper) {
        Some(upper) if upper <= now => LogMode::All,
        _ if upper == "infinity" => LogMode::All,
        _ => LogMode::Live,
    }
}

/// `FOR VALUES FROM (..) TO (..)` for bounds given as SQL text (`-infinity`/`infinity` become
/// MINVALUE/MAXVALUE).
fn for_values(lower: &str, upper: &str) -> String {
    let edge = |text: &str, infinite: &str, sentinel: &str| {
        if text == infinite {
            sentinel.to_string()
        } else {
            format!("'{}'", text.replace('\'', "''"))
        }
    };
    format!(
        "FOR VALUES FROM ({}) TO ({})",
        edge(lower, "-infinity", "MINVALUE"),
        edge(upper, "infinity", "MAXVALUE")
    )
}

/// Attaches a range's two tables to the parents.
pub(crate) async fn attach(
    conn: &mut PgConnection,
    tasks: Oid,
    events: Oid,
    lower: &str,
    upper: &str,
) -> Result<(), sqlx::Error> {
    let (tasks, events) = relation_names(&mut *conn, tasks, events).await?;
    sqlx::Executor::execute(
        &mut *conn,
        attach_statements(&tasks, &events, lower, upper).as_str(),
    )
    .await?;
    Ok(())
}

/// The statements that attach a range's two tables (named as SQL identifiers) to the parents.
pub(crate) fn attach_statements(tasks: &str, events: &str, lower: &str, upper: &str) -> String {
    let bounds = for_values(lower, upper);
    format!("ALTER TABLE tasks ATTACH PARTITION {tasks} {bounds};\nALTER TABLE task_events ATTACH PARTITION {events} {bounds};\n")
}

/// A new range as [`record`] records it.
pub(crate) struct NewRange<'a> {
    pub tables: (Oid, Oid),
    pub lower: &'a str,
    pub upper: &'a str,
    pub kind: &'a str,
    pub rows: i64,
    /// Its facts are exact as they are (an empty range), rather than to be rebuilt.
    pub settled: bool,
    /// The mode its triggers were installed in.
    pub log_mode: LogMode,
}

/// Records a new range in `history_ranges`.
pub(crate) async fn record(
    conn: &mut PgConnection,
    range: NewRange<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO history_ranges (tasks_relid, events_relid, lower, upper, kind, rows, settled_at, log_mode)
         VALUES ($1, $2, $3::text::timestamptz, $4::text::timestamptz, $5, $6, CASE WHEN $7 THEN now() END, $8)",
        range.tables.0,
        range.tables.1,
        range.lower,
        range.upper,
        range.kind,
        range.rows,
        range.settled,
        range.log_mode.as_str()
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What carving days out of the future range did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carved {
    /// The days created (a first range up to midnight when the future range started mid-day is
    /// not counted).
    pub days: Vec<NaiveDate>,
    /// Rows moved out of the future range into them (written at dates ahead of the days made
    /// ahead, or while the engine did not run): normally none.
    pub rows_moved: i64,
    /// How long the parents' lock was held.
    pub locked: Duration,
}

/// Creates a range for every day from the start of the future range through `through`, in the
/// caller's transaction (which must hold the layout lock), moving their rows out of the future
/// range. Holds the parents' lock, acquired within `lock_timeout`, for the DETACH and ATTACH and
/// for reading the future range's rows (normally none). Nothing to do when the future range
/// already starts after `through`.
pub async fn carve_days(
    conn: &mut PgConnection,
    through: NaiveDate,
    lock_timeout: Duration,
) -> Result<Carved, sqlx::Error> {
    let ranges = all(&mut *conn).await?;
    let Some(future) = ranges
        .into_iter()
        .find(|r| r.kind == super::RangeKind::Future)
    else {
        return Err(sqlx::Error::Protocol(
            "history_ranges has no future range".into(),
        ));
    };
    let start = future.lower.expect("the future range has a lower bound");
    let end = day_start(through + chrono::Duration::days(1));
    if start >= end {
        return Ok(Carved::default());
    }
    // Pieces: up to the next midnight if the future range starts mid-day, then whole days.
    let mut pieces = Vec::new();
    let mut lower = start;
    while lower < end {
        let next = day_start(lower.date_naive() + chrono::Duration::days(1));
        pieces.push((lower, next));
        lower = next;
    }
    let mut created = Vec::new();
    for (lower, upper) in &pieces {
        // Days to be filled: live until their end has passed and their facts are rebuilt.
        created.push(
            create_tables(
                &mut *conn,
                &lower.to_rfc3339(),
                &upper.to_rfc3339(),
                "",
                LogMode::Live,
            )
            .await?,
        );
    }

    // Row locks first: under the parents' lock nothing may wait for one (see the module docs).
    sqlx::query!(
        r#"SELECT 1 AS "locked!" FROM history_ranges WHERE tasks_relid = $1 FOR UPDATE"#,
        future.tasks_relid
    )
    .fetch_optional(&mut *conn)
    .await?;
    lock_parents(
        &mut *conn,
        &[&future.tasks_name, &future.events_name],
        lock_timeout,
    )
    .await?;
    let started = std::time::Instant::now();
    verify_bounds(&mut *conn, &future).await?;
    engine_write(&mut *conn).await?;
    let (future_tasks, future_events) = (&future.tasks_name, &future.events_name);
    sqlx::query(&format!(
        "ALTER TABLE tasks DETACH PARTITION {future_tasks}"
    ))
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "ALTER TABLE task_events DETACH PARTITION {future_events}"
    ))
    .execute(&mut *conn)
    .await?;
    let end_text = end.to_rfc3339();
    sqlx::query!(
        "UPDATE history_ranges SET lower = $2::text::timestamptz WHERE tasks_relid = $1",
        future.tasks_relid,
        end_text
    )
    .execute(&mut *conn)
    .await?;
    let mut carved = Carved::default();
    for ((lower, upper), (tasks, events)) in pieces.iter().zip(created) {
        let (lower_text, upper_text) = (lower.to_rfc3339(), upper.to_rfc3339());
        let names = relation_names(&mut *conn, tasks, events).await?;
        let moved: i64 = sqlx::query_scalar(&format!(
            "WITH moved AS (DELETE FROM {future_tasks} WHERE inserted_at < $1::timestamptz RETURNING *),
                  ins AS (INSERT INTO {} SELECT * FROM moved RETURNING 1)
             SELECT count(*) FROM ins",
            names.0
        ))
        .bind(&upper_text)
        .fetch_one(&mut *conn)
        .await?;
        sqlx::query(&format!(
            "WITH moved AS (DELETE FROM {future_events} WHERE task_inserted_at < $1::timestamptz RETURNING *)
             INSERT INTO {} SELECT * FROM moved",
            names.1
        ))
        .bind(&upper_text)
        .execute(&mut *conn)
        .await?;
        attach(&mut *conn, tasks, events, &lower_text, &upper_text).await?;
        // Empty, its facts are exact; with rows moved in, they are rebuilt once settled.
        let day = NewRange {
            tables: (tasks, events),
            lower: &lower_text,
            upper: &upper_text,
            kind: "range",
            rows: moved,
            settled: moved == 0,
            log_mode: LogMode::Live,
        };
        record(&mut *conn, day).await?;
        carved.rows_moved += moved;
        if lower.time() == NaiveTime::MIN {
            carved.days.push(lower.date_naive());
        }
    }
    // The future range now starts at `end`: its CHECK says so (this reads what is left in it,
    // normally nothing), and ATTACH can rely on it.
    for (table, column) in [
        (future_tasks, "inserted_at"),
        (future_events, "task_inserted_at"),
    ] {
        sqlx::query(&format!(
            "ALTER TABLE {table} DROP CONSTRAINT history_range,
                 ADD CONSTRAINT history_range CHECK ({column} >= '{end_text}'::timestamptz)"
        ))
        .execute(&mut *conn)
        .await?;
    }
    attach(
        &mut *conn,
        future.tasks_relid,
        future.events_relid,
        &end_text,
        "infinity",
    )
    .await?;
    set_log_mode(
        &mut *conn,
        future.tasks_relid,
        future.events_relid,
        &end_text,
        LogMode::All,
    )
    .await?;
    sqlx::query!(
        "UPDATE history_ranges SET rows = greatest(rows - $2, 0) WHERE tasks_relid = $1",
        future.tasks_relid,
        carved.rows_moved
    )
    .execute(&mut *conn)
    .await?;
    if carved.rows_moved > 0 {
        sqlx::query!(
            "UPDATE history_ranges SET settled_at = NULL WHERE tasks_relid = $1",
            future.tasks_relid
        )
        .execute(&mut *conn)
        .await?;
    }
    carved.locked = started.elapsed();
    Ok(carved)
}

/// Fails unless `range`'s partitions are attached with the bounds the engine recorded: the engine
/// never detaches or rewrites a partition whose catalog bounds it did not expect.
pub(crate) async fn verify_bounds(
    conn: &mut PgConnection,
    range: &Range,
) -> Result<(), sqlx::Error> {
    let expected = for_values(&range.lower_text(), &range.upper_text());
    let rows: Vec<(String, Option<String>)> = sqlx::query!(
        r#"SELECT c.oid::regclass::text AS "name!", (SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i
                                        WHERE i.inhrelid = c.oid AND i.inhparent IN ('tasks'::regclass, 'task_events'::regclass)) AS "bound?"
         FROM pg_class c WHERE c.oid IN ($1, $2)"#,
        range.tasks_relid,
        range.events_relid
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|row| (row.name, row.bound))
    .collect();
    let default = range.kind == super::RangeKind::Default;
    for (name, bound) in &rows {
        let matches = match bound.as_deref() {
            Some("DEFAULT") => default,
            Some(bound) => !default && same_bounds(bound, &expected),
            None => false,
        };
        if !matches {
            return Err(sqlx::Error::Protocol(format!(
                "partition {name} has bounds {bound:?} in the catalog, not the recorded {expected}; leaving it alone"
            )));
        }
    }
    if rows.len() != 2 {
        return Err(sqlx::Error::Protocol(format!(
            "a partition of {} is missing from the catalog",
            range.tasks_name
        )));
    }
    Ok(())
}

/// Whether the catalog's `FOR VALUES ...` text names the same instants as `expected` (written by
/// [`for_values`] from RFC 3339 text): compared instant by instant.
fn same_bounds(catalog: &str, expected: &str) -> bool {
    let instants = |text: &str| -> Option<Vec<Option<DateTime<Utc>>>> {
        let inner = text.strip_prefix("FOR VALUES FROM (")?;
        let (from, to) = inner.split_once(") TO (")?;
        let to = to.strip_suffix(')')?;
        [from, to]
            .iter()
            .map(|edge| match *edge {
                "MINVALUE" | "MAXVALUE" => Some(None),
                quoted => {
                    let text = quoted.strip_prefix('\'')?.strip_suffix('\'')?;
                    parse_instant(text).map(Some)
                }
            })
            .collect()
    };
    matches!((instants(catalog), instants(expected)), (Some(a), Some(b)) if a == b)
}

/// An instant as PostgreSQL or RFC 3339 writes it (`2026-11-01 00:00:00+00`, `...T00:00:00+00:00`).
fn parse_instant(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// Whether the layout needs nothing: the catalog's partitions are the recorded ranges, the
/// ranges leave no hole, and the future range starts after `through`. One read, so that a run
/// with nothing to change takes no lock.
pub async fn in_shape(
    executor: impl PgExecutor<'_>,
    through: NaiveDate,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT NOT EXISTS (SELECT 1 FROM pg_inherits i
                            WHERE i.inhparent IN ('tasks'::regclass, 'task_events'::regclass)
                              AND NOT EXISTS (SELECT 1 FROM history_ranges r WHERE i.inhrelid IN (r.tasks_relid, r.events_relid)))
            AND NOT EXISTS (SELECT 1 FROM history_ranges r
                            WHERE NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = r.tasks_relid AND NOT i.inhdetachpending)
                               OR NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = r.events_relid AND NOT i.inhdetachpending))
            AND NOT EXISTS (SELECT 1 FROM (SELECT upper, lead(lower) OVER (ORDER BY lower) AS next FROM history_ranges) g
                            WHERE g.next IS NOT NULL AND g.next <> g.upper)
            AND (SELECT lower FROM history_ranges WHERE kind = 'future') >= $1 AS "in_shape!""#,
        day_start(through + chrono::Duration::days(1))
    )
    .fetch_one(executor)
    .await
}

/// What [`reconcile`] found between the catalog and `history_ranges`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Partitions attached by hand, now managed (their facts are rebuilt before use).
    pub adopted: Vec<String>,
    /// Ranges whose partitions are no longer attached (detached by hand): forgotten, never touched.
    pub forgotten: Vec<String>,
    /// Holes in the managed area, each filled with an empty range so an insert there cannot fail.
    pub filled: Vec<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Reconciled {
    pub fn is_empty(&self) -> bool {
        self.adopted.is_empty() && self.forgotten.is_empty() && self.filled.is_empty()
    }
}

/// Brings `history_ranges` in line with the catalog, in the caller's transaction (which must hold
/// the layout lock): forgets ranges an operator detached (the table is left as it is), adopts
/// partition pairs an operator attached, and fills every hole in the managed area with an empty
/// range, so that every instant from the default partition's bound on has a partition. Cheap when
/// nothing changed: one read of the catalog.
pub async fn reconcile(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<Reconciled, sqlx::Error> {
    let mut reconciled = Reconciled::default();
    // Attached partitions of each parent with their bound text, and the recorded ranges.
    let attached: Vec<(Oid, String, String, String)> = sqlx::query!(
        r#"SELECT c.oid, c.oid::regclass::text AS "name!", p.relname::text AS "parent!",
                  pg_get_expr(c.relpartbound, c.oid) AS "bound!"
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
         WHERE i.inhparent IN ('tasks'::regclass, 'task_events'::regclass) AND NOT i.inhdetachpending"#
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|row| (row.oid, row.name, row.parent, row.bound))
    .collect();
    let recorded = all(&mut *conn).await?;
    let is_attached = |relid: Oid| attached.iter().any(|(oid, ..)| *oid == relid);
    for range in &recorded {
        if !is_attached(range.tasks_relid) || !is_attached(range.events_relid) {
            sqlx::query!(
                "DELETE FROM history_ranges WHERE tasks_relid = $1",
                range.tasks_relid
            )
            .execute(&mut *conn)
            .await?;
            sqlx::query!(
                "DELETE FROM history_range_tenants WHERE tasks_relid = $1",
                range.tasks_relid
            )
            .execute(&mut *conn)
            .await?;
            sqlx::query!(
                "DELETE FROM history_changes WHERE relid IN ($1, $2)",
                range.tasks_relid,
                range.events_relid
            )
            .execute(&mut *conn)
            .await?;
            reconciled.forgotten.push(range.tasks_name.clone());
        }
    }
    let known = |relid: Oid| {
        recorded
            .iter()
            .any(|r| r.tasks_relid == relid || r.events_relid == relid)
    };
    for (relid, name, parent, bound) in attached
        .iter()
        .filter(|(oid, _, parent, _)| parent == "tasks" && !known(*oid))
    {
        let _ = parent;
        let twin = attached.iter().find(|(oid, _, parent, other)| {
            parent == "task_events" && other == bound && !known(*oid)
        });
        let Some((events, ..)) = twin else { continue };
        let Some((lower, upper)) = bound_texts(bound) else {
            continue;
        };
        // Written to before the engine knew it: live, until its facts are rebuilt.
        let kind = if upper == "infinity" {
            "future"
        } else {
            "range"
        };
        let adopted = NewRange {
            tables: (*relid, *events),
            lower: &lower,
            upper: &upper,
            kind,
            rows: 0,
            settled: false,
            log_mode: LogMode::Live,
        };
        record(&mut *conn, adopted).await?;
        set_log_mode(&mut *conn, *relid, *events, &lower, LogMode::Live).await?;
        reconciled.adopted.push(name.clone());
    }
    // Holes between consecutive ranges.
    let ranges = all(&mut *conn).await?;
    for pair in ranges.windows(2) {
        let (Some(gap_start), Some(gap_end)) = (pair[0].upper, pair[1].lower) else {
            continue;
        };
        if gap_start < gap_end {
            let (lower, upper) = (gap_start.to_rfc3339(), gap_end.to_rfc3339());
            let mode = mode_for(&upper, now);
            let (tasks, events) = create_tables(&mut *conn, &lower, &upper, "", mode).await?;
            attach(&mut *conn, tasks, events, &lower, &upper).await?;
            let filled = NewRange {
                tables: (tasks, events),
                lower: &lower,
                upper: &upper,
                kind: "range",
                rows: 0,
                settled: true,
                log_mode: mode,
            };
            record(&mut *conn, filled).await?;
            reconciled.filled.push((gap_start, gap_end));
        }
    }
    Ok(reconciled)
}

/// The bounds of a `FOR VALUES FROM ('..') TO ('..')` text as SQL text (`-infinity`/`infinity`
/// for MINVALUE/MAXVALUE), or `None` for anything else (DEFAULT, lists).
fn bound_texts(bound: &str) -> Option<(String, String)> {
    let inner = bound.strip_prefix("FOR VALUES FROM (")?;
    let (from, to) = inner.split_once(") TO (")?;
    let to = to.strip_suffix(')')?;
    let text = |edge: &str, sentinel: &str, infinite: &str| -> Option<String> {
        if edge == sentinel {
            return Some(infinite.into());
        }
        Some(
            edge.strip_prefix('\'')?
                .strip_suffix('\'')?
                .replace("''", "'"),
        )
    };
    Some((
        text(from, "MINVALUE", "-infinity")?,
        text(to, "MAXVALUE", "infinity")?,
    ))
}

/// Moves the start of the managed area back to the start of `to` (a backfill of old history,
/// or a test that seeds past days): creates a day range for every day from `to` up to the
/// default partition's bound, moving the default partition's rows of those days into them, and
/// narrows the default partition's CHECK. Reads the default partition (under the parents' lock,
/// acquired within `lock_timeout`): meant for an operator's backfill, not for routine use. In the
/// caller's transaction, which must hold the layout lock. Returns the days created.
pub async fn extend_back(
    conn: &mut PgConnection,
    to: NaiveDate,
    lock_timeout: Duration,
) -> Result<Vec<NaiveDate>, sqlx::Error> {
    let ranges = all(&mut *conn).await?;
    let Some(default) = ranges.iter().find(|r| r.kind == super::RangeKind::Default) else {
        return Err(sqlx::Error::Protocol(
            "history_ranges has no default range".into(),
        ));
    };
    let bound = default.upper.expect("the default range has an upper bound");
    let start = day_start(to);
    if start >= bound {
        return Ok(Vec::new());
    }
    let mut days = Vec::new();
    let mut created = Vec::new();
    let mut lower = start;
    while lower < bound {
        let upper = day_start(lower.date_naive() + chrono::Duration::days(1)).min(bound);
        // Past days, the engine's own rows moved in: every later write is logged.
        created.push((
            lower,
            upper,
            create_tables(
                &mut *conn,
                &lower.to_rfc3339(),
                &upper.to_rfc3339(),
                "",
                LogMode::All,
            )
            .await?,
        ));
        lower = upper;
    }
    sqlx::query!(
        r#"SELECT 1 AS "locked!" FROM history_ranges WHERE tasks_relid = $1 FOR UPDATE"#,
        default.tasks_relid
    )
    .fetch_optional(&mut *conn)
    .await?;
    lock_parents(
        &mut *conn,
        &[&default.tasks_name, &default.events_name],
        lock_timeout,
    )
    .await?;
    engine_write(&mut *conn).await?;
    let start_text = start.to_rfc3339();
    // Rows of the default partition from `start` on move out first, so the narrower CHECK holds.
    sqlx::query(&format!(
        "CREATE TEMPORARY TABLE history_backfill_tasks ON COMMIT DROP AS
         WITH moved AS (DELETE FROM {} WHERE inserted_at >= $1::timestamptz RETURNING *) SELECT * FROM moved",
        default.tasks_name
    ))
    .bind(&start_text)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "CREATE TEMPORARY TABLE history_backfill_events ON COMMIT DROP AS
         WITH moved AS (DELETE FROM {} WHERE task_inserted_at >= $1::timestamptz RETURNING *) SELECT * FROM moved",
        default.events_name
    ))
    .bind(&start_text)
    .execute(&mut *conn)
    .await?;
    // A temporary table of this transaction: not in the schema the macros check against.
    let moved: i64 = sqlx::query_scalar("SELECT count(*) FROM history_backfill_tasks")
        .fetch_one(&mut *conn)
        .await?;
    for (table, column) in [
        (&default.tasks_name, "inserted_at"),
        (&default.events_name, "task_inserted_at"),
    ] {
        sqlx::query(&format!(
            "ALTER TABLE {table} DROP CONSTRAINT history_range, ADD CONSTRAINT history_range CHECK ({column} < '{start_text}'::timestamptz)"
        ))
        .execute(&mut *conn)
        .await?;
    }
    set_log_mode(
        &mut *conn,
        default.tasks_relid,
        default.events_relid,
        "-infinity",
        LogMode::All,
    )
    .await?;
    // Facts change only where rows moved: those ranges are rebuilt once settled.
    sqlx::query!(
        "UPDATE history_ranges SET upper = $2::text::timestamptz, settled_at = CASE WHEN $3 THEN NULL ELSE settled_at END WHERE tasks_relid = $1",
        default.tasks_relid,
        start_text,
        moved > 0
    )
    .execute(&mut *conn)
    .await?;
    for (lower, upper, (tasks, events)) in created {
        let (lower_text, upper_text) = (lower.to_rfc3339(), upper.to_rfc3339());
        attach(&mut *conn, tasks, events, &lower_text, &upper_text).await?;
        let day = NewRange {
            tables: (tasks, events),
            lower: &lower_text,
            upper: &upper_text,
            kind: "range",
            rows: 0,
            settled: moved == 0,
            log_mode: LogMode::All,
        };
        record(&mut *conn, day).await?;
        if lower.time() == NaiveTime::MIN && upper - lower == chrono::Duration::days(1) {
            days.push(lower.date_naive());
        }
    }
    // Temporary tables of this transaction: not in the schema the macros check against.
    sqlx::query("INSERT INTO tasks SELECT * FROM history_backfill_tasks")
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO task_events OVERRIDING SYSTEM VALUE SELECT * FROM history_backfill_events",
    )
    .execute(&mut *conn)
    .await?;
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_compare_by_instant_whatever_the_spelling() {
        let catalog = "FOR VALUES FROM ('2026-11-01 00:00:00+00') TO ('2026-11-02 00:00:00+00')";
        assert!(same_bounds(
            catalog,
            &for_values("2026-11-01T00:00:00+00:00", "2026-11-02T00:00:00+00:00")
        ));
        assert!(!same_bounds(
            catalog,
            &for_values("2026-11-01T00:00:00+00:00", "2026-11-03T00:00:00+00:00")
        ));
        assert!(same_bounds(
            "FOR VALUES FROM ('2026-11-08 00:00:00+00') TO (MAXVALUE)",
            &for_values("2026-11-08T00:00:00Z", "infinity")
        ));
        assert!(!same_bounds(
            "DEFAULT",
            &for_values("-infinity", "2026-11-08T00:00:00Z")
        ));
        assert_eq!(
            bound_texts("FOR VALUES FROM ('2026-11-08 00:00:00+00') TO (MAXVALUE)"),
            Some(("2026-11-08 00:00:00+00".into(), "infinity".into()))
        );
    }
}
