//! The count, after the swap: the detached sources, which nothing writes to any more, walked in
//! block ranges and their rows decided by the rule as the swap recorded it (the rewrite's instant,
//! each tenant's rules, the holds then in force). The new range holds exactly what that rule
//! keeps of them, so what it finds due is exactly what went: the receipts are exact, whatever
//! writers did to the new range since. Each chunk adds to the receipts of the run that started
//! the rewrite, and deletes the queue items of the tasks that went (by the queue-items rule as it
//! is now: a hold added since keeps them), in one transaction with its cursor: a crash between
//! chunks loses nothing and counts nothing twice. The chunk's reads lock the detached tables,
//! which are dropped only once the count is done ([`finish`]).

use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

use super::{lock, Phase, Rewrite};
use crate::batch::{self, BatchLimits};
use crate::heap::BlockRange;
use crate::history::dependents::{self, Victims};
use crate::receipts;
use crate::rule::{self, Rule};
use crate::sql::Sql;

/// What went of one tenant under one rule, as a chunk counted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Went {
    pub tenant_id: Uuid,
    /// `retention`, `deleted-tenants` or `orphan-events`.
    pub rule: String,
    pub tasks: i64,
    pub events: i64,
    pub queue_items: i64,
}

/// What one chunk did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counted {
    /// Pages walked (0: the phase moved on instead).
    pub pages: u32,
    pub went: Vec<Went>,
}

#[derive(FromRow)]
struct ChunkRow {
    tenant_ids: Vec<Uuid>,
    rules: Vec<String>,
    tasks: Vec<i64>,
    events: Vec<i64>,
    queue_items: Vec<i64>,
    /// Payloads and log lines deleted (the tasks' count only).
    dependents: i64,
    rules_version: i64,
}

