//! The copy: the sources' pages in block ranges, each chunk one statement that copies what the
//! rule keeps into the new range's tables and moves the rewrite's cursor on, in the caller's
//! transaction (which holds the rewrite, see [`super::lock`]).

use sqlx::{FromRow, PgConnection};

use super::{columns, Phase, Rewrite};
use crate::heap::BlockRange;
use crate::sql::Sql;

/// What one chunk did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    /// Pages walked (0: the phase moved on instead).
    pub pages: u32,
    /// Rows read, and rows copied (kept).
    pub read: i64,
    pub kept: i64,
}

#[derive(FromRow)]
struct ChunkRow {
    read: i64,
    kept: i64,
}

/// Pages in table `relid` now.
pub(super) async fn pages(
    conn: &mut PgConnection,
    relid: sqlx::postgres::types::Oid,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT pg_relation_size($1::oid::regclass) / current_setting('block_size')::bigint AS "pages!""#,
        relid
    )
    .fetch_one(conn)
    .await
}

/// Moves the rewrite's cursor to the next source, or the next phase after the last.
async fn next_source(conn: &mut PgConnection, rewrite: &Rewrite) -> Result<(), sqlx::Error> {
    let last = rewrite.source + 1 >= rewrite.sources.len() as i32;
    let phase = match (rewrite.phase, last) {
        (Phase::CopyTasks, true) => Phase::CopyEvents,
        (Phase::CopyEvents, true) => Phase::CatchUp,
        (phase, _) => phase,
    };
    let source = if last { 0 } else { rewrite.source + 1 };
    sqlx::query!(
        "UPDATE history_rewrites SET phase = $2, source = $3, block = 0 WHERE id = $1",
        rewrite.id,
        phase.as_str(),
        source
    )
    .execute(&mut *conn)
    .await?;
    if phase == Phase::CatchUp {
        // Statistics for the replays' lookups into the new tables (a small sample: bounded).
        sqlx::query!("SET LOCAL default_statistics_target = 10")
            .execute(&mut *conn)
            .await?;
        for table in [&rewrite.new_tasks_name, &rewrite.new_events_name] {
            sqlx::query(&format!("ANALYZE {}", crate::history::ident(table)))
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Copies, from the source and pages the cursor is at (up to `pages` of them), what the rule
/// keeps: in the tasks phase, the tasks it does not find due; in the events phase, the events of
/// the tasks copied, and orphan events it keeps (too young, or held). Records the tenants seen
/// (and, in the events phase, every orphan met). Past a source's last page, moves the cursor to
/// the next source, or phase.
///
/// Writers go on meanwhile, so a walk by pages may meet a row twice (an update moved it to a page
/// ahead: the copy keeps the first version it met) or not at all (an insert, or an update, into
/// a page behind it): every such write is in the sources' change log, whose replay decides those
/// rows again ([`super::replay`]).
pub async fn chunk(
    conn: &mut PgConnection,
    rewrite: &Rewrite,
    pages_at_most: u32,
) -> Result<Copied, sqlx::Error> {
    let Some(source) = rewrite.current_source() else {
        return Err(sqlx::Error::Protocol(format!(
            "rewrite {} has no source at {}",
            rewrite.id, rewrite.source
        )));
    };
    let relid = match rewrite.phase {
        Phase::CopyTasks => source.tasks_relid,
        Phase::CopyEvents => source.events_relid,
        phase => {
            return Err(sqlx::Error::Protocol(format!(
                "rewrite {} is not copying but at {}",
                rewrite.id,
                phase.as_str()
            )))
        }
    };
    if testing::copies_stall() {
        sqlx::query("SELECT pg_sleep(60)")
            .execute(&mut *conn)
            .await?;
    }
    let total = pages(&mut *conn, relid).await?;
    if rewrite.block >= total {
        next_source(&mut *conn, rewrite).await?;
        return Ok(Copied::default());
    }
    let start = u32::try_from(rewrite.block).unwrap_or(u32::MAX);
    let end = u32::try_from((rewrite.block + i64::from(pages_at_most.max(1))).min(total))
        .unwrap_or(u32::MAX);
    let blocks = BlockRange { start, end };
    let (from, to) = blocks.tids();
    let rule = rewrite.rule();
    let (source_tasks, source_events) =
        crate::history::relation_names(&mut *conn, source.tasks_relid, source.events_relid).await?;
    let mut sql = match rewrite.phase {
        Phase::CopyTasks => {
            let mut sql = Sql::new(
                "WITH scanned AS MATERIALIZED (
                     SELECT t.*, {due} AS due FROM {source} t LEFT JOIN tenants tn ON tn.id = t.tenant_id
                     LEFT JOIN retention_archived_tasks ra
                            ON ra.task_inserted_at = t.inserted_at AND ra.task_id = t.id
                           AND ra.task_inserted_at >= {lower} AND ra.task_inserted_at < {upper}
                     WHERE t.ctid >= {from}::tid AND t.ctid < {to}::tid
                 ), kept AS (
                     INSERT INTO {new} ({columns}) SELECT {columns2} FROM scanned WHERE NOT due
                     ON CONFLICT DO NOTHING RETURNING 1
                 ), seen AS (
                     INSERT INTO history_rewrite_tenants (rewrite_id, tenant_id)
                     SELECT DISTINCT {id}::bigint, tenant_id FROM scanned ON CONFLICT DO NOTHING
                 ), moved AS (
                     UPDATE history_rewrites SET block = {end}, rows_read = rows_read + (SELECT count(*) FROM scanned),
                            tasks_kept = tasks_kept + (SELECT count(*) FROM kept)
                     WHERE id = {id2}
                 )
                 SELECT (SELECT count(*) FROM scanned) AS read, (SELECT count(*) FROM kept) AS kept",
            );
            let columns = columns(&mut *conn, "tasks").await?;
            sql.with(
                "due",
                rule.task_due_with_record("t", "tn", "ra", source.lower, source.upper),
            )
            .bind("lower", source.lower)
            .bind("upper", source.upper)
            .raw("source", source_tasks)
            .raw("columns", columns.clone())
            .raw("columns2", columns);
            sql
        }
        _ => {
            let mut sql = Sql::new(
                "WITH scanned AS MATERIALIZED (
                     SELECT e.*,
                            EXISTS (SELECT 1 FROM {new_tasks} k WHERE k.id = e.task_id AND k.inserted_at = e.task_inserted_at) AS with_task,
                            NOT EXISTS (SELECT 1 FROM {source_tasks} t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at) AS orphan
                     FROM {source} e
                     WHERE e.ctid >= {from}::tid AND e.ctid < {to}::tid
                 ), kept AS (
                     INSERT INTO {new} ({columns}) SELECT {columns2} FROM scanned s
                     WHERE s.with_task OR (s.orphan AND {orphan_kept})
                     ON CONFLICT DO NOTHING RETURNING 1
                 ), orphans AS (
                     INSERT INTO history_rewrite_orphans (rewrite_id, event_id, task_inserted_at, tenant_id)
                     SELECT {id3}::bigint, id, task_inserted_at, tenant_id FROM scanned WHERE orphan ON CONFLICT DO NOTHING
                 ), seen AS (
                     INSERT INTO history_rewrite_tenants (rewrite_id, tenant_id)
                     SELECT DISTINCT {id}::bigint, tenant_id FROM scanned ON CONFLICT DO NOTHING
                 ), moved AS (
                     UPDATE history_rewrites SET block = {end} WHERE id = {id2}
                 )
                 SELECT (SELECT count(*) FROM scanned) AS read, (SELECT count(*) FROM kept) AS kept",
            );
            let columns = columns(&mut *conn, "task_events").await?;
            sql.raw("new_tasks", crate::history::ident(&rewrite.new_tasks_name))
                .raw("source_tasks", source_tasks.clone())
                .with("orphan_kept", rule.orphan_kept("s", &source_tasks))
                .raw("source", source_events)
                .raw("columns", columns.clone())
                .raw("columns2", columns)
                .bind("id3", rewrite.id);
            sql
        }
    };
    let new = match rewrite.phase {
        Phase::CopyTasks => &rewrite.new_tasks_name,
        _ => &rewrite.new_events_name,
    };
    sql.raw("new", crate::history::ident(new))
        .bind("from", from)
        .bind("to", to)
        .bind("id", rewrite.id)
        .bind("id2", rewrite.id)
        .bind("end", i64::from(end));
    let row: ChunkRow = sql.build_query_as().fetch_one(&mut *conn).await?;
    Ok(Copied {
        pages: blocks.pages(),
        read: row.read,
        kept: row.kept,
    })
}

/// Fault injection for tests.
pub mod testing {
    #[cfg(feature = "testing")]
    static COPIES_STALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Makes every copy step wait (`pg_sleep`) until its statement timeout cancels it, as a copy
    /// of pages too slow for the timeout would: to show what a rewrite whose steps keep failing
    /// does. Only in builds with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn stall_copies(stall: bool) {
        COPIES_STALL.store(stall, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn copies_stall() -> bool {
        #[cfg(feature = "testing")]
        {
            COPIES_STALL.load(std::sync::atomic::Ordering::SeqCst)
        }
        #[cfg(not(feature = "testing"))]
        {
            false
        }
    }
}
