//! Row deletes of run history: one statement (so one transaction) deletes a batch of tasks with
//! their events and queue items, so no crash can leave orphans behind. What is due is the rule's
//! ([`crate::rule`]); each statement here is a way for due rows to leave.
//!
//! A batch works on one tenant's rows in one range, naming the range's partitions (a plan over
//! one table costs a fraction of a millisecond; over the parent it grows with the partitions),
//! while holding the range's `history_ranges` row in share mode: a range being swapped by a
//! rewrite is skipped (the batch reports it missing), never waited for or failed on. If the range
//! was replaced meanwhile its row is gone and the batch touches nothing, whichever table its names
//! now denote; if its bounds moved (a carve), or its tables were dropped, the batch reports it
//! missing too. Every victim is checked by the rule against the tenant's row and the holds as they
//! are when the batch runs, and the batch commits only through [`rule::confirm`]: a hold or a
//! window change that committed before the commit binds it.

use sqlx::postgres::types::Oid;
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use super::dependents::{self, Victims};
use crate::receipts::{self, RunReceipt};
use crate::rule::{self, Rule};
use crate::sql::Sql;
use crate::tenants::FinalStatus;

/// How a pair's batches walk its rows, and where they have reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walk {
    /// A live tenant's final tasks of one status by finish instant (`tasks_due_idx`: tenant,
    /// status, instant), up to that status's cutoff, from the instant reached (PostgreSQL text, so
    /// `-infinity` round-trips): only due tasks are read, whatever the other statuses keep.
    Retained { status: FinalStatus, after: String },
    /// Every task of a tenant deleted longer ago than the grace, by id (`tasks_tenant_id_id_idx`).
    Purged { after: Option<Uuid> },
}

impl Walk {
    pub fn retained(status: FinalStatus) -> Walk {
        Walk::Retained {
            status,
            after: "-infinity".into(),
        }
    }

    pub fn purged() -> Walk {
        Walk::Purged { after: None }
    }
}

/// What one batch deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub tasks: i64,
    pub events: i64,
    pub queue_items: i64,
    pub payloads: i64,
    pub logs: i64,
    /// Payloads stored outside the database: their objects' deletion is now in the outbox.
    pub objects: i64,
}

/// One batch's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub deleted: Deleted,
    /// Tasks the batch looked at (locked rows of others skipped): fewer than its limit ends the walk.
    pub examined: i64,
    /// The range is being swapped or carved, is gone, or its bounds moved since it was planned:
    /// nothing was done, the pair must be planned again.
    /// If its tables were dropped, the statement failed and so has the caller's transaction:
    /// nothing more may run in it.
    pub range_missing: bool,
}

#[derive(FromRow)]
struct BatchRow {
    tasks: i64,
    events: i64,
    queue_items: i64,
    payloads: i64,
    logs: i64,
    objects: i64,
    examined: i64,
    present: bool,
    last_key: Option<String>,
    last_id: Option<Uuid>,
    rules_version: i64,
}

/// The rows of a pair to delete: those of `tenant_id` in the range whose partitions are
/// `tasks_relid` (named `tasks_table`) and `events_table`.
#[derive(Debug, Clone)]
pub struct PairRef {
    pub tasks_relid: Oid,
    /// The range's bounds as planned (SQL text): a batch finds the range missing once they have
    /// changed (a carve moves the future range's start, and its rows, elsewhere).
    pub lower: String,
    pub upper: String,
    pub tasks_table: String,
    pub events_table: String,
    pub tenant_id: Uuid,
}

impl PairRef {
    pub fn new(range: &super::Range, tenant_id: Uuid) -> PairRef {
        PairRef {
            tasks_relid: range.tasks_relid,
            lower: range.lower_text(),
            upper: range.upper_text(),
            tasks_table: range.tasks_name.clone(),
            events_table: range.events_name.clone(),
            tenant_id,
        }
    }
}

