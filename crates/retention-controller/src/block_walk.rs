//! Walking a table's heap once, in block-range batches (see [`repository::heap`]), each in its
//! own short transaction, sized toward the run's batch duration and paced like every batch.

use std::future::Future;

use repository::heap::BlockRange;
use tokio::time::Instant;

use crate::batching::{BatchSizer, Settled};
use crate::task::{RunContext, RunReport, TaskError};

/// Deletes through pages `0..pages` in ranges, calling `delete` for each; `delete` runs one
/// transaction and returns the rows it deleted by rule.
///
/// A range that times out is retried smaller; one that still times out at a single page (a row
/// lock held for longer than `lock_timeout`, again and again) is left for the next run and
/// counted as `pages skipped`. Stops between batches when the run is interrupted. The pages passed
/// are counted as `heap pages walked`.
pub async fn walk_blocks<F, Fut>(ctx: &RunContext, report: &mut RunReport, pages: u32, delete: F) -> Result<(), TaskError>
where
    F: FnMut(BlockRange) -> Fut,
    Fut: Future<Output = Result<Vec<(&'static str, u64)>, sqlx::Error>> + Send,
{
    walk_blocks_sized(ctx, report, pages, &mut ctx.block_sizer(), delete).await
}

/// [`walk_blocks`] with the caller's sizer: walks of several tables alike (the ranges of run
/// history) start each from the size the last one reached.
pub async fn walk_blocks_sized<F, Fut>(
    ctx: &RunContext,
    report: &mut RunReport,
    pages: u32,
    sizer: &mut BatchSizer,
    mut delete: F,
) -> Result<(), TaskError>
where
    F: FnMut(BlockRange) -> Fut,
    Fut: Future<Output = Result<Vec<(&'static str, u64)>, sqlx::Error>> + Send,
{
    let deleted_before = report.deleted;
    let mut next = 0u32;
    while next < pages {
        if let Some(stop) = ctx.interrupted() {
            report.completion = stop;
            return Ok(());
        }
        let range = BlockRange { start: next, end: next.saturating_add(sizer.size()).min(pages) };
        let started = Instant::now();
        let result = delete(range).await;
        let elapsed = started.elapsed();
        match sizer.settle(elapsed, result) {
            Settled::Done(parts) => {
                report.record_batch_parts(&parts);
                report.count("heap pages walked", u64::from(range.pages()));
                next = range.end;
                let left = estimate_left(report.deleted - deleted_before, next, pages);
                tracing::debug!(from = range.start, to = range.end, elapsed_ms = elapsed.as_millis() as u64, "block batch committed");
                ctx.batch_done(elapsed, report, Some(left)).await;
            }
            Settled::Retry(error) => {
                tracing::warn!(from = range.start, to = range.end, %error, next_pages = sizer.size(), "batch timed out; retrying smaller");
            }
            Settled::GaveUp(error) if repository::batch::is_timeout(&error) => {
                tracing::warn!(page = range.start, %error, "page skipped: it kept timing out; the next run retries it");
                report.count("pages skipped", u64::from(range.pages()));
                report.count("heap pages walked", u64::from(range.pages()));
                next = range.end;
            }
            Settled::GaveUp(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Rows still due on the pages not yet walked, assuming they hold as many as the pages walked.
fn estimate_left(deleted: u64, walked: u32, pages: u32) -> u64 {
    if walked == 0 {
        return 0;
    }
    (deleted as f64 * f64::from(pages - walked) / f64::from(walked)).round() as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn what_is_left_is_extrapolated_from_the_pages_walked() {
        assert_eq!(super::estimate_left(1_000, 25, 100), 3_000);
        assert_eq!(super::estimate_left(1_000, 100, 100), 0);
        assert_eq!(super::estimate_left(0, 0, 100), 0);
    }
}