/// Counts up to `pages` pages of the detached source the cursor is at (its tasks, with the events
/// of those that went, in the `count-tasks` phase: an event goes with its task, decided once; its
/// orphan events, whose task is not in the source, in `count-events`), adds what went to the
/// receipts and
/// deletes the queue items of the tasks that went (by `queue_rule`, the run's), then confirms
/// the rules if it deleted any. Past a source's last page, moves the cursor on; past the last
/// source's events, the rewrite is [`Rewrite::counted`]. In the caller's transaction.
pub async fn chunk(
    conn: &mut PgConnection,
    rewrite: &Rewrite,
    pages: u32,
    queue_rule: &Rule,
) -> Result<Counted, sqlx::Error> {
    let Some(source) = rewrite.current_source() else {
        return Ok(Counted::default());
    };
    let relid = match rewrite.phase {
        Phase::CountTasks => source.tasks_relid,
        Phase::CountEvents => source.events_relid,
        phase => {
            return Err(sqlx::Error::Protocol(format!(
                "rewrite {} is not counting but at {}",
                rewrite.id,
                phase.as_str()
            )))
        }
    };
    let total: i64 = super::copy::pages(&mut *conn, relid).await?;
    if rewrite.block >= total {
        let (phase, next) = match rewrite.phase {
            Phase::CountTasks if rewrite.source + 1 >= rewrite.sources.len() as i32 => {
                (Phase::CountEvents, 0)
            }
            phase => (phase, rewrite.source + 1),
        };
        sqlx::query!(
            "UPDATE history_rewrites SET phase = $2, source = $3, block = 0 WHERE id = $1",
            rewrite.id,
            phase.as_str(),
            next
        )
        .execute(&mut *conn)
        .await?;
        return Ok(Counted::default());
    }
    let start = u32::try_from(rewrite.block).unwrap_or(u32::MAX);
    let end =
        u32::try_from((rewrite.block + i64::from(pages.max(1))).min(total)).unwrap_or(u32::MAX);
    let blocks = BlockRange { start, end };
    let (from, to) = blocks.tids();
    let (tasks, events) =
        crate::history::relation_names(&mut *conn, source.tasks_relid, source.events_relid).await?;
    let recorded = rewrite.recorded_rule();
    let receipt = rewrite.receipt();
    let mut sql = match rewrite.phase {
        Phase::CountTasks => {
            let mut sql = Sql::new(
                "WITH rt AS MATERIALIZED (SELECT * FROM history_rewrite_tenants WHERE rewrite_id = {id}),
                 dropped AS MATERIALIZED (
                     SELECT t.id, t.inserted_at, t.tenant_id, coalesce(t.finished_at, t.inserted_at) AS key,
                            rt.deleted_at IS NOT NULL AS purged,
                            ra.task_id IS NOT NULL AND {archives_status} AS archived, ra.max_payload_id, ra.max_log_id
                     FROM {tasks} t LEFT JOIN rt ON rt.tenant_id = t.tenant_id
                     LEFT JOIN retention_archived_tasks ra
                            ON ra.task_inserted_at = t.inserted_at AND ra.task_id = t.id
                           AND ra.task_inserted_at >= {lower} AND ra.task_inserted_at < {upper}
                     WHERE t.ctid >= {from}::tid AND t.ctid < {to}::tid AND {due}
                 ), queue AS (
                     DELETE FROM queue_items q USING dropped d
                     WHERE q.task_id = d.id AND q.task_inserted_at = d.inserted_at AND {queue_due}
                     RETURNING q.task_id, q.task_inserted_at
                 ), {dependents}, by_task AS (
                     SELECT tenant_id, purged, count(*) AS tasks, min(key) AS oldest, max(key) AS newest FROM dropped GROUP BY 1, 2
                 ), by_queue AS (
                     SELECT d.tenant_id, d.purged, count(*) AS n
                     FROM queue q JOIN dropped d ON d.id = q.task_id AND d.inserted_at = q.task_inserted_at GROUP BY 1, 2
                 ), by_events AS (
                     SELECT d.tenant_id, d.purged, count(*) AS n
                     FROM dropped d JOIN {events} e ON e.task_id = d.id AND e.task_inserted_at = d.inserted_at GROUP BY 1, 2
                 ), by_dependents AS (
                     SELECT d.tenant_id, d.purged, count(*) FILTER (WHERE x.payload) AS payloads,
                            count(*) FILTER (WHERE NOT x.payload) AS logs, count(*) FILTER (WHERE x.external) AS objects
                     FROM (SELECT tenant_id, true AS payload, external FROM payloads
                           UNION ALL SELECT tenant_id, false, false FROM logs) x
                     JOIN (SELECT DISTINCT tenant_id, purged FROM dropped) d ON d.tenant_id = x.tenant_id
                     GROUP BY 1, 2
                 ), went AS (
                     SELECT b.tenant_id, CASE WHEN b.purged THEN 'deleted-tenants' ELSE 'retention' END AS rule,
                            b.tasks, coalesce(ev.n, 0) AS events, coalesce(q.n, 0) AS queue_items,
                            coalesce(p.payloads, 0) AS payloads, coalesce(p.logs, 0) AS logs,
                            coalesce(p.objects, 0) AS objects, b.oldest, b.newest
                     FROM by_task b LEFT JOIN by_queue q ON q.tenant_id = b.tenant_id AND q.purged = b.purged
                     LEFT JOIN by_events ev ON ev.tenant_id = b.tenant_id AND ev.purged = b.purged
                     LEFT JOIN by_dependents p ON p.tenant_id = b.tenant_id AND p.purged = b.purged
                 ), receipt AS (
                     {receipt}
                 ), moved AS (
                     UPDATE history_rewrites SET block = {end} WHERE id = {id2}
                 )
                 SELECT coalesce(array_agg(tenant_id ORDER BY tenant_id, rule), '{{}}') AS tenant_ids,
                        coalesce(array_agg(rule ORDER BY tenant_id, rule), '{{}}') AS rules,
                        coalesce(array_agg(tasks ORDER BY tenant_id, rule), '{{}}') AS tasks,
                        coalesce(array_agg(events ORDER BY tenant_id, rule), '{{}}') AS events,
                        coalesce(array_agg(queue_items ORDER BY tenant_id, rule), '{{}}') AS queue_items,
                        (SELECT count(*) FROM payloads) + (SELECT count(*) FROM logs) AS dependents,
                        {version} AS rules_version
                 FROM went",
            );
            sql.raw("tasks", tasks)
                .raw("events", events.clone())
                .bind("id", rewrite.id)
                .bind("lower", source.lower)
                .bind("upper", source.upper)
                .with(
                    "due",
                    recorded.task_dropped("t", "rt", "ra", &events, source.lower, source.upper),
                )
                .with("archives_status", recorded.archives_status("t"))
                .with("queue_due", queue_rule.queue_item_due("q"))
                .with(
                    "dependents",
                    dependents::delete_ctes(&Victims {
                        cte: "dropped",
                        id: "id",
                        inserted_at: "inserted_at",
                        lower: source.lower.to_rfc3339(),
                        upper: source.upper.to_rfc3339(),
                        only_if_gone: true,
                        unless_held_now: Some(queue_rule),
                        up_to_archived: true,
                    }),
                );
            sql
        }
        _ => {
            let mut sql = Sql::new(
                "WITH orphan AS MATERIALIZED (
                     SELECT e.id, e.tenant_id, e.task_id, e.task_inserted_at, e.created_at
                     FROM {events} e
                     WHERE e.ctid >= {from}::tid AND e.ctid < {to}::tid
                       AND NOT EXISTS (SELECT 1 FROM {tasks} t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)
                 ), went AS (
                     SELECT o.tenant_id, 'orphan-events' AS rule, 0::bigint AS tasks, count(*) AS events, 0::bigint AS queue_items,
                            0::bigint AS payloads, 0::bigint AS logs, 0::bigint AS objects,
                            min(o.created_at) AS oldest, max(o.created_at) AS newest
                     FROM orphan o WHERE {orphan_due}
                     GROUP BY 1
                 ), receipt AS (
                     {receipt}
                 ), moved AS (
                     UPDATE history_rewrites SET block = {end} WHERE id = {id2}
                 )
                 SELECT coalesce(array_agg(tenant_id ORDER BY tenant_id, rule), '{{}}') AS tenant_ids,
                        coalesce(array_agg(rule ORDER BY tenant_id, rule), '{{}}') AS rules,
                        coalesce(array_agg(tasks ORDER BY tenant_id, rule), '{{}}') AS tasks,
                        coalesce(array_agg(events ORDER BY tenant_id, rule), '{{}}') AS events,
                        coalesce(array_agg(queue_items ORDER BY tenant_id, rule), '{{}}') AS queue_items,
                        0::bigint AS dependents,
                        {version} AS rules_version
                 FROM went",
            );
            sql.raw("events", events)
                .raw("tasks", tasks.clone())
                .with("orphan_due", recorded.orphan_due("o", &tasks));
            sql
        }
    };
    sql.bind("id2", rewrite.id)
        .bind("from", from)
        .bind("to", to)
        .bind("end", i64::from(end))
        .with(
            "receipt",
            receipts::add_with_dependents(
                &receipt,
                "SELECT tenant_id, rule, tasks, events, queue_items, payloads, logs, objects, oldest, newest FROM went",
            ),
        )
        .raw("version", rule::VERSION);
    let row: ChunkRow = sql.build_query_as().fetch_one(&mut *conn).await?;
    let went: Vec<Went> = row
        .tenant_ids
        .into_iter()
        .zip(row.rules)
        .zip(row.tasks.into_iter().zip(row.events))
        .zip(row.queue_items)
        .map(|(((tenant_id, rule), (tasks, events)), queue_items)| Went {
            tenant_id,
            rule,
            tasks,
            events,
            queue_items,
        })
        .collect();
    if row.dependents > 0 || went.iter().any(|w| w.queue_items > 0) {
        rule::confirm(conn, row.rules_version).await?;
    }
    Ok(Counted {
        pages: blocks.pages(),
        went,
    })
}