/// Deletes up to `limit` due tasks of the pair, with their events and queue items, walking as
/// `walk` says and moving it on, adds what it deleted to the run's receipts, and confirms the
/// rules (see [`rule::confirm`]); the caller commits.
///
/// Only due tasks are candidates (the index bound is the status's window; the rule, with the
/// holds, filters the rows passed): every candidate locked is deleted, so the walk's cursor always
/// moves on, and a kept row is never locked.
pub async fn delete_batch(
    conn: &mut PgConnection,
    pair: &PairRef,
    walk: &mut Walk,
    rule: &Rule,
    limit: u32,
    receipt: &RunReceipt,
) -> Result<Batch, sqlx::Error> {
    let mut sql = Sql::new(
        "WITH r AS MATERIALIZED ({planned}),
         tn AS MATERIALIZED (SELECT * FROM tenants WHERE id = {tenant}),
         candidates AS MATERIALIZED (
             SELECT c.* FROM r, tn CROSS JOIN LATERAL (
                 SELECT t.id, t.tenant_id, t.inserted_at, t.status, t.finished_at FROM {tasks} t
                 WHERE t.tenant_id = tn.id AND {access} AND {candidate_due}
                 ORDER BY {order}
                 LIMIT {limit}
                 FOR UPDATE OF t SKIP LOCKED) c
         ),
         victims AS MATERIALIZED (
             SELECT c.id, c.inserted_at FROM candidates c, tn WHERE {due}
         ),
         {dependents},
         events AS (
             DELETE FROM {events} e USING victims v
             WHERE e.task_id = v.id AND e.task_inserted_at = v.inserted_at RETURNING 1
         ), queue AS (
             DELETE FROM queue_items q USING victims v
             WHERE q.task_id = v.id AND q.task_inserted_at = v.inserted_at RETURNING 1
         ), gone AS (
             DELETE FROM {tasks2} t USING victims v
             WHERE t.id = v.id AND t.inserted_at = v.inserted_at
             RETURNING t.id, coalesce(t.finished_at, t.inserted_at) AS key
         ), receipt AS (
             {receipt}
         )
         SELECT (SELECT count(*) FROM gone) AS tasks, (SELECT count(*) FROM events) AS events,
                (SELECT count(*) FROM queue) AS queue_items, (SELECT count(*) FROM payloads) AS payloads,
                (SELECT count(*) FROM logs) AS logs, (SELECT count(*) FROM payloads WHERE external) AS objects,
                (SELECT count(*) FROM candidates) AS examined,
                EXISTS (SELECT 1 FROM r) AS present,
                (SELECT max(key)::text FROM gone) AS last_key, (SELECT max(id::text)::uuid FROM gone) AS last_id,
                {version} AS rules_version",
    );
    match walk {
        Walk::Retained { status, after } => {
            sql.with(
                "access",
                crate::sql::Fragment::text(format!(
                    "t.status = '{}' AND coalesce(t.finished_at, t.inserted_at) < ",
                    status.as_str()
                ))
                .then(rule.status_cutoff(*status, "tn"))
                .push(" AND coalesce(t.finished_at, t.inserted_at) >= ")
                .bind(after.clone())
                .push("::timestamptz"),
            )
            .raw("order", "coalesce(t.finished_at, t.inserted_at)");
        }
        Walk::Purged { after } => {
            // `>=`: a task id may repeat with another inserted_at; rows already deleted at that id
            // are passed again, once.
            sql.with(
                "access",
                crate::sql::Fragment::text("t.id >= ").bind(after.unwrap_or_else(Uuid::nil)),
            )
            .raw("order", "t.id");
        }
    }
    sql.with("planned", planned_range(pair.tasks_relid, &pair.lower, &pair.upper))
        .bind("tenant", pair.tenant_id)
        .raw("tasks", &pair.tasks_table)
        .raw("tasks2", &pair.tasks_table)
        .raw("events", &pair.events_table)
        .bind("limit", i64::from(limit))
        .with("candidate_due", rule.task_due("t", "tn"))
        .with("due", rule.task_due("c", "tn"))
        .with(
            "receipt",
            receipts::add_with_dependents(
                receipt,
                "SELECT tn.id, CASE WHEN tn.deleted_at IS NULL THEN 'retention' ELSE 'deleted-tenants' END,
                        g.tasks, (SELECT count(*) FROM events), (SELECT count(*) FROM queue),
                        (SELECT count(*) FROM payloads), (SELECT count(*) FROM logs),
                        (SELECT count(*) FROM payloads WHERE external), g.oldest, g.newest
                 FROM tn, (SELECT count(*) AS tasks, min(key) AS oldest, max(key) AS newest FROM gone) g
                 WHERE g.tasks > 0",
            ),
        )
        .with(
            "dependents",
            dependents::delete_ctes(&Victims {
                cte: "victims",
                id: "id",
                inserted_at: "inserted_at",
                lower: pair.lower.clone(),
                upper: pair.upper.clone(),
                only_if_gone: false,
                unless_held_now: None,
                up_to_archived: false,
            }),
        )
        .raw("version", rule::VERSION);
    let result: Result<BatchRow, sqlx::Error> = sql.build_query_as().fetch_one(&mut *conn).await;
    let row = match result {
        Ok(row) => row,
        Err(error) if is_undefined_table(&error) => {
            return Ok(Batch {
                deleted: Deleted::default(),
                examined: 0,
                range_missing: true,
            });
        }
        Err(error) => return Err(error),
    };
    if row.tasks > 0 {
        rule::confirm(conn, row.rules_version).await?;
    }
    match walk {
        Walk::Retained { after, .. } => {
            if let Some(key) = row.last_key {
                *after = key;
            }
        }
        Walk::Purged { after } => {
            if row.last_id.is_some() {
                *after = row.last_id;
            }
        }
    }
    Ok(Batch {
        deleted: Deleted {
            tasks: row.tasks,
            events: row.events,
            queue_items: row.queue_items,
            payloads: row.payloads,
            logs: row.logs,
            objects: row.objects,
        },
        examined: row.examined,
        range_missing: !row.present,
    })
}

