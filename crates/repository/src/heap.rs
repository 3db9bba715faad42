//! Walking a table by physical block ranges.
//!
//! A batch `WHERE ctid >= '(start,0)' AND ctid < '(end,0)' AND <rule>` is a Tid Range Scan
//! (PostgreSQL 14+): it reads exactly the pages `start..end`, in file order, whatever the rule.
//! Walking `0..pages` in such batches deletes a backlog at the speed of one bare `DELETE` (a
//! sequential pass over the heap) while each transaction stays small, and no batch reads what an
//! earlier one passed: the whole walk reads the table once.

use sqlx::PgExecutor;

/// Pages `start..end` of a table's heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub start: u32,
    pub end: u32,
}

impl BlockRange {
    pub fn pages(&self) -> u32 {
        self.end - self.start
    }

    /// The first tid of the range and the first past it, as `tid` literals for `$n::tid`.
    pub(crate) fn tids(&self) -> (String, String) {
        (format!("({},0)", self.start), format!("({},0)", self.end))
    }
}

/// A table's size now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TableSize {
    /// Pages in the heap. Pages added later (new rows) are not walked: their rows are seconds old.
    pub pages: u32,
    /// The planner's estimate of its rows (`reltuples`; 0 when never analyzed).
    pub rows: f64,
}

/// The size of a table that always exists (`sessions`, `queue_items`).
pub async fn size(executor: impl PgExecutor<'_>, table: &str) -> Result<TableSize, sqlx::Error> {
    size_if_present(executor, table)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

/// The size of a table a rewrite or a carve may have dropped since it was planned: `None` when
/// it is gone, including dropped while this statement ran (the catalog row still visible to its
/// snapshot, the relation no longer there to measure: `pg_relation_size` answers NULL).
pub async fn size_if_present(
    executor: impl PgExecutor<'_>,
    table: &str,
) -> Result<Option<TableSize>, sqlx::Error> {
    let row = sqlx::query!(
        r#"SELECT pg_relation_size(c.oid) / current_setting('block_size')::bigint AS "pages?", greatest(c.reltuples, 0) AS "rows!"
         FROM pg_class c WHERE c.oid = to_regclass($1)"#,
        table
    )
    .fetch_optional(executor)
    .await?;
    Ok(row.and_then(|row| {
        let (pages, rows): (Option<i64>, f32) = (row.pages, row.rows);
        Some(TableSize {
            pages: u32::try_from(pages?).unwrap_or(u32::MAX),
            rows: f64::from(rows),
        })
    }))
}

/// Statistics target of the ANALYZE after a purge: a sample of 300 x 10 = 3,000 pages instead of
/// the default 30,000, which took 1.1-1.4 s on a 1 GB table just emptied (measured). Coarser
/// histograms, until autovacuum's next ANALYZE (after a tenth of what is left has changed).
const QUICK_STATISTICS_TARGET: &str = "10";

/// What became of an ANALYZE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Analyzed {
    Done,
    /// Another process (autovacuum, as a rule) is vacuuming or analyzing the table; autovacuum
    /// analyzes it after its vacuum.
    Busy,
}

/// Refreshes the planner's statistics for `table` from a small sample (no lock that blocks
/// reads or writes), unless a vacuum or analyze is already under way on it.
///
/// The lock ANALYZE needs conflicts only with VACUUM and other ANALYZEs; after a purge that is
/// usually autovacuum, which PostgreSQL cancels when it blocks a lock request for
/// `deadlock_timeout` (1 s). So it does not wait at all (`SKIP_LOCKED`): it used to wait 100 ms
/// for the lock, a run's last 100 ms whenever autovacuum had started on the table during it. In
/// a transaction, ANALYZE keeps its lock until the end: holding it afterwards is what says it ran.
pub async fn analyze(pool: &sqlx::PgPool, table: &str) -> Result<Analyzed, sqlx::Error> {
    // The skip is a WARNING to the client: the result says it, the log need not.
    let mut tx = pool
        .begin_with(format!("BEGIN; SET LOCAL default_statistics_target = {QUICK_STATISTICS_TARGET}; SET LOCAL client_min_messages = error"))
        .await?;
    // The name is one of the engine's own tables, never input.
    sqlx::query(&format!("ANALYZE (SKIP_LOCKED) {table}"))
        .execute(&mut *tx)
        .await?;
    // `$1::text::regclass`: the name is bound as text (the macros know no regclass).
    let ran: bool = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM pg_locks
                        WHERE locktype = 'relation' AND relation = $1::text::regclass AND pid = pg_backend_pid()
                          AND mode = 'ShareUpdateExclusiveLock' AND granted) AS "ran!""#,
        table
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(if ran { Analyzed::Done } else { Analyzed::Busy })
}

/// The row estimate of a text plan's top node (`... (cost=0.00..1.00 rows=42 width=0)`).
pub(crate) fn plan_rows(plan_first_line: &str) -> f64 {
    plan_first_line
        .split_once("rows=")
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_top_nodes_row_estimate() {
        let line = "Bitmap Heap Scan on user_sessions  (cost=52.10..4242.60 rows=2598000 width=4)";
        assert_eq!(super::plan_rows(line), 2_598_000.0);
        assert_eq!(
            super::plan_rows("Result  (cost=0.00..0.01 rows=1 width=4)"),
            1.0
        );
    }
}