/// Drops the detached sources of rewrite `id` once its count is done, and forgets the rewrite.
/// Returns false when another runner holds it or its count is not done. A source an operator
/// renamed or attached again is left alone (and forgotten).
pub async fn finish(
    pool: &PgPool,
    id: i64,
    limits: BatchLimits,
    lock_timeout: std::time::Duration,
) -> Result<bool, sqlx::Error> {
    let mut tx = batch::begin(pool, limits.with_lock_timeout(lock_timeout)).await?;
    match lock(&mut tx, id).await {
        Ok(Some(rewrite)) if rewrite.counted() => {}
        Ok(_) => return tx.rollback().await.map(|()| false),
        Err(error) if batch::is_lock_not_had(&error) => return Ok(false),
        Err(error) => return Err(error),
    }
    let recorded = sqlx::query!(
        "SELECT relid, relname FROM history_detached WHERE rewrite_id = $1 FOR UPDATE",
        id
    )
    .fetch_all(&mut *tx)
    .await?;
    for (relid, relname) in recorded.into_iter().map(|row| (row.relid, row.relname)) {
        match crate::history::detached::drop_if_ours(&mut tx, relid, &relname).await {
            Ok(_) => {}
            // Someone is reading it: the next run drops it.
            Err(error) if batch::is_lock_not_had(&error) => {
                tx.rollback().await?;
                return Ok(false);
            }
            Err(error) => return Err(error),
        }
        sqlx::query!("DELETE FROM history_detached WHERE relid = $1", relid)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query!("DELETE FROM history_rewrites WHERE id = $1", id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}