/// Tasks one tenant lost in a block-range batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantGone {
    pub tenant_id: Uuid,
    /// The tenant was deleted (so its rows went by the deleted-tenants part of the rule).
    pub purged: bool,
    pub tasks: i64,
}

/// What one block-range batch of a range sweep deleted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SweepBatch {
    pub tenants: Vec<TenantGone>,
    pub events: i64,
    pub queue_items: i64,
    pub payloads: i64,
    pub logs: i64,
    pub objects: i64,
    /// As in [`Batch::range_missing`].
    pub range_missing: bool,
}

#[derive(FromRow)]
struct SweepRow {
    events: i64,
    queue_items: i64,
    payloads: i64,
    logs: i64,
    objects: i64,
    present: bool,
    tenant_ids: Vec<Uuid>,
    purged: Vec<bool>,
    tasks: Vec<i64>,
    rules_version: i64,
}

/// Deletes every due task on the pages `blocks` of the range's tasks partition, whatever its
/// tenant, with their events and queue items: one statement, like [`delete_batch`], and the same
/// rule checked against each tenant's row as it is now; then confirms the rules.
///
/// A pass over a range in block ranges (a Tid Range Scan reads exactly those pages) costs what one
/// bare DELETE of the range costs, where walking it tenant by tenant through the indexes costs an
/// index probe and a lock per task and a statement per tenant. A task that a writer holds locked is
/// waited for (bounded by `lock_timeout`), then the rule is checked again on its newest version.
/// Events and queue items go by a join on the batch's tasks (unique keys: no semi-join's
/// de-duplication, 7% faster): an index probe each (~5 µs an event, where the bare DELETE's hash
/// join spends ~2.5). Planned once per connection (generic plans): planning the statement costs
/// ~3 ms, a batch 10-50 ms. Hashing the batch against one read of the range's events partition
/// (nested loops off) was 25-35% faster by hand on a day once a batch held an eighth of it, but
/// no faster in the engine, with generic or custom plans, at 50 or 200 ms batches.
///
/// Statements on disjoint block ranges of the same range may run at once (a parallel walk): they
/// share only their receipts' rows, which each statement locks in tenant order, so that two of
/// them wait for each other but never deadlock.
pub async fn delete_block_range(
    conn: &mut PgConnection,
    range: &super::Range,
    blocks: crate::heap::BlockRange,
    rule: &Rule,
    receipt: &RunReceipt,
) -> Result<SweepBatch, sqlx::Error> {
    let (from, to) = blocks.tids();
    let mut sql = Sql::new(
        "WITH r AS MATERIALIZED ({planned}),
         gone AS (
             DELETE FROM {tasks} t USING tenants tn
             WHERE EXISTS (SELECT 1 FROM r) AND t.ctid >= {from}::tid AND t.ctid < {to}::tid
               AND tn.id = t.tenant_id AND {due}
             RETURNING t.id, t.inserted_at, t.tenant_id, tn.deleted_at IS NOT NULL AS purged,
                       coalesce(t.finished_at, t.inserted_at) AS key
         ), {dependents}, events AS (
             DELETE FROM {events} e USING gone g WHERE e.task_id = g.id AND e.task_inserted_at = g.inserted_at
             RETURNING e.tenant_id
         ), queue AS (
             DELETE FROM queue_items q USING gone g WHERE q.task_id = g.id AND q.task_inserted_at = g.inserted_at
             RETURNING q.tenant_id
         ), by_tenant AS (
             SELECT tenant_id, purged, count(*) AS tasks, min(key) AS oldest, max(key) AS newest FROM gone GROUP BY tenant_id, purged
         ), receipt AS (
             {receipt}
         )
         SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM queue) AS queue_items,
                (SELECT count(*) FROM payloads) AS payloads, (SELECT count(*) FROM logs) AS logs,
                (SELECT count(*) FROM payloads WHERE external) AS objects,
                EXISTS (SELECT 1 FROM r) AS present,
                coalesce((SELECT array_agg(tenant_id ORDER BY tenant_id) FROM by_tenant), '{{}}') AS tenant_ids,
                coalesce((SELECT array_agg(purged ORDER BY tenant_id) FROM by_tenant), '{{}}') AS purged,
                coalesce((SELECT array_agg(tasks ORDER BY tenant_id) FROM by_tenant), '{{}}') AS tasks,
                {version} AS rules_version",
    );
    sql.with("planned", planned_range(range.tasks_relid, &range.lower_text(), &range.upper_text()))
        .raw("tasks", &range.tasks_name)
        .raw("events", &range.events_name)
        .bind("from", from)
        .bind("to", to)
        .with("due", rule.task_due("t", "tn"))
        .with(
            "receipt",
            receipts::add_with_dependents(
                receipt,
                &format!("SELECT b.tenant_id, CASE WHEN b.purged THEN 'deleted-tenants' ELSE 'retention' END, b.tasks,
                        coalesce(e.n, 0), coalesce(q.n, 0), coalesce(d.payloads, 0), coalesce(d.logs, 0),
                        coalesce(d.objects, 0), b.oldest, b.newest
                 FROM by_tenant b
                 LEFT JOIN (SELECT tenant_id, count(*) AS n FROM events GROUP BY tenant_id) e ON e.tenant_id = b.tenant_id
                 LEFT JOIN (SELECT tenant_id, count(*) AS n FROM queue GROUP BY tenant_id) q ON q.tenant_id = b.tenant_id
                 LEFT JOIN {by_tenant} d ON d.tenant_id = b.tenant_id", by_tenant = dependents::BY_TENANT),
            ),
        )
        .with(
            "dependents",
            dependents::delete_ctes(&Victims {
                cte: "gone",
                id: "id",
                inserted_at: "inserted_at",
                lower: range.lower_text(),
                upper: range.upper_text(),
                only_if_gone: false,
                unless_held_now: None,
                up_to_archived: false,
            }),
        )
        .raw("version", rule::VERSION);
    let result: Result<SweepRow, sqlx::Error> = sql.build_query_as().fetch_one(&mut *conn).await;
    let row = match result {
        Ok(row) => row,
        Err(error) if is_undefined_table(&error) => {
            return Ok(SweepBatch {
                range_missing: true,
                ..SweepBatch::default()
            })
        }
        Err(error) => return Err(error),
    };
    if !row.tenant_ids.is_empty() {
        rule::confirm(conn, row.rules_version).await?;
    }
    let tenants = row
        .tenant_ids
        .into_iter()
        .zip(row.purged)
        .zip(row.tasks)
        .map(|((tenant_id, purged), tasks)| TenantGone {
            tenant_id,
            purged,
            tasks,
        })
        .collect();
    Ok(SweepBatch {
        tenants,
        events: row.events,
        queue_items: row.queue_items,
        payloads: row.payloads,
        logs: row.logs,
        objects: row.objects,
        range_missing: !row.present,
    })
}

