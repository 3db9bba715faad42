//! Keeping the planner's statistics true after a large purge.
//!
//! Autovacuum analyzes a table once a tenth of it has changed, but only when it gets to it (its
//! naptime is a minute, and its worker VACUUMs first, throttled, minutes for a large table); until
//! then the planner plans every query for the rows that are gone. So a run that deleted a large
//! share of a table runs `ANALYZE` itself, from a small sample, waiting at most 100 ms for its
//! lock: if autovacuum already holds the table, it is left to finish and analyze (waiting longer
//! would cancel it). The VACUUM that makes the space reusable is left to autovacuum: it is
//! throttled, which is what the foreground needs, and it starts by itself past the same threshold.

use repository::heap::{self, Analyzed, TableSize};

use crate::task::{RunContext, RunReport, TaskError};

/// Rows a run must delete, at least, before it analyzes.
const MIN_ROWS: u64 = 10_000;
/// And the share of the table's rows (as estimated before the run) they must be.
const MIN_SHARE: f64 = 0.1;

/// Whether deleting `deleted` rows from a table of `before` calls for a fresh ANALYZE.
pub fn is_large_purge(deleted: u64, before: TableSize) -> bool {
    deleted >= MIN_ROWS && deleted as f64 >= MIN_SHARE * before.rows
}

/// ANALYZEs `table` when this run's deletions were a large purge; counted as `analyzed`.
pub async fn refresh_after_purge(
    ctx: &RunContext,
    table: &str,
    before: TableSize,
    report: &mut RunReport,
) -> Result<(), TaskError> {
    if !is_large_purge(report.deleted, before) {
        return Ok(());
    }
    let started = tokio::time::Instant::now();
    match heap::analyze(&ctx.pool, table).await? {
        Analyzed::Done => {
            tracing::info!(
                table,
                deleted = report.deleted,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "analyzed after a large purge"
            );
            report.count("analyzed", 1);
        }
        Analyzed::Busy => {
            tracing::info!(
                table,
                "not analyzed: autovacuum is processing the table and analyzes it next"
            );
            report.count("analyze left to autovacuum", 1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_large_share_of_a_table_counts_as_a_large_purge() {
        let table = |rows: f64| TableSize { pages: 0, rows };
        assert!(is_large_purge(10_000, table(100_000.0)));
        assert!(
            !is_large_purge(9_999, table(10_000.0)),
            "too few rows to matter"
        );
        assert!(
            !is_large_purge(10_000, table(100_001.0)),
            "under a tenth of the table"
        );
        assert!(is_large_purge(2_598_000, table(0.0)), "never analyzed");
    }
}