/// The range a batch was planned on, still as planned: its `history_ranges` row (relid `relid`)
/// with the bounds `lower` and `upper` (SQL text), in share mode. Empty when the range is being
/// swapped or carved (its row is locked), was replaced (its row is gone), or had its bounds moved
/// (a carve of the future range moves its start, and the rows before it, to new ranges).
fn planned_range(relid: Oid, lower: &str, upper: &str) -> crate::sql::Fragment {
    crate::sql::Fragment::text("SELECT 1 FROM history_ranges WHERE tasks_relid = ")
        .bind(relid)
        .push(" AND lower = ")
        .bind(lower.to_string())
        .push("::timestamptz AND upper = ")
        .bind(upper.to_string())
        .push("::timestamptz FOR SHARE SKIP LOCKED")
}

/// Whether a statement named a table that no longer exists (a range dropped meanwhile).
pub fn is_undefined_table(error: &sqlx::Error) -> bool {
    error.as_database_error().and_then(|e| e.code()).as_deref() == Some("42P01")
}

/// The highest event id handed out so far (committed or not), or 0. One read of the sequence.
pub async fn last_event_id(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS "last!" FROM task_events_id_seq"#,
    )
    .fetch_one(executor)
    .await
}

#[derive(FromRow)]
struct OrphanRow {
    deleted: i64,
    walked_to: i64,
    first_undecided: Option<i64>,
    rules_version: i64,
}

/// Deletes the orphan events due by the rule among the first `limit` with ids in `(after,
/// up_to]`, then confirms the rules. Bounded both ways: by a range of ids, so that a batch right
/// after a mass delete, when the index is full of dead entries, costs the ids it passes and not
/// every dead entry up to the next live row; and by rows, so that a range of ids that turns out
/// dense costs no more than `limit` rows.
///
/// The first orphan too young to go is reported (the walk's watermark stays before it); an orphan
/// a hold covers is passed (the late-orphan sweep finds it once the hold has ended).
pub async fn delete_orphan_events_batch(
    conn: &mut PgConnection,
    after: i64,
    up_to: i64,
    limit: u32,
    rule: &Rule,
    receipt: &RunReceipt,
) -> Result<OrphanBatch, sqlx::Error> {
    let mut sql = Sql::new(
        "WITH scanned AS MATERIALIZED (
             SELECT e.id, e.task_inserted_at, e.tenant_id, e.task_id, e.created_at,
                    NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at) AS orphan
             FROM task_events e WHERE e.id > {after} AND e.id <= {up_to} ORDER BY e.id LIMIT {limit}
         ), gone AS (
             DELETE FROM task_events e USING scanned s
             WHERE e.id = s.id AND e.task_inserted_at = s.task_inserted_at AND s.orphan AND {due}
             RETURNING e.tenant_id, e.created_at
         ), receipt AS (
             {receipt}
         )
         SELECT (SELECT count(*) FROM gone) AS deleted,
                CASE WHEN (SELECT count(*) FROM scanned) < {limit2} THEN {up_to2} ELSE (SELECT max(id) FROM scanned) END AS walked_to,
                (SELECT min(s.id) FROM scanned s WHERE s.orphan AND {young}) AS first_undecided,
                {version} AS rules_version",
    );
    sql.bind("after", after)
        .bind("up_to", up_to)
        .bind("up_to2", up_to)
        .bind("limit", i64::from(limit))
        .bind("limit2", i64::from(limit))
        .with("due", rule.orphan_due("e", "tasks"))
        .with("young", rule.orphan_young("s"))
        .with(
            "receipt",
            receipts::add(
                receipt,
                "SELECT g.tenant_id, 'orphan-events', 0, count(*), 0, min(g.created_at), max(g.created_at)
                 FROM gone g GROUP BY g.tenant_id",
            ),
        )
        .raw("version", rule::VERSION);
    let row: OrphanRow = sql.build_query_as().fetch_one(&mut *conn).await?;
    if row.deleted > 0 {
        rule::confirm(conn, row.rules_version).await?;
    }
    Ok(OrphanBatch {
        deleted: row.deleted,
        walked_to: row.walked_to,
        first_undecided: row.first_undecided,
    })
}

/// What one orphan-events batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrphanBatch {
    pub deleted: i64,
    /// The id the walk reached: `up_to`, or the last id examined when the row limit stopped it.
    pub walked_to: i64,
    /// The lowest id of an orphan too young to delete: the watermark may not pass it.
    pub first_undecided: Option<i64>,
}

#[derive(FromRow)]
struct OrphanSweepRow {
    deleted: i64,
    present: bool,
    rules_version: i64,
}

/// Deletes the orphan events due by the rule on the pages `blocks` of `range`'s events partition
/// (their task absent from the range's tasks partition, where it would be), with their receipts,
/// then confirms the rules: one pass over a range's events in block ranges finds every orphan,
/// however it became one (its task deleted after the orphan walk passed it, in a range merged
/// since, or while a hold kept it). Returns the events deleted, or `None` when the range is gone
/// or no longer has the bounds it was listed with (a rewrite swapped it out, a layout change
/// holds it).
pub async fn delete_orphans_in_blocks(
    conn: &mut PgConnection,
    range: &super::Range,
    blocks: crate::heap::BlockRange,
    rule: &Rule,
    receipt: &RunReceipt,
) -> Result<Option<i64>, sqlx::Error> {
    let (from, to) = blocks.tids();
    let mut sql = Sql::new(
        "WITH r AS MATERIALIZED ({planned}),
         gone AS (
             DELETE FROM {events} e
             WHERE EXISTS (SELECT 1 FROM r) AND e.ctid >= {from}::tid AND e.ctid < {to}::tid AND {due}
             RETURNING e.tenant_id, e.created_at
         ), receipt AS (
             {receipt}
         )
         SELECT (SELECT count(*) FROM gone) AS deleted, EXISTS (SELECT 1 FROM r) AS present,
                {version} AS rules_version",
    );
    // Tied to the range as listed: a merge swapped in meanwhile keeps its sources' names, and
    // the detached sources (which its count reads) are not the range's any more.
    sql.with(
        "planned",
        planned_range(range.tasks_relid, &range.lower_text(), &range.upper_text()),
    )
    .raw("events", &range.events_name)
        .bind("from", from)
        .bind("to", to)
        .with("due", rule.orphan_due("e", &range.tasks_name))
        .with(
            "receipt",
            receipts::add(
                receipt,
                "SELECT g.tenant_id, 'orphan-events', 0, count(*), 0, min(g.created_at), max(g.created_at) FROM gone g GROUP BY g.tenant_id",
            ),
        )
        .raw("version", rule::VERSION);
    let row: OrphanSweepRow = match sql.build_query_as().fetch_one(&mut *conn).await {
        Ok(row) => row,
        Err(error) if is_undefined_table(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    if !row.present {
        return Ok(None);
    }
    if row.deleted > 0 {
        rule::confirm(conn, row.rules_version).await?;
    }
    Ok(Some(row.deleted))
}
